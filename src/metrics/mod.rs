//! The statistics core: pure, mergeable accumulators (no I/O, no async, no
//! logging, no clock).
//!
//! What lives here and how the pieces fit:
//!
//! - [`reference`]: the [`ReferenceProfile`] of one (model, version), built by
//!   [`ReferenceBuilder`] from reference events; [`ReferenceProfile::resolve`]
//!   turns an event into per-feature bin indices once ([`Resolved`]).
//! - [`accumulator`]: [`DataAccumulator`], the data side of one (model,
//!   version, segment, window): volume, integrity, drift, latency.
//! - [`performance`]: [`OutcomeAccumulator`], the outcome side, revised as
//!   labels arrive: classification and regression quality, label delay.
//! - [`drift`]: the drift statistics on binned distributions (PSI, JS, KL,
//!   Hellinger, KS, Wasserstein, chi-square) and the drift decision.
//! - [`integrity`]: per-feature integrity counters.
//! - [`labels`]: label drift (`__label__`) against a reference label
//!   distribution made of the first labels of a version.
//! - [`detectors`]: ADWIN and Page-Hinkley change detectors on the ordered
//!   per-label error stream of a (model, version) (River's semantics).
//! - [`quantile`]: exact reference quantiles and a mergeable relative-error
//!   quantile sketch.
//! - [`names`]: the metric names written to `window_metrics`.
//! - [`snapshot`]: the serialisation of the aggregator's state
//!   ([`aggregator::Aggregator::snapshot`] / [`aggregator::Aggregator::restore`]).
//!
//! Every accumulator is mergeable: `a.merge(&b)` gives the same `finish()`
//! output (to floating-point rounding) as observing `a`'s and `b`'s events in
//! one accumulator, so partial states from several partitions or instances
//! combine exactly. `finish()` never emits NaN or infinity: a value that is
//! undefined for the window (precision without positive predictions, drift
//! without samples) is left out.
//!
//! # Statistical conventions
//!
//! **Numeric binning.** The reference profile keeps a fine grid of reference
//! quantiles at `j / G` for `j = 0..=G` (`G = bins * ceil(quantile_grid /
//! bins)`, numpy's default "linear" quantile definition, duplicates removed).
//! The coarse drift bins use the cut points at `i / bins` (`i = 1..bins`), i.e.
//! the grid values at `j = i * G / bins`, duplicates removed: a value `v` falls
//! in bin `#{cuts <= v}` (numpy `searchsorted(cuts, v, side="right")`), so
//! values below the reference minimum fall in the first bin and values above
//! the maximum in the last. With ties in the reference some bins may be empty
//! or hold more than `1 / bins` of the reference; reference proportions are
//! always the observed reference counts per bin, never assumed equal.
//!
//! **Categorical binning.** One bin per reference category (the
//! `max_categories` most frequent; ties broken by name), plus one bin for
//! every other value: categories unseen in the reference, and the reference's
//! own least frequent categories beyond the cap (their reference mass goes in
//! that bin). Booleans are the categories `"true"` / `"false"`.
//!
//! **Smoothing.** Every binned statistic (PSI, JS, KL, Hellinger) uses
//! smoothed proportions, the same for reference and window: with `k` bins,
//! counts `c_i` and total `n`, `p_i = (c_i / n + s) / (1 + k * s)` with
//! `s = smoothing` (default `1e-4`) added to every bin, so no bin is zero and
//! the proportions still sum to one.
//!
//! **Statistics.** `psi = sum((a - e) * ln(a / e))`; `js_distance` is the
//! Jensen-Shannon distance in base 2 (scipy `jensenshannon(e, a, base=2)`,
//! in `[0, 1]`); `kl_divergence = sum(a * ln(a / e))` (window relative to
//! reference, nats); `hellinger = sqrt(1 - sum(sqrt(a * e)))` (in `[0, 1]`);
//! `a` = window proportions, `e` = reference proportions. `ks_statistic` is
//! the two-sample Kolmogorov-Smirnov statistic between the reference and the
//! window, evaluated exactly at every reference grid value (point masses
//! included), so it is within the reference mass of one grid cell (about
//! `1 / G`) of scipy's `ks_2samp`; its p-value is the asymptotic Kolmogorov
//! distribution with Stephens' small-sample correction at `n_e = n m / (n +
//! m)`. `wasserstein` is the 1-Wasserstein distance (scipy
//! `wasserstein_distance`) on the same grid: each side keeps the sum of its
//! values inside every grid cell, so the integral of each CDF over a cell is
//! exact; only in the few cells where the two CDFs cross is the gap modelled
//! (one step with the exact signed integral); values outside the reference
//! range are exact. `wasserstein_normed` divides it by the reference
//! standard deviation (population, ddof 0). `chi2_statistic` is Pearson's chi-square
//! of the 2 x k contingency table (reference counts, window counts) over the
//! categorical bins that are non-empty in either (scipy `chi2_contingency`
//! with `correction=False`), p-value from the chi-square distribution with
//! `k' - 1` degrees of freedom.
//!
//! Per numeric feature and window the accumulator holds `2 G + 1` cell
//! counts and `G` cell sums (about 4.8 KiB at the default `G = 200`).
//!
//! **Drift decision** (`drift_detected`, 0 / 1 per feature). Each feature
//! is decided by one method: its entry in `method_overrides`, else `method`;
//! `auto` follows Evidently's rules by feature type and reference size:
//!
//! | feature | reference rows <= `large_reference_rows` (1000) | above |
//! |---|---|---|
//! | numeric | `ks` | `wasserstein` (normed) |
//! | categorical, or numeric with <= 5 distinct reference values | `chi_square` | `jensen_shannon` |
//!
//! A feature is drifted when the window has at least `min_samples` values,
//! the method's **effect size** is large enough, and the feature's **test**
//! p-value, Benjamini-Hochberg-adjusted across the window's features, is
//! below `p_value_threshold`:
//!
//! - `ks` / `chi_square` (tests): the test is KS (numeric) or chi-square
//!   (categorical; for numeric features `chi_square` tests the coarse bins
//!   and adds a `chi2_statistic` row); the effect floor is
//!   `psi >= psi_threshold` or `js_distance >= js_threshold`.
//! - `wasserstein` / `jensen_shannon` / `psi` (distances): the effect is
//!   `wasserstein_normed >= wasserstein_threshold` (0.1), `js_distance >=
//!   js_threshold` (0.1) or `psi >= psi_threshold` (0.2); the test is the
//!   feature's default one (KS numeric, chi-square categorical or few
//!   distinct values). `wasserstein` on a categorical feature, or on a
//!   constant reference (no standard deviation), uses Jensen-Shannon.
//!
//! Why both everywhere: with many samples a p-value flags shifts too small
//! to matter, which the effect floor stops; with few samples a distance is
//! noisy (the expected Wasserstein distance between two samples of one
//! distribution shrinks only as `1 / sqrt(n)`), which the corrected p-value
//! stops, and the Benjamini-Hochberg correction keeps many features from
//! flagging chance. `drift_detected` carries the adjusted p-value;
//! `__prediction__` is decided alone with its raw p-value and is not
//! counted in `drifted_feature_count` / `drifted_feature_share`.

