//! Where the MCP proxy's facts go and where its switches are decided: in this process (the
//! server's engine and ledger — `hypertool serve`'s `/mcp`, or `hypertool mcp` with a ledger of its
//! own) or at a running `hypertool serve` (`hypertool mcp --server URL`, with the persona key from
//! the environment), through the same API every agent uses.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::core::clock::Clock;
use crate::core::event::{Event, McpToolCall, Stamped};
use crate::core::persona::{Persona, PersonaRegistry};
use crate::store::writer::lock;
use crate::switchboard::Switchboard;

/// Most tool-call events waiting for a remote server; past it they are dropped and counted.
const REMOTE_QUEUE: usize = 10_000;
/// Most events in one `POST /v1/events`.
const REMOTE_BATCH: usize = 500;
const REMOTE_TIMEOUT: Duration = Duration::from_secs(10);

/// The proxy's side of the core.
#[derive(Clone)]
pub enum Hub {
    Local(Switchboard),
    Remote(Arc<Remote>),
}

/// A running `hypertool serve`.
pub struct Remote {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
    personas: PersonaRegistry,
    clock: Arc<dyn Clock>,
    events: mpsc::Sender<Value>,
    /// Tool-call events dropped because the server could not take them fast enough.
    dropped: std::sync::atomic::AtomicU64,
    /// The last failure to deliver events (for the log, once per change).
    last_failure: Mutex<Option<String>>,
    /// Events queued or being sent (for [`Hub::flush`]).
    pending: std::sync::atomic::AtomicUsize,
}

impl Hub {
    /// A hub for a running server at `base` (`http://host:port`); `personas` from the local
    /// configuration (the toolsets are decided here). Starts the event sender on this runtime.
    pub fn remote(
        base: &str,
        key: Option<String>,
        personas: PersonaRegistry,
        clock: Arc<dyn Clock>,
    ) -> Result<Hub, String> {
        let http = reqwest::Client::builder()
            .timeout(REMOTE_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let (tx, rx) = mpsc::channel(REMOTE_QUEUE);
        let remote = Arc::new(Remote {
            base: crate::web::server_url(base),
            key,
            http,
            personas,
            clock,
            events: tx,
            dropped: std::sync::atomic::AtomicU64::new(0),
            last_failure: Mutex::new(None),
            pending: std::sync::atomic::AtomicUsize::new(0),
        });
        tokio::spawn(send_events(remote.clone(), rx));
        Ok(Hub::Remote(remote))
    }

    /// The key's persona at the server, for a persona key (`GET /v1/whoami`); `None` for a local
    /// hub, or a key of another role.
    pub async fn key_persona(&self) -> Result<Option<String>, String> {
        let Hub::Remote(r) = self else {
            return Ok(None);
        };
        let body = r
            .call(r.http.get(format!("{}/v1/whoami", r.base)), "the key")
            .await?;
        Ok(body["persona"].as_str().map(str::to_string))
    }

    pub fn now_ms(&self) -> i64 {
        match self {
            Hub::Local(s) => s.clock.now_ms(),
            Hub::Remote(r) => r.clock.now_ms(),
        }
    }

    /// Every persona (canonical names, in the configuration's order).
    pub fn personas(&self) -> Vec<Persona> {
        match self {
            Hub::Local(s) => lock(&s.engine).personas().iter().cloned().collect(),
            Hub::Remote(r) => r.personas.iter().cloned().collect(),
        }
    }

    /// The persona `name` (canonical or alias) stands for.
    pub fn persona(&self, name: &str) -> Option<Persona> {
        match self {
            Hub::Local(s) => lock(&s.engine).personas().get(name).cloned(),
            Hub::Remote(r) => r.personas.get(name).cloned(),
        }
    }

    /// Decides and records a switch; the answer is the switch API's (`persona` is the persona in
    /// force). `Err` says why nothing was decided.
    pub async fn switch(&self, session: &str, to: &str, chatmode: &str) -> Result<Value, String> {
        match self {
            Hub::Local(s) => s
                .switch(session, to, chatmode)
                .await
                .map_err(|e| format!("the switch could not be recorded: {e}")),
            Hub::Remote(r) => {
                let switch = r
                    .http
                    .post(format!("{}/v1/personas/switch", r.base))
                    .json(&json!({"session": session, "to": to, "chatmode": chatmode}));
                r.call(switch, "the switch").await
            }
        }
    }

    /// Waits until the events recorded so far are delivered (a remote hub; a local one stores
    /// them through the writer, which the server drains at shutdown), at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let Hub::Remote(r) = self else {
            return;
        };
        let deadline = tokio::time::Instant::now() + limit;
        while r.pending.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(server = %r.base, events = r.pending.load(std::sync::atomic::Ordering::SeqCst),
                    "tool-call events not delivered before exit");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Records a tool call; never waits (a local append is queued, a remote one batched).
    pub async fn record(&self, at: i64, call: McpToolCall) {
        match self {
            Hub::Local(s) => {
                s.writer
                    .append_accounting(
                        vec![Stamped {
                            at,
                            event: Event::McpToolCall(call),
                        }],
                        |result| {
                            if let Err(e) = result {
                                tracing::error!("a tool call could not be recorded: {e}");
                            }
                        },
                    )
                    .await;
            }
            Hub::Remote(r) => {
                let event = json!({
                    "type": "mcp_tool_call",
                    "session": call.session,
                    "persona": call.persona,
                    "server": call.server,
                    "tool": call.tool,
                    "result": call.result.as_str(),
                    "duration_seconds": call.duration_seconds,
                    "timestamp": crate::core::clock::to_rfc3339(at),
                });
                r.pending.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if r.events.try_send(event).is_err() {
                    r.pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    let n = r.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n == 0 {
                        tracing::warn!(server = %r.base, "tool-call events are dropped: the server does not take them as fast as they come");
                    }
                }
            }
        }
    }
}

