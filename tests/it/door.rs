//! The door, probed as an attacker and as an operator would: every input bounded on every route,
//! the method that runs is the method decided, one ownership rule, names and texts that cannot
//! reach a terminal or a page as instructions. Each test reproduces a defect an independent probe
//! found (issue 24), with the figure it measured.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::access::{start_with_keys, ADMIN_KEY, BACKEND_KEY, TESTING_KEY, VIEWER_KEY};
use crate::common::*;

/// The resident set of this process (the server runs in it), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A 3 MB request of a million empty events took 645 MB and answered 109 MB of rejections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_events_are_refused_whole_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let million = format!("{{\"events\":[{}{{}}]}}", "{},".repeat(999_999));
    assert!(million.len() > 2_900_000);
    let before = rss_bytes();
    // Six at once, as the probe sent them.
    let sends = (0..6).map(|_| {
        let (http, url, body) = (
            s.http.clone(),
            format!("{}/v1/events", s.api),
            million.clone(),
        );
        tokio::spawn(async move {
            let resp = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.bytes().await.unwrap())
        })
    });
    for send in sends {
        let (status, body) = send.await.unwrap();
        assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
        assert!(body.len() < 2048, "the answer is {} bytes", body.len());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_events", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("10000"),
            "{v}"
        );
    }
    let grown = rss_bytes().saturating_sub(before);
    println!(
        "RSS grew by {} MB for six million-event requests",
        grown >> 20
    );
    // The bodies themselves (6 × 3 MB, client and server side) are most of what may remain.
    assert!(grown < 100 << 20, "RSS grew by {} MB", grown >> 20);

    // At the bound, every event invalid: the answer lists the first 100 and counts the rest.
    let most = format!(
        "{{\"events\":[{}{{}}]}}",
        "{},".repeat(hypertool::server::events::MAX_EVENTS_PER_REQUEST - 1)
    );
    let (status, v) = s.post_raw("/v1/events", most).await;
    assert_eq!(status, 422);
    assert_eq!(v["accepted"], 0);
    assert_eq!(v["rejected"].as_array().unwrap().len(), 100);
    assert_eq!(v["rejected_count"], 10_000);
    assert_eq!(v["rejected"][99]["index"], 99);
    // A rejection quoting what was sent stays short.
    let (status, v) = s
        .post_events(
            json!([{"type": "usage", "persona": "p", "chatmode": "c", "model": "m",
            "prompt_tokens": ["x".repeat(1 << 20)], "completion_tokens": 0}]),
        )
        .await;
    assert_eq!(status, 422);
    assert!(v.to_string().len() < 1024, "{} bytes", v.to_string().len());
    // Valid events beside invalid ones are still stored, and counted exactly.
    let (status, v) = s
        .post_events(json!([usage("backend-engineer", "dev", "gpt-4o", 7, 3), {}]))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected_count"].as_u64()),
        (Some(1), Some(1))
    );
    s.stop().await;
}

/// Opens a connection from `source` that sends a head announcing a 100,000-byte body, then one
/// byte of it, and stalls.
async fn stalled(
    source: std::net::IpAddr,
    api: std::net::SocketAddr,
    head: &str,
) -> Option<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(std::net::SocketAddr::new(source, 0)).ok()?;
    let mut stream = socket.connect(api).await.ok()?;
    stream
        .write_all(format!("{head}\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{{").as_bytes())
        .await
        .ok()?;
    Some(stream)
}

/// Five addresses × 256 stalled connections (the per-address cap, a quarter of
/// `max_connections` = 1024) held every slot and a sixth address waited 21.9 s. The same attack a
/// quarter the size (`max_connections` = 256, so 64 per address): the kernel's accept queue
/// (1024) takes the whole burst, so every stalled sender really reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_senders_from_five_addresses_do_not_lock_out_a_sixth() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_edited(
        dir.path(),
        &[("max_connections = 1024", "max_connections = 256")],
    )
    .await;
    let api: std::net::SocketAddr = s.api.trim_start_matches("http://").parse().unwrap();
    let mut held = Vec::new();
    for a in 1..=5u8 {
        let source = std::net::IpAddr::from([127, 0, 0, a]);
        for i in 0..64 {
            // Half on a public route with a body it does not take, half in a body being read.
            let head = if i % 2 == 0 {
                "GET /healthz HTTP/1.1"
            } else {
                "POST /v1/events HTTP/1.1"
            };
            held.push(
                stalled(source, api, head)
                    .await
                    .expect("a stalled connection"),
            );
        }
    }
    assert_eq!(held.len(), 320);
    // A client from a sixth address.
    let started = Instant::now();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.6:0".parse().unwrap()).unwrap();
    let mut client = socket.connect(api).await.unwrap();
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(40), client.read_to_end(&mut answer))
        .await
        .expect("no answer within 40 s")
        .unwrap();
    let waited = started.elapsed();
    println!("a sixth address was answered in {waited:?} beside 320 stalled connections");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(waited < Duration::from_secs(1), "waited {waited:?}");
    drop(held);
    s.stop().await;
}

