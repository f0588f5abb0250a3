//! Synthetic traffic: a deterministic, seeded stream of prediction and
//! ground-truth events that looks like a real binary classifier in production
//! (and optionally a regression model on the same requests), with scripted
//! data drift and accuracy drops.
//!
//! This module owns the simulation ([`Scenario`], [`Generator`]) and, in
//! [`produce`], writing a generator's events to Kafka. The simulation is pure:
//! no I/O, no clock (event time is data derived from [`Scenario::start_ms`] and
//! [`Scenario::events_per_second`]), the same seed always gives the same events.
//! It must not depend on the service's decoding or metrics code: encoding for
//! Kafka is the caller's choice (JSON by default, [`json_encode`]).
//!
//! # The simulated world
//!
//! Each request has a latent class `y ~ Bernoulli(positive_rate)`. Numeric
//! feature `i` is built from `u_i = z_i + y * delta_i` (`z_i` standard normal,
//! `delta_i` decaying with `i`) as a normal, lognormal or integer value;
//! categorical features have a few levels whose frequencies depend on `y`,
//! every fifth one is a boolean. Each feature is missing with probability
//! [`Scenario::missing_rate`]. Model version `k` scores
//! `sigmoid(L + noise_k)`, where `L` is the true posterior log-odds of `y` given
//! the features and the noise shrinks with `k`, so `v1` has an accuracy of
//! about 0.90 and `v2` about 0.91 (at the default positive rate of 0.2).
//!
//! # Drift and degradation
//!
//! - [`DriftScenario::Sudden`]: from request `drift_at * count` on, the first
//!   [`Scenario::drifted_features`] numeric features are shifted by
//!   `shift_sd` standard deviations of their reference (pre-drift)
//!   distribution, and with [`Scenario::drift_categorical`] the first
//!   categorical feature's level frequencies change (including a level never
//!   seen before, `NEW`). The shift is a covariate shift the models are robust
//!   to: scores are computed from the unshifted signal, so drift alone does not
//!   change accuracy.
//! - [`DriftScenario::Gradual`]: the same, ramping linearly from nothing at
//!   `drift_at` to full strength at the end of the stream.
//! - [`DriftScenario::None`]: every feature is stationary for the whole stream.
//! - [`Scenario::accuracy_drop`] (independent of the above): after `drift_at`,
//!   a share [`Scenario::accuracy_drop_share`] of requests get a ground truth
//!   unrelated to their features (concept drift), which lowers accuracy by
//!   about `0.21 * share` (≈ 15 points at the default 0.7) while features,
//!   scores and the label distribution stay as they were. Under `Gradual` the
//!   share ramps like the feature drift.
//!
//! # Event order
//!
//! Requests are spaced `1 / events_per_second` apart in event time; each
//! request yields one prediction per entry of [`Scenario::versions`] (plus one
//! for [`Scenario::regression_model`]), all with the same request id and
//! timestamp. A share [`Scenario::label_fraction`] of requests gets one
//! ground-truth event, `label_delay_ms` later, carrying `actual_label` `"1"` /
//! `"0"` and, with a regression model, `actual_value`. [`Generator::next_event`]
//! merges both kinds in non-decreasing timestamp order.

mod produce;

pub use produce::{json_encode, produce, Pace, ProduceOptions, ProduceSummary};

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use crate::model::{Entries, FeatureValue, GroundTruthEvent, InputEvent, PredictionEvent};

/// How the feature distributions change over the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriftScenario {
    /// Stationary: every feature keeps its reference distribution.
    #[default]
    None,
    /// A step change at [`Scenario::drift_at`].
    Sudden,
    /// A linear ramp from [`Scenario::drift_at`] to the end of the stream.
    Gradual,
}

impl DriftScenario {
    /// The CLI name.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftScenario::None => "none",
            DriftScenario::Sudden => "sudden",
            DriftScenario::Gradual => "gradual",
        }
    }
}

impl fmt::Display for DriftScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an unknown drift scenario name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown drift scenario {0:?}: expected none, sudden or gradual")]
pub struct ParseDriftScenarioError(pub String);

