//! Request bodies read under a deadline and a size limit, before any handler sees them.
//!
//! A client that announces `Content-Length: 100000` and then sends a few bytes would otherwise hold
//! its connection (and a handler's task) for as long as it likes; a thousand such clients lock
//! everyone else out. Every handler of the API takes its body whole, so reading it here first
//! costs nothing extra: the bytes are handed on as they are.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorKind};

/// Told of each body refused, with the request's path and the reason (`body_too_large`,
/// `body_timeout`, `invalid_body`), so the server can count it where it belongs.
pub type OnRefused = std::sync::Arc<dyn Fn(&str, &'static str) + Send + Sync>;

/// `server.max_body_bytes` and `server.body_timeout`.
#[derive(Clone)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
    pub on_refused: OnRefused,
}

/// Reads the whole body within `timeout` (408 otherwise) and `max_bytes` (413 otherwise), and
/// hands the request on with the bytes as its body; a refusal is the answer to send.
pub async fn read(limits: &BodyLimits, req: Request) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    let refused = |reason| (limits.on_refused)(parts.uri.path(), reason);
    let read = tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, limits.max_bytes));
    match read.await {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                refused("body_too_large");
                Err(closing(
                    ApiError::too_large(limits.max_bytes).into_response(),
                ))
            } else {
                refused("invalid_body");
                Err(closing(
                    ApiError::bad_request("invalid_body", "the request body could not be read")
                        .into_response(),
                ))
            }
        }
        Err(_) => {
            refused("body_timeout");
            Err(closing(
                ApiError::new(
 ErrorKind::RequestTimeout,
 "body_timeout",
                    format!(
                        "the request body did not arrive within {} ms (server.body_timeout); send it at once",
                        limits.timeout.as_millis()
                    ),
                )
                .into_response(),
            ))
        }
    }
}

/// The connection closes after this answer: the rest of its body is not worth waiting for.
fn closing(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}
