//! Which downstream tools a persona sees, and under which names. Pure: the persona file's
//! `allowedServers` / `allowedTools` and the servers' tool lists in, the exposed tools out.
//!
//! - A server is usable when the persona names it in `allowedServers` or as a key of
//!   `allowedTools`; a persona that names none sees only hypertool's own tools.
//! - `allowedTools[server]` narrows that server to the tools matching one of its entries (globs:
//!   `puppeteer_*`, `get_?ime`); a server without an entry offers all its tools.
//! - Exposed names are `{server}__{tool}`, unique across servers, kept to the characters and
//!   length (64) every client and model API accepts; a name that had to be shortened or changed
//!   ends with a short digest of the original so that two cannot collide.

use std::collections::BTreeMap;

use globset::{Glob, GlobMatcher};

use crate::core::persona::Persona;

/// Separates the server from the tool in an exposed name.
pub const SEPARATOR: &str = "__";
/// The longest exposed tool name (the common limit of model APIs).
pub const MAX_EXPOSED_NAME: usize = 64;

/// A persona's tool permissions, compiled.
#[derive(Debug, Clone, Default)]
pub struct Allowance {
    /// Usable servers; `None` for a server: all its tools; `Some`: only those matching.
    servers: BTreeMap<String, Option<Vec<Pattern>>>,
}

#[derive(Debug, Clone)]
enum Pattern {
    Exact(String),
    Glob(GlobMatcher),
}

impl Pattern {
    fn new(raw: &str) -> Pattern {
        if raw.contains(['*', '?', '[', '{']) {
            // An entry that is not a valid glob is taken as the literal name it spells.
            if let Ok(glob) = Glob::new(raw) {
                return Pattern::Glob(glob.compile_matcher());
            }
        }
        Pattern::Exact(raw.to_string())
    }

    fn matches(&self, tool: &str) -> bool {
        match self {
            Pattern::Exact(name) => name == tool,
            Pattern::Glob(g) => g.is_match(tool),
        }
    }
}

/// The configured servers no persona may use (named in no persona's `allowedServers` or
/// `allowedTools`): their tools are shown to nobody.
pub fn allowed_to_nobody<'a>(
    servers: impl IntoIterator<Item = &'a str>,
    personas: &crate::core::persona::PersonaRegistry,
) -> Vec<&'a str> {
    servers
        .into_iter()
        .filter(|server| {
            !personas.iter().any(|p| {
                p.allowed_servers.iter().any(|s| s == server)
                    || p.allowed_tools.contains_key(*server)
            })
        })
        .collect()
}

impl Allowance {
    pub fn of(persona: &Persona) -> Allowance {
        let mut servers: BTreeMap<String, Option<Vec<Pattern>>> = BTreeMap::new();
        for s in &persona.allowed_servers {
            servers.entry(s.clone()).or_insert(None);
        }
        for (s, tools) in &persona.allowed_tools {
            servers.insert(
                s.clone(),
                Some(tools.iter().map(|t| Pattern::new(t)).collect()),
            );
        }
        Allowance { servers }
    }

    /// Nothing but hypertool's own tools (no persona in force).
    pub fn none() -> Allowance {
        Allowance::default()
    }

    pub fn allows_server(&self, server: &str) -> bool {
        self.servers.contains_key(server)
    }

    pub fn allows(&self, server: &str, tool: &str) -> bool {
        match self.servers.get(server) {
            None => false,
            Some(None) => true,
            Some(Some(patterns)) => patterns.iter().any(|p| p.matches(tool)),
        }
    }

    /// The servers this persona may use, in name order.
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        self.servers.keys().map(String::as_str)
    }
}

/// One downstream tool as exposed to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Exposed {
    pub name: String,
    pub server: String,
    pub tool: String,
}

/// The exposed name of `tool` on `server`.
pub fn exposed_name(server: &str, tool: &str) -> String {
    let joined = format!("{server}{SEPARATOR}{tool}");
    let clean: String = joined
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == joined && clean.len() <= MAX_EXPOSED_NAME {
        return clean;
    }
    // Changed or too long: a digest of the original keeps it unique.
    let digest = ring::digest::digest(&ring::digest::SHA256, joined.as_bytes());
    let tag: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keep = MAX_EXPOSED_NAME - tag.len() - 1;
    let mut head: String = clean.chars().take(keep).collect();
    head.push('_');
    head.push_str(&tag);
    head
}

/// The tools `allowance` exposes from `tools` (server → its tool names, in the server's order).
pub fn expose(allowance: &Allowance, tools: &BTreeMap<String, Vec<String>>) -> Vec<Exposed> {
    let mut out = Vec::new();
    for (server, names) in tools {
        if !allowance.allows_server(server) {
            continue;
        }
        for tool in names {
            if allowance.allows(server, tool) {
                out.push(Exposed {
                    name: exposed_name(server, tool),
                    server: server.clone(),
                    tool: tool.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn persona(servers: &[&str], tools: &[(&str, &[&str])]) -> Persona {
        Persona {
            name: "p".into(),
            aliases: vec![],
            display_name: "P".into(),
            description: String::new(),
            icon: None,
            token_budget: None,
            allowed_servers: servers.iter().map(|s| s.to_string()).collect(),
            allowed_tools: tools
                .iter()
                .map(|(s, t)| (s.to_string(), t.iter().map(|x| x.to_string()).collect()))
                .collect(),
            restricted_paths: vec![],
            context: serde_json::Value::Null,
            security: serde_json::Value::Null,
            workflows: serde_json::Value::Null,
            source: None,
        }
    }

    fn downstream() -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([
            (
                "time".into(),
                vec!["get_current_time".into(), "convert_time".into()],
            ),
            (
                "puppeteer".into(),
                vec![
                    "puppeteer_click".into(),
                    "puppeteer_navigate".into(),
                    "evaluate".into(),
                ],
            ),
            ("git".into(), vec!["git_status".into()]),
        ])
    }

    #[test]
    fn a_persona_sees_its_servers_narrowed_by_its_tool_lists_and_globs() {
        let p = persona(&["time", "puppeteer"], &[("puppeteer", &["puppeteer_*"])]);
        let names: Vec<String> = expose(&Allowance::of(&p), &downstream())
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(
            names,
            [
                "puppeteer__puppeteer_click",
                "puppeteer__puppeteer_navigate",
                "time__get_current_time",
                "time__convert_time"
            ]
        );
        // A server named only in allowedTools is allowed, narrowed to its list.
        let q = persona(&[], &[("time", &["convert_time"])]);
        let e = expose(&Allowance::of(&q), &downstream());
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].server.as_str(), e[0].tool.as_str()),
            ("time", "convert_time")
        );
        // Nobody sees anything without a persona.
        assert!(expose(&Allowance::none(), &downstream()).is_empty());
    }

    #[test]
    fn exposed_names_are_unique_short_and_plain() {
        assert_eq!(
            exposed_name("time", "get_current_time"),
            "time__get_current_time"
        );
        let odd = exposed_name("docs", "search.v2/all");
        assert!(odd.starts_with("docs__search_v2_all_"), "{odd}");
        assert_ne!(odd, exposed_name("docs", "search_v2_all"));
        let long = exposed_name("server", &"t".repeat(100));
        assert_eq!(long.len(), MAX_EXPOSED_NAME);
        assert_ne!(long, exposed_name("server", &"t".repeat(101)));
        assert!(long
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    }
}
