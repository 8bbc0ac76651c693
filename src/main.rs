//! The `hypertool` command line: `serve`, `check`, and the client commands for a running server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use hypertool::alerts::rules::render_rules_yaml;
use hypertool::alerts::simulate::{self as sim, Scenario, SCENARIOS};
use hypertool::cli::{
    alerts_table, budgets_table, experiment_table, experiments_table, gates_table, personas_table,
    suggestions_table, Client,
};
use hypertool::config::{self, Source};
use hypertool::core::budget::{BudgetMode, Period};
use hypertool::core::clock::SystemClock;
use hypertool::server::{self, ServeOptions};

// Everything the CLI prints goes through these: names and texts come from a server or a ledger,
// and a control or bidirectional-override character in them (`\u001b[31m`, U+202E) must reach the
// terminal as visible text, never as an instruction to it (see `hypertool::cli::terminal_safe`).
macro_rules! outln {
    () => { println!() };
    ($($t:tt)*) => { println!("{}", hypertool::cli::terminal_safe(&format!($($t)*))) };
}
macro_rules! out {
    ($($t:tt)*) => { print!("{}", hypertool::cli::terminal_safe(&format!($($t)*))) };
}
macro_rules! errln {
    () => { eprintln!() };
    ($($t:tt)*) => { eprintln!("{}", hypertool::cli::terminal_safe(&format!($($t)*))) };
}

