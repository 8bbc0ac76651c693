//! Through a ledger outage: the events held in memory (applied, acknowledged, written first when
//! the ledger returns), the appends refused instead, and the write that empties the hold.

use super::doubt::Doubt;
use super::fleet::{catch_up, Own};
use super::{Ack, LedgerHealth, OutagePolicy};
use crate::core::event::Stamped;
use crate::store::{Ledger, LedgerError};

/// Events applied to the engine but not yet stored (the ledger could not write). They are written
/// first, in order, before anything else, so the ledger's order stays the order they were applied.
pub(super) struct Held {
    pub(super) events: Vec<Stamped>,
    pub(super) policy: OutagePolicy,
}

impl Held {
    pub(super) fn room_for(&self, n: usize) -> bool {
        self.events.len() + n <= self.policy.max_events
    }
}

/// Writes what an outage left in memory (or, with nothing held, tries a harmless write), after
/// resolving a batch whose commit was in doubt.
pub(super) fn write_held(
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

/// The ledger refused `batch`: each append in it is held in memory (applied, acknowledged, written
/// when the ledger returns) or refused. Accounting of calls already answered is always held while
/// there is room (refusing it would only lose it); awaited appends only with `on_outage = "buffer"`.
/// `acks` pairs each append with the end of its events in `batch`.
pub(super) fn hold_or_refuse(
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
