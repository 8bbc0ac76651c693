//! The runbook's investigations, run on data: what was checked, what was found, and the root
//! causes of the alert's table ranked by that evidence.
//!
//! Pure: the server gathers an [`Evidence`] (ledger events of the window, budgets, runs, the
//! configuration, the trace exporter's state) and [`investigate`] turns it into a [`Report`]. The
//! causes, their indicators and fixes are the runbook's (a test keeps the two in step).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::{json, Value};

use crate::alerts::rules::AlertId;
use crate::core::clock::{to_rfc3339, UnixMillis};
use crate::core::event::{Event, GateResult, Stamped, Usage};
use crate::core::runs::{Run, StageStatus};

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

const BUDGET_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Prompt bloat",
        prior: "high",
        indicator: "the largest prompts far above the persona's median",
        fix: "set max_prompt_tokens on the stage (workflows/*.yml); trim the context agents send",
    },
    CauseSpec {
        name: "Inefficient caching",
        prior: "medium",
        indicator: "identical prompts (same hash) repeated",
        fix: "[gateway.cache] enabled = true (temperature 0 requests are answered from the cache); share it across replicas with [gateway.cache] url",
    },
    CauseSpec {
        name: "Unexpected usage",
        prior: "medium",
        indicator: "tokens from a chatmode not in chatmodes.yml",
        fix: "add the chatmode to chatmodes.yml and plan its budget, or stop the agent using this persona",
    },
    CauseSpec {
        name: "Budget too low",
        prior: "low",
        indicator: "over budget in most earlier periods too",
        fix: "hypertool budget suggest (p95 of daily usage + 20 %), then --apply or hypertool budget set PERSONA --tokens N",
    },
    CauseSpec {
        name: "Model change",
        prior: "low",
        indicator: "this hour's main model differs from the hour before and uses more tokens per call",
        fix: "move the stage back to the earlier model ([gateway.tiers] or the stage's model), or budget for the new one",
    },
];

const DEPLETION_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Expected spike",
        prior: "high",
        indicator: "runs of the persona's workflows active; usage ratio > 1.5",
        fix: "nothing if the work is planned; raise the budget for now with hypertool budget set PERSONA --tokens N",
    },
    CauseSpec {
        name: "Unexpected usage",
        prior: "medium",
        indicator: "tokens from a chatmode not in chatmodes.yml",
        fix: "add the chatmode to chatmodes.yml and plan its budget, or stop the agent using this persona",
    },
    CauseSpec {
        name: "Caching disabled",
        prior: "medium",
        indicator: "identical prompts repeated while [gateway.cache] is off",
        fix: "[gateway.cache] enabled = true in hypertool.toml",
    },
    CauseSpec {
        name: "Budget too low",
        prior: "low",
        indicator: "over budget in most earlier periods too",
        fix: "hypertool budget suggest --apply",
    },
];

const GATE_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Stricter criteria",
        prior: "high",
        indicator: "the stage's gate changed shortly before the failures began",
        fix: "review the change in workflows/<workflow>.yml; relax the criterion that fails (hypertool check validates it, the file reloads)",
    },
    CauseSpec {
        name: "Prompt issues",
        prior: "high",
        indicator: "one criterion fails most of the time, on every model",
        fix: "tell the agent what that criterion wants (with an example) in a new prompt file, and run it as a variant beside the current one (allocation: adaptive); promote it once decided",
    },
    CauseSpec {
        name: "Wrong model tier",
        prior: "medium",
        indicator: "the stage's model passes far less often than the escalation model",
        fix: "variants on the stage's model and on quality (allocation: adaptive), promoted once decided; or retries with escalation_model: quality",
    },
    CauseSpec {
        name: "Model degradation",
        prior: "medium",
        indicator: "a model's pass rate dropped with no gate change",
        fix: "move the stage to another model and report the regression to the provider",
    },
    CauseSpec {
        name: "Input quality",
        prior: "low",
        indicator: "failures concentrated in a few runs",
        fix: "look at those runs' earlier stages: their output is this stage's input",
    },
];

const SWITCH_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Infinite loop",
        prior: "high",
        indicator: "sessions oscillating A→B→A→B; the matrix dominated by one pair",
        fix: "send switches through POST /v1/personas/switch (cooldown); [switching] oscillation_action = \"suppress\"",
    },
    CauseSpec {
        name: "Over-eager routing",
        prior: "high",
        indicator: "about one switch per call; many different transitions",
        fix: "POST /v1/personas/route keeps a capable current persona; batch work by persona",
    },
    CauseSpec {
        name: "Missing state",
        prior: "medium",
        indicator: "switches inferred from calls, none through /v1/personas/switch (no cooldown applies)",
        fix: "switch through POST /v1/personas/switch and read GET /api/sessions/{id} instead of keeping state in the agent",
    },
    CauseSpec {
        name: "Bug in chatmode",
        prior: "medium",
        indicator: "one chatmode holds most switches",
        fix: "fix that chatmode's switching logic; give it a longer switch_cooldown_seconds in chatmodes.yml",
    },
    CauseSpec {
        name: "Intentional design",
        prior: "low",
        indicator: "switches follow workflow stages (one per stage)",
        fix: "nothing to fix: raise [alerts.ExcessivePersonaSwitching] threshold for this workload",
    },
];

const SLOW_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Large prompts",
        prior: "high",
        indicator: "the stage's calls have prompts well above other stages'",
        fix: "max_prompt_tokens on the stage; summarize earlier stages instead of passing them whole",
    },
    CauseSpec {
        name: "Long completions",
        prior: "high",
        indicator: "completion tokens per call in the thousands",
        fix: "max_completion_tokens in the stage's gate, or max_tokens in the requests",
    },
    CauseSpec {
        name: "Model latency",
        prior: "medium",
        indicator: "the stage's model is slow on every call",
        fix: "a faster tier for the stage (model: fast), or a faster model behind the tier",
    },
    CauseSpec {
        name: "Quality gate retries",
        prior: "medium",
        indicator: "attempts > 1, escalations in the stage",
        fix: "see HighQualityGateFailureRate: fix the failing criterion; fewer retries",
    },
    CauseSpec {
        name: "Sequential bottleneck",
        prior: "low",
        indicator: "a run open long with few calls (waiting, or left open)",
        fix: "finish or cancel runs whose agents are gone (POST /v1/workflows/W/runs/R/finish); run independent work in parallel runs",
    },
];

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

const LANGFUSE_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Missing credentials",
        prior: "high",
        indicator: "a key variable is not set",
        fix: "set LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY (under systemd: /etc/hypertool/hypertool.env) and restart",
    },
    CauseSpec {
        name: "Wrong credentials",
        prior: "high",
        indicator: "exports refused (401/403); the test call refused",
        fix: "use the public and secret key of one project on LANGFUSE_HOST; restart",
    },
    CauseSpec {
        name: "Network issue",
        prior: "medium",
        indicator: "exports retried; the test call cannot connect",
        fix: "check LANGFUSE_HOST from this machine (proxy: HTTPS_PROXY)",
    },
    CauseSpec {
        name: "Traces waiting",
        prior: "medium",
        indicator: "the spool grows while the host is reachable",
        fix: "nothing: the backlog drains oldest first; size [tracing] spool_max_bytes for longer outages",
    },
    CauseSpec {
        name: "Langfuse disabled",
        prior: "low",
        indicator: "hypertool_langfuse_enabled is 0",
        fix: "nothing to fix; set the keys or [langfuse] enabled = true to use Langfuse",
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
        window: crate::alerts::duration::PromDuration(ev.window_ms).to_string(),
        findings,
        causes: rank(id, scored),
        notes,
    }
}

