//! Admission of a gateway call: its rates, an in-flight slot, and the reservation of its budgets
//! (the persona's and the run stage's, decided at once by `Engine::admit_call`), held until the
//! call's usage is applied; the answers to the calls it refuses.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::gateway::{GatewaySettings, ModelRoute, VirtualKey};
use crate::core::engine::{Admission, CallClaim, Engine, Refusal, StageClaim, StageHold};
use crate::core::event::{Event, Stamped};
use crate::core::policy;
use crate::store::writer::lock;
use crate::web::error::{ApiError, ErrorKind};

use super::{CallMeta, GatewayState};

/// Holds reserved tokens until dropped, so every exit path gives them back.
pub(super) struct Reservation {
    pub(super) engine: Arc<Mutex<Engine>>,
    pub(super) persona: String,
    pub(super) tokens: u64,
    /// USD held against a cost budget.
    pub(super) cost: f64,
    /// Tokens held against the run's stage budget.
    pub(super) stage: Option<StageHold>,
    /// The in-flight slot, released with the reservation.
    pub(super) _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The call whose stored admission (`call_admitted`) this reservation backs, until the
    /// usage or release that settles it is handed to the writer ([`Reservation::settled`]).
    /// Dropped before that — the call's task panicked, or its client left before the upstream
    /// answered and took the handler with it — the call is settled at once at its admission's
    /// estimate ([`settle_at_estimate`]), as a restart would settle it, instead of holding
    /// fleet-wide budget and showing no tokens until then.
    admitted_call: Option<(GatewayState, String)>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        {
            let mut engine = lock(&self.engine);
            engine.release(&self.persona, self.tokens, self.cost);
            if let Some(hold) = &self.stage {
                engine.release_stage(hold);
            }
        }
        if let Some((state, call)) = self.admitted_call.take() {
            settle_at_estimate(state, call);
        }
    }
}

/// Stores the settlement of an admitted call that ended without its usage (see
/// [`Reservation::admitted_call`]): its admission's estimate plus what it had streamed, marked
/// `estimated`. A task of its own (this runs in a `Drop`, maybe while a panic unwinds); should the
/// call be settled meanwhile, nothing is stored, and the engine counts only a call's first
/// settlement anyway.
fn settle_at_estimate(state: GatewayState, call: String) {
    let panicked = std::thread::panicking();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // No runtime (it is shutting down): the next start settles the call.
        return;
    };
    let tasks = state.shared.tasks.clone();
    tasks.spawn_on(
        async move {
            let Some(admission) = lock(&state.shared.engine).unsettled_call(&call) else {
                return;
            };
            let usage = admission.as_settlement();
            if panicked {
                tracing::error!(persona = %usage.persona, call = %call, tokens = usage.total_tokens(),
                    "a gateway call's task failed (a bug, the panic is logged above); the call is counted at its admission's estimate");
            } else {
                tracing::info!(persona = %usage.persona, call = %call, tokens = usage.total_tokens(),
                    "a gateway call ended before the upstream answered (its client left); counted at its admission's estimate");
            }
            let event = Stamped {
                at: state.shared.clock.now_ms(),
                event: Event::Usage(usage),
            };
            state
                .shared
                .writer
                .append_accounting(vec![event], |_| {})
                .await;
        },
        &runtime,
    );
}

