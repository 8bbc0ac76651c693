//! One MCP session of the proxy: what `tools/list` shows (hypertool's own tools and the persona's
//! downstream tools), where `tools/call` goes, and the persona in force.
//!
//! ```text
//! tools/list  → list-personas, equip-persona, current-persona + the persona's downstream tools
//! tools/call  → built-in: answered here · allowed: the downstream server (its timeout) · else refused
//!               every call, whatever its outcome, becomes an `mcp_tool_call` event (the hub)
//! equip-persona → the switch policy (cooldown, oscillation) through the hub; on a switch
//!               `notifications/tools/list_changed`, also when a downstream server's tools change
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{NotificationContext, Peer, RequestContext, RoleServer};
use rmcp::{ErrorData as McpError, ServerHandler};
use serde_json::{json, Value};

use super::config::BUILTIN_SERVER;
use super::downstream::{CallError, Downstreams};
use super::hub::Hub;
use super::toolset::{self, Allowance, Exposed, SEPARATOR};
use crate::core::event::{McpToolCall, ToolCallResult};

pub const LIST_PERSONAS: &str = "list-personas";
pub const EQUIP_PERSONA: &str = "equip-persona";
pub const CURRENT_PERSONA: &str = "current-persona";

/// What every session of one proxy shares.
pub struct Proxy {
    pub hub: Hub,
    pub downstreams: Arc<Downstreams>,
    pub default_chatmode: String,
    /// Sessions alive now (HTTP sessions end on DELETE or after 5 minutes idle).
    live: Arc<AtomicUsize>,
}

/// Most MCP sessions one proxy keeps at once: each holds a little state and a task, and keys
/// open them at will.
pub const MAX_SESSIONS: usize = 1000;

/// How a session begins.
#[derive(Debug, Clone, Default)]
pub struct SessionStart {
    /// The session id in events and the ledger (random when not given).
    pub id: Option<String>,
    /// The persona in force from the start (recorded as a switch when the client is initialized).
    pub persona: Option<String>,
    /// A persona key's persona: the only one this session may equip.
    pub locked_to: Option<String>,
    pub chatmode: Option<String>,
}

/// One client's session (cloned by the SDK per request; the state is shared).
#[derive(Clone)]
pub struct McpSession {
    proxy: Arc<Proxy>,
    state: Arc<SessionState>,
}

struct SessionState {
    id: String,
    chatmode: String,
    /// A persona key's persona: the only one this session may equip.
    locked_to: Mutex<Option<String>>,
    /// Over HTTP, the key that opened the session (`None` inside: an admin key, or no keys
    /// configured); another key may not use it.
    owner: Mutex<Option<Option<String>>>,
    /// The persona in force (canonical), as the switch policy last answered.
    persona: Mutex<Option<String>>,
    /// Recorded as the session's first switch once the client is initialized.
    initial: Mutex<Option<String>>,
    /// Cancelled when the session ends: its watcher of the downstream servers stops.
    ended: tokio_util::sync::CancellationToken,
    live: Arc<AtomicUsize>,
}

