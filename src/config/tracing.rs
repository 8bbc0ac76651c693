//! `[tracing]` in hypertool.toml: where OpenTelemetry spans go and the exporter's bounds. The
//! standard `OTEL_EXPORTER_OTLP_*` variables win over the file (see `telemetry::trace::Plan`).

use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use super::error::ConfigError;
use super::spans::Spans;
use crate::core::duration::PromDuration;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracing {
    /// The OTLP/HTTP traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    endpoint: Option<String>,
    service_name: Option<String>,
    /// Send generations' prompts and answers to the OTLP collector (default false).
    capture_content: Option<bool>,
    #[serde(default)]
    redact: Vec<String>,
    timeout: Option<PromDuration>,
    queue_capacity: Option<usize>,
    max_batch_spans: Option<usize>,
    batch_interval: Option<PromDuration>,
    spool_max_bytes: Option<u64>,
    max_backoff: Option<PromDuration>,
    pub(super) ca_file: Option<String>,
}

/// The exporter's settings (shared by every destination; each has its own queue and spool).
#[derive(Debug, Clone)]
pub struct TracingSettings {
    pub endpoint: Option<String>,
    pub service_name: String,
    pub capture_content: bool,
    /// Patterns whose matches are replaced by `[REDACTED]` in prompts and answers before any span
    /// leaves the process.
    pub redact: Vec<Regex>,
    /// Per export request.
    pub timeout: Duration,
    /// Spans waiting to be batched, per destination; beyond it spans are dropped and counted.
    pub queue_capacity: usize,
    pub max_batch_spans: usize,
    pub batch_interval: Duration,
    /// Per destination; reaching it drops the oldest spooled batches.
    pub spool_max_bytes: u64,
    /// The longest wait between attempts at a destination that does not answer.
    pub max_backoff: Duration,
}

impl Default for TracingSettings {
    fn default() -> Self {
        TracingSettings {
            endpoint: None,
            service_name: "hypertool".into(),
            capture_content: false,
            redact: Vec::new(),
            timeout: Duration::from_secs(10),
            queue_capacity: 65_536,
            max_batch_spans: 512,
            batch_interval: Duration::from_secs(1),
            spool_max_bytes: 256 * 1024 * 1024,
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Two lists of compiled patterns are the same configuration when their sources are.
pub(super) fn same_patterns(a: &[Regex], b: &[Regex]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.as_str() == y.as_str())
}

impl PartialEq for TracingSettings {
    fn eq(&self, other: &Self) -> bool {
        self.endpoint == other.endpoint
            && self.service_name == other.service_name
            && self.capture_content == other.capture_content
            && same_patterns(&self.redact, &other.redact)
            && self.timeout == other.timeout
            && self.queue_capacity == other.queue_capacity
            && self.max_batch_spans == other.max_batch_spans
            && self.batch_interval == other.batch_interval
            && self.spool_max_bytes == other.spool_max_bytes
            && self.max_backoff == other.max_backoff
    }
}

/// Compiles redaction patterns; a bad one is an error naming the section, the line and the pattern.
pub(super) fn compile_redactions(
    file: &str,
    spans: &Spans,
    section: &str,
    patterns: &[String],
    errors: &mut Vec<ConfigError>,
) -> Vec<Regex> {
    let mut out = Vec::new();
    for (i, p) in patterns.iter().enumerate() {
        match regex::RegexBuilder::new(p).size_limit(1 << 20).build() {
            Ok(r) => out.push(r),
            Err(e) => errors.push(
                ConfigError::new(
                    file,
                    spans.line(&format!("{section}.redact[{i}]")),
                    format!(
                        "`{section}.redact` pattern {p:?} is not a valid regular expression: {e}"
                    ),
                )
                .fix("write a Rust regex (https://docs.rs/regex), e.g. \"sk-[A-Za-z0-9]{20,}\""),
            ),
        }
    }
    out
}

impl RawTracing {
    pub(super) fn validate(
        self,
        file: &str,
        spans: &Spans,
        errors: &mut Vec<ConfigError>,
    ) -> TracingSettings {
        let d = TracingSettings::default();
        let dur = |v: Option<PromDuration>,
                   default: Duration,
                   key: &str,
                   errors: &mut Vec<ConfigError>| match v {
            None => default,
            Some(p) if p.ms() > 0 => Duration::from_millis(p.ms() as u64),
            Some(_) => {
                errors.push(
                    ConfigError::new(
                        file,
                        spans.line(&format!("tracing.{key}")),
                        format!("`tracing.{key}` must be longer than 0"),
                    )
                    .fix("write a duration such as \"10s\""),
                );
                default
            }
        };
        let endpoint = self.endpoint.filter(|e| !e.trim().is_empty());
        if let Some(e) = &endpoint {
            if reqwest::Url::parse(e).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                errors.push(
                    ConfigError::new(file, spans.line("tracing.endpoint"), format!("`tracing.endpoint` = {e:?} is not an http(s) URL"))
                        .fix("write the collector's OTLP/HTTP traces URL, e.g. \"http://127.0.0.1:4318/v1/traces\""),
                );
            }
        }
        TracingSettings {
            endpoint,
            service_name: self.service_name.unwrap_or(d.service_name),
            capture_content: self.capture_content.unwrap_or(d.capture_content),
            redact: compile_redactions(file, spans, "tracing", &self.redact, errors),
            timeout: dur(self.timeout, d.timeout, "timeout", errors),
            queue_capacity: self
                .queue_capacity
                .unwrap_or(d.queue_capacity)
                .clamp(1, 10_000_000),
            max_batch_spans: self
                .max_batch_spans
                .unwrap_or(d.max_batch_spans)
                .clamp(1, 100_000),
            batch_interval: dur(
                self.batch_interval,
                d.batch_interval,
                "batch_interval",
                errors,
            ),
            spool_max_bytes: self.spool_max_bytes.unwrap_or(d.spool_max_bytes).max(4096),
            max_backoff: dur(self.max_backoff, d.max_backoff, "max_backoff", errors),
        }
    }
}
