//! The ledger's disk fails under a running hypertool: full (a small tmpfs filled to the last
//! byte) and read-only. Each test checks what clients were told, what `/readyz` and the metrics
//! said, that service resumed by itself, and that the ledger holds exactly what was acknowledged
//! and passes SQLite's `integrity_check`.
//!
//! Mounting needs root: the tests are `#[ignore]`d, so that a run without root reports them as
//! ignored (never as passed), and scripts/test.sh runs them (`--include-ignored`) when it runs as
//! root, as CI does. Under `CI=true` a mount that fails is a failure, not a skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hypertool::config::Source;
use hypertool::core::clock::ManualClock;
use serde_json::{json, Value};

use crate::common::*;

/// A tmpfs of `size` mounted at `path` for the test's lifetime.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .ok()?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cannot mount a tmpfs ({why}): under CI this test must run (as root)"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs here ({why}); this test needs root");
            return None;
        }
        Some(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    fn remount(&self, mode: &str) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes a file until the file system has no byte left; returns it (remove it to free space).
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        // The last partial chunk: byte by byte is too slow, halve instead.
        let mut n = chunk.len() / 2;
        while n > 0 {
            if f.write_all(&chunk[..n]).is_err() {
                n /= 2;
            }
        }
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// `PRAGMA integrity_check` of the ledger at `data/hypertool.db`, and its usage token total.
fn check_ledger(data: &Path) -> u64 {
    let conn = rusqlite::Connection::open(data.join("hypertool.db")).unwrap();
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(verdict, "ok", "the ledger is damaged");
    conn.query_row(
        "SELECT COALESCE(SUM(COALESCE(prompt_tokens,0) + COALESCE(completion_tokens,0)), 0) FROM events",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as u64
}

async fn chat(s: &TestServer, persona: &str, n: usize) -> (u16, Value) {
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-persona", persona)
        .header("x-hypertool-session", format!("{persona}-{n}"))
        .json(&json!({"model": "mock/x", "max_tokens": 16,
                      "messages": [{"role": "user", "content": format!("question {n}")}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to mount a tmpfs: scripts/test.sh runs it (--include-ignored) as root"]
async fn a_full_disk_fails_closed_resumes_when_space_returns_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(disk) = Tmpfs::mount(&data, "8m") else {
        return;
    };
    let s = start_edited(dir.path(), &[]).await;
    let mut acknowledged = 0u64;
    let (status, _) = s
        .post_events(json!([usage("backend-engineer", "c", "m", 5, 5)]))
        .await;
    assert_eq!(status, 200);
    acknowledged += 10;

    let filler = disk.fill();
    // SQLite reuses the WAL's space for a while; keep writing until the disk says no.
    let mut refusal = None;
    for _ in 0..20_000 {
        let (status, body) = s
            .post_events(json!([usage("backend-engineer", "c", "m", 5, 5)]))
            .await;
        match status {
            200 => acknowledged += 10,
            503 => {
                refusal = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let refusal = refusal.expect("the full disk never refused a write");
    assert!(
        refusal.to_string().contains("retry"),
        "the client is told nothing was stored and to retry: {refusal}"
    );
    let (status, ready) = s.get_json("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["status"], "ledger_unavailable");
    assert!(
        ready["reason"].as_str().unwrap().contains("full"),
        "{ready}"
    );
    assert_eq!(
        s.metrics().await.get("hypertool_ledger_writable", &[]),
        Some(0.0)
    );
    // Gateway calls are refused before the upstream, not answered and forgotten.
    for n in 0..20 {
        let (status, body) = chat(&s, "backend-engineer", n).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "ledger_unavailable", "{body}");
    }

    // Space comes back: the probe notices with no request needed.
    std::fs::remove_file(&filler).unwrap();
    eventually("/readyz to recover", Duration::from_secs(30), || async {
        (s.get_json("/readyz").await.0 == 200).then_some(())
    })
    .await;
    let (status, body) = chat(&s, "backend-engineer", 99).await;
    assert_eq!(status, 200, "{body}");
    let call_tokens = body["usage"]["total_tokens"].as_u64().unwrap();
    settled(&s, acknowledged + call_tokens).await;
    assert_eq!(
        s.metrics().await.get("hypertool_ledger_writable", &[]),
        Some(1.0)
    );
    s.stop().await;
    assert_eq!(check_ledger(&data), acknowledged + call_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to mount a tmpfs: scripts/test.sh runs it (--include-ignored) as root"]
async fn with_on_outage_buffer_a_full_disk_keeps_serving_block_budgets_hold_and_all_is_written_once(
) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(disk) = Tmpfs::mount(&data, "8m") else {
        return;
    };
    let edits = [("on_outage = \"fail_closed\"", "on_outage = \"buffer\"")];
    let s = start_edited(dir.path(), &edits).await;
    let resp = s
        .http
        .put(format!("{}/api/budgets/backend-engineer", s.api))
        .json(&json!({"tokens": 1000, "mode": "block"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let filler = disk.fill();
    // Other traffic until the ledger fails: in this mode it is held, not refused.
    let mut other = 0u64;
    for n in 0.. {
        assert!(n < 20_000, "the full disk never failed a write");
        let (status, body) = s
            .post_events(json!([usage("devops-engineer", "c", "m", 5, 5)]))
            .await;
        assert_eq!(status, 200, "{body}");
        other += 10;
        if s.get_json("/readyz").await.1["ledger"] == "buffering" {
            break;
        }
    }
    let (status, ready) = s.get_json("/readyz").await;
    assert_eq!(status, 200, "still serving: {ready}");
    let m = s.metrics().await;
    assert_eq!(m.get("hypertool_ledger_writable", &[]), Some(0.0));
    assert!(m.get("hypertool_ledger_outage_held_events", &[]).unwrap() >= 1.0);

    // Concurrent calls against a 1,000-token block budget, on a disk that cannot write.
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (mut used, mut answered, mut blocked) = (0u64, 0u64, 0u64);
            for n in 0..40 {
                let (status, body) = chat(&s, "backend-engineer", worker * 100 + n).await;
                match status {
                    200 => {
                        used += body["usage"]["total_tokens"].as_u64().unwrap();
                        answered += 1;
                    }
                    429 => blocked += 1,
                    other => panic!("unexpected {other}: {body}"),
                }
            }
            (used, answered, blocked)
        }));
    }
    let (mut used, mut answered, mut blocked) = (0, 0, 0);
    for t in tasks {
        let (u, a, b) = t.await.unwrap();
        used += u;
        answered += a;
        blocked += b;
    }
    assert!(blocked > 0, "the block budget never refused");
    assert!(
        (1000 - 40..=1000).contains(&used),
        "the budget holds during the outage: {used} tokens answered"
    );
    let (_, budget) = s.get_json("/api/budgets/backend-engineer").await;
    assert_eq!(budget["used_tokens"], used, "{budget}");
    assert!(
        std::fs::metadata(data.join("hypertool.db")).is_ok(),
        "still on the full disk"
    );

    // Space returns: the held events are written, in order, once.
    std::fs::remove_file(&filler).unwrap();
    eventually(
        "the held events to be written",
        Duration::from_secs(30),
        || async {
            let m = s.metrics().await;
            (m.get("hypertool_ledger_outage_held_events", &[]) == Some(0.0)
                && m.get("hypertool_ledger_writable", &[]) == Some(1.0))
            .then_some(())
        },
    )
    .await;
    assert_eq!(s.get_json("/readyz").await.1, json!({"status": "ready"}));
    let s = Arc::into_inner(s).unwrap();
    s.stop().await;
    assert_eq!(check_ledger(&data), other + used);
    let conn = rusqlite::Connection::open(data.join("hypertool.db")).unwrap();
    let (calls, distinct): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT json_extract(body, '$.call')) FROM events \
             WHERE kind = 'usage' AND persona = 'backend-engineer'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((calls as u64, distinct as u64), (answered, answered));
    drop(conn);

    // A restart rebuilds the same budget from what was written.
    let s = start(
        Source::File(dir.path().join("config/hypertool.toml")),
        &data,
        Arc::new(ManualClock::new(T0)),
    )
    .await;
    let (_, budget) = s.get_json("/api/budgets/backend-engineer").await;
    assert_eq!(budget["used_tokens"], used, "{budget}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to mount a tmpfs: scripts/test.sh runs it (--include-ignored) as root"]
async fn a_read_only_data_dir_is_refused_at_start_with_the_fix_and_its_ledger_is_intact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(disk) = Tmpfs::mount(&data, "16m") else {
        return;
    };
    let s = start_default(&data).await;
    let (status, _) = s
        .post_events(json!([usage("backend-engineer", "c", "m", 7, 5)]))
        .await;
    assert_eq!(status, 200);
    s.stop().await;

    // A file system cannot be made read-only under a process that writes to it (the kernel
    // answers EBUSY), so the disk turns read-only between two runs, as after a remount on errors.
    disk.remount("ro");
    let err = hypertool::server::start(
        hypertool::server::ServeOptions {
            config: Source::Embedded,
            data_dir: data.clone(),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            mcp_servers: None,
        },
        Arc::new(ManualClock::new(T0)),
    )
    .await
    .err()
    .expect("a read-only data dir must not start");
    let message = err.to_string();
    assert!(
        message.contains("Read-only file system")
            && message.contains(&data.display().to_string())
            && message.contains("--data-dir"),
        "the error names the directory, the cause and the fix: {message}"
    );

    disk.remount("rw");
    let s = start_default(&data).await;
    assert_eq!(s.ledger_totals().await.tokens, 12);
    s.stop().await;
    assert_eq!(check_ledger(&data), 12);
}
