//! Health checks from outside the process: `hypertool doctor` (everything at once, one line each)
//! and the investigation of HypertoolMetricsNotReported (which must work with hypertool down).
//!
//! Every network check has a 5 s timeout. Secrets (keys, tokens, passwords in URLs) are used in
//! requests only; what is printed names variables, never their values.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::alerts::rules::AlertId;
use crate::config::{self, Config, Source};
use crate::runbook::investigate::{Cause, Finding, Report, Status};

mod investigation;
mod outbound;

pub use investigation::metrics_investigation;
use outbound::{configured, prometheus};
pub use outbound::{prometheus_targets, ScrapeTarget};

const TIMEOUT: Duration = Duration::from_secs(5);

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub status: Status,
    pub detail: String,
}

impl Check {
    fn new(check: &str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            status,
            detail: detail.into(),
        }
    }

    pub fn line(&self) -> String {
        let mark = match self.status {
            Status::Ok => "ok  ",
            Status::Info => "info",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        format!("{mark} {}: {}", self.check, self.detail)
    }
}

/// Where to look.
pub struct Target {
    pub config: Option<std::path::PathBuf>,
    pub data_dir: std::path::PathBuf,
    /// The API (`--server`), else the configuration's `server.listen`.
    pub server: Option<String>,
    /// The metrics listener, else the configuration's `server.metrics_listen`.
    pub metrics: Option<String>,
    pub prometheus: Option<String>,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .build()
        .unwrap_or_default()
}

fn why(e: &reqwest::Error) -> String {
    crate::core::text::error_chain(e)
}

/// What the metrics endpoint said.
#[derive(Debug, Clone, PartialEq)]
pub enum Scrape {
    /// hypertool's exposition.
    Hypertool,
    /// Answered, but not with hypertool's metrics (another process on the port).
    Other(u16),
    /// 401: a bearer token is required.
    Unauthorized,
    Unreachable(String),
}

pub async fn scrape(http: &reqwest::Client, metrics_url: &str, token: Option<&str>) -> Scrape {
    let mut req = http.get(format!("{metrics_url}/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED => Scrape::Unauthorized,
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            if status == 200 && body.contains(crate::telemetry::families::BUILD_INFO.name) {
                Scrape::Hypertool
            } else {
                Scrape::Other(status)
            }
        }
        Err(e) => Scrape::Unreachable(why(&e)),
    }
}

/// `hypertool serve` processes on this machine (pid, command line), from /proc.
pub fn serve_processes() -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let program = Path::new(args.first()?).file_name()?.to_str()?.to_string();
            (program == "hypertool" && args.iter().any(|a| a == "serve"))
                .then(|| (pid, args.join(" ")))
        })
        .collect()
}

fn load(target: &Target) -> (Source, Result<Config, String>) {
    let source = Source::discover(target.config.as_deref());
    let loaded = config::load(&source).map_err(|errors| {
        let first = errors.0.first().map(|e| e.to_string()).unwrap_or_default();
        format!(
            "{} error(s); first: {}",
            errors.0.len(),
            first.lines().next().unwrap_or("")
        )
    });
    (source, loaded)
}

fn api_url(target: &Target, cfg: Option<&Config>) -> String {
    match (&target.server, cfg) {
        (Some(s), _) => crate::web::server_url(s),
        (None, Some(c)) => format!("http://{}", c.settings.listen),
        (None, None) => "http://127.0.0.1:8080".into(),
    }
}

fn metrics_url(target: &Target, cfg: Option<&Config>) -> String {
    match (&target.metrics, cfg) {
        (Some(s), _) => crate::web::server_url(s),
        (None, Some(c)) => format!("http://{}", c.settings.metrics_listen),
        (None, None) => "http://127.0.0.1:9464".into(),
    }
}

/// The metrics listener a running server reports (`GET /api/server`, with `HYPERTOOL_API_KEY`
/// when set); a wildcard address is reached at the API's host. `None` when it does not say.
async fn listening_metrics(http: &reqwest::Client, api: &str) -> Option<String> {
    let mut req = http.get(format!("{api}/api/server"));
    if let Ok(key) = std::env::var("HYPERTOOL_API_KEY") {
        if !key.is_empty() {
            req = req.bearer_auth(key);
        }
    }
    let body: Value = req
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .json()
        .await
        .ok()?;
    let addr: std::net::SocketAddr = body["metrics_listen"].as_str()?.parse().ok()?;
    if !addr.ip().is_unspecified() {
        return Some(format!("http://{addr}"));
    }
    let host = reqwest::Url::parse(api).ok()?.host_str()?.to_string();
    Some(format!("http://{host}:{}", addr.port()))
}

fn metrics_token(cfg: Option<&Config>) -> Option<String> {
    let env = cfg?.settings.auth.metrics_token.as_ref()?.key_env.clone();
    std::env::var(env).ok()
}

