//! [`OutcomeAccumulator`]: the outcome side of one (model, version, segment,
//! window), revised as labels arrive: label counts and coverage, binary
//! classification (confusion matrix, score histograms for ROC / PR AUC,
//! log loss, Brier, calibration), multiclass (per-class confusion), regression
//! (error sums and a median sketch) and label delay.
//!
//! Conventions (all documented values match scikit-learn):
//! - Binary labels: a label equal to the positive label is positive; with the
//!   default positive label `"1"` / `"true"` both spellings are positive and
//!   `"0"` / `"false"` negative, other labels are not evaluated. With a custom
//!   positive label every other label is negative. A missing `actual_label`
//!   falls back to `actual_value` 1.0 / 0.0. The predicted class is
//!   `predicted_label` when sent, else `score >= threshold`.
//! - ROC AUC and PR AUC (average precision) come from score histograms with
//!   [`SCORE_BINS`] equal-width bins, scores in one bin treated as tied: exact
//!   when scores are on the bin grid, otherwise within about `1 / SCORE_BINS`.
//! - `log_loss` clips probabilities to `[1e-15, 1 - 1e-15]`;
//!   `expected_calibration_error` uses 10 equal-width bins.
//! - Regression errors are `predicted - actual` (`mean_error` is the bias);
//!   `mape` divides by `max(|actual|, f64::EPSILON)`; `r2` is 1 when the
//!   actual values are constant and predicted exactly, 0 when constant and
//!   not (scikit-learn's `force_finite`); `median_abs_error` comes from a
//!   relative-error sketch (0.5 %).
//! - Multiclass: up to [`MAX_CLASSES`] classes are tracked apart; further
//!   classes fold into `__other__` for the per-class values (accuracy stays
//!   exact). Macro F1 averages the per-class F1 over classes seen as actual
//!   or predicted; weighted F1 weights by actual support.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::accumulator::new_histogram;
use super::labels::{LabelHistogram, LabelProfile, LabelValue};
use super::quantile::RelativeSketch;
use super::snapshot::{counts, hdr};
use super::{push_finite, DriftConfig, MetricValue, Task};
use crate::model::{Label, PredictionOutcome};

/// Equal-width score bins of the ROC / PR AUC histograms.
pub const SCORE_BINS: usize = 2000;
/// Equal-width bins of the expected calibration error.
const ECE_BINS: usize = 10;
/// Classes tracked apart in multiclass per-class metrics.
pub const MAX_CLASSES: usize = 100;
/// Label delays above this (ms, about 12 days) are recorded as this.
const MAX_DELAY_MS: u64 = 1 << 30;
/// Probability clip of the log loss.
const LOG_LOSS_EPS: f64 = 1e-15;

/// The normal quantile of a two-sided 95 % interval (scipy `norm.isf(0.025)`).
pub const WILSON_Z: f64 = 1.959_963_984_540_054;

/// Wilson score interval of `successes` out of `trials` at normal quantile
/// `z`, clipped to `[0, 1]` (statsmodels `proportion_confint(method="wilson")`).
/// `None` without trials or with more successes than trials.
pub fn wilson_interval(successes: u64, trials: u64, z: f64) -> Option<(f64, f64)> {
    if trials == 0 || successes > trials {
        return None;
    }
    let n = trials as f64;
    let q = successes as f64 / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (q + z2 / (2.0 * n)) / denom;
    let half = z * (q * (1.0 - q) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    Some(((center - half).max(0.0), (center + half).min(1.0)))
}

/// The interval rows of a rate metric.
fn ci_names(metric: &str) -> Option<(&'static str, &'static str)> {
    Some(match metric {
        "accuracy" => ("accuracy_ci_low", "accuracy_ci_high"),
        "precision" => ("precision_ci_low", "precision_ci_high"),
        "recall" => ("recall_ci_low", "recall_ci_high"),
        "fpr" => ("fpr_ci_low", "fpr_ci_high"),
        "specificity" => ("specificity_ci_low", "specificity_ci_high"),
        "label_coverage" => ("label_coverage_ci_low", "label_coverage_ci_high"),
        _ => return None,
    })
}

/// Pushes the rate `successes / trials` (with `samples`) and its 95 % Wilson
/// interval as `<metric>_ci_low` / `<metric>_ci_high` (samples = `trials`);
/// nothing without trials. Rates above 1 (more labels than predictions
/// counted) get no interval.
fn push_rate(
    out: &mut Vec<MetricValue>,
    metric: &'static str,
    feature: &str,
    successes: u64,
    trials: u64,
    samples: u64,
) {
    if trials == 0 {
        return;
    }
    push_finite(
        out,
        metric,
        feature,
        successes as f64 / trials as f64,
        samples,
        None,
    );
    if let (Some((lo_name, hi_name)), Some((lo, hi))) = (
        ci_names(metric),
        wilson_interval(successes, trials, WILSON_Z),
    ) {
        push_finite(out, lo_name, feature, lo, trials, None);
        push_finite(out, hi_name, feature, hi, trials, None);
    }
}

/// Binary classification state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Binary {
    tp: u64,
    fp: u64,
    tn: u64,
    fn_: u64,
    /// Score histograms of actual positives / negatives (allocated at the first score).
    #[serde(with = "counts")]
    pos: Vec<u64>,
    #[serde(with = "counts")]
    neg: Vec<u64>,
    scored: u64,
    log_loss: f64,
    brier: f64,
    /// Per calibration bin: (count, sum of scores, positives).
    ece: [(u64, f64, u64); ECE_BINS],
}

