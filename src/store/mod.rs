//! The ledger: every accepted event, stored before it is acknowledged.
//!
//! [`Ledger`] is the storage trait (SQLite now; PostgreSQL for several replicas later).
//! [`writer`] owns the ledger on a thread of its own and applies each stored batch to the engine in
//! ledger order, so the in-memory state is always a replay of what is on disk.

pub mod postgres;
pub mod reader;
pub mod snapshot;
pub mod sqlite;
pub mod writer;

use crate::core::budget::BudgetSpec;
use crate::core::event::{Event, Stamped};

/// Storage errors carry the operation and the underlying message; never event contents.
#[derive(Debug, thiserror::Error)]
#[error("ledger {op} failed: {message}")]
pub struct LedgerError {
    pub op: &'static str,
    pub message: String,
    /// The connection was lost while the batch's COMMIT was under way, so whether it was stored is
    /// not known yet: these are the positions it would have (see [`Ledger::stored_own`]).
    pub in_doubt: Option<(u64, u64)>,
}

impl LedgerError {
    pub fn new(op: &'static str, e: impl std::fmt::Display) -> Self {
        Self {
            op,
            message: e.to_string(),
            in_doubt: None,
        }
    }

    pub fn in_doubt(self, positions: Option<(u64, u64)>) -> Self {
        Self {
            in_doubt: positions,
            ..self
        }
    }
}

/// The columns stored beside each event's JSON, for the queries analysts (and the runbook's
/// investigations) run most.
#[derive(Debug, Default, PartialEq)]
pub struct Columns<'a> {
    pub persona: Option<&'a str>,
    pub chatmode: Option<&'a str>,
    pub model: Option<&'a str>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cost_usd: Option<f64>,
}

impl<'a> Columns<'a> {
    pub fn of(event: &'a Event) -> Columns<'a> {
        let (persona, chatmode, model, prompt_tokens, completion_tokens, cost_usd) = match event {
            Event::Usage(u) => (
                Some(u.persona.as_str()),
                Some(u.chatmode.as_str()),
                Some(u.model.as_str()),
                i64::try_from(u.prompt_tokens).ok(),
                i64::try_from(u.completion_tokens).ok(),
                u.cost_usd,
            ),
            Event::PersonaSwitch(p) => (
                Some(p.to.as_str()),
                Some(p.chatmode.as_str()),
                None,
                None,
                None,
                None,
            ),
            Event::Stage(st) => (
                Some(st.persona.as_str()),
                None,
                Some(st.model.as_str()),
                None,
                None,
                None,
            ),
            Event::BudgetReset { persona } => {
                (Some(persona.as_str()), None, None, None, None, None)
            }
            Event::StageStarted { persona, .. } => {
                (persona.as_deref(), None, None, None, None, None)
            }
            Event::QualityGate(g) => (None, None, Some(g.model.as_str()), None, None, None),
            Event::SwitchSuppressed { to, chatmode, .. } => (
                Some(to.as_str()),
                Some(chatmode.as_str()),
                None,
                None,
                None,
                None,
            ),
            Event::CallAdmitted(c) => (
                Some(c.persona.as_str()),
                Some(c.chatmode.as_str()),
                Some(c.model.as_str()),
                None,
                None,
                None,
            ),
            Event::McpToolCall(c) => (Some(c.persona.as_str()), None, None, None, None, None),
            Event::CallReleased { .. }
            | Event::CallProgress { .. }
            | Event::GateChanged { .. }
            | Event::VariantsChanged { .. }
            | Event::ExperimentDecided { .. }
            | Event::Audit(_) => (None, None, None, None, None, None),
            Event::RunStarted { .. } | Event::StageFinished { .. } | Event::RunFinished { .. } => {
                (None, None, None, None, None, None)
            }
        };
        Columns {
            persona,
            chatmode,
            model,
            prompt_tokens,
            completion_tokens,
            cost_usd,
        }
    }
}

/// The events whose flag in `keep` is set.
pub fn kept(events: &[Stamped], keep: &[bool]) -> Vec<Stamped> {
    events
        .iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(e, _)| e.clone())
        .collect()
}

/// Who stored an event, as far as the replica reading the ledger is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This replica (always, for a ledger of its own).
    Own,
    /// Another replica on the same ledger: its budgets and sessions count here, its counters do not.
    Other,
}

