//! `hypertool serve`: the API listener, the metrics listener, and the tasks around the core.
//!
//! Start-up: load configuration → bind both listeners (a busy port fails fast, before any work) →
//! open the ledger → replay it into a fresh engine → start the writer, the ticker and the reloader
//! → serve. Shutdown (SIGTERM/Ctrl-C): mark not ready, stop accepting, finish in-flight requests,
//! flush the ledger, return — all within `server.shutdown_grace_seconds`.

pub mod admin;
pub mod audit;
mod background;
pub mod dashboard;
pub mod events;
pub mod experiments;
pub mod insight;
pub mod listener;
pub mod mcp;
pub mod mcp_stdio;
mod metrics;
pub mod personas;
pub mod routes;
pub mod workflows;

pub use background::evaluate_alerts;
use background::spawn_background;
use metrics::metrics_router;
pub use metrics::render_metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::alerts::delivery::{Deliverer, DeliveryStats};
use crate::alerts::{AlertEngine, AlertState, LangfuseStatus};
use crate::config::{self, Config, ConfigErrors, Source};
use crate::core::clock::{Clock, UnixMillis};
use crate::core::engine::Engine;
use crate::store::sqlite::SqliteLedger;
use crate::store::writer::{self, lock, WriterHandle};
use crate::store::{Ledger, LedgerError};
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

