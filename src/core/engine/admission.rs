//! Admission: may this call spend now? The persona's budgets (tokens and cost), the run stage's
//! budget and start, decided at once; the reservations held until usage settles them; and on a
//! shared ledger the fleet's room (every replica's calls in flight, while its lease holds).

use super::*;

/// The answer to "may this persona spend about `estimate` tokens now?".
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Go ahead. `reserved` tokens (and `reserved_cost` USD) are held against the budget until
    /// [`Engine::release`].
    Allowed { reserved: u64, reserved_cost: f64 },
    /// The persona's `downgrade` budget is spent: go ahead on the cheaper model.
    Downgrade { reserved: u64, reserved_cost: f64 },
    /// The persona's budget is in `block` mode and spent (counting calls in flight).
    Blocked {
        persona: String,
        limit: u64,
        used: u64,
        in_flight: u64,
        resets_at: Option<UnixMillis>,
        /// Set when the cost budget refused: (limit, used, reserved by calls in flight), USD.
        cost: Option<(f64, f64, f64)>,
    },
}

/// The run stage a call is for: its token budget per run is reserved with the persona's budget,
/// and its first call starts it.
#[derive(Debug, Clone, Copy)]
pub struct StageClaim<'a> {
    pub run: &'a str,
    pub workflow: &'a str,
    pub stage: &'a str,
    /// `budget_tokens` of the stage, if it has one.
    pub budget_tokens: Option<u64>,
}

/// What a call asks of admission.
#[derive(Debug, Clone, Copy)]
pub struct CallClaim<'a> {
    pub persona: &'a str,
    /// Tokens the call may use (prompt estimate + its completion limit).
    pub estimate: u64,
    /// USD the call may cost (0 without prices).
    pub cost_estimate: f64,
    pub stage: Option<StageClaim<'a>>,
}

/// Tokens held against a run's stage budget until released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageHold {
    pub run: String,
    pub stage: String,
    pub tokens: u64,
}

/// A call admitted: what it holds, and what the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    pub reserved: u64,
    pub reserved_cost: f64,
    /// The persona's `downgrade` budget is spent: the call goes to the cheaper model.
    pub downgrade: bool,
    pub stage: Option<StageHold>,
    /// This call is the stage's first: the caller stores `stage_started` before calling upstream
    /// (or, when it cannot, calls [`Engine::forget_stage_start`]).
    pub start_stage: bool,
}

/// Why admission refused a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The persona's `block` budget (see [`Admission::Blocked`]).
    Budget(Admission),
    /// The run's stage has no tokens left for this call.
    StageBudget {
        workflow: String,
        stage: String,
        run: String,
        budget: u64,
        used: u64,
        in_flight: u64,
    },
    /// The run is not running (finished, failed, cancelled), or unknown.
    RunNotRunning { run: String, status: &'static str },
}

impl Engine {
    /// Admission for one call of a persona, outside any run (see [`Engine::admit_call`]).
    pub fn admit(
        &mut self,
        persona: &str,
        estimate: u64,
        cost_estimate: f64,
        now: UnixMillis,
    ) -> Admission {
        let claim = CallClaim {
            persona,
            estimate,
            cost_estimate,
            stage: None,
        };
        match self.admit_call(&claim, now) {
            Ok(a) if a.downgrade => Admission::Downgrade {
                reserved: a.reserved,
                reserved_cost: a.reserved_cost,
            },
            Ok(a) => Admission::Allowed {
                reserved: a.reserved,
                reserved_cost: a.reserved_cost,
            },
            Err(Refusal::Budget(blocked)) => blocked,
            // Without a stage claim, only the persona's budget can refuse.
            Err(_) => Admission::Allowed {
                reserved: 0,
                reserved_cost: 0.0,
            },
        }
    }

