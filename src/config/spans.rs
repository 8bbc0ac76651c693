//! Where each value of a configuration file is: its line by path, from the parser's own positions.
//!
//! Validation runs on typed structs that no longer know where their values came from, so each
//! file is also read once more into a map from path (`server.listen`, `gateway.models[0].fallbacks`,
//! `alerts.SlowWorkflowStage.threshold`, `personas.backend-engineer.tokens`) to the line of its
//! value: TOML through `toml_edit`'s spans, YAML and JSON through `yaml-rust2`'s event marks. An
//! error names the path of the value it is about and gets that value's line — not the first line of
//! the file that happens to spell the same key. A path the file does not hold (a missing key, a
//! default) gets the line of its nearest ancestor that it does hold (the entry, the table header).
//!
//! Path syntax: keys joined by `.`, list items as `[i]`; a key with characters other than letters,
//! digits, `-`, `_` and `/` is written quoted (`models."gpt-4.1"`); [`key`] does that.

use std::collections::HashMap;

/// Lines of a file's values by path.
#[derive(Debug, Default, Clone)]
pub struct Spans {
    lines: HashMap<String, usize>,
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// `k` as a path step: quoted when it holds characters the path syntax uses.
pub fn key(k: &str) -> String {
    let plain = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/'));
    if plain {
        k.to_string()
    } else {
        serde_json::to_string(k).unwrap_or_else(|_| k.to_string())
    }
}

fn join(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&key(k));
            }
            Step::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

/// Splits a path written as [`join`] writes it (quoted keys included).
fn split(path: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut chars = path.chars().peekable();
    let mut current = String::new();
    let flush = |current: &mut String, steps: &mut Vec<Step>| {
        if !current.is_empty() {
            steps.push(Step::Key(std::mem::take(current)));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '.' => flush(&mut current, &mut steps),
            '"' => {
                let mut quoted = String::new();
                while let Some(q) = chars.next() {
                    match q {
                        '\\' => {
                            if let Some(e) = chars.next() {
                                quoted.push(e);
                            }
                        }
                        '"' => break,
                        q => quoted.push(q),
                    }
                }
                steps.push(Step::Key(quoted));
            }
            '[' => {
                flush(&mut current, &mut steps);
                let digits: String = chars.by_ref().take_while(|d| *d != ']').collect();
                match digits.parse() {
                    Ok(i) => steps.push(Step::Index(i)),
                    Err(_) => steps.push(Step::Key(digits)),
                }
            }
            c => current.push(c),
        }
    }
    flush(&mut current, &mut steps);
    steps
}

impl Spans {
    /// The line of the value at `path`, else of its nearest ancestor the file holds.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut steps = split(path);
        while !steps.is_empty() {
            if let Some(line) = self.lines.get(&join(&steps)) {
                return Some(*line);
            }
            steps.pop();
        }
        None
    }

    /// The line of the value at exactly `path` (`None` when the file does not hold it).
    pub fn exact(&self, path: &str) -> Option<usize> {
        self.lines.get(&join(&split(path))).copied()
    }

    fn record(&mut self, steps: &[Step], line: usize) {
        self.lines.entry(join(steps)).or_insert(line);
    }

    /// A TOML file's spans. A line that does not parse (its error has its own line) is left out
    /// and the rest read: the other values keep their lines.
    pub fn toml(text: &str) -> Spans {
        let mut spans = Spans::default();
        let mut current: Vec<&str> = text.lines().collect();
        for _ in 0..20 {
            let joined = current.join("\n");
            match toml_edit::ImDocument::parse(joined.as_str()) {
                Ok(doc) => {
                    // Blanked lines keep every other line where it was.
                    let lines = LineIndex::new(&joined);
                    toml_table(&mut spans, &lines, &mut Vec::new(), doc.as_table());
                    return spans;
                }
                Err(e) => {
                    let Some(span) = e.span() else {
                        return spans;
                    };
                    let line = LineIndex::new(&joined).line(span.start);
                    match current.get_mut(line - 1) {
                        Some(l) if !l.is_empty() => *l = "",
                        _ => return spans,
                    }
                }
            }
        }
        spans
    }

    /// A YAML (or JSON) file's spans (as far as it parses).
    pub fn yaml(text: &str) -> Spans {
        let mut walker = YamlWalker::default();
        let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
        // A file that does not parse keeps the spans read before the error.
        let _ = parser.load(&mut walker, false);
        walker.spans
    }
}

