//! `hypertool simulate`: the runbook's situations on a virtual clock, through the real core.
//!
//! A scenario feeds events into an [`Engine`] step by step; at every evaluation interval the alert
//! engine scrapes the engine's exposition and evaluates the seven rules. The timeline of alert states
//! is the result. [`promtool_test`] writes the very samples the embedded engine saw as a promtool test
//! whose expectations are the embedded engine's verdicts at every evaluation: `promtool test rules`
//! passing on it proves Prometheus and the embedded engine agree.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::rules::{AlertId, AlertSettings};
use super::{AlertEngine, AlertState, LangfuseStatus};
use crate::core::clock::UnixMillis;
use crate::core::engine::{Engine, EngineConfig};
use crate::core::event::{
    Event, GateResult, GateVerdictEvent, PersonaSwitch, StageResult, Stamped, Usage,
};
use crate::telemetry::exposition::{render, Format};
use crate::telemetry::families as f;
use crate::telemetry::registry::{Counter, Gauge, Registry};

/// The instance label of the simulated metrics endpoint.
pub const SIM_INSTANCE: &str = "127.0.0.1:9464";

/// A named situation from the runbook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub minutes: i64,
    /// Alerts that must be firing at the end (the others must not be).
    pub expect_firing: &'static [AlertId],
}

pub const SCENARIOS: [Scenario; 14] = [
    Scenario {
        name: "healthy",
        about: "steady work within budget, gates passing, few switches, Langfuse working",
        minutes: 20,
        expect_firing: &[],
    },
    Scenario {
        name: "budget-overrun",
        about: "backend-engineer spends 100 tokens every 15 s against a 2000-token budget",
        minutes: 8,
        expect_firing: &[AlertId::TokenBudgetExceeded],
    },
    Scenario {
        name: "soft-limit",
        about: "frontend-engineer spends 100 tokens a minute against an 1800-token budget: past its soft \
                limit (80 %, 1440) after 15 minutes and still within budget; the trend predicts the rest",
        minutes: 17,
        expect_firing: &[
            AlertId::TokenBudgetSoftLimitReached,
            AlertId::TokenBudgetDepletionPredicted,
        ],
    },
    Scenario {
        name: "depletion-trend",
        about: "data-scientist burns 40 tokens a minute: 1700 left would last 42 minutes",
        minutes: 16,
        expect_firing: &[AlertId::TokenBudgetDepletionPredicted],
    },
    Scenario {
        name: "gate-failures",
        about: "feature-development/implementation fails its quality gate 2 times in 5",
        minutes: 12,
        expect_firing: &[AlertId::HighQualityGateFailureRate],
    },
    Scenario {
        name: "persona-thrash",
        about: "sessions oscillate backend-engineer <-> testing-specialist, 3 switches per second",
        minutes: 8,
        expect_firing: &[AlertId::ExcessivePersonaSwitching],
    },
    Scenario {
        name: "slow-stage",
        about: "feature-development/review stages take 400 s each",
        minutes: 16,
        expect_firing: &[AlertId::SlowWorkflowStage],
    },
    Scenario {
        name: "langfuse-down",
        about: "Langfuse traces are created for 4 minutes, then stop while LLM calls go on",
        minutes: 16,
        expect_firing: &[AlertId::LangfuseIntegrationFailing],
    },
    Scenario {
        name: "langfuse-never-configured",
        about: "LLM calls go on and no Langfuse key was ever set (enabled = \"auto\"): no trace is \
                expected, so no alert",
        minutes: 16,
        expect_firing: &[],
    },
    Scenario {
        name: "langfuse-wrong-keys",
        about: "both Langfuse keys are set but Langfuse refuses them (401) from the start: no trace is \
                ever created while LLM calls go on",
        minutes: 16,
        expect_firing: &[AlertId::LangfuseIntegrationFailing],
    },
    Scenario {
        name: "metrics-down",
        about: "the metrics endpoint stops answering after 3 minutes",
        minutes: 7,
        expect_firing: &[AlertId::HypertoolMetricsNotReported],
    },
    Scenario {
        name: "gate-escalation",
        about: "feature-development/implementation on the balanced tier fails its gate every time; the \
                gateway's retry on the quality tier passes (half the verdicts fail)",
        minutes: 12,
        expect_firing: &[AlertId::HighQualityGateFailureRate],
    },
    Scenario {
        name: "oscillating-session",
        about: "one session goes backend-engineer -> testing-specialist -> backend-engineer ... every \
                7.5 s: far below the switch-rate alert, but flagged as an oscillation",
        minutes: 5,
        expect_firing: &[],
    },
    Scenario {
        name: "hung-stage",
        about: "an incident-response run's diagnosis stage starts and never ends: no duration is ever \
                observed, but its running age is, and passes 300 s",
        minutes: 16,
        expect_firing: &[AlertId::SlowWorkflowStage],
    },
];

