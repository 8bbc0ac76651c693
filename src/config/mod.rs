//! Configuration: `hypertool.toml`, persona files and `budgets.yml`, read raw, then validated.
//!
//! A load either yields a complete, checked [`Config`] or every problem found, each with its file,
//! line and a fix. The server keeps the last good configuration when a reload is invalid.
//! With no configuration on disk, the built-in defaults (the files under `config/` in the
//! repository, embedded at build time) are used, so `hypertool serve` works from any directory.

pub mod alerts;
pub mod budgets;
pub mod error;
pub mod gateway;
pub mod personas;
pub mod reload;
pub mod secret;
pub mod settings;
pub mod spans;
pub mod tracing;
pub mod workflows;

use std::collections::{hash_map::DefaultHasher, BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

pub use error::{ConfigError, ConfigErrors};
pub use settings::{LedgerSync, Settings};

use crate::core::budget::{BudgetSource, BudgetSpec};
use crate::core::engine::{EngineConfig, SwitchPolicy};
use crate::core::labels::LabelKind;
use crate::core::persona::{Persona, PersonaRegistry};
use crate::core::workflow::Workflows;

/// The files under `config/`, compiled in.
pub mod embedded {
    pub const HYPERTOOL_TOML: &str = include_str!("../../config/hypertool.toml");
    pub const BUDGETS_YML: &str = include_str!("../../config/budgets.yml");
    pub const CHATMODES_YML: &str = include_str!("../../config/chatmodes.yml");
    pub const WORKFLOWS: &[(&str, &str)] = &[
        (
            "feature-development.yml",
            include_str!("../../config/workflows/feature-development.yml"),
        ),
        (
            "incident-response.yml",
            include_str!("../../config/workflows/incident-response.yml"),
        ),
        (
            "package-release.yml",
            include_str!("../../config/workflows/package-release.yml"),
        ),
    ];
    pub const PERSONAS: &[(&str, &str)] = &[
        (
            "tta-backend-engineer.json",
            include_str!("../../config/personas/tta-backend-engineer.json"),
        ),
        (
            "tta-data-scientist.json",
            include_str!("../../config/personas/tta-data-scientist.json"),
        ),
        (
            "tta-devops-engineer.json",
            include_str!("../../config/personas/tta-devops-engineer.json"),
        ),
        (
            "tta-frontend-engineer.json",
            include_str!("../../config/personas/tta-frontend-engineer.json"),
        ),
        (
            "tta-observability-expert.json",
            include_str!("../../config/personas/tta-observability-expert.json"),
        ),
        (
            "tta-testing-specialist.json",
            include_str!("../../config/personas/tta-testing-specialist.json"),
        ),
    ];
}

/// Where the configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in defaults.
    Embedded,
    /// A `hypertool.toml`; persona files and `budgets.yml` are found relative to its directory.
    File(PathBuf),
}

impl Source {
    /// `--config FILE` if given, else `./config/hypertool.toml` if present, else the built-ins.
    pub fn discover(explicit: Option<&Path>) -> Source {
        match explicit {
            Some(p) => Source::File(p.to_path_buf()),
            None => {
                let default = Path::new("config").join("hypertool.toml");
                if default.is_file() {
                    Source::File(default)
                } else {
                    Source::Embedded
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Embedded => "built-in defaults".into(),
            Source::File(p) => p.display().to_string(),
        }
    }
}

/// A complete, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub settings: Settings,
    pub personas: PersonaRegistry,
    pub budgets: BTreeMap<String, (BudgetSpec, BudgetSource)>,
    /// Gateway rate limits per persona (canonical name) from `budgets.yml`.
    pub rate_limits: BTreeMap<String, gateway::RateLimits>,
    pub workflows: Workflows,
    /// Hash of every file read: a reload applies only when it changes.
    pub fingerprint: u64,
}

/// The raw text of every file a configuration is made of.
#[derive(Debug, Clone, PartialEq)]
struct Files {
    toml: (String, String),
    personas: Vec<(String, Option<PathBuf>, String)>,
    budgets: (String, Option<String>),
    /// (display name, file stem, text)
    workflows: Vec<(String, String, String)>,
    chatmodes: (String, Option<String>),
    /// Prompt files by the name workflows give them (`prompts/<file>`).
    prompts: BTreeMap<String, String>,
}

impl Files {
    fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.toml.hash(&mut h);
        for (name, _, text) in &self.personas {
            name.hash(&mut h);
            text.hash(&mut h);
        }
        self.budgets.hash(&mut h);
        self.workflows.hash(&mut h);
        self.chatmodes.hash(&mut h);
        // An edited prompt is a new configuration (a reload applies it, and records the edit).
        self.prompts.hash(&mut h);
        h.finish()
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            path.display().to_string(),
            None,
            format!("cannot read: {e}"),
        )
        .fix("check that the file exists and is readable")
    })
}

