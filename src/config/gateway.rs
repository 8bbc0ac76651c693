//! `[gateway]` in hypertool.toml: upstreams, model routes, prices, virtual keys, the built-in mock.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::secret::{key_from_env, KeyHash};
use crate::core::duration::PromDuration;
use crate::core::workflow::{ModelChoice, ModelTier};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    unattributed_persona: Option<String>,
    default_chatmode: Option<String>,
    max_in_flight: Option<usize>,
    #[serde(default)]
    mock: RawMock,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    keys: Vec<RawKey>,
    /// Per persona: the model its calls go to once a `downgrade` budget is spent.
    #[serde(default)]
    downgrade: BTreeMap<String, String>,
    tool_policy: Option<ToolPolicy>,
    /// The coding agents' own tools, which tool scope leaves alone (default: Claude Code's and
    /// Codex's built-ins).
    agent_tools: Option<Vec<String>>,
    #[serde(default)]
    pub(super) cache: RawCache,
    /// The model behind each stage tier (fast, balanced, quality).
    #[serde(default)]
    tiers: BTreeMap<ModelTier, String>,
    /// PEM file of extra CA certificates trusted for upstream TLS (a private CA).
    ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    enabled: Option<bool>,
    ttl: Option<PromDuration>,
    max_entries: Option<u64>,
    max_bytes: Option<u64>,
    cache_nonzero_temperature: Option<bool>,
    #[serde(default)]
    ttl_overrides: Vec<RawTtl>,
    url: Option<String>,
    pub(super) ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTtl {
    persona: Option<String>,
    chatmode: Option<String>,
    model: Option<String>,
    ttl: PromDuration,
}

pub use crate::core::policy::ToolPolicy;

/// The response cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_entries: u64,
    /// The bytes the entries may hold together (each its request's canonical text and the
    /// answer): a cache of 10,000 large prompts must not take gigabytes.
    pub max_bytes: u64,
    pub cache_nonzero_temperature: bool,
    pub ttl_overrides: Vec<TtlOverride>,
    /// Redis shared by the replicas (`url` or `HYPERTOOL_CACHE_URL`, which wins); read at start.
    pub url: Option<String>,
    /// Trust for a `rediss://` URL (`[gateway.cache] ca_file`, else `[tls] ca_file`; set by
    /// `config::load`).
    pub trust: crate::tls::Trust,
}

/// A TTL for calls matching every field given.
#[derive(Debug, Clone, PartialEq)]
pub struct TtlOverride {
    pub persona: Option<String>,
    pub chatmode: Option<String>,
    pub model: Option<String>,
    pub ttl: Duration,
}

