//! Token and cost budgets per persona and period.
//!
//! Usage is kept in hourly buckets for the last 32 days (every period boundary is a UTC hour
//! boundary), so a budget whose period changes on reload is recomputed exactly instead of guessed,
//! and the amount used in the current period is an O(1) running sum on the hot path.
//! The remaining amount is `limit - used` and **goes below zero** when a persona is over budget: the
//! original system clamped it at 0, so its critical alert could never fire.

use std::collections::BTreeMap;

use chrono::{Datelike, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::clock::UnixMillis;
use super::series::saturating_sum;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// Buckets older than this are dropped: the longest period (a month) is at most 31 days.
const KEEP_MS: i64 = 32 * DAY_MS;

/// When a budget starts afresh. Boundaries are in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Never resets: a lifetime budget.
    #[default]
    None,
    Hourly,
    Daily,
    /// Weeks start on Monday 00:00 UTC.
    Weekly,
    Monthly,
}

impl Period {
    pub const NAMES: &'static str = "none, hourly, daily, weekly, monthly";

    pub fn as_str(self) -> &'static str {
        match self {
            Period::None => "none",
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
        }
    }

    /// The start of the period that contains `at` (`i64::MIN` for [`Period::None`]).
    pub fn start_of(self, at: UnixMillis) -> UnixMillis {
        match self {
            Period::None => i64::MIN,
            Period::Hourly => floor_to(at, HOUR_MS),
            Period::Daily => floor_to(at, DAY_MS),
            // 1970-01-01 was a Thursday; Monday 1970-01-05 is 4 days later.
            Period::Weekly => floor_to(at - 4 * DAY_MS, 7 * DAY_MS) + 4 * DAY_MS,
            Period::Monthly => {
                let Some(t) = chrono::DateTime::from_timestamp_millis(at) else {
                    return floor_to(at, DAY_MS);
                };
                Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
                    .single()
                    .map(|m| m.timestamp_millis())
                    .unwrap_or_else(|| floor_to(at, DAY_MS))
            }
        }
    }

    /// When the period containing `at` ends and the budget resets (`None` for a lifetime budget).
    pub fn next_start(self, at: UnixMillis) -> Option<UnixMillis> {
        match self {
            Period::None => None,
            Period::Hourly => Some(self.start_of(at) + HOUR_MS),
            Period::Daily => Some(self.start_of(at) + DAY_MS),
            Period::Weekly => Some(self.start_of(at) + 7 * DAY_MS),
            Period::Monthly => {
                let start = self.start_of(at);
                // 32 days after the 1st is always inside the next month.
                Some(self.start_of(start + 32 * DAY_MS))
            }
        }
    }
}

fn floor_to(at: i64, unit: i64) -> i64 {
    at.div_euclid(unit) * unit
}

/// What happens when a persona is over budget (enforced by the gateway; recorded here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMode {
    /// Let calls through; the remaining gauge goes negative and alerts fire.
    #[default]
    Observe,
    /// Refuse calls with HTTP 429 once the budget is spent.
    Block,
    /// Route calls to a cheaper model once the budget is spent.
    Downgrade,
}

impl BudgetMode {
    pub const NAMES: &'static str = "observe, block, downgrade";

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetMode::Observe => "observe",
            BudgetMode::Block => "block",
            BudgetMode::Downgrade => "downgrade",
        }
    }
}

/// A persona's budget as configured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BudgetSpec {
    pub tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default)]
    pub period: Period,
    #[serde(default)]
    pub mode: BudgetMode,
    /// Fraction of `tokens` (0 < x <= 1) at which a warning is logged and counted, once per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_limit: Option<f64>,
}

/// Where a persona's budget came from, most specific first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetSource {
    /// `PUT /api/budgets/{persona}` (stored in the ledger; wins over files until removed).
    Override,
    /// `budgets.yml`.
    BudgetsFile,
    /// The persona file's `tokenBudget`.
    PersonaFile,
}

/// Usage and budget of one persona.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetState {
    pub spec: BudgetSpec,
    pub source: BudgetSource,
    /// Start of the period `used_*` refers to.
    period_start: UnixMillis,
    used_tokens: u64,
    used_cost: f64,
    /// Usage since the last reset, per UTC hour, for the last 32 days.
    hourly: BTreeMap<i64, (u64, f64)>,
    /// Usage since the last reset, for `Period::None`.
    lifetime: (u64, f64),
    /// The period start for which the soft-limit warning was given.
    soft_warned: Option<UnixMillis>,
    /// The period start for which the over-budget warning was given.
    #[serde(default)]
    hard_warned: Option<UnixMillis>,
}

impl BudgetState {
    pub fn new(spec: BudgetSpec, source: BudgetSource, now: UnixMillis) -> Self {
        Self {
            spec,
            source,
            period_start: spec.period.start_of(now),
            used_tokens: 0,
            used_cost: 0.0,
            hourly: BTreeMap::new(),
            lifetime: (0, 0.0),
            soft_warned: None,
            hard_warned: None,
        }
    }

