//! The writer thread's loop: take the next command, group consecutive appends into one commit,
//! store them (one commit path, whether the fleet decides admissions again or not), then apply and
//! acknowledge — or hold or refuse them when the ledger cannot write.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::doubt::Doubt;
use super::fleet::{catch_up, fleet_decide, sync_overrides, Own, BUDGET_REFUSED};
use super::outage::{hold_or_refuse, write_held, Held};
use super::snapshots::Keeper;
use super::{
    lock, Ack, Command, LedgerHealth, Observer, Signals, Urgent, WriterOptions,
    DEFAULT_REPLICA_LEASE_MS, LINGER, LINGER_MAX_EVENTS, MAX_GROUP_EVENTS,
};
use crate::core::clock::Clock;
use crate::core::engine::Engine;
use crate::core::event::{Event, Stamped};
use crate::store::{Ledger, LedgerError, Origin};

/// Applies stored events to the engine (and shows them to the observer).
struct Applier {
    engine: Arc<Mutex<Engine>>,
    observer: Option<Observer>,
}

impl Applier {
    fn apply(&self, events: &[Stamped]) {
        let mut engine = lock(&self.engine);
        for e in events {
            engine.apply(e);
            if let Some(observe) = &self.observer {
                observe(e, engine.take_observations());
            }
        }
    }

    fn apply_foreign(&self, e: &Stamped) {
        lock(&self.engine).apply_foreign(e);
    }
}

/// Appends grouped into one commit: the events, and each append's acknowledgement with the end of
/// its events in `batch`.
struct Group {
    batch: Vec<Stamped>,
    acks: Vec<(Ack, usize)>,
}

impl Group {
    /// Each append's range of `batch`.
    fn ranges(&self) -> Vec<(usize, usize)> {
        let mut start = 0;
        self.acks
            .iter()
            .map(|(_, end)| {
                let range = (start, *end);
                start = *end;
                range
            })
            .collect()
    }
}

/// Per event of a group, whether it was stored (`false`: refused by the fleet-wide budget
/// check); empty means all of them.
type Stored = Vec<bool>;

fn stored_at(mask: &[bool], i: usize) -> bool {
    mask.get(i).copied().unwrap_or(true)
}

struct Writer {
    ledger: Box<dyn Ledger>,
    applier: Applier,
    clock: Arc<dyn Clock>,
    urgent: Arc<Urgent>,
    health: Arc<LedgerHealth>,
    held: Held,
    keeper: Option<Keeper>,
    doubt: Option<Doubt>,
    applied_seq: u64,
    tails: u64,
    replica_lease_ms: i64,
    /// A command read while gathering a group, handled next.
    carried: Option<Command>,
}

