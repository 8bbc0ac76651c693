//! The writer on a ledger shared by replicas: admissions decided again on the whole fleet's usage
//! under the ledger's write lock, the others' events applied in ledger order (`catch_up`), and
//! budget overrides set through another replica.

use std::sync::Mutex;

use super::lock;
use crate::core::budget::BudgetSpec;
use crate::core::engine::Engine;
use crate::core::event::Stamped;
use crate::store::{Ledger, Origin};

/// Makes the engine's budget overrides those of the (shared) ledger.
pub(super) fn sync_overrides(ledger: &dyn Ledger, engine: &Mutex<Engine>, now: i64) {
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
pub(super) fn fleet_decide(
    engine: &Mutex<Engine>,
    batch: &[Stamped],
    ranges: &[(usize, usize)],
) -> Vec<bool> {
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

/// This writer's events just stored at positions `first..=last`, of which the first
/// `applied_already` were applied before they were stored (held during an outage).
pub(super) struct Own {
    pub(super) first: u64,
    pub(super) last: u64,
    pub(super) applied_already: u64,
}

/// Brings the engine to the ledger's end, in ledger order: other replicas' events (a shared ledger)
/// as they are, this writer's own (`own`, with the batch it stored after any held events) through
/// `apply`, which also shows them to the observer. A batch that is next in line (always, alone on
/// a ledger) is applied directly, nothing read back.
pub(super) fn catch_up(
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
