//! The response cache shared by replicas, on Redis (`[gateway.cache] url`, `HYPERTOOL_CACHE_URL`).
//!
//! Each replica keeps its in-memory cache in front; a local miss asks Redis, and an answer stored
//! through one replica is served by the others. Redis is never in the way of a call: a lookup has
//! [`LOOKUP_TIMEOUT`] and any failure is a miss (counted); writes happen after the answer, in the
//! background, at most [`MAX_WRITES`] at once (more are dropped, counted). The connection is made
//! lazily and re-made by `redis`'s `ConnectionManager` after an outage.
//!
//! A value is a one-line JSON header (the canonical request, token counts) and the upstream's
//! answer as it came; the key is the SHA-256 of the canonical request, and the header's copy of it
//! guards against a collision. Redis expires it with the entry's TTL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;

use crate::telemetry::registry::Counter;

/// Longest a lookup may add to a call.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_millis(50);
/// Longest a background write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Background writes in flight at once.
pub const MAX_WRITES: usize = 64;

/// What the shared cache did: `hypertool_cache_shared_total{result}`.
fn shared_results() -> Counter<1> {
    Counter::with_series(
        &crate::telemetry::families::CACHE_SHARED_TOTAL,
        &[["hit"], ["miss"], ["error"], ["stored"], ["write_dropped"]],
    )
}

pub struct SharedCache {
    conn: ConnectionManager,
    writes: Arc<tokio::sync::Semaphore>,
    pub stats: Counter<1>,
    /// The URL without its password, for logs.
    shown: String,
    /// Errors are logged at most once per this many.
    last_warned: AtomicU64,
}

/// A hit: the answer, its token counts and how long Redis keeps it still.
pub struct Found {
    pub response: Bytes,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub ttl_ms: i64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    canonical: String,
    prompt: u64,
    completion: u64,
}

fn key(canonical: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("hypertool:cache:v1:{hex}")
}

impl SharedCache {
    /// Checks the URL; connects on first use (TLS for `rediss://`).
    pub fn open(url: &str, trust: &crate::tls::Trust) -> Result<SharedCache, String> {
        let shown = crate::config::secret::redacted(url);
        let bad = |e: redis::RedisError| {
            format!("{shown} is not a Redis URL ({e}); write redis://HOST:PORT/DB, or rediss:// for TLS")
        };
        // `rediss://`: TLS, verified against the system's roots and the trust's CA (the
        // `#insecure` fragment, the redis crate's, skips the verification).
        let client = match trust.pem() {
            Some(root_cert) if url.starts_with("rediss://") => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
            .map_err(bad)?,
            _ => redis::Client::open(url).map_err(bad)?,
        };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(WRITE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("{shown}: {e}"))?;
        Ok(SharedCache {
            conn,
            writes: Arc::new(tokio::sync::Semaphore::new(MAX_WRITES)),
            stats: shared_results(),
            shown,
            last_warned: AtomicU64::new(0),
        })
    }

    fn failed(&self, op: &str, e: &dyn std::fmt::Display) {
        self.stats.inc(["error"]);
        let now = chrono::Utc::now().timestamp() as u64;
        let last = self.last_warned.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                cache = %self.shown,
                "the shared response cache failed a {op} ({e}); calls go on without it (hypertool_cache_shared_total{{result=\"error\"}} counts each)"
            );
        }
    }

    /// The answer stored for `canonical`, if Redis has it and answers in time.
    pub async fn get(&self, canonical: &str) -> Option<Found> {
        let mut conn = self.conn.clone();
        let key = key(canonical);
        let mut pipe = redis::pipe();
        pipe.get(&key).pttl(&key);
        let answer = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            pipe.query_async::<(Option<Vec<u8>>, i64)>(&mut conn),
        )
        .await;
        let (value, ttl_ms) = match answer {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.failed("lookup", &e);
                return None;
            }
            Err(_) => {
                self.failed("lookup", &"timed out");
                return None;
            }
        };
        let found = value.and_then(|v| {
            let newline = v.iter().position(|b| *b == b'\n')?;
            let header: Header = serde_json::from_slice(&v[..newline]).ok()?;
            (header.canonical == canonical).then(|| Found {
                response: Bytes::copy_from_slice(&v[newline + 1..]),
                prompt_tokens: header.prompt,
                completion_tokens: header.completion,
                ttl_ms,
            })
        });
        match &found {
            Some(_) => self.stats.inc(["hit"]),
            None => self.stats.inc(["miss"]),
        };
        found
    }

    /// Stores an answer for the other replicas, in the background (dropped when too many writes
    /// are already waiting: a cache write is never worth a queue).
    pub fn put(
        self: &Arc<Self>,
        canonical: &str,
        response: &Bytes,
        prompt: u64,
        completion: u64,
        ttl: Duration,
    ) {
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            self.stats.inc(["write_dropped"]);
            return;
        };
        let Ok(mut value) = serde_json::to_vec(&Header {
            canonical: canonical.to_string(),
            prompt,
            completion,
        }) else {
            return;
        };
        value.push(b'\n');
        value.extend_from_slice(response);
        let key = key(canonical);
        let ttl_ms = (ttl.as_millis() as u64).max(1);
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut conn = this.conn.clone();
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(value).arg("PX").arg(ttl_ms);
            match tokio::time::timeout(WRITE_TIMEOUT, cmd.query_async::<()>(&mut conn)).await {
                Ok(Ok(())) => {
                    this.stats.inc(["stored"]);
                }
                Ok(Err(e)) => this.failed("write", &e),
                Err(_) => this.failed("write", &"timed out"),
            }
        });
    }
}
