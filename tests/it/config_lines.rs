//! Every validation error of the configuration at the exact line of the value it is about: one bad
//! value per key, written into the shipped files (where the same key names — `threshold`, `url`,
//! `enabled`, `timeout` — appear many times), and the `file:line` the error reports.

use hypertool::config::settings::Settings;

const SHIPPED: &str = include_str!("../../config/hypertool.toml");

/// Writes `key = value` into `[section]` of the shipped file (replacing the key's line when the
/// section sets it, else right below the header; a section the file lacks is appended) and
/// returns the text and the line the value is on.
fn with_value(section: &str, key: &str, value: &str) -> (String, usize) {
    let mut lines: Vec<String> = SHIPPED.lines().map(str::to_string).collect();
    let header = format!("[{section}]");
    let entry = format!("{key} = {value}");
    let Some(start) = lines.iter().position(|l| l.trim() == header) else {
        lines.push(String::new());
        lines.push(header);
        lines.push(entry);
        let at = lines.len();
        return (lines.join("\n") + "\n", at);
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .map_or(lines.len(), |i| start + 1 + i);
    let existing = (start + 1..end).find(|&i| {
        let t = lines[i].trim_start();
        t.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    });
    let at = match existing {
        Some(i) => {
            lines[i] = entry;
            i
        }
        None => {
            lines.insert(start + 1, entry);
            start + 1
        }
    };
    (lines.join("\n") + "\n", at + 1)
}

/// The shipped file with `snippet`: its body inserted below the header when the file has the
/// snippet's `[section]` already, else appended. Returns the text and the line marked `# <-`.
fn with_snippet(snippet: &str) -> (String, usize) {
    let (first, body) = snippet.split_once('\n').unwrap_or((snippet, ""));
    let mut lines: Vec<&str> = SHIPPED.lines().collect();
    let existing = (first.starts_with('[') && !first.starts_with("[["))
        .then(|| lines.iter().position(|l| l.trim() == first))
        .flatten();
    let text = match existing {
        Some(header) => {
            // The snippet's keys replace the section's own (a key may be set once).
            let keys: Vec<&str> = body
                .lines()
                .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim()))
                .collect();
            let end = lines[header + 1..]
                .iter()
                .position(|l| l.trim_start().starts_with('['))
                .map_or(lines.len(), |i| header + 1 + i);
            let mut i = header + 1;
            let mut end = end;
            while i < end {
                let set_here = keys.iter().any(|k| {
                    lines[i]
                        .strip_prefix(k)
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
                });
                if set_here {
                    lines.remove(i);
                    end -= 1;
                } else {
                    i += 1;
                }
            }
            for (i, l) in body.lines().enumerate() {
                lines.insert(header + 1 + i, l);
            }
            lines.join("\n") + "\n"
        }
        None => format!("{SHIPPED}\n{snippet}"),
    };
    let at = text
        .lines()
        .position(|l| l.ends_with("# <-"))
        .expect("the snippet marks its bad line")
        + 1;
    (text, at)
}

fn assert_reported(text: &str, line: usize, names: &str, case: &str) {
    let errors = match Settings::parse("hypertool.toml", text) {
        Ok(_) => panic!("{case}: accepted"),
        Err(e) => e,
    };
    let found = errors.iter().find(|e| e.message.contains(names));
    let Some(found) = found else {
        panic!("{case}: no error names {names:?}: {errors:?}");
    };
    assert_eq!(
        found.line,
        Some(line),
        "{case}: reported at the wrong line: {found}"
    );
    assert_eq!(found.file, "hypertool.toml");
}

