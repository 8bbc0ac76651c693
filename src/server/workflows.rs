//! The workflow API: workflows as configured, runs and their stages, and quality-gate evaluation
//! for agents that call their LLM themselves.
//!
//! ```text
//! GET  /v1/workflows                                         every workflow, stages resolved
//! GET  /v1/workflows/{workflow}
//! POST /v1/workflows/{workflow}/runs                         {"session"?}           → 201 run
//! GET  /v1/workflows/{workflow}/runs?status=running
//! GET  /v1/workflows/{workflow}/runs/{run}
//! POST /v1/workflows/{workflow}/runs/{run}/stages/{stage}/start   {"persona"?}
//! POST /v1/workflows/{workflow}/runs/{run}/stages/{stage}/finish  {"gate"?, "model"?, "reasons"?}
//! POST /v1/workflows/{workflow}/runs/{run}/finish            {"status"?: completed|failed|cancelled}
//! POST /v1/quality-gates/evaluate                            {"workflow","stage","text",…}
//! ```
//!
//! Every change is a ledger event (acknowledged once stored), so runs survive a restart.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::config::gateway::GatewaySettings;
use crate::core::clock::to_rfc3339;
use crate::core::event::{Event, GateResult, GateVerdictEvent, Stamped};
use crate::core::labels::NameField;
use crate::core::runs::{Run, RunStatus, StageStatus};
use crate::core::workflow::{CodeBlock, ModelChoice, QualityGate, Stage, Workflow};
use crate::gateway::tokens;
use crate::store::writer::lock;
use crate::web::auth::Caller;
use crate::web::error::{ApiError, ErrorKind};
use crate::web::json::{BodyShape, JsonBody};

fn unknown_workflow(state: &AppState, name: &str) -> ApiError {
    let known: Vec<String> = state
        .gateway
        .workflows()
        .workflows
        .keys()
        .cloned()
        .collect();
    ApiError::not_found(
        "unknown_workflow",
        format!(
            "unknown workflow `{name}`; configured workflows: {} (see [workflows] dir in hypertool.toml)",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        ),
    )
    .param("workflow")
}

pub use crate::gateway::stage::unknown_stage;

pub fn workflow_named(state: &AppState, name: &str) -> Result<Arc<Workflow>, ApiError> {
    state
        .gateway
        .workflows()
        .get(name)
        .cloned()
        .ok_or_else(|| unknown_workflow(state, name))
}

/// The run, checked to belong to `workflow`.
pub async fn run_of(state: &AppState, workflow: &str, run: &str) -> Result<Run, ApiError> {
    with_run(state, workflow, run, Run::clone).await
}

/// Reads the run, checked to belong to `workflow` (see [`crate::gateway::stage::with_run`]).
pub async fn with_run<T>(
    state: &AppState,
    workflow: &str,
    run: &str,
    read: impl FnOnce(&Run) -> T,
) -> Result<T, ApiError> {
    crate::gateway::stage::learn_run(&state.writer, &state.engine, run).await;
    crate::gateway::stage::with_run(&state.engine, workflow, run, read)
}

fn conflict(code: &'static str, message: String) -> ApiError {
    ApiError::new(ErrorKind::Conflict, code, message)
}

fn choice_json(settings: &GatewaySettings, choice: &Option<ModelChoice>) -> (Value, Value) {
    match choice {
        None => (Value::Null, Value::Null),
        Some(c) => (
            json!(c.to_string()),
            settings
                .resolve_choice(c)
                .map(|r| json!(r.name))
                .unwrap_or(Value::Null),
        ),
    }
}

/// A stage's variants and allocation as `GET /v1/workflows` shows them (`None`: no variants).
pub fn variants_json(s: &Stage) -> Option<Value> {
    if s.variants.is_empty() {
        return None;
    }
    let variants: Vec<Value> = s
        .variants
        .iter()
        .map(|v| {
            json!({
                "name": v.name,
                "model": v.model.as_ref().map(|m| m.to_string()),
                "prompt": v.prompt.as_ref().map(|p| p.name.clone()),
                "prompt_version": v.prompt.as_ref().map(|p| p.version.clone()),
                "temperature": v.temperature,
                "weight": v.weight,
            })
        })
        .collect();
    let allocation = match s.allocation {
        crate::core::workflow::Allocation::Weights => json!("weights"),
        crate::core::workflow::Allocation::Adaptive { objective, floor } => json!({
            "adaptive": {
                "objective": match objective {
                    crate::core::workflow::Objective::PassRate => "pass_rate",
                    crate::core::workflow::Objective::PassPerDollar => "pass_per_dollar",
                },
                "floor": floor,
            }
        }),
    };
    Some(json!({"variants": variants, "allocation": allocation}))
}

