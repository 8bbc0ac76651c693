//! `hypertool.toml`: read raw (unknown keys refused), then checked into [`Settings`].

use std::net::SocketAddr;

use serde::Deserialize;

use super::alerts::{AlertSettings, RawAlerts};
use super::error::{line_of_offset, ConfigError};
use super::gateway::{GatewaySettings, RawGateway};
use super::secret::{key_from_env, KeyHash};
use super::spans::Spans;

mod raw;
use crate::core::duration::PromDuration;
use raw::*;

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

fn ledger_settings(
    file: &str,
    spans: &Spans,
    raw: &RawLedger,
    errors: &mut Vec<ConfigError>,
) -> LedgerSettings {
    let outage_buffer_events = raw.outage_buffer_events.unwrap_or(100_000);
    if !(1..=10_000_000).contains(&outage_buffer_events) {
        errors.push(
            ConfigError::new(
                file,
                spans.line("ledger.outage_buffer_events"),
                format!("`ledger.outage_buffer_events` = {outage_buffer_events} is out of range"),
            )
            .fix("use from 1 to 10000000 (the default is 100000; each held event takes a few hundred bytes)"),
        );
    }
    let snapshot = raw.snapshot_interval.unwrap_or(PromDuration::secs(300));
    if snapshot.ms() < 1_000 || snapshot.ms() > 86_400_000 {
        errors.push(
            ConfigError::new(
                file,
                spans.line("ledger.snapshot_interval"),
                format!("`ledger.snapshot_interval` = {snapshot} is out of range"),
            )
            .fix("use from 1s to 24h (the default is 5m)"),
        );
    }
    if let Some(days) = raw.retain_days {
        if days < 2 {
            errors.push(
                ConfigError::new(
                    file,
                    spans.line("ledger.retain_days"),
                    format!("`ledger.retain_days` = {days} would remove the events the runbook's investigations read"),
                )
                .fix("use at least 2, or remove the key to keep every event"),
            );
        }
    }
    let from_env = std::env::var("HYPERTOOL_LEDGER_URL")
        .ok()
        .filter(|u| !u.trim().is_empty());
    let url = from_env.clone().or_else(|| raw.url.clone());
    if let Some(u) = &url {
        if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
            // A value from the environment is named as such, not at a line it is not on.
            let (line, what) = match from_env {
                Some(_) => (None, "HYPERTOOL_LEDGER_URL"),
                None => (spans.line("ledger.url"), "`ledger.url`"),
            };
            errors.push(
                ConfigError::new(
                    file,
                    line,
                    format!(
                        "{what} = {:?} is not a PostgreSQL URL",
                        crate::config::secret::redacted(u)
                    ),
                )
                .fix("write postgres://USER@HOST:PORT/DATABASE (the password is better in HYPERTOOL_LEDGER_URL), or remove it for the SQLite ledger in the data directory"),
            );
        }
    }
    let lease = raw.replica_lease.unwrap_or(PromDuration::secs(10));
    if lease.ms() < 2_000 || lease.ms() > 3_600_000 {
        errors.push(
            ConfigError::new(
                file,
                spans.line("ledger.replica_lease"),
                format!("`ledger.replica_lease` = {lease} is out of range"),
            )
            .fix("use from 2s (replicas heartbeat about once a second) to 1h; the default is 10s"),
        );
    }
    LedgerSettings {
        url,
        replica_lease: std::time::Duration::from_millis(lease.ms().clamp(2_000, 3_600_000) as u64),
        sync: raw.sync.unwrap_or_default(),
        on_outage: raw.on_outage.unwrap_or_default(),
        outage_buffer_events: outage_buffer_events.clamp(1, 10_000_000),
        snapshot_interval: std::time::Duration::from_millis(
            snapshot.ms().clamp(1_000, 86_400_000) as u64
        ),
        retain_days: raw.retain_days.map(|d| d.max(2)),
    }
}

