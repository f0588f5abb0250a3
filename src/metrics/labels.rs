//! Label drift (`feature = '__label__'`): the distribution of the actual
//! labels of a window against a reference label distribution of the same
//! (model, version).
//!
//! **Reference.** Labels are not part of the prediction events a reference
//! profile is built from (imported files or the first production events), so
//! the label reference is its own sample: the first `label_reference_size`
//! evaluable labels of the version (default 1000) in a canonical order that
//! does not depend on how labels arrive: windows as they become final
//! (`label_horizon` past their end), and within a window by prediction
//! time, error, label (collected by the aggregator through
//! [`LabelReferenceBuilder`]). A window's labels that come before the
//! reference exists are kept and binned once it does, so every window
//! compares all its labels with it. The label reference (and the
//! builder collecting it) are part of the aggregator's snapshot, so a restored
//! service compares with the same reference.
//!
//! **Binning.** Binary: two bins, positive / negative (the task's positive
//! label rules); multiclass: one bin per reference class (at most
//! `max_categories`, most frequent first) plus one for every other class;
//! regression: the numeric convention of the feature profiles, `bins`
//! equal-frequency bins from the reference quantiles (numpy "linear"),
//! values outside the reference range in the edge bins.
//!
//! **Statistics.** On those bins, exactly as for feature drift: `psi`,
//! `js_distance`, `kl_divergence`, `hellinger` (smoothed proportions),
//! `chi2_statistic` with its p-value (2 x k contingency over the non-empty
//! bins), and `drift_detected` decided alone like `__prediction__`:
//! at least `min_samples` labels, `psi >= psi_threshold` or
//! `js_distance >= js_threshold`, and the chi-square p-value below
//! `p_value_threshold`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::drift;
use super::performance::binary_actual;
use super::quantile::quantile_sorted;
use super::reference::{CategoricalProfile, FastMap};
use super::snapshot::{counts, sorted_map};
use super::{push_finite, DriftConfig, MetricValue, Task};
use crate::model::Label;

/// The feature name of label drift rows.
pub const LABEL_FEATURE: &str = "__label__";

/// The part of a label that label drift looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LabelValue<'a> {
    /// A class (binary: `"1"` positive, `"0"` negative).
    Class(&'a str),
    /// A regression target.
    Value(f64),
}

/// The label value of `label` for `task`; `None` when the label cannot be evaluated.
pub fn label_value<'a>(task: &Task, label: &'a Label) -> Option<LabelValue<'a>> {
    match task {
        Task::Binary { positive_label, .. } => {
            let positive = binary_actual(label, positive_label)?;
            Some(LabelValue::Class(if positive { "1" } else { "0" }))
        }
        Task::Multiclass => label.actual_label.as_deref().map(LabelValue::Class),
        Task::Regression => label
            .actual_value
            .filter(|v| v.is_finite())
            .map(LabelValue::Value),
    }
}

/// The reference label distribution of one (model, version). Serialisable
/// (the class index is rebuilt when deserialised).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "LabelProfileData")]
pub struct LabelProfile {
    /// Classes (classification); `None` for regression.
    classes: Option<CategoricalProfile>,
    /// Coarse cut points (regression), ascending and distinct.
    cuts: Vec<f64>,
    /// Reference count per bin.
    reference: Vec<u64>,
}

/// The stored form of a [`LabelProfile`] (same fields, index not rebuilt yet).
#[derive(Deserialize)]
struct LabelProfileData {
    classes: Option<CategoricalProfile>,
    cuts: Vec<f64>,
    reference: Vec<u64>,
}

impl From<LabelProfileData> for LabelProfile {
    fn from(d: LabelProfileData) -> Self {
        let mut classes = d.classes;
        if let Some(c) = &mut classes {
            c.reindex();
        }
        LabelProfile {
            classes,
            cuts: d.cuts,
            reference: d.reference,
        }
    }
}

impl LabelProfile {
    /// The bin of a label value; `None` when its kind does not match the profile.
    #[inline]
    pub fn bin(&self, v: LabelValue<'_>) -> Option<usize> {
        match (&self.classes, v) {
            (Some(c), LabelValue::Class(s)) => Some(c.bin(s) as usize),
            (None, LabelValue::Value(x)) => Some(self.cuts.partition_point(|&c| c <= x)),
            _ => None,
        }
    }

    /// Number of bins.
    pub fn bin_count(&self) -> usize {
        self.reference.len()
    }

    /// Reference count per bin.
    pub fn reference(&self) -> &[u64] {
        &self.reference
    }
}

/// Collects the first labels of a version into its [`LabelProfile`].
///
/// Serialisable without its configuration (target size, bins, category
/// cap): a deserialised builder has the default configuration until
/// [`LabelReferenceBuilder::set_config`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "LabelBuilderData")]
pub struct LabelReferenceBuilder {
    #[serde(skip)]
    target: usize,
    #[serde(skip)]
    bins: usize,
    #[serde(skip)]
    max_categories: usize,
    #[serde(serialize_with = "sorted_map")]
    classes: FastMap<String, u64>,
    class_count: usize,
    values: Vec<f64>,
}