    /// The soft limit in tokens, when the budget has one.
    pub fn soft_limit_tokens(&self) -> Option<u64> {
        self.spec
            .soft_limit
            .map(|fraction| (self.spec.tokens as f64 * fraction).ceil() as u64)
    }

    /// True once per period, when usage first reaches the soft limit.
    pub fn crossed_soft_limit(&mut self) -> bool {
        let Some(threshold) = self.soft_limit_tokens() else {
            return false;
        };
        if self.used_tokens >= threshold && self.soft_warned != Some(self.period_start) {
            self.soft_warned = Some(self.period_start);
            return true;
        }
        false
    }

    /// True once per period, when usage first goes past the budget itself (the hard limit).
    pub fn crossed_hard_limit(&mut self) -> bool {
        if self.used_tokens > self.spec.tokens && self.hard_warned != Some(self.period_start) {
            self.hard_warned = Some(self.period_start);
            return true;
        }
        false
    }

    /// Records usage that happened at `at`. Usage from an earlier period counts in its history
    /// but not against the current period.
    pub fn record(&mut self, at: UnixMillis, tokens: u64, cost: f64) {
        let hour = floor_to(at, HOUR_MS);
        let bucket = self.hourly.entry(hour).or_insert((0, 0.0));
        bucket.0 = bucket.0.saturating_add(tokens);
        bucket.1 = saturating_sum(bucket.1, cost);
        self.lifetime.0 = self.lifetime.0.saturating_add(tokens);
        self.lifetime.1 = saturating_sum(self.lifetime.1, cost);

        let start = self.spec.period.start_of(at);
        if start > self.period_start {
            self.period_start = start;
            self.recompute();
        } else if start == self.period_start {
            self.used_tokens = self.used_tokens.saturating_add(tokens);
            self.used_cost = saturating_sum(self.used_cost, cost);
        }
    }

    /// Moves to the period containing `now` when a boundary has passed, and forgets old buckets.
    pub fn roll(&mut self, now: UnixMillis) {
        let start = self.spec.period.start_of(now);
        if start > self.period_start {
            self.period_start = start;
            let horizon = now - KEEP_MS;
            self.hourly = self.hourly.split_off(&floor_to(horizon, HOUR_MS));
            self.recompute();
        }
    }

    /// Applies a changed specification (reload or override), recomputing usage if the period changed.
    pub fn respec(&mut self, spec: BudgetSpec, source: BudgetSource, now: UnixMillis) {
        let period_changed = spec.period != self.spec.period;
        self.spec = spec;
        self.source = source;
        if period_changed {
            self.period_start = spec.period.start_of(now);
            self.recompute();
        }
    }

    /// Forgets all usage so far: the budget starts afresh from `at`.
    pub fn reset(&mut self, at: UnixMillis) {
        self.hourly.clear();
        self.lifetime = (0, 0.0);
        self.used_tokens = 0;
        self.used_cost = 0.0;
        self.period_start = self.period_start.max(self.spec.period.start_of(at));
    }

    fn recompute(&mut self) {
        if self.spec.period == Period::None {
            (self.used_tokens, self.used_cost) = self.lifetime;
            return;
        }
        let (tokens, cost) = self
            .hourly
            .range(self.period_start..)
            .fold((0u64, 0.0), |(t, c), (_, (bt, bc))| {
                (t.saturating_add(*bt), saturating_sum(c, *bc))
            });
        self.used_tokens = tokens;
        self.used_cost = cost;
    }

    /// Tokens recorded from `from` to `to` (whole UTC hours; the last 32 days since the last reset).
    pub fn usage_between(&self, from: UnixMillis, to: UnixMillis) -> u64 {
        self.hourly
            .range(floor_to(from, HOUR_MS)..to)
            .map(|(_, (tokens, _))| *tokens)
            .sum()
    }

    pub fn used_tokens(&self) -> u64 {
        self.used_tokens
    }

    pub fn used_cost(&self) -> f64 {
        self.used_cost
    }

    pub fn period_start(&self) -> UnixMillis {
        self.period_start
    }

    /// Tokens left in this period; negative when over budget.
    pub fn remaining_tokens(&self) -> i64 {
        let limit = i64::try_from(self.spec.tokens).unwrap_or(i64::MAX);
        let used = i64::try_from(self.used_tokens).unwrap_or(i64::MAX);
        limit.saturating_sub(used)
    }

    /// USD left in this period, when a cost budget is set; negative when over budget.
    pub fn remaining_cost(&self) -> Option<f64> {
        self.spec.cost_usd.map(|limit| limit - self.used_cost)
    }