/// Every health check at once.
/// The MCP proxy's downstream servers (`[mcp] servers`): the file checked, then each server
/// started once, its tools listed, and stopped — as `hypertool serve` and `hypertool mcp` would.
async fn mcp_checks(cfg: Option<&Config>, out: &mut Vec<Check>) {
    let Some(path) = cfg.and_then(|c| c.settings.mcp.servers.clone()) else {
        return;
    };
    let trust = cfg
        .map(|c| c.settings.trust.mcp.clone())
        .unwrap_or_default();
    let servers = match crate::mcp::config::load_configured(Some(&path)) {
        Ok(s) => s.trusting(&trust),
        Err(errors) => {
            out.push(Check::new("MCP servers", Status::Fail, errors.to_string()));
            return;
        }
    };
    out.push(Check::new(
        "MCP servers",
        Status::Ok,
        format!("{}: {} server(s)", path.display(), servers.servers.len()),
    ));
    for spec in &servers.servers {
        let what = format!("MCP server {}", spec.name);
        out.push(
            match crate::mcp::downstream::probe(spec, std::time::Duration::from_secs(15)).await {
                Ok(tools) => Check::new(
                    &what,
                    Status::Ok,
                    format!("{}: starts and lists {tools} tools", spec.describe()),
                ),
                Err(why) => Check::new(&what, Status::Fail, format!("{}: {why}", spec.describe())),
            },
        );
    }
    // After the probes: a server that starts may still be shown to nobody.
    if let Some(c) = cfg {
        let names = servers.servers.iter().map(|s| s.name.as_str());
        for server in crate::mcp::toolset::allowed_to_nobody(names, &c.personas) {
            out.push(Check::new(
                &format!("MCP server {server}"),
                Status::Warn,
                format!("allowed to no persona: add \"{server}\" to allowedServers in a persona file, or its tools are shown to nobody"),
            ));
        }
    }
}

pub async fn doctor(target: &Target) -> Vec<Check> {
    let http = client();
    let mut out = Vec::new();
    let (source, loaded) = load(target);
    let cfg = loaded.as_ref().ok();
    configuration(&source, &loaded, &mut out);
    let api = api_url(target, cfg);
    let serving = server(&http, &api, &mut out).await;
    mcp_checks(cfg, &mut out).await;
    if !serving {
        not_serving(target, cfg, &mut out).await;
    }
    // A running server says where its metrics listener is (`--metrics-listen` overrides the file).
    let asked;
    let target = match (&target.metrics, serving) {
        (None, true) => match listening_metrics(&http, &api).await {
            Some(metrics) => {
                asked = Target {
                    config: target.config.clone(),
                    data_dir: target.data_dir.clone(),
                    server: target.server.clone(),
                    metrics: Some(metrics),
                    prometheus: target.prometheus.clone(),
                };
                &asked
            }
            None => target,
        },
        _ => target,
    };
    out.push(metrics(&http, target, cfg).await);
    if let Some(c) = cfg {
        configured(&http, target, c, &mut out).await;
    }
    if let Some(check) = prometheus(&http, target, cfg).await {
        out.push(check);
    }
    out
}

/// Whether the configuration loads.
fn configuration(source: &Source, loaded: &Result<Config, String>, out: &mut Vec<Check>) {
    match &loaded {
        Ok(c) => out.push(Check::new(
            "configuration",
            Status::Ok,
            format!(
                "{} ({} personas, {} budgets, {} workflows)",
                source.describe(),
                c.personas.len(),
                c.budgets.len(),
                c.workflows.workflows.len()
            ),
        )),
        Err(e) => out.push(Check::new(
            "configuration",
            Status::Fail,
            format!(
                "{}: {e} (run `hypertool check` for all of them)",
                source.describe()
            ),
        )),
    }
}

