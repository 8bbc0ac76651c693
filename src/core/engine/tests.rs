//! The engine's admission, fleet rooms, settlements and experiment records.
use super::*;
use crate::config::{load, Source};
use crate::core::budget::{BudgetMode, BudgetSpec, Period};
use crate::core::event::Usage;

/// The embedded configuration's engine, backend-engineer on a `block` budget of `tokens`.
fn with_block_budget(tokens: u64) -> Engine {
    let config = load(&Source::Embedded).unwrap().engine_config();
    let mut engine = Engine::new(config, 0);
    let spec = BudgetSpec {
        tokens,
        cost_usd: None,
        period: Period::None,
        mode: BudgetMode::Block,
        soft_limit: None,
    };
    assert!(engine.set_override("backend-engineer", Some(spec), 0));
    engine
}

#[test]
fn fleet_room_counts_every_replicas_calls_in_flight_until_they_go_stale_and_settles_only_its_own() {
    let mut engine = with_block_budget(1_000);
    let admitted = |call: &str, estimate| Stamped {
        at: 0,
        event: Event::CallAdmitted(crate::core::event::CallAdmission {
            call: call.into(),
            persona: "backend-engineer".into(),
            chatmode: "c".into(),
            model: "m".into(),
            estimate,
            cost_usd: None,
            workflow: None,
            stage: None,
            session: None,
            run: None,
            streamed_tokens: 0,
            replica: None,
        }),
    };
    engine.apply(&admitted("mine", 300));
    // What a stream cut off by a crash had sent is counted on top of its estimate.
    for (at, n) in [(1, 40), (2, 25)] {
        engine.apply(&Stamped {
            at,
            event: Event::CallProgress {
                call: "mine".into(),
                completion_tokens: n,
            },
        });
    }
    let settled = engine.unsettled_calls()[0].1.as_settlement();
    assert_eq!(
        (settled.prompt_tokens, settled.completion_tokens),
        (300, 40)
    );
    engine.apply_foreign(&admitted("theirs", 500));
    assert_eq!(engine.fleet_room("backend-engineer"), Some(200));
    // Only this replica's own call is its to settle after a crash.
    let own: Vec<String> = engine
        .unsettled_calls()
        .into_iter()
        .map(|(_, c)| c.call)
        .collect();
    assert_eq!(own, vec!["mine".to_string()]);
    // A replica that never came back does not hold the budget forever.
    engine.tick(STALE_ADMISSION_MS + 1);
    assert_eq!(engine.fleet_room("backend-engineer"), Some(1_000));
    assert_eq!(
        engine.fleet_room("frontend-engineer"),
        None,
        "not a block budget"
    );
}

fn engine_with_cost_budget(usd: f64) -> Engine {
    let config = load(&Source::Embedded).unwrap().engine_config();
    let mut engine = Engine::new(config, 0);
    let spec = BudgetSpec {
        tokens: 1_000_000,
        cost_usd: Some(usd),
        period: Period::None,
        mode: BudgetMode::Block,
        soft_limit: None,
    };
    assert!(engine.set_override("backend-engineer", Some(spec), 0));
    engine
}

#[test]
fn a_call_settled_twice_counts_once() {
    let config = load(&Source::Embedded).unwrap().engine_config();
    let mut e = Engine::new(config, 0);
    let admission = crate::core::event::CallAdmission {
        call: "c1".into(),
        persona: "backend-engineer".into(),
        chatmode: "c".into(),
        model: "m".into(),
        estimate: 300,
        cost_usd: None,
        workflow: None,
        stage: None,
        session: None,
        run: None,
        replica: Some("dead".into()),
        streamed_tokens: 0,
    };
    e.apply(&Stamped {
        at: 1,
        event: Event::CallAdmitted(admission.clone()),
    });
    // The survivor's settlement, then the replica's own at its restart: the first counts.
    for at in [2, 3] {
        e.apply(&Stamped {
            at,
            event: Event::Usage(admission.as_settlement()),
        });
    }
    assert_eq!(e.budget("backend-engineer").unwrap().used_tokens(), 300);
    assert_eq!(e.metrics().duplicate_settlements, 1.0);
    assert!(e.unsettled_calls().is_empty());
}

