//! What the configuration names outside the process: upstreams, trace destinations,
//! Alertmanager, Prometheus and its targets; each checked with a timeout, no secret printed.

use super::*;

/// One of the job's targets as Prometheus sees it.
pub struct ScrapeTarget {
    pub url: String,
    /// `up`, `down` or `unknown`.
    pub health: String,
    pub last_error: String,
}

impl ScrapeTarget {
    pub fn up(&self) -> bool {
        self.health == "up"
    }
}

impl std::fmt::Display for ScrapeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.url, self.health)?;
        if !self.last_error.is_empty() {
            write!(f, ": {}", self.last_error)?;
        }
        Ok(())
    }
}

/// Prometheus's view of the job's targets.
pub async fn prometheus_targets(
    http: &reqwest::Client,
    prometheus: &str,
    job: &str,
) -> Result<Vec<ScrapeTarget>, String> {
    let url = format!(
        "{}/api/v1/targets?state=active",
        prometheus.trim_end_matches('/')
    );
    let v: Value = http
        .get(&url)
        .send()
        .await
        .map_err(|e| why(&e))?
        .json()
        .await
        .map_err(|e| why(&e))?;
    Ok(v.pointer("/data/activeTargets")
        .and_then(Value::as_array)
        .map(|ts| {
            ts.iter()
                .filter(|t| t.pointer("/labels/job").and_then(Value::as_str) == Some(job))
                .map(|t| {
                    let s = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    ScrapeTarget {
                        url: s("scrapeUrl"),
                        health: s("health"),
                        last_error: s("lastError"),
                    }
                })
                .collect()
        })
        .unwrap_or_default())
}

/// What the configuration names: upstreams, trace destinations, Alertmanager.
pub(super) async fn configured(
    http: &reqwest::Client,
    target: &Target,
    c: &Config,
    out: &mut Vec<Check>,
) {
    upstreams(http, c, out).await;
    trace_destinations(http, target, c, out).await;
    alertmanager(http, c, out).await;
}

/// Each upstream: its key variable set, its host answering.
pub(super) async fn upstreams(http: &reqwest::Client, c: &Config, out: &mut Vec<Check>) {
    // Upstreams.
    if c.settings.gateway.upstreams.is_empty() {
        out.push(Check::new(
            "upstreams",
            Status::Info,
            "none configured (mock/… models only)",
        ));
    }
    for (name, u) in &c.settings.gateway.upstreams {
        let key = u.api_key_env.as_ref().and_then(|e| std::env::var(e).ok());
        let mut req = http.get(format!("{}/models", u.base_url.trim_end_matches('/')));
        if let Some(k) = &key {
            req = req.bearer_auth(k);
        }
        let missing_key = u.api_key_env.as_ref().filter(|_| key.is_none());
        out.push(match req.send().await {
            Ok(r) if r.status().is_success() => Check::new(
                &format!("upstream {name}"),
                Status::Ok,
                format!("{} answers", u.base_url),
            ),
            Ok(r) if r.status() == 401 || r.status() == 403 => Check::new(
                &format!("upstream {name}"),
                Status::Fail,
                match missing_key {
                    Some(env) => format!(
                        "{} answers {}: {env} is not set",
                        u.base_url,
                        r.status().as_u16()
                    ),
                    None => format!("{} refuses the key ({})", u.base_url, r.status().as_u16()),
                },
            ),
            // Reachable; not every OpenAI-compatible server lists models.
            Ok(r) => Check::new(
                &format!("upstream {name}"),
                Status::Ok,
                format!(
                    "{} reachable (GET /models: {})",
                    u.base_url,
                    r.status().as_u16()
                ),
            ),
            Err(e) => Check::new(
                &format!("upstream {name}"),
                Status::Fail,
                format!("{}: {}", u.base_url, why(&e)),
            ),
        });
    }
}

