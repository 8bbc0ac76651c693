//! The ledger writer: one thread that owns the ledger, stores batches, then applies them.
//!
//! Requests queue on a bounded channel (a full queue makes callers wait: backpressure, never loss).
//! Consecutive appends are grouped into one transaction (group commit), so many small HTTP batches
//! cost one commit. Only after the commit are the events applied to the engine and acknowledged:
//! an acknowledged event is on disk, and the engine's state is always a replay of the ledger.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::snapshot::Snapshots;
use super::{Ledger, LedgerError, LedgerTotals, Origin};
use crate::core::budget::BudgetSpec;
use crate::core::clock::Clock;
use crate::core::engine::{Engine, Observation};
use crate::core::event::{Event, Stamped};

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
    fn last_error(&self) -> LedgerError {
        match &*self.last_error.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((op, message)) => LedgerError::new(op, message),
            None => LedgerError::new("append", "the ledger cannot write"),
        }
    }

    fn set_held(&self, n: usize) {
        use std::sync::atomic::Ordering;
        self.held.store(n as u64, Ordering::Relaxed);
        if n == 0 {
            self.buffer_full.store(false, Ordering::Relaxed);
        }
    }

    fn set_buffer_full(&self) {
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

    fn failed(&self, now: i64, error: &LedgerError) {
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

    fn succeeded(&self) {
        if self
            .failing
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!("the ledger writes again: service resumed");
        }
    }
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
    let health = Arc::new(LedgerHealth {
        buffering: options.outage.buffer,
        last_snapshot_ms: std::sync::atomic::AtomicI64::new(
            options.snapshots.as_ref().map_or(0, |p| p.loaded_at_ms),
        ),
        ..LedgerHealth::default()
    });
    let writer_health = health.clone();
    if observer.is_some() {
        lock(&engine).set_observing(true);
    }
    let thread = std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || {
            run(
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

/// Makes the engine's budget overrides those of the (shared) ledger.
fn sync_overrides(ledger: &dyn Ledger, engine: &Mutex<Engine>, now: i64) {
    let stored: std::collections::HashMap<String, BudgetSpec> = match ledger.overrides() {
        Ok(o) => o.into_iter().collect(),
        Err(e) => {
            tracing::debug!("cannot read the budget overrides: {e}");
            return;
        }
    };
    let mut engine = lock(engine);
    if *engine.overrides() == stored {
        return;
    }
    let gone: Vec<String> = engine
        .overrides()
        .keys()
        .filter(|p| !stored.contains_key(*p))
        .cloned()
        .collect();
    for persona in gone {
        engine.set_override(&persona, None, now);
    }
    for (persona, spec) in stored {
        if engine.overrides().get(&persona) != Some(&spec) {
            engine.set_override(&persona, Some(spec), now);
        }
    }
}

/// The `op` of the error an admission gets when the fleet-wide check refuses it.
pub const BUDGET_REFUSED: &str = "budget";

/// Which events of `batch` to store: each append (a range) whole or not at all; an append whose
/// admissions would take a `block` budget — its tokens or its `cost_usd` — past what the fleet has
/// left (usage and every call in flight, whichever replica admitted it, plus what this batch
/// already took) is refused.
fn fleet_decide(engine: &Mutex<Engine>, batch: &[Stamped], ranges: &[(usize, usize)]) -> Vec<bool> {
    let engine = lock(engine);
    // What the batch's earlier appends took, per persona: tokens and USD.
    let mut taken: std::collections::HashMap<&str, (u64, f64)> = std::collections::HashMap::new();
    let mut mask = Vec::with_capacity(batch.len());
    for &(start, end) in ranges {
        let mut ok = true;
        let mut adds: Vec<(&str, u64, f64)> = Vec::new();
        for e in &batch[start..end] {
            if let crate::core::event::Event::CallAdmitted(c) = &e.event {
                let (rooms, cost_room) = (
                    engine.fleet_room(&c.persona),
                    engine.fleet_cost_room(&c.persona),
                );
                if rooms.is_none() && cost_room.is_none() {
                    continue;
                }
                let (mut tokens, mut cost) =
                    taken.get(c.persona.as_str()).copied().unwrap_or((0, 0.0));
                for (p, n, usd) in &adds {
                    if *p == c.persona {
                        tokens += n;
                        cost += usd;
                    }
                }
                if rooms.is_some_and(|room| tokens.saturating_add(c.estimate) > room) {
                    ok = false;
                }
                let usd = c.cost_usd.unwrap_or(0.0);
                // A call with a cost estimate must fit the cost left (a tolerance for float sums).
                if cost_room.is_some_and(|room| usd > 0.0 && cost + usd > room + 1e-9) {
                    ok = false;
                }
                adds.push((c.persona.as_str(), c.estimate, usd));
            }
        }
        if ok {
            for (p, n, usd) in adds {
                let e = taken.entry(p).or_default();
                e.0 += n;
                e.1 += usd;
            }
        }
        mask.extend(std::iter::repeat_n(ok, end - start));
    }
    mask
}

/// Rows removed per retention step: small enough that a queued append waits only a moment.
const RETENTION_CHUNK: usize = 5_000;

/// The writer's side of snapshots: when to take one, the one being written, the retention it allows.
struct Keeper {
    plan: SnapshotPlan,
    ledger_id: String,
    last_ms: i64,
    /// Events were applied since the last snapshot.
    dirty: bool,
    writing: Option<JoinHandle<std::io::Result<(u64, i64)>>>,
    /// Tells the writer when a snapshot is written (weak: it must not keep the queue open).
    wake: mpsc::WeakSender<Command>,
    /// Events through this position may be removed (once old enough).
    retention_through: Option<u64>,
}

impl Keeper {
    /// Notes a snapshot written in the background, if one finished.
    fn reap(&mut self, health: &LedgerHealth, wait: bool) {
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
    fn maybe_take(&mut self, seq: u64, engine: &Mutex<Engine>, now: i64) {
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
    fn finish(&mut self, seq: u64, engine: &Mutex<Engine>, health: &LedgerHealth, now: i64) {
        self.reap(health, true);
        if !self.dirty {
            return;
        }
        self.last_ms = i64::MIN / 2;
        self.maybe_take(seq, engine, now);
        self.reap(health, true);
    }

    /// One step of retention; false when there is nothing (more) to remove now.
    fn retain_step(&mut self, ledger: &mut dyn Ledger, now: i64) -> bool {
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

/// Events applied to the engine but not yet stored (the ledger could not write). They are written
/// first, in order, before anything else, so the ledger's order stays the order they were applied.
struct Held {
    events: Vec<Stamped>,
    policy: OutagePolicy,
}

impl Held {
    fn room_for(&self, n: usize) -> bool {
        self.events.len() + n <= self.policy.max_events
    }
}

fn run(
    mut ledger: Box<dyn Ledger>,
    engine: Arc<Mutex<Engine>>,
    clock: Arc<dyn Clock>,
    mut rx: mpsc::Receiver<Command>,
    observer: Option<Observer>,
    signals: Signals,
    options: WriterOptions,
) {
    let Signals {
        urgent,
        health,
        wake,
    } = signals;
    let mut held = Held {
        events: Vec::new(),
        policy: options.outage,
    };
    let mut applied_seq = options.applied_seq;
    let mut keeper = options.snapshots.and_then(|plan| {
        let ledger_id = ledger
            .ledger_id()
            .map_err(|e| tracing::warn!("snapshots are off: {e}"))
            .ok()?;
        Some(Keeper {
            last_ms: plan.loaded_at_ms,
            plan,
            ledger_id,
            dirty: false,
            writing: None,
            wake,
            retention_through: None,
        })
    });
    let apply = |events: &[Stamped]| {
        let mut engine = lock(&engine);
        for e in events {
            engine.apply(e);
            if let Some(observe) = &observer {
                observe(e, engine.take_observations());
            }
        }
    };
    let apply_foreign = |e: &Stamped| lock(&engine).apply_foreign(e);
    let mut doubt: Option<Doubt> = None;
    let mut tails = 0u64;
    let mut carried: Option<Command> = None;
    loop {
        if let Some(k) = keeper.as_mut() {
            k.reap(&health, false);
        }
        let first = match carried.take() {
            Some(command) => command,
            None => match rx.try_recv() {
                Ok(command) => command,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Idle: remove a chunk of old events if retention has work, then look again.
                    if let Some(k) = keeper.as_mut() {
                        if k.retain_step(&mut *ledger, clock.now_ms()) {
                            continue;
                        }
                    }
                    match rx.blocking_recv() {
                        Some(command) => command,
                        None => return,
                    }
                }
            },
        };
        match first {
            Command::Append { events, ack } => {
                let mut batch = events;
                // Linger only while every append in the group is accounting nobody waits on.
                let mut lingering = ack.lingers();
                if lingering {
                    urgent.clear();
                }
                let mut acks = vec![(ack, batch.len())];
                let deadline = std::time::Instant::now() + LINGER;
                while batch.len() < MAX_GROUP_EVENTS {
                    match rx.try_recv() {
                        Ok(Command::Append { events, ack }) => {
                            batch.extend(events);
                            lingering &= ack.lingers();
                            acks.push((ack, batch.len()));
                        }
                        Ok(other) => {
                            carried = Some(other);
                            break;
                        }
                        Err(_) => {
                            let now = std::time::Instant::now();
                            if !lingering || batch.len() >= LINGER_MAX_EVENTS || now >= deadline {
                                break;
                            }
                            // One wait for the rest of the window (not a polling loop: on a
                            // busy core every wake-up would preempt request handling), cut short
                            // when an append somebody awaits arrives.
                            urgent.linger_until(deadline);
                        }
                    }
                }
                // During an outage the ledger is not tried again per append (a locked database
                // makes each try wait out the busy timeout; a buffer would be re-encoded every
                // time): the probe, every 2 s, tries it. What an outage left in memory goes first,
                // in the same transaction.
                // Several replicas: an admission is decided again under the ledger's write lock,
                // on the whole fleet's usage and calls in flight.
                if ledger.shared()
                    && held.events.is_empty()
                    && !health.failing()
                    && batch
                        .iter()
                        .any(|e| matches!(e.event, crate::core::event::Event::CallAdmitted(_)))
                {
                    let mut ranges = Vec::with_capacity(acks.len());
                    let mut start = 0;
                    for (_, end) in &acks {
                        ranges.push((start, *end));
                        start = *end;
                    }
                    let mut mask: Vec<bool> = Vec::new();
                    let result = ledger.append_synced(
                        &batch,
                        applied_seq,
                        &mut |seq, event, origin| {
                            match origin {
                                Origin::Own => apply(std::slice::from_ref(&event)),
                                Origin::Other => apply_foreign(&event),
                            }
                            applied_seq = seq;
                        },
                        &mut || {
                            mask = fleet_decide(&engine, &batch, &ranges);
                            mask.clone()
                        },
                    );
                    match result {
                        Ok(last) => {
                            health.succeeded();
                            let kept = super::kept(&batch, &mask);
                            apply(&kept);
                            applied_seq = applied_seq.max(last);
                            for ((ack, _), (start, _)) in acks.into_iter().zip(&ranges) {
                                if mask.get(*start).copied().unwrap_or(true) {
                                    ack.done(Ok(()));
                                } else {
                                    ack.done(Err(LedgerError::new(
                                        BUDGET_REFUSED,
                                        "the persona's block budget is spent across the replicas (their calls in flight count)",
                                    )));
                                }
                            }
                            if let Some(k) = keeper.as_mut() {
                                k.dirty = true;
                                k.maybe_take(applied_seq, &engine, clock.now_ms());
                            }
                        }
                        Err(e) => {
                            health.failed(clock.now_ms(), &e);
                            let attempted: Vec<bool> = (0..batch.len())
                                .map(|i| mask.get(i).copied().unwrap_or(true))
                                .collect();
                            let now_held =
                                hold_or_refuse(&mut held, &health, batch, acks, &e, &apply);
                            // Refused without a try (an outage already) leaves a pending doubt be.
                            if let Some(d) = Doubt::of(&e, 0, &attempted, &now_held) {
                                doubt = Some(d);
                            }
                        }
                    }
                    continue;
                }
                // (last position, events before the batch that were applied already: held ones)
                let result = if health.failing() {
                    Err(health.last_error())
                } else if held.events.is_empty() {
                    ledger.append(&batch).map(|last| (last, 0))
                } else {
                    let mut all = std::mem::take(&mut held.events);
                    let before = all.len();
                    all.extend_from_slice(&batch);
                    let result = ledger.append(&all);
                    all.truncate(before);
                    if result.is_ok() {
                        tracing::info!(
                            events = before,
                            "events held during the ledger outage are stored"
                        );
                    } else {
                        held.events = all;
                    }
                    result.map(|last| (last, before))
                };
                match result {
                    Ok((last, held_before)) => {
                        health.succeeded();
                        health.set_held(0);
                        let own = Own {
                            first: (last + 1).saturating_sub((held_before + batch.len()) as u64),
                            last,
                            applied_already: held_before as u64,
                        };
                        catch_up(
                            &*ledger,
                            &mut applied_seq,
                            Some((own, &batch)),
                            &apply,
                            &apply_foreign,
                        );
                        for (ack, _) in acks {
                            ack.done(Ok(()));
                        }
                        if let Some(k) = keeper.as_mut() {
                            k.dirty = true;
                            k.maybe_take(applied_seq, &engine, clock.now_ms());
                        }
                    }
                    Err(e) => {
                        if !health.failing() {
                            health.failed(clock.now_ms(), &e);
                        }
                        // Held events went first in the same transaction.
                        let held_before = held.events.len();
                        let attempted = vec![true; batch.len()];
                        let now_held = hold_or_refuse(&mut held, &health, batch, acks, &e, &apply);
                        // Refused without a try (an outage already) leaves a pending doubt be.
                        if let Some(d) = Doubt::of(&e, held_before, &attempted, &now_held) {
                            doubt = Some(d);
                        }
                    }
                }
            }
            Command::SetOverride { persona, spec, ack } => {
                let canonical = lock(&engine)
                    .personas()
                    .get(&persona)
                    .map(|p| p.name.clone());
                let result = match canonical {
                    None => Ok(false),
                    Some(name) => ledger.set_override(&name, spec.as_ref()).map(|()| {
                        lock(&engine).set_override(&name, spec, clock.now_ms());
                        true
                    }),
                };
                let _ = ack.send(result);
            }
            Command::Totals { ack } => {
                let _ = ack.send(ledger.totals());
            }
            Command::SnapshotWritten => {
                if let Some(k) = keeper.as_mut() {
                    k.reap(&health, true);
                    // Appends that came while it was being written found a snapshot under way
                    // and took none: the one they made due is taken now, not at the next append.
                    if held.events.is_empty() && doubt.is_none() && !health.failing() {
                        k.maybe_take(applied_seq, &engine, clock.now_ms());
                    }
                }
            }
            Command::Tail { ack } => {
                if doubt.is_some() {
                    // Nothing is read until the batch in doubt is resolved (by the probe).
                    continue;
                }
                catch_up(&*ledger, &mut applied_seq, None, &apply, &apply_foreign);
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
                // Budget overrides set through another replica (their own table, not events), and
                // this replica's heartbeat (the others' calls stop holding budget once theirs
                // lapses): about once a second.
                tails += 1;
                if tails % 5 == 1 {
                    let lease = match options.replica_lease_ms {
                        0 => DEFAULT_REPLICA_LEASE_MS,
                        ms => ms,
                    };
                    match ledger.heartbeat(clock.now_ms(), lease) {
                        Ok(replicas) => lock(&engine).set_replicas(replicas),
                        Err(e) => tracing::debug!(
                            "the replica heartbeat failed (tried again in a second): {e}"
                        ),
                    }
                }
                if tails.is_multiple_of(5) {
                    sync_overrides(&*ledger, &engine, clock.now_ms());
                }
            }
            Command::Probe => match write_held(
                &mut *ledger,
                &mut held,
                &mut doubt,
                clock.now_ms(),
                &mut applied_seq,
                &apply,
                &apply_foreign,
            ) {
                Ok(()) => {
                    health.succeeded();
                    health.set_held(0);
                }
                Err(e) => health.failed(clock.now_ms(), &e),
            },
            Command::Shutdown { ack } => {
                // Everything queued before the shutdown has been handled (FIFO); stop here.
                if !held.events.is_empty() || doubt.is_some() {
                    match write_held(
                        &mut *ledger,
                        &mut held,
                        &mut doubt,
                        clock.now_ms(),
                        &mut applied_seq,
                        &apply,
                        &apply_foreign,
                    ) {
                        Ok(()) => health.set_held(0),
                        Err(e) => tracing::error!(
                            events = held.events.len(),
                            "the ledger still cannot write at shutdown ({e}): the events held in memory since the outage began are lost (calls admitted but not settled are counted at their estimate at the next start)"
                        ),
                    }
                }
                if let Some(k) = keeper.as_mut() {
                    if held.events.is_empty() {
                        k.finish(applied_seq, &engine, &health, clock.now_ms());
                    } else {
                        k.reap(&health, true);
                    }
                }
                drop(ledger);
                let _ = ack.send(());
                return;
            }
        }
    }
}

/// Writes what an outage left in memory (or, with nothing held, tries a harmless write), after
/// resolving a batch whose commit was in doubt.
fn write_held(
    ledger: &mut dyn Ledger,
    held: &mut Held,
    doubt: &mut Option<Doubt>,
    now: i64,
    applied_seq: &mut u64,
    apply: &dyn Fn(&[Stamped]),
    apply_foreign: &dyn Fn(&Stamped),
) -> Result<(), LedgerError> {
    if let Some(d) = doubt.as_mut() {
        d.resolve(ledger, held, now, applied_seq, apply, apply_foreign)?;
        *doubt = None;
    }
    if held.events.is_empty() {
        return ledger.probe(now);
    }
    let last = match ledger.append(&held.events) {
        Ok(last) => last,
        Err(e) => {
            *doubt = Doubt::of(&e, held.events.len(), &[], &[]);
            return Err(e);
        }
    };
    let n = held.events.len() as u64;
    tracing::info!(
        events = n,
        "events held during the ledger outage are stored"
    );
    held.events.clear();
    let own = Own {
        first: (last + 1).saturating_sub(n),
        last,
        applied_already: n,
    };
    catch_up(
        &*ledger,
        applied_seq,
        Some((own, &[])),
        apply,
        apply_foreign,
    );
    Ok(())
}

/// A batch whose COMMIT was in doubt: the connection to the ledger dropped before its answer
/// came. Until the ledger answers again nobody can tell whether it was stored, so nothing is
/// read or written before [`Doubt::resolve`] has asked.
struct Doubt {
    first: u64,
    last: u64,
    /// Per event stored at `first..=last` (in order): the engine applied it already (it was held).
    applied: Vec<bool>,
    /// Per event at the front of `held`: it is one of the batch's (a copy not to write twice).
    held_copy: Vec<bool>,
    /// Learned from the ledger; kept when the catch-up after it failed half-way.
    stored: Option<bool>,
}

impl Doubt {
    /// From a failed append of `held_before` held events followed by a batch: `attempted` flags
    /// the batch's events that were in the transaction, `now_held` those held since.
    fn of(
        error: &LedgerError,
        held_before: usize,
        attempted: &[bool],
        now_held: &[bool],
    ) -> Option<Doubt> {
        let (first, last) = error.in_doubt?;
        let held = |i: usize| now_held.get(i).copied().unwrap_or(false);
        let mut applied = vec![true; held_before];
        let mut held_copy = vec![true; held_before];
        for (i, &was_attempted) in attempted.iter().enumerate() {
            if was_attempted {
                applied.push(held(i));
            }
            if held(i) {
                held_copy.push(was_attempted);
            }
        }
        tracing::warn!(
            first,
            last,
            "the ledger's connection dropped during a commit: whether those events were stored is learned when it is back"
        );
        Some(Doubt {
            first,
            last,
            applied,
            held_copy,
            stored: None,
        })
    }

    /// Asks the ledger whether the batch was stored and makes the engine and `held` agree with
    /// it. Stored: the held copies are dropped (never written twice), and the events that were
    /// refused (answered `ledger_outcome_unknown`) are applied, since they count; a gateway
    /// admission among them is voided right after (its call was never sent). Not stored: the held
    /// copies are written as usual, and the refused events are gone, as their answer allowed.
    fn resolve(
        &mut self,
        ledger: &mut dyn Ledger,
        held: &mut Held,
        now: i64,
        applied_seq: &mut u64,
        apply: &dyn Fn(&[Stamped]),
        apply_foreign: &dyn Fn(&Stamped),
    ) -> Result<(), LedgerError> {
        let stored = match self.stored {
            Some(stored) => stored,
            None => {
                let stored = ledger.stored_own(self.first, self.last)?;
                if stored {
                    let mut i = 0;
                    held.events.retain(|_| {
                        let copy = self.held_copy.get(i).copied().unwrap_or(false);
                        i += 1;
                        !copy
                    });
                }
                tracing::info!(
                    first = self.first,
                    last = self.last,
                    stored,
                    "the commit in doubt is resolved"
                );
                self.stored = Some(stored);
                stored
            }
        };
        if !stored {
            return Ok(());
        }
        let (first, last) = (self.first, self.last);
        let applied = &self.applied;
        ledger.replay_after(*applied_seq, &mut |seq, event, origin| {
            if (first..=last).contains(&seq) {
                let i = (seq - first) as usize;
                if !applied.get(i).copied().unwrap_or(true) {
                    let admitted = match &event.event {
                        Event::CallAdmitted(a) => Some(a.call.clone()),
                        _ => None,
                    };
                    apply(std::slice::from_ref(&event));
                    if let Some(call) = admitted {
                        let release = Stamped {
                            at: now,
                            event: Event::CallReleased { call },
                        };
                        apply(std::slice::from_ref(&release));
                        held.events.push(release);
                    }
                }
            } else {
                match origin {
                    Origin::Own => apply(std::slice::from_ref(&event)),
                    Origin::Other => apply_foreign(&event),
                }
            }
            *applied_seq = seq;
        })?;
        Ok(())
    }
}

/// This writer's events just stored at positions `first..=last`, of which the first
/// `applied_already` were applied before they were stored (held during an outage).
struct Own {
    first: u64,
    last: u64,
    applied_already: u64,
}

/// Brings the engine to the ledger's end, in ledger order: other replicas' events (a shared ledger)
/// as they are, this writer's own (`own`, with the batch it stored after any held events) through
/// `apply`, which also shows them to the observer. A batch that is next in line (always, alone on
/// a ledger) is applied directly, nothing read back.
fn catch_up(
    ledger: &dyn Ledger,
    applied_seq: &mut u64,
    own: Option<(Own, &[Stamped])>,
    apply: &dyn Fn(&[Stamped]),
    apply_foreign: &dyn Fn(&Stamped),
) {
    if !ledger.shared() {
        if let Some((own, batch)) = own {
            apply(batch);
            *applied_seq = own.last;
        }
        return;
    }
    if let Some((own, batch)) = &own {
        if own.applied_already == 0 && own.first == *applied_seq + 1 {
            // Next in line: nothing of the others' came between. What they store after it is
            // applied by the next `Tail` (≤ 200 ms), not by a query on every commit.
            apply(batch);
            *applied_seq = own.last;
            return;
        }
    }
    let range = own
        .as_ref()
        .map(|(o, _)| (o.first, o.first + o.applied_already));
    let result = ledger.replay_after(*applied_seq, &mut |seq, event, origin| {
        match (range, origin) {
            // Held events: applied when they were held.
            (Some((first, fresh)), _) if seq >= first && seq < fresh => {}
            (_, Origin::Own) => apply(std::slice::from_ref(&event)),
            (_, Origin::Other) => apply_foreign(&event),
        }
        *applied_seq = seq;
    });
    if let Err(e) = result {
        tracing::warn!("cannot read the ledger's newer events (tried again shortly): {e}");
    }
}

/// The ledger refused `batch`: each append in it is held in memory (applied, acknowledged, written
/// when the ledger returns) or refused. Accounting of calls already answered is always held while
/// there is room (refusing it would only lose it); awaited appends only with `on_outage = "buffer"`.
/// `acks` pairs each append with the end of its events in `batch`.
fn hold_or_refuse(
    held: &mut Held,
    health: &LedgerHealth,
    batch: Vec<Stamped>,
    acks: Vec<(Ack, usize)>,
    error: &LedgerError,
    apply: &dyn Fn(&[Stamped]),
) -> Vec<bool> {
    let mut start = 0;
    let mut refused = 0usize;
    let mut outcomes = Vec::with_capacity(acks.len());
    let mut kept = Vec::with_capacity(batch.len());
    for (ack, end) in acks {
        let events = &batch[start..end];
        start = end;
        let holdable = held.policy.buffer || ack.is_accounting();
        let hold = holdable && held.room_for(events.len());
        if hold {
            held.events.extend_from_slice(events);
            apply(events);
        } else {
            refused += events.len();
        }
        kept.extend(std::iter::repeat_n(hold, events.len()));
        outcomes.push((ack, hold));
    }
    // Health first: whoever is told the outcome may look at it at once.
    health.set_held(held.events.len());
    if refused > 0 && held.policy.buffer {
        health.set_buffer_full();
    }
    for (ack, ok) in outcomes {
        ack.done(if ok {
            Ok(())
        } else {
            Err(LedgerError::new(error.op, &error.message).in_doubt(error.in_doubt))
        });
    }
    tracing::debug!(
        refused,
        held = held.events.len(),
        "{error}; refused appends were not acknowledged"
    );
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::settings::LedgerSync;
    use crate::config::{load, Source};
    use crate::core::clock::ManualClock;
    use crate::core::event::{Event, Usage};
    use crate::store::sqlite::SqliteLedger;

    fn usage(tokens: u64) -> Stamped {
        Stamped {
            at: 1,
            event: Event::Usage(Usage {
                persona: "backend-engineer".into(),
                chatmode: "c".into(),
                model: "m".into(),
                prompt_tokens: tokens,
                completion_tokens: 0,
                ..Usage::default()
            }),
        }
    }

    #[tokio::test]
    async fn accounting_runs_its_follow_up_after_the_events_are_applied_and_when_the_writer_is_gone(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SqliteLedger::open(&dir.path().join("l.db"), LedgerSync::Normal).unwrap();
        let engine = Engine::new(load(&Source::Embedded).unwrap().engine_config(), 0);
        let engine = Arc::new(Mutex::new(engine));
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
        let (writer, thread) = spawn(Box::new(ledger), engine.clone(), clock);
        let used = |e: &Engine| e.budget("backend-engineer").map_or(0, |b| b.used_tokens());
        let (tx, rx) = oneshot::channel();
        let seen = engine.clone();
        writer
            .append_accounting(vec![usage(7)], move |result| {
                // Runs on the writer thread once the usage is in the engine.
                let _ = tx.send((result.is_ok(), used(&lock(&seen))));
            })
            .await;
        assert_eq!(rx.await.unwrap(), (true, 7));
        writer.shutdown().await;
        thread.join().unwrap();
        let (tx, rx) = oneshot::channel();
        writer
            .append_accounting(vec![usage(5)], move |result| {
                let _ = tx.send(result.is_err());
            })
            .await;
        assert!(rx.await.unwrap(), "a stopped writer reports the failure");
        assert_eq!(used(&lock(&engine)), 7);
    }

    /// The connection drops during the next commit: `Landed` after PostgreSQL committed it,
    /// `Lost` before.
    #[derive(Clone, Copy, PartialEq)]
    enum Drop {
        No,
        Landed,
        Lost,
    }

    /// A ledger in memory whose writes fail while `down` is set.
    struct Flaky {
        stored: Arc<Mutex<Vec<Stamped>>>,
        down: Arc<std::sync::atomic::AtomicBool>,
        drop: Arc<Mutex<Drop>>,
    }

    impl Ledger for Flaky {
        fn append(&mut self, events: &[Stamped]) -> Result<u64, LedgerError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(LedgerError::new("commit", "database or disk is full"));
            }
            let mut stored = self.stored.lock().unwrap();
            let first = stored.len() as u64 + 1;
            let last = stored.len() as u64 + events.len() as u64;
            let drop = std::mem::replace(&mut *self.drop.lock().unwrap(), Drop::No);
            if drop != Drop::No && !events.is_empty() {
                if drop == Drop::Landed {
                    stored.extend_from_slice(events);
                }
                self.down.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(
                    LedgerError::new("append", "connection closed").in_doubt(Some((first, last)))
                );
            }
            stored.extend_from_slice(events);
            Ok(stored.len() as u64)
        }
        fn replay_after(
            &self,
            after: u64,
            f: &mut dyn FnMut(u64, Stamped, Origin),
        ) -> Result<u64, LedgerError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(LedgerError::new("replay", "connection refused"));
            }
            let stored = self.stored.lock().unwrap().clone();
            let mut n = 0;
            for (i, e) in stored.into_iter().enumerate().skip(after as usize) {
                f(i as u64 + 1, e, Origin::Own);
                n += 1;
            }
            Ok(n)
        }
        fn shared(&self) -> bool {
            // Only a ledger across a network has commits in doubt.
            true
        }
        fn stored_own(&self, first: u64, last: u64) -> Result<bool, LedgerError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(LedgerError::new("resolve", "connection refused"));
            }
            let stored = self.stored.lock().unwrap().len() as u64;
            assert!(stored < first || stored >= last);
            Ok(stored >= last)
        }
        fn last_seq(&self) -> Result<u64, LedgerError> {
            Ok(self.stored.lock().unwrap().len() as u64)
        }
        fn first_seq(&self) -> Result<Option<u64>, LedgerError> {
            Ok(None)
        }
        fn ledger_id(&self) -> Result<String, LedgerError> {
            Ok("flaky".into())
        }
        fn remove_old(&mut self, _: u64, _: i64, _: usize) -> Result<u64, LedgerError> {
            Ok(0)
        }
        fn overrides(&self) -> Result<Vec<(String, BudgetSpec)>, LedgerError> {
            Ok(Vec::new())
        }
        fn set_override(&mut self, _: &str, _: Option<&BudgetSpec>) -> Result<(), LedgerError> {
            Ok(())
        }
        fn totals(&self) -> Result<LedgerTotals, LedgerError> {
            Ok(LedgerTotals::default())
        }
        fn probe(&mut self, _: i64) -> Result<(), LedgerError> {
            self.append(&[]).map(|_| ())
        }
    }

    struct Rig {
        writer: WriterHandle,
        engine: Arc<Mutex<Engine>>,
        stored: Arc<Mutex<Vec<Stamped>>>,
        down: Arc<std::sync::atomic::AtomicBool>,
        drop: Arc<Mutex<Drop>>,
    }

    fn rig(policy: OutagePolicy) -> Rig {
        let stored = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drop = Arc::new(Mutex::new(Drop::No));
        let ledger = Flaky {
            stored: stored.clone(),
            down: down.clone(),
            drop: drop.clone(),
        };
        let engine = Arc::new(Mutex::new(Engine::new(
            load(&Source::Embedded).unwrap().engine_config(),
            0,
        )));
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
        let (writer, _thread) = spawn_observed(
            Box::new(ledger),
            engine.clone(),
            clock,
            None,
            WriterOptions {
                outage: policy,
                ..WriterOptions::default()
            },
        );
        Rig {
            writer,
            engine,
            stored,
            down,
            drop,
        }
    }

    fn used(rig: &Rig) -> u64 {
        lock(&rig.engine)
            .budget("backend-engineer")
            .map_or(0, |b| b.used_tokens())
    }

    fn stored_tokens(rig: &Rig) -> Vec<u64> {
        rig.stored
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| match &s.event {
                Event::Usage(u) => Some(u.prompt_tokens),
                _ => None,
            })
            .collect()
    }

    async fn accounting(writer: &WriterHandle, tokens: u64) -> bool {
        let (tx, rx) = oneshot::channel();
        writer
            .append_accounting(vec![usage(tokens)], move |r| {
                let _ = tx.send(r.is_ok());
            })
            .await;
        rx.await.unwrap()
    }

    async fn probe_until_written(rig: &Rig) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while rig.writer.health.failing() {
            assert!(
                std::time::Instant::now() < deadline,
                "the probe never wrote"
            );
            rig.writer.probe();
            // The probe is answered on the writer thread; a totals request queued behind it
            // returns once it has run.
            let _ = rig.writer.totals().await;
        }
    }

    #[tokio::test]
    async fn fail_closed_refuses_awaited_appends_but_keeps_the_accounting_of_answered_calls() {
        let rig = rig(OutagePolicy::default());
        assert!(rig.writer.append(vec![usage(1)]).await.is_ok());
        rig.down.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(rig.writer.append(vec![usage(2)]).await.is_err());
        assert!(
            rig.writer.health.outage().is_some(),
            "refusing: /readyz is 503"
        );
        // Usage of a call already answered is held and applied, not dropped.
        assert!(accounting(&rig.writer, 4).await);
        assert_eq!(used(&rig), 5);
        assert_eq!(rig.writer.health.held(), 1);
        assert!(rig.writer.append(vec![usage(8)]).await.is_err());
        rig.down.store(false, std::sync::atomic::Ordering::SeqCst);
        probe_until_written(&rig).await;
        assert!(rig.writer.health.outage().is_none());
        assert_eq!(rig.writer.health.held(), 0);
        assert!(rig.writer.append(vec![usage(16)]).await.is_ok());
        // Stored once each, in the order applied; refused appends neither stored nor applied.
        assert_eq!(stored_tokens(&rig), vec![1, 4, 16]);
        assert_eq!(used(&rig), 21);
    }

    #[tokio::test]
    async fn buffer_serves_through_an_outage_up_to_its_bound_and_writes_everything_once() {
        let rig = rig(OutagePolicy {
            buffer: true,
            max_events: 3,
        });
        rig.down.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(rig.writer.append(vec![usage(1)]).await.is_ok());
        assert!(rig.writer.health.failing());
        assert!(
            rig.writer.health.outage().is_none(),
            "still ready while buffering"
        );
        assert!(accounting(&rig.writer, 2).await);
        assert!(rig.writer.append(vec![usage(4)]).await.is_ok());
        assert_eq!(used(&rig), 7, "held events count against budgets");
        // Past the bound: refused, and now /readyz says so.
        assert!(rig.writer.append(vec![usage(8)]).await.is_err());
        assert!(rig.writer.health.outage().is_some());
        assert_eq!(rig.writer.health.held(), 3);
        // Still down: a probe writes nothing and loses nothing.
        rig.writer.probe();
        let _ = rig.writer.totals().await;
        assert_eq!(rig.writer.health.held(), 3);
        assert!(stored_tokens(&rig).is_empty());
        rig.down.store(false, std::sync::atomic::Ordering::SeqCst);
        probe_until_written(&rig).await;
        assert!(rig.writer.append(vec![usage(16)]).await.is_ok());
        assert_eq!(stored_tokens(&rig), vec![1, 2, 4, 16]);
        assert_eq!(used(&rig), 23);
        assert!(rig.writer.health.outage().is_none());
    }

    #[tokio::test]
    async fn events_held_at_shutdown_are_written_when_the_ledger_is_back() {
        let rig = rig(OutagePolicy {
            buffer: true,
            max_events: 10,
        });
        rig.down.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(rig.writer.append(vec![usage(3)]).await.is_ok());
        rig.down.store(false, std::sync::atomic::Ordering::SeqCst);
        rig.writer.shutdown().await;
        assert_eq!(stored_tokens(&rig), vec![3]);
    }

    fn admission(call: &str, tokens: u64) -> Stamped {
        Stamped {
            at: 1,
            event: Event::CallAdmitted(crate::core::event::CallAdmission {
                call: call.into(),
                persona: "backend-engineer".into(),
                chatmode: "c".into(),
                model: "m".into(),
                estimate: tokens,
                cost_usd: None,
                workflow: None,
                stage: None,
                session: None,
                run: None,
                streamed_tokens: 0,
                replica: None,
            }),
        }
    }

    /// A commit in doubt, then the ledger back: what was stored is stored once and counted once.
    async fn in_doubt(policy: OutagePolicy, drop: Drop) -> (Rig, Result<(), LedgerError>) {
        let rig = rig(policy);
        assert!(rig.writer.append(vec![usage(1)]).await.is_ok());
        *rig.drop.lock().unwrap() = drop;
        let answer = rig.writer.append(vec![usage(2)]).await;
        assert!(rig.writer.health.failing());
        // An append refused during the outage (not tried: nothing new in doubt), a tail while the
        // ledger is unreachable, and one once it is back, before the probe: the events in doubt are
        // neither forgotten nor read as if nothing had happened.
        assert!(accounting(&rig.writer, 8).await, "held");
        rig.writer.tail();
        let _ = rig.writer.totals().await;
        rig.down.store(false, std::sync::atomic::Ordering::SeqCst);
        rig.writer.tail();
        let _ = rig.writer.totals().await;
        probe_until_written(&rig).await;
        assert!(rig.writer.append(vec![usage(4)]).await.is_ok());
        (rig, answer)
    }

    #[tokio::test]
    async fn a_held_batch_whose_commit_landed_unseen_is_not_written_twice() {
        let buffer = OutagePolicy {
            buffer: true,
            max_events: 10,
        };
        let (rig, answer) = in_doubt(buffer, Drop::Landed).await;
        assert!(answer.is_ok(), "held and acknowledged");
        assert_eq!(stored_tokens(&rig), vec![1, 2, 8, 4]);
        assert_eq!(used(&rig), 15);

        let (rig, answer) = in_doubt(buffer, Drop::Lost).await;
        assert!(answer.is_ok());
        assert_eq!(stored_tokens(&rig), vec![1, 2, 8, 4]);
        assert_eq!(used(&rig), 15);
    }

    #[tokio::test]
    async fn a_refused_batch_whose_commit_landed_unseen_is_counted_once_the_ledger_is_back() {
        let (rig, answer) = in_doubt(OutagePolicy::default(), Drop::Landed).await;
        let e = answer.expect_err("fail closed refuses");
        assert_eq!(e.in_doubt, Some((2, 2)), "the answer says it may be stored");
        assert_eq!(stored_tokens(&rig), vec![1, 2, 8, 4]);
        assert_eq!(used(&rig), 15, "stored, so counted");

        let (rig, answer) = in_doubt(OutagePolicy::default(), Drop::Lost).await;
        assert!(answer.expect_err("refused").in_doubt.is_some());
        assert_eq!(stored_tokens(&rig), vec![1, 8, 4]);
        assert_eq!(used(&rig), 13, "not stored, not counted");
    }

    #[tokio::test]
    async fn an_admission_refused_in_doubt_that_landed_is_voided() {
        let rig = rig(OutagePolicy::default());
        *rig.drop.lock().unwrap() = Drop::Landed;
        let answer = rig.writer.append(vec![admission("c1", 300)]).await;
        assert!(answer.expect_err("refused").in_doubt.is_some());
        assert_eq!(lock(&rig.engine).reserved("backend-engineer"), 0);
        rig.down.store(false, std::sync::atomic::Ordering::SeqCst);
        probe_until_written(&rig).await;
        // Stored, so applied; its call never went upstream, so it is released in the ledger too.
        assert_eq!(lock(&rig.engine).reserved("backend-engineer"), 0);
        let kinds: Vec<&str> = rig
            .stored
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.event.kind())
            .collect();
        assert_eq!(kinds, vec!["call_admitted", "call_released"]);
    }
}
