//! The per-window aggregator: routes each prediction to the accumulators of
//! its windows (one per configured size) and segments, routes each join
//! result to the accumulators of its prediction's window, and turns windows
//! into rows when the watermark passes them.
//!
//! Pure: no I/O, no clock. Time is the watermark passed to [`Aggregator::advance`].
//!
//! Lifecycle of a window of size `s` starting at `t`:
//! - open while `watermark < t + s`: predictions update its data accumulators;
//! - closed when `watermark >= t + s`: volume, integrity, drift and latency
//!   rows are emitted once (revision 0), together with the first revision of
//!   the performance rows;
//! - while `watermark < t + s + label_horizon`: labels keep revising the
//!   performance rows; a new revision is emitted at most every
//!   `revision_interval` of event time (revision = labels + expirations seen);
//! - then the last revision is emitted and the window is dropped.
//!
//! Cardinality caps keep bad input from exhausting memory: beyond
//! `max_models` models, `max_versions_per_model` versions or
//! `max_segment_values` values per segment key, the excess folds into
//! `__other__`.
//!
//! [`Aggregator::snapshot`] serialises the whole state (every version,
//! segment, window and accumulator, but not the configuration or scratch
//! space) and [`Aggregator::restore`] rebuilds an aggregator that goes on
//! exactly as the original would have: same rows, same values, bit for bit.

use std::sync::Arc;

use ahash::{AHashMap, AHashSet};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::join::{window_start, Joined};
use crate::metrics::detectors::ErrorDetectors;
use crate::metrics::labels::{label_value, LabelProfile, LabelReferenceBuilder};
use crate::metrics::performance::outcome_error;
use crate::metrics::snapshot::{sorted_map, RestoreError};
use crate::metrics::{
    DataAccumulator, DriftConfig, FeatureHistogram, MetricValue, OutcomeAccumulator,
    ReferenceBuilder, ReferenceProfile, Resolved, Task,
};
use crate::model::{Label, LimitHits, PredictionEvent, PredictionOutcome};

/// The name that absorbs values beyond a cardinality cap.
pub const OTHER: &str = "__other__";

/// Settings of the aggregator.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// Tumbling window sizes in ms.
    pub window_sizes_ms: Vec<i64>,
    /// How long performance rows of a window keep being revised after it closes.
    pub label_horizon_ms: i64,
    /// Least event time between two revisions of a window's performance rows.
    pub revision_interval_ms: i64,
    /// Drift statistics settings.
    pub drift: DriftConfig,
    /// Events of a version that become its reference when none was imported.
    pub reference_size: usize,
    /// Distinct values per segment key.
    pub max_segment_values: usize,
    /// Distinct models.
    pub max_models: usize,
    /// Distinct versions per model.
    pub max_versions_per_model: usize,
    /// Distinct segment keys per model.
    pub max_segment_keys: usize,
    /// Task per model id, overriding what is inferred from events.
    pub tasks: AHashMap<String, Task>,
}

/// What the join keeps per pending prediction. Serialisable (compact:
/// MessagePack writes it as a short array).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRecord {
    /// Interned (model, version).
    pub version: u32,
    /// Interned segments, `''` (all traffic) first.
    pub segments: Box<[u32]>,
    /// The fields performance metrics need.
    pub outcome: PredictionOutcome,
    /// The prediction arrived after its window closed: its label is not counted.
    pub late: bool,
}

/// One row for `window_metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRow {
    /// Model id (`''` for rows about the input as a whole, like orphan labels).
    pub model_id: Arc<str>,
    /// Model version.
    pub model_version: Arc<str>,
    /// `''` or `key=value`.
    pub segment: Arc<str>,
    /// Window start, ms.
    pub window_start_ms: i64,
    /// Window size, ms.
    pub window_ms: i64,
    /// The metric value.
    pub value: MetricValue,
    /// Row version for ReplacingMergeTree.
    pub revision: u64,
}

/// One feature's drift counts of one window and cell, for `window_histograms`
/// (written once, at data close, like the data rows: revision 0).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowHistogram {
    /// Model id.
    pub model_id: Arc<str>,
    /// Model version.
    pub model_version: Arc<str>,
    /// `''` or `key=value`.
    pub segment: Arc<str>,
    /// Window start, ms.
    pub window_start_ms: i64,
    /// Window size, ms.
    pub window_ms: i64,
    /// The feature's counts.
    pub histogram: FeatureHistogram,
}

/// A version first seen, or seen again, for the metadata store.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionSeen {
    /// Model id.
    pub model_id: Arc<str>,
    /// Model version.
    pub model_version: Arc<str>,
    /// Task name (`binary`, `multiclass`, `regression`, or `unknown`).
    pub task: &'static str,
    /// First event time seen.
    pub first_seen_ms: i64,
    /// Latest event time seen.
    pub last_seen_ms: i64,
    /// Number of features in its reference profile (0 before it has one).
    pub reference_features: usize,
}

/// What [`Aggregator::advance`] produced.
#[derive(Debug, Default)]
pub struct Emitted {
    /// Window rows.
    pub rows: Vec<WindowRow>,
    /// Per-feature drift counts of the windows whose data closed (every cell).
    pub histograms: Vec<WindowHistogram>,
    /// Reference profiles built from the first events of a version, to persist.
    pub references: Vec<(Arc<str>, Arc<str>, Arc<ReferenceProfile>)>,
    /// Versions seen since the last call.
    pub versions: Vec<VersionSeen>,
    /// Windows whose data rows were emitted by this call: (size ms, start ms).
    pub closed_windows: Vec<(i64, i64)>,
}

impl Emitted {
    /// True when nothing was produced.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.histograms.is_empty()
            && self.references.is_empty()
            && self.versions.is_empty()
    }
}

/// The values seen of one segment key.
#[derive(Default, Serialize, Deserialize)]
struct SegmentKey {
    /// Value → segment id, for values within the cap.
    #[serde(serialize_with = "sorted_map")]
    values: AHashMap<String, u32>,
    /// Distinct values within the cap.
    real: usize,
    /// The id of `key=__other__`, once a value was folded.
    other: Option<u32>,
}

/// One (model, version). Serialised without its profile (shared with the
/// window cells: the snapshot keeps one copy in its profile table).
#[derive(Serialize, Deserialize)]
struct VersionState {
    model_id: Arc<str>,
    version: Arc<str>,
    task: Option<Task>,
    #[serde(skip)]
    profile: Option<Arc<ReferenceProfile>>,
    builder: Option<ReferenceBuilder>,
    first_seen_ms: i64,
    last_seen_ms: i64,
    dirty: bool,
    /// ADWIN / Page-Hinkley on the version's errors, fed window by window
    /// as windows become final, in a canonical order within each window.
    detectors: ErrorDetectors,
    /// Collects the labels of the first final windows (canonical order)
    /// into the label reference, until it exists.
    label_builder: Option<LabelReferenceBuilder>,
    /// The label reference of label drift.
    label_profile: Option<Arc<LabelProfile>>,
}

/// A labeled prediction kept until its window is final (see
/// [`Cell::labeled`]): prediction time, error (NaN: none), the label while
/// the label reference needs it.
type Labeled = (i64, f64, Option<Arc<Label>>);

