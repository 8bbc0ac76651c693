//! Workflows, their stages and the quality gates that judge a stage's output.
//!
//! A workflow (`config/workflows/*.yml`) is an ordered list of stages; each stage names the persona
//! that runs it, the model (or model tier) it uses, its token budget per run, how often the gateway
//! may retry a failed gate (and on which model), how long a prompt may be, and its quality gate.
//! Everything here is checked at load time (regexes compiled, schemas compiled), so evaluating a
//! gate cannot fail: it only passes or names every criterion that failed.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::event::GateResult;

/// The runbook's STAGE_MODEL_MAPPING tiers; `[gateway.tiers]` says which model each one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelTier {
    Fast,
    Balanced,
    Quality,
}

impl ModelTier {
    pub const ALL: [ModelTier; 3] = [ModelTier::Fast, ModelTier::Balanced, ModelTier::Quality];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelTier::Fast => "fast",
            ModelTier::Balanced => "balanced",
            ModelTier::Quality => "quality",
        }
    }

    pub fn parse(s: &str) -> Option<ModelTier> {
        ModelTier::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// What a stage's `model` (or `escalation_model`) names: a tier, or a model by name or alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelChoice {
    Tier(ModelTier),
    Model(String),
}

impl ModelChoice {
    pub fn parse(s: &str) -> ModelChoice {
        match ModelTier::parse(s) {
            Some(t) => ModelChoice::Tier(t),
            None => ModelChoice::Model(s.to_string()),
        }
    }
}

impl fmt::Display for ModelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelChoice::Tier(t) => f.write_str(t.as_str()),
            ModelChoice::Model(m) => f.write_str(m),
        }
    }
}

/// A regex criterion, with the pattern as written (for messages).
#[derive(Debug, Clone)]
pub struct Pattern {
    pub source: String,
    pub regex: Regex,
}

/// `code_block: true` (any fenced block) or `code_block: rust` (a block of that language).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeBlock {
    Any,
    Language(String),
}

/// A compiled JSON Schema, with its source (for `GET /v1/workflows`).
#[derive(Clone)]
pub struct Schema {
    pub source: Value,
    pub validator: Arc<jsonschema::Validator>,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema")
            .field("source", &self.source)
            .finish()
    }
}

/// A stage's quality gate: every criterion set must hold for `pass`.
#[derive(Debug, Clone, Default)]
pub struct QualityGate {
    /// Non-blank lines, at least.
    pub min_lines: Option<usize>,
    /// Non-blank lines, at most.
    pub max_lines: Option<usize>,
    /// Markdown headings that must be present (case-insensitive, any level).
    pub required_sections: Vec<String>,
    pub must_match: Vec<Pattern>,
    pub must_not_match: Vec<Pattern>,
    pub code_block: Option<CodeBlock>,
    /// The output (or its first ```json block) must be JSON valid against this schema.
    pub json_schema: Option<Schema>,
    pub max_completion_tokens: Option<u64>,
}

/// One criterion that did not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GateFailure {
    pub criterion: &'static str,
    pub message: String,
}

/// The verdict of a gate on one output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GateVerdict {
    pub result: GateResult,
    pub failures: Vec<GateFailure>,
}

impl GateVerdict {
    /// `pass`, or `fail; criterion: message; …` — the `X-Hypertool-Quality-Gate` header value.
    pub fn summary(&self) -> String {
        let mut out = self.result.as_str().to_string();
        for f in &self.failures {
            out.push_str("; ");
            out.push_str(f.criterion);
            out.push_str(": ");
            out.push_str(&f.message);
        }
        out
    }

