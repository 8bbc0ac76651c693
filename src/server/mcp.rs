//! `/mcp`: the MCP proxy over streamable HTTP — `POST` carries the client's messages, `GET` opens
//! the session's event stream (`notifications/tools/list_changed`), `DELETE` ends the session.
//! Behind the door like every route: persona keys (their persona only) and admin keys; the
//! session itself is `crate::mcp::proxy::McpSession`.
//!
//! A session belongs to the persona whose key opened it (an admin key's session to no persona):
//! every request that names a session (`Mcp-Session-Id`) — a message, its event stream, its end —
//! passes the door's ownership rule before the MCP SDK sees it, so knowing another session's id
//! gives a key nothing.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::web::auth::Caller;

const SESSION_HEADER: &str = "mcp-session-id";

/// The persona of each open session, by session id. Bounded: sessions end on `DELETE` or after 5
/// minutes idle (the SDK's), and past [`MAX_OWNERS`] the longest unseen entry goes (a session that
/// idle has expired in the SDK, which then answers its id 404 whoever asks).
#[derive(Default)]
pub struct SessionOwners {
    inner: Mutex<Owners>,
}

#[derive(Default)]
struct Owners {
    by_session: HashMap<String, Owner>,
    /// Counts uses: an entry's `seen` orders it by recency.
    uses: u64,
}

struct Owner {
    persona: Option<String>,
    seen: u64,
}

/// Four times the sessions one proxy keeps open at once.
const MAX_OWNERS: usize = 4 * crate::mcp::proxy::MAX_SESSIONS;

impl SessionOwners {
    fn owners(&self) -> std::sync::MutexGuard<'_, Owners> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(owner)` for a session this endpoint opened (`owner` `None`: an admin key's).
    fn owner_of(&self, session: &str) -> Option<Option<String>> {
        let mut owners = self.owners();
        owners.uses += 1;
        let seen = owners.uses;
        owners.by_session.get_mut(session).map(|o| {
            o.seen = seen;
            o.persona.clone()
        })
    }

    fn opened(&self, session: &str, persona: Option<String>) {
        let mut owners = self.owners();
        if owners.by_session.len() >= MAX_OWNERS {
            let oldest = owners
                .by_session
                .iter()
                .min_by_key(|(_, o)| o.seen)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                owners.by_session.remove(&oldest);
            }
        }
        owners.uses += 1;
        let seen = owners.uses;
        owners
            .by_session
            .insert(session.to_string(), Owner { persona, seen });
    }

    fn ended(&self, session: &str) {
        self.owners().by_session.remove(session);
    }
}

pub async fn endpoint(State(state): State<AppState>, caller: Caller, req: Request) -> Response {
    // A HEAD is the GET it stands for (the MCP SDK knows no HEAD): the same status and headers;
    // hyper sends no body for it, and dropping the body closes an event stream it opened.
    let mut req = req;
    if req.method() == Method::HEAD {
        *req.method_mut() = Method::GET;
    }
    let owners = &state.mcp.owners;
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(id) = &session {
        if let Some(owner) = owners.owner_of(id) {
            if let Err(refusal) = state.door.require_own(
                &caller,
                SESSION_HEADER,
                "this MCP session",
                owner.as_deref(),
            ) {
                return refusal.into_response();
            }
        }
    }
    let ends = req.method() == Method::DELETE;
    let mut resp = state.mcp.http.handle(req).await;
    // A session ended is 200: the SDK answers 202 Accepted, which the official MCP clients take for
    // a failed termination (they expect 200 or 204, and warn otherwise).
    if ends && resp.status() == axum::http::StatusCode::ACCEPTED {
        *resp.status_mut() = axum::http::StatusCode::OK;
    }
    match &session {
        None => {
            if let Some(opened) = resp
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                let persona = caller
                    .persona_key()
                    .map(|k| state.door.canonical(&k.persona));
                owners.opened(opened, persona);
            }
        }
        Some(id) if ends && resp.status().is_success() => owners.ended(id),
        Some(_) => {}
    }
    resp.map(axum::body::Body::new)
}
