//! Reference profiles: what "normal" looks like for one (model, version), and
//! the one-time resolution of an event against it.
//!
//! [`ReferenceBuilder`] collects reference events (an imported file or the
//! first N production events) and [`ReferenceBuilder::build`] computes exact
//! quantiles and category frequencies into a [`ReferenceProfile`], which is
//! serialisable (stored as JSON). [`ReferenceProfile::resolve`] maps each
//! feature value of an event to its bin index once ([`Resolved`]), so the same
//! event updates several accumulators (one per segment) with plain counter
//! increments and no allocation. The binning conventions are in the
//! [module docs](super).

use std::collections::HashMap;

use ahash::RandomState;
use serde::{Deserialize, Serialize};

use super::quantile::quantile_sorted;
use super::snapshot::sorted_map;
use super::DriftConfig;
use crate::model::{FeatureValue, PredictionEvent};

pub(crate) type FastMap<K, V> = HashMap<K, V, RandomState>;

/// Most coarse bins per numeric feature.
const MAX_BINS: usize = 1000;
/// Most reference quantiles in the fine grid.
const MAX_GRID: usize = 10_000;

/// Reference distribution of one numeric feature on a fine quantile grid.
///
/// Cells: `0` holds values below the grid minimum; for the `i`-th distinct
/// grid value `g_i`, cell `2i + 1` holds values equal to `g_i` and cell
/// `2i + 2` values strictly between `g_i` and `g_(i+1)` (for the last grid
/// value: above the maximum). So there are `2 * grid.len() + 1` cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumericProfile {
    /// Distinct reference quantiles at `j / G`, ascending (first = min, last = max).
    pub grid: Vec<f64>,
    /// Distinct coarse cut points (reference quantiles at `i / bins`), ascending.
    pub cuts: Vec<f64>,
    /// Reference counts per cell.
    pub cells: Vec<u64>,
    /// Sum of the reference values inside each open interior cell `(grid[i], grid[i + 1])`.
    pub interior_sums: Vec<f64>,
    /// Mean of the finite reference values.
    pub mean: f64,
    /// Population standard deviation (ddof 0) of the finite reference values.
    pub std: f64,
    /// Coarse bin of each cell (derived from `grid` and `cuts`).
    #[serde(skip)]
    pub(crate) cell_bin: Vec<u16>,
    /// Equal-width lookup over `[grid[0], grid[last]]` narrowing the grid
    /// search to a few points (derived from `grid`).
    #[serde(skip)]
    lookup: GridLookup,
}

/// Equal-width buckets over the grid's range: `first[b]` is the number of
/// grid points whose bucket is below `b` (`first` has one entry more than
/// there are buckets).
///
/// Exact by construction: the bucket function is monotone (a rounded
/// subtraction and a multiplication by a positive constant, then a
/// saturating truncation), and the table is built by applying that same
/// function to the grid points. So every grid point of a lower bucket than
/// `v`'s is `< v`, every one of a higher bucket is `> v`, and only the grid
/// points of `v`'s own bucket need comparing.
#[derive(Debug, Clone, Default, PartialEq)]
struct GridLookup {
    lo: f64,
    scale: f64,
    first: Vec<u32>,
}

impl GridLookup {
    /// Most buckets per feature (the table stays within a few KiB).
    const MAX_BUCKETS: usize = 1024;

    fn new(grid: &[f64]) -> Self {
        let (Some(&lo), Some(&hi)) = (grid.first(), grid.last()) else {
            return GridLookup::default();
        };
        if grid.len() < 8 || u32::try_from(grid.len()).is_err() {
            // Too small to be worth a table (or too large to index with u32).
            return GridLookup::default();
        }
        let buckets = (2 * grid.len()).next_power_of_two().min(Self::MAX_BUCKETS);
        let mut t = GridLookup {
            lo,
            // A range overflowing to infinity gives scale 0: one bucket, still exact.
            scale: buckets as f64 / (hi - lo),
            first: Vec::with_capacity(buckets + 1),
        };
        let mut below = 0usize;
        for b in 0..=buckets {
            while below < grid.len() && t.bucket(grid[below], buckets) < b {
                below += 1;
            }
            t.first.push(below as u32);
        }
        t
    }

    /// The bucket of `v`, in `0..buckets`.
    #[inline]
    fn bucket(&self, v: f64, buckets: usize) -> usize {
        // `as` saturates (and maps NaN to 0), keeping the function monotone.
        (((v - self.lo) * self.scale) as usize).min(buckets - 1)
    }

