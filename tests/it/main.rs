//! hypertool's integration tests: one binary, one module per topic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod access;
mod alert_rules;
mod bad_input;
mod common;
mod config_reload;
mod dashboard;
mod delivery;
mod disk_faults;
mod door;
mod embedded_alerts;
mod events_api;
mod gateway;
mod gateway_stages;
mod grafana;
mod mcp;
mod metrics_contract;
mod operator;
mod persistence;
mod process;
mod properties;
mod replicas;
mod secrets;
mod switching;
mod traces;
mod workflows;
