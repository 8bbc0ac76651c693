//! `hypertool serve`: the API listener, the metrics listener, and the tasks around the core.
//!
//! This file holds the server's shared state (`AppState`), its counters and the API router.
//! Start-up is `start` (configuration → listeners → ledger and engine → writer → state), serving
//! and the ordered drain at shutdown `drain`, the loops beside the requests `background`, and the
//! metrics listener `metrics`; the routes are grouped by what they serve (`events`, `admin`,
//! `workflows`, `experiments`, `insight`, `dashboard`, `audit`, `personas`, `mcp`).

pub mod admin;
pub mod audit;
mod background;
pub mod dashboard;
mod drain;
pub mod events;
pub mod experiments;
pub mod insight;
pub mod listener;
pub mod mcp;
pub mod mcp_stdio;
mod metrics;
pub mod personas;
pub mod routes;
mod start;
pub mod workflows;

pub use background::evaluate_alerts;
pub use metrics::render_metrics;
pub use start::start;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tokio::sync::watch;

use crate::alerts::delivery::{Deliverer, DeliveryStats};
use crate::alerts::{AlertEngine, AlertState};
use crate::config::{self, ConfigErrors, Source};
use crate::core::clock::{Clock, UnixMillis};
use crate::core::engine::Engine;
use crate::store::writer::{lock, WriterHandle};
use crate::store::LedgerError;
use crate::telemetry::families;
use crate::telemetry::registry::{Counter, Registry};
use crate::web::auth::{Door, MetricsGate};
use crate::web::error::{ApiError, ErrorKind};

/// Counters kept outside the engine: requests refused before they became events, reloads, alert
/// state changes.
pub struct ServerStats {
    /// `hypertool_events_rejected_total{reason}` (the gateway counts `ledger_unavailable` here too).
    pub rejected: Counter<1>,
    alert_transitions: Counter<2>,
    reloads: Counter<1>,
    last_reload_ok: Arc<AtomicBool>,
}

impl ServerStats {
    fn new() -> ServerStats {
        ServerStats {
            rejected: Counter::new(&families::EVENTS_REJECTED_TOTAL),
            alert_transitions: Counter::new(&families::ALERT_TRANSITIONS_TOTAL),
            reloads: Counter::with_series(
                &families::CONFIG_RELOADS_TOTAL,
                &[["success"], ["failure"]],
            ),
            last_reload_ok: Arc::new(AtomicBool::new(true)),
        }
    }

    fn register(&self, registry: &Registry) {
        registry.register(self.rejected.clone());
        registry.register(self.alert_transitions.clone());
        registry.register(self.reloads.clone());
        let ok = self.last_reload_ok.clone();
        registry.collect(&families::CONFIG_LAST_RELOAD_SUCCESSFUL, move |emit| {
            emit(&[], if ok.load(Ordering::Relaxed) { 1.0 } else { 0.0 })
        });
    }

    pub fn transition(&self, alertname: &'static str, to: AlertState) {
        let to = match to {
            AlertState::Inactive => "resolved",
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
        };
        self.alert_transitions.inc([alertname, to]);
    }

    pub fn reject(&self, reason: &'static str, n: u64) {
        self.rejected.add([reason], n);
    }

    /// A reload applied (`true`) or refused.
    pub fn reloaded(&self, ok: bool) {
        self.reloads.inc([if ok { "success" } else { "failure" }]);
        self.last_reload_ok.store(ok, Ordering::Relaxed);
    }
}

/// Shared by every route: one pointer, so the clone axum makes for every request (and the one each
/// gateway task keeps) is a single reference-count increment.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

impl std::ops::Deref for AppState {
    type Target = AppInner;

    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    /// Persona switches, decided and recorded as the API and the MCP proxy both do.
    pub fn switchboard(&self) -> crate::switchboard::Switchboard {
        crate::switchboard::Switchboard {
            engine: self.engine.clone(),
            writer: self.writer.clone(),
            serial: self.switch_lock.clone(),
            clock: self.clock.clone(),
        }
    }

    /// The same server state with the self-scrape pointed at `metrics_addr` (used to test a metrics
    /// listener that does not answer).
    pub fn scraping(&self, metrics_addr: SocketAddr) -> AppState {
        let mut inner = (*self.0).clone();
        inner.metrics_addr = metrics_addr;
        AppState(Arc::new(inner))
    }
}

/// The gateway's handlers take the gateway's own state (one pointer), not the server's.
impl axum::extract::FromRef<AppState> for crate::gateway::GatewayState {
    fn from_ref(state: &AppState) -> Self {
        state.gateway.clone()
    }
}

/// Handlers outside `server` (the gateway) reach the door for its one ownership rule.
impl axum::extract::FromRef<AppState> for Arc<Door> {
    fn from_ref(state: &AppState) -> Self {
        state.door.clone()
    }
}

/// The MCP proxy as `/mcp` serves it (streamable HTTP), and its downstream servers.
#[derive(Clone)]
pub struct McpEndpoint {
    pub proxy: Arc<crate::mcp::proxy::Proxy>,
    pub http: rmcp::transport::streamable_http_server::StreamableHttpService<
        crate::mcp::proxy::McpSession,
        rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
    >,
    /// Ends every MCP session (at shutdown).
    pub http_cancel: tokio_util::sync::CancellationToken,
    /// Which persona opened each HTTP session (the ownership rule for its stream and its end).
    pub owners: Arc<mcp::SessionOwners>,
}