    /// Every failure as `criterion: message`, joined by "; " (None on pass).
    pub fn reasons(&self) -> Option<String> {
        if self.failures.is_empty() {
            return None;
        }
        Some(
            self.failures
                .iter()
                .map(|f| format!("{}: {}", f.criterion, f.message))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

impl QualityGate {
    /// Judges `text`. `completion_tokens` is the upstream's count (or an estimate) for
    /// `max_completion_tokens`.
    pub fn evaluate(&self, text: &str, completion_tokens: u64) -> GateVerdict {
        let mut failures = Vec::new();
        let mut fail = |criterion: &'static str, message: String| {
            failures.push(GateFailure { criterion, message })
        };
        let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
        if let Some(min) = self.min_lines.filter(|m| lines < *m) {
            fail(
                "min_lines",
                format!("{lines} non-blank lines, at least {min} required"),
            );
        }
        if let Some(max) = self.max_lines.filter(|m| lines > *m) {
            fail(
                "max_lines",
                format!("{lines} non-blank lines, at most {max} allowed"),
            );
        }
        if !self.required_sections.is_empty() {
            let headings = headings(text);
            let missing: Vec<&str> = self
                .required_sections
                .iter()
                .filter(|s| !headings.iter().any(|h| h.eq_ignore_ascii_case(s.trim())))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                fail(
                    "required_sections",
                    format!("missing heading(s) {}", quoted_list(&missing)),
                );
            }
        }
        for p in &self.must_match {
            if !p.regex.is_match(text) {
                fail("must_match", format!("no match for /{}/", p.source));
            }
        }
        for p in &self.must_not_match {
            if let Some(m) = p.regex.find(text) {
                fail(
                    "must_not_match",
                    format!("/{}/ matched {:?}", p.source, excerpt(m.as_str())),
                );
            }
        }
        if let Some(want) = &self.code_block {
            let blocks = code_blocks(text);
            let found = match want {
                CodeBlock::Any => !blocks.is_empty(),
                CodeBlock::Language(lang) => blocks
                    .iter()
                    .any(|(info, _)| info.eq_ignore_ascii_case(lang)),
            };
            if !found {
                fail(
                    "code_block",
                    match want {
                        CodeBlock::Any => "no fenced code block".to_string(),
                        CodeBlock::Language(lang) => format!("no fenced ```{lang} code block"),
                    },
                );
            }
        }
        if let Some(schema) = &self.json_schema {
            match json_of(text) {
                None => fail(
                    "json_schema",
                    "no JSON found (neither the whole output nor a ```json block parses)".into(),
                ),
                Some(value) => {
                    let errors: Vec<String> = schema
                        .validator
                        .iter_errors(&value)
                        .take(3)
                        .map(|e| {
                            let at = e.instance_path().to_string();
                            if at.is_empty() {
                                e.to_string()
                            } else {
                                format!("at {at}: {e}")
                            }
                        })
                        .collect();
                    if !errors.is_empty() {
                        fail("json_schema", errors.join(", "));
                    }
                }
            }
        }
        if let Some(max) = self
            .max_completion_tokens
            .filter(|m| completion_tokens > *m)
        {
            fail(
                "max_completion_tokens",
                format!("{completion_tokens} completion tokens, at most {max} allowed"),
            );
        }
        GateVerdict {
            result: if failures.is_empty() {
                GateResult::Pass
            } else {
                GateResult::Fail
            },
            failures,
        }
    }
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

/// Markdown ATX headings (`# Title` … `###### Title`), outside fenced code blocks, trimmed of
/// closing `#`s and a trailing colon.
fn headings(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(f) = fence {
            if t.starts_with(f) {
                fence = None;
            }
            continue;
        }
        if t.starts_with("```") {
            fence = Some("```");
            continue;
        }
        if t.starts_with("~~~") {
            fence = Some("~~~");
            continue;
        }
        let level = t.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&level) {
            let rest = &t[level..];
            if rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t') {
                let title = rest
                    .trim()
                    .trim_end_matches('#')
                    .trim()
                    .trim_end_matches(':');
                out.push(title.trim().to_string());
            }
        }
    }
    out
}

