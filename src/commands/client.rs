//! The commands that talk to a running server's API: budgets, personas, alerts, gates,
//! experiments, the audit log.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

use hypertool::cli::{
    alerts_table, budgets_table, experiment_table, experiments_table, gates_table, personas_table,
    suggestions_table, Client,
};
use hypertool::config::{self, Source};
use hypertool::core::budget::{BudgetMode, Period};

#[derive(Args, Clone)]
pub(crate) struct ClientArgs {
    /// The running server.
    #[arg(
        long,
        env = "HYPERTOOL_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub(crate) server: String,
    /// The environment variable holding the key to send (an admin or viewer key; a persona key
    /// reads only its own budget).
    #[arg(long, default_value = "HYPERTOOL_API_KEY")]
    pub(crate) api_key_env: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum GatesCommand {
    /// Quality-gate verdicts from the ledger: failure rates by stage, the failed criteria, and the
    /// verdicts (newest last).
    History {
        /// Only this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only this stage.
        #[arg(long)]
        stage: Option<String>,
        /// From: a duration back from now (30m, 1h, 7d), an RFC 3339 time, or Unix milliseconds
        /// (default 1d).
        #[arg(long)]
        since: Option<String>,
        /// Until (same forms as --since; default now).
        #[arg(long)]
        until: Option<String>,
        /// Only verdicts with this result: pass or fail.
        #[arg(long)]
        result: Option<String>,
        /// At most this many verdicts, the newest (1 to 10000; default 500).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum ExperimentsCommand {
    /// Every experiment, with its evidence and decision.
    List(ClientArgs),
    /// One experiment.
    Show {
        /// The workflow.
        workflow: String,
        /// The stage with variants.
        stage: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Leave a stage on one variant: rewrites its workflow file (comments kept), checked before
    /// it replaces the file; the server applies it at its next reload, and records the change.
    Promote {
        /// The workflow.
        workflow: String,
        /// The stage with variants.
        stage: String,
        /// The variant to keep.
        variant: String,
        /// hypertool.toml (default: ./config/hypertool.toml).
        #[arg(long, env = "HYPERTOOL_CONFIG")]
        config: Option<PathBuf>,
        /// Ask this running server to promote (with an admin key): its configuration is rewritten
        /// and the audit log names the key. Without it the file is rewritten here.
        #[arg(long)]
        server: Option<String>,
        /// The environment variable holding the admin key (with --server).
        #[arg(long, default_value = "HYPERTOOL_API_KEY")]
        api_key_env: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum PersonasCommand {
    /// List personas with their budgets.
    List(ClientArgs),
}

#[derive(Subcommand)]
pub(crate) enum BudgetCommand {
    /// Show budgets (all, or one persona's).
    Status {
        /// A persona (name or alias); all personas when omitted.
        persona: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Override a persona's budget at runtime (kept across restarts until `budget unset`).
    Set {
        /// The persona (name or alias) whose budget to override.
        persona: String,
        /// Tokens (prompt + completion) allowed per period; a whole number ≥ 0.
        #[arg(long)]
        tokens: u64,
        /// Also limit cost per period, in US dollars (e.g. 12.5); no cost limit when omitted.
        #[arg(long)]
        cost_usd: Option<f64>,
        /// The budget's period: hourly, daily, weekly, monthly or none (never resets); the
        /// configured period when omitted.
        #[arg(long, value_parser = parse_period)]
        period: Option<Period>,
        /// What happens when it is spent: observe (count and alert only), block (the gateway refuses
        /// with 429) or downgrade (the gateway uses the model's `downgrade_to`); the configured mode
        /// when omitted.
        #[arg(long, value_parser = parse_mode)]
        mode: Option<BudgetMode>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a runtime override: the configured budget applies again.
    Unset {
        /// The persona (name or alias) whose override to remove.
        persona: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Suggest budgets from the ledger's history: the p95 of daily usage per persona plus 20 %,
    /// beside the current budget; --apply writes them to budgets.yml (reloaded within seconds).
    Suggest {
        /// Look at the last N days (1 to 366; default 90).
        #[arg(long)]
        days: Option<u32>,
        /// Write the suggestions into budgets.yml (personas with a daily budget, or none yet);
        /// the file is checked before it replaces the old one.
        #[arg(long)]
        apply: bool,
        /// hypertool.toml whose budgets.yml --apply edits (default: ./config/hypertool.toml).
        #[arg(long, env = "HYPERTOOL_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Forget the usage of the current period: the persona starts afresh.
    Reset {
        /// The persona (name or alias) whose period usage to forget.
        persona: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub(crate) fn parse_period(s: &str) -> Result<Period, String> {
    serde_json::from_value(json!(s))
        .map_err(|_| format!("unknown period `{s}`; use one of {}", Period::NAMES))
}

pub(crate) fn parse_mode(s: &str) -> Result<BudgetMode, String> {
    serde_json::from_value(json!(s))
        .map_err(|_| format!("unknown mode `{s}`; use one of {}", BudgetMode::NAMES))
}

pub(crate) async fn budget_suggest(
    days: Option<u32>,
    apply: bool,
    config: Option<PathBuf>,
    client: ClientArgs,
) -> ExitCode {
    let path = match days {
        Some(d) => format!("/api/budgets/suggestions?days={d}"),
        None => "/api/budgets/suggestions".to_string(),
    };
    let v = match get(&client, &path).await {
        Ok(v) => v,
        Err(code) => return code,
    };
    if client.json && !apply {
        outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    out!("{}", suggestions_table(&v));
    if !apply {
        return ExitCode::SUCCESS;
    }
    let source = Source::discover(config.as_deref());
    let Source::File(toml) = &source else {
        errln!("error: the built-in defaults have no budgets.yml to write\n  fix: pass --config with the hypertool.toml the server runs with");
        return ExitCode::from(2);
    };
    let cfg = match config::load(&source) {
        Ok(c) => c,
        Err(errors) => {
            errln!("{errors}");
            return ExitCode::from(1);
        }
    };
    let file = toml
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(&cfg.settings.budgets_file);
    let mut changes = Vec::new();
    for s in v["suggestions"].as_array().cloned().unwrap_or_default() {
        let (Some(persona), Some(tokens)) =
            (s["persona"].as_str(), s["suggested_daily_tokens"].as_u64())
        else {
            continue;
        };
        match s["current_period"].as_str() {
            None | Some("daily") => changes.push((persona.to_string(), tokens)),
            Some(other) => {
                outln!("{persona}: not changed (its budget is {other}; the suggestion is per day)")
            }
        }
    }
    let old = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) => {
            errln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(1);
        }
    };
    let new = match hypertool::cli::set_budget_tokens(&old, &changes) {
        Ok(t) => t,
        Err(e) => {
            errln!("error: {}: {e}", file.display());
            return ExitCode::from(1);
        }
    };
    // Written beside, checked, then moved into place: a bad edit never reaches the server.
    let staged = file.with_extension("yml.suggested");
    if let Err(e) = std::fs::write(&staged, &new) {
        errln!("error: cannot write {}: {e}", staged.display());
        return ExitCode::from(1);
    }
    let checked =
        config::budgets::resolve_budgets(&staged.display().to_string(), Some(&new), &cfg.personas);
    if let Err(errors) = checked {
        let _ = std::fs::remove_file(&staged);
        for e in errors {
            errln!("{e}");
        }
        errln!(
            "error: the edited budgets.yml would not load; {} is unchanged",
            file.display()
        );
        return ExitCode::from(1);
    }
    if let Err(e) = std::fs::rename(&staged, &file) {
        errln!("error: cannot replace {}: {e}", file.display());
        return ExitCode::from(1);
    }
    outln!(
        "wrote {} budget(s) to {} (the server reloads it within seconds)",
        changes.len(),
        file.display()
    );
    ExitCode::SUCCESS
}

/// `hypertool experiments promote`: the workflow file with the stage on one variant, checked
/// with the whole configuration, then put in place — by the server when `--server` is given (the
/// audit log then names the key), else here.
pub(crate) async fn promote(
    path: Option<PathBuf>,
    client: Option<ClientArgs>,
    workflow: &str,
    stage: &str,
    variant: &str,
) -> ExitCode {
    if let Some(c) = client {
        let body = serde_json::json!({ "variant": variant });
        let route = format!(
            "/api/experiments/{}/{}/promote",
            encode(workflow),
            encode(stage)
        );
        return match call(&c, reqwest::Method::POST, &route, Some(body)).await {
            Ok(v) => {
                outln!(
                    "promoted: stage `{stage}` of workflow `{workflow}` runs variant `{variant}` alone ({}); the server applies it at its next reload",
                    v["file"].as_str().unwrap_or("its workflow file")
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        };
    }
    let source = Source::discover(path.as_deref());
    match config::workflows::promote_in_place(&source, workflow, stage, variant) {
        Ok(file) => {
            outln!(
                "promoted: stage `{stage}` of workflow `{workflow}` runs variant `{variant}` alone ({}); the server applies it at its next reload and records the change",
                file.display()
            );
            ExitCode::SUCCESS
        }
        Err(why) => {
            errln!("{why}");
            ExitCode::from(1)
        }
    }
}

/// One call to the running server with the key from `args`; a failure is printed (exit 1).
pub(crate) async fn call(
    args: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ExitCode> {
    let key = std::env::var(&args.api_key_env)
        .ok()
        .filter(|k| !k.trim().is_empty());
    Client::new(&args.server, key)
        .call(method, path, body)
        .await
        .map_err(|e| {
            errln!("error: {e}");
            ExitCode::from(1)
        })
}

pub(crate) async fn get(args: &ClientArgs, path: &str) -> Result<Value, ExitCode> {
    call(args, reqwest::Method::GET, path, None).await
}

pub(crate) async fn client_command(
    args: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    render: fn(&Value) -> String,
) -> ExitCode {
    match call(args, method, path, body).await {
        Ok(v) => {
            if args.json {
                outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                out!("{}", render(&v));
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

pub(crate) fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `hypertool audit`: the audit log, newest first.
pub(crate) async fn audit(
    since: Option<String>,
    action: Option<String>,
    limit: Option<usize>,
    client: &ClientArgs,
) -> ExitCode {
    let params: Vec<String> = [
        ("since", since),
        ("action", action),
        ("limit", limit.map(|l| l.to_string())),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(&v))))
    .collect();
    let path = if params.is_empty() {
        "/api/audit".to_string()
    } else {
        format!("/api/audit?{}", params.join("&"))
    };
    client_command(
        client,
        Method::GET,
        &path,
        None,
        hypertool::cli::audit_table,
    )
    .await
}

/// `hypertool gates history`.
pub(crate) async fn gates(command: GatesCommand) -> ExitCode {
    let GatesCommand::History {
        workflow,
        stage,
        since,
        until,
        result,
        limit,
        client,
    } = command;
    let mut params = Vec::new();
    for (k, v) in [
        ("workflow", workflow),
        ("stage", stage),
        ("since", since),
        ("until", until),
        ("result", result),
        ("limit", limit.map(|l| l.to_string())),
    ] {
        if let Some(v) = v {
            params.push(format!("{k}={}", encode(&v)));
        }
    }
    let path = if params.is_empty() {
        "/api/quality-gates/history".to_string()
    } else {
        format!("/api/quality-gates/history?{}", params.join("&"))
    };
    client_command(&client, Method::GET, &path, None, gates_table).await
}

/// `hypertool experiments list|show|promote`.
pub(crate) async fn experiments(command: ExperimentsCommand) -> ExitCode {
    match command {
        ExperimentsCommand::List(client) => {
            client_command(
                &client,
                Method::GET,
                "/api/experiments",
                None,
                experiments_table,
            )
            .await
        }
        ExperimentsCommand::Show {
            workflow,
            stage,
            client,
        } => {
            let path = format!("/api/experiments/{}/{}", encode(&workflow), encode(&stage));
            client_command(&client, Method::GET, &path, None, experiment_table).await
        }
        ExperimentsCommand::Promote {
            workflow,
            stage,
            variant,
            config,
            server,
            api_key_env,
        } => {
            let client = server.map(|server| ClientArgs {
                server,
                api_key_env,
                json: false,
            });
            promote(config, client, &workflow, &stage, &variant).await
        }
    }
}

/// `hypertool alerts`.
pub(crate) async fn alerts(client: &ClientArgs) -> ExitCode {
    client_command(client, Method::GET, "/api/alerts", None, alerts_table).await
}

/// `hypertool personas list`.
pub(crate) async fn personas(command: PersonasCommand) -> ExitCode {
    let PersonasCommand::List(client) = command;
    client_command(&client, Method::GET, "/api/personas", None, personas_table).await
}

/// `hypertool budget status|set|unset|suggest|reset`.
pub(crate) async fn budget(command: BudgetCommand) -> ExitCode {
    match command {
        BudgetCommand::Status { persona, client } => {
            let path = match persona {
                Some(p) => format!("/api/budgets/{}", encode(&p)),
                None => "/api/budgets".into(),
            };
            client_command(&client, Method::GET, &path, None, budgets_table).await
        }
        BudgetCommand::Set {
            persona,
            tokens,
            cost_usd,
            period,
            mode,
            client,
        } => {
            let mut body = json!({ "tokens": tokens });
            if let Some(c) = cost_usd {
                body["cost_usd"] = json!(c);
            }
            if let Some(p) = period {
                body["period"] = json!(p);
            }
            if let Some(m) = mode {
                body["mode"] = json!(m);
            }
            let path = format!("/api/budgets/{}", encode(&persona));
            client_command(&client, Method::PUT, &path, Some(body), budgets_table).await
        }
        BudgetCommand::Unset { persona, client } => {
            let path = format!("/api/budgets/{}", encode(&persona));
            client_command(&client, Method::DELETE, &path, None, budgets_table).await
        }
        BudgetCommand::Suggest {
            days,
            apply,
            config,
            client,
        } => budget_suggest(days, apply, config, client).await,
        BudgetCommand::Reset { persona, client } => {
            let path = format!("/api/budgets/{}/reset", encode(&persona));
            client_command(&client, Method::POST, &path, None, budgets_table).await
        }
    }
}
