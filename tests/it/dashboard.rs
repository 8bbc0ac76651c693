//! The dashboard in a real headless browser (Debian's `chromium`), driven over the Chrome DevTools
//! Protocol: it loads behind the viewer key, shows a seeded ledger's data, follows new events by
//! itself, and logs no console error.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::access::{start_with_keys, ADMIN_KEY, VIEWER_KEY};
use crate::common::*;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium and one page of it.
pub(crate) struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    next_id: u64,
    /// Every protocol event received (console calls, exceptions, log entries).
    events: Vec<Value>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    pub(crate) async fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless=new",
                // CI runs as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromium is needed: install Debian's `chromium` package (scripts/test.sh does)",
            );
        // Chromium writes the port it chose into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let port = eventually("Chromium to listen", Duration::from_secs(60), || {
            let f = port_file.clone();
            async move {
                std::fs::read_to_string(&f)
                    .ok()?
                    .lines()
                    .next()?
                    .trim()
                    .parse::<u16>()
                    .ok()
            }
        })
        .await;
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target");
        let url = page["webSocketDebuggerUrl"].as_str().unwrap();
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut b = Browser {
            child,
            _profile: profile,
            socket,
            next_id: 0,
            events: Vec::new(),
        };
        for domain in [
            "Runtime.enable",
            "Log.enable",
            "Page.enable",
            "Network.enable",
        ] {
            b.call(domain, json!({})).await;
        }
        b
    }

    /// One protocol command and its result (events meanwhile are kept).
    pub(crate) async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("the DevTools socket closed")
                .unwrap();
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.events.push(v);
        }
    }

    /// A JavaScript expression's value in the page.
    pub(crate) async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Polls `expression` until `ok` holds of its value.
    pub(crate) async fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(expression).await;
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: last value {v}; console: {:?}",
                self.errors()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Errors the page logged: exceptions, console.error, and log entries of level error (a
    /// failed resource load is one).
    pub(crate) fn errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => {
                    Some(e["params"]["exceptionDetails"].to_string())
                }
                Some("Runtime.consoleAPICalled") if e["params"]["type"] == "error" => {
                    Some(e["params"]["args"].to_string())
                }
                Some("Log.entryAdded") if e["params"]["entry"]["level"] == "error" => {
                    Some(e["params"]["entry"].to_string())
                }
                _ => None,
            })
            .collect()
    }

    /// Every request the page made went to `origin` (the dashboard works offline).
    fn requested_urls(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str().map(str::to_string))
            .collect()
    }
}

fn basic(key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("viewer:{key}"))
    )
}

/// The dashboard in headless Chromium, as a viewer, once its first refresh is drawn.
async fn open_dashboard(s: &TestServer) -> Browser {
    let mut b = Browser::start().await;
    b.call(
        "Network.setExtraHTTPHeaders",
        json!({"headers": {"Authorization": basic(VIEWER_KEY)}}),
    )
    .await;
    b.call("Page.navigate", json!({"url": format!("{}/", s.api)}))
        .await;
    b.wait_for(
        "the first refresh",
        "document.body.dataset.updated || null",
        |v| v.is_string(),
    )
    .await;
    b
}

