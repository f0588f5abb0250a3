//! Threshold rules over window rows, and the firing → resolved lifecycle.
//!
//! Pure: rows in, [`AlertEvent`]s out; the time of firing is an argument.
//!
//! A *series* is (rule, model, version, segment, feature, window size). For
//! each window row a matching rule checks its condition:
//! - it holds (and the row has at least `min_samples`): the series fires for
//!   that window, once — a revised row of the same window (late labels) does
//!   not raise a second alert;
//! - it does not hold for a window after the one that fired: the series
//!   resolves, with the firing alert's id, so receivers can pair them.
//!
//! `alert_id` is a hash of rule, model, version, segment, feature, window
//! size and window start: a replay raises the same ids.

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};

use crate::config::{Config, Operator, RuleConfig};
use crate::metrics::aggregator::WindowRow;
use crate::model::{AlertEvent, AlertStatus, Severity};

/// Metrics where higher is better: a baseline rule fires when they fall.
const HIGHER_IS_BETTER: &[&str] = &[
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "r2",
    "specificity",
    "label_coverage",
];

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Rule name.
    pub name: String,
    /// Metric name.
    pub metric: String,
    /// Model id or `*`.
    pub model: String,
    /// Feature, `*`, or `None` for model-level rows.
    pub feature: Option<String>,
    /// Segment, `*`, or `''`.
    pub segment: String,
    /// Comparison.
    pub operator: Operator,
    /// Threshold.
    pub threshold: f64,
    /// Business baseline the threshold was derived from.
    pub baseline: Option<f64>,
    /// Severity.
    pub severity: Severity,
    /// Least samples to fire.
    pub min_samples: u64,
}

impl Rule {
    fn from_config(r: &RuleConfig) -> Self {
        Rule {
            name: r.name.clone(),
            metric: r.metric.clone(),
            model: r.model.clone(),
            feature: r.feature.clone(),
            segment: r.segment.clone(),
            operator: r.operator,
            threshold: r.threshold,
            baseline: None,
            severity: r.severity,
            min_samples: r.min_samples,
        }
    }

    fn matches(&self, row: &WindowRow) -> bool {
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
            Some(f) if f == "*" => !row.value.feature.is_empty(),
            Some(f) => *f == row.value.feature,
        }
    }

    /// What the rule watches, in one line (for `check-config`).
    pub fn describe(&self) -> String {
        let feature = match &self.feature {
            None => String::new(),
            Some(f) => format!(" feature={f}"),
        };
        let segment = if self.segment.is_empty() {
            "all traffic".to_string()
        } else {
            format!("segment={}", self.segment)
        };
        let baseline = self
            .baseline
            .map(|b| format!(" (baseline {b})"))
            .unwrap_or_default();
        format!(
            "{}: {} {} {}{baseline} [{}] model={}{feature} {segment}, min_samples={}",
            self.name,
            self.metric,
            self.operator.as_str(),
            self.threshold,
            self.severity.as_str(),
            self.model,
            self.min_samples
        )
    }
}

/// The rules in force: the built-in defaults (unless switched off), one
/// baseline rule per `[models.<id>.baseline]` entry, then the user's rules.
/// A user rule with the name of a default replaces it.
pub fn compile(cfg: &Config) -> Vec<Rule> {
    let mut rules = Vec::new();
    if cfg.alerts.default_rules {
        rules.extend(default_rules(cfg.drift.psi_threshold, cfg.drift.min_samples));
        for (model, m) in &cfg.models {
            for (metric, &baseline) in &m.baseline {
                let higher_better = HIGHER_IS_BETTER.contains(&metric.as_str());
                let (operator, threshold) = if higher_better {
                    (Operator::Lt, baseline - 0.05)
                } else {
                    (Operator::Gt, baseline * 1.2)
                };
                rules.push(Rule {
                    name: format!("{metric}_below_baseline"),
                    metric: metric.clone(),
                    model: model.clone(),
                    feature: None,
                    segment: String::new(),
                    operator,
                    threshold,
                    baseline: Some(baseline),
                    severity: Severity::Critical,
                    min_samples: 100,
                });
            }
        }
    }
    for r in &cfg.alerts.rules {
        rules.retain(|x| x.name != r.name);
        rules.push(Rule::from_config(r));
    }
    rules
}

fn default_rules(psi_threshold: f64, min_samples: u64) -> Vec<Rule> {
    vec![
        Rule {
            name: "feature_drift".into(),
            metric: "drift_detected".into(),
            model: "*".into(),
            feature: Some("*".into()),
            segment: String::new(),
            operator: Operator::Ge,
            threshold: 1.0,
            baseline: None,
            severity: Severity::Warning,
            min_samples,
        },
        Rule {
            name: "prediction_drift".into(),
            metric: "psi".into(),
            model: "*".into(),
            feature: Some("__prediction__".into()),
            segment: String::new(),
            operator: Operator::Ge,
            threshold: psi_threshold,
            baseline: None,
            severity: Severity::Critical,
            min_samples,
        },
        Rule {
            name: "missing_values".into(),
            metric: "missing_rate".into(),
            model: "*".into(),
            feature: Some("*".into()),
            segment: String::new(),
            operator: Operator::Gt,
            threshold: 0.2,
            baseline: None,
            severity: Severity::Warning,
            min_samples,
        },
    ]
}

