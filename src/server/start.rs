//! Start-up, in the order it happens: load the configuration → refuse an exposed listener without
//! keys → bind both listeners (a busy port fails fast, before any work) → take the data directory →
//! open the ledger and recover the engine (snapshot + replay) → start the writer, settle calls a
//! crash cut off, record gate and variant changes → assemble the server's state → serve until
//! drained (`drain`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::background::spawn_background;
use super::metrics::metrics_router;
use super::{
    api_router, events, insight, listener, lock_alerts, routes, AppInner, AppState, McpEndpoint,
    Running, ServeOptions, ServerStats, StartError,
};
use crate::alerts::delivery::{Deliverer, DeliveryStats};
use crate::alerts::{AlertEngine, LangfuseStatus};
use crate::config::{self, Config};
use crate::core::clock::{Clock, UnixMillis};
use crate::core::engine::Engine;
use crate::store::snapshot::{Recovered, Snapshots};
use crate::store::sqlite::SqliteLedger;
use crate::store::writer::{self, lock, WriterHandle};
use crate::store::{Ledger, LedgerError};
use crate::telemetry::families;
use crate::telemetry::registry::Registry;
use crate::web::auth::{Door, MetricsGate};

/// Starts everything and returns once both listeners accept connections.
pub async fn start(opts: ServeOptions, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
    let cfg = load_config(&opts.config).await?;
    let api_addr = opts.listen.unwrap_or(cfg.settings.listen);
    let metrics_addr = opts.metrics_listen.unwrap_or(cfg.settings.metrics_listen);
    refuse_exposure(&cfg, api_addr, metrics_addr)?;
    let (api_listener, metrics_listener) = bind(api_addr, metrics_addr).await?;
    let api_addr = api_listener.local_addr().unwrap_or(api_addr);
    let metrics_addr = metrics_listener.local_addr().unwrap_or(metrics_addr);
    // One process per data directory: two would each take snapshots of their own view and replay
    // each other's events into nothing.
    let data_lock = lock_data_dir(&opts.data_dir)?;
    let opened = open_ledger(&opts, &cfg, &clock).await?;
    let engine = Arc::new(Mutex::new(opened.recovered.engine));
    let (tracer, langfuse) = start_tracer(&cfg, &opts.data_dir, clock.clone())?;
    let (writer, writer_thread) = start_writer(
        opened.ledger,
        &engine,
        &clock,
        &tracer,
        &cfg,
        opened.snapshots,
        opened.recovered.snapshot,
        opened.recovered.applied_seq,
    );
    settle_cut_off_calls(&engine, &writer).await?;
    let (gate_baseline, variant_baseline) =
        record_baselines(&cfg, &opened.reader, &writer, &clock).await?;
    let state = assemble(
        &opts,
        &cfg,
        Core {
            engine,
            writer,
            tracer,
            langfuse,
            reader: opened.reader,
            clock,
            gates: gate_baseline,
            variants: variant_baseline,
        },
        api_addr,
        metrics_addr,
    )?;

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
    let task = tokio::spawn(super::drain::serve_until_drained(super::drain::Serving {
        state: state.clone(),
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
    }));
    Ok(Running {
        api_addr,
        metrics_addr,
        state,
        shutdown: shutdown_tx,
        task,
    })
}

/// The configuration, read on a blocking thread (files, certificates).
async fn load_config(source: &config::Source) -> Result<Config, StartError> {
    let src = source.clone();
    tokio::task::spawn_blocking(move || config::load(&src))
        .await
        .map_err(|e| StartError::Ledger(LedgerError::new("start", e)))?
        .map_err(|errors| StartError::Config {
            source_name: source.describe(),
            errors,
        })
}

/// Off loopback, every request must carry a key: no gateway keys or no admin key refuses the
/// start; a metrics listener without a bearer token is warned about.
fn refuse_exposure(
    cfg: &Config,
    api_addr: SocketAddr,
    metrics_addr: SocketAddr,
) -> Result<(), StartError> {
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
    Ok(())
}

