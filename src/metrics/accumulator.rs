//! [`DataAccumulator`]: the data side of one (model, version, segment,
//! window): prediction volume, per-feature integrity counters and drift cell
//! counts against the reference profile, prediction drift, inference latency,
//! and confidence-based performance estimates from scores. Observing is
//! counter increments on a pre-[`Resolved`] event; everything is computed in
//! [`DataAccumulator::finish`].
//!
//! [`DataAccumulator::histograms`] exports the window's drift counts per
//! feature ([`FeatureHistogram`]); adding the histograms of several windows
//! element-wise and feeding the sum to [`DataAccumulator::from_histograms`]
//! gives, through [`DataAccumulator::finish_drift`], the same drift
//! statistics as one accumulator over all those windows' events.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::drift::{self, BinnedStats};
use super::integrity::IntegrityCounts;
use super::reference::{FeatureKind, FeatureProfile, ReferenceProfile, Resolved, Slot, SlotState};
use super::snapshot::{counts, hdr, sums};
use super::{
    push_finite, DriftConfig, DriftMethod, MetricValue, Task, FEW_DISTINCT_VALUES,
    PREDICTION_FEATURE,
};

/// Latencies above this (µs, about 12 days) are recorded as this.
const MAX_LATENCY_US: u64 = 1 << 40;
/// Equal-width score bins for the confidence-based estimates.
const CBPE_BINS: usize = 100;

/// A latency / delay histogram: 2 significant digits, resized on demand.
pub(crate) fn new_histogram() -> Histogram<u64> {
    // Constant arguments: cannot fail.
    Histogram::new(2).expect("2 significant digits is a valid histogram precision")
}

/// Data-side state of one feature (or of the prediction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FeatureState {
    integrity: IntegrityCounts,
    /// Numeric: counts per reference cell; categorical: counts per bin.
    #[serde(with = "counts")]
    cells: Vec<u64>,
    /// Numeric: sum of the values inside each interior cell.
    #[serde(with = "sums")]
    interior_sums: Vec<f64>,
    numeric: bool,
    /// Reference min / max (numeric).
    lo: f64,
    hi: f64,
    /// `sum(lo - v)` over values below the reference minimum.
    below_gap: f64,
    /// `sum(v - hi)` over values above the reference maximum.
    above_gap: f64,
}

impl FeatureState {
    fn new(p: &FeatureProfile) -> Self {
        let (cells, interior, numeric, lo, hi) = match &p.kind {
            FeatureKind::Numeric(n) => (
                n.cells.len(),
                n.interior_sums.len(),
                true,
                n.grid.first().copied().unwrap_or(0.0),
                n.grid.last().copied().unwrap_or(0.0),
            ),
            FeatureKind::Categorical(c) => (c.counts.len(), 0, false, 0.0, 0.0),
        };
        FeatureState {
            integrity: IntegrityCounts::default(),
            cells: vec![0; cells],
            interior_sums: vec![0.0; interior],
            numeric,
            lo,
            hi,
            below_gap: 0.0,
            above_gap: 0.0,
        }
    }

    #[inline]
    fn observe(&mut self, s: &Slot) {
        self.integrity.seen += 1;
        match s.state {
            SlotState::Missing => self.integrity.missing += 1,
            SlotState::NonFinite => self.integrity.non_finite += 1,
            SlotState::Mismatch => self.integrity.mismatch += 1,
            SlotState::Value => {
                let last = self.cells.len().saturating_sub(1);
                let cell = s.cell as usize;
                if let Some(c) = self.cells.get_mut(cell) {
                    *c += 1;
                }
                if self.numeric {
                    if last > 0 && cell == 0 {
                        self.integrity.out_of_range += 1;
                        self.below_gap += self.lo - s.value;
                    } else if last > 0 && cell == last {
                        self.integrity.out_of_range += 1;
                        self.above_gap += s.value - self.hi;
                    } else if cell >= 2 && cell.is_multiple_of(2) {
                        if let Some(sum) = self.interior_sums.get_mut(cell / 2 - 1) {
                            *sum += s.value;
                        }
                    }
                } else if cell == last {
                    self.integrity.new_category += 1;
                }
            }
        }
    }

    fn merge(&mut self, o: &FeatureState) {
        if self.cells.len() != o.cells.len() || self.numeric != o.numeric {
            // Built against another profile: nothing comparable to add.
            return;
        }
        self.integrity.merge(&o.integrity);
        for (a, b) in self.cells.iter_mut().zip(&o.cells) {
            *a += b;
        }
        for (a, b) in self.interior_sums.iter_mut().zip(&o.interior_sums) {
            *a += b;
        }
        self.below_gap += o.below_gap;
        self.above_gap += o.above_gap;
    }

