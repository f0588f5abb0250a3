//! Field mapping: events in the user's own record shape (`[kafka.mapping.predictions]`,
//! `[kafka.mapping.labels]`), turned into our [`crate::model::InputEvent`]s.
//!
//! Each of our fields names a source: a JSON Pointer path (RFC 6901) into the
//! record, a constant, or a Kafka message header. The record is a
//! [`serde_json::Value`], so any payload that can be turned into JSON (a JSON
//! message, or an Avro record decoded with its writer schema) can be mapped.
//! Pure: record and headers in, event out; every failure is a
//! [`DecodeError::Mapping`] naming our field and where it was looked for,
//! never the event's values. The README ("Field mapping") documents the
//! conversion rules implemented here.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::decode::DecodeError;
use crate::config::Format;
use crate::model::{Entries, FeatureValue, GroundTruthEvent, PredictionEvent};

// ------------------------------------------------------------- configuration

/// `[kafka.mapping]`: the record shape of each input topic. Absent (the
/// default) = our own shape (`schemas/*.avsc` field names).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MappingConfig {
    /// `[kafka.mapping.predictions]`: where the fields of a prediction are in
    /// the records of the predictions topic. Default: none (our shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predictions: Option<PredictionMapping>,
    /// `[kafka.mapping.labels]`: where the fields of a ground-truth event are
    /// in the records of the ground-truth topic. Default: none (our shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<LabelMapping>,
}

impl MappingConfig {
    /// True when neither topic is mapped.
    pub fn is_empty(&self) -> bool {
        self.predictions.is_none() && self.labels.is_none()
    }
}

/// `[kafka.mapping.predictions]`. Required: `request_id`, `model_id`,
/// `model_version`, `timestamp` and at least one of `score`,
/// `predicted_label`, `predicted_value`, `class_probabilities`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PredictionMapping {
    /// Join key (string; numbers are stringified). Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<Source>,
    /// Model id, usually a constant (`{ value = "fraud" }`). Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<Source>,
    /// Model version. Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<Source>,
    /// Event time, in `timestamp_unit`. Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Source>,
    /// Unit of `timestamp`: `ms`, `s`, `us` or `rfc3339`. Default `ms`.
    #[serde(default)]
    pub timestamp_unit: TimestampUnit,
    /// Features: a path to an object (every member is a feature) or a list
    /// of sources (named by `name` or the path's last segment). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Fields>,
    /// Positive-class probability (number). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<Source>,
    /// Predicted class (string; numbers are stringified). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_label: Option<Source>,
    /// Predicted value (number). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_value: Option<Source>,
    /// Probability per class: a path to an object of numbers. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_probabilities: Option<Source>,
    /// Segments: a path to an object or a list of sources, as `features`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<Fields>,
    /// Inference latency in milliseconds (number). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<Source>,
}

/// `[kafka.mapping.labels]`. Required: `request_id`, `timestamp` and at
/// least one of `actual_label`, `actual_value`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LabelMapping {
    /// Join key (string; numbers are stringified). Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<Source>,
    /// When the outcome became known, in `timestamp_unit`. Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Source>,
    /// Unit of `timestamp`: `ms`, `s`, `us` or `rfc3339`. Default `ms`.
    #[serde(default)]
    pub timestamp_unit: TimestampUnit,
    /// True class (string; numbers are stringified). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_label: Option<Source>,
    /// True value (number). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_value: Option<Source>,
}

/// The unit of a mapped timestamp.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum TimestampUnit {
    /// Milliseconds since the Unix epoch (number or numeric string).
    #[default]
    #[serde(rename = "ms")]
    Millis,
    /// Seconds since the Unix epoch (number or numeric string, fractions allowed).
    #[serde(rename = "s")]
    Seconds,
    /// Microseconds since the Unix epoch (number or numeric string).
    #[serde(rename = "us", alias = "µs")]
    Micros,
    /// An RFC 3339 string such as `2026-12-02T12:00:00.250Z` or `...+01:00`.
    #[serde(rename = "rfc3339")]
    Rfc3339,
}

/// Where one value comes from: a JSON Pointer string (`"/meta/id"`), or a
/// table with exactly one of `path`, `value` (a constant) or `header`, and
/// an optional `name` (the feature or segment name, in `features` /
/// `segments` lists).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceTable {
    /// A JSON Pointer (RFC 6901) into the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A constant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// The name of a Kafka message header (its value read as UTF-8 text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The feature or segment name (lists only). Default: the path's last
    /// segment, or the header name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A source as written in the configuration (see [`SourceTable`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Source(pub SourceTable);

