//! The engine: applies events to the core's state (budgets, sessions, metric series).
//!
//! It is deliberately synchronous and single-threaded: the ledger writer applies events in exactly
//! the order they were stored, so replaying the ledger after a restart reproduces the same state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::budget::{BudgetSource, BudgetSpec, BudgetState};
use super::clock::UnixMillis;
use super::event::{Event, GateResult, Stamped};
use super::labels::{Admitted, LabelGuard, LabelKind};
use super::persona::PersonaRegistry;
use super::series::{
    CounterVec, HistogramVec, GENERATION_DURATION_BUCKETS, PERSONA_DURATION_BUCKETS,
    STAGE_DURATION_BUCKETS,
};
use super::session::{SessionOutcome, Sessions};

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
}

/// Every series the core keeps. Budget gauges and persona info are derived at render time.
#[derive(Debug, Clone)]
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
    /// Traces created in Langfuse (fed by the Langfuse exporter).
    pub langfuse_traces_created: f64,
    /// type
    pub events_applied: CounterVec<1>,
    /// label
    pub label_values_folded: CounterVec<1>,
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
            langfuse_traces_created: 0.0,
            events_applied: CounterVec::default(),
            label_values_folded: CounterVec::default(),
        }
    }
}

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
        };
        engine.reconfigure(config, now);
        engine
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

    /// Applies one event. Events must arrive in ledger order.
    pub fn apply(&mut self, stamped: &Stamped) {
        let at = stamped.at;
        match &stamped.event {
            Event::Usage(u) => {
                let canonical = self.config.personas.canonical(&u.persona).to_string();
                let persona = self.admit(LabelKind::Persona, &canonical);
                let chatmode = self.admit(LabelKind::Chatmode, &u.chatmode);
                let model = self.admit(LabelKind::Model, &u.model);
                let tokens = u.total_tokens();
                let cost = u.cost_usd.unwrap_or(0.0);
                self.metrics.tokens.inc_by(
                    [persona.clone(), chatmode.clone(), model.clone()],
                    tokens as f64,
                );
                if u.cost_usd.is_some() {
                    self.metrics
                        .cost_usd
                        .inc_by([persona.clone(), chatmode.clone(), model], cost);
                }
                if let Some(budget) = self.budgets.get_mut(&canonical) {
                    budget.record(at, tokens, cost);
                }
                if let Some(session) = &u.session {
                    let outcome = self.sessions.on_usage(session, &persona, &chatmode, at);
                    self.absorb(outcome);
                }
            }
            Event::PersonaSwitch(s) => {
                let from = match &s.from {
                    Some(f) => {
                        let canonical = self.config.personas.canonical(f).to_string();
                        self.admit(LabelKind::Persona, &canonical)
                    }
                    None => self.none.clone(),
                };
                let canonical_to = self.config.personas.canonical(&s.to).to_string();
                let to = self.admit(LabelKind::Persona, &canonical_to);
                let chatmode = self.admit(LabelKind::Chatmode, &s.chatmode);
                self.metrics
                    .switches
                    .inc_by([from, to.clone(), chatmode.clone()], 1.0);
                let outcome = self.sessions.on_switch(&s.session, &to, &chatmode, at);
                self.absorb(outcome);
            }
            Event::Stage(st) => {
                let canonical = self.config.personas.canonical(&st.persona).to_string();
                let persona = self.admit(LabelKind::Persona, &canonical);
                let workflow = self.admit(LabelKind::Workflow, &st.workflow);
                let stage = self.admit(LabelKind::Stage, &st.stage);
                let model = self.admit(LabelKind::Model, &st.model);
                self.metrics.stage_duration.observe(
                    [workflow.clone(), stage.clone(), persona],
                    st.duration_seconds,
                );
                // Both results exist once a stage is seen, so `rate()` has a zero to start from.
                for result in [GateResult::Pass, GateResult::Fail] {
                    let key = [
                        workflow.clone(),
                        stage.clone(),
                        model.clone(),
                        Arc::from(result.as_str()),
                    ];
                    if result == st.gate {
                        self.metrics.quality_gates.inc_by(key, 1.0);
                    } else {
                        self.metrics.quality_gates.touch(key);
                    }
                }
            }
            Event::BudgetReset { persona } => {
                let canonical = self.config.personas.canonical(persona).to_string();
                if let Some(budget) = self.budgets.get_mut(&canonical) {
                    budget.reset(at);
                }
            }
        }
        self.metrics
            .events_applied
            .inc_by([Arc::from(stamped.event.kind())], 1.0);
    }

    /// Advances time: closes idle sessions and starts new budget periods.
    pub fn tick(&mut self, now: UnixMillis) {
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

    fn admit(&mut self, kind: LabelKind, raw: &str) -> Arc<str> {
        let Admitted { value, first_fold } = self.labels.admit(kind, raw);
        if value.as_ref() == super::labels::OTHER && raw != super::labels::OTHER {
            if first_fold {
                tracing::warn!(
                    label = kind.name(),
                    cap = self.config.label_cap,
                    "label `{}` reached its cap of {} values; further values fold into `other` \
                     (raise `labels.max_values_per_label` or list the values in hypertool.toml)",
                    kind.name(),
                    self.config.label_cap
                );
            }
            self.metrics
                .label_values_folded
                .inc_by([Arc::from(kind.name())], 1.0);
        }
        value
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
}
