//! The runbook's investigations, run on data: what was checked, what was found, and the root
//! causes of the alert's table ranked by that evidence.
//!
//! Pure: the server gathers an [`Evidence`] (ledger events of the window, budgets, runs, the
//! configuration, the trace exporter's state) and [`investigate`] turns it into a [`Report`]. The
//! causes, their indicators and fixes are the runbook's (a test keeps the two in step).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::alerts::rules::AlertId;
use crate::core::clock::{to_rfc3339, UnixMillis};
use crate::core::event::{Event, GateResult, Stamped, Usage};
use crate::core::runs::{Run, StageStatus};

mod budget;
mod gates;
mod langfuse;
mod slow;
mod switching;

use budget::{budget, BUDGET_CAUSES, DEPLETION_CAUSES};
use gates::{gates, GATE_CAUSES};
pub use gates::{tally, verdicts, Tally, Verdict};
use langfuse::{langfuse, LANGFUSE_CAUSES};
use slow::{slow, SLOW_CAUSES};
use switching::{switching, SWITCH_CAUSES};

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Info,
    Warn,
    Fail,
}

/// One thing checked.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: String,
    pub status: Status,
    pub found: String,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

/// A root cause of the runbook's table, with the evidence for it.
#[derive(Debug, Clone, Serialize)]
pub struct Cause {
    pub cause: &'static str,
    /// 0 (no evidence) to 1 (the evidence says so).
    pub score: f64,
    /// The runbook's likelihood before any evidence.
    pub prior: &'static str,
    pub indicator: &'static str,
    pub evidence: String,
    pub fix: &'static str,
}

/// An investigation's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub alert: &'static str,
    pub at: String,
    pub window: String,
    pub findings: Vec<Finding>,
    /// Most likely first.
    pub causes: Vec<Cause>,
    /// Limits of the data (e.g. the event limit cut older events off).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One cause of the runbook's table: name, prior likelihood, indicator, fix.
pub struct CauseSpec {
    pub name: &'static str,
    pub prior: &'static str,
    pub indicator: &'static str,
    pub fix: &'static str,
}

const METRICS_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Process crash",
        prior: "high",
        indicator: "no hypertool process; the API does not answer either",
        fix: "systemctl restart hypertool; journalctl -u hypertool for why it stopped",
    },
    CauseSpec {
        name: "Port conflict",
        prior: "medium",
        indicator: "the metrics port held by another process, or \"already in use\" at start",
        fix: "ss -ltnp 'sport = :PORT' names the holder; move hypertool with server.metrics_listen and update the scrape job",
    },
    CauseSpec {
        name: "Network issue",
        prior: "low",
        indicator: "the endpoint answers locally but Prometheus's lastError is a timeout or refusal",
        fix: "open the metrics port to Prometheus; server.metrics_listen on a reachable address",
    },
    CauseSpec {
        name: "Metrics disabled",
        prior: "low",
        indicator: "the endpoint answers 401, or Prometheus scrapes another address",
        fix: "give the scrape job the metrics bearer token, and the address of server.metrics_listen",
    },
];

/// The causes of an alert's table in the runbook.
pub fn causes_of(id: AlertId) -> &'static [CauseSpec] {
    match id {
        AlertId::TokenBudgetExceeded | AlertId::TokenBudgetSoftLimitReached => BUDGET_CAUSES,
        AlertId::TokenBudgetDepletionPredicted => DEPLETION_CAUSES,
        AlertId::HighQualityGateFailureRate => GATE_CAUSES,
        AlertId::ExcessivePersonaSwitching => SWITCH_CAUSES,
        AlertId::SlowWorkflowStage => SLOW_CAUSES,
        AlertId::HypertoolMetricsNotReported => METRICS_CAUSES,
        AlertId::LangfuseIntegrationFailing => LANGFUSE_CAUSES,
    }
}