/// Where traces go (OTLP, Langfuse): configured as expected, and answering.
pub(super) async fn trace_destinations(
    http: &reqwest::Client,
    target: &Target,
    c: &Config,
    out: &mut Vec<Check>,
) {
    // Trace destinations.
    let plan = crate::telemetry::trace::Plan::resolve(
        &c.settings.tracing,
        &c.settings.langfuse,
        &target.data_dir,
        &|k| std::env::var(k).ok(),
    );
    if plan.destinations.is_empty() {
        out.push(Check::new(
            "traces",
            if plan.langfuse_missing {
                Status::Fail
            } else {
                Status::Info
            },
            if plan.langfuse_missing {
                format!(
                    "Langfuse is expected but {} not set",
                    plan.langfuse_missing_keys.join(" and ")
                )
            } else {
                "no destination configured".to_string()
            },
        ));
    }
    for d in &plan.destinations {
        if d.name == "langfuse" {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
            let lf = &c.settings.langfuse;
            let host = env("LANGFUSE_HOST").unwrap_or_else(|| lf.host.clone());
            let result = match (env(&lf.public_key_env), env(&lf.secret_key_env)) {
                (Some(pk), Some(sk)) => {
                    crate::server::insight::langfuse_test_call(http, &host, &pk, &sk).await
                }
                _ => crate::runbook::investigate::TestCall::NotTried {
                    why: "a key is not set".into(),
                },
            };
            use crate::runbook::investigate::TestCall;
            out.push(match result {
                TestCall::Accepted => Check::new(
                    "traces langfuse",
                    Status::Ok,
                    format!("{host} accepts the keys"),
                ),
                TestCall::Refused { status } => Check::new(
                    "traces langfuse",
                    Status::Fail,
                    format!(
                        "{host} refuses the keys (HTTP {status}): check {} and {}",
                        lf.public_key_env, lf.secret_key_env
                    ),
                ),
                TestCall::Unreachable { error } => {
                    Check::new("traces langfuse", Status::Fail, format!("{host}: {error}"))
                }
                TestCall::NotTried { why } => Check::new("traces langfuse", Status::Fail, why),
            });
        } else {
            // An empty ExportTraceServiceRequest: accepted by any OTLP/HTTP receiver.
            let mut req = http
                .post(&d.traces_url)
                .header("content-type", "application/x-protobuf")
                .body(Vec::new());
            for (k, v) in &d.headers {
                req = req.header(k, v);
            }
            out.push(match req.send().await {
                Ok(r) if r.status().is_success() => Check::new(
                    "traces otlp",
                    Status::Ok,
                    format!("{} accepts OTLP", d.traces_url),
                ),
                Ok(r) if r.status() == 401 || r.status() == 403 => Check::new(
                    "traces otlp",
                    Status::Fail,
                    format!(
                        "{} refuses the credentials ({}): {}",
                        d.traces_url,
                        r.status().as_u16(),
                        d.auth_fix
                    ),
                ),
                Ok(r) => Check::new(
                    "traces otlp",
                    Status::Fail,
                    format!("{} answers {}", d.traces_url, r.status().as_u16()),
                ),
                Err(e) => Check::new(
                    "traces otlp",
                    Status::Fail,
                    format!("{}: {}", d.traces_url, why(&e)),
                ),
            });
        }
    }
}

/// Alertmanager, when configured: answering its status API.
pub(super) async fn alertmanager(http: &reqwest::Client, c: &Config, out: &mut Vec<Check>) {
    // Alertmanager.
    match &c.settings.alerts.delivery.alertmanager_url {
        Some(am) => {
            let url = format!("{}/api/v2/status", am.trim_end_matches('/'));
            out.push(match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => {
                    Check::new("alertmanager", Status::Ok, format!("{am} answers"))
                }
                Ok(r) => Check::new(
                    "alertmanager",
                    Status::Fail,
                    format!("{url} answers {}", r.status().as_u16()),
                ),
                Err(e) => Check::new("alertmanager", Status::Fail, format!("{am}: {}", why(&e))),
            });
        }
        None => out.push(Check::new(
            "alertmanager",
            Status::Info,
            "not configured (alerts.alertmanager_url)",
        )),
    }
}

/// Prometheus, when asked: its targets of hypertool's job up.
pub(super) async fn prometheus(
    http: &reqwest::Client,
    target: &Target,
    cfg: Option<&Config>,
) -> Option<Check> {
    let prom = target.prometheus.as_ref()?;
    let job = cfg.map_or("hypertool".to_string(), |c| c.settings.alerts.job.clone());
    Some(match prometheus_targets(http, prom, &job).await {
        Ok(ts) if ts.is_empty() => Check::new("prometheus", Status::Fail, format!("{prom} has no target of job {job}: add deploy/prometheus/prometheus.yml's scrape job")),
        Ok(ts) => {
            let bad: Vec<_> = ts.iter().filter(|t| !t.up()).collect();
            if bad.is_empty() {
                Check::new("prometheus", Status::Ok, format!("{} target(s) of job {job} up", ts.len()))
            } else {
                Check::new("prometheus", Status::Fail, bad.iter().map(|t| format!("{} {}: {}", t.url, t.health, t.last_error)).collect::<Vec<_>>().join("; "))
            }
        }
        Err(e) => Check::new("prometheus", Status::Fail, format!("{prom}: {e}")),
    })
}
