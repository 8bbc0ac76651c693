//! `POST /v1/events`: typed facts from agents that call their LLM themselves.
//!
//! Each event is checked field by field so that a rejection names the field and the reason;
//! valid events of a batch are stored even when others are rejected, and are acknowledged only
//! once they are in the ledger.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};

use super::AppState;
use crate::core::clock::UnixMillis;
use crate::core::event::{
    Event, GateResult, McpToolCall, PersonaSwitch, StageResult, Stamped, ToolCallResult, Usage,
};
use crate::core::labels::{check_name, NameField};
use crate::web::auth::Caller;
use crate::web::error::ApiError;

/// How far in the future a client's timestamp may be (clock skew).
const MAX_FUTURE_SKEW_MS: i64 = 5 * 60 * 1000;
/// The largest cost one event may report (USD): far above any real call, and small enough that
/// no number of events can sum to infinity.
pub const MAX_COST_PER_EVENT_USD: f64 = 1e6;
/// The longest duration one event may report (seconds): about 115 days.
pub const MAX_DURATION_SECONDS: f64 = 1e7;

/// The most events one request may carry: a larger batch is refused whole (413), before any event
/// of it is looked at, so what a request costs is bounded whatever it holds.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;
/// The most rejections an answer lists (the rest are counted in `rejected_count`).
pub const MAX_REJECTIONS_LISTED: usize = 100;
/// The longest `reason` of a rejection (it may quote what was sent).
const MAX_REJECTION_REASON: usize = 300;
/// How old an event's timestamp may be by default: the longest budget period (a month) is kept in
/// hourly buckets of 32 days, so an older event could count in the usage counters but never in the
/// budget that TokenBudgetExceeded watches.
pub const MAX_EVENT_AGE_DAYS: u32 = 31;

/// What one event may claim (`server.max_tokens_per_event`) and how old it may be (31 days, or
/// `ledger.retain_days` when shorter: an event the ledger would delete at once is not taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    pub max_tokens: u64,
    pub max_age_days: u32,
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            max_tokens: 1_000_000_000,
            max_age_days: MAX_EVENT_AGE_DAYS,
        }
    }
}

/// Why one event of a batch was refused.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRejection {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
    /// Short category, also the `reason` label of `hypertool_events_rejected_total`.
    #[serde(skip)]
    pub category: &'static str,
}

#[derive(Debug, Serialize)]
struct EventsResponse {
    accepted: usize,
    /// The first [`MAX_REJECTIONS_LISTED`] rejections, in the batch's order.
    rejected: Vec<EventRejection>,
    /// Every rejection, listed or not.
    rejected_count: usize,
}

/// What is wrong with a batch as a whole.
enum BatchProblem {
    TooMany,
    UnknownField(String),
}

/// The `events` array, each event left unparsed (borrowed from the body) and at most
/// [`MAX_EVENTS_PER_REQUEST`] of them: reading stops at the first event past the bound.
struct BoundedEvents<'p>(&'p std::cell::Cell<Option<BatchProblem>>);

impl<'de> serde::de::DeserializeSeed<'de> for BoundedEvents<'_> {
    type Value = Vec<&'de serde_json::value::RawValue>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BoundedEvents<'_> {
    type Value = Vec<&'de serde_json::value::RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut events = Vec::new();
        while let Some(e) = seq.next_element()? {
            if events.len() == MAX_EVENTS_PER_REQUEST {
                self.0.set(Some(BatchProblem::TooMany));
                return Err(serde::de::Error::custom("too many events"));
            }
            events.push(e);
        }
        Ok(events)
    }
}

/// The body `{"events": [...]}`.
struct Batch<'p>(&'p std::cell::Cell<Option<BatchProblem>>);

impl<'de> serde::de::DeserializeSeed<'de> for Batch<'_> {
    type Value = Option<Vec<&'de serde_json::value::RawValue>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Batch<'_> {
    type Value = Option<Vec<&'de serde_json::value::RawValue>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object {\"events\": [...]}")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut events = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key != "events" {
                let name = crate::web::error::bounded(&key, 100).into_owned();
                self.0.set(Some(BatchProblem::UnknownField(name)));
                return Err(serde::de::Error::custom("unknown field"));
            }
            events = Some(map.next_value_seed(BoundedEvents(self.0))?);
        }
        Ok(events)
    }
}

