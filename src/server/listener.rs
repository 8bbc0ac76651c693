//! The API listener: hyper's HTTP/1.1 connections, at most `server.max_connections` open at once.
//!
//! Every open connection costs memory (hyper keeps its read and write buffers, ~50 KB once a call
//! has passed through it, plus the socket and the task). Without a cap, a client that opens
//! connections faster than answers come back — a load generator, or agents retrying against a slow
//! upstream — grows hypertool without bound (measured: ~9,000 connections, 400 MB).
//!
//! At the cap, hypertool does what nginx does at `worker_connections`: for a client that has just
//! connected, it asks the oldest open connections to close (hyper's graceful shutdown: an idle
//! keep-alive connection closes at once, a busy one after its answer), one every few milliseconds
//! until a slot frees; clients behind that one wait in the kernel's accept queue. A plain cap would let idle keep-alive connections hold every
//! slot and starve new clients for good. Idle connections also close by themselves after
//! 30 seconds without a request (hyper's header-read timeout, which also stops slow-header clients).
//!
//! Asking is not enough for a connection that never finishes its request: a client that sends a
//! head with `Content-Length: 100000` and then one byte would hold its slot until the body timeout
//! (30 s), and a few addresses holding every slot that way locked everyone else out for that long.
//! So a connection asked to close whose request has not reached a handler (between requests, in
//! its head, or in its body: `web::conn`) is closed at once — nothing of it was acted on — and
//! only a connection whose request is being handled is let finish its answer.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

/// How often, at the cap, one more of the oldest connections is asked to close.
const RECLAIM_EVERY: Duration = Duration::from_millis(10);

/// Open connections by age (ids increase), each with the signal that asks it to close.
#[derive(Default)]
struct OpenConnections {
    next_id: u64,
    by_age: BTreeMap<u64, Arc<Notify>>,
}

struct Limits {
    slots: Arc<Semaphore>,
    open: Mutex<OpenConnections>,
    cap: usize,
    /// Seconds since the epoch of the last "cap reached" warning (one a minute at most).
    warned_at: AtomicI64,
}

impl Limits {
    fn open(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection just accepted; at the cap, the oldest connections are asked to
    /// close until one is free.
    async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        self.warn_at_cap();
        loop {
            let oldest = self.open().by_age.pop_first();
            if let Some((_, close)) = oldest {
                close.notify_one();
            }
            tokio::select! {
                // Only a closed semaphore fails here, and this one is never closed.
                slot = self.slots.clone().acquire_owned() => return slot.ok(),
                _ = tokio::time::sleep(RECLAIM_EVERY) => {}
            }
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
                "the API holds server.max_connections connections; closing the oldest to admit new clients"
            );
        }
    }
}

/// How the listener treats connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at once (`server.max_connections`).
    pub max_connections: usize,
    /// Open connections of one client address (`server.max_connections_per_client`).
    pub per_client: usize,
    /// Time to send a request head, and the longest idle time between requests.
    pub header_timeout: Duration,
}

/// Open connections per client address. A client at its cap gets a 503 and its new connection
/// closed at accept, before it takes a slot: one address cannot hold every slot, so a stalled or
/// slow sender (or a client that leaks connections) cannot lock everyone else out.
#[derive(Default)]
struct PerClient {
    open: std::collections::HashMap<IpAddr, usize>,
}

/// The answer a client over its connection cap gets before its connection is closed.
fn over_client_cap() -> Vec<u8> {
    let body = r#"{"error":{"message":"too many open connections from this address (server.max_connections_per_client); reuse connections","type":"server_error","code":"overloaded"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `shutdown` turns true; then stops accepting, lets every
/// connection finish its request in progress, and returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let cap = limits.max_connections.max(1);
    let per_client_cap = limits.per_client.max(1);
    let header_timeout = limits.header_timeout;
    let per_client = Arc::new(Mutex::new(PerClient::default()));
    let limits = Arc::new(Limits {
        slots: Arc::new(Semaphore::new(cap)),
        open: Mutex::new(OpenConnections::default()),
        cap,
        warned_at: AtomicI64::new(0),
    });
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let client = peer.ip();
        let admitted = {
            let mut pc = per_client.lock().unwrap_or_else(|p| p.into_inner());
            let n = pc.open.entry(client).or_insert(0);
            // A per-client cap as large as the global one is no cap: the global reclaim rules.
            if *n >= per_client_cap && per_client_cap < cap {
                false
            } else {
                *n += 1;
                true
            }
        };
        if !admitted {
            // Best effort, never waiting: a client that does not read its 503 just sees the close.
            let _ = stream.try_write(&over_client_cap());
            drop(stream);
            continue;
        }
        let client_slot = ClientSlot {
            per_client: per_client.clone(),
            client,
        };
        // Only a client that is here (accepted, not yet served) makes room: reclaiming for one
        // that may never come would close connections for nothing.
        let slot = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            slot = limits.slot() => slot,
        };
        // Answers are small and written whole: send them without waiting for more.
        let _ = stream.set_nodelay(true);
        let close = Arc::new(Notify::new());
        let id = {
            let mut open = limits.open();
            let id = open.next_id;
            open.next_id += 1;
            open.by_age.insert(id, close.clone());
            id
        };
        let conn_state = crate::web::conn::ConnState::default();
        let service = tracked(app.clone(), conn_state.clone());
        let (limits, mut stop) = (limits.clone(), shutdown.clone());
        connections.spawn(async move {
            let _client_slot = client_slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = close.notified() => {
                    // Polled by this task only: while it is here, no request of it can move on.
                    if conn_state.is_handling() {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.as_mut().await;
                    }
                }
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                }
            }
            limits.open().by_age.remove(&id);
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

/// The router as one connection's service: each request carries the connection's state (marked
/// handling by the door), and the end of each answer's body marks it waiting again.
fn tracked(
    app: Router,
    state: crate::web::conn::ConnState,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<crate::web::conn::TrackedBody>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<hyper::Response<crate::web::conn::TrackedBody>, std::convert::Infallible>,
    > + Send,
> + Clone {
    use tower_service::Service;
    hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        state.answered();
        req.extensions_mut().insert(state.clone());
        let (mut router, state) = (app.clone(), state.clone());
        async move {
            let resp = match router.call(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            Ok(resp.map(|body| {
                crate::web::conn::TrackedBody::new(body, crate::web::conn::Answered(state))
            }))
        }
    })
}

/// A connection counted against its client address until it closes.
struct ClientSlot {
    per_client: Arc<Mutex<PerClient>>,
    client: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut pc = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pc.open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                pc.open.remove(&self.client);
            }
        }
    }
}

/// Resolves once `shutdown` is true (the guard `wait_for` returns is dropped here: it is not `Send`).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Errors of `accept` concern one connection (reset before it was accepted) or the process (out of
/// file descriptors): the first are skipped, the second logged and waited out.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accepting a connection failed: {e}; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
