//! Token counting (`gateway::tokens`, issue 35): the tokenizer gives the counts tiktoken gave on
//! real prompts and code; no input makes any counting path panic, and its cost per byte stays
//! bounded whatever the input (a long run of one letter was quadratic, and past ~1 MB a panic);
//! and the probe's rows, each as a test against a running server with its numbers asserted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde_json::{json, Map, Value};

use hypertool::gateway::dialect::{CallRequest, Dialect};
use hypertool::gateway::tokens::{self, RunningCount};
use hypertool::web::error::ApiError;

use crate::common::*;

/// Every file under `dir` whose name ends with one of `exts`.
fn files_under(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, exts, out);
        } else if exts
            .iter()
            .any(|e| path.extension().is_some_and(|x| x == *e))
        {
            out.push(path);
        }
    }
}

/// Prompts as agents write them, in the scripts and shapes the repository's files lack.
const PROMPTS: &[&str] = &[
    "You are a senior backend engineer. Review the following diff and list every bug you find, most severe first.",
    "Schreibe einen Test für die Funktion `parse_event`, der leere Eingaben, ungültiges JSON und Unicode prüft.",
    "请为这个 Rust 函数编写单元测试，并解释每个断言的目的。函数会解析 JSON 并返回错误。",
    "このコードのバグを見つけて修正してください。特に並行処理とエラー処理に注意してください。",
    "اكتب وظيفة بايثون تقرأ ملف CSV وتحسب المتوسط لكل عمود رقمي.",
    "Привет! Объясни, почему этот SQL-запрос медленный, и предложи индекс.",
    "🚀 Deploy checklist: ✅ tests ✅ lint ❌ changelog — what's missing? 👩‍💻🧑🏽‍🔬",
    "  leading spaces\n\n\ttabs\r\nand CRLF\r\n   trailing   ",
    "x = 1_000_000 + 0xFF - 3.14159e-10; // numbers 1234567890 12 123 1234",
    "'s 't 're 've 'm 'll 'd ’s — contractions: I'm, you're, they've, it'll, he'd",
    "{\"tool\": \"bash\", \"arguments\": {\"command\": \"cargo test -- --nocapture 2>&1 | tail -20\"}}",
    "https://example.com/path?query=value&other=1#fragment <div class=\"a\">&amp;</div>",
];

#[test]
fn counts_are_tiktokens_on_real_prompts_and_code() {
    let reference = tiktoken_rs::cl100k_base().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in [
        "src",
        "docs",
        "config",
        "deploy",
        "tests/fixtures",
        "scripts",
    ] {
        files_under(
            &root.join(dir),
            &[
                "rs", "md", "toml", "yml", "yaml", "json", "py", "sh", "html",
            ],
            &mut files,
        );
    }
    files.push(root.join("README.md"));
    assert!(files.len() > 100, "the corpus is the repository's files");
    let mut texts: Vec<(String, String)> = files
        .iter()
        .filter_map(|p| Some((p.display().to_string(), std::fs::read_to_string(p).ok()?)))
        .collect();
    texts.extend(
        PROMPTS
            .iter()
            .map(|p| ("prompt".to_string(), p.to_string())),
    );
    let mut total_bytes = 0;
    let mut total_tokens = 0;
    for (name, text) in &texts {
        let expected = reference.encode_ordinary(text).len() as u64;
        assert_eq!(tokens::count_text(text), expected, "{name}");
        // Split as a stream would arrive: the running count agrees within a token per cut piece.
        let mut running = RunningCount::default();
        let mut pushed = 0;
        for piece in split_on_chars(text, 37) {
            running.push(piece);
            pushed += 1;
        }
        let cuts = (text.len() / 4096) as u64 + 1;
        let diff = running.total().abs_diff(expected);
        assert!(
            diff <= cuts,
            "{name}: running {} vs {expected} over {pushed} pieces",
            running.total()
        );
        total_bytes += text.len();
        total_tokens += expected;
    }
    assert!(total_bytes > 1_000_000, "{total_bytes} bytes compared");
    println!(
        "{} texts, {total_bytes} bytes, {total_tokens} tokens: the same counts as tiktoken",
        texts.len()
    );
}

