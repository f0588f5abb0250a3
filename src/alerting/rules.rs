//! Rules: what is watched and when a window breaches. Pure: one window row
//! (plus the reference value its condition needs) in, a [`Check`] out.
//!
//! A rule selects rows by metric, model, version, segment and feature, then
//! compares a quantity with its thresholds:
//! - `threshold`: the value itself;
//! - `baseline`: the change against a business baseline;
//! - `previous_window`: the change against the previous window of the series;
//! - `version`: the change against the same window of another version of the
//!   model (champion vs challenger scoring the same request ids).
//!
//! The statistical gate (on by default) stops chance from firing: a rate
//! metric (a proportion whose `samples` is its denominator) breaches only when
//! its Wilson score interval clears the threshold (Newcombe's hybrid interval
//! for a difference of two rates); a drift metric breaches only when the
//! statistics core's Benjamini-Hochberg-corrected `drift_detected` says so.
//!
//! The firing / resolved lifecycle lives in [`super::lifecycle`].

use statrs::distribution::{ContinuousCDF, Normal};

use crate::config::{ChangeKind, ConditionKind, Config, Operator, RuleConfig};
use crate::metrics::aggregator::WindowRow;
use crate::metrics::PREDICTION_FEATURE;
use crate::model::Severity;

/// Names of the built-in rules (switch one off with `alerts.disabled_rules`).
pub const BUILTIN_RULES: &[&str] = &[
    "feature_drift",
    "prediction_drift",
    "performance_drop",
    "label_coverage_drop",
    "missing_values",
    "volume_drop",
    "volume_spike",
    "latency_p99",
];

/// Proportions whose `samples` is their denominator: the Wilson gate applies.
const RATE_METRICS: &[&str] = &[
    "accuracy",
    "label_coverage",
    "missing_rate",
    "nan_rate",
    "type_mismatch_rate",
    "out_of_range_rate",
    "new_category_rate",
];

/// Metrics where higher is better: a baseline rule fires when they fall.
const HIGHER_IS_BETTER: &[&str] = &[
    "accuracy",
    "precision",
    "recall",
    "f1",
    "specificity",
    "roc_auc",
    "pr_auc",
    "r2",
    "f1_macro",
    "f1_micro",
    "f1_weighted",
    "label_coverage",
    "estimated_accuracy",
    "estimated_precision",
    "estimated_recall",
    "estimated_f1",
];

/// Metrics bounded by `[0, 1]` where a drop is measured in points.
const BOUNDED_SCORES: &[&str] = &[
    "accuracy",
    "precision",
    "recall",
    "f1",
    "specificity",
    "roc_auc",
    "pr_auc",
    "f1_macro",
    "f1_micro",
    "f1_weighted",
    "label_coverage",
    "estimated_accuracy",
    "estimated_precision",
    "estimated_recall",
    "estimated_f1",
];

/// True when the Wilson gate applies to `metric`.
pub fn is_rate(metric: &str) -> bool {
    RATE_METRICS.contains(&metric)
}

/// True for a drift statistic gated by `drift_detected`.
pub fn is_drift(metric: &str) -> bool {
    crate::metrics::names::is_drift(metric)
}

/// What a rule compares the window's value with.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The value itself.
    Threshold,
    /// The change against a fixed business baseline.
    Baseline {
        /// The baseline value.
        value: f64,
        /// Absolute or relative change.
        change: ChangeKind,
    },
    /// The change against the previous window of the same series.
    PreviousWindow {
        /// Absolute or relative change.
        change: ChangeKind,
    },
    /// The change against the same window of another model version.
    Version {
        /// The version compared with.
        version: String,
        /// Absolute or relative change.
        change: ChangeKind,
    },
}

impl Condition {
    /// The condition's config name.
    pub fn kind(&self) -> ConditionKind {
        match self {
            Condition::Threshold => ConditionKind::Threshold,
            Condition::Baseline { .. } => ConditionKind::Baseline,
            Condition::PreviousWindow { .. } => ConditionKind::PreviousWindow,
            Condition::Version { .. } => ConditionKind::Version,
        }
    }

