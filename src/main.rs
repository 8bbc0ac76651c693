//! The `hypertool` command line: `serve`, `check`, and the client commands for a running server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use hypertool::alerts::rules::render_rules_yaml;
use hypertool::alerts::simulate::{self as sim, Scenario, SCENARIOS};
use hypertool::cli::{alerts_table, budgets_table, personas_table, Client};
use hypertool::config::{self, Source};
use hypertool::core::budget::{BudgetMode, Period};
use hypertool::core::clock::SystemClock;
use hypertool::server::{self, ServeOptions};

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
    /// Print the operator runbook, or the section for one alert.
    Runbook {
        /// An alert name, e.g. TokenBudgetExceeded.
        alert: Option<String>,
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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let source = Source::discover(args.config.as_deref());
    let opts = ServeOptions {
        config: source.clone(),
        data_dir: args.data_dir,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
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
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn load_or_exit(path: Option<&std::path::Path>) -> Result<config::Config, ExitCode> {
    let source = Source::discover(path);
    config::load(&source).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!("{} error(s) in {}", errors.0.len(), source.describe());
        ExitCode::from(1)
    })
}

fn rules(path: Option<PathBuf>) -> ExitCode {
    match load_or_exit(path.as_deref()) {
        Ok(cfg) => {
            print!("{}", render_rules_yaml(&cfg.settings.alerts));
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
                eprintln!(
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
            print!("{}", run.timeline());
            if !run.as_expected() {
                let want: Vec<&str> = scenario.expect_firing.iter().map(|a| a.name()).collect();
                println!(
                    "  (expected firing: {}; the configured thresholds differ from the runbook's?)",
                    want.join(", ")
                );
            }
        }
        if let Some(target) = &promtool {
            let test_path = if name == "all" {
                if let Err(e) = std::fs::create_dir_all(target) {
                    eprintln!("error: cannot create {}: {e}", target.display());
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
                eprintln!("error: cannot write {}: {e}", test_path.display());
                return ExitCode::from(1);
            }
            if !json_out {
                println!(
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
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
    if all_as_expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

fn runbook(alert: Option<&str>) -> ExitCode {
    use hypertool::alerts::rules::AlertId;
    let Some(name) = alert else {
        print!("{}", hypertool::runbook::TEXT);
        return ExitCode::SUCCESS;
    };
    let Some(id) = AlertId::from_name(name) else {
        let names: Vec<&str> = AlertId::ALL.iter().map(|a| a.name()).collect();
        eprintln!(
            "error: unknown alert `{name}`\n  fix: use one of: {}",
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    match hypertool::runbook::section(id) {
        Some(text) => println!("{text}"),
        None => print!("{}", hypertool::runbook::TEXT),
    }
    ExitCode::SUCCESS
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let source = Source::discover(path.as_deref());
    if let Source::File(p) = &source {
        if !p.is_file() {
            eprintln!(
                "error: {}: no such file\n  fix: pass the path of a hypertool.toml",
                p.display()
            );
            return ExitCode::from(2);
        }
    }
    match config::load(&source) {
        Ok(cfg) => {
            println!(
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
                println!("{line}");
            }
            for w in &plan.warnings {
                println!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s) in {}", errors.0.len(), source.describe());
            ExitCode::from(1)
        }
    }
}

async fn client_command(
    args: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    render: fn(&Value) -> String,
) -> ExitCode {
    let key = std::env::var(&args.api_key_env)
        .ok()
        .filter(|k| !k.trim().is_empty());
    let client = Client::new(&args.server, key);
    match client.call(method, path, body).await {
        Ok(v) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", render(&v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
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
        Command::Check { config } => check(config),
        Command::Rules { config } => rules(config),
        Command::Runbook { alert } => runbook(alert.as_deref()),
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
