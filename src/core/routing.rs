//! Capability routing: which persona should handle a task, from what the persona files say the
//! personas do (description, focus areas, frameworks, language, workflows, tool servers).
//!
//! The runbook's fix for thrashing is "switch persona only when changing task type": the current
//! persona keeps a task it is capable of (it matches at least one capability term), even when
//! another persona matches more. Only a task the current persona cannot handle moves the session.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::persona::{Persona, PersonaRegistry};

/// Words too common to say anything about a task.
const STOPWORDS: &[&str] = &[
    "the",
    "and",
    "for",
    "with",
    "that",
    "this",
    "from",
    "into",
    "our",
    "your",
    "are",
    "was",
    "were",
    "will",
    "can",
    "should",
    "would",
    "could",
    "add",
    "make",
    "new",
    "use",
    "using",
    "need",
    "needs",
    "all",
    "any",
    "some",
    "get",
    "set",
    "fix",
    "update",
    "write",
    "create",
    "please",
    "about",
    "via",
    "its",
    "it's",
    "not",
    "but",
    "have",
    "has",
    "had",
    "more",
    "less",
    "than",
    "then",
    "when",
    "what",
    "which",
    "who",
    "how",
    "why",
    "where",
    "there",
    "their",
    "them",
    "they",
    "development",
    "engineer",
    "engineering",
    "specialist",
    "expert",
    "tta",
];

/// Lowercase words of at least 3 characters, crudely stemmed (plural and -ing/-ed endings), minus
/// stop words.
fn terms(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 3)
        .map(|w| stem(&w.to_lowercase()))
        .filter(|w| w.len() >= 3 && !STOPWORDS.contains(&w.as_str()))
        .collect()
}

fn stem(w: &str) -> String {
    for suffix in ["ing", "ies", "ed", "es", "s"] {
        if let Some(base) = w.strip_suffix(suffix) {
            if base.len() >= 4 {
                return if suffix == "ies" {
                    format!("{base}y")
                } else {
                    base.to_string()
                };
            }
        }
    }
    w.to_string()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) => items.iter().flat_map(strings).collect(),
        serde_json::Value::Object(m) => m.values().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

/// The capability terms of one persona.
pub fn capabilities(p: &Persona) -> BTreeSet<String> {
    let mut text = vec![
        p.name.clone(),
        p.display_name.clone(),
        p.description.clone(),
    ];
    for key in ["primaryLanguage", "frameworks", "focusAreas"] {
        if let Some(v) = p.context.get(key) {
            text.extend(strings(v));
        }
    }
    text.extend(strings(&p.workflows));
    text.extend(p.allowed_servers.iter().cloned());
    terms(&text.join(" "))
}

/// How well one persona matches a task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PersonaScore {
    pub persona: String,
    pub score: usize,
    pub matched: Vec<String>,
}

/// The answer to "who should handle this task?".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteDecision {
    /// The persona that should handle the task (`None` when no persona matches and the session
    /// has none).
    pub persona: Option<String>,
    /// True when that is the session's current persona (no switch needed).
    pub keep: bool,
    pub reason: String,
    /// Every persona with a match, best first.
    pub scores: Vec<PersonaScore>,
}

/// Routes `task` for a session currently in `current` (canonical name, if any).
pub fn route(personas: &PersonaRegistry, current: Option<&str>, task: &str) -> RouteDecision {
    let wanted = terms(task);
    let mut scores: Vec<PersonaScore> = personas
        .iter()
        .map(|p| {
            let caps = capabilities(p);
            let matched: Vec<String> = wanted.intersection(&caps).cloned().collect();
            PersonaScore {
                persona: p.name.clone(),
                score: matched.len(),
                matched,
            }
        })
        .filter(|s| s.score > 0)
        .collect();
    scores.sort_by(|a, b| b.score.cmp(&a.score).then(a.persona.cmp(&b.persona)));
    let best = scores.first().map(|s| s.persona.clone());
    let current_score: BTreeMap<&str, usize> = scores
        .iter()
        .map(|s| (s.persona.as_str(), s.score))
        .collect();
    match current {
        Some(cur) if current_score.contains_key(cur) => RouteDecision {
            persona: Some(cur.to_string()),
            keep: true,
            reason: format!(
                "the current persona `{cur}` is capable of this task ({} matching capabilities); no switch",
                current_score[cur]
            ),
            scores,
        },
        Some(cur) if best.is_none() => RouteDecision {
            persona: Some(cur.to_string()),
            keep: true,
            reason: "no persona's capabilities match the task; keeping the current persona".into(),
            scores,
        },
        _ => match best {
            Some(b) => RouteDecision {
                keep: current == Some(b.as_str()),
                reason: match current {
                    Some(cur) => format!(
                        "the current persona `{cur}` has none of the capabilities the task needs; `{b}` matches best"
                    ),
                    None => format!("`{b}` matches the task best"),
                },
                persona: Some(b),
                scores,
            },
            None => RouteDecision {
                persona: None,
                keep: false,
                reason: "no persona's capabilities match the task; name a persona explicitly".into(),
                scores,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, Source};

    fn registry() -> PersonaRegistry {
        load(&Source::Embedded).unwrap().personas
    }

    #[test]
    fn tasks_go_to_the_persona_whose_files_describe_them() {
        let r = registry();
        let d = route(
            &r,
            None,
            "Write pytest integration tests and improve test coverage",
        );
        assert_eq!(d.persona.as_deref(), Some("testing-specialist"), "{d:?}");
        assert!(!d.keep);
        let d = route(
            &r,
            None,
            "Set up Prometheus alerting and Grafana dashboards",
        );
        assert_eq!(d.persona.as_deref(), Some("observability-expert"), "{d:?}");
    }

    #[test]
    fn a_capable_current_persona_keeps_the_task() {
        let r = registry();
        let task = "Write pytest integration tests and improve test coverage";
        let best = route(&r, None, task).scores[0].clone();
        assert_eq!(best.persona, "testing-specialist");
        // Backend also tests (its `testing-backend` workflow): it keeps the task instead of
        // thrashing to testing-specialist, which matches more.
        let kept = route(&r, Some("backend-engineer"), task);
        let backend = kept
            .scores
            .iter()
            .find(|s| s.persona == "backend-engineer")
            .unwrap();
        assert!(backend.score < best.score && backend.matched.contains(&"test".to_string()));
        assert!(kept.keep);
        assert_eq!(kept.persona.as_deref(), Some("backend-engineer"));
        // A current persona with nothing in common with the task gives it up.
        let moved = route(
            &r,
            Some("frontend-engineer"),
            "pytest coverage of the database layer",
        );
        assert!(!moved.keep, "{moved:?}");
        assert_ne!(moved.persona.as_deref(), Some("frontend-engineer"));
        // Nothing matches: keep what the session has.
        let none = route(&r, Some("data-scientist"), "zzz qqq");
        assert!(none.keep && none.scores.is_empty());
        assert_eq!(route(&r, None, "zzz qqq").persona, None);
    }
}
