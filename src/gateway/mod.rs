//! The OpenAI-compatible gateway: `POST /v1/chat/completions` (plain and SSE streaming),
//! `POST /v1/embeddings` and `GET /v1/models` in front of any OpenAI-compatible upstream, every call
//! attributed to a persona.
//!
//! The door (`web::auth`) has decided who calls before a handler runs. A chat call then goes
//! (`handlers::chat_completions`): `request` (model and headers checked) → `stage` (which workflow
//! stage and run) → `core::policy` (the stage's model, attribution, tool scope) → cache lookup →
//! `admission` (rates, an in-flight slot, `Engine::admit_call`: the persona's and the run stage's
//! budgets reserved at once) → `dispatch` or `relay` (the `Provider`, retries, fallbacks, the quality
//! gate) → `accounting` (usage to the ledger writer with the reservations it settles). The upstream
//! call and its accounting run in a task of their own, so a client that goes away never leaves a call
//! unaccounted.

mod accounting;
mod admission;
pub mod cache;
pub mod client;
pub mod dialect;
mod dispatch;
mod handlers;
pub mod provider;
pub mod ratelimit;
mod relay;
pub mod request;
pub mod shared_cache;
pub mod sse;
pub mod stage;
pub mod tokens;
pub mod trace;
pub mod upstream;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use serde_json::Value;

use crate::config::gateway::{GatewaySettings, ModelRoute};
use crate::core::engine::Engine;
use crate::core::event::GateResult;
use crate::core::workflow::{GateVerdict, Workflows};
use crate::web::error::ApiError;

use dialect::Dialect;
use request::header;
use upstream::UpstreamError;

pub use handlers::{chat_completions, count_tokens, embeddings, list_models, messages, responses};

/// What every gateway handler and call task holds: one pointer (a clone is one increment).
pub type GatewayState = Arc<Gateway>;

/// What the gateway shares with the rest of the server, handed over at start-up so that the
/// gateway never reaches up into `server`.
pub struct Shared {
    pub engine: Arc<Mutex<Engine>>,
    pub writer: crate::store::writer::WriterHandle,
    pub clock: Arc<dyn crate::core::clock::Clock>,
    /// Work that must finish before the ledger closes (call tasks, stream relays).
    pub tasks: tokio_util::task::TaskTracker,
    pub max_body_bytes: usize,
    pub tracer: crate::telemetry::trace::Tracer,
}

/// The gateway: its configuration (hot-reloaded), HTTP client, cache, limits and counters, and
/// what it shares with the server.
pub struct Gateway {
    pub engine: Arc<Mutex<Engine>>,
    pub writer: crate::store::writer::WriterHandle,
    pub clock: Arc<dyn crate::core::clock::Clock>,
    pub tasks: tokio_util::task::TaskTracker,
    pub max_body_bytes: usize,
    /// Spans of calls and their upstream attempts.
    pub tracer: crate::telemetry::trace::Tracer,
    /// Answered calls whose usage the ledger could not store.
    ledger_failures: std::sync::atomic::AtomicU64,
    settings: RwLock<Arc<GatewaySettings>>,
    workflows: RwLock<Arc<Workflows>>,
    http: client::UpstreamClient,
    outcomes: Mutex<BTreeMap<String, BTreeMap<&'static str, u64>>>,
    tools_removed: Mutex<BTreeMap<String, u64>>,
    /// Calls with tokens but no price, by model (configured models only: bounded).
    unpriced: Mutex<BTreeMap<String, u64>>,
    /// (workflow, stage) → (prompts cut, tokens removed)
    truncations: Mutex<BTreeMap<(String, String), (u64, u64)>>,
    pub cache: cache::ResponseCache,
    /// Requests and tokens per minute per key and per persona.
    pub limits: ratelimit::RateLimiters,
    /// Bounds calls in flight to upstreams (`gateway.max_in_flight`, fixed at start-up).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Calls waiting for an in-flight slot (at most `max_in_flight`; more are refused at once).
    waiting: std::sync::atomic::AtomicUsize,
    /// Upstream failures are logged once per model and kind every few seconds, not per call.
    warnings: WarnThrottle,
}

