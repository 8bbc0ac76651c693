//! The writer's side of snapshots: when one is due, the one being written on a thread of its own,
//! and the retention of old events a written snapshot allows.

use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use super::{lock, Command, LedgerHealth, SnapshotPlan};
use crate::core::engine::Engine;
use crate::store::Ledger;

/// Rows removed per retention step: small enough that a queued append waits only a moment.
const RETENTION_CHUNK: usize = 5_000;

/// The writer's side of snapshots: when to take one, the one being written, the retention it allows.
pub(super) struct Keeper {
    pub(super) plan: SnapshotPlan,
    pub(super) ledger_id: String,
    pub(super) last_ms: i64,
    /// Events were applied since the last snapshot.
    pub(super) dirty: bool,
    pub(super) writing: Option<JoinHandle<std::io::Result<(u64, i64)>>>,
    /// Tells the writer when a snapshot is written (weak: it must not keep the queue open).
    pub(super) wake: mpsc::WeakSender<Command>,
    /// Events through this position may be removed (once old enough).
    pub(super) retention_through: Option<u64>,
}

impl Keeper {
    /// Notes a snapshot written in the background, if one finished.
    pub(super) fn reap(&mut self, health: &LedgerHealth, wait: bool) {
        let done = self
            .writing
            .as_ref()
            .is_some_and(|t| wait || t.is_finished());
        if !done {
            return;
        }
        let Some(thread) = self.writing.take() else {
            return;
        };
        match thread.join() {
            Ok(Ok((seq, at))) => {
                health
                    .last_snapshot_ms
                    .store(at, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(seq, "snapshot of the core's state written");
                if self.plan.retain_ms.is_some() {
                    self.retention_through = self.plan.store.oldest_kept_seq();
                }
            }
            Ok(Err(e)) => tracing::warn!(
                "cannot write a snapshot of the core's state ({e}); start-up replays more of the ledger until one is written"
            ),
            Err(_) => tracing::warn!("the snapshot writer panicked"),
        }
    }

    /// Takes a snapshot when one is due: the state is copied under the engine's lock, written on
    /// a thread of its own. Only called when everything applied is stored (nothing held).
    pub(super) fn maybe_take(&mut self, seq: u64, engine: &Mutex<Engine>, now: i64) {
        if !self.dirty || self.writing.is_some() || now - self.last_ms < self.plan.every_ms {
            return;
        }
        self.last_ms = now;
        let state = lock(engine).state();
        self.dirty = false;
        let (store, id) = (self.plan.store.clone(), self.ledger_id.clone());
        let wake = self.wake.clone();
        self.writing = std::thread::Builder::new()
            .name("ledger-snapshot".into())
            .spawn(move || {
                let written = store.write(&id, seq, now, &state).map(|_| (seq, now));
                if let Some(tx) = wake.upgrade() {
                    let _ = tx.try_send(Command::SnapshotWritten);
                }
                written
            })
            .map_err(|e| tracing::warn!("cannot start the snapshot thread: {e}"))
            .ok();
    }

    /// At shutdown: the last snapshot, written before the process ends.
    pub(super) fn finish(
        &mut self,
        seq: u64,
        engine: &Mutex<Engine>,
        health: &LedgerHealth,
        now: i64,
    ) {
        self.reap(health, true);
        if !self.dirty {
            return;
        }
        self.last_ms = i64::MIN / 2;
        self.maybe_take(seq, engine, now);
        self.reap(health, true);
    }

    /// One step of retention; false when there is nothing (more) to remove now.
    pub(super) fn retain_step(&mut self, ledger: &mut dyn Ledger, now: i64) -> bool {
        let (Some(through), Some(retain_ms)) = (self.retention_through, self.plan.retain_ms) else {
            return false;
        };
        match ledger.remove_old(through, now - retain_ms, RETENTION_CHUNK) {
            Ok(n) if n as usize == RETENTION_CHUNK => true,
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(removed = n, "old events removed (retention)");
                }
                self.retention_through = None;
                false
            }
            Err(e) => {
                tracing::warn!("retention: {e}");
                self.retention_through = None;
                false
            }
        }
    }
}
