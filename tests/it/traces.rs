//! Traces: the spans hypertool sends, decoded from the protobuf by a receiver in the test (an
//! OTLP collector and a stand-in for Langfuse), and what happens when the destination is down,
//! refuses the keys, or hypertool restarts in between.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hypertool::config::Source;
use hypertool::core::clock::{Clock, ManualClock, SystemClock};
use hypertool::server::evaluate_alerts;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{json, Value};

use crate::common::*;

/// What the receiver got.
#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// (path, headers) of every request
    requests: Vec<(String, HeaderMap)>,
    scores: Vec<Value>,
    service_names: Vec<String>,
    /// Ingestion items still to refuse, for now (500) and for good (400), and the ids refused.
    refuse: (u32, u32),
    refused_for_now: Vec<String>,
    refused_for_good: Vec<String>,
}

/// An OTLP/HTTP receiver and Langfuse stand-in on one port; `answer` is the status it gives.
#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Received>>,
    answer: Arc<AtomicU16>,
    port: u16,
    stop: Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
}

async fn traces(
    State(r): State<Receiver>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let status = StatusCode::from_u16(r.answer.load(Ordering::SeqCst)).unwrap();
    let mut got = r.got.lock().unwrap();
    got.requests.push((uri.path().to_string(), headers));
    if !status.is_success() {
        return status;
    }
    let req = ExportTraceServiceRequest::decode(body).expect("a valid OTLP protobuf body");
    for rs in req.resource_spans {
        for kv in rs.resource.unwrap().attributes {
            if kv.key == "service.name" {
                if let Some(Any::StringValue(s)) = kv.value.and_then(|v| v.value) {
                    got.service_names.push(s);
                }
            }
        }
        for ss in rs.scope_spans {
            got.spans.extend(ss.spans);
        }
    }
    status
}

async fn ingestion(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let status = StatusCode::from_u16(r.answer.load(Ordering::SeqCst)).unwrap();
    let mut got = r.got.lock().unwrap();
    got.requests.push(("/api/public/ingestion".into(), headers));
    if !status.is_success() {
        return (status, String::new());
    }
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    // Langfuse's 207: each item a success or an error; refused items are not stored.
    let (mut successes, mut errors) = (Vec::new(), Vec::new());
    for item in v["batch"].as_array().unwrap() {
        let id = item["id"].as_str().unwrap().to_string();
        if got.refuse.0 > 0 {
            got.refuse.0 -= 1;
            got.refused_for_now.push(id.clone());
            errors.push(json!({"id": id, "status": 500, "message": "busy, try again"}));
        } else if got.refuse.1 > 0 && !got.refused_for_now.contains(&id) {
            // (An item sent again after a refusal for now is not the one refused for good.)
            got.refuse.1 -= 1;
            got.refused_for_good.push(id.clone());
            errors.push(json!({"id": id, "status": 400, "message": "invalid score", "error": "value must be numeric"}));
        } else {
            got.scores.push(item.clone());
            successes.push(json!({"id": id, "status": 201}));
        }
    }
    (
        StatusCode::MULTI_STATUS,
        json!({"successes": successes, "errors": errors}).to_string(),
    )
}

impl Receiver {
    async fn start() -> Receiver {
        let r = Receiver {
            got: Arc::default(),
            answer: Arc::new(AtomicU16::new(200)),
            port: free_port(),
            stop: Arc::default(),
        };
        r.listen().await;
        r
    }

    /// (Re)starts listening on the receiver's port.
    async fn listen(&self) {
        let app = axum::Router::new()
            .route("/v1/traces", post(traces))
            .route("/api/public/otel/v1/traces", post(traces))
            .route("/api/public/ingestion", post(ingestion))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        *self.stop.lock().unwrap() = Some(tx);
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
    }

    /// Stops listening (connections close: hypertool sees the receiver gone).
    async fn shut(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
        // Until a connection is refused.
        eventually("the receiver to stop", Duration::from_secs(10), || async {
            std::net::TcpStream::connect(("127.0.0.1", self.port))
                .is_err()
                .then_some(())
        })
        .await;
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spans(&self) -> Vec<Span> {
        self.got.lock().unwrap().spans.clone()
    }
}

fn attr(s: &Span, key: &str) -> Option<Any> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn attr_str(s: &Span, key: &str) -> Option<String> {
    match attr(s, key) {
        Some(Any::StringValue(v)) => Some(v),
        _ => None,
    }
}

fn attr_int(s: &Span, key: &str) -> Option<i64> {
    match attr(s, key) {
        Some(Any::IntValue(v)) => Some(v),
        _ => None,
    }
}

/// LangfuseIntegrationFailing as `GET /api/alerts` shows it.
async fn alert_7(s: &TestServer) -> Value {
    let (_, view) = s.get_json("/api/alerts").await;
    view["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alertname"] == "LangfuseIntegrationFailing")
        .cloned()
        .unwrap()
}

