//! The embedded alert engine inside `hypertool serve`, driven by the manual clock.

use hypertool::server::evaluate_alerts;
use serde_json::{json, Value};

use crate::common::*;

fn alert<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alertname"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {view}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_exceeded_fires_after_its_for_and_resolves_after_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let state = s.running.as_ref().unwrap().state.clone();
    s.post_events(json!([usage("backend-engineer", "c", "m", 2000, 0)]))
        .await;
    evaluate_alerts(&state).await;
    let (_, view) = s.get_json("/api/alerts").await;
    assert_eq!(
        alert(&view, "TokenBudgetExceeded")["state"],
        "inactive",
        "exactly at 0 is not over"
    );

    s.post_events(json!([usage("backend-engineer", "c", "m", 1, 0)]))
        .await;
    evaluate_alerts(&state).await;
    let (_, view) = s.get_json("/api/alerts").await;
    assert_eq!(alert(&view, "TokenBudgetExceeded")["state"], "pending");

    s.clock.advance_secs(45);
    evaluate_alerts(&state).await;
    assert_eq!(
        alert(&s.get_json("/api/alerts").await.1, "TokenBudgetExceeded")["state"],
        "pending"
    );
    s.clock.advance_secs(15);
    evaluate_alerts(&state).await;
    let (_, view) = s.get_json("/api/alerts").await;
    let a = alert(&view, "TokenBudgetExceeded");
    assert_eq!(a["state"], "firing");
    let i = &a["instances"][0];
    assert_eq!(i["labels"]["persona"], "backend-engineer");
    assert_eq!(i["labels"]["severity"], "critical");
    assert_eq!(i["value"], -1.0);
    assert_eq!(i["active_since"], "2026-11-28T09:00:00.000Z");
    assert!(a["runbook"]
        .as_str()
        .unwrap()
        .ends_with("/runbook#alert-1-token-budget-exceeded"));
    assert_eq!(
        i["annotations"]["description"],
        "Persona backend-engineer has -1 tokens left in its budget period (alert below 0). Every further call adds to the overrun."
    );
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_alerts_firing",
            &[
                ("alertname", "TokenBudgetExceeded"),
                ("severity", "critical")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "hypertool_alerts_firing",
            &[("alertname", "SlowWorkflowStage"), ("severity", "warning")]
        ),
        Some(0.0)
    );
    assert_eq!(
        m.get(
            "hypertool_alert_transitions_total",
            &[("alertname", "TokenBudgetExceeded"), ("state", "firing")]
        ),
        Some(1.0)
    );

    // The CLI shows it.
    let api = s.api.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::process::BIN)
            .args(["alerts", "--server", &api])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.lines().any(|l| l.starts_with("TokenBudgetExceeded")
            && l.contains("firing")
            && l.contains("persona=backend-engineer")),
        "{table}"
    );

    // Resolution.
    s.post_raw("/api/budgets/backend-engineer/reset", "").await;
    s.clock.advance_secs(15);
    evaluate_alerts(&state).await;
    let (_, view) = s.get_json("/api/alerts").await;
    let a = alert(&view, "TokenBudgetExceeded");
    assert_eq!(a["state"], "inactive");
    assert_eq!(a["instances"][0]["resolved_at"], "2026-11-28T09:01:15.000Z");
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_alerts_firing",
            &[
                ("alertname", "TokenBudgetExceeded"),
                ("severity", "critical")
            ]
        ),
        Some(0.0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn langfuse_alert_names_the_missing_key_when_on_and_stays_quiet_when_off() {
    // (enabled, expected state): "auto" with no key set is off (the default configuration of a
    // fresh install must not alert about a Langfuse nobody set up); true with a key missing fires
    // and names the variable; false is off.
    for (enabled, expect) in [
        ("\"auto\"", "disabled"),
        ("true", "firing"),
        ("false", "disabled"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let line = format!("enabled = {enabled}");
        let s = start_edited(
            dir.path(),
            &[
                (
                    "public_key_env = \"LANGFUSE_PUBLIC_KEY\"",
                    "public_key_env = \"HYPERTOOL_TEST_NEVER_SET_PK\"",
                ),
                (
                    "secret_key_env = \"LANGFUSE_SECRET_KEY\"",
                    "secret_key_env = \"HYPERTOOL_TEST_NEVER_SET_SK\"",
                ),
                ("enabled = \"auto\"", &line),
            ],
        )
        .await;
        let state = s.running.as_ref().unwrap().state.clone();
        for _ in 0..22 {
            s.post_events(json!([usage("devops-engineer", "ops", "m", 10, 0)]))
                .await;
            evaluate_alerts(&state).await;
            s.clock.advance_secs(15);
        }
        let (_, view) = s.get_json("/api/alerts").await;
        let a = alert(&view, "LangfuseIntegrationFailing");
        assert_eq!(a["state"], expect, "enabled = {enabled}: {a}");
        let m = s.metrics().await;
        assert_eq!(
            m.get("hypertool_langfuse_enabled", &[]),
            Some(if expect == "firing" { 1.0 } else { 0.0 })
        );
        if expect == "firing" {
            let note = a["instances"][0]["note"].as_str().unwrap();
            assert!(note.contains("credentials are missing"), "{note}");
            assert!(
                note.contains("HYPERTOOL_TEST_NEVER_SET_PK")
                    && note.contains("HYPERTOOL_TEST_NEVER_SET_SK"),
                "{note}"
            );
        } else {
            assert!(a["instances"].as_array().unwrap().is_empty());
        }
        // The self-scrape works: metrics are reported.
        assert_eq!(
            alert(&view, "HypertoolMetricsNotReported")["state"],
            "inactive"
        );
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_listener_that_does_not_answer_fires_metrics_not_reported() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    // Point the self-scrape at a port nobody listens on (taken, then released).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let state = s.running.as_ref().unwrap().state.scraping(closed);
    for _ in 0..8 {
        evaluate_alerts(&state).await;
        s.clock.advance_secs(15);
    }
    // 0s … 1m45s: pending since 0s, for 2m not yet passed.
    assert_eq!(
        alert(
            &s.get_json("/api/alerts").await.1,
            "HypertoolMetricsNotReported"
        )["state"],
        "pending"
    );
    evaluate_alerts(&state).await;
    let (_, view) = s.get_json("/api/alerts").await;
    let a = alert(&view, "HypertoolMetricsNotReported");
    assert_eq!(a["state"], "firing");
    assert_eq!(a["instances"][0]["labels"]["instance"], closed.to_string());
    assert_eq!(a["instances"][0]["labels"]["job"], "hypertool");
    s.stop().await;
}

/// The links point at the server as it actually listens (here a port chosen at start, not the
/// configured 8080), and land on an HTML page where the section's anchor exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_links_point_at_the_listening_server_and_jump_to_their_sections() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let (_, view) = s.get_json("/api/alerts").await;
    for name in [
        "TokenBudgetExceeded",
        "LangfuseIntegrationFailing",
        "TokenBudgetSoftLimitReached",
    ] {
        let link = alert(&view, name)["runbook"].as_str().unwrap().to_string();
        let (page, anchor) = link.split_once('#').unwrap();
        assert_eq!(page, format!("{}/runbook", s.api), "{link}");
        let resp = s.http.get(page).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let html = resp.text().await.unwrap();
        assert!(html.contains(&format!("id=\"{anchor}\"")), "{anchor}");
    }
    // The markdown source, for tools.
    let md = s
        .http
        .get(format!("{}/runbook?format=markdown", s.api))
        .send()
        .await
        .unwrap();
    assert!(md.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/markdown"));
    assert!(md
        .text()
        .await
        .unwrap()
        .starts_with("# hypertool Alert Runbook"));
}

/// `alerts.runbook_url` (a copy that outlives the process) wins over the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_runbook_url_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_edited(
        dir.path(),
        &[(
            "# runbook_url = \"https://wiki.example.com/hypertool/runbook\"",
            "runbook_url = \"https://wiki.example.com/hypertool/runbook\"",
        )],
    )
    .await;
    let (_, view) = s.get_json("/api/alerts").await;
    assert_eq!(
        alert(&view, "SlowWorkflowStage")["runbook"],
        "https://wiki.example.com/hypertool/runbook#alert-4-slow-workflow-stage"
    );
}

/// The graduated budget alerts in order: soft limit (warning) first, then, once over the budget,
/// TokenBudgetExceeded takes over and the soft-limit alert resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_limit_alert_fires_before_the_budget_is_spent_and_hands_over() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let state = s.running.as_ref().unwrap().state.clone();
    // backend-engineer: 2000 tokens, soft limit 0.8 → 1600.
    s.post_events(json!([usage("backend-engineer", "c", "m", 1599, 0)]))
        .await;
    evaluate_alerts(&state).await;
    s.clock.advance_secs(120);
    evaluate_alerts(&state).await;
    let (_, view) = s.get_json("/api/alerts").await;
    assert_eq!(
        alert(&view, "TokenBudgetSoftLimitReached")["state"],
        "inactive",
        "1599 of a 1600 soft limit"
    );
    s.post_events(json!([usage("backend-engineer", "c", "m", 1, 0)]))
        .await;
    evaluate_alerts(&state).await;
    s.clock.advance_secs(60);
    evaluate_alerts(&state).await;
    let (_, view) = s.get_json("/api/alerts").await;
    let a = alert(&view, "TokenBudgetSoftLimitReached");
    assert_eq!(a["state"], "firing");
    assert_eq!(a["instances"][0]["labels"]["persona"], "backend-engineer");
    assert_eq!(a["instances"][0]["labels"]["severity"], "warning");
    assert_eq!(a["instances"][0]["value"], 1600.0);

    s.post_events(json!([usage("backend-engineer", "c", "m", 401, 0)]))
        .await;
    evaluate_alerts(&state).await;
    let (_, view) = s.get_json("/api/alerts").await;
    assert_ne!(
        alert(&view, "TokenBudgetSoftLimitReached")["state"],
        "firing"
    );
    assert_eq!(alert(&view, "TokenBudgetExceeded")["state"], "pending");
}
