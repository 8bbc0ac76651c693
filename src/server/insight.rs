//! What the operator asks of the ledger: the runbook's investigations
//! (`GET /api/investigations/{alert}`), the quality-gate history (`GET /api/quality-gates/history`),
//! budget suggestions from usage history (`GET /api/budgets/suggestions`), and the record of gate
//! configuration changes those read.

use std::collections::BTreeMap;
use std::sync::Mutex;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{lock, lock_alerts, AppState};
use crate::alerts::rules::AlertId;
use crate::core::clock::{to_rfc3339, UnixMillis};
use crate::core::duration::PromDuration;
use crate::core::event::{Event, Stamped};
use crate::core::workflow::Workflows;
use crate::runbook::investigate::{self, BudgetView, Evidence, LangfuseView, StageView, TestCall};
use crate::store::reader::{EventQuery, Found, LedgerReader};
use crate::web::error::ApiError;

/// The most events one investigation or history request reads.
pub const MAX_EVENTS: usize = 200_000;
/// The longest window an investigation looks at.
const MAX_WINDOW_MS: i64 = 7 * 86_400_000;
const GATE_HISTORY_DAYS_MS: i64 = 7 * 86_400_000;

/// Each stage's gate as `GET /v1/workflows` shows it, by (workflow, stage).
pub type GateMap = BTreeMap<(String, String), Option<Value>>;

/// What of each stage is watched for edits, and the event an edit becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// Its quality gate (`gate_changed`).
    Gate,
    /// Its variants and their prompts' versions (`variants_changed`).
    Variants,
}

impl Watched {
    fn kind(self) -> &'static str {
        match self {
            Watched::Gate => "gate_changed",
            Watched::Variants => "variants_changed",
        }
    }

    /// Each stage's watched part, as `GET /v1/workflows` shows it.
    fn of(self, workflows: &Workflows) -> GateMap {
        workflows
            .workflows
            .values()
            .flat_map(|w| {
                w.stages.iter().map(move |s| {
                    let value = match self {
                        Watched::Gate => s.gate.as_ref().map(super::workflows::gate_json),
                        Watched::Variants => super::workflows::variants_json(s),
                    };
                    ((w.name.clone(), s.name.clone()), value)
                })
            })
            .collect()
    }

    fn event(
        self,
        workflow: String,
        stage: String,
        before: Option<Value>,
        after: Option<Value>,
    ) -> Event {
        match self {
            Watched::Gate => Event::GateChanged {
                workflow,
                stage,
                before,
                after,
            },
            Watched::Variants => Event::VariantsChanged {
                workflow,
                stage,
                before,
                after,
            },
        }
    }

    fn changes(self, before: &GateMap, after: &GateMap, at: UnixMillis) -> Vec<Stamped> {
        let mut keys: Vec<&(String, String)> = before.keys().chain(after.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| {
                let (b, a) = (
                    before.get(k).cloned().flatten(),
                    after.get(k).cloned().flatten(),
                );
                (b != a).then(|| Stamped {
                    at,
                    event: self.event(k.0.clone(), k.1.clone(), b, a),
                })
            })
            .collect()
    }
}

/// What the ledger last recorded of each stage's watched part.
pub fn recorded(
    reader: &LedgerReader,
    watched: Watched,
) -> Result<GateMap, crate::store::LedgerError> {
    let found = reader.events(&EventQuery {
        from_ms: i64::MIN,
        to_ms: i64::MAX,
        kinds: vec![watched.kind()],
        limit: MAX_EVENTS,
    })?;
    let mut map = GateMap::new();
    for s in found.events {
        match s.event {
            Event::GateChanged {
                workflow,
                stage,
                after,
                ..
            }
            | Event::VariantsChanged {
                workflow,
                stage,
                after,
                ..
            } => {
                map.insert((workflow, stage), after);
            }
            _ => {}
        }
    }
    Ok(map)
}

/// The watched part of every stage in force, to compare reloads against.
pub struct Baseline {
    watched: Watched,
    map: Mutex<GateMap>,
}