/// How often the same kind of upstream failure of the same model is logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Lets a repeated warning through once per [`WARN_EVERY`] per (model, kind), saying how many like
/// it were held back since: an upstream outage at 1,000 calls/s must not write 1,000 log lines a
/// second (the metrics count every failure). Keys are configured models and static kinds: bounded.
#[derive(Default)]
struct WarnThrottle {
    /// (model, kind) → (when last logged, how many held back since)
    last: Mutex<std::collections::HashMap<WarningKey, (Instant, u64)>>,
}

type WarningKey = (String, &'static str);

impl WarnThrottle {
    /// `Some(held back since the last one)` when this warning should be logged now.
    fn admit(&self, model: &str, kind: &'static str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(&(model.to_string(), kind)) {
            Some((at, held)) if now.duration_since(*at) < WARN_EVERY => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let since = std::mem::take(held);
                *at = now;
                Some(since)
            }
            None => {
                last.insert((model.to_string(), kind), (now, 0));
                Some(0)
            }
        }
    }
}

impl Gateway {
    pub fn new(settings: GatewaySettings, workflows: Workflows, shared: Shared) -> Self {
        Gateway {
            limits: ratelimit::RateLimiters::new(shared.clock.clone()),
            engine: shared.engine,
            writer: shared.writer,
            clock: shared.clock,
            tasks: shared.tasks,
            max_body_bytes: shared.max_body_bytes,
            tracer: shared.tracer,
            ledger_failures: std::sync::atomic::AtomicU64::new(0),
            workflows: RwLock::new(Arc::new(workflows)),
            cache: {
                let mut cache = cache::ResponseCache::new(settings.cache.max_entries);
                cache.shared = settings.cache.url.as_deref().and_then(|url| {
                    shared_cache::SharedCache::open(url, &settings.cache.trust)
                        .map(std::sync::Arc::new)
                        .map_err(|e| tracing::error!("the shared response cache is off: {e}"))
                        .ok()
                });
                cache
            },
            in_flight: Arc::new(tokio::sync::Semaphore::new(settings.max_in_flight)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            http: client::UpstreamClient::new(&settings.extra_roots),
            settings: RwLock::new(Arc::new(settings)),
            outcomes: Mutex::new(BTreeMap::new()),
            warnings: WarnThrottle::default(),
            tools_removed: Mutex::new(BTreeMap::new()),
            unpriced: Mutex::new(BTreeMap::new()),
            truncations: Mutex::new(BTreeMap::new()),
        }
    }

    /// Answered calls whose usage could not be stored (counted with the events API's rejections
    /// as `ledger_unavailable`).
    pub fn ledger_failures(&self) -> u64 {
        self.ledger_failures.load(Ordering::Relaxed)
    }

    pub fn settings(&self) -> Arc<GatewaySettings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn reconfigure(&self, settings: GatewaySettings, workflows: Workflows) {
        if settings.extra_roots != self.settings().extra_roots {
            tracing::warn!(
                "gateway.ca_file changed; its certificates are trusted from the next restart"
            );
        }
        self.cache.resize(settings.cache.max_entries);
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
        *self.workflows.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(workflows);
    }

    /// Workflows and chatmodes (hot-reloaded with the rest of the configuration).
    pub fn workflows(&self) -> Arc<Workflows> {
        self.workflows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn count_truncation(&self, workflow: &str, stage: &str, t: &tokens::Truncation) {
        let mut map = self.truncations.lock().unwrap_or_else(|p| p.into_inner());
        let slot = map
            .entry((workflow.to_string(), stage.to_string()))
            .or_insert((0, 0));
        slot.0 += 1;
        slot.1 += t.tokens_before.saturating_sub(t.tokens_after);
    }

    /// ((workflow, stage), prompts cut, tokens removed)
    pub fn truncations(&self) -> Vec<((String, String), f64, f64)> {
        self.truncations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, (n, t))| (k.clone(), *n as f64, *t as f64))
            .collect()
    }

    fn count_tools(&self, persona: &str, n: u64) {
        let mut m = self.tools_removed.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: only personas of the registry reach this (others have no allowedTools).
        *m.entry(persona.to_string()).or_insert(0) += n;
    }

