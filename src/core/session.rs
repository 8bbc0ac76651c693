//! Which persona each agent session is in, and for how long.
//!
//! A session's persona changes by an explicit `persona_switch` event or implicitly, when usage in
//! the session arrives under another persona. Each closed persona period (a switch, or the session
//! going idle past the timeout) yields its duration for `hypertool_persona_duration_seconds`.
//!
//! Expiry is decided from event times, not from when a timer happens to run: an event for a session
//! idle past the timeout first closes the old period. A live server and a ledger replay therefore
//! reach the same state whatever the tick timing.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionState {
    persona: Arc<str>,
    chatmode: Arc<str>,
    since: UnixMillis,
    last_activity: UnixMillis,
    /// The personas entered, oldest first, with when (the last few only: enough to see A→B→A→B).
    history: VecDeque<(Arc<str>, UnixMillis)>,
    /// When the session last changed persona (its first persona is not a switch).
    last_switch: Option<UnixMillis>,
}

/// How many persona entries a session remembers.
const HISTORY: usize = 8;

/// A session as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionView {
    pub persona: String,
    pub chatmode: String,
    pub since: UnixMillis,
    pub last_activity: UnixMillis,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_switch: Option<UnixMillis>,
    /// Personas entered, oldest first: (persona, at).
    pub history: Vec<(String, UnixMillis)>,
}

/// A finished stretch of time one session spent in one persona.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonaPeriod {
    pub persona: Arc<str>,
    pub chatmode: Arc<str>,
    pub seconds: f64,
}

/// A persona change observed in a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: Option<Arc<str>>,
    pub to: Arc<str>,
    pub chatmode: Arc<str>,
}

/// What one event did to its session.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SessionOutcome {
    pub closed: Vec<PersonaPeriod>,
    pub transition: Option<Transition>,
}

/// The open sessions, bounded in number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sessions {
    open: HashMap<Box<str>, SessionState>,
    idle_timeout_ms: i64,
    max_sessions: usize,
}

impl Sessions {
    pub fn new(idle_timeout_ms: i64, max_sessions: usize) -> Self {
        Self {
            open: HashMap::new(),
            idle_timeout_ms,
            max_sessions: max_sessions.max(1),
        }
    }

