//! The pure domain of hypertool: no network, no disk, no wall clock.
//!
//! Every fact enters as an [`event::Event`] stamped with a time, and every notion of "now" comes from
//! an injected [`clock::Clock`]. That is what lets budget periods, idle sessions and (later) alert
//! windows be tested in milliseconds with a [`clock::ManualClock`], and what lets a restart rebuild
//! exactly the same state by replaying the ledger through [`engine::Engine::apply`].

pub mod budget;
pub mod clock;
pub mod duration;
pub mod engine;
pub mod event;
pub mod experiment;
pub mod labels;
pub mod persona;
pub mod policy;
pub mod routing;
pub mod runs;
pub mod series;
pub mod session;
pub mod synthetic;
pub mod text;
pub mod workflow;