impl CacheSettings {
    /// The most specific matching override's TTL, else the default.
    pub fn ttl_for(&self, persona: &str, chatmode: &str, model: &str) -> Duration {
        let matches = |o: &TtlOverride| {
            o.persona.as_deref().is_none_or(|p| p == persona)
                && o.chatmode.as_deref().is_none_or(|c| c == chatmode)
                && o.model.as_deref().is_none_or(|m| m == model)
        };
        let specificity = |o: &TtlOverride| {
            o.persona.is_some() as u8 + o.chatmode.is_some() as u8 + o.model.is_some() as u8
        };
        self.ttl_overrides
            .iter()
            .filter(|o| matches(o))
            .max_by_key(|o| specificity(o))
            .map(|o| o.ttl)
            .unwrap_or(self.ttl)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMock {
    latency_ms: Option<u64>,
    completion_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    #[serde(default)]
    kind: UpstreamKind,
    base_url: String,
    api_key_env: Option<String>,
    timeout: Option<PromDuration>,
    proxy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    upstream: String,
    upstream_model: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    timeout: Option<PromDuration>,
    prompt_usd_per_1k: Option<f64>,
    completion_usd_per_1k: Option<f64>,
    /// Prompt tokens read from the provider's prompt cache (default: the prompt price).
    cache_read_usd_per_1k: Option<f64>,
    /// Prompt tokens written to it (default: the prompt price).
    cache_write_usd_per_1k: Option<f64>,
    /// Models to try, in order, when this one fails after its retries.
    #[serde(default)]
    fallbacks: Vec<String>,
    /// Retries of a non-streamed call on 429, 5xx and connection errors.
    retries: Option<u32>,
    /// The cheaper model for `downgrade` budgets.
    downgrade_to: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    key_env: String,
    persona: String,
    #[serde(default)]
    models: Vec<String>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
}

/// The name of the built-in upstream (`gateway::provider::Provider::Mock`).
pub const MOCK_UPSTREAM: &str = "mock";

/// The built-in upstream for models named `mock/*`.
#[derive(Debug, Clone, PartialEq)]
pub struct MockSettings {
    pub latency: Duration,
    pub completion_tokens: u64,
}

/// The built-in tools of the coding agents hypertool governs — Claude Code's (`Bash`, `Edit`, …)
/// and Codex's (`exec_command`, `apply_patch`, …; its hosted `web_search` by type) — which a
/// persona's `allowedTools` (a list of MCP servers' tools) does not scope: removing them would
/// leave the agent unable to work. `gateway.agent_tools` replaces the list.
pub const DEFAULT_AGENT_TOOLS: [&str; 44] = [
    // Claude Code
    "Agent",
    "Task",
    "Bash",
    "BashOutput",
    "KillShell",
    "Edit",
    "MultiEdit",
    "Write",
    "Read",
    "Glob",
    "Grep",
    "LS",
    "NotebookEdit",
    "NotebookRead",
    "WebFetch",
    "WebSearch",
    "TodoWrite",
    "ExitPlanMode",
    "Skill",
    "SlashCommand",
    "ToolSearch",
    "ListAgents",
    "ReportFindings",
    "ScheduleWakeup",
    "Workflow",
    "DeferredToolPlaceholder",
    // Codex
    "shell",
    "local_shell",
    "exec_command",
    "write_stdin",
    "apply_patch",
    "update_plan",
    "view_image",
    "request_user_input",
    "get_goal",
    "create_goal",
    "update_goal",
    "multi_agent_v1",
    "web_search",
    "web_search_preview",
    "list_mcp_resources",
    "list_mcp_resource_templates",
    "read_mcp_resource",
    "image_generation",
];

/// The API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// OpenAI Chat Completions (`{base_url}/chat/completions`): OpenAI, vLLM, Ollama, LiteLLM, …
    #[default]
    Openai,
    /// Anthropic Messages (`{base_url}/v1/messages`, `x-api-key`, `anthropic-version`).
    Anthropic,
}

/// An upstream. Its key is read from `api_key_env` at call time and never stored in
/// configuration, logs or errors.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub name: String,
    pub kind: UpstreamKind,
    pub base_url: String,
    pub api_key_env: Option<String>,
    pub timeout: Duration,
    /// `{base_url}/chat/completions` and `{base_url}/embeddings`, parsed once here rather than on
    /// every call (URL parsing showed in the gateway's profile). Always set in a loaded
    /// configuration (a base URL that does not parse is refused).
    pub chat_url: Option<http::Uri>,
    pub embeddings_url: Option<http::Uri>,
    /// An Anthropic upstream's `…/v1/messages` and `…/v1/messages/count_tokens` (the base URL
    /// may end in `/v1` or not).
    pub messages_url: Option<http::Uri>,
    pub count_tokens_url: Option<http::Uri>,
    /// An HTTP(S) proxy for this upstream only (may carry credentials: never logged). Without
    /// it, the environment's `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` decide.
    pub proxy: Option<String>,
}

/// USD per 1,000 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Prices {
    pub prompt_per_1k: f64,
    pub completion_per_1k: f64,
    /// Cached prompt tokens read and written, when priced apart from the prompt.
    pub cache_read_per_1k: Option<f64>,
    pub cache_write_per_1k: Option<f64>,
}

impl Prices {
    pub fn cost(&self, prompt: u64, completion: u64) -> f64 {
        (prompt as f64 * self.prompt_per_1k + completion as f64 * self.completion_per_1k) / 1000.0
    }

    /// The cost of `prompt` tokens of which `cache_read` were read from and `cache_write` written
    /// to the provider's prompt cache, each kind at its price, and `completion` tokens.
    pub fn cost_with_cache(
        &self,
        prompt: u64,
        cache_read: u64,
        cache_write: u64,
        completion: u64,
    ) -> f64 {
        let uncached = prompt.saturating_sub(cache_read.saturating_add(cache_write));
        (uncached as f64 * self.prompt_per_1k
            + cache_read as f64 * self.cache_read_per_1k.unwrap_or(self.prompt_per_1k)
            + cache_write as f64 * self.cache_write_per_1k.unwrap_or(self.prompt_per_1k)
            + completion as f64 * self.completion_per_1k)
            / 1000.0
    }
}

