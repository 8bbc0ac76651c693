//! A gateway call's usage: read from the upstream's answer or estimated, and handed to the ledger
//! writer with the reservations it settles.

use std::time::Instant;

use crate::core::event::{CallAdmission, Event, Stamped, Usage};
use crate::web::error::{ApiError, ErrorKind};

use super::admission::Reservation;
use super::{dialect, CallMeta, GatewayState};

/// The prompt's digest kept in the ledger: SHA-256 of the messages as JSON (serde_json writes an
/// object's keys in order, so equal prompts give equal text), 32 hex digits. The JSON is written
/// into the digest as it is produced: a 4 MB prompt is not copied to be hashed.
pub(super) fn prompt_digest<T: serde::Serialize + ?Sized>(source: Option<&T>) -> Option<String> {
    use std::io::Write;
    let source = source?;
    let mut hashing = std::io::BufWriter::with_capacity(
        8 * 1024,
        Hashing(ring::digest::Context::new(&ring::digest::SHA256)),
    );
    serde_json::to_writer(&mut hashing, source).ok()?;
    hashing.flush().ok()?;
    let digest = hashing.into_inner().ok()?.0.finish();
    Some(
        digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// A writer into a SHA-256 context.
struct Hashing(ring::digest::Context);

impl std::io::Write for Hashing {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The usage event of one answered attempt.
pub(super) fn usage_event(
    state: &GatewayState,
    meta: &CallMeta,
    used: dialect::TokenUsage,
    estimated: bool,
    started: Instant,
) -> Stamped {
    let (prompt, completion) = (used.input, used.output);
    if prompt + completion > 0 {
        state.count_unpriced(&meta.route);
    }
    let event = Event::Usage(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        cost_usd: meta
            .route
            .prices
            .map(|p| p.cost_with_cache(prompt, used.cache_read, used.cache_write, completion)),
        duration_seconds: Some(started.elapsed().as_secs_f64()),
        prompt_hash: meta.prompt_hash.clone(),
        estimated,
        call: meta.call_id.clone(),
        cache_read_tokens: used.cache_read,
        cache_write_tokens: used.cache_write,
        variant: meta.variant().map(|v| v.name.clone()),
        prompt_version: meta
            .variant()
            .and_then(|v| v.prompt.as_ref())
            .map(|p| p.version.clone()),
        ..Usage::attributed(meta.attribution())
    });
    Stamped {
        at: state.shared.clock.now_ms(),
        event,
    }
}

/// Stores usage events of a call with the reservations they settle, and returns once they are
/// stored: the caller releases the answer (or a stream's last event) only then, so a call a client
/// was answered is in the ledger with its real numbers whenever the process dies (`kill -9`
/// included). The writer gives the reservations back once the usage is applied (so admission
/// never sees the tokens neither reserved nor used). A ledger failure is logged and counted, and
/// the answer still goes to the client: the tokens were spent upstream, and a retry would spend
/// them twice.
pub(super) async fn store_usage(
    state: &GatewayState,
    persona: &str,
    events: Vec<Stamped>,
    mut settles: Vec<Reservation>,
) {
    settles.iter_mut().for_each(Reservation::settled);
    let n = events.len();
    let counter = state.clone();
    let persona = persona.to_string();
    state
        .shared
        .writer
        .append_accounting_stored(events, move |result| {
            if let Err(e) = result {
                counter.count_lost(n as u64);
                tracing::error!(persona = %persona, calls = n,
                    "usage of answered calls could not be stored: {e}");
            }
            drop(settles);
        })
        .await;
}

/// Stores the admission of the call's next upstream attempt before the upstream is called (see
/// `Event::CallAdmitted`): from here on a crash can over-count the call by its estimate, never
/// lose it. `Err` when the ledger cannot store it: then nothing may go upstream.
pub(super) async fn store_admission(
    state: &GatewayState,
    meta: &mut CallMeta,
    estimate: u64,
    cost: f64,
) -> Result<(), ApiError> {
    let call = crate::telemetry::trace::ids::TraceId::random().hex();
    let event = Event::CallAdmitted(CallAdmission {
        cost_usd: (cost > 0.0).then_some(cost),
        replica: state.shared.writer.origin.as_deref().map(str::to_string),
        ..CallAdmission::attributed(meta.attribution(), call.clone(), estimate)
    });
    let at = state.shared.clock.now_ms();
    match state
        .shared
        .writer
        .append(vec![Stamped { at, event }])
        .await
    {
        Ok(()) => {
            meta.call_id = Some(call);
            Ok(())
        }
        Err(e) if e.op == crate::store::writer::BUDGET_REFUSED => {
            tracing::info!(persona = %meta.persona, "call refused: budget exceeded across the replicas");
            Err(ApiError::new(
                ErrorKind::BudgetExceeded,
                "budget_exceeded",
                format!(
                    "persona `{}` has not enough budget left for this call (about {estimate} tokens{}): usage and calls in flight on every replica count",
                    meta.persona,
                    if cost > 0.0 { format!(", ${cost:.4}") } else { String::new() }
                ),
            ))
        }
        Err(e) if e.in_doubt.is_some() => {
            state.count_lost(1);
            tracing::error!(persona = %meta.persona, "a gateway call was refused: the ledger's connection dropped while its admission was committed: {e}");
            Err(ApiError::new(
                ErrorKind::Unavailable,
                crate::web::error::OUTCOME_UNKNOWN,
                "the connection to the ledger dropped while this call's admission was committed, so it was not sent upstream; if the admission was stored, hypertool voids it when the ledger is back. Retry it",
            ))
        }
        Err(e) => {
            state.count_lost(1);
            tracing::error!(persona = %meta.persona, "a gateway call was refused: the ledger cannot store its admission: {e}");
            Err(ApiError::new(
                ErrorKind::Unavailable,
                "ledger_unavailable",
                "the ledger cannot store this call's admission, so it was not sent upstream; retry it",
            ))
        }
    }
}

/// Voids the admission of a call that ended without usage (its upstream failed before
/// answering), and gives back its reservations once that is stored.
pub(super) async fn release_admission(
    state: &GatewayState,
    meta: &CallMeta,
    mut settles: Vec<Reservation>,
) {
    settles.iter_mut().for_each(Reservation::settled);
    let Some(call) = meta.call_id.clone() else {
        drop(settles);
        return;
    };
    let event = Stamped {
        at: state.shared.clock.now_ms(),
        event: Event::CallReleased { call },
    };
    state
        .shared
        .writer
        .append_accounting(vec![event], move |_| drop(settles))
        .await;
}

/// Stores the call's usage and then gives back its reservation (see [`store_usage`]).
pub(super) async fn record(
    state: &GatewayState,
    meta: &CallMeta,
    used: dialect::TokenUsage,
    estimated: bool,
    started: Instant,
    settles: Reservation,
) {
    let event = usage_event(state, meta, used, estimated, started);
    store_usage(state, &meta.persona, vec![event], vec![settles]).await;
}

#[cfg(test)]
mod tests {
    use super::prompt_digest;
    use crate::gateway::dialect::{CallRequest, Dialect};
    use serde_json::{json, Value};

    /// The digest as it was taken before it was streamed: of a copy of the fields, written out.
    fn copied_digest(value: &Value) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, value.to_string().as_bytes());
        digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn the_streamed_digest_is_the_digest_of_the_copied_prompt() {
        let messages = json!([{"role": "user", "content": "hé \u{1F600} \"quoted\"\n"}, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]);
        let chat = CallRequest::new(
            Dialect::Chat,
            json!({"model": "m", "messages": messages})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(
            prompt_digest(chat.digest_source().as_ref()),
            Some(copied_digest(&messages))
        );
        let body =
            json!({"model": "m", "system": "be brief", "messages": messages, "max_tokens": 5});
        let anthropic = CallRequest::new(Dialect::Messages, body.as_object().unwrap().clone());
        let fields = json!({"system": "be brief", "messages": messages});
        assert_eq!(
            prompt_digest(anthropic.digest_source().as_ref()),
            Some(copied_digest(&fields))
        );
        assert_eq!(prompt_digest::<Value>(None), None);
    }
}
