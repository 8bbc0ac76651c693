//! `hypertool.toml` as written: every section's keys, all optional (`deny_unknown_fields`: a
//! misspelt key is an error at its line). `super` resolves them into [`super::Settings`].

use serde::Deserialize;

use crate::config::alerts::RawAlerts;
use crate::config::gateway::RawGateway;
use crate::config::tracing::RawTracing;
use crate::core::duration::PromDuration;

use super::{LedgerSync, OnOutage, OscillationAction};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) ledger: RawLedger,
    #[serde(default)]
    pub(super) personas: RawPersonas,
    #[serde(default)]
    pub(super) budgets: RawBudgets,
    #[serde(default)]
    pub(super) sessions: RawSessions,
    #[serde(default)]
    pub(super) labels: RawLabels,
    #[serde(default)]
    pub(super) reload: RawReload,
    #[serde(default)]
    pub(super) alerts: RawAlerts,
    #[serde(default)]
    pub(super) langfuse: RawLangfuse,
    #[serde(default)]
    pub(super) tracing: RawTracing,
    #[serde(default)]
    pub(super) gateway: RawGateway,
    #[serde(default)]
    pub(super) workflows: RawWorkflows,
    #[serde(default)]
    pub(super) switching: RawSwitching,
    #[serde(default)]
    pub(super) mcp: RawMcp,
    #[serde(default)]
    pub(super) tls: RawTls,
}

/// `[tls]`: the trust of every outbound client, configured once.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMcp {
    pub(super) servers: Option<String>,
    pub(super) ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkflows {
    pub(super) dir: Option<String>,
    pub(super) chatmodes_file: Option<String>,
    pub(super) prompts_dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSwitching {
    pub(super) cooldown_seconds: Option<f64>,
    pub(super) oscillation_window_seconds: Option<f64>,
    pub(super) oscillation_action: Option<OscillationAction>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLangfuse {
    pub(super) enabled: Option<RawLangfuseEnabled>,
    pub(super) host: Option<String>,
    pub(super) public_key_env: Option<String>,
    pub(super) secret_key_env: Option<String>,
    pub(super) capture_content: Option<bool>,
    #[serde(default)]
    pub(super) redact: Vec<String>,
    pub(super) ca_file: Option<String>,
}

/// `[langfuse] enabled`: `true`, `false` or `"auto"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawLangfuseEnabled {
    Flag(bool),
    Word(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) metrics_listen: Option<String>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) max_inflight_body_bytes: Option<usize>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_connections_per_client: Option<usize>,
    pub(super) max_tokens_per_event: Option<u64>,
    pub(super) header_timeout: Option<PromDuration>,
    pub(super) body_timeout: Option<PromDuration>,
    pub(super) shutdown_grace_seconds: Option<u64>,
    #[serde(default)]
    pub(super) admin_keys: Vec<RawRoleKey>,
    #[serde(default)]
    pub(super) viewer_keys: Vec<RawRoleKey>,
    pub(super) metrics_bearer_token_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoleKey {
    pub(super) key_env: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLedger {
    pub(super) sync: Option<LedgerSync>,
    pub(super) on_outage: Option<OnOutage>,
    pub(super) outage_buffer_events: Option<usize>,
    pub(super) snapshot_interval: Option<PromDuration>,
    pub(super) retain_days: Option<u32>,
    pub(super) url: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) replica_lease: Option<PromDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPersonas {
    pub(super) dir: Option<String>,
    pub(super) alias_prefixes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudgets {
    pub(super) file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSessions {
    pub(super) idle_timeout_seconds: Option<u64>,
    pub(super) max_sessions: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLabels {
    pub(super) max_values_per_label: Option<usize>,
    #[serde(default)]
    pub(super) chatmodes: Vec<String>,
    #[serde(default)]
    pub(super) models: Vec<String>,
    #[serde(default)]
    pub(super) workflows: Vec<String>,
    #[serde(default)]
    pub(super) stages: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    pub(super) interval_ms: Option<u64>,
}