    /// Integrity rates (when `integrity`) and drift statistics; returns the
    /// drift decision's `(test p-value, effect large enough)` when one can be
    /// made (see the drift decision in the module docs).
    fn finish(
        &self,
        p: &FeatureProfile,
        cfg: &DriftConfig,
        integrity: bool,
        scratch: &mut Scratch,
        out: &mut Vec<MetricValue>,
    ) -> Option<(f64, bool)> {
        let name = p.name.as_str();
        if integrity {
            self.integrity.finish(name, self.numeric, out);
        }
        let n = self.integrity.valid();
        if n == 0 {
            return None;
        }
        let rows = p.binned_count();
        let (method, pv, stats, normed) = match &p.kind {
            FeatureKind::Numeric(np) if self.numeric && np.cells.len() == self.cells.len() => {
                scratch.ref_bins.clear();
                scratch.ref_bins.resize(np.bin_count(), 0);
                scratch.cur_bins.clear();
                scratch.cur_bins.resize(np.bin_count(), 0);
                for (i, (&r, &c)) in np.cells.iter().zip(&self.cells).enumerate() {
                    let b = np.cell_bin.get(i).copied().unwrap_or(0) as usize;
                    scratch.ref_bins[b] += r;
                    scratch.cur_bins[b] += c;
                }
                let stats = binned(scratch, cfg)?;
                emit_binned(out, name, &stats, n);
                let reference = drift::GridSide {
                    cells: &np.cells,
                    interior_sums: &np.interior_sums,
                    below_gap: 0.0,
                    above_gap: 0.0,
                };
                let window = drift::GridSide {
                    cells: &self.cells,
                    interior_sums: &self.interior_sums,
                    below_gap: self.below_gap,
                    above_gap: self.above_gap,
                };
                let mut normed = None;
                if let Some(w) = drift::wasserstein(&np.grid, reference, window) {
                    push_finite(out, "wasserstein", name, w, n, None);
                    if np.std > 0.0 {
                        normed = Some(w / np.std).filter(|v| v.is_finite());
                        push_finite(out, "wasserstein_normed", name, w / np.std, n, None);
                    }
                }
                let d = drift::ks_statistic(&np.cells, &self.cells)?;
                let ks_p = drift::ks_p_value(d, rows, n);
                push_finite(out, "ks_statistic", name, d, n, Some(ks_p));
                let few = distinct_reference_values(&np.cells) <= FEW_DISTINCT_VALUES;
                let method = cfg.method_for(name, rows, few);
                // Chi-square on the coarse bins: asked for, or the default
                // test of a numeric feature with few distinct values.
                let pv = if method == DriftMethod::ChiSquare || (few && method != DriftMethod::Ks) {
                    let (chi2, chi_p, _) =
                        drift::chi2_contingency(&scratch.ref_bins, &scratch.cur_bins)?;
                    push_finite(out, "chi2_statistic", name, chi2, n, Some(chi_p));
                    chi_p
                } else {
                    ks_p
                };
                (method, pv, stats, normed)
            }
            FeatureKind::Categorical(cp)
                if !self.numeric && cp.counts.len() == self.cells.len() =>
            {
                scratch.ref_bins.clear();
                scratch.ref_bins.extend_from_slice(&cp.counts);
                scratch.cur_bins.clear();
                scratch.cur_bins.extend_from_slice(&self.cells);
                let stats = binned(scratch, cfg)?;
                emit_binned(out, name, &stats, n);
                let (chi2, pv, _) = drift::chi2_contingency(&cp.counts, &self.cells)?;
                push_finite(out, "chi2_statistic", name, chi2, n, Some(pv));
                (cfg.method_for(name, rows, true), pv, stats, None)
            }
            _ => return None,
        };
        if n < cfg.min_samples || !pv.is_finite() {
            return None;
        }
        let floor = stats.psi >= cfg.psi_threshold || stats.js_distance >= cfg.js_threshold;
        let large = match method {
            DriftMethod::Auto | DriftMethod::Ks | DriftMethod::ChiSquare => floor,
            DriftMethod::Wasserstein => match normed {
                Some(w) => w >= cfg.wasserstein_threshold,
                None => stats.js_distance >= cfg.js_threshold,
            },
            DriftMethod::JensenShannon => stats.js_distance >= cfg.js_threshold,
            DriftMethod::Psi => stats.psi >= cfg.psi_threshold,
        };
        Some((pv, large))
    }
}

/// Distinct values of a numeric reference as seen on its grid: non-empty
/// point-mass cells plus non-empty open cells (a lower bound, exact when
/// every reference value is a grid value).
fn distinct_reference_values(cells: &[u64]) -> usize {
    cells.iter().filter(|&&c| c > 0).count()
}

/// Reused buffers of `finish`.
#[derive(Default)]
struct Scratch {
    ref_bins: Vec<u64>,
    cur_bins: Vec<u64>,
    e: Vec<f64>,
    a: Vec<f64>,
}

fn binned(s: &mut Scratch, cfg: &DriftConfig) -> Option<BinnedStats> {
    if !drift::smoothed(&s.ref_bins, cfg.smoothing, &mut s.e)
        || !drift::smoothed(&s.cur_bins, cfg.smoothing, &mut s.a)
    {
        return None;
    }
    Some(drift::binned_stats(&s.e, &s.a))
}

fn emit_binned(out: &mut Vec<MetricValue>, name: &str, s: &BinnedStats, n: u64) {
    push_finite(out, "psi", name, s.psi, n, None);
    push_finite(out, "js_distance", name, s.js_distance, n, None);
    push_finite(out, "kl_divergence", name, s.kl_divergence, n, None);
    push_finite(out, "hellinger", name, s.hellinger, n, None);
}

/// Data side of one (model, version, segment, window): volume, integrity,
/// drift, latency.
///
/// Serialisable (every field: the state is what was observed); it is shaped
/// for the profile it was created with, which is not part of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataAccumulator {
    count: u64,
    /// Events resolved against a profile.
    resolved: u64,
    features: Vec<FeatureState>,
    prediction: Option<FeatureState>,
    /// Inference latency, µs.
    #[serde(with = "hdr")]
    latency: Histogram<u64>,
    /// Most features absent from the profile in one event.
    unknown_max: u32,
    /// `(count, sum of scores)` per equal-width score bin (allocated at the first score).
    scores: Vec<(u64, f64)>,
}

impl DataAccumulator {
    /// An empty accumulator shaped for `profile` (features and prediction).
    pub fn new(profile: Option<&ReferenceProfile>) -> Self {
        DataAccumulator {
            count: 0,
            resolved: 0,
            features: profile
                .map(|p| p.features.iter().map(FeatureState::new).collect())
                .unwrap_or_default(),
            prediction: profile
                .and_then(|p| p.prediction.as_ref())
                .map(|(_, f)| FeatureState::new(f)),
            latency: new_histogram(),
            unknown_max: 0,
            scores: Vec::new(),
        }
    }

    /// Adds one resolved event.
    #[inline]
    pub fn observe(&mut self, r: &Resolved) {
        self.count += 1;
        if let Some(ms) = r.latency_ms {
            if ms.is_finite() && ms >= 0.0 {
                let us = ((ms * 1000.0).round() as u64).min(MAX_LATENCY_US);
                // Cannot fail: auto-resize is on and the value is capped.
                let _ = self.latency.record(us);
            }
        }
        if let Some(s) = r.score.filter(|s| s.is_finite()) {
            if self.scores.is_empty() {
                self.scores = vec![(0, 0.0); CBPE_BINS];
            }
            let s = s.clamp(0.0, 1.0);
            let b = ((s * CBPE_BINS as f64) as usize).min(CBPE_BINS - 1);
            self.scores[b].0 += 1;
            self.scores[b].1 += s;
        }
        if r.resolved {
            self.resolved += 1;
            self.unknown_max = self.unknown_max.max(r.unknown_features);
            for (f, s) in self.features.iter_mut().zip(&r.features) {
                f.observe(s);
            }
            if let Some(p) = &mut self.prediction {
                p.observe(&r.prediction);
            }
        }
    }

