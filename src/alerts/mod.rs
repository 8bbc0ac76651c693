//! The embedded alert engine: the runbook's seven alerts, evaluated in process.
//!
//! At every evaluation the engine "scrapes" the core (the same exposition `/metrics` serves) into a
//! small [`tsdb::Tsdb`], evaluates each rule's condition ([`eval`]) with Prometheus semantics, and
//! moves alert instances through inactive → pending → firing exactly as Prometheus's rule manager
//! does (firing once the condition has held for `for`). `rules` renders the same definitions as a
//! Prometheus rules file; the two are checked against each other by `hypertool simulate`.
//! Time comes from the caller, so a `for: 10m` is tested in milliseconds.

pub mod delivery;
pub mod eval;
pub mod promql;
pub mod rules;
pub mod simulate;
pub mod tsdb;

use crate::telemetry::families as f;
use std::collections::BTreeMap;

use serde::Serialize;

use crate::core::clock::{to_rfc3339, UnixMillis};
use crate::telemetry::exposition::parse_exposition;
use rules::{render_template, AlertId, AlertSettings, Rule};
use tsdb::{Labels, Tsdb};

/// Resolved alerts are remembered this long (as Prometheus does) so that their resolution is sent.
const RESOLVED_RETENTION_MS: i64 = 15 * 60 * 1000;

/// The metric families the rules read; nothing else is kept.
pub const RULE_INPUTS: [&str; 11] = [
    f::PERSONA_TOKEN_BUDGET_REMAINING.name,
    f::PERSONA_TOKEN_BUDGET_USED.name,
    f::PERSONA_TOKEN_BUDGET_SOFT_LIMIT.name,
    f::PERSONA_TOKENS_USED_TOTAL.name,
    f::PERSONA_SWITCHES_TOTAL.name,
    f::WORKFLOW_QUALITY_GATE_TOTAL.name,
    // A histogram: its `_bucket` series are the input (see `ingest_exposition`).
    f::WORKFLOW_STAGE_DURATION_SECONDS.name,
    f::WORKFLOW_STAGE_RUNNING_SECONDS.name,
    f::LANGFUSE_TRACE_CREATED_TOTAL.name,
    f::LANGFUSE_ENABLED.name,
    // Prometheus's own series of a scrape's health.
    "up",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Inactive,
    Pending,
    Firing,
}

/// One alert instance (a rule and one series that satisfied it).
#[derive(Debug, Clone, Serialize)]
pub struct AlertInstance {
    pub alertname: &'static str,
    pub state: AlertState,
    /// Series labels plus the rule's labels and `alertname`.
    pub labels: Labels,
    pub annotations: BTreeMap<String, String>,
    pub value: f64,
    pub active_at: UnixMillis,
    pub fired_at: Option<UnixMillis>,
    pub resolved_at: Option<UnixMillis>,
    /// Extra context the embedded engine knows and Prometheus cannot (not part of annotations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Labels an alert instance carries besides its series' own.
pub const RULE_LABELS: [&str; 4] = ["alertname", "severity", "component", "category"];

impl AlertInstance {
    /// The labels of the series that satisfied the rule (without `alertname` and the rule's own).
    pub fn series_labels(&self) -> impl Iterator<Item = (&String, &String)> {
        self.labels
            .iter()
            .filter(|(k, _)| !RULE_LABELS.contains(&k.as_str()))
    }
}

/// A state change, for logs, counters and delivery.
#[derive(Debug, Clone)]
pub struct Transition {
    pub from: AlertState,
    pub instance: AlertInstance,
}

#[derive(Debug, Clone, Default)]
struct RuleState {
    active: BTreeMap<Labels, AlertInstance>,
}

/// Why LangfuseIntegrationFailing fires, when the engine knows more than the rule can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LangfuseStatus {
    /// `langfuse.enabled = false`, or `"auto"` with no key set: the alert is not evaluated.
    Disabled,
    /// Langfuse is expected but these key variables are not set (names, never values).
    NotConfigured(Vec<String>),
    Configured,
}

impl LangfuseStatus {
    /// Whether traces are expected to reach Langfuse (`hypertool_langfuse_enabled`).
    pub fn expected(&self) -> bool {
        !matches!(self, LangfuseStatus::Disabled)
    }
}

/// Asked when LangfuseIntegrationFailing is evaluated: what the exporter has seen go wrong.
pub type LangfuseDiagnosis = Box<dyn Fn() -> Option<String> + Send>;

