//! The operator's side: the runbook's investigations on a seeded ledger, the quality-gate history,
//! gate changes recorded across reloads and restarts, budget suggestions and `--apply`, and
//! `hypertool doctor` and `hypertool runbook` as an operator runs them.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::process::{Daemon, BIN};

fn ts(ms: i64) -> String {
    hypertool::core::clock::to_rfc3339(ms)
}

fn cause<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["causes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cause"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {report}"))
}

fn finding<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("{check} missing from {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_investigation_finds_repeated_prompts_unplanned_chatmodes_and_the_spike() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    // The hour before: backend-engineer on gpt-4o-mini, small calls. The last 30 minutes: 12 calls
    // of one identical prompt on gpt-4o from a chatmode no one planned.
    let mut events = Vec::new();
    for i in 0..6 {
        events.push(json!({"type": "usage", "persona": "backend-engineer", "chatmode": "feature-implementation",
            "model": "gpt-4o-mini", "prompt_tokens": 50, "completion_tokens": 10,
            "prompt_hash": format!("p{i}"), "timestamp": ts(T0 - 80 * 60_000 + i * 60_000)}));
    }
    for i in 0..12 {
        events.push(
            json!({"type": "usage", "persona": "tta-backend-engineer", "chatmode": "night-batch",
            "model": "gpt-4o", "prompt_tokens": 180, "completion_tokens": 20,
            "prompt_hash": "same-prompt", "timestamp": ts(T0 - 20 * 60_000 + i * 60_000)}),
        );
    }
    assert_eq!(s.post_events(json!(events)).await.0, 200);
    let (status, r) = s.get_json("/api/investigations/TokenBudgetExceeded").await;
    assert_eq!(status, 200, "{r}");
    // 6 × 60 + 12 × 200 = 2760 of 2000.
    assert!(
        finding(&r, "budgets")["found"]
            .as_str()
            .unwrap()
            .contains("backend-engineer: 2760 of 2000 used (-760 left)"),
        "{r}"
    );
    let repeated = &finding(&r, "repeated prompts")["data"];
    assert_eq!(repeated["repeated_calls"], 11);
    assert_eq!(repeated["tokens_saved"], 11 * 200);
    assert_eq!(
        finding(&r, "chatmodes not in the budget plan")["data"]["night-batch"],
        2400
    );
    assert!(finding(&r, "model change")["found"]
        .as_str()
        .unwrap()
        .contains("gpt-4o-mini (60 tokens/call) → gpt-4o (200 tokens/call)"));
    let ratio = finding(&r, "usage ratio (last half window / the window before)");
    assert!(
        ratio["found"].as_str().unwrap().ends_with(": a spike"),
        "{ratio}"
    );
    // The ranking follows the evidence: caching, unplanned usage and the model change lead; the
    // prompts are all the same size, so no bloat.
    let top: Vec<&str> = r["causes"].as_array().unwrap()[..3]
        .iter()
        .map(|c| c["cause"].as_str().unwrap())
        .collect();
    for c in ["Inefficient caching", "Unexpected usage", "Model change"] {
        assert!(top.contains(&c), "{c} not in the top 3: {top:?}");
    }
    assert_eq!(cause(&r, "Prompt bloat")["score"], 0.0);
    assert!(cause(&r, "Inefficient caching")["fix"]
        .as_str()
        .unwrap()
        .contains("[gateway.cache]"));

    // Unknown alert, bad window: clear errors.
    let (status, v) = s.get_json("/api/investigations/NoSuchAlert").await;
    assert_eq!(status, 404);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("TokenBudgetExceeded"));
    let (status, v) = s
        .get_json("/api/investigations/SlowWorkflowStage?window=forever")
        .await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("window"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_history_answers_by_stage_criterion_and_result() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let stage = |st: &str, pass: bool, reason: &str, at: i64| {
        json!({"type": "stage", "workflow": "feature-development", "stage": st, "persona": "backend-engineer",
            "model": "gpt-4o", "duration_seconds": 30, "gate": if pass {"pass"} else {"fail"},
            "reason": if pass { Value::Null } else { json!(reason) }, "timestamp": ts(at)})
    };
    let events = vec![
        stage(
            "implementation",
            false,
            "code_block: no fenced code block",
            T0 - 3_000_000,
        ),
        stage(
            "implementation",
            false,
            "code_block: no fenced code block; must_not_match: TODO found",
            T0 - 2_000_000,
        ),
        stage("implementation", true, "", T0 - 1_000_000),
        stage(
            "design",
            false,
            "min_lines: 3 non-blank lines, at least 10 required",
            T0 - 500_000,
        ),
        // Two days ago: outside the default day.
        stage("design", false, "min_lines: 1", T0 - 2 * 86_400_000),
    ];
    assert_eq!(s.post_events(json!(events)).await.0, 200);
    let (status, v) = s.get_json("/api/quality-gates/history").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["verdicts"].as_array().unwrap().len(), 4);
    let implementation = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["stage"] == "implementation")
        .unwrap();
    assert_eq!(
        (
            implementation["verdicts"].as_u64(),
            implementation["failed"].as_u64()
        ),
        (Some(3), Some(2))
    );
    assert_eq!(
        v["failed_criteria"][0],
        json!({"criterion": "code_block", "failures": 2})
    );
    let (_, v) = s
        .get_json("/api/quality-gates/history?stage=design&since=7d&result=fail")
        .await;
    let verdicts = v["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 2);
    assert_eq!(verdicts[0]["failed"], json!(["min_lines"]));
    assert!(
        verdicts[0]["at"].as_str().unwrap() < verdicts[1]["at"].as_str().unwrap(),
        "oldest first"
    );
    let (_, v) = s.get_json("/api/quality-gates/history?limit=1").await;
    assert_eq!(
        (v["verdicts"].as_array().unwrap().len(), &v["truncated"]),
        (1, &json!(true))
    );
    for (query, param) in [
        ("since=yesterday", "since"),
        ("result=maybe", "result"),
        ("limit=0", "limit"),
    ] {
        let (status, v) = s
            .get_json(&format!("/api/quality-gates/history?{query}"))
            .await;
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{query}: {v}"
        );
    }
    let (status, v) = s.get_json("/api/quality-gates/history?colour=red").await;
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("workflow, stage, since"),
        "{v}"
    );
    // The CLI shows the same.
    let out = Command::new(BIN)
        .args([
            "gates",
            "history",
            "--server",
            s.api.trim_start_matches("http://"),
            "--stage",
            "implementation",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("feature-development/implementation  3         2       67 %"),
        "{text}"
    );
    assert!(text.contains("must_not_match    1"), "{text}");
}

