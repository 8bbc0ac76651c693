//! `[alerts]` of hypertool.toml: the runbook's eight alerts by identity, their knobs as written
//! (`RawAlerts`) and as resolved (`AlertSettings`: every rule with the runbook's defaults filled in,
//! and where notifications go). The alert engine and the rule renderer (`alerts`) read these; this
//! file only knows the values, not how the alerts are evaluated.

use std::time::Duration;

use serde::Deserialize;

use crate::core::duration::PromDuration;

/// Which of the runbook's alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertId {
    TokenBudgetExceeded,
    HighQualityGateFailureRate,
    ExcessivePersonaSwitching,
    SlowWorkflowStage,
    TokenBudgetDepletionPredicted,
    HypertoolMetricsNotReported,
    LangfuseIntegrationFailing,
    /// The first of the graduated budget alerts: the budget's `soft_limit` reached.
    TokenBudgetSoftLimitReached,
}

impl AlertId {
    pub const ALL: [AlertId; 8] = [
        AlertId::TokenBudgetExceeded,
        AlertId::HighQualityGateFailureRate,
        AlertId::ExcessivePersonaSwitching,
        AlertId::SlowWorkflowStage,
        AlertId::TokenBudgetDepletionPredicted,
        AlertId::HypertoolMetricsNotReported,
        AlertId::LangfuseIntegrationFailing,
        AlertId::TokenBudgetSoftLimitReached,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AlertId::TokenBudgetExceeded => "TokenBudgetExceeded",
            AlertId::HighQualityGateFailureRate => "HighQualityGateFailureRate",
            AlertId::ExcessivePersonaSwitching => "ExcessivePersonaSwitching",
            AlertId::SlowWorkflowStage => "SlowWorkflowStage",
            AlertId::TokenBudgetDepletionPredicted => "TokenBudgetDepletionPredicted",
            AlertId::HypertoolMetricsNotReported => "HypertoolMetricsNotReported",
            AlertId::LangfuseIntegrationFailing => "LangfuseIntegrationFailing",
            AlertId::TokenBudgetSoftLimitReached => "TokenBudgetSoftLimitReached",
        }
    }

    pub fn from_name(name: &str) -> Option<AlertId> {
        AlertId::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The runbook section's anchor (GitHub-style slug of its heading).
    pub fn runbook_anchor(self) -> &'static str {
        match self {
            AlertId::TokenBudgetExceeded => "alert-1-token-budget-exceeded",
            AlertId::HighQualityGateFailureRate => "alert-2-high-quality-gate-failure-rate",
            AlertId::ExcessivePersonaSwitching => "alert-3-excessive-persona-switching",
            AlertId::SlowWorkflowStage => "alert-4-slow-workflow-stage",
            AlertId::TokenBudgetDepletionPredicted => "alert-5-token-budget-depletion-predicted",
            AlertId::HypertoolMetricsNotReported => "alert-6-hypertool-metrics-not-reported",
            AlertId::LangfuseIntegrationFailing => "alert-7-langfuse-integration-failing",
            AlertId::TokenBudgetSoftLimitReached => "alert-8-token-budget-soft-limit-reached",
        }
    }

    pub fn severity(self) -> &'static str {
        match self {
            AlertId::TokenBudgetExceeded | AlertId::HypertoolMetricsNotReported => "critical",
            AlertId::TokenBudgetDepletionPredicted => "info",
            _ => "warning",
        }
    }

    pub fn category(self) -> &'static str {
        match self {
            AlertId::TokenBudgetExceeded
            | AlertId::TokenBudgetDepletionPredicted
            | AlertId::TokenBudgetSoftLimitReached => "cost",
            AlertId::HighQualityGateFailureRate => "quality",
            AlertId::ExcessivePersonaSwitching | AlertId::SlowWorkflowStage => "performance",
            AlertId::HypertoolMetricsNotReported => "availability",
            AlertId::LangfuseIntegrationFailing => "observability",
        }
    }
}

