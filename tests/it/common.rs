//! Helpers shared by the integration tests: an in-process server on ephemeral ports with a manual
//! clock, a tiny exposition parser, and polling with a deadline (never a bare sleep).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypertool::config::Source;
use hypertool::core::clock::{Clock, ManualClock};
use hypertool::server::{self, Running, ServeOptions};
use serde_json::Value;

/// 2026-11-28T09:00:00Z, a Saturday.
pub const T0: i64 = 1_795_856_400_000;

pub struct TestServer {
    pub running: Option<Running>,
    pub api: String,
    pub metrics: String,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
}

pub async fn start(source: Source, data_dir: &Path, clock: Arc<ManualClock>) -> TestServer {
    let running = server::start(
        ServeOptions {
            config: source,
            data_dir: data_dir.to_path_buf(),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            mcp_servers: None,
        },
        clock.clone() as Arc<dyn Clock>,
    )
    .await
    .unwrap_or_else(|e| panic!("server did not start: {e}"));
    TestServer {
        api: format!("http://{}", running.api_addr),
        metrics: format!("http://{}", running.metrics_addr),
        running: Some(running),
        clock,
        http: reqwest::Client::new(),
    }
}

/// A server on the built-in defaults with a fresh ledger at T0.
pub async fn start_default(data_dir: &Path) -> TestServer {
    start(Source::Embedded, data_dir, Arc::new(ManualClock::new(T0))).await
}

impl TestServer {
    pub async fn post_events(&self, events: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/v1/events", self.api))
            .json(&serde_json::json!({ "events": events }))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{}", self.api, path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{}", self.api, path))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `GET path` on the API, with `key` as the bearer token when given.
    pub async fn get_as(&self, path: &str, key: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{}", self.api, path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().await.unwrap()
    }

    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> Exposition {
        Exposition::parse(&self.metrics_text().await)
    }

    /// What the ledger holds (counted by the writer, after everything queued before this call).
    pub async fn ledger_totals(&self) -> hypertool::store::LedgerTotals {
        self.running
            .as_ref()
            .unwrap()
            .state
            .writer
            .totals()
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// A server a test did not stop (an assertion failed first) is told to drain, not left serving.
impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.request_shutdown();
        }
    }
}

/// A child process killed and reaped when dropped: a failed assertion must not leave a
/// `hypertool serve` (or anything else) running.
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Successful configuration reloads so far: a test that edits a file waits for this to grow.
pub fn reloads(m: &Exposition) -> f64 {
    m.get("hypertool_config_reloads_total", &[("result", "success")])
        .unwrap_or(0.0)
}

/// One sample of the classic text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Debug, Clone)]
pub struct Exposition {
    pub samples: Vec<Sample>,
}

impl Exposition {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(parse_sample)
            .collect();
        Self { samples }
    }

    /// The value of the one sample with exactly these labels (order-insensitive).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
    }

    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// The sum of `name` over the samples whose `label` is `value`.
    pub fn sum_where(&self, name: &str, label: &str, value: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.labels.iter().any(|(k, v)| k == label && v == value))
            .map(|s| s.value)
            .sum()
    }

    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

fn parse_sample(line: &str) -> Sample {
    let (head, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("bad line {line}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
    };
    let Some((name, rest)) = head.split_once('{') else {
        return Sample {
            name: head.to_string(),
            labels: vec![],
            value,
        };
    };
    let body = rest
        .strip_suffix('}')
        .unwrap_or_else(|| panic!("bad labels in {line}"));
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "{line}");
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(o) => val.push(o),
                    None => panic!("{line}"),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        labels.push((key, val));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The API and metrics URLs of a `hypertool serve` that logs JSON lines to `log`, once it serves.
pub async fn serving_at(log: &Path) -> (String, String) {
    eventually("the server", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["fields"]["message"] == "hypertool serving")
            .map(|v| {
                let f = |k: &str| format!("http://{}", v["fields"][k].as_str().unwrap());
                (f("api"), f("metrics"))
            });
        async move { found }
    })
    .await
}

/// A copy of the repository's `config/` in a temporary directory, to edit freely.
pub fn config_copy(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let dest = dir.join("config");
    std::fs::create_dir_all(&dest).unwrap();
    for f in ["hypertool.toml", "budgets.yml", "chatmodes.yml"] {
        std::fs::copy(root.join(f), dest.join(f)).unwrap();
    }
    for sub in ["personas", "workflows"] {
        std::fs::create_dir_all(dest.join(sub)).unwrap();
        for e in std::fs::read_dir(root.join(sub)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dest.join(sub).join(p.file_name().unwrap())).unwrap();
        }
    }
    dest.join("hypertool.toml")
}