impl Reservation {
    /// Admission for one call of `meta` (see [`Engine::admit_call`]): reserves `estimate` tokens
    /// and `cost` USD for the persona and, in a run, the tokens against the stage's budget. Returns
    /// the reservation (given back when dropped), whether a `downgrade` budget asks for the
    /// cheaper model, and whether this call must start its stage; or the refusal.
    pub(super) fn take(
        state: &GatewayState,
        meta: &CallMeta,
        estimate: u64,
        cost: f64,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(Reservation, bool, bool), Refusal> {
        let stage = meta.stage_call.as_ref().and_then(|c| {
            c.run.as_deref().map(|run| StageClaim {
                run,
                workflow: &c.workflow.name,
                stage: &c.stage.name,
                budget_tokens: c.stage.budget_tokens,
            })
        });
        let claim = CallClaim {
            persona: &meta.persona,
            estimate,
            cost_estimate: cost,
            stage,
        };
        let admitted =
            lock(&state.shared.engine).admit_call(&claim, state.shared.clock.now_ms())?;
        let reservation = Reservation {
            engine: state.shared.engine.clone(),
            persona: meta.persona.clone(),
            tokens: admitted.reserved,
            cost: admitted.reserved_cost,
            stage: admitted.stage,
            _permit: permit,
            admitted_call: None,
        };
        Ok((reservation, admitted.downgrade, admitted.start_stage))
    }

    /// From here on the reservation backs `call`'s stored admission (see
    /// [`Reservation::admitted_call`]).
    pub(super) fn backs(&mut self, state: &GatewayState, call: Option<&str>) {
        self.admitted_call = call.map(|c| (state.clone(), c.to_string()));
    }

    /// The usage or release that settles the reservation's call is with the writer.
    pub(super) fn settled(&mut self) {
        self.admitted_call = None;
    }
}

/// What admission gave a call: the reservation of its budgets (given back once its usage is
/// stored, or when dropped), and whether a spent `downgrade` budget asks for the cheaper model.
pub(super) struct Admitted {
    pub(super) reservation: Reservation,
    pub(super) downgrade: bool,
    /// The tokens and USD reserved, which the admission record names.
    estimate: u64,
    cost_estimate: f64,
}

/// The one admission step of every model call — chat in any dialect, and embeddings: the key's
/// and the persona's rates, an in-flight slot, the persona's budgets and (in a run) the stage's
/// reserved at once (a spent `block` budget refuses), and the run's stage started when this call
/// is its first. The caller may then move the call to a cheaper model (`downgrade`) before
/// [`Admitted::record`] makes it durable.
pub(super) async fn admit(
    state: &GatewayState,
    settings: &GatewaySettings,
    key: Option<&VirtualKey>,
    meta: &CallMeta,
    prompt_estimate: u64,
    max_tokens: u64,
) -> Result<Admitted, ApiError> {
    let estimate = prompt_estimate.saturating_add(max_tokens);
    rate_check(state, key, meta, estimate)?;
    let permit = acquire_slot(state, settings, &meta.route.upstream).await?;
    let cost_estimate = cost_of(&meta.route, prompt_estimate, max_tokens);
    let (reservation, downgrade, start_stage) =
        Reservation::take(state, meta, estimate, cost_estimate, Some(permit)).map_err(
            |refusal| {
                state.count(&meta.route.upstream, "budget_exceeded");
                refused(&refusal, estimate, cost_estimate)
            },
        )?;
    if start_stage {
        start_run_stage(state, meta).await?;
    }
    Ok(Admitted {
        reservation,
        downgrade,
        estimate,
        cost_estimate,
    })
}

impl Admitted {
    /// Stores the call's admission record before anything goes upstream (an answered call is
    /// then never missing after a crash); `Err` when the ledger cannot: nothing may go upstream.
    pub(super) async fn record(
        &mut self,
        state: &GatewayState,
        meta: &mut CallMeta,
    ) -> Result<(), ApiError> {
        super::accounting::store_admission(state, meta, self.estimate, self.cost_estimate).await?;
        self.reservation.backs(state, meta.call_id.as_deref());
        Ok(())
    }
}

/// The key's and the persona's rates: 429 `rate_limited` with `Retry-After` when one is passed.
pub(super) fn rate_check(
    state: &GatewayState,
    key: Option<&VirtualKey>,
    meta: &CallMeta,
    tokens: u64,
) -> Result<(), ApiError> {
    if !state.limits.active() {
        return Ok(());
    }
    let canonical = lock(&state.shared.engine)
        .personas()
        .canonical(&meta.persona)
        .to_string();
    state
        .limits
        .check(key, &canonical, tokens)
        .map_err(|r| {
            state.count(&meta.route.upstream, "rate_limited");
            let what = r.kind.as_str();
            let mut e = ApiError::new(
 ErrorKind::RateLimited,
 "rate_limited",
                match r.retry_after {
                    Some(_) => format!(
                        "{} may make {} {what} per minute; retry later",
                        r.scope, r.per_minute
                    ),
                    None => format!(
                        "this call needs about {tokens} tokens, more than the {} tokens per minute {} may use; send a smaller prompt or max_tokens",
                        r.per_minute, r.scope
                    ),
                },
            );
            e.retry_after_secs = r.retry_after.map(|d| d.as_secs_f64().ceil().max(1.0) as u64);
            e
        })
}

/// Stores the `stage_started` of a run stage's first call (admission chose this call); when it
/// cannot be stored, the next call of the stage starts it instead.
pub(super) async fn start_run_stage(state: &GatewayState, meta: &CallMeta) -> Result<(), ApiError> {
    let Some((call, run)) = meta
        .stage_call
        .as_ref()
        .and_then(|c| c.run.as_ref().map(|r| (c, r)))
    else {
        return Ok(());
    };
    let persona = lock(&state.shared.engine)
        .personas()
        .canonical(&meta.persona)
        .to_string();
    let event = Stamped {
        at: state.shared.clock.now_ms(),
        event: Event::StageStarted {
            run: run.clone(),
            workflow: call.workflow.name.clone(),
            stage: call.stage.name.clone(),
            persona: Some(persona),
            variant: call.variant.as_ref().map(|v| v.name.clone()),
        },
    };
    if let Err(e) = state.shared.writer.append(vec![event]).await {
        lock(&state.shared.engine).forget_stage_start(run, &call.stage.name);
        return Err(e.into());
    }
    Ok(())
}

/// The cost of a call of `prompt` + `completion` tokens on `route` (0 without prices).
pub(super) fn cost_of(route: &ModelRoute, prompt: u64, completion: u64) -> f64 {
    route.prices.map_or(0.0, |p| p.cost(prompt, completion))
}

/// The answer to a call the policy refused.
pub(super) fn policy_error(refusal: policy::PolicyRefusal) -> ApiError {
    match refusal {
        policy::PolicyRefusal::AutoWithoutStage => ApiError::bad_request(
            "model_auto_without_stage",
            "`\"model\": \"auto\"` takes the model of the call's workflow stage; send X-Hypertool-Workflow and X-Hypertool-Stage for a stage whose configuration sets `model`, or name a model",
        )
        .param("model"),
        policy::PolicyRefusal::ToolsNotAllowed { persona, tools } => ApiError::new(
 ErrorKind::Forbidden,
 "tool_not_allowed",
            format!(
                "persona `{persona}` may not use the tools {}: they are not in its allowedTools",
                tools.join(", ")
            ),
        )
        .param("tools"),
    }
}

/// The answer to a call admission refused: 429 for a spent budget (what is spent, what calls in
/// flight hold, what this call needs, and when the period resets), 409 for a run that has ended.
pub(super) fn refused(refusal: &Refusal, estimate: u64, cost_estimate: f64) -> ApiError {
    let blocked = match refusal {
        Refusal::Budget(blocked) => blocked,
        Refusal::StageBudget {
            workflow,
            stage,
            run,
            budget,
            used,
            in_flight,
        } => {
            return ApiError::new(
 ErrorKind::BudgetExceeded,
 "stage_budget_exceeded",
                format!(
                    "stage `{stage}` of run `{run}` has used {used} of its {budget}-token budget (budget_tokens in workflow `{workflow}`; {in_flight} more reserved by calls in flight) and this call needs about {estimate}"
                ),
            )
        }
        Refusal::RunNotRunning { run, status } => {
            return ApiError::new(
 ErrorKind::Conflict,
 "run_finished",
                format!("run `{run}` is {status}; start a new run for more work"),
            )
        }
    };
    let Admission::Blocked {
        persona,
        limit,
        used,
        in_flight,
        resets_at,
        cost,
    } = blocked
    else {
        return ApiError::unavailable("admission refused the call");
    };
    let resets = resets_at
        .map(|t| format!("resets at {}", crate::core::clock::to_rfc3339(t)))
        .unwrap_or_else(|| "the budget has no period: raise or reset it".into());
    tracing::info!(persona = %persona, limit, used, in_flight, "call refused: budget exceeded");
    let message = match cost {
        Some((limit_usd, used_usd, in_flight_usd)) => format!(
            "persona `{persona}` has spent ${used_usd:.4} of its ${limit_usd:.4} cost budget (${in_flight_usd:.4} more reserved by calls in flight; this call costs about ${cost_estimate:.4}); {resets}"
        ),
        None => format!(
            "persona `{persona}` has used {used} of its {limit}-token budget ({in_flight} more reserved by calls in flight; this call needs about {estimate}); {resets}"
        ),
    };
    ApiError::new(ErrorKind::BudgetExceeded, "budget_exceeded", message)
}

/// Load shedding: a bounded number of calls go upstream at once; as many again may wait up to
/// 100 ms for a slot, and beyond that calls are refused at once, so that overload is refused
/// cheaply instead of piling up requests in memory.
pub(super) async fn acquire_slot(
    state: &GatewayState,
    settings: &GatewaySettings,
    upstream: &str,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let permit = match state.in_flight.clone().try_acquire_owned() {
        Ok(p) => Ok(p),
        Err(_) => {
            let waiting = state.waiting.fetch_add(1, Ordering::AcqRel);
            let result = if waiting >= settings.max_in_flight {
                Err(())
            } else {
                tokio::time::timeout(
                    Duration::from_millis(100),
                    state.in_flight.clone().acquire_owned(),
                )
                .await
                .map_err(|_| ())
                .and_then(|r| r.map_err(|_| ()))
            };
            state.waiting.fetch_sub(1, Ordering::AcqRel);
            result
        }
    };
    permit.map_err(|()| {
        state.count(upstream, "overloaded");
        ApiError::new(
            ErrorKind::Unavailable,
            "overloaded",
            format!(
                "hypertool has {} calls in flight (gateway.max_in_flight); retry shortly",
                settings.max_in_flight
            ),
        )
    })
}
