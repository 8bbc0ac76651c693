//! Serving until shutdown, then draining in order within one grace period: stop accepting and
//! finish open connections, end MCP sessions and stop the downstream servers, let gateway calls
//! still being accounted finish, flush and close the ledger, hand the last spans to the spool.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{listener, AppState};

/// What the serving task owns.
pub(super) struct Serving {
    pub state: AppState,
    pub api_listener: TcpListener,
    pub api: Router,
    pub connection_limits: listener::ConnectionLimits,
    pub metrics_listener: TcpListener,
    pub metrics: Router,
    pub shutdown: watch::Receiver<bool>,
    pub grace: Duration,
    /// The ticker, tail, alert evaluation and reloader (aborted once connections are done).
    pub background: Vec<tokio::task::JoinHandle<()>>,
    pub writer_thread: std::thread::JoinHandle<()>,
    /// The data directory's lock, held until the ledger is flushed and closed.
    pub data_lock: std::fs::File,
}

pub(super) async fn serve_until_drained(serving: Serving) {
    let Serving {
        state,
        api_listener,
        api,
        connection_limits,
        metrics_listener,
        metrics,
        shutdown: shutdown_rx,
        grace,
        background,
        writer_thread,
        data_lock,
    } = serving;
    // Held until the ledger is flushed and closed, at the end of this task.
    let _data_lock = data_lock;
    let api_server = listener::serve(api_listener, api, connection_limits, shutdown_rx.clone());
    let metrics_server = axum::serve(metrics_listener, metrics)
        .with_graceful_shutdown(wait_for(shutdown_rx.clone()));
    let mut rx = shutdown_rx.clone();
    let servers = async {
        let ((), m) = tokio::join!(api_server, metrics_server);
        if let Err(e) = m {
            tracing::error!("metrics server stopped: {e}");
        }
    };
    tokio::pin!(servers);
    // One deadline for the whole drain: connections, then the calls still running, then traces.
    let mut deadline = None;
    tokio::select! {
        _ = &mut servers => {}
        _ = wait_for_changed(&mut rx) => {
            state.draining.store(true, Ordering::SeqCst);
            let at = tokio::time::Instant::now() + grace;
            deadline = Some(at);
            if tokio::time::timeout_at(at, &mut servers).await.is_err() {
                tracing::warn!(grace_seconds = grace.as_secs(),
                    "connections still open at the end of the grace period were closed; a call still running on one was not answered (it is accounted all the same)");
            }
        }
    }
    let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + grace);
    state.draining.store(true, Ordering::SeqCst);
    for task in background {
        task.abort();
    }
    // MCP sessions end (their event streams would hold the drain open) and the downstream
    // servers are stopped; their last tool calls are already queued to the writer.
    state.mcp.http_cancel.cancel();
    state.mcp.proxy.downstreams.shutdown().await;
    // Gateway calls still being accounted (a client that left, a stream being relayed) finish
    // first, within the grace period; then the writer flushes what is queued.
    state.tasks.close();
    if tokio::time::timeout_at(deadline, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = state.tasks.len(),
            "gateway calls still running at the end of the grace period were cut off; each is counted at its admission estimate at the next start"
        );
    }
    // Everything acknowledged is already committed; this flushes what was queued behind it.
    state.writer.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    // The spans of the last calls go to the spool; what a destination does not take within a
    // few seconds is sent at the next start.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    state
        .tracer
        .shutdown(left.min(Duration::from_secs(5)))
        .await;
    tracing::info!("ledger flushed; stopped");
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    wait_for_changed(&mut rx).await;
}

async fn wait_for_changed(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            // The sender is gone: nobody can ask for shutdown any more, so never resolve.
            std::future::pending::<()>().await;
        }
    }
}
