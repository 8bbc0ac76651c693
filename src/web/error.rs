//! One error type for every route, rendered in OpenAI's error shape:
//! `{"error": {"message", "type", "param", "code"}}`. Messages never carry secrets or payloads.
//!
//! What went wrong is an [`ErrorKind`], mapped once — here — to the HTTP status, OpenAI's error
//! `type` and the level it is logged at. Rendering has no side effects: the response carries the
//! kind and code in its extensions, and the layer in front of the API logs them ([`log`]).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// What went wrong, from the client's side of the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request is malformed or names something it may not.
    InvalidRequest,
    /// 401: no key, or a key hypertool does not know.
    Unauthorized,
    /// 403: a known key outside its role, or a persona acting for another.
    Forbidden,
    /// 404: no such route, model, persona, workflow, stage or run.
    NotFound,
    /// 405: the route does not take that method.
    MethodNotAllowed,
    /// 408: the body did not arrive in time.
    RequestTimeout,
    /// 409: the request conflicts with the state (a finished run, another workflow's run).
    Conflict,
    /// 413: the body is over `server.max_body_bytes`.
    PayloadTooLarge,
    /// 429: a rate limit.
    RateLimited,
    /// 429: a `block` budget (the persona's, or the run stage's).
    BudgetExceeded,
    /// The upstream failed; its status (502, 504, or the upstream's own 4xx) is passed on.
    Upstream(StatusCode),
    /// 503: hypertool cannot serve this now (overloaded, ledger unavailable, draining).
    Unavailable,
    /// 500: a bug: a route reached without an access decision.
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RateLimited | ErrorKind::BudgetExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Upstream(status) => status,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error `type`.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::Upstream(_) => "upstream_error",
            ErrorKind::Unavailable | ErrorKind::Internal => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// How loudly an answer of this kind is logged. Only a bug is an error. Everything else is
    /// debug: a refusal is counted where it is decided (`hypertool_auth_failures_total`,
    /// `hypertool_gateway_requests_total`, …), and what needs an operator's attention (an upstream
    /// outage, load shedding) is logged there, throttled, so that a flood of refused requests
    /// cannot become a flood of log lines.
    pub fn log_level(self) -> tracing::Level {
        match self {
            ErrorKind::Internal => tracing::Level::ERROR,
            _ => tracing::Level::DEBUG,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// Sent as `Retry-After` (seconds) with a 429 or 503.
    pub retry_after_secs: Option<u64>,
    /// Sent as `Allow` with a 405: the methods the route takes.
    pub allow: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
            param: None,
            retry_after_secs: None,
            allow: None,
        }
    }

    /// The methods the route takes, for a 405's `Allow`.
    pub fn allow(mut self, methods: impl Into<String>) -> Self {
        self.allow = Some(methods.into());
        self
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, code, message)
    }

    /// `unknown_persona`, listing the personas there are: 404 when the persona names the resource
    /// (`/api/budgets/{persona}`), 400 when it is a field of the body (`param`).
    pub fn unknown_persona(
        engine: &crate::core::engine::Engine,
        name: &str,
        kind: ErrorKind,
        param: &str,
    ) -> Self {
        let known: Vec<&str> = engine.personas().iter().map(|p| p.name.as_str()).collect();
        let message = format!(
            "unknown persona `{name}`; known personas: {}",
            known.join(", ")
        );
        Self::new(kind, "unknown_persona", message).param(param)
    }

    /// A bug of hypertool's (a panic) met while handling the request: 500 `internal_error`, with
    /// nothing of the panic in it (the log has that).
    pub fn internal_error() -> Self {
        Self::new(
            ErrorKind::Internal,
            "internal_error",
            "hypertool met an internal error while handling this request (a bug, logged on the \
             server); the request may be retried",
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, "unavailable", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            ErrorKind::PayloadTooLarge,
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
        // A message may quote what the client sent (serde names the value it could not take): the
        // answer stays small whatever the request was.
        let body = json!({
            "error": {
                "message": bounded(&self.message, MAX_MESSAGE_BYTES),
                "type": self.kind.openai_type(),
                "param": self.param.as_deref().map(|p| bounded(p, MAX_PARAM_BYTES)),
                "code": self.code,
            }
        });
        let mut resp = (self.kind.status(), Json(body)).into_response();
        resp.extensions_mut().insert(Logged {
            kind: self.kind,
            code: self.code,
        });
        resp.extensions_mut().insert(Message(
            bounded(&self.message, MAX_MESSAGE_BYTES).into_owned(),
        ));
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        if let Some(allow) = self
            .allow
            .as_deref()
            .and_then(|a| axum::http::HeaderValue::from_str(a).ok())
        {
            resp.headers_mut().insert(axum::http::header::ALLOW, allow);
        }
        if self.kind == ErrorKind::Unauthorized {
            // A browser (the dashboard, the runbook page) asks for the key: any user name, the
            // key as the password. API clients send `Authorization: Bearer`.
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(
                    "Basic realm=\"hypertool\", charset=\"UTF-8\"",
                ),
            );
        }
        resp
    }
}

/// The longest error message sent (a message naming a value the client sent is cut here).
pub const MAX_MESSAGE_BYTES: usize = 1024;
const MAX_PARAM_BYTES: usize = 256;

/// `text` cut to at most `max` bytes at a character boundary, with `…` where it was cut: for any
/// text from a client quoted back in an answer or a log line.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &text[..end]))
}

