//! Sequential change detectors on the per-event error stream: ADWIN and
//! Page-Hinkley, with the semantics and defaults of River (`river.drift`).
//!
//! Unlike the window accumulators these are *ordered* and not mergeable: the
//! aggregator keeps one [`ErrorDetectors`] pair per (model, version), fed with
//! the error of each labeled outcome in label arrival order (0 / 1 for
//! classification, the absolute error for regression). Several instances of
//! the service each run their own pair on the labels they see.
//!
//! # River's defaults and conventions (matched here)
//!
//! - **ADWIN** (Bifet & Gavaldà 2007, the ADWIN2 exponential histogram):
//!   `delta = 0.002`, `clock = 32` (cuts are checked every 32nd value),
//!   `max_buckets = 5` (buckets of each size before two merge),
//!   `min_window_length = 5` (both sub-windows at least this long),
//!   `grace_period = 10` (no check until the window holds more values).
//!   A cut between the older part `W0` (`n0` values) and the newer part `W1`
//!   (`n1`) is significant when `|mean(W0) - mean(W1)| > eps` with
//!   `d' = ln(2 ln(n) / delta)`, `m = 1 / (n0 - mwl + 1) + 1 / (n1 - mwl + 1)`,
//!   `eps = sqrt(2 m var d') + 2/3 m d'` (`var` the window's population
//!   variance, `mwl` the minimum window length). The oldest bucket is dropped
//!   while a significant cut exists; the update reports a detection if any was.
//! - **Page-Hinkley** (two-sided, River's `mode = "both"`):
//!   `min_instances = 30`, `delta = 0.005`, `threshold = 50`,
//!   `alpha = 1 - 1e-4`. With the running mean `m`, per value
//!   `dev = x - m`, `S+ = alpha S+ + dev - delta`, `S- = alpha S- + dev + delta`;
//!   a change is detected once at least `min_instances` values were seen and
//!   `S+ - min(S+) > threshold` or `max(S-) - S- > threshold` (River starts
//!   `min(S+)` at +inf and `max(S-)` at -1, kept for parity).
//! - Both reset to an empty state on the value *after* a detection, as River's
//!   `DriftDetector` does (`if self.drift_detected: self._reset()`), so a
//!   lasting change is reported once, then again only if the new regime
//!   changes too.

use serde::{Deserialize, Serialize};

/// ADWIN parameters (River's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdwinConfig {
    /// Confidence of a cut. Default 0.002.
    pub delta: f64,
    /// Check for cuts every `clock` values. Default 32.
    pub clock: u32,
    /// Buckets of each size kept before the two oldest merge. Default 5.
    pub max_buckets: usize,
    /// Least length of each sub-window of a cut. Default 5.
    pub min_window_length: u32,
    /// No check before the window holds more than this many values. Default 10.
    pub grace_period: u32,
}

impl Default for AdwinConfig {
    fn default() -> Self {
        AdwinConfig {
            delta: 0.002,
            clock: 32,
            max_buckets: 5,
            min_window_length: 5,
            grace_period: 10,
        }
    }
}

/// Page-Hinkley parameters (River's names and defaults, two-sided).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PageHinkleyConfig {
    /// Values seen before a change can be reported. Default 30.
    pub min_instances: u64,
    /// Magnitude of changes tolerated. Default 0.005.
    pub delta: f64,
    /// Detection threshold (lambda). Default 50.
    pub threshold: f64,
    /// Forgetting factor of the cumulative sums. Default `1 - 1e-4`.
    pub alpha: f64,
}

impl Default for PageHinkleyConfig {
    fn default() -> Self {
        PageHinkleyConfig {
            min_instances: 30,
            delta: 0.005,
            threshold: 50.0,
            alpha: 1.0 - 0.0001,
        }
    }
}

/// One bucket of the exponential histogram: the sum of its values and
/// their sum of squared deviations from its own mean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Bucket {
    total: f64,
    variance: f64,
}

/// Deserialises ADWIN's levels, keeping at least one (level 0 always exists).
fn levels_or_one<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Vec<Bucket>>, D::Error> {
    let mut levels = Vec::<Vec<Bucket>>::deserialize(d)?;
    if levels.is_empty() {
        levels.push(Vec::new());
    }
    Ok(levels)
}

/// ADWIN change detector (see the module docs).
///
/// Serialisable without its configuration: a deserialised detector has the
/// default [`AdwinConfig`] until [`Adwin::set_config`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Adwin {
    #[serde(skip)]
    cfg: AdwinConfig,
    /// `levels[i]` holds buckets of `2^i` values, oldest first; higher levels are older.
    #[serde(deserialize_with = "levels_or_one")]
    levels: Vec<Vec<Bucket>>,
    /// Values in the window.
    width: f64,
    /// Sum of the window's values.
    total: f64,
    /// Sum of squared deviations from the window mean.
    variance: f64,
    tick: u64,
    detected: bool,
    detections: u64,
}