/// A file that may be absent (`None`); one that exists but cannot be read is an error.
fn read_optional(path: &Path, errors: &mut Vec<ConfigError>) -> Option<String> {
    if !path.exists() {
        return None;
    }
    read(path).map_err(|e| errors.push(e)).ok()
}

/// Every file of the configuration, the settings as far as they could be read, and every problem
/// found reading them (`Err` only when `hypertool.toml` itself cannot be read): one pass reports
/// the problems of every file, each at its own place.
fn read_files(source: &Source) -> Result<(Files, Settings, Vec<ConfigError>), Vec<ConfigError>> {
    match source {
        Source::Embedded => {
            let (settings, errors) =
                Settings::parse_lenient("<built-in>/hypertool.toml", embedded::HYPERTOOL_TOML);
            Ok((
                Files {
                    toml: (
                        "<built-in>/hypertool.toml".into(),
                        embedded::HYPERTOOL_TOML.into(),
                    ),
                    personas: embedded::PERSONAS
                        .iter()
                        .map(|(n, t)| (format!("<built-in>/personas/{n}"), None, t.to_string()))
                        .collect(),
                    budgets: (
                        "<built-in>/budgets.yml".into(),
                        Some(embedded::BUDGETS_YML.into()),
                    ),
                    workflows: embedded::WORKFLOWS
                        .iter()
                        .map(|(n, t)| {
                            (
                                format!("<built-in>/workflows/{n}"),
                                n.trim_end_matches(".yml").to_string(),
                                t.to_string(),
                            )
                        })
                        .collect(),
                    chatmodes: (
                        "<built-in>/chatmodes.yml".into(),
                        Some(embedded::CHATMODES_YML.into()),
                    ),
                    prompts: BTreeMap::new(),
                },
                settings,
                errors,
            ))
        }
        Source::File(path) => {
            let display = path.display().to_string();
            let text = read(path).map_err(|e| vec![e])?;
            let (mut settings, mut errors) = Settings::parse_lenient(&display, &text);
            let toml_spans = spans::Spans::toml(&text);
            let base = path.parent().unwrap_or(Path::new("."));
            if let Some(servers) = settings.mcp.servers.take() {
                settings.mcp.servers = Some(base.join(servers));
            }
            read_trust(base, &display, &toml_spans, &mut settings, &mut errors);
            let personas = read_personas(base, &display, &toml_spans, &settings, &mut errors);
            let budgets_path = base.join(&settings.budgets_file);
            let budgets_text = read_optional(&budgets_path, &mut errors);
            let workflows = read_workflows(&base.join(&settings.workflows_dir), &mut errors);
            let chatmodes_path = base.join(&settings.chatmodes_file);
            let chatmodes_text = read_optional(&chatmodes_path, &mut errors);
            let prompts = read_prompts(base, &settings.prompts_dir, &mut errors);
            Ok((
                Files {
                    toml: (display, text),
                    personas,
                    budgets: (budgets_path.display().to_string(), budgets_text),
                    workflows,
                    chatmodes: (chatmodes_path.display().to_string(), chatmodes_text),
                    prompts,
                },
                settings,
                errors,
            ))
        }
    }
}

