//! The call policy: what the gateway decides about a call before it goes upstream, as pure
//! functions of the call and the configuration — no HTTP, no clock, no I/O — so each rule is tested
//! on its own. Admission (budgets, the run stage's budget, the stage's start) is
//! [`Engine::admit_call`](super::engine::Engine::admit_call), on the manual clock.
//!
//! - **Attribution:** a persona key's persona wins over the `X-Hypertool-Persona` header; without
//!   either the call is the unattributed persona's.
//! - **The stage's model:** a stage that sets a model or tier decides the model (the runbook's
//!   `STAGE_MODEL_MAPPING`); `"model": "auto"` asks for exactly that and is an error without one.
//! - **Tool scope:** tools the persona's `allowedTools` does not list are removed, or the call is
//!   refused (`gateway.tool_policy`).
//! - **Downgrade:** where a persona whose `downgrade` budget is spent goes instead.

use std::collections::BTreeMap;

use serde::Deserialize;

/// What to do with requested tools a persona's `allowedTools` does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ToolPolicy {
    /// Remove them and go on.
    #[default]
    Filter,
    /// Refuse the call with 403.
    Refuse,
}

/// The persona a call is for: the key's, else the header's, else `unattributed`.
pub fn attribute(key_persona: Option<&str>, header: Option<&str>, unattributed: &str) -> String {
    key_persona.or(header).unwrap_or(unattributed).to_string()
}

/// The model a call goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDecision {
    pub model: String,
    /// Set when the stage replaced the requested model: `requested -> chosen`, for a header.
    pub replaced: Option<String>,
}

/// Why the policy refused a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyRefusal {
    /// `"model": "auto"` outside a stage that sets a model.
    AutoWithoutStage,
    /// Tools outside the persona's `allowedTools`, with `tool_policy = "refuse"`.
    ToolsNotAllowed { persona: String, tools: Vec<String> },
}

/// The stage's model (its resolved route name) wins over the requested one; `auto` needs one.
pub fn choose_model(
    requested: &str,
    stage_model: Option<&str>,
) -> Result<ModelDecision, PolicyRefusal> {
    match (requested, stage_model) {
        (_, Some(chosen)) => Ok(ModelDecision {
            model: chosen.to_string(),
            replaced: (chosen != requested).then(|| format!("{requested} -> {chosen}")),
        }),
        ("auto", None) => Err(PolicyRefusal::AutoWithoutStage),
        (requested, None) => Ok(ModelDecision {
            model: requested.to_string(),
            replaced: None,
        }),
    }
}

/// What tool scope did to a call's `tools`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolScope {
    /// Nothing to remove (no tools, no `allowedTools`, or every tool allowed).
    Unchanged,
    /// Only the tools named in `keep` stay (none: drop `tools` and `tool_choice`); `removed`
    /// names what went.
    Filtered {
        keep: Vec<String>,
        removed: Vec<String>,
    },
}

/// Whether a function name is one of the persona's allowed tools: `tool`, `server_tool`,
/// `server__tool` or `server.tool`.
fn permitted(allowed: &BTreeMap<String, Vec<String>>, name: &str) -> bool {
    allowed.iter().any(|(server, list)| {
        list.iter().any(|t| {
            let joined = |sep: &str| {
                name.strip_prefix(server.as_str())
                    .and_then(|rest| rest.strip_prefix(sep))
                    .is_some_and(|tool| tool == t)
            };
            // Claude Code names an MCP server's tool `mcp__{server}__{tool}`.
            let claude_code = name
                .strip_prefix("mcp__")
                .and_then(|rest| rest.strip_prefix(server.as_str()))
                .and_then(|rest| rest.strip_prefix("__"))
                .is_some_and(|tool| tool == t);
            name == t || joined("_") || joined("__") || joined(".") || claude_code
        })
    })
}

