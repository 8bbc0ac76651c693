//! The alerts' conditions, evaluated on the [`Tsdb`] with the semantics of their PromQL in
//! [`Rule::expr`]. Each returns the series that satisfy the condition, with the value Prometheus
//! would give `$value`.

use std::collections::BTreeMap;

use super::promql::{bucket_quantile, extrapolated_rate, predict_linear};
use super::rules::{AlertId, Rule};
use super::tsdb::{Labels, Tsdb};
use crate::core::clock::UnixMillis;
use crate::telemetry::families as f;

/// `sum by (keys) (rate(name{filter}[w]))` (or `increase` when `is_rate` is false).
fn sum_rate_by(
    db: &Tsdb,
    name: &str,
    at: UnixMillis,
    window_ms: i64,
    keys: &[&str],
    filter: impl Fn(&Labels) -> bool + 'static,
    is_rate: bool,
) -> BTreeMap<Labels, f64> {
    let mut out: BTreeMap<Labels, f64> = BTreeMap::new();
    for (labels, points) in db.range(name, at, window_ms, filter) {
        if let Some(r) = extrapolated_rate(&points, at - window_ms, at, is_rate) {
            *out.entry(group(labels, keys)).or_insert(0.0) += r;
        }
    }
    out
}

/// `sum(rate(name[w]))` (or `increase` when `is_rate` is false): one series, without labels.
fn total(
    db: &Tsdb,
    name: &str,
    at: UnixMillis,
    window_ms: i64,
    is_rate: bool,
) -> BTreeMap<Labels, f64> {
    sum_rate_by(db, name, at, window_ms, &[], |_| true, is_rate)
}

