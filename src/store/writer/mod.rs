//! The ledger writer: one thread that owns the ledger, stores batches, then applies them.
//!
//! Requests queue on a bounded channel (a full queue makes callers wait: backpressure, never loss).
//! Consecutive appends are grouped into one transaction (group commit), so many small HTTP batches
//! cost one commit. Only after the commit are the events applied to the engine and acknowledged:
//! an acknowledged event is on disk, and the engine's state is always a replay of the ledger.
//!
//! This file holds the queue and the handles; the writer's jobs are a file each: `run` (the loop
//! and its one commit path), `health` (what `/readyz` and the metrics read), `outage` (events held
//! in memory while the ledger cannot write), `doubt` (commits whose answer never came), `fleet`
//! (admissions decided on the whole fleet's usage, the others' events, overrides) and `snapshots`
//! (when to take one, retention).

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

mod doubt;
mod fleet;
mod health;
mod outage;
mod run;
mod snapshots;

pub use fleet::BUDGET_REFUSED;
pub use health::LedgerHealth;

use super::snapshot::Snapshots;
use super::{Ledger, LedgerError, LedgerTotals};
use crate::core::budget::BudgetSpec;
use crate::core::clock::Clock;
use crate::core::engine::{Engine, Observation};
use crate::core::event::Stamped;

/// Most events committed in one transaction.
const MAX_GROUP_EVENTS: usize = 16_384;
/// Requests waiting for the writer before callers are made to wait.
const QUEUE_DEPTH: usize = 4_096;
/// How long a group of accounting-only appends may wait for company before it is committed.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);
/// A lingering group commits as soon as it holds this many events.
const LINGER_MAX_EVENTS: usize = 256;

/// What follows an append once it is committed (or has failed).
enum Ack {
    /// A caller awaits the result.
    Waiting(oneshot::Sender<Result<(), LedgerError>>),
    /// Accounting nobody waits on (a stream's progress, a failed call's release): run this on
    /// the writer thread once the events are applied. The append may linger briefly so that other
    /// appends share its commit.
    Then(Box<dyn FnOnce(Result<(), LedgerError>) + Send>),
    /// Accounting whose commit a call's answer waits for (its usage): run on the writer thread
    /// like `Then`, but never lingered on.
    ThenAtOnce(Box<dyn FnOnce(Result<(), LedgerError>) + Send>),
}

impl Ack {
    fn lingers(&self) -> bool {
        matches!(self, Ack::Then(_))
    }

    /// The accounting of calls (spent upstream already): held in memory through an outage under
    /// either policy.
    fn is_accounting(&self) -> bool {
        matches!(self, Ack::Then(_) | Ack::ThenAtOnce(_))
    }

    fn done(self, result: Result<(), LedgerError>) {
        match self {
            Ack::Waiting(tx) => {
                let _ = tx.send(result);
            }
            Ack::Then(then) | Ack::ThenAtOnce(then) => then(result),
        }
    }
}

enum Command {
    Append {
        events: Vec<Stamped>,
        ack: Ack,
    },
    SetOverride {
        persona: String,
        spec: Option<BudgetSpec>,
        ack: oneshot::Sender<Result<bool, LedgerError>>,
    },
    Totals {
        ack: oneshot::Sender<Result<LedgerTotals, LedgerError>>,
    },
    Shutdown {
        ack: oneshot::Sender<()>,
    },
    /// Try a write (while the ledger is failing) to learn whether it can write again.
    Probe,
    /// The snapshot thread finished (so the writer notes it, and starts retention, even when idle).
    SnapshotWritten,
    /// Apply what other replicas stored since (a shared ledger); `ack`, when given, is told
    /// once it is applied.
    Tail {
        ack: Option<oneshot::Sender<()>>,
    },
}

/// Locks the engine, recovering it if a panic elsewhere poisoned the lock (its state stays valid:
/// every mutation is a complete `apply`).
pub fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    engine
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A cloneable handle for sending work to the writer.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Command>,
    /// Other replicas append to the same ledger: [`WriterHandle::tail`] should be called often.
    pub shared: bool,
    /// This replica's name on a shared ledger (the admissions it stores carry it).
    pub origin: Option<Arc<str>>,
    pub health: Arc<LedgerHealth>,
    /// Cuts a lingering group short: an append somebody awaits (an event batch, a gateway call's
    /// admission before its upstream) must not wait out another append's linger.
    urgent: Arc<Urgent>,
}

