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

/// Gives backend-engineer the budget `entry` (its lines under the persona, e.g.
/// `"    tokens: 1000\n    mode: block\n"`) in the budgets.yml beside `toml`.
fn backend_budget(toml: &Path, entry: &str) {
    let budgets = toml.parent().unwrap().join("budgets.yml");
    let text = std::fs::read_to_string(&budgets).unwrap();
    let default = "  backend-engineer:\n    tokens: 2000\n";
    assert!(text.contains(default));
    let with = format!("  backend-engineer:\n{entry}");
    std::fs::write(&budgets, text.replacen(default, &with, 1)).unwrap();
}

/// Puts the configuration at `toml` on the shared ledger at `url` (`extra`: more `[ledger]` lines).
fn on_ledger(toml: &Path, url: &str, extra: &str) {
    let text = std::fs::read_to_string(toml).unwrap();
    assert!(text.contains("[ledger]\n"));
    let with = format!("[ledger]\nurl = \"{url}\"\n{extra}");
    std::fs::write(toml, text.replacen("[ledger]\n", &with, 1)).unwrap();
}

async fn used(s: &TestServer, persona: &str) -> u64 {
    let (_, b) = s.get_json(&format!("/api/budgets/{persona}")).await;
    b["used_tokens"].as_u64().unwrap_or(0)
}

/// Posts `batches` batches of 5 usage events (3 + 2 tokens each) for `persona`; returns the tokens
/// acknowledged.
/// What a client reporting usage was told.
#[derive(Default)]
struct Reported {
    /// Tokens of the batches answered 200.
    acknowledged: u64,
    /// Batches answered 503 `ledger_outcome_unknown` (the connection dropped during their commit:
    /// stored or not, hypertool learns later), by the session that marks their events.
    in_doubt: Vec<String>,
}