impl Drop for SessionState {
    fn drop(&mut self) {
        self.ended.cancel();
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Proxy {
    pub fn new(hub: Hub, downstreams: Arc<Downstreams>, default_chatmode: String) -> Proxy {
        Proxy {
            hub,
            downstreams,
            default_chatmode,
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Hands the proxy's state to the exposition: sessions open, and each downstream server's
    /// health and restarts.
    pub fn register_metrics(self: &Arc<Self>, registry: &crate::telemetry::registry::Registry) {
        use crate::telemetry::families as f;
        let proxy = self.clone();
        registry.collect(&f::MCP_SESSIONS_OPEN, move |emit| {
            emit(&[], proxy.sessions() as f64)
        });
        let proxy = self.clone();
        registry.collect(&f::MCP_SERVER_UP, move |emit| {
            for h in proxy.downstreams.health() {
                emit(&[&h.name], if h.status == "ready" { 1.0 } else { 0.0 });
            }
        });
        let proxy = self.clone();
        registry.collect(&f::MCP_SERVER_RESTARTS_TOTAL, move |emit| {
            for h in proxy.downstreams.health() {
                emit(&[&h.name], h.restarts as f64);
            }
        });
    }

    /// MCP sessions alive now.
    pub fn sessions(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// A new session for the streamable HTTP endpoint, unless [`MAX_SESSIONS`] are open.
    pub fn http_session(self: &Arc<Self>) -> Result<McpSession, std::io::Error> {
        if self.live.load(Ordering::SeqCst) >= MAX_SESSIONS {
            return Err(std::io::Error::other(format!(
                "{MAX_SESSIONS} MCP sessions are open: end idle ones (DELETE /mcp) or wait for them to expire (5 minutes idle)"
            )));
        }
        Ok(self.session(SessionStart::default()))
    }

    pub fn session(self: &Arc<Self>, start: SessionStart) -> McpSession {
        self.live.fetch_add(1, Ordering::SeqCst);
        let canonical =
            |p: Option<String>| p.map(|p| self.hub.persona(&p).map(|x| x.name).unwrap_or(p));
        let persona = canonical(start.persona.or_else(|| start.locked_to.clone()));
        McpSession {
            proxy: self.clone(),
            state: Arc::new(SessionState {
                id: start.id.unwrap_or_else(|| {
                    format!(
                        "mcp-{}",
                        &crate::telemetry::trace::ids::TraceId::random().hex()[..16]
                    )
                }),
                chatmode: start
                    .chatmode
                    .unwrap_or_else(|| self.default_chatmode.clone()),
                locked_to: Mutex::new(canonical(start.locked_to)),
                owner: Mutex::new(None),
                initial: Mutex::new(persona.clone()),
                ended: tokio_util::sync::CancellationToken::new(),
                live: self.live.clone(),
                persona: Mutex::new(persona),
            }),
        }
    }
}

/// A lock that a panic elsewhere did not poison for good (the state stays consistent: every
/// critical section here is a plain read or write).
fn held<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn text_result(value: &Value, is_error: bool) -> CallToolResult {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    let mut result = if is_error {
        CallToolResult::error(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(text)])
    };
    result.structured_content = Some(value.clone());
    result
}

fn object_schema(properties: Value, required: &[&str]) -> Arc<serde_json::Map<String, Value>> {
    let schema = json!({"type": "object", "properties": properties, "required": required});
    Arc::new(schema.as_object().cloned().unwrap_or_default())
}

fn builtin_tools() -> Vec<Tool> {
    vec![
        Tool::new(
            LIST_PERSONAS,
            "The personas this proxy knows, each with the MCP servers its toolset draws on; marks the one in force.",
            object_schema(json!({}), &[]),
        ),
        Tool::new(
            EQUIP_PERSONA,
            "Switch this session to another persona: its tools replace the current ones. The switch policy applies (a cooldown after a switch, A→B→A→B oscillation); the answer names the persona in force.",
            object_schema(
                json!({"persona": {"type": "string", "description": "The persona to equip (name or alias, see list-personas)."}}),
                &["persona"],
            ),
        ),
        Tool::new(
            CURRENT_PERSONA,
            "The persona in force in this session and the tools it exposes.",
            object_schema(json!({}), &[]),
        ),
    ]
}

impl McpSession {
    /// Over HTTP, the API's door has decided who calls (`Caller`, in the request's parts): a
    /// persona key's session is that persona's (it starts in it and cannot equip another), and a
    /// session belongs to the key that opened it. Over stdio there are no parts: nothing to do.
    fn adopt_caller(&self, extensions: &rmcp::model::Extensions) -> Result<(), McpError> {
        use crate::web::auth::Caller;
        let Some(caller) = extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Caller>())
        else {
            return Ok(());
        };
        let who = match caller {
            Caller::Persona(key) => Some(
                self.proxy
                    .hub
                    .persona(&key.persona)
                    .map(|p| p.name)
                    .unwrap_or_else(|| key.persona.clone()),
            ),
            _ => None,
        };
        let mut owner = held(&self.state.owner);
        match &*owner {
            Some(o) if *o == who => Ok(()),
            Some(_) => Err(McpError::invalid_request(
                "this MCP session was opened with another key; open a session of your own",
                None,
            )),
            None => {
                *owner = Some(who.clone());
                if let Some(p) = who {
                    *held(&self.state.locked_to) = Some(p.clone());
                    let mut persona = held(&self.state.persona);
                    if persona.is_none() {
                        *persona = Some(p.clone());
                        *held(&self.state.initial) = Some(p);
                    }
                }
                Ok(())
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.state.id
    }

    pub fn persona(&self) -> Option<String> {
        held(&self.state.persona).clone()
    }

    fn set_persona(&self, p: Option<String>) {
        *held(&self.state.persona) = p;
    }

    /// The downstream tools the persona in force sees now.
    fn exposure(
        &self,
    ) -> (
        Vec<Exposed>,
        std::collections::BTreeMap<String, Arc<Vec<Tool>>>,
    ) {
        let allowance = self
            .persona()
            .and_then(|p| self.proxy.hub.persona(&p))
            .map(|p| Allowance::of(&p))
            .unwrap_or_else(Allowance::none);
        let tools = self.proxy.downstreams.tools();
        let names = tools
            .iter()
            .map(|(s, t)| (s.clone(), t.iter().map(|t| t.name.to_string()).collect()))
            .collect();
        (toolset::expose(&allowance, &names), tools)
    }

    /// Records a call made under `persona` (the one in force when it was made: an
    /// `equip-persona` belongs to the persona it leaves).
    async fn record(
        &self,
        persona: &Option<String>,
        (server, tool): (&str, &str),
        result: ToolCallResult,
        started: Instant,
        at: i64,
    ) {
        // The client names the tool: a name the events API would refuse (empty, over 200 bytes,
        // control characters) is counted as `invalid`, never put on a label as it is.
        let tool = crate::core::labels::check_name(crate::core::labels::NameField::Tool, tool)
            .unwrap_or("invalid");
        let call = McpToolCall {
            session: Some(self.state.id.clone()),
            persona: persona.clone().unwrap_or_else(|| "none".into()),
            server: server.to_string(),
            tool: tool.to_string(),
            result,
            duration_seconds: started.elapsed().as_secs_f64(),
        };
        self.proxy.hub.record(at, call).await;
    }

    /// Records the persona given at the start as the session's first switch.
    async fn record_initial(&self) {
        let initial = held(&self.state.initial).take();
        if let Some(p) = initial {
            match self
                .proxy
                .hub
                .switch(&self.state.id, &p, &self.state.chatmode)
                .await
            {
                Ok(answer) => {
                    if let Some(inforce) = answer["persona"].as_str() {
                        self.set_persona(Some(inforce.to_string()));
                    }
                }
                Err(e) => {
                    tracing::warn!(session = %self.state.id, persona = %p, "the session's persona could not be recorded: {e}")
                }
            }
        }
    }

    /// Tells the client when what it may call changes (a downstream server up, down, or with new
    /// tools). Ends with the session.
    fn watch_downstreams(&self, peer: Peer<RoleServer>) {
        let state: Weak<SessionState> = Arc::downgrade(&self.state);
        let proxy = self.proxy.clone();
        let mut rx = proxy.downstreams.subscribe();
        let mut shown: Vec<String> = self.exposure().0.into_iter().map(|e| e.name).collect();
        let ended = self.state.ended.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = ended.cancelled() => return,
                }
                let Some(state) = state.upgrade() else {
                    return;
                };
                let session = McpSession {
                    proxy: proxy.clone(),
                    state,
                };
                let now: Vec<String> = session.exposure().0.into_iter().map(|e| e.name).collect();
                if now != shown {
                    shown = now;
                    if peer.notify_tool_list_changed().await.is_err() {
                        return;
                    }
                }
            }
        });
    }

    async fn builtin(
        &self,
        name: &str,
        args: Option<&serde_json::Map<String, Value>>,
        peer: &Peer<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        match name {
            LIST_PERSONAS => {
                let current = self.persona();
                let personas: Vec<Value> = self
                    .proxy
                    .hub
                    .personas()
                    .iter()
                    .map(|p| {
                        let servers: Vec<String> =
                            Allowance::of(p).servers().map(str::to_string).collect();
                        json!({
                            "name": p.name,
                            "display_name": p.display_name,
                            "description": p.description,
                            "servers": servers,
                            "current": current.as_deref() == Some(p.name.as_str()),
                        })
                    })
                    .collect();
                Ok(text_result(
                    &json!({"current": current, "personas": personas}),
                    false,
                ))
            }
            CURRENT_PERSONA => {
                let tools: Vec<String> = self.exposure().0.into_iter().map(|e| e.name).collect();
                Ok(text_result(
                    &json!({
                        "session": self.state.id,
                        "persona": self.persona(),
                        "chatmode": self.state.chatmode,
                        "tools": tools,
                    }),
                    false,
                ))
            }
            _ => {
                let Some(wanted) = args.and_then(|a| a.get("persona")).and_then(Value::as_str)
                else {
                    return Err(McpError::invalid_params(
                        "equip-persona needs {\"persona\": \"name\"} (see list-personas)",
                        None,
                    ));
                };
                let Some(persona) = self.proxy.hub.persona(wanted) else {
                    let known: Vec<String> = self
                        .proxy
                        .hub
                        .personas()
                        .into_iter()
                        .map(|p| p.name)
                        .collect();
                    return Err(McpError::invalid_params(
                        format!(
                            "unknown persona `{}`; known: {}",
                            wanted.chars().take(200).collect::<String>(),
                            known.join(", ")
                        ),
                        None,
                    ));
                };
                let locked = held(&self.state.locked_to).clone();
                if let Some(own) = locked {
                    if own != persona.name {
                        return Err(McpError::invalid_params(
                            format!("this session's key belongs to persona `{own}`; it cannot equip `{}`", persona.name),
                            None,
                        ));
                    }
                }
                let before = self.persona();
                let answer = self
                    .proxy
                    .hub
                    .switch(&self.state.id, &persona.name, &self.state.chatmode)
                    .await
                    .map_err(|e| McpError::internal_error(e, None))?;
                let inforce = answer["persona"].as_str().map(str::to_string);
                if inforce.is_some() {
                    self.set_persona(inforce.clone());
                }
                if inforce != before {
                    // The client's tool list is stale now.
                    let _ = peer.notify_tool_list_changed().await;
                }
                let refused = answer["switched"] == false && answer["reason"] != "already_current";
                Ok(text_result(&answer, refused))
            }
        }
    }
}

impl ServerHandler for McpSession {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new("hypertool", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "hypertool: the tools of the persona in force. list-personas shows the personas, \
             equip-persona switches (a cooldown applies), current-persona says which is in force.",
        )
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        if let Err(e) = self.adopt_caller(&context.extensions) {
            tracing::warn!(session = %self.state.id, "{}", e.message);
            return;
        }
        self.record_initial().await;
        self.watch_downstreams(context.peer);
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        self.adopt_caller(&context.extensions)?;
        let mut tools = builtin_tools();
        let (exposed, downstream) = self.exposure();
        for e in exposed {
            if let Some(tool) = downstream
                .get(&e.server)
                .and_then(|list| list.iter().find(|t| t.name == e.tool.as_str()))
            {
                let mut tool = tool.clone();
                tool.name = e.name.into();
                tools.push(tool);
            }
        }
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        self.adopt_caller(&context.extensions)?;
        let started = Instant::now();
        let at = self.proxy.hub.now_ms();
        let name = request.name.to_string();
        let persona = self.persona();
        if matches!(
            name.as_str(),
            LIST_PERSONAS | EQUIP_PERSONA | CURRENT_PERSONA
        ) {
            let outcome = self
                .builtin(&name, request.arguments.as_ref(), &context.peer)
                .await;
            let result = match &outcome {
                Ok(r) if r.is_error == Some(true) => ToolCallResult::Error,
                Ok(_) => ToolCallResult::Ok,
                Err(_) => ToolCallResult::Error,
            };
            self.record(&persona, (BUILTIN_SERVER, &name), result, started, at)
                .await;
            return outcome.map(Into::into);
        }
        let (exposed, _) = self.exposure();
        if let Some(e) = exposed.iter().find(|e| e.name == name) {
            let outcome = self
                .proxy
                .downstreams
                .call(&e.server, &e.tool, request.arguments)
                .await;
            let (result, answer) = match outcome {
                Ok(r) if r.is_error == Some(true) => (ToolCallResult::Error, r),
                Ok(r) => (ToolCallResult::Ok, r),
                Err(err) => (
                    ToolCallResult::Error,
                    CallToolResult::error(vec![ContentBlock::text(format!(
                        "{} on server `{}`: {err}",
                        e.tool, e.server
                    ))]),
                ),
            };
            self.record(&persona, (&e.server, &e.tool), result, started, at)
                .await;
            return Ok(answer.into());
        }
        // Not in the persona's toolset. Name the server when the name says it; a tool the persona
        // may use on a server that is down now is an error, not a refusal.
        let health = self.proxy.downstreams.health();
        let named = name
            .split_once(SEPARATOR)
            .and_then(|(s, t)| health.iter().find(|h| h.name == s).map(|h| (h, t)));
        let (server, tool) = match named {
            Some((h, t)) => (h.name.clone(), t.to_string()),
            None => ("unknown".to_string(), name.clone()),
        };
        let down = named.filter(|(h, t)| {
            h.status != "ready"
                && persona
                    .as_ref()
                    .and_then(|p| self.proxy.hub.persona(p))
                    .is_some_and(|p| Allowance::of(&p).allows(&h.name, t))
        });
        if let Some((h, _)) = down {
            let why = h.last_error.clone().unwrap_or_else(|| "starting".into());
            self.record(
                &persona,
                (&server, &tool),
                ToolCallResult::Error,
                started,
                at,
            )
            .await;
            return Ok(CallToolResult::error(vec![ContentBlock::text(
                CallError::NotReady(why).to_string(),
            )])
            .into());
        }
        self.record(
            &persona,
            (&server, &tool),
            ToolCallResult::Refused,
            started,
            at,
        )
        .await;
        let shown: String = name.chars().take(200).collect();
        let message = match persona {
            None => format!(
                "tool `{shown}` is not available: no persona is equipped in this session; call `{EQUIP_PERSONA}` (see `{LIST_PERSONAS}`)"
            ),
            Some(p) => format!(
                "tool `{shown}` is not available to persona `{p}` (its allowedServers and allowedTools do not include it); `{LIST_PERSONAS}` shows which persona has which servers, `{EQUIP_PERSONA}` switches"
            ),
        };
        Err(McpError::invalid_params(message, None))
    }
}
