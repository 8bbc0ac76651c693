//! The independent references of the gateway benchmark: Debian's `nginx` as the fixed-answer
//! upstream and as a zero-logic reverse proxy, `oha` and `hey` as load generators (processes of
//! their own, so the client's cost is nobody's), the CPU a process spends per call (from `/proc`),
//! and, when asked, LiteLLM's proxy from PyPI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Installs what is missing (`nginx`, `hey`) with apt, as the test script does for its tools.
pub fn ensure_tools() {
    let missing: Vec<&str> = [("nginx", "nginx"), ("hey", "hey")]
        .into_iter()
        .filter(|(bin, _)| !on_path(bin))
        .map(|(_, pkg)| pkg)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing);
    }
    // oha (crates.io) times each request to the nanosecond, where hey's CSV stops at 0.1 ms: the
    // latency targets are differences of about that size.
    if !on_path("oha") {
        let ok = Command::new("cargo")
            .args(["install", "oha", "--locked", "--quiet"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "could not install oha (cargo install oha --locked)");
    }
}

fn on_path(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn apt_install(missing: &[&str]) {
    let sudo = if unsafe { libc::geteuid() } == 0 {
        ""
    } else {
        "sudo "
    };
    let script = format!(
        "export DEBIAN_FRONTEND=noninteractive; {sudo}apt-get update -q && {sudo}apt-get install -y -q --no-install-recommends {}",
        missing.join(" ")
    );
    let ok = Command::new("sh")
        .args(["-c", &script])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "could not install {}", missing.join(", "));
}

/// A loopback address nobody listens on yet.
pub fn free_addr() -> SocketAddr {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a,
        Err(e) => panic!("no free port: {e}"),
    }
}

fn wait_listening(addr: SocketAddr, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process of the benchmark's, stopped when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    /// SIGTERM first (nginx's master stops its workers on it; SIGKILL would orphan them), then
    /// SIGKILL what is still there after 5 s.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child's pid, which we have not waited for yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One nginx with one worker process, as the reference measured it.
pub struct Nginx {
    /// Kept for its `Drop`: nginx stops with the benchmark.
    process: Process,
    pub addr: SocketAddr,
}

impl Nginx {
    fn start(dir: &Path, name: &str, upstream_block: &str, location: &str) -> Nginx {
        let home = dir.join(name);
        let _ = std::fs::create_dir_all(home.join("logs"));
        let addr = free_addr();
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;"
        } else {
            ""
        };
        let tmp = home.display();
        let conf = format!(
            "{user}
worker_processes 1;
daemon off;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
{upstream_block}
  server {{
    listen {addr} backlog=4096;
{location}
  }}
}}
"
        );
        let path = home.join("nginx.conf");
        if let Err(e) = std::fs::write(&path, conf) {
            panic!("{}: {e}", path.display());
        }
        let child = Command::new("nginx")
            .args([
                "-p",
                &home.display().to_string(),
                "-c",
                &path.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let process = match child {
            Ok(c) => Process(c),
            Err(e) => panic!("nginx: {e}"),
        };
        wait_listening(addr, "nginx");
        Nginx { process, addr }
    }

    /// The master's pid and its worker's: the processes whose CPU the proxy costs.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.process.0.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        std::iter::once(master)
            .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect()
    }

    /// Answers every chat call with `answer` (a fixed JSON body).
    pub fn upstream(dir: &Path, answer: &str) -> Nginx {
        let quoted = answer.replace('\\', "\\\\").replace('\'', "\\'");
        let location = format!(
            "    location / {{\n      default_type application/json;\n      return 200 '{quoted}';\n    }}"
        );
        Nginx::start(dir, "nginx-upstream", "", &location)
    }

    /// Passes everything to `to` over kept-alive connections, with no logic of its own.
    pub fn proxy(dir: &Path, to: SocketAddr) -> Nginx {
        let upstream = format!("  upstream model {{\n    server {to};\n    keepalive 256;\n  }}");
        let location = "    location / {\n      proxy_pass http://model;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering on;\n    }";
        Nginx::start(dir, "nginx-proxy", &upstream, location)
    }
}

/// What `hey` measured.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Latencies of the answered (2xx) requests, sorted, in milliseconds.
    pub latencies_ms: Vec<f64>,
    pub errors: usize,
    pub seconds: f64,
}

impl Run {
    pub fn quantile(&self, q: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_ms.len() as f64 - 1.0) * q).round() as usize;
        self.latencies_ms[i]
    }

    pub fn rate(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.seconds
    }
}

/// A chat call as the benchmark sends it.
pub struct Call {
    pub url: String,
    pub body_file: PathBuf,
    pub headers: Vec<String>,
}

/// `hey` with `workers` workers for `secs` seconds, at `rate` requests per second in all (`None`:
/// as fast as they can).
pub fn hey(call: &Call, workers: u32, rate: Option<u64>, secs: u64) -> Run {
    let mut cmd = Command::new("hey");
    cmd.args(["-z", &format!("{secs}s"), "-c", &workers.to_string()])
        .args([
            "-m",
            "POST",
            "-T",
            "application/json",
            "-o",
            "csv",
            "-t",
            "30",
        ])
        .arg("-D")
        .arg(&call.body_file);
    if let Some(r) = rate {
        // -q is per worker.
        let per_worker = (r as f64 / f64::from(workers)).max(1.0);
        cmd.args(["-q", &format!("{per_worker}")]);
    }
    // response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
    run_csv(
        cmd,
        call,
        "hey",
        secs,
        Csv {
            columns: 8,
            time: 0,
            status: 6,
        },
    )
}

