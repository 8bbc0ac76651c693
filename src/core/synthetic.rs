//! A deterministic stream of realistic events, for benchmarks and for the tests that compare two
//! ways of building the same state (a snapshot plus the events after it against a full replay).
//!
//! It exercises every kind of event: gateway calls admitted and settled (one in a million left
//! unsettled, as a crash would), usage reported by agents, sessions that change persona (explicitly
//! and by usage), runs with stages and gate verdicts, suppressed switches, budget resets, and label
//! values beyond the cap. Events are 10 ms apart, so ten million span more than a day of budgets.

use super::event::{
    CallAdmission, Event, GateResult, GateVerdictEvent, PersonaSwitch, Stamped, Usage,
};

const PERSONAS: [&str; 6] = [
    "backend-engineer",
    "frontend-engineer",
    "devops-engineer",
    "testing-specialist",
    "observability-expert",
    "data-scientist",
];
const WORKFLOWS: [(&str, [&str; 3]); 2] = [
    (
        "feature-development",
        ["requirements", "implementation", "testing"],
    ),
    ("incident-response", ["triage", "mitigation", "postmortem"]),
];

/// Event `i` of the stream starting at `t0` (pure: the same `i` always gives the same event).
pub fn event(t0: i64, i: u64) -> Stamped {
    let at = t0 + (i as i64) * 10;
    // Sessions drift between personas: the persona of a session changes every 50 of its events.
    let session = format!("s{}", (i / 7) % 5_000);
    let persona = PERSONAS[((i / 7 / 5_000 / 50 + (i / 7) % 5_000) % 6) as usize];
    let chatmode = ["backend-dev", "frontend-dev", "ops"][(i % 3) as usize];
    // A new model name now and then, so the label cap folds some into `other`.
    let model = if i.is_multiple_of(10_007) {
        format!("model-{}", i / 10_007)
    } else {
        ["gpt-4o", "gpt-4o-mini", "claude-sonnet", "llama-70b"][(i % 4) as usize].to_string()
    };
    let block = i / 20;
    let (workflow, stages) = WORKFLOWS[(block % 2) as usize];
    let run = format!("run-{block}");
    let usage = |call: Option<String>| Usage {
        persona: persona.into(),
        chatmode: chatmode.into(),
        model: model.clone(),
        prompt_tokens: 100 + i % 900,
        completion_tokens: 20 + i % 300,
        session: Some(session.clone()),
        cost_usd: Some((i % 100) as f64 * 0.0001),
        duration_seconds: Some((i % 50) as f64 * 0.1),
        call,
        ..Usage::default()
    };
    let event = match i % 20 {
        k @ 0..=9 if k % 2 == 0 => Event::CallAdmitted(CallAdmission {
            streamed_tokens: 0,
            replica: None,
            call: format!("c{i}"),
            persona: persona.into(),
            chatmode: chatmode.into(),
            model: model.clone(),
            estimate: 2_000,
            cost_usd: None,
            workflow: None,
            stage: None,
            session: Some(session.clone()),
            run: None,
        }),
        // Now and then an admission is never settled (a crash cut its call off): its usage is a
        // plain report instead.
        0..=9 if (i - 1).is_multiple_of(1_000_000) => Event::Usage(usage(None)),
        0..=9 => Event::Usage(usage(Some(format!("c{}", i - 1)))),
        10..=13 => Event::Usage(usage(None)),
        14 => {
            if i.is_multiple_of(997) {
                Event::SwitchSuppressed {
                    session: session.clone(),
                    from: Some(persona.into()),
                    to: PERSONAS[(i % 6) as usize].into(),
                    chatmode: chatmode.into(),
                    reason: "cooldown".into(),
                }
            } else {
                Event::PersonaSwitch(PersonaSwitch {
                    session: session.clone(),
                    from: Some(persona.into()),
                    to: PERSONAS[(i % 6) as usize].into(),
                    chatmode: chatmode.into(),
                })
            }
        }
        15 => Event::RunStarted {
            run,
            workflow: workflow.into(),
            session: Some(session),
            owner: None,
        },
        16 => Event::StageStarted {
            run,
            workflow: workflow.into(),
            stage: stages[(block % 3) as usize].into(),
            persona: Some(persona.into()),
            variant: None,
        },
        17 => Event::QualityGate(GateVerdictEvent {
            workflow: workflow.into(),
            stage: stages[(block % 3) as usize].into(),
            model,
            result: if block.is_multiple_of(5) {
                GateResult::Fail
            } else {
                GateResult::Pass
            },
            reasons: block.is_multiple_of(5).then(|| "min_length".to_string()),
            run: Some(run),
            attempt: 1,
            variant: None,
            escalated: false,
        }),
        18 => Event::StageFinished {
            run,
            workflow: workflow.into(),
            stage: stages[(block % 3) as usize].into(),
        },
        _ if i % 100_000 == 19 => Event::BudgetReset {
            persona: persona.into(),
        },
        _ => Event::RunFinished {
            run,
            workflow: workflow.into(),
            status: if block.is_multiple_of(7) {
                "failed"
            } else {
                "completed"
            }
            .into(),
        },
    };
    Stamped { at, event }
}

/// Events `range` of the stream starting at `t0`.
pub fn events(t0: i64, range: std::ops::Range<u64>) -> impl Iterator<Item = Stamped> {
    range.map(move |i| event(t0, i))
}
