//! Token counting (issue 35): bpe-openai, which hypertool counts with, beside tiktoken-rs, which it
//! counted with before, on ordinary prompts (1 KB, 32 KB, 1 MB of the repository's own prose and
//! code) and on the probe's pathological inputs (long runs of one letter, where tiktoken-rs is
//! quadratic and, past ~1 MB, panics). Prints the time per count, ns per byte and the ratio; the
//! counts must agree (asserted). Run:
//!
//!   cargo bench --bench counting
//!
//! Target: ordinary prompts no slower than tiktoken-rs; every input linear. Read the ratios of one
//! run, not absolute numbers: these machines are noisy.

use std::hint::black_box;
use std::time::{Duration, Instant};

use hypertool::gateway::tokens;

/// The median time of `f` over rounds that together take about `budget`.
fn median(budget: Duration, mut f: impl FnMut() -> u64) -> (Duration, u64) {
    let mut times = Vec::new();
    let mut out = 0;
    let started = Instant::now();
    while times.len() < 3 || (started.elapsed() < budget && times.len() < 201) {
        let t = Instant::now();
        out = black_box(f());
        times.push(t.elapsed());
    }
    times.sort();
    (times[times.len() / 2], out)
}

/// `n` bytes of the repository's prose and code, cut on a character boundary.
fn ordinary(n: usize) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut text = String::new();
    for f in [
        "README.md",
        "docs/ALERT_RUNBOOK.md",
        "docs/ARCHITECTURE.md",
        "src/gateway/relay.rs",
        "src/core/engine/mod.rs",
        "src/config/settings/sections.rs",
    ] {
        text.push_str(&std::fs::read_to_string(root.join(f)).unwrap_or_default());
    }
    while text.len() < n {
        text = text.repeat(2);
    }
    let mut end = n;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

fn main() {
    let Ok(tiktoken) = tiktoken_rs::cl100k_base() else {
        eprintln!("tiktoken-rs could not load cl100k_base");
        std::process::exit(1);
    };
    let budget = Duration::from_secs(2);
    // Both tokenizers' tables loaded before anything is timed.
    tokens::count_text("warm");
    tiktoken.encode_ordinary("warm");
    println!(
        "{:<28} {:>12} {:>10} {:>12} {:>10} {:>8}",
        "input", "bpe-openai", "ns/byte", "tiktoken-rs", "ns/byte", "ratio"
    );
    let inputs: Vec<(String, String, bool)> = vec![
        ("ordinary 1 KB".into(), ordinary(1 << 10), true),
        ("ordinary 32 KB".into(), ordinary(32 << 10), true),
        ("ordinary 1 MB".into(), ordinary(1 << 20), true),
        ("\"i\" × 100,000".into(), "i".repeat(100_000), true),
        ("\"中\" × 50,000 (150 KB)".into(), "中".repeat(50_000), true),
        // tiktoken-rs: 28 s for the next, and a panic on a run past ~1 MB (one word of random
        // letters too).
        ("\"i\" × 300,000".into(), "i".repeat(300_000), false),
        ("\"i\" × 1,200,000".into(), "i".repeat(1_200_000), false),
        ("\"i\" × 4,194,304".into(), "i".repeat(4 << 20), false),
        ("random letters 1 MB".into(), random_letters(1 << 20), false),
    ];
    for (name, text, with_tiktoken) in &inputs {
        let (new, counted) = median(budget, || tokens::count_text(text));
        let per_byte = |d: Duration| d.as_nanos() as f64 / text.len() as f64;
        if *with_tiktoken {
            let (old, reference) = median(budget, || tiktoken.encode_ordinary(text).len() as u64);
            assert_eq!(counted, reference, "{name}: the counts differ");
            println!(
                "{name:<28} {new:>12.2?} {:>10.1} {old:>12.2?} {:>10.1} {:>7.2}x",
                per_byte(new),
                per_byte(old),
                old.as_secs_f64() / new.as_secs_f64()
            );
        } else {
            println!(
                "{name:<28} {new:>12.2?} {:>10.1} {:>12} {:>10} {:>8}",
                per_byte(new),
                "(skipped)",
                "",
                ""
            );
        }
    }
    println!("ratio: tiktoken-rs time / bpe-openai time (above 1: bpe-openai is faster)");
}

/// Random lower-case letters (no spaces: one long pre-token per run of letters), seeded.
fn random_letters(n: usize) -> String {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (b'a' + (state % 26) as u8) as char
        })
        .collect()
}