fn missing_events() -> ApiError {
    ApiError::bad_request(
        "missing_events",
        "request body must be a JSON object with an \"events\" array: {\"events\": [...]}",
    )
    .param("events")
}

/// The events of a body, unparsed, or the answer that refuses the whole batch.
fn batch_of<'b>(
    state: &AppState,
    body: &'b [u8],
) -> Result<Vec<&'b serde_json::value::RawValue>, ApiError> {
    let problem = std::cell::Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde::de::DeserializeSeed::deserialize(Batch(&problem), &mut de)
        .and_then(|events| de.end().map(|()| events));
    match (parsed, problem.take()) {
        (Ok(Some(events)), _) => Ok(events),
        (Ok(None), _) => {
            state.stats.reject("malformed_json", 1);
            Err(missing_events())
        }
        (Err(_), Some(BatchProblem::TooMany)) => {
            state.stats.reject("too_many_events", 1);
            Err(ApiError::new(
                crate::web::error::ErrorKind::PayloadTooLarge,
                "too_many_events",
                format!(
                    "a request carries at most {MAX_EVENTS_PER_REQUEST} events; send the rest in further requests"
                ),
            )
            .param("events"))
        }
        (Err(_), Some(BatchProblem::UnknownField(extra))) => Err(ApiError::bad_request(
            "unknown_field",
            format!("unknown top-level field `{extra}`; the body is {{\"events\": [...]}}"),
        )
        .param(extra)),
        (Err(e), None) if e.is_data() => {
            state.stats.reject("malformed_json", 1);
            Err(missing_events())
        }
        (Err(e), None) => {
            state.stats.reject("malformed_json", 1);
            Err(ApiError::bad_request(
                "malformed_json",
                format!("request body is not valid JSON: {e}"),
            ))
        }
    }
}

pub async fn post_events(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            state.stats.reject("body_too_large", 1);
        }
        ApiError::from_body_rejection(r, state.max_body_bytes)
    })?;
    let events = batch_of(&state, &body)?;

    let now = state.clock.now_ms();
    let mut accepted = Vec::with_capacity(events.len());
    let mut rejected = Vec::new();
    let mut rejected_count = 0;
    for (index, raw) in events.iter().enumerate() {
        // One event's tree at a time: the batch is never held as one.
        let parsed = serde_json::from_str::<Value>(raw.get())
            .map_err(|e| reject(None, "malformed_json", format!("not valid JSON: {e}")));
        match parsed
            .and_then(|raw| parse_event(&raw, now, &state.event_limits))
            .and_then(|e| own_persona(&state, &caller, e))
        {
            Ok(stamped) => accepted.push(stamped),
            Err(mut r) => {
                r.index = index;
                state.stats.reject(r.category, 1);
                rejected_count += 1;
                if rejected.len() < MAX_REJECTIONS_LISTED {
                    r.reason =
                        crate::web::error::bounded(&r.reason, MAX_REJECTION_REASON).into_owned();
                    rejected.push(r);
                }
            }
        }
    }
    let n = accepted.len();
    if n > 0 {
        let verdicts = gate_verdicts(&state, &accepted);
        state.writer.append(accepted).await?;
        for (at, g) in verdicts {
            state.tracer.gate_verdict(at, &g, None);
        }
    }
    let status = if n == 0 && rejected_count > 0 {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(EventsResponse {
            accepted: n,
            rejected,
            rejected_count,
        }),
    )
        .into_response())
}

/// A persona key may report facts about its own persona only (the door's one ownership rule):
/// the persona of a usage or tool-call event, the persona switched *to* by a switch (the agent
/// that becomes that persona reports it), and for a stage event the persona its workflow gives the
/// stage — never the one the event names (a configured stage is run by its configured persona).
fn own_persona(state: &AppState, caller: &Caller, e: Stamped) -> Result<Stamped, EventRejection> {
    if caller.persona_key().is_none() {
        return Ok(e);
    }
    let (field, owner, what): (&str, String, &str) = match &e.event {
        Event::Usage(u) => ("persona", u.persona.clone(), "a usage event"),
        Event::Stage(s) => {
            let configured = state
                .gateway
                .workflows()
                .get(&s.workflow)
                .and_then(|w| w.stage(&s.stage).and_then(|st| st.persona.clone()));
            (
                "persona",
                configured.unwrap_or_else(|| s.persona.clone()),
                "a stage event",
            )
        }
        Event::PersonaSwitch(s) => ("to", s.to.clone(), "a switch"),
        Event::McpToolCall(c) => ("persona", c.persona.clone(), "a tool call"),
        // Other kinds do not come through this API.
        _ => return Ok(e),
    };
    match state.door.require_own(caller, field, what, Some(&owner)) {
        Ok(()) => Ok(e),
        Err(refusal) => Err(reject(Some(field), "other_persona", refusal.message)),
    }
}