#[test]
fn every_bad_toml_value_is_reported_at_its_own_line() {
    // (section, key, bad value, what the message names)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("server", "listen", "\"nowhere\"", "server.listen"),
        (
            "server",
            "metrics_listen",
            "\"x:y\"",
            "server.metrics_listen",
        ),
        ("server", "max_body_bytes", "10", "server.max_body_bytes"),
        (
            "server",
            "max_inflight_body_bytes",
            "1048576",
            "server.max_inflight_body_bytes",
        ),
        ("server", "max_connections", "0", "server.max_connections"),
        (
            "server",
            "max_connections_per_client",
            "0",
            "server.max_connections_per_client",
        ),
        (
            "server",
            "max_tokens_per_event",
            "0",
            "server.max_tokens_per_event",
        ),
        (
            "server",
            "header_timeout",
            "\"1ms\"",
            "server.header_timeout",
        ),
        ("server", "body_timeout", "\"2h\"", "server.body_timeout"),
        (
            "ledger",
            "outage_buffer_events",
            "0",
            "ledger.outage_buffer_events",
        ),
        (
            "ledger",
            "snapshot_interval",
            "\"10ms\"",
            "ledger.snapshot_interval",
        ),
        ("ledger", "retain_days", "1", "ledger.retain_days"),
        ("ledger", "url", "\"mysql://db/h\"", "ledger.url"),
        ("ledger", "replica_lease", "\"1s\"", "ledger.replica_lease"),
        (
            "labels",
            "max_values_per_label",
            "0",
            "labels.max_values_per_label",
        ),
        ("reload", "interval_ms", "1", "reload.interval_ms"),
        (
            "alerts",
            "evaluation_interval",
            "\"10ms\"",
            "alerts.evaluation_interval",
        ),
        (
            "alerts",
            "alertmanager_url",
            "\"ftp://am\"",
            "alerts.alertmanager_url",
        ),
        ("alerts", "webhook_url", "\"hook\"", "alerts.webhook_url"),
        (
            "alerts",
            "delivery_timeout",
            "\"0s\"",
            "alerts.delivery_timeout",
        ),
        (
            "alerts.SlowWorkflowStage",
            "quantile",
            "2",
            "alerts.SlowWorkflowStage.quantile",
        ),
        (
            "alerts.SlowWorkflowStage",
            "threshold",
            "nan",
            "alerts.SlowWorkflowStage.threshold",
        ),
        (
            "alerts.HighQualityGateFailureRate",
            "window",
            "\"0s\"",
            "alerts.HighQualityGateFailureRate.window",
        ),
        (
            "alerts.TokenBudgetDepletionPredicted",
            "horizon",
            "\"0s\"",
            "alerts.TokenBudgetDepletionPredicted.horizon",
        ),
        (
            "alerts.HypertoolMetricsNotReported",
            "threshold",
            "1",
            "alerts.HypertoolMetricsNotReported.threshold",
        ),
        (
            "alerts.TokenBudgetExceeded",
            "quantile",
            "0.5",
            "alerts.TokenBudgetExceeded.quantile",
        ),
        (
            "switching",
            "cooldown_seconds",
            "-1.0",
            "switching.cooldown_seconds",
        ),
        (
            "switching",
            "oscillation_window_seconds",
            "-1.0",
            "switching.oscillation_window_seconds",
        ),
        ("langfuse", "enabled", "\"sometimes\"", "langfuse.enabled"),
        (
            "tracing",
            "endpoint",
            "\"ftp://collector\"",
            "tracing.endpoint",
        ),
        ("tracing", "timeout", "\"0s\"", "tracing.timeout"),
        (
            "tracing",
            "batch_interval",
            "\"0s\"",
            "tracing.batch_interval",
        ),
        ("gateway", "max_in_flight", "0", "gateway.max_in_flight"),
        (
            "gateway.cache",
            "url",
            "\"http://cache\"",
            "gateway.cache.url",
        ),
        (
            "gateway.cache",
            "max_bytes",
            "1000",
            "gateway.cache.max_bytes",
        ),
    ];
    for (section, key, value, names) in cases {
        let (text, line) = with_value(section, key, value);
        assert_reported(&text, line, names, &format!("[{section}] {key} = {value}"));
    }
}

