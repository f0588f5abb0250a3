//! The bounds one event must keep, checked after decoding and before any
//! state is touched: its size (features, segment keys, string lengths) and
//! its event time against the wall clock. An event beyond them is a dead
//! letter (kind `limit` or `timestamp`) with a reason that names the limit
//! and the size found, never the producer's text itself (the reason goes
//! into a Kafka header and a log line).
//!
//! Pure: the wall clock is an argument.

use std::time::Duration;

use crate::config::LimitsConfig;
use crate::ingest::decode::DecodeError;
use crate::model::{FeatureValue, GroundTruthEvent, InputEvent, PredictionEvent};

/// The per-event bounds of `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct EventBounds {
    /// Most features per event (and entries of `class_probabilities`).
    pub max_features: usize,
    /// Most segment keys per event.
    pub max_segment_keys: usize,
    /// Longest string of an event, in bytes.
    pub max_identifier_bytes: usize,
    /// How far ahead of the wall clock an event may be, ms.
    pub max_future_skew_ms: i64,
    /// How far behind the wall clock an event may be, ms.
    pub max_event_age_ms: i64,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl EventBounds {
    /// The bounds of a configuration.
    pub fn new(l: &LimitsConfig) -> Self {
        EventBounds {
            max_features: l.max_features,
            max_segment_keys: l.max_segment_keys,
            max_identifier_bytes: l.max_identifier_bytes,
            max_future_skew_ms: millis(l.max_future_skew),
            max_event_age_ms: millis(l.max_event_age),
        }
    }

    /// Checks `ev` against the bounds at wall-clock time `wall_ms`.
    pub fn check(&self, ev: &InputEvent, wall_ms: i64) -> Result<(), DecodeError> {
        match ev {
            InputEvent::Prediction(p) => {
                self.check_prediction(p)?;
                self.check_time(p.timestamp, wall_ms)
            }
            InputEvent::GroundTruth(g) => {
                self.check_ground_truth(g)?;
                self.check_time(g.timestamp, wall_ms)
            }
        }
    }

    /// Event time within `[wall - max_event_age, wall + max_future_skew]`:
    /// one event dated in the future would move the watermark past all
    /// live traffic (and, being checkpointed, keep it there across
    /// restarts); one dated decades back would open windows and
    /// ClickHouse partitions nobody asked for.
    fn check_time(&self, ts: i64, wall_ms: i64) -> Result<(), DecodeError> {
        if ts > wall_ms.saturating_add(self.max_future_skew_ms) {
            return Err(DecodeError::Timestamp {
                limit: "max_future_skew",
                detail: format!(
                    "timestamp {ts} is {} s ahead of the wall clock (limits.max_future_skew = {})",
                    (ts - wall_ms) / 1000,
                    fmt_ms(self.max_future_skew_ms)
                ),
            });
        }
        if ts < wall_ms.saturating_sub(self.max_event_age_ms) {
            return Err(DecodeError::Timestamp {
                limit: "max_event_age",
                detail: format!(
                    "timestamp {ts} is {} s behind the wall clock (limits.max_event_age = {})",
                    (wall_ms - ts) / 1000,
                    fmt_ms(self.max_event_age_ms)
                ),
            });
        }
        Ok(())
    }

    fn check_prediction(&self, p: &PredictionEvent) -> Result<(), DecodeError> {
        self.id("request_id", &p.request_id)?;
        self.id("model_id", &p.model_id)?;
        self.id("model_version", &p.model_version)?;
        count(
            "features",
            p.features.len(),
            "max_features",
            self.max_features,
        )?;
        for (name, v) in p.features.iter() {
            self.id("a feature name", name)?;
            if let FeatureValue::String(s) = v {
                self.id("a string feature value", s)?;
            }
        }
        if let Some(l) = &p.predicted_label {
            self.id("predicted_label", l)?;
        }
        if let Some(cp) = &p.class_probabilities {
            count(
                "class_probabilities",
                cp.len(),
                "max_features",
                self.max_features,
            )?;
            for (class, _) in cp.iter() {
                self.id("a class_probabilities class", class)?;
            }
        }
        count(
            "segments",
            p.segments.len(),
            "max_segment_keys",
            self.max_segment_keys,
        )?;
        for (k, v) in p.segments.iter() {
            self.id("a segment key", k)?;
            self.id("a segment value", v)?;
        }
        Ok(())
    }

    fn check_ground_truth(&self, g: &GroundTruthEvent) -> Result<(), DecodeError> {
        self.id("request_id", &g.request_id)?;
        if let Some(l) = &g.actual_label {
            self.id("actual_label", l)?;
        }
        Ok(())
    }

    fn id(&self, what: &str, s: &str) -> Result<(), DecodeError> {
        if s.len() > self.max_identifier_bytes {
            return Err(DecodeError::Limit {
                limit: "max_identifier_bytes",
                detail: format!(
                    "{what} of {} bytes, more than limits.max_identifier_bytes = {}",
                    s.len(),
                    self.max_identifier_bytes
                ),
            });
        }
        Ok(())
    }
}