/// Byte offset → 1-based line.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|s| *s <= offset)
    }
}

fn toml_table(
    spans: &mut Spans,
    lines: &LineIndex,
    path: &mut Vec<Step>,
    table: &dyn toml_edit::TableLike,
) {
    for (name, _) in table.iter() {
        let Some((k, item)) = table.get_key_value(name) else {
            continue;
        };
        path.push(Step::Key(name.to_string()));
        if let Some(span) = item.span().or_else(|| k.span()) {
            spans.record(path, lines.line(span.start));
        }
        toml_item(spans, lines, path, item);
        path.pop();
    }
}

fn toml_item(spans: &mut Spans, lines: &LineIndex, path: &mut Vec<Step>, item: &toml_edit::Item) {
    match item {
        toml_edit::Item::Table(t) => toml_table(spans, lines, path, t),
        toml_edit::Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                path.push(Step::Index(i));
                if let Some(span) = t.span() {
                    spans.record(path, lines.line(span.start));
                }
                toml_table(spans, lines, path, t);
                path.pop();
            }
        }
        toml_edit::Item::Value(v) => toml_value(spans, lines, path, v),
        toml_edit::Item::None => {}
    }
}

fn toml_value(
    spans: &mut Spans,
    lines: &LineIndex,
    path: &mut Vec<Step>,
    value: &toml_edit::Value,
) {
    match value {
        toml_edit::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                path.push(Step::Index(i));
                if let Some(span) = v.span() {
                    spans.record(path, lines.line(span.start));
                }
                toml_value(spans, lines, path, v);
                path.pop();
            }
        }
        toml_edit::Value::InlineTable(t) => toml_table(spans, lines, path, t),
        _ => {}
    }
}

/// Follows YAML's events with the path they are at.
#[derive(Default)]
struct YamlWalker {
    spans: Spans,
    /// The containers open around the current event.
    stack: Vec<Container>,
    /// Whether each open container pushed a step on `path` (a mapping key's container does not).
    pushed: Vec<bool>,
    path: Vec<Step>,
}

enum Container {
    /// A mapping; `Some(key)` while its value is awaited.
    Mapping(Option<String>),
    Sequence(usize),
}

impl YamlWalker {
    /// A value (scalar or container) begins at `line`: record its path, pushing its step.
    fn value_starts(&mut self, line: usize) -> bool {
        match self.stack.last_mut() {
            Some(Container::Mapping(Some(k))) => {
                let k = std::mem::take(k);
                self.path.push(Step::Key(k));
                true
            }
            Some(Container::Sequence(i)) => {
                let index = *i;
                *i += 1;
                self.path.push(Step::Index(index));
                self.spans.record(&self.path, line);
                true
            }
            _ => false,
        }
    }

