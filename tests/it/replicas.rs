//! Several replicas on one PostgreSQL ledger: one order of events for the fleet, budgets that every
//! replica reports alike, counters per replica that add up to the fleet, and a PostgreSQL restart
//! under load that loses nothing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hypertool::config::Source;
use hypertool::core::clock::ManualClock;
use serde_json::{json, Value};

use crate::common::*;

/// A replica on the shared ledger at `url`, with its own configuration copy and data directory.
async fn replica(dir: &Path, url: &str, extra: &str) -> TestServer {
    let toml = config_copy(dir);
    let mut text = std::fs::read_to_string(&toml).unwrap();
    let with = format!("[ledger]\nurl = \"{url}\"\n");
    assert!(text.contains("[ledger]\n"));
    text = text.replacen("[ledger]\n", &with, 1);
    if !extra.is_empty() {
        assert!(text.contains("on_outage = \"fail_closed\""));
        text = text.replacen("on_outage = \"fail_closed\"", extra, 1);
    }
    std::fs::write(&toml, text).unwrap();
    start(
        Source::File(toml),
        &dir.join("data"),
        Arc::new(ManualClock::new(T0)),
    )
    .await
}

async fn used(s: &TestServer, persona: &str) -> u64 {
    let (_, b) = s.get_json(&format!("/api/budgets/{persona}")).await;
    b["used_tokens"].as_u64().unwrap_or(0)
}

/// Posts `batches` batches of 5 usage events (3 + 2 tokens each) for `persona`; returns the tokens
/// acknowledged.
async fn report(s: Arc<TestServer>, persona: &'static str, batches: usize) -> u64 {
    let mut acknowledged = 0;
    for _ in 0..batches {
        let events: Vec<Value> = (0..5).map(|_| usage(persona, "fleet", "m", 3, 2)).collect();
        let (status, body) = s.post_events(Value::Array(events)).await;
        match status {
            200 => acknowledged += 25,
            503 => {}
            other => panic!("unexpected {other}: {body}"),
        }
    }
    acknowledged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_ledger_budgets_agree_and_counters_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path()).await;
    let a = Arc::new(replica(&dir.path().join("a"), &pg.url, "").await);
    let b = Arc::new(replica(&dir.path().join("b"), &pg.url, "").await);

    let mut tasks = Vec::new();
    for s in [&a, &b, &a, &b] {
        tasks.push(tokio::spawn(report(s.clone(), "backend-engineer", 40)));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 4 * 40 * 25);
    // Gateway calls through both (the built-in mock upstream).
    let mut call_tokens = 0;
    for (i, s) in [&a, &b].into_iter().cycle().take(20).enumerate() {
        let resp = s
            .http
            .post(format!("{}/v1/chat/completions", s.api))
            .header("x-hypertool-persona", "backend-engineer")
            .header("x-hypertool-session", format!("fleet-{i}"))
            .json(&json!({"model": "mock/x", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        call_tokens += body["usage"]["total_tokens"].as_u64().unwrap();
    }
    let expected = total + call_tokens;

    // Every replica reports the same budget: the whole fleet's usage.
    for s in [&a, &b] {
        eventually(
            "the replica to see the fleet's usage",
            Duration::from_secs(20),
            || async { (used(s, "backend-engineer").await == expected).then_some(()) },
        )
        .await;
    }
    // The ledger holds exactly what was acknowledged and answered, in one order without gaps.
    assert_eq!(a.ledger_totals().await.tokens, expected);
    let rows = pg.query("SELECT COUNT(*), MIN(seq), MAX(seq) FROM hypertool_events");
    let (n, lo, hi): (i64, i64, i64) = (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!((lo, hi), (1, n), "positions without gaps");
    // Counters are per replica: each counts what it stored, and the sum is the fleet.
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    let (ta, tb) = (
        ma.sum("hypertool_persona_tokens_used_total"),
        mb.sum("hypertool_persona_tokens_used_total"),
    );
    assert!(ta > 0.0 && tb > 0.0, "{ta} {tb}");
    assert_eq!(ta + tb, expected as f64);
    assert_eq!(
        ma.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "backend-engineer")]
        ),
        mb.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "backend-engineer")]
        ),
    );

    // A restarted replica rebuilds the same from the shared ledger (and its own snapshot).
    let a = Arc::into_inner(a).unwrap();
    a.stop().await;
    let a = replica_again(&dir.path().join("a")).await;
    assert_eq!(used(&a, "backend-engineer").await, expected);
    assert_eq!(
        a.metrics().await.sum("hypertool_persona_tokens_used_total"),
        ta
    );
    a.stop().await;
    Arc::into_inner(b).unwrap().stop().await;
}