    /// Adds `other`'s state (another partition or instance of the same key).
    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        self.resolved += other.resolved;
        self.unknown_max = self.unknown_max.max(other.unknown_max);
        // With auto-resize on, adding cannot run out of range.
        let _ = self.latency.add(&other.latency);
        if self.features.is_empty() {
            self.features = other.features.clone();
        } else {
            for (a, b) in self.features.iter_mut().zip(&other.features) {
                a.merge(b);
            }
        }
        match (&mut self.prediction, &other.prediction) {
            (Some(a), Some(b)) => a.merge(b),
            (None, Some(b)) => self.prediction = Some(b.clone()),
            _ => {}
        }
        if !other.scores.is_empty() {
            if self.scores.is_empty() {
                self.scores = vec![(0, 0.0); CBPE_BINS];
            }
            for (a, b) in self.scores.iter_mut().zip(&other.scores) {
                a.0 += b.0;
                a.1 += b.1;
            }
        }
    }

    /// Number of events observed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Computes the window's values: `prediction_count`; per feature the
    /// integrity rates and drift statistics (and for `__prediction__`);
    /// `drift_detected` per feature; `drifted_feature_count` /
    /// `drifted_feature_share` and `unknown_feature_count` at model level;
    /// `latency_p50|p95|p99` (ms).
    pub fn finish(
        &self,
        profile: Option<&ReferenceProfile>,
        cfg: &DriftConfig,
        out: &mut Vec<MetricValue>,
    ) {
        out.push(MetricValue::model(
            "prediction_count",
            self.count as f64,
            self.count,
        ));
        if !self.latency.is_empty() {
            let n = self.latency.len();
            for (metric, q) in [
                ("latency_p50", 0.5),
                ("latency_p95", 0.95),
                ("latency_p99", 0.99),
            ] {
                let us = self.latency.value_at_quantile(q);
                let v = self.latency.median_equivalent(us) as f64 / 1000.0;
                push_finite(out, metric, "", v, n, None);
            }
        }
        let Some(profile) = profile else { return };
        if self.resolved == 0 {
            return;
        }
        push_finite(
            out,
            "unknown_feature_count",
            "",
            self.unknown_max as f64,
            self.resolved,
            None,
        );
        self.finish_features(profile, cfg, true, out);
    }

    /// The drift rows of [`finish`](Self::finish) only: per-feature drift
    /// statistics, `drift_detected`, `drifted_feature_count` /
    /// `drifted_feature_share` and the `__prediction__` drift rows; no
    /// volume, latency or integrity rows. Used on an accumulator rebuilt by
    /// [`from_histograms`](Self::from_histograms) (whose model-level rows
    /// then count the largest feature's binned values as `samples`).
    pub fn finish_drift(
        &self,
        profile: &ReferenceProfile,
        cfg: &DriftConfig,
        out: &mut Vec<MetricValue>,
    ) {
        if self.resolved == 0 {
            return;
        }
        self.finish_features(profile, cfg, false, out);
    }

    /// Per-feature rows (integrity rates when `integrity`), the drift
    /// decision and the prediction's drift rows.
    fn finish_features(
        &self,
        profile: &ReferenceProfile,
        cfg: &DriftConfig,
        integrity: bool,
        out: &mut Vec<MetricValue>,
    ) {
        let mut scratch = Scratch::default();
        // (feature, valid values, raw p-value, large effect)
        let mut tests: Vec<(String, u64, f64, bool)> = Vec::new();
        for (state, fp) in self.features.iter().zip(&profile.features) {
            if let Some((p, large)) = state.finish(fp, cfg, integrity, &mut scratch, out) {
                tests.push((fp.name.clone(), state.integrity.valid(), p, large));
            }
        }
        let raw: Vec<f64> = tests.iter().map(|t| t.2).collect();
        let adjusted = drift::benjamini_hochberg(&raw);
        let mut drifted = 0u64;
        for ((name, n, _, large), adj) in tests.iter().zip(&adjusted) {
            let detected = *large && *adj < cfg.p_value_threshold;
            drifted += detected as u64;
            push_finite(
                out,
                "drift_detected",
                name,
                detected as u8 as f64,
                *n,
                Some(*adj),
            );
        }
        if !tests.is_empty() {
            out.push(MetricValue::model(
                "drifted_feature_count",
                drifted as f64,
                self.resolved,
            ));
            out.push(MetricValue::model(
                "drifted_feature_share",
                drifted as f64 / tests.len() as f64,
                self.resolved,
            ));
        }
        if let (Some(state), Some((_, fp))) = (&self.prediction, &profile.prediction) {
            let mut pred = Vec::new();
            if let Some((p, large)) = state.finish(fp, cfg, integrity, &mut scratch, &mut pred) {
                let detected = large && p < cfg.p_value_threshold;
                push_finite(
                    &mut pred,
                    "drift_detected",
                    PREDICTION_FEATURE,
                    detected as u8 as f64,
                    state.integrity.valid(),
                    Some(p),
                );
            }
            // Only drift rows for the prediction: its integrity is the model's own output.
            out.extend(pred.into_iter().filter(|v| {
                !matches!(
                    v.metric,
                    "missing_rate"
                        | "type_mismatch_rate"
                        | "nan_rate"
                        | "out_of_range_rate"
                        | "new_category_rate"
                )
            }));
        }
    }

    /// Confidence-based performance estimation (NannyML's CBPE) from the
    /// window's scores, before labels arrive: `estimated_accuracy`,
    /// `estimated_precision`, `estimated_recall`, `estimated_f1`, assuming
    /// calibrated scores. Binary tasks only; the threshold is rounded to the
    /// nearest 0.01 (scores are kept in 100 equal-width bins).
    pub fn finish_estimated(&self, task: &Task, out: &mut Vec<MetricValue>) {
        let Task::Binary { threshold, .. } = task else {
            return;
        };
        if self.scores.is_empty() {
            return;
        }
        let cut = (threshold * CBPE_BINS as f64)
            .round()
            .clamp(0.0, CBPE_BINS as f64) as usize;
        let (mut tp, mut fp, mut fn_, mut tn) = (0.0, 0.0, 0.0, 0.0);
        let mut n = 0u64;
        for (i, &(c, s)) in self.scores.iter().enumerate() {
            n += c;
            if i >= cut {
                tp += s;
                fp += c as f64 - s;
            } else {
                fn_ += s;
                tn += c as f64 - s;
            }
        }
        if n == 0 {
            return;
        }
        push_finite(out, "estimated_accuracy", "", (tp + tn) / n as f64, n, None);
        if tp + fp > 0.0 {
            push_finite(out, "estimated_precision", "", tp / (tp + fp), n, None);
        }
        if tp + fn_ > 0.0 {
            push_finite(out, "estimated_recall", "", tp / (tp + fn_), n, None);
        }
        if 2.0 * tp + fp + fn_ > 0.0 {
            push_finite(
                out,
                "estimated_f1",
                "",
                2.0 * tp / (2.0 * tp + fp + fn_),
                n,
                None,
            );
        }
    }

    /// Approximate heap bytes held (for the memory budget).
    pub fn approx_bytes(&self) -> usize {
        let feature = |f: &FeatureState| {
            std::mem::size_of::<FeatureState>()
                + f.cells.capacity() * 8
                + f.interior_sums.capacity() * 8
        };
        std::mem::size_of::<Self>()
            + self.features.iter().map(feature).sum::<usize>()
            + self.prediction.as_ref().map_or(0, feature)
            + self.latency.distinct_values() * 8
            + self.scores.capacity() * 16
    }
}