pub(super) fn run(
    ledger: Box<dyn Ledger>,
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
    let keeper = options.snapshots.and_then(|plan| {
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
    let mut writer = Writer {
        ledger,
        applier: Applier { engine, observer },
        clock,
        urgent,
        health,
        held: Held {
            events: Vec::new(),
            policy: options.outage,
        },
        keeper,
        doubt: None,
        applied_seq: options.applied_seq,
        tails: 0,
        replica_lease_ms: options.replica_lease_ms,
        carried: None,
    };
    while let Some(command) = writer.next(&mut rx) {
        match command {
            Command::Append { events, ack } => {
                let group = writer.gather(&mut rx, events, ack);
                writer.commit(group);
            }
            Command::SetOverride { persona, spec, ack } => {
                let _ = ack.send(writer.set_override(&persona, spec));
            }
            Command::Totals { ack } => {
                let _ = ack.send(writer.ledger.totals());
            }
            Command::SnapshotWritten => writer.snapshot_written(),
            Command::Tail { ack } => writer.tail(ack),
            Command::Probe => writer.probe(),
            Command::Shutdown { ack } => {
                writer.shutdown();
                // The ledger is closed before the shutdown is acknowledged.
                drop(writer);
                let _ = ack.send(());
                return;
            }
        }
    }
}

impl Writer {
    /// The next command (`None`: every handle is gone). Idle, it removes a chunk of old events
    /// when retention has work, then waits.
    fn next(&mut self, rx: &mut mpsc::Receiver<Command>) -> Option<Command> {
        loop {
            if let Some(k) = self.keeper.as_mut() {
                k.reap(&self.health, false);
            }
            if let Some(command) = self.carried.take() {
                return Some(command);
            }
            match rx.try_recv() {
                Ok(command) => return Some(command),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if let Some(k) = self.keeper.as_mut() {
                        if k.retain_step(&mut *self.ledger, self.clock.now_ms()) {
                            continue;
                        }
                    }
                    return rx.blocking_recv();
                }
            }
        }
    }

    /// The appends queued behind the first one, up to [`MAX_GROUP_EVENTS`]. Lingers (at most
    /// [`LINGER`]) only while every append in the group is accounting nobody waits on.
    fn gather(
        &mut self,
        rx: &mut mpsc::Receiver<Command>,
        events: Vec<Stamped>,
        ack: Ack,
    ) -> Group {
        let mut batch = events;
        let mut lingering = ack.lingers();
        if lingering {
            self.urgent.clear();
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
                    self.carried = Some(other);
                    break;
                }
                Err(_) => {
                    let now = std::time::Instant::now();
                    if !lingering || batch.len() >= LINGER_MAX_EVENTS || now >= deadline {
                        break;
                    }
                    // One wait for the rest of the window (not a polling loop: on a busy core
                    // every wake-up would preempt request handling), cut short when an append
                    // somebody awaits arrives.
                    self.urgent.linger_until(deadline);
                }
            }
        }
        Group { batch, acks }
    }

    /// Stores a group, then applies and acknowledges it; or, when the ledger refuses it, holds or
    /// refuses each append and notes a commit in doubt.
    fn commit(&mut self, group: Group) {
        let ranges = group.ranges();
        match self.store(&group.batch, &ranges) {
            Ok(mask) => {
                self.health.succeeded();
                self.health.set_held(0);
                for ((ack, _), (start, _)) in group.acks.into_iter().zip(&ranges) {
                    ack.done(if stored_at(&mask, *start) {
                        Ok(())
                    } else {
                        Err(LedgerError::new(
                            BUDGET_REFUSED,
                            "the persona's block budget is spent across the replicas (their calls in flight count)",
                        ))
                    });
                }
                if let Some(k) = self.keeper.as_mut() {
                    k.dirty = true;
                    k.maybe_take(self.applied_seq, &self.applier.engine, self.clock.now_ms());
                }
            }
            Err((e, mask)) => {
                if !self.health.failing() {
                    self.health.failed(self.clock.now_ms(), &e);
                }
                // Held events went first in the same transaction.
                let held_before = self.held.events.len();
                let attempted: Vec<bool> = (0..group.batch.len())
                    .map(|i| stored_at(&mask, i))
                    .collect();
                let applier = &self.applier;
                let now_held = hold_or_refuse(
                    &mut self.held,
                    &self.health,
                    group.batch,
                    group.acks,
                    &e,
                    &|events| applier.apply(events),
                );
                // Refused without a try (an outage already) leaves a pending doubt be.
                if let Some(d) = Doubt::of(&e, held_before, &attempted, &now_held) {
                    self.doubt = Some(d);
                }
            }
        }
    }

    /// Writes `batch` (after what an outage held) and applies what was stored. During an outage
    /// the ledger is not tried again per append (a locked database makes each try wait out the
    /// busy timeout; a buffer would be re-encoded every time): the probe, every 2 s, tries it.
    /// Several replicas: a batch with admissions is decided again under the ledger's write lock,
    /// on the whole fleet's usage and calls in flight.
    fn store(
        &mut self,
        batch: &[Stamped],
        ranges: &[(usize, usize)],
    ) -> Result<Stored, (LedgerError, Stored)> {
        if self.health.failing() {
            return Err((self.health.last_error(), Vec::new()));
        }
        let admits = batch
            .iter()
            .any(|e| matches!(e.event, Event::CallAdmitted(_)));
        if self.ledger.shared() && self.held.events.is_empty() && admits {
            self.store_decided(batch, ranges)
        } else {
            self.store_after_held(batch).map(|()| Vec::new())
        }
    }

    /// A shared ledger, admissions in the batch: stored in the transaction that reads what the
    /// others stored since and decides each append on the fleet's budget.
    fn store_decided(
        &mut self,
        batch: &[Stamped],
        ranges: &[(usize, usize)],
    ) -> Result<Stored, (LedgerError, Stored)> {
        let applier = &self.applier;
        let applied_seq = &mut self.applied_seq;
        let mut mask: Stored = Vec::new();
        let result = self.ledger.append_synced(
            batch,
            *applied_seq,
            &mut |seq, event, origin| {
                match origin {
                    Origin::Own => applier.apply(std::slice::from_ref(&event)),
                    Origin::Other => applier.apply_foreign(&event),
                }
                *applied_seq = seq;
            },
            &mut || {
                mask = fleet_decide(&applier.engine, batch, ranges);
                mask.clone()
            },
        );
        match result {
            Ok(last) => {
                applier.apply(&crate::store::kept(batch, &mask));
                *applied_seq = (*applied_seq).max(last);
                Ok(mask)
            }
            Err(e) => Err((e, mask)),
        }
    }

    /// The batch after any events an outage held, in one transaction; then the engine brought to
    /// the ledger's end (the batch applied, the others' events in order on a shared ledger).
    fn store_after_held(&mut self, batch: &[Stamped]) -> Result<(), (LedgerError, Stored)> {
        let (last, held_before) = if self.held.events.is_empty() {
            let last = self.ledger.append(batch).map_err(|e| (e, Vec::new()))?;
            (last, 0)
        } else {
            let mut all = std::mem::take(&mut self.held.events);
            let before = all.len();
            all.extend_from_slice(batch);
            let result = self.ledger.append(&all);
            all.truncate(before);
            match result {
                Ok(last) => {
                    tracing::info!(
                        events = before,
                        "events held during the ledger outage are stored"
                    );
                    (last, before)
                }
                Err(e) => {
                    self.held.events = all;
                    return Err((e, Vec::new()));
                }
            }
        };
        let own = Own {
            first: (last + 1).saturating_sub((held_before + batch.len()) as u64),
            last,
            applied_already: held_before as u64,
        };
        let applier = &self.applier;
        catch_up(
            &*self.ledger,
            &mut self.applied_seq,
            Some((own, batch)),
            &|events| applier.apply(events),
            &|e| applier.apply_foreign(e),
        );
        Ok(())
    }

    /// A budget override, stored then applied (`Ok(false)`: no such persona).
    fn set_override(
        &mut self,
        persona: &str,
        spec: Option<crate::core::budget::BudgetSpec>,
    ) -> Result<bool, LedgerError> {
        let engine = &self.applier.engine;
        let canonical = lock(engine).personas().get(persona).map(|p| p.name.clone());
        match canonical {
            None => Ok(false),
            Some(name) => self.ledger.set_override(&name, spec.as_ref()).map(|()| {
                lock(engine).set_override(&name, spec, self.clock.now_ms());
                true
            }),
        }
    }

    fn snapshot_written(&mut self) {
        if let Some(k) = self.keeper.as_mut() {
            k.reap(&self.health, true);
            // Appends that came while it was being written found a snapshot under way and took
            // none: the one they made due is taken now, not at the next append.
            if self.held.events.is_empty() && self.doubt.is_none() && !self.health.failing() {
                k.maybe_take(self.applied_seq, &self.applier.engine, self.clock.now_ms());
            }
        }
    }

    /// Applies what other replicas stored since; about once a second also beats this replica's
    /// heartbeat (the others' calls stop holding budget once theirs lapses) and reads budget
    /// overrides set through another replica (their own table, not events).
    fn tail(&mut self, ack: Option<tokio::sync::oneshot::Sender<()>>) {
        if self.doubt.is_some() {
            // Nothing is read until the batch in doubt is resolved (by the probe).
            return;
        }
        let applier = &self.applier;
        catch_up(
            &*self.ledger,
            &mut self.applied_seq,
            None,
            &|events| applier.apply(events),
            &|e| applier.apply_foreign(e),
        );
        if let Some(ack) = ack {
            let _ = ack.send(());
        }
        self.tails += 1;
        if self.tails % 5 == 1 {
            let lease = match self.replica_lease_ms {
                0 => DEFAULT_REPLICA_LEASE_MS,
                ms => ms,
            };
            match self.ledger.heartbeat(self.clock.now_ms(), lease) {
                Ok(replicas) => lock(&self.applier.engine).set_replicas(replicas),
                Err(e) => {
                    tracing::debug!("the replica heartbeat failed (tried again in a second): {e}")
                }
            }
        }
        if self.tails.is_multiple_of(5) {
            sync_overrides(&*self.ledger, &self.applier.engine, self.clock.now_ms());
        }
    }

    /// Writes what an outage held (after resolving a commit in doubt), or tries a harmless write.
    fn write_held(&mut self) -> Result<(), LedgerError> {
        let applier = &self.applier;
        write_held(
            &mut *self.ledger,
            &mut self.held,
            &mut self.doubt,
            self.clock.now_ms(),
            &mut self.applied_seq,
            &|events| applier.apply(events),
            &|e| applier.apply_foreign(e),
        )
    }

    fn probe(&mut self) {
        match self.write_held() {
            Ok(()) => {
                self.health.succeeded();
                self.health.set_held(0);
            }
            Err(e) => self.health.failed(self.clock.now_ms(), &e),
        }
    }

    /// Everything queued before the shutdown has been handled (FIFO): what is held is written if
    /// the ledger can take it, and the last snapshot is taken.
    fn shutdown(&mut self) {
        if !self.held.events.is_empty() || self.doubt.is_some() {
            match self.write_held() {
                Ok(()) => self.health.set_held(0),
                Err(e) => tracing::error!(
                    events = self.held.events.len(),
                    "the ledger still cannot write at shutdown ({e}): the events held in memory since the outage began are lost (calls admitted but not settled are counted at their estimate at the next start)"
                ),
            }
        }
        if let Some(k) = self.keeper.as_mut() {
            if self.held.events.is_empty() {
                k.finish(
                    self.applied_seq,
                    &self.applier.engine,
                    &self.health,
                    self.clock.now_ms(),
                );
            } else {
                k.reap(&self.health, true);
            }
        }
    }
}
