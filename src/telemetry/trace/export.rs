//! One trace destination (an OTLP collector, or Langfuse): a bounded queue that never makes a call
//! wait, a batcher that writes each batch to the spool, and a sender that posts the spool oldest
//! first, removing a batch only once the destination accepted it.
//!
//! Answers are read the way OTLP/HTTP says: 2xx accepted; 408, 429, 5xx and connection failures
//! retried with backoff (the batch stays spooled, across restarts too); 401/403 mean the keys are
//! wrong, which no retry fixes: logged once a minute with the variable to fix, counted, and tried
//! again only once a minute (new keys need a restart, which sends the spool); any other 4xx
//! refuses the batch for good (logged, counted, removed).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::otlp::{self, EncodeOptions};
use super::span::{Score, SpanRecord};
use super::spool::{Item, ItemKind, Spool};
use crate::core::clock::Clock;

/// How a destination is reached, and its bounds.
#[derive(Clone)]
pub struct DestinationConfig {
    /// `otlp` or `langfuse` (the `destination` label).
    pub name: &'static str,
    /// Where spans are posted (OTLP/HTTP protobuf).
    pub traces_url: String,
    /// Where scores are posted (Langfuse's ingestion API), if this destination takes scores.
    pub scores_url: Option<String>,
    /// Extra headers (`OTEL_EXPORTER_OTLP_HEADERS`, Langfuse's Basic auth): never logged.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub encode: EncodeOptions,
    pub timeout: Duration,
    pub queue_capacity: usize,
    pub max_batch: usize,
    pub batch_interval: Duration,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub max_backoff: Duration,
    /// What to check when the destination refuses the credentials (names of variables, not values).
    pub auth_fix: String,
    /// CA certificates trusted beside the webpki roots (`[tracing]`/`[langfuse] ca_file`, else
    /// `[tls] ca_file`).
    pub trust: crate::tls::Trust,
}

impl std::fmt::Debug for DestinationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationConfig")
            .field("name", &self.name)
            .field("traces_url", &self.traces_url)
            .field("headers", &format_args!("[{} hidden]", self.headers.len()))
            .finish_non_exhaustive()
    }
}

/// Outcomes of posting a batch, the `result` label of `hypertool_trace_export_total`.
pub const RESULTS: [&str; 5] = ["ok", "retry", "auth_refused", "rejected", "dropped"];

/// Why the destination is not getting traces, as far as the evidence goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Trouble {
    /// 401/403 seen on the last attempt.
    AuthRefused(u16),
    /// The last attempt could not reach the destination, or it answered 5xx/429.
    Unreachable(String),
}

/// What a destination did, read by the exposition and the alert engine.
#[derive(Debug, Default)]
pub struct DestinationStats {
    results: [AtomicU64; 5],
    pub spool_bytes: AtomicU64,
    pub spool_batches: AtomicU64,
    /// Unix ms of the last accepted batch; 0 before the first.
    pub last_success_ms: AtomicI64,
    /// Traces the destination accepted (the spans that begin a trace).
    pub traces_accepted: AtomicU64,
    pub scores_accepted: AtomicU64,
    /// Spans and scores dropped because the in-memory queue was full.
    pub queue_dropped: AtomicU64,
    /// Items a 207 answer refused: for now (sent again) and for good (dropped).
    pub item_errors_transient: AtomicU64,
    pub item_errors_permanent: AtomicU64,
    /// Whether the last attempt was accepted (true before the first).
    pub healthy: AtomicBool,
    trouble: Mutex<Option<Trouble>>,
}

impl DestinationStats {
    fn new() -> DestinationStats {
        DestinationStats {
            healthy: AtomicBool::new(true),
            ..DestinationStats::default()
        }
    }

