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
pub mod faults;
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

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use serde_json::Value;

use crate::config::gateway::{GatewaySettings, ModelRoute};
use crate::core::engine::Engine;
use crate::core::event::GateResult;
use crate::core::workflow::{GateVerdict, Workflows};
use crate::telemetry::families;
use crate::telemetry::registry::{Counter, Registry};
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
    /// `hypertool_events_rejected_total{reason}`: the gateway counts usage the ledger could not
    /// store as `ledger_unavailable`, beside the events API's rejections.
    pub rejected: Counter<1>,
    /// `hypertool_internal_errors_total` (the door's): call tasks that panicked count there too.
    pub internal_errors: crate::telemetry::registry::Total,
}

/// The gateway's own counters (its families in `telemetry::families`).
pub struct GatewayMetrics {
    /// `hypertool_gateway_requests_total{upstream,outcome}`; upstreams come from configuration.
    requests: Counter<2>,
    /// Tools removed because the persona may not use them (configured personas only: bounded).
    tools_removed: Counter<1>,
    /// Calls with tokens but no price, by model (configured models only: bounded).
    unpriced: Counter<1>,
    /// Prompts cut and tokens removed per (workflow, stage).
    truncations: Counter<2>,
    tokens_truncated: Counter<2>,
    /// Usage of answered calls (or admissions) the ledger could not store.
    lost: Counter<1>,
}

impl GatewayMetrics {
    fn new(rejected: Counter<1>) -> GatewayMetrics {
        GatewayMetrics {
            requests: Counter::new(&families::GATEWAY_REQUESTS_TOTAL),
            tools_removed: Counter::new(&families::GATEWAY_TOOLS_REMOVED_TOTAL),
            unpriced: Counter::new(&families::GATEWAY_UNPRICED_CALLS_TOTAL),
            truncations: Counter::new(&families::PROMPT_TRUNCATIONS_TOTAL),
            tokens_truncated: Counter::new(&families::PROMPT_TOKENS_TRUNCATED_TOTAL),
            lost: rejected,
        }
    }
}

/// The gateway: its configuration (hot-reloaded), HTTP client, cache, limits and counters, and
/// what it shares with the server.
pub struct Gateway {
    /// The engine, the writer, the clock, the tasks, the tracer: the server's, as handed over.
    pub shared: Shared,
    metrics: GatewayMetrics,
    settings: RwLock<Arc<GatewaySettings>>,
    workflows: RwLock<Arc<Workflows>>,
    http: client::UpstreamClient,
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
            metrics: GatewayMetrics::new(shared.rejected.clone()),
            workflows: RwLock::new(Arc::new(workflows)),
            cache: {
                let mut cache =
                    cache::ResponseCache::new(settings.cache.max_entries, settings.cache.max_bytes);
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
            shared,
            warnings: WarnThrottle::default(),
        }
    }

    /// Hands the gateway's counters (its own, the rate limits', the caches') to the exposition.
    pub fn register_metrics(&self, registry: &Registry) {
        let m = &self.metrics;
        registry.register(m.requests.clone());
        registry.register(m.tools_removed.clone());
        registry.register(m.unpriced.clone());
        registry.register(m.truncations.clone());
        registry.register(m.tokens_truncated.clone());
        registry.register(self.limits.refused.clone());
        self.cache.register_metrics(registry);
    }

    /// Usage (or an admission) the ledger could not store: `events_rejected{ledger_unavailable}`.
    fn count_lost(&self, n: u64) {
        self.metrics.lost.add(["ledger_unavailable"], n);
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
        self.cache
            .resize(settings.cache.max_entries, settings.cache.max_bytes);
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
        self.metrics.truncations.inc([workflow, stage]);
        self.metrics.tokens_truncated.add(
            [workflow, stage],
            t.tokens_before.saturating_sub(t.tokens_after),
        );
    }

    fn count_tools(&self, persona: &str, n: u64) {
        // Bounded: only personas of the registry reach this (others have no allowedTools).
        self.metrics.tools_removed.add([persona], n);
    }

    /// A call that spent tokens on a model with no price (the built-in mock is free, not
    /// unpriced).
    fn count_unpriced(&self, route: &ModelRoute) {
        if route.prices.is_some() || route.upstream == crate::config::gateway::MOCK_UPSTREAM {
            return;
        }
        self.metrics.unpriced.inc([&route.name]);
    }

    fn count(&self, upstream: &str, outcome: &'static str) {
        self.metrics.requests.inc([upstream, outcome]);
    }

    /// A call task that panicked: `hypertool_internal_errors_total`, and the call's outcome.
    fn count_internal_error(&self, upstream: &str) {
        self.shared.internal_errors.add(1);
        self.count(upstream, "internal_error");
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

    /// Who the call is for, on the model it is routed to now (a fallback or a downgrade moves it).
    fn attribution(&self) -> crate::core::event::Attribution {
        crate::core::event::Attribution {
            persona: self.persona.clone(),
            chatmode: self.chatmode.clone(),
            model: self.route.name.clone(),
            workflow: self.workflow.clone(),
            stage: self.stage.clone(),
            session: self.session.clone(),
            run: self.run(),
        }
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
