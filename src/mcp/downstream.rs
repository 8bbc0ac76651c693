//! The downstream MCP servers, started and kept running: one supervisor task per server connects
//! (starts the command, or opens the HTTP endpoint), lists its tools, and waits; when the server
//! exits or the connection drops it is restarted with backoff (0.5 s doubling to 30 s, back to
//! 0.5 s after a minute up). A server that announces `notifications/tools/list_changed` is listed
//! again. Every change of what is available bumps a watch, so sessions can tell their clients.
//!
//! Calls go to the server's live connection with the server's timeout; a server that is down is
//! an error the caller sees at once, never a wait.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation,
    JsonObject, Tool,
};
use rmcp::service::{NotificationContext, Peer, RoleClient, RunningService};
use rmcp::{ClientHandler, ServiceExt};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::config::{McpServers, ServerSpec, Transport};

/// Longest a connection (process start + `initialize`) or a tool listing may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Up this long, a server's next failure starts the backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Lines of a stdio server's stderr kept for its health (the reason it failed, usually).
const STDERR_LINES: usize = 5;
const STDERR_LINE_BYTES: usize = 500;
/// Most tools kept per server (a misbehaving server cannot grow the proxy's memory without bound).
const MAX_TOOLS: usize = 1000;

/// What a server is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Starting,
    Ready,
    Down,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Ready => "ready",
            Status::Down => "down",
        }
    }
}

/// One server's health, for `/readyz`, the metrics and the proxy's answers.
#[derive(Debug, Clone)]
pub struct ServerHealth {
    pub name: String,
    pub status: &'static str,
    /// Times it went down after having been up, or failed to start.
    pub restarts: u64,
    pub last_error: Option<String>,
}

struct Link {
    status: Status,
    peer: Option<Peer<RoleClient>>,
    tools: Arc<Vec<Tool>>,
    last_error: Option<String>,
}

/// One downstream server and its live connection.
pub struct Downstream {
    pub spec: ServerSpec,
    link: RwLock<Link>,
    restarts: AtomicU64,
    stderr: Mutex<VecDeque<String>>,
}

impl Downstream {
    fn link(&self) -> std::sync::RwLockReadGuard<'_, Link> {
        self.link.read().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, f: impl FnOnce(&mut Link)) {
        f(&mut self.link.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// `why`, with the last lines the server wrote to its stderr (usually the reason).
    fn explained(&self, why: String) -> String {
        let lines = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        if lines.is_empty() {
            return why;
        }
        let tail: Vec<&str> = lines.iter().map(String::as_str).collect();
        format!("{why}; stderr: {}", tail.join(" | "))
    }

    /// Down (counted as a restart), for `why`.
    fn mark_down(&self, why: String) {
        self.set(|l| {
            l.status = Status::Down;
            l.peer = None;
            l.last_error = Some(why);
        });
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a call did not reach an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    UnknownServer,
    /// Not connected now (starting, or restarting after a failure).
    NotReady(String),
    Timeout(Duration),
    /// The server answered with a protocol error, or the connection failed mid-call.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::UnknownServer => write!(f, "no such server"),
            CallError::NotReady(why) => write!(
                f,
                "the server is not running now ({why}); it is being restarted, try again shortly"
            ),
            CallError::Timeout(t) => {
                write!(f, "the server did not answer within {} s", t.as_secs_f64())
            }
            CallError::Failed(why) => write!(f, "{why}"),
        }
    }
}

impl Downstream {
    fn new(spec: ServerSpec) -> Downstream {
        Downstream {
            spec,
            link: RwLock::new(Link {
                status: Status::Starting,
                peer: None,
                tools: Arc::new(Vec::new()),
                last_error: None,
            }),
            restarts: AtomicU64::new(0),
            stderr: Mutex::new(VecDeque::new()),
        }
    }
}

/// Starts `spec` once, as the supervisor would, lists its tools and stops it: `hypertool doctor`'s
/// check of a downstream server. The number of tools, or why not (with its stderr's last lines).
pub async fn probe(spec: &ServerSpec, limit: Duration) -> Result<usize, String> {
    let server = Arc::new(Downstream::new(spec.clone()));
    let (refresh, _ignored) = mpsc::channel(1);
    let attempt = async {
        let running = connect(&server, Listener { refresh }).await?;
        let tools = list_tools(running.peer()).await;
        let _ = running.cancel().await;
        tools.map(|t| t.len())
    };
    let outcome = match tokio::time::timeout(limit, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "did not start and list its tools within {} s",
            limit.as_secs()
        )),
    };
    outcome.map_err(|why| server.explained(why))
}

