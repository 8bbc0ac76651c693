//! The `hypertool` binary as a user runs it: signals, busy ports, `check`, and the client commands.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_hypertool");

/// `hypertool serve` in a child process on ephemeral ports.
pub struct Daemon {
    child: Option<Child>,
    pub api: String,
    pub metrics: String,
}

impl Daemon {
    /// Starts the binary in `cwd` (no ./config there: built-in defaults) and waits for it to serve.
    pub fn spawn(cwd: &Path, extra: &[&str]) -> Daemon {
        let mut child = Command::new(BIN)
            .current_dir(cwd)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log_file = extra
            .iter()
            .position(|a| *a == "--log-file")
            .map(|i| cwd.join(extra[i + 1]));
        let (api, metrics) = match log_file {
            // JSON lines: wait for the "hypertool serving" record in the file.
            Some(path) => {
                let start = Instant::now();
                loop {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let found = text
                        .lines()
                        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                        .find(|v| v["fields"]["message"] == "hypertool serving");
                    if let Some(v) = found {
                        let f = |k: &str| format!("http://{}", v["fields"][k].as_str().unwrap());
                        break (f("api"), f("metrics"));
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "hypertool serve did not start"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            None => {
                let stderr = child.stderr.take().unwrap();
                let (tx, rx) = mpsc::channel();
                std::thread::spawn(move || {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        if line.contains("hypertool serving") {
                            let _ = tx.send(line);
                        }
                    }
                });
                let line = rx
                    .recv_timeout(Duration::from_secs(60))
                    .expect("hypertool serve did not start within 60 s");
                let field = |name: &str| {
                    let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
                    let rest = &line[start..];
                    let end = rest.find(' ').unwrap_or(rest.len());
                    format!("http://{}", &rest[..end])
                };
                (field("api"), field("metrics"))
            }
        };
        Daemon {
            api,
            metrics,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Waits for the process to exit, with a deadline.
    pub fn wait_exit(mut self, deadline: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                panic!("hypertool did not exit within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("hypertool.log");
    // Logs go to stderr until the address is known; the JSON log file is checked separately.
    let daemon = Daemon::spawn(dir.path(), &["--data-dir", data.to_str().unwrap()]);
    let http = reqwest::Client::new();
    let events: Vec<_> = (0..50)
        .map(|_| usage("backend-engineer", "c", "m", 1, 1))
        .collect();
    let resp = http
        .post(format!("{}/v1/events", daemon.api))
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let metrics = http
        .get(format!("{}/metrics", daemon.metrics))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("hypertool_persona_tokens_used_total{persona=\"backend-engineer\",chatmode=\"c\",model=\"m\"} 100"));
    let status = Command::new("kill")
        .args(["-TERM", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || daemon.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let conn = rusqlite::Connection::open(data.join("hypertool.db")).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 50);

    // --log-file writes JSON lines.
    let daemon = Daemon::spawn(
        dir.path(),
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--log-file",
            log.to_str().unwrap(),
        ],
    );
    Command::new("kill")
        .args(["-TERM", &daemon.pid().to_string()])
        .status()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || daemon.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The shutdown wrote a snapshot after the 50 events: the restart loaded it and replayed none.
    assert!(
        lines.iter().any(|l| l["fields"]["message"]
            == "state loaded from a snapshot; the events after it replayed"
            && l["fields"]["snapshot_seq"] == 50
            && l["fields"]["events"] == 0),
        "{text}"
    );
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "ledger flushed; stopped"));
}

#[test]
fn a_busy_port_is_a_one_line_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--data-dir", dir.path().join("d").to_str().unwrap()])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(&format!("port {port} is already in use")),
        "{stderr}"
    );
    assert!(errors[0].contains("--metrics-listen"), "{stderr}");
}

/// `hypertool check --config TOML`.
fn check(toml: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["check", "--config", toml.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn check_reports_file_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config_copy(dir.path());
    let ok = Command::new(BIN)
        .args(["check", "--config", toml.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout)
        .contains("ok (6 personas, 6 budgets, 3 workflows, 3 chatmodes)"));

    let budgets = toml.parent().unwrap().join("budgets.yml");
    std::fs::write(
        &budgets,
        "personas:\n  backend-engineer:\n    tokens: 10\n    period: fortnightly\n",
    )
    .unwrap();
    let out = check(&toml);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("budgets.yml:4:"), "{stderr}");
    assert!(
        stderr.contains("fortnightly") && stderr.contains("fix:"),
        "{stderr}"
    );

    std::fs::write(
        &budgets,
        "personas:\n  backend-engineer:\n    tokens: 10\n  ghost:\n    tokens: 5\n",
    )
    .unwrap();
    let out = check(&toml);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("budgets.yml:4: budget for unknown persona `ghost`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("fix: use one of: backend-engineer"),
        "{stderr}"
    );

    let persona = toml.parent().unwrap().join("personas/broken.json");
    std::fs::write(
        &persona,
        "{\n  \"name\": \"x\",\n  \"tokenBudget\": \"lots\"\n}\n",
    )
    .unwrap();
    let out = check(&toml);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken.json:3:"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_talk_to_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    s.post_events(json!([usage("backend-engineer", "c", "m", 100, 0)]))
        .await;
    let api = s.api.clone();
    let run = move |args: Vec<&'static str>| {
        let api = api.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new(BIN)
                    .args(&args)
                    .args(["--server", &api])
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = run(vec!["personas", "list"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("backend-engineer") && l.contains("1900")),
        "{table}"
    );

    let out = run(vec![
        "budget",
        "set",
        "backend-engineer",
        "--tokens",
        "50",
        "--mode",
        "block",
        "--json",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["remaining_tokens"], -50);
    assert_eq!(v["mode"], "block");

    let out = run(vec!["budget", "reset", "backend-engineer", "--json"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["remaining_tokens"], 50);

    let out = run(vec!["budget", "status", "--json"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["budgets"].as_array().unwrap().len(), 6);

    let out = run(vec!["budget", "set", "nobody", "--tokens", "5"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown persona `nobody`"));
    s.stop().await;

    let out = Command::new(BIN)
        .args(["personas", "list", "--server", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach hypertool"));
}

/// `deploy/systemd/hypertool.service`: what the issue asks of it, `systemd-analyze verify` finds
/// nothing to say, and its two commands work as written (paths swapped for a temporary install).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_unit_verifies_and_its_commands_check_and_serve() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(repo.join("deploy/systemd/hypertool.service")).unwrap();
    let value = |key: &str| -> String {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("the unit has no {key}="))
            .to_string()
    };
    assert_eq!(value("Restart"), "on-failure");
    assert_eq!(value("User"), "hypertool");
    assert_eq!(
        value("StateDirectory"),
        "hypertool",
        "data in /var/lib/hypertool"
    );
    assert_eq!(value("StandardError"), "journal");
    assert!(value("ExecStartPre").contains("hypertool check --config"));
    let timeout: u64 = value("TimeoutStopSec").parse().unwrap();
    assert!(timeout > 10, "longer than the default shutdown grace");

    let dir = tempfile::tempdir().unwrap();
    let toml = config_copy(dir.path());
    let state = dir.path().join("var-lib-hypertool");
    let local = |line: String| -> Vec<String> {
        line.replace("/etc/hypertool/hypertool.toml", toml.to_str().unwrap())
            .replace("/var/lib/hypertool", state.to_str().unwrap())
            .split_whitespace()
            .skip(1) // the binary
            .map(String::from)
            .collect()
    };

    if let Ok(out) = Command::new("systemd-analyze").arg("--version").output() {
        if out.status.success() {
            let copy = dir.path().join("hypertool.service");
            std::fs::write(&copy, unit.replace("/usr/local/bin/hypertool", BIN)).unwrap();
            let out = Command::new("systemd-analyze")
                .arg("verify")
                .arg(&copy)
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && said.trim().is_empty(), "{said}");
        }
    }

    let check = Command::new(BIN)
        .args(local(value("ExecStartPre")))
        .output()
        .unwrap();
    assert!(check.status.success(), "{:?}", check);
    let args = local(value("ExecStart"));
    let args: Vec<&str> = args.iter().map(String::as_str).skip(1).collect();
    let daemon = Daemon::spawn(dir.path(), &args);
    let ready = reqwest::get(format!("{}/readyz", daemon.api))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(
        state.join("hypertool.db").exists(),
        "the ledger is in the state directory"
    );
    daemon.kill9();
}