fn reject(
    field: Option<&str>,
    category: &'static str,
    reason: impl Into<String>,
) -> EventRejection {
    EventRejection {
        index: 0,
        field: field.map(str::to_string),
        reason: reason.into(),
        category,
    }
}

/// Field-by-field reader over one event object.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn label(&self, key: &str, field: NameField) -> Result<String, EventRejection> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Err(reject(
                Some(key),
                "missing_field",
                format!("`{key}` is required"),
            )),
            Some(v) => check_label(key, v, field),
        }
    }

    fn opt_label(&self, key: &str, field: NameField) -> Result<Option<String>, EventRejection> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => check_label(key, v, field).map(Some),
        }
    }

    fn tokens(&self, key: &str, limits: &EventLimits) -> Result<u64, EventRejection> {
        let n = self.any_tokens(key)?;
        if n > limits.max_tokens {
            return Err(reject(
                Some(key),
                "too_many_tokens",
                format!(
                    "`{key}` = {n} is above the {} tokens one event may report (server.max_tokens_per_event)",
                    limits.max_tokens
                ),
            ));
        }
        Ok(n)
    }

    fn any_tokens(&self, key: &str) -> Result<u64, EventRejection> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Err(reject(
                Some(key),
                "missing_field",
                format!("`{key}` is required"),
            )),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(n),
                None if v.as_i64().is_some_and(|n| n < 0)
                    || v.as_f64().is_some_and(|f| f < 0.0) =>
                {
                    Err(reject(
                        Some(key),
                        "negative_tokens",
                        format!("`{key}` must not be negative, got {v}"),
                    ))
                }
                None => Err(reject(
                    Some(key),
                    "invalid_field",
                    format!("`{key}` must be a non-negative integer, got {v}"),
                )),
            },
        }
    }

    /// A number from 0 to `max` (a cost or a duration: bounded so that sums stay finite).
    fn bounded(&self, key: &str, required: bool, max: f64) -> Result<Option<f64>, EventRejection> {
        match self.obj.get(key) {
            None | Some(Value::Null) if required => Err(reject(
                Some(key),
                "missing_field",
                format!("`{key}` is required"),
            )),
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(f) if f.is_finite() && (0.0..=max).contains(&f) => Ok(Some(f)),
                Some(f) if f.is_finite() && f > max => Err(reject(
                    Some(key),
                    "out_of_range",
                    format!("`{key}` = {f} is above the largest accepted value, {max}"),
                )),
                _ => Err(reject(
                    Some(key),
                    "invalid_field",
                    format!("`{key}` must be a non-negative number, got {v}"),
                )),
            },
        }
    }

    fn timestamp(&self, now: UnixMillis, max_age_days: u32) -> Result<UnixMillis, EventRejection> {
        let at = match self.obj.get("timestamp") {
            None | Some(Value::Null) => return Ok(now),
            Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .map_err(|e| {
                    reject(
                        Some("timestamp"),
                        "invalid_field",
                        format!("`timestamp` {s:?} is not RFC 3339 ({e}); e.g. \"2026-11-28T09:00:00Z\""),
                    )
                })?,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(secs) if (0.0..1e11).contains(&secs) => (secs * 1000.0) as i64,
                _ => {
                    return Err(reject(
                        Some("timestamp"),
                        "invalid_field",
                        format!("`timestamp` {n} is not Unix seconds"),
                    ))
                }
            },
            Some(v) => {
                return Err(reject(
                    Some("timestamp"),
                    "invalid_field",
                    format!("`timestamp` must be an RFC 3339 string or Unix seconds, got {v}"),
                ))
            }
        };
        if at > now + MAX_FUTURE_SKEW_MS {
            return Err(reject(
                Some("timestamp"),
                "future_timestamp",
                "`timestamp` is more than 5 minutes in the future; check the client's clock",
            ));
        }
        if at < now - i64::from(max_age_days) * 86_400_000 {
            return Err(reject(
                Some("timestamp"),
                "old_timestamp",
                format!(
                    "`timestamp` is more than {max_age_days} days in the past: no budget period reaches back that far (31 days at most, less with ledger.retain_days); check the client's clock"
                ),
            ));
        }
        Ok(at)
    }

    fn only(&self, allowed: &[&str]) -> Result<(), EventRejection> {
        match self.obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(reject(
                Some(k),
                "unknown_field",
                format!("unknown field `{k}`; allowed: {}", allowed.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// `true` or `false`; absent means false.
    fn flag(&self, key: &str) -> Result<bool, EventRejection> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(reject(
                Some(key),
                "invalid_field",
                format!("`{key}` must be true or false, got {v}"),
            )),
        }
    }

    /// A free text (bounded, no control characters), or nothing.
    fn opt_text(&self, key: &str) -> Result<Option<String>, EventRejection> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => crate::core::labels::check_text(s)
                .map(|()| Some(s.clone()))
                .map_err(|e| reject(Some(key), "invalid_field", format!("`{key}` {}", e.reason))),
            Some(_) => Err(reject(
                Some(key),
                "invalid_field",
                format!("`{key}` must be a string"),
            )),
        }
    }

    /// A required value that is one of a few words.
    fn one_of<T: Copy>(&self, key: &str, words: &[(&str, T)]) -> Result<T, EventRejection> {
        let found = self.obj.get(key).filter(|v| !v.is_null());
        if let Some(value) = found
            .and_then(Value::as_str)
            .and_then(|s| words.iter().find(|(w, _)| *w == s))
            .map(|(_, value)| *value)
        {
            return Ok(value);
        }
        // Only a refusal spells the choices out ("a", "b" or "c").
        let quoted: Vec<String> = words.iter().map(|(w, _)| format!("{w:?}")).collect();
        let choices = match quoted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        Err(match found {
            None => reject(
                Some(key),
                "missing_field",
                format!("`{key}` is required: {choices}"),
            ),
            Some(v) => reject(
                Some(key),
                "invalid_field",
                format!("`{key}` must be {choices}, got {v}"),
            ),
        })
    }

    /// The event's `type`.
    fn kind(&self) -> Result<&'a str, EventRejection> {
        match self.obj.get("type") {
            Some(Value::String(t)) => Ok(t.as_str()),
            Some(_) => Err(reject(
                Some("type"),
                "invalid_field",
                "`type` must be a string",
            )),
            None => Err(reject(
                Some("type"),
                "missing_field",
                "`type` is required: usage, persona_switch, stage or mcp_tool_call",
            )),
        }
    }
}

