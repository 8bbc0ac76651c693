//! The ledger writer: one thread that owns the ledger, stores batches, then applies them.
//!
//! Requests queue on a bounded channel (a full queue makes callers wait: backpressure, never loss).
//! Consecutive appends are grouped into one transaction (group commit), so many small HTTP batches
//! cost one commit. Only after the commit are the events applied to the engine and acknowledged:
//! an acknowledged event is on disk, and the engine's state is always a replay of the ledger.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

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
    /// Nobody waits (the gateway's usage, after the client was answered): run this on the writer
    /// thread once the events are applied. No task has to be woken for it, and the append may
    /// linger briefly so that other appends share its commit.
    Then(Box<dyn FnOnce(Result<(), LedgerError>) + Send>),
}

impl Ack {
    fn lingers(&self) -> bool {
        matches!(self, Ack::Then(_))
    }

    fn done(self, result: Result<(), LedgerError>) {
        match self {
            Ack::Waiting(tx) => {
                let _ = tx.send(result);
            }
            Ack::Then(then) => then(result),
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
}

/// Whether the ledger can write: set by the writer at every commit and probe, read by `/readyz`
/// and the exposition.
#[derive(Debug, Default)]
pub struct LedgerHealth {
    failing: std::sync::atomic::AtomicBool,
    /// Unix ms of the first failure of the current outage.
    since_ms: std::sync::atomic::AtomicI64,
    pub failures: std::sync::atomic::AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl LedgerHealth {
    pub fn failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// (since when, the last error) while the ledger cannot write.
    pub fn outage(&self) -> Option<(i64, String)> {
        if !self.failing() {
            return None;
        }
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        Some((
            self.since_ms.load(std::sync::atomic::Ordering::Relaxed),
            error,
        ))
    }

    fn failed(&self, now: i64, error: &LedgerError) {
        use std::sync::atomic::Ordering;
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        if !self.failing.swap(true, Ordering::Relaxed) {
            self.since_ms.store(now, Ordering::Relaxed);
            tracing::error!(
                "the ledger cannot write ({error}): gateway calls and events are refused with 503 and /readyz says so until it can (tried again every few seconds)"
            );
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
    pub health: Arc<LedgerHealth>,
    /// Cuts a lingering group short: an append somebody awaits (an event batch, a gateway call's
    /// admission before its upstream) must not wait out another append's linger.
    urgent: Arc<Urgent>,
}

/// Set by an awaited append; the writer's linger waits on it instead of sleeping blind.
#[derive(Default)]
struct Urgent {
    waiting: Mutex<bool>,
    wake: std::sync::Condvar,
}

impl Urgent {
    fn raise(&self) {
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_one();
    }

    /// Waits until `deadline` or until an awaited append arrives; clears the flag.
    fn linger_until(&self, deadline: std::time::Instant) {
        let guard = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = deadline.saturating_duration_since(std::time::Instant::now());
        let (mut guard, _) = self
            .wake
            .wait_timeout_while(guard, timeout, |waiting| !*waiting)
            .unwrap_or_else(|p| p.into_inner());
        *guard = false;
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
    spawn_observed(ledger, engine, clock, None)
}

/// Starts the writer thread with an observer of applied events.
pub fn spawn_observed(
    ledger: Box<dyn Ledger>,
    engine: Arc<Mutex<Engine>>,
    clock: Arc<dyn Clock>,
    observer: Option<Observer>,
) -> (WriterHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let urgent = Arc::new(Urgent::default());
    let writer_urgent = urgent.clone();
    let health = Arc::new(LedgerHealth::default());
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
                writer_urgent,
                writer_health,
            )
        })
        .unwrap_or_else(|e| {
            // Without a writer thread nothing can be stored: there is no way to continue.
            tracing::error!("cannot start the ledger writer thread: {e}");
            std::process::exit(1)
        });
    (WriterHandle { tx, urgent, health }, thread)
}

fn run(
    mut ledger: Box<dyn Ledger>,
    engine: Arc<Mutex<Engine>>,
    clock: Arc<dyn Clock>,
    mut rx: mpsc::Receiver<Command>,
    observer: Option<Observer>,
    urgent: Arc<Urgent>,
    health: Arc<LedgerHealth>,
) {
    let mut carried: Option<Command> = None;
    loop {
        let Some(first) = carried.take().or_else(|| rx.blocking_recv()) else {
            return;
        };
        match first {
            Command::Append { events, ack } => {
                let mut batch = events;
                // Linger only while every append in the group is accounting nobody waits on.
                let mut lingering = ack.lingers();
                let mut acks = vec![ack];
                let deadline = std::time::Instant::now() + LINGER;
                while batch.len() < MAX_GROUP_EVENTS {
                    match rx.try_recv() {
                        Ok(Command::Append { events, ack }) => {
                            batch.extend(events);
                            lingering &= ack.lingers();
                            acks.push(ack);
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
                match ledger.append(&batch) {
                    Ok(()) => {
                        health.succeeded();
                        let mut engine = lock(&engine);
                        for e in &batch {
                            engine.apply(e);
                            if let Some(observe) = &observer {
                                observe(e, engine.take_observations());
                            }
                        }
                        drop(engine);
                        for ack in acks {
                            ack.done(Ok(()));
                        }
                    }
                    Err(e) => {
                        health.failed(clock.now_ms(), &e);
                        tracing::debug!(
                            events = batch.len(),
                            "{e}; the batch was not acknowledged"
                        );
                        for ack in acks {
                            ack.done(Err(LedgerError {
                                op: e.op,
                                message: e.message.clone(),
                            }));
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
            Command::Probe => match ledger.probe(clock.now_ms()) {
                Ok(()) => health.succeeded(),
                Err(e) => health.failed(clock.now_ms(), &e),
            },
            Command::Shutdown { ack } => {
                // Everything queued before the shutdown has been handled (FIFO); stop here.
                drop(ledger);
                let _ = ack.send(());
                return;
            }
        }
    }
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
}
