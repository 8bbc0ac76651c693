//! Configuration: the shipped reference persona files load unchanged; budgets.yml reloads without a restart.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hypertool::config::{self, Source};
use hypertool::core::clock::ManualClock;
use serde_json::json;

use crate::common::*;

#[test]
fn the_reference_persona_files_load_unchanged() {
    // The shipped `config/personas/` are the reference persona files (Hypertool's format, unchanged).
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/personas");
    assert!(
        reference.is_dir(),
        "the reference personas are expected at {}",
        reference.display()
    );
    // Loaded from the reference directory itself, with no budgets.yml: the files' tokenBudget applies.
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("hypertool.toml");
    std::fs::write(
        &toml,
        format!(
            "[personas]\ndir = {:?}\n",
            reference.canonicalize().unwrap().display().to_string()
        ),
    )
    .unwrap();
    let cfg = config::load(&Source::File(toml)).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = cfg.personas.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "backend-engineer",
            "data-scientist",
            "devops-engineer",
            "frontend-engineer",
            "observability-expert",
            "testing-specialist"
        ]
    );
    let be = cfg.personas.get("tta-backend-engineer").unwrap();
    assert_eq!(be.name, "backend-engineer");
    assert_eq!(be.display_name, "TTA Backend Engineer");
    assert!(be.allowed_tools["github"].contains(&"github_search_code".to_string()));
    assert_eq!(
        cfg.budgets["data-scientist"].0.tokens, 2000,
        "the reference file's tokenBudget"
    );

    // With the shipped budgets.yml, the runtime budgets of the runbook win.
    let shipped_cfg = config::load(&Source::Embedded).unwrap();
    let tokens: Vec<(String, u64)> = shipped_cfg
        .budgets
        .iter()
        .map(|(k, v)| (k.clone(), v.0.tokens))
        .collect();
    assert_eq!(
        tokens,
        [
            ("backend-engineer", 2000),
            ("data-scientist", 1700),
            ("devops-engineer", 1800),
            ("frontend-engineer", 1800),
            ("observability-expert", 2000),
            ("testing-specialist", 1500)
        ]
        .map(|(k, v)| (k.to_string(), v))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_yml_edits_apply_within_two_seconds_and_bad_edits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config_copy(dir.path());
    let budgets = toml.parent().unwrap().join("budgets.yml");
    let s = start(
        Source::File(toml.clone()),
        &dir.path().join("data"),
        Arc::new(ManualClock::new(T0)),
    )
    .await;
    s.post_events(json!([usage("backend-engineer", "c", "m", 100, 0)]))
        .await;

    let text = std::fs::read_to_string(&budgets).unwrap();
    std::fs::write(
        &budgets,
        text.replace(
            "backend-engineer:\n    tokens: 2000",
            "backend-engineer:\n    tokens: 5000\n    mode: block",
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let remaining = eventually("the new budget", Duration::from_secs(2), || async {
        let m = s.metrics().await;
        m.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "backend-engineer")],
        )
        .filter(|v| *v == 4900.0)
    })
    .await;
    assert_eq!(remaining, 4900.0);
    assert!(started.elapsed() < Duration::from_secs(2));
    let (_, b) = s.get_json("/api/budgets/backend-engineer").await;
    assert_eq!(b["mode"], "block");

    // An invalid edit is refused: the last good configuration stays, and the failure is visible.
    std::fs::write(&budgets, "personas:\n  backend-engineer:\n    tokens: -3\n").unwrap();
    eventually("the refused reload", Duration::from_secs(2), || async {
        let m = s.metrics().await;
        (m.get("hypertool_config_last_reload_successful", &[]) == Some(0.0)).then_some(())
    })
    .await;
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_persona_token_budget_limit",
            &[("persona", "backend-engineer")]
        ),
        Some(5000.0)
    );
    assert_eq!(
        m.get("hypertool_config_reloads_total", &[("result", "failure")]),
        Some(1.0)
    );

    // Fixing the file applies again.
    std::fs::write(
        &budgets,
        "defaults:\n  period: hourly\npersonas:\n  backend-engineer:\n    tokens: 300\n",
    )
    .unwrap();
    eventually("the fixed file", Duration::from_secs(2), || async {
        let m = s.metrics().await;
        (m.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "backend-engineer")],
        ) == Some(200.0))
        .then_some(())
    })
    .await;
    // Alert thresholds in hypertool.toml reload too.
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replace("threshold = 300        # seconds", "threshold = 120"),
    )
    .unwrap();
    eventually(
        "the new SlowWorkflowStage threshold",
        Duration::from_secs(2),
        || async {
            let (_, view) = s.get_json("/api/alerts").await;
            view["alerts"]
                .as_array()?
                .iter()
                .find(|a| a["alertname"] == "SlowWorkflowStage")?["expr"]
                .as_str()?
                .ends_with("> 120")
                .then_some(())
        },
    )
    .await;
    let m = s.metrics().await;
    // Personas left out of budgets.yml fall back to their persona file's tokenBudget.
    assert_eq!(
        m.get(
            "hypertool_persona_token_budget_limit",
            &[("persona", "data-scientist")]
        ),
        Some(2000.0)
    );
    assert_eq!(
        m.get("hypertool_config_last_reload_successful", &[]),
        Some(1.0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxing_a_quality_gate_needs_no_restart_and_a_broken_gate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config_copy(dir.path());
    let workflow = toml.parent().unwrap().join("workflows/package-release.yml");
    let s = start(
        Source::File(toml.clone()),
        &dir.path().join("data"),
        Arc::new(ManualClock::new(T0)),
    )
    .await;
    let evaluate = || async {
        let (status, v) = s
            .post_raw(
                "/v1/quality-gates/evaluate",
                json!({"workflow": "package-release", "stage": "publish",
                       "text": "published it", "record": false})
                .to_string(),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        v["result"].as_str().unwrap().to_string()
    };
    assert_eq!(evaluate().await, "fail");

    // Relax the gate: publish no longer needs a bash block.
    let original = std::fs::read_to_string(&workflow).unwrap();
    let relaxed = original.replace(
        "      code_block: bash\n      max_completion_tokens: 1500",
        "      max_completion_tokens: 1500",
    );
    assert_ne!(relaxed, original);
    std::fs::write(&workflow, &relaxed).unwrap();
    eventually("the relaxed gate", Duration::from_secs(2), || async {
        (evaluate().await == "pass").then_some(())
    })
    .await;

    // A broken regex is refused; the last good workflows stay in force.
    let broken = relaxed.replace("'(?i)\\blorem ipsum\\b'", "'(unclosed'");
    assert_ne!(broken, relaxed);
    std::fs::write(&workflow, broken).unwrap();
    eventually("the refused reload", Duration::from_secs(2), || async {
        let m = s.metrics().await;
        (m.get("hypertool_config_last_reload_successful", &[]) == Some(0.0)).then_some(())
    })
    .await;
    assert_eq!(evaluate().await, "pass");
    let (status, _) = s.get_json("/v1/workflows/package-release").await;
    assert_eq!(status, 200);
    s.stop().await;

    // `hypertool check` names the file and line.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypertool"))
        .args(["check", "--config", toml.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:12: stage `changelog`: `must_not_match` pattern /(unclosed/ is not a valid regex",
            workflow.display()
        )),
        "{stderr}"
    );
}
