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
//! `AlertEvent.status` is an Avro enum `AlertStatus {firing, resolved}` (a
//! closed set by definition); `severity` is a string (`warning` | `critical`)
//! so that a new level does not break existing readers.
//!
//! Confluent framing without a Schema Registry (`kafka.schema_registry.url`
//! empty): the schema id is skipped; the datum is read with our own schema,
//! so producers must register a schema with the same fields in the same
//! order (the `.avsc` in `schemas/`). With a registry, the writer schema of
//! the id is taken from a [`SchemaCache`] the service fills before the
//! message is decoded, and resolved against ours ([`super::resolve`]); an id
//! the registry does not know, or a schema ours cannot read, is an error of
//! kind `schema`.

use std::fmt;
use std::sync::{Arc, LazyLock};

use apache_avro::Schema;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::avro;
use super::mapping::Mappings;
use super::resolve::{self, Plan, ResolveError, SchemaCache};
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
    /// CRC-64-AVRO fingerprint of the prediction schema's canonical form,
    /// little-endian bytes as on the wire (the value Java and fastavro compute).
    pub prediction_fingerprint: [u8; 8],
    /// CRC-64-AVRO fingerprint of the ground-truth schema, little-endian bytes.
    pub ground_truth_fingerprint: [u8; 8],
    /// CRC-64-AVRO fingerprint of the alert schema, little-endian bytes.
    pub alert_fingerprint: [u8; 8],
}

fn parse_schema(name: &str, text: &str) -> (Schema, [u8; 8]) {
    // The texts are compiled in and checked by the tests: a failure here is a
    // build defect, not bad input.
    let schema = Schema::parse_str(text)
        .unwrap_or_else(|e| panic!("schemas/{name}.avsc does not parse: {e}"));
    let json: serde_json::Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("schemas/{name}.avsc is not JSON: {e}"));
    let pcf = avro::canonical_form(&json)
        .unwrap_or_else(|e| panic!("schemas/{name}.avsc has no canonical form: {e}"));
    (schema, avro::rabin_fingerprint(pcf.as_bytes()))
}