/// `[alerts.NAME]` in hypertool.toml: every knob optional, defaults are the runbook's values.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub enabled: Option<bool>,
    #[serde(rename = "for")]
    pub for_: Option<PromDuration>,
    pub threshold: Option<f64>,
    pub window: Option<PromDuration>,
    pub horizon: Option<PromDuration>,
    pub quantile: Option<f64>,
}

/// `[alerts]` in hypertool.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    pub evaluation_interval: Option<PromDuration>,
    /// Base URL of the runbook; each alert links to its section.
    pub runbook_url: Option<String>,
    /// The Prometheus job that scrapes hypertool.
    pub job: Option<String>,
    /// Alertmanager base URL: firing and resolved alerts are posted to its v2 API.
    pub alertmanager_url: Option<String>,
    /// A URL that receives each firing/resolved change as Alertmanager-webhook JSON.
    pub webhook_url: Option<String>,
    pub delivery_timeout: Option<PromDuration>,
    pub delivery_max_retries: Option<u32>,
    /// Trust for Alertmanager and the webhook (read by `config`; `[tls] ca_file` otherwise).
    pub ca_file: Option<String>,
    #[serde(rename = "TokenBudgetExceeded", default)]
    pub token_budget_exceeded: RawRule,
    #[serde(rename = "HighQualityGateFailureRate", default)]
    pub high_quality_gate_failure_rate: RawRule,
    #[serde(rename = "ExcessivePersonaSwitching", default)]
    pub excessive_persona_switching: RawRule,
    #[serde(rename = "SlowWorkflowStage", default)]
    pub slow_workflow_stage: RawRule,
    #[serde(rename = "TokenBudgetDepletionPredicted", default)]
    pub token_budget_depletion_predicted: RawRule,
    #[serde(rename = "HypertoolMetricsNotReported", default)]
    pub hypertool_metrics_not_reported: RawRule,
    #[serde(rename = "LangfuseIntegrationFailing", default)]
    pub langfuse_integration_failing: RawRule,
    #[serde(rename = "TokenBudgetSoftLimitReached", default)]
    pub token_budget_soft_limit_reached: RawRule,
}

/// One alert, resolved: what the evaluators and the rule renderer use.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: AlertId,
    pub enabled: bool,
    pub for_: PromDuration,
    pub threshold: f64,
    pub window: PromDuration,
    pub horizon: PromDuration,
    pub quantile: f64,
}

/// Every alert's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSettings {
    pub evaluation_interval: PromDuration,
    pub runbook_url: String,
    /// No `runbook_url` was configured: the links point at the copy this server serves, at the
    /// address it actually listens on ([`AlertSettings::served_at`]).
    pub runbook_on_listener: bool,
    pub job: String,
    pub rules: Vec<Rule>,
    pub delivery: DeliverySettings,
}

/// Default runbook location: the copy served by hypertool itself.
pub const DEFAULT_RUNBOOK_URL: &str = "http://127.0.0.1:8080/runbook";

