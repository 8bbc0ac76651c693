//! The OpenAI-compatible gateway: the official `openai` Python client in front of a separate
//! upstream process, faults from that upstream, budgets under concurrency, bad input, secrets.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hypertool::config::Source;
use hypertool::core::clock::{Clock, ManualClock, SystemClock};
use serde_json::{json, Value};

use crate::common::*;

async fn gateway_server(dir: &std::path::Path, upstream: &FakeUpstream, extra: &str) -> TestServer {
    let toml = gateway_config(dir, &upstream.base_url, extra);
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    start(Source::File(toml), &dir.join("data"), clock).await
}

/// A chat call as `persona`; the raw response, for headers and streams.
async fn send_chat(s: &TestServer, persona: &str, body: Value) -> reqwest::Response {
    s.http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-persona", persona)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn chat(s: &TestServer, persona: &str, body: Value) -> (u16, Value) {
    let resp = send_chat(s, persona, body).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn ledger_usage(dir: &std::path::Path) -> Vec<Value> {
    let conn = rusqlite::Connection::open(dir.join("data/hypertool.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT body FROM events WHERE kind = 'usage' ORDER BY seq")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
    rows.map(|r| serde_json::from_str(&r.unwrap()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works_and_accounting_matches_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = gateway_server(dir.path(), &upstream, "").await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai_client.py");
    let base = format!("{}/v1", s.api);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .arg(base)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "openai client failed (pip install openai; scripts/test.sh does):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        r["plain"],
        json!({"content": "fake answer words", "prompt": 11, "completion": 7})
    );
    assert_eq!(
        r["headers"],
        json!({"persona": "backend-engineer", "model": "ok"})
    );
    assert_eq!(r["stream"]["text"], " word0 word1 word2");
    assert_eq!(
        r["stream"]["usage_chunks"], 0,
        "usage the client did not ask for is stripped"
    );
    assert_eq!(r["stream_usage"], json!({"prompt": 11, "completion": 7}));
    assert!(r["models"].as_array().unwrap().contains(&json!("ok")));
    // "hello world" and "second text": 2 + 2 tokens.
    assert_eq!(r["embeddings"], json!({"count": 2, "dims": 8, "prompt": 4}));
    assert_eq!(
        r["unknown_model"],
        json!({"status": 404, "code": "model_not_found"})
    );
    assert_eq!(r["upstream_500"]["status"], 502);
    assert!(r["upstream_500"]["message"]
        .as_str()
        .unwrap()
        .contains("answered 500: the model is overloaded"));

    // Ledger == metrics == what the upstream reported, to the token.
    let stats = upstream.stats().await;
    let upstream_tokens =
        stats["prompt_tokens"].as_u64().unwrap() + stats["completion_tokens"].as_u64().unwrap();
    assert_eq!(stats["calls"], 4);
    assert_eq!(upstream_tokens, 18 + 18 + 19 + 18);
    settled(&s, upstream_tokens + 4).await;
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_persona_tokens_used_total",
            &[
                ("persona", "backend-engineer"),
                ("chatmode", "feature"),
                ("model", "ok")
            ]
        ),
        Some(upstream_tokens as f64)
    );
    let totals = s.ledger_totals().await;
    assert_eq!(
        totals.tokens,
        upstream_tokens + 4,
        "plus the 4 embedding tokens"
    );
    assert_eq!(totals.usage_events, 5);
    assert_eq!(
        m.get(
            "langfuse_generation_duration_seconds_count",
            &[("model", "ok")]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.get(
            "hypertool_gateway_requests_total",
            &[("upstream", "fake"), ("outcome", "ok")]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.get(
            "hypertool_persona_tokens_used_total",
            &[
                ("persona", "backend-engineer"),
                ("chatmode", "feature"),
                ("model", "mock/embed")
            ]
        ),
        Some(4.0),
        "embeddings are accounted too"
    );
    assert!(ledger_usage(dir.path())
        .iter()
        .all(|u| u["session"] == "py-1" && u.get("estimated").is_none()));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_give_clear_errors_and_correct_accounting() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = gateway_server(dir.path(), &upstream, "").await;
    let msg = json!([{"role": "user", "content": "hello"}]);
    for (model, status, code) in [
        ("fail-500", 502, "upstream_error"),
        ("rate-limit", 429, "upstream_rate_limited"),
        ("bad-json", 502, "upstream_invalid_response"),
        ("hang", 504, "upstream_timeout"),
        ("refused", 502, "upstream_unreachable"),
    ] {
        let started = std::time::Instant::now();
        let (got, body) = chat(
            &s,
            "devops-engineer",
            json!({"model": model, "messages": msg}),
        )
        .await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{model}: {body}"
        );
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{model} took {:?}",
            started.elapsed()
        );
    }
    // Nothing was spent on failed calls.
    assert_eq!(
        s.metrics().await.sum("hypertool_persona_tokens_used_total"),
        0.0
    );

    // No usage from the upstream: estimated with the tokenizer, never zero.
    let (got, _) = chat(
        &s,
        "devops-engineer",
        json!({"model": "no-usage", "messages": msg}),
    )
    .await;
    assert_eq!(got, 200);
    // A stream cut in the middle: the client sees the chunks and an error event; usage is estimated.
    let resp = send_chat(
        &s,
        "devops-engineer",
        json!({"model": "cut-stream", "stream": true, "messages": msg}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("word2") && text.contains("\"code\":\"upstream_invalid_response\""),
        "{text}"
    );
    assert!(
        !text.contains("[DONE]"),
        "a cut stream must not look complete: {text}"
    );
    let usage = eventually("two estimated usage events", Duration::from_secs(5), || {
        let u = ledger_usage(dir.path());
        async move { (u.len() == 2).then_some(u) }
    })
    .await;
    // "hello" as one user message: 3 + 3 + 1 (role) + 1 (content) tokens.
    assert_eq!(
        (
            usage[0]["prompt_tokens"].as_u64(),
            usage[0]["completion_tokens"].as_u64()
        ),
        (Some(8), Some(3))
    );
    assert_eq!(usage[0]["estimated"], true);
    assert_eq!(usage[1]["estimated"], true);
    assert!(
        usage[1]["completion_tokens"].as_u64().unwrap() >= 3,
        "{}",
        usage[1]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_is_still_accounted() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = gateway_server(dir.path(), &upstream, "").await;
    let resp = send_chat(&s, "frontend-engineer", json!({"model": "slow-stream", "stream": true, "messages": [{"role": "user", "content": "long answer"}]})).await;
    let mut body = resp.bytes_stream();
    let mut seen = 0;
    while let Some(chunk) = body.next().await {
        seen += String::from_utf8_lossy(&chunk.unwrap())
            .matches("word")
            .count();
        if seen >= 5 {
            break;
        }
    }
    drop(body);
    let usage = eventually(
        "the estimated usage of the abandoned stream",
        Duration::from_secs(10),
        || {
            let u = ledger_usage(dir.path());
            async move { u.first().cloned() }
        },
    )
    .await;
    assert_eq!(usage["estimated"], true);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((5..200).contains(&completion), "{usage}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_calls_cannot_overrun_a_block_budget() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = Arc::new(gateway_server(dir.path(), &upstream, "").await);
    let resp = s
        .http
        .put(format!("{}/api/budgets/backend-engineer", s.api))
        .json(&json!({"tokens": 1000, "mode": "block"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            chat(&s, "backend-engineer", json!({"model": "ok", "max_tokens": 7, "messages": [{"role": "user", "content": "hello"}]})).await
        }));
    }
    let (mut ok, mut blocked) = (0u64, 0u64);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                blocked += 1;
                assert_eq!(body["error"]["type"], "budget_exceeded");
                let m = body["error"]["message"].as_str().unwrap();
                assert!(
                    m.contains("backend-engineer")
                        && m.contains("1000-token budget")
                        && m.contains("resets at"),
                    "{m}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let stats = upstream.stats().await;
    let upstream_tokens =
        stats["prompt_tokens"].as_u64().unwrap() + stats["completion_tokens"].as_u64().unwrap();
    settled(&s, upstream_tokens).await;
    let m = s.metrics().await;
    let totals = s.ledger_totals().await;
    assert_eq!(stats["calls"].as_u64().unwrap(), ok);
    assert_eq!(upstream_tokens, ok * 18);
    assert_eq!(
        m.sum("hypertool_persona_tokens_used_total"),
        upstream_tokens as f64
    );
    assert_eq!(totals.tokens, upstream_tokens);
    assert!(blocked > 0);
    // Each admitted call reserved its estimate (8 prompt + 7 max) and used 18: with every call
    // reserving before the limit was reached, usage can pass 1000 by at most 3 per call in flight.
    assert!(
        upstream_tokens <= 1000 + 200 * 3,
        "overshoot: {upstream_tokens}"
    );
    eprintln!(
        "block budget 1000: {ok} calls admitted ({upstream_tokens} tokens), {blocked} refused"
    );
    assert!(
        upstream_tokens >= 1000 - 18,
        "the budget was not used up: {upstream_tokens}"
    );
    assert_eq!(
        s.running
            .as_ref()
            .unwrap()
            .state
            .engine
            .lock()
            .unwrap()
            .reserved("backend-engineer"),
        0
    );
    match Arc::try_unwrap(s) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("server still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_answered_in_openai_shape() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    // A fresh client per case: after a 413 the server closes the connection, and a pooled
    // connection reused at that moment would fail the next request.
    let post = |body: String| {
        reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", s.api))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases = [
        ("{\"model\": ".to_string(), 400, "malformed_json"),
        ("{\"messages\": []}".to_string(), 400, "missing_model"),
        ("{\"model\": \"mock/x\"}".to_string(), 400, "missing_messages"),
        ("{\"model\": \"gpt-99\", \"messages\": []}".to_string(), 404, "model_not_found"),
        (format!("{{\"model\": \"mock/x\", \"messages\": [{{\"role\":\"user\",\"content\":\"{}\"}}]}}", "x".repeat(5 << 20)), 413, "body_too_large"),
    ];
    for (body, status, code) in cases {
        let resp = post(body).await.unwrap();
        assert_eq!(resp.status().as_u16(), status);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // The built-in mock answers with no configuration at all.
    let (status, v) = chat(
        &s,
        "testing-specialist",
        json!({"model": "mock/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["usage"]["completion_tokens"], 16);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stay_secret_and_are_required_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let toml = gateway_config(
        dir.path(),
        &upstream.base_url,
        "\n[[gateway.keys]]\nkey_env = \"HYPERTOOL_TEST_GATEWAY_KEY\"\npersona = \"data-scientist\"\nmodels = [\"ok\", \"leak-key\"]\n",
    );
    let log = dir.path().join("ht.log");
    let mut child = Reaped(
        std::process::Command::new(crate::process::BIN)
            .current_dir(dir.path())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--config",
                toml.to_str().unwrap(),
            ])
            .args([
                "--data-dir",
                dir.path().join("data").to_str().unwrap(),
                "--log-file",
                log.to_str().unwrap(),
            ])
            .env("HYPERTOOL_TEST_UPSTREAM_KEY", "sk-test-SECRET123")
            .env(
                "HYPERTOOL_TEST_GATEWAY_KEY",
                "ht-gateway-key-0123456789abcdef",
            )
            .env("RUST_LOG", "debug")
            .spawn()
            .unwrap(),
    );
    let (api, _) = serving_at(&log).await;
    let http = reqwest::Client::new();
    let call = |key: Option<&str>, model: &str| {
        let mut req = http
            .post(format!("{api}/v1/chat/completions"))
            .header("x-hypertool-persona", "backend-engineer")
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    let resp = call(None, "ok").await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = call(Some("wrong-key-wrong-key"), "ok").await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(!resp.text().await.unwrap().contains("wrong-key"));
    let good = "ht-gateway-key-0123456789abcdef";
    let resp = call(Some(good), "fail-500").await.unwrap();
    assert_eq!(resp.status(), 403, "the key may not use fail-500");
    let resp = call(Some(good), "ok").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-hypertool-persona"],
        "data-scientist",
        "the key's persona wins over the header"
    );
    // The upstream got the server-side key; the client never saw it.
    assert_eq!(
        upstream.stats().await["authorization"],
        "Bearer sk-test-SECRET123"
    );
    let resp = call(Some(good), "leak-key").await.unwrap();
    assert_eq!(resp.status(), 401);
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains("SECRET123") && !text.contains("sk-"),
        "{text}"
    );
    assert!(text.contains("<redacted>"), "{text}");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logs.contains("SECRET123") && !logs.contains("0123456789abcdef"),
        "a secret reached the log"
    );

    // Off loopback without keys: refused (from a directory without ./config: the built-in defaults).
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = std::process::Command::new(crate::process::BIN)
        .current_dir(&elsewhere)
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--data-dir", dir.path().join("d2").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without gateway keys"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_fallbacks_downgrades_and_tool_scope() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let extra = "\n[[gateway.models]]\nname = \"limited\"\nupstream = \"fake\"\nupstream_model = \"rate-limit\"\nretries = 0\nfallbacks = [\"ok\"]\n\
                 \n[gateway.downgrade]\nfrontend-engineer = \"mock/cheap\"\n";
    let s = gateway_server(dir.path(), &upstream, extra).await;
    let hello = json!([{"role": "user", "content": "hello"}]);

    // 503, 503, then an answer: two retries, one call accounted.
    let (status, body) = chat(
        &s,
        "devops-engineer",
        json!({"model": "flaky", "messages": hello}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream.stats().await["flaky_calls"], 3);
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_gateway_requests_total",
            &[("upstream", "fake"), ("outcome", "retry")]
        ),
        Some(2.0)
    );

    // 429 with no retries left: the fallback answers, and says so.
    let resp = send_chat(
        &s,
        "devops-engineer",
        json!({"model": "limited", "messages": hello}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-hypertool-fallback"], "limited -> ok");
    assert_eq!(resp.headers()["x-hypertool-model"], "ok");

    // A spent downgrade budget routes to the cheaper model.
    let put = s
        .http
        .put(format!("{}/api/budgets/frontend-engineer", s.api))
        .json(&json!({"tokens": 5, "mode": "downgrade"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let resp = send_chat(
        &s,
        "frontend-engineer",
        json!({"model": "ok", "messages": hello}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-hypertool-downgraded"], "ok -> mock/cheap");
    settled(&s, 18 + 18 + 24).await;
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_persona_tokens_used_total",
            &[
                ("persona", "frontend-engineer"),
                ("chatmode", "default"),
                ("model", "mock/cheap")
            ]
        ),
        Some(8.0 + 16.0)
    );

    // Tools outside the persona's allowedTools are removed before the upstream sees them.
    let tool = |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}});
    let resp = send_chat(&s, "backend-engineer", json!({"model": "ok", "messages": hello, "tools": [tool("github_search_code"), tool("rm_rf"), tool("github.github_list_commits")]})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-hypertool-tools-removed"], "rm_rf");
    assert_eq!(
        upstream.stats().await["last_tools"],
        json!(["github_search_code", "github.github_list_commits"])
    );
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_gateway_tools_removed_total",
            &[("persona", "backend-engineer")]
        ),
        Some(1.0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_deterministic_calls_are_answered_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = gateway_server(dir.path(), &upstream, "").await;
    let req = json!({"model": "ok", "temperature": 0, "messages": [{"role": "user", "content": "cache me"}]});
    let send = |body: Value, persona: &'static str, no_cache: bool| {
        let mut r = s
            .http
            .post(format!("{}/v1/chat/completions", s.api))
            .header("x-hypertool-persona", persona)
            .json(&body);
        if no_cache {
            r = r.header("cache-control", "no-cache");
        }
        r.send()
    };
    let first = send(req.clone(), "backend-engineer", false).await.unwrap();
    assert_eq!(first.headers()["x-hypertool-cache"], "miss");
    let first: Value = first.json().await.unwrap();
    // Another persona, same question: a hit that spends nothing.
    let second = send(req.clone(), "testing-specialist", false)
        .await
        .unwrap();
    assert_eq!(second.headers()["x-hypertool-cache"], "hit");
    assert_eq!(
        second.json::<Value>().await.unwrap()["choices"],
        first["choices"]
    );
    // Streamed, from the cache, as SSE.
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let resp = send(streamed, "testing-specialist", false).await.unwrap();
    assert_eq!(resp.headers()["x-hypertool-cache"], "hit");
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("fake answer words") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert_eq!(upstream.stats().await["calls"], 1);

    // no-cache bypasses; temperature > 0 is not cached.
    let resp = send(req.clone(), "backend-engineer", true).await.unwrap();
    assert_eq!(resp.headers()["x-hypertool-cache"], "bypass");
    let mut warm = req.clone();
    warm["temperature"] = json!(0.7);
    assert_eq!(
        send(warm.clone(), "backend-engineer", false)
            .await
            .unwrap()
            .headers()["x-hypertool-cache"],
        "skip"
    );
    assert_eq!(
        send(warm, "backend-engineer", false)
            .await
            .unwrap()
            .headers()["x-hypertool-cache"],
        "skip"
    );
    assert_eq!(upstream.stats().await["calls"], 4);

    let m = s.metrics().await;
    assert_eq!(
        m.get("hypertool_cache_requests_total", &[("result", "hit")]),
        Some(2.0)
    );
    assert_eq!(m.get("hypertool_cache_tokens_saved_total", &[]), Some(36.0));
    assert_eq!(
        m.get(
            "hypertool_persona_tokens_used_total",
            &[
                ("persona", "testing-specialist"),
                ("chatmode", "default"),
                ("model", "ok")
            ]
        ),
        None,
        "a hit spends no budget"
    );
    // Entries expire after the TTL (5m by default), on the injected clock.
    s.clock.advance_secs(301);
    let resp = send(req, "backend-engineer", false).await.unwrap();
    assert_eq!(resp.headers()["x-hypertool-cache"], "miss");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_stream_still_records_its_usage() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = gateway_server(dir.path(), &upstream, "").await;
    let resp = send_chat(&s, "devops-engineer", json!({"model": "slow-stream", "stream": true, "messages": [{"role": "user", "content": "go"}]})).await;
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    // Drain the rest in the background while the server shuts down.
    let reader = tokio::spawn(async move { while body.next().await.is_some() {} });
    s.stop().await;
    reader.await.unwrap();
    let usage = ledger_usage(dir.path());
    assert_eq!(usage.len(), 1, "the stream's usage was lost at shutdown");
    assert_eq!(usage[0]["model"], "slow-stream");
    assert_eq!(
        (
            usage[0]["prompt_tokens"].as_u64(),
            usage[0]["completion_tokens"].as_u64()
        ),
        (Some(11), Some(7))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_max_in_flight_are_shed_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let toml = gateway_config(dir.path(), &upstream.base_url, "");
    let text = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("max_in_flight = 512", "max_in_flight = 1");
    std::fs::write(&toml, text).unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let s = Arc::new(start(Source::File(toml), &dir.path().join("data"), clock).await);
    let hello = json!([{"role": "user", "content": "hello"}]);
    // "hang" holds the only slot for its 1 s timeout.
    let holder = {
        let s = s.clone();
        let hello = hello.clone();
        tokio::spawn(async move {
            chat(
                &s,
                "devops-engineer",
                json!({"model": "hang", "messages": hello}),
            )
            .await
        })
    };
    let shed = eventually("a call to be shed", Duration::from_secs(5), || {
        let s = s.clone();
        let hello = hello.clone();
        async move {
            let (status, body) = chat(
                &s,
                "devops-engineer",
                json!({"model": "ok", "messages": hello}),
            )
            .await;
            (status == 503).then_some(body)
        }
    })
    .await;
    assert_eq!(shed["error"]["code"], "overloaded");
    assert_eq!(holder.await.unwrap().0, 504);
    // The slot is free again.
    let (status, _) = chat(
        &s,
        "devops-engineer",
        json!({"model": "ok", "messages": hello}),
    )
    .await;
    assert_eq!(status, 200);
    match Arc::try_unwrap(s) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("server still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_budget_in_block_mode_refuses_the_call_that_would_pass_it() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = gateway_server(
        dir.path(),
        &upstream,
        "\n[[gateway.models]]\nname = \"priced\"\nupstream = \"fake\"\nupstream_model = \"ok\"\nprompt_usd_per_1k = 1.0\ncompletion_usd_per_1k = 1.0\n",
    )
    .await;
    let resp = s
        .http
        .put(format!("{}/api/budgets/backend-engineer", s.api))
        .json(&json!({"tokens": 1_000_000, "cost_usd": 0.05, "mode": "block"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = json!({"model": "priced", "max_tokens": 7, "messages": [{"role": "user", "content": "hello"}]});
    // Each call: 11 prompt + 7 completion tokens at $1 per 1k = $0.018.
    for _ in 0..2 {
        let (status, r) = chat(&s, "backend-engineer", body.clone()).await;
        assert_eq!(status, 200, "{r}");
    }
    settled(&s, 36).await;
    // $0.014 left; this call is estimated above that, so it is refused before it is made.
    let (status, r) = chat(&s, "backend-engineer", body.clone()).await;
    assert_eq!(status, 429, "{r}");
    assert_eq!(r["error"]["type"], "budget_exceeded");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message
            .starts_with("persona `backend-engineer` has spent $0.0360 of its $0.0500 cost budget"),
        "{message}"
    );
    assert_eq!(upstream.stats().await["calls"], 2);
    let m = s.metrics().await;
    let spent = m.sum("hypertool_persona_cost_usd_total");
    assert!((spent - 0.036).abs() < 1e-9, "{spent}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_a_proxy_is_reached_through_it() {
    let dir = tempfile::tempdir().unwrap();
    // The fake upstream plays the proxy: it answers requests in absolute form itself and records
    // the target it was sent. The upstream's own host does not resolve, so only a call that went
    // through the proxy can succeed.
    let proxy = FakeUpstream::start(dir.path()).await;
    let proxy_url = proxy.base_url.trim_end_matches("/v1").to_string();
    let extra = format!(
        "\n[[gateway.upstreams]]\nname = \"far\"\nbase_url = \"http://upstream.invalid:8080/v1\"\nproxy = \"{proxy_url}\"\n\
         \n[[gateway.models]]\nname = \"far-ok\"\nupstream = \"far\"\nupstream_model = \"ok\"\n"
    );
    let s = gateway_server(dir.path(), &proxy, &extra).await;
    let hello = json!([{"role": "user", "content": "hello"}]);
    let (status, body) = chat(
        &s,
        "devops-engineer",
        json!({"model": "far-ok", "messages": hello}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        proxy.stats().await["last_target"],
        "http://upstream.invalid:8080/v1/chat/completions"
    );
    let resp = send_chat(
        &s,
        "devops-engineer",
        json!({"model": "far-ok", "stream": true, "messages": hello}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    // Direct upstreams still go direct.
    let (status, _) = chat(
        &s,
        "devops-engineer",
        json!({"model": "ok", "messages": hello}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(proxy.stats().await["last_target"], "/v1/chat/completions");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstreams_are_verified_and_a_private_ca_can_be_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start_tls(dir.path()).await;
    let hello = json!([{"role": "user", "content": "hello"}]);
    // The test CA is not among the webpki roots: the certificate is refused, the call fails cleanly.
    let untrusted = dir.path().join("untrusted");
    std::fs::create_dir_all(&untrusted).unwrap();
    let s = gateway_server(&untrusted, &upstream, "").await;
    let (status, body) = chat(
        &s,
        "devops-engineer",
        json!({"model": "ok", "messages": hello}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("upstream_unreachable")),
        "{body}"
    );
    s.stop().await;

    // With `gateway.ca_file` naming the test CA, plain and streamed calls go through, and the
    // ledger holds the upstream's usage.
    let trusted = dir.path().join("trusted");
    std::fs::create_dir_all(&trusted).unwrap();
    let toml = gateway_config(&trusted, &upstream.base_url, "");
    let ca =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls/test-ca.pem");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("max_in_flight = 512"));
    let text = text.replace(
        "max_in_flight = 512",
        &format!(
            "max_in_flight = 512\nca_file = {:?}",
            ca.display().to_string()
        ),
    );
    std::fs::write(&toml, &text).unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let s = start(Source::File(toml.clone()), &trusted.join("data"), clock).await;
    let (status, body) = chat(
        &s,
        "devops-engineer",
        json!({"model": "ok", "messages": hello}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let resp = send_chat(
        &s,
        "devops-engineer",
        json!({"model": "ok", "stream": true, "messages": hello}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("[DONE]"));
    let stats = upstream.stats().await;
    let upstream_tokens =
        stats["prompt_tokens"].as_u64().unwrap() + stats["completion_tokens"].as_u64().unwrap();
    settled(&s, upstream_tokens).await;
    s.stop().await;

    // A ca_file that is not PEM is refused at load, naming the file and line.
    std::fs::write(trusted.join("bad.pem"), "not a certificate").unwrap();
    std::fs::write(
        &toml,
        text.replace(&format!("{:?}", ca.display().to_string()), "\"bad.pem\""),
    )
    .unwrap();
    let errors = hypertool::config::load(&Source::File(toml)).unwrap_err();
    let shown = errors.to_string();
    assert!(
        shown.contains("gateway.ca_file") && shown.contains("bad.pem"),
        "{shown}"
    );
    assert!(errors.0.iter().any(|e| e.line.is_some()), "{shown}");

    // The CA set once for every outbound client (`[tls] ca_file`) is the upstreams' trust too.
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let toml = gateway_config(&shared, &upstream.base_url, "");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("\n[tls]\n"));
    std::fs::write(
        &toml,
        text.replacen(
            "\n[tls]\n",
            &format!("\n[tls]\nca_file = {:?}\n", ca.display().to_string()),
            1,
        ),
    )
    .unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let s = start(Source::File(toml), &shared.join("data"), clock).await;
    let (status, body) = chat(
        &s,
        "devops-engineer",
        json!({"model": "ok", "messages": hello}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    s.stop().await;
}