impl Remote {
    /// Sends `req` with the key; the answer's JSON on success, else why (`what` names the request).
    async fn call(&self, mut req: reqwest::RequestBuilder, what: &str) -> Result<Value, String> {
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{} cannot be reached: {}", self.base, without_url(&e)))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!(
                "{} refused {what} ({status}): {}",
                self.base,
                body["error"]["message"].as_str().unwrap_or("no message")
            ))
        }
    }
}

/// A reqwest error's text without the URL (it is logged separately; it may carry a key in a
/// query one day).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "(url)");
    }
    s
}

/// Sends queued tool-call events to the server in batches; a batch the server cannot take now is
/// retried with backoff (the queue behind it is bounded: see [`REMOTE_QUEUE`]).
async fn send_events(remote: Arc<Remote>, mut rx: mpsc::Receiver<Value>) {
    let mut batch: Vec<Value> = Vec::new();
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(e) => batch.push(e),
                None => return,
            }
        }
        while batch.len() < REMOTE_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut req = remote
                .http
                .post(format!("{}/v1/events", remote.base))
                .json(&json!({ "events": batch }));
            if let Some(key) = &remote.key {
                req = req.bearer_auth(key);
            }
            let failure = match req.send().await {
                Ok(resp) if resp.status().is_success() => None,
                // A refused event will not be taken later either: said once, not retried.
                Ok(resp) if resp.status().is_client_error() => {
                    let status = resp.status();
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    tracing::error!(server = %remote.base, %status, "the server refused tool-call events: {}",
                        body["error"]["message"].as_str().unwrap_or("no message"));
                    None
                }
                Ok(resp) => Some(format!("answered {}", resp.status())),
                Err(e) => Some(without_url(&e)),
            };
            {
                let mut last = remote
                    .last_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match failure {
                    None => {
                        *last = None;
                        break;
                    }
                    Some(why) => {
                        if last.as_deref() != Some(why.as_str()) {
                            tracing::warn!(server = %remote.base, events = batch.len(),
                                "tool-call events not delivered yet ({why}); retrying");
                        }
                        *last = Some(why);
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        remote
            .pending
            .fetch_sub(batch.len(), std::sync::atomic::Ordering::SeqCst);
        batch.clear();
    }
}
