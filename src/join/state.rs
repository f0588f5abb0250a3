//! Keyed join state: predictions waiting for their label, and labels that
//! arrived before their prediction, each with an expiry in event time.
//!
//! Pure: no I/O and no clock. The caller passes the watermark to [`JoinState::expire`].
//! Generic over the payload `P` the caller keeps per prediction (the
//! aggregator keeps a compact record: interned model version and segments,
//! timestamp and the outcome fields), so this module knows nothing of metrics.
//!
//! Semantics:
//! - A prediction waits for its label until `timestamp + label_horizon`;
//!   then it is handed back as [`Joined::Expired`] (unlabeled).
//! - A label that finds no prediction waits until `label.timestamp +
//!   early_label_ttl`; if no prediction came it is handed back as
//!   [`Joined::Orphan`].
//! - Several models (or versions) may score one request id: one label
//!   completes all of them. A label that matched stays until its TTL, so a
//!   sibling prediction arriving just after it still matches.
//! - The same request id and model twice is a duplicate: counted, first kept.
//! - A second label for a request id is a duplicate label: counted, first kept.
//! - Beyond `max_pending` predictions, the request whose earliest prediction
//!   expires soonest is expired early (labels due before it are expired too).
//!
//! Checkpoints: every request changed since the last
//! [`JoinState::drain_changes`] is handed out whole ([`StoredRequest`]), so a
//! store of them is the state and [`JoinState::restore`] rebuilds it. What a
//! request does next depends only on its stored state: the expiry queue may
//! hold stale entries, but they are skipped, so the queue rebuilt at restore
//! behaves as the original one.
//!
//! Change tracking is cheap on the common path: each in-memory entry has a
//! "changed since the checkpoint" flag, and a key is appended to a list
//! only when it becomes changed. A changed request that left memory keeps
//! its place in the list and is also held in a small set of departed keys,
//! so it is still reported (as gone) and, if it comes back before the
//! checkpoint, reported once with its current state.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::BinaryHeap;
use std::sync::Arc;

use ahash::{AHashMap, AHashSet};
use serde::{Deserialize, Serialize};

use crate::model::{Label, LimitHits};

/// Timing of the join, in milliseconds of event time.
#[derive(Debug, Clone, Copy)]
pub struct JoinConfig {
    /// How long a prediction waits for its label.
    pub label_horizon_ms: i64,
    /// How long a label waits for its prediction.
    pub early_label_ttl_ms: i64,
    /// Most pending requests; beyond it the one expiring soonest is expired early.
    pub max_pending: usize,
    /// Most pending predictions of one model (the caller's id); beyond it
    /// its new predictions are handed back as expired at once.
    pub max_pending_per_model: usize,
    /// Most labels held; beyond it a new label that completes no
    /// prediction is handed back as an orphan at once, and one that does
    /// is not held for later siblings.
    pub max_early_labels: usize,
}

/// What the join hands back.
#[derive(Debug, Clone, PartialEq)]
pub enum Joined<P> {
    /// A prediction and its label.
    Matched {
        /// The caller's record of the prediction.
        payload: P,
        /// The prediction's event time.
        prediction_ts: i64,
        /// The label.
        label: Arc<Label>,
    },
    /// A prediction whose label did not come within the horizon.
    Expired {
        /// The caller's record of the prediction.
        payload: P,
        /// The prediction's event time.
        prediction_ts: i64,
    },
    /// A label that never found a prediction.
    Orphan {
        /// The label.
        label: Arc<Label>,
    },
}

/// Result of inserting a prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionInsert {
    /// Waiting for its label.
    Pending,
    /// Matched a label that was already there.
    Matched,
    /// Same request id and model seen before: ignored.
    Duplicate,
    /// Its model has `max_pending_per_model` predictions waiting: handed
    /// back as expired at once.
    Refused,
}

/// Result of inserting a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelInsert {
    /// Completed this many pending predictions.
    Matched(usize),
    /// No prediction yet: waits as an early label.
    Early,
    /// A label for this request id is already known: ignored.
    Duplicate,
    /// No prediction, and `max_early_labels` are held: handed back as an
    /// orphan at once.
    Refused,
}

/// A request's whole join state as stored in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRequest<P> {
    /// (model, event time, payload) of each prediction waiting for its label.
    pub predictions: Vec<(u32, i64, P)>,
    /// The label held for the request: the label, when it expires, the models it completed.
    pub label: Option<(Label, i64, Vec<u32>)>,
}

struct PendingPrediction<P> {
    model: u32,
    ts: i64,
    payload: P,
}

struct EarlyLabel {
    label: Arc<Label>,
    expires_at: i64,
    /// Models already completed by this label (for duplicate detection).
    matched_models: Vec<u32>,
    /// Changed since the last [`JoinState::drain_changes`] (see `JoinState::changes`).
    changed: bool,
}

struct PendingRequest<P> {
    predictions: Vec<PendingPrediction<P>>,
    /// The earliest expiry among the predictions: the request's live queue entry.
    expires_at: i64,
    /// Changed since the last [`JoinState::drain_changes`] (see `JoinState::changes`).
    changed: bool,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Prediction,
    Label,
}

/// The join state. See the module docs for the semantics.
pub struct JoinState<P> {
    cfg: JoinConfig,
    pending: AHashMap<Arc<str>, PendingRequest<P>>,
    early: AHashMap<Arc<str>, EarlyLabel>,
    /// Expiry queue: (expires_at, side, key). An entry is live when its key
    /// has a pending request (side `Prediction`) or a label (side `Label`)
    /// with exactly that `expires_at`; other entries are stale (the key
    /// matched, expired, or expires at another time) and skipped when popped.
    /// So the queue acts as if it held only the live entries, which is what
    /// [`JoinState::restore`] rebuilds.
    queue: BinaryHeap<Reverse<(i64, Side, Arc<str>)>>,
    pending_predictions: usize,
    /// Requests changed since the last [`JoinState::drain_changes`], each
    /// once, in the order they first changed. A key is in the list exactly
    /// when its entries in `pending` and `early` have `changed` set (both
    /// of them, when a restore put the key in both maps) or, when it is in
    /// neither map, when it is in `departed`.
    changes: Vec<Arc<str>>,
    /// The keys of `changes` that are no longer in memory: changed requests
    /// that matched fully, expired or were expired early since the last
    /// [`JoinState::drain_changes`]. Never holds a key of `pending` or
    /// `early`: a key coming back is taken out (and keeps its place in
    /// `changes`).
    departed: AHashSet<Arc<str>>,
    /// Pending predictions (in memory) per model.
    per_model: AHashMap<u32, usize>,
    /// Caps hit since this join was made (not part of its stored state:
    /// the caller keeps the total).
    hits: LimitHits,
}

/// The key of `map` equal to `id` (which must be present), sharing its allocation.
fn key_of<V>(map: &AHashMap<Arc<str>, V>, id: &str) -> Arc<str> {
    map.get_key_value(id)
        .map(|(k, _)| k.clone())
        .expect("key present")
}

impl<P> JoinState<P> {
    /// An empty join.
    pub fn new(cfg: JoinConfig) -> Self {
        JoinState {
            cfg,
            pending: AHashMap::new(),
            early: AHashMap::new(),
            queue: BinaryHeap::new(),
            pending_predictions: 0,
            changes: Vec::new(),
            departed: AHashSet::new(),
            per_model: AHashMap::new(),
            hits: LimitHits::default(),
        }
    }

