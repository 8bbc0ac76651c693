//! The admin API: personas, budgets, health. Used by the CLI (`hypertool personas|budget`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use serde_json::json;

use super::AppState;
use crate::config::budgets::RawBudget;
use crate::core::budget::{BudgetMode, BudgetSource, BudgetSpec, BudgetState, Period};
use crate::core::clock::to_rfc3339;
use crate::core::event::{Event, Stamped};
use crate::core::persona::Persona;
use crate::store::writer::lock;
use crate::web::error::{ApiError, ErrorKind};

/// A persona's budget as the API and CLI show it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct BudgetStatus {
    pub persona: String,
    pub tokens: u64,
    pub used_tokens: u64,
    pub remaining_tokens: i64,
    pub cost_usd: Option<f64>,
    pub used_cost_usd: f64,
    pub remaining_cost_usd: Option<f64>,
    pub period: Period,
    pub period_start: Option<String>,
    pub resets_at: Option<String>,
    pub mode: BudgetMode,
    pub soft_limit: Option<f64>,
    pub source: String,
}

impl BudgetStatus {
    pub fn of(persona: &str, b: &BudgetState) -> Self {
        let source = match b.source {
            BudgetSource::Override => "override",
            BudgetSource::BudgetsFile => "budgets_file",
            BudgetSource::PersonaFile => "persona_file",
        };
        BudgetStatus {
            persona: persona.to_string(),
            tokens: b.spec.tokens,
            used_tokens: b.used_tokens(),
            remaining_tokens: b.remaining_tokens(),
            cost_usd: b.spec.cost_usd,
            used_cost_usd: b.used_cost(),
            remaining_cost_usd: b.remaining_cost(),
            period: b.spec.period,
            period_start: (b.spec.period != Period::None).then(|| to_rfc3339(b.period_start())),
            resets_at: b.resets_at().map(to_rfc3339),
            mode: b.spec.mode,
            soft_limit: b.spec.soft_limit,
            source: source.to_string(),
        }
    }
}

#[derive(Serialize)]
struct PersonaView<'a> {
    #[serde(flatten)]
    persona: &'a Persona,
    budget: Option<BudgetStatus>,
}

pub async fn list_personas(State(state): State<AppState>) -> impl IntoResponse {
    let now = state.clock.now_ms();
    let mut engine = lock(&state.engine);
    engine.tick(now);
    let personas: Vec<_> = engine
        .personas()
        .iter()
        .map(|p| PersonaView {
            persona: p,
            budget: engine
                .budgets()
                .get(&p.name)
                .map(|b| BudgetStatus::of(&p.name, b)),
        })
        .collect();
    Json(json!({ "personas": personas })).into_response()
}

pub async fn list_budgets(State(state): State<AppState>) -> Json<serde_json::Value> {
    let now = state.clock.now_ms();
    let mut engine = lock(&state.engine);
    engine.tick(now);
    let budgets: Vec<BudgetStatus> = engine
        .budgets()
        .iter()
        .map(|(p, b)| BudgetStatus::of(p, b))
        .collect();
    Json(json!({ "budgets": budgets }))
}

fn status_of(state: &AppState, persona: &str) -> Result<BudgetStatus, ApiError> {
    let now = state.clock.now_ms();
    let mut engine = lock(&state.engine);
    engine.tick(now);
    let Some(p) = engine.personas().get(persona).map(|p| p.name.clone()) else {
        return Err(unknown_persona(&engine, persona));
    };
    match engine.budgets().get(&p) {
        Some(b) => Ok(BudgetStatus::of(&p, b)),
        None => Err(ApiError::not_found(
            "no_budget",
            format!("persona `{p}` has no budget; set one with PUT /api/budgets/{p}"),
        )),
    }
}

fn unknown_persona(engine: &crate::core::engine::Engine, persona: &str) -> ApiError {
    ApiError::unknown_persona(engine, persona, ErrorKind::NotFound, "persona")
}

pub async fn get_budget(
    State(state): State<AppState>,
    Path(persona): Path<String>,
) -> Result<Json<BudgetStatus>, ApiError> {
    status_of(&state, &persona).map(Json)
}

/// A budget as the audit log keeps it (`None`: the persona has no budget).
fn budget_json(state: &AppState, persona: &str) -> Option<serde_json::Value> {
    status_of(state, persona).ok().map(|s| json!(s))
}

pub async fn put_budget(
    State(state): State<AppState>,
    caller: crate::web::auth::Caller,
    Path(persona): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BudgetStatus>, ApiError> {
    let body = body.map_err(|r| ApiError::from_body_rejection(r, state.max_body_bytes))?;
    let raw: RawBudget = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_budget",
            format!(
                "{e}; the body is {{\"tokens\": N, \"cost_usd\": X, \"period\": one of {}, \"mode\": one of {}}}",
                Period::NAMES,
                BudgetMode::NAMES
            ),
        )
    })?;
    raw.check()
        .map_err(|(field, m)| ApiError::bad_request("invalid_budget", m).param(field))?;
    if !raw.rate_limits().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_budget",
            "rate limits are set in budgets.yml (or on a gateway key), not by a budget override",
        )
        .param("requests_per_minute"));
    }
    let current: Option<BudgetSpec> = {
        let engine = lock(&state.engine);
        if engine.personas().get(&persona).is_none() {
            return Err(unknown_persona(&engine, &persona));
        }
        engine.budget(&persona).map(|b| b.spec)
    };
    let spec = raw.resolve(
        current.map(|c| c.period).unwrap_or_default(),
        current.map(|c| c.mode).unwrap_or_default(),
        current.and_then(|c| c.soft_limit),
    );
    let before = budget_json(&state, &persona);
    if !state
        .writer
        .set_override(persona.clone(), Some(spec))
        .await?
    {
        let engine = lock(&state.engine);
        return Err(unknown_persona(&engine, &persona));
    }
    tracing::info!(persona = %persona, tokens = spec.tokens, period = spec.period.as_str(),
        mode = spec.mode.as_str(), actor = %caller.actor(), "budget override set");
    let after = budget_json(&state, &persona);
    let entry = super::audit::entry(
        &state,
        caller.actor(),
        "budget.set",
        &persona,
        before,
        after,
    );
    super::audit::record(&state, entry).await;
    status_of(&state, &persona).map(Json)
}