#[test]
fn values_inside_lists_and_entries_are_reported_at_their_own_line() {
    let cases: &[(&str, &str)] = &[
        // The second pattern of a list, on a line of its own.
        (
            "[langfuse]\nredact = [\n  \"sk-[a-z]+\",\n  \"(unclosed\",  # <-\n]\n",
            "langfuse.redact",
        ),
        (
            "[tracing]\nredact = [\"ok\",\n \"[\"]  # <-\n",
            "tracing.redact",
        ),
        // The second model's fallback, not the first model's key of the same name.
        (
            "[[gateway.models]]\nname = \"m1\"\nupstream = \"mock\"\nfallbacks = [\"mock/x\"]\n\n[[gateway.models]]\nname = \"m2\"\nupstream = \"mock\"\nfallbacks = [\"mock/y\",\n  \"nowhere\"]  # <-\n",
            "`nowhere`",
        ),
        // downgrade_to by its own name and line (the README's example once said `fallbacks`).
        (
            "[[gateway.models]]\nname = \"m1\"\nupstream = \"mock\"\nfallbacks = [\"mock/x\"]\ndowngrade_to = \"gpt-4o-mini\"  # <-\n",
            "gateway.models[0].downgrade_to",
        ),
        (
            "[[gateway.models]]\nname = \"m1\"\nupstream = \"nowhere\"  # <-\n",
            "gateway.models[0].upstream",
        ),
        (
            "[gateway.downgrade]\nbackend-engineer = \"nowhere\"  # <-\n",
            "gateway.downgrade.backend-engineer",
        ),
        // A gateway key's unset variable at its own entry, not at the viewer key before it.
        (
            "[[server.viewer_keys]]\nkey_env = \"HT_CONFIG_LINES_V_NEVER_SET\"\n\n[[gateway.keys]]\nkey_env = \"HT_CONFIG_LINES_G_NEVER_SET\"  # <-\npersona = \"backend-engineer\"\n",
            "gateway.keys[0].key_env",
        ),
    ];
    for (snippet, names) in cases {
        let (text, line) = with_snippet(snippet);
        assert_reported(&text, line, names, snippet);
    }
}

/// A key variable that is not set: the error is at the entry that names it (not at another entry
/// that happens to be first), and names the variable.
#[test]
fn an_unset_key_variable_is_reported_at_the_entry_naming_it() {
    let snippet = "[[server.viewer_keys]]\nkey_env = \"HT_CONFIG_LINES_VIEWER_NEVER_SET\"\n\n[[server.admin_keys]]\nkey_env = \"HT_CONFIG_LINES_ADMIN_NEVER_SET\"  # <-\n";
    let (text, line) = with_snippet(snippet);
    assert_reported(&text, line, "server.admin_keys[0].key_env", "admin key");
    assert_reported(
        &text,
        line - 3,
        "server.viewer_keys[0].key_env",
        "viewer key",
    );
}

/// Replaces the one line of `file` (under the copied configuration) containing `find` with
/// `with` (which may span lines and mark its bad line `# <-`); returns the marked line.
fn edit_copy(config: &std::path::Path, file: &str, find: &str, with: &str) -> Option<usize> {
    let path = config.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(find))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{file}: `{find}` must be on exactly one line"
    );
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[hits[0]] = with.to_string();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    with.lines()
        .position(|l| l.ends_with("# <-"))
        .map(|i| hits[0] + i + 1)
}

#[test]
fn every_bad_yaml_value_is_reported_at_its_own_line() {
    // (file, a line's unique text, what replaces it, what the message names)
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "budgets.yml",
            "soft_limit: 0.8",
            "  soft_limit: 2  # <-",
            "defaults.soft_limit",
        ),
        (
            "budgets.yml",
            "tokens: 1500",
            "    tokens: 1500\n    cost_usd: -1  # <-",
            "cost_usd must be a non-negative number",
        ),
        (
            "budgets.yml",
            "data-scientist:",
            "  data-scientist:\n    requests_per_minute: 0  # <-",
            "a rate of 0 per minute",
        ),
        (
            "budgets.yml",
            "observability-expert:",
            "  nobody-at-all:  # <-\n    tokens: 1\n  observability-expert:",
            "unknown persona `nobody-at-all`",
        ),
        (
            "chatmodes.yml",
            "workflow: package-release",
            "    workflow: no-such-workflow  # <-",
            "workflow `no-such-workflow` is not defined",
        ),
        (
            "chatmodes.yml",
            "switch_cooldown_seconds: 2",
            "    switch_cooldown_seconds: -2  # <-",
            "switch_cooldown_seconds must be 0 or more",
        ),
        // The third stage's persona, not the first `persona:` of the file.
        (
            "workflows/feature-development.yml",
            "persona: testing-specialist",
            "    persona: nobody-at-all  # <-",
            "persona `nobody-at-all` is not a known persona",
        ),
        (
            "workflows/feature-development.yml",
            "code_block: python",
            "      code_block: python\n      must_match:\n        - 'def test_\\w+'\n        - '(unclosed'  # <-\n      must_not_match: []",
            "/(unclosed/ is not a valid regex",
        ),
        (
            "workflows/feature-development.yml",
            "max_lines: 200",
            "      max_lines: 200\n      min_lines: 300  # <-",
            "min_lines 300 is above max_lines 200",
        ),
        (
            "workflows/feature-development.yml",
            "required_sections: [Overview, API, Risks]",
            "      required_sections: [Overview, API, Risks]\n      json_schema: {type: 12}  # <-",
            "`json_schema` is not a valid JSON Schema",
        ),
        (
            "workflows/feature-development.yml",
            "model: fast",
            "    model: nowhere-model  # <-",
            "`model` = `nowhere-model`",
        ),
    ];
    for (file, find, with, names) in cases {
        let dir = tempfile::tempdir().unwrap();
        let toml = crate::common::config_copy(dir.path());
        let config = toml.parent().unwrap();
        // The testing stage's `must_match` is replaced whole by the case that edits it.
        if *find == "code_block: python" {
            edit_copy(config, file, "must_match: ['def test_\\w+']", "");
        }
        let line = edit_copy(config, file, find, with).expect("the edit marks its bad line");
        let errors = match hypertool::config::load(&hypertool::config::Source::File(toml.clone())) {
            Ok(_) => panic!("{file}: {with:?} accepted"),
            Err(e) => e.0,
        };
        let found = errors.iter().find(|e| e.message.contains(names));
        let Some(found) = found else {
            panic!("{file}: no error names {names:?}: {errors:?}");
        };
        assert!(
            found.file.ends_with(file),
            "{file}: reported in {}",
            found.file
        );
        assert_eq!(
            found.line,
            Some(line),
            "{file}: {with:?} reported at: {found}"
        );
    }
}