    pub fn configure(&mut self, idle_timeout_ms: i64, max_sessions: usize) {
        self.idle_timeout_ms = idle_timeout_ms;
        self.max_sessions = max_sessions.max(1);
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Usage under `persona` in `session` at `at`: a different persona than the current one is an
    /// implicit switch.
    pub fn on_usage(
        &mut self,
        session: &str,
        persona: &Arc<str>,
        chatmode: &Arc<str>,
        at: UnixMillis,
    ) -> SessionOutcome {
        let mut outcome = SessionOutcome::default();
        self.expire_one(session, at, &mut outcome.closed);
        match self.open.get_mut(session) {
            Some(state) if &state.persona == persona && &state.chatmode == chatmode => {
                state.last_activity = state.last_activity.max(at);
            }
            Some(state) if &state.persona == persona => {
                // Same persona, another chatmode: time so far belongs to the old chatmode.
                outcome.closed.push(close(state, at));
                reopen(state, persona, chatmode, at);
            }
            Some(state) => {
                outcome.closed.push(close(state, at));
                outcome.transition = Some(Transition {
                    from: Some(state.persona.clone()),
                    to: persona.clone(),
                    chatmode: chatmode.clone(),
                });
                reopen(state, persona, chatmode, at);
            }
            None => {
                self.insert(
                    session,
                    open_state(persona, chatmode, at),
                    &mut outcome.closed,
                );
            }
        }
        outcome
    }

    /// An explicit switch to `to`. The previous period (if any) closes whatever `from` says.
    pub fn on_switch(
        &mut self,
        session: &str,
        to: &Arc<str>,
        chatmode: &Arc<str>,
        at: UnixMillis,
    ) -> SessionOutcome {
        let mut outcome = SessionOutcome::default();
        self.expire_one(session, at, &mut outcome.closed);
        match self.open.get_mut(session) {
            Some(state) => {
                outcome.closed.push(close(state, at));
                reopen(state, to, chatmode, at);
            }
            None => self.insert(session, open_state(to, chatmode, at), &mut outcome.closed),
        }
        outcome
    }

    /// Activity of an open session that changes nothing else (a tool call through the MCP proxy):
    /// it keeps the session from going idle.
    pub fn touch(&mut self, session: &str, at: UnixMillis) {
        let idle = self.idle_timeout_ms;
        if let Some(state) = self.open.get_mut(session) {
            // An idle session is closed by the next tick; activity does not revive it.
            if at - state.last_activity <= idle {
                state.last_activity = state.last_activity.max(at);
            }
        }
    }

    /// The session, as the API shows it.
    pub fn view(&self, session: &str) -> Option<SessionView> {
        self.open.get(session).map(|s| SessionView {
            persona: s.persona.to_string(),
            chatmode: s.chatmode.to_string(),
            since: s.since,
            last_activity: s.last_activity,
            last_switch: s.last_switch,
            history: s
                .history
                .iter()
                .map(|(p, at)| (p.to_string(), *at))
                .collect(),
        })
    }

    /// The current persona and when the session last switched, if it is open and not idle at `now`.
    pub fn current(
        &self,
        session: &str,
        now: UnixMillis,
    ) -> Option<(Arc<str>, Option<UnixMillis>)> {
        self.open
            .get(session)
            .filter(|s| now - s.last_activity <= self.idle_timeout_ms)
            .map(|s| (s.persona.clone(), s.last_switch))
    }

    /// Whether the session's last persona changes alternate between two personas (A→B→A→B)
    /// within `window_ms`.
    pub fn oscillation(&self, session: &str, window_ms: i64) -> Option<(Arc<str>, Arc<str>)> {
        let s = self.open.get(session)?;
        let n = s.history.len();
        if n < 4 {
            return None;
        }
        let last: Vec<(&Arc<str>, UnixMillis)> =
            s.history.iter().skip(n - 4).map(|(p, t)| (p, *t)).collect();
        alternating(&last, window_ms)
    }

    /// Whether switching the session to `to` at `at` would complete an A→B→A→B within `window_ms`.
    pub fn would_oscillate(
        &self,
        session: &str,
        to: &Arc<str>,
        at: UnixMillis,
        window_ms: i64,
    ) -> Option<(Arc<str>, Arc<str>)> {
        let s = self.open.get(session)?;
        let n = s.history.len();
        if n < 3 {
            return None;
        }
        let mut last: Vec<(&Arc<str>, UnixMillis)> =
            s.history.iter().skip(n - 3).map(|(p, t)| (p, *t)).collect();
        last.push((to, at));
        alternating(&last, window_ms)
    }

    /// Closes every session idle past the timeout at `now`.
    pub fn expire(&mut self, now: UnixMillis) -> Vec<PersonaPeriod> {
        let timeout = self.idle_timeout_ms;
        let mut closed = Vec::new();
        self.open.retain(|_, s| {
            if now - s.last_activity > timeout {
                closed.push(close(s, s.last_activity));
                false
            } else {
                true
            }
        });
        closed
    }

    fn expire_one(&mut self, session: &str, at: UnixMillis, closed: &mut Vec<PersonaPeriod>) {
        if let Some(state) = self.open.get(session) {
            if at - state.last_activity > self.idle_timeout_ms {
                closed.push(close(state, state.last_activity));
                self.open.remove(session);
            }
        }
    }

    fn insert(&mut self, session: &str, state: SessionState, closed: &mut Vec<PersonaPeriod>) {
        if self.open.len() >= self.max_sessions {
            // Over the bound: close the least recently active session to make room.
            let oldest = self
                .open
                .iter()
                .min_by_key(|(_, s)| s.last_activity)
                .map(|(k, _)| k.clone());
            if let Some(key) = oldest {
                if let Some(s) = self.open.remove(&key) {
                    closed.push(close(&s, s.last_activity));
                }
            }
        }
        self.open.insert(Box::from(session), state);
    }
}

fn open_state(persona: &Arc<str>, chatmode: &Arc<str>, at: UnixMillis) -> SessionState {
    SessionState {
        persona: persona.clone(),
        chatmode: chatmode.clone(),
        since: at,
        last_activity: at,
        history: VecDeque::from([(persona.clone(), at)]),
        last_switch: None,
    }
}

/// A new persona period in a live session; a persona change is remembered in its history.
fn reopen(state: &mut SessionState, persona: &Arc<str>, chatmode: &Arc<str>, at: UnixMillis) {
    if &state.persona != persona {
        state.history.push_back((persona.clone(), at));
        while state.history.len() > HISTORY {
            state.history.pop_front();
        }
        state.last_switch = Some(at);
    }
    state.persona = persona.clone();
    state.chatmode = chatmode.clone();
    state.since = at;
    state.last_activity = state.last_activity.max(at);
}

/// Whether the last four personas entered are A, B, A, B (A ≠ B), the first of them within
/// `window_ms` of the last: the two personas when so.
fn alternating(
    entries: &[(&Arc<str>, UnixMillis)],
    window_ms: i64,
) -> Option<(Arc<str>, Arc<str>)> {
    let [(a1, t0), (b1, _), (a2, _), (b2, t3)] = entries else {
        return None;
    };
    (a1 == a2 && b1 == b2 && a1 != b1 && t3 - t0 <= window_ms)
        .then(|| ((*a1).clone(), (*b1).clone()))
}

fn close(state: &SessionState, end: UnixMillis) -> PersonaPeriod {
    PersonaPeriod {
        persona: state.persona.clone(),
        chatmode: state.chatmode.clone(),
        seconds: (end - state.since).max(0) as f64 / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Arc<str> {
        Arc::from(v)
    }

    #[test]
    fn usage_under_another_persona_is_a_switch_and_closes_a_period() {
        let mut sessions = Sessions::new(60_000, 10);
        let (be, te, cm) = (s("backend-engineer"), s("testing-specialist"), s("dev"));
        assert_eq!(
            sessions.on_usage("s1", &be, &cm, 0),
            SessionOutcome::default()
        );
        assert!(sessions.on_usage("s1", &be, &cm, 10_000).closed.is_empty());
        let out = sessions.on_usage("s1", &te, &cm, 30_000);
        assert_eq!(
            out.transition,
            Some(Transition {
                from: Some(be.clone()),
                to: te.clone(),
                chatmode: cm.clone()
            })
        );
        assert_eq!(out.closed[0].seconds, 30.0);
        assert_eq!(&*out.closed[0].persona, "backend-engineer");
    }

    #[test]
    fn an_idle_session_closes_at_its_last_activity_whenever_it_is_noticed() {
        let (be, cm) = (s("backend-engineer"), s("dev"));
        // Noticed by a timer.
        let mut a = Sessions::new(60_000, 10);
        a.on_usage("s1", &be, &cm, 0);
        a.on_usage("s1", &be, &cm, 20_000);
        assert!(a.expire(80_000).is_empty());
        let closed = a.expire(80_001);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].seconds, 20.0);
        // Noticed by the next event in that session: same period, and no switch.
        let mut b = Sessions::new(60_000, 10);
        b.on_usage("s1", &be, &cm, 0);
        b.on_usage("s1", &be, &cm, 20_000);
        let out = b.on_usage("s1", &s("testing-specialist"), &cm, 500_000);
        assert_eq!(out.closed.len(), 1);
        assert_eq!(out.closed[0].seconds, 20.0);
        assert_eq!(out.transition, None);
    }

