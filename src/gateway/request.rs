//! What a gateway call says about itself, read and checked once: the model it names and the
//! `X-Hypertool-*` attribution headers. Every name follows `core::labels::check_name` (the same
//! rules as the events API), so a megabyte-long model or persona is a 400 naming the field — never
//! a metric label, a response header or a ledger row.

use axum::http::HeaderMap;
use serde_json::{Map, Value};

use crate::core::labels::{check_name, NameField};
use crate::web::error::ApiError;

/// The attribution headers and the kind of name each carries.
pub const ATTRIBUTION_HEADERS: [(&str, NameField); 6] = [
    ("x-hypertool-persona", NameField::Persona),
    ("x-hypertool-chatmode", NameField::Chatmode),
    ("x-hypertool-workflow", NameField::Workflow),
    ("x-hypertool-stage", NameField::Stage),
    ("x-hypertool-session", NameField::Session),
    ("x-hypertool-run", NameField::Run),
];

/// Refuses a call whose attribution headers break the name rules (400, the header named).
pub fn check_headers(headers: &HeaderMap) -> Result<(), ApiError> {
    for (name, field) in ATTRIBUTION_HEADERS {
        let Some(raw) = headers.get(name) else {
            continue;
        };
        let Ok(text) = raw.to_str() else {
            return Err(ApiError::bad_request(
                "invalid_header",
                format!("`{name}` must be visible ASCII"),
            )
            .param(name));
        };
        if text.trim().is_empty() {
            // An empty header is the same as none (some clients always send them).
            continue;
        }
        if let Err(e) = check_name(field, text) {
            return Err(
                ApiError::bad_request("invalid_header", format!("`{name}` {}", e.reason))
                    .param(name),
            );
        }
    }
    Ok(())
}

/// An attribution header's value, once [`check_headers`] has passed (empty means absent).
pub fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// A gateway call's body and headers, read and checked: the JSON object and its model. A large
/// body is parsed off the async workers (`tokens::off_the_workers`: a 4 MB body is tens of
/// milliseconds of parsing, which other clients' requests would otherwise wait behind).
pub async fn read(
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
    limit: usize,
) -> Result<(Map<String, Value>, String), ApiError> {
    let body = body.map_err(|r| ApiError::from_body_rejection(r, limit))?;
    check_headers(headers)?;
    let parsed =
        super::tokens::off_the_workers(body.len(), super::tokens::DEFAULT_DEADLINE, || {
            ApiError::json_object(&body)
        })
        .await;
    let request = parsed.unwrap_or_else(|| {
        Err(ApiError::unavailable(
            "every thread that reads large bodies stayed busy for 30 s; retry the call",
        ))
    })?;
    drop(body);
    let model = model(&request)?;
    Ok((request, model))
}

/// The `model` of a request body: required, a string, and a valid name.
pub fn model(request: &Map<String, Value>) -> Result<String, ApiError> {
    let Some(raw) = request.get("model").and_then(Value::as_str) else {
        return Err(ApiError::bad_request(
            "missing_model",
            "`model` is required (a string), e.g. \"mock/gpt-4o\"",
        )
        .param("model"));
    };
    check_name(NameField::Model, raw)
        .map(str::to_string)
        .map_err(|e| {
            ApiError::bad_request("invalid_model", format!("`model` {}", e.reason)).param("model")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_long_model_is_a_400_that_does_not_echo_it() {
        let long = format!("mock/{}", "x".repeat(1_000_000));
        let body = json!({"model": long});
        let err = model(body.as_object().unwrap()).unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
        assert_eq!(err.param.as_deref(), Some("model"));
        assert!(err.message.len() < 200, "{}", err.message);
    }

    #[test]
    fn headers_follow_the_same_rules() {
        let mut h = HeaderMap::new();
        h.insert("x-hypertool-persona", "backend-engineer".parse().unwrap());
        h.insert("x-hypertool-session", "s".repeat(256).parse().unwrap());
        assert!(check_headers(&h).is_ok());
        h.insert("x-hypertool-chatmode", "c".repeat(201).parse().unwrap());
        let err = check_headers(&h).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("x-hypertool-chatmode"));
    }
}