    /// How the change is measured (`absolute` for a plain threshold).
    pub fn change(&self) -> ChangeKind {
        match self {
            Condition::Threshold => ChangeKind::Absolute,
            Condition::Baseline { change, .. }
            | Condition::PreviousWindow { change }
            | Condition::Version { change, .. } => *change,
        }
    }
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Rule name.
    pub name: String,
    /// Metric name.
    pub metric: String,
    /// Model id or `*`.
    pub model: String,
    /// Model version or `*`.
    pub version: String,
    /// Feature, `*`, or `None` for model-level rows.
    pub feature: Option<String>,
    /// Segment, `*`, or `''`.
    pub segment: String,
    /// What the value is compared with.
    pub condition: Condition,
    /// Comparison.
    pub operator: Operator,
    /// Threshold at which the rule fires with `severity`.
    pub threshold: f64,
    /// Severity at `threshold`.
    pub severity: Severity,
    /// Stricter threshold at which the alert is critical.
    pub critical_threshold: Option<f64>,
    /// Consecutive breaching windows before firing.
    pub for_windows: u32,
    /// Consecutive clear windows before resolving.
    pub resolve_after: u32,
    /// Least samples for a row to count either way.
    pub min_samples: u64,
    /// Quiet period after a resolution, ms of event time.
    pub cooldown_ms: i64,
    /// How far the watermark must be past a window's end before it is evaluated, ms.
    pub settle_ms: i64,
    /// Whether the statistical gate applies.
    pub gate: bool,
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Rule {
    fn from_config(r: &RuleConfig, cfg: &Config) -> Self {
        let condition = match r.condition {
            ConditionKind::Threshold => Condition::Threshold,
            ConditionKind::Baseline => Condition::Baseline {
                value: r
                    .baseline
                    .or_else(|| {
                        cfg.models
                            .get(&r.model)
                            .and_then(|m| m.baseline.get(&r.metric).copied())
                    })
                    .unwrap_or(0.0),
                change: r.change,
            },
            ConditionKind::PreviousWindow => Condition::PreviousWindow { change: r.change },
            ConditionKind::Version => Condition::Version {
                version: r.compare_version.clone().unwrap_or_default(),
                change: r.change,
            },
        };
        Rule {
            name: r.name.clone(),
            metric: r.metric.clone(),
            model: r.model.clone(),
            version: r.version.clone(),
            feature: r.feature.clone(),
            segment: r.segment.clone(),
            condition,
            operator: r.operator,
            threshold: r.threshold,
            severity: r.severity,
            critical_threshold: r.critical_threshold,
            for_windows: r.for_windows.max(1),
            resolve_after: r.resolve_after.unwrap_or(cfg.alerts.resolve_after).max(1),
            min_samples: r.min_samples,
            cooldown_ms: ms(r.cooldown),
            settle_ms: ms(r.settle),
            gate: r.gate.unwrap_or(cfg.alerts.statistical_gate),
        }
    }

    /// True when `row` is one of the rows this rule watches, ignoring the
    /// version selector.
    pub(crate) fn matches_ignoring_version(&self, row: &WindowRow) -> bool {
        if row.value.metric != self.metric {
            return false;
        }
        if self.model != "*" && *self.model != *row.model_id {
            return false;
        }
        if self.segment != "*" && *self.segment != *row.segment {
            return false;
        }
        match &self.feature {
            None => row.value.feature.is_empty(),
            // `*` means the real features: prediction / label drift are named.
            Some(f) if f == "*" => {
                !row.value.feature.is_empty() && !row.value.feature.starts_with("__")
            }
            Some(f) => *f == row.value.feature,
        }
    }

    /// True when `row` is one of the rows this rule watches.
    pub fn matches(&self, row: &WindowRow) -> bool {
        (self.version == "*" || *self.version == *row.model_version)
            && self.matches_ignoring_version(row)
    }

    /// The threshold for `severity` (in the compared quantity's units).
    pub fn threshold_for(&self, severity: Severity) -> f64 {
        match (severity, self.critical_threshold) {
            (Severity::Critical, Some(c)) => c,
            _ => self.threshold,
        }
    }

    /// What the rule watches, in one line (for `check-config`).
    pub fn describe(&self) -> String {
        let feature = match self.feature.as_deref() {
            None => String::new(),
            Some("*") => " feature=* (every feature)".to_string(),
            Some(f) => format!(" feature={f}"),
        };
        let segment = match self.segment.as_str() {
            "" => "all traffic".to_string(),
            "*" => "every segment".to_string(),
            s => format!("segment {s}"),
        };
        let quantity = match &self.condition {
            Condition::Threshold => self.metric.clone(),
            Condition::Baseline { value, change } => {
                format!("{} change vs baseline {value}", change_name(*change))
            }
            Condition::PreviousWindow { change } => {
                format!("{} change vs previous window", change_name(*change))
            }
            Condition::Version { version, change } => {
                format!("{} change vs version {version}", change_name(*change))
            }
        };
        let critical = self
            .critical_threshold
            .map(|c| format!(", critical {} {c}", self.operator.as_str()))
            .unwrap_or_default();
        let gate = if !self.gate {
            "no gate"
        } else if is_rate(&self.metric) {
            "Wilson-interval gate"
        } else if is_drift(&self.metric) {
            "drift_detected gate"
        } else {
            "no gate for this metric"
        };
        let mut extra = String::new();
        if self.cooldown_ms > 0 {
            extra.push_str(&format!(", cooldown {}s", self.cooldown_ms / 1000));
        }
        if self.settle_ms > 0 {
            extra.push_str(&format!(", settle {}s", self.settle_ms / 1000));
        }
        format!(
            "{}: {} of model={} version={}{feature} on {segment}: fires {} when {quantity} {} {}{critical}; for {} window(s), resolves after {} clear, min_samples {}, {gate}{extra}",
            self.name,
            self.metric,
            self.model,
            self.version,
            self.severity.as_str(),
            self.operator.as_str(),
            self.threshold,
            self.for_windows,
            self.resolve_after,
            self.min_samples,
        )
    }

    /// Evaluates one row. `reference` is the (value, samples) the condition
    /// compares with (`None` for a fixed threshold or baseline, or when the
    /// previous window / other version is unknown); `drift_decision` is the
    /// feature's `drift_detected` in the same window, if any; `z` the normal
    /// quantile of the gate's confidence level.
    pub fn check(
        &self,
        row: &WindowRow,
        reference: Option<(f64, u64)>,
        drift_decision: Option<f64>,
        z: f64,
    ) -> Check {
        let v = &row.value;
        if v.samples < self.min_samples || !v.value.is_finite() {
            return Check::Unknown;
        }
        let rate = self.gate && is_rate(&self.metric);
        // The reference value and its own interval (for two-rate comparisons).
        let (ref_value, ref_interval) = match &self.condition {
            Condition::Threshold => (None, None),
            Condition::Baseline { value, .. } => (Some(*value), None),
            Condition::PreviousWindow { .. } | Condition::Version { .. } => match reference {
                Some((r, n)) if r.is_finite() && n >= self.min_samples => {
                    (Some(r), rate.then(|| wilson(r, n, z)))
                }
                _ => return Check::Unknown,
            },
        };
        let own = rate.then(|| wilson(v.value, v.samples, z));
        // The compared quantity and its interval.
        let (x, interval) = match ref_value {
            None => (v.value, own),
            Some(r) => {
                let d = v.value - r;
                let di = match (own, ref_interval) {
                    (Some((l1, u1)), Some((l2, u2))) => Some((
                        d - ((v.value - l1).powi(2) + (u2 - r).powi(2)).sqrt(),
                        d + ((u1 - v.value).powi(2) + (r - l2).powi(2)).sqrt(),
                    )),
                    (Some((l1, u1)), None) => Some((l1 - r, u1 - r)),
                    _ => None,
                };
                match self.condition.change() {
                    ChangeKind::Absolute => (d, di),
                    ChangeKind::Relative => {
                        if r == 0.0 {
                            return Check::Unknown;
                        }
                        let s = r.abs();
                        (d / s, di.map(|(l, u)| (l / s, u / s)))
                    }
                }
            }
        };
        if self.gate && crate::metrics::names::DRIFT_STATISTICS.contains(&self.metric.as_str()) {
            match drift_decision {
                None => return Check::Unknown,
                Some(d) if d < 0.5 => {
                    return Check::Clear {
                        observed: x,
                        reference: ref_value,
                        interval,
                    }
                }
                Some(_) => {}
            }
        }
        let passes = |t: f64| match interval {
            Some((lo, hi)) => match self.operator {
                Operator::Gt | Operator::Ge => self.operator.holds(lo, t),
                Operator::Lt | Operator::Le => self.operator.holds(hi, t),
            },
            None => self.operator.holds(x, t),
        };
        let severity = match self.critical_threshold {
            Some(c) if passes(c) => Some(Severity::Critical),
            _ if passes(self.threshold) => Some(self.severity),
            _ => None,
        };
        match severity {
            Some(severity) => Check::Breach {
                severity,
                observed: x,
                reference: ref_value,
                interval,
            },
            None => Check::Clear {
                observed: x,
                reference: ref_value,
                interval,
            },
        }
    }

    /// The threshold of `severity` in the metric's units (for the alert's
    /// `threshold` field), given the reference value of a change condition.
    pub fn metric_threshold(&self, severity: Severity, reference: Option<f64>) -> f64 {
        let t = self.threshold_for(severity);
        match (reference, self.condition.change()) {
            (None, _) => t,
            (Some(r), ChangeKind::Absolute) => r + t,
            (Some(r), ChangeKind::Relative) => r + t * r.abs(),
        }
    }
}

fn change_name(c: ChangeKind) -> &'static str {
    match c {
        ChangeKind::Absolute => "absolute",
        ChangeKind::Relative => "relative",
    }
}

