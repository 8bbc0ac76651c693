//! `POST /v1/events` and the admin API: bad input gets a clear error, good input is never lost.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;

    let (status, body) = s.post_raw("/v1/events", "{\"events\": [").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "malformed_json");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));

    let (status, body) = s.post_raw("/v1/events", "[1,2]").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "events");

    let huge = format!("{{\"events\": [\"{}\"]}}", "x".repeat(5 * 1024 * 1024));
    // A client of its own: the server closes the connection after a 413.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/events", s.api))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(status, 413);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_body_bytes"));

    // A mixed batch: good events are stored, each bad one is named by index and field.
    let (status, body) = s
        .post_events(json!([
            usage("backend-engineer", "c", "m", 10, 1),
            {"type":"usage","persona":"backend-engineer","chatmode":"c","model":"m","prompt_tokens":-5,"completion_tokens":1},
            {"type":"usage","persona":"backend-engineer","chatmode":"c","model":"m","prompt_tokens":"ten","completion_tokens":1},
            {"type":"stage","workflow":"w","stage":"s","persona":"p","model":"m","duration_seconds":1,"gate":"passed"},
            {"type":"bogus"},
            "not an object",
            usage("backend-engineer", "c", "m", 20, 2),
        ]))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2);
    let rejected = body["rejected"].as_array().unwrap();
    let summary: Vec<(u64, Option<&str>)> = rejected
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["field"].as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, Some("prompt_tokens")),
            (2, Some("prompt_tokens")),
            (3, Some("gate")),
            (4, Some("type")),
            (5, None)
        ]
    );
    assert!(rejected[0]["reason"].as_str().unwrap().contains("negative"));

    // Nothing valid at all: 422.
    let (status, _) = s.post_events(json!([{"type":"usage"}])).await;
    assert_eq!(status, 422);

    let m = s.metrics().await;
    assert_eq!(m.sum("hypertool_persona_tokens_used_total"), 33.0);
    assert_eq!(
        m.get(
            "hypertool_events_rejected_total",
            &[("reason", "negative_tokens")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "hypertool_events_rejected_total",
            &[("reason", "body_too_large")]
        ),
        Some(1.0)
    );

    // Admin API.
    let (status, body) = s.get_json("/api/budgets/nobody").await;
    assert_eq!(status, 404);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("backend-engineer"));
    let put = |persona: &str, body: &str| {
        s.http
            .put(format!("{}/api/budgets/{persona}", s.api))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let resp = put(
        "backend-engineer",
        r#"{"tokens": 10, "period": "fortnightly"}"#,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("fortnightly"));
    let resp = put("backend-engineer", r#"{"tokens": 10, "cost_usd": -1}"#)
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = put("nobody", r#"{"tokens": 10}"#).await.unwrap();
    assert_eq!(resp.status(), 404);
    let (status, body) = s.get_json("/no/such/route").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_clients_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(start_default(dir.path()).await);
    let personas = [
        "backend-engineer",
        "frontend-engineer",
        "devops-engineer",
        "testing-specialist",
        "observability-expert",
    ];
    let mut tasks = Vec::new();
    for client in 0..50u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let persona = personas[(client % 5) as usize];
            let mut sent = 0u64;
            for batch in 0..50u64 {
                let events: Vec<_> = (0..20u64)
                    .map(|i| {
                        let n = batch * 20 + i;
                        sent += client + 1 + n % 7;
                        usage(persona, "load", "m", client + 1, n % 7)
                    })
                    .collect();
                let (status, body) = s.post_events(json!(events)).await;
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["accepted"], 20);
            }
            (persona, sent)
        }));
    }
    let mut expected_total = 0u64;
    let mut per_persona = std::collections::HashMap::new();
    for t in tasks {
        let (persona, sent) = t.await.unwrap();
        expected_total += sent;
        *per_persona.entry(persona).or_insert(0u64) += sent;
    }
    let m = s.metrics().await;
    assert_eq!(
        m.sum("hypertool_persona_tokens_used_total"),
        expected_total as f64
    );
    assert_eq!(
        m.get("hypertool_events_applied_total", &[("type", "usage")]),
        Some(50_000.0)
    );
    let totals = s.ledger_totals().await;
    assert_eq!(totals.usage_events, 50_000);
    assert_eq!(totals.tokens, expected_total);
    for (persona, sent) in per_persona {
        let budget = match persona {
            "backend-engineer" | "observability-expert" => 2000,
            "testing-specialist" => 1500,
            _ => 1800,
        };
        assert_eq!(
            m.get(
                "hypertool_persona_token_budget_remaining",
                &[("persona", persona)]
            ),
            Some(budget as f64 - sent as f64),
            "{persona}"
        );
    }
    match Arc::try_unwrap(s) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("server still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_override_reset_and_persona_listing() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    s.post_events(json!([usage("frontend-engineer", "c", "m", 500, 0)]))
        .await;
    let resp = s
        .http
        .put(format!("{}/api/budgets/tta-frontend-engineer", s.api))
        .json(&json!({"tokens": 400, "cost_usd": 2.5, "mode": "block"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let b: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(b["persona"], "frontend-engineer");
    assert_eq!(b["remaining_tokens"], -100);
    assert_eq!(b["mode"], "block");
    assert_eq!(
        b["period"], "daily",
        "an omitted period keeps the current one"
    );
    assert_eq!(b["source"], "override");

    let (status, b) = s.post_raw("/api/budgets/frontend-engineer/reset", "").await;
    assert_eq!(status, 200);
    assert_eq!(b["remaining_tokens"], 400);

    let (_, personas) = s.get_json("/api/personas").await;
    let list = personas["personas"].as_array().unwrap();
    assert_eq!(list.len(), 6);
    let fe = list
        .iter()
        .find(|p| p["name"] == "frontend-engineer")
        .unwrap();
    assert_eq!(fe["aliases"], json!(["tta-frontend-engineer"]));
    assert_eq!(fe["budget"]["tokens"], 400);

    let resp = s
        .http
        .delete(format!("{}/api/budgets/frontend-engineer", s.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, b) = s.get_json("/api/budgets/frontend-engineer").await;
    assert_eq!(b["tokens"], 1800);
    assert_eq!(b["source"], "budgets_file");
    assert_eq!(
        b["remaining_tokens"], 1800,
        "the reset survives the override's removal"
    );
    s.stop().await;
}

/// Reads one HTTP/1.1 answer (head and a `content-length` body) from `conn`: (head, body).
async fn read_answer(conn: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return (head, text[end + 4..end + 4 + length].to_string());
            }
        }
        let n = conn.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before a whole answer: {:?} (local {:?})",
            String::from_utf8_lossy(&got),
            conn.local_addr()
        );
        got.extend_from_slice(&buf[..n]);
    }
}