pub struct AlertEngine {
    settings: AlertSettings,
    db: Tsdb,
    states: BTreeMap<AlertId, RuleState>,
    langfuse: LangfuseStatus,
    langfuse_diagnosis: Option<LangfuseDiagnosis>,
    last_evaluation: Option<UnixMillis>,
}

fn retention(settings: &AlertSettings) -> i64 {
    let longest = settings
        .rules
        .iter()
        .map(|r| r.window.ms())
        .max()
        .unwrap_or(0);
    longest + tsdb::LOOKBACK_MS + 2 * settings.evaluation_interval.ms()
}

impl AlertEngine {
    pub fn new(settings: AlertSettings, langfuse: LangfuseStatus) -> Self {
        Self {
            db: Tsdb::new(retention(&settings)),
            settings,
            states: BTreeMap::new(),
            langfuse,
            langfuse_diagnosis: None,
            last_evaluation: None,
        }
    }

    /// Where the alert's note learns the exporter's evidence (refused keys, unreachable host,
    /// spool growing).
    pub fn set_langfuse_diagnosis(&mut self, diagnosis: LangfuseDiagnosis) {
        self.langfuse_diagnosis = Some(diagnosis);
    }

    pub fn settings(&self) -> &AlertSettings {
        &self.settings
    }

    /// New thresholds or windows apply from the next evaluation; current alert states are kept.
    pub fn reconfigure(&mut self, settings: AlertSettings, langfuse: LangfuseStatus) {
        self.db.set_retention(retention(&settings));
        self.settings = settings;
        self.langfuse = langfuse;
    }

    /// Keeps every sample (for `hypertool simulate`, which writes them all as promtool input).
    pub fn keep_full_history(&mut self) {
        self.db.set_retention(i64::MAX / 4);
    }

    /// Records a scrape of the core's exposition at `at` (only the families the rules read).
    pub fn ingest_exposition(&mut self, at: UnixMillis, text: &str) {
        for sample in parse_exposition(text) {
            // A histogram family is read through its buckets (`…_bucket{le}`).
            let family = sample.name.strip_suffix("_bucket").unwrap_or(&sample.name);
            let wanted = RULE_INPUTS.contains(&family)
                && (family == sample.name || family == f::WORKFLOW_STAGE_DURATION_SECONDS.name);
            if wanted {
                self.db
                    .append(&sample.name, sample.labels, at, sample.value);
            }
        }
    }

    /// Records the health of the metrics endpoint as Prometheus's `up` series.
    pub fn ingest_up(&mut self, at: UnixMillis, instance: &str, up: bool) {
        let labels = Labels::from([
            ("instance".to_string(), instance.to_string()),
            ("job".to_string(), self.settings.job.clone()),
        ]);
        self.db.append("up", labels, at, if up { 1.0 } else { 0.0 });
    }

    /// What the engine knows about Langfuse.
    pub fn langfuse(&self) -> &LangfuseStatus {
        &self.langfuse
    }

    pub fn tsdb(&self) -> &Tsdb {
        &self.db
    }

    /// Evaluates every enabled rule at `at`; returns the state changes.
    pub fn evaluate(&mut self, at: UnixMillis) -> Vec<Transition> {
        let mut transitions = Vec::new();
        let rules: Vec<Rule> = self
            .settings
            .rules
            .iter()
            .filter(|r| r.enabled)
            .cloned()
            .collect();
        for rule in rules {
            if rule.id == AlertId::LangfuseIntegrationFailing
                && self.langfuse == LangfuseStatus::Disabled
            {
                continue;
            }
            let results = eval::evaluate(&rule, &self.settings.job, &self.db, at);
            self.apply(&rule, at, results, &mut transitions);
        }
        self.db.trim(at);
        self.last_evaluation = Some(at);
        transitions
    }

