//! Quantiles: exact quantiles of a sorted sample (numpy's default "linear"
//! definition, bit for bit) for reference profiles, and [`RelativeSketch`], a
//! small mergeable sketch of non-negative values with bounded relative error
//! (the DDSketch construction) for window medians such as `median_abs_error`.

use serde::{Deserialize, Serialize};

/// Quantile `q` in `[0, 1]` of an ascending, NaN-free sample, as numpy's
/// `np.quantile(x, q)` (method "linear") computes it; `None` when empty.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let virtual_index = (n - 1) as f64 * q;
    if virtual_index >= (n - 1) as f64 {
        return sorted.last().copied();
    }
    if virtual_index <= 0.0 {
        return sorted.first().copied();
    }
    let lo = virtual_index.floor();
    let t = virtual_index - lo;
    let i = lo as usize;
    let (a, b) = (sorted[i], sorted[i + 1]);
    // numpy's `_lerp`: the two formulas keep the result monotone and exact at the ends.
    let diff = b - a;
    Some(if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    })
}

/// Relative accuracy of [`RelativeSketch`]: a returned quantile is within
/// 0.5 % of a value of the requested rank.
const SKETCH_ALPHA: f64 = 0.005;
/// Most buckets a sketch keeps; beyond it the lowest buckets collapse (their
/// values only matter for quantiles far below the median).
const SKETCH_MAX_BUCKETS: usize = 2048;

/// A mergeable quantile sketch of non-negative values with relative error
/// [`SKETCH_ALPHA`] (logarithmic buckets, DDSketch). Memory grows with the
/// value range (about 230 buckets per decade), capped at 2048 buckets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RelativeSketch {
    /// Index of `counts[0]`.
    offset: i32,
    /// Counts of the logarithmic buckets `offset..offset + len`.
    #[serde(with = "super::snapshot::counts")]
    counts: Vec<u64>,
    /// Values too small to bucket (`< 1e-300`, including zero).
    zeros: u64,
    /// Total values.
    total: u64,
}

impl RelativeSketch {
    fn gamma_ln() -> f64 {
        ((1.0 + SKETCH_ALPHA) / (1.0 - SKETCH_ALPHA)).ln()
    }

    /// Records `v` (negative values count as their absolute value; NaN is ignored).
    pub fn record(&mut self, v: f64) {
        let v = v.abs();
        if v.is_nan() {
            return;
        }
        self.total += 1;
        if v < 1e-300 {
            self.zeros += 1;
            return;
        }
        let v = v.min(f64::MAX);
        let idx = (v.ln() / Self::gamma_ln()).ceil() as i32;
        self.add_bucket(idx, 1);
    }

    fn add_bucket(&mut self, idx: i32, n: u64) {
        if self.counts.is_empty() {
            self.offset = idx;
            self.counts.push(n);
            return;
        }
        if idx < self.offset {
            let grow = (self.offset - idx) as usize;
            if self.counts.len() + grow > SKETCH_MAX_BUCKETS {
                // Too wide: fold into the lowest kept bucket.
                self.counts[0] += n;
                return;
            }
            let mut v = vec![0; grow];
            v.extend_from_slice(&self.counts);
            self.counts = v;
            self.offset = idx;
        }
        let pos = (idx - self.offset) as usize;
        if pos >= self.counts.len() {
            self.counts.resize(pos + 1, 0);
        }
        self.counts[pos] += n;
        if self.counts.len() > SKETCH_MAX_BUCKETS {
            let excess = self.counts.len() - SKETCH_MAX_BUCKETS;
            let folded: u64 = self.counts[..=excess].iter().sum();
            self.counts.drain(..excess);
            self.counts[0] = folded;
            self.offset += excess as i32;
        }
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &RelativeSketch) {
        self.zeros += other.zeros;
        self.total += other.total;
        for (i, &c) in other.counts.iter().enumerate() {
            if c > 0 {
                self.add_bucket(other.offset + i as i32, c);
            }
        }
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (rank `q * (n - 1)`, lower), within the
    /// relative accuracy; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.total - 1) as f64).floor() as u64;
        if rank < self.zeros {
            return Some(0.0);
        }
        let mut seen = self.zeros;
        let g = Self::gamma_ln().exp();
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                let idx = self.offset + i as i32;
                // The bucket (g^(idx-1), g^idx]: its relative-error midpoint.
                return Some(2.0 * g.powi(idx) / (g + 1.0));
            }
        }
        None
    }

    /// Approximate heap bytes.
    pub fn approx_bytes(&self) -> usize {
        self.counts.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_matches_numpy_linear() {
        // np.quantile([1, 2, 4, 8], [0, .25, .5, .9, 1]) = [1, 1.75, 3, 6.8, 8]
        let x = [1.0, 2.0, 4.0, 8.0];
        let q = |p| quantile_sorted(&x, p).unwrap();
        assert_eq!(q(0.0), 1.0);
        assert_eq!(q(0.25), 1.75);
        assert_eq!(q(0.5), 3.0);
        assert!((q(0.9) - 6.8).abs() < 1e-12);
        assert_eq!(q(1.0), 8.0);
        assert_eq!(quantile_sorted(&[], 0.5), None);
        assert_eq!(quantile_sorted(&[5.0], 0.3), Some(5.0));
    }

    #[test]
    fn sketch_median_is_within_relative_error() {
        let mut s = RelativeSketch::default();
        for i in 1..=1001 {
            s.record(i as f64);
        }
        let m = s.quantile(0.5).unwrap();
        assert!((m - 501.0).abs() / 501.0 <= SKETCH_ALPHA * 1.01, "{m}");
        s.record(0.0);
        assert_eq!(s.count(), 1002);
        assert_eq!(s.quantile(0.0), Some(0.0));
    }

    #[test]
    fn sketch_merge_equals_single_sketch() {
        let mut a = RelativeSketch::default();
        let mut b = RelativeSketch::default();
        let mut all = RelativeSketch::default();
        for i in 0..500 {
            let v = (i as f64 * 0.37).exp() % 1000.0;
            if i % 3 == 0 {
                a.record(v)
            } else {
                b.record(v)
            }
            all.record(v);
        }
        a.merge(&b);
        for q in [0.1, 0.5, 0.9] {
            assert_eq!(a.quantile(q), all.quantile(q));
        }
    }

    #[test]
    fn sketch_caps_its_width() {
        let mut s = RelativeSketch::default();
        for e in -300..300 {
            s.record(10f64.powi(e));
        }
        assert!(s.counts.len() <= SKETCH_MAX_BUCKETS);
        assert_eq!(s.count(), 600);
        assert!(s.quantile(0.99).unwrap() > 1e290);
    }
}
