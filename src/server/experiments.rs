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
