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
use crate::core::workflow::{GateFailure, GateVerdict};
use crate::telemetry::trace::ids::SpanId;
use crate::web::error::{ApiError, ErrorKind};

use super::accounting::{release_admission, store_admission, store_usage, usage_event};
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
    // A long output is judged off the async workers (regexes and schemas over its whole text).
    let verdict = tokens::off_the_workers(
        text.len(),
        timeout_of(&state.settings(), &meta.route),
        || gate.evaluate(text, completion_tokens),
    )
    .await
    .unwrap_or_else(|| GateVerdict {
        // Not judged is not passed: the stage's retries (or the client) decide what follows.
        result: GateResult::Fail,
        failures: vec![GateFailure {
            criterion: "judged",
            message: "no thread was free to judge the output within the call's timeout".into(),
        }],
    });
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
    request: CallRequest,
    reservation: Reservation,
    started: Instant,
    cache_slot: Option<(String, Duration)>,
) -> Result<Response, ApiError> {
    let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<Result<Answer, UpstreamError>>();
    let attempts = Attempts {
        state: state.clone(),
        settings,
        meta: meta.clone(),
        request,
        attempt: 1,
        escalated: false,
        started,
        cache_slot,
        held: vec![reservation],
        earlier_attempts: Vec::new(),
    };
    // The call and its accounting finish even if the client goes away; the answer goes back once
    // the upstream has given it (and, for a gated stage, the gate has judged it) and its usage is
    // stored (the reservation is held until the usage is applied, so admission stays
    // conservative). Shutdown waits for these tasks.
    let task = state.shared.tasks.spawn(attempts.run(answer_tx));
    match answer_rx.await {
        Ok(Ok(answer)) => Ok(answer_response(&meta, answer)),
        Ok(Err(e)) => Err(gateway_error(&e)),
        Err(_) => Err(interrupted(&state, &meta, task.await)),
    }
}

/// The answer to a call whose task ended without answering: it panicked (a bug: 500
/// `internal_error`, counted; its accounting is settled at its estimate by its reservation), or
/// the runtime is shutting down (503).
pub(super) fn interrupted(
    state: &GatewayState,
    meta: &CallMeta,
    ended: Result<(), tokio::task::JoinError>,
) -> ApiError {
    match ended {
        Err(e) if e.is_panic() => {
            state.count_internal_error(&meta.route.upstream);
            ApiError::internal_error()
        }
        _ => ApiError::unavailable("the call was interrupted (server shutting down?); retry it"),
    }
}