/// `hypertool check` on a configuration with one problem of each kind, spread over its files:
/// every one is reported in the same run, at its own file and line, and the summary counts them
/// per file.
#[test]
fn check_reports_every_problem_of_every_file_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let toml = crate::common::config_copy(dir.path());
    let config = toml.parent().unwrap().to_path_buf();
    // hypertool.toml: TOML syntax, an unknown key, a bad value, an unset key variable, a missing
    // file (each appended where its table is, so the lines are known).
    let syntax = edit_copy(
        &config,
        "hypertool.toml",
        "max_connections = 1024",
        "max_connections =  # <-",
    )
    .unwrap();
    let unknown = edit_copy(
        &config,
        "hypertool.toml",
        "shutdown_grace_seconds = 10",
        "shutdown_grace_seconds = 10\ncolour = \"red\"  # <-",
    )
    .unwrap();
    let bad_value = edit_copy(
        &config,
        "hypertool.toml",
        "snapshot_interval = \"5m\"",
        "snapshot_interval = \"5m\"\nretain_days = 1  # <-",
    )
    .unwrap();
    let missing_file = edit_copy(
        &config,
        "hypertool.toml",
        "[tls]",
        "[tls]\nca_file = \"nowhere.pem\"  # <-",
    )
    .unwrap();
    let text = std::fs::read_to_string(&toml).unwrap()
        + "\n[[server.admin_keys]]\nkey_env = \"HT_CHECK_ALL_NEVER_SET\"\n";
    std::fs::write(&toml, &text).unwrap();
    let unset_var = text.lines().count();
    // A workflow: a bad regex and an unknown model.
    let workflow = "workflows/feature-development.yml";
    let regex = edit_copy(
        &config,
        workflow,
        "must_not_match: ['(?i)\\bTBD\\b']",
        "      must_not_match: ['(unclosed']  # <-",
    )
    .unwrap();
    let model = edit_copy(
        &config,
        workflow,
        "model: fast",
        "    model: nowhere-model  # <-",
    )
    .unwrap();
    // budgets.yml: a budget for a persona that does not exist; chatmodes.yml: YAML syntax.
    let budget = edit_copy(
        &config,
        "budgets.yml",
        "data-scientist:",
        "  nobody-at-all:  # <-\n    tokens: 1\n  data-scientist:",
    )
    .unwrap();
    let chatmodes = edit_copy(
        &config,
        "chatmodes.yml",
        "workflow: package-release",
        "    workflow: [unclosed  # <-",
    )
    .unwrap();

    // A persona without a budget (allowed: counted, never limited): a warning at its file.
    std::fs::write(
        config.join("personas/unbudgeted.json"),
        "{\n  \"name\": \"unbudgeted\",\n  \"description\": \"no tokenBudget\"\n}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypertool"))
        .args(["check", "--config"])
        .arg(&toml)
        .env_remove("HYPERTOOL_ADMIN_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let at = |file: &str, line: usize, names: &str| {
        let place = format!("{}:{line}: ", config.join(file).display());
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&place) && l.contains(names)),
            "expected `{place}… {names} …` in:\n{stderr}"
        );
    };
    at("hypertool.toml", syntax, "");
    at("hypertool.toml", unknown, "colour");
    at("hypertool.toml", bad_value, "ledger.retain_days");
    at("hypertool.toml", missing_file, "tls.ca_file");
    at("hypertool.toml", unset_var, "HT_CHECK_ALL_NEVER_SET");
    at(workflow, regex, "(unclosed");
    at(workflow, model, "nowhere-model");
    at("budgets.yml", budget, "nobody-at-all");
    at("chatmodes.yml", chatmodes, "");
    let unbudgeted = format!(
        "warning: {}:2: persona `unbudgeted` has no budget",
        config.join("personas/unbudgeted.json").display()
    );
    assert!(
        stderr.contains(&unbudgeted),
        "{unbudgeted} missing:\n{stderr}"
    );
    let summary = stderr.lines().last().unwrap();
    assert!(
        summary.starts_with("9 problems: 5 in ") && summary.contains("hypertool.toml"),
        "{summary}"
    );
    for (file, n) in [(workflow, 2), ("budgets.yml", 1), ("chatmodes.yml", 1)] {
        assert!(
            summary.contains(&format!("{n} in {}", config.join(file).display())),
            "{summary}"
        );
    }
}

