//! The runbook's metric contract: exact names, labels and values after a known event stream.

use std::process::Command;

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_configured_persona_has_budget_gauges_from_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let m = s.metrics().await;
    let expected = [
        ("backend-engineer", 2000.0),
        ("frontend-engineer", 1800.0),
        ("devops-engineer", 1800.0),
        ("testing-specialist", 1500.0),
        ("observability-expert", 2000.0),
        ("data-scientist", 1700.0),
    ];
    for (persona, budget) in expected {
        let labels = [("persona", persona)];
        assert_eq!(
            m.get("hypertool_persona_token_budget_remaining", &labels),
            Some(budget),
            "{persona}"
        );
        assert_eq!(
            m.get("hypertool_persona_token_budget_limit", &labels),
            Some(budget),
            "{persona}"
        );
    }
    assert_eq!(m.series("hypertool_persona_info").len(), 6);
    assert_eq!(m.get("langfuse_trace_created_total", &[]), Some(0.0));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_values_after_a_known_event_stream() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let t = |secs: i64| (T0 / 1000 + secs) as f64;
    let (status, body) = s
        .post_events(json!([
            {"type":"usage","persona":"tta-backend-engineer","chatmode":"feature","model":"gpt-4",
             "prompt_tokens":1500,"completion_tokens":750,"session":"s1","timestamp":t(0),"cost_usd":0.25},
            {"type":"usage","persona":"testing-specialist","chatmode":"feature","model":"gpt-4-mini",
             "prompt_tokens":100,"completion_tokens":20,"session":"s1","timestamp":t(30)},
            {"type":"persona_switch","session":"s2","from":null,"to":"devops-engineer","chatmode":"ops","timestamp":t(40)},
            {"type":"persona_switch","session":"s2","from":"devops-engineer","to":"tta-observability-expert","chatmode":"ops","timestamp":t(100)},
            {"type":"stage","workflow":"feature-development","stage":"implementation","persona":"backend-engineer",
             "model":"gpt-4","duration_seconds":400,"gate":"fail","reason":"missing tests","timestamp":t(110)},
            {"type":"stage","workflow":"feature-development","stage":"implementation","persona":"backend-engineer",
             "model":"gpt-4","duration_seconds":12.5,"gate":"pass","timestamp":t(120)}
        ]))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 6);
    let m = s.metrics().await;

    // Tokens, by canonical persona (the tta- alias resolves), chatmode and model.
    assert_eq!(
        m.get(
            "hypertool_persona_tokens_used_total",
            &[
                ("persona", "backend-engineer"),
                ("chatmode", "feature"),
                ("model", "gpt-4")
            ]
        ),
        Some(2250.0)
    );
    assert_eq!(
        m.get(
            "hypertool_persona_tokens_used_total",
            &[
                ("persona", "testing-specialist"),
                ("chatmode", "feature"),
                ("model", "gpt-4-mini")
            ]
        ),
        Some(120.0)
    );
    // Over budget: the gauge goes below zero (the original clamped it at 0).
    assert_eq!(
        m.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "backend-engineer")]
        ),
        Some(-250.0)
    );
    assert_eq!(
        m.get(
            "hypertool_persona_token_budget_remaining",
            &[("persona", "testing-specialist")]
        ),
        Some(1380.0)
    );
    assert_eq!(
        m.get(
            "hypertool_persona_cost_usd_total",
            &[
                ("persona", "backend-engineer"),
                ("chatmode", "feature"),
                ("model", "gpt-4")
            ]
        ),
        Some(0.25)
    );

    // The 80 % soft limit was reached once by backend-engineer, not by testing-specialist.
    assert_eq!(
        m.get(
            "hypertool_budget_soft_limit_reached_total",
            &[("persona", "backend-engineer")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "hypertool_budget_soft_limit_reached_total",
            &[("persona", "testing-specialist")]
        ),
        None
    );

    // Switches: one inferred from usage, two explicit (the first from nobody).
    assert_eq!(
        m.get(
            "hypertool_persona_switches_total",
            &[
                ("from_persona", "backend-engineer"),
                ("to_persona", "testing-specialist"),
                ("chatmode", "feature")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "hypertool_persona_switches_total",
            &[
                ("from_persona", "none"),
                ("to_persona", "devops-engineer"),
                ("chatmode", "ops")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "hypertool_persona_switches_total",
            &[
                ("from_persona", "devops-engineer"),
                ("to_persona", "observability-expert"),
                ("chatmode", "ops")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(m.sum("hypertool_persona_switches_total"), 3.0);

    // Time in persona: backend-engineer 30 s in s1, devops-engineer 60 s in s2.
    let be = [("persona", "backend-engineer"), ("chatmode", "feature")];
    assert_eq!(
        m.get("hypertool_persona_duration_seconds_count", &be),
        Some(1.0)
    );
    assert_eq!(
        m.get("hypertool_persona_duration_seconds_sum", &be),
        Some(30.0)
    );
    let ops = [("persona", "devops-engineer"), ("chatmode", "ops")];
    assert_eq!(
        m.get("hypertool_persona_duration_seconds_sum", &ops),
        Some(60.0)
    );

    // Stages and gates: result is exactly pass|fail; buckets reach past 300 s.
    let stage = [
        ("workflow", "feature-development"),
        ("stage", "implementation"),
        ("persona", "backend-engineer"),
    ];
    assert_eq!(
        m.get("hypertool_workflow_stage_duration_seconds_count", &stage),
        Some(2.0)
    );
    assert_eq!(
        m.get("hypertool_workflow_stage_duration_seconds_sum", &stage),
        Some(412.5)
    );
    let bucket = |le: &'static str| {
        let mut l = stage.to_vec();
        l.push(("le", le));
        m.get("hypertool_workflow_stage_duration_seconds_bucket", &l)
    };
    assert_eq!(bucket("300.0"), Some(1.0));
    assert_eq!(bucket("450.0"), Some(2.0));
    assert_eq!(bucket("+Inf"), Some(2.0));
    for (result, n) in [("pass", 1.0), ("fail", 1.0)] {
        assert_eq!(
            m.get(
                "hypertool_workflow_quality_gate_total",
                &[
                    ("workflow", "feature-development"),
                    ("stage", "implementation"),
                    ("model", "gpt-4"),
                    ("result", result)
                ]
            ),
            Some(n)
        );
    }
    assert!(m
        .series("hypertool_workflow_quality_gate_total")
        .iter()
        .all(|s| s
            .labels
            .iter()
            .any(|(k, v)| k == "result" && (v == "pass" || v == "fail"))));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_reset_at_the_period_boundary_and_idle_sessions_close() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    s.post_events(json!([
        {"type":"usage","persona":"backend-engineer","chatmode":"c","model":"m","prompt_tokens":2100,"completion_tokens":0,"session":"idle"},
    ]))
    .await;
    s.clock.advance_secs(60);
    s.post_events(json!([
        {"type":"usage","persona":"backend-engineer","chatmode":"c","model":"m","prompt_tokens":1,"completion_tokens":0,"session":"idle"},
    ]))
    .await;
    let be = [("persona", "backend-engineer")];
    assert_eq!(
        s.metrics()
            .await
            .get("hypertool_persona_token_budget_remaining", &be),
        Some(-101.0)
    );

    // Half an hour idle (the default timeout) closes the session's period at its last activity.
    s.clock.advance_secs(1800);
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_persona_duration_seconds_count",
            &[("persona", "backend-engineer"), ("chatmode", "c")]
        ),
        None
    );
    s.clock.advance_secs(1);
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "hypertool_persona_duration_seconds_sum",
            &[("persona", "backend-engineer"), ("chatmode", "c")]
        ),
        Some(60.0)
    );
    assert_eq!(m.get("hypertool_sessions_open", &[]), Some(0.0));

    // The daily budget resets at midnight UTC: 09:31 + 14h29m.
    s.clock.set(T0 + (15 * 3600 - 1) * 1000);
    assert_eq!(
        s.metrics()
            .await
            .get("hypertool_persona_token_budget_remaining", &be),
        Some(-101.0)
    );
    s.clock.set(T0 + 15 * 3600 * 1000);
    assert_eq!(
        s.metrics()
            .await
            .get("hypertool_persona_token_budget_remaining", &be),
        Some(2000.0)
    );
    // Counters never reset.
    assert_eq!(
        s.metrics().await.sum("hypertool_persona_tokens_used_total"),
        2101.0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_exposition() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    s.post_events(json!([
        usage("backend-engineer", "quote\"back\\slash", "gpt-4", 5, 5),
        {"type":"usage","persona":"backend-engineer","chatmode":"c","model":"m","prompt_tokens":1,"completion_tokens":2,"session":"a","cost_usd":0.5},
        {"type":"usage","persona":"data-scientist","chatmode":"c","model":"m","prompt_tokens":1,"completion_tokens":2,"session":"a"},
        {"type":"stage","workflow":"w","stage":"s","persona":"p","model":"m","duration_seconds":3,"gate":"pass"},
        {"type":"usage","persona":"x","chatmode":"c","model":"m","prompt_tokens":-1,"completion_tokens":2},
    ]))
    .await;
    let text = s.metrics_text().await;
    let path = dir.path().join("metrics.txt");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new("promtool")
        .arg("check")
        .arg("metrics")
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .expect("promtool is needed: install Debian's `prometheus` package (scripts/test.sh does)");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every family has HELP text.
    let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
    let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    assert_eq!(helps, types);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openmetrics_only_when_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    s.post_events(json!([usage("backend-engineer", "c", "m", 1, 1)]))
        .await;
    let plain = s
        .http
        .get(format!("{}/metrics", s.metrics))
        .send()
        .await
        .unwrap();
    assert!(plain.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = plain.text().await.unwrap();
    assert!(!text.contains("# EOF"));
    assert!(text.contains("# TYPE hypertool_persona_tokens_used_total counter"));

    let om = s
        .http
        .get(format!("{}/metrics", s.metrics))
        .header(
            "accept",
            "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(om.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = om.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"));
    assert!(text.contains("# TYPE hypertool_persona_tokens_used counter"));
    assert!(text.contains("hypertool_persona_tokens_used_total{persona=\"backend-engineer\""));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_persona_names_cannot_grow_the_exposition() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    for batch in 0..100 {
        let events: Vec<_> = (0..1000)
            .map(|i| usage(&format!("intruder-{batch}-{i}"), "c", "m", 1, 0))
            .collect();
        let (status, _) = s.post_events(json!(events)).await;
        assert_eq!(status, 200);
    }
    // A new model works out of the box.
    s.post_events(json!([usage(
        "backend-engineer",
        "c",
        "brand-new-model",
        7,
        0
    )]))
    .await;
    let m = s.metrics().await;
    let personas: std::collections::HashSet<_> = m
        .series("hypertool_persona_tokens_used_total")
        .iter()
        .map(|s| s.labels[0].1.clone())
        .collect();
    // 50 admitted + "other" + the configured backend-engineer.
    assert_eq!(personas.len(), 52, "{personas:?}");
    assert!(personas.contains("other"));
    assert_eq!(m.sum("hypertool_persona_tokens_used_total"), 100_007.0);
    assert_eq!(
        m.get(
            "hypertool_persona_tokens_used_total",
            &[
                ("persona", "backend-engineer"),
                ("chatmode", "c"),
                ("model", "brand-new-model")
            ]
        ),
        Some(7.0)
    );
    assert_eq!(
        m.get(
            "hypertool_label_values_folded_total",
            &[("label", "persona")]
        ),
        Some(99_950.0)
    );
    let text = s.metrics_text().await;
    // Bounded: 52 personas' counters, gauges and prompt-size histograms.
    assert!(
        text.len() < 128 * 1024,
        "exposition grew to {} bytes",
        text.len()
    );
    // And it no longer grows: another wave of new names adds no series.
    let series_before = text.lines().filter(|l| !l.starts_with('#')).count();
    let events: Vec<_> = (0..1000)
        .map(|i| usage(&format!("second-wave-{i}"), "c", "m", 1, 0))
        .collect();
    assert_eq!(s.post_events(json!(events)).await.0, 200);
    let after = s.metrics_text().await;
    let series_after = after.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(series_after, series_before, "new names added series");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_declared_family_is_exported_as_declared_and_nothing_else_is() {
    use hypertool::telemetry::families::{Kind, ALL};
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    // Series in every family that traffic creates: usage, a switch, a stage, a gateway call.
    let (status, _) = s
        .post_events(json!([
            usage("backend-engineer", "dev", "gpt-4o", 10, 5),
            {"type": "persona_switch", "session": "s1", "from": "backend-engineer", "to": "testing-specialist", "chatmode": "dev"},
            {"type": "stage", "workflow": "w", "stage": "st", "persona": "backend-engineer", "model": "m", "duration_seconds": 3, "gate": "pass"},
        ]))
        .await;
    assert_eq!(status, 200);
    let text = s.metrics_text().await;
    for f in ALL {
        assert!(
            text.contains(&format!("# TYPE {} {}\n", f.name, f.kind.as_str())),
            "{} is not exported as a {}",
            f.name,
            f.kind.as_str()
        );
        assert!(text.contains(&format!("# HELP {} ", f.name)), "{}", f.name);
    }
    // Every family in the exposition is declared, and every sample's labels are its family's.
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(
                ALL.iter().any(|f| f.name == name),
                "{name} is not declared in telemetry::families"
            );
        }
    }
    for sample in Exposition::parse(&text).samples {
        let family = ALL
            .iter()
            .find(|f| {
                sample.name == f.name
                    || (f.kind == Kind::Histogram
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|sfx| sample.name == format!("{}{sfx}", f.name)))
            })
            .unwrap_or_else(|| panic!("sample {} has no family", sample.name));
        for (k, _) in &sample.labels {
            assert!(
                family.labels.contains(&k.as_str()) || k == "le",
                "{} has label {k}, not declared",
                sample.name
            );
        }
    }
    s.stop().await;
}

