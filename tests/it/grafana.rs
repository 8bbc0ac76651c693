//! The Grafana dashboards against a live Prometheus: the committed files are the rendering of the
//! runbook's queries, and every panel's query returns data from a Prometheus that scrapes a seeded
//! hypertool — with two hours of history backfilled (`promtool tsdb create-blocks-from
//! openmetrics`) from the same server's exposition, so windows like `[1h] offset 30m` have data.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hypertool::core::clock::{Clock, ManualClock};
use hypertool::runbook::grafana::{dashboards, panel_queries};
use serde_json::{json, Value};

use crate::common::*;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn committed_dashboards_are_the_rendering_of_the_runbook() {
    for (file, dashboard) in dashboards() {
        let committed: Value = serde_json::from_str(
            &std::fs::read_to_string(repo(&format!("deploy/grafana/{file}"))).unwrap(),
        )
        .unwrap();
        assert!(
            committed == dashboard,
            "deploy/grafana/{file} is stale: run `cargo run -- grafana --out deploy/grafana`"
        );
        // Importable: a title, a uid, panels with a data source and a query.
        assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
        for p in dashboard["panels"].as_array().unwrap() {
            if p["type"] != "row" {
                assert_eq!(p["datasource"]["uid"], "${datasource}");
                assert!(p["targets"][0]["expr"].is_string());
            }
        }
    }
}

/// Adds `job` and `instance` and a timestamp to every sample line of an OpenMetrics exposition.
fn stamp(line: &str, labels: &str, ts: i64) -> String {
    let (series, value) = match line.find('{') {
        Some(open) if open < line.find(' ').unwrap_or(usize::MAX) => {
            let close = line.rfind('}').unwrap();
            let name = &line[..open];
            let inner = &line[open + 1..close];
            let sep = if inner.is_empty() { "" } else { "," };
            (
                format!("{name}{{{labels}{sep}{inner}}}"),
                line[close + 1..].trim(),
            )
        }
        _ => {
            let (name, value) = line.split_once(' ').unwrap();
            (format!("{name}{{{labels}}}"), value.trim())
        }
    };
    format!("{series} {value} {ts}")
}