impl Baseline {
    /// At start: the configuration in force becomes the baseline; stages the ledger last
    /// recorded differently (changed while hypertool was down) give the events to store.
    pub fn start(
        watched: Watched,
        workflows: &Workflows,
        recorded: &GateMap,
        at: UnixMillis,
    ) -> (Self, Vec<Stamped>) {
        let current = watched.of(workflows);
        let relevant: GateMap = current
            .iter()
            .filter(|(k, _)| recorded.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // A recorded stage that no longer exists lost what was watched.
        let mut now = relevant;
        for k in recorded.keys() {
            now.entry(k.clone()).or_insert(None);
        }
        let events = watched.changes(recorded, &now, at);
        (
            Baseline {
                watched,
                map: Mutex::new(current),
            },
            events,
        )
    }

    /// At a reload: the changes since the last configuration, which becomes the baseline.
    pub fn reload(&self, workflows: &Workflows, at: UnixMillis) -> Vec<Stamped> {
        let current = self.watched.of(workflows);
        let mut base = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let events = self.watched.changes(&base, &current, at);
        *base = current;
        events
    }
}

/// `since`/`until`: a duration back from now (`30m`, `1h`, `7d`), an RFC 3339 time, or Unix
/// milliseconds.
fn point_in_time(text: &str, now: UnixMillis, param: &'static str) -> Result<UnixMillis, ApiError> {
    if let Ok(d) = PromDuration::parse(text) {
        return Ok(now - d.ms());
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    text.parse::<i64>().map_err(|_| {
        ApiError::bad_request(
            "invalid_time",
            format!(
                "`{param}` = {text:?} is not a time: use a duration back from now (30m, 1h, 7d), an RFC 3339 time, or Unix milliseconds"
            ),
        )
        .param(param)
    })
}

/// A query's `since`/`until` (durations back from `now`, RFC 3339 or Unix ms): `since` defaults
/// to `default_ms` ago, `until` to now (inclusive).
pub(super) fn period(
    since: Option<&str>,
    until: Option<&str>,
    now: UnixMillis,
    default_ms: i64,
) -> Result<(UnixMillis, UnixMillis), ApiError> {
    let since = match since {
        Some(s) => point_in_time(s, now, "since")?,
        None => now - default_ms,
    };
    let until = match until {
        Some(s) => point_in_time(s, now, "until")?,
        None => now + 1,
    };
    Ok((since, until))
}

/// A query's `limit`: `default` when absent, refused outside 1..=`max`.
pub(super) fn limit_of(
    limit: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    if limit == 0 || limit > max {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("`limit` = {limit}: use 1 to {max}"),
        )
        .param("limit"));
    }
    Ok(limit)
}