/// A gate edited while serving is recorded (and named by the investigation); one edited while
/// hypertool was down is recorded at the next start; an unchanged restart records nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_changes_are_recorded_at_reload_and_at_start_and_ranked_first() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config_copy(dir.path());
    let workflow = toml
        .parent()
        .unwrap()
        .join("workflows/feature-development.yml");
    let data = dir.path().join("data");
    let clock = std::sync::Arc::new(hypertool::core::clock::ManualClock::new(T0));
    let s = start(
        hypertool::config::Source::File(toml.clone()),
        &data,
        clock.clone(),
    )
    .await;
    let changes = |s: &TestServer| {
        let http = s.http.clone();
        let api = s.api.clone();
        async move {
            let r: Value = http
                .get(format!(
                    "{api}/api/investigations/HighQualityGateFailureRate"
                ))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r
        }
    };
    let r = changes(&s).await;
    assert_eq!(
        finding(&r, "recent gate-configuration changes (7 days)")["data"],
        json!([]),
        "a first start records no change"
    );
    // Make the design stage stricter while serving.
    let text = std::fs::read_to_string(&workflow).unwrap();
    std::fs::write(&workflow, text.replace("min_lines: 10", "min_lines: 40")).unwrap();
    let recorded = eventually(
        "the gate change to be recorded",
        Duration::from_secs(20),
        || {
            let fut = changes(&s);
            async move {
                let r = fut.await;
                let data =
                    finding(&r, "recent gate-configuration changes (7 days)")["data"].clone();
                (data.as_array().is_some_and(|a| a.len() == 1)).then_some(data)
            }
        },
    )
    .await;
    assert_eq!(recorded[0]["stage"], "design");
    assert_eq!(recorded[0]["before"]["min_lines"], 10);
    assert_eq!(recorded[0]["after"]["min_lines"], 40);
    // Failures begin after the change: the stricter gate is the first suspect.
    clock.advance_secs(60);
    let fails: Vec<Value> = (0..5)
        .map(|i| json!({"type": "stage", "workflow": "feature-development", "stage": "design",
            "persona": "backend-engineer", "model": if i % 2 == 0 {"gpt-4o"} else {"gpt-4o-mini"},
            "duration_seconds": 20, "gate": "fail", "reason": "min_lines: 12 non-blank lines, at least 40 required"}))
        .collect();
    assert_eq!(s.post_events(json!(fails)).await.0, 200);
    let r = changes(&s).await;
    assert_eq!(r["causes"][0]["cause"], "Stricter criteria", "{r}");
    s.stop().await;

    // Restart unchanged: nothing new. Then change while down: recorded at start.
    let s = start(
        hypertool::config::Source::File(toml.clone()),
        &data,
        clock.clone(),
    )
    .await;
    let r = changes(&s).await;
    assert_eq!(
        finding(&r, "recent gate-configuration changes (7 days)")["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    s.stop().await;
    let text = std::fs::read_to_string(&workflow).unwrap();
    std::fs::write(&workflow, text.replace("min_lines: 40", "min_lines: 20")).unwrap();
    let s = start(hypertool::config::Source::File(toml), &data, clock).await;
    let r = changes(&s).await;
    let data = finding(&r, "recent gate-configuration changes (7 days)")["data"].clone();
    assert_eq!(data.as_array().unwrap().len(), 2, "{data}");
    assert_eq!(
        (
            data[1]["before"]["min_lines"].as_u64(),
            data[1]["after"]["min_lines"].as_u64()
        ),
        (Some(40), Some(20))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_suggest_uses_the_p95_of_daily_usage_and_apply_rewrites_budgets_yml() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_edited(dir.path(), &[]).await;
    let budgets = dir.path().join("config/budgets.yml");
    // backend-engineer: 100, 200, … 1000 tokens on the ten days before T0's day; testing-specialist
    // (weekly budget after the edit below) 500 a day; today's usage does not count.
    let day = 86_400_000;
    let today = T0 - T0.rem_euclid(day);
    let mut events = Vec::new();
    for d in 1..=10i64 {
        events.push(json!({"type": "usage", "persona": "backend-engineer", "chatmode": "c", "model": "m",
            "prompt_tokens": (11 - d) * 100, "completion_tokens": 0, "timestamp": ts(today - d * day + 3_600_000)}));
        events.push(json!({"type": "usage", "persona": "testing-specialist", "chatmode": "c", "model": "m",
            "prompt_tokens": 500, "completion_tokens": 0, "timestamp": ts(today - d * day + 7_200_000)}));
    }
    events.push(
        json!({"type": "usage", "persona": "backend-engineer", "chatmode": "c", "model": "m",
        "prompt_tokens": 99_999, "completion_tokens": 0}),
    );
    assert_eq!(s.post_events(json!(events)).await.0, 200);
    let text = std::fs::read_to_string(&budgets).unwrap();
    assert!(text.contains("  testing-specialist:\n    tokens: 1500\n"));
    std::fs::write(
        &budgets,
        text.replace(
            "  testing-specialist:\n    tokens: 1500\n",
            "  testing-specialist:\n    tokens: 1500\n    period: weekly\n",
        ),
    )
    .unwrap();
    let (status, v) = s.get_json("/api/budgets/suggestions").await;
    assert_eq!(status, 200, "{v}");
    let of = |p: &str| {
        v["suggestions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["persona"] == p)
            .cloned()
            .unwrap()
    };
    // Sorted 100…1000: p95 of ten values is the 10th (index round(9 × 0.95) = 9): 1000; + 20 %.
    assert_eq!(of("backend-engineer")["p95_daily_tokens"], 1000);
    assert_eq!(of("backend-engineer")["suggested_daily_tokens"], 1200);
    assert_eq!(of("backend-engineer")["days"], 10);
    assert_eq!(of("testing-specialist")["suggested_daily_tokens"], 600);
    let (status, _) = s.get_json("/api/budgets/suggestions?days=0").await;
    assert_eq!(status, 400);

    // Wait until the weekly period is in force, then apply.
    eventually(
        "the weekly budget to load",
        Duration::from_secs(20),
        || async {
            let (_, b) = s.get_json("/api/budgets/testing-specialist").await;
            (b["period"] == "weekly").then_some(())
        },
    )
    .await;
    let out = Command::new(BIN)
        .args([
            "budget",
            "suggest",
            "--apply",
            "--config",
            dir.path().join("config/hypertool.toml").to_str().unwrap(),
            "--server",
            &s.api,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("testing-specialist: not changed (its budget is weekly"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&budgets).unwrap();
    assert!(
        text.contains("  backend-engineer:\n    tokens: 1200\n"),
        "{text}"
    );
    assert!(
        text.contains("  testing-specialist:\n    tokens: 1500\n"),
        "{text}"
    );
    assert!(
        text.starts_with("# Token (and optional USD) budgets"),
        "comments kept"
    );
    // The server reloads it.
    eventually(
        "the suggested budget to apply",
        Duration::from_secs(20),
        || async {
            let (_, b) = s.get_json("/api/budgets/backend-engineer").await;
            (b["tokens"] == 1200).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_and_the_runbook_command_as_an_operator_runs_them() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(dir.path(), &[]);
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&[
        "doctor",
        "--server",
        &daemon.api,
        "--metrics",
        &daemon.metrics,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    for line in [
        "ok   configuration: built-in defaults",
        "ok   server:",
        "ok   ledger: writable",
        "ok   metrics:",
    ] {
        assert!(out.contains(line), "{line} missing:\n{out}");
    }
    // The metrics listener somewhere else: one failing line, exit 1.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let (code, out, _) = run(&["doctor", "--server", &daemon.api, "--metrics", &nowhere]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.lines().any(|l| l.starts_with("FAIL metrics:")), "{out}");

    // The list, a wrong name, a section.
    let (code, out, _) = run(&["runbook"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("  ")).count(),
        8,
        "{out}"
    );
    let (code, _, err) = run(&["runbook", "TokenBudgetExceded"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("use one of: TokenBudgetExceeded"), "{err}");
    let (_, out, _) = run(&["runbook", "SlowWorkflowStage", "--print"]);
    assert!(out.starts_with("## Alert 4: Slow Workflow Stage"), "{out}");

    // An investigation, for machines.
    let http = reqwest::Client::new();
    let events: Vec<Value> = (0..5)
        .map(|_| {
            json!({"type": "usage", "persona": "backend-engineer", "chatmode": "c", "model": "m",
            "prompt_tokens": 500, "completion_tokens": 0, "prompt_hash": "again"})
        })
        .collect();
    let resp = http
        .post(format!("{}/v1/events", daemon.api))
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (code, out, err) = run(&[
        "runbook",
        "TokenBudgetExceeded",
        "--server",
        &daemon.api,
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["investigation"]["causes"][0]["cause"], "Inefficient caching",
        "{v}"
    );
    // And for people: checked, found, causes with indicator and fix, the runbook's link.
    let (_, out, _) = run(&["runbook", "TokenBudgetExceeded", "--server", &daemon.api]);
    for part in [
        "Checked:",
        "[FAIL] budgets: backend-engineer: 2500 of 2000 used",
        "1. Inefficient caching",
        "indicator:",
        "fix:",
        "/runbook#alert-1-token-budget-exceeded",
    ] {
        assert!(out.contains(part), "{part} missing:\n{out}");
    }

    // HypertoolMetricsNotReported is checked from outside: a port held by something else is a
    // port conflict.
    let squatter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let squatted = squatter.local_addr().unwrap();
    tokio::spawn(async move {
        let app =
            axum::Router::new().route("/metrics", axum::routing::get(|| async { "not hypertool" }));
        axum::serve(squatter, app).await.unwrap();
    });
    let (code, out, _) = run(&[
        "runbook",
        "HypertoolMetricsNotReported",
        "--server",
        &daemon.api,
        "--metrics",
        &squatted.to_string(),
        "--json",
    ]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["investigation"]["causes"][0]["cause"], "Port conflict",
        "{v}"
    );
    assert!(finding(&v["investigation"], "metrics endpoint")["found"]
        .as_str()
        .unwrap()
        .contains("not hypertool's metrics"));
    drop(daemon);
    // With the server gone, the API port does not answer.
    let (_, out, _) = run(&[
        "runbook",
        "HypertoolMetricsNotReported",
        "--server",
        &nowhere,
        "--metrics",
        &nowhere,
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(finding(&v["investigation"], "API port")["status"], "fail");
    assert_eq!(
        finding(&v["investigation"], "metrics endpoint")["status"],
        "fail"
    );
}

/// With hypertool down and its configured port taken by another program, doctor names the port
/// and the holder's answer, and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_a_port_held_by_another_program() {
    let dir = tempfile::tempdir().unwrap();
    let squatter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let held = squatter.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(squatter, axum::Router::new()).await.unwrap();
    });
    let free = free_port();
    let toml = config_copy(dir.path());
    let text = std::fs::read_to_string(&toml).unwrap();
    let text = text
        .replacen(
            "listen = \"127.0.0.1:8080\"",
            &format!("listen = \"{held}\""),
            1,
        )
        .replacen(
            "metrics_listen = \"127.0.0.1:9464\"",
            &format!("metrics_listen = \"127.0.0.1:{free}\""),
            1,
        );
    assert!(text.contains(&held.to_string()) && text.contains(&free.to_string()));
    std::fs::write(&toml, text).unwrap();
    let out = Command::new(BIN)
        .args(["doctor", "--config", toml.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL server:") && text.contains("without hypertool's readiness"),
        "{text}"
    );
    assert!(
        text.contains(&format!("FAIL API port: {held} is held by another process")),
        "{text}"
    );
    assert!(
        text.contains(&format!("ok   metrics port: 127.0.0.1:{free} is free")),
        "{text}"
    );
    assert!(
        text.contains("ok   ledger:") && text.contains("is writable"),
        "{text}"
    );
}

/// Langfuse refusing the keys: the investigation calls it with them, says so, ranks wrong
/// credentials first, and never shows a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_langfuse_investigation_makes_an_authenticated_test_call() {
    use axum::http::{HeaderMap, StatusCode};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = format!("http://{}", listener.local_addr().unwrap());
    // Accepts only pk-lf-right:sk-lf-right (base64 "pk-lf-right:sk-lf-right").
    let app = axum::Router::new().route(
        "/api/public/projects",
        axum::routing::get(|headers: HeaderMap| async move {
            let ok = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v == "Basic cGstbGYtcmlnaHQ6c2stbGYtcmlnaHQ=");
            if ok {
                (StatusCode::OK, "{\"data\":[]}")
            } else {
                (
                    StatusCode::UNAUTHORIZED,
                    "{\"message\":\"Invalid credentials\"}",
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    std::env::set_var("HYPERTOOL_TEST_OPS_LF_PK", "pk-lf-wrong");
    std::env::set_var("HYPERTOOL_TEST_OPS_LF_SK", "sk-lf-wrong-secret");
    std::env::set_var("HYPERTOOL_TEST_OPS_LF_PK2", "pk-lf-right");
    std::env::set_var("HYPERTOOL_TEST_OPS_LF_SK2", "sk-lf-right");
    for (pk, sk, first) in [
        (
            "HYPERTOOL_TEST_OPS_LF_PK",
            "HYPERTOOL_TEST_OPS_LF_SK",
            "Wrong credentials",
        ),
        (
            "HYPERTOOL_TEST_OPS_LF_PK2",
            "HYPERTOOL_TEST_OPS_LF_SK2",
            "accepted",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let s = start_edited(
            dir.path(),
            &[
                (
                    "host = \"https://cloud.langfuse.com\"",
                    &format!("host = \"{host}\""),
                ),
                (
                    "public_key_env = \"LANGFUSE_PUBLIC_KEY\"",
                    &format!("public_key_env = \"{pk}\""),
                ),
                (
                    "secret_key_env = \"LANGFUSE_SECRET_KEY\"",
                    &format!("secret_key_env = \"{sk}\""),
                ),
            ],
        )
        .await;
        let (status, r) = s
            .get_json("/api/investigations/LangfuseIntegrationFailing")
            .await;
        assert_eq!(status, 200);
        let text = r.to_string();
        assert!(
            !text.contains("sk-lf-wrong-secret") && !text.contains("sk-lf-right\""),
            "a key leaked: {text}"
        );
        let vars = finding(&r, "variables")["found"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            vars.contains(&format!("{pk} set")) && vars.contains(&format!("{sk} set")),
            "{vars}"
        );
        let call = &finding(&r, "authenticated test call");
        if first == "accepted" {
            assert_eq!(call["status"], "ok", "{r}");
            assert_eq!(cause(&r, "Wrong credentials")["score"], 0.0);
        } else {
            assert_eq!(
                call["data"],
                json!({"result": "refused", "status": 401}),
                "{r}"
            );
            assert_eq!(r["causes"][0]["cause"], first, "{r}");
        }
        s.stop().await;
    }
}

/// Issue 29: `hypertool doctor --server URL` asks the running server where its metrics listener is
/// (here on a port of its own, not the configuration's 9464) instead of reading the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_finds_the_metrics_listener_the_server_was_started_with() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(dir.path(), &[]);
    assert!(!daemon.metrics.ends_with(":9464"), "{}", daemon.metrics);
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["doctor", "--server", &daemon.api])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let metrics = stdout
        .lines()
        .find(|l| l.contains(" metrics: "))
        .unwrap_or_else(|| panic!("no metrics check:\n{stdout}"));
    assert!(metrics.starts_with("ok   metrics:"), "{stdout}");
    let port = daemon.metrics.rsplit(':').next().unwrap();
    assert!(metrics.contains(&format!(":{port}/metrics")), "{metrics}");
    // What the server says about itself, to a viewer or an admin (open on loopback without keys).
    let info: serde_json::Value = reqwest::get(format!("{}/api/server", daemon.api))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["ledger"], "sqlite");
    assert!(info["metrics_listen"].as_str().unwrap().ends_with(port));
}