#[test]
fn a_variants_retries_escalations_durations_and_its_decision_are_kept() {
    let config = load(&Source::Embedded).unwrap().engine_config();
    let mut e = Engine::new(config, 0);
    let mut apply = |at: UnixMillis, event: Event| e.apply(&Stamped { at, event });
    let (w, st) = ("feature-development", "implementation");
    for (i, seconds) in [10_i64, 20, 30, 40].into_iter().enumerate() {
        let run = format!("r{i}");
        let start = i as i64 * 100_000;
        apply(
            start,
            Event::RunStarted {
                run: run.clone(),
                workflow: w.into(),
                session: None,
                owner: None,
            },
        );
        apply(
            start,
            Event::StageStarted {
                run: run.clone(),
                workflow: w.into(),
                stage: st.into(),
                persona: None,
                variant: Some("v4".into()),
            },
        );
        // The first two runs fail once and pass on a retry on the escalation model.
        for (attempt, result) in if i < 2 {
            vec![(1, GateResult::Fail), (2, GateResult::Pass)]
        } else {
            vec![(1, GateResult::Pass)]
        } {
            apply(
                start + 1,
                Event::QualityGate(GateVerdictEvent {
                    workflow: w.into(),
                    stage: st.into(),
                    model: "m".into(),
                    result,
                    reasons: None,
                    run: Some(run.clone()),
                    attempt,
                    variant: Some("v4".into()),
                    escalated: attempt > 1,
                }),
            );
        }
        apply(
            start + seconds * 1000,
            Event::StageFinished {
                run: run.clone(),
                workflow: w.into(),
                stage: st.into(),
            },
        );
    }
    let r = e.variant_evidence(w, st, "v4");
    assert_eq!((r.runs, r.passes, r.failures), (4.0, 4.0, 2.0));
    assert_eq!((r.retries, r.escalations), (2.0, 2.0));
    // Quantiles from the stage-duration buckets (…, 15, 30, 60, …): 2 of 4 at most 30 s.
    let (p50, p95) = (
        r.duration_p50_seconds.unwrap(),
        r.duration_p95_seconds.unwrap(),
    );
    assert!(
        (15.0..=30.0).contains(&p50) && (30.0..=60.0).contains(&p95),
        "{p50} {p95}"
    );

    // A decision counts once, however often it is stored (two replicas deciding together).
    for at in [500_000, 500_001] {
        e.apply(&Stamped {
            at,
            event: Event::ExperimentDecided {
                workflow: w.into(),
                stage: st.into(),
                variant: "v4".into(),
                p_best: 0.97,
                runs: 4,
            },
        });
    }
    assert_eq!(e.metrics().experiment_decisions.get([w, st, "v4"]), 1.0);
}

#[test]
fn a_run_stage_budget_and_the_stage_start_are_decided_with_admission() {
    let config = load(&Source::Embedded).unwrap().engine_config();
    let mut e = Engine::new(config, 0);
    let stamp = |at, event| Stamped { at, event };
    e.apply(&stamp(
        0,
        Event::RunStarted {
            run: "r1".into(),
            workflow: "feature-development".into(),
            session: None,
            owner: None,
        },
    ));
    let claim = |estimate| CallClaim {
        persona: "backend-engineer",
        estimate,
        cost_estimate: 0.0,
        stage: Some(StageClaim {
            run: "r1",
            workflow: "feature-development",
            stage: "design",
            budget_tokens: Some(100),
        }),
    };
    // The first call starts the stage; the next, admitted before its stage_started is
    // applied, does not start it again.
    let first = e.admit_call(&claim(40), 1).unwrap();
    assert!(first.start_stage);
    let second = e.admit_call(&claim(40), 2).unwrap();
    assert!(!second.start_stage);
    // 80 held in flight: 30 more would pass the 100-token stage budget, nothing was used yet.
    match e.admit_call(&claim(30), 3) {
        Err(Refusal::StageBudget {
            used, in_flight, ..
        }) => assert_eq!((used, in_flight), (0, 80)),
        other => panic!("{other:?}"),
    }
    // The persona's reservation was not taken by the refused call.
    assert_eq!(e.reserved("backend-engineer"), 80);
    assert!(e.admit_call(&claim(20), 3).is_ok());
    e.apply(&stamp(
        4,
        Event::StageStarted {
            run: "r1".into(),
            workflow: "feature-development".into(),
            stage: "design".into(),
            persona: Some("backend-engineer".into()),
            variant: None,
        },
    ));
    // One call settles with 35 tokens; its hold is given back.
    e.apply(&stamp(
        5,
        Event::Usage(Usage {
            run: Some("r1".into()),
            persona: "backend-engineer".into(),
            chatmode: "c".into(),
            model: "m".into(),
            prompt_tokens: 30,
            completion_tokens: 5,
            workflow: Some("feature-development".into()),
            stage: Some("design".into()),
            session: None,
            cost_usd: None,
            duration_seconds: None,
            prompt_hash: None,
            estimated: false,
            call: None,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            variant: None,
            prompt_version: None,
        }),
    ));
    e.release_stage(first.stage.as_ref().unwrap());
    e.release("backend-engineer", first.reserved, 0.0);
    // used 35 + in flight 60 = 95: 5 fit, 6 do not.
    assert!(e.admit_call(&claim(6), 6).is_err());
    let last = e.admit_call(&claim(5), 6).unwrap();
    assert!(!last.start_stage, "the stage is running");
    // A finished run admits nothing more.
    e.apply(&stamp(
        7,
        Event::RunFinished {
            run: "r1".into(),
            workflow: "feature-development".into(),
            status: "completed".into(),
        },
    ));
    assert!(matches!(
        e.admit_call(&claim(1), 8),
        Err(Refusal::RunNotRunning {
            status: "completed",
            ..
        })
    ));
}

