//! Alert delivery: a real Alertmanager (Debian's prometheus-alertmanager) and a JSON webhook receive
//! firing and resolved alerts; failures are retried; a hanging receiver never blocks evaluation.
//! And end to end: a real Prometheus scraping a live hypertool fires TokenBudgetExceeded.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use hypertool::config::Source;
use hypertool::core::clock::{Clock, ManualClock, SystemClock};
use hypertool::server::evaluate_alerts;
use serde_json::{json, Value};

use crate::common::*;

/// A config whose [alerts] section gets `extra` lines, with a clock two minutes behind the real time:
/// the tests advance it by about one, and Alertmanager judges `startsAt`/`endsAt` by its own clock.
async fn server_with(dir: &Path, extra: &str) -> TestServer {
    let toml = config_copy(dir);
    let text = std::fs::read_to_string(&toml).unwrap().replace(
        "job = \"hypertool\"\n",
        &format!("job = \"hypertool\"\n{extra}\n"),
    );
    std::fs::write(&toml, text).unwrap();
    // The clock runs near real time (Alertmanager judges alerts by it), so a daily budget could
    // start a new period in the middle of a test run just after midnight UTC: use no period.
    let budgets = toml.parent().unwrap().join("budgets.yml");
    let b = std::fs::read_to_string(&budgets).unwrap();
    assert!(b.contains("  period: daily\n"));
    std::fs::write(&budgets, b.replace("  period: daily\n", "  period: none\n")).unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms() - 120_000));
    start(Source::File(toml), &dir.join("data"), clock).await
}

/// Drives backend-engineer over budget and evaluates until TokenBudgetExceeded fires (1m of clock).
async fn fire_budget_alert(s: &TestServer) {
    let state = s.running.as_ref().unwrap().state.clone();
    s.post_events(json!([usage("backend-engineer", "c", "m", 2500, 0)]))
        .await;
    for _ in 0..5 {
        evaluate_alerts(&state).await;
        s.clock.advance_secs(15);
    }
    evaluate_alerts(&state).await;
}

