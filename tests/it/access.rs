//! The door: every route × every kind of caller (no key, unknown key, persona key of the right and
//! of another persona, viewer, admin), walked from the same table the router is built from, so a
//! route added without an access decision (or without a case here) fails this test.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hypertool::config::Source;
use hypertool::core::clock::ManualClock;
use hypertool::server::routes;
use hypertool::web::auth::Access;
use serde_json::{json, Value};

use crate::common::*;

pub const ADMIN_KEY: &str = "ht-admin-key-REAL-LOOKING-7f3a9c21d4";
pub const VIEWER_KEY: &str = "ht-viewer-key-REAL-LOOKING-5b1e77aa90";
pub const BACKEND_KEY: &str = "ht-persona-be-REAL-LOOKING-0c4d2e8f13";
pub const TESTING_KEY: &str = "ht-persona-ts-REAL-LOOKING-9e8d7c6b5a";
pub const LIMITED_KEY: &str = "ht-persona-ds-REAL-LOOKING-1a2b3c4d5e";

/// The keys in the environment (set once per test process; names unique to these tests).
pub fn export_keys() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Set before any server of these tests reads them; the names are used nowhere else.
        std::env::set_var("HYPERTOOL_TEST_ACCESS_ADMIN", ADMIN_KEY);
        std::env::set_var("HYPERTOOL_TEST_ACCESS_VIEWER", VIEWER_KEY);
        std::env::set_var("HYPERTOOL_TEST_ACCESS_BE", BACKEND_KEY);
        std::env::set_var("HYPERTOOL_TEST_ACCESS_TS", TESTING_KEY);
        std::env::set_var("HYPERTOOL_TEST_ACCESS_LIMITED", LIMITED_KEY);
    });
}

/// hypertool.toml lines that configure one key of each role.
pub const KEYS_TOML: &str = r#"
[[server.admin_keys]]
key_env = "HYPERTOOL_TEST_ACCESS_ADMIN"

[[server.viewer_keys]]
key_env = "HYPERTOOL_TEST_ACCESS_VIEWER"

[[gateway.keys]]
key_env = "HYPERTOOL_TEST_ACCESS_BE"
persona = "backend-engineer"

[[gateway.keys]]
key_env = "HYPERTOOL_TEST_ACCESS_TS"
persona = "testing-specialist"
"#;

pub async fn start_with_keys(dir: &Path, extra: &str) -> TestServer {
    export_keys();
    let toml = config_copy(dir);
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str(KEYS_TOML);
    text.push_str(extra);
    std::fs::write(&toml, text).unwrap();
    start(
        Source::File(toml),
        &dir.join("data"),
        Arc::new(ManualClock::new(T0)),
    )
    .await
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    NoKey,
    UnknownKey,
    /// backend-engineer's key: the persona every sample request names.
    OwnPersona,
    /// testing-specialist's key, on requests that name backend-engineer.
    OtherPersona,
    Viewer,
    Admin,
}

impl Who {
    const ALL: [Who; 6] = [
        Who::NoKey,
        Who::UnknownKey,
        Who::OwnPersona,
        Who::OtherPersona,
        Who::Viewer,
        Who::Admin,
    ];

    fn key(self) -> Option<&'static str> {
        match self {
            Who::NoKey => None,
            Who::UnknownKey => Some("ht-unknown-key-0000000000000000"),
            Who::OwnPersona => Some(BACKEND_KEY),
            Who::OtherPersona => Some(TESTING_KEY),
            Who::Viewer => Some(VIEWER_KEY),
            Who::Admin => Some(ADMIN_KEY),
        }
    }
}

