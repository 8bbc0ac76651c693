//! Property tests: what a user can send or write is generated (and, in the configuration files,
//! mutated from the shipped ones), and each property must hold for every case. A case that broke
//! one is kept below as a named regression test.
//!
//! - configuration files: loading never panics; every error names a file of the configuration and,
//!   when it gives a line, a line that exists;
//! - events: `parse_event` never panics on any JSON, and a valid usage event keeps its numbers;
//! - chat requests and event batches over HTTP: never a 5xx (the mock upstream always answers),
//!   and afterwards the ledger and the counters agree;
//! - budget arithmetic: usage in the current period is the sum of what was recorded in it, however
//!   records, period changes, rolls and resets interleave.

use std::path::Path;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde_json::{json, Map, Value};

use hypertool::config::{load, Source};
use hypertool::core::budget::{BudgetMode, BudgetSource, BudgetSpec, BudgetState, Period};
use hypertool::server::events::{parse_event, EventLimits};

use crate::common::*;

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "",
            "usage",
            "persona_switch",
            "stage",
            "backend-engineer",
            "pass",
            "fail",
            "other",
            "mock/x",
            "none"
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid usage event with some of its fields replaced by anything.
fn usage_event_with_noise() -> impl Strategy<Value = Value> {
    let fields = [
        "type",
        "persona",
        "chatmode",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "session",
        "workflow",
        "stage",
        "cost_usd",
        "timestamp",
        "run",
    ];
    (
        prop::collection::vec((prop::sample::select(fields.to_vec()), any_json()), 0..3),
        0u64..5_000,
        0u64..5_000,
    )
        .prop_map(|(noise, p, c)| {
            let mut e = json!({"type": "usage", "persona": "backend-engineer", "chatmode": "c",
                               "model": "m", "prompt_tokens": p, "completion_tokens": c});
            for (k, v) in noise {
                e[k] = v;
            }
            e
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_event_never_panics_and_keeps_the_numbers_of_valid_usage(
        raw in prop_oneof![any_json(), usage_event_with_noise()],
    ) {
        let now = T0;
        match parse_event(&raw, now, &EventLimits::default()) {
            Ok(stamped) => {
                if let hypertool::core::event::Event::Usage(u) = &stamped.event {
                    prop_assert_eq!(Some(u.prompt_tokens), raw["prompt_tokens"].as_u64());
                    prop_assert_eq!(Some(u.completion_tokens), raw["completion_tokens"].as_u64());
                }
                prop_assert!(stamped.at <= now + 5 * 60_000, "a timestamp too far ahead was let in");
            }
            Err(rejection) => prop_assert!(!rejection.reason.is_empty()),
        }
    }
}

/// Each budget operation the engine performs.
#[derive(Debug, Clone)]
enum BudgetOp {
    /// Usage stamped `back` ms before the current time (late reports), `tokens`.
    Record {
        back: i64,
        tokens: u64,
    },
    /// Time moves on by `ms` and the state rolls.
    Advance {
        ms: i64,
    },
    Respec(Period),
    Reset,
}

fn budget_op() -> impl Strategy<Value = BudgetOp> {
    let period = prop::sample::select(vec![
        Period::None,
        Period::Hourly,
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
    ]);
    prop_oneof![
        6 => (0i64..3 * 86_400_000, 0u64..1_000_000).prop_map(|(back, tokens)| BudgetOp::Record { back: back / 3, tokens }),
        3 => (0i64..10 * 86_400_000).prop_map(|ms| BudgetOp::Advance { ms }),
        1 => period.prop_map(BudgetOp::Respec),
        1 => Just(BudgetOp::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn budget_usage_is_the_sum_of_what_was_recorded_in_the_current_period(
        ops in prop::collection::vec(budget_op(), 1..60),
        start_period in prop::sample::select(vec![Period::None, Period::Hourly, Period::Daily, Period::Weekly, Period::Monthly]),
    ) {
        let spec = |period| BudgetSpec {
            tokens: 1_000_000,
            cost_usd: None,
            period,
            mode: BudgetMode::Block,
            soft_limit: None,
        };
        let mut now = T0;
        let mut period = start_period;
        let mut state = BudgetState::new(spec(period), BudgetSource::BudgetsFile, now);
        // The reference: every record since the last reset, with its time.
        let mut records: Vec<(i64, u64)> = Vec::new();
        // The latest time the state has seen (records may come from the past, never the future).
        let mut latest = now;
        for op in ops {
            match op {
                BudgetOp::Record { back, tokens } => {
                    let at = now - back;
                    state.record(at, tokens, 0.0);
                    records.push((at, tokens));
                    latest = latest.max(at);
                }
                BudgetOp::Advance { ms } => {
                    now += ms;
                    state.roll(now);
                    latest = latest.max(now);
                }
                BudgetOp::Respec(p) => {
                    period = p;
                    state.respec(spec(p), BudgetSource::BudgetsFile, now);
                }
                BudgetOp::Reset => {
                    state.reset(now);
                    records.clear();
                }
            }
            let start = period.start_of(latest);
            let expected: u64 = records
                .iter()
                .filter(|(at, _)| period == Period::None || *at >= start)
                .map(|(_, t)| t)
                .sum();
            prop_assert_eq!(state.used_tokens(), expected, "period {:?}, now {}", period, now);
            prop_assert_eq!(state.remaining_tokens(), 1_000_000 - expected as i64);
        }
    }
}

/// The repository's configuration files, by path relative to `config/`.
fn shipped_files(root: &Path) -> Vec<String> {
    let mut files = vec![
        "hypertool.toml".to_string(),
        "budgets.yml".into(),
        "chatmodes.yml".into(),
    ];
    for sub in ["personas", "workflows"] {
        for e in std::fs::read_dir(root.join(sub)).unwrap() {
            files.push(format!(
                "{sub}/{}",
                e.unwrap().file_name().to_string_lossy()
            ));
        }
    }
    files.sort();
    files
}

/// A mutation of a configuration file's text.
#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(prop::sample::Index),
    DuplicateLine(prop::sample::Index),
    /// Replace what follows the first `=` or `:` on a line.
    ReplaceValue(prop::sample::Index, String),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let tricky = prop::sample::select(vec![
        "",
        "-1",
        "0",
        "1e309",
        "18446744073709551616",
        "NaN",
        "\"\"",
        "[",
        "{",
        "}",
        "null",
        "true",
        "\"🙂\"",
        "\"a\\u0000b\"",
        "\"*\"",
        "\"(\"",
        "[[]]",
        "{a: 1}",
        "- x",
        "\"1h\"",
        "\"-5m\"",
        "\"0s\"",
        "\"99999999h\"",
        "2147483648",
        "\"block\"",
        "\"weekly\"",
    ])
    .prop_map(String::from);
    let text = prop_oneof![tricky, ".{0,16}"];
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::DeleteLine),
        any::<prop::sample::Index>().prop_map(Mutation::DuplicateLine),
        (any::<prop::sample::Index>(), text.clone())
            .prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), text).prop_map(|(i, v)| Mutation::Insert(i, v)),
    ]
}