pub fn find(name: &str) -> Option<Scenario> {
    SCENARIOS.into_iter().find(|s| s.name == name)
}

/// One alert instance's state at one evaluation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InstanceAt {
    pub alertname: &'static str,
    pub state: AlertState,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub value: f64,
}

/// Every evaluation of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub at_ms: UnixMillis,
    /// Pending and firing instances.
    pub active: Vec<InstanceAt>,
}

pub struct Run {
    pub scenario: Scenario,
    pub settings: AlertSettings,
    pub evaluations: Vec<Evaluation>,
    /// What the core noticed besides alerts (oscillations, gate verdicts, running stages).
    pub notes: Vec<String>,
    engine: AlertEngine,
}

fn usage(persona: &str, chatmode: &str, model: &str, tokens: u64, session: Option<&str>) -> Event {
    Event::Usage(Usage {
        persona: persona.into(),
        chatmode: chatmode.into(),
        model: model.into(),
        prompt_tokens: tokens * 4 / 5,
        completion_tokens: tokens - tokens * 4 / 5,
        workflow: None,
        stage: None,
        session: session.map(str::to_string),
        cost_usd: None,
        ..Usage::default()
    })
}

fn stage(workflow: &str, stage: &str, persona: &str, secs: f64, pass: bool) -> Event {
    Event::Stage(StageResult {
        workflow: workflow.into(),
        stage: stage.into(),
        persona: persona.into(),
        model: "gpt-4".into(),
        duration_seconds: secs,
        gate: if pass {
            GateResult::Pass
        } else {
            GateResult::Fail
        },
        reason: (!pass).then(|| "missing required section".to_string()),
    })
}

/// The events of step `i` (one evaluation interval) of a scenario, and whether the metrics endpoint
/// answers and Langfuse creates traces during it.
fn step(scenario: &str, i: i64, step_ms: i64) -> (Vec<Event>, bool, u32) {
    let t_min = (i * step_ms) as f64 / 60_000.0;
    let mut events = Vec::new();
    let mut up = true;
    let mut traces = 1;
    match scenario {
        "healthy" => healthy(i, &mut events),
        "budget-overrun" => events.push(usage("backend-engineer", "feature", "gpt-4", 100, None)),
        "depletion-trend" => events.push(usage("data-scientist", "analysis", "gpt-4", 10, None)),
        "soft-limit" => events.push(usage("frontend-engineer", "feature", "gpt-4", 25, None)),
        "gate-failures" => {
            events.push(usage("backend-engineer", "feature", "gpt-4", 2, None));
            events.push(stage(
                "feature-development",
                "implementation",
                "backend-engineer",
                30.0,
                i % 5 >= 2,
            ));
        }
        "persona-thrash" => persona_thrash(i, step_ms, &mut events),
        "slow-stage" => {
            events.push(usage("backend-engineer", "feature", "gpt-4", 2, None));
            events.push(stage(
                "feature-development",
                "review",
                "testing-specialist",
                400.0,
                true,
            ));
        }
        "langfuse-down" => {
            events.push(usage("devops-engineer", "ops", "gpt-4", 5, None));
            if t_min >= 4.0 {
                traces = 0;
            }
        }
        "langfuse-never-configured" | "langfuse-wrong-keys" => {
            events.push(usage("devops-engineer", "ops", "gpt-4", 5, None));
            traces = 0;
        }
        "metrics-down" => {
            events.push(usage("devops-engineer", "ops", "gpt-4", 5, None));
            up = t_min < 3.0;
        }
        "gate-escalation" => gate_escalation(&mut events),
        "oscillating-session" => oscillating_session(i, &mut events),
        "hung-stage" => hung_stage(i, &mut events),
        _ => {}
    }
    (events, up, traces)
}

