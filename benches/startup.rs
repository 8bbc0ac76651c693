//! Start-up time against history: a ledger of ten million events (`HYPERTOOL_BENCH_EVENTS` to
//! change it) with a snapshot taken 10,000 events before its end, as a periodic snapshot would
//! leave it. Prints, from one run:
//!
//! - the state rebuilt from the snapshot plus the events after it (open + recover, median of 3),
//! - the same by the full replay (no snapshot), once,
//! - `hypertool serve` on that ledger from exec to `/readyz` 200, median of 3 (killed with -9
//!   after each, so no shutdown snapshot helps the next).
//!
//! The ledger is built once into `target/bench-startup-<events>/` (minutes; several GB) and reused.
//! Run: `cargo bench --bench startup`.

use std::path::Path;
use std::time::{Duration, Instant};

use hypertool::config::{load, LedgerSync, Source};
use hypertool::core::engine::Engine;
use hypertool::core::synthetic;
use hypertool::store::snapshot::{recover, Snapshots};
use hypertool::store::sqlite::SqliteLedger;
use hypertool::store::Ledger;

const T0: i64 = 1_795_856_400_000;
const AFTER_SNAPSHOT: u64 = 10_000;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let events: u64 = std::env::var("HYPERTOOL_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let home = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("bench-startup-{events}"));
    let data = home.join("data");
    if !home.join("complete").exists() {
        build(&data, events)?;
        std::fs::write(home.join("complete"), b"")?;
    }
    let db = data.join("hypertool.db");
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    println!(
        "ledger: {events} events, {:.1} GB, snapshot {AFTER_SNAPSHOT} events before the end",
        size as f64 / 1e9
    );
    let config = load(&Source::Embedded)?.engine_config();
    let now = T0 + events as i64 * 10 + 1_000;

    let mut with_snapshot = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let ledger = SqliteLedger::open(&db, LedgerSync::Normal)?;
        let r = recover(&ledger, &Snapshots::new(&data), config.clone(), now)?;
        with_snapshot.push(started.elapsed());
        assert!(r.snapshot.is_some(), "the snapshot was not used");
        assert!(r.replayed >= AFTER_SNAPSHOT);
    }
    let snapshot = median(&mut with_snapshot);
    println!(
        "recover from snapshot + {AFTER_SNAPSHOT} events: {:.3} s (median of 3)",
        snapshot.as_secs_f64()
    );

    let started = Instant::now();
    let ledger = SqliteLedger::open(&db, LedgerSync::Normal)?;
    let r = recover(
        &ledger,
        &Snapshots::new(&home.join("no-snapshots")),
        config.clone(),
        now,
    )?;
    let full = started.elapsed();
    assert_eq!(r.snapshot, None);
    println!(
        "full replay of {} events: {:.3} s ({:.0} events/s)",
        r.replayed,
        full.as_secs_f64(),
        r.replayed as f64 / full.as_secs_f64()
    );
    drop(ledger);

    let mut serve = Vec::new();
    for _ in 0..3 {
        serve.push(serve_until_ready(&home, &data)?);
    }
    let serve = median(&mut serve);
    println!(
        "hypertool serve, exec to /readyz 200: {:.3} s (median of 3; target < 2 s)",
        serve.as_secs_f64()
    );
    println!(
        "ratio full replay / snapshot start: {:.1}x",
        full.as_secs_f64() / snapshot.as_secs_f64()
    );
    Ok(())
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Appends the synthetic stream in large transactions, applying it to an engine on the way, and
/// snapshots that engine `AFTER_SNAPSHOT` events before the end.
fn build(data: &Path, events: u64) -> Result<(), Error> {
    let _ = std::fs::remove_dir_all(data);
    std::fs::create_dir_all(data)?;
    let mut ledger = SqliteLedger::open(&data.join("hypertool.db"), LedgerSync::Normal)?;
    let mut engine = Engine::new(load(&Source::Embedded)?.engine_config(), T0);
    let started = Instant::now();
    let cut = events.saturating_sub(AFTER_SNAPSHOT);
    let mut next = 0;
    while next < events {
        let end = (next + 50_000)
            .min(events)
            .min(if next < cut { cut } else { events });
        let batch: Vec<_> = synthetic::events(T0, next..end).collect();
        ledger.append(&batch)?;
        batch.iter().for_each(|e| engine.apply(e));
        next = end;
        if next == cut {
            let seq = ledger.last_seq()?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            Snapshots::new(data).write(&ledger.ledger_id()?, seq, now, &engine.state())?;
        }
        if next % 1_000_000 == 0 {
            eprintln!(
                "built {next} events in {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// `hypertool serve` on the bench ledger: time from exec until `/readyz` answers 200.
fn serve_until_ready(home: &Path, data: &Path) -> Result<Duration, Error> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())?;
    let config = home.join("hypertool.toml");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    // No periodic snapshot during the measurement: each start finds the same snapshot.
    std::fs::write(
        &config,
        format!(
            "[ledger]\nsnapshot_interval = \"24h\"\n[personas]\ndir = {:?}\n[budgets]\nfile = {:?}\n",
            repo.join("personas"),
            repo.join("budgets.yml")
        ),
    )
    ?;
    let started = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hypertool"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let ready = loop {
        if ready(port) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "hypertool never became ready"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = child.kill();
    let _ = child.wait();
    Ok(ready)
}

fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..12] == b"200")
}
