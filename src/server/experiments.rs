//! `/api/experiments`: every stage with variants, with the evidence of its experiment — what
//! `hypertool experiments` prints and the dashboard shows.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::{lock, AppState};
use crate::core::event::{Event, Stamped};
use crate::core::experiment::{report, ExperimentReport};
use crate::web::error::ApiError;

/// The reports of every experiment of the configuration in force, in workflow and stage order.
pub fn reports(state: &AppState) -> Vec<ExperimentReport> {
    let workflows = state.gateway.workflows();
    let engine = lock(&state.engine);
    let mut out = Vec::new();
    for w in workflows.workflows.values() {
        for stage in w.stages.iter().filter(|s| !s.variants.is_empty()) {
            let records = |v: &str| engine.variant_evidence(&w.name, &stage.name, v);
            out.push(report(&w.name, stage, &records));
        }
    }
    out
}

/// Stores an `experiment_decided` event for each experiment decided since the last look (once
/// per variant: the engine counts the first and ignores the rest, so replicas that decide at the
/// same moment still count it once). Run with every alert evaluation.
pub async fn record_decisions(state: &AppState) {
    let decided: Vec<ExperimentReport> = reports(state)
        .into_iter()
        .filter(|r| r.decided.is_some())
        .collect();
    if decided.is_empty() {
        return;
    }
    let at = state.clock.now_ms();
    let events: Vec<Stamped> = {
        let engine = lock(&state.engine);
        let counted = &engine.metrics().experiment_decisions;
        decided
            .into_iter()
            .filter_map(|r| {
                let variant = r.decided?;
                if counted.get([&r.workflow, &r.stage, &variant]) > 0.0 {
                    return None;
                }
                let p_best = r
                    .variants
                    .iter()
                    .find(|v| v.variant == variant)
                    .map_or(0.0, |v| v.p_best);
                let runs = r.variants.iter().map(|v| v.runs).sum::<f64>() as u64;
                Some(Stamped {
                    at,
                    event: Event::ExperimentDecided {
                        workflow: r.workflow,
                        stage: r.stage,
                        variant,
                        p_best,
                        runs,
                    },
                })
            })
            .collect()
    };
    if events.is_empty() {
        return;
    }
    if let Err(e) = state.writer.append(events).await {
        tracing::warn!("an experiment's decision could not be recorded (tried again at the next evaluation): {e}");
    }
}

/// `GET /api/experiments`.
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"experiments": reports(&state)}))
}

/// `GET /api/experiments/{workflow}/{stage}`.
pub async fn show(
    State(state): State<AppState>,
    Path((workflow, stage)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    reports(&state)
        .into_iter()
        .find(|r| r.workflow == workflow && r.stage == stage)
        .map(|r| Json(json!(r)))
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_experiment",
                format!("stage `{stage}` of workflow `{workflow}` has no variants; GET /api/experiments lists the experiments"),
            )
        })
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteBody {
    variant: String,
}

/// `POST /api/experiments/{workflow}/{stage}/promote {"variant": …}` (admin keys): the workflow
/// file rewritten with the stage on that variant alone (checked with the whole configuration
/// first), applied at the next reload; the audit log names the caller.
pub async fn promote(
    State(state): State<AppState>,
    caller: crate::web::auth::Caller,
    Path((workflow, stage)): Path<(String, String)>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(|r| ApiError::from_body_rejection(r, state.max_body_bytes))?;
    let req: PromoteBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_promotion",
            format!("{e}; the body is {{\"variant\": \"NAME\"}}"),
        )
    })?;
    let before = {
        let workflows = state.gateway.workflows();
        let w = workflows.get(&workflow).ok_or_else(|| {
            ApiError::not_found(
                "unknown_experiment",
                format!("no workflow `{workflow}`; GET /api/experiments lists the experiments"),
            )
        })?;
        let s = w.stage(&stage).filter(|s| !s.variants.is_empty()).ok_or_else(|| {
            ApiError::not_found(
                "unknown_experiment",
                format!("stage `{stage}` of workflow `{workflow}` has no variants; GET /api/experiments lists the experiments"),
            )
        })?;
        super::workflows::variants_json(s)
    };
    let source = state.config_source.clone();
    let (w, s, v) = (workflow.clone(), stage.clone(), req.variant.clone());
    let file = tokio::task::spawn_blocking(move || {
        crate::config::workflows::promote_in_place(&source, &w, &s, &v)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            crate::web::error::ErrorKind::Internal,
            "promotion_failed",
            format!("the promotion did not finish: {e}"),
        )
    })?
    .map_err(|why| {
        ApiError::new(
            crate::web::error::ErrorKind::Conflict,
            "promotion_refused",
            crate::web::error::bounded(why.trim_start_matches("error: "), 2_000),
        )
    })?;
    let after = json!({"variants": [req.variant], "file": file.display().to_string()});
    let entry = super::audit::entry(
        &state,
        caller.actor(),
        "experiment.promote",
        &format!("{workflow}/{stage}"),
        before,
        Some(after),
    );
    super::audit::record(&state, entry).await;
    tracing::info!(workflow = %workflow, stage = %stage, variant = %req.variant, actor = %caller.actor(),
        "experiment promoted; the next reload applies it");
    Ok(Json(json!({
        "workflow": workflow,
        "stage": stage,
        "variant": req.variant,
        "file": file.display().to_string(),
    })))
}
