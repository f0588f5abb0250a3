//! Message payload -> validated [`InputEvent`], and the reverse encoders.
//!
//! Owns the wire formats of the input topics (DESIGN.md, "Public contracts"):
//! JSON objects with the schema's field names, raw Avro datums written with
//! `schemas/*.avsc`, the Confluent wire format (`0x00` + big-endian schema id +
//! datum) and Avro single-object encoding (`C3 01` + CRC-64-AVRO fingerprint,
//! little-endian + datum). Also the Avro `AlertEvent` of the alerts topic.
//! Pure bytes in, values out: no Kafka, no I/O, no logging; every failure is a
//! [`DecodeError`] whose text is the dead-letter reason. Never panics on input.
//!
//! Confluent framing: the schema id is skipped, not looked up in a registry;
//! the datum is read with our own schema, so producers must register a schema
//! with the same fields in the same order (the `.avsc` in `schemas/`).

use std::fmt;
use std::sync::LazyLock;

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::avro;
use crate::config::Format;
use crate::model::{
    AlertEvent, Entries, FeatureValue, GroundTruthEvent, InputEvent, PredictionEvent,
};

/// The Avro schema of prediction events (`schemas/PredictionEvent.avsc`).
pub const PREDICTION_SCHEMA: &str = include_str!("../../schemas/PredictionEvent.avsc");
/// The Avro schema of ground-truth events (`schemas/GroundTruthEvent.avsc`).
pub const GROUND_TRUTH_SCHEMA: &str = include_str!("../../schemas/GroundTruthEvent.avsc");
/// The Avro schema of alert events (`schemas/AlertEvent.avsc`).
pub const ALERT_SCHEMA: &str = include_str!("../../schemas/AlertEvent.avsc");

/// First bytes of the Avro single-object encoding.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// First byte of the Confluent wire format.
pub const CONFLUENT_MAGIC: u8 = 0x00;

/// Exclusive upper bound of a valid event timestamp: 3000-01-01T00:00:00Z in ms.
pub const MAX_TIMESTAMP_MS: i64 = 32_503_680_000_000;

/// The three event schemas, parsed once, with their single-object fingerprints.
pub struct Schemas {
    /// `modelwatch.PredictionEvent`.
    pub prediction: Schema,
    /// `modelwatch.GroundTruthEvent`.
    pub ground_truth: Schema,
    /// `modelwatch.AlertEvent`.
    pub alert: Schema,
    /// CRC-64-AVRO fingerprint of the prediction schema, little-endian bytes as on the wire.
    pub prediction_fingerprint: [u8; 8],
    /// CRC-64-AVRO fingerprint of the ground-truth schema, little-endian bytes.
    pub ground_truth_fingerprint: [u8; 8],
    /// CRC-64-AVRO fingerprint of the alert schema, little-endian bytes.
    pub alert_fingerprint: [u8; 8],
}

fn parse_schema(name: &str, text: &str) -> Schema {
    // The texts are compiled in and checked by the tests: a failure here is a
    // build defect, not bad input.
    Schema::parse_str(text).unwrap_or_else(|e| panic!("schemas/{name}.avsc does not parse: {e}"))
}

fn fingerprint(schema: &Schema) -> [u8; 8] {
    let fp = schema.fingerprint::<Rabin>();
    let mut out = [0u8; 8];
    // Rabin yields exactly 8 bytes.
    out.copy_from_slice(&fp.bytes[..8]);
    out
}

/// The parsed schemas, built on first use.
pub static SCHEMAS: LazyLock<Schemas> = LazyLock::new(|| {
    let prediction = parse_schema("PredictionEvent", PREDICTION_SCHEMA);
    let ground_truth = parse_schema("GroundTruthEvent", GROUND_TRUTH_SCHEMA);
    let alert = parse_schema("AlertEvent", ALERT_SCHEMA);
    Schemas {
        prediction_fingerprint: fingerprint(&prediction),
        ground_truth_fingerprint: fingerprint(&ground_truth),
        alert_fingerprint: fingerprint(&alert),
        prediction,
        ground_truth,
        alert,
    }
});

