//! The engine: applies events to the core's state (budgets, sessions, metric series).
//!
//! It is deliberately synchronous and single-threaded: the ledger writer applies events in exactly
//! the order they were stored, so replaying the ledger after a restart reproduces the same state.
//!
//! This file is over the project's ~800-line guide on purpose: [`Engine::apply`] is one match over
//! every event kind, each arm the whole effect of its kind on budgets, sessions, runs and series;
//! spread over files, the arms whose effects must agree (a usage and the admission it settles, a
//! stage's start and its end) could no longer be read together. Admission (`admission.rs`), the
//! series (`metrics.rs`) and the tests (`tests.rs`) are files of their own.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::budget::{BudgetSource, BudgetSpec, BudgetState};
use super::clock::UnixMillis;
use super::event::GateVerdictEvent;
use super::event::{Event, GateResult, Stamped};
use super::labels::{self as label_guard, LabelGuard, LabelKind, OTHER};
use super::persona::PersonaRegistry;
use super::runs::{EndedStage, RunStatus, Runs};
use super::series::{
    CounterVec, HistogramVec, GENERATION_DURATION_BUCKETS, PERSONA_DURATION_BUCKETS,
    PROMPT_TOKENS_BUCKETS, STAGE_DURATION_BUCKETS,
};
use super::session::{SessionOutcome, SessionView, Sessions};

mod admission;
mod metrics;

pub use admission::{Admission, Admitted, CallClaim, Refusal, StageClaim, StageHold};
pub use metrics::Metrics;

/// The part of the configuration the core needs, already validated.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub personas: PersonaRegistry,
    /// Budget per canonical persona name, from `budgets.yml` or the persona file.
    pub budgets: BTreeMap<String, (BudgetSpec, BudgetSource)>,
    pub label_cap: usize,
    /// Label values always kept (never folded into `other`).
    pub configured_labels: Vec<(LabelKind, Vec<String>)>,
    pub session_idle_timeout_ms: i64,
    pub max_sessions: usize,
    pub switching: SwitchPolicy,
}

/// The persona switch policy (`[switching]` and per-chatmode cooldowns from `chatmodes.yml`).
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchPolicy {
    pub cooldown_ms: i64,
    pub cooldown_per_chatmode: BTreeMap<String, i64>,
    pub oscillation_window_ms: i64,
    /// Refuse a switch that would complete an oscillation (else only flag it).
    pub suppress_oscillation: bool,
}

impl Default for SwitchPolicy {
    fn default() -> Self {
        Self {
            cooldown_ms: 5_000,
            cooldown_per_chatmode: BTreeMap::new(),
            oscillation_window_ms: 120_000,
            suppress_oscillation: false,
        }
    }
}

impl SwitchPolicy {
    pub fn cooldown_for(&self, chatmode: &str) -> i64 {
        self.cooldown_per_chatmode
            .get(chatmode)
            .copied()
            .unwrap_or(self.cooldown_ms)
    }
}

/// What the switch policy says of a requested switch.
#[derive(Debug, Clone, PartialEq)]
pub enum SwitchDecision {
    /// Switch (`from` is the persona left; `oscillation` when this switch completes A→B→A→B and
    /// the policy only flags it).
    Switch {
        from: Option<String>,
        oscillation: Option<(String, String)>,
    },
    /// The session already is in that persona.
    AlreadyCurrent,
    /// Refused: the session keeps `current`.
    Keep {
        current: String,
        /// cooldown | oscillation
        reason: &'static str,
        /// For a cooldown: when a switch would be allowed.
        retry_after_ms: Option<i64>,
        oscillation: Option<(String, String)>,
    },
}

/// An oscillation the engine noticed (kept for `GET /api/oscillations`, newest last).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OscillationNotice {
    pub at: UnixMillis,
    pub session: String,
    pub chatmode: String,
    pub personas: [String; 2],
}

const MAX_OSCILLATION_NOTICES: usize = 200;

/// What applying an event did beyond what the event says, for adapters that describe it elsewhere
/// (spans: a stage span needs its start, a switch inferred from usage has no event of its own).
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A usage event moved its session to another persona.
    InferredSwitch {
        session: String,
        from: Option<String>,
        to: String,
        chatmode: String,
    },
    /// A stage ended (finished, superseded by the next stage, or ended with its run).
    StageEnded(crate::core::runs::EndedStage),
    /// A run finished.
    RunEnded {
        run: String,
        workflow: String,
        session: Option<String>,
        started_at: UnixMillis,
        status: &'static str,
    },
}