pub(super) async fn read(state: &AppState, query: EventQuery) -> Result<Found, ApiError> {
    let reader = state.reader.clone();
    tokio::task::spawn_blocking(move || reader.events(&query))
        .await
        .map_err(|e| ApiError::unavailable(format!("ledger read failed: {e}")))?
        .map_err(|e| ApiError::unavailable(format!("cannot read the ledger: {e}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    workflow: Option<String>,
    stage: Option<String>,
    since: Option<String>,
    until: Option<String>,
    result: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/quality-gates/history?workflow=&stage=&since=&until=&result=&limit=`: the verdicts,
/// newest last, with failure rates by stage and the failed criteria counted.
pub async fn gate_history(
    State(state): State<AppState>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!(
                "{e}; the parameters are workflow, stage, since, until, result (pass|fail), limit"
            ),
        )
    })?;
    let now = state.clock.now_ms();
    let (since, until) = period(q.since.as_deref(), q.until.as_deref(), now, 86_400_000)?;
    let result = match q.result.as_deref() {
        None => None,
        Some(r @ ("pass" | "fail")) => Some(r.to_string()),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_result",
                format!("`result` = {other:?}: use pass or fail"),
            )
            .param("result"))
        }
    };
    let limit = limit_of(q.limit, 500, 10_000)?;
    let found = read(
        &state,
        EventQuery {
            from_ms: since,
            to_ms: until,
            kinds: vec!["quality_gate", "stage"],
            limit: MAX_EVENTS,
        },
    )
    .await?;
    let mut verdicts: Vec<investigate::Verdict> = investigate::verdicts(&found.events)
        .into_iter()
        .filter(|v| q.workflow.as_ref().is_none_or(|w| &v.workflow == w))
        .filter(|v| q.stage.as_ref().is_none_or(|s| &v.stage == s))
        .collect();
    let (by_stage, criteria) = investigate::tally(&verdicts);
    if let Some(r) = &result {
        verdicts.retain(|v| v.result == r);
    }
    let truncated = found.truncated || verdicts.len() > limit;
    let skip = verdicts.len().saturating_sub(limit);
    let shown: Vec<_> = verdicts.into_iter().skip(skip).collect();
    let mut criteria: Vec<(String, u64)> = criteria.into_iter().collect();
    criteria.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(Json(json!({
        "since": to_rfc3339(since),
        "until": to_rfc3339(until.min(now)),
        "stages": by_stage.iter().map(|((w, s), (n, f))| json!({
            "workflow": w, "stage": s, "verdicts": n, "failed": f,
            "failure_rate": *f as f64 / *n as f64,
        })).collect::<Vec<_>>(),
        "failed_criteria": criteria.iter().map(|(c, n)| json!({"criterion": c, "failures": n})).collect::<Vec<_>>(),
        "verdicts": shown,
        "truncated": truncated,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvestigationQuery {
    window: Option<String>,
}

/// `GET /api/investigations/{alert}?window=1h`: the runbook's investigation of one alert, run on
/// the ledger and the server's state.
pub async fn investigation(
    State(state): State<AppState>,
    Path(alert): Path<String>,
    query: Result<Query<InvestigationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("{e}; the one parameter is window (e.g. 1h)"),
        )
    })?;
    let Some(id) = AlertId::from_name(&alert) else {
        let names: Vec<&str> = AlertId::ALL.iter().map(|a| a.name()).collect();
        return Err(ApiError::not_found(
            "unknown_alert",
            format!("no alert `{alert}`; use one of {}", names.join(", ")),
        ));
    };
    let window_ms = match q.window.as_deref() {
        None => 3_600_000,
        Some(w) => match PromDuration::parse(w) {
            Ok(d) if d.ms() >= 60_000 && d.ms() <= MAX_WINDOW_MS => d.ms(),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_window",
                    format!("`window` = {w:?}: use a duration from 1m to 7d, e.g. 1h"),
                )
                .param("window"))
            }
        },
    };
    let evidence = gather(&state, id, window_ms).await?;
    let report = investigate::investigate(id, &evidence);
    Ok(Json(serde_json::to_value(report).unwrap_or(Value::Null)))
}

fn kinds_for(id: AlertId) -> Vec<&'static str> {
    match id {
        AlertId::HighQualityGateFailureRate => vec!["quality_gate", "stage"],
        AlertId::ExcessivePersonaSwitching => {
            vec![
                "persona_switch",
                "usage",
                "switch_suppressed",
                "stage_started",
            ]
        }
        AlertId::SlowWorkflowStage => vec!["usage", "stage", "quality_gate"],
        AlertId::HypertoolMetricsNotReported | AlertId::LangfuseIntegrationFailing => Vec::new(),
        _ => vec!["usage"],
    }
}

async fn gather(state: &AppState, id: AlertId, window_ms: i64) -> Result<Evidence, ApiError> {
    let now = state.clock.now_ms();
    let kinds = kinds_for(id);
    let found = if kinds.is_empty() {
        Found::default()
    } else {
        read(
            state,
            EventQuery {
                from_ms: now - 2 * window_ms,
                to_ms: now + 1,
                kinds,
                limit: MAX_EVENTS,
            },
        )
        .await?
    };
    let gate_changes = if id == AlertId::HighQualityGateFailureRate {
        read(
            state,
            EventQuery {
                from_ms: now - GATE_HISTORY_DAYS_MS,
                to_ms: now + 1,
                kinds: vec!["gate_changed"],
                limit: 10_000,
            },
        )
        .await?
        .events
    } else {
        Vec::new()
    };
    let settings = state.gateway.settings();
    let workflows = state.gateway.workflows();
    let mut ev = Evidence {
        now,
        window_ms,
        truncated: found.truncated,
        gate_changes,
        chatmodes: workflows.chatmodes.keys().cloned().collect(),
        cache_enabled: settings.cache.enabled,
        ..Evidence::default()
    };
    ev.stages = workflows
        .workflows
        .values()
        .flat_map(|w| {
            w.stages.iter().map(|s| StageView {
                workflow: w.name.clone(),
                stage: s.name.clone(),
                persona: s.persona.clone(),
                model: s
                    .model
                    .as_ref()
                    .and_then(|m| settings.resolve_choice(m))
                    .map(|r| r.name.clone()),
                escalation_model: s
                    .escalation_model
                    .as_ref()
                    .and_then(|m| settings.resolve_choice(m))
                    .map(|r| r.name.clone()),
            })
        })
        .collect();
    ev.experiments = super::experiments::reports(state);
    {
        let alerts = lock_alerts(&state.alerts);
        let rule = |a: AlertId| alerts.settings().rule(a).map(|r| r.threshold);
        ev.gate_threshold = rule(AlertId::HighQualityGateFailureRate).unwrap_or(0.2);
        ev.slow_threshold_seconds = rule(AlertId::SlowWorkflowStage).unwrap_or(300.0);
        ev.switch_threshold = rule(AlertId::ExcessivePersonaSwitching).unwrap_or(2.0);
    }
    {
        let mut engine = lock(&state.engine);
        engine.tick(now);
        let personas = engine.personas();
        ev.events = found
            .events
            .into_iter()
            .map(|mut s| {
                // As the engine counts them: aliases under their persona.
                if let Event::Usage(u) = &mut s.event {
                    u.persona = personas.canonical(&u.persona).to_string();
                }
                s
            })
            .collect();
        ev.budgets = engine
            .budgets()
            .iter()
            .map(|(p, b)| {
                let mut previous = Vec::new();
                let mut start = b.period_start();
                if b.spec.period != crate::core::budget::Period::None {
                    for _ in 0..7 {
                        let earlier = b.spec.period.start_of(start - 1);
                        previous.push(b.usage_between(earlier, start));
                        start = earlier;
                    }
                }
                BudgetView {
                    persona: p.clone(),
                    limit: b.spec.tokens,
                    used: b.used_tokens(),
                    remaining: b.remaining_tokens(),
                    soft_limit: b.soft_limit_tokens(),
                    period: b.spec.period.as_str(),
                    mode: b.spec.mode.as_str(),
                    resets_at: b.resets_at(),
                    previous_periods: previous,
                }
            })
            .collect();
        ev.runs = engine.runs().iter().cloned().collect();
        ev.oscillations = engine
            .oscillation_notices()
            .map(|o| {
                (
                    o.at,
                    o.session.clone(),
                    o.chatmode.clone(),
                    o.personas.clone(),
                )
            })
            .collect();
    }
    if id == AlertId::LangfuseIntegrationFailing {
        ev.langfuse = Some(langfuse_view(state).await);
    }
    Ok(ev)
}

async fn langfuse_view(state: &AppState) -> LangfuseView {
    let settings = &state.langfuse;
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let (pk, sk) = (var(&settings.public_key_env), var(&settings.secret_key_env));
    let host = var("LANGFUSE_HOST").unwrap_or_else(|| settings.host.clone());
    let enabled = lock_alerts(&state.alerts).langfuse().expected();
    let test_call = match (&pk, &sk) {
        (Some(pk), Some(sk)) => langfuse_test_call(&state.http, &host, pk, sk).await,
        _ => TestCall::NotTried {
            why: "a key variable is not set".into(),
        },
    };
    let stats = state.tracer.langfuse();
    let exports = stats
        .as_ref()
        .map(|s| {
            s.results()
                .into_iter()
                .map(|(r, n)| (r.to_string(), n))
                .collect()
        })
        .unwrap_or_default();
    let last_error = stats.as_ref().and_then(|s| s.trouble()).map(|t| match t {
        crate::telemetry::trace::export::Trouble::AuthRefused(code) => {
            format!("refused the keys (HTTP {code})")
        }
        crate::telemetry::trace::export::Trouble::Unreachable(why) => why,
    });
    use std::sync::atomic::Ordering::Relaxed;
    LangfuseView {
        enabled,
        host,
        public_key_env: settings.public_key_env.clone(),
        public_key_set: pk.is_some(),
        secret_key_env: settings.secret_key_env.clone(),
        secret_key_set: sk.is_some(),
        test_call,
        spool_bytes: stats.as_ref().map_or(0, |s| s.spool_bytes.load(Relaxed)),
        exports,
        last_error,
        last_success_ms: stats
            .as_ref()
            .map(|s| s.last_success_ms.load(Relaxed))
            .filter(|ms| *ms > 0),
        traces_accepted: stats
            .as_ref()
            .map_or(0, |s| s.traces_accepted.load(Relaxed)),
    }
}

/// One authenticated call to Langfuse's public API (the project the keys belong to); 5 s at most.
/// The keys go in the request only; errors are described without them.
pub async fn langfuse_test_call(
    http: &reqwest::Client,
    host: &str,
    public_key: &str,
    secret_key: &str,
) -> TestCall {
    let url = format!("{}/api/public/projects", host.trim_end_matches('/'));
    let resp = http
        .get(&url)
        .basic_auth(public_key, Some(secret_key))
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => TestCall::Accepted,
        Ok(r) => TestCall::Refused {
            status: r.status().as_u16(),
        },
        Err(e) => TestCall::Unreachable {
            error: crate::core::text::error_chain(&e)
                .replace(public_key, "***")
                .replace(secret_key, "***"),
        },
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuggestQuery {
    days: Option<u32>,
}

/// `GET /api/budgets/suggestions?days=30`: the runbook's method — p95 of daily usage per persona
/// over the ledger's history (the last `days` days, default all up to 90) plus 20 % — beside the
/// budget in force.
pub async fn budget_suggestions(
    State(state): State<AppState>,
    query: Result<Query<SuggestQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request("invalid_query", format!("{e}; the one parameter is days"))
    })?;
    let days = q.days.unwrap_or(90);
    if !(1..=366).contains(&days) {
        return Err(ApiError::bad_request(
            "invalid_days",
            format!("`days` = {days}: use 1 to 366"),
        )
        .param("days"));
    }
    let reader = state.reader.clone();
    let rows = tokio::task::spawn_blocking(move || reader.daily_tokens())
        .await
        .map_err(|e| ApiError::unavailable(format!("ledger read failed: {e}")))?
        .map_err(|e| ApiError::unavailable(format!("cannot read the ledger: {e}")))?;
    let now = state.clock.now_ms();
    let today = now.div_euclid(86_400_000) * 86_400_000;
    let from = today - i64::from(days) * 86_400_000;
    let engine = lock(&state.engine);
    let personas = engine.personas();
    // Days with usage, per canonical persona; today (not over yet) is left out.
    let mut daily: BTreeMap<String, BTreeMap<i64, u64>> = BTreeMap::new();
    for r in rows
        .into_iter()
        .filter(|r| r.day_ms >= from && r.day_ms < today)
    {
        *daily
            .entry(personas.canonical(&r.persona).to_string())
            .or_default()
            .entry(r.day_ms)
            .or_default() += r.tokens;
    }
    let suggestions: Vec<Value> = daily
        .iter()
        .map(|(persona, days_used)| {
            let first = days_used.keys().next().copied().unwrap_or(today);
            // Days without usage count as zero from the persona's first day on.
            let span = ((today - first) / 86_400_000).max(1) as usize;
            let mut values: Vec<u64> = days_used.values().copied().collect();
            values.resize(span.max(values.len()), 0);
            values.sort_unstable();
            let p95 = values[((values.len() as f64 - 1.0) * 0.95).round() as usize];
            let suggested = (p95 as f64 * 1.2).ceil() as u64;
            let current = engine.budgets().get(persona);
            json!({
                "persona": persona,
                "days": values.len(),
                "p95_daily_tokens": p95,
                "suggested_daily_tokens": suggested,
                "current_tokens": current.map(|b| b.spec.tokens),
                "current_period": current.map(|b| b.spec.period.as_str()),
                "source": current.map(|b| serde_json::to_value(b.source).unwrap_or(Value::Null)),
            })
        })
        .collect();
    Ok(Json(json!({
        "method": "p95 of daily usage (UTC days before today) + 20 %",
        "days": days,
        "suggestions": suggestions,
    })))
}