/// The trust of each outbound client: `[tls] ca_file` for all, a section's own `ca_file` instead;
/// a file that cannot be read or holds no certificate is a problem at its `ca_file`'s line.
fn read_trust(
    base: &Path,
    display: &str,
    toml_spans: &spans::Spans,
    settings: &mut Settings,
    errors: &mut Vec<ConfigError>,
) {
    // Trust: `[tls] ca_file` for every outbound client, a section's own `ca_file` instead.
    let mut read_ca = |section: &str, file: &str| -> crate::tls::Trust {
        let path = base.join(file);
        let loaded = std::fs::read(&path)
            .map_err(|e| format!("cannot be read ({e})"))
            .and_then(|bytes| crate::tls::read_ca_file(&bytes));
        match loaded {
            Ok(certs) => crate::tls::Trust::new(certs),
            Err(why) => {
                errors.push(
                    ConfigError::new(
                        display,
                        toml_spans.line(&format!("{section}.ca_file")),
                        format!("{section}.ca_file {}: {why}", path.display()),
                    )
                    .fix(format!(
                        "point `{section}.ca_file` at a PEM file of CA certificates"
                    )),
                );
                crate::tls::Trust::default()
            }
        }
    };
    let files = settings.trust_files.clone();
    let mut own =
        |section: &str, file: &Option<String>| file.as_deref().map(|f| read_ca(section, f));
    let shared = own("tls", &files.shared).unwrap_or_default();
    let gateway = own("gateway", &settings.gateway.ca_file.clone());
    let trust = settings::TrustSettings {
        ledger: own("ledger", &files.ledger).unwrap_or_else(|| shared.clone()),
        cache: own("gateway.cache", &files.cache).unwrap_or_else(|| shared.clone()),
        langfuse: own("langfuse", &files.langfuse).unwrap_or_else(|| shared.clone()),
        tracing: own("tracing", &files.tracing).unwrap_or_else(|| shared.clone()),
        alerts: own("alerts", &files.alerts).unwrap_or_else(|| shared.clone()),
        mcp: own("mcp", &files.mcp).unwrap_or_else(|| shared.clone()),
        config_dir: Some(base.to_path_buf()),
        shared: shared.clone(),
    };
    settings.gateway.extra_roots = gateway.unwrap_or(shared).extra;
    settings.gateway.cache.trust = trust.cache.clone();
    settings.alerts.delivery.trust = trust.alerts.clone();
    settings.trust = trust;
}

/// The persona files (`*.json`) of `personas.dir`, in name order.
fn read_personas(
    base: &Path,
    display: &str,
    toml_spans: &spans::Spans,
    settings: &Settings,
    errors: &mut Vec<ConfigError>,
) -> Vec<(String, Option<PathBuf>, String)> {
    let dir = base.join(&settings.personas_dir);
    let mut personas = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            paths.sort();
            for p in paths {
                match read(&p) {
                    Ok(t) => personas.push((p.display().to_string(), Some(p), t)),
                    Err(e) => errors.push(e),
                }
            }
        }
        Err(e) => errors.push(
            ConfigError::new(
                display,
                toml_spans.line("personas.dir"),
                format!("cannot read persona directory {}: {e}", dir.display()),
            )
            .fix("create the directory or point `personas.dir` at one"),
        ),
    }
    personas
}

/// The workflow files (`*.yml`, `*.yaml`) of `dir` with their stems, in name order; no directory:
/// no workflows.
fn read_workflows(dir: &Path, errors: &mut Vec<ConfigError>) -> Vec<(String, String, String)> {
    // Workflows are optional: no directory means no workflows.
    let mut workflows = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
            .collect();
        paths.sort();
        for p in paths {
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            match read(&p) {
                Ok(t) => workflows.push((p.display().to_string(), stem, t)),
                Err(e) => errors.push(e),
            }
        }
    }
    workflows
}

