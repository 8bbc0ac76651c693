//! A gateway call's spans: the request as the client made it (`POST /v1/chat/completions`,
//! server) and, as its children, every upstream attempt — each retry, fallback and quality-gate
//! retry — as a generation (`chat {model}`, client; `gen_ai.*` attributes). The call continues
//! an incoming W3C `traceparent`; without one, a call in a workflow run belongs to the run's trace
//! under its stage's span; otherwise it begins a trace. Each attempt passes its own span on to the
//! upstream as `traceparent`.
//!
//! With no trace destination, `CallMeta::trace` is `None` and none of this runs.

use super::*;
use crate::telemetry::trace::events::{run_trace, stage_span};
use crate::telemetry::trace::ids::{SpanId, TraceId, TraceParent};
use crate::telemetry::trace::span::{Content, Kind, Role, SpanRecord};

tokio::task_local! {
    /// The `traceparent` an upstream request carries (set around one attempt, read where the
    /// request is built, so the provider interface need not know about tracing).
    pub static OUTGOING_TRACEPARENT: String;
}

/// The `traceparent` of the attempt being made, if it is traced.
pub fn outgoing_traceparent() -> Option<String> {
    OUTGOING_TRACEPARENT.try_with(Clone::clone).ok()
}

/// Where a call's spans go.
#[derive(Debug, Clone)]
pub(super) struct CallTrace {
    pub(super) trace_id: TraceId,
    /// The request span.
    pub(super) span_id: SpanId,
    parent: Option<SpanId>,
    remote_parent: bool,
    start_ns: u64,
    started: Instant,
}

impl CallTrace {
    /// The call's place in a trace, or `None` when nothing takes spans.
    pub(super) fn begin(
        state: &GatewayState,
        headers: &HeaderMap,
        stage_call: Option<&stage::StageCall>,
    ) -> Option<CallTrace> {
        if !state.shared.tracer.exports() {
            return None;
        }
        let incoming = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        let in_run = stage_call.and_then(|c| c.run.as_deref().map(|r| (r, c.stage.name.as_str())));
        let (trace_id, parent, remote_parent) = match (incoming, in_run) {
            (Some(tp), _) => (tp.trace_id, Some(tp.parent), true),
            (None, Some((run, stage))) => (run_trace(run), Some(stage_span(run, stage)), false),
            (None, None) => (TraceId::random(), None, false),
        };
        Some(CallTrace {
            trace_id,
            span_id: SpanId::random(),
            parent,
            remote_parent,
            start_ns: now_ns(state),
            started: Instant::now(),
        })
    }
}

fn now_ns(state: &GatewayState) -> u64 {
    crate::telemetry::trace::span::ms_to_ns(state.shared.clock.now_ms())
}

fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The attribution every span of a call carries.
fn attribute(s: &mut SpanRecord, meta: &CallMeta) {
    s.set("hypertool.persona", meta.persona.as_str());
    s.set("hypertool.chatmode", meta.chatmode.as_str());
    s.set_opt("hypertool.workflow", meta.workflow.clone());
    s.set_opt("hypertool.stage", meta.stage.clone());
    s.set_opt("hypertool.run", meta.run());
    s.set_opt("session.id", meta.session.clone());
    if let Some(v) = meta.variant() {
        s.set("hypertool.variant", v.name.as_str());
        s.set_opt(
            "hypertool.prompt_version",
            v.prompt.as_ref().map(|p| p.version.clone()),
        );
    }
}

/// One upstream attempt being traced.
pub(super) struct Attempt {
    pub(super) span_id: SpanId,
    start_ns: u64,
    started: Instant,
    traceparent: String,
}

impl Attempt {
    pub(super) fn begin(state: &GatewayState, meta: &CallMeta) -> Option<Attempt> {
        let t = meta.trace.as_ref()?;
        let span_id = SpanId::random();
        Some(Attempt {
            span_id,
            start_ns: now_ns(state),
            started: Instant::now(),
            traceparent: TraceParent::header(t.trace_id, span_id),
        })
    }

    /// Runs `f` with this attempt's `traceparent` set for the upstream request.
    pub(super) async fn scope<F: std::future::Future>(
        attempt: Option<&Attempt>,
        f: F,
    ) -> F::Output {
        match attempt {
            Some(a) => OUTGOING_TRACEPARENT.scope(a.traceparent.clone(), f).await,
            None => f.await,
        }
    }
}

/// What an attempt produced, for its span.
pub(super) struct AttemptOutcome<'a> {
    pub(super) route: &'a ModelRoute,
    pub(super) usage: Option<(u64, u64)>,
    pub(super) output: Option<&'a str>,
    pub(super) error: Option<&'a UpstreamError>,
    /// 1 for the call, 2 for its first quality-gate retry, …
    pub(super) gate_attempt: u32,
    /// Retries of this route before this attempt.
    pub(super) retry: u32,
    pub(super) streamed: bool,
    /// `chat` or `embeddings` (OpenTelemetry's `gen_ai.operation.name`).
    pub(super) operation: &'static str,
}

