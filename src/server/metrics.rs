//! The metrics listener: `/metrics` rendered from the engine and the process's own counters (the
//! exposition's `ProcessInfo`), behind the metrics bearer token when one is configured.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::{admin, lock_alerts, not_found, AppState};
use crate::store::writer::lock;
use crate::telemetry::exposition::{self, Format, ProcessInfo};

/// The metrics listener's routes: `/metrics` and `/healthz`, behind the metrics gate.
pub(super) fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(admin::healthz))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.metrics_gate.clone(),
            crate::web::auth::metrics_layer,
        ))
        .with_state(state)
}

/// Renders `/metrics` for `state` at the current time.
pub fn render_metrics(state: &AppState, format: Format) -> String {
    let alerts_firing = lock_alerts(&state.alerts)
        .firing_counts()
        .into_iter()
        .collect();
    let alert_transitions = state
        .stats
        .alert_transitions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|((a, to), n)| ((a.to_string(), to.to_string()), *n as f64))
        .collect();
    let process = ProcessInfo {
        ledger_writable: !state.writer.health.failing(),
        ledger_write_failures: state.writer.health.failures.load(Ordering::Relaxed) as f64,
        ledger_held_events: state.writer.health.held() as f64,
        snapshot_age_seconds: state
            .writer
            .health
            .snapshot_age_seconds(state.clock.now_ms()),
        trace_destinations: state
            .tracer
            .stats()
            .into_iter()
            .map(|(name, st)| exposition::TraceDestinationInfo {
                name,
                results: st.results(),
                spool_bytes: st.spool_bytes.load(Ordering::Relaxed),
                last_success_ms: st.last_success_ms.load(Ordering::Relaxed),
                queue_dropped: st.queue_dropped.load(Ordering::Relaxed),
                traces_accepted: st.traces_accepted.load(Ordering::Relaxed),
                item_errors: (
                    st.item_errors_transient.load(Ordering::Relaxed),
                    st.item_errors_permanent.load(Ordering::Relaxed),
                ),
            })
            .collect(),
        gateway_requests: state.gateway.outcomes(),
        tools_removed: state.gateway.tools_removed(),
        unpriced_calls: state.gateway.unpriced(),
        mcp_sessions: state.mcp.proxy.sessions() as f64,
        mcp_servers: state
            .mcp
            .proxy
            .downstreams
            .health()
            .into_iter()
            .map(|h| (h.name, h.status == "ready", h.restarts as f64))
            .collect(),
        truncations: state.gateway.truncations(),
        cache_requests: state.gateway.cache.stats().0,
        cache_tokens_saved: state.gateway.cache.stats().1,
        cache_shared: state
            .gateway
            .cache
            .shared
            .as_ref()
            .map(|s| s.stats.results())
            .unwrap_or_default(),
        alert_deliveries: state.delivery_stats.snapshot(),
        alerts_firing,
        alert_transitions,
        version: env!("CARGO_PKG_VERSION"),
        start_time_ms: state.started_ms,
        config_reload_success: state.stats.reload_success.load(Ordering::Relaxed) as f64,
        config_reload_failure: state.stats.reload_failure.load(Ordering::Relaxed) as f64,
        config_last_reload_ok: state.stats.last_reload_ok.load(Ordering::Relaxed),
        auth_failures: state.door.failures(),
        langfuse_enabled: lock_alerts(&state.alerts).langfuse().expected(),
        rate_limited: state.gateway.limits.refused(),
        events_rejected: {
            let mut rejected = state
                .stats
                .rejected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let lost = state.gateway.ledger_failures();
            if lost > 0 {
                *rejected.entry("ledger_unavailable").or_insert(0) += lost;
            }
            rejected
                .into_iter()
                .map(|(k, v)| (k.to_string(), v as f64))
                .collect()
        },
    };
    let now = state.clock.now_ms();
    let mut engine = lock(&state.engine);
    engine.tick(now);
    exposition::render(&engine, &process, format)
}

async fn metrics_handler(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let body = render_metrics(&state, format);
    ([(header::CONTENT_TYPE, format.content_type())], body)
}
