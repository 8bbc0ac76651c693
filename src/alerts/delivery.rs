//! Delivery of alert notifications to Alertmanager (v2 API) and to a generic JSON webhook.
//!
//! The evaluation loop never waits on a receiver: it hands each batch to a bounded queue
//! ([`Deliverer::offer`]); a full queue drops the batch and says so (log + counter). A task per
//! target drains the queue and retries what can succeed later (connection errors, timeouts, 429,
//! 5xx) with exponential backoff; a permanent refusal (other 4xx) is logged once and not retried.
//!
//! Alertmanager forgets an alert whose `endsAt` has passed, so firing alerts are re-sent every
//! minute (as Prometheus does) with `endsAt` four minutes ahead; a resolution is sent with
//! `endsAt` = the time it resolved. The webhook gets one message per state change, in the shape of
//! Alertmanager's own webhook (`version`, `status`, `alerts[]`), so existing receivers work.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{AlertInstance, AlertState};
use crate::core::clock::{to_rfc3339, UnixMillis};
use crate::telemetry::registry::Counter;

/// How often a still-firing alert is re-sent to Alertmanager.
pub const RESEND_EVERY_MS: i64 = 60_000;
const QUEUE_DEPTH: usize = 256;

pub use crate::config::alerts::DeliverySettings;

/// Delivery outcomes per target: `hypertool_alert_deliveries_total{target,result}`.
pub struct DeliveryStats {
    pub counts: Counter<2>,
    pub queued: AtomicU64,
}

impl Default for DeliveryStats {
    fn default() -> Self {
        DeliveryStats {
            counts: Counter::new(&crate::telemetry::families::ALERT_DELIVERIES_TOTAL),
            queued: AtomicU64::new(0),
        }
    }
}

impl DeliveryStats {
    fn count(&self, target: &'static str, result: &'static str) {
        self.counts.inc([target, result]);
    }
}

/// One target's queue.
struct Target {
    name: &'static str,
    tx: mpsc::Sender<Value>,
}

