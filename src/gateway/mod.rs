//! The OpenAI-compatible gateway: `POST /v1/chat/completions` (plain and SSE streaming) and
//! `GET /v1/models` in front of any OpenAI-compatible upstream, every call attributed to a persona.
//!
//! A call goes (`chat_completions`): authenticate (virtual key, required off loopback) → attribute (key, then
//! `X-Hypertool-*` headers) → route the model → admission (`Engine::admit` reserves the estimated
//! tokens; `block` budgets refuse with 429) → upstream → usage (the upstream's, else estimated with
//! tiktoken) → a usage event through the ledger writer → release the reservation. The upstream call
//! and its accounting run in a task of their own, so a client that goes away never leaves a call
//! unaccounted.

pub mod cache;
pub mod client;
pub mod ratelimit;
pub mod request;
pub mod stage;
pub mod tokens;
pub mod upstream;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::config::gateway::{GatewaySettings, ModelRoute, VirtualKey};
use crate::core::engine::{Admission, CallClaim, Engine, Refusal, StageClaim, StageHold};
use crate::core::event::{Event, GateResult, GateVerdictEvent, Stamped, Usage};
use crate::core::policy;
use crate::core::workflow::GateVerdict;
use crate::core::workflow::Workflows;
use crate::server::AppState;
use crate::store::writer::lock;
use crate::web::auth::Caller;
use crate::web::error::ApiError;
use request::header;
use upstream::{Completion, UpstreamError};

/// Gateway configuration (hot-reloaded) and its HTTP client.
pub struct Gateway {
    settings: RwLock<Arc<GatewaySettings>>,
    workflows: RwLock<Arc<Workflows>>,
    http: client::UpstreamClient,
    outcomes: Mutex<BTreeMap<String, BTreeMap<&'static str, u64>>>,
    tools_removed: Mutex<BTreeMap<String, u64>>,
    /// (workflow, stage) → (prompts cut, tokens removed)
    truncations: Mutex<BTreeMap<(String, String), (u64, u64)>>,
    pub cache: cache::ResponseCache,
    /// Requests and tokens per minute per key and per persona.
    pub limits: ratelimit::RateLimiters,
    /// Bounds calls in flight to upstreams (`gateway.max_in_flight`, fixed at start-up).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Calls waiting for an in-flight slot (at most `max_in_flight`; more are refused at once).
    waiting: std::sync::atomic::AtomicUsize,
    /// Upstream failures are logged once per model and kind every few seconds, not per call.
    warnings: WarnThrottle,
}

/// How often the same kind of upstream failure of the same model is logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Lets a repeated warning through once per [`WARN_EVERY`] per (model, kind), saying how many like
/// it were held back since: an upstream outage at 1,000 calls/s must not write 1,000 log lines a
/// second (the metrics count every failure). Keys are configured models and static kinds: bounded.
#[derive(Default)]
struct WarnThrottle {
    /// (model, kind) → (when last logged, how many held back since)
    last: Mutex<std::collections::HashMap<WarningKey, (Instant, u64)>>,
}

type WarningKey = (String, &'static str);

impl WarnThrottle {
    /// `Some(held back since the last one)` when this warning should be logged now.
    fn admit(&self, model: &str, kind: &'static str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(&(model.to_string(), kind)) {
            Some((at, held)) if now.duration_since(*at) < WARN_EVERY => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let since = std::mem::take(held);
                *at = now;
                Some(since)
            }
            None => {
                last.insert((model.to_string(), kind), (now, 0));
                Some(0)
            }
        }
    }
}

impl Gateway {
    pub fn new(
        settings: GatewaySettings,
        workflows: Workflows,
        clock: Arc<dyn crate::core::clock::Clock>,
    ) -> Self {
        Gateway {
            limits: ratelimit::RateLimiters::new(clock),
            workflows: RwLock::new(Arc::new(workflows)),
            cache: cache::ResponseCache::new(settings.cache.max_entries),
            in_flight: Arc::new(tokio::sync::Semaphore::new(settings.max_in_flight)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            http: client::UpstreamClient::new(&settings.extra_roots),
            settings: RwLock::new(Arc::new(settings)),
            outcomes: Mutex::new(BTreeMap::new()),
            warnings: WarnThrottle::default(),
            tools_removed: Mutex::new(BTreeMap::new()),
            truncations: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn settings(&self) -> Arc<GatewaySettings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn reconfigure(&self, settings: GatewaySettings, workflows: Workflows) {
        if settings.extra_roots != self.settings().extra_roots {
            tracing::warn!(
                "gateway.ca_file changed; its certificates are trusted from the next restart"
            );
        }
        self.cache.resize(settings.cache.max_entries);
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
        *self.workflows.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(workflows);
    }

    /// Workflows and chatmodes (hot-reloaded with the rest of the configuration).
    pub fn workflows(&self) -> Arc<Workflows> {
        self.workflows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn count_truncation(&self, workflow: &str, stage: &str, t: &tokens::Truncation) {
        let mut map = self.truncations.lock().unwrap_or_else(|p| p.into_inner());
        let slot = map
            .entry((workflow.to_string(), stage.to_string()))
            .or_insert((0, 0));
        slot.0 += 1;
        slot.1 += t.tokens_before.saturating_sub(t.tokens_after);
    }

    /// ((workflow, stage), prompts cut, tokens removed)
    pub fn truncations(&self) -> Vec<((String, String), f64, f64)> {
        self.truncations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, (n, t))| (k.clone(), *n as f64, *t as f64))
            .collect()
    }

    fn count_tools(&self, persona: &str, n: u64) {
        let mut m = self.tools_removed.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: only personas of the registry reach this (others have no allowedTools).
        *m.entry(persona.to_string()).or_insert(0) += n;
    }

    pub fn tools_removed(&self) -> Vec<(String, f64)> {
        self.tools_removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, n)| (p.clone(), *n as f64))
            .collect()
    }

    fn count(&self, upstream: &str, outcome: &'static str) {
        let mut m = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        // Look up by &str first: the common case allocates nothing.
        match m.get_mut(upstream) {
            Some(by_outcome) => *by_outcome.entry(outcome).or_insert(0) += 1,
            None => {
                m.entry(upstream.to_string())
                    .or_default()
                    .insert(outcome, 1);
            }
        }
    }

    /// `hypertool_gateway_requests_total{upstream,outcome}`; upstream names come from configuration.
    pub fn outcomes(&self) -> Vec<((String, String), f64)> {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flat_map(|(u, by)| {
                by.iter()
                    .map(move |(o, n)| ((u.clone(), o.to_string()), *n as f64))
            })
            .collect()
    }
}