/// The API's keys (admin, viewer) and the metrics token, each read from the variable it names.
fn auth_settings(
    file: &str,
    spans: &Spans,
    server: &RawServer,
    errors: &mut Vec<ConfigError>,
) -> AuthSettings {
    let mut auth = AuthSettings::default();
    let mut role_key =
        |key_path: String, key_env: &str, from_file: bool| match key_from_env(key_env) {
            Ok(hash) => Some(RoleKey {
                hash,
                key_env: key_env.to_string(),
            }),
            Err(message) => {
                // The entry naming the variable, or none (the HYPERTOOL_ADMIN_KEY shortcut).
                let (line, fix) = if from_file {
                    (
                        spans.line(&key_path),
                        "export the variable, or remove the entry",
                    )
                } else {
                    (None, "set it to a long random value, or unset it")
                };
                errors.push(
                    ConfigError::new(file, line, format!("`{key_path}`: {message}")).fix(fix),
                );
                None
            }
        };
    for (i, k) in server.admin_keys.iter().enumerate() {
        auth.admin.extend(role_key(
            format!("server.admin_keys[{i}].key_env"),
            &k.key_env,
            true,
        ));
    }
    if std::env::var(ADMIN_KEY_ENV).is_ok_and(|v| !v.is_empty()) {
        auth.admin
            .extend(role_key(ADMIN_KEY_ENV.to_string(), ADMIN_KEY_ENV, false));
    }
    for (i, k) in server.viewer_keys.iter().enumerate() {
        auth.viewer.extend(role_key(
            format!("server.viewer_keys[{i}].key_env"),
            &k.key_env,
            true,
        ));
    }
    if let Some(env) = &server.metrics_bearer_token_env {
        auth.metrics_token = role_key("server.metrics_bearer_token_env".into(), env, true);
    }
    auth
}

/// `[alerts]` and `[gateway]`, each problem at the line of the value it names.
fn alerts_and_gateway(
    file: &str,
    spans: &Spans,
    alerts: RawAlerts,
    gateway: RawGateway,
    listen: SocketAddr,
    errors: &mut Vec<ConfigError>,
) -> (AlertSettings, GatewaySettings) {
    let alerts = match AlertSettings::from_raw(alerts) {
        Ok(mut a) => {
            // Until the listener is bound (`served_at`), the configured address.
            a.served_at(listen);
            a
        }
        Err(problems) => {
            for (key, message) in problems {
                let line = spans.line(&key);
                errors.push(ConfigError::new(file, line, format!("`{key}` {message}")).fix(
                    "see the [alerts] section of config/hypertool.toml for each alert's knobs and defaults",
                ));
            }
            AlertSettings::default()
        }
    };
    // Kept as far as it is valid: workflows naming its models are not reported as well.
    let (gateway, problems) = GatewaySettings::from_raw_lenient(gateway);
    for (key, message) in problems {
        errors.push(
            ConfigError::new(file, spans.line(&key), format!("`{key}`: {message}"))
                .fix("see the [gateway] section of config/hypertool.toml"),
        );
    }
    (alerts, gateway)
}

/// `[switching]` and whether Langfuse is on.
fn switching_and_langfuse(
    file: &str,
    spans: &Spans,
    switching: &RawSwitching,
    enabled: Option<RawLangfuseEnabled>,
    errors: &mut Vec<ConfigError>,
) -> (SwitchingSettings, LangfuseMode) {
    let mut seconds = |key: &str, value: Option<f64>, default_ms: i64| -> i64 {
        match value {
            None => default_ms,
            Some(v) if v.is_finite() && v >= 0.0 => (v * 1000.0).round() as i64,
            Some(v) => {
                errors.push(
                    ConfigError::new(
                        file,
                        spans.line(&format!("switching.{key}")),
                        format!("`switching.{key}` = {v} is not a number of seconds"),
                    )
                    .fix("use 0 or more seconds"),
                );
                default_ms
            }
        }
    };
    let defaults = SwitchingSettings::default();
    let switching = SwitchingSettings {
        cooldown_ms: seconds(
            "cooldown_seconds",
            switching.cooldown_seconds,
            defaults.cooldown_ms,
        ),
        oscillation_window_ms: seconds(
            "oscillation_window_seconds",
            switching.oscillation_window_seconds,
            defaults.oscillation_window_ms,
        ),
        oscillation_action: switching.oscillation_action.unwrap_or_default(),
    };
    let langfuse_mode = match enabled {
        None => LangfuseMode::Auto,
        Some(RawLangfuseEnabled::Flag(true)) => LangfuseMode::On,
        Some(RawLangfuseEnabled::Flag(false)) => LangfuseMode::Off,
        Some(RawLangfuseEnabled::Word(w)) if w == "auto" => LangfuseMode::Auto,
        Some(RawLangfuseEnabled::Word(w)) => {
            errors.push(
                ConfigError::new(
                    file,
                    spans.line("langfuse.enabled"),
                    format!("`langfuse.enabled` = {w:?} is not true, false or \"auto\""),
                )
                .fix("write enabled = \"auto\" (on when both keys are set), true or false"),
            );
            LangfuseMode::Auto
        }
    };
    (switching, langfuse_mode)
}