    /// Admission control for one call, decided at once for everything it draws on: the persona's
    /// token and cost budgets and, for a call in a run, the stage's token budget for the run, all
    /// counting what calls in flight hold. In `block` mode a budget that this call would pass
    /// refuses it; otherwise the estimates are reserved together (given back by [`Engine::release`]
    /// and [`Engine::release_stage`] once the real usage is applied). Usage can then pass a limit
    /// only by what calls admitted together use beyond their estimates. The first call of a stage
    /// that is not running is told to start it; calls admitted while its `stage_started` is on the
    /// way are not.
    pub fn admit_call(
        &mut self,
        claim: &CallClaim<'_>,
        now: UnixMillis,
    ) -> Result<Admitted, Refusal> {
        let canonical = self.config.personas.canonical(claim.persona).to_string();
        let estimate = claim.estimate;
        let in_flight = self.reserved.get(&canonical).copied().unwrap_or(0);
        let in_flight_cost = self.reserved_cost.get(&canonical).copied().unwrap_or(0.0);
        let cost_estimate = if claim.cost_estimate.is_finite() {
            claim.cost_estimate.max(0.0)
        } else {
            0.0
        };
        // The run's stage first: its refusal changes nothing.
        let mut start_stage = false;
        let mut stage_hold = None;
        if let Some(st) = &claim.stage {
            let Some(run) = self.runs.get(st.run) else {
                return Err(Refusal::RunNotRunning {
                    run: st.run.to_string(),
                    status: "unknown",
                });
            };
            if run.status != crate::core::runs::RunStatus::Running {
                return Err(Refusal::RunNotRunning {
                    run: st.run.to_string(),
                    status: run.status.as_str(),
                });
            }
            let key = (st.run.to_string(), st.stage.to_string());
            let stage_run = run.stages.get(st.stage);
            let used = stage_run.map_or(0, |s| s.tokens);
            let running =
                stage_run.is_some_and(|s| s.status == crate::core::runs::StageStatus::Running);
            let held = self.stage_reserved.get(&key).copied().unwrap_or(0);
            if let Some(budget) = st.budget_tokens {
                if used.saturating_add(held).saturating_add(estimate) > budget {
                    return Err(Refusal::StageBudget {
                        workflow: st.workflow.to_string(),
                        stage: st.stage.to_string(),
                        run: st.run.to_string(),
                        budget,
                        used,
                        in_flight: held,
                    });
                }
            }
            start_stage = !running && !self.stage_starting.contains(&key);
            stage_hold = Some((key, estimate));
        }
        let mut downgrade = false;
        if let Some(budget) = self.budgets.get_mut(&canonical) {
            budget.roll(now);
            let used = budget.used_tokens();
            let over_tokens =
                used.saturating_add(in_flight).saturating_add(estimate) > budget.spec.tokens;
            // Spent, or this call on top of the calls in flight would pass the cost limit.
            let over_cost = budget.remaining_cost().is_some_and(|left| {
                // A billionth of a dollar of float noise is not an overrun.
                left <= 0.0 || left - in_flight_cost - cost_estimate < -1e-9
            });
            let over = over_tokens || over_cost;
            downgrade = over && budget.spec.mode == crate::core::budget::BudgetMode::Downgrade;
            if over && budget.spec.mode == crate::core::budget::BudgetMode::Block {
                return Err(Refusal::Budget(Admission::Blocked {
                    persona: canonical,
                    limit: budget.spec.tokens,
                    used,
                    in_flight,
                    resets_at: budget.resets_at(),
                    cost: over_cost
                        .then(|| {
                            budget
                                .spec
                                .cost_usd
                                .map(|limit| (limit, budget.used_cost(), in_flight_cost))
                        })
                        .flatten(),
                }));
            }
        }
        // Everything admits the call: reserve it all.
        let r = self.reserved.entry(canonical.clone()).or_insert(0);
        *r = r.saturating_add(estimate);
        if cost_estimate > 0.0 {
            *self.reserved_cost.entry(canonical).or_insert(0.0) += cost_estimate;
        }
        let stage = stage_hold.map(|(key, tokens)| {
            let h = self.stage_reserved.entry(key.clone()).or_insert(0);
            *h = h.saturating_add(tokens);
            if start_stage {
                self.stage_starting.insert(key.clone());
            }
            StageHold {
                run: key.0,
                stage: key.1,
                tokens,
            }
        });
        Ok(Admitted {
            reserved: estimate,
            reserved_cost: cost_estimate,
            downgrade,
            stage,
            start_stage,
        })
    }

    /// Gives back a run stage's reservation made by [`Engine::admit_call`].
    pub fn release_stage(&mut self, hold: &StageHold) {
        let key = (hold.run.clone(), hold.stage.clone());
        if let Some(h) = self.stage_reserved.get_mut(&key) {
            *h = h.saturating_sub(hold.tokens);
            if *h == 0 {
                self.stage_reserved.remove(&key);
            }
        }
    }

    /// The `stage_started` of an admitted first call could not be stored: the next call starts
    /// the stage instead.
    pub fn forget_stage_start(&mut self, run: &str, stage: &str) {
        self.stage_starting
            .remove(&(run.to_string(), stage.to_string()));
    }

    /// Whether the persona's budget can refuse or reroute calls (`block` or `downgrade`): only then
    /// is a precise estimate worth its cost.
    pub fn enforces(&self, persona: &str) -> bool {
        let canonical = self.config.personas.canonical(persona);
        self.budgets
            .get(canonical)
            .is_some_and(|b| b.spec.mode != crate::core::budget::BudgetMode::Observe)
    }