impl Binary {
    fn observe(&mut self, actual: bool, predicted: Option<bool>, score: Option<f64>) {
        match (predicted, actual) {
            (Some(true), true) => self.tp += 1,
            (Some(true), false) => self.fp += 1,
            (Some(false), false) => self.tn += 1,
            (Some(false), true) => self.fn_ += 1,
            (None, _) => {}
        }
        if let Some(s) = score.filter(|s| s.is_finite()) {
            if self.pos.is_empty() {
                self.pos = vec![0; SCORE_BINS];
                self.neg = vec![0; SCORE_BINS];
            }
            let s = s.clamp(0.0, 1.0);
            let b = ((s * SCORE_BINS as f64) as usize).min(SCORE_BINS - 1);
            let y = actual as u8 as f64;
            if actual {
                self.pos[b] += 1;
            } else {
                self.neg[b] += 1;
            }
            self.scored += 1;
            let p = s.clamp(LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS);
            self.log_loss -= y * p.ln() + (1.0 - y) * (1.0 - p).ln();
            self.brier += (s - y) * (s - y);
            let e = ((s * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
            self.ece[e].0 += 1;
            self.ece[e].1 += s;
            self.ece[e].2 += actual as u64;
        }
    }

    fn merge(&mut self, o: &Binary) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.tn += o.tn;
        self.fn_ += o.fn_;
        if !o.pos.is_empty() {
            if self.pos.is_empty() {
                self.pos = vec![0; SCORE_BINS];
                self.neg = vec![0; SCORE_BINS];
            }
            for (a, b) in self.pos.iter_mut().zip(&o.pos) {
                *a += b;
            }
            for (a, b) in self.neg.iter_mut().zip(&o.neg) {
                *a += b;
            }
        }
        self.scored += o.scored;
        self.log_loss += o.log_loss;
        self.brier += o.brier;
        for (a, b) in self.ece.iter_mut().zip(&o.ece) {
            a.0 += b.0;
            a.1 += b.1;
            a.2 += b.2;
        }
    }

    fn finish(&self, out: &mut Vec<MetricValue>) {
        let (tp, fp, tn, fn_) = (self.tp, self.fp, self.tn, self.fn_);
        let n = tp + fp + tn + fn_;
        push_rate(out, "accuracy", "", tp + tn, n, n);
        push_rate(out, "precision", "", tp, tp + fp, n);
        push_rate(out, "recall", "", tp, tp + fn_, n);
        if 2 * tp + fp + fn_ > 0 {
            let f1 = 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64;
            push_finite(out, "f1", "", f1, n, None);
        }
        push_rate(out, "fpr", "", fp, fp + tn, n);
        push_rate(out, "specificity", "", tn, fp + tn, n);
        if self.scored == 0 {
            return;
        }
        let m = self.scored;
        push_finite(out, "log_loss", "", self.log_loss / m as f64, m, None);
        push_finite(out, "brier", "", self.brier / m as f64, m, None);
        let ece: f64 = self
            .ece
            .iter()
            .filter(|b| b.0 > 0)
            .map(|&(_, s, p)| (s - p as f64).abs())
            .sum::<f64>()
            / m as f64;
        push_finite(out, "expected_calibration_error", "", ece, m, None);
        let p_total: u64 = self.pos.iter().sum();
        let n_total: u64 = self.neg.iter().sum();
        // Walk bins from the highest score down: thresholds at each bin.
        let (mut tp_c, mut fp_c) = (0u64, 0u64);
        let mut auc_pairs = 0.0;
        let mut ap = 0.0;
        for (&pb, &nb) in self.pos.iter().zip(&self.neg).rev() {
            // each negative beats... positives above it count 1, tied positives 1/2
            auc_pairs += nb as f64 * (tp_c as f64 + pb as f64 / 2.0);
            tp_c += pb;
            fp_c += nb;
            if pb > 0 && p_total > 0 {
                ap += pb as f64 / p_total as f64 * (tp_c as f64 / (tp_c + fp_c) as f64);
            }
        }
        if p_total > 0 && n_total > 0 {
            let auc = auc_pairs / (p_total as f64 * n_total as f64);
            push_finite(out, "roc_auc", "", auc, m, None);
        }
        if p_total > 0 {
            push_finite(out, "pr_auc", "", ap, m, None);
        }
    }
}

/// Per-class confusion counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ClassCounts {
    tp: u64,
    fp: u64,
    fn_: u64,
}

/// Multiclass state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Multiclass {
    n: u64,
    correct: u64,
    classes: Vec<(Box<str>, ClassCounts)>,
}

