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

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use ahash::AHashMap;

use crate::model::Label;

/// Timing of the join, in milliseconds of event time.
#[derive(Debug, Clone, Copy)]
pub struct JoinConfig {
    /// How long a prediction waits for its label.
    pub label_horizon_ms: i64,
    /// How long a label waits for its prediction.
    pub early_label_ttl_ms: i64,
    /// Most pending requests; beyond it the one expiring soonest is expired early.
    pub max_pending: usize,
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
}

struct PendingRequest<P> {
    predictions: Vec<PendingPrediction<P>>,
    /// The latest expiry among the predictions (the request is expired entry by entry).
    expires_at: i64,
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
    /// Expiry queue: (expires_at, side, key). Entries may be stale (the key
    /// matched or expires later); stale entries are skipped when popped.
    queue: BinaryHeap<Reverse<(i64, Side, Arc<str>)>>,
    pending_predictions: usize,
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
        }
    }

    /// Predictions waiting for a label.
    pub fn pending_predictions(&self) -> usize {
        self.pending_predictions
    }

    /// Labels waiting for (more) predictions.
    pub fn early_labels(&self) -> usize {
        self.early.len()
    }

    /// True when a prediction of `model` for `request_id` is known (pending,
    /// or already completed by a label still held): inserting it again would
    /// be a duplicate.
    pub fn has_prediction(&self, request_id: &str, model: u32) -> bool {
        self.pending
            .get(request_id)
            .is_some_and(|r| r.predictions.iter().any(|p| p.model == model))
            || self
                .early
                .get(request_id)
                .is_some_and(|e| e.matched_models.contains(&model))
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
        if let Some(early) = self.early.get_mut(request_id) {
            if early.matched_models.contains(&model) {
                return PredictionInsert::Duplicate;
            }
            early.matched_models.push(model);
            out.push(Joined::Matched {
                payload,
                prediction_ts: ts,
                label: early.label.clone(),
            });
            return PredictionInsert::Matched;
        }
        let expires_at = ts.saturating_add(self.cfg.label_horizon_ms);
        if let Some(req) = self.pending.get_mut(request_id) {
            if req.predictions.iter().any(|p| p.model == model) {
                return PredictionInsert::Duplicate;
            }
            req.predictions.push(PendingPrediction { model, ts, payload });
            self.pending_predictions += 1;
            if expires_at > req.expires_at {
                req.expires_at = expires_at;
                let key = self
                    .pending
                    .get_key_value(request_id)
                    .map(|(k, _)| k.clone())
                    .expect("key present");
                self.queue.push(Reverse((expires_at, Side::Prediction, key)));
            }
            return PredictionInsert::Pending;
        }
        if self.pending_predictions >= self.cfg.max_pending {
            self.evict_one(out);
        }
        let key: Arc<str> = Arc::from(request_id);
        self.queue
            .push(Reverse((expires_at, Side::Prediction, key.clone())));
        self.pending.insert(
            key,
            PendingRequest {
                predictions: vec![PendingPrediction { model, ts, payload }],
                expires_at,
            },
        );
        self.pending_predictions += 1;
        PredictionInsert::Pending
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
        let expires_at = label.timestamp.saturating_add(self.cfg.early_label_ttl_ms);
        let (key, matched_models, n) = match self.pending.remove_entry(request_id) {
            Some((key, req)) => {
                let n = req.predictions.len();
                self.pending_predictions -= n;
                let models = req.predictions.iter().map(|p| p.model).collect();
                for p in req.predictions {
                    out.push(Joined::Matched {
                        payload: p.payload,
                        prediction_ts: p.ts,
                        label: label.clone(),
                    });
                }
                (key, models, n)
            }
            None => (Arc::from(request_id), Vec::new(), 0),
        };
        // A matched label is kept until its TTL too, so sibling predictions
        // (other models scoring the same request) arriving later still match.
        self.queue.push(Reverse((expires_at, Side::Label, key.clone())));
        self.early.insert(
            key,
            EarlyLabel {
                label,
                expires_at,
                matched_models,
            },
        );
        if n > 0 {
            LabelInsert::Matched(n)
        } else {
            LabelInsert::Early
        }
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
            self.expire_entry(at, side, &key, now, out);
        }
    }

    fn expire_entry(
        &mut self,
        at: i64,
        side: Side,
        key: &Arc<str>,
        now: i64,
        out: &mut Vec<Joined<P>>,
    ) {
        match side {
            Side::Prediction => {
                let Some(req) = self.pending.get_mut(key) else {
                    return;
                };
                let horizon = self.cfg.label_horizon_ms;
                let before = req.predictions.len();
                let mut i = 0;
                while i < req.predictions.len() {
                    if req.predictions[i].ts.saturating_add(horizon) <= now.max(at) {
                        let p = req.predictions.swap_remove(i);
                        out.push(Joined::Expired {
                            payload: p.payload,
                            prediction_ts: p.ts,
                        });
                    } else {
                        i += 1;
                    }
                }
                self.pending_predictions -= before - req.predictions.len();
                if req.predictions.is_empty() {
                    self.pending.remove(key);
                }
            }
            Side::Label => {
                if let Some(e) = self.early.get(key) {
                    if e.expires_at <= at {
                        let e = self.early.remove(key).expect("present");
                        if e.matched_models.is_empty() {
                            out.push(Joined::Orphan { label: e.label });
                        }
                    }
                }
            }
        }
    }

    /// Expires the request that would expire soonest (memory cap reached).
    fn evict_one(&mut self, out: &mut Vec<Joined<P>>) {
        while let Some(Reverse((_, side, key))) = self.queue.pop() {
            if side == Side::Prediction {
                if let Some(req) = self.pending.remove(&key) {
                    self.pending_predictions -= req.predictions.len();
                    for p in req.predictions {
                        out.push(Joined::Expired {
                            payload: p.payload,
                            prediction_ts: p.ts,
                        });
                    }
                    return;
                }
            } else if let Some(e) = self.early.remove(&key) {
                if e.matched_models.is_empty() {
                    out.push(Joined::Orphan { label: e.label });
                }
            }
        }
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
        assert_eq!(j.insert_prediction("r1", 0, 10, "p", &mut out), PredictionInsert::Pending);
        assert!(out.is_empty());
        assert_eq!(j.pending_predictions(), 1);
        assert_eq!(j.insert_label("r1", label(500, "1"), &mut out), LabelInsert::Matched(1));
        assert_eq!(j.pending_predictions(), 0);
        match &out[..] {
            [Joined::Matched { payload, prediction_ts, label }] => {
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
        assert_eq!(j.insert_label("r1", label(50, "0"), &mut out), LabelInsert::Early);
        assert_eq!(j.insert_prediction("r1", 0, 40, "p", &mut out), PredictionInsert::Matched);
        assert_eq!(out.len(), 1);
        out.clear();
        assert_eq!(j.insert_label("r2", label(50, "0"), &mut out), LabelInsert::Early);
        j.expire(50 + TTL - 1, &mut out);
        assert!(out.is_empty(), "not yet due");
        j.expire(50 + TTL, &mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Joined::Orphan { label } if label.timestamp == 50));
        assert_eq!(j.early_labels(), 0);
        // A prediction after the label's TTL no longer matches it.
        out.clear();
        assert_eq!(j.insert_prediction("r2", 0, 60, "late", &mut out), PredictionInsert::Pending);
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
        assert_eq!(j.insert_label("r1", label(2_000, "1"), &mut out), LabelInsert::Early);
    }

    #[test]
    fn one_label_completes_every_model_of_the_request() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 0, 10, "champion", &mut out);
        j.insert_prediction("r1", 1, 10, "challenger", &mut out);
        assert_eq!(j.pending_predictions(), 2);
        assert_eq!(j.insert_label("r1", label(20, "1"), &mut out), LabelInsert::Matched(2));
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
        assert_eq!(j.insert_prediction("r1", 2, 12, "shadow", &mut out), PredictionInsert::Matched);
        // ...but the champion again is a duplicate.
        assert_eq!(j.insert_prediction("r1", 0, 12, "again", &mut out), PredictionInsert::Duplicate);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn duplicates_are_counted_and_the_first_kept() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 7, 10, "first", &mut out);
        assert_eq!(j.insert_prediction("r1", 7, 11, "second", &mut out), PredictionInsert::Duplicate);
        assert_eq!(j.pending_predictions(), 1);
        j.insert_label("r1", label(20, "1"), &mut out);
        assert!(matches!(&out[..], [Joined::Matched { payload: "first", .. }]));
        assert_eq!(j.insert_label("r1", label(21, "0"), &mut out), LabelInsert::Duplicate);
    }

    #[test]
    fn sibling_predictions_expire_individually() {
        let mut j = join();
        let mut out = vec![];
        j.insert_prediction("r1", 0, 0, "old", &mut out);
        j.insert_prediction("r1", 1, 500, "new", &mut out);
        j.expire(H, &mut out);
        assert_eq!(out, vec![Joined::Expired { payload: "old", prediction_ts: 0 }]);
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
        });
        let mut out = vec![];
        j.insert_prediction("a", 0, 1, 1, &mut out);
        j.insert_prediction("b", 0, 2, 2, &mut out);
        j.insert_prediction("c", 0, 3, 3, &mut out);
        assert_eq!(out, vec![Joined::Expired { payload: 1, prediction_ts: 1 }]);
        assert_eq!(j.pending_predictions(), 2);
    }
}
