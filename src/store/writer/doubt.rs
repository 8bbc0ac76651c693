//! Commits in doubt: the connection dropped before a COMMIT's answer came. Nothing is read or
//! written until the ledger says whether the batch was stored; then the engine and the outage hold
//! are made to agree with it.

use super::outage::Held;
use crate::core::event::{Event, Stamped};
use crate::store::{Ledger, LedgerError, Origin};

/// A batch whose COMMIT was in doubt: the connection to the ledger dropped before its answer
/// came. Until the ledger answers again nobody can tell whether it was stored, so nothing is
/// read or written before [`Doubt::resolve`] has asked.
pub(super) struct Doubt {
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
    pub(super) fn of(
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
    pub(super) fn resolve(
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