impl FromStr for DriftScenario {
    type Err = ParseDriftScenarioError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(DriftScenario::None),
            "sudden" => Ok(DriftScenario::Sudden),
            "gradual" => Ok(DriftScenario::Gradual),
            _ => Err(ParseDriftScenarioError(s.to_owned())),
        }
    }
}

/// A scenario value that cannot be simulated, named by its field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid scenario: {field} {reason}")]
pub struct ScenarioError {
    /// The offending field.
    pub field: &'static str,
    /// What was expected.
    pub reason: String,
}

/// Everything that shapes a synthetic stream. Same scenario, same events.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Seed of the random number generator.
    pub seed: u64,
    /// Event time of the first prediction, ms since the Unix epoch.
    pub start_ms: i64,
    /// Requests per second of event time (not wall clock).
    pub events_per_second: f64,
    /// Number of requests. Each request yields one prediction per entry of
    /// `versions` (plus one for `regression_model`), so the number of
    /// prediction events is `count * (versions.len() + regression)`.
    pub count: u64,
    /// Versions of `model_id` scoring every request (same request ids, so one
    /// label completes all of them); the first is the champion, later ones are
    /// slightly better challengers. Empty means `["v1"]`.
    pub versions: Vec<String>,
    /// The binary classifier's model id.
    pub model_id: String,
    /// Number of numeric features (`num_00`, `num_01`, ...).
    pub numeric_features: usize,
    /// Number of categorical features (`cat_<j>`, every fifth a boolean `flag_<j>`).
    pub categorical_features: usize,
    /// How the feature distributions change.
    pub drift: DriftScenario,
    /// Fraction of the stream (of `count`) where drift and the accuracy drop start.
    pub drift_at: f64,
    /// How many numeric features (the first ones) shift their mean under drift.
    pub drifted_features: usize,
    /// Mean shift of the drifted numeric features, in reference standard deviations.
    pub shift_sd: f64,
    /// Whether the first categorical feature's frequencies also change under drift.
    pub drift_categorical: bool,
    /// After `drift_at`, labels partly lose their relation to the features and scores.
    pub accuracy_drop: bool,
    /// Share of requests after `drift_at` whose label is unrelated to the
    /// features when `accuracy_drop` is on; accuracy falls by about `0.21 * share`.
    pub accuracy_drop_share: f64,
    /// Probability of the positive class (`"1"`), 0.1 to 0.3 is realistic.
    pub positive_rate: f64,
    /// Probability that any one feature value is missing (`null`).
    pub missing_rate: f64,
    /// Share of requests that get a ground-truth event.
    pub label_fraction: f64,
    /// Label delay, uniform between min and max, in ms.
    pub label_delay_ms: (i64, i64),
    /// Segment keys and their values (drawn with weights 1, 1/2, 1/3, ...).
    pub segments: Vec<(String, Vec<String>)>,
    /// Model id of an optional regression model scoring the same requests
    /// (version = the first of `versions`); labels then carry `actual_value`.
    pub regression_model: Option<String>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            seed: 42,
            // 2024-01-01T00:00:00Z: a fixed, readable origin.
            start_ms: 1_704_067_200_000,
            events_per_second: 100.0,
            count: 10_000,
            versions: vec!["v1".to_owned(), "v2".to_owned()],
            model_id: "fraud-detector".to_owned(),
            numeric_features: 20,
            categorical_features: 5,
            drift: DriftScenario::None,
            drift_at: 0.5,
            drifted_features: 5,
            shift_sd: 1.0,
            drift_categorical: true,
            accuracy_drop: false,
            accuracy_drop_share: 0.7,
            positive_rate: 0.2,
            missing_rate: 0.01,
            label_fraction: 0.9,
            label_delay_ms: (30_000, 600_000),
            segments: vec![
                (
                    "country".to_owned(),
                    ["US", "DE", "FR", "BR"].map(str::to_owned).to_vec(),
                ),
                (
                    "channel".to_owned(),
                    ["web", "app"].map(str::to_owned).to_vec(),
                ),
            ],
            regression_model: None,
        }
    }
}

