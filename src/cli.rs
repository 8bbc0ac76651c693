//! The commands that talk to a running server: `hypertool personas …` and `hypertool budget …`.

use serde_json::Value;

use crate::core::text::error_chain;
use crate::web::server_url;

/// A failed client command, worded for the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach hypertool at {server}: {reason}\n  fix: start it with `hypertool serve`, or point --server / HYPERTOOL_SERVER at it")]
    Unreachable { server: String, reason: String },
    #[error("{server} answered 401: {message}\n  fix: export HYPERTOOL_API_KEY with an admin or viewer key (or name another variable with --api-key-env)")]
    Unauthorized { server: String, message: String },
    #[error("{server} answered {status}: {message}")]
    Refused {
        server: String,
        status: u16,
        message: String,
    },
}

pub struct Client {
    server: String,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer`; never printed.
    key: Option<String>,
}

impl Client {
    /// `server` may omit the scheme (`127.0.0.1:8080`): plain `http://` is meant, as for curl.
    pub fn new(server: &str, key: Option<String>) -> Self {
        Self {
            key,
            server: server_url(server),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{}", self.server, path);
        let mut req = self.http.request(method, &url);
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            server: self.server.clone(),
            reason: error_chain(&e),
        })?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("no error message")
                .to_string();
            if status == reqwest::StatusCode::UNAUTHORIZED {
                return Err(ClientError::Unauthorized {
                    server: self.server.clone(),
                    message,
                });
            }
            return Err(ClientError::Refused {
                server: self.server.clone(),
                status: status.as_u16(),
                message,
            });
        }
        Ok(value)
    }
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() != 0.0) {
                format!("{f:.4}")
            } else {
                n.to_string()
            }
        }
        Some(other) => other.to_string(),
    }
}

/// `text` as it may reach a terminal: every control character but newline and tab, and every
/// bidirectional-override or invisible character, written as a visible `\uXXXX` (also a valid
/// JSON escape, so `--json` output stays JSON). Text from a server or a ledger — a gate's reasons,
/// a name — can then neither recolour nor rewrite the operator's terminal.
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t') || crate::core::labels::is_deceptive(c)
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            // As UTF-16 units, so a tag character (U+E0041) is a valid JSON escape too.
            for unit in c.encode_utf16(&mut [0; 2]) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The widest a table cell is shown (longer ones are cut, with `…`): a server's answer decides
/// what is in a cell, and must not decide the width of the operator's table.
pub const MAX_CELL_CHARS: usize = 120;

fn shown_cell(text: &str) -> String {
    let one_line = text.replace(['\n', '\r', '\t'], " ");
    match one_line.char_indices().nth(MAX_CELL_CHARS - 1) {
        Some((end, _)) if one_line.chars().count() > MAX_CELL_CHARS => {
            format!("{}…", &one_line[..end])
        }
        _ => one_line,
    }
}

/// A plain aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| shown_cell(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, c) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths[i]))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect(), &mut out);
    for row in &rows {
        line(row.clone(), &mut out);
    }
    out
}

pub fn personas_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["personas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    vec![
                        cell(p.get("name")),
                        cell(p.get("display_name")),
                        p["aliases"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default(),
                        cell(p.pointer("/budget/tokens")),
                        cell(p.pointer("/budget/remaining_tokens")),
                        cell(p.pointer("/budget/period")),
                        cell(p.pointer("/budget/mode")),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "PERSONA",
            "DISPLAY NAME",
            "ALIASES",
            "BUDGET",
            "REMAINING",
            "PERIOD",
            "MODE",
        ],
        &rows,
    )
}

fn budget_row(b: &Value) -> Vec<String> {
    vec![
        cell(b.get("persona")),
        cell(b.get("tokens")),
        cell(b.get("used_tokens")),
        cell(b.get("remaining_tokens")),
        cell(b.get("cost_usd")),
        cell(b.get("used_cost_usd")),
        cell(b.get("period")),
        cell(b.get("mode")),
        cell(b.get("resets_at")),
        cell(b.get("source")),
    ]
}

