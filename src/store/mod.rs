//! The ledger: every accepted event, stored before it is acknowledged.
//!
//! [`Ledger`] is the storage trait (SQLite now; PostgreSQL for several replicas later).
//! [`writer`] owns the ledger on a thread of its own and applies each stored batch to the engine in
//! ledger order, so the in-memory state is always a replay of what is on disk.

pub mod snapshot;
pub mod sqlite;
pub mod writer;

use crate::core::budget::BudgetSpec;
use crate::core::event::Stamped;

/// Storage errors carry the operation and the underlying message; never event contents.
#[derive(Debug, thiserror::Error)]
#[error("ledger {op} failed: {message}")]
pub struct LedgerError {
    pub op: &'static str,
    pub message: String,
}

impl LedgerError {
    pub fn new(op: &'static str, e: impl std::fmt::Display) -> Self {
        Self {
            op,
            message: e.to_string(),
        }
    }
}

/// Totals straight from storage, to check against the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LedgerTotals {
    pub events: u64,
    pub usage_events: u64,
    pub tokens: u64,
}

/// Durable storage of events and budget overrides.
pub trait Ledger: Send {
    /// Stores `events` atomically (all or none), in order, at consecutive positions; returns the
    /// position of the last (the ledger's last position when `events` is empty).
    fn append(&mut self, events: &[Stamped]) -> Result<u64, LedgerError>;
    /// Calls `f` with every stored event in the order stored.
    fn replay(&self, f: &mut dyn FnMut(u64, Stamped)) -> Result<u64, LedgerError> {
        self.replay_after(0, f)
    }
    /// Calls `f` with every stored event after position `seq`, with its position, in order.
    fn replay_after(&self, seq: u64, f: &mut dyn FnMut(u64, Stamped)) -> Result<u64, LedgerError>;
    /// Other processes append to this ledger too (several replicas on one database): the writer
    /// then applies their events, in ledger order, as well as its own.
    fn shared(&self) -> bool {
        false
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
}