/// `[server]`'s listeners, limits and timeouts.
struct ServerLimits {
    listen: SocketAddr,
    metrics_listen: SocketAddr,
    max_body_bytes: usize,
    max_connections: usize,
    max_connections_per_client: usize,
    max_tokens_per_event: u64,
    header_timeout: std::time::Duration,
    body_timeout: std::time::Duration,
}

fn server_limits(
    file: &str,
    spans: &Spans,
    server: &mut RawServer,
    errors: &mut Vec<ConfigError>,
) -> ServerLimits {
    let mut addr = |key: &str, value: Option<String>, default: &str| -> SocketAddr {
        let value = value.unwrap_or_else(|| default.to_string());
        match value.parse() {
            Ok(a) => a,
            Err(_) => {
                errors.push(
                    ConfigError::new(
                        file,
                        spans.line(&format!("server.{key}")),
                        format!("`server.{key}` = {value:?} is not a socket address"),
                    )
                    .fix(format!(
                        "write an IP and a port, e.g. {key} = \"{default}\""
                    )),
                );
                default
                    .parse()
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
            }
        }
    };
    let listen = addr("listen", server.listen.take(), "127.0.0.1:8080");
    let metrics_listen = addr(
        "metrics_listen",
        server.metrics_listen.take(),
        "127.0.0.1:9464",
    );
    let max_body_bytes = server.max_body_bytes.unwrap_or(4 * 1024 * 1024);
    if max_body_bytes < 1024 {
        errors.push(
            ConfigError::new(
                file,
                spans.line("server.max_body_bytes"),
                format!("`server.max_body_bytes` = {max_body_bytes} is too small"),
            )
            .fix("use at least 1024 (the default is 4194304)"),
        );
    }
    let max_connections = server.max_connections.unwrap_or(1024);
    if max_connections == 0 {
        errors.push(
            ConfigError::new(
                file,
                spans.line("server.max_connections"),
                "`server.max_connections` = 0 would refuse every client",
            )
            .fix("use at least 1 (the default is 1024)"),
        );
    }
    let max_connections_per_client =
        server
            .max_connections_per_client
            .unwrap_or(if max_connections >= 256 {
                max_connections / 4
            } else {
                max_connections
            });
    if max_connections_per_client == 0 {
        errors.push(
            ConfigError::new(
                file,
                spans.line("server.max_connections_per_client"),
                "`server.max_connections_per_client` = 0 would refuse every client",
            )
            .fix("use at least 1 (the default is a quarter of max_connections from 256 on)"),
        );
    }
    let max_tokens_per_event = server.max_tokens_per_event.unwrap_or(1_000_000_000);
    if max_tokens_per_event == 0 {
        errors.push(
            ConfigError::new(
                file,
                spans.line("server.max_tokens_per_event"),
                "`server.max_tokens_per_event` = 0 would refuse every usage event",
            )
            .fix("use a positive number (the default is 1000000000)"),
        );
    }
    let mut timeout = |key: &str, value: Option<PromDuration>, default_s: i64| {
        let d = value.unwrap_or(PromDuration::secs(default_s));
        if d.ms() < 100 || d.ms() > 3_600_000 {
            errors.push(
                ConfigError::new(
                    file,
                    spans.line(&format!("server.{key}")),
                    format!("`server.{key}` = {d} is out of range"),
                )
                .fix(format!(
                    "use from 100ms to 1h (the default is {default_s}s)"
                )),
            );
        }
        std::time::Duration::from_millis(d.ms().clamp(100, 3_600_000) as u64)
    };
    let header_timeout = timeout("header_timeout", server.header_timeout, 10);
    let body_timeout = timeout("body_timeout", server.body_timeout, 30);
    ServerLimits {
        listen,
        metrics_listen,
        max_body_bytes,
        max_connections,
        max_connections_per_client,
        max_tokens_per_event,
        header_timeout,
        body_timeout,
    }
}

