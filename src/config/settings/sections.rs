//! Each section of `hypertool.toml` resolved from its raw form, every problem pushed with the line
//! of its value (`Spans`), defaults in place of what is wrong; and the read that finds every
//! parse problem in one pass.

use super::*;

pub(super) fn ledger_settings(
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
pub(super) fn auth_settings(
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
pub(super) fn alerts_and_gateway(
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
pub(super) fn switching_and_langfuse(
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

/// `server.max_inflight_body_bytes` by default: 256 MiB of request bodies held at once.
pub const DEFAULT_INFLIGHT_BODY_BYTES: usize = 256 * 1024 * 1024;

/// `[server]`'s listeners, limits and timeouts.
pub(super) struct ServerLimits {
    pub(super) listen: SocketAddr,
    pub(super) metrics_listen: SocketAddr,
    pub(super) max_body_bytes: usize,
    pub(super) max_inflight_body_bytes: usize,
    pub(super) max_connections: usize,
    pub(super) max_connections_per_client: usize,
    pub(super) max_tokens_per_event: u64,
    pub(super) header_timeout: std::time::Duration,
    pub(super) body_timeout: std::time::Duration,
}

pub(super) fn server_limits(
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
    let max_inflight_body_bytes = server
        .max_inflight_body_bytes
        .unwrap_or(DEFAULT_INFLIGHT_BODY_BYTES);
    if max_inflight_body_bytes < max_body_bytes {
        errors.push(
            ConfigError::new(
                file,
                spans.line("server.max_inflight_body_bytes"),
                format!(
                    "`server.max_inflight_body_bytes` = {max_inflight_body_bytes} is smaller than \
                     `server.max_body_bytes` = {max_body_bytes}: a body of the largest size would never be read"
                ),
            )
            .fix(format!(
                "use at least {max_body_bytes} (the default is {DEFAULT_INFLIGHT_BODY_BYTES}, 64 bodies of the default largest size)"
            )),
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
        max_inflight_body_bytes,
        max_connections,
        max_connections_per_client,
        max_tokens_per_event,
        header_timeout,
        body_timeout,
    }
}

/// Most problems one read of a TOML file reports (each further one costs another parse).
pub(super) const MAX_TOML_PROBLEMS: usize = 20;

/// `hypertool.toml` as written, with every problem the parser finds: after each one the lines of
/// the value (or the whole table, for a table header) are blanked and the file read again, so
/// that one run reports each problem at its own line. Returns what was read with the text it was
/// read from (the problems' lines blanked: every other line where it was); `None` when nothing
/// could be read.
pub(super) fn read_raw(
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
