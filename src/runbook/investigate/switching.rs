//! ExcessivePersonaSwitching: the transition matrix, oscillating sessions, suppressed switches
//! and switches per stage start.

// The investigations' shared vocabulary (evidence, findings, helpers) and their imports.
use super::*;

pub(super) const SWITCH_CAUSES: &[CauseSpec] = &[
    CauseSpec {
        name: "Infinite loop",
        prior: "high",
        indicator: "sessions oscillating A→B→A→B; the matrix dominated by one pair",
        fix: "send switches through POST /v1/personas/switch (cooldown); [switching] oscillation_action = \"suppress\"",
    },
    CauseSpec {
        name: "Over-eager routing",
        prior: "high",
        indicator: "about one switch per call; many different transitions",
        fix: "POST /v1/personas/route keeps a capable current persona; batch work by persona",
    },
    CauseSpec {
        name: "Missing state",
        prior: "medium",
        indicator: "switches inferred from calls, none through /v1/personas/switch (no cooldown applies)",
        fix: "switch through POST /v1/personas/switch and read GET /api/sessions/{id} instead of keeping state in the agent",
    },
    CauseSpec {
        name: "Bug in chatmode",
        prior: "medium",
        indicator: "one chatmode holds most switches",
        fix: "fix that chatmode's switching logic; give it a longer switch_cooldown_seconds in chatmodes.yml",
    },
    CauseSpec {
        name: "Intentional design",
        prior: "low",
        indicator: "switches follow workflow stages (one per stage)",
        fix: "nothing to fix: raise [alerts.ExcessivePersonaSwitching] threshold for this workload",
    },
];

/// The switches of the window: explicit ones are events; inferred ones are a session's calls
/// changing persona.
#[derive(Default)]
struct Switches {
    /// (from, to) → switches.
    matrix: BTreeMap<(String, String), u64>,
    by_chatmode: BTreeMap<String, u64>,
    explicit: u64,
    inferred: u64,
    calls: u64,
    suppressed: u64,
    stage_starts: u64,
}

impl Switches {
    fn of(ev: &Evidence, from: UnixMillis) -> Switches {
        let mut sw = Switches::default();
        let mut last_persona: HashMap<&str, &str> = HashMap::new();
        for s in &ev.events {
            let counted = s.at >= from;
            match &s.event {
                Event::PersonaSwitch(p) => {
                    if let Some(f) = p.from.as_deref() {
                        if counted && f != p.to {
                            sw.explicit += 1;
                            *sw.matrix.entry((f.to_string(), p.to.clone())).or_default() += 1;
                            *sw.by_chatmode.entry(p.chatmode.clone()).or_default() += 1;
                        }
                    }
                    last_persona.insert(p.session.as_str(), p.to.as_str());
                }
                Event::Usage(u) => {
                    if counted {
                        sw.calls += 1;
                    }
                    if let Some(session) = u.session.as_deref() {
                        if let Some(prev) = last_persona.insert(session, u.persona.as_str()) {
                            if prev != u.persona && counted {
                                sw.inferred += 1;
                                *sw.matrix
                                    .entry((prev.to_string(), u.persona.clone()))
                                    .or_default() += 1;
                                *sw.by_chatmode.entry(u.chatmode.clone()).or_default() += 1;
                            }
                        }
                    }
                }
                Event::SwitchSuppressed { .. } if counted => sw.suppressed += 1,
                Event::StageStarted { .. } if counted => sw.stage_starts += 1,
                _ => {}
            }
        }
        sw
    }

    fn total(&self) -> u64 {
        self.explicit + self.inferred
    }
}

/// ExcessivePersonaSwitching: the transition matrix, the oscillating sessions and the switches per
/// call, then each of the runbook's causes.
pub(super) fn switching(ev: &Evidence) -> (Vec<Finding>, Scored) {
    let from = ev.now - ev.window_ms;
    let sw = Switches::of(ev, from);
    let (oscillations, sessions) = oscillating_sessions(ev, from);
    let per_call = if sw.calls > 0 {
        sw.total() as f64 / sw.calls as f64
    } else {
        0.0
    };
    let out = vec![
        transition_matrix(ev, &sw),
        oscillations,
        per_call_finding(&sw, per_call),
    ];
    (out, causes(&sw, sessions, per_call))
}

/// From → to, with the switches' rate against the alert's threshold.
fn transition_matrix(ev: &Evidence, sw: &Switches) -> Finding {
    let (explicit, inferred, matrix) = (sw.explicit, sw.inferred, &sw.matrix);
    let switches = sw.total();
    let secs = ev.window_ms as f64 / 1000.0;
    let mut cells: Vec<_> = matrix.iter().collect();
    cells.sort_by(|a, b| b.1.cmp(a.1));
    finding(
        "transition matrix",
        if switches as f64 / secs > ev.switch_threshold { Status::Fail } else { Status::Info },
        format!(
            "{switches} switches in the window ({:.2}/s; {explicit} explicit, {inferred} inferred from calls){}",
            switches as f64 / secs,
            if cells.is_empty() { String::new() } else { format!(": {}", cells.iter().take(6).map(|((f, t), n)| format!("{f}→{t} {n}")).collect::<Vec<_>>().join(", ")) }
        ),
        json!(cells.iter().map(|((f, t), n)| json!({"from": f, "to": t, "switches": n})).collect::<Vec<_>>()),
    )
}

