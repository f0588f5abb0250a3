//! Data-integrity counters of one feature in one window: missing (null or
//! absent), NaN / infinite, wrong type, outside the reference range, category
//! unseen in the reference. Mergeable by addition.
//!
//! Rates: `missing_rate`, `nan_rate` and `type_mismatch_rate` are shares of
//! the events resolved against the profile; `out_of_range_rate` and
//! `new_category_rate` are shares of the feature's valid (binned) values.
//! `new_category_rate` counts every value outside the profile's kept
//! categories (see the category cap in the [module docs](super)).

use serde::{Deserialize, Serialize};

use super::{push_finite, MetricValue};

/// Integrity counters of one feature.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegrityCounts {
    /// Events resolved against the profile.
    pub seen: u64,
    /// Null or absent values.
    pub missing: u64,
    /// NaN or infinite numbers.
    pub non_finite: u64,
    /// Values of the wrong type for the profile.
    pub mismatch: u64,
    /// Valid values outside the reference `[min, max]` (numeric).
    pub out_of_range: u64,
    /// Valid values in the "other / unseen" bin (categorical).
    pub new_category: u64,
}

impl IntegrityCounts {
    /// Values that were binned.
    pub fn valid(&self) -> u64 {
        self.seen
            .saturating_sub(self.missing + self.non_finite + self.mismatch)
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &IntegrityCounts) {
        self.seen += other.seen;
        self.missing += other.missing;
        self.non_finite += other.non_finite;
        self.mismatch += other.mismatch;
        self.out_of_range += other.out_of_range;
        self.new_category += other.new_category;
    }

    /// Emits the rates of a numeric (`numeric = true`) or categorical feature.
    pub fn finish(&self, feature: &str, numeric: bool, out: &mut Vec<MetricValue>) {
        if self.seen == 0 {
            return;
        }
        let seen = self.seen as f64;
        push_finite(
            out,
            "missing_rate",
            feature,
            self.missing as f64 / seen,
            self.seen,
            None,
        );
        push_finite(
            out,
            "type_mismatch_rate",
            feature,
            self.mismatch as f64 / seen,
            self.seen,
            None,
        );
        let valid = self.valid();
        if numeric {
            push_finite(
                out,
                "nan_rate",
                feature,
                self.non_finite as f64 / seen,
                self.seen,
                None,
            );
            if valid > 0 {
                push_finite(
                    out,
                    "out_of_range_rate",
                    feature,
                    self.out_of_range as f64 / valid as f64,
                    valid,
                    None,
                );
            }
        } else if valid > 0 {
            push_finite(
                out,
                "new_category_rate",
                feature,
                self.new_category as f64 / valid as f64,
                valid,
                None,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_use_the_documented_denominators() {
        let c = IntegrityCounts {
            seen: 10,
            missing: 2,
            non_finite: 1,
            mismatch: 1,
            out_of_range: 3,
            new_category: 0,
        };
        assert_eq!(c.valid(), 6);
        let mut out = Vec::new();
        c.finish("x", true, &mut out);
        let get = |m: &str| {
            out.iter()
                .find(|v| v.metric == m)
                .map(|v| (v.value, v.samples))
        };
        assert_eq!(get("missing_rate"), Some((0.2, 10)));
        assert_eq!(get("nan_rate"), Some((0.1, 10)));
        assert_eq!(get("type_mismatch_rate"), Some((0.1, 10)));
        assert_eq!(get("out_of_range_rate"), Some((0.5, 6)));
        assert_eq!(get("new_category_rate"), None);
        let mut merged = c.clone();
        merged.merge(&c);
        assert_eq!(merged.seen, 20);
        assert_eq!(merged.out_of_range, 6);
        out.clear();
        IntegrityCounts::default().finish("x", true, &mut out);
        assert!(out.is_empty());
    }
}