/// The client's response to an answered call: the upstream's bytes, with headers naming the
/// model that answered when it is not the one asked, and the gate's verdict.
fn answer_response(asked: &CallMeta, answer: Answer) -> Response {
    let mut resp = json_bytes(answer.body);
    response_headers(&mut resp, &answer.meta);
    let h = resp.headers_mut();
    if answer.meta.route.name != asked.route.name {
        let name = if answer.attempts > 1 {
            "x-hypertool-escalated"
        } else {
            "x-hypertool-fallback"
        };
        if let Ok(v) = HeaderValue::from_str(&stage::header_safe(&format!(
            "{} -> {}",
            asked.route.name, answer.meta.route.name
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
    resp
}

type AnswerSender = tokio::sync::oneshot::Sender<Result<Answer, UpstreamError>>;

/// A non-streamed call's attempts: the first, then gate retries (on the stage's escalation
/// model when it has one) while the gate fails and retries and budget are left.
struct Attempts {
    state: GatewayState,
    settings: Arc<GatewaySettings>,
    /// The attempt under way (its route and call id change with a retry).
    meta: CallMeta,
    request: CallRequest,
    /// 1 for the first.
    attempt: u32,
    /// Whether this attempt is a gate retry on the stage's escalation model.
    escalated: bool,
    /// When the call began (the first attempt's start).
    started: Instant,
    cache_slot: Option<(String, Duration)>,
    /// The call's reservation and those of gate retries, held until their usage is stored.
    held: Vec<Reservation>,
    /// Usage of attempts whose answers failed the gate and were retried.
    earlier_attempts: Vec<Stamped>,
}

/// The attempt after a failed gate, admitted and stored.
struct Retry {
    target: Arc<ModelRoute>,
    call_id: Option<String>,
    escalating: bool,
}

impl Attempts {
    async fn run(mut self, answer_tx: AnswerSender) {
        let retries = self
            .meta
            .stage_call
            .as_ref()
            .filter(|c| c.gate().is_some())
            .map_or(0, |c| c.stage.retries);
        loop {
            let attempt_started = if self.attempt == 1 {
                self.started
            } else {
                Instant::now()
            };
            let asked = self.meta.route.name.clone();
            let result = call_with_fallbacks(
                &self.state,
                &self.settings,
                &self.meta,
                self.attempt,
                &mut self.request,
            )
            .await;
            let (answered_by, completion, generation) = match result {
                Ok(ok) => ok,
                Err(e) => return self.failed(e, answer_tx).await,
            };
            let fell_back = answered_by.name != asked;
            self.meta.route = answered_by;
            let Completion { body, usage, text } = completion;
            let (used, estimated) = match usage {
                Some(u) => (u, false),
                None => {
                    let deadline = timeout_of(&self.settings, &self.meta.route);
                    let usage = dialect::TokenUsage {
                        input: tokens::count_prompt(&self.request, deadline).await,
                        output: tokens::count_text_off(&text, deadline).await,
                        ..Default::default()
                    };
                    (usage, true)
                }
            };
            let verdict = judge(
                &self.state,
                &self.meta,
                &text,
                used.output,
                self.attempt,
                self.escalated,
                generation,
            )
            .await;
            let failed = verdict
                .as_ref()
                .is_some_and(|v| v.result == GateResult::Fail);
            let retry = if failed && self.attempt <= retries {
                self.gate_retry().await
            } else {
                None
            };
            let this_attempt =
                usage_event(&self.state, &self.meta, used, estimated, attempt_started);
            match retry {
                Some(retry) => self.next_attempt(retry, this_attempt),
                None => {
                    if !fell_back && !estimated && !failed && self.attempt == 1 {
                        self.cache(&body, used);
                    }
                    return self
                        .answered(body, verdict, used, this_attempt, answer_tx)
                        .await;
                }
            }
        }
    }

    /// No upstream answered: the client is told, the call's admission released, and the usage
    /// of earlier attempts stored.
    async fn failed(self, e: UpstreamError, answer_tx: AnswerSender) {
        let (state, meta) = (&self.state, &self.meta);
        state.count(&meta.route.upstream, "upstream_error");
        if let Some(held_back) = state
            .warnings
            .admit(&meta.route.name, e.code(), Instant::now())
        {
            tracing::warn!(persona = %meta.persona, model = %meta.route.name,
                similar_held_back = held_back, "{}", e.message());
        }
        let _ = answer_tx.send(Err(e));
        if self.earlier_attempts.is_empty() {
            release_admission(state, meta, self.held).await;
        } else {
            release_admission(state, meta, Vec::new()).await;
            store_usage(state, &meta.persona, self.earlier_attempts, self.held).await;
        }
    }

    /// Another attempt after a failed gate, on the escalation model if the stage has one: its
    /// budget reserved and its admission stored before it goes upstream. `None` when the budget
    /// does not admit it.
    async fn gate_retry(&mut self) -> Option<Retry> {
        let escalation = self
            .meta
            .stage_call
            .as_ref()
            .and_then(|c| c.escalation(&self.settings));
        let escalating = escalation.is_some();
        let target = escalation.unwrap_or_else(|| self.meta.route.clone());
        let estimate = self.meta.prompt_estimate;
        let cost = cost_of(&target, estimate, 0);
        let Ok((mut reservation, _, _)) =
            Reservation::take(&self.state, &self.meta, estimate, cost, None)
        else {
            tracing::info!(persona = %self.meta.persona, "quality-gate retry skipped: the budget is spent");
            return None;
        };
        let mut retry = self.meta.clone();
        retry.route = target.clone();
        store_admission(&self.state, &mut retry, estimate, cost)
            .await
            .ok()?;
        reservation.backs(&self.state, retry.call_id.as_deref());
        self.held.push(reservation);
        Some(Retry {
            target,
            call_id: retry.call_id,
            escalating,
        })
    }

    /// Moves on to the retry; the failed attempt's usage is stored with the last attempt (one
    /// commit, and the client is not kept waiting for it), its reservation held until then.
    fn next_attempt(&mut self, retry: Retry, failed_attempt: Stamped) {
        self.earlier_attempts.push(failed_attempt);
        self.state.count(&self.meta.route.upstream, "ok");
        self.state.count(&retry.target.upstream, "gate_retry");
        tracing::info!(from = %self.meta.route.name, to = %retry.target.name, attempt = self.attempt + 1,
            "retrying a call whose output failed the quality gate");
        self.meta.route = retry.target;
        self.meta.call_id = retry.call_id;
        self.attempt += 1;
        self.escalated = retry.escalating;
    }

    /// A first attempt's clean answer goes into the cache (here and, shared, to the fleet).
    fn cache(&mut self, body: &Bytes, used: dialect::TokenUsage) {
        if let Some((key, ttl)) = self.cache_slot.take() {
            let expires = self.state.shared.clock.now_ms() + ttl.as_millis() as i64;
            let cache = &self.state.cache;
            cache.share(&key, body, used.input, used.output, ttl);
            cache.insert(key, body.clone(), used.input, used.output, expires);
        }
    }

    /// The last attempt answered: traced, every attempt's usage stored, then the answer
    /// released — an answered call is never missing from the ledger, nor there as an estimate.
    async fn answered(
        mut self,
        body: Bytes,
        verdict: Option<GateVerdict>,
        used: dialect::TokenUsage,
        last_attempt: Stamped,
        answer_tx: AnswerSender,
    ) {
        trace::request(
            &self.state,
            &self.meta,
            trace::CallOutcome {
                status: 200,
                attempts: self.attempt,
                verdict: verdict.as_ref(),
                usage: Some((used.input, used.output)),
                ..Default::default()
            },
        );
        let mut events = std::mem::take(&mut self.earlier_attempts);
        events.push(last_attempt);
        store_usage(&self.state, &self.meta.persona, events, self.held).await;
        let _ = answer_tx.send(Ok(Answer {
            meta: self.meta.clone(),
            body,
            verdict,
            attempts: self.attempt,
        }));
        self.state.count(&self.meta.route.upstream, "ok");
    }
}