//!
//! **Confidence intervals.** Every rate that is a proportion of trials —
//! `accuracy`, `precision`, `recall`, `fpr`, `specificity` (binary),
//! `accuracy` and the per-class `precision` / `recall` (multiclass), and
//! `label_coverage` — comes with its 95 % Wilson score interval as two more
//! rows, `<metric>_ci_low` and `<metric>_ci_high`, same feature, `samples` =
//! the number of trials (the rate's denominator), as statsmodels
//! `proportion_confint(count, nobs, method="wilson")`. Wilson rather than the
//! normal approximation because windows are often small and rates near 0 or 1,
//! where the normal interval collapses or leaves `[0, 1]`. `f1` and the
//! estimated rates are not proportions of trials and have no interval.
//!
//! **Label drift** (`feature = '__label__'`): the window's actual labels
//! against a reference label distribution made of the first
//! `label_reference_size` labels of the version; classes (binary:
//! positive / negative) or equal-frequency bins of regression targets; see
//! [`labels`] for the reference, binning and decision.
//!
//! **Change detectors** (`adwin_drift`, `page_hinkley_drift`): one ADWIN and
//! one Page-Hinkley detector per (model, version), River's defaults (see
//! [`detectors`]), fed with the error of every evaluable labeled outcome:
//! 0 / 1 for classification (wrong class), the absolute error for
//! regression. They are fed window by window as windows become final, in a
//! canonical order (prediction time, error, label), so the rows do not
//! depend on how partitions interleave (a replay writes the same ones).
//! Each detection is counted in the window of the prediction whose label
//! triggered it, on the all-traffic row (segment `''`) only; `samples` is
//! the number of errors of that window fed to the detectors. The rows are
//! written at the window's final revision.