/// The deterministic id of a rule's alert on one series and window.
pub fn alert_id(rule: &str, row: &WindowRow) -> String {
    let mut h = Sha256::new();
    for part in [
        rule,
        &row.model_id,
        &row.model_version,
        &row.segment,
        &row.value.feature,
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.update(row.window_ms.to_le_bytes());
    h.update(row.window_start_ms.to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

type SeriesKey = (usize, String, String, String, String, i64);

#[derive(Debug, Clone)]
struct Active {
    alert: AlertEvent,
    window_start_ms: i64,
}

/// Evaluates rules over window rows and keeps the firing state per series.
#[derive(Debug)]
pub struct AlertEngine {
    rules: Vec<Rule>,
    active: HashMap<SeriesKey, Active>,
    fired: HashSet<String>,
}

impl AlertEngine {
    /// An engine with these rules and nothing firing.
    pub fn new(rules: Vec<Rule>) -> Self {
        AlertEngine {
            rules,
            active: HashMap::new(),
            fired: HashSet::new(),
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Series currently firing.
    pub fn firing(&self) -> usize {
        self.active.len()
    }

    /// Evaluates `rows` (in window order), appending alert transitions to `out`.
    pub fn evaluate(&mut self, rows: &[WindowRow], now_ms: i64, out: &mut Vec<AlertEvent>) {
        for row in rows {
            if !row.value.value.is_finite() {
                continue;
            }
            for (i, rule) in self.rules.iter().enumerate() {
                if !rule.matches(row) {
                    continue;
                }
                let key: SeriesKey = (
                    i,
                    row.model_id.to_string(),
                    row.model_version.to_string(),
                    row.segment.to_string(),
                    row.value.feature.clone(),
                    row.window_ms,
                );
                let holds = row.value.samples >= rule.min_samples
                    && rule.operator.holds(row.value.value, rule.threshold);
                if holds {
                    let id = alert_id(&rule.name, row);
                    if self.fired.contains(&id) {
                        continue;
                    }
                    if let Some(a) = self.active.get(&key) {
                        if a.window_start_ms > row.window_start_ms {
                            // An older window revised into firing while a newer
                            // one already fires: the series is already firing.
                            continue;
                        }
                    }
                    self.fired.insert(id.clone());
                    let alert = AlertEvent {
                        alert_id: id,
                        rule: rule.name.clone(),
                        status: AlertStatus::Firing,
                        severity: rule.severity,
                        model_id: row.model_id.to_string(),
                        model_version: row.model_version.to_string(),
                        segment: row.segment.to_string(),
                        feature: (!row.value.feature.is_empty()).then(|| row.value.feature.clone()),
                        metric: rule.metric.clone(),
                        value: row.value.value,
                        threshold: rule.threshold,
                        baseline: rule.baseline,
                        p_value: row.value.p_value,
                        window_start: row.window_start_ms,
                        window_end: row.window_start_ms + row.window_ms,
                        fired_at: now_ms,
                        message: message(rule, row),
                    };
                    out.push(alert.clone());
                    self.active.insert(
                        key,
                        Active {
                            alert,
                            window_start_ms: row.window_start_ms,
                        },
                    );
                } else if row.value.samples >= rule.min_samples || row.value.samples == 0 {
                    let clears = match self.active.get(&key) {
                        Some(a) => row.window_start_ms >= a.window_start_ms,
                        None => false,
                    };
                    if clears {
                        let a = self.active.remove(&key).expect("checked");
                        let mut resolved = a.alert;
                        resolved.status = AlertStatus::Resolved;
                        resolved.value = row.value.value;
                        resolved.p_value = row.value.p_value;
                        resolved.fired_at = now_ms;
                        resolved.message = format!(
                            "resolved: {} is {} in window starting {} (threshold {} {})",
                            rule.metric,
                            fmt_value(row.value.value),
                            fmt_time(row.window_start_ms),
                            rule.operator.as_str(),
                            rule.threshold
                        );
                        out.push(resolved);
                    }
                }
            }
        }
    }
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

fn fmt_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn message(rule: &Rule, row: &WindowRow) -> String {
    let what = if row.value.feature.is_empty() {
        rule.metric.clone()
    } else {
        format!("{} of {}", rule.metric, row.value.feature)
    };
    let segment = if row.segment.is_empty() {
        "all traffic".to_string()
    } else {
        row.segment.to_string()
    };
    let baseline = rule
        .baseline
        .map(|b| format!(", baseline {}", fmt_value(b)))
        .unwrap_or_default();
    let p = row
        .value
        .p_value
        .map(|p| format!(", p={p:.3e}"))
        .unwrap_or_default();
    format!(
        "{what} is {} (threshold {} {}{baseline}) for model {} version {} on {segment}, window {} + {}s, {} samples{p}",
        fmt_value(row.value.value),
        rule.operator.as_str(),
        fmt_value(rule.threshold),
        row.model_id,
        row.model_version,
        fmt_time(row.window_start_ms),
        row.window_ms / 1000,
        row.value.samples
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::MetricValue;

    fn row(metric: &'static str, feature: &str, window: i64, value: f64, samples: u64) -> WindowRow {
        WindowRow {
            model_id: Arc::from("m"),
            model_version: Arc::from("v1"),
            segment: Arc::from(""),
            window_start_ms: window * 60_000,
            window_ms: 60_000,
            value: MetricValue {
                metric,
                feature: feature.into(),
                value,
                samples,
                p_value: None,
            },
            revision: 0,
        }
    }

    fn accuracy_rule() -> Rule {
        Rule::from_config(&RuleConfig {
            name: "acc".into(),
            metric: "accuracy".into(),
            model: "*".into(),
            feature: None,
            segment: String::new(),
            operator: Operator::Lt,
            threshold: 0.8,
            severity: Severity::Critical,
            min_samples: 10,
        })
    }

    #[test]
    fn fires_once_per_window_and_resolves_when_clear() {
        let mut e = AlertEngine::new(vec![accuracy_rule()]);
        let mut out = vec![];
        e.evaluate(&[row("accuracy", "", 0, 0.9, 100)], 1, &mut out);
        assert!(out.is_empty());
        e.evaluate(&[row("accuracy", "", 1, 0.7, 100)], 2, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].status, AlertStatus::Firing);
        assert_eq!(out[0].value, 0.7);
        assert_eq!(out[0].threshold, 0.8);
        assert_eq!(out[0].window_start, 60_000);
        assert_eq!(out[0].window_end, 120_000);
        assert!(out[0].message.contains("accuracy is 0.7000"), "{}", out[0].message);
        let id = out[0].alert_id.clone();
        // A revision of the same window (more labels) does not fire again.
        e.evaluate(&[row("accuracy", "", 1, 0.65, 150)], 3, &mut out);
        assert_eq!(out.len(), 1);
        // Too few samples: neither fires nor resolves.
        e.evaluate(&[row("accuracy", "", 2, 0.95, 5)], 4, &mut out);
        assert_eq!(out.len(), 1);
        e.evaluate(&[row("accuracy", "", 2, 0.95, 100)], 5, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].status, AlertStatus::Resolved);
        assert_eq!(out[1].alert_id, id);
        assert_eq!(e.firing(), 0);
    }

    #[test]
    fn alert_ids_are_deterministic_and_distinct_per_window_and_feature() {
        let a = alert_id("r", &row("psi", "age", 1, 0.5, 10));
        assert_eq!(a, alert_id("r", &row("psi", "age", 1, 0.9, 99)));
        assert_ne!(a, alert_id("r", &row("psi", "age", 2, 0.5, 10)));
        assert_ne!(a, alert_id("r", &row("psi", "income", 1, 0.5, 10)));
        assert_ne!(a, alert_id("q", &row("psi", "age", 1, 0.5, 10)));
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn feature_selectors_and_default_rules() {
        let cfg = crate::config::load(None, &Default::default()).unwrap();
        let mut e = AlertEngine::new(compile(&cfg));
        let mut out = vec![];
        e.evaluate(
            &[
                row("drift_detected", "age", 0, 1.0, 500),
                row("drift_detected", "income", 0, 0.0, 500),
                row("psi", "__prediction__", 0, 0.05, 500),
                row("psi", "__prediction__", 1, 0.35, 500),
                // model-level row: not a feature rule's business
                row("drift_detected", "", 0, 1.0, 500),
            ],
            9,
            &mut out,
        );
        let fired: Vec<_> = out
            .iter()
            .map(|a| (a.rule.as_str(), a.feature.as_deref(), a.window_start))
            .collect();
        assert_eq!(
            fired,
            vec![
                ("feature_drift", Some("age"), 0),
                ("prediction_drift", Some("__prediction__"), 60_000)
            ]
        );
    }

    #[test]
    fn baseline_rules_come_from_model_config() {
        let mut env = HashMap::new();
        env.insert(
            "MODELWATCH_MODELS__FRAUD__BASELINE__ACCURACY".to_string(),
            "0.92".to_string(),
        );
        let cfg = crate::config::load(None, &env).unwrap();
        let rules = compile(&cfg);
        let r = rules.iter().find(|r| r.name == "accuracy_below_baseline").unwrap();
        assert_eq!(r.model, "fraud");
        assert_eq!(r.operator, Operator::Lt);
        assert!((r.threshold - 0.87).abs() < 1e-12);
        assert_eq!(r.baseline, Some(0.92));
    }
}