/// All downstream servers.
pub struct Downstreams {
    servers: Vec<Arc<Downstream>>,
    changed: watch::Sender<u64>,
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl Downstreams {
    /// Starts a supervisor per server (on the current runtime) and returns at once.
    pub fn start(specs: &McpServers) -> Arc<Downstreams> {
        let (changed, _) = watch::channel(0u64);
        let this = Arc::new(Downstreams {
            servers: specs
                .servers
                .iter()
                .map(|spec| Arc::new(Downstream::new(spec.clone())))
                .collect(),
            changed,
            stop: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
        });
        for server in &this.servers {
            let (server, changed, stop) = (server.clone(), this.changed.clone(), this.stop.clone());
            this.tasks.spawn(supervise(server, changed, stop));
        }
        this
    }

    /// Bumped whenever a server's tools appear, change or go away.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The tools of every server that is up, by server.
    pub fn tools(&self) -> BTreeMap<String, Arc<Vec<Tool>>> {
        self.servers
            .iter()
            .filter_map(|s| {
                let link = s.link();
                (link.status == Status::Ready).then(|| (s.spec.name.clone(), link.tools.clone()))
            })
            .collect()
    }

    pub fn health(&self) -> Vec<ServerHealth> {
        self.servers
            .iter()
            .map(|s| {
                let link = s.link();
                ServerHealth {
                    name: s.spec.name.clone(),
                    status: link.status.as_str(),
                    restarts: s.restarts.load(Ordering::Relaxed),
                    last_error: link.last_error.clone(),
                }
            })
            .collect()
    }

    /// Waits until every server is up or has failed at least once, at most `limit`.
    pub async fn settled(&self, limit: Duration) {
        let mut rx = self.subscribe();
        let _ = tokio::time::timeout(limit, async {
            loop {
                let starting = self
                    .servers
                    .iter()
                    .any(|s| s.link().status == Status::Starting);
                if !starting || rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Calls `tool` on `server` with the server's timeout.
    pub async fn call(
        &self,
        server: &str,
        tool: &str,
        arguments: Option<JsonObject>,
    ) -> Result<CallToolResult, CallError> {
        let s = self
            .servers
            .iter()
            .find(|s| s.spec.name == server)
            .ok_or(CallError::UnknownServer)?;
        let peer = {
            let link = s.link();
            match (&link.peer, link.status) {
                (Some(peer), Status::Ready) => peer.clone(),
                _ => {
                    return Err(CallError::NotReady(
                        link.last_error
                            .clone()
                            .unwrap_or_else(|| link.status.as_str().to_string()),
                    ))
                }
            }
        };
        let mut params = CallToolRequestParams::new(tool.to_string());
        if let Some(args) = arguments {
            params = params.with_arguments(args);
        }
        match tokio::time::timeout(s.spec.call_timeout, peer.call_tool(params)).await {
            Err(_) => Err(CallError::Timeout(s.spec.call_timeout)),
            Ok(Err(e)) => Err(CallError::Failed(e.to_string())),
            Ok(Ok(result)) => Ok(result),
        }
    }

    /// Stops every server (stdio children are killed) and waits for the supervisors.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

/// Hears a server's `notifications/tools/list_changed`.
struct Listener {
    refresh: mpsc::Sender<()>,
}

impl ClientHandler for Listener {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("hypertool", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn on_tool_list_changed(&self, _: NotificationContext<RoleClient>) {
        let _ = self.refresh.try_send(());
    }
}

async fn connect(
    server: &Arc<Downstream>,
    listener: Listener,
) -> Result<RunningService<RoleClient, Listener>, String> {
    match &server.spec.transport {
        Transport::Stdio {
            command,
            args,
            env,
            cwd,
        } => {
            let mut cmd = tokio::process::Command::new(command);
            cmd.args(args).envs(env);
            if let Some(dir) = cwd {
                cmd.current_dir(dir);
            }
            let (transport, stderr) = rmcp::transport::TokioChildProcess::builder(cmd)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start `{command}`: {e}"))?;
            if let Some(stderr) = stderr {
                keep_stderr(server.clone(), stderr);
            }
            listener
                .serve(transport)
                .await
                .map_err(|e| format!("did not complete the MCP handshake: {e}"))
        }
        Transport::Http {
            url,
            headers,
            trust,
        } => {
            let mut custom = std::collections::HashMap::new();
            for (k, v) in headers {
                let name = http::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("header name `{k}` is not valid"))?;
                // The value is a secret as often as not: never in the message.
                let value = http::HeaderValue::from_str(v).map_err(|_| {
                    format!("the value of header `{k}` is not a valid header value")
                })?;
                custom.insert(name, value);
            }
            let config = rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(url.clone())
                .custom_headers(custom);
            // rmcp's client is reqwest 0.13; it gets the same rustls configuration as every
            // other outbound client (webpki roots + the configured CA).
            let client = reqwest013::Client::builder()
                .tls_backend_preconfigured(trust.client_config()?)
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
            let transport =
                rmcp::transport::StreamableHttpClientTransport::with_client(client, config);
            listener
                .serve(transport)
                .await
                .map_err(|e| format!("did not complete the MCP handshake: {e}"))
        }
    }
}

/// Keeps the last lines of a stdio server's stderr (each logged at debug) for its health.
fn keep_stderr(server: Arc<Downstream>, stderr: tokio::process::ChildStderr) {
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut line = line.trim_end().to_string();
            if line.is_empty() {
                continue;
            }
            if line.len() > STDERR_LINE_BYTES {
                let mut cut = STDERR_LINE_BYTES;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
                line.push('…');
            }
            tracing::debug!(server = %server.spec.name, "{line}");
            let mut kept = server.stderr.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() == STDERR_LINES {
                kept.pop_front();
            }
            kept.push_back(line);
        }
    });
}

async fn supervise(server: Arc<Downstream>, changed: watch::Sender<u64>, stop: CancellationToken) {
    let bump = || changed.send_modify(|n| *n += 1);
    let mut backoff = FIRST_BACKOFF;
    loop {
        server.set(|l| l.status = Status::Starting);
        server
            .stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let (refresh_tx, mut refresh_rx) = mpsc::channel(1);
        let listener = Listener {
            refresh: refresh_tx,
        };
        let attempt = async {
            let running = connect(&server, listener).await?;
            let tools = list_tools(running.peer()).await?;
            Ok::<_, String>((running, tools))
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, attempt) => r.unwrap_or_else(|_| Err(format!("did not start within {} s", CONNECT_TIMEOUT.as_secs()))),
            _ = stop.cancelled() => return,
        };
        match outcome {
            Ok((running, tools)) => {
                let up_since = Instant::now();
                let peer = running.peer().clone();
                tracing::info!(server = %server.spec.name, tools = tools.len(), target = %server.spec.describe(), "MCP server ready");
                server.set(|l| {
                    l.status = Status::Ready;
                    l.peer = Some(peer.clone());
                    l.tools = Arc::new(tools);
                    l.last_error = None;
                });
                bump();
                let cancel = running.cancellation_token();
                let ended = running.waiting();
                tokio::pin!(ended);
                let why = loop {
                    tokio::select! {
                        r = &mut ended => break match r {
                            Ok(reason) => format!("the connection ended ({reason:?})"),
                            Err(e) => format!("the connection failed: {e}"),
                        },
                        Some(()) = refresh_rx.recv() => {
                            if let Ok(tools) = list_tools(&peer).await {
                                tracing::info!(server = %server.spec.name, tools = tools.len(), "MCP server's tools changed");
                                server.set(|l| l.tools = Arc::new(tools));
                                bump();
                            }
                        }
                        _ = stop.cancelled() => {
                            cancel.cancel();
                            let _ = tokio::time::timeout(Duration::from_secs(5), &mut ended).await;
                            server.set(|l| { l.status = Status::Down; l.peer = None; });
                            return;
                        }
                    }
                };
                let why = server.explained(why);
                tracing::warn!(server = %server.spec.name, "MCP server went down: {why}; restarting");
                server.mark_down(why);
                bump();
                if up_since.elapsed() >= HEALTHY_AFTER {
                    backoff = FIRST_BACKOFF;
                }
            }
            Err(why) => {
                let why = server.explained(why);
                tracing::warn!(server = %server.spec.name, target = %server.spec.describe(),
                    retry_in_ms = backoff.as_millis() as u64, "MCP server failed to start: {why}");
                server.mark_down(why);
                bump();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn list_tools(peer: &Peer<RoleClient>) -> Result<Vec<Tool>, String> {
    let mut tools = tokio::time::timeout(CONNECT_TIMEOUT, peer.list_all_tools())
        .await
        .map_err(|_| "did not list its tools in time".to_string())?
        .map_err(|e| format!("could not list its tools: {e}"))?;
    tools.truncate(MAX_TOOLS);
    Ok(tools)
}
