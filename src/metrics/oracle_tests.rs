//! Oracle tests: the statistics core against values computed by numpy, scipy
//! and scikit-learn (`tests/oracle/gen_fixtures.py` writes the fixtures in
//! `tests/fixtures/`; both are committed, so no Python is needed here).
//!
//! Bounds (issue #3): binned statistics and performance metrics within 1e-9
//! relative on the same binning, KS within 0.005 of `ks_2samp`, Wasserstein
//! within 1 %, ROC AUC within 1e-3, median absolute error within 1 % of rank.

use serde_json::Value;

use super::*;
use crate::model::{Entries, FeatureValue, Label, PredictionEvent, PredictionOutcome};

const NUMERIC: &str = include_str!("../../tests/fixtures/drift_numeric.json");
const CATEGORICAL: &str = include_str!("../../tests/fixtures/drift_categorical.json");
const BINARY: &str = include_str!("../../tests/fixtures/binary.json");
const REGRESSION: &str = include_str!("../../tests/fixtures/regression.json");
const MULTICLASS: &str = include_str!("../../tests/fixtures/multiclass.json");
const DETECTORS: &str = include_str!("../../tests/fixtures/detectors.json");
const WILSON: &str = include_str!("../../tests/fixtures/wilson.json");
const LABEL_DRIFT: &str = include_str!("../../tests/fixtures/label_drift.json");

fn cases(json: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(json).expect("fixture is valid JSON");
    v["cases"].as_array().expect("fixture has cases").clone()
}