/// Layout of a [`FeatureHistogram`]'s `counts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistogramKind {
    /// A numeric feature: the reference-grid cell counts (`2 G' + 1`, `G'`
    /// distinct grid values), then the value sum inside every open interior
    /// cell (`G' - 1`), then `sum(min - v)` below and `sum(v - max)` above
    /// the reference range. The coarse drift bins are unions of cells.
    Numeric,
    /// A categorical feature: the count per reference category, then the
    /// count of every other value.
    Categorical,
}

impl HistogramKind {
    /// The stored name (`numeric` / `categorical`).
    pub fn as_str(self) -> &'static str {
        match self {
            HistogramKind::Numeric => "numeric",
            HistogramKind::Categorical => "categorical",
        }
    }

    /// The kind named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "numeric" => Some(HistogramKind::Numeric),
            "categorical" => Some(HistogramKind::Categorical),
            _ => None,
        }
    }
}

/// One feature's drift counts in one window (a row of `window_histograms`):
/// everything the drift statistics of the feature need. Histograms of the
/// same feature against the same profile add element-wise, and the sum gives
/// the statistics of the union of their windows exactly (counts are whole
/// numbers well below 2^53, exact in `f64`; value sums to rounding).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureHistogram {
    /// Feature name; [`PREDICTION_FEATURE`] for the prediction.
    pub feature: String,
    /// Layout of `counts`.
    pub kind: HistogramKind,
    /// The counts (and, numeric, value sums), see [`HistogramKind`].
    pub counts: Vec<f64>,
}

impl FeatureHistogram {
    /// Adds `other` element-wise; `false` (and nothing added) when the two do
    /// not have the same feature, kind and length.
    pub fn add(&mut self, other: &FeatureHistogram) -> bool {
        if self.feature != other.feature
            || self.kind != other.kind
            || self.counts.len() != other.counts.len()
        {
            return false;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        true
    }
}

/// Adds every histogram of `more` into `into`, by feature; a histogram whose
/// kind or length differs from the one already there (another profile) is
/// skipped and counted in the returned number.
pub fn merge_histograms<'a>(
    into: &mut Vec<FeatureHistogram>,
    more: impl IntoIterator<Item = &'a FeatureHistogram>,
) -> usize {
    let mut skipped = 0;
    for h in more {
        match into.iter_mut().find(|m| m.feature == h.feature) {
            Some(m) => skipped += usize::from(!m.add(h)),
            None => into.push(h.clone()),
        }
    }
    skipped
}