    fn count(&self, result: &str) {
        if let Some(i) = RESULTS.iter().position(|r| *r == result) {
            self.results[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn results(&self) -> Vec<(&'static str, u64)> {
        RESULTS
            .iter()
            .zip(&self.results)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn result(&self, result: &str) -> u64 {
        self.results()
            .into_iter()
            .find(|(r, _)| *r == result)
            .map_or(0, |(_, n)| n)
    }

    pub fn trouble(&self) -> Option<Trouble> {
        self.trouble
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_trouble(&self, t: Option<Trouble>) {
        self.healthy.store(t.is_none(), Ordering::Relaxed);
        *self.trouble.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }
}

pub enum Message {
    Span(Arc<SpanRecord>),
    Score(Arc<Score>),
}

/// What waits for the batcher. A mutex-guarded buffer rather than a channel: a channel wakes its
/// receiver for every span (a cross-thread wake-up per span, which cost more than the span); here
/// the batcher sleeps for `batch_interval` and is woken only when a full batch is waiting.
#[derive(Default)]
struct Pending {
    spans: Vec<Arc<SpanRecord>>,
    scores: Vec<Arc<Score>>,
}

struct Queue {
    pending: Mutex<Pending>,
    capacity: usize,
    max_batch: usize,
    /// A full batch is waiting.
    full: Notify,
}

impl Queue {
    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A running destination: the queue's sending side and the stats.
pub struct Destination {
    pub config: DestinationConfig,
    pub stats: Arc<DestinationStats>,
    queue: Arc<Queue>,
    spool: Arc<Mutex<Spool>>,
    /// Tells the sender a batch was spooled.
    wake: Arc<Notify>,
    stop: CancellationToken,
    sender_done: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Destination {
    /// Opens the spool and starts the batcher and the sender.
    pub fn start(config: DestinationConfig, clock: Arc<dyn Clock>) -> std::io::Result<Destination> {
        let spool = Spool::open(&config.spool_dir, config.spool_max_bytes)?;
        let stats = Arc::new(DestinationStats::new());
        stats.spool_bytes.store(spool.bytes(), Ordering::Relaxed);
        stats
            .spool_batches
            .store(spool.batches() as u64, Ordering::Relaxed);
        if spool.batches() > 0 {
            tracing::info!(
                destination = config.name,
                batches = spool.batches(),
                bytes = spool.bytes(),
                "trace batches left by an earlier run are spooled; sending them first"
            );
        }
        let spool = Arc::new(Mutex::new(spool));
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending::default()),
            capacity: config.queue_capacity.max(1),
            max_batch: config.max_batch.max(1),
            full: Notify::new(),
        });
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        tokio::spawn(batcher(
            config.clone(),
            queue.clone(),
            spool.clone(),
            stats.clone(),
            wake.clone(),
            stop.clone(),
        ));
        let client = config
            .trust
            .reqwest(reqwest::Client::builder())
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()
            .map_err(std::io::Error::other)?;
        let sender = Sender {
            config: config.clone(),
            client,
            spool: spool.clone(),
            stats: stats.clone(),
            clock,
            backoff: FIRST_BACKOFF,
            last_auth_log: None,
            last_retry_log: None,
        };
        let sender = tokio::spawn(sender.run(wake.clone(), stop.clone()));
        Ok(Destination {
            config,
            stats,
            queue,
            spool,
            wake,
            stop,
            sender_done: Mutex::new(Some(sender)),
        })
    }

    /// Queues without waiting; a full queue drops and counts (the call never waits on tracing).
    pub fn offer(&self, msg: Message) {
        let q = &self.queue;
        let mut p = q.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.spans.len() + p.scores.len() >= q.capacity {
            drop(p);
            let n = self.stats.queue_dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::error!(destination = self.config.name, dropped = n + 1,
                    "the trace queue is full (the exporter cannot keep up); spans are being dropped");
            }
            return;
        }
        let waiting = match msg {
            Message::Span(s) => {
                p.spans.push(s);
                p.spans.len()
            }
            Message::Score(s) => {
                p.scores.push(s);
                p.scores.len()
            }
        };
        drop(p);
        if waiting == q.max_batch {
            q.full.notify_one();
        }
    }

    pub fn takes_scores(&self) -> bool {
        self.config.scores_url.is_some()
    }

    /// Writes everything queued to the spool, then gives the sender until `grace` to deliver it;
    /// what is left stays spooled for the next start.
    pub async fn shutdown(&self, grace: Duration) {
        let Pending { spans, scores } = self.queue.take();
        write_batches(&self.config, spans, scores, &self.spool, &self.stats);
        self.wake.notify_one();
        let handle = self
            .sender_done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut handle) = handle {
            let drained = async {
                loop {
                    if self.stats.spool_batches.load(Ordering::Relaxed) == 0
                        || !self.stats.healthy.load(Ordering::Relaxed)
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            let _ = tokio::time::timeout(grace, drained).await;
            self.stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut handle).await;
        }
    }
}

/// Every `batch_interval`, or as soon as a full batch waits: what is queued, encoded and spooled.
async fn batcher(
    config: DestinationConfig,
    queue: Arc<Queue>,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<DestinationStats>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = queue.full.notified() => {}
            _ = tokio::time::sleep(config.batch_interval) => {}
            _ = stop.cancelled() => return,
        }
        let Pending { spans, scores } = queue.take();
        if spans.is_empty() && scores.is_empty() {
            continue;
        }
        write_batches(&config, spans, scores, &spool, &stats);
        wake.notify_one();
    }
}

/// Encodes and spools what was queued, `max_batch` at most per batch.
fn write_batches(
    config: &DestinationConfig,
    mut spans: Vec<Arc<SpanRecord>>,
    mut scores: Vec<Arc<Score>>,
    spool: &Mutex<Spool>,
    stats: &DestinationStats,
) {
    let max = config.max_batch.max(1);
    let mut batches = Vec::new();
    while !spans.is_empty() {
        let rest = spans.split_off(spans.len().min(max));
        let chunk = std::mem::replace(&mut spans, rest);
        let roots = otlp::roots(&chunk);
        batches.push((ItemKind::Spans, roots, otlp::encode(chunk, &config.encode)));
    }
    while !scores.is_empty() {
        let rest = scores.split_off(scores.len().min(max));
        let chunk = std::mem::replace(&mut scores, rest);
        let payload = super::langfuse::score_batch(&chunk);
        batches.push((ItemKind::Scores, chunk.len() as u32, payload));
    }
    let mut spool = spool.lock().unwrap_or_else(|p| p.into_inner());
    for (kind, count, payload) in batches {
        match spool.push(kind, count, &payload) {
            Ok(dropped) if dropped.batches > 0 => {
                for _ in 0..dropped.batches {
                    stats.count("dropped");
                }
                tracing::error!(destination = config.name, batches = dropped.batches, bytes = dropped.bytes,
                    bound = config.spool_max_bytes,
                    "the trace spool is full: the oldest batches were dropped (is the destination down? raise the spool bound to keep more)");
            }
            Ok(_) => {}
            Err(e) => {
                stats.count("dropped");
                tracing::error!(destination = config.name, dir = %config.spool_dir.display(),
                    "a trace batch could not be spooled and was dropped: {e}");
            }
        }
        stats.spool_bytes.store(spool.bytes(), Ordering::Relaxed);
        stats
            .spool_batches
            .store(spool.batches() as u64, Ordering::Relaxed);
    }
}

/// How one post went.
enum Sent {
    Accepted,
    /// 207 Multi-Status (Langfuse's ingestion API): some items accepted, some refused.
    Partial(Partial),
    Retry(String),
    Auth(u16),
    Rejected(u16, String),
}

/// What a 207 answer said of the batch's items.
#[derive(Debug, Default, PartialEq)]
struct Partial {
    /// Ids of the items refused for now (5xx, 429): sent again.
    transient: Vec<String>,
    /// Items refused for good, and the first of their messages (bounded).
    permanent: u64,
    message: Option<String>,
}

/// The body of a 207 answer: `{"successes": [{id, status}], "errors": [{id, status, message}]}`.
fn partial(body: &str) -> Partial {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let mut out = Partial::default();
    for e in v["errors"].as_array().into_iter().flatten() {
        let status = e["status"].as_u64().unwrap_or(0);
        if status == 429 || status >= 500 {
            if let Some(id) = e["id"].as_str() {
                out.transient.push(id.chars().take(200).collect());
                continue;
            }
        }
        out.permanent += 1;
        if out.message.is_none() {
            let text = e["message"]
                .as_str()
                .or(e["error"].as_str())
                .unwrap_or("no message");
            out.message = Some(format!(
                "HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            ));
        }
    }
    out
}

/// The ingestion batch `payload` with only the events whose id is in `ids` (`None`: not a batch).
fn only_events(payload: &[u8], ids: &[String]) -> Option<(Vec<u8>, u32)> {
    let mut v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let batch = v.get_mut("batch")?.as_array_mut()?;
    batch.retain(|e| {
        e["id"]
            .as_str()
            .is_some_and(|id| ids.iter().any(|i| i == id))
    });
    let n = batch.len() as u32;
    (n > 0)
        .then(|| serde_json::to_vec(&v).ok().map(|b| (b, n)))
        .flatten()
}

async fn post(
    client: &reqwest::Client,
    config: &DestinationConfig,
    kind: ItemKind,
    payload: Vec<u8>,
) -> Sent {
    let (url, content_type) = match kind {
        ItemKind::Spans => (config.traces_url.as_str(), "application/x-protobuf"),
        ItemKind::Scores => match &config.scores_url {
            Some(u) => (u.as_str(), "application/json"),
            None => return Sent::Rejected(0, "this destination takes no scores".into()),
        },
    };
    let mut req = client
        .post(url)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(payload);
    for (k, v) in &config.headers {
        req = req.header(k.clone(), v.clone());
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            if status.as_u16() == 207 {
                // At most 1 MiB of it read: the item list is bounded by the batch.
                let mut body = Vec::new();
                let mut resp = resp;
                while let Ok(Some(chunk)) = resp.chunk().await {
                    body.extend_from_slice(&chunk);
                    if body.len() > 1 << 20 {
                        break;
                    }
                }
                return Sent::Partial(partial(&String::from_utf8_lossy(&body)));
            }
            if status.is_success() {
                return Sent::Accepted;
            }
            let code = status.as_u16();
            let text = resp.text().await.unwrap_or_default();
            let text: String = text.chars().take(300).collect();
            match code {
                401 | 403 => Sent::Auth(code),
                408 | 429 | 500..=599 => Sent::Retry(format!("HTTP {code}: {}", text.trim())),
                _ => Sent::Rejected(code, text.trim().to_string()),
            }
        }
        // Without the URL: it is configuration the operator has, and could carry credentials.
        Err(e) => Sent::Retry(e.without_url().to_string()),
    }
}

/// The destination's delivery loop: the spool's oldest batch posted until it is taken or
/// refused for good, backing off while the destination does not answer.
struct Sender {
    config: DestinationConfig,
    client: reqwest::Client,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<DestinationStats>,
    clock: Arc<dyn Clock>,
    /// The wait before the next try after a failure (doubles up to `max_backoff`).
    backoff: Duration,
    /// When each kind of trouble was last logged (at most once a minute each).
    last_auth_log: Option<std::time::Instant>,
    last_retry_log: Option<std::time::Instant>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const AUTH_RETRY: Duration = Duration::from_secs(60);

impl Sender {
    async fn run(mut self, wake: Arc<Notify>, stop: CancellationToken) {
        loop {
            let next = self
                .spool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .oldest();
            let item = match next {
                None => {
                    tokio::select! {
                        _ = wake.notified() => continue,
                        _ = stop.cancelled() => return,
                    }
                }
                Some(Err(e)) => {
                    self.stats.count("rejected");
                    tracing::error!(
                        destination = self.config.name,
                        "a spooled trace batch was unreadable and is skipped: {e}"
                    );
                    continue;
                }
                Some(Ok(item)) => item,
            };
            let outcome = tokio::select! {
                sent = post(&self.client, &self.config, item.kind, item.payload.clone()) => sent,
                _ = stop.cancelled() => return,
            };
            let wait = match outcome {
                Sent::Accepted => self.accepted(&item),
                Sent::Partial(p) => self.partly_accepted(&item, p),
                Sent::Retry(why) => Some(self.unreachable(why)),
                Sent::Auth(code) => Some(self.auth_refused(code)),
                Sent::Rejected(code, why) => self.rejected(&item, code, why),
            };
            if let Some(wait) = wait {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    /// The batch was taken whole.
    fn accepted(&mut self, item: &Item) -> Option<Duration> {
        let stats = &self.stats;
        stats.count("ok");
        stats
            .last_success_ms
            .store(self.clock.now_ms(), Ordering::Relaxed);
        let accepted = match item.kind {
            ItemKind::Spans => &stats.traces_accepted,
            ItemKind::Scores => &stats.scores_accepted,
        };
        accepted.fetch_add(u64::from(item.count), Ordering::Relaxed);
        if !stats.healthy.load(Ordering::Relaxed) {
            tracing::info!(
                destination = self.config.name,
                "traces are being delivered again"
            );
        }
        stats.set_trouble(None);
        remove(&self.spool, stats, item.seq);
        self.backoff = FIRST_BACKOFF;
        None
    }

    /// A 207: the items refused for good are dropped (counted, the first message logged); those
    /// refused for now go back to the spool, alone, to be sent again after a backoff.
    fn partly_accepted(&mut self, item: &Item, p: Partial) -> Option<Duration> {
        let (stats, name) = (&self.stats, self.config.name);
        stats.count("ok");
        stats
            .last_success_ms
            .store(self.clock.now_ms(), Ordering::Relaxed);
        // Items not named among the errors were taken.
        let refused = p.permanent + p.transient.len() as u64;
        if item.kind == ItemKind::Scores {
            stats.scores_accepted.fetch_add(
                u64::from(item.count).saturating_sub(refused),
                Ordering::Relaxed,
            );
        }
        stats
            .item_errors_permanent
            .fetch_add(p.permanent, Ordering::Relaxed);
        if let Some(message) = &p.message {
            tracing::warn!(destination = name, refused = p.permanent,
                "the trace destination refused {} item(s) of a batch for good ({message}); they are dropped",
                p.permanent);
        }
        let again = only_events(&item.payload, &p.transient);
        if let Some((retry, n)) = &again {
            stats
                .item_errors_transient
                .fetch_add(u64::from(*n), Ordering::Relaxed);
            tracing::info!(destination = name, items = n,
                "the trace destination could not take {n} item(s) of a batch now; they are sent again");
            let mut s = self.spool.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = s.push(item.kind, *n, retry) {
                tracing::error!(
                    destination = name,
                    "the items to send again could not be spooled: {e}"
                );
            }
        }
        remove(&self.spool, stats, item.seq);
        if again.is_some() {
            Some(self.back_off())
        } else {
            self.backoff = FIRST_BACKOFF;
            None
        }
    }

    /// No answer, or one that asks to come back (408, 429, 5xx): the batch stays spooled.
    fn unreachable(&mut self, why: String) -> Duration {
        let stats = &self.stats;
        stats.count("retry");
        let first = stats.healthy.load(Ordering::Relaxed);
        stats.set_trouble(Some(Trouble::Unreachable(why.clone())));
        if first || due(self.last_retry_log) {
            self.last_retry_log = Some(std::time::Instant::now());
            tracing::warn!(destination = self.config.name, url = %self.config.traces_url,
                spooled_bytes = stats.spool_bytes.load(Ordering::Relaxed),
                "traces cannot be delivered ({why}); they are spooled and re-sent when it answers");
        }
        self.back_off()
    }

    /// 401 or 403: the batch stays spooled and is tried again after a long wait.
    fn auth_refused(&mut self, code: u16) -> Duration {
        self.stats.count("auth_refused");
        self.stats.set_trouble(Some(Trouble::AuthRefused(code)));
        if due(self.last_auth_log) {
            self.last_auth_log = Some(std::time::Instant::now());
            tracing::error!(destination = self.config.name, status = code,
                "the trace destination refused hypertool's credentials: {}; batches stay spooled and are tried again once a minute",
                self.config.auth_fix);
        }
        AUTH_RETRY.min(self.config.max_backoff.max(FIRST_BACKOFF) * 8)
    }

    /// Refused for good (another 4xx): the batch is dropped, counted and logged.
    fn rejected(&mut self, item: &Item, code: u16, why: String) -> Option<Duration> {
        self.stats.count("rejected");
        tracing::error!(
            destination = self.config.name,
            status = code,
            "the trace destination refused a batch for good ({why}); it is dropped"
        );
        remove(&self.spool, &self.stats, item.seq);
        None
    }

    /// The wait before the next try, and the one after it doubled.
    fn back_off(&mut self) -> Duration {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(self.config.max_backoff.max(FIRST_BACKOFF));
        wait
    }
}

/// Whether a once-a-minute log line is due.
fn due(last: Option<std::time::Instant>) -> bool {
    last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
}

fn remove(spool: &Mutex<Spool>, stats: &DestinationStats, seq: u64) {
    let mut s = spool.lock().unwrap_or_else(|p| p.into_inner());
    s.remove(seq);
    stats.spool_bytes.store(s.bytes(), Ordering::Relaxed);
    stats
        .spool_batches
        .store(s.batches() as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_207_answer_sends_again_what_was_refused_for_now_and_drops_the_rest() {
        let answer = json!({
            "successes": [{"id": "a", "status": 201}],
            "errors": [
                {"id": "b", "status": 500, "message": "try later"},
                {"id": "c", "status": 400, "message": "invalid score value"},
                {"id": "d", "status": 429},
            ]
        });
        let p = partial(&answer.to_string());
        assert_eq!(p.transient, vec!["b".to_string(), "d".to_string()]);
        assert_eq!(p.permanent, 1);
        assert_eq!(p.message.as_deref(), Some("HTTP 400: invalid score value"));
        let batch = json!({"batch": [{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "d"}]});
        let (again, n) = only_events(batch.to_string().as_bytes(), &p.transient).unwrap();
        assert_eq!(n, 2);
        let again: serde_json::Value = serde_json::from_slice(&again).unwrap();
        assert_eq!(again, json!({"batch": [{"id": "b"}, {"id": "d"}]}));
        // Nothing to send again: no batch; an unreadable answer refuses nothing.
        assert_eq!(only_events(batch.to_string().as_bytes(), &[]), None);
        assert_eq!(partial("not json"), Partial::default());
    }
}