    /// Number of grid points `<= v`, or `None` without a table.
    #[inline]
    fn count_le(&self, grid: &[f64], v: f64) -> Option<usize> {
        let buckets = self.first.len().checked_sub(1).filter(|&b| b > 0)?;
        let b = self.bucket(v, buckets);
        let (start, end) = (self.first[b] as usize, self.first[b + 1] as usize);
        let points = grid.get(start..end)?;
        Some(start + count_le(points, v))
    }
}

impl NumericProfile {
    fn from_sorted(sorted: &[f64], bins: usize, grid_size: usize) -> Self {
        let per_bin = grid_size.div_ceil(bins).max(1);
        let g = bins * per_bin;
        let mut full = Vec::with_capacity(g + 1);
        for j in 0..=g {
            if let Some(q) = quantile_sorted(sorted, j as f64 / g as f64) {
                full.push(q);
            }
        }
        let mut cuts: Vec<f64> = if full.is_empty() {
            Vec::new()
        } else {
            (1..bins).map(|i| full[i * per_bin]).collect()
        };
        cuts.dedup();
        full.dedup();
        let n = sorted.len() as f64;
        let (mean, std) = if sorted.is_empty() {
            (0.0, 0.0)
        } else {
            let mean = sorted.iter().sum::<f64>() / n;
            let var = sorted.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            (mean, var.sqrt())
        };
        let mut p = NumericProfile {
            cells: vec![0; 2 * full.len() + 1],
            interior_sums: vec![0.0; full.len().saturating_sub(1)],
            grid: full,
            cuts,
            mean,
            std,
            cell_bin: Vec::new(),
            lookup: GridLookup::default(),
        };
        for &v in sorted {
            let c = p.cell(v);
            p.cells[c as usize] += 1;
            if let Some(i) = p.interior(c) {
                p.interior_sums[i] += v;
            }
        }
        p.index();
        p
    }

    /// The cell of a finite value.
    #[inline]
    pub fn cell(&self, v: f64) -> u32 {
        let k = self
            .lookup
            .count_le(&self.grid, v)
            .unwrap_or_else(|| count_le(&self.grid, v));
        if k == 0 {
            0
        } else if v == self.grid[k - 1] {
            (2 * k - 1) as u32
        } else {
            (2 * k) as u32
        }
    }

    /// The interior-cell index of a cell strictly between two grid values.
    #[inline]
    pub fn interior(&self, cell: u32) -> Option<usize> {
        let c = cell as usize;
        (c >= 2 && c.is_multiple_of(2) && c < 2 * self.grid.len()).then(|| c / 2 - 1)
    }

    /// Number of coarse drift bins.
    pub fn bin_count(&self) -> usize {
        self.cuts.len() + 1
    }

    /// True for the cells outside `[min, max]` of the reference.
    #[inline]
    pub fn out_of_range(&self, cell: u32) -> bool {
        !self.grid.is_empty() && (cell == 0 || cell as usize == 2 * self.grid.len())
    }

    fn index(&mut self) {
        let mut cell_bin = Vec::with_capacity(self.cells.len());
        cell_bin.push(0u16);
        for &g in &self.grid {
            let b = self.cuts.partition_point(|&c| c <= g) as u16;
            cell_bin.push(b);
            cell_bin.push(b);
        }
        self.cell_bin = cell_bin;
        self.lookup = GridLookup::new(&self.grid);
    }

    fn validate(&self) -> Result<(), String> {
        let sorted = |v: &[f64]| v.windows(2).all(|w| w[0] < w[1]);
        if !self.grid.iter().chain(&self.cuts).all(|v| v.is_finite())
            || !sorted(&self.grid)
            || !sorted(&self.cuts)
        {
            return Err("numeric grid / cuts must be finite and strictly ascending".into());
        }
        if self.cells.len() != 2 * self.grid.len() + 1
            || self.interior_sums.len() != self.grid.len().saturating_sub(1)
        {
            return Err("numeric cells must have 2 * grid + 1 entries, sums grid - 1".into());
        }
        if self.cuts.len() >= u16::MAX as usize {
            return Err("too many cut points".into());
        }
        Ok(())
    }
}

/// Number of elements `<= v` of an ascending slice: a branchless binary
/// search (conditional moves instead of unpredictable branches; this is the
/// hot loop of per-event resolution).
#[inline]
fn count_le(sorted: &[f64], v: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let mut base = 0usize;
    let mut len = sorted.len();
    while len > 1 {
        let half = len / 2;
        // Arithmetic select: the compiler keeps this branch-free.
        base += half * usize::from(sorted[base + half] <= v);
        len -= half;
    }
    base + (sorted[base] <= v) as usize
}

/// Reference distribution of one categorical feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoricalProfile {
    /// Kept categories, most frequent first.
    pub categories: Vec<String>,
    /// Reference counts per category, plus a last entry for every other value.
    pub counts: Vec<u64>,
    /// Category → index (derived from `categories`).
    #[serde(skip)]
    pub(crate) index: FastMap<Box<str>, u32>,
}