impl Source {
    /// A JSON Pointer source.
    pub fn path(p: &str) -> Self {
        Source(SourceTable {
            path: Some(p.into()),
            ..Default::default()
        })
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            SourceTable {
                path: Some(p),
                value: None,
                header: None,
                name: None,
            } => s.serialize_str(p),
            t => t.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Source;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a JSON Pointer string such as \"/meta/id\", or a table with one of path, value, header",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Source, E> {
                Ok(Source::path(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Source, A::Error> {
                SourceTable::deserialize(de::value::MapAccessDeserializer::new(a)).map(Source)
            }
        }
        d.deserialize_any(V)
    }
}

/// Features or segments: a path to an object, or a list of sources.
#[derive(Debug, Clone, PartialEq)]
pub enum Fields {
    /// Every member of the object at this JSON Pointer.
    Object(String),
    /// One entry per source.
    List(Vec<Source>),
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Fields::Object(p) => s.serialize_str(p),
            Fields::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a JSON Pointer to an object, or a list of JSON Pointers / source tables",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Fields, E> {
                Ok(Fields::Object(v.into()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Fields, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = a.next_element::<Source>()? {
                    out.push(s);
                }
                Ok(Fields::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ------------------------------------------------------------------ compiled

/// A JSON Pointer split into its unescaped reference tokens.
#[derive(Debug, Clone, PartialEq)]
struct Pointer {
    text: String,
    tokens: Vec<String>,
}

impl Pointer {
    /// RFC 6901: `""` (the whole record) or `/`-separated tokens with `~0`
    /// for `~` and `~1` for `/`.
    fn parse(text: &str) -> Result<Pointer, String> {
        if text.is_empty() {
            return Ok(Pointer {
                text: String::new(),
                tokens: Vec::new(),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "{text:?} is not a JSON Pointer, expected \"\" or a path starting with / such as \"/meta/id\""
            ));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut tok = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => tok.push('~'),
                        Some('1') => tok.push('/'),
                        _ => {
                            return Err(format!(
                                "{text:?} is not a JSON Pointer: ~ must be followed by 0 (for ~) or 1 (for /)"
                            ))
                        }
                    }
                } else {
                    tok.push(c);
                }
            }
            tokens.push(tok);
        }
        Ok(Pointer {
            text: text.into(),
            tokens,
        })
    }

    /// The value at this pointer, if any (RFC 6901 evaluation; array
    /// indices are decimal without leading zeros).
    fn lookup<'a>(&self, mut v: &'a Value) -> Option<&'a Value> {
        for t in &self.tokens {
            v = match v {
                Value::Object(m) => m.get(t)?,
                Value::Array(a) => {
                    if t.is_empty() || (t.len() > 1 && t.starts_with('0')) {
                        return None;
                    }
                    a.get(t.parse::<usize>().ok()?)?
                }
                _ => return None,
            };
        }
        Some(v)
    }

    fn last_token(&self) -> Option<&str> {
        self.tokens.last().map(String::as_str)
    }
}

/// A compiled source.
#[derive(Debug, Clone, PartialEq)]
enum Src {
    Path(Pointer),
    Const(Value),
    Header(String),
}

/// What a source found.
#[derive(Clone, Copy)]
enum Found<'a> {
    Json(&'a Value),
    Text(&'a str),
}

impl Src {
    fn compile(field: &str, s: &Source, named: bool) -> Result<(Src, Option<String>), String> {
        let t = &s.0;
        let src = match (&t.path, &t.value, &t.header) {
            (Some(p), None, None) => {
                Src::Path(Pointer::parse(p).map_err(|e| format!("{field}: {e}"))?)
            }
            (None, Some(v), None) => {
                if v.is_object() || v.is_array() || v.is_null() {
                    return Err(format!(
                        "{field}: value must be a string, number or boolean constant"
                    ));
                }
                Src::Const(v.clone())
            }
            (None, None, Some(h)) => {
                if h.is_empty() {
                    return Err(format!("{field}: header is empty, expected a header name"));
                }
                Src::Header(h.clone())
            }
            _ => {
                return Err(format!(
                    "{field}: expected exactly one of path, value, header"
                ))
            }
        };
        if !named && t.name.is_some() {
            return Err(format!(
                "{field}: name is only for entries of features and segments lists"
            ));
        }
        let name = match (&t.name, &src) {
            (Some(n), _) => Some(n.clone()),
            (None, Src::Path(p)) => p.last_token().map(str::to_owned),
            (None, Src::Header(h)) => Some(h.clone()),
            (None, Src::Const(_)) => None,
        };
        if named && name.as_deref().is_none_or(str::is_empty) {
            return Err(format!(
                "{field}: no name, expected name = \"...\" (a constant or the whole record has no last path segment)"
            ));
        }
        Ok((src, name))
    }

    fn describe(&self) -> String {
        match self {
            Src::Path(p) => format!("path {:?}", p.text),
            Src::Const(_) => "constant".into(),
            Src::Header(h) => format!("header {h:?}"),
        }
    }

    /// `Ok(None)`: the path or header is absent.
    fn find<'a>(
        &'a self,
        field: &str,
        record: &'a Value,
        headers: &[(&'a str, &'a [u8])],
    ) -> Result<Option<Found<'a>>, DecodeError> {
        match self {
            Src::Path(p) => Ok(p.lookup(record).map(Found::Json)),
            Src::Const(v) => Ok(Some(Found::Json(v))),
            // The last header of that name wins (as Kafka's `lastHeader`).
            Src::Header(h) => match headers.iter().rev().find(|(k, _)| k == h) {
                None => Ok(None),
                Some((_, bytes)) => std::str::from_utf8(bytes)
                    .map(|s| Some(Found::Text(s)))
                    .map_err(|_| mapping(field, self, "is not UTF-8 text")),
            },
        }
    }
}

fn mapping(field: &str, src: &Src, what: &str) -> DecodeError {
    DecodeError::Mapping(format!("{field} ({}) {what}", src.describe()))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A field of ours and its source.
#[derive(Debug, Clone, PartialEq)]
struct Field {
    name: &'static str,
    src: Src,
}

impl Field {
    fn compile(
        section: &str,
        name: &'static str,
        s: &Option<Source>,
        required: bool,
    ) -> Result<Option<Field>, String> {
        match s {
            None if required => Err(format!(
                "{section}.{name} is missing, expected a JSON Pointer such as \"/id\", {{ header = \"...\" }} or {{ value = \"...\" }}"
            )),
            None => Ok(None),
            Some(s) => {
                let (src, _) = Src::compile(&format!("{section}.{name}"), s, false)?;
                Ok(Some(Field { name, src }))
            }
        }
    }

    fn compile_object(
        section: &str,
        name: &'static str,
        s: &Option<Source>,
    ) -> Result<Option<Field>, String> {
        let f = Field::compile(section, name, s, false)?;
        if let Some(Field { src, .. }) = &f {
            if !matches!(src, Src::Path(_)) {
                return Err(format!(
                    "{section}.{name}: expected a JSON Pointer to an object"
                ));
            }
        }
        Ok(f)
    }

    fn find<'a>(
        &'a self,
        record: &'a Value,
        headers: &[(&'a str, &'a [u8])],
    ) -> Result<Option<Found<'a>>, DecodeError> {
        match self.src.find(self.name, record, headers)? {
            None | Some(Found::Json(Value::Null)) => Ok(None),
            found => Ok(found),
        }
    }

    fn err(&self, what: &str) -> DecodeError {
        mapping(self.name, &self.src, what)
    }

    fn string(&self, r: &Value, h: &[(&str, &[u8])]) -> Result<String, DecodeError> {
        self.opt_string(r, h)?
            .ok_or_else(|| self.err("is missing or null"))
    }

    fn opt_string(&self, r: &Value, h: &[(&str, &[u8])]) -> Result<Option<String>, DecodeError> {
        match self.find(r, h)? {
            None => Ok(None),
            Some(Found::Text(s)) => Ok(Some(s.to_owned())),
            Some(Found::Json(v)) => scalar_string(v)
                .map(Some)
                .ok_or_else(|| self.err(&format!("expected a string, got {}", type_name(v)))),
        }
    }

    fn opt_number(&self, r: &Value, h: &[(&str, &[u8])]) -> Result<Option<f64>, DecodeError> {
        match self.find(r, h)? {
            None => Ok(None),
            Some(Found::Text(s)) => parse_number(s)
                .map(Some)
                .ok_or_else(|| self.err("expected a number, got a non-numeric header")),
            Some(Found::Json(v)) => json_number(v).map(Some).ok_or_else(|| {
                self.err(&format!(
                    "expected a number or numeric string, got {}",
                    describe_value(v)
                ))
            }),
        }
    }

    fn timestamp(
        &self,
        unit: TimestampUnit,
        r: &Value,
        h: &[(&str, &[u8])],
    ) -> Result<i64, DecodeError> {
        let found = self
            .find(r, h)?
            .ok_or_else(|| self.err("is missing or null"))?;
        let (text, json) = match found {
            Found::Text(s) => (Some(s), None),
            Found::Json(Value::String(s)) => (Some(s.as_str()), None),
            Found::Json(v) => (None, Some(v)),
        };
        let ms = match (unit, text, json) {
            (TimestampUnit::Rfc3339, Some(s), _) => chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .map_err(|_| {
                    self.err("expected an RFC 3339 time such as \"2026-12-02T12:00:00Z\"")
                })?,
            (_, Some(s), _) => numeric_timestamp(unit, Num::parse(s))
                .ok_or_else(|| self.err(&format!("expected a number of {}", unit.name())))?,
            (TimestampUnit::Rfc3339, None, v) => {
                return Err(self.err(&format!(
                    "expected an RFC 3339 string, got {}",
                    v.map_or("null", type_name)
                )))
            }
            (_, None, Some(Value::Number(n))) => numeric_timestamp(unit, Num::of(n))
                .ok_or_else(|| self.err(&format!("out of range as {}", unit.name())))?,
            (_, None, v) => {
                return Err(self.err(&format!(
                    "expected a number of {}, got {}",
                    unit.name(),
                    v.map_or("null", type_name)
                )))
            }
        };
        Ok(ms)
    }

    fn object<'a>(
        &'a self,
        r: &'a Value,
        h: &[(&'a str, &'a [u8])],
    ) -> Result<Option<&'a serde_json::Map<String, Value>>, DecodeError> {
        match self.find(r, h)? {
            None => Ok(None),
            Some(Found::Json(Value::Object(m))) => Ok(Some(m)),
            Some(Found::Json(v)) => {
                Err(self.err(&format!("expected an object, got {}", type_name(v))))
            }
            Some(Found::Text(_)) => Err(self.err("expected an object, got a header")),
        }
    }
}