fn count(field: &str, n: usize, limit: &'static str, max: usize) -> Result<(), DecodeError> {
    if n > max {
        return Err(DecodeError::Limit {
            limit,
            detail: format!("{field} has {n} entries, more than limits.{limit} = {max}"),
        });
    }
    Ok(())
}

fn fmt_ms(ms: i64) -> String {
    humantime::format_duration(Duration::from_millis(ms.max(0) as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Entries;

    const NOW: i64 = 1_800_000_000_000;

    fn bounds() -> EventBounds {
        EventBounds {
            max_features: 3,
            max_segment_keys: 2,
            max_identifier_bytes: 8,
            max_future_skew_ms: 3_600_000,
            max_event_age_ms: 86_400_000,
        }
    }

    fn prediction() -> PredictionEvent {
        PredictionEvent {
            request_id: "r1".into(),
            model_id: "m".into(),
            model_version: "v1".into(),
            timestamp: NOW,
            score: Some(0.5),
            features: Entries(vec![
                ("a".into(), FeatureValue::Double(1.0)),
                ("b".into(), FeatureValue::String("x".into())),
            ]),
            segments: Entries(vec![("country".into(), "de".into())]),
            ..Default::default()
        }
    }

    fn limit_of(r: Result<(), DecodeError>) -> (&'static str, String) {
        match r {
            Err(DecodeError::Limit { limit, detail }) => (limit, detail),
            other => panic!("expected a limit error, got {other:?}"),
        }
    }

    #[test]
    fn an_event_within_every_bound_passes() {
        let b = bounds();
        b.check(&InputEvent::Prediction(prediction()), NOW).unwrap();
        // The bounds are inclusive.
        let mut p = prediction();
        p.features.0.push(("c".into(), FeatureValue::Null));
        p.segments.0.push(("12345678".into(), "12345678".into()));
        b.check(&InputEvent::Prediction(p), NOW).unwrap();
    }

    #[test]
    fn each_size_bound_names_its_limit_and_the_size_not_the_text() {
        let b = bounds();
        let mut p = prediction();
        p.features.0.push(("c".into(), FeatureValue::Null));
        p.features.0.push(("d".into(), FeatureValue::Null));
        let (limit, detail) = limit_of(b.check(&InputEvent::Prediction(p), NOW));
        assert_eq!(limit, "max_features");
        assert_eq!(
            detail,
            "features has 4 entries, more than limits.max_features = 3"
        );

        let mut p = prediction();
        p.segments.0.push(("k2".into(), "x".into()));
        p.segments.0.push(("k3".into(), "x".into()));
        assert_eq!(
            limit_of(b.check(&InputEvent::Prediction(p), NOW)).0,
            "max_segment_keys"
        );

        let mut p = prediction();
        p.class_probabilities = Some(Entries((0..4).map(|i| (format!("c{i}"), 0.25)).collect()));
        assert_eq!(
            limit_of(b.check(&InputEvent::Prediction(p), NOW)).0,
            "max_features"
        );

        let hostile = "<!channel>".to_string();
        for place in 0..8 {
            let mut p = prediction();
            match place {
                0 => p.request_id = hostile.clone(),
                1 => p.model_id = hostile.clone(),
                2 => p.model_version = hostile.clone(),
                3 => p.features.0[0].0 = hostile.clone(),
                4 => p.features.0[1].1 = FeatureValue::String(hostile.clone()),
                5 => p.segments.0[0].0 = hostile.clone(),
                6 => p.segments.0[0].1 = hostile.clone(),
                _ => p.predicted_label = Some(hostile.clone()),
            }
            let (limit, detail) = limit_of(b.check(&InputEvent::Prediction(p), NOW));
            assert_eq!(limit, "max_identifier_bytes", "place {place}");
            assert!(detail.contains("of 10 bytes"), "{detail}");
            assert!(!detail.contains(&hostile), "{detail}");
        }
        let g = GroundTruthEvent {
            request_id: "r".into(),
            timestamp: NOW,
            actual_label: Some(hostile.clone()),
            ..Default::default()
        };
        assert_eq!(
            limit_of(b.check(&InputEvent::GroundTruth(g), NOW)).0,
            "max_identifier_bytes"
        );
    }

    #[test]
    fn event_time_is_bounded_on_both_sides_of_the_wall_clock() {
        let b = bounds();
        let at = |ts: i64| {
            let mut p = prediction();
            p.timestamp = ts;
            b.check(&InputEvent::Prediction(p), NOW)
        };
        at(NOW + 3_600_000).unwrap();
        at(NOW - 86_400_000).unwrap();
        let e = at(NOW + 3_600_001).unwrap_err();
        assert_eq!(e.kind(), "timestamp");
        assert!(e.to_string().contains("limits.max_future_skew = 1h"), "{e}");
        let e = at(NOW - 86_400_001).unwrap_err();
        assert_eq!(e.kind(), "timestamp");
        assert!(e.to_string().contains("limits.max_event_age = 1day"), "{e}");
        // Labels too.
        let g = GroundTruthEvent {
            request_id: "r".into(),
            timestamp: NOW - 86_400_001,
            actual_value: Some(1.0),
            ..Default::default()
        };
        assert_eq!(
            b.check(&InputEvent::GroundTruth(g), NOW)
                .unwrap_err()
                .kind(),
            "timestamp"
        );
    }
}
