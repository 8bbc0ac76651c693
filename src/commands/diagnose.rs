//! `hypertool runbook` and `hypertool doctor`: investigations and checks, against the
//! configuration and, when given, a running server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::{json, Value};

use super::client::{encode, get, ClientArgs};

#[derive(Args)]
pub(crate) struct RunbookArgs {
    /// An alert name (e.g. TokenBudgetExceeded); none: list the alerts.
    pub(crate) alert: Option<String>,
    /// Print the runbook's text (the whole runbook, or the alert's section) instead of
    /// investigating.
    #[arg(long)]
    pub(crate) print: bool,
    /// Also query this Prometheus (e.g. http://127.0.0.1:9090): the section's PromQL, the alert's
    /// state there, and for HypertoolMetricsNotReported the target's scrape state.
    #[arg(long, value_name = "URL")]
    pub(crate) prometheus: Option<String>,
    /// How far back the investigation looks: a duration from 1m to 7d (default 1h).
    #[arg(long, default_value = "1h")]
    pub(crate) window: String,
    /// hypertool.toml, for HypertoolMetricsNotReported's checks (where the metrics listener is).
    #[arg(long, env = "HYPERTOOL_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// The metrics listener to check (default: the configuration's server.metrics_listen).
    #[arg(long, value_name = "URL")]
    pub(crate) metrics: Option<String>,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Args)]
pub(crate) struct DoctorArgs {
    /// hypertool.toml to check with (default: ./config/hypertool.toml, else the built-in defaults).
    #[arg(long, env = "HYPERTOOL_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// The data directory the server uses (checked when the server is not running).
    #[arg(long, env = "HYPERTOOL_DATA_DIR", default_value = "data")]
    pub(crate) data_dir: PathBuf,
    /// The API to check (default: the configuration's server.listen).
    #[arg(long, value_name = "URL")]
    pub(crate) server: Option<String>,
    /// The metrics listener to check (default: the configuration's server.metrics_listen).
    #[arg(long, value_name = "URL")]
    pub(crate) metrics: Option<String>,
    /// Also check this Prometheus's targets of the hypertool job (e.g. http://127.0.0.1:9090).
    #[arg(long, value_name = "URL")]
    pub(crate) prometheus: Option<String>,
    /// Print JSON instead of lines.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) async fn runbook(args: RunbookArgs) -> ExitCode {
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

pub(crate) async fn doctor(args: DoctorArgs) -> ExitCode {
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
