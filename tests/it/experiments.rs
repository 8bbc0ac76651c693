//! Experiments on stages: variants (model, prompt, temperature) assigned per run — sticky across
//! dialects, reloads and restarts — their prompts applied in every dialect and recorded with their
//! version on each call.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hypertool::config::Source;
use hypertool::core::clock::ManualClock;
use hypertool::core::workflow::Prompt;
use serde_json::json;

use crate::common::*;
use crate::dialects::{both_kinds, export_anthropic_key};

const V1: &str = "You are variant one: write Python with tests.";
const V2: &str = "You are variant two: write Rust with tests.";

fn workflow(weights: &str) -> String {
    format!(
        r#"
name: exp
description: two variants of one stage
stages:
  - name: implement
    persona: backend-engineer
    variants:
      - name: chat-v1
        model: ok
        prompt: prompts/impl-v1.md
      - name: claude-v2
        model: claude-ok
        prompt: prompts/impl-v2.md
        temperature: 0.2
    allocation: {weights}
"#
    )
}

/// The configuration of the two-prompt experiment (both upstream kinds, the prompt files, the
/// workflow with `weights`): hypertool.toml and the workflow file.
fn two_prompt_config(
    dir: &Path,
    upstream: &FakeUpstream,
    weights: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    export_anthropic_key();
    let toml = gateway_config(dir, &upstream.base_url, &both_kinds(upstream));
    let config = toml.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(config.join("prompts")).unwrap();
    std::fs::write(config.join("prompts/impl-v1.md"), V1).unwrap();
    std::fs::write(config.join("prompts/impl-v2.md"), V2).unwrap();
    let wf = config.join("workflows/exp.yml");
    std::fs::write(&wf, workflow(weights)).unwrap();
    (toml, wf)
}

async fn start_at(dir: &Path, toml: &Path) -> TestServer {
    start(
        Source::File(toml.to_path_buf()),
        &dir.join("data"),
        Arc::new(ManualClock::new(T0)),
    )
    .await
}

async fn new_run(s: &TestServer) -> String {
    let (status, run) = s
        .post_raw("/v1/workflows/exp/runs", json!({}).to_string())
        .await;
    assert_eq!(status, 201, "{run}");
    run["id"].as_str().unwrap().to_string()
}