async fn send(conn: &mut tokio::net::TcpStream, request: String) {
    use tokio::io::AsyncWriteExt;
    conn.write_all(request.as_bytes()).await.unwrap();
}

fn healthz() -> String {
    "GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n".to_string()
}

/// Waits (with a deadline) for the server to close `conn`.
async fn closed_by_server(conn: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_the_oldest_close_after_their_answers_to_admit_new_clients() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_edited(
        dir.path(),
        &[
            ("max_connections = 1024", "max_connections = 2"),
            ("latency_ms = 0", "latency_ms = 400"),
        ],
    )
    .await;
    let addr = s.api.trim_start_matches("http://").to_string();
    // The oldest connection is busy with a call that takes 400 ms; the second is idle.
    let body = r#"{"model":"mock/slow","messages":[{"role":"user","content":"hello"}]}"#;
    let mut busy = tokio::net::TcpStream::connect(&addr).await.unwrap();
    send(&mut busy, format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())).await;
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    send(&mut idle, healthz()).await;
    assert!(read_answer(&mut idle).await.0.starts_with("HTTP/1.1 200"));
    // A third client: the oldest are asked to close, the idle one goes at once, and the newcomer
    // is served.
    let mut newcomer = tokio::net::TcpStream::connect(&addr).await.unwrap();
    send(&mut newcomer, healthz()).await;
    let (head, _) = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut newcomer))
        .await
        .expect("the new client was served");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        closed_by_server(&mut idle).await,
        "the idle connection was closed"
    );
    // The busy connection got its whole answer first, then was closed.
    let (head, answer) = read_answer(&mut busy).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(answer.contains("Mock answer"), "{answer}");
    assert!(closed_by_server(&mut busy).await);
    s.stop().await;
}