impl CategoricalProfile {
    pub(crate) fn from_counts(counts: &FastMap<String, u64>, max_categories: usize) -> Self {
        let mut all: Vec<(&String, u64)> = counts.iter().map(|(k, &v)| (k, v)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let kept = all.len().min(max_categories.max(1));
        let other: u64 = all[kept..].iter().map(|(_, c)| c).sum();
        let mut p = CategoricalProfile {
            categories: all[..kept].iter().map(|(k, _)| (*k).clone()).collect(),
            counts: all[..kept]
                .iter()
                .map(|(_, c)| *c)
                .chain(std::iter::once(other))
                .collect(),
            index: FastMap::default(),
        };
        p.reindex();
        p
    }

    /// Rebuilds the category index from `categories`.
    pub(crate) fn reindex(&mut self) {
        self.index = self
            .categories
            .iter()
            .enumerate()
            .map(|(i, c)| (Box::from(c.as_str()), i as u32))
            .collect();
    }

    /// The bin of a category (the last bin for unknown categories).
    #[inline]
    pub fn bin(&self, v: &str) -> u32 {
        self.index
            .get(v)
            .copied()
            .unwrap_or(self.categories.len() as u32)
    }

    /// The "other / unseen" bin.
    pub fn other_bin(&self) -> u32 {
        self.categories.len() as u32
    }
}

/// How a feature is binned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FeatureKind {
    /// Numbers (long / double).
    Numeric(NumericProfile),
    /// Strings and booleans.
    Categorical(CategoricalProfile),
}

/// Reference profile of one feature (or of the prediction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureProfile {
    /// Feature name (`__prediction__` for the prediction).
    pub name: String,
    /// Reference values that were null or absent.
    pub missing: u64,
    /// Binning and reference distribution.
    pub kind: FeatureKind,
}

impl FeatureProfile {
    /// Number of reference values binned (finite numbers / categories).
    pub fn binned_count(&self) -> u64 {
        match &self.kind {
            FeatureKind::Numeric(n) => n.cells.iter().sum(),
            FeatureKind::Categorical(c) => c.counts.iter().sum(),
        }
    }

    fn validate(&mut self) -> Result<(), String> {
        match &mut self.kind {
            FeatureKind::Numeric(n) => {
                n.validate().map_err(|e| format!("{}: {e}", self.name))?;
                n.index();
            }
            FeatureKind::Categorical(c) => {
                if c.counts.len() != c.categories.len() + 1 {
                    return Err(format!(
                        "{}: counts must have categories + 1 entries",
                        self.name
                    ));
                }
                c.reindex();
            }
        }
        Ok(())
    }

    #[inline]
    fn resolve_value(&self, v: &FeatureValue) -> Slot {
        match (&self.kind, v) {
            (_, FeatureValue::Null) => Slot::MISSING,
            (FeatureKind::Numeric(n), FeatureValue::Long(x)) => Slot::numeric(n, *x as f64),
            (FeatureKind::Numeric(n), FeatureValue::Double(x)) => Slot::numeric(n, *x),
            (FeatureKind::Categorical(c), FeatureValue::String(s)) => Slot::category(c.bin(s)),
            (FeatureKind::Categorical(c), FeatureValue::Bool(b)) => {
                Slot::category(c.bin(if *b { "true" } else { "false" }))
            }
            _ => Slot::MISMATCH,
        }
    }
}

/// Which prediction field the `__prediction__` profile describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionSource {
    /// `score` (binary classifiers).
    Score,
    /// `predicted_value` (regression).
    PredictedValue,
    /// `predicted_label` (multiclass).
    PredictedLabel,
}

/// Reference profile of one (model, version); serialised as JSON for storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ProfileData")]
pub struct ReferenceProfile {
    /// Number of reference events.
    pub sample_count: u64,
    /// Coarse numeric bins requested at build time.
    pub bins: usize,
    /// Per-feature profiles, in order of first appearance.
    pub features: Vec<FeatureProfile>,
    /// The prediction's profile and its source field, when predictions carried one.
    pub prediction: Option<(PredictionSource, FeatureProfile)>,
    #[serde(skip)]
    index: FastMap<Box<str>, u32>,
}

/// The stored form of a profile, validated into a [`ReferenceProfile`].
#[derive(Deserialize)]
struct ProfileData {
    sample_count: u64,
    bins: usize,
    features: Vec<FeatureProfile>,
    prediction: Option<(PredictionSource, FeatureProfile)>,
}

