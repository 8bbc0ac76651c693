//! Traces: OpenTelemetry spans of every gateway call (its upstream attempts as children), every
//! workflow run and stage, persona switch and quality-gate verdict, exported over OTLP/HTTP
//! (protobuf) to an OpenTelemetry collector and to Langfuse — each destination with its own queue,
//! spool and metrics (`export.rs`).
//!
//! Nothing here can slow or fail a call: spans are handed to a bounded queue without waiting, and
//! batches are spooled on disk before they are sent, so a destination that is down (or a restart)
//! loses nothing; a full spool drops its oldest batches, loudly.
//!
//! The call path asks [`Tracer::exports`] before building anything, so with no destination the
//! cost is one branch.

pub mod events;
pub mod export;
pub mod ids;
pub mod langfuse;
pub mod otlp;
pub mod span;
pub mod spool;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;

use crate::config::settings::LangfuseSettings;
use crate::config::tracing::TracingSettings;
use crate::core::clock::Clock;
use crate::telemetry::families::{self, Family};
use crate::telemetry::registry::{Emit, Registry};
use export::{Destination, DestinationConfig, DestinationStats, Message, Trouble};
use otlp::{EncodeOptions, Flavour};
use span::{Score, SpanRecord};

/// The handle every producer of spans holds (a clone is one pointer).
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    destinations: Vec<Destination>,
    /// Any destination sends prompts and answers.
    content: bool,
    redact: Vec<Regex>,
    /// Langfuse is expected but has no destination (a key is missing): generations go to the log.
    langfuse_missing: bool,
}

/// Where traces go, resolved from the configuration and the environment.
#[derive(Debug, Default)]
pub struct Plan {
    pub destinations: Vec<DestinationConfig>,
    pub redact: Vec<Regex>,
    /// Langfuse is expected (`[langfuse] enabled`, and for "auto" a key set): what alert 7 judges.
    pub langfuse_wanted: bool,
    /// The key variables Langfuse is expected with but that are not set (names only).
    pub langfuse_missing_keys: Vec<String>,
    /// Langfuse is expected but cannot be a destination (a key missing, or no valid host).
    pub langfuse_missing: bool,
    /// What the operator should know (e.g. an unsupported protocol asked for).
    pub warnings: Vec<String>,
}

fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes")
}

/// `key=value,key2=value2` (`OTEL_EXPORTER_OTLP_HEADERS`; values percent-decoded). A pair that
/// is not a valid header is reported by its key only: values are often secrets.
fn parse_headers(
    raw: &str,
    var: &str,
    warnings: &mut Vec<String>,
) -> Vec<(http::HeaderName, http::HeaderValue)> {
    let mut out = Vec::new();
    for pair in raw.split(',').filter(|p| !p.trim().is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            warnings.push(format!("{var}: an entry has no `=` and is ignored"));
            continue;
        };
        let value = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy();
        match (
            http::HeaderName::from_bytes(k.trim().as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            (Ok(name), Ok(mut value)) => {
                value.set_sensitive(true);
                out.push((name, value));
            }
            _ => warnings.push(format!(
                "{var}: header `{}` is not valid and is ignored",
                k.trim()
            )),
        }
    }
    out
}

impl Plan {
    /// Each destination trusting what the configuration says for it: OTLP `[tracing]`'s trust,
    /// Langfuse `[langfuse]`'s (each else `[tls] ca_file`).
    pub fn trusting(mut self, trust: &crate::config::settings::TrustSettings) -> Plan {
        for d in &mut self.destinations {
            d.trust = match d.name {
                "langfuse" => trust.langfuse.clone(),
                _ => trust.tracing.clone(),
            };
        }
        self
    }