/// The sessions that oscillated in the window (A→B→A→B), per session its chatmode and pair;
/// and how many there are.
fn oscillating_sessions(ev: &Evidence, from: UnixMillis) -> (Finding, usize) {
    let oscillating: Vec<_> = ev.oscillations.iter().filter(|o| o.0 >= from).collect();
    let sessions: BTreeSet<&str> = oscillating.iter().map(|o| o.1.as_str()).collect();
    // Per session: its chatmode, the pair, how many oscillations.
    let mut per_session: BTreeMap<&str, (&str, [&str; 2], u64)> = BTreeMap::new();
    for o in &oscillating {
        let mut pair = [o.3[0].as_str(), o.3[1].as_str()];
        pair.sort_unstable();
        per_session
            .entry(o.1.as_str())
            .or_insert((o.2.as_str(), pair, 0))
            .2 += 1;
    }
    let found = finding(
        "oscillating sessions",
        if sessions.is_empty() {
            Status::Ok
        } else {
            Status::Warn
        },
        if sessions.is_empty() {
            "none in the window".to_string()
        } else {
            format!(
                "{} session(s): {}",
                sessions.len(),
                per_session
                    .iter()
                    .take(5)
                    .map(|(s, (c, p, n))| format!("{s} ({}↔{}, {c}, {n} times)", p[0], p[1]))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
        json!(oscillating
            .iter()
            .map(
                |o| json!({"at": to_rfc3339(o.0), "session": o.1, "chatmode": o.2, "personas": o.3})
            )
            .collect::<Vec<_>>()),
    );
    (found, sessions.len())
}

fn per_call_finding(sw: &Switches, per_call: f64) -> Finding {
    let (switches, calls, suppressed) = (sw.total(), sw.calls, sw.suppressed);
    finding(
        "switches per call",
        if per_call >= 0.5 { Status::Warn } else { Status::Info },
        format!("{per_call:.2} ({switches} switches, {calls} calls); {suppressed} refused by the switch policy"),
        json!({"switches": switches, "calls": calls, "suppressed": suppressed}),
    )
}

/// The runbook's causes, scored from the switches.
fn causes(sw: &Switches, sessions: usize, per_call: f64) -> Scored {
    let (explicit, inferred, matrix, by_chatmode, stage_starts) = (
        sw.explicit,
        sw.inferred,
        &sw.matrix,
        &sw.by_chatmode,
        sw.stage_starts,
    );
    let switches = sw.total();
    let mut scored: Scored = Vec::new();
    let pair_share = {
        let mut pairs: BTreeMap<(String, String), u64> = BTreeMap::new();
        for ((f, t), n) in matrix {
            let key = if f < t {
                (f.clone(), t.clone())
            } else {
                (t.clone(), f.clone())
            };
            *pairs.entry(key).or_default() += n;
        }
        pairs
            .values()
            .max()
            .map_or(0.0, |m| *m as f64 / switches.max(1) as f64)
    };
    scored.push((
        "Infinite loop",
        if sessions == 0 {
            pair_share * 0.5
        } else {
            0.5 + pair_share * 0.5
        },
        format!(
            "{} oscillating session(s); the busiest pair holds {} of the switches",
            sessions,
            pct(pair_share)
        ),
    ));
    scored.push((
        "Over-eager routing",
        (per_call * 1.2).min(1.0) * if matrix.len() >= 4 { 1.0 } else { 0.7 },
        format!(
            "{per_call:.2} switches per call across {} transitions",
            matrix.len()
        ),
    ));
    let inferred_share = if switches > 0 {
        inferred as f64 / switches as f64
    } else {
        0.0
    };
    scored.push((
        "Missing state",
        inferred_share * if explicit == 0 { 1.0 } else { 0.6 },
        format!(
            "{} of the switches inferred from calls (no cooldown applies to them)",
            pct(inferred_share)
        ),
    ));
    let (top_chatmode, top_n) = by_chatmode
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or(("-".to_string(), 0), |(c, n)| (c.clone(), *n));
    let chatmode_share = top_n as f64 / switches.max(1) as f64;
    scored.push((
        "Bug in chatmode",
        if by_chatmode.len() >= 2 {
            (chatmode_share - 0.5).max(0.0) * 2.0
        } else {
            0.3 * chatmode_share
        },
        format!(
            "chatmode {top_chatmode} holds {} of the switches ({} chatmodes switch)",
            pct(chatmode_share),
            by_chatmode.len()
        ),
    ));
    let per_stage = if stage_starts > 0 {
        switches as f64 / stage_starts as f64
    } else {
        f64::INFINITY
    };
    scored.push((
        "Intentional design",
        if per_stage <= 1.5 { 0.8 } else { 0.0 },
        format!("{switches} switches for {stage_starts} stage starts"),
    ));
    scored
}
