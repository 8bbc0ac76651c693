//! A non-streamed call upstream: the route, its retries and fallbacks, the quality gate and its
//! retries on the escalation model, in a tracked task that the client cannot cancel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::Value;

use crate::config::gateway::{GatewaySettings, ModelRoute};
use crate::core::event::{Event, GateResult, GateVerdictEvent, Stamped};
use crate::core::workflow::GateVerdict;
use crate::telemetry::trace::ids::SpanId;
use crate::web::error::{ApiError, ErrorKind};

use super::accounting::{
    counted_prompt, release_admission, store_admission, store_usage, usage_event,
};
use super::admission::{cost_of, Reservation};
use super::dialect::CallRequest;
use super::handlers::response_headers;
use super::provider::Provider;
use super::relay::json_bytes;
use super::upstream::{Completion, UpstreamError};
use super::{dialect, stage, tokens, trace, CallMeta, GatewayState};

pub(super) fn gateway_error(e: &UpstreamError) -> ApiError {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    ApiError::new(ErrorKind::Upstream(status), e.code(), e.message())
}

pub(super) fn timeout_of(settings: &GatewaySettings, route: &ModelRoute) -> Duration {
    route
        .timeout
        .or_else(|| settings.upstreams.get(&route.upstream).map(|u| u.timeout))
        .unwrap_or(Duration::from_secs(120))
}