fn defaults(id: AlertId) -> Rule {
    let (for_, threshold, window, horizon, quantile) = match id {
        AlertId::TokenBudgetExceeded => (
            PromDuration::mins(1),
            0.0,
            PromDuration(0),
            PromDuration(0),
            0.0,
        ),
        AlertId::HighQualityGateFailureRate => (
            PromDuration::mins(5),
            0.20,
            PromDuration::mins(5),
            PromDuration(0),
            0.0,
        ),
        AlertId::ExcessivePersonaSwitching => (
            PromDuration::mins(5),
            2.0,
            PromDuration::mins(1),
            PromDuration(0),
            0.0,
        ),
        AlertId::SlowWorkflowStage => (
            PromDuration::mins(10),
            300.0,
            PromDuration::mins(5),
            PromDuration(0),
            0.95,
        ),
        AlertId::TokenBudgetDepletionPredicted => (
            PromDuration::mins(10),
            0.0,
            PromDuration::mins(30),
            PromDuration::mins(60),
            0.0,
        ),
        AlertId::HypertoolMetricsNotReported => (
            PromDuration::mins(2),
            0.0,
            PromDuration(0),
            PromDuration(0),
            0.0,
        ),
        AlertId::LangfuseIntegrationFailing => (
            PromDuration::mins(5),
            0.0,
            PromDuration::mins(5),
            PromDuration(0),
            0.0,
        ),
        AlertId::TokenBudgetSoftLimitReached => (
            PromDuration::mins(1),
            0.0,
            PromDuration(0),
            PromDuration(0),
            0.0,
        ),
    };
    Rule {
        id,
        enabled: true,
        for_,
        threshold,
        window,
        horizon,
        quantile,
    }
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            evaluation_interval: PromDuration::secs(15),
            runbook_url: DEFAULT_RUNBOOK_URL.into(),
            runbook_on_listener: true,
            job: "hypertool".into(),
            rules: AlertId::ALL.into_iter().map(defaults).collect(),
            delivery: default_delivery(),
        }
    }
}