/// A persona's budget as the investigation sees it.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetView {
    pub persona: String,
    pub limit: u64,
    pub used: u64,
    pub remaining: i64,
    pub soft_limit: Option<u64>,
    pub period: &'static str,
    pub mode: &'static str,
    pub resets_at: Option<UnixMillis>,
    /// Tokens used in the previous periods, most recent first (up to 7).
    pub previous_periods: Vec<u64>,
}

/// A configured stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageView {
    pub workflow: String,
    pub stage: String,
    pub persona: Option<String>,
    /// The model its calls use (tier resolved), if it sets one.
    pub model: Option<String>,
    pub escalation_model: Option<String>,
}

/// How a test call to Langfuse went.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum TestCall {
    Accepted,
    Refused { status: u16 },
    Unreachable { error: String },
    NotTried { why: String },
}

/// The Langfuse destination's state (never a key's value).
#[derive(Debug, Clone, Serialize)]
pub struct LangfuseView {
    pub enabled: bool,
    pub host: String,
    pub public_key_env: String,
    pub public_key_set: bool,
    pub secret_key_env: String,
    pub secret_key_set: bool,
    pub test_call: TestCall,
    pub spool_bytes: u64,
    pub exports: BTreeMap<String, u64>,
    pub last_error: Option<String>,
    pub last_success_ms: Option<UnixMillis>,
    pub traces_accepted: u64,
}

/// What the server knows, gathered for one investigation.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub now: UnixMillis,
    /// The window under study (the last hour by default); `events` reach back twice as far, so
    /// the window can be compared with the one before it.
    pub window_ms: i64,
    pub events: Vec<Stamped>,
    /// The ledger held more events than the investigation reads: the oldest were left out.
    pub truncated: bool,
    /// `gate_changed` events of the last 7 days.
    pub gate_changes: Vec<Stamped>,
    pub budgets: Vec<BudgetView>,
    pub chatmodes: BTreeSet<String>,
    pub stages: Vec<StageView>,
    pub runs: Vec<Run>,
    /// (at, session, chatmode, [A, B]) of the engine's oscillation notices.
    pub oscillations: Vec<(UnixMillis, String, String, [String; 2])>,
    pub cache_enabled: bool,
    pub gate_threshold: f64,
    pub slow_threshold_seconds: f64,
    pub switch_threshold: f64,
    pub langfuse: Option<LangfuseView>,
    /// The experiments of the configuration in force (stages with variants), with their evidence.
    pub experiments: Vec<crate::core::experiment::ExperimentReport>,
}

fn finding(check: &str, status: Status, found: impl Into<String>, data: Value) -> Finding {
    Finding {
        check: check.into(),
        status,
        found: found.into(),
        data,
    }
}

