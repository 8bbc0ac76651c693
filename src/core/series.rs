//! Metric series as plain data: counters, gauges and histograms keyed by label values.
//!
//! These live in the core (not in a metrics library's global registry) because the core owns them:
//! they are rebuilt by replaying the ledger, read by the embedded alert engine, and rendered in both
//! exposition formats by `telemetry::exposition`.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Label values of one series, in the family's label order.
pub type Key<const N: usize> = [Arc<str>; N];

/// A family of counters.
#[derive(Debug, Clone)]
pub struct CounterVec<const N: usize> {
    values: HashMap<Key<N>, f64>,
}

impl<const N: usize> Default for CounterVec<N> {
    fn default() -> Self {
        Self {
            values: HashMap::new(),
        }
    }
}

impl<const N: usize> CounterVec<N> {
    pub fn inc_by(&mut self, key: Key<N>, by: f64) {
        let v = self.values.entry(key).or_insert(0.0);
        *v = saturating_sum(*v, by);
    }

    /// Makes a series exist at 0 (an idle series is not a missing one).
    pub fn touch(&mut self, key: Key<N>) {
        self.values.entry(key).or_insert(0.0);
    }

    pub fn get(&self, labels: [&str; N]) -> f64 {
        self.values
            .iter()
            .find(|(k, _)| k.iter().zip(labels.iter()).all(|(a, b)| &**a == *b))
            .map(|(_, v)| *v)
            .unwrap_or(0.0)
    }

    /// The sum of every series; `0` (not `-0`, which is what summing no floats gives) when there
    /// is none, so a page or an answer never shows "-0".
    pub fn sum(&self) -> f64 {
        self.values.values().sum::<f64>() + 0.0
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Series sorted by label values, for stable output.
    pub fn sorted(&self) -> Vec<(&Key<N>, f64)> {
        let mut v: Vec<_> = self.values.iter().map(|(k, v)| (k, *v)).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }
}

/// Series as (label values, value) pairs: snapshots are JSON, whose map keys must be strings.
fn serialize_series<S: Serializer, const N: usize, V: Serialize>(
    series: &HashMap<Key<N>, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(series.iter().map(|(k, v)| (k.as_slice(), v)))
}

fn deserialize_series<'de, D: Deserializer<'de>, const N: usize, V: Deserialize<'de>>(
    d: D,
) -> Result<HashMap<Key<N>, V>, D::Error> {
    let pairs: Vec<(Vec<Arc<str>>, V)> = Vec::deserialize(d)?;
    pairs
        .into_iter()
        .map(|(k, v)| {
            let n = k.len();
            <Key<N>>::try_from(k)
                .map(|k| (k, v))
                .map_err(|_| serde::de::Error::custom(format!("{n} label values, {N} expected")))
        })
        .collect()
}

impl<const N: usize> Serialize for CounterVec<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_series(&self.values, s)
    }
}

impl<'de, const N: usize> Deserialize<'de> for CounterVec<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self {
            values: deserialize_series(d)?,
        })
    }
}

/// One histogram series: cumulative buckets are computed at render time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is the +Inf overflow.
    counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// Cumulative counts per upper bound, ending with +Inf (== count).
    pub fn cumulative(&self) -> Vec<u64> {
        let mut acc = 0;
        self.counts
            .iter()
            .map(|c| {
                acc += c;
                acc
            })
            .collect()
    }
}

/// A family of histograms sharing bucket bounds.
#[derive(Debug, Clone)]
pub struct HistogramVec<const N: usize> {
    pub bounds: &'static [f64],
    series: HashMap<Key<N>, Histogram>,
}

/// Only the series are stored: the bounds are the family's, restored with [`HistogramVec::adopt`].
impl<const N: usize> Serialize for HistogramVec<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_series(&self.series, s)
    }
}

impl<'de, const N: usize> Deserialize<'de> for HistogramVec<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self {
            bounds: &[],
            series: deserialize_series(d)?,
        })
    }
}

impl<const N: usize> HistogramVec<N> {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            series: HashMap::new(),
        }
    }

    /// Takes the series of a restored family (which has no bounds of its own) into this one;
    /// refused when a series has another number of buckets (the family's buckets changed).
    pub fn adopt(&mut self, restored: HistogramVec<N>) -> Result<(), String> {
        let slots = self.bounds.len() + 1;
        if let Some((k, h)) = restored
            .series
            .iter()
            .find(|(_, h)| h.counts.len() != slots)
        {
            return Err(format!(
                "a histogram series {k:?} has {} buckets, {slots} expected",
                h.counts.len()
            ));
        }
        self.series = restored.series;
        Ok(())
    }

    pub fn observe(&mut self, key: Key<N>, value: f64) {
        let slots = self.bounds.len() + 1;
        let h = self.series.entry(key).or_insert_with(|| Histogram {
            counts: vec![0; slots],
            sum: 0.0,
            count: 0,
        });
        let slot = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        h.counts[slot] += 1;
        h.sum = saturating_sum(h.sum, value);
        h.count += 1;
    }

    pub fn get(&self, labels: [&str; N]) -> Option<&Histogram> {
        self.series
            .iter()
            .find(|(k, _)| k.iter().zip(labels.iter()).all(|(a, b)| &**a == *b))
            .map(|(_, h)| h)
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    pub fn sorted(&self) -> Vec<(&Key<N>, &Histogram)> {
        let mut v: Vec<_> = self.series.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }
}