/// A quiet team: a little usage, a persona that stays, stages well within their time.
fn healthy(i: i64, events: &mut Vec<Event>) {
    events.push(usage(
        "frontend-engineer",
        "feature",
        "gpt-4",
        4,
        Some("h1"),
    ));
    if i % 8 == 0 {
        events.push(Event::PersonaSwitch(PersonaSwitch {
            session: "h1".into(),
            from: Some("frontend-engineer".into()),
            to: "frontend-engineer".into(),
            chatmode: "feature".into(),
        }));
    }
    if i % 4 == 0 {
        events.push(stage(
            "feature-development",
            "implementation",
            "backend-engineer",
            45.0,
            true,
        ));
    }
}

/// Three switches a second between two personas, over three sessions.
fn persona_thrash(i: i64, step_ms: i64, events: &mut Vec<Event>) {
    events.push(usage("testing-specialist", "feature", "gpt-4", 1, None));
    let per_step = 3 * step_ms / 1000;
    for k in 0..per_step {
        let (from, to) = if (i * per_step + k) % 2 == 0 {
            ("backend-engineer", "testing-specialist")
        } else {
            ("testing-specialist", "backend-engineer")
        };
        events.push(Event::PersonaSwitch(PersonaSwitch {
            session: format!("thrash-{}", k % 3),
            from: Some(from.into()),
            to: to.into(),
            chatmode: "feature".into(),
        }));
    }
}

/// A gate that fails on the balanced model and passes on the escalation model.
fn gate_escalation(events: &mut Vec<Event>) {
    for (attempt, model, result) in [
        (1, "mock/balanced", GateResult::Fail),
        (2, "mock/quality", GateResult::Pass),
    ] {
        events.push(usage(
            "backend-engineer",
            "feature-implementation",
            model,
            3,
            None,
        ));
        events.push(Event::QualityGate(GateVerdictEvent {
            workflow: "feature-development".into(),
            stage: "implementation".into(),
            model: model.into(),
            result,
            reasons: (result == GateResult::Fail)
                .then(|| "code_block: no fenced code block".to_string()),
            run: None,
            attempt,
            variant: None,
            escalated: false,
        }));
    }
}

/// Two switches per 15 s step, alternating, in one session.
fn oscillating_session(i: i64, events: &mut Vec<Event>) {
    for k in 0..2 {
        let n = i * 2 + k;
        let (from, to) = if n % 2 == 0 {
            ("testing-specialist", "backend-engineer")
        } else {
            ("backend-engineer", "testing-specialist")
        };
        events.push(Event::PersonaSwitch(PersonaSwitch {
            session: "osc-1".into(),
            from: (n > 0).then(|| from.to_string()),
            to: to.into(),
            chatmode: "feature-implementation".into(),
        }));
    }
}

/// A run whose diagnosis stage starts and never ends.
fn hung_stage(i: i64, events: &mut Vec<Event>) {
    if i == 0 {
        events.push(Event::RunStarted {
            run: "run-hung".into(),
            workflow: "incident-response".into(),
            session: None,
            owner: None,
        });
        events.push(Event::StageStarted {
            run: "run-hung".into(),
            workflow: "incident-response".into(),
            stage: "diagnosis".into(),
            persona: Some("devops-engineer".into()),
            variant: None,
        });
    }
    events.push(usage("devops-engineer", "incident", "gpt-4", 2, None));
}