impl Adwin {
    /// An empty detector. `min_window_length` and `clock` below 1 are taken as 1.
    pub fn new(cfg: AdwinConfig) -> Self {
        let cfg = Self::sanitized(cfg);
        Adwin {
            cfg,
            levels: vec![Vec::with_capacity(cfg.max_buckets + 1)],
            width: 0.0,
            total: 0.0,
            variance: 0.0,
            tick: 0,
            detected: false,
            detections: 0,
        }
    }

    fn sanitized(cfg: AdwinConfig) -> AdwinConfig {
        AdwinConfig {
            clock: cfg.clock.max(1),
            min_window_length: cfg.min_window_length.max(1),
            max_buckets: cfg.max_buckets.max(1),
            ..cfg
        }
    }

    /// Uses `cfg` from now on, as [`Adwin::new`] would (the configuration is
    /// not serialised: a restored detector gets it back here).
    pub fn set_config(&mut self, cfg: AdwinConfig) {
        self.cfg = Self::sanitized(cfg);
    }

    fn reset(&mut self) {
        self.levels.truncate(1);
        self.levels[0].clear();
        self.width = 0.0;
        self.total = 0.0;
        self.variance = 0.0;
        self.tick = 0;
        self.detected = false;
    }

    /// Adds one value; true when a change was detected. Non-finite values are ignored.
    pub fn update(&mut self, x: f64) -> bool {
        if self.detected {
            self.reset();
        }
        if !x.is_finite() {
            return false;
        }
        self.insert(x);
        self.detected = self.check();
        self.detections += self.detected as u64;
        self.detected
    }

    /// Values currently in the adaptive window.
    pub fn width(&self) -> u64 {
        self.width as u64
    }

    /// Mean of the window (0 when empty).
    pub fn estimation(&self) -> f64 {
        if self.width > 0.0 {
            self.total / self.width
        } else {
            0.0
        }
    }

    /// Changes detected since creation.
    pub fn detections(&self) -> u64 {
        self.detections
    }

    fn insert(&mut self, x: f64) {
        self.levels[0].push(Bucket {
            total: x,
            variance: 0.0,
        });
        self.width += 1.0;
        if self.width > 1.0 {
            let d = x - self.total / (self.width - 1.0);
            self.variance += (self.width - 1.0) * d * d / self.width;
        }
        self.total += x;
        // Merge the two oldest buckets of every overfull level into the next.
        let mut level = 0;
        while self.levels[level].len() > self.cfg.max_buckets {
            let size = (1u64 << level) as f64;
            let a = self.levels[level].remove(0);
            let b = self.levels[level].remove(0);
            let (ma, mb) = (a.total / size, b.total / size);
            let merged = Bucket {
                total: a.total + b.total,
                variance: a.variance + b.variance + size * 0.5 * (ma - mb) * (ma - mb),
            };
            if level + 1 == self.levels.len() {
                self.levels
                    .push(Vec::with_capacity(self.cfg.max_buckets + 1));
            }
            self.levels[level + 1].push(merged);
            level += 1;
        }
    }

    /// Drops the oldest bucket.
    fn drop_oldest(&mut self) {
        let Some(last) = self.levels.len().checked_sub(1) else {
            return;
        };
        if self.levels[last].is_empty() {
            return;
        }
        let b = self.levels[last].remove(0);
        let n = (1u64 << last) as f64;
        self.width -= n;
        self.total -= b.total;
        if self.width > 0.0 {
            let mu = b.total / n;
            let mu_rest = self.total / self.width;
            self.variance -=
                b.variance + n * self.width * (mu - mu_rest) * (mu - mu_rest) / (n + self.width);
        } else {
            self.width = 0.0;
            self.total = 0.0;
            self.variance = 0.0;
        }
        if self.levels[last].is_empty() && last > 0 {
            self.levels.pop();
        }
    }

    fn cut_is_significant(&self, n0: f64, n1: f64, delta_mean: f64) -> bool {
        let mwl = self.cfg.min_window_length as f64;
        let d = (2.0 * self.width.ln() / self.cfg.delta).ln();
        let m = 1.0 / (n0 - mwl + 1.0) + 1.0 / (n1 - mwl + 1.0);
        let eps = (2.0 * m * (self.variance / self.width) * d).sqrt() + 2.0 / 3.0 * d * m;
        delta_mean.abs() > eps
    }

