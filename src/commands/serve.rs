//! `hypertool serve` and `hypertool mcp`: the processes that run, their logging and signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use hypertool::config::Source;
use hypertool::core::clock::SystemClock;
use hypertool::server::{self, ServeOptions};
use std::sync::Mutex;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// hypertool.toml (default: ./config/hypertool.toml, else the built-in defaults).
    #[arg(long, env = "HYPERTOOL_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Where the ledger (hypertool.db) lives.
    #[arg(long, env = "HYPERTOOL_DATA_DIR", default_value = "data")]
    pub(crate) data_dir: PathBuf,
    /// API address (default from the configuration: 127.0.0.1:8080).
    #[arg(long, env = "HYPERTOOL_LISTEN")]
    pub(crate) listen: Option<SocketAddr>,
    /// Metrics address (default from the configuration: 127.0.0.1:9464).
    #[arg(long, env = "HYPERTOOL_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// Write logs to this file as JSON lines instead of to stderr.
    #[arg(long, env = "HYPERTOOL_LOG_FILE")]
    pub(crate) log_file: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct McpArgs {
    /// The persona in force from the start (none: only hypertool's own tools until equip-persona).
    #[arg(long, env = "HYPERTOOL_PERSONA")]
    pub(crate) persona: Option<String>,
    /// The downstream servers, an `.mcp.json`-style file (default: `[mcp] servers` of
    /// hypertool.toml).
    #[arg(long, env = "HYPERTOOL_MCP_CONFIG")]
    pub(crate) mcp_config: Option<PathBuf>,
    /// hypertool.toml (default: ./config/hypertool.toml, else the built-in defaults).
    #[arg(long, env = "HYPERTOOL_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Where this process's own ledger lives (without --server).
    #[arg(long, env = "HYPERTOOL_DATA_DIR", default_value = "data")]
    pub(crate) data_dir: PathBuf,
    /// A running `hypertool serve` that records switches and tool calls (its key from
    /// HYPERTOOL_API_KEY); without it this process keeps a ledger of its own.
    #[arg(long)]
    pub(crate) server: Option<String>,
    /// The environment variable holding the key sent to --server (a persona key: its persona only).
    #[arg(long, default_value = "HYPERTOOL_API_KEY")]
    pub(crate) api_key_env: String,
    /// The session id in events and the ledger (default: a random one per run).
    #[arg(long)]
    pub(crate) session: Option<String>,
    /// The chatmode whose switch cooldown applies (default: the gateway's default chatmode).
    #[arg(long)]
    pub(crate) chatmode: Option<String>,
    /// API address of this process's own core (without --server; default: a free loopback port).
    #[arg(long)]
    pub(crate) listen: Option<SocketAddr>,
    /// Metrics address of this process's own core (without --server; default: a free loopback port).
    #[arg(long)]
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// Write logs to this file as JSON lines instead of to stderr.
    #[arg(long, env = "HYPERTOOL_LOG_FILE")]
    pub(crate) log_file: Option<PathBuf>,
}

pub(crate) fn init_logging(log_file: Option<&PathBuf>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rmcp=warn"));
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            tracing_subscriber::fmt()
                .json()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(Mutex::new(file))
                .init();
        }
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub(crate) async fn serve(args: ServeArgs) -> ExitCode {
    if let Err(e) = init_logging(args.log_file.as_ref()) {
        errln!("error: {e}");
        return ExitCode::from(2);
    }
    let source = Source::discover(args.config.as_deref());
    let opts = ServeOptions {
        config: source.clone(),
        data_dir: args.data_dir,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        mcp_servers: None,
    };
    match server::start(opts, Arc::new(SystemClock)).await {
        Ok(running) => {
            tracing::info!(
                api = %running.api_addr,
                metrics = %running.metrics_addr,
                config = %source.describe(),
                version = env!("CARGO_PKG_VERSION"),
                "hypertool serving"
            );
            running.run_until(shutdown_signal()).await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

pub(crate) async fn mcp(args: McpArgs) -> ExitCode {
    if let Err(e) = init_logging(args.log_file.as_ref()) {
        errln!("error: {e}");
        return ExitCode::from(2);
    }
    let opts = hypertool::server::mcp_stdio::StdioOptions {
        config: Source::discover(args.config.as_deref()),
        data_dir: args.data_dir,
        mcp_config: args.mcp_config,
        persona: args.persona,
        key: std::env::var(&args.api_key_env)
            .ok()
            .filter(|k| !k.is_empty()),
        server: args.server,
        session: args.session,
        chatmode: args.chatmode,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
    };
    match hypertool::server::mcp_stdio::run(opts, Arc::new(SystemClock), shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