impl TryFrom<ProfileData> for ReferenceProfile {
    type Error = String;
    fn try_from(d: ProfileData) -> Result<Self, String> {
        let mut p = ReferenceProfile {
            sample_count: d.sample_count,
            bins: d.bins,
            features: d.features,
            prediction: d.prediction,
            index: FastMap::default(),
        };
        for f in &mut p.features {
            f.validate()?;
        }
        if let Some((_, f)) = &mut p.prediction {
            f.validate()?;
        }
        p.reindex();
        Ok(p)
    }
}

impl ReferenceProfile {
    fn reindex(&mut self) {
        self.index = self
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| (Box::from(f.name.as_str()), i as u32))
            .collect();
    }

    /// Feature names, in profile order.
    pub fn feature_names(&self) -> impl Iterator<Item = &str> {
        self.features.iter().map(|f| f.name.as_str())
    }

    /// Resolves an event against this profile into `out` (cleared first):
    /// per feature its cell / category bin or why it has none, the
    /// prediction's bin, latency and score. Does not allocate once `out` has
    /// grown to the profile's size.
    pub fn resolve(&self, ev: &PredictionEvent, out: &mut Resolved) {
        Resolved::without_profile(ev, out);
        out.resolved = true;
        out.features.resize(self.features.len(), Slot::MISSING);
        let mut unknown = 0u32;
        for (pos, (name, value)) in ev.features.0.iter().enumerate() {
            // Events usually list features in the reference's order: try that first.
            let idx = match self.features.get(pos) {
                Some(f) if f.name == *name => Some(pos),
                _ => self.index.get(name.as_str()).map(|&i| i as usize),
            };
            match idx {
                Some(i) => out.features[i] = self.features[i].resolve_value(value),
                None => unknown += 1,
            }
        }
        out.unknown_features = unknown;
        if let Some((source, f)) = &self.prediction {
            let number = |v: Option<f64>| {
                v.map_or(Slot::MISSING, |v| f.resolve_value(&FeatureValue::Double(v)))
            };
            out.prediction = match source {
                PredictionSource::Score => number(ev.score),
                PredictionSource::PredictedValue => number(ev.predicted_value),
                PredictionSource::PredictedLabel => match (&f.kind, &ev.predicted_label) {
                    (_, None) => Slot::MISSING,
                    (FeatureKind::Categorical(c), Some(l)) => Slot::category(c.bin(l)),
                    (FeatureKind::Numeric(_), Some(_)) => Slot::MISMATCH,
                },
            };
        }
    }
}

/// Why a feature has no bin, or its bin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SlotState {
    /// Null or absent.
    #[default]
    Missing,
    /// NaN or infinite number.
    NonFinite,
    /// A value of the wrong type for the profile (string for a numeric feature, ...).
    Mismatch,
    /// Binned: `cell` is valid.
    Value,
}

/// One resolved feature value.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Slot {
    pub(crate) state: SlotState,
    /// Numeric cell or categorical bin.
    pub(crate) cell: u32,
    /// The numeric value (for the out-of-range Wasserstein tails).
    pub(crate) value: f64,
}

impl Slot {
    const MISSING: Slot = Slot {
        state: SlotState::Missing,
        cell: 0,
        value: 0.0,
    };
    const MISMATCH: Slot = Slot {
        state: SlotState::Mismatch,
        cell: 0,
        value: 0.0,
    };

    #[inline]
    fn numeric(p: &NumericProfile, v: f64) -> Slot {
        if v.is_finite() {
            Slot {
                state: SlotState::Value,
                cell: p.cell(v),
                value: v,
            }
        } else {
            Slot {
                state: SlotState::NonFinite,
                cell: 0,
                value: 0.0,
            }
        }
    }

    #[inline]
    fn category(bin: u32) -> Slot {
        Slot {
            state: SlotState::Value,
            cell: bin,
            value: 0.0,
        }
    }
}

/// Scratch produced by [`ReferenceProfile::resolve`]; reuse one across events.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// One slot per profile feature (empty without a profile).
    pub(crate) features: Vec<Slot>,
    /// The prediction's slot.
    pub(crate) prediction: Slot,
    /// Inference latency (ms).
    pub(crate) latency_ms: Option<f64>,
    /// Positive-class probability.
    pub(crate) score: Option<f64>,
    /// Features of the event absent from the profile.
    pub(crate) unknown_features: u32,
    /// True when resolved against a profile.
    pub(crate) resolved: bool,
}

impl Resolved {
    /// Resolves an event when there is no profile yet: only the count,
    /// latency and score are kept.
    pub fn without_profile(ev: &PredictionEvent, out: &mut Resolved) {
        out.features.clear();
        out.prediction = Slot::MISSING;
        out.latency_ms = ev.latency_ms;
        out.score = ev.score;
        out.unknown_features = 0;
        out.resolved = false;
    }
}

