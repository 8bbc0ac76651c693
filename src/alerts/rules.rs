//! The runbook's eight alerts as data: conditions, thresholds, `for`, labels and annotations.
//!
//! One definition feeds both evaluators: [`render_rules_yaml`] writes it as Prometheus rules
//! (`hypertool rules`, `deploy/prometheus/persona_alerts.yml`), and `alerts::eval` evaluates the same
//! conditions in process. Annotation templates use only `{{ $labels.NAME }}` and
//! `{{ printf "%.Nf" $value }}`, which [`render_template`] expands exactly as Prometheus does, so the
//! embedded engine's alerts carry the same text (promtool tests compare annotations to the letter).

use std::collections::BTreeMap;
use std::fmt::Write;

pub use crate::config::alerts::{
    AlertId, AlertSettings, RawAlerts, RawRule, Rule, DEFAULT_RUNBOOK_URL,
};

/// Numbers in expressions: integers without a fraction, others as written by Rust (shortest form).
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl Rule {
    /// The PromQL condition.
    pub fn expr(&self, job: &str) -> String {
        use crate::telemetry::families as f;
        let w = self.window;
        let remaining = f::PERSONA_TOKEN_BUDGET_REMAINING.name;
        let gates = f::WORKFLOW_QUALITY_GATE_TOTAL.name;
        let switches = f::PERSONA_SWITCHES_TOTAL.name;
        let stage_duration = f::WORKFLOW_STAGE_DURATION_SECONDS.name;
        let running = f::WORKFLOW_STAGE_RUNNING_SECONDS.name;
        let tokens = f::PERSONA_TOKENS_USED_TOTAL.name;
        let traces = f::LANGFUSE_TRACE_CREATED_TOTAL.name;
        let langfuse_on = f::LANGFUSE_ENABLED.name;
        let used = f::PERSONA_TOKEN_BUDGET_USED.name;
        let soft = f::PERSONA_TOKEN_BUDGET_SOFT_LIMIT.name;
        match self.id {
            AlertId::TokenBudgetExceeded => format!(
                "min by (persona) ({remaining}) < {}",
                num(self.threshold)
            ),
            AlertId::HighQualityGateFailureRate => format!(
                "sum by (workflow, stage) (rate({gates}{{result=\"fail\"}}[{w}]))\n\
                 /\n\
                 sum by (workflow, stage) (rate({gates}[{w}]))\n\
                 > {}",
                num(self.threshold)
            ),
            AlertId::ExcessivePersonaSwitching => format!(
                "sum(rate({switches}[{w}])) > {}",
                num(self.threshold)
            ),
            AlertId::SlowWorkflowStage => format!(
                "histogram_quantile({}, sum by (le, workflow, stage) (rate({stage_duration}_bucket[{w}])))\n\
                 > {}\n\
                 or\n\
                 max by (workflow, stage) ({running}) > {}",
                num(self.quantile),
                num(self.threshold),
                num(self.threshold)
            ),
            AlertId::TokenBudgetDepletionPredicted => format!(
                "min by (persona) (predict_linear({remaining}[{w}], {})) < {}",
                num(self.horizon.as_secs_f64()),
                num(self.threshold)
            ),
            AlertId::HypertoolMetricsNotReported => {
                format!("up{{job=\"{job}\"}} == 0\nor\nabsent(up{{job=\"{job}\"}})")
            }
            AlertId::LangfuseIntegrationFailing => format!(
                "sum(rate({tokens}[{w}])) > 0\n\
                 and on ()\n\
                 (\n  sum(increase({traces}[{w}])) == 0\n  or on ()\n  absent({traces})\n)\n\
                 and on ()\n\
                 {langfuse_on} == 1"
            ),
            // Past the soft limit and not yet over the budget: past it, TokenBudgetExceeded
            // (critical) takes over, so one persona never holds both.
            AlertId::TokenBudgetSoftLimitReached => format!(
                "max by (persona) ({used})\n\
                 >= on (persona)\n\
                 max by (persona) ({soft})\n\
                 and on (persona)\n\
                 min by (persona) ({remaining}) >= 0"
            ),
        }
    }

    /// Labels every firing instance carries besides its series labels.
    pub fn static_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("severity".to_string(), self.id.severity().to_string()),
            ("component".to_string(), "hypertool".to_string()),
            ("category".to_string(), self.id.category().to_string()),
        ])
    }

    /// Annotation templates (Prometheus syntax), by name.
    pub fn annotations(&self, runbook_url: &str) -> BTreeMap<String, String> {
        let v0 = "{{ printf \"%.0f\" $value }}";
        let v2 = "{{ printf \"%.2f\" $value }}";
        let w = self.window;
        let (summary, description, action) = match self.id {
            AlertId::TokenBudgetExceeded => (
                "Persona {{ $labels.persona }} is over its token budget".to_string(),
                format!(
                    "Persona {{{{ $labels.persona }}}} has {v0} tokens left in its budget period \
                     (alert below {}). Every further call adds to the overrun.",
                    num(self.threshold)
                ),
                "Find the persona's largest calls in Langfuse (user = {{ $labels.persona }}); compare \
                 sum(increase(hypertool_persona_tokens_used_total{persona=\"{{ $labels.persona }}\"}[1h])) \
                 by (chatmode, model); raise the budget (hypertool budget set {{ $labels.persona }} --tokens N) \
                 or cut usage (caching, smaller prompts, cheaper model)."
                    .to_string(),
            ),
            AlertId::HighQualityGateFailureRate => (
                "Quality gate failing in {{ $labels.workflow }}/{{ $labels.stage }}".to_string(),
                format!(
                    "{v2} of quality gate results in workflow {{{{ $labels.workflow }}}} stage \
                     {{{{ $labels.stage }}}} failed over the last {w} (threshold {}).",
                    num(self.threshold)
                ),
                "Review failed generations in Langfuse for this workflow and stage; compare pass rates \
                 by model; check whether the gate criteria changed (the stage's quality_gate in its workflow \
                 file); give the stage a higher-tier model or an escalation_model with retries."
                    .to_string(),
            ),
            AlertId::ExcessivePersonaSwitching => (
                "Agents are switching persona too often".to_string(),
                format!(
                    "Persona switches run at {v2} per second over {w} (threshold {}).",
                    num(self.threshold)
                ),
                "Find the oscillating pairs: sum(rate(hypertool_persona_switches_total[5m])) by \
                 (from_persona, to_persona, chatmode) and GET /api/oscillations; send switches through \
                 POST /v1/personas/switch so the cooldown applies, and pick personas with POST /v1/personas/route."
                    .to_string(),
            ),
            AlertId::SlowWorkflowStage => (
                "Workflow stage {{ $labels.workflow }}/{{ $labels.stage }} is slow".to_string(),
                format!(
                    "Stage {{{{ $labels.stage }}}} in workflow {{{{ $labels.workflow }}}} takes {v0}s: its p{} \
                     duration over {w}, or the age of a run of it still running (threshold {}s).",
                    num(self.quantile * 100.0),
                    num(self.threshold)
                ),
                "Find running stages with GET /v1/workflows/{{ $labels.workflow }}/runs?status=running; check the \
                 stage's slow LLM calls in Langfuse (large prompts, long completions, gate retries) and \
                 langfuse_generation_duration_seconds by model; set max_prompt_tokens or a faster model tier for the stage."
                    .to_string(),
            ),
            AlertId::TokenBudgetDepletionPredicted => (
                "Persona {{ $labels.persona }} will exhaust its token budget soon".to_string(),
                format!(
                    "At the trend of the last {w}, persona {{{{ $labels.persona }}}} will have {v0} tokens \
                     left in {}.",
                    self.horizon
                ),
                "Check whether the spike is expected (active workflows for this persona); compare \
                 rate(hypertool_persona_tokens_used_total[30m]) with the previous hour; raise the budget \
                 or enable caching before it runs out."
                    .to_string(),
            ),
            AlertId::HypertoolMetricsNotReported => (
                "hypertool metrics are not being reported".to_string(),
                format!(
                    "No successful scrape of job {} for {}: every other hypertool alert is blind.",
                    "{{ $labels.job }}", self.for_
                ),
                "Check that hypertool runs (ps aux | grep hypertool), that curl http://localhost:9464/metrics \
                 answers, and the Prometheus target state; a busy port 9464 is a common cause."
                    .to_string(),
            ),
            AlertId::LangfuseIntegrationFailing => (
                "LLM calls are made but Langfuse accepts no traces".to_string(),
                format!(
                    "Tokens are being used ({v2} per second) and Langfuse accepted no trace in {w}. \
                     Causes, most likely first: keys missing (the start-up warning and the alert's note \
                     name the variable); keys refused (hypertool_trace_export_total{{destination=\"langfuse\",result=\"auth_refused\"}} \
                     rising); host unreachable (result=\"retry\" rising, last error in hypertool's log); \
                     traces waiting in the spool (hypertool_trace_spool_bytes{{destination=\"langfuse\"}} growing)."
                ),
                "Set LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY of the project on LANGFUSE_HOST and restart hypertool \
                 (or set [langfuse] enabled = false if Langfuse is not used); check that LANGFUSE_HOST answers from \
                 this machine. Nothing is lost meanwhile: batches stay spooled under the data dir and are re-sent \
                 when Langfuse takes them, and each generation is logged (target hypertool::generation)."
                    .to_string(),
            ),
            AlertId::TokenBudgetSoftLimitReached => (
                "Persona {{ $labels.persona }} reached the soft limit of its token budget".to_string(),
                format!(
                    "Persona {{{{ $labels.persona }}}} has used {v0} tokens of its budget period, past the \
                     budget's soft_limit and not yet over the budget."
                ),
                "Check whether the usage is expected (hypertool budget status {{ $labels.persona }}); if not, \
                 cut it before the budget is spent (caching, max_prompt_tokens, a cheaper tier) or raise the \
                 budget (hypertool budget set {{ $labels.persona }} --tokens N)."
                    .to_string(),
            ),
        };
        let action = format!(
            "`hypertool runbook {}` runs this investigation and ranks the causes. {action}",
            self.id.name()
        );
        BTreeMap::from([
            ("summary".to_string(), summary),
            ("description".to_string(), description),
            ("action".to_string(), action),
            (
                "runbook".to_string(),
                format!("{}#{}", runbook_url, self.id.runbook_anchor()),
            ),
        ])
    }
}

