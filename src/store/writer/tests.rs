//! The writer under outages, commits in doubt and accounting follow-ups.
use super::*;
use crate::config::settings::LedgerSync;
use crate::config::{load, Source};
use crate::core::clock::ManualClock;
use crate::core::event::{Event, Usage};
use crate::store::sqlite::SqliteLedger;
use crate::store::Origin;

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
async fn accounting_runs_its_follow_up_after_the_events_are_applied_and_when_the_writer_is_gone() {
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
