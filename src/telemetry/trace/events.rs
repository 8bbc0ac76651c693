//! Spans of what the events say: workflow runs and their stages (a stage span lasts from its start
//! to its end), persona switches (explicit, inferred from usage, and suppressed), quality-gate
//! verdicts. Made on the ledger writer thread right after each event is applied (never during the
//! replay at start-up), from the event and the engine's observations of it.
//!
//! Ids are derived from the run and stage, so the stage's span, sent when the stage ends, is the
//! parent the gateway already named for the calls made while it ran.

use crate::core::engine::Observation;
use crate::core::event::{Event, GateResult, GateVerdictEvent, Stamped};

use super::ids::{SpanId, TraceId};
use super::span::{Role, Score, SpanRecord};
use super::Tracer;

/// The trace of a workflow run.
pub fn run_trace(run: &str) -> TraceId {
    TraceId::derived(&["hypertool.run", run])
}

/// The span of a workflow run.
pub fn run_span(run: &str) -> SpanId {
    SpanId::derived(&["hypertool.run", run])
}

/// The span of a stage of a run.
pub fn stage_span(run: &str, stage: &str) -> SpanId {
    SpanId::derived(&["hypertool.stage", run, stage])
}

impl Tracer {
    /// Spans of one applied event (see the module's documentation).
    pub fn on_applied(&self, stamped: &Stamped, observations: Vec<Observation>) {
        if !self.exports() {
            return;
        }
        let at = stamped.at;
        match &stamped.event {
            Event::PersonaSwitch(s) => self.emit(switch_span(
                at,
                &s.session,
                s.from.as_deref(),
                &s.to,
                &s.chatmode,
                "explicit",
                None,
            )),
            Event::SwitchSuppressed {
                session,
                from,
                to,
                chatmode,
                reason,
            } => self.emit(switch_span(
                at,
                session,
                from.as_deref(),
                to,
                chatmode,
                "suppressed",
                Some(reason),
            )),
            Event::McpToolCall(c) => self.emit(tool_call_span(at, c)),
            _ => {}
        }
        for o in observations {
            match o {
                Observation::InferredSwitch {
                    session,
                    from,
                    to,
                    chatmode,
                } => self.emit(switch_span(
                    at,
                    &session,
                    from.as_deref(),
                    &to,
                    &chatmode,
                    "inferred",
                    None,
                )),
                Observation::StageEnded(e) => {
                    let mut s = SpanRecord::new(
                        run_trace(&e.run),
                        stage_span(&e.run, &e.stage),
                        Some(run_span(&e.run)),
                        format!("stage {}", e.stage),
                        Role::Stage,
                    )
                    .between_ms(e.started_at, at);
                    s.set("hypertool.workflow", e.workflow.as_str());
                    s.set("hypertool.stage", e.stage.as_str());
                    s.set("hypertool.run", e.run.as_str());
                    s.set_opt("hypertool.persona", e.persona.clone());
                    let status = match e.status {
                        crate::core::runs::StageStatus::Passed => "passed",
                        crate::core::runs::StageStatus::Failed => "failed",
                        crate::core::runs::StageStatus::Running => "running",
                        crate::core::runs::StageStatus::Finished => "finished",
                    };
                    s.set("hypertool.stage.status", status);
                    if status == "failed" {
                        s.error = Some("the stage's last quality-gate verdict was fail".into());
                    }
                    self.emit(s);
                }
                Observation::RunEnded {
                    run,
                    workflow,
                    session,
                    started_at,
                    status,
                } => {
                    let mut s = SpanRecord::new(
                        run_trace(&run),
                        run_span(&run),
                        None,
                        format!("workflow {workflow}"),
                        Role::Run,
                    )
                    .between_ms(started_at, at);
                    s.set("hypertool.workflow", workflow.as_str());
                    s.set("hypertool.run", run.as_str());
                    s.set("hypertool.run.status", status);
                    s.set_opt("session.id", session);
                    if status == "failed" {
                        s.error = Some("the run failed".into());
                    }
                    self.emit(s);
                }
            }
        }
    }

