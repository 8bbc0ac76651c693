//! The investigation of HypertoolMetricsNotReported, which must work with hypertool down: from
//! outside the process, what stands between Prometheus and the metrics. What is seen is gathered
//! once ([`Seen`]); each finding and each cause's score is a function of it.

use super::*;

/// The investigation of HypertoolMetricsNotReported, from outside the process.
pub async fn metrics_investigation(target: &Target) -> Report {
    let seen = Seen::look(target).await;
    let mut findings = vec![
        seen.process_finding(),
        seen.api_finding(),
        seen.endpoint_finding(),
    ];
    findings.extend(seen.prometheus_finding());
    Report {
        alert: AlertId::HypertoolMetricsNotReported.name(),
        at: crate::core::clock::to_rfc3339(chrono::Utc::now().timestamp_millis()),
        window: "now".into(),
        findings,
        causes: ranked(&seen),
        notes: Vec::new(),
    }
}

/// What was seen from outside the process.
struct Seen {
    /// `hypertool serve` processes on this machine: (pid, command line).
    processes: Vec<(u32, String)>,
    api: String,
    api_up: bool,
    metrics: String,
    scraped: Scrape,
    /// Prometheus's view, when it was asked (`--prometheus`).
    prometheus: Option<PrometheusView>,
}

struct PrometheusView {
    url: String,
    job: String,
    targets: Result<Vec<ScrapeTarget>, String>,
}

