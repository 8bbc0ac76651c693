//! Time as the core sees it: milliseconds since the Unix epoch, read from an injected clock.

use std::sync::atomic::{AtomicI64, Ordering};

/// Milliseconds since 1970-01-01T00:00:00Z. Plain integers keep the hot path free of calendar math.
pub type UnixMillis = i64;

/// The only way the core learns the time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> UnixMillis;
}

/// The wall clock, for `hypertool serve`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMillis {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock that moves only when told to: tests and simulations run hours of time in microseconds.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    pub fn new(start: UnixMillis) -> Self {
        Self {
            now: AtomicI64::new(start),
        }
    }

    pub fn set(&self, at: UnixMillis) {
        self.now.store(at, Ordering::SeqCst);
    }

    pub fn advance_ms(&self, ms: i64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn advance_secs(&self, secs: i64) {
        self.advance_ms(secs * 1000);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> UnixMillis {
        self.now.load(Ordering::SeqCst)
    }
}

/// RFC 3339 rendering for APIs and logs.
pub fn to_rfc3339(at: UnixMillis) -> String {
    match chrono::DateTime::from_timestamp_millis(at) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => at.to_string(),
    }
}