    /// Caps hit since this join was made: `max_pending`,
    /// `max_pending_per_model`, `max_early_labels`.
    pub fn limit_hits(&self) -> LimitHits {
        self.hits
    }

    fn add_model(&mut self, model: u32) {
        *self.per_model.entry(model).or_insert(0) += 1;
    }

    fn remove_models<'a>(&mut self, models: impl IntoIterator<Item = &'a u32>) {
        for m in models {
            if let Entry::Occupied(mut e) = self.per_model.entry(*m) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    fn model_full(&self, model: u32) -> bool {
        self.per_model.get(&model).copied().unwrap_or(0) >= self.cfg.max_pending_per_model
    }

    /// Bytes of the request ids and label texts held (a pass over the
    /// join): the part of a request's memory that depends on the input.
    pub fn text_bytes(&self) -> usize {
        let pending: usize = self.pending.keys().map(|k| k.len()).sum();
        let early: usize = self
            .early
            .iter()
            .map(|(k, e)| k.len() + e.label.actual_label.as_ref().map_or(0, |l| l.len()))
            .sum();
        pending + early
    }

    /// Predictions waiting for a label.
    pub fn pending_predictions(&self) -> usize {
        self.pending_predictions
    }

    /// Labels waiting for (more) predictions.
    pub fn early_labels(&self) -> usize {
        self.early.len()
    }

    /// Number of changed requests not yet drained by [`JoinState::drain_changes`].
    pub fn changed(&self) -> usize {
        self.changes.len()
    }

    /// The key for a request id not in memory, which becomes changed: the
    /// departed key when it changed before (already listed), else a new
    /// key appended to `changes`.
    fn arriving_key(&mut self, request_id: &str) -> Arc<str> {
        if !self.departed.is_empty() {
            if let Some(key) = self.departed.take(request_id) {
                return key;
            }
        }
        let key: Arc<str> = Arc::from(request_id);
        self.changes.push(key.clone());
        key
    }

    /// Records a change of `key`, which just left `pending` (`from_pending`)
    /// or `early` with its flag `was_changed`. Usually it left memory and
    /// joins `departed`; after a restore of both predictions and a label it
    /// may still be in the other map, whose entry is then marked (its flag
    /// equals `was_changed`: the flags of a key are kept equal).
    fn departed_key(&mut self, key: Arc<str>, was_changed: bool, from_pending: bool) {
        let other = if from_pending {
            self.early.get_mut(&key).map(|e| &mut e.changed)
        } else {
            self.pending.get_mut(&key).map(|r| &mut r.changed)
        };
        match other {
            Some(flag) => {
                *flag = true;
                if !was_changed {
                    self.changes.push(key);
                }
            }
            None => {
                if !was_changed {
                    self.changes.push(key.clone());
                }
                self.departed.insert(key);
            }
        }
    }

    /// Marks the in-memory request `request_id` changed in both maps and
    /// lists it (the caller saw its flag unset, so it is not listed yet).
    fn mark_changed(&mut self, request_id: &str) {
        let in_pending = self.pending.get_mut(request_id).map(|r| r.changed = true);
        let in_early = self.early.get_mut(request_id).map(|e| e.changed = true);
        let key = match (in_pending, in_early) {
            (Some(()), _) => key_of(&self.pending, request_id),
            (None, Some(())) => key_of(&self.early, request_id),
            (None, None) => unreachable!("request in memory"),
        };
        self.changes.push(key);
    }

    /// Puts back one request from a checkpoint (at startup, before any
    /// event): rebuilds its expiry queue entries and the counters. Replaces
    /// what the join held for `request_id`. Not recorded as a change.
    ///
    /// The predictions expire at their timestamp plus the configured
    /// horizon; the label at the stored `expires_at`.
    pub fn restore(&mut self, request_id: &str, r: StoredRequest<P>) {
        // A request that changed since the last drain stays changed.
        let mut changed = false;
        if let Some(old) = self.pending.remove(request_id) {
            self.pending_predictions -= old.predictions.len();
            self.remove_models(old.predictions.iter().map(|p| &p.model));
            changed |= old.changed;
        }
        if let Some(old) = self.early.remove(request_id) {
            changed |= old.changed;
        }
        let key = match self.departed.take(request_id) {
            Some(key) => {
                changed = true;
                key
            }
            None => Arc::from(request_id),
        };
        if changed && r.predictions.is_empty() && r.label.is_none() {
            self.departed.insert(key.clone());
        }
        let horizon = self.cfg.label_horizon_ms;
        if let Some(expires_at) = r
            .predictions
            .iter()
            .map(|(_, ts, _)| ts.saturating_add(horizon))
            .min()
        {
            self.pending_predictions += r.predictions.len();
            for (model, _, _) in &r.predictions {
                self.add_model(*model);
            }
            self.queue
                .push(Reverse((expires_at, Side::Prediction, key.clone())));
            let predictions = r
                .predictions
                .into_iter()
                .map(|(model, ts, payload)| PendingPrediction { model, ts, payload })
                .collect();
            self.pending.insert(
                key.clone(),
                PendingRequest {
                    predictions,
                    expires_at,
                    changed,
                },
            );
        }
        if let Some((label, expires_at, matched_models)) = r.label {
            self.queue
                .push(Reverse((expires_at, Side::Label, key.clone())));
            self.early.insert(
                key,
                EarlyLabel {
                    label: Arc::new(label),
                    expires_at,
                    matched_models,
                    changed,
                },
            );
        }
    }

    /// Adds a prediction of `model` (the caller's id for model + version).
    pub fn insert_prediction(
        &mut self,
        request_id: &str,
        model: u32,
        ts: i64,
        payload: P,
        out: &mut Vec<Joined<P>>,
    ) -> PredictionInsert {
        self.insert_prediction_with(request_id, model, ts, || payload, out)
    }

    /// Like [`JoinState::insert_prediction`], but the payload is only made
    /// (and the caller's side effects of making it only happen) when the
    /// prediction is not a duplicate.
    pub fn insert_prediction_with(
        &mut self,
        request_id: &str,
        model: u32,
        ts: i64,
        payload: impl FnOnce() -> P,
        out: &mut Vec<Joined<P>>,
    ) -> PredictionInsert {
        if let Some(early) = self.early.get_mut(request_id) {
            if early.matched_models.contains(&model) {
                return PredictionInsert::Duplicate;
            }
            early.matched_models.push(model);
            let payload = payload();
            out.push(Joined::Matched {
                payload,
                prediction_ts: ts,
                label: early.label.clone(),
            });
            if !early.changed {
                self.mark_changed(request_id);
            }
            return PredictionInsert::Matched;
        }
        let expires_at = ts.saturating_add(self.cfg.label_horizon_ms);
        if let Some(req) = self.pending.get_mut(request_id) {
            if req.predictions.iter().any(|p| p.model == model) {
                return PredictionInsert::Duplicate;
            }
            if self.per_model.get(&model).copied().unwrap_or(0) >= self.cfg.max_pending_per_model {
                return self.refuse(ts, payload(), out);
            }
            let req = self.pending.get_mut(request_id).expect("present");
            *self.per_model.entry(model).or_insert(0) += 1;
            req.predictions.push(PendingPrediction {
                model,
                ts,
                payload: payload(),
            });
            self.pending_predictions += 1;
            // Not in `early` (checked above), so this is the key's only flag.
            let listed = std::mem::replace(&mut req.changed, true);
            if expires_at < req.expires_at {
                // Expires before its siblings: it becomes the request's live entry.
                req.expires_at = expires_at;
                let key = key_of(&self.pending, request_id);
                if !listed {
                    self.changes.push(key.clone());
                }
                self.queue
                    .push(Reverse((expires_at, Side::Prediction, key)));
            } else if !listed {
                self.changes.push(key_of(&self.pending, request_id));
            }
            return PredictionInsert::Pending;
        }
        if self.model_full(model) {
            return self.refuse(ts, payload(), out);
        }
        if self.pending_predictions >= self.cfg.max_pending {
            self.hits.max_pending += 1;
            self.evict_one(out);
        }
        self.add_model(model);
        let key = self.arriving_key(request_id);
        self.queue
            .push(Reverse((expires_at, Side::Prediction, key.clone())));
        self.pending.insert(
            key,
            PendingRequest {
                predictions: vec![PendingPrediction {
                    model,
                    ts,
                    payload: payload(),
                }],
                expires_at,
                changed: true,
            },
        );
        self.pending_predictions += 1;
        PredictionInsert::Pending
    }

    /// A prediction beyond its model's share, handed back as expired.
    fn refuse(&mut self, ts: i64, payload: P, out: &mut Vec<Joined<P>>) -> PredictionInsert {
        self.hits.max_pending_per_model += 1;
        out.push(Joined::Expired {
            payload,
            prediction_ts: ts,
        });
        PredictionInsert::Refused
    }

    /// Adds a label: completes every pending prediction of its request id, or
    /// waits for them.
    pub fn insert_label(
        &mut self,
        request_id: &str,
        label: Label,
        out: &mut Vec<Joined<P>>,
    ) -> LabelInsert {
        if self.early.contains_key(request_id) {
            return LabelInsert::Duplicate;
        }
        let label = Arc::new(label);
        if self.early.len() >= self.cfg.max_early_labels {
            self.hits.max_early_labels += 1;
            return self.label_without_room(request_id, label, out);
        }
        let expires_at = label.timestamp.saturating_add(self.cfg.early_label_ttl_ms);
        let (key, matched_models, n) = match self.pending.remove_entry(request_id) {
            Some((key, req)) => {
                let n = req.predictions.len();
                self.pending_predictions -= n;
                let models: Vec<u32> = req.predictions.iter().map(|p| p.model).collect();
                self.remove_models(&models);
                for p in req.predictions {
                    out.push(Joined::Matched {
                        payload: p.payload,
                        prediction_ts: p.ts,
                        label: label.clone(),
                    });
                }
                // The key moves from `pending` to `early`, with its flag.
                if !req.changed {
                    self.changes.push(key.clone());
                }
                (key, models, n)
            }
            None => (self.arriving_key(request_id), Vec::new(), 0),
        };
        // A matched label is kept until its TTL too, so sibling predictions
        // (other models scoring the same request) arriving later still match.
        self.queue
            .push(Reverse((expires_at, Side::Label, key.clone())));
        self.early.insert(
            key,
            EarlyLabel {
                label,
                expires_at,
                matched_models,
                changed: true,
            },
        );
        if n > 0 {
            LabelInsert::Matched(n)
        } else {
            LabelInsert::Early
        }
    }

    /// A label with no room to be held: completes the predictions waiting
    /// for it, or is an orphan at once.
    fn label_without_room(
        &mut self,
        request_id: &str,
        label: Arc<Label>,
        out: &mut Vec<Joined<P>>,
    ) -> LabelInsert {
        let Some((key, req)) = self.pending.remove_entry(request_id) else {
            out.push(Joined::Orphan { label });
            return LabelInsert::Refused;
        };
        let n = req.predictions.len();
        self.pending_predictions -= n;
        self.remove_models(req.predictions.iter().map(|p| &p.model));
        for p in req.predictions {
            out.push(Joined::Matched {
                payload: p.payload,
                prediction_ts: p.ts,
                label: label.clone(),
            });
        }
        self.departed_key(key, req.changed, true);
        LabelInsert::Matched(n)
    }

    /// Expires everything due at `now` (the watermark): predictions past
    /// their horizon become [`Joined::Expired`], unmatched labels past their
    /// TTL become [`Joined::Orphan`].
    pub fn expire(&mut self, now: i64, out: &mut Vec<Joined<P>>) {
        while let Some(Reverse((at, _, _))) = self.queue.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, side, key))) = self.queue.pop() else {
                break;
            };
            self.expire_entry(at, side, key, now, out);
        }
    }

    fn expire_entry(
        &mut self,
        at: i64,
        side: Side,
        key: Arc<str>,
        now: i64,
        out: &mut Vec<Joined<P>>,
    ) {
        match side {
            Side::Prediction => {
                // One lookup for reading and removing the request.
                let Entry::Occupied(mut entry) = self.pending.entry(key) else {
                    return;
                };
                let req = entry.get_mut();
                if req.expires_at != at {
                    return; // stale
                }
                let horizon = self.cfg.label_horizon_ms;
                let before = req.predictions.len();
                let mut next = i64::MAX;
                let mut i = 0;
                while i < req.predictions.len() {
                    let expires_at = req.predictions[i].ts.saturating_add(horizon);
                    if expires_at <= now {
                        let p = req.predictions.swap_remove(i);
                        if let Some(c) = self.per_model.get_mut(&p.model) {
                            *c -= 1;
                        }
                        out.push(Joined::Expired {
                            payload: p.payload,
                            prediction_ts: p.ts,
                        });
                    } else {
                        next = next.min(expires_at);
                        i += 1;
                    }
                }
                self.pending_predictions -= before - req.predictions.len();
                if req.predictions.is_empty() {
                    let (key, req) = entry.remove_entry();
                    self.departed_key(key, req.changed, true);
                } else {
                    req.expires_at = next;
                    let listed = req.changed;
                    let key = entry.key().clone();
                    self.queue
                        .push(Reverse((next, Side::Prediction, key.clone())));
                    if !listed {
                        self.mark_changed(&key);
                    }
                }
            }
            Side::Label => {
                if let Entry::Occupied(entry) = self.early.entry(key) {
                    if entry.get().expires_at == at {
                        let (key, e) = entry.remove_entry();
                        if e.matched_models.is_empty() {
                            out.push(Joined::Orphan { label: e.label });
                        }
                        self.departed_key(key, e.changed, false);
                    }
                }
            }
        }
    }

    /// Expires the request that would expire soonest (memory cap reached),
    /// and the labels due before it.
    fn evict_one(&mut self, out: &mut Vec<Joined<P>>) {
        while let Some(Reverse((at, side, key))) = self.queue.pop() {
            if side == Side::Prediction {
                if self.pending.get(&key).is_some_and(|r| r.expires_at == at) {
                    let req = self.pending.remove(&key).expect("present");
                    self.pending_predictions -= req.predictions.len();
                    self.remove_models(req.predictions.iter().map(|p| &p.model));
                    for p in req.predictions {
                        out.push(Joined::Expired {
                            payload: p.payload,
                            prediction_ts: p.ts,
                        });
                    }
                    self.departed_key(key, req.changed, true);
                    return;
                }
            } else if self.early.get(&key).is_some_and(|e| e.expires_at == at) {
                let e = self.early.remove(&key).expect("present");
                if e.matched_models.is_empty() {
                    out.push(Joined::Orphan { label: e.label });
                }
                self.departed_key(key, e.changed, false);
            }
        }
    }
}

