//! Gateway overhead benchmark; prints numbers and ratios, asserts nothing.
//!
//!   cargo bench --bench gateway [-- --litellm]
//!
//! By default, against independent references (`support/reference.rs`): Debian's `nginx` as the
//! fixed-answer upstream and, beside hypertool, as a zero-logic reverse proxy (one worker each), with
//! `oha` timing the fixed-rate rounds (per request, to the nanosecond; installed with `cargo install`
//! when missing) and `hey` driving the unthrottled ones; `--litellm` adds LiteLLM's proxy (from
//! PyPI, two workers). hypertool runs with every governance feature on: keys, the ledger, metrics,
//! the embedded alert engine, and trace export to a live OTLP receiver. Rounds are interleaved
//! (every path in each round) and each target is printed with its ratio against the reference
//! measured beside it. Last, the CPU each proxy spends per call at 4,000/s (from `/proc`), and
//! hypertool's by thread: where the difference is.
//!
//! `HYPERTOOL_BENCH=placements` runs the earlier in-process comparison: a minimal OpenAI-compatible
//! upstream runs in this process; the release `hypertool serve` runs as
//! a child process in front of it (ledger, metrics and the embedded alert engine on), and so does a
//! zero-logic proxy (body in, body out, with the same HTTP client as hypertool) for comparison. The
//! load generator offers 100 and 1,000 requests per second open-loop to the upstream directly,
//! through hypertool and through the zero-logic proxy, interleaved in rounds, and reports the
//! latency each adds (p50, p99; the median over the rounds); then 64 closed-loop clients find the
//! highest throughput each way. Peak RSS is hypertool's VmHWM.
//!
//! Two placements are measured in the same run:
//! - *shared*: load generator, upstream and hypertool all share the machine's cores (the worst case:
//!   every cycle hypertool spends is taken from the client and the upstream);
//! - *gateway on its own core* (needs 2+ cores): hypertool, and the zero-logic proxy when it is
//!   measured, are pinned to CPU 0, the load generator and the upstream to CPU 1 (sched_setaffinity
//!   per thread), as in a deployment where the gateway does not run on the client's or the model
//!   server's cores. Then "direct" and "via" offer the same work to the client and upstream, and the
//!   ratio shows whether one core of hypertool keeps up with them.
//!
//! Last, the cost of trace export: a second hypertool exporting every span over OTLP to a live
//! receiver against the first (no destination), in interleaved closed-loop rounds
//! (`HYPERTOOL_BENCH=traces` runs only this part; `HYPERTOOL_BENCH=latency` only the latency added
//! at 1,000/s).
//!
//! `HYPERTOOL_BENCH=replicas`: the embedded defaults (SQLite ledger, in-memory cache) beside a
//! hypertool on a PostgreSQL ledger and a Redis cache (Debian's `postgresql` and `redis-server`,
//! started here on loopback), in interleaved rounds: throughput, latency added at 1,000/s, and the
//! throughput of calls that are all cache misses (temperature 0, each one different: a Redis lookup
//! and a background write each).
//!
//! Each dialect (part of the default run; `HYPERTOOL_BENCH=dialects` runs only this): the CPU
//! hypertool spends per call at 2,000/s on Chat Completions against nginx's fixed chat answer, and
//! on Anthropic Messages and OpenAI Responses — translated to that chat upstream, and Messages as
//! sent to a second nginx answering in Anthropic's shape (chat translated to it, too) — in
//! interleaved rounds, each with its ratio to chat's (target <= 1.15).
//!
//! Read the ratios of one run, not absolute numbers: these machines are noisy.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[path = "support/reference.rs"]
mod reference;

const BODY: &str = r#"{"model":"bench-model","messages":[{"role":"user","content":"Summarise the design of a persona-aware gateway in one line."}]}"#;

use reference::free_addr;

/// The same question in Anthropic Messages and in OpenAI Responses.
const MESSAGES_BODY: &str = r#"{"model":"bench-model","max_tokens":64,"messages":[{"role":"user","content":"Summarise the design of a persona-aware gateway in one line."}]}"#;
const RESPONSES_BODY: &str = r#"{"model":"bench-model","input":"Summarise the design of a persona-aware gateway in one line.","store":false}"#;

/// An Anthropic upstream's one answer.
const ANTHROPIC_ANSWER: &str = r#"{"id":"msg_bench","type":"message","role":"assistant","model":"claude-bench","content":[{"type":"text","text":"A gateway that attributes every call to a persona."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":24,"output_tokens":11}}"#;

/// The upstream's one answer (in-process and nginx alike).
const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"A gateway that attributes every call to a persona."},"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":11,"total_tokens":35}}"#;

async fn upstream_answer() -> ([(&'static str, &'static str); 1], &'static str) {
    ([("content-type", "application/json")], ANSWER)
}

