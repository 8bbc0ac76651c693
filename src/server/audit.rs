//! The audit log: every change made through the admin API or the CLI is an `audit` event in the
//! ledger (so it survives restarts and reaches every replica), naming who made it by the key's
//! role and configured name — never the key — with the values before and after.
//! `GET /api/audit` (viewer and admin keys) lists them, newest first.

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::insight::{limit_of, period, read};
use super::AppState;
use crate::core::event::{AuditEntry, Event, Stamped};
use crate::store::reader::EventQuery;
use crate::web::error::ApiError;

/// The most entries one answer holds.
const MAX_LIMIT: usize = 1_000;

/// An audit event for `actor` doing `action` on `target`, stamped now.
pub fn entry(
    state: &AppState,
    actor: String,
    action: &str,
    target: &str,
    before: Option<Value>,
    after: Option<Value>,
) -> Stamped {
    Stamped {
        at: state.clock.now_ms(),
        event: Event::Audit(AuditEntry {
            actor,
            action: action.to_string(),
            target: target.to_string(),
            before,
            after,
        }),
    }
}

/// Stores an audit entry of a change already made (its own store, e.g. a budget override's
/// table): a failure to record it is logged, the change stands.
pub async fn record(state: &AppState, stamped: Stamped) {
    if let Err(e) = state.writer.append(vec![stamped.clone()]).await {
        if let Event::Audit(a) = &stamped.event {
            tracing::error!(actor = %a.actor, action = %a.action, target = %a.target,
                "a change could not be recorded in the audit log: {e}");
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    since: Option<String>,
    until: Option<String>,
    action: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/audit?since=24h&until=…&action=budget.set&limit=100`.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("{e}; the parameters are since, until, action, limit"),
        )
    })?;
    let now = state.clock.now_ms();
    let (since, until) = period(q.since.as_deref(), q.until.as_deref(), now, 7 * 86_400_000)?;
    let limit = limit_of(q.limit, 200, MAX_LIMIT)?;
    let found = read(
        &state,
        EventQuery {
            from_ms: since,
            to_ms: until,
            kinds: vec!["audit"],
            limit: super::insight::MAX_EVENTS,
        },
    )
    .await?;
    let mut entries: Vec<Value> = found
        .events
        .iter()
        .rev()
        .filter_map(|s| match &s.event {
            Event::Audit(a) if q.action.as_ref().is_none_or(|x| x == &a.action) => {
                let mut v = json!(a);
                v["at"] = json!(crate::core::clock::to_rfc3339(s.at));
                Some(v)
            }
            _ => None,
        })
        .collect();
    let truncated = found.truncated || entries.len() > limit;
    entries.truncate(limit);
    Ok(Json(json!({"entries": entries, "truncated": truncated})))
}