/// Applies the persona's `allowedTools` (empty: no restriction) to the requested `tools`.
pub fn scope_tools(
    persona: &str,
    tools: &[String],
    allowed: &BTreeMap<String, Vec<String>>,
    policy: ToolPolicy,
) -> Result<ToolScope, PolicyRefusal> {
    if allowed.is_empty() || tools.is_empty() {
        return Ok(ToolScope::Unchanged);
    }
    let (keep, removed): (Vec<&String>, Vec<&String>) =
        tools.iter().partition(|t| permitted(allowed, t));
    if removed.is_empty() {
        return Ok(ToolScope::Unchanged);
    }
    let removed: Vec<String> = removed.into_iter().cloned().collect();
    if policy == ToolPolicy::Refuse {
        return Err(PolicyRefusal::ToolsNotAllowed {
            persona: persona.to_string(),
            tools: removed,
        });
    }
    Ok(ToolScope::Filtered {
        keep: keep.into_iter().cloned().collect(),
        removed,
    })
}

/// The model a spent `downgrade` budget sends `persona`'s call to: the persona's
/// `gateway.downgrade` entry, else the model's `downgrade_to`; `None` when neither names another
/// model.
pub fn downgrade_target<'a>(
    persona: &str,
    model: &str,
    persona_downgrade: &'a BTreeMap<String, String>,
    model_downgrade: Option<&'a str>,
) -> Option<&'a str> {
    persona_downgrade
        .get(persona)
        .map(String::as_str)
        .or(model_downgrade)
        .filter(|target| *target != model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_wins_then_the_header_then_unattributed() {
        assert_eq!(attribute(Some("a"), Some("b"), "u"), "a");
        assert_eq!(attribute(None, Some("b"), "u"), "b");
        assert_eq!(attribute(None, None, "u"), "u");
    }

    #[test]
    fn the_stage_decides_the_model_and_auto_needs_a_stage() {
        let d = choose_model("gpt-4o", Some("mock/cheap")).unwrap();
        assert_eq!(d.model, "mock/cheap");
        assert_eq!(d.replaced.as_deref(), Some("gpt-4o -> mock/cheap"));
        assert_eq!(choose_model("x", Some("x")).unwrap().replaced, None);
        assert_eq!(choose_model("auto", Some("m")).unwrap().model, "m");
        assert_eq!(
            choose_model("auto", None),
            Err(PolicyRefusal::AutoWithoutStage)
        );
        assert_eq!(choose_model("gpt-4o", None).unwrap().model, "gpt-4o");
    }

    #[test]
    fn tools_outside_allowed_tools_are_removed_or_refused() {
        let allowed = BTreeMap::from([("github".to_string(), vec!["create_issue".to_string()])]);
        let tool = |n: &str| n.to_string();
        let tools = vec![
            tool("create_issue"),
            tool("github__create_issue"),
            tool("github.create_issue"),
            tool("mcp__github__create_issue"),
            tool("github_create_issue"),
            tool("delete_repo"),
            tool("gitlab_create_issue"),
        ];
        match scope_tools("p", &tools, &allowed, ToolPolicy::Filter).unwrap() {
            ToolScope::Filtered { keep, removed } => {
                assert_eq!(keep.len(), 5);
                assert_eq!(removed, ["delete_repo", "gitlab_create_issue"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            scope_tools("p", &tools, &allowed, ToolPolicy::Refuse),
            Err(PolicyRefusal::ToolsNotAllowed { .. })
        ));
        assert_eq!(
            scope_tools("p", &tools[..1], &allowed, ToolPolicy::Refuse).unwrap(),
            ToolScope::Unchanged
        );
        // No allowedTools: no restriction.
        assert_eq!(
            scope_tools("p", &tools, &BTreeMap::new(), ToolPolicy::Refuse).unwrap(),
            ToolScope::Unchanged
        );
    }

    #[test]
    fn downgrade_goes_to_the_persona_entry_then_the_model_entry() {
        let per = BTreeMap::from([("fe".to_string(), "mock/cheap".to_string())]);
        assert_eq!(
            downgrade_target("fe", "gpt-4o", &per, Some("mini")),
            Some("mock/cheap")
        );
        assert_eq!(
            downgrade_target("be", "gpt-4o", &per, Some("mini")),
            Some("mini")
        );
        assert_eq!(downgrade_target("be", "gpt-4o", &per, None), None);
        assert_eq!(downgrade_target("be", "mini", &per, Some("mini")), None);
    }
}
