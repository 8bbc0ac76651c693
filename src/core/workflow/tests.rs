//! Tests of `workflow`.
use super::*;

fn stage_with(weights: &[(&str, f64)]) -> Stage {
    Stage {
        name: "impl".into(),
        persona: None,
        model: None,
        budget_tokens: None,
        retries: 0,
        escalation_model: None,
        max_prompt_tokens: None,
        gate: None,
        allocation: Allocation::Weights,
        experiment: Decision::default(),
        variants: weights
            .iter()
            .map(|(n, w)| Variant {
                name: n.to_string(),
                model: None,
                prompt: None,
                temperature: None,
                weight: *w,
            })
            .collect(),
    }
}

#[test]
fn a_runs_variant_is_drawn_by_weight_from_its_id_alone() {
    let stage = stage_with(&[("a", 3.0), ("b", 1.0), ("never", 0.0)]);
    let none = |_: &str| VariantRecord::default();
    let n = 20_000;
    let mut a = 0;
    for i in 0..n {
        let key = format!("run-{i}");
        let v = stage.draw_variant("wf", &key, &none).unwrap();
        // The same id draws the same, wherever and whenever.
        assert_eq!(stage.draw_variant("wf", &key, &none).unwrap().name, v.name);
        assert_ne!(v.name, "never");
        if v.name == "a" {
            a += 1;
        }
    }
    // 75 % ± 1.5 points (the binomial's sd at n = 20,000 is 0.3 points).
    let share = a as f64 / n as f64;
    assert!((share - 0.75).abs() < 0.015, "{share}");
    assert!(stage_with(&[]).draw_variant("wf", "r", &none).is_none());
}

/// The share of 10,000 runs each variant gets from `records`.
fn shares(stage: &Stage, records: &dyn Fn(&str) -> VariantRecord) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for i in 0..10_000 {
        let v = stage
            .draw_variant("wf", &format!("run-{i}"), records)
            .unwrap();
        *out.entry(v.name.clone()).or_insert(0.0) += 1.0 / 10_000.0;
    }
    out
}

#[test]
fn adaptive_allocation_follows_the_evidence_above_a_floor() {
    let mut stage = stage_with(&[("lo", 1.0), ("hi", 1.0)]);
    stage.allocation = Allocation::Adaptive {
        objective: Objective::PassRate,
        floor: 0.05,
    };
    let record = |passes: f64, failures: f64, cost: f64| VariantRecord {
        runs: passes + failures,
        passes,
        failures,
        cost_usd: cost,
        ..VariantRecord::default()
    };
    // No evidence: an even split.
    let even = shares(&stage, &|_| VariantRecord::default());
    assert!((even["lo"] - 0.5).abs() < 0.03, "{even:?}");
    // 35 % against 80 % over 100 runs each: lo's draw practically never beats hi's, so hi
    // gets all but lo's floor (5 %).
    let evidence = |v: &str| {
        if v == "hi" {
            record(80.0, 20.0, 1.0)
        } else {
            record(35.0, 65.0, 0.1)
        }
    };
    let s = shares(&stage, &evidence);
    assert!((s["lo"] - 0.05).abs() < 0.01, "{s:?}");
    // Per dollar, lo (0.35 a run at $0.001) beats hi (0.8 at $0.01).
    stage.allocation = Allocation::Adaptive {
        objective: Objective::PassPerDollar,
        floor: 0.05,
    };
    let s = shares(&stage, &evidence);
    assert!((s["hi"] - 0.05).abs() < 0.01, "{s:?}");
    // Close evidence splits the runs (Thompson sampling's point: keep learning).
    let close = |v: &str| {
        if v == "hi" {
            record(6.0, 4.0, 0.0)
        } else {
            record(5.0, 5.0, 0.0)
        }
    };
    let s = shares(&stage, &close);
    assert!(s["lo"] > 0.2 && s["hi"] > 0.5, "{s:?}");
}

fn pattern(s: &str) -> Pattern {
    Pattern {
        source: s.into(),
        regex: Regex::new(s).unwrap(),
    }
}

fn criteria(v: &GateVerdict) -> Vec<&'static str> {
    v.failures.iter().map(|f| f.criterion).collect()
}