/// Expands the two template forms the annotations use, as Prometheus would.
pub fn render_template(template: &str, labels: &BTreeMap<String, String>, value: f64) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = rest[start + 2..start + end].trim();
        if let Some(name) = inner.strip_prefix("$labels.") {
            out.push_str(labels.get(name).map(String::as_str).unwrap_or(""));
        } else if let Some(spec) = inner
            .strip_prefix("printf \"%.")
            .and_then(|s| s.strip_suffix("f\" $value"))
        {
            let precision: usize = spec.parse().unwrap_or(2);
            out.push_str(&go_float(value, precision));
        } else {
            // Not one of ours: leave it as written.
            out.push_str(&rest[start..start + end + 2]);
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    out
}

/// Go's `%.Nf` for a float64.
fn go_float(v: f64, precision: usize) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v:.precision$}")
    }
}

/// The Prometheus rules file for `settings`.
pub fn render_rules_yaml(settings: &AlertSettings) -> String {
    let mut out = String::new();
    out.push_str(
        "# Generated by `hypertool rules` from hypertool.toml: edit the [alerts] section and re-run,\n\
         # do not edit by hand. The same conditions run in hypertool's embedded alert engine.\n\
         # Runbook: each alert's `runbook` annotation links to its section.\n",
    );
    let _ = writeln!(out, "groups:\n  - name: hypertool-persona-alerts");
    let _ = writeln!(out, "    interval: {}", settings.evaluation_interval);
    out.push_str("    rules:\n");
    for rule in settings.rules.iter().filter(|r| r.enabled) {
        let _ = writeln!(out, "      - alert: {}", rule.id.name());
        out.push_str("        expr: |\n");
        for line in rule.expr(&settings.job).lines() {
            let _ = writeln!(out, "          {line}");
        }
        let _ = writeln!(out, "        for: {}", rule.for_);
        out.push_str("        labels:\n");
        for (k, v) in rule.static_labels() {
            let _ = writeln!(out, "          {k}: {v}");
        }
        out.push_str("        annotations:\n");
        for (k, v) in rule.annotations(&settings.runbook_url) {
            let quoted = serde_json::to_string(&v).unwrap_or_default();
            let _ = writeln!(out, "          {k}: {quoted}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::duration::PromDuration;

    #[test]
    fn templates_expand_like_prometheus() {
        let labels = BTreeMap::from([("persona".to_string(), "backend-engineer".to_string())]);
        let t = "{{ $labels.persona }} has {{ printf \"%.0f\" $value }} ({{ printf \"%.2f\" $value }}){{ $labels.missing }}";
        assert_eq!(
            render_template(t, &labels, -250.4),
            "backend-engineer has -250 (-250.40)"
        );
    }

    #[test]
    fn settings_override_and_refuse_what_does_not_apply() {
        let raw: RawAlerts = toml::from_str(
            "evaluation_interval = \"5s\"\n[SlowWorkflowStage]\nthreshold = 120\nfor = \"1m\"\n",
        )
        .unwrap();
        let s = AlertSettings::from_raw(raw).unwrap();
        let slow = s.rule(AlertId::SlowWorkflowStage).unwrap();
        assert_eq!((slow.threshold, slow.for_), (120.0, PromDuration::mins(1)));
        assert!(s
            .rule(AlertId::SlowWorkflowStage)
            .unwrap()
            .expr("hypertool")
            .contains("> 120"));
        let raw: RawAlerts = toml::from_str("[TokenBudgetExceeded]\nquantile = 0.5\n").unwrap();
        let errs = AlertSettings::from_raw(raw).unwrap_err();
        assert_eq!(errs[0].0, "alerts.TokenBudgetExceeded.quantile");
    }
}
