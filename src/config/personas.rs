//! Hypertool persona files (`*.json`), loaded as they are written by the Hypertool ecosystem.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::error::ConfigError;
use super::spans::Spans;
use crate::core::persona::Persona;

/// The Hypertool persona format. Unknown keys are kept (it is a foreign format that grows), but the
/// known ones are type-checked.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PersonaFile {
    name: String,
    display_name: Option<String>,
    #[serde(default)]
    description: String,
    icon: Option<String>,
    token_budget: Option<u64>,
    #[serde(default)]
    allowed_servers: Vec<String>,
    #[serde(default)]
    allowed_tools: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    restricted_paths: Vec<String>,
    #[serde(default)]
    context: serde_json::Value,
    #[serde(default)]
    security: serde_json::Value,
    #[serde(default)]
    workflows: serde_json::Value,
    /// hypertool's extension: more names this persona answers to.
    #[serde(default)]
    aliases: Vec<String>,
}

/// Parses one persona file. `display` names the file in errors.
pub fn parse_persona(
    display: &str,
    path: Option<&Path>,
    text: &str,
    alias_prefixes: &[String],
) -> Result<Persona, ConfigError> {
    let raw: PersonaFile = serde_json::from_str(text).map_err(|e| {
        ConfigError::new(display, Some(e.line()), e.to_string()).fix(
            "a persona file is a JSON object with at least \"name\"; see config/personas/ for examples",
        )
    })?;
    if !valid_name(&raw.name) {
        return Err(ConfigError::new(
            display,
            Spans::yaml(text).line("name"),
            format!(
                "persona name {:?} is not usable as a metric label",
                raw.name
            ),
        )
        .fix("use letters, digits, '-', '_' or '.', 1 to 128 characters"));
    }
    let (name, mut aliases) = match alias_prefixes.iter().find_map(|p| {
        raw.name
            .strip_prefix(p.as_str())
            .filter(|rest| !rest.is_empty())
    }) {
        Some(bare) => (bare.to_string(), vec![raw.name.clone()]),
        None => (raw.name.clone(), Vec::new()),
    };
    for (i, alias) in raw.aliases.into_iter().enumerate() {
        if !valid_name(&alias) {
            return Err(ConfigError::new(
                display,
                Spans::yaml(text).line(&format!("aliases[{i}]")),
                format!("alias {alias:?} is not usable as a persona name"),
            )
            .fix("use letters, digits, '-', '_' or '.', 1 to 128 characters"));
        }
        if alias != name && !aliases.contains(&alias) {
            aliases.push(alias);
        }
    }
    Ok(Persona {
        display_name: raw.display_name.unwrap_or_else(|| name.clone()),
        name,
        aliases,
        description: raw.description,
        icon: raw.icon,
        token_budget: raw.token_budget,
        allowed_servers: raw.allowed_servers,
        allowed_tools: raw.allowed_tools,
        restricted_paths: raw.restricted_paths,
        context: raw.context,
        security: raw.security,
        workflows: raw.workflows,
        source: path.map(Path::to_path_buf),
    })
}

/// Names that are sane as label values and URL path segments.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tta_prefix_becomes_an_alias() {
        let p = parse_persona(
            "x.json",
            None,
            r#"{"name":"tta-backend-engineer","tokenBudget":2000,"unknownKey":1}"#,
            &["tta-".into()],
        )
        .unwrap();
        assert_eq!(p.name, "backend-engineer");
        assert_eq!(p.aliases, vec!["tta-backend-engineer".to_string()]);
        assert_eq!(p.token_budget, Some(2000));
    }

    #[test]
    fn bad_json_names_the_line() {
        let err = parse_persona(
            "x.json",
            None,
            "{\n\"name\": \"a\",\n\"tokenBudget\": -5\n}",
            &[],
        )
        .unwrap_err();
        assert_eq!(err.line, Some(3));
        assert!(err.to_string().starts_with("x.json:3: "), "{err}");
    }
}
