//! Nothing acknowledged is lost: across a clean restart and across `kill -9` in the middle of a load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use hypertool::config::Source;
use serde_json::{json, Value};

use crate::common::*;
use crate::process::Daemon;
use std::time::Duration;

/// The samples a restart must reproduce (process-level ones like start time are excluded).
fn durable(m: &Exposition) -> BTreeMap<String, f64> {
    m.samples
        .iter()
        .filter(|s| {
            s.name.starts_with("hypertool_persona_")
                || s.name.starts_with("hypertool_workflow_")
                || s.name.starts_with("hypertool_events_applied")
                || s.name.starts_with("hypertool_label_values_folded")
                || s.name == "hypertool_sessions_open"
        })
        .map(|s| (format!("{}{:?}", s.name, s.labels), s.value))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_recomputes_every_counter_and_budget() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(hypertool::core::clock::ManualClock::new(T0));
    let s = start(Source::Embedded, dir.path(), clock.clone()).await;
    s.post_events(json!([
        {"type":"usage","persona":"backend-engineer","chatmode":"c","model":"m","prompt_tokens":1200,"completion_tokens":300,"session":"s1","cost_usd":0.1},
        {"type":"usage","persona":"testing-specialist","chatmode":"c","model":"m2","prompt_tokens":10,"completion_tokens":1,"session":"s1"},
        {"type":"persona_switch","session":"s9","from":null,"to":"devops-engineer","chatmode":"ops"},
        {"type":"stage","workflow":"w","stage":"s","persona":"backend-engineer","model":"m","duration_seconds":320,"gate":"fail"},
    ]))
    .await;
    clock.advance_secs(10);
    let resp = s
        .http
        .put(format!("{}/api/budgets/data-scientist", s.api))
        .json(&json!({"tokens": 42, "period": "hourly"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    s.post_events(json!([usage("data-scientist", "c", "m", 50, 0)]))
        .await;
    s.post_raw("/api/budgets/testing-specialist/reset", "")
        .await;
    let before = s.metrics().await;
    assert_eq!(
        before.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "data-scientist")]
        ),
        Some(-8.0)
    );
    s.stop().await;

    let s = start(Source::Embedded, dir.path(), clock.clone()).await;
    let after = s.metrics().await;
    assert_eq!(durable(&before), durable(&after));
    assert_eq!(
        after.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "testing-specialist")]
        ),
        Some(1500.0)
    );
    let (_, b) = s.get_json("/api/budgets/data-scientist").await;
    assert_eq!(b["source"], "override");
    assert_eq!(b["period"], "hourly");
    // The override's hourly period rolls over after the restart too.
    clock.advance_secs(3600);
    let later = s.metrics().await;
    assert_eq!(
        later.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "data-scientist")]
        ),
        Some(42.0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::spawn(dir.path(), &["--data-dir", data.to_str().unwrap()]);
    let api = daemon.api.clone();
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (api, acked, http) = (api.clone(), acked.clone(), http.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                let batch = format!("b{worker}-{n}");
                let events: Vec<_> = (0..100)
                    .map(|_| json!({"type":"usage","persona":"backend-engineer","chatmode":"load","model":"m",
                                    "prompt_tokens":3,"completion_tokens":2,"stage":batch}))
                    .collect();
                let resp = http
                    .post(format!("{api}/v1/events"))
                    .json(&json!({ "events": events }))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 200 => {
                        acked.lock().unwrap().insert(batch);
                    }
                    _ => return,
                }
            }
        }));
    }
    eventually(
        "300 acknowledged batches",
        std::time::Duration::from_secs(120),
        || {
            let n = acked.lock().unwrap().len();
            async move { (n >= 300).then_some(()) }
        },
    )
    .await;
    daemon.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    // Straight from the ledger file: every acknowledged batch is there whole; no batch is partial.
    let conn = rusqlite::Connection::open(data.join("hypertool.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT json_extract(body, '$.stage'), COUNT(*) FROM events GROUP BY 1")
        .unwrap();
    let stored: BTreeMap<String, i64> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for batch in &acked {
        assert_eq!(
            stored.get(batch),
            Some(&100),
            "acknowledged batch {batch} lost"
        );
    }
    assert!(
        stored.values().all(|n| *n == 100),
        "a partially stored batch: {stored:?}"
    );
    let ledger_tokens: i64 = stored.values().sum::<i64>() * 5;
    drop(stmt);
    drop(conn);

    // After a restart the counters and the budget equal the ledger.
    let now = hypertool::core::clock::Clock::now_ms(&hypertool::core::clock::SystemClock);
    let clock = Arc::new(hypertool::core::clock::ManualClock::new(now));
    let s = start(Source::Embedded, &data, clock).await;
    let m = s.metrics().await;
    assert_eq!(
        m.sum("hypertool_persona_tokens_used_total"),
        ledger_tokens as f64
    );
    assert!(ledger_tokens >= acked.len() as i64 * 500);
    assert_eq!(
        m.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "backend-engineer")]
        ),
        Some((2000 - ledger_tokens) as f64)
    );
    s.stop().await;
}