/// A concrete request for each route of the table, naming backend-engineer wherever a persona is
/// named. A route without a case here fails the test: decide its access and add its case.
pub fn sample(method: &str, path: &str, run: &str) -> (String, Option<Value>) {
    let wf = "feature-development";
    let chat = json!({"model": "mock/gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    match (method, path) {
        ("GET", "/healthz" | "/readyz" | "/v1/models" | "/v1/workflows" | "/v1/whoami") => {
            (path.into(), None)
        }
        (
            "GET",
            "/api/oscillations" | "/api/personas" | "/api/budgets" | "/api/alerts" | "/api/server",
        ) => (path.into(), None),
        (
            "GET",
            "/"
            | "/runbook"
            | "/api/dashboard"
            | "/api/budgets/suggestions"
            | "/api/quality-gates/history",
        ) => (path.into(), None),
        ("GET", "/api/experiments" | "/api/audit") => (path.into(), None),
        ("POST", "/api/experiments/{workflow}/{stage}/promote") => (
            format!("/api/experiments/{wf}/design/promote"),
            Some(json!({"variant": "none"})),
        ),
        ("GET", "/api/experiments/{workflow}/{stage}") => {
            (format!("/api/experiments/{wf}/design"), None)
        }
        ("GET", "/api/investigations/{alert}") => {
            ("/api/investigations/TokenBudgetExceeded".into(), None)
        }
        ("POST", "/v1/chat/completions") => (path.into(), Some(chat)),
        ("POST", "/v1/messages") => (
            path.into(),
            Some(
                json!({"model": "mock/claude", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
            ),
        ),
        ("POST", "/v1/responses") => (
            path.into(),
            Some(json!({"model": "mock/gpt-5", "input": "hi"})),
        ),
        ("POST", "/v1/messages/count_tokens") => (
            path.into(),
            Some(json!({"model": "mock/claude", "messages": [{"role": "user", "content": "hi"}]})),
        ),
        ("POST", "/v1/embeddings") => (
            path.into(),
            Some(json!({"model": "mock/embed", "input": "hello"})),
        ),
        ("POST", "/v1/events") => (
            path.into(),
            Some(json!({"events": [usage("backend-engineer", "dev", "gpt-4o", 10, 5)]})),
        ),
        ("POST", "/v1/personas/switch") => (
            path.into(),
            Some(json!({"session": "s-access", "to": "backend-engineer", "chatmode": "dev"})),
        ),
        ("POST", "/v1/personas/route") => {
            (path.into(), Some(json!({"task": "write a REST endpoint"})))
        }
        ("POST", "/v1/quality-gates/evaluate") => (
            path.into(),
            Some(json!({"workflow": wf, "stage": "design", "text": "Overview\nAPI\nRisks"})),
        ),
        ("GET", "/v1/workflows/{workflow}") => (format!("/v1/workflows/{wf}"), None),
        ("POST", "/v1/workflows/{workflow}/runs") => {
            (format!("/v1/workflows/{wf}/runs"), Some(json!({})))
        }
        ("GET", "/v1/workflows/{workflow}/runs") => (format!("/v1/workflows/{wf}/runs"), None),
        ("GET", "/v1/workflows/{workflow}/runs/{run}") => {
            (format!("/v1/workflows/{wf}/runs/{run}"), None)
        }
        ("POST", "/v1/workflows/{workflow}/runs/{run}/finish") => (
            format!("/v1/workflows/{wf}/runs/{run}/finish"),
            Some(json!({})),
        ),
        ("POST", "/v1/workflows/{workflow}/runs/{run}/stages/{stage}/start") => (
            format!("/v1/workflows/{wf}/runs/{run}/stages/design/start"),
            Some(json!({})),
        ),
        ("POST", "/v1/workflows/{workflow}/runs/{run}/stages/{stage}/finish") => (
            format!("/v1/workflows/{wf}/runs/{run}/stages/design/finish"),
            Some(json!({})),
        ),
        ("GET", "/api/sessions/{session}") => ("/api/sessions/s-access".into(), None),
        ("GET", "/api/budgets/{persona}") => ("/api/budgets/backend-engineer".into(), None),
        ("PUT", "/api/budgets/{persona}") => (
            "/api/budgets/backend-engineer".into(),
            Some(json!({"tokens": 100000})),
        ),
        ("DELETE", "/api/budgets/{persona}") => ("/api/budgets/backend-engineer".into(), None),
        // The MCP proxy: an initialize (the SDK answers 4xx to what is not MCP; the door decides
        // first), the event stream and the end of a session (none open: 4xx from the SDK).
        ("POST", "/mcp") => (
            path.into(),
            Some(
                json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "access-test", "version": "1"}}}),
            ),
        ),
        ("GET" | "DELETE", "/mcp") => (path.into(), None),
        ("POST", "/api/budgets/{persona}/reset") => {
            ("/api/budgets/backend-engineer/reset".into(), None)
        }
        _ => panic!(
            "route {method} {path} has no case in tests/it/access.rs: decide who may call it \
             (server::routes) and add a sample request here"
        ),
    }
}

