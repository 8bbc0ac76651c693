//! Request and token rates per gateway key (`[[gateway.keys]]`) and per persona (`budgets.yml`):
//! `requests_per_minute` and `tokens_per_minute`, each a GCRA bucket (governor) that refills
//! evenly over the minute and holds at most one minute's worth. A call over a rate gets 429
//! `rate_limited` with `Retry-After`, counted in `hypertool_rate_limited_total{persona,kind}`.
//!
//! Tokens are counted at admission from the call's estimate (prompt + its completion limit), so a
//! call is refused before it spends anything; budgets settle on real usage. Time comes from the
//! core's clock, so a minute of rate is tested in milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::gateway::{RateLimits, VirtualKey};
use crate::core::clock::Clock;
use crate::telemetry::registry::Counter;

/// The core's clock, as governor reads time.
#[derive(Clone)]
struct CoreClock(Arc<dyn Clock>);

impl GovernorClock for CoreClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.now_ms().max(0) as u64 * 1_000_000)
    }
}

type Bucket = RateLimiter<NotKeyed, InMemoryState, CoreClock, NoOpMiddleware<Nanos>>;

/// The two buckets of one key or persona, built from its limits.
struct Buckets {
    limits: RateLimits,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl Buckets {
    fn new(limits: RateLimits, clock: &CoreClock) -> Self {
        let bucket = |per_minute: Option<NonZeroU32>| {
            per_minute.map(|n| RateLimiter::direct_with_clock(Quota::per_minute(n), clock.clone()))
        };
        Buckets {
            limits,
            requests: bucket(limits.requests_per_minute),
            tokens: bucket(limits.tokens_per_minute),
        }
    }
}

/// Which rate a call passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKind {
    Requests,
    Tokens,
}

impl RateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RateKind::Requests => "requests",
            RateKind::Tokens => "tokens",
        }
    }
}

/// A call refused by a rate limit.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimited {
    pub kind: RateKind,
    /// `key` (naming the key's variable) or `persona`.
    pub scope: String,
    pub per_minute: u32,
    /// When the call could go through; `None` when it never can (it needs more tokens than a
    /// minute's worth).
    pub retry_after: Option<Duration>,
}

/// Every key's and persona's buckets; rebuilt on reload only where limits changed (a reload
/// does not hand out a fresh minute).
pub struct RateLimiters {
    clock: CoreClock,
    keys: RwLock<HashMap<String, Arc<Buckets>>>,
    personas: RwLock<HashMap<String, Arc<Buckets>>>,
    /// `hypertool_rate_limited_total{persona,kind}` (personas are canonical names of configured
    /// personas or keys: bounded).
    pub refused: Counter<2>,
    /// Whether any limit is configured: without one, a call costs one atomic load here.
    active: std::sync::atomic::AtomicBool,
}