    /// Resolves `[tracing]`, `[langfuse]` and the standard variables (`OTEL_EXPORTER_OTLP_*`,
    /// `OTEL_SERVICE_NAME`, `OTEL_SDK_DISABLED`, `LANGFUSE_*`; a variable wins over the file).
    pub fn resolve(
        tracing: &TracingSettings,
        langfuse: &LangfuseSettings,
        data_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Plan {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let mut plan = Plan {
            redact: tracing.redact.clone(),
            ..Plan::default()
        };
        plan.redact.extend(langfuse.redact.iter().cloned());
        let service_name = env("OTEL_SERVICE_NAME").unwrap_or_else(|| tracing.service_name.clone());
        let timeout = env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(tracing.timeout);
        let base = |name: &'static str,
                    url: String,
                    flavour,
                    capture,
                    headers,
                    scores,
                    auth_fix: String| {
            DestinationConfig {
                name,
                traces_url: url,
                scores_url: scores,
                headers,
                encode: EncodeOptions {
                    flavour,
                    service_name: service_name.clone(),
                    capture_content: capture,
                },
                timeout,
                queue_capacity: tracing.queue_capacity,
                max_batch: tracing.max_batch_spans,
                batch_interval: tracing.batch_interval,
                spool_dir: data_dir.join("spool").join(name),
                spool_max_bytes: tracing.spool_max_bytes,
                max_backoff: tracing.max_backoff,
                auth_fix,
                trust: crate::tls::Trust::default(),
            }
        };
        let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| truthy(&v))
            || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none");
        let endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| {
                env("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .map(|b| format!("{}/v1/traces", b.trim().trim_end_matches('/')))
            })
            .or_else(|| tracing.endpoint.clone());
        if let (Some(url), false) = (endpoint, disabled) {
            if let Some(p) = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            {
                if p.trim() != "http/protobuf" {
                    plan.warnings.push(format!(
                        "OTEL_EXPORTER_OTLP_PROTOCOL = {p:?}: hypertool exports OTLP over HTTP with protobuf only (http/protobuf); point the endpoint at the collector's HTTP port (4318)"
                    ));
                }
            }
            let mut headers = Vec::new();
            for var in [
                "OTEL_EXPORTER_OTLP_HEADERS",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            ] {
                if let Some(raw) = env(var) {
                    headers.extend(parse_headers(&raw, var, &mut plan.warnings));
                }
            }
            plan.destinations.push(base(
                "otlp",
                url.trim().to_string(),
                Flavour::Otlp,
                tracing.capture_content,
                headers,
                None,
                "check the credentials in OTEL_EXPORTER_OTLP_HEADERS".into(),
            ));
        }
        use crate::config::settings::LangfuseMode;
        let public = env(&langfuse.public_key_env);
        let secret = env(&langfuse.secret_key_env);
        let wanted = match langfuse.enabled {
            LangfuseMode::Off => false,
            LangfuseMode::On => true,
            LangfuseMode::Auto => public.is_some() || secret.is_some(),
        };
        plan.langfuse_wanted = wanted;
        let host_ok = reqwest::Url::parse(&langfuse.host)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
        if wanted && !host_ok {
            plan.warnings.push(format!(
                "the Langfuse host {:?} (LANGFUSE_HOST, else [langfuse] host) is not an http(s) URL: no trace can reach Langfuse; set it to e.g. https://cloud.langfuse.com",
                langfuse.host
            ));
            plan.langfuse_missing = true;
        }
        if wanted && host_ok {
            match (public, secret) {
                (Some(pk), Some(sk)) => {
                    // `LANGFUSE_HOST` has already won over `[langfuse] host` in the settings.
                    let host = langfuse.host.clone();
                    let auth = basic_auth(&pk, &sk);
                    let mut headers = vec![(
                        http::HeaderName::from_static("x-langfuse-ingestion-version"),
                        http::HeaderValue::from_static("4"),
                    )];
                    if let Some(a) = auth {
                        headers.push((http::header::AUTHORIZATION, a));
                    }
                    plan.destinations.push(base(
                        "langfuse",
                        langfuse::traces_url(&host),
                        Flavour::Langfuse,
                        langfuse.capture_content,
                        headers,
                        Some(langfuse::scores_url(&host)),
                        format!(
                            "check {} and {} (a key pair belongs to one Langfuse project on one host: LANGFUSE_HOST is {host})",
                            langfuse.public_key_env, langfuse.secret_key_env
                        ),
                    ));
                }
                (pk, sk) => {
                    let missing: Vec<&str> = [
                        (pk.is_none(), &langfuse.public_key_env),
                        (sk.is_none(), &langfuse.secret_key_env),
                    ]
                    .into_iter()
                    .filter(|(absent, _)| *absent)
                    .map(|(_, name)| name.as_str())
                    .collect();
                    plan.warnings.push(format!(
                        "Langfuse is on but {} not set: no trace reaches Langfuse (generations are logged instead) and LangfuseIntegrationFailing will fire until it is set, or until [langfuse] enabled = false",
                        missing.join(" and ")
                    ));
                    plan.langfuse_missing_keys = missing.into_iter().map(str::to_string).collect();
                    plan.langfuse_missing = true;
                }
            }
        }
        plan
    }

