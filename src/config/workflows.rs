//! `workflows/*.yml` and `chatmodes.yml`: read raw (unknown keys refused), then checked into
//! [`Workflows`]. Regexes and JSON Schemas are compiled here, so a bad gate is refused by
//! `hypertool check` (and by a reload, which then keeps the last good configuration) with the file
//! and line, instead of failing at the first call.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use regex::Regex;
use serde::Deserialize;

use super::error::ConfigError;
use super::gateway::GatewaySettings;
use super::spans::{self, Spans};
use crate::core::persona::PersonaRegistry;
use crate::core::workflow::{
    Allocation, Chatmode, CodeBlock, Decision, ModelChoice, Objective, Pattern, Prompt,
    QualityGate, Schema, Stage, Variant, Workflow, Workflows,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: Option<String>,
    #[serde(default)]
    description: String,
    stages: Vec<RawStage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: String,
    persona: Option<String>,
    model: Option<String>,
    budget_tokens: Option<u64>,
    retries: Option<u32>,
    escalation_model: Option<String>,
    max_prompt_tokens: Option<u64>,
    quality_gate: Option<RawGate>,
    #[serde(default)]
    variants: Vec<RawVariant>,
    /// `adaptive`, `{adaptive: {objective, floor}}`, or each variant's share of the runs
    /// (relative weights); absent: equal shares.
    allocation: Option<RawAllocation>,
    /// The experiment is decided when a variant is best with this probability (default 0.95)…
    decide_at: Option<f64>,
    /// … after at least this many runs of every variant (default 20).
    min_runs_per_variant: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAllocation {
    /// `adaptive`.
    Mode(String),
    Adaptive {
        adaptive: RawAdaptive,
    },
    Weights(BTreeMap<String, f64>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdaptive {
    /// `pass_rate` (default) or `pass_per_dollar`.
    objective: Option<String>,
    /// Each variant's least share of the runs (default 0.05).
    floor: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    name: String,
    model: Option<String>,
    /// A prompt file, relative to the configuration's directory (`prompts/implementation-v3.md`).
    prompt: Option<String>,
    temperature: Option<f64>,
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `code_block: true` or `code_block: rust`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCodeBlock {
    Any(bool),
    Language(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    min_lines: Option<usize>,
    max_lines: Option<usize>,
    #[serde(default)]
    required_sections: Vec<String>,
    must_match: Option<OneOrMany>,
    must_not_match: Option<OneOrMany>,
    code_block: Option<RawCodeBlock>,
    json_schema: Option<serde_json::Value>,
    max_completion_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChatmodes {
    #[serde(default)]
    chatmodes: BTreeMap<String, RawChatmode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChatmode {
    workflow: Option<String>,
    switch_cooldown_seconds: Option<f64>,
}

fn yaml_error(file: &str, e: &serde_yaml_ng::Error) -> ConfigError {
    ConfigError::new(
        file,
        e.location().map(|l| l.line()),
        e.to_string()
            .split(" at line ")
            .next()
            .unwrap_or_default()
            .to_string(),
    )
}

const MODEL_FIX: &str = "use a tier, a configured model name or alias, or a mock/* model";

/// A stage's (or a variant's) model: a tier or a model, and — for a model the gateway does not
/// route — why it is refused.
fn model_choice(gateway: &GatewaySettings, value: &str) -> (ModelChoice, Option<String>) {
    let choice = ModelChoice::parse(value);
    let unknown = match &choice {
        ModelChoice::Model(m) if gateway.route(m).is_none() => Some(format!(
            "`{m}` is neither a tier (fast, balanced, quality) nor a model in [gateway.models]"
        )),
        _ => None,
    };
    (choice, unknown)
}

/// Parses one workflow file. `stem` (the file name without extension) is the default name.
pub fn parse_workflow(
    file: &str,
    stem: &str,
    text: &str,
    personas: &PersonaRegistry,
    gateway: &GatewaySettings,
    prompts: &BTreeMap<String, String>,
) -> Result<Workflow, Vec<ConfigError>> {
    let raw: RawWorkflow = serde_yaml_ng::from_str(text).map_err(|e| {
        vec![yaml_error(file, &e).fix(
            "a workflow has `name`, `description` and `stages` (each with `name` and optionally persona, model, budget_tokens, retries, escalation_model, max_prompt_tokens, quality_gate); see config/workflows/ in the repository",
        )]
    })?;
    let name = raw.name.unwrap_or_else(|| stem.to_string());
    let spans = Spans::yaml(text);
    let mut errors = Vec::new();
    if raw.stages.is_empty() {
        errors.push(
            ConfigError::new(
                file,
                spans.line("stages"),
                format!("workflow `{name}` has no stages"),
            )
            .fix("list at least one stage under `stages:`"),
        );
    }
    let mut seen = BTreeSet::new();
    let mut stages = Vec::new();
    let input = StageInput {
        file,
        spans: &spans,
        personas,
        gateway,
        prompts,
    };
    for (si, raw_stage) in raw.stages.into_iter().enumerate() {
        stages.push(parse_stage(
            &input,
            si,
            raw_stage,
            &name,
            &mut seen,
            &mut errors,
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Workflow {
        name,
        description: raw.description,
        stages,
        file: file.to_string(),
    })
}

/// What every stage of a workflow file is checked against.
struct StageInput<'a> {
    file: &'a str,
    spans: &'a Spans,
    personas: &'a PersonaRegistry,
    gateway: &'a GatewaySettings,
    prompts: &'a BTreeMap<String, String>,
}

/// One stage of workflow `name`: each problem pushed to `errors` at its value's line.
fn parse_stage(
    input: &StageInput<'_>,
    si: usize,
    raw_stage: RawStage,
    name: &str,
    seen: &mut BTreeSet<String>,
    errors: &mut Vec<ConfigError>,
) -> Stage {
    let StageInput {
        file,
        spans,
        personas,
        gateway,
        ..
    } = *input;
    // Messages point at the value they are about, else at the stage's entry.
    let stage_path = format!("stages[{si}]");
    let at = spans.line(&stage_path).unwrap_or(1);
    let here = |key: &str| spans.line(&format!("{stage_path}.{key}"));
    let stage_name = raw_stage.name.clone();
    if !seen.insert(stage_name.clone()) {
        errors.push(
            ConfigError::new(
                file,
                Some(at),
                format!("stage `{stage_name}` appears twice in workflow `{name}`"),
            )
            .fix("give each stage a unique name"),
        );
    }
    let persona = match raw_stage.persona {
        Some(p) => match personas.get(&p) {
            Some(found) => Some(found.name.clone()),
            None => {
                errors.push(
                    ConfigError::new(
                        file,
                        here("persona"),
                        format!("stage `{stage_name}`: persona `{p}` is not a known persona"),
                    )
                    .fix("use the name of a persona file in the persona directory"),
                );
                None
            }
        },
        None => None,
    };
    let mut model_of = |key: &str, value: Option<String>| -> Option<ModelChoice> {
        let value = value?;
        let (choice, unknown) = model_choice(gateway, &value);
        if let Some(why) = unknown {
            errors.push(
                ConfigError::new(
                    file,
                    here(key),
                    format!("stage `{stage_name}`: `{key}` = {why}"),
                )
                .fix(MODEL_FIX),
            );
        }
        Some(choice)
    };
    let model = model_of("model", raw_stage.model);
    let escalation_model = model_of("escalation_model", raw_stage.escalation_model);
    let mut variants = parse_variants(input, &stage_path, &stage_name, raw_stage.variants, errors);
    let decide_at = raw_stage.decide_at;
    if decide_at.is_some_and(|p| !(p > 0.5 && p < 1.0)) {
        errors.push(
            ConfigError::new(
                file,
                here("decide_at"),
                format!("stage `{stage_name}`: decide_at must be a probability between 0.5 and 1"),
            )
            .fix("use e.g. 0.95"),
        );
    }
    let allocation = parse_allocation(
        input,
        &stage_path,
        &stage_name,
        raw_stage.allocation,
        &mut variants,
        errors,
    );
    let gate = match raw_stage.quality_gate {
        None => None,
        Some(g) => match compile_gate(
            file,
            spans,
            &format!("{stage_path}.quality_gate"),
            &stage_name,
            g,
        ) {
            Ok(g) => Some(g),
            Err(mut e) => {
                errors.append(&mut e);
                None
            }
        },
    };
    if raw_stage.max_prompt_tokens == Some(0) {
        errors.push(
            ConfigError::new(
                file,
                here("max_prompt_tokens"),
                format!("stage `{stage_name}`: max_prompt_tokens must be above 0"),
            )
            .fix("remove it (no limit) or give the prompt size in tokens, e.g. 8000"),
        );
    }
    Stage {
        name: stage_name,
        persona,
        model,
        budget_tokens: raw_stage.budget_tokens,
        retries: raw_stage.retries.unwrap_or(0),
        escalation_model,
        max_prompt_tokens: raw_stage.max_prompt_tokens,
        gate,
        variants,
        allocation,
        experiment: Decision {
            decide_at: decide_at.unwrap_or(0.95),
            min_runs: raw_stage.min_runs_per_variant.unwrap_or(20),
        },
    }
}

/// A stage's variants: each model known, each prompt file there, no name twice.
fn parse_variants(
    input: &StageInput<'_>,
    stage_path: &str,
    stage_name: &str,
    raw: Vec<RawVariant>,
    errors: &mut Vec<ConfigError>,
) -> Vec<Variant> {
    let (file, spans, gateway, prompts) = (input.file, input.spans, input.gateway, input.prompts);
    let mut variants = Vec::new();
    for (vi, v) in raw.into_iter().enumerate() {
        let variant_path = format!("{stage_path}.variants[{vi}]");
        let vat = spans.line(&variant_path);
        let vhere = |key: &str| spans.line(&format!("{variant_path}.{key}"));
        if variants.iter().any(|x: &Variant| x.name == v.name) {
            errors.push(
                ConfigError::new(
                    file,
                    vat,
                    format!("stage `{stage_name}`: variant `{}` appears twice", v.name),
                )
                .fix("give each variant of a stage a unique name"),
            );
            continue;
        }
        let vmodel = match v.model {
            None => None,
            Some(m) => {
                let (choice, unknown) = model_choice(gateway, &m);
                if let Some(why) = unknown {
                    errors.push(
                        ConfigError::new(
                            file,
                            vhere("model"),
                            format!(
                                "stage `{stage_name}`, variant `{}`: `model` = {why}",
                                v.name
                            ),
                        )
                        .fix(MODEL_FIX),
                    );
                }
                Some(choice)
            }
        };
        let prompt = match v.prompt {
            None => None,
            Some(p) => {
                let key = p.trim_start_matches("./").to_string();
                match prompts.get(&key) {
                    Some(body) => Some(Prompt::new(&key, body)),
                    None => {
                        let known: Vec<&str> = prompts.keys().map(String::as_str).collect();
                        errors.push(
                            ConfigError::new(file, vhere("prompt"), format!("stage `{stage_name}`, variant `{}`: prompt file `{key}` does not exist (prompt files: {})", v.name, if known.is_empty() { "none".to_string() } else { known.join(", ") }))
                                .fix("put the prompt in the configuration's prompts directory (`[workflows] prompts_dir`, default prompts/) and name it as prompts/<file>"),
                        );
                        None
                    }
                }
            }
        };
        if v.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            errors.push(
                ConfigError::new(
                    file,
                    vhere("temperature"),
                    format!(
                        "stage `{stage_name}`, variant `{}`: temperature must be between 0 and 2",
                        v.name
                    ),
                )
                .fix("use a sampling temperature such as 0.2"),
            );
        }
        variants.push(Variant {
            name: v.name,
            model: vmodel,
            prompt,
            temperature: v.temperature,
            weight: 1.0,
        });
    }
    variants
}

/// A stage's `allocation` among its variants: fixed weights (each variant's, adding up to more than
/// nothing) or adaptive (an objective and a floor that leaves runs to allocate).
fn parse_allocation(
    input: &StageInput<'_>,
    stage_path: &str,
    stage_name: &str,
    raw: Option<RawAllocation>,
    variants: &mut [Variant],
    errors: &mut Vec<ConfigError>,
) -> Allocation {
    let file = input.file;
    let here = |key: &str| input.spans.line(&format!("{stage_path}.{key}"));
    let mut allocation = Allocation::Weights;
    let mut raw_weights: Option<BTreeMap<String, f64>> = None;
    let adaptive = match raw {
        Some(RawAllocation::Mode(m)) if m == "adaptive" => Some(RawAdaptive::default()),
        Some(RawAllocation::Mode(m)) => {
            errors.push(
                ConfigError::new(file, here("allocation"), format!("stage `{stage_name}`: `allocation: {m}` is not an allocation"))
                    .fix("write `allocation: adaptive`, `allocation: {adaptive: {objective: pass_per_dollar, floor: 0.1}}`, or each variant's weight: `allocation: {a: 50, b: 50}`"),
            );
            None
        }
        Some(RawAllocation::Adaptive { adaptive }) => Some(adaptive),
        Some(RawAllocation::Weights(w)) => {
            raw_weights = Some(w);
            None
        }
        None => None,
    };
    if let Some(a) = adaptive {
        let line = here("allocation");
        let objective = match a.objective.as_deref() {
            None | Some("pass_rate") => Objective::PassRate,
            Some("pass_per_dollar") => Objective::PassPerDollar,
            Some(other) => {
                errors.push(
                    ConfigError::new(
                        file,
                        here("allocation.adaptive.objective"),
                        format!(
                            "stage `{stage_name}`: objective `{other}` is not one hypertool knows"
                        ),
                    )
                    .fix("use pass_rate or pass_per_dollar"),
                );
                Objective::PassRate
            }
        };
        let floor = a.floor.unwrap_or(0.05);
        let k = variants.len().max(1) as f64;
        if variants.is_empty() {
            errors.push(
                ConfigError::new(
                    file,
                    line,
                    format!("stage `{stage_name}`: `allocation` without `variants`"),
                )
                .fix("list the stage's variants under `variants:`, or remove `allocation`"),
            );
        } else if !(floor.is_finite() && floor >= 0.0 && floor * k < 1.0) {
            errors.push(
                ConfigError::new(file, here("allocation.adaptive.floor"), format!("stage `{stage_name}`: a floor of {floor} for each of {k} variants leaves no runs to allocate"))
                    .fix("give each variant a floor share such that all together stay below 1, e.g. 0.05"),
            );
        }
        allocation = Allocation::Adaptive { objective, floor };
    }
    match raw_weights {
        Some(_) if variants.is_empty() => errors.push(
            ConfigError::new(
                file,
                here("allocation"),
                format!("stage `{stage_name}`: `allocation` without `variants`"),
            )
            .fix("list the stage's variants under `variants:`, or remove `allocation`"),
        ),
        Some(weights) => {
            let line = here("allocation");
            for name in weights.keys() {
                if !variants.iter().any(|v| &v.name == name) {
                    errors.push(
                        ConfigError::new(file, here(&format!("allocation.{}", spans::key(name))), format!("stage `{stage_name}`: `allocation` names `{name}`, which is not one of its variants"))
                            .fix("name the stage's variants in `allocation`"),
                    );
                }
            }
            for v in variants.iter_mut() {
                match weights.get(&v.name) {
                    Some(w) if w.is_finite() && *w >= 0.0 => v.weight = *w,
                    Some(_) => errors.push(
                        ConfigError::new(file, here(&format!("allocation.{}", spans::key(&v.name))).or(line), format!("stage `{stage_name}`: the weight of variant `{}` must be a number of 0 or more", v.name))
                            .fix("give each variant a share such as 50"),
                    ),
                    None => errors.push(
                        ConfigError::new(file, line, format!("stage `{stage_name}`: `allocation` gives variant `{}` no weight", v.name))
                            .fix("give every variant a weight (0 to send it no runs)"),
                    ),
                }
            }
            if variants.iter().map(|v| v.weight).sum::<f64>() <= 0.0 {
                errors.push(
                    ConfigError::new(
                        file,
                        line,
                        format!(
                            "stage `{stage_name}`: the weights in `allocation` add up to nothing"
                        ),
                    )
                    .fix("give at least one variant a weight above 0"),
                );
            }
        }
        None => {}
    }
    allocation
}

fn compile_gate(
    file: &str,
    spans: &Spans,
    gate: &str,
    stage: &str,
    g: RawGate,
) -> Result<QualityGate, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut patterns = |key: &str, list: Option<OneOrMany>| -> Vec<Pattern> {
        let mut out = Vec::new();
        for (i, source) in list
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            match Regex::new(&source) {
                Ok(regex) => out.push(Pattern { source, regex }),
                Err(e) => {
                    // The pattern's own line (a single pattern is the key's value).
                    let line = spans.line(&format!("{gate}.{key}[{i}]"));
                    let detail = e.to_string();
                    let detail = detail.lines().last().unwrap_or("").trim().to_string();
                    errors.push(
                        ConfigError::new(
                            file,
                            line,
                            format!("stage `{stage}`: `{key}` pattern /{source}/ is not a valid regex: {detail}"),
                        )
                        .fix("write a Rust regex (https://docs.rs/regex); escape literal ( ) [ ] { } . * + ? with a backslash"),
                    );
                }
            }
        }
        out
    };
    let must_match = patterns("must_match", g.must_match);
    let must_not_match = patterns("must_not_match", g.must_not_match);
    let json_schema = match g.json_schema {
        None => None,
        Some(source) => match jsonschema::validator_for(&source) {
            Ok(v) => Some(Schema {
                source,
                validator: Arc::new(v),
            }),
            Err(e) => {
                errors.push(
                    ConfigError::new(
                        file,
                        spans.line(&format!("{gate}.json_schema")),
                        format!("stage `{stage}`: `json_schema` is not a valid JSON Schema: {e}"),
                    )
                    .fix("check the schema against https://json-schema.org (types are strings such as \"object\", \"string\")"),
                );
                None
            }
        },
    };
    let code_block = match g.code_block {
        None | Some(RawCodeBlock::Any(false)) => None,
        Some(RawCodeBlock::Any(true)) => Some(CodeBlock::Any),
        Some(RawCodeBlock::Language(l)) if l.trim().is_empty() || l == "any" => {
            Some(CodeBlock::Any)
        }
        Some(RawCodeBlock::Language(l)) => Some(CodeBlock::Language(l.trim().to_string())),
    };
    if let (Some(min), Some(max)) = (g.min_lines, g.max_lines) {
        if min > max {
            errors.push(
                ConfigError::new(
                    file,
                    spans.line(&format!("{gate}.min_lines")),
                    format!("stage `{stage}`: min_lines {min} is above max_lines {max}; no output could pass"),
                )
                .fix("lower min_lines or raise max_lines"),
            );
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(QualityGate {
        min_lines: g.min_lines,
        max_lines: g.max_lines,
        required_sections: g.required_sections,
        must_match,
        must_not_match,
        code_block,
        json_schema,
        max_completion_tokens: g.max_completion_tokens,
    })
}

/// Parses `chatmodes.yml` (missing file: no chatmodes).
pub fn parse_chatmodes(
    file: &str,
    text: Option<&str>,
    workflows: &BTreeMap<String, Arc<Workflow>>,
    broken: &BTreeSet<String>,
) -> Result<BTreeMap<String, Chatmode>, Vec<ConfigError>> {
    let raw: RawChatmodes = match text {
        None => return Ok(BTreeMap::new()),
        Some(t) if t.trim().is_empty() => return Ok(BTreeMap::new()),
        Some(t) => serde_yaml_ng::from_str(t).map_err(|e| {
            vec![yaml_error(file, &e).fix(
                "write `chatmodes:` with, per chatmode, `workflow: NAME` and/or `switch_cooldown_seconds: N`",
            )]
        })?,
    };
    let spans = Spans::yaml(text.unwrap_or_default());
    let mut errors = Vec::new();
    let mut out = BTreeMap::new();
    for (name, c) in raw.chatmodes {
        let entry = format!("chatmodes.{}", spans::key(&name));
        let line = spans.line(&format!("{entry}.workflow"));
        if let Some(w) = &c.workflow {
            // A workflow whose file has errors was reported already.
            if !workflows.contains_key(w) && !broken.contains(w) {
                errors.push(
                    ConfigError::new(
                        file,
                        line,
                        format!("chatmode `{name}`: workflow `{w}` is not defined"),
                    )
                    .fix(format!(
                        "use one of: {}",
                        workflows.keys().cloned().collect::<Vec<_>>().join(", ")
                    )),
                );
            }
        }
        let cooldown = match c.switch_cooldown_seconds {
            Some(s) if !s.is_finite() || s < 0.0 => {
                errors.push(
                    ConfigError::new(
                        file,
                        spans.line(&format!("{entry}.switch_cooldown_seconds")),
                        format!(
                            "chatmode `{name}`: switch_cooldown_seconds must be 0 or more, got {s}"
                        ),
                    )
                    .fix("give seconds, e.g. 5 (0 turns the cooldown off)"),
                );
                None
            }
            Some(s) => Some((s * 1000.0).round() as i64),
            None => None,
        };
        out.insert(
            name,
            Chatmode {
                workflow: c.workflow,
                switch_cooldown_ms: cooldown,
            },
        );
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Parses every workflow file and the chatmode file into [`Workflows`].
pub fn resolve(
    files: &[(String, String, String)],
    chatmodes: (&str, Option<&str>),
    personas: &PersonaRegistry,
    gateway: &GatewaySettings,
    prompts: &BTreeMap<String, String>,
) -> Result<Workflows, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut workflows: BTreeMap<String, Arc<Workflow>> = BTreeMap::new();
    let mut broken = BTreeSet::new();
    for (file, stem, text) in files {
        match parse_workflow(file, stem, text, personas, gateway, prompts) {
            Ok(w) => {
                if let Some(other) = workflows.get(&w.name) {
                    errors.push(
                        ConfigError::new(
                            file.clone(),
                            Spans::yaml(text).line("name"),
                            format!("workflow `{}` is also defined in {}", w.name, other.file),
                        )
                        .fix("give each workflow a unique name"),
                    );
                } else {
                    workflows.insert(w.name.clone(), Arc::new(w));
                }
            }
            Err(mut e) => {
                errors.append(&mut e);
                broken.insert(stem.clone());
            }
        }
    }
    let chatmodes = match parse_chatmodes(chatmodes.0, chatmodes.1, &workflows, &broken) {
        Ok(c) => c,
        Err(mut e) => {
            errors.append(&mut e);
            BTreeMap::new()
        }
    };
    if errors.is_empty() {
        Ok(Workflows {
            workflows,
            chatmodes,
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
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
}

/// The workflow file `text` with `stage` left on `variant` alone: its other variants and its
/// `allocation` removed, every other line (comments included) as it was. `Err` names what is
/// missing. The result is checked by the caller (`config::load_with_workflow`) before it is written.
/// Promotes `variant` of `stage` of `workflow` in the configuration at `source`: its workflow
/// file rewritten by [`promote_variant`], checked with the whole configuration, then put in place
/// (written beside it and renamed). The file's path, or what stopped it (nothing is written).
pub fn promote_in_place(
    source: &super::Source,
    workflow: &str,
    stage: &str,
    variant: &str,
) -> Result<std::path::PathBuf, String> {
    let cfg = super::load(source).map_err(|errors| errors.to_string())?;
    let Some(w) = cfg.workflows.get(workflow) else {
        let known: Vec<&str> = cfg.workflows.workflows.keys().map(String::as_str).collect();
        return Err(format!(
            "error: no workflow `{workflow}` in {}; workflows: {}",
            source.describe(),
            known.join(", ")
        ));
    };
    let file = std::path::PathBuf::from(&w.file);
    if !file.is_file() {
        return Err(format!(
            "error: workflow `{workflow}` is built in ({}); copy the configuration to a directory and pass --config",
            w.file
        ));
    }
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("error: cannot read {}: {e}", file.display()))?;
    let promoted = promote_variant(&text, stage, variant)
        .map_err(|why| format!("error: {}: {why}", file.display()))?;
    if let Err(errors) = super::load_with_workflow(source, &file, &promoted) {
        return Err(format!(
            "{errors}\nerror: the promoted {} would not load; it was not written",
            file.display()
        ));
    }
    let staged = file.with_extension("yml.promoting");
    std::fs::write(&staged, &promoted)
        .map_err(|e| format!("error: cannot write {}: {e}", staged.display()))?;
    std::fs::rename(&staged, &file)
        .map_err(|e| format!("error: cannot replace {}: {e}", file.display()))?;
    Ok(file)
}

pub fn promote_variant(text: &str, stage: &str, variant: &str) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let quiet = |l: &str| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    };
    // `- name: x` or `name: x` (with or without quotes, a comment after it) names `x`.
    let names = |l: &str, name: &str| {
        let t = l.trim_start();
        let t = t.strip_prefix("- ").map(str::trim_start).unwrap_or(t);
        t.strip_prefix("name:").is_some_and(|v| {
            let v = v.split(" #").next().unwrap_or("").trim();
            v.trim_matches(|c| c == '"' || c == '\'') == name
        })
    };
    let stages_at = lines
        .iter()
        .position(|l| l.trim_start().starts_with("stages:") && indent(l) == 0)
        .ok_or("the file has no `stages:`")?;
    let item_indent = lines[stages_at + 1..]
        .iter()
        .find(|l| !quiet(l))
        .map(|l| indent(l))
        .ok_or("`stages:` lists no stages")?;
    let stage_at = (stages_at + 1..lines.len())
        .find(|&i| {
            indent(lines[i]) == item_indent
                && lines[i].trim_start().starts_with("- ")
                && names(lines[i], stage)
        })
        .ok_or_else(|| format!("the workflow has no stage `{stage}`"))?;
    let key_indent = item_indent + 2;
    let stage_end = (stage_at + 1..lines.len())
        .find(|&i| !quiet(lines[i]) && indent(lines[i]) <= item_indent)
        .unwrap_or(lines.len());
    // A key of the stage, and where its value (nested lines) ends.
    let key_block = |key: &str| -> Option<(usize, usize)> {
        let at = (stage_at + 1..stage_end)
            .find(|&i| indent(lines[i]) == key_indent && lines[i].trim_start().starts_with(key))?;
        let end = (at + 1..stage_end)
            .find(|&i| {
                !quiet(lines[i])
                    && (indent(lines[i]) < key_indent
                        || (indent(lines[i]) == key_indent
                            && !lines[i].trim_start().starts_with("- ")))
            })
            .unwrap_or(stage_end);
        Some((at, end))
    };
    let (variants_at, variants_end) =
        key_block("variants:").ok_or_else(|| format!("stage `{stage}` has no variants"))?;
    let first_item = (variants_at + 1..variants_end)
        .find(|&i| lines[i].trim_start().starts_with("- "))
        .ok_or_else(|| format!("stage `{stage}` lists no variants"))?;
    let variant_indent = indent(lines[first_item]);
    let starts: Vec<usize> = (first_item..variants_end)
        .filter(|&i| indent(lines[i]) == variant_indent && lines[i].trim_start().starts_with("- "))
        .collect();
    let chosen = starts
        .iter()
        .enumerate()
        .find_map(|(n, &start)| {
            let end = starts.get(n + 1).copied().unwrap_or(variants_end);
            (start..end)
                .any(|i| names(lines[i], variant))
                .then_some((start, end))
        })
        .ok_or_else(|| format!("stage `{stage}` has no variant `{variant}`"))?;
    // The comments just above an item are its own; those ending the item before it are not.
    let mut chosen = chosen;
    while chosen.0 > first_item && quiet(lines[chosen.0 - 1]) {
        chosen.0 -= 1;
    }
    while chosen.1 > chosen.0 + 1 && quiet(lines[chosen.1 - 1]) {
        chosen.1 -= 1;
    }
    let allocation = key_block("allocation:");
    let mut out: Vec<&str> = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let in_variants = i > variants_at && i < variants_end;
        let kept_variant = i >= chosen.0 && i < chosen.1;
        let in_allocation = allocation.is_some_and(|(a, e)| i >= a && i < e);
        // Comments and blank lines between the variants' items go with them.
        if (in_variants && !kept_variant && i >= first_item) || in_allocation {
            continue;
        }
        out.push(l);
    }
    let mut joined = out.join("\n");
    if text.ends_with('\n') {
        joined.push('\n');
    }
    Ok(joined)
}

#[cfg(test)]
mod promote_tests {
    use super::promote_variant;

    const FILE: &str = "# The implementation experiment.
name: exp
stages:
  - name: design          # first
    model: fast
  - name: implement
    persona: backend-engineer
    # which model and prompt work best?
    variants:
      - name: lo
        model: fast
        prompt: prompts/a.md
      # the challenger
      - name: hi
        model: quality
        temperature: 0.2
    allocation:
      lo: 1
      hi: 3
    quality_gate:
      code_block: python
  - name: review
    model: fast
";

    #[test]
    fn promotion_keeps_one_variant_and_every_other_line() {
        let out = promote_variant(FILE, "implement", "hi").unwrap();
        assert_eq!(
            out,
            "# The implementation experiment.
name: exp
stages:
  - name: design          # first
    model: fast
  - name: implement
    persona: backend-engineer
    # which model and prompt work best?
    variants:
      # the challenger
      - name: hi
        model: quality
        temperature: 0.2
    quality_gate:
      code_block: python
  - name: review
    model: fast
"
        );
        let out = promote_variant(FILE, "implement", "lo").unwrap();
        assert!(out.contains("      - name: lo\n        model: fast\n        prompt: prompts/a.md\n    quality_gate:"), "{out}");
        assert!(
            !out.contains("allocation") && !out.contains("challenger"),
            "{out}"
        );
    }

    #[test]
    fn promotion_names_what_is_missing() {
        assert_eq!(
            promote_variant(FILE, "nope", "hi").unwrap_err(),
            "the workflow has no stage `nope`"
        );
        assert_eq!(
            promote_variant(FILE, "design", "hi").unwrap_err(),
            "stage `design` has no variants"
        );
        assert_eq!(
            promote_variant(FILE, "implement", "mid").unwrap_err(),
            "stage `implement` has no variant `mid`"
        );
    }
}
