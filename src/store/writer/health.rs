//! The ledger's health as the writer last found it: whether it can write, since when and why, the
//! events an outage holds in memory, the age of the last snapshot. Read by `/readyz`, the
//! exposition and the refusal messages.

use std::sync::{Arc, Mutex};

use crate::store::LedgerError;

/// Whether the ledger can write: set by the writer at every commit and probe, read by `/readyz`
/// and the exposition.
#[derive(Debug, Default)]
pub struct LedgerHealth {
    failing: std::sync::atomic::AtomicBool,
    /// Unix ms of the first failure of the current outage.
    since_ms: std::sync::atomic::AtomicI64,
    pub failures: std::sync::atomic::AtomicU64,
    last_error: Mutex<Option<(&'static str, String)>>,
    /// `on_outage = "buffer"`: calls are served during an outage while the buffer has room.
    buffering: bool,
    /// Events applied but held in memory until the ledger writes again.
    held: std::sync::atomic::AtomicU64,
    /// The buffer could not take an append: refusing until it is written.
    buffer_full: std::sync::atomic::AtomicBool,
    /// Unix ms of the last snapshot of the core's state (0: none yet).
    pub last_snapshot_ms: std::sync::atomic::AtomicI64,
}

impl LedgerHealth {
    pub(super) fn new(buffering: bool, last_snapshot_ms: i64) -> LedgerHealth {
        LedgerHealth {
            buffering,
            last_snapshot_ms: std::sync::atomic::AtomicI64::new(last_snapshot_ms),
            ..LedgerHealth::default()
        }
    }

    /// The ledger cannot write (whether or not calls are still served from the buffer).
    pub fn failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seconds since the last snapshot of the core's state, if there was one.
    pub fn snapshot_age_seconds(&self, now: i64) -> Option<f64> {
        let at = self
            .last_snapshot_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        (at > 0).then(|| (now - at).max(0) as f64 / 1000.0)
    }

    /// Hands the ledger's health to the exposition: writable, failed writes, events held during an
    /// outage, and the age of the last snapshot by `clock`.
    pub fn register_metrics(
        self: &Arc<Self>,
        registry: &crate::telemetry::registry::Registry,
        clock: Arc<dyn crate::core::clock::Clock>,
    ) {
        use crate::telemetry::families as f;
        use std::sync::atomic::Ordering::Relaxed;
        let health = self.clone();
        registry.collect(&f::LEDGER_WRITABLE, move |emit| {
            emit(&[], if health.failing() { 0.0 } else { 1.0 })
        });
        let health = self.clone();
        registry.collect(&f::LEDGER_WRITE_FAILURES_TOTAL, move |emit| {
            emit(&[], health.failures.load(Relaxed) as f64)
        });
        let health = self.clone();
        registry.collect(&f::LEDGER_OUTAGE_HELD_EVENTS, move |emit| {
            emit(&[], health.held() as f64)
        });
        let health = self.clone();
        registry.collect(&f::LEDGER_SNAPSHOT_AGE_SECONDS, move |emit| {
            // -1: no snapshot yet.
            let age = health.snapshot_age_seconds(clock.now_ms());
            emit(&[], age.unwrap_or(-1.0))
        });
    }

    /// Events applied during an outage and not yet stored.
    pub fn held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// (since when, why) while writes are refused: the ledger cannot write and either the policy
    /// fails closed or the outage buffer is full.
    pub fn outage(&self) -> Option<(i64, String)> {
        use std::sync::atomic::Ordering;
        if !self.failing() || (self.buffering && !self.buffer_full.load(Ordering::Relaxed)) {
            return None;
        }
        let error = self.last_error();
        let why = if self.buffering {
            format!(
                "the ledger cannot write ({error}) and the outage buffer is full ({} events held)",
                self.held()
            )
        } else {
            format!("the ledger cannot write: {error}")
        };
        Some((self.since_ms.load(Ordering::Relaxed), why))
    }

    /// The error of the current outage, for appends refused while it lasts.
    pub(super) fn last_error(&self) -> LedgerError {
        match &*self.last_error.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((op, message)) => LedgerError::new(op, message),
            None => LedgerError::new("append", "the ledger cannot write"),
        }
    }

    pub(super) fn set_held(&self, n: usize) {
        use std::sync::atomic::Ordering;
        self.held.store(n as u64, Ordering::Relaxed);
        if n == 0 {
            self.buffer_full.store(false, Ordering::Relaxed);
        }
    }

    pub(super) fn set_buffer_full(&self) {
        if !self
            .buffer_full
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::error!(
                held = self.held(),
                "the ledger outage buffer is full: gateway calls and events are refused with 503 until the ledger writes again ([ledger] outage_buffer_events)"
            );
        }
    }

    pub(super) fn failed(&self, now: i64, error: &LedgerError) {
        use std::sync::atomic::Ordering;
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((error.op, error.message.clone()));
        if !self.failing.swap(true, Ordering::Relaxed) {
            self.since_ms.store(now, Ordering::Relaxed);
            if self.buffering {
                tracing::error!(
                    "the ledger cannot write ({error}): calls are served and their usage held in memory, applied to budgets, until it can ([ledger] on_outage = \"buffer\"; tried again every few seconds)"
                );
            } else {
                tracing::error!(
                    "the ledger cannot write ({error}): gateway calls and events are refused with 503 and /readyz says so until it can (tried again every few seconds)"
                );
            }
        }
    }

    pub(super) fn succeeded(&self) {
        if self
            .failing
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!("the ledger writes again: service resumed");
        }
    }
}
