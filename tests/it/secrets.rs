//! Secrets stay secret: a whole run of the binary with real-looking keys everywhere (upstream key,
//! gateway keys, admin and viewer keys, the metrics token, Langfuse keys), driven through good
//! calls and every kind of refusal, leaves none of them in the logs, the metrics, any answer or
//! the ledger on disk. (Keys are presented as credentials, never as data: a client that writes
//! its key into a model name stores it as a model name.)

use serde_json::{json, Value};

use crate::common::*;

const UPSTREAM: &str = "sk-proj-UPSTREAM-7Hq2Lx9Vw4Rt6Yp1";
const ADMIN: &str = "ht-admin-SECRET-4Fd8Kq2Zm7Xc1Vb6";
const VIEWER: &str = "ht-viewer-SECRET-9Jh3Ns5Qa8Wl2Pe4";
const PERSONA: &str = "ht-persona-SECRET-2Gt6Ry1Uk9Oi3Mn7";
const METRICS: &str = "ht-metrics-SECRET-8Bv4Cx6Za2Sd1Fg5";
const LANGFUSE_PK: &str = "pk-lf-SECRET-3Hj7Kl1Qw5Er9Ty2";
const LANGFUSE_SK: &str = "sk-lf-SECRET-6Ui4Op8As2Df7Gh1";
const ALL: [&str; 7] = [
    UPSTREAM,
    ADMIN,
    VIEWER,
    PERSONA,
    METRICS,
    LANGFUSE_PK,
    LANGFUSE_SK,
];

fn leaks(what: &str, text: &str) {
    for secret in ALL {
        assert!(!text.contains(secret), "{what} holds a secret");
        // Nor a recognizable part of one.
        assert!(
            !text.contains(&secret[secret.len() - 12..]),
            "{what} holds part of a secret"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_metrics_answers_or_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let toml = gateway_config(
        dir.path(),
        &upstream.base_url,
        "\n[[server.viewer_keys]]\nkey_env = \"HT_SECRET_TEST_VIEWER\"\n\
         \n[[gateway.keys]]\nkey_env = \"HT_SECRET_TEST_PERSONA\"\npersona = \"data-scientist\"\nmodels = [\"ok\", \"leak-key\", \"fail-500\", \"mock/gpt-4o\"]\n",
    );
    let text = std::fs::read_to_string(&toml).unwrap().replace(
        "[server]",
        "[server]\nmetrics_bearer_token_env = \"HT_SECRET_TEST_METRICS\"",
    );
    std::fs::write(&toml, text).unwrap();
    let log = dir.path().join("ht.log");
    let data = dir.path().join("data");
    let mut child = Reaped(
        std::process::Command::new(crate::process::BIN)
            .current_dir(dir.path())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(["--config", toml.to_str().unwrap()])
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--log-file", log.to_str().unwrap()])
            .env("HYPERTOOL_TEST_UPSTREAM_KEY", UPSTREAM)
            .env("HYPERTOOL_ADMIN_KEY", ADMIN)
            .env("HT_SECRET_TEST_VIEWER", VIEWER)
            .env("HT_SECRET_TEST_PERSONA", PERSONA)
            .env("HT_SECRET_TEST_METRICS", METRICS)
            .env("LANGFUSE_PUBLIC_KEY", LANGFUSE_PK)
            .env("LANGFUSE_SECRET_KEY", LANGFUSE_SK)
            .env("RUST_LOG", "debug")
            .spawn()
            .unwrap(),
    );
    let (api, metrics) = serving_at(&log).await;
    let http = reqwest::Client::new();
    let mut answers = String::new();
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    // Good calls, refusals of every kind, and secrets sent where they do not belong.
    let requests: Vec<(reqwest::Method, &str, Option<&str>, Option<Value>)> = vec![
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(PERSONA),
            Some(chat("ok")),
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(PERSONA),
            Some(chat("leak-key")),
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(PERSONA),
            Some(chat("fail-500")),
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(PERSONA),
            Some(chat("refused")),
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(PERSONA),
            Some(chat("no-such-model")),
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(VIEWER),
            Some(chat("ok")),
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            None,
            Some(chat("ok")),
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(METRICS),
            Some(chat("ok")),
        ),
        (
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(ADMIN),
            Some(chat("mock/gpt-4o")),
        ),
        (
            reqwest::Method::POST,
            "/v1/events",
            Some(PERSONA),
            Some(json!({"events": [
                usage("data-scientist", "dev", "gpt-4o", 5, 5),
                usage("backend-engineer", "dev", "gpt-4o", 5, 5),
                {"type": "usage", "persona": "data-scientist", "chatmode": "dev", "model": "m",
                 "prompt_tokens": -1, "completion_tokens": 1},
            ]})),
        ),
        (
            reqwest::Method::PUT,
            "/api/budgets/data-scientist",
            Some(PERSONA),
            Some(json!({"tokens": 1})),
        ),
        (
            reqwest::Method::PUT,
            "/api/budgets/data-scientist",
            Some(ADMIN),
            Some(json!({"tokens": "many"})),
        ),
        (reqwest::Method::GET, "/api/budgets", Some(VIEWER), None),
        (reqwest::Method::GET, "/api/alerts", Some(VIEWER), None),
        (reqwest::Method::GET, "/api/personas", Some(ADMIN), None),
        (reqwest::Method::GET, "/v1/models", Some(PERSONA), None),
    ];
    for (method, path, key, body) in requests {
        let mut req = http.request(method, format!("{api}{path}"));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers: Vec<String> = resp
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {v:?}"))
            .collect();
        answers.push_str(&format!(
            "{path} {status}\n{}\n{}\n",
            headers.join("\n"),
            resp.text().await.unwrap()
        ));
    }
    // An answer that would have leaked the upstream key had it echoed the upstream's error.
    assert!(answers.contains("/v1/chat/completions 200"), "{answers}");
    let scrape = http
        .get(format!("{metrics}/metrics"))
        .bearer_auth(METRICS)
        .send()
        .await
        .unwrap();
    assert_eq!(scrape.status(), 200);
    let exposition = scrape.text().await.unwrap();
    assert!(exposition.contains("hypertool_auth_failures_total"));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();

    leaks("an answer", &answers);
    leaks("the exposition", &exposition);
    leaks("the log", &std::fs::read_to_string(&log).unwrap());
    // The ledger, its write-ahead log and the trace spools, byte for byte.
    let mut dirs = vec![data.clone()];
    let mut files = 0;
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            leaks(
                &path.display().to_string(),
                &String::from_utf8_lossy(&bytes),
            );
        }
    }
    assert!(files > 0);
}