fn rank(id: AlertId, scored: Vec<(&'static str, f64, String)>) -> Vec<Cause> {
    let specs = causes_of(id);
    let mut causes: Vec<Cause> = specs
        .iter()
        .map(|spec| {
            let (score, evidence) = scored
                .iter()
                .find(|(n, _, _)| *n == spec.name)
                .map(|(_, s, e)| (s.clamp(0.0, 1.0), e.clone()))
                .unwrap_or((0.0, "no evidence either way".into()));
            Cause {
                cause: spec.name,
                score: (score * 100.0).round() / 100.0,
                prior: spec.prior,
                indicator: spec.indicator,
                evidence,
                fix: spec.fix,
            }
        })
        .collect();
    // By evidence; ties keep the runbook's order (its likelihood).
    causes.sort_by(|a, b| b.score.total_cmp(&a.score));
    causes
}

fn pct(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let idx = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[idx.min(values.len() - 1)]
}

fn usages(events: &[Stamped], from: UnixMillis, to: UnixMillis) -> Vec<(UnixMillis, &Usage)> {
    events
        .iter()
        .filter(|s| s.at >= from && s.at < to)
        .filter_map(|s| match &s.event {
            Event::Usage(u) => Some((s.at, u)),
            _ => None,
        })
        .collect()
}

/// Runs `id`'s investigation on `ev`.
pub fn investigate(id: AlertId, ev: &Evidence) -> Report {
    let mut notes = Vec::new();
    if ev.truncated {
        notes.push(
            "the window held more events than an investigation reads: the oldest were left out"
                .to_string(),
        );
    }
    let (findings, scored) = match id {
        AlertId::TokenBudgetExceeded
        | AlertId::TokenBudgetSoftLimitReached
        | AlertId::TokenBudgetDepletionPredicted => budget(id, ev),
        AlertId::HighQualityGateFailureRate => gates(ev),
        AlertId::ExcessivePersonaSwitching => switching(ev),
        AlertId::SlowWorkflowStage => slow(ev),
        AlertId::LangfuseIntegrationFailing => langfuse(ev),
        AlertId::HypertoolMetricsNotReported => (
            vec![finding(
                "server",
                Status::Ok,
                "the server answers: this alert is checked from outside (hypertool runbook HypertoolMetricsNotReported)",
                Value::Null,
            )],
            Vec::new(),
        ),
    };
    Report {
        alert: id.name(),
        at: to_rfc3339(ev.now),
        window: crate::core::duration::PromDuration(ev.window_ms).to_string(),
        findings,
        causes: rank(id, scored),
        notes,
    }
}

type Scored = Vec<(&'static str, f64, String)>;

impl Report {
    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        ReportView {
            alert: self.alert.to_string(),
            at: self.at.clone(),
            window: self.window.clone(),
            findings: self
                .findings
                .iter()
                .map(|f| FindingView {
                    check: f.check.clone(),
                    status: f.status,
                    found: f.found.clone(),
                })
                .collect(),
            causes: self
                .causes
                .iter()
                .map(|c| CauseView {
                    cause: c.cause.to_string(),
                    score: c.score,
                    prior: c.prior.to_string(),
                    indicator: c.indicator.to_string(),
                    evidence: c.evidence.clone(),
                    fix: c.fix.to_string(),
                })
                .collect(),
            notes: self.notes.clone(),
        }
        .render()
    }
}

/// A report as a terminal shows it, made from a [`Report`] or read back from its JSON (a server's
/// answer to `GET /api/investigations/{alert}`).
#[derive(Debug, Deserialize)]
struct ReportView {
    alert: String,
    at: String,
    window: String,
    #[serde(default)]
    findings: Vec<FindingView>,
    #[serde(default)]
    causes: Vec<CauseView>,
    #[serde(default)]
    notes: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct FindingView {
    check: String,
    status: Status,
    found: String,
}

#[derive(Debug, Deserialize)]
struct CauseView {
    cause: String,
    score: f64,
    prior: String,
    indicator: String,
    evidence: String,
    fix: String,
}

/// A report (as its JSON, e.g. from `GET /api/investigations/{alert}`) for a terminal.
pub fn text_of(v: &Value) -> String {
    match ReportView::deserialize(v) {
        Ok(report) => report.render(),
        Err(e) => format!("the investigation's answer could not be read: {e}\n"),
    }
}

impl ReportView {
    fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} — investigation at {} (window {})",
            self.alert, self.at, self.window
        );
        let _ = writeln!(s, "\nChecked:");
        for f in &self.findings {
            let mark = match f.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Info => "info",
            };
            let _ = writeln!(s, "  [{mark}] {}: {}", f.check, f.found);
        }
        let causes = &self.causes;
        if !causes.is_empty() && causes.iter().all(|c| c.score == 0.0) {
            let _ = writeln!(
                s,
                "\nNo cause has evidence in this window: the alert's condition may no longer hold, or the\ndata it needs is older (try --window 6h). The runbook's causes, in its order:"
            );
        }
        if !causes.is_empty() {
            let _ = writeln!(
                s,
                "\nRoot causes, most likely first (score from the evidence; the runbook's prior):"
            );
            for (i, c) in causes.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "  {}. {} — score {:.2} (prior {})",
                    i + 1,
                    c.cause,
                    c.score,
                    c.prior
                );
                let _ = writeln!(s, "     indicator: {}", c.indicator);
                let _ = writeln!(s, "     evidence:  {}", c.evidence);
                let _ = writeln!(s, "     fix:       {}", c.fix);
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "\nnote: {n}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every alert's causes are the rows of its table in the runbook (same names, same order).
    #[test]
    fn the_causes_are_the_runbooks() {
        for id in AlertId::ALL {
            let section = super::super::section(id).expect("section");
            let table: Vec<&str> = section
                .lines()
                .filter_map(|l| l.strip_prefix("| **"))
                .filter_map(|l| l.split_once("**").map(|(name, _)| name))
                .collect();
            let names: Vec<&str> = causes_of(id).iter().map(|c| c.name).collect();
            if id == AlertId::TokenBudgetSoftLimitReached {
                assert!(table.is_empty(), "alert 8 refers to alert 1's table");
                assert_eq!(
                    names,
                    causes_of(AlertId::TokenBudgetExceeded)
                        .iter()
                        .map(|c| c.name)
                        .collect::<Vec<_>>()
                );
                continue;
            }
            assert_eq!(names, table, "{}", id.name());
        }
    }

    fn usage(persona: &str, chatmode: &str, model: &str, prompt: u64, hash: &str) -> Event {
        Event::Usage(Usage {
            persona: persona.into(),
            chatmode: chatmode.into(),
            model: model.into(),
            prompt_tokens: prompt,
            completion_tokens: 10,
            prompt_hash: Some(hash.into()),
            ..Usage::default()
        })
    }

    fn budget(persona: &str, limit: u64, used: u64) -> BudgetView {
        BudgetView {
            persona: persona.into(),
            limit,
            used,
            remaining: limit as i64 - used as i64,
            soft_limit: Some(limit * 8 / 10),
            period: "daily",
            mode: "observe",
            resets_at: None,
            previous_periods: vec![limit / 2; 7],
        }
    }

    const NOW: UnixMillis = 1_764_320_400_000;

    #[test]
    fn repeated_prompts_rank_caching_first_and_count_the_saving() {
        let events: Vec<Stamped> = (0..20)
            .map(|i| Stamped {
                at: NOW - 600_000 + i * 1000,
                event: usage(
                    "backend-engineer",
                    "feature-implementation",
                    "m",
                    100,
                    "same",
                ),
            })
            .collect();
        let ev = Evidence {
            now: NOW,
            window_ms: 3_600_000,
            events,
            budgets: vec![budget("backend-engineer", 2000, 2200)],
            chatmodes: ["feature-implementation".to_string()].into(),
            ..Evidence::default()
        };
        let r = investigate(AlertId::TokenBudgetExceeded, &ev);
        assert_eq!(r.causes[0].cause, "Inefficient caching", "{}", r.to_text());
        let rep = r
            .findings
            .iter()
            .find(|f| f.check == "repeated prompts")
            .unwrap();
        assert_eq!(rep.data["repeated_calls"], 19);
        assert_eq!(rep.data["tokens_saved"], 19 * 110);
        assert!(
            r.findings[0]
                .found
                .contains("backend-engineer: 2200 of 2000"),
            "{}",
            r.findings[0].found
        );
    }

    #[test]
    fn an_unplanned_chatmode_and_a_bloated_prompt_are_seen() {
        let mut events: Vec<Stamped> = (0..10)
            .map(|i| Stamped {
                at: NOW - 600_000 + i * 1000,
                event: usage("backend-engineer", "mystery", "m", 100, &format!("h{i}")),
            })
            .collect();
        events.push(Stamped {
            at: NOW - 1000,
            event: usage("backend-engineer", "mystery", "m", 5000, "big"),
        });
        let ev = Evidence {
            now: NOW,
            window_ms: 3_600_000,
            events,
            budgets: vec![budget("backend-engineer", 2000, 6100)],
            chatmodes: ["feature-implementation".to_string()].into(),
            ..Evidence::default()
        };
        let r = investigate(AlertId::TokenBudgetExceeded, &ev);
        let top: Vec<&str> = r.causes.iter().take(2).map(|c| c.cause).collect();
        assert!(
            top.contains(&"Unexpected usage") && top.contains(&"Prompt bloat"),
            "{}",
            r.to_text()
        );
        assert!(
            r.causes
                .iter()
                .find(|c| c.cause == "Inefficient caching")
                .unwrap()
                .score
                < 0.1
        );
    }

    #[test]
    fn a_gate_change_before_the_failures_ranks_stricter_criteria_first() {
        use crate::core::event::GateVerdictEvent;
        let verdict = |at: i64, pass: bool| Stamped {
            at,
            event: Event::QualityGate(GateVerdictEvent {
                workflow: "w".into(),
                stage: "s".into(),
                model: if at % 2000 == 0 {
                    "a".into()
                } else {
                    "b".into()
                },
                result: if pass {
                    GateResult::Pass
                } else {
                    GateResult::Fail
                },
                reasons: (!pass)
                    .then(|| "min_lines: 3 non-blank lines, at least 10 required".into()),
                run: Some(format!("r{at}")),
                attempt: 1,
                variant: None,
                escalated: false,
            }),
        };
        let events: Vec<Stamped> = (0..20)
            .map(|i| verdict(NOW - 1_200_000 + i * 1000, i % 3 == 0))
            .collect();
        let ev = Evidence {
            now: NOW,
            window_ms: 3_600_000,
            events,
            gate_changes: vec![Stamped {
                at: NOW - 1_500_000,
                event: Event::GateChanged {
                    workflow: "w".into(),
                    stage: "s".into(),
                    before: Some(json!({"min_lines": 5})),
                    after: Some(json!({"min_lines": 10})),
                },
            }],
            gate_threshold: 0.2,
            ..Evidence::default()
        };
        let r = investigate(AlertId::HighQualityGateFailureRate, &ev);
        assert_eq!(r.causes[0].cause, "Stricter criteria", "{}", r.to_text());
        assert!(
            r.findings[0].found.contains("w/s: 13 of 20 failed"),
            "{}",
            r.findings[0].found
        );
        assert!(
            r.findings[2].found.starts_with("min_lines: 13"),
            "{}",
            r.findings[2].found
        );
        // Without the change, the criterion that fails everywhere leads.
        let ev = Evidence {
            gate_changes: Vec::new(),
            ..ev
        };
        let r = investigate(AlertId::HighQualityGateFailureRate, &ev);
        assert_eq!(r.causes[0].cause, "Prompt issues", "{}", r.to_text());

        // The failing stage has no experiment: the investigation says which one to set up.
        let experiments = |r: &Report| {
            r.findings
                .iter()
                .find(|f| f.check == "experiments on the failing stages")
                .cloned()
                .expect("the experiments finding")
        };
        let f = experiments(&r);
        assert!(
            f.found.starts_with("w/s: no experiment — list `variants`")
                && f.found.contains("allocation: adaptive"),
            "{}",
            f.found
        );
        assert_eq!(f.data[0]["state"], "none");
        // With a decided experiment on it, the finding names the variant and the command that
        // adopts it; a running one, its leader and how to follow it.
        use crate::core::workflow::{Allocation, Decision, Stage, Variant, VariantRecord};
        let stage = Stage {
            name: "s".into(),
            persona: None,
            model: None,
            budget_tokens: None,
            retries: 0,
            escalation_model: None,
            max_prompt_tokens: None,
            gate: None,
            allocation: Allocation::Weights,
            experiment: Decision::default(),
            variants: ["a", "b"]
                .iter()
                .map(|n| Variant {
                    name: n.to_string(),
                    model: None,
                    prompt: None,
                    temperature: None,
                    weight: 1.0,
                })
                .collect(),
        };
        let evidence = |passes_b: f64| {
            move |v: &str| {
                let (p, f) = if v == "b" {
                    (passes_b, 100.0 - passes_b)
                } else {
                    (35.0, 65.0)
                };
                VariantRecord {
                    runs: 100.0,
                    passes: p,
                    failures: f,
                    ..VariantRecord::default()
                }
            }
        };
        let decided = crate::core::experiment::report("w", &stage, &evidence(80.0));
        let ev = Evidence {
            experiments: vec![decided],
            ..ev
        };
        let f = experiments(&investigate(AlertId::HighQualityGateFailureRate, &ev));
        assert_eq!(f.status, Status::Warn);
        assert!(
            f.found.contains("w/s: decided, `b` is best")
                && f.found.contains("hypertool experiments promote w s b"),
            "{}",
            f.found
        );
        let running = crate::core::experiment::report("w", &stage, &evidence(37.0));
        let ev = Evidence {
            experiments: vec![running],
            ..ev
        };
        let f = experiments(&investigate(AlertId::HighQualityGateFailureRate, &ev));
        assert!(
            f.found.contains("w/s: running (weights allocation)")
                && f.found.contains("hypertool experiments show w s"),
            "{}",
            f.found
        );
    }

    #[test]
    fn an_oscillating_session_is_an_infinite_loop() {
        let mut events = Vec::new();
        for i in 0..40 {
            let persona = if i % 2 == 0 {
                "backend-engineer"
            } else {
                "testing-specialist"
            };
            events.push(Stamped {
                at: NOW - 600_000 + i * 1000,
                event: Event::Usage(Usage {
                    persona: persona.into(),
                    chatmode: "feature".into(),
                    model: "m".into(),
                    prompt_tokens: 10,
                    session: Some("loop".into()),
                    ..Usage::default()
                }),
            });
        }
        let ev = Evidence {
            now: NOW,
            window_ms: 3_600_000,
            events,
            oscillations: vec![(
                NOW - 500_000,
                "loop".into(),
                "feature".into(),
                ["backend-engineer".into(), "testing-specialist".into()],
            )],
            switch_threshold: 2.0,
            ..Evidence::default()
        };
        let r = investigate(AlertId::ExcessivePersonaSwitching, &ev);
        assert_eq!(r.causes[0].cause, "Infinite loop", "{}", r.to_text());
        assert!(
            r.findings[0].found.starts_with("39 switches"),
            "{}",
            r.findings[0].found
        );
        assert_eq!(r.findings[0].data[0]["from"], "backend-engineer");
        assert_eq!(r.findings[0].data[0]["switches"], 20);
        let missing_state = r
            .causes
            .iter()
            .find(|c| c.cause == "Missing state")
            .unwrap();
        assert_eq!(
            missing_state.score, 1.0,
            "every switch was inferred: no cooldown applied"
        );
    }

    #[test]
    fn a_stage_left_open_without_calls_is_a_sequential_bottleneck() {
        let mut runs = crate::core::runs::Runs::new(10);
        runs.start_run("r1", "incident-response", None, None, NOW - 3_000_000);
        runs.start_stage(
            "r1",
            "diagnosis",
            Some("devops-engineer"),
            None,
            NOW - 2_000_000,
        );
        let ev = Evidence {
            now: NOW,
            window_ms: 3_600_000,
            runs: runs.iter().cloned().collect(),
            slow_threshold_seconds: 300.0,
            ..Evidence::default()
        };
        let r = investigate(AlertId::SlowWorkflowStage, &ev);
        assert_eq!(r.findings[1].status, Status::Fail, "{}", r.to_text());
        assert!(
            r.findings[1]
                .found
                .contains("incident-response/diagnosis run r1: 2000s"),
            "{}",
            r.findings[1].found
        );
        assert_eq!(
            r.causes[0].cause,
            "Sequential bottleneck",
            "{}",
            r.to_text()
        );
    }
}