    #[test]
    fn time_is_attributed_to_the_chatmode_it_was_spent_in() {
        let mut sessions = Sessions::new(60_000, 10);
        let (be, a, b) = (s("backend-engineer"), s("feature"), s("review"));
        sessions.on_usage("s1", &be, &a, 0);
        let out = sessions.on_usage("s1", &be, &b, 20_000);
        assert_eq!(
            out.transition, None,
            "a chatmode change is not a persona switch"
        );
        assert_eq!(out.closed.len(), 1);
        assert_eq!(
            (&*out.closed[0].chatmode, out.closed[0].seconds),
            ("feature", 20.0)
        );
        let closed = sessions.expire(20_000 + 60_001);
        assert_eq!((&*closed[0].chatmode, closed[0].seconds), ("review", 0.0));
    }

    #[test]
    fn alternating_personas_within_the_window_are_an_oscillation() {
        let mut sessions = Sessions::new(i64::MAX, 10);
        let (a, b, c, cm) = (s("a"), s("b"), s("c"), s("dev"));
        sessions.on_switch("s", &a, &cm, 0);
        sessions.on_switch("s", &b, &cm, 1_000);
        sessions.on_switch("s", &a, &cm, 2_000);
        assert_eq!(sessions.oscillation("s", 60_000), None);
        assert_eq!(
            sessions.would_oscillate("s", &b, 3_000, 60_000),
            Some((a.clone(), b.clone()))
        );
        assert_eq!(sessions.would_oscillate("s", &c, 3_000, 60_000), None);
        // Outside the window: the same pattern spread over too long is not flagged.
        assert_eq!(sessions.would_oscillate("s", &b, 60_001, 60_000), None);
        sessions.on_switch("s", &b, &cm, 3_000);
        assert_eq!(
            sessions.oscillation("s", 60_000),
            Some((a.clone(), b.clone()))
        );
        let view = sessions.view("s").unwrap();
        assert_eq!(view.history.len(), 4);
        assert_eq!(view.last_switch, Some(3_000));
        assert_eq!(sessions.current("s", 3_500).map(|c| c.1), Some(Some(3_000)));
    }

    #[test]
    fn the_number_of_sessions_is_bounded() {
        let mut sessions = Sessions::new(i64::MAX, 3);
        let (be, cm) = (s("backend-engineer"), s("dev"));
        for i in 0..10 {
            sessions.on_usage(&format!("s{i}"), &be, &cm, i);
        }
        assert_eq!(sessions.len(), 3);
    }
}