pub fn gate_json(g: &QualityGate) -> Value {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: Value| {
        if !v.is_null() {
            m.insert(k.to_string(), v);
        }
    };
    put("min_lines", json!(g.min_lines));
    put("max_lines", json!(g.max_lines));
    if !g.required_sections.is_empty() {
        put("required_sections", json!(g.required_sections));
    }
    if !g.must_match.is_empty() {
        put(
            "must_match",
            json!(g.must_match.iter().map(|p| &p.source).collect::<Vec<_>>()),
        );
    }
    if !g.must_not_match.is_empty() {
        put(
            "must_not_match",
            json!(g
                .must_not_match
                .iter()
                .map(|p| &p.source)
                .collect::<Vec<_>>()),
        );
    }
    put(
        "code_block",
        match &g.code_block {
            None => Value::Null,
            Some(CodeBlock::Any) => json!(true),
            Some(CodeBlock::Language(l)) => json!(l),
        },
    );
    put(
        "json_schema",
        g.json_schema
            .as_ref()
            .map(|s| s.source.clone())
            .unwrap_or(Value::Null),
    );
    put("max_completion_tokens", json!(g.max_completion_tokens));
    Value::Object(m)
}

fn stage_json(settings: &GatewaySettings, s: &Stage) -> Value {
    let (model, resolved) = choice_json(settings, &s.model);
    let (escalation, escalation_resolved) = choice_json(settings, &s.escalation_model);
    json!({
        "name": s.name,
        "persona": s.persona,
        "model": model,
        "resolved_model": resolved,
        "budget_tokens": s.budget_tokens,
        "retries": s.retries,
        "escalation_model": escalation,
        "resolved_escalation_model": escalation_resolved,
        "max_prompt_tokens": s.max_prompt_tokens,
        "quality_gate": s.gate.as_ref().map(gate_json),
        "experiment": variants_json(s),
    })
}

fn workflow_json(state: &AppState, w: &Workflow) -> Value {
    let settings = state.gateway.settings();
    let names: Vec<String> = state
        .gateway
        .workflows()
        .chatmodes
        .iter()
        .filter(|(_, c)| c.workflow.as_deref() == Some(w.name.as_str()))
        .map(|(n, _)| n.clone())
        .collect();
    json!({
        "name": w.name,
        "description": w.description,
        "chatmodes": names,
        "stages": w.stages.iter().map(|s| stage_json(&settings, s)).collect::<Vec<_>>(),
    })
}

pub fn run_json(run: &Run) -> Value {
    let stages: serde_json::Map<String, Value> = run
        .stages
        .iter()
        .map(|(name, s)| {
            (
                name.clone(),
                json!({
                    "status": s.status,
                    "persona": s.persona,
                    "started_at": to_rfc3339(s.started_at),
                    "finished_at": s.finished_at.map(to_rfc3339),
                    "duration_seconds": s.duration_seconds,
                    "attempts": s.attempts,
                    "gate_passes": s.gate_passes,
                    "gate_failures": s.gate_failures,
                    "last_gate": s.last_gate,
                    "last_reasons": s.last_reasons,
                    "last_model": s.last_model,
                    "tokens": s.tokens,
                    "variant": s.variant,
                }),
            )
        })
        .collect();
    json!({
        "id": run.id,
        "workflow": run.workflow,
        "session": run.session,
        "status": run.status,
        "created_at": to_rfc3339(run.created_at),
        "finished_at": run.finished_at.map(to_rfc3339),
        "tokens": run.tokens(),
        "stages": stages,
    })
}

pub async fn list_workflows(State(state): State<AppState>) -> Json<Value> {
    let workflows = state.gateway.workflows();
    let data: Vec<Value> = workflows
        .workflows
        .values()
        .map(|w| workflow_json(&state, w))
        .collect();
    Json(json!({ "data": data }))
}