impl TimestampUnit {
    fn name(self) -> &'static str {
        match self {
            TimestampUnit::Millis => "milliseconds",
            TimestampUnit::Seconds => "seconds",
            TimestampUnit::Micros => "microseconds",
            TimestampUnit::Rfc3339 => "RFC 3339",
        }
    }
}

/// A parsed number, integer when it is one.
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn of(n: &serde_json::Number) -> Option<Num> {
        match n.as_i64() {
            Some(i) => Some(Num::Int(i)),
            None => n.as_f64().map(Num::Float),
        }
    }

    fn parse(s: &str) -> Option<Num> {
        match s.parse::<i64>() {
            Ok(i) => Some(Num::Int(i)),
            Err(_) => parse_number(s).map(Num::Float),
        }
    }
}

/// Milliseconds from a number in `unit`: integers exactly (microseconds
/// floored), fractions rounded to the nearest millisecond. `None` when out
/// of range or not finite.
fn numeric_timestamp(unit: TimestampUnit, n: Option<Num>) -> Option<i64> {
    let factor = match unit {
        TimestampUnit::Millis => 1.0,
        TimestampUnit::Seconds => 1000.0,
        TimestampUnit::Micros => 0.001,
        TimestampUnit::Rfc3339 => return None,
    };
    match n? {
        Num::Int(i) => match unit {
            TimestampUnit::Millis => Some(i),
            TimestampUnit::Seconds => i.checked_mul(1000),
            TimestampUnit::Micros => Some(i.div_euclid(1000)),
            TimestampUnit::Rfc3339 => None,
        },
        Num::Float(f) => {
            let ms = (f * factor).round();
            // Beyond ±2^63 the cast would saturate: out of range instead.
            (ms.is_finite() && ms.abs() < 9.2e18).then_some(ms as i64)
        }
    }
}

/// A number from a JSON number or a numeric string (Rust's `f64` syntax:
/// no surrounding spaces; `NaN` / `inf` parse and are then refused by validation).
fn json_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => parse_number(s),
        _ => None,
    }
}

fn parse_number(s: &str) -> Option<f64> {
    s.parse::<f64>().ok()
}

/// A value's type, or "a non-numeric string".
fn describe_value(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a non-numeric string",
        other => type_name(other),
    }
}

/// A string field's value: strings as they are, numbers in their JSON
/// spelling, booleans as `true` / `false`.
fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn feature_value(v: &Value) -> Option<FeatureValue> {
    Some(match v {
        Value::Null => FeatureValue::Null,
        Value::Bool(b) => FeatureValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => FeatureValue::Long(i),
            None => FeatureValue::Double(n.as_f64()?),
        },
        Value::String(s) => FeatureValue::String(s.clone()),
        Value::Array(_) | Value::Object(_) => return None,
    })
}

/// Compiled features or segments.
#[derive(Debug, Clone, PartialEq)]
enum FieldSet {
    Object(Field),
    /// (`features.<name>` / `segments.<name>` for error texts, name, source).
    List(Vec<(String, String, Src)>),
}

impl FieldSet {
    fn compile(
        section: &str,
        name: &'static str,
        f: &Option<Fields>,
    ) -> Result<Option<FieldSet>, String> {
        let at = format!("{section}.{name}");
        match f {
            None => Ok(None),
            Some(Fields::Object(p)) => Ok(Some(FieldSet::Object(Field {
                name,
                src: Src::Path(Pointer::parse(p).map_err(|e| format!("{at}: {e}"))?),
            }))),
            Some(Fields::List(list)) => {
                if list.is_empty() {
                    return Err(format!(
                        "{at} is an empty list, expected at least one source"
                    ));
                }
                let mut out: Vec<(String, String, Src)> = Vec::with_capacity(list.len());
                for (i, s) in list.iter().enumerate() {
                    let (src, n) = Src::compile(&format!("{at}[{i}]"), s, true)?;
                    let Some(n) = n else {
                        return Err(format!("{at}[{i}]: no name, expected name = \"...\""));
                    };
                    if out.iter().any(|(_, k, _)| *k == n) {
                        return Err(format!(
                            "{at}[{i}]: name {n:?} appears twice, expected distinct names (set name = \"...\")"
                        ));
                    }
                    out.push((format!("{name}.{n}"), n, src));
                }
                Ok(Some(FieldSet::List(out)))
            }
        }
    }

