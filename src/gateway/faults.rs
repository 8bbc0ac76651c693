//! Faults a test plants in the built-in mock upstream, to prove what a bug costs without having
//! one: a mock call whose last user message contains the planted marker panics — when it is made
//! ([`Fault::Call`]: in the handler, or in a plain call's task), or after its stream's first event
//! ([`Fault::MidStream`]: in the relay's task). Nothing in hypertool plants one; unplanted, it
//! costs a mock call one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Where a planted fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Call,
    MidStream,
}

static PLANTED: AtomicBool = AtomicBool::new(false);
static MARKERS: Mutex<Vec<(String, Fault)>> = Mutex::new(Vec::new());

/// Plants `fault` for mock calls whose last user message contains `marker`.
pub fn plant(marker: &str, fault: Fault) {
    let mut markers = MARKERS.lock().unwrap_or_else(|p| p.into_inner());
    markers.push((marker.to_string(), fault));
    PLANTED.store(true, Ordering::Release);
}

/// The fault planted for a call whose last user message is `text()`, if any.
fn planted(text: impl FnOnce() -> String) -> Option<Fault> {
    if !PLANTED.load(Ordering::Acquire) {
        return None;
    }
    let text = text();
    let markers = MARKERS.lock().unwrap_or_else(|p| p.into_inner());
    markers
        .iter()
        .find(|(m, _)| text.contains(m.as_str()))
        .map(|(_, f)| *f)
}

/// Panics when a [`Fault::Call`] is planted for the call whose last user message is `text()`;
/// returns the fault planted otherwise (a [`Fault::MidStream`] is the stream's to strike).
pub(super) fn strike_call(text: impl FnOnce() -> String) -> Option<Fault> {
    let fault = planted(text);
    if fault == Some(Fault::Call) {
        panic!("a fault planted by a test: the mock call panics");
    }
    fault
}