/// Holds reserved tokens until dropped, so every exit path gives them back.
struct Reservation {
    engine: Arc<Mutex<Engine>>,
    persona: String,
    tokens: u64,
    /// USD held against a cost budget.
    cost: f64,
    /// Tokens held against the run's stage budget.
    stage: Option<StageHold>,
    /// The in-flight slot, released with the reservation.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut engine = lock(&self.engine);
        engine.release(&self.persona, self.tokens, self.cost);
        if let Some(hold) = &self.stage {
            engine.release_stage(hold);
        }
    }
}

impl Reservation {
    /// Admission for one call of `meta` (see [`Engine::admit_call`]): reserves `estimate` tokens
    /// and `cost` USD for the persona and, in a run, the tokens against the stage's budget. Returns
    /// the reservation (given back when dropped), whether a `downgrade` budget asks for the
    /// cheaper model, and whether this call must start its stage; or the refusal.
    fn take(
        state: &AppState,
        meta: &CallMeta,
        estimate: u64,
        cost: f64,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(Reservation, bool, bool), Refusal> {
        let stage = meta.stage_call.as_ref().and_then(|c| {
            c.run.as_deref().map(|run| StageClaim {
                run,
                workflow: &c.workflow.name,
                stage: &c.stage.name,
                budget_tokens: c.stage.budget_tokens,
            })
        });
        let claim = CallClaim {
            persona: &meta.persona,
            estimate,
            cost_estimate: cost,
            stage,
        };
        let admitted = lock(&state.engine).admit_call(&claim, state.clock.now_ms())?;
        let reservation = Reservation {
            engine: state.engine.clone(),
            persona: meta.persona.clone(),
            tokens: admitted.reserved,
            cost: admitted.reserved_cost,
            stage: admitted.stage,
            _permit: permit,
        };
        Ok((reservation, admitted.downgrade, admitted.start_stage))
    }
}

/// The key's and the persona's rates: 429 `rate_limited` with `Retry-After` when one is passed.
fn rate_check(
    state: &AppState,
    key: Option<&VirtualKey>,
    meta: &CallMeta,
    tokens: u64,
) -> Result<(), ApiError> {
    let canonical = lock(&state.engine)
        .personas()
        .canonical(&meta.persona)
        .to_string();
    state
        .gateway
        .limits
        .check(key, &canonical, tokens)
        .map_err(|r| {
            state.gateway.count(&meta.route.upstream, "rate_limited");
            let what = r.kind.as_str();
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limited",
                match r.retry_after {
                    Some(_) => format!(
                        "{} may make {} {what} per minute; retry later",
                        r.scope, r.per_minute
                    ),
                    None => format!(
                        "this call needs about {tokens} tokens, more than the {} tokens per minute {} may use; send a smaller prompt or max_tokens",
                        r.per_minute, r.scope
                    ),
                },
            );
            e.retry_after_secs = r.retry_after.map(|d| d.as_secs_f64().ceil().max(1.0) as u64);
            e
        })
}

/// Stores the `stage_started` of a run stage's first call (admission chose this call); when it
/// cannot be stored, the next call of the stage starts it instead.
async fn start_run_stage(state: &AppState, meta: &CallMeta) -> Result<(), ApiError> {
    let Some((call, run)) = meta
        .stage_call
        .as_ref()
        .and_then(|c| c.run.as_ref().map(|r| (c, r)))
    else {
        return Ok(());
    };
    let persona = lock(&state.engine)
        .personas()
        .canonical(&meta.persona)
        .to_string();
    let event = Stamped {
        at: state.clock.now_ms(),
        event: Event::StageStarted {
            run: run.clone(),
            workflow: call.workflow.name.clone(),
            stage: call.stage.name.clone(),
            persona: Some(persona),
        },
    };
    if let Err(e) = state.writer.append(vec![event]).await {
        lock(&state.engine).forget_stage_start(run, &call.stage.name);
        return Err(e.into());
    }
    Ok(())
}

/// Who a call is for and what it asked.
#[derive(Clone)]
struct CallMeta {
    persona: String,
    chatmode: String,
    workflow: Option<String>,
    stage: Option<String>,
    session: Option<String>,
    route: Arc<ModelRoute>,
    /// Prompt tokens as admission estimated them (tiktoken when a budget enforces, else rough).
    prompt_estimate: u64,
    /// The configured workflow stage the call is for, if any.
    stage_call: Option<Arc<stage::StageCall>>,
}

impl CallMeta {
    fn run(&self) -> Option<String> {
        self.stage_call.as_ref().and_then(|c| c.run.clone())
    }
}

/// Prompt tokens of a request counted with the real tokenizer (when the upstream reports none).
fn counted_prompt(request: &Map<String, Value>) -> u64 {
    request
        .get("messages")
        .and_then(Value::as_array)
        .map(|m| tokens::count_messages(m))
        .unwrap_or(0)
}

/// The route for `model`, if it exists and the key (if any) may use it.
fn allowed_route(
    state: &AppState,
    settings: &GatewaySettings,
    key: Option<&VirtualKey>,
    model: &str,
) -> Result<Arc<ModelRoute>, ApiError> {
    let Some(route) = settings.route(model) else {
        state.gateway.count("-", "model_not_found");
        let mut known: Vec<&str> = settings.models.iter().map(|m| m.name.as_str()).collect();
        known.push("mock/<anything>");
        return Err(ApiError::not_found(
            "model_not_found",
            format!(
                "the model `{model}` does not exist here; available: {}",
                known.join(", ")
            ),
        )
        .param("model"));
    };
    if let Some(k) = key {
        if !k.models.is_empty() && !k.models.contains(&route.name) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "model_not_allowed",
                format!(
                    "this gateway key may not use `{}`; allowed: {}",
                    route.name,
                    k.models.join(", ")
                ),
            )
            .param("model"));
        }
    }
    Ok(route)
}

/// The persona a call is for (see [`policy::attribute`]).
fn attributed_persona(
    settings: &GatewaySettings,
    headers: &HeaderMap,
    key: Option<&VirtualKey>,
) -> String {
    policy::attribute(
        key.map(|k| k.persona.as_str()),
        header(headers, "x-hypertool-persona").as_deref(),
        &settings.unattributed_persona,
    )
}

impl CallMeta {
    /// Attribution from the `X-Hypertool-*` headers.
    fn new(
        settings: &GatewaySettings,
        headers: &HeaderMap,
        persona: String,
        route: Arc<ModelRoute>,
        prompt_estimate: u64,
    ) -> Self {
        CallMeta {
            persona,
            chatmode: header(headers, "x-hypertool-chatmode")
                .unwrap_or_else(|| settings.default_chatmode.clone()),
            workflow: header(headers, "x-hypertool-workflow"),
            stage: header(headers, "x-hypertool-stage"),
            session: header(headers, "x-hypertool-session"),
            route,
            prompt_estimate,
            stage_call: None,
        }
    }
}

fn gateway_error(e: &UpstreamError) -> ApiError {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    ApiError::new(status, "upstream_error", e.code(), e.message())
}