/// Which input topic a message came from, hence which event type it must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The predictions topic: [`PredictionEvent`]s.
    Prediction,
    /// The ground-truth topic: [`GroundTruthEvent`]s.
    GroundTruth,
}

impl EventKind {
    /// Lowercase name used in error texts and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Prediction => "prediction",
            EventKind::GroundTruth => "ground-truth",
        }
    }

    fn other(self) -> EventKind {
        match self {
            EventKind::Prediction => EventKind::GroundTruth,
            EventKind::GroundTruth => EventKind::Prediction,
        }
    }

    fn fingerprint(self) -> [u8; 8] {
        match self {
            EventKind::Prediction => SCHEMAS.prediction_fingerprint,
            EventKind::GroundTruth => SCHEMAS.ground_truth_fingerprint,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The encoding a payload appears to use, judged from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// First non-whitespace byte is `{`.
    Json,
    /// First byte `0x00`.
    Confluent,
    /// First bytes `C3 01`.
    SingleObject,
    /// Anything else.
    RawAvro,
}

impl WireFormat {
    fn name(self) -> &'static str {
        match self {
            WireFormat::Json => "JSON",
            WireFormat::Confluent => "Confluent-framed Avro",
            WireFormat::SingleObject => "single-object Avro",
            WireFormat::RawAvro => "raw Avro",
        }
    }
}

/// Classifies `payload` by its first bytes (the `auto` format's rule).
///
/// Unambiguous for valid events: a raw datum starts with the zig-zag length
/// of `request_id`, which can be neither `{` (odd: negative) nor `0x00` (an
/// empty id) nor `C3 01` (negative).
pub fn sniff(payload: &[u8]) -> WireFormat {
    match payload {
        [CONFLUENT_MAGIC, ..] => WireFormat::Confluent,
        [0xC3, 0x01, ..] => WireFormat::SingleObject,
        _ => match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => WireFormat::Json,
            _ => WireFormat::RawAvro,
        },
    }
}

/// Why a payload was rejected. `Display` is the reason put in the dead-letter header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Zero bytes (or only whitespace).
    #[error("empty payload")]
    Empty,
    /// Not JSON, or JSON of the wrong shape.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// A malformed Avro datum (truncated, trailing bytes, bad union index, bad UTF-8).
    #[error("invalid Avro datum: {0}")]
    Avro(String),
    /// A Confluent frame shorter than its 5-byte header.
    #[error("Confluent frame of {0} bytes is shorter than its 5-byte header")]
    Framing(usize),
    /// A single-object header whose fingerprint is not our schema's.
    #[error("unknown single-object schema fingerprint {found} (the {kind} schema is {expected})")]
    Fingerprint {
        /// The fingerprint in the message, hex of the wire bytes.
        found: String,
        /// Our schema's fingerprint, hex of the wire bytes.
        expected: String,
        /// The event type the topic carries.
        kind: EventKind,
    },
    /// The payload's encoding is not the configured one.
    #[error("expected {expected}, got {found}")]
    Format {
        /// What the configuration allows.
        expected: &'static str,
        /// What the payload looks like.
        found: &'static str,
    },
    /// A well-formed event of the other type (e.g. a label on the predictions topic).
    #[error("{found} event on the {topic} topic")]
    WrongType {
        /// The event type found.
        found: EventKind,
        /// The event type the topic carries.
        topic: EventKind,
    },
    /// Decoded, but a field value is invalid.
    #[error("invalid event: {0}")]
    Validation(String),
}

impl DecodeError {
    /// Short stable label for counters and the dead-letter `kind` header.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::Json(_) => "json",
            DecodeError::Avro(_) => "avro",
            DecodeError::Framing(_) => "framing",
            DecodeError::Fingerprint { .. } => "fingerprint",
            DecodeError::Format { .. } => "format",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::Validation(_) => "validation",
        }
    }
}

impl From<avro::AvroError> for DecodeError {
    fn from(e: avro::AvroError) -> Self {
        DecodeError::Avro(e.0)
    }
}

fn invalid(msg: impl Into<String>) -> DecodeError {
    DecodeError::Validation(msg.into())
}

/// Decodes and validates the payloads of one consumer, in the configured format.
#[derive(Debug, Clone)]
pub struct Decoder {
    format: Format,
}

