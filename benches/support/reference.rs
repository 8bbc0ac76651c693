//! The independent references of the gateway benchmark: Debian's `nginx` as the fixed-answer
//! upstream and as a zero-logic reverse proxy, `hey` as the load generator (a process of its own,
//! so the client's cost is nobody's), and, when asked, LiteLLM's proxy from PyPI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Installs what is missing (`nginx`, `hey`) with apt, as the test script does for its tools.
pub fn ensure_tools() {
    let missing: Vec<&str> = [("nginx", "nginx"), ("hey", "hey")]
        .into_iter()
        .filter(|(bin, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return;
    }
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

fn free_addr() -> SocketAddr {
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
    _process: Process,
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
        Nginx {
            _process: process,
            addr,
        }
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
    for h in &call.headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(&call.url);
    let out = match cmd.stdout(Stdio::piped()).stderr(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) => panic!("hey: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut run = Run {
        seconds: secs as f64,
        ..Run::default()
    };
    // response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').collect();
        if cols.len() < 8 {
            continue;
        }
        let (Ok(t), Ok(status)) = (cols[0].parse::<f64>(), cols[6].parse::<u16>()) else {
            continue;
        };
        if (200..300).contains(&status) {
            run.latencies_ms.push(t * 1000.0);
        } else {
            run.errors += 1;
        }
    }
    run.latencies_ms.sort_by(f64::total_cmp);
    run
}

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
    let child = Command::new(venv.join("bin/litellm"))
        .args(["--config", &config.display().to_string()])
        .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--num_workers", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let process = Process(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if start.elapsed() > Duration::from_secs(120) {
            println!("LiteLLM did not start within 120 s; skipped");
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Some((process, addr))
}