/// Fenced code blocks as (language, body).
fn code_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(&str, String, String)> = None;
    for line in text.lines() {
        let t = line.trim_start();
        match &mut open {
            Some((fence, _, body)) => {
                if t.starts_with(*fence) && t.trim_start_matches(['`', '~']).trim().is_empty() {
                    if let Some((_, info, body)) = open.take() {
                        out.push((info, body));
                    }
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
            None => {
                for fence in ["```", "~~~"] {
                    if let Some(info) = t.strip_prefix(fence) {
                        let lang = info
                            .trim_start_matches(['`', '~'])
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .trim_start_matches('{')
                            .trim_end_matches('}')
                            .to_string();
                        open = Some((fence, lang, String::new()));
                        break;
                    }
                }
            }
        }
    }
    out
}

/// The output as JSON: the whole text, else the first ```json block, else the first fenced block
/// that parses.
fn json_of(text: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(text.trim()) {
        return Some(v);
    }
    let blocks = code_blocks(text);
    blocks
        .iter()
        .filter(|(info, _)| info.eq_ignore_ascii_case("json"))
        .chain(blocks.iter())
        .find_map(|(_, body)| serde_json::from_str::<Value>(body.trim()).ok())
}

/// One stage of a workflow.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    /// Canonical persona name.
    pub persona: Option<String>,
    /// The model calls for this stage use (a tier or a model); `None`: the request's model.
    pub model: Option<ModelChoice>,
    /// Tokens this stage may use per run (all attempts together).
    pub budget_tokens: Option<u64>,
    /// How many times the gateway retries a call whose output fails the gate.
    pub retries: u32,
    /// The model retries go to ("Switch to Higher-Tier Model"); `None`: the same model.
    pub escalation_model: Option<ModelChoice>,
    /// Prompts longer than this are cut to fit, oldest non-system messages first.
    pub max_prompt_tokens: Option<u64>,
    pub gate: Option<QualityGate>,
    /// Variants of the stage (an experiment): each run of the stage uses one, chosen by
    /// `allocation`. Empty: the stage's own model, no prompt.
    pub variants: Vec<Variant>,
    pub allocation: Allocation,
    /// When its experiment counts as decided.
    pub experiment: Decision,
}

/// An experiment is decided when one variant is best with probability `decide_at` after at
/// least `min_runs` runs of every variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub decide_at: f64,
    pub min_runs: u64,
}

impl Default for Decision {
    fn default() -> Self {
        Decision {
            decide_at: 0.95,
            min_runs: 20,
        }
    }
}

/// How a stage's runs are shared among its variants.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Allocation {
    /// By each variant's fixed `weight`.
    #[default]
    Weights,
    /// Thompson sampling on what the gate said of each variant so far: each run goes to the
    /// variant whose draw from its posterior is best, except a `floor` share per variant, which
    /// keeps every variant measured.
    Adaptive { objective: Objective, floor: f64 },
}

/// What adaptive allocation maximises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// The gate's pass rate.
    PassRate,
    /// Passes per dollar: the pass rate over the variant's cost per run.
    PassPerDollar,
}

/// What the ledger says of one variant so far (the engine's counters).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VariantRecord {
    pub runs: f64,
    pub passes: f64,
    pub failures: f64,
    pub cost_usd: f64,
    /// Gate retries (attempts after a run's first); allocation does not read these.
    pub retries: f64,
    /// Gate retries sent to the escalation model.
    pub escalations: f64,
    /// The median and 95th percentile of the variant's stage durations (from the histogram).
    pub duration_p50_seconds: Option<f64>,
    pub duration_p95_seconds: Option<f64>,
}

/// A prompt file of the configuration: its text and version (its content digest).
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Its path as the workflow names it (`prompts/implementation-v3.md`).
    pub name: String,
    pub text: Arc<str>,
    /// The first 12 hex digits of the SHA-256 of its text.
    pub version: String,
}

impl Prompt {
    pub fn new(name: &str, text: &str) -> Prompt {
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        Prompt {
            name: name.to_string(),
            text: Arc::from(text),
            version: digest.as_ref()[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        }
    }
}

/// One variant of a stage: a model (or tier), a system prompt, a temperature — whichever it sets.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub model: Option<ModelChoice>,
    pub prompt: Option<Prompt>,
    pub temperature: Option<f64>,
    /// Its share of the stage's runs (relative to the other variants'; above 0 in all).
    pub weight: f64,
}

impl Stage {
    /// The variant a run of this stage uses when the run has none yet, drawn from a generator
    /// seeded by `key` (the run id) alone — so replicas that see the same records draw the same —
    /// by the fixed weights, or adaptively from `records` (what each variant did so far).
    /// `None` when the stage has no variants.
    pub fn draw_variant(
        &self,
        workflow: &str,
        key: &str,
        records: &dyn Fn(&str) -> VariantRecord,
    ) -> Option<&Variant> {
        let seed = format!("{workflow}\u{0}{}\u{0}{key}", self.name);
        match self.allocation {
            Allocation::Weights => self.by_weight(&seed),
            Allocation::Adaptive { objective, floor } => {
                self.adaptively(&seed, objective, floor, records)
            }
        }
    }

