//! hypertool as an MCP proxy: one MCP server in front of many, exposing to each session only the
//! tools of its persona in force, switching persona on demand under the switch policy, and turning
//! every switch and tool call into core events (metrics, ledger, spans).
//!
//! - `config`: the downstream servers (`.mcp.json`).
//! - `downstream`: those servers started, supervised and called.
//! - `toolset`: which tools a persona sees, under which names (pure).
//! - `hub`: where events and switches go — this process's engine, or a running server's API.
//! - `proxy`: one MCP session (`rmcp`'s `ServerHandler`): `tools/list`, `tools/call`, the built-in
//!   `list-personas`, `equip-persona`, `current-persona`.
//!
//! Served over stdio by `hypertool mcp` and over streamable HTTP at `/mcp` by `hypertool serve`.

pub mod config;
pub mod downstream;
pub mod hub;
pub mod proxy;
pub mod toolset;
