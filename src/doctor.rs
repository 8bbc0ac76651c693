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

/// Prometheus's view of the job's targets: (scrape URL, health, last error).
pub async fn prometheus_targets(
    http: &reqwest::Client,
    prometheus: &str,
    job: &str,
) -> Result<Vec<(String, String, String)>, String> {
    let url = format!(
        "{}/api/v1/targets?state=active",
        prometheus.trim_end_matches('/')
    );
    let v: Value = http
        .get(&url)
        .send()
        .await
        .map_err(|e| why(&e))?
        .json()
        .await
        .map_err(|e| why(&e))?;
    Ok(v.pointer("/data/activeTargets")
        .and_then(Value::as_array)
        .map(|ts| {
            ts.iter()
                .filter(|t| t.pointer("/labels/job").and_then(Value::as_str) == Some(job))
                .map(|t| {
                    let s = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    (s("scrapeUrl"), s("health"), s("lastError"))
                })
                .collect()
        })
        .unwrap_or_default())
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

/// What the configuration names: upstreams, trace destinations, Alertmanager.
async fn configured(http: &reqwest::Client, target: &Target, c: &Config, out: &mut Vec<Check>) {
    upstreams(http, c, out).await;
    trace_destinations(http, target, c, out).await;
    alertmanager(http, c, out).await;
}

/// Each upstream: its key variable set, its host answering.
async fn upstreams(http: &reqwest::Client, c: &Config, out: &mut Vec<Check>) {
    // Upstreams.
    if c.settings.gateway.upstreams.is_empty() {
        out.push(Check::new(
            "upstreams",
            Status::Info,
            "none configured (mock/… models only)",
        ));
    }
    for (name, u) in &c.settings.gateway.upstreams {
        let key = u.api_key_env.as_ref().and_then(|e| std::env::var(e).ok());
        let mut req = http.get(format!("{}/models", u.base_url.trim_end_matches('/')));
        if let Some(k) = &key {
            req = req.bearer_auth(k);
        }
        let missing_key = u.api_key_env.as_ref().filter(|_| key.is_none());
        out.push(match req.send().await {
            Ok(r) if r.status().is_success() => Check::new(
                &format!("upstream {name}"),
                Status::Ok,
                format!("{} answers", u.base_url),
            ),
            Ok(r) if r.status() == 401 || r.status() == 403 => Check::new(
                &format!("upstream {name}"),
                Status::Fail,
                match missing_key {
                    Some(env) => format!(
                        "{} answers {}: {env} is not set",
                        u.base_url,
                        r.status().as_u16()
                    ),
                    None => format!("{} refuses the key ({})", u.base_url, r.status().as_u16()),
                },
            ),
            // Reachable; not every OpenAI-compatible server lists models.
            Ok(r) => Check::new(
                &format!("upstream {name}"),
                Status::Ok,
                format!(
                    "{} reachable (GET /models: {})",
                    u.base_url,
                    r.status().as_u16()
                ),
            ),
            Err(e) => Check::new(
                &format!("upstream {name}"),
                Status::Fail,
                format!("{}: {}", u.base_url, why(&e)),
            ),
        });
    }
}

/// Where traces go (OTLP, Langfuse): configured as expected, and answering.
async fn trace_destinations(
    http: &reqwest::Client,
    target: &Target,
    c: &Config,
    out: &mut Vec<Check>,
) {
    // Trace destinations.
    let plan = crate::telemetry::trace::Plan::resolve(
        &c.settings.tracing,
        &c.settings.langfuse,
        &target.data_dir,
        &|k| std::env::var(k).ok(),
    );
    if plan.destinations.is_empty() {
        out.push(Check::new(
            "traces",
            if plan.langfuse_missing {
                Status::Fail
            } else {
                Status::Info
            },
            if plan.langfuse_missing {
                format!(
                    "Langfuse is expected but {} not set",
                    plan.langfuse_missing_keys.join(" and ")
                )
            } else {
                "no destination configured".to_string()
            },
        ));
    }
    for d in &plan.destinations {
        if d.name == "langfuse" {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
            let lf = &c.settings.langfuse;
            let host = env("LANGFUSE_HOST").unwrap_or_else(|| lf.host.clone());
            let result = match (env(&lf.public_key_env), env(&lf.secret_key_env)) {
                (Some(pk), Some(sk)) => {
                    crate::server::insight::langfuse_test_call(http, &host, &pk, &sk).await
                }
                _ => crate::runbook::investigate::TestCall::NotTried {
                    why: "a key is not set".into(),
                },
            };
            use crate::runbook::investigate::TestCall;
            out.push(match result {
                TestCall::Accepted => Check::new(
                    "traces langfuse",
                    Status::Ok,
                    format!("{host} accepts the keys"),
                ),
                TestCall::Refused { status } => Check::new(
                    "traces langfuse",
                    Status::Fail,
                    format!(
                        "{host} refuses the keys (HTTP {status}): check {} and {}",
                        lf.public_key_env, lf.secret_key_env
                    ),
                ),
                TestCall::Unreachable { error } => {
                    Check::new("traces langfuse", Status::Fail, format!("{host}: {error}"))
                }
                TestCall::NotTried { why } => Check::new("traces langfuse", Status::Fail, why),
            });
        } else {
            // An empty ExportTraceServiceRequest: accepted by any OTLP/HTTP receiver.
            let mut req = http
                .post(&d.traces_url)
                .header("content-type", "application/x-protobuf")
                .body(Vec::new());
            for (k, v) in &d.headers {
                req = req.header(k, v);
            }
            out.push(match req.send().await {
                Ok(r) if r.status().is_success() => Check::new(
                    "traces otlp",
                    Status::Ok,
                    format!("{} accepts OTLP", d.traces_url),
                ),
                Ok(r) if r.status() == 401 || r.status() == 403 => Check::new(
                    "traces otlp",
                    Status::Fail,
                    format!(
                        "{} refuses the credentials ({}): {}",
                        d.traces_url,
                        r.status().as_u16(),
                        d.auth_fix
                    ),
                ),
                Ok(r) => Check::new(
                    "traces otlp",
                    Status::Fail,
                    format!("{} answers {}", d.traces_url, r.status().as_u16()),
                ),
                Err(e) => Check::new(
                    "traces otlp",
                    Status::Fail,
                    format!("{}: {}", d.traces_url, why(&e)),
                ),
            });
        }
    }
}

/// Alertmanager, when configured: answering its status API.
async fn alertmanager(http: &reqwest::Client, c: &Config, out: &mut Vec<Check>) {
    // Alertmanager.
    match &c.settings.alerts.delivery.alertmanager_url {
        Some(am) => {
            let url = format!("{}/api/v2/status", am.trim_end_matches('/'));
            out.push(match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => {
                    Check::new("alertmanager", Status::Ok, format!("{am} answers"))
                }
                Ok(r) => Check::new(
                    "alertmanager",
                    Status::Fail,
                    format!("{url} answers {}", r.status().as_u16()),
                ),
                Err(e) => Check::new("alertmanager", Status::Fail, format!("{am}: {}", why(&e))),
            });
        }
        None => out.push(Check::new(
            "alertmanager",
            Status::Info,
            "not configured (alerts.alertmanager_url)",
        )),
    }
}