/// What the ledger's events have made of the engine: everything a snapshot keeps, so that a start
/// can load it and replay only the events after it. Not in it: the configuration (the current
/// one is applied on restore, as a reload would), budget overrides (their own table), and what
/// calls in flight hold (no call is in flight across a restart).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EngineState {
    budgets: BTreeMap<String, BudgetState>,
    labels: LabelGuard,
    sessions: Sessions,
    metrics: Metrics,
    runs: Runs,
    oscillation_notices: std::collections::VecDeque<OscillationNotice>,
    unsettled: HashMap<String, (UnixMillis, crate::core::event::CallAdmission)>,
    /// Of those, the calls other replicas admitted (theirs to settle).
    #[serde(default)]
    foreign_calls: std::collections::HashSet<String>,
    now: UnixMillis,
}

/// An admission older than this no longer counts as in flight fleet-wide: its replica died
/// without settling it (it settles it when it comes back), and a dead replica must not hold a
/// budget forever. Longer than any upstream timeout hypertool allows.
pub const STALE_ADMISSION_MS: i64 = 15 * 60_000;

/// The mutable heart of hypertool.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    overrides: HashMap<String, BudgetSpec>,
    budgets: BTreeMap<String, BudgetState>,
    labels: LabelGuard,
    sessions: Sessions,
    metrics: Metrics,
    none: Arc<str>,
    kinds: Interned,
    /// Tokens reserved by calls in flight, per canonical persona (not in the ledger: they settle
    /// into usage events or are released).
    reserved: HashMap<String, u64>,
    /// USD reserved by calls in flight, per canonical persona (cost budgets).
    reserved_cost: HashMap<String, f64>,
    /// Tokens reserved by calls in flight against a run's stage budget, per (run, stage).
    stage_reserved: HashMap<(String, String), u64>,
    /// Stages whose first call was admitted and whose `stage_started` is on its way to the
    /// ledger: later calls do not start them again.
    stage_starting: std::collections::HashSet<(String, String)>,
    /// Replaying the ledger: rebuild state, but do not log warnings again.
    quiet: bool,
    runs: Runs,
    oscillation_notices: std::collections::VecDeque<OscillationNotice>,
    /// What `apply` did that the events do not say, collected only while an adapter (the trace
    /// exporter) takes it: `None` costs nothing.
    observations: Option<Vec<Observation>>,
    /// Gateway calls admitted and not yet settled by their usage (in flight, or cut off by a crash).
    unsettled: HashMap<String, (UnixMillis, crate::core::event::CallAdmission)>,
    /// Unsettled calls another replica admitted (a shared ledger): never settled here.
    foreign_calls: std::collections::HashSet<String>,
    /// Applying another replica's event (see [`Engine::apply_foreign`]).
    applying_foreign: bool,
    /// The latest time the engine has seen (events and ticks): what "running for" is measured to.
    now: UnixMillis,
    /// The replicas by their heartbeats (a shared ledger; `None`: not known yet, or a ledger of
    /// its own). A call admitted by a dead replica (its lease lapsed) no longer holds budget; one
    /// with no heartbeat yet (just started) is not dead.
    replicas: Option<Replicas>,
}

/// The replicas of a shared ledger by their heartbeats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replicas {
    pub live: Vec<String>,
    pub dead: Vec<String>,
}

impl Engine {
    pub fn new(config: EngineConfig, now: UnixMillis) -> Self {
        let mut engine = Self {
            labels: LabelGuard::new(config.label_cap),
            sessions: Sessions::new(config.session_idle_timeout_ms, config.max_sessions),
            config: config.clone(),
            overrides: HashMap::new(),
            budgets: BTreeMap::new(),
            metrics: Metrics::default(),
            none: Arc::from("none"),
            kinds: Interned::default(),
            reserved: HashMap::new(),
            replicas: None,
            reserved_cost: HashMap::new(),
            stage_reserved: HashMap::new(),
            stage_starting: std::collections::HashSet::new(),
            quiet: false,
            runs: Runs::default(),
            oscillation_notices: std::collections::VecDeque::new(),
            observations: None,
            unsettled: HashMap::new(),
            foreign_calls: std::collections::HashSet::new(),
            applying_foreign: false,
            now,
        };
        engine.reconfigure(config, now);
        engine
    }

    /// A copy of the state the ledger's events built (see [`EngineState`]).
    pub fn state(&self) -> EngineState {
        EngineState {
            budgets: self.budgets.clone(),
            labels: self.labels.clone(),
            sessions: self.sessions.clone(),
            metrics: self.metrics.clone(),
            runs: self.runs.clone(),
            oscillation_notices: self.oscillation_notices.clone(),
            unsettled: self.unsettled.clone(),
            foreign_calls: self.foreign_calls.clone(),
            now: self.now,
        }
    }

