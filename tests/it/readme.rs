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
    crate::common::git_repo(work);
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

/// One fenced block of the README and what its `<!-- readme-test: … -->` marker says to do.
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    kind: String,
    body: String,
}

/// Every fenced block, with the marker on the line before its fence (`""` when there is none).
fn blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].starts_with("```") {
            i += 1;
            continue;
        }
        let kind = i
            .checked_sub(1)
            .and_then(|p| lines[p].strip_prefix("<!-- readme-test: "))
            .and_then(|m| m.strip_suffix(" -->"))
            .unwrap_or("")
            .to_string();
        let start = i;
        i += 1;
        let mut body = String::new();
        while i < lines.len() && !lines[i].starts_with("```") {
            body.push_str(lines[i]);
            body.push('\n');
            i += 1;
        }
        out.push(Block {
            line: start + 1,
            kind,
            body,
        });
        i += 1;
    }
    out
}

/// Deep-merges `from` into `into`: tables merged key by key, arrays of tables appended.
fn merge(into: &mut toml_edit::Table, from: &toml_edit::Table) {
    for (key, item) in from.iter() {
        match (into.get_mut(key), item) {
            (Some(toml_edit::Item::Table(a)), toml_edit::Item::Table(b)) => merge(a, b),
            (Some(toml_edit::Item::ArrayOfTables(a)), toml_edit::Item::ArrayOfTables(b)) => {
                for t in b.iter() {
                    a.push(t.clone());
                }
            }
            _ => {
                into.insert(key, item.clone());
            }
        }
    }
}

fn check(toml: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypertool"))
        .args(["check", "--config"])
        .arg(toml)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A configuration block pasted into a copy of the shipped configuration passes `check`. The
/// files it names (a CA file) are made for it.
fn toml_block(block: &Block) {
    let dir = tempfile::tempdir().unwrap();
    let toml = crate::common::config_copy(dir.path());
    let config = toml.parent().unwrap();
    if block.body.contains("internal-ca.pem") {
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        std::fs::write(config.join("internal-ca.pem"), ca.pem()).unwrap();
    }
    let mut shipped: toml_edit::DocumentMut =
        std::fs::read_to_string(&toml).unwrap().parse().unwrap();
    let pasted: toml_edit::DocumentMut = block
        .body
        .parse()
        .unwrap_or_else(|e| panic!("README:{}: not TOML: {e}", block.line));
    merge(shipped.as_table_mut(), pasted.as_table());
    std::fs::write(&toml, shipped.to_string()).unwrap();
    let (ok, out) = check(&toml);
    assert!(
        ok,
        "README:{}: the block fails `hypertool check`:\n{out}",
        block.line
    );
}

/// A workflow stage pasted into the shipped feature-development workflow, in place of the stage
/// of the same name, passes `check`; the prompt files it names are made for it.
fn stage_block(block: &Block) {
    let dir = tempfile::tempdir().unwrap();
    let toml = crate::common::config_copy(dir.path());
    let config = toml.parent().unwrap();
    for prompt in block
        .body
        .split_whitespace()
        .filter(|w| w.starts_with("prompts/"))
    {
        let path = config.join(prompt);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "You implement the design, with tests.\n").unwrap();
    }
    let name = block
        .body
        .lines()
        .find_map(|l| l.trim().strip_prefix("- name: "))
        .unwrap_or_else(|| panic!("README:{}: a stage has `- name:`", block.line));
    let file = config.join("workflows/feature-development.yml");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == format!("- name: {name}"))
        .unwrap_or_else(|| panic!("feature-development.yml has no stage {name}"));
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.trim_start().starts_with("- name: "))
        .map_or(lines.len(), |i| start + 1 + i);
    let body: Vec<&str> = block.body.lines().collect();
    lines.splice(start..end, body);
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (ok, out) = check(&toml);
    assert!(
        ok,
        "README:{}: the stage fails `hypertool check`:\n{out}",
        block.line
    );
}

/// A shell block run against a server (its addresses, the binary for `cargo run --release --`):
/// it must succeed, and each `# header: value` comment must be in what it printed.
async fn sh_block(block: &Block, s: &crate::common::TestServer) {
    let script = block
        .body
        .replace("cargo run --release --", env!("CARGO_BIN_EXE_hypertool"))
        .replace("localhost:8080", s.api.trim_start_matches("http://"))
        .replace("localhost:9464", s.metrics.trim_start_matches("http://"));
    let out = tokio::process::Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &script])
        .env("HYPERTOOL_SERVER", &s.api)
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        out.status.success(),
        "README:{}: the block failed:\n{}{}",
        block.line,
        printed,
        String::from_utf8_lossy(&out.stderr)
    );
    for said in block
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("# x-hypertool-"))
    {
        let header = format!("x-hypertool-{}", said.to_lowercase());
        assert!(
            printed.contains(&header),
            "README:{}: `{header}` not in what it printed:\n{printed}",
            block.line
        );
    }
}

/// The Python block against a server.
fn python_block(block: &Block, s: &crate::common::TestServer) {
    let script = block.body.replace("http://127.0.0.1:8080", &s.api) + "\nprint('ok')\n";
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "README:{}: the Python block failed (pip install openai; scripts/test.sh does):\n{}",
        block.line,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 29: every example in the README runs, or is marked in the README source as covered by
/// a named test or as not runnable here (with why); the harness lists the latter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_example_runs_or_says_why_not() {
    let text = readme();
    let all = blocks(&text);
    assert!(all.len() >= 20, "{} blocks", all.len());
    let tests = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let s = crate::common::start_default(dir.path()).await;
    let mut not_run = Vec::new();
    for block in &all {
        let (kind, detail) = block
            .kind
            .split_once(": ")
            .unwrap_or((block.kind.as_str(), ""));
        match kind {
            "toml" => toml_block(block),
            "stage" => stage_block(block),
            "sh-server" => sh_block(block, &s).await,
            "python-server" => python_block(block, &s),
            "output" => {
                let args: Vec<&str> = detail.split_whitespace().collect();
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypertool"))
                    .args(&args)
                    .output()
                    .unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    block.body,
                    "README:{}: `hypertool {detail}` prints something else now: update the README",
                    block.line
                );
            }
            "covered" => {
                let name = detail.split("::").last().unwrap();
                assert!(
                    tests.contains(&format!("fn {name}(")),
                    "README:{}: covered by `{detail}`, which is not a test",
                    block.line
                );
            }
            "not-run" => {
                assert!(!detail.is_empty(), "README:{}: not-run needs a reason", block.line);
                not_run.push(format!("README:{}: {detail}", block.line));
            }
            other => panic!(
                "README:{}: a block without a known <!-- readme-test: … --> marker ({other:?}): run it here, or name the test that covers it, or say why it cannot run",
                block.line
            ),
        }
    }
    s.stop().await;
    println!("README blocks not run here:\n{}", not_run.join("\n"));
}