async fn resolve_budget_alert(s: &TestServer) {
    let state = s.running.as_ref().unwrap().state.clone();
    s.post_raw("/api/budgets/backend-engineer/reset", "").await;
    s.clock.advance_secs(15);
    evaluate_alerts(&state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gets_firing_and_resolved_and_failures_are_retried() {
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (rec, c) = (received.clone(), calls.clone());
    let app = Router::new().route(
        "/hook",
        post(move |Json(body): Json<Value>| {
            let (rec, c) = (rec.clone(), c.clone());
            async move {
                // The first two attempts fail: the notification must still arrive.
                if c.fetch_add(1, Ordering::SeqCst) < 2 {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                rec.lock().unwrap().push(body);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let s = server_with(dir.path(), &format!("webhook_url = \"{hook}\"")).await;
    fire_budget_alert(&s).await;
    let firing = eventually("the firing notification", Duration::from_secs(10), || {
        let r = received.lock().unwrap().first().cloned();
        async move { r }
    })
    .await;
    assert_eq!(firing["status"], "firing");
    assert_eq!(
        firing["alerts"][0]["labels"]["alertname"],
        "TokenBudgetExceeded"
    );
    assert_eq!(firing["alerts"][0]["labels"]["persona"], "backend-engineer");
    assert!(firing["alerts"][0]["annotations"]["runbook"]
        .as_str()
        .unwrap()
        .contains("#alert-1-token-budget-exceeded"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "two failures, then delivered"
    );

    resolve_budget_alert(&s).await;
    let resolved = eventually("the resolved notification", Duration::from_secs(10), || {
        let r = received.lock().unwrap().get(1).cloned();
        async move { r }
    })
    .await;
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(resolved["alerts"][0]["status"], "resolved");
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_alert_deliveries_total",
            &[("target", "webhook"), ("result", "delivered")]
        ),
        Some(2.0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_never_blocks_evaluation() {
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let s = server_with(
        dir.path(),
        &format!(
            "webhook_url = \"{hook}\"\nalertmanager_url = \"{}\"",
            hook.trim_end_matches("/hook")
        ),
    )
    .await;
    let state = s.running.as_ref().unwrap().state.clone();
    s.post_events(json!([usage("backend-engineer", "c", "m", 2500, 0)]))
        .await;
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(3), evaluate_alerts(&state))
            .await
            .expect("an evaluation waited on a hanging receiver");
        s.clock.advance_secs(15);
    }
    let (_, view) = s.get_json("/api/alerts").await;
    let a = view["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alertname"] == "TokenBudgetExceeded")
        .unwrap()
        .clone();
    assert_eq!(a["state"], "firing");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_receives_firing_and_resolved_alerts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("am.yml"),
        "route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n",
    )
    .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _am = spawn(
        "prometheus-alertmanager",
        &[
            "--config.file=am.yml",
            "--storage.path=am-data",
            &format!("--web.listen-address={listen}"),
            "--cluster.listen-address=",
        ],
        dir.path(),
    );
    let am = format!("http://{listen}");
    let http = reqwest::Client::new();
    eventually("Alertmanager to start", Duration::from_secs(30), || {
        let r = http.get(format!("{am}/-/ready")).send();
        async move { r.await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;

    let s = server_with(dir.path(), &format!("alertmanager_url = \"{am}\"")).await;
    fire_budget_alert(&s).await;
    let alerts_of = |active: bool| {
        let http = http.clone();
        let url = format!(
            "{am}/api/v2/alerts?active={active}&filter=alertname%3D%22TokenBudgetExceeded%22"
        );
        async move {
            let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            v.as_array().cloned()
        }
    };
    let active = eventually(
        "the alert in Alertmanager",
        Duration::from_secs(15),
        || async { alerts_of(true).await.filter(|a| !a.is_empty()) },
    )
    .await;
    assert_eq!(active[0]["labels"]["persona"], "backend-engineer");
    assert_eq!(active[0]["labels"]["severity"], "critical");
    assert_eq!(active[0]["status"]["state"], "active");
    assert!(active[0]["annotations"]["description"]
        .as_str()
        .unwrap()
        .contains("-500 tokens left"));

    resolve_budget_alert(&s).await;
    eventually(
        "the resolution in Alertmanager",
        Duration::from_secs(15),
        || async { alerts_of(true).await.filter(|a| a.is_empty()) },
    )
    .await;
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_alert_deliveries_total",
            &[("target", "alertmanager"), ("result", "delivered")]
        ),
        Some(2.0)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_fires_token_budget_exceeded_on_a_live_hypertool() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    // The rules as `hypertool rules` renders them, with a 1s cadence and a short `for` for the test.
    let mut settings = hypertool::config::load(&Source::Embedded)
        .unwrap()
        .settings
        .alerts;
    settings.evaluation_interval = hypertool::core::duration::PromDuration::secs(1);
    for r in settings.rules.iter_mut() {
        r.for_ = hypertool::core::duration::PromDuration::secs(2);
    }
    std::fs::write(
        dir.path().join("rules.yml"),
        hypertool::alerts::rules::render_rules_yaml(&settings),
    )
    .unwrap();
    let target = s.metrics.trim_start_matches("http://");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\n\
             scrape_configs:\n  - job_name: hypertool\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
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
    let prom = format!("http://{listen}");
    let alert_state = |name: &'static str| {
        let http = http.clone();
        let url = format!("{prom}/api/v1/alerts");
        async move {
            let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| a["labels"]["alertname"] == name)
                .map(|a| {
                    (
                        a["state"].as_str().unwrap_or("").to_string(),
                        a["labels"].clone(),
                    )
                })
        }
    };
    // Healthy first: Prometheus scrapes, nothing fires.
    eventually("a successful scrape", Duration::from_secs(30), || {
        let http = http.clone();
        let url = format!("{prom}/api/v1/query?query=up%7Bjob%3D%22hypertool%22%7D");
        async move {
            let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            (v["data"]["result"][0]["value"][1] == "1").then_some(())
        }
    })
    .await;
    assert_eq!(alert_state("TokenBudgetExceeded").await, None);

    s.post_events(json!([usage("backend-engineer", "c", "m", 2100, 150)]))
        .await;
    let (_, labels) = eventually(
        "TokenBudgetExceeded firing in Prometheus",
        Duration::from_secs(60),
        || async {
            alert_state("TokenBudgetExceeded")
                .await
                .filter(|(state, _)| state == "firing")
        },
    )
    .await;
    assert_eq!(labels["persona"], "backend-engineer");
    assert_eq!(labels["severity"], "critical");
    s.stop().await;
}
