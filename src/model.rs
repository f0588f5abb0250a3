//! The domain types every stage shares: input events, what the join hands to
//! the metrics core, and the alert event. Plain data: no I/O, no async.
//!
//! The JSON field names are the public contract (DESIGN.md, `schemas/*.avsc`).

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One feature value of a prediction: the Avro union null/boolean/long/double/string.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureValue {
    /// Missing value (`null`).
    Null,
    /// A boolean, treated as categorical (`"true"` / `"false"`).
    Bool(bool),
    /// An integer, treated as numeric.
    Long(i64),
    /// A floating point number, treated as numeric (NaN / Inf count as integrity failures).
    Double(f64),
    /// A string, treated as categorical.
    String(String),
}

impl FeatureValue {
    /// The numeric value, when the value is numeric.
    #[inline]
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            FeatureValue::Long(v) => Some(*v as f64),
            FeatureValue::Double(v) => Some(*v),
            _ => None,
        }
    }

    /// True for `null`.
    #[inline]
    pub fn is_null(&self) -> bool {
        matches!(self, FeatureValue::Null)
    }
}

impl Serialize for FeatureValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            FeatureValue::Null => s.serialize_none(),
            FeatureValue::Bool(b) => s.serialize_bool(*b),
            FeatureValue::Long(v) => s.serialize_i64(*v),
            // JSON has no NaN: write non-finite numbers as null.
            FeatureValue::Double(v) if !v.is_finite() => s.serialize_none(),
            FeatureValue::Double(v) => s.serialize_f64(*v),
            FeatureValue::String(v) => s.serialize_str(v),
        }
    }
}