/// The outcome of one rule on one window row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    /// Not enough information: too few samples, no reference, no drift decision.
    Unknown,
    /// The condition does not hold.
    Clear {
        /// The compared quantity (value or change).
        observed: f64,
        /// The reference value of a change condition.
        reference: Option<f64>,
        /// The gate's interval of the compared quantity.
        interval: Option<(f64, f64)>,
    },
    /// The condition holds.
    Breach {
        /// Severity reached.
        severity: Severity,
        /// The compared quantity (value or change).
        observed: f64,
        /// The reference value of a change condition.
        reference: Option<f64>,
        /// The gate's interval of the compared quantity.
        interval: Option<(f64, f64)>,
    },
}

/// The Wilson score interval of a proportion `p` observed in `n` trials.
pub fn wilson(p: f64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let p = p.clamp(0.0, 1.0);
    let n = n as f64;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// The two-sided normal quantile of a confidence level (0.95 → 1.96).
pub fn z_of(confidence: f64) -> f64 {
    let c = if confidence.is_finite() {
        confidence.clamp(0.5, 0.999_999)
    } else {
        0.95
    };
    Normal::new(0.0, 1.0)
        .map(|n| n.inverse_cdf(1.0 - (1.0 - c) / 2.0))
        .unwrap_or(1.96)
}

/// The rules in force: the built-in defaults (unless switched off), then the
/// user's rules. A user rule with the name of a built-in replaces it.
pub fn compile(cfg: &Config) -> Vec<Rule> {
    let mut rules = Vec::new();
    if cfg.alerts.default_rules {
        rules.extend(
            builtin_rules(cfg)
                .into_iter()
                .filter(|(family, _)| !cfg.alerts.disabled_rules.iter().any(|d| d == family))
                .map(|(_, r)| r),
        );
    }
    for r in &cfg.alerts.rules {
        rules.retain(|x| x.name != r.name);
        rules.push(Rule::from_config(r, cfg));
    }
    rules
}

/// A rule with the built-in defaults for what is not given.
fn base(name: &str, metric: &str, cfg: &Config) -> Rule {
    Rule {
        name: name.into(),
        metric: metric.into(),
        model: "*".into(),
        version: "*".into(),
        feature: None,
        segment: String::new(),
        condition: Condition::Threshold,
        operator: Operator::Gt,
        threshold: 0.0,
        severity: Severity::Warning,
        critical_threshold: None,
        for_windows: 1,
        resolve_after: cfg.alerts.resolve_after.max(1),
        min_samples: 1,
        cooldown_ms: 0,
        settle_ms: 0,
        gate: cfg.alerts.statistical_gate,
    }
}

/// The built-in rules, each with the family name `disabled_rules` uses.
fn builtin_rules(cfg: &Config) -> Vec<(&'static str, Rule)> {
    let drift_min = cfg.drift.min_samples;
    let mut out = vec![
        (
            "feature_drift",
            Rule {
                feature: Some("*".into()),
                operator: Operator::Ge,
                threshold: 1.0,
                min_samples: drift_min,
                ..base("feature_drift", "drift_detected", cfg)
            },
        ),
        (
            "prediction_drift",
            Rule {
                feature: Some(PREDICTION_FEATURE.into()),
                operator: Operator::Ge,
                threshold: cfg.drift.psi_threshold,
                severity: Severity::Critical,
                min_samples: drift_min,
                ..base("prediction_drift", "psi", cfg)
            },
        ),
        (
            "label_coverage_drop",
            Rule {
                condition: Condition::PreviousWindow {
                    change: ChangeKind::Relative,
                },
                operator: Operator::Lt,
                threshold: -0.5,
                min_samples: 100,
                // Coverage grows as labels arrive: judge a window once its
                // label horizon has passed (its final revision).
                settle_ms: ms(cfg.windows.label_horizon),
                ..base("label_coverage_drop", "label_coverage", cfg)
            },
        ),
        (
            "missing_values",
            Rule {
                feature: Some("*".into()),
                operator: Operator::Gt,
                threshold: 0.1,
                critical_threshold: Some(0.3),
                min_samples: drift_min,
                ..base("missing_values", "missing_rate", cfg)
            },
        ),
        (
            "volume_drop",
            Rule {
                condition: Condition::PreviousWindow {
                    change: ChangeKind::Relative,
                },
                operator: Operator::Lt,
                threshold: -0.5,
                critical_threshold: Some(-0.9),
                ..base("volume_drop", "prediction_count", cfg)
            },
        ),
        (
            "volume_spike",
            Rule {
                condition: Condition::PreviousWindow {
                    change: ChangeKind::Relative,
                },
                operator: Operator::Gt,
                threshold: 1.0,
                critical_threshold: Some(4.0),
                min_samples: 100,
                ..base("volume_spike", "prediction_count", cfg)
            },
        ),
        (
            "latency_p99",
            Rule {
                operator: Operator::Gt,
                threshold: 1000.0,
                critical_threshold: Some(5000.0),
                for_windows: 2,
                min_samples: 100,
                ..base("latency_p99", "latency_p99", cfg)
            },
        ),
    ];
    let tol = cfg.alerts.baseline_tolerance;
    for (model, m) in &cfg.models {
        for (metric, &baseline) in &m.baseline {
            let higher_better = HIGHER_IS_BETTER.contains(&metric.as_str());
            let (operator, change, warn, crit) = if BOUNDED_SCORES.contains(&metric.as_str()) {
                (Operator::Lt, ChangeKind::Absolute, -tol, -2.0 * tol)
            } else if higher_better {
                (Operator::Lt, ChangeKind::Relative, -10.0 * tol, -20.0 * tol)
            } else {
                (Operator::Gt, ChangeKind::Relative, 10.0 * tol, 20.0 * tol)
            };
            out.push((
                "performance_drop",
                Rule {
                    model: model.clone(),
                    condition: Condition::Baseline {
                        value: baseline,
                        change,
                    },
                    operator,
                    threshold: warn,
                    critical_threshold: Some(crit),
                    min_samples: 100,
                    ..base(&format!("performance_drop_{metric}"), metric, cfg)
                },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::metrics::MetricValue;

    fn row(metric: &'static str, value: f64, samples: u64) -> WindowRow {
        WindowRow {
            model_id: Arc::from("m"),
            model_version: Arc::from("v1"),
            segment: Arc::from(""),
            window_start_ms: 0,
            window_ms: 60_000,
            value: MetricValue {
                metric,
                feature: String::new(),
                value,
                samples,
                p_value: None,
            },
            revision: 0,
        }
    }

    #[test]
    fn wilson_matches_the_textbook_interval() {
        // 80 of 100: Wilson 95 % interval (0.7112, 0.8666).
        let (lo, hi) = wilson(0.8, 100, z_of(0.95));
        assert!((lo - 0.7112).abs() < 1e-3, "{lo}");
        assert!((hi - 0.8666).abs() < 1e-3, "{hi}");
        assert!((z_of(0.95) - 1.959_964).abs() < 1e-5);
        assert_eq!(wilson(0.0, 0, 1.96), (0.0, 1.0));
    }

    #[test]
    fn gate_needs_the_interval_to_clear_the_threshold() {
        let cfg = crate::config::load(None, &HashMap::new()).unwrap();
        let mut r = base("acc", "accuracy", &cfg);
        r.operator = Operator::Lt;
        r.threshold = 0.85;
        let z = z_of(0.95);
        // 0.80 on 100 labels: upper bound 0.867 > 0.85, not proven.
        assert!(matches!(
            r.check(&row("accuracy", 0.8, 100), None, None, z),
            Check::Clear { .. }
        ));
        // 0.80 on 2000 labels: upper bound 0.817 < 0.85.
        assert!(matches!(
            r.check(&row("accuracy", 0.8, 2000), None, None, z),
            Check::Breach { .. }
        ));
        r.gate = false;
        assert!(matches!(
            r.check(&row("accuracy", 0.8, 100), None, None, z),
            Check::Breach { .. }
        ));
    }

    #[test]
    fn change_conditions_compare_with_their_reference() {
        let cfg = crate::config::load(None, &HashMap::new()).unwrap();
        let mut r = base("vol", "prediction_count", &cfg);
        r.condition = Condition::PreviousWindow {
            change: ChangeKind::Relative,
        };
        r.operator = Operator::Lt;
        r.threshold = -0.5;
        r.critical_threshold = Some(-0.9);
        let z = 1.96;
        let c = r.check(
            &row("prediction_count", 400.0, 400),
            Some((1000.0, 1000)),
            None,
            z,
        );
        match c {
            Check::Breach {
                severity,
                observed,
                reference,
                ..
            } => {
                assert_eq!(severity, Severity::Warning);
                assert!((observed + 0.6).abs() < 1e-12);
                assert_eq!(reference, Some(1000.0));
            }
            other => panic!("{other:?}"),
        }
        let c = r.check(
            &row("prediction_count", 50.0, 50),
            Some((1000.0, 1000)),
            None,
            z,
        );
        assert!(matches!(
            c,
            Check::Breach {
                severity: Severity::Critical,
                ..
            }
        ));
        assert_eq!(
            r.check(&row("prediction_count", 50.0, 50), None, None, z),
            Check::Unknown
        );
        assert!((r.metric_threshold(Severity::Warning, Some(1000.0)) - 500.0).abs() < 1e-9);
    }

    #[test]
    fn drift_statistics_wait_for_the_drift_decision() {
        let cfg = crate::config::load(None, &HashMap::new()).unwrap();
        let rules = compile(&cfg);
        let r = rules.iter().find(|r| r.name == "prediction_drift").unwrap();
        let mut big = row("psi", 0.5, 1000);
        big.value.feature = PREDICTION_FEATURE.into();
        assert_eq!(r.check(&big, None, None, 1.96), Check::Unknown);
        assert!(matches!(
            r.check(&big, None, Some(0.0), 1.96),
            Check::Clear { .. }
        ));
        assert!(matches!(
            r.check(&big, None, Some(1.0), 1.96),
            Check::Breach {
                severity: Severity::Critical,
                ..
            }
        ));
    }

    #[test]
    fn builtins_can_be_switched_off_and_replaced() {
        let mut env = HashMap::new();
        env.insert(
            "MODELWATCH_MODELS__FRAUD__BASELINE__ACCURACY".to_string(),
            "0.92".to_string(),
        );
        env.insert(
            "MODELWATCH_ALERTS__DISABLED_RULES".to_string(),
            "[\"volume_spike\"]".to_string(),
        );
        let cfg = crate::config::load(None, &env).unwrap();
        let rules = compile(&cfg);
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        assert!(!names.contains(&"volume_spike"), "{names:?}");
        for n in [
            "feature_drift",
            "prediction_drift",
            "label_coverage_drop",
            "missing_values",
            "volume_drop",
            "latency_p99",
            "performance_drop_accuracy",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        let p = rules
            .iter()
            .find(|r| r.name == "performance_drop_accuracy")
            .unwrap();
        assert_eq!(p.model, "fraud");
        assert_eq!(
            p.condition,
            Condition::Baseline {
                value: 0.92,
                change: ChangeKind::Absolute
            }
        );
        assert!((p.threshold + 0.02).abs() < 1e-12);
        assert!(p
            .describe()
            .contains("performance_drop_accuracy: accuracy of model=fraud"));
    }
}
