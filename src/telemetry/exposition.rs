//! Renders the core's series as Prometheus text.
//!
//! The classic text format (`text/plain; version=0.0.4`) is the default because Debian's promtool
//! (Prometheus 2.42) parses only that; OpenMetrics (`# EOF`, counter families named without
//! `_total`) is served when the scraper's `Accept` header asks for it. The metric names and labels
//! are the contract the alert runbook queries: see `docs/ARCHITECTURE.md`.

use std::fmt::Write;
use std::sync::Arc;

use crate::core::clock::UnixMillis;
use crate::core::engine::Engine;
use crate::core::series::{CounterVec, HistogramVec};

pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The two text formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Classic,
    OpenMetrics,
}

impl Format {
    /// OpenMetrics only when asked for by name; everything else gets the classic format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Classic,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Classic => CLASSIC_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// Process-level facts the engine does not hold.
#[derive(Debug, Clone, Default)]
pub struct ProcessInfo {
    pub version: &'static str,
    pub start_time_ms: UnixMillis,
    pub config_reload_success: f64,
    pub config_reload_failure: f64,
    pub config_last_reload_ok: bool,
    pub events_rejected: Vec<(String, f64)>,
    /// Requests the access layer refused, per reason.
    pub auth_failures: Vec<(String, f64)>,
    /// Gateway calls refused by a rate limit, per (persona, kind).
    pub rate_limited: Vec<((String, String), f64)>,
    /// Firing instances of the embedded alert engine per (alertname, severity).
    pub alerts_firing: Vec<((String, String), f64)>,
    /// Gateway calls per (upstream, outcome).
    pub gateway_requests: Vec<((String, String), f64)>,
    /// Tools removed from calls because the persona may not use them, per persona.
    pub tools_removed: Vec<(String, f64)>,
    /// ((workflow, stage), prompts cut, tokens removed)
    pub truncations: Vec<((String, String), f64, f64)>,
    /// Response cache lookups per result, and tokens the hits saved.
    pub cache_requests: Vec<(&'static str, f64)>,
    pub cache_tokens_saved: f64,
    /// Alert notifications per (target, result).
    pub alert_deliveries: Vec<((String, String), f64)>,
    /// Alert state changes per (alertname, new state).
    pub alert_transitions: Vec<((String, String), f64)>,
}

struct Writer {
    out: String,
    format: Format,
}

impl Writer {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let family = match (self.format, kind) {
            (Format::OpenMetrics, "counter") => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let _ = writeln!(self.out, "# HELP {family} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {family} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label_into(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        push_value(&mut self.out, value);
        self.out.push('\n');
    }

    fn counter_vec<const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        label_names: [&str; N],
        vec: &CounterVec<N>,
    ) {
        self.header(name, "counter", help);
        for (key, value) in vec.sorted() {
            let labels = zip(&label_names, key);
            self.sample(name, &labels, value);
        }
    }