/// Every family a component registers reaches `/metrics` with the samples it holds: the exposition
/// cannot leave a registered family out (or render another source in its place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_registered_family_reaches_the_exposition_with_its_samples() {
    use hypertool::telemetry::families::{ALL, LANGFUSE_TRACE_CREATED_TOTAL};
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let state = &s.running.as_ref().unwrap().state;
    let snapshot = state.registry.snapshot();
    let text = s.metrics_text().await;
    let exposition = Exposition::parse(&text);
    let registered: Vec<&str> = snapshot.families().collect();
    assert!(registered.len() >= 30, "{registered:?}");
    let mut checked = 0;
    for name in registered {
        let family = ALL.iter().find(|f| f.name == name).unwrap();
        // Summed with the engine's count of traces reported through the API.
        if family.name == LANGFUSE_TRACE_CREATED_TOTAL.name {
            continue;
        }
        snapshot.samples(family, &mut |values, value| {
            let labels: Vec<(&str, &str)> = family
                .labels
                .iter()
                .copied()
                .zip(values.iter().copied())
                .collect();
            assert_eq!(
                exposition.get(family.name, &labels),
                Some(value),
                "{} {labels:?} is registered but not in /metrics",
                family.name
            );
            checked += 1;
        });
    }
    assert!(checked >= 20, "only {checked} samples");
    s.stop().await;
}
