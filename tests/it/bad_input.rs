//! Bad input at the door: names over the limit, absurd token counts and costs. Each is refused
//! with a status and a body naming the field, and none of it reaches a label, a header or a sum.

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_model_name_is_a_400_and_never_a_label_or_a_header() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let before = s.metrics_text().await;
    let long = format!("mock/{}", "x".repeat(1_000_000));
    for _ in 0..3 {
        let resp = s
            .http
            .post(format!("{}/v1/chat/completions", s.api))
            .json(&json!({"model": long, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let header_bytes: usize = resp
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        assert!(header_bytes < 2_000, "{header_bytes} bytes of headers");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], "model");
        assert!(
            v.to_string().len() < 1_000,
            "the error echoes the name: {v}"
        );
    }
    // The same rules hold for the embeddings route and the attribution headers.
    let resp = s
        .http
        .post(format!("{}/v1/embeddings", s.api))
        .json(&json!({"model": long, "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-persona", "p".repeat(201))
        .json(&json!({"model": "mock/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "x-hypertool-persona");
    // A name at the limit is fine.
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-session", "s".repeat(256))
        .json(&json!({"model": format!("mock/{}", "m".repeat(195)), "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // That one call at the limit adds its series — counters, and the buckets of the generation
    // duration and prompt size histograms — each a bounded line; the refused names added none.
    // (The call's usage is applied after the answer: wait for it.)
    let after = eventually(
        "the call's usage",
        std::time::Duration::from_secs(10),
        || async {
            let text = s.metrics_text().await;
            text.contains(&format!("mock/{}", "m".repeat(195)))
                .then_some(text)
        },
    )
    .await;
    let known: std::collections::HashSet<&str> = before.lines().collect();
    let added: Vec<&str> = after
        .lines()
        .filter(|l| !l.starts_with('#') && !known.contains(l))
        .filter(|l| l.contains(&"m".repeat(195)))
        .collect();
    assert!(
        !added.is_empty() && added.len() <= 40,
        "{} new series: {added:#?}",
        added.len()
    );
    assert!(
        added.iter().all(|l| l.len() < 700),
        "a line of {} bytes",
        added.iter().map(|l| l.len()).max().unwrap_or(0)
    );
    assert!(
        after.len() < before.len() + 16_000,
        "the exposition grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    // The switch API follows the same rules, and does not echo the name either.
    let (status, v) = s
        .post_raw(
            "/v1/personas/switch",
            json!({"session": "s1", "to": "x".repeat(100_000)}).to_string(),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "to");
    assert!(v.to_string().len() < 1_000);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_tokens_and_costs_are_refused_and_sums_stay_finite() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let remaining = |m: &Exposition| {
        m.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "backend-engineer")],
        )
        .unwrap()
    };
    let start = remaining(&s.metrics().await);
    let mut huge = usage("backend-engineer", "dev", "gpt-4o", 0, 0);
    huge["prompt_tokens"] = json!(u64::MAX);
    let mut costly = usage("backend-engineer", "dev", "gpt-4o", 1, 1);
    costly["cost_usd"] = json!(1e308);
    let mut slow = usage("backend-engineer", "dev", "gpt-4o", 1, 1);
    slow["duration_seconds"] = json!(f64::MAX);
    for (event, field) in [
        (huge, "prompt_tokens"),
        (costly.clone(), "cost_usd"),
        (costly, "cost_usd"),
        (slow, "duration_seconds"),
    ] {
        let (status, v) = s.post_events(json!([event])).await;
        assert_eq!(status, 422, "{v}");
        assert_eq!(v["rejected"][0]["field"], field, "{v}");
    }
    // The largest accepted cost, many times over: the sum stays finite.
    let mut dear = usage("backend-engineer", "dev", "gpt-4o", 1, 0);
    dear["cost_usd"] = json!(1e6);
    let (status, _) = s.post_events(json!(vec![dear; 50])).await;
    assert_eq!(status, 200);
    let m = s.metrics().await;
    let cost = m.sum("hypertool_persona_cost_usd_total");
    assert!(cost.is_finite() && (cost - 5e7).abs() < 1.0, "{cost}");
    assert_eq!(
        remaining(&m),
        start - 50.0,
        "only the 50 accepted tokens count"
    );
    let (_, budget) = s.get_json("/api/budgets/backend-engineer").await;
    assert!(budget["used_cost_usd"].is_number(), "{budget}");
    s.stop().await;
}

/// Opens `n` connections to `addr` from the loopback address `from` and sends each `prefix`,
/// then leaves them stalled.
async fn stall(
    addr: std::net::SocketAddr,
    from: std::net::IpAddr,
    n: usize,
    prefix: &'static str,
) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut open = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(from, 0)).unwrap();
        let Ok(mut conn) = socket.connect(addr).await else {
            continue;
        };
        if conn.write_all(prefix.as_bytes()).await.is_ok() {
            open.push(conn);
        }
    }
    open
}

/// Reads what the server sends on `conn` until it closes (or `deadline` passes: `None`).
async fn until_closed(
    conn: &mut tokio::net::TcpStream,
    deadline: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(deadline, read_all).await.ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_and_partial_heads_do_not_lock_other_clients_out() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_edited(
        dir.path(),
        &[
            ("header_timeout = \"10s\"", "header_timeout = \"3s\""),
            ("body_timeout = \"30s\"", "body_timeout = \"3s\""),
        ],
    )
    .await;
    let addr: std::net::SocketAddr = s.api.trim_start_matches("http://").parse().unwrap();
    // Heads that promise 100,000 bytes of body and send 11, from one address; heads that never
    // end, from another.
    let bodies = stall(
        addr,
        "127.0.0.2".parse().unwrap(),
        1_100,
        "POST /v1/events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"events\":[",
    )
    .await;
    let heads = stall(
        addr,
        "127.0.0.3".parse().unwrap(),
        1_100,
        "POST /v1/events HTTP/1.1\r\nhost: t\r\ncontent-le",
    )
    .await;
    // A normal client keeps getting answers, each on a new connection, while they stall.
    for i in 0..20 {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .unwrap();
        let resp = http
            .post(format!("{}/v1/events", s.api))
            .json(&json!({"events": [usage("backend-engineer", "dev", "gpt-4o", 1, 1)]}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i} was not answered: {e}"));
        assert_eq!(resp.status(), 200, "request {i}");
    }
    // Over its per-client cap (a quarter of 1024), an address is answered 503 at accept. Each
    // connection is read for up to a second (all at once): a refused one has its 503 (or just the
    // close) by then; a held one has nothing yet, or already its 408 if body_timeout has passed.
    let results = futures_util::future::join_all(bodies.into_iter().map(|mut conn| async move {
        let seen = until_closed(&mut conn, std::time::Duration::from_secs(1)).await;
        (conn, seen)
    }))
    .await;
    let (mut refused, mut timed_out) = (0, 0);
    let mut held = Vec::new();
    for (conn, seen) in results {
        match seen {
            Some(text) if text.starts_with("HTTP/1.1 408") => timed_out += 1,
            Some(text) => {
                assert!(
                    text.is_empty() || text.starts_with("HTTP/1.1 503"),
                    "{text}"
                );
                refused += 1;
            }
            None => held.push(conn),
        }
    }
    assert!(
        held.len() + timed_out <= 256,
        "{} stalled bodies held open",
        held.len() + timed_out
    );
    assert!(refused >= 1_100 - 256, "{refused} refused");
    // The stalled bodies are answered 408 after body_timeout, and closed.
    for conn in held.iter_mut().take(20) {
        let text = until_closed(conn, std::time::Duration::from_secs(10))
            .await
            .expect("a stalled body was never closed");
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(
        timed_out + held.len() > 0,
        "no stalled body was held at all"
    );
    // The partial heads are closed after header_timeout.
    for mut conn in heads.into_iter().take(20) {
        assert!(
            until_closed(&mut conn, std::time::Duration::from_secs(10))
                .await
                .is_some(),
            "a partial head was never closed"
        );
    }
    // Nothing the stalled clients sent was stored: only the 20 normal events.
    assert_eq!(s.ledger_totals().await.tokens, 40);
    s.stop().await;
}