    fn apply(
        &mut self,
        rule: &Rule,
        at: UnixMillis,
        results: Vec<(Labels, f64)>,
        out: &mut Vec<Transition>,
    ) {
        let templates = rule.annotations(&self.settings.runbook_url);
        // The causes in the order of the evidence: keys missing, then what the exporter saw.
        let note = match (&self.langfuse, rule.id) {
            (LangfuseStatus::NotConfigured(missing), AlertId::LangfuseIntegrationFailing) => Some(format!(
                "Langfuse credentials are missing: {} not set (set them, or set `langfuse.enabled = false` to silence this alert)",
                missing.join(" and ")
            )),
            (_, AlertId::LangfuseIntegrationFailing) => {
                self.langfuse_diagnosis.as_ref().and_then(|d| d())
            }
            _ => None,
        };
        let state = self.states.entry(rule.id).or_default();
        let mut seen = Vec::with_capacity(results.len());
        for (series, value) in results {
            let annotations: BTreeMap<String, String> = templates
                .iter()
                .map(|(k, t)| (k.clone(), render_template(t, &series, value)))
                .collect();
            match state.active.get_mut(&series) {
                Some(a) if a.state != AlertState::Inactive => {
                    a.value = value;
                    a.annotations = annotations;
                    a.note = note.clone();
                }
                _ => {
                    let mut labels = series.clone();
                    labels.extend(rule.static_labels());
                    labels.insert("alertname".into(), rule.id.name().into());
                    state.active.insert(
                        series.clone(),
                        AlertInstance {
                            alertname: rule.id.name(),
                            state: AlertState::Pending,
                            labels,
                            annotations,
                            value,
                            active_at: at,
                            fired_at: None,
                            resolved_at: None,
                            note: note.clone(),
                        },
                    );
                    if let Some(a) = state.active.get(&series) {
                        out.push(Transition {
                            from: AlertState::Inactive,
                            instance: a.clone(),
                        });
                    }
                }
            }
            seen.push(series);
        }
        let hold = rule.for_.ms();
        let mut remove = Vec::new();
        for (series, a) in state.active.iter_mut() {
            if !seen.contains(series) {
                if a.state == AlertState::Pending
                    || a.resolved_at
                        .is_some_and(|r| at - r > RESOLVED_RETENTION_MS)
                {
                    remove.push(series.clone());
                }
                if a.state != AlertState::Inactive {
                    let from = a.state;
                    a.state = AlertState::Inactive;
                    a.resolved_at = Some(at);
                    out.push(Transition {
                        from,
                        instance: a.clone(),
                    });
                }
                continue;
            }
            if a.state == AlertState::Pending && at - a.active_at >= hold {
                a.state = AlertState::Firing;
                a.fired_at = Some(at);
                out.push(Transition {
                    from: AlertState::Pending,
                    instance: a.clone(),
                });
            }
        }
        for series in remove {
            state.active.remove(&series);
        }
    }

    /// Every instance that is pending or firing (and recently resolved ones), by rule.
    pub fn instances(&self) -> Vec<&AlertInstance> {
        self.states
            .values()
            .flat_map(|s| s.active.values())
            .collect()
    }

    pub fn firing(&self) -> Vec<&AlertInstance> {
        self.instances()
            .into_iter()
            .filter(|a| a.state == AlertState::Firing)
            .collect()
    }

    /// Firing instances per (alertname, severity), every enabled rule present (0 when quiet).
    pub fn firing_counts(&self) -> BTreeMap<(String, String), f64> {
        let mut out = BTreeMap::new();
        for rule in self.settings.rules.iter().filter(|r| r.enabled) {
            let severity = rule.static_labels().remove("severity").unwrap_or_default();
            out.insert((rule.id.name().to_string(), severity), 0.0);
        }
        for a in self.firing() {
            let severity = a.labels.get("severity").cloned().unwrap_or_default();
            *out.entry((a.alertname.to_string(), severity))
                .or_insert(0.0) += 1.0;
        }
        out
    }