/// Bucket bounds of `hypertool_workflow_stage_duration_seconds`: they reach well past the
/// SlowWorkflowStage threshold of 300 s so that its p95 can be told apart from "somewhere above".
pub const STAGE_DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0, 240.0, 300.0, 450.0, 600.0, 900.0, 1200.0, 1800.0,
    3600.0,
];

/// Bucket bounds of `hypertool_persona_duration_seconds` (seconds a session spends in a persona).
pub const PERSONA_DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// Bucket bounds of `langfuse_generation_duration_seconds` (one LLM call).
pub const GENERATION_DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// Bucket bounds of `hypertool_prompt_tokens` (prompt tokens of one call): powers of two from 64
/// to 256k, the range of today's context windows.
pub const PROMPT_TOKENS_BUCKETS: &[f64] = &[
    64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0, 131072.0,
    262144.0,
];

/// Bucket bounds of `hypertool_mcp_tool_call_duration_seconds` (one tool call: a clock read, a git
/// log, a browser step).
pub const TOOL_CALL_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub fn tool_call_duration_histogram() -> HistogramVec<3> {
    HistogramVec::new(TOOL_CALL_DURATION_BUCKETS)
}

/// A histogram of stage durations by (workflow, stage, variant).
pub fn stage_duration_histogram() -> HistogramVec<3> {
    HistogramVec::new(STAGE_DURATION_BUCKETS)
}

pub fn prompt_tokens_histogram() -> HistogramVec<2> {
    HistogramVec::new(PROMPT_TOKENS_BUCKETS)
}

/// `a + b` for the non-negative sums of counters, costs and durations: at the largest finite
/// value it stays there instead of becoming `+Inf` (which would make a counter, a budget's
/// remaining cost and every alert on them meaningless).
pub fn saturating_sum(a: f64, b: f64) -> f64 {
    let sum = a + b;
    if sum.is_finite() {
        sum
    } else if sum.is_nan() {
        a
    } else {
        f64::MAX.copysign(sum)
    }
}

/// `histogram_quantile(q, …)` over one group's `(le, value)` buckets, as Prometheus computes it.
pub fn bucket_quantile(q: f64, buckets: &mut [(f64, f64)]) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if !buckets.last().is_some_and(|b| b.0 == f64::INFINITY) {
        return f64::NAN;
    }
    // Coalesce buckets with the same bound.
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(buckets.len());
    for (le, c) in buckets.iter() {
        match merged.last_mut() {
            Some(last) if last.0 == *le => last.1 += c,
            _ => merged.push((*le, *c)),
        }
    }
    // Ensure monotonic counts.
    let mut max = f64::NEG_INFINITY;
    for b in merged.iter_mut() {
        if b.1 > max {
            max = b.1;
        } else if b.1 < max {
            b.1 = max;
        }
    }
    if merged.len() < 2 {
        return f64::NAN;
    }
    let observations = merged[merged.len() - 1].1;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    let b = merged[..merged.len() - 1]
        .iter()
        .position(|(_, c)| *c >= rank)
        .unwrap_or(merged.len() - 1);
    if b == merged.len() - 1 {
        return merged[merged.len() - 2].0;
    }
    if b == 0 && merged[0].0 <= 0.0 {
        return merged[0].0;
    }
    let bucket_end = merged[b].0;
    let mut count = merged[b].1;
    let mut bucket_start = 0.0;
    if b > 0 {
        bucket_start = merged[b - 1].0;
        count -= merged[b - 1].1;
        rank -= merged[b - 1].1;
    }
    bucket_start + (bucket_end - bucket_start) * (rank / count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_saturate_instead_of_reaching_infinity() {
        assert_eq!(saturating_sum(1.5, 2.0), 3.5);
        assert_eq!(saturating_sum(1e308, 1e308), f64::MAX);
        assert_eq!(saturating_sum(f64::MAX, 1.0), f64::MAX);
        assert_eq!(saturating_sum(2.0, f64::NAN), 2.0);
        let mut c: CounterVec<1> = CounterVec::default();
        c.inc_by(["a".into()], 1e308);
        c.inc_by(["a".into()], 1e308);
        assert!(c.values.values().all(|v| v.is_finite()));
    }

    #[test]
    fn the_sum_of_no_series_is_zero_not_minus_zero() {
        let c: CounterVec<1> = CounterVec::default();
        assert!(c.sum().is_sign_positive());
        assert_eq!(serde_json::json!(c.sum()).to_string(), "0.0");
    }
}