/// Totals straight from storage, to check against the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LedgerTotals {
    pub events: u64,
    pub usage_events: u64,
    pub tokens: u64,
}

pub use crate::core::engine::Replicas;

/// Durable storage of events and budget overrides.
pub trait Ledger: Send {
    /// Stores `events` atomically (all or none), in order, at consecutive positions; returns the
    /// position of the last (the ledger's last position when `events` is empty).
    fn append(&mut self, events: &[Stamped]) -> Result<u64, LedgerError>;
    /// Calls `f` with every stored event in the order stored.
    fn replay(&self, f: &mut dyn FnMut(u64, Stamped, Origin)) -> Result<u64, LedgerError> {
        self.replay_after(0, f)
    }
    /// Calls `f` with every stored event after position `seq`, with its position and whether this
    /// replica stored it, in order.
    fn replay_after(
        &self,
        seq: u64,
        f: &mut dyn FnMut(u64, Stamped, Origin),
    ) -> Result<u64, LedgerError>;
    /// Appends under the ledger's write lock: first `sync` is called with every event stored
    /// since position `applied` (other writers'), then `decide` says which of `events` to store
    /// (one flag per event), and those are stored. Returns the position of the last stored one.
    /// A ledger of its own has nothing to sync: it decides and appends.
    fn append_synced(
        &mut self,
        events: &[Stamped],
        applied: u64,
        sync: &mut dyn FnMut(u64, Stamped, Origin),
        decide: &mut dyn FnMut() -> Vec<bool>,
    ) -> Result<u64, LedgerError> {
        let _ = (applied, sync);
        self.append(&kept(events, &decide()))
    }
    /// Other processes append to this ledger too (several replicas on one database): the writer
    /// then applies their events, in ledger order, as well as its own.
    fn shared(&self) -> bool {
        false
    }
    /// This replica's name among the writers of a shared ledger (`None` for a ledger of its own).
    fn origin(&self) -> Option<String> {
        None
    }
    /// Says this replica is alive at `now_ms` and answers which replicas are alive (their last
    /// heartbeat at most `lease_ms` old, this one included) and which are dead (an older one). A
    /// replica with no heartbeat yet is neither: it has just started. A ledger of its own has no
    /// other replicas: `None`.
    fn heartbeat(&mut self, now_ms: i64, lease_ms: i64) -> Result<Option<Replicas>, LedgerError> {
        let _ = (now_ms, lease_ms);
        Ok(None)
    }
    /// The position of the last stored event (0 when empty). Positions only grow.
    fn last_seq(&self) -> Result<u64, LedgerError>;
    /// The position of the oldest event still stored (retention removes older ones), if any.
    fn first_seq(&self) -> Result<Option<u64>, LedgerError>;
    /// An identifier given to this ledger when it was created: a snapshot names the ledger it
    /// was taken from, so that a ledger restored from elsewhere is never paired with it.
    fn ledger_id(&self) -> Result<String, LedgerError>;
    /// Removes up to `limit` of the oldest events that are at or before position `through` and
    /// older than `before_ms`; returns how many were removed.
    fn remove_old(
        &mut self,
        through: u64,
        before_ms: i64,
        limit: usize,
    ) -> Result<u64, LedgerError>;
    /// Budget overrides set through the admin API, by persona.
    fn overrides(&self) -> Result<Vec<(String, BudgetSpec)>, LedgerError>;
    fn set_override(&mut self, persona: &str, spec: Option<&BudgetSpec>)
        -> Result<(), LedgerError>;
    fn totals(&self) -> Result<LedgerTotals, LedgerError>;
    /// A write that stores nothing of substance, to learn whether writes succeed again.
    fn probe(&mut self, now: i64) -> Result<(), LedgerError>;
    /// Whether this replica's batch at positions `first..=last` — one whose commit was in doubt
    /// ([`LedgerError::in_doubt`]) — was stored. Only a ledger across a network has such batches.
    fn stored_own(&self, first: u64, last: u64) -> Result<bool, LedgerError> {
        let _ = (first, last);
        Err(LedgerError::new(
            "resolve",
            "this ledger has no commits in doubt",
        ))
    }
}