    /// Shrinks the window while a significant cut exists; true if one did.
    fn check(&mut self) -> bool {
        self.tick += 1;
        if !self.tick.is_multiple_of(self.cfg.clock as u64)
            || self.width <= self.cfg.grace_period as f64
        {
            return false;
        }
        let mwl = self.cfg.min_window_length as f64;
        let mut detected = false;
        'scan: loop {
            let (mut n0, mut u0) = (0.0, 0.0);
            let (mut n1, mut u1) = (self.width, self.total);
            // Cut points from the oldest bucket to the newest; the newest
            // bucket always stays in W1.
            for level in (0..self.levels.len()).rev() {
                let size = (1u64 << level) as f64;
                let len = self.levels[level].len();
                for k in 0..len {
                    let t = self.levels[level][k].total;
                    n0 += size;
                    n1 -= size;
                    u0 += t;
                    u1 -= t;
                    if level == 0 && k + 1 == len {
                        break 'scan;
                    }
                    if n0 >= mwl && n1 >= mwl && self.cut_is_significant(n0, n1, u0 / n0 - u1 / n1)
                    {
                        detected = true;
                        if self.width > 0.0 {
                            self.drop_oldest();
                            continue 'scan;
                        }
                    }
                }
            }
            break;
        }
        detected
    }
}

/// Page-Hinkley change detector, two-sided (see the module docs).
///
/// Serialisable without its configuration: a deserialised detector has the
/// default [`PageHinkleyConfig`] until [`PageHinkley::set_config`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageHinkley {
    #[serde(skip)]
    cfg: PageHinkleyConfig,
    n: f64,
    mean: f64,
    sum_increase: f64,
    sum_decrease: f64,
    min_increase: f64,
    max_decrease: f64,
    detected: bool,
    detections: u64,
}

impl PageHinkley {
    /// An empty detector.
    pub fn new(cfg: PageHinkleyConfig) -> Self {
        PageHinkley {
            cfg,
            n: 0.0,
            mean: 0.0,
            sum_increase: 0.0,
            sum_decrease: 0.0,
            min_increase: f64::INFINITY,
            max_decrease: -1.0,
            detected: false,
            detections: 0,
        }
    }

    /// Uses `cfg` from now on (the configuration is not serialised: a
    /// restored detector gets it back here).
    pub fn set_config(&mut self, cfg: PageHinkleyConfig) {
        self.cfg = cfg;
    }

    fn reset(&mut self) {
        *self = PageHinkley {
            detections: self.detections,
            ..PageHinkley::new(self.cfg)
        };
    }

    /// Adds one value; true when a change was detected. Non-finite values are ignored.
    pub fn update(&mut self, x: f64) -> bool {
        if self.detected {
            self.reset();
        }
        if !x.is_finite() {
            return false;
        }
        self.n += 1.0;
        self.mean += (1.0 / self.n) * (x - self.mean);
        let dev = x - self.mean;
        self.sum_increase = self.cfg.alpha * self.sum_increase + dev - self.cfg.delta;
        self.sum_decrease = self.cfg.alpha * self.sum_decrease + dev + self.cfg.delta;
        if self.sum_increase < self.min_increase {
            self.min_increase = self.sum_increase;
        }
        if self.sum_decrease > self.max_decrease {
            self.max_decrease = self.sum_decrease;
        }
        if self.n >= self.cfg.min_instances as f64 {
            self.detected = self.sum_increase - self.min_increase > self.cfg.threshold
                || self.max_decrease - self.sum_decrease > self.cfg.threshold;
        }
        self.detections += self.detected as u64;
        self.detected
    }

    /// Changes detected since creation.
    pub fn detections(&self) -> u64 {
        self.detections
    }
}

/// Parameters of the detector pair.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DetectorConfig {
    /// ADWIN parameters.
    pub adwin: AdwinConfig,
    /// Page-Hinkley parameters.
    pub page_hinkley: PageHinkleyConfig,
}

/// The detector pair of one (model, version), fed in label arrival order.
/// Serialisable without the configuration (see [`ErrorDetectors::set_config`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetectors {
    /// ADWIN on the error stream.
    pub adwin: Adwin,
    /// Page-Hinkley on the error stream.
    pub page_hinkley: PageHinkley,
}

impl ErrorDetectors {
    /// A fresh pair.
    pub fn new(cfg: &DetectorConfig) -> Self {
        ErrorDetectors {
            adwin: Adwin::new(cfg.adwin),
            page_hinkley: PageHinkley::new(cfg.page_hinkley),
        }
    }

    /// Uses `cfg` from now on (after deserialisation: the configuration is
    /// not serialised).
    pub fn set_config(&mut self, cfg: &DetectorConfig) {
        self.adwin.set_config(cfg.adwin);
        self.page_hinkley.set_config(cfg.page_hinkley);
    }