/// The handle the evaluation loop uses.
pub struct Deliverer {
    targets: Vec<Target>,
    stats: Arc<DeliveryStats>,
    /// When each firing alert (by label set) was last sent to Alertmanager.
    last_sent: BTreeMap<BTreeMap<String, String>, UnixMillis>,
    generator_url: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Deliverer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn alertmanager_alert(a: &AlertInstance, now: UnixMillis, generator_url: &str) -> Value {
    let ends_at = match a.state {
        AlertState::Inactive => a.resolved_at.unwrap_or(now),
        _ => now + 4 * RESEND_EVERY_MS,
    };
    json!({
        "labels": a.labels,
        "annotations": a.annotations,
        "startsAt": to_rfc3339(a.fired_at.unwrap_or(a.active_at)),
        "endsAt": to_rfc3339(ends_at),
        "generatorURL": generator_url,
    })
}

impl Deliverer {
    /// Starts one delivery task per configured target (none: nothing is started).
    pub fn start(
        settings: &DeliverySettings,
        generator_url: String,
        stats: Arc<DeliveryStats>,
    ) -> Self {
        let http = settings
            .trust
            .reqwest(reqwest::Client::builder())
            .timeout(settings.timeout)
            .build()
            .unwrap_or_default();
        let mut targets = Vec::new();
        let mut tasks = Vec::new();
        let mut add = |name: &'static str, url: String| {
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            tasks.push(tokio::spawn(drain(
                name,
                url,
                rx,
                http.clone(),
                settings.clone(),
                stats.clone(),
            )));
            targets.push(Target { name, tx });
        };
        if let Some(url) = &settings.alertmanager_url {
            add(
                "alertmanager",
                format!("{}/api/v2/alerts", url.trim_end_matches('/')),
            );
        }
        if let Some(url) = &settings.webhook_url {
            add("webhook", url.clone());
        }
        Deliverer {
            targets,
            stats,
            last_sent: BTreeMap::new(),
            generator_url,
            tasks,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Hands this evaluation's news to the targets without waiting: `changed` are the instances
    /// whose state changed, `firing` every instance firing now (re-sent to Alertmanager each minute).
    pub fn offer(&mut self, now: UnixMillis, changed: &[AlertInstance], firing: &[AlertInstance]) {
        // Firing alerts Alertmanager has not heard about for a minute (or ever).
        let due: Vec<&AlertInstance> = firing
            .iter()
            .filter(|a| {
                self.last_sent
                    .get(&a.labels)
                    .is_none_or(|t| now - t >= RESEND_EVERY_MS)
            })
            .collect();
        for target in &self.targets {
            let payload = match target.name {
                "alertmanager" => {
                    let mut batch: Vec<Value> = due
                        .iter()
                        .map(|a| alertmanager_alert(a, now, &self.generator_url))
                        .collect();
                    for a in changed
                        .iter()
                        .filter(|a| a.state == AlertState::Inactive && a.fired_at.is_some())
                    {
                        batch.push(alertmanager_alert(a, now, &self.generator_url));
                    }
                    if batch.is_empty() {
                        continue;
                    }
                    Value::Array(batch)
                }
                _ => {
                    // The webhook hears about firing and resolution (not about pending).
                    let news: Vec<&AlertInstance> = changed
                        .iter()
                        .filter(|a| {
                            a.state == AlertState::Firing
                                || (a.state == AlertState::Inactive && a.fired_at.is_some())
                        })
                        .collect();
                    if news.is_empty() {
                        continue;
                    }
                    let status = if news.iter().any(|a| a.state == AlertState::Firing) {
                        "firing"
                    } else {
                        "resolved"
                    };
                    json!({
                        "version": "4",
                        "receiver": "hypertool",
                        "status": status,
                        "externalURL": self.generator_url,
                        "alerts": news.iter().map(|a| json!({
                            "status": if a.state == AlertState::Firing { "firing" } else { "resolved" },
                            "labels": a.labels,
                            "annotations": a.annotations,
                            "startsAt": to_rfc3339(a.fired_at.unwrap_or(a.active_at)),
                            "endsAt": a.resolved_at.map(to_rfc3339).unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
                            "generatorURL": self.generator_url,
                            "value": a.value,
                            "note": a.note,
                        })).collect::<Vec<_>>(),
                    })
                }
            };
            match target.tx.try_send(payload) {
                Ok(()) => {
                    self.stats.queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.stats.count(target.name, "dropped");
                    tracing::warn!(
                        target = target.name,
                        "alert delivery queue is full; this notification was dropped \
                        (the receiver is down or slow; firing alerts are re-sent later)"
                    );
                }
            }
        }
        for a in due {
            self.last_sent.insert(a.labels.clone(), now);
        }
        let live: Vec<&BTreeMap<String, String>> = firing.iter().map(|a| &a.labels).collect();
        self.last_sent.retain(|labels, _| live.contains(&labels));
    }
}

/// Is a failed attempt worth retrying?
fn retryable(status: Option<reqwest::StatusCode>) -> bool {
    match status {
        None => true,
        Some(s) => {
            s.is_server_error()
                || s == reqwest::StatusCode::TOO_MANY_REQUESTS
                || s == reqwest::StatusCode::REQUEST_TIMEOUT
        }
    }
}

async fn drain(
    name: &'static str,
    url: String,
    mut rx: mpsc::Receiver<Value>,
    http: reqwest::Client,
    settings: DeliverySettings,
    stats: Arc<DeliveryStats>,
) {
    while let Some(payload) = rx.recv().await {
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        let mut backoff = settings.initial_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = http.post(&url).json(&payload).send().await;
            let (status, error) = match result {
                Ok(r) if r.status().is_success() => {
                    stats.count(name, "delivered");
                    break;
                }
                Ok(r) => (Some(r.status()), format!("answered {}", r.status())),
                Err(e) => (e.status(), without_url(&e)),
            };
            if !retryable(status) {
                stats.count(name, "rejected");
                tracing::error!(target = name, "alert delivery refused ({error}); not retrying: check the receiver's configuration");
                break;
            }
            if attempt > settings.max_retries {
                stats.count(name, "failed");
                tracing::error!(
                    target = name,
                    attempts = attempt,
                    "alert delivery failed ({error}); giving up on this notification"
                );
                break;
            }
            if attempt == 1 {
                tracing::warn!(
                    target = name,
                    "alert delivery failed ({error}); retrying with backoff"
                );
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// reqwest errors print the URL, which may carry credentials (`https://user:pass@…`): keep only the kind.
fn without_url(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        "request failed".into()
    }
}
