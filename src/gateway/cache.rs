//! The response cache (the runbook's `CachePrimitive`): exact match on the normalized request.
//!
//! The key is the canonical JSON of what determines an answer (routed model, messages, tools,
//! sampling parameters) — not who asked or whether it streams — so one persona's answer serves
//! another's identical call. Entries expire by a TTL chosen per persona/chatmode/model (on the
//! injected clock); moka bounds the entries by number and by bytes at once (see [`weight`]). A
//! hit spends no budget.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::gateway::CacheSettings;
use crate::core::clock::UnixMillis;
use crate::telemetry::families;
use crate::telemetry::registry::{Counter, Registry, Total};

/// The request fields that decide the answer (in either dialect: Messages' own are at the end).
const KEY_FIELDS: [&str; 28] = [
    "messages",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "temperature",
    "top_p",
    "n",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "parallel_tool_calls",
    "system",
    "stop_sequences",
    "top_k",
    "thinking",
    "output_format",
    "input",
    "instructions",
    "max_output_tokens",
    "reasoning",
    "text",
];

#[derive(Debug)]
pub struct Entry {
    canonical: String,
    /// The upstream's answer, as it came.
    pub response: bytes::Bytes,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    expires_at: UnixMillis,
}

/// Why a call was or was not answered from the cache (the `X-Hypertool-Cache` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    /// `Cache-Control: no-cache` from the client.
    Bypass,
    /// Not cacheable (temperature > 0, n > 1, cache disabled).
    Skip,
}

/// Every result, in the order the exposition lists them.
pub const RESULTS: [CacheResult; 4] = [
    CacheResult::Hit,
    CacheResult::Miss,
    CacheResult::Bypass,
    CacheResult::Skip,
];

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Bypass => "bypass",
            CacheResult::Skip => "skip",
        }
    }
}

pub struct ResponseCache {
    /// Redis shared by the replicas, behind the local cache.
    pub shared: Option<Arc<super::shared_cache::SharedCache>>,
    /// Replaced (emptied) when `gateway.cache.max_entries` or `max_bytes` changes on reload; the
    /// counters stay.
    entries: std::sync::RwLock<moka::sync::Cache<u64, Arc<Entry>>>,
    /// The (max_entries, max_bytes) the store was built for.
    bounds: std::sync::Mutex<(u64, u64)>,
    /// `hypertool_cache_requests_total{result}` and `hypertool_cache_tokens_saved_total`.
    requests: Counter<1>,
    tokens_saved: Total,
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// What an entry weighs against the store's capacity of `max_bytes`: its bytes, but never less
/// than an even share (`max_bytes / max_entries`), so the store holds at most `max_entries`
/// entries and at most `max_bytes` bytes, whichever binds first.
fn weight(entry: &Entry, share: u64) -> u32 {
    let bytes = (entry.canonical.len() + entry.response.len()) as u64;
    u32::try_from(bytes.max(share)).unwrap_or(u32::MAX)
}

fn bounded_store(max_entries: u64, max_bytes: u64) -> moka::sync::Cache<u64, Arc<Entry>> {
    let max_bytes = max_bytes.max(1);
    let share = (max_bytes / max_entries.max(1)).max(1);
    moka::sync::Cache::builder()
        .max_capacity(max_bytes)
        .weigher(move |_, entry: &Arc<Entry>| weight(entry, share))
        .build()
}

impl ResponseCache {
    fn store(&self) -> moka::sync::Cache<u64, Arc<Entry>> {
        // A moka cache is a handle: cloning it shares the same store.
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies new bounds (hot reload). moka's capacity is fixed, so different bounds start an
    /// empty cache; hit and miss counters carry on.
    pub fn resize(&self, max_entries: u64, max_bytes: u64) {
        let mut bounds = self.bounds.lock().unwrap_or_else(|p| p.into_inner());
        if *bounds != (max_entries, max_bytes) {
            *self.entries.write().unwrap_or_else(|p| p.into_inner()) =
                bounded_store(max_entries, max_bytes);
            *bounds = (max_entries, max_bytes);
            tracing::info!(max_entries, max_bytes, "response cache resized (emptied)");
        }
    }

    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        ResponseCache {
            shared: None,
            entries: std::sync::RwLock::new(bounded_store(max_entries, max_bytes)),
            bounds: std::sync::Mutex::new((max_entries, max_bytes)),
            requests: Counter::with_series(
                &families::CACHE_REQUESTS_TOTAL,
                &RESULTS.map(|r| [r.as_str()]),
            ),
            tokens_saved: Total::new(&families::CACHE_TOKENS_SAVED_TOTAL),
        }
    }

    /// Whether a request may be answered from the cache at all (cheap: no key is written).
    pub fn cacheable(
        settings: &CacheSettings,
        call: &crate::gateway::dialect::CallRequest,
    ) -> bool {
        let request = &call.body;
        // OpenAI's default temperature is 1: an unspecified temperature is not deterministic.
        let temperature = request
            .get("temperature")
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        let one_choice = request
            .get("n")
            .and_then(Value::as_u64)
            .is_none_or(|n| n <= 1);
        settings.enabled && one_choice && (temperature <= 0.0 || settings.cache_nonzero_temperature)
    }