/// A call of the run's stage in `route`'s dialect; the variant it used.
async fn stage_call(s: &TestServer, route: &str, run: &str) -> String {
    let body = match route {
        "/v1/chat/completions" => {
            json!({"model": "any", "messages": [{"role": "user", "content": "go"}]})
        }
        "/v1/messages" => {
            json!({"model": "any", "max_tokens": 50, "messages": [{"role": "user", "content": "go"}]})
        }
        _ => json!({"model": "any", "input": "go"}),
    };
    let r = s
        .http
        .post(format!("{}{route}", s.api))
        .header("x-hypertool-persona", "backend-engineer")
        .header("x-hypertool-workflow", "exp")
        .header("x-hypertool-stage", "implement")
        .header("x-hypertool-run", run)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{route}");
    r.headers()["x-hypertool-variant"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_variant_holds_in_every_dialect_across_a_reload_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let (toml, wf) = two_prompt_config(dir.path(), &upstream, "{chat-v1: 1, claude-v2: 1}");
    let s = start_at(dir.path(), &toml).await;

    // Forty runs, each assigned once (by its first call), about half each way.
    let mut by_variant: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for _ in 0..40 {
        let run = new_run(&s).await;
        let v = stage_call(&s, "/v1/messages", &run).await;
        by_variant.entry(v).or_default().push(run);
    }
    let shares: Vec<usize> = by_variant.values().map(Vec::len).collect();
    assert_eq!(by_variant.len(), 2, "{by_variant:?}");
    assert!(shares.iter().all(|n| *n >= 8), "{shares:?}");
    let one = by_variant["chat-v1"][0].clone();
    let two = by_variant["claude-v2"][0].clone();

    // Every dialect's call of a run uses the run's variant, with its prompt first.
    for route in ["/v1/chat/completions", "/v1/messages", "/v1/responses"] {
        assert_eq!(stage_call(&s, route, &one).await, "chat-v1", "{route}");
        let seen = upstream.stats().await["last_messages"][0].clone();
        assert_eq!(seen["role"], "system", "{route}: {seen}");
        assert!(
            seen["content"].as_str().unwrap().starts_with(V1),
            "{route}: {seen}"
        );

        assert_eq!(stage_call(&s, route, &two).await, "claude-v2", "{route}");
        let body = upstream.stats().await["anthropic"]["body"].clone();
        assert!(
            body["system"].as_str().unwrap().starts_with(V2),
            "{route}: {body}"
        );
        assert_eq!(body["temperature"], 0.2, "{route}");
    }
    // Each call is in the ledger with its variant and its prompt's version.
    let (v1, v2) = (Prompt::new("p", V1).version, Prompt::new("p", V2).version);
    let usage = ledger_events(dir.path(), "usage");
    assert_eq!(usage.len(), 46);
    for u in &usage {
        let expected = match u["variant"].as_str() {
            Some("chat-v1") => &v1,
            Some("claude-v2") => &v2,
            other => panic!("no variant on {u}: {other:?}"),
        };
        assert_eq!(u["prompt_version"].as_str(), Some(expected.as_str()), "{u}");
    }

    // `hypertool prompts` lists each prompt with its version and the variants using it.
    let out = std::process::Command::new(crate::process::BIN)
        .args(["prompts", "--config"])
        .arg(&toml)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("prompts/impl-v1.md") && text.contains(&v1),
        "{text}"
    );
    assert!(
        text.contains("exp/implement/claude-v2") && text.contains(&v2),
        "{text}"
    );

    // A reload that sends every new run to claude-v2 does not move a running stage.
    let before = reloads(&s.metrics().await);
    std::fs::write(&wf, workflow("{chat-v1: 0, claude-v2: 1}")).unwrap();
    eventually("the reload", Duration::from_secs(10), || async {
        (reloads(&s.metrics().await) > before).then_some(())
    })
    .await;
    assert_eq!(stage_call(&s, "/v1/responses", &one).await, "chat-v1");
    for _ in 0..5 {
        let run = new_run(&s).await;
        assert_eq!(
            stage_call(&s, "/v1/chat/completions", &run).await,
            "claude-v2"
        );
    }
    s.stop().await;

    // After a restart (the assignment comes back from the ledger), still.
    let s = start_at(dir.path(), &toml).await;
    assert_eq!(stage_call(&s, "/v1/messages", &one).await, "chat-v1");
    assert_eq!(stage_call(&s, "/v1/messages", &two).await, "claude-v2");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_started_by_the_api_draws_the_variant_its_calls_then_keep() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let (toml, _) = two_prompt_config(dir.path(), &upstream, "{chat-v1: 1, claude-v2: 3}");
    let s = start_at(dir.path(), &toml).await;
    for _ in 0..6 {
        let run = new_run(&s).await;
        let (status, _) = s
            .post_raw(
                &format!("/v1/workflows/exp/runs/{run}/stages/implement/start"),
                json!({}).to_string(),
            )
            .await;
        assert_eq!(status, 200);
        let (_, r) = s.get_json(&format!("/v1/workflows/exp/runs/{run}")).await;
        let drawn = r["stages"]["implement"]["variant"]
            .as_str()
            .unwrap_or_else(|| panic!("no variant in {r}"))
            .to_string();
        assert_eq!(stage_call(&s, "/v1/chat/completions", &run).await, drawn);
    }
    s.stop().await;
}

/// A gated stage whose two variants' answers pass the gate 35 % and 80 % of the time.
fn gated_workflow(allocation: &str) -> String {
    format!(
        r#"
name: exp
description: which model passes the gate more often
# which model passes the gate more often
stages:
  - name: implement
    quality_gate:
      code_block: python
    min_runs_per_variant: 5
    variants:
      - name: lo
        model: p35
      - name: hi
        model: p80
    allocation: {allocation}
"#
    )
}