/// Takes the data directory for this process (an advisory lock on `hypertool.lock`, released
/// when the process ends however it ends), or says who holds it and what to do.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    const WRITABLE: &str = "hypertool needs a writable data directory: fix its permissions or mount, or choose another with --data-dir";
    let fail = StartError::DataDir;
    std::fs::create_dir_all(dir).map_err(|e| {
        fail(format!(
            "cannot create the data directory {}: {e}; {WRITABLE}",
            dir.display()
        ))
    })?;
    let path = dir.join("hypertool.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| fail(format!("cannot open {}: {e}; {WRITABLE}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {
            use std::io::{Seek, Write};
            let _ = file.set_len(0);
            let _ = file.seek(std::io::SeekFrom::Start(0));
            let _ = write!(file, "{}", std::process::id());
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            Err(fail(format!(
                "the data directory {} is in use by another hypertool (pid {}); run one process per data directory: beside a running server, `hypertool mcp --server URL` reports to it; otherwise choose another --data-dir",
                dir.display(),
                holder.trim()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(fail(format!(
            "cannot lock {}: {e}; {WRITABLE}",
            path.display()
        ))),
    }
}

/// Starts the downstream MCP servers (`[mcp] servers`, or `servers` when given) and the `/mcp`
/// endpoint over them; switches and tool calls go to this server's engine and ledger.
fn start_mcp(
    cfg: &Config,
    servers: Option<&std::path::Path>,
    switchboard: crate::switchboard::Switchboard,
    api_addr: SocketAddr,
) -> Result<McpEndpoint, StartError> {
    use crate::mcp::proxy::Proxy;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let path = servers.or(cfg.settings.mcp.servers.as_deref());
    let specs = crate::mcp::config::load_configured(path)
        .map_err(|errors| StartError::Config {
            source_name: path.map(|p| p.display().to_string()).unwrap_or_default(),
            errors,
        })?
        .trusting(&cfg.settings.trust.mcp);
    let proxy = Arc::new(Proxy::new(
        crate::mcp::hub::Hub::Local(switchboard),
        crate::mcp::downstream::Downstreams::start(&specs),
        cfg.settings.gateway.default_chatmode.clone(),
    ));
    let http_cancel = tokio_util::sync::CancellationToken::new();
    let mut config =
        StreamableHttpServerConfig::default().with_cancellation_token(http_cancel.clone());
    config.max_request_body_bytes = cfg.settings.max_body_bytes;
    // On loopback the SDK's Host check (loopback names only) stops DNS rebinding from a browser;
    // off loopback every request carries a key (the server refuses to start without them), and
    // the names it is reached by are the operator's.
    if !api_addr.ip().is_loopback() {
        config = config.disable_allowed_hosts();
    }
    let sessions = proxy.clone();
    let http =
        StreamableHttpService::new(move || sessions.http_session(), Default::default(), config);
    Ok(McpEndpoint {
        proxy,
        http,
        http_cancel,
        owners: Arc::default(),
    })
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
    /// What one reported event may claim (`server.max_tokens_per_event`).
    pub event_limits: events::EventLimits,
    /// The access decision for every API request (keys, roles, refusals counted).
    pub door: Arc<Door>,
    /// The metrics listener's bearer-token check.
    pub metrics_gate: Arc<MetricsGate>,
    /// The token the embedded alert engine's own scrape sends (random per process).
    pub scrape_token: String,
}

/// What the process's metrics are read from, besides the components that register their own.
struct ProcessSources<'a> {
    writer: &'a WriterHandle,
    clock: &'a Arc<dyn Clock>,
    tracer: &'a crate::telemetry::trace::Tracer,
    mcp: &'a McpEndpoint,
    alerts: &'a Arc<Mutex<AlertEngine>>,
    door: &'a Door,
    deliveries: &'a DeliveryStats,
    started_ms: UnixMillis,
}

/// Registers every process family not registered by its component at construction (the gateway
/// and the server's stats register their own).
fn register_process_metrics(registry: &Registry, from: ProcessSources<'_>) {
    from.writer
        .health
        .register_metrics(registry, from.clock.clone());
    from.tracer.register_metrics(registry);
    from.mcp.proxy.register_metrics(registry);
    registry.register(from.door.failures.clone());
    registry.register(from.deliveries.counts.clone());
    let alerts = from.alerts.clone();
    registry.collect(&families::ALERTS_FIRING, move |emit| {
        for ((alertname, severity), n) in lock_alerts(&alerts).firing_counts() {
            emit(&[&alertname, &severity], n);
        }
    });
    let alerts = from.alerts.clone();
    registry.collect(&families::LANGFUSE_ENABLED, move |emit| {
        let expected = lock_alerts(&alerts).langfuse().expected();
        emit(&[], if expected { 1.0 } else { 0.0 })
    });
    registry.collect(&families::BUILD_INFO, |emit| {
        emit(&[env!("CARGO_PKG_VERSION")], 1.0)
    });
    let started_ms = from.started_ms;
    registry.collect(&families::START_TIME_SECONDS, move |emit| {
        emit(&[], started_ms as f64 / 1000.0)
    });
}

/// 32 random bytes, hex: the embedded engine's own scrape token (never configured, never logged).
fn random_token() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No system randomness: a digest of the time and the process id is still unique per
        // process, and the token only lets this process scrape itself.
        let seed = format!("{:?}/{}", std::time::SystemTime::now(), std::process::id());
        let digest = ring::digest::digest(&ring::digest::SHA256, seed.as_bytes());
        bytes.copy_from_slice(digest.as_ref());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

fn bind_error(
    what: &'static str,
    flag: &str,
    env: &str,
    addr: SocketAddr,
    e: std::io::Error,
) -> StartError {
    let reason = match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "port {} is already in use; stop the process holding it (`ss -ltnp 'sport = :{}'`) or \
             choose another address with {flag} or {env}",
            addr.port(),
            addr.port()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied; use a port above 1023 or another address with {flag} or {env}"
        ),
        _ => format!("{e}; choose another address with {flag} or {env}"),
    };
    StartError::Bind { what, addr, reason }
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

/// Starts everything and returns once both listeners accept connections.
pub async fn start(opts: ServeOptions, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
    let source = opts.config.clone();
    let cfg = {
        let src = source.clone();
        tokio::task::spawn_blocking(move || config::load(&src))
            .await
            .map_err(|e| StartError::Ledger(LedgerError::new("start", e)))?
    }
    .map_err(|errors| StartError::Config {
        source_name: source.describe(),
        errors,
    })?;
    let settings = cfg.settings.clone();
    let api_addr = opts.listen.unwrap_or(settings.listen);
    let metrics_addr = opts.metrics_listen.unwrap_or(settings.metrics_listen);
    if !api_addr.ip().is_loopback() && cfg.settings.gateway.keys.is_empty() {
        return Err(StartError::Insecure { addr: api_addr });
    }
    if !api_addr.ip().is_loopback() && cfg.settings.auth.admin.is_empty() {
        return Err(StartError::NoAdminKey { addr: api_addr });
    }
    if !metrics_addr.ip().is_loopback() && cfg.settings.auth.metrics_token.is_none() {
        tracing::warn!(metrics = %metrics_addr,
            "the metrics listener is off loopback without a bearer token: anyone who can reach it can read persona names, budgets and usage; set server.metrics_bearer_token_env");
    }
    let api_listener = TcpListener::bind(api_addr)
        .await
        .map_err(|e| bind_error("API", "--listen", "HYPERTOOL_LISTEN", api_addr, e))?;
    let metrics_listener = TcpListener::bind(metrics_addr).await.map_err(|e| {
        bind_error(
            "metrics",
            "--metrics-listen",
            "HYPERTOOL_METRICS_LISTEN",
            metrics_addr,
            e,
        )
    })?;
    let api_addr = api_listener.local_addr().unwrap_or(api_addr);
    let metrics_addr = metrics_listener.local_addr().unwrap_or(metrics_addr);

    // One process per data directory: two would each take snapshots of their own view and replay
    // each other's events into nothing.
    let data_lock = lock_data_dir(&opts.data_dir)?;
    // Open and replay the ledger on a blocking thread: it may be large.
    let db_path = opts.data_dir.join("hypertool.db");
    let data_dir = opts.data_dir.clone();
    let engine_cfg = cfg.engine_config();
    let replay_clock = clock.clone();
    let snapshots = crate::store::snapshot::Snapshots::new(&opts.data_dir);
    let ledger_shown = match &cfg.settings.ledger.url {
        Some(url) => crate::config::secret::redacted(url),
        None => opts.data_dir.join("hypertool.db").display().to_string(),
    };
    let recover_from = snapshots.clone();
    // A shared ledger's connections, with the TLS its URL's `sslmode` asks for.
    let pg = match &cfg.settings.ledger.url {
        Some(url) => Some(crate::store::postgres::connector(
            url,
            &cfg.settings,
            "hypertool",
        )?),
        None => None,
    };
    let reader = match &pg {
        Some(connector) => crate::store::reader::LedgerReader::Postgres(
            Box::new(connector.clone()),
            ledger_shown.clone(),
        ),
        None => crate::store::reader::LedgerReader::Sqlite(db_path.clone()),
    };
    let (ledger, recovered) = tokio::task::spawn_blocking(move || {
        let ledger: Box<dyn Ledger> = match (&settings.ledger.url, pg) {
            (Some(url), Some(connector)) => Box::new(crate::store::postgres::PostgresLedger::open(
                url,
                connector,
                &crate::store::postgres::replica_id(&data_dir)?,
            )?),
            _ => Box::new(SqliteLedger::open(&db_path, settings.ledger.sync)?),
        };
        let recovered = crate::store::snapshot::recover(
            &*ledger,
            &recover_from,
            engine_cfg,
            replay_clock.now_ms(),
        )?;
        Ok::<_, LedgerError>((ledger, recovered))
    })
    .await
    .map_err(|e| StartError::Ledger(LedgerError::new("start", e)))??;
    match recovered.snapshot {
        Some((seq, at)) => tracing::info!(
            events = recovered.replayed,
            snapshot_seq = seq,
            snapshot_at = %crate::core::clock::to_rfc3339(at),
            ledger = %ledger_shown,
            "state loaded from a snapshot; the events after it replayed"
        ),
        None => tracing::info!(
            events = recovered.replayed,
            ledger = %ledger_shown,
            "ledger replayed"
        ),
    }
    let engine = recovered.engine;

    let engine = Arc::new(Mutex::new(engine));
    let (tracer, langfuse) = start_tracer(&cfg, &opts.data_dir, clock.clone())?;
    let observer: Option<writer::Observer> = tracer.exports().then(|| {
        let tracer = tracer.clone();
        Box::new(move |e: &crate::core::event::Stamped, o| tracer.on_applied(e, o))
            as writer::Observer
    });
    let (writer, writer_thread) = writer::spawn_observed(
        ledger,
        engine.clone(),
        clock.clone(),
        observer,
        writer::WriterOptions {
            outage: writer::OutagePolicy {
                buffer: cfg.settings.ledger.on_outage == crate::config::settings::OnOutage::Buffer,
                max_events: cfg.settings.ledger.outage_buffer_events,
            },
            snapshots: Some(writer::SnapshotPlan {
                store: snapshots,
                every_ms: cfg.settings.ledger.snapshot_interval.as_millis() as i64,
                retain_ms: cfg
                    .settings
                    .ledger
                    .retain_days
                    .map(|d| i64::from(d) * 86_400_000),
                loaded_at_ms: recovered.snapshot.map_or(0, |(_, at)| at),
            }),
            applied_seq: recovered.applied_seq,
            replica_lease_ms: cfg.settings.ledger.replica_lease.as_millis() as i64,
        },
    );
    settle_cut_off_calls(&engine, &writer).await?;
    // Gates and variants (prompts included) changed while hypertool was down are recorded now;
    // reloads record theirs.
    let mut baselines = Vec::new();
    for watched in [insight::Watched::Gate, insight::Watched::Variants] {
        let recorded = {
            let reader = reader.clone();
            tokio::task::spawn_blocking(move || insight::recorded(&reader, watched))
                .await
                .map_err(|e| StartError::Ledger(LedgerError::new("start", e)))??
        };
        let (baseline, changes) =
            insight::Baseline::start(watched, &cfg.workflows, &recorded, clock.now_ms());
        if !changes.is_empty() {
            writer.append(changes).await?;
        }
        baselines.push(Arc::new(baseline));
    }
    let (variant_baseline, gate_baseline) = match (baselines.pop(), baselines.pop()) {
        (Some(v), Some(g)) => (v, g),
        _ => unreachable!("two baselines were made just above"),
    };
    let registry = Arc::new(Registry::new());
    let stats = Arc::new(ServerStats::new());
    stats.register(&registry);
    log_langfuse_status(&langfuse);
    let mut alert_settings = cfg.settings.alerts.clone();
    alert_settings.served_at(api_addr);
    let mut alerts = AlertEngine::new(alert_settings, langfuse);
    let diagnosis = tracer.clone();
    alerts.set_langfuse_diagnosis(Box::new(move || diagnosis.langfuse_diagnosis()));
    let delivery_stats = Arc::new(DeliveryStats::default());
    let generator_url = format!("http://{api_addr}/api/alerts");
    let deliverer = Deliverer::start(
        &cfg.settings.alerts.delivery,
        generator_url.clone(),
        delivery_stats.clone(),
    );
    let tasks = tokio_util::task::TaskTracker::new();
    let persona_names = engine.clone();
    let door = Arc::new(Door::new(
        &routes::table(),
        &cfg.settings.auth,
        &cfg.settings.gateway.keys,
        Box::new(move |name: &str| lock(&persona_names).personas().canonical(name).to_string()),
    ));
    let scrape_token = random_token();
    let metrics_gate = Arc::new(MetricsGate::new(
        cfg.settings.auth.metrics_token.as_ref().map(|k| k.hash),
        &scrape_token,
    ));
    let switch_lock = Arc::new(tokio::sync::Mutex::new(()));
    let mcp = start_mcp(
        &cfg,
        opts.mcp_servers.as_deref(),
        crate::switchboard::Switchboard {
            engine: engine.clone(),
            writer: writer.clone(),
            serial: switch_lock.clone(),
            clock: clock.clone(),
        },
        api_addr,
    )?;
    let alerts = Arc::new(Mutex::new(alerts));
    let started_ms = clock.now_ms();
    register_process_metrics(
        &registry,
        ProcessSources {
            writer: &writer,
            clock: &clock,
            tracer: &tracer,
            mcp: &mcp,
            alerts: &alerts,
            door: &door,
            deliveries: &delivery_stats,
            started_ms,
        },
    );
    let state = AppState(Arc::new(AppInner {
        registry: registry.clone(),
        config_source: cfg.source.clone(),
        mcp,
        door,
        metrics_gate,
        scrape_token,
        gateway: {
            let gateway = crate::gateway::Gateway::new(
                cfg.settings.gateway.clone(),
                cfg.workflows.clone(),
                crate::gateway::Shared {
                    engine: engine.clone(),
                    writer: writer.clone(),
                    clock: clock.clone(),
                    tasks: tasks.clone(),
                    max_body_bytes: cfg.settings.max_body_bytes,
                    tracer: tracer.clone(),
                    rejected: stats.rejected.clone(),
                },
            );
            gateway.register_metrics(&registry);
            gateway
                .limits
                .configure(&cfg.settings.gateway.keys, &cfg.rate_limits);
            Arc::new(gateway)
        },
        switch_lock,
        tasks: tasks.clone(),
        tracer: tracer.clone(),
        generator_url,
        api_addr,
        reader,
        langfuse: cfg.settings.langfuse.clone(),
        gates: gate_baseline,
        variants: variant_baseline,
        deliverer: Arc::new(Mutex::new(deliverer)),
        delivery_stats,
        engine: engine.clone(),
        alerts,
        metrics_addr,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default(),
        writer: writer.clone(),
        clock: clock.clone(),
        stats: stats.clone(),
        draining: Arc::new(AtomicBool::new(false)),
        started_ms,
        max_body_bytes: cfg.settings.max_body_bytes,
        event_limits: events::EventLimits {
            max_tokens: cfg.settings.max_tokens_per_event,
            max_age_days: cfg
                .settings
                .ledger
                .retain_days
                .map_or(events::MAX_EVENT_AGE_DAYS, |d| {
                    d.clamp(1, events::MAX_EVENT_AGE_DAYS)
                }),
        },
    }));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let grace = Duration::from_secs(cfg.settings.shutdown_grace_seconds);
    let connection_limits = listener::ConnectionLimits {
        max_connections: cfg.settings.max_connections,
        per_client: cfg.settings.max_connections_per_client,
        header_timeout: cfg.settings.header_timeout,
    };
    let body_timeout = cfg.settings.body_timeout;
    let background = spawn_background(
        &state,
        cfg,
        opts.listen.is_some() || opts.metrics_listen.is_some(),
    );

    let api = api_router(state.clone(), body_timeout);
    let metrics = metrics_router(state.clone());
    let drain_state = state.clone();
    let task = tokio::spawn(async move {
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
                drain_state.draining.store(true, Ordering::SeqCst);
                let at = tokio::time::Instant::now() + grace;
                deadline = Some(at);
                if tokio::time::timeout_at(at, &mut servers).await.is_err() {
                    tracing::warn!(grace_seconds = grace.as_secs(),
                        "connections still open at the end of the grace period were closed; a call still running on one was not answered (it is accounted all the same)");
                }
            }
        }
        let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + grace);
        drain_state.draining.store(true, Ordering::SeqCst);
        for task in background {
            task.abort();
        }
        // MCP sessions end (their event streams would hold the drain open) and the downstream
        // servers are stopped; their last tool calls are already queued to the writer.
        drain_state.mcp.http_cancel.cancel();
        drain_state.mcp.proxy.downstreams.shutdown().await;
        // Gateway calls still being accounted (a client that left, a stream being relayed) finish
        // first, within the grace period; then the writer flushes what is queued.
        drain_state.tasks.close();
        if tokio::time::timeout_at(deadline, drain_state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = drain_state.tasks.len(),
                "gateway calls still running at the end of the grace period were cut off; each is counted at its admission estimate at the next start"
            );
        }
        // Everything acknowledged is already committed; this flushes what was queued behind it.
        drain_state.writer.shutdown().await;
        let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
        // The spans of the last calls go to the spool; what a destination does not take within a
        // few seconds is sent at the next start.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        drain_state
            .tracer
            .shutdown(left.min(Duration::from_secs(5)))
            .await;
        tracing::info!("ledger flushed; stopped");
    });

    Ok(Running {
        api_addr,
        metrics_addr,
        state,
        shutdown: shutdown_tx,
        task,
    })
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