// mimalloc: the gateway allocates per request (JSON, headers); glibc's malloc showed up at ~15 % of
// the profile under load, mimalloc roughly halves that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "hypertool",
    version,
    about = "Persona-aware LLM gateway and observability"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: events API, admin API and the Prometheus metrics listener.
    Serve(ServeArgs),
    /// Serve MCP on stdio: the tools of the persona in force from the downstream MCP servers,
    /// and list-personas / equip-persona / current-persona.
    Mcp(McpArgs),
    /// Validate the configuration and report every problem with file, line and fix.
    Check {
        /// hypertool.toml to check (default: ./config/hypertool.toml, else the built-in defaults).
        #[arg(long, env = "HYPERTOOL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the Prometheus rules for the runbook's alerts, rendered from the configuration.
    Rules {
        /// hypertool.toml whose `[alerts]` thresholds to use (default: ./config/hypertool.toml, else
        /// the built-in defaults).
        #[arg(long, env = "HYPERTOOL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run a runbook situation on a virtual clock and print the alert timeline.
    Simulate {
        /// Scenario name, or `all`. Scenarios: healthy, budget-overrun, soft-limit, depletion-trend,
        /// gate-failures, persona-thrash, slow-stage, langfuse-down, langfuse-never-configured,
        /// langfuse-wrong-keys, metrics-down, gate-escalation, oscillating-session, hung-stage.
        scenario: String,
        /// hypertool.toml whose personas, budgets and thresholds to simulate (default:
        /// ./config/hypertool.toml, else the built-in defaults).
        #[arg(long, env = "HYPERTOOL_CONFIG")]
        config: Option<PathBuf>,
        /// Print every evaluation as JSON.
        #[arg(long)]
        json: bool,
        /// Also write the scenario as a promtool test (and its rules file beside it): with one
        /// scenario, FILE; with `all`, FILE is a directory that gets one test per scenario.
        #[arg(long, value_name = "FILE")]
        promtool_test: Option<PathBuf>,
    },
    /// The runbook: with no alert, list the alerts; with one, run its investigation against the
    /// running hypertool (and Prometheus with --prometheus) and rank the root causes by the
    /// evidence; --print prints the text instead.
    Runbook(RunbookArgs),
    /// Every health check at once (configuration, server, ledger, metrics endpoint, upstreams,
    /// trace destinations, Alertmanager, Prometheus), one line each; exit 1 if any fails.
    Doctor(DoctorArgs),
    /// Write the Grafana dashboards (persona_overview.json, workflow_performance.json), built
    /// from the runbook's queries, into a directory.
    Grafana {
        /// The directory to write them to (created if missing).
        #[arg(long, default_value = "deploy/grafana")]
        out: PathBuf,
    },
    /// The prompt files of the configuration: each one's version (its content digest) and the
    /// stage variants that use it.
    Prompts {
        /// hypertool.toml (default: ./config/hypertool.toml, else the built-in defaults).
        #[arg(long, env = "HYPERTOOL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// The audit log of a running server: every change made through the admin API or the CLI
    /// (budgets set, removed or reset, experiments promoted, reloads, switches an admin made),
    /// who made it (the key's role and name), and the values before and after; newest first.
    Audit {
        /// From this long ago (`24h`, `7d`) or this time (RFC 3339); default 7 days.
        #[arg(long)]
        since: Option<String>,
        /// Only this action (`budget.set`, `budget.remove`, `budget.reset`,
        /// `experiment.promote`, `config.reload`, `persona.switch`).
        #[arg(long)]
        action: Option<String>,
        /// At most this many entries (default 200, at most 1000).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Quality gates of a running server.
    Gates {
        #[command(subcommand)]
        command: GatesCommand,
    },
    /// Experiments (workflow stages with variants) of a running server: per variant its runs,
    /// gate pass rate with a 95 % interval, attempts per run, cost per pass, and the probability
    /// that it is the best.
    Experiments {
        #[command(subcommand)]
        command: ExperimentsCommand,
    },
    /// Alerts of a running server (state, labels, value, since when, runbook link).
    Alerts(ClientArgs),
    /// Personas known to a running server.
    Personas {
        #[command(subcommand)]
        command: PersonasCommand,
    },
    /// Budgets of a running server.
    Budget {
        #[command(subcommand)]
        command: BudgetCommand,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// hypertool.toml (default: ./config/hypertool.toml, else the built-in defaults).
    #[arg(long, env = "HYPERTOOL_CONFIG")]
    config: Option<PathBuf>,
    /// Where the ledger (hypertool.db) lives.
    #[arg(long, env = "HYPERTOOL_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// API address (default from the configuration: 127.0.0.1:8080).
    #[arg(long, env = "HYPERTOOL_LISTEN")]
    listen: Option<SocketAddr>,
    /// Metrics address (default from the configuration: 127.0.0.1:9464).
    #[arg(long, env = "HYPERTOOL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Write logs to this file as JSON lines instead of to stderr.
    #[arg(long, env = "HYPERTOOL_LOG_FILE")]
    log_file: Option<PathBuf>,
}

#[derive(Args)]
struct McpArgs {
    /// The persona in force from the start (none: only hypertool's own tools until equip-persona).
    #[arg(long, env = "HYPERTOOL_PERSONA")]
    persona: Option<String>,
    /// The downstream servers, an `.mcp.json`-style file (default: `[mcp] servers` of
    /// hypertool.toml).
    #[arg(long, env = "HYPERTOOL_MCP_CONFIG")]
    mcp_config: Option<PathBuf>,
    /// hypertool.toml (default: ./config/hypertool.toml, else the built-in defaults).
    #[arg(long, env = "HYPERTOOL_CONFIG")]
    config: Option<PathBuf>,
    /// Where this process's own ledger lives (without --server).
    #[arg(long, env = "HYPERTOOL_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// A running `hypertool serve` that records switches and tool calls (its key from
    /// HYPERTOOL_API_KEY); without it this process keeps a ledger of its own.
    #[arg(long)]
    server: Option<String>,
    /// The environment variable holding the key sent to --server (a persona key: its persona only).
    #[arg(long, default_value = "HYPERTOOL_API_KEY")]
    api_key_env: String,
    /// The session id in events and the ledger (default: a random one per run).
    #[arg(long)]
    session: Option<String>,
    /// The chatmode whose switch cooldown applies (default: the gateway's default chatmode).
    #[arg(long)]
    chatmode: Option<String>,
    /// API address of this process's own core (without --server; default: a free loopback port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Metrics address of this process's own core (without --server; default: a free loopback port).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Write logs to this file as JSON lines instead of to stderr.
    #[arg(long, env = "HYPERTOOL_LOG_FILE")]
    log_file: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// The running server.
    #[arg(
        long,
        env = "HYPERTOOL_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// The environment variable holding the key to send (an admin or viewer key; a persona key
    /// reads only its own budget).
    #[arg(long, default_value = "HYPERTOOL_API_KEY")]
    api_key_env: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunbookArgs {
    /// An alert name (e.g. TokenBudgetExceeded); none: list the alerts.
    alert: Option<String>,
    /// Print the runbook's text (the whole runbook, or the alert's section) instead of
    /// investigating.
    #[arg(long)]
    print: bool,
    /// Also query this Prometheus (e.g. http://127.0.0.1:9090): the section's PromQL, the alert's
    /// state there, and for HypertoolMetricsNotReported the target's scrape state.
    #[arg(long, value_name = "URL")]
    prometheus: Option<String>,
    /// How far back the investigation looks: a duration from 1m to 7d (default 1h).
    #[arg(long, default_value = "1h")]
    window: String,
    /// hypertool.toml, for HypertoolMetricsNotReported's checks (where the metrics listener is).
    #[arg(long, env = "HYPERTOOL_CONFIG")]
    config: Option<PathBuf>,
    /// The metrics listener to check (default: the configuration's server.metrics_listen).
    #[arg(long, value_name = "URL")]
    metrics: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
struct DoctorArgs {
    /// hypertool.toml to check with (default: ./config/hypertool.toml, else the built-in defaults).
    #[arg(long, env = "HYPERTOOL_CONFIG")]
    config: Option<PathBuf>,
    /// The data directory the server uses (checked when the server is not running).
    #[arg(long, env = "HYPERTOOL_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// The API to check (default: the configuration's server.listen).
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// The metrics listener to check (default: the configuration's server.metrics_listen).
    #[arg(long, value_name = "URL")]
    metrics: Option<String>,
    /// Also check this Prometheus's targets of the hypertool job (e.g. http://127.0.0.1:9090).
    #[arg(long, value_name = "URL")]
    prometheus: Option<String>,
    /// Print JSON instead of lines.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum GatesCommand {
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
enum ExperimentsCommand {
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
enum PersonasCommand {
    /// List personas with their budgets.
    List(ClientArgs),
}

#[derive(Subcommand)]
enum BudgetCommand {
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

fn parse_period(s: &str) -> Result<Period, String> {
    serde_json::from_value(json!(s))
        .map_err(|_| format!("unknown period `{s}`; use one of {}", Period::NAMES))
}

fn parse_mode(s: &str) -> Result<BudgetMode, String> {
    serde_json::from_value(json!(s))
        .map_err(|_| format!("unknown mode `{s}`; use one of {}", BudgetMode::NAMES))
}

fn init_logging(log_file: Option<&PathBuf>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rmcp=warn"));
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            tracing_subscriber::fmt()
                .json()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(Mutex::new(file))
                .init();
        }
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

use std::sync::Mutex;

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    if let Err(e) = init_logging(args.log_file.as_ref()) {
        errln!("error: {e}");
        return ExitCode::from(2);
    }
    let source = Source::discover(args.config.as_deref());
    let opts = ServeOptions {
        config: source.clone(),
        data_dir: args.data_dir,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        mcp_servers: None,
    };
    match server::start(opts, Arc::new(SystemClock)).await {
        Ok(running) => {
            tracing::info!(
                api = %running.api_addr,
                metrics = %running.metrics_addr,
                config = %source.describe(),
                version = env!("CARGO_PKG_VERSION"),
                "hypertool serving"
            );
            running.run_until(shutdown_signal()).await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn mcp(args: McpArgs) -> ExitCode {
    if let Err(e) = init_logging(args.log_file.as_ref()) {
        errln!("error: {e}");
        return ExitCode::from(2);
    }
    let opts = hypertool::server::mcp_stdio::StdioOptions {
        config: Source::discover(args.config.as_deref()),
        data_dir: args.data_dir,
        mcp_config: args.mcp_config,
        persona: args.persona,
        key: std::env::var(&args.api_key_env)
            .ok()
            .filter(|k| !k.is_empty()),
        server: args.server,
        session: args.session,
        chatmode: args.chatmode,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
    };
    match hypertool::server::mcp_stdio::run(opts, Arc::new(SystemClock), shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn load_or_exit(path: Option<&std::path::Path>) -> Result<config::Config, ExitCode> {
    let source = Source::discover(path);
    config::load(&source).map_err(|errors| {
        errln!("{errors}");
        errln!("{} error(s) in {}", errors.0.len(), source.describe());
        ExitCode::from(1)
    })
}

fn rules(path: Option<PathBuf>) -> ExitCode {
    match load_or_exit(path.as_deref()) {
        Ok(cfg) => {
            out!("{}", render_rules_yaml(&cfg.settings.alerts));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn simulate(
    name: &str,
    path: Option<PathBuf>,
    json_out: bool,
    promtool: Option<PathBuf>,
) -> ExitCode {
    let cfg = match load_or_exit(path.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let scenarios: Vec<Scenario> = if name == "all" {
        SCENARIOS.to_vec()
    } else {
        match sim::find(name) {
            Some(s) => vec![s],
            None => {
                let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
                errln!(
                    "error: unknown scenario `{name}`\n  fix: use one of: {}, or all",
                    names.join(", ")
                );
                return ExitCode::from(2);
            }
        }
    };
    let mut all_as_expected = true;
    let mut json_runs = Vec::new();
    for scenario in &scenarios {
        let run = sim::run(*scenario, cfg.engine_config(), cfg.settings.alerts.clone());
        all_as_expected &= run.as_expected();
        if json_out {
            json_runs.push(json!({
                "scenario": scenario.name,
                "about": scenario.about,
                "expected_firing": scenario.expect_firing.iter().map(|a| a.name()).collect::<Vec<_>>(),
                "firing_at_end": run.firing_at_end(),
                "evaluations": run.evaluations,
            }));
        } else {
            out!("{}", run.timeline());
            if !run.as_expected() {
                let want: Vec<&str> = scenario.expect_firing.iter().map(|a| a.name()).collect();
                outln!(
                    "  (expected firing: {}; the configured thresholds differ from the runbook's?)",
                    want.join(", ")
                );
            }
        }
        if let Some(target) = &promtool {
            let test_path = if name == "all" {
                if let Err(e) = std::fs::create_dir_all(target) {
                    errln!("error: cannot create {}: {e}", target.display());
                    return ExitCode::from(1);
                }
                target.join(format!("{}.test.yml", scenario.name))
            } else {
                target.clone()
            };
            let stem = test_path
                .file_name()
                .and_then(|f| f.to_str())
                .map(|f| {
                    f.trim_end_matches(".yml")
                        .trim_end_matches(".yaml")
                        .trim_end_matches(".test")
                })
                .unwrap_or(scenario.name)
                .to_string();
            let rules_name = format!("{stem}.rules.yml");
            let rules_path = test_path.with_file_name(&rules_name);
            let written = std::fs::write(&rules_path, render_rules_yaml(&cfg.settings.alerts))
                .and_then(|()| std::fs::write(&test_path, run.promtool_test(&rules_name)));
            if let Err(e) = written {
                errln!("error: cannot write {}: {e}", test_path.display());
                return ExitCode::from(1);
            }
            if !json_out {
                outln!(
                    "  promtool test written to {} (run: promtool test rules {})",
                    test_path.display(),
                    test_path.display()
                );
            }
        }
    }
    if json_out {
        let doc = if json_runs.len() == 1 {
            json_runs.remove(0)
        } else {
            json!(json_runs)
        };
        outln!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
    if all_as_expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

async fn runbook(args: RunbookArgs) -> ExitCode {
    use hypertool::alerts::rules::AlertId;
    let Some(name) = args.alert.as_deref() else {
        if args.print {
            out!("{}", hypertool::runbook::TEXT);
        } else {
            outln!("The runbook's alerts (hypertool runbook ALERT runs one's investigation; --print shows its section):");
            for id in AlertId::ALL {
                outln!("  {:<32} {}", id.name(), hypertool::runbook::summary(id));
            }
        }
        return ExitCode::SUCCESS;
    };
    let Some(id) = AlertId::from_name(name) else {
        let names: Vec<&str> = AlertId::ALL.iter().map(|a| a.name()).collect();
        errln!(
            "error: unknown alert `{name}`\n  fix: use one of: {}",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    if args.print {
        match hypertool::runbook::section(id) {
            Some(text) => outln!("{text}"),
            None => out!("{}", hypertool::runbook::TEXT),
        }
        return ExitCode::SUCCESS;
    }
    let report = if id == AlertId::HypertoolMetricsNotReported {
        let target = hypertool::doctor::Target {
            config: args.config.clone(),
            data_dir: PathBuf::from("data"),
            server: Some(args.client.server.clone()),
            metrics: args.metrics.clone(),
            prometheus: args.prometheus.clone(),
        };
        serde_json::to_value(hypertool::doctor::metrics_investigation(&target).await)
            .unwrap_or(Value::Null)
    } else {
        let path = format!(
            "/api/investigations/{}?window={}",
            id.name(),
            encode(&args.window)
        );
        match get(&args.client, &path).await {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
    let prometheus = match &args.prometheus {
        Some(p) => Some(hypertool::cli::prometheus_evidence(p, id).await),
        None => None,
    };
    if args.client.json {
        let doc = json!({ "investigation": report, "prometheus": prometheus });
        outln!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        out!("{}", hypertool::runbook::investigate::text_of(&report));
        if let Some(p) = &prometheus {
            out!("{}", hypertool::cli::prometheus_text(p));
        }
        outln!(
            "\nRunbook: hypertool runbook {} --print, or {}/runbook#{}",
            id.name(),
            hypertool::web::server_url(&args.client.server),
            id.runbook_anchor()
        );
    }
    ExitCode::SUCCESS
}

async fn doctor(args: DoctorArgs) -> ExitCode {
    let target = hypertool::doctor::Target {
        config: args.config,
        data_dir: args.data_dir,
        server: args.server,
        metrics: args.metrics,
        prometheus: args.prometheus,
    };
    let checks = hypertool::doctor::doctor(&target).await;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&checks).unwrap_or_default()
        );
    } else {
        for c in &checks {
            outln!("{}", c.line());
        }
    }
    let failed = checks
        .iter()
        .filter(|c| c.status == hypertool::runbook::investigate::Status::Fail)
        .count();
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        if !args.json {
            errln!("{failed} check(s) failed");
        }
        ExitCode::from(1)
    }
}

async fn budget_suggest(
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
async fn promote(
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

/// `hypertool prompts`: each prompt file a stage variant uses, its version and where.
fn prompts(path: Option<PathBuf>) -> ExitCode {
    let source = Source::discover(path.as_deref());
    let cfg = match config::load(&source) {
        Ok(c) => c,
        Err(errors) => {
            errln!("{errors}");
            return ExitCode::from(1);
        }
    };
    let mut used: std::collections::BTreeMap<(String, String), Vec<String>> = Default::default();
    for w in cfg.workflows.workflows.values() {
        for s in &w.stages {
            for v in &s.variants {
                if let Some(p) = &v.prompt {
                    used.entry((p.name.clone(), p.version.clone()))
                        .or_default()
                        .push(format!("{}/{}/{}", w.name, s.name, v.name));
                }
            }
        }
    }
    if used.is_empty() {
        outln!("no stage variant of {} names a prompt", source.describe());
        return ExitCode::SUCCESS;
    }
    let rows: Vec<Vec<String>> = used
        .into_iter()
        .map(|((name, version), at)| vec![name, version, at.join(", ")])
        .collect();
    out!(
        "{}",
        hypertool::cli::table(
            &["PROMPT", "VERSION", "USED BY (workflow/stage/variant)"],
            &rows
        )
    );
    ExitCode::SUCCESS
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let source = Source::discover(path.as_deref());
    if let Source::File(p) = &source {
        if !p.is_file() {
            errln!(
                "error: {}: no such file\n  fix: pass the path of a hypertool.toml",
                p.display()
            );
            return ExitCode::from(2);
        }
    }
    match config::load(&source) {
        Ok(cfg) => {
            outln!(
                "{}: ok ({} personas, {} budgets, {} workflows, {} chatmodes)",
                source.describe(),
                cfg.personas.len(),
                cfg.budgets.len(),
                cfg.workflows.workflows.len(),
                cfg.workflows.chatmodes.len()
            );
            // Where traces would go from here, with this environment (doctor-style: what is
            // missing is named).
            let plan = hypertool::telemetry::trace::Plan::resolve(
                &cfg.settings.tracing,
                &cfg.settings.langfuse,
                std::path::Path::new("data"),
                &|k| std::env::var(k).ok(),
            );
            for line in plan.describe() {
                outln!("{line}");
            }
            for w in &plan.warnings {
                outln!("warning: {w}");
            }
            // A model with no price spends tokens whose cost is unknown: said, not shown as $0.
            for m in &cfg.settings.gateway.models {
                if m.prices.is_none() && m.upstream != hypertool::config::gateway::MOCK_UPSTREAM {
                    outln!(
                        "warning: model `{}` has no prices (prompt_usd_per_1k, completion_usd_per_1k): its calls are counted in hypertool_gateway_unpriced_calls_total and shown as unpriced, not $0.00",
                        m.name
                    );
                }
            }
            // The MCP proxy's downstream servers (started by `hypertool doctor`, not here).
            if let Some(path) = &cfg.settings.mcp.servers {
                match hypertool::mcp::config::load_configured(Some(path)) {
                    Ok(servers) => outln!(
                        "{}: ok ({} MCP servers)",
                        path.display(),
                        servers.servers.len()
                    ),
                    Err(errors) => {
                        errln!("{errors}");
                        errln!("{} error(s) in {}", errors.0.len(), path.display());
                        return ExitCode::from(1);
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            errln!("{errors}");
            errln!("{} error(s) in {}", errors.0.len(), source.describe());
            ExitCode::from(1)
        }
    }
}

/// One call to the running server with the key from `args`; a failure is printed (exit 1).
async fn call(
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

async fn get(args: &ClientArgs, path: &str) -> Result<Value, ExitCode> {
    call(args, reqwest::Method::GET, path, None).await
}

async fn client_command(
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

fn encode(segment: &str) -> String {
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    use reqwest::Method;
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Mcp(args) => mcp(args).await,
        Command::Check { config } => check(config),
        Command::Rules { config } => rules(config),
        Command::Runbook(args) => runbook(args).await,
        Command::Doctor(args) => doctor(args).await,
        Command::Grafana { out } => {
            if let Err(e) = std::fs::create_dir_all(&out) {
                errln!("error: cannot create {}: {e}", out.display());
                return ExitCode::from(1);
            }
            for (file, dashboard) in hypertool::runbook::grafana::dashboards() {
                let path = out.join(file);
                let text = serde_json::to_string_pretty(&dashboard).unwrap_or_default() + "\n";
                if let Err(e) = std::fs::write(&path, text) {
                    errln!("error: cannot write {}: {e}", path.display());
                    return ExitCode::from(1);
                }
                outln!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Command::Audit {
            since,
            action,
            limit,
            client,
        } => {
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
                &client,
                Method::GET,
                &path,
                None,
                hypertool::cli::audit_table,
            )
            .await
        }
        Command::Gates {
            command:
                GatesCommand::History {
                    workflow,
                    stage,
                    since,
                    until,
                    result,
                    limit,
                    client,
                },
        } => {
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
        Command::Experiments { command } => match command {
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
        },
        Command::Prompts { config } => prompts(config),
        Command::Simulate {
            scenario,
            config,
            json,
            promtool_test,
        } => simulate(&scenario, config, json, promtool_test),
        Command::Alerts(client) => {
            client_command(&client, Method::GET, "/api/alerts", None, alerts_table).await
        }
        Command::Personas {
            command: PersonasCommand::List(client),
        } => client_command(&client, Method::GET, "/api/personas", None, personas_table).await,
        Command::Budget { command } => match command {
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
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every option and argument of every command says what it is (`--help` is the manual).
    #[test]
    fn every_command_describes_every_option() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() && !path.is_empty() {
                missing.push(format!("{path}: no description"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "undescribed: {missing:#?}");
    }

    #[test]
    fn simulate_help_lists_every_scenario() {
        let mut cli = Cli::command();
        let simulate = cli.find_subcommand_mut("simulate").expect("simulate");
        let help = simulate.render_long_help().to_string();
        for s in SCENARIOS {
            assert!(help.contains(s.name), "{} missing from:\n{help}", s.name);
        }
    }
}