/// Per-feature state of a [`ReferenceBuilder`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BuilderFeature {
    name: String,
    numbers: Vec<f64>,
    non_finite: u64,
    #[serde(serialize_with = "sorted_map")]
    categories: FastMap<String, u64>,
    categorical: u64,
}

impl BuilderFeature {
    /// Counts `v`; false when it was a new category beyond `max_categories`
    /// distinct ones (counted as categorical, but not by value).
    fn observe(&mut self, v: &FeatureValue, max_categories: usize) -> bool {
        match v {
            FeatureValue::Null => true,
            FeatureValue::Long(x) => {
                self.numbers.push(*x as f64);
                true
            }
            FeatureValue::Double(x) if x.is_finite() => {
                self.numbers.push(*x);
                true
            }
            FeatureValue::Double(_) => {
                self.non_finite += 1;
                true
            }
            FeatureValue::Bool(b) => {
                self.category(if *b { "true" } else { "false" }, max_categories)
            }
            FeatureValue::String(s) => self.category(s, max_categories),
        }
    }

    fn category(&mut self, s: &str, max_categories: usize) -> bool {
        self.categorical += 1;
        let room = self.categories.len() < max_categories;
        match self.categories.get_mut(s) {
            Some(c) => *c += 1,
            None if room => {
                self.categories.insert(s.to_owned(), 1);
            }
            // Beyond the bound: the value cannot be kept without memory
            // growing with the input, so it is left out of the counts (a
            // value first seen this late is rarely among the most frequent).
            None => return false,
        }
        true
    }

    /// The profile: numeric when numbers are at least as frequent as categories.
    fn build(&self, total: u64, cfg: &DriftConfig) -> FeatureProfile {
        let numeric_n = self.numbers.len() as u64 + self.non_finite;
        let kind = if numeric_n >= self.categorical {
            let mut sorted = self.numbers.clone();
            sorted.sort_by(f64::total_cmp);
            // Bounds keep bin indices in u16 and a hostile config from
            // allocating gigabytes per window.
            let bins = cfg.bins.clamp(1, MAX_BINS);
            FeatureKind::Numeric(NumericProfile::from_sorted(
                &sorted,
                bins,
                cfg.quantile_grid.clamp(bins, MAX_GRID),
            ))
        } else {
            let mut p = CategoricalProfile::from_counts(&self.categories, cfg.max_categories);
            // Values left out by `max_reference_categories` still belong
            // to the distribution: in the bin of every other value.
            let counted: u64 = self.categories.values().sum();
            if let Some(other) = p.counts.last_mut() {
                *other += self.categorical.saturating_sub(counted);
            }
            FeatureKind::Categorical(p)
        };
        let present = self.numbers.len() as u64 + self.non_finite + self.categorical;
        FeatureProfile {
            name: self.name.clone(),
            missing: total.saturating_sub(present),
            kind,
        }
    }
}

/// What [`ReferenceBuilder::observe`] left out of a reference, by bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeftOut {
    /// Features beyond `max_reference_features`.
    pub features: u64,
    /// New categories beyond `max_reference_categories`.
    pub categories: u64,
}

/// Collects reference events and builds a [`ReferenceProfile`] from exact
/// quantiles. Keeps every value: meant for reference-sized samples.
///
/// Serialisable without its configuration (a deserialised builder has the
/// default [`DriftConfig`] until [`ReferenceBuilder::set_config`]) and
/// without its feature index (rebuilt).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "BuilderData")]
pub struct ReferenceBuilder {
    #[serde(skip)]
    cfg: DriftConfig,
    count: u64,
    features: Vec<BuilderFeature>,
    #[serde(skip)]
    index: FastMap<String, usize>,
    scores: BuilderFeature,
    values: BuilderFeature,
    labels: BuilderFeature,
}

/// The stored form of a [`ReferenceBuilder`]: the serialised fields, in order.
#[derive(Deserialize)]
struct BuilderData {
    count: u64,
    features: Vec<BuilderFeature>,
    scores: BuilderFeature,
    values: BuilderFeature,
    labels: BuilderFeature,
}

impl From<BuilderData> for ReferenceBuilder {
    fn from(d: BuilderData) -> Self {
        let index = d
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
        ReferenceBuilder {
            cfg: DriftConfig::default(),
            count: d.count,
            features: d.features,
            index,
            scores: d.scores,
            values: d.values,
            labels: d.labels,
        }
    }
}

