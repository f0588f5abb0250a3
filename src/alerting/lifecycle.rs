//! The alert lifecycle: per series, which windows breached, when an alert
//! fires, updates and resolves. Pure: rows in, [`AlertEvent`]s out; the
//! watermark and the time of firing are arguments.
//!
//! A *series* is (rule, model, version, segment, feature, window size). Each
//! series keeps the recent windows' values and outcomes (breach with a
//! severity, clear, or unknown — too few samples, no reference yet), so
//! revised windows (late labels) and change conditions work on any order of
//! arrival. Then:
//! - a series fires when a window breaches and it completes a run of
//!   `for_windows` consecutive breaching windows; the alert carries the
//!   deterministic [`alert_id`] of (rule, series, window);
//! - a revision of the firing window updates its alert (same id) when the
//!   severity changes or the sample size has doubled since the last version;
//! - it resolves, with the same id, after `resolve_after` consecutive clear
//!   windows newer than the firing one (unknown windows are skipped);
//! - after resolving it stays quiet for windows starting within `cooldown`
//!   of the resolving window's end, and never fires again for windows at or
//!   before the resolving one.
//!
//! [`AlertEngine::restore`] rebuilds the state from the `alerts` table;
//! [`AlertEngine::snapshot`] and [`AlertEngine::restore_snapshot`] checkpoint
//! the whole state (every series' history too), so a restored engine goes on
//! exactly as the original would.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ahash::AHashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::alerting::explain;
use crate::alerting::rules::{compile, z_of, Check, Condition, Rule};
use crate::config::Config;
use crate::metrics::aggregator::WindowRow;
use crate::model::{AlertEvent, AlertStatus, LimitHits, Severity};

/// Windows of history kept per series (a day of 5-minute windows, plus some):
/// performance rows of older windows keep being revised until the label horizon.
const HISTORY_WINDOWS: usize = 320;

/// The deterministic id of a rule's alert on one series and window.
pub fn alert_id(rule: &str, row: &WindowRow) -> String {
    id_of(
        rule,
        &row.model_id,
        &row.model_version,
        &row.segment,
        &row.value.feature,
        row.window_ms,
        row.window_start_ms,
    )
}

fn id_of(
    rule: &str,
    model: &str,
    version: &str,
    segment: &str,
    feature: &str,
    window_ms: i64,
    window_start_ms: i64,
) -> String {
    let mut h = Sha256::new();
    for part in [rule, model, version, segment, feature] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.update(window_ms.to_le_bytes());
    h.update(window_start_ms.to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

type SeriesKey = (usize, Arc<str>, Arc<str>, Arc<str>, String, i64);

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Outcome {
    Unknown,
    Clear,
    Breach(Severity),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Entry {
    value: f64,
    samples: u64,
    outcome: Outcome,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Active {
    alert: AlertEvent,
    window_start_ms: i64,
    samples_at_emit: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Series {
    history: BTreeMap<i64, Entry>,
    active: Option<Active>,
    /// Windows starting before this do not fire (cooldown).
    quiet_until_ms: i64,
    /// Windows at or before this belong to a finished episode.
    episode_end_ms: Option<i64>,
}

impl Series {
    fn record(&mut self, row: &WindowRow) {
        let e = self.history.entry(row.window_start_ms).or_insert(Entry {
            value: row.value.value,
            samples: row.value.samples,
            outcome: Outcome::Unknown,
        });
        e.value = row.value.value;
        e.samples = row.value.samples;
        while self.history.len() > HISTORY_WINDOWS {
            self.history.pop_first();
        }
    }

    fn outcome(&self, window_start_ms: i64) -> Outcome {
        self.history
            .get(&window_start_ms)
            .map_or(Outcome::Unknown, |e| e.outcome)
    }

    /// Consecutive clear windows newer than `after`, counted back from the newest.
    fn trailing_clear(&self, after: i64) -> u32 {
        let mut n = 0;
        for (_, e) in self.history.range(after.saturating_add(1)..).rev() {
            match e.outcome {
                Outcome::Clear => n += 1,
                Outcome::Breach(_) => break,
                Outcome::Unknown => {}
            }
        }
        n
    }

    /// Length of the run of consecutive breaching windows through `w`.
    fn breach_run(&self, w: i64, window_ms: i64) -> u32 {
        let is_breach = |t: i64| matches!(self.outcome(t), Outcome::Breach(_));
        let mut n = 0;
        let mut t = w;
        while is_breach(t) {
            n += 1;
            t -= window_ms;
        }
        let mut t = w + window_ms;
        while is_breach(t) {
            n += 1;
            t += window_ms;
        }
        n
    }
}

/// The series of `key`, made when new. At `max` series, the quiet ones
/// (not firing) updated longest ago are forgotten first, down to 90 % of
/// `max`: their history only serves runs and comparisons with recent
/// windows. When every kept series is firing there is no room: `None`,
/// counted in `refused`.
fn slot<'a>(
    series: &'a mut HashMap<SeriesKey, Series>,
    key: SeriesKey,
    max: usize,
    refused: &mut u64,
) -> Option<&'a mut Series> {
    if !series.contains_key(&key) && series.len() >= max {
        let mut quiet: Vec<(i64, SeriesKey)> = series
            .iter()
            .filter(|(_, s)| s.active.is_none())
            .map(|(k, s)| {
                let last = s.history.last_key_value().map_or(i64::MIN, |(t, _)| *t);
                (last, k.clone())
            })
            .collect();
        // Oldest first; ties by key, so the same state forgets the same series.
        quiet.sort_unstable();
        let excess = series.len() + 1 - max.saturating_mul(9) / 10;
        for (_, k) in quiet.into_iter().take(excess.max(1)) {
            series.remove(&k);
        }
        if series.len() >= max {
            *refused += 1;
            return None;
        }
    }
    Some(series.entry(key).or_default())
}

/// Version of the [`AlertEngine::snapshot`] encoding.
const SNAPSHOT_FORMAT: u32 = 1;

/// A series as written by [`AlertEngine::snapshot`]: its key, with the rule
/// by name (rule indices change with the configuration), and its state.
#[derive(Serialize)]
struct SeriesOut<'a> {
    rule: &'a str,
    model_id: &'a str,
    model_version: &'a str,
    segment: &'a str,
    feature: &'a str,
    window_ms: i64,
    state: &'a Series,
}

/// What [`AlertEngine::snapshot`] writes.
#[derive(Serialize)]
struct SnapshotOut<'a> {
    format: u32,
    watermark_ms: i64,
    series: Vec<SeriesOut<'a>>,
    series_refused: u64,
}

/// [`SeriesOut`], read back.
#[derive(Deserialize)]
struct SeriesIn {
    rule: String,
    model_id: Arc<str>,
    model_version: Arc<str>,
    segment: Arc<str>,
    feature: String,
    window_ms: i64,
    state: Series,
}

/// [`SnapshotOut`], read back.
#[derive(Deserialize)]
struct SnapshotIn {
    format: u32,
    watermark_ms: i64,
    series: Vec<SeriesIn>,
    #[serde(default)]
    series_refused: u64,
}

/// A snapshot [`AlertEngine::restore_snapshot`] cannot read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Not a MessagePack alert engine snapshot.
    #[error("undecodable alert engine snapshot: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// Written in another version of the snapshot format.
    #[error("alert engine snapshot format {0} is not the supported {SNAPSHOT_FORMAT}")]
    Format(u32),
}

