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

/// How much of an oversized body is still read (and thrown away) before the 413 goes out, and for
/// how long: a client that is still sending when the connection closes sees a reset instead of
/// the answer. Past either bound the connection closes anyway.
const DRAIN_BYTES: usize = 16 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Why a body was not read whole.
enum Unread {
    TooLarge,
    Broken,
}

/// Reads the body into one buffer, at most `max` bytes (a body of one frame, the usual case, is
/// handed on without a copy).
async fn collect(body: &mut Body, max: usize) -> Result<axum::body::Bytes, Unread> {
    use http_body_util::BodyExt;
    let mut first: Option<axum::body::Bytes> = None;
    let mut more: Option<bytes::BytesMut> = None;
    let mut len = 0usize;
    loop {
        match body.frame().await {
            None => {
                return Ok(match more {
                    Some(buf) => buf.freeze(),
                    None => first.unwrap_or_default(),
                })
            }
            Some(Err(_)) => return Err(Unread::Broken),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                len += data.len();
                if len > max {
                    return Err(Unread::TooLarge);
                }
                match (&mut first, &mut more) {
                    (None, _) => first = Some(data),
                    (Some(f), None) => {
                        let mut buf = bytes::BytesMut::with_capacity(len);
                        buf.extend_from_slice(f);
                        buf.extend_from_slice(&data);
                        more = Some(buf);
                    }
                    (Some(_), Some(buf)) => buf.extend_from_slice(&data),
                }
            }
        }
    }
}

/// Reads on without keeping (up to [`DRAIN_BYTES`] and [`DRAIN_TIME`]) so that a client still
/// sending an oversized body gets to read the 413.
async fn drain(body: &mut Body) {
    use http_body_util::BodyExt;
    let drain = async {
        let mut drained = 0usize;
        while drained < DRAIN_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => drained += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

/// Reads the whole body within `timeout` (408 otherwise) and `max_bytes` (413 otherwise), and
/// hands the request on with the bytes as its body; a refusal is the answer to send.
pub async fn read(limits: &BodyLimits, req: Request) -> Result<Request, Response> {
    let (parts, mut body) = req.into_parts();
    let refused = |reason| (limits.on_refused)(parts.uri.path(), reason);
    match tokio::time::timeout(limits.timeout, collect(&mut body, limits.max_bytes)).await {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
        Ok(Err(Unread::TooLarge)) => {
            drain(&mut body).await;
            refused("body_too_large");
            Err(closing(
                ApiError::too_large(limits.max_bytes).into_response(),
            ))
        }
        Ok(Err(Unread::Broken)) => {
            refused("invalid_body");
            Err(closing(
                ApiError::bad_request("invalid_body", "the request body could not be read")
                    .into_response(),
            ))
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