    /// An engine in `state` (from a snapshot) under `config` and the stored budget `overrides`,
    /// as if it had replayed the events the snapshot covers and then been reconfigured.
    pub fn restore(
        config: EngineConfig,
        overrides: Vec<(String, BudgetSpec)>,
        state: EngineState,
        now: UnixMillis,
    ) -> Result<Engine, String> {
        let mut engine = Engine::new(config.clone(), now);
        let EngineState {
            budgets,
            labels,
            sessions,
            metrics,
            runs,
            oscillation_notices,
            unsettled,
            foreign_calls,
            now: then,
        } = state;
        let fresh = Metrics::default();
        let mut restored = Metrics {
            persona_duration: fresh.persona_duration,
            stage_duration: fresh.stage_duration,
            generation_duration: fresh.generation_duration,
            prompt_tokens: fresh.prompt_tokens,
            mcp_tool_duration: fresh.mcp_tool_duration,
            ..metrics.clone()
        };
        restored
            .mcp_tool_duration
            .adopt(metrics.mcp_tool_duration)?;
        restored.prompt_tokens.adopt(metrics.prompt_tokens)?;
        restored.persona_duration.adopt(metrics.persona_duration)?;
        restored.stage_duration.adopt(metrics.stage_duration)?;
        restored
            .generation_duration
            .adopt(metrics.generation_duration)?;
        engine.metrics = restored;
        engine.budgets = budgets;
        engine.labels = labels;
        engine.sessions = sessions;
        engine.runs = runs;
        engine.oscillation_notices = oscillation_notices;
        engine.unsettled = unsettled;
        engine.foreign_calls = foreign_calls;
        engine.now = then;
        for (persona, spec) in overrides {
            if let Some(p) = engine.config.personas.get(&persona).map(|p| p.name.clone()) {
                engine.overrides.insert(p, spec);
            }
        }
        // The configuration's labels, session bounds and budgets win, as after a reload.
        engine.reconfigure(config, now.max(then));
        Ok(engine)
    }

    /// Applies a new configuration (start-up or hot reload). Usage so far is kept.
    pub fn reconfigure(&mut self, config: EngineConfig, now: UnixMillis) {
        self.labels.set_cap(config.label_cap);
        let persona_names: Vec<String> = config.personas.iter().map(|p| p.name.clone()).collect();
        self.labels.set_configured(
            LabelKind::Persona,
            persona_names.iter().chain(["none".to_string()].iter()),
        );
        for (kind, values) in &config.configured_labels {
            if *kind != LabelKind::Persona {
                self.labels.set_configured(*kind, values);
            }
        }
        self.sessions
            .configure(config.session_idle_timeout_ms, config.max_sessions);
        self.config = config;
        self.rebuild_budgets(now);
    }

    fn rebuild_budgets(&mut self, now: UnixMillis) {
        let mut next = BTreeMap::new();
        for persona in self.config.personas.iter() {
            let resolved = match self.overrides.get(&persona.name) {
                Some(spec) => Some((*spec, BudgetSource::Override)),
                None => self.config.budgets.get(&persona.name).copied(),
            };
            let Some((spec, source)) = resolved else {
                continue;
            };
            let state = match self.budgets.remove(&persona.name) {
                Some(mut state) => {
                    state.respec(spec, source, now);
                    state
                }
                None => BudgetState::new(spec, source, now),
            };
            next.insert(persona.name.clone(), state);
        }
        self.budgets = next;
    }

    /// The runtime budget overrides in force, by canonical persona.
    pub fn overrides(&self) -> &HashMap<String, BudgetSpec> {
        &self.overrides
    }

    /// Sets (or with `None` removes) the runtime override of a persona's budget.
    /// Returns false when the persona is unknown.
    pub fn set_override(
        &mut self,
        persona: &str,
        spec: Option<BudgetSpec>,
        now: UnixMillis,
    ) -> bool {
        let Some(name) = self.config.personas.get(persona).map(|p| p.name.clone()) else {
            return false;
        };
        match spec {
            Some(spec) => self.overrides.insert(name, spec),
            None => self.overrides.remove(&name),
        };
        self.rebuild_budgets(now);
        true
    }

    /// Applies an event another replica stored (a shared ledger): budgets, sessions, runs and
    /// admissions follow it, but this replica's counters and histograms do not — each replica
    /// counts what it stored, so that Prometheus's `sum` over replicas is the fleet.
    pub fn apply_foreign(&mut self, stamped: &Stamped) {
        let own = std::mem::take(&mut self.metrics);
        self.applying_foreign = true;
        self.apply(stamped);
        self.applying_foreign = false;
        self.metrics = own;
    }

