//! The operator runbook (`docs/ALERT_RUNBOOK.md`, embedded at build time): its text, its HTML page
//! with GitHub-style anchors (the alerts' `runbook` links jump to their sections), one alert's
//! section, and the PromQL it asks operators to run (checked by tests against the exported families
//! and loaded into the Grafana dashboards).

use std::sync::OnceLock;

pub mod grafana;
pub mod investigate;

use pulldown_cmark::{CowStr, Event, Options, Parser, Tag, TagEnd};

use crate::alerts::rules::AlertId;

/// The runbook as shipped in the repository.
pub const TEXT: &str = include_str!("../../docs/ALERT_RUNBOOK.md");

/// GitHub's heading anchor: lower case, letters, digits, `-` and `_` kept, spaces to `-`, the
/// rest dropped (so `Alert 1: Token Budget Exceeded` → `alert-1-token-budget-exceeded`).
pub fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn options() -> Options {
    Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS
}

/// The runbook as one self-contained HTML page (no external resources: it works offline).
pub fn html() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| render_page(TEXT))
}

fn render_page(markdown: &str) -> String {
    let events: Vec<Event> = Parser::new_ext(markdown, options()).collect();
    // The anchors: each heading's text, slugged, with -1, -2 … for repeats, as GitHub does.
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut ids = Vec::new();
    let mut text: Option<String> = None;
    for event in &events {
        match event {
            Event::Start(Tag::Heading { .. }) => text = Some(String::new()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(buf) = text.as_mut() {
                    buf.push_str(t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&text.take().unwrap_or_default());
                let n = seen.entry(base.clone()).or_insert(0);
                ids.push(if *n == 0 { base } else { format!("{base}-{n}") });
                *n += 1;
            }
            _ => {}
        }
    }
    let mut ids = ids.into_iter();
    let events = events.into_iter().map(|event| match event {
        Event::Start(Tag::Heading {
            level,
            id: None,
            classes,
            attrs,
        }) => Event::Start(Tag::Heading {
            level,
            id: ids.next().map(CowStr::from),
            classes,
            attrs,
        }),
        other => other,
    });
    let mut body = String::with_capacity(markdown.len() * 2);
    pulldown_cmark::html::push_html(&mut body, events);
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>hypertool alert runbook</title><link rel=\"icon\" href=\"data:,\"><style>{STYLE}</style></head>\
         <body><main>\n{body}</main></body></html>\n"
    )
}

/// The runbook page's one inline style (named by its hash in the pages' CSP).
pub const STYLE: &str =
    "body{font:15px/1.5 system-ui,sans-serif;margin:0;background:#fafafa;color:#222}\
main{max-width:60rem;margin:0 auto;padding:1rem 2rem;background:#fff}\
pre{background:#f3f3f3;padding:.75rem;overflow-x:auto}code{font-size:90%}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}\
h2{border-top:2px solid #ddd;padding-top:1rem}:target{background:#fff3c4}";

/// One alert's section (from its `## Alert N:` heading to the next `## `), without the rule.
pub fn section(id: AlertId) -> Option<&'static str> {
    let number = AlertId::ALL.iter().position(|a| *a == id)? + 1;
    let start = TEXT.find(&format!("\n## Alert {number}:"))? + 1;
    let rest = &TEXT[start..];
    let end = rest[3..].find("\n## ").map(|i| i + 3).unwrap_or(rest.len());
    Some(rest[..end].trim_end().trim_end_matches("---").trim_end())
}