impl RateLimiters {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        RateLimiters {
            clock: CoreClock(clock),
            keys: RwLock::new(HashMap::new()),
            personas: RwLock::new(HashMap::new()),
            refused: Counter::new(&crate::telemetry::families::RATE_LIMITED_TOTAL),
            active: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Applies the configured limits: keys by their variable's name, personas by canonical name.
    pub fn configure(&self, keys: &[VirtualKey], personas: &BTreeMap<String, RateLimits>) {
        let rebuild = |old: &HashMap<String, Arc<Buckets>>,
                       wanted: Vec<(String, RateLimits)>|
         -> HashMap<String, Arc<Buckets>> {
            wanted
                .into_iter()
                .filter(|(_, l)| !l.is_empty())
                .map(|(name, limits)| {
                    let b = match old.get(&name) {
                        Some(b) if b.limits == limits => b.clone(),
                        _ => Arc::new(Buckets::new(limits, &self.clock)),
                    };
                    (name, b)
                })
                .collect()
        };
        let key_limits = keys.iter().map(|k| (k.key_env.clone(), k.limits)).collect();
        let persona_limits = personas.iter().map(|(p, l)| (p.clone(), *l)).collect();
        let mut k = self.keys.write().unwrap_or_else(|p| p.into_inner());
        *k = rebuild(&k, key_limits);
        let mut p = self.personas.write().unwrap_or_else(|p| p.into_inner());
        *p = rebuild(&p, persona_limits);
        self.active.store(
            !k.is_empty() || !p.is_empty(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Whether any key or persona has a rate limit.
    pub fn active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes one request and `tokens` tokens from the key's and the persona's buckets, or says
    /// which rate refuses the call (and counts it for `persona`).
    pub fn check(
        &self,
        key: Option<&VirtualKey>,
        persona: &str,
        tokens: u64,
    ) -> Result<(), RateLimited> {
        let key_buckets = key.and_then(|k| {
            self.keys
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&k.key_env)
                .cloned()
                .map(|b| (format!("key ${}", k.key_env), b))
        });
        let persona_buckets = self
            .personas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(persona)
            .cloned()
            .map(|b| (format!("persona `{persona}`"), b));
        for (scope, b) in key_buckets.iter().chain(persona_buckets.iter()) {
            if let Err(mut refused) = self.take(b, tokens) {
                refused.scope = scope.clone();
                self.refused.inc([persona, refused.kind.as_str()]);
                return Err(refused);
            }
        }
        Ok(())
    }

    fn take(&self, b: &Buckets, tokens: u64) -> Result<(), RateLimited> {
        let now = self.clock.now();
        if let (Some(bucket), Some(n)) = (&b.requests, b.limits.requests_per_minute) {
            bucket.check().map_err(|not_until| RateLimited {
                kind: RateKind::Requests,
                scope: String::new(),
                per_minute: n.get(),
                retry_after: Some(not_until.wait_time_from(now)),
            })?;
        }
        if let (Some(bucket), Some(n)) = (&b.tokens, b.limits.tokens_per_minute) {
            let want = NonZeroU32::new(tokens.min(u32::MAX as u64) as u32);
            if let Some(want) = want {
                let limited = |retry_after| RateLimited {
                    kind: RateKind::Tokens,
                    scope: String::new(),
                    per_minute: n.get(),
                    retry_after,
                };
                match bucket.check_n(want) {
                    Ok(Ok(())) => {}
                    Ok(Err(not_until)) => return Err(limited(Some(not_until.wait_time_from(now)))),
                    Err(_insufficient) => return Err(limited(None)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::secret::KeyHash;
    use crate::core::clock::ManualClock;

    fn key(rpm: Option<u32>, tpm: Option<u32>) -> VirtualKey {
        VirtualKey {
            hash: KeyHash::of("k"),
            key_env: "K".into(),
            persona: "backend-engineer".into(),
            models: vec![],
            limits: RateLimits {
                requests_per_minute: rpm.and_then(NonZeroU32::new),
                tokens_per_minute: tpm.and_then(NonZeroU32::new),
            },
        }
    }

    #[test]
    fn a_minute_of_requests_then_one_every_period() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let limits = RateLimiters::new(clock.clone());
        let k = key(Some(6), None);
        limits.configure(std::slice::from_ref(&k), &BTreeMap::new());
        for _ in 0..6 {
            assert!(limits.check(Some(&k), "backend-engineer", 1).is_ok());
        }
        let refused = limits.check(Some(&k), "backend-engineer", 1).unwrap_err();
        assert_eq!(refused.kind, RateKind::Requests);
        assert_eq!(refused.retry_after, Some(Duration::from_secs(10)));
        clock.advance_secs(10);
        assert!(limits.check(Some(&k), "backend-engineer", 1).is_ok());
        assert!(limits.check(Some(&k), "backend-engineer", 1).is_err());
        // A reload with the same limits keeps the bucket's state.
        limits.configure(std::slice::from_ref(&k), &BTreeMap::new());
        assert!(limits.check(Some(&k), "backend-engineer", 1).is_err());
        assert_eq!(limits.refused.get(["backend-engineer", "requests"]), 3);
    }

    #[test]
    fn tokens_per_persona_and_calls_that_can_never_fit() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let limits = RateLimiters::new(clock.clone());
        let personas = BTreeMap::from([(
            "data-scientist".to_string(),
            RateLimits {
                requests_per_minute: None,
                tokens_per_minute: NonZeroU32::new(1_000),
            },
        )]);
        limits.configure(&[], &personas);
        assert!(limits.check(None, "data-scientist", 600).is_ok());
        let r = limits.check(None, "data-scientist", 600).unwrap_err();
        assert_eq!(r.kind, RateKind::Tokens);
        assert!(r.retry_after.is_some_and(|d| d > Duration::ZERO));
        assert_eq!(
            limits
                .check(None, "data-scientist", 5_000)
                .unwrap_err()
                .retry_after,
            None
        );
        // Other personas are not limited.
        assert!(limits.check(None, "backend-engineer", 5_000).is_ok());
        clock.advance_secs(60);
        assert!(limits.check(None, "data-scientist", 1_000).is_ok());
    }
}