impl Scenario {
    /// Checks every value; [`Generator::new`] clamps what this rejects.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let err = |field, reason: &str| {
            Err(ScenarioError {
                field,
                reason: reason.to_owned(),
            })
        };
        if !(self.events_per_second.is_finite() && self.events_per_second > 0.0) {
            return err("events_per_second", "must be a positive number");
        }
        let fractions = [
            ("drift_at", self.drift_at),
            ("accuracy_drop_share", self.accuracy_drop_share),
            ("positive_rate", self.positive_rate),
            ("missing_rate", self.missing_rate),
            ("label_fraction", self.label_fraction),
        ];
        for (field, v) in fractions {
            if !(0.0..=1.0).contains(&v) {
                return err(field, "must be between 0 and 1");
            }
        }
        if !(self.positive_rate > 0.0 && self.positive_rate < 1.0) {
            return err("positive_rate", "must be strictly between 0 and 1");
        }
        if !self.shift_sd.is_finite() {
            return err("shift_sd", "must be a finite number");
        }
        let (lo, hi) = self.label_delay_ms;
        if lo < 0 || hi < lo {
            return err("label_delay_ms", "must satisfy 0 <= min <= max");
        }
        if self.model_id.is_empty() {
            return err("model_id", "must not be empty");
        }
        if self.versions.iter().any(String::is_empty) {
            return err("versions", "must not contain an empty version");
        }
        if self.segments.iter().any(|(_, values)| values.is_empty()) {
            return err("segments", "every segment key needs at least one value");
        }
        Ok(())
    }

    /// Names of the features that drift under a drift scenario (empty under `None`).
    pub fn drifted_feature_names(&self) -> Vec<String> {
        if self.drift == DriftScenario::None {
            return Vec::new();
        }
        let mut names: Vec<String> = (0..self.drifted_features.min(self.numeric_features))
            .map(numeric_name)
            .collect();
        if self.drift_categorical && self.categorical_features > 0 {
            names.push(categorical_name(0));
        }
        names
    }

    /// Number of prediction events the scenario produces.
    pub fn prediction_count(&self) -> u64 {
        let per_request =
            self.versions.len().max(1) as u64 + u64::from(self.regression_model.is_some());
        self.count.saturating_mul(per_request)
    }

    /// A copy with every value forced into its valid range.
    fn sanitized(mut self) -> Self {
        if !(self.events_per_second.is_finite() && self.events_per_second > 0.0) {
            self.events_per_second = 1.0;
        }
        let unit = |v: f64, fallback: f64| {
            if v.is_finite() {
                v.clamp(0.0, 1.0)
            } else {
                fallback
            }
        };
        self.drift_at = unit(self.drift_at, 0.5);
        self.accuracy_drop_share = unit(self.accuracy_drop_share, 0.7);
        self.positive_rate = unit(self.positive_rate, 0.2).clamp(1e-3, 1.0 - 1e-3);
        self.missing_rate = unit(self.missing_rate, 0.0);
        self.label_fraction = unit(self.label_fraction, 1.0);
        if !self.shift_sd.is_finite() {
            self.shift_sd = 0.0;
        }
        let (lo, hi) = self.label_delay_ms;
        let lo = lo.max(0);
        self.label_delay_ms = (lo, hi.max(lo));
        if self.versions.is_empty() {
            self.versions.push("v1".to_owned());
        }
        self.segments.retain(|(_, values)| !values.is_empty());
        self
    }
}

/// Name of numeric feature `i`.
fn numeric_name(i: usize) -> String {
    format!("num_{i:02}")
}

/// Name of categorical feature `j` (booleans are `flag_<j>`).
fn categorical_name(j: usize) -> String {
    if is_flag(j) {
        format!("flag_{j}")
    } else {
        format!("cat_{j}")
    }
}

/// Every fifth categorical feature is a boolean.
fn is_flag(j: usize) -> bool {
    j % 5 == 4
}