/// One (model, version, segment) of a window. Serialised without its
/// profile (see [`VersionState`]).
#[derive(Serialize, Deserialize)]
struct Cell {
    /// The profile the data accumulator was created against.
    #[serde(skip)]
    profile: Option<Arc<ReferenceProfile>>,
    data: DataAccumulator,
    outcome: OutcomeAccumulator,
    duplicates: u64,
    /// Predictions of the window, kept when the data accumulator is freed at close.
    predictions: u64,
    outcome_written: Option<u64>,
    /// The labeled predictions of the window (prediction time, error fed
    /// to the change detectors or NaN, the label while the version's label
    /// reference is incomplete), kept in the all-traffic cell of the
    /// smallest window size until the window is final: then they feed the
    /// version's detectors and label reference builder in a canonical order
    /// ([`Aggregator::feed_final`]). 16 bytes each once the label reference
    /// exists.
    #[serde(default)]
    labeled: Vec<Labeled>,
    /// The revision whose label drift rows were written.
    #[serde(default)]
    label_drift_written: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct WindowState {
    size_ms: i64,
    start_ms: i64,
    data_closed: bool,
    last_revision_at: i64,
    #[serde(serialize_with = "sorted_map")]
    cells: AHashMap<(u32, u32), Cell>,
    orphans: u64,
    orphans_written: Option<u64>,
}

impl WindowState {
    fn end(&self) -> i64 {
        self.start_ms + self.size_ms
    }
}

/// The task's name in the metadata store.
pub fn task_name(t: &Task) -> &'static str {
    match t {
        Task::Binary { .. } => "binary",
        Task::Multiclass => "multiclass",
        Task::Regression => "regression",
    }
}

/// Counters of what the aggregator saw, for telemetry (part of its snapshot).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregatorStats {
    /// Predictions that arrived after their window closed.
    pub late_predictions: u64,
    /// Labels whose prediction was late.
    pub late_labels: u64,
    /// Values folded into `__other__` by a cardinality cap.
    pub capped: u64,
    /// Every cap hit of the aggregator, by cap (the folds of `capped` included).
    #[serde(default)]
    pub limits: LimitHits,
}

/// The per-window aggregator. See the module docs.
pub struct Aggregator {
    cfg: AggregatorConfig,
    versions: Vec<VersionState>,
    /// model id -> version -> version id (two levels: looked up by `&str`).
    version_index: AHashMap<Arc<str>, AHashMap<Arc<str>, u32>>,
    versions_per_model: AHashMap<Arc<str>, usize>,
    segment_names: Vec<Arc<str>>,
    segment_index: AHashMap<Arc<str>, u32>,
    segment_keys: AHashMap<String, SegmentKey>,
    /// The segment keys each model (after the model cap) uses.
    model_segment_keys: AHashMap<Arc<str>, AHashSet<String>>,
    windows: AHashMap<(i64, i64), WindowState>,
    /// Closed-for-data windows, so late events are recognised after the
    /// window state is gone too: everything before this start is closed.
    closed_before: AHashMap<i64, i64>,
    pending_references: Vec<(Arc<str>, Arc<str>, Arc<ReferenceProfile>)>,
    resolved: Resolved,
    bare: Resolved,
    segment_scratch: Vec<u32>,
    stats: AggregatorStats,
}

impl Aggregator {
    /// An empty aggregator.
    pub fn new(cfg: AggregatorConfig) -> Self {
        let empty: Arc<str> = Arc::from("");
        let mut segment_index = AHashMap::new();
        segment_index.insert(empty.clone(), 0);
        Aggregator {
            cfg,
            versions: Vec::new(),
            version_index: AHashMap::new(),
            versions_per_model: AHashMap::new(),
            segment_names: vec![empty],
            segment_index,
            segment_keys: AHashMap::new(),
            model_segment_keys: AHashMap::new(),
            windows: AHashMap::new(),
            closed_before: AHashMap::new(),
            pending_references: Vec::new(),
            resolved: Resolved::default(),
            bare: Resolved::default(),
            segment_scratch: Vec::new(),
            stats: AggregatorStats::default(),
        }
    }

    /// Counters of late and capped input.
    pub fn stats(&self) -> AggregatorStats {
        self.stats
    }

    /// Open windows (including closed ones still collecting labels).
    pub fn window_count(&self) -> usize {
        self.windows.len()
    }

    /// Accumulator cells (model, version, segment, window) held.
    pub fn cell_count(&self) -> usize {
        self.windows.values().map(|w| w.cells.len()).sum()
    }

    /// Approximate heap bytes of every accumulator cell.
    pub fn approx_bytes(&self) -> usize {
        self.windows
            .values()
            .flat_map(|w| w.cells.values())
            .map(|c| {
                c.data.approx_bytes()
                    + c.outcome.approx_bytes()
                    + c.labeled.capacity() * std::mem::size_of::<Labeled>()
                    // Labels are kept only while the label reference is
                    // incomplete: a prefix of the list.
                    + c.labeled.partition_point(|l| l.2.is_some()) * 64
            })
            .sum()
    }

    /// Installs a reference profile for a version (imported or loaded from
    /// ClickHouse). Windows opened from now on compare with it.
    pub fn set_reference(&mut self, model_id: &str, version: &str, profile: ReferenceProfile) {
        let v = self.intern_version(model_id, version, i64::MIN);
        let st = &mut self.versions[v as usize];
        st.profile = Some(Arc::new(profile));
        st.builder = None;
    }

    /// True when the version has a reference profile.
    pub fn has_reference(&self, model_id: &str, version: &str) -> bool {
        self.version_lookup(model_id, version)
            .is_some_and(|v| self.versions[v as usize].profile.is_some())
    }

    /// Whether a stored `profile` of (model, version) should be installed
    /// into a restored aggregator: true when the version is unknown or has
    /// another profile; false when it has this one, or none yet because it
    /// is still building its reference from its first events (the events
    /// replayed after the snapshot complete the same profile).
    pub fn needs_reference(
        &self,
        model_id: &str,
        version: &str,
        profile: &ReferenceProfile,
    ) -> bool {
        match self.version_lookup(model_id, version) {
            None => true,
            Some(v) => {
                let st = &self.versions[v as usize];
                match &st.profile {
                    Some(p) => **p != *profile,
                    None => st.builder.is_none(),
                }
            }
        }
    }

    /// The id of a known (model, version); no allocation.
    #[inline]
    fn version_lookup(&self, model_id: &str, version: &str) -> Option<u32> {
        self.version_index.get(model_id)?.get(version).copied()
    }

    fn remember_version(&mut self, model_id: &str, version: &str, id: u32) {
        match self.version_index.get_mut(model_id) {
            Some(m) => {
                m.insert(Arc::from(version), id);
            }
            None => {
                let mut m = AHashMap::new();
                m.insert(Arc::from(version), id);
                self.version_index.insert(Arc::from(model_id), m);
            }
        }
    }

