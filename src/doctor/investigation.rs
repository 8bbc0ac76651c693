//! The investigation of HypertoolMetricsNotReported, which must work with hypertool down: from
//! outside the process, what stands between Prometheus and the metrics.

use super::*;

/// The investigation of HypertoolMetricsNotReported, from outside the process.
pub async fn metrics_investigation(target: &Target) -> Report {
    let http = client();
    let (_, loaded) = load(target);
    let cfg = loaded.as_ref().ok();
    let api = api_url(target, cfg);
    let metrics = metrics_url(target, cfg);
    let job = cfg.map_or("hypertool".to_string(), |c| c.settings.alerts.job.clone());
    let mut findings = Vec::new();
    let procs = serve_processes();
    findings.push(Finding {
        check: "process".into(),
        status: if procs.is_empty() {
            Status::Fail
        } else {
            Status::Ok
        },
        found: if procs.is_empty() {
            "no `hypertool serve` process on this machine".into()
        } else {
            procs
                .iter()
                .map(|(pid, cmd)| format!("pid {pid}: {cmd}"))
                .collect::<Vec<_>>()
                .join("; ")
        },
        data: json!(procs
            .iter()
            .map(|(pid, cmd)| json!({"pid": pid, "command": cmd}))
            .collect::<Vec<_>>()),
    });
    let api_up = http
        .get(format!("{api}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    findings.push(Finding {
        check: "API port".into(),
        status: if api_up { Status::Ok } else { Status::Fail },
        found: format!(
            "{api} {}",
            if api_up { "answers" } else { "does not answer" }
        ),
        data: Value::Null,
    });
    let scraped = scrape(&http, &metrics, metrics_token(cfg).as_deref()).await;
    findings.push(Finding {
        check: "metrics endpoint".into(),
        status: if scraped == Scrape::Hypertool {
            Status::Ok
        } else {
            Status::Fail
        },
        found: match &scraped {
            Scrape::Hypertool => format!("{metrics}/metrics answers with hypertool's metrics"),
            Scrape::Unauthorized => {
                format!("{metrics}/metrics answers 401 (bearer token required)")
            }
            Scrape::Other(code) => {
                format!("{metrics}/metrics answers {code}, not hypertool's metrics")
            }
            Scrape::Unreachable(e) => format!("{metrics}/metrics: {e}"),
        },
        data: Value::Null,
    });
    let mut targets = None;
    if let Some(prom) = &target.prometheus {
        let t = prometheus_targets(&http, prom, &job).await;
        findings.push(Finding {
            check: "Prometheus target".into(),
            status: match &t {
                Ok(ts) if !ts.is_empty() && ts.iter().all(|t| t.1 == "up") => Status::Ok,
                _ => Status::Fail,
            },
            found: match &t {
                Ok(ts) if ts.is_empty() => format!("no target of job {job}"),
                Ok(ts) => ts
                    .iter()
                    .map(|t| {
                        format!(
                            "{} {}{}",
                            t.0,
                            t.1,
                            if t.2.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", t.2)
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                Err(e) => format!("{prom}: {e}"),
            },
            data: Value::Null,
        });
        targets = t.ok();
    }
    // The causes, from what was seen.
    let metrics_host = metrics
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_string();
    let scrapes_elsewhere = targets
        .as_ref()
        .is_some_and(|ts| !ts.is_empty() && ts.iter().all(|t| !t.0.contains(&metrics_host)));
    let prom_error = targets
        .as_ref()
        .and_then(|ts| ts.iter().find(|t| t.1 != "up").map(|t| t.2.clone()));
    let scored = [
        (
            "Process crash",
            if procs.is_empty() && !api_up {
                1.0
            } else {
                0.0
            },
            format!(
                "{} serve process(es); API {}",
                procs.len(),
                if api_up { "up" } else { "down" }
            ),
        ),
        (
            "Port conflict",
            match (&scraped, procs.is_empty()) {
                (Scrape::Other(_), _) => 0.9,
                (Scrape::Unreachable(_), false) => 0.6,
                _ => 0.0,
            },
            match &scraped {
                Scrape::Other(code) => {
                    format!("the metrics port answers {code} without hypertool's metrics")
                }
                Scrape::Unreachable(_) if !procs.is_empty() => {
                    "hypertool runs but its metrics port does not answer".into()
                }
                _ => "the metrics port is hypertool's or free".into(),
            },
        ),
        (
            "Network issue",
            if scraped == Scrape::Hypertool && prom_error.is_some() {
                0.9
            } else {
                0.0
            },
            match &prom_error {
                Some(e) => format!("the endpoint answers here; Prometheus: {e}"),
                None => {
                    "Prometheus reports no scrape error (or was not asked: --prometheus)".into()
                }
            },
        ),
        (
            "Metrics disabled",
            if scraped == Scrape::Unauthorized || scrapes_elsewhere {
                0.9
            } else {
                0.0
            },
            if scraped == Scrape::Unauthorized {
                "the endpoint wants a bearer token".into()
            } else if scrapes_elsewhere {
                format!("Prometheus scrapes another address than {metrics_host}")
            } else {
                "the endpoint is open and Prometheus scrapes it".into()
            },
        ),
    ];
    let specs = crate::runbook::investigate::causes_of(AlertId::HypertoolMetricsNotReported);
    let mut causes: Vec<Cause> = specs
        .iter()
        .map(|s| {
            let (score, evidence) = scored
                .iter()
                .find(|(n, ..)| *n == s.name)
                .map(|(_, sc, e)| (*sc, e.clone()))
                .unwrap_or((0.0, String::new()));
            Cause {
                cause: s.name,
                score,
                prior: s.prior,
                indicator: s.indicator,
                evidence,
                fix: s.fix,
            }
        })
        .collect();
    causes.sort_by(|a, b| b.score.total_cmp(&a.score));
    Report {
        alert: AlertId::HypertoolMetricsNotReported.name(),
        at: crate::core::clock::to_rfc3339(chrono::Utc::now().timestamp_millis()),
        window: "now".into(),
        findings,
        causes,
        notes: Vec::new(),
    }
}
