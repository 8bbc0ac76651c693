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

mod promote;
mod stage;

pub use promote::{promote_in_place, promote_variant};
use stage::{parse_stage, StageInput};

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
mod tests;