/// `model` of 3 MB with newlines grew /metrics from 43 kB to 30 MB; a 70,000-byte `reasons`
/// made `hypertool gates history` panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_finish_follows_the_name_rules_and_bounds_its_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let wf = "/v1/workflows/feature-development";
    let (_, run) = s.post_raw(&format!("{wf}/runs"), "{}").await;
    let run = run["id"].as_str().unwrap().to_string();
    let stage = format!("{wf}/runs/{run}/stages/design");
    let metrics_before = s.metrics_text().await.len();
    for (body, param, code) in [
        (
            json!({"gate": "fail", "model": "m".repeat(3 << 20)}),
            "model",
            "invalid_name",
        ),
        (
            json!({"gate": "fail", "model": "gpt\n4o"}),
            "model",
            "invalid_name",
        ),
        (
            json!({"gate": "fail", "model": "gpt\u{202E}4o"}),
            "model",
            "invalid_name",
        ),
        (
            json!({"gate": "fail", "reasons": "r".repeat(70_000)}),
            "reasons",
            "invalid_text",
        ),
    ] {
        let (status, _) = s.post_raw(&format!("{stage}/start"), "{}").await;
        assert_eq!(status, 200);
        let (status, v) = s
            .post_raw(&format!("{stage}/finish"), body.to_string())
            .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v.to_string().len() < 2048);
    }
    // A verdict within the rules is taken; its reasons with a terminal escape are stored as sent.
    let (status, v) = s
        .post_raw(
            &format!("{stage}/finish"),
            json!({"gate": "fail", "model": "gpt-4o", "reasons": "\u{1b}[31mred\u{1b}[0m and \u{202E}reversed, soft\u{AD}hyphen, tag\u{E0041}, filler\u{3164}"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let grown = s.metrics_text().await.len().saturating_sub(metrics_before);
    assert!(grown < 4096, "/metrics grew by {grown} bytes");
    // The CLI prints the reasons escaped, and never panics on what a server returns.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypertool"))
        .args([
            "gates",
            "history",
            "--server",
            s.api.trim_start_matches("http://"),
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
        !text.contains('\u{1b}') && !text.contains('\u{202E}'),
        "{text:?}"
    );
    // Default-ignorable characters, which show as nothing, too (the probe saw them printed raw).
    for (raw, shown) in [
        ('\u{AD}', "soft\\u00adhyphen"),
        ('\u{E0041}', "tag\\udb40\\udc41"),
        ('\u{3164}', "filler\\u3164"),
    ] {
        assert!(
            !text.contains(raw) && text.contains(shown),
            "{shown}: {text:?}"
        );
    }
    assert!(text.contains("\\u001b[31mred"), "{text}");
    // A table cell from a server is cut, whatever its length.
    let table = hypertool::cli::table(&["reasons"], &[vec!["r".repeat(70_000)]]);
    assert!(table
        .lines()
        .all(|l| l.chars().count() <= hypertool::cli::MAX_CELL_CHARS));
    s.stop().await;
}

/// Every route of the table with a name in its path that breaks the name rules: refused before
/// any handler, and nothing grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_bad_names_in_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_keys(dir.path(), "").await;
    let metrics_before = s.metrics_text().await.len();
    let mut walked = 0;
    for route in hypertool::server::routes::table() {
        if !route.path.contains('{') {
            continue;
        }
        for bad in [
            "n".repeat(300),
            "a%0Ab".to_string(),
            "a%E2%80%AEb".to_string(),
        ] {
            let path = route
                .path
                .split('/')
                .map(|seg| {
                    if seg.starts_with('{') {
                        bad.as_str()
                    } else {
                        seg
                    }
                })
                .collect::<Vec<_>>()
                .join("/");
            let method = reqwest::Method::from_bytes(route.method.as_bytes()).unwrap();
            let resp = s
                .http
                .request(method, format!("{}{path}", s.api))
                .bearer_auth(ADMIN_KEY)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap();
            let what = format!("{} {path}: {status} {v}", route.method);
            assert_eq!(status, 400, "{what}");
            assert_eq!(v["error"]["code"], "invalid_name", "{what}");
            walked += 1;
        }
    }
    assert!(walked >= 3 * 12, "{walked} requests");
    let grown = s.metrics_text().await.len().saturating_sub(metrics_before);
    assert!(grown < 2048, "/metrics grew by {grown} bytes");
    s.stop().await;
}

/// Every route of the table with each name and free text of its sample body (the one the access
/// test sends) at 3 MB, and with a newline: refused with a short answer, and nothing grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_oversized_names_and_texts_in_its_body() {
    const NAMES: [&str; 12] = [
        "model", "persona", "chatmode", "session", "to", "from", "workflow", "stage", "run",
        "reasons", "reason", "task",
    ];
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_keys(dir.path(), "").await;
    let metrics_before = s.metrics_text().await.len();
    let huge = "n".repeat(3 << 20);
    let mut walked = 0;
    for route in hypertool::server::routes::table() {
        let (_, run) = post_as(
            &s,
            ADMIN_KEY,
            "/v1/workflows/feature-development/runs",
            json!({}),
        )
        .await;
        let run = run["id"].as_str().unwrap().to_string();
        let (path, Some(body)) = crate::access::sample(route.method, route.path, &run) else {
            continue;
        };
        // The fields to spoil: the body's own, or those of its one event.
        let events = body.get("events").is_some();
        let fields: Vec<String> = if events {
            body["events"][0]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        } else {
            body.as_object().unwrap().keys().cloned().collect()
        };
        let mut fields: Vec<String> = fields
            .into_iter()
            .filter(|f| NAMES.contains(&f.as_str()))
            .collect();
        // Free text the sample leaves out.
        if route.path.ends_with("/stages/{stage}/finish") {
            fields.extend(["model".to_string(), "reasons".to_string()]);
        }
        for field in fields {
            for bad in [huge.as_str(), "two\nlines"] {
                // "two\nlines" is a name rule only: free text may hold newlines.
                if bad.len() < 100 && ["reasons", "reason", "task"].contains(&field.as_str()) {
                    continue;
                }
                let mut spoiled = body.clone();
                let target = if events {
                    &mut spoiled["events"][0]
                } else {
                    &mut spoiled
                };
                target[field.as_str()] = json!(bad);
                if route.path.ends_with("/stages/{stage}/finish") {
                    post_as(&s, ADMIN_KEY, &path.replace("/finish", "/start"), json!({})).await;
                }
                let method = reqwest::Method::from_bytes(route.method.as_bytes()).unwrap();
                let resp = s
                    .http
                    .request(method, format!("{}{path}", s.api))
                    .bearer_auth(ADMIN_KEY)
                    .header("accept", "application/json, text/event-stream")
                    .json(&spoiled)
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let answer = resp.bytes().await.unwrap();
                let what = format!(
                    "{} {path} with `{field}` of {} bytes: {status} {}",
                    route.method,
                    bad.len(),
                    String::from_utf8_lossy(&answer[..answer.len().min(300)])
                );
                assert!((400..500).contains(&status), "{what}");
                assert!(answer.len() < 2048, "{what}");
                walked += 1;
            }
        }
    }
    assert!(walked >= 20, "{walked} requests");
    let grown = s.metrics_text().await.len().saturating_sub(metrics_before);
    assert!(grown < 4096, "/metrics grew by {grown} bytes");
    s.stop().await;
}

/// `curl -I` with a persona key answered 200 on the viewer's routes (and ran the investigation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_decided_as_get_and_unlisted_methods_are_405_at_the_door() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_keys(dir.path(), "").await;
    for path in [
        "/api/budgets",
        "/api/dashboard",
        "/api/investigations/TokenBudgetExceeded",
        "/api/sessions/s-1",
        "/",
    ] {
        for (key, want) in [(BACKEND_KEY, 403), (VIEWER_KEY, 0)] {
            let head = s
                .http
                .head(format!("{}{path}", s.api))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            let get = s.get_as(path, Some(key)).await.status().as_u16();
            assert_eq!(head, get, "HEAD and GET {path} with {key}");
            if want != 0 {
                assert_eq!(head, want, "HEAD {path}");
            }
        }
    }
    // A method the table does not list: 405 from the door, with the methods the route takes.
    for (method, path) in [
        ("OPTIONS", "/api/budgets"),
        ("PATCH", "/api/budgets/backend-engineer"),
        ("PUT", "/v1/events"),
    ] {
        let resp = s
            .http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", s.api),
            )
            .bearer_auth(VIEWER_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        let allow = resp.headers()["allow"].to_str().unwrap().to_string();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
        assert!(!allow.is_empty() && !allow.contains(method), "{allow}");
    }
    // Without a key, still 401 first.
    let resp = s
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/api/budgets", s.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    s.stop().await;
}