    /// Applies one event. Events must arrive in ledger order.
    pub fn apply(&mut self, stamped: &Stamped) {
        let at = stamped.at;
        // Split borrows: the registry is read while labels, metrics and budgets change.
        let Engine {
            config,
            budgets,
            labels,
            sessions,
            metrics,
            none,
            kinds,
            quiet,
            runs,
            stage_starting,
            unsettled,
            foreign_calls,
            applying_foreign,
            ..
        } = self;
        let personas = &config.personas;
        let mut admit =
            |kind: LabelKind, raw: &str| admit(labels, metrics, config.label_cap, kind, raw);
        let mut closed = SessionOutcome::default();
        let mut ended: Vec<EndedStage> = Vec::new();
        // (session, chatmode) of a persona change, checked for oscillation afterwards.
        let mut changed: Option<(String, Arc<str>)> = None;
        match &stamped.event {
            Event::Usage(u) => {
                if let Some(call) = &u.call {
                    // A gateway call's usage settles its admission, once: a second settlement
                    // of the same call (its replica, back, and a survivor past the replica's
                    // lease both settled it) is the same tokens again, counted by no one —
                    // every replica applies the ledger in one order, so all keep the first.
                    if unsettled.remove(call).is_none() {
                        metrics.duplicate_settlements += 1.0;
                        return;
                    }
                    foreign_calls.remove(call);
                }
                let canonical = personas.canonical(&u.persona);
                let persona = admit(LabelKind::Persona, canonical);
                let chatmode = admit(LabelKind::Chatmode, &u.chatmode);
                let model = admit(LabelKind::Model, &u.model);
                let tokens = u.total_tokens();
                let cost = u.cost_usd.unwrap_or(0.0);
                if let Some(session) = &u.session {
                    closed = sessions.on_usage(session, &persona, &chatmode, at);
                    if closed.transition.is_some() {
                        changed = Some((session.clone(), chatmode.clone()));
                    }
                }
                if let (Some(run), Some(stage)) = (&u.run, &u.stage) {
                    runs.usage(run, stage, tokens);
                }
                if let (Some(workflow), Some(stage), Some(variant)) =
                    (&u.workflow, &u.stage, &u.variant)
                {
                    let key = [
                        admit(LabelKind::Workflow, workflow),
                        admit(LabelKind::Stage, stage),
                        admit(LabelKind::Variant, variant),
                    ];
                    metrics.variant_calls.inc_by(key.clone(), 1.0);
                    metrics.variant_cost_usd.inc_by(key, cost);
                }
                if let Some(budget) = budgets.get_mut(canonical) {
                    budget.record(at, tokens, cost);
                    // One usage can jump past both limits: it is counted as reaching the soft
                    // limit, and said as what it is, over budget.
                    let soft = budget.crossed_soft_limit();
                    let hard = budget.crossed_hard_limit();
                    if soft {
                        metrics.soft_limit_reached.inc_by([persona.clone()], 1.0);
                    }
                    if !*quiet && (soft || hard) {
                        let (used, limit) = (budget.used_tokens(), budget.spec.tokens);
                        if hard {
                            tracing::warn!(
                                persona = canonical,
                                used,
                                limit,
                                "persona `{canonical}` is over its token budget ({used} of {limit} used)"
                            );
                        } else {
                            tracing::warn!(
                                persona = canonical,
                                used,
                                limit,
                                "persona `{canonical}` reached the soft limit of its token budget ({used} of {limit} used)"
                            );
                        }
                    }
                }
                if u.prompt_tokens > 0 {
                    metrics
                        .prompt_tokens
                        .observe([persona.clone(), model.clone()], u.prompt_tokens as f64);
                }
                if let Some(d) = u.duration_seconds {
                    metrics.generation_duration.observe([model.clone()], d);
                }
                if u.cost_usd.is_some() {
                    metrics
                        .cost_usd
                        .inc_by([persona.clone(), chatmode.clone(), model.clone()], cost);
                }
                metrics
                    .tokens
                    .inc_by([persona, chatmode, model], tokens as f64);
            }
            Event::PersonaSwitch(s) => {
                let from = match &s.from {
                    Some(f) => admit(LabelKind::Persona, personas.canonical(f)),
                    None => none.clone(),
                };
                let to = admit(LabelKind::Persona, personas.canonical(&s.to));
                let chatmode = admit(LabelKind::Chatmode, &s.chatmode);
                closed = sessions.on_switch(&s.session, &to, &chatmode, at);
                if from != to {
                    changed = Some((s.session.clone(), chatmode.clone()));
                }
                metrics.switches.inc_by([from, to, chatmode], 1.0);
            }
            Event::Stage(st) => {
                let persona = admit(LabelKind::Persona, personas.canonical(&st.persona));
                let workflow = admit(LabelKind::Workflow, &st.workflow);
                let stage = admit(LabelKind::Stage, &st.stage);
                let model = admit(LabelKind::Model, &st.model);
                metrics.stage_duration.observe(
                    [workflow.clone(), stage.clone(), persona],
                    st.duration_seconds,
                );
                count_gate(metrics, kinds, [workflow, stage, model], st.gate);
            }
            Event::BudgetReset { persona } => {
                if let Some(budget) = budgets.get_mut(personas.canonical(persona)) {
                    budget.reset(at);
                }
            }
            Event::RunStarted {
                run,
                workflow,
                session,
                owner,
            } => {
                let owner = owner.as_deref().map(|p| personas.canonical(p));
                if runs.start_run(run, workflow, session.as_deref(), owner, at) {
                    let workflow = admit(LabelKind::Workflow, workflow);
                    metrics.runs_started.inc_by([workflow], 1.0);
                }
            }
            Event::StageStarted {
                run,
                workflow,
                stage,
                persona,
                variant,
            } => {
                let persona = persona.as_deref().map(|p| personas.canonical(p));
                let had_variant = runs
                    .get(run)
                    .and_then(|r| r.stages.get(stage))
                    .is_some_and(|s| s.variant.is_some());
                ended = runs.start_stage(run, stage, persona, variant.as_deref(), at);
                // A run counts for the variant its stage first started on.
                let fixed = runs
                    .get(run)
                    .and_then(|r| r.stages.get(stage))
                    .and_then(|s| s.variant.clone());
                if let (false, Some(v)) = (had_variant, fixed) {
                    let key = [
                        admit(LabelKind::Workflow, workflow),
                        admit(LabelKind::Stage, stage),
                        admit(LabelKind::Variant, &v),
                    ];
                    metrics.variant_runs.inc_by(key, 1.0);
                }
                if !stage_starting.is_empty() {
                    stage_starting.remove(&(run.clone(), stage.clone()));
                }
            }
            Event::StageFinished { run, stage, .. } => {
                ended.extend(runs.finish_stage(run, stage, at));
            }
            Event::RunFinished {
                run,
                workflow,
                status,
            } => {
                let status = RunStatus::parse(status).unwrap_or(RunStatus::Completed);
                ended = runs.finish_run(run, status, at);
                let workflow = admit(LabelKind::Workflow, workflow);
                metrics
                    .runs_finished
                    .inc_by([workflow, Arc::from(status.as_str())], 1.0);
            }
            Event::QualityGate(g) => {
                let GateVerdictEvent {
                    workflow,
                    stage,
                    model,
                    result,
                    reasons,
                    run,
                    ..
                } = g;
                if let Some(run) = run {
                    runs.gate(run, stage, model, *result, reasons.as_deref());
                }
                let workflow = admit(LabelKind::Workflow, workflow);
                let stage = admit(LabelKind::Stage, stage);
                let model = admit(LabelKind::Model, model);
                if let Some(v) = &g.variant {
                    let variant = admit(LabelKind::Variant, v);
                    let key = [workflow.clone(), stage.clone(), variant.clone()];
                    if g.attempt > 1 {
                        metrics.variant_retries.inc_by(key.clone(), 1.0);
                    }
                    if g.escalated {
                        metrics.variant_escalations.inc_by(key, 1.0);
                    }
                    let result: Arc<str> = Arc::from(result.as_str());
                    metrics
                        .variant_gates
                        .inc_by([workflow.clone(), stage.clone(), variant, result], 1.0);
                }
                count_gate(metrics, kinds, [workflow, stage, model], *result);
            }
            Event::CallAdmitted(c) => {
                // In flight: its reservation is in memory already (live); a replay keeps it
                // until its usage comes, and what is left at the end was cut off by a crash.
                unsettled.insert(c.call.clone(), (at, c.clone()));
                if *applying_foreign {
                    foreign_calls.insert(c.call.clone());
                }
            }
            Event::CallReleased { call } => {
                unsettled.remove(call);
                foreign_calls.remove(call);
            }
            Event::CallProgress {
                call,
                completion_tokens,
            } => {
                if let Some((_, admission)) = unsettled.get_mut(call) {
                    admission.streamed_tokens = admission.streamed_tokens.max(*completion_tokens);
                }
            }
            // History for the runbook's investigation; nothing to count.
            Event::GateChanged { .. } | Event::VariantsChanged { .. } | Event::Audit(_) => {}
            Event::ExperimentDecided {
                workflow,
                stage,
                variant,
                p_best,
                runs: total,
            } => {
                let key = [
                    admit(LabelKind::Workflow, workflow),
                    admit(LabelKind::Stage, stage),
                    admit(LabelKind::Variant, variant),
                ];
                // Once per variant: replicas that both saw the decision store it twice.
                if metrics
                    .experiment_decisions
                    .get([&*key[0], &*key[1], &*key[2]])
                    == 0.0
                {
                    metrics.experiment_decisions.inc_by(key, 1.0);
                    if !*quiet {
                        tracing::info!(workflow = %workflow, stage = %stage, variant = %variant,
                            "experiment decided: `{variant}` is the best variant of stage `{stage}` of workflow \
                             `{workflow}` with probability {p_best:.3} after {total} runs; the allocation goes on \
                             until you promote it (hypertool experiments promote {workflow} {stage} {variant})");
                    }
                }
            }
            Event::McpToolCall(c) => {
                let persona = admit(LabelKind::Persona, personas.canonical(&c.persona));
                let server = admit(LabelKind::Server, &c.server);
                let tool = admit(LabelKind::Tool, &c.tool);
                let result: Arc<str> = Arc::from(c.result.as_str());
                metrics
                    .mcp_tool_calls
                    .inc_by([persona.clone(), server.clone(), tool.clone(), result], 1.0);
                metrics
                    .mcp_tool_duration
                    .observe([persona, server, tool], c.duration_seconds);
                // A tool call is the session's activity in its persona (no switch is inferred:
                // the proxy switches explicitly).
                if let Some(session) = &c.session {
                    sessions.touch(session, at);
                }
            }
            Event::SwitchSuppressed {
                chatmode, reason, ..
            } => {
                let chatmode = admit(LabelKind::Chatmode, chatmode);
                let reason: Arc<str> = match reason.as_str() {
                    "cooldown" => Arc::from("cooldown"),
                    _ => Arc::from("oscillation"),
                };
                metrics.switches_suppressed.inc_by([chatmode, reason], 1.0);
            }
        }
        // The closure above borrows the metrics; from here on the function is called directly.
        let cap = config.label_cap;
        if let Some(obs) = self.observations.as_mut() {
            if let (Event::Usage(u), Some(t)) = (&stamped.event, &closed.transition) {
                obs.push(Observation::InferredSwitch {
                    session: u.session.clone().unwrap_or_default(),
                    from: t.from.as_ref().map(|f| f.to_string()),
                    to: t.to.to_string(),
                    chatmode: t.chatmode.to_string(),
                });
            }
            obs.extend(ended.iter().cloned().map(Observation::StageEnded));
            if let Event::RunFinished { run, .. } = &stamped.event {
                if let Some(r) = runs.get(run) {
                    obs.push(Observation::RunEnded {
                        run: r.id.clone(),
                        workflow: r.workflow.clone(),
                        session: r.session.clone(),
                        started_at: r.created_at,
                        status: r.status.as_str(),
                    });
                }
            }
        }
        for e in ended {
            let workflow = self::admit(labels, metrics, cap, LabelKind::Workflow, &e.workflow);
            let stage = self::admit(labels, metrics, cap, LabelKind::Stage, &e.stage);
            let persona = match &e.persona {
                Some(p) => self::admit(labels, metrics, cap, LabelKind::Persona, p),
                None => none.clone(),
            };
            if let Some(v) = &e.variant {
                let variant = self::admit(labels, metrics, cap, LabelKind::Variant, v);
                metrics
                    .variant_stage_duration
                    .observe([workflow.clone(), stage.clone(), variant], e.seconds);
            }
            metrics
                .stage_duration
                .observe([workflow, stage, persona], e.seconds);
        }
        if let Some((session, chatmode)) = changed {
            if let Some((a, b)) =
                sessions.oscillation(&session, config.switching.oscillation_window_ms)
            {
                metrics.oscillations.inc_by([chatmode.clone()], 1.0);
                if !*quiet {
                    tracing::warn!(session = %session, chatmode = %chatmode, personas = %format!("{a},{b}"),
                        "session `{session}` oscillates between `{a}` and `{b}` (A->B->A->B within {} s); \
                         add a cooldown or route by capability (POST /v1/personas/route)",
                        config.switching.oscillation_window_ms / 1000);
                }
                self.oscillation_notices.push_back(OscillationNotice {
                    at,
                    session,
                    chatmode: chatmode.to_string(),
                    personas: [a.to_string(), b.to_string()],
                });
                while self.oscillation_notices.len() > MAX_OSCILLATION_NOTICES {
                    self.oscillation_notices.pop_front();
                }
            }
        }
        self.now = self.now.max(at);
        let kind = match &stamped.event {
            Event::Usage(_) => &kinds.usage,
            Event::PersonaSwitch(_) => &kinds.persona_switch,
            Event::Stage(_) => &kinds.stage,
            Event::BudgetReset { .. } => &kinds.budget_reset,
            other => &Arc::from(other.kind()),
        };
        self.metrics.events_applied.inc_by([kind.clone()], 1.0);
        self.absorb(closed);
    }