    /// Features: members or listed sources; absent ones are left out, null
    /// is a null feature value, nested objects and arrays are refused.
    fn features(
        &self,
        r: &Value,
        h: &[(&str, &[u8])],
    ) -> Result<Entries<FeatureValue>, DecodeError> {
        let mut out = Vec::new();
        match self {
            FieldSet::Object(f) => {
                if let Some(m) = f.object(r, h)? {
                    out.reserve(m.len());
                    for (k, v) in m {
                        let fv = feature_value(v).ok_or_else(|| {
                            f.err(&format!(
                                "member {k:?}: expected null, boolean, number or string, got {}",
                                type_name(v)
                            ))
                        })?;
                        out.push((k.clone(), fv));
                    }
                }
            }
            FieldSet::List(list) => {
                out.reserve(list.len());
                for (field, name, src) in list {
                    let fv = match src.find(field, r, h)? {
                        None => continue,
                        Some(Found::Text(s)) => FeatureValue::String(s.to_owned()),
                        Some(Found::Json(v)) => feature_value(v).ok_or_else(|| {
                            mapping(
                                field,
                                src,
                                &format!(
                                    "expected null, boolean, number or string, got {}",
                                    type_name(v)
                                ),
                            )
                        })?,
                    };
                    out.push((name.clone(), fv));
                }
            }
        }
        Ok(Entries(out))
    }

    /// Segments: strings, numbers and booleans stringified; absent and null
    /// ones are left out, nested objects and arrays are refused.
    fn segments(&self, r: &Value, h: &[(&str, &[u8])]) -> Result<Entries<String>, DecodeError> {
        let mut out = Vec::new();
        match self {
            FieldSet::Object(f) => {
                if let Some(m) = f.object(r, h)? {
                    for (k, v) in m {
                        if v.is_null() {
                            continue;
                        }
                        let s = scalar_string(v).ok_or_else(|| {
                            f.err(&format!(
                                "member {k:?}: expected a string, got {}",
                                type_name(v)
                            ))
                        })?;
                        out.push((k.clone(), s));
                    }
                }
            }
            FieldSet::List(list) => {
                for (field, name, src) in list {
                    let s = match src.find(field, r, h)? {
                        None | Some(Found::Json(Value::Null)) => continue,
                        Some(Found::Text(s)) => s.to_owned(),
                        Some(Found::Json(v)) => scalar_string(v).ok_or_else(|| {
                            mapping(
                                field,
                                src,
                                &format!("expected a string, got {}", type_name(v)),
                            )
                        })?,
                    };
                    out.push((name.clone(), s));
                }
            }
        }
        Ok(Entries(out))
    }
}

/// A compiled `[kafka.mapping.predictions]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledPrediction {
    request_id: Field,
    model_id: Field,
    model_version: Field,
    timestamp: Field,
    timestamp_unit: TimestampUnit,
    features: Option<FieldSet>,
    score: Option<Field>,
    predicted_label: Option<Field>,
    predicted_value: Option<Field>,
    class_probabilities: Option<Field>,
    segments: Option<FieldSet>,
    latency_ms: Option<Field>,
}

/// A compiled `[kafka.mapping.labels]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledLabel {
    request_id: Field,
    timestamp: Field,
    timestamp_unit: TimestampUnit,
    actual_label: Option<Field>,
    actual_value: Option<Field>,
}

fn required(f: Result<Option<Field>, String>) -> Result<Field, String> {
    // `Field::compile` with `required` already refuses a missing field.
    f.and_then(|f| f.ok_or_else(|| "a required mapping field is missing".to_string()))
}

impl CompiledPrediction {
    /// Checks and compiles a prediction mapping; the error names the field
    /// (`section` is its TOML path, e.g. `kafka.mapping.predictions`).
    pub fn compile(section: &str, m: &PredictionMapping) -> Result<Self, String> {
        let c = CompiledPrediction {
            request_id: required(Field::compile(section, "request_id", &m.request_id, true))?,
            model_id: required(Field::compile(section, "model_id", &m.model_id, true))?,
            model_version: required(Field::compile(
                section,
                "model_version",
                &m.model_version,
                true,
            ))?,
            timestamp: required(Field::compile(section, "timestamp", &m.timestamp, true))?,
            timestamp_unit: m.timestamp_unit,
            features: FieldSet::compile(section, "features", &m.features)?,
            score: Field::compile(section, "score", &m.score, false)?,
            predicted_label: Field::compile(section, "predicted_label", &m.predicted_label, false)?,
            predicted_value: Field::compile(section, "predicted_value", &m.predicted_value, false)?,
            class_probabilities: Field::compile_object(
                section,
                "class_probabilities",
                &m.class_probabilities,
            )?,
            segments: FieldSet::compile(section, "segments", &m.segments)?,
            latency_ms: Field::compile(section, "latency_ms", &m.latency_ms, false)?,
        };
        if c.score.is_none()
            && c.predicted_label.is_none()
            && c.predicted_value.is_none()
            && c.class_probabilities.is_none()
        {
            return Err(format!(
                "{section} maps none of score, predicted_label, predicted_value, class_probabilities, expected at least one (every prediction needs an output)"
            ));
        }
        Ok(c)
    }

    /// The prediction in `record` (and `headers`). Not validated: the
    /// decoder applies [`super::decode::validate`] next.
    pub fn map(&self, r: &Value, h: &[(&str, &[u8])]) -> Result<PredictionEvent, DecodeError> {
        let class_probabilities = match &self.class_probabilities {
            None => None,
            Some(f) => match f.object(r, h)? {
                None => None,
                Some(m) => {
                    let mut out = Vec::with_capacity(m.len());
                    for (class, v) in m {
                        let p = json_number(v).ok_or_else(|| {
                            f.err(&format!(
                                "member {class:?}: expected a number, got {}",
                                describe_value(v)
                            ))
                        })?;
                        out.push((class.clone(), p));
                    }
                    Some(Entries(out))
                }
            },
        };
        let opt_num = |f: &Option<Field>| match f {
            Some(f) => f.opt_number(r, h),
            None => Ok(None),
        };
        Ok(PredictionEvent {
            request_id: self.request_id.string(r, h)?,
            model_id: self.model_id.string(r, h)?,
            model_version: self.model_version.string(r, h)?,
            timestamp: self.timestamp.timestamp(self.timestamp_unit, r, h)?,
            features: match &self.features {
                Some(f) => f.features(r, h)?,
                None => Entries::default(),
            },
            predicted_label: match &self.predicted_label {
                Some(f) => f.opt_string(r, h)?,
                None => None,
            },
            predicted_value: opt_num(&self.predicted_value)?,
            score: opt_num(&self.score)?,
            class_probabilities,
            segments: match &self.segments {
                Some(f) => f.segments(r, h)?,
                None => Entries::default(),
            },
            latency_ms: opt_num(&self.latency_ms)?,
        })
    }