/// `text` in pieces of about `n` bytes, cut on character boundaries.
fn split_on_chars(text: &str, n: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + n).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(&text[start..end]);
        start = end;
    }
    out
}

/// A text up to `max` bytes built of runs: one character repeated (the tokenizers' worst case),
/// random letters, digits, spaces and newlines, CJK, emoji with joiners, any character at all.
fn pathological_text(max: usize) -> impl Strategy<Value = String> {
    let run = prop_oneof![
        (
            prop::sample::select(vec![
                'i', 'a', ' ', '\n', '1', '!', '中', '😀', '\u{200d}', '\u{ad}'
            ]),
            1usize..400_000
        )
            .prop_map(|(c, n)| c.to_string().repeat(n)),
        "[a-zA-Z]{1,2000}",
        "[0-9 \n\t]{1,2000}",
        "\\PC{1,500}",
        any::<String>(),
        "([a-z]+'(s|t|re|ll)){1,200}",
    ];
    prop::collection::vec(run, 1..12).prop_map(move |runs| {
        let mut text = String::new();
        for r in runs {
            if text.len() + r.len() > max {
                break;
            }
            text.push_str(&r);
        }
        text
    })
}

/// A request body of `dialect` carrying `text` in every place its prompt is read from.
fn body_with(dialect: Dialect, text: &str) -> Value {
    match dialect {
        Dialect::Chat => json!({"model": "mock/x", "messages": [
            {"role": "system", "content": text},
            {"role": "user", "name": "u", "content": [{"type": "text", "text": text}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": text}}]},
        ]}),
        Dialect::Messages => {
            json!({"model": "mock/x", "max_tokens": 10, "system": text, "messages": [
                {"role": "user", "content": [{"type": "text", "text": text}, {"type": "tool_result", "tool_use_id": "t", "content": text}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"q": text}}, {"type": "thinking", "thinking": text}]},
            ]})
        }
        Dialect::Responses => json!({"model": "mock/x", "instructions": text, "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": text},
            {"type": "function_call_output", "call_id": "c", "output": text},
        ]}),
    }
}

/// Every counting path over `text`: the text itself, a running count, and each dialect's prompt
/// as parsed from its JSON bytes (truncation included). Returns the plain count.
fn count_every_way(text: &str) -> u64 {
    let plain = tokens::count_text(text);
    let mut running = RunningCount::default();
    for piece in split_on_chars(text, 9_973) {
        running.push(piece);
    }
    let _ = running.total();
    for dialect in [Dialect::Chat, Dialect::Messages, Dialect::Responses] {
        let bytes = serde_json::to_vec(&body_with(dialect, text)).unwrap();
        let body: Map<String, Value> = ApiError::json_object(&bytes).unwrap();
        let mut request = CallRequest::new(dialect, body);
        let prompt = request.prompt().into_owned();
        let counted = tokens::count_messages(&prompt);
        assert!(counted >= plain, "{dialect:?}: the prompt holds the text");
        let _ = tokens::rough_count_messages(&prompt);
        if let Some(messages) = request.messages_mut() {
            let shares: Vec<u64> = messages.iter().map(tokens::message_tokens).collect();
            let _ = tokens::truncate_messages(messages, shares, 10);
        }
    }
    plain
}

#[test]
fn no_input_makes_counting_panic_and_the_cost_per_byte_is_bounded() {
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 24,
        ..RunnerConfig::default()
    });
    let strategy = pathological_text(4 << 20);
    let mut worst_ns_per_byte = 0.0f64;
    for case in 0..24 {
        let text = strategy.new_tree(&mut runner).unwrap().current();
        let started = Instant::now();
        let counted = count_every_way(&text);
        let elapsed = started.elapsed();
        // Each token is at least one byte.
        assert!(counted <= text.len() as u64, "case {case}");
        // ~10 passes over the text (three dialects, each prompt counted and truncated).
        let ns_per_byte = elapsed.as_nanos() as f64 / (text.len().max(1) as f64 * 10.0);
        if text.len() > 100_000 {
            worst_ns_per_byte = worst_ns_per_byte.max(ns_per_byte);
        }
    }
    // A debug build counts ordinary text at ~0.1 µs a byte; tiktoken-rs's quadratic merge took
    // 28 µs a byte on a 300 KB run of one letter and more on longer ones.
    assert!(
        worst_ns_per_byte < 5_000.0,
        "worst cost {worst_ns_per_byte:.0} ns a byte"
    );
    println!("worst cost {worst_ns_per_byte:.0} ns a byte a pass");
}