/// Evaluates rules over window rows and keeps the state of every series.
#[derive(Debug)]
pub struct AlertEngine {
    rules: Vec<Rule>,
    z: f64,
    series: HashMap<SeriesKey, Series>,
    watermark_ms: i64,
    /// Most series kept (`limits.max_alert_series`).
    max_series: usize,
    /// Values that found no series to go to: every kept one was firing.
    series_refused: u64,
}

impl AlertEngine {
    /// An engine with these rules, a 95 % gate, nothing firing and the
    /// default `limits.max_alert_series`.
    pub fn new(rules: Vec<Rule>) -> Self {
        AlertEngine {
            rules,
            z: z_of(0.95),
            series: HashMap::new(),
            watermark_ms: i64::MIN,
            max_series: crate::config::LimitsConfig::default().max_alert_series,
            series_refused: 0,
        }
    }

    /// The engine of a configuration: its rules, gate confidence and series cap.
    pub fn from_config(cfg: &Config) -> Self {
        let mut e = AlertEngine::new(compile(cfg));
        e.z = z_of(cfg.alerts.confidence);
        e.max_series = cfg.limits.max_alert_series.max(1);
        e
    }

    /// Caps hit: `max_alert_series`.
    pub fn limit_hits(&self) -> LimitHits {
        LimitHits {
            max_alert_series: self.series_refused,
            ..LimitHits::default()
        }
    }

    /// Series kept.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// The rules in force.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Series currently firing.
    pub fn firing(&self) -> usize {
        self.series.values().filter(|s| s.active.is_some()).count()
    }

    /// The alerts currently firing (latest version of each), sorted by id.
    pub fn active_alerts(&self) -> Vec<AlertEvent> {
        let mut v: Vec<AlertEvent> = self
            .series
            .values()
            .filter_map(|s| s.active.as_ref().map(|a| a.alert.clone()))
            .collect();
        v.sort_by(|a, b| a.alert_id.cmp(&b.alert_id));
        v
    }

    fn key(&self, i: usize, row: &WindowRow, version: &Arc<str>) -> SeriesKey {
        (
            i,
            row.model_id.clone(),
            version.clone(),
            row.segment.clone(),
            row.value.feature.clone(),
            row.window_ms,
        )
    }