pub fn budgets_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = match v.get("budgets").and_then(Value::as_array) {
        Some(a) => a.iter().map(budget_row).collect(),
        None => vec![budget_row(v)],
    };
    table(
        &[
            "PERSONA",
            "TOKENS",
            "USED",
            "REMAINING",
            "COST USD",
            "USED USD",
            "PERIOD",
            "MODE",
            "RESETS AT",
            "SOURCE",
        ],
        &rows,
    )
}

pub fn alerts_table(v: &Value) -> String {
    let mut rows = Vec::new();
    for alert in v["alerts"].as_array().into_iter().flatten() {
        let name = cell(alert.get("alertname"));
        let instances = alert["instances"].as_array().cloned().unwrap_or_default();
        let live: Vec<&Value> = instances
            .iter()
            .filter(|i| i["state"] != "inactive")
            .collect();
        if live.is_empty() {
            rows.push(vec![
                name.clone(),
                cell(alert.get("state")),
                cell(alert.get("severity")),
                "-".into(),
                "-".into(),
                "-".into(),
                cell(alert.get("runbook")),
            ]);
        }
        for i in live {
            let labels: Vec<String> = i["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| !crate::alerts::RULE_LABELS.contains(&k.as_str()))
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            rows.push(vec![
                name.clone(),
                cell(i.get("state")),
                cell(alert.get("severity")),
                labels.join(","),
                cell(i.get("value")),
                cell(i.get("active_since")),
                cell(alert.get("runbook")),
            ]);
        }
    }
    table(
        &[
            "ALERT",
            "STATE",
            "SEVERITY",
            "LABELS",
            "VALUE",
            "ACTIVE SINCE",
            "RUNBOOK",
        ],
        &rows,
    )
}

/// The verdicts of `GET /api/quality-gates/history` for a terminal: per stage, the failed
/// criteria, then the verdicts.
pub fn gates_table(v: &Value) -> String {
    let mut out = String::new();
    let stages: Vec<Vec<String>> = v["stages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    vec![
                        format!(
                            "{}/{}",
                            s["workflow"].as_str().unwrap_or(""),
                            s["stage"].as_str().unwrap_or("")
                        ),
                        s["verdicts"].to_string(),
                        s["failed"].to_string(),
                        format!("{:.0} %", s["failure_rate"].as_f64().unwrap_or(0.0) * 100.0),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&format!(
        "quality-gate verdicts from {} to {}\n",
        v["since"].as_str().unwrap_or("?"),
        v["until"].as_str().unwrap_or("?")
    ));
    out.push_str(&table(&["STAGE", "VERDICTS", "FAILED", "RATE"], &stages));
    let criteria: Vec<Vec<String>> = v["failed_criteria"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    vec![
                        c["criterion"].as_str().unwrap_or("").to_string(),
                        c["failures"].to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !criteria.is_empty() {
        out.push('\n');
        out.push_str(&table(&["FAILED CRITERION", "FAILURES"], &criteria));
    }
    let verdicts: Vec<Vec<String>> = v["verdicts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        x["at"].as_str().unwrap_or("").to_string(),
                        format!(
                            "{}/{}",
                            x["workflow"].as_str().unwrap_or(""),
                            x["stage"].as_str().unwrap_or("")
                        ),
                        x["run"].as_str().unwrap_or("-").to_string(),
                        x["attempt"].to_string(),
                        x["model"].as_str().unwrap_or("").to_string(),
                        x["result"].as_str().unwrap_or("").to_string(),
                        x["reasons"].as_str().unwrap_or("").to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push('\n');
    out.push_str(&table(
        &[
            "AT", "STAGE", "RUN", "ATTEMPT", "MODEL", "RESULT", "REASONS",
        ],
        &verdicts,
    ));
    if v["truncated"] == true {
        out.push_str("(older verdicts left out: narrow --since or raise --limit)\n");
    }
    out
}

/// `GET /api/budgets/suggestions` for a terminal.
pub fn suggestions_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["suggestions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let current = match (s["current_tokens"].as_u64(), s["current_period"].as_str())
                    {
                        (Some(t), Some(p)) => format!("{t} {p}"),
                        _ => "none".into(),
                    };
                    vec![
                        s["persona"].as_str().unwrap_or("").to_string(),
                        s["days"].to_string(),
                        s["p95_daily_tokens"].to_string(),
                        current,
                        format!("{} daily", s["suggested_daily_tokens"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if rows.is_empty() {
        return format!(
            "{}\nno usage before today in the ledger: nothing to suggest yet\n",
            v["method"].as_str().unwrap_or("")
        );
    }
    format!(
        "{}\n{}",
        v["method"].as_str().unwrap_or(""),
        table(
            &["PERSONA", "DAYS", "P95/DAY", "CURRENT", "SUGGESTED"],
            &rows
        )
    )
}

/// `budgets.yml` with each persona's `tokens` set, comments and everything else kept. A persona
/// without an entry gets one under `personas:`.
pub fn set_budget_tokens(text: &str, tokens: &[(String, u64)]) -> Result<String, String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let Some(personas_at) = lines.iter().position(|l| l.trim_end() == "personas:") else {
        return Err("no `personas:` section at the top level".into());
    };
    let indent = |l: &str| l.len() - l.trim_start().len();
    let content = |l: &str| !l.trim().is_empty() && !l.trim_start().starts_with('#');
    for (persona, n) in tokens {
        // The personas block: the lines after `personas:` until the next top-level key.
        let end = lines[personas_at + 1..]
            .iter()
            .position(|l| content(l) && indent(l) == 0)
            .map_or(lines.len(), |i| personas_at + 1 + i);
        let key = format!("{persona}:");
        let entry = (personas_at + 1..end).find(|i| {
            let l = &lines[*i];
            content(l)
                && indent(l) == 2
                && l.trim().starts_with(&key)
                && l.trim()[key.len()..].trim().is_empty()
        });
        match entry {
            Some(at) => {
                let block_end = lines[at + 1..end]
                    .iter()
                    .position(|l| content(l) && indent(l) <= 2)
                    .map_or(end, |i| at + 1 + i);
                match (at + 1..block_end).find(|i| lines[*i].trim_start().starts_with("tokens:")) {
                    Some(t) => {
                        let pad = " ".repeat(indent(&lines[t]));
                        // A trailing comment is kept, with the spaces before it.
                        let comment = lines[t]
                            .find(" #")
                            .map(|c| {
                                let start = lines[t][..c].trim_end().len();
                                lines[t][start..].to_string()
                            })
                            .unwrap_or_default();
                        lines[t] = format!("{pad}tokens: {n}{comment}");
                    }
                    None => lines.insert(at + 1, format!("    tokens: {n}")),
                }
            }
            None => {
                // After the last content line of the block.
                let last = (personas_at..end)
                    .rev()
                    .find(|i| content(&lines[*i]))
                    .unwrap_or(personas_at);
                lines.insert(last + 1, format!("  {persona}:"));
                lines.insert(last + 2, format!("    tokens: {n}"));
            }
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    Ok(out)
}

/// Every query of `alert`'s runbook section, run on Prometheus: `[{title, query, series, result}]`.
pub async fn prometheus_evidence(
    prometheus: &str,
    alert: crate::alerts::rules::AlertId,
) -> Vec<Value> {
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let base = server_url(prometheus);
    let mut out = Vec::new();
    for q in crate::runbook::queries()
        .into_iter()
        .filter(|q| q.alert == Some(alert))
    {
        let resp = http
            .get(format!("{base}/api/v1/query"))
            .query(&[("query", q.expr.as_str())])
            .send()
            .await;
        let entry = match resp {
            Ok(r) => match r.json::<Value>().await {
                Ok(v) if v["status"] == "success" => {
                    let result = v.pointer("/data/result").cloned().unwrap_or(Value::Null);
                    let series = result.as_array().map_or(0, Vec::len);
                    serde_json::json!({"title": q.title, "query": q.expr, "series": series,
                        "result": result.as_array().map(|a| a.iter().take(10).cloned().collect::<Vec<_>>())})
                }
                Ok(v) => {
                    serde_json::json!({"title": q.title, "query": q.expr, "error": v["error"]})
                }
                Err(e) => {
                    serde_json::json!({"title": q.title, "query": q.expr, "error": error_chain(&e)})
                }
            },
            Err(e) => {
                serde_json::json!({"title": q.title, "query": q.expr, "error": error_chain(&e)})
            }
        };
        out.push(entry);
    }
    // The alert's own state in Prometheus.
    if let Ok(r) = http.get(format!("{base}/api/v1/alerts")).send().await {
        if let Ok(v) = r.json::<Value>().await {
            let mine: Vec<Value> = v
                .pointer("/data/alerts")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter(|x| {
                            x.pointer("/labels/alertname").and_then(Value::as_str)
                                == Some(alert.name())
                        })
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            out.push(serde_json::json!({"title": format!("{} in Prometheus", alert.name()), "query": "GET /api/v1/alerts", "series": mine.len(), "result": mine}));
        }
    }
    out
}

/// What Prometheus said, for a terminal.
pub fn prometheus_text(evidence: &[Value]) -> String {
    let mut s = String::from("\nPrometheus:\n");
    for e in evidence {
        s.push_str(&format!(
            "  {}\n    {}\n",
            e["title"].as_str().unwrap_or(""),
            e["query"].as_str().unwrap_or("").replace('\n', " ")
        ));
        if let Some(err) = e.get("error") {
            s.push_str(&format!("    error: {err}\n"));
            continue;
        }
        let rows = e["result"].as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            s.push_str("    (no series)\n");
        }
        for r in rows {
            let labels = r["metric"]
                .as_object()
                .or_else(|| r["labels"].as_object())
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let value = r["value"][1]
                .as_str()
                .or_else(|| r["state"].as_str())
                .unwrap_or("");
            s.push_str(&format!("    {{{labels}}} {value}\n"));
        }
    }
    s
}

/// One experiment of `GET /api/experiments` for a terminal: a line on the stage and its decision,
/// then a row per variant.
fn experiment_text(e: &Value) -> String {
    let pct = |x: &Value| {
        x.as_f64()
            .map_or("—".to_string(), |p| format!("{:.0} %", p * 100.0))
    };
    let interval = |x: &Value| match (x[0].as_f64(), x[1].as_f64()) {
        (Some(lo), Some(hi)) => format!("{:.0}–{:.0} %", lo * 100.0, hi * 100.0),
        _ => "—".to_string(),
    };
    let num = |x: &Value, digits: usize| {
        x.as_f64()
            .map_or("—".to_string(), |n| format!("{n:.digits$}"))
    };
    let secs = |x: &Value| x.as_f64().map_or("—".to_string(), |s| format!("{s:.1} s"));
    let decision = match (e["decided"].as_str(), e["leader"].as_str()) {
        (Some(d), _) => format!("decided: {d} is best (P ≥ {})", num(&e["decide_at"], 2)),
        (None, Some(l)) => format!(
            "not decided: {l} leads; decided at P ≥ {} after {} runs of every variant",
            num(&e["decide_at"], 2),
            e["min_runs"]
        ),
        _ => "no runs yet".to_string(),
    };
    let rows: Vec<Vec<String>> = e["variants"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| {
                    vec![
                        v["variant"].as_str().unwrap_or("").to_string(),
                        num(&v["runs"], 0),
                        pct(&v["traffic_share"]),
                        pct(&v["pass_rate"]),
                        interval(&v["pass_rate_interval"]),
                        num(&v["retries_per_run"], 2),
                        num(&v["escalations_per_run"], 2),
                        v["cost_per_pass_usd"]
                            .as_f64()
                            .map_or("—".to_string(), |c| format!("${c:.4}")),
                        secs(&v["duration_p50_seconds"]),
                        secs(&v["duration_p95_seconds"]),
                        pct(&v["p_best"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{}/{} ({} allocation, best by {}): {decision}\n{}",
        e["workflow"].as_str().unwrap_or(""),
        e["stage"].as_str().unwrap_or(""),
        e["allocation"].as_str().unwrap_or(""),
        e["objective"].as_str().unwrap_or(""),
        table(
            &[
                "VARIANT",
                "RUNS",
                "SHARE",
                "PASS RATE",
                "95 % INTERVAL",
                "RETRIES/RUN",
                "ESCALATIONS/RUN",
                "COST/PASS",
                "P50",
                "P95",
                "P(BEST)",
            ],
            &rows
        )
    )
}

/// `GET /api/audit` for a terminal: one row per change, its before and after in short JSON.
pub fn audit_table(v: &Value) -> String {
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        return "no audited change in that period\n".to_string();
    }
    let short = |x: &Value| {
        if x.is_null() {
            "—".to_string()
        } else {
            let text = x.to_string();
            if text.chars().count() > 60 {
                format!("{}…", text.chars().take(59).collect::<String>())
            } else {
                text
            }
        }
    };
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e["at"].as_str().unwrap_or("").to_string(),
                e["actor"].as_str().unwrap_or("").to_string(),
                e["action"].as_str().unwrap_or("").to_string(),
                e["target"].as_str().unwrap_or("").to_string(),
                short(&e["before"]),
                short(&e["after"]),
            ]
        })
        .collect();
    let mut out = table(
        &["AT", "ACTOR", "ACTION", "TARGET", "BEFORE", "AFTER"],
        &rows,
    );
    if v["truncated"] == true {
        out.push_str(
            "(older entries left out: narrow --since or raise --limit; --json has every field)\n",
        );
    }
    out
}

/// `GET /api/experiments` for a terminal.
pub fn experiments_table(v: &Value) -> String {
    let list = v["experiments"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return "no experiments: no workflow stage lists variants\n".to_string();
    }
    list.iter()
        .map(experiment_text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `GET /api/experiments/{workflow}/{stage}` for a terminal.
pub fn experiment_table(v: &Value) -> String {
    experiment_text(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ignorable_characters_print_as_json_escapes() {
        // The probe's names, printed raw by `gates history` before.
        let shown = terminal_safe("backend\u{AD}-eng\u{E0041}\u{3164}\u{FE0F} ok\n");
        assert_eq!(shown, "backend\\u00ad-eng\\udb40\\udc41\\u3164\\ufe0f ok\n");
        // Still JSON: the escapes read back as the characters.
        let back: String = serde_json::from_str(&format!("\"{}\"", shown.trim_end())).unwrap();
        assert_eq!(back, "backend\u{AD}-eng\u{E0041}\u{3164}\u{FE0F} ok");
        assert!(matches!(
            terminal_safe("plain"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn budget_tokens_are_set_in_place_keeping_comments() {
        let text = "# budgets\ndefaults:\n  period: daily\n\npersonas:\n  backend-engineer:\n    tokens: 2000  # main\n    mode: block\n  data-scientist:\n    mode: observe\n\n# end\n";
        let out = set_budget_tokens(
            text,
            &[
                ("backend-engineer".into(), 2500),
                ("data-scientist".into(), 900),
                ("new-persona".into(), 100),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "# budgets\ndefaults:\n  period: daily\n\npersonas:\n  backend-engineer:\n    tokens: 2500  # main\n    mode: block\n  data-scientist:\n    tokens: 900\n    mode: observe\n  new-persona:\n    tokens: 100\n\n# end\n"
        );
        assert!(set_budget_tokens("defaults: {}\n", &[]).is_err());
    }

    #[test]
    fn a_server_without_scheme_means_http() {
        assert_eq!(server_url("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(server_url("http://h:1/"), "http://h:1");
        assert_eq!(server_url("https://h"), "https://h");
    }
}