fn check_label(key: &str, v: &Value, field: NameField) -> Result<String, EventRejection> {
    let Some(s) = v.as_str() else {
        return Err(reject(
            Some(key),
            "invalid_field",
            format!("`{key}` must be a string"),
        ));
    };
    check_name(field, s)
        .map(str::to_string)
        .map_err(|e| reject(Some(key), "invalid_field", format!("`{key}` {}", e.reason)))
}

/// Checks one event of a batch. `index` of a rejection is filled in by the caller.
pub fn parse_event(
    raw: &Value,
    now: UnixMillis,
    limits: &EventLimits,
) -> Result<Stamped, EventRejection> {
    let Some(obj) = raw.as_object() else {
        return Err(reject(
            None,
            "invalid_event",
            "each event must be a JSON object",
        ));
    };
    let f = Fields { obj };
    let event = match f.kind()? {
        "usage" => usage(&f, limits)?,
        "persona_switch" => persona_switch(&f)?,
        "stage" => stage(&f)?,
        "mcp_tool_call" => mcp_tool_call(&f)?,
        other => {
            return Err(reject(
                Some("type"),
                "unknown_type",
                format!(
                "unknown event type {other:?}; use usage, persona_switch, stage or mcp_tool_call"
            ),
            ))
        }
    };
    let at = f.timestamp(now, limits.max_age_days)?;
    Ok(Stamped { at, event })
}