async fn post_as(s: &TestServer, key: &str, path: &str, body: Value) -> (u16, Value) {
    let resp = s
        .http
        .post(format!("{}{path}", s.api))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

/// A testing-specialist key cancelled backend-engineer's run; a backend-engineer key started and
/// judged testing-specialist's stage by naming itself in the body; any key could end or stream
/// another key's MCP session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persona_key_acts_only_on_what_is_its_personas() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_keys(dir.path(), "").await;
    let wf = "/v1/workflows/feature-development";
    let failures = |m: &Exposition| {
        m.get(
            "hypertool_auth_failures_total",
            &[("reason", "other_persona")],
        )
        .unwrap_or(0.0)
    };
    let refused_before = failures(&s.metrics().await);

    // Runs belong to the persona whose key created them.
    let (status, run) = post_as(&s, BACKEND_KEY, &format!("{wf}/runs"), json!({})).await;
    assert_eq!(status, 201, "{run}");
    let run = run["id"].as_str().unwrap().to_string();
    let (status, v) = post_as(
        &s,
        TESTING_KEY,
        &format!("{wf}/runs/{run}/finish"),
        json!({"status": "cancelled"}),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "persona_not_allowed");
    let (_, admin_run) = post_as(&s, ADMIN_KEY, &format!("{wf}/runs"), json!({})).await;
    let admin_run = admin_run["id"].as_str().unwrap();
    let (status, _) = post_as(
        &s,
        BACKEND_KEY,
        &format!("{wf}/runs/{admin_run}/finish"),
        json!({}),
    )
    .await;
    assert_eq!(status, 403, "an admin's run is no persona's");

    // A stage's persona comes from the workflow: naming oneself in the body changes nothing.
    let testing = format!("{wf}/runs/{run}/stages/testing");
    let (status, v) = post_as(
        &s,
        BACKEND_KEY,
        &format!("{testing}/start"),
        json!({"persona": "backend-engineer"}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "persona_mismatch");
    let (status, v) = post_as(&s, BACKEND_KEY, &format!("{testing}/start"), json!({})).await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = post_as(&s, TESTING_KEY, &format!("{testing}/start"), json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["stages"]["testing"]["persona"], "testing-specialist");
    let (status, _) = post_as(
        &s,
        BACKEND_KEY,
        &format!("{testing}/finish"),
        json!({"gate": "pass"}),
    )
    .await;
    assert_eq!(status, 403);
    // ... nor in a stage event with a verdict.
    let (status, v) = post_as(&s, BACKEND_KEY, "/v1/events", json!({"events": [
        {"type": "stage", "workflow": "feature-development", "stage": "testing", "persona": "backend-engineer",
         "model": "gpt-4o", "duration_seconds": 3, "gate": "pass"}]})).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["rejected"][0]["field"], "persona");
    assert!(
        v["rejected"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("testing-specialist"),
        "{v}"
    );
    // The owner may, and the run's finish by its owner too.
    let (status, _) = post_as(
        &s,
        TESTING_KEY,
        &format!("{testing}/finish"),
        json!({"gate": "pass"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post_as(
        &s,
        BACKEND_KEY,
        &format!("{wf}/runs/{run}/finish"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);

    // MCP sessions: one opened with backend-engineer's key is not testing-specialist's to end or stream.
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "door-test", "version": "1"}}});
    let resp = s
        .http
        .post(format!("{}/mcp", s.api))
        .bearer_auth(BACKEND_KEY)
        .header("accept", "application/json, text/event-stream")
        .json(&init)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let session = resp.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    drop(resp);
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let resp = s
            .http
            .request(method.clone(), format!("{}/mcp", s.api))
            .bearer_auth(TESTING_KEY)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &session)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{method} of another persona's session");
    }
    let resp = s
        .http
        .delete(format!("{}/mcp", s.api))
        .bearer_auth(BACKEND_KEY)
        .header("mcp-session-id", &session)
        .send()
        .await
        .unwrap();
    // Its own, answered as the MCP SDKs expect a termination (200, not 202).
    assert_eq!(resp.status(), 200, "its own");

    // Sessions: a persona key switches only a session its own persona is in (or a new one).
    let switch = |key: &'static str, to: &'static str, session: &'static str| {
        post_as(
            &s,
            key,
            "/v1/personas/switch",
            json!({"session": session, "to": to}),
        )
    };
    let (status, v) = switch(ADMIN_KEY, "devops-engineer", "s-devops").await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = switch(BACKEND_KEY, "backend-engineer", "s-devops").await;
    assert_eq!(status, 403, "another persona's session: {v}");
    assert_eq!(v["error"]["code"], "persona_not_allowed");
    assert_eq!(v["error"]["param"], "session");
    let (_, view) = switch(ADMIN_KEY, "devops-engineer", "s-devops").await;
    assert_eq!(view["persona"], "devops-engineer", "unchanged: {view}");
    let (status, v) = switch(BACKEND_KEY, "backend-engineer", "s-new").await;
    assert_eq!(status, 200, "a new session: {v}");
    let (status, v) = switch(BACKEND_KEY, "backend-engineer", "s-new").await;
    assert_eq!(status, 200, "its own session: {v}");

    // Every refusal above was counted as one.
    let refused = failures(&s.metrics().await) - refused_before;
    assert_eq!(refused, 8.0);
    s.stop().await;
}