/// Most problems one read of a TOML file reports (each further one costs another parse).
const MAX_TOML_PROBLEMS: usize = 20;

/// `hypertool.toml` as written, with every problem the parser finds: after each one the lines of
/// the value (or the whole table, for a table header) are blanked and the file read again, so
/// that one run reports each problem at its own line. Returns what was read with the text it was
/// read from (the problems' lines blanked: every other line where it was); `None` when nothing
/// could be read.
fn read_raw(
    file: &str,
    text: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<(RawSettings, String)> {
    let mut lines: Vec<&str> = text.lines().collect();
    let mut current = text.to_string();
    for _ in 0..MAX_TOML_PROBLEMS {
        let e = match toml::from_str::<RawSettings>(&current) {
            Ok(raw) => return Some((raw, current)),
            Err(e) => e,
        };
        let span = e.span();
        let first = span.as_ref().map(|s| line_of_offset(&current, s.start));
        // The TOML parser says nothing for some malformed values (`key =` at the end of a line).
        let message = match e.message().trim() {
            "" => {
                "this line is not valid TOML: a value is missing or malformed after `=`".to_string()
            }
            m => m.to_string(),
        };
        errors.push(ConfigError::new(file, first, message).fix(
            "compare with the commented defaults in config/hypertool.toml of the hypertool repository",
        ));
        let (Some(span), Some(first)) = (span, first) else {
            return None;
        };
        let mut last = line_of_offset(&current, span.end.saturating_sub(1)).max(first);
        if lines
            .get(first - 1)
            .is_some_and(|l| l.trim_start().starts_with('['))
        {
            // A table header: its keys go with it (else they would land in the table before).
            while last < lines.len() && !lines[last].trim_start().starts_with('[') {
                last += 1;
            }
        }
        let before = lines.clone();
        for line in lines.iter_mut().take(last).skip(first - 1) {
            *line = "";
        }
        if lines == before {
            return None;
        }
        current = lines.join("\n");
    }
    None
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
mod tests {
    use super::*;

    /// Found by the mutation property test: the TOML parser gives no message for a key with no
    /// value at the end of the file, and the error said only "h.toml:2: ".
    #[test]
    fn a_key_without_its_value_is_an_error_that_says_so() {
        for text in [
            "[server]\nlisten =",
            "[server]\nlisten =\n",
            "[ledger]\nsync = ",
        ] {
            let errs = Settings::parse("h.toml", text).unwrap_err();
            assert_eq!(errs[0].line, Some(2), "{text:?}");
            assert!(!errs[0].message.trim().is_empty(), "{:?}", errs[0]);
        }
        let errs = Settings::parse("h.toml", "[server]\nlisten =").unwrap_err();
        assert!(
            errs[0].message.contains("value is missing"),
            "{:?}",
            errs[0]
        );
    }

    #[test]
    fn a_bad_ledger_url_is_reported_at_the_ledgers_url_line() {
        // (With HYPERTOOL_LEDGER_URL set, that URL is in force and named instead of a line.)
        let text = "[gateway.cache]\nurl = \"redis://127.0.0.1:6379/0\"\n\n[ledger]\nurl = \"mysql://db/h\"\n";
        let errs = Settings::parse("h.toml", text).unwrap_err();
        let bad = errs
            .iter()
            .find(|e| e.message.contains("is not a PostgreSQL URL"))
            .unwrap_or_else(|| panic!("{errs:?}"));
        assert_eq!(bad.line, Some(5), "{bad:?}");
    }

    #[test]
    fn an_alerts_knob_is_reported_at_its_own_tables_line() {
        let text = "[alerts.TokenBudgetExceeded]\nthreshold = 0\nwindow = \"5m\"\n\n[alerts.HypertoolMetricsNotReported]\nthreshold = 1\n\n[alerts.SlowWorkflowStage]\nquantile = 2\n";
        let errs = Settings::parse("h.toml", text).unwrap_err();
        let at = |key: &str| {
            errs.iter()
                .find(|e| e.message.contains(key))
                .and_then(|e| e.line)
        };
        assert_eq!(
            at("alerts.HypertoolMetricsNotReported.threshold"),
            Some(6),
            "{errs:?}"
        );
        assert_eq!(at("alerts.SlowWorkflowStage.quantile"), Some(9), "{errs:?}");
    }

    #[test]
    fn a_key_variable_that_is_not_set_is_named_with_its_line() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\n\n[[server.viewer_keys]]\nkey_env = \"HT_UNIT_TEST_NEVER_SET\"\n";
        let errs = Settings::parse("h.toml", text).unwrap_err();
        let shown = errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(shown.contains("h.toml:5"), "{shown}");
        assert!(shown.contains("server.viewer_keys[0].key_env"), "{shown}");
        assert!(
            shown.contains("$HT_UNIT_TEST_NEVER_SET is not set"),
            "{shown}"
        );
    }

    #[test]
    fn langfuse_enabled_is_auto_true_or_false() {
        let mode = |v: &str| {
            Settings::parse("h.toml", &format!("[langfuse]\nenabled = {v}\n"))
                .map(|s| s.langfuse.enabled)
                .map_err(|e| {
                    e.iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                })
        };
        assert_eq!(
            Settings::parse("h.toml", "").unwrap().langfuse.enabled,
            LangfuseMode::Auto
        );
        assert_eq!(mode("\"auto\""), Ok(LangfuseMode::Auto));
        assert_eq!(mode("true"), Ok(LangfuseMode::On));
        assert_eq!(mode("false"), Ok(LangfuseMode::Off));
        let err = mode("\"maybe\"").unwrap_err();
        assert!(
            err.contains("h.toml:2") && err.contains("\"auto\""),
            "{err}"
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        let s = Settings::parse("hypertool.toml", "").unwrap();
        assert_eq!(s.metrics_listen.port(), 9464);
        assert_eq!(s.listen.port(), 8080);
        assert_eq!(s.max_values_per_label, 50);
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let errs = Settings::parse("h.toml", "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n")
            .unwrap_err();
        assert_eq!(errs[0].line, Some(3));
        assert!(
            errs[0].message.contains("unknown field `lisen`"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn bad_address_names_the_key() {
        let errs = Settings::parse("h.toml", "[server]\nmetrics_listen = \"nope\"\n").unwrap_err();
        assert_eq!(errs[0].line, Some(2));
        assert!(errs[0].to_string().contains("metrics_listen"));
    }

    #[test]
    fn a_bad_upstream_proxy_is_refused_without_echoing_it() {
        let text = "[[gateway.upstreams]]\nname = \"far\"\nbase_url = \"https://api.example.com/v1\"\nproxy = \"socks5://user:s3cret@proxy\"\n";
        let errs = Settings::parse("h.toml", text).unwrap_err();
        let shown = errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(shown.contains("gateway.upstreams[0].proxy"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        let good = text.replace("socks5://user:s3cret@proxy", "http://proxy.internal:3128");
        let s = Settings::parse("h.toml", &good).unwrap();
        let far = &s.gateway.upstreams["far"];
        assert_eq!(far.proxy.as_deref(), Some("http://proxy.internal:3128"));
        assert_eq!(
            far.chat_url.as_ref().map(|u| u.to_string()).as_deref(),
            Some("https://api.example.com/v1/chat/completions")
        );
    }
}
