//! `hypertool mcp`: the proxy over stdio, for Claude Code, Cursor and every MCP client that starts
//! its servers as commands. Stdout carries the protocol only; logs go to stderr.
//!
//! Beside a running `hypertool serve` (`--server URL`, the key from `HYPERTOOL_API_KEY`) switches
//! and tool calls go to that server's API; otherwise this process starts hypertool's core with a
//! ledger of its own (`--data-dir`), its API and metrics listeners on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rmcp::ServiceExt;

use crate::config::Source;
use crate::core::clock::Clock;
use crate::mcp::config as mcp_config;
use crate::mcp::downstream::Downstreams;
use crate::mcp::hub::Hub;
use crate::mcp::proxy::{Proxy, SessionStart};

/// Longest the proxy waits for its downstream servers before it answers the client (a server
/// that comes up later is announced with `notifications/tools/list_changed`).
const SETTLE: Duration = Duration::from_secs(10);

/// What `hypertool mcp` was asked for.
#[derive(Debug, Clone)]
pub struct StdioOptions {
    pub config: Source,
    pub data_dir: PathBuf,
    /// The downstream servers (`.mcp.json`); `None`: `[mcp] servers` of the configuration.
    pub mcp_config: Option<PathBuf>,
    pub persona: Option<String>,
    /// A running `hypertool serve` to report to.
    pub server: Option<String>,
    pub key: Option<String>,
    pub session: Option<String>,
    pub chatmode: Option<String>,
    /// Listeners of the core this process starts without `--server` (loopback, any free port).
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
}

/// Runs the proxy on stdin/stdout until the client closes it or a signal comes.
pub async fn run(
    opts: StdioOptions,
    clock: Arc<dyn Clock>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let cfg = {
        let src = opts.config.clone();
        tokio::task::spawn_blocking(move || crate::config::load(&src))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|errors| {
                format!(
                    "invalid configuration ({}):\n{errors}",
                    opts.config.describe()
                )
            })?
    };
    if let Some(p) = &opts.persona {
        if cfg.personas.get(p).is_none() {
            let known: Vec<&str> = cfg.personas.iter().map(|p| p.name.as_str()).collect();
            return Err(format!(
                "unknown persona `{p}` (--persona); known: {}",
                known.join(", ")
            ));
        }
    }
    let default_chatmode = cfg.settings.gateway.default_chatmode.clone();
    // Beside a server: the downstream servers are this process's own. Standalone: the core this
    // process starts runs them (the same ones its `/mcp` serves).
    let (proxy, core, key_persona) = match &opts.server {
        Some(url) => {
            let servers = mcp_config::load_configured(
                opts.mcp_config
                    .as_deref()
                    .or(cfg.settings.mcp.servers.as_deref()),
            )
            .map_err(|errors| errors.to_string())?
            .trusting(&cfg.settings.trust.mcp);
            let hub = Hub::remote(url, opts.key.clone(), cfg.personas.clone(), clock.clone())?;
            // With a persona key the session is the key's persona (the server would refuse any
            // other), asked of the server so that it need not be said twice.
            let key_persona = match hub.key_persona().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("cannot ask the server whose key this is: {e}");
                    None
                }
            };
            if let (Some(asked), Some(own)) = (&opts.persona, &key_persona) {
                let asked = cfg.personas.canonical(asked);
                if asked != own.as_str() {
                    return Err(format!(
                        "--persona {asked}, but the key in the environment belongs to persona `{own}`; use that persona's key, or drop --persona"
                    ));
                }
            }
            let proxy = Arc::new(Proxy::new(
                hub,
                Downstreams::start(&servers),
                default_chatmode,
            ));
            (proxy, None, key_persona)
        }
        None => {
            let loopback = |a: Option<SocketAddr>| {
                Some(a.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))))
            };
            let running = super::start(
                super::ServeOptions {
                    config: opts.config.clone(),
                    data_dir: opts.data_dir.clone(),
                    listen: loopback(opts.listen),
                    metrics_listen: loopback(opts.metrics_listen),
                    mcp_servers: opts.mcp_config.clone(),
                },
                clock.clone(),
            )
            .await
            .map_err(|e| e.to_string())?;
            tracing::info!(api = %running.api_addr, metrics = %running.metrics_addr,
                data_dir = %opts.data_dir.display(), "hypertool mcp: core started with a ledger of its own");
            (running.state.mcp.proxy.clone(), Some(running), None)
        }
    };
    proxy.downstreams.settled(SETTLE).await;
    let session = proxy.session(SessionStart {
        id: opts.session.clone(),
        persona: opts.persona.clone().or_else(|| key_persona.clone()),
        locked_to: key_persona,
        chatmode: opts.chatmode.clone(),
    });
    tracing::info!(session = %session.id(), persona = ?session.persona(),
        "hypertool mcp: serving MCP on stdio");
    let outcome = match session.serve(rmcp::transport::stdio()).await {
        Ok(running) => {
            let cancel = running.cancellation_token();
            let waiting = running.waiting();
            tokio::pin!(waiting);
            tokio::select! {
                _ = &mut waiting => {}
                _ = shutdown => {
                    cancel.cancel();
                    let _ = waiting.await;
                }
            }
            Ok(())
        }
        Err(e) => Err(format!("the MCP client did not initialize: {e}")),
    };
    proxy.downstreams.shutdown().await;
    proxy.hub.flush(Duration::from_secs(5)).await;
    if let Some(running) = core {
        running.shutdown().await;
    }
    outcome
}
