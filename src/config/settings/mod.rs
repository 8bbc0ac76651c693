//! `hypertool.toml`: read raw (unknown keys refused), then checked into [`Settings`].

use std::net::SocketAddr;

use serde::Deserialize;

use super::alerts::{AlertSettings, RawAlerts};
use super::error::{line_of_offset, ConfigError};
use super::gateway::{GatewaySettings, RawGateway};
use super::secret::{key_from_env, KeyHash};
use super::spans::Spans;

mod raw;
mod sections;
use crate::core::duration::PromDuration;
use raw::*;
use sections::{
    alerts_and_gateway, auth_settings, ledger_settings, read_raw, server_limits,
    switching_and_langfuse, ServerLimits,
};

/// Each `ca_file` as written (relative to hypertool.toml's directory): `[tls]`'s, shared by every
/// outbound client, and the ones a client's own section sets instead. `config::load` reads them
/// into [`crate::tls::Trust`]s.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustFiles {
    pub shared: Option<String>,
    pub ledger: Option<String>,
    pub cache: Option<String>,
    pub langfuse: Option<String>,
    pub tracing: Option<String>,
    pub alerts: Option<String>,
    pub mcp: Option<String>,
}

impl TrustFiles {
    /// (section, its `ca_file`) of each one set, in file order of the sections.
    pub fn each(&self) -> Vec<(&'static str, &str)> {
        [
            ("tls", &self.shared),
            ("ledger", &self.ledger),
            ("gateway.cache", &self.cache),
            ("langfuse", &self.langfuse),
            ("tracing", &self.tracing),
            ("alerts", &self.alerts),
            ("mcp", &self.mcp),
        ]
        .into_iter()
        .filter_map(|(section, file)| file.as_deref().map(|f| (section, f)))
        .collect()
    }
}

/// The trust of each outbound client: its own `ca_file`'s certificates, else `[tls] ca_file`'s,
/// beside the webpki roots (the upstreams' is `gateway.extra_roots`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustSettings {
    pub shared: crate::tls::Trust,
    pub ledger: crate::tls::Trust,
    pub cache: crate::tls::Trust,
    pub langfuse: crate::tls::Trust,
    pub tracing: crate::tls::Trust,
    pub alerts: crate::tls::Trust,
    pub mcp: crate::tls::Trust,
    /// The configuration's directory: a PostgreSQL URL's `sslrootcert=` is relative to it.
    pub config_dir: Option<std::path::PathBuf>,
}

/// `[mcp]`: the MCP proxy (`hypertool mcp`, `/mcp`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct McpSettings {
    /// The downstream servers' `.mcp.json`, relative to hypertool.toml (`None`: no downstream
    /// servers; hypertool's own tools only).
    pub servers: Option<std::path::PathBuf>,
}

/// What `POST /v1/personas/switch` does when a switch would complete an A→B→A→B oscillation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OscillationAction {
    /// Let the switch happen; count, log and record the oscillation.
    #[default]
    Flag,
    /// Also refuse the switch (the session keeps its persona).
    Suppress,
}

/// `[switching]`: the persona switch policy.
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchingSettings {
    /// Minimum time between two switches of one session; `chatmodes.yml` may set it per chatmode.
    pub cooldown_ms: i64,
    /// A→B→A→B within this window is an oscillation.
    pub oscillation_window_ms: i64,
    pub oscillation_action: OscillationAction,
}

impl Default for SwitchingSettings {
    fn default() -> Self {
        Self {
            cooldown_ms: 5_000,
            oscillation_window_ms: 120_000,
            oscillation_action: OscillationAction::Flag,
        }
    }
}

/// Whether hypertool is to send traces to Langfuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LangfuseMode {
    /// On when both keys are set, off when neither is (the default: a fresh install without
    /// Langfuse has no alert about Langfuse); one key alone is a mistake, reported as such.
    #[default]
    Auto,
    /// On: a missing key is reported, and LangfuseIntegrationFailing names it.
    On,
    /// Off on purpose: LangfuseIntegrationFailing is not evaluated.
    Off,
}

/// Where Langfuse is and which environment variables hold its keys (the keys themselves never
/// appear in configuration files, logs or errors).
#[derive(Debug, Clone)]
pub struct LangfuseSettings {
    /// `[langfuse] enabled`: `"auto"` (default), `true` or `false`.
    pub enabled: LangfuseMode,
    pub host: String,
    pub public_key_env: String,
    pub secret_key_env: String,
    /// Send each generation's prompt and answer (after redaction); default true.
    pub capture_content: bool,
    /// Patterns replaced by `[REDACTED]` before content leaves the process.
    pub redact: Vec<regex::Regex>,
}

impl PartialEq for LangfuseSettings {
    fn eq(&self, other: &Self) -> bool {
        self.enabled == other.enabled
            && self.host == other.host
            && self.public_key_env == other.public_key_env
            && self.secret_key_env == other.secret_key_env
            && self.capture_content == other.capture_content
            && super::tracing::same_patterns(&self.redact, &other.redact)
    }
}

