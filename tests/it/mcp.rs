//! `hypertool mcp` driven by the official MCP Python SDK over stdio, in front of real downstream
//! servers: mcp-server-time and mcp-server-git (PyPI) and @modelcontextprotocol/server-everything
//! (npm), all installed by `scripts/test.sh`. The client's view is asserted by
//! `tests/fixtures/mcp_client.py`; the metrics and the ledger are asserted here.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use hypertool::core::clock::Clock;

use crate::common::{free_port, start, Exposition};

/// Where `scripts/test.sh` installs @modelcontextprotocol/server-everything.
fn server_everything() -> PathBuf {
    let path = std::env::var("HYPERTOOL_TEST_SERVER_EVERYTHING")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(
                "target/mcp-node/node_modules/@modelcontextprotocol/server-everything/dist/index.js",
            )
        });
    assert!(
        path.is_file(),
        "{} is missing: scripts/test.sh installs it (npm install --prefix target/mcp-node @modelcontextprotocol/server-everything)",
        path.display()
    );
    path
}

fn persona(name: &str, servers: &[&str], tools: Value) -> String {
    json!({
        "name": name,
        "displayName": name,
        "description": format!("{name}, for the MCP proxy test"),
        "allowedServers": servers,
        "allowedTools": tools,
    })
    .to_string()
}

/// A configuration with two personas and the three downstream servers; a git repository for
/// mcp-server-git. Returns (hypertool.toml, the repository).
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    setup_with(
        dir,
        json!({"command": "node", "args": [server_everything().to_str().unwrap(), "stdio"]}),
    )
}

/// server-everything over streamable HTTP on a free loopback port (killed when dropped), and
/// the `.mcp.json` entry that reaches it (a header from the environment, as secrets are given).
fn everything_over_http() -> (crate::common::Service, Value) {
    let port = free_port();
    let child = std::process::Command::new("node")
        .arg(server_everything())
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let service = crate::common::Service(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "server-everything did not listen on {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let entry = json!({
        "type": "http",
        "url": format!("http://127.0.0.1:{port}/mcp"),
        "headers": {"X-Hypertool-Test": "${HYPERTOOL_TEST_MCP_HEADER:-from-the-default}"},
    });
    (service, entry)
}

fn setup_with(dir: &Path, everything: Value) -> (PathBuf, PathBuf) {
    let config = dir.join("config");
    std::fs::create_dir_all(config.join("personas")).unwrap();
    std::fs::write(
        config.join("personas/timekeeper.json"),
        persona("timekeeper", &["time"], json!({"time": ["get_*"]})),
    )
    .unwrap();
    std::fs::write(
        config.join("personas/archivist.json"),
        persona(
            "archivist",
            &["git", "everything"],
            json!({"everything": ["echo", "get-tiny-*"]}),
        ),
    )
    .unwrap();
    let repo = dir.join("repo");
    crate::common::git_repo(&repo);
    std::fs::write(
        config.join("mcp.json"),
        json!({"mcpServers": {
            "time": {"command": "python3", "args": ["-m", "mcp_server_time", "--local-timezone=UTC"]},
            "git": {"command": "python3", "args": ["-m", "mcp_server_git", "--repository", repo.to_str().unwrap()]},
            "everything": everything,
        }})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        config.join("hypertool.toml"),
        "[personas]\ndir = \"personas\"\n\n[switching]\ncooldown_seconds = 600\n\n[mcp]\nservers = \"mcp.json\"\n",
    )
    .unwrap();
    (config.join("hypertool.toml"), repo)
}

