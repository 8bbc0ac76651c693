//! Latency of other clients while the gateway counts pathological inputs (issue 35): `/healthz`
//! and a small chat call from another client answer within 50 ms throughout. A binary of its own,
//! so that no other test shares the two cores while the latencies are taken (cargo runs test
//! binaries one at a time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "it/common.rs"]
#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::{json, Value};

use common::*;

fn gate_eval(text: &str) -> Value {
    json!({"workflow": "package-release", "stage": "version-bump", "text": text, "record": false})
}

/// Polls `GET /healthz` and a small chat call from another client every 10 ms while `load` runs;
/// the slowest answer of each.
async fn latencies_during<F: std::future::Future<Output = ()>>(
    s: &TestServer,
    load: F,
) -> (Duration, Duration, usize) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = reqwest::Client::new();
    let (api, flag) = (s.api.clone(), stop.clone());
    let prober = tokio::spawn(async move {
        let (mut health, mut chat, mut n) = (Duration::ZERO, Duration::ZERO, 0);
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            let r = other.get(format!("{api}/healthz")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            health = health.max(t.elapsed());
            let t = Instant::now();
            let r = other
                .post(format!("{api}/v1/chat/completions"))
                .header("x-hypertool-persona", "testing-specialist")
                .json(&json!({"model": "mock/small", "messages": [{"role": "user", "content": format!("hi {n}")}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            chat = chat.max(t.elapsed());
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (health, chat, n)
    });
    load.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    prober.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pathological_bodies_never_stall_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let s = enforcing_server(dir.path(), None, &[]).await;
    // Warm up: connections, the tokenizer's tables.
    let _ = latencies_during(&s, async {}).await;
    let heavy = |path: &'static str, body: Value| {
        let (http, api) = (s.http.clone(), s.api.clone());
        async move {
            let r = http
                .post(format!("{api}{path}"))
                .header("x-hypertool-persona", "backend-engineer")
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            assert_eq!(
                status,
                200,
                "{path}: {}",
                r.text().await.unwrap_or_default()
            );
        }
    };
    // Two 150 KB evaluations at once (the probe: /healthz frozen 9.18 s), one 100 KB Messages call
    // (2.92 s), then four 4 MB bodies of one letter at once.
    let zh = "中".repeat(50_000);
    let rows: Vec<(&str, Vec<_>)> = vec![
        ("two 150 KB evaluations", vec![
            heavy("/v1/quality-gates/evaluate", gate_eval(&zh)),
            heavy("/v1/quality-gates/evaluate", gate_eval(&zh)),
        ]),
        ("one 100 KB Messages call", vec![heavy(
            "/v1/messages",
            json!({"model": "mock/x", "max_tokens": 16, "messages": [{"role": "user", "content": "i".repeat(100_000)}]}),
        )]),
        ("four 4 MB chat calls", (0..4).map(|_| heavy(
            "/v1/chat/completions",
            json!({"model": "mock/x", "messages": [{"role": "user", "content": "i".repeat(4_000_000)}]}),
        )).collect()),
    ];
    let mut report = Vec::new();
    for (what, calls) in rows {
        let started = Instant::now();
        let (health, chat, probes) =
            latencies_during(&s, futures_util::future::join_all(calls).map(|_| ())).await;
        report.push(format!(
            "{what} ({:?}): slowest /healthz {health:?}, slowest small chat {chat:?} of {probes}",
            started.elapsed()
        ));
        println!("{}", report.last().unwrap());
        assert!(probes >= 1, "{what}");
        assert!(
            health < Duration::from_millis(50) && chat < Duration::from_millis(50),
            "{report:?}"
        );
    }
    s.stop().await;
}