impl<'de> Deserialize<'de> for FeatureValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FeatureValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("null, a boolean, a number or a string")
            }
            fn visit_unit<E>(self) -> Result<FeatureValue, E> {
                Ok(FeatureValue::Null)
            }
            fn visit_none<E>(self) -> Result<FeatureValue, E> {
                Ok(FeatureValue::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<FeatureValue, D::Error> {
                FeatureValue::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<FeatureValue, E> {
                Ok(FeatureValue::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<FeatureValue, E> {
                Ok(FeatureValue::Long(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<FeatureValue, E> {
                Ok(match i64::try_from(v) {
                    Ok(v) => FeatureValue::Long(v),
                    Err(_) => FeatureValue::Double(v as f64),
                })
            }
            fn visit_f64<E>(self, v: f64) -> Result<FeatureValue, E> {
                Ok(FeatureValue::Double(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<FeatureValue, E> {
                Ok(FeatureValue::String(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<FeatureValue, E> {
                Ok(FeatureValue::String(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// An ordered string-keyed map kept as a vector: events carry a few dozen
/// entries at most, and a vector is cheaper to build and walk than a hash map.
/// Serialized as a JSON object / Avro map.
#[derive(Debug, Clone, PartialEq)]
pub struct Entries<V>(pub Vec<(String, V)>);

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Entries(Vec::new())
    }
}

impl<V> Entries<V> {
    /// The value of `key`, if present (first occurrence).
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// Iterates over the entries in their original order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V> FromIterator<(String, V)> for Entries<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        Entries(iter.into_iter().collect())
    }
}

impl<V: Serialize> Serialize for Entries<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E>(self) -> Result<Entries<V>, E> {
                Ok(Entries(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Entries<V>, A::Error> {
                let mut out = Vec::with_capacity(a.size_hint().unwrap_or(8));
                while let Some((k, v)) = a.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_any(EntriesVisitor(std::marker::PhantomData))
    }
}

/// One inference of one model (topic `predictions`).
///
/// Unknown fields are ignored (as Avro schema resolution does), so producers
/// can add fields without their events being dead-lettered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PredictionEvent {
    /// Join key shared with the ground-truth event.
    pub request_id: String,
    /// The model that scored the request.
    pub model_id: String,
    /// The model version that scored the request.
    pub model_version: String,
    /// Event time, milliseconds since the Unix epoch (UTC).
    pub timestamp: i64,
    /// Input features by name.
    #[serde(default)]
    pub features: Entries<FeatureValue>,
    /// Predicted class (classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_label: Option<String>,
    /// Predicted value (regression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_value: Option<f64>,
    /// Positive-class probability (binary classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// Probability per class (multiclass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_probabilities: Option<Entries<f64>>,
    /// Slicing dimensions, e.g. `country`.
    #[serde(default)]
    pub segments: Entries<String>,
    /// Inference latency in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

/// The true outcome of a request, usually known much later (topic `ground-truth`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GroundTruthEvent {
    /// Join key shared with the prediction event(s).
    pub request_id: String,
    /// When the outcome became known, milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// True class (classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_label: Option<String>,
    /// True value (regression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_value: Option<f64>,
}

/// Either input event, as decoded from one Kafka message.
#[derive(Debug, Clone, PartialEq)]
pub enum InputEvent {
    /// A prediction.
    Prediction(PredictionEvent),
    /// A ground-truth label.
    GroundTruth(GroundTruthEvent),
}

/// What the join keeps of a prediction while it waits for its label: only what
/// the performance metrics need, so pending state stays small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionOutcome {
    /// Positive-class probability.
    pub score: Option<f64>,
    /// Predicted class.
    pub predicted_label: Option<Box<str>>,
    /// Predicted value.
    pub predicted_value: Option<f64>,
}

impl PredictionOutcome {
    /// The outcome part of a prediction event.
    pub fn of(p: &PredictionEvent) -> Self {
        PredictionOutcome {
            score: p.score,
            predicted_label: p.predicted_label.as_deref().map(Box::from),
            predicted_value: p.predicted_value,
        }
    }
}

/// The label part of a ground-truth event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// True class.
    pub actual_label: Option<Box<str>>,
    /// True value.
    pub actual_value: Option<f64>,
    /// When the label was produced (ms).
    pub timestamp: i64,
}

impl Label {
    /// The label part of a ground-truth event.
    pub fn of(g: &GroundTruthEvent) -> Self {
        Label {
            actual_label: g.actual_label.as_deref().map(Box::from),
            actual_value: g.actual_value,
            timestamp: g.timestamp,
        }
    }
}

/// Alert status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    /// The condition holds.
    Firing,
    /// The condition no longer holds.
    Resolved,
}

impl AlertStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
        }
    }
}

/// Alert severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth a look.
    #[default]
    Warning,
    /// Act now.
    Critical,
}

impl Severity {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// An alert, as published to the alerts topic (`schemas/AlertEvent.avsc`) and
/// stored in the `alerts` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// Deterministic: the same rule, model, version, segment, feature and window give the same id.
    pub alert_id: String,
    /// Rule name.
    pub rule: String,
    /// firing | resolved.
    pub status: AlertStatus,
    /// warning | critical.
    pub severity: Severity,
    /// Model id.
    pub model_id: String,
    /// Model version.
    pub model_version: String,
    /// `''` for all traffic, else `key=value`.
    pub segment: String,
    /// Feature, for per-feature metrics.
    pub feature: Option<String>,
    /// Metric name (DESIGN.md).
    pub metric: String,
    /// Observed value.
    pub value: f64,
    /// Threshold of the rule.
    pub threshold: f64,
    /// Business baseline, when the rule compares with one.
    pub baseline: Option<f64>,
    /// p-value of the statistic, when it has one.
    pub p_value: Option<f64>,
    /// Window start, ms since the epoch.
    pub window_start: i64,
    /// Window end (exclusive), ms since the epoch.
    pub window_end: i64,
    /// When the alert was raised, ms since the epoch.
    pub fired_at: i64,
    /// Human-readable explanation.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prediction_json_round_trip_keeps_feature_types_and_order() {
        let json = r#"{"request_id":"r1","model_id":"m","model_version":"v1","timestamp":1700000000000,
            "features":{"age":42,"income":1234.5,"country":"DE","vip":true,"missing":null},
            "score":0.8,"segments":{"country":"DE"},"latency_ms":3.5}"#;
        let p: PredictionEvent = serde_json::from_str(json).unwrap();
        assert_eq!(
            p.features.0,
            vec![
                ("age".to_string(), FeatureValue::Long(42)),
                ("income".to_string(), FeatureValue::Double(1234.5)),
                ("country".to_string(), FeatureValue::String("DE".into())),
                ("vip".to_string(), FeatureValue::Bool(true)),
                ("missing".to_string(), FeatureValue::Null),
            ]
        );
        assert_eq!(p.segments.get("country").map(String::as_str), Some("DE"));
        let back: PredictionEvent =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let json =
            r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"extra":1}"#;
        let p = serde_json::from_str::<PredictionEvent>(json).unwrap();
        assert_eq!(p.request_id, "r");
        assert_eq!(p.timestamp, 1);
    }
}

/// How often each input-driven cap of `[limits]` was hit (the key is the
/// setting's name), for the `limit_hits` counter and `__service__` rows.
/// A hit is one value folded, left out or refused because of the cap.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitHits {
    /// Models folded into `__other__`.
    pub max_models: u64,
    /// Versions folded into `__other__`.
    pub max_versions_per_model: u64,
    /// Segment values folded into `key=__other__`.
    pub max_segment_values: u64,
    /// Segment keys left out of an event's segments.
    pub max_segment_keys: u64,
    /// Features left out of a reference profile.
    pub max_features: u64,
    /// Categories left out of a reference profile being built.
    pub max_reference_categories: u64,
    /// Pending predictions expired early for room.
    pub max_pending: u64,
    /// Predictions of one version not kept waiting for their label.
    pub max_pending_per_model: u64,
    /// Early labels made orphans early for room.
    pub max_early_labels: u64,
    /// Alert series that found no room.
    pub max_alert_series: u64,
}

impl LimitHits {
    /// (setting name, hits), every cap.
    pub fn entries(&self) -> [(&'static str, u64); 10] {
        [
            ("max_models", self.max_models),
            ("max_versions_per_model", self.max_versions_per_model),
            ("max_segment_values", self.max_segment_values),
            ("max_segment_keys", self.max_segment_keys),
            ("max_features", self.max_features),
            ("max_reference_categories", self.max_reference_categories),
            ("max_pending", self.max_pending),
            ("max_pending_per_model", self.max_pending_per_model),
            ("max_early_labels", self.max_early_labels),
            ("max_alert_series", self.max_alert_series),
        ]
    }

    /// The sum of two counts, cap by cap.
    pub fn plus(&self, o: &LimitHits) -> LimitHits {
        LimitHits {
            max_models: self.max_models + o.max_models,
            max_versions_per_model: self.max_versions_per_model + o.max_versions_per_model,
            max_segment_values: self.max_segment_values + o.max_segment_values,
            max_segment_keys: self.max_segment_keys + o.max_segment_keys,
            max_features: self.max_features + o.max_features,
            max_reference_categories: self.max_reference_categories + o.max_reference_categories,
            max_pending: self.max_pending + o.max_pending,
            max_pending_per_model: self.max_pending_per_model + o.max_pending_per_model,
            max_early_labels: self.max_early_labels + o.max_early_labels,
            max_alert_series: self.max_alert_series + o.max_alert_series,
        }
    }
}
