//! A small in-memory time-series store: what the embedded alert engine has "scraped".
//!
//! Samples are kept for the longest window any rule needs plus Prometheus's 5-minute lookback.
//! Selection follows Prometheus 2.x: a range `[w]` at `t` holds the samples with `t - w <= ts <= t`;
//! an instant selection takes the newest sample at or before `t`, if it is at most 5 minutes old.

use std::collections::{BTreeMap, VecDeque};

use crate::core::clock::UnixMillis;

/// Label set of a series, metric name excluded, sorted.
pub type Labels = BTreeMap<String, String>;

/// Prometheus's default lookback for instant vectors.
pub const LOOKBACK_MS: i64 = 5 * 60 * 1000;

#[derive(Debug, Default, Clone)]
pub struct Tsdb {
    series: BTreeMap<String, BTreeMap<Labels, VecDeque<(UnixMillis, f64)>>>,
    retention_ms: i64,
}

impl Tsdb {
    pub fn new(retention_ms: i64) -> Self {
        Self {
            series: BTreeMap::new(),
            retention_ms: retention_ms.max(LOOKBACK_MS),
        }
    }

    pub fn set_retention(&mut self, retention_ms: i64) {
        self.retention_ms = retention_ms.max(LOOKBACK_MS);
    }

    /// Adds one sample; out-of-order samples are dropped, a second one at the same time replaces the first.
    pub fn append(&mut self, name: &str, labels: Labels, at: UnixMillis, value: f64) {
        let points = self
            .series
            .entry(name.to_string())
            .or_default()
            .entry(labels)
            .or_default();
        match points.back_mut() {
            // Evaluated twice at one instant (a manual clock): the newer scrape wins.
            Some(last) if last.0 == at => last.1 = value,
            Some(last) if last.0 > at => {}
            _ => points.push_back((at, value)),
        }
    }

    /// Forgets samples older than the retention, and series left empty.
    pub fn trim(&mut self, now: UnixMillis) {
        let horizon = now.saturating_sub(self.retention_ms);
        for family in self.series.values_mut() {
            for points in family.values_mut() {
                while points.front().is_some_and(|(t, _)| *t < horizon) {
                    points.pop_front();
                }
            }
            family.retain(|_, p| !p.is_empty());
        }
    }

    /// Every series of `name` whose labels satisfy `filter`, with its samples in `[at - window, at]`.
    pub fn range<'a>(
        &'a self,
        name: &str,
        at: UnixMillis,
        window_ms: i64,
        filter: impl Fn(&Labels) -> bool + 'a,
    ) -> impl Iterator<Item = (&'a Labels, Vec<(UnixMillis, f64)>)> + 'a {
        let start = at - window_ms;
        self.series
            .get(name)
            .into_iter()
            .flat_map(|family| family.iter())
            .filter(move |(labels, _)| filter(labels))
            .map(move |(labels, points)| {
                let selected: Vec<_> = points
                    .iter()
                    .copied()
                    .filter(|(t, _)| *t >= start && *t <= at)
                    .collect();
                (labels, selected)
            })
            .filter(|(_, p)| !p.is_empty())
    }

    /// The value of every series of `name` at `at` (newest sample within the lookback).
    pub fn instant<'a>(
        &'a self,
        name: &str,
        at: UnixMillis,
    ) -> impl Iterator<Item = (&'a Labels, f64)> + 'a {
        self.series
            .get(name)
            .into_iter()
            .flat_map(|family| family.iter())
            .filter_map(move |(labels, points)| {
                points
                    .iter()
                    .rev()
                    .find(|(t, _)| *t <= at)
                    .filter(|(t, _)| at - *t <= LOOKBACK_MS)
                    .map(|(_, v)| (labels, *v))
            })
    }

    /// All series, for writing promtool input.
    pub fn dump(&self) -> impl Iterator<Item = (&String, &Labels, &VecDeque<(UnixMillis, f64)>)> {
        self.series
            .iter()
            .flat_map(|(name, fam)| fam.iter().map(move |(l, p)| (name, l, p)))
    }
}
