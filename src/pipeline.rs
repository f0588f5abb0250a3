//! The pure processing core: decoded events in, window rows and alerts out.
//!
//! join + aggregator + watermark + alert rules, with no I/O and no clock:
//! the wall-clock time is an argument. [`crate::app`] feeds it from Kafka and
//! writes what it emits; benches and tests drive it directly.

use crate::alerting::AlertEngine;
use crate::config::{Config, TaskKind};
use crate::join::{JoinConfig, JoinState, Joined, LabelInsert, PredictionInsert, Watermark};
use crate::join::{Source, StoredRequest, WatermarkState};
use crate::metrics::aggregator::{Aggregator, AggregatorConfig, Emitted, PendingRecord};
use crate::metrics::{DriftConfig, ReferenceProfile, Task};
use crate::model::{AlertEvent, GroundTruthEvent, Label, LimitHits, PredictionEvent};
use std::sync::Arc;

/// Counters of the core, for telemetry and summaries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoreStats {
    /// Predictions processed.
    pub predictions: u64,
    /// Labels processed.
    pub labels: u64,
    /// Prediction-label pairs joined.
    pub matched: u64,
    /// Predictions that expired without a label.
    pub expired: u64,
    /// Labels that never found a prediction.
    pub orphans: u64,
    /// Duplicate predictions (same request id, model and version).
    pub duplicate_predictions: u64,
    /// Duplicate labels (same request id).
    pub duplicate_labels: u64,
    /// Window rows emitted.
    pub rows: u64,
    /// Alert transitions emitted.
    pub alerts: u64,
    /// Windows closed.
    pub windows_closed: u64,
    /// Predictions that arrived after their window closed: counted here
    /// and left out of that window's metrics. (Kept by the aggregator's
    /// own record of a checkpoint, not this one.)
    #[serde(skip)]
    pub late_predictions: u64,
    /// Labels whose prediction was late.
    #[serde(skip)]
    pub late_labels: u64,
    /// Caps of `[limits]` hit, by cap ([`Core::stats`] sums every
    /// part's; the `core` record stores the join's, which its own state
    /// does not keep).
    #[serde(default)]
    pub limits: LimitHits,
}

/// A join request's change in a checkpoint: its id, and its first expiry
/// and record, or `None` when it left the join.
pub type JoinChange = (Arc<str>, Option<(i64, Vec<u8>)>);

/// The core's state for a checkpoint: whole records (name, MessagePack
/// bytes) and the join requests changed since the previous checkpoint.
#[derive(Debug, Default)]
pub struct CoreCheckpoint {
    /// `core` (watermark and counters), `aggregator`, `alerts`.
    pub records: Vec<(&'static str, Vec<u8>)>,
    /// Request id → (when it first expires, its join record), or `None`
    /// when it left the join.
    pub join: Vec<JoinChange>,
}

/// The `core` record: what is neither join, aggregator nor alert state.
#[derive(serde::Serialize, serde::Deserialize)]
struct CoreRecord {
    watermark: WatermarkState,
    stats: CoreStats,
}

/// A checkpoint that cannot be restored.
#[derive(Debug, thiserror::Error)]
#[error("cannot restore the {record} state: {reason}")]
pub struct RestoreError {
    /// Which record.
    pub record: &'static str,
    /// Why.
    pub reason: String,
}

impl RestoreError {
    fn of(record: &'static str, reason: impl std::fmt::Display) -> Self {
        RestoreError {
            record,
            reason: reason.to_string(),
        }
    }
}

/// What one [`Core::advance`] produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Rows, references and versions.
    pub emitted: Emitted,
    /// Alert transitions.
    pub alerts: Vec<AlertEvent>,
    /// The watermark the output is complete up to.
    pub watermark: Option<i64>,
}

/// The processing core. See the module docs.
pub struct Core {
    join: JoinState<PendingRecord>,
    agg: Aggregator,
    watermark: Watermark,
    engine: AlertEngine,
    joined: Vec<Joined<PendingRecord>>,
    stats: CoreStats,
}

