//! Gateway calls made for workflow stages: the stage's model, prompt truncation, quality gates with
//! retries and escalation, run accounting — against the fake upstream process.

use std::sync::Arc;
use std::time::Duration;

use hypertool::config::Source;
use hypertool::core::clock::{Clock, ManualClock, SystemClock};
use serde_json::{json, Value};

use crate::common::*;

const GATED: &str = r#"
name: gated
description: stages for the gateway tests
stages:
  - name: code
    persona: backend-engineer
    model: weak
    retries: 1
    escalation_model: strong
    quality_gate:
      code_block: python
      must_not_match: ['TODO']
  - name: same
    model: improves
    retries: 2
    quality_gate:
      code_block: python
  - name: hopeless
    model: weak
    retries: 1
    quality_gate:
      code_block: python
  - name: short
    model: ok
    max_prompt_tokens: 60
  - name: frugal
    model: ok
    budget_tokens: 20
  - name: free
"#;

async fn server(dir: &std::path::Path, upstream: &FakeUpstream) -> TestServer {
    let toml = gateway_config(dir, &upstream.base_url, "");
    std::fs::write(toml.parent().unwrap().join("workflows/gated.yml"), GATED).unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    start(Source::File(toml), &dir.join("data"), clock).await
}

/// A chat call for `stage` of workflow `gated` (in `run` when given).
async fn stage_call(
    s: &TestServer,
    stage: &str,
    run: Option<&str>,
    body: Value,
) -> reqwest::Response {
    let mut req = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-persona", "backend-engineer")
        .header("x-hypertool-workflow", "gated")
        .header("x-hypertool-stage", stage);
    if let Some(r) = run {
        req = req.header("x-hypertool-run", r);
    }
    req.json(&body).send().await.unwrap()
}