/// The environment variable that adds one admin key without a configuration file.
pub const ADMIN_KEY_ENV: &str = "HYPERTOOL_ADMIN_KEY";

/// A key of the admin or the read-only role: its hash, and the variable it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleKey {
    pub hash: KeyHash,
    pub key_env: String,
}

/// `[server]`'s keys: who may call what (persona keys are `[[gateway.keys]]`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuthSettings {
    /// May do everything.
    pub admin: Vec<RoleKey>,
    /// May read `/api/*`, alerts and the runbook.
    pub viewer: Vec<RoleKey>,
    /// The bearer token the metrics listener asks for (`server.metrics_bearer_token_env`).
    pub metrics_token: Option<RoleKey>,
}

/// How hard the ledger pushes each batch to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LedgerSync {
    /// Survives a crash or kill of the process.
    #[default]
    Normal,
    /// Also survives power loss.
    Full,
}

/// What the gateway and the events API do while the ledger cannot write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnOutage {
    /// Refuse with 503 until the ledger writes again (nothing is acknowledged that is not stored).
    #[default]
    FailClosed,
    /// Keep serving; hold usage in memory (applied to budgets) up to `outage_buffer_events`, and
    /// write it when the ledger returns. Past the bound, fail closed.
    Buffer,
}

/// `[ledger]`: durability, outages, snapshots and retention.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerSettings {
    pub sync: LedgerSync,
    pub on_outage: OnOutage,
    /// Most events held in memory during an outage (both policies hold the accounting of calls
    /// already answered; `buffer` holds everything).
    pub outage_buffer_events: usize,
    /// How often the core's state is snapshotted (also at shutdown); start-up replays only what came after.
    pub snapshot_interval: std::time::Duration,
    /// Raw events older than this are removed once a snapshot covers them; `None` keeps them all.
    pub retain_days: Option<u32>,
    /// A PostgreSQL ledger shared by several replicas (`[ledger] url` or `HYPERTOOL_LEDGER_URL`,
    /// which wins); `None`: the SQLite file in the data directory. May hold a password: never shown.
    pub url: Option<String>,
    /// On a shared ledger: a replica whose heartbeat is older than this is dead, and the calls
    /// it had in flight stop holding budget.
    pub replica_lease: std::time::Duration,
}

/// The validated `hypertool.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Bytes of request bodies over 64 KiB held at once across every connection; past them new
    /// large bodies are answered 503 with `Retry-After` (small ones always pass).
    pub max_inflight_body_bytes: usize,
    /// Connections the API listener holds open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Connections one client address may hold open at once; more are closed at accept.
    pub max_connections_per_client: usize,
    /// Tokens one reported event (or one gateway call's estimate) may claim; more is refused.
    pub max_tokens_per_event: u64,
    /// How long a client may take to send a request head (and how long a connection may idle).
    pub header_timeout: std::time::Duration,
    /// How long a client may take to send a request body.
    pub body_timeout: std::time::Duration,
    pub auth: AuthSettings,
    pub shutdown_grace_seconds: u64,
    pub ledger: LedgerSettings,
    pub personas_dir: String,
    pub alias_prefixes: Vec<String>,
    pub budgets_file: String,
    pub session_idle_timeout_seconds: u64,
    pub max_sessions: usize,
    pub max_values_per_label: usize,
    pub chatmodes: Vec<String>,
    pub models: Vec<String>,
    pub workflows: Vec<String>,
    pub stages: Vec<String>,
    pub reload_interval_ms: u64,
    pub alerts: AlertSettings,
    pub langfuse: LangfuseSettings,
    /// `[tracing]`: the OTLP exporter (OpenTelemetry collector) and the exporter's bounds.
    pub tracing: super::tracing::TracingSettings,
    pub gateway: GatewaySettings,
    /// Directory of workflow files (`*.yml`), relative to hypertool.toml.
    pub workflows_dir: String,
    /// Chatmode → workflow and switch cooldown, relative to hypertool.toml.
    pub chatmodes_file: String,
    /// Prompt files stage variants name (`prompts/<file>`), relative to hypertool.toml.
    pub prompts_dir: String,
    pub switching: SwitchingSettings,
    pub mcp: McpSettings,
    /// Each `ca_file` as written.
    pub trust_files: TrustFiles,
    /// Their certificates, per client (filled by `config::load`).
    pub trust: TrustSettings,
}