/// A model clients may ask for, and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRoute {
    pub name: String,
    pub aliases: Vec<String>,
    pub upstream: String,
    pub upstream_model: String,
    pub timeout: Option<Duration>,
    pub prices: Option<Prices>,
    pub fallbacks: Vec<String>,
    pub retries: u32,
    pub downgrade_to: Option<String>,
}

/// A persona key (`[[gateway.keys]]`): bound to one persona (and optionally to models). Only the
/// key's hash is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualKey {
    pub hash: KeyHash,
    /// The variable the key was read from: how logs and errors name the key.
    pub key_env: String,
    pub persona: String,
    pub models: Vec<String>,
    pub limits: RateLimits,
}

/// Request and token rates a key (or a persona, in `budgets.yml`) may not exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimits {
    pub requests_per_minute: Option<std::num::NonZeroU32>,
    pub tokens_per_minute: Option<std::num::NonZeroU32>,
}

impl RateLimits {
    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySettings {
    /// Calls admitted to upstreams at once; more wait up to 100 ms, then get 503 (bounds memory and
    /// upstream connections under overload).
    pub max_in_flight: usize,
    pub unattributed_persona: String,
    pub default_chatmode: String,
    pub mock: MockSettings,
    pub upstreams: BTreeMap<String, UpstreamSettings>,
    /// Shared, so a call holds its route without copying it.
    pub models: Vec<std::sync::Arc<ModelRoute>>,
    pub keys: Vec<VirtualKey>,
    pub persona_downgrade: BTreeMap<String, String>,
    pub tool_policy: ToolPolicy,
    /// Tools that are the agent's own (its shell, its editor), not MCP tools: a persona's
    /// `allowedTools` does not scope them.
    pub agent_tools: Vec<String>,
    pub cache: CacheSettings,
    /// Which model each stage tier means (`[gateway.tiers]`).
    pub tiers: BTreeMap<ModelTier, String>,
    /// `ca_file` as written (relative to the configuration file's directory).
    pub ca_file: Option<String>,
    /// Its certificates, trusted for upstream TLS beside the webpki roots (read by `config::load`).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            max_in_flight: 512,
            unattributed_persona: "unattributed".into(),
            default_chatmode: "default".into(),
            mock: MockSettings {
                latency: Duration::ZERO,
                completion_tokens: 16,
            },
            upstreams: BTreeMap::new(),
            models: Vec::new(),
            keys: Vec::new(),
            persona_downgrade: BTreeMap::new(),
            tool_policy: ToolPolicy::Filter,
            agent_tools: DEFAULT_AGENT_TOOLS.iter().map(|t| t.to_string()).collect(),
            cache: CacheSettings {
                enabled: true,
                ttl: Duration::from_secs(300),
                max_entries: 10_000,
                max_bytes: 256 * 1024 * 1024,
                cache_nonzero_temperature: false,
                ttl_overrides: Vec::new(),
                url: None,
                trust: crate::tls::Trust::default(),
            },
            tiers: [
                (ModelTier::Fast, "mock/fast".to_string()),
                (ModelTier::Balanced, "mock/balanced".to_string()),
                (ModelTier::Quality, "mock/quality".to_string()),
            ]
            .into_iter()
            .collect(),
            ca_file: None,
            extra_roots: Vec::new(),
        }
    }
}

impl GatewaySettings {
    /// Resolves `[gateway]`; errors are `(key path, message)`.
    pub fn from_raw(raw: RawGateway) -> Result<GatewaySettings, Vec<(String, String)>> {
        let (settings, errors) = GatewaySettings::from_raw_lenient(raw);
        if errors.is_empty() {
            Ok(settings)
        } else {
            Err(errors)
        }
    }

