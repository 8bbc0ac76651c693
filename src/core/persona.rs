//! The persona registry: who the agents can be, under which names.
//!
//! Hypertool persona files name personas `tta-backend-engineer`; the runbook and the metrics say
//! `backend-engineer`. The registry keeps the bare name as canonical and answers to every alias.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::Serialize;

/// One persona, as loaded from its file (or the built-in defaults).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Persona {
    /// Canonical name: the one on every metric label.
    pub name: String,
    pub aliases: Vec<String>,
    pub display_name: String,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icon: Option<String>,
    /// The persona file's `tokenBudget`; `budgets.yml` overrides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_budget: Option<u64>,
    pub allowed_servers: Vec<String>,
    pub allowed_tools: BTreeMap<String, Vec<String>>,
    pub restricted_paths: Vec<String>,
    pub context: serde_json::Value,
    pub security: serde_json::Value,
    pub workflows: serde_json::Value,
    /// The file it came from (`None` for built-in defaults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
}

/// All personas, looked up by canonical name or alias.
#[derive(Debug, Clone, Default)]
pub struct PersonaRegistry {
    personas: Vec<Persona>,
    index: HashMap<String, usize>,
}

impl PersonaRegistry {
    /// Builds the registry. Duplicate names are refused by configuration validation beforehand;
    /// here the first one wins.
    pub fn new(mut personas: Vec<Persona>) -> Self {
        personas.sort_by(|a, b| a.name.cmp(&b.name));
        let mut index = HashMap::new();
        for (i, p) in personas.iter().enumerate() {
            index.entry(p.name.clone()).or_insert(i);
            for alias in &p.aliases {
                index.entry(alias.clone()).or_insert(i);
            }
        }
        Self { personas, index }
    }

    pub fn get(&self, name_or_alias: &str) -> Option<&Persona> {
        self.index.get(name_or_alias).map(|&i| &self.personas[i])
    }

    /// The canonical name for `name_or_alias`, or the input itself for an unknown persona.
    pub fn canonical<'a>(&'a self, name_or_alias: &'a str) -> &'a str {
        match self.get(name_or_alias) {
            Some(p) => &p.name,
            None => name_or_alias,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Persona> {
        self.personas.iter()
    }

    pub fn len(&self) -> usize {
        self.personas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.personas.is_empty()
    }
}
