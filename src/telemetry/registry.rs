//! The process's metrics: every family `telemetry::families` declares that the core's engine does
//! not hold is counted here, through a typed handle owned by the component that counts it.
//!
//! A component makes its handle from the family's declaration (`Counter::new(&families::X)`),
//! keeps it, and counts through it; start-up hands the handle (or, for a value that is read rather
//! than counted, a collector) to the [`Registry`], which the exposition renders. So adding a metric
//! is: declare the family, make the handle where the thing happens, register it once — nothing is
//! gathered by hand at scrape time, and the label names come from the one declaration.
//!
//! Label values are bounded here too, as a last line: a family admits at most [`MAX_SERIES`]
//! series; later label sets fold into one series whose every label is `other`. (Components already
//! pass only configured or fixed values; this keeps a mistake from growing the exposition.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::families::Family;

/// Series one family may hold before new label sets fold into `other`.
pub const MAX_SERIES: usize = 1_000;

/// Where a family's samples go at render time: label values (in the family's label order) and the
/// value.
pub type Emit<'a> = dyn FnMut(&[&str], f64) + 'a;

/// Something that can write a family's samples.
pub trait Source: Send + Sync {
    fn family(&self) -> &'static Family;
    fn samples(&self, emit: &mut Emit<'_>);
}

/// The series of one family, in the order they are rendered: declared ones first, in the order
/// declared (so `result="hit"` comes before `"miss"` as the docs list them), then the ones that
/// appeared since, sorted by label values.
#[derive(Debug)]
struct SeriesSet<const N: usize, V> {
    declared: usize,
    series: Vec<([Box<str>; N], V)>,
}

impl<const N: usize, V: Default> SeriesSet<N, V> {
    fn new(declared: &[[&str; N]]) -> Self {
        SeriesSet {
            declared: declared.len(),
            series: declared
                .iter()
                .map(|labels| (labels.map(Box::from), V::default()))
                .collect(),
        }
    }

    /// The slot of `labels`, made when new (or the `other` slot once the family is full). A linear
    /// search: families here hold tens of series, and a lookup by `&str` allocates nothing.
    fn slot(&mut self, labels: [&str; N]) -> &mut V {
        let found = self
            .series
            .iter()
            .position(|(k, _)| k.iter().zip(labels).all(|(a, b)| **a == *b));
        let i = match found {
            Some(i) => i,
            None if self.series.len() < MAX_SERIES => self.insert(labels.map(Box::from)),
            None => {
                let other = ["other"; N];
                match self
                    .series
                    .iter()
                    .position(|(k, _)| k.iter().all(|a| &**a == "other"))
                {
                    Some(i) => i,
                    None => self.insert(other.map(Box::from)),
                }
            }
        };
        &mut self.series[i].1
    }

    /// Inserts a new series after the declared ones, keeping the rest sorted; returns its index.
    fn insert(&mut self, key: [Box<str>; N]) -> usize {
        let rest = &self.series[self.declared..];
        let at = self.declared + rest.partition_point(|(k, _)| *k < key);
        self.series.insert(at, (key, V::default()));
        at
    }

    /// Each series' label values and value, in render order.
    fn each(&self, mut f: impl FnMut(&[&str], &V)) {
        for (labels, value) in &self.series {
            let labels: [&str; N] = std::array::from_fn(|i| &*labels[i]);
            f(&labels, value);
        }
    }

    fn get(&self, labels: [&str; N]) -> Option<&V> {
        self.series
            .iter()
            .find(|(k, _)| k.iter().zip(labels).all(|(a, b)| **a == *b))
            .map(|(_, v)| v)
    }
}

/// A counter family with `N` labels.
#[derive(Clone)]
pub struct Counter<const N: usize> {
    family: &'static Family,
    set: Arc<Mutex<SeriesSet<N, u64>>>,
}

impl<const N: usize> Counter<N> {
    pub fn new(family: &'static Family) -> Self {
        Self::with_series(family, &[])
    }