    /// The settings as far as they are valid (every model stays routed, so that the workflows
    /// naming it are not also reported), and each problem by its key.
    pub fn from_raw_lenient(raw: RawGateway) -> (GatewaySettings, Vec<(String, String)>) {
        let mut errors = Vec::new();
        let mut s = GatewaySettings::default();
        if let Some(p) = raw.unattributed_persona {
            s.unattributed_persona = p;
        }
        if let Some(c) = raw.default_chatmode {
            s.default_chatmode = c;
        }
        if let Some(n) = raw.max_in_flight {
            if n == 0 {
                errors.push((
                    "gateway.max_in_flight".into(),
                    "must be at least 1 (the default is 512)".into(),
                ));
            } else {
                s.max_in_flight = n;
            }
        }
        if let Some(ms) = raw.mock.latency_ms {
            s.mock.latency = Duration::from_millis(ms);
        }
        if let Some(n) = raw.mock.completion_tokens {
            s.mock.completion_tokens = n;
        }
        let c = raw.cache;
        if let Some(v) = c.enabled {
            s.cache.enabled = v;
        }
        if let Some(t) = c.ttl {
            s.cache.ttl = Duration::from_millis(t.0.max(0) as u64);
        }
        if let Some(n) = c.max_entries {
            s.cache.max_entries = n;
        }
        if let Some(n) = c.max_bytes {
            if n < 1024 * 1024 {
                errors.push((
                    "gateway.cache.max_bytes".into(),
                    format!("= {n} is under 1 MiB (1048576); the default is 268435456 (256 MiB)"),
                ));
            } else {
                s.cache.max_bytes = n;
            }
        }
        if let Some(v) = c.cache_nonzero_temperature {
            s.cache.cache_nonzero_temperature = v;
        }
        s.cache.url = std::env::var("HYPERTOOL_CACHE_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .or(c.url);
        if let Some(u) = &s.cache.url {
            if !(u.starts_with("redis://")
                || u.starts_with("rediss://")
                || u.starts_with("unix://"))
            {
                errors.push((
                    "gateway.cache.url".into(),
                    "must be a Redis URL, e.g. redis://127.0.0.1:6379/0".into(),
                ));
            }
        }
        s.cache.ttl_overrides = c
            .ttl_overrides
            .into_iter()
            .map(|o| TtlOverride {
                persona: o.persona,
                chatmode: o.chatmode,
                model: o.model,
                ttl: Duration::from_millis(o.ttl.0.max(0) as u64),
            })
            .collect();
        s.add_upstreams(raw.upstreams, &mut errors);
        let names = s.add_models(raw.models, &mut errors);
        for (persona, target) in &raw.downgrade {
            if !names.contains_key(target) && !target.starts_with("mock/") {
                errors.push((
                    format!("gateway.downgrade.{}", super::spans::key(persona)),
                    format!("`{target}` is not a configured model"),
                ));
            }
        }
        s.persona_downgrade = raw.downgrade;
        if let Some(p) = raw.tool_policy {
            s.tool_policy = p;
        }
        if let Some(tools) = raw.agent_tools {
            s.agent_tools = tools;
        }
        s.add_keys(raw.keys, &mut errors);
        s.ca_file = raw.ca_file;
        for (tier, model) in raw.tiers {
            s.tiers.insert(tier, model);
        }
        for (tier, model) in &s.tiers {
            if s.route(model).is_none() {
                errors.push((
                    format!("gateway.tiers.{}", tier.as_str()),
                    format!("`{model}` is not a model in [[gateway.models]] (nor mock/*)"),
                ));
            }
        }
        (s, errors)
    }

    /// `[[gateway.upstreams]]`: each base URL, key variable, proxy and timeout checked.
    fn add_upstreams(&mut self, raw: Vec<RawUpstream>, errors: &mut Vec<(String, String)>) {
        for (i, u) in raw.into_iter().enumerate() {
            let key = format!("gateway.upstreams[{i}]");
            if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
                errors.push((
                    format!("{key}.base_url"),
                    "must be an http:// or https:// URL, e.g. https://api.openai.com/v1".into(),
                ));
            }
            if u.name == MOCK_UPSTREAM {
                errors.push((
                    format!("{key}.name"),
                    "`mock` is the built-in upstream; choose another name".into(),
                ));
            }
            let timeout = u
                .timeout
                .map(|t| Duration::from_millis(t.0.max(1) as u64))
                .unwrap_or(Duration::from_secs(120));
            if self.upstreams.contains_key(&u.name) {
                errors.push((
                    format!("{key}.name"),
                    format!("upstream `{}` is defined twice", u.name),
                ));
            }
            let base_url = u.base_url.trim_end_matches('/').to_string();
            let endpoint = |path: &str| {
                format!("{base_url}/{path}")
                    .parse::<http::Uri>()
                    .ok()
                    .filter(|u| u.host().is_some())
            };
            let (chat_url, embeddings_url) = (endpoint("chat/completions"), endpoint("embeddings"));
            let v1 = if base_url.ends_with("/v1") { "" } else { "v1/" };
            let (messages_url, count_tokens_url) = match u.kind {
                UpstreamKind::Anthropic => (
                    endpoint(&format!("{v1}messages")),
                    endpoint(&format!("{v1}messages/count_tokens")),
                ),
                UpstreamKind::Openai => (None, None),
            };
            if chat_url.is_none() {
                errors.push((
                    format!("{key}.base_url"),
                    format!("`{base_url}` is not a valid URL"),
                ));
            }
            let proxy_ok = |p: &str| {
                (p.starts_with("http://") || p.starts_with("https://"))
                    && p.parse::<http::Uri>().is_ok_and(|u| u.host().is_some())
            };
            // The value itself is not echoed: a proxy URL may carry credentials.
            if u.proxy.as_deref().is_some_and(|p| !proxy_ok(p)) {
                errors.push((
                    format!("{key}.proxy"),
                    "must be an http:// or https:// URL with a host, e.g. http://proxy.internal:3128".into(),
                ));
            }
            self.upstreams.insert(
                u.name.clone(),
                UpstreamSettings {
                    name: u.name,
                    kind: u.kind,
                    base_url,
                    api_key_env: u.api_key_env,
                    timeout,
                    chat_url,
                    embeddings_url,
                    messages_url,
                    count_tokens_url,
                    proxy: u.proxy,
                },
            );
        }
    }