/// How a numeric feature turns its latent normal `u` into a value.
#[derive(Debug, Clone)]
enum NumericKind {
    /// `mean + sd * u`.
    Normal { mean: f64, sd: f64 },
    /// `exp(mu + sigma * u)`: amounts, durations.
    LogNormal { mu: f64, sigma: f64 },
    /// `round(mean + sd * u)`: counts, ages.
    Integer { mean: f64, sd: f64 },
}

/// One numeric feature of the simulation.
#[derive(Debug, Clone)]
struct NumericSpec {
    name: String,
    kind: NumericKind,
    /// Class separation of the latent value (in latent standard deviations).
    delta: f64,
    /// Shift applied at full drift (0 for features that do not drift).
    drift_shift: f64,
}

/// Standard deviation of a numeric feature over the reference mixture of both classes.
fn reference_sd(kind: &NumericKind, delta: f64, p: f64) -> f64 {
    let mixture_var = |sd: f64| sd * sd * (1.0 + p * (1.0 - p) * delta * delta);
    match *kind {
        NumericKind::Normal { sd, .. } => mixture_var(sd).sqrt(),
        // Rounding adds the variance of a uniform on one unit.
        NumericKind::Integer { sd, .. } => (mixture_var(sd) + 1.0 / 12.0).sqrt(),
        NumericKind::LogNormal { mu, sigma } => {
            let moments = |shift: f64| {
                let m = mu + sigma * shift;
                let mean = (m + sigma * sigma / 2.0).exp();
                let var = ((sigma * sigma).exp() - 1.0) * (2.0 * m + sigma * sigma).exp();
                (mean, var)
            };
            let (e0, v0) = moments(0.0);
            let (e1, v1) = moments(delta);
            ((1.0 - p) * v0 + p * v1 + p * (1.0 - p) * (e1 - e0).powi(2)).sqrt()
        }
    }
}

/// One categorical feature of the simulation.
#[derive(Debug, Clone)]
enum CategoricalSpec {
    /// A string feature with a few levels.
    Levels {
        name: String,
        levels: Vec<String>,
        /// Cumulative level probabilities given y = 0 and y = 1.
        cdf: [Vec<f64>; 2],
        /// Cumulative probabilities under full drift (over `levels` + `NEW`), if it drifts.
        drift_cdf: Option<Vec<f64>>,
    },
    /// A boolean feature with `P(true | y)`.
    Flag { name: String, p_true: [f64; 2] },
}

/// Cumulative, normalised form of a weight vector.
fn cdf_of(weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect()
}

/// Index of the first cumulative probability above `u` (the last one for rounding slack).
fn pick(cdf: &[f64], u: f64) -> usize {
    cdf.iter()
        .position(|&c| u < c)
        .unwrap_or(cdf.len().saturating_sub(1))
}

/// A segment key with its values and their cumulative probabilities.
#[derive(Debug, Clone)]
struct SegmentSpec {
    key: String,
    values: Vec<String>,
    cdf: Vec<f64>,
}

/// A label waiting for its event time, kept compact: the request id is
/// rebuilt on emission so a long label delay does not hold strings.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PendingLabel {
    timestamp: i64,
    request: u64,
    positive: bool,
    value: Option<f64>,
}

impl Eq for PendingLabel {}

impl Ord for PendingLabel {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.timestamp, self.request).cmp(&(other.timestamp, other.request))
    }
}