/// Pins every thread of process `pid` (or this process when `None`) whose name satisfies `which` to
/// the given CPUs. Threads created later inherit their creator's placement.
fn pin_threads(pid: Option<u32>, which: impl Fn(&str) -> bool, cpus: &[usize]) {
    let dir = match pid {
        Some(p) => format!("/proc/{p}/task"),
        None => "/proc/self/task".to_string(),
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !which(comm.trim()) {
            continue;
        }
        // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it, and
        // sched_setaffinity reads it for the size given.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            for &cpu in cpus {
                libc::CPU_SET(cpu, &mut set);
            }
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

struct Hypertool(Child);

impl Drop for Hypertool {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// One chat call; true when it was answered 2xx.
async fn one_call(http: &reqwest::Client, url: &str) -> bool {
    http.post(url)
        .header("content-type", "application/json")
        .header("x-hypertool-persona", "backend-engineer")
        .body(BODY)
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false)
}

/// Offers `rate` requests per second for `secs`; returns sorted latencies and the error count.
async fn open_loop(
    http: &reqwest::Client,
    url: &str,
    rate: u64,
    secs: u64,
) -> (Vec<Duration>, usize) {
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity((rate * secs) as usize);
    for _ in 0..rate * secs {
        ticker.tick().await;
        let (http, url) = (http.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = one_call(&http, &url).await;
            (t.elapsed(), ok)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok((d, true)) => latencies.push(d),
            _ => errors += 1,
        }
    }
    latencies.sort();
    (latencies, errors)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Latency added at `rate` requests per second, by hypertool and by the zero-logic proxy, over
/// calling the upstream directly: `rounds` rounds of `secs` seconds, the three paths interleaved
/// in each round so that the machine's slow moments (this VM's tails move by milliseconds from
/// one run to the next) fall on all of them alike. Prints each round and the medians.
async fn added_latency(
    http: &reqwest::Client,
    direct: &str,
    via: &str,
    bare: &str,
    rate: u64,
    rounds: usize,
    secs: u64,
) {
    let (mut added50, mut added99, mut bare99) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (d, de) = open_loop(http, direct, rate, secs).await;
        let (v, ve) = open_loop(http, via, rate, secs).await;
        let (b, be) = open_loop(http, bare, rate, secs).await;
        let p = |xs: &[Duration], q: f64| percentile(xs, q);
        println!(
            "{rate:>5}/s  round {round}: direct p50 {:.3} p99 {:.3} | via hypertool p50 {:.3} p99 {:.3} | zero-logic proxy p50 {:.3} p99 {:.3} | errors {de}/{ve}/{be}",
            p(&d, 0.5), p(&d, 0.99), p(&v, 0.5), p(&v, 0.99), p(&b, 0.5), p(&b, 0.99)
        );
        added50.push(p(&v, 0.5) - p(&d, 0.5));
        added99.push(p(&v, 0.99) - p(&d, 0.99));
        bare99.push(p(&b, 0.99) - p(&d, 0.99));
    }
    let over = if rounds > 1 {
        format!("median of {rounds} rounds")
    } else {
        "one round".to_string()
    };
    println!(
        "{rate:>5}/s  added by hypertool ({over}): p50 {:.3}, p99 {:.3}   (target at 1000/s: p99 <= 1 ms); the zero-logic proxy adds p99 {:.3}",
        median(added50),
        median(added99),
        median(bare99)
    );
}

/// 64 clients as fast as they can for `secs`: requests per second.
async fn closed_loop(http: &reqwest::Client, url: &str, secs: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (http, url) = (http.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let ok = one_call(&http, &url).await;
                if ok {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total as f64 / secs as f64
}

/// Closed-loop maximum directly, through hypertool and through the zero-logic proxy; prints the
/// ratios and returns hypertool's rate.
async fn throughput(
    http: &reqwest::Client,
    direct: &str,
    via: &str,
    bare_addr: SocketAddr,
    bare_label: &str,
) -> f64 {
    let direct_max = closed_loop(http, direct, 5).await;
    let via_max = closed_loop(http, via, 5).await;
    let bare_max = closed_loop(http, &format!("http://{bare_addr}/v1/chat/completions"), 5).await;
    println!(
        "max throughput (64 clients): direct {direct_max:.0}/s, via hypertool {via_max:.0}/s, ratio {:.2} (target >= 0.60)",
        via_max / direct_max
    );
    println!(
        "{bare_label} {bare_max:.0}/s, ratio {:.2}; hypertool reaches {:.0} % of it",
        bare_max / direct_max,
        100.0 * via_max / bare_max
    );
    via_max
}

/// Starts the release `hypertool serve` in `dir/name` on the bench upstream, with `extra` appended
/// to its configuration; returns it and its API address once it answers.
async fn start_hypertool(
    http: &reqwest::Client,
    dir: &Path,
    name: &str,
    upstream_addr: SocketAddr,
    extra: &str,
) -> (Hypertool, SocketAddr) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let home = dir.join(name);
    if let Err(e) = std::fs::create_dir_all(&home) {
        panic!("{}: {e}", home.display());
    }
    let config = home.join("hypertool.toml");
    let text = format!(
        "[personas]\ndir = {:?}\n[budgets]\nfile = {:?}\n\n[[gateway.upstreams]]\nname = \"bench\"\nbase_url = \"http://{upstream_addr}/v1\"\ntimeout = \"10s\"\n\n[[gateway.models]]\nname = \"bench-model\"\nupstream = \"bench\"\nretries = 0\n{extra}",
        repo.join("config/personas").display().to_string(),
        repo.join("config/budgets.yml").display().to_string()
    );
    if let Err(e) = std::fs::write(&config, text) {
        panic!("config: {e}");
    }
    let api = free_addr();
    let metrics = free_addr();
    let child = Command::new(env!("CARGO_BIN_EXE_hypertool"))
        .args(["serve", "--config", &config.display().to_string()])
        .args(["--data-dir", &home.join("data").display().to_string()])
        .args([
            "--listen",
            &api.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn();
    let hypertool = match child {
        Ok(c) => Hypertool(c),
        Err(e) => panic!("hypertool: {e}"),
    };
    let start = Instant::now();
    while http
        .get(format!("http://{api}/healthz"))
        .send()
        .await
        .is_err()
    {
        if start.elapsed() > Duration::from_secs(30) {
            panic!("hypertool did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (hypertool, api)
}

/// Trace export's cost: hypertool exporting every span over OTLP to a live receiver (in this
/// process: it reads each request whole and answers 200) against the same hypertool with no
/// destination, both started fresh for this (a ledger with the history of the runs above would
/// handicap one of them), in interleaved closed-loop rounds.
async fn trace_export_cost(http: &reqwest::Client, dir: &Path, upstream_addr: SocketAddr) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let receiver_addr = free_addr();
    let received = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let counts = received.clone();
    let listener = match tokio::net::TcpListener::bind(receiver_addr).await {
        Ok(l) => l,
        Err(e) => panic!("receiver bind: {e}"),
    };
    tokio::spawn(async move {
        let app = Router::new().route(
            "/v1/traces",
            post(move |body: Bytes| {
                let counts = counts.clone();
                async move {
                    counts.0.fetch_add(1, Ordering::Relaxed);
                    counts.1.fetch_add(body.len() as u64, Ordering::Relaxed);
                    "{}"
                }
            }),
        );
        let _ = axum::serve(listener, app).await;
    });
    let extra = format!("\n[tracing]\nendpoint = \"http://{receiver_addr}/v1/traces\"\n");
    let (exporting, api) = start_hypertool(http, dir, "exporting", upstream_addr, &extra).await;
    let (_silent, silent_api) = start_hypertool(http, dir, "silent", upstream_addr, "").await;
    let traced = format!("http://{api}/v1/chat/completions");
    let plain = &format!("http://{silent_api}/v1/chat/completions");
    let _ = open_loop(http, &traced, 200, 1).await;
    let _ = open_loop(http, plain, 200, 1).await;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        off.push(closed_loop(http, plain, 3).await);
        on.push(closed_loop(http, &traced, 3).await);
    }
    let (off, on) = (median(off), median(on));
    // The last batches are sent within the batch interval (1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!(
        "trace export (every span over OTLP to a live receiver): {on:.0}/s with, {off:.0}/s without, ratio {:.3} (target >= 0.95); the receiver took {} requests, {:.1} MB",
        on / off,
        received.0.load(Ordering::Relaxed),
        received.1.load(Ordering::Relaxed) as f64 / 1e6
    );
    println!(
        "exporting hypertool's peak RSS: {:.1} MB",
        peak_rss_mb(exporting.0.id())
    );
}

/// One chat call that the cache may keep (temperature 0) and never saw (a new question each time).
async fn one_cacheable_call(http: &reqwest::Client, url: &str, n: u64) -> bool {
    let body = format!(
        r#"{{"model":"bench-model","temperature":0,"messages":[{{"role":"user","content":"question {n}"}}]}}"#
    );
    http.post(url)
        .header("content-type", "application/json")
        .header("x-hypertool-persona", "backend-engineer")
        .body(body)
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false)
}

/// 64 clients, each call cacheable and new: requests per second.
async fn closed_loop_misses(http: &reqwest::Client, url: &str, secs: u64, seed: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for client in 0..64u64 {
        let (http, url) = (http.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                if one_cacheable_call(&http, &url, seed * 1_000_000_000 + client * 10_000_000 + i)
                    .await
                {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total as f64 / secs as f64
}

/// A service of this benchmark's own (PostgreSQL or Redis), stopped when dropped.
struct Service(Child, Option<std::path::PathBuf>);

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(data) = &self.1 {
            let _ = as_postgres("pg_ctl")
                .arg("-D")
                .arg(data)
                .args(["-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn postgres_bin(tool: &str) -> std::path::PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                .max()
                .unwrap_or(15)
        })
        .unwrap_or(15);
    root.join(newest.to_string()).join("bin").join(tool)
}

/// A PostgreSQL tool, as the `postgres` user when this runs as root.
fn as_postgres(tool: &str) -> Command {
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(postgres_bin(tool));
        c
    } else {
        Command::new(postgres_bin(tool))
    }
}

async fn wait_for_port(addr: SocketAddr, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            panic!("{what} did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// PostgreSQL (durable as deployed: fsync on) and Redis on loopback; their URLs.
async fn start_postgres_and_redis(dir: &Path) -> (Service, String, Service, String) {
    let home = dir.join("pg");
    if let Err(e) = std::fs::create_dir_all(&home) {
        panic!("{e}");
    }
    if unsafe { libc::geteuid() } == 0 {
        let mut p = home.clone();
        while p.starts_with(std::env::temp_dir()) && p != Path::new("/") {
            let _ = Command::new("chmod").arg("o+x").arg(&p).status();
            if !p.pop() {
                break;
            }
        }
        let _ = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&home)
            .status();
    }
    let data = home.join("data");
    let init = as_postgres("initdb")
        .arg("-D")
        .arg(&data)
        .args(["-U", "hypertool", "-A", "trust", "-E", "UTF8", "--locale=C"])
        .stdout(Stdio::null())
        .status();
    if !init.is_ok_and(|s| s.success()) {
        panic!("initdb failed (is Debian's postgresql installed?)");
    }
    let pg_addr = free_addr();
    let pg = as_postgres("postgres")
        .arg("-D")
        .arg(&data)
        .args(["-p", &pg_addr.port().to_string(), "-k"])
        .arg(&home)
        .args(["-c", "listen_addresses=127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let pg = match pg {
        Ok(c) => Service(c, Some(data)),
        Err(e) => panic!("postgres: {e}"),
    };
    wait_for_port(pg_addr, "PostgreSQL").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let redis_addr = free_addr();
    let redis = Command::new("redis-server")
        .args([
            "--port",
            &redis_addr.port().to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn();
    let redis = match redis {
        Ok(c) => Service(c, None),
        Err(e) => panic!("redis-server: {e}"),
    };
    wait_for_port(redis_addr, "Redis").await;
    (
        pg,
        format!("postgres://hypertool@{pg_addr}/postgres"),
        redis,
        format!("redis://{redis_addr}/0"),
    )
}

/// The embedded defaults against PostgreSQL + Redis, in the same run.
async fn replicas_cost(http: &reqwest::Client, dir: &Path, upstream_addr: SocketAddr) {
    let (_pg, pg_url, _redis, redis_url) = start_postgres_and_redis(dir).await;
    let extra =
        format!("\n[ledger]\nurl = \"{pg_url}\"\n\n[gateway.cache]\nurl = \"{redis_url}\"\n");
    let (_shared, shared_api) = start_hypertool(http, dir, "shared", upstream_addr, &extra).await;
    let (_embedded, embedded_api) = start_hypertool(http, dir, "embedded", upstream_addr, "").await;
    let shared = format!("http://{shared_api}/v1/chat/completions");
    let embedded = format!("http://{embedded_api}/v1/chat/completions");
    let direct = format!("http://{upstream_addr}/v1/chat/completions");
    let _ = open_loop(http, &shared, 200, 1).await;
    let _ = open_loop(http, &embedded, 200, 1).await;
    let (mut e_max, mut s_max, mut e_miss, mut s_miss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut e50, mut e99, mut s50, mut s99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..5u64 {
        e_max.push(closed_loop(http, &embedded, 3).await);
        s_max.push(closed_loop(http, &shared, 3).await);
        e_miss.push(closed_loop_misses(http, &embedded, 3, round * 2).await);
        s_miss.push(closed_loop_misses(http, &shared, 3, round * 2 + 1).await);
        let (d, _) = open_loop(http, &direct, 1000, 3).await;
        let (e, ee) = open_loop(http, &embedded, 1000, 3).await;
        let (s, se) = open_loop(http, &shared, 1000, 3).await;
        let p = |xs: &[Duration], q: f64| percentile(xs, q);
        println!(
            "round {}: max {:.0}/s embedded, {:.0}/s PostgreSQL+Redis | all-miss {:.0}/s vs {:.0}/s | 1000/s p50/p99 direct {:.3}/{:.3}, embedded {:.3}/{:.3}, PostgreSQL+Redis {:.3}/{:.3} (errors {ee}/{se})",
            round + 1,
            e_max[e_max.len() - 1],
            s_max[s_max.len() - 1],
            e_miss[e_miss.len() - 1],
            s_miss[s_miss.len() - 1],
            p(&d, 0.5), p(&d, 0.99), p(&e, 0.5), p(&e, 0.99), p(&s, 0.5), p(&s, 0.99),
        );
        e50.push(p(&e, 0.5) - p(&d, 0.5));
        e99.push(p(&e, 0.99) - p(&d, 0.99));
        s50.push(p(&s, 0.5) - p(&d, 0.5));
        s99.push(p(&s, 0.99) - p(&d, 0.99));
    }
    let (e_max, s_max) = (median(e_max), median(s_max));
    let (e_miss, s_miss) = (median(e_miss), median(s_miss));
    println!(
        "medians of 5 rounds: max throughput embedded {e_max:.0}/s, PostgreSQL+Redis {s_max:.0}/s, ratio {:.2}; all cache misses {e_miss:.0}/s vs {s_miss:.0}/s, ratio {:.2}",
        s_max / e_max,
        s_miss / e_miss
    );
    println!(
        "added at 1000/s over direct (p50 / p99, ms): embedded {:.3} / {:.3}, PostgreSQL+Redis {:.3} / {:.3}",
        median(e50),
        median(e99),
        median(s50),
        median(s99)
    );
}

fn main() {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => panic!("runtime: {e}"),
    };
    runtime.block_on(run());
}

async fn run() {
    let mode = std::env::var("HYPERTOOL_BENCH").unwrap_or_default();
    if mode.is_empty() || mode == "references" {
        against_references(std::env::args().any(|a| a == "--litellm")).await;
        return;
    }
    if mode == "dialects" {
        reference::ensure_tools();
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let upstream = reference::Nginx::upstream(dir.path(), ANSWER);
        dialects_cpu(&reqwest::Client::new(), dir.path(), upstream.addr).await;
        return;
    }
    // The upstream.
    let upstream_addr = free_addr();
    let listener = match tokio::net::TcpListener::bind(upstream_addr).await {
        Ok(l) => l,
        Err(e) => panic!("upstream bind: {e}"),
    };
    tokio::spawn(async move {
        let app = Router::new().route("/v1/chat/completions", post(upstream_answer));
        let _ = axum::serve(listener, app).await;
    });

    // A proxy with no logic at all (body in, body out), on a runtime of its own: the ceiling any
    // gateway can reach on this machine.
    let bare_addr = free_addr();
    let upstream_url = format!("http://{upstream_addr}/v1/chat/completions");
    let bare_thread = std::thread::Builder::new().name("bare-proxy".into());
    let _ = bare_thread.spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .thread_name("bare-proxy")
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => panic!("bare proxy runtime: {e}"),
        };
        rt.block_on(async move {
            // The same client hypertool calls upstreams with (hyper's, pooled), so the two differ
            // only by hypertool's own work.
            let client: Client<HttpConnector, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            let url: http::Uri = match upstream_url.parse() {
                Ok(u) => u,
                Err(e) => panic!("upstream url: {e}"),
            };
            let app = Router::new().route(
                "/v1/chat/completions",
                post(move |body: Bytes| {
                    let (client, url) = (client.clone(), url.clone());
                    async move {
                        let request = http::Request::post(url)
                            .header("content-type", "application/json")
                            .body(Full::new(body));
                        let Ok(request) = request else {
                            return Bytes::new();
                        };
                        match client.request(request).await {
                            Ok(r) => r
                                .into_body()
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default(),
                            Err(_) => Bytes::new(),
                        }
                    }
                }),
            );
            if let Ok(l) = tokio::net::TcpListener::bind(bare_addr).await {
                let _ = axum::serve(l, app).await;
            }
        });
    });

    // hypertool in front of it.
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap_or_default();
    let (hypertool, api) = start_hypertool(&http, dir.path(), "plain", upstream_addr, "").await;
    let direct = format!("http://{upstream_addr}/v1/chat/completions");
    let via = format!("http://{api}/v1/chat/completions");
    // `HYPERTOOL_BENCH=replicas`: PostgreSQL and Redis beside the embedded defaults.
    if std::env::var("HYPERTOOL_BENCH").is_ok_and(|v| v == "replicas") {
        drop(hypertool);
        replicas_cost(&http, dir.path(), upstream_addr).await;
        return;
    }
    // `HYPERTOOL_BENCH=traces` measures the trace export's cost alone.
    if std::env::var("HYPERTOOL_BENCH").is_ok_and(|v| v == "traces") {
        let _ = open_loop(&http, &via, 200, 1).await;
        trace_export_cost(&http, dir.path(), upstream_addr).await;
        return;
    }
    // Warm up connections and caches both ways.
    let _ = open_loop(&http, &direct, 200, 1).await;
    let _ = open_loop(&http, &via, 200, 1).await;

    let bare = format!("http://{bare_addr}/v1/chat/completions");
    let _ = open_loop(&http, &bare, 200, 1).await;
    println!("latency added over calling the upstream directly (ms):");
    // `HYPERTOOL_BENCH=latency` measures the added latency at 1,000/s alone.
    if std::env::var("HYPERTOOL_BENCH").is_ok_and(|v| v == "latency") {
        added_latency(&http, &direct, &via, &bare, 1000, 5, 5).await;
        return;
    }
    added_latency(&http, &direct, &via, &bare, 100, 1, 5).await;
    added_latency(&http, &direct, &via, &bare, 1000, 5, 3).await;
    let pid = hypertool.0.id();
    let rss_now = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN);
    println!("hypertool RSS after the 100/s and 1000/s runs: {rss_now:.1} MB; peak so far {:.1} MB (target <= 100 MB)", peak_rss_mb(pid));
    let via_max = throughput(
        &http,
        &direct,
        &via,
        bare_addr,
        "ceiling on this machine: a proxy with no logic does",
    )
    .await;
    // The highest offered rate (in steps of 500/s) that hypertool sustains with no errors and a
    // p99 under 50 ms.
    let mut sustained = None;
    let mut rate = 1500u64;
    while rate as f64 <= via_max * 1.2 {
        let (v, ve) = open_loop(&http, &via, rate, 4).await;
        let p99 = percentile(&v, 0.99);
        println!(
            "{rate:>5}/s   via      p50 {:>7.3}  p99 {:>8.3}   errors {ve}",
            percentile(&v, 0.5),
            p99
        );
        if ve > 0 || p99 > 50.0 {
            break;
        }
        sustained = Some((rate, percentile(&v, 0.5), p99));
        rate += 500;
    }
    match sustained {
        Some((r, p50, p99)) => println!(
            "highest sustained rate via hypertool: {r}/s (p50 {p50:.3} ms, p99 {p99:.3} ms)"
        ),
        None => println!("highest sustained rate via hypertool: below 1500/s"),
    }
    println!(
        "hypertool peak RSS over the whole run: {:.1} MB",
        peak_rss_mb(hypertool.0.id())
    );
    println!();
    trace_export_cost(&http, dir.path(), upstream_addr).await;

    // Placement 2: hypertool (and the zero-logic proxy) on CPU 0, load generator and upstream on
    // CPU 1.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        println!("gateway on its own core: skipped (one CPU)");
        return;
    }
    pin_threads(Some(pid), |_| true, &[0]);
    pin_threads(None, |name| name == "bare-proxy", &[0]);
    pin_threads(None, |name| name != "bare-proxy", &[1]);
    println!();
    println!("gateway on its own core (hypertool on CPU 0; load generator and upstream on CPU 1):");
    let _ = open_loop(&http, &via, 200, 1).await;
    added_latency(&http, &direct, &via, &bare, 1000, 5, 3).await;
    throughput(
        &http,
        &direct,
        &via,
        bare_addr,
        "zero-logic proxy on the same core:",
    )
    .await;
    println!(
        "hypertool peak RSS over the whole run: {:.1} MB (target <= 100 MB)",
        peak_rss_mb(pid)
    );
}

/// A live OTLP receiver in this process (reads each request whole, answers 200): its address.
async fn otlp_receiver() -> SocketAddr {
    let addr = free_addr();
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => panic!("receiver bind: {e}"),
    };
    tokio::spawn(async move {
        let app = Router::new().route("/v1/traces", post(|_body: Bytes| async { "{}" }));
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn vm_kb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The default run: hypertool against nginx (as upstream and as proxy) and optionally LiteLLM,
/// with `hey`, in interleaved rounds; prints the table and each target with its ratio.
async fn against_references(with_litellm: bool) {
    use reference::{hey, oha, Call, Nginx};
    reference::ensure_tools();
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let upstream = Nginx::upstream(dir.path(), ANSWER);
    let proxy = Nginx::proxy(dir.path(), upstream.addr);
    let receiver = otlp_receiver().await;
    // Every governance feature on: keys (a persona key for the calls, an admin key), the ledger,
    // metrics and the embedded alert engine (defaults), trace export to a live receiver.
    std::env::set_var(
        "HYPERTOOL_BENCH_ADMIN_KEY",
        "ht-bench-admin-0123456789abcdef",
    );
    std::env::set_var(
        "HYPERTOOL_BENCH_PERSONA_KEY",
        "ht-bench-persona-0123456789abcdef",
    );
    // HYPERTOOL_BENCH_GOVERNANCE=defaults: no keys and no trace export (to see what they cost).
    let governed = std::env::var("HYPERTOOL_BENCH_GOVERNANCE").map_or(true, |v| v != "defaults");
    let extra = if !governed {
        String::new()
    } else {
        format!(
        "\n[[server.admin_keys]]\nkey_env = \"HYPERTOOL_BENCH_ADMIN_KEY\"\n\n[[gateway.keys]]\nkey_env = \"HYPERTOOL_BENCH_PERSONA_KEY\"\npersona = \"backend-engineer\"\n\n[tracing]\nendpoint = \"http://{receiver}/v1/traces\"\n"
        )
    };
    let http = reqwest::Client::new();
    let (hypertool, api) =
        start_hypertool(&http, dir.path(), "governed", upstream.addr, &extra).await;
    let pid = hypertool.0.id();
    let body_file = dir.path().join("body.json");
    if let Err(e) = std::fs::write(&body_file, BODY) {
        panic!("body: {e}");
    }
    let call = |addr: SocketAddr, auth: &str| Call {
        url: format!("http://{addr}/v1/chat/completions"),
        body_file: body_file.clone(),
        headers: vec![format!("Authorization: Bearer {auth}")],
    };
    let litellm = if with_litellm {
        reference::litellm(dir.path(), upstream.addr)
    } else {
        None
    };
    let mut paths: Vec<(&str, Call)> = vec![
        ("upstream direct", call(upstream.addr, "none")),
        (
            "nginx as a reverse proxy (1 worker)",
            call(proxy.addr, "none"),
        ),
        (
            if governed {
                "hypertool (every governance feature on)"
            } else {
                "hypertool (defaults: no keys, no trace export)"
            },
            call(api, "ht-bench-persona-0123456789abcdef"),
        ),
    ];
    if let Some((_, addr)) = &litellm {
        paths.push((
            "LiteLLM proxy (2 workers)",
            call(*addr, reference::LITELLM_KEY),
        ));
    }
    let (direct, nginx_at, ours) = (0, 1, 2);
    for (_, c) in &paths {
        let _ = hey(c, 10, Some(200), 1);
    }
    let n = paths.len();
    let mut at100: Vec<Vec<(f64, f64, usize)>> = vec![Vec::new(); n];
    let mut at1000: Vec<Vec<(f64, f64, usize)>> = vec![Vec::new(); 3];
    let mut max: Vec<Vec<f64>> = vec![Vec::new(); n];
    for _ in 0..3 {
        for (i, (_, c)) in paths.iter().enumerate() {
            let r = oha(c, 10, 100, 5);
            at100[i].push((r.quantile(0.5), r.quantile(0.99), r.errors));
        }
    }
    for _ in 0..5 {
        for (i, (_, c)) in paths.iter().take(3).enumerate() {
            let r = oha(c, 10, 1000, 5);
            at1000[i].push((r.quantile(0.5), r.quantile(0.99), r.errors));
        }
    }
    let rss_1000 = vm_kb(pid, "VmRSS:");
    for _ in 0..3 {
        for (i, (_, c)) in paths.iter().enumerate() {
            max[i].push(hey(c, 64, None, 5).rate());
        }
    }
    let peak = vm_kb(pid, "VmHWM:");
    // Where the difference comes from: CPU per call at 4,000/s and unthrottled, for each proxy
    // (3 rounds each, interleaved; the median of each thread's share).
    let mut cpu = Vec::new();
    for rate in [Some(4000), None] {
        let mut nginx_cpu = Vec::new();
        let mut ours_cpu = Vec::new();
        let mut ours_parts: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for _ in 0..3 {
            nginx_cpu.push(reference::cpu_per_call(&paths[nginx_at].1, &proxy.pids(), rate, 4).0);
            let (total, parts) = reference::cpu_per_call(&paths[ours].1, &[pid], rate, 4);
            ours_cpu.push(total);
            for (name, us) in parts {
                ours_parts.entry(name).or_default().push(us);
            }
        }
        cpu.push((rate, nginx_cpu, ours_cpu, ours_parts));
    }
    let med = |xs: Vec<f64>| median(xs);
    let p = |rounds: &[(f64, f64, usize)], which: usize| {
        med(rounds
            .iter()
            .map(|r| if which == 0 { r.0 } else { r.1 })
            .collect())
    };
    let errors = |rounds: &[(f64, f64, usize)]| rounds.iter().map(|r| r.2).sum::<usize>();
    println!("one run, {} cores; latency: oha, 10 connections at a fixed rate; throughput: hey, 64 workers unthrottled; medians over interleaved rounds (3 at 100/s, 5 at 1,000/s, 3 unthrottled)", std::thread::available_parallelism().map_or(1, |c| c.get()));
    println!("| path | p50 / p99 at 100 req/s (ms) | at 1,000 req/s | max throughput |");
    println!("|---|---|---|---|");
    for (i, (name, _)) in paths.iter().enumerate() {
        let thousand = if i < 3 {
            format!("{:.2} / {:.2}", p(&at1000[i], 0), p(&at1000[i], 1))
        } else {
            "—".into()
        };
        println!(
            "| {name} | {:.2} / {:.2} | {thousand} | {:.0}/s |",
            p(&at100[i], 0),
            p(&at100[i], 1),
            med(max[i].clone())
        );
        let e = errors(&at100[i]) + if i < 3 { errors(&at1000[i]) } else { 0 };
        if e > 0 {
            println!("|   ({name}: {e} errors at fixed rates) | | | |");
        }
    }
    let (d_max, n_max, h_max) = (
        med(max[direct].clone()),
        med(max[nginx_at].clone()),
        med(max[ours].clone()),
    );
    // Added latency: the median over rounds of each round's difference (the rounds interleave).
    let added = |a: usize, b: usize, which: usize| {
        med(at1000[a]
            .iter()
            .zip(&at1000[b])
            .map(|(x, y)| if which == 0 { x.0 - y.0 } else { x.1 - y.1 })
            .collect())
    };
    println!();
    println!("targets:");
    println!(
        "  throughput: hypertool {h_max:.0}/s = {:.2} of nginx-as-proxy ({n_max:.0}/s) (target >= 0.85); {:.2} of direct; nginx {:.2} of direct",
        h_max / n_max,
        h_max / d_max,
        n_max / d_max
    );
    println!(
        "  added at 1,000/s: p50 {:.3} ms over nginx-as-proxy (target <= 0.15); p99 {:.3} ms over direct (target <= 1)",
        added(ours, nginx_at, 0),
        added(ours, direct, 1)
    );
    println!("  RSS: {rss_1000:.1} MB after the 1,000/s rounds (target <= 100); peak {peak:.1} MB after the unthrottled rounds");
    if paths.len() > 3 {
        let l_max = med(max[3].clone());
        println!(
            "  vs LiteLLM: {:.0}× its throughput ({l_max:.0}/s; target >= 50×); p99 at 100/s {:.0}× lower (target >= 20×)",
            h_max / l_max,
            p(&at100[3], 1) / p(&at100[ours], 1)
        );
    } else {
        println!("  vs LiteLLM: not measured (cargo bench --bench gateway -- --litellm)");
    }
    println!("  POST /v1/events: see cargo bench --bench ingest (target >= 150k events/s)");
    for (rate, nginx_cpu, ours_cpu, ours_parts) in cpu {
        println!();
        let (n_cpu, h_cpu) = (median(nginx_cpu), median(ours_cpu));
        let at = rate.map_or("unthrottled (64 workers)".to_string(), |r| format!("{r}/s"));
        println!(
            "CPU per call at {at}: nginx-as-proxy {n_cpu:.0} µs, hypertool {h_cpu:.0} µs ({:.1}×); hypertool by thread:",
            h_cpu / n_cpu
        );
        let mut parts: Vec<(String, f64)> = ours_parts
            .into_iter()
            .map(|(name, xs)| (name, median(xs)))
            .filter(|(_, us)| *us >= 1.0)
            .collect();
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (name, us) in parts {
            println!("  {name:<16} {us:>6.0} µs");
        }
    }
    drop(litellm);
    drop(hypertool);
    drop(proxy);
    println!();
    dialects_cpu(&http, dir.path(), upstream.addr).await;
    drop(upstream);
}

/// The CPU per call of each dialect, plain, against chat's: a hypertool of its own (defaults, a
/// second upstream of kind `anthropic` on nginx), 3 interleaved rounds at 2,000/s.
async fn dialects_cpu(http: &reqwest::Client, dir: &Path, chat_upstream: SocketAddr) {
    use reference::{cpu_per_call, hey, Call, Nginx};
    let anthropic_dir = dir.join("anthropic-upstream");
    if let Err(e) = std::fs::create_dir_all(&anthropic_dir) {
        panic!("{}: {e}", anthropic_dir.display());
    }
    let anthropic = Nginx::upstream(&anthropic_dir, ANTHROPIC_ANSWER);
    let extra = format!(
        "\n[[gateway.upstreams]]\nname = \"bench-anthropic\"\nkind = \"anthropic\"\nbase_url = \"http://{}\"\ntimeout = \"10s\"\n\n[[gateway.models]]\nname = \"claude-bench\"\nupstream = \"bench-anthropic\"\nretries = 0\n",
        anthropic.addr
    );
    let (hypertool, api) = start_hypertool(http, dir, "dialects", chat_upstream, &extra).await;
    let pid = hypertool.0.id();
    let call = |name: &str, route: &str, body: String| {
        let body_file = dir.join(format!("{name}.json"));
        if let Err(e) = std::fs::write(&body_file, body) {
            panic!("body: {e}");
        }
        Call {
            url: format!("http://{api}{route}"),
            body_file,
            headers: vec!["anthropic-version: 2023-06-01".into()],
        }
    };
    let claude = |body: &str| body.replace("bench-model", "claude-bench");
    let paths: Vec<(&str, Call)> = vec![
        (
            "Chat Completions → OpenAI-compatible (as sent)",
            call("chat", "/v1/chat/completions", BODY.into()),
        ),
        (
            "Messages → OpenAI-compatible (translated)",
            call("messages", "/v1/messages", MESSAGES_BODY.into()),
        ),
        (
            "Responses → OpenAI-compatible (translated)",
            call("responses", "/v1/responses", RESPONSES_BODY.into()),
        ),
        (
            "Messages → Anthropic (as sent)",
            call("messages-native", "/v1/messages", claude(MESSAGES_BODY)),
        ),
        (
            "Chat Completions → Anthropic (translated)",
            call("chat-to-anthropic", "/v1/chat/completions", claude(BODY)),
        ),
        (
            "Responses → Anthropic (translated)",
            call(
                "responses-to-anthropic",
                "/v1/responses",
                claude(RESPONSES_BODY),
            ),
        ),
    ];
    for (name, c) in &paths {
        let warm = hey(c, 10, Some(200), 1);
        if warm.errors > 0 || warm.latencies_ms.is_empty() {
            panic!("{name}: {} errors in the warm-up", warm.errors);
        }
    }
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..3 {
        for (i, (_, c)) in paths.iter().enumerate() {
            cpu[i].push(cpu_per_call(c, &[pid], Some(2000), 4).0);
        }
    }
    let cpu: Vec<f64> = cpu.into_iter().map(median).collect();
    println!("CPU per call by dialect at 2,000/s (hypertool on its defaults; nginx's fixed answers; medians of 3 interleaved rounds):");
    println!("| path | CPU per call | against chat (target <= 1.15) |");
    println!("|---|---|---|");
    for (i, (name, _)) in paths.iter().enumerate() {
        println!("| {name} | {:.0} µs | {:.2} |", cpu[i], cpu[i] / cpu[0]);
    }
    drop(hypertool);
    drop(anthropic);
}