    /// The API view: one entry per rule, with its instances.
    pub fn view(&self) -> serde_json::Value {
        let rules: Vec<serde_json::Value> = self
            .settings
            .rules
            .iter()
            .map(|rule| {
                let instances: Vec<serde_json::Value> = self
                    .states
                    .get(&rule.id)
                    .map(|s| {
                        s.active
                            .values()
                            .map(|a| {
                                serde_json::json!({
                                    "state": a.state,
                                    "labels": a.labels,
                                    "annotations": a.annotations,
                                    "value": a.value,
                                    "active_since": to_rfc3339(a.active_at),
                                    "fired_at": a.fired_at.map(to_rfc3339),
                                    "resolved_at": a.resolved_at.map(to_rfc3339),
                                    "note": a.note,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let state = instances
                    .iter()
                    .map(|i| match i["state"].as_str() {
                        Some("firing") => 2,
                        Some("pending") => 1,
                        _ => 0,
                    })
                    .max()
                    .unwrap_or(0);
                let disabled = !rule.enabled
                    || (rule.id == AlertId::LangfuseIntegrationFailing && self.langfuse == LangfuseStatus::Disabled);
                serde_json::json!({
                    "alertname": rule.id.name(),
                    "state": if disabled { "disabled" } else { ["inactive", "pending", "firing"][state] },
                    "severity": rule.static_labels().get("severity"),
                    "for": rule.for_.to_string(),
                    "expr": rule.expr(&self.settings.job),
                    "runbook": format!("{}#{}", self.settings.runbook_url, rule.id.runbook_anchor()),
                    "instances": instances,
                })
            })
            .collect();
        serde_json::json!({
            "evaluated_at": self.last_evaluation.map(to_rfc3339),
            "evaluation_interval": self.settings.evaluation_interval.to_string(),
            "alerts": rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::duration::PromDuration;

    fn engine(for_: PromDuration) -> AlertEngine {
        let mut settings = AlertSettings::default();
        for r in settings.rules.iter_mut() {
            r.for_ = for_;
        }
        AlertEngine::new(settings, LangfuseStatus::Configured)
    }

    fn budget(e: &mut AlertEngine, at: UnixMillis, remaining: f64) -> Vec<Transition> {
        let text = format!(
            "hypertool_persona_token_budget_remaining{{persona=\"backend-engineer\"}} {remaining}\n\
             langfuse_trace_created_total {}\n",
            at / 1000
        );
        e.ingest_exposition(at, &text);
        e.ingest_up(at, "h:9464", true);
        e.evaluate(at)
    }

    fn states(ts: &[Transition]) -> Vec<(AlertState, AlertState)> {
        ts.iter()
            .filter(|t| t.instance.alertname == "TokenBudgetExceeded")
            .map(|t| (t.from, t.instance.state))
            .collect()
    }

    #[test]
    fn pending_then_firing_after_for_then_resolved() {
        let mut e = engine(PromDuration::mins(1));
        assert!(states(&budget(&mut e, 0, 10.0)).is_empty());
        assert_eq!(
            states(&budget(&mut e, 15_000, -1.0)),
            [(AlertState::Inactive, AlertState::Pending)]
        );
        assert!(
            states(&budget(&mut e, 60_000, -1.0)).is_empty(),
            "45 s held: still pending"
        );
        assert_eq!(
            states(&budget(&mut e, 75_000, -2.0)),
            [(AlertState::Pending, AlertState::Firing)]
        );
        let firing = |e: &AlertEngine| -> Vec<f64> {
            e.firing()
                .iter()
                .filter(|a| a.alertname == "TokenBudgetExceeded")
                .map(|a| a.value)
                .collect()
        };
        assert_eq!(firing(&e), [-2.0]);
        assert_eq!(
            states(&budget(&mut e, 90_000, 5.0)),
            [(AlertState::Firing, AlertState::Inactive)]
        );
        assert!(firing(&e).is_empty());
        // The resolved instance is remembered for 15 minutes (for delivery), then forgotten.
        let budget_instances = |e: &AlertEngine| {
            e.instances()
                .iter()
                .filter(|a| a.alertname == "TokenBudgetExceeded")
                .count()
        };
        assert_eq!(budget_instances(&e), 1);
        budget(&mut e, 90_000 + RESOLVED_RETENTION_MS + 15_000, 5.0);
        assert_eq!(budget_instances(&e), 0);
    }

    #[test]
    fn a_condition_shorter_than_for_never_fires_and_for_zero_fires_at_once() {
        let mut e = engine(PromDuration::mins(1));
        budget(&mut e, 0, -1.0);
        budget(&mut e, 45_000, -1.0);
        assert_eq!(
            states(&budget(&mut e, 60_000, 1.0)),
            [(AlertState::Pending, AlertState::Inactive)]
        );
        assert!(
            !e.instances()
                .iter()
                .any(|a| a.alertname == "TokenBudgetExceeded"),
            "a pending alert that clears is dropped"
        );

        let mut e = engine(PromDuration(0));
        let t = budget(&mut e, 0, -1.0);
        assert_eq!(
            states(&t),
            [
                (AlertState::Inactive, AlertState::Pending),
                (AlertState::Pending, AlertState::Firing)
            ]
        );
    }
}