/// Events dated 1900, 0001 or Unix 0 counted in the usage counter but never in the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_older_than_any_budget_period_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let dated = |ts: Value| {
        let mut e = usage("backend-engineer", "dev", "gpt-4o", 10, 5);
        e["timestamp"] = ts;
        e
    };
    let (status, v) = s
        .post_events(json!([
            dated(json!("1900-01-01T00:00:00Z")),
            dated(json!("0001-01-01T00:00:00Z")),
            dated(json!(0)),
            dated(json!((T0 / 1000) - 32 * 86_400)),
        ]))
        .await;
    assert_eq!(status, 422, "{v}");
    for r in v["rejected"].as_array().unwrap() {
        assert_eq!(r["field"], "timestamp", "{v}");
        assert!(r["reason"].as_str().unwrap().contains("31 days"), "{v}");
    }
    // Within the window: taken, and in the budget.
    let (status, v) = s
        .post_events(json!([dated(json!((T0 / 1000) - 3600))]))
        .await;
    assert_eq!(status, 200, "{v}");
    let m = s.metrics().await;
    assert_eq!(m.sum("hypertool_persona_tokens_used_total"), 15.0);
    s.stop().await;
}

/// Names with U+202E or U+2028 were accepted; pages had no CSP and answers no `nosniff`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_characters_are_refused_and_pages_carry_a_strict_policy() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    // Default-ignorable characters too (the probe's soft hyphen, tag character and Hangul
    // filler), in every name an event carries.
    for name in [
        "backend\u{AD}engineer",
        "tag\u{E0041}",
        "\u{3164}x",
        "a\u{FE0F}",
    ] {
        for (field, event) in [
            ("chatmode", usage("backend-engineer", name, "gpt-4o", 1, 1)),
            ("model", usage("backend-engineer", "feature", name, 1, 1)),
            ("session", {
                let mut u = usage("backend-engineer", "feature", "gpt-4o", 1, 1);
                u["session"] = json!(name);
                u
            }),
        ] {
            let (status, v) = s.post_events(json!([event])).await;
            assert_eq!(status, 422, "{name:?} as {field}: {v}");
            assert_eq!(v["rejected"][0]["field"], field, "{v}");
        }
    }
    for name in ["backend\u{202E}engineer", "dev\u{2028}x", "a\u{200B}b"] {
        let (status, v) = s
            .post_events(json!([usage("backend-engineer", name, "gpt-4o", 1, 1)]))
            .await;
        assert_eq!(status, 422, "{v}");
        assert_eq!(v["rejected"][0]["field"], "chatmode", "{v}");
        let resp = s
            .http
            .post(format!("{}/v1/chat/completions", s.api))
            .header("x-hypertool-chatmode", name)
            .json(&json!({"model": "mock/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{name:?}");
    }
    for path in ["/", "/runbook", "/api/budgets", "/healthz", "/api/nothing"] {
        let resp = s.get_as(path, None).await;
        assert_eq!(
            resp.headers()["x-content-type-options"],
            "nosniff",
            "{path}"
        );
    }
    for path in ["/", "/runbook"] {
        let resp = s.get_as(path, None).await;
        let csp = resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("http"),
            "{csp}"
        );
        assert!(
            csp.contains("script-src 'sha256-") || path == "/runbook",
            "{csp}"
        );
    }
    s.stop().await;
}
