//! One error type for every route, rendered in OpenAI's error shape:
//! `{"error": {"message", "type", "param", "code"}}`. Messages never carry secrets or payloads.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// Sent as `Retry-After` (seconds) with a 429 or 503.
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            retry_after_secs: None,
        }
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            code,
            message,
        )
    }

    /// `unknown_persona`, listing the personas there are: 404 when the persona names the resource
    /// (`/api/budgets/{persona}`), 400 when it is a field of the body (`param`).
    pub fn unknown_persona(
        engine: &crate::core::engine::Engine,
        name: &str,
        status: StatusCode,
        param: &str,
    ) -> Self {
        let known: Vec<&str> = engine.personas().iter().map(|p| p.name.as_str()).collect();
        let message = format!(
            "unknown persona `{name}`; known personas: {}",
            known.join(", ")
        );
        Self::new(status, "invalid_request_error", "unknown_persona", message).param(param)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            message,
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!(
                "request body exceeds the limit of {limit} bytes; send smaller batches or raise \
                 `server.max_body_bytes`"
            ),
        )
    }
}

impl ApiError {
    /// A client-supplied name checked by the rules every source shares (a 400 naming `param`).
    pub fn name(
        field: crate::core::labels::NameField,
        param: &str,
        value: &str,
    ) -> Result<String, Self> {
        crate::core::labels::check_name(field, value)
            .map(str::to_string)
            .map_err(|e| {
                ApiError::bad_request("invalid_name", format!("`{param}` {}", e.reason))
                    .param(param)
            })
    }

    /// A body axum could not read: over the size limit (413), or otherwise unreadable (400).
    pub fn from_body_rejection(
        rejection: axum::extract::rejection::BytesRejection,
        limit: usize,
    ) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request("invalid_body", rejection.body_text())
        }
    }

    /// The request body as a JSON object, or a 400 naming what is wrong.
    pub fn json_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, Self> {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(_) => Err(ApiError::bad_request(
                "invalid_body",
                "the request body must be a JSON object",
            )),
            Err(e) => Err(ApiError::bad_request(
                "malformed_json",
                format!("request body is not valid JSON: {e}"),
            )),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

impl From<crate::store::LedgerError> for ApiError {
    fn from(e: crate::store::LedgerError) -> Self {
        tracing::error!("{e}");
        ApiError::unavailable(format!(
            "{e}; nothing from this request was stored, retry it"
        ))
    }
}