/// A server on a copy of the repository's configuration with each `(from, to)` text replaced in
/// `hypertool.toml` (each `from` must be there, so a changed default cannot silently void a test),
/// a fresh ledger under `dir`, at T0.
pub async fn start_edited(dir: &Path, edits: &[(&str, &str)]) -> TestServer {
    let toml = config_copy(dir);
    let mut text = std::fs::read_to_string(&toml).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "hypertool.toml has no `{from}`");
        text = text.replace(from, to);
    }
    std::fs::write(&toml, text).unwrap();
    start(
        Source::File(toml),
        &dir.join("data"),
        Arc::new(ManualClock::new(T0)),
    )
    .await
}

pub fn usage(persona: &str, chatmode: &str, model: &str, prompt: u64, completion: u64) -> Value {
    serde_json::json!({
        "type": "usage", "persona": persona, "chatmode": chatmode, "model": model,
        "prompt_tokens": prompt, "completion_tokens": completion
    })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when the test ends, however it ends.
pub struct Service(pub std::process::Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(program: &str, args: &[&str], cwd: &Path) -> Service {
    let child = std::process::Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} ({e}): scripts/test.sh installs it"));
    Service(child)
}

/// `tests/fixtures/fake_upstream.py` on an ephemeral loopback port.
pub struct FakeUpstream {
    _process: Service,
    pub base_url: String,
}

impl FakeUpstream {
    pub async fn start(dir: &Path) -> FakeUpstream {
        Self::start_with(dir, false).await
    }

    /// The same upstream over HTTPS, with a certificate of the test CA (`tests/fixtures/tls`).
    pub async fn start_tls(dir: &Path) -> FakeUpstream {
        Self::start_with(dir, true).await
    }

    async fn start_with(dir: &Path, tls: bool) -> FakeUpstream {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let script = fixtures.join("fake_upstream.py");
        let port_file = dir.join(if tls {
            "fake-upstream-tls.port"
        } else {
            "fake-upstream.port"
        });
        let mut args = vec![
            script.to_str().unwrap().to_string(),
            port_file.to_str().unwrap().to_string(),
        ];
        if tls {
            for f in ["tls/upstream.pem", "tls/upstream.key"] {
                args.push(fixtures.join(f).to_str().unwrap().to_string());
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = spawn("python3", &args, dir);
        let port = eventually(
            "the fake upstream to listen",
            Duration::from_secs(20),
            || {
                let p = std::fs::read_to_string(&port_file).ok();
                async move { p }
            },
        )
        .await;
        let scheme = if tls { "https" } else { "http" };
        FakeUpstream {
            _process: process,
            base_url: format!("{scheme}://127.0.0.1:{}/v1", port.trim()),
        }
    }

    pub async fn stats(&self) -> Value {
        let url = format!("{}/stats", self.base_url.trim_end_matches("/v1"));
        let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls/test-ca.pem");
        let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
        let http = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap();
        http.get(url).send().await.unwrap().json().await.unwrap()
    }
}

/// hypertool.toml text (the repository's, plus `extra` appended) routing the fake upstream's models.
pub fn gateway_config(dir: &Path, upstream_url: &str, extra: &str) -> PathBuf {
    let toml = config_copy(dir);
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str(&format!(
        "\n[[gateway.upstreams]]\nname = \"fake\"\nbase_url = \"{upstream_url}\"\napi_key_env = \"HYPERTOOL_TEST_UPSTREAM_KEY\"\ntimeout = \"10s\"\n"
    ));
    for model in [
        "ok",
        "no-usage",
        "fail-500",
        "rate-limit",
        "bad-json",
        "cut-stream",
        "slow-stream",
        "long-run",
        "leak-key",
        "flaky",
        "weak",
        "strong",
        "improves",
    ] {
        text.push_str(&format!(
            "\n[[gateway.models]]\nname = \"{model}\"\nupstream = \"fake\"\n"
        ));
    }
    text.push_str("\n[[gateway.models]]\nname = \"hang\"\nupstream = \"fake\"\ntimeout = \"1s\"\n");
    text.push_str(&format!(
        "\n[[gateway.upstreams]]\nname = \"dead\"\nbase_url = \"http://127.0.0.1:{}/v1\"\n\n[[gateway.models]]\nname = \"refused\"\nupstream = \"dead\"\n",
        free_port()
    ));
    text.push_str(extra);
    std::fs::write(&toml, text).unwrap();
    toml
}

/// Waits until the ledger holds `tokens` tokens: the gateway answers first and stores the usage
/// right after, so a test that has its answers may still have to wait a moment for the ledger.
pub async fn settled(s: &TestServer, tokens: u64) {
    let writer = s.running.as_ref().unwrap().state.writer.clone();
    eventually(
        &format!("{tokens} tokens in the ledger"),
        Duration::from_secs(10),
        || {
            let writer = writer.clone();
            async move {
                writer
                    .totals()
                    .await
                    .ok()
                    .filter(|t| t.tokens == tokens)
                    .map(|_| ())
            }
        },
    )
    .await;
}

/// A PostgreSQL server of the test's own (Debian's `postgresql`, installed by scripts/test.sh), on
/// loopback, its data in a temporary directory; stopped when dropped.
pub struct Postgres {
    pub url: String,
    /// Over the Unix socket (trusted, no TLS): for the test's own readiness checks and queries,
    /// whatever the TCP side demands.
    admin: String,
    data: PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl Postgres {
    fn bin(tool: &str) -> PathBuf {
        let root = Path::new("/usr/lib/postgresql");
        let newest = std::fs::read_dir(root)
            .unwrap_or_else(|e| {
                panic!(
                    "no {} ({e}): scripts/test.sh installs postgresql",
                    root.display()
                )
            })
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .max()
            .expect("a PostgreSQL version under /usr/lib/postgresql");
        root.join(newest.to_string()).join("bin").join(tool)
    }

    /// As the `postgres` user when running as root (PostgreSQL refuses to run as root).
    fn command(tool: &str) -> std::process::Command {
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(Self::bin(tool));
            c
        } else {
            std::process::Command::new(Self::bin(tool))
        }
    }

    pub async fn start(dir: &Path) -> Postgres {
        Self::start_with(dir, None).await
    }

    /// A PostgreSQL that speaks TLS only over TCP (`ssl = on`, `hostssl` lines alone in
    /// pg_hba.conf), with `cert_pem`/`key_pem` as its certificate; `url` asks for no TLS mode.
    pub async fn start_tls(dir: &Path, cert_pem: &str, key_pem: &str) -> Postgres {
        Self::start_with(dir, Some((cert_pem, key_pem))).await
    }

    async fn start_with(dir: &Path, tls: Option<(&str, &str)>) -> Postgres {
        let home = dir.join("pg");
        std::fs::create_dir_all(&home).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            // The postgres user must reach its directory through the test's private temp dir.
            let mut p = home.clone();
            while p != Path::new("/") && p.starts_with(std::env::temp_dir()) {
                let _ = std::process::Command::new("chmod")
                    .arg("o+x")
                    .arg(&p)
                    .status();
                if !p.pop() {
                    break;
                }
            }
            let ok = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&home)
                .status()
                .unwrap();
            assert!(ok.success(), "chown postgres {}", home.display());
        }
        let data = home.join("data");
        let out = Self::command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "hypertool",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some((cert, key)) = tls {
            let owned = |name: &str, text: &str, mode: u32| {
                let path = data.join(name);
                std::fs::write(&path, text).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
                if unsafe { libc::geteuid() } == 0 {
                    let ok = std::process::Command::new("chown")
                        .args(["postgres:postgres"])
                        .arg(&path)
                        .status()
                        .unwrap();
                    assert!(ok.success());
                }
            };
            owned("server.crt", cert, 0o644);
            owned("server.key", key, 0o600);
            owned(
                "pg_hba.conf",
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
                0o600,
            );
            let conf = data.join("postgresql.conf");
            let mut text = std::fs::read_to_string(&conf).unwrap();
            text.push_str(
                "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            );
            std::fs::write(&conf, text).unwrap();
        }
        let port = free_port();
        let mut pg = Postgres {
            url: format!("postgres://hypertool@127.0.0.1:{port}/postgres"),
            admin: format!(
                "host={} port={port} user=hypertool dbname=postgres",
                home.display()
            ),
            data,
            port,
            child: None,
        };
        pg.run().await;
        pg
    }

    async fn run(&mut self) {
        let child = Self::command("postgres")
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.data.parent().unwrap())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        eventually(
            "PostgreSQL to accept connections",
            Duration::from_secs(30),
            || async move {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        // Accepting TCP is not yet accepting queries.
        let url = self.admin.clone();
        eventually("PostgreSQL to answer", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    postgres::Client::connect(&url, postgres::NoTls)
                        .and_then(|mut c| c.simple_query("SELECT 1"))
                        .ok()
                        .map(|_| ())
                })
                .await
                .unwrap()
            }
        })
        .await;
    }

    /// A fast shutdown (SIGINT: connections are cut, everything committed is kept), and back.
    pub async fn restart(&mut self) {
        self.stop();
        self.run().await;
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // pg_ctl signals the postmaster itself (runuser, the child here, forwards nothing).
            let _ = Self::command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "-t", "30", "stop"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A SQL query's rows, for the test to read the ledger directly.
    pub fn query(&self, sql: &str) -> Vec<postgres::Row> {
        // The synchronous client runs a runtime of its own: not on an async worker's thread.
        tokio::task::block_in_place(|| {
            let mut c = postgres::Client::connect(&self.admin, postgres::NoTls).unwrap();
            c.query(sql, &[]).unwrap()
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis server of the test's own (Debian's `redis-server`, installed by scripts/test.sh), on
/// loopback, nothing persisted; stopped when dropped.
pub struct Redis {
    pub url: String,
    port: u16,
    dir: PathBuf,
    /// TLS only: the certificate and key files the server presents (`rediss://`).
    tls: Option<(PathBuf, PathBuf)>,
    child: Option<std::process::Child>,
}

impl Redis {
    pub async fn start(dir: &Path) -> Redis {
        let mut r = Redis {
            port: free_port(),
            url: String::new(),
            dir: dir.to_path_buf(),
            tls: None,
            child: None,
        };
        r.url = format!("redis://127.0.0.1:{}/0", r.port);
        r.run().await;
        r
    }

    /// A Redis that speaks TLS only (`--tls-port`, no plain port), presenting `cert_pem`;
    /// `url` is `rediss://localhost:PORT/0`.
    pub async fn start_tls(dir: &Path, cert_pem: &str, key_pem: &str) -> Redis {
        let (cert, key) = (dir.join("redis.crt"), dir.join("redis.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        let mut r = Redis {
            port: free_port(),
            url: String::new(),
            dir: dir.to_path_buf(),
            tls: Some((cert, key)),
            child: None,
        };
        r.url = format!("rediss://localhost:{}/0", r.port);
        r.run().await;
        r
    }

    async fn run(&mut self) {
        let mut command = std::process::Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): scripts/test.sh installs it")
            });
        self.child = Some(child);
        let port = self.port;
        eventually("Redis to listen", Duration::from_secs(20), || async move {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        })
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.run().await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The ledger's events of one kind, oldest first (the SQLite ledger in `dir/data`).
pub fn ledger_events(dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    let conn = rusqlite::Connection::open(dir.join("data/hypertool.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT body FROM events WHERE kind = ?1 ORDER BY seq")
        .unwrap();
    let rows = stmt.query_map([kind], |r| r.get::<_, String>(0)).unwrap();
    rows.map(|r| serde_json::from_str(&r.unwrap()).unwrap())
        .collect()
}

/// A git repository at `dir` (created) with one commit of a README: for the git MCP server.
pub fn git_repo(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    std::fs::write(dir.join("README"), "hello\n").unwrap();
    git(&["add", "README"]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "commit",
        "-qm",
        "first",
    ]);
}

/// A server on the repository's configuration (with the fake upstream's models when given) whose personas' budgets enforce (`block`, too large to refuse): admission counts every
/// prompt with the tokenizer, as the probe's calls were counted.
/// `edits` are `(from, to)` replacements in `hypertool.toml`, as for [`start_edited`].
pub async fn enforcing_server(
    dir: &Path,
    upstream: Option<&FakeUpstream>,
    edits: &[(&str, &str)],
) -> TestServer {
    let toml = match upstream {
        Some(u) => gateway_config(dir, &u.base_url, ""),
        None => config_copy(dir),
    };
    let mut text = std::fs::read_to_string(&toml).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "hypertool.toml has no `{from}`");
        text = text.replace(from, to);
    }
    std::fs::write(&toml, text).unwrap();
    let budgets = toml.with_file_name("budgets.yml");
    let text = std::fs::read_to_string(&budgets).unwrap();
    assert!(text.contains("mode: observe") && text.contains("tokens: 2000"));
    let text: String = text
        .replace("mode: observe", "mode: block")
        .lines()
        .map(|l| match l.split_once("tokens: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}tokens: 100000000\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&budgets, text).unwrap();
    let clock = Arc::new(ManualClock::new(
        hypertool::core::clock::SystemClock.now_ms(),
    ));
    start(Source::File(toml), &dir.join("data"), clock).await
}
