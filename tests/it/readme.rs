//! The README's examples, run as written.

use std::path::Path;

use serde_json::json;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The text between `start` and `end` after `after`.
fn between<'a>(text: &'a str, after: &str, start: &str, end: &str) -> &'a str {
    let from = text
        .find(after)
        .unwrap_or_else(|| panic!("README: `{after}` not found"));
    let rest = &text[from..];
    let a = rest
        .find(start)
        .unwrap_or_else(|| panic!("README: `{start}` not found"))
        + start.len();
    let b = rest[a..]
        .find(end)
        .unwrap_or_else(|| panic!("README: `{end}` not found"))
        + a;
    &rest[a..b]
}

/// Issue 29: the MCP quick start works on a fresh machine as written — the `.mcp.json` it writes
/// and the command it gives Claude Code, run in a git checkout: backend-engineer sees the time and
/// git servers' tools beside hypertool's own, and they answer.
#[test]
fn the_mcp_quick_start_shows_the_downstream_tools_as_written() {
    let text = readme();
    let quick_start = "# Two downstream servers: the reference time and git servers (PyPI)";
    let servers = between(&text, quick_start, "<<'JSON'\n", "\nJSON\n");
    let command = between(&text, quick_start, "claude mcp add hypertool -- ", "\n");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .args(args)
            .current_dir(work)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    std::fs::write(work.join("README"), "hello\n").unwrap();
    git(&["add", "README"]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "commit",
        "-qm",
        "first",
    ]);
    std::fs::write(work.join(".hypertool-mcp.json"), servers).unwrap();

    let mut argv: Vec<String> = command.split_whitespace().map(str::to_string).collect();
    assert_eq!(argv[0], "hypertool", "{command}");
    argv[0] = env!("CARGO_BIN_EXE_hypertool").to_string();
    let steps = crate::mcp::run_client(
        work,
        json!({
            "mode": "list-tools",
            "command": argv,
            "env": crate::mcp::env_for_children(),
            "cwd": work,
            "calls": [
                {"tool": "time__get_current_time", "arguments": {"timezone": "UTC"}},
                {"tool": "git__git_status", "arguments": {"repo_path": work}},
            ],
        }),
    );
    let tools: Vec<&str> = steps[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for expected in [
        "current-persona",
        "equip-persona",
        "list-personas",
        "time__get_current_time",
        "time__convert_time",
        "git__git_status",
    ] {
        assert!(
            tools.contains(&expected),
            "{expected} missing from {tools:?}"
        );
    }
    for call in &steps[1..] {
        assert_eq!(call["error"], false, "{call}");
    }
    assert!(
        steps[1]["text"].as_str().unwrap().contains("UTC"),
        "{}",
        steps[1]
    );
    assert!(
        steps[2]["text"].as_str().unwrap().contains("branch"),
        "{}",
        steps[2]
    );
}
