//! Request bodies read under a deadline and a size limit, before any handler sees them.
//!
//! A client that announces `Content-Length: 100000` and then sends a few bytes would otherwise hold
//! its connection (and a handler's task) for as long as it likes; a thousand such clients lock
//! everyone else out. Every handler of the API takes its body whole, so reading it here first
//! costs nothing extra: the bytes are handed on as they are.
//!
//! Bodies over [`SMALL_BODY`] also draw on one budget across all connections
//! ([`InflightBodies`], `server.max_inflight_body_bytes`), held until the answer's body is sent:
//! a thousand clients each sending 4 MB cannot take 4 GB (and twice that parsed). Past it a new
//! large body is answered 503 with `Retry-After` before it is read; small calls never wait.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{ApiError, ErrorKind};

/// Bodies up to this size are read without drawing on [`InflightBodies`]: they are bounded by
/// the connection caps alone (64 KiB × `server.max_connections`).
pub const SMALL_BODY: usize = 64 * 1024;

/// The bytes of large request bodies held at once (`server.max_inflight_body_bytes`).
#[derive(Clone)]
pub struct InflightBodies {
    room: Arc<Semaphore>,
    limit: usize,
}

impl InflightBodies {
    pub fn new(limit: usize) -> Self {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        InflightBodies {
            room: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.limit - self.room.available_permits()
    }

    /// Grows `held` to cover `len` bytes; false when the budget has no room.
    fn cover(&self, held: &mut Option<OwnedSemaphorePermit>, len: usize) -> bool {
        let have = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        if len <= have {
            return true;
        }
        let Ok(more) = u32::try_from(len - have) else {
            return false;
        };
        match self.room.clone().try_acquire_many_owned(more) {
            Ok(permit) => {
                match held {
                    Some(h) => h.merge(permit),
                    None => *held = Some(permit),
                }
                true
            }
            Err(_) => false,
        }
    }
}

/// A request's share of [`InflightBodies`], in its extensions from the read on: the layer moves
/// it onto the answer's body, which gives it back once sent or dropped.
#[derive(Clone)]
pub struct HeldBody(pub Arc<OwnedSemaphorePermit>);

/// Told of each body refused, with the request's path and the reason (`body_too_large`,
/// `body_timeout`, `invalid_body`), so the server can count it where it belongs.
pub type OnRefused = std::sync::Arc<dyn Fn(&str, &'static str) + Send + Sync>;

/// `server.max_body_bytes`, `server.max_inflight_body_bytes` and `server.body_timeout`.
#[derive(Clone)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub inflight: InflightBodies,
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
    /// [`InflightBodies`] had no room for it.
    Busy,
}

/// Reads the body into one buffer, at most `max` bytes (a body of one frame, the usual case, is
/// handed on without a copy), its bytes past [`SMALL_BODY`] covered by `held` from `inflight`.
async fn collect(
    body: &mut Body,
    max: usize,
    inflight: &InflightBodies,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Result<axum::body::Bytes, Unread> {
    use http_body::Body as _;
    use http_body_util::BodyExt;
    // An announced length is covered before a byte is read: a refusal costs no reading.
    let announced = usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX);
    if announced > max {
        return Err(Unread::TooLarge);
    }
    if announced > SMALL_BODY && !inflight.cover(held, announced) {
        return Err(Unread::Busy);
    }
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
                if len > SMALL_BODY && !inflight.cover(held, len) {
                    return Err(Unread::Busy);
                }
                match (&mut first, &mut more) {
                    (None, _) => first = Some(data),
                    (Some(f), None) => {
                        // Sized for the announced length at once: growing by doubling holds
                        // the old and the new buffer together, up to three times the body.
                        let mut buf = bytes::BytesMut::with_capacity(len.max(announced.min(max)));
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
    let (mut parts, mut body) = req.into_parts();
    let mut held = None;
    let collecting = collect(&mut body, limits.max_bytes, &limits.inflight, &mut held);
    let read = tokio::time::timeout(limits.timeout, collecting).await;
    let refused = |reason| (limits.on_refused)(parts.uri.path(), reason);
    match read {
        Ok(Ok(bytes)) => {
            if let Some(permit) = held {
                parts.extensions.insert(HeldBody(Arc::new(permit)));
            }
            Ok(Request::from_parts(parts, Body::from(bytes)))
        }
        Ok(Err(Unread::Busy)) => {
            drop(held);
            drain(&mut body).await;
            refused("server_busy");
            let mut e = ApiError::new(
                ErrorKind::Unavailable,
                "server_busy",
                format!(
                    "the server holds {} MiB of large request bodies already \
                     (server.max_inflight_body_bytes); retry this one in a moment",
                    limits.inflight.limit >> 20
                ),
            );
            e.retry_after_secs = Some(1);
            Err(closing(e.into_response()))
        }
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
