//! `/api/experiments`: every stage with variants, with the evidence of its experiment — what
//! `hypertool experiments` prints and the dashboard shows.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::{lock, AppState};
use crate::core::experiment::{report, ExperimentReport};
use crate::web::error::ApiError;

/// The reports of every experiment of the configuration in force, in workflow and stage order.
fn reports(state: &AppState) -> Vec<ExperimentReport> {
    let workflows = state.gateway.workflows();
    let engine = lock(&state.engine);
    let mut out = Vec::new();
    for w in workflows.workflows.values() {
        for stage in w.stages.iter().filter(|s| !s.variants.is_empty()) {
            let records = |v: &str| engine.variant_record(&w.name, &stage.name, v);
            out.push(report(&w.name, stage, &records));
        }
    }
    out
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
