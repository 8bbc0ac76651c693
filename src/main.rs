//! The `hypertool` command line: the commands and their options, each run by its module under
//! `commands/` (`serve`, the configuration-only commands, diagnosis, the API client).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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

mod commands;

use commands::client::{
    BudgetCommand, ClientArgs, ExperimentsCommand, GatesCommand, PersonasCommand,
};
use commands::diagnose::{DoctorArgs, RunbookArgs};
use commands::serve::{McpArgs, ServeArgs};
use commands::{client, diagnose, offline, serve};

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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::serve(args).await,
        Command::Mcp(args) => serve::mcp(args).await,
        Command::Check { config } => offline::check(config),
        Command::Rules { config } => offline::rules(config),
        Command::Runbook(args) => diagnose::runbook(args).await,
        Command::Doctor(args) => diagnose::doctor(args).await,
        Command::Grafana { out } => offline::grafana(&out),
        Command::Audit {
            since,
            action,
            limit,
            client,
        } => client::audit(since, action, limit, &client).await,
        Command::Gates { command } => client::gates(command).await,
        Command::Experiments { command } => client::experiments(command).await,
        Command::Prompts { config } => offline::prompts(config),
        Command::Simulate {
            scenario,
            config,
            json,
            promtool_test,
        } => offline::simulate(&scenario, config, json, promtool_test),
        Command::Alerts(client) => client::alerts(&client).await,
        Command::Personas { command } => client::personas(command).await,
        Command::Budget { command } => client::budget(command).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use hypertool::alerts::simulate::SCENARIOS;

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