impl Settings {
    /// Reads and checks `hypertool.toml`; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Settings, Vec<ConfigError>> {
        let (settings, errors) = Settings::parse_lenient(file, text);
        if errors.is_empty() {
            Ok(settings)
        } else {
            Err(errors)
        }
    }

    /// Every problem of `hypertool.toml`, and the settings as far as they could be read (defaults
    /// in place of what is wrong), so that the other files can be checked against them too.
    pub fn parse_lenient(file: &str, text: &str) -> (Settings, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let (raw, read) = read_raw(file, text, &mut errors).unwrap_or_default();
        let settings = Settings::checked(file, &read, raw, &mut errors);
        (settings, errors)
    }

    /// Resolves the raw settings, pushing each problem to `errors` and using the default instead.
    fn checked(
        file: &str,
        text: &str,
        raw: RawSettings,
        errors: &mut Vec<ConfigError>,
    ) -> Settings {
        let mut raw = raw;
        let spans = Spans::toml(text);
        let trust_files = TrustFiles {
            shared: raw.tls.ca_file.take(),
            ledger: raw.ledger.ca_file.take(),
            cache: raw.gateway.cache.ca_file.take(),
            langfuse: raw.langfuse.ca_file.take(),
            tracing: raw.tracing.ca_file.take(),
            alerts: raw.alerts.ca_file.take(),
            mcp: raw.mcp.ca_file.take(),
        };
        let ServerLimits {
            listen,
            metrics_listen,
            max_body_bytes,
            max_inflight_body_bytes,
            max_connections,
            max_connections_per_client,
            max_tokens_per_event,
            header_timeout,
            body_timeout,
        } = server_limits(file, &spans, &mut raw.server, errors);
        let ledger = ledger_settings(file, &spans, &raw.ledger, errors);
        let auth = auth_settings(file, &spans, &raw.server, errors);
        let max_values_per_label = raw.labels.max_values_per_label.unwrap_or(50);
        if max_values_per_label == 0 {
            errors.push(
                ConfigError::new(
                    file,
                    spans.line("labels.max_values_per_label"),
                    "`labels.max_values_per_label` must be at least 1",
                )
                .fix("use a positive number (the default is 50)"),
            );
        }
        let reload_interval_ms = raw.reload.interval_ms.unwrap_or(500);
        if !(50..=60_000).contains(&reload_interval_ms) {
            errors.push(
                ConfigError::new(
                    file,
                    spans.line("reload.interval_ms"),
                    format!("`reload.interval_ms` = {reload_interval_ms} is out of range"),
                )
                .fix("use a value from 50 to 60000 (the default is 500)"),
            );
        }
        let (alerts, gateway) =
            alerts_and_gateway(file, &spans, raw.alerts, raw.gateway, listen, errors);
        let (switching, langfuse_mode) = switching_and_langfuse(
            file,
            &spans,
            &raw.switching,
            raw.langfuse.enabled.take(),
            errors,
        );
        let tracing = raw.tracing.validate(file, &spans, errors);
        let langfuse_redact = super::tracing::compile_redactions(
            file,
            &spans,
            "langfuse",
            &raw.langfuse.redact,
            errors,
        );
        Settings {
            trust_files,
            trust: TrustSettings::default(),
            mcp: McpSettings {
                servers: raw.mcp.servers.map(std::path::PathBuf::from),
            },
            tracing,
            workflows_dir: raw.workflows.dir.unwrap_or_else(|| "workflows".into()),
            prompts_dir: raw
                .workflows
                .prompts_dir
                .unwrap_or_else(|| "prompts".into()),
            chatmodes_file: raw
                .workflows
                .chatmodes_file
                .unwrap_or_else(|| "chatmodes.yml".into()),
            switching,
            gateway,
            alerts,
            langfuse: LangfuseSettings {
                enabled: langfuse_mode,
                // The environment wins, as in Langfuse's own clients.
                host: std::env::var("LANGFUSE_HOST")
                    .ok()
                    .filter(|h| !h.trim().is_empty())
                    .or(raw.langfuse.host)
                    .unwrap_or_else(|| "https://cloud.langfuse.com".into()),
                public_key_env: raw
                    .langfuse
                    .public_key_env
                    .unwrap_or_else(|| "LANGFUSE_PUBLIC_KEY".into()),
                secret_key_env: raw
                    .langfuse
                    .secret_key_env
                    .unwrap_or_else(|| "LANGFUSE_SECRET_KEY".into()),
                capture_content: raw.langfuse.capture_content.unwrap_or(true),
                redact: langfuse_redact,
            },
            listen,
            metrics_listen,
            max_body_bytes,
            max_inflight_body_bytes,
            max_connections,
            max_connections_per_client,
            max_tokens_per_event,
            header_timeout,
            body_timeout,
            auth,
            shutdown_grace_seconds: raw.server.shutdown_grace_seconds.unwrap_or(10),
            ledger,
            personas_dir: raw.personas.dir.unwrap_or_else(|| "personas".into()),
            alias_prefixes: raw
                .personas
                .alias_prefixes
                .unwrap_or_else(|| vec!["tta-".into()]),
            budgets_file: raw.budgets.file.unwrap_or_else(|| "budgets.yml".into()),
            session_idle_timeout_seconds: raw.sessions.idle_timeout_seconds.unwrap_or(1800),
            max_sessions: raw.sessions.max_sessions.unwrap_or(100_000).max(1),
            max_values_per_label,
            chatmodes: raw.labels.chatmodes,
            models: raw.labels.models,
            workflows: raw.labels.workflows,
            stages: raw.labels.stages,
            reload_interval_ms,
        }
    }
}

#[cfg(test)]
mod tests;