impl ReferenceBuilder {
    /// An empty builder using `cfg`'s bins, grid and category cap.
    pub fn new(cfg: &DriftConfig) -> Self {
        let named = |n: &str| BuilderFeature {
            name: n.to_owned(),
            ..Default::default()
        };
        ReferenceBuilder {
            cfg: cfg.clone(),
            count: 0,
            features: Vec::new(),
            index: FastMap::default(),
            scores: named(super::PREDICTION_FEATURE),
            values: named(super::PREDICTION_FEATURE),
            labels: named(super::PREDICTION_FEATURE),
        }
    }

    /// Adds one reference event.
    ///
    /// Bounded by the configuration: at most `max_reference_features`
    /// features and `max_reference_categories` values per categorical
    /// feature; what is left out is returned, for the caller to count.
    pub fn observe(&mut self, ev: &PredictionEvent) -> LeftOut {
        self.count += 1;
        let mut left_out = LeftOut::default();
        let max_categories = self.cfg.max_reference_categories;
        for (name, value) in ev.features.iter() {
            let i = match self.index.get(name) {
                Some(&i) => i,
                None if self.features.len() >= self.cfg.max_reference_features => {
                    left_out.features += 1;
                    continue;
                }
                None => {
                    self.features.push(BuilderFeature {
                        name: name.to_owned(),
                        ..Default::default()
                    });
                    self.index.insert(name.to_owned(), self.features.len() - 1);
                    self.features.len() - 1
                }
            };
            if !self.features[i].observe(value, max_categories) {
                left_out.categories += 1;
            }
        }
        if let Some(s) = ev.score {
            self.scores
                .observe(&FeatureValue::Double(s), max_categories);
        }
        if let Some(v) = ev.predicted_value {
            self.values
                .observe(&FeatureValue::Double(v), max_categories);
        }
        if let Some(l) = &ev.predicted_label {
            if !self.labels.category(l, max_categories) {
                left_out.categories += 1;
            }
        }
        left_out
    }

    /// Number of events observed.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Builds with `cfg`'s bins, grid and category cap from now on (the
    /// configuration is not serialised: a restored builder gets it back here).
    pub fn set_config(&mut self, cfg: &DriftConfig) {
        self.cfg = cfg.clone();
    }

    /// True before the first event.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The profile: exact quantiles and category counts of the observed values.
    pub fn build(&self) -> ReferenceProfile {
        let features = self
            .features
            .iter()
            .map(|f| f.build(self.count, &self.cfg))
            .collect();
        let pred_n = |f: &BuilderFeature| f.numbers.len() as u64 + f.non_finite + f.categorical;
        let prediction = if pred_n(&self.scores) > 0 {
            Some((
                PredictionSource::Score,
                self.scores.build(self.count, &self.cfg),
            ))
        } else if pred_n(&self.values) > 0 {
            Some((
                PredictionSource::PredictedValue,
                self.values.build(self.count, &self.cfg),
            ))
        } else if pred_n(&self.labels) > 0 {
            Some((
                PredictionSource::PredictedLabel,
                self.labels.build(self.count, &self.cfg),
            ))
        } else {
            None
        };
        let mut p = ReferenceProfile {
            sample_count: self.count,
            bins: self.cfg.bins,
            features,
            prediction,
            index: FastMap::default(),
        };
        p.reindex();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_builder_keeps_at_most_its_bounds_and_says_what_it_left_out() {
        let cfg = DriftConfig {
            max_reference_features: 2,
            max_reference_categories: 3,
            ..DriftConfig::default()
        };
        let mut b = ReferenceBuilder::new(&cfg);
        let mut left_out = LeftOut::default();
        for i in 0..10 {
            let ev = PredictionEvent {
                features: crate::model::Entries(vec![
                    ("c".into(), FeatureValue::String(format!("v{}", i % 5))),
                    ("x".into(), FeatureValue::Double(i as f64)),
                    (format!("extra{i}"), FeatureValue::Double(1.0)),
                ]),
                predicted_label: Some(format!("l{i}")),
                ..Default::default()
            };
            let l = b.observe(&ev);
            left_out.features += l.features;
            left_out.categories += l.categories;
        }
        // Every event brought one feature too many; values v3, v4 (twice
        // each) and labels l3..l9 came after three distinct ones were kept.
        assert_eq!(
            left_out,
            LeftOut {
                features: 10,
                categories: 4 + 7
            }
        );
        let p = b.build();
        let names: Vec<&str> = p.features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["c", "x"]);
        match &p.features[0].kind {
            FeatureKind::Categorical(c) => {
                assert_eq!(c.categories, ["v0", "v1", "v2"]);
                // Each kept value seen twice; the rest of the mass in "other".
                assert_eq!(c.counts, [2, 2, 2, 4]);
            }
            other => panic!("expected a categorical profile, got {other:?}"),
        }
    }
    use crate::model::Entries;

