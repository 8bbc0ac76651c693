//! The metrics listener: `/metrics` rendered from the engine and the process's registry
//! (`telemetry::registry`), behind the metrics bearer token when one is configured.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::{admin, not_found, AppState};
use crate::store::writer::lock;
use crate::telemetry::exposition::{self, Format};

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

/// Renders `/metrics` for `state` at the current time: the registry's families are read first,
/// so that only the engine's lock is held while the engine's are rendered.
pub fn render_metrics(state: &AppState, format: Format) -> String {
    let process = state.registry.snapshot();
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