/// Set by an awaited append; the writer's linger waits on it instead of sleeping blind.
#[derive(Default)]
struct Urgent {
    state: Mutex<UrgentState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct UrgentState {
    /// An awaited append was queued since the writer last looked.
    waiting: bool,
    /// The writer is in `linger_until`: only then does a raise need to wake it (a condvar
    /// notification is a system call even with nobody waiting, once per gateway call otherwise).
    lingering: bool,
}

impl Urgent {
    fn state(&self) -> MutexGuard<'_, UrgentState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raise(&self) {
        let mut state = self.state();
        state.waiting = true;
        if state.lingering {
            self.wake.notify_one();
        }
    }

    /// Forgets raises of appends already taken (they are in the group being formed).
    fn clear(&self) {
        self.state().waiting = false;
    }

    /// Waits until `deadline` or until an awaited append arrives; clears the flag.
    fn linger_until(&self, deadline: std::time::Instant) {
        let mut guard = self.state();
        guard.lingering = true;
        let timeout = deadline.saturating_duration_since(std::time::Instant::now());
        let (mut guard, _) = self
            .wake
            .wait_timeout_while(guard, timeout, |state| !state.waiting)
            .unwrap_or_else(|p| p.into_inner());
        guard.waiting = false;
        guard.lingering = false;
    }
}

fn gone() -> LedgerError {
    LedgerError::new(
        "queue",
        "the ledger writer has stopped (server shutting down)",
    )
}

impl WriterHandle {
    /// Stores `events` and applies them; returns once they are durable.
    pub async fn append(&self, events: Vec<Stamped>) -> Result<(), LedgerError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Command::Append {
                events,
                ack: Ack::Waiting(ack),
            })
            .await
            .map_err(|_| gone())?;
        self.urgent.raise();
        rx.await.map_err(|_| gone())?
    }

    /// Queues `events` no client is waiting on and returns once they are queued (a full queue
    /// makes this wait: never loss). The writer may hold them up to 2 ms so that more appends share
    /// one commit, stores and applies them, then calls `then` with the outcome on its own thread —
    /// so `then` must be quick (give back a reservation, count a failure).
    pub async fn append_accounting(
        &self,
        events: Vec<Stamped>,
        then: impl FnOnce(Result<(), LedgerError>) + Send + 'static,
    ) {
        let command = Command::Append {
            events,
            ack: Ack::Then(Box::new(then)),
        };
        if let Err(mpsc::error::SendError(Command::Append { ack, .. })) =
            self.tx.send(command).await
        {
            ack.done(Err(gone()));
        }
    }

    /// As [`WriterHandle::append_accounting`], but returns only once the events are stored (or,
    /// in an outage, held under the outage policy) and `then` has run: for the usage of a call
    /// whose answer waits for it, so that an answered call is in the ledger with its real numbers
    /// whenever the process dies. It is never lingered on, and cuts a lingering group short.
    pub async fn append_accounting_stored(
        &self,
        events: Vec<Stamped>,
        then: impl FnOnce(Result<(), LedgerError>) + Send + 'static,
    ) {
        let (stored, stored_rx) = oneshot::channel::<()>();
        let command = Command::Append {
            events,
            ack: Ack::ThenAtOnce(Box::new(move |result| {
                then(result);
                let _ = stored.send(());
            })),
        };
        if let Err(mpsc::error::SendError(Command::Append { ack, .. })) =
            self.tx.send(command).await
        {
            ack.done(Err(gone()));
        }
        // A group already lingering is cut short (this append does not linger itself).
        self.urgent.raise();
        // A writer that stopped dropped the callback after running it with an error.
        let _ = stored_rx.await;
    }

    /// Sets or removes a persona's budget override; false when the persona is unknown.
    pub async fn set_override(
        &self,
        persona: String,
        spec: Option<BudgetSpec>,
    ) -> Result<bool, LedgerError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Command::SetOverride { persona, spec, ack })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn totals(&self) -> Result<LedgerTotals, LedgerError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Command::Totals { ack })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Asks the writer to apply what other replicas stored (a shared ledger; not awaited).
    pub fn tail(&self) {
        let _ = self.tx.try_send(Command::Tail { ack: None });
    }

    /// Applies what other replicas stored up to now, and waits (at most `within`) until it is
    /// applied: for a request naming what another replica created a moment ago (a run), before
    /// the periodic tail has brought it. Nothing to do on a ledger of one's own.
    pub async fn catch_up_now(&self, within: Duration) {
        if !self.shared {
            return;
        }
        let (ack, rx) = oneshot::channel();
        if self.tx.send(Command::Tail { ack: Some(ack) }).await.is_ok() {
            let _ = tokio::time::timeout(within, rx).await;
        }
    }

    /// Asks the writer to try a write, to learn whether a failing ledger writes again (not
    /// awaited: the outcome shows in [`LedgerHealth`]).
    pub fn probe(&self) {
        let _ = self.tx.try_send(Command::Probe);
    }

    /// Finishes everything queued before this call, then stops the writer.
    pub async fn shutdown(&self) {
        let (ack, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { ack }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Told of each event right after it is applied, with what the engine observed applying it
/// (the trace exporter's spans of runs, stages and switches). Runs on the writer thread under the
/// engine's lock: it must only hand work off.
pub type Observer = Box<dyn Fn(&Stamped, Vec<Observation>) + Send>;

/// Starts the writer thread.
pub fn spawn(
    ledger: Box<dyn Ledger>,
    engine: Arc<Mutex<Engine>>,
    clock: Arc<dyn Clock>,
) -> (WriterHandle, JoinHandle<()>) {
    spawn_observed(ledger, engine, clock, None, WriterOptions::default())
}

/// Starts the writer thread with an observer of applied events.
pub fn spawn_observed(
    ledger: Box<dyn Ledger>,
    engine: Arc<Mutex<Engine>>,
    clock: Arc<dyn Clock>,
    observer: Option<Observer>,
    options: WriterOptions,
) -> (WriterHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let wake = tx.downgrade();
    let shared = ledger.shared();
    let origin: Option<Arc<str>> = ledger.origin().map(Arc::from);
    let urgent = Arc::new(Urgent::default());
    let writer_urgent = urgent.clone();
    let health = Arc::new(LedgerHealth::new(
        options.outage.buffer,
        options.snapshots.as_ref().map_or(0, |p| p.loaded_at_ms),
    ));
    let writer_health = health.clone();
    if observer.is_some() {
        lock(&engine).set_observing(true);
    }
    let thread = std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || {
            run::run(
                ledger,
                engine,
                clock,
                rx,
                observer,
                Signals {
                    urgent: writer_urgent,
                    health: writer_health,
                    wake,
                },
                options,
            )
        })
        .unwrap_or_else(|e| {
            // Without a writer thread nothing can be stored: there is no way to continue.
            tracing::error!("cannot start the ledger writer thread: {e}");
            std::process::exit(1)
        });
    (
        WriterHandle {
            tx,
            shared,
            origin,
            urgent,
            health,
        },
        thread,
    )
}

/// What the writer does with a batch the ledger refused (`[ledger] on_outage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutagePolicy {
    /// Events somebody awaits (event batches, gateway admissions) are held in memory too, so that
    /// calls keep being served; otherwise only accounting of calls already answered is held.
    pub buffer: bool,
    /// Most events held in memory while the ledger cannot write; past it, appends are refused.
    pub max_events: usize,
}