    /// A counter whose `declared` series exist (at 0) from the start: an idle outcome is a 0, not
    /// a missing series, and they are rendered in this order.
    pub fn with_series(family: &'static Family, declared: &[[&str; N]]) -> Self {
        debug_assert_eq!(family.labels.len(), N, "label count of {}", family.name);
        Counter {
            family,
            set: Arc::new(Mutex::new(SeriesSet::new(declared))),
        }
    }

    pub fn inc(&self, labels: [&str; N]) {
        self.add(labels, 1);
    }

    pub fn add(&self, labels: [&str; N], n: u64) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        let slot = set.slot(labels);
        *slot = slot.saturating_add(n);
    }

    /// The series' value (0 when it does not exist).
    pub fn get(&self, labels: [&str; N]) -> u64 {
        let set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        set.get(labels).copied().unwrap_or(0)
    }
}

impl<const N: usize> Source for Counter<N> {
    fn family(&self) -> &'static Family {
        self.family
    }

    fn samples(&self, emit: &mut Emit<'_>) {
        let set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        set.each(|labels, value| emit(labels, *value as f64));
    }
}

/// A counter with no labels: one atomic, for the paths that count on every call.
#[derive(Clone)]
pub struct Total {
    family: &'static Family,
    value: Arc<AtomicU64>,
}

impl Total {
    pub fn new(family: &'static Family) -> Self {
        debug_assert!(family.labels.is_empty(), "{} has labels", family.name);
        Total {
            family,
            value: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

impl Source for Total {
    fn family(&self) -> &'static Family {
        self.family
    }

    fn samples(&self, emit: &mut Emit<'_>) {
        emit(&[], self.get() as f64);
    }
}

/// A gauge family with `N` labels, set rather than counted.
#[derive(Clone)]
pub struct Gauge<const N: usize> {
    family: &'static Family,
    set: Arc<Mutex<SeriesSet<N, f64>>>,
}

impl<const N: usize> Gauge<N> {
    pub fn new(family: &'static Family) -> Self {
        debug_assert_eq!(family.labels.len(), N, "label count of {}", family.name);
        Gauge {
            family,
            set: Arc::new(Mutex::new(SeriesSet::new(&[]))),
        }
    }

    pub fn set(&self, labels: [&str; N], value: f64) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        *set.slot(labels) = value;
    }
}

impl<const N: usize> Source for Gauge<N> {
    fn family(&self) -> &'static Family {
        self.family
    }

    fn samples(&self, emit: &mut Emit<'_>) {
        let set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        set.each(|labels, value| emit(labels, *value));
    }
}

/// A family whose samples are read from a component's state when rendered (whether the ledger is
/// writable, the MCP servers that are up): the component registers how to read them.
pub struct Collector<F> {
    family: &'static Family,
    read: F,
}

impl<F: Fn(&mut Emit<'_>) + Send + Sync> Source for Collector<F> {
    fn family(&self) -> &'static Family {
        self.family
    }

    fn samples(&self, emit: &mut Emit<'_>) {
        (self.read)(emit)
    }
}

/// The families the process (not the engine) exports, each with its one source.
#[derive(Default)]
pub struct Registry {
    sources: RwLock<Vec<Arc<dyn Source>>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Makes `source` the family's source; a component rebuilt by a reload registers again and
    /// replaces its predecessor.
    pub fn register(&self, source: impl Source + 'static) {
        let source: Arc<dyn Source> = Arc::new(source);
        let mut sources = self.sources.write().unwrap_or_else(|p| p.into_inner());
        let name = source.family().name;
        match sources.iter_mut().find(|s| s.family().name == name) {
            Some(slot) => *slot = source,
            None => sources.push(source),
        }
    }

    /// Registers a family read from state at render time.
    pub fn collect(
        &self,
        family: &'static Family,
        read: impl Fn(&mut Emit<'_>) + Send + Sync + 'static,
    ) {
        self.register(Collector { family, read });
    }

    /// The samples of `family` (none when nothing registered it).
    pub fn samples(&self, family: &Family, emit: &mut Emit<'_>) {
        let source = self
            .sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|s| s.family().name == family.name)
            .cloned();
        if let Some(source) = source {
            source.samples(emit);
        }
    }