#[test]
fn line_counts_pass_and_fail() {
    let gate = QualityGate {
        min_lines: Some(3),
        max_lines: Some(4),
        ..Default::default()
    };
    assert_eq!(gate.evaluate("a\n\nb\nc\n", 1).result, GateResult::Pass);
    let short = gate.evaluate("a\n\n\nb", 1);
    assert_eq!(criteria(&short), ["min_lines"]);
    assert!(short.failures[0].message.contains("2 non-blank lines"));
    let long = gate.evaluate("1\n2\n3\n4\n5", 1);
    assert_eq!(criteria(&long), ["max_lines"]);
}

#[test]
fn sections_are_headings_not_words() {
    let gate = QualityGate {
        required_sections: vec!["Overview".into(), "API".into()],
        ..Default::default()
    };
    let ok = "# Overview\ntext\n## api:\nmore";
    assert_eq!(gate.evaluate(ok, 1).result, GateResult::Pass);
    // Named in prose or inside a code block is not a section.
    let bad = "The overview is here.\n```\n# API\n```\n#Overview";
    let v = gate.evaluate(bad, 1);
    assert_eq!(criteria(&v), ["required_sections"]);
    assert!(v.failures[0].message.contains("\"Overview\", \"API\""));
}

#[test]
fn regexes_both_ways() {
    let gate = QualityGate {
        must_match: vec![pattern(r"def test_\w+")],
        must_not_match: vec![pattern(r"(?i)\bTODO\b")],
        ..Default::default()
    };
    assert_eq!(
        gate.evaluate("def test_login():\n    pass", 1).result,
        GateResult::Pass
    );
    let v = gate.evaluate("def login():  # todo", 1);
    assert_eq!(criteria(&v), ["must_match", "must_not_match"]);
    assert!(v.failures[1].message.contains("\"todo\""));
}

#[test]
fn code_blocks_by_language() {
    let any = QualityGate {
        code_block: Some(CodeBlock::Any),
        ..Default::default()
    };
    let rust = QualityGate {
        code_block: Some(CodeBlock::Language("rust".into())),
        ..Default::default()
    };
    let text = "Here:\n```python\nprint(1)\n```\n";
    assert_eq!(any.evaluate(text, 1).result, GateResult::Pass);
    assert_eq!(criteria(&rust.evaluate(text, 1)), ["code_block"]);
    assert_eq!(
        rust.evaluate("~~~Rust\nfn main() {}\n~~~", 1).result,
        GateResult::Pass
    );
    assert_eq!(criteria(&any.evaluate("no code", 1)), ["code_block"]);
}

#[test]
fn json_schema_on_whole_output_or_json_block() {
    let source = serde_json::json!({
        "type": "object",
        "required": ["version"],
        "properties": {"version": {"type": "string", "pattern": "^\\d+\\.\\d+\\.\\d+$"}}
    });
    let gate = QualityGate {
        json_schema: Some(Schema {
            validator: Arc::new(jsonschema::validator_for(&source).unwrap()),
            source,
        }),
        ..Default::default()
    };
    assert_eq!(
        gate.evaluate(r#"{"version": "1.2.3"}"#, 1).result,
        GateResult::Pass
    );
    assert_eq!(
        gate.evaluate("Bumped:\n```json\n{\"version\": \"2.0.0\"}\n```", 1)
            .result,
        GateResult::Pass
    );
    let wrong = gate.evaluate(r#"{"version": "two"}"#, 1);
    assert_eq!(criteria(&wrong), ["json_schema"]);
    assert!(wrong.failures[0].message.contains("/version"));
    let none = gate.evaluate("version two", 1);
    assert!(none.failures[0].message.contains("no JSON found"));
}

#[test]
fn completion_tokens_and_every_failure_named() {
    let gate = QualityGate {
        min_lines: Some(2),
        max_completion_tokens: Some(10),
        code_block: Some(CodeBlock::Any),
        ..Default::default()
    };
    assert_eq!(
        gate.evaluate("a\nb\n```\nx\n```", 10).result,
        GateResult::Pass
    );
    let v = gate.evaluate("a", 11);
    assert_eq!(
        criteria(&v),
        ["min_lines", "code_block", "max_completion_tokens"]
    );
    assert!(v.summary().starts_with("fail; min_lines: "));
    assert_eq!(gate.evaluate("a\nb\n```\n```", 1).summary(), "pass");
}