fn usage(f: &Fields, limits: &EventLimits) -> Result<Event, EventRejection> {
    f.only(&[
        "type",
        "persona",
        "chatmode",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "workflow",
        "stage",
        "session",
        "cost_usd",
        "duration_seconds",
        "prompt_hash",
        "estimated",
        "timestamp",
    ])?;
    let estimated = f.flag("estimated")?;
    Ok(Event::Usage(Usage {
        run: None,
        persona: f.label("persona", NameField::Persona)?,
        chatmode: f.label("chatmode", NameField::Chatmode)?,
        model: f.label("model", NameField::Model)?,
        prompt_tokens: f.tokens("prompt_tokens", limits)?,
        completion_tokens: f.tokens("completion_tokens", limits)?,
        workflow: f.opt_label("workflow", NameField::Workflow)?,
        stage: f.opt_label("stage", NameField::Stage)?,
        session: f.opt_label("session", NameField::Session)?,
        cost_usd: f.bounded("cost_usd", false, MAX_COST_PER_EVENT_USD)?,
        duration_seconds: f.bounded("duration_seconds", false, MAX_DURATION_SECONDS)?,
        // Any digest the client keeps (1–256 bytes, no control characters).
        prompt_hash: f.opt_label("prompt_hash", NameField::Session)?,
        estimated,
        // Only the gateway settles its own calls.
        call: None,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        variant: None,
        prompt_version: None,
    }))
}

fn persona_switch(f: &Fields) -> Result<Event, EventRejection> {
    f.only(&["type", "session", "from", "to", "chatmode", "timestamp"])?;
    Ok(Event::PersonaSwitch(PersonaSwitch {
        session: f.label("session", NameField::Session)?,
        from: f.opt_label("from", NameField::Persona)?,
        to: f.label("to", NameField::Persona)?,
        chatmode: f.label("chatmode", NameField::Chatmode)?,
    }))
}

fn stage(f: &Fields) -> Result<Event, EventRejection> {
    f.only(&[
        "type",
        "workflow",
        "stage",
        "persona",
        "model",
        "duration_seconds",
        "gate",
        "reason",
        "timestamp",
    ])?;
    let gate = f.one_of(
        "gate",
        &[("pass", GateResult::Pass), ("fail", GateResult::Fail)],
    )?;
    let reason = f.opt_text("reason")?;
    Ok(Event::Stage(StageResult {
        workflow: f.label("workflow", NameField::Workflow)?,
        stage: f.label("stage", NameField::Stage)?,
        persona: f.label("persona", NameField::Persona)?,
        model: f.label("model", NameField::Model)?,
        duration_seconds: f
            .bounded("duration_seconds", true, MAX_DURATION_SECONDS)?
            .unwrap_or(0.0),
        gate,
        reason,
    }))
}

fn mcp_tool_call(f: &Fields) -> Result<Event, EventRejection> {
    f.only(&[
        "type",
        "session",
        "persona",
        "server",
        "tool",
        "result",
        "duration_seconds",
        "timestamp",
    ])?;
    let result = f.one_of(
        "result",
        &[
            ("ok", ToolCallResult::Ok),
            ("error", ToolCallResult::Error),
            ("refused", ToolCallResult::Refused),
        ],
    )?;
    Ok(Event::McpToolCall(McpToolCall {
        session: f.opt_label("session", NameField::Session)?,
        persona: f.label("persona", NameField::Persona)?,
        server: f.label("server", NameField::Server)?,
        tool: f.label("tool", NameField::Tool)?,
        result,
        duration_seconds: f
            .bounded("duration_seconds", true, MAX_DURATION_SECONDS)?
            .unwrap_or(0.0),
    }))
}

/// The quality-gate verdicts among `events`, when they are traced (each a span and a score once
/// stored; the gateway traces its own verdicts under the generation they judged).
pub fn gate_verdicts(
    state: &AppState,
    events: &[Stamped],
) -> Vec<(i64, crate::core::event::GateVerdictEvent)> {
    if !state.tracer.exports() {
        return Vec::new();
    }
    events
        .iter()
        .filter_map(|s| match &s.event {
            Event::QualityGate(g) => Some((s.at, g.clone())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests;