pub async fn get_workflow(
    State(state): State<AppState>,
    Path(workflow): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let w = workflow_named(&state, &workflow)?;
    Ok(Json(workflow_json(&state, &w)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    session: Option<String>,
}

impl BodyShape for CreateRun {
    const SHAPE: &'static str = "{\"session\"?: \"…\"}";
}

fn new_run_id(state: &AppState) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    loop {
        let id = format!(
            "run-{:x}-{:04x}",
            state.clock.now_ms(),
            SEQ.fetch_add(1, Ordering::Relaxed) & 0xffff
        );
        if lock(&state.engine).runs().get(&id).is_none() {
            return id;
        }
    }
}

async fn store(state: &AppState, events: Vec<Event>) -> Result<(), ApiError> {
    let at = state.clock.now_ms();
    let stamped: Vec<Stamped> = events
        .into_iter()
        .map(|event| Stamped { at, event })
        .collect();
    let verdicts = super::events::gate_verdicts(state, &stamped);
    state.writer.append(stamped).await?;
    for (at, g) in verdicts {
        state.tracer.gate_verdict(at, &g, None);
    }
    Ok(())
}

async fn current_run(state: &AppState, workflow: &str, run: &str) -> Result<Json<Value>, ApiError> {
    run_of(state, workflow, run)
        .await
        .map(|r| Json(run_json(&r)))
}

pub async fn create_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(workflow): Path<String>,
    JsonBody(req): JsonBody<CreateRun>,
) -> Result<Response, ApiError> {
    let w = workflow_named(&state, &workflow)?;
    if let Some(session) = &req.session {
        ApiError::name(NameField::Session, "session", session)?;
    }
    let id = new_run_id(&state);
    store(
        &state,
        vec![Event::RunStarted {
            run: id.clone(),
            workflow: w.name.clone(),
            session: req.session,
            // The run is its creator's: a persona key finishes only the runs of its persona.
            owner: caller
                .persona_key()
                .map(|k| state.door.canonical(&k.persona)),
        }],
    )
    .await?;
    let run = run_of(&state, &w.name, &id).await?;
    Ok((StatusCode::CREATED, Json(run_json(&run))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    status: Option<String>,
}

pub async fn list_runs(
    State(state): State<AppState>,
    Path(workflow): Path<String>,
    Query(q): Query<RunsQuery>,
) -> Result<Json<Value>, ApiError> {
    let w = workflow_named(&state, &workflow)?;
    let status = match q.status.as_deref() {
        None => None,
        Some("running") => Some(RunStatus::Running),
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_status",
                format!("unknown status `{s}`; use running, completed, failed or cancelled"),
            )
            .param("status")
        })?),
    };
    let engine = lock(&state.engine);
    let mut runs: Vec<&Run> = engine
        .runs()
        .iter()
        .filter(|r| r.workflow == w.name && status.is_none_or(|s| r.status == s))
        .collect();
    runs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    let data: Vec<Value> = runs.into_iter().take(100).map(run_json).collect();
    Ok(Json(json!({ "data": data })))
}

