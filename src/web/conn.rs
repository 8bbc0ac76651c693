//! What one connection of the API listener is doing, as far as shedding it is concerned.
//!
//! At `server.max_connections` the listener must make room for a new client. A connection that is
//! between requests, still sending a request's head, or still sending its body has had nothing of
//! its request acted on: closing it loses nothing, and it is exactly what a client that stalls
//! (slowloris: a `Content-Length: 100000` and one byte) looks like. A connection whose request has
//! reached its handler is answered first. The listener gives each request a [`ConnState`]; the
//! door marks it [`handling`] once the request is whole and decided; the end of the answer's body
//! marks it waiting again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::Extensions;

/// Shared by a connection's task and its requests.
#[derive(Clone, Default)]
pub struct ConnState(Arc<AtomicBool>);

impl ConnState {
    /// True while a request of this connection is being handled or answered.
    pub fn is_handling(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, handling: bool) {
        self.0.store(handling, Ordering::Release);
    }

    /// The answer has been written (or dropped): nothing of this connection is in progress.
    pub fn answered(&self) {
        self.set(false);
    }
}

/// Marks the request's connection busy: its request is whole and the door let it through.
pub fn handling(extensions: &Extensions) {
    if let Some(state) = extensions.get::<ConnState>() {
        state.set(true);
    }
}

/// An answer's body that keeps `guard` until it has been written or dropped: what the guard's
/// `Drop` does happens once the answer is done (its connection marked waiting, a large request
/// body's share of the budget given back).
pub struct GuardedBody<G> {
    inner: axum::body::Body,
    _guard: G,
}

impl<G> GuardedBody<G> {
    pub fn new(inner: axum::body::Body, guard: G) -> Self {
        GuardedBody {
            inner,
            _guard: guard,
        }
    }
}

/// Marks its connection waiting again when dropped (with the answer's body).
pub struct Answered(pub ConnState);

impl Drop for Answered {
    fn drop(&mut self) {
        self.0.answered();
    }
}

/// An answer's body that marks its connection waiting again once it has been written or dropped.
pub type TrackedBody = GuardedBody<Answered>;

impl<G: Unpin> http_body::Body for GuardedBody<G> {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
