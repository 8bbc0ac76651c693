//! The engine: applies events to the core's state (budgets, sessions, metric series).
//!
//! It is deliberately synchronous and single-threaded: the ledger writer applies events in exactly
//! the order they were stored, so replaying the ledger after a restart reproduces the same state.

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

/// Every series the core keeps. Budget gauges and persona info are derived at render time.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// from_persona, to_persona, chatmode
    pub switches: CounterVec<3>,
    /// persona, chatmode
    pub persona_duration: HistogramVec<2>,
    /// persona, chatmode, model
    pub tokens: CounterVec<3>,
    /// persona, chatmode, model
    pub cost_usd: CounterVec<3>,
    /// workflow, stage, persona
    pub stage_duration: HistogramVec<3>,
    /// workflow, stage, model, result
    pub quality_gates: CounterVec<4>,
    /// model (fed by the gateway)
    pub generation_duration: HistogramVec<1>,
    /// persona, model: prompt tokens per call (snapshots from before it start it empty)
    #[serde(default = "crate::core::series::prompt_tokens_histogram")]
    pub prompt_tokens: HistogramVec<2>,
    /// Traces created in Langfuse (fed by the Langfuse exporter).
    pub langfuse_traces_created: f64,
    /// type
    pub events_applied: CounterVec<1>,
    /// label
    pub label_values_folded: CounterVec<1>,
    /// persona: budgets that reached their soft limit (once per period each)
    pub soft_limit_reached: CounterVec<1>,
    /// chatmode, reason: switches refused by the switch policy
    pub switches_suppressed: CounterVec<2>,
    /// chatmode: A→B→A→B patterns seen in sessions
    pub oscillations: CounterVec<1>,
    /// workflow
    pub runs_started: CounterVec<1>,
    /// workflow, status
    pub runs_finished: CounterVec<2>,
    /// persona, server, tool, result: tool calls through the MCP proxy
    #[serde(default)]
    pub mcp_tool_calls: CounterVec<4>,
    /// persona, server, tool
    #[serde(default = "crate::core::series::tool_call_duration_histogram")]
    pub mcp_tool_duration: HistogramVec<3>,
    /// workflow, stage, variant: runs whose stage started on the variant
    #[serde(default)]
    pub variant_runs: CounterVec<3>,
    /// workflow, stage, variant, result: gate verdicts of the variant's outputs
    #[serde(default)]
    pub variant_gates: CounterVec<4>,
    /// workflow, stage, variant: calls made on the variant
    #[serde(default)]
    pub variant_calls: CounterVec<3>,
    /// workflow, stage, variant: their cost
    #[serde(default)]
    pub variant_cost_usd: CounterVec<3>,
    /// workflow, stage, variant: gate retries (verdicts of attempts after the first)
    #[serde(default)]
    pub variant_retries: CounterVec<3>,
    /// workflow, stage, variant: gate retries sent to the stage's escalation model
    #[serde(default)]
    pub variant_escalations: CounterVec<3>,
    /// workflow, stage, variant: how long the variant's stages took
    #[serde(default = "crate::core::series::stage_duration_histogram")]
    pub variant_stage_duration: HistogramVec<3>,
    /// workflow, stage, variant: experiments decided for the variant (once each)
    #[serde(default)]
    pub experiment_decisions: CounterVec<3>,
    /// Usage events of a call already settled (stored twice across replicas), not counted.
    #[serde(default)]
    pub duplicate_settlements: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            switches: CounterVec::default(),
            persona_duration: HistogramVec::new(PERSONA_DURATION_BUCKETS),
            tokens: CounterVec::default(),
            cost_usd: CounterVec::default(),
            stage_duration: HistogramVec::new(STAGE_DURATION_BUCKETS),
            quality_gates: CounterVec::default(),
            generation_duration: HistogramVec::new(GENERATION_DURATION_BUCKETS),
            prompt_tokens: HistogramVec::new(PROMPT_TOKENS_BUCKETS),
            langfuse_traces_created: 0.0,
            events_applied: CounterVec::default(),
            label_values_folded: CounterVec::default(),
            soft_limit_reached: CounterVec::default(),
            switches_suppressed: CounterVec::default(),
            oscillations: CounterVec::default(),
            runs_started: CounterVec::default(),
            runs_finished: CounterVec::default(),
            mcp_tool_calls: CounterVec::default(),
            mcp_tool_duration: crate::core::series::tool_call_duration_histogram(),
            variant_runs: CounterVec::default(),
            variant_gates: CounterVec::default(),
            variant_calls: CounterVec::default(),
            variant_cost_usd: CounterVec::default(),
            variant_retries: CounterVec::default(),
            variant_escalations: CounterVec::default(),
            variant_stage_duration: crate::core::series::stage_duration_histogram(),
            experiment_decisions: CounterVec::default(),
            duplicate_settlements: 0.0,
        }
    }
}

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
            if run.status != super::runs::RunStatus::Running {
                return Err(Refusal::RunNotRunning {
                    run: st.run.to_string(),
                    status: run.status.as_str(),
                });
            }
            let key = (st.run.to_string(), st.stage.to_string());
            let stage_run = run.stages.get(st.stage);
            let used = stage_run.map_or(0, |s| s.tokens);
            let running = stage_run.is_some_and(|s| s.status == super::runs::StageStatus::Running);
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
            downgrade = over && budget.spec.mode == super::budget::BudgetMode::Downgrade;
            if over && budget.spec.mode == super::budget::BudgetMode::Block {
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
            .is_some_and(|b| b.spec.mode != super::budget::BudgetMode::Observe)
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
        (budget.spec.mode == super::budget::BudgetMode::Block).then_some((canonical, budget))
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
mod tests {
    use super::*;
    use crate::config::{load, Source};
    use crate::core::budget::{BudgetMode, BudgetSpec, Period};
    use crate::core::event::Usage;

    #[test]
    fn fleet_room_counts_every_replicas_calls_in_flight_until_they_go_stale_and_settles_only_its_own(
    ) {
        let config = load(&Source::Embedded).unwrap().engine_config();
        let mut engine = Engine::new(config, 0);
        let spec = BudgetSpec {
            tokens: 1_000,
            cost_usd: None,
            period: Period::None,
            mode: BudgetMode::Block,
            soft_limit: None,
        };
        assert!(engine.set_override("backend-engineer", Some(spec), 0));
        let admitted = |call: &str, estimate| Stamped {
            at: 0,
            event: Event::CallAdmitted(crate::core::event::CallAdmission {
                call: call.into(),
                persona: "backend-engineer".into(),
                chatmode: "c".into(),
                model: "m".into(),
                estimate,
                cost_usd: None,
                workflow: None,
                stage: None,
                session: None,
                run: None,
                streamed_tokens: 0,
                replica: None,
            }),
        };
        engine.apply(&admitted("mine", 300));
        // What a stream cut off by a crash had sent is counted on top of its estimate.
        for (at, n) in [(1, 40), (2, 25)] {
            engine.apply(&Stamped {
                at,
                event: Event::CallProgress {
                    call: "mine".into(),
                    completion_tokens: n,
                },
            });
        }
        let settled = engine.unsettled_calls()[0].1.as_settlement();
        assert_eq!(
            (settled.prompt_tokens, settled.completion_tokens),
            (300, 40)
        );
        engine.apply_foreign(&admitted("theirs", 500));
        assert_eq!(engine.fleet_room("backend-engineer"), Some(200));
        // Only this replica's own call is its to settle after a crash.
        let own: Vec<String> = engine
            .unsettled_calls()
            .into_iter()
            .map(|(_, c)| c.call)
            .collect();
        assert_eq!(own, vec!["mine".to_string()]);
        // A replica that never came back does not hold the budget forever.
        engine.tick(STALE_ADMISSION_MS + 1);
        assert_eq!(engine.fleet_room("backend-engineer"), Some(1_000));
        assert_eq!(
            engine.fleet_room("frontend-engineer"),
            None,
            "not a block budget"
        );
    }

    fn engine_with_cost_budget(usd: f64) -> Engine {
        let config = load(&Source::Embedded).unwrap().engine_config();
        let mut engine = Engine::new(config, 0);
        let spec = BudgetSpec {
            tokens: 1_000_000,
            cost_usd: Some(usd),
            period: Period::None,
            mode: BudgetMode::Block,
            soft_limit: None,
        };
        assert!(engine.set_override("backend-engineer", Some(spec), 0));
        engine
    }

    #[test]
    fn a_call_settled_twice_counts_once() {
        let config = load(&Source::Embedded).unwrap().engine_config();
        let mut e = Engine::new(config, 0);
        let admission = crate::core::event::CallAdmission {
            call: "c1".into(),
            persona: "backend-engineer".into(),
            chatmode: "c".into(),
            model: "m".into(),
            estimate: 300,
            cost_usd: None,
            workflow: None,
            stage: None,
            session: None,
            run: None,
            replica: Some("dead".into()),
            streamed_tokens: 0,
        };
        e.apply(&Stamped {
            at: 1,
            event: Event::CallAdmitted(admission.clone()),
        });
        // The survivor's settlement, then the replica's own at its restart: the first counts.
        for at in [2, 3] {
            e.apply(&Stamped {
                at,
                event: Event::Usage(admission.as_settlement()),
            });
        }
        assert_eq!(e.budget("backend-engineer").unwrap().used_tokens(), 300);
        assert_eq!(e.metrics().duplicate_settlements, 1.0);
        assert!(e.unsettled_calls().is_empty());
    }

    #[test]
    fn a_variants_retries_escalations_durations_and_its_decision_are_kept() {
        let config = load(&Source::Embedded).unwrap().engine_config();
        let mut e = Engine::new(config, 0);
        let mut apply = |at: UnixMillis, event: Event| e.apply(&Stamped { at, event });
        let (w, st) = ("feature-development", "implementation");
        for (i, seconds) in [10_i64, 20, 30, 40].into_iter().enumerate() {
            let run = format!("r{i}");
            let start = i as i64 * 100_000;
            apply(
                start,
                Event::RunStarted {
                    run: run.clone(),
                    workflow: w.into(),
                    session: None,
                    owner: None,
                },
            );
            apply(
                start,
                Event::StageStarted {
                    run: run.clone(),
                    workflow: w.into(),
                    stage: st.into(),
                    persona: None,
                    variant: Some("v4".into()),
                },
            );
            // The first two runs fail once and pass on a retry on the escalation model.
            for (attempt, result) in if i < 2 {
                vec![(1, GateResult::Fail), (2, GateResult::Pass)]
            } else {
                vec![(1, GateResult::Pass)]
            } {
                apply(
                    start + 1,
                    Event::QualityGate(GateVerdictEvent {
                        workflow: w.into(),
                        stage: st.into(),
                        model: "m".into(),
                        result,
                        reasons: None,
                        run: Some(run.clone()),
                        attempt,
                        variant: Some("v4".into()),
                        escalated: attempt > 1,
                    }),
                );
            }
            apply(
                start + seconds * 1000,
                Event::StageFinished {
                    run: run.clone(),
                    workflow: w.into(),
                    stage: st.into(),
                },
            );
        }
        let r = e.variant_evidence(w, st, "v4");
        assert_eq!((r.runs, r.passes, r.failures), (4.0, 4.0, 2.0));
        assert_eq!((r.retries, r.escalations), (2.0, 2.0));
        // Quantiles from the stage-duration buckets (…, 15, 30, 60, …): 2 of 4 at most 30 s.
        let (p50, p95) = (
            r.duration_p50_seconds.unwrap(),
            r.duration_p95_seconds.unwrap(),
        );
        assert!(
            (15.0..=30.0).contains(&p50) && (30.0..=60.0).contains(&p95),
            "{p50} {p95}"
        );

        // A decision counts once, however often it is stored (two replicas deciding together).
        for at in [500_000, 500_001] {
            e.apply(&Stamped {
                at,
                event: Event::ExperimentDecided {
                    workflow: w.into(),
                    stage: st.into(),
                    variant: "v4".into(),
                    p_best: 0.97,
                    runs: 4,
                },
            });
        }
        assert_eq!(e.metrics().experiment_decisions.get([w, st, "v4"]), 1.0);
    }

    #[test]
    fn a_run_stage_budget_and_the_stage_start_are_decided_with_admission() {
        let config = load(&Source::Embedded).unwrap().engine_config();
        let mut e = Engine::new(config, 0);
        let stamp = |at, event| Stamped { at, event };
        e.apply(&stamp(
            0,
            Event::RunStarted {
                run: "r1".into(),
                workflow: "feature-development".into(),
                session: None,
                owner: None,
            },
        ));
        let claim = |estimate| CallClaim {
            persona: "backend-engineer",
            estimate,
            cost_estimate: 0.0,
            stage: Some(StageClaim {
                run: "r1",
                workflow: "feature-development",
                stage: "design",
                budget_tokens: Some(100),
            }),
        };
        // The first call starts the stage; the next, admitted before its stage_started is
        // applied, does not start it again.
        let first = e.admit_call(&claim(40), 1).unwrap();
        assert!(first.start_stage);
        let second = e.admit_call(&claim(40), 2).unwrap();
        assert!(!second.start_stage);
        // 80 held in flight: 30 more would pass the 100-token stage budget, nothing was used yet.
        match e.admit_call(&claim(30), 3) {
            Err(Refusal::StageBudget {
                used, in_flight, ..
            }) => assert_eq!((used, in_flight), (0, 80)),
            other => panic!("{other:?}"),
        }
        // The persona's reservation was not taken by the refused call.
        assert_eq!(e.reserved("backend-engineer"), 80);
        assert!(e.admit_call(&claim(20), 3).is_ok());
        e.apply(&stamp(
            4,
            Event::StageStarted {
                run: "r1".into(),
                workflow: "feature-development".into(),
                stage: "design".into(),
                persona: Some("backend-engineer".into()),
                variant: None,
            },
        ));
        // One call settles with 35 tokens; its hold is given back.
        e.apply(&stamp(
            5,
            Event::Usage(Usage {
                run: Some("r1".into()),
                persona: "backend-engineer".into(),
                chatmode: "c".into(),
                model: "m".into(),
                prompt_tokens: 30,
                completion_tokens: 5,
                workflow: Some("feature-development".into()),
                stage: Some("design".into()),
                session: None,
                cost_usd: None,
                duration_seconds: None,
                prompt_hash: None,
                estimated: false,
                call: None,
                cache_read_tokens: 0,
                cache_write_tokens: 0,
                variant: None,
                prompt_version: None,
            }),
        ));
        e.release_stage(first.stage.as_ref().unwrap());
        e.release("backend-engineer", first.reserved, 0.0);
        // used 35 + in flight 60 = 95: 5 fit, 6 do not.
        assert!(e.admit_call(&claim(6), 6).is_err());
        let last = e.admit_call(&claim(5), 6).unwrap();
        assert!(!last.start_stage, "the stage is running");
        // A finished run admits nothing more.
        e.apply(&stamp(
            7,
            Event::RunFinished {
                run: "r1".into(),
                workflow: "feature-development".into(),
                status: "completed".into(),
            },
        ));
        assert!(matches!(
            e.admit_call(&claim(1), 8),
            Err(Refusal::RunNotRunning {
                status: "completed",
                ..
            })
        ));
    }

    #[test]
    fn cost_budgets_count_the_calls_in_flight() {
        let mut e = engine_with_cost_budget(1.0);
        let ok = |a: &Admission| matches!(a, Admission::Allowed { .. });
        assert!(ok(&e.admit("backend-engineer", 10, 0.4, 0)));
        assert!(ok(&e.admit("tta-backend-engineer", 10, 0.4, 0)));
        // 0.8 in flight: another 0.4 would pass the 1.0 limit.
        match e.admit("backend-engineer", 10, 0.4, 0) {
            Admission::Blocked { cost, .. } => {
                let (limit, used, in_flight) = cost.unwrap();
                assert_eq!((limit, used), (1.0, 0.0));
                assert!((in_flight - 0.8).abs() < 1e-12);
            }
            other => panic!("{other:?}"),
        }
        // One call settles: it cost 0.5, more than estimated.
        e.apply(&Stamped {
            at: 1,
            event: Event::Usage(Usage {
                persona: "backend-engineer".into(),
                chatmode: "c".into(),
                model: "m".into(),
                prompt_tokens: 5,
                completion_tokens: 5,
                cost_usd: Some(0.5),
                ..Usage::default()
            }),
        });
        e.release("backend-engineer", 10, 0.4);
        // 0.5 spent + 0.4 in flight + 0.1 = 1.0: allowed; anything more is not.
        assert!(ok(&e.admit("backend-engineer", 10, 0.1, 2)));
        assert!(!ok(&e.admit("backend-engineer", 10, 0.01, 2)));
        e.release("backend-engineer", 10, 0.4);
        e.release("backend-engineer", 10, 0.1);
        assert!(e.reserved_cost.is_empty(), "{:?}", e.reserved_cost);
        assert_eq!(e.reserved("backend-engineer"), 0);
    }
}