fn mutate(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    match m {
        Mutation::DeleteLine(i) => {
            lines.remove(i.index(lines.len()));
        }
        Mutation::DuplicateLine(i) => {
            let at = i.index(lines.len());
            lines.insert(at, lines[at].clone());
        }
        Mutation::ReplaceValue(i, v) => {
            let at = i.index(lines.len());
            if let Some(p) = lines[at].find(['=', ':']) {
                lines[at] = format!("{} {v}", &lines[at][..=p]);
            }
        }
        Mutation::Truncate(i) => {
            let cut = i.index(text.len() + 1);
            let cut = (0..=cut)
                .rev()
                .find(|c| text.is_char_boundary(*c))
                .unwrap_or(0);
            return text[..cut].to_string();
        }
        Mutation::Insert(i, v) => {
            let at = i.index(lines.len() + 1);
            lines.insert(at, v.clone());
        }
    }
    lines.join("\n") + "\n"
}

#[test]
fn mutated_configuration_files_load_or_fail_with_file_and_line_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config_copy(dir.path());
    let root = toml.parent().unwrap().to_path_buf();
    let files = shipped_files(&root);
    let originals: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(root.join(f)).unwrap())
        .collect();
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 400,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let strategy = (
        any::<prop::sample::Index>(),
        prop::collection::vec(mutation(), 1..4),
    );
    let result = runner.run(&strategy, |(which, mutations)| {
        let i = which.index(files.len());
        let mut text = originals[i].clone();
        for m in &mutations {
            text = mutate(&text, m);
        }
        std::fs::write(root.join(&files[i]), &text).unwrap();
        let outcome = std::panic::catch_unwind(|| load(&Source::File(toml.clone())));
        std::fs::write(root.join(&files[i]), &originals[i]).unwrap();
        let Ok(outcome) = outcome else {
            return Err(proptest::test_runner::TestCaseError::fail(format!(
                "load panicked on {}:\n{text}",
                files[i]
            )));
        };
        if let Err(errors) = outcome {
            for e in &errors.0 {
                prop_assert!(
                    !e.message.is_empty(),
                    "an empty message: {:?} in {}",
                    e,
                    text
                );
                let named = Path::new(&e.file);
                prop_assert!(
                    named.exists() && named.starts_with(&root),
                    "the error names no file of the configuration: {e}"
                );
                if let Some(line) = e.line {
                    // Lines as the most generous reader counts them (YAML also ends a line at
                    // a lone CR); the mutated file was put back already, so its text is used.
                    let content = if named == root.join(&files[i]) {
                        text.clone()
                    } else {
                        std::fs::read_to_string(named).unwrap()
                    };
                    let lines = content
                        .replace("\r\n", "\n")
                        .split(['\n', '\r'])
                        .count()
                        .max(1);
                    prop_assert!(
                        (1..=lines + 1).contains(&line),
                        "{e}: line {line} of a {lines}-line file"
                    );
                }
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Values drawn from `strategy` with a fixed seed (async tests cannot run inside `proptest!`).
fn samples<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// A chat request: the usual fields, each either sensible or anything; and whether it is well
/// formed — every field present took its sensible value, the model is a mock, and the messages
/// are one or more of user/system/assistant — so that the gateway must answer it 200.
fn chat_body() -> impl Strategy<Value = (Value, bool)> {
    let field = |name: &'static str, sensible: BoxedStrategy<Value>| {
        (
            Just(name),
            prop_oneof![
                3 => sensible.prop_map(|v| (true, v)),
                1 => any_json().prop_map(|v| (false, v)),
            ],
            any::<bool>(),
        )
    };
    let messages = prop::collection::vec(
        (
            prop::sample::select(vec!["user", "system", "assistant", "tool", "x"]),
            ".{0,40}",
        )
            .prop_map(|(role, content)| json!({"role": role, "content": content})),
        0..4,
    )
    .prop_map(Value::Array)
    .boxed();
    (
        field(
            "model",
            prop::sample::select(vec!["mock/x", "mock/other", "nope", ""])
                .prop_map(|m| json!(m))
                .boxed(),
        ),
        field("messages", messages),
        field("max_tokens", (0u64..100_000).prop_map(|n| json!(n)).boxed()),
        field("stream", any::<bool>().prop_map(|b| json!(b)).boxed()),
        field(
            "stream_options",
            Just(json!({"include_usage": true})).boxed(),
        ),
        field(
            "tools",
            Just(json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]))
                .boxed(),
        ),
        field("n", (0u64..4).prop_map(|n| json!(n)).boxed()),
        field("temperature", (0.0f64..2.0).prop_map(|t| json!(t)).boxed()),
    )
        .prop_map(|fields| {
            let (a, b, c, d, e, f, g, h) = fields;
            let mut body = Map::new();
            let mut sensible = true;
            for (name, (ok, value), present) in [a, b, c, d, e, f, g, h] {
                if present || name == "model" || name == "messages" {
                    sensible &= ok;
                    body.insert(name.to_string(), value);
                }
            }
            let model_ok = body["model"]
                .as_str()
                .is_some_and(|m| m.starts_with("mock/"));
            let messages_ok = body["messages"].as_array().is_some_and(|m| {
                !m.is_empty()
                    && m.iter().all(|m| {
                        ["user", "system", "assistant"].contains(&m["role"].as_str().unwrap_or(""))
                    })
            });
            let counts_ok = body.get("max_tokens").is_none_or(|n| n.as_u64() != Some(0))
                && body.get("n").is_none_or(|n| n.as_u64() == Some(1));
            let well_formed = sensible && model_ok && messages_ok && counts_ok;
            (Value::Object(body), well_formed)
        })
}

/// `body` sent as backend-engineer's call in `session`: the status and the answer's text.
async fn backend_chat(s: &TestServer, body: &Value, session: &str) -> (u16, String) {
    let resp = s
        .http
        .post(format!("{}/v1/chat/completions", s.api))
        .header("x-hypertool-persona", "backend-engineer")
        .header("x-hypertool-session", session)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_chat_request_or_event_batch_gets_an_answer_never_a_server_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_default(dir.path()).await;
    let mut well_formed_seen = 0;
    for (n, (body, well_formed)) in samples(chat_body(), 300).into_iter().enumerate() {
        let (status, text) = backend_chat(&s, &body, &format!("fuzz-{n}")).await;
        assert!(
            [200, 400, 404, 413, 422, 429].contains(&status),
            "{status} for {body}: {text}"
        );
        // A well-formed request is answered (a gateway refusing everything would fail here).
        if well_formed {
            well_formed_seen += 1;
            // (backend-engineer's budget observes: nothing is refused for budget here.)
            assert_eq!(
                status, 200,
                "a well-formed request was refused: {status} for {body}: {text}"
            );
        }
        if status != 200 {
            let err: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            assert!(
                err["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "an error names the problem: {status} {text} for {body}"
            );
        }
    }
    // And well-formed ones on purpose (rare among the samples above): each one answered.
    let good: Vec<Value> = samples(chat_body(), 4_000)
        .into_iter()
        .filter(|(_, well_formed)| *well_formed)
        .map(|(body, _)| body)
        .take(40)
        .collect();
    assert_eq!(
        good.len(),
        40,
        "too few well-formed samples ({well_formed_seen} above)"
    );
    for (n, body) in good.into_iter().enumerate() {
        let (status, text) = backend_chat(&s, &body, &format!("good-{n}")).await;
        assert_eq!(
            status, 200,
            "a well-formed request was refused: {body}: {text}"
        );
    }
    let batches = samples(
        prop::collection::vec(prop_oneof![any_json(), usage_event_with_noise()], 0..8),
        300,
    );
    for events in batches {
        let (status, answer) = s.post_events(Value::Array(events.clone())).await;
        assert!(
            [200, 400, 422].contains(&status),
            "{status} for {events:?}: {answer}"
        );
    }
    // Whatever got in, the counters say exactly what the ledger holds.
    let totals = s.ledger_totals().await;
    let m = s.metrics().await;
    assert_eq!(
        m.sum("hypertool_persona_tokens_used_total"),
        totals.tokens as f64
    );
    assert_eq!(s.get_json("/healthz").await.0, 200);
    s.stop().await;
}