/// Prometheus, when asked: its targets of hypertool's job up.
async fn prometheus(
    http: &reqwest::Client,
    target: &Target,
    cfg: Option<&Config>,
) -> Option<Check> {
    let prom = target.prometheus.as_ref()?;
    let job = cfg.map_or("hypertool".to_string(), |c| c.settings.alerts.job.clone());
    Some(match prometheus_targets(http, prom, &job).await {
        Ok(ts) if ts.is_empty() => Check::new("prometheus", Status::Fail, format!("{prom} has no target of job {job}: add deploy/prometheus/prometheus.yml's scrape job")),
        Ok(ts) => {
            let bad: Vec<_> = ts.iter().filter(|t| t.1 != "up").collect();
            if bad.is_empty() {
                Check::new("prometheus", Status::Ok, format!("{} target(s) of job {job} up", ts.len()))
            } else {
                Check::new("prometheus", Status::Fail, bad.iter().map(|t| format!("{} {}: {}", t.0, t.1, t.2)).collect::<Vec<_>>().join("; "))
            }
        }
        Err(e) => Check::new("prometheus", Status::Fail, format!("{prom}: {e}")),
    })
}

/// The investigation of HypertoolMetricsNotReported, from outside the process.
pub async fn metrics_investigation(target: &Target) -> Report {
    let http = client();
    let (_, loaded) = load(target);
    let cfg = loaded.as_ref().ok();
    let api = api_url(target, cfg);
    let metrics = metrics_url(target, cfg);
    let job = cfg.map_or("hypertool".to_string(), |c| c.settings.alerts.job.clone());
    let mut findings = Vec::new();
    let procs = serve_processes();
    findings.push(Finding {
        check: "process".into(),
        status: if procs.is_empty() {
            Status::Fail
        } else {
            Status::Ok
        },
        found: if procs.is_empty() {
            "no `hypertool serve` process on this machine".into()
        } else {
            procs
                .iter()
                .map(|(pid, cmd)| format!("pid {pid}: {cmd}"))
                .collect::<Vec<_>>()
                .join("; ")
        },
        data: json!(procs
            .iter()
            .map(|(pid, cmd)| json!({"pid": pid, "command": cmd}))
            .collect::<Vec<_>>()),
    });
    let api_up = http
        .get(format!("{api}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    findings.push(Finding {
        check: "API port".into(),
        status: if api_up { Status::Ok } else { Status::Fail },
        found: format!(
            "{api} {}",
            if api_up { "answers" } else { "does not answer" }
        ),
        data: Value::Null,
    });
    let scraped = scrape(&http, &metrics, metrics_token(cfg).as_deref()).await;
    findings.push(Finding {
        check: "metrics endpoint".into(),
        status: if scraped == Scrape::Hypertool {
            Status::Ok
        } else {
            Status::Fail
        },
        found: match &scraped {
            Scrape::Hypertool => format!("{metrics}/metrics answers with hypertool's metrics"),
            Scrape::Unauthorized => {
                format!("{metrics}/metrics answers 401 (bearer token required)")
            }
            Scrape::Other(code) => {
                format!("{metrics}/metrics answers {code}, not hypertool's metrics")
            }
            Scrape::Unreachable(e) => format!("{metrics}/metrics: {e}"),
        },
        data: Value::Null,
    });
    let mut targets = None;
    if let Some(prom) = &target.prometheus {
        let t = prometheus_targets(&http, prom, &job).await;
        findings.push(Finding {
            check: "Prometheus target".into(),
            status: match &t {
                Ok(ts) if !ts.is_empty() && ts.iter().all(|t| t.1 == "up") => Status::Ok,
                _ => Status::Fail,
            },
            found: match &t {
                Ok(ts) if ts.is_empty() => format!("no target of job {job}"),
                Ok(ts) => ts
                    .iter()
                    .map(|t| {
                        format!(
                            "{} {}{}",
                            t.0,
                            t.1,
                            if t.2.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", t.2)
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                Err(e) => format!("{prom}: {e}"),
            },
            data: Value::Null,
        });
        targets = t.ok();
    }
    // The causes, from what was seen.
    let metrics_host = metrics
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_string();
    let scrapes_elsewhere = targets
        .as_ref()
        .is_some_and(|ts| !ts.is_empty() && ts.iter().all(|t| !t.0.contains(&metrics_host)));
    let prom_error = targets
        .as_ref()
        .and_then(|ts| ts.iter().find(|t| t.1 != "up").map(|t| t.2.clone()));
    let scored = [
        (
            "Process crash",
            if procs.is_empty() && !api_up {
                1.0
            } else {
                0.0
            },
            format!(
                "{} serve process(es); API {}",
                procs.len(),
                if api_up { "up" } else { "down" }
            ),
        ),
        (
            "Port conflict",
            match (&scraped, procs.is_empty()) {
                (Scrape::Other(_), _) => 0.9,
                (Scrape::Unreachable(_), false) => 0.6,
                _ => 0.0,
            },
            match &scraped {
                Scrape::Other(code) => {
                    format!("the metrics port answers {code} without hypertool's metrics")
                }
                Scrape::Unreachable(_) if !procs.is_empty() => {
                    "hypertool runs but its metrics port does not answer".into()
                }
                _ => "the metrics port is hypertool's or free".into(),
            },
        ),
        (
            "Network issue",
            if scraped == Scrape::Hypertool && prom_error.is_some() {
                0.9
            } else {
                0.0
            },
            match &prom_error {
                Some(e) => format!("the endpoint answers here; Prometheus: {e}"),
                None => {
                    "Prometheus reports no scrape error (or was not asked: --prometheus)".into()
                }
            },
        ),
        (
            "Metrics disabled",
            if scraped == Scrape::Unauthorized || scrapes_elsewhere {
                0.9
            } else {
                0.0
            },
            if scraped == Scrape::Unauthorized {
                "the endpoint wants a bearer token".into()
            } else if scrapes_elsewhere {
                format!("Prometheus scrapes another address than {metrics_host}")
            } else {
                "the endpoint is open and Prometheus scrapes it".into()
            },
        ),
    ];
    let specs = crate::runbook::investigate::causes_of(AlertId::HypertoolMetricsNotReported);
    let mut causes: Vec<Cause> = specs
        .iter()
        .map(|s| {
            let (score, evidence) = scored
                .iter()
                .find(|(n, ..)| *n == s.name)
                .map(|(_, sc, e)| (*sc, e.clone()))
                .unwrap_or((0.0, String::new()));
            Cause {
                cause: s.name,
                score,
                prior: s.prior,
                indicator: s.indicator,
                evidence,
                fix: s.fix,
            }
        })
        .collect();
    causes.sort_by(|a, b| b.score.total_cmp(&a.score));
    Report {
        alert: AlertId::HypertoolMetricsNotReported.name(),
        at: crate::core::clock::to_rfc3339(chrono::Utc::now().timestamp_millis()),
        window: "now".into(),
        findings,
        causes,
        notes: Vec::new(),
    }
}