/// The prompt files of `prompts_dir` (relative to `base`), each named as a workflow names it:
/// `<dir>/<file>`.
fn read_prompts(
    base: &Path,
    prompts_dir: &str,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<String, String> {
    // Prompts are optional too.
    let mut prompts = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(base.join(prompts_dir)) {
        for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if !p.is_file() {
                continue;
            }
            let name = format!(
                "{}/{}",
                prompts_dir.trim_end_matches('/'),
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            );
            match read(&p) {
                Ok(t) => {
                    prompts.insert(name, t);
                }
                Err(e) => errors.push(e),
            }
        }
    }
    prompts
}

/// Cheap change detection for hot reload: the fingerprint of the files as they are now.
pub fn current_fingerprint(source: &Source) -> Option<u64> {
    read_files(source).ok().map(|(f, _, _)| f.fingerprint())
}

/// Reads and validates everything.
pub fn load(source: &Source) -> Result<Config, ConfigErrors> {
    let (files, settings, errors) = read_files(source).map_err(ConfigErrors)?;
    with_read_errors(errors, build(source, files, settings, &mut Vec::new()))
}

/// What `hypertool check` says: the configuration or every problem, and the warnings (what is
/// allowed but likely not meant: a persona without a budget), found whether or not there are
/// problems.
pub fn load_checked(source: &Source) -> (Result<Config, ConfigErrors>, Vec<ConfigError>) {
    let (files, settings, errors) = match read_files(source) {
        Ok(read) => read,
        Err(errors) => return (Err(ConfigErrors(errors)), Vec::new()),
    };
    let mut warnings = Vec::new();
    let built = build(source, files, settings, &mut warnings);
    (with_read_errors(errors, built), warnings)
}

/// The problems found reading the files, then those found checking them together.
fn with_read_errors(
    mut errors: Vec<ConfigError>,
    built: Result<Config, ConfigErrors>,
) -> Result<Config, ConfigErrors> {
    match built {
        Ok(config) if errors.is_empty() => Ok(config),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(more) => {
            for e in more.0 {
                if !errors.contains(&e) {
                    errors.push(e);
                }
            }
            Err(ConfigErrors(errors))
        }
    }
}

/// Validates the configuration as it would be with the workflow file `path` holding `text`
/// instead (an edit checked before it is written: `hypertool experiments promote`).
pub fn load_with_workflow(
    source: &Source,
    path: &Path,
    text: &str,
) -> Result<Config, ConfigErrors> {
    let (mut files, settings, errors) = read_files(source).map_err(ConfigErrors)?;
    let display = path.display().to_string();
    let Some(file) = files.workflows.iter_mut().find(|(d, _, _)| *d == display) else {
        return Err(ConfigErrors(vec![ConfigError::new(
            display,
            None,
            "is not one of the configuration's workflow files",
        )
        .fix("name a file in the configuration's workflows directory")]));
    };
    file.2 = text.to_string();
    with_read_errors(errors, build(source, files, settings, &mut Vec::new()))
}