impl Decoder {
    /// A decoder for `format` (see [`Format`]; `auto` sniffs each payload).
    pub fn new(format: Format) -> Self {
        // Parse the schemas now rather than on the first message.
        LazyLock::force(&SCHEMAS);
        Decoder { format }
    }

    /// The configured format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Decodes and validates one message payload from the topic of `kind`.
    pub fn decode(&self, kind: EventKind, payload: &[u8]) -> Result<InputEvent, DecodeError> {
        if payload.iter().all(u8::is_ascii_whitespace) {
            return Err(DecodeError::Empty);
        }
        let wire = sniff(payload);
        let ev = match (self.format, wire) {
            (Format::Auto, WireFormat::Json) => {
                // A raw datum may start with whitespace bytes (a length of 16
                // or 5): if it is not JSON after all, give Avro a chance.
                let res = decode_json(kind, payload);
                match res {
                    Err(e @ DecodeError::Json(_)) if payload[0] != b'{' => {
                        decode_raw(kind, payload).map_err(|_| e)?
                    }
                    other => other?,
                }
            }
            (Format::Auto | Format::ConfluentAvro, WireFormat::Confluent) => {
                decode_confluent(kind, payload)?
            }
            (Format::Auto | Format::Avro, WireFormat::SingleObject) => {
                decode_single_object(kind, payload)?
            }
            (Format::Auto | Format::Avro, WireFormat::RawAvro) => decode_raw(kind, payload)?,
            (Format::Json, WireFormat::Confluent | WireFormat::SingleObject) => {
                return Err(DecodeError::Format {
                    expected: "JSON",
                    found: wire.name(),
                })
            }
            (Format::Json, _) => decode_json(kind, payload)?,
            (Format::Avro, _) => {
                return Err(DecodeError::Format {
                    expected: "raw or single-object Avro",
                    found: wire.name(),
                })
            }
            (Format::ConfluentAvro, _) => {
                return Err(DecodeError::Format {
                    expected: "Confluent-framed Avro",
                    found: wire.name(),
                })
            }
        };
        validate(&ev)?;
        Ok(ev)
    }
}

/// A raw datum of the topic's type; on failure, a datum of the other type
/// that decodes and validates is reported as such.
fn decode_raw(kind: EventKind, datum: &[u8]) -> Result<InputEvent, DecodeError> {
    match read_datum(kind, datum) {
        Ok(ev) => Ok(ev),
        Err(e) => match read_datum(kind.other(), datum) {
            Ok(other) if validate(&other).is_ok() => Err(DecodeError::WrongType {
                found: kind.other(),
                topic: kind,
            }),
            _ => Err(e.into()),
        },
    }
}

fn read_datum(kind: EventKind, datum: &[u8]) -> Result<InputEvent, avro::AvroError> {
    match kind {
        EventKind::Prediction => avro::read_prediction(datum).map(InputEvent::Prediction),
        EventKind::GroundTruth => avro::read_ground_truth(datum).map(InputEvent::GroundTruth),
    }
}

fn decode_confluent(kind: EventKind, payload: &[u8]) -> Result<InputEvent, DecodeError> {
    // 0x00, schema id (big-endian u32, not looked up: see the module doc), datum.
    match payload.get(5..) {
        Some(datum) => decode_raw(kind, datum),
        None => Err(DecodeError::Framing(payload.len())),
    }
}

fn decode_single_object(kind: EventKind, payload: &[u8]) -> Result<InputEvent, DecodeError> {
    let (Some(fp), Some(datum)) = (payload.get(2..10), payload.get(10..)) else {
        return Err(DecodeError::Avro(format!(
            "single-object header of {} bytes is shorter than 10",
            payload.len()
        )));
    };
    if fp == kind.fingerprint() {
        return read_datum(kind, datum).map_err(Into::into);
    }
    if fp == kind.other().fingerprint() {
        return Err(DecodeError::WrongType {
            found: kind.other(),
            topic: kind,
        });
    }
    Err(DecodeError::Fingerprint {
        found: hex::encode(fp),
        expected: hex::encode(kind.fingerprint()),
        kind,
    })
}

// ---------------------------------------------------------------- validation