    fn histogram_vec<const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        label_names: [&str; N],
        vec: &HistogramVec<N>,
    ) {
        self.header(name, "histogram", help);
        let bucket_name = format!("{name}_bucket");
        let bounds: Vec<String> = vec.bounds.iter().map(|b| format_bound(*b)).collect();
        for (key, h) in vec.sorted() {
            let mut labels = zip(&label_names, key);
            let cumulative = h.cumulative();
            for (i, count) in cumulative.iter().enumerate() {
                let le = bounds.get(i).map(String::as_str).unwrap_or("+Inf");
                labels.push(("le", le));
                self.sample(&bucket_name, &labels, *count as f64);
                labels.pop();
            }
            self.sample(&format!("{name}_sum"), &labels, h.sum);
            self.sample(&format!("{name}_count"), &labels, h.count as f64);
        }
    }
}

fn zip<'a, const N: usize>(
    names: &[&'a str; N],
    key: &'a [Arc<str>; N],
) -> Vec<(&'a str, &'a str)> {
    names
        .iter()
        .copied()
        .zip(key.iter().map(|v| &**v))
        .collect()
}

fn format_bound(b: f64) -> String {
    if b.fract() == 0.0 && b.abs() < 1e15 {
        format!("{b:.1}")
    } else {
        format!("{b}")
    }
}

fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Renders every family. The engine should have been ticked to `now` first, so budget gauges are
/// those of the current period.
pub fn render(engine: &Engine, process: &ProcessInfo, format: Format) -> String {
    let m = engine.metrics();
    let mut w = Writer {
        out: String::with_capacity(64 * 1024),
        format,
    };

    w.counter_vec(
        "hypertool_persona_switches_total",
        "Persona switches within a session, explicit or inferred from usage under another persona.",
        ["from_persona", "to_persona", "chatmode"],
        &m.switches,
    );
    w.histogram_vec(
        "hypertool_persona_duration_seconds",
        "Time a session spent in a persona before switching away or going idle.",
        ["persona", "chatmode"],
        &m.persona_duration,
    );
    w.counter_vec(
        "hypertool_persona_tokens_used_total",
        "Tokens (prompt + completion) used by a persona.",
        ["persona", "chatmode", "model"],
        &m.tokens,
    );

    w.header(
        "hypertool_persona_token_budget_remaining",
        "gauge",
        "Tokens left in the persona's budget for the current period; negative when over budget.",
    );
    for (persona, b) in engine.budgets() {
        w.sample(
            "hypertool_persona_token_budget_remaining",
            &[("persona", persona)],
            b.remaining_tokens() as f64,
        );
    }
    w.header(
        "hypertool_persona_token_budget_limit",
        "gauge",
        "Tokens allowed per period by the persona's budget.",
    );
    for (persona, b) in engine.budgets() {
        w.sample(
            "hypertool_persona_token_budget_limit",
            &[("persona", persona)],
            b.spec.tokens as f64,
        );
    }
    w.header(
        "hypertool_persona_token_budget_used",
        "gauge",
        "Tokens used by the persona in the current budget period.",
    );
    for (persona, b) in engine.budgets() {
        w.sample(
            "hypertool_persona_token_budget_used",
            &[("persona", persona)],
            b.used_tokens() as f64,
        );
    }
    w.header(
        "hypertool_persona_cost_budget_remaining_usd",
        "gauge",
        "USD left in the persona's cost budget for the current period; negative when over budget.",
    );
    for (persona, b) in engine.budgets() {
        if let Some(left) = b.remaining_cost() {
            w.sample(
                "hypertool_persona_cost_budget_remaining_usd",
                &[("persona", persona)],
                left,
            );
        }
    }
    w.counter_vec(
        "hypertool_budget_soft_limit_reached_total",
        "Times a persona's usage reached the soft limit of its budget (at most once per period).",
        ["persona"],
        &m.soft_limit_reached,
    );
    w.counter_vec(
        "hypertool_persona_cost_usd_total",
        "Cost in US dollars attributed to a persona.",
        ["persona", "chatmode", "model"],
        &m.cost_usd,
    );
    w.histogram_vec(
        "hypertool_workflow_stage_duration_seconds",
        "Duration of a workflow stage, retries included.",
        ["workflow", "stage", "persona"],
        &m.stage_duration,
    );
    w.counter_vec(
        "hypertool_workflow_quality_gate_total",
        "Quality gate verdicts per workflow stage; result is pass or fail.",
        ["workflow", "stage", "model", "result"],
        &m.quality_gates,
    );
    w.header(
        "hypertool_workflow_stage_running_seconds",
        "gauge",
        "Age of the oldest stage still running, per workflow and stage (a hung stage shows here before it ever ends).",
    );
    let now = engine.now();
    for ((workflow, stage), since) in engine.runs().oldest_running() {
        w.sample(
            "hypertool_workflow_stage_running_seconds",
            &[("workflow", &workflow), ("stage", &stage)],
            (now - since).max(0) as f64 / 1000.0,
        );
    }
    w.counter_vec(
        "hypertool_workflow_runs_started_total",
        "Workflow runs started (POST /v1/workflows/{workflow}/runs).",
        ["workflow"],
        &m.runs_started,
    );
    w.counter_vec(
        "hypertool_workflow_runs_finished_total",
        "Workflow runs finished, by status (completed, failed, cancelled).",
        ["workflow", "status"],
        &m.runs_finished,
    );
    w.counter_vec(
        "hypertool_persona_switches_suppressed_total",
        "Persona switches refused by the switch policy; reason is cooldown or oscillation.",
        ["chatmode", "reason"],
        &m.switches_suppressed,
    );
    w.counter_vec(
        "hypertool_persona_oscillations_total",
        "Sessions seen switching A->B->A->B within the oscillation window.",
        ["chatmode"],
        &m.oscillations,
    );

    w.header(
        "hypertool_persona_info",
        "gauge",
        "Static facts about each configured persona (always 1).",
    );
    for p in engine.personas().iter() {
        let aliases = p.aliases.join(",");
        w.sample(
            "hypertool_persona_info",
            &[
                ("persona", &p.name),
                ("display_name", &p.display_name),
                ("aliases", &aliases),
            ],
            1.0,
        );
    }

    w.header(
        "langfuse_trace_created_total",
        "counter",
        "Traces created in Langfuse by hypertool's exporter.",
    );
    w.sample(
        "langfuse_trace_created_total",
        &[],
        m.langfuse_traces_created,
    );
    w.histogram_vec(
        "langfuse_generation_duration_seconds",
        "Duration of one LLM call (generation), by model.",
        ["model"],
        &m.generation_duration,
    );

    w.counter_vec(
        "hypertool_events_applied_total",
        "Events stored in the ledger and applied to the core, by type.",
        ["type"],
        &m.events_applied,
    );
    w.header(
        "hypertool_events_rejected_total",
        "counter",
        "Events refused by the events API, by reason.",
    );
    for (reason, n) in &process.events_rejected {
        w.sample("hypertool_events_rejected_total", &[("reason", reason)], *n);
    }
    w.header(
        "hypertool_auth_failures_total",
        "counter",
        "API requests refused at the door: missing_key, unknown_key (401), role, other_persona (403).",
    );
    for (reason, n) in &process.auth_failures {
        w.sample("hypertool_auth_failures_total", &[("reason", reason)], *n);
    }
    w.header(
        "hypertool_rate_limited_total",
        "counter",
        "Gateway calls refused by requests_per_minute or tokens_per_minute (of a key or a persona).",
    );
    for ((persona, kind), n) in &process.rate_limited {
        w.sample(
            "hypertool_rate_limited_total",
            &[("persona", persona), ("kind", kind)],
            *n,
        );
    }
    w.counter_vec(
        "hypertool_label_values_folded_total",
        "Label values folded into \"other\" because the label reached its cap.",
        ["label"],
        &m.label_values_folded,
    );
    w.header(
        "hypertool_sessions_open",
        "gauge",
        "Agent sessions with an open persona period.",
    );
    w.sample(
        "hypertool_sessions_open",
        &[],
        engine.open_sessions() as f64,
    );

    w.header(
        "hypertool_gateway_requests_total",
        "counter",
        "Calls through the gateway, by upstream and outcome (ok, budget_exceeded, upstream_error, \
         model_not_found, unauthorized).",
    );
    for ((upstream, outcome), n) in &process.gateway_requests {
        w.sample(
            "hypertool_gateway_requests_total",
            &[("upstream", upstream), ("outcome", outcome)],
            *n,
        );
    }
    w.header(
        "hypertool_cache_requests_total",
        "counter",
        "Gateway response cache lookups: hit, miss, bypass (Cache-Control: no-cache), skip (not cacheable).",
    );
    for (result, n) in &process.cache_requests {
        w.sample("hypertool_cache_requests_total", &[("result", result)], *n);
    }
    w.header(
        "hypertool_cache_tokens_saved_total",
        "counter",
        "Tokens (prompt + completion) that cache hits did not spend.",
    );
    w.sample(
        "hypertool_cache_tokens_saved_total",
        &[],
        process.cache_tokens_saved,
    );
    w.header(
        "hypertool_gateway_tools_removed_total",
        "counter",
        "Tools removed from (or refused in) gateway calls because the persona's allowedTools does not list them.",
    );
    for (persona, n) in &process.tools_removed {
        w.sample(
            "hypertool_gateway_tools_removed_total",
            &[("persona", persona)],
            *n,
        );
    }
    w.header(
        "hypertool_prompt_truncations_total",
        "counter",
        "Prompts cut to their workflow stage's max_prompt_tokens (oldest non-system messages first).",
    );
    for ((workflow, stage), n, _) in &process.truncations {
        w.sample(
            "hypertool_prompt_truncations_total",
            &[("workflow", workflow), ("stage", stage)],
            *n,
        );
    }
    w.header(
        "hypertool_prompt_tokens_truncated_total",
        "counter",
        "Prompt tokens removed by truncation to a stage's max_prompt_tokens.",
    );
    for ((workflow, stage), _, tokens) in &process.truncations {
        w.sample(
            "hypertool_prompt_tokens_truncated_total",
            &[("workflow", workflow), ("stage", stage)],
            *tokens,
        );
    }
    w.header(
        "hypertool_alerts_firing",
        "gauge",
        "Alert instances firing in hypertool's embedded alert engine.",
    );
    for ((alertname, severity), n) in &process.alerts_firing {
        w.sample(
            "hypertool_alerts_firing",
            &[("alertname", alertname), ("severity", severity)],
            *n,
        );
    }
    w.header(
        "hypertool_alert_transitions_total",
        "counter",
        "State changes of the embedded alert engine's alerts, by the state entered.",
    );
    for ((alertname, to), n) in &process.alert_transitions {
        w.sample(
            "hypertool_alert_transitions_total",
            &[("alertname", alertname), ("state", to)],
            *n,
        );
    }
    w.header(
        "hypertool_alert_deliveries_total",
        "counter",
        "Alert notifications sent to Alertmanager or the webhook, by target and result \
         (delivered, failed after retries, rejected, dropped on a full queue).",
    );
    for ((target, result), n) in &process.alert_deliveries {
        w.sample(
            "hypertool_alert_deliveries_total",
            &[("target", target), ("result", result)],
            *n,
        );
    }
    w.header(
        "hypertool_config_reloads_total",
        "counter",
        "Configuration reloads, by result (a failed reload keeps the last good configuration).",
    );
    w.sample(
        "hypertool_config_reloads_total",
        &[("result", "success")],
        process.config_reload_success,
    );
    w.sample(
        "hypertool_config_reloads_total",
        &[("result", "failure")],
        process.config_reload_failure,
    );
    w.header(
        "hypertool_config_last_reload_successful",
        "gauge",
        "1 when the configuration on disk is the one in force, 0 when the last reload was refused.",
    );
    w.sample(
        "hypertool_config_last_reload_successful",
        &[],
        if process.config_last_reload_ok {
            1.0
        } else {
            0.0
        },
    );
    w.header(
        "hypertool_build_info",
        "gauge",
        "The running hypertool version (always 1).",
    );
    w.sample("hypertool_build_info", &[("version", process.version)], 1.0);
    w.header(
        "hypertool_start_time_seconds",
        "gauge",
        "When this hypertool process started, in Unix seconds.",
    );
    w.sample(
        "hypertool_start_time_seconds",
        &[],
        process.start_time_ms as f64 / 1000.0,
    );

    if format == Format::OpenMetrics {
        w.out.push_str("# EOF\n");
    }
    w.out
}

/// One sample of the classic text format.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedSample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the classic text format as [`render`] writes it (comments skipped, malformed lines
/// ignored). Used by the embedded alert engine to see exactly what Prometheus would scrape.
pub fn parse_exposition(text: &str) -> Vec<ParsedSample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<ParsedSample> {
    let (head, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    let mut labels = std::collections::BTreeMap::new();
    let Some((name, rest)) = head.split_once('{') else {
        return Some(ParsedSample {
            name: head.to_string(),
            labels,
            value,
        });
    };
    let body = rest.strip_suffix('}')?;
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => val.push('\n'),
                    other => val.push(other),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        labels.insert(key, val);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some(ParsedSample {
        name: name.to_string(),
        labels,
        value,
    })
}
