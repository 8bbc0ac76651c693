//! The API listener, with a cap on the connections it holds open.
//!
//! Every open connection costs memory (hyper's buffers, the socket, the task). A client that opens
//! connections faster than answers come back — a load generator, or agents retrying against a slow
//! upstream — would otherwise grow hypertool without bound (measured: ~9,000 connections and
//! 400 MB). At the cap, hypertool stops accepting until a connection closes; new clients wait in the
//! kernel's accept queue, and calls already accepted are shed by the gateway's in-flight bound.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A TCP listener that holds at most `cap` connections open.
pub struct CappedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    cap: usize,
    /// Seconds since the epoch of the last "cap reached" warning (one a minute at most).
    warned_at: AtomicI64,
}

impl CappedListener {
    pub fn new(inner: TcpListener, cap: usize) -> Self {
        let cap = cap.max(1);
        CappedListener {
            inner,
            slots: Arc::new(Semaphore::new(cap)),
            cap,
            warned_at: AtomicI64::new(0),
        }
    }

    fn warn_at_cap(&self) {
        let now = chrono::Utc::now().timestamp();
        let last = self.warned_at.load(Ordering::Relaxed);
        if now - last >= 60
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                max_connections = self.cap,
                "the API holds server.max_connections connections; new clients wait until one closes"
            );
        }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedStream, SocketAddr) {
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                self.warn_at_cap();
                // Only a closed semaphore fails here, and this one is never closed.
                self.slots.clone().acquire_owned().await.ok()
            }
        };
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (
            CappedStream {
                stream,
                _slot: slot,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection; its slot is given back when it closes.
pub struct CappedStream {
    stream: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
}

impl AsyncRead for CappedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