pub mod accumulator;
pub mod aggregator;
pub mod detectors;
pub mod drift;
pub mod integrity;
pub mod labels;
pub mod names;
pub mod performance;
pub mod quantile;
pub mod reference;
pub mod snapshot;

#[cfg(test)]
mod oracle_tests;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod stream_tests;

pub use accumulator::{merge_histograms, DataAccumulator, FeatureHistogram, HistogramKind};
pub use performance::OutcomeAccumulator;
pub use reference::{LeftOut, ReferenceBuilder, ReferenceProfile, Resolved};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::PredictionEvent;

/// The feature name of prediction drift rows.
pub const PREDICTION_FEATURE: &str = "__prediction__";

/// One computed value for `window_metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricValue {
    /// Metric name (see [`names::ALL`]).
    pub metric: &'static str,
    /// Feature name; `""` for model-level metrics.
    pub feature: String,
    /// The value; always finite.
    pub value: f64,
    /// How many observations the value is computed from.
    pub samples: u64,
    /// p-value of the statistic, when it has one.
    pub p_value: Option<f64>,
}

impl MetricValue {
    /// A model-level value (feature `""`).
    pub fn model(metric: &'static str, value: f64, samples: u64) -> Self {
        MetricValue {
            metric,
            feature: String::new(),
            value,
            samples,
            p_value: None,
        }
    }
}

/// Pushes `value` unless it is NaN or infinite.
pub(crate) fn push_finite(
    out: &mut Vec<MetricValue>,
    metric: &'static str,
    feature: &str,
    value: f64,
    samples: u64,
    p_value: Option<f64>,
) {
    if value.is_finite() {
        out.push(MetricValue {
            metric,
            feature: feature.to_owned(),
            value,
            samples,
            p_value: p_value.filter(|p| p.is_finite()),
        });
    }
}

/// How a feature's drift is decided (see "Drift decision" in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftMethod {
    /// By feature type and reference size (Evidently's rules).
    #[default]
    Auto,
    /// Kolmogorov-Smirnov test (categorical features: chi-square).
    Ks,
    /// Chi-square test (numeric features: on the coarse bins).
    ChiSquare,
    /// Normed Wasserstein distance (categorical features: Jensen-Shannon).
    Wasserstein,
    /// Jensen-Shannon distance.
    JensenShannon,
    /// Population stability index.
    Psi,
}

impl DriftMethod {
    /// The name used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            DriftMethod::Auto => "auto",
            DriftMethod::Ks => "ks",
            DriftMethod::ChiSquare => "chi_square",
            DriftMethod::Wasserstein => "wasserstein",
            DriftMethod::JensenShannon => "jensen_shannon",
            DriftMethod::Psi => "psi",
        }
    }
}

/// How drift is measured and decided (see the module docs for the conventions).
#[derive(Debug, Clone, PartialEq)]
pub struct DriftConfig {
    /// Equal-frequency bins from the reference quantiles for numeric features. Default 10.
    pub bins: usize,
    /// Smoothing added to every bin's proportion before renormalising. Default 1e-4.
    pub smoothing: f64,
    /// Most categories kept per categorical feature in a reference profile. Default 200.
    pub max_categories: usize,
    /// PSI at or above which a shift is large enough to count as drift. Default 0.2.
    pub psi_threshold: f64,
    /// Jensen-Shannon distance at or above which a shift is large enough. Default 0.1.
    pub js_threshold: f64,
    /// Fewer window values than this and no drift decision is made. Default 30.
    pub min_samples: u64,
    /// Benjamini-Hochberg-adjusted p-value below which a large shift is not chance. Default 0.05.
    pub p_value_threshold: f64,
    /// Resolution of the reference quantile grid used by KS and Wasserstein
    /// (rounded up to a multiple of `bins`). Default 200: KS within about
    /// 1/200 of the exact statistic, about 3.2 KiB per numeric feature and window.
    pub quantile_grid: usize,
    /// ADWIN and Page-Hinkley parameters of the error-stream detectors. Default: River's.
    pub detectors: detectors::DetectorConfig,
    /// Labels of a version collected into its label reference (label drift). Default 1000.
    pub label_reference_size: usize,
    /// Method of the features without an override. Default [`DriftMethod::Auto`].
    pub method: DriftMethod,
    /// Per-feature methods (feature name, `__prediction__` included). Default none.
    pub method_overrides: BTreeMap<String, DriftMethod>,
    /// Normed Wasserstein distance at or above which a shift is large enough
    /// (method `wasserstein`). Default 0.1.
    pub wasserstein_threshold: f64,
    /// Reference rows of a feature above which `auto` decides on a distance
    /// (Wasserstein / Jensen-Shannon) rather than a test (KS / chi-square). Default 1000.
    pub large_reference_rows: u64,
    /// Most distinct features a reference builder learns (`limits.max_features`);
    /// later ones are left out of the reference. Default 500.
    pub max_reference_features: usize,
    /// Most distinct values a categorical feature counts while its
    /// reference is built (`limits.max_reference_categories`). Default 10000.
    pub max_reference_categories: usize,
}