    /// The canonical key of a request for `model`, or `None` when it must not be cached.
    pub fn key(
        settings: &CacheSettings,
        model: &str,
        call: &crate::gateway::dialect::CallRequest,
    ) -> Option<String> {
        let request = &call.body;
        if !Self::cacheable(settings, call) {
            return None;
        }
        let mut key = Map::new();
        key.insert("model".into(), Value::String(model.to_string()));
        // An answer is stored in its client's dialect: a chat key stays as it always was.
        if call.dialect != crate::gateway::dialect::Dialect::Chat {
            key.insert(
                "dialect".into(),
                Value::String(call.dialect.as_str().to_string()),
            );
        }
        for field in KEY_FIELDS {
            if let Some(v) = request.get(field) {
                key.insert(field.into(), v.clone());
            }
        }
        // serde_json's Map is ordered by key, so this text is canonical.
        Some(Value::Object(key).to_string())
    }

    /// The local cache, then the shared one (a hit there is kept locally for what Redis has left
    /// of its time).
    pub async fn lookup(&self, canonical: &str, now: UnixMillis) -> Option<Arc<Entry>> {
        if let Some(entry) = self.get(canonical, now) {
            return Some(entry);
        }
        let shared = self.shared.as_ref()?;
        let found = shared.get(canonical).await?;
        let entry = Arc::new(Entry {
            canonical: canonical.to_string(),
            response: found.response,
            prompt_tokens: found.prompt_tokens,
            completion_tokens: found.completion_tokens,
            // PTTL is negative for a key without expiry (never set so by hypertool): a minute.
            expires_at: now
                + if found.ttl_ms > 0 {
                    found.ttl_ms
                } else {
                    60_000
                },
        });
        self.store().insert(hash(canonical), entry.clone());
        Some(entry)
    }

    pub fn get(&self, canonical: &str, now: UnixMillis) -> Option<Arc<Entry>> {
        let id = hash(canonical);
        let entries = self.store();
        let entry = entries.get(&id)?;
        if entry.canonical != canonical {
            return None;
        }
        if entry.expires_at <= now {
            entries.invalidate(&id);
            return None;
        }
        Some(entry)
    }

    pub fn insert(
        &self,
        canonical: String,
        response: bytes::Bytes,
        prompt: u64,
        completion: u64,
        expires_at: UnixMillis,
    ) {
        let id = hash(&canonical);
        self.store().insert(
            id,
            Arc::new(Entry {
                canonical,
                response,
                prompt_tokens: prompt,
                completion_tokens: completion,
                expires_at,
            }),
        );
    }

    /// Offers an answer to the other replicas (when a shared cache is configured).
    pub fn share(
        &self,
        canonical: &str,
        response: &bytes::Bytes,
        prompt: u64,
        completion: u64,
        ttl: std::time::Duration,
    ) {
        if let Some(shared) = &self.shared {
            shared.put(canonical, response, prompt, completion, ttl);
        }
    }

    pub fn count(&self, result: CacheResult, tokens_saved: u64) {
        self.requests.inc([result.as_str()]);
        self.tokens_saved.add(tokens_saved);
    }

    /// Lookups per result (in [`RESULTS`] order) and the tokens hits saved, for the dashboard.
    pub fn stats(&self) -> (Vec<(&'static str, f64)>, f64) {
        (
            RESULTS
                .iter()
                .map(|r| (r.as_str(), self.requests.get([r.as_str()]) as f64))
                .collect(),
            self.tokens_saved.get() as f64,
        )
    }

    /// Hands the cache's counters (and the shared cache's, when there is one) to the exposition.
    pub fn register_metrics(&self, registry: &Registry) {
        registry.register(self.requests.clone());
        registry.register(self.tokens_saved.clone());
        if let Some(shared) = &self.shared {
            registry.register(shared.stats.clone());
        }
    }
}

#[cfg(test)]
mod resize_tests {
    use super::*;

    #[test]
    fn a_new_size_empties_the_cache_and_keeps_the_counters() {
        let cache = ResponseCache::new(10, 1 << 20);
        cache.insert("k".into(), bytes::Bytes::from_static(b"{}"), 1, 1, i64::MAX);
        cache.count(CacheResult::Hit, 2);
        assert!(cache.get("k", 0).is_some());
        cache.resize(10, 1 << 20);
        assert!(cache.get("k", 0).is_some(), "same size: kept");
        cache.resize(20, 1 << 20);
        assert!(cache.get("k", 0).is_none(), "new size: emptied");
        assert_eq!(cache.stats().1, 2.0);
    }

    #[test]
    fn entries_are_bounded_by_number_and_by_bytes() {
        // 100 entries or 1 MiB, whichever binds first.
        let cache = ResponseCache::new(100, 1 << 20);
        let store = cache.store();
        for i in 0..1000 {
            cache.insert(
                format!("small-{i}"),
                bytes::Bytes::from_static(b"{}"),
                1,
                1,
                i64::MAX,
            );
        }
        store.run_pending_tasks();
        assert!(
            store.entry_count() <= 100,
            "{} entries",
            store.entry_count()
        );
        // Large prompts: 64 KiB each, so at most 16 fit in 1 MiB.
        let cache = ResponseCache::new(100, 1 << 20);
        let store = cache.store();
        for i in 0..200 {
            cache.insert(
                format!("{i}{}", "p".repeat(64 << 10)),
                bytes::Bytes::from_static(b"{}"),
                1,
                1,
                i64::MAX,
            );
        }
        store.run_pending_tasks();
        assert!(store.entry_count() <= 16, "{} entries", store.entry_count());
        assert!(
            store.weighted_size() <= 1 << 20,
            "{} bytes",
            store.weighted_size()
        );
    }
}
