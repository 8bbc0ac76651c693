//! `/mcp`: the MCP proxy over streamable HTTP — `POST` carries the client's messages, `GET` opens
//! the session's event stream (`notifications/tools/list_changed`), `DELETE` ends the session.
//! Behind the door like every route: persona keys (their persona only) and admin keys; the
//! session itself is `crate::mcp::proxy::McpSession`.

use axum::extract::{Request, State};
use axum::response::Response;

use super::AppState;

pub async fn endpoint(State(state): State<AppState>, req: Request) -> Response {
    state.mcp.http.handle(req).await.map(axum::body::Body::new)
}