/// Asserts each `(key, value)` string attribute of `s`.
fn assert_attrs(s: &Span, expected: &[(&str, &str)]) {
    for (key, value) in expected {
        assert_eq!(
            attr_str(s, key).as_deref(),
            Some(*value),
            "{key} of {}",
            s.name
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const WORKFLOW: &str = r#"
name: traced
description: stages for the trace tests
stages:
  - name: code
    persona: backend-engineer
    model: weak
    retries: 1
    escalation_model: strong
    quality_gate:
      code_block: python
      must_not_match: ['TODO']
  - name: review
    model: ok
"#;

/// hypertool on the fake upstream, with each `(from, to)` replaced in hypertool.toml (each `from`
/// must be there).
async fn server(dir: &Path, upstream: &FakeUpstream, edits: &[(&str, &str)]) -> TestServer {
    let toml = gateway_config(dir, &upstream.base_url, "");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "hypertool.toml has no `{from}`");
        text = text.replacen(from, to, 1);
    }
    std::fs::write(&toml, text).unwrap();
    std::fs::write(
        toml.parent().unwrap().join("workflows/traced.yml"),
        WORKFLOW,
    )
    .unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    start(Source::File(toml), &dir.join("data"), clock).await
}

async fn chat(
    s: &TestServer,
    model: &str,
    headers: &[(&str, &str)],
    content: &str,
) -> reqwest::Response {
    let mut req = s.http.post(format!("{}/v1/chat/completions", s.api));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req
        .json(&json!({"model": model, "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_runs_stages_switches_and_gated_retries_arrive_as_linked_spans() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let rx = Receiver::start().await;
    let endpoint = format!("endpoint = \"{}/v1/traces\"", rx.url());
    // Langfuse too, at a receiver of its own: both destinations at once.
    let langfuse = Receiver::start().await;
    std::env::set_var("HYPERTOOL_TEST_LF_BOTH_PK", "pk-lf-both");
    std::env::set_var("HYPERTOOL_TEST_LF_BOTH_SK", "sk-lf-both");
    let langfuse_host = format!("host = \"{}\"", langfuse.url());
    let s = server(
        dir.path(),
        &upstream,
        &[
            (
                "# endpoint = \"http://127.0.0.1:4318/v1/traces\"",
                &endpoint,
            ),
            ("batch_interval = \"1s\"", "batch_interval = \"50ms\""),
            ("service_name = \"hypertool\"", "service_name = \"ht-test\""),
            (
                "public_key_env = \"LANGFUSE_PUBLIC_KEY\"",
                "public_key_env = \"HYPERTOOL_TEST_LF_BOTH_PK\"",
            ),
            (
                "secret_key_env = \"LANGFUSE_SECRET_KEY\"",
                "secret_key_env = \"HYPERTOOL_TEST_LF_BOTH_SK\"",
            ),
            ("host = \"https://cloud.langfuse.com\"", &langfuse_host),
        ],
    )
    .await;

    // A call continuing the client's trace.
    let remote_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let remote_parent = "00f067aa0ba902b7";
    chat(
        &s,
        "ok",
        &[
            (
                "traceparent",
                &format!("00-{remote_trace}-{remote_parent}-01"),
            ),
            ("x-hypertool-persona", "frontend-engineer"),
            ("x-hypertool-session", "sess-1"),
        ],
        "hello",
    )
    .await;

    // A run with two stages; the first is gated (weak fails, strong passes on the retry).
    let (status, run) = s
        .post_raw(
            "/v1/workflows/traced/runs",
            json!({"session": "sess-run"}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_string();
    let in_run = |stage: &'static str| {
        vec![
            ("x-hypertool-persona", "backend-engineer"),
            ("x-hypertool-workflow", "traced"),
            ("x-hypertool-stage", stage),
        ]
    };
    let mut h = in_run("code");
    h.push(("x-hypertool-run", &run_id));
    chat(&s, "whatever", &h, "write it").await;
    let mut h = in_run("review");
    h.push(("x-hypertool-run", &run_id));
    chat(&s, "ok", &h, "review it").await;
    let (status, body) = s
        .post_raw(
            &format!("/v1/workflows/traced/runs/{run_id}/finish"),
            json!({"status": "completed"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // An explicit switch, and one inferred from usage.
    let (status, body) = s
        .post_raw(
            "/v1/personas/switch",
            json!({"session": "sess-sw", "to": "testing-specialist"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut a = usage("backend-engineer", "dev", "m", 1, 1);
    a["session"] = json!("sess-inf");
    let mut b = usage("frontend-engineer", "dev", "m", 1, 1);
    b["session"] = json!("sess-inf");
    assert_eq!(s.post_events(json!([a])).await.0, 200);
    assert_eq!(s.post_events(json!([b])).await.0, 200);

    let spans = eventually("every span", Duration::from_secs(20), || {
        let spans = rx.spans();
        let have = |name: &str| spans.iter().filter(|s| s.name == name).count();
        let ok = have("workflow traced") == 1
            && have("stage code") == 1
            && have("stage review") == 1
            && have("POST /v1/chat/completions") == 3
            && have("quality_gate") == 2
            && spans.iter().filter(|s| s.name == "persona_switch").count() >= 2;
        async move { ok.then_some(spans) }
    })
    .await;
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    assert_eq!(by_id.len(), spans.len(), "every span once");
    assert!(rx
        .got
        .lock()
        .unwrap()
        .service_names
        .iter()
        .all(|n| n == "ht-test"));
    let requests: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "POST /v1/chat/completions")
        .collect();
    let children = |parent: &Span| -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
            .collect()
    };

    // 1. The continued trace: the request's parent is the client's span; the upstream attempt is
    // its child and went upstream with its own traceparent.
    let continued = requests
        .iter()
        .find(|s| hex(&s.trace_id) == remote_trace)
        .expect("the continued trace");
    assert_eq!(hex(&continued.parent_span_id), remote_parent);
    assert_eq!(continued.kind, 2, "server");
    assert_attrs(
        continued,
        &[
            ("hypertool.persona", "frontend-engineer"),
            ("session.id", "sess-1"),
        ],
    );
    assert_eq!(
        attr(continued, "hypertool.cache_hit"),
        None,
        "said only when true"
    );
    let gens = children(continued);
    assert_eq!(gens.len(), 1, "one upstream attempt");
    let g = gens[0];
    assert_eq!(g.name, "chat ok");
    assert_eq!(g.kind, 3, "client");
    assert_attrs(
        g,
        &[
            ("gen_ai.request.model", "ok"),
            ("gen_ai.operation.name", "chat"),
        ],
    );
    assert!(attr_int(g, "gen_ai.usage.input_tokens").unwrap() > 0);
    assert!(attr_int(g, "gen_ai.usage.output_tokens").unwrap() > 0);
    assert!(
        g.start_time_unix_nano >= continued.start_time_unix_nano
            && g.end_time_unix_nano <= continued.end_time_unix_nano
    );
    assert_eq!(
        attr(g, "gen_ai.input.messages"),
        None,
        "no content unless capture_content"
    );
    let sent = upstream.stats().await["traceparents"].clone();
    let expected = format!("00-{remote_trace}-{}-01", hex(&g.span_id));
    assert!(
        sent.as_array()
            .unwrap()
            .iter()
            .any(|t| t == &json!(expected)),
        "{sent} lacks {expected}"
    );

    // 2. The run: its span is the root of its trace, each stage its child, each call under its
    // stage, the gated call with two attempts (weak, then strong) and a verdict under each.
    let run_span = spans.iter().find(|s| s.name == "workflow traced").unwrap();
    assert!(run_span.parent_span_id.is_empty());
    assert_eq!(
        attr_str(run_span, "hypertool.run").as_deref(),
        Some(run_id.as_str())
    );
    assert_eq!(
        attr_str(run_span, "session.id").as_deref(),
        Some("sess-run")
    );
    let stages: BTreeMap<String, &Span> = children(run_span)
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    assert_eq!(
        stages.keys().collect::<Vec<_>>(),
        ["stage code", "stage review"]
    );
    let code = stages["stage code"];
    assert!(code.start_time_unix_nano <= code.end_time_unix_nano);
    assert!(
        code.end_time_unix_nano <= stages["stage review"].start_time_unix_nano + 1_000_000,
        "code ended when review started"
    );
    assert_eq!(
        attr_str(code, "hypertool.stage.status").as_deref(),
        Some("passed")
    );
    let code_call = children(code)
        .into_iter()
        .find(|s| s.name == "POST /v1/chat/completions")
        .expect("the code call under its stage");
    assert_eq!(attr_int(code_call, "hypertool.attempts"), Some(2));
    assert_eq!(
        attr_str(code_call, "hypertool.gate.result").as_deref(),
        Some("pass")
    );
    let mut attempts: Vec<&Span> = children(code_call)
        .into_iter()
        .filter(|s| s.name.starts_with("chat "))
        .collect();
    attempts.sort_by_key(|s| attr_int(s, "hypertool.gate_attempt").unwrap_or(1));
    assert_eq!(
        attempts.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["chat weak", "chat strong"]
    );
    for (attempt, verdict) in attempts.iter().zip(["fail", "pass"]) {
        let gates: Vec<&Span> = children(attempt)
            .into_iter()
            .filter(|s| s.name == "quality_gate")
            .collect();
        assert_eq!(gates.len(), 1);
        assert_eq!(
            attr_str(gates[0], "hypertool.gate.result").as_deref(),
            Some(verdict)
        );
    }
    let fail_gate = children(attempts[0])
        .into_iter()
        .find(|s| s.name == "quality_gate")
        .unwrap();
    assert_eq!(
        fail_gate.status.as_ref().unwrap().code,
        2,
        "a failed verdict is an error span"
    );
    assert!(attr_str(fail_gate, "hypertool.gate.failed_criteria")
        .unwrap()
        .contains("TODO"));
    let review_call = children(stages["stage review"])
        .into_iter()
        .find(|s| s.name == "POST /v1/chat/completions");
    assert!(review_call.is_some(), "the review call under its stage");

    // 3. Switches: explicit and inferred, named as the runbook's Jaeger query expects.
    let switches: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "persona_switch")
        .collect();
    let explicit = switches
        .iter()
        .find(|s| attr_str(s, "session.id").as_deref() == Some("sess-sw"))
        .unwrap();
    assert_attrs(
        explicit,
        &[
            ("hypertool.switch.kind", "explicit"),
            ("hypertool.persona.to", "testing-specialist"),
        ],
    );
    let inferred = switches
        .iter()
        .find(|s| {
            attr_str(s, "session.id").as_deref() == Some("sess-inf")
                && attr_str(s, "hypertool.persona.to").as_deref() == Some("frontend-engineer")
        })
        .expect("the inferred switch");
    assert_attrs(
        inferred,
        &[
            ("hypertool.switch.kind", "inferred"),
            ("hypertool.persona.from", "backend-engineer"),
        ],
    );

    // An embeddings call is traced the same way.
    let resp = s
        .http
        .post(format!("{}/v1/embeddings", s.api))
        .header("x-hypertool-persona", "data-scientist")
        .json(&json!({"model": "mock/embed", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let embed = eventually("the embeddings spans", Duration::from_secs(20), || async {
        rx.spans()
            .into_iter()
            .find(|s| s.name == "POST /v1/embeddings")
    })
    .await;
    assert_eq!(
        attr_str(&embed, "hypertool.persona").as_deref(),
        Some("data-scientist")
    );
    let embed_gen = eventually(
        "the embeddings generation",
        Duration::from_secs(20),
        || async {
            rx.spans()
                .into_iter()
                .find(|s| s.parent_span_id == embed.span_id && s.name == "embeddings mock/embed")
        },
    )
    .await;
    assert_eq!(
        attr_str(&embed_gen, "gen_ai.operation.name").as_deref(),
        Some("embeddings")
    );

    // Langfuse got every span the collector got, with the same ids.
    let otlp_ids: std::collections::BTreeSet<Vec<u8>> =
        rx.spans().into_iter().map(|s| s.span_id).collect();
    eventually(
        "Langfuse to have every span",
        Duration::from_secs(20),
        || async {
            let ids: std::collections::BTreeSet<Vec<u8>> =
                langfuse.spans().into_iter().map(|s| s.span_id).collect();
            otlp_ids.is_subset(&ids).then_some(())
        },
    )
    .await;
    assert!(langfuse
        .spans()
        .iter()
        .all(|s| attr_str(s, "langfuse.observation.type").is_some()));
    assert!(rx
        .spans()
        .iter()
        .all(|s| attr_str(s, "langfuse.observation.type").is_none()));

    // The export is counted, per destination.
    let m = s.metrics().await;
    assert!(
        m.get(
            "hypertool_trace_export_total",
            &[("destination", "langfuse"), ("result", "ok")]
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        m.get(
            "hypertool_trace_export_total",
            &[("destination", "otlp"), ("result", "ok")]
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        m.get("hypertool_trace_spool_bytes", &[("destination", "otlp")]),
        Some(0.0)
    );
    assert!(
        m.get(
            "hypertool_trace_export_last_success_timestamp_seconds",
            &[("destination", "otlp")]
        )
        .unwrap()
            > 0.0
    );
    s.stop().await;
}

/// The Langfuse edits: keys from `pk_env`/`sk_env`, the stand-in as host, quick batches and retries.
fn langfuse_edits<'a>(host: &'a str, pk_env: &'a str, sk_env: &'a str) -> Vec<(&'a str, String)> {
    vec![
        (
            "public_key_env = \"LANGFUSE_PUBLIC_KEY\"",
            format!("public_key_env = \"{pk_env}\""),
        ),
        (
            "secret_key_env = \"LANGFUSE_SECRET_KEY\"",
            format!("secret_key_env = \"{sk_env}\""),
        ),
        (
            "host = \"https://cloud.langfuse.com\"",
            format!("host = \"{host}\""),
        ),
        // The first `redact` is [langfuse]'s.
        ("redact = []", "redact = [\"secret-[0-9]+\"]".to_string()),
        (
            "batch_interval = \"1s\"",
            "batch_interval = \"50ms\"".to_string(),
        ),
        (
            "max_backoff = \"30s\"",
            "max_backoff = \"200ms\"".to_string(),
        ),
    ]
}

/// A run of workflow `traced` with one gated call (two attempts, two verdicts), finished.
async fn gated_run(s: &TestServer, session: &str) {
    let (status, run) = s
        .post_raw(
            "/v1/workflows/traced/runs",
            json!({"session": session}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_string();
    chat(
        s,
        "whatever",
        &[
            ("x-hypertool-persona", "backend-engineer"),
            ("x-hypertool-workflow", "traced"),
            ("x-hypertool-stage", "code"),
            ("x-hypertool-run", &run_id),
            ("x-hypertool-session", session),
        ],
        "write it, my token is secret-12345",
    )
    .await;
    let (status, body) = s
        .post_raw(
            &format!("/v1/workflows/traced/runs/{run_id}/finish"),
            json!({"status": "completed"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn plain_call(s: &TestServer, n: usize) {
    chat(
        s,
        "ok",
        &[("x-hypertool-persona", "frontend-engineer")],
        &format!("call {n}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_langfuse_refuses_in_a_207_are_counted_and_the_transient_ones_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("HYPERTOOL_TEST_LF_PK", "pk-lf-test-public");
    std::env::set_var("HYPERTOOL_TEST_LF_SK", "sk-lf-test-secret-value");
    let upstream = FakeUpstream::start(dir.path()).await;
    let rx = Receiver::start().await;
    rx.got.lock().unwrap().refuse = (1, 1);
    let host = rx.url();
    let edits = langfuse_edits(&host, "HYPERTOOL_TEST_LF_PK", "HYPERTOOL_TEST_LF_SK");
    let edits: Vec<(&str, &str)> = edits.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let s = server(dir.path(), &upstream, &edits).await;
    // Two gated runs: four scores, the first refused for now, the second for good.
    gated_run(&s, "sess-a").await;
    gated_run(&s, "sess-b").await;
    // The item refused for now arrives again, alone; the one refused for good never does.
    eventually(
        "the refused item sent again",
        Duration::from_secs(20),
        || async {
            let got = rx.got.lock().unwrap();
            let again = got.refused_for_now.first()?;
            got.scores
                .iter()
                .any(|s| s["id"].as_str() == Some(again.as_str()))
                .then_some(())
        },
    )
    .await;
    let got = std::mem::take(&mut *rx.got.lock().unwrap());
    let taken: Vec<&str> = got
        .scores
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(got.refused_for_now.len(), 1);
    assert_eq!(got.refused_for_good.len(), 1);
    assert!(
        !taken.contains(&got.refused_for_good[0].as_str()),
        "dropped: {taken:?}"
    );
    let mut once = taken.clone();
    once.sort();
    once.dedup();
    assert_eq!(once.len(), taken.len(), "each item taken once: {taken:?}");
    let m = s.metrics().await;
    let errors = |kind: &str| {
        m.get(
            "hypertool_trace_item_errors_total",
            &[("destination", "langfuse"), ("kind", kind)],
        )
    };
    assert_eq!(errors("transient"), Some(1.0));
    assert_eq!(errors("permanent"), Some(1.0));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn langfuse_gets_generations_and_scores_once_across_its_outage_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("HYPERTOOL_TEST_LF_PK", "pk-lf-test-public");
    std::env::set_var("HYPERTOOL_TEST_LF_SK", "sk-lf-test-secret-value");
    let upstream = FakeUpstream::start(dir.path()).await;
    let rx = Receiver::start().await;
    let host = rx.url();
    let edits = langfuse_edits(&host, "HYPERTOOL_TEST_LF_PK", "HYPERTOOL_TEST_LF_SK");
    let edits: Vec<(&str, &str)> = edits.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let s = server(dir.path(), &upstream, &edits).await;

    // Up: two gated runs and a plain call arrive.
    gated_run(&s, "sess-a").await;
    gated_run(&s, "sess-b").await;
    plain_call(&s, 1).await;
    let requests = |rx: &Receiver| {
        rx.spans()
            .iter()
            .filter(|s| s.name == "POST /v1/chat/completions")
            .count()
    };
    eventually("the first spans", Duration::from_secs(20), || async {
        (requests(&rx) == 3 && rx.got.lock().unwrap().scores.len() == 4).then_some(())
    })
    .await;

    // Down: calls go on, their spans are spooled.
    rx.shut().await;
    plain_call(&s, 2).await;
    plain_call(&s, 3).await;
    eventually("spooling", Duration::from_secs(20), || async {
        let m = s.metrics().await;
        let retried = m
            .get(
                "hypertool_trace_export_total",
                &[("destination", "langfuse"), ("result", "retry")],
            )
            .unwrap_or(0.0);
        let spooled = m
            .get(
                "hypertool_trace_spool_bytes",
                &[("destination", "langfuse")],
            )
            .unwrap_or(0.0);
        (retried >= 1.0 && spooled > 0.0).then_some(())
    })
    .await;
    // hypertool stops: what is queued goes to the spool, nothing is lost.
    s.stop().await;
    let spool = dir.path().join("data/spool/langfuse");
    assert!(
        std::fs::read_dir(&spool).unwrap().count() > 0,
        "batches spooled at shutdown"
    );

    // Restarted, still without Langfuse: one more run.
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let s = start(
        Source::File(dir.path().join("config/hypertool.toml")),
        &dir.path().join("data"),
        clock,
    )
    .await;
    gated_run(&s, "sess-c").await;
    assert_eq!(
        requests(&rx),
        3,
        "nothing arrives while the stand-in is down"
    );

    // Langfuse is back: everything arrives, each span and score exactly once.
    rx.listen().await;
    eventually("every span and score", Duration::from_secs(30), || async {
        (requests(&rx) >= 6 && rx.got.lock().unwrap().scores.len() >= 6).then_some(())
    })
    .await;
    eventually("the spool to empty", Duration::from_secs(20), || async {
        let m = s.metrics().await;
        (m.get(
            "hypertool_trace_spool_bytes",
            &[("destination", "langfuse")],
        ) == Some(0.0))
        .then_some(())
    })
    .await;
    let spans = rx.spans();
    let mut ids: Vec<&Vec<u8>> = spans.iter().map(|s| &s.span_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), spans.len(), "each span exactly once");
    assert_eq!(requests(&rx), 6);
    assert_eq!(
        spans.iter().filter(|s| s.name == "workflow traced").count(),
        3
    );
    // Taken out whole: no lock is held across the awaits below.
    let got = std::mem::take(&mut *rx.got.lock().unwrap());
    let mut score_ids: Vec<&str> = got
        .scores
        .iter()
        .map(|s| s["body"]["id"].as_str().unwrap())
        .collect();
    score_ids.sort();
    score_ids.dedup();
    assert_eq!(
        score_ids.len(),
        6,
        "each score exactly once: {:?}",
        got.scores
    );

    // Langfuse's protocol: paths, Basic auth of public:secret, the ingestion version.
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode("pk-lf-test-public:sk-lf-test-secret-value")
    );
    assert!(!got.requests.is_empty());
    for (path, headers) in &got.requests {
        assert!(
            path == "/api/public/otel/v1/traces" || path == "/api/public/ingestion",
            "{path}"
        );
        assert_eq!(headers["authorization"], basic.as_str());
        if path.ends_with("/traces") {
            assert_eq!(headers["x-langfuse-ingestion-version"], "4");
            assert_eq!(headers["content-type"], "application/x-protobuf");
        }
    }

    // Langfuse's attributes: generations with user, session, trace metadata, usage, content
    // (redacted before it left the process).
    let call = spans
        .iter()
        .find(|s| {
            s.name == "POST /v1/chat/completions"
                && attr_str(s, "session.id").as_deref() == Some("sess-a")
        })
        .expect("the call of run a");
    assert_attrs(
        call,
        &[
            ("user.id", "backend-engineer"),
            ("langfuse.trace.metadata.workflow", "traced"),
            ("langfuse.trace.metadata.stage", "code"),
            ("langfuse.trace.metadata.chatmode", "default"),
        ],
    );
    assert!(attr_str(call, "langfuse.trace.metadata.run").is_some());
    let generation = spans
        .iter()
        .find(|s| s.name == "chat weak" && s.parent_span_id == call.span_id)
        .expect("the weak attempt of run a, under its call");
    assert_attrs(
        generation,
        &[
            ("langfuse.observation.type", "generation"),
            ("user.id", "backend-engineer"),
            ("langfuse.observation.model.name", "weak"),
        ],
    );
    let usage: Value =
        serde_json::from_str(&attr_str(generation, "langfuse.observation.usage_details").unwrap())
            .unwrap();
    assert!(usage["input"].as_i64().unwrap() > 0 && usage["output"].as_i64().unwrap() > 0);
    let input = attr_str(generation, "langfuse.observation.input").unwrap();
    assert!(
        input.contains("[REDACTED]") && !input.contains("secret-12345"),
        "{input}"
    );
    assert!(attr_str(generation, "langfuse.observation.output")
        .unwrap()
        .contains("TODO"));
    let run_root = spans.iter().find(|s| s.name == "workflow traced").unwrap();
    assert_eq!(
        attr_str(run_root, "langfuse.trace.name").as_deref(),
        Some("workflow traced")
    );

    // Scores: quality_gate on the generation each verdict judged; failed criteria as the comment.
    let weak_hex = hex(&generation.span_id);
    let on_weak = got
        .scores
        .iter()
        .find(|s| s["body"]["observationId"] == json!(weak_hex))
        .expect("a score on the weak attempt");
    assert_eq!(on_weak["type"], "score-create");
    assert_eq!(on_weak["body"]["name"], "quality_gate");
    assert_eq!(on_weak["body"]["value"], 0.0);
    assert_eq!(on_weak["body"]["traceId"], json!(hex(&generation.trace_id)));
    assert!(on_weak["body"]["comment"]
        .as_str()
        .unwrap()
        .contains("TODO"));
    assert_eq!(
        got.scores
            .iter()
            .filter(|s| s["body"]["value"] == 1.0)
            .count(),
        3
    );

    // Counted as accepted by this process: the two spooled calls and run c (one trace each).
    let m = s.metrics().await;
    assert_eq!(m.get("langfuse_trace_created_total", &[]), Some(3.0));
    assert!(
        m.get(
            "hypertool_trace_export_total",
            &[("destination", "langfuse"), ("result", "ok")]
        )
        .unwrap()
            >= 2.0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_langfuse_keys_are_counted_named_and_fire_alert_7() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("HYPERTOOL_TEST_LF_WRONG_PK", "pk-lf-wrong");
    std::env::set_var("HYPERTOOL_TEST_LF_WRONG_SK", "sk-lf-wrong-secret");
    let rx = Receiver::start().await;
    rx.answer.store(401, Ordering::SeqCst);
    let host = rx.url();
    let edits = langfuse_edits(
        &host,
        "HYPERTOOL_TEST_LF_WRONG_PK",
        "HYPERTOOL_TEST_LF_WRONG_SK",
    );
    let edits: Vec<(&str, &str)> = edits.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let s = start_edited(dir.path(), &edits).await;
    let state = s.running.as_ref().unwrap().state.clone();
    // 26 evaluations, 15 s apart: the 5 m `for` with a margin for the first usage to land.
    for _ in 0..26 {
        let resp = s
            .http
            .post(format!("{}/v1/chat/completions", s.api))
            .header("x-hypertool-persona", "devops-engineer")
            .json(&json!({"model": "mock/x", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "a refused trace never fails a call");
        evaluate_alerts(&state).await;
        s.clock.advance_secs(15);
    }
    eventually("a refused batch", Duration::from_secs(20), || async {
        let m = s.metrics().await;
        let refused = m.get(
            "hypertool_trace_export_total",
            &[("destination", "langfuse"), ("result", "auth_refused")],
        );
        (refused.unwrap_or(0.0) >= 1.0).then_some(())
    })
    .await;
    evaluate_alerts(&state).await;
    let a = alert_7(&s).await;
    assert_eq!(a["state"], "firing", "{a}");
    let note = a["instances"][0]["note"].as_str().unwrap();
    assert!(
        note.contains("refused the keys") && note.contains("LANGFUSE_PUBLIC_KEY"),
        "{note}"
    );
    let m = s.metrics().await;
    assert_eq!(
        m.get("langfuse_trace_created_total", &[]),
        Some(0.0),
        "refused traces are not created traces"
    );
    assert_eq!(m.get("hypertool_langfuse_enabled", &[]), Some(1.0));
    // The keys never reach the note or the metrics.
    let text = s.metrics_text().await;
    assert!(!text.contains("sk-lf-wrong-secret") && !note.contains("sk-lf-wrong-secret"));

    // The keys are fixed (here: Langfuse accepts them again): the spooled traces arrive, the
    // alert resolves.
    rx.answer.store(200, Ordering::SeqCst);
    eventually("the spooled traces", Duration::from_secs(90), || async {
        let m = s.metrics().await;
        (m.get("langfuse_trace_created_total", &[]).unwrap_or(0.0) >= 26.0).then_some(())
    })
    .await;
    for _ in 0..2 {
        evaluate_alerts(&state).await;
        s.clock.advance_secs(15);
    }
    evaluate_alerts(&state).await;
    let a = alert_7(&s).await;
    assert_ne!(a["state"], "firing", "{a}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_go_to_the_log_while_langfuse_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ht.log");
    // A port nobody listens on: Langfuse is unreachable.
    let host = format!("http://127.0.0.1:{}", free_port());
    // Killed on drop, also when an assertion fails.
    let mut child = Service(
        std::process::Command::new(crate::process::BIN)
            .current_dir(dir.path())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
            .args(["--log-file", log.to_str().unwrap()])
            .env("LANGFUSE_PUBLIC_KEY", "pk-lf-fallback")
            .env("LANGFUSE_SECRET_KEY", "sk-lf-fallback-secret")
            .env("LANGFUSE_HOST", &host)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (api, metrics) = serving_at(&log).await;
    let http = reqwest::Client::new();
    let call = |n: usize| {
        let (http, api) = (http.clone(), api.clone());
        async move {
            let resp = http
                .post(format!("{api}/v1/chat/completions"))
                .header("x-hypertool-persona", "data-scientist")
                .json(&json!({"model": "mock/fallback", "messages": [{"role": "user", "content": format!("n{n}")}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(
                resp.status(),
                200,
                "an unreachable Langfuse never fails a call"
            );
        }
    };
    call(0).await;
    // Once the exporter has failed to reach Langfuse, generations are logged.
    eventually("a failed export", Duration::from_secs(20), || {
        let (http, metrics) = (http.clone(), metrics.clone());
        async move {
            let text = http
                .get(format!("{metrics}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let m = Exposition::parse(&text);
            (m.get(
                "hypertool_trace_export_total",
                &[("destination", "langfuse"), ("result", "retry")],
            )? >= 1.0)
                .then_some(())
        }
    })
    .await;
    call(1).await;
    let line = eventually("a logged generation", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["target"] == "hypertool::generation");
        async move { found }
    })
    .await;
    let f = &line["fields"];
    assert_eq!(f["persona"], "data-scientist", "{line}");
    assert_eq!(f["model"], "mock/fallback", "{line}");
    assert!(f["input_tokens"].as_u64().is_some_and(|t| t > 0), "{line}");
    assert_eq!(f["chatmode"], "default", "{line}");
    assert_eq!(f["trace_id"].as_str().map(str::len), Some(32), "{line}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("traces cannot be delivered"),
        "the outage is logged"
    );
    assert!(
        !text.contains("sk-lf-fallback-secret"),
        "the key never reaches the log"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let _ = child.0.wait();
}

/// Three faults at once, under load: an upstream that streams slowly (and one that hangs past its
/// timeout), the trace receiver down, and a configuration reload in the middle. Every call gets
/// its answer (fast calls are not held up behind slow ones), the reload takes effect, the ledger
/// holds exactly the upstream's usage, nothing is dropped from the trace queue, and once the
/// receiver is back every call's span arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_a_dead_trace_receiver_and_a_reload_at_once_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let rx = Receiver::start().await;
    rx.shut().await;
    let endpoint = format!("endpoint = \"{}/v1/traces\"", rx.url());
    let s = server(
        dir.path(),
        &upstream,
        &[
            (
                "# endpoint = \"http://127.0.0.1:4318/v1/traces\"",
                &endpoint,
            ),
            ("batch_interval = \"1s\"", "batch_interval = \"50ms\""),
            ("max_backoff = \"30s\"", "max_backoff = \"200ms\""),
        ],
    )
    .await;
    let s = Arc::new(s);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    // Slow streams (3 s each) and calls that hang past their model's 1 s timeout.
    for (model, n) in [("slow-stream", 4), ("hang", 2)] {
        for i in 0..n {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let resp = s
                    .http
                    .post(format!("{}/v1/chat/completions", s.api))
                    .header("x-hypertool-persona", "backend-engineer")
                    .header("x-hypertool-session", format!("{model}-{i}"))
                    .json(&json!({"model": model, "stream": model == "slow-stream",
                                  "stream_options": {"include_usage": true},
                                  "messages": [{"role": "user", "content": "take your time"}]}))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap();
                (model, status, body, Duration::ZERO)
            }));
        }
    }
    // Fast calls meanwhile, each timed.
    for w in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut last = (0, String::new());
            for i in 0..25 {
                let t = std::time::Instant::now();
                let resp = s
                    .http
                    .post(format!("{}/v1/chat/completions", s.api))
                    .header("x-hypertool-persona", "frontend-engineer")
                    .header("x-hypertool-session", format!("fast-{w}-{i}"))
                    .json(
                        &json!({"model": "ok", "messages": [{"role": "user", "content": "quick"}]}),
                    )
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap();
                slowest = slowest.max(t.elapsed());
                if status != 200 {
                    return ("ok", status, body, slowest);
                }
                last = (status, body);
            }
            ("ok", last.0, last.1, slowest)
        }));
    }
    // The reload, while all of that runs: a new budget for a persona being called.
    let budgets = dir.path().join("config/budgets.yml");
    let text = std::fs::read_to_string(&budgets).unwrap();
    std::fs::write(
        &budgets,
        text.replacen(
            "  frontend-engineer:\n    tokens: 1800",
            "  frontend-engineer:\n    tokens: 987654",
            1,
        ),
    )
    .unwrap();
    eventually("the reload to apply", Duration::from_secs(20), || async {
        let (_, b) = s.get_json("/api/budgets/frontend-engineer").await;
        (b["limit_tokens"] == 987654 || b["tokens"] == 987654).then_some(())
    })
    .await;
    for t in tasks {
        let (model, status, body, slowest) = t.await.unwrap();
        match model {
            "slow-stream" => {
                assert_eq!(status, 200, "{body}");
                assert!(
                    body.trim_end().ends_with("data: [DONE]"),
                    "a whole stream: {body}"
                );
            }
            "hang" => assert_eq!(status, 504, "{body}"),
            _ => {
                assert_eq!(status, 200, "{body}");
                assert!(
                    slowest < Duration::from_secs(2),
                    "a fast call waited {slowest:?} behind the slow ones"
                );
            }
        }
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the slow streams were slow"
    );

    // The ledger holds exactly what the upstream reported; nothing stays reserved.
    let stats = upstream.stats().await;
    let upstream_tokens =
        stats["prompt_tokens"].as_u64().unwrap() + stats["completion_tokens"].as_u64().unwrap();
    assert_eq!(stats["calls"], 4 + 100);
    settled(&s, upstream_tokens).await;
    let m = s.metrics().await;
    assert!(
        m.get("hypertool_config_reloads_total", &[("result", "success")])
            .unwrap()
            >= 1.0
    );
    assert!(
        m.get(
            "hypertool_trace_export_total",
            &[("destination", "otlp"), ("result", "retry")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the dead receiver was retried"
    );
    assert!(
        m.get("hypertool_trace_spool_bytes", &[("destination", "otlp")])
            .unwrap()
            > 0.0
    );
    assert_eq!(
        m.get(
            "hypertool_trace_queue_dropped_total",
            &[("destination", "otlp")]
        ),
        Some(0.0)
    );

    // The receiver returns: every call's request span arrives (each once, whatever was re-sent).
    rx.listen().await;
    let expected = 4 + 2 + 100;
    eventually("every call's span", Duration::from_secs(30), || async {
        let ids: std::collections::HashSet<Vec<u8>> = rx
            .spans()
            .into_iter()
            .filter(|sp| sp.name == "POST /v1/chat/completions")
            .map(|sp| sp.span_id)
            .collect();
        (ids.len() == expected).then_some(())
    })
    .await;
    eventually("the spool to empty", Duration::from_secs(30), || async {
        (s.metrics()
            .await
            .get("hypertool_trace_spool_bytes", &[("destination", "otlp")])
            == Some(0.0))
        .then_some(())
    })
    .await;
    Arc::into_inner(s).unwrap().stop().await;
}

/// An MCP proxy's tool calls (here reported through the events API, as `hypertool mcp --server`
/// reports them) and switches arrive as `mcp.tools/call` and `persona_switch` spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_tool_calls_and_switches_arrive_as_spans() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let rx = Receiver::start().await;
    let endpoint = format!("endpoint = \"{}/v1/traces\"", rx.url());
    let s = server(
        dir.path(),
        &upstream,
        &[
            (
                "# endpoint = \"http://127.0.0.1:4318/v1/traces\"",
                &endpoint,
            ),
            ("batch_interval = \"1s\"", "batch_interval = \"50ms\""),
        ],
    )
    .await;
    let (status, body) = s
        .post_events(json!([
            {"type": "mcp_tool_call", "session": "mcp-s1", "persona": "backend-engineer",
             "server": "git", "tool": "git_status", "result": "ok", "duration_seconds": 0.25},
            {"type": "mcp_tool_call", "session": "mcp-s1", "persona": "backend-engineer",
             "server": "git", "tool": "git_push", "result": "refused", "duration_seconds": 0.0},
        ]))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s
        .post_raw(
            "/v1/personas/switch",
            json!({"session": "mcp-s1", "to": "frontend-engineer", "chatmode": "dev"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let spans = eventually(
        "the tool-call and switch spans",
        Duration::from_secs(20),
        || {
            let spans = rx.spans();
            async move {
                let n = spans
                    .iter()
                    .filter(|s| s.name == "mcp.tools/call" || s.name == "persona_switch")
                    .count();
                (n >= 3).then_some(spans)
            }
        },
    )
    .await;
    let calls: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "mcp.tools/call")
        .collect();
    assert_eq!(calls.len(), 2);
    let ok = calls
        .iter()
        .find(|s| attr_str(s, "gen_ai.tool.name").as_deref() == Some("git_status"))
        .unwrap();
    assert_attrs(
        ok,
        &[
            ("mcp.method.name", "tools/call"),
            ("hypertool.mcp.server", "git"),
            ("hypertool.persona", "backend-engineer"),
            ("session.id", "mcp-s1"),
            ("hypertool.mcp.result", "ok"),
        ],
    );
    assert_eq!(ok.end_time_unix_nano - ok.start_time_unix_nano, 250_000_000);
    assert_eq!(ok.status.as_ref().map(|s| s.code), Some(1), "ok");
    let refused = calls
        .iter()
        .find(|s| attr_str(s, "gen_ai.tool.name").as_deref() == Some("git_push"))
        .unwrap();
    assert_eq!(refused.status.as_ref().map(|s| s.code), Some(2), "error");
    let switch = spans.iter().find(|s| s.name == "persona_switch").unwrap();
    assert_attrs(
        switch,
        &[
            ("hypertool.persona.to", "frontend-engineer"),
            ("session.id", "mcp-s1"),
        ],
    );
    s.stop().await;
}
