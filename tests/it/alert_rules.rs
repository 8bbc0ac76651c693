//! The Prometheus side of the seven alerts: the committed rules are the rendering of the default
//! configuration, promtool accepts and tests them, and every simulated scenario's verdicts from the
//! embedded engine are confirmed by promtool at every evaluation.

use std::path::Path;
use std::process::Command;

use hypertool::alerts::rules::render_rules_yaml;
use hypertool::alerts::simulate::{self, SCENARIOS};
use hypertool::config::{self, Source};

use crate::process::BIN;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool is needed: install Debian's `prometheus` package (scripts/test.sh does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn committed_rules_are_the_rendering_of_the_default_configuration() {
    let cfg = config::load(&Source::Embedded).unwrap();
    let rendered = render_rules_yaml(&cfg.settings.alerts);
    let committed = std::fs::read_to_string(repo("deploy/prometheus/persona_alerts.yml")).unwrap();
    assert!(
        committed == rendered,
        "deploy/prometheus/persona_alerts.yml is stale: run `cargo run -- rules > deploy/prometheus/persona_alerts.yml`"
    );
    // The binary renders the same.
    let out = Command::new(BIN)
        .args(["rules"])
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), rendered);
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    let (ok, text) = promtool(&[
        "check",
        "rules",
        repo("deploy/prometheus/persona_alerts.yml")
            .to_str()
            .unwrap(),
    ]);
    assert!(ok && text.contains("8 rules found"), "{text}");
    let (ok, text) = promtool(&[
        "test",
        "rules",
        repo("deploy/prometheus/persona_alerts_test.yml")
            .to_str()
            .unwrap(),
    ]);
    assert!(ok, "{text}");
    let (ok, text) = promtool(&[
        "check",
        "config",
        repo("deploy/prometheus/prometheus.yml").to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
}

#[test]
fn prometheus_and_the_embedded_engine_agree_on_every_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config::load(&Source::Embedded).unwrap();
    for scenario in SCENARIOS {
        let run = simulate::run(scenario, cfg.engine_config(), cfg.settings.alerts.clone());
        assert!(
            run.as_expected(),
            "{}: expected {:?} firing at the end, got {:?}\n{}",
            scenario.name,
            scenario.expect_firing,
            run.firing_at_end(),
            run.timeline()
        );
        let rules = dir.path().join(format!("{}.rules.yml", scenario.name));
        let test = dir.path().join(format!("{}.test.yml", scenario.name));
        std::fs::write(&rules, render_rules_yaml(&cfg.settings.alerts)).unwrap();
        std::fs::write(
            &test,
            run.promtool_test(&format!("{}.rules.yml", scenario.name)),
        )
        .unwrap();
        let (ok, text) = promtool(&["test", "rules", test.to_str().unwrap()]);
        assert!(
            ok,
            "Prometheus disagrees with the embedded engine on {}:\n{text}",
            scenario.name
        );
    }
}

#[test]
fn simulate_cli_prints_a_timeline_and_writes_a_promtool_test() {
    let dir = tempfile::tempdir().unwrap();
    let test = dir.path().join("overrun.test.yml");
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args([
            "simulate",
            "budget-overrun",
            "--promtool-test",
            test.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("TokenBudgetExceeded{persona=\"backend-engineer\"}  pending -> firing"),
        "{text}"
    );
    assert!(dir.path().join("overrun.rules.yml").is_file());
    let (ok, out) = promtool(&["test", "rules", test.to_str().unwrap()]);
    assert!(ok, "{out}");

    let out = Command::new(BIN)
        .args(["simulate", "teleport"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use one of: healthy"));

    let out = Command::new(BIN)
        .args(["simulate", "metrics-down", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["firing_at_end"],
        serde_json::json!(["HypertoolMetricsNotReported"])
    );
}