fn usage_of(v: &Value) -> Option<(u64, u64)> {
    let u = v.get("usage")?;
    Some((
        u.get("prompt_tokens")?.as_u64()?,
        u.get("completion_tokens")?.as_u64()?,
    ))
}

/// The usage event of one answered attempt.
fn usage_event(
    state: &AppState,
    meta: &CallMeta,
    prompt: u64,
    completion: u64,
    estimated: bool,
    started: Instant,
) -> Stamped {
    let event = Event::Usage(Usage {
        run: meta.run(),
        persona: meta.persona.clone(),
        chatmode: meta.chatmode.clone(),
        model: meta.route.name.clone(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        workflow: meta.workflow.clone(),
        stage: meta.stage.clone(),
        session: meta.session.clone(),
        cost_usd: meta.route.prices.map(|p| p.cost(prompt, completion)),
        duration_seconds: Some(started.elapsed().as_secs_f64()),
        estimated,
    });
    Stamped {
        at: state.clock.now_ms(),
        event,
    }
}

/// Hands usage events of answered calls to the ledger writer with the reservations they settle.
/// The writer gives those back once the usage is applied (so admission never sees the tokens
/// neither reserved nor used), and nothing has to wake this task for it. A ledger failure is
/// logged and counted but the answer has gone to the client: the tokens were spent upstream, and a
/// retry would spend them twice.
async fn store_usage(
    state: &AppState,
    persona: &str,
    events: Vec<Stamped>,
    settles: Vec<Reservation>,
) {
    let n = events.len();
    let stats = state.stats.clone();
    let persona = persona.to_string();
    state
        .writer
        .append_accounting(events, move |result| {
            if let Err(e) = result {
                stats.reject("ledger_unavailable", n as u64);
                tracing::error!(persona = %persona, calls = n,
                    "usage of answered calls could not be stored: {e}");
            }
            drop(settles);
        })
        .await;
}

/// Stores the call's usage and then gives back its reservation (see [`store_usage`]).
async fn record(
    state: &AppState,
    meta: &CallMeta,
    usage: (u64, u64),
    estimated: bool,
    started: Instant,
    settles: Reservation,
) {
    let event = usage_event(state, meta, usage.0, usage.1, estimated, started);
    store_usage(state, &meta.persona, vec![event], vec![settles]).await;
}

pub async fn list_models(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let settings = state.gateway.settings();
    let key = caller.persona_key();
    let mut data: Vec<Value> = Vec::new();
    for m in &settings.models {
        for name in std::iter::once(&m.name).chain(m.aliases.iter()) {
            if key.is_some_and(|k| !k.models.is_empty() && !k.models.contains(&m.name)) {
                continue;
            }
            data.push(json!({"id": name, "object": "model", "created": 0, "owned_by": m.upstream}));
        }
    }
    data.push(json!({"id": "mock/default", "object": "model", "created": 0, "owned_by": "hypertool-mock"}));
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let settings = state.gateway.settings();
    let body = body.map_err(|r| ApiError::from_body_rejection(r, state.max_body_bytes))?;
    let key = caller.persona_key();
    request::check_headers(&headers)?;
    let mut request = ApiError::json_object(&body)?;
    let model = request::model(&request)?;
    if !request.get("messages").is_some_and(Value::is_array) {
        return Err(ApiError::bad_request(
            "missing_messages",
            "`messages` is required (an array of {role, content})",
        )
        .param("messages"));
    }
    let mut notes: Vec<(&'static str, String)> = Vec::new();
    let chatmode = header(&headers, "x-hypertool-chatmode")
        .unwrap_or_else(|| settings.default_chatmode.clone());
    let (workflow_name, stage_call) = stage::resolve(&state, &headers, &chatmode)?;
    // A stage that sets a model (or tier) decides the model: the runbook's STAGE_MODEL_MAPPING.
    let stage_model = stage_call
        .as_ref()
        .and_then(|c| c.stage.model.as_ref())
        .and_then(|choice| settings.resolve_choice(choice));
    let decision = policy::choose_model(&model, stage_model.as_deref().map(|r| r.name.as_str()))
        .map_err(policy_error)?;
    if let Some(replaced) = decision.replaced {
        notes.push(("x-hypertool-stage-model", replaced));
    }
    let model = decision.model;
    // The stage's prompt limit: the oldest non-system messages go first (`truncate_context`).
    if let Some(c) = stage_call.as_ref() {
        if let (Some(max), Some(Value::Array(msgs))) =
            (c.stage.max_prompt_tokens, request.get_mut("messages"))
        {
            match tokens::truncate_messages(msgs, max) {
                Ok(None) => {}
                Ok(Some(t)) => {
                    state
                        .gateway
                        .count_truncation(&c.workflow.name, &c.stage.name, &t);
                    tracing::info!(workflow = %c.workflow.name, stage = %c.stage.name,
                        removed = t.removed_messages, before = t.tokens_before, after = t.tokens_after,
                        "prompt cut to the stage's max_prompt_tokens");
                    notes.push((
                        "x-hypertool-truncated",
                        format!(
                            "{} messages removed; prompt {} -> {} tokens (max_prompt_tokens {max})",
                            t.removed_messages, t.tokens_before, t.tokens_after
                        ),
                    ));
                }
                Err(tokens) => {
                    return Err(ApiError::bad_request(
                        "context_length_exceeded",
                        format!(
                            "the system messages and the last message alone are {tokens} tokens, over the max_prompt_tokens of {max} of stage `{}` in workflow `{}`; shorten them or raise the limit",
                            c.stage.name, c.workflow.name
                        ),
                    )
                    .param("messages"));
                }
            }
        }
    }
    let messages: &[Value] = request
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let route = allowed_route(&state, &settings, key, &model)?;
    let persona = attributed_persona(&settings, &headers, key);
    // Tokenizing costs more than the rest of the call's bookkeeping: do it only when a budget
    // enforces (the persona's in block or downgrade mode, or the run stage's budget); otherwise a
    // rough count is enough to reserve with.
    let stage_budgeted = stage_call
        .as_ref()
        .is_some_and(|c| c.run.is_some() && c.stage.budget_tokens.is_some());
    let precise = stage_budgeted || lock(&state.engine).enforces(&persona);
    let prompt_estimate = if precise {
        tokens::count_messages(messages)
    } else {
        tokens::rough_count_messages(messages)
    };
    let max_tokens = request
        .get("max_completion_tokens")
        .or_else(|| request.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let mut meta = CallMeta::new(&settings, &headers, persona, route, prompt_estimate);
    meta.workflow = workflow_name;
    meta.stage_call = stage_call;
    // Tool scope: tools the persona's allowedTools does not list are removed (or refused).
    if let Some(tools) = request.get("tools").and_then(Value::as_array) {
        let allowed = lock(&state.engine)
            .personas()
            .get(&meta.persona)
            .map(|p| p.allowed_tools.clone())
            .unwrap_or_default();
        let scope = policy::scope_tools(&meta.persona, tools, &allowed, settings.tool_policy);
        if let Err(policy::PolicyRefusal::ToolsNotAllowed { tools, .. }) = &scope {
            state.gateway.count_tools(&meta.persona, tools.len() as u64);
        }
        if let policy::ToolScope::Filtered { keep, removed } = scope.map_err(policy_error)? {
            state
                .gateway
                .count_tools(&meta.persona, removed.len() as u64);
            tracing::info!(persona = %meta.persona, tools = %removed.join(","), "tools outside the persona's allowedTools removed");
            notes.push(("x-hypertool-tools-removed", removed.join(",")));
            if keep.is_empty() {
                request.remove("tools");
                request.remove("tool_choice");
            } else {
                request.insert("tools".into(), Value::Array(keep));
            }
        }
    }

    // The cache answers before admission: a hit spends no budget.
    let no_cache = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-cache") || v.contains("no-store"));
    let cache_key = cache::ResponseCache::key(&settings.cache, &meta.route.name, &request);
    let streamed = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let cache_result = match (&cache_key, no_cache) {
        (None, _) => cache::CacheResult::Skip,
        (Some(_), true) => cache::CacheResult::Bypass,
        (Some(key), false) => match state.gateway.cache.get(key, state.clock.now_ms()) {
            Some(entry) => {
                state.gateway.cache.count(
                    cache::CacheResult::Hit,
                    entry.prompt_tokens + entry.completion_tokens,
                );
                state.gateway.count(&meta.route.upstream, "cache_hit");
                let wants_usage = request
                    .get("stream_options")
                    .and_then(|o| o.get("include_usage"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let mut resp = if streamed {
                    cached_stream(&entry, wants_usage)
                } else {
                    json_bytes(entry.response.clone())
                };
                response_headers(&mut resp, &meta);
                resp.headers_mut()
                    .insert("x-hypertool-cache", HeaderValue::from_static("hit"));
                return Ok(resp);
            }
            None => cache::CacheResult::Miss,
        },
    };
    state.gateway.cache.count(cache_result, 0);
    notes.push(("x-hypertool-cache", cache_result.as_str().to_string()));
    let mut cache_slot = match (cache_result, cache_key) {
        (cache::CacheResult::Miss | cache::CacheResult::Bypass, Some(key)) => {
            let ttl = settings
                .cache
                .ttl_for(&meta.persona, &meta.chatmode, &meta.route.name);
            Some((key, ttl))
        }
        _ => None,
    };

    rate_check(
        &state,
        key,
        &meta,
        prompt_estimate.saturating_add(max_tokens),
    )?;
    let permit = acquire_slot(&state, &settings, &meta.route.upstream).await?;

    // Admission: the persona's budgets and the run's stage budget reserved together; a spent
    // `block` budget refuses. The first call of a stage starts it.
    let estimate = prompt_estimate.saturating_add(max_tokens);
    let cost_estimate = cost_of(&meta.route, prompt_estimate, max_tokens);
    let (reservation, downgraded, start_stage) =
        Reservation::take(&state, &meta, estimate, cost_estimate, Some(permit)).map_err(
            |refusal| {
                state.gateway.count(&meta.route.upstream, "budget_exceeded");
                refused(&refusal, estimate, cost_estimate)
            },
        )?;
    if start_stage {
        start_run_stage(&state, &meta).await?;
    }
    if downgraded {
        let canonical = lock(&state.engine)
            .personas()
            .canonical(&meta.persona)
            .to_string();
        let target = policy::downgrade_target(
            &canonical,
            &meta.route.name,
            &settings.persona_downgrade,
            meta.route.downgrade_to.as_deref(),
        )
        .and_then(|t| settings.route(t));
        match target {
            Some(cheaper) if cheaper.name != meta.route.name => {
                tracing::info!(persona = %canonical, from = %meta.route.name, to = %cheaper.name, "budget spent: call downgraded");
                notes.push((
                    "x-hypertool-downgraded",
                    format!("{} -> {}", meta.route.name, cheaper.name),
                ));
                state.gateway.count(&cheaper.upstream, "downgraded");
                cache_slot = None;
                meta.route = cheaper;
            }
            _ => tracing::warn!(persona = %canonical, model = %meta.route.name,
                "budget spent in downgrade mode but no cheaper model is configured (gateway.downgrade or the model's downgrade_to); the call goes through unchanged"),
        }
    }

    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let started = Instant::now();
    let mut resp = if stream {
        stream_call(state, settings, meta, request, reservation, started).await?
    } else {
        plain_call(
            state,
            settings,
            meta,
            request,
            reservation,
            started,
            cache_slot,
        )
        .await?
    };
    for (name, value) in notes {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    Ok(resp)
}

fn response_headers(resp: &mut Response, meta: &CallMeta) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&meta.persona) {
        h.insert("x-hypertool-persona", v);
    }
    if let Ok(v) = HeaderValue::from_str(&meta.route.name) {
        h.insert("x-hypertool-model", v);
    }
}

fn timeout_of(settings: &GatewaySettings, route: &ModelRoute) -> Duration {
    route
        .timeout
        .or_else(|| settings.upstreams.get(&route.upstream).map(|u| u.timeout))
        .unwrap_or(Duration::from_secs(120))
}

fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "chatcmpl-ht{:x}{:06x}",
        chrono::Utc::now().timestamp_millis(),
        SEQ.fetch_add(1, Ordering::Relaxed) & 0xff_ffff
    )
}

/// The route and then its fallbacks, in order.
fn candidates(settings: &GatewaySettings, route: &Arc<ModelRoute>) -> Vec<Arc<ModelRoute>> {
    let mut out = vec![route.clone()];
    for name in &route.fallbacks {
        if let Some(r) = settings.route(name) {
            if !out.iter().any(|o| o.name == r.name) {
                out.push(r);
            }
        }
    }
    out
}

/// One attempt at one route, without retries.
async fn attempt_plain(
    state: &AppState,
    settings: &GatewaySettings,
    route: &ModelRoute,
    body: &Map<String, Value>,
) -> Result<Completion, UpstreamError> {
    if route.upstream == "mock" {
        tokio::time::sleep(settings.mock.latency).await;
        let (value, _, _) = upstream::mock_completion(
            &settings.mock,
            body,
            &route.name,
            &new_id(),
            chrono::Utc::now().timestamp(),
        );
        return Completion::parse("mock", Bytes::from(value.to_string()));
    }
    match settings.upstreams.get(&route.upstream) {
        Some(u) => {
            upstream::complete(&state.gateway.http, u, body, timeout_of(settings, route)).await
        }
        None => Err(UpstreamError::Unreachable {
            upstream: route.upstream.clone(),
        }),
    }
}

/// Tries the route with retries (429, 5xx, connection errors; exponential backoff, honouring
/// `Retry-After`), then each fallback the same way. Returns the route that answered.
async fn call_with_fallbacks(
    state: &AppState,
    settings: &GatewaySettings,
    route: &Arc<ModelRoute>,
    request: &mut Map<String, Value>,
) -> Result<(Arc<ModelRoute>, Completion), UpstreamError> {
    let mut last = None;
    for (i, candidate) in candidates(settings, route).into_iter().enumerate() {
        if i > 0 {
            state.gateway.count(&candidate.upstream, "fallback");
            tracing::warn!(from = %route.name, to = %candidate.name, "falling back to the next model");
        }
        // The model is set in place for each candidate: no copy of the (possibly large) request.
        request.insert(
            "model".into(),
            Value::String(candidate.upstream_model.clone()),
        );
        let body = &*request;
        let mut backoff = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            match attempt_plain(state, settings, &candidate, body).await {
                Ok(v) => return Ok((candidate, v)),
                Err(e) if e.retryable() && attempt < candidate.retries => {
                    attempt += 1;
                    state.gateway.count(&candidate.upstream, "retry");
                    let wait = e
                        .retry_after()
                        .map(|r| r.min(Duration::from_secs(10)))
                        .unwrap_or(backoff)
                        .max(backoff);
                    tracing::info!(model = %candidate.name, attempt, wait_ms = wait.as_millis() as u64, "{}; retrying", e.message());
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or(UpstreamError::Unreachable {
        upstream: route.upstream.clone(),
    }))
}

/// What the call task hands back to the handler.
struct Answer {
    meta: CallMeta,
    /// The upstream's bytes, forwarded as they are.
    body: Bytes,
    /// The gate's verdict on the answer, when the call's stage has a gate.
    verdict: Option<GateVerdict>,
    attempts: u32,
}

/// The cost of a call of `prompt` + `completion` tokens on `route` (0 without prices).
fn cost_of(route: &ModelRoute, prompt: u64, completion: u64) -> f64 {
    route.prices.map_or(0.0, |p| p.cost(prompt, completion))
}

/// The answer to a call the policy refused.
fn policy_error(refusal: policy::PolicyRefusal) -> ApiError {
    match refusal {
        policy::PolicyRefusal::AutoWithoutStage => ApiError::bad_request(
            "model_auto_without_stage",
            "`\"model\": \"auto\"` takes the model of the call's workflow stage; send X-Hypertool-Workflow and X-Hypertool-Stage for a stage whose configuration sets `model`, or name a model",
        )
        .param("model"),
        policy::PolicyRefusal::ToolsNotAllowed { persona, tools } => ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "tool_not_allowed",
            format!(
                "persona `{persona}` may not use the tools {}: they are not in its allowedTools",
                tools.join(", ")
            ),
        )
        .param("tools"),
    }
}

/// The answer to a call admission refused: 429 for a spent budget (what is spent, what calls in
/// flight hold, what this call needs, and when the period resets), 409 for a run that has ended.
fn refused(refusal: &Refusal, estimate: u64, cost_estimate: f64) -> ApiError {
    let blocked = match refusal {
        Refusal::Budget(blocked) => blocked,
        Refusal::StageBudget {
            workflow,
            stage,
            run,
            budget,
            used,
            in_flight,
        } => {
            return ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "budget_exceeded",
                "stage_budget_exceeded",
                format!(
                    "stage `{stage}` of run `{run}` has used {used} of its {budget}-token budget (budget_tokens in workflow `{workflow}`; {in_flight} more reserved by calls in flight) and this call needs about {estimate}"
                ),
            )
        }
        Refusal::RunNotRunning { run, status } => {
            return ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "run_finished",
                format!("run `{run}` is {status}; start a new run for more work"),
            )
        }
    };
    let Admission::Blocked {
        persona,
        limit,
        used,
        in_flight,
        resets_at,
        cost,
    } = blocked
    else {
        return ApiError::unavailable("admission refused the call");
    };
    let resets = resets_at
        .map(|t| format!("resets at {}", crate::core::clock::to_rfc3339(t)))
        .unwrap_or_else(|| "the budget has no period: raise or reset it".into());
    tracing::info!(persona = %persona, limit, used, in_flight, "call refused: budget exceeded");
    let message = match cost {
        Some((limit_usd, used_usd, in_flight_usd)) => format!(
            "persona `{persona}` has spent ${used_usd:.4} of its ${limit_usd:.4} cost budget (${in_flight_usd:.4} more reserved by calls in flight; this call costs about ${cost_estimate:.4}); {resets}"
        ),
        None => format!(
            "persona `{persona}` has used {used} of its {limit}-token budget ({in_flight} more reserved by calls in flight; this call needs about {estimate}); {resets}"
        ),
    };
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "budget_exceeded",
        "budget_exceeded",
        message,
    )
}