#[test]
fn the_probes_long_runs_count_exactly_and_in_linear_time() {
    // The probe's inputs, with the counts tiktoken gives them (runs of one letter pair up).
    for (text, expected) in [
        ("i".repeat(100_000), 50_000),
        ("i".repeat(300_000), 150_000),
        ("i".repeat(1_200_000), 600_000),
        ("中".repeat(50_000), 50_000),
        ("i".repeat(4 << 20), 2 << 20),
    ] {
        let started = Instant::now();
        assert_eq!(tokens::count_text(&text), expected, "{} bytes", text.len());
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(5),
            "{} bytes took {elapsed:?}",
            text.len()
        );
    }
}

#[test]
fn lone_surrogates_in_a_body_are_refused_not_counted() {
    for raw in [
        r#"{"model":"mock/x","messages":[{"role":"user","content":"\ud800"}]}"#,
        r#"{"model":"mock/x","messages":[{"role":"user","content":"a\udfffb"}]}"#,
    ] {
        let e = ApiError::json_object(raw.as_bytes()).unwrap_err();
        assert_eq!(e.status().as_u16(), 400, "{raw}");
    }
    // A pair is one character, and counts.
    let body = ApiError::json_object(
        br#"{"model":"mock/x","messages":[{"role":"user","content":"\ud83d\ude00"}]}"#,
    )
    .unwrap();
    let request = CallRequest::new(Dialect::Chat, body);
    assert!(tokens::count_messages(&request.prompt()) > 7);
}

// ---------------------------------------------------------------------------------------------
// The probe's rows against a running server.

async fn post_as(s: &TestServer, path: &str, persona: &str, body: &Value) -> (u16, Value) {
    let resp = s
        .http
        .post(format!("{}{path}", s.api))
        .header("x-hypertool-persona", persona)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: the connection dropped: {e}"));
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn gate_eval(text: &str) -> Value {
    json!({"workflow": "package-release", "stage": "version-bump", "text": text, "record": false})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_run_of_one_letter_is_counted_on_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let s = enforcing_server(dir.path(), None, &[]).await;
    // The probe's 1.2 MB run: tiktoken-rs panicked on it (503 "server shutting down?", dropped
    // connections). 600,000 tokens; a user message adds 3 + 1 (its role) and the reply's 3.
    let run = "i".repeat(1_200_000);
    let user = json!([{"role": "user", "content": run}]);
    let calls = [
        (
            "/v1/chat/completions",
            json!({"model": "mock/x", "messages": user}),
            "/usage/prompt_tokens",
        ),
        (
            "/v1/messages",
            json!({"model": "mock/x", "max_tokens": 16, "messages": user}),
            "/usage/input_tokens",
        ),
        (
            "/v1/responses",
            json!({"model": "mock/x", "input": run}),
            "/usage/input_tokens",
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "mock/x", "messages": user}),
            "/input_tokens",
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock/x", "input": run}),
            "/usage/prompt_tokens",
        ),
    ];
    for (path, body, tokens) in &calls {
        let started = Instant::now();
        let (status, answer) = post_as(&s, path, "backend-engineer", body).await;
        assert_eq!(status, 200, "{path}: {answer}");
        let expected = if *path == "/v1/embeddings" {
            600_000
        } else {
            600_007
        };
        assert_eq!(
            answer.pointer(tokens).and_then(Value::as_u64),
            Some(expected),
            "{path}: {answer}"
        );
        println!("{path}: {expected} tokens in {:?}", started.elapsed());
    }
    let (status, verdict) = post_as(
        &s,
        "/v1/quality-gates/evaluate",
        "backend-engineer",
        &gate_eval(&run),
    )
    .await;
    assert_eq!(status, 200, "{verdict}");
    assert_eq!(verdict["result"], "fail", "a run of i is no version bump");
    // The probe's quadratic cases: 2.83 s, 27.95 s and 7.38 s of CPU each with tiktoken-rs.
    for text in [
        "i".repeat(100_000),
        "i".repeat(300_000),
        "中".repeat(50_000),
    ] {
        let started = Instant::now();
        let (status, _) = post_as(
            &s,
            "/v1/quality-gates/evaluate",
            "backend-engineer",
            &gate_eval(&text),
        )
        .await;
        assert_eq!(status, 200);
        let took = started.elapsed();
        println!("evaluate of {} bytes: {took:?}", text.len());
        assert!(
            took < Duration::from_secs(2),
            "{} bytes took {took:?}",
            text.len()
        );
    }
    let m = s.metrics().await;
    assert_eq!(m.sum("hypertool_internal_errors_total"), 0.0);
    s.stop().await;
}