impl PartialOrd for PendingLabel {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Logit noise of the `k`-th model version: later versions are better.
fn version_noise(k: usize) -> f64 {
    0.6f64.max(1.0 - 0.4 * k as f64)
}

/// Median inference latency (ms) of the `k`-th model version.
fn version_latency_median(k: usize) -> f64 {
    10.0 + 2.0 * k as f64
}

/// Numerically safe logistic function.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The seeded event source: iterate it to get the scenario's events in
/// event-time order.
#[derive(Debug, Clone)]
pub struct Generator {
    scenario: Scenario,
    rng: StdRng,
    numeric: Vec<NumericSpec>,
    categorical: Vec<CategoricalSpec>,
    segments: Vec<SegmentSpec>,
    /// Index of the next request to simulate.
    next_request: u64,
    /// Index of the first request after `drift_at`.
    drift_start: u64,
    /// Predictions of the current request not yet handed out.
    pending: VecDeque<PredictionEvent>,
    /// Labels ordered by event time (min-heap).
    labels: BinaryHeap<Reverse<PendingLabel>>,
    /// Prior log-odds of the positive class.
    prior_logit: f64,
}

impl Generator {
    /// A generator for `s` (values outside their range are clamped, see [`Scenario::validate`]).
    pub fn new(s: Scenario) -> Self {
        let s = s.sanitized();
        let p = s.positive_rate;
        let drifting = s.drift != DriftScenario::None;
        let numeric = (0..s.numeric_features)
            .map(|i| {
                let kind = match i % 4 {
                    0 => NumericKind::LogNormal {
                        mu: 3.0 + 0.1 * i as f64,
                        sigma: 0.5,
                    },
                    1 => NumericKind::Integer {
                        mean: 40.0 + i as f64,
                        sd: 12.0,
                    },
                    _ => NumericKind::Normal {
                        mean: i as f64,
                        sd: 1.0 + 0.5 * (i % 3) as f64,
                    },
                };
                // Informative features first; the total separation makes the
                // Bayes-optimal classifier about 91 % accurate at p = 0.2.
                let delta = 1.55 * 0.75f64.powi(i32::try_from(i).unwrap_or(i32::MAX));
                let drift_shift = if drifting && i < s.drifted_features {
                    s.shift_sd * reference_sd(&kind, delta, p)
                } else {
                    0.0
                };
                NumericSpec {
                    name: numeric_name(i),
                    kind,
                    delta,
                    drift_shift,
                }
            })
            .collect();
        let categorical = (0..s.categorical_features)
            .map(|j| {
                let name = categorical_name(j);
                if is_flag(j) {
                    return CategoricalSpec::Flag {
                        name,
                        p_true: [0.3, 0.5],
                    };
                }
                let n = 3 + j % 4;
                let levels: Vec<String> = (0..n)
                    .map(|k| char::from(b'A' + k as u8).to_string())
                    .collect();
                let w0: Vec<f64> = (0..n).map(|k| 1.0 / (k + 1) as f64).collect();
                let w1: Vec<f64> = w0
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * (1.0 + 0.5 * k as f64))
                    .collect();
                let drift_cdf = (drifting && s.drift_categorical && j == 0).then(|| {
                    // Reversed popularity plus a level the reference never saw.
                    let mut w: Vec<f64> = (0..n).map(|k| 1.0 / (n - k) as f64).collect();
                    let total: f64 = w.iter().sum();
                    w.push(total * 0.1);
                    cdf_of(&w)
                });
                CategoricalSpec::Levels {
                    name,
                    levels,
                    cdf: [cdf_of(&w0), cdf_of(&w1)],
                    drift_cdf,
                }
            })
            .collect();
        let segments = s
            .segments
            .iter()
            .map(|(key, values)| {
                let w: Vec<f64> = (0..values.len()).map(|k| 1.0 / (k + 1) as f64).collect();
                SegmentSpec {
                    key: key.clone(),
                    values: values.clone(),
                    cdf: cdf_of(&w),
                }
            })
            .collect();
        // First request at or after drift_at * count.
        let drift_start = (s.drift_at * s.count as f64).ceil() as u64;
        Generator {
            rng: StdRng::seed_from_u64(s.seed),
            numeric,
            categorical,
            segments,
            next_request: 0,
            drift_start,
            pending: VecDeque::new(),
            labels: BinaryHeap::new(),
            prior_logit: (p / (1.0 - p)).ln(),
            scenario: s,
        }
    }

    /// The (sanitized) scenario this generator simulates.
    pub fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    /// Request id of request number `n`.
    pub fn request_id(&self, n: u64) -> String {
        format!("req-{}-{n}", self.scenario.seed)
    }

