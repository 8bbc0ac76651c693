//! The commands that read the configuration files only: `check`, `rules`, `prompts`,
//! `simulate`, `grafana`.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;

use hypertool::alerts::rules::render_rules_yaml;
use hypertool::alerts::simulate::{self as sim, Scenario, SCENARIOS};
use hypertool::config::{self, Source};

pub(crate) fn load_or_exit(path: Option<&std::path::Path>) -> Result<config::Config, ExitCode> {
    let source = Source::discover(path);
    config::load(&source).map_err(|errors| {
        errln!("{errors}");
        errln!("{} error(s) in {}", errors.0.len(), source.describe());
        ExitCode::from(1)
    })
}

pub(crate) fn rules(path: Option<PathBuf>) -> ExitCode {
    match load_or_exit(path.as_deref()) {
        Ok(cfg) => {
            out!("{}", render_rules_yaml(&cfg.settings.alerts));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

pub(crate) fn simulate(
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

/// `hypertool prompts`: each prompt file a stage variant uses, its version and where.
pub(crate) fn prompts(path: Option<PathBuf>) -> ExitCode {
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

pub(crate) fn check(path: Option<PathBuf>) -> ExitCode {
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
    let (loaded, warnings) = config::load_checked(&source);
    // Allowed but likely not meant: said whether or not there are problems.
    let warn = |to_stderr: bool| {
        for w in &warnings {
            if to_stderr {
                errln!("warning: {w}");
            } else {
                outln!("warning: {w}");
            }
        }
    };
    match loaded {
        Ok(cfg) => {
            warn(false);
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
                    Ok(servers) => {
                        outln!(
                            "{}: ok ({} MCP servers)",
                            path.display(),
                            servers.servers.len()
                        );
                        let names = servers.servers.iter().map(|s| s.name.as_str());
                        for server in
                            hypertool::mcp::toolset::allowed_to_nobody(names, &cfg.personas)
                        {
                            outln!(
                                "warning: MCP server `{server}` is allowed to no persona: add \"{server}\" to allowedServers in a persona file, or its tools are shown to nobody"
                            );
                        }
                    }
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
            let mut all = errors.0;
            // The MCP servers file too, when the settings name one that can be read.
            if let Source::File(toml) = &source {
                all.extend(mcp_problems(toml));
            }
            let all = config::ConfigErrors(all);
            errln!("{all}");
            warn(true);
            errln!("{}", problem_summary(&all));
            ExitCode::from(1)
        }
    }
}

/// The problems of the MCP servers file `[mcp] servers` names (read leniently: the settings may
/// have problems of their own).
fn mcp_problems(toml: &std::path::Path) -> Vec<config::error::ConfigError> {
    let Ok(text) = std::fs::read_to_string(toml) else {
        return Vec::new();
    };
    let (settings, _) =
        config::settings::Settings::parse_lenient(&toml.display().to_string(), &text);
    let Some(servers) = settings.mcp.servers else {
        return Vec::new();
    };
    let path = toml
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(servers);
    match hypertool::mcp::config::load_configured(Some(&path)) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.0,
    }
}

/// `N problems: 2 in hypertool.toml, 1 in workflows/release.yml` — per file, in the order found.
fn problem_summary(errors: &config::ConfigErrors) -> String {
    let mut per_file: Vec<(&str, usize)> = Vec::new();
    for e in &errors.0 {
        match per_file.iter_mut().find(|(f, _)| *f == e.file) {
            Some((_, n)) => *n += 1,
            None => per_file.push((&e.file, 1)),
        }
    }
    let files: Vec<String> = per_file
        .iter()
        .map(|(file, n)| format!("{n} in {file}"))
        .collect();
    format!(
        "{} problem{}: {}",
        errors.0.len(),
        if errors.0.len() == 1 { "" } else { "s" },
        files.join(", ")
    )
}

/// `hypertool grafana`: writes the dashboards into `out`.
pub(crate) fn grafana(out: &std::path::Path) -> ExitCode {
    if let Err(e) = std::fs::create_dir_all(out) {
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