    /// Every registered family's samples as they are now, read without holding anything else: the
    /// exposition renders this beside the engine, whose lock is then the only one held.
    pub fn snapshot(&self) -> Snapshot {
        let sources: Vec<Arc<dyn Source>> = self
            .sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let families = sources
            .iter()
            .map(|source| {
                let mut samples = Vec::new();
                source.samples(&mut |labels, value| {
                    samples.push((labels.iter().map(|l| Box::from(*l)).collect(), value));
                });
                (source.family().name, samples)
            })
            .collect();
        Snapshot { families }
    }

    /// Names of the registered families (for the test that every one is rendered).
    pub fn families(&self) -> Vec<&'static str> {
        self.sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| s.family().name)
            .collect()
    }
}

/// The registry's samples at one moment (see [`Registry::snapshot`]).
#[derive(Debug, Default)]
pub struct Snapshot {
    families: Vec<(&'static str, Vec<SnapshotSample>)>,
}

type SnapshotSample = (Box<[Box<str>]>, f64);

impl Snapshot {
    /// The samples of `family` (none when nothing registered it).
    pub fn samples(&self, family: &Family, emit: &mut Emit<'_>) {
        let Some((_, samples)) = self.families.iter().find(|(n, _)| *n == family.name) else {
            return;
        };
        for (labels, value) in samples {
            let labels: Vec<&str> = labels.iter().map(|l| &**l).collect();
            emit(&labels, *value);
        }
    }

    /// Names of the families it holds.
    pub fn families(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.families.iter().map(|(n, _)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::families as f;

    fn rendered(source: &dyn Source) -> Vec<(Vec<String>, f64)> {
        let mut out = Vec::new();
        source.samples(&mut |labels, v| {
            out.push((labels.iter().map(|s| s.to_string()).collect(), v));
        });
        out
    }

    #[test]
    fn declared_series_come_first_in_their_order_then_the_rest_sorted() {
        let c = Counter::with_series(&f::CACHE_REQUESTS_TOTAL, &[["hit"], ["miss"]]);
        c.inc(["zeta"]);
        c.add(["alpha"], 3);
        c.inc(["miss"]);
        let got = rendered(&c);
        let names: Vec<_> = got.iter().map(|(l, _)| l[0].as_str()).collect();
        assert_eq!(names, ["hit", "miss", "alpha", "zeta"]);
        assert_eq!(c.get(["alpha"]), 3);
        assert_eq!(c.get(["miss"]), 1);
        assert_eq!(c.get(["hit"]), 0);
        assert_eq!(c.get(["never"]), 0);
    }

    #[test]
    fn a_full_family_folds_new_label_sets_into_other() {
        let c = Counter::<2>::new(&f::GATEWAY_REQUESTS_TOTAL);
        for i in 0..MAX_SERIES + 50 {
            c.inc([&format!("u{i}"), "ok"]);
        }
        let got = rendered(&c);
        assert_eq!(got.len(), MAX_SERIES + 1);
        assert_eq!(c.get(["other", "other"]), 50);
        // A label set admitted before the cap still counts on its own.
        c.inc(["u1", "ok"]);
        assert_eq!(c.get(["u1", "ok"]), 2);
    }

    #[test]
    fn registering_a_family_again_replaces_its_source() {
        let registry = Registry::new();
        let a = Total::new(&f::CACHE_TOKENS_SAVED_TOTAL);
        a.add(5);
        registry.register(a);
        let b = Total::new(&f::CACHE_TOKENS_SAVED_TOTAL);
        b.add(7);
        registry.register(b);
        let mut seen = Vec::new();
        registry.samples(&f::CACHE_TOKENS_SAVED_TOTAL, &mut |_, v| seen.push(v));
        assert_eq!(seen, [7.0]);
        assert_eq!(registry.families(), ["hypertool_cache_tokens_saved_total"]);
    }
}