async fn post_events(s: &TestServer, events: Value) {
    let resp = s
        .http
        .post(format!("{}/v1/events", s.api))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_ledger_updates_itself_and_logs_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_keys(dir.path(), "").await;
    // Seeded before the page opens: an overrun, a switch, a slow stage, gate verdicts.
    post_events(
        &s,
        json!([
            {"type": "usage", "persona": "backend-engineer", "chatmode": "feature-implementation", "model": "gpt-4o",
             "prompt_tokens": 2000, "completion_tokens": 100, "session": "d1", "cost_usd": 1.25},
            {"type": "usage", "persona": "testing-specialist", "chatmode": "feature-implementation", "model": "gpt-4o",
             "prompt_tokens": 300, "completion_tokens": 50, "session": "d1"},
            {"type": "stage", "workflow": "feature-development", "stage": "review", "persona": "backend-engineer",
             "model": "gpt-4o", "duration_seconds": 400, "gate": "fail", "reason": "required_sections: missing Findings"},
            {"type": "stage", "workflow": "feature-development", "stage": "review", "persona": "backend-engineer",
             "model": "gpt-4o-mini", "duration_seconds": 30, "gate": "pass"},
        ]),
    )
    .await;
    // A stage left running, and one cached answer out of two lookups.
    let run: Value = s
        .http
        .post(format!("{}/v1/workflows/incident-response/runs", s.api))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let resp = s
        .http
        .post(format!(
            "{}/v1/workflows/incident-response/runs/{}/stages/diagnosis/start",
            s.api,
            run["id"].as_str().unwrap()
        ))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for _ in 0..2 {
        let resp = s
            .http
            .post(format!("{}/v1/chat/completions", s.api))
            .bearer_auth(crate::access::TESTING_KEY)
            .json(&json!({"model": "mock/gpt-4o", "temperature": 0,
                          "messages": [{"role": "user", "content": "the same question"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // The page without a key asks for one (a browser then prompts).
    let resp = s.http.get(format!("{}/", s.api)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic "));

    let mut b = open_dashboard(&s).await;

    // Budgets, the overrun and the cost.
    let used = b
        .eval(r#"document.querySelector('[data-persona="backend-engineer"]').dataset.used"#)
        .await;
    assert_eq!(used, "2100");
    let row = b
        .eval(r#"document.querySelector('[data-persona="backend-engineer"]').innerText"#)
        .await;
    let row = row.as_str().unwrap();
    assert!(
        row.contains("over budget") && row.contains("$1.25"),
        "{row}"
    );
    assert_eq!(
        b.eval(r#"document.querySelectorAll('[data-persona] svg.burn polyline').length > 0"#)
            .await,
        true,
        "burn-down charts drawn"
    );
    // The transition matrix, stage p95 and gate pass rates.
    assert_eq!(
        b.eval(r#"document.querySelector('[data-from="backend-engineer"] [data-to="testing-specialist"]').innerText"#)
            .await,
        "1"
    );
    let p95 = b
        .eval(r#"Number(document.querySelector('[data-stage="feature-development/review"]').dataset.p95)"#)
        .await;
    assert!(p95.as_f64().unwrap() > 300.0, "{p95}");
    assert_eq!(
        b.eval(r#"document.querySelector('[data-gate-stage="feature-development/review"]').dataset.passRate"#)
            .await,
        "0.5"
    );
    assert_eq!(
        b.eval(r#"document.querySelector('[data-gate-model="gpt-4o-mini"]').dataset.passRate"#)
            .await,
        "1"
    );
    // The running stage and the cache.
    assert_eq!(
        b.eval(
            r#"document.querySelectorAll('[data-running="incident-response/diagnosis"]').length"#
        )
        .await,
        1
    );
    assert_eq!(
        b.eval(r#"document.querySelector('[data-kpi="cache-hit-rate"] .value').innerText"#)
            .await,
        "50 %"
    );
    // Alerts with their runbook links.
    let link = b
        .eval(r#"document.querySelector('[data-alert="TokenBudgetExceeded"] a').href"#)
        .await;
    assert_eq!(
        link,
        format!("{}/runbook#alert-1-token-budget-exceeded", s.api)
    );

    // New events: the page follows by itself (it refreshes every 5 s).
    post_events(
        &s,
        json!([{"type": "usage", "persona": "data-scientist", "chatmode": "analysis", "model": "gpt-4o",
                "prompt_tokens": 700, "completion_tokens": 0}]),
    )
    .await;
    b.wait_for(
        "data-scientist's usage to appear",
        r#"(document.querySelector('[data-persona="data-scientist"]') || {dataset: {}}).dataset.used || null"#,
        |v| v == "700",
    )
    .await;

    // Offline: nothing but this server was asked for anything; and no error was logged.
    for url in b.requested_urls() {
        assert!(url.starts_with(&s.api), "the page fetched {url}");
    }
    assert!(b.errors().is_empty(), "console errors: {:#?}", b.errors());
}

/// Issue 29: calls on the default temperature are not cached; the hit rate then shows "–" and
/// the page says why, instead of leaving a dash unexplained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_hit_rate_says_that_only_temperature_0_calls_are_cached() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_keys(dir.path(), "").await;
    for _ in 0..3 {
        let resp = s
            .http
            .post(format!("{}/v1/chat/completions", s.api))
            .bearer_auth(crate::access::TESTING_KEY)
            .json(&json!({"model": "mock/gpt-4o",
                          "messages": [{"role": "user", "content": "the same question"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-hypertool-cache"], "skip");
    }
    let data: Value = s
        .http
        .get(format!("{}/api/dashboard", s.api))
        .bearer_auth(VIEWER_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(data["cache"]["hit_rate"], Value::Null);
    assert_eq!(data["cache"]["not_cacheable"], 3.0);

    let mut b = open_dashboard(&s).await;
    let kpi = |part: &'static str| {
        format!(r#"document.querySelector('[data-kpi="cache-hit-rate"] .{part}').innerText"#)
    };
    assert_eq!(b.eval(&kpi("value")).await, "–");
    let note = b.eval(&kpi("muted")).await;
    let note = note.as_str().unwrap();
    assert!(
        note.contains("3 had a temperature above 0") && note.contains("only temperature 0"),
        "{note}"
    );
}