/// Posts `batches` batches of 5 usage events of 5 tokens each; each batch's events carry a session
/// of their own (`tag-N`), so that a batch in doubt can be looked up in the ledger.
async fn report(
    s: Arc<TestServer>,
    persona: &'static str,
    batches: usize,
    tag: String,
) -> Reported {
    let mut told = Reported::default();
    for n in 0..batches {
        let session = format!("{tag}-{n}");
        let events: Vec<Value> = (0..5)
            .map(|_| {
                let mut e = usage(persona, "fleet", "m", 3, 2);
                e["session"] = json!(session);
                e
            })
            .collect();
        let (status, body) = s.post_events(Value::Array(events)).await;
        match status {
            200 => told.acknowledged += 25,
            503 if body["error"]["code"] == "ledger_outcome_unknown" => told.in_doubt.push(session),
            503 => {}
            other => panic!("unexpected {other}: {body}"),
        }
    }
    told
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_ledger_budgets_agree_and_counters_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path()).await;
    let a = Arc::new(replica(&dir.path().join("a"), &pg.url, "").await);
    let b = Arc::new(replica(&dir.path().join("b"), &pg.url, "").await);

    let mut tasks = Vec::new();
    for (i, s) in [&a, &b, &a, &b].into_iter().enumerate() {
        tasks.push(tokio::spawn(report(
            s.clone(),
            "backend-engineer",
            40,
            format!("w{i}"),
        )));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap().acknowledged;
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

    // A budget set through one replica holds on the other.
    let resp = a
        .http
        .put(format!("{}/api/budgets/frontend-engineer", a.api))
        .json(&json!({"tokens": 4321, "mode": "block"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    eventually(
        "the override on the other replica",
        Duration::from_secs(10),
        || async {
            let (_, budget) = b.get_json("/api/budgets/frontend-engineer").await;
            (budget["tokens"] == 4321 && budget["mode"] == "block").then_some(())
        },
    )
    .await;

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
    for (s, tag) in [(&a, "a"), (&b, "b")] {
        tasks.push(tokio::spawn(report(
            s.clone(),
            "devops-engineer",
            600,
            tag.to_string(),
        )));
    }
    // Restart PostgreSQL in the middle of it.
    eventually("some load stored", Duration::from_secs(20), || async {
        (pg.query("SELECT COUNT(*) FROM hypertool_events")[0].get::<_, i64>(0) > 100).then_some(())
    })
    .await;
    pg.restart().await;
    let (mut acknowledged, mut in_doubt) = (0, Vec::new());
    for t in tasks {
        let told = t.await.unwrap();
        acknowledged += told.acknowledged;
        in_doubt.extend(told.in_doubt);
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
    // A batch answered "outcome unknown" is stored whole or not at all, and counts if stored.
    let mut landed = 0;
    for session in &in_doubt {
        let events: i64 = pg.query(&format!(
            "SELECT COUNT(*) FROM hypertool_events WHERE body::jsonb->>'session' = '{session}'"
        ))[0]
            .get(0);
        assert!(
            events == 0 || events == 5,
            "{session}: {events} of 5 stored"
        );
        landed += events as u64 * 5;
    }
    let stored: i64 = pg.query(
        "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0)::bigint FROM hypertool_events WHERE persona = 'devops-engineer'",
    )[0]
    .get(0);
    assert_eq!(
        stored as u64,
        acknowledged + landed,
        "{} batches in doubt",
        in_doubt.len()
    );
    let acknowledged = acknowledged + landed;
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
        backend_budget(&toml, "    tokens: 1000\n    mode: block\n");
        on_ledger(&toml, &pg.url, "");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cached_through_one_replica_is_served_by_the_other_and_a_redis_outage_fails_nothing(
) {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let mut redis = Redis::start(dir.path()).await;
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let home = dir.path().join(name);
        let extra = format!("\n[gateway.cache]\nurl = \"{}\"\n", redis.url);
        let toml = gateway_config(&home, &upstream.base_url, "");
        let mut text = std::fs::read_to_string(&toml).unwrap();
        // The repository's file has a [gateway.cache] table already: add the url to it.
        assert!(text.contains("[gateway.cache]\n"));
        text = text.replacen("[gateway.cache]\n", &extra[1..], 1);
        std::fs::write(&toml, text).unwrap();
        replicas.push(
            start(
                Source::File(toml),
                &home.join("data"),
                Arc::new(ManualClock::new(T0)),
            )
            .await,
        );
    }
    let ask = |s: &TestServer, question: &str| {
        let req = s
            .http
            .post(format!("{}/v1/chat/completions", s.api))
            .header("x-hypertool-persona", "backend-engineer")
            .json(&json!({"model": "ok", "temperature": 0,
                          "messages": [{"role": "user", "content": question}]}));
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let cache = resp
                .headers()
                .get("x-hypertool-cache")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let body: Value = resp.json().await.unwrap();
            (status, cache, body)
        }
    };
    let (status, cache, first) = ask(&replicas[0], "what is a ledger?").await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    // The write to Redis happens after the answer: wait for it to be stored.
    eventually("the answer in Redis", Duration::from_secs(10), || async {
        (replicas[0]
            .metrics()
            .await
            .get("hypertool_cache_shared_total", &[("result", "stored")])
            == Some(1.0))
        .then_some(())
    })
    .await;
    let (status, cache, second) = ask(&replicas[1], "what is a ledger?").await;
    assert_eq!((status, cache.as_str()), (200, "hit"), "{second}");
    assert_eq!(
        first, second,
        "the same answer, from the other replica's call"
    );
    assert_eq!(
        upstream.stats().await["calls"],
        1,
        "one upstream call for both"
    );

    // Redis goes away: calls go on, as misses, counted.
    redis.stop();
    for i in 0..5 {
        let (status, _, body) = ask(&replicas[1], &format!("question {i}")).await;
        assert_eq!(status, 200, "{body}");
    }
    let m = replicas[1].metrics().await;
    assert!(
        m.get("hypertool_cache_shared_total", &[("result", "error")])
            .unwrap_or(0.0)
            >= 1.0
    );
    // And back: sharing resumes by itself (the first command on a broken connection may fail
    // while it reconnects, so a fresh question each round).
    redis.restart().await;
    let round = std::sync::atomic::AtomicU32::new(0);
    eventually("sharing to resume", Duration::from_secs(30), || async {
        let q = format!(
            "after the outage {}",
            round.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let stored =
            |m: &Exposition| m.get("hypertool_cache_shared_total", &[("result", "stored")]);
        let before = stored(&replicas[0].metrics().await);
        let _ = ask(&replicas[0], &q).await;
        // Until the write has been tried (stored or failed).
        for _ in 0..100 {
            let m = replicas[0].metrics().await;
            if stored(&m) > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (status, cache, _) = ask(&replicas[1], &q).await;
        (status == 200 && cache == "hit").then_some(())
    })
    .await;
    for s in replicas {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_restarts_leaves_the_other_replicas_calls_in_flight_alone() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path()).await;
    // Replica a's upstream (the built-in mock) takes 3 s: its call is in flight while b restarts.
    let home_a = dir.path().join("a");
    let toml_a = config_copy(&home_a);
    let text = std::fs::read_to_string(&toml_a).unwrap();
    assert!(text.contains("latency_ms = 0\n"));
    let text = text
        .replacen("latency_ms = 0\n", "latency_ms = 3000\n", 1)
        .replacen(
            "[ledger]\n",
            &format!("[ledger]\nurl = \"{}\"\n", pg.url),
            1,
        );
    std::fs::write(&toml_a, text).unwrap();
    let a = Arc::new(
        start(
            Source::File(toml_a),
            &home_a.join("data"),
            Arc::new(ManualClock::new(T0)),
        )
        .await,
    );
    let b = replica(&dir.path().join("b"), &pg.url, "").await;
    let call = {
        let a = a.clone();
        tokio::spawn(async move {
            a.http
                .post(format!("{}/v1/chat/completions", a.api))
                .header("x-hypertool-persona", "backend-engineer")
                .json(
                    &json!({"model": "mock/x", "messages": [{"role": "user", "content": "slow"}]}),
                )
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    eventually("a's admission stored", Duration::from_secs(10), || async {
        (pg.query("SELECT COUNT(*) FROM hypertool_events WHERE kind = 'call_admitted'")[0]
            .get::<_, i64>(0)
            == 1)
            .then_some(())
    })
    .await;
    // b restarts while a's call is in flight: it must not count that call as cut off.
    b.stop().await;
    let b = replica_again(&dir.path().join("b")).await;
    assert_eq!(call.await.unwrap(), 200);
    eventually("a's usage stored", Duration::from_secs(10), || async {
        (pg.query("SELECT COUNT(*) FROM hypertool_events WHERE kind = 'usage'")[0].get::<_, i64>(0)
            >= 1)
            .then_some(())
    })
    .await;
    let settled: i64 = pg.query(
        "SELECT COUNT(*) FROM hypertool_events WHERE kind = 'usage' AND body LIKE '%\"call\"%'",
    )[0]
    .get(0);
    assert_eq!(settled, 1, "the call was settled once, by its own replica");
    b.stop().await;
    Arc::into_inner(a).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_cost_budget_holds_across_replicas_as_token_budgets_do() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path()).await;
    let upstream = FakeUpstream::start(dir.path()).await;
    // $1 per 1k tokens; the fake answers 11 + 7 tokens: $0.018 a call, reserved at its estimate
    // (the prompt's estimate + max_tokens).
    let priced = "\n[[gateway.models]]\nname = \"priced\"\nupstream = \"fake\"\nupstream_model = \"ok\"\nprompt_usd_per_1k = 1.0\ncompletion_usd_per_1k = 1.0\n";
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let home = dir.path().join(name);
        let toml = gateway_config(&home, &upstream.base_url, priced);
        backend_budget(
            &toml,
            "    tokens: 1000000\n    cost_usd: 0.5\n    mode: block\n",
        );
        on_ledger(&toml, &pg.url, "");
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
            let (mut spent, mut refused) = (0.0f64, 0u64);
            for n in 0..12 {
                let resp = s
                    .http
                    .post(format!("{}/v1/chat/completions", s.api))
                    .header("x-hypertool-persona", "backend-engineer")
                    .header("x-hypertool-session", format!("c{w}-{n}"))
                    .json(&json!({"model": "priced", "max_tokens": 16,
                                  "messages": [{"role": "user", "content": "hello there"}]}))
                    .send()
                    .await
                    .unwrap();
                match resp.status().as_u16() {
                    200 => {
                        let body: Value = resp.json().await.unwrap();
                        spent += body["usage"]["total_tokens"].as_f64().unwrap() / 1000.0;
                    }
                    429 => refused += 1,
                    other => panic!("unexpected {other}: {}", resp.text().await.unwrap()),
                }
            }
            (spent, refused)
        }));
    }
    let (mut spent, mut refused) = (0.0, 0);
    for t in tasks {
        let (s, r) = t.await.unwrap();
        spent += s;
        refused += r;
    }
    assert!(refused > 0, "the cost budget never refused");
    // Each call reserved its cost estimate and cost less: the fleet cannot pass the limit.
    assert!(
        spent <= 0.5 + 1e-9,
        "the fleet overshot its cost budget: ${spent}"
    );
    assert!(
        spent >= 0.5 - 2.0 * 0.03,
        "the cost budget was not used up: ${spent}"
    );
    for s in &replicas {
        eventually(
            "every replica to agree",
            Duration::from_secs(20),
            || async {
                let (_, b) = s.get_json("/api/budgets/backend-engineer").await;
                let used = b["used_cost_usd"].as_f64().unwrap_or(-1.0);
                ((used - spent).abs() < 1e-6).then_some(())
            },
        )
        .await;
    }
    // A change through one replica is in the audit log every replica reads (the shared ledger).
    let resp = replicas[0]
        .http
        .put(format!("{}/api/budgets/backend-engineer", replicas[0].api))
        .json(&json!({"tokens": 1000000, "cost_usd": 0.75}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, log) = replicas[1].get_json("/api/audit?action=budget.set").await;
    assert_eq!(status, 200, "{log}");
    let entry = &log["entries"][0];
    assert_eq!(entry["target"], "backend-engineer", "{log}");
    assert_eq!(entry["before"]["cost_usd"], 0.5, "{entry}");
    assert_eq!(entry["after"]["cost_usd"], 0.75, "{entry}");
    for s in replicas {
        Arc::into_inner(s).unwrap().stop().await;
    }
}

/// A replica's configuration for the lease test: `backend-engineer` on a 1,000-token `block`
/// budget, a 2 s replica lease, and the mock answering after `latency_ms`.
fn leased(home: &Path, url: &str, latency_ms: u64) -> std::path::PathBuf {
    let toml = config_copy(home);
    backend_budget(&toml, "    tokens: 1000\n    mode: block\n");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("latency_ms = 0\n"));
    let slow = format!("latency_ms = {latency_ms}\n");
    std::fs::write(&toml, text.replacen("latency_ms = 0\n", &slow, 1)).unwrap();
    on_ledger(&toml, url, "replica_lease = \"2s\"\n");
    toml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_calls_stop_holding_budget_after_its_lease_and_are_settled_once() {
    use hypertool::core::clock::{Clock, SystemClock};
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path()).await;
    // Replica a: a process of its own, whose upstream (the mock) takes a minute.
    let home_a = dir.path().join("a");
    let toml_a = leased(&home_a, &pg.url, 60_000);
    let a_args = [
        "--config",
        toml_a.to_str().unwrap(),
        "--data-dir",
        home_a.join("data").to_str().unwrap(),
    ]
    .map(str::to_string);
    let args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let a = crate::process::Daemon::spawn(&home_a, &args);
    // Replica b, the survivor, on a clock of the test's.
    let home_b = dir.path().join("b");
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let b = start(
        Source::File(leased(&home_b, &pg.url, 0)),
        &home_b.join("data"),
        clock.clone(),
    )
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let ask = |api: String, max_tokens: u64| {
        let http = http.clone();
        async move {
            http.post(format!("{api}/v1/chat/completions"))
                .header("x-hypertool-persona", "backend-engineer")
                .json(&json!({"model": "mock/x", "max_tokens": max_tokens,
                              "messages": [{"role": "user", "content": "hello there"}]}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    };
    // A call through b: its status and, answered, its tokens.
    let (http_b, api_b) = (http.clone(), b.api.clone());
    let answered = move |max_tokens: u64| {
        let (http, api) = (http_b.clone(), api_b.clone());
        async move {
            let r = http
                .post(format!("{api}/v1/chat/completions"))
                .header("x-hypertool-persona", "backend-engineer")
                .json(&json!({"model": "mock/x", "max_tokens": max_tokens,
                              "messages": [{"role": "user", "content": "hello there"}]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, body["usage"]["total_tokens"].as_u64().unwrap_or(0))
        }
    };
    // Three calls through a, in flight: their reservations hold ~900 of the 1,000 tokens.
    let mut in_flight = Vec::new();
    for _ in 0..3 {
        in_flight.push(tokio::spawn(ask(a.api.clone(), 290)));
    }
    eventually(
        "a's three admissions stored",
        Duration::from_secs(20),
        || async {
            (pg.query("SELECT COUNT(*) FROM hypertool_events WHERE kind = 'call_admitted'")[0]
                .get::<_, i64>(0)
                == 3)
                .then_some(())
        },
    )
    .await;
    // b counts them: a call that needs 300 more is refused fleet-wide.
    eventually(
        "b to refuse for want of budget",
        Duration::from_secs(10),
        || async { (ask(b.api.clone(), 290).await.ok() == Some(429)).then_some(()) },
    )
    .await;
    // a dies. Within its lease, its calls still hold the budget, and nobody settles them.
    a.kill9();
    for t in in_flight {
        assert!(t.await.unwrap().is_err(), "a's calls were cut off");
    }
    assert_eq!(ask(b.api.clone(), 290).await.ok(), Some(429));
    let admitted: Vec<String> = pg
        .query(
            "SELECT body FROM hypertool_events WHERE kind = 'call_admitted' ORDER BY seq LIMIT 3",
        )
        .iter()
        .map(|r| {
            let body: String = r.get(0);
            serde_json::from_str::<Value>(&body).unwrap()["call"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let settlements = |call: &str| -> Vec<String> {
        pg.query(&format!(
            "SELECT origin FROM hypertool_events WHERE kind = 'usage' AND body::jsonb->>'call' = '{call}'"
        ))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
    };
    assert!(admitted.iter().all(|c| settlements(c).is_empty()));
    // Past a's lease (b's clock moves past a's last heartbeat by more than 2 s): b, the one
    // survivor, settles a's three cut-off calls at their estimates — the holds become usage.
    let ahead = SystemClock.now_ms() + 3_000 - clock.now_ms();
    clock.advance_ms(ahead);
    for call in &admitted {
        eventually(
            "b to settle a's cut-off call",
            Duration::from_secs(20),
            || async { (!settlements(call).is_empty()).then_some(()) },
        )
        .await;
    }
    assert_eq!(
        b.metrics().await.get("hypertool_ledger_replicas_live", &[]),
        Some(1.0),
        "b alone is alive"
    );
    // b keeps serving what the budget has left: four clients, each call answered or refused.
    let mut answered_on_b = 0;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let answered = answered.clone();
        clients.push(tokio::spawn(async move {
            let (mut tokens, mut served) = (0, 0);
            for _ in 0..8 {
                let (status, t) = answered(16).await;
                assert!(status == 200 || status == 429, "{status}");
                tokens += t;
                served += u64::from(status == 200);
            }
            (tokens, served)
        }));
    }
    let mut served = 0;
    for c in clients {
        let (t, n) = c.await.unwrap();
        answered_on_b += t;
        served += n;
    }
    assert!(served > 0, "b served nothing after a's death");
    let b_origin = std::fs::read_to_string(home_b.join("data/replica-id")).unwrap();
    for call in &admitted {
        assert_eq!(
            settlements(call),
            vec![b_origin.trim().to_string()],
            "{call}"
        );
    }
    let used_on = |s: &TestServer| {
        let s = s.api.clone();
        let http = http.clone();
        async move {
            let b: Value = http
                .get(format!("{s}/api/budgets/backend-engineer"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            b["used_tokens"].as_u64().unwrap()
        }
    };
    let used = used_on(&b).await;
    // Each settlement is its admission's estimate (nothing had streamed), and the budget is
    // exactly what the ledger's usage rows hold: b's answered call and the three settlements.
    for call in &admitted {
        let row = pg.query(&format!(
            "SELECT (SELECT (body::jsonb->>'estimate')::bigint FROM hypertool_events WHERE kind = 'call_admitted' AND body::jsonb->>'call' = '{call}'), \
                    (SELECT prompt_tokens + completion_tokens FROM hypertool_events WHERE kind = 'usage' AND body::jsonb->>'call' = '{call}')"
        ));
        assert_eq!(row[0].get::<_, i64>(0), row[0].get::<_, i64>(1), "{call}");
    }
    let ledger_used: i64 = pg.query(
        "SELECT SUM(prompt_tokens + completion_tokens)::BIGINT FROM hypertool_events WHERE kind = 'usage' AND persona = 'backend-engineer'",
    )[0]
    .get(0);
    assert_eq!(used as i64, ledger_used);
    // And exactly what b's clients were answered, plus the estimates a's cut-off calls reserved.
    let estimates: i64 = pg.query(
        "SELECT SUM((body::jsonb->>'estimate')::bigint)::BIGINT FROM hypertool_events WHERE kind = 'call_admitted' AND body::jsonb->>'replica' = (SELECT origin FROM hypertool_events WHERE kind = 'call_admitted' ORDER BY seq LIMIT 1)",
    )[0]
    .get(0);
    assert_eq!(used as i64, answered_on_b as i64 + estimates);
    // a comes back: it finds its calls settled and settles none again; both agree on the usage.
    let a = crate::process::Daemon::spawn(&home_a, &args);
    let a_used = async {
        let b: Value = http
            .get(format!("{}/api/budgets/backend-engineer", a.api))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        b["used_tokens"].as_u64().unwrap()
    }
    .await;
    assert_eq!(a_used, used, "a after its restart and b agree");
    for call in &admitted {
        assert_eq!(
            settlements(call).len(),
            1,
            "call {call} settled more than once"
        );
    }
    a.kill9();
    b.stop().await;
}