/// Emits the generation span of one upstream attempt.
pub(super) fn generation(
    state: &GatewayState,
    meta: &CallMeta,
    attempt: Option<Attempt>,
    messages: Option<&Value>,
    o: AttemptOutcome<'_>,
) {
    let (Some(a), Some(t)) = (attempt, meta.trace.as_ref()) else {
        return;
    };
    let mut s = SpanRecord::new(
        t.trace_id,
        a.span_id,
        Some(t.span_id),
        format!("{} {}", o.operation, o.route.name),
        Role::Generation,
    )
    .kind(Kind::Client);
    s.start_ns = a.start_ns;
    s.end_ns = a.start_ns.saturating_add(elapsed_ns(a.started));
    // The call's attribution is on its request span (the parent); the persona stays here too, as
    // the generation's user.
    s.set("hypertool.persona", meta.persona.as_str());
    s.set("gen_ai.operation.name", o.operation);
    s.set("gen_ai.provider.name", o.route.upstream.as_str());
    s.set("gen_ai.request.model", o.route.name.as_str());
    s.set("gen_ai.response.model", o.route.upstream_model.as_str());
    if let Some((input, output)) = o.usage {
        s.set("gen_ai.usage.input_tokens", input);
        s.set("gen_ai.usage.output_tokens", output);
        if let Some(p) = o.route.prices {
            s.set("hypertool.cost_usd", p.cost(input, output));
        }
    }
    if o.gate_attempt > 1 {
        s.set("hypertool.gate_attempt", o.gate_attempt);
    }
    if o.retry > 0 {
        s.set("hypertool.retry", o.retry);
    }
    if o.streamed {
        s.set("hypertool.streamed", true);
    }
    if let Some(e) = o.error {
        s.set("error.type", e.code());
        s.error = Some(e.message());
    }
    if state.shared.tracer.wants_content() {
        let input = messages.map(|m| state.shared.tracer.redact(&m.to_string()));
        let output = o.output.map(|t| state.shared.tracer.redact(t));
        if input.is_some() || output.is_some() {
            s.content = Some(Content {
                input: input.unwrap_or_default(),
                output: output.unwrap_or_default(),
            });
        }
    }
    if state.shared.tracer.langfuse_unreachable() {
        log_generation(meta, &s);
    }
    state.shared.tracer.emit(s);
}

/// The runbook's "fallback to local logging": a generation that Langfuse is not getting.
fn log_generation(meta: &CallMeta, s: &SpanRecord) {
    use crate::telemetry::trace::span::Value;
    let int = |k: &str| match s.attr(k) {
        Some(Value::Int(n)) => *n,
        _ => 0,
    };
    let cost = match s.attr("hypertool.cost_usd") {
        Some(Value::Float(c)) => Some(*c),
        _ => None,
    };
    tracing::info!(
        target: "hypertool::generation",
        trace_id = %s.trace_id,
        span_id = %s.span_id,
        persona = %meta.persona,
        chatmode = %meta.chatmode,
        workflow = meta.workflow.as_deref().unwrap_or(""),
        stage = meta.stage.as_deref().unwrap_or(""),
        run = meta.run().as_deref().unwrap_or(""),
        session = meta.session.as_deref().unwrap_or(""),
        model = s.attr_str("gen_ai.request.model").unwrap_or(""),
        input_tokens = int("gen_ai.usage.input_tokens"),
        output_tokens = int("gen_ai.usage.output_tokens"),
        cost_usd = cost,
        duration_ms = s.end_ns.saturating_sub(s.start_ns) / 1_000_000,
        error = s.error.as_deref().unwrap_or(""),
        "generation (Langfuse is not getting traces)"
    );
}

/// How the call ended, for the request span.
#[derive(Default)]
pub(super) struct CallOutcome<'a> {
    /// The route called; the call's dialect's when empty.
    pub(super) route: &'static str,
    pub(super) status: u16,
    pub(super) cache_hit: bool,
    pub(super) attempts: u32,
    pub(super) verdict: Option<&'a GateVerdict>,
    pub(super) usage: Option<(u64, u64)>,
    pub(super) error: Option<String>,
}

/// Ends the request span of a call refused or failed before it was answered (`traced` is the
/// call's attribution, kept only when it is traced).
pub(super) fn refused(
    state: &GatewayState,
    traced: Option<&CallMeta>,
    route: &'static str,
    e: &ApiError,
) {
    if let Some(meta) = traced {
        request(
            state,
            meta,
            CallOutcome {
                route,
                status: e.status().as_u16(),
                error: Some(e.message.clone()),
                ..Default::default()
            },
        );
    }
}

/// Emits the request span of a call.
pub(super) fn request(state: &GatewayState, meta: &CallMeta, o: CallOutcome<'_>) {
    let Some(t) = meta.trace.as_ref() else {
        return;
    };
    let route = if o.route.is_empty() {
        meta.dialect.route()
    } else {
        o.route
    };
    let mut s = SpanRecord::new(
        t.trace_id,
        t.span_id,
        t.parent,
        format!("POST {route}"),
        Role::Request,
    )
    .kind(Kind::Server);
    s.parent_is_remote = t.remote_parent;
    s.start_ns = t.start_ns;
    s.end_ns = t.start_ns.saturating_add(elapsed_ns(t.started));
    attribute(&mut s, meta);
    // The span's name says the method and route; what is usual is left out (no cache hit, one
    // attempt): every attribute is bytes and CPU for every call.
    s.set("http.response.status_code", u32::from(o.status));
    s.set("gen_ai.request.model", meta.route.name.as_str());
    if o.cache_hit {
        s.set("hypertool.cache_hit", true);
    }
    if o.attempts > 1 {
        s.set("hypertool.attempts", o.attempts);
    }
    if let Some((input, output)) = o.usage {
        s.set("gen_ai.usage.input_tokens", input);
        s.set("gen_ai.usage.output_tokens", output);
        if let Some(p) = meta.route.prices {
            s.set("hypertool.cost_usd", p.cost(input, output));
        }
    }
    if let Some(v) = o.verdict {
        let pass = v.result == GateResult::Pass;
        s.set("hypertool.gate.result", if pass { "pass" } else { "fail" });
    }
    s.error = o.error;
    state.shared.tracer.emit(s);
}