/// Gateway calls that a crash cut off between their admission and their usage are counted at
/// their admission's estimate (stamped when they were admitted), before anything is served: an
/// answered call is never missing, and a call that died mid-way is over-counted by at most its
/// estimate. Stored as usage events that settle them, so the next start does not count them again.
async fn settle_cut_off_calls(
    engine: &Arc<Mutex<Engine>>,
    writer: &writer::WriterHandle,
) -> Result<(), StartError> {
    let cut_off = lock(engine).unsettled_calls();
    if cut_off.is_empty() {
        return Ok(());
    }
    let tokens: u64 = cut_off
        .iter()
        .map(|(_, c)| c.estimate + c.streamed_tokens)
        .sum();
    let n = cut_off.len();
    let events = cut_off
        .into_iter()
        .map(|(at, c)| crate::core::event::Stamped {
            at,
            event: crate::core::event::Event::Usage(c.as_settlement()),
        })
        .collect();
    writer.append(events).await?;
    tracing::warn!(
        calls = n,
        tokens,
        "gateway calls were cut off (crash or kill) between their admission and their usage; each is counted at its admission estimate plus what it had streamed"
    );
    Ok(())
}

/// Starts the trace exporter for the destinations `[tracing]`, `[langfuse]` and the environment
/// name; a warning for anything asked for that cannot be done. Also says what the embedded alert
/// engine knows about Langfuse that a Prometheus rule cannot (decided by the same plan).
fn start_tracer(
    cfg: &Config,
    data_dir: &std::path::Path,
    clock: Arc<dyn crate::core::clock::Clock>,
) -> Result<(crate::telemetry::trace::Tracer, LangfuseStatus), StartError> {
    use crate::telemetry::trace::{Plan, Tracer};
    let plan = Plan::resolve(
        &cfg.settings.tracing,
        &cfg.settings.langfuse,
        data_dir,
        &|k| std::env::var(k).ok(),
    )
    .trusting(&cfg.settings.trust);
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    if plan.destinations.is_empty() {
        tracing::info!("no trace destination configured (set OTEL_EXPORTER_OTLP_ENDPOINT or [tracing] endpoint, or the Langfuse keys)");
    }
    let langfuse = match (plan.langfuse_wanted, plan.langfuse_missing_keys.is_empty()) {
        (false, _) => LangfuseStatus::Disabled,
        (true, true) => LangfuseStatus::Configured,
        (true, false) => LangfuseStatus::NotConfigured(plan.langfuse_missing_keys.clone()),
    };
    let tracer = Tracer::start(plan, clock).map_err(StartError::Tracing)?;
    Ok((tracer, langfuse))
}

/// Says at start-up what the Langfuse configuration means for alert 7.
fn log_langfuse_status(status: &LangfuseStatus) {
    match status {
        LangfuseStatus::Disabled => tracing::info!(
            "Langfuse is off (langfuse.enabled = false, or \"auto\" with no key set): LangfuseIntegrationFailing is not evaluated"
        ),
        // Named by the trace exporter's plan (`start_tracer`), with what it means for traces.
        LangfuseStatus::NotConfigured(_) | LangfuseStatus::Configured => {}
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
