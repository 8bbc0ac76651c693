//! Persona switching with a policy, capability routing, and the session view.
//!
//! ```text
//! POST /v1/personas/switch  {"session", "to", "chatmode"?}   → the persona in force
//! POST /v1/personas/route   {"task", "session"?}             → who should handle the task
//! GET  /api/sessions/{session}                               → persona, history, time in persona
//! GET  /api/oscillations                                     → recent A→B→A→B sessions
//! ```
//!
//! A switch inside the chatmode's cooldown keeps the current persona, answers so, and is recorded
//! (`switch_suppressed` event, `hypertool_persona_switches_suppressed_total`). A switch that
//! completes A→B→A→B within the oscillation window is flagged (and refused when
//! `switching.oscillation_action = "suppress"`).

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::core::clock::to_rfc3339;
use crate::core::labels::NameField;
use crate::core::routing;
use crate::store::writer::lock;
use crate::web::auth::Caller;
use crate::web::error::{ApiError, ErrorKind};
use crate::web::json::{BodyShape, JsonBody};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchRequest {
    session: String,
    to: String,
    chatmode: Option<String>,
}

impl BodyShape for SwitchRequest {
    const SHAPE: &'static str = "{\"session\": \"…\", \"to\": \"persona\", \"chatmode\"?: \"…\"}";
}

fn check_session(session: &str) -> Result<(), ApiError> {
    ApiError::name(NameField::Session, "session", session).map(|_| ())
}

pub async fn switch(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<SwitchRequest>,
) -> Result<Json<Value>, ApiError> {
    check_session(&req.session)?;
    ApiError::name(NameField::Persona, "to", &req.to)?;
    if let Some(c) = &req.chatmode {
        ApiError::name(NameField::Chatmode, "chatmode", c)?;
    }
    // A persona key announces only its own persona taking over a session.
    state
        .door
        .require_own(&caller, "to", "a switch", Some(&req.to))?;
    // ... and only in a session its own persona is in (or a new one): a backend-engineer key may
    // not take over a devops-engineer's session.
    if matches!(caller, Caller::Persona(_)) {
        let current = lock(&state.engine).session(&req.session).map(|v| v.persona);
        if let Some(current) = current {
            state
                .door
                .require_own(&caller, "session", "the session", Some(&current))?;
        }
    }
    let to = {
        let engine = lock(&state.engine);
        match engine.personas().get(&req.to) {
            Some(p) => p.name.clone(),
            None => {
                let status = ErrorKind::InvalidRequest;
                return Err(ApiError::unknown_persona(&engine, &req.to, status, "to"));
            }
        }
    };
    let chatmode = req
        .chatmode
        .unwrap_or_else(|| state.gateway.settings().default_chatmode.clone());
    let answer = state
        .switchboard()
        .switch(&req.session, &to, &chatmode)
        .await?;
    // A switch an admin made (not the agent's own) is an operator's change: audited.
    if matches!(caller, Caller::Admin { .. }) && answer["switched"] == true {
        let entry = super::audit::entry(
            &state,
            caller.actor(),
            "persona.switch",
            &req.session,
            Some(json!({"persona": answer["from"]})),
            Some(json!({"persona": answer["persona"], "chatmode": answer["chatmode"]})),
        );
        super::audit::record(&state, entry).await;
    }
    Ok(Json(answer))
}

/// The longest task description routed (the router scores words; a task is a sentence or two).
const MAX_TASK_BYTES: usize = 16 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRequest {
    task: String,
    session: Option<String>,
}

impl BodyShape for RouteRequest {
    const SHAPE: &'static str = "{\"task\": \"what needs doing\", \"session\"?: \"…\"}";
}

pub async fn route(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<RouteRequest>,
) -> Result<Json<Value>, ApiError> {
    if req.task.len() > MAX_TASK_BYTES {
        return Err(ApiError::bad_request(
            "invalid_task",
            format!(
                "task is {} bytes long; at most {MAX_TASK_BYTES} are accepted (describe the work, not its material)",
                req.task.len()
            ),
        )
        .param("task"));
    }
    if req.task.trim().is_empty() {
        return Err(
            ApiError::bad_request("invalid_task", "task must describe the work to route")
                .param("task"),
        );
    }
    if let Some(s) = &req.session {
        check_session(s)?;
    }
    let now = state.clock.now_ms();
    let engine = lock(&state.engine);
    let current = req
        .session
        .as_deref()
        .and_then(|s| engine.session(s))
        .filter(|v| now - v.last_activity <= engine.config().session_idle_timeout_ms)
        .map(|v| v.persona);
    let decision = routing::route(engine.personas(), current.as_deref(), &req.task);
    Ok(Json(json!({
        "session": req.session,
        "current": current,
        "persona": decision.persona,
        "keep": decision.keep,
        "reason": decision.reason,
        "scores": decision.scores,
    })))
}

pub async fn get_session(
    State(state): State<AppState>,
    Path(session): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let now = state.clock.now_ms();
    let engine = lock(&state.engine);
    let Some(view) = engine.session(&session) else {
        return Err(ApiError::not_found(
            "unknown_session",
            format!("no open session `{session}` (sessions close after the idle timeout)"),
        ));
    };
    Ok(Json(json!({
        "session": session,
        "persona": view.persona,
        "chatmode": view.chatmode,
        "in_persona_since": to_rfc3339(view.since),
        "seconds_in_persona": (now - view.since).max(0) as f64 / 1000.0,
        "last_activity": to_rfc3339(view.last_activity),
        "last_switch": view.last_switch.map(to_rfc3339),
        "history": view.history.iter().map(|(p, at)| json!({"persona": p, "at": to_rfc3339(*at)})).collect::<Vec<_>>(),
    })))
}

pub async fn list_oscillations(State(state): State<AppState>) -> Json<Value> {
    let engine = lock(&state.engine);
    let data: Vec<Value> = engine
        .oscillation_notices()
        .rev()
        .map(|o| {
            json!({
                "at": to_rfc3339(o.at),
                "session": o.session,
                "chatmode": o.chatmode,
                "personas": o.personas,
            })
        })
        .collect();
    Json(json!({ "data": data }))
}