/// The statistics settings derived from the configuration.
pub fn drift_config(cfg: &Config) -> DriftConfig {
    DriftConfig {
        bins: cfg.drift.bins,
        max_categories: cfg.limits.max_categories,
        psi_threshold: cfg.drift.psi_threshold,
        js_threshold: cfg.drift.js_threshold,
        min_samples: cfg.drift.min_samples,
        p_value_threshold: cfg.drift.p_value_threshold,
        label_reference_size: cfg.drift.label_reference_size,
        method: cfg.drift.method,
        method_overrides: cfg.drift.methods.clone(),
        wasserstein_threshold: cfg.drift.wasserstein_threshold,
        large_reference_rows: cfg.drift.large_reference_rows,
        max_reference_features: cfg.limits.max_features,
        max_reference_categories: cfg.limits.max_reference_categories,
        ..DriftConfig::default()
    }
}

/// The aggregator settings derived from the configuration.
fn aggregator_config(cfg: &Config) -> AggregatorConfig {
    let ms = |d: std::time::Duration| d.as_millis() as i64;
    AggregatorConfig {
        window_sizes_ms: cfg.window_sizes_ms(),
        label_horizon_ms: ms(cfg.windows.label_horizon),
        revision_interval_ms: ms(cfg.windows.revision_interval),
        drift: drift_config(cfg),
        reference_size: cfg.drift.reference_size,
        max_segment_values: cfg.limits.max_segment_values,
        max_models: cfg.limits.max_models,
        max_versions_per_model: cfg.limits.max_versions_per_model,
        max_segment_keys: cfg.limits.max_segment_keys,
        tasks: task_overrides(cfg),
    }
}

/// Task overrides from `[models.<id>]`.
fn task_overrides(cfg: &Config) -> ahash::AHashMap<String, Task> {
    cfg.models
        .iter()
        .filter_map(|(id, m)| {
            let task = match m.task? {
                TaskKind::Binary => Task::Binary {
                    positive_label: m.positive_label.clone().unwrap_or_else(|| "1".into()),
                    threshold: m.threshold.unwrap_or(0.5),
                },
                TaskKind::Multiclass => Task::Multiclass,
                TaskKind::Regression => Task::Regression,
            };
            Some((id.clone(), task))
        })
        .collect()
}

impl Core {
    /// A core for this configuration.
    pub fn new(cfg: &Config) -> Self {
        let ms = |d: std::time::Duration| d.as_millis() as i64;
        Core {
            join: JoinState::new(JoinConfig {
                label_horizon_ms: ms(cfg.windows.label_horizon),
                early_label_ttl_ms: ms(cfg.windows.early_label_ttl),
                max_pending: cfg.limits.max_pending,
                max_pending_per_model: cfg.limits.max_pending_per_model,
                max_early_labels: cfg.limits.max_early_labels,
            }),
            agg: Aggregator::new(aggregator_config(cfg)),
            watermark: Watermark::new(
                ms(cfg.windows.allowed_lateness),
                ms(cfg.windows.idle_timeout),
            ),
            engine: AlertEngine::from_config(cfg),
            joined: Vec::new(),
            stats: CoreStats::default(),
        }
    }