/// Runs `scenario` from t = 0 (1970-01-01T00:00:00Z, as promtool counts) on a virtual clock.
pub fn run(scenario: Scenario, engine_config: EngineConfig, settings: AlertSettings) -> Run {
    let step_ms = settings.evaluation_interval.ms();
    let mut core = Engine::new(engine_config, 0);
    let langfuse = if scenario.name == "langfuse-never-configured" {
        LangfuseStatus::Disabled
    } else {
        LangfuseStatus::Configured
    };
    // The process's side of the exposition, as a healthy server shows it; the Langfuse scenario
    // counts refused batches as the exporter does.
    let process = Registry::new();
    let expected = langfuse.expected();
    process.collect(&f::LANGFUSE_ENABLED, move |emit| {
        emit(&[], if expected { 1.0 } else { 0.0 })
    });
    process.collect(&f::LEDGER_WRITABLE, |emit| emit(&[], 1.0));
    process.collect(&f::CONFIG_LAST_RELOAD_SUCCESSFUL, |emit| emit(&[], 1.0));
    process.collect(&f::BUILD_INFO, |emit| {
        emit(&[env!("CARGO_PKG_VERSION")], 1.0)
    });
    let exports = Counter::<2>::new(&f::TRACE_EXPORT_TOTAL);
    let spooled = Gauge::<1>::new(&f::TRACE_SPOOL_BYTES);
    process.register(exports.clone());
    process.register(spooled.clone());
    let mut alerts = AlertEngine::new(settings.clone(), langfuse);
    alerts.keep_full_history();
    let steps = scenario.minutes * 60_000 / step_ms;
    let mut evaluations = Vec::new();
    for i in 0..=steps {
        let at = i * step_ms;
        let (events, up, traces) = step(scenario.name, i, step_ms);
        let n = events.len().max(1) as i64;
        for (k, event) in events.into_iter().enumerate() {
            // Spread a step's events over the interval that ends at `at`.
            let t = if i == 0 {
                0
            } else {
                at - step_ms + (k as i64 + 1) * step_ms / n
            };
            core.apply(&Stamped { at: t, event });
        }
        core.metrics_mut().langfuse_traces_created += f64::from(traces);
        if scenario.name == "langfuse-wrong-keys" {
            // One refused batch per step, as the exporter counts them.
            exports.inc(["langfuse", "auth_refused"]);
            spooled.set(["langfuse"], 1024.0 * (i + 1) as f64);
        }
        core.tick(at);
        alerts.ingest_exposition(at, &render(&core, &process.snapshot(), Format::Classic));
        alerts.ingest_up(at, SIM_INSTANCE, up);
        alerts.evaluate(at);
        let mut active: Vec<InstanceAt> = alerts
            .instances()
            .into_iter()
            .filter(|a| a.state != AlertState::Inactive)
            .map(|a| InstanceAt {
                alertname: a.alertname,
                state: a.state,
                labels: a.labels.clone(),
                annotations: a.annotations.clone(),
                value: a.value,
            })
            .collect();
        active.sort_by(|a, b| (a.alertname, &a.labels).cmp(&(b.alertname, &b.labels)));
        evaluations.push(Evaluation { at_ms: at, active });
    }
    let mut notes = Vec::new();
    let m = core.metrics();
    let oscillations = m.oscillations.sum();
    if oscillations > 0.0 {
        notes.push(format!(
            "oscillations flagged: {oscillations} (hypertool_persona_oscillations_total)"
        ));
    }
    let mut gates: BTreeMap<String, f64> = BTreeMap::new();
    for (labels, v) in m.quality_gates.sorted() {
        *gates
            .entry(format!("{}/{} {}", labels[0], labels[1], labels[3]))
            .or_insert(0.0) += v;
    }
    for (k, v) in gates {
        notes.push(format!("quality gate {k}: {v}"));
    }
    let end = scenario.minutes * 60_000;
    for ((workflow, stage), since) in core.runs().oldest_running() {
        notes.push(format!(
            "stage {workflow}/{stage} still running after {} s",
            (end - since) / 1000
        ));
    }
    Run {
        scenario,
        settings,
        evaluations,
        notes,
        engine: alerts,
    }
}

pub fn fmt_offset(ms: i64) -> String {
    let s = ms / 1000;
    format!("{:02}m{:02}s", s / 60, s % 60)
}

impl Run {
    /// Alerts firing at the last evaluation.
    pub fn firing_at_end(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self
            .evaluations
            .last()
            .map(|e| {
                e.active
                    .iter()
                    .filter(|a| a.state == AlertState::Firing)
                    .map(|a| a.alertname)
                    .collect()
            })
            .unwrap_or_default();
        names.dedup();
        names
    }

    /// True when exactly the scenario's expected alerts fire at the end.
    pub fn as_expected(&self) -> bool {
        let mut want: Vec<&str> = self
            .scenario
            .expect_firing
            .iter()
            .map(|a| a.name())
            .collect();
        want.sort();
        let mut got = self.firing_at_end();
        got.sort();
        want == got
    }