impl Multiclass {
    fn class(&mut self, label: &str) -> &mut ClassCounts {
        let label = if self.classes.len() >= MAX_CLASSES
            && !self.classes.iter().any(|(c, _)| &**c == label)
        {
            "__other__"
        } else {
            label
        };
        let i = match self.classes.iter().position(|(c, _)| &**c == label) {
            Some(i) => i,
            None => {
                self.classes
                    .push((Box::from(label), ClassCounts::default()));
                self.classes.len() - 1
            }
        };
        &mut self.classes[i].1
    }

    fn observe(&mut self, actual: &str, predicted: &str) {
        self.n += 1;
        if actual == predicted {
            self.correct += 1;
            self.class(actual).tp += 1;
        } else {
            self.class(actual).fn_ += 1;
            self.class(predicted).fp += 1;
        }
    }

    fn merge(&mut self, o: &Multiclass) {
        self.n += o.n;
        self.correct += o.correct;
        for (label, c) in &o.classes {
            let mine = self.class(label);
            mine.tp += c.tp;
            mine.fp += c.fp;
            mine.fn_ += c.fn_;
        }
    }

    fn finish(&self, out: &mut Vec<MetricValue>) {
        if self.n == 0 {
            return;
        }
        let n = self.n;
        push_rate(out, "accuracy", "", self.correct, n, n);
        let mut classes: Vec<&(Box<str>, ClassCounts)> = self.classes.iter().collect();
        classes.sort_by(|a, b| a.0.cmp(&b.0));
        let (mut macro_f1, mut weighted, mut support_total) = (0.0, 0.0, 0u64);
        let (mut tp_all, mut fp_all, mut fn_all) = (0u64, 0u64, 0u64);
        for (label, c) in &classes {
            let den = 2 * c.tp + c.fp + c.fn_;
            let f1 = if den > 0 {
                2.0 * c.tp as f64 / den as f64
            } else {
                0.0
            };
            macro_f1 += f1;
            let support = c.tp + c.fn_;
            weighted += f1 * support as f64;
            support_total += support;
            tp_all += c.tp;
            fp_all += c.fp;
            fn_all += c.fn_;
            let feature = format!("class={label}");
            push_rate(out, "precision", &feature, c.tp, c.tp + c.fp, c.tp + c.fp);
            push_rate(out, "recall", &feature, c.tp, support, support);
        }
        if !classes.is_empty() {
            push_finite(
                out,
                "f1_macro",
                "",
                macro_f1 / classes.len() as f64,
                n,
                None,
            );
        }
        let micro_den = 2 * tp_all + fp_all + fn_all;
        if micro_den > 0 {
            push_finite(
                out,
                "f1_micro",
                "",
                2.0 * tp_all as f64 / micro_den as f64,
                n,
                None,
            );
        }
        if support_total > 0 {
            push_finite(
                out,
                "f1_weighted",
                "",
                weighted / support_total as f64,
                n,
                None,
            );
        }
    }
}

/// Regression state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Regression {
    n: u64,
    sum_err: f64,
    sum_abs: f64,
    sum_sq: f64,
    sum_ape: f64,
    /// Mean and sum of squared deviations of the actual values (Chan et al., mergeable).
    mean_y: f64,
    m2_y: f64,
    abs_err: RelativeSketch,
}

impl Regression {
    fn observe(&mut self, actual: f64, predicted: f64) {
        let e = predicted - actual;
        self.n += 1;
        self.sum_err += e;
        self.sum_abs += e.abs();
        self.sum_sq += e * e;
        self.sum_ape += e.abs() / actual.abs().max(f64::EPSILON);
        let d = actual - self.mean_y;
        self.mean_y += d / self.n as f64;
        self.m2_y += d * (actual - self.mean_y);
        self.abs_err.record(e);
    }

    fn merge(&mut self, o: &Regression) {
        if o.n == 0 {
            return;
        }
        let n = (self.n + o.n) as f64;
        let d = o.mean_y - self.mean_y;
        self.m2_y += o.m2_y + d * d * self.n as f64 * o.n as f64 / n;
        self.mean_y += d * o.n as f64 / n;
        self.n += o.n;
        self.sum_err += o.sum_err;
        self.sum_abs += o.sum_abs;
        self.sum_sq += o.sum_sq;
        self.sum_ape += o.sum_ape;
        self.abs_err.merge(&o.abs_err);
    }

    fn finish(&self, out: &mut Vec<MetricValue>) {
        if self.n == 0 {
            return;
        }
        let n = self.n;
        let nf = n as f64;
        let mse = self.sum_sq / nf;
        push_finite(out, "mse", "", mse, n, None);
        push_finite(out, "rmse", "", mse.sqrt(), n, None);
        push_finite(out, "mae", "", self.sum_abs / nf, n, None);
        push_finite(out, "mape", "", self.sum_ape / nf, n, None);
        push_finite(out, "mean_error", "", self.sum_err / nf, n, None);
        let r2 = if self.m2_y > 0.0 {
            1.0 - self.sum_sq / self.m2_y
        } else if self.sum_sq == 0.0 {
            1.0
        } else {
            0.0
        };
        push_finite(out, "r2", "", r2, n, None);
        if let Some(m) = self.abs_err.quantile(0.5) {
            push_finite(out, "median_abs_error", "", m, n, None);
        }
    }
}

