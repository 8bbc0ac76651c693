//! The JSON body extractor of every typed route: `JsonBody<T>` gives the handler a `T`, or answers
//! 400 in our error shape, naming the problem and the body's shape (serde's message says which
//! field; the shape says what a valid body looks like). An empty body is `{}`, so routes whose
//! fields are all optional take a bare POST.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A request body type and what a valid one looks like, for error messages.
pub trait BodyShape: DeserializeOwned {
    /// E.g. `{"session": "…", "to": "persona"}`.
    const SHAPE: &'static str;
}

/// A JSON body parsed into `T`.
pub struct JsonBody<T>(pub T);

impl<T: BodyShape, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let body = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    super::error::ErrorKind::PayloadTooLarge,
                    "body_too_large",
                    "request body exceeds `server.max_body_bytes`",
                )
            } else {
                ApiError::bad_request("invalid_body", r.body_text())
            }
        })?;
        parse(&body).map(JsonBody)
    }
}

/// `bytes` as a `T` (blank: `{}`), or the 400 naming what is wrong.
pub fn parse<T: BodyShape>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_syntax() || e.is_eof() {
            "malformed_json"
        } else {
            "invalid_body"
        };
        ApiError::bad_request(code, format!("{e}; the body is {}", T::SHAPE))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Probe {
        session: Option<String>,
    }

    impl BodyShape for Probe {
        const SHAPE: &'static str = "{\"session\"?: \"…\"}";
    }

    #[test]
    fn blank_is_empty_and_errors_name_the_shape() {
        assert!(parse::<Probe>(b"  ").unwrap().session.is_none());
        let e = parse::<Probe>(b"{\"sesion\": 1}").unwrap_err();
        assert_eq!(e.code, "invalid_body");
        assert!(e.message.contains("sesion") && e.message.contains("\"session\"?"));
        assert_eq!(parse::<Probe>(b"{").unwrap_err().code, "malformed_json");
    }
}
