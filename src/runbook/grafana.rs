//! The Grafana dashboards (`deploy/grafana/*.json`), built from the runbook's queries so that every
//! query an operator is told to run is one panel away: `hypertool grafana --out deploy/grafana`
//! writes them, and a test keeps the committed files equal to this rendering.
//!
//! Importable as they are (Dashboards → Import): the Prometheus data source is a variable.

use serde_json::{json, Value};

use super::{queries, Query};
use crate::alerts::rules::AlertId;

/// (file name, title, uid, the alerts whose queries it shows).
const DASHBOARDS: [(&str, &str, &str, &[AlertId]); 2] = [
    (
        "persona_overview.json",
        "hypertool — persona overview",
        "hypertool-persona-overview",
        &[
            AlertId::TokenBudgetExceeded,
            AlertId::TokenBudgetSoftLimitReached,
            AlertId::TokenBudgetDepletionPredicted,
            AlertId::ExcessivePersonaSwitching,
            AlertId::HypertoolMetricsNotReported,
            AlertId::LangfuseIntegrationFailing,
        ],
    ),
    (
        "workflow_performance.json",
        "hypertool — workflow performance",
        "hypertool-workflow-performance",
        &[
            AlertId::HighQualityGateFailureRate,
            AlertId::SlowWorkflowStage,
        ],
    ),
];

/// `{{a}} {{b}}` for a query aggregated `by (a, b)` (its outermost grouping), else empty.
fn legend(expr: &str) -> String {
    let Some(start) = expr.find("by (") else {
        return String::new();
    };
    let rest = &expr[start + 4..];
    let Some(end) = rest.find(')') else {
        return String::new();
    };
    rest[..end]
        .split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "le")
        .map(|l| format!("{{{{{l}}}}}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn panel(id: u32, q: &Query, x: u32, y: u32) -> Value {
    let alert = q.alert.map(|a| a.name()).unwrap_or("general");
    let anchor = q.alert.map(|a| a.runbook_anchor()).unwrap_or("");
    json!({
        "id": id,
        "type": "timeseries",
        "title": q.title,
        "description": format!("From the runbook ({alert}): {}", q.title),
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "links": [{"title": "Runbook", "url": format!("/runbook#{anchor}")}],
        "targets": [{
            "refId": "A",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "expr": q.expr,
            "legendFormat": legend(&q.expr),
        }],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
    })
}

/// The dashboards: (file name, JSON).
pub fn dashboards() -> Vec<(&'static str, Value)> {
    let all = queries();
    DASHBOARDS
        .iter()
        .map(|(file, title, uid, alerts)| {
            let mut panels = Vec::new();
            let (mut id, mut y) = (1u32, 0u32);
            for alert in alerts.iter() {
                let mine: Vec<&Query> = all.iter().filter(|q| q.alert == Some(*alert)).collect();
                if mine.is_empty() {
                    continue;
                }
                let number = AlertId::ALL.iter().position(|a| a == alert).unwrap_or(0) + 1;
                panels.push(json!({
                    "id": id, "type": "row", "collapsed": false,
                    "title": format!("Alert {number}: {}", alert.name()),
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": [],
                }));
                id += 1;
                y += 1;
                for (i, q) in mine.iter().enumerate() {
                    let x = if i % 2 == 0 { 0 } else { 12 };
                    panels.push(panel(id, q, x, y));
                    id += 1;
                    if i % 2 == 1 || i + 1 == mine.len() {
                        y += 8;
                    }
                }
            }
            let dashboard = json!({
                "__inputs": [],
                "title": title,
                "uid": uid,
                "tags": ["hypertool"],
                "timezone": "utc",
                "editable": true,
                "schemaVersion": 39,
                "version": 1,
                "refresh": "30s",
                "time": {"from": "now-6h", "to": "now"},
                "templating": {"list": [{
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }]},
                "annotations": {"list": []},
                "panels": panels,
            });
            (*file, dashboard)
        })
        .collect()
}

/// Every query expression of the dashboards' panels.
pub fn panel_queries(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_runbook_query_is_a_panel() {
        let in_panels: Vec<String> = dashboards()
            .iter()
            .flat_map(|(_, d)| panel_queries(d))
            .collect();
        for q in queries() {
            assert!(in_panels.contains(&q.expr), "no panel for {:?}", q.expr);
        }
        assert_eq!(in_panels.len(), queries().len(), "each query once");
    }

    #[test]
    fn legends_follow_the_grouping() {
        assert_eq!(
            legend("sum by (persona, chatmode) (increase(x[1h]))"),
            "{{persona}} {{chatmode}}"
        );
        assert_eq!(
            legend("histogram_quantile(0.95, sum by (le, model) (rate(x[5m])))"),
            "{{model}}"
        );
        assert_eq!(legend("up{job=\"hypertool\"}"), "");
    }
}