impl Default for OutagePolicy {
    fn default() -> Self {
        Self {
            buffer: false,
            max_events: 100_000,
        }
    }
}

/// Snapshots of the engine taken by the writer, and the retention they allow.
#[derive(Debug, Clone)]
pub struct SnapshotPlan {
    pub store: Snapshots,
    /// A snapshot is taken when events were applied and this long has passed since the last.
    pub every_ms: i64,
    /// Events older than this (and covered by the older kept snapshot) are removed.
    pub retain_ms: Option<i64>,
    /// When the snapshot start-up loaded was taken (0: none was).
    pub loaded_at_ms: i64,
}

/// What the writer is given beside the ledger and the engine.
#[derive(Debug, Clone, Default)]
pub struct WriterOptions {
    pub outage: OutagePolicy,
    pub snapshots: Option<SnapshotPlan>,
    /// The position of the last event the engine has applied (from start-up's recovery).
    pub applied_seq: u64,
    /// On a shared ledger: how long a replica's heartbeat keeps it alive (0: the default, 10 s).
    pub replica_lease_ms: i64,
}

/// The lease when none is configured.
pub const DEFAULT_REPLICA_LEASE_MS: i64 = 10_000;

/// What the writer thread shares with the handles: the linger's wake-up, the health it reports,
/// and a way to queue a note to itself.
struct Signals {
    urgent: Arc<Urgent>,
    health: Arc<LedgerHealth>,
    wake: mpsc::WeakSender<Command>,
}

#[cfg(test)]
mod tests;