    /// A human timeline: every state change.
    pub fn timeline(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {}: {}",
            self.scenario.name, self.scenario.about
        );
        let mut previous: BTreeMap<(String, String), AlertState> = BTreeMap::new();
        for e in &self.evaluations {
            let mut now: BTreeMap<(String, String), (AlertState, f64)> = BTreeMap::new();
            for a in &e.active {
                let series: Vec<String> = a
                    .labels
                    .iter()
                    .filter(|(k, _)| !super::RULE_LABELS.contains(&k.as_str()))
                    .map(|(k, v)| format!("{k}=\"{v}\""))
                    .collect();
                now.insert(
                    (a.alertname.to_string(), series.join(",")),
                    (a.state, a.value),
                );
            }
            for (key, (state, value)) in &now {
                if previous.get(key) != Some(state) {
                    let from = previous.get(key).copied().unwrap_or(AlertState::Inactive);
                    let _ = writeln!(
                        out,
                        "  {}  {}{{{}}}  {} -> {}  (value {:.2})",
                        fmt_offset(e.at_ms),
                        key.0,
                        key.1,
                        state_name(from),
                        state_name(*state),
                        value
                    );
                }
            }
            for key in previous.keys() {
                if !now.contains_key(key) {
                    let _ = writeln!(
                        out,
                        "  {}  {}{{{}}}  resolved",
                        fmt_offset(e.at_ms),
                        key.0,
                        key.1
                    );
                }
            }
            previous = now.into_iter().map(|(k, (s, _))| (k, s)).collect();
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        let firing = self.firing_at_end();
        let _ = writeln!(
            out,
            "firing at {}: {}",
            fmt_offset(self.evaluations.last().map(|e| e.at_ms).unwrap_or(0)),
            if firing.is_empty() {
                "none".to_string()
            } else {
                firing.join(", ")
            }
        );
        out
    }

    /// The promtool test file (and the rules file it loads, by name) for this run.
    pub fn promtool_test(&self, rules_file_name: &str) -> String {
        let interval = self.settings.evaluation_interval;
        let step_ms = interval.ms();
        let steps = self.evaluations.len();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Generated by `hypertool simulate {} --promtool-test`: the samples hypertool's embedded\n\
             # alert engine saw, and its verdict at every evaluation. `promtool test rules` on this file\n\
             # passes only if Prometheus agrees with the embedded engine.",
            self.scenario.name
        );
        let _ = writeln!(
            out,
            "rule_files:\n  - {rules_file_name}\nevaluation_interval: {interval}\ntests:"
        );
        let _ = writeln!(out, "  - interval: {interval}\n    input_series:");
        for (name, labels, points) in self.engine.tsdb().dump() {
            let selector = selector(name, labels);
            let mut values = vec!["_".to_string(); steps];
            for (t, v) in points {
                let idx = (t / step_ms) as usize;
                if t % step_ms == 0 && idx < steps {
                    values[idx] = promtool_value(*v);
                }
            }
            let _ = writeln!(out, "      - series: '{}'", selector.replace('\'', "''"));
            let _ = writeln!(out, "        values: '{}'", values.join(" "));
        }
        out.push_str("    alert_rule_test:\n");
        for e in &self.evaluations {
            for rule in self.settings.rules.iter().filter(|r| r.enabled) {
                let name = rule.id.name();
                let _ = writeln!(
                    out,
                    "      - eval_time: {}\n        alertname: {name}",
                    crate::core::duration::PromDuration(e.at_ms)
                );
                let firing: Vec<&InstanceAt> = e
                    .active
                    .iter()
                    .filter(|a| a.alertname == name && a.state == AlertState::Firing)
                    .collect();
                if firing.is_empty() {
                    out.push_str("        exp_alerts: []\n");
                    continue;
                }
                out.push_str("        exp_alerts:\n");
                for a in firing {
                    out.push_str("          - exp_labels:\n");
                    for (k, v) in a.labels.iter().filter(|(k, _)| k.as_str() != "alertname") {
                        let _ = writeln!(out, "              {k}: {}", json(v));
                    }
                    out.push_str("            exp_annotations:\n");
                    for (k, v) in &a.annotations {
                        let _ = writeln!(out, "              {k}: {}", json(v));
                    }
                }
            }
        }
        out
    }
}

fn state_name(s: AlertState) -> &'static str {
    match s {
        AlertState::Inactive => "inactive",
        AlertState::Pending => "pending",
        AlertState::Firing => "firing",
    }
}

fn json(v: &str) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn selector(name: &str, labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", json(v)))
        .collect();
    format!("{name}{{{}}}", inner.join(", "))
}

fn promtool_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}