impl AlertSettings {
    /// Resolves `[alerts]`; each error names the key (`alerts.NAME.knob`) and the valid values.
    pub fn from_raw(raw: RawAlerts) -> Result<AlertSettings, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let pairs = [
            (AlertId::TokenBudgetExceeded, raw.token_budget_exceeded),
            (
                AlertId::HighQualityGateFailureRate,
                raw.high_quality_gate_failure_rate,
            ),
            (
                AlertId::ExcessivePersonaSwitching,
                raw.excessive_persona_switching,
            ),
            (AlertId::SlowWorkflowStage, raw.slow_workflow_stage),
            (
                AlertId::TokenBudgetDepletionPredicted,
                raw.token_budget_depletion_predicted,
            ),
            (
                AlertId::HypertoolMetricsNotReported,
                raw.hypertool_metrics_not_reported,
            ),
            (
                AlertId::LangfuseIntegrationFailing,
                raw.langfuse_integration_failing,
            ),
            (
                AlertId::TokenBudgetSoftLimitReached,
                raw.token_budget_soft_limit_reached,
            ),
        ];
        let mut rules = Vec::new();
        for (id, r) in pairs {
            let mut rule = defaults(id);
            let key = |k: &str| format!("alerts.{}.{k}", id.name());
            let applies = |k: &str| match k {
                "threshold" => !matches!(
                    id,
                    AlertId::HypertoolMetricsNotReported
                        | AlertId::LangfuseIntegrationFailing
                        | AlertId::TokenBudgetSoftLimitReached
                ),
                "window" => rule_has_window(id),
                "horizon" => id == AlertId::TokenBudgetDepletionPredicted,
                "quantile" => id == AlertId::SlowWorkflowStage,
                _ => true,
            };
            let mut knob = |k: &str, present: bool| {
                if present && !applies(k) {
                    errors.push((key(k), format!("`{k}` does not apply to {}", id.name())));
                }
            };
            knob("threshold", r.threshold.is_some());
            knob("window", r.window.is_some());
            knob("horizon", r.horizon.is_some());
            knob("quantile", r.quantile.is_some());
            if let Some(v) = r.enabled {
                rule.enabled = v;
            }
            if let Some(v) = r.for_ {
                rule.for_ = v;
            }
            if let Some(v) = r.threshold {
                if v.is_finite() {
                    rule.threshold = v;
                } else {
                    errors.push((key("threshold"), "must be a finite number".into()));
                }
            }
            for (k, value, slot) in [
                ("window", r.window, &mut rule.window),
                ("horizon", r.horizon, &mut rule.horizon),
            ] {
                if let Some(v) = value {
                    if v.0 <= 0 {
                        errors.push((key(k), "must be longer than 0s".into()));
                    } else {
                        *slot = v;
                    }
                }
            }
            if let Some(q) = r.quantile {
                if q > 0.0 && q < 1.0 {
                    rule.quantile = q;
                } else {
                    errors.push((
                        key("quantile"),
                        format!("must be between 0 and 1 (exclusive), got {q}"),
                    ));
                }
            }
            rules.push(rule);
        }
        let evaluation_interval = raw.evaluation_interval.unwrap_or(PromDuration::secs(15));
        if evaluation_interval.0 < 1000 {
            errors.push((
                "alerts.evaluation_interval".into(),
                "must be at least 1s".into(),
            ));
        }
        let mut delivery = default_delivery();
        for (key, url, slot) in [
            (
                "alerts.alertmanager_url",
                raw.alertmanager_url,
                &mut delivery.alertmanager_url,
            ),
            (
                "alerts.webhook_url",
                raw.webhook_url,
                &mut delivery.webhook_url,
            ),
        ] {
            match url {
                Some(u) if u.trim().is_empty() => {}
                Some(u) if u.starts_with("http://") || u.starts_with("https://") => *slot = Some(u),
                Some(_) => errors.push((key.into(), "must be an http:// or https:// URL".into())),
                None => {}
            }
        }
        if let Some(t) = raw.delivery_timeout {
            if t.0 <= 0 {
                errors.push((
                    "alerts.delivery_timeout".into(),
                    "must be longer than 0s".into(),
                ));
            } else {
                delivery.timeout = std::time::Duration::from_millis(t.0 as u64);
            }
        }
        if let Some(n) = raw.delivery_max_retries {
            delivery.max_retries = n;
        }
        if errors.is_empty() {
            Ok(AlertSettings {
                delivery,
                evaluation_interval,
                runbook_on_listener: raw.runbook_url.is_none(),
                runbook_url: raw
                    .runbook_url
                    .unwrap_or_else(|| DEFAULT_RUNBOOK_URL.into()),
                job: raw.job.unwrap_or_else(|| "hypertool".into()),
                rules,
            })
        } else {
            Err(errors)
        }
    }

    /// Points the runbook links at this server's own `/runbook` on the address the API listener
    /// is bound to, unless `alerts.runbook_url` names a copy elsewhere. A wildcard address (0.0.0.0,
    /// ::) is not one a browser can open: the machine's host name stands for it.
    pub fn served_at(&mut self, api: std::net::SocketAddr) {
        if !self.runbook_on_listener {
            return;
        }
        let host = if api.ip().is_unspecified() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "127.0.0.1".into())
        } else {
            match api.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            }
        };
        self.runbook_url = format!("http://{host}:{}/runbook", api.port());
    }

    pub fn rule(&self, id: AlertId) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id && r.enabled)
    }
}

fn default_delivery() -> DeliverySettings {
    DeliverySettings {
        alertmanager_url: None,
        webhook_url: None,
        timeout: std::time::Duration::from_secs(5),
        max_retries: 5,
        initial_backoff: std::time::Duration::from_millis(500),
        trust: crate::tls::Trust::default(),
    }
}

fn rule_has_window(id: AlertId) -> bool {
    !matches!(
        id,
        AlertId::TokenBudgetExceeded
            | AlertId::HypertoolMetricsNotReported
            | AlertId::TokenBudgetSoftLimitReached
    )
}

/// Where to send, from `[alerts]` in hypertool.toml.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliverySettings {
    /// Alertmanager base URL, e.g. `http://127.0.0.1:9093`.
    pub alertmanager_url: Option<String>,
    /// Any URL that accepts Alertmanager-webhook-shaped JSON.
    pub webhook_url: Option<String>,
    pub timeout: Duration,
    pub max_retries: u32,
    /// The first retry waits this long; each next one twice as long.
    pub initial_backoff: Duration,
    /// CA certificates trusted beside the webpki roots (`[alerts] ca_file`, else `[tls] ca_file`).
    pub trust: crate::tls::Trust,
}