/// Distinct reference values at or below which `auto` treats a numeric
/// feature as categorical (Evidently's rule).
pub const FEW_DISTINCT_VALUES: usize = 5;

impl DriftConfig {
    /// The method deciding drift of `feature`: its override, else the
    /// configured method, with `auto` resolved from the feature's reference
    /// (`rows` binned reference values, `categorical` for categorical
    /// features and numeric ones with few distinct values). Never `Auto`.
    pub fn method_for(&self, feature: &str, rows: u64, categorical: bool) -> DriftMethod {
        let m = self
            .method_overrides
            .get(feature)
            .copied()
            .unwrap_or(self.method);
        match (m, categorical, rows > self.large_reference_rows) {
            (DriftMethod::Auto, false, false) => DriftMethod::Ks,
            (DriftMethod::Auto, false, true) => DriftMethod::Wasserstein,
            (DriftMethod::Auto, true, false) => DriftMethod::ChiSquare,
            (DriftMethod::Auto, true, true) => DriftMethod::JensenShannon,
            (m, _, _) => m,
        }
    }
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            bins: 10,
            smoothing: 1e-4,
            max_categories: 200,
            psi_threshold: 0.2,
            js_threshold: 0.1,
            min_samples: 30,
            p_value_threshold: 0.05,
            quantile_grid: 200,
            detectors: detectors::DetectorConfig::default(),
            label_reference_size: 1000,
            max_reference_features: 500,
            max_reference_categories: 10_000,
            method: DriftMethod::Auto,
            method_overrides: BTreeMap::new(),
            wasserstein_threshold: 0.1,
            large_reference_rows: 1000,
        }
    }
}

/// The learning task of a model, which decides its performance metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Task {
    /// Binary classification: `score` is the positive-class probability.
    Binary {
        /// The positive class (`"1"` also matches `"true"` and the reverse).
        positive_label: String,
        /// Predicted class is positive when `score >= threshold` (unless `predicted_label` is sent).
        threshold: f64,
    },
    /// Multiclass classification on `predicted_label`.
    Multiclass,
    /// Regression on `predicted_value`.
    Regression,
}

impl Task {
    /// Infers the task from one prediction: `score` → binary (positive `"1"`,
    /// threshold 0.5); `class_probabilities` or only `predicted_label` →
    /// multiclass; `predicted_value` → regression; nothing → `None`.
    pub fn infer(p: &PredictionEvent) -> Option<Task> {
        if p.score.is_some() {
            Some(Task::Binary {
                positive_label: "1".to_owned(),
                threshold: 0.5,
            })
        } else if p.class_probabilities.is_some() {
            Some(Task::Multiclass)
        } else if p.predicted_value.is_some() {
            Some(Task::Regression)
        } else if p.predicted_label.is_some() {
            Some(Task::Multiclass)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_is_inferred_from_the_prediction_fields() {
        let mut p = PredictionEvent {
            score: Some(0.3),
            ..Default::default()
        };
        assert_eq!(
            Task::infer(&p),
            Some(Task::Binary {
                positive_label: "1".into(),
                threshold: 0.5
            })
        );
        p.score = None;
        p.predicted_label = Some("cat".into());
        assert_eq!(Task::infer(&p), Some(Task::Multiclass));
        p.predicted_label = None;
        p.predicted_value = Some(3.0);
        assert_eq!(Task::infer(&p), Some(Task::Regression));
        p.predicted_value = None;
        assert_eq!(Task::infer(&p), None);
    }

    #[test]
    fn push_finite_drops_nan_and_infinity() {
        let mut out = Vec::new();
        push_finite(&mut out, "psi", "f", f64::NAN, 1, None);
        push_finite(&mut out, "psi", "f", f64::INFINITY, 1, None);
        push_finite(&mut out, "psi", "f", 0.5, 1, Some(f64::NAN));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].value, 0.5);
        assert_eq!(out[0].p_value, None);
    }
}