/// The parsed schemas, built on first use.
pub static SCHEMAS: LazyLock<Schemas> = LazyLock::new(|| {
    let (prediction, prediction_fingerprint) = parse_schema("PredictionEvent", PREDICTION_SCHEMA);
    let (ground_truth, ground_truth_fingerprint) =
        parse_schema("GroundTruthEvent", GROUND_TRUTH_SCHEMA);
    let (alert, alert_fingerprint) = parse_schema("AlertEvent", ALERT_SCHEMA);
    Schemas {
        prediction_fingerprint,
        ground_truth_fingerprint,
        alert_fingerprint,
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

    /// The event type of the other input topic.
    pub(crate) fn other(self) -> EventKind {
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
    /// A record in the user's shape (`[kafka.mapping]`) whose mapped field
    /// is missing or of the wrong type: names our field and its source.
    #[error("field mapping: {0}")]
    Mapping(String),
    /// A Confluent frame whose writer schema (from the Schema Registry) is
    /// unknown, not Avro, or cannot be read as our event; the text starts
    /// with `schema id N`.
    #[error("{0}")]
    Schema(String),
    /// Decoded, but a field value is invalid.
    #[error("invalid event: {0}")]
    Validation(String),
    /// Valid, but its timestamp is out of the bounds the wall clock sets
    /// (`limits.max_future_skew`, `limits.max_event_age`): checked by the
    /// service ([`crate::ingest::bounds`]), not here (the decoder has no clock).
    #[error("event time out of bounds: {detail}")]
    Timestamp {
        /// The `[limits]` key (`max_future_skew` or `max_event_age`).
        limit: &'static str,
        /// The timestamp, its distance to the wall clock and the bound.
        detail: String,
    },
    /// Valid, but beyond a size bound of `[limits]` (features, segment keys,
    /// string bytes): checked by the service ([`crate::ingest::bounds`]).
    #[error("event beyond a limit: {detail}")]
    Limit {
        /// The `[limits]` key.
        limit: &'static str,
        /// What was found and the bound (sizes only, never the event's text).
        detail: String,
    },
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
            DecodeError::Schema(_) => "schema",
            DecodeError::Format { .. } => "format",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::Mapping(_) => "mapping",
            DecodeError::Validation(_) => "validation",
            DecodeError::Timestamp { .. } => "timestamp",
            DecodeError::Limit { .. } => "limit",
        }
    }
}

impl DecodeError {
    /// The `[limits]` key an event broke, for errors of kind `limit` and
    /// `timestamp`.
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            DecodeError::Limit { limit, .. } | DecodeError::Timestamp { limit, .. } => Some(limit),
            _ => None,
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
    /// `[kafka.mapping]`: topics whose records are in the user's shape.
    mappings: Mappings,
    /// Writer schemas of Confluent frames, when a Schema Registry is set.
    registry: Option<Arc<SchemaCache>>,
}

impl Decoder {
    /// A decoder for `format` (see [`Format`]; `auto` sniffs each payload).
    pub fn new(format: Format) -> Self {
        // Parse the schemas now rather than on the first message.
        LazyLock::force(&SCHEMAS);
        Decoder {
            format,
            registry: None,
            mappings: Mappings::default(),
        }
    }

    /// This decoder, reading the records of the mapped topics with `mappings`
    /// (see [`super::mapping`]).
    pub fn with_mappings(mut self, mappings: Mappings) -> Self {
        self.mappings = mappings;
        self
    }

    /// The field mappings.
    pub fn mappings(&self) -> &Mappings {
        &self.mappings
    }

    /// Decodes and validates one message from the topic of `kind`, with its
    /// headers (`(key, value)`, for mapped fields read from a header). The
    /// payload of a mapped topic must be a JSON record; other topics are
    /// read as [`Decoder::decode`] does.
    pub fn decode_with_headers(
        &self,
        kind: EventKind,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<InputEvent, DecodeError> {
        if !self.is_mapped(kind) {
            return self.decode(kind, payload);
        }
        if payload.iter().all(u8::is_ascii_whitespace) {
            return Err(DecodeError::Empty);
        }
        let record = match (self.format, sniff(payload), &self.registry) {
            // The producer's own Avro record, read with its writer schema
            // from the registry, then mapped like a JSON record.
            (Format::Auto | Format::ConfluentAvro, WireFormat::Confluent, Some(cache)) => {
                registry_record(payload, cache)?
            }
            (Format::ConfluentAvro, wire, _) => {
                return Err(DecodeError::Format {
                    expected: "Confluent-framed Avro",
                    found: wire.name(),
                })
            }
            (_, wire @ (WireFormat::Confluent | WireFormat::SingleObject), registry) => {
                return Err(DecodeError::Format {
                    expected: if registry.is_some() {
                        "a JSON record or Confluent-framed Avro (kafka.mapping is set for this topic)"
                    } else {
                        "a JSON record (kafka.mapping is set for this topic; Confluent-framed Avro needs kafka.schema_registry.url)"
                    },
                    found: wire.name(),
                });
            }
            _ => serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?,
        };
        self.map_record(kind, &record, headers)
            .unwrap_or_else(|| self.decode(kind, payload))
    }

    /// True when the records of the topic of `kind` are in the user's shape.
    pub fn is_mapped(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::Prediction => self.mappings.predictions.is_some(),
            EventKind::GroundTruth => self.mappings.labels.is_some(),
        }
    }

    /// The validated event of a record in the user's shape (a parsed JSON
    /// message, or any record turned into JSON), by the mapping of the topic
    /// of `kind`; `None` when that topic is not mapped.
    pub fn map_record(
        &self,
        kind: EventKind,
        record: &serde_json::Value,
        headers: &[(&str, &[u8])],
    ) -> Option<Result<InputEvent, DecodeError>> {
        let ev = match kind {
            EventKind::Prediction => self
                .mappings
                .predictions
                .as_ref()?
                .map(record, headers)
                .map(InputEvent::Prediction),
            EventKind::GroundTruth => self
                .mappings
                .labels
                .as_ref()?
                .map(record, headers)
                .map(InputEvent::GroundTruth),
        };
        Some(ev.and_then(|ev| validate(&ev).map(|()| ev)))
    }

    /// Confluent frames resolved with the writer schemas in `cache` (filled
    /// from the Schema Registry by the service) instead of read as ours.
    pub fn with_registry(mut self, cache: Arc<SchemaCache>) -> Self {
        self.registry = Some(cache);
        self
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
                    Err(e @ DecodeError::Json(_)) if payload.first() != Some(&b'{') => {
                        decode_raw(kind, payload).map_err(|_| e)?
                    }
                    other => other?,
                }
            }
            (Format::Auto | Format::ConfluentAvro, WireFormat::Confluent) => match &self.registry {
                Some(cache) => decode_registry(kind, payload, cache)?,
                None => decode_confluent(kind, payload)?,
            },
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
            // Leading whitespace made it look like JSON, but a raw datum may
            // start with such bytes (lengths 5, 6, 16 of a request id like
            // "\x0c{..."): the configured format decides (found by fuzzing).
            (Format::Avro, WireFormat::Json) if payload.first() != Some(&b'{') => {
                decode_raw(kind, payload).map_err(|_| DecodeError::Format {
                    expected: "raw or single-object Avro",
                    found: wire.name(),
                })?
            }
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

/// The writer schema of a Confluent frame's id, from the cache the service
/// filled from the registry.
fn writer_schema(
    payload: &[u8],
    cache: &SchemaCache,
) -> Result<(u32, resolve::Entry), DecodeError> {
    let Some(id) = resolve::confluent_id(payload) else {
        return Err(DecodeError::Framing(payload.len()));
    };
    match cache.get(id) {
        Some(entry) => Ok((id, entry)),
        // The service fetches every id before decoding: not reached.
        None => Err(DecodeError::Schema(format!(
            "schema id {id} was not fetched from the registry"
        ))),
    }
}

/// A Confluent frame's datum as the producer wrote it, as a JSON tree for
/// a field mapping: read with the writer schema of its id by the bounded
/// generic reader.
fn registry_record(payload: &[u8], cache: &SchemaCache) -> Result<serde_json::Value, DecodeError> {
    let (id, entry) = writer_schema(payload, cache)?;
    let datum = payload.get(5..).unwrap_or_default();
    let (schema, names) = match &*entry {
        Ok(ws) => ws
            .record
            .as_ref()
            .map_err(|reason| DecodeError::Schema(format!("schema id {id}: {reason}")))?,
        Err(reason) => return Err(DecodeError::Schema(format!("schema id {id}: {reason}"))),
    };
    let value = super::avro_generic::read_value_with(schema, names, datum)?;
    Ok(super::avro_generic::value_to_json(&value))
}

/// A Confluent frame read with the writer schema of its id (module doc).
fn decode_registry(
    kind: EventKind,
    payload: &[u8],
    cache: &SchemaCache,
) -> Result<InputEvent, DecodeError> {
    let (id, entry) = writer_schema(payload, cache)?;
    let datum = payload.get(5..).unwrap_or_default();
    let ws = match &*entry {
        Ok(ws) => ws,
        Err(reason) => return Err(DecodeError::Schema(format!("schema id {id}: {reason}"))),
    };
    match ws.plan(kind) {
        Plan::Ours => decode_raw(kind, datum),
        Plan::OtherType => Err(DecodeError::WrongType {
            found: kind.other(),
            topic: kind,
        }),
        Plan::Incompatible(reason) => Err(DecodeError::Schema(format!(
            "schema id {id} on the {kind} topic: {reason}"
        ))),
        Plan::Resolve { writer, names } => match resolve::read_event(writer, names, kind, datum) {
            Ok(ev) => Ok(ev),
            Err(ResolveError::Datum(e)) => Err(e.into()),
            Err(ResolveError::Resolve(e)) => Err(DecodeError::Schema(format!(
                "schema id {id}: a value does not resolve against the {kind} schema: {e}"
            ))),
        },
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
    // `into_iter().map().collect()` reuses the parsed vector's allocation
    // (the converted entries are no larger): no second vector per event.
    let out = entries
        .into_iter()
        .map(|(name, v)| {
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
            Ok((name, fv))
        })
        .collect::<Result<Vec<_>, _>>()?;
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
    // serde would also read a struct from a JSON array: only objects are events.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(DecodeError::Json("expected a JSON object".into()));
    }
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

/// An alert in the Confluent wire format: `0x00`, `schema_id` (big-endian),
/// the raw Avro datum (`kafka.schema_registry.alerts = "confluent"`).
pub fn encode_alert_confluent(a: &AlertEvent, schema_id: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use apache_avro::types::Value;
    use proptest::prelude::*;

    use super::*;
    use crate::model::{AlertStatus, Severity};

    const VECTORS: &str = include_str!("../../tests/oracle/avro_vectors.json");

    fn vectors() -> serde_json::Value {
        serde_json::from_str(VECTORS).unwrap()
    }

    fn vector_bytes(case: &str, which: &str) -> Vec<u8> {
        hex::decode(vectors()["datums"][case][which].as_str().unwrap()).unwrap()
    }

    fn s(x: &str) -> String {
        x.to_string()
    }

    /// Mirrors `prediction_full` in tests/oracle/avro_oracle.py.
    fn oracle_prediction_full() -> PredictionEvent {
        PredictionEvent {
            request_id: s("req-1"),
            model_id: s("churn"),
            model_version: s("v2"),
            timestamp: 1_700_000_000_123,
            features: Entries(vec![
                (s("age"), FeatureValue::Long(42)),
                (s("income"), FeatureValue::Double(1234.5)),
                (s("country"), FeatureValue::String(s("DE"))),
                (s("vip"), FeatureValue::Bool(true)),
                (s("missing"), FeatureValue::Null),
                (s("ratio"), FeatureValue::Double(f64::INFINITY)),
                (s("delta"), FeatureValue::Long(-7)),
            ]),
            predicted_label: Some(s("1")),
            predicted_value: None,
            score: Some(0.875),
            class_probabilities: Some(Entries(vec![(s("0"), 0.125), (s("1"), 0.875)])),
            segments: Entries(vec![(s("country"), s("DE")), (s("channel"), s("web"))]),
            latency_ms: Some(3.25),
        }
    }

    /// Mirrors `prediction_min`.
    fn oracle_prediction_min() -> PredictionEvent {
        PredictionEvent {
            request_id: s("r"),
            model_id: s("m"),
            model_version: s("1"),
            timestamp: 1,
            predicted_value: Some(-2.5),
            ..Default::default()
        }
    }

    /// Mirrors `ground_truth`.
    fn oracle_ground_truth() -> GroundTruthEvent {
        GroundTruthEvent {
            request_id: s("req-1"),
            timestamp: 1_700_000_600_000,
            actual_label: Some(s("0")),
            actual_value: None,
        }
    }

    /// Mirrors `alert`.
    fn oracle_alert() -> AlertEvent {
        AlertEvent {
            alert_id: s("a1b2"),
            rule: s("psi_high"),
            status: AlertStatus::Firing,
            severity: Severity::Critical,
            model_id: s("churn"),
            model_version: s("v2"),
            segment: s("country=DE"),
            feature: Some(s("income")),
            metric: s("psi"),
            value: 0.31,
            threshold: 0.2,
            baseline: None,
            p_value: Some(0.001),
            window_start: 1_700_000_000_000,
            window_end: 1_700_000_300_000,
            fired_at: 1_700_000_301_000,
            message: s("psi 0.31 > 0.2"),
        }
    }

    fn pred(p: PredictionEvent) -> InputEvent {
        InputEvent::Prediction(p)
    }

    fn gt(g: GroundTruthEvent) -> InputEvent {
        InputEvent::GroundTruth(g)
    }

    fn auto() -> Decoder {
        Decoder::new(Format::Auto)
    }

    fn field_names(schema: &Schema) -> Vec<String> {
        match schema {
            Schema::Record(r) => r.fields.iter().map(|f| f.name.clone()).collect(),
            other => panic!("not a record: {other:?}"),
        }
    }

    // ------------------------------------------------------------ schemas

    #[test]
    fn schemas_parse_with_exactly_the_design_fields() {
        assert_eq!(
            field_names(&SCHEMAS.prediction),
            [
                "request_id",
                "model_id",
                "model_version",
                "timestamp",
                "features",
                "predicted_label",
                "predicted_value",
                "score",
                "class_probabilities",
                "segments",
                "latency_ms"
            ]
        );
        assert_eq!(
            field_names(&SCHEMAS.ground_truth),
            ["request_id", "timestamp", "actual_label", "actual_value"]
        );
        assert_eq!(
            field_names(&SCHEMAS.alert),
            [
                "alert_id",
                "rule",
                "status",
                "severity",
                "model_id",
                "model_version",
                "segment",
                "feature",
                "metric",
                "value",
                "threshold",
                "baseline",
                "p_value",
                "window_start",
                "window_end",
                "fired_at",
                "message"
            ]
        );
        for (schema, name) in [
            (&SCHEMAS.prediction, "modelwatch.PredictionEvent"),
            (&SCHEMAS.ground_truth, "modelwatch.GroundTruthEvent"),
            (&SCHEMAS.alert, "modelwatch.AlertEvent"),
        ] {
            assert_eq!(schema.name().unwrap().fullname(None), name);
        }
    }

    #[test]
    fn canonical_forms_and_fingerprints_match_fastavro() {
        let v = vectors();
        for (schema, fp, name) in [
            (
                &SCHEMAS.prediction,
                SCHEMAS.prediction_fingerprint,
                "PredictionEvent",
            ),
            (
                &SCHEMAS.ground_truth,
                SCHEMAS.ground_truth_fingerprint,
                "GroundTruthEvent",
            ),
            (&SCHEMAS.alert, SCHEMAS.alert_fingerprint, "AlertEvent"),
        ] {
            let o = &v["schemas"][name];
            let text = match name {
                "PredictionEvent" => PREDICTION_SCHEMA,
                "GroundTruthEvent" => GROUND_TRUTH_SCHEMA,
                _ => ALERT_SCHEMA,
            };
            let json: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(
                avro::canonical_form(&json).unwrap(),
                o["canonical_form"].as_str().unwrap(),
                "{name}"
            );
            // apache-avro 0.21 writes timestamp-millis as {"type":"long"}: the
            // reason the fingerprint is computed in avro.rs. Should this fail
            // after an upgrade, apache-avro is fixed and could compute it again.
            assert!(
                schema
                    .canonical_form()
                    .contains(r#"{"name":"timestamp","type":{"type":"long"}}"#)
                    || name == "AlertEvent"
            );
            assert_eq!(
                hex::encode(fp),
                o["fingerprint_le_hex"].as_str().unwrap(),
                "{name}"
            );
        }
        // The constant computed by fastavro, spelled out.
        assert_eq!(
            hex::encode(SCHEMAS.prediction_fingerprint),
            "ea82abce8f2fe84f"
        );
    }

    // ------------------------------------------------ oracle byte equality

    #[test]
    fn encoders_match_fastavro_byte_for_byte() {
        for (case, ev) in [
            ("prediction_full", pred(oracle_prediction_full())),
            ("prediction_min", pred(oracle_prediction_min())),
            ("ground_truth", gt(oracle_ground_truth())),
        ] {
            assert_eq!(encode_avro(&ev), vector_bytes(case, "raw_hex"), "{case}");
            assert_eq!(
                encode_single_object(&ev),
                vector_bytes(case, "single_object_hex"),
                "{case}"
            );
        }
        assert_eq!(
            encode_alert(&oracle_alert()),
            vector_bytes("alert", "raw_hex")
        );
    }

    #[test]
    fn fastavro_datums_decode_to_the_oracle_events() {
        for (case, kind, ev) in [
            (
                "prediction_full",
                EventKind::Prediction,
                pred(oracle_prediction_full()),
            ),
            (
                "prediction_min",
                EventKind::Prediction,
                pred(oracle_prediction_min()),
            ),
            (
                "ground_truth",
                EventKind::GroundTruth,
                gt(oracle_ground_truth()),
            ),
        ] {
            let raw = vector_bytes(case, "raw_hex");
            let so = vector_bytes(case, "single_object_hex");
            assert_eq!(auto().decode(kind, &raw).unwrap(), ev, "{case} raw");
            assert_eq!(
                auto().decode(kind, &so).unwrap(),
                ev,
                "{case} single-object"
            );
            let avro = Decoder::new(Format::Avro);
            assert_eq!(
                avro.decode(kind, &raw).unwrap(),
                ev,
                "{case} raw, format avro"
            );
            assert_eq!(
                avro.decode(kind, &so).unwrap(),
                ev,
                "{case} so, format avro"
            );
        }
        assert_eq!(
            decode_alert(&vector_bytes("alert", "raw_hex")).unwrap(),
            oracle_alert()
        );
    }

    // --------------------------------------------------------- round trips

    fn all_encodings(ev: &InputEvent) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("json", encode_json(ev)),
            ("avro", encode_avro(ev)),
            ("confluent", encode_confluent(ev, 42)),
            ("single-object", encode_single_object(ev)),
        ]
    }

    #[test]
    fn every_format_round_trips_for_both_kinds() {
        let cases = [
            (EventKind::Prediction, pred(oracle_prediction_full())),
            (EventKind::Prediction, pred(oracle_prediction_min())),
            (EventKind::GroundTruth, gt(oracle_ground_truth())),
            (
                EventKind::GroundTruth,
                gt(GroundTruthEvent {
                    request_id: s("x"),
                    timestamp: 5,
                    actual_label: None,
                    actual_value: Some(-1.25),
                }),
            ),
        ];
        for (kind, ev) in cases {
            for (name, bytes) in all_encodings(&ev) {
                let mut expected = ev.clone();
                // JSON has no infinity: the JSON encoder writes it as null.
                if name == "json" {
                    if let InputEvent::Prediction(p) = &mut expected {
                        for (_, v) in p.features.0.iter_mut() {
                            if matches!(v, FeatureValue::Double(x) if !x.is_finite()) {
                                *v = FeatureValue::Null;
                            }
                        }
                    }
                }
                assert_eq!(
                    auto().decode(kind, &bytes).unwrap(),
                    expected,
                    "auto {name}"
                );
                let explicit = match name {
                    "json" => Format::Json,
                    "confluent" => Format::ConfluentAvro,
                    _ => Format::Avro,
                };
                assert_eq!(
                    Decoder::new(explicit).decode(kind, &bytes).unwrap(),
                    expected,
                    "{explicit:?} {name}"
                );
            }
        }
    }

    #[test]
    fn avro_keeps_non_finite_feature_values() {
        let mut p = oracle_prediction_min();
        p.features = Entries(vec![
            (s("nan"), FeatureValue::Double(f64::NAN)),
            (s("ninf"), FeatureValue::Double(f64::NEG_INFINITY)),
        ]);
        let InputEvent::Prediction(back) = auto()
            .decode(EventKind::Prediction, &encode_avro(&pred(p)))
            .unwrap()
        else {
            panic!("not a prediction")
        };
        assert!(matches!(back.features.get("nan"), Some(FeatureValue::Double(x)) if x.is_nan()));
        assert_eq!(
            back.features.get("ninf"),
            Some(&FeatureValue::Double(f64::NEG_INFINITY))
        );
    }

    #[test]
    fn confluent_framing_is_magic_then_big_endian_schema_id() {
        let ev = pred(oracle_prediction_min());
        let framed = encode_confluent(&ev, 0x0102_0304);
        assert_eq!(framed[..5], [0x00, 0x01, 0x02, 0x03, 0x04]);
        assert_eq!(framed[5..], encode_avro(&ev)[..]);
        assert_eq!(
            auto().decode(EventKind::Prediction, &framed[..3]),
            Err(DecodeError::Framing(3))
        );
        assert_eq!(
            auto()
                .decode(EventKind::Prediction, &framed[..3])
                .unwrap_err()
                .to_string(),
            "Confluent frame of 3 bytes is shorter than its 5-byte header"
        );
    }

    #[test]
    fn single_object_checks_the_fingerprint() {
        let ev = pred(oracle_prediction_min());
        let mut so = encode_single_object(&ev);
        assert_eq!(so[..2], [0xC3, 0x01]);
        so[2] ^= 0xff;
        let err = auto().decode(EventKind::Prediction, &so).unwrap_err();
        assert_eq!(err.kind(), "fingerprint");
        assert_eq!(
            err.to_string(),
            "unknown single-object schema fingerprint 1582abce8f2fe84f \
             (the prediction schema is ea82abce8f2fe84f)"
        );
        // A ground-truth single object on the predictions topic is named as such.
        let g = encode_single_object(&gt(oracle_ground_truth()));
        assert_eq!(
            auto().decode(EventKind::Prediction, &g),
            Err(DecodeError::WrongType {
                found: EventKind::GroundTruth,
                topic: EventKind::Prediction
            })
        );
        let short = auto()
            .decode(EventKind::Prediction, &[0xC3, 0x01, 0xea])
            .unwrap_err();
        assert_eq!(short.kind(), "avro");
    }

    // ----------------------------------------------------------- sniffing

    #[test]
    fn sniffing_classifies_by_first_bytes() {
        assert_eq!(sniff(b"{}"), WireFormat::Json);
        assert_eq!(sniff(b" \n\t{\"a\":1}"), WireFormat::Json);
        assert_eq!(sniff(&[0x00, 0, 0, 0, 1]), WireFormat::Confluent);
        assert_eq!(sniff(&[0xC3, 0x01, 1]), WireFormat::SingleObject);
        assert_eq!(sniff(&[0xC3, 0x02]), WireFormat::RawAvro);
        assert_eq!(sniff(b"\x02r"), WireFormat::RawAvro);
        assert_eq!(sniff(b"[1]"), WireFormat::RawAvro);
    }

    #[test]
    fn auto_falls_back_to_avro_when_a_datum_starts_with_whitespace() {
        // request_id of 16 bytes: the datum starts with 0x20 (a space), then `{`.
        let mut p = oracle_prediction_min();
        p.request_id = s("{abcdefghijklmn}");
        let bytes = encode_avro(&pred(p.clone()));
        assert_eq!(bytes[0], b' ');
        assert_eq!(sniff(&bytes), WireFormat::Json);
        assert_eq!(
            auto().decode(EventKind::Prediction, &bytes).unwrap(),
            pred(p)
        );
    }

    #[test]
    fn avro_format_reads_a_datum_that_starts_with_whitespace() {
        // Found by fuzz/ (target `decode`): with `format = "avro"` these raw
        // datums were rejected as "expected raw or single-object Avro, got JSON".
        let avro = Decoder::new(Format::Avro);
        let mut p = oracle_prediction_min();
        p.request_id = s("{abcdefghijklmn}");
        let bytes = encode_avro(&pred(p.clone()));
        assert_eq!(sniff(&bytes), WireFormat::Json);
        assert_eq!(avro.decode(EventKind::Prediction, &bytes).unwrap(), pred(p));
        let g = GroundTruthEvent {
            request_id: s("\x0c{\"\x02\x02"),
            timestamp: 1,
            actual_label: Some(s("\x02")),
            actual_value: None,
        };
        let bytes = encode_avro(&gt(g.clone()));
        assert_eq!(&bytes[..3], b"\n\x0c{");
        assert_eq!(avro.decode(EventKind::GroundTruth, &bytes).unwrap(), gt(g));
        // JSON proper is still refused with the format error.
        for json in [&b" {\"request_id\":\"r\"}"[..], b"{}"] {
            let err = avro.decode(EventKind::GroundTruth, json).unwrap_err();
            assert_eq!(
                err.to_string(),
                "expected raw or single-object Avro, got JSON"
            );
        }
    }

    #[test]
    fn explicit_formats_reject_other_encodings() {
        let ev = pred(oracle_prediction_full());
        let json = encode_json(&ev);
        let raw = encode_avro(&ev);
        let conf = encode_confluent(&ev, 7);
        let so = encode_single_object(&ev);
        let k = EventKind::Prediction;
        let dec = |f| Decoder::new(f);
        let fmt_err = |r: Result<InputEvent, DecodeError>| r.unwrap_err().to_string();
        assert_eq!(
            fmt_err(dec(Format::Json).decode(k, &conf)),
            "expected JSON, got Confluent-framed Avro"
        );
        assert_eq!(
            fmt_err(dec(Format::Json).decode(k, &so)),
            "expected JSON, got single-object Avro"
        );
        assert_eq!(
            dec(Format::Json).decode(k, &raw).unwrap_err().kind(),
            "json"
        );
        assert_eq!(
            fmt_err(dec(Format::Avro).decode(k, &json)),
            "expected raw or single-object Avro, got JSON"
        );
        assert_eq!(
            fmt_err(dec(Format::Avro).decode(k, &conf)),
            "expected raw or single-object Avro, got Confluent-framed Avro"
        );
        for other in [&json, &raw, &so] {
            assert_eq!(
                dec(Format::ConfluentAvro)
                    .decode(k, other)
                    .unwrap_err()
                    .kind(),
                "format"
            );
        }
        assert!(dec(Format::ConfluentAvro).decode(k, &conf).is_ok());
        assert_eq!(dec(Format::Avro).format(), Format::Avro);
    }

    // --------------------------------------------------------- validation

    fn reason(kind: EventKind, json: &str) -> String {
        match auto().decode(kind, json.as_bytes()) {
            Err(e) => e.to_string(),
            Ok(ev) => panic!("accepted {json}: {ev:?}"),
        }
    }

    const P: EventKind = EventKind::Prediction;
    const G: EventKind = EventKind::GroundTruth;

    #[test]
    fn each_prediction_rule_has_a_precise_reason() {
        let cases = [
            (r#"{"request_id":"","model_id":"m","model_version":"v","timestamp":1,"score":0.5}"#,
             "invalid event: request_id is empty"),
            (r#"{"model_id":"m","model_version":"v","timestamp":1,"score":0.5}"#,
             "invalid event: request_id is missing"),
            (r#"{"request_id":"r","model_id":"","model_version":"v","timestamp":1,"score":0.5}"#,
             "invalid event: model_id is empty"),
            (r#"{"request_id":"r","model_id":"m","model_version":"","timestamp":1,"score":0.5}"#,
             "invalid event: model_version is empty"),
            (r#"{"request_id":"r","model_id":"m","timestamp":1,"score":0.5}"#,
             "invalid event: model_version is missing"),
            (r#"{"request_id":7,"model_id":"m","model_version":"v","timestamp":1,"score":0.5}"#,
             "invalid event: request_id: expected string, got number"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":-5,"score":0.5}"#,
             "invalid event: timestamp -5 out of range (1..32503680000000 ms since the epoch)"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":0,"score":0.5}"#,
             "invalid event: timestamp 0 out of range (1..32503680000000 ms since the epoch)"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":32503680000000,"score":0.5}"#,
             "invalid event: timestamp 32503680000000 out of range (1..32503680000000 ms since the epoch)"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":18446744073709551615,"score":0.5}"#,
             "invalid event: timestamp 18446744073709551615 out of range (1..32503680000000 ms since the epoch)"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1.5,"score":0.5}"#,
             "invalid event: timestamp 1.5 is not an integer number of milliseconds"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":"1700000000000","score":0.5}"#,
             "invalid event: timestamp: expected integer milliseconds, got string"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","score":0.5}"#,
             "invalid event: timestamp is missing"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"score":1.5}"#,
             "invalid event: score 1.5 out of range [0, 1]"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"score":"0.5"}"#,
             "invalid event: score: expected number or null, got string"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"class_probabilities":{"a":0.5,"b":-0.1}}"#,
             "invalid event: class_probabilities.b -0.1 out of range [0, 1]"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"class_probabilities":{"a":"x"}}"#,
             "invalid event: class_probabilities.a: expected number, got string"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"class_probabilities":[0.5]}"#,
             "invalid event: class_probabilities: expected object, got array"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"score":0.5,"latency_ms":-1}"#,
             "invalid event: latency_ms -1 is negative"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1}"#,
             "invalid event: prediction has none of predicted_label, predicted_value, score, class_probabilities"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"score":0.5,"features":{"age":[1]}}"#,
             "invalid event: features.age: expected null|boolean|number|string, got array"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"score":0.5,"features":{"age":{"x":1}}}"#,
             "invalid event: features.age: expected null|boolean|number|string, got object"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"score":0.5,"features":3}"#,
             "invalid event: features: expected object, got number"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"score":0.5,"segments":{"country":1}}"#,
             "invalid event: segments.country: expected string, got number"),
            (r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"predicted_label":true}"#,
             "invalid event: predicted_label: expected string or null, got boolean"),
            (r#"{"request_id":"r","timestamp":1,"actual_label":"1"}"#,
             "ground-truth event on the prediction topic"),
        ];
        for (json, want) in cases {
            assert_eq!(reason(P, json), want, "{json}");
        }
    }

    #[test]
    fn non_finite_values_are_rejected_where_they_must_be_finite() {
        let base = oracle_prediction_min();
        type Edit = fn(&mut PredictionEvent);
        let cases: [(Edit, &str); 5] = [
            (|p| p.predicted_value = Some(f64::NAN), "invalid event: predicted_value NaN is not finite"),
            (|p| p.score = Some(f64::NAN), "invalid event: score NaN out of range [0, 1]"),
            (|p| p.latency_ms = Some(f64::INFINITY), "invalid event: latency_ms inf is not finite"),
            (
                |p| p.class_probabilities = Some(Entries(vec![(s("a"), f64::NAN)])),
                "invalid event: class_probabilities.a NaN out of range [0, 1]",
            ),
            (|p| p.timestamp = i64::MIN, "invalid event: timestamp -9223372036854775808 out of range (1..32503680000000 ms since the epoch)"),
        ];
        for (edit, want) in cases {
            let mut p = base.clone();
            edit(&mut p);
            let err = auto().decode(P, &encode_avro(&pred(p))).unwrap_err();
            assert_eq!(err.kind(), "validation");
            assert_eq!(err.to_string(), want);
        }
        let g = GroundTruthEvent {
            actual_value: Some(f64::NAN),
            ..oracle_ground_truth()
        };
        assert_eq!(
            auto()
                .decode(G, &encode_avro(&gt(g)))
                .unwrap_err()
                .to_string(),
            "invalid event: actual_value NaN is not finite"
        );
    }

    #[test]
    fn each_ground_truth_rule_has_a_precise_reason() {
        let cases = [
            (
                r#"{"request_id":"","timestamp":1,"actual_label":"1"}"#,
                "invalid event: request_id is empty",
            ),
            (
                r#"{"request_id":"r","timestamp":-1,"actual_label":"1"}"#,
                "invalid event: timestamp -1 out of range (1..32503680000000 ms since the epoch)",
            ),
            (
                r#"{"request_id":"r","timestamp":1}"#,
                "invalid event: ground-truth event has neither actual_label nor actual_value",
            ),
            (
                r#"{"request_id":"r","timestamp":1,"actual_value":"3"}"#,
                "invalid event: actual_value: expected number or null, got string",
            ),
            (
                r#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1,"score":0.5}"#,
                "prediction event on the ground-truth topic",
            ),
        ];
        for (json, want) in cases {
            assert_eq!(reason(G, json), want, "{json}");
        }
    }

    #[test]
    fn json_details() {
        // Exponent-form integer timestamps, unknown fields, nulls for optionals.
        let ev = auto()
            .decode(
                P,
                br#"{"request_id":"r","model_id":"m","model_version":"v","timestamp":1.7e12,
                     "score":1,"predicted_label":null,"extra":{"x":[1,2]},"features":{"big":18446744073709551615}}"#,
            )
            .unwrap();
        let InputEvent::Prediction(p) = ev else {
            panic!("not a prediction")
        };
        assert_eq!(p.timestamp, 1_700_000_000_000);
        assert_eq!(p.score, Some(1.0));
        assert_eq!(p.predicted_label, None);
        assert_eq!(
            p.features.get("big"),
            Some(&FeatureValue::Double(18446744073709551615.0))
        );
        // A label carrying extra prediction-like fields is still a label.
        let ev = auto()
            .decode(
                G,
                br#"{"request_id":"r","timestamp":2,"model_id":"m","actual_value":3}"#,
            )
            .unwrap();
        assert_eq!(
            ev,
            gt(GroundTruthEvent {
                request_id: s("r"),
                timestamp: 2,
                actual_label: None,
                actual_value: Some(3.0)
            })
        );
        let e = auto()
            .decode(P, br#"{"request_id":"r","request_id":"s"}"#)
            .unwrap_err();
        assert_eq!(e.kind(), "json");
        assert!(
            e.to_string().contains("duplicate field `request_id`"),
            "{e}"
        );
        let e = Decoder::new(Format::Json).decode(P, b"[1,2]").unwrap_err();
        assert_eq!(e.to_string(), "invalid JSON: expected a JSON object");
        let e = auto().decode(P, br#"{"request_id":"r"} x"#).unwrap_err();
        assert!(e.to_string().contains("trailing characters"), "{e}");
        let e = auto().decode(P, br#"{"request_id":"r","#).unwrap_err();
        assert_eq!(e.kind(), "json");
    }

    #[test]
    fn wrong_type_raw_avro_is_named() {
        let g = encode_avro(&gt(oracle_ground_truth()));
        let e = auto().decode(P, &g).unwrap_err();
        assert_eq!(e.to_string(), "ground-truth event on the prediction topic");
        let p = encode_confluent(&pred(oracle_prediction_full()), 1);
        let e = auto().decode(G, &p).unwrap_err();
        assert_eq!(e.to_string(), "prediction event on the ground-truth topic");
        // Garbage that is neither type stays an Avro error.
        let e = auto().decode(G, &[0x02, b'r']).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid Avro datum: timestamp: datum ends inside a long"
        );
    }

    // ------------------------------------------- truncated, garbage, empty

    #[test]
    fn empty_payloads_are_rejected() {
        for f in [
            Format::Auto,
            Format::Json,
            Format::Avro,
            Format::ConfluentAvro,
        ] {
            for payload in [&b""[..], b"  \n"] {
                let e = Decoder::new(f).decode(P, payload).unwrap_err();
                assert_eq!(e, DecodeError::Empty);
                assert_eq!(e.kind(), "empty");
            }
        }
        assert_eq!(decode_alert(b""), Err(DecodeError::Empty));
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_an_error() {
        for (kind, ev) in [
            (P, pred(oracle_prediction_full())),
            (G, gt(oracle_ground_truth())),
        ] {
            for (name, bytes) in all_encodings(&ev) {
                for n in 0..bytes.len() {
                    assert!(
                        auto().decode(kind, &bytes[..n]).is_err(),
                        "{name} prefix {n}"
                    );
                }
                let mut longer = bytes.clone();
                longer.push(0);
                let e = auto().decode(kind, &longer).unwrap_err();
                if name != "json" {
                    assert_eq!(
                        e.to_string(),
                        "invalid Avro datum: 1 trailing bytes after the datum"
                    );
                }
            }
        }
        let a = encode_alert(&oracle_alert());
        for n in 1..a.len() {
            assert_eq!(
                decode_alert(&a[..n]).unwrap_err().kind(),
                "avro",
                "alert prefix {n}"
            );
        }
    }

    #[test]
    fn huge_announced_lengths_fail_fast_without_allocating() {
        // request_id "r", model_id "m", version "1", timestamp 1, then a
        // features map announcing 2^40 entries.
        let mut b = vec![0x02, b'r', 0x02, b'm', 0x02, b'1', 0x02];
        b.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]);
        let e = auto().decode(P, &b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid Avro datum: features: block of 2199023255552 items in 0 bytes"
        );
        // A string announcing 2^62 bytes.
        let e = auto()
            .decode(
                P,
                &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
            )
            .unwrap_err();
        assert_eq!(e.kind(), "avro");
        // An 11-byte varint overflows.
        let e = auto().decode(P, &[0xff; 11]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid Avro datum: request_id: long overflows 64 bits"
        );
    }

    #[test]
    fn garbage_inside_the_datum_is_named() {
        let mut b = encode_avro(&gt(oracle_ground_truth()));
        // actual_label union index: 1 (zig-zag 02) -> 5 (0a).
        let at = b.len() - 4;
        assert_eq!(b[at], 0x02);
        b[at] = 0x0a;
        assert_eq!(
            auto().decode(G, &b).unwrap_err().to_string(),
            "invalid Avro datum: actual_label: union index 5 out of range 0..2"
        );
        let mut p = oracle_prediction_min();
        p.features = Entries(vec![(s("f"), FeatureValue::Bool(true))]);
        let mut b = encode_avro(&pred(p));
        let at = b.iter().position(|&x| x == b'f').unwrap() + 2;
        b[at] = 7;
        assert_eq!(
            auto().decode(P, &b).unwrap_err().to_string(),
            "invalid Avro datum: features: invalid boolean byte 0x07 (map key \"f\")"
        );
        let bad_utf8 = [0x04, 0xff, 0xfe, 0x02];
        assert_eq!(
            auto().decode(G, &bad_utf8).unwrap_err().to_string(),
            "invalid Avro datum: request_id: string is not valid UTF-8"
        );
    }

    #[test]
    fn negative_block_counts_carry_a_byte_size_and_decode() {
        // segments {"a": "b"} written as one block with count -1 and byte size 4.
        let mut p = oracle_prediction_min();
        p.segments = Entries(vec![(s("a"), s("b"))]);
        let plain = encode_avro(&pred(p.clone()));
        let seg_block = [0x02, 0x02, b'a', 0x02, b'b', 0x00];
        let at = plain.windows(6).position(|w| w == seg_block).unwrap();
        let mut b = plain[..at].to_vec();
        b.extend_from_slice(&[0x01, 0x08, 0x02, b'a', 0x02, b'b', 0x00]);
        b.extend_from_slice(&plain[at + 6..]);
        assert_eq!(auto().decode(P, &b).unwrap(), pred(p));
    }

    #[test]
    fn alert_decoding_rejects_bad_enum_and_severity() {
        let a = oracle_alert();
        let mut resolved = a.clone();
        resolved.status = AlertStatus::Resolved;
        resolved.severity = Severity::Warning;
        resolved.feature = None;
        resolved.baseline = Some(0.9);
        assert_eq!(decode_alert(&encode_alert(&resolved)).unwrap(), resolved);

        let bytes = encode_alert(&a);
        // status follows alert_id (5 bytes) and rule (9 bytes).
        let mut bad = bytes.clone();
        assert_eq!(bad[14], 0x00);
        bad[14] = 0x04;
        assert_eq!(
            decode_alert(&bad).unwrap_err().to_string(),
            "invalid Avro datum: status: enum index 2 out of range 0..2"
        );
        let mut sev = a.clone();
        sev.alert_id = s("x");
        let mut bad = encode_alert(&sev);
        let at = bad.windows(8).position(|w| w == b"critical").unwrap();
        bad[at..at + 8].copy_from_slice(b"CRITICAL");
        assert_eq!(
            decode_alert(&bad).unwrap_err().to_string(),
            "invalid Avro datum: severity: unknown value \"CRITICAL\" (expected warning|critical)"
        );
    }

    #[test]
    fn error_kinds_are_stable_labels() {
        let kinds: Vec<&str> = [
            DecodeError::Empty,
            DecodeError::Json(s("x")),
            DecodeError::Avro(s("x")),
            DecodeError::Framing(1),
            DecodeError::Fingerprint {
                found: s("a"),
                expected: s("b"),
                kind: P,
            },
            DecodeError::Format {
                expected: "JSON",
                found: "raw Avro",
            },
            DecodeError::WrongType { found: P, topic: G },
            DecodeError::Mapping(s("x")),
            DecodeError::Validation(s("x")),
            DecodeError::Schema(s("x")),
        ]
        .iter()
        .map(DecodeError::kind)
        .collect();
        assert_eq!(
            kinds,
            [
                "empty",
                "json",
                "avro",
                "framing",
                "fingerprint",
                "format",
                "wrong_type",
                "mapping",
                "validation",
                "schema"
            ]
        );
    }

    // ------------------------------------ apache-avro as a second opinion

    fn feature_value(v: &FeatureValue) -> Value {
        match v {
            FeatureValue::Null => Value::Union(0, Box::new(Value::Null)),
            FeatureValue::Bool(b) => Value::Union(1, Box::new(Value::Boolean(*b))),
            FeatureValue::Long(x) => Value::Union(2, Box::new(Value::Long(*x))),
            FeatureValue::Double(x) => Value::Union(3, Box::new(Value::Double(*x))),
            FeatureValue::String(x) => Value::Union(4, Box::new(Value::String(x.clone()))),
        }
    }

    fn opt_string(v: &Option<String>) -> Value {
        match v {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(x) => Value::Union(1, Box::new(Value::String(x.clone()))),
        }
    }

    fn opt_double(v: Option<f64>) -> Value {
        match v {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(x) => Value::Union(1, Box::new(Value::Double(x))),
        }
    }

    /// The apache-avro `Value` of a prediction, built from the schema's point of view.
    fn prediction_value(p: &PredictionEvent) -> Value {
        let features: HashMap<String, Value> = p
            .features
            .iter()
            .map(|(k, v)| (k.to_string(), feature_value(v)))
            .collect();
        let cp = match &p.class_probabilities {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(m) => Value::Union(
                1,
                Box::new(Value::Map(
                    m.iter()
                        .map(|(k, v)| (k.to_string(), Value::Double(*v)))
                        .collect(),
                )),
            ),
        };
        let segments: HashMap<String, Value> = p
            .segments
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
            .collect();
        Value::Record(vec![
            (s("request_id"), Value::String(p.request_id.clone())),
            (s("model_id"), Value::String(p.model_id.clone())),
            (s("model_version"), Value::String(p.model_version.clone())),
            (s("timestamp"), Value::TimestampMillis(p.timestamp)),
            (s("features"), Value::Map(features)),
            (s("predicted_label"), opt_string(&p.predicted_label)),
            (s("predicted_value"), opt_double(p.predicted_value)),
            (s("score"), opt_double(p.score)),
            (s("class_probabilities"), cp),
            (s("segments"), Value::Map(segments)),
            (s("latency_ms"), opt_double(p.latency_ms)),
        ])
    }

    fn close(a: f64, b: f64) -> bool {
        a == b || (a - b).abs() <= 4.0 * f64::EPSILON * a.abs().max(b.abs())
    }

    fn close_opt(a: Option<f64>, b: Option<f64>) -> bool {
        match (a, b) {
            (Some(x), Some(y)) => close(x, y),
            (x, y) => x == y,
        }
    }

    /// Equal, except that doubles may differ in their last bits.
    fn approx_same(a: &PredictionEvent, b: &PredictionEvent) -> bool {
        let features = a.features.len() == b.features.len()
            && a.features
                .iter()
                .zip(b.features.iter())
                .all(|((ka, va), (kb, vb))| {
                    ka == kb
                        && match (va, vb) {
                            (FeatureValue::Double(x), FeatureValue::Double(y)) => close(*x, *y),
                            (x, y) => x == y,
                        }
                });
        let cp = match (&a.class_probabilities, &b.class_probabilities) {
            (Some(x), Some(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y.iter())
                        .all(|((ka, va), (kb, vb))| ka == kb && close(*va, *vb))
            }
            (x, y) => x == y,
        };
        features
            && cp
            && a.request_id == b.request_id
            && a.model_id == b.model_id
            && a.model_version == b.model_version
            && a.timestamp == b.timestamp
            && a.predicted_label == b.predicted_label
            && close_opt(a.predicted_value, b.predicted_value)
            && close_opt(a.score, b.score)
            && a.segments == b.segments
            && close_opt(a.latency_ms, b.latency_ms)
    }

    #[test]
    fn rabin_matches_apache_avro_where_its_canonical_form_is_right() {
        // No logical types: apache-avro's canonical form is the spec's, so
        // its Rabin digest checks ours independently.
        let text = r#"{"type":"record","name":"R","namespace":"n","doc":"d","fields":[
            {"name":"a","type":"string","default":"x"},
            {"name":"b","type":{"type":"map","values":["null","double"]}},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
            {"name":"f","type":{"type":"fixed","name":"F","size":4}},
            {"name":"g","type":{"type":"array","items":"E"}}]}"#;
        let schema = Schema::parse_str(text).unwrap();
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        let ours = avro::canonical_form(&json).unwrap();
        assert_eq!(ours, schema.canonical_form());
        assert_eq!(
            avro::rabin_fingerprint(ours.as_bytes()).to_vec(),
            schema.fingerprint::<apache_avro::rabin::Rabin>().bytes
        );
    }

    fn sorted<V: Clone>(e: &Entries<V>) -> Vec<(String, V)> {
        let mut v = e.0.clone();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn arb_feature() -> impl Strategy<Value = FeatureValue> {
        prop_oneof![
            Just(FeatureValue::Null),
            any::<bool>().prop_map(FeatureValue::Bool),
            any::<i64>().prop_map(FeatureValue::Long),
            (-1e12f64..1e12).prop_map(FeatureValue::Double),
            "[a-zA-Z0-9 é]{0,8}".prop_map(FeatureValue::String),
        ]
    }

    prop_compose! {
        fn arb_prediction()(
            request_id in "[a-z0-9-]{1,12}",
            model_id in "[a-z]{1,6}",
            model_version in "v[0-9]{1,3}",
            timestamp in 1i64..MAX_TIMESTAMP_MS,
            features in proptest::collection::btree_map("[a-z_]{1,6}", arb_feature(), 0..12),
            predicted_label in proptest::option::of("[a-z0-9]{0,4}"),
            predicted_value in proptest::option::of(-1e9f64..1e9),
            score in proptest::option::of(0.0f64..=1.0),
            class_probabilities in proptest::option::of(
                proptest::collection::btree_map("[a-z]{1,3}", 0.0f64..=1.0, 0..4)),
            segments in proptest::collection::btree_map("[a-z]{1,5}", "[A-Z]{0,3}", 0..3),
            latency_ms in proptest::option::of(0.0f64..1e4),
        ) -> PredictionEvent {
            let mut p = PredictionEvent {
                request_id, model_id, model_version, timestamp,
                features: features.into_iter().collect(),
                predicted_label, predicted_value, score,
                class_probabilities: class_probabilities.map(|m: BTreeMap<String, f64>| m.into_iter().collect()),
                segments: segments.into_iter().collect(),
                latency_ms,
            };
            if p.predicted_label.is_none() && p.predicted_value.is_none()
                && p.score.is_none() && p.class_probabilities.is_none() {
                p.score = Some(0.5);
            }
            p
        }
    }

    // ------------------------------------------------------- field mapping

    fn mapped(format: Format) -> Decoder {
        let cfg: crate::ingest::mapping::MappingConfig = toml::from_str(
            r#"
[predictions]
request_id = { header = "x-request-id" }
model_id = { value = "fraud" }
model_version = "/ver"
timestamp = "/ts"
timestamp_unit = "s"
features = ["/amount"]
score = "/p"
[labels]
request_id = "/id"
timestamp = "/at"
timestamp_unit = "rfc3339"
actual_label = "/outcome"
"#,
        )
        .unwrap();
        Decoder::new(format).with_mappings(Mappings::compile(&cfg, format, false).unwrap())
    }

    #[test]
    fn mapped_topics_read_json_records_in_the_users_shape() {
        let h = [("x-request-id", b"a1".as_slice())];
        for f in [Format::Auto, Format::Json] {
            let d = mapped(f);
            let ev = d
                .decode_with_headers(
                    P,
                    br#" {"ver":"3","ts":1733140000,"amount":12.5,"p":0.91}"#,
                    &h,
                )
                .unwrap();
            assert_eq!(
                ev,
                pred(PredictionEvent {
                    request_id: s("a1"),
                    model_id: s("fraud"),
                    model_version: s("3"),
                    timestamp: 1_733_140_000_000,
                    features: Entries(vec![(s("amount"), FeatureValue::Double(12.5))]),
                    score: Some(0.91),
                    ..Default::default()
                })
            );
            let ev = d
                .decode_with_headers(
                    G,
                    br#"{"id":7,"at":"2024-12-02T12:00:00Z","outcome":"1"}"#,
                    &[],
                )
                .unwrap();
            assert_eq!(
                ev,
                gt(GroundTruthEvent {
                    request_id: s("7"),
                    timestamp: 1_733_140_800_000,
                    actual_label: Some(s("1")),
                    actual_value: None,
                })
            );
            // Our own shape on a mapped topic: the mapped paths are missing.
            let native = encode_json(&pred(oracle_prediction_min()));
            let e = d.decode_with_headers(P, &native, &h).unwrap_err();
            assert_eq!(e.kind(), "mapping", "{e}");
            assert_eq!(
                e.to_string(),
                "field mapping: model_version (path \"/ver\") is missing or null"
            );
            // Avro framings are refused; broken JSON is a JSON error.
            for bytes in [
                encode_confluent(&pred(oracle_prediction_min()), 1),
                encode_single_object(&pred(oracle_prediction_min())),
            ] {
                let e = d.decode_with_headers(P, &bytes, &h).unwrap_err();
                assert_eq!(e.kind(), "format", "{e}");
                assert!(e.to_string().contains("kafka.mapping is set"), "{e}");
            }
            assert_eq!(
                d.decode_with_headers(P, b"{\"ver\":", &h)
                    .unwrap_err()
                    .kind(),
                "json"
            );
            assert_eq!(
                d.decode_with_headers(P, b" \n", &h).unwrap_err(),
                DecodeError::Empty
            );
            // The event rules apply to mapped events too.
            let e = d
                .decode_with_headers(P, br#"{"ver":"3","ts":1733140000,"p":1.5}"#, &h)
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "invalid event: score 1.5 out of range [0, 1]"
            );
            let e = d
                .decode_with_headers(P, br#"{"ver":"","ts":1733140000,"p":0.5}"#, &h)
                .unwrap_err();
            assert_eq!(e.kind(), "validation", "{e}");
            let e = d
                .decode_with_headers(P, br#"{"ver":"3","ts":-5,"p":0.5}"#, &h)
                .unwrap_err();
            assert_eq!(e.kind(), "validation", "{e}");
        }
    }

    /// A producer's own nested Avro record, Confluent-framed with the id
    /// of its schema in the registry, read on a mapped topic: the writer
    /// schema's record is mapped field by field like a JSON record.
    #[test]
    fn mapped_topics_read_the_producers_own_avro_records_through_the_registry() {
        const SCHEMA: &str = r#"{"type":"record","name":"Scored","namespace":"com.acme","fields":[
          {"name":"meta","type":{"type":"record","name":"Meta","fields":[
            {"name":"id","type":"string"},
            {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"model","type":{"type":"record","name":"Model","fields":[
              {"name":"name","type":"string"},{"name":"version","type":"int"}]}}]}},
          {"name":"inputs","type":{"type":"map","values":["null","double","string"]}},
          {"name":"out","type":["null",{"type":"record","name":"Out","fields":[
            {"name":"p","type":"float"},{"name":"label","type":"string"}]}]},
          {"name":"ctx","type":{"type":"array","items":"string"}}]}"#;
        let cfg: crate::ingest::mapping::MappingConfig = toml::from_str(
            r#"
[predictions]
request_id = "/meta/id"
model_id = "/meta/model/name"
model_version = "/meta/model/version"
timestamp = "/meta/at"
features = "/inputs"
score = "/out/p"
predicted_label = "/out/label"
segments = [{ path = "/ctx/0", name = "country" }]
"#,
        )
        .unwrap();
        let schema = Schema::parse_str(SCHEMA).unwrap();
        let record = |fields: Vec<(&str, Value)>| {
            Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        };
        let datum = apache_avro::to_avro_datum(
            &schema,
            record(vec![
                (
                    "meta",
                    record(vec![
                        ("id", Value::String("r-1".into())),
                        ("at", Value::TimestampMillis(1_733_140_000_123)),
                        (
                            "model",
                            record(vec![
                                ("name", Value::String("fraud".into())),
                                ("version", Value::Int(3)),
                            ]),
                        ),
                    ]),
                ),
                (
                    "inputs",
                    Value::Map(HashMap::from([
                        (
                            "amount".to_owned(),
                            Value::Union(1, Box::new(Value::Double(12.5))),
                        ),
                        (
                            "channel".to_owned(),
                            Value::Union(2, Box::new(Value::String("web".into()))),
                        ),
                        ("age".to_owned(), Value::Union(0, Box::new(Value::Null))),
                    ])),
                ),
                (
                    "out",
                    Value::Union(
                        1,
                        Box::new(record(vec![
                            ("p", Value::Float(0.75)),
                            ("label", Value::String("1".into())),
                        ])),
                    ),
                ),
                ("ctx", Value::Array(vec![Value::String("DE".into())])),
            ]),
        )
        .unwrap();
        let mut framed = vec![CONFLUENT_MAGIC];
        framed.extend_from_slice(&42u32.to_be_bytes());
        framed.extend_from_slice(&datum);
        let cache = Arc::new(SchemaCache::new(8));
        cache.insert(42, resolve::WriterSchema::parse(SCHEMA));
        cache.insert(43, Err("the registry does not know schema id 43".into()));
        for format in [Format::Auto, Format::ConfluentAvro] {
            let d = Decoder::new(format)
                .with_mappings(Mappings::compile(&cfg, format, true).unwrap())
                .with_registry(cache.clone());
            let ev = d.decode_with_headers(P, &framed, &[]).unwrap();
            assert_eq!(
                ev,
                pred(PredictionEvent {
                    request_id: s("r-1"),
                    model_id: s("fraud"),
                    model_version: s("3"),
                    timestamp: 1_733_140_000_123,
                    // In name order (module doc of mapping).
                    features: Entries(vec![
                        (s("age"), FeatureValue::Null),
                        (s("amount"), FeatureValue::Double(12.5)),
                        (s("channel"), FeatureValue::String(s("web"))),
                    ]),
                    score: Some(0.75),
                    predicted_label: Some(s("1")),
                    segments: Entries(vec![(s("country"), s("DE"))]),
                    ..Default::default()
                }),
                "{format:?}"
            );
            // An id the registry does not know is a schema dead letter.
            let mut unknown = framed.clone();
            unknown[1..5].copy_from_slice(&43u32.to_be_bytes());
            let e = d.decode_with_headers(P, &unknown, &[]).unwrap_err();
            assert_eq!(e.kind(), "schema", "{e}");
            assert!(e.to_string().starts_with("schema id 43: "), "{e}");
            // A datum cut short is an Avro error, not a panic.
            let e = d
                .decode_with_headers(P, &framed[..framed.len() - 3], &[])
                .unwrap_err();
            assert_eq!(e.kind(), "avro", "{e}");
        }
        // confluent-avro takes no JSON, even on a mapped topic.
        let d = Decoder::new(Format::ConfluentAvro)
            .with_mappings(Mappings::compile(&cfg, Format::ConfluentAvro, true).unwrap())
            .with_registry(cache.clone());
        let e = d
            .decode_with_headers(P, br#"{"meta":{}}"#, &[])
            .unwrap_err();
        assert_eq!(e.kind(), "format", "{e}");
        // Without a registry a frame has no writer schema to map with.
        let d = Decoder::new(Format::Auto)
            .with_mappings(Mappings::compile(&cfg, Format::Auto, false).unwrap());
        let e = d.decode_with_headers(P, &framed, &[]).unwrap_err();
        assert!(
            e.to_string().contains("needs kafka.schema_registry.url"),
            "{e}"
        );
    }

    #[test]
    fn unmapped_topics_decode_as_before() {
        let cfg: crate::ingest::mapping::MappingConfig = toml::from_str(
            "[labels]\nrequest_id = \"/id\"\ntimestamp = \"/at\"\nactual_value = \"/v\"\n",
        )
        .unwrap();
        let d = auto().with_mappings(Mappings::compile(&cfg, Format::Auto, false).unwrap());
        assert!(d.is_mapped(G) && !d.is_mapped(P));
        assert!(!d.mappings().uses_headers());
        for (_, bytes) in all_encodings(&pred(oracle_prediction_min())) {
            assert_eq!(
                d.decode_with_headers(P, &bytes, &[]).unwrap(),
                pred(oracle_prediction_min())
            );
        }
        assert_eq!(
            d.decode_with_headers(G, br#"{"id":"x","at":5,"v":2}"#, &[])
                .unwrap(),
            gt(GroundTruthEvent {
                request_id: s("x"),
                timestamp: 5,
                actual_label: None,
                actual_value: Some(2.0),
            })
        );
        // map_record: the entry point for records decoded elsewhere.
        assert!(d.map_record(P, &serde_json::json!({}), &[]).is_none());
        let r = d
            .map_record(G, &serde_json::json!({"id":"x","at":5}), &[])
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), "validation");
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::json;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|u| json!(u)),
            any::<f64>().prop_map(|f| json!(f)),
            "[0-9a-zA-Z.:+TZ -]{0,24}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the values at the mapped paths, the mapped decoder
        /// returns an event or a dead-letter reason, never panics.
        #[test]
        fn mapped_records_of_any_values_never_panic(
            ver in arb_json(), ts in arb_json(), amount in arb_json(), p in arb_json(),
            id in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let rec = serde_json::json!({"ver": ver, "ts": ts, "amount": amount, "p": p});
            let bytes = serde_json::to_vec(&rec).unwrap();
            for f in [Format::Auto, Format::Json] {
                let h = [("x-request-id", id.as_slice())];
                match mapped(f).decode_with_headers(P, &bytes, &h) {
                    Ok(ev) => prop_assert!(validate(&ev).is_ok()),
                    Err(e) => prop_assert!(
                        ["mapping", "validation"].contains(&e.kind()),
                        "{}", e
                    ),
                }
            }
        }

        #[test]
        fn apache_avro_reads_what_we_write(p in arb_prediction()) {
            let bytes = encode_avro(&pred(p.clone()));
            let mut rd = &bytes[..];
            let v = apache_avro::from_avro_datum(&SCHEMAS.prediction, &mut rd, None).unwrap();
            prop_assert!(rd.is_empty(), "apache-avro left {} bytes", rd.len());
            prop_assert_eq!(v, prediction_value(&p));
        }

        #[test]
        fn we_read_what_apache_avro_writes(p in arb_prediction()) {
            let bytes = apache_avro::to_avro_datum(&SCHEMAS.prediction, prediction_value(&p)).unwrap();
            let InputEvent::Prediction(back) = auto().decode(P, &bytes).unwrap() else {
                panic!("not a prediction")
            };
            // apache-avro maps are hash maps: compare entries by key.
            prop_assert_eq!(sorted(&back.features), sorted(&p.features));
            prop_assert_eq!(sorted(&back.segments), sorted(&p.segments));
            prop_assert_eq!(
                back.class_probabilities.as_ref().map(sorted),
                p.class_probabilities.as_ref().map(sorted)
            );
            let strip = |mut x: PredictionEvent| {
                x.features = Entries::default();
                x.segments = Entries::default();
                x.class_probabilities = x.class_probabilities.map(|_| Entries::default());
                x
            };
            prop_assert_eq!(strip(back), strip(p));
        }

        #[test]
        fn ground_truth_agrees_with_apache_avro(
            request_id in "[a-z0-9]{1,10}",
            timestamp in 1i64..MAX_TIMESTAMP_MS,
            actual_label in proptest::option::of("[a-z0-9]{0,4}"),
            actual_value in proptest::option::of(-1e9f64..1e9),
        ) {
            let g = GroundTruthEvent { request_id, timestamp, actual_label, actual_value };
            let value = Value::Record(vec![
                (s("request_id"), Value::String(g.request_id.clone())),
                (s("timestamp"), Value::TimestampMillis(g.timestamp)),
                (s("actual_label"), opt_string(&g.actual_label)),
                (s("actual_value"), opt_double(g.actual_value)),
            ]);
            let theirs = apache_avro::to_avro_datum(&SCHEMAS.ground_truth, value).unwrap();
            prop_assert_eq!(&encode_avro(&gt(g.clone())), &theirs);
            if g.actual_label.is_some() || g.actual_value.is_some() {
                prop_assert_eq!(auto().decode(G, &theirs).unwrap(), gt(g));
            }
        }

        #[test]
        fn every_format_round_trips(p in arb_prediction(), id in any::<u32>()) {
            let ev = pred(p.clone());
            for bytes in [encode_avro(&ev), encode_confluent(&ev, id), encode_single_object(&ev)] {
                prop_assert_eq!(auto().decode(P, &bytes).unwrap(), ev.clone());
            }
            // serde_json (without its float_roundtrip feature) may parse the
            // shortest decimal of a double one ulp away.
            let InputEvent::Prediction(back) = auto().decode(P, &encode_json(&ev)).unwrap() else {
                panic!("not a prediction")
            };
            prop_assert!(approx_same(&back, &p), "{back:?} != {p:?}");
        }

        #[test]
        fn random_bytes_never_panic(
            prefix in prop_oneof![
                Just(vec![]),
                Just(vec![0u8, 0, 0, 0, 1]),
                Just([&[0xC3u8, 0x01][..], &SCHEMAS.prediction_fingerprint[..]].concat()),
                Just([&[0xC3u8, 0x01][..], &SCHEMAS.ground_truth_fingerprint[..]].concat()),
                Just(b"{\"request_id\":".to_vec()),
            ],
            body in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            let payload = [prefix, body].concat();
            for f in [Format::Auto, Format::Json, Format::Avro, Format::ConfluentAvro] {
                for k in [P, G] {
                    // Ok or Err, both fine: what matters is that it returns.
                    let r = Decoder::new(f).decode(k, &payload);
                    if let Err(e) = r {
                        prop_assert!(!e.to_string().is_empty());
                    }
                }
            }
            let _ = decode_alert(&payload);
        }

        #[test]
        fn mutated_valid_datums_never_panic(
            p in arb_prediction(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = encode_single_object(&pred(p));
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = auto().decode(P, &bytes);
            let _ = auto().decode(G, &bytes);
        }
    }
}
