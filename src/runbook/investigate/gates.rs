//! HighQualityGateFailureRate: the failing stages, pass rate by model, the failed criteria, the
//! gates' recent changes, the stages' experiments — and the verdicts read from the ledger that the
//! quality-gate history shares.

// The investigations' shared vocabulary (evidence, findings, helpers) and their imports.
use super::*;

pub(super) const GATE_CAUSES: &[CauseSpec] = &[
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

/// A change of a stage's gate in the window: the gate-changes finding's data.
#[derive(Serialize)]
struct GateChange<'a> {
    at: String,
    at_ms: i64,
    workflow: &'a String,
    stage: &'a String,
    /// The gate before and after, as the `gate_changed` event recorded them.
    before: &'a Option<Value>,
    after: &'a Option<Value>,
}

/// The verdicts the gate investigation reads: the window's, the failing stages in focus (all when
/// none fails), each model's (verdicts, passes) on them, and their failed verdicts.
struct Window<'a> {
    ev: &'a Evidence,
    window: Vec<&'a Verdict>,
    focus: BTreeSet<(String, String)>,
    by_model: BTreeMap<String, (u64, u64)>,
    fails: Vec<&'a Verdict>,
}

impl Window<'_> {
    fn in_focus(&self, v: &Verdict) -> bool {
        self.focus.is_empty() || self.focus.contains(&(v.workflow.clone(), v.stage.clone()))
    }

    fn pass_rate(&self, model: &str) -> Option<f64> {
        self.by_model.get(model).map(|(n, p)| *p as f64 / *n as f64)
    }
}

/// HighQualityGateFailureRate: the failing stages, then each of the runbook's causes checked on
/// their verdicts.
pub(super) fn gates(ev: &Evidence) -> (Vec<Finding>, Scored) {
    let now = ev.now;
    let all = verdicts(&ev.events);
    let window: Vec<&Verdict> = all
        .iter()
        .filter(|v| v.at_ms >= now - ev.window_ms)
        .collect();
    let mut out = Vec::new();
    let mut scored: Scored = Vec::new();
    let focus = failing_stages(ev, &window, &mut out);
    let mut cx = Window {
        ev,
        window,
        focus,
        by_model: BTreeMap::new(),
        fails: Vec::new(),
    };
    cx.by_model = pass_rate_by_model(&cx, &mut out);
    cx.fails = cx
        .window
        .iter()
        .copied()
        .filter(|v| cx.in_focus(v) && v.result == "fail")
        .collect();
    let prompt_issue = failed_criteria(&cx, &mut out);
    let (latest_change, stricter) = gate_changes(&cx, &mut out);
    // A criterion failing everywhere right after the gate changed is the change's doing first.
    if let Some((score, text)) = prompt_issue {
        let discount = if stricter.0 >= 0.9 { 0.6 } else { 1.0 };
        scored.push(("Prompt issues", score * discount, text));
    }
    scored.push(("Stricter criteria", stricter.0, stricter.1));
    scored.push(wrong_tier(&cx));
    scored.push(degradation(&cx, latest_change));
    // The experiments on the failing stages: a decided one has the fix ready to promote; a stage
    // with none is where one would measure the alternatives.
    out.push(experiments_finding(ev, &cx.focus));
    scored.extend(input_quality(&cx));
    (out, scored)
}

/// Step 1: the stages failing more than the alert's threshold; they are the focus of the rest.
fn failing_stages(
    ev: &Evidence,
    window: &[&Verdict],
    out: &mut Vec<Finding>,
) -> BTreeSet<(String, String)> {
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
    failing.iter().map(|(k, ..)| k.clone()).collect()
}

/// Step 2: the pass rate of each model on the stages in focus.
fn pass_rate_by_model(cx: &Window<'_>, out: &mut Vec<Finding>) -> BTreeMap<String, (u64, u64)> {
    let mut by_model: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for v in cx.window.iter().filter(|v| cx.in_focus(v)) {
        let e = by_model.entry(v.model.clone()).or_default();
        e.0 += 1;
        if v.result == "pass" {
            e.1 += 1;
        }
    }
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

    by_model
}

/// Step 3: the criteria that fail, and whether one fails on every model (a prompt issue).
fn failed_criteria(cx: &Window<'_>, out: &mut Vec<Finding>) -> Option<(f64, String)> {
    let fails = &cx.fails;
    let mut criteria: BTreeMap<String, (u64, BTreeSet<String>)> = BTreeMap::new();
    for v in fails {
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

    prompt_issue
}

/// Step 4: changes of the gates in focus (7 days), and whether one came just before the failures.
fn gate_changes(cx: &Window<'_>, out: &mut Vec<Finding>) -> (Option<i64>, (f64, String)) {
    let (ev, focus) = (cx.ev, &cx.focus);
    let first_fail = cx.fails.iter().map(|v| v.at_ms).min();
    let changes: Vec<GateChange> = ev
        .gate_changes
        .iter()
        .filter_map(|s| match &s.event {
            Event::GateChanged {
                workflow,
                stage,
                before,
                after,
            } => Some(GateChange {
                at: to_rfc3339(s.at),
                at_ms: s.at,
                workflow,
                stage,
                before,
                after,
            }),
            _ => None,
        })
        .filter(|c| focus.is_empty() || focus.contains(&(c.workflow.clone(), c.stage.clone())))
        .collect();
    let latest_change = changes.iter().map(|c| c.at_ms).max();
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
                .map(|c| format!("{}/{} at {}", c.workflow, c.stage, c.at))
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
    (latest_change, stricter)
}

/// Step 5: the stage's model against its escalation model.
fn wrong_tier(cx: &Window<'_>) -> (&'static str, f64, String) {
    let (ev, focus) = (cx.ev, &cx.focus);
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
            if let (Some(rm), Some(re)) = (cx.pass_rate(m), cx.pass_rate(e)) {
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
    ("Wrong model tier", tier.0 * 1.5, tier.1)
}

/// Step 6: a model's pass rate dropping with no gate change: first half of the window vs second.
fn degradation(cx: &Window<'_>, latest_change: Option<i64>) -> (&'static str, f64, String) {
    let (ev, now) = (cx.ev, cx.ev.now);
    let mid = now - ev.window_ms / 2;
    let mut drop = (0.0, "no model's pass rate dropped".to_string());
    for m in cx.by_model.keys() {
        let rate = |from: i64, to: i64| {
            let vs: Vec<_> = cx
                .window
                .iter()
                .filter(|v| cx.in_focus(v) && &v.model == m && v.at_ms >= from && v.at_ms < to)
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
    ("Model degradation", degradation, drop.1)
}

/// Step 8: failures concentrated in a few runs (the input, not the stage).
fn input_quality(cx: &Window<'_>) -> Option<(&'static str, f64, String)> {
    let mut by_run: BTreeMap<&str, u64> = BTreeMap::new();
    for v in &cx.fails {
        if let Some(r) = &v.run {
            *by_run.entry(r.as_str()).or_default() += 1;
        }
    }
    let with_runs: u64 = by_run.values().sum();
    if by_run.len() < 3 {
        return None;
    }
    let mut counts: Vec<u64> = by_run.values().copied().collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let top_n = (counts.len() / 5).max(1);
    let share = counts[..top_n].iter().sum::<u64>() as f64 / with_runs as f64;
    Some((
        "Input quality",
        (share - 0.5).max(0.0) * 2.0,
        format!(
            "{} of the failures are in {top_n} of {} runs",
            pct(share),
            counts.len()
        ),
    ))
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