impl<P> JoinState<P> {
    /// True when the join holds `request_id` in memory (predictions or a label).
    pub fn contains(&self, request_id: &str) -> bool {
        self.pending.contains_key(request_id) || self.early.contains_key(request_id)
    }

    /// True when `request_id` changed since the last [`JoinState::drain_changes`]
    /// (held in memory, or gone from the join).
    pub fn is_changed(&self, request_id: &str) -> bool {
        // The flags of a key in both maps are equal: either one tells.
        if let Some(r) = self.pending.get(request_id) {
            r.changed
        } else if let Some(e) = self.early.get(request_id) {
            e.changed
        } else {
            self.departed.contains(request_id)
        }
    }

    /// Request ids held in memory.
    pub fn requests(&self) -> usize {
        self.pending.len() + self.early.len()
    }

    /// When a stored request first expires: its earliest prediction's
    /// horizon or its label's TTL (`i64::MAX` for an empty record).
    pub fn first_expiry(&self, r: &StoredRequest<P>) -> i64 {
        let horizon = self.cfg.label_horizon_ms;
        r.predictions
            .iter()
            .map(|(_, ts, _)| ts.saturating_add(horizon))
            .chain(r.label.as_ref().map(|(_, at, _)| *at))
            .min()
            .unwrap_or(i64::MAX)
    }

