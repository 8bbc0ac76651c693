//! The gateway's routes: `POST /v1/chat/completions`, `POST /v1/embeddings`, `GET /v1/models`. Each
//! is a short pipeline over the modules beside it: request parsing, policy, admission, dispatch or
//! relay, accounting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use crate::config::gateway::{GatewaySettings, ModelRoute, VirtualKey};
use crate::core::policy;
use crate::store::writer::lock;
use crate::web::auth::Caller;
use crate::web::error::{ApiError, ErrorKind};

use super::accounting::{record, release_admission};
use super::admission::{admit, policy_error};
use super::dialect::{CallRequest, Dialect};
use super::dispatch::{gateway_error, interrupted, plain_call, timeout_of};
use super::provider::Provider;
use super::relay::{cached_stream, json_bytes, stream_call};
use super::request::header;
use super::{accounting, cache, dialect, request, stage, tokens, trace, CallMeta, GatewayState};

/// The route for `model`, if it exists and the key (if any) may use it.
pub(super) fn allowed_route(
    state: &GatewayState,
    settings: &GatewaySettings,
    key: Option<&VirtualKey>,
    model: &str,
) -> Result<Arc<ModelRoute>, ApiError> {
    let Some(route) = settings.route(model) else {
        state.count("-", "model_not_found");
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
                ErrorKind::Forbidden,
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
pub(super) fn attributed_persona(
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

/// `GET /v1/models`: the models the caller may use, in Anthropic's shape when the caller sent
/// `anthropic-version` (Claude Code, the `anthropic` SDKs), else OpenAI's.
pub async fn list_models(
    State(state): State<GatewayState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let settings = state.settings();
    let key = caller.persona_key();
    let mut names: Vec<(&str, &str)> = Vec::new();
    for m in &settings.models {
        if key.is_some_and(|k| !k.models.is_empty() && !k.models.contains(&m.name)) {
            continue;
        }
        for name in std::iter::once(&m.name).chain(m.aliases.iter()) {
            names.push((name, &m.upstream));
        }
    }
    names.push(("mock/default", "hypertool-mock"));
    if headers.contains_key("anthropic-version") {
        let data: Vec<Value> = names
            .iter()
            .map(|(id, _)| json!({"type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"}))
            .collect();
        return Ok(Json(json!({
            "data": data,
            "has_more": false,
            "first_id": names.first().map(|n| n.0),
            "last_id": names.last().map(|n| n.0),
        })));
    }
    let data: Vec<Value> = names
        .iter()
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<GatewayState>,
    State(door): State<std::sync::Arc<crate::web::auth::Door>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    model_call(state, &door, caller, headers, body, Dialect::Chat).await
}

/// `POST /v1/messages` (Anthropic Messages).
pub async fn messages(
    State(state): State<GatewayState>,
    State(door): State<std::sync::Arc<crate::web::auth::Door>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    model_call(state, &door, caller, headers, body, Dialect::Messages).await
}

/// `POST /v1/responses` (OpenAI Responses).
pub async fn responses(
    State(state): State<GatewayState>,
    State(door): State<std::sync::Arc<crate::web::auth::Door>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    model_call(state, &door, caller, headers, body, Dialect::Responses).await
}

/// The request in its dialect, checked: the body's shape, and the headers a provider of the same
/// dialect is sent.
fn call_request(
    dialect: Dialect,
    headers: &HeaderMap,
    body: Map<String, Value>,
) -> Result<CallRequest, ApiError> {
    match dialect {
        Dialect::Chat => {
            if !body.get("messages").is_some_and(Value::is_array) {
                return Err(ApiError::bad_request(
                    "missing_messages",
                    "`messages` is required (an array of {role, content})",
                )
                .param("messages"));
            }
            Ok(CallRequest::new(dialect, body))
        }
        Dialect::Responses => {
            dialect::responses::check_request(&body)?;
            Ok(CallRequest::new(dialect, body))
        }
        Dialect::Messages => {
            dialect::messages::check_request(&body)?;
            let mut request = CallRequest::new(dialect, body);
            for name in ["anthropic-version", "anthropic-beta"] {
                let Some(raw) = headers.get(name) else {
                    continue;
                };
                match raw.to_str() {
                    Ok(v) if v.len() <= 1024 => request.forward.push((name, v.to_string())),
                    _ => {
                        return Err(ApiError::bad_request(
                            "invalid_header",
                            format!("`{name}` must be visible ASCII, at most 1 KiB"),
                        )
                        .param(name))
                    }
                }
            }
            Ok(request)
        }
    }
}

/// The session a Messages call names in `metadata.user_id` (Claude Code puts its session there),
/// when no header names one: as sent when it is a valid name, else its digest.
fn session_of_metadata(request: &CallRequest) -> Option<String> {
    let raw = request.body.get("metadata")?.get("user_id")?.as_str()?;
    // Claude Code's user_id is JSON naming its session: that session is the one meant.
    let inner = serde_json::from_str::<Value>(raw).ok();
    let user = inner
        .as_ref()
        .and_then(|v| v.get("session_id"))
        .and_then(Value::as_str)
        .unwrap_or(raw);
    if user.trim().is_empty() {
        return None;
    }
    match crate::core::labels::check_name(crate::core::labels::NameField::Session, user) {
        Ok(name) => Some(name.to_string()),
        Err(_) => accounting::prompt_digest(Some(&Value::String(user.to_string())))
            .map(|d| format!("user-{d}")),
    }
}

/// A model call in any dialect: one pipeline — the stage, the model, the prompt's limits, the
/// route, attribution, tool scope — then [`dispatch_call`].
async fn model_call(
    state: GatewayState,
    door: &crate::web::auth::Door,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    dialect: Dialect,
) -> Result<Response, ApiError> {
    let settings = state.settings();
    let key = caller.persona_key();
    let (body, model) = request::read(&headers, body, state.shared.max_body_bytes).await?;
    let mut request = call_request(dialect, &headers, body)?;
    let mut notes: Notes = Vec::new();
    let chatmode = header(&headers, "x-hypertool-chatmode")
        .unwrap_or_else(|| settings.default_chatmode.clone());
    if let Some(run) = header(&headers, "x-hypertool-run") {
        stage::learn_run(&state.shared.writer, &state.shared.engine, &run).await;
    }
    let (workflow_name, stage_call) = stage::resolve(&state, &headers, &chatmode)?;
    // A persona key works only in the stages its persona runs (the door's one ownership rule).
    if let Some(call) = stage_call.as_deref() {
        if let Some(persona) = call.stage.persona.as_deref() {
            let what = format!("stage `{}`", call.stage.name);
            door.require_own(&caller, "x-hypertool-stage", &what, Some(persona))?;
        }
    }
    // A stage that sets a model (or tier) decides the model: the runbook's STAGE_MODEL_MAPPING.
    // A stage variant's model wins over the stage's own.
    let stage_model = stage_call
        .as_ref()
        .and_then(|c| {
            c.variant
                .as_ref()
                .and_then(|v| v.model.as_ref())
                .or(c.stage.model.as_ref())
        })
        .and_then(|choice| settings.resolve_choice(choice));
    // Its prompt goes first (as the system prompt, in the call's dialect), its temperature replaces
    // the client's.
    if let Some(v) = stage_call.as_ref().and_then(|c| c.variant.as_ref()) {
        if let Some(p) = &v.prompt {
            request.prepend_system(&p.text);
        }
        if let Some(t) = v.temperature {
            request
                .body
                .insert("temperature".into(), serde_json::json!(t));
        }
        notes.push(("x-hypertool-variant", v.name.clone()));
    }
    let decision = policy::choose_model(&model, stage_model.as_deref().map(|r| r.name.as_str()))
        .map_err(policy_error)?;
    if let Some(replaced) = decision.replaced {
        notes.push(("x-hypertool-stage-model", replaced));
    }
    let model = decision.model;
    truncate_for_stage(&state, stage_call.as_deref(), &mut request, &mut notes).await?;
    let route = allowed_route(&state, &settings, key, &model)?;
    let persona = attributed_persona(&settings, &headers, key);
    let deadline = timeout_of(&settings, &route);
    let prompt_estimate =
        estimate_prompt(&state, stage_call.as_deref(), &persona, &request, deadline).await;
    let max_tokens = request.max_tokens();
    let mut meta = CallMeta::new(&settings, &headers, persona, route, prompt_estimate);
    meta.dialect = dialect;
    if meta.session.is_none() && dialect == Dialect::Messages {
        meta.session = session_of_metadata(&request);
    }
    meta.prompt_hash = tokens::off_the_workers(request.size, deadline, || {
        accounting::prompt_digest(request.digest_source().as_ref())
    })
    .await
    .flatten();
    meta.workflow = workflow_name;
    meta.stage_call = stage_call;
    scope_request_tools(&state, &settings, &meta.persona, &mut request, &mut notes)?;

    meta.trace = trace::CallTrace::begin(&state, &headers, meta.stage_call.as_deref());
    // Kept only when traced: a refusal or a failed call still ends its request span.
    let traced = meta.trace.is_some().then(|| meta.clone());
    let result = dispatch_call(
        state.clone(),
        settings,
        &headers,
        key,
        meta,
        request,
        notes,
        max_tokens,
        prompt_estimate,
    )
    .await;
    if let Err(e) = &result {
        trace::refused(&state, traced.as_ref(), dialect.route(), e);
    }
    result
}

/// `POST /v1/messages/count_tokens`: the prompt's input tokens, as the route's model counts them
/// (an Anthropic upstream is asked; otherwise hypertool counts, as admission does). Nothing is
/// spent, so nothing is admitted or recorded.
pub async fn count_tokens(
    State(state): State<GatewayState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let settings = state.settings();
    let key = caller.persona_key();
    let (body, model) = request::read(&headers, body, state.shared.max_body_bytes).await?;
    let mut request = call_request(Dialect::Messages, &headers, body)?;
    let route = allowed_route(&state, &settings, key, &model)?;
    request
        .body
        .insert("model".into(), Value::String(route.upstream_model.clone()));
    let provider = Provider::of(&settings, &state.http, &route).map_err(|e| gateway_error(&e))?;
    let tokens = provider
        .count_tokens(&request)
        .await
        .map_err(|e| gateway_error(&e))?;
    Ok(Json(json!({"input_tokens": tokens})).into_response())
}

/// The rest of a chat call once it is attributed: cache, rates, admission, the upstream.
#[allow(clippy::too_many_arguments)]
async fn dispatch_call(
    state: GatewayState,
    settings: Arc<GatewaySettings>,
    headers: &HeaderMap,
    key: Option<&VirtualKey>,
    mut meta: CallMeta,
    request: CallRequest,
    mut notes: Notes,
    max_tokens: u64,
    prompt_estimate: u64,
) -> Result<Response, ApiError> {
    // The cache answers before admission: a hit spends no budget.
    let mut cache_slot =
        match lookup_cache(&state, &settings, headers, &meta, &request, &mut notes).await {
            CacheOutcome::Hit(resp) => {
                trace::request(
                    &state,
                    &meta,
                    trace::CallOutcome {
                        status: 200,
                        cache_hit: true,
                        ..Default::default()
                    },
                );
                return Ok(resp);
            }
            CacheOutcome::Miss(slot) => slot,
        };

    let mut admitted = admit(&state, &settings, key, &meta, prompt_estimate, max_tokens).await?;
    if admitted.downgrade && downgrade(&state, &settings, &mut meta, &mut notes) {
        cache_slot = None;
    }
    admitted.record(&state, &mut meta).await?;
    let reservation = admitted.reservation;

    let started = Instant::now();
    let mut resp = if request.stream() {
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

pub(super) fn response_headers(resp: &mut Response, meta: &CallMeta) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&meta.persona) {
        h.insert("x-hypertool-persona", v);
    }
    if let Ok(v) = HeaderValue::from_str(&meta.route.name) {
        h.insert("x-hypertool-model", v);
    }
}

/// `POST /v1/embeddings`: attributed, budgeted and accounted like chat calls (no cache, no tools).
pub async fn embeddings(
    State(state): State<GatewayState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let settings = state.settings();
    let key = caller.persona_key();
    let (request, model) = request::read(&headers, body, state.shared.max_body_bytes).await?;
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
    let bytes: usize = inputs.iter().map(String::len).sum();
    let estimate = tokens::off_the_workers(bytes, timeout_of(&settings, &route), || {
        inputs.iter().map(|t| tokens::count_text(t)).sum()
    })
    .await
    .unwrap_or_else(|| tokens::rough_text(bytes));
    let mut meta = CallMeta::new(&settings, &headers, persona, route, estimate);
    meta.prompt_hash = accounting::prompt_digest(request.get("input"));
    meta.trace = trace::CallTrace::begin(&state, &headers, None);
    let traced = meta.trace.is_some().then(|| meta.clone());
    let result = embed(
        state.clone(),
        settings,
        key,
        meta,
        request,
        inputs,
        estimate,
    )
    .await;
    if let Err(e) = &result {
        trace::refused(&state, traced.as_ref(), "/v1/embeddings", e);
    }
    result
}

/// An attributed embeddings call: rates, admission, the upstream, accounting.
async fn embed(
    state: GatewayState,
    settings: Arc<GatewaySettings>,
    key: Option<&VirtualKey>,
    mut meta: CallMeta,
    mut request: Map<String, Value>,
    inputs: Vec<String>,
    estimate: u64,
) -> Result<Response, ApiError> {
    // Embeddings are not stage calls (no stage claim): only the persona's budgets apply, and a
    // downgrade budget has no cheaper embedding model to send them to.
    let mut admitted = admit(&state, &settings, key, &meta, estimate, 0).await?;
    admitted.record(&state, &mut meta).await?;
    let reservation = admitted.reservation;
    request.insert(
        "model".into(),
        Value::String(meta.route.upstream_model.clone()),
    );
    let started = Instant::now();
    let task_state = state.clone();
    let task_meta = meta.clone();
    let task = state.shared.tasks.spawn(async move {
        let state = task_state;
        let meta = task_meta;
        let attempt = trace::Attempt::begin(&state, &meta);
        let result = trace::Attempt::scope(attempt.as_ref(), async {
            match Provider::of(&settings, &state.http, &meta.route) {
                Ok(provider) => {
                    provider
                        .embeddings(&Value::Object(request), &inputs, &meta.route.name)
                        .await
                }
                Err(e) => Err(e),
            }
        })
        .await;
        if meta.trace.is_some() {
            let usage = result.as_ref().ok().map(|v| {
                let prompt = v.pointer("/usage/prompt_tokens").and_then(Value::as_u64);
                (prompt.unwrap_or(meta.prompt_estimate), 0)
            });
            trace::generation(
                &state,
                &meta,
                attempt,
                None,
                trace::AttemptOutcome {
                    route: &meta.route,
                    usage,
                    output: None,
                    error: result.as_ref().err(),
                    gate_attempt: 1,
                    retry: 0,
                    streamed: false,
                    operation: "embeddings",
                },
            );
            if let Some(u) = usage {
                trace::request(
                    &state,
                    &meta,
                    trace::CallOutcome {
                        route: "/v1/embeddings",
                        status: 200,
                        attempts: 1,
                        usage: Some(u),
                        ..Default::default()
                    },
                );
            }
        }
        if let Ok(value) = &result {
            let (prompt, estimated) = match value
                .pointer("/usage/prompt_tokens")
                .and_then(Value::as_u64)
            {
                Some(p) => (p, false),
                None => (meta.prompt_estimate, true),
            };
            let used = dialect::TokenUsage {
                input: prompt,
                ..Default::default()
            };
            record(&state, &meta, used, estimated, started, reservation).await;
            state.count(&meta.route.upstream, "ok");
        } else {
            state.count(&meta.route.upstream, "upstream_error");
            release_admission(&state, &meta, vec![reservation]).await;
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
        Err(e) => Err(interrupted(&state, &meta, Err(e))),
    }
}

/// Response headers a call collects on its way (`X-Hypertool-*`), set on its answer.
type Notes = Vec<(&'static str, String)>;

/// The stage's prompt limit: the oldest non-system messages go first (`truncate_context`).
async fn truncate_for_stage(
    state: &GatewayState,
    stage_call: Option<&stage::StageCall>,
    request: &mut CallRequest,
    notes: &mut Notes,
) -> Result<(), ApiError> {
    let Some(c) = stage_call else {
        return Ok(());
    };
    let size = request.size;
    let (Some(max), Some(msgs)) = (c.stage.max_prompt_tokens, request.messages_mut()) else {
        return Ok(());
    };
    let counted: &[Value] = msgs;
    let shares = tokens::off_the_workers(size, tokens::DEFAULT_DEADLINE, || {
        counted.iter().map(tokens::message_tokens).collect()
    })
    .await
    .unwrap_or_else(|| counted.iter().map(tokens::rough_message_tokens).collect());
    match tokens::truncate_messages(msgs, shares, max) {
        Ok(None) => Ok(()),
        Ok(Some(t)) => {
            state.count_truncation(&c.workflow.name, &c.stage.name, &t);
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
            Ok(())
        }
        Err(tokens) => Err(ApiError::bad_request(
            "context_length_exceeded",
            format!(
                "the system messages and the last message alone are {tokens} tokens, over the max_prompt_tokens of {max} of stage `{}` in workflow `{}`; shorten them or raise the limit",
                c.stage.name, c.workflow.name
            ),
        )
        .param("messages")),
    }
}

/// The prompt's tokens as admission reserves them. Tokenizing costs more than the rest of the
/// call's bookkeeping: it is done only when a budget enforces (the persona's in block or
/// downgrade mode, or the run stage's budget); otherwise a rough count is enough. Either runs off
/// the async workers for a large prompt (building a Messages or Responses prompt is a copy);
/// within the call's `deadline`, else the rough count of its size.
async fn estimate_prompt(
    state: &GatewayState,
    stage_call: Option<&stage::StageCall>,
    persona: &str,
    request: &CallRequest,
    deadline: Duration,
) -> u64 {
    let stage_budgeted =
        stage_call.is_some_and(|c| c.run.is_some() && c.stage.budget_tokens.is_some());
    let enforced = stage_budgeted || lock(&state.shared.engine).enforces(persona);
    if enforced {
        tokens::count_prompt(request, deadline).await
    } else {
        // A chat prompt is read where it lies (a rough count copies nothing); the others' prompts
        // are built as copies first, so a large one goes to the pool.
        let cost = match request.dialect {
            Dialect::Chat => 0,
            Dialect::Messages | Dialect::Responses => request.size,
        };
        tokens::off_the_workers(cost, deadline, || {
            tokens::rough_count_messages(&request.prompt())
        })
        .await
        .unwrap_or_else(|| 3 + tokens::rough_text(request.size))
    }
}

/// Tool scope: tools the persona's allowedTools does not list are removed (or refused).
fn scope_request_tools(
    state: &GatewayState,
    settings: &GatewaySettings,
    persona: &str,
    request: &mut CallRequest,
    notes: &mut Notes,
) -> Result<(), ApiError> {
    // The agent's own tools (its shell, its editor) are not the persona's to scope.
    let tools: Vec<String> = request
        .tool_names()
        .into_iter()
        .filter(|t| !settings.agent_tools.contains(t))
        .collect();
    if tools.is_empty() {
        return Ok(());
    }
    let allowed = lock(&state.shared.engine)
        .personas()
        .get(persona)
        .map(|p| p.allowed_tools.clone())
        .unwrap_or_default();
    let scope = policy::scope_tools(persona, &tools, &allowed, settings.tool_policy);
    if let Err(policy::PolicyRefusal::ToolsNotAllowed { tools, .. }) = &scope {
        state.count_tools(persona, tools.len() as u64);
    }
    if let policy::ToolScope::Filtered { keep, removed } = scope.map_err(policy_error)? {
        state.count_tools(persona, removed.len() as u64);
        tracing::info!(persona = %persona, tools = %removed.join(","), "tools outside the persona's allowedTools removed");
        notes.push(("x-hypertool-tools-removed", removed.join(",")));
        request.retain_tools(|name| {
            keep.iter().any(|k| k == name) || settings.agent_tools.iter().any(|a| a == name)
        });
    }
    Ok(())
}

/// What the response cache said about a call.
enum CacheOutcome {
    /// The cached answer, ready to send.
    Hit(Response),
    /// Not answered from the cache; `Some((key, ttl))` when the answer should be stored.
    Miss(Option<(String, Duration)>),
}

/// Looks the call up in the response cache (unless it is not cacheable or asks not to be).
async fn lookup_cache(
    state: &GatewayState,
    settings: &GatewaySettings,
    headers: &HeaderMap,
    meta: &CallMeta,
    request: &CallRequest,
    notes: &mut Notes,
) -> CacheOutcome {
    let no_cache = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-cache") || v.contains("no-store"));
    // The key is the request's canonical text: for a large prompt, written off the async workers.
    let cost = if cache::ResponseCache::cacheable(&settings.cache, request) {
        request.size
    } else {
        0
    };
    let cache_key = tokens::off_the_workers(cost, tokens::DEFAULT_DEADLINE, || {
        cache::ResponseCache::key(&settings.cache, &meta.route.name, request)
    })
    .await
    .flatten();
    let result = match (&cache_key, no_cache) {
        (None, _) => cache::CacheResult::Skip,
        (Some(_), true) => cache::CacheResult::Bypass,
        (Some(key), false) => match state.cache.lookup(key, state.shared.clock.now_ms()).await {
            Some(entry) => {
                state.cache.count(
                    cache::CacheResult::Hit,
                    entry.prompt_tokens + entry.completion_tokens,
                );
                state.count(&meta.route.upstream, "cache_hit");
                let mut resp = if request.stream() {
                    cached_stream(&entry, request, meta.prompt_estimate)
                } else {
                    json_bytes(entry.response.clone())
                };
                response_headers(&mut resp, meta);
                resp.headers_mut()
                    .insert("x-hypertool-cache", HeaderValue::from_static("hit"));
                return CacheOutcome::Hit(resp);
            }
            None => cache::CacheResult::Miss,
        },
    };
    state.cache.count(result, 0);
    notes.push(("x-hypertool-cache", result.as_str().to_string()));
    CacheOutcome::Miss(match (result, cache_key) {
        (cache::CacheResult::Miss | cache::CacheResult::Bypass, Some(key)) => {
            let ttl = settings
                .cache
                .ttl_for(&meta.persona, &meta.chatmode, &meta.route.name);
            Some((key, ttl))
        }
        _ => None,
    })
}

/// A spent `downgrade` budget: the call goes to the cheaper model, if one is configured. Returns
/// whether the route changed (the answer is then not cached under the requested model).
fn downgrade(
    state: &GatewayState,
    settings: &GatewaySettings,
    meta: &mut CallMeta,
    notes: &mut Notes,
) -> bool {
    let canonical = lock(&state.shared.engine)
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
            state.count(&cheaper.upstream, "downgraded");
            meta.route = cheaper;
            true
        }
        _ => {
            tracing::warn!(persona = %canonical, model = %meta.route.name,
                "budget spent in downgrade mode but no cheaper model is configured (gateway.downgrade or the model's downgrade_to); the call goes through unchanged");
            false
        }
    }
}