async fn replica_again(dir: &Path) -> TestServer {
    start(
        Source::File(dir.join("config/hypertool.toml")),
        &dir.join("data"),
        Arc::new(ManualClock::new(T0)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_under_load_follows_on_outage_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut pg = Postgres::start(dir.path()).await;
    let a = Arc::new(replica(&dir.path().join("a"), &pg.url, "on_outage = \"buffer\"").await);
    let b = Arc::new(replica(&dir.path().join("b"), &pg.url, "").await);
    let mut tasks = Vec::new();
    for s in [&a, &b] {
        tasks.push(tokio::spawn(report(s.clone(), "devops-engineer", 600)));
    }
    // Restart PostgreSQL in the middle of it.
    eventually("some load stored", Duration::from_secs(20), || async {
        (pg.query("SELECT COUNT(*) FROM hypertool_events")[0].get::<_, i64>(0) > 100).then_some(())
    })
    .await;
    pg.restart().await;
    let mut acknowledged = 0;
    for t in tasks {
        acknowledged += t.await.unwrap();
    }
    // Once both have written what they hold, the ledger has every acknowledged event, once.
    for s in [&a, &b] {
        eventually(
            "the replica writes again",
            Duration::from_secs(30),
            || async {
                let m = s.metrics().await;
                (m.get("hypertool_ledger_writable", &[]) == Some(1.0)
                    && m.get("hypertool_ledger_outage_held_events", &[]) == Some(0.0))
                .then_some(())
            },
        )
        .await;
    }
    // The restart was felt: writes failed while PostgreSQL was down.
    let failures = a
        .metrics()
        .await
        .get("hypertool_ledger_write_failures_total", &[])
        .unwrap()
        + b.metrics()
            .await
            .get("hypertool_ledger_write_failures_total", &[])
            .unwrap();
    assert!(failures >= 1.0, "PostgreSQL restarted after the load ended");
    let stored: i64 = pg.query(
        "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0)::bigint FROM hypertool_events WHERE persona = 'devops-engineer'",
    )[0]
    .get(0);
    assert_eq!(stored as u64, acknowledged);
    for s in [&a, &b] {
        eventually(
            "budgets to agree with the ledger",
            Duration::from_secs(20),
            || async { (used(s, "devops-engineer").await == acknowledged).then_some(()) },
        )
        .await;
    }
    Arc::into_inner(a).unwrap().stop().await;
    Arc::into_inner(b).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_budget_holds_across_replicas_as_it_does_on_one() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path()).await;
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let home = dir.path().join(name);
        let toml = config_copy(&home);
        let budgets = toml.parent().unwrap().join("budgets.yml");
        let text = std::fs::read_to_string(&budgets).unwrap();
        assert!(text.contains("  backend-engineer:\n    tokens: 2000\n"));
        std::fs::write(
            &budgets,
            text.replacen(
                "  backend-engineer:\n    tokens: 2000\n",
                "  backend-engineer:\n    tokens: 1000\n    mode: block\n",
                1,
            ),
        )
        .unwrap();
        let mut t = std::fs::read_to_string(&toml).unwrap();
        t = t.replacen(
            "[ledger]\n",
            &format!("[ledger]\nurl = \"{}\"\n", pg.url),
            1,
        );
        std::fs::write(&toml, t).unwrap();
        replicas.push(Arc::new(
            start(
                Source::File(toml),
                &home.join("data"),
                Arc::new(ManualClock::new(T0)),
            )
            .await,
        ));
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = replicas[w % 2].clone();
        tasks.push(tokio::spawn(async move {
            let (mut used, mut refused) = (0u64, 0u64);
            for n in 0..30 {
                let resp = s
                    .http
                    .post(format!("{}/v1/chat/completions", s.api))
                    .header("x-hypertool-persona", "backend-engineer")
                    .header("x-hypertool-session", format!("w{w}-{n}"))
                    .json(&json!({"model": "mock/x", "max_tokens": 16,
                                  "messages": [{"role": "user", "content": "hello there"}]}))
                    .send()
                    .await
                    .unwrap();
                match resp.status().as_u16() {
                    200 => {
                        let body: Value = resp.json().await.unwrap();
                        used += body["usage"]["total_tokens"].as_u64().unwrap();
                    }
                    429 => refused += 1,
                    other => panic!("unexpected {other}: {}", resp.text().await.unwrap()),
                }
            }
            (used, refused)
        }));
    }
    let (mut used, mut refused) = (0, 0);
    for t in tasks {
        let (u, r) = t.await.unwrap();
        used += u;
        refused += r;
    }
    assert!(refused > 0, "the budget never refused");
    // Each call reserved its estimate (prompt + max_tokens) and used no more: the fleet cannot
    // pass the limit, exactly as one replica cannot.
    assert!(
        used <= 1000,
        "the fleet overshot its block budget: {used} tokens"
    );
    assert!(used >= 1000 - 2 * 30, "the budget was not used up: {used}");
    for s in &replicas {
        eventually(
            "every replica to agree",
            Duration::from_secs(20),
            || async { (used_tokens(s).await == used).then_some(()) },
        )
        .await;
    }
    for s in replicas {
        Arc::into_inner(s).unwrap().stop().await;
    }
}

async fn used_tokens(s: &TestServer) -> u64 {
    used(s, "backend-engineer").await
}