pub async fn get_run(
    State(state): State<AppState>,
    Path((workflow, run)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    workflow_named(&state, &workflow)?;
    current_run(&state, &workflow, &run).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartStage {
    persona: Option<String>,
}

impl BodyShape for StartStage {
    const SHAPE: &'static str = "{\"persona\"?: \"…\"}";
}

/// Starts `stage` of `run` unless it is running already: used by the API and by the gateway.
pub async fn ensure_stage_started(
    state: &AppState,
    workflow: &Workflow,
    run: &str,
    stage: &str,
    persona: Option<String>,
) -> Result<(), ApiError> {
    let (status, running) = with_run(state, &workflow.name, run, |r| {
        (
            r.status,
            r.stages
                .get(stage)
                .is_some_and(|s| s.status == StageStatus::Running),
        )
    })
    .await?;
    if status != RunStatus::Running {
        return Err(conflict(
            "run_finished",
            format!(
                "run `{run}` is {}; start a new run for more work",
                status.as_str()
            ),
        ));
    }
    if running {
        return Ok(());
    }
    // A stage with variants: the run's draw (the gateway draws the same from the run id; once
    // recorded here, the run's stage keeps it).
    let variant = workflow.stage(stage).and_then(|s| {
        let engine = lock(&state.engine);
        let records = |v: &str| engine.variant_record(&workflow.name, stage, v);
        s.draw_variant(&workflow.name, run, &records)
            .map(|v| v.name.clone())
    });
    store(
        state,
        vec![Event::StageStarted {
            run: run.to_string(),
            workflow: workflow.name.clone(),
            stage: stage.to_string(),
            persona,
            variant,
        }],
    )
    .await
}

/// The persona that runs `stage`: the workflow's, never the request's. A request may name it
/// (`persona` of a stage start) only as the workflow does; a stage the workflow gives no persona
/// is run by the persona named, else by the caller's own.
fn stage_persona(
    state: &AppState,
    caller: &Caller,
    stage: &Stage,
    named: Option<&str>,
) -> Result<Option<String>, ApiError> {
    match (stage.persona.as_deref(), named) {
        (Some(configured), Some(named))
            if state.door.canonical(configured) != state.door.canonical(named) =>
        {
            Err(ApiError::bad_request(
                "persona_mismatch",
                format!(
                    "stage `{}` is run by persona `{configured}` (its workflow says so); omit `persona` or name that one",
                    stage.name
                ),
            )
            .param("persona"))
        }
        (Some(configured), _) => Ok(Some(configured.to_string())),
        (None, Some(named)) => Ok(Some(named.to_string())),
        (None, None) => Ok(caller.persona_key().map(|k| k.persona.clone())),
    }
}

/// The ownership rule for a stage: a persona key starts, finishes and judges only the stages its
/// persona runs.
fn own_stage(
    state: &AppState,
    caller: &Caller,
    stage: &str,
    persona: Option<&str>,
) -> Result<(), ApiError> {
    state
        .door
        .require_own(caller, "stage", &format!("stage `{stage}`"), persona)
}

pub async fn start_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((workflow, run, stage)): Path<(String, String, String)>,
    JsonBody(req): JsonBody<StartStage>,
) -> Result<Json<Value>, ApiError> {
    let w = workflow_named(&state, &workflow)?;
    let s = w.stage(&stage).ok_or_else(|| unknown_stage(&w, &stage))?;
    if let Some(p) = &req.persona {
        ApiError::name(NameField::Persona, "persona", p)?;
    }
    let persona = stage_persona(&state, &caller, s, req.persona.as_deref())?;
    own_stage(&state, &caller, &stage, persona.as_deref())?;
    if let Some(p) = &persona {
        let engine = lock(&state.engine);
        if engine.personas().get(p).is_none() {
            let status = ErrorKind::InvalidRequest;
            return Err(ApiError::unknown_persona(&engine, p, status, "persona"));
        }
    }
    ensure_stage_started(&state, &w, &run, &stage, persona).await?;
    current_run(&state, &workflow, &run).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishStage {
    gate: Option<GateResult>,
    model: Option<String>,
    reasons: Option<String>,
}

impl BodyShape for FinishStage {
    const SHAPE: &'static str =
        "{\"gate\"?: \"pass\"|\"fail\", \"model\"?: \"…\", \"reasons\"?: \"…\"}";
}

pub async fn finish_stage(
    State(state): State<AppState>,
    caller: Caller,
    Path((workflow, run, stage)): Path<(String, String, String)>,
    JsonBody(req): JsonBody<FinishStage>,
) -> Result<Json<Value>, ApiError> {
    let w = workflow_named(&state, &workflow)?;
    let s = w.stage(&stage).ok_or_else(|| unknown_stage(&w, &stage))?;
    if let Some(model) = &req.model {
        ApiError::name(NameField::Model, "model", model)?;
    }
    if let Some(reasons) = &req.reasons {
        crate::core::labels::check_text(reasons).map_err(|e| {
            ApiError::bad_request("invalid_text", format!("`reasons` {}", e.reason))
                .param("reasons")
        })?;
    }
    let r = run_of(&state, &workflow, &run).await?;
    // The workflow's persona, else the one the stage was started by.
    let persona = s
        .persona
        .clone()
        .or_else(|| r.stages.get(&stage).and_then(|st| st.persona.clone()));
    own_stage(&state, &caller, &stage, persona.as_deref())?;
    if !r
        .stages
        .get(&stage)
        .is_some_and(|st| st.status == StageStatus::Running)
    {
        return Err(conflict(
            "stage_not_running",
            format!("stage `{stage}` of run `{run}` is not running; start it first (POST …/stages/{stage}/start)"),
        ));
    }
    let mut events = Vec::new();
    if let Some(result) = req.gate {
        let model = req
            .model
            .or_else(|| {
                s.model
                    .as_ref()
                    .and_then(|c| state.gateway.settings().resolve_choice(c))
                    .map(|r| r.name.clone())
            })
            .unwrap_or_else(|| "unknown".into());
        events.push(Event::QualityGate(GateVerdictEvent {
            workflow: w.name.clone(),
            stage: stage.clone(),
            model,
            result,
            reasons: req.reasons,
            run: Some(run.clone()),
            attempt: r.stages.get(&stage).map_or(1, |st| st.attempts + 1),
            // The run's variant of the stage: an outside verdict counts for its experiment.
            variant: r.stages.get(&stage).and_then(|st| st.variant.clone()),
            escalated: false,
        }));
    }
    events.push(Event::StageFinished {
        run: run.clone(),
        workflow: w.name.clone(),
        stage: stage.clone(),
    });
    store(&state, events).await?;
    current_run(&state, &workflow, &run).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishRun {
    status: Option<String>,
}

impl BodyShape for FinishRun {
    const SHAPE: &'static str = "{\"status\"?: \"completed\"|\"failed\"|\"cancelled\"}";
}

pub async fn finish_run(
    State(state): State<AppState>,
    caller: Caller,
    Path((workflow, run)): Path<(String, String)>,
    JsonBody(req): JsonBody<FinishRun>,
) -> Result<Json<Value>, ApiError> {
    let w = workflow_named(&state, &workflow)?;
    let status = match req.status.as_deref() {
        None => RunStatus::Completed,
        Some(s) => RunStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_status",
                format!("unknown status `{s}`; use completed, failed or cancelled"),
            )
            .param("status")
        })?,
    };
    let r = run_of(&state, &workflow, &run).await?;
    state
        .door
        .require_own(&caller, "run", &format!("run `{run}`"), r.owner.as_deref())?;
    if r.status != RunStatus::Running {
        return Err(conflict(
            "run_finished",
            format!("run `{run}` is already {}", r.status.as_str()),
        ));
    }
    store(
        &state,
        vec![Event::RunFinished {
            run: run.clone(),
            workflow: w.name.clone(),
            status: status.as_str().to_string(),
        }],
    )
    .await?;
    current_run(&state, &workflow, &run).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateRequest {
    workflow: String,
    stage: String,
    text: String,
    completion_tokens: Option<u64>,
    model: Option<String>,
    run: Option<String>,
    /// Count the verdict in hypertool_workflow_quality_gate_total (default true).
    record: Option<bool>,
}

impl BodyShape for EvaluateRequest {
    const SHAPE: &'static str = "{\"workflow\": \"…\", \"stage\": \"…\", \"text\": \"…\", \"completion_tokens\"?: N, \"model\"?: \"…\", \"run\"?: \"…\", \"record\"?: true}";
}

pub async fn evaluate_gate(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<EvaluateRequest>,
) -> Result<Json<Value>, ApiError> {
    ApiError::name(NameField::Workflow, "workflow", &req.workflow)?;
    ApiError::name(NameField::Stage, "stage", &req.stage)?;
    if let Some(model) = &req.model {
        ApiError::name(NameField::Model, "model", model)?;
    }
    if let Some(run) = &req.run {
        ApiError::name(NameField::Run, "run", run)?;
    }
    let w = workflow_named(&state, &req.workflow)?;
    let s = w
        .stage(&req.stage)
        .ok_or_else(|| unknown_stage(&w, &req.stage))?;
    let Some(gate) = &s.gate else {
        return Err(ApiError::bad_request(
            "no_quality_gate",
            format!(
                "stage `{}` of workflow `{}` has no quality_gate",
                s.name, w.name
            ),
        )
        .param("stage"));
    };
    if let Some(run) = &req.run {
        with_run(&state, &w.name, run, |_| ()).await?;
    }
    // Counting and judging a long text run off the async workers (see `gateway::tokens`).
    let judged = tokens::off_the_workers(req.text.len(), tokens::DEFAULT_DEADLINE, || {
        let completion_tokens = req
            .completion_tokens
            .unwrap_or_else(|| tokens::count_text(&req.text));
        (
            gate.evaluate(&req.text, completion_tokens),
            completion_tokens,
        )
    })
    .await;
    let Some((verdict, completion_tokens)) = judged else {
        return Err(ApiError::unavailable(
            "every thread that judges long outputs stayed busy for 30 s; retry the evaluation",
        ));
    };
    let record = req.record.unwrap_or(true);
    if record {
        // Recording a verdict is a fact about the stage's persona; a dry evaluation is not.
        let persona = stage_persona(&state, &caller, s, None)?;
        own_stage(&state, &caller, &s.name, persona.as_deref())?;
        let (attempt, variant) = match &req.run {
            Some(run) => lock(&state.engine)
                .runs()
                .get(run)
                .and_then(|r| r.stages.get(&s.name))
                .map_or((1, None), |st| (st.attempts + 1, st.variant.clone())),
            None => (1, None),
        };
        store(
            &state,
            vec![Event::QualityGate(GateVerdictEvent {
                workflow: w.name.clone(),
                stage: s.name.clone(),
                model: req.model.unwrap_or_else(|| "unknown".into()),
                result: verdict.result,
                reasons: verdict.reasons(),
                run: req.run,
                attempt,
                variant,
                escalated: false,
            })],
        )
        .await?;
    }
    Ok(Json(json!({
        "workflow": w.name,
        "stage": s.name,
        "result": verdict.result,
        "failures": verdict.failures,
        "summary": verdict.summary(),
        "completion_tokens": completion_tokens,
        "recorded": record,
        "quality_gate": gate_json(gate),
    })))
}