/// The usage events in the ledger of the server under `dir`.
fn ledger_usage(dir: &Path) -> Vec<Value> {
    ledger_events(dir, "usage")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_before_its_first_byte_is_charged_its_estimate_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // The mock takes 30 s to answer: every client below leaves before the first byte.
    let s = enforcing_server(
        dir.path(),
        None,
        &[("latency_ms = 0", "latency_ms = 30000")],
    )
    .await;
    let prompt = "count me ".repeat(50);
    let estimate = tokens::count_messages(&[json!({"role": "user", "content": prompt})]) + 100;
    let calls = [
        (
            "/v1/chat/completions",
            json!({"model": "mock/x", "stream": true, "max_tokens": 100, "messages": [{"role": "user", "content": prompt}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "mock/x", "stream": true, "max_tokens": 100, "messages": [{"role": "user", "content": prompt}]}),
        ),
        (
            "/v1/responses",
            json!({"model": "mock/x", "stream": true, "max_output_tokens": 100, "input": prompt}),
        ),
    ];
    for (i, (path, body)) in calls.iter().enumerate() {
        let sent = s
            .http
            .post(format!("{}{path}", s.api))
            .header("x-hypertool-persona", "backend-engineer")
            .header("anthropic-version", "2023-06-01")
            .json(body)
            .send();
        // The client leaves after 300 ms: the mock has not answered.
        assert!(tokio::time::timeout(Duration::from_millis(300), sent)
            .await
            .is_err());
        let usage = eventually(
            &format!("{path}: the cut stream's estimate in the ledger"),
            Duration::from_secs(5),
            || {
                let u = ledger_usage(dir.path());
                async move { (u.len() > i).then(|| u[i].clone()) }
            },
        )
        .await;
        assert_eq!(usage["estimated"], true, "{path}: {usage}");
        assert_eq!(usage["persona"], "backend-engineer");
        // Its admission's estimate: the prompt as counted and the 100 tokens it allowed itself.
        let tokens =
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap();
        assert_eq!(tokens, estimate, "{path}: {usage}");
        assert!(
            usage["call"].is_string(),
            "it settles the admitted call: {usage}"
        );
    }
    // The engine counted them too (not only after a restart).
    let m = s.metrics().await;
    let used = m.sum_where(
        "hypertool_persona_tokens_used_total",
        "persona",
        "backend-engineer",
    );
    assert_eq!(used, 3.0 * estimate as f64);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_without_usage_is_estimated_as_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = enforcing_server(dir.path(), Some(&upstream), &[]).await;
    // 240 KB of one letter and no usage: the probe saw 40 s to deliver it and ~70 s of CPU.
    let started = Instant::now();
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-persona", "backend-engineer")
        .json(&json!({"model": "long-run", "stream": true, "messages": [{"role": "user", "content": "go"}]}))
        .send()
        .await
        .unwrap();
    let body = resp.text().await.unwrap();
    let took = started.elapsed();
    assert!(body.contains("[DONE]"));
    assert_eq!(body.matches(&"i".repeat(1000)).count(), 240);
    let usage = eventually("the long stream's usage", Duration::from_secs(10), || {
        let u = ledger_usage(dir.path());
        async move { u.first().cloned() }
    })
    .await;
    assert_eq!(usage["estimated"], true);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    // 120,000 tokens exactly when counted at once; the running count may differ by a token per
    // piece it cut.
    assert!(completion.abs_diff(120_000) <= 60, "{completion}");
    println!("240 KB streamed and estimated in {took:?}: {completion} tokens");
    assert!(took < Duration::from_secs(10), "{took:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_call_is_a_500_in_its_dialect_and_its_call_is_settled() {
    use hypertool::gateway::faults::{plant, Fault};
    let dir = tempfile::tempdir().unwrap();
    let s = enforcing_server(dir.path(), None, &[]).await;
    // Markers of this test's own: the faults are the process's, and other tests run beside it.
    plant("panic-7c1e-call", Fault::Call);
    plant("panic-7c1e-stream", Fault::MidStream);
    let user = |marker: &str| json!([{"role": "user", "content": format!("please {marker}")}]);
    let plain = [
        // In the call's task.
        (
            "/v1/chat/completions",
            json!({"model": "mock/x", "max_tokens": 50, "messages": user("panic-7c1e-call")}),
        ),
        (
            "/v1/messages",
            json!({"model": "mock/x", "max_tokens": 50, "messages": user("panic-7c1e-call")}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock/x", "input": "please panic-7c1e-call"}),
        ),
        // In the handler itself (a stream's opening, a count).
        (
            "/v1/responses",
            json!({"model": "mock/x", "stream": true, "max_output_tokens": 50, "input": "please panic-7c1e-call"}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "mock/x", "messages": user("panic-7c1e-call")}),
        ),
    ];
    for (path, body) in &plain {
        let (status, answer) = post_as(&s, path, "backend-engineer", body).await;
        assert_eq!(status, 500, "{path}: {answer}");
        let error = if path.starts_with("/v1/messages") {
            assert_eq!(
                answer["type"], "error",
                "{path}: Anthropic's shape: {answer}"
            );
            assert_eq!(answer["error"]["type"], "api_error");
            &answer["error"]
        } else {
            &answer["error"]
        };
        assert_eq!(error["code"], "internal_error", "{path}: {answer}");
        assert!(
            !error["message"].as_str().unwrap().contains("planted"),
            "nothing of the panic: {answer}"
        );
    }
    // Mid-stream, in the relay's task: the stream ends with an error event in its dialect.
    for (path, body, marker) in [
        (
            "/v1/chat/completions",
            json!({"model": "mock/x", "stream": true, "max_tokens": 50, "messages": user("panic-7c1e-stream")}),
            "\"code\":\"internal_error\"",
        ),
        (
            "/v1/messages",
            json!({"model": "mock/x", "stream": true, "max_tokens": 50, "messages": user("panic-7c1e-stream")}),
            "\"type\":\"api_error\"",
        ),
    ] {
        let resp = s
            .http
            .post(format!("{}{path}", s.api))
            .header("x-hypertool-persona", "backend-engineer")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let text = resp.text().await.unwrap();
        assert!(
            text.contains(marker) && text.contains("internal error"),
            "{path}: {text}"
        );
    }
    // Every admitted call that panicked is settled at its estimate, at once (count_tokens admits
    // nothing; the four others and the two streams did).
    let settled = eventually("six settlements", Duration::from_secs(5), || {
        let u = ledger_usage(dir.path());
        async move { (u.len() >= 6).then_some(u) }
    })
    .await;
    assert_eq!(settled.len(), 6, "{settled:?}");
    assert!(
        settled
            .iter()
            .all(|u| u["estimated"] == true && u["call"].is_string()),
        "{settled:?}"
    );
    let m = s.metrics().await;
    assert_eq!(m.sum("hypertool_internal_errors_total"), 7.0);
    assert_eq!(
        m.sum_where(
            "hypertool_gateway_requests_total",
            "outcome",
            "internal_error"
        ),
        5.0
    );
    // And the server goes on serving.
    let (status, _) = post_as(
        &s,
        "/v1/chat/completions",
        "backend-engineer",
        &json!({"model": "mock/x", "messages": user("fine")}),
    )
    .await;
    assert_eq!(status, 200);
    s.stop().await;
}
