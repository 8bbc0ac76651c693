//! `budgets.yml`: budgets per persona, with defaults for what an entry leaves out.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::error::ConfigError;
use super::gateway::RateLimits;
use super::spans::{self, Spans};
use crate::core::budget::{BudgetMode, BudgetSource, BudgetSpec, Period};
use crate::core::persona::PersonaRegistry;
use std::num::NonZeroU32;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudgetsFile {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    personas: BTreeMap<String, RawBudget>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    period: Option<Period>,
    mode: Option<BudgetMode>,
    soft_limit: Option<f64>,
}

/// One persona's entry; also the body of `PUT /api/budgets/{persona}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub tokens: u64,
    pub cost_usd: Option<f64>,
    pub period: Option<Period>,
    pub mode: Option<BudgetMode>,
    pub soft_limit: Option<f64>,
    /// Gateway calls per minute of this persona (budgets.yml only).
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute of this persona's gateway calls, as admission estimates them.
    pub tokens_per_minute: Option<u32>,
}

impl RawBudget {
    pub fn rate_limits(&self) -> RateLimits {
        RateLimits {
            requests_per_minute: self.requests_per_minute.and_then(NonZeroU32::new),
            tokens_per_minute: self.tokens_per_minute.and_then(NonZeroU32::new),
        }
    }

    /// Checks values serde cannot: a cost must be a finite, non-negative number. The error names
    /// the key it is about.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (key, rate) in [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
        ] {
            if rate == Some(0) {
                return Err((
                    key,
                    "a rate of 0 per minute would refuse every call; leave the key out for no limit"
                        .into(),
                ));
            }
        }
        if let Some(c) = self.cost_usd {
            if !c.is_finite() || c < 0.0 {
                return Err((
                    "cost_usd",
                    format!("cost_usd must be a non-negative number, got {c}"),
                ));
            }
        }
        if let Some(f) = self.soft_limit {
            if !(f > 0.0 && f <= 1.0) {
                return Err((
                    "soft_limit",
                    format!(
                        "soft_limit is a fraction of tokens, above 0 and at most 1 (e.g. 0.8), got {f}"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn resolve(
        &self,
        default_period: Period,
        default_mode: BudgetMode,
        default_soft: Option<f64>,
    ) -> BudgetSpec {
        BudgetSpec {
            tokens: self.tokens,
            cost_usd: self.cost_usd,
            period: self.period.unwrap_or(default_period),
            mode: self.mode.unwrap_or(default_mode),
            soft_limit: self.soft_limit.or(default_soft),
        }
    }
}

/// Resolves the budget of every persona: its `budgets.yml` entry, else its persona file's
/// `tokenBudget` (with the file's defaults for period and mode).
pub fn resolve_budgets(
    file: &str,
    text: Option<&str>,
    personas: &PersonaRegistry,
) -> Result<BTreeMap<String, (BudgetSpec, BudgetSource)>, Vec<ConfigError>> {
    let raw: RawBudgetsFile = match text {
        None => RawBudgetsFile::default(),
        Some(text) if text.trim().is_empty() => RawBudgetsFile::default(),
        Some(text) => serde_yaml_ng::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            vec![ConfigError::new(file, line, e.to_string()).fix(format!(
                "each entry is `personas: {{NAME: {{tokens: N, cost_usd: X, period: P, mode: M}}}}` \
                 with period one of {} and mode one of {}",
                Period::NAMES,
                BudgetMode::NAMES
            ))]
        })?,
    };
    let spans = Spans::yaml(text.unwrap_or(""));
    let mut errors = Vec::new();
    let period = raw.defaults.period.unwrap_or(Period::None);
    let mode = raw.defaults.mode.unwrap_or_default();
    let soft = raw.defaults.soft_limit;
    if let Some(f) = soft {
        if !(f > 0.0 && f <= 1.0) {
            errors.push(
                ConfigError::new(
                    file,
                    spans.line("defaults.soft_limit"),
                    format!("defaults.soft_limit = {f} is not a fraction"),
                )
                .fix("write a number above 0 and at most 1, e.g. `soft_limit: 0.8`"),
            );
        }
    }
    let mut out = BTreeMap::new();
    for p in personas.iter() {
        if let Some(tokens) = p.token_budget {
            let spec = BudgetSpec {
                tokens,
                cost_usd: None,
                period,
                mode,
                soft_limit: soft,
            };
            out.insert(p.name.clone(), (spec, BudgetSource::PersonaFile));
        }
    }
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (key, entry) in &raw.personas {
        let path = format!("personas.{}", spans::key(key));
        let line = spans.line(&path);
        let Some(persona) = personas.get(key) else {
            let known: Vec<&str> = personas.iter().map(|p| p.name.as_str()).collect();
            errors.push(
                ConfigError::new(file, line, format!("budget for unknown persona `{key}`"))
                    .fix(format!("use one of: {}", known.join(", "))),
            );
            continue;
        };
        if let Some(previous) = seen.insert(persona.name.clone(), key.clone()) {
            errors.push(
                ConfigError::new(
                    file,
                    line,
                    format!(
                        "`{key}` and `{previous}` are the same persona `{}`",
                        persona.name
                    ),
                )
                .fix("keep one entry per persona"),
            );
            continue;
        }
        if let Err((field, msg)) = entry.check() {
            errors.push(
                ConfigError::new(
                    file,
                    spans.line(&format!("{path}.{field}")),
                    format!("personas.{key}: {msg}"),
                )
                .fix("write a number such as `cost_usd: 5.0`, or leave the key out"),
            );
            continue;
        }
        out.insert(
            persona.name.clone(),
            (entry.resolve(period, mode, soft), BudgetSource::BudgetsFile),
        );
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The rate limits `budgets.yml` sets per persona (canonical names). Problems in the file are
/// reported by [`resolve_budgets`]; here an unreadable file simply sets no limits.
pub fn resolve_rate_limits(
    text: Option<&str>,
    personas: &PersonaRegistry,
) -> BTreeMap<String, RateLimits> {
    let raw: RawBudgetsFile = text
        .and_then(|t| serde_yaml_ng::from_str(t).ok())
        .unwrap_or_default();
    raw.personas
        .iter()
        .filter_map(|(key, entry)| {
            let persona = personas.get(key)?;
            let limits = entry.rate_limits();
            (!limits.is_empty()).then(|| (persona.name.clone(), limits))
        })
        .collect()
}