    fn adaptively(
        &self,
        seed: &str,
        objective: Objective,
        floor: f64,
        records: &dyn Fn(&str) -> VariantRecord,
    ) -> Option<&Variant> {
        use rand::{Rng, SeedableRng};
        use rand_distr::Distribution;
        if self.variants.is_empty() {
            return None;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed_of(seed));
        let k = self.variants.len();
        // The floor: each variant gets this share of the runs whatever the evidence.
        let explore: f64 = rng.random();
        if explore < floor * k as f64 {
            return self.variants.get(((explore / floor) as usize).min(k - 1));
        }
        let seen: Vec<VariantRecord> = self.variants.iter().map(|v| records(&v.name)).collect();
        // A variant with no cost yet is taken at the mean cost per run of those with one.
        let costs: Vec<f64> = seen
            .iter()
            .filter(|r| r.runs > 0.0 && r.cost_usd > 0.0)
            .map(|r| r.cost_usd / r.runs)
            .collect();
        let mean_cost = if costs.is_empty() {
            1.0
        } else {
            costs.iter().sum::<f64>() / costs.len() as f64
        };
        let mut best: Option<(usize, f64)> = None;
        for (i, r) in seen.iter().enumerate() {
            let theta = rand_distr::Beta::new(1.0 + r.passes, 1.0 + r.failures)
                .map(|b| b.sample(&mut rng))
                .unwrap_or(0.5);
            let score = match objective {
                Objective::PassRate => theta,
                Objective::PassPerDollar => {
                    let cost = if r.runs > 0.0 && r.cost_usd > 0.0 {
                        r.cost_usd / r.runs
                    } else {
                        mean_cost
                    };
                    theta / cost.max(1e-9)
                }
            };
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        best.and_then(|(i, _)| self.variants.get(i))
    }

    fn by_weight(&self, seed: &str) -> Option<&Variant> {
        let total: f64 = self.variants.iter().map(|v| v.weight).sum();
        if self.variants.is_empty() || total <= 0.0 {
            return None;
        }
        let point = unit_interval(seed) * total;
        let mut acc = 0.0;
        for v in &self.variants {
            acc += v.weight;
            if point < acc {
                return Some(v);
            }
        }
        self.variants.last()
    }

    /// The variant named `name`, if the stage still has it.
    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name == name)
    }
}

/// 64 bits derived from `text` (SHA-256), the same wherever they are computed.
fn seed_of(text: &str) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(bytes)
}

/// A number in [0, 1) derived from `text`.
fn unit_interval(text: &str) -> f64 {
    (seed_of(text) >> 11) as f64 / (1u64 << 53) as f64
}

/// A workflow: stages in order.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub name: String,
    pub description: String,
    pub stages: Vec<Stage>,
    /// The file it came from (for messages).
    pub file: String,
}

impl Workflow {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    pub fn stage_names(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.name.as_str()).collect()
    }
}

/// What `chatmodes.yml` says of one chatmode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chatmode {
    /// Calls in this chatmode that name a stage but no workflow belong to this workflow.
    pub workflow: Option<String>,
    /// Minimum time between two persona switches of a session in this chatmode.
    pub switch_cooldown_ms: Option<i64>,
}

/// Every workflow and chatmode, by name.
#[derive(Debug, Clone, Default)]
pub struct Workflows {
    pub workflows: BTreeMap<String, Arc<Workflow>>,
    pub chatmodes: BTreeMap<String, Chatmode>,
}

impl Workflows {
    pub fn get(&self, name: &str) -> Option<&Arc<Workflow>> {
        self.workflows.get(name)
    }

    /// The workflow a call belongs to: the one it names, else its chatmode's.
    pub fn workflow_for(&self, named: Option<&str>, chatmode: &str) -> Option<String> {
        named.map(str::to_string).or_else(|| {
            self.chatmodes
                .get(chatmode)
                .and_then(|c| c.workflow.clone())
        })
    }
}

#[cfg(test)]
mod tests;
