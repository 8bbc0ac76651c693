//! Tests of `workflows`.
use super::*;
use crate::core::persona::Persona;

fn personas() -> PersonaRegistry {
    PersonaRegistry::new(vec![Persona {
        name: "backend-engineer".into(),
        aliases: Vec::new(),
        display_name: String::new(),
        description: String::new(),
        icon: None,
        token_budget: None,
        allowed_servers: Vec::new(),
        allowed_tools: BTreeMap::new(),
        restricted_paths: Vec::new(),
        context: serde_json::Value::Null,
        security: serde_json::Value::Null,
        workflows: serde_json::Value::Null,
        source: None,
    }])
}

fn parse(text: &str) -> Result<Workflow, Vec<ConfigError>> {
    parse_workflow(
        "wf.yml",
        "wf",
        text,
        &personas(),
        &GatewaySettings::default(),
        &prompts(),
    )
}

/// The prompt files the tests' workflows may name.
fn prompts() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "prompts/impl-v3.md".to_string(),
        "You write Python with tests.".to_string(),
    )])
}

#[test]
fn a_full_stage_parses() {
    let w = parse(
        "description: d\nstages:\n  - name: design\n    persona: backend-engineer\n    model: quality\n    escalation_model: mock/big\n    retries: 2\n    budget_tokens: 100\n    max_prompt_tokens: 50\n    quality_gate:\n      min_lines: 2\n      required_sections: [Overview]\n      must_match: 'x+'\n      must_not_match: [TODO, FIXME]\n      code_block: rust\n      json_schema: {type: object}\n      max_completion_tokens: 9\n",
    )
    .unwrap();
    assert_eq!(w.name, "wf");
    let s = w.stage("design").unwrap();
    assert_eq!(s.retries, 2);
    assert_eq!(
        s.model,
        Some(ModelChoice::Tier(crate::core::workflow::ModelTier::Quality))
    );
    assert_eq!(
        s.escalation_model,
        Some(ModelChoice::Model("mock/big".into()))
    );
    let g = s.gate.as_ref().unwrap();
    assert_eq!(g.must_not_match.len(), 2);
    assert_eq!(g.code_block, Some(CodeBlock::Language("rust".into())));
}

#[test]
fn variants_parse_with_their_prompt_model_temperature_and_weights() {
    let w = parse(
        "stages:\n  - name: impl\n    model: fast\n    variants:\n      - name: a\n        prompt: prompts/impl-v3.md\n      - name: b\n        model: quality\n        temperature: 0.2\n    allocation: {a: 3, b: 1}\n",
    )
    .unwrap();
    let s = w.stage("impl").unwrap();
    assert_eq!(s.variants.len(), 2);
    let a = s.variant("a").unwrap();
    let p = a.prompt.as_ref().unwrap();
    assert_eq!(&*p.text, "You write Python with tests.");
    assert_eq!(p.version.len(), 12);
    assert_eq!((a.weight, a.model.is_none()), (3.0, true));
    let b = s.variant("b").unwrap();
    assert_eq!(b.temperature, Some(0.2));
    assert_eq!(
        b.model,
        Some(ModelChoice::Tier(crate::core::workflow::ModelTier::Quality))
    );
    // No allocation: equal shares.
    let w = parse("stages:\n  - name: impl\n    variants:\n      - name: a\n      - name: b\n")
        .unwrap();
    assert!(w
        .stage("impl")
        .unwrap()
        .variants
        .iter()
        .all(|v| v.weight == 1.0));
}

#[test]
fn bad_variants_are_named_with_file_and_line() {
    let text = "stages:\n  - name: impl\n    variants:\n      - name: a\n        prompt: prompts/missing.md\n      - name: b\n        model: no-such-model\n      - name: b\n      - name: c\n        temperature: 7\n    allocation: {a: 0, b: 0, c: 0, d: 1}\n  - name: lone\n    allocation: {x: 1}\n";
    let errors = parse(text).unwrap_err();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let has = |prefix: &str| shown.iter().any(|e| e.starts_with(prefix));
    assert!(has("wf.yml:5: stage `impl`, variant `a`: prompt file `prompts/missing.md` does not exist (prompt files: prompts/impl-v3.md)"), "{shown:#?}");
    assert!(
        has("wf.yml:7: stage `impl`, variant `b`: `model` = `no-such-model`"),
        "{shown:#?}"
    );
    assert!(
        has("wf.yml:8: stage `impl`: variant `b` appears twice"),
        "{shown:#?}"
    );
    assert!(
        has("wf.yml:10: stage `impl`, variant `c`: temperature must be between 0 and 2"),
        "{shown:#?}"
    );
    assert!(
        has("wf.yml:11: stage `impl`: `allocation` names `d`"),
        "{shown:#?}"
    );
    assert!(
        has("wf.yml:11: stage `impl`: the weights in `allocation` add up to nothing"),
        "{shown:#?}"
    );
    assert!(
        has("wf.yml:13: stage `lone`: `allocation` without `variants`"),
        "{shown:#?}"
    );
}

