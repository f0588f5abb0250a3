//! How stored per-window values combine over a time range. Pure.
//!
//! Drift statistics over a range are recomputed from the stored per-window
//! histograms by the drift endpoint (`routes`); this module is the rule for
//! everything else, and the fallback for drift of windows written without
//! histograms: each metric is combined from its per-window rows (`value`,
//! `samples`) by one of two rules:
//!
//! - **sum** for counts (names ending in `_count`, and `cpu_seconds`): exact.
//! - **samples-weighted mean** `Σ value·samples / Σ samples` for everything
//!   else (a plain mean when no row has samples). This is *exact* for rates
//!   and means over the same samples — `accuracy`, `label_coverage`,
//!   `missing_rate`, `nan_rate`, `out_of_range_rate`, `new_category_rate`,
//!   `type_mismatch_rate`, `mse`, `mae`, `brier`, `log_loss`, `mean_error`,
//!   `estimated_accuracy` — and an *approximation* for the rest: the PSI /
//!   JS / KL / Hellinger / KS / Wasserstein / chi-square of the union of
//!   several windows is not the weighted mean of the per-window values, and
//!   quantiles, AUC, precision / recall / F1 and R² do not average either.
//!   For those the result also carries the range's `min` and `max`.
//! - `drift_detected` (0 / 1 per window) is reported as `drifted_windows` of
//!   `windows`; its weighted mean is the share of samples in drifted windows.

use serde::Serialize;

/// How a metric combines across windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeKind {
    /// Values add up (counts).
    Sum,
    /// Samples-weighted mean, exact for rates and means over the samples.
    WeightedMeanExact,
    /// Samples-weighted mean, an approximation of the statistic over the union.
    WeightedMeanApprox,
}

/// Metrics whose samples-weighted mean equals the value over the union of windows.
const EXACT_MEANS: &[&str] = &[
    "accuracy",
    "label_coverage",
    "missing_rate",
    "nan_rate",
    "out_of_range_rate",
    "new_category_rate",
    "type_mismatch_rate",
    "mse",
    "mae",
    "brier",
    "log_loss",
    "mean_error",
    "mape",
    "estimated_accuracy",
    "drift_detected",
];

/// The rule for `metric`.
pub fn merge_kind(metric: &str) -> MergeKind {
    if metric.ends_with("_count") || metric == "cpu_seconds" {
        MergeKind::Sum
    } else if EXACT_MEANS.contains(&metric) {
        MergeKind::WeightedMeanExact
    } else {
        MergeKind::WeightedMeanApprox
    }
}

/// A metric combined over the windows of a range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Merged {
    /// The combined value.
    pub value: f64,
    /// Total samples behind it.
    pub samples: u64,
    /// Windows combined.
    pub windows: u64,
    /// Smallest per-window value.
    pub min: f64,
    /// Largest per-window value.
    pub max: f64,
    /// Windows whose value was 1 (meaningful for `drift_detected`).
    pub windows_at_one: u64,
    /// The rule used.
    pub kind: MergeKind,
}

/// Combines `(value, samples)` rows of one metric; `None` without rows.
pub fn merge(metric: &str, rows: impl IntoIterator<Item = (f64, u64)>) -> Option<Merged> {
    let kind = merge_kind(metric);
    let (mut sum, mut weighted, mut plain) = (0.0, 0.0, 0.0);
    let (mut samples, mut windows, mut ones) = (0u64, 0u64, 0u64);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for (v, n) in rows {
        if !v.is_finite() {
            continue;
        }
        windows += 1;
        samples = samples.saturating_add(n);
        sum += v;
        plain += v;
        weighted += v * n as f64;
        min = min.min(v);
        max = max.max(v);
        if v == 1.0 {
            ones += 1;
        }
    }
    if windows == 0 {
        return None;
    }
    let value = match kind {
        MergeKind::Sum => sum,
        _ if samples > 0 => weighted / samples as f64,
        _ => plain / windows as f64,
    };
    Some(Merged {
        value,
        samples,
        windows,
        min,
        max,
        windows_at_one: ones,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_and_rates_weight_by_samples() {
        let m = merge("prediction_count", [(10.0, 10), (30.0, 30)]).unwrap();
        assert_eq!((m.value, m.samples, m.windows), (40.0, 40, 2));
        assert_eq!(m.kind, MergeKind::Sum);
        // 9 of 10 right, then 15 of 30 right: 24 of 40 over the union.
        let m = merge("accuracy", [(0.9, 10), (0.5, 30)]).unwrap();
        assert!((m.value - 24.0 / 40.0).abs() < 1e-12);
        assert_eq!(m.kind, MergeKind::WeightedMeanExact);
        assert_eq!((m.min, m.max), (0.5, 0.9));
        let m = merge("psi", [(0.1, 100), (0.3, 300)]).unwrap();
        assert!((m.value - 0.25).abs() < 1e-12);
        assert_eq!(m.kind, MergeKind::WeightedMeanApprox);
    }

    #[test]
    fn drift_windows_are_counted_and_empty_ranges_give_nothing() {
        let m = merge("drift_detected", [(1.0, 50), (0.0, 50), (1.0, 100)]).unwrap();
        assert_eq!((m.windows, m.windows_at_one), (3, 2));
        assert!((m.value - 0.75).abs() < 1e-12);
        assert!(merge("psi", []).is_none());
        assert!(merge("psi", [(f64::NAN, 3)]).is_none());
        // No samples anywhere: a plain mean.
        assert_eq!(
            merge("latency_p95", [(2.0, 0), (4.0, 0)]).unwrap().value,
            3.0
        );
    }
}
