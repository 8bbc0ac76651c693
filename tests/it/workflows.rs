//! Workflow runs, stage timing, quality-gate evaluation through the API, and SlowWorkflowStage on
//! a hung stage — all on the manual clock.

use hypertool::core::clock::Clock;
use hypertool::server::evaluate_alerts;
use serde_json::{json, Value};

use crate::common::*;

async fn post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    s.post_raw(path, body.to_string()).await
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_time_their_stages_and_answer_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;

    let (status, list) = s.get_json("/v1/workflows").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "feature-development",
            "incident-response",
            "package-release"
        ]
    );
    let (_, fd) = s.get_json("/v1/workflows/feature-development").await;
    assert_eq!(fd["stages"][0]["name"], "design");
    assert_eq!(fd["stages"][0]["model"], "quality");
    assert_eq!(fd["stages"][0]["resolved_model"], "mock/quality");
    assert_eq!(fd["chatmodes"], json!(["feature-implementation"]));

    // Bad input: unknown workflow, unknown stage, unknown run, a run of another workflow.
    let (status, body) = post(&s, "/v1/workflows/nope/runs", json!({})).await;
    assert_eq!((status, code(&body)), (404, "unknown_workflow"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("feature-development, incident-response, package-release"));
    let (status, run) = post(
        &s,
        "/v1/workflows/feature-development/runs",
        json!({"session": "s1"}),
    )
    .await;
    assert_eq!(status, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    assert_eq!(run["status"], "running");
    let base = format!("/v1/workflows/feature-development/runs/{id}");
    let (status, body) = post(&s, &format!("{base}/stages/deploy/start"), json!({})).await;
    assert_eq!((status, code(&body)), (404, "unknown_stage"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("design, implementation, testing, review"));
    let (status, body) = post(
        &s,
        &format!("/v1/workflows/incident-response/runs/{id}/stages/triage/start"),
        json!({}),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "run_workflow_mismatch"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("belongs to workflow `feature-development`"));
    let (status, body) = post(
        &s,
        "/v1/workflows/feature-development/runs/run-none/stages/design/start",
        json!({}),
    )
    .await;
    assert_eq!((status, code(&body)), (404, "unknown_run"));
    let (status, body) = post(&s, &format!("{base}/stages/design/finish"), json!({})).await;
    assert_eq!((status, code(&body)), (409, "stage_not_running"));
    let (status, body) = s
        .post_raw(&format!("{base}/stages/design/start"), "{nope")
        .await;
    assert_eq!((status, code(&body)), (400, "malformed_json"));
    let (status, body) = post(
        &s,
        &format!("{base}/stages/design/start"),
        json!({"persona": "backend-engineer", "colour": 1}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_body"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("colour"));

    // design runs for 400 s: visible while it runs, observed once it ends.
    let (status, _) = post(&s, &format!("{base}/stages/design/start"), json!({})).await;
    assert_eq!(status, 200);
    s.clock.advance_secs(400);
    let m = s.metrics().await;
    let running = [("workflow", "feature-development"), ("stage", "design")];
    assert_eq!(
        m.get("hypertool_workflow_stage_running_seconds", &running),
        Some(400.0)
    );
    let design_done = [
        ("workflow", "feature-development"),
        ("stage", "design"),
        ("persona", "backend-engineer"),
    ];
    assert_eq!(
        m.get(
            "hypertool_workflow_stage_duration_seconds_count",
            &design_done
        ),
        None
    );
    // Starting the next stage ends design.
    let (_, view) = post(
        &s,
        &format!("{base}/stages/implementation/start"),
        json!({}),
    )
    .await;
    assert_eq!(view["stages"]["design"]["status"], "finished");
    assert_eq!(view["stages"]["design"]["duration_seconds"], 400.0);
    let m = s.metrics().await;
    assert_eq!(
        m.get("hypertool_workflow_stage_running_seconds", &running),
        None
    );
    assert_eq!(
        m.get(
            "hypertool_workflow_stage_duration_seconds_sum",
            &design_done
        ),
        Some(400.0)
    );

    s.clock.advance_secs(60);
    let (status, view) = post(
        &s,
        &format!("{base}/stages/implementation/finish"),
        json!({"gate": "fail", "reasons": "code_block: no fenced code block"}),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    let imp = &view["stages"]["implementation"];
    assert_eq!(imp["status"], "failed");
    assert_eq!(imp["attempts"], 1);
    assert_eq!(imp["duration_seconds"], 60.0);
    let m = s.metrics().await;
    let gate = |result: &'static str| {
        [
            ("workflow", "feature-development"),
            ("stage", "implementation"),
            ("model", "mock/balanced"),
            ("result", result),
        ]
    };
    assert_eq!(
        m.get("hypertool_workflow_quality_gate_total", &gate("fail")),
        Some(1.0)
    );
    assert_eq!(
        m.get("hypertool_workflow_quality_gate_total", &gate("pass")),
        Some(0.0)
    );

    let (status, view) = post(&s, &format!("{base}/finish"), json!({"status": "failed"})).await;
    assert_eq!((status, view["status"].as_str()), (200, Some("failed")));
    let (status, body) = post(&s, &format!("{base}/finish"), json!({})).await;
    assert_eq!((status, code(&body)), (409, "run_finished"));
    let (status, body) = post(&s, &format!("{base}/stages/testing/start"), json!({})).await;
    assert_eq!((status, code(&body)), (409, "run_finished"));
    let (_, failed) = s
        .get_json("/v1/workflows/feature-development/runs?status=failed")
        .await;
    assert_eq!(failed["data"][0]["id"], id.as_str());
    let (status, body) = s
        .get_json("/v1/workflows/feature-development/runs?status=odd")
        .await;
    assert_eq!((status, code(&body)), (400, "invalid_status"));

    // Runs are ledger events: a restart shows the same run.
    let clock = s.clock.clone();
    s.stop().await;
    let s = start(hypertool::config::Source::Embedded, dir.path(), clock).await;
    let (status, again) = s.get_json(&base).await;
    assert_eq!(status, 200);
    assert_eq!(again, view);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_gates_evaluate_texts_for_agents_that_call_llms_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let eval = |text: &str, record: bool| {
        json!({"workflow": "package-release", "stage": "version-bump", "text": text,
               "model": "gpt-4o-mini", "record": record})
    };
    let (status, pass) = post(
        &s,
        "/v1/quality-gates/evaluate",
        eval(
            "Bumped:\n```json\n{\"version\": \"1.4.0\", \"previous\": \"1.3.2\"}\n```",
            true,
        ),
    )
    .await;
    assert_eq!(status, 200, "{pass}");
    assert_eq!(pass["result"], "pass");
    assert_eq!(pass["summary"], "pass");
    let (_, fail) = post(
        &s,
        "/v1/quality-gates/evaluate",
        eval("{\"version\": \"one\"}", true),
    )
    .await;
    assert_eq!(fail["result"], "fail");
    assert_eq!(fail["failures"][0]["criterion"], "json_schema");
    assert!(fail["summary"]
        .as_str()
        .unwrap()
        .starts_with("fail; json_schema: at /version"));
    // Not recorded when asked not to.
    post(
        &s,
        "/v1/quality-gates/evaluate",
        eval("no json at all", false),
    )
    .await;
    let m = s.metrics().await;
    let labels = |r| {
        [
            ("workflow", "package-release"),
            ("stage", "version-bump"),
            ("model", "gpt-4o-mini"),
            ("result", r),
        ]
    };
    assert_eq!(
        m.get("hypertool_workflow_quality_gate_total", &labels("pass")),
        Some(1.0)
    );
    assert_eq!(
        m.get("hypertool_workflow_quality_gate_total", &labels("fail")),
        Some(1.0)
    );

    // Every criterion of a stage is named when it fails.
    let (_, review) = post(
        &s,
        "/v1/quality-gates/evaluate",
        json!({"workflow": "feature-development", "stage": "review", "text": "looks fine",
               "completion_tokens": 2500, "record": false}),
    )
    .await;
    let criteria: Vec<&str> = review["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["criterion"].as_str().unwrap())
        .collect();
    assert_eq!(criteria, ["required_sections", "max_completion_tokens"]);

    let (status, body) = post(
        &s,
        "/v1/quality-gates/evaluate",
        json!({"workflow": "package-release", "stage": "nope", "text": "x"}),
    )
    .await;
    assert_eq!((status, code(&body)), (404, "unknown_stage"));
    let (status, body) = post(
        &s,
        "/v1/quality-gates/evaluate",
        json!({"workflow": "package-release", "stage": "publish"}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_body"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("missing field `text`"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_stage_fires_slow_workflow_stage_before_it_ever_ends() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let state = s.running.as_ref().unwrap().state.clone();
    let alert_state = |view: &Value| {
        view["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["alertname"] == "SlowWorkflowStage")
            .unwrap()
            .clone()
    };
    // A run of incident-response whose diagnosis never finishes, and one whose triage finishes
    // in 200 s (quiet: under the 300 s threshold).
    let (_, hung) = post(&s, "/v1/workflows/incident-response/runs", json!({})).await;
    let (_, quick) = post(&s, "/v1/workflows/incident-response/runs", json!({})).await;
    let hung = format!(
        "/v1/workflows/incident-response/runs/{}",
        hung["id"].as_str().unwrap()
    );
    let quick = format!(
        "/v1/workflows/incident-response/runs/{}",
        quick["id"].as_str().unwrap()
    );
    post(&s, &format!("{hung}/stages/diagnosis/start"), json!({})).await;
    post(&s, &format!("{quick}/stages/triage/start"), json!({})).await;
    for _ in 0..20 {
        s.clock.advance_secs(15);
        evaluate_alerts(&state).await;
        if s.clock.now_ms() - T0 == 200_000 - 5_000 {
            post(&s, &format!("{quick}/stages/triage/finish"), json!({})).await;
        }
    }
    // 300 s: exactly at the threshold, not above it.
    let (_, view) = s.get_json("/api/alerts").await;
    assert_eq!(alert_state(&view)["state"], "inactive");
    s.clock.advance_secs(15);
    evaluate_alerts(&state).await;
    let (_, view) = s.get_json("/api/alerts").await;
    assert_eq!(alert_state(&view)["state"], "pending");
    // `for: 10m` later it fires, for the hung stage only.
    for _ in 0..40 {
        s.clock.advance_secs(15);
        evaluate_alerts(&state).await;
    }
    let (_, view) = s.get_json("/api/alerts").await;
    let a = alert_state(&view);
    assert_eq!(a["state"], "firing", "{a}");
    let instances = a["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{a}");
    assert_eq!(instances[0]["labels"]["stage"], "diagnosis");
    assert_eq!(instances[0]["labels"]["workflow"], "incident-response");
    assert_eq!(instances[0]["value"], 915.0);

    // Finishing the stage resolves it (its one 915 s duration is a single observation in the
    // histogram, whose rate over 5m then decays to nothing).
    post(
        &s,
        &format!("{hung}/finish"),
        json!({"status": "cancelled"}),
    )
    .await;
    for _ in 0..25 {
        s.clock.advance_secs(15);
        evaluate_alerts(&state).await;
    }
    let (_, view) = s.get_json("/api/alerts").await;
    assert_eq!(alert_state(&view)["state"], "inactive");
    s.stop().await;
}