    fn intern_version(&mut self, model_id: &str, version: &str, ts: i64) -> u32 {
        // Fast path: already known (looked up by &str, no allocation).
        if let Some(v) = self.version_lookup(model_id, version) {
            return v;
        }
        let mut model = model_id;
        if !self.versions_per_model.contains_key(model)
            && self.versions_per_model.len() >= self.cfg.max_models
        {
            self.stats.capped += 1;
            self.stats.limits.max_models += 1;
            model = OTHER;
        }
        let n = self.versions_per_model.get(model).copied().unwrap_or(0);
        let mut ver = version;
        if self.version_lookup(model, ver).is_none() && n >= self.cfg.max_versions_per_model {
            self.stats.capped += 1;
            self.stats.limits.max_versions_per_model += 1;
            ver = OTHER;
        }
        if let Some(v) = self.version_lookup(model, ver) {
            // A folded name is not remembered (so hostile names cannot grow
            // the index): it takes this path, and is counted, every time.
            return v;
        }
        let (model, ver) = (Arc::<str>::from(model), Arc::<str>::from(ver));
        let id = self.versions.len() as u32;
        *self.versions_per_model.entry(model.clone()).or_insert(0) += 1;
        let task = self.cfg.tasks.get(&*model).cloned();
        self.versions.push(VersionState {
            model_id: model.clone(),
            version: ver.clone(),
            task,
            profile: None,
            builder: Some(ReferenceBuilder::new(&self.cfg.drift)),
            first_seen_ms: ts,
            last_seen_ms: ts,
            dirty: ts != i64::MIN,
            detectors: ErrorDetectors::new(&self.cfg.drift.detectors),
            label_builder: Some(LabelReferenceBuilder::new(&self.cfg.drift)),
            label_profile: None,
        });
        self.remember_version(&model, &ver, id);
        id
    }

    /// Resolves the event's segments to ids (no allocation once seen).
    fn intern_segments(&mut self, v: u32, ev: &PredictionEvent) {
        self.segment_scratch.clear();
        self.segment_scratch.push(0);
        for (key, value) in ev.segments.iter() {
            // `max_segment_keys` per model (after the model cap), so one
            // model's keys cannot crowd out another's.
            let model = &self.versions[v as usize].model_id;
            let known = self
                .model_segment_keys
                .get(model)
                .is_some_and(|keys| keys.contains(key));
            if !known {
                let keys = self.model_segment_keys.entry(model.clone()).or_default();
                if keys.len() >= self.cfg.max_segment_keys {
                    // A new key beyond the cap: the event counts in its
                    // other segments and in all traffic, not under this key.
                    self.stats.limits.max_segment_keys += 1;
                    continue;
                }
                keys.insert(key.to_string());
            }
            let k = match self.segment_keys.get_mut(key) {
                Some(k) => k,
                None => self.segment_keys.entry(key.to_string()).or_default(),
            };
            let id = match k.values.get(value.as_str()) {
                Some(&id) => id,
                None if k.real < self.cfg.max_segment_values => {
                    k.real += 1;
                    let id = Self::new_segment(
                        &mut self.segment_names,
                        &mut self.segment_index,
                        format!("{key}={value}"),
                    );
                    k.values.insert(value.clone(), id);
                    id
                }
                None => {
                    // Beyond the cap: fold into `key=__other__` without
                    // remembering the value, so memory stays bounded.
                    self.stats.capped += 1;
                    self.stats.limits.max_segment_values += 1;
                    match k.other {
                        Some(id) => id,
                        None => {
                            let id = Self::new_segment(
                                &mut self.segment_names,
                                &mut self.segment_index,
                                format!("{key}={OTHER}"),
                            );
                            k.other = Some(id);
                            id
                        }
                    }
                }
            };
            if !self.segment_scratch.contains(&id) {
                self.segment_scratch.push(id);
            }
        }
    }

    fn new_segment(
        names: &mut Vec<Arc<str>>,
        index: &mut AHashMap<Arc<str>, u32>,
        name: String,
    ) -> u32 {
        if let Some(&id) = index.get(name.as_str()) {
            return id;
        }
        let id = names.len() as u32;
        let name: Arc<str> = Arc::from(name);
        names.push(name.clone());
        index.insert(name, id);
        id
    }

    fn is_closed(&self, size_ms: i64, start_ms: i64) -> bool {
        self.closed_before
            .get(&size_ms)
            .is_some_and(|&before| start_ms < before)
    }

    /// The id of the event's (model, version), registering it when new
    /// (the id [`Joined`] payloads and the join use).
    pub fn version_id(&mut self, ev: &PredictionEvent) -> u32 {
        self.intern_version(&ev.model_id, &ev.model_version, ev.timestamp)
    }

    /// Adds a prediction to the data accumulators of its windows and returns
    /// the record the join keeps until its label comes.
    pub fn observe_prediction(&mut self, ev: &PredictionEvent) -> PendingRecord {
        let v = self.version_id(ev);
        self.observe_prediction_of(v, ev)
    }