/// The configuration of the `kill -9` tests in `dir`: the shipped personas and budgets, the mock
/// upstream answering after 15 ms (so calls are in flight when the process dies), and `ledger` as
/// the `[ledger]` section.
fn kill_config(dir: &std::path::Path, ledger: &str) -> std::path::PathBuf {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let toml = dir.join("hypertool.toml");
    std::fs::write(
        &toml,
        format!(
            "[ledger]\n{ledger}\n[personas]\ndir = {:?}\n[budgets]\nfile = {:?}\n[gateway.mock]\nlatency_ms = 15\n",
            repo.join("config/personas"),
            repo.join("config/budgets.yml")
        ),
    )
    .unwrap();
    toml
}

/// `hypertool serve` on `toml` and `data`, as its own process (to be killed).
fn serve_on(dir: &std::path::Path, toml: &std::path::Path, data: &std::path::Path) -> Daemon {
    Daemon::spawn(
        dir,
        &[
            "--config",
            toml.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
    )
}

/// Each usage event's prompt and completion tokens and whether they were estimated, by session.
fn ledger_usage(data: &std::path::Path) -> HashMap<String, (u64, u64, bool)> {
    let conn = rusqlite::Connection::open(data.join("hypertool.db")).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT json_extract(body, '$.session'), prompt_tokens, completion_tokens, \
             COALESCE(json_extract(body, '$.estimated'), 0) FROM events WHERE kind = 'usage'",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok((
            r.get::<_, Option<String>>(0)?.unwrap_or_default(),
            (
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? != 0,
            ),
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The sessions of the usage events in the ledger file, and how often each gateway call (`call`)
/// is settled (by usage or by release) and admitted.
fn ledger_calls(data: &std::path::Path) -> (BTreeMap<String, i64>, BTreeMap<String, (i64, i64)>) {
    let conn = rusqlite::Connection::open(data.join("hypertool.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT json_extract(body, '$.session'), COUNT(*) FROM events WHERE kind = 'usage' GROUP BY 1")
        .unwrap();
    let sessions = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                r.get(1)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut stmt = conn
        .prepare(
            "SELECT json_extract(body, '$.call'), SUM(kind = 'call_admitted'), SUM(kind IN ('usage', 'call_released')) \
             FROM events WHERE json_extract(body, '$.call') IS NOT NULL GROUP BY 1",
        )
        .unwrap();
    let calls = stmt
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (sessions, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_gateway_and_events_load_loses_nothing_answered_or_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A snapshot every second, so one may be half-written when the process dies; every commit
    // synced to the disk (`sync = "full"`), so that the moment between an answer and its usage's
    // commit — if there were one — would be long enough for the kill to find it (it did, 4 runs
    // in 4).
    let toml = kill_config(dir.path(), "snapshot_interval = \"1s\"\nsync = \"full\"");
    for round in 0..5 {
        let daemon = serve_on(dir.path(), &toml, &data);
        let api = daemon.api.clone();
        // Calls whose whole answer reached the client (a stream: through `[DONE]`), by session,
        // with the usage they were answered with (a stream asks for its usage chunk).
        let answered: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
        let http = reqwest::Client::new();
        let mut tasks = Vec::new();
        for worker in 0..48 {
            let (api, answered, http) = (api.clone(), answered.clone(), http.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    let session = format!("r{round}-w{worker}-{n}");
                    let stream = worker % 2 == 1;
                    let resp = http
                        .post(format!("{api}/v1/chat/completions"))
                        .header("x-hypertool-persona", "load-tester")
                        .header("x-hypertool-session", &session)
                        .json(&json!({"model": "mock/load", "stream": stream,
                                      "stream_options": {"include_usage": true},
                                      "messages": [{"role": "user", "content": format!("call {n}")}]}))
                        .send()
                        .await;
                    let Ok(r) = resp else { return };
                    if r.status() != 200 {
                        return;
                    }
                    let Ok(body) = r.text().await else { return };
                    let usage = if stream {
                        if !body.contains("data: [DONE]") {
                            return;
                        }
                        body.lines()
                            .filter_map(|l| l.strip_prefix("data: "))
                            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                            .find_map(|c| c.get("usage").filter(|u| !u.is_null()).cloned())
                    } else {
                        serde_json::from_str::<Value>(&body).ok().and_then(|v| v.get("usage").cloned())
                    };
                    let usage = usage.expect("an answer carries its usage");
                    let numbers = (
                        usage["prompt_tokens"].as_u64().unwrap(),
                        usage["completion_tokens"].as_u64().unwrap(),
                    );
                    answered.lock().unwrap().insert(session, numbers);
                }
            }));
        }
        // Agents reporting through the events API at the same time: batches of 10 usage events,
        // one session per batch.
        let acknowledged: Arc<Mutex<HashSet<String>>> = Arc::default();
        for worker in 0..4 {
            let (api, acknowledged, http) = (api.clone(), acknowledged.clone(), http.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    let session = format!("ev-r{round}-w{worker}-{n}");
                    let events: Vec<_> = (0..10)
                        .map(|_| json!({"type": "usage", "persona": "backend-engineer", "chatmode": "agents",
                                        "model": "m", "prompt_tokens": 3, "completion_tokens": 2, "session": session}))
                        .collect();
                    let resp = http
                        .post(format!("{api}/v1/events"))
                        .json(&json!({ "events": events }))
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status() == 200 => {
                            acknowledged.lock().unwrap().insert(session);
                        }
                        _ => return,
                    }
                }
            }));
        }
        eventually(
            "300 answered calls and 100 acknowledged batches",
            std::time::Duration::from_secs(120),
            || {
                let n = answered.lock().unwrap().len();
                let b = acknowledged.lock().unwrap().len();
                async move { (n >= 300 && b >= 100).then_some(()) }
            },
        )
        .await;
        daemon.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        let answered = answered.lock().unwrap().clone();
        let acknowledged = acknowledged.lock().unwrap().clone();

        // A restart settles what the crash cut off; then every answered call is in the ledger.
        let now = hypertool::core::clock::Clock::now_ms(&hypertool::core::clock::SystemClock);
        let clock = Arc::new(hypertool::core::clock::ManualClock::new(now));
        let s = start(Source::File(toml.clone()), &data, clock).await;
        let m = s.metrics().await;
        s.stop().await;
        let (sessions, calls) = ledger_calls(&data);
        let recorded = ledger_usage(&data);
        for (session, numbers) in &answered {
            assert_eq!(
                sessions.get(session),
                Some(&1),
                "round {round}: answered call {session} lost or counted twice"
            );
            // Exactly what the client was answered: the real numbers, not an estimate.
            assert_eq!(
                recorded.get(session),
                Some(&(numbers.0, numbers.1, false)),
                "round {round}: answered call {session} recorded otherwise than answered"
            );
        }
        let answered_tokens: u64 = answered.values().map(|(p, c)| p + c).sum();
        let recorded_tokens: u64 = answered
            .keys()
            .filter_map(|s| recorded.get(s))
            .map(|(p, c, _)| p + c)
            .sum();
        assert_eq!(recorded_tokens, answered_tokens, "round {round}");
        for session in &acknowledged {
            assert_eq!(
                sessions.get(session),
                Some(&10),
                "round {round}: acknowledged batch {session} lost or stored twice"
            );
        }
        assert!(
            sessions
                .iter()
                .filter(|(s, _)| s.starts_with("ev-"))
                .all(|(_, n)| *n == 10),
            "round {round}: a batch stored in part or twice"
        );
        for (call, (admitted, settled)) in &calls {
            assert_eq!(
                (*admitted, *settled),
                (1, 1),
                "round {round}: call {call} admitted {admitted}, settled {settled} times"
            );
        }
        assert!(calls.len() >= answered.len());
        // The engine counts exactly the ledger's usage.
        let conn = rusqlite::Connection::open(data.join("hypertool.db")).unwrap();
        let ledger_tokens: i64 = conn
            .query_row(
                "SELECT SUM(prompt_tokens + completion_tokens) FROM events WHERE kind = 'usage'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            m.sum("hypertool_persona_tokens_used_total"),
            ledger_tokens as f64
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_to_its_grace_and_a_call_it_cuts_off_is_counted_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("ht.log");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let toml = dir.path().join("hypertool.toml");
    // A 3 s grace, and an upstream that takes 60 s: the call outlives the grace.
    std::fs::write(
        &toml,
        format!(
            "[server]\nshutdown_grace_seconds = 3\n[personas]\ndir = {:?}\n[budgets]\nfile = {:?}\n[gateway.mock]\nlatency_ms = 60000\n",
            repo.join("config/personas"),
            repo.join("config/budgets.yml")
        ),
    )
    .unwrap();
    let daemon = Daemon::spawn(
        dir.path(),
        &[
            "--config",
            toml.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--log-file",
            "ht.log",
        ],
    );
    let api = daemon.api.clone();
    let call = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{api}/v1/chat/completions"))
            .header("x-hypertool-persona", "data-scientist")
            .header("x-hypertool-session", "cut-off")
            .json(&json!({"model": "mock/slow", "max_tokens": 50,
                          "messages": [{"role": "user", "content": "take your time"}]}))
            .send()
            .await
    });
    // The call is admitted (its admission is in the ledger) before the signal.
    let db = data.join("hypertool.db");
    eventually("the admission", Duration::from_secs(20), || {
        let n: i64 = rusqlite::Connection::open(&db)
            .and_then(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM events WHERE kind = 'call_admitted'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap_or(0);
        async move { (n == 1).then_some(()) }
    })
    .await;
    let signalled = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &daemon.pid().to_string()])
        .status()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || daemon.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    let took = signalled.elapsed();
    assert_eq!(exit.code(), Some(0));
    // One deadline for the whole drain (it used to be one per phase: 14 s for a 10 s grace).
    assert!(
        took < Duration::from_secs(3 + 2),
        "shutdown took {took:?} for a 3 s grace"
    );
    // The client sees its connection close, not an answer.
    let answered = call
        .await
        .unwrap()
        .map(|r| r.status().is_success())
        .unwrap_or(false);
    assert!(!answered, "a call cut off at shutdown is not answered");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("not acknowledged"),
        "no misleading claim about acknowledgements"
    );
    assert!(text.contains("cut off"), "the cut-off call is reported");

    // The next start counts it at its admission estimate: it is in the ledger once.
    let now = hypertool::core::clock::Clock::now_ms(&hypertool::core::clock::SystemClock);
    let clock = Arc::new(hypertool::core::clock::ManualClock::new(now));
    let s = start(Source::File(toml.clone()), &data, clock).await;
    s.stop().await;
    let (sessions, calls) = ledger_calls(&data);
    assert_eq!(sessions.get("cut-off"), Some(&1));
    assert!(calls.values().all(|c| *c == (1, 1)), "{calls:?}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (tokens, estimated): (i64, bool) = conn
        .query_row(
            "SELECT prompt_tokens + completion_tokens, json_extract(body, '$.estimated') FROM events \
             WHERE kind = 'usage' AND json_extract(body, '$.session') = 'cut-off'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(
        estimated && tokens >= 50,
        "counted at its estimate (prompt + max_tokens): {tokens}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_that_cannot_write_fails_closed_says_so_and_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    assert_eq!(s.get_json("/readyz").await.0, 200);
    // Another process holds the ledger's write lock: every write fails (after SQLite's 5 s wait).
    let blocker = rusqlite::Connection::open(dir.path().join("hypertool.db")).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE;").unwrap();

    let (status, body) = s
        .post_events(json!([usage("backend-engineer", "c", "m", 1, 1)]))
        .await;
    assert_eq!(status, 503, "{body}");
    let (status, ready) = s.get_json("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["status"], "ledger_unavailable");
    assert!(
        ready["reason"].as_str().unwrap().contains("locked"),
        "{ready}"
    );
    let m = s.metrics().await;
    assert_eq!(m.get("hypertool_ledger_writable", &[]), Some(0.0));
    assert!(m.get("hypertool_ledger_write_failures_total", &[]).unwrap() >= 1.0);
    // A gateway call is refused before anything goes upstream: no answer nobody could account for.
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-persona", "backend-engineer")
        .json(&json!({"model": "mock/x", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "ledger_unavailable", "{err}");

    // The lock goes away: the probe finds out, with no request needed, and service resumes.
    blocker.execute_batch("ROLLBACK;").unwrap();
    drop(blocker);
    eventually("/readyz to recover", Duration::from_secs(30), || async {
        (s.get_json("/readyz").await.0 == 200).then_some(())
    })
    .await;
    let (status, _) = s
        .post_events(json!([usage("backend-engineer", "c", "m", 1, 1)]))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        s.metrics().await.get("hypertool_ledger_writable", &[]),
        Some(1.0)
    );
    // Nothing refused was stored; what was accepted was, once.
    assert_eq!(s.ledger_totals().await.tokens, 2);
    s.stop().await;
}

/// Rows in the ledger's events table, read beside the running server.
fn ledger_rows(data: &std::path::Path) -> i64 {
    rusqlite::Connection::open(data.join("hypertool.db"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .unwrap()
}

fn snapshot_files(data: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("snapshots"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".snap"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_events_and_counters_and_budgets_stay_exact_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edits = [
        ("snapshot_interval = \"5m\"", "snapshot_interval = \"1s\""),
        ("# retain_days = 90", "retain_days = 2"),
    ];
    let s = start_edited(dir.path(), &edits).await;
    let batch = |n: u64| {
        json!((0..n)
            .map(|i| usage("backend-engineer", "c", "m", 10 + i, 1))
            .collect::<Vec<_>>())
    };
    // Day 0: 20 events (the first append also takes the first snapshot).
    assert_eq!(s.post_events(batch(20)).await.0, 200);
    eventually("the first snapshot", Duration::from_secs(10), || async {
        (snapshot_files(&data).len() == 1).then_some(())
    })
    .await;
    // Three days later: 5 more events and a second snapshot; the first now bounds retention.
    s.clock.advance_secs(3 * 86_400);
    assert_eq!(s.post_events(batch(5)).await.0, 200);
    eventually(
        "the day-0 events removed",
        Duration::from_secs(10),
        || async { (ledger_rows(&data) == 5).then_some(()) },
    )
    .await;
    assert_eq!(snapshot_files(&data).len(), 2);
    let before = durable(&s.metrics().await);
    assert_eq!(
        s.metrics().await.get(
            "hypertool_persona_tokens_used_total",
            &[
                ("persona", "backend-engineer"),
                ("chatmode", "c"),
                ("model", "m")
            ]
        ),
        Some((20 * 11 + 190 + 5 * 11 + 10) as f64)
    );
    s.stop().await;

    // The restart loads a snapshot: counters still count the removed events.
    let toml = dir.path().join("config/hypertool.toml");
    let s = start(
        Source::File(toml.clone()),
        &data,
        Arc::new(hypertool::core::clock::ManualClock::new(
            T0 + 3 * 86_400_000,
        )),
    )
    .await;
    assert_eq!(durable(&s.metrics().await), before);
    s.stop().await;

    // With the newest snapshot gone, the older one and the events after it give the same.
    let newest = snapshot_files(&data).pop().unwrap();
    std::fs::remove_file(data.join("snapshots").join(newest)).unwrap();
    let s = start(
        Source::File(toml),
        &data,
        Arc::new(hypertool::core::clock::ManualClock::new(
            T0 + 3 * 86_400_000,
        )),
    )
    .await;
    assert_eq!(durable(&s.metrics().await), before);
    s.stop().await;
}

/// The probe's own set-up: eight agents on the official `openai` SDK (`mock/gpt-4o`, no
/// `max_tokens`, plain and streamed), `kill -9` after about 3 s, restart. Every call an agent was
/// answered is in the ledger with the numbers it was answered with — before, 11 answered calls per
/// round were there as their admission estimate only (10 + 0 tokens instead of 12 + 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_openai_sdk_agents_keeps_every_answered_call_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let toml = kill_config(dir.path(), "sync = \"full\"");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai_load.py");
    for round in 0..3 {
        let daemon = serve_on(dir.path(), &toml, &data);
        let answered_file = |w: usize| dir.path().join(format!("answered-{round}-{w}.jsonl"));
        let mut agents: Vec<std::process::Child> = (0..8)
            .map(|w| {
                std::process::Command::new("python3")
                    .arg(&script)
                    .arg(format!("{}/v1", daemon.api))
                    .arg(answered_file(w))
                    .arg(format!("{round}{w}"))
                    .spawn()
                    .expect("python3 with the openai package (scripts/test.sh installs it)")
            })
            .collect();
        let read_answered = || {
            let mut answered: HashMap<String, (u64, u64)> = HashMap::new();
            for w in 0..8 {
                let text = std::fs::read_to_string(answered_file(w)).unwrap_or_default();
                // A line is whole once its newline is written (the agent flushes after each).
                for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
                    let v: Value = serde_json::from_str(line).unwrap();
                    answered.insert(
                        v["session"].as_str().unwrap().to_string(),
                        (
                            v["prompt"].as_u64().unwrap(),
                            v["completion"].as_u64().unwrap(),
                        ),
                    );
                }
            }
            answered
        };
        // About 3 s of load (at least 200 answered calls, so the kill lands among calls in flight).
        let started = std::time::Instant::now();
        eventually("200 answered calls", Duration::from_secs(120), || {
            let enough =
                read_answered().len() >= 200 && started.elapsed() >= Duration::from_secs(3);
            async move { enough.then_some(()) }
        })
        .await;
        daemon.kill9();
        for agent in &mut agents {
            agent.wait().unwrap();
        }
        let answered = read_answered();

        let now = hypertool::core::clock::Clock::now_ms(&hypertool::core::clock::SystemClock);
        let clock = Arc::new(hypertool::core::clock::ManualClock::new(now));
        let s = start(Source::File(toml.clone()), &data, clock).await;
        s.stop().await;
        let recorded = ledger_usage(&data);
        let mut tokens = (0, 0);
        for (session, (prompt, completion)) in &answered {
            assert_eq!(
                recorded.get(session),
                Some(&(*prompt, *completion, false)),
                "round {round}: answered call {session} recorded otherwise than answered"
            );
            tokens.0 += prompt + completion;
            tokens.1 += recorded[session].0 + recorded[session].1;
        }
        assert_eq!(
            tokens.1, tokens.0,
            "round {round}: ledger tokens of the answered calls"
        );
        assert!(answered.len() >= 200);
    }
}

/// A stream a crash cuts off is counted with what it had streamed: its completion so far is
/// written down about once a second (`call_progress`), and the restart settles the call at its
/// estimate plus that — not at an estimate with no completion (this call sends no `max_tokens`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_kill_9_is_counted_with_its_completion_so_far() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let upstream = FakeUpstream::start(dir.path()).await;
    let toml = gateway_config(dir.path(), &upstream.base_url, "");
    let daemon = serve_on(dir.path(), &toml, &data);
    // 100 words, 30 ms apart: read about 1.5 s of them, then kill.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", daemon.api))
        .header("x-hypertool-persona", "frontend-engineer")
        .header("x-hypertool-session", "cut-stream")
        .json(&json!({"model": "slow-stream", "stream": true,
                      "messages": [{"role": "user", "content": "a long answer"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut words = 0;
    while words < 50 {
        let chunk = futures_util::StreamExt::next(&mut body)
            .await
            .unwrap()
            .unwrap();
        words += String::from_utf8_lossy(&chunk).matches("word").count();
    }
    daemon.kill9();
    drop(body);

    let now = hypertool::core::clock::Clock::now_ms(&hypertool::core::clock::SystemClock);
    let clock = Arc::new(hypertool::core::clock::ManualClock::new(now));
    let s = start(Source::File(toml), &data, clock).await;
    s.stop().await;
    let (prompt, completion, estimated) = ledger_usage(&data)["cut-stream"];
    assert!(estimated);
    assert!(prompt > 0);
    // At least the words streamed by the last progress (at about 1 s: some 30 words, 2 tokens
    // each), at most the whole answer (the server reads ahead of this client).
    assert!(
        (20..=210).contains(&completion),
        "completion {completion} for {words} words seen"
    );
}