    /// A quality-gate verdict: a span (under the generation it judged, else under its run's stage)
    /// and, where scores are taken, a score on that generation (else on the run's trace).
    pub fn gate_verdict(&self, at: i64, g: &GateVerdictEvent, judged: Option<(TraceId, SpanId)>) {
        if !self.exports() {
            return;
        }
        let (trace, parent) = match (judged, &g.run) {
            (Some((t, s)), _) => (t, Some(s)),
            (None, Some(run)) => (run_trace(run), Some(stage_span(run, &g.stage))),
            (None, None) => (TraceId::random(), None),
        };
        let span_id = SpanId::random();
        let mut s =
            SpanRecord::new(trace, span_id, parent, "quality_gate", Role::Gate).between_ms(at, at);
        s.set("hypertool.workflow", g.workflow.as_str());
        s.set("hypertool.stage", g.stage.as_str());
        s.set_opt("hypertool.run", g.run.clone());
        s.set("gen_ai.request.model", g.model.as_str());
        let pass = g.result == GateResult::Pass;
        s.set("hypertool.gate.result", if pass { "pass" } else { "fail" });
        s.set("hypertool.gate.attempt", g.attempt);
        s.set_opt("hypertool.gate.failed_criteria", g.reasons.clone());
        if !pass {
            s.error = Some(
                g.reasons
                    .clone()
                    .unwrap_or_else(|| "quality gate failed".into()),
            );
        }
        self.emit(s);
        self.score(Score {
            id: format!("quality_gate-{}", span_id.hex()),
            trace_id: trace,
            observation: judged.map(|(_, s)| s),
            name: "quality_gate",
            value: if pass { 1.0 } else { 0.0 },
            comment: g.reasons.clone().filter(|r| !r.is_empty()),
            at_ms: at,
        });
    }
}

/// `mcp.tools/call`: a tool call through the MCP proxy, from the client's request to the answer
/// (the MCP semantic conventions' span name and `mcp.method.name`, `gen_ai.tool.name`).
fn tool_call_span(at: i64, c: &crate::core::event::McpToolCall) -> SpanRecord {
    let end = at + (c.duration_seconds * 1000.0).round() as i64;
    let mut s = SpanRecord::new(
        TraceId::random(),
        SpanId::random(),
        None,
        "mcp.tools/call",
        Role::Tool,
    )
    .kind(crate::telemetry::trace::span::Kind::Client)
    .between_ms(at, end);
    s.set("mcp.method.name", "tools/call");
    s.set("gen_ai.tool.name", c.tool.clone());
    s.set("gen_ai.operation.name", "execute_tool");
    s.set("hypertool.mcp.server", c.server.clone());
    s.set("hypertool.persona", c.persona.clone());
    s.set("hypertool.mcp.result", c.result.as_str());
    if let Some(session) = &c.session {
        s.set("session.id", session.clone());
    }
    if c.result != crate::core::event::ToolCallResult::Ok {
        s.error = Some(format!("tool call {}", c.result.as_str()));
    }
    s
}

fn switch_span(
    at: i64,
    session: &str,
    from: Option<&str>,
    to: &str,
    chatmode: &str,
    how: &'static str,
    suppressed_because: Option<&str>,
) -> SpanRecord {
    let mut s = SpanRecord::new(
        TraceId::random(),
        SpanId::random(),
        None,
        "persona_switch",
        Role::Switch,
    )
    .between_ms(at, at);
    s.set("hypertool.persona.from", from.unwrap_or("none"));
    s.set("hypertool.persona.to", to);
    s.set("hypertool.persona", to);
    s.set("hypertool.chatmode", chatmode);
    s.set("session.id", session);
    s.set("hypertool.switch.kind", how);
    if let Some(reason) = suppressed_because {
        s.set("hypertool.switch.suppressed_reason", reason);
    }
    s
}