    pub fn tools_removed(&self) -> Vec<(String, f64)> {
        self.tools_removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, n)| (p.clone(), *n as f64))
            .collect()
    }

    /// A call that spent tokens on a model with no price (the built-in mock is free, not
    /// unpriced).
    fn count_unpriced(&self, route: &ModelRoute) {
        if route.prices.is_some() || route.upstream == crate::config::gateway::MOCK_UPSTREAM {
            return;
        }
        let mut m = self.unpriced.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(route.name.clone()).or_insert(0) += 1;
    }

    /// `hypertool_gateway_unpriced_calls_total{model}`.
    pub fn unpriced(&self) -> Vec<(String, f64)> {
        self.unpriced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(m, n)| (m.clone(), *n as f64))
            .collect()
    }

    fn count(&self, upstream: &str, outcome: &'static str) {
        let mut m = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        // Look up by &str first: the common case allocates nothing.
        match m.get_mut(upstream) {
            Some(by_outcome) => *by_outcome.entry(outcome).or_insert(0) += 1,
            None => {
                m.entry(upstream.to_string())
                    .or_default()
                    .insert(outcome, 1);
            }
        }
    }

    /// `hypertool_gateway_requests_total{upstream,outcome}`; upstream names come from configuration.
    pub fn outcomes(&self) -> Vec<((String, String), f64)> {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flat_map(|(u, by)| {
                by.iter()
                    .map(move |(o, n)| ((u.clone(), o.to_string()), *n as f64))
            })
            .collect()
    }
}

/// Who a call is for and what it asked.
#[derive(Clone)]
struct CallMeta {
    /// The dialect the client speaks (its route, its answers' shape).
    dialect: Dialect,
    persona: String,
    chatmode: String,
    workflow: Option<String>,
    stage: Option<String>,
    session: Option<String>,
    route: Arc<ModelRoute>,
    /// Prompt tokens as admission estimated them (tiktoken when a budget enforces, else rough).
    prompt_estimate: u64,
    /// The configured workflow stage the call is for, if any.
    stage_call: Option<Arc<stage::StageCall>>,
    /// Where the call's spans go (`None` when nothing takes spans).
    trace: Option<trace::CallTrace>,
    /// The admission record (`Event::CallAdmitted`) the usage of the current attempt settles.
    call_id: Option<String>,
    /// The prompt's digest, for the ledger (repeated prompts: the runbook's "inefficient caching").
    prompt_hash: Option<String>,
}

impl CallMeta {
    fn run(&self) -> Option<String> {
        self.stage_call.as_ref().and_then(|c| c.run.clone())
    }

    /// The stage variant the call uses, if its stage has variants.
    fn variant(&self) -> Option<&crate::core::workflow::Variant> {
        self.stage_call.as_ref().and_then(|c| c.variant.as_ref())
    }
}

impl CallMeta {
    /// Attribution from the `X-Hypertool-*` headers.
    fn new(
        settings: &GatewaySettings,
        headers: &HeaderMap,
        persona: String,
        route: Arc<ModelRoute>,
        prompt_estimate: u64,
    ) -> Self {
        CallMeta {
            dialect: Dialect::Chat,
            persona,
            chatmode: header(headers, "x-hypertool-chatmode")
                .unwrap_or_else(|| settings.default_chatmode.clone()),
            workflow: header(headers, "x-hypertool-workflow"),
            stage: header(headers, "x-hypertool-stage"),
            session: header(headers, "x-hypertool-session"),
            route,
            prompt_estimate,
            stage_call: None,
            trace: None,
            call_id: None,
            prompt_hash: None,
        }
    }
}

#[cfg(test)]
mod warn_throttle_tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_logged_once_per_window_with_the_count_held_back() {
        let t = WarnThrottle::default();
        let t0 = Instant::now();
        assert_eq!(t.admit("gpt", "upstream_timeout", t0), Some(0));
        assert_eq!(
            t.admit("gpt", "upstream_timeout", t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            t.admit("gpt", "upstream_timeout", t0 + Duration::from_secs(9)),
            None
        );
        // Another model or kind has its own window.
        assert_eq!(
            t.admit("gpt", "upstream_error", t0 + Duration::from_secs(9)),
            Some(0)
        );
        assert_eq!(
            t.admit("mini", "upstream_timeout", t0 + Duration::from_secs(9)),
            Some(0)
        );
        assert_eq!(t.admit("gpt", "upstream_timeout", t0 + WARN_EVERY), Some(2));
        assert_eq!(t.admit("gpt", "upstream_timeout", t0 + WARN_EVERY), None);
    }
}