/// Outcome side of one (model, version, segment, window): revised as labels arrive.
///
/// Serialisable, its label histogram with its label reference inline (see
/// [`OutcomeAccumulator::share_label_profile`] to share it again).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutcomeAccumulator {
    labeled: u64,
    expired: u64,
    binary: Binary,
    multiclass: Multiclass,
    regression: Regression,
    /// Label delay, ms.
    #[serde(with = "hdr")]
    delay: Histogram<u64>,
    detections: Detections,
    /// Label drift histogram: the window's labels binned on the version's
    /// label reference, once it exists.
    labels: Option<LabelHistogram>,
    /// The window's labels that came while the version had no label
    /// reference yet: binned once it exists ([`OutcomeAccumulator::bin_labels`]),
    /// so a window's label drift covers all its labels whenever the
    /// reference completed (order-independent; see `super::aggregator`).
    #[serde(default)]
    unbinned: UnbinnedLabels,
}

/// Label values kept until a label reference exists to bin them on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct UnbinnedLabels {
    /// Classes (classification) and their counts.
    classes: std::collections::BTreeMap<Box<str>, u64>,
    /// Values (regression).
    values: Vec<f64>,
}

impl UnbinnedLabels {
    fn is_empty(&self) -> bool {
        self.classes.is_empty() && self.values.is_empty()
    }

    fn push(&mut self, v: LabelValue<'_>) {
        match v {
            LabelValue::Class(c) => match self.classes.get_mut(c) {
                Some(n) => *n += 1,
                None => {
                    self.classes.insert(c.into(), 1);
                }
            },
            LabelValue::Value(x) => self.values.push(x),
        }
    }
}

impl Default for OutcomeAccumulator {
    fn default() -> Self {
        Self::new()
    }
}

/// Binary class of a label string: `Some(true)` positive, `Some(false)` negative.
fn binary_class(label: &str, positive: &str) -> Option<bool> {
    let truthy = |s: &str| s == "1" || s.eq_ignore_ascii_case("true");
    let falsy = |s: &str| s == "0" || s.eq_ignore_ascii_case("false");
    if label == positive {
        Some(true)
    } else if truthy(positive) {
        if truthy(label) {
            Some(true)
        } else if falsy(label) {
            Some(false)
        } else {
            None
        }
    } else if falsy(positive) {
        if falsy(label) {
            Some(true)
        } else if truthy(label) {
            Some(false)
        } else {
            None
        }
    } else {
        Some(false)
    }
}

/// The actual binary class of a label: `actual_label`, else `actual_value` 1.0 / 0.0.
pub(crate) fn binary_actual(label: &Label, positive_label: &str) -> Option<bool> {
    match (&label.actual_label, label.actual_value) {
        (Some(l), _) => binary_class(l, positive_label),
        (None, Some(1.0)) => Some(true),
        (None, Some(0.0)) => Some(false),
        _ => None,
    }
}

/// The predicted binary class: `predicted_label` when sent, else `score >= threshold`.
fn binary_predicted(
    outcome: &PredictionOutcome,
    positive_label: &str,
    threshold: f64,
) -> Option<bool> {
    match (&outcome.predicted_label, outcome.score) {
        (Some(l), _) => binary_class(l, positive_label),
        (None, Some(s)) if s.is_finite() => Some(s >= threshold),
        _ => None,
    }
}

/// The error of one labeled outcome, as fed to the change detectors:
/// 0 / 1 (wrong class) for classification, `|predicted - actual|` for
/// regression; `None` when the outcome cannot be evaluated.
pub fn outcome_error(task: &Task, outcome: &PredictionOutcome, label: &Label) -> Option<f64> {
    match task {
        Task::Binary {
            positive_label,
            threshold,
        } => {
            let actual = binary_actual(label, positive_label)?;
            let predicted = binary_predicted(outcome, positive_label, *threshold)?;
            Some((actual != predicted) as u8 as f64)
        }
        Task::Multiclass => {
            let (a, p) = (
                label.actual_label.as_ref()?,
                outcome.predicted_label.as_ref()?,
            );
            Some((a != p) as u8 as f64)
        }
        Task::Regression => {
            let e = (outcome.predicted_value? - label.actual_value?).abs();
            e.is_finite().then_some(e)
        }
    }
}

/// Change-detector detections attributed to a window (see [`OutcomeAccumulator::observe_detections`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Detections {
    /// Errors fed to the detectors from this window's predictions.
    inputs: u64,
    adwin: u64,
    page_hinkley: u64,
}