/// Load shedding: a bounded number of calls go upstream at once; as many again may wait up to
/// 100 ms for a slot, and beyond that calls are refused at once, so that overload is refused
/// cheaply instead of piling up requests in memory.
async fn acquire_slot(
    state: &AppState,
    settings: &GatewaySettings,
    upstream: &str,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let permit = match state.gateway.in_flight.clone().try_acquire_owned() {
        Ok(p) => Ok(p),
        Err(_) => {
            let waiting = state.gateway.waiting.fetch_add(1, Ordering::AcqRel);
            let result = if waiting >= settings.max_in_flight {
                Err(())
            } else {
                tokio::time::timeout(
                    Duration::from_millis(100),
                    state.gateway.in_flight.clone().acquire_owned(),
                )
                .await
                .map_err(|_| ())
                .and_then(|r| r.map_err(|_| ()))
            };
            state.gateway.waiting.fetch_sub(1, Ordering::AcqRel);
            result
        }
    };
    permit.map_err(|()| {
        state.gateway.count(upstream, "overloaded");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "overloaded",
            format!(
                "hypertool has {} calls in flight (gateway.max_in_flight); retry shortly",
                settings.max_in_flight
            ),
        )
    })
}

/// Judges an answer by the stage's gate and records the verdict (one `quality_gate` event per
/// attempt, so the metric shows every failure that led to a retry).
async fn judge(
    state: &AppState,
    meta: &CallMeta,
    text: &str,
    completion_tokens: u64,
    attempt: u32,
) -> Option<GateVerdict> {
    let call = meta.stage_call.as_ref()?;
    let gate = call.gate()?;
    let verdict = gate.evaluate(text, completion_tokens);
    let event = Event::QualityGate(GateVerdictEvent {
        workflow: call.workflow.name.clone(),
        stage: call.stage.name.clone(),
        model: meta.route.name.clone(),
        result: verdict.result,
        reasons: verdict.reasons(),
        run: call.run.clone(),
        attempt,
    });
    if let Err(e) = state
        .writer
        .append(vec![Stamped {
            at: state.clock.now_ms(),
            event,
        }])
        .await
    {
        tracing::error!(workflow = %call.workflow.name, stage = %call.stage.name,
            "a quality-gate verdict could not be stored: {e}");
    }
    if verdict.result == GateResult::Fail {
        tracing::info!(workflow = %call.workflow.name, stage = %call.stage.name,
            model = %meta.route.name, attempt, "quality gate failed: {}", verdict.summary());
    }
    Some(verdict)
}