/// What the door must do: `None` = let the request through to its handler, `Some(status)` =
/// refuse it with that status.
fn expected(access: Access, who: Who, method: &str, path: &str) -> Option<u16> {
    use Access::*;
    if access == Public {
        return None;
    }
    match who {
        Who::NoKey | Who::UnknownKey => Some(401),
        Who::Admin => None,
        Who::Viewer => match access {
            AnyKey | View | ViewOrOwnPersona => None,
            _ => Some(403),
        },
        Who::OwnPersona => match access {
            AnyKey | Gateway | PersonaScoped | ViewOrOwnPersona => None,
            _ => Some(403),
        },
        Who::OtherPersona => match access {
            AnyKey | Gateway => None,
            // Bodies and paths name backend-engineer: refused, except where nothing is named.
            PersonaScoped => match (method, path) {
                ("POST", "/v1/personas/route") => None,
                ("POST", "/v1/workflows/{workflow}/runs") => None,
                // An MCP session of its own: its persona's tools (tests/it/mcp.rs).
                (_, "/mcp") => None,
                // Refused per event (422 with the field named), checked below.
                ("POST", "/v1/events") => Some(422),
                _ => Some(403),
            },
            _ => Some(403),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_by_every_kind_of_caller() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_keys(dir.path(), "").await;
    let table = routes::table();
    assert!(table.len() >= 25, "the table lists every route");
    // Every route is either public or needs a key; the public list is exactly the health checks.
    let public: Vec<&str> = table
        .iter()
        .filter(|r| r.access == Access::Public)
        .map(|r| r.path)
        .collect();
    assert_eq!(public, ["/healthz", "/readyz"]);

    let mut checked = 0;
    let mut checked_heads = 0;
    for who in Who::ALL {
        for route in &table {
            // A fresh run per request: finishing one must not change what the next sees. It is
            // backend-engineer's (created with its key): the persona every sample names.
            let run = s
                .http
                .post(format!("{}/v1/workflows/feature-development/runs", s.api))
                .bearer_auth(BACKEND_KEY)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string();
            let (path, body) = sample(route.method, route.path, &run);
            let method = reqwest::Method::from_bytes(route.method.as_bytes()).unwrap();
            let mut req = s.http.request(method, format!("{}{}", s.api, path));
            if let Some(k) = who.key() {
                req = req.bearer_auth(k);
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            let what = format!("{who:?} {} {path}: {status} {text}", route.method);
            // A HEAD is decided as the GET it runs: the same answer, without its body.
            if route.method == "GET" {
                let mut head = s.http.head(format!("{}{}", s.api, path));
                if let Some(k) = who.key() {
                    head = head.bearer_auth(k);
                }
                let head = head.send().await.unwrap();
                assert_eq!(head.status().as_u16(), status, "HEAD of {what}");
                assert!(head.bytes().await.unwrap().is_empty(), "HEAD of {what}");
                checked_heads += 1;
            }
            match expected(route.access, who, route.method, route.path) {
                None => assert!(
                    status != 401 && status != 403 && status < 500,
                    "should be let through: {what}"
                ),
                Some(want) => {
                    assert_eq!(status, want, "{what}");
                    let v: Value = serde_json::from_str(&text).unwrap();
                    if want == 422 {
                        assert_eq!(v["rejected"][0]["field"], "persona", "{what}");
                    } else {
                        // The OpenAI error shape.
                        assert!(v["error"]["message"].is_string(), "{what}");
                        let code = if want == 401 {
                            "invalid_api_key"
                        } else {
                            v["error"]["code"].as_str().unwrap()
                        };
                        assert_eq!(v["error"]["code"], code, "{what}");
                    }
                }
            }
            // No key ever comes back.
            for k in [ADMIN_KEY, VIEWER_KEY, BACKEND_KEY, TESTING_KEY] {
                assert!(!text.contains(k), "{what}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, table.len() * Who::ALL.len());
    let gets = table.iter().filter(|r| r.method == "GET").count();
    assert_eq!(checked_heads, gets * Who::ALL.len());

    // Refusals are counted by reason.
    let m = s.metrics().await;
    for reason in ["missing_key", "unknown_key", "role", "other_persona"] {
        let n = m
            .get("hypertool_auth_failures_total", &[("reason", reason)])
            .unwrap_or(0.0);
        assert!(n > 0.0, "no {reason} counted");
    }
    // x-api-key works as well as Authorization.
    let resp = s
        .http
        .get(format!("{}/api/budgets", s.api))
        .header("x-api-key", VIEWER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A path outside the table is denied by default: only an admin learns that it is a 404.
    assert_eq!(s.get_as("/api/nothing-here", None).await.status(), 401);
    assert_eq!(
        s.get_as("/api/nothing-here", Some(VIEWER_KEY))
            .await
            .status(),
        403
    );
    assert_eq!(
        s.get_as("/api/nothing-here", Some(ADMIN_KEY))
            .await
            .status(),
        404
    );
    // A method a known route does not take: 405 for any key.
    let resp = s
        .http
        .delete(format!("{}/api/alerts", s.api))
        .bearer_auth(VIEWER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persona_key_reports_only_its_own_persona_and_the_gateway_attributes_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_keys(dir.path(), "").await;
    // A batch with events of both personas: its own stored, the other refused with the field named.
    let resp = s
        .http
        .post(format!("{}/v1/events", s.api))
        .bearer_auth(TESTING_KEY)
        .json(&json!({"events": [
            usage("testing-specialist", "dev", "gpt-4o", 100, 10),
            usage("backend-engineer", "dev", "gpt-4o", 999_999, 0),
            usage("tta-testing-specialist", "dev", "gpt-4o", 1, 1),
            {"type": "persona_switch", "session": "s1", "from": "testing-specialist", "to": "backend-engineer", "chatmode": "dev"},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["accepted"], 2, "{v}");
    assert_eq!(v["rejected"][0]["index"], 1);
    assert_eq!(v["rejected"][0]["field"], "persona");
    assert_eq!(v["rejected"][1]["index"], 3);
    assert_eq!(v["rejected"][1]["field"], "to");
    let m = s.metrics().await;
    assert_eq!(
        m.sum_where(
            "hypertool_persona_tokens_used_total",
            "persona",
            "backend-engineer"
        ),
        0.0,
        "a forged event charged another persona"
    );
    assert_eq!(
        m.sum_where(
            "hypertool_persona_tokens_used_total",
            "persona",
            "testing-specialist"
        ),
        112.0
    );
    // The gateway attributes a persona key's call to its persona, whatever the headers say.
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .bearer_auth(TESTING_KEY)
        .header("x-hypertool-persona", "backend-engineer")
        .json(&json!({"model": "mock/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-hypertool-persona"], "testing-specialist");
    // Nor does it work in a stage another persona runs (design is backend-engineer's).
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .bearer_auth(TESTING_KEY)
        .header("x-hypertool-workflow", "feature-development")
        .header("x-hypertool-stage", "design")
        .json(&json!({"model": "mock/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "x-hypertool-stage");
    // A persona key reads its own budget, not another's.
    let own = s
        .get_as("/api/budgets/tta-testing-specialist", Some(TESTING_KEY))
        .await;
    assert_eq!(own.status(), 200);
    let other = s
        .get_as("/api/budgets/backend-engineer", Some(TESTING_KEY))
        .await;
    assert_eq!(other.status(), 403);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_asks_for_its_bearer_token_and_up_stays_true() {
    std::env::set_var(
        "HYPERTOOL_TEST_METRICS_TOKEN",
        "ht-metrics-token-REAL-LOOKING-31337",
    );
    let dir = tempfile::tempdir().unwrap();
    let s = start_edited(
        dir.path(),
        &[(
            "[server]",
            "[server]\nmetrics_bearer_token_env = \"HYPERTOOL_TEST_METRICS_TOKEN\"",
        )],
    )
    .await;
    let url = format!("{}/metrics", s.metrics);
    assert_eq!(s.http.get(&url).send().await.unwrap().status(), 401);
    let wrong = s
        .http
        .get(&url)
        .bearer_auth("nope-nope-nope-nope")
        .send()
        .await;
    assert_eq!(wrong.unwrap().status(), 401);
    let ok = s
        .http
        .get(&url)
        .bearer_auth("ht-metrics-token-REAL-LOOKING-31337")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let text = ok.text().await.unwrap();
    assert!(text.contains("hypertool_build_info"));
    // The embedded engine's own scrape gets through: HypertoolMetricsNotReported (up == 0 for 2m)
    // stays quiet over three minutes of evaluations.
    let state = s.running.as_ref().unwrap().state.clone();
    for _ in 0..13 {
        hypertool::server::evaluate_alerts(&state).await;
        s.clock.advance_secs(15);
    }
    let (_, view) = s.get_json("/api/alerts").await;
    let a = view["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alertname"] == "HypertoolMetricsNotReported")
        .unwrap()
        .clone();
    assert_eq!(a["state"], "inactive", "the self-scrape was refused: {a}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_needs_an_admin_key() {
    export_keys();
    let dir = tempfile::tempdir().unwrap();
    let toml = config_copy(dir.path());
    let mut text = std::fs::read_to_string(&toml).unwrap();
    // Gateway keys, but no admin key.
    text.push_str(
        "\n[[gateway.keys]]\nkey_env = \"HYPERTOOL_TEST_ACCESS_BE\"\npersona = \"backend-engineer\"\n",
    );
    std::fs::write(&toml, text).unwrap();
    let err = hypertool::server::start(
        hypertool::server::ServeOptions {
            config: Source::File(toml),
            data_dir: dir.path().join("data"),
            listen: Some("0.0.0.0:0".parse().unwrap()),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            mcp_servers: None,
        },
        Arc::new(ManualClock::new(T0)),
    )
    .await
    .err()
    .expect("must refuse to start");
    let msg = err.to_string();
    assert!(msg.contains("HYPERTOOL_ADMIN_KEY"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_per_key_and_per_persona_answer_429_with_retry_after() {
    export_keys();
    let dir = tempfile::tempdir().unwrap();
    let toml = config_copy(dir.path());
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str(KEYS_TOML);
    text.push_str(
        "\n[[gateway.keys]]\nkey_env = \"HYPERTOOL_TEST_ACCESS_LIMITED\"\npersona = \"data-scientist\"\nrequests_per_minute = 3\n",
    );
    std::fs::write(&toml, text).unwrap();
    let budgets = toml.parent().unwrap().join("budgets.yml");
    let b = std::fs::read_to_string(&budgets).unwrap().replace(
        "  frontend-engineer:\n    tokens: 1800\n",
        "  frontend-engineer:\n    tokens: 1800000\n    tokens_per_minute: 100\n",
    );
    assert!(b.contains("tokens_per_minute: 100"));
    std::fs::write(&budgets, b).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let s = start(Source::File(toml), &dir.path().join("data"), clock.clone()).await;
    let call = |key: &'static str, persona: &'static str, max_tokens: u64| {
        s.http
            .post(format!("{}/v1/chat/completions", s.api))
            .bearer_auth(key)
            .header("x-hypertool-persona", persona)
            .json(&json!({"model": "mock/gpt-4o", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    // The key: three calls a minute, then one every 20 s.
    for _ in 0..3 {
        assert_eq!(
            call(LIMITED_KEY, "data-scientist", 10)
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let resp = call(LIMITED_KEY, "data-scientist", 10).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "20");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    assert!(!v.to_string().contains(LIMITED_KEY));
    clock.advance_secs(20);
    assert_eq!(
        call(LIMITED_KEY, "data-scientist", 10)
            .await
            .unwrap()
            .status(),
        200
    );
    // The persona (admin key, attributed by header): 100 tokens a minute, by estimate.
    assert_eq!(
        call(ADMIN_KEY, "frontend-engineer", 60)
            .await
            .unwrap()
            .status(),
        200
    );
    let resp = call(ADMIN_KEY, "frontend-engineer", 60).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    // A call that needs more than a minute's worth can never pass: no Retry-After.
    let resp = call(ADMIN_KEY, "frontend-engineer", 500).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert!(!resp.headers().contains_key("retry-after"));
    // Another persona is not limited.
    for _ in 0..5 {
        assert_eq!(
            call(ADMIN_KEY, "backend-engineer", 60)
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_rate_limited_total",
            &[("persona", "data-scientist"), ("kind", "requests")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "hypertool_rate_limited_total",
            &[("persona", "frontend-engineer"), ("kind", "tokens")]
        ),
        Some(2.0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_hypertool_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_keys(dir.path(), "").await;
    let cli = |env: Option<(&str, &str)>, extra: &[&str]| {
        let mut cmd = std::process::Command::new(crate::process::BIN);
        cmd.args(["budget", "status", "--server", &s.api])
            .args(extra)
            .env_remove("HYPERTOOL_API_KEY");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = cli(Some(("HYPERTOOL_API_KEY", VIEWER_KEY)), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("backend-engineer"));
    // Another variable, named with --api-key-env.
    let out = cli(
        Some(("MY_HT_KEY", ADMIN_KEY)),
        &["--api-key-env", "MY_HT_KEY"],
    );
    assert!(out.status.success());
    // Without a key: the fix is named, and no key is printed.
    let out = cli(None, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("401") && err.contains("HYPERTOOL_API_KEY"),
        "{err}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_from_the_configuration_is_refused_after_the_reload() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_keys(dir.path(), "").await;
    let chat = |key: &'static str| {
        s.http
            .post(format!("{}/v1/chat/completions", s.api))
            .bearer_auth(key)
            .json(&json!({"model": "mock/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    assert_eq!(chat(TESTING_KEY).await.unwrap().status(), 200);
    // Revoke testing-specialist's key: its entry leaves hypertool.toml, no restart.
    let toml = dir.path().join("config/hypertool.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replace(
        "[[gateway.keys]]\nkey_env = \"HYPERTOOL_TEST_ACCESS_TS\"\npersona = \"testing-specialist\"\n",
        "",
    );
    assert!(!text.contains("HYPERTOOL_TEST_ACCESS_TS"));
    std::fs::write(&toml, text).unwrap();
    eventually(
        "the revoked key refused",
        Duration::from_secs(5),
        || async { (chat(TESTING_KEY).await.unwrap().status() == 401).then_some(()) },
    )
    .await;
    // The other keys still work.
    assert_eq!(chat(BACKEND_KEY).await.unwrap().status(), 200);
    assert_eq!(
        s.get_as("/api/budgets", Some(VIEWER_KEY)).await.status(),
        200
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_with_the_bearer_token_and_fails_without_it() {
    const TOKEN: &str = "ht-metrics-token-PROMETHEUS-8d7c6b5a4e";
    std::env::set_var("HYPERTOOL_TEST_PROM_TOKEN", TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let s = start_edited(
        dir.path(),
        &[(
            "[server]",
            "[server]\nmetrics_bearer_token_env = \"HYPERTOOL_TEST_PROM_TOKEN\"",
        )],
    )
    .await;
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let target = s.metrics.trim_start_matches("http://");
    // Two jobs: one sends the token from a file (Prometheus's `authorization` option), one does not.
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n\
             \x20 - job_name: with_token\n    authorization:\n      credentials_file: token\n    static_configs:\n      - targets: [\"{target}\"]\n\
             \x20 - job_name: without_token\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let _prom = spawn(
        "prometheus",
        &[
            "--config.file=prometheus.yml",
            "--storage.tsdb.path=prom-data",
            &format!("--web.listen-address={listen}"),
        ],
        dir.path(),
    );
    let http = reqwest::Client::new();
    let up = |job: &'static str| {
        let http = http.clone();
        let url = format!("http://{listen}/api/v1/query?query=up%7Bjob%3D%22{job}%22%7D");
        async move {
            let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_string)
        }
    };
    eventually("both jobs scraped", Duration::from_secs(30), || async {
        match (up("with_token").await, up("without_token").await) {
            (Some(a), Some(b)) => Some((a, b)),
            _ => None,
        }
        .filter(|(a, b)| a == "1" && b == "0")
    })
    .await;
    s.stop().await;
}

#[test]
fn a_metrics_listener_off_loopback_without_a_token_is_warned_about() {
    // 192.0.2.1 (TEST-NET-1) is assigned to no interface here: the warning comes before the bind,
    // which then fails, so nothing ever listens off loopback.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(crate::process::BIN)
        .current_dir(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "192.0.2.1:0",
        ])
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("off loopback without a bearer token")
            && err.contains("metrics_bearer_token_env"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(2), "{err}");
}