    /// Gives back a reservation made by [`Engine::admit`] (the call's real usage is recorded as a
    /// usage event before this).
    pub fn release(&mut self, persona: &str, reserved: u64, reserved_cost: f64) {
        let canonical = self.config.personas.canonical(persona);
        if let Some(r) = self.reserved.get_mut(canonical) {
            *r = r.saturating_sub(reserved);
            if *r == 0 {
                self.reserved.remove(canonical);
            }
        }
        if reserved_cost > 0.0 {
            if let Some(c) = self.reserved_cost.get_mut(canonical) {
                *c -= reserved_cost;
                // Float sums do not cancel exactly: below a micro-dollar it is nothing.
                if *c < 1e-9 {
                    self.reserved_cost.remove(canonical);
                }
            }
        }
    }

    pub fn reserved(&self, persona: &str) -> u64 {
        let canonical = self.config.personas.canonical(persona);
        self.reserved.get(canonical).copied().unwrap_or(0)
    }

    /// Tokens a new call of `persona` may still reserve fleet-wide, by the ledger alone: the
    /// `block` budget's limit less its usage and the estimates of every admitted call not yet
    /// settled, whichever replica admitted it. `None` when no `block` budget applies.
    pub fn fleet_room(&self, persona: &str) -> Option<u64> {
        let (canonical, budget) = self.block_budget(persona)?;
        let in_flight: u64 = self
            .holding(canonical)
            .map(|c| c.estimate)
            .fold(0, u64::saturating_add);
        Some(
            budget
                .spec
                .tokens
                .saturating_sub(budget.used_tokens())
                .saturating_sub(in_flight),
        )
    }

    /// The settlements this replica owes for calls other replicas admitted and can no longer
    /// settle: their replica's lease lapsed (it died). One survivor settles them — the live
    /// replica whose name sorts first (`me` is this one's) — at each call's estimate plus what it
    /// had streamed, as the replica itself would at its restart; should both happen, the
    /// ledger's first settlement counts and the other is ignored everywhere.
    pub fn orphan_settlements(
        &self,
        me: &str,
    ) -> Vec<(UnixMillis, crate::core::event::CallAdmission)> {
        let Some(replicas) = &self.replicas else {
            return Vec::new();
        };
        if replicas.live.iter().min().map(String::as_str) != Some(me) {
            return Vec::new();
        }
        let mut orphans: Vec<_> = self
            .unsettled
            .iter()
            .filter(|(call, (_, c))| {
                self.foreign_calls.contains(*call)
                    && c.replica
                        .as_ref()
                        .is_some_and(|r| replicas.dead.contains(r))
            })
            .map(|(_, v)| v.clone())
            .collect();
        orphans.sort_by(|a, b| (a.0, &a.1.call).cmp(&(b.0, &b.1.call)));
        orphans
    }

    /// How many replicas are alive by their heartbeats (`None`: a ledger of its own).
    pub fn live_replicas(&self) -> Option<usize> {
        self.replicas.as_ref().map(|r| r.live.len())
    }

    /// The replicas by their heartbeats (from the writer, about once a second).
    pub fn set_replicas(&mut self, replicas: Option<Replicas>) {
        self.replicas = replicas;
    }

    /// Whether an admitted call still holds budget fleet-wide: its replica is not dead (when
    /// known), and it is younger than [`STALE_ADMISSION_MS`] (the bound when it is not).
    fn holds(&self, at: UnixMillis, c: &crate::core::event::CallAdmission) -> bool {
        let dead = match (&self.replicas, &c.replica) {
            (Some(replicas), Some(r)) => replicas.dead.contains(r),
            _ => false,
        };
        !dead && at >= self.now - STALE_ADMISSION_MS
    }

    /// USD a new call of `persona` may still reserve fleet-wide, as [`Engine::fleet_room`] for
    /// tokens: the `block` budget's `cost_usd` less its cost so far and the cost estimates of every
    /// admitted call not yet settled, whichever replica admitted it. `None` when no `block` budget
    /// with a `cost_usd` applies.
    pub fn fleet_cost_room(&self, persona: &str) -> Option<f64> {
        let (canonical, budget) = self.block_budget(persona)?;
        let limit = budget.spec.cost_usd?;
        let in_flight: f64 = self.holding(canonical).filter_map(|c| c.cost_usd).sum();
        Some(limit - budget.used_cost() - in_flight)
    }

    /// `persona`'s canonical name and budget, when that budget is in `block` mode.
    fn block_budget<'a>(&'a self, persona: &'a str) -> Option<(&'a str, &'a BudgetState)> {
        let canonical = self.config.personas.canonical(persona);
        let budget = self.budgets.get(canonical)?;
        (budget.spec.mode == crate::core::budget::BudgetMode::Block).then_some((canonical, budget))
    }

    /// The admitted calls of `canonical` still holding budget fleet-wide (see [`Engine::holds`]).
    fn holding<'a>(
        &'a self,
        canonical: &'a str,
    ) -> impl Iterator<Item = &'a crate::core::event::CallAdmission> + 'a {
        self.unsettled.values().filter_map(move |(at, c)| {
            (self.holds(*at, c) && self.config.personas.canonical(&c.persona) == canonical)
                .then_some(c)
        })
    }
}