    /// The value that began with [`Self::value_starts`] ended: back to its container.
    fn value_ends(&mut self, pushed: bool) {
        if pushed {
            self.path.pop();
        }
        if let Some(Container::Mapping(awaiting)) = self.stack.last_mut() {
            *awaiting = None;
        }
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for YamlWalker {
    fn on_event(&mut self, ev: yaml_rust2::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::Event;
        let line = mark.line();
        match ev {
            Event::Scalar(text, ..) => {
                if let Some(Container::Mapping(awaiting @ None)) = self.stack.last_mut() {
                    // A key: its line is where its value is written (or begins, below it).
                    *awaiting = Some(text.clone());
                    self.path.push(Step::Key(text));
                    self.spans.record(&self.path, line);
                    self.path.pop();
                    return;
                }
                let pushed = self.value_starts(line);
                self.value_ends(pushed);
            }
            Event::Alias(_) => {
                let pushed = self.value_starts(line);
                self.value_ends(pushed);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // Keep the step on the path for the container's life; `value_ends` at its end.
                let pushed = self.value_starts(line);
                self.stack.push(match ev {
                    Event::MappingStart(..) => Container::Mapping(None),
                    _ => Container::Sequence(0),
                });
                self.pushed.push(pushed);
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                let pushed = self.pushed.pop().unwrap_or(false);
                self.value_ends(pushed);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_values_by_path() {
        let text = r#"[server]
listen = "127.0.0.1:8080"

[alerts.TokenBudgetExceeded]
for = "1m"

[alerts.SlowWorkflowStage]
threshold = 120

[[gateway.models]]
name = "a"
fallbacks = ["b",
  "c"]

[[gateway.models]]
name = "b"
"#;
        let s = Spans::toml(text);
        assert_eq!(s.line("server.listen"), Some(2));
        assert_eq!(s.line("alerts.SlowWorkflowStage.threshold"), Some(8));
        // A key the table does not hold: the table's header.
        assert_eq!(s.line("alerts.TokenBudgetExceeded.threshold"), Some(4));
        assert_eq!(s.exact("alerts.TokenBudgetExceeded.threshold"), None);
        assert_eq!(s.line("gateway.models[0].fallbacks"), Some(12));
        assert_eq!(s.line("gateway.models[0].fallbacks[1]"), Some(13));
        assert_eq!(s.line("gateway.models[1].name"), Some(16));
        assert_eq!(s.line("gateway.models[1].downgrade_to"), Some(15));
        assert_eq!(s.line("nothing.here"), None);
    }

    #[test]
    fn a_line_that_does_not_parse_leaves_the_others_their_lines() {
        let s = Spans::toml("[server]\nlisten =\nmax_body_bytes = 1\n\n[ledger]\nurl = \"x\"\n");
        assert_eq!(s.line("server.max_body_bytes"), Some(3));
        assert_eq!(s.line("ledger.url"), Some(6));
    }

    #[test]
    fn yaml_values_by_path() {
        let text = "defaults:\n  tokens: 10\npersonas:\n  backend-engineer:\n    tokens: 5\n    soft_limit: 2\n  \"gpt-4.1\":\n    tokens: 1\nstages:\n  - name: a\n    gate:\n      - x\n  - name: b\n";
        let s = Spans::yaml(text);
        assert_eq!(s.line("defaults.tokens"), Some(2));
        assert_eq!(s.line("personas.backend-engineer"), Some(4));
        assert_eq!(s.line("personas.backend-engineer.soft_limit"), Some(6));
        assert_eq!(
            s.line(&format!("personas.{}.tokens", key("gpt-4.1"))),
            Some(8)
        );
        assert_eq!(s.line("stages[1].name"), Some(13));
        assert_eq!(s.line("stages[0].gate[0]"), Some(12));
        assert_eq!(s.line("stages[1].gate"), Some(13));
    }

    #[test]
    fn json_values_by_path() {
        let text = "{\n  \"mcpServers\": {\n    \"time\": {\n      \"command\": \"uvx\",\n      \"args\": [\"mcp-server-time\"]\n    }\n  }\n}\n";
        let s = Spans::yaml(text);
        assert_eq!(s.line("mcpServers.time"), Some(3));
        assert_eq!(s.line("mcpServers.time.args[0]"), Some(5));
    }

    #[test]
    fn paths_round_trip() {
        for p in ["a.b[0].c", "models.\"gpt-4.1\".price", "x[2][3]"] {
            assert_eq!(join(&split(p)), p);
        }
    }
}