    /// Evaluates `rows` (one advance of the core), appending alert
    /// transitions to `out`. `watermark_ms` is the event time the rows are
    /// complete up to (`None`: the newest window end among the rows).
    pub fn evaluate(
        &mut self,
        rows: &[WindowRow],
        watermark_ms: Option<i64>,
        now_ms: i64,
        out: &mut Vec<AlertEvent>,
    ) {
        let newest_end = rows
            .iter()
            .map(|r| r.window_start_ms.saturating_add(r.window_ms))
            .max();
        if let Some(w) = watermark_ms.or(newest_end) {
            self.watermark_ms = self.watermark_ms.max(w);
        }
        // Drift decisions of this batch, for the drift gate.
        let mut drift: AHashMap<(&str, &str, &str, i64, i64, &str), f64> = AHashMap::new();
        for r in rows {
            if r.value.metric == "drift_detected" {
                drift.insert(
                    (
                        &r.model_id,
                        &r.model_version,
                        &r.segment,
                        r.window_ms,
                        r.window_start_ms,
                        &r.value.feature,
                    ),
                    r.value.value,
                );
            }
        }
        // Pass 1: record every value first, so change conditions find their
        // reference whatever the order of the rows in the batch.
        for row in rows {
            if !row.value.value.is_finite() {
                continue;
            }
            for i in 0..self.rules.len() {
                let rule = &self.rules[i];
                let compared = match &rule.condition {
                    Condition::Version { version, .. } => *row.model_version == **version,
                    _ => false,
                };
                if !(rule.matches(row) || (compared && rule.matches_ignoring_version(row))) {
                    continue;
                }
                let key = self.key(i, row, &row.model_version);
                let Some(series) = slot(
                    &mut self.series,
                    key,
                    self.max_series,
                    &mut self.series_refused,
                ) else {
                    continue;
                };
                series.record(row);
            }
        }
        // Pass 2: evaluate and step the lifecycle.
        for row in rows {
            if !row.value.value.is_finite() {
                continue;
            }
            for i in 0..self.rules.len() {
                let rule = &self.rules[i];
                if !rule.matches(row) {
                    continue;
                }
                let end = row.window_start_ms.saturating_add(row.window_ms);
                if rule.settle_ms > 0 && end.saturating_add(rule.settle_ms) > self.watermark_ms {
                    continue;
                }
                let reference = match &rule.condition {
                    Condition::PreviousWindow { .. } => self
                        .series
                        .get(&self.key(i, row, &row.model_version))
                        .and_then(|s| s.history.get(&(row.window_start_ms - row.window_ms)))
                        .map(|e| (e.value, e.samples)),
                    Condition::Version { version, .. } => {
                        if *row.model_version == **version {
                            continue;
                        }
                        let v: Arc<str> = Arc::from(version.as_str());
                        self.series
                            .get(&self.key(i, row, &v))
                            .and_then(|s| s.history.get(&row.window_start_ms))
                            .map(|e| (e.value, e.samples))
                    }
                    Condition::Threshold | Condition::Baseline { .. } => None,
                };
                let decision = drift
                    .get(&(
                        &*row.model_id,
                        &*row.model_version,
                        &*row.segment,
                        row.window_ms,
                        row.window_start_ms,
                        row.value.feature.as_str(),
                    ))
                    .copied();
                let check = rule.check(row, reference, decision, self.z);
                let key = self.key(i, row, &row.model_version);
                // Pass 1 made room for the series or counted it refused.
                let Some(series) = self.series.get_mut(&key) else {
                    continue;
                };
                step(series, rule, row, &check, rows, now_ms, out);
            }
        }
    }