pub async fn delete_budget_override(
    State(state): State<AppState>,
    caller: crate::web::auth::Caller,
    Path(persona): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let before = budget_json(&state, &persona);
    if !state.writer.set_override(persona.clone(), None).await? {
        let engine = lock(&state.engine);
        return Err(unknown_persona(&engine, &persona));
    }
    tracing::info!(persona = %persona, actor = %caller.actor(), "budget override removed");
    let after = budget_json(&state, &persona);
    let entry = super::audit::entry(
        &state,
        caller.actor(),
        "budget.remove",
        &persona,
        before,
        after,
    );
    super::audit::record(&state, entry).await;
    match status_of(&state, &persona) {
        Ok(s) => Ok(Json(json!(s))),
        Err(_) => Ok(Json(json!({"persona": persona, "budget": null}))),
    }
}

pub async fn reset_budget(
    State(state): State<AppState>,
    caller: crate::web::auth::Caller,
    Path(persona): Path<String>,
) -> Result<Json<BudgetStatus>, ApiError> {
    let canonical = {
        let engine = lock(&state.engine);
        match engine.personas().get(&persona) {
            Some(p) => p.name.clone(),
            None => return Err(unknown_persona(&engine, &persona)),
        }
    };
    let event = Stamped {
        at: state.clock.now_ms(),
        event: Event::BudgetReset {
            persona: canonical.clone(),
        },
    };
    // The reset and its audit entry in one append: neither is stored without the other.
    let before = budget_json(&state, &canonical);
    // What the status will say once the reset is applied: nothing used, everything left.
    let after = before.clone().map(|mut b| {
        b["used_tokens"] = json!(0);
        b["remaining_tokens"] = b["tokens"].clone();
        b["used_cost_usd"] = json!(0.0);
        b["remaining_cost_usd"] = b["cost_usd"].clone();
        b
    });
    let entry = super::audit::entry(
        &state,
        caller.actor(),
        "budget.reset",
        &canonical,
        before,
        after,
    );
    state.writer.append(vec![event, entry]).await?;
    tracing::info!(persona = %canonical, actor = %caller.actor(), "budget reset for the current period");
    status_of(&state, &canonical).map(Json)
}

/// Who the key is: its role and, for a persona key, its persona (canonical) — so a client such as
/// `hypertool mcp --server` can start as the key's persona without being told twice.
pub async fn whoami(
    State(state): State<AppState>,
    caller: crate::web::auth::Caller,
) -> Json<serde_json::Value> {
    let mut body = json!({"role": caller.role()});
    if let Some(key) = caller.persona_key() {
        body["persona"] = json!(state.door.canonical(&key.persona));
    }
    Json(body)
}

/// `GET /api/server` (viewer, admin): where this server listens (the addresses it is bound to,
/// which the configuration file may not say: `--listen`, `--metrics-listen`), its version, and its
/// ledger's kind. `hypertool doctor --server` finds the metrics listener here.
pub async fn server_info(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "api_listen": state.api_addr.to_string(),
        "metrics_listen": state.metrics_addr.to_string(),
        "started": crate::core::clock::to_rfc3339(state.started_ms),
        "ledger": if state.writer.shared { "postgresql" } else { "sqlite" },
    }))
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
    } else if let Some((since, error)) = state.writer.health.outage() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "ledger_unavailable",
                "reason": error,
                "since": crate::core::clock::to_rfc3339(since),
            })),
        )
    } else if state.writer.health.failing() {
        // on_outage = "buffer": still serving, from memory.
        (
            StatusCode::OK,
            Json(json!({
                "status": "ready",
                "ledger": "buffering",
                "held_events": state.writer.health.held(),
            })),
        )
    } else {
        let mut body = json!({"status": "ready"});
        // The MCP proxy's downstream servers: named with their state only (this route is public;
        // their errors are in `hypertool doctor` and the log). A server down does not make the
        // gateway unready: it is being restarted.
        let servers = state.mcp.proxy.downstreams.health();
        if !servers.is_empty() {
            body["mcp_servers"] = servers
                .iter()
                .map(|h| (h.name.clone(), json!(h.status)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        (StatusCode::OK, Json(body))
    }
}

pub async fn list_alerts(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(super::lock_alerts(&state.alerts).view())
}

/// The operator runbook the alerts link to: HTML with anchors for browsers (the alerts' links jump
/// to their sections), the markdown source for `Accept: text/markdown` or `?format=markdown`.
pub async fn runbook(
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> impl IntoResponse {
    let wants_markdown = query.as_deref().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "format=markdown" || kv == "format=md")
    }) || headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.starts_with("text/markdown"));
    if wants_markdown {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/markdown; charset=utf-8",
            )],
            crate::runbook::TEXT,
        )
            .into_response()
    } else {
        (
            [
                (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (
                    axum::http::header::CONTENT_SECURITY_POLICY,
                    super::dashboard::content_security_policy(),
                ),
            ],
            crate::runbook::html(),
        )
            .into_response()
    }
}