    /// A core with the state of a checkpoint: `record` returns the stored
    /// record of a name. The join requests come after, through
    /// [`Core::restore_request`]. The idle timer of the watermark starts
    /// with the first input after the restart.
    pub fn restore<'a>(
        cfg: &Config,
        record: impl Fn(&str) -> Option<&'a [u8]>,
    ) -> Result<Core, RestoreError> {
        let mut core = Core::new(cfg);
        let get =
            |name: &'static str| record(name).ok_or_else(|| RestoreError::of(name, "missing"));
        let r: CoreRecord =
            rmp_serde::from_slice(get("core")?).map_err(|e| RestoreError::of("core", e))?;
        core.watermark = Watermark::restored(
            cfg.windows.allowed_lateness.as_millis() as i64,
            cfg.windows.idle_timeout.as_millis() as i64,
            r.watermark,
        );
        core.stats = r.stats;
        core.agg = Aggregator::restore(aggregator_config(cfg), get("aggregator")?)
            .map_err(|e| RestoreError::of("aggregator", e))?;
        core.engine
            .restore_snapshot(get("alerts")?)
            .map_err(|e| RestoreError::of("alerts", e))?;
        Ok(core)
    }

    /// Puts one join request of a checkpoint back (after [`Core::restore`]).
    pub fn restore_request(&mut self, request_id: &str, bytes: &[u8]) -> Result<(), RestoreError> {
        let r: StoredRequest<PendingRecord> =
            rmp_serde::from_slice(bytes).map_err(|e| RestoreError::of("join", e))?;
        self.join.restore(request_id, r);
        Ok(())
    }

    /// The state for a checkpoint; the join part holds only the requests
    /// changed since the previous call.
    pub fn checkpoint(&mut self) -> CoreCheckpoint {
        let core = CoreRecord {
            watermark: self.watermark.state(),
            stats: CoreStats {
                limits: self.stats.limits.plus(&self.join.limit_hits()),
                ..self.stats
            },
        };
        let mut join = Vec::with_capacity(self.join.changed());
        let mut changes = Vec::with_capacity(self.join.changed());
        self.join
            .drain_changes(|key, r| changes.push((Arc::<str>::from(key), r)));
        for (key, r) in changes {
            let record = r.map(|r| {
                let bytes = rmp_serde::to_vec(&r).expect("join records serialize");
                (self.join.first_expiry(&r), bytes)
            });
            join.push((key, record));
        }
        CoreCheckpoint {
            records: vec![
                (
                    "core",
                    rmp_serde::to_vec(&core).expect("the core record serializes"),
                ),
                ("aggregator", self.agg.snapshot()),
                ("alerts", self.engine.snapshot()),
            ],
            join,
        }
    }

    /// Join requests changed since the last checkpoint.
    pub fn changed_requests(&self) -> usize {
        self.join.changed()
    }

    /// True when the join's own copy of `request_id` is the current one: it
    /// is in memory, or it changed (or left) since the last checkpoint. A
    /// stored record of any other request id is the current one.
    pub fn join_holds(&self, request_id: &str) -> bool {
        self.join.contains(request_id) || self.join.is_changed(request_id)
    }

    /// Request ids the join holds in memory.
    pub fn join_requests(&self) -> usize {
        self.join.requests()
    }

    /// Bytes of the request ids and label texts the join holds in memory
    /// (one pass over it).
    pub fn join_text_bytes(&self) -> usize {
        self.join.text_bytes()
    }

    /// Drops up to `n` requests unchanged since the last checkpoint from
    /// memory (their checkpointed records stay the current ones); returns
    /// how many requests and predictions left memory.
    pub fn evict_requests(&mut self, n: usize) -> (usize, usize) {
        self.join.evict_unchanged(n)
    }

    /// The predictions of a stored join record.
    pub fn stored_predictions(bytes: &[u8]) -> Result<usize, RestoreError> {
        let r: StoredRequest<PendingRecord> =
            rmp_serde::from_slice(bytes).map_err(|e| RestoreError::of("join", e))?;
        Ok(r.predictions.len())
    }

    /// The watermark [`Core::advance`] would use at `wall_ms`, without moving it.
    pub fn watermark_at(&self, wall_ms: i64) -> Option<i64> {
        self.watermark.peek(wall_ms)
    }

    /// Counters so far.
    pub fn stats(&self) -> CoreStats {
        let agg = self.agg.stats();
        CoreStats {
            late_predictions: agg.late_predictions,
            late_labels: agg.late_labels,
            limits: self
                .stats
                .limits
                .plus(&self.join.limit_hits())
                .plus(&agg.limits)
                .plus(&self.engine.limit_hits()),
            ..self.stats
        }
    }

    /// The aggregator (for reference installation and inspection).
    pub fn aggregator_mut(&mut self) -> &mut Aggregator {
        &mut self.agg
    }

    /// The alert engine.
    pub fn alert_engine(&self) -> &AlertEngine {
        &self.engine
    }

    /// The alert engine, to restore its state at startup.
    pub fn alert_engine_mut(&mut self) -> &mut AlertEngine {
        &mut self.engine
    }

    /// Predictions waiting for labels.
    pub fn pending_predictions(&self) -> usize {
        self.join.pending_predictions()
    }

    /// Approximate heap bytes of the window accumulators.
    pub fn window_heap_bytes(&self) -> usize {
        self.agg.approx_bytes()
    }

    /// Accumulator cells held (model, version, segment, window).
    pub fn window_cells(&self) -> usize {
        self.agg.cell_count()
    }

    /// Installs a reference profile for a model version.
    pub fn set_reference(&mut self, model_id: &str, version: &str, profile: ReferenceProfile) {
        self.agg.set_reference(model_id, version, profile);
    }

    /// Processes one prediction that arrived at wall-clock `wall_ms` (from
    /// partition 0: see [`Core::on_prediction_from`]).
    pub fn on_prediction(&mut self, ev: &PredictionEvent, wall_ms: i64) {
        self.on_prediction_from(0, ev, wall_ms)
    }

    /// Processes one label that arrived at wall-clock `wall_ms` (from
    /// partition 0: see [`Core::on_label_from`]).
    pub fn on_label(&mut self, ev: &GroundTruthEvent, wall_ms: i64) {
        self.on_label_from(0, ev, wall_ms)
    }

    /// Processes one prediction from partition `partition` of the
    /// predictions topic that arrived at wall-clock `wall_ms`. The
    /// watermark follows each partition on its own ([`crate::join::window`]).
    pub fn on_prediction_from(&mut self, partition: i32, ev: &PredictionEvent, wall_ms: i64) {
        self.stats.predictions += 1;
        self.watermark
            .observe(Source::predictions(partition), ev.timestamp, wall_ms);
        let v = self.agg.version_id(ev);
        let agg = &mut self.agg;
        // A duplicate (same request id, model and version) is counted and
        // left out of every metric: the aggregator only sees it if it is new.
        match self.join.insert_prediction_with(
            &ev.request_id,
            v,
            ev.timestamp,
            || agg.observe_prediction_of(v, ev),
            &mut self.joined,
        ) {
            PredictionInsert::Duplicate => {
                self.stats.duplicate_predictions += 1;
                self.agg.observe_duplicate(ev);
            }
            PredictionInsert::Matched | PredictionInsert::Pending | PredictionInsert::Refused => {}
        }
        self.drain_joined();
    }

    /// Processes one label from partition `partition` of the labels topic
    /// that arrived at wall-clock `wall_ms`.
    pub fn on_label_from(&mut self, partition: i32, ev: &GroundTruthEvent, wall_ms: i64) {
        self.stats.labels += 1;
        self.watermark
            .observe(Source::labels(partition), ev.timestamp, wall_ms);
        if let LabelInsert::Duplicate =
            self.join
                .insert_label(&ev.request_id, Label::of(ev), &mut self.joined)
        {
            self.stats.duplicate_labels += 1;
        }
        self.drain_joined();
    }

    /// The caller now reads exactly these input partitions (a Kafka
    /// assignment): a prediction partition that has delivered nothing yet
    /// holds the watermark back until it delivers, or until
    /// [`Core::set_backlog`] says it has nothing to deliver and it is idle.
    pub fn assign_sources(&mut self, sources: impl IntoIterator<Item = Source>) {
        self.watermark.assign(sources);
    }

    /// The caller no longer reads these input partitions (revoked).
    pub fn revoke_sources(&mut self, sources: &[Source]) {
        self.watermark.revoke(sources);
    }

    /// Whether an input partition has unread messages (the broker's high
    /// watermark is past the position): such a partition is never idle, so
    /// a partition the broker is slow to serve makes nothing late.
    pub fn set_backlog(&mut self, source: Source, backlog: bool) {
        self.watermark.set_backlog(source, backlog);
    }

    /// The broker confirmed at `wall_ms` that no input partition has unread
    /// messages: when this process has read nothing yet (a restart after the
    /// input ended), the idle timer starts now (see
    /// [`Watermark::start_idle_clock`]).
    pub fn no_backlog_confirmed(&mut self, wall_ms: i64) {
        self.watermark.start_idle_clock(wall_ms);
    }

    /// The input is finished (see [`Watermark::end_input`]): the next
    /// [`Core::advance`] moves the watermark to the wall clock minus the
    /// allowed lateness, expiring and closing what that allows.
    pub fn end_input(&mut self) {
        self.watermark.end_input();
    }

    /// The input partitions holding the watermark back at `wall_ms`.
    pub fn watermark_holders(&self, wall_ms: i64) -> Vec<Source> {
        self.watermark.holding(wall_ms)
    }

    /// The caller was busy for `ms` of wall-clock time without reading input
    /// (writing output, checkpointing): not idle time for the watermark.
    pub fn pause_idle(&mut self, ms: i64) {
        self.watermark.pause(ms);
    }

    /// Records input without an event time (an undecodable message).
    pub fn on_undecodable(&mut self, wall_ms: i64) {
        self.watermark.touch(wall_ms);
    }

    fn drain_joined(&mut self) {
        for j in self.joined.drain(..) {
            match &j {
                Joined::Matched { .. } => self.stats.matched += 1,
                Joined::Expired { .. } => self.stats.expired += 1,
                Joined::Orphan { .. } => self.stats.orphans += 1,
            }
            self.agg.observe_joined(j);
        }
    }

    /// Moves the watermark to what wall-clock `wall_ms` allows, expires join
    /// state, closes and revises windows, evaluates alert rules.
    pub fn advance(&mut self, wall_ms: i64) -> Output {
        let mut out = Output::default();
        let Some(wm) = self.watermark.current(wall_ms) else {
            return out;
        };
        self.join.expire(wm, &mut self.joined);
        self.drain_joined();
        self.agg.advance(wm, &mut out.emitted);
        out.watermark = Some(wm);
        self.finish_output(&mut out, wall_ms);
        out
    }

    /// Closes every window now (end of a finite run), without expiring
    /// pending predictions: their performance rows are as complete as the
    /// labels seen.
    pub fn flush(&mut self, wall_ms: i64) -> Output {
        let mut out = Output::default();
        self.agg.flush_all(&mut out.emitted);
        out.watermark = self.watermark.max_event_ms();
        self.finish_output(&mut out, wall_ms);
        out
    }

    fn finish_output(&mut self, out: &mut Output, wall_ms: i64) {
        // Rules that wait for a window to settle judge it against the
        // watermark (at a final flush: the newest event time, not "all done").
        self.engine
            .evaluate(&out.emitted.rows, out.watermark, wall_ms, &mut out.alerts);
        self.stats.rows += out.emitted.rows.len() as u64;
        self.stats.alerts += out.alerts.len() as u64;
        self.stats.windows_closed += out.emitted.closed_windows.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;
    use crate::model::Entries;

    fn core() -> Core {
        let mut cfg = crate::config::load(None, &HashMap::new()).unwrap();
        cfg.windows.sizes = vec![Duration::from_secs(60)];
        cfg.windows.allowed_lateness = Duration::from_secs(0);
        cfg.windows.label_horizon = Duration::from_secs(600);
        cfg.windows.early_label_ttl = Duration::from_secs(60);
        Core::new(&cfg)
    }

    fn pred(id: &str, version: &str, ts: i64, score: f64) -> PredictionEvent {
        PredictionEvent {
            request_id: id.into(),
            model_id: "m".into(),
            model_version: version.into(),
            timestamp: ts,
            score: Some(score),
            segments: Entries::default(),
            ..Default::default()
        }
    }

    fn label(id: &str, ts: i64, v: &str) -> GroundTruthEvent {
        GroundTruthEvent {
            request_id: id.into(),
            timestamp: ts,
            actual_label: Some(v.into()),
            actual_value: None,
        }
    }

    fn metric(out: &Output, version: &str, name: &str) -> Option<f64> {
        out.emitted
            .rows
            .iter()
            .filter(|r| {
                &*r.model_version == version && r.value.metric == name && r.segment.is_empty()
            })
            .max_by_key(|r| r.revision)
            .map(|r| r.value.value)
    }

    #[test]
    fn joins_counts_and_expires_through_the_whole_core() {
        let mut c = core();
        c.on_label(&label("early", 500, "1"), 0);
        c.on_prediction(&pred("early", "v1", 400, 0.8), 0);
        c.on_prediction(&pred("a", "v1", 1_000, 0.9), 0);
        c.on_prediction(&pred("a", "v2", 1_000, 0.2), 0);
        c.on_prediction(&pred("a", "v1", 1_100, 0.9), 0); // duplicate
        c.on_prediction(&pred("b", "v1", 2_000, 0.1), 0); // never labeled
        c.on_label(&label("a", 30_000, "1"), 0);
        c.on_label(&label("nobody", 30_000, "0"), 0); // orphan
        let s = c.stats();
        assert_eq!(
            (s.predictions, s.labels, s.matched, s.duplicate_predictions),
            (5, 3, 3, 1)
        );
        assert_eq!(c.pending_predictions(), 1);
        // The stream goes on: the watermark passes the first window and the horizon.
        c.on_prediction(&pred("late-stream", "v1", 700_000, 0.5), 0);
        let out = c.advance(0);
        assert_eq!(out.watermark, Some(700_000));
        let s = c.stats();
        assert_eq!((s.expired, s.orphans), (1, 1));
        assert_eq!(metric(&out, "v1", "prediction_count"), Some(3.0));
        assert_eq!(metric(&out, "v1", "label_count"), Some(2.0));
        assert_eq!(metric(&out, "v1", "unlabeled_count"), Some(1.0));
        assert_eq!(metric(&out, "v1", "duplicate_count"), Some(1.0));
        assert_eq!(metric(&out, "v1", "accuracy"), Some(1.0));
        assert_eq!(metric(&out, "v2", "accuracy"), Some(0.0));
        assert_eq!(metric(&out, "", "orphan_label_count"), Some(1.0));
    }

    /// What `window_metrics FINAL` would hold: the newest revision of every
    /// row key, value bit-exact; and the alert transitions by id and status.
    type RowKey = (String, String, String, i64, i64, String, String);
    type HistogramKey = (String, String, String, i64, i64, String);
    type AlertValue = (String, String, u64, u64);

    #[derive(Debug, Default, PartialEq)]
    struct Final {
        rows: std::collections::BTreeMap<RowKey, (u64, u64, u64, Option<u64>)>,
        histograms: std::collections::BTreeMap<HistogramKey, Vec<u64>>,
        alerts: std::collections::BTreeMap<(String, String), AlertValue>,
    }

    impl Final {
        fn add(&mut self, out: &Output) {
            for r in &out.emitted.rows {
                let key = (
                    r.model_id.to_string(),
                    r.model_version.to_string(),
                    r.segment.to_string(),
                    r.window_start_ms,
                    r.window_ms,
                    r.value.metric.to_string(),
                    r.value.feature.clone(),
                );
                let v = (
                    r.revision,
                    r.value.value.to_bits(),
                    r.value.samples,
                    r.value.p_value.map(f64::to_bits),
                );
                let e = self.rows.entry(key).or_insert(v);
                if v.0 >= e.0 {
                    *e = v;
                }
            }
            for h in &out.emitted.histograms {
                self.histograms.insert(
                    (
                        h.model_id.to_string(),
                        h.model_version.to_string(),
                        h.segment.to_string(),
                        h.window_start_ms,
                        h.window_ms,
                        h.histogram.feature.clone(),
                    ),
                    h.histogram.counts.iter().map(|c| c.to_bits()).collect(),
                );
            }
            for a in &out.alerts {
                self.alerts.insert(
                    (a.alert_id.clone(), a.status.as_str().to_string()),
                    (
                        a.rule.clone(),
                        a.severity.as_str().to_string(),
                        a.value.to_bits(),
                        a.threshold.to_bits(),
                    ),
                );
            }
        }
    }

    /// A store in memory: the records of the last checkpoint and the join
    /// records as the state store applies them.
    #[derive(Default)]
    struct MemStore {
        records: Vec<(&'static str, Vec<u8>)>,
        join: std::collections::BTreeMap<String, Vec<u8>>,
    }

    impl MemStore {
        fn write(&mut self, c: CoreCheckpoint) {
            self.records = c.records;
            for (k, v) in c.join {
                match v {
                    Some((_, v)) => self.join.insert(k.to_string(), v),
                    None => self.join.remove(&*k),
                };
            }
        }

        fn restore(&self, cfg: &Config) -> Core {
            let mut core = Core::restore(cfg, |name| {
                self.records
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, b)| b.as_slice())
            })
            .expect("restore");
            for (k, v) in &self.join {
                core.restore_request(k, v).expect("join record");
            }
            core
        }
    }

    fn feed(core: &mut Core, ev: &crate::model::InputEvent) {
        match ev {
            crate::model::InputEvent::Prediction(p) => core.on_prediction(p, 0),
            crate::model::InputEvent::GroundTruth(g) => core.on_label(g, 0),
        }
    }

    #[test]
    fn crashes_restored_from_checkpoints_give_the_uninterrupted_output() {
        use crate::generate::{DriftScenario, Generator, Scenario};
        let mut cfg = crate::config::load(None, &HashMap::new()).unwrap();
        cfg.windows.sizes = vec![Duration::from_secs(60), Duration::from_secs(300)];
        cfg.windows.allowed_lateness = Duration::from_secs(20);
        cfg.windows.label_horizon = Duration::from_secs(900);
        cfg.windows.early_label_ttl = Duration::from_secs(300);
        cfg.windows.revision_interval = Duration::from_secs(30);
        cfg.drift.reference_size = 1_000;
        let events: Vec<_> = Generator::new(Scenario {
            seed: 42,
            start_ms: 1_767_225_600_000,
            events_per_second: 20.0,
            count: 6_000,
            versions: vec!["v1".into(), "v2".into()],
            drift: DriftScenario::Sudden,
            drift_at: 0.5,
            accuracy_drop: true,
            label_fraction: 0.85,
            regression_model: Some("price".into()),
            ..Scenario::default()
        })
        .collect();
        assert!(events.len() > 10_000, "{} events", events.len());
        let advance_every = 700;

        let mut want = Final::default();
        let mut core = Core::new(&cfg);
        for (i, ev) in events.iter().enumerate() {
            feed(&mut core, ev);
            if i % advance_every == advance_every - 1 {
                want.add(&core.advance(0));
            }
        }
        want.add(&core.advance(0));
        want.add(&core.flush(0));
        let expected_pending = core.pending_predictions();

        // The same stream with a checkpoint every 1 900 events and crashes at
        // uneven points: the input since the last checkpoint comes again.
        let mut got = Final::default();
        let mut store = MemStore::default();
        let mut core = Core::new(&cfg);
        let mut checkpointed = 0;
        let mut crashes = vec![5_003, 9_871, 14_000, 14_001, 15_555];
        crashes.retain(|c| *c < events.len());
        let mut i = 0;
        let mut since_advance = 0;
        while i < events.len() {
            if crashes.first() == Some(&i) {
                crashes.remove(0);
                core = if store.records.is_empty() {
                    Core::new(&cfg)
                } else {
                    store.restore(&cfg)
                };
                i = checkpointed;
                since_advance = 0;
                continue;
            }
            feed(&mut core, &events[i]);
            i += 1;
            since_advance += 1;
            if since_advance == advance_every {
                since_advance = 0;
                got.add(&core.advance(0));
            }
            if i % 1_900 == 0 {
                // The service checkpoints only after the output is written.
                got.add(&core.advance(0));
                store.write(core.checkpoint());
                checkpointed = i;
            }
        }
        assert!(crashes.is_empty(), "every crash happened");
        got.add(&core.advance(0));
        got.add(&core.flush(0));
        assert_eq!(core.pending_predictions(), expected_pending);
        assert!(want.rows.len() > 1_000, "{} rows", want.rows.len());
        assert!(
            want.rows.keys().any(|k| k.5 == "accuracy") && !want.alerts.is_empty(),
            "the stream exercises performance rows and alerts"
        );
        let missing: Vec<_> = want
            .rows
            .iter()
            .filter(|(k, v)| got.rows.get(*k) != Some(v))
            .take(10)
            .collect();
        assert!(missing.is_empty(), "rows that differ: {missing:?}");
        assert_eq!(want.rows.len(), got.rows.len());
        assert_eq!(want.histograms, got.histograms);
        assert_eq!(want.alerts, got.alerts);
    }
}
