//! Adapters that export the core's state: the Prometheus exposition (and later alerts, Langfuse
//! and OpenTelemetry).

pub mod exposition;
pub mod families;