    /// Next event in event-time order: predictions and, later, their labels
    /// (ground truth at prediction time + delay), merged by timestamp.
    pub fn next_event(&mut self) -> Option<InputEvent> {
        if let Some(p) = self.pending.pop_front() {
            return Some(InputEvent::Prediction(p));
        }
        let next_prediction = self.next_request_time();
        let label_due = match (self.labels.peek(), next_prediction) {
            (Some(Reverse(l)), Some(t)) => l.timestamp <= t,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if label_due {
            let Reverse(l) = self.labels.pop()?;
            return Some(InputEvent::GroundTruth(self.label_event(l)));
        }
        next_prediction?;
        self.simulate_request();
        self.pending.pop_front().map(InputEvent::Prediction)
    }

    /// Event time of the next request, or `None` when all have been simulated.
    fn next_request_time(&self) -> Option<i64> {
        (self.next_request < self.scenario.count).then(|| self.request_time(self.next_request))
    }

    /// Event time of request `n`.
    fn request_time(&self, n: u64) -> i64 {
        let offset = (n as f64 * 1000.0 / self.scenario.events_per_second).floor();
        self.scenario.start_ms.saturating_add(offset as i64)
    }

    /// Drift strength of request `n`, from 0 (reference) to 1 (full drift).
    fn ramp(&self, n: u64) -> f64 {
        if n < self.drift_start {
            return 0.0;
        }
        match self.scenario.drift {
            DriftScenario::Gradual => {
                let span = self.scenario.count.saturating_sub(self.drift_start).max(1);
                ((n - self.drift_start + 1) as f64 / span as f64).min(1.0)
            }
            DriftScenario::None | DriftScenario::Sudden => 1.0,
        }
    }

    /// The ground-truth event of a pending label.
    fn label_event(&self, l: PendingLabel) -> GroundTruthEvent {
        GroundTruthEvent {
            request_id: self.request_id(l.request),
            timestamp: l.timestamp,
            actual_label: Some(if l.positive { "1" } else { "0" }.to_owned()),
            actual_value: l.value,
        }
    }

    /// Draws a standard normal.
    fn normal(&mut self) -> f64 {
        self.rng.sample(StandardNormal)
    }

    /// Simulates the next request: queues its predictions and schedules its label.
    fn simulate_request(&mut self) {
        let n = self.next_request;
        self.next_request += 1;
        let timestamp = self.request_time(n);
        let ramp = self.ramp(n);
        let drift_ramp = if self.scenario.drift == DriftScenario::None {
            0.0
        } else {
            ramp
        };
        let p = self.scenario.positive_rate;
        let missing = self.scenario.missing_rate;
        let y = self.rng.gen_bool(p);
        let yi = usize::from(y);

        // Numeric features and the true posterior log-odds of y given them.
        let mut log_odds = self.prior_logit;
        let mut z_sum = 0.0;
        let mut features = Vec::with_capacity(self.numeric.len() + self.categorical.len());
        for i in 0..self.numeric.len() {
            let z = self.normal();
            if i < 3 {
                z_sum += z;
            }
            let spec = &self.numeric[i];
            let u = z + if y { spec.delta } else { 0.0 };
            log_odds += spec.delta * u - spec.delta * spec.delta / 2.0;
            let shift = spec.drift_shift * drift_ramp;
            let value = match spec.kind {
                NumericKind::Normal { mean, sd } => FeatureValue::Double(mean + sd * u + shift),
                NumericKind::LogNormal { mu, sigma } => {
                    FeatureValue::Double((mu + sigma * u).exp() + shift)
                }
                NumericKind::Integer { mean, sd } => {
                    FeatureValue::Long((mean + sd * u + shift).round() as i64)
                }
            };
            let name = spec.name.clone();
            let value = if self.rng.gen_bool(missing) {
                FeatureValue::Null
            } else {
                value
            };
            features.push((name, value));
        }
        for j in 0..self.categorical.len() {
            let u: f64 = self.rng.gen();
            let drifted = drift_ramp > 0.0 && self.rng.gen_bool(drift_ramp);
            let (name, value) = match &self.categorical[j] {
                CategoricalSpec::Flag { name, p_true } => {
                    (name.clone(), FeatureValue::Bool(u < p_true[yi]))
                }
                CategoricalSpec::Levels {
                    name,
                    levels,
                    cdf,
                    drift_cdf,
                } => {
                    let level = match drift_cdf {
                        Some(d) if drifted => levels.get(pick(d, u)).map_or("NEW", String::as_str),
                        _ => levels.get(pick(&cdf[yi], u)).map_or("NEW", String::as_str),
                    };
                    (name.clone(), FeatureValue::String(level.to_owned()))
                }
            };
            let value = if self.rng.gen_bool(missing) {
                FeatureValue::Null
            } else {
                value
            };
            features.push((name, value));
        }
        let features = Entries(features);

        let mut segments = Vec::with_capacity(self.segments.len());
        for seg in &self.segments {
            let u: f64 = self.rng.gen();
            let value = seg
                .values
                .get(pick(&seg.cdf, u))
                .cloned()
                .unwrap_or_default();
            segments.push((seg.key.clone(), value));
        }
        let segments = Entries(segments);

        let request_id = self.request_id(n);
        let versions = self.scenario.versions.len();
        for k in 0..versions {
            let logit = log_odds + version_noise(k) * self.normal();
            let score = sigmoid(logit);
            let latency = version_latency_median(k) * (0.35 * self.normal()).exp();
            self.pending.push_back(PredictionEvent {
                request_id: request_id.clone(),
                model_id: self.scenario.model_id.clone(),
                model_version: self.scenario.versions[k].clone(),
                timestamp,
                features: features.clone(),
                predicted_label: Some(if score >= 0.5 { "1" } else { "0" }.to_owned()),
                predicted_value: None,
                score: Some(score),
                class_probabilities: None,
                segments: segments.clone(),
                latency_ms: Some(latency),
            });
        }

        // The regression target: an amount driven by the class and a few features.
        let expected = 100.0 + 20.0 * f64::from(u8::from(y)) + 10.0 * z_sum;
        let actual_value = expected + 5.0 * self.normal();
        if let Some(model_id) = self.scenario.regression_model.clone() {
            let predicted = expected + 6.0 * self.normal();
            let latency = 6.0 * (0.3 * self.normal()).exp();
            self.pending.push_back(PredictionEvent {
                request_id: request_id.clone(),
                model_id,
                model_version: self.scenario.versions[0].clone(),
                timestamp,
                features,
                predicted_label: None,
                predicted_value: Some(predicted),
                score: None,
                class_probabilities: None,
                segments,
                latency_ms: Some(latency),
            });
        }

        // Ground truth: concept drift replaces the truth of some requests by
        // an independent draw from the same marginal distribution.
        let unrelated = self.scenario.accuracy_drop
            && ramp > 0.0
            && self
                .rng
                .gen_bool((self.scenario.accuracy_drop_share * ramp).min(1.0));
        let (positive, value) = if unrelated {
            let y2 = self.rng.gen_bool(p);
            // Same number of feature terms as the real target, so the same spread.
            let terms = self.numeric.len().min(3);
            let z2: f64 = (0..terms).map(|_| self.normal()).sum();
            let v = 100.0 + 20.0 * f64::from(u8::from(y2)) + 10.0 * z2 + 5.0 * self.normal();
            (y2, v)
        } else {
            (y, actual_value)
        };
        if self.rng.gen_bool(self.scenario.label_fraction) {
            let (lo, hi) = self.scenario.label_delay_ms;
            let delay = self.rng.gen_range(lo..=hi);
            self.labels.push(Reverse(PendingLabel {
                timestamp: timestamp.saturating_add(delay),
                request: n,
                positive,
                value: self.scenario.regression_model.as_ref().map(|_| value),
            }));
        }
    }
}

impl Iterator for Generator {
    type Item = InputEvent;

    fn next(&mut self) -> Option<InputEvent> {
        self.next_event()
    }
}

#[cfg(test)]
mod tests;