    /// One line per destination, for `hypertool check`.
    pub fn describe(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .destinations
            .iter()
            .map(|d| {
                format!(
                    "traces: {} -> {}{}",
                    d.name,
                    d.traces_url,
                    if d.encode.capture_content {
                        " (with prompts and answers)"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        if out.is_empty() && !self.langfuse_missing {
            out.push("traces: no destination (set OTEL_EXPORTER_OTLP_ENDPOINT or [tracing] endpoint, or the Langfuse keys)".into());
        }
        out
    }
}

/// `Basic base64(public:secret)`, marked sensitive (never printed by `http`'s Debug).
fn basic_auth(public: &str, secret: &str) -> Option<http::HeaderValue> {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{public}:{secret}"));
    let mut v = http::HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

impl Tracer {
    /// No destination: every call is a no-op.
    pub fn off() -> Tracer {
        Tracer { inner: None }
    }

    /// Starts every planned destination (each opens its spool and starts sending what an earlier
    /// run left in it).
    pub fn start(plan: Plan, clock: Arc<dyn Clock>) -> Result<Tracer, String> {
        if plan.destinations.is_empty() && !plan.langfuse_missing {
            return Ok(Tracer::off());
        }
        let mut destinations = Vec::new();
        for config in plan.destinations {
            let name = config.name;
            let dir = config.spool_dir.clone();
            let d = Destination::start(config, clock.clone()).map_err(|e| {
                format!(
                    "the {name} trace spool {} cannot be opened: {e}",
                    dir.display()
                )
            })?;
            tracing::info!(destination = name, url = %d.config.traces_url, "exporting traces");
            destinations.push(d);
        }
        let content = destinations.iter().any(|d| d.config.encode.capture_content);
        Ok(Tracer {
            inner: Some(Arc::new(Inner {
                destinations,
                content,
                redact: plan.redact,
                langfuse_missing: plan.langfuse_missing,
            })),
        })
    }

    /// Whether anything takes spans (a destination, or the generation log of a missing Langfuse).
    pub fn exports(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether generations should carry their prompt and answer.
    pub fn wants_content(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.content)
    }

    /// `text` with every redaction pattern's matches replaced by `[REDACTED]`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = std::borrow::Cow::Borrowed(text);
        if let Some(i) = &self.inner {
            for r in &i.redact {
                if let std::borrow::Cow::Owned(s) = r.replace_all(&out, "[REDACTED]") {
                    out = std::borrow::Cow::Owned(s);
                }
            }
        }
        out.into_owned()
    }

    pub fn emit(&self, span: SpanRecord) {
        let Some(inner) = &self.inner else { return };
        let span = Arc::new(span);
        for d in &inner.destinations {
            d.offer(Message::Span(span.clone()));
        }
    }

    pub fn score(&self, score: Score) {
        let Some(inner) = &self.inner else { return };
        let score = Arc::new(score);
        for d in inner.destinations.iter().filter(|d| d.takes_scores()) {
            d.offer(Message::Score(score.clone()));
        }
    }

    /// Every destination's name and stats (for the exposition).
    pub fn stats(&self) -> Vec<(&'static str, Arc<DestinationStats>)> {
        self.inner
            .iter()
            .flat_map(|i| i.destinations.iter())
            .map(|d| (d.config.name, d.stats.clone()))
            .collect()
    }

    /// Hands the destinations' export counters to the exposition, read from their stats when
    /// rendered (destinations are fixed for the life of the process).
    pub fn register_metrics(&self, registry: &Registry) {
        type Read = fn(&'static str, &DestinationStats, &mut Emit<'_>);
        let each = |family: &'static Family, read: Read| {
            let destinations = self.stats();
            registry.collect(family, move |emit| {
                for (name, stats) in &destinations {
                    read(name, stats, emit);
                }
            });
        };
        each(&families::TRACE_EXPORT_TOTAL, |name, stats, emit| {
            for (result, n) in stats.results() {
                emit(&[name, result], n as f64);
            }
        });
        each(&families::TRACE_SPOOL_BYTES, |name, stats, emit| {
            emit(&[name], stats.spool_bytes.load(Ordering::Relaxed) as f64)
        });
        each(&families::TRACE_EXPORT_LAST_SUCCESS, |name, stats, emit| {
            let at = stats.last_success_ms.load(Ordering::Relaxed);
            if at > 0 {
                emit(&[name], at as f64 / 1000.0);
            }
        });
        each(&families::TRACE_QUEUE_DROPPED_TOTAL, |name, stats, emit| {
            emit(&[name], stats.queue_dropped.load(Ordering::Relaxed) as f64)
        });
        each(&families::TRACE_ITEM_ERRORS_TOTAL, |name, stats, emit| {
            for (kind, n) in [
                ("transient", &stats.item_errors_transient),
                ("permanent", &stats.item_errors_permanent),
            ] {
                emit(&[name, kind], n.load(Ordering::Relaxed) as f64);
            }
        });
        // Traces Langfuse accepted (2xx), never traces attempted; the exposition adds those
        // reported through the API.
        each(
            &families::LANGFUSE_TRACE_CREATED_TOTAL,
            |name, stats, emit| {
                if name == "langfuse" {
                    emit(&[], stats.traces_accepted.load(Ordering::Relaxed) as f64);
                }
            },
        );
    }

    pub fn langfuse(&self) -> Option<Arc<DestinationStats>> {
        self.stats()
            .into_iter()
            .find(|(n, _)| *n == "langfuse")
            .map(|(_, s)| s)
    }

    /// Langfuse is expected and is not getting traces right now (missing keys, or the last
    /// attempt failed): generations are then also written to the log.
    pub fn langfuse_unreachable(&self) -> bool {
        match &self.inner {
            Some(i) if i.langfuse_missing => true,
            Some(i) => i
                .destinations
                .iter()
                .any(|d| d.config.name == "langfuse" && !d.stats.healthy.load(Ordering::Relaxed)),
            None => false,
        }
    }

    /// Why Langfuse is not getting traces, in the order of the evidence, for the alert's note;
    /// `None` when nothing is known to be wrong.
    pub fn langfuse_diagnosis(&self) -> Option<String> {
        let stats = self.langfuse()?;
        let spooled = stats.spool_bytes.load(Ordering::Relaxed);
        let mut causes = Vec::new();
        match stats.trouble() {
            Some(Trouble::AuthRefused(code)) => causes.push(format!(
                "Langfuse refused the keys (HTTP {code}): check LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY, and that LANGFUSE_HOST is the host of their project"
            )),
            Some(Trouble::Unreachable(why)) => causes.push(format!(
                "Langfuse is unreachable (last error: {why}): check LANGFUSE_HOST and the network"
            )),
            None => {}
        }
        if spooled > 0 && !stats.healthy.load(Ordering::Relaxed) {
            causes.push(format!(
                "{spooled} bytes of traces are spooled, waiting to be sent (hypertool_trace_spool_bytes)"
            ));
        }
        (!causes.is_empty()).then(|| causes.join("; "))
    }

    /// Writes what is queued to the spools and gives the destinations `grace` to take it; the
    /// rest is sent at the next start.
    pub async fn shutdown(&self, grace: Duration) {
        if let Some(i) = &self.inner {
            let all = i.destinations.iter().map(|d| d.shutdown(grace));
            futures_util::future::join_all(all).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::settings::LangfuseMode;

    fn langfuse(enabled: LangfuseMode) -> LangfuseSettings {
        LangfuseSettings {
            enabled,
            host: "https://langfuse.example".into(),
            public_key_env: "PK".into(),
            secret_key_env: "SK".into(),
            capture_content: true,
            redact: Vec::new(),
        }
    }

    fn plan(tracing: &TracingSettings, lf: &LangfuseSettings, vars: &[(&str, &str)]) -> Plan {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Plan::resolve(tracing, lf, Path::new("/data"), &|k| vars.get(k).cloned())
    }

    use std::collections::HashMap;

    #[test]
    fn the_standard_variables_win_and_langfuse_needs_both_keys() {
        let file = TracingSettings {
            endpoint: Some("http://file:4318/v1/traces".into()),
            ..TracingSettings::default()
        };
        let off = langfuse(LangfuseMode::Auto);
        let p = plan(&file, &off, &[]);
        assert_eq!(p.destinations.len(), 1);
        assert_eq!(p.destinations[0].traces_url, "http://file:4318/v1/traces");
        assert_eq!(p.destinations[0].spool_dir, Path::new("/data/spool/otlp"));

        let p = plan(
            &file,
            &off,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318/")],
        );
        assert_eq!(p.destinations[0].traces_url, "http://env:4318/v1/traces");
        let p = plan(
            &file,
            &off,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:9/x"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=a%20b,bad header=1"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1500"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_SERVICE_NAME", "svc"),
            ],
        );
        let d = &p.destinations[0];
        assert_eq!(d.traces_url, "http://traces:9/x");
        assert_eq!(d.headers.len(), 1);
        assert_eq!(d.headers[0].1, "a b");
        assert_eq!(d.timeout, Duration::from_millis(1500));
        assert_eq!(d.encode.service_name, "svc");
        assert!(p
            .warnings
            .iter()
            .any(|w| w.contains("bad header") && !w.contains("=1")));
        assert!(p.warnings.iter().any(|w| w.contains("http/protobuf")));
        assert!(plan(&file, &off, &[("OTEL_SDK_DISABLED", "true")])
            .destinations
            .is_empty());
        assert!(plan(&file, &off, &[("OTEL_TRACES_EXPORTER", "none")])
            .destinations
            .is_empty());

        // Langfuse: auto with both keys on, with one key a warning naming the other.
        let none = TracingSettings::default();
        let p = plan(&none, &off, &[("PK", "pk-1"), ("SK", "sk-1")]);
        let lf = &p.destinations[0];
        assert_eq!(
            lf.traces_url,
            "https://langfuse.example/api/public/otel/v1/traces"
        );
        assert_eq!(
            lf.scores_url.as_deref(),
            Some("https://langfuse.example/api/public/ingestion")
        );
        assert!(lf
            .headers
            .iter()
            .any(|(k, v)| k == "x-langfuse-ingestion-version" && v == "4"));
        assert!(lf
            .headers
            .iter()
            .any(|(k, v)| k == "authorization" && v == "Basic cGstMTpzay0x"));
        let p = plan(&none, &off, &[("PK", "pk-1")]);
        assert!(p.destinations.is_empty() && p.langfuse_missing);
        assert_eq!(
            (p.langfuse_wanted, p.langfuse_missing_keys.clone()),
            (true, vec!["SK".to_string()])
        );
        assert!(p.warnings.iter().any(|w| w.contains("SK not set")));
        assert!(
            !plan(&none, &off, &[]).langfuse_missing,
            "auto with no key is off"
        );
        let p = plan(&none, &langfuse(LangfuseMode::On), &[]);
        assert!(p.langfuse_missing && p.warnings.iter().any(|w| w.contains("PK and SK not set")));
        assert!(plan(
            &none,
            &langfuse(LangfuseMode::Off),
            &[("PK", "a"), ("SK", "b")]
        )
        .destinations
        .is_empty());
        let mut bad_host = langfuse(LangfuseMode::On);
        bad_host.host = "langfuse.example".into();
        let p = plan(&none, &bad_host, &[("PK", "a"), ("SK", "b")]);
        assert!(
            p.destinations.is_empty()
                && p.warnings.iter().any(|w| w.contains("not an http(s) URL"))
        );
    }

    #[test]
    fn redaction_replaces_every_pattern_before_content_leaves() {
        let plan = Plan {
            redact: vec![
                Regex::new("sk-[a-z0-9]+").expect("regex"),
                Regex::new(r"\d{3}-\d{4}").expect("regex"),
            ],
            langfuse_missing: true,
            ..Plan::default()
        };
        let clock: Arc<dyn Clock> = Arc::new(crate::core::clock::ManualClock::new(0));
        let t = Tracer::start(plan, clock).expect("start");
        assert_eq!(
            t.redact("key sk-abc123 and 555-1234, sk-zz"),
            "key [REDACTED] and [REDACTED], [REDACTED]"
        );
        assert!(
            t.exports(),
            "a missing Langfuse still takes generations (to the log)"
        );
        assert!(!t.wants_content(), "the log gets no prompts or answers");
        assert_eq!(Tracer::off().redact("sk-abc"), "sk-abc");
    }
}