    /// Advances time: closes idle sessions and starts new budget periods.
    pub fn tick(&mut self, now: UnixMillis) {
        self.now = self.now.max(now);
        let closed = self.sessions.expire(now);
        self.absorb(SessionOutcome {
            closed,
            transition: None,
        });
        for budget in self.budgets.values_mut() {
            budget.roll(now);
        }
    }

    fn absorb(&mut self, outcome: SessionOutcome) {
        if outcome.closed.is_empty() && outcome.transition.is_none() {
            return;
        }
        for period in outcome.closed {
            self.metrics
                .persona_duration
                .observe([period.persona, period.chatmode], period.seconds);
        }
        if let Some(t) = outcome.transition {
            let from = t.from.unwrap_or_else(|| self.none.clone());
            self.metrics.switches.inc_by([from, t.to, t.chatmode], 1.0);
        }
    }

    /// Gateway calls admitted whose usage never came: after a replay, the calls a crash cut off.
    /// Each with the time it was admitted.
    /// The admission of `call` while it is not settled (its usage or release not applied).
    pub fn unsettled_call(&self, call: &str) -> Option<crate::core::event::CallAdmission> {
        self.unsettled.get(call).map(|(_, c)| c.clone())
    }

    pub fn unsettled_calls(&self) -> Vec<(UnixMillis, crate::core::event::CallAdmission)> {
        // Another replica's calls are its own to settle (when it comes back).
        let mut calls: Vec<_> = self
            .unsettled
            .iter()
            .filter(|(call, _)| !self.foreign_calls.contains(*call))
            .map(|(_, v)| v.clone())
            .collect();
        calls.sort_by(|a, b| (a.0, &a.1.call).cmp(&(b.0, &b.1.call)));
        calls
    }