async fn bind(
    api_addr: SocketAddr,
    metrics_addr: SocketAddr,
) -> Result<(TcpListener, TcpListener), StartError> {
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
    Ok((api_listener, metrics_listener))
}

/// The ledger opened and the engine recovered from it, with the reader beside them.
struct OpenedLedger {
    ledger: Box<dyn Ledger>,
    recovered: Recovered,
    reader: crate::store::reader::LedgerReader,
    snapshots: Snapshots,
}

/// Opens the ledger (PostgreSQL when `ledger.url` says so, else SQLite in the data directory) and
/// recovers the engine from the newest snapshot plus the events after it, on a blocking thread:
/// the ledger may be large.
async fn open_ledger(
    opts: &ServeOptions,
    cfg: &Config,
    clock: &Arc<dyn Clock>,
) -> Result<OpenedLedger, StartError> {
    let db_path = opts.data_dir.join("hypertool.db");
    let data_dir = opts.data_dir.clone();
    let settings = cfg.settings.clone();
    let engine_cfg = cfg.engine_config();
    let replay_clock = clock.clone();
    let snapshots = Snapshots::new(&opts.data_dir);
    let ledger_shown = match &cfg.settings.ledger.url {
        Some(url) => crate::config::secret::redacted(url),
        None => db_path.display().to_string(),
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
    Ok(OpenedLedger {
        ledger,
        recovered,
        reader,
        snapshots,
    })
}

/// The writer thread, with the trace exporter watching what it applies.
#[allow(clippy::too_many_arguments)]
fn start_writer(
    ledger: Box<dyn Ledger>,
    engine: &Arc<Mutex<Engine>>,
    clock: &Arc<dyn Clock>,
    tracer: &crate::telemetry::trace::Tracer,
    cfg: &Config,
    snapshots: Snapshots,
    loaded_snapshot: Option<(u64, UnixMillis)>,
    applied_seq: u64,
) -> (WriterHandle, std::thread::JoinHandle<()>) {
    let observer: Option<writer::Observer> = tracer.exports().then(|| {
        let tracer = tracer.clone();
        Box::new(move |e: &crate::core::event::Stamped, o| tracer.on_applied(e, o))
            as writer::Observer
    });
    let ledger_settings = &cfg.settings.ledger;
    writer::spawn_observed(
        ledger,
        engine.clone(),
        clock.clone(),
        observer,
        writer::WriterOptions {
            outage: writer::OutagePolicy {
                buffer: ledger_settings.on_outage == crate::config::settings::OnOutage::Buffer,
                max_events: ledger_settings.outage_buffer_events,
            },
            snapshots: Some(writer::SnapshotPlan {
                store: snapshots,
                every_ms: ledger_settings.snapshot_interval.as_millis() as i64,
                retain_ms: ledger_settings
                    .retain_days
                    .map(|d| i64::from(d) * 86_400_000),
                loaded_at_ms: loaded_snapshot.map_or(0, |(_, at)| at),
            }),
            applied_seq,
            replica_lease_ms: ledger_settings.replica_lease.as_millis() as i64,
        },
    )
}

/// Gates and variants (prompts included) changed while hypertool was down are recorded now;
/// reloads record theirs. Returns the (gates, variants) baselines in force.
async fn record_baselines(
    cfg: &Config,
    reader: &crate::store::reader::LedgerReader,
    writer: &WriterHandle,
    clock: &Arc<dyn Clock>,
) -> Result<(Arc<insight::Baseline>, Arc<insight::Baseline>), StartError> {
    let baseline = |watched: insight::Watched| {
        let reader = reader.clone();
        async move {
            let recorded = tokio::task::spawn_blocking(move || insight::recorded(&reader, watched))
                .await
                .map_err(|e| StartError::Ledger(LedgerError::new("start", e)))??;
            let (baseline, changes) =
                insight::Baseline::start(watched, &cfg.workflows, &recorded, clock.now_ms());
            if !changes.is_empty() {
                writer.append(changes).await?;
            }
            Ok::<_, StartError>(Arc::new(baseline))
        }
    };
    let gates = baseline(insight::Watched::Gate).await?;
    let variants = baseline(insight::Watched::Variants).await?;
    Ok((gates, variants))
}

/// What start-up built before the server's state: the engine and what feeds it.
struct Core {
    engine: Arc<Mutex<Engine>>,
    writer: WriterHandle,
    tracer: crate::telemetry::trace::Tracer,
    langfuse: LangfuseStatus,
    reader: crate::store::reader::LedgerReader,
    clock: Arc<dyn Clock>,
    gates: Arc<insight::Baseline>,
    variants: Arc<insight::Baseline>,
}

/// The server's state: the alert engine and its deliveries, the door, the MCP endpoint, the
/// gateway, and the registry every component's metrics are registered in.
fn assemble(
    opts: &ServeOptions,
    cfg: &Config,
    core: Core,
    api_addr: SocketAddr,
    metrics_addr: SocketAddr,
) -> Result<AppState, StartError> {
    let Core {
        engine,
        writer,
        tracer,
        langfuse,
        reader,
        clock,
        gates,
        variants,
    } = core;
    let registry = Arc::new(Registry::new());
    let stats = Arc::new(ServerStats::new());
    stats.register(&registry);
    log_langfuse_status(&langfuse);
    let mut alert_settings = cfg.settings.alerts.clone();
    alert_settings.served_at(api_addr);
    let mut alerts = AlertEngine::new(alert_settings, langfuse);
    let diagnosis = tracer.clone();
    alerts.set_langfuse_diagnosis(Box::new(move || diagnosis.langfuse_diagnosis()));
    let alerts = Arc::new(Mutex::new(alerts));
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
        cfg,
        opts.mcp_servers.as_deref(),
        crate::switchboard::Switchboard {
            engine: engine.clone(),
            writer: writer.clone(),
            serial: switch_lock.clone(),
            clock: clock.clone(),
        },
        api_addr,
    )?;
    let started_ms = clock.now_ms();
    let inflight_bodies =
        crate::web::body::InflightBodies::new(cfg.settings.max_inflight_body_bytes);
    register_process_metrics(
        &registry,
        ProcessSources {
            writer: &writer,
            clock: &clock,
            tracer: &tracer,
            mcp: &mcp,
            alerts: &alerts,
            door: &door,
            inflight_bodies: &inflight_bodies,
            deliveries: &delivery_stats,
            started_ms,
        },
    );
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
            internal_errors: door.internal_errors.clone(),
        },
    );
    gateway.register_metrics(&registry);
    gateway
        .limits
        .configure(&cfg.settings.gateway.keys, &cfg.rate_limits);
    Ok(AppState(Arc::new(AppInner {
        registry,
        config_source: cfg.source.clone(),
        mcp,
        door,
        metrics_gate,
        scrape_token,
        gateway: Arc::new(gateway),
        switch_lock,
        tasks,
        tracer,
        generator_url,
        api_addr,
        reader,
        langfuse: cfg.settings.langfuse.clone(),
        gates,
        variants,
        deliverer: Arc::new(Mutex::new(deliverer)),
        delivery_stats,
        engine,
        alerts,
        metrics_addr,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default(),
        writer,
        clock,
        stats,
        draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        started_ms,
        max_body_bytes: cfg.settings.max_body_bytes,
        inflight_bodies,
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
    })))
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

/// What the process's metrics are read from, besides the components that register their own.
struct ProcessSources<'a> {
    writer: &'a WriterHandle,
    clock: &'a Arc<dyn Clock>,
    tracer: &'a crate::telemetry::trace::Tracer,
    mcp: &'a McpEndpoint,
    alerts: &'a Arc<Mutex<AlertEngine>>,
    door: &'a Door,
    inflight_bodies: &'a crate::web::body::InflightBodies,
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
    registry.register(from.door.internal_errors.clone());
    let bodies = from.inflight_bodies.clone();
    registry.collect(&families::INFLIGHT_BODY_BYTES, move |emit| {
        emit(&[], bodies.held() as f64);
    });
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
