//! The audit log: each change made through the admin API or the CLI is a ledger event naming
//! the key by its role and configured name (never the key), with before and after; listed by
//! `GET /api/audit` and `hypertool audit`, kept across a restart.

use std::sync::Arc;
use std::time::Duration;

use hypertool::config::Source;
use hypertool::core::clock::ManualClock;
use serde_json::{json, Value};

use crate::access::{
    export_keys, ADMIN_KEY, BACKEND_KEY, KEYS_TOML, LIMITED_KEY, TESTING_KEY, VIEWER_KEY,
};
use crate::common::*;

const EXPERIMENT: &str = "name: exp\ndescription: two tiers\nstages:\n  - name: implement\n    persona: backend-engineer\n    variants:\n      - name: fast\n        model: fast\n      - name: balanced\n        model: balanced\n";

async fn as_key(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = s
        .http
        .request(method, format!("{}{path}", s.api))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn audit(s: &TestServer, key: &str) -> (u16, Value) {
    as_key(s, reqwest::Method::GET, "/api/audit", key, None).await
}

fn entries<'a>(log: &'a Value, action: &str) -> Vec<&'a Value> {
    log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == action)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_are_audited_by_key_name_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    export_keys();
    let toml = config_copy(dir.path());
    let config = toml.parent().unwrap().to_path_buf();
    std::fs::write(config.join("workflows/exp.yml"), EXPERIMENT).unwrap();
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str(KEYS_TOML);
    std::fs::write(&toml, &text).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let s = start(
        Source::File(toml.clone()),
        &dir.path().join("data"),
        clock.clone(),
    )
    .await;
    use reqwest::Method;

    // A budget set, reset and removed by the admin key.
    let (status, _) = as_key(
        &s,
        Method::PUT,
        "/api/budgets/backend-engineer",
        ADMIN_KEY,
        Some(json!({"tokens": 1234})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = as_key(
        &s,
        Method::POST,
        "/api/budgets/backend-engineer/reset",
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = as_key(
        &s,
        Method::DELETE,
        "/api/budgets/backend-engineer",
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, 200);
    // A switch an admin makes is audited; the agent's own (its persona key) is not.
    let switch = |to: &str| json!({"session": "audited", "to": to, "chatmode": "dev"});
    let (status, _) = as_key(
        &s,
        Method::POST,
        "/v1/personas/switch",
        BACKEND_KEY,
        Some(switch("backend-engineer")),
    )
    .await;
    assert_eq!(status, 200);
    clock.advance_secs(60);
    let (status, answer) = as_key(
        &s,
        Method::POST,
        "/v1/personas/switch",
        ADMIN_KEY,
        Some(switch("testing-specialist")),
    )
    .await;
    assert_eq!(
        (status, answer["switched"].clone()),
        (200, json!(true)),
        "{answer}"
    );

    let (status, log) = audit(&s, VIEWER_KEY).await;
    assert_eq!(status, 200, "{log}");
    let set = entries(&log, "budget.set");
    assert_eq!(set.len(), 1, "{log}");
    assert_eq!(set[0]["actor"], "admin HYPERTOOL_TEST_ACCESS_ADMIN");
    assert_eq!(set[0]["target"], "backend-engineer");
    assert_eq!(set[0]["after"]["tokens"], 1234, "{}", set[0]);
    assert_ne!(set[0]["before"]["tokens"], 1234, "{}", set[0]);
    assert_eq!(entries(&log, "budget.reset").len(), 1, "{log}");
    let removed = entries(&log, "budget.remove");
    assert_eq!(removed[0]["before"]["tokens"], 1234, "{}", removed[0]);
    let switches = entries(&log, "persona.switch");
    assert_eq!(switches.len(), 1, "{log}");
    assert_eq!(switches[0]["before"]["persona"], "backend-engineer");
    assert_eq!(switches[0]["after"]["persona"], "testing-specialist");
    // Newest first.
    assert_eq!(log["entries"][0]["action"], "persona.switch", "{log}");

    // A promotion through the server (the CLI with --server and the admin key).
    let before = reloads(&s.metrics().await);
    let out = std::process::Command::new(crate::process::BIN)
        .args([
            "experiments",
            "promote",
            "exp",
            "implement",
            "balanced",
            "--server",
            &s.api,
        ])
        .env("HYPERTOOL_API_KEY", ADMIN_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let promoted = std::fs::read_to_string(config.join("workflows/exp.yml")).unwrap();
    assert!(!promoted.contains("name: fast"), "{promoted}");
    eventually(
        "the promotion's reload",
        Duration::from_secs(10),
        || async { (reloads(&s.metrics().await) > before).then_some(()) },
    )
    .await;
    // A reload that adds a key: audited with the keys by name, and said to change them.
    let before = reloads(&s.metrics().await);
    text.push_str("\n[[gateway.keys]]\nkey_env = \"HYPERTOOL_TEST_ACCESS_LIMITED\"\npersona = \"data-scientist\"\n");
    std::fs::write(&toml, &text).unwrap();
    eventually("the key's reload", Duration::from_secs(10), || async {
        (reloads(&s.metrics().await) > before).then_some(())
    })
    .await;
    // A reload's entry is stored right after the reload is applied (not awaited by it).
    let log = eventually("both reloads audited", Duration::from_secs(10), || async {
        let (_, log) = audit(&s, ADMIN_KEY).await;
        (entries(&log, "config.reload").len() == 2).then_some(log)
    })
    .await;
    let promotion = entries(&log, "experiment.promote");
    assert_eq!(promotion.len(), 1, "{log}");
    assert_eq!(promotion[0]["actor"], "admin HYPERTOOL_TEST_ACCESS_ADMIN");
    assert_eq!(promotion[0]["target"], "exp/implement");
    assert_eq!(
        promotion[0]["before"]["variants"].as_array().unwrap().len(),
        2
    );
    assert_eq!(promotion[0]["after"]["variants"], json!(["balanced"]));
    let reloaded = entries(&log, "config.reload");
    assert_eq!(reloaded.len(), 2, "{log}");
    let keyed = reloaded[0];
    assert_eq!(keyed["actor"], "config files");
    assert_eq!(keyed["after"]["keys_changed"], true, "{keyed}");
    assert!(
        keyed["after"]["keys"]["gateway"]
            .to_string()
            .contains("HYPERTOOL_TEST_ACCESS_LIMITED"),
        "{keyed}"
    );
    assert_eq!(
        reloaded[1]["after"]["keys_changed"], false,
        "{}",
        reloaded[1]
    );
    // Keys are named, never shown.
    let text_of_log = log.to_string();
    for key in [ADMIN_KEY, VIEWER_KEY, BACKEND_KEY, TESTING_KEY, LIMITED_KEY] {
        assert!(!text_of_log.contains(key), "a key in the audit log");
    }
    // A persona key may not read it; a filter by action and a bad limit are answered.
    let (status, _) = audit(&s, BACKEND_KEY).await;
    assert_eq!(status, 403);
    let (status, only) = as_key(
        &s,
        Method::GET,
        "/api/audit?action=budget.reset",
        VIEWER_KEY,
        None,
    )
    .await;
    assert_eq!(
        (status, only["entries"].as_array().unwrap().len()),
        (200, 1),
        "{only}"
    );
    let (status, bad) = as_key(&s, Method::GET, "/api/audit?limit=0", VIEWER_KEY, None).await;
    assert_eq!(
        (status, bad["error"]["code"].clone()),
        (400, json!("invalid_limit")),
        "{bad}"
    );
    s.stop().await;

    // After a restart, still there; and `hypertool audit` prints them.
    let s = start(
        Source::File(toml.clone()),
        &dir.path().join("data"),
        clock.clone(),
    )
    .await;
    let (_, again) = audit(&s, VIEWER_KEY).await;
    assert_eq!(
        again["entries"].as_array().unwrap().len(),
        log["entries"].as_array().unwrap().len()
    );
    let out = std::process::Command::new(crate::process::BIN)
        .args(["audit", "--server", &s.api])
        .env("HYPERTOOL_API_KEY", VIEWER_KEY)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("ACTOR")
            && printed.contains("admin HYPERTOOL_TEST_ACCESS_ADMIN")
            && printed.contains("experiment.promote"),
        "{printed}"
    );
    s.stop().await;
}
