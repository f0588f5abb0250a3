//! Metric names written to `window_metrics.metric`: the public contract.

/// Every metric name the service writes.
pub const ALL: &[&str] = &[
    // volume and labels
    "prediction_count",
    "label_count",
    "label_coverage",
    "unlabeled_count",
    "orphan_label_count",
    "duplicate_count",
    // integrity
    "missing_rate",
    "nan_rate",
    "out_of_range_rate",
    "new_category_rate",
    "type_mismatch_rate",
    "unknown_feature_count",
    // 95 % Wilson intervals of the rates
    "accuracy_ci_low",
    "accuracy_ci_high",
    "precision_ci_low",
    "precision_ci_high",
    "recall_ci_low",
    "recall_ci_high",
    "fpr_ci_low",
    "fpr_ci_high",
    "specificity_ci_low",
    "specificity_ci_high",
    "label_coverage_ci_low",
    "label_coverage_ci_high",
    // drift
    "psi",
    "js_distance",
    "kl_divergence",
    "hellinger",
    "wasserstein",
    "wasserstein_normed",
    "ks_statistic",
    "chi2_statistic",
    "drift_detected",
    "drifted_feature_count",
    "drifted_feature_share",
    // sequential change detectors on the error stream
    "adwin_drift",
    "page_hinkley_drift",
    // classification
    "accuracy",
    "precision",
    "recall",
    "f1",
    "fpr",
    "specificity",
    "roc_auc",
    "pr_auc",
    "log_loss",
    "brier",
    "expected_calibration_error",
    "f1_macro",
    "f1_micro",
    "f1_weighted",
    "estimated_accuracy",
    "estimated_precision",
    "estimated_recall",
    "estimated_f1",
    // regression
    "mse",
    "rmse",
    "mae",
    "r2",
    "median_abs_error",
    "mean_error",
    "mape",
    // system
    "latency_p50",
    "latency_p95",
    "latency_p99",
    "label_delay_p50",
    "label_delay_p95",
];

/// The per-feature drift statistics (gated by `drift_detected`, recomputable
/// from the stored window histograms).
pub const DRIFT_STATISTICS: &[&str] = &[
    "psi",
    "js_distance",
    "kl_divergence",
    "hellinger",
    "wasserstein",
    "wasserstein_normed",
    "ks_statistic",
    "chi2_statistic",
];

/// True for a drift statistic or the drift decision itself.
pub fn is_drift(name: &str) -> bool {
    name == "drift_detected" || DRIFT_STATISTICS.contains(&name)
}

/// True for a metric name in [`ALL`].
pub fn is_known(name: &str) -> bool {
    ALL.contains(&name)
}
