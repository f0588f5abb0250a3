//! Alert messages that explain themselves: the value, threshold and
//! reference, the sample size and interval, and the largest contributors
//! (the most drifted features of the window, the worst segments of a
//! performance drop), so the receiver knows where to look. Pure text.

use crate::alerting::rules::{is_drift, Check, Condition, Rule};
use crate::config::Operator;
use crate::metrics::aggregator::WindowRow;

/// How many contributors a message lists.
const TOP: usize = 3;
/// Segments with fewer samples than this are not listed as contributors.
const MIN_SEGMENT_SAMPLES: u64 = 30;

/// A value for people: integers plainly, else four significant decimals.
pub fn fmt_value(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// Milliseconds since the epoch as RFC 3339 (seconds).
pub fn fmt_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn what(rule: &Rule, row: &WindowRow) -> String {
    if row.value.feature.is_empty() {
        rule.metric.clone()
    } else {
        format!("{} of {}", rule.metric, row.value.feature)
    }
}

fn place(row: &WindowRow) -> String {
    let segment = if row.segment.is_empty() {
        "all traffic".to_string()
    } else {
        row.segment.to_string()
    };
    format!(
        "model {} version {} on {segment}, window {} + {}s",
        row.model_id,
        row.model_version,
        fmt_time(row.window_start_ms),
        row.window_ms / 1000
    )
}

fn comparison(rule: &Rule, reference: Option<f64>, observed: f64) -> String {
    let critical = rule
        .critical_threshold
        .map(|c| format!(", critical {} {}", rule.operator.as_str(), fmt_value(c)))
        .unwrap_or_default();
    let rule_text = format!(
        "{} {}{critical}",
        rule.operator.as_str(),
        fmt_value(rule.threshold)
    );
    let relative = rule.condition.change() == crate::config::ChangeKind::Relative;
    let change = |what: &str, r: f64| {
        if relative {
            format!(
                "{what} {}, relative change {:+.1}% (rule: {rule_text})",
                fmt_value(r),
                observed * 100.0,
            )
        } else {
            format!(
                "{what} {}, change {:+.4} (rule: {rule_text})",
                fmt_value(r),
                observed
            )
        }
    };
    match (&rule.condition, reference) {
        (Condition::Threshold, _) | (_, None) => format!("threshold {rule_text}"),
        (Condition::Baseline { .. }, Some(r)) => change("baseline", r),
        (Condition::PreviousWindow { .. }, Some(r)) => change("previous window", r),
        (Condition::Version { version, .. }, Some(r)) => change(&format!("version {version}"), r),
    }
}

/// The message of a firing alert.
pub fn firing(rule: &Rule, row: &WindowRow, check: &Check, rows: &[WindowRow]) -> String {
    let (observed, reference, interval) = match *check {
        Check::Breach {
            observed,
            reference,
            interval,
            ..
        }
        | Check::Clear {
            observed,
            reference,
            interval,
        } => (observed, reference, interval),
        Check::Unknown => (row.value.value, None, None),
    };
    let mut m = format!(
        "{} is {} ({}) for {}, {} samples",
        what(rule, row),
        fmt_value(row.value.value),
        comparison(rule, reference, observed),
        place(row),
        row.value.samples
    );
    if let Some((lo, hi)) = interval {
        m.push_str(&format!(
            ", confidence interval [{}, {}]",
            fmt_value(lo),
            fmt_value(hi)
        ));
    }
    if let Some(p) = row.value.p_value {
        m.push_str(&format!(", p={p:.3e}"));
    }
    if let Some(c) = contributors(rule, row, rows) {
        m.push_str(". ");
        m.push_str(&c);
    }
    m
}

/// The message of a resolution, naming the window that cleared it.
pub fn resolved(rule: &Rule, row: &WindowRow, clear_windows: u32) -> String {
    format!(
        "resolved: {} is {} in window starting {} ({} samples), clear for {clear_windows} window(s); rule {} {} {} on {}",
        what(rule, row),
        fmt_value(row.value.value),
        fmt_time(row.window_start_ms),
        row.value.samples,
        rule.condition.kind().as_str(),
        rule.operator.as_str(),
        fmt_value(rule.threshold),
        place(row)
    )
}

fn same_window(a: &WindowRow, b: &WindowRow) -> bool {
    a.model_id == b.model_id
        && a.model_version == b.model_version
        && a.window_ms == b.window_ms
        && a.window_start_ms == b.window_start_ms
}

/// The largest contributors of the breach, when the batch has them: the most
/// drifted features (by PSI) for drift rules, the worst segments for
/// model-level rules.
pub fn contributors(rule: &Rule, row: &WindowRow, rows: &[WindowRow]) -> Option<String> {
    if is_drift(&rule.metric) || rule.metric.starts_with("drifted_feature") {
        let mut drifted: Vec<(&str, f64, Option<f64>)> = rows
            .iter()
            .filter(|r| {
                same_window(r, row)
                    && r.segment == row.segment
                    && r.value.metric == "drift_detected"
                    && r.value.value >= 0.5
                    && !r.value.feature.starts_with("__")
            })
            .map(|d| {
                let psi = rows
                    .iter()
                    .find(|r| {
                        same_window(r, row)
                            && r.segment == row.segment
                            && r.value.metric == "psi"
                            && r.value.feature == d.value.feature
                    })
                    .map_or(0.0, |r| r.value.value);
                (d.value.feature.as_str(), psi, d.value.p_value)
            })
            .collect();
        if drifted.is_empty() {
            return None;
        }
        drifted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        let n = drifted.len();
        let list: Vec<String> = drifted
            .iter()
            .take(TOP)
            .map(|(f, psi, p)| match p {
                Some(p) => format!("{f} (psi {}, adjusted p {p:.1e})", fmt_value(*psi)),
                None => format!("{f} (psi {})", fmt_value(*psi)),
            })
            .collect();
        return Some(format!(
            "{n} feature(s) drifted in this window; most drifted: {}",
            list.join(", ")
        ));
    }
    if !row.value.feature.is_empty() || !row.segment.is_empty() {
        return None;
    }
    let mut segs: Vec<&WindowRow> = rows
        .iter()
        .filter(|r| {
            same_window(r, row)
                && !r.segment.is_empty()
                && r.value.metric == row.value.metric
                && r.value.feature.is_empty()
                && r.value.samples >= MIN_SEGMENT_SAMPLES.min(rule.min_samples.max(1))
        })
        .collect();
    if segs.is_empty() {
        return None;
    }
    // The newest revision of each segment only.
    segs.sort_by(|a, b| a.segment.cmp(&b.segment).then(b.revision.cmp(&a.revision)));
    segs.dedup_by(|a, b| a.segment == b.segment);
    match rule.operator {
        Operator::Lt | Operator::Le => segs.sort_by(|a, b| a.value.value.total_cmp(&b.value.value)),
        Operator::Gt | Operator::Ge => segs.sort_by(|a, b| b.value.value.total_cmp(&a.value.value)),
    }
    let list: Vec<String> = segs
        .iter()
        .take(TOP)
        .map(|r| {
            format!(
                "{} {} (n={})",
                r.segment,
                fmt_value(r.value.value),
                r.value.samples
            )
        })
        .collect();
    Some(format!("worst segments: {}", list.join(", ")))
}
