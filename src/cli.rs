//! The commands that talk to a running server: `hypertool personas …` and `hypertool budget …`.

use serde_json::Value;

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

/// The server's base URL: `http://` added when no scheme is given, no trailing slash.
pub fn server_url(server: &str) -> String {
    let trimmed = server.trim().trim_end_matches('/');
    if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    }
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

/// A plain aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
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
    for row in rows {
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

/// An error with its causes (reqwest's own message is often just "error sending request").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_without_scheme_means_http() {
        assert_eq!(server_url("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(server_url("http://h:1/"), "http://h:1");
        assert_eq!(server_url("https://h"), "https://h");
    }
}