    /// `[[gateway.models]]`: each route, its prices, and the models its fallbacks and
    /// `downgrade_to` name. Returns every name and alias with the model it belongs to.
    fn add_models(
        &mut self,
        raw: Vec<RawModel>,
        errors: &mut Vec<(String, String)>,
    ) -> BTreeMap<String, String> {
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        for (i, m) in raw.into_iter().enumerate() {
            let key = format!("gateway.models[{i}]");
            if m.upstream != MOCK_UPSTREAM && !self.upstreams.contains_key(&m.upstream) {
                let known: Vec<&str> = self.upstreams.keys().map(String::as_str).collect();
                errors.push((
                    format!("{key}.upstream"),
                    format!(
                        "`{}` is not a configured upstream; define it in [[gateway.upstreams]] (known: {}) or use `mock`",
                        m.upstream,
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                ));
            }
            for n in std::iter::once(&m.name).chain(m.aliases.iter()) {
                if let Some(prev) = names.insert(n.clone(), m.name.clone()) {
                    errors.push((
                        format!("{key}.name"),
                        format!("model name `{n}` is already used by model `{prev}`"),
                    ));
                }
            }
            let (cache_read, cache_write) = (m.cache_read_usd_per_1k, m.cache_write_usd_per_1k);
            let prices = match (m.prompt_usd_per_1k, m.completion_usd_per_1k) {
                (None, None) => {
                    if cache_read.is_some() || cache_write.is_some() {
                        errors.push((
                            format!("{key}.cache_read_usd_per_1k"),
                            "cache prices need the model's prompt_usd_per_1k and completion_usd_per_1k too".into(),
                        ));
                    }
                    None
                }
                (p, c) => {
                    let p = p.unwrap_or(0.0);
                    let c = c.unwrap_or(0.0);
                    let valid = |x: f64| x.is_finite() && x >= 0.0;
                    if !(valid(p)
                        && valid(c)
                        && cache_read.is_none_or(valid)
                        && cache_write.is_none_or(valid))
                    {
                        errors.push((
                            format!("{key}.prompt_usd_per_1k"),
                            "prices must be non-negative numbers".into(),
                        ));
                    }
                    Some(Prices {
                        prompt_per_1k: p,
                        completion_per_1k: c,
                        cache_read_per_1k: cache_read,
                        cache_write_per_1k: cache_write,
                    })
                }
            };
            self.models.push(std::sync::Arc::new(ModelRoute {
                upstream_model: m.upstream_model.unwrap_or_else(|| m.name.clone()),
                name: m.name,
                aliases: m.aliases,
                upstream: m.upstream,
                timeout: m.timeout.map(|t| Duration::from_millis(t.0.max(1) as u64)),
                prices,
                fallbacks: m.fallbacks,
                retries: m.retries.unwrap_or(2),
                downgrade_to: m.downgrade_to,
            }));
        }
        for (i, m) in self.models.iter().enumerate() {
            // Each target at its own key: `fallbacks[j]` or `downgrade_to`.
            let targets = m
                .fallbacks
                .iter()
                .enumerate()
                .map(|(j, t)| (format!("gateway.models[{i}].fallbacks[{j}]"), t))
                .chain(
                    m.downgrade_to
                        .iter()
                        .map(|t| (format!("gateway.models[{i}].downgrade_to"), t)),
                );
            for (key, target) in targets {
                if !names.contains_key(target) && !target.starts_with("mock/") {
                    errors.push((
                        key,
                        format!(
                            "`{target}` (named by model `{}`) is not a configured model",
                            m.name
                        ),
                    ));
                }
            }
        }
        names
    }

    /// `[[gateway.keys]]`: each key read from its variable, with its persona and limits.
    fn add_keys(&mut self, raw: Vec<RawKey>, errors: &mut Vec<(String, String)>) {
        for (i, k) in raw.into_iter().enumerate() {
            let key = format!("gateway.keys[{i}]");
            let limits = RateLimits {
                requests_per_minute: k.requests_per_minute.and_then(std::num::NonZeroU32::new),
                tokens_per_minute: k.tokens_per_minute.and_then(std::num::NonZeroU32::new),
            };
            if k.requests_per_minute == Some(0) || k.tokens_per_minute == Some(0) {
                errors.push((
                    format!("{key}.requests_per_minute"),
                    "a rate limit of 0 would refuse every call; remove it for no limit".into(),
                ));
            }
            match key_from_env(&k.key_env) {
                Ok(hash) => self.keys.push(VirtualKey {
                    hash,
                    key_env: k.key_env,
                    persona: k.persona,
                    models: k.models,
                    limits,
                }),
                Err(message) => errors.push((format!("{key}.key_env"), message)),
            }
        }
    }

    /// The model a stage's `model`/`escalation_model` names.
    pub fn resolve_choice(&self, choice: &ModelChoice) -> Option<std::sync::Arc<ModelRoute>> {
        match choice {
            ModelChoice::Tier(t) => self.tiers.get(t).and_then(|m| self.route(m)),
            ModelChoice::Model(m) => self.route(m),
        }
    }

    /// The route for a requested model name or alias. `mock/*` goes to the built-in mock unless a
    /// route of that name exists.
    pub fn route(&self, requested: &str) -> Option<std::sync::Arc<ModelRoute>> {
        if let Some(r) = self
            .models
            .iter()
            .find(|m| m.name == requested || m.aliases.iter().any(|a| a == requested))
        {
            return Some(r.clone());
        }
        requested
            .strip_prefix("mock/")
            .filter(|rest| !rest.is_empty())
            .map(|_| {
                std::sync::Arc::new(ModelRoute {
                    name: requested.to_string(),
                    aliases: Vec::new(),
                    upstream: MOCK_UPSTREAM.into(),
                    upstream_model: requested.to_string(),
                    timeout: None,
                    prices: None,
                    fallbacks: Vec::new(),
                    retries: 0,
                    downgrade_to: None,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::Prices;

    #[test]
    fn cached_prompt_tokens_are_priced_at_their_own_rates() {
        // Anthropic's Sonnet prices per 1k: input 0.003, output 0.015, cache read 10 % of
        // input, cache write 125 %.
        let sonnet = Prices {
            prompt_per_1k: 0.003,
            completion_per_1k: 0.015,
            cache_read_per_1k: Some(0.0003),
            cache_write_per_1k: Some(0.00375),
        };
        // 10,000 prompt tokens of which 8,000 read and 1,000 written; 500 completion tokens.
        let cost = sonnet.cost_with_cache(10_000, 8_000, 1_000, 500);
        let expected =
            (1_000.0 * 0.003 + 8_000.0 * 0.0003 + 1_000.0 * 0.00375 + 500.0 * 0.015) / 1000.0;
        assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
        // Nothing cached: the plain cost.
        assert_eq!(
            sonnet.cost_with_cache(10_000, 0, 0, 500),
            sonnet.cost(10_000, 500)
        );
        // Cache prices not set: cached tokens cost what prompt tokens cost.
        let plain = Prices {
            cache_read_per_1k: None,
            cache_write_per_1k: None,
            ..sonnet
        };
        assert_eq!(
            plain.cost_with_cache(10_000, 8_000, 1_000, 500),
            plain.cost(10_000, 500)
        );
        // Cache counts beyond the prompt (a provider's inconsistency) never make the uncached
        // part negative.
        let over = sonnet.cost_with_cache(100, 80, 40, 0);
        assert!((over - (80.0 * 0.0003 + 40.0 * 0.00375) / 1000.0).abs() < 1e-12);
    }
}