    /// [`Aggregator::observe_prediction`] for an event whose version id
    /// ([`Aggregator::version_id`]) is known.
    pub fn observe_prediction_of(&mut self, v: u32, ev: &PredictionEvent) -> PendingRecord {
        self.intern_segments(v, ev);
        let cfg_reference_size = self.cfg.reference_size as u64;
        let st = &mut self.versions[v as usize];
        st.first_seen_ms = if st.first_seen_ms == i64::MIN {
            ev.timestamp
        } else {
            st.first_seen_ms.min(ev.timestamp)
        };
        st.last_seen_ms = st.last_seen_ms.max(ev.timestamp);
        st.dirty = true;
        if st.task.is_none() {
            st.task = Task::infer(ev);
        }
        // Reference bootstrap: the first N events of a version become its reference.
        if let Some(b) = st.builder.as_mut() {
            let left_out = b.observe(ev);
            self.stats.limits.max_features += left_out.features;
            self.stats.limits.max_reference_categories += left_out.categories;
            if b.len() >= cfg_reference_size {
                let profile = Arc::new(b.build());
                st.builder = None;
                st.profile = Some(profile.clone());
                self.pending_references
                    .push((st.model_id.clone(), st.version.clone(), profile));
            }
        }
        let profile = st.profile.clone();
        match &profile {
            Some(p) => p.resolve(ev, &mut self.resolved),
            None => Resolved::without_profile(ev, &mut self.resolved),
        }
        let mut bare_ready = profile.is_none();
        let mut late = false;
        for i in 0..self.cfg.window_sizes_ms.len() {
            let size = self.cfg.window_sizes_ms[i];
            let start = window_start(ev.timestamp, size);
            if self.is_closed(size, start) {
                late = true;
                continue;
            }
            let w = self
                .windows
                .entry((size, start))
                .or_insert_with(|| WindowState {
                    size_ms: size,
                    start_ms: start,
                    data_closed: false,
                    last_revision_at: i64::MIN,
                    cells: AHashMap::new(),
                    orphans: 0,
                    orphans_written: None,
                });
            if w.data_closed {
                late = true;
                continue;
            }
            for &seg in &self.segment_scratch {
                let cell = w.cells.entry((v, seg)).or_insert_with(|| Cell {
                    data: DataAccumulator::new(profile.as_deref()),
                    profile: profile.clone(),
                    outcome: OutcomeAccumulator::new(),
                    duplicates: 0,
                    predictions: 0,
                    outcome_written: None,
                    labeled: Vec::new(),
                    label_drift_written: None,
                });
                let same_profile = match (&cell.profile, &profile) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                };
                if same_profile {
                    cell.data.observe(&self.resolved);
                } else {
                    // The cell predates (or postdates) the version's profile:
                    // feed it what it can hold.
                    match &cell.profile {
                        Some(p) => {
                            p.resolve(ev, &mut self.bare);
                            cell.data.observe(&self.bare);
                            bare_ready = false;
                        }
                        None => {
                            if !bare_ready {
                                Resolved::without_profile(ev, &mut self.bare);
                                bare_ready = true;
                            }
                            cell.data.observe(&self.bare);
                        }
                    }
                }
            }
        }
        if late {
            self.stats.late_predictions += 1;
        }
        PendingRecord {
            version: v,
            segments: self.segment_scratch.clone().into_boxed_slice(),
            outcome: PredictionOutcome::of(ev),
            late,
        }
    }

    /// Counts a duplicate prediction (same request id and model version).
    pub fn observe_duplicate(&mut self, ev: &PredictionEvent) {
        let v = self.intern_version(&ev.model_id, &ev.model_version, ev.timestamp);
        let size = self.cfg.window_sizes_ms[0];
        if let Some(w) = self
            .windows
            .get_mut(&(size, window_start(ev.timestamp, size)))
        {
            if let Some(c) = w.cells.get_mut(&(v, 0)) {
                c.duplicates += 1;
            }
        }
    }

    /// Applies a join result to the performance accumulators of the
    /// prediction's windows (or counts an orphan label in the label's windows).
    pub fn observe_joined(&mut self, j: Joined<PendingRecord>) {
        match j {
            Joined::Matched {
                payload,
                prediction_ts,
                label,
            } => {
                if payload.late {
                    self.stats.late_labels += 1;
                    return;
                }
                let st = &self.versions[payload.version as usize];
                let Some(task) = st.task.as_ref() else {
                    return;
                };
                // Order-independent: the detectors and the label reference
                // builder are fed when the window is final, in a canonical
                // order (see `Aggregator::feed_final`); until then the
                // smallest window keeps what they need.
                let error = outcome_error(task, &payload.outcome, &label);
                let value = label_value(task, &label);
                let for_reference = value.is_some() && st.label_builder.is_some();
                let keep = error.is_some() || for_reference;
                let label_profile = st.label_profile.as_ref();
                let smallest = self.cfg.window_sizes_ms.iter().copied().min();
                let delay = label.timestamp - prediction_ts;
                for &size in &self.cfg.window_sizes_ms {
                    let start = window_start(prediction_ts, size);
                    if let Some(w) = self.windows.get_mut(&(size, start)) {
                        for &seg in payload.segments.iter() {
                            if let Some(c) = w.cells.get_mut(&(payload.version, seg)) {
                                c.outcome
                                    .observe_labeled(task, &payload.outcome, &label, delay);
                                if seg == 0 && keep && Some(size) == smallest {
                                    c.labeled.push((
                                        prediction_ts,
                                        error.unwrap_or(f64::NAN),
                                        for_reference.then(|| label.clone()),
                                    ));
                                }
                                if let Some(v) = value {
                                    c.outcome.observe_label_value(label_profile, v);
                                }
                            }
                        }
                    }
                }
            }
            Joined::Expired {
                payload,
                prediction_ts,
            } => {
                if payload.late {
                    return;
                }
                for &size in &self.cfg.window_sizes_ms {
                    let start = window_start(prediction_ts, size);
                    if let Some(w) = self.windows.get_mut(&(size, start)) {
                        for &seg in payload.segments.iter() {
                            if let Some(c) = w.cells.get_mut(&(payload.version, seg)) {
                                c.outcome.observe_expired();
                            }
                        }
                    }
                }
            }
            Joined::Orphan { label } => {
                for &size in &self.cfg.window_sizes_ms {
                    let start = window_start(label.timestamp, size);
                    let w = self
                        .windows
                        .entry((size, start))
                        .or_insert_with(|| WindowState {
                            size_ms: size,
                            start_ms: start,
                            data_closed: false,
                            last_revision_at: i64::MIN,
                            cells: AHashMap::new(),
                            orphans: 0,
                            orphans_written: None,
                        });
                    w.orphans += 1;
                }
            }
        }
    }

    /// Emits what the watermark makes due: data rows of windows that closed,
    /// performance revisions, final revisions; new reference profiles and
    /// version sightings. Drops windows past their label horizon.
    pub fn advance(&mut self, watermark: i64, out: &mut Emitted) {
        out.references.append(&mut self.pending_references);
        for st in self.versions.iter_mut().filter(|s| s.dirty) {
            st.dirty = false;
            out.versions.push(VersionSeen {
                model_id: st.model_id.clone(),
                model_version: st.version.clone(),
                task: st.task.as_ref().map_or("unknown", task_name),
                first_seen_ms: st.first_seen_ms,
                last_seen_ms: st.last_seen_ms,
                reference_features: st.profile.as_ref().map_or(0, |p| p.feature_names().count()),
            });
        }
        let mut keys: Vec<(i64, i64)> = self
            .windows
            .values()
            .filter(|w| w.end() <= watermark)
            .map(|w| (w.size_ms, w.start_ms))
            .collect();
        keys.sort_unstable_by_key(|&(size, start)| (start + size, size));
        let mut metrics = Vec::new();
        let smallest = self.cfg.window_sizes_ms.iter().copied().min();
        for key in keys {
            let final_now = key.1 + key.0 + self.cfg.label_horizon_ms <= watermark;
            if final_now && Some(key.0) == smallest {
                self.feed_final(key);
            }
            let Some(w) = self.windows.get_mut(&key) else {
                continue;
            };
            let closing_now = !w.data_closed;
            let revise_now = closing_now
                || final_now
                || watermark - w.last_revision_at >= self.cfg.revision_interval_ms;
            if closing_now {
                w.data_closed = true;
                let before = self.closed_before.entry(w.size_ms).or_insert(i64::MIN);
                *before = (*before).max(w.start_ms + 1).max(w.start_ms);
                out.closed_windows.push(key);
            }
            if !revise_now {
                continue;
            }
            w.last_revision_at = watermark;
            let mut cell_keys: Vec<(u32, u32)> = w.cells.keys().copied().collect();
            cell_keys.sort_unstable();
            for ck in cell_keys {
                let cell = w.cells.get_mut(&ck).expect("key from map");
                let st = &self.versions[ck.0 as usize];
                let row = |value: MetricValue, revision: u64| WindowRow {
                    model_id: st.model_id.clone(),
                    model_version: st.version.clone(),
                    segment: self.segment_names[ck.1 as usize].clone(),
                    window_start_ms: w.start_ms,
                    window_ms: w.size_ms,
                    value,
                    revision,
                };
                if closing_now {
                    metrics.clear();
                    cell.data
                        .finish(cell.profile.as_deref(), &self.cfg.drift, &mut metrics);
                    // Performance estimated from the scores, before labels arrive.
                    if let Some(task) = st.task.as_ref() {
                        cell.data.finish_estimated(task, &mut metrics);
                    }
                    if ck.1 == 0 {
                        metrics.push(MetricValue {
                            metric: "duplicate_count",
                            feature: String::new(),
                            value: cell.duplicates as f64,
                            samples: cell.data.count(),
                            p_value: None,
                        });
                    }
                    out.rows.extend(metrics.drain(..).map(|m| row(m, 0)));
                    let segment = &self.segment_names[ck.1 as usize];
                    out.histograms.extend(
                        cell.data
                            .histograms(cell.profile.as_deref())
                            .into_iter()
                            .map(|histogram| WindowHistogram {
                                model_id: st.model_id.clone(),
                                model_version: st.version.clone(),
                                segment: segment.clone(),
                                window_start_ms: w.start_ms,
                                window_ms: w.size_ms,
                                histogram,
                            }),
                    );
                }
                let revision = cell.outcome.observations();
                if let Some(task) = st.task.as_ref() {
                    metrics.clear();
                    if cell.outcome_written != Some(revision) {
                        cell.outcome_written = Some(revision);
                        let predictions = if cell.data.count() > 0 {
                            cell.data.count()
                        } else {
                            cell.predictions
                        };
                        cell.outcome.finish(task, predictions, &mut metrics);
                    }
                    // Label drift: all the window's labels on the version's
                    // label reference, once it exists (also at a revision
                    // that added no label: the reference may be new).
                    if let Some(lp) = &st.label_profile {
                        if cell.label_drift_written != Some(revision) && cell.outcome.bin_labels(lp)
                        {
                            cell.label_drift_written = Some(revision);
                            cell.outcome
                                .finish_label_drift(&self.cfg.drift, &mut metrics);
                        }
                    }
                    if final_now && ck.1 == 0 {
                        cell.outcome.finish_detections(&mut metrics);
                    }
                    out.rows.extend(metrics.drain(..).map(|m| row(m, revision)));
                }
                if closing_now {
                    // Drift state is final: keep only the count (for coverage)
                    // and free the sketches of the window.
                    cell.predictions = cell.data.count();
                    cell.data = DataAccumulator::new(None);
                }
            }
            if w.orphans_written != Some(w.orphans) && (w.orphans > 0 || closing_now) {
                w.orphans_written = Some(w.orphans);
                out.rows.push(WindowRow {
                    model_id: Arc::from(""),
                    model_version: Arc::from(""),
                    segment: self.segment_names[0].clone(),
                    window_start_ms: w.start_ms,
                    window_ms: w.size_ms,
                    value: MetricValue {
                        metric: "orphan_label_count",
                        feature: String::new(),
                        value: w.orphans as f64,
                        samples: w.orphans,
                        p_value: None,
                    },
                    revision: w.orphans,
                });
            }
            if final_now {
                self.windows.remove(&key);
            }
        }
    }

    /// The window `key` (of the smallest size) is final: no label can
    /// change it any more. Its labeled predictions feed each version's
    /// change detectors and, until it is complete, its label reference
    /// builder, sorted by prediction time, then error, then label: an
    /// order that does not depend on how the consumer interleaved
    /// partitions, so a replay after a crash (or another instance) computes
    /// the same detections and the same label reference. Windows become
    /// final in the order of their ends. Each detection counts in the
    /// all-traffic cell of every window holding the prediction.
    fn feed_final(&mut self, key: (i64, i64)) {
        let Some(w) = self.windows.get_mut(&key) else {
            return;
        };
        let mut batches: Vec<(u32, Vec<Labeled>)> = w
            .cells
            .iter_mut()
            .filter(|((_, seg), c)| *seg == 0 && !c.labeled.is_empty())
            .map(|(&(v, _), c)| (v, std::mem::take(&mut c.labeled)))
            .collect();
        batches.sort_unstable_by_key(|(v, _)| *v);
        for (v, mut labeled) in batches {
            labeled.sort_by(|a, b| {
                a.0.cmp(&b.0)
                    .then(a.1.total_cmp(&b.1))
                    .then_with(|| match (&a.2, &b.2) {
                        (Some(a), Some(b)) => a
                            .actual_label
                            .cmp(&b.actual_label)
                            .then_with(|| {
                                let x = a.actual_value.unwrap_or(f64::NAN);
                                x.total_cmp(&b.actual_value.unwrap_or(f64::NAN))
                            })
                            .then(a.timestamp.cmp(&b.timestamp)),
                        (a, b) => a.is_some().cmp(&b.is_some()),
                    })
            });
            let st = &mut self.versions[v as usize];
            let Some(task) = st.task.clone() else {
                continue;
            };
            for (ts, error, label) in &labeled {
                if error.is_finite() {
                    let (adwin, ph) = st.detectors.update(*error);
                    for &size in &self.cfg.window_sizes_ms {
                        if let Some(c) = self
                            .windows
                            .get_mut(&(size, window_start(*ts, size)))
                            .and_then(|w| w.cells.get_mut(&(v, 0)))
                        {
                            c.outcome.observe_detections(adwin, ph);
                        }
                    }
                }
                let value = label.as_deref().and_then(|l| label_value(&task, l));
                if let (Some(b), Some(value)) = (st.label_builder.as_mut(), value) {
                    if let Some(p) = b.observe(value) {
                        st.label_profile = Some(Arc::new(p));
                        st.label_builder = None;
                    }
                }
            }
        }
    }

    /// Closes every window regardless of the watermark (shutdown of a finite
    /// run: e.g. the demo). Pending predictions are not expired.
    pub fn flush_all(&mut self, out: &mut Emitted) {
        let max_end = self.windows.values().map(WindowState::end).max();
        if let Some(end) = max_end {
            // Close data of every window; keep outcome windows (not final).
            let wm = end;
            let (horizon, interval) = (self.cfg.label_horizon_ms, self.cfg.revision_interval_ms);
            self.cfg.label_horizon_ms = i64::MAX / 4;
            // Every label seen so far is written now, even within the
            // revision interval: the caller commits the input offsets next.
            self.cfg.revision_interval_ms = i64::MIN / 4;
            self.advance(wm, out);
            self.cfg.label_horizon_ms = horizon;
            self.cfg.revision_interval_ms = interval;
        } else {
            self.advance(i64::MIN, out);
        }
    }
}