#[test]
fn adaptive_allocation_parses_and_its_mistakes_are_named() {
    let w = parse("stages:\n  - name: impl\n    variants:\n      - name: a\n      - name: b\n    allocation: adaptive\n").unwrap();
    assert_eq!(
        w.stage("impl").unwrap().allocation,
        Allocation::Adaptive {
            objective: Objective::PassRate,
            floor: 0.05
        }
    );
    let w = parse("stages:\n  - name: impl\n    variants:\n      - name: a\n      - name: b\n    allocation: {adaptive: {objective: pass_per_dollar, floor: 0.1}}\n").unwrap();
    assert_eq!(
        w.stage("impl").unwrap().allocation,
        Allocation::Adaptive {
            objective: Objective::PassPerDollar,
            floor: 0.1
        }
    );
    let text = "stages:\n  - name: x\n    variants:\n      - name: a\n      - name: b\n    allocation: {adaptive: {objective: speed, floor: 0.6}}\n  - name: y\n    variants:\n      - name: a\n    allocation: random\n";
    let shown: Vec<String> = parse(text)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    let has = |prefix: &str| shown.iter().any(|e| e.starts_with(prefix));
    assert!(has("wf.yml:6: stage `x`: objective `speed`"), "{shown:#?}");
    assert!(
        has("wf.yml:6: stage `x`: a floor of 0.6 for each of 2 variants"),
        "{shown:#?}"
    );
    assert!(
        has("wf.yml:10: stage `y`: `allocation: random` is not an allocation"),
        "{shown:#?}"
    );
}

#[test]
fn bad_regex_and_schema_name_file_and_line() {
    let text = "stages:\n  - name: a\n    quality_gate:\n      min_lines: 1\n  - name: b\n    quality_gate:\n      must_match: ['(unclosed']\n      json_schema: {type: 12}\n";
    let errors = parse(text).unwrap_err();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 2, "{shown:?}");
    assert!(
        shown[0].starts_with(
            "wf.yml:7: stage `b`: `must_match` pattern /(unclosed/ is not a valid regex"
        ),
        "{}",
        shown[0]
    );
    assert!(
        shown[1].starts_with("wf.yml:8: stage `b`: `json_schema` is not a valid JSON Schema"),
        "{}",
        shown[1]
    );
}

#[test]
fn unknown_persona_model_key_and_duplicates_are_refused() {
    let errors =
        parse("stages:\n  - name: a\n    persona: nobody\n    model: gpt-9\n  - name: a\n")
            .unwrap_err();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        shown[0].starts_with("wf.yml:3: stage `a`: persona `nobody`"),
        "{shown:?}"
    );
    assert!(
        shown[1].starts_with("wf.yml:4: stage `a`: `model` = `gpt-9`"),
        "{shown:?}"
    );
    assert!(shown[2].contains("appears twice"), "{shown:?}");
    let e = parse("stages:\n  - name: a\n    quality_gate:\n      min_line: 3\n").unwrap_err();
    assert_eq!(e[0].line, Some(4), "{}", e[0]);
    assert!(e[0].message.contains("min_line"), "{}", e[0]);
}

#[test]
fn chatmodes_must_name_known_workflows() {
    let mut workflows = BTreeMap::new();
    workflows.insert(
        "wf".to_string(),
        Arc::new(parse("stages:\n  - name: a\n").unwrap()),
    );
    let ok = parse_chatmodes(
        "chatmodes.yml",
        Some("chatmodes:\n  feature:\n    workflow: wf\n    switch_cooldown_seconds: 2.5\n"),
        &workflows,
        &BTreeSet::new(),
    )
    .unwrap();
    assert_eq!(ok["feature"].switch_cooldown_ms, Some(2500));
    let bad = parse_chatmodes(
        "chatmodes.yml",
        Some("chatmodes:\n  a: {}\n  feature:\n    workflow: nope\n"),
        &workflows,
        &BTreeSet::new(),
    )
    .unwrap_err();
    assert_eq!(
        bad[0].to_string().lines().next().unwrap(),
        "chatmodes.yml:4: chatmode `feature`: workflow `nope` is not defined"
    );
}