    pub(crate) fn event(features: Vec<(&str, FeatureValue)>) -> PredictionEvent {
        PredictionEvent {
            features: Entries(
                features
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn numeric(p: &ReferenceProfile, i: usize) -> &NumericProfile {
        match &p.features[i].kind {
            FeatureKind::Numeric(n) => n,
            FeatureKind::Categorical(_) => panic!("expected numeric"),
        }
    }

    #[test]
    fn numeric_profile_uses_numpy_quantiles_and_right_closed_cuts() {
        let cfg = DriftConfig {
            bins: 4,
            quantile_grid: 4,
            ..Default::default()
        };
        let mut b = ReferenceBuilder::new(&cfg);
        for v in [1.0, 2.0, 3.0, 4.0, 5.0] {
            b.observe(&event(vec![("x", FeatureValue::Double(v))]));
        }
        let p = b.build();
        let n = numeric(&p, 0);
        // np.quantile([1,2,3,4,5], [0,.25,.5,.75,1]) = [1,2,3,4,5]
        assert_eq!(n.grid, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(n.cuts, vec![2.0, 3.0, 4.0]);
        // every reference value sits exactly on a grid point
        assert_eq!(n.cells, vec![0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]);
        assert_eq!(n.cell(0.5), 0);
        assert_eq!(n.cell(2.0), 3);
        assert_eq!(n.cell(2.5), 4);
        assert_eq!(n.cell(9.0), 10);
        assert!(n.out_of_range(0) && n.out_of_range(10) && !n.out_of_range(9));
        // bins: searchsorted(cuts, v, 'right'): 1 -> 0, 2 -> 1, 2.5 -> 1, 5 -> 3, 9 -> 3
        assert_eq!(n.cell_bin[n.cell(1.0) as usize], 0);
        assert_eq!(n.cell_bin[n.cell(2.0) as usize], 1);
        assert_eq!(n.cell_bin[n.cell(2.5) as usize], 1);
        assert_eq!(n.cell_bin[n.cell(5.0) as usize], 3);
        assert_eq!(n.cell_bin[n.cell(9.0) as usize], 3);
        assert_eq!(n.mean, 3.0);
        assert!((n.std - 2f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn count_le_agrees_with_partition_point() {
        let g: Vec<f64> = (0..37).map(|i| (i / 2) as f64).collect();
        for v in [-1.0, 0.0, 0.5, 3.0, 17.5, 18.0, 100.0, f64::NAN] {
            assert_eq!(count_le(&g, v), g.partition_point(|&x| x <= v), "{v}");
        }
        assert_eq!(count_le(&[], 1.0), 0);
        assert_eq!(count_le(&[1.0], 1.0), 1);
    }

    #[test]
    fn grid_lookup_agrees_with_the_full_search() {
        let check = |grid: Vec<f64>| {
            let t = GridLookup::new(&grid);
            assert!(!t.first.is_empty(), "table built for {} points", grid.len());
            let (lo, hi) = (grid[0], grid[grid.len() - 1]);
            let mut probes = vec![f64::NAN, f64::MIN, f64::MAX, lo, hi];
            for &g in &grid {
                probes.extend([g, g.next_up(), g.next_down(), g + (hi - lo) / 1e3]);
            }
            for k in 0..=1000 {
                probes.push(lo + (hi - lo) * k as f64 / 1000.0);
            }
            for v in probes {
                let full = count_le(&grid, v);
                assert_eq!(t.count_le(&grid, v).unwrap_or(full), full, "{v}");
            }
        };
        // uniform, clustered (heavy tail), a range that overflows, ties at the ends
        check((0..201).map(|i| i as f64 * 0.37 - 5.0).collect());
        check(
            (0..201)
                .map(|i| if i < 200 { i as f64 * 1e-6 } else { 1e12 })
                .collect(),
        );
        check(
            (0..50)
                .map(|i| -1e308 + i as f64 * 4e306)
                .chain([1e308])
                .collect(),
        );
        check((0..9).map(|i| (i * i) as f64).collect());
    }

    #[test]
    fn ties_are_deduplicated() {
        let cfg = DriftConfig::default();
        let mut b = ReferenceBuilder::new(&cfg);
        for i in 0..100 {
            b.observe(&event(vec![("x", FeatureValue::Long(i % 3))]));
        }
        let p = b.build();
        let n = numeric(&p, 0);
        // 34 zeros, 33 ones, 33 twos: the cuts at .1 ... .9 are 0, 1 or 2
        assert_eq!(n.cuts, vec![0.0, 1.0, 2.0]);
        assert_eq!(n.bin_count(), 4);
        // the grid also holds values interpolated between ties (numpy "linear")
        assert!(n.grid.windows(2).all(|w| w[0] < w[1]));
        let at = |v: f64| n.cells[n.cell(v) as usize];
        assert_eq!((at(0.0), at(1.0), at(2.0)), (34, 33, 33));
        assert_eq!(n.cells.iter().sum::<u64>(), 100);
    }

    #[test]
    fn categorical_profile_caps_categories_and_resolves_unseen() {
        let cfg = DriftConfig {
            max_categories: 2,
            ..Default::default()
        };
        let mut b = ReferenceBuilder::new(&cfg);
        for c in ["a", "a", "a", "b", "b", "c"] {
            b.observe(&event(vec![("c", FeatureValue::String(c.into()))]));
        }
        b.observe(&event(vec![("c", FeatureValue::Null)]));
        let p = b.build();
        let FeatureKind::Categorical(c) = &p.features[0].kind else {
            panic!("expected categorical")
        };
        assert_eq!(c.categories, vec!["a", "b"]);
        assert_eq!(c.counts, vec![3, 2, 1]);
        assert_eq!(p.features[0].missing, 1);
        assert_eq!(c.bin("b"), 1);
        assert_eq!(c.bin("zzz"), 2);
    }

    #[test]
    fn resolve_handles_order_missing_types_and_unknown_features() {
        let cfg = DriftConfig::default();
        let mut b = ReferenceBuilder::new(&cfg);
        for i in 0..50 {
            let mut e = event(vec![
                ("x", FeatureValue::Double(i as f64)),
                (
                    "c",
                    FeatureValue::String(if i % 2 == 0 { "a" } else { "b" }.into()),
                ),
            ]);
            e.score = Some(i as f64 / 50.0);
            b.observe(&e);
        }
        let p = b.build();
        assert_eq!(p.feature_names().collect::<Vec<_>>(), vec!["x", "c"]);
        let mut r = Resolved::default();
        let mut e = event(vec![
            ("c", FeatureValue::Bool(true)),
            ("new", FeatureValue::Long(1)),
            ("x", FeatureValue::String("oops".into())),
        ]);
        e.score = Some(0.99);
        e.latency_ms = Some(3.0);
        p.resolve(&e, &mut r);
        assert!(r.resolved);
        assert_eq!(r.features[0].state, SlotState::Mismatch);
        assert_eq!(r.features[1].state, SlotState::Value);
        assert_eq!(r.features[1].cell, 2, "'true' is unseen: other bin");
        assert_eq!(r.unknown_features, 1);
        assert_eq!(r.prediction.state, SlotState::Value);
        assert_eq!(r.latency_ms, Some(3.0));
        p.resolve(&event(vec![("x", FeatureValue::Double(f64::NAN))]), &mut r);
        assert_eq!(r.features[0].state, SlotState::NonFinite);
        assert_eq!(r.features[1].state, SlotState::Missing);
        assert_eq!(r.prediction.state, SlotState::Missing);
    }

    #[test]
    fn profile_round_trips_through_json_and_rejects_corruption() {
        let cfg = DriftConfig::default();
        let mut b = ReferenceBuilder::new(&cfg);
        for i in 0..40 {
            let mut e = event(vec![
                ("x", FeatureValue::Double((i * 7 % 13) as f64)),
                ("c", FeatureValue::String(format!("k{}", i % 4))),
            ]);
            e.predicted_label = Some(format!("l{}", i % 3));
            b.observe(&e);
        }
        let p = b.build();
        let json = serde_json::to_string(&p).unwrap();
        let back: ReferenceProfile = serde_json::from_str(&json).unwrap();
        // serde_json without its `float_roundtrip` feature may parse a float
        // one ulp off: compare grids within 1e-15, the rest exactly.
        let (a, b) = (numeric(&back, 0), numeric(&p, 0));
        assert_eq!(a.grid.len(), b.grid.len());
        for (x, y) in a.grid.iter().zip(&b.grid) {
            assert!((x - y).abs() <= 1e-15 * y.abs().max(1.0));
        }
        assert_eq!(
            (&a.cells, &a.cuts, &a.cell_bin),
            (&b.cells, &b.cuts, &b.cell_bin)
        );
        assert_eq!(back.features[1], p.features[1]);
        assert_eq!(back.prediction, p.prediction);
        assert_eq!(back.feature_names().collect::<Vec<_>>(), vec!["x", "c"]);
        assert_eq!(
            back.prediction.as_ref().unwrap().0,
            PredictionSource::PredictedLabel
        );
        let bad = json.replacen("\"cells\":[", "\"cells\":[1,", 1);
        assert!(serde_json::from_str::<ReferenceProfile>(&bad).is_err());
    }
}
