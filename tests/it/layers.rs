//! The layers of `src/`: each top-level module imports only modules below it, so there is no loop
//! between folders and no arrow from a lower layer up to a higher one (`docs/ARCHITECTURE.md`
//! draws the same order). Test modules (after `#[cfg(test)]`, or in a `tests.rs`) may reach up:
//! they build the world they test.

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom first. A module may import any module listed before it.
const LAYERS: &[&str] = &[
    "core",
    "tls",
    "config",
    "telemetry",
    "store",
    "web",
    "alerts",
    "runbook",
    "switchboard",
    "cli",
    "gateway",
    "mcp",
    "server",
    "doctor",
    "commands",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut seen = BTreeSet::new();
    let mut upward = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        // The binary's root, and test modules in files of their own (`#[cfg(test)] mod tests;`).
        if top == "main" || top == "lib" || rel.ends_with("tests.rs") {
            continue;
        }
        let rank = LAYERS
            .iter()
            .position(|l| *l == top)
            .unwrap_or_else(|| panic!("src/{top} is not in LAYERS: place it in the order"));
        seen.insert(top.clone());
        let text = std::fs::read_to_string(file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            for (at, _) in line.match_indices("crate::") {
                let name: String = line[at + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let Some(target) = LAYERS.iter().position(|l| *l == name) else {
                    continue;
                };
                if target > rank {
                    upward.push(format!(
                        "src/{}:{}: {top} imports {name}, a layer above it",
                        rel.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(upward.is_empty(), "{}", upward.join("\n"));
    // The order names every module there is (a renamed module must be placed again).
    let listed: BTreeSet<String> = LAYERS.iter().map(|l| l.to_string()).collect();
    assert_eq!(seen, listed);
}