/// One line on what the alert means: the first sentence of its description ("Fires when …").
pub fn summary(id: AlertId) -> String {
    let Some(section) = section(id) else {
        return String::new();
    };
    let text: String = section
        .split("\n\n")
        .find(|p| p.starts_with("Fires when"))
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let end = [text.find(" ("), text.find(". ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(text.len());
    text[..end].trim_end_matches('.').to_string()
}

/// A PromQL query of the runbook: the comment line above it, and the query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// The `#` comment that says what it shows.
    pub title: String,
    pub expr: String,
    /// The alert whose section it is in (None: general sections).
    pub alert: Option<AlertId>,
}

/// Every query of the runbook's ```promql blocks. Within a block, a query is the lines after a
/// `# title` comment up to the next comment or blank line.
pub fn queries() -> Vec<Query> {
    let mut out = Vec::new();
    let mut alert = None;
    let mut in_block = false;
    let mut title = String::new();
    let mut expr = String::new();
    let mut flush = |title: &mut String, expr: &mut String, alert: Option<AlertId>| {
        if !expr.trim().is_empty() {
            out.push(Query {
                title: std::mem::take(title),
                expr: expr.trim().to_string(),
                alert,
            });
        }
        expr.clear();
    };
    for line in TEXT.lines() {
        let trimmed = line.trim();
        if !in_block {
            if let Some(heading) = line.strip_prefix("## ") {
                alert = AlertId::ALL.into_iter().enumerate().find_map(|(i, id)| {
                    heading
                        .starts_with(&format!("Alert {}:", i + 1))
                        .then_some(id)
                });
            }
            if trimmed == "```promql" {
                in_block = true;
            }
            continue;
        }
        if trimmed == "```" {
            flush(&mut title, &mut expr, alert);
            in_block = false;
        } else if let Some(comment) = trimmed.strip_prefix('#') {
            flush(&mut title, &mut expr, alert);
            title = comment.trim().to_string();
        } else if trimmed.is_empty() {
            flush(&mut title, &mut expr, alert);
        } else {
            if !expr.is_empty() {
                expr.push('\n');
            }
            expr.push_str(trimmed);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alert_has_its_section_and_anchor() {
        let page = html();
        for id in AlertId::ALL {
            let anchor = id.runbook_anchor();
            assert!(
                page.contains(&format!("id=\"{anchor}\"")),
                "no anchor {anchor} in the HTML runbook"
            );
            assert!(
                TEXT.contains(&format!("(#{anchor})")),
                "the table of contents does not link {anchor}"
            );
            let section = section(id).expect("section");
            assert!(
                section.contains(&format!("`{}`", id.name())),
                "section of {} does not name it",
                id.name()
            );
            assert!(summary(id).starts_with("Fires when"), "{}", id.name());
            assert!(
                section.contains(&format!("hypertool runbook {}", id.name())),
                "section of {} does not run its investigation",
                id.name()
            );
        }
        assert!(page.contains("<table>"), "tables render as tables");
    }

    /// It is hypertool's runbook: the original's steps for another system are gone, and the
    /// features that answer them are named.
    #[test]
    fn the_runbook_speaks_of_hypertool_only() {
        for gone in [
            "persona_metrics.py",
            ".augment/",
            ".cline/",
            "collector.",
            "pip install langfuse",
            "absent(langfuse_trace_created_total)",
            "CachePrimitive",
            "restart-hypertool.sh",
        ] {
            assert!(!TEXT.contains(gone), "the runbook still says {gone}");
        }
        for named in [
            "hypertool budget set",
            "budgets.yml",
            "config/workflows/",
            "/v1/personas/switch",
            "/api/oscillations",
            "/api/alerts",
            "hypertool doctor",
            "hypertool budget suggest",
            "hypertool gates history",
            "runbook_url",
        ] {
            assert!(TEXT.contains(named), "the runbook never mentions {named}");
        }
    }

    #[test]
    fn repeated_headings_get_numbered_anchors() {
        let page = render_page("# A\n## Impact\n## Impact\n");
        assert!(page.contains("id=\"impact\"") && page.contains("id=\"impact-1\""));
    }

    #[test]
    fn queries_are_split_by_comment_and_blank_line() {
        let qs = queries();
        assert!(qs.len() >= 20, "{}", qs.len());
        assert!(
            qs.iter().all(|q| !q.title.is_empty()),
            "every query says what it shows"
        );
        let ratio = qs
            .iter()
            .find(|q| q.expr.contains("offset 30m"))
            .expect("the spike ratio");
        assert_eq!(ratio.expr.lines().count(), 3);
        assert_eq!(ratio.alert, Some(AlertId::TokenBudgetDepletionPredicted));
    }

    /// The metric names and label names a query's selectors use.
    fn selectors(expr: &promql_parser::parser::Expr, out: &mut Vec<(String, Vec<String>)>) {
        use promql_parser::parser::Expr as E;
        let mut vector = |vs: &promql_parser::parser::VectorSelector| {
            let labels = vs
                .matchers
                .matchers
                .iter()
                .map(|m| m.name.clone())
                .collect();
            out.push((vs.name.clone().unwrap_or_default(), labels));
        };
        match expr {
            E::VectorSelector(vs) => vector(vs),
            E::MatrixSelector(ms) => vector(&ms.vs),
            E::Aggregate(a) => selectors(&a.expr, out),
            E::Unary(u) => selectors(&u.expr, out),
            E::Binary(b) => {
                selectors(&b.lhs, out);
                selectors(&b.rhs, out);
            }
            E::Paren(p) => selectors(&p.expr, out),
            E::Subquery(s) => selectors(&s.expr, out),
            E::Call(c) => {
                for arg in &c.args.args {
                    selectors(arg, out);
                }
            }
            _ => {}
        }
    }

    /// Every PromQL query in the runbook parses, and names only metrics and labels hypertool
    /// exports (a histogram's `_bucket`, `_sum`, `_count` series; `le` on buckets; Prometheus's
    /// `up` with `job` and `instance`).
    #[test]
    fn every_runbook_query_parses_and_names_only_exported_metrics() {
        use crate::telemetry::families::{Kind, ALL};
        let mut problems = Vec::new();
        for q in queries() {
            let expr = match promql_parser::parser::parse(&q.expr) {
                Ok(e) => e,
                Err(e) => {
                    problems.push(format!("{:?} does not parse: {e}", q.expr));
                    continue;
                }
            };
            let mut found = Vec::new();
            selectors(&expr, &mut found);
            assert!(!found.is_empty(), "{:?} selects nothing", q.expr);
            for (name, labels) in found {
                if name == "up" {
                    if let Some(l) = labels.iter().find(|l| *l != "job" && *l != "instance") {
                        problems.push(format!("{:?}: up has no label {l}", q.expr));
                    }
                    continue;
                }
                let family = ALL.iter().find(|f| {
                    f.name == name
                        || (f.kind == Kind::Histogram
                            && ["_bucket", "_sum", "_count"]
                                .iter()
                                .any(|suffix| name == format!("{}{suffix}", f.name)))
                });
                let Some(family) = family else {
                    problems.push(format!("{:?}: {name} is not exported", q.expr));
                    continue;
                };
                for l in labels {
                    let bucket_le = l == "le" && name.ends_with("_bucket");
                    if !bucket_le && !family.labels.contains(&l.as_str()) {
                        problems.push(format!("{:?}: {name} has no label {l}", q.expr));
                    }
                }
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