    fn uses_headers(&self) -> bool {
        let set = |s: &Option<FieldSet>| match s {
            Some(FieldSet::List(l)) => l.iter().any(|(_, _, s)| matches!(s, Src::Header(_))),
            _ => false,
        };
        [
            Some(&self.request_id),
            Some(&self.model_id),
            Some(&self.model_version),
            Some(&self.timestamp),
            self.score.as_ref(),
            self.predicted_label.as_ref(),
            self.predicted_value.as_ref(),
            self.latency_ms.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|f| matches!(f.src, Src::Header(_)))
            || set(&self.features)
            || set(&self.segments)
    }
}

impl CompiledLabel {
    /// Checks and compiles a label mapping; the error names the field.
    pub fn compile(section: &str, m: &LabelMapping) -> Result<Self, String> {
        let c = CompiledLabel {
            request_id: required(Field::compile(section, "request_id", &m.request_id, true))?,
            timestamp: required(Field::compile(section, "timestamp", &m.timestamp, true))?,
            timestamp_unit: m.timestamp_unit,
            actual_label: Field::compile(section, "actual_label", &m.actual_label, false)?,
            actual_value: Field::compile(section, "actual_value", &m.actual_value, false)?,
        };
        if c.actual_label.is_none() && c.actual_value.is_none() {
            return Err(format!(
                "{section} maps neither actual_label nor actual_value, expected at least one"
            ));
        }
        Ok(c)
    }

    /// The ground-truth event in `record` (and `headers`). Not validated.
    pub fn map(&self, r: &Value, h: &[(&str, &[u8])]) -> Result<GroundTruthEvent, DecodeError> {
        Ok(GroundTruthEvent {
            request_id: self.request_id.string(r, h)?,
            timestamp: self.timestamp.timestamp(self.timestamp_unit, r, h)?,
            actual_label: match &self.actual_label {
                Some(f) => f.opt_string(r, h)?,
                None => None,
            },
            actual_value: match &self.actual_value {
                Some(f) => f.opt_number(r, h)?,
                None => None,
            },
        })
    }

    fn uses_headers(&self) -> bool {
        [
            Some(&self.request_id),
            Some(&self.timestamp),
            self.actual_label.as_ref(),
            self.actual_value.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|f| matches!(f.src, Src::Header(_)))
    }
}

/// The compiled mappings of both topics (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Mappings {
    /// The predictions topic's mapping, if any.
    pub predictions: Option<Arc<CompiledPrediction>>,
    /// The ground-truth topic's mapping, if any.
    pub labels: Option<Arc<CompiledLabel>>,
}

impl Mappings {
    /// Checks and compiles `[kafka.mapping]` for input `format`; the error
    /// names the field and what was expected (without the
    /// `invalid configuration: ` prefix).
    ///
    /// `registry`: a Schema Registry is set, so Confluent-framed Avro
    /// records can be read with their writer schema and mapped too.
    pub fn compile(m: &MappingConfig, format: Format, registry: bool) -> Result<Mappings, String> {
        if !m.is_empty() && format == Format::Avro {
            return Err("kafka.mapping is set with kafka.format = \"avro\", expected \"json\", \"auto\" or (with kafka.schema_registry.url) \"confluent-avro\" (a mapping reads records by their field names: raw Avro carries no writer schema to read a foreign record with)".to_owned());
        }
        if !m.is_empty() && format == Format::ConfluentAvro && !registry {
            return Err("kafka.mapping is set with kafka.format = \"confluent-avro\" but kafka.schema_registry.url is empty, expected a Schema Registry to read the producer's records with their writer schema (or kafka.format = \"json\" / \"auto\")".to_owned());
        }
        Ok(Mappings {
            predictions: m
                .predictions
                .as_ref()
                .map(|p| CompiledPrediction::compile("kafka.mapping.predictions", p))
                .transpose()?
                .map(Arc::new),
            labels: m
                .labels
                .as_ref()
                .map(|l| CompiledLabel::compile("kafka.mapping.labels", l))
                .transpose()?
                .map(Arc::new),
        })
    }

    /// True when neither topic is mapped.
    pub fn is_empty(&self) -> bool {
        self.predictions.is_none() && self.labels.is_none()
    }

    /// True when a mapped field reads a message header (the consumer then
    /// hands the headers over).
    pub fn uses_headers(&self) -> bool {
        self.predictions.as_ref().is_some_and(|p| p.uses_headers())
            || self.labels.as_ref().is_some_and(|l| l.uses_headers())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cfg(toml_text: &str) -> MappingConfig {
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn compile(toml_text: &str) -> Result<Mappings, String> {
        let c: MappingConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        Mappings::compile(&c, Format::Auto, false)
    }

    fn pred(toml_text: &str) -> CompiledPrediction {
        let m = compile(toml_text).unwrap_or_else(|e| panic!("{e}"));
        (*m.predictions.unwrap()).clone()
    }

    fn label(toml_text: &str) -> CompiledLabel {
        let m = compile(toml_text).unwrap_or_else(|e| panic!("{e}"));
        (*m.labels.unwrap()).clone()
    }

    const FLAT: &str = r#"
[predictions]
request_id = { header = "x-request-id" }
model_id = "/svc"
model_version = "/ver"
timestamp = "/ts"
timestamp_unit = "s"
features = ["/amount", "/country", { path = "/geo/city", name = "city" }]
score = "/p"
segments = ["/country"]
latency_ms = "/latency"
"#;

    const NESTED: &str = r#"
[predictions]
request_id = "/meta/id"
model_id = { value = "fraud" }
model_version = "/meta/model/version"
timestamp = "/meta/time"
timestamp_unit = "rfc3339"
features = "/inputs"
score = "/output/p"
predicted_label = "/output/label"
class_probabilities = "/output/probs"
segments = "/ctx"
[labels]
request_id = "/id"
timestamp = "/resolved_at"
timestamp_unit = "rfc3339"
actual_label = "/outcome"
actual_value = "/amount"
"#;

    fn s(x: &str) -> String {
        x.into()
    }

    fn err_of(r: Result<impl fmt::Debug, DecodeError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), "mapping", "{e}");
        e.to_string()
    }

    #[test]
    fn flat_log_line_with_the_request_id_in_a_header() {
        let m = pred(FLAT);
        let rec = json!({"svc":"fraud","ver":"3","ts":1733140000.25,"amount":12.5,
            "country":"DE","geo":{"city":"Berlin"},"p":0.91,"latency":3.2,"extra":[1,2]});
        let h = [("x-request-id", b"a1".as_slice())];
        let p = m.map(&rec, &h).unwrap();
        assert_eq!(
            p,
            PredictionEvent {
                request_id: s("a1"),
                model_id: s("fraud"),
                model_version: s("3"),
                timestamp: 1_733_140_000_250,
                features: Entries(vec![
                    (s("amount"), FeatureValue::Double(12.5)),
                    (s("country"), FeatureValue::String(s("DE"))),
                    (s("city"), FeatureValue::String(s("Berlin"))),
                ]),
                score: Some(0.91),
                segments: Entries(vec![(s("country"), s("DE"))]),
                latency_ms: Some(3.2),
                ..Default::default()
            }
        );
        assert!(compile(FLAT).unwrap().uses_headers());
        assert!(!compile(NESTED).unwrap().uses_headers());
    }