fn group(labels: &Labels, keys: &[&str]) -> Labels {
    keys.iter()
        .filter_map(|k| labels.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect()
}

/// `min by (keys) (…)` over instant values.
fn min_by(values: impl Iterator<Item = (Labels, f64)>, keys: &[&str]) -> BTreeMap<Labels, f64> {
    let mut out: BTreeMap<Labels, f64> = BTreeMap::new();
    for (labels, v) in values {
        let slot = out.entry(group(&labels, keys)).or_insert(f64::NAN);
        // Prometheus's min: NaN only while nothing else was seen.
        if slot.is_nan() || v < *slot {
            *slot = v;
        }
    }
    out
}

/// `max by (keys) (…)` over instant values.
fn max_by(values: impl Iterator<Item = (Labels, f64)>, keys: &[&str]) -> BTreeMap<Labels, f64> {
    let mut out: BTreeMap<Labels, f64> = BTreeMap::new();
    for (labels, v) in values {
        let slot = out.entry(group(&labels, keys)).or_insert(f64::NAN);
        if slot.is_nan() || v > *slot {
            *slot = v;
        }
    }
    out
}

/// The series for which `rule`'s condition holds at `at`.
pub fn evaluate(rule: &Rule, job: &str, db: &Tsdb, at: UnixMillis) -> Vec<(Labels, f64)> {
    match rule.id {
        AlertId::TokenBudgetExceeded => budget_exceeded(rule, db, at),
        AlertId::HighQualityGateFailureRate => gate_failures(rule, db, at),
        AlertId::ExcessivePersonaSwitching => switching(rule, db, at),
        AlertId::SlowWorkflowStage => slow_stages(rule, db, at),
        AlertId::TokenBudgetDepletionPredicted => depletion_predicted(rule, db, at),
        AlertId::HypertoolMetricsNotReported => metrics_not_reported(job, db, at),
        AlertId::LangfuseIntegrationFailing => langfuse_failing(rule, db, at),
        AlertId::TokenBudgetSoftLimitReached => soft_limit_reached(db, at),
    }
}

/// `min by (persona) (hypertool_persona_token_budget_remaining) < threshold`.
fn budget_exceeded(rule: &Rule, db: &Tsdb, at: UnixMillis) -> Vec<(Labels, f64)> {
    let values = db
        .instant(f::PERSONA_TOKEN_BUDGET_REMAINING.name, at)
        .map(|(l, v)| (l.clone(), v));
    min_by(values, &["persona"])
        .into_iter()
        .filter(|(_, v)| *v < rule.threshold)
        .collect()
}

/// The failed share of the quality gate's verdicts, by workflow and stage, above the threshold.
fn gate_failures(rule: &Rule, db: &Tsdb, at: UnixMillis) -> Vec<(Labels, f64)> {
    let w = rule.window.ms();
    let name = f::WORKFLOW_QUALITY_GATE_TOTAL.name;
    let keys = ["workflow", "stage"];
    let fails = sum_rate_by(
        db,
        name,
        at,
        w,
        &keys,
        |l| l.get("result").is_some_and(|r| r == "fail"),
        true,
    );
    let all = sum_rate_by(db, name, at, w, &keys, |_| true, true);
    fails
        .into_iter()
        .filter_map(|(g, f)| all.get(&g).map(|a| (g, f / a)))
        .filter(|(_, ratio)| *ratio > rule.threshold)
        .collect()
}

/// `sum(rate(hypertool_persona_switches_total[w])) > threshold`.
fn switching(rule: &Rule, db: &Tsdb, at: UnixMillis) -> Vec<(Labels, f64)> {
    let w = rule.window.ms();
    let sum = total(db, f::PERSONA_SWITCHES_TOTAL.name, at, w, true);
    sum.into_iter()
        .filter(|(_, v)| *v > rule.threshold)
        .collect()
}

/// A stage's duration quantile over the window above the threshold, or a stage running longer.
fn slow_stages(rule: &Rule, db: &Tsdb, at: UnixMillis) -> Vec<(Labels, f64)> {
    let w = rule.window.ms();
    let mut groups: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
    let rates = sum_rate_by(
        db,
        &format!("{}_bucket", f::WORKFLOW_STAGE_DURATION_SECONDS.name),
        at,
        w,
        &["le", "workflow", "stage"],
        |_| true,
        true,
    );
    for (mut labels, rate) in rates {
        let Some(le) = labels.remove("le") else {
            continue;
        };
        let bound = match le.as_str() {
            "+Inf" => f64::INFINITY,
            other => match other.parse::<f64>() {
                Ok(b) => b,
                Err(_) => continue,
            },
        };
        groups.entry(labels).or_default().push((bound, rate));
    }
    let mut slow: BTreeMap<Labels, f64> = groups
        .into_iter()
        .map(|(g, mut buckets)| (g, bucket_quantile(rule.quantile, &mut buckets)))
        .filter(|(_, q)| *q > rule.threshold)
        .collect();
    // `or max by (workflow, stage) (hypertool_workflow_stage_running_seconds) > threshold`:
    // series the left side already has keep its value.
    let running = db
        .instant(f::WORKFLOW_STAGE_RUNNING_SECONDS.name, at)
        .map(|(l, v)| (l.clone(), v));
    for (g, age) in max_by(running, &["workflow", "stage"]) {
        if age > rule.threshold {
            slow.entry(g).or_insert(age);
        }
    }
    slow.into_iter().collect()
}

/// `min by (persona) (predict_linear(remaining[w], horizon)) < threshold`.
fn depletion_predicted(rule: &Rule, db: &Tsdb, at: UnixMillis) -> Vec<(Labels, f64)> {
    let w = rule.window.ms();
    let horizon = rule.horizon.as_secs_f64();
    let values: Vec<(Labels, f64)> = db
        .range(f::PERSONA_TOKEN_BUDGET_REMAINING.name, at, w, |_| true)
        .filter_map(|(l, points)| predict_linear(&points, at, horizon).map(|p| (l.clone(), p)))
        .collect();
    min_by(values.into_iter(), &["persona"])
        .into_iter()
        .filter(|(_, v)| *v < rule.threshold)
        .collect()
}

/// `up{job} == 0 or absent(up{job})`.
fn metrics_not_reported(job: &str, db: &Tsdb, at: UnixMillis) -> Vec<(Labels, f64)> {
    let up: Vec<(Labels, f64)> = db
        .instant("up", at)
        .filter(|(l, _)| l.get("job").is_some_and(|j| j == job))
        .map(|(l, v)| (l.clone(), v))
        .collect();
    if up.is_empty() {
        // absent(up{job="…"}): one series carrying the equality matchers.
        return vec![(Labels::from([("job".to_string(), job.to_string())]), 1.0)];
    }
    up.into_iter().filter(|(_, v)| *v == 0.0).collect()
}

/// Tokens are used but no trace was created, where Langfuse is enabled.
fn langfuse_failing(rule: &Rule, db: &Tsdb, at: UnixMillis) -> Vec<(Labels, f64)> {
    let w = rule.window.ms();
    // Only where traces are expected: `... and on () hypertool_langfuse_enabled == 1`.
    let expected = db
        .instant(crate::telemetry::families::LANGFUSE_ENABLED.name, at)
        .any(|(_, v)| v == 1.0);
    if !expected {
        return Vec::new();
    }
    let used = total(db, f::PERSONA_TOKENS_USED_TOTAL.name, at, w, true);
    let Some((labels, rate)) = used.into_iter().next().filter(|(_, r)| *r > 0.0) else {
        return Vec::new();
    };
    let created = total(db, f::LANGFUSE_TRACE_CREATED_TOTAL.name, at, w, false);
    let none_created = created.values().next().is_some_and(|v| *v == 0.0);
    let absent = db
        .instant(f::LANGFUSE_TRACE_CREATED_TOTAL.name, at)
        .next()
        .is_none();
    if none_created || absent {
        vec![(labels, rate)]
    } else {
        Vec::new()
    }
}

/// A persona past its soft limit while still within its budget.
fn soft_limit_reached(db: &Tsdb, at: UnixMillis) -> Vec<(Labels, f64)> {
    let instant = |name: &str| {
        db.instant(name, at)
            .map(|(l, v)| (l.clone(), v))
            .collect::<Vec<_>>()
    };
    let used = max_by(
        instant(f::PERSONA_TOKEN_BUDGET_USED.name).into_iter(),
        &["persona"],
    );
    let soft = max_by(
        instant(f::PERSONA_TOKEN_BUDGET_SOFT_LIMIT.name).into_iter(),
        &["persona"],
    );
    let within = min_by(
        instant(f::PERSONA_TOKEN_BUDGET_REMAINING.name).into_iter(),
        &["persona"],
    );
    used.into_iter()
        .filter(|(p, u)| soft.get(p).is_some_and(|s| u >= s))
        .filter(|(p, _)| within.get(p).is_some_and(|r| *r >= 0.0))
        .collect()
}