    /// Starts (or stops) collecting [`Observation`]s for [`Engine::take_observations`].
    pub fn set_observing(&mut self, on: bool) {
        self.observations = on.then(Vec::new);
    }

    /// The observations of the events applied since the last call.
    pub fn take_observations(&mut self) -> Vec<Observation> {
        self.observations
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// While quiet (ledger replay at start-up), warnings already given are not logged again.
    pub fn set_quiet(&mut self, quiet: bool) {
        self.quiet = quiet;
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// For adapters that feed series the events do not carry (Langfuse exporter, gateway timings).
    pub fn metrics_mut(&mut self) -> &mut Metrics {
        &mut self.metrics
    }

    pub fn personas(&self) -> &PersonaRegistry {
        &self.config.personas
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Budgets by canonical persona name.
    pub fn budgets(&self) -> &BTreeMap<String, BudgetState> {
        &self.budgets
    }

    pub fn budget(&self, persona: &str) -> Option<&BudgetState> {
        let canonical = self.config.personas.canonical(persona);
        self.budgets.get(canonical)
    }

    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    pub fn session(&self, id: &str) -> Option<SessionView> {
        self.sessions.view(id)
    }

    pub fn runs(&self) -> &Runs {
        &self.runs
    }

    /// What a stage variant did so far (runs, gate verdicts, cost), from the counters — which
    /// the ledger rebuilds at start-up and which every replica applies alike.
    pub fn variant_record(
        &self,
        workflow: &str,
        stage: &str,
        variant: &str,
    ) -> crate::core::workflow::VariantRecord {
        let m = &self.metrics;
        crate::core::workflow::VariantRecord {
            runs: m.variant_runs.get([workflow, stage, variant]),
            passes: m.variant_gates.get([workflow, stage, variant, "pass"]),
            failures: m.variant_gates.get([workflow, stage, variant, "fail"]),
            cost_usd: m.variant_cost_usd.get([workflow, stage, variant]),
            ..Default::default()
        }
    }

    /// [`Engine::variant_record`] with what the evidence shows besides: gate retries,
    /// escalations, and the p50/p95 of the variant's stage durations.
    pub fn variant_evidence(
        &self,
        workflow: &str,
        stage: &str,
        variant: &str,
    ) -> crate::core::workflow::VariantRecord {
        let m = &self.metrics;
        let durations = m.variant_stage_duration.get([workflow, stage, variant]);
        let quantile = |q: f64| {
            let h = durations.filter(|h| h.count > 0)?;
            let bounds = m.variant_stage_duration.bounds.iter().copied();
            let mut buckets: Vec<(f64, f64)> = bounds
                .chain([f64::INFINITY])
                .zip(h.cumulative())
                .map(|(b, c)| (b, c as f64))
                .collect();
            let v = crate::core::series::bucket_quantile(q, &mut buckets);
            v.is_finite().then_some(v)
        };
        crate::core::workflow::VariantRecord {
            retries: m.variant_retries.get([workflow, stage, variant]),
            escalations: m.variant_escalations.get([workflow, stage, variant]),
            duration_p50_seconds: quantile(0.5),
            duration_p95_seconds: quantile(0.95),
            ..self.variant_record(workflow, stage, variant)
        }
    }

    /// The latest time seen (events and ticks).
    pub fn now(&self) -> UnixMillis {
        self.now
    }

    pub fn oscillation_notices(&self) -> impl DoubleEndedIterator<Item = &OscillationNotice> {
        self.oscillation_notices.iter()
    }

    /// What the switch policy says of switching `session` to `to` in `chatmode` at `now`.
    pub fn decide_switch(
        &self,
        session: &str,
        to: &str,
        chatmode: &str,
        now: UnixMillis,
    ) -> SwitchDecision {
        let policy = &self.config.switching;
        let to: Arc<str> = Arc::from(self.config.personas.canonical(to));
        let Some((current, last_switch)) = self.sessions.current(session, now) else {
            return SwitchDecision::Switch {
                from: None,
                oscillation: None,
            };
        };
        if current == to {
            return SwitchDecision::AlreadyCurrent;
        }
        let cooldown = policy.cooldown_for(chatmode);
        if let Some(last) = last_switch {
            if now - last < cooldown {
                return SwitchDecision::Keep {
                    current: current.to_string(),
                    reason: "cooldown",
                    retry_after_ms: Some(last + cooldown - now),
                    oscillation: None,
                };
            }
        }
        let oscillation = self
            .sessions
            .would_oscillate(session, &to, now, policy.oscillation_window_ms)
            .map(|(a, b)| (a.to_string(), b.to_string()));
        if oscillation.is_some() && policy.suppress_oscillation {
            return SwitchDecision::Keep {
                current: current.to_string(),
                reason: "oscillation",
                retry_after_ms: None,
                oscillation,
            };
        }
        SwitchDecision::Switch {
            from: Some(current.to_string()),
            oscillation,
        }
    }
}

/// Interned label values the engine writes on every event, so the hot path does not allocate them.
#[derive(Debug)]
struct Interned {
    usage: Arc<str>,
    persona_switch: Arc<str>,
    stage: Arc<str>,
    budget_reset: Arc<str>,
    pass: Arc<str>,
    fail: Arc<str>,
}

impl Default for Interned {
    fn default() -> Self {
        Self {
            usage: Arc::from("usage"),
            persona_switch: Arc::from("persona_switch"),
            stage: Arc::from("stage"),
            budget_reset: Arc::from("budget_reset"),
            pass: Arc::from(GateResult::Pass.as_str()),
            fail: Arc::from(GateResult::Fail.as_str()),
        }
    }
}

/// One gate verdict for (workflow, stage, model). Both results exist once a stage is seen, so
/// `rate()` has a zero to start from.
fn count_gate(
    metrics: &mut Metrics,
    kinds: &Interned,
    [workflow, stage, model]: [Arc<str>; 3],
    result: GateResult,
) {
    let (pass, fail) = (kinds.pass.clone(), kinds.fail.clone());
    let (hit, other) = match result {
        GateResult::Pass => (pass, fail),
        GateResult::Fail => (fail, pass),
    };
    metrics
        .quality_gates
        .touch([workflow.clone(), stage.clone(), model.clone(), other]);
    metrics
        .quality_gates
        .inc_by([workflow, stage, model, hit], 1.0);
}

/// The label value to use for `raw`, counting (and the first time, logging) folds into `other`.
fn admit(
    labels: &mut LabelGuard,
    metrics: &mut Metrics,
    cap: usize,
    kind: LabelKind,
    raw: &str,
) -> Arc<str> {
    let label_guard::Admitted { value, first_fold } = labels.admit(kind, raw);
    if value.as_ref() == OTHER && raw != OTHER {
        if first_fold {
            tracing::warn!(
                label = kind.name(),
                cap,
                "label `{}` reached its cap of {} values; further values fold into `other` \
                 (raise `labels.max_values_per_label` or list the values in hypertool.toml)",
                kind.name(),
                cap
            );
        }
        metrics
            .label_values_folded
            .inc_by([Arc::from(kind.name())], 1.0);
    }
    value
}

#[cfg(test)]
mod tests;