    #[test]
    fn nested_record_with_objects_and_a_constant() {
        let m = pred(NESTED);
        let rec = json!({
            "meta": {"id": 123, "model": {"version": 7}, "time": "2024-12-02T12:00:00.250+01:00"},
            "inputs": {"age": 42, "income": 1234.5, "vip": true, "note": null, "city": "Oslo"},
            "output": {"p": "0.25", "label": 0, "probs": {"0": 0.75, "1": 0.25}},
            "ctx": {"country": "NO", "tier": 2, "beta": false, "gone": null}
        });
        let p = m.map(&rec, &[]).unwrap();
        assert_eq!(p.request_id, "123");
        assert_eq!(p.model_id, "fraud");
        assert_eq!(p.model_version, "7");
        // 11:00:00.250 UTC.
        assert_eq!(p.timestamp, 1_733_137_200_250);
        let mut f = p.features.0.clone();
        f.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            f,
            vec![
                (s("age"), FeatureValue::Long(42)),
                (s("city"), FeatureValue::String(s("Oslo"))),
                (s("income"), FeatureValue::Double(1234.5)),
                (s("note"), FeatureValue::Null),
                (s("vip"), FeatureValue::Bool(true)),
            ]
        );
        assert_eq!(p.score, Some(0.25), "numeric string accepted");
        assert_eq!(p.predicted_label.as_deref(), Some("0"));
        assert_eq!(
            p.class_probabilities,
            Some(Entries(vec![(s("0"), 0.75), (s("1"), 0.25)]))
        );
        let mut seg = p.segments.0.clone();
        seg.sort();
        assert_eq!(
            seg,
            vec![
                (s("beta"), s("false")),
                (s("country"), s("NO")),
                (s("tier"), s("2"))
            ]
        );
        assert_eq!(p.latency_ms, None);
    }

    #[test]
    fn labels_map_with_rfc3339_and_optional_fields() {
        let m = label(NESTED);
        let g = m
            .map(
                &json!({"id":"a1","resolved_at":"2024-12-02T11:00:00Z","outcome":1}),
                &[],
            )
            .unwrap();
        assert_eq!(
            g,
            GroundTruthEvent {
                request_id: s("a1"),
                timestamp: 1_733_137_200_000,
                actual_label: Some(s("1")),
                actual_value: None,
            }
        );
        let g = m
            .map(&json!({"id":"a1","resolved_at":"2024-12-02T11:00:00Z","outcome":null,"amount":"2.5"}), &[])
            .unwrap();
        assert_eq!((g.actual_label, g.actual_value), (None, Some(2.5)));
    }

    fn ts(unit: &str, v: Value) -> Result<i64, DecodeError> {
        let m = label(&format!(
            "[labels]\nrequest_id = \"/id\"\ntimestamp = \"/t\"\ntimestamp_unit = \"{unit}\"\nactual_label = \"/l\"\n"
        ));
        m.map(&json!({"id": "x", "t": v, "l": "1"}), &[])
            .map(|g| g.timestamp)
    }

    #[test]
    fn timestamp_units() {
        assert_eq!(
            ts("ms", json!(1_733_140_000_123i64)).unwrap(),
            1_733_140_000_123
        );
        assert_eq!(ts("ms", json!("1733140000123")).unwrap(), 1_733_140_000_123);
        assert_eq!(
            ts("ms", json!(1.7331400001234e12)).unwrap(),
            1_733_140_000_123
        );
        assert_eq!(ts("s", json!(1_733_140_000)).unwrap(), 1_733_140_000_000);
        assert_eq!(ts("s", json!(1_733_140_000.1)).unwrap(), 1_733_140_000_100);
        assert_eq!(ts("s", json!("1733140000.5")).unwrap(), 1_733_140_000_500);
        assert_eq!(
            ts("us", json!(1_733_140_000_123_999i64)).unwrap(),
            1_733_140_000_123
        );
        assert_eq!(
            ts("µs", json!(1_733_140_000_123_000i64)).unwrap(),
            1_733_140_000_123
        );
        assert_eq!(
            ts("rfc3339", json!("2024-12-02T12:00:00Z")).unwrap(),
            1_733_140_800_000
        );
        assert_eq!(
            ts("rfc3339", json!("2024-12-02T12:00:00.123456-02:30")).unwrap(),
            1_733_149_800_123
        );
        // Failures name our field and the path, never the value.
        let e = err_of(ts("rfc3339", json!("yesterday-secret")));
        assert!(
            e.contains("timestamp (path \"/t\")") && !e.contains("secret"),
            "{e}"
        );
        assert!(
            err_of(ts("rfc3339", json!(17))).contains("expected an RFC 3339 string, got number")
        );
        assert!(err_of(ts("s", json!(true))).contains("expected a number of seconds, got boolean"));
        assert!(err_of(ts("s", json!("soon"))).contains("expected a number of seconds"));
        assert!(err_of(ts("s", json!(i64::MAX))).contains("out of range"));
        assert!(err_of(ts("ms", json!(1e300))).contains("out of range"));
        assert!(
            err_of(ts("ms", json!(null))).contains("timestamp (path \"/t\") is missing or null")
        );
    }

    #[test]
    fn a_missing_required_path_names_the_field_and_the_path() {
        let m = pred(NESTED);
        let rec =
            json!({"meta": {"id": "a", "time": "2024-12-02T12:00:00Z"}, "output": {"p": 0.5}});
        let e = err_of(m.map(&rec, &[]));
        assert_eq!(
            e,
            "field mapping: model_version (path \"/meta/model/version\") is missing or null"
        );
        // A missing optional path is absent.
        let rec = json!({"meta": {"id": "a", "time": "2024-12-02T12:00:00Z", "model": {"version": "1"}}, "output": {"p": 0.5}});
        let p = m.map(&rec, &[]).unwrap();
        assert!(p.features.is_empty() && p.segments.is_empty());
        assert_eq!((p.predicted_label, p.class_probabilities), (None, None));
        // A missing header.
        let m = pred(FLAT);
        let rec = json!({"svc":"fraud","ver":"3","ts":1,"p":0.5});
        assert_eq!(
            err_of(m.map(&rec, &[("other", b"x".as_slice())])),
            "field mapping: request_id (header \"x-request-id\") is missing or null"
        );
        assert_eq!(
            err_of(m.map(&rec, &[("x-request-id", b"\xff\xfe".as_slice())])),
            "field mapping: request_id (header \"x-request-id\") is not UTF-8 text"
        );
        // The last header of a name wins.
        let p = m
            .map(
                &rec,
                &[
                    ("x-request-id", b"a".as_slice()),
                    ("x-request-id", b"b".as_slice()),
                ],
            )
            .unwrap();
        assert_eq!(p.request_id, "b");
    }

    #[test]
    fn wrong_types_are_mapping_dead_letters() {
        let m = pred(NESTED);
        let base = || {
            json!({"meta": {"id": "a", "time": "2024-12-02T12:00:00Z", "model": {"version": "1"}},
                   "output": {"p": 0.5}})
        };
        let with = |ptr: &str, v: Value| {
            let mut r = base();
            let (parent, key) = ptr.rsplit_once('/').unwrap();
            let obj = if parent.is_empty() {
                &mut r
            } else {
                r.pointer_mut(parent).unwrap()
            };
            obj.as_object_mut().unwrap().insert(key.into(), v);
            err_of(m.map(&r, &[]))
        };
        assert_eq!(
            with("/meta/id", json!({"a": 1})),
            "field mapping: request_id (path \"/meta/id\") expected a string, got object"
        );
        assert_eq!(
            with("/output/p", json!("high-secret")),
            "field mapping: score (path \"/output/p\") expected a number or numeric string, got a non-numeric string"
        );
        assert!(with("/inputs", json!([1, 2]))
            .contains("features (path \"/inputs\") expected an object, got array"));
        assert_eq!(
            with("/inputs", json!({"emb": [1, 2]})),
            "field mapping: features (path \"/inputs\") member \"emb\": expected null, boolean, number or string, got array"
        );
        assert!(with("/ctx", json!({"c": {"x": 1}}))
            .contains("segments (path \"/ctx\") member \"c\": expected a string, got object"));
        assert!(with("/output/probs", json!({"a": "x"}))
            .contains("class_probabilities (path \"/output/probs\") member \"a\""));
        // Listed features and segments.
        let m = pred(FLAT);
        let h = [("x-request-id", b"a1".as_slice())];
        let r = json!({"svc":"fraud","ver":"3","ts":1,"p":0.5,"amount":{"v":1},"country":"DE"});
        assert_eq!(
            err_of(m.map(&r, &h)),
            "field mapping: features.amount (path \"/amount\") expected null, boolean, number or string, got object"
        );
        let r = json!({"svc":"fraud","ver":"3","ts":1,"p":0.5,"country":["DE"]});
        assert!(err_of(m.map(&r, &h)).contains("features.country (path \"/country\")"));
        // Absent and null list entries: features absent or null, segments left out.
        let r = json!({"svc":"fraud","ver":"3","ts":1,"p":0.5,"country":null});
        let p = m.map(&r, &h).unwrap();
        assert_eq!(
            p.features,
            Entries(vec![(s("country"), FeatureValue::Null)])
        );
        assert!(p.segments.is_empty());
    }

    #[test]
    fn headers_and_constants_as_sources() {
        let m = pred(
            r#"
[predictions]
request_id = "/id"
model_id = { header = "model" }
model_version = { value = 3 }
timestamp = { header = "ts" }
score = { header = "score" }
features = [{ header = "region" }, { value = "web", name = "channel" }]
segments = [{ header = "region", name = "r" }]
"#,
        );
        let h = [
            ("model", b"m".as_slice()),
            ("ts", b"1733140000123".as_slice()),
            ("score", b"0.5".as_slice()),
            ("region", b"eu".as_slice()),
        ];
        let p = m.map(&json!({"id": "a"}), &h).unwrap();
        assert_eq!((p.model_id.as_str(), p.model_version.as_str()), ("m", "3"));
        assert_eq!((p.timestamp, p.score), (1_733_140_000_123, Some(0.5)));
        assert_eq!(
            p.features,
            Entries(vec![
                (s("region"), FeatureValue::String(s("eu"))),
                (s("channel"), FeatureValue::String(s("web"))),
            ])
        );
        assert_eq!(p.segments, Entries(vec![(s("r"), s("eu"))]));
        let h2 = [
            ("model", b"m".as_slice()),
            ("ts", b"1".as_slice()),
            ("score", b"hi".as_slice()),
        ];
        assert_eq!(
            err_of(m.map(&json!({"id": "a"}), &h2)),
            "field mapping: score (header \"score\") expected a number, got a non-numeric header"
        );
    }

    #[test]
    fn json_pointer_rfc6901() {
        let doc = json!({"a/b": {"m~n": [10, 20]}, "": 1, "x": {"01": 5}});
        let at = |p: &str| Pointer::parse(p).unwrap().lookup(&doc).cloned();
        assert_eq!(at("/a~1b/m~0n/1"), Some(json!(20)));
        assert_eq!(at("/a~1b/m~0n/01"), None, "no leading zeros");
        assert_eq!(at("/a~1b/m~0n/-"), None);
        assert_eq!(at("/a~1b/m~0n/2"), None);
        assert_eq!(at("/"), Some(json!(1)));
        assert_eq!(at("/x/01"), Some(json!(5)), "object keys are not indices");
        assert_eq!(at(""), Some(doc.clone()));
        assert_eq!(at("/x/01/deeper"), None);
        // Agrees with serde_json's own implementation.
        for p in ["/a~1b/m~0n/1", "/a~1b/m~0n/01", "/", "/x/01", "", "/nope"] {
            assert_eq!(at(p).as_ref(), doc.pointer(p), "{p}");
        }
        assert!(Pointer::parse("a/b")
            .unwrap_err()
            .contains("starting with /"));
        assert!(Pointer::parse("/a~2")
            .unwrap_err()
            .contains("~ must be followed"));
        assert_eq!(Pointer::parse("/a~1b").unwrap().last_token(), Some("a/b"));
    }

    #[test]
    fn configuration_errors_name_the_field() {
        let base =
            "request_id = \"/id\"\nmodel_id = \"/m\"\nmodel_version = \"/v\"\ntimestamp = \"/t\"\n";
        let p = |extra: &str| compile(&format!("[predictions]\n{base}{extra}"));
        assert!(p("score = \"/s\"").is_ok());
        let cases = [
            ("", "kafka.mapping.predictions maps none of score"),
            (
                "score = \"s\"",
                "kafka.mapping.predictions.score: \"s\" is not a JSON Pointer",
            ),
            (
                "score = \"/a~x\"",
                "kafka.mapping.predictions.score: \"/a~x\" is not a JSON Pointer",
            ),
            (
                "score = { path = \"/s\", header = \"h\" }",
                "score: expected exactly one of path, value, header",
            ),
            (
                "score = {}",
                "score: expected exactly one of path, value, header",
            ),
            (
                "score = { path = \"/s\", name = \"n\" }",
                "score: name is only for entries",
            ),
            (
                "score = { value = [1] }",
                "score: value must be a string, number or boolean constant",
            ),
            ("score = { header = \"\" }", "score: header is empty"),
            (
                "score = \"/s\"\nclass_probabilities = { value = 1 }",
                "class_probabilities: expected a JSON Pointer to an object",
            ),
            ("score = \"/s\"\nfeatures = []", "features is an empty list"),
            (
                "score = \"/s\"\nfeatures = [{ value = 1 }]",
                "features[0]: no name",
            ),
            ("score = \"/s\"\nfeatures = [\"\"]", "features[0]: no name"),
            (
                "score = \"/s\"\nfeatures = [\"/a/x\", \"/b/x\"]",
                "features[1]: name \"x\" appears twice",
            ),
            (
                "score = \"/s\"\nsegments = \"ctx\"",
                "segments: \"ctx\" is not a JSON Pointer",
            ),
        ];
        for (extra, want) in cases {
            let e = p(extra).unwrap_err();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let e = compile("[predictions]\nmodel_id = \"/m\"\nscore = \"/s\"").unwrap_err();
        assert!(
            e.starts_with("kafka.mapping.predictions.request_id is missing"),
            "{e}"
        );
        let e = compile("[labels]\nrequest_id = \"/id\"\ntimestamp = \"/t\"").unwrap_err();
        assert!(
            e.contains("kafka.mapping.labels maps neither actual_label nor actual_value"),
            "{e}"
        );
        let e = compile("[labels]\nrequest_id = \"/id\"\nactual_value = \"/v\"").unwrap_err();
        assert!(
            e.contains("kafka.mapping.labels.timestamp is missing"),
            "{e}"
        );
        // Unknown keys and units are refused by serde.
        for bad in [
            "[predictions]\nscores = \"/s\"",
            "[labels]\ntimestamp_unit = \"ns\"",
            "[labels]\nrequest_id = { pth = \"/id\" }",
            "[label]\n",
        ] {
            assert!(toml::from_str::<MappingConfig>(bad).is_err(), "{bad}");
        }
        // Formats without a record schema are refused: raw Avro always,
        // Confluent-framed Avro without a registry.
        let m = cfg(FLAT);
        for registry in [false, true] {
            let e = Mappings::compile(&m, Format::Avro, registry).unwrap_err();
            assert!(
                e.contains("kafka.format = \"avro\", expected \"json\""),
                "{e}"
            );
        }
        let e = Mappings::compile(&m, Format::ConfluentAvro, false).unwrap_err();
        assert!(e.contains("kafka.schema_registry.url is empty"), "{e}");
        assert!(Mappings::compile(&m, Format::ConfluentAvro, true).is_ok());
        assert!(Mappings::compile(&m, Format::Json, false).is_ok());
        assert!(
            Mappings::compile(&MappingConfig::default(), Format::Avro, false)
                .unwrap()
                .is_empty()
        );
    }

    /// The two worked examples of the README ("Field mapping"), verbatim.
    #[test]
    fn readme_examples() {
        let m = pred(
            r#"
[predictions]
request_id = { header = "x-request-id" }
model_id = "/svc"
model_version = "/ver"
timestamp = "/ts"
timestamp_unit = "s"
features = ["/amount", "/country"]
score = "/p"
segments = ["/country"]
latency_ms = "/latency"
"#,
        );
        let rec: Value = serde_json::from_str(
            r#"{"svc":"fraud","ver":"3","ts":1733140000,"amount":12.5,"country":"DE","p":0.91,"latency":3.2}"#,
        )
        .unwrap();
        let p = m.map(&rec, &[("x-request-id", b"a1".as_slice())]).unwrap();
        let want: Value = serde_json::from_str(
            r#"{"request_id":"a1","model_id":"fraud","model_version":"3","timestamp":1733140000000,
 "features":{"amount":12.5,"country":"DE"},"score":0.91,"segments":{"country":"DE"},"latency_ms":3.2}"#,
        )
        .unwrap();
        assert_eq!(serde_json::to_value(&p).unwrap(), want);

        let m = compile(
            r#"
[predictions]
request_id = "/meta/id"
model_id = { value = "credit" }         # a constant: this topic carries one model
model_version = "/meta/model/version"
timestamp = "/meta/time"
timestamp_unit = "rfc3339"
features = "/inputs"                    # every member of the object
predicted_label = "/output/label"
class_probabilities = "/output/probs"
segments = "/ctx"

[labels]
request_id = "/id"
timestamp = "/resolved_at"
timestamp_unit = "rfc3339"
actual_label = "/outcome"
"#,
        )
        .unwrap();
        let rec: Value = serde_json::from_str(
            r#"{"meta":{"id":"7f3a","model":{"version":7},"time":"2024-12-02T12:00:00.250+01:00"},
 "inputs":{"age":42,"income":1234.5,"vip":true,"city":"Oslo"},
 "output":{"label":"approve","probs":{"approve":0.8,"reject":0.2}},
 "ctx":{"country":"NO","tier":2}}"#,
        )
        .unwrap();
        let p = m.predictions.unwrap().map(&rec, &[]).unwrap();
        let want: Value = serde_json::from_str(
            r#"{"request_id":"7f3a","model_id":"credit","model_version":"7","timestamp":1733137200250,
 "features":{"age":42,"city":"Oslo","income":1234.5,"vip":true},"predicted_label":"approve",
 "class_probabilities":{"approve":0.8,"reject":0.2},"segments":{"country":"NO","tier":"2"}}"#,
        )
        .unwrap();
        assert_eq!(serde_json::to_value(&p).unwrap(), want);
        // Member order as the README says (serde_json's map is sorted by name).
        let names: Vec<&str> = p.features.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["age", "city", "income", "vip"]);
        let rec: Value = serde_json::from_str(
            r#"{"id":"7f3a","resolved_at":"2024-12-03T09:30:00Z","outcome":"reject"}"#,
        )
        .unwrap();
        let g = m.labels.unwrap().map(&rec, &[]).unwrap();
        let want: Value = serde_json::from_str(
            r#"{"request_id":"7f3a","timestamp":1733218200000,"actual_label":"reject"}"#,
        )
        .unwrap();
        assert_eq!(serde_json::to_value(&g).unwrap(), want);
    }

    #[test]
    fn config_serializes_back_to_the_same_mapping() {
        for text in [FLAT, NESTED] {
            let c = cfg(text);
            let back = toml::to_string(&c).unwrap();
            assert_eq!(cfg(&back), c, "{back}");
        }
    }
}