    /// The lifecycle state of every series and the watermark,
    /// MessagePack-encoded (rules excluded: they come from config). The same
    /// state gives the same bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut series: Vec<(&SeriesKey, &Series)> = self.series.iter().collect();
        series.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let snapshot = SnapshotOut {
            format: SNAPSHOT_FORMAT,
            watermark_ms: self.watermark_ms,
            series_refused: self.series_refused,
            series: series
                .into_iter()
                .map(
                    |((i, model, version, segment, feature, window_ms), s)| SeriesOut {
                        rule: &self.rules[*i].name,
                        model_id: model,
                        model_version: version,
                        segment,
                        feature,
                        window_ms: *window_ms,
                        state: s,
                    },
                )
                .collect(),
        };
        rmp_serde::to_vec(&snapshot).expect("the alert engine state serializes")
    }

    /// Replaces the state (every series and the watermark) with a
    /// [`AlertEngine::snapshot`]'s. Series of rules that no longer exist are
    /// dropped; a rule is known by its name. On error the state is unchanged.
    pub fn restore_snapshot(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        let snapshot: SnapshotIn = rmp_serde::from_slice(bytes)?;
        if snapshot.format != SNAPSHOT_FORMAT {
            return Err(SnapshotError::Format(snapshot.format));
        }
        let rules: AHashMap<&str, usize> = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();
        let mut series = HashMap::with_capacity(snapshot.series.len());
        for s in snapshot.series {
            let Some(&i) = rules.get(s.rule.as_str()) else {
                continue;
            };
            let key = (
                i,
                s.model_id,
                s.model_version,
                s.segment,
                s.feature,
                s.window_ms,
            );
            series.insert(key, s.state);
        }
        self.series = series;
        self.watermark_ms = snapshot.watermark_ms;
        self.series_refused = snapshot.series_refused;
        Ok(())
    }

    /// Rebuilds the state from stored alerts (the latest event of each alert
    /// id, e.g. [`crate::sinks::clickhouse::ClickHouseSink::load_alerts`]):
    /// firing alerts become active again, resolved ones close their episode.
    /// Alerts of rules no longer configured are skipped. Returns how many
    /// alerts were restored.
    pub fn restore(&mut self, alerts: &[AlertEvent]) -> usize {
        let mut n = 0;
        for a in alerts {
            let Some(i) = self
                .rules
                .iter()
                .position(|r| r.name == a.rule && (r.model == "*" || r.model == a.model_id))
            else {
                continue;
            };
            let window_ms = a.window_end - a.window_start;
            if window_ms <= 0 {
                continue;
            }
            let key: SeriesKey = (
                i,
                Arc::from(a.model_id.as_str()),
                Arc::from(a.model_version.as_str()),
                Arc::from(a.segment.as_str()),
                a.feature.clone().unwrap_or_default(),
                window_ms,
            );
            let cooldown = self.rules[i].cooldown_ms;
            let s = self.series.entry(key).or_default();
            match a.status {
                AlertStatus::Firing => {
                    let newer = s
                        .active
                        .as_ref()
                        .is_none_or(|x| x.window_start_ms < a.window_start);
                    if newer {
                        s.active = Some(Active {
                            alert: a.clone(),
                            window_start_ms: a.window_start,
                            // Unknown: only a severity change updates it.
                            samples_at_emit: u64::MAX / 4,
                        });
                    }
                }
                AlertStatus::Resolved => {
                    if s.active
                        .as_ref()
                        .is_some_and(|x| x.alert.alert_id == a.alert_id)
                    {
                        s.active = None;
                    }
                    s.episode_end_ms =
                        Some(s.episode_end_ms.unwrap_or(i64::MIN).max(a.window_start));
                    s.quiet_until_ms = s.quiet_until_ms.max(a.window_end.saturating_add(cooldown));
                }
            }
            n += 1;
        }
        n
    }
}