/// Issue 29: every commented example of the shipped hypertool.toml works when uncommented as it
/// stands — each paragraph's commented settings together (a `[[table]]` with its keys), with the
/// variables it names set and the files it names present.
#[test]
fn every_commented_example_of_the_shipped_configuration_works_uncommented() {
    let setting = |l: &str| {
        let Some(rest) = l.strip_prefix("# ") else {
            return false;
        };
        let header = rest.trim_end().starts_with('[')
            && rest.trim_end().ends_with(']')
            && !rest.contains(", ");
        let key = rest.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
        header || key
    };
    let lines: Vec<&str> = SHIPPED.lines().collect();
    // Paragraphs (runs of non-blank lines) holding commented settings.
    let mut paragraphs: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.trim().is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
        } else if setting(l) {
            current.push(i);
        }
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }
    assert!(paragraphs.len() >= 8, "{} examples", paragraphs.len());
    let ca = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    let mut failed = Vec::new();
    for paragraph in &paragraphs {
        let dir = tempfile::tempdir().unwrap();
        let toml = crate::common::config_copy(dir.path());
        let config = toml.parent().unwrap();
        let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let mut env = Vec::new();
        for &i in paragraph {
            // The example itself, its trailing comment kept.
            let line = lines[i].strip_prefix("# ").unwrap();
            edited[i] = line.to_string();
            let value = line
                .split_once(" = ")
                .map(|(_, v)| v.split(" #").next().unwrap().trim());
            let quoted = value
                .and_then(|v| v.strip_prefix('"'))
                .and_then(|v| v.strip_suffix('"'));
            if let (Some(key), Some(v)) = (line.split(" = ").next(), quoted) {
                if key.ends_with("_env") {
                    env.push(v.to_string());
                }
                if key == "ca_file" {
                    std::fs::write(config.join(v), &ca).unwrap();
                }
                if key == "servers" {
                    std::fs::write(config.join(v), "{\"mcpServers\": {}}").unwrap();
                }
            }
        }
        std::fs::write(&toml, edited.join("\n") + "\n").unwrap();
        let mut check = std::process::Command::new(env!("CARGO_BIN_EXE_hypertool"));
        check.args(["check", "--config"]).arg(&toml);
        for name in &env {
            check.env(name, "an-example-key-of-forty-characters-0123456789");
        }
        let out = check.output().unwrap();
        if !out.status.success() {
            failed.push(format!(
                "lines {:?}:\n{}{}",
                paragraph.iter().map(|i| i + 1).collect::<Vec<_>>(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "commented examples that do not work uncommented:\n{}",
        failed.join("\n")
    );
}