impl Seen {
    async fn look(target: &Target) -> Seen {
        let http = client();
        let (_, loaded) = load(target);
        let cfg = loaded.as_ref().ok();
        let api = api_url(target, cfg);
        let metrics = metrics_url(target, cfg);
        let api_up = http
            .get(format!("{api}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        let scraped = scrape(&http, &metrics, metrics_token(cfg).as_deref()).await;
        let prometheus = match &target.prometheus {
            Some(url) => {
                let job = cfg.map_or("hypertool".to_string(), |c| c.settings.alerts.job.clone());
                let targets = prometheus_targets(&http, url, &job).await;
                Some(PrometheusView {
                    url: url.clone(),
                    job,
                    targets,
                })
            }
            None => None,
        };
        Seen {
            processes: serve_processes(),
            api,
            api_up,
            metrics,
            scraped,
            prometheus,
        }
    }

    fn process_finding(&self) -> Finding {
        let procs = &self.processes;
        Finding {
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
        }
    }

    fn api_finding(&self) -> Finding {
        Finding {
            check: "API port".into(),
            status: if self.api_up {
                Status::Ok
            } else {
                Status::Fail
            },
            found: format!(
                "{} {}",
                self.api,
                if self.api_up {
                    "answers"
                } else {
                    "does not answer"
                }
            ),
            data: Value::Null,
        }
    }

    fn endpoint_finding(&self) -> Finding {
        let metrics = &self.metrics;
        Finding {
            check: "metrics endpoint".into(),
            status: if self.scraped == Scrape::Hypertool {
                Status::Ok
            } else {
                Status::Fail
            },
            found: match &self.scraped {
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
        }
    }

    fn prometheus_finding(&self) -> Option<Finding> {
        let PrometheusView { url, job, targets } = self.prometheus.as_ref()?;
        Some(Finding {
            check: "Prometheus target".into(),
            status: match targets {
                Ok(ts) if !ts.is_empty() && ts.iter().all(ScrapeTarget::up) => Status::Ok,
                _ => Status::Fail,
            },
            found: match targets {
                Ok(ts) if ts.is_empty() => format!("no target of job {job}"),
                Ok(ts) => ts
                    .iter()
                    .map(ScrapeTarget::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
                Err(e) => format!("{url}: {e}"),
            },
            data: Value::Null,
        })
    }

    /// The job's targets, when Prometheus was asked and answered.
    fn targets(&self) -> Option<&[ScrapeTarget]> {
        self.prometheus
            .as_ref()
            .and_then(|p| p.targets.as_deref().ok())
    }

    /// The metrics address without its scheme, as it appears in a scrape URL.
    fn metrics_host(&self) -> &str {
        self.metrics
            .trim_start_matches("http://")
            .trim_start_matches("https://")
    }

    fn process_crash(&self) -> (f64, String) {
        let down = self.processes.is_empty() && !self.api_up;
        (
            if down { 1.0 } else { 0.0 },
            format!(
                "{} serve process(es); API {}",
                self.processes.len(),
                if self.api_up { "up" } else { "down" }
            ),
        )
    }

    fn port_conflict(&self) -> (f64, String) {
        let running = !self.processes.is_empty();
        match &self.scraped {
            Scrape::Other(code) => (
                0.9,
                format!("the metrics port answers {code} without hypertool's metrics"),
            ),
            Scrape::Unreachable(_) if running => (
                0.6,
                "hypertool runs but its metrics port does not answer".into(),
            ),
            _ => (0.0, "the metrics port is hypertool's or free".into()),
        }
    }

    fn network_issue(&self) -> (f64, String) {
        let prom_error = self
            .targets()
            .and_then(|ts| ts.iter().find(|t| !t.up()).map(|t| t.last_error.clone()));
        let score = if self.scraped == Scrape::Hypertool && prom_error.is_some() {
            0.9
        } else {
            0.0
        };
        let evidence = match prom_error {
            Some(e) => format!("the endpoint answers here; Prometheus: {e}"),
            None => "Prometheus reports no scrape error (or was not asked: --prometheus)".into(),
        };
        (score, evidence)
    }

    fn metrics_disabled(&self) -> (f64, String) {
        let host = self.metrics_host();
        let scrapes_elsewhere = self
            .targets()
            .is_some_and(|ts| !ts.is_empty() && ts.iter().all(|t| !t.url.contains(host)));
        if self.scraped == Scrape::Unauthorized {
            (0.9, "the endpoint wants a bearer token".into())
        } else if scrapes_elsewhere {
            (
                0.9,
                format!("Prometheus scrapes another address than {host}"),
            )
        } else {
            (0.0, "the endpoint is open and Prometheus scrapes it".into())
        }
    }
}

/// The runbook's causes of the alert, each scored from what was seen, most likely first.
fn ranked(seen: &Seen) -> Vec<Cause> {
    let score_of = |name: &str| match name {
        "Process crash" => seen.process_crash(),
        "Port conflict" => seen.port_conflict(),
        "Network issue" => seen.network_issue(),
        "Metrics disabled" => seen.metrics_disabled(),
        _ => (0.0, String::new()),
    };
    let specs = crate::runbook::investigate::causes_of(AlertId::HypertoolMetricsNotReported);
    let mut causes: Vec<Cause> = specs
        .iter()
        .map(|s| {
            let (score, evidence) = score_of(s.name);
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
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(processes: usize, api_up: bool, scraped: Scrape) -> Seen {
        Seen {
            processes: (0..processes)
                .map(|n| (100 + n as u32, "hypertool serve".into()))
                .collect(),
            api: "http://127.0.0.1:8080".into(),
            api_up,
            metrics: "http://127.0.0.1:9464".into(),
            scraped,
            prometheus: None,
        }
    }

    #[test]
    fn every_cause_of_the_runbook_is_scored_with_evidence() {
        let causes = ranked(&seen(0, false, Scrape::Unreachable("refused".into())));
        assert!(!causes.is_empty());
        assert!(
            causes.iter().all(|c| !c.evidence.is_empty()),
            "a runbook cause is not scored here: {:?}",
            causes.iter().map(|c| c.cause).collect::<Vec<_>>()
        );
        assert_eq!((causes[0].cause, causes[0].score), ("Process crash", 1.0));
    }

    #[test]
    fn a_target_scraping_another_address_points_at_the_configuration() {
        let mut s = seen(1, true, Scrape::Hypertool);
        s.prometheus = Some(PrometheusView {
            url: "http://127.0.0.1:9090".into(),
            job: "hypertool".into(),
            targets: Ok(vec![ScrapeTarget {
                url: "http://127.0.0.1:9999/metrics".into(),
                health: "down".into(),
                last_error: "connection refused".into(),
            }]),
        });
        let causes = ranked(&s);
        let score = |name| causes.iter().find(|c| c.cause == name).map(|c| c.score);
        assert_eq!(score("Metrics disabled"), Some(0.9));
        assert_eq!(score("Network issue"), Some(0.9));
        assert_eq!(score("Process crash"), Some(0.0));
        assert_eq!(s.prometheus_finding().map(|f| f.status), Some(Status::Fail));
    }
}