pub(crate) fn run_client(dir: &Path, scenario: Value) -> Vec<Value> {
    let path = dir.join(format!(
        "scenario-{}.json",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(&path, scenario.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mcp_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the MCP client failed (pip install mcp mcp-server-time mcp-server-git; scripts/test.sh does):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub(crate) fn env_for_children() -> Value {
    let mut env = serde_json::Map::new();
    for k in ["PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV"] {
        if let Ok(v) = std::env::var(k) {
            env.insert(k.into(), json!(v));
        }
    }
    env.insert("RUST_LOG".into(), json!("info,rmcp=warn"));
    Value::Object(env)
}

#[test]
fn a_stdio_session_sees_its_personas_tools_switches_under_the_policy_and_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    // time and git over stdio, everything over streamable HTTP.
    let (_everything, entry) = everything_over_http();
    let (config, repo) = setup_with(dir.path(), entry);
    let data = dir.path().join("data");
    let metrics_port = free_port();
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let steps = run_client(
        dir.path(),
        json!({
            "mode": "stdio",
            "command": [
                env!("CARGO_BIN_EXE_hypertool"), "mcp",
                "--config", config, "--data-dir", data,
                "--persona", "timekeeper", "--session", "mcp-test-session",
                "--metrics-listen", format!("127.0.0.1:{metrics_port}"),
            ],
            "env": env_for_children(),
            "repo": repo,
            "git_server_marker": format!("mcp_server_git --repository {}", repo.display()),
            "metrics": metrics,
            "last_call_line": "hypertool_mcp_tool_calls_total{persona=\"archivist\",server=\"git\",tool=\"git_status\",result=\"ok\"} 2",
        }),
    );
    let body = steps
        .iter()
        .find(|s| s["step"] == "metrics")
        .and_then(|s| s["body"].as_str())
        .unwrap();
    let m = Exposition::parse(body);
    let calls = |persona: &str, server: &str, tool: &str, result: &str| {
        m.get(
            "hypertool_mcp_tool_calls_total",
            &[
                ("persona", persona),
                ("server", server),
                ("tool", tool),
                ("result", result),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(calls("timekeeper", "time", "get_current_time", "ok"), 1.0);
    assert_eq!(calls("timekeeper", "git", "git_status", "refused"), 1.0);
    assert_eq!(calls("timekeeper", "time", "convert_time", "refused"), 1.0);
    assert_eq!(calls("timekeeper", "unknown", "nosuch", "refused"), 1.0);
    // A name no label may carry (a newline, 300 bytes) is counted, as `invalid`.
    assert_eq!(calls("timekeeper", "unknown", "invalid", "refused"), 1.0);
    assert_eq!(calls("archivist", "everything", "echo", "ok"), 1.0);
    assert_eq!(calls("timekeeper", "hypertool", "equip-persona", "ok"), 1.0);
    assert_eq!(
        calls("archivist", "hypertool", "equip-persona", "error"),
        1.0
    );
    // Before the crash and after the restart (calls while it was down are errors, as many as
    // the client's polls found it down).
    assert_eq!(calls("archivist", "git", "git_status", "ok"), 2.0);
    assert_eq!(
        m.get(
            "hypertool_mcp_tool_call_duration_seconds_count",
            &[
                ("persona", "timekeeper"),
                ("server", "time"),
                ("tool", "get_current_time")
            ]
        ),
        Some(1.0)
    );
    let switch = |from: &str, to: &str| {
        m.get(
            "hypertool_persona_switches_total",
            &[
                ("from_persona", from),
                ("to_persona", to),
                ("chatmode", "default"),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        switch("none", "timekeeper"),
        1.0,
        "the persona given at the start"
    );
    assert_eq!(switch("timekeeper", "archivist"), 1.0);
    assert_eq!(switch("archivist", "timekeeper"), 0.0);
    // The time spent as timekeeper, observed when the session left it.
    assert_eq!(
        m.get(
            "hypertool_persona_duration_seconds_count",
            &[("persona", "timekeeper"), ("chatmode", "default")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "hypertool_persona_switches_suppressed_total",
            &[("chatmode", "default"), ("reason", "cooldown")]
        ),
        Some(1.0)
    );

    // The ledger holds every call and switch of the session (the process has exited: durable).
    let db = rusqlite::Connection::open(data.join("hypertool.db")).unwrap();
    let kinds: Vec<(String, i64)> = db
        .prepare("SELECT kind, COUNT(*) FROM events GROUP BY kind ORDER BY kind")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let count = |k: &str| kinds.iter().find(|(n, _)| n == k).map_or(0, |(_, c)| *c);
    assert_eq!(count("persona_switch"), 2, "{kinds:?}");
    assert_eq!(count("switch_suppressed"), 1, "{kinds:?}");
    let tool_calls = m.sum("hypertool_mcp_tool_calls_total") as i64;
    assert_eq!(count("mcp_tool_call"), tool_calls, "{kinds:?}");
    let sessions: Vec<String> = db
        .prepare("SELECT DISTINCT json_extract(body, '$.session') FROM events WHERE kind = 'mcp_tool_call'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(sessions, ["mcp-test-session"]);
}

const ADMIN_KEY: &str = "ht-mcp-admin-key-REAL-LOOKING-51c0ffee";
const TIMEKEEPER_KEY: &str = "ht-mcp-timekeeper-REAL-LOOKING-2bd4a9";

/// `hypertool serve` with keys: `/mcp` over streamable HTTP, and `hypertool mcp --server` beside
/// it, each opened with timekeeper's persona key — its tools, never another persona's, and every
/// call in the server's metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persona_key_sees_only_its_personas_tools_over_http_and_beside_a_server() {
    // Names used by no other test: set before the server reads them.
    std::env::set_var("HYPERTOOL_TEST_MCP_ADMIN", ADMIN_KEY);
    std::env::set_var("HYPERTOOL_TEST_MCP_TIMEKEEPER", TIMEKEEPER_KEY);
    let dir = tempfile::tempdir().unwrap();
    let (config, _repo) = setup(dir.path());
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(
        "\n[[server.admin_keys]]\nkey_env = \"HYPERTOOL_TEST_MCP_ADMIN\"\n\n[[gateway.keys]]\nkey_env = \"HYPERTOOL_TEST_MCP_TIMEKEEPER\"\npersona = \"timekeeper\"\n",
    );
    std::fs::write(&config, toml).unwrap();
    let s = start(
        hypertool::config::Source::File(config.clone()),
        &dir.path().join("data"),
        // The real time: `hypertool mcp --server` stamps its events with the system clock, and the
        // events API refuses timestamps in the future.
        std::sync::Arc::new(hypertool::core::clock::ManualClock::new(
            hypertool::core::clock::SystemClock.now_ms(),
        )),
    )
    .await;

    // The door: no key, no session.
    let anonymous = s
        .http
        .post(format!("{}/mcp", s.api))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    // The downstream servers are up before the clients look (readiness names them).
    crate::common::eventually(
        "the MCP servers ready",
        std::time::Duration::from_secs(30),
        || async {
            let (_, body) = s.get_json("/readyz").await;
            (body["mcp_servers"]["time"] == "ready").then_some(())
        },
    )
    .await;

    let over_http =
        json!({"mode": "persona-key", "url": format!("{}/mcp", s.api), "key": TIMEKEEPER_KEY});
    let client_dir = dir.path().to_path_buf();
    let steps = tokio::task::spawn_blocking(move || run_client(&client_dir, over_http))
        .await
        .unwrap();
    assert!(steps.iter().any(|s| s["step"] == "equip_other_refused"));
    // The client ended its session (DELETE): nothing of it is left open.
    crate::common::eventually(
        "the HTTP session to end",
        std::time::Duration::from_secs(10),
        || async {
            let m = s.metrics().await;
            (m.get("hypertool_mcp_sessions_open", &[]) == Some(0.0)).then_some(())
        },
    )
    .await;

    let mut env = env_for_children();
    env["HYPERTOOL_API_KEY"] = json!(TIMEKEEPER_KEY);
    // The same hypertool.toml (its personas) names the server's keys.
    env["HYPERTOOL_TEST_MCP_ADMIN"] = json!(ADMIN_KEY);
    env["HYPERTOOL_TEST_MCP_TIMEKEEPER"] = json!(TIMEKEEPER_KEY);
    let beside = json!({
        "mode": "persona-key",
        "command": [
            env!("CARGO_BIN_EXE_hypertool"), "mcp", "--config", config,
            // No --persona: the key's persona, asked of the server.
            "--server", s.api,
        ],
        "env": env,
    });
    let client_dir = dir.path().to_path_buf();
    let steps = tokio::task::spawn_blocking(move || run_client(&client_dir, beside))
        .await
        .unwrap();
    assert!(steps.iter().any(|s| s["step"] == "equip_other_refused"));

    // Both sessions' calls reached this server's metrics (the second through its events API).
    let m = crate::common::eventually(
        "both sessions' calls applied",
        std::time::Duration::from_secs(10),
        || async {
            let m = s.metrics().await;
            let calls = m.get(
                "hypertool_mcp_tool_calls_total",
                &[
                    ("persona", "timekeeper"),
                    ("server", "time"),
                    ("tool", "get_current_time"),
                    ("result", "ok"),
                ],
            );
            (calls == Some(2.0)).then_some(m)
        },
    )
    .await;
    assert_eq!(
        m.get(
            "hypertool_mcp_tool_calls_total",
            &[
                ("persona", "timekeeper"),
                ("server", "hypertool"),
                ("tool", "equip-persona"),
                ("result", "error")
            ],
        ),
        Some(2.0)
    );
    assert_eq!(
        m.get(
            "hypertool_persona_switches_total",
            &[
                ("from_persona", "none"),
                ("to_persona", "timekeeper"),
                ("chatmode", "default")
            ],
        ),
        Some(2.0),
        "each session starts in the key's persona"
    );
    assert_eq!(
        m.get("hypertool_mcp_server_up", &[("server", "time")]),
        Some(1.0)
    );
    assert_eq!(
        m.sum_where(
            "hypertool_persona_switches_total",
            "to_persona",
            "archivist"
        ),
        0.0
    );
    s.stop().await;
}

/// `hypertool check` reads the MCP servers file (a mistake named with its line);
/// `hypertool doctor` starts each server once and says which does not come up, and why.
#[test]
fn check_and_doctor_name_what_is_wrong_with_the_mcp_servers() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _repo) = setup(dir.path());
    let hypertool = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypertool"))
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let config_arg = config.to_str().unwrap();
    let (code, text) = hypertool(&["check", "--config", config_arg]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("mcp.json: ok (3 MCP servers)"), "{text}");

    let servers = config.parent().unwrap().join("mcp.json");
    std::fs::write(
        &servers,
        "{\"mcpServers\": {\n  \"time\": {\"command\": \"python3\", \"args\": [\"-m\", \"mcp_server_time\"]},\n  \"gone\": {\"command\": \"/nonexistent/mcp-server\"},\n  \"broken\": {\"type\": \"http\"}\n}}",
    )
    .unwrap();
    let (code, text) = hypertool(&["check", "--config", config_arg]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("mcp.json:4: server `broken`: has neither"),
        "{text}"
    );

    // A server whose command does not exist: doctor fails it by name, the good one passes.
    std::fs::write(
        &servers,
        "{\"mcpServers\": {\n  \"time\": {\"command\": \"python3\", \"args\": [\"-m\", \"mcp_server_time\"]},\n  \"gone\": {\"command\": \"/nonexistent/mcp-server\"}\n}}",
    )
    .unwrap();
    let port = free_port();
    let (code, text) = hypertool(&[
        "doctor",
        "--config",
        config_arg,
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--server",
        &format!("http://127.0.0.1:{port}"),
    ]);
    assert_eq!(code, Some(1), "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| {
                l.contains(&format!("MCP server {name}:"))
                    || l.contains(&format!("MCP server {name} "))
            })
            .unwrap_or_else(|| panic!("no check of {name}:\n{text}"))
            .to_string()
    };
    assert!(line("time").contains("starts and lists 2 tools"), "{text}");
    assert!(
        line("gone").contains("cannot start `/nonexistent/mcp-server`"),
        "{text}"
    );
}

/// `hypertool mcp` without `--server` on the data directory of a running server is refused, and
/// told what to do — two processes on one ledger would each keep half of the picture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_per_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _repo) = setup(dir.path());
    let data = dir.path().join("data");
    let s = start(
        hypertool::config::Source::File(config.clone()),
        &data,
        std::sync::Arc::new(hypertool::core::clock::ManualClock::new(crate::common::T0)),
    )
    .await;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hypertool"))
            .args(["mcp", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .stdin(std::process::Stdio::null())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "is in use by another hypertool (pid {})",
            std::process::id()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--server URL"), "{stderr}");
    // The server is unharmed.
    let (status, _) = s.get_json("/readyz").await;
    assert_eq!(status, 200);
    s.stop().await;
}

/// Issue 29: a configured server that no persona lists is shown to nobody; `check` and `doctor`
/// say so, and name what to add.
#[test]
fn check_and_doctor_say_when_a_server_is_allowed_to_no_persona() {
    let dir = tempfile::tempdir().unwrap();
    let toml = crate::common::config_copy(dir.path());
    let config = toml.parent().unwrap();
    std::fs::write(
        config.join("mcp.json"),
        "{\"mcpServers\": {\n  \"time\": {\"command\": \"python3\", \"args\": [\"-m\", \"mcp_server_time\"]},\n  \"orphan\": {\"command\": \"python3\", \"args\": [\"-m\", \"mcp_server_time\"]}\n}}",
    )
    .unwrap();
    let text = std::fs::read_to_string(&toml).unwrap();
    let text = text.replacen("[mcp]", "[mcp]\nservers = \"mcp.json\"", 1);
    std::fs::write(&toml, text).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypertool"))
            .args(args)
            .arg("--config")
            .arg(&toml)
            .current_dir(dir.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let check = run(&["check"]);
    assert!(
        check.contains("warning: MCP server `orphan` is allowed to no persona: add \"orphan\" to allowedServers"),
        "{check}"
    );
    assert!(
        !check.contains("`time` is allowed to no persona"),
        "{check}"
    );
    let doctor = run(&["doctor"]);
    assert!(
        doctor.contains("WARN MCP server orphan: allowed to no persona"),
        "{doctor}"
    );
}
