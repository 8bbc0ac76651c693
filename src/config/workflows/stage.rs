//! One stage of a workflow file: its persona and models, variants, allocation and quality gate,
//! each problem at its value's line.

use super::*;

/// What every stage of a workflow file is checked against.
pub(super) struct StageInput<'a> {
    pub(super) file: &'a str,
    pub(super) spans: &'a Spans,
    pub(super) personas: &'a PersonaRegistry,
    pub(super) gateway: &'a GatewaySettings,
    pub(super) prompts: &'a BTreeMap<String, String>,
}

/// One stage of workflow `name`: each problem pushed to `errors` at its value's line.
pub(super) fn parse_stage(
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
pub(super) fn parse_variants(
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
pub(super) fn parse_allocation(
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

pub(super) fn compile_gate(
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