/// What every route can reach.
#[derive(Clone)]
pub struct AppInner {
    /// The process's metric families (the engine holds the rest), rendered at `/metrics`.
    pub registry: Arc<Registry>,
    /// Where the configuration is read from (a promotion rewrites its workflow file).
    pub config_source: config::Source,
    /// The MCP proxy at `/mcp`.
    pub mcp: McpEndpoint,
    pub engine: Arc<Mutex<Engine>>,
    /// Spans to the OTLP collector and Langfuse (a no-op without a destination).
    pub tracer: crate::telemetry::trace::Tracer,
    pub alerts: Arc<Mutex<AlertEngine>>,
    /// The metrics listener's address: the embedded engine scrapes it for `up`.
    pub metrics_addr: SocketAddr,
    pub http: reqwest::Client,
    pub deliverer: Arc<Mutex<Deliverer>>,
    pub gateway: Arc<crate::gateway::Gateway>,
    /// Serializes `POST /v1/personas/switch` so two requests cannot both pass a cooldown.
    pub switch_lock: Arc<tokio::sync::Mutex<()>>,
    /// Work that must finish before the ledger closes (gateway calls' accounting, stream relays).
    pub tasks: tokio_util::task::TaskTracker,
    /// Where alert notifications point back to (`/api/alerts` on the API listener).
    pub generator_url: String,
    /// The address the API listener is bound to (the runbook links point here).
    pub api_addr: SocketAddr,
    /// Reads the ledger beside the writer (investigations, gate history, budget suggestions).
    pub reader: crate::store::reader::LedgerReader,
    /// `[langfuse]` as started with (its destinations change at a restart only).
    pub langfuse: crate::config::settings::LangfuseSettings,
    /// The gates and the variants in force, to record what a reload changes.
    pub gates: Arc<insight::Baseline>,
    pub variants: Arc<insight::Baseline>,
    pub delivery_stats: Arc<DeliveryStats>,
    pub writer: WriterHandle,
    pub clock: Arc<dyn Clock>,
    pub stats: Arc<ServerStats>,
    pub draining: Arc<AtomicBool>,
    pub started_ms: UnixMillis,
    pub max_body_bytes: usize,
    /// Large request bodies held at once (`server.max_inflight_body_bytes`; fixed at start-up).
    pub inflight_bodies: crate::web::body::InflightBodies,
    /// What one reported event may claim (`server.max_tokens_per_event`).
    pub event_limits: events::EventLimits,
    /// The access decision for every API request (keys, roles, refusals counted).
    pub door: Arc<Door>,
    /// The metrics listener's bearer-token check.
    pub metrics_gate: Arc<MetricsGate>,
    /// The token the embedded alert engine's own scrape sends (random per process).
    pub scrape_token: String,
}

/// What `hypertool serve` was asked for; `None` falls back to the configuration file.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: Source,
    pub data_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// The MCP proxy's downstream servers (`.mcp.json`); `None`: `[mcp] servers`.
    pub mcp_servers: Option<PathBuf>,
}

/// Why the server could not start. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration ({source_name}):\n{errors}")]
    Config {
        source_name: String,
        errors: ConfigErrors,
    },
    #[error("cannot listen on {addr} for the {what}: {reason}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        reason: String,
    },
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("refusing to serve the gateway on {addr} without gateway keys: anyone who can reach it could spend your budget; configure [[gateway.keys]] in hypertool.toml, or listen on 127.0.0.1")]
    Insecure { addr: SocketAddr },
    #[error("refusing to serve the API on {addr} without an admin key: anyone who can reach it could change budgets; set HYPERTOOL_ADMIN_KEY (a long random value, e.g. `openssl rand -hex 24`) or [[server.admin_keys]] in hypertool.toml, or listen on 127.0.0.1")]
    NoAdminKey { addr: SocketAddr },
    #[error("{0}")]
    Tracing(String),
    /// The data directory cannot be taken (in use by another process, or not writable).
    #[error("{0}")]
    DataDir(String),
}

/// A started server.
pub struct Running {
    pub api_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Asks the server to drain and waits until it has (ledger flushed).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Asks the server to drain, without waiting (e.g. from a `Drop`).
    pub fn request_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits for `signal`, then drains.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        tracing::info!("shutdown requested: draining");
        self.shutdown().await;
    }
}

pub fn lock_alerts(alerts: &Mutex<AlertEngine>) -> std::sync::MutexGuard<'_, AlertEngine> {
    alerts.lock().unwrap_or_else(|p| p.into_inner())
}

fn api_router(state: AppState, body_timeout: Duration) -> Router {
    let limit = state.max_body_bytes;
    let mut router = Router::new();
    for (route, handler) in routes::routes() {
        router = router.route(route.path, handler);
    }
    // One layer in front of everything: the door decides from the head alone, then the body is
    // read within its time and size limits, then the handler runs.
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(crate::web::auth::Entry {
                door: state.door.clone(),
                body: crate::web::body::BodyLimits {
                    max_bytes: limit,
                    inflight: state.inflight_bodies.clone(),
                    timeout: body_timeout,
                    on_refused: {
                        let stats = state.stats.clone();
                        Arc::new(move |path: &str, reason: &'static str| {
                            // The events API counts every request it refuses.
                            if path == "/v1/events" {
                                stats.reject(reason, 1);
                            }
                        })
                    },
                },
            }),
            crate::web::auth::layer,
        ))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "not_found",
        "no such route; see docs/ARCHITECTURE.md for the API",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        "method_not_allowed",
        "this route does not accept that method",
    )
}