/// The stored form of a [`LabelReferenceBuilder`]: its labels, no configuration.
#[derive(Deserialize)]
struct LabelBuilderData {
    classes: FastMap<String, u64>,
    class_count: usize,
    values: Vec<f64>,
}

impl From<LabelBuilderData> for LabelReferenceBuilder {
    fn from(d: LabelBuilderData) -> Self {
        LabelReferenceBuilder {
            classes: d.classes,
            class_count: d.class_count,
            values: d.values,
            ..LabelReferenceBuilder::new(&DriftConfig::default())
        }
    }
}

impl LabelReferenceBuilder {
    /// A builder that completes after `cfg.label_reference_size` labels (at least 1).
    pub fn new(cfg: &DriftConfig) -> Self {
        let mut b = LabelReferenceBuilder {
            target: 0,
            bins: 0,
            max_categories: 0,
            classes: FastMap::default(),
            class_count: 0,
            values: Vec::new(),
        };
        b.set_config(cfg);
        b
    }

    /// Applies `cfg`'s label reference size, bins and category cap from now
    /// on (they are not serialised: a restored builder gets them back here).
    pub fn set_config(&mut self, cfg: &DriftConfig) {
        self.target = cfg.label_reference_size.max(1);
        self.bins = cfg.bins.clamp(1, 1000);
        self.max_categories = cfg.max_categories.max(1);
    }

    /// Labels collected so far.
    pub fn len(&self) -> usize {
        self.class_count + self.values.len()
    }

    /// True before the first label.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds one label; returns the profile once the target size is reached.
    pub fn observe(&mut self, v: LabelValue<'_>) -> Option<LabelProfile> {
        match v {
            LabelValue::Class(s) => {
                self.class_count += 1;
                match self.classes.get_mut(s) {
                    Some(c) => *c += 1,
                    None => {
                        self.classes.insert(s.to_owned(), 1);
                    }
                }
            }
            LabelValue::Value(x) if x.is_finite() => self.values.push(x),
            LabelValue::Value(_) => return None,
        }
        (self.len() >= self.target).then(|| self.build())
    }

    /// The profile of the labels collected so far (classes when they are
    /// at least as many as values).
    pub fn build(&self) -> LabelProfile {
        if self.class_count >= self.values.len() {
            let classes = CategoricalProfile::from_counts(&self.classes, self.max_categories);
            LabelProfile {
                reference: classes.counts.clone(),
                classes: Some(classes),
                cuts: Vec::new(),
            }
        } else {
            let mut sorted = self.values.clone();
            sorted.sort_by(f64::total_cmp);
            let mut cuts: Vec<f64> = (1..self.bins)
                .filter_map(|i| quantile_sorted(&sorted, i as f64 / self.bins as f64))
                .collect();
            cuts.dedup();
            let mut reference = vec![0u64; cuts.len() + 1];
            for &x in &sorted {
                reference[cuts.partition_point(|&c| c <= x)] += 1;
            }
            LabelProfile {
                classes: None,
                cuts,
                reference,
            }
        }
    }
}

/// The labels of one window binned against a [`LabelProfile`]; mergeable.
/// Serialisable, with a copy of its profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelHistogram {
    profile: Arc<LabelProfile>,
    #[serde(with = "counts")]
    counts: Vec<u64>,
}

impl LabelHistogram {
    /// An empty histogram on `profile`'s bins.
    pub fn new(profile: Arc<LabelProfile>) -> Self {
        LabelHistogram {
            counts: vec![0; profile.bin_count()],
            profile,
        }
    }

    /// True when built on `profile` (the same profile or an equal one).
    pub fn is_on(&self, profile: &Arc<LabelProfile>) -> bool {
        Arc::ptr_eq(&self.profile, profile) || *self.profile == **profile
    }

    /// Holds `profile` itself instead of an equal copy (no change otherwise).
    pub fn share_profile(&mut self, profile: &Arc<LabelProfile>) {
        if !Arc::ptr_eq(&self.profile, profile) && *self.profile == **profile {
            self.profile = profile.clone();
        }
    }

    /// Adds one label value (ignored when its kind does not match the profile).
    #[inline]
    pub fn observe(&mut self, v: LabelValue<'_>) {
        self.observe_n(v, 1);
    }

    /// Adds `n` labels of value `v`.
    pub fn observe_n(&mut self, v: LabelValue<'_>, n: u64) {
        if let Some(c) = self.profile.bin(v).and_then(|b| self.counts.get_mut(b)) {
            *c += n;
        }
    }

    /// Adds `other`'s counts when it is on the same profile.
    pub fn merge(&mut self, other: &LabelHistogram) {
        if self.is_on(&other.profile) {
            for (a, b) in self.counts.iter_mut().zip(&other.counts) {
                *a += b;
            }
        }
    }

