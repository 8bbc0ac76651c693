//! hypertool: an OpenAI-compatible LLM gateway and observability core that attributes every LLM
//! call to a persona, enforces budgets and exports the metrics the alert runbook queries.
//!
//! See `docs/ARCHITECTURE.md` for the map of modules and the path an event takes through them.

pub mod alerts;
pub mod cli;
pub mod config;
pub mod core;
pub mod doctor;
pub mod gateway;
pub mod mcp;
pub mod runbook;
pub mod server;
pub mod store;
pub mod switchboard;
pub mod telemetry;
pub mod tls;
pub mod web;
