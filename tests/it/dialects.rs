//! Every agent's dialect through one pipeline: the official `anthropic` SDK on `/v1/messages`
//! (against the mock, and translated to an OpenAI-compatible upstream), the `openai` SDK on a model
//! behind a native Anthropic upstream (translated the other way), Claude Code itself end to end,
//! and the governance of every call the same in each dialect: budgets, cut streams, the cache, stage
//! models, bad input — each answered in the route's own error shape.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hypertool::config::Source;
use hypertool::core::clock::{Clock, ManualClock, SystemClock};
use serde_json::{json, Value};

use crate::common::*;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs a fixture script with python3; its JSON summary.
async fn python(name: &str, args: Vec<String>) -> Value {
    let script = fixture(name);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(&script)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{name} failed (scripts/test.sh installs the anthropic and openai packages):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The fake upstream as an Anthropic upstream too (`claude-*` models), and its tool model on the
/// OpenAI-compatible side.
pub fn both_kinds(upstream: &FakeUpstream) -> String {
    format!(
        r#"
[[gateway.upstreams]]
name = "anthropic-fake"
kind = "anthropic"
base_url = "{}"
api_key_env = "HYPERTOOL_TEST_ANTHROPIC_KEY"
timeout = "10s"

[[gateway.models]]
name = "claude-ok"
upstream = "anthropic-fake"
upstream_model = "ok"

[[gateway.models]]
name = "claude-tool"
upstream = "anthropic-fake"
upstream_model = "tool"

[[gateway.models]]
name = "claude-cut"
upstream = "anthropic-fake"
upstream_model = "cut-stream"

[[gateway.models]]
name = "tool"
upstream = "fake"

[[gateway.models]]
name = "claude-priced"
upstream = "anthropic-fake"
upstream_model = "ok"
prompt_usd_per_1k = 1.0
completion_usd_per_1k = 2.0
cache_read_usd_per_1k = 0.1
cache_write_usd_per_1k = 1.25
"#,
        upstream.base_url
    )
}

/// The Anthropic upstream's key in the environment (named only here; set once, before any server
/// of these tests reads it).
pub fn export_anthropic_key() {
    static KEY: std::sync::Once = std::sync::Once::new();
    KEY.call_once(|| std::env::set_var("HYPERTOOL_TEST_ANTHROPIC_KEY", "sk-ant-test-KEY42"));
}

async fn server(dir: &Path, upstream: &FakeUpstream) -> TestServer {
    export_anthropic_key();
    let toml = gateway_config(dir, &upstream.base_url, &both_kinds(upstream));
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    start(Source::File(toml), &dir.join("data"), clock).await
}

pub fn ledger_usage(dir: &Path) -> Vec<Value> {
    ledger_events(dir, "usage")
}

/// The client script saw each of `kinds` among its stream's event types.
fn assert_has_events(summary: &Value, kinds: &[&str], context: &str) {
    let seen = summary["event_types"].as_array().unwrap();
    for kind in kinds {
        assert!(seen.contains(&json!(kind)), "{context}: {kind} in {seen:?}");
    }
}

/// The anthropic client script's tool calls: the model called `search` (plain and streamed), had its
/// result back and answered in text; `delete_repo`, outside the persona's allowedTools, was removed.
fn assert_tool_round_trip(r: &Value) {
    assert_eq!(
        r["tool_call"],
        json!({"name": "search", "input_keys": ["city"], "stop": "tool_use", "id_ok": true})
    );
    assert_eq!(
        r["tool_answer"],
        json!({"type": "text", "stop": "end_turn"})
    );
    assert_eq!(
        r["tool_stream"],
        json!({"name": "search", "input_keys": ["city"], "stop": "tool_use"})
    );
    assert_eq!(r["tools_removed"], "delete_repo");
}

async fn post_messages(s: &TestServer, body: Value) -> reqwest::Response {
    s.http
        .post(format!("{}/v1/messages", s.api))
        .header("x-hypertool-persona", "backend-engineer")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_works_against_the_mock_and_its_tokens_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = server(dir.path(), &upstream).await;
    let r = python(
        "anthropic_client.py",
        vec![s.api.clone(), "mock/claude".into(), "mock/claude".into()],
    )
    .await;
    assert_eq!(r["plain"]["text"], "Mock answer from hypertool to: hello");
    assert_eq!(r["plain"]["stop"], "end_turn");
    assert_eq!(r["plain"]["id_ok"], true);
    assert_eq!(r["plain"]["output"], 16);
    assert_eq!(
        r["stream"]["text"],
        "Mock answer from hypertool to: stream please"
    );
    assert_eq!(r["stream"]["final_text"], r["stream"]["text"]);
    assert_eq!(r["stream"]["output"], 16);
    assert_has_events(
        &r,
        &[
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ],
        "mock",
    );
    // The mock calls the offered tool when the client makes a call mandatory, with arguments
    // that fit its schema, and answers in text once it has the result.
    assert_tool_round_trip(&r);
    assert!(r["count_tokens"].as_u64().unwrap() > 0);
    assert!(r["models"]
        .as_array()
        .unwrap()
        .contains(&json!("mock/default")));

    // Six model calls (count_tokens and the model list spend nothing), each in the ledger with
    // the numbers its client was told; the first, as the SDK saw it.
    let usage = eventually("six usage events", Duration::from_secs(10), || {
        let u = ledger_usage(dir.path());
        async move { (u.len() == 6).then_some(u) }
    })
    .await;
    assert!(usage.iter().all(|u| u["persona"] == "backend-engineer"
        && u["session"] == "anthropic-1"
        && u.get("estimated").is_none()));
    assert_eq!(usage[0]["prompt_tokens"], r["plain"]["input"]);
    assert_eq!(usage[0]["completion_tokens"], 16);
    assert_eq!(usage[1]["prompt_tokens"], r["stream"]["input"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_dialect_reaches_an_upstream_of_the_other_tools_included() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = server(dir.path(), &upstream).await;

    // Messages → an OpenAI-compatible upstream.
    let r = python(
        "anthropic_client.py",
        vec![s.api.clone(), "ok".into(), "tool".into()],
    )
    .await;
    // system + user: two chat messages upstream, so the fake counts 10 + 2.
    assert_eq!(r["plain"]["text"], "fake answer words");
    assert_eq!(
        (r["plain"]["input"].as_u64(), r["plain"]["output"].as_u64()),
        (Some(12), Some(7))
    );
    assert_eq!(r["stream"]["text"], " word0 word1 word2");
    assert_eq!(
        (
            r["stream"]["input"].as_u64(),
            r["stream"]["output"].as_u64()
        ),
        (Some(11), Some(7))
    );
    assert_tool_round_trip(&r);
    let stats = upstream.stats().await;
    assert_eq!(stats["last_tools"], json!(["search"]));

    // Chat → a native Anthropic upstream.
    let o = python(
        "openai_tools_client.py",
        vec![
            format!("{}/v1", s.api),
            "claude-ok".into(),
            "claude-tool".into(),
        ],
    )
    .await;
    // One user message (the system prompt goes to `system`): 10 + 1 uncached, 1 written to and
    // 2 read from the cache — 14 in all, as OpenAI counts prompt tokens.
    assert_eq!(
        o["plain"],
        json!({"content": "fake answer words", "finish": "stop", "prompt": 14, "completion": 7, "cached": 2})
    );
    assert_eq!(
        o["stream"],
        json!({"text": "fake answer words", "finish": ["stop"], "prompt": 14, "completion": 7})
    );
    assert_eq!(
        o["tool_call"],
        json!({"name": "search", "arguments": {"city": "Paris"}, "finish": "tool_calls"})
    );
    assert_eq!(
        o["tool_answer"],
        json!({"content": "it is sunny in Paris", "finish": "stop"})
    );
    assert_eq!(
        o["tool_stream"],
        json!({"name": "search", "arguments": {"city": "Paris"}, "finish": "tool_calls"})
    );
    let seen = upstream.stats().await["anthropic"].clone();
    assert_eq!(
        seen["x-api-key"], "sk-ant-test-KEY42",
        "the key in x-api-key"
    );
    assert_eq!(seen["authorization"], Value::Null, "and nowhere else");
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert_eq!(seen["path"], "/v1/messages");
    // The tool's result went as a tool_result block after the tool_use it answers.
    let body = &seen["body"];
    assert_eq!(body["tool_choice"], json!({"type": "any"}));
    assert_eq!(body["tools"][0]["name"], "search");

    // Every call's tokens, as each upstream reported them, are the ledger's.
    let stats = upstream.stats().await;
    let reported =
        stats["prompt_tokens"].as_u64().unwrap() + stats["completion_tokens"].as_u64().unwrap();
    settled(&s, reported).await;
    assert!(ledger_usage(dir.path())
        .iter()
        .all(|u| u.get("estimated").is_none()));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_calls_are_governed_like_chat_calls() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = server(dir.path(), &upstream).await;

    // The cache answers a repeated deterministic call, plain and streamed, in Messages' shape.
    let req = json!({"model": "claude-ok", "max_tokens": 50, "temperature": 0,
        "messages": [{"role": "user", "content": "cache me"}]});
    let first = post_messages(&s, req.clone()).await;
    assert_eq!(first.headers()["x-hypertool-cache"], "miss");
    let first: Value = first.json().await.unwrap();
    let second = post_messages(&s, req.clone()).await;
    assert_eq!(second.headers()["x-hypertool-cache"], "hit");
    assert_eq!(
        second.json::<Value>().await.unwrap()["content"],
        first["content"]
    );
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let resp = post_messages(&s, streamed).await;
    assert_eq!(resp.headers()["x-hypertool-cache"], "hit");
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("event: message_start\n"), "{text}");
    assert!(
        text.contains("fake answer words")
            && text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{text}"
    );
    // A chat call with the same words is another dialect: not the Messages answer.
    let chat = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .json(
            &json!({"model": "claude-ok", "temperature": 0, "max_tokens": 50,
            "messages": [{"role": "user", "content": "cache me"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(chat.headers()["x-hypertool-cache"], "miss");
    assert!(chat.json::<Value>().await.unwrap()["choices"].is_array());

    // A stream the Anthropic upstream cuts, and one the OpenAI-compatible one cuts, each to a
    // Messages client: an error event, and usage estimated from what was streamed — never zero.
    let before = ledger_usage(dir.path()).len();
    for model in ["claude-cut", "cut-stream"] {
        let resp = post_messages(
            &s,
            json!({"model": model, "max_tokens": 50, "stream": true,
                "messages": [{"role": "user", "content": "cut me"}]}),
        )
        .await;
        let text = resp.text().await.unwrap();
        assert!(text.contains("event: error\n"), "{model}: {text}");
        assert!(!text.contains("message_stop"), "{model}: {text}");
    }
    let usage = eventually("two estimated streams", Duration::from_secs(10), || {
        let u = ledger_usage(dir.path());
        async move { (u.len() == before + 2).then_some(u) }
    })
    .await;
    for u in &usage[before..] {
        assert_eq!(u["estimated"], true, "{u}");
        assert!(u["completion_tokens"].as_u64().unwrap() > 0, "{u}");
        assert!(u["prompt_tokens"].as_u64().unwrap() > 0, "{u}");
    }

    // A spent `block` budget refuses a Messages call in Anthropic's shape.
    let resp = s
        .http
        .put(format!("{}/api/budgets/backend-engineer", s.api))
        .json(&json!({"tokens": 1, "mode": "block"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = post_messages(
        &s,
        json!({"model": "claude-ok", "max_tokens": 50, "messages": [{"role": "user", "content": "more"}]}),
    )
    .await;
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "budget_exceeded");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_input_is_a_4xx_in_anthropics_shape_and_nothing_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = server(dir.path(), &upstream).await;
    let huge_model = format!("mock/{}", "x".repeat(1 << 20));
    let cases = [
        (
            json!({"model": "mock/claude", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
            400,
            "invalid_content",
        ),
        (
            json!({"model": "mock/claude", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9", "content": "x"}]}]}),
            400,
            "invalid_tool_result",
        ),
        (
            json!({"model": "mock/claude", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "hologram", "data": 1}]}]}),
            400,
            "unsupported_content",
        ),
        (
            json!({"model": huge_model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            400,
            "invalid_model",
        ),
        (
            json!({"model": "mock/claude", "max_tokens": 5}),
            400,
            "missing_messages",
        ),
        (
            json!({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "model_not_found",
        ),
    ];
    for (body, status, code) in cases {
        let resp = post_messages(&s, body).await;
        assert_eq!(resp.status().as_u16(), status, "{code}");
        let text = resp.text().await.unwrap();
        assert!(
            text.len() < 2048,
            "{code}: an answer of {} bytes",
            text.len()
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "error", "{text}");
        assert_eq!(v["error"]["code"], code, "{text}");
        assert!(
            v["error"]["type"].is_string() && v["error"]["message"].is_string(),
            "{text}"
        );
    }
    // A 16 MiB body: 413 from the door, in the same shape.
    let big = format!(
        r#"{{"model":"mock/claude","max_tokens":5,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(16 << 20)
    );
    let resp = s
        .http
        .post(format!("{}/v1/messages", s.api))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "request_too_large");
    // Not JSON at all, on count_tokens too.
    let resp = s
        .http
        .post(format!("{}/v1/messages/count_tokens", s.api))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["type"], "error");
    // Nothing reached the ledger, nor an upstream.
    let totals = s.ledger_totals().await;
    assert_eq!(totals.tokens, 0);
    assert!(ledger_usage(dir.path()).is_empty());
    assert_eq!(upstream.stats().await["models"], json!([]));
    s.stop().await;
}

/// Claude Code (`claude -p`, from npm) against hypertool's mock: what it reports it spent.
fn claude_code(api: &str, home: &Path, env: &[(&str, &str)]) -> Value {
    let claude =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/agents/node_modules/.bin/claude");
    assert!(
        claude.exists(),
        "{} is missing: scripts/test.sh installs @anthropic-ai/claude-code there",
        claude.display()
    );
    std::fs::create_dir_all(home).unwrap();
    let out = std::process::Command::new(&claude)
        .args(["-p", "say hi", "--output-format", "json"])
        .current_dir(home)
        .env("HOME", home)
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .env("ANTHROPIC_BASE_URL", api)
        .env("ANTHROPIC_MODEL", "mock/claude")
        .env("ANTHROPIC_SMALL_FAST_MODEL", "mock/claude-haiku")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "claude -p failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every token Claude Code says it spent, over all the models it used.
fn reported_tokens(result: &Value) -> u64 {
    result["modelUsage"]
        .as_object()
        .unwrap()
        .values()
        .map(|m| {
            [
                "inputTokens",
                "outputTokens",
                "cacheReadInputTokens",
                "cacheCreationInputTokens",
            ]
            .iter()
            .map(|f| m[f].as_u64().unwrap_or(0))
            .sum::<u64>()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_runs_on_the_mock_attributed_by_header_and_by_key() {
    use crate::access::{ADMIN_KEY, BACKEND_KEY, TESTING_KEY};
    let dir = tempfile::tempdir().unwrap();
    let s = crate::access::start_with_keys(dir.path(), "").await;
    let api = s.api.clone();
    let home = dir.path().join("home");
    let runs = tokio::task::spawn_blocking(move || {
        [
            // An admin key (x-api-key) and the persona in a header, as ANTHROPIC_CUSTOM_HEADERS sends it.
            claude_code(
                &api,
                &home,
                &[
                    ("ANTHROPIC_API_KEY", ADMIN_KEY),
                    (
                        "ANTHROPIC_CUSTOM_HEADERS",
                        "X-Hypertool-Persona: testing-specialist",
                    ),
                ],
            ),
            // A persona key as the API key: the key decides.
            claude_code(&api, &home, &[("ANTHROPIC_API_KEY", BACKEND_KEY)]),
            // ... and as a bearer token.
            claude_code(&api, &home, &[("ANTHROPIC_AUTH_TOKEN", TESTING_KEY)]),
        ]
    })
    .await
    .unwrap();
    for r in &runs {
        assert!(
            r["result"]
                .as_str()
                .unwrap_or("")
                .contains("Mock answer from hypertool"),
            "{r}"
        );
    }
    // Claude Code's own account of its tokens is the ledger's, persona by persona; each call is in
    // its session (named by Claude Code in metadata.user_id, no header needed).
    let sessions: Vec<&str> = runs
        .iter()
        .map(|r| r["session_id"].as_str().unwrap())
        .collect();
    let mut by_persona: std::collections::BTreeMap<String, u64> = Default::default();
    for u in ledger_usage(dir.path()) {
        assert!(u.get("estimated").is_none(), "{u}");
        assert!(
            sessions.contains(&u["session"].as_str().unwrap_or("")),
            "{u} in {sessions:?}"
        );
        *by_persona
            .entry(u["persona"].as_str().unwrap().to_string())
            .or_default() +=
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap();
    }
    let expected = std::collections::BTreeMap::from([
        ("backend-engineer".to_string(), reported_tokens(&runs[1])),
        (
            "testing-specialist".to_string(),
            reported_tokens(&runs[0]) + reported_tokens(&runs[2]),
        ),
    ]);
    assert_eq!(by_persona, expected);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_responses_api_works_on_the_mock_and_on_upstreams_of_either_kind() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = server(dir.path(), &upstream).await;
    let base = format!("{}/v1", s.api);
    let mut told = 0;
    for (text_model, tool_model) in [
        ("mock/gpt-5", "mock/gpt-5"),
        // Translated to Chat Completions, and (through chat) to Anthropic Messages.
        ("ok", "tool"),
        ("claude-ok", "claude-tool"),
    ] {
        let r = python(
            "openai_responses_client.py",
            vec![base.clone(), text_model.into(), tool_model.into()],
        )
        .await;
        assert_eq!(r["plain"]["status"], "completed", "{text_model}: {r}");
        assert_eq!(r["plain"]["id_ok"], true);
        assert_eq!(
            r["stream"]["text"], r["stream"]["final_text"],
            "{text_model}"
        );
        assert!(
            !r["stream"]["text"].as_str().unwrap().is_empty(),
            "{text_model}"
        );
        assert_has_events(
            &r,
            &[
                "response.created",
                "response.output_item.added",
                "response.output_text.delta",
                "response.output_item.done",
                "response.completed",
            ],
            text_model,
        );
        assert_eq!(
            r["tool_call"],
            json!({"name": "search", "argument_keys": ["city"]}),
            "{text_model}"
        );
        assert_eq!(
            r["tool_answer"],
            json!({"has_text": true, "calls": 0}),
            "{text_model}"
        );
        assert_eq!(
            r["tool_stream"],
            json!({"name": "search", "argument_keys": ["city"]}),
            "{text_model}"
        );
        told += r["tokens"].as_u64().unwrap();
        if text_model == "ok" {
            // instructions + input: two chat messages upstream.
            assert_eq!(r["plain"]["input"], 12);
            assert_eq!(r["plain"]["output"], 7);
        }
    }
    // What the clients were told, call by call, is what the ledger holds.
    settled(&s, told).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_runs_on_the_mock_attributed_by_header_and_its_tokens_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = server(dir.path(), &upstream).await;
    let codex = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/agents/node_modules/.bin/codex");
    assert!(
        codex.exists(),
        "{} is missing: scripts/test.sh installs @openai/codex there",
        codex.display()
    );
    let home = dir.path().join("codex-home");
    std::fs::create_dir_all(home.join(".codex")).unwrap();
    std::fs::write(
        home.join(".codex/config.toml"),
        format!(
            r#"model = "mock/gpt-5"
model_provider = "hypertool"

[model_providers.hypertool]
name = "hypertool"
base_url = "{}/v1"
wire_api = "responses"
http_headers = {{ "X-Hypertool-Persona" = "devops-engineer", "X-Hypertool-Session" = "codex-1" }}
"#,
            s.api
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(codex)
            .args(["exec", "--json", "--skip-git-repo-check", "say hi"])
            .current_dir(&home)
            .env("HOME", &home)
            .env_remove("OPENAI_API_KEY")
            .env_remove("CODEX_HOME")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "codex exec failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        events.iter().any(|e| e["item"]["type"] == "agent_message"
            && e["item"]["text"]
                .as_str()
                .unwrap_or("")
                .contains("Mock answer from hypertool")),
        "{stdout}"
    );
    let reported: u64 = events
        .iter()
        .filter(|e| e["type"] == "turn.completed")
        .map(|e| {
            e["usage"]["input_tokens"].as_u64().unwrap()
                + e["usage"]["output_tokens"].as_u64().unwrap()
        })
        .sum();
    assert!(reported > 0, "{stdout}");
    let usage = ledger_usage(dir.path());
    assert!(!usage.is_empty());
    assert!(usage.iter().all(|u| u["persona"] == "devops-engineer"
        && u["session"] == "codex-1"
        && u.get("estimated").is_none()));
    let ledger: u64 = usage
        .iter()
        .map(|u| u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        ledger, reported,
        "Codex's own account of its tokens is the ledger's"
    );
    // Its own tools (exec_command, apply_patch, its hosted web_search, …) are left alone.
    let m = s.metrics().await;
    assert_eq!(m.sum("hypertool_gateway_tools_removed_total"), 0.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_tokens_are_priced_apart_and_unpriced_models_are_visible() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = server(dir.path(), &upstream).await;
    for model in ["claude-priced", "ok", "mock/claude"] {
        let resp = post_messages(
            &s,
            json!({"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "price me"}]}),
        )
        .await;
        assert_eq!(resp.status(), 200, "{model}");
    }
    let usage = eventually("three usage events", Duration::from_secs(10), || {
        let u = ledger_usage(dir.path());
        async move { (u.len() == 3).then_some(u) }
    })
    .await;
    // 11 uncached prompt tokens at $1/1k, 2 read from the cache at $0.10, 1 written at $1.25,
    // 7 completion tokens at $2.
    let priced = &usage[0];
    assert_eq!(priced["model"], "claude-priced");
    assert_eq!(
        (
            priced["prompt_tokens"].as_u64(),
            priced["cache_read_tokens"].as_u64(),
            priced["cache_write_tokens"].as_u64()
        ),
        (Some(14), Some(2), Some(1))
    );
    let cost = priced["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - (11.0 + 0.2 + 1.25 + 14.0) / 1000.0).abs() < 1e-9,
        "{cost}"
    );
    // No price: counted as unpriced (the mock is free, not unpriced), and the dashboard says so.
    let m = s.metrics().await;
    assert_eq!(
        m.get("hypertool_gateway_unpriced_calls_total", &[("model", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "hypertool_gateway_unpriced_calls_total",
            &[("model", "mock/claude")]
        ),
        None
    );
    assert_eq!(
        m.get(
            "hypertool_gateway_unpriced_calls_total",
            &[("model", "claude-priced")]
        ),
        None
    );
    let (status, dash) = s.get_json("/api/dashboard").await;
    assert_eq!(status, 200);
    let unpriced_tokens = usage[1]["prompt_tokens"].as_u64().unwrap()
        + usage[1]["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        dash["unpriced_tokens"].as_f64(),
        Some(unpriced_tokens as f64)
    );
    s.stop().await;
    // `hypertool check` names the model with no price.
    let out = std::process::Command::new(crate::process::BIN)
        .args(["check", "--config"])
        .arg(dir.path().join("config/hypertool.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("warning: model `ok` has no prices"), "{text}");
    assert!(
        !text.contains("model `claude-priced` has no prices"),
        "{text}"
    );
}

const AGENTS_WORKFLOW: &str = r#"
name: agents
description: stages for the dialect tests
stages:
  - name: review
    model: claude-ok
  - name: checked
    model: weak
    retries: 1
    escalation_model: strong
    quality_gate:
      code_block: python
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_models_gates_the_cache_cut_streams_and_bad_input_in_every_dialect() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    export_anthropic_key();
    let mut extra = both_kinds(&upstream);
    extra.push_str(
        "\n[[gateway.models]]\nname = \"claude-fail\"\nupstream = \"anthropic-fake\"\nupstream_model = \"fail-500\"\nretries = 0\nfallbacks = [\"ok\"]\n",
    );
    let toml = gateway_config(dir.path(), &upstream.base_url, &extra);
    std::fs::write(
        toml.parent().unwrap().join("workflows/agents.yml"),
        AGENTS_WORKFLOW,
    )
    .unwrap();
    let s = start(
        Source::File(toml),
        &dir.path().join("data"),
        Arc::new(ManualClock::new(SystemClock.now_ms())),
    )
    .await;
    let call = |route: &'static str, stage: Option<&'static str>, body: Value| {
        let mut r = s
            .http
            .post(format!("{}{route}", s.api))
            .header("x-hypertool-persona", "backend-engineer")
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", "test-beta-2026-01-01");
        if let Some(st) = stage {
            r = r
                .header("x-hypertool-workflow", "agents")
                .header("x-hypertool-stage", st);
        }
        r.json(&body).send()
    };
    let hdr = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let messages = |model: &str| json!({"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "write it"}]});
    let responses = |model: &str| json!({"model": model, "input": "write it"});

    // The stage's model decides, in each dialect.
    for (route, body) in [
        ("/v1/messages", messages("whatever")),
        ("/v1/responses", responses("whatever")),
    ] {
        let r = call(route, Some("review"), body).await.unwrap();
        assert_eq!(r.status(), 200, "{route}");
        assert_eq!(hdr(&r, "x-hypertool-model").as_deref(), Some("claude-ok"));
        assert_eq!(
            hdr(&r, "x-hypertool-stage-model").as_deref(),
            Some("whatever -> claude-ok")
        );
        let v: Value = r.json().await.unwrap();
        let text = if route == "/v1/messages" {
            v["content"][0]["text"].clone()
        } else {
            v["output"][0]["content"][0]["text"].clone()
        };
        assert_eq!(text, "fake answer words", "{route}: {v}");
    }
    // Unknown fields and the beta header reach an Anthropic upstream as sent.
    let mut with_extra = messages("claude-ok");
    with_extra["context_management"] = json!({"edits": []});
    let r = call("/v1/messages", None, with_extra).await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.stats().await["anthropic"].clone();
    assert_eq!(seen["anthropic-beta"], "test-beta-2026-01-01");
    assert_eq!(seen["body"]["context_management"], json!({"edits": []}));

    // A gated stage: the weak answer fails, the escalation model's passes — in Messages' shape.
    let r = call("/v1/messages", Some("checked"), messages("whatever"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        hdr(&r, "x-hypertool-escalated").as_deref(),
        Some("weak -> strong")
    );
    assert_eq!(hdr(&r, "x-hypertool-attempts").as_deref(), Some("2"));
    let v: Value = r.json().await.unwrap();
    assert!(
        v["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("```python"),
        "{v}"
    );
    // Streamed, the verdict is a comment before the stream's end.
    let mut streamed = responses("whatever");
    streamed["stream"] = json!(true);
    let text = call("/v1/responses", Some("checked"), streamed)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let gate = text.find(": x-hypertool-quality-gate: fail").expect(&text);
    assert!(
        gate < text.find("event: response.completed").unwrap(),
        "{text}"
    );

    // A fallback across kinds: the Anthropic model fails, the OpenAI-compatible one answers.
    let r = call("/v1/messages", None, messages("claude-fail"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        hdr(&r, "x-hypertool-fallback").as_deref(),
        Some("claude-fail -> ok")
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["content"][0]["text"],
        "fake answer words"
    );

    // The cache in Responses: a hit, and its stream replayed as Responses events.
    let mut cached = responses("ok");
    cached["temperature"] = json!(0);
    let first = call("/v1/responses", None, cached.clone()).await.unwrap();
    assert_eq!(hdr(&first, "x-hypertool-cache").as_deref(), Some("miss"));
    let second = call("/v1/responses", None, cached.clone()).await.unwrap();
    assert_eq!(hdr(&second, "x-hypertool-cache").as_deref(), Some("hit"));
    assert_eq!(
        second.json::<Value>().await.unwrap()["output"][0]["content"][0]["text"],
        "fake answer words"
    );
    cached["stream"] = json!(true);
    let r = call("/v1/responses", None, cached).await.unwrap();
    assert_eq!(hdr(&r, "x-hypertool-cache").as_deref(), Some("hit"));
    let text = r.text().await.unwrap();
    assert!(text.starts_with("event: response.created\n"), "{text}");
    assert!(text.contains("\"delta\":\"fake answer words\""), "{text}");
    assert!(text.contains("event: response.completed\n"), "{text}");

    // A cut stream to a Responses client: an error event, usage estimated, never zero.
    let before = ledger_usage(dir.path()).len();
    let mut cut = responses("cut-stream");
    cut["stream"] = json!(true);
    let text = call("/v1/responses", None, cut)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("event: error\n"), "{text}");
    assert!(!text.contains("response.completed"), "{text}");
    let usage = eventually("the cut stream's usage", Duration::from_secs(10), || {
        let u = ledger_usage(dir.path());
        async move { (u.len() == before + 1).then_some(u) }
    })
    .await;
    let last = usage.last().unwrap();
    assert_eq!(last["estimated"], true);
    assert!(last["completion_tokens"].as_u64().unwrap() > 0, "{last}");

    // Bad Responses input: a 400 naming where, in OpenAI's shape; nothing recorded.
    let before = ledger_usage(dir.path()).len();
    for (body, code) in [
        (
            json!({"model": "ok", "input": [{"type": "hologram"}]}),
            "unsupported_content",
        ),
        (
            json!({"model": "ok", "input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]}),
            "invalid_tool_result",
        ),
        (
            json!({"model": "ok", "input": "hi", "previous_response_id": "resp_1"}),
            "previous_response_not_stored",
        ),
        (json!({"model": "ok"}), "missing_input"),
    ] {
        let r = call("/v1/responses", None, body).await.unwrap();
        assert_eq!(r.status(), 400, "{code}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
    }
    assert_eq!(ledger_usage(dir.path()).len(), before);
    s.stop().await;
}
