//! Calls made for a workflow stage: which stage (from `X-Hypertool-Workflow`/`-Stage`/`-Run`, or
//! the chatmode's workflow), the stage's model, prompt limit, per-run budget and quality gate.
//!
//! A call names a stage of a configured workflow → the stage's model (tier) is used, a prompt
//! over `max_prompt_tokens` is cut, and the output is judged by the stage's gate. A call naming a
//! workflow hypertool does not know keeps working as before: the names only label its metrics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;

use super::request::header;
use super::GatewayState;
use crate::config::gateway::{GatewaySettings, ModelRoute};
use crate::core::engine::Engine;
use crate::core::runs::Run;
use crate::core::workflow::{QualityGate, Stage, Variant, Workflow};
use crate::store::writer::{lock, WriterHandle};
use crate::web::error::{ApiError, ErrorKind};

/// The configured stage a call belongs to.
#[derive(Debug, Clone)]
pub struct StageCall {
    pub workflow: Arc<Workflow>,
    pub stage: Stage,
    /// The run the call belongs to (`X-Hypertool-Run`), checked to be of this workflow.
    pub run: Option<String>,
    /// The stage's variant this call uses (a stage with variants): the run's, once its stage
    /// has started with one; else drawn from the run id (or, outside a run, the session or the
    /// call), so that every replica draws the same.
    pub variant: Option<Variant>,
}

impl StageCall {
    pub fn gate(&self) -> Option<&QualityGate> {
        self.stage.gate.as_ref()
    }

    /// The model gate retries go to: the escalation model, else the same one.
    pub fn escalation(&self, settings: &GatewaySettings) -> Option<Arc<ModelRoute>> {
        self.stage
            .escalation_model
            .as_ref()
            .and_then(|c| settings.resolve_choice(c))
    }
}

/// The workflow a call names (or its chatmode's, when it names a stage but no workflow), and the
/// configured stage when there is one.
pub fn resolve(
    state: &GatewayState,
    headers: &HeaderMap,
    chatmode: &str,
) -> Result<(Option<String>, Option<Arc<StageCall>>), ApiError> {
    let workflows = state.workflows();
    let stage_name = header(headers, "x-hypertool-stage");
    let run = header(headers, "x-hypertool-run");
    let named = header(headers, "x-hypertool-workflow");
    let workflow_name = match (&named, &stage_name) {
        (Some(w), _) => Some(w.clone()),
        (None, Some(_)) => workflows.workflow_for(None, chatmode),
        (None, None) => None,
    };
    let configured = workflow_name.as_deref().and_then(|w| workflows.get(w));
    match (configured, stage_name, run) {
        (Some(w), Some(stage), run) => {
            let s = w.stage(&stage).ok_or_else(|| {
                let mut e = unknown_stage(w, &stage);
                e.kind = ErrorKind::InvalidRequest;
                e.param("x-hypertool-stage")
            })?;
            // The variant the run's stage already uses, if it has started with one.
            let mut kept: Option<String> = None;
            if let Some(r) = &run {
                kept = with_run(&state.shared.engine, &w.name, r, |run| {
                    run.stages.get(&stage).and_then(|st| st.variant.clone())
                })
                .map_err(|e| e.param("x-hypertool-run"))?;
            }
            let variant = if s.variants.is_empty() {
                None
            } else {
                let key = run
                    .clone()
                    .or_else(|| header(headers, "x-hypertool-session"))
                    .unwrap_or_else(|| crate::telemetry::trace::ids::TraceId::random().hex());
                let engine = lock(&state.shared.engine);
                let records = |v: &str| engine.variant_record(&w.name, &stage, v);
                kept.as_deref()
                    .and_then(|name| s.variant(name))
                    .or_else(|| s.draw_variant(&w.name, &key, &records))
                    .cloned()
            };
            Ok((
                workflow_name,
                Some(Arc::new(StageCall {
                    workflow: w.clone(),
                    stage: s.clone(),
                    run,
                    variant,
                })),
            ))
        }
        (_, None, Some(_)) => Err(ApiError::bad_request(
            "missing_stage",
            "X-Hypertool-Run needs X-Hypertool-Stage (and X-Hypertool-Workflow unless the chatmode maps to one)",
        )
        .param("x-hypertool-stage")),
        (None, Some(_), Some(_)) => Err(ApiError::bad_request(
            "unknown_workflow",
            format!(
                "X-Hypertool-Run needs a configured workflow; `{}` is not one (configured: {})",
                workflow_name.unwrap_or_default(),
                workflows.workflows.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
        .param("x-hypertool-workflow")),
        _ => Ok((workflow_name, None)),
    }
}

/// A header value from free text: printable ASCII only, at most 1,000 characters.
pub fn header_safe(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| match c {
            ' '..='~' => c,
            '\n' | '\t' => ' ',
            _ => '?',
        })
        .take(1000)
        .collect();
    if text.chars().count() > 1000 {
        out.push_str("...");
    }
    out
}

pub fn unknown_stage(workflow: &Workflow, stage: &str) -> ApiError {
    ApiError::not_found(
        "unknown_stage",
        format!(
            "workflow `{}` has no stage `{stage}`; its stages: {}",
            workflow.name,
            workflow.stage_names().join(", ")
        ),
    )
    .param("stage")
}

/// Makes sure a run created through another replica a moment ago is known here: when this
/// engine has not seen `run` and the ledger is shared, what the other replicas stored is applied
/// first (waiting at most 2 s), rather than answering `unknown_run` until the periodic tail.
pub async fn learn_run(writer: &WriterHandle, engine: &Mutex<Engine>, run: &str) {
    if writer.shared && lock(engine).runs().get(run).is_none() {
        writer.catch_up_now(Duration::from_secs(2)).await;
    }
}

/// `read` applied to the run (checked to belong to `workflow`), without copying it.
pub fn with_run<T>(
    engine: &Mutex<Engine>,
    workflow: &str,
    run: &str,
    read: impl FnOnce(&Run) -> T,
) -> Result<T, ApiError> {
    let engine = lock(engine);
    let Some(r) = engine.runs().get(run) else {
        return Err(ApiError::not_found(
            "unknown_run",
            format!("no run `{run}` (runs are created with POST /v1/workflows/{workflow}/runs; finished runs are kept up to a bound)"),
        )
        .param("run"));
    };
    if r.workflow != workflow {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            "run_workflow_mismatch",
            format!(
                "run `{run}` belongs to workflow `{}`, not `{workflow}`",
                r.workflow
            ),
        )
        .param("run"));
    }
    Ok(read(r))
}
