//! The HTTP layer below both `server` and `gateway`: the error type every route answers with
//! (`error`) and the access layer that decides every request before a handler runs (`auth`).
//! Nothing here imports `server` or `gateway`; both import from here.

pub mod auth;
pub mod body;
pub mod conn;
pub mod error;
pub mod json;

/// The server's base URL: `http://` added when no scheme is given, no trailing slash.
pub fn server_url(server: &str) -> String {
    let trimmed = server.trim().trim_end_matches('/');
    if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    }
}