/// The route and then its fallbacks, in order.
pub(super) fn candidates(
    settings: &GatewaySettings,
    route: &Arc<ModelRoute>,
) -> Vec<Arc<ModelRoute>> {
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
pub(super) async fn attempt_plain(
    state: &GatewayState,
    settings: &GatewaySettings,
    route: &ModelRoute,
    request: &CallRequest,
) -> Result<Completion, UpstreamError> {
    Provider::of(settings, &state.http, route)?
        .complete(request, &route.name)
        .await
}

/// Tries the route with retries (429, 5xx, connection errors; exponential backoff, honouring
/// `Retry-After`), then each fallback the same way. Returns the route that answered and, when
/// traced, the span of the attempt that answered. Every attempt is a generation span.
pub(super) async fn call_with_fallbacks(
    state: &GatewayState,
    settings: &GatewaySettings,
    meta: &CallMeta,
    gate_attempt: u32,
    request: &mut CallRequest,
) -> Result<(Arc<ModelRoute>, Completion, Option<SpanId>), UpstreamError> {
    let route = &meta.route;
    let mut last = None;
    for (i, candidate) in candidates(settings, route).into_iter().enumerate() {
        if i > 0 {
            state.count(&candidate.upstream, "fallback");
            tracing::warn!(from = %route.name, to = %candidate.name, "falling back to the next model");
        }
        // The model is set in place for each candidate: no copy of the (possibly large) request.
        request.body.insert(
            "model".into(),
            Value::String(candidate.upstream_model.clone()),
        );
        let body = &*request;
        let mut backoff = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            let traced = trace::Attempt::begin(state, meta);
            let span_id = traced.as_ref().map(|a| a.span_id);
            let result = trace::Attempt::scope(
                traced.as_ref(),
                attempt_plain(state, settings, &candidate, body),
            )
            .await;
            if traced.is_some() {
                let (usage, output, error) = match &result {
                    Ok(c) => (
                        c.usage.map(|u| (u.input, u.output)),
                        Some(c.text.as_str()),
                        None,
                    ),
                    Err(e) => (None, None, Some(e)),
                };
                trace::generation(
                    state,
                    meta,
                    traced,
                    body.body.get("messages"),
                    trace::AttemptOutcome {
                        route: &candidate,
                        usage,
                        output,
                        error,
                        gate_attempt,
                        retry: attempt,
                        streamed: false,
                        operation: "chat",
                    },
                );
            }
            match result {
                Ok(v) => return Ok((candidate, v, span_id)),
                Err(e) if e.retryable() && attempt < candidate.retries => {
                    attempt += 1;
                    state.count(&candidate.upstream, "retry");
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
pub(super) struct Answer {
    pub(super) meta: CallMeta,
    /// The upstream's bytes, forwarded as they are.
    pub(super) body: Bytes,
    /// The gate's verdict on the answer, when the call's stage has a gate.
    pub(super) verdict: Option<GateVerdict>,
    pub(super) attempts: u32,
}

/// Judges an answer by the stage's gate and records the verdict (one `quality_gate` event per
/// attempt, so the metric shows every failure that led to a retry). When traced, the verdict is
/// a span under the generation it judged (`generation`) and a score on it.
pub(super) async fn judge(
    state: &GatewayState,
    meta: &CallMeta,
    text: &str,
    completion_tokens: u64,
    attempt: u32,
    escalated: bool,
    generation: Option<SpanId>,
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
        variant: meta.variant().map(|v| v.name.clone()),
        escalated,
    });
    let at = state.shared.clock.now_ms();
    if let (Event::QualityGate(g), Some(t)) = (&event, &meta.trace) {
        state.shared.tracer.gate_verdict(
            at,
            g,
            Some((t.trace_id, generation.unwrap_or(t.span_id))),
        );
    }
    if let Err(e) = state
        .shared
        .writer
        .append(vec![Stamped { at, event }])
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

pub(super) async fn plain_call(
    state: GatewayState,
    settings: Arc<GatewaySettings>,
    meta: CallMeta,
    mut request: CallRequest,
    reservation: Reservation,
    started: Instant,
    cache_slot: Option<(String, Duration)>,
) -> Result<Response, ApiError> {
    let task_state = state.clone();
    let task_meta = meta.clone();
    let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<Result<Answer, UpstreamError>>();
    // The call and its accounting finish even if the client goes away; the answer goes back once
    // the upstream has given it (and, for a gated stage, the gate has judged it) and its usage is
    // stored (the reservation is held until the usage is applied, so admission stays
    // conservative). Shutdown waits for these tasks.
    state.shared.tasks.spawn(async move {
        let state = task_state;
        let mut attempt_meta = task_meta.clone();
        let mut attempt: u32 = 1;
        // Whether this attempt is a gate retry on the stage's escalation model.
        let mut escalated = false;
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
            let result = call_with_fallbacks(&state, &settings, &attempt_meta, attempt, &mut request).await;
            let (answered_by, completion, generation) = match result {
                Ok(ok) => ok,
                Err(e) => {
                    state.count(&attempt_meta.route.upstream, "upstream_error");
                    if let Some(held_back) = state.warnings.admit(&attempt_meta.route.name, e.code(), Instant::now()) {
                        tracing::warn!(persona = %attempt_meta.persona, model = %attempt_meta.route.name,
                            similar_held_back = held_back, "{}", e.message());
                    }
                    let _ = answer_tx.send(Err(e));
                    if earlier_attempts.is_empty() {
                        release_admission(&state, &attempt_meta, held).await;
                    } else {
                        release_admission(&state, &attempt_meta, Vec::new()).await;
                        store_usage(&state, &attempt_meta.persona, earlier_attempts, held).await;
                    }
                    break;
                }
            };
            let fell_back = answered_by.name != route.name;
            attempt_meta.route = answered_by;
            let Completion { body, usage, text } = completion;
            let (used, estimated) = match usage {
                Some(u) => (u, false),
                None => (
                    dialect::TokenUsage {
                        input: counted_prompt(&request),
                        output: tokens::count_text(&text),
                        ..Default::default()
                    },
                    true,
                ),
            };
            let (prompt, completion) = (used.input, used.output);
            let verdict = judge(&state, &attempt_meta, &text, completion, attempt, escalated, generation).await;
            let failed = verdict.as_ref().is_some_and(|v| v.result == GateResult::Fail);
            // Another attempt, on the escalation model, if the gate failed and retries are left
            // (and the budget admits it).
            let next = if failed && attempt <= retries {
                let call = attempt_meta.stage_call.clone();
                let escalation = call.as_ref().and_then(|c| c.escalation(&settings));
                let escalating = escalation.is_some();
                let target = escalation.unwrap_or_else(|| attempt_meta.route.clone());
                let estimate = attempt_meta.prompt_estimate;
                let cost = cost_of(&target, estimate, 0);
                match Reservation::take(&state, &attempt_meta, estimate, cost, None) {
                    Err(_) => {
                        tracing::info!(persona = %attempt_meta.persona, "quality-gate retry skipped: the budget is spent");
                        None
                    }
                    Ok((reservation, _, _)) => {
                        // The retry's own admission, stored before it goes upstream.
                        let mut retry = attempt_meta.clone();
                        retry.route = target.clone();
                        match store_admission(&state, &mut retry, estimate, cost).await {
                            Ok(()) => {
                                held.push(reservation);
                                Some((target, retry.call_id, escalating))
                            }
                            Err(_) => None,
                        }
                    }
                }
            } else {
                None
            };
            match next {
                Some((target, retry_call, escalating)) => {
                    // Stored with the last attempt (one commit, and the client is not kept
                    // waiting for it); its reservation is held until then.
                    earlier_attempts.push(usage_event(&state, &attempt_meta, used, estimated, attempt_started));
                    state.count(&attempt_meta.route.upstream, "ok");
                    state.count(&target.upstream, "gate_retry");
                    tracing::info!(from = %attempt_meta.route.name, to = %target.name, attempt = attempt + 1,
                        "retrying a call whose output failed the quality gate");
                    attempt_meta.route = target;
                    attempt_meta.call_id = retry_call;
                    attempt += 1;
                    escalated = escalating;
                }
                None => {
                    let cacheable = !fell_back && !estimated && !failed && attempt == 1;
                    if let Some((key, ttl)) = cache_slot.filter(|_| cacheable) {
                        let expires = state.shared.clock.now_ms() + ttl.as_millis() as i64;
                        state.cache.share(&key, &body, prompt, completion, ttl);
                        state.cache.insert(key, body.clone(), prompt, completion, expires);
                    }
                    trace::request(
                        &state,
                        &attempt_meta,
                        trace::CallOutcome {
                            status: 200,
                            attempts: attempt,
                            verdict: verdict.as_ref(),
                            usage: Some((prompt, completion)),
                            ..Default::default()
                        },
                    );
                    // The usage is stored before the answer is released: an answered call is
                    // never missing from the ledger, nor there as an estimate.
                    let mut events = std::mem::take(&mut earlier_attempts);
                    events.push(usage_event(&state, &attempt_meta, used, estimated, attempt_started));
                    store_usage(&state, &attempt_meta.persona, events, held).await;
                    let _ = answer_tx.send(Ok(Answer {
                        meta: attempt_meta.clone(),
                        body,
                        verdict,
                        attempts: attempt,
                    }));
                    state.count(&attempt_meta.route.upstream, "ok");
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