fn hdr(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn hello() -> Value {
    json!({"model": "whatever", "messages": [{"role": "user", "content": "write it"}]})
}

fn gate_count(m: &Exposition, stage: &str, model: &str, result: &str) -> Option<f64> {
    m.get(
        "hypertool_workflow_quality_gate_total",
        &[
            ("workflow", "gated"),
            ("stage", stage),
            ("model", model),
            ("result", result),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_gate_is_retried_on_the_escalation_model_and_both_attempts_are_accounted() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = server(dir.path(), &upstream).await;
    let (status, run) = s
        .post_raw("/v1/workflows/gated/runs", "{}".to_string())
        .await;
    assert_eq!(status, 201);
    let run = run["id"].as_str().unwrap().to_string();

    let resp = stage_call(&s, "code", Some(&run), hello()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        hdr(&resp, "x-hypertool-quality-gate").as_deref(),
        Some("pass")
    );
    assert_eq!(hdr(&resp, "x-hypertool-attempts").as_deref(), Some("2"));
    assert_eq!(
        hdr(&resp, "x-hypertool-escalated").as_deref(),
        Some("weak -> strong")
    );
    assert_eq!(
        hdr(&resp, "x-hypertool-stage-model").as_deref(),
        Some("whatever -> weak")
    );
    assert_eq!(hdr(&resp, "x-hypertool-model").as_deref(), Some("strong"));
    let body: Value = resp.json().await.unwrap();
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("```python"));

    // Both attempts: the upstream saw weak then strong; each is in the ledger and the metrics.
    settled(&s, 36).await;
    let stats = upstream.stats().await;
    assert_eq!(stats["models"], json!(["weak", "strong"]));
    assert_eq!(
        (
            stats["calls"].as_u64(),
            stats["prompt_tokens"].as_u64(),
            stats["completion_tokens"].as_u64()
        ),
        (Some(2), Some(22), Some(14))
    );
    let m = s.metrics().await;
    assert_eq!(gate_count(&m, "code", "weak", "fail"), Some(1.0));
    assert_eq!(gate_count(&m, "code", "strong", "pass"), Some(1.0));
    let tokens = |model| {
        m.get(
            "hypertool_persona_tokens_used_total",
            &[
                ("persona", "backend-engineer"),
                ("chatmode", "default"),
                ("model", model),
            ],
        )
    };
    assert_eq!((tokens("weak"), tokens("strong")), (Some(18.0), Some(18.0)));
    // The run: the stage started with its first call and holds both attempts and their tokens.
    let (_, view) = s.get_json(&format!("/v1/workflows/gated/runs/{run}")).await;
    let code = &view["stages"]["code"];
    assert_eq!(code["status"], "running");
    assert_eq!(
        (
            code["attempts"].as_u64(),
            code["gate_failures"].as_u64(),
            code["gate_passes"].as_u64()
        ),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(code["tokens"], 36);
    assert_eq!(code["persona"], "backend-engineer");

    // Retry on the same model when the stage names no escalation model.
    let resp = stage_call(&s, "same", Some(&run), hello()).await;
    assert_eq!(
        hdr(&resp, "x-hypertool-quality-gate").as_deref(),
        Some("pass")
    );
    assert_eq!(hdr(&resp, "x-hypertool-attempts").as_deref(), Some("2"));
    assert_eq!(hdr(&resp, "x-hypertool-escalated"), None);
    // A call for the next stage ended `code`.
    let (_, view) = s.get_json(&format!("/v1/workflows/gated/runs/{run}")).await;
    assert_eq!(view["stages"]["code"]["status"], "passed");
    assert_eq!(view["stages"]["same"]["status"], "running");

    // Retries run out: the last answer is returned with its failing verdict, every attempt counted.
    let resp = stage_call(&s, "hopeless", None, hello()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        hdr(&resp, "x-hypertool-quality-gate").as_deref(),
        Some("fail; code_block: no fenced ```python code block")
    );
    assert_eq!(hdr(&resp, "x-hypertool-attempts").as_deref(), Some("2"));
    settled(&s, 36 + 36 + 36).await;
    let m = s.metrics().await;
    assert_eq!(gate_count(&m, "hopeless", "weak", "fail"), Some(2.0));
    assert_eq!(gate_count(&m, "same", "improves", "fail"), Some(1.0));
    assert_eq!(gate_count(&m, "same", "improves", "pass"), Some(1.0));
    let totals = s.ledger_totals().await;
    let stats = upstream.stats().await;
    assert_eq!(
        totals.tokens,
        stats["prompt_tokens"].as_u64().unwrap() + stats["completion_tokens"].as_u64().unwrap()
    );

    // A stream is judged once complete; the verdict rides on an SSE comment before [DONE].
    let mut body = hello();
    body["stream"] = json!(true);
    let resp = stage_call(&s, "hopeless", None, body).await;
    let text = resp.text().await.unwrap();
    assert!(
        text.contains(": x-hypertool-quality-gate: fail; code_block: no fenced ```python code block\n\ndata: [DONE]"),
        "{text}"
    );
    eventually("the streamed verdict", Duration::from_secs(10), || async {
        let m = s.metrics().await;
        (gate_count(&m, "hopeless", "weak", "fail") == Some(3.0)).then_some(())
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_models_prompt_limits_budgets_and_bad_headers() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = server(dir.path(), &upstream).await;

    // A long history is cut to the stage's max_prompt_tokens, oldest non-system messages first.
    let long = "tokens ".repeat(60);
    let body = json!({"model": "auto", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": long},
        {"role": "assistant", "content": long},
        {"role": "user", "content": "the question"},
    ]});
    let resp = stage_call(&s, "short", None, body).await;
    assert_eq!(resp.status(), 200);
    let note = hdr(&resp, "x-hypertool-truncated").unwrap();
    assert!(note.starts_with("2 messages removed; prompt "), "{note}");
    assert!(note.ends_with("tokens (max_prompt_tokens 60)"), "{note}");
    let stats = upstream.stats().await;
    assert_eq!(
        stats["last_messages"],
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "the question"}])
    );
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_prompt_truncations_total",
            &[("workflow", "gated"), ("stage", "short")]
        ),
        Some(1.0)
    );
    assert!(
        m.get(
            "hypertool_prompt_tokens_truncated_total",
            &[("workflow", "gated"), ("stage", "short")]
        )
        .unwrap()
            > 70.0
    );
    let body = json!({"model": "ok", "messages": [{"role": "user", "content": long}]});
    let resp = stage_call(&s, "short", None, body).await;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "context_length_exceeded");

    // `auto` needs a stage that sets a model.
    let resp = stage_call(
        &s,
        "free",
        None,
        json!({"model": "auto", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "model_auto_without_stage"
    );
    // A stage without a model keeps the request's.
    let resp = stage_call(
        &s,
        "free",
        None,
        json!({"model": "ok", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(hdr(&resp, "x-hypertool-model").as_deref(), Some("ok"));

    // A stage's budget per run.
    let (_, run) = s
        .post_raw("/v1/workflows/gated/runs", "{}".to_string())
        .await;
    let run = run["id"].as_str().unwrap().to_string();
    let resp = stage_call(&s, "frugal", Some(&run), hello()).await;
    assert_eq!(resp.status(), 200);
    eventually(
        "the frugal call in the run",
        Duration::from_secs(10),
        || async {
            let (_, v) = s.get_json(&format!("/v1/workflows/gated/runs/{run}")).await;
            (v["stages"]["frugal"]["tokens"] == 18).then_some(())
        },
    )
    .await;
    let resp = stage_call(&s, "frugal", Some(&run), hello()).await;
    assert_eq!(resp.status(), 429);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "stage_budget_exceeded");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("has used 18 of its 20-token budget"));

    // Bad headers: an unknown stage of a configured workflow, a run of another workflow, a run
    // without a stage.
    let resp = stage_call(&s, "deploy", None, hello()).await;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unknown_stage");
    assert_eq!(err["error"]["param"], "x-hypertool-stage");
    let (_, other) = s
        .post_raw("/v1/workflows/feature-development/runs", "{}".to_string())
        .await;
    let resp = stage_call(&s, "code", other["id"].as_str(), hello()).await;
    assert_eq!(resp.status(), 409);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "run_workflow_mismatch"
    );
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-run", run.as_str())
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "missing_stage"
    );
    // A workflow hypertool does not know only labels the call, as before.
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-workflow", "adhoc")
        .header("x-hypertool-stage", "anything")
        .json(&json!({"model": "ok", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The chatmode's workflow applies when a call names a stage but no workflow.
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-chatmode", "release")
        .header("x-hypertool-stage", "version-bump")
        .json(&json!({"model": "ok", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    // (package-release/version-bump: tier fast, gate json_schema, 2 retries escalating to balanced;
    // the mock answers no JSON, so all three attempts fail.)
    assert_eq!(
        hdr(&resp, "x-hypertool-model").as_deref(),
        Some("mock/balanced")
    );
    assert_eq!(
        hdr(&resp, "x-hypertool-escalated").as_deref(),
        Some("mock/fast -> mock/balanced")
    );
    assert_eq!(hdr(&resp, "x-hypertool-attempts").as_deref(), Some("3"));
    assert!(hdr(&resp, "x-hypertool-quality-gate")
        .unwrap()
        .starts_with("fail; json_schema: no JSON found"));
    s.stop().await;
}

const TIGHT: &str = r#"
name: tight
description: one stage with a small budget per run, for the concurrency test
stages:
  - name: build
    persona: backend-engineer
    budget_tokens: 1000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_of_one_run_stay_within_the_stage_budget_and_the_ledger_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    // The mock answers after 50 ms, so the calls overlap; each uses its prompt + 16 tokens.
    let s = start_edited(dir.path(), &[("latency_ms = 0", "latency_ms = 50")]).await;
    let workflows = dir.path().join("config/workflows");
    std::fs::write(workflows.join("tight.yml"), TIGHT).unwrap();
    // The reloader picks up the new workflow.
    let run = eventually("the tight workflow", Duration::from_secs(10), || {
        let (http, api) = (s.http.clone(), s.api.clone());
        async move {
            let resp = http
                .post(format!("{api}/v1/workflows/tight/runs"))
                .json(&json!({}))
                .send()
                .await
                .ok()?;
            if resp.status() != 201 {
                return None;
            }
            let v: Value = resp.json().await.ok()?;
            v["id"].as_str().map(str::to_string)
        }
    })
    .await;
    let calls = (0..200).map(|i| {
        let (http, api, run) = (s.http.clone(), s.api.clone(), run.clone());
        tokio::spawn(async move {
            let resp = http
                .post(format!("{api}/v1/chat/completions"))
                .header("x-hypertool-workflow", "tight")
                .header("x-hypertool-stage", "build")
                .header("x-hypertool-run", &run)
                .header("cache-control", "no-store")
                .json(&json!({"model": "mock/gpt-4o", "max_tokens": 16,
                    "messages": [{"role": "user", "content": format!("call {i}")}]}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap();
            (status, v)
        })
    });
    let mut answered = 0u64;
    let mut refused = 0;
    for call in calls {
        let (status, v) = call.await.unwrap();
        match status {
            200 => answered += v["usage"]["total_tokens"].as_u64().unwrap(),
            429 => {
                assert_eq!(v["error"]["code"], "stage_budget_exceeded", "{v}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(refused > 0, "the budget never refused a call");
    settled(&s, answered).await;
    // The ledger holds exactly what the answered calls used, and so does the run's stage.
    assert_eq!(s.ledger_totals().await.tokens, answered);
    let (_, view) = s.get_json(&format!("/v1/workflows/tight/runs/{run}")).await;
    let used = view["stages"]["build"]["tokens"].as_u64().unwrap();
    assert_eq!(used, answered);
    // Every call's estimate covers its usage (precise prompt count + max_tokens), so the documented
    // bound (the budget plus what calls admitted together use beyond their estimates) is the
    // budget itself.
    assert!(
        used <= 1000,
        "{used} tokens used of a 1000-token stage budget"
    );
    assert!(used > 1000 - 40, "admission left {used} of 1000 unused");
    // One stage started, once.
    assert_eq!(view["stages"]["build"]["status"], "running");
    s.stop().await;
}