fn check_timestamp(ts: i64) -> Result<(), DecodeError> {
    if ts > 0 && ts < MAX_TIMESTAMP_MS {
        Ok(())
    } else {
        Err(invalid(format!(
            "timestamp {ts} out of range (1..{MAX_TIMESTAMP_MS} ms since the epoch)"
        )))
    }
}

fn check_finite(field: &str, v: Option<f64>) -> Result<(), DecodeError> {
    match v {
        Some(x) if !x.is_finite() => Err(invalid(format!("{field} {x} is not finite"))),
        _ => Ok(()),
    }
}

fn check_probability(field: &str, v: f64) -> Result<(), DecodeError> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(format!("{field} {v} out of range [0, 1]")))
    }
}

fn check_non_empty(field: &str, v: &str) -> Result<(), DecodeError> {
    if v.is_empty() {
        Err(invalid(format!("{field} is empty")))
    } else {
        Ok(())
    }
}

/// Checks the field rules of an event (the ones the encoding cannot express).
pub fn validate(ev: &InputEvent) -> Result<(), DecodeError> {
    match ev {
        InputEvent::Prediction(p) => validate_prediction(p),
        InputEvent::GroundTruth(g) => validate_ground_truth(g),
    }
}

fn validate_prediction(p: &PredictionEvent) -> Result<(), DecodeError> {
    check_non_empty("request_id", &p.request_id)?;
    check_non_empty("model_id", &p.model_id)?;
    check_non_empty("model_version", &p.model_version)?;
    check_timestamp(p.timestamp)?;
    check_finite("predicted_value", p.predicted_value)?;
    if let Some(s) = p.score {
        check_probability("score", s)?;
    }
    if let Some(cp) = &p.class_probabilities {
        for (class, v) in cp.iter() {
            check_probability(&format!("class_probabilities.{class}"), *v)?;
        }
    }
    check_finite("latency_ms", p.latency_ms)?;
    if let Some(l) = p.latency_ms {
        if l < 0.0 {
            return Err(invalid(format!("latency_ms {l} is negative")));
        }
    }
    if p.predicted_label.is_none()
        && p.predicted_value.is_none()
        && p.score.is_none()
        && p.class_probabilities.is_none()
    {
        return Err(invalid(
            "prediction has none of predicted_label, predicted_value, score, class_probabilities",
        ));
    }
    Ok(())
}