    /// Removes from memory up to `n` requests that hold only pending
    /// predictions and did not change since the last
    /// [`JoinState::drain_changes`] (so the caller's stored copy is
    /// current), with their expiry queue entries. Returns how many requests
    /// and predictions left. The caller keeps them on disk and puts a
    /// request back with [`JoinState::restore`] before any event or
    /// expiry touches it.
    pub fn evict_unchanged(&mut self, n: usize) -> (usize, usize) {
        if n == 0 {
            return (0, 0);
        }
        let victims: Vec<Arc<str>> = self
            .pending
            .iter()
            .filter(|(k, r)| !r.changed && !self.early.contains_key(*k))
            .map(|(k, _)| k)
            .take(n)
            .cloned()
            .collect();
        let mut predictions = 0;
        for k in &victims {
            if let Some(req) = self.pending.remove(k) {
                predictions += req.predictions.len();
                self.remove_models(req.predictions.iter().map(|p| &p.model));
            }
        }
        self.pending_predictions -= predictions;
        let (pending, early) = (&self.pending, &self.early);
        self.queue.retain(|Reverse((_, side, k))| match side {
            Side::Prediction => pending.contains_key(k),
            Side::Label => early.contains_key(k),
        });
        (victims.len(), predictions)
    }
}

impl<P: Clone> JoinState<P> {
    /// Hands every request changed since the last call to `f`, once each
    /// and in the order they first changed: its current state, or `None`
    /// when it is gone. Clears the change set.
    pub fn drain_changes(&mut self, mut f: impl FnMut(&str, Option<StoredRequest<P>>)) {
        self.departed.clear();
        let mut changes = std::mem::take(&mut self.changes);
        for key in changes.drain(..) {
            let pending = self.pending.get_mut(&key).map(|r| {
                r.changed = false;
                &*r
            });
            let early = self.early.get_mut(&key).map(|e| {
                e.changed = false;
                &*e
            });
            let stored = (pending.is_some() || early.is_some()).then(|| StoredRequest {
                predictions: pending.map_or_else(Vec::new, |r| {
                    r.predictions
                        .iter()
                        .map(|p| (p.model, p.ts, p.payload.clone()))
                        .collect()
                }),
                label: early.map(|e| ((*e.label).clone(), e.expires_at, e.matched_models.clone())),
            });
            f(&key, stored);
        }
        // Keeps the list's allocation for the next interval.
        self.changes = changes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 1_000;
    const TTL: i64 = 100;

    fn join() -> JoinState<&'static str> {
        JoinState::new(JoinConfig {
            label_horizon_ms: H,
            early_label_ttl_ms: TTL,
            max_pending: 1_000,
            max_pending_per_model: usize::MAX,
            max_early_labels: usize::MAX,
        })
    }

    fn label(ts: i64, v: &str) -> Label {
        Label {
            actual_label: Some(v.into()),
            actual_value: None,
            timestamp: ts,
        }
    }

    #[test]
    fn prediction_then_label_matches() {
        let mut j = join();
        let mut out = vec![];
        assert_eq!(
            j.insert_prediction("r1", 0, 10, "p", &mut out),
            PredictionInsert::Pending
        );
        assert!(out.is_empty());
        assert_eq!(j.pending_predictions(), 1);
        assert_eq!(
            j.insert_label("r1", label(500, "1"), &mut out),
            LabelInsert::Matched(1)
        );
        assert_eq!(j.pending_predictions(), 0);
        match &out[..] {
            [Joined::Matched {
                payload,
                prediction_ts,
                label,
            }] => {
                assert_eq!(*payload, "p");
                assert_eq!(*prediction_ts, 10);
                assert_eq!(label.actual_label.as_deref(), Some("1"));
            }
            other => panic!("unexpected {other:?}"),
        }
        // The matched label is not an orphan when it expires.
        out.clear();
        j.expire(10_000, &mut out);
        assert!(out.is_empty());
        assert_eq!(j.early_labels(), 0);
    }