/// Space-separated decimals, parsed exactly (`str::parse` rounds correctly).
fn floats(v: &Value) -> Vec<f64> {
    v.as_str()
        .expect("samples are a string")
        .split_whitespace()
        .map(|s| s.parse().expect("a float"))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

fn num(case: &Value, key: &str) -> f64 {
    case[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is a number"))
}

fn assert_rel(name: &str, ours: f64, want: f64, tol: f64) {
    let err = (ours - want).abs();
    assert!(
        err <= tol * want.abs() || err <= 1e-12,
        "{name}: ours {ours}, oracle {want}, error {err}"
    );
}

fn value(out: &[MetricValue], metric: &str, feature: &str) -> f64 {
    out.iter()
        .find(|v| v.metric == metric && v.feature == feature)
        .unwrap_or_else(|| panic!("{metric} / {feature} missing"))
        .value
}

fn event(name: &str, v: FeatureValue) -> PredictionEvent {
    PredictionEvent {
        features: Entries(vec![(name.to_owned(), v)]),
        ..Default::default()
    }
}

/// Profile from `reference`, window from `current`, finished.
fn drift(
    cfg: &DriftConfig,
    reference: impl Iterator<Item = FeatureValue>,
    current: impl Iterator<Item = FeatureValue>,
) -> (ReferenceProfile, Vec<MetricValue>) {
    let mut b = ReferenceBuilder::new(cfg);
    for v in reference {
        b.observe(&event("f", v));
    }
    let p = b.build();
    let mut acc = DataAccumulator::new(Some(&p));
    let mut r = Resolved::default();
    for v in current {
        p.resolve(&event("f", v), &mut r);
        acc.observe(&r);
    }
    let mut out = Vec::new();
    acc.finish(Some(&p), cfg, &mut out);
    (p, out)
}

#[test]
fn numeric_drift_matches_numpy_and_scipy() {
    let cfg = DriftConfig::default();
    for case in cases(NUMERIC) {
        let name = case["name"].as_str().unwrap_or("?").to_owned();
        let reference = floats(&case["reference"]);
        let current = floats(&case["current"]);
        let (p, out) = drift(
            &cfg,
            reference.iter().map(|&v| FeatureValue::Double(v)),
            current.iter().map(|&v| FeatureValue::Double(v)),
        );
        let reference::FeatureKind::Numeric(np) = &p.features[0].kind else {
            panic!("{name}: expected a numeric profile");
        };
        let cuts: Vec<f64> = case["cuts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert_eq!(np.cuts.len(), cuts.len(), "{name}: cut count");
        for (a, b) in np.cuts.iter().zip(&cuts) {
            assert_rel(&format!("{name} cut"), *a, *b, 1e-15);
        }
        for m in ["psi", "js_distance", "kl_divergence", "hellinger"] {
            assert_rel(
                &format!("{name} {m}"),
                value(&out, m, "f"),
                num(&case, m),
                1e-9,
            );
        }
        let ks = value(&out, "ks_statistic", "f");
        assert!(
            (ks - num(&case, "ks_statistic")).abs() <= 0.005,
            "{name}: ks {ks} vs {}",
            num(&case, "ks_statistic")
        );
        for m in ["wasserstein", "wasserstein_normed"] {
            assert_rel(
                &format!("{name} {m}"),
                value(&out, m, "f"),
                num(&case, m),
                0.01,
            );
        }
        assert_rel(
            &format!("{name} out_of_range_rate"),
            value(&out, "out_of_range_rate", "f"),
            num(&case, "out_of_range_rate"),
            1e-12,
        );
    }
}

#[test]
fn categorical_drift_matches_numpy_and_scipy() {
    for case in cases(CATEGORICAL) {
        let name = case["name"].as_str().unwrap_or("?").to_owned();
        let cfg = DriftConfig {
            max_categories: num(&case, "max_categories") as usize,
            ..Default::default()
        };
        let (p, out) = drift(
            &cfg,
            strings(&case["reference"])
                .into_iter()
                .map(FeatureValue::String),
            strings(&case["current"])
                .into_iter()
                .map(FeatureValue::String),
        );
        let reference::FeatureKind::Categorical(cp) = &p.features[0].kind else {
            panic!("{name}: expected a categorical profile");
        };
        assert_eq!(cp.categories, strings(&case["categories"]), "{name}");
        for m in [
            "psi",
            "js_distance",
            "kl_divergence",
            "hellinger",
            "chi2_statistic",
        ] {
            assert_rel(
                &format!("{name} {m}"),
                value(&out, m, "f"),
                num(&case, m),
                1e-9,
            );
        }
        let pv = out
            .iter()
            .find(|v| v.metric == "chi2_statistic")
            .and_then(|v| v.p_value)
            .expect("chi2 has a p-value");
        assert_rel(
            &format!("{name} chi2 p"),
            pv,
            num(&case, "chi2_p_value"),
            1e-6,
        );
        assert_rel(
            &format!("{name} new_category_rate"),
            value(&out, "new_category_rate", "f"),
            num(&case, "new_category_rate"),
            1e-12,
        );
    }
}

#[test]
fn binary_performance_matches_scikit_learn() {
    for case in cases(BINARY) {
        let name = case["name"].as_str().unwrap_or("?").to_owned();
        let task = Task::Binary {
            positive_label: "1".into(),
            threshold: num(&case, "threshold"),
        };
        let y = floats(&case["y_true"]);
        let s = floats(&case["score"]);
        let mut acc = OutcomeAccumulator::new();
        for (y, s) in y.iter().zip(&s) {
            let outcome = PredictionOutcome {
                score: Some(*s),
                predicted_label: None,
                predicted_value: None,
            };
            let label = Label {
                actual_label: Some(if *y == 1.0 { "1" } else { "0" }.into()),
                actual_value: None,
                timestamp: 0,
            };
            acc.observe_labeled(&task, &outcome, &label, 0);
        }
        let mut out = Vec::new();
        acc.finish(&task, y.len() as u64, &mut out);
        for m in [
            "accuracy",
            "precision",
            "recall",
            "f1",
            "fpr",
            "specificity",
            "log_loss",
            "brier",
            "expected_calibration_error",
        ] {
            assert_rel(
                &format!("{name} {m}"),
                value(&out, m, ""),
                num(&case, m),
                1e-9,
            );
        }
        // Scores on the histogram grid: the binned AUCs are exact.
        let on_grid = name == "scores_on_bin_grid";
        let auc = value(&out, "roc_auc", "");
        let want = num(&case, "roc_auc");
        if on_grid {
            assert_rel(&format!("{name} roc_auc"), auc, want, 1e-9);
            assert_rel(
                &format!("{name} pr_auc"),
                value(&out, "pr_auc", ""),
                num(&case, "pr_auc"),
                1e-9,
            );
        } else {
            assert!(
                (auc - want).abs() <= 1e-3,
                "{name}: roc_auc {auc} vs {want}"
            );
            let ap = value(&out, "pr_auc", "");
            let want = num(&case, "pr_auc");
            assert!((ap - want).abs() <= 2e-3, "{name}: pr_auc {ap} vs {want}");
        }
    }
}

#[test]
fn regression_performance_matches_scikit_learn() {
    for case in cases(REGRESSION) {
        let name = case["name"].as_str().unwrap_or("?").to_owned();
        let y = floats(&case["y_true"]);
        let p = floats(&case["y_pred"]);
        let mut acc = OutcomeAccumulator::new();
        for (y, p) in y.iter().zip(&p) {
            let outcome = PredictionOutcome {
                score: None,
                predicted_label: None,
                predicted_value: Some(*p),
            };
            let label = Label {
                actual_label: None,
                actual_value: Some(*y),
                timestamp: 0,
            };
            acc.observe_labeled(&Task::Regression, &outcome, &label, 0);
        }
        let mut out = Vec::new();
        acc.finish(&Task::Regression, y.len() as u64, &mut out);
        for m in ["mse", "rmse", "mae", "r2", "mape", "mean_error"] {
            assert_rel(
                &format!("{name} {m}"),
                value(&out, m, ""),
                num(&case, m),
                1e-9,
            );
        }
        // median_abs_error: within 1 % of rank of the exact sorted errors.
        let sorted = floats(&case["abs_errors_sorted"]);
        let med = value(&out, "median_abs_error", "");
        let n = sorted.len() as f64;
        let below = sorted.iter().filter(|&&e| e < med).count() as f64 / n;
        let at_or_below = sorted.iter().filter(|&&e| e <= med).count() as f64 / n;
        assert!(
            below <= 0.51 && at_or_below >= 0.49,
            "{name}: median {med} has rank [{below}, {at_or_below}]"
        );
        assert_rel(
            &format!("{name} median"),
            med,
            num(&case, "median_abs_error"),
            0.01,
        );
    }
}

#[test]
fn multiclass_performance_matches_scikit_learn() {
    for case in cases(MULTICLASS) {
        let name = case["name"].as_str().unwrap_or("?").to_owned();
        let y = strings(&case["y_true"]);
        let p = strings(&case["y_pred"]);
        let mut acc = OutcomeAccumulator::new();
        for (y, p) in y.iter().zip(&p) {
            let outcome = PredictionOutcome {
                score: None,
                predicted_label: Some(p.as_str().into()),
                predicted_value: None,
            };
            let label = Label {
                actual_label: Some(y.as_str().into()),
                actual_value: None,
                timestamp: 0,
            };
            acc.observe_labeled(&Task::Multiclass, &outcome, &label, 0);
        }
        let mut out = Vec::new();
        acc.finish(&Task::Multiclass, y.len() as u64, &mut out);
        for m in ["accuracy", "f1_macro", "f1_micro", "f1_weighted"] {
            assert_rel(
                &format!("{name} {m}"),
                value(&out, m, ""),
                num(&case, m),
                1e-9,
            );
        }
        let per_class = case["per_class"].as_object().expect("per_class");
        for (class, want) in per_class {
            for m in ["precision", "recall"] {
                if let Some(w) = want[m].as_f64() {
                    let ours = value(&out, m, &format!("class={class}"));
                    assert_rel(&format!("{name} {m} {class}"), ours, w, 1e-9);
                }
            }
        }
    }
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("an array of indices")
        .iter()
        .map(|i| i.as_u64().expect("an index") as usize)
        .collect()
}

#[test]
fn change_detectors_fire_at_rivers_indices() {
    use detectors::{Adwin, AdwinConfig, PageHinkley, PageHinkleyConfig};
    for case in cases(DETECTORS) {
        let name = case["name"].as_str().unwrap_or("?").to_owned();
        let values = floats(&case["values"]);
        let a = &case["adwin_params"];
        let defaults = AdwinConfig::default();
        let adwin_cfg = AdwinConfig {
            delta: a["delta"].as_f64().unwrap_or(defaults.delta),
            clock: a["clock"].as_u64().map_or(defaults.clock, |v| v as u32),
            max_buckets: a["max_buckets"]
                .as_u64()
                .map_or(defaults.max_buckets, |v| v as usize),
            min_window_length: a["min_window_length"]
                .as_u64()
                .map_or(defaults.min_window_length, |v| v as u32),
            grace_period: a["grace_period"]
                .as_u64()
                .map_or(defaults.grace_period, |v| v as u32),
        };
        let p = &case["page_hinkley_params"];
        let defaults = PageHinkleyConfig::default();
        let ph_cfg = PageHinkleyConfig {
            min_instances: p["min_instances"]
                .as_u64()
                .unwrap_or(defaults.min_instances),
            delta: p["delta"].as_f64().unwrap_or(defaults.delta),
            threshold: p["threshold"].as_f64().unwrap_or(defaults.threshold),
            alpha: p["alpha"].as_f64().unwrap_or(defaults.alpha),
        };
        let mut adwin = Adwin::new(adwin_cfg);
        let mut ph = PageHinkley::new(ph_cfg);
        let (mut ours_a, mut ours_p) = (Vec::new(), Vec::new());
        for (i, &x) in values.iter().enumerate() {
            if adwin.update(x) {
                ours_a.push(i);
            }
            if ph.update(x) {
                ours_p.push(i);
            }
        }
        assert_eq!(ours_a, indices(&case["adwin"]), "{name}: ADWIN");
        assert_eq!(
            ours_p,
            indices(&case["page_hinkley"]),
            "{name}: Page-Hinkley"
        );
    }
}

#[test]
fn wilson_intervals_match_statsmodels() {
    use performance::{wilson_interval, WILSON_Z};
    let v: Value = serde_json::from_str(WILSON).expect("fixture is valid JSON");
    let close = |name: &str, ours: f64, want: f64| assert_rel(name, ours, want, 1e-9);
    for pair in v["pairs"].as_array().expect("pairs") {
        let (k, n) = (num(pair, "count") as u64, num(pair, "nobs") as u64);
        let (lo, hi) = wilson_interval(k, n, WILSON_Z).expect("trials > 0");
        close(&format!("{k}/{n} low"), lo, num(pair, "low"));
        close(&format!("{k}/{n} high"), hi, num(pair, "high"));
    }
    assert_eq!(wilson_interval(0, 0, WILSON_Z), None);
    assert_eq!(wilson_interval(3, 2, WILSON_Z), None);
    // End to end: the rates of a binary window and their interval rows.
    let case = &v["binary"];
    let task = Task::Binary {
        positive_label: "1".into(),
        threshold: num(case, "threshold"),
    };
    let mut acc = OutcomeAccumulator::new();
    let (y, s) = (floats(&case["y_true"]), floats(&case["score"]));
    for (y, s) in y.iter().zip(&s) {
        let outcome = PredictionOutcome {
            score: Some(*s),
            predicted_label: None,
            predicted_value: None,
        };
        let label = Label {
            actual_label: Some(if *y == 1.0 { "1" } else { "0" }.into()),
            actual_value: None,
            timestamp: 0,
        };
        acc.observe_labeled(&task, &outcome, &label, 0);
    }
    let mut out = Vec::new();
    acc.finish(&task, 2 * y.len() as u64, &mut out);
    for m in ["accuracy", "precision", "recall", "fpr", "specificity"] {
        let want = &case[m];
        let row = |suffix: &str| {
            out.iter()
                .find(|v| v.metric == format!("{m}{suffix}"))
                .unwrap_or_else(|| panic!("{m}{suffix} missing"))
        };
        close(m, row("").value, num(want, "count") / num(want, "nobs"));
        close(&format!("{m} low"), row("_ci_low").value, num(want, "low"));
        close(
            &format!("{m} high"),
            row("_ci_high").value,
            num(want, "high"),
        );
        assert_eq!(row("_ci_low").samples, num(want, "nobs") as u64, "{m}");
    }
    // label coverage: half of the predictions are labeled
    let (lo, hi) = wilson_interval(y.len() as u64, 2 * y.len() as u64, WILSON_Z).unwrap();
    assert_eq!(value(&out, "label_coverage", ""), 0.5);
    assert_eq!(value(&out, "label_coverage_ci_low", ""), lo);
    assert_eq!(value(&out, "label_coverage_ci_high", ""), hi);
    assert!(lo < 0.5 && 0.5 < hi);
}

#[test]
fn label_drift_matches_numpy_and_scipy() {
    use labels::{LabelReferenceBuilder, LABEL_FEATURE};
    use std::sync::Arc;
    for case in cases(LABEL_DRIFT) {
        let name = case["name"].as_str().unwrap_or("?").to_owned();
        let regression = case["kind"] == "regression";
        let (task, labels): (Task, Vec<(Vec<Label>, usize)>) = {
            let to_labels = |key: &str| -> Vec<Label> {
                if regression {
                    floats(&case[key])
                        .into_iter()
                        .map(|v| Label {
                            actual_label: None,
                            actual_value: Some(v),
                            timestamp: 0,
                        })
                        .collect()
                } else {
                    strings(&case[key])
                        .into_iter()
                        .map(|s| Label {
                            actual_label: Some(s.into()),
                            actual_value: None,
                            timestamp: 0,
                        })
                        .collect()
                }
            };
            let (r, c) = (to_labels("reference"), to_labels("current"));
            let task = if regression {
                Task::Regression
            } else {
                Task::Multiclass
            };
            let n = r.len();
            (task, vec![(r, n), (c, 0)])
        };
        let cfg = DriftConfig {
            label_reference_size: labels[0].1,
            ..Default::default()
        };
        let mut b = LabelReferenceBuilder::new(&cfg);
        let mut profile = None;
        for l in &labels[0].0 {
            let v = labels::label_value(&task, l).expect("evaluable label");
            profile = b.observe(v).or(profile);
        }
        let profile = Arc::new(profile.expect("reference complete"));
        let mut acc = OutcomeAccumulator::new();
        for l in &labels[1].0 {
            let v = labels::label_value(&task, l).expect("evaluable label");
            acc.observe_label(&profile, v);
        }
        let mut out = Vec::new();
        acc.finish_label_drift(&cfg, &mut out);
        for m in [
            "psi",
            "js_distance",
            "kl_divergence",
            "hellinger",
            "chi2_statistic",
        ] {
            assert_rel(
                &format!("{name} {m}"),
                value(&out, m, LABEL_FEATURE),
                num(&case, m),
                1e-9,
            );
        }
        let pv = out
            .iter()
            .find(|v| v.metric == "chi2_statistic")
            .and_then(|v| v.p_value)
            .expect("chi2 has a p-value");
        assert_rel(
            &format!("{name} chi2 p"),
            pv,
            num(&case, "chi2_p_value"),
            1e-6,
        );
        let detected = value(&out, "drift_detected", LABEL_FEATURE);
        assert_eq!(detected, name.contains("shift") as u8 as f64, "{name}");
    }
}
