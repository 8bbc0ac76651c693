//! The response cache (the runbook's `CachePrimitive`): exact match on the normalized request.
//!
//! The key is the canonical JSON of what determines an answer (routed model, messages, tools,
//! sampling parameters) — not who asked or whether it streams — so one persona's answer serves
//! another's identical call. Entries expire by a TTL chosen per persona/chatmode/model (on the
//! injected clock); moka bounds the number of entries. A hit spends no budget.

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
    /// Replaced (emptied) when `gateway.cache.max_entries` changes on reload; the counters stay.
    entries: std::sync::RwLock<moka::sync::Cache<u64, Arc<Entry>>>,
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

impl ResponseCache {
    fn store(&self) -> moka::sync::Cache<u64, Arc<Entry>> {
        // A moka cache is a handle: cloning it shares the same store.
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies a new `max_entries` (hot reload). moka's capacity is fixed, so a different size
    /// starts an empty cache of that size; hit and miss counters carry on.
    pub fn resize(&self, max_entries: u64) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.policy().max_capacity() != Some(max_entries.max(1)) {
            *entries = moka::sync::Cache::new(max_entries.max(1));
            tracing::info!(max_entries, "response cache resized (emptied)");
        }
    }

    pub fn new(max_entries: u64) -> Self {
        ResponseCache {
            shared: None,
            entries: std::sync::RwLock::new(moka::sync::Cache::new(max_entries.max(1))),
            requests: Counter::with_series(
                &families::CACHE_REQUESTS_TOTAL,
                &RESULTS.map(|r| [r.as_str()]),
            ),
            tokens_saved: Total::new(&families::CACHE_TOKENS_SAVED_TOTAL),
        }
    }

    /// The canonical key of a request for `model`, or `None` when it must not be cached.
    pub fn key(
        settings: &CacheSettings,
        model: &str,
        call: &crate::gateway::dialect::CallRequest,
    ) -> Option<String> {
        let request = &call.body;
        if !settings.enabled {
            return None;
        }
        // OpenAI's default temperature is 1: an unspecified temperature is not deterministic.
        let temperature = request
            .get("temperature")
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        if temperature > 0.0 && !settings.cache_nonzero_temperature {
            return None;
        }
        if request
            .get("n")
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 1)
        {
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
        let cache = ResponseCache::new(10);
        cache.insert("k".into(), bytes::Bytes::from_static(b"{}"), 1, 1, i64::MAX);
        cache.count(CacheResult::Hit, 2);
        assert!(cache.get("k", 0).is_some());
        cache.resize(10);
        assert!(cache.get("k", 0).is_some(), "same size: kept");
        cache.resize(20);
        assert!(cache.get("k", 0).is_none(), "new size: emptied");
        assert_eq!(cache.stats().1, 2.0);
    }
}