async fn plain_call(
    state: AppState,
    settings: Arc<GatewaySettings>,
    meta: CallMeta,
    mut request: Map<String, Value>,
    reservation: Reservation,
    started: Instant,
    cache_slot: Option<(String, Duration)>,
) -> Result<Response, ApiError> {
    let task_state = state.clone();
    let task_meta = meta.clone();
    let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<Result<Answer, UpstreamError>>();
    // The call and its accounting finish even if the client goes away; the answer goes back as
    // soon as the upstream has given it (and, for a gated stage, the gate has judged it), and the
    // usage is stored right after (the reservation is held until then, so admission stays
    // conservative). Shutdown waits for these tasks.
    state.tasks.spawn(async move {
        let state = task_state;
        let mut attempt_meta = task_meta.clone();
        let mut attempt: u32 = 1;
        let retries = task_meta
            .stage_call
            .as_ref()
            .filter(|c| c.gate().is_some())
            .map_or(0, |c| c.stage.retries);
        // The call's reservation and those of gate retries, held until their usage is stored.
        let mut held: Vec<Reservation> = vec![reservation];
        // Usage of attempts whose answers failed the gate and were retried.
        let mut earlier_attempts: Vec<Stamped> = Vec::new();
        loop {
            let attempt_started = if attempt == 1 { started } else { Instant::now() };
            let route = attempt_meta.route.clone();
            let result = call_with_fallbacks(&state, &settings, &route, &mut request).await;
            let (answered_by, completion) = match result {
                Ok(ok) => ok,
                Err(e) => {
                    state.gateway.count(&attempt_meta.route.upstream, "upstream_error");
                    if let Some(held_back) = state.gateway.warnings.admit(&attempt_meta.route.name, e.code(), Instant::now()) {
                        tracing::warn!(persona = %attempt_meta.persona, model = %attempt_meta.route.name,
                            similar_held_back = held_back, "{}", e.message());
                    }
                    let _ = answer_tx.send(Err(e));
                    if !earlier_attempts.is_empty() {
                        store_usage(&state, &attempt_meta.persona, earlier_attempts, held).await;
                    }
                    break;
                }
            };
            let fell_back = answered_by.name != route.name;
            attempt_meta.route = answered_by;
            let Completion { body, usage, text } = completion;
            let (prompt, completion, estimated) = match usage {
                Some((p, c)) => (p, c, false),
                None => (counted_prompt(&request), tokens::count_text(&text), true),
            };
            let verdict = judge(&state, &attempt_meta, &text, completion, attempt).await;
            let failed = verdict.as_ref().is_some_and(|v| v.result == GateResult::Fail);
            // Another attempt, on the escalation model, if the gate failed and retries are left
            // (and the budget admits it).
            let next = if failed && attempt <= retries {
                let call = attempt_meta.stage_call.clone();
                let target = call
                    .as_ref()
                    .and_then(|c| c.escalation(&settings))
                    .unwrap_or_else(|| attempt_meta.route.clone());
                let estimate = attempt_meta.prompt_estimate;
                let cost = cost_of(&target, estimate, 0);
                match Reservation::take(&state, &attempt_meta, estimate, cost, None) {
                    Err(_) => {
                        tracing::info!(persona = %attempt_meta.persona, "quality-gate retry skipped: the budget is spent");
                        None
                    }
                    Ok((reservation, _, _)) => {
                        held.push(reservation);
                        Some(target)
                    }
                }
            } else {
                None
            };
            match next {
                Some(target) => {
                    // Stored with the last attempt (one commit, and the client is not kept
                    // waiting for it); its reservation is held until then.
                    earlier_attempts.push(usage_event(&state, &attempt_meta, prompt, completion, estimated, attempt_started));
                    state.gateway.count(&attempt_meta.route.upstream, "ok");
                    state.gateway.count(&target.upstream, "gate_retry");
                    tracing::info!(from = %attempt_meta.route.name, to = %target.name, attempt = attempt + 1,
                        "retrying a call whose output failed the quality gate");
                    attempt_meta.route = target;
                    attempt += 1;
                }
                None => {
                    let cacheable = !fell_back && !estimated && !failed && attempt == 1;
                    if let Some((key, ttl)) = cache_slot.filter(|_| cacheable) {
                        let expires = state.clock.now_ms() + ttl.as_millis() as i64;
                        state.gateway.cache.insert(key, body.clone(), prompt, completion, expires);
                    }
                    let _ = answer_tx.send(Ok(Answer {
                        meta: attempt_meta.clone(),
                        body,
                        verdict,
                        attempts: attempt,
                    }));
                    let mut events = std::mem::take(&mut earlier_attempts);
                    events.push(usage_event(&state, &attempt_meta, prompt, completion, estimated, attempt_started));
                    store_usage(&state, &attempt_meta.persona, events, held).await;
                    state.gateway.count(&attempt_meta.route.upstream, "ok");
                    break;
                }
            }
        }
    });
    match answer_rx.await {
        Ok(Ok(answer)) => {
            let mut resp = json_bytes(answer.body);
            response_headers(&mut resp, &answer.meta);
            let h = resp.headers_mut();
            if answer.meta.route.name != meta.route.name {
                let name = if answer.attempts > 1 {
                    "x-hypertool-escalated"
                } else {
                    "x-hypertool-fallback"
                };
                if let Ok(v) = HeaderValue::from_str(&stage::header_safe(&format!(
                    "{} -> {}",
                    meta.route.name, answer.meta.route.name
                ))) {
                    h.insert(name, v);
                }
            }
            if let Some(verdict) = &answer.verdict {
                if let Ok(v) = HeaderValue::from_str(&stage::header_safe(&verdict.summary())) {
                    h.insert("x-hypertool-quality-gate", v);
                }
                h.insert("x-hypertool-attempts", HeaderValue::from(answer.attempts));
            }
            Ok(resp)
        }
        Ok(Err(e)) => Err(gateway_error(&e)),
        Err(_) => Err(ApiError::unavailable(
            "the call was interrupted (server shutting down?); retry it",
        )),
    }
}

type SourceStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// `POST /v1/embeddings`: attributed, budgeted and accounted like chat calls (no cache, no tools).
pub async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let settings = state.gateway.settings();
    let body = body.map_err(|r| ApiError::from_body_rejection(r, state.max_body_bytes))?;
    let key = caller.persona_key();
    request::check_headers(&headers)?;
    let mut request = ApiError::json_object(&body)?;
    let model = request::model(&request)?;
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) && !items.is_empty() => {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_input",
                "`input` must be a string or a non-empty array of strings",
            )
            .param("input"))
        }
    };
    let route = allowed_route(&state, &settings, key, &model)?;
    let persona = attributed_persona(&settings, &headers, key);
    let estimate: u64 = inputs.iter().map(|t| tokens::count_text(t)).sum();
    let meta = CallMeta::new(&settings, &headers, persona, route, estimate);
    rate_check(&state, key, &meta, estimate)?;
    let permit = acquire_slot(&state, &settings, &meta.route.upstream).await?;
    let cost_estimate = cost_of(&meta.route, estimate, 0);
    // Embeddings are not stage calls (no stage claim): only the persona's budgets apply.
    let (reservation, _, _) =
        Reservation::take(&state, &meta, estimate, cost_estimate, Some(permit)).map_err(
            |refusal| {
                state.gateway.count(&meta.route.upstream, "budget_exceeded");
                refused(&refusal, estimate, cost_estimate)
            },
        )?;
    request.insert(
        "model".into(),
        Value::String(meta.route.upstream_model.clone()),
    );
    let started = Instant::now();
    let task_state = state.clone();
    let task_meta = meta.clone();
    let task = state.tasks.spawn(async move {
        let state = task_state;
        let meta = task_meta;
        let result = if meta.route.upstream == "mock" {
            tokio::time::sleep(settings.mock.latency).await;
            Ok(upstream::mock_embeddings(&inputs, &meta.route.name).0)
        } else {
            match settings.upstreams.get(&meta.route.upstream) {
                Some(u) => {
                    upstream::embeddings(
                        &state.gateway.http,
                        u,
                        &Value::Object(request),
                        timeout_of(&settings, &meta.route),
                    )
                    .await
                }
                None => Err(UpstreamError::Unreachable {
                    upstream: meta.route.upstream.clone(),
                }),
            }
        };
        if let Ok(value) = &result {
            let (prompt, estimated) = match value
                .pointer("/usage/prompt_tokens")
                .and_then(Value::as_u64)
            {
                Some(p) => (p, false),
                None => (meta.prompt_estimate, true),
            };
            record(&state, &meta, (prompt, 0), estimated, started, reservation).await;
            state.gateway.count(&meta.route.upstream, "ok");
        } else {
            state.gateway.count(&meta.route.upstream, "upstream_error");
            drop(reservation);
        }
        result
    });
    match task.await {
        Ok(Ok(value)) => {
            let mut resp = Json(value).into_response();
            response_headers(&mut resp, &meta);
            Ok(resp)
        }
        Ok(Err(e)) => Err(gateway_error(&e)),
        Err(_) => Err(ApiError::unavailable(
            "the call was interrupted (server shutting down?); retry it",
        )),
    }
}