/// A stored count back to an integer (negative or non-finite: 0).
fn count_of(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

impl FeatureState {
    /// The histogram of this state, `None` without a binned value.
    fn histogram(&self, feature: &str) -> Option<FeatureHistogram> {
        if self.integrity.valid() == 0 || self.cells.iter().all(|&c| c == 0) {
            return None;
        }
        let mut counts: Vec<f64> = self.cells.iter().map(|&c| c as f64).collect();
        let kind = if self.numeric {
            counts.extend_from_slice(&self.interior_sums);
            counts.push(self.below_gap);
            counts.push(self.above_gap);
            HistogramKind::Numeric
        } else {
            HistogramKind::Categorical
        };
        Some(FeatureHistogram {
            feature: feature.to_owned(),
            kind,
            counts,
        })
    }

    /// Replaces the drift counts by `h`'s when it has this state's layout;
    /// the integrity counts become "every value binned". `false` otherwise.
    fn load(&mut self, h: &FeatureHistogram) -> bool {
        let (cells, interior) = (self.cells.len(), self.interior_sums.len());
        let want = match (self.numeric, h.kind) {
            (true, HistogramKind::Numeric) => cells + interior + 2,
            (false, HistogramKind::Categorical) => cells,
            _ => return false,
        };
        if h.counts.len() != want {
            return false;
        }
        for (c, &v) in self.cells.iter_mut().zip(&h.counts) {
            *c = count_of(v);
        }
        if self.numeric {
            let rest = &h.counts[cells..];
            self.interior_sums.copy_from_slice(&rest[..interior]);
            self.below_gap = rest[interior];
            self.above_gap = rest[interior + 1];
        }
        self.integrity = IntegrityCounts {
            seen: self.cells.iter().sum(),
            ..IntegrityCounts::default()
        };
        true
    }
}

impl DataAccumulator {
    /// The window's drift counts per feature and for the prediction (only
    /// those with at least one binned value), against `profile`, the profile
    /// this accumulator was created with. Empty without a profile.
    pub fn histograms(&self, profile: Option<&ReferenceProfile>) -> Vec<FeatureHistogram> {
        let Some(profile) = profile else {
            return Vec::new();
        };
        let mut out: Vec<FeatureHistogram> = self
            .features
            .iter()
            .zip(&profile.features)
            .filter_map(|(state, fp)| state.histogram(&fp.name))
            .collect();
        if let Some(h) = self
            .prediction
            .as_ref()
            .and_then(|p| p.histogram(PREDICTION_FEATURE))
        {
            out.push(h);
        }
        out
    }

    /// An accumulator holding the drift counts of `histograms` (e.g. the
    /// element-wise sum over several windows) against `profile`, for
    /// [`finish_drift`](Self::finish_drift). Histograms of unknown features
    /// or of another layout (another profile) are left out; the second value
    /// counts them.
    pub fn from_histograms(
        profile: &ReferenceProfile,
        histograms: &[FeatureHistogram],
    ) -> (Self, usize) {
        let mut acc = DataAccumulator::new(Some(profile));
        let mut skipped = 0;
        for h in histograms {
            let state = if h.feature == PREDICTION_FEATURE {
                acc.prediction.as_mut()
            } else {
                profile
                    .features
                    .iter()
                    .position(|f| f.name == h.feature)
                    .and_then(|i| acc.features.get_mut(i))
            };
            let loaded = state.and_then(|s| s.load(h).then(|| s.integrity.valid()));
            match loaded {
                Some(n) => acc.resolved = acc.resolved.max(n),
                None => skipped += 1,
            }
        }
        acc.count = acc.resolved;
        (acc, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ReferenceBuilder;
    use crate::model::{Entries, FeatureValue, PredictionEvent};

    fn ev(x: Option<f64>, c: Option<&str>, score: f64) -> PredictionEvent {
        let mut f = Vec::new();
        if let Some(x) = x {
            f.push(("x".to_owned(), FeatureValue::Double(x)));
        }
        if let Some(c) = c {
            f.push(("c".to_owned(), FeatureValue::String(c.to_owned())));
        }
        PredictionEvent {
            features: Entries(f),
            score: Some(score),
            latency_ms: Some(2.0),
            ..Default::default()
        }
    }

    fn get<'a>(out: &'a [MetricValue], metric: &str, feature: &str) -> Option<&'a MetricValue> {
        out.iter()
            .find(|v| v.metric == metric && v.feature == feature)
    }

    fn profile() -> ReferenceProfile {
        let mut b = ReferenceBuilder::new(&DriftConfig::default());
        for i in 0..1000 {
            let c = ["a", "b", "c", "d"][i % 4];
            b.observe(&ev(Some(i as f64), Some(c), (i % 100) as f64 / 100.0));
        }
        b.build()
    }

    /// Rows `finish_drift` emits, from a full `finish` output.
    fn drift_rows(out: &[MetricValue]) -> Vec<&MetricValue> {
        const NOT_DRIFT: &[&str] = &[
            "prediction_count",
            "latency_p50",
            "latency_p95",
            "latency_p99",
            "unknown_feature_count",
            "missing_rate",
            "type_mismatch_rate",
            "nan_rate",
            "out_of_range_rate",
            "new_category_rate",
        ];
        out.iter()
            .filter(|v| !NOT_DRIFT.contains(&v.metric))
            .collect()
    }

    #[test]
    fn merged_histograms_give_the_drift_of_the_union_of_windows() {
        let p = profile();
        let cfg = DriftConfig::default();
        let mut r = Resolved::default();
        let (mut a, mut b, mut union) = (
            DataAccumulator::new(Some(&p)),
            DataAccumulator::new(Some(&p)),
            DataAccumulator::new(Some(&p)),
        );
        for i in 0..400 {
            // A: close to the reference, a few missing values and values below its range.
            let x = (i % 10 != 0).then_some(i as f64 * 2.3 - 40.0);
            p.resolve(&ev(x, Some(["a", "b", "c"][i % 3]), 0.3), &mut r);
            a.observe(&r);
            union.observe(&r);
            // B: shifted up past the reference maximum, an unseen category.
            let c = if i % 4 == 0 { "zz" } else { "d" };
            p.resolve(&ev(Some(i as f64 * 1.7 + 500.0), Some(c), 0.8), &mut r);
            b.observe(&r);
            union.observe(&r);
        }
        let (ha, hb) = (a.histograms(Some(&p)), b.histograms(Some(&p)));
        assert_eq!(ha.len(), 3, "x, c and the prediction: {ha:?}");
        let mut merged = Vec::new();
        assert_eq!(merge_histograms(&mut merged, ha.iter().chain(&hb)), 0);
        let (rebuilt, skipped) = DataAccumulator::from_histograms(&p, &merged);
        assert_eq!(skipped, 0);
        let mut got = Vec::new();
        rebuilt.finish_drift(&p, &cfg, &mut got);
        let mut full = Vec::new();
        union.finish(Some(&p), &cfg, &mut full);
        let want = drift_rows(&full);
        assert_eq!(got.len(), want.len(), "{got:?}\n{want:?}");
        for w in want {
            let g = get(&got, w.metric, &w.feature)
                .unwrap_or_else(|| panic!("{} {} missing", w.metric, w.feature));
            let tol = 1e-12 * w.value.abs().max(1.0);
            assert!(
                (g.value - w.value).abs() <= tol,
                "{} {}: {} vs {}",
                w.metric,
                w.feature,
                g.value,
                w.value
            );
            match (g.p_value, w.p_value) {
                (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-12, "{} p", w.metric),
                (x, y) => assert_eq!(x, y, "{} {}", w.metric, w.feature),
            }
            if !w.feature.is_empty() {
                assert_eq!(g.samples, w.samples, "{} {}", w.metric, w.feature);
            }
        }
        // The union drifted and says so: the statistics are not averages.
        assert_eq!(get(&got, "drift_detected", "x").unwrap().value, 1.0);
        let psi = |acc: &DataAccumulator| {
            let mut o = Vec::new();
            acc.finish(Some(&p), &cfg, &mut o);
            get(&o, "psi", "x").unwrap().value
        };
        let mean = (psi(&a) + psi(&b)) / 2.0;
        let union_psi = get(&got, "psi", "x").unwrap().value;
        assert!((union_psi - mean).abs() > 0.1, "{union_psi} vs mean {mean}");
        // A histogram of another layout is left out, not mixed in.
        let mut bad = merged.clone();
        bad[0].counts.pop();
        assert_eq!(DataAccumulator::from_histograms(&p, &bad).1, 1);
        assert!(!bad[0].add(&merged[0]));
        assert_eq!(
            HistogramKind::parse("numeric"),
            Some(HistogramKind::Numeric)
        );
        assert_eq!(
            HistogramKind::parse(HistogramKind::Categorical.as_str()),
            Some(HistogramKind::Categorical)
        );
    }

    #[test]
    fn stationary_window_has_no_drift_and_shifted_window_does() {
        let p = profile();
        let cfg = DriftConfig::default();
        let mut r = Resolved::default();
        let mut same = DataAccumulator::new(Some(&p));
        let mut shifted = DataAccumulator::new(Some(&p));
        for i in 0..1000 {
            let c = ["a", "b", "c", "d"][i % 4];
            p.resolve(
                &ev(Some(i as f64 + 0.5), Some(c), (i % 100) as f64 / 100.0),
                &mut r,
            );
            same.observe(&r);
            p.resolve(&ev(Some(i as f64 + 600.0), Some("e"), 0.9), &mut r);
            shifted.observe(&r);
        }
        let mut out = Vec::new();
        same.finish(Some(&p), &cfg, &mut out);
        assert_eq!(get(&out, "prediction_count", "").unwrap().value, 1000.0);
        assert!(get(&out, "psi", "x").unwrap().value < 0.01);
        assert_eq!(get(&out, "drift_detected", "x").unwrap().value, 0.0);
        assert_eq!(get(&out, "drift_detected", "c").unwrap().value, 0.0);
        assert_eq!(get(&out, "drifted_feature_count", "").unwrap().value, 0.0);
        assert!(get(&out, "wasserstein", "x").unwrap().value < 1.0);
        // only 999.5 is above the reference max 999
        assert_eq!(get(&out, "out_of_range_rate", "x").unwrap().value, 0.001);
        assert!((get(&out, "latency_p50", "").unwrap().value - 2.0).abs() < 0.02);
        out.clear();
        shifted.finish(Some(&p), &cfg, &mut out);
        assert!(get(&out, "psi", "x").unwrap().value > 1.0);
        assert_eq!(get(&out, "drift_detected", "x").unwrap().value, 1.0);
        assert_eq!(get(&out, "drift_detected", "c").unwrap().value, 1.0);
        assert_eq!(get(&out, "new_category_rate", "c").unwrap().value, 1.0);
        // 600 of the shifted values (1000..=1599) are above the reference max (999)
        assert_eq!(get(&out, "out_of_range_rate", "x").unwrap().value, 0.6);
        // shift of 600: exact on the out-of-range part, interpolated inside
        let w = get(&out, "wasserstein", "x").unwrap().value;
        assert!((w - 600.0).abs() / 600.0 < 0.01, "{w}");
        assert!((get(&out, "ks_statistic", "x").unwrap().value - 0.6).abs() < 0.005);
        assert_eq!(get(&out, "drifted_feature_count", "").unwrap().value, 2.0);
        assert_eq!(get(&out, "drifted_feature_share", "").unwrap().value, 1.0);
        assert_eq!(
            get(&out, "drift_detected", PREDICTION_FEATURE)
                .unwrap()
                .value,
            1.0
        );
        assert!(get(&out, "missing_rate", PREDICTION_FEATURE).is_none());
    }

    #[test]
    fn missing_and_unresolved_events_are_counted_apart() {
        let p = profile();
        let mut r = Resolved::default();
        let mut acc = DataAccumulator::new(Some(&p));
        p.resolve(&ev(None, Some("a"), 0.2), &mut r);
        acc.observe(&r);
        p.resolve(&ev(Some(f64::NAN), Some("a"), 0.2), &mut r);
        acc.observe(&r);
        Resolved::without_profile(&ev(Some(1.0), Some("a"), 0.2), &mut r);
        acc.observe(&r);
        let mut out = Vec::new();
        acc.finish(Some(&p), &DriftConfig::default(), &mut out);
        assert_eq!(get(&out, "prediction_count", "").unwrap().value, 3.0);
        assert_eq!(get(&out, "missing_rate", "x").unwrap().value, 0.5);
        assert_eq!(get(&out, "nan_rate", "x").unwrap().value, 0.5);
        assert_eq!(get(&out, "missing_rate", "c").unwrap().value, 0.0);
        assert!(get(&out, "psi", "x").is_none(), "no valid values");
        assert!(
            get(&out, "drift_detected", "c").is_none(),
            "below min_samples"
        );
        assert!(out.iter().all(|v| v.value.is_finite()));
    }

    #[test]
    fn estimated_performance_from_calibrated_scores() {
        let mut acc = DataAccumulator::new(None);
        let mut r = Resolved::default();
        for s in [0.9, 0.8, 0.3, 0.1] {
            Resolved::without_profile(&ev(None, None, s), &mut r);
            acc.observe(&r);
        }
        let mut out = Vec::new();
        acc.finish_estimated(
            &Task::Binary {
                positive_label: "1".into(),
                threshold: 0.5,
            },
            &mut out,
        );
        // E[TP] = 1.7, E[FP] = 0.3, E[FN] = 0.4, E[TN] = 1.6
        let v = |m: &str| get(&out, m, "").unwrap().value;
        assert!((v("estimated_accuracy") - 3.3 / 4.0).abs() < 1e-12);
        assert!((v("estimated_precision") - 1.7 / 2.0).abs() < 1e-12);
        assert!((v("estimated_recall") - 1.7 / 2.1).abs() < 1e-12);
        assert!((v("estimated_f1") - 3.4 / 4.1).abs() < 1e-12);
    }
}

#[cfg(test)]
mod decision_tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Normal};

    use super::*;
    use crate::metrics::ReferenceBuilder;
    use crate::model::{Entries, FeatureValue, PredictionEvent};

    const CATS: [&str; 4] = ["a", "b", "c", "d"];

    /// An event of 20 numeric features (N(shift, 1)) and 5 categorical ones.
    fn event(rng: &mut StdRng, shift: f64) -> PredictionEvent {
        let normal = Normal::new(shift, 1.0).expect("valid normal");
        let mut f = Vec::with_capacity(25);
        for i in 0..20 {
            f.push((format!("n{i}"), FeatureValue::Double(normal.sample(rng))));
        }
        for i in 0..5 {
            let c = CATS[rng.gen_range(0..CATS.len())];
            f.push((format!("c{i}"), FeatureValue::String(c.to_owned())));
        }
        PredictionEvent {
            features: Entries(f),
            ..Default::default()
        }
    }

    fn profile(rng: &mut StdRng, rows: usize) -> ReferenceProfile {
        let mut b = ReferenceBuilder::new(&DriftConfig::default());
        for _ in 0..rows {
            b.observe(&event(rng, 0.0));
        }
        b.build()
    }

    fn window(
        rng: &mut StdRng,
        p: &ReferenceProfile,
        cfg: &DriftConfig,
        n: usize,
        shift: f64,
    ) -> Vec<MetricValue> {
        let mut acc = DataAccumulator::new(Some(p));
        let mut r = Resolved::default();
        for _ in 0..n {
            p.resolve(&event(rng, shift), &mut r);
            acc.observe(&r);
        }
        let mut out = Vec::new();
        acc.finish(Some(p), cfg, &mut out);
        out
    }

    fn detected(out: &[MetricValue], feature: &str) -> f64 {
        out.iter()
            .find(|v| v.metric == "drift_detected" && v.feature == feature)
            .map_or(f64::NAN, |v| v.value)
    }

    #[test]
    fn auto_method_follows_reference_size_and_overrides_win() {
        let mut rng = StdRng::seed_from_u64(7);
        // A small but real shift (0.15 sd) in a big window: normed Wasserstein
        // about 0.15, PSI about 0.02, JS about 0.07.
        let big = profile(&mut rng, 5000);
        let small = profile(&mut rng, 500);
        let cfg = DriftConfig::default();
        let out = window(&mut rng, &big, &cfg, 5000, 0.15);
        assert_eq!(
            detected(&out, "n0"),
            1.0,
            "auto = wasserstein above 1000 rows"
        );
        // the same reference counted as small: auto = ks, below the effect floor
        let as_small = DriftConfig {
            large_reference_rows: 10_000,
            ..Default::default()
        };
        let out = window(&mut rng, &big, &as_small, 5000, 0.15);
        assert_eq!(
            detected(&out, "n0"),
            0.0,
            "auto = ks: below the effect floor"
        );
        let mut cfg = DriftConfig::default();
        cfg.method_overrides.insert("n0".into(), DriftMethod::Ks);
        cfg.method_overrides.insert("n1".into(), DriftMethod::Psi);
        cfg.method_overrides
            .insert("n2".into(), DriftMethod::ChiSquare);
        let out = window(&mut rng, &big, &cfg, 5000, 0.15);
        assert_eq!(detected(&out, "n0"), 0.0);
        assert_eq!(detected(&out, "n1"), 0.0);
        assert_eq!(detected(&out, "n2"), 0.0);
        assert_eq!(detected(&out, "n3"), 1.0);
        // chi_square on a numeric feature tests its coarse bins
        assert!(out
            .iter()
            .any(|v| v.metric == "chi2_statistic" && v.feature == "n2"));
        assert!(!out
            .iter()
            .any(|v| v.metric == "chi2_statistic" && v.feature == "n3"));
        // a global method applies to every feature without an override
        let cfg = DriftConfig {
            method: DriftMethod::Ks,
            ..Default::default()
        };
        let out = window(&mut rng, &big, &cfg, 5000, 0.15);
        assert_eq!(detected(&out, "n3"), 0.0);
        // a large shift is drift whatever the method
        for m in [
            DriftMethod::Ks,
            DriftMethod::ChiSquare,
            DriftMethod::Wasserstein,
            DriftMethod::JensenShannon,
            DriftMethod::Psi,
        ] {
            let cfg = DriftConfig {
                method: m,
                ..Default::default()
            };
            let out = window(&mut rng, &small, &cfg, 300, 1.5);
            assert_eq!(detected(&out, "n5"), 1.0, "{m:?}");
        }
    }

    #[test]
    fn method_resolution_and_few_distinct_values() {
        let cfg = DriftConfig::default();
        assert_eq!(cfg.method_for("x", 1000, false), DriftMethod::Ks);
        assert_eq!(cfg.method_for("x", 1001, false), DriftMethod::Wasserstein);
        assert_eq!(cfg.method_for("x", 1000, true), DriftMethod::ChiSquare);
        assert_eq!(cfg.method_for("x", 1001, true), DriftMethod::JensenShannon);
        // a numeric feature with 3 distinct values is tested with chi-square
        let mut b = ReferenceBuilder::new(&cfg);
        let ev = |v: i64| PredictionEvent {
            features: Entries(vec![("k".to_owned(), FeatureValue::Long(v))]),
            ..Default::default()
        };
        for i in 0..300 {
            b.observe(&ev(i % 3));
        }
        let p = b.build();
        let mut acc = DataAccumulator::new(Some(&p));
        let mut r = Resolved::default();
        for i in 0..300 {
            p.resolve(&ev(if i % 2 == 0 { 0 } else { 2 }), &mut r);
            acc.observe(&r);
        }
        let mut out = Vec::new();
        acc.finish(Some(&p), &cfg, &mut out);
        let chi2 = out
            .iter()
            .find(|v| v.metric == "chi2_statistic" && v.feature == "k")
            .expect("chi-square row");
        // table [[100, 100, 100], [150, 0, 150]]: expected 125 / 50 / 125 per column
        let want = 2.0 * (25.0f64.powi(2) / 125.0) * 2.0 + 2.0 * 50.0f64.powi(2) / 50.0;
        assert!((chi2.value - want).abs() < 1e-9, "{}", chi2.value);
        assert_eq!(detected(&out, "k"), 1.0);
    }

    #[test]
    fn stationary_streams_rarely_raise_drift() {
        let mut rng = StdRng::seed_from_u64(11);
        let cfg = DriftConfig::default();
        for (rows, window_size) in [(5000, 200), (5000, 40), (500, 200), (500, 40)] {
            let p = profile(&mut rng, rows);
            let (mut flagged, mut decided, mut windows_flagged) = (0u32, 0u32, 0u32);
            let windows = 60;
            for _ in 0..windows {
                let out = window(&mut rng, &p, &cfg, window_size, 0.0);
                let d: Vec<f64> = out
                    .iter()
                    .filter(|v| v.metric == "drift_detected")
                    .map(|v| v.value)
                    .collect();
                decided += d.len() as u32;
                let f = d.iter().filter(|&&v| v == 1.0).count() as u32;
                flagged += f;
                windows_flagged += (f > 0) as u32;
            }
            assert_eq!(decided, windows * 25, "every feature decided");
            // Benjamini-Hochberg at 0.05 under the global null: about 5 % of
            // windows with any flag at most; the effect floor cuts that
            // further when windows are large.
            assert!(
                flagged as f64 / decided as f64 <= 0.005,
                "rows {rows}, window {window_size}: {flagged} of {decided}"
            );
            // Seeded: 2, 6, 1 and 2 flags of 1500 here.
            assert!(
                windows_flagged <= 6,
                "{windows_flagged} of {windows} windows"
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod proptests {
    use proptest::prelude::*;

    use super::*;
    use crate::metrics::ReferenceBuilder;
    use crate::model::{Entries, FeatureValue, PredictionEvent};

    /// Asserts two `finish()` outputs are the same rows with values within 1e-9.
    pub(crate) fn assert_same(a: &[MetricValue], b: &[MetricValue]) {
        assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
        for (x, y) in a.iter().zip(b) {
            assert_eq!(
                (x.metric, &x.feature, x.samples),
                (y.metric, &y.feature, y.samples)
            );
            let close = |u: f64, v: f64| (u - v).abs() <= 1e-9 * u.abs().max(v.abs()).max(1e-3);
            assert!(close(x.value, y.value), "{x:?} vs {y:?}");
            match (x.p_value, y.p_value) {
                (Some(p), Some(q)) => assert!(close(p, q), "{x:?} vs {y:?}"),
                (None, None) => {}
                _ => panic!("p-value presence differs: {x:?} vs {y:?}"),
            }
        }
    }

    /// Every value and p-value is finite and every metric name is in [`names::ALL`](crate::metrics::names::ALL).
    pub(crate) fn assert_finite(out: &[MetricValue]) {
        for v in out {
            assert!(
                crate::metrics::names::is_known(v.metric),
                "unlisted metric {}",
                v.metric
            );
            assert!(v.value.is_finite(), "{v:?}");
            assert!(v.p_value.is_none_or(f64::is_finite), "{v:?}");
        }
    }

    type Ev = (Option<f64>, Option<u8>, Option<f64>, Option<f64>);

    fn event((x, c, score, latency): &Ev) -> PredictionEvent {
        let mut f = Vec::new();
        if let Some(x) = x {
            f.push(("x".to_owned(), FeatureValue::Double(*x)));
        }
        match c {
            Some(7) => f.push(("c".to_owned(), FeatureValue::Long(1))),
            Some(c) => f.push(("c".to_owned(), FeatureValue::String(format!("k{c}")))),
            None => f.push(("c".to_owned(), FeatureValue::Null)),
        }
        f.push(("extra".to_owned(), FeatureValue::Bool(true)));
        PredictionEvent {
            features: Entries(f),
            score: *score,
            latency_ms: *latency,
            ..Default::default()
        }
    }

    fn ev_strategy() -> impl Strategy<Value = Ev> {
        (
            prop::option::of(prop_oneof![
                8 => -50.0..150.0f64,
                1 => Just(f64::NAN),
                1 => Just(25.0),
            ]),
            prop::option::of(0u8..8),
            prop::option::of(0.0..1.0f64),
            prop::option::of(0.0..500.0f64),
        )
    }

    fn profile(reference: &[Ev]) -> ReferenceProfile {
        let mut b = ReferenceBuilder::new(&DriftConfig::default());
        for e in reference {
            let mut ev = event(e);
            ev.features.0.retain(|(k, _)| k != "extra");
            b.observe(&ev);
        }
        b.build()
    }

    fn run(p: Option<&ReferenceProfile>, events: &[Ev]) -> DataAccumulator {
        let mut acc = DataAccumulator::new(p);
        let mut r = Resolved::default();
        for e in events {
            match p {
                Some(p) => p.resolve(&event(e), &mut r),
                None => Resolved::without_profile(&event(e), &mut r),
            }
            acc.observe(&r);
        }
        acc
    }

    fn finish(acc: &DataAccumulator, p: Option<&ReferenceProfile>) -> Vec<MetricValue> {
        let mut out = Vec::new();
        acc.finish(p, &DriftConfig::default(), &mut out);
        acc.finish_estimated(
            &Task::Binary {
                positive_label: "1".into(),
                threshold: 0.5,
            },
            &mut out,
        );
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn merge_equals_observing_the_concatenation(
            reference in prop::collection::vec(ev_strategy(), 0..120),
            events in prop::collection::vec(ev_strategy(), 0..200),
            split in 0usize..200,
            with_profile in any::<bool>(),
        ) {
            let p = profile(&reference);
            let p = with_profile.then_some(&p);
            let k = split.min(events.len());
            let whole = run(p, &events);
            let mut a = run(p, &events[..k]);
            a.merge(&run(p, &events[k..]));
            let (x, y) = (finish(&whole, p), finish(&a, p));
            assert_finite(&x);
            assert_same(&x, &y);
            prop_assert_eq!(a.count(), events.len() as u64);
            // merging into an accumulator created without a profile keeps everything
            let mut empty = DataAccumulator::new(None);
            empty.merge(&whole);
            assert_same(&finish(&empty, p), &x);
        }

        #[test]
        fn degenerate_inputs_give_finite_values(
            constant in -1e6..1e6f64,
            n_ref in 0usize..50,
            n_cur in 0usize..50,
            category in 0u8..7,
        ) {
            // constant numeric feature and a single category on both sides
            let reference: Vec<Ev> = (0..n_ref).map(|_| (Some(constant), Some(category), Some(1.0), None)).collect();
            let p = profile(&reference);
            let cur: Vec<Ev> = (0..n_cur).map(|i| (Some(constant + (i % 2) as f64), Some(category), Some(0.0), Some(0.0))).collect();
            let acc = run(Some(&p), &cur);
            let out = finish(&acc, Some(&p));
            assert_finite(&out);
            prop_assert!(out.iter().any(|v| v.metric == "prediction_count"));
            for method in [
                DriftMethod::Ks,
                DriftMethod::ChiSquare,
                DriftMethod::Wasserstein,
                DriftMethod::JensenShannon,
                DriftMethod::Psi,
            ] {
                let cfg = DriftConfig { method, ..Default::default() };
                let mut out = Vec::new();
                acc.finish(Some(&p), &cfg, &mut out);
                assert_finite(&out);
            }
        }
    }
}
