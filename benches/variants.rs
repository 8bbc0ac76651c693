//! The cost an experiment adds to a gateway call: drawing a run's variant (fixed weights, and
//! adaptive — Thompson sampling over three variants' posteriors) and putting its prompt first in
//! the request (in each dialect). Prints ns per operation and the target; asserts nothing.
//!
//!   cargo bench --bench variants
//!
//! Target: assignment and prompt insertion together under 5 µs per call. Read the ratios of one
//! run, not absolute numbers: these machines are noisy.

use std::hint::black_box;
use std::time::Instant;

use hypertool::core::workflow::{
    Allocation, Decision, Objective, Prompt, Stage, Variant, VariantRecord,
};
use hypertool::gateway::dialect::{CallRequest, Dialect};

fn stage(allocation: Allocation) -> Stage {
    let prompt = Prompt::new(
        "prompts/impl.md",
        &"You write Python with tests. ".repeat(40),
    );
    Stage {
        name: "implementation".into(),
        persona: None,
        model: None,
        budget_tokens: None,
        retries: 0,
        escalation_model: None,
        max_prompt_tokens: None,
        gate: None,
        variants: ["balanced-v3", "quality-v3", "balanced-v4"]
            .iter()
            .map(|n| Variant {
                name: n.to_string(),
                model: None,
                prompt: Some(prompt.clone()),
                temperature: None,
                weight: 1.0,
            })
            .collect(),
        allocation,
        experiment: Decision::default(),
    }
}

/// ns per call of `f`, the median of 5 rounds of `n` calls.
fn time(n: u32, mut f: impl FnMut(u32)) -> f64 {
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for i in 0..n {
            f(i);
        }
        rounds.push(start.elapsed().as_nanos() as f64 / f64::from(n));
    }
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

fn main() {
    let records = |v: &str| match v {
        "balanced-v3" => VariantRecord {
            runs: 120.0,
            passes: 70.0,
            failures: 50.0,
            cost_usd: 1.2,
            ..VariantRecord::default()
        },
        "quality-v3" => VariantRecord {
            runs: 80.0,
            passes: 66.0,
            failures: 14.0,
            cost_usd: 3.1,
            ..VariantRecord::default()
        },
        _ => VariantRecord {
            runs: 40.0,
            passes: 25.0,
            failures: 15.0,
            cost_usd: 0.4,
            ..VariantRecord::default()
        },
    };
    let weights = stage(Allocation::Weights);
    let adaptive = stage(Allocation::Adaptive {
        objective: Objective::PassPerDollar,
        floor: 0.05,
    });
    let runs: Vec<String> = (0..100_000).map(|i| format!("run-1a2b3c-{i:06}")).collect();
    let by_weight = time(100_000, |i| {
        black_box(weights.draw_variant("feature-development", &runs[i as usize], &records));
    });
    let thompson = time(100_000, |i| {
        black_box(adaptive.draw_variant("feature-development", &runs[i as usize], &records));
    });
    let prompt = weights.variants[0]
        .prompt
        .clone()
        .unwrap_or_else(|| Prompt::new("p", "p"));
    let bodies = [
        (
            Dialect::Chat,
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"write the handler"}]}"#,
        ),
        (
            Dialect::Messages,
            r#"{"model":"m","max_tokens":512,"system":"be brief","messages":[{"role":"user","content":"write the handler"}]}"#,
        ),
        (
            Dialect::Responses,
            r#"{"model":"m","instructions":"be brief","input":"write the handler"}"#,
        ),
    ];
    println!("one run; ns per operation, median of 5 rounds:");
    println!("  draw a run's variant, fixed weights (3 variants): {by_weight:.0} ns");
    println!(
        "  draw a run's variant, Thompson sampling (3 variants, pass per dollar): {thompson:.0} ns"
    );
    let mut worst_insert: f64 = 0.0;
    for (dialect, body) in bodies {
        let template: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(body).unwrap_or_default();
        // The request is cloned outside the timed part: a call owns its body already.
        let mut requests: Vec<CallRequest> = (0..20_000)
            .map(|_| CallRequest::new(dialect, template.clone()))
            .collect();
        let mut it = requests.iter_mut();
        let ns = time(4_000, |_| {
            if let Some(r) = it.next() {
                r.prepend_system(&prompt.text);
            }
        });
        worst_insert = worst_insert.max(ns);
        println!(
            "  put a {}-byte prompt first ({:?}): {ns:.0} ns",
            prompt.text.len(),
            dialect
        );
    }
    let total = thompson.max(by_weight) + worst_insert;
    println!(
        "target: assignment + prompt insertion {:.2} µs per call (target < 5 µs): {}",
        total / 1000.0,
        if total < 5_000.0 { "met" } else { "NOT met" }
    );
}
