//! SlowWorkflowStage: the slow stages, their calls' latency and sizes, retries, waits between
//! calls, and stages left open.

// The investigations' shared vocabulary (evidence, findings, helpers) and their imports.
use super::*;

pub(super) const SLOW_CAUSES: &[CauseSpec] = &[
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

/// A stage still running: (workflow, stage, run, age in seconds, attempts).
type Running = (String, String, String, f64, u32);

/// SlowWorkflowStage: the slow stages (by p95, or running too long), then each of the runbook's
/// causes checked on their calls and verdicts.
pub(super) fn slow(ev: &Evidence) -> (Vec<Finding>, Scored) {
    let now = ev.now;
    let from = now - ev.window_ms;
    let mut out = Vec::new();
    let mut scored: Scored = Vec::new();
    let (focus, old) = stage_durations(ev, &mut out);
    let calls = usages(&ev.events, from, now + 1);
    let is_focus = |u: &Usage| match (&u.workflow, &u.stage) {
        (Some(w), Some(s)) => focus.contains(&(w.clone(), s.clone())),
        _ => false,
    };
    let lat = latency_and_sizes(&calls, &is_focus, &mut out, &mut scored);
    retries(ev, &focus, &mut out, &mut scored);
    scored.push(model_latency(&calls, &is_focus, &lat));
    scored.push(bottleneck(now, &calls, &old));
    (out, scored)
}

/// Step 1: durations per stage (the engine's runs, ended and running, and reported `stage`
/// events): the stages in focus, and the ones running longer than the threshold.
fn stage_durations(
    ev: &Evidence,
    out: &mut Vec<Finding>,
) -> (BTreeSet<(String, String)>, Vec<Running>) {
    let now = ev.now;
    let from = now - ev.window_ms;
    let mut durations: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut running: Vec<Running> = Vec::new();
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

    let old: Vec<Running> = old.into_iter().cloned().collect();
    (focus, old)
}

/// Step 2: LLM latency by model (p95), and the prompt and completion sizes of the slow stages'
/// calls against the other stages'. Returns the latencies.
fn latency_and_sizes(
    calls: &[(UnixMillis, &Usage)],
    is_focus: &dyn Fn(&Usage) -> bool,
    out: &mut Vec<Finding>,
    scored: &mut Scored,
) -> Vec<(String, f64, usize)> {
    let mut latency: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (_, u) in calls {
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

    lat
}

/// Step 3: retries and escalations of the slow stages' gate verdicts.
fn retries(
    ev: &Evidence,
    focus: &BTreeSet<(String, String)>,
    out: &mut Vec<Finding>,
    scored: &mut Scored,
) {
    let from = ev.now - ev.window_ms;
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
}

/// Model latency: the slow stages' models slow everywhere.
fn model_latency(
    calls: &[(UnixMillis, &Usage)],
    is_focus: &dyn Fn(&Usage) -> bool,
    lat: &[(String, f64, usize)],
) -> (&'static str, f64, String) {
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
    (
        "Model latency",
        (slowest / 60.0).min(1.0),
        format!("the slow stages' models take up to {slowest:.1}s per call (p95)"),
    )
}

/// Sequential bottleneck: old running stages with few recent calls.
fn bottleneck(
    now: UnixMillis,
    calls: &[(UnixMillis, &Usage)],
    old: &[Running],
) -> (&'static str, f64, String) {
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
    (
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
    )
}