/// The error code of a request whose events may or may not have been stored (a commit in doubt).
pub const OUTCOME_UNKNOWN: &str = "ledger_outcome_unknown";

impl From<crate::store::LedgerError> for ApiError {
    fn from(e: crate::store::LedgerError) -> Self {
        tracing::error!("{e}");
        if e.in_doubt.is_some() {
            return ApiError::new(
                ErrorKind::Unavailable,
                OUTCOME_UNKNOWN,
                format!("{e}: the connection to the ledger dropped while this request's events were being committed, so they may have been stored; hypertool learns which when the ledger is back and counts them if they were (see its log), so resending them may count them twice"),
            );
        }
        ApiError::unavailable(format!(
            "{e}; nothing from this request was stored, retry it"
        ))
    }
}

/// What the layer in front of the API logs about an error answer (the message is not logged: it
/// may quote the request).
#[derive(Debug, Clone, Copy)]
pub struct Logged {
    pub kind: ErrorKind,
    pub code: &'static str,
}

/// An error answer's message, kept so that a route of another dialect can say it in its shape.
#[derive(Debug, Clone)]
struct Message(String);

impl ErrorKind {
    /// Anthropic's error `type` for an answer of this kind.
    pub fn anthropic_type(self) -> &'static str {
        match self {
            ErrorKind::Unauthorized => "authentication_error",
            ErrorKind::Forbidden => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::PayloadTooLarge => "request_too_large",
            ErrorKind::RateLimited | ErrorKind::BudgetExceeded => "rate_limit_error",
            ErrorKind::Unavailable => "overloaded_error",
            ErrorKind::Internal => "api_error",
            ErrorKind::Upstream(status) => match status.as_u16() {
                400 | 422 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            },
            _ => "invalid_request_error",
        }
    }
}

/// An error answer said again in Anthropic's shape (`{"type": "error", "error": {"type",
/// "message"}}`, hypertool's reason as `error.code`), same status and headers: what clients of
/// the Messages routes read. Any other answer is returned as it is.
pub fn in_anthropic_shape(resp: Response) -> Response {
    let (Some(logged), Some(Message(message))) = (
        resp.extensions().get::<Logged>().copied(),
        resp.extensions().get::<Message>().cloned(),
    ) else {
        return resp;
    };
    let (mut parts, _) = resp.into_parts();
    let body = json!({
        "type": "error",
        "error": {"type": logged.kind.anthropic_type(), "message": message, "code": logged.code},
    });
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

/// Logs an error answer at its kind's level, once, outside the handler.
pub fn log(method: &axum::http::Method, path: &str, resp: &Response) {
    let Some(e) = resp.extensions().get::<Logged>() else {
        return;
    };
    let status = e.kind.status().as_u16();
    match e.kind.log_level() {
        tracing::Level::ERROR => {
            tracing::error!(%method, path, status, code = e.code, "request failed")
        }
        tracing::Level::WARN => {
            tracing::warn!(%method, path, status, code = e.code, "request failed")
        }
        tracing::Level::INFO => {
            tracing::info!(%method, path, status, code = e.code, "request refused")
        }
        _ => tracing::debug!(%method, path, status, code = e.code, "request refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_text_is_bounded_at_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        let long = "é".repeat(1000);
        let cut = bounded(&long, 101);
        assert!(cut.len() <= 101 && cut.ends_with('…'), "{cut}");
        let e = ApiError::bad_request("x", "y".repeat(3 << 20)).into_response();
        let size = axum::body::HttpBody::size_hint(e.body()).exact().unwrap();
        assert!(size < 2 * MAX_MESSAGE_BYTES as u64, "{size}");
    }

    #[test]
    fn a_ledger_failure_says_whether_the_request_may_have_been_stored() {
        let refused = ApiError::from(crate::store::LedgerError::new("commit", "disk full"));
        assert_eq!(
            (refused.kind.status().as_u16(), refused.code),
            (503, "unavailable")
        );
        assert!(refused
            .message
            .contains("nothing from this request was stored"));
        let unknown = ApiError::from(
            crate::store::LedgerError::new("append", "connection closed").in_doubt(Some((7, 9))),
        );
        assert_eq!(
            (unknown.kind.status().as_u16(), unknown.code),
            (503, OUTCOME_UNKNOWN)
        );
        assert!(unknown.message.contains("may have been stored"));
    }

    #[test]
    fn each_kind_maps_once_to_status_type_and_level() {
        let mut e = ApiError::new(ErrorKind::RateLimited, "rate_limited", "slow down");
        e.retry_after_secs = Some(20);
        let resp = e.into_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "20");
        let logged = resp.extensions().get::<Logged>().unwrap();
        assert_eq!(logged.kind.openai_type(), "rate_limit_error");
        assert_eq!(logged.kind.log_level(), tracing::Level::DEBUG);
        let upstream = ErrorKind::Upstream(StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(upstream.status(), 504);
        assert_eq!(ErrorKind::Internal.log_level(), tracing::Level::ERROR);
        assert_eq!(ErrorKind::BudgetExceeded.status(), 429);
        assert_eq!(ErrorKind::BudgetExceeded.openai_type(), "budget_exceeded");
        assert_eq!(ErrorKind::InvalidRequest.log_level(), tracing::Level::DEBUG);
    }
}