/// Where a load generator's CSV (one line per request, after a header) keeps what we read.
struct Csv {
    columns: usize,
    /// Seconds from send to the whole answer.
    time: usize,
    status: usize,
}

/// Runs a load generator `cmd` against `call` (its headers and URL added here) and reads each
/// request's time from its CSV output; a line whose time or status cannot be read is an error.
fn run_csv(mut cmd: Command, call: &Call, what: &str, secs: u64, csv: Csv) -> Run {
    for h in &call.headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(&call.url);
    let out = match cmd.stdout(Stdio::piped()).stderr(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) => panic!("{what}: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = Run {
        seconds: secs as f64,
        ..Run::default()
    };
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').collect();
        if cols.len() < csv.columns {
            continue;
        }
        match (
            cols[csv.time].parse::<f64>(),
            cols[csv.status].parse::<u16>(),
        ) {
            (Ok(t), Ok(status)) if (200..300).contains(&status) => {
                run.latencies_ms.push(t * 1000.0)
            }
            _ => run.errors += 1,
        }
    }
    run.latencies_ms.sort_by(f64::total_cmp);
    run
}

/// `oha` with `connections` connections for `secs` seconds at `rate` requests per second in all:
/// each request's time, to the nanosecond (its CSV output).
pub fn oha(call: &Call, connections: u32, rate: u64, secs: u64) -> Run {
    let mut cmd = Command::new("oha");
    cmd.args(["-z", &format!("{secs}s"), "-c", &connections.to_string()])
        .args([
            "-q",
            &rate.to_string(),
            "--no-tui",
            "--output-format",
            "csv",
        ])
        .args(["-m", "POST", "-T", "application/json"])
        .arg("-D")
        .arg(&call.body_file);
    // request-start,DNS,DNS+dialup,Response-delay,request-duration,bytes,status
    run_csv(
        cmd,
        call,
        "oha",
        secs,
        Csv {
            columns: 7,
            time: 4,
            status: 6,
        },
    )
}

/// LiteLLM's master key, which the benchmark's calls to it present.
pub const LITELLM_KEY: &str = "sk-bench-0123456789abcdef0123456789abcdef";

/// LiteLLM's proxy (installed from PyPI into a virtualenv under `dir` when asked), with two
/// workers, routing `bench-model` to `upstream`.
pub fn litellm(dir: &Path, upstream: SocketAddr) -> Option<(Process, SocketAddr)> {
    let venv = dir.join("litellm-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&python)
                .args(["-m", "pip", "install", "-q", "litellm[proxy]"])
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            println!("LiteLLM: could not be installed from PyPI; skipped");
            return None;
        }
    }
    let config = dir.join("litellm.yaml");
    let text = format!(
        "model_list:\n  - model_name: bench-model\n    litellm_params:\n      model: openai/bench-model\n      api_base: http://{upstream}/v1\n      api_key: unused\n"
    );
    if std::fs::write(&config, text).is_err() {
        return None;
    }
    let addr = free_addr();
    let log_path = dir.join("litellm.log");
    let log = std::fs::File::create(&log_path).ok()?;
    let child = Command::new(venv.join("bin/litellm"))
        .args(["--config", &config.display().to_string()])
        .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--num_workers", "2"])
        // Recent releases refuse to start without a master key; the calls present it.
        .env("LITELLM_MASTER_KEY", LITELLM_KEY)
        // The price list ships with the package: no fetch from GitHub (retried for a minute here).
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .ok()?;
    let process = Process(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if start.elapsed() > Duration::from_secs(120) {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            println!("LiteLLM did not start within 120 s; skipped. The end of its log:");
            for line in tail.into_iter().rev() {
                println!("  {line}");
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Some((process, addr))
}

/// CPU time (user + system) used so far by each thread of `pids`, by thread name, in seconds.
pub fn cpu_by_thread(pids: &[u32]) -> std::collections::BTreeMap<String, f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut by_name = std::collections::BTreeMap::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ... ; comm may hold spaces, so split after the last ')'.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let name = stat[open + 1..close].trim().to_string();
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // After the comm: state is field 0, utime 11, stime 12.
            let used: f64 = [11, 12]
                .iter()
                .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
                .sum();
            *by_name.entry(name).or_insert(0.0) += used / ticks;
        }
    }
    by_name
}

/// CPU per answered call, in microseconds, of the processes `pids` while `hey` drives `call` at
/// `rate` for `secs` seconds (20 workers; `None`: 64 workers as fast as they can): total, and by
/// thread name (largest first).
pub fn cpu_per_call(
    call: &Call,
    pids: &[u32],
    rate: Option<u64>,
    secs: u64,
) -> (f64, Vec<(String, f64)>) {
    let before = cpu_by_thread(pids);
    let run = hey(call, if rate.is_some() { 20 } else { 64 }, rate, secs);
    let after = cpu_by_thread(pids);
    let calls = run.latencies_ms.len().max(1) as f64;
    let mut parts: Vec<(String, f64)> = after
        .iter()
        .map(|(name, t)| {
            let spent = t - before.get(name).copied().unwrap_or(0.0);
            (name.clone(), spent * 1e6 / calls)
        })
        .filter(|(_, us)| *us > 0.0)
        .collect();
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    (parts.iter().map(|p| p.1).sum(), parts)
}