    #[test]
    fn early_label_waits_for_its_prediction_then_expires_as_orphan() {
        let mut j = join();
        let mut out = vec![];
        assert_eq!(
            j.insert_label("r1", label(50, "0"), &mut out),
            LabelInsert::Early
        );
        assert_eq!(
            j.insert_prediction("r1", 0, 40, "p", &mut out),
            PredictionInsert::Matched
        );
        assert_eq!(out.len(), 1);
        out.clear();
        assert_eq!(
            j.insert_label("r2", label(50, "0"), &mut out),
            LabelInsert::Early
        );
        j.expire(50 + TTL - 1, &mut out);
        assert!(out.is_empty(), "not yet due");
        j.expire(50 + TTL, &mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Joined::Orphan { label } if label.timestamp == 50));
        assert_eq!(j.early_labels(), 0);
        // A prediction after the label's TTL no longer matches it.
        out.clear();
        assert_eq!(
            j.insert_prediction("r2", 0, 60, "late", &mut out),
            PredictionInsert::Pending
        );
        assert!(out.is_empty());
    }

    #[test]
    fn prediction_expires_at_the_horizon_as_unlabeled() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 0, 100, "a", &mut out);
        j.insert_prediction("r2", 0, 300, "b", &mut out);
        j.expire(100 + H - 1, &mut out);
        assert!(out.is_empty());
        j.expire(100 + H, &mut out);
        assert_eq!(
            out,
            vec![Joined::Expired {
                payload: "a",
                prediction_ts: 100
            }]
        );
        assert_eq!(j.pending_predictions(), 1);
        // A label after expiry is an orphan candidate, not a match.
        out.clear();
        assert_eq!(
            j.insert_label("r1", label(2_000, "1"), &mut out),
            LabelInsert::Early
        );
    }

    #[test]
    fn one_label_completes_every_model_of_the_request() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 0, 10, "champion", &mut out);
        j.insert_prediction("r1", 1, 10, "challenger", &mut out);
        assert_eq!(j.pending_predictions(), 2);
        assert_eq!(
            j.insert_label("r1", label(20, "1"), &mut out),
            LabelInsert::Matched(2)
        );
        let mut got: Vec<_> = out
            .iter()
            .map(|o| match o {
                Joined::Matched { payload, .. } => *payload,
                _ => panic!("{o:?}"),
            })
            .collect();
        got.sort();
        assert_eq!(got, vec!["challenger", "champion"]);
        // A third model scoring the request shortly after the label still matches.
        out.clear();
        assert_eq!(
            j.insert_prediction("r1", 2, 12, "shadow", &mut out),
            PredictionInsert::Matched
        );
        // ...but the champion again is a duplicate.
        assert_eq!(
            j.insert_prediction("r1", 0, 12, "again", &mut out),
            PredictionInsert::Duplicate
        );
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn duplicates_are_counted_and_the_first_kept() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 7, 10, "first", &mut out);
        assert_eq!(
            j.insert_prediction("r1", 7, 11, "second", &mut out),
            PredictionInsert::Duplicate
        );
        assert_eq!(j.pending_predictions(), 1);
        j.insert_label("r1", label(20, "1"), &mut out);
        assert!(matches!(
            &out[..],
            [Joined::Matched {
                payload: "first",
                ..
            }]
        ));
        assert_eq!(
            j.insert_label("r1", label(21, "0"), &mut out),
            LabelInsert::Duplicate
        );
    }

    #[test]
    fn sibling_predictions_expire_individually() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 0, 0, "old", &mut out);
        j.insert_prediction("r1", 1, 500, "new", &mut out);
        j.expire(H, &mut out);
        assert_eq!(
            out,
            vec![Joined::Expired {
                payload: "old",
                prediction_ts: 0
            }]
        );
        out.clear();
        j.insert_label("r1", label(600, "1"), &mut out);
        assert!(matches!(&out[..], [Joined::Matched { payload: "new", .. }]));
        assert_eq!(j.pending_predictions(), 0);
    }

    #[test]
    fn memory_cap_expires_the_oldest_early() {
        let mut j: JoinState<u32> = JoinState::new(JoinConfig {
            label_horizon_ms: H,
            early_label_ttl_ms: TTL,
            max_pending: 2,
            max_pending_per_model: usize::MAX,
            max_early_labels: usize::MAX,
        });
        let mut out = vec![];
        j.insert_prediction("a", 0, 1, 1, &mut out);
        j.insert_prediction("b", 0, 2, 2, &mut out);
        j.insert_prediction("c", 0, 3, 3, &mut out);
        assert_eq!(
            out,
            vec![Joined::Expired {
                payload: 1,
                prediction_ts: 1
            }]
        );
        assert_eq!(j.pending_predictions(), 2);
        assert_eq!(j.limit_hits().max_pending, 1);
    }

    #[test]
    fn text_bytes_counts_request_ids_and_label_texts_held() {
        let mut j = join();
        let mut out = vec![];
        assert_eq!(j.text_bytes(), 0);
        j.insert_prediction("abc", 0, 1, "p", &mut out);
        j.insert_prediction("abc", 1, 1, "q", &mut out);
        assert_eq!(j.text_bytes(), 3);
        j.insert_label("early-id", label(2, "positive"), &mut out);
        assert_eq!(j.text_bytes(), 3 + 8 + 8);
        // Matched: the id moves to the held label.
        j.insert_label("abc", label(3, "0"), &mut out);
        assert_eq!(j.text_bytes(), (8 + 8) + (3 + 1));
        j.expire(3 + TTL, &mut out);
        assert_eq!(j.text_bytes(), 0);
    }

    #[test]
    fn one_models_flood_is_refused_without_touching_the_others() {
        let mut j: JoinState<u32> = JoinState::new(JoinConfig {
            label_horizon_ms: H,
            early_label_ttl_ms: TTL,
            max_pending: 5,
            max_pending_per_model: 2,
            max_early_labels: usize::MAX,
        });
        let mut out = vec![];
        j.insert_prediction("quiet", 1, 1, 100, &mut out);
        assert_eq!(
            j.insert_prediction("f1", 0, 2, 1, &mut out),
            PredictionInsert::Pending
        );
        assert_eq!(
            j.insert_prediction("f2", 0, 3, 2, &mut out),
            PredictionInsert::Pending
        );
        // The flood's third and fourth: handed back as expired at once,
        // also when the request already waits for another model.
        assert_eq!(
            j.insert_prediction("f3", 0, 4, 3, &mut out),
            PredictionInsert::Refused
        );
        assert_eq!(
            j.insert_prediction("quiet", 0, 5, 4, &mut out),
            PredictionInsert::Refused
        );
        assert_eq!(
            out,
            vec![
                Joined::Expired {
                    payload: 3,
                    prediction_ts: 4
                },
                Joined::Expired {
                    payload: 4,
                    prediction_ts: 5
                },
            ]
        );
        assert_eq!(j.limit_hits().max_pending_per_model, 2);
        // The other model's prediction is still waiting and matches.
        out.clear();
        assert_eq!(
            j.insert_label("quiet", label(6, "1"), &mut out),
            LabelInsert::Matched(1)
        );
        // A label frees the flooding model's share.
        assert_eq!(
            j.insert_label("f1", label(7, "1"), &mut out),
            LabelInsert::Matched(1)
        );
        assert_eq!(
            j.insert_prediction("f4", 0, 8, 5, &mut out),
            PredictionInsert::Pending
        );
        // Expiry frees it too.
        j.expire(3 + H, &mut out);
        assert_eq!(
            j.insert_prediction("f5", 0, 9, 6, &mut out),
            PredictionInsert::Pending
        );
        assert_eq!(j.limit_hits().max_pending_per_model, 2);
        assert_eq!(j.pending_predictions(), 2);
    }

    #[test]
    fn beyond_the_early_label_cap_labels_are_not_held() {
        let mut j: JoinState<u32> = JoinState::new(JoinConfig {
            label_horizon_ms: H,
            early_label_ttl_ms: TTL,
            max_pending: 100,
            max_pending_per_model: usize::MAX,
            max_early_labels: 2,
        });
        let mut out = vec![];
        j.insert_prediction("p", 0, 1, 7, &mut out);
        assert_eq!(
            j.insert_label("a", label(10, "1"), &mut out),
            LabelInsert::Early
        );
        assert_eq!(
            j.insert_label("b", label(11, "1"), &mut out),
            LabelInsert::Early
        );
        // Full: an unmatched label is an orphan at once…
        assert_eq!(
            j.insert_label("c", label(12, "0"), &mut out),
            LabelInsert::Refused
        );
        assert_eq!(
            out,
            vec![Joined::Orphan {
                label: Arc::new(label(12, "0"))
            }]
        );
        out.clear();
        // …and one that completes predictions still completes them, without being held.
        assert_eq!(
            j.insert_label("p", label(13, "1"), &mut out),
            LabelInsert::Matched(1)
        );
        assert!(matches!(&out[..], [Joined::Matched { payload: 7, .. }]));
        assert_eq!(j.early_labels(), 2);
        assert!(!j.contains("p"));
        assert_eq!(j.limit_hits().max_early_labels, 2);
        // The held ones still match their predictions.
        out.clear();
        assert_eq!(
            j.insert_prediction("a", 0, 14, 8, &mut out),
            PredictionInsert::Matched
        );
        // Once they expire there is room again.
        j.expire(11 + TTL, &mut out);
        assert_eq!(j.early_labels(), 0);
        assert_eq!(
            j.insert_label("d", label(200, "1"), &mut out),
            LabelInsert::Early
        );
        assert_eq!(j.limit_hits().max_early_labels, 2);
    }

    // ---- checkpoints: change tracking and restore ----

    use std::collections::BTreeMap;

    /// Everything the join holds, as [`JoinState::drain_changes`] would store it.
    fn full_state<P: Clone>(j: &JoinState<P>) -> BTreeMap<String, StoredRequest<P>> {
        let keys: Vec<&Arc<str>> = j.pending.keys().chain(j.early.keys()).collect();
        keys.into_iter()
            .map(|k| {
                let r = StoredRequest {
                    predictions: j.pending.get(k).map_or_else(Vec::new, |r| {
                        r.predictions
                            .iter()
                            .map(|p| (p.model, p.ts, p.payload.clone()))
                            .collect()
                    }),
                    label: j
                        .early
                        .get(k)
                        .map(|e| ((*e.label).clone(), e.expires_at, e.matched_models.clone())),
                };
                (k.to_string(), r)
            })
            .collect()
    }

    /// Checks the change tracking's invariants: each key listed once; a
    /// listed key is flagged in every map holding it, or departed when in
    /// none; every flagged entry is listed; `departed` holds only listed
    /// keys out of memory; `is_changed` agrees.
    fn check_changes<P>(j: &JoinState<P>) {
        let listed: std::collections::BTreeSet<&str> = j.changes.iter().map(|k| &**k).collect();
        assert_eq!(listed.len(), j.changes.len(), "a key listed twice");
        assert_eq!(j.changed(), listed.len());
        for k in &listed {
            let (p, e) = (j.pending.get(*k), j.early.get(*k));
            assert!(p.is_none_or(|r| r.changed), "{k} listed, unflagged");
            assert!(e.is_none_or(|e| e.changed), "{k} listed, unflagged");
            let in_memory = p.is_some() || e.is_some();
            assert_eq!(j.departed.contains(*k), !in_memory, "{k}");
            assert!(j.is_changed(k));
        }
        for (k, r) in &j.pending {
            assert_eq!(r.changed, listed.contains(&**k), "{k}");
            assert_eq!(j.is_changed(k), r.changed);
        }
        for (k, e) in &j.early {
            assert_eq!(e.changed, listed.contains(&**k), "{k}");
            assert_eq!(j.is_changed(k), e.changed);
        }
        assert!(j.departed.iter().all(|k| listed.contains(&**k)));
    }

    /// Drains the changes into `store` (insert on `Some`, remove on `None`).
    fn drain_into<P: Clone>(j: &mut JoinState<P>, store: &mut BTreeMap<String, StoredRequest<P>>) {
        j.drain_changes(|k, r| match r {
            Some(r) => {
                store.insert(k.to_string(), r);
            }
            None => {
                store.remove(k);
            }
        });
        assert_eq!(j.changed(), 0);
    }

    fn restored<P: Clone>(
        cfg: JoinConfig,
        store: &BTreeMap<String, StoredRequest<P>>,
    ) -> JoinState<P> {
        let mut j = JoinState::new(cfg);
        for (k, r) in store {
            j.restore(k, r.clone());
        }
        assert_eq!(j.changed(), 0, "restoring is not a change");
        j
    }

    #[test]
    fn changes_hand_out_whole_requests_and_departures() {
        let mut j = join();
        let mut out = vec![];
        assert_eq!(j.changed(), 0);
        j.insert_prediction("r1", 0, 10, "a", &mut out);
        j.insert_prediction("r1", 1, 12, "b", &mut out);
        j.insert_label("r2", label(20, "1"), &mut out);
        assert_eq!(j.changed(), 2);
        let mut got = BTreeMap::new();
        j.drain_changes(|k, r| {
            got.insert(k.to_string(), r);
        });
        assert_eq!(j.changed(), 0);
        assert_eq!(
            got["r1"],
            Some(StoredRequest {
                predictions: vec![(0, 10, "a"), (1, 12, "b")],
                label: None,
            })
        );
        assert_eq!(
            got["r2"],
            Some(StoredRequest {
                predictions: vec![],
                label: Some((label(20, "1"), 20 + TTL, vec![])),
            })
        );
        // Duplicates change nothing.
        j.insert_prediction("r1", 0, 11, "again", &mut out);
        j.insert_label("r2", label(21, "0"), &mut out);
        assert_eq!(j.changed(), 0);
        // A match moves the request to its label; an expiry removes it.
        j.insert_label("r1", label(30, "0"), &mut out);
        j.expire(20 + TTL, &mut out);
        let mut got = BTreeMap::new();
        j.drain_changes(|k, r| {
            got.insert(k.to_string(), r);
        });
        assert_eq!(
            got["r1"],
            Some(StoredRequest {
                predictions: vec![],
                label: Some((label(30, "0"), 30 + TTL, vec![0, 1])),
            })
        );
        assert_eq!(got["r2"], None);
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn restore_rebuilds_counters_and_expiry() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 0, 10, "a", &mut out);
        j.insert_prediction("r1", 1, 500, "b", &mut out);
        j.insert_label("r2", label(20, "1"), &mut out);
        j.insert_label("r3", label(25, "1"), &mut out);
        j.insert_prediction("r3", 0, 24, "c", &mut out);
        let mut store = BTreeMap::new();
        drain_into(&mut j, &mut store);
        let mut r = restored(
            JoinConfig {
                label_horizon_ms: H,
                early_label_ttl_ms: TTL,
                max_pending: 1_000,
                max_pending_per_model: usize::MAX,
                max_early_labels: usize::MAX,
            },
            &store,
        );
        assert_eq!(r.pending_predictions(), 2);
        assert_eq!(r.early_labels(), 2);
        // The matched sibling's label is still there; its model is a duplicate.
        assert_eq!(
            r.insert_prediction("r3", 0, 26, "again", &mut out),
            PredictionInsert::Duplicate
        );
        out.clear();
        r.expire(10 + H, &mut out);
        assert_eq!(
            out,
            vec![
                Joined::Orphan {
                    label: Arc::new(label(20, "1"))
                },
                Joined::Expired {
                    payload: "a",
                    prediction_ts: 10
                },
            ]
        );
        assert_eq!((r.pending_predictions(), r.early_labels()), (1, 0));
    }

    #[test]
    fn stored_requests_round_trip_through_message_pack() {
        let r = StoredRequest {
            predictions: vec![(3, -5, (7u32, 9i64)), (4, 6, (8, 10))],
            label: Some((
                Label {
                    actual_label: None,
                    actual_value: Some(0.25),
                    timestamp: 42,
                },
                142,
                vec![1, 2],
            )),
        };
        let bytes = rmp_serde::to_vec(&r).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<StoredRequest<(u32, i64)>>(&bytes).unwrap(),
            r
        );
    }

    /// A stale queue entry (from an earlier life of the request id) neither
    /// evicts nor expires the request's current life: the state is what the
    /// maps hold, so a restored join evicts the same request.
    #[test]
    fn stale_entries_do_not_act_and_eviction_survives_restore() {
        let cfg = JoinConfig {
            label_horizon_ms: H,
            early_label_ttl_ms: TTL,
            max_pending: 2,
            max_pending_per_model: usize::MAX,
            max_early_labels: usize::MAX,
        };
        let mut j: JoinState<u32> = JoinState::new(cfg);
        let mut out = vec![];
        j.insert_prediction("a", 0, 0, 1, &mut out); // queue: (H, a)
        j.insert_label("a", label(10, "1"), &mut out);
        j.expire(10 + TTL, &mut out); // a leaves; (H, a) stays, stale
        j.insert_prediction("a", 0, 100, 2, &mut out); // expires at 100 + H
        j.insert_prediction("b", 0, 50, 3, &mut out); // expires at 50 + H
        let mut store = BTreeMap::new();
        drain_into(&mut j, &mut store);
        let mut r = restored(cfg, &store);
        let (mut o1, mut o2) = (vec![], vec![]);
        j.insert_prediction("c", 0, 60, 4, &mut o1);
        r.insert_prediction("c", 0, 60, 4, &mut o2);
        let b = vec![Joined::Expired {
            payload: 3,
            prediction_ts: 50,
        }];
        assert_eq!(o1, b, "the soonest-expiring request is evicted");
        assert_eq!(o2, b);
        assert_eq!(full_state(&j), full_state(&r));
    }

    /// A sibling prediction that expires before the request's first one
    /// expires at its own horizon.
    #[test]
    fn an_earlier_sibling_expires_at_its_own_horizon() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 0, 500, "late", &mut out);
        j.insert_prediction("r1", 1, 100, "early", &mut out);
        j.expire(100 + H, &mut out);
        assert_eq!(
            out,
            vec![Joined::Expired {
                payload: "early",
                prediction_ts: 100
            }]
        );
        out.clear();
        j.expire(500 + H, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(j.pending_predictions(), 0);
    }

    /// A request that left memory since the checkpoint is reported gone;
    /// one that comes back before the checkpoint is reported once, as it is
    /// now, in the order requests first changed.
    #[test]
    fn departed_and_returning_requests_are_reported_once() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 0, 10, "a", &mut out);
        j.insert_prediction("r2", 0, 20, "b", &mut out);
        let mut store = BTreeMap::new();
        drain_into(&mut j, &mut store);
        j.expire(20 + H, &mut out);
        assert_eq!(out.len(), 2);
        assert!(!j.contains("r1") && j.is_changed("r1"));
        assert!(!j.contains("r2") && j.is_changed("r2"));
        assert_eq!(j.changed(), 2);
        check_changes(&j);
        // r1 comes back, then moves from its predictions to its label.
        j.insert_prediction("r1", 1, 30, "c", &mut out);
        assert_eq!(j.changed(), 2);
        check_changes(&j);
        j.insert_label("r1", label(40, "1"), &mut out);
        assert_eq!(j.changed(), 2);
        check_changes(&j);
        let mut got = vec![];
        j.drain_changes(|k, r| got.push((k.to_string(), r)));
        assert_eq!(
            got,
            vec![
                (
                    "r1".to_string(),
                    Some(StoredRequest {
                        predictions: vec![],
                        label: Some((label(40, "1"), 40 + TTL, vec![1])),
                    })
                ),
                ("r2".to_string(), None),
            ]
        );
        check_changes(&j);
        // A label that leaves and a new one for the same request: once.
        j.expire(40 + TTL, &mut out);
        assert!(!j.contains("r1") && j.is_changed("r1"));
        assert_eq!(
            j.insert_label("r1", label(50, "0"), &mut out),
            LabelInsert::Early
        );
        assert_eq!(j.changed(), 1);
        check_changes(&j);
        let mut got = vec![];
        j.drain_changes(|k, r| got.push((k.to_string(), r.is_some())));
        assert_eq!(got, vec![("r1".to_string(), true)]);
    }

    /// A restore may put one request id in both maps (predictions and a
    /// label): its changes are tracked as one request's.
    #[test]
    fn a_restored_request_with_predictions_and_a_label_is_one_change() {
        let mut j = join();
        let mut out = vec![];
        j.restore(
            "r1",
            StoredRequest {
                predictions: vec![(0, 10, "a"), (1, 200, "b")],
                label: Some((label(20, "1"), 5_000, vec![])),
            },
        );
        assert_eq!(j.changed(), 0);
        check_changes(&j);
        // A partial expiry of the predictions.
        j.expire(10 + H, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(j.changed(), 1);
        check_changes(&j);
        let mut store = BTreeMap::new();
        drain_into(&mut j, &mut store);
        assert_eq!(store["r1"].predictions, vec![(1, 200, "b")]);
        assert!(store["r1"].label.is_some());
        check_changes(&j);
        // A prediction matching the label.
        assert_eq!(
            j.insert_prediction("r1", 2, 300, "c", &mut out),
            PredictionInsert::Matched
        );
        assert_eq!(j.changed(), 1);
        check_changes(&j);
        drain_into(&mut j, &mut store);
        assert_eq!(store["r1"].label.as_ref().unwrap().2, vec![2]);
        // The predictions leave (the label stays), then the label.
        j.expire(200 + H, &mut out);
        assert!(j.contains("r1") && j.is_changed("r1"));
        check_changes(&j);
        drain_into(&mut j, &mut store);
        assert_eq!(store["r1"].predictions, vec![]);
        j.expire(5_000, &mut out);
        assert!(!j.contains("r1") && j.is_changed("r1"));
        check_changes(&j);
        drain_into(&mut j, &mut store);
        assert!(store.is_empty());
        // The label leaves first (unchanged since the drain), predictions stay.
        j.restore(
            "r2",
            StoredRequest {
                predictions: vec![(0, 10, "a")],
                label: Some((label(20, "1"), 30, vec![])),
            },
        );
        j.expire(30, &mut out);
        assert!(j.contains("r2") && j.is_changed("r2"));
        assert_eq!(j.changed(), 1);
        check_changes(&j);
    }

    /// Restoring a request that changed since the last drain keeps it
    /// changed (and gone, when the restored record is empty); restoring
    /// one that did not is no change.
    #[test]
    fn restoring_a_changed_request_keeps_it_changed() {
        let mut j = join();
        let mut out = vec![];
        let empty = || StoredRequest {
            predictions: vec![],
            label: None,
        };
        j.insert_prediction("r1", 0, 10, "a", &mut out);
        j.restore(
            "r1",
            StoredRequest {
                predictions: vec![(1, 20, "b")],
                label: None,
            },
        );
        assert!(j.is_changed("r1"));
        check_changes(&j);
        j.restore("r1", empty());
        assert!(!j.contains("r1") && j.is_changed("r1"));
        check_changes(&j);
        j.restore(
            "r1",
            StoredRequest {
                predictions: vec![],
                label: Some((label(20, "1"), 30, vec![])),
            },
        );
        assert!(j.contains("r1") && j.is_changed("r1"));
        check_changes(&j);
        j.restore("r2", empty());
        assert!(!j.is_changed("r2"));
        assert_eq!(j.changed(), 1);
        check_changes(&j);
        let mut got = vec![];
        j.drain_changes(|k, r| got.push((k.to_string(), r.map(|r| r.label.is_some()))));
        assert_eq!(got, vec![("r1".to_string(), Some(true))]);
    }

    /// Only requests unchanged since the last drain holding only
    /// predictions are evicted; eviction is no change.
    #[test]
    fn only_unchanged_prediction_requests_are_evicted() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 0, 10, "a", &mut out);
        j.insert_prediction("r2", 0, 10, "b", &mut out);
        j.insert_label("r3", label(10, "1"), &mut out);
        assert_eq!(j.evict_unchanged(10), (0, 0));
        let mut store = BTreeMap::new();
        drain_into(&mut j, &mut store);
        j.insert_prediction("r2", 1, 11, "c", &mut out);
        assert_eq!(j.evict_unchanged(10), (1, 1));
        assert!(!j.contains("r1") && !j.is_changed("r1"));
        assert!(j.contains("r2") && j.contains("r3"));
        assert_eq!(j.changed(), 1);
        check_changes(&j);
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        const H: i64 = 500;
        const TTL: i64 = 150;

        type Pay = (u32, i64);

        #[derive(Debug, Clone)]
        enum Op {
            Prediction { req: u8, model: u32, dt: i64 },
            Label { req: u8, dt: i64 },
            Expire { advance: i64 },
            Drain,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                5 => (0u8..8, 0u32..3, -300i64..300)
                    .prop_map(|(req, model, dt)| Op::Prediction { req, model, dt }),
                3 => (0u8..8, -200i64..200).prop_map(|(req, dt)| Op::Label { req, dt }),
                2 => (0i64..250).prop_map(|advance| Op::Expire { advance }),
                1 => Just(Op::Drain),
            ]
        }

        #[derive(Debug, PartialEq)]
        enum Step {
            Prediction(PredictionInsert, Vec<Joined<Pay>>),
            Label(LabelInsert, Vec<Joined<Pay>>),
            Expire(Vec<Joined<Pay>>),
            Drain(BTreeMap<String, Option<StoredRequest<Pay>>>),
        }

        /// Applies `op` (the `i`-th) at watermark `now`.
        fn apply(j: &mut JoinState<Pay>, now: &mut i64, i: usize, op: &Op) -> Step {
            let mut out = vec![];
            let step = match *op {
                Op::Prediction { req, model, dt } => {
                    let ts = *now + dt;
                    let r = j.insert_prediction(
                        &format!("r{req}"),
                        model,
                        ts,
                        (i as u32, ts),
                        &mut out,
                    );
                    Step::Prediction(r, out)
                }
                Op::Label { req, dt } => {
                    let l = Label {
                        actual_label: Some(format!("{i}").into()),
                        actual_value: Some(i as f64 / 3.0),
                        timestamp: *now + dt,
                    };
                    Step::Label(j.insert_label(&format!("r{req}"), l, &mut out), out)
                }
                Op::Expire { advance } => {
                    *now += advance;
                    j.expire(*now, &mut out);
                    Step::Expire(out)
                }
                Op::Drain => {
                    let expected: Vec<String> = (0..8)
                        .map(|r| format!("r{r}"))
                        .filter(|k| j.is_changed(k))
                        .collect();
                    assert_eq!(expected.len(), j.changed());
                    let mut got = BTreeMap::new();
                    j.drain_changes(|k, r| {
                        assert!(got.insert(k.to_string(), r).is_none(), "{k} twice");
                    });
                    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), expected);
                    assert!((0..8).all(|r| !j.is_changed(&format!("r{r}"))));
                    Step::Drain(got)
                }
            };
            check_changes(j);
            step
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Changes drained at random points into a store, restored into a
            /// fresh join: it behaves as the original for any continuation.
            #[test]
            fn restored_join_behaves_as_the_original(
                max_pending in prop_oneof![1usize..8, Just(1_000)],
                max_pending_per_model in prop_oneof![1usize..4, Just(1_000)],
                max_early_labels in prop_oneof![1usize..4, Just(1_000)],
                prefix in proptest::collection::vec(op(), 0..80),
                continuation in proptest::collection::vec(op(), 0..80),
            ) {
                let cfg = JoinConfig {
                    label_horizon_ms: H,
                    early_label_ttl_ms: TTL,
                    max_pending,
                    max_pending_per_model,
                    max_early_labels,
                };
                let mut a: JoinState<Pay> = JoinState::new(cfg);
                let mut store = BTreeMap::new();
                let mut now = 0;
                for (i, op) in prefix.iter().enumerate() {
                    if let Step::Drain(got) = apply(&mut a, &mut now, i, op) {
                        for (k, r) in got {
                            match r {
                                Some(r) => { store.insert(k, r); }
                                None => { store.remove(&k); }
                            }
                        }
                    }
                }
                drain_into(&mut a, &mut store);
                prop_assert_eq!(&store, &full_state(&a));
                let mut b = restored(cfg, &store);
                prop_assert_eq!(b.pending_predictions(), a.pending_predictions());
                prop_assert_eq!(b.early_labels(), a.early_labels());
                let mut now_b = now;
                for (i, op) in continuation.iter().enumerate() {
                    let i = prefix.len() + i;
                    let sa = apply(&mut a, &mut now, i, op);
                    let sb = apply(&mut b, &mut now_b, i, op);
                    prop_assert_eq!(sa, sb, "op {} {:?}", i, op);
                    prop_assert_eq!(a.pending_predictions(), b.pending_predictions());
                    prop_assert_eq!(a.early_labels(), b.early_labels());
                    prop_assert_eq!(a.changed(), b.changed());
                }
                prop_assert_eq!(full_state(&a), full_state(&b));
                let end = Op::Expire { advance: i64::MAX / 4 };
                let n = prefix.len() + continuation.len();
                prop_assert_eq!(apply(&mut a, &mut now, n, &end), apply(&mut b, &mut now_b, n, &end));
                prop_assert_eq!((a.pending_predictions(), a.early_labels()), (0, 0));
            }

            /// Eviction as the service uses it: up to a few requests
            /// unchanged since the last drain leave memory before each op;
            /// one is restored from the drained store before an event for
            /// it, or an expiry due for it, when the join does not hold it.
            /// That join behaves, and reports changes, as one that never
            /// evicts.
            #[test]
            fn evicting_unchanged_requests_changes_nothing(
                ops in proptest::collection::vec(
                    (op(), prop_oneof![3 => Just(0usize), 1 => 1usize..4]),
                    0..160,
                ),
            ) {
                let cfg = JoinConfig {
                    label_horizon_ms: H,
                    early_label_ttl_ms: TTL,
                    max_pending: 1_000,
                    max_pending_per_model: usize::MAX,
                    max_early_labels: usize::MAX,
                };
                let mut a: JoinState<Pay> = JoinState::new(cfg);
                let mut c: JoinState<Pay> = JoinState::new(cfg);
                let mut store: BTreeMap<String, StoredRequest<Pay>> = BTreeMap::new();
                let (mut now_a, mut now_c) = (0, 0);
                for (i, (op, evict)) in ops.iter().enumerate() {
                    a.evict_unchanged(*evict);
                    check_changes(&a);
                    let due: Vec<String> = match *op {
                        Op::Prediction { req, .. } | Op::Label { req, .. } => vec![format!("r{req}")],
                        Op::Expire { advance } => store
                            .iter()
                            .filter(|(_, r)| a.first_expiry(r) <= now_a + advance)
                            .map(|(k, _)| k.clone())
                            .collect(),
                        Op::Drain => vec![],
                    };
                    for k in due {
                        if !a.contains(&k) && !a.is_changed(&k) {
                            if let Some(r) = store.get(&k) {
                                a.restore(&k, r.clone());
                            }
                        }
                    }
                    let sa = apply(&mut a, &mut now_a, i, op);
                    let sc = apply(&mut c, &mut now_c, i, op);
                    if let Step::Drain(got) = &sa {
                        for (k, r) in got {
                            match r {
                                Some(r) => { store.insert(k.clone(), r.clone()); }
                                None => { store.remove(k); }
                            }
                        }
                    }
                    prop_assert_eq!(sa, sc, "op {} {:?}", i, op);
                    prop_assert_eq!(a.changed(), c.changed());
                    for r in 0..8 {
                        let k = format!("r{r}");
                        prop_assert_eq!(a.is_changed(&k), c.is_changed(&k));
                        prop_assert_eq!(
                            c.contains(&k),
                            a.contains(&k) || (!a.is_changed(&k) && store.contains_key(&k)),
                            "{}", k
                        );
                    }
                }
            }
        }
    }
}