type Scored = Vec<(&'static str, f64, String)>;

fn budget(id: AlertId, ev: &Evidence) -> (Vec<Finding>, Scored) {
    let now = ev.now;
    let w = ev.window_ms;
    let mut out = Vec::new();
    let mut scored: Scored = Vec::new();
    let recent = usages(&ev.events, now - w, now + 1);
    let before = usages(&ev.events, now - 2 * w, now - w);

    // Usage rate over the last half window, for the forecasts.
    let half = usages(&ev.events, now - w / 2, now + 1);
    let mut rate_by_persona: HashMap<&str, f64> = HashMap::new();
    for (_, u) in &half {
        *rate_by_persona.entry(u.persona.as_str()).or_default() += u.total_tokens() as f64;
    }
    let half_secs = (w / 2) as f64 / 1000.0;

    // 1. Personas over, or heading over, budget.
    let mut at_risk = Vec::new();
    for b in &ev.budgets {
        let rate = rate_by_persona
            .get(b.persona.as_str())
            .copied()
            .unwrap_or(0.0)
            / half_secs;
        let eta = (rate > 0.0 && b.remaining > 0)
            .then(|| now + (b.remaining as f64 / rate * 1000.0) as i64);
        let over = b.remaining < 0;
        let past_soft = b.soft_limit.is_some_and(|s| b.used >= s);
        let before_reset = eta.is_some_and(|t| b.resets_at.is_none_or(|r| t < r));
        if over || past_soft || before_reset {
            at_risk.push(json!({
                "persona": b.persona,
                "limit": b.limit,
                "used": b.used,
                "remaining": b.remaining,
                "soft_limit": b.soft_limit,
                "period": b.period,
                "mode": b.mode,
                "tokens_per_second": (rate * 100.0).round() / 100.0,
                "depletion_at": eta.map(to_rfc3339),
                "resets_at": b.resets_at.map(to_rfc3339),
            }));
        }
    }
    let over: Vec<&str> = at_risk
        .iter()
        .filter(|v| v["remaining"].as_i64().is_some_and(|r| r < 0))
        .filter_map(|v| v["persona"].as_str())
        .collect();
    out.push(finding(
        "budgets",
        if over.is_empty() {
            if at_risk.is_empty() {
                Status::Ok
            } else {
                Status::Warn
            }
        } else {
            Status::Fail
        },
        if at_risk.is_empty() {
            "no persona is over or heading over its budget".to_string()
        } else {
            at_risk
                .iter()
                .map(|v| {
                    let p = v["persona"].as_str().unwrap_or("?");
                    let eta = v["depletion_at"]
                        .as_str()
                        .map(|t| format!(", spent at {t} at this pace"))
                        .unwrap_or_default();
                    format!(
                        "{p}: {} of {} used ({} left){eta}",
                        v["used"], v["limit"], v["remaining"]
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
        json!(at_risk),
    ));
    let focus: BTreeSet<String> = at_risk
        .iter()
        .filter_map(|v| v["persona"].as_str().map(str::to_string))
        .collect();
    let in_focus = |p: &str| focus.is_empty() || focus.contains(p);

    // 2. Tokens by chatmode and model in the window.
    let mut by_group: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for (_, u) in recent.iter().filter(|(_, u)| in_focus(&u.persona)) {
        *by_group
            .entry((u.persona.clone(), u.chatmode.clone(), u.model.clone()))
            .or_default() += u.total_tokens();
    }
    let mut groups: Vec<_> = by_group.into_iter().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.1));
    out.push(finding(
        "tokens by chatmode and model",
        Status::Info,
        if groups.is_empty() {
            "no usage in the window".to_string()
        } else {
            groups
                .iter()
                .take(5)
                .map(|((p, c, m), t)| format!("{p}/{c}/{m}: {t}"))
                .collect::<Vec<_>>()
                .join("; ")
        },
        json!(groups
            .iter()
            .take(20)
            .map(|((p, c, m), t)| json!({"persona": p, "chatmode": c, "model": m, "tokens": t}))
            .collect::<Vec<_>>()),
    ));

    // 3. The largest prompts against the median.
    let mut calls: Vec<(UnixMillis, &Usage)> = recent
        .iter()
        .filter(|(_, u)| in_focus(&u.persona) && u.prompt_tokens > 0)
        .copied()
        .collect();
    let mut sizes: Vec<f64> = calls.iter().map(|(_, u)| u.prompt_tokens as f64).collect();
    let median = quantile(&mut sizes, 0.5);
    calls.sort_by_key(|c| std::cmp::Reverse(c.1.prompt_tokens));
    let largest = calls.first().map_or(0, |(_, u)| u.prompt_tokens);
    let bloat = if median > 0.0 {
        largest as f64 / median
    } else {
        0.0
    };
    out.push(finding(
        "largest prompts",
        if bloat >= 4.0 { Status::Warn } else { Status::Info },
        if calls.is_empty() {
            "no prompts in the window".to_string()
        } else {
            format!(
                "largest {largest} tokens, {bloat:.1}× the median of {median:.0} over {} calls",
                calls.len()
            )
        },
        json!(calls
            .iter()
            .take(5)
            .map(|(at, u)| json!({"at": to_rfc3339(*at), "persona": u.persona, "chatmode": u.chatmode,
                "model": u.model, "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "workflow": u.workflow, "stage": u.stage}))
            .collect::<Vec<_>>()),
    ));
    scored.push((
        "Prompt bloat",
        ((bloat - 2.0) / 6.0).max(0.0),
        format!("largest prompt {largest} tokens is {bloat:.1}× the median ({median:.0})"),
    ));

    // 4. Identical prompts repeated: what a cache would have saved.
    let mut repeats: HashMap<(&str, &str), (u64, u64)> = HashMap::new();
    for (_, u) in recent.iter().filter(|(_, u)| in_focus(&u.persona)) {
        if let Some(h) = &u.prompt_hash {
            let slot = repeats.entry((h.as_str(), u.model.as_str())).or_default();
            slot.0 += 1;
            slot.1 += u.total_tokens();
        }
    }
    let (mut repeated_calls, mut saved) = (0u64, 0u64);
    for (n, tokens) in repeats.values() {
        if *n > 1 {
            repeated_calls += n - 1;
            saved += tokens - tokens / n;
        }
    }
    let window_tokens: u64 = recent
        .iter()
        .filter(|(_, u)| in_focus(&u.persona))
        .map(|(_, u)| u.total_tokens())
        .sum();
    let saved_share = if window_tokens > 0 {
        saved as f64 / window_tokens as f64
    } else {
        0.0
    };
    out.push(finding(
        "repeated prompts",
        if saved_share >= 0.1 { Status::Warn } else { Status::Info },
        format!(
            "{repeated_calls} calls repeated an earlier prompt; a cache would have saved {saved} tokens ({} of the window's); cache {}",
            pct(saved_share),
            if ev.cache_enabled { "on" } else { "off" }
        ),
        json!({"repeated_calls": repeated_calls, "tokens_saved": saved, "cache_enabled": ev.cache_enabled}),
    ));
    let cache_name = if id == AlertId::TokenBudgetDepletionPredicted {
        "Caching disabled"
    } else {
        "Inefficient caching"
    };
    let cache_score = if id == AlertId::TokenBudgetDepletionPredicted && ev.cache_enabled {
        saved_share * 0.5
    } else {
        saved_share * 3.0
    };
    scored.push((
        cache_name,
        cache_score,
        format!("{repeated_calls} repeated prompts, {saved} tokens ({}) a cache would have saved; cache {}", pct(saved_share), if ev.cache_enabled { "on" } else { "off" }),
    ));

    // 5. Chatmodes not in the plan.
    let mut unplanned: BTreeMap<String, u64> = BTreeMap::new();
    for (_, u) in recent.iter().filter(|(_, u)| in_focus(&u.persona)) {
        if !ev.chatmodes.contains(&u.chatmode) {
            *unplanned.entry(u.chatmode.clone()).or_default() += u.total_tokens();
        }
    }
    let unplanned_tokens: u64 = unplanned.values().sum();
    let unplanned_share = if window_tokens > 0 {
        unplanned_tokens as f64 / window_tokens as f64
    } else {
        0.0
    };
    out.push(finding(
        "chatmodes not in the budget plan",
        if unplanned_share >= 0.25 {
            Status::Warn
        } else {
            Status::Info
        },
        if unplanned.is_empty() {
            "every chatmode used is in chatmodes.yml".to_string()
        } else {
            format!(
                "{} ({} of the tokens)",
                unplanned
                    .iter()
                    .map(|(c, t)| format!("{c}: {t}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                pct(unplanned_share)
            )
        },
        json!(unplanned),
    ));
    scored.push((
        "Unexpected usage",
        unplanned_share * 1.5,
        format!(
            "{} of the tokens from chatmodes not in chatmodes.yml",
            pct(unplanned_share)
        ),
    ));

    // 6. Consistent overage in earlier periods.
    let mut too_low = (-1.0f64, String::from("no earlier periods recorded"));
    let mut history = Vec::new();
    for b in ev.budgets.iter().filter(|b| focus.contains(&b.persona)) {
        if b.previous_periods.is_empty() {
            continue;
        }
        let over = b.previous_periods.iter().filter(|u| **u > b.limit).count();
        let share = over as f64 / b.previous_periods.len() as f64;
        history.push(
            json!({"persona": b.persona, "periods": b.previous_periods, "over_budget": over}),
        );
        if share > too_low.0 {
            too_low = (
                share,
                format!(
                    "{}: over budget in {over} of the {} previous {} periods",
                    b.persona,
                    b.previous_periods.len(),
                    b.period
                ),
            );
        }
    }
    out.push(finding(
        "earlier periods",
        if too_low.0 >= 0.5 {
            Status::Warn
        } else {
            Status::Info
        },
        too_low.1.clone(),
        json!(history),
    ));
    scored.push(("Budget too low", too_low.0.max(0.0), too_low.1));

    // 7. A recent move to a model that uses more tokens per call.
    let main_model = |calls: &[(UnixMillis, &Usage)]| {
        let mut by: HashMap<&str, (u64, u64)> = HashMap::new();
        for (_, u) in calls.iter().filter(|(_, u)| in_focus(&u.persona)) {
            let e = by.entry(u.model.as_str()).or_default();
            e.0 += 1;
            e.1 += u.total_tokens();
        }
        by.into_iter()
            .max_by_key(|(_, (n, _))| *n)
            .map(|(m, (n, t))| (m.to_string(), t as f64 / n as f64))
    };
    let (now_model, then_model) = (main_model(&recent), main_model(&before));
    let (model_score, model_text) = match (&now_model, &then_model) {
        (Some((m1, per1)), Some((m0, per0))) if m1 != m0 => (
            if per1 > per0 {
                ((per1 / per0.max(1.0)) - 1.0).clamp(0.4, 1.0)
            } else {
                0.2
            },
            format!("main model {m0} ({per0:.0} tokens/call) → {m1} ({per1:.0} tokens/call)"),
        ),
        (Some((m, per)), _) => (
            0.0,
            format!("main model {m} ({per:.0} tokens/call), unchanged"),
        ),
        _ => (0.0, "no calls to compare".into()),
    };
    out.push(finding(
        "model change",
        if model_score >= 0.4 { Status::Warn } else { Status::Info },
        model_text.clone(),
        json!({"now": now_model.as_ref().map(|m| &m.0), "before": then_model.as_ref().map(|m| &m.0)}),
    ));
    scored.push(("Model change", model_score, model_text));

    // 8. The usage ratio: the last half window against the window before it.
    let last: u64 = half
        .iter()
        .filter(|(_, u)| in_focus(&u.persona))
        .map(|(_, u)| u.total_tokens())
        .sum();
    let earlier: u64 = usages(&ev.events, now - w * 3 / 2, now - w / 2)
        .iter()
        .filter(|(_, u)| in_focus(&u.persona))
        .map(|(_, u)| u.total_tokens())
        .sum();
    let ratio = if earlier > 0 {
        (last as f64 / (w / 2) as f64) / (earlier as f64 / w as f64)
    } else if last > 0 {
        f64::INFINITY
    } else {
        0.0
    };
    let ratio_text = if ratio.is_finite() {
        format!(
            "{ratio:.2} ({last} tokens in the last {}, {earlier} in the {} before)",
            crate::alerts::duration::PromDuration(w / 2),
            crate::alerts::duration::PromDuration(w)
        )
    } else {
        format!(
            "usage only in the last {} ({last} tokens)",
            crate::alerts::duration::PromDuration(w / 2)
        )
    };
    out.push(finding(
        "usage ratio (last half window / the window before)",
        if ratio > 1.5 {
            Status::Warn
        } else {
            Status::Info
        },
        format!("{ratio_text}{}", if ratio > 1.5 { ": a spike" } else { "" }),
        json!({"ratio": ratio.is_finite().then_some(ratio), "last": last, "before": earlier}),
    ));

    if id == AlertId::TokenBudgetDepletionPredicted {
        let running: Vec<String> = ev
            .runs
            .iter()
            .filter(|r| r.status == crate::core::runs::RunStatus::Running)
            .filter(|r| {
                ev.stages.iter().any(|s| {
                    s.workflow == r.workflow
                        && s.persona.as_deref().is_some_and(|p| focus.contains(p))
                })
            })
            .map(|r| format!("{}/{}", r.workflow, r.id))
            .collect();
        out.push(finding(
            "active runs of the persona's workflows",
            Status::Info,
            if running.is_empty() {
                "none".to_string()
            } else {
                running.join(", ")
            },
            json!(running),
        ));
        let spike =
            if ratio > 1.5 { 0.5 } else { 0.0 } + if running.is_empty() { 0.0 } else { 0.5 };
        scored.push((
            "Expected spike",
            spike,
            format!(
                "{} active run(s); usage ratio {}",
                running.len(),
                if ratio.is_finite() {
                    format!("{ratio:.2}")
                } else {
                    "∞".into()
                }
            ),
        ));
    }
    (out, scored)
}

fn criteria_of(reasons: Option<&str>) -> Vec<String> {
    reasons
        .map(|r| {
            r.split("; ")
                .filter(|p| !p.trim().is_empty())
                .map(|p| p.split_once(": ").map_or(p, |(c, _)| c).trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A gate verdict from any source: the gateway's and the API's `quality_gate` events, and `stage`
/// events with a gate.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub at: String,
    #[serde(skip)]
    pub at_ms: UnixMillis,
    pub workflow: String,
    pub stage: String,
    pub model: String,
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    pub attempt: u32,
    /// The failed criteria (`code_block`, `min_lines`, … or the reason as given).
    pub failed: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasons: Option<String>,
}

/// The verdicts among `events`, oldest first.
pub fn verdicts(events: &[Stamped]) -> Vec<Verdict> {
    events
        .iter()
        .filter_map(|s| {
            let (workflow, stage, model, result, run, attempt, reasons) = match &s.event {
                Event::QualityGate(g) => (
                    &g.workflow,
                    &g.stage,
                    &g.model,
                    g.result,
                    g.run.clone(),
                    g.attempt,
                    g.reasons.clone(),
                ),
                Event::Stage(st) => (
                    &st.workflow,
                    &st.stage,
                    &st.model,
                    st.gate,
                    None,
                    1,
                    st.reason.clone(),
                ),
                _ => return None,
            };
            Some(Verdict {
                at: to_rfc3339(s.at),
                at_ms: s.at,
                workflow: workflow.clone(),
                stage: stage.clone(),
                model: model.clone(),
                result: result.as_str(),
                run,
                attempt,
                failed: if result == GateResult::Fail {
                    criteria_of(reasons.as_deref())
                } else {
                    Vec::new()
                },
                reasons,
            })
        })
        .collect()
}

/// Verdicts and failures per (workflow, stage), and failures per criterion.
pub type Tally = (
    BTreeMap<(String, String), (u64, u64)>,
    BTreeMap<String, u64>,
);

/// Counts `verdicts` by stage (verdicts, failed) and their failed criteria.
pub fn tally<'a>(verdicts: impl IntoIterator<Item = &'a Verdict>) -> Tally {
    let (mut by_stage, mut criteria) = (BTreeMap::new(), BTreeMap::new());
    for v in verdicts {
        let e: &mut (u64, u64) = by_stage
            .entry((v.workflow.clone(), v.stage.clone()))
            .or_default();
        e.0 += 1;
        if v.result == "fail" {
            e.1 += 1;
            for c in &v.failed {
                *criteria.entry(c.clone()).or_default() += 1;
            }
        }
    }
    (by_stage, criteria)
}

fn gates(ev: &Evidence) -> (Vec<Finding>, Scored) {
    let now = ev.now;
    let all = verdicts(&ev.events);
    let window: Vec<&Verdict> = all
        .iter()
        .filter(|v| v.at_ms >= now - ev.window_ms)
        .collect();
    let mut out = Vec::new();
    let mut scored: Scored = Vec::new();

    // 1. Failing stages.
    let (by_stage, _) = tally(window.iter().copied());
    let mut failing: Vec<((String, String), u64, u64, f64)> = by_stage
        .iter()
        .map(|(k, (n, f))| (k.clone(), *n, *f, *f as f64 / *n as f64))
        .filter(|(_, _, _, r)| *r > ev.gate_threshold)
        .collect();
    failing.sort_by(|a, b| b.3.total_cmp(&a.3));
    out.push(finding(
        "failing stages",
        if failing.is_empty() { Status::Ok } else { Status::Fail },
        if failing.is_empty() {
            format!("no stage fails more than {} of its verdicts", pct(ev.gate_threshold))
        } else {
            failing
                .iter()
                .map(|((w, s), n, f, r)| format!("{w}/{s}: {f} of {n} failed ({})", pct(*r)))
                .collect::<Vec<_>>()
                .join("; ")
        },
        json!(by_stage
            .iter()
            .map(|((w, s), (n, f))| json!({"workflow": w, "stage": s, "verdicts": n, "failed": f, "failure_rate": *f as f64 / *n as f64}))
            .collect::<Vec<_>>()),
    ));
    let focus: BTreeSet<(String, String)> = failing.iter().map(|(k, ..)| k.clone()).collect();
    let in_focus =
        |v: &Verdict| focus.is_empty() || focus.contains(&(v.workflow.clone(), v.stage.clone()));

    // 2. Pass rate by model.
    let mut by_model: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for v in window.iter().filter(|v| in_focus(v)) {
        let e = by_model.entry(v.model.clone()).or_default();
        e.0 += 1;
        if v.result == "pass" {
            e.1 += 1;
        }
    }
    let pass_rate = |m: &str| by_model.get(m).map(|(n, p)| *p as f64 / *n as f64);
    out.push(finding(
        "pass rate by model",
        Status::Info,
        by_model
            .iter()
            .map(|(m, (n, p))| format!("{m}: {} of {n}", p))
            .collect::<Vec<_>>()
            .join("; "),
        json!(by_model.iter().map(|(m, (n, p))| json!({"model": m, "verdicts": n, "passed": p, "pass_rate": *p as f64 / *n as f64})).collect::<Vec<_>>()),
    ));

    // 3. The criteria that fail.
    let mut criteria: BTreeMap<String, (u64, BTreeSet<String>)> = BTreeMap::new();
    let fails: Vec<&&Verdict> = window
        .iter()
        .filter(|v| in_focus(v) && v.result == "fail")
        .collect();
    for v in &fails {
        for c in &v.failed {
            let e = criteria.entry(c.clone()).or_default();
            e.0 += 1;
            e.1.insert(v.model.clone());
        }
    }
    let mut top: Vec<_> = criteria.iter().collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1 .0));
    out.push(finding(
        "most frequent failed criteria",
        if top.is_empty() {
            Status::Info
        } else {
            Status::Warn
        },
        if top.is_empty() {
            "no failed verdict in the window".into()
        } else {
            top.iter()
                .take(5)
                .map(|(c, (n, _))| format!("{c}: {n}"))
                .collect::<Vec<_>>()
                .join("; ")
        },
        json!(top
            .iter()
            .map(|(c, (n, models))| json!({"criterion": c, "failures": n, "models": models}))
            .collect::<Vec<_>>()),
    ));
    let models_seen: BTreeSet<&str> = fails.iter().map(|v| v.model.as_str()).collect();
    let prompt_issue = top.first().map(|(c, (n, models))| {
        let share = *n as f64 / fails.len().max(1) as f64;
        let every_model = models.len() >= models_seen.len();
        (
            share * if every_model { 1.0 } else { 0.6 },
            format!(
                "`{c}` failed in {n} of {} failed verdicts ({}), on {} of {} models",
                fails.len(),
                pct(share),
                models.len(),
                models_seen.len()
            ),
        )
    });

    // 4. Gate changes.
    let first_fail = fails.iter().map(|v| v.at_ms).min();
    let changes: Vec<Value> = ev
        .gate_changes
        .iter()
        .filter_map(|s| match &s.event {
            Event::GateChanged { workflow, stage, before, after } => Some((s.at, workflow, stage, before, after)),
            _ => None,
        })
        .filter(|(_, w, s, ..)| focus.is_empty() || focus.contains(&((*w).clone(), (*s).clone())))
        .map(|(at, w, s, before, after)| json!({"at": to_rfc3339(at), "at_ms": at, "workflow": w, "stage": s, "before": before, "after": after}))
        .collect();
    let latest_change = changes.iter().filter_map(|c| c["at_ms"].as_i64()).max();
    out.push(finding(
        "recent gate-configuration changes (7 days)",
        if changes.is_empty() {
            Status::Info
        } else {
            Status::Warn
        },
        if changes.is_empty() {
            "no change of these stages' gates".into()
        } else {
            changes
                .iter()
                .map(|c| {
                    format!(
                        "{}/{} at {}",
                        c["workflow"].as_str().unwrap_or("?"),
                        c["stage"].as_str().unwrap_or("?"),
                        c["at"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
        json!(changes),
    ));
    let stricter = match (latest_change, first_fail) {
        (Some(change), Some(fail)) if change <= fail + 60_000 => (
            if fail - change <= 2 * 3_600_000 {
                0.9
            } else {
                0.5
            },
            format!(
                "the gate changed at {}, the first failure in the window at {}",
                to_rfc3339(change),
                to_rfc3339(fail)
            ),
        ),
        (Some(change), _) => (
            0.2,
            format!(
                "the gate changed at {}, after failures had begun",
                to_rfc3339(change)
            ),
        ),
        _ => (0.0, "no gate change in 7 days".into()),
    };
    // A criterion failing everywhere right after the gate changed is the change's doing first.
    if let Some((score, text)) = prompt_issue {
        let discount = if stricter.0 >= 0.9 { 0.6 } else { 1.0 };
        scored.push(("Prompt issues", score * discount, text));
    }
    scored.push(("Stricter criteria", stricter.0, stricter.1));

    // 5. The stage's model against its escalation model.
    let mut tier = (
        0.0,
        "no stage with an escalation model among the failing ones".to_string(),
    );
    for st in ev
        .stages
        .iter()
        .filter(|s| focus.contains(&(s.workflow.clone(), s.stage.clone())))
    {
        if let (Some(m), Some(e)) = (&st.model, &st.escalation_model) {
            if let (Some(rm), Some(re)) = (pass_rate(m), pass_rate(e)) {
                if re - rm > tier.0 {
                    tier = (
                        re - rm,
                        format!(
                            "{}/{}: {m} passes {}, the escalation model {e} {}",
                            st.workflow,
                            st.stage,
                            pct(rm),
                            pct(re)
                        ),
                    );
                }
            }
        }
    }
    scored.push(("Wrong model tier", tier.0 * 1.5, tier.1));

    // 6. A model's pass rate dropping with no gate change: first half of the window vs second.
    let mid = now - ev.window_ms / 2;
    let mut drop = (0.0, "no model's pass rate dropped".to_string());
    for m in by_model.keys() {
        let rate = |from: i64, to: i64| {
            let vs: Vec<_> = window
                .iter()
                .filter(|v| in_focus(v) && &v.model == m && v.at_ms >= from && v.at_ms < to)
                .collect();
            (!vs.is_empty())
                .then(|| vs.iter().filter(|v| v.result == "pass").count() as f64 / vs.len() as f64)
        };
        if let (Some(a), Some(b)) = (rate(now - ev.window_ms, mid), rate(mid, now + 1)) {
            if a - b > drop.0 {
                drop = (
                    a - b,
                    format!(
                        "{m}: {} → {} between the halves of the window",
                        pct(a),
                        pct(b)
                    ),
                );
            }
        }
    }
    let degradation = if latest_change.is_some() {
        drop.0 * 0.5
    } else {
        drop.0 * 1.5
    };
    scored.push(("Model degradation", degradation, drop.1));

    // 7. The experiments on the failing stages: a decided one has the fix ready to promote; a
    // stage with none is where one would measure the alternatives.
    out.push(experiments_finding(ev, &focus));

    // 8. Failures concentrated in a few runs.
    let mut by_run: BTreeMap<&str, u64> = BTreeMap::new();
    for v in &fails {
        if let Some(r) = &v.run {
            *by_run.entry(r.as_str()).or_default() += 1;
        }
    }
    let with_runs: u64 = by_run.values().sum();
    if by_run.len() >= 3 {
        let mut counts: Vec<u64> = by_run.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top_n = (counts.len() / 5).max(1);
        let share = counts[..top_n].iter().sum::<u64>() as f64 / with_runs as f64;
        scored.push((
            "Input quality",
            (share - 0.5).max(0.0) * 2.0,
            format!(
                "{} of the failures are in {top_n} of {} runs",
                pct(share),
                counts.len()
            ),
        ));
    }
    (out, scored)
}

/// What the experiments of the failing stages (every stage with one, when none fails) say, and
/// for a failing stage without one, the experiment to set up.
fn experiments_finding(ev: &Evidence, focus: &BTreeSet<(String, String)>) -> Finding {
    let relevant =
        |w: &str, s: &str| focus.is_empty() || focus.contains(&(w.to_string(), s.to_string()));
    let mut lines = Vec::new();
    let mut data = Vec::new();
    let mut status = Status::Info;
    for e in ev
        .experiments
        .iter()
        .filter(|e| relevant(&e.workflow, &e.stage))
    {
        let (w, s) = (&e.workflow, &e.stage);
        let best = |name: &str| e.variants.iter().find(|v| v.variant == name);
        let describe = |name: &str| {
            best(name).map_or(String::new(), |v| {
                format!(
                    "passes {} over {} runs, P(best) {:.2}",
                    v.pass_rate.map_or("–".to_string(), pct),
                    v.runs,
                    v.p_best
                )
            })
        };
        let line = match (&e.decided, &e.leader) {
            (Some(d), _) => {
                status = Status::Warn;
                format!(
                    "{w}/{s}: decided, `{d}` is best ({}); adopt it with `hypertool experiments promote {w} {s} {d}`",
                    describe(d)
                )
            }
            (None, Some(l)) => format!(
                "{w}/{s}: running ({} allocation), `{l}` leads ({}); not decided before P(best) ≥ {} after {} runs of each variant — `hypertool experiments show {w} {s}`",
                e.allocation,
                describe(l),
                e.decide_at,
                e.min_runs
            ),
            _ => format!("{w}/{s}: running, no runs yet"),
        };
        lines.push(line);
        data.push(json!({"workflow": w, "stage": s, "state": if e.decided.is_some() { "decided" } else { "running" },
            "decided": e.decided, "leader": e.leader, "variants": e.variants}));
    }
    for (w, s) in focus {
        if ev
            .experiments
            .iter()
            .any(|e| &e.workflow == w && &e.stage == s)
        {
            continue;
        }
        lines.push(format!(
            "{w}/{s}: no experiment — list `variants` on the stage in workflows/{w}.yml (its model and prompt as \
             they are, beside a candidate: `model: quality`, or a revised prompt file) with `allocation: adaptive`; \
             hypertool then measures which passes the gate more and says when one is best"
        ));
        data.push(json!({"workflow": w, "stage": s, "state": "none"}));
    }
    if lines.is_empty() {
        lines.push("no workflow stage runs an experiment".into());
    }
    finding(
        "experiments on the failing stages",
        status,
        lines.join("; "),
        json!(data),
    )
}

fn switching(ev: &Evidence) -> (Vec<Finding>, Scored) {
    let now = ev.now;
    let from = now - ev.window_ms;
    let mut out = Vec::new();
    let mut scored: Scored = Vec::new();
    // Explicit switches are events; inferred ones are a session's calls changing persona.
    let mut matrix: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut by_chatmode: BTreeMap<String, u64> = BTreeMap::new();
    let (mut explicit, mut inferred, mut calls, mut suppressed) = (0u64, 0u64, 0u64, 0u64);
    let mut last_persona: HashMap<&str, &str> = HashMap::new();
    let mut stage_starts = 0u64;
    for s in &ev.events {
        let counted = s.at >= from;
        match &s.event {
            Event::PersonaSwitch(p) => {
                if let Some(f) = p.from.as_deref() {
                    if counted && f != p.to {
                        explicit += 1;
                        *matrix.entry((f.to_string(), p.to.clone())).or_default() += 1;
                        *by_chatmode.entry(p.chatmode.clone()).or_default() += 1;
                    }
                }
                last_persona.insert(p.session.as_str(), p.to.as_str());
            }
            Event::Usage(u) => {
                if counted {
                    calls += 1;
                }
                if let Some(session) = u.session.as_deref() {
                    if let Some(prev) = last_persona.insert(session, u.persona.as_str()) {
                        if prev != u.persona && counted {
                            inferred += 1;
                            *matrix
                                .entry((prev.to_string(), u.persona.clone()))
                                .or_default() += 1;
                            *by_chatmode.entry(u.chatmode.clone()).or_default() += 1;
                        }
                    }
                }
            }
            Event::SwitchSuppressed { .. } if counted => suppressed += 1,
            Event::StageStarted { .. } if counted => stage_starts += 1,
            _ => {}
        }
    }
    let switches = explicit + inferred;
    let secs = ev.window_ms as f64 / 1000.0;
    let mut cells: Vec<_> = matrix.iter().collect();
    cells.sort_by(|a, b| b.1.cmp(a.1));
    out.push(finding(
        "transition matrix",
        if switches as f64 / secs > ev.switch_threshold { Status::Fail } else { Status::Info },
        format!(
            "{switches} switches in the window ({:.2}/s; {explicit} explicit, {inferred} inferred from calls){}",
            switches as f64 / secs,
            if cells.is_empty() { String::new() } else { format!(": {}", cells.iter().take(6).map(|((f, t), n)| format!("{f}→{t} {n}")).collect::<Vec<_>>().join(", ")) }
        ),
        json!(cells.iter().map(|((f, t), n)| json!({"from": f, "to": t, "switches": n})).collect::<Vec<_>>()),
    ));
    let oscillating: Vec<_> = ev.oscillations.iter().filter(|o| o.0 >= from).collect();
    let sessions: BTreeSet<&str> = oscillating.iter().map(|o| o.1.as_str()).collect();
    // Per session: its chatmode, the pair, how many oscillations.
    let mut per_session: BTreeMap<&str, (&str, [&str; 2], u64)> = BTreeMap::new();
    for o in &oscillating {
        let mut pair = [o.3[0].as_str(), o.3[1].as_str()];
        pair.sort_unstable();
        per_session
            .entry(o.1.as_str())
            .or_insert((o.2.as_str(), pair, 0))
            .2 += 1;
    }
    out.push(finding(
        "oscillating sessions",
        if sessions.is_empty() {
            Status::Ok
        } else {
            Status::Warn
        },
        if sessions.is_empty() {
            "none in the window".to_string()
        } else {
            format!(
                "{} session(s): {}",
                sessions.len(),
                per_session
                    .iter()
                    .take(5)
                    .map(|(s, (c, p, n))| format!("{s} ({}↔{}, {c}, {n} times)", p[0], p[1]))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
        json!(oscillating
            .iter()
            .map(
                |o| json!({"at": to_rfc3339(o.0), "session": o.1, "chatmode": o.2, "personas": o.3})
            )
            .collect::<Vec<_>>()),
    ));
    let per_call = if calls > 0 {
        switches as f64 / calls as f64
    } else {
        0.0
    };
    out.push(finding(
        "switches per call",
        if per_call >= 0.5 { Status::Warn } else { Status::Info },
        format!("{per_call:.2} ({switches} switches, {calls} calls); {suppressed} refused by the switch policy"),
        json!({"switches": switches, "calls": calls, "suppressed": suppressed}),
    ));
    // Causes.
    let pair_share = {
        let mut pairs: BTreeMap<(String, String), u64> = BTreeMap::new();
        for ((f, t), n) in &matrix {
            let key = if f < t {
                (f.clone(), t.clone())
            } else {
                (t.clone(), f.clone())
            };
            *pairs.entry(key).or_default() += n;
        }
        pairs
            .values()
            .max()
            .map_or(0.0, |m| *m as f64 / switches.max(1) as f64)
    };
    scored.push((
        "Infinite loop",
        if sessions.is_empty() {
            pair_share * 0.5
        } else {
            0.5 + pair_share * 0.5
        },
        format!(
            "{} oscillating session(s); the busiest pair holds {} of the switches",
            sessions.len(),
            pct(pair_share)
        ),
    ));
    scored.push((
        "Over-eager routing",
        (per_call * 1.2).min(1.0) * if matrix.len() >= 4 { 1.0 } else { 0.7 },
        format!(
            "{per_call:.2} switches per call across {} transitions",
            matrix.len()
        ),
    ));
    let inferred_share = if switches > 0 {
        inferred as f64 / switches as f64
    } else {
        0.0
    };
    scored.push((
        "Missing state",
        inferred_share * if explicit == 0 { 1.0 } else { 0.6 },
        format!(
            "{} of the switches inferred from calls (no cooldown applies to them)",
            pct(inferred_share)
        ),
    ));
    let (top_chatmode, top_n) = by_chatmode
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or(("-".to_string(), 0), |(c, n)| (c.clone(), *n));
    let chatmode_share = top_n as f64 / switches.max(1) as f64;
    scored.push((
        "Bug in chatmode",
        if by_chatmode.len() >= 2 {
            (chatmode_share - 0.5).max(0.0) * 2.0
        } else {
            0.3 * chatmode_share
        },
        format!(
            "chatmode {top_chatmode} holds {} of the switches ({} chatmodes switch)",
            pct(chatmode_share),
            by_chatmode.len()
        ),
    ));
    let per_stage = if stage_starts > 0 {
        switches as f64 / stage_starts as f64
    } else {
        f64::INFINITY
    };
    scored.push((
        "Intentional design",
        if per_stage <= 1.5 { 0.8 } else { 0.0 },
        format!("{switches} switches for {stage_starts} stage starts"),
    ));
    (out, scored)
}

fn slow(ev: &Evidence) -> (Vec<Finding>, Scored) {
    let now = ev.now;
    let from = now - ev.window_ms;
    let mut out = Vec::new();
    let mut scored: Scored = Vec::new();
    // 1. Durations per stage: the engine's runs (ended stages) and reported `stage` events.
    let mut durations: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut running = Vec::new();
    for r in &ev.runs {
        for (name, st) in &r.stages {
            match (st.status, st.duration_seconds, st.finished_at) {
                (StageStatus::Running, ..) => running.push((
                    r.workflow.clone(),
                    name.clone(),
                    r.id.clone(),
                    (now - st.started_at) as f64 / 1000.0,
                    st.attempts,
                )),
                (_, Some(d), Some(end)) if end >= from => durations
                    .entry((r.workflow.clone(), name.clone()))
                    .or_default()
                    .push(d),
                _ => {}
            }
        }
    }
    for s in ev.events.iter().filter(|s| s.at >= from) {
        if let Event::Stage(st) = &s.event {
            durations
                .entry((st.workflow.clone(), st.stage.clone()))
                .or_default()
                .push(st.duration_seconds);
        }
    }
    let mut p95s: Vec<((String, String), f64, usize)> = durations
        .iter_mut()
        .map(|(k, v)| (k.clone(), quantile(v, 0.95), v.len()))
        .collect();
    p95s.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slow_stages: Vec<_> = p95s
        .iter()
        .filter(|(_, p, _)| *p > ev.slow_threshold_seconds)
        .collect();
    out.push(finding(
        "p95 duration per stage",
        if slow_stages.is_empty() {
            Status::Ok
        } else {
            Status::Fail
        },
        if p95s.is_empty() {
            "no stage ended in the window".to_string()
        } else {
            p95s.iter()
                .take(6)
                .map(|((w, s), p, n)| format!("{w}/{s}: {p:.0}s ({n} ended)"))
                .collect::<Vec<_>>()
                .join("; ")
        },
        json!(p95s
            .iter()
            .map(|((w, s), p, n)| json!({"workflow": w, "stage": s, "p95_seconds": p, "ended": n}))
            .collect::<Vec<_>>()),
    ));
    running.sort_by(|a, b| b.3.total_cmp(&a.3));
    let old: Vec<_> = running
        .iter()
        .filter(|r| r.3 > ev.slow_threshold_seconds)
        .collect();
    out.push(finding(
        "running stages",
        if old.is_empty() { Status::Ok } else { Status::Fail },
        if running.is_empty() { "none".to_string() } else {
            running.iter().take(6).map(|(w, s, r, age, _)| format!("{w}/{s} run {r}: {age:.0}s")).collect::<Vec<_>>().join("; ")
        },
        json!(running.iter().map(|(w, s, r, age, a)| json!({"workflow": w, "stage": s, "run": r, "age_seconds": age, "attempts": a})).collect::<Vec<_>>()),
    ));
    let mut focus: BTreeSet<(String, String)> =
        slow_stages.iter().map(|(k, ..)| k.clone()).collect();
    focus.extend(old.iter().map(|(w, s, ..)| (w.clone(), s.clone())));

    // 2. LLM latency by model, prompt and completion sizes of the stages' calls.
    let calls = usages(&ev.events, from, now + 1);
    let mut latency: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (_, u) in &calls {
        if let Some(d) = u.duration_seconds {
            latency.entry(u.model.as_str()).or_default().push(d);
        }
    }
    let lat: Vec<(String, f64, usize)> = latency
        .iter_mut()
        .map(|(m, v)| (m.to_string(), quantile(v, 0.95), v.len()))
        .collect();
    out.push(finding(
        "LLM latency by model (p95)",
        Status::Info,
        if lat.is_empty() {
            "no timed calls in the window".into()
        } else {
            lat.iter()
                .map(|(m, p, n)| format!("{m}: {p:.1}s ({n} calls)"))
                .collect::<Vec<_>>()
                .join("; ")
        },
        json!(lat
            .iter()
            .map(|(m, p, n)| json!({"model": m, "p95_seconds": p, "calls": n}))
            .collect::<Vec<_>>()),
    ));
    let is_focus = |u: &Usage| match (&u.workflow, &u.stage) {
        (Some(w), Some(s)) => focus.contains(&(w.clone(), s.clone())),
        _ => false,
    };
    let mut prompts_in: Vec<f64> = calls
        .iter()
        .filter(|(_, u)| is_focus(u))
        .map(|(_, u)| u.prompt_tokens as f64)
        .collect();
    let mut prompts_out: Vec<f64> = calls
        .iter()
        .filter(|(_, u)| !is_focus(u) && u.stage.is_some())
        .map(|(_, u)| u.prompt_tokens as f64)
        .collect();
    let mut completions: Vec<f64> = calls
        .iter()
        .filter(|(_, u)| is_focus(u))
        .map(|(_, u)| u.completion_tokens as f64)
        .collect();
    let (pm_in, pm_out, cm) = (
        quantile(&mut prompts_in, 0.5),
        quantile(&mut prompts_out, 0.5),
        quantile(&mut completions, 0.5),
    );
    out.push(finding(
        "prompt and completion sizes",
        Status::Info,
        format!("slow stages' calls: median prompt {pm_in:.0}, median completion {cm:.0} tokens ({} calls); other stages' median prompt {pm_out:.0}", prompts_in.len()),
        json!({"median_prompt_tokens": pm_in, "median_completion_tokens": cm, "other_stages_median_prompt_tokens": pm_out, "calls": prompts_in.len()}),
    ));
    let ratio = if pm_out > 0.0 {
        pm_in / pm_out
    } else if pm_in >= 8000.0 {
        4.0
    } else {
        0.0
    };
    scored.push((
        "Large prompts",
        ((ratio - 1.0) / 3.0)
            .max(0.0)
            .max(if pm_in >= 8000.0 { 0.6 } else { 0.0 }),
        format!("median prompt {pm_in:.0} tokens, {ratio:.1}× other stages'"),
    ));
    scored.push((
        "Long completions",
        ((cm - 500.0) / 2000.0).max(0.0),
        format!("median completion {cm:.0} tokens"),
    ));

    // 3. Retries and escalations.
    let verdicts = verdicts(&ev.events);
    let focus_verdicts: Vec<_> = verdicts
        .iter()
        .filter(|v| {
            v.at_ms >= from
                && (focus.is_empty() || focus.contains(&(v.workflow.clone(), v.stage.clone())))
        })
        .collect();
    let retried = focus_verdicts.iter().filter(|v| v.attempt > 1).count();
    let share = retried as f64 / focus_verdicts.len().max(1) as f64;
    let escalated: BTreeSet<String> = ev
        .stages
        .iter()
        .filter(|s| focus.contains(&(s.workflow.clone(), s.stage.clone())))
        .filter_map(|s| s.escalation_model.clone())
        .filter(|m| focus_verdicts.iter().any(|v| &v.model == m))
        .collect();
    out.push(finding(
        "retries and escalations",
        if share >= 0.3 {
            Status::Warn
        } else {
            Status::Info
        },
        format!(
            "{retried} of {} gate verdicts were retries; escalated to: {}",
            focus_verdicts.len(),
            if escalated.is_empty() {
                "none".into()
            } else {
                escalated.iter().cloned().collect::<Vec<_>>().join(", ")
            }
        ),
        json!({"verdicts": focus_verdicts.len(), "retries": retried, "escalated_to": escalated}),
    ));
    scored.push((
        "Quality gate retries",
        share * 1.5,
        format!("{} of the verdicts were retries", pct(share)),
    ));

    // Model latency: the slow stages' models slow everywhere.
    let stage_models: BTreeSet<&str> = calls
        .iter()
        .filter(|(_, u)| is_focus(u))
        .map(|(_, u)| u.model.as_str())
        .collect();
    let slowest = lat
        .iter()
        .filter(|(m, ..)| stage_models.contains(m.as_str()))
        .map(|(_, p, _)| *p)
        .fold(0.0, f64::max);
    scored.push((
        "Model latency",
        (slowest / 60.0).min(1.0),
        format!("the slow stages' models take up to {slowest:.1}s per call (p95)"),
    ));

    // Sequential bottleneck: old running stages with few recent calls.
    let idle: Vec<String> = old
        .iter()
        .filter(|(w, s, r, ..)| {
            calls
                .iter()
                .filter(|(at, u)| {
                    *at >= now - 600_000
                        && u.run.as_deref() == Some(r.as_str())
                        && u.workflow.as_deref() == Some(w.as_str())
                        && u.stage.as_deref() == Some(s.as_str())
                })
                .count()
                <= 1
        })
        .map(|(w, s, r, age, _)| format!("{w}/{s} run {r} open {age:.0}s"))
        .collect();
    scored.push((
        "Sequential bottleneck",
        if idle.is_empty() { 0.0 } else { 0.8 },
        if idle.is_empty() {
            "no long-open stage without calls".into()
        } else {
            format!(
                "open with at most one call in 10 minutes: {}",
                idle.join(", ")
            )
        },
    ));
    (out, scored)
}

fn langfuse(ev: &Evidence) -> (Vec<Finding>, Scored) {
    let mut out = Vec::new();
    let mut scored: Scored = Vec::new();
    let Some(lf) = &ev.langfuse else {
        out.push(finding(
            "langfuse",
            Status::Info,
            "no Langfuse destination is configured",
            Value::Null,
        ));
        scored.push(("Langfuse disabled", 1.0, "no Langfuse destination".into()));
        return (out, scored);
    };
    let set = |b: bool| if b { "set" } else { "NOT set" };
    out.push(finding(
        "variables",
        if lf.public_key_set && lf.secret_key_set { Status::Ok } else { Status::Fail },
        format!("{} {}, {} {}; host {}; Langfuse {}", lf.public_key_env, set(lf.public_key_set), lf.secret_key_env, set(lf.secret_key_set), lf.host, if lf.enabled { "enabled" } else { "disabled" }),
        json!({"public_key_env": lf.public_key_env, "public_key_set": lf.public_key_set, "secret_key_env": lf.secret_key_env, "secret_key_set": lf.secret_key_set, "host": lf.host, "enabled": lf.enabled}),
    ));
    let (status, text) = match &lf.test_call {
        TestCall::Accepted => (Status::Ok, "Langfuse accepted the keys".to_string()),
        TestCall::Refused { status } => (
            Status::Fail,
            format!("Langfuse refused the keys (HTTP {status})"),
        ),
        TestCall::Unreachable { error } => {
            (Status::Fail, format!("cannot reach {}: {error}", lf.host))
        }
        TestCall::NotTried { why } => (Status::Info, format!("not tried: {why}")),
    };
    out.push(finding(
        "authenticated test call",
        status,
        text,
        json!(lf.test_call),
    ));
    out.push(finding(
        "spool and exports",
        if lf.spool_bytes > 0 { Status::Warn } else { Status::Info },
        format!(
            "{} bytes spooled; exports {}; last accepted {}; last error: {}",
            lf.spool_bytes,
            if lf.exports.is_empty() { "none (no Langfuse destination running)".to_string() } else { lf.exports.iter().map(|(r, n)| format!("{r} {n}")).collect::<Vec<_>>().join(", ") },
            lf.last_success_ms.map_or("never".into(), to_rfc3339),
            lf.last_error.as_deref().unwrap_or("none")
        ),
        json!({"spool_bytes": lf.spool_bytes, "exports": lf.exports, "last_success": lf.last_success_ms.map(to_rfc3339), "last_error": lf.last_error, "traces_accepted": lf.traces_accepted}),
    ));
    let missing = !(lf.public_key_set && lf.secret_key_set);
    scored.push((
        "Missing credentials",
        if missing && lf.enabled {
            1.0
        } else if missing {
            0.3
        } else {
            0.0
        },
        format!(
            "{} {}, {} {}",
            lf.public_key_env,
            set(lf.public_key_set),
            lf.secret_key_env,
            set(lf.secret_key_set)
        ),
    ));
    let refused = lf.exports.get("auth_refused").copied().unwrap_or(0);
    let wrong = matches!(lf.test_call, TestCall::Refused { .. }) || refused > 0;
    scored.push((
        "Wrong credentials",
        if wrong { 0.95 } else { 0.0 },
        format!(
            "test call: {}; {refused} exports refused",
            match &lf.test_call {
                TestCall::Refused { status } => format!("HTTP {status}"),
                TestCall::Accepted => "accepted".into(),
                TestCall::Unreachable { .. } => "unreachable".into(),
                TestCall::NotTried { .. } => "not tried".into(),
            }
        ),
    ));
    let retries = lf.exports.get("retry").copied().unwrap_or(0);
    let unreachable = matches!(lf.test_call, TestCall::Unreachable { .. });
    scored.push((
        "Network issue",
        if unreachable {
            0.9
        } else if retries > 0 {
            0.5
        } else {
            0.0
        },
        format!(
            "test call {}; {retries} exports retried",
            if unreachable {
                "could not connect"
            } else {
                "connected"
            }
        ),
    ));
    let waiting = lf.spool_bytes > 0 && matches!(lf.test_call, TestCall::Accepted);
    scored.push((
        "Traces waiting",
        if waiting { 0.7 } else { 0.0 },
        format!("{} bytes spooled", lf.spool_bytes),
    ));
    scored.push((
        "Langfuse disabled",
        if lf.enabled { 0.0 } else { 1.0 },
        format!("hypertool_langfuse_enabled is {}", u8::from(lf.enabled)),
    ));
    (out, scored)
}

impl Report {
    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        text_of(&serde_json::to_value(self).unwrap_or(Value::Null))
    }
}

/// A report (as its JSON, e.g. from `GET /api/investigations/{alert}`) for a terminal.
pub fn text_of(v: &Value) -> String {
    use std::fmt::Write;
    let s_of = |v: &Value| v.as_str().unwrap_or("").to_string();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} — investigation at {} (window {})",
        s_of(&v["alert"]),
        s_of(&v["at"]),
        s_of(&v["window"])
    );
    let _ = writeln!(s, "\nChecked:");
    for f in v["findings"].as_array().into_iter().flatten() {
        let mark = match f["status"].as_str() {
            Some("ok") => "ok  ",
            Some("warn") => "WARN",
            Some("fail") => "FAIL",
            _ => "info",
        };
        let _ = writeln!(s, "  [{mark}] {}: {}", s_of(&f["check"]), s_of(&f["found"]));
    }
    let causes = v["causes"].as_array().cloned().unwrap_or_default();
    if !causes.is_empty()
        && causes
            .iter()
            .all(|c| c["score"].as_f64().unwrap_or(0.0) == 0.0)
    {
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
                s_of(&c["cause"]),
                c["score"].as_f64().unwrap_or(0.0),
                s_of(&c["prior"])
            );
            let _ = writeln!(s, "     indicator: {}", s_of(&c["indicator"]));
            let _ = writeln!(s, "     evidence:  {}", s_of(&c["evidence"]));
            let _ = writeln!(s, "     fix:       {}", s_of(&c["fix"]));
        }
    }
    for n in v["notes"].as_array().into_iter().flatten() {
        let _ = writeln!(s, "\nnote: {}", s_of(n));
    }
    s
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