    /// Labels binned.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `__label__` rows (see the module docs); nothing without labels.
    pub fn finish(&self, cfg: &DriftConfig, out: &mut Vec<MetricValue>) {
        let n = self.count();
        let (mut e, mut a) = (Vec::new(), Vec::new());
        if n == 0
            || !drift::smoothed(&self.profile.reference, cfg.smoothing, &mut e)
            || !drift::smoothed(&self.counts, cfg.smoothing, &mut a)
        {
            return;
        }
        let s = drift::binned_stats(&e, &a);
        let f = LABEL_FEATURE;
        push_finite(out, "psi", f, s.psi, n, None);
        push_finite(out, "js_distance", f, s.js_distance, n, None);
        push_finite(out, "kl_divergence", f, s.kl_divergence, n, None);
        push_finite(out, "hellinger", f, s.hellinger, n, None);
        let Some((chi2, p, _)) = drift::chi2_contingency(&self.profile.reference, &self.counts)
        else {
            return;
        };
        push_finite(out, "chi2_statistic", f, chi2, n, Some(p));
        if n >= cfg.min_samples && p.is_finite() {
            let large = s.psi >= cfg.psi_threshold || s.js_distance >= cfg.js_threshold;
            let detected = large && p < cfg.p_value_threshold;
            push_finite(out, "drift_detected", f, detected as u8 as f64, n, Some(p));
        }
    }

    /// Approximate heap bytes held (the profile is shared).
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.counts.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(l: Option<&str>, v: Option<f64>) -> Label {
        Label {
            actual_label: l.map(Box::from),
            actual_value: v,
            timestamp: 0,
        }
    }

    #[test]
    fn label_values_follow_the_task() {
        let binary = Task::Binary {
            positive_label: "1".into(),
            threshold: 0.5,
        };
        let l = label(Some("true"), None);
        assert_eq!(label_value(&binary, &l), Some(LabelValue::Class("1")));
        let l = label(None, Some(0.0));
        assert_eq!(label_value(&binary, &l), Some(LabelValue::Class("0")));
        let l = label(Some("maybe"), None);
        assert_eq!(label_value(&binary, &l), None);
        let l = label(Some("cat"), Some(2.0));
        assert_eq!(
            label_value(&Task::Multiclass, &l),
            Some(LabelValue::Class("cat"))
        );
        assert_eq!(
            label_value(&Task::Regression, &l),
            Some(LabelValue::Value(2.0))
        );
        let l = label(None, Some(f64::NAN));
        assert_eq!(label_value(&Task::Regression, &l), None);
    }

    #[test]
    fn builder_completes_at_the_target_and_bins_like_features() {
        let cfg = DriftConfig {
            label_reference_size: 5,
            bins: 4,
            ..Default::default()
        };
        let mut b = LabelReferenceBuilder::new(&cfg);
        for x in [1.0, 2.0, 3.0, 4.0] {
            assert!(b.observe(LabelValue::Value(x)).is_none());
        }
        let p = b.observe(LabelValue::Value(5.0)).expect("complete at 5");
        // np.quantile([1..5], [.25, .5, .75]) = [2, 3, 4]; searchsorted right
        assert_eq!(p.cuts, vec![2.0, 3.0, 4.0]);
        assert_eq!(p.reference(), &[1, 1, 1, 2]);
        assert_eq!(p.bin(LabelValue::Value(-10.0)), Some(0));
        assert_eq!(p.bin(LabelValue::Value(3.0)), Some(2));
        assert_eq!(p.bin(LabelValue::Class("a")), None);
        let mut h = LabelHistogram::new(Arc::new(p));
        h.observe(LabelValue::Value(100.0));
        h.observe(LabelValue::Class("a"));
        assert_eq!(h.count(), 1);
    }

    #[test]
    fn shifted_classes_are_detected_and_stable_ones_not() {
        let cfg = DriftConfig {
            label_reference_size: 400,
            ..Default::default()
        };
        let mut b = LabelReferenceBuilder::new(&cfg);
        let mut profile = None;
        for i in 0..400 {
            profile = b.observe(LabelValue::Class(["a", "b", "c", "d"][i % 4]));
        }
        let profile = Arc::new(profile.expect("built"));
        let mut same = LabelHistogram::new(profile.clone());
        let mut shifted = LabelHistogram::new(profile.clone());
        for i in 0..200 {
            same.observe(LabelValue::Class(["a", "b", "c", "d"][i % 4]));
            shifted.observe(LabelValue::Class(["a", "a", "a", "e"][i % 4]));
        }
        let get = |h: &LabelHistogram, m: &str| {
            let mut out = Vec::new();
            h.finish(&cfg, &mut out);
            out.iter()
                .find(|v| v.metric == m && v.feature == LABEL_FEATURE)
                .map(|v| v.value)
        };
        assert_eq!(get(&same, "psi"), Some(0.0));
        assert_eq!(get(&same, "drift_detected"), Some(0.0));
        assert_eq!(get(&same, "chi2_statistic"), Some(0.0));
        assert_eq!(get(&shifted, "drift_detected"), Some(1.0));
        assert!(get(&shifted, "js_distance").unwrap() > 0.3);
        let empty = LabelHistogram::new(profile);
        assert_eq!(get(&empty, "psi"), None);
    }
}