/// One lifecycle step of a series after window `row` was checked.
fn step(
    s: &mut Series,
    rule: &Rule,
    row: &WindowRow,
    check: &Check,
    rows: &[WindowRow],
    now_ms: i64,
    out: &mut Vec<AlertEvent>,
) {
    let w = row.window_start_ms;
    let outcome = match *check {
        Check::Unknown => Outcome::Unknown,
        Check::Clear { .. } => Outcome::Clear,
        Check::Breach { severity, .. } => Outcome::Breach(severity),
    };
    if let Some(e) = s.history.get_mut(&w) {
        e.outcome = outcome;
    }
    if let Some(a) = &mut s.active {
        if let (
            true,
            Check::Breach {
                severity,
                reference,
                ..
            },
        ) = (w == a.window_start_ms, check)
        {
            // A revision of the firing window (late labels): update its alert.
            if *severity != a.alert.severity
                || row.value.samples >= a.samples_at_emit.saturating_mul(2)
            {
                a.alert.severity = *severity;
                a.alert.value = row.value.value;
                a.alert.threshold = rule.metric_threshold(*severity, *reference);
                a.alert.baseline = *reference;
                a.alert.p_value = row.value.p_value;
                a.alert.fired_at = now_ms;
                a.alert.message = explain::firing(rule, row, check, rows);
                a.samples_at_emit = row.value.samples;
                out.push(a.alert.clone());
            }
            return;
        }
        let fired_window = a.window_start_ms;
        let clear = s.trailing_clear(fired_window);
        if clear >= rule.resolve_after {
            let newest = s.history.keys().next_back().copied().unwrap_or(w);
            let Some(a) = s.active.take() else {
                return;
            };
            let mut resolved = a.alert;
            resolved.status = AlertStatus::Resolved;
            resolved.value = row.value.value;
            resolved.p_value = row.value.p_value;
            resolved.fired_at = now_ms;
            resolved.message = explain::resolved(rule, row, clear);
            out.push(resolved);
            s.episode_end_ms = Some(newest);
            s.quiet_until_ms = newest
                .saturating_add(row.window_ms)
                .saturating_add(rule.cooldown_ms);
        }
        return;
    }
    let Check::Breach {
        severity,
        reference,
        ..
    } = *check
    else {
        return;
    };
    if s.episode_end_ms.is_some_and(|e| w <= e) || w < s.quiet_until_ms {
        return;
    }
    if s.breach_run(w, row.window_ms) < rule.for_windows {
        return;
    }
    let alert = AlertEvent {
        alert_id: alert_id(&rule.name, row),
        rule: rule.name.clone(),
        status: AlertStatus::Firing,
        severity,
        model_id: row.model_id.to_string(),
        model_version: row.model_version.to_string(),
        segment: row.segment.to_string(),
        feature: (!row.value.feature.is_empty()).then(|| row.value.feature.clone()),
        metric: rule.metric.clone(),
        value: row.value.value,
        threshold: rule.metric_threshold(severity, reference),
        baseline: reference,
        p_value: row.value.p_value,
        window_start: w,
        window_end: w.saturating_add(row.window_ms),
        fired_at: now_ms,
        message: explain::firing(rule, row, check, rows),
    };
    out.push(alert.clone());
    s.active = Some(Active {
        alert,
        window_start_ms: w,
        samples_at_emit: row.value.samples,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ChangeKind, Operator};
    use crate::metrics::MetricValue;

    fn row(
        metric: &'static str,
        feature: &str,
        window: i64,
        value: f64,
        samples: u64,
    ) -> WindowRow {
        row_v("v1", metric, feature, window, value, samples)
    }

    fn row_v(
        version: &str,
        metric: &'static str,
        feature: &str,
        window: i64,
        value: f64,
        samples: u64,
    ) -> WindowRow {
        WindowRow {
            model_id: Arc::from("m"),
            model_version: Arc::from(version),
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

    fn rule(metric: &str, operator: Operator, threshold: f64) -> Rule {
        Rule {
            name: "r".into(),
            metric: metric.into(),
            model: "*".into(),
            version: "*".into(),
            feature: None,
            segment: String::new(),
            condition: Condition::Threshold,
            operator,
            threshold,
            severity: Severity::Warning,
            critical_threshold: None,
            for_windows: 1,
            resolve_after: 1,
            min_samples: 10,
            cooldown_ms: 0,
            settle_ms: 0,
            gate: false,
        }
    }

    fn run(e: &mut AlertEngine, rows: &[WindowRow]) -> Vec<AlertEvent> {
        let mut out = vec![];
        e.evaluate(rows, None, 7, &mut out);
        out
    }

    #[test]
    fn fires_once_updates_on_revision_and_resolves_with_the_same_id() {
        let mut e = AlertEngine::new(vec![rule("accuracy", Operator::Lt, 0.8)]);
        assert!(run(&mut e, &[row("accuracy", "", 0, 0.9, 100)]).is_empty());
        let out = run(&mut e, &[row("accuracy", "", 1, 0.7, 100)]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].status, AlertStatus::Firing);
        assert_eq!((out[0].value, out[0].threshold), (0.7, 0.8));
        assert_eq!((out[0].window_start, out[0].window_end), (60_000, 120_000));
        assert!(
            out[0].message.contains("accuracy is 0.7000"),
            "{}",
            out[0].message
        );
        let id = out[0].alert_id.clone();
        // A small revision of the same window: nothing new.
        assert!(run(&mut e, &[row("accuracy", "", 1, 0.65, 150)]).is_empty());
        // Twice the labels: the alert is updated, same id.
        let out = run(&mut e, &[row("accuracy", "", 1, 0.6, 200)]);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].alert_id.as_str(), out[0].value), (id.as_str(), 0.6));
        // Too few samples: neither fires nor resolves.
        assert!(run(&mut e, &[row("accuracy", "", 2, 0.95, 5)]).is_empty());
        let out = run(&mut e, &[row("accuracy", "", 2, 0.95, 100)]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].status, AlertStatus::Resolved);
        assert_eq!(out[0].alert_id, id);
        assert_eq!(e.firing(), 0);
        // A late revision of the resolved episode does not fire again.
        assert!(run(&mut e, &[row("accuracy", "", 1, 0.5, 400)]).is_empty());
    }

    #[test]
    fn alert_series_are_bounded_quiet_ones_forgotten_first() {
        let every_feature = || {
            let mut r = rule("missing_rate", Operator::Gt, 0.5);
            r.feature = Some("*".into());
            r
        };
        let mut e = AlertEngine::new(vec![every_feature()]);
        e.max_series = 3;
        // Feature "hot" fires and keeps firing; "q0", "q1" stay quiet.
        assert_eq!(
            run(&mut e, &[row("missing_rate", "hot", 0, 0.9, 100)]).len(),
            1
        );
        run(&mut e, &[row("missing_rate", "q0", 1, 0.1, 100)]);
        run(&mut e, &[row("missing_rate", "q1", 2, 0.1, 100)]);
        assert_eq!(e.series_count(), 3);
        // A fourth series: quiet ones go, the one updated longest ago first,
        // down to 90 % of the cap (2 of 3).
        run(&mut e, &[row("missing_rate", "q2", 3, 0.1, 100)]);
        assert_eq!(e.series_count(), 2);
        assert_eq!(e.firing(), 1);
        let features: Vec<String> = {
            let mut v: Vec<String> = e.series.keys().map(|k| k.4.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(features, ["hot", "q2"]);
        assert_eq!(e.limit_hits().max_alert_series, 0);
        // Every kept series firing: a new one finds no room, counted.
        let mut e = AlertEngine::new(vec![every_feature()]);
        e.max_series = 2;
        run(&mut e, &[row("missing_rate", "a", 0, 0.9, 100)]);
        run(&mut e, &[row("missing_rate", "b", 0, 0.9, 100)]);
        assert!(run(&mut e, &[row("missing_rate", "c", 0, 0.9, 100)]).is_empty());
        assert_eq!((e.series_count(), e.firing()), (2, 2));
        assert_eq!(e.limit_hits().max_alert_series, 1);
        // The count survives a snapshot.
        let mut restored = AlertEngine::new(vec![every_feature()]);
        restored.restore_snapshot(&e.snapshot()).unwrap();
        assert_eq!(restored.limit_hits().max_alert_series, 1);
    }

    #[test]
    fn for_windows_resolve_after_and_cooldown() {
        let mut r = rule("missing_rate", Operator::Gt, 0.2);
        r.for_windows = 2;
        r.resolve_after = 2;
        r.cooldown_ms = 3 * 60_000;
        let mut e = AlertEngine::new(vec![r]);
        let series = [
            0.5, 0.1, 0.5, 0.5, 0.6, 0.1, 0.5, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5,
        ];
        let mut events = vec![];
        for (w, v) in series.iter().enumerate() {
            for a in run(&mut e, &[row("missing_rate", "", w as i64, *v, 100)]) {
                events.push((w, a.status));
            }
        }
        // Fires at window 3 (second breach in a row); window 6 alone is not
        // clear enough; resolves at 8 (two clear: 7, 8); cooldown covers
        // windows starting before 9 + 3 = 12; fires at 12 (run 9..12).
        assert_eq!(
            events,
            vec![
                (3, AlertStatus::Firing),
                (8, AlertStatus::Resolved),
                (12, AlertStatus::Firing)
            ]
        );
    }

    #[test]
    fn severity_escalates_and_updates_the_alert() {
        let mut r = rule("latency_p99", Operator::Gt, 100.0);
        r.critical_threshold = Some(500.0);
        let mut e = AlertEngine::new(vec![r]);
        let out = run(&mut e, &[row("latency_p99", "", 0, 200.0, 100)]);
        assert_eq!(out[0].severity, Severity::Warning);
        let out = run(&mut e, &[row("latency_p99", "", 0, 900.0, 110)]);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].severity, out[0].threshold),
            (Severity::Critical, 500.0)
        );
    }

    #[test]
    fn baseline_previous_window_and_version_conditions() {
        let mut base = rule("accuracy", Operator::Lt, -0.05);
        base.name = "base".into();
        base.condition = Condition::Baseline {
            value: 0.9,
            change: ChangeKind::Absolute,
        };
        let mut prev = rule("prediction_count", Operator::Lt, -0.5);
        prev.name = "prev".into();
        prev.condition = Condition::PreviousWindow {
            change: ChangeKind::Relative,
        };
        let mut ver = rule("accuracy", Operator::Lt, -0.03);
        ver.name = "ver".into();
        ver.version = "v2".into();
        ver.condition = Condition::Version {
            version: "v1".into(),
            change: ChangeKind::Absolute,
        };
        let mut e = AlertEngine::new(vec![base, prev, ver]);
        // The challenger's row comes before the champion's: still compared.
        let out = run(
            &mut e,
            &[
                row_v("v2", "accuracy", "", 0, 0.84, 500),
                row("accuracy", "", 0, 0.88, 500),
                row("prediction_count", "", 0, 1000.0, 1000),
            ],
        );
        let fired: Vec<(&str, &str)> = out
            .iter()
            .map(|a| (a.rule.as_str(), a.model_version.as_str()))
            .collect();
        // v2: 0.84 vs baseline 0.9 (-0.06) and vs v1 0.88 (-0.04); v1 is fine.
        assert_eq!(fired, vec![("base", "v2"), ("ver", "v2")]);
        let ver = out.iter().find(|a| a.rule == "ver").unwrap();
        assert_eq!(ver.baseline, Some(0.88));
        assert!((ver.threshold - 0.85).abs() < 1e-12);
        assert!(ver.message.contains("version v1 0.8800"), "{}", ver.message);
        // Volume falls by 70 % in the next window.
        let out = run(&mut e, &[row("prediction_count", "", 1, 300.0, 300)]);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].rule.as_str(), out[0].baseline),
            ("prev", Some(1000.0))
        );
        assert!(
            out[0].message.contains("relative change -70.0%"),
            "{}",
            out[0].message
        );
    }

    #[test]
    fn settle_waits_for_the_watermark() {
        let mut r = rule("label_coverage", Operator::Lt, 0.5);
        r.settle_ms = 10 * 60_000;
        let mut e = AlertEngine::new(vec![r]);
        let mut out = vec![];
        e.evaluate(
            &[row("label_coverage", "", 0, 0.1, 100)],
            Some(60_000),
            1,
            &mut out,
        );
        assert!(out.is_empty());
        e.evaluate(
            &[row("label_coverage", "", 0, 0.2, 100)],
            Some(11 * 60_000),
            1,
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].value, 0.2);
    }

    #[test]
    fn drift_alerts_name_the_most_drifted_features() {
        let cfg = crate::config::load(None, &Default::default()).unwrap();
        let mut e = AlertEngine::from_config(&cfg);
        let mut rows = vec![];
        for (f, psi, d) in [("age", 0.4, 1.0), ("income", 0.9, 1.0), ("zip", 0.01, 0.0)] {
            rows.push(row("psi", f, 0, psi, 500));
            let mut dr = row("drift_detected", f, 0, d, 500);
            dr.value.p_value = Some(1e-6);
            rows.push(dr);
        }
        let out = run(&mut e, &rows);
        let fired: Vec<_> = out.iter().map(|a| a.feature.as_deref()).collect();
        assert_eq!(fired, vec![Some("age"), Some("income")]);
        assert!(
            out[0]
                .message
                .contains("2 feature(s) drifted in this window; most drifted: income (psi 0.9000"),
            "{}",
            out[0].message
        );
        assert_eq!(out[0].p_value, Some(1e-6));
    }

    #[test]
    fn restore_keeps_firing_alerts_and_closed_episodes() {
        let mut e = AlertEngine::new(vec![rule("accuracy", Operator::Lt, 0.8)]);
        let fired = run(&mut e, &[row("accuracy", "", 1, 0.7, 100)]);
        assert_eq!(fired.len(), 1);
        let mut fresh = AlertEngine::new(vec![rule("accuracy", Operator::Lt, 0.8)]);
        assert_eq!(fresh.restore(&fired), 1);
        assert_eq!(fresh.firing(), 1);
        // The replayed window does not fire again; a clear window resolves it.
        assert!(run(&mut fresh, &[row("accuracy", "", 1, 0.7, 100)]).is_empty());
        let out = run(&mut fresh, &[row("accuracy", "", 2, 0.9, 100)]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].status, AlertStatus::Resolved);
        assert_eq!(out[0].alert_id, fired[0].alert_id);
        // Restoring the resolution closes the episode in another engine.
        let mut other = AlertEngine::new(vec![rule("accuracy", Operator::Lt, 0.8)]);
        other.restore(&[fired[0].clone(), out[0].clone()]);
        assert_eq!(other.firing(), 0);
        assert!(run(&mut other, &[row("accuracy", "", 1, 0.7, 100)]).is_empty());
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

    // ---- checkpoints ----

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn row_s(
        version: &str,
        segment: &str,
        metric: &'static str,
        feature: &str,
        window: i64,
        value: f64,
        samples: u64,
    ) -> WindowRow {
        let mut r = row_v(version, metric, feature, window, value, samples);
        r.segment = Arc::from(segment);
        r
    }

    /// The built-in rules and a few with every condition, run length,
    /// cooldown, settle time and gate.
    fn checkpoint_rules() -> Vec<Rule> {
        let cfg = crate::config::load(None, &Default::default()).unwrap();
        let mut rules = compile(&cfg);
        let mut acc = rule("accuracy", Operator::Lt, 0.8);
        acc.name = "acc".into();
        acc.segment = "*".into();
        acc.for_windows = 2;
        acc.resolve_after = 2;
        acc.cooldown_ms = 2 * 60_000;
        let mut gated = rule("accuracy", Operator::Lt, 0.8);
        gated.name = "gated".into();
        gated.gate = true;
        gated.critical_threshold = Some(0.6);
        let mut prev = rule("prediction_count", Operator::Lt, -0.3);
        prev.name = "prev".into();
        prev.segment = "*".into();
        prev.condition = Condition::PreviousWindow {
            change: ChangeKind::Relative,
        };
        let mut ver = rule("accuracy", Operator::Lt, -0.05);
        ver.name = "ver".into();
        ver.version = "v2".into();
        ver.condition = Condition::Version {
            version: "v1".into(),
            change: ChangeKind::Absolute,
        };
        let mut settle = rule("label_coverage", Operator::Lt, 0.5);
        settle.name = "settle".into();
        settle.settle_ms = 3 * 60_000;
        let mut psi = rule("psi", Operator::Gt, 0.2);
        psi.name = "psi".into();
        psi.feature = Some("*".into());
        psi.gate = true;
        rules.extend([acc, gated, prev, ver, settle, psi]);
        rules
    }

    /// Random batches of rows (one new window each, sometimes a revision of
    /// an older one) with their watermark.
    fn random_batches(seed: u64, n: i64) -> Vec<(Vec<WindowRow>, Option<i64>)> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|b| {
                let mut windows = vec![b];
                if b > 0 && rng.gen_bool(0.5) {
                    windows.push(b - rng.gen_range(1..=b.min(3)));
                }
                let mut rows = vec![];
                for w in windows {
                    for version in ["v1", "v2"] {
                        for segment in ["", "country=de"] {
                            let r = |m, f: &str, v, n| row_s(version, segment, m, f, w, v, n);
                            let acc = rng.gen_range(0.5..1.0);
                            rows.push(r("accuracy", "", acc, rng.gen_range(5..400)));
                            let count = rng.gen_range(100.0..1000.0);
                            rows.push(r("prediction_count", "", count, count as u64));
                            let coverage = rng.gen_range(0.2..1.0);
                            rows.push(r("label_coverage", "", coverage, 300));
                            let missing = rng.gen_range(0.0..0.4);
                            rows.push(r("missing_rate", "age", missing, 300));
                            rows.push(r("latency_p99", "", rng.gen_range(10.0..900.0), 300));
                            for f in ["age", "income"] {
                                let n = rng.gen_range(50..1000);
                                rows.push(r("psi", f, rng.gen_range(0.0..0.5), n));
                                let mut d = r("drift_detected", f, f64::from(rng.gen_bool(0.3)), n);
                                d.value.p_value = Some(rng.gen_range(0.0..0.1));
                                rows.push(d);
                            }
                        }
                    }
                }
                let wm = rng
                    .gen_bool(0.5)
                    .then(|| (b + 1) * 60_000 - rng.gen_range(0..120_000));
                (rows, wm)
            })
            .collect()
    }

    fn step_batch(
        e: &mut AlertEngine,
        b: usize,
        batch: &(Vec<WindowRow>, Option<i64>),
    ) -> Vec<AlertEvent> {
        let mut out = vec![];
        e.evaluate(&batch.0, batch.1, 1_000 * b as i64 + 7, &mut out);
        out
    }

    #[test]
    fn a_restored_snapshot_goes_on_exactly_as_the_original() {
        for seed in 0..4 {
            let batches = random_batches(seed, 60);
            let mut original = AlertEngine::new(checkpoint_rules());
            let mut events = vec![];
            let mut snapshots = vec![];
            for (b, batch) in batches.iter().enumerate() {
                snapshots.push(original.snapshot());
                events.push(step_batch(&mut original, b, batch));
            }
            let all: Vec<&AlertEvent> = events.iter().flatten().collect();
            assert!(
                all.iter().any(|a| a.status == AlertStatus::Resolved),
                "seed {seed}"
            );
            assert!(
                all.iter()
                    .filter(|a| a.status == AlertStatus::Firing)
                    .count()
                    > 10
            );
            let end = original.snapshot();
            for split in [0, 1, 7, 23, 42, 59] {
                let mut restored = AlertEngine::new(checkpoint_rules());
                restored.restore_snapshot(&snapshots[split]).unwrap();
                assert_eq!(
                    restored.snapshot(),
                    snapshots[split],
                    "same state, same bytes"
                );
                for (b, batch) in batches.iter().enumerate().skip(split) {
                    assert_eq!(
                        step_batch(&mut restored, b, batch),
                        events[b],
                        "seed {seed} split {split} batch {b}"
                    );
                }
                assert_eq!(restored.snapshot(), end);
                assert_eq!(restored.active_alerts(), original.active_alerts());
            }
        }
    }

    #[test]
    fn restore_snapshot_drops_the_series_of_removed_rules() {
        let batches = random_batches(9, 30);
        let mut both = AlertEngine::new(checkpoint_rules());
        for (b, batch) in batches.iter().take(20).enumerate() {
            step_batch(&mut both, b, batch);
        }
        let snapshot = both.snapshot();
        // The same rules but one, in another order (indices shift).
        let mut rules: Vec<Rule> = checkpoint_rules()
            .into_iter()
            .filter(|r| r.name != "acc")
            .collect();
        rules.reverse();
        let mut fewer = AlertEngine::new(rules);
        fewer.restore_snapshot(&snapshot).unwrap();
        let expected: Vec<AlertEvent> = both
            .active_alerts()
            .into_iter()
            .filter(|a| a.rule != "acc")
            .collect();
        assert!(both.active_alerts().iter().any(|a| a.rule == "acc"));
        assert_eq!(fewer.active_alerts(), expected);
        // Events of a batch come in rule order: compare them sorted.
        let sorted = |mut v: Vec<AlertEvent>| {
            v.sort_by(|a, b| {
                (&a.alert_id, a.status.as_str()).cmp(&(&b.alert_id, b.status.as_str()))
            });
            v
        };
        for (b, batch) in batches.iter().enumerate().skip(20) {
            let want: Vec<AlertEvent> = step_batch(&mut both, b, batch)
                .into_iter()
                .filter(|a| a.rule != "acc")
                .collect();
            assert_eq!(
                sorted(step_batch(&mut fewer, b, batch)),
                sorted(want),
                "batch {b}"
            );
        }
    }

    #[test]
    fn a_bad_snapshot_is_an_error_and_changes_nothing() {
        let mut e = AlertEngine::new(vec![rule("accuracy", Operator::Lt, 0.8)]);
        run(&mut e, &[row("accuracy", "", 1, 0.7, 100)]);
        let before = e.snapshot();
        assert!(matches!(
            e.restore_snapshot(b"not a snapshot"),
            Err(SnapshotError::Decode(_))
        ));
        let other = rmp_serde::to_vec(&SnapshotOut {
            format: SNAPSHOT_FORMAT + 1,
            watermark_ms: 0,
            series: vec![],
            series_refused: 0,
        })
        .unwrap();
        assert!(matches!(
            e.restore_snapshot(&other),
            Err(SnapshotError::Format(f)) if f == SNAPSHOT_FORMAT + 1
        ));
        assert_eq!(e.snapshot(), before);
        assert_eq!(e.firing(), 1);
    }
}