/// Expositions taken at several times, as one OpenMetrics file: each family once, each series'
/// samples together and in time order.
fn history(snapshots: &[(i64, String)], labels: &str) -> String {
    /// A family's metadata lines, and its stamped sample lines by series.
    type Family = (Vec<String>, BTreeMap<String, Vec<String>>);
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (ts, text) in snapshots {
        let mut family = String::new();
        for line in text.lines() {
            if line == "# EOF" || line.is_empty() {
                continue;
            }
            if let Some(meta) = line.strip_prefix("# ") {
                let name = meta.split_whitespace().nth(1).unwrap_or("").to_string();
                if name != family {
                    family = name.clone();
                    if !families.contains_key(&family) {
                        order.push(family.clone());
                    }
                }
                let entry = families.entry(family.clone()).or_default();
                if !entry.0.contains(&line.to_string()) {
                    entry.0.push(line.to_string());
                }
                continue;
            }
            let stamped = stamp(line, labels, *ts);
            let key = stamped.rsplitn(3, ' ').nth(2).unwrap().to_string();
            families
                .entry(family.clone())
                .or_default()
                .1
                .entry(key)
                .or_default()
                .push(stamped);
        }
    }
    let mut out = String::new();
    for name in order {
        let (meta, series) = &families[&name];
        for m in meta {
            out.push_str(m);
            out.push('\n');
        }
        for lines in series.values() {
            for l in lines {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

async fn otlp_receiver() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(|| async { "" }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/v1/traces")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_data_from_a_live_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let otlp = otlp_receiver().await;
    let toml = config_copy(dir.path());
    let text = std::fs::read_to_string(&toml).unwrap();
    let commented = "# endpoint = \"http://127.0.0.1:4318/v1/traces\"";
    assert!(text.contains(commented));
    std::fs::write(
        &toml,
        text.replace(commented, &format!("endpoint = \"{otlp}\"")),
    )
    .unwrap();
    // An experiment: a gated stage with two variants, so that the variant panels have data.
    std::fs::write(
        toml.parent().unwrap().join("workflows/experiment.yml"),
        "name: experiment\ndescription: two tiers of one stage\nstages:\n  - name: implement\n    quality_gate:\n      min_lines: 1\n    variants:\n      - name: fast\n        model: fast\n      - name: balanced\n        model: balanced\n",
    )
    .unwrap();
    // Two hours of virtual time that end a minute ago, one step a minute.
    let steps = 120;
    let real_now = chrono::Utc::now().timestamp_millis();
    let clock = Arc::new(ManualClock::new(real_now - (steps + 1) * 60_000));
    let s = start(
        hypertool::config::Source::File(toml),
        &dir.path().join("data"),
        clock.clone(),
    )
    .await;
    let http = s.http.clone();
    let post = |path: &str, body: Value| {
        let req = http.post(format!("{}{path}", s.api)).json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // A stage that never ends (running), from the start.
    let run: Value = http
        .post(format!("{}/v1/workflows/incident-response/runs", s.api))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run = run["id"].as_str().unwrap().to_string();
    assert_eq!(
        post(
            &format!("/v1/workflows/incident-response/runs/{run}/stages/diagnosis/start"),
            json!({})
        )
        .await,
        200
    );
    let mut snapshots = Vec::new();
    for i in 0..steps {
        // Usage alternating personas in one session (inferred switches, oscillations), more in
        // the last half hour (a spike), with durations, cost and repeated prompts.
        let extra = if i >= steps - 30 { 60 } else { 0 };
        let events = json!([
            {"type": "usage", "persona": "backend-engineer", "chatmode": "feature-implementation", "model": "gpt-4o",
             "prompt_tokens": 30 + extra, "completion_tokens": 10, "session": "osc", "duration_seconds": 2.5,
             "cost_usd": 0.01, "prompt_hash": format!("p{}", i % 4)},
            {"type": "usage", "persona": "testing-specialist", "chatmode": "feature-implementation", "model": "gpt-4o-mini",
             "prompt_tokens": 20, "completion_tokens": 5, "session": "osc", "duration_seconds": 0.8},
            {"type": "stage", "workflow": "feature-development", "stage": "implementation", "persona": "backend-engineer",
             "model": if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" }, "duration_seconds": 400,
             "gate": if i % 3 == 0 { "pass" } else { "fail" }, "reason": "code_block: no fenced code block"},
        ]);
        assert_eq!(post("/v1/events", json!({ "events": events })).await, 200);
        // A gateway call (the mock upstream): requests, prompt sizes.
        let status = http
            .post(format!("{}/v1/chat/completions", s.api))
            .header("x-hypertool-persona", "backend-engineer")
            .json(&json!({"model": "mock/gpt-4o", "messages": [{"role": "user", "content": format!("step {i}")}]}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
        // A run of the experiment's stage: a variant drawn, a gate verdict on its output.
        let run: Value = http
            .post(format!("{}/v1/workflows/experiment/runs", s.api))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let status = http
            .post(format!("{}/v1/chat/completions", s.api))
            .header("x-hypertool-persona", "backend-engineer")
            .header("x-hypertool-workflow", "experiment")
            .header("x-hypertool-stage", "implement")
            .header("x-hypertool-run", run["id"].as_str().unwrap())
            .json(&json!({"model": "any", "messages": [{"role": "user", "content": format!("implement {i}")}]}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
        // Explicit switches, the second inside the cooldown (refused).
        if i % 10 == 0 {
            for to in ["devops-engineer", "backend-engineer"] {
                assert_eq!(
                    post(
                        "/v1/personas/switch",
                        json!({"session": "explicit", "to": to, "chatmode": "incident"})
                    )
                    .await,
                    200
                );
            }
        }
        clock.advance_secs(60);
        let exposition = http
            .get(format!("{}/metrics", s.metrics))
            .header("accept", "application/openmetrics-text; version=1.0.0")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        snapshots.push((clock.now_ms() / 1000, exposition));
    }
    let target = s.metrics.trim_start_matches("http://").to_string();
    let file = dir.path().join("history.om");
    std::fs::write(
        &file,
        history(
            &snapshots,
            &format!("job=\"hypertool\",instance=\"{target}\""),
        ),
    )
    .unwrap();
    let data = dir.path().join("prom-data");
    let out = Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics", "-q"])
        .arg(&file)
        .arg(&data)
        .output()
        .expect("promtool is needed: install Debian's `prometheus` package (scripts/test.sh does)");
    assert!(
        out.status.success(),
        "backfill: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hypertool\n    static_configs:\n      - targets: [\"{target}\"]\n"
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
    let prom = format!("http://{listen}");
    let query = |expr: String| {
        let http = http.clone();
        let url = format!("{prom}/api/v1/query");
        async move {
            let v: Value = http
                .get(url)
                .query(&[("query", expr.as_str())])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some(v)
        }
    };
    // A few live scrapes beside the history, so one-minute rates have two samples.
    eventually(
        "Prometheus to scrape hypertool",
        Duration::from_secs(60),
        || {
            let q = query("count_over_time(up{job=\"hypertool\"}[1m]) >= 3".into());
            async move {
                q.await
                    .filter(|v| {
                        v["data"]["result"]
                            .as_array()
                            .is_some_and(|a| !a.is_empty())
                    })
                    .map(|_| ())
            }
        },
    )
    .await;
    // The backfilled history is there.
    let old = query("count_over_time(hypertool_persona_tokens_used_total[3h])".into())
        .await
        .unwrap();
    assert!(
        old["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|n| n.parse::<f64>().ok())
            .is_some_and(|n| n >= 100.0),
        "backfilled samples: {old}"
    );

    let mut failed = Vec::new();
    let mut checked = 0;
    for (file, dashboard) in dashboards() {
        for expr in panel_queries(&dashboard) {
            checked += 1;
            let v = query(expr.clone()).await.unwrap_or(Value::Null);
            let results = v["data"]["result"].as_array().cloned().unwrap_or_default();
            let finite = results.iter().any(|r| {
                r["value"][1]
                    .as_str()
                    .and_then(|n| n.parse::<f64>().ok())
                    .is_some_and(f64::is_finite)
            });
            if v["status"] != "success" || !finite {
                failed.push(format!("{file}: {expr}\n  -> {v}"));
            }
        }
    }
    assert!(checked >= 25, "{checked} panels");
    assert!(
        failed.is_empty(),
        "panels without data:\n{}",
        failed.join("\n")
    );

    runbook_commands_run(dir.path(), &s.api, &s.metrics, &prom).await;
}

/// Issue 29: every command in `docs/ALERT_RUNBOOK.md`'s shell blocks, run against this seeded
/// server and Prometheus (`$API`, `$PROM`, the placeholders SESSION, WORKFLOW and the metrics
/// address replaced): each `hypertool …` is a command the binary takes as written (no usage error),
/// each `curl` gets a 2xx answer. (The runbook's PromQL is checked by `runbook::queries`.)
async fn runbook_commands_run(dir: &std::path::Path, api: &str, metrics: &str, prom: &str) {
    let runbook = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ALERT_RUNBOOK.md"),
    )
    .unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("hypertool");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_hypertool"), &link).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in runbook.lines() {
        if line.starts_with("```") {
            in_block = line == "```bash";
            continue;
        }
        if !in_block {
            continue;
        }
        // A command's own line, continued with `\`; its comment dropped.
        let code = line.split(" #").next().unwrap_or("").trim_end();
        match code.strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(code);
                let command = std::mem::take(&mut pending);
                if !command.trim().is_empty() && !command.trim_start().starts_with('#') {
                    commands.push(command.trim().to_string());
                }
            }
        }
    }
    assert!(commands.len() >= 15, "{commands:?}");
    let metrics_addr = metrics.trim_start_matches("http://");
    let mut failed = Vec::new();
    for command in &commands {
        // A curl piped into `head` may be cut off by it (exit 23): the curl alone is what is checked.
        let command_run = if command.starts_with("curl") {
            command.split(" | ").next().unwrap_or(command)
        } else {
            command.as_str()
        };
        let script = command_run
            .replace("SESSION", "osc")
            .replace("WORKFLOW", "feature-development")
            .replace("http://127.0.0.1:9464", &format!("http://{metrics_addr}"))
            .replacen("curl -s ", "curl -sf ", 1);
        let out = tokio::process::Command::new("bash")
            .args(["-c", &script])
            .current_dir(dir)
            .env("PATH", &path)
            .env("API", api)
            .env("PROM", prom)
            .env("HYPERTOOL_SERVER", api)
            .env("HYPERTOOL_API_KEY", "")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let usage_error = out.status.code() == Some(2)
            || stderr.contains("unexpected argument")
            || stderr.contains("unrecognized subcommand");
        let curl_failed = command.starts_with("curl") && !out.status.success();
        if usage_error || curl_failed {
            failed.push(format!("{command}\n  -> {:?}: {stderr}", out.status.code()));
        }
    }
    assert!(
        failed.is_empty(),
        "runbook commands that do not run as written:\n{}",
        failed.join("\n")
    );
}