fn build(
    source: &Source,
    files: Files,
    settings: Settings,
    warnings: &mut Vec<ConfigError>,
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut personas: Vec<Persona> = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for (display, path, text) in &files.personas {
        match personas::parse_persona(display, path.as_deref(), text, &settings.alias_prefixes) {
            Ok(p) => {
                let mut clash = None;
                for n in std::iter::once(&p.name).chain(p.aliases.iter()) {
                    if let Some(other) = names.get(n) {
                        clash = Some((n.clone(), other.clone()));
                        break;
                    }
                }
                if let Some((n, other)) = clash {
                    errors.push(
                        ConfigError::new(
                            display.clone(),
                            None,
                            format!("persona name `{n}` is also used by {other}"),
                        )
                        .fix("give each persona a unique name and aliases"),
                    );
                    continue;
                }
                for n in std::iter::once(&p.name).chain(p.aliases.iter()) {
                    names.insert(n.clone(), display.clone());
                }
                personas.push(p);
            }
            Err(e) => errors.push(e),
        }
    }
    let registry = PersonaRegistry::new(personas);
    let budgets =
        match budgets::resolve_budgets(&files.budgets.0, files.budgets.1.as_deref(), &registry) {
            Ok(b) => b,
            Err(mut e) => {
                errors.append(&mut e);
                BTreeMap::new()
            }
        };
    // A persona without a budget is counted, not limited: allowed, but rarely meant.
    for (display, _, text) in &files.personas {
        let name = registry
            .iter()
            .find(|p| {
                p.source
                    .as_ref()
                    .is_some_and(|s| s.display().to_string() == *display)
            })
            .map(|p| p.name.clone());
        if let Some(name) = name.filter(|n| !budgets.contains_key(n)) {
            warnings.push(
                ConfigError::new(
                    display.clone(),
                    spans::Spans::yaml(text).line("name"),
                    format!("persona `{name}` has no budget: its spend is counted, never limited, and TokenBudgetExceeded cannot fire for it"),
                )
                .fix(format!(
                    "give it `tokenBudget` in its file or an entry `{name}: {{tokens: N}}` under `personas:` in {}",
                    files.budgets.0
                )),
            );
        }
    }
    let rate_limits = budgets::resolve_rate_limits(files.budgets.1.as_deref(), &registry);
    for (i, key) in settings.gateway.keys.iter().enumerate() {
        if registry.get(&key.persona).is_none() {
            errors.push(
                ConfigError::new(
                    files.toml.0.clone(),
                    spans::Spans::toml(&files.toml.1).line(&format!("gateway.keys[{i}].persona")),
                    format!(
                        "`gateway.keys[{i}].persona` = `{}` is not a known persona",
                        key.persona
                    ),
                )
                .fix("use the name of a persona file in the persona directory"),
            );
        }
    }
    let workflows = match workflows::resolve(
        &files.workflows,
        (&files.chatmodes.0, files.chatmodes.1.as_deref()),
        &registry,
        &settings.gateway,
        &files.prompts,
    ) {
        Ok(w) => w,
        Err(mut e) => {
            errors.append(&mut e);
            Workflows::default()
        }
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        source: source.clone(),
        fingerprint: files.fingerprint(),
        settings,
        personas: registry,
        budgets,
        rate_limits,
        workflows,
    })
}

impl Config {
    /// The part of the configuration the core engine needs.
    pub fn engine_config(&self) -> EngineConfig {
        let s = &self.settings;
        EngineConfig {
            personas: self.personas.clone(),
            budgets: self.budgets.clone(),
            label_cap: s.max_values_per_label,
            configured_labels: vec![
                (LabelKind::Chatmode, s.chatmodes.clone()),
                (LabelKind::Model, s.models.clone()),
                (LabelKind::Workflow, s.workflows.clone()),
                (LabelKind::Stage, s.stages.clone()),
                // Every configured variant: an experiment's arms are never folded away.
                (
                    LabelKind::Variant,
                    self.workflows
                        .workflows
                        .values()
                        .flat_map(|w| w.stages.iter())
                        .flat_map(|st| st.variants.iter().map(|v| v.name.clone()))
                        .collect(),
                ),
            ],
            session_idle_timeout_ms: i64::try_from(s.session_idle_timeout_seconds)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            max_sessions: s.max_sessions,
            switching: SwitchPolicy {
                cooldown_ms: s.switching.cooldown_ms,
                cooldown_per_chatmode: self
                    .workflows
                    .chatmodes
                    .iter()
                    .filter_map(|(name, c)| c.switch_cooldown_ms.map(|ms| (name.clone(), ms)))
                    .collect(),
                oscillation_window_ms: s.switching.oscillation_window_ms,
                suppress_oscillation: s.switching.oscillation_action
                    == settings::OscillationAction::Suppress,
            },
        }
    }
}