fn validate_ground_truth(g: &GroundTruthEvent) -> Result<(), DecodeError> {
    check_non_empty("request_id", &g.request_id)?;
    check_timestamp(g.timestamp)?;
    check_finite("actual_value", g.actual_value)?;
    if g.actual_label.is_none() && g.actual_value.is_none() {
        return Err(invalid(
            "ground-truth event has neither actual_label nor actual_value",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------- JSON

/// Any JSON value, shallow: scalars kept, arrays skipped, objects kept one
/// level deep as entries. Lets the conversion name the field and the type it
/// found instead of surfacing serde's generic type errors.
#[derive(Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Array,
    Object(Vec<(String, Json)>),
}

impl Json {
    fn type_name(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "boolean",
            Json::Int(_) | Json::UInt(_) | Json::Float(_) => "number",
            Json::Str(_) => "string",
            Json::Array => "array",
            Json::Object(_) => "object",
        }
    }

    fn number(&self) -> Option<f64> {
        match *self {
            Json::Int(i) => Some(i as f64),
            Json::UInt(u) => Some(u as f64),
            Json::Float(f) => Some(f),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
                Json::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(match i64::try_from(v) {
                    Ok(i) => Json::Int(i),
                    Err(_) => Json::UInt(v),
                })
            }
            fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
                Ok(Json::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Json::Array)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut out = Vec::with_capacity(a.size_hint().unwrap_or(16).min(256));
                while let Some(k) = a.next_key::<String>()? {
                    let v = a.next_value::<Json>()?;
                    out.push((k, v));
                }
                Ok(Json::Object(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// The fields of both event types; which ones must be present is checked
/// after parsing, so errors can say which field is wrong and how. Unknown
/// fields are ignored, as Avro schema resolution would.
#[derive(Deserialize)]
#[serde(expecting = "a JSON object")]
struct JsonEvent {
    request_id: Option<Json>,
    model_id: Option<Json>,
    model_version: Option<Json>,
    timestamp: Option<Json>,
    features: Option<Json>,
    predicted_label: Option<Json>,
    predicted_value: Option<Json>,
    score: Option<Json>,
    class_probabilities: Option<Json>,
    segments: Option<Json>,
    latency_ms: Option<Json>,
    actual_label: Option<Json>,
    actual_value: Option<Json>,
}

/// `Some(Json::Null)` cannot occur: serde maps `null` to `None` for an `Option`.
fn present(v: &Option<Json>) -> bool {
    v.is_some()
}

fn json_string(field: &str, v: Option<Json>) -> Result<String, DecodeError> {
    match v {
        Some(Json::Str(s)) => Ok(s),
        None => Err(invalid(format!("{field} is missing"))),
        Some(other) => Err(invalid(format!(
            "{field}: expected string, got {}",
            other.type_name()
        ))),
    }
}

fn json_opt_string(field: &str, v: Option<Json>) -> Result<Option<String>, DecodeError> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Str(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(format!(
            "{field}: expected string or null, got {}",
            other.type_name()
        ))),
    }
}

fn json_opt_number(field: &str, v: Option<Json>) -> Result<Option<f64>, DecodeError> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(j) => match j.number() {
            Some(x) => Ok(Some(x)),
            None => Err(invalid(format!(
                "{field}: expected number or null, got {}",
                j.type_name()
            ))),
        },
    }
}

fn json_timestamp(v: Option<Json>) -> Result<i64, DecodeError> {
    match v {
        Some(Json::Int(i)) => Ok(i),
        Some(Json::UInt(u)) => Err(invalid(format!(
            "timestamp {u} out of range (1..{MAX_TIMESTAMP_MS} ms since the epoch)"
        ))),
        // 1.7e12 is an integer written in exponent form; 1.5 is not.
        Some(Json::Float(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        Some(Json::Float(f)) => Err(invalid(format!(
            "timestamp {f} is not an integer number of milliseconds"
        ))),
        None => Err(invalid("timestamp is missing")),
        Some(other) => Err(invalid(format!(
            "timestamp: expected integer milliseconds, got {}",
            other.type_name()
        ))),
    }
}

fn json_object(field: &str, v: Option<Json>) -> Result<Option<Vec<(String, Json)>>, DecodeError> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Object(entries)) => Ok(Some(entries)),
        Some(other) => Err(invalid(format!(
            "{field}: expected object, got {}",
            other.type_name()
        ))),
    }
}

fn json_features(v: Option<Json>) -> Result<Entries<FeatureValue>, DecodeError> {
    let entries = json_object("features", v)?.unwrap_or_default();
    let mut out = Vec::with_capacity(entries.len());
    for (name, v) in entries {
        let fv = match v {
            Json::Null => FeatureValue::Null,
            Json::Bool(b) => FeatureValue::Bool(b),
            Json::Int(i) => FeatureValue::Long(i),
            Json::UInt(u) => FeatureValue::Double(u as f64),
            Json::Float(f) => FeatureValue::Double(f),
            Json::Str(s) => FeatureValue::String(s),
            other @ (Json::Array | Json::Object(_)) => {
                return Err(invalid(format!(
                    "features.{name}: expected null|boolean|number|string, got {}",
                    other.type_name()
                )))
            }
        };
        out.push((name, fv));
    }
    Ok(Entries(out))
}

fn json_class_probabilities(v: Option<Json>) -> Result<Option<Entries<f64>>, DecodeError> {
    let Some(entries) = json_object("class_probabilities", v)? else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(entries.len());
    for (class, v) in entries {
        match v.number() {
            Some(x) => out.push((class, x)),
            None => {
                return Err(invalid(format!(
                    "class_probabilities.{class}: expected number, got {}",
                    v.type_name()
                )))
            }
        }
    }
    Ok(Some(Entries(out)))
}

fn json_segments(v: Option<Json>) -> Result<Entries<String>, DecodeError> {
    let entries = json_object("segments", v)?.unwrap_or_default();
    let mut out = Vec::with_capacity(entries.len());
    for (key, v) in entries {
        match v {
            Json::Str(s) => out.push((key, s)),
            other => {
                return Err(invalid(format!(
                    "segments.{key}: expected string, got {}",
                    other.type_name()
                )))
            }
        }
    }
    Ok(Entries(out))
}

fn decode_json(kind: EventKind, payload: &[u8]) -> Result<InputEvent, DecodeError> {
    let j: JsonEvent =
        serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?;
    let has_outcome = present(&j.predicted_label)
        || present(&j.predicted_value)
        || present(&j.score)
        || present(&j.class_probabilities);
    let has_actual = present(&j.actual_label) || present(&j.actual_value);
    match kind {
        EventKind::Prediction => {
            if !has_outcome && has_actual && !present(&j.model_id) {
                return Err(DecodeError::WrongType {
                    found: EventKind::GroundTruth,
                    topic: kind,
                });
            }
            Ok(InputEvent::Prediction(PredictionEvent {
                request_id: json_string("request_id", j.request_id)?,
                model_id: json_string("model_id", j.model_id)?,
                model_version: json_string("model_version", j.model_version)?,
                timestamp: json_timestamp(j.timestamp)?,
                features: json_features(j.features)?,
                predicted_label: json_opt_string("predicted_label", j.predicted_label)?,
                predicted_value: json_opt_number("predicted_value", j.predicted_value)?,
                score: json_opt_number("score", j.score)?,
                class_probabilities: json_class_probabilities(j.class_probabilities)?,
                segments: json_segments(j.segments)?,
                latency_ms: json_opt_number("latency_ms", j.latency_ms)?,
            }))
        }
        EventKind::GroundTruth => {
            if !has_actual && (has_outcome || present(&j.model_id)) {
                return Err(DecodeError::WrongType {
                    found: EventKind::Prediction,
                    topic: kind,
                });
            }
            Ok(InputEvent::GroundTruth(GroundTruthEvent {
                request_id: json_string("request_id", j.request_id)?,
                timestamp: json_timestamp(j.timestamp)?,
                actual_label: json_opt_string("actual_label", j.actual_label)?,
                actual_value: json_opt_number("actual_value", j.actual_value)?,
            }))
        }
    }
}

// ------------------------------------------------------------------ encoders

/// The JSON object of an event (the schema's field names; non-finite numbers become `null`).
pub fn encode_json(ev: &InputEvent) -> Vec<u8> {
    let res = match ev {
        InputEvent::Prediction(p) => serde_json::to_vec(p),
        InputEvent::GroundTruth(g) => serde_json::to_vec(g),
    };
    // Plain structs with string keys: serde_json has no failure mode for them.
    res.expect("events always serialize to JSON")
}

/// The raw Avro datum of an event, written with its schema.
pub fn encode_avro(ev: &InputEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_datum(ev, &mut out);
    out
}

fn write_datum(ev: &InputEvent, out: &mut Vec<u8>) {
    match ev {
        InputEvent::Prediction(p) => avro::write_prediction(p, out),
        InputEvent::GroundTruth(g) => avro::write_ground_truth(g, out),
    }
}

/// The Confluent wire format: `0x00`, `schema_id` big-endian, the raw datum.
pub fn encode_confluent(ev: &InputEvent, schema_id: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    write_datum(ev, &mut out);
    out
}

/// Avro single-object encoding: `C3 01`, the schema's CRC-64-AVRO fingerprint
/// (8 bytes little-endian), the raw datum.
pub fn encode_single_object(ev: &InputEvent) -> Vec<u8> {
    let kind = match ev {
        InputEvent::Prediction(_) => EventKind::Prediction,
        InputEvent::GroundTruth(_) => EventKind::GroundTruth,
    };
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(&kind.fingerprint());
    write_datum(ev, &mut out);
    out
}

/// The raw Avro datum of an alert (`schemas/AlertEvent.avsc`), as published to the alerts topic.
pub fn encode_alert(a: &AlertEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    avro::write_alert(a, &mut out);
    out
}

/// Reads a raw Avro `AlertEvent` datum (the whole of `bytes`).
pub fn decode_alert(bytes: &[u8]) -> Result<AlertEvent, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    avro::read_alert(bytes).map_err(Into::into)
}