#[test]
fn cost_budgets_count_the_calls_in_flight() {
    let mut e = engine_with_cost_budget(1.0);
    let ok = |a: &Admission| matches!(a, Admission::Allowed { .. });
    assert!(ok(&e.admit("backend-engineer", 10, 0.4, 0)));
    assert!(ok(&e.admit("tta-backend-engineer", 10, 0.4, 0)));
    // 0.8 in flight: another 0.4 would pass the 1.0 limit.
    match e.admit("backend-engineer", 10, 0.4, 0) {
        Admission::Blocked { cost, .. } => {
            let (limit, used, in_flight) = cost.unwrap();
            assert_eq!((limit, used), (1.0, 0.0));
            assert!((in_flight - 0.8).abs() < 1e-12);
        }
        other => panic!("{other:?}"),
    }
    // One call settles: it cost 0.5, more than estimated.
    e.apply(&Stamped {
        at: 1,
        event: Event::Usage(Usage {
            persona: "backend-engineer".into(),
            chatmode: "c".into(),
            model: "m".into(),
            prompt_tokens: 5,
            completion_tokens: 5,
            cost_usd: Some(0.5),
            ..Usage::default()
        }),
    });
    e.release("backend-engineer", 10, 0.4);
    // 0.5 spent + 0.4 in flight + 0.1 = 1.0: allowed; anything more is not.
    assert!(ok(&e.admit("backend-engineer", 10, 0.1, 2)));
    assert!(!ok(&e.admit("backend-engineer", 10, 0.01, 2)));
    e.release("backend-engineer", 10, 0.4);
    e.release("backend-engineer", 10, 0.1);
    assert!(e.reserved_cost.is_empty(), "{:?}", e.reserved_cost);
    assert_eq!(e.reserved("backend-engineer"), 0);
}

/// A dead replica's admissions stop holding budget as soon as its lease lapses — on every
/// replica, not only the one that settles them, and before any settlement is stored (a
/// settlement that fails or comes late must not keep the budget shut).
#[test]
fn a_dead_replicas_admissions_stop_holding_budget_before_any_settlement() {
    let mut engine = with_block_budget(1_000);
    engine.apply_foreign(&Stamped {
        at: 0,
        event: Event::CallAdmitted(crate::core::event::CallAdmission {
            call: "theirs".into(),
            persona: "backend-engineer".into(),
            chatmode: "c".into(),
            model: "m".into(),
            estimate: 500,
            cost_usd: None,
            workflow: None,
            stage: None,
            session: None,
            run: None,
            streamed_tokens: 0,
            replica: Some("b".into()),
        }),
    });
    // b alive: its call holds 500.
    engine.set_replicas(Some(Replicas {
        live: vec!["a".into(), "b".into()],
        dead: Vec::new(),
    }));
    assert_eq!(engine.fleet_room("backend-engineer"), Some(500));
    // b dead, seen by "c", which is not the replica that settles ("a" sorts first): the room is
    // the whole budget at once, while the call is still unsettled.
    engine.set_replicas(Some(Replicas {
        live: vec!["a".into(), "c".into()],
        dead: vec!["b".into()],
    }));
    assert!(
        engine.orphan_settlements("c").is_empty(),
        "a settles, not c"
    );
    assert_eq!(engine.orphan_settlements("a").len(), 1);
    assert_eq!(engine.fleet_room("backend-engineer"), Some(1_000));
}