/// Version of the snapshot layout written by [`Aggregator::snapshot`];
/// [`Aggregator::restore`] refuses any other.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// The snapshot as written: borrowed state, maps in key order, every
/// reference profile once (`profiles`), referred to by index.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    profiles: Vec<&'a ReferenceProfile>,
    versions: &'a [VersionState],
    /// Profile of each version (index into `profiles`).
    version_profiles: Vec<Option<u32>>,
    /// (model id, version, version id); aliases of folded names are not
    /// kept (older snapshots may hold some).
    version_index: Vec<(&'a str, &'a str, u32)>,
    versions_per_model: Vec<(&'a str, usize)>,
    segment_names: &'a [Arc<str>],
    segment_keys: Vec<(&'a str, &'a SegmentKey)>,
    windows: Vec<&'a WindowState>,
    /// (window size, window start, version id, segment id, profile) of every cell with a profile.
    cell_profiles: Vec<(i64, i64, u32, u32, u32)>,
    closed_before: Vec<(i64, i64)>,
    pending_references: Vec<(&'a str, &'a str, u32)>,
    stats: AggregatorStats,
    model_segment_keys: Vec<(&'a str, Vec<&'a str>)>,
}

/// The reference profiles of a snapshot, each once (by `Arc` identity).
#[derive(Default)]
struct ProfileTable<'a> {
    profiles: Vec<&'a ReferenceProfile>,
    ids: AHashMap<*const ReferenceProfile, u32>,
}

impl<'a> ProfileTable<'a> {
    /// The index of `p`, added when new.
    fn intern(&mut self, p: &'a Arc<ReferenceProfile>) -> u32 {
        let profiles = &mut self.profiles;
        *self.ids.entry(Arc::as_ptr(p)).or_insert_with(|| {
            profiles.push(p);
            (profiles.len() - 1) as u32
        })
    }
}