/// A cached answer replayed as an SSE stream.
/// A JSON response from bytes that already are JSON.
fn json_bytes(body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn cached_stream(entry: &cache::Entry, wants_usage: bool) -> Response {
    let value = Completion::value(&entry.response);
    let r = &value;
    let id = r.get("id").cloned().unwrap_or(Value::Null);
    let model = r.get("model").cloned().unwrap_or(Value::Null);
    let created = r.get("created").cloned().unwrap_or(Value::Null);
    let mut out: Vec<Result<Bytes, Infallible>> = Vec::new();
    for c in r
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let index = c.get("index").cloned().unwrap_or(json!(0));
        let message = c.get("message").cloned().unwrap_or(json!({}));
        let chunk = |delta: Value, finish: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})
            .to_string()
        };
        let mut delta = json!({"role": "assistant", "content": message.get("content").cloned().unwrap_or(Value::Null)});
        if let Some(calls) = message.get("tool_calls") {
            delta["tool_calls"] = calls.clone();
        }
        out.push(Ok(sse(&chunk(delta, Value::Null))));
        out.push(Ok(sse(&chunk(
            json!({}),
            c.get("finish_reason").cloned().unwrap_or(json!("stop")),
        ))));
    }
    if wants_usage {
        out.push(Ok(sse(&json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": r.get("usage").cloned().unwrap_or(Value::Null)}).to_string())));
    }
    out.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    let mut resp = Response::new(Body::from_stream(futures_util::stream::iter(out)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// SSE framing of one JSON chunk.
fn sse(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

fn mock_stream(settings: &GatewaySettings, body: &Value, model: &str) -> Vec<Bytes> {
    let id = new_id();
    let created = chrono::Utc::now().timestamp();
    let empty = Map::new();
    let request = body.as_object().unwrap_or(&empty);
    let (_, prompt, content) =
        upstream::mock_completion(&settings.mock, request, model, &id, created);
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string()
    };
    let mut out = vec![sse(&chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ))];
    for (i, word) in content.split(' ').enumerate() {
        let piece = if i == 0 {
            word.to_string()
        } else {
            format!(" {word}")
        };
        out.push(sse(&chunk(json!({"content": piece}), Value::Null)));
    }
    out.push(sse(&chunk(json!({}), json!("stop"))));
    let completion = settings.mock.completion_tokens;
    out.push(sse(&json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}).to_string()));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

async fn stream_call(
    state: AppState,
    settings: Arc<GatewaySettings>,
    meta: CallMeta,
    mut request: Map<String, Value>,
    reservation: Reservation,
    started: Instant,
) -> Result<Response, ApiError> {
    // Ask the upstream for usage; remember whether the client asked, to strip it otherwise.
    let client_wants_usage = request
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut options = request
        .get("stream_options")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    options.insert("include_usage".into(), Value::Bool(true));
    request.insert("stream_options".into(), Value::Object(options));
    let mut body = Value::Object(request);

    // Streams are not retried once they have begun; before the first byte, fallbacks are tried.
    let mut opened = None;
    let mut last_error = None;
    for candidate in candidates(&settings, &meta.route) {
        body["model"] = Value::String(candidate.upstream_model.clone());
        let attempt_body = &body;
        if candidate.upstream == "mock" {
            tokio::time::sleep(settings.mock.latency).await;
            let chunks = mock_stream(&settings, attempt_body, &candidate.name);
            let s: SourceStream = Box::pin(futures_util::stream::iter(chunks.into_iter().map(Ok)));
            opened = Some((candidate, s));
            break;
        }
        let Some(u) = settings.upstreams.get(&candidate.upstream) else {
            continue;
        };
        match upstream::open_stream(
            &state.gateway.http,
            u,
            attempt_body,
            timeout_of(&settings, &candidate),
        )
        .await
        {
            Ok(s) => {
                opened = Some((candidate, Box::pin(s) as SourceStream));
                break;
            }
            Err(e) => {
                if let Some(held_back) =
                    state
                        .gateway
                        .warnings
                        .admit(&candidate.name, e.code(), Instant::now())
                {
                    tracing::warn!(model = %candidate.name, similar_held_back = held_back, "{}", e.message());
                }
                last_error = Some(e);
            }
        }
    }
    let Some((answered_by, source)) = opened else {
        state.gateway.count(&meta.route.upstream, "upstream_error");
        let e = last_error.unwrap_or(UpstreamError::Unreachable {
            upstream: meta.route.upstream.clone(),
        });
        return Err(gateway_error(&e));
    };
    let mut meta = meta;
    meta.route = answered_by;
    let timeout = timeout_of(&settings, &meta.route);

    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let task_meta = meta.clone();
    state.tasks.clone().spawn(relay(
        state,
        task_meta,
        Arc::new(body),
        source,
        tx,
        client_wants_usage,
        timeout,
        reservation,
        started,
    ));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response_headers(&mut resp, &meta);
    Ok(resp)
}

/// Copies the upstream's SSE events to the client, watching for usage, and records the call when
/// the stream ends — with the upstream's usage, or estimated when there was none or the client left.
#[allow(clippy::too_many_arguments)]
async fn relay(
    state: AppState,
    meta: CallMeta,
    request: Arc<Value>,
    mut source: SourceStream,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    client_wants_usage: bool,
    timeout: Duration,
    reservation: Reservation,
    started: Instant,
) {
    let mut buffer: Vec<u8> = Vec::new();
    let mut content = String::new();
    let mut usage: Option<(u64, u64)> = None;
    let mut done = false;
    let mut client_gone = false;
    let mut failure: Option<UpstreamError> = None;
    'read: loop {
        let next = match tokio::time::timeout(timeout, source.next()).await {
            Ok(n) => n,
            Err(_) => {
                failure = Some(UpstreamError::Timeout {
                    upstream: meta.route.upstream.clone(),
                    after: timeout,
                });
                break;
            }
        };
        let bytes = match next {
            None => break,
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                failure = Some(e);
                break;
            }
        };
        buffer.extend_from_slice(&bytes);
        while let Some(end) = find_event_end(&buffer) {
            let event: Vec<u8> = buffer.drain(..end.0).collect();
            buffer.drain(..end.1);
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                let out = if data == "[DONE]" {
                    done = true;
                    // A gated stage: the verdict on the complete output goes out as an SSE
                    // comment (clients ignore comments; headers are long gone).
                    let completion = usage
                        .map(|u| u.1)
                        .unwrap_or_else(|| tokens::count_text(&content));
                    match judge(&state, &meta, &content, completion, 1).await {
                        Some(v) => Some(Bytes::from(format!(
                            ": x-hypertool-quality-gate: {}\n\ndata: [DONE]\n\n",
                            stage::header_safe(&v.summary())
                        ))),
                        None => Some(Bytes::from_static(b"data: [DONE]\n\n")),
                    }
                } else {
                    match serde_json::from_str::<Value>(data) {
                        Ok(mut chunk) => {
                            if let Some(u) = usage_of(&chunk) {
                                usage = Some(u);
                            }
                            for c in chunk
                                .get("choices")
                                .and_then(Value::as_array)
                                .into_iter()
                                .flatten()
                            {
                                if let Some(piece) =
                                    c.pointer("/delta/content").and_then(Value::as_str)
                                {
                                    content.push_str(piece);
                                }
                                if let Some(calls) = c.pointer("/delta/tool_calls") {
                                    content.push_str(&calls.to_string());
                                }
                            }
                            if client_wants_usage {
                                Some(sse(data))
                            } else {
                                let no_choices = chunk
                                    .get("choices")
                                    .and_then(Value::as_array)
                                    .is_some_and(|c| c.is_empty());
                                if no_choices && chunk.get("usage").is_some_and(|u| !u.is_null()) {
                                    None
                                } else if let Some(obj) = chunk.as_object_mut() {
                                    obj.remove("usage");
                                    Some(sse(&Value::Object(obj.clone()).to_string()))
                                } else {
                                    Some(sse(data))
                                }
                            }
                        }
                        // Not JSON: pass it on untouched.
                        Err(_) => Some(sse(data)),
                    }
                };
                if let Some(out) = out {
                    if tx.send(Ok(out)).await.is_err() {
                        client_gone = true;
                        break 'read;
                    }
                }
            }
        }
    }
    drop(source);
    if failure.is_none() && !done && !client_gone {
        failure = Some(UpstreamError::Invalid {
            upstream: meta.route.upstream.clone(),
            detail: "the stream ended before [DONE]".into(),
        });
    }
    if let Some(e) = &failure {
        if let Some(held_back) =
            state
                .gateway
                .warnings
                .admit(&meta.route.name, "stream_ended_early", Instant::now())
        {
            tracing::warn!(persona = %meta.persona, model = %meta.route.name,
                similar_held_back = held_back, "stream ended early: {}", e.message());
        }
        let err =
            json!({"error": {"message": e.message(), "type": "upstream_error", "code": e.code()}});
        let _ = tx.send(Ok(sse(&err.to_string()))).await;
    }
    drop(tx);
    let (prompt, completion, estimated) = match usage {
        Some((p, c)) => (p, c, false),
        None => (
            request
                .as_object()
                .map(counted_prompt)
                .unwrap_or(meta.prompt_estimate),
            tokens::count_text(&content),
            true,
        ),
    };
    if client_gone {
        tracing::info!(persona = %meta.persona, model = %meta.route.name, "client left mid-stream; usage estimated");
    }
    record(
        &state,
        &meta,
        (prompt, completion),
        estimated,
        started,
        reservation,
    )
    .await;
    state.gateway.count(
        &meta.route.upstream,
        if failure.is_some() {
            "upstream_error"
        } else {
            "ok"
        },
    );
}

/// Position of the end of the first SSE event in `buf`: (event length, separator length).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    for i in 0..buf.len() {
        if buf[i..].starts_with(b"\n\n") {
            return Some((i, 2));
        }
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, 4));
        }
    }
    None
}

#[cfg(test)]
mod warn_throttle_tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_logged_once_per_window_with_the_count_held_back() {
        let t = WarnThrottle::default();
        let t0 = Instant::now();
        assert_eq!(t.admit("gpt", "upstream_timeout", t0), Some(0));
        assert_eq!(
            t.admit("gpt", "upstream_timeout", t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            t.admit("gpt", "upstream_timeout", t0 + Duration::from_secs(9)),
            None
        );
        // Another model or kind has its own window.
        assert_eq!(
            t.admit("gpt", "upstream_error", t0 + Duration::from_secs(9)),
            Some(0)
        );
        assert_eq!(
            t.admit("mini", "upstream_timeout", t0 + Duration::from_secs(9)),
            Some(0)
        );
        assert_eq!(t.admit("gpt", "upstream_timeout", t0 + WARN_EVERY), Some(2));
        assert_eq!(t.admit("gpt", "upstream_timeout", t0 + WARN_EVERY), None);
    }
}
