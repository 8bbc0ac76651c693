//! Adapters that export the core's state: the Prometheus exposition, and traces (OpenTelemetry
//! spans over OTLP to a collector and to Langfuse).

pub mod exposition;
pub mod families;
pub mod registry;
pub mod trace;