    /// Feeds one error to both; returns (ADWIN detected, Page-Hinkley detected).
    pub fn update(&mut self, error: f64) -> (bool, bool) {
        (self.adwin.update(error), self.page_hinkley.update(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_stream_never_detects() {
        let mut a = Adwin::new(AdwinConfig::default());
        let mut p = PageHinkley::new(PageHinkleyConfig::default());
        for _ in 0..5000 {
            assert!(!a.update(1.0));
            assert!(!p.update(1.0));
        }
        assert_eq!(a.width(), 5000);
        assert_eq!((a.detections(), p.detections()), (0, 0));
    }

    #[test]
    fn adwin_window_statistics_are_exact() {
        let mut a = Adwin::new(AdwinConfig::default());
        for v in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0] {
            a.update(v);
        }
        // seven values: level 0 overflowed once (six buckets -> merge)
        assert_eq!(a.levels[0].len(), 5);
        assert_eq!(a.levels[1].len(), 1);
        assert_eq!(a.levels[1][0].total, 3.0);
        assert_eq!(a.levels[1][0].variance, 0.5);
        assert_eq!(a.width(), 7);
        assert_eq!(a.estimation(), 4.0);
        // sum of squared deviations from 4
        assert!((a.variance - 28.0).abs() < 1e-12);
    }

    #[test]
    fn adwin_detects_a_jump_and_then_restarts() {
        let mut a = Adwin::new(AdwinConfig {
            clock: 1,
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(!a.update(0.0));
        }
        let at = (0..200).find(|_| a.update(100.0));
        let at = at.expect("a jump of 100 is detected");
        assert!(at < 20, "{at}");
        assert!(a.width() < 200, "the old regime is dropped");
        // the next value starts an empty window
        a.update(100.0);
        assert_eq!(a.width(), 1);
        assert_eq!(a.detections(), 1);
    }

    #[test]
    fn page_hinkley_detects_both_directions() {
        let mut up = PageHinkley::new(PageHinkleyConfig::default());
        let mut i = 0;
        while i < 100 {
            assert!(!up.update(0.0));
            i += 1;
        }
        // each value 5 above the mean adds about 5 to S+: threshold 50 in ~11 steps
        let at = (0..100).find(|_| up.update(5.0)).expect("an increase");
        assert!((9..=13).contains(&at), "{at}");
        let mut down = PageHinkley::new(PageHinkleyConfig::default());
        for _ in 0..100 {
            down.update(5.0);
        }
        assert!((0..100).any(|_| down.update(0.0)), "a decrease");
        // nothing before min_instances even for a large change
        let mut early = PageHinkley::new(PageHinkleyConfig::default());
        for i in 0..29 {
            assert!(!early.update(if i < 5 { 0.0 } else { 1000.0 }));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The bucket summaries always add up to the exact window: width,
        /// sum and sum of squared deviations of the values it still holds.
        #[test]
        fn adwin_summaries_equal_the_exact_window(
            values in proptest::collection::vec(-10.0..10.0f64, 0..600),
            clock in 1u32..40,
        ) {
            let mut a = Adwin::new(AdwinConfig { clock, ..Default::default() });
            let mut window: Vec<f64> = Vec::new();
            for &v in &values {
                let detected = a.update(v);
                if a.width() == 1 {
                    // the update after a detection starts an empty window
                    window.clear();
                }
                window.push(v);
                if detected {
                    // the oldest buckets were dropped: the newest `width` values remain
                    let drop = window.len() - a.width() as usize;
                    window.drain(..drop);
                }
                proptest::prop_assert_eq!(a.width() as usize, window.len());
                let n = window.len() as f64;
                let mean = window.iter().sum::<f64>() / n;
                let m2: f64 = window.iter().map(|x| (x - mean) * (x - mean)).sum();
                proptest::prop_assert!((a.estimation() - mean).abs() < 1e-9);
                proptest::prop_assert!((a.variance - m2).abs() < 1e-6 * m2.max(1.0));
                let held: f64 = a.levels.iter().flatten().map(|b| b.total).sum();
                proptest::prop_assert!((held - a.total).abs() < 1e-9 * n.max(1.0) * 10.0);
            }
        }

        /// Page-Hinkley never fires before `min_instances` values since the last reset.
        #[test]
        fn page_hinkley_respects_min_instances(
            values in proptest::collection::vec(0.0..100.0f64, 0..400),
        ) {
            let mut p = PageHinkley::new(PageHinkleyConfig::default());
            let mut since = 0u64;
            for &v in &values {
                since += 1;
                if p.update(v) {
                    proptest::prop_assert!(since >= 30);
                    since = 0;
                }
            }
        }
    }

    #[test]
    fn non_finite_values_are_ignored() {
        let mut d = ErrorDetectors::new(&DetectorConfig::default());
        assert_eq!(d.update(f64::NAN), (false, false));
        assert_eq!(d.update(f64::INFINITY), (false, false));
        assert_eq!(d.adwin.width(), 0);
    }
}