/// `runs` runs of the gated stage, one call each, in order; the variant of each.
async fn run_gated(s: &TestServer, runs: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let run = new_run(s).await;
        out.push(stage_call(s, "/v1/chat/completions", &run).await);
    }
    out
}

async fn gated_server(dir: &Path, upstream: &FakeUpstream, allocation: &str) -> TestServer {
    let toml = gateway_config(
        dir,
        &upstream.base_url,
        "\n[[gateway.models]]\nname = \"p35\"\nupstream = \"fake\"\n\n[[gateway.models]]\nname = \"p80\"\nupstream = \"fake\"\n",
    );
    // Alerts (and experiments' decisions) evaluated every second.
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("evaluation_interval = \"15s\""));
    std::fs::write(
        &toml,
        text.replace(
            "evaluation_interval = \"15s\"",
            "evaluation_interval = \"1s\"",
        ),
    )
    .unwrap();
    std::fs::write(
        toml.parent().unwrap().join("workflows/exp.yml"),
        gated_workflow(allocation),
    )
    .unwrap();
    start_at(dir, &toml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_allocation_sends_most_runs_to_the_variant_that_passes_more() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = gated_server(dir.path(), &upstream, "adaptive").await;
    // 300 runs: in a simulation of this set-up (2,000 trials), the last half always had at least
    // 80 % on hi and the experiment was always decided; at 200 runs, 0.15 % were not decided yet.
    let variants = run_gated(&s, 300).await;
    let late_hi = variants[150..].iter().filter(|v| *v == "hi").count();
    assert!(late_hi >= 120, "{late_hi} of the last 150 runs on hi");
    // The floor keeps the worse variant measured.
    assert!(variants.iter().any(|v| v == "lo"));
    // The counters it decided on are the exported ones.
    let m = s.metrics().await;
    let runs = |v: &str| {
        m.get(
            "hypertool_variant_runs_total",
            &[("workflow", "exp"), ("stage", "implement"), ("variant", v)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(runs("lo") + runs("hi"), 300.0);
    let passes = m
        .get(
            "hypertool_variant_quality_gate_total",
            &[
                ("workflow", "exp"),
                ("stage", "implement"),
                ("variant", "hi"),
                ("result", "pass"),
            ],
        )
        .unwrap_or(0.0);
    assert!(passes > 0.5 * runs("hi"), "{passes} of {}", runs("hi"));

    // The evidence: hi is best, decided, by the API and by the command.
    let (status, report) = s.get_json("/api/experiments/exp/implement").await;
    assert_eq!(status, 200);
    assert_eq!(report["decided"], "hi", "{report}");
    let hi = report["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["variant"] == "hi")
        .unwrap()
        .clone();
    assert!(hi["p_best"].as_f64().unwrap() >= 0.95, "{hi}");
    let (lo_bound, hi_bound) = (
        hi["pass_rate_interval"][0].as_f64().unwrap(),
        hi["pass_rate_interval"][1].as_f64().unwrap(),
    );
    assert!(
        lo_bound < hi["pass_rate"].as_f64().unwrap() && hi_bound <= 1.0,
        "{hi}"
    );
    // The interval is the 95 % Wilson score interval of hi's verdicts, computed here from the
    // counters alone: its width shrinks with the evidence as 1/sqrt(n).
    let fails = m
        .get(
            "hypertool_variant_quality_gate_total",
            &[
                ("workflow", "exp"),
                ("stage", "implement"),
                ("variant", "hi"),
                ("result", "fail"),
            ],
        )
        .unwrap_or(0.0);
    let (n, p, z) = (passes + fails, passes / (passes + fails), 1.959_964_f64);
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt() / (1.0 + z * z / n);
    assert!((lo_bound - (centre - half).max(0.0)).abs() < 1e-4, "{hi}");
    assert!((hi_bound - (centre + half).min(1.0)).abs() < 1e-4, "{hi}");
    assert!(
        hi_bound - lo_bound < 0.2,
        "{n} verdicts give a narrow interval: {hi}"
    );
    let out = std::process::Command::new(crate::process::BIN)
        .args([
            "experiments",
            "show",
            "exp",
            "implement",
            "--server",
            &s.api,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("decided: hi is best"), "{text}");
    assert!(text.contains("P(BEST)"), "{text}");
    assert!(
        text.contains("RETRIES/RUN") && text.contains("ESCALATIONS/RUN") && text.contains("P95"),
        "{text}"
    );
    // Every run ended with its first verdict (no retries configured), and each run's stage was
    // timed on its variant.
    assert_eq!(hi["retries_per_run"], 0.0, "{hi}");
    assert_eq!(hi["escalations_per_run"], 0.0, "{hi}");
    let share = hi["traffic_share"].as_f64().unwrap();
    assert!((share - runs("hi") / 300.0).abs() < 1e-9, "{hi}");

    // The decision is recorded once (the alert evaluation, every second here, looks), counted,
    // and stays counted once however often it is looked at again.
    let decisions = |m: &Exposition| {
        m.get(
            "hypertool_experiment_decisions_total",
            &[
                ("workflow", "exp"),
                ("stage", "implement"),
                ("variant", "hi"),
            ],
        )
    };
    eventually("the decision counted", Duration::from_secs(20), || async {
        (decisions(&s.metrics().await) == Some(1.0)).then_some(())
    })
    .await;
    let state = &s.running.as_ref().unwrap().state;
    hypertool::server::experiments::record_decisions(state).await;
    hypertool::server::experiments::record_decisions(state).await;
    assert_eq!(decisions(&s.metrics().await), Some(1.0));
    let recorded = ledger_events(dir.path(), "experiment_decided");
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["variant"], "hi");
    assert!(recorded[0]["p_best"].as_f64().unwrap() >= 0.95);

    // The runbook's investigation of failing gates points to it, with the command that adopts it.
    let (status, inv) = s
        .get_json("/api/investigations/HighQualityGateFailureRate")
        .await;
    assert_eq!(status, 200, "{inv}");
    let finding = inv["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "experiments on the failing stages")
        .cloned()
        .unwrap_or_else(|| panic!("no experiments finding: {inv}"));
    assert!(
        finding["found"]
            .as_str()
            .unwrap()
            .contains("exp/implement: decided, `hi` is best"),
        "{finding}"
    );
    assert!(
        finding["found"]
            .as_str()
            .unwrap()
            .contains("hypertool experiments promote exp implement hi"),
        "{finding}"
    );

    // The dashboard's panel: each variant's share of the runs, pass rate with its interval and
    // P(best), and the decision.
    let mut b = crate::dashboard::Browser::start().await;
    b.call("Page.navigate", json!({"url": format!("{}/", s.api)}))
        .await;
    let decided = b
        .wait_for(
            "the experiment panel",
            r#"(document.querySelector('[data-experiment="exp/implement"]') || {dataset: {}}).dataset.decided || null"#,
            |v| v.is_string(),
        )
        .await;
    assert_eq!(decided, "hi");
    let shown_share = b
        .eval(r#"Number(document.querySelector('[data-experiment="exp/implement"] [data-variant="hi"]').dataset.share)"#)
        .await;
    assert!((shown_share.as_f64().unwrap() - share).abs() < 1e-9);
    let shown = b
        .eval(r#"document.querySelector('[data-experiment="exp/implement"]').innerText"#)
        .await;
    assert!(
        shown
            .as_str()
            .unwrap()
            .contains("hypertool experiments promote exp implement hi"),
        "{shown}"
    );
    assert_eq!(
        b.eval(
            r#"document.querySelectorAll('[data-experiment="exp/implement"] .ci .range').length"#
        )
        .await,
        2
    );
    assert!(b.errors().is_empty(), "console errors: {:#?}", b.errors());
    drop(b);

    // Promotion: the file keeps its comments and loses the other variant; the reload applies it,
    // and the ledger records the change.
    let toml = dir.path().join("config/hypertool.toml");
    let wf = dir.path().join("config/workflows/exp.yml");
    let before = reloads(&s.metrics().await);
    let out = std::process::Command::new(crate::process::BIN)
        .args([
            "experiments",
            "promote",
            "exp",
            "implement",
            "hi",
            "--config",
        ])
        .arg(&toml)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&wf).unwrap();
    assert!(
        text.contains("# which model passes the gate more often"),
        "{text}"
    );
    assert!(
        !text.contains("p35") && !text.contains("allocation"),
        "{text}"
    );
    eventually("the reload", Duration::from_secs(10), || async {
        (reloads(&s.metrics().await) > before).then_some(())
    })
    .await;
    for v in run_gated(&s, 5).await {
        assert_eq!(v, "hi");
    }
    // Recorded right after the reload is applied (not awaited by it).
    let last = eventually(
        "the promotion recorded",
        Duration::from_secs(10),
        || async { ledger_events(dir.path(), "variants_changed").pop() },
    )
    .await;
    assert_eq!(
        last["after"]["variants"].as_array().unwrap().len(),
        1,
        "{last}"
    );
    assert_eq!(
        last["before"]["variants"].as_array().unwrap().len(),
        2,
        "{last}"
    );
    // A promotion the configuration would refuse is not written.
    let out = std::process::Command::new(crate::process::BIN)
        .args([
            "experiments",
            "promote",
            "exp",
            "implement",
            "lo",
            "--config",
        ])
        .arg(&toml)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no variant `lo`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&wf).unwrap(), text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_weights_give_the_configured_shares() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let s = gated_server(dir.path(), &upstream, "{lo: 1, hi: 3}").await;
    let variants = run_gated(&s, 400).await;
    let hi = variants.iter().filter(|v| *v == "hi").count() as f64 / 400.0;
    // 75 %; the binomial's sd at n = 400 is 2.2 points: ± 8 points is 3.7 sd (a false alarm
    // in about 1 run of 5,000).
    assert!((hi - 0.75).abs() < 0.08, "{hi}");
    s.stop().await;
}

/// The usage events of the ledger's `run`, in order.
fn usage_of(dir: &Path, run: &str) -> Vec<serde_json::Value> {
    ledger_events(dir, "usage")
        .into_iter()
        .filter(|u| u["run"] == run)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_edit_is_an_event_the_next_calls_carry_and_a_bad_variant_edit_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let (toml, wf) = two_prompt_config(dir.path(), &upstream, "{chat-v1: 1, claude-v2: 0}");
    let s = start_at(dir.path(), &toml).await;
    let run = new_run(&s).await;
    assert_eq!(
        stage_call(&s, "/v1/chat/completions", &run).await,
        "chat-v1"
    );
    let (v1, edited) = (
        Prompt::new("p", V1).version,
        Prompt::new(
            "p",
            "You are variant one, edited: write Python with doctests.",
        )
        .version,
    );

    // The prompt file is edited: the reload records it, and the next calls of the same run (its
    // variant kept) send the new text and carry its version.
    let before = reloads(&s.metrics().await);
    let prompt = toml.parent().unwrap().join("prompts/impl-v1.md");
    std::fs::write(
        &prompt,
        "You are variant one, edited: write Python with doctests.",
    )
    .unwrap();
    eventually("the reload", Duration::from_secs(10), || async {
        (reloads(&s.metrics().await) > before).then_some(())
    })
    .await;
    // Recorded right after the reload is applied (not awaited by it).
    let changes = eventually(
        "the prompt edit recorded",
        Duration::from_secs(10),
        || async {
            let changes = ledger_events(dir.path(), "variants_changed");
            (!changes.is_empty()).then_some(changes)
        },
    )
    .await;
    let change = changes.last().unwrap();
    let versions = |side: &str| {
        change[side]["variants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "chat-v1")
            .map(|v| v["prompt_version"].clone())
            .unwrap()
    };
    assert_eq!(versions("before"), json!(v1), "{change}");
    assert_eq!(versions("after"), json!(edited), "{change}");
    assert_eq!(stage_call(&s, "/v1/messages", &run).await, "chat-v1");
    let seen = upstream.stats().await["last_messages"][0].clone();
    assert!(
        seen["content"]
            .as_str()
            .unwrap()
            .starts_with("You are variant one, edited"),
        "{seen}"
    );
    let calls = usage_of(dir.path(), &run);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["prompt_version"], json!(v1));
    assert_eq!(calls[1]["prompt_version"], json!(edited));

    // A variant edit the configuration refuses (a prompt file that does not exist, a duplicate
    // name): `hypertool check` names file and line, the reload fails, and the running
    // configuration stays — same variant, same prompt, no change recorded.
    let failures = |m: &Exposition| {
        m.get("hypertool_config_reloads_total", &[("result", "failure")])
            .unwrap_or(0.0)
    };
    let failed_before = failures(&s.metrics().await);
    let changes_before = ledger_events(dir.path(), "variants_changed").len();
    let bad = workflow("{chat-v1: 1, claude-v2: 0}")
        .replace("prompts/impl-v1.md", "prompts/impl-v9.md")
        .replace("name: claude-v2", "name: chat-v1");
    std::fs::write(&wf, &bad).unwrap();
    eventually("the refused reload", Duration::from_secs(10), || async {
        (failures(&s.metrics().await) > failed_before).then_some(())
    })
    .await;
    let out = std::process::Command::new(crate::process::BIN)
        .args(["check", "--config"])
        .arg(&toml)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let file = wf.display();
    assert!(
        stderr.contains(&format!("{file}:10: stage `implement`, variant `chat-v1`: prompt file `prompts/impl-v9.md` does not exist")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{file}:11: stage `implement`: variant `chat-v1` appears twice"
        )),
        "{stderr}"
    );
    for _ in 0..3 {
        let fresh = new_run(&s).await;
        assert_eq!(stage_call(&s, "/v1/responses", &fresh).await, "chat-v1");
        assert_eq!(
            usage_of(dir.path(), &fresh)[0]["prompt_version"],
            json!(edited)
        );
    }
    assert_eq!(
        ledger_events(dir.path(), "variants_changed").len(),
        changes_before
    );
    let (_, shown) = s.get_json("/v1/workflows/exp").await;
    assert_eq!(
        shown["stages"][0]["experiment"]["variants"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{shown}"
    );
    s.stop().await;
}

/// A replica of the two-prompt experiment on the PostgreSQL ledger at `url`.
async fn replica_on(
    dir: &Path,
    upstream: &FakeUpstream,
    url: &str,
    weights: &str,
) -> (TestServer, std::path::PathBuf) {
    let (toml, wf) = two_prompt_config(dir, upstream, weights);
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("[ledger]\n"));
    std::fs::write(
        &toml,
        text.replacen("[ledger]\n", &format!("[ledger]\nurl = \"{url}\"\n"), 1),
    )
    .unwrap();
    (start_at(dir, &toml).await, wf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgresql_ledger_give_a_run_one_variant() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path()).await;
    let upstream = FakeUpstream::start(dir.path()).await;
    let weights = "{chat-v1: 1, claude-v2: 1}";
    let (a, _) = replica_on(&dir.path().join("a"), &upstream, &pg.url, weights).await;
    let (b, b_workflow) = replica_on(&dir.path().join("b"), &upstream, &pg.url, weights).await;

    // Each run's first call on one replica, its next at once on the other (before or after that
    // one has read the first's assignment from the ledger: the draw is the run id's, so they
    // agree either way), and the runs are spread over both variants.
    let mut assigned: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..24 {
        let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let run = new_run(first).await;
        let v = stage_call(first, "/v1/chat/completions", &run).await;
        assert_eq!(stage_call(second, "/v1/messages", &run).await, v, "{run}");
        assigned.insert(run, v);
    }
    let on = |name: &str| assigned.values().filter(|v| *v == name).count();
    assert!(on("chat-v1") >= 4 && on("claude-v2") >= 4, "{assigned:?}");

    // Replica b's configuration now sends every new run to claude-v2: its new runs follow, and
    // the runs already assigned keep their variant on both replicas.
    let before = reloads(&b.metrics().await);
    std::fs::write(&b_workflow, workflow("{chat-v1: 0, claude-v2: 1}")).unwrap();
    eventually("b's reload", Duration::from_secs(10), || async {
        (reloads(&b.metrics().await) > before).then_some(())
    })
    .await;
    for _ in 0..3 {
        let run = new_run(&b).await;
        assert_eq!(stage_call(&b, "/v1/responses", &run).await, "claude-v2");
    }
    for (run, v) in &assigned {
        assert_eq!(&stage_call(&b, "/v1/responses", run).await, v, "{run} on b");
        assert_eq!(&stage_call(&a, "/v1/responses", run).await, v, "{run} on a");
    }
    // One assignment per run in the shared ledger, whichever replica made it.
    let started = pg.query(
        "SELECT count(*), count(DISTINCT body::jsonb->>'run') FROM hypertool_events WHERE kind = 'stage_started'",
    );
    let (starts, runs): (i64, i64) = (started[0].get(0), started[0].get(1));
    assert_eq!(runs, 27);
    assert!(starts >= runs, "{starts} starts for {runs} runs");
    a.stop().await;
    b.stop().await;
}

/// The variant `run` (or a session) draws by the README's rule: the stage's allocation seeded by
/// the run id, the same on every replica (fixed weights: the record plays no part).
fn draw_of(toml: &Path, key: &str) -> String {
    let config = hypertool::config::load(&Source::File(toml.to_path_buf())).unwrap();
    let stage = config
        .workflows
        .get("exp")
        .unwrap()
        .stage("implement")
        .unwrap()
        .clone();
    let none = |_: &str| hypertool::core::workflow::VariantRecord::default();
    stage.draw_variant("exp", key, &none).unwrap().name.clone()
}

/// A stage call outside any run, in session `session`; the variant it used.
async fn session_call(s: &TestServer, session: &str) -> String {
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-persona", "backend-engineer")
        .header("x-hypertool-workflow", "exp")
        .header("x-hypertool-stage", "implement")
        .header("x-hypertool-session", session)
        .json(&json!({"model": "any", "messages": [{"role": "user", "content": "go"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["x-hypertool-variant"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_outside_a_run_draw_from_their_session_and_keep_its_variant() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start(dir.path()).await;
    let (toml, _) = two_prompt_config(dir.path(), &upstream, "{chat-v1: 1, claude-v2: 1}");
    let s = start_at(dir.path(), &toml).await;
    let mut seen = BTreeMap::new();
    for i in 0..16 {
        let session = format!("session-{i}");
        let first = session_call(&s, &session).await;
        assert_eq!(
            first,
            draw_of(&toml, &session),
            "{session}: drawn from its id"
        );
        // No run stores it: every later call of the session draws it again, the same.
        for _ in 0..3 {
            assert_eq!(session_call(&s, &session).await, first, "{session}");
        }
        *seen.entry(first).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "16 sessions draw both variants: {seen:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_first_calls_on_two_replicas_at_once_both_get_the_draw_of_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path()).await;
    let upstream = FakeUpstream::start(dir.path()).await;
    let weights = "{chat-v1: 1, claude-v2: 1}";
    let (a, _) = replica_on(&dir.path().join("a"), &upstream, &pg.url, weights).await;
    let (b, _) = replica_on(&dir.path().join("b"), &upstream, &pg.url, weights).await;
    let toml = dir.path().join("a/config/hypertool.toml");
    let mut seen = BTreeMap::new();
    for i in 0..12 {
        // A run the gateway starts: created, then its stage's first calls reach both replicas at
        // the same moment, before either has stored the assignment.
        let run = new_run(if i % 2 == 0 { &a } else { &b }).await;
        let expected = draw_of(&toml, &run);
        let (on_a, on_b) = tokio::join!(
            stage_call(&a, "/v1/chat/completions", &run),
            stage_call(&b, "/v1/messages", &run)
        );
        assert_eq!(
            (on_a.as_str(), on_b.as_str()),
            (expected.as_str(), expected.as_str()),
            "{run}"
        );
        *seen.entry(expected).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "12 runs draw both variants: {seen:?}");
    a.stop().await;
    b.stop().await;
}