/// The server at `api`: ready, draining, or not answering (its MCP servers' states with it).
/// Whether it serves.
async fn server(http: &reqwest::Client, api: &str, out: &mut Vec<Check>) -> bool {
    match http.get(format!("{api}/readyz")).send().await {
        Ok(r) => {
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            match body["status"].as_str() {
                Some("ready") => {
                    if let Some(servers) = body["mcp_servers"].as_object() {
                        for (name, state) in servers {
                            let state = state.as_str().unwrap_or("?");
                            out.push(Check::new(
                                &format!("MCP server {name} (in the server)"),
                                match state {
                                    "ready" => Status::Ok,
                                    "starting" => Status::Warn,
                                    _ => Status::Fail,
                                },
                                match state {
                                    "ready" => "ready".to_string(),
                                    "starting" => "starting".to_string(),
                                    _ => format!("{state}: being restarted with backoff; the server's log says why"),
                                },
                            ));
                        }
                    }
                    let buffering = body["ledger"] == "buffering";
                    out.push(Check::new(
                        "server",
                        Status::Ok,
                        format!("{api} answers /readyz"),
                    ));
                    out.push(Check::new(
                        "ledger",
                        if buffering { Status::Warn } else { Status::Ok },
                        if buffering {
                            format!(
                                "unavailable, {} events held in memory (on_outage = buffer)",
                                body["held_events"]
                            )
                        } else {
                            "writable".to_string()
                        },
                    ));
                    true
                }
                Some("ledger_unavailable") => {
                    out.push(Check::new(
                        "server",
                        Status::Ok,
                        format!("{api} answers /readyz"),
                    ));
                    out.push(Check::new(
                        "ledger",
                        Status::Fail,
                        format!(
                            "unavailable since {}: {}",
                            body["since"].as_str().unwrap_or("?"),
                            body["reason"].as_str().unwrap_or("?")
                        ),
                    ));
                    true
                }
                // Draining, or not hypertool at all: the checks of a server that is not there.
                Some("draining") => {
                    out.push(Check::new(
                        "server",
                        Status::Fail,
                        format!("{api} is shutting down (draining)"),
                    ));
                    true
                }
                _ => {
                    out.push(Check::new(
                        "server",
                        Status::Fail,
                        format!("{api}/readyz answered {status} without hypertool's readiness: another program holds the address?"),
                    ));
                    false
                }
            }
        }
        Err(e) => {
            let procs = serve_processes();
            out.push(Check::new(
                "server",
                Status::Fail,
                format!(
                    "{api} does not answer ({}); {}",
                    why(&e),
                    if procs.is_empty() {
                        "no `hypertool serve` process on this machine".to_string()
                    } else {
                        format!(
                            "`hypertool serve` runs as pid {}",
                            procs
                                .iter()
                                .map(|p| p.0.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                ),
            ));
            false
        }
    }
}

/// Without a server: whether it could start here (its ports, its ledger, its data directory).
async fn not_serving(target: &Target, cfg: Option<&Config>, out: &mut Vec<Check>) {
    // The ports: free for hypertool to take, or held by something else.
    if let Some(c) = cfg {
        for (what, addr) in [
            ("API port", c.settings.listen),
            ("metrics port", c.settings.metrics_listen),
        ] {
            out.push(match std::net::TcpListener::bind(addr) {
                Ok(_) => Check::new(what, Status::Ok, format!("{addr} is free for hypertool")),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Check::new(
                    what,
                    Status::Fail,
                    format!("{addr} is held by another process (`ss -ltnp 'sport = :{}'` names it): hypertool cannot start there", addr.port()),
                ),
                Err(e) => Check::new(what, Status::Fail, format!("{addr}: {e}")),
            });
        }
    }
    // The ledger as the server would open it.
    match cfg.and_then(|c| c.settings.ledger.url.clone().map(|u| (u, c))) {
        Some((url, c)) => {
            let shown = crate::config::secret::redacted(&url);
            let connector =
                crate::store::postgres::connector(&url, &c.settings, "hypertool-doctor");
            let ok = tokio::task::spawn_blocking(move || {
                let mut connector = connector.map_err(|e| e.to_string())?;
                connector.config.connect_timeout(TIMEOUT);
                connector
                    .connect()
                    .map(|_| ())
                    .map_err(|e| crate::store::postgres::explain(&e))
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            out.push(match ok {
                Ok(()) => Check::new("ledger", Status::Ok, format!("{shown} accepts connections")),
                Err(e) => Check::new("ledger", Status::Fail, format!("{shown}: {e}")),
            });
        }
        None => {
            let db = target.data_dir.join("hypertool.db");
            let probe = target.data_dir.join(".hypertool-doctor");
            let writable = std::fs::create_dir_all(&target.data_dir)
                .and_then(|()| std::fs::write(&probe, b""))
                .map(|()| {
                    let _ = std::fs::remove_file(&probe);
                });
            out.push(match writable {
                Ok(()) => Check::new(
                    "ledger",
                    Status::Ok,
                    format!(
                        "{} is writable{}",
                        target.data_dir.display(),
                        if db.exists() { "" } else { " (no ledger yet)" }
                    ),
                ),
                Err(e) => Check::new(
                    "ledger",
                    Status::Fail,
                    format!(
                        "{} cannot be written: {e}; start with --data-dir on a writable disk",
                        target.data_dir.display()
                    ),
                ),
            });
        }
    }
}

/// The metrics endpoint: answering with hypertool's metrics, or why not.
async fn metrics(http: &reqwest::Client, target: &Target, cfg: Option<&Config>) -> Check {
    let metrics = metrics_url(target, cfg);
    match scrape(http, &metrics, metrics_token(cfg).as_deref()).await {
        Scrape::Hypertool => Check::new("metrics", Status::Ok, format!("{metrics}/metrics answers with hypertool's metrics")),
        Scrape::Unauthorized => Check::new("metrics", Status::Fail, format!("{metrics}/metrics answers 401: set the variable named by server.metrics_bearer_token_env")),
        Scrape::Other(code) => Check::new("metrics", Status::Fail, format!("{metrics}/metrics answers {code} without hypertool's metrics: another process holds the port?")),
        Scrape::Unreachable(e) => Check::new("metrics", Status::Fail, format!("{metrics}/metrics: {e}")),
    }
}