/// The snapshot as read: [`SnapshotRef`]'s fields, in the same order, owned.
#[derive(Deserialize)]
struct SnapshotOwned {
    profiles: Vec<ReferenceProfile>,
    versions: Vec<VersionState>,
    version_profiles: Vec<Option<u32>>,
    version_index: Vec<(Arc<str>, Arc<str>, u32)>,
    versions_per_model: Vec<(Arc<str>, usize)>,
    segment_names: Vec<Arc<str>>,
    segment_keys: Vec<(String, SegmentKey)>,
    windows: Vec<WindowState>,
    cell_profiles: Vec<(i64, i64, u32, u32, u32)>,
    closed_before: Vec<(i64, i64)>,
    pending_references: Vec<(Arc<str>, Arc<str>, u32)>,
    stats: AggregatorStats,
    #[serde(default)]
    model_segment_keys: Vec<(Arc<str>, Vec<String>)>,
}

impl Aggregator {
    /// The aggregator's state (everything but its configuration and scratch
    /// space), MessagePack-encoded: `[SNAPSHOT_FORMAT, state]`.
    ///
    /// Deterministic: equal states give equal bytes (maps are written in key
    /// order). Each reference profile is written once however many window
    /// cells share it; label references are written with the windows' label
    /// histograms (they are small).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut table = ProfileTable::default();
        let mut intern = |p| table.intern(p);
        let version_profiles = self
            .versions
            .iter()
            .map(|v| v.profile.as_ref().map(&mut intern))
            .collect();
        let pending_references = self
            .pending_references
            .iter()
            .map(|(m, v, p)| (&**m, &**v, intern(p)))
            .collect();
        let mut windows: Vec<&WindowState> = self.windows.values().collect();
        windows.sort_unstable_by_key(|w| (w.size_ms, w.start_ms));
        let mut cell_profiles = Vec::new();
        for w in &windows {
            let mut cells: Vec<(&(u32, u32), &Cell)> = w.cells.iter().collect();
            cells.sort_unstable_by_key(|(k, _)| **k);
            for (&(v, seg), c) in cells {
                if let Some(p) = &c.profile {
                    cell_profiles.push((w.size_ms, w.start_ms, v, seg, intern(p)));
                }
            }
        }
        let mut version_index: Vec<(&str, &str, u32)> = self
            .version_index
            .iter()
            .flat_map(|(m, vs)| vs.iter().map(move |(v, &id)| (&**m, &**v, id)))
            .collect();
        version_index.sort_unstable();
        let mut versions_per_model: Vec<(&str, usize)> = self
            .versions_per_model
            .iter()
            .map(|(m, &n)| (&**m, n))
            .collect();
        versions_per_model.sort_unstable();
        let mut segment_keys: Vec<(&str, &SegmentKey)> = self
            .segment_keys
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        segment_keys.sort_unstable_by_key(|(k, _)| *k);
        let mut closed_before: Vec<(i64, i64)> =
            self.closed_before.iter().map(|(&k, &v)| (k, v)).collect();
        closed_before.sort_unstable();
        let mut model_segment_keys: Vec<(&str, Vec<&str>)> = self
            .model_segment_keys
            .iter()
            .map(|(m, keys)| {
                let mut keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                keys.sort_unstable();
                (&**m, keys)
            })
            .collect();
        model_segment_keys.sort_unstable();
        let snap = SnapshotRef {
            profiles: table.profiles,
            versions: &self.versions,
            version_profiles,
            version_index,
            versions_per_model,
            segment_names: &self.segment_names,
            segment_keys,
            windows,
            cell_profiles,
            closed_before,
            pending_references,
            stats: self.stats,
            model_segment_keys,
        };
        // Serialising plain data into a Vec cannot fail (no I/O; every map
        // key is a string or a tuple of integers).
        rmp_serde::to_vec(&(SNAPSHOT_FORMAT, snap)).expect("the aggregator state is serialisable")
    }

    /// An aggregator with configuration `cfg` and the state of a
    /// [`snapshot`](Aggregator::snapshot). The configuration applies from
    /// now on (reference and label reference builders, change detectors);
    /// the state, including the tasks of known versions, is the snapshot's.
    /// Fails on bytes that are not a snapshot of format
    /// [`SNAPSHOT_FORMAT`], or one that refers to versions, segments or
    /// profiles it does not hold.
    pub fn restore(cfg: AggregatorConfig, bytes: &[u8]) -> Result<Aggregator, RestoreError> {
        let (format, IgnoredAny) = rmp_serde::from_slice::<(u32, IgnoredAny)>(bytes)?;
        if format != SNAPSHOT_FORMAT {
            return Err(RestoreError::Format {
                found: format,
                expected: SNAPSHOT_FORMAT,
            });
        }
        let (_, snap) = rmp_serde::from_slice::<(u32, SnapshotOwned)>(bytes)?;
        let invalid = |what: String| Err(RestoreError::Invalid(what));
        let profiles: Vec<Arc<ReferenceProfile>> =
            snap.profiles.into_iter().map(Arc::new).collect();
        let profile = |i: u32| {
            profiles
                .get(i as usize)
                .cloned()
                .ok_or_else(|| RestoreError::Invalid(format!("profile {i} is not in the snapshot")))
        };
        let (n_versions, n_segments) = (snap.versions.len(), snap.segment_names.len());
        if snap.version_profiles.len() != n_versions {
            return invalid(format!(
                "{} version profiles for {n_versions} versions",
                snap.version_profiles.len()
            ));
        }
        if snap.segment_names.first().map(|s| &**s) != Some("") {
            return invalid("the first segment is not all traffic ('')".to_owned());
        }
        let mut versions = snap.versions;
        for (st, p) in versions.iter_mut().zip(snap.version_profiles) {
            st.profile = p.map(profile).transpose()?;
            if let Some(b) = &mut st.builder {
                b.set_config(&cfg.drift);
            }
            if let Some(b) = &mut st.label_builder {
                b.set_config(&cfg.drift);
            }
            st.detectors.set_config(&cfg.drift.detectors);
        }
        let mut version_index: AHashMap<Arc<str>, AHashMap<Arc<str>, u32>> = AHashMap::new();
        for (model, version, id) in snap.version_index {
            if id as usize >= n_versions {
                return invalid(format!("version id {id} of {model}/{version}"));
            }
            version_index.entry(model).or_default().insert(version, id);
        }
        for (key, k) in &snap.segment_keys {
            if let Some(id) = k
                .values
                .values()
                .chain(&k.other)
                .find(|&&id| id as usize >= n_segments)
            {
                return invalid(format!("segment id {id} of key {key}"));
            }
        }
        let mut windows: AHashMap<(i64, i64), WindowState> = AHashMap::new();
        for w in snap.windows {
            if let Some(&(v, seg)) = w
                .cells
                .keys()
                .find(|(v, seg)| *v as usize >= n_versions || *seg as usize >= n_segments)
            {
                return invalid(format!(
                    "cell (version {v}, segment {seg}) of window {}+{}",
                    w.start_ms, w.size_ms
                ));
            }
            let key = (w.size_ms, w.start_ms);
            if windows.insert(key, w).is_some() {
                return invalid(format!("window {}+{} twice", key.1, key.0));
            }
        }
        for (size, start, v, seg, p) in snap.cell_profiles {
            let Some(cell) = windows
                .get_mut(&(size, start))
                .and_then(|w| w.cells.get_mut(&(v, seg)))
            else {
                return invalid(format!(
                    "profile of a missing cell (version {v}, segment {seg}) of window {start}+{size}"
                ));
            };
            cell.profile = Some(profile(p)?);
        }
        // One label reference per version again, shared with its windows.
        for w in windows.values_mut() {
            for (&(v, _), cell) in w.cells.iter_mut() {
                if let Some(lp) = &versions[v as usize].label_profile {
                    cell.outcome.share_label_profile(lp);
                }
            }
        }
        let pending_references = snap
            .pending_references
            .into_iter()
            .map(|(m, v, p)| Ok((m, v, profile(p)?)))
            .collect::<Result<Vec<_>, RestoreError>>()?;
        let segment_index = snap
            .segment_names
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), i as u32))
            .collect();
        Ok(Aggregator {
            cfg,
            versions,
            version_index,
            versions_per_model: snap.versions_per_model.into_iter().collect(),
            segment_names: snap.segment_names,
            segment_index,
            segment_keys: snap.segment_keys.into_iter().collect(),
            model_segment_keys: snap
                .model_segment_keys
                .into_iter()
                .map(|(m, keys)| (m, keys.into_iter().collect()))
                .collect(),
            windows,
            closed_before: snap.closed_before.into_iter().collect(),
            pending_references,
            resolved: Resolved::default(),
            bare: Resolved::default(),
            segment_scratch: Vec::new(),
            stats: snap.stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{Entries, FeatureValue};

    const MIN: i64 = 60_000;

    fn cfg() -> AggregatorConfig {
        AggregatorConfig {
            window_sizes_ms: vec![MIN],
            label_horizon_ms: 10 * MIN,
            revision_interval_ms: MIN,
            drift: DriftConfig::default(),
            reference_size: 10,
            max_segment_values: 2,
            max_models: 10,
            max_versions_per_model: 10,
            max_segment_keys: 32,
            tasks: AHashMap::new(),
        }
    }

    fn pred(ts: i64, x: f64, score: f64, country: &str) -> PredictionEvent {
        PredictionEvent {
            request_id: format!("r{ts}"),
            model_id: "m".into(),
            model_version: "v1".into(),
            timestamp: ts,
            features: Entries(vec![("x".into(), FeatureValue::Double(x))]),
            score: Some(score),
            segments: Entries(vec![("country".into(), country.into())]),
            latency_ms: Some(5.0),
            ..Default::default()
        }
    }

    fn label(ts: i64, v: &str) -> Arc<Label> {
        Arc::new(Label {
            actual_label: Some(v.into()),
            actual_value: None,
            timestamp: ts,
        })
    }

    fn find<'a>(
        rows: &'a [WindowRow],
        metric: &str,
        segment: &str,
        feature: &str,
    ) -> Vec<&'a WindowRow> {
        rows.iter()
            .filter(|r| {
                r.value.metric == metric && &*r.segment == segment && r.value.feature == feature
            })
            .collect()
    }

    fn value(rows: &[WindowRow], metric: &str, segment: &str) -> f64 {
        let found = find(rows, metric, segment, "");
        assert_eq!(found.len(), 1, "{metric} {segment}: {found:?}");
        found[0].value.value
    }

    #[test]
    fn a_window_closes_once_then_revises_its_performance_rows_until_the_horizon() {
        let mut a = Aggregator::new(cfg());
        let mut records = vec![];
        for i in 0..4 {
            let country = if i % 2 == 0 { "DE" } else { "US" };
            let score = if i < 2 { 0.9 } else { 0.1 };
            records.push((
                i * 1000,
                a.observe_prediction(&pred(i * 1000, i as f64, score, country)),
            ));
        }
        // Two labels before the window closes: both correct.
        for (ts, rec) in records.drain(..2) {
            a.observe_joined(Joined::Matched {
                payload: rec,
                prediction_ts: ts,
                label: label(ts + 10, "1"),
            });
        }
        let mut out = Emitted::default();
        a.advance(MIN - 1, &mut out);
        assert!(out.rows.is_empty(), "window still open");
        a.advance(MIN, &mut out);
        assert_eq!(out.closed_windows, vec![(MIN, 0)]);
        assert_eq!(value(&out.rows, "prediction_count", ""), 4.0);
        assert_eq!(value(&out.rows, "prediction_count", "country=DE"), 2.0);
        assert_eq!(value(&out.rows, "prediction_count", "country=US"), 2.0);
        assert_eq!(value(&out.rows, "label_count", ""), 2.0);
        assert_eq!(value(&out.rows, "label_coverage", ""), 0.5);
        assert_eq!(value(&out.rows, "accuracy", ""), 1.0);
        assert_eq!(find(&out.rows, "label_count", "", "")[0].revision, 2);
        assert_eq!(find(&out.rows, "prediction_count", "", "")[0].revision, 0);
        assert_eq!(value(&out.rows, "orphan_label_count", ""), 0.0);

        // A late label revises the window: one wrong prediction (score 0.1, label 1).
        let (ts, rec) = records.remove(0);
        a.observe_joined(Joined::Matched {
            payload: rec,
            prediction_ts: ts,
            label: label(ts + 5 * MIN, "1"),
        });
        let mut out = Emitted::default();
        a.advance(MIN + 10, &mut out);
        assert!(
            out.rows.is_empty(),
            "revisions wait for the revision interval"
        );
        a.advance(2 * MIN, &mut out);
        assert_eq!(value(&out.rows, "label_count", ""), 3.0);
        assert!((value(&out.rows, "accuracy", "") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(find(&out.rows, "label_count", "", "")[0].revision, 3);
        assert!(
            find(&out.rows, "prediction_count", "", "").is_empty(),
            "data rows are final"
        );
        // Nothing new: no rows.
        let mut out = Emitted::default();
        a.advance(3 * MIN, &mut out);
        assert!(out.rows.is_empty(), "{:?}", out.rows);
        // The last prediction expires unlabeled; at the horizon the window is final and dropped.
        let (ts, rec) = records.remove(0);
        a.observe_joined(Joined::Expired {
            payload: rec,
            prediction_ts: ts,
        });
        let mut out = Emitted::default();
        a.advance(MIN + 10 * MIN, &mut out);
        assert_eq!(value(&out.rows, "unlabeled_count", ""), 1.0);
        assert_eq!(find(&out.rows, "label_count", "", "")[0].revision, 4);
        assert_eq!(a.window_count(), 0);
    }

    #[test]
    fn late_predictions_and_their_labels_are_counted_not_added() {
        let mut a = Aggregator::new(cfg());
        a.observe_prediction(&pred(1000, 1.0, 0.9, "DE"));
        let mut out = Emitted::default();
        a.advance(MIN, &mut out);
        let rec = a.observe_prediction(&pred(2000, 1.0, 0.9, "DE"));
        assert!(rec.late);
        a.observe_joined(Joined::Matched {
            payload: rec,
            prediction_ts: 2000,
            label: label(3000, "1"),
        });
        assert_eq!(a.stats().late_predictions, 1);
        assert_eq!(a.stats().late_labels, 1);
        let mut out = Emitted::default();
        a.advance(3 * MIN, &mut out);
        assert!(
            find(&out.rows, "label_count", "", "").is_empty(),
            "{:?}",
            out.rows
        );
    }

    #[test]
    fn segment_values_beyond_the_cap_fold_into_other() {
        let mut a = Aggregator::new(cfg());
        for (i, c) in ["DE", "US", "FR", "BR"].iter().enumerate() {
            a.observe_prediction(&pred(i as i64, 1.0, 0.5, c));
        }
        let mut out = Emitted::default();
        a.advance(MIN, &mut out);
        assert_eq!(value(&out.rows, "prediction_count", "country=DE"), 1.0);
        assert_eq!(value(&out.rows, "prediction_count", "country=US"), 1.0);
        assert_eq!(
            value(&out.rows, "prediction_count", "country=__other__"),
            2.0
        );
        assert_eq!(value(&out.rows, "prediction_count", ""), 4.0);
        assert_eq!(a.stats().capped, 2);
    }

    #[test]
    fn segment_keys_beyond_the_cap_are_left_out_and_counted() {
        let mut a = Aggregator::new(AggregatorConfig {
            max_segment_keys: 2,
            max_segment_values: 10,
            ..cfg()
        });
        for i in 0..3 {
            let mut p = pred(i, 1.0, 0.5, "DE");
            p.segments.0.push(("tier".into(), "gold".into()));
            p.segments.0.push(("region".into(), "eu".into()));
            a.observe_prediction(&p);
        }
        let mut out = Emitted::default();
        a.advance(MIN, &mut out);
        assert_eq!(value(&out.rows, "prediction_count", "country=DE"), 3.0);
        assert_eq!(value(&out.rows, "prediction_count", "tier=gold"), 3.0);
        assert_eq!(value(&out.rows, "prediction_count", ""), 3.0);
        assert!(!out.rows.iter().any(|r| r.segment.starts_with("region=")));
        assert_eq!(a.stats().limits.max_segment_keys, 3);
        // The cap is per model: another model has room for its own keys.
        let mut p = pred(MIN + 1, 1.0, 0.5, "DE");
        p.model_id = "other".into();
        p.segments = Entries(vec![("region".into(), "eu".into())]);
        a.observe_prediction(&p);
        // The restored aggregator remembers which keys each model uses.
        let mut b = Aggregator::restore(
            AggregatorConfig {
                max_segment_keys: 2,
                max_segment_values: 10,
                ..cfg()
            },
            &a.snapshot(),
        )
        .unwrap();
        let mut out = Emitted::default();
        let mut q = pred(MIN + 2, 1.0, 0.5, "DE");
        q.segments.0.push(("zone".into(), "z".into()));
        b.observe_prediction(&q);
        b.advance(2 * MIN, &mut out);
        assert_eq!(value(&out.rows, "prediction_count", "region=eu"), 1.0);
        assert!(!out.rows.iter().any(|r| r.segment.starts_with("zone=")));
        assert_eq!(b.stats().limits.max_segment_keys, 4);
    }

    #[test]
    fn folded_model_names_are_counted_every_time_and_not_remembered() {
        let mut a = Aggregator::new(AggregatorConfig {
            max_models: 2,
            ..cfg()
        });
        for i in 0..100 {
            let mut p = pred(i, 1.0, 0.5, "DE");
            p.model_id = format!("m{i}");
            a.observe_prediction(&p);
        }
        // Two models and `__other__`, nothing for the 98 folded names.
        let names: usize = a.version_index.values().map(|v| v.len()).sum();
        assert_eq!((a.version_index.len(), names), (3, 3));
        assert_eq!(a.stats().limits.max_models, 98);
        let mut p = pred(100, 1.0, 0.5, "DE");
        p.model_id = "m50".into();
        a.observe_prediction(&p);
        assert_eq!(a.stats().limits.max_models, 99);
    }

    #[test]
    fn reference_bounds_are_counted_by_the_aggregator() {
        let mut c = cfg();
        c.drift.max_reference_features = 1;
        let mut a = Aggregator::new(c);
        for i in 0..12 {
            let mut p = pred(i, 1.0, 0.5, "DE");
            p.features
                .0
                .push((format!("f{i}"), FeatureValue::Double(2.0)));
            a.observe_prediction(&p);
        }
        // The reference is built from the first 10 events; each brought one
        // feature beyond the bound.
        assert_eq!(a.stats().limits.max_features, 10);
        assert_eq!(a.stats().limits.max_models, 0);
    }

    #[test]
    fn orphan_labels_count_in_the_label_window_under_an_empty_model() {
        let mut a = Aggregator::new(cfg());
        a.observe_prediction(&pred(0, 1.0, 0.5, "DE"));
        a.observe_joined(Joined::Orphan {
            label: label(MIN + 5, "1"),
        });
        a.observe_joined(Joined::Orphan {
            label: label(MIN + 6, "0"),
        });
        let mut out = Emitted::default();
        a.advance(2 * MIN, &mut out);
        let orphans: Vec<_> = find(&out.rows, "orphan_label_count", "", "")
            .into_iter()
            .filter(|r| r.window_start_ms == MIN)
            .collect();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].value.value, 2.0);
        assert_eq!(&*orphans[0].model_id, "");
    }

    #[test]
    fn the_first_events_of_a_version_become_its_reference_and_drift_follows() {
        let mut a = Aggregator::new(cfg());
        for i in 0..10 {
            a.observe_prediction(&pred(i, i as f64, 0.5, "DE"));
        }
        // Window 2: a shifted feature.
        for i in 0..50 {
            a.observe_prediction(&pred(2 * MIN + i, 100.0 + i as f64, 0.5, "DE"));
        }
        let mut out = Emitted::default();
        a.advance(3 * MIN, &mut out);
        assert_eq!(out.references.len(), 1);
        assert_eq!(out.references[0].2.sample_count, 10);
        assert!(a.has_reference("m", "v1"));
        let psi = find(&out.rows, "psi", "", "x");
        assert_eq!(
            psi.len(),
            1,
            "drift only for the window opened after the reference"
        );
        assert_eq!(psi[0].window_start_ms, 2 * MIN);
        assert!(psi[0].value.value > 1.0, "{}", psi[0].value.value);
        assert_eq!(
            find(&out.rows, "drift_detected", "", "x")[0].value.value,
            1.0
        );
        assert_eq!(out.versions.len(), 1);
        assert_eq!(out.versions[0].task, "binary");
        // The window's histograms, per cell: all traffic and segment DE.
        let hist: Vec<&WindowHistogram> = out
            .histograms
            .iter()
            .filter(|h| h.histogram.feature == "x")
            .collect();
        assert_eq!(hist.len(), 2, "{:?}", out.histograms);
        let segments: Vec<&str> = hist.iter().map(|h| &*h.segment).collect();
        assert_eq!(segments, ["", "country=DE"]);
        for h in &hist {
            assert_eq!((h.window_start_ms, h.window_ms), (2 * MIN, MIN));
            assert_eq!(h.histogram.kind, crate::metrics::HistogramKind::Numeric);
            // every value is above the reference maximum 9: the last cell
            let p = &out.references[0].2;
            let cells = match &p.features[0].kind {
                crate::metrics::reference::FeatureKind::Numeric(n) => n.cells.len(),
                _ => unreachable!("x is numeric"),
            };
            assert_eq!(h.histogram.counts[cells - 1], 50.0);
            assert_eq!(h.histogram.counts[..cells].iter().sum::<f64>(), 50.0);
            // sum(v - 9) for v = 100..150
            let above = *h.histogram.counts.last().unwrap();
            assert_eq!(above, (0..50).map(|i| 91.0 + i as f64).sum::<f64>());
        }
        // Closed windows are not emitted again.
        let mut again = Emitted::default();
        a.advance(4 * MIN, &mut again);
        assert!(again.histograms.is_empty());
    }
}