    pub fn resets_at(&self) -> Option<UnixMillis> {
        self.spec.period.next_start(self.period_start.max(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> UnixMillis {
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .unwrap_or_else(|e| panic!("bad test time {s}: {e}"))
    }

    fn spec(tokens: u64, period: Period) -> BudgetSpec {
        BudgetSpec {
            tokens,
            cost_usd: Some(1.0),
            period,
            mode: BudgetMode::Observe,
            soft_limit: Some(0.8),
        }
    }

    #[test]
    fn period_boundaries_are_utc() {
        let t = at("2026-11-28T09:12:50Z"); // a Saturday
        assert_eq!(Period::Hourly.start_of(t), at("2026-11-28T09:00:00Z"));
        assert_eq!(Period::Daily.start_of(t), at("2026-11-28T00:00:00Z"));
        assert_eq!(Period::Weekly.start_of(t), at("2026-11-23T00:00:00Z"));
        assert_eq!(Period::Monthly.start_of(t), at("2026-11-01T00:00:00Z"));
        assert_eq!(
            Period::Monthly.next_start(t),
            Some(at("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Monthly.next_start(at("2026-12-31T23:59:59Z")),
            Some(at("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Weekly.next_start(t),
            Some(at("2026-11-30T00:00:00Z"))
        );
        assert_eq!(Period::None.next_start(t), None);
    }

    #[test]
    fn remaining_goes_negative_and_resets_at_the_boundary() {
        let t0 = at("2026-11-28T23:00:00Z");
        let mut b = BudgetState::new(spec(2000, Period::Daily), BudgetSource::BudgetsFile, t0);
        b.record(t0, 1500, 0.5);
        b.record(t0 + 1000, 750, 0.75);
        assert_eq!(b.remaining_tokens(), -250);
        assert_eq!(b.remaining_cost(), Some(-0.25));
        b.roll(at("2026-11-28T23:59:59Z"));
        assert_eq!(b.remaining_tokens(), -250);
        b.roll(at("2026-11-29T00:00:00Z"));
        assert_eq!(b.remaining_tokens(), 2000);
        assert_eq!(b.resets_at(), Some(at("2026-11-30T00:00:00Z")));
    }

    #[test]
    fn usage_from_a_past_period_does_not_count_now() {
        let now = at("2026-11-28T10:00:00Z");
        let mut b = BudgetState::new(spec(100, Period::Daily), BudgetSource::BudgetsFile, now);
        b.record(at("2026-11-27T10:00:00Z"), 80, 0.0);
        assert_eq!(b.used_tokens(), 0);
        b.record(now, 30, 0.0);
        assert_eq!(b.used_tokens(), 30);
    }

    #[test]
    fn a_changed_period_is_recomputed_from_history() {
        let now = at("2026-11-28T10:30:00Z");
        let mut b = BudgetState::new(spec(100, Period::Daily), BudgetSource::BudgetsFile, now);
        b.record(at("2026-11-28T08:10:00Z"), 40, 0.0);
        b.record(at("2026-11-28T10:10:00Z"), 25, 0.0);
        assert_eq!(b.used_tokens(), 65);
        b.respec(spec(100, Period::Hourly), BudgetSource::Override, now);
        assert_eq!(b.used_tokens(), 25);
        b.respec(spec(100, Period::None), BudgetSource::Override, now);
        assert_eq!(b.used_tokens(), 65);
    }

    #[test]
    fn the_soft_limit_warns_once_per_period() {
        let now = at("2026-11-28T10:30:00Z");
        let mut b = BudgetState::new(spec(100, Period::Hourly), BudgetSource::BudgetsFile, now);
        b.record(now, 79, 0.0);
        assert!(!b.crossed_soft_limit());
        b.record(now, 1, 0.0);
        assert!(b.crossed_soft_limit());
        b.record(now, 30, 0.0);
        assert!(!b.crossed_soft_limit(), "once per period");
        b.record(at("2026-11-28T11:00:01Z"), 85, 0.0);
        assert!(b.crossed_soft_limit(), "again in the next period");
    }

    #[test]
    fn going_past_the_budget_is_told_once_per_period() {
        let now = at("2026-11-28T10:30:00Z");
        let mut b = BudgetState::new(spec(100, Period::Hourly), BudgetSource::BudgetsFile, now);
        b.record(now, 100, 0.0);
        assert!(!b.crossed_hard_limit(), "exactly the budget is not over it");
        b.record(now, 1, 0.0);
        assert!(b.crossed_hard_limit());
        b.record(now, 50, 0.0);
        assert!(!b.crossed_hard_limit(), "once per period");
        b.record(at("2026-11-28T11:00:01Z"), 101, 0.0);
        assert!(b.crossed_hard_limit(), "again in the next period");
    }

    #[test]
    fn reset_forgets_usage() {
        let now = at("2026-11-28T10:30:00Z");
        let mut b = BudgetState::new(spec(100, Period::Weekly), BudgetSource::BudgetsFile, now);
        b.record(now, 150, 0.0);
        assert_eq!(b.remaining_tokens(), -50);
        b.reset(now);
        assert_eq!(b.remaining_tokens(), 100);
        b.record(now + 1, 10, 0.0);
        b.respec(spec(100, Period::Daily), BudgetSource::BudgetsFile, now);
        assert_eq!(b.used_tokens(), 10);
    }
}
