//! Renders the core's series as Prometheus text.
//!
//! The classic text format (`text/plain; version=0.0.4`) is the default because Debian's promtool
//! (Prometheus 2.42) parses only that; OpenMetrics (`# EOF`, counter families named without
//! `_total`) is served when the scraper's `Accept` header asks for it. The metric names and labels
//! are the contract the alert runbook queries: see `docs/ARCHITECTURE.md`.

use super::families::{self as f, Family};
use super::registry::Snapshot;
use std::fmt::Write;
use std::sync::Arc;

use crate::core::budget::BudgetState;
use crate::core::engine::Engine;
use crate::core::series::{CounterVec, HistogramVec};
use std::collections::BTreeMap;

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

    /// A gauge with a sample per persona that has a value (its header always).
    fn per_persona(
        &mut self,
        family: &Family,
        budgets: &BTreeMap<String, BudgetState>,
        value: impl Fn(&BudgetState) -> Option<f64>,
    ) {
        self.header_of(family);
        for (persona, b) in budgets {
            if let Some(v) = value(b) {
                self.sample(family.name, &[("persona", persona)], v);
            }
        }
    }

    fn header_of(&mut self, family: &Family) {
        self.header(family.name, family.kind.as_str(), family.help);
    }

    /// A family the process counts: its header and whatever its registered source holds.
    fn registered(&mut self, registry: &Snapshot, family: &Family) {
        self.header_of(family);
        registry.samples(family, &mut |values, value| {
            let labels: Vec<(&str, &str)> = family
                .labels
                .iter()
                .copied()
                .zip(values.iter().copied())
                .collect();
            self.sample(family.name, &labels, value);
        });
    }

    fn counter_vec<const N: usize>(&mut self, family: &Family, vec: &CounterVec<N>) {
        self.header_of(family);
        for (key, value) in vec.sorted() {
            let labels = zip(family.labels, key);
            self.sample(family.name, &labels, value);
        }
    }

    fn histogram_vec<const N: usize>(&mut self, family: &Family, vec: &HistogramVec<N>) {
        let name = family.name;
        self.header_of(family);
        let bucket_name = format!("{name}_bucket");
        let bounds: Vec<String> = vec.bounds.iter().map(|b| format_bound(*b)).collect();
        for (key, h) in vec.sorted() {
            let mut labels = zip(family.labels, key);
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

/// Label names with a series' values (a family declares as many names as its series have values).
fn zip<'a, const N: usize>(
    names: &'a [&'a str],
    key: &'a [Arc<str>; N],
) -> Vec<(&'a str, &'a str)> {
    debug_assert_eq!(names.len(), N, "label names of a family");
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

/// Renders every family: the engine's series and the process's (`registry`, a snapshot of
/// [`super::registry::Registry`]). The engine should have been ticked to `now` first, so budget
/// gauges are those of the current period. The order of families is the exposition's contract
/// (the contract test pins it); each section below writes its families in that order.
pub fn render(engine: &Engine, registry: &Snapshot, format: Format) -> String {
    let mut w = Writer {
        out: String::with_capacity(64 * 1024),
        format,
    };
    personas_and_workflows(&mut w, engine);
    integrations(&mut w, engine, registry);
    process(&mut w, engine, registry);
    if format == Format::OpenMetrics {
        w.out.push_str("# EOF\n");
    }
    w.out
}

/// The engine's families of personas, budgets, workflows, variants and MCP tools.
fn personas_and_workflows(w: &mut Writer, engine: &Engine) {
    let m = engine.metrics();
    w.counter_vec(&f::PERSONA_SWITCHES_TOTAL, &m.switches);
    w.histogram_vec(&f::PERSONA_DURATION_SECONDS, &m.persona_duration);
    w.counter_vec(&f::PERSONA_TOKENS_USED_TOTAL, &m.tokens);
    let budgets = engine.budgets();
    w.per_persona(&f::PERSONA_TOKEN_BUDGET_REMAINING, budgets, |b| {
        Some(b.remaining_tokens() as f64)
    });
    w.per_persona(&f::PERSONA_TOKEN_BUDGET_LIMIT, budgets, |b| {
        Some(b.spec.tokens as f64)
    });
    w.per_persona(&f::PERSONA_TOKEN_BUDGET_USED, budgets, |b| {
        Some(b.used_tokens() as f64)
    });
    w.per_persona(&f::PERSONA_TOKEN_BUDGET_SOFT_LIMIT, budgets, |b| {
        b.soft_limit_tokens().map(|t| t as f64)
    });
    w.per_persona(
        &f::PERSONA_COST_BUDGET_REMAINING_USD,
        budgets,
        BudgetState::remaining_cost,
    );
    w.counter_vec(&f::BUDGET_SOFT_LIMIT_REACHED_TOTAL, &m.soft_limit_reached);
    w.counter_vec(&f::PERSONA_COST_USD_TOTAL, &m.cost_usd);
    w.histogram_vec(&f::WORKFLOW_STAGE_DURATION_SECONDS, &m.stage_duration);
    w.counter_vec(&f::WORKFLOW_QUALITY_GATE_TOTAL, &m.quality_gates);
    w.header_of(&f::WORKFLOW_STAGE_RUNNING_SECONDS);
    let now = engine.now();
    for ((workflow, stage), since) in engine.runs().oldest_running() {
        w.sample(
            f::WORKFLOW_STAGE_RUNNING_SECONDS.name,
            &[("workflow", &workflow), ("stage", &stage)],
            (now - since).max(0) as f64 / 1000.0,
        );
    }
    w.counter_vec(&f::WORKFLOW_RUNS_STARTED_TOTAL, &m.runs_started);
    w.counter_vec(&f::VARIANT_RUNS_TOTAL, &m.variant_runs);
    w.counter_vec(&f::VARIANT_QUALITY_GATE_TOTAL, &m.variant_gates);
    w.counter_vec(&f::VARIANT_CALLS_TOTAL, &m.variant_calls);
    w.counter_vec(&f::VARIANT_COST_USD_TOTAL, &m.variant_cost_usd);
    w.counter_vec(&f::VARIANT_GATE_RETRIES_TOTAL, &m.variant_retries);
    w.counter_vec(&f::VARIANT_ESCALATIONS_TOTAL, &m.variant_escalations);
    w.histogram_vec(
        &f::VARIANT_STAGE_DURATION_SECONDS,
        &m.variant_stage_duration,
    );
    w.counter_vec(&f::EXPERIMENT_DECISIONS_TOTAL, &m.experiment_decisions);
    w.counter_vec(&f::WORKFLOW_RUNS_FINISHED_TOTAL, &m.runs_finished);
    w.counter_vec(&f::MCP_TOOL_CALLS_TOTAL, &m.mcp_tool_calls);
    w.histogram_vec(&f::MCP_TOOL_CALL_DURATION_SECONDS, &m.mcp_tool_duration);
    w.counter_vec(
        &f::PERSONA_SWITCHES_SUPPRESSED_TOTAL,
        &m.switches_suppressed,
    );
    w.counter_vec(&f::PERSONA_OSCILLATIONS_TOTAL, &m.oscillations);
    w.header_of(&f::PERSONA_INFO);
    for p in engine.personas().iter() {
        let aliases = p.aliases.join(",");
        w.sample(
            f::PERSONA_INFO.name,
            &[
                ("persona", &p.name),
                ("display_name", &p.display_name),
                ("aliases", &aliases),
            ],
            1.0,
        );
    }
}

/// Langfuse, the ledger and trace export: where the observability itself is watched.
fn integrations(w: &mut Writer, engine: &Engine, registry: &Snapshot) {
    let m = engine.metrics();
    w.registered(registry, &f::LANGFUSE_ENABLED);
    // Traces Langfuse accepted (2xx), never traces attempted; plus those reported through the API.
    let mut accepted = 0.0;
    registry.samples(&f::LANGFUSE_TRACE_CREATED_TOTAL, &mut |_, v| accepted += v);
    w.header_of(&f::LANGFUSE_TRACE_CREATED_TOTAL);
    w.sample(
        f::LANGFUSE_TRACE_CREATED_TOTAL.name,
        &[],
        m.langfuse_traces_created + accepted,
    );
    w.registered(registry, &f::LEDGER_WRITABLE);
    w.registered(registry, &f::LEDGER_WRITE_FAILURES_TOTAL);
    w.header_of(&f::LEDGER_REPLICAS_LIVE);
    if let Some(n) = engine.live_replicas() {
        w.sample(f::LEDGER_REPLICAS_LIVE.name, &[], n as f64);
    }
    w.header_of(&f::LEDGER_DUPLICATE_SETTLEMENTS_TOTAL);
    w.sample(
        f::LEDGER_DUPLICATE_SETTLEMENTS_TOTAL.name,
        &[],
        m.duplicate_settlements,
    );
    for family in [
        &f::LEDGER_OUTAGE_HELD_EVENTS,
        &f::LEDGER_SNAPSHOT_AGE_SECONDS,
        &f::TRACE_EXPORT_TOTAL,
        &f::TRACE_SPOOL_BYTES,
        &f::TRACE_EXPORT_LAST_SUCCESS,
        &f::TRACE_QUEUE_DROPPED_TOTAL,
        &f::TRACE_ITEM_ERRORS_TOTAL,
    ] {
        w.registered(registry, family);
    }
    w.histogram_vec(
        &f::LANGFUSE_GENERATION_DURATION_SECONDS,
        &m.generation_duration,
    );
    w.histogram_vec(&f::PROMPT_TOKENS, &m.prompt_tokens);
}

/// The process: events, the door, sessions, the gateway, caches, MCP, alerts, configuration.
fn process(w: &mut Writer, engine: &Engine, registry: &Snapshot) {
    let m = engine.metrics();
    w.counter_vec(&f::EVENTS_APPLIED_TOTAL, &m.events_applied);
    for family in [
        &f::EVENTS_REJECTED_TOTAL,
        &f::AUTH_FAILURES_TOTAL,
        &f::INTERNAL_ERRORS_TOTAL,
        &f::INFLIGHT_BODY_BYTES,
        &f::RATE_LIMITED_TOTAL,
    ] {
        w.registered(registry, family);
    }
    w.counter_vec(&f::LABEL_VALUES_FOLDED_TOTAL, &m.label_values_folded);
    w.header_of(&f::SESSIONS_OPEN);
    w.sample(f::SESSIONS_OPEN.name, &[], engine.open_sessions() as f64);
    for family in [
        &f::GATEWAY_REQUESTS_TOTAL,
        &f::CACHE_REQUESTS_TOTAL,
        &f::CACHE_SHARED_TOTAL,
        &f::CACHE_TOKENS_SAVED_TOTAL,
        &f::GATEWAY_TOOLS_REMOVED_TOTAL,
        &f::GATEWAY_UNPRICED_CALLS_TOTAL,
        &f::MCP_SESSIONS_OPEN,
        &f::MCP_SERVER_UP,
        &f::MCP_SERVER_RESTARTS_TOTAL,
        &f::PROMPT_TRUNCATIONS_TOTAL,
        &f::PROMPT_TOKENS_TRUNCATED_TOTAL,
        &f::ALERTS_FIRING,
        &f::ALERT_TRANSITIONS_TOTAL,
        &f::ALERT_DELIVERIES_TOTAL,
        &f::CONFIG_RELOADS_TOTAL,
        &f::CONFIG_LAST_RELOAD_SUCCESSFUL,
        &f::BUILD_INFO,
        &f::START_TIME_SECONDS,
    ] {
        w.registered(registry, family);
    }
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