impl OutcomeAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        OutcomeAccumulator {
            labeled: 0,
            expired: 0,
            binary: Binary::default(),
            multiclass: Multiclass::default(),
            regression: Regression::default(),
            delay: new_histogram(),
            detections: Detections::default(),
            labels: None,
            unbinned: UnbinnedLabels::default(),
        }
    }

    /// Adds a prediction whose label arrived `label_delay_ms` after it.
    pub fn observe_labeled(
        &mut self,
        task: &Task,
        outcome: &PredictionOutcome,
        label: &Label,
        label_delay_ms: i64,
    ) {
        self.labeled += 1;
        // Cannot fail: auto-resize is on and the value is capped.
        let _ = self
            .delay
            .record((label_delay_ms.max(0) as u64).min(MAX_DELAY_MS));
        match task {
            Task::Binary {
                positive_label,
                threshold,
            } => {
                let Some(actual) = binary_actual(label, positive_label) else {
                    return;
                };
                let predicted = binary_predicted(outcome, positive_label, *threshold);
                self.binary.observe(actual, predicted, outcome.score);
            }
            Task::Multiclass => {
                if let (Some(a), Some(p)) = (&label.actual_label, &outcome.predicted_label) {
                    self.multiclass.observe(a, p);
                }
            }
            Task::Regression => {
                if let (Some(a), Some(p)) = (label.actual_value, outcome.predicted_value) {
                    if a.is_finite() && p.is_finite() {
                        self.regression.observe(a, p);
                    }
                }
            }
        }
    }

    /// Counts one error fed to the (model, version)'s change detectors, from
    /// a prediction of this window, and whether ADWIN / Page-Hinkley
    /// detected a change on it. The aggregator calls it on the all-traffic
    /// cell only (the detectors run per version, not per segment).
    pub fn observe_detections(&mut self, adwin: bool, page_hinkley: bool) {
        self.detections.inputs += 1;
        self.detections.adwin += adwin as u64;
        self.detections.page_hinkley += page_hinkley as u64;
    }

    /// Adds one label to the window's label distribution, binned on the
    /// version's label reference `profile` (see [`super::labels`]). A label
    /// binned on another profile than the window's first is ignored.
    pub fn observe_label(&mut self, profile: &Arc<LabelProfile>, value: LabelValue<'_>) {
        self.observe_labels(profile, value, 1);
    }

    /// [`OutcomeAccumulator::observe_label`] for `n` labels of one value.
    fn observe_labels(&mut self, profile: &Arc<LabelProfile>, value: LabelValue<'_>, n: u64) {
        let h = self
            .labels
            .get_or_insert_with(|| LabelHistogram::new(profile.clone()));
        if h.is_on(profile) {
            h.observe_n(value, n);
        }
    }

    /// Adds one label to the window's label distribution: binned on the
    /// version's label reference `profile` when there is one, else kept
    /// until there is ([`OutcomeAccumulator::bin_labels`]).
    pub fn observe_label_value(
        &mut self,
        profile: Option<&Arc<LabelProfile>>,
        value: LabelValue<'_>,
    ) {
        match profile {
            Some(p) => {
                self.bin_labels(p);
                self.observe_label(p, value);
            }
            None => self.unbinned.push(value),
        }
    }

    /// Bins the labels kept while there was no label reference on `profile`
    /// (the version's reference, now complete). Says whether the window has
    /// label drift rows to write.
    pub fn bin_labels(&mut self, profile: &Arc<LabelProfile>) -> bool {
        if !self.unbinned.is_empty() {
            let u = std::mem::take(&mut self.unbinned);
            for (class, n) in &u.classes {
                self.observe_labels(profile, LabelValue::Class(class), *n);
            }
            for &x in &u.values {
                self.observe_label(profile, LabelValue::Value(x));
            }
        }
        self.labels.is_some()
    }

    /// `adwin_drift` / `page_hinkley_drift`: detections of the change
    /// detectors on errors of this window's predictions, when any were fed
    /// (the aggregator feeds them when the window is final).
    pub fn finish_detections(&self, out: &mut Vec<MetricValue>) {
        let d = self.detections;
        if d.inputs > 0 {
            out.push(MetricValue::model("adwin_drift", d.adwin as f64, d.inputs));
            out.push(MetricValue::model(
                "page_hinkley_drift",
                d.page_hinkley as f64,
                d.inputs,
            ));
        }
    }

    /// Label drift rows (`feature = '__label__'`), when the window has labels
    /// binned on a label reference.
    pub fn finish_label_drift(&self, cfg: &DriftConfig, out: &mut Vec<MetricValue>) {
        if let Some(h) = &self.labels {
            h.finish(cfg, out);
        }
    }

    /// Makes the window's label histogram hold `profile` itself when it is
    /// binned on an equal profile (after deserialisation every histogram has
    /// its own copy; sharing the version's saves the memory and changes no
    /// result).
    pub fn share_label_profile(&mut self, profile: &Arc<LabelProfile>) {
        if let Some(h) = &mut self.labels {
            h.share_profile(profile);
        }
    }

    /// Adds a prediction whose label never came (unlabeled at the horizon).
    pub fn observe_expired(&mut self) {
        self.expired += 1;
    }

    /// Adds `other`'s state.
    pub fn merge(&mut self, other: &Self) {
        self.labeled += other.labeled;
        self.expired += other.expired;
        self.binary.merge(&other.binary);
        self.multiclass.merge(&other.multiclass);
        self.regression.merge(&other.regression);
        // With auto-resize on, adding cannot run out of range.
        let _ = self.delay.add(&other.delay);
        self.detections.inputs += other.detections.inputs;
        self.detections.adwin += other.detections.adwin;
        self.detections.page_hinkley += other.detections.page_hinkley;
        match (&mut self.labels, &other.labels) {
            (Some(a), Some(b)) => a.merge(b),
            (None, Some(b)) => self.labels = Some(b.clone()),
            _ => {}
        }
        for (class, n) in &other.unbinned.classes {
            *self.unbinned.classes.entry(class.clone()).or_default() += n;
        }
        self.unbinned
            .values
            .extend_from_slice(&other.unbinned.values);
    }

    /// Labeled + expired predictions: grows with every change, used as the row revision.
    pub fn observations(&self) -> u64 {
        self.labeled + self.expired
    }

    /// Computes `label_count`, `unlabeled_count`, `label_coverage`
    /// (labels / `prediction_count`), the task's performance metrics and
    /// `label_delay_p50|p95` (ms).
    pub fn finish(&self, task: &Task, prediction_count: u64, out: &mut Vec<MetricValue>) {
        out.push(MetricValue::model(
            "label_count",
            self.labeled as f64,
            self.labeled,
        ));
        out.push(MetricValue::model(
            "unlabeled_count",
            self.expired as f64,
            self.expired,
        ));
        push_rate(
            out,
            "label_coverage",
            "",
            self.labeled,
            prediction_count,
            prediction_count,
        );
        match task {
            Task::Binary { .. } => self.binary.finish(out),
            Task::Multiclass => self.multiclass.finish(out),
            Task::Regression => self.regression.finish(out),
        }
        if !self.delay.is_empty() {
            let n = self.delay.len();
            for (metric, q) in [("label_delay_p50", 0.5), ("label_delay_p95", 0.95)] {
                let ms = self
                    .delay
                    .median_equivalent(self.delay.value_at_quantile(q));
                push_finite(out, metric, "", ms as f64, n, None);
            }
        }
    }

    /// Approximate heap bytes held.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + (self.binary.pos.capacity() + self.binary.neg.capacity()) * 8
            + self
                .multiclass
                .classes
                .iter()
                .map(|(c, _)| c.len() + 40)
                .sum::<usize>()
            + self.regression.abs_err.approx_bytes()
            + self.labels.as_ref().map_or(0, LabelHistogram::approx_bytes)
            + self.unbinned.values.capacity() * 8
            + self
                .unbinned
                .classes
                .keys()
                .map(|c| c.len() + 40)
                .sum::<usize>()
            + self.delay.distinct_values() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary() -> Task {
        Task::Binary {
            positive_label: "1".into(),
            threshold: 0.5,
        }
    }

    fn outcome(score: Option<f64>, label: Option<&str>, value: Option<f64>) -> PredictionOutcome {
        PredictionOutcome {
            score,
            predicted_label: label.map(Box::from),
            predicted_value: value,
        }
    }

    fn label(l: Option<&str>, v: Option<f64>) -> Label {
        Label {
            actual_label: l.map(Box::from),
            actual_value: v,
            timestamp: 0,
        }
    }

    fn get(out: &[MetricValue], m: &str) -> Option<f64> {
        out.iter()
            .find(|v| v.metric == m && v.feature.is_empty())
            .map(|v| v.value)
    }

    #[test]
    fn binary_metrics_hand_checked() {
        let t = binary();
        let mut acc = OutcomeAccumulator::new();
        // (score, actual): tp 0.9/1, fp 0.8/0, fn 0.3/1, tn 0.1/0, tn 0.2/"false"
        for (s, a) in [
            (0.9, "1"),
            (0.8, "0"),
            (0.3, "true"),
            (0.1, "0"),
            (0.2, "false"),
        ] {
            acc.observe_labeled(
                &t,
                &outcome(Some(s), None, None),
                &label(Some(a), None),
                1000,
            );
        }
        acc.observe_labeled(
            &t,
            &outcome(Some(0.7), None, None),
            &label(Some("maybe"), None),
            10,
        );
        acc.observe_expired();
        assert_eq!(acc.observations(), 7);
        let mut out = Vec::new();
        acc.finish(&t, 10, &mut out);
        assert_eq!(get(&out, "label_count"), Some(6.0));
        assert_eq!(get(&out, "unlabeled_count"), Some(1.0));
        assert_eq!(get(&out, "label_coverage"), Some(0.6));
        assert_eq!(get(&out, "accuracy"), Some(0.6));
        assert_eq!(get(&out, "precision"), Some(0.5));
        assert_eq!(get(&out, "recall"), Some(0.5));
        assert_eq!(get(&out, "f1"), Some(0.5));
        assert_eq!(get(&out, "fpr"), Some(1.0 / 3.0));
        assert_eq!(get(&out, "specificity"), Some(2.0 / 3.0));
        // positives 0.9, 0.3; negatives 0.8, 0.2, 0.1: pairs won 3 + 2 = 5 of 6
        assert!((get(&out, "roc_auc").unwrap() - 5.0 / 6.0).abs() < 1e-12);
        // sklearn average_precision_score([1,0,1,0,0],[.9,.8,.3,.1,.2]) = 0.8333
        assert!((get(&out, "pr_auc").unwrap() - (0.5 * 1.0 + 0.5 * 2.0 / 3.0)).abs() < 1e-12);
        let brier = (0.01 + 0.64 + 0.49 + 0.01 + 0.04) / 5.0;
        assert!((get(&out, "brier").unwrap() - brier).abs() < 1e-12);
        let ll = -(0.9f64.ln() + 0.2f64.ln() + 0.3f64.ln() + 0.9f64.ln() + 0.8f64.ln()) / 5.0;
        assert!((get(&out, "log_loss").unwrap() - ll).abs() < 1e-12);
        // hdrhistogram with 2 significant digits: within 1%
        let delay = get(&out, "label_delay_p50").unwrap();
        assert!((delay - 1000.0).abs() <= 10.0, "{delay}");
    }

    #[test]
    fn undefined_rates_are_left_out() {
        let t = binary();
        let mut acc = OutcomeAccumulator::new();
        acc.observe_labeled(
            &t,
            &outcome(Some(0.1), None, None),
            &label(Some("0"), None),
            5,
        );
        let mut out = Vec::new();
        acc.finish(&t, 0, &mut out);
        assert_eq!(get(&out, "accuracy"), Some(1.0));
        assert_eq!(get(&out, "precision"), None);
        assert_eq!(get(&out, "recall"), None);
        assert_eq!(get(&out, "roc_auc"), None);
        assert_eq!(get(&out, "label_coverage"), None);
        assert!(out.iter().all(|v| v.value.is_finite()));
    }

    #[test]
    fn custom_positive_label_and_predicted_label() {
        let t = Task::Binary {
            positive_label: "fraud".into(),
            threshold: 0.9,
        };
        let mut acc = OutcomeAccumulator::new();
        acc.observe_labeled(
            &t,
            &outcome(Some(0.5), Some("fraud"), None),
            &label(Some("fraud"), None),
            0,
        );
        acc.observe_labeled(
            &t,
            &outcome(Some(0.95), None, None),
            &label(Some("ok"), None),
            0,
        );
        let mut out = Vec::new();
        acc.finish(&t, 2, &mut out);
        assert_eq!(get(&out, "precision"), Some(0.5));
        assert_eq!(get(&out, "recall"), Some(1.0));
        assert_eq!(binary_class("TRUE", "1"), Some(true));
        assert_eq!(binary_class("false", "true"), Some(false));
        assert_eq!(binary_class("x", "1"), None);
    }

    #[test]
    fn multiclass_hand_checked() {
        let mut acc = OutcomeAccumulator::new();
        // actual, predicted
        for (a, p) in [("a", "a"), ("a", "b"), ("b", "b"), ("c", "a")] {
            acc.observe_labeled(
                &Task::Multiclass,
                &outcome(None, Some(p), None),
                &label(Some(a), None),
                0,
            );
        }
        let mut out = Vec::new();
        acc.finish(&Task::Multiclass, 4, &mut out);
        assert_eq!(get(&out, "accuracy"), Some(0.5));
        // f1: a 2/(2+1+1)=.5, b 2/(2+1)=2/3, c 0 -> macro 7/18; weighted (.5*2 + 2/3)/4
        assert!((get(&out, "f1_macro").unwrap() - 7.0 / 18.0).abs() < 1e-12);
        assert!((get(&out, "f1_weighted").unwrap() - (1.0 + 2.0 / 3.0) / 4.0).abs() < 1e-12);
        assert_eq!(get(&out, "f1_micro"), Some(0.5));
        let class = |m: &str, c: &str| {
            out.iter()
                .find(|v| v.metric == m && v.feature == format!("class={c}"))
                .map(|v| v.value)
        };
        assert_eq!(class("precision", "a"), Some(0.5));
        assert_eq!(class("recall", "a"), Some(0.5));
        assert_eq!(class("precision", "c"), None);
        assert_eq!(class("recall", "c"), Some(0.0));
    }

    #[test]
    fn regression_hand_checked() {
        let t = Task::Regression;
        let mut acc = OutcomeAccumulator::new();
        // actual, predicted: errors +1, -1, +2, 0
        for (a, p) in [(1.0, 2.0), (2.0, 1.0), (3.0, 5.0), (4.0, 4.0)] {
            acc.observe_labeled(&t, &outcome(None, None, Some(p)), &label(None, Some(a)), 0);
        }
        let mut out = Vec::new();
        acc.finish(&t, 4, &mut out);
        assert_eq!(get(&out, "mse"), Some(1.5));
        assert_eq!(get(&out, "rmse"), Some(1.5f64.sqrt()));
        assert_eq!(get(&out, "mae"), Some(1.0));
        assert_eq!(get(&out, "mean_error"), Some(0.5));
        // SS_tot = 5, SS_res = 6
        assert!((get(&out, "r2").unwrap() - (1.0 - 6.0 / 5.0)).abs() < 1e-12);
        assert!((get(&out, "mape").unwrap() - (1.0 + 0.5 + 2.0 / 3.0) / 4.0).abs() < 1e-12);
        let med = get(&out, "median_abs_error").unwrap();
        assert!((med - 1.0).abs() < 0.01, "{med}");
        // constant actuals
        let mut c = OutcomeAccumulator::new();
        c.observe_labeled(
            &t,
            &outcome(None, None, Some(1.0)),
            &label(None, Some(1.0)),
            0,
        );
        out.clear();
        c.finish(&t, 1, &mut out);
        assert_eq!(get(&out, "r2"), Some(1.0));
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;
    use crate::metrics::accumulator::proptests::{assert_finite, assert_same};
    use crate::metrics::labels::{label_value, LabelReferenceBuilder};

    /// (score / prediction, actual, class index, delay ms, expired)
    type Ev = (f64, f64, u8, u8, i64, bool);

    fn ev_strategy() -> impl Strategy<Value = Ev> {
        (
            0.0..1.0f64,
            -100.0..100.0f64,
            0u8..5,
            0u8..5,
            -10i64..100_000,
            prop::bool::weighted(0.1),
        )
    }

    fn tasks() -> [Task; 3] {
        [
            Task::Binary {
                positive_label: "1".into(),
                threshold: 0.5,
            },
            Task::Multiclass,
            Task::Regression,
        ]
    }

    fn run(task: &Task, events: &[Ev]) -> OutcomeAccumulator {
        let mut acc = OutcomeAccumulator::new();
        for &(s, y, a, p, delay, expired) in events {
            if expired {
                acc.observe_expired();
                continue;
            }
            let (outcome, label) = match task {
                Task::Binary { .. } => (
                    PredictionOutcome {
                        score: Some(s),
                        predicted_label: None,
                        predicted_value: None,
                    },
                    Label {
                        actual_label: Some(if a % 2 == 0 { "1" } else { "0" }.into()),
                        actual_value: None,
                        timestamp: 0,
                    },
                ),
                Task::Multiclass => (
                    PredictionOutcome {
                        score: None,
                        predicted_label: Some(format!("c{p}").into()),
                        predicted_value: None,
                    },
                    Label {
                        actual_label: Some(format!("c{a}").into()),
                        actual_value: None,
                        timestamp: 0,
                    },
                ),
                Task::Regression => (
                    PredictionOutcome {
                        score: None,
                        predicted_label: None,
                        predicted_value: Some(y + s * 10.0),
                    },
                    Label {
                        actual_label: None,
                        actual_value: Some(y),
                        timestamp: 0,
                    },
                ),
            };
            acc.observe_labeled(task, &outcome, &label, delay);
            acc.observe_detections(s > 0.9, s < 0.05);
            if let Some(v) = label_value(task, &label) {
                acc.observe_label(&label_profile(task), v);
            }
        }
        acc
    }

    /// A label reference per task (fixed, as the aggregator's is per version).
    fn label_profile(task: &Task) -> Arc<LabelProfile> {
        let cfg = DriftConfig {
            label_reference_size: 12,
            ..Default::default()
        };
        let mut b = LabelReferenceBuilder::new(&cfg);
        for i in 0..12u8 {
            let class = format!("c{}", i % 3);
            let v = match task {
                Task::Binary { .. } => LabelValue::Class(if i % 4 == 0 { "1" } else { "0" }),
                Task::Multiclass => LabelValue::Class(&class),
                Task::Regression => LabelValue::Value(f64::from(i) * 10.0 - 50.0),
            };
            b.observe(v);
        }
        Arc::new(b.build())
    }

    fn finish(acc: &OutcomeAccumulator, task: &Task, n: u64) -> Vec<MetricValue> {
        let mut out = Vec::new();
        acc.finish(task, n, &mut out);
        acc.finish_label_drift(&DriftConfig::default(), &mut out);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn merge_equals_observing_the_concatenation(
            events in prop::collection::vec(ev_strategy(), 0..300),
            split in 0usize..300,
        ) {
            let k = split.min(events.len());
            for task in tasks() {
                let whole = run(&task, &events);
                let mut a = run(&task, &events[..k]);
                a.merge(&run(&task, &events[k..]));
                let n = events.len() as u64;
                let (x, y) = (finish(&whole, &task, n), finish(&a, &task, n));
                assert_finite(&x);
                assert_same(&x, &y);
                prop_assert_eq!(a.observations(), n);
            }
        }

        #[test]
        fn one_class_and_constant_targets_give_finite_values(
            n in 0usize..40,
            y in -5.0..5.0f64,
        ) {
            let events: Vec<Ev> = (0..n).map(|_| (0.7, y, 0, 0, 5, false)).collect();
            for task in tasks() {
                let out = finish(&run(&task, &events), &task, n as u64);
                assert_finite(&out);
            }
        }
    }
}
