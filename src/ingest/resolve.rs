//! Writer schemas from a Schema Registry, by id, and how a datum written
//! with one is read as our event: Avro schema resolution (specification,
//! "Schema Resolution") of the producer's schema against ours. Pure: the
//! schemas are put in the [`SchemaCache`] by the fetching side
//! ([`super::registry`]); the decoder ([`super::decode::Decoder`]) only
//! reads it.
//!
//! Per writer schema and input topic, decided once when the schema enters
//! the cache ([`Plan`]):
//! - the same canonical form as ours: the datum is read by our own fast
//!   reader, as without a registry;
//! - compatible (apache-avro's `SchemaCompatibility::can_read` after the
//!   renames below): each datum is read by the bounded generic reader
//!   ([`super::avro_generic`]) into a value and converted into our event by
//!   field name ([`read_event`]): fields matched by name whatever their
//!   order, writer fields we do not know skipped, our fields missing in the
//!   writer left at their defaults, int -> long -> float -> double and
//!   bytes -> string promotions, union branches matched by type; the same
//!   result as apache-avro's `Value::resolve` against our schema
//!   ([`resolve_datum`], checked by the tests) at a third of its cost;
//! - our schema of the other input topic: a `wrong_type` dead letter, as
//!   without a registry;
//! - incompatible (e.g. a field of ours without a default that the writer
//!   lacks, a type that does not promote): every message written with it is
//!   a dead letter of kind `schema` with the reason.
//!
//! Two renames apply before the check, because apache-avro's resolution
//! does not do them: a writer field whose name is an alias of one of our
//! fields (`"aliases"` on the reader field, Avro specification) takes our
//! name; and the writer's top-level record name is not compared with ours
//! (the topic, not the record's name, says which event it is; Avro would
//! ask for equal names or an alias, and our `.avsc` are public contracts
//! without aliases).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use apache_avro::schema::{Name, RecordSchema, ResolvedSchema};
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value;
use apache_avro::Schema;

use super::avro;
use super::avro_generic;
use super::decode::{EventKind, SCHEMAS};
use crate::model::{Entries, FeatureValue, GroundTruthEvent, InputEvent, PredictionEvent};

/// How datums written with one writer schema are read on one input topic.
#[derive(Debug)]
pub enum Plan {
    /// The writer schema is ours (same canonical form): our reader.
    Ours,
    /// Compatible: the generic reader, then resolution against ours.
    Resolve {
        /// The writer schema, with the renames of the module doc applied.
        writer: Schema,
        /// Its named types, for references.
        names: HashMap<Name, Schema>,
    },
    /// Our schema of the other input topic (a label on the predictions
    /// topic, or the reverse).
    OtherType,
    /// Cannot be read as our event: why.
    Incompatible(String),
}

/// A writer schema fetched from the registry, with its plan per topic.
#[derive(Debug)]
pub struct WriterSchema {
    /// For the predictions topic.
    pub prediction: Plan,
    /// For the ground-truth topic.
    pub ground_truth: Plan,
    /// The schema as the producer wrote it, with its named types, for
    /// topics whose records are mapped field by field (`[kafka.mapping]`)
    /// rather than resolved against ours; why not, when its named types do
    /// not resolve.
    pub record: Result<(Schema, HashMap<Name, Schema>), String>,
}

impl WriterSchema {
    /// Parses the schema text the registry returned and decides, for both
    /// topics, how its datums are read. An error for a text that is not an
    /// Avro schema.
    pub fn parse(text: &str) -> Result<WriterSchema, String> {
        let schema =
            Schema::parse_str(text).map_err(|e| format!("not a valid Avro schema: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let canonical = avro::canonical_form(&json).ok();
        let record = match ResolvedSchema::try_from(&schema) {
            Ok(rs) => Ok(rs
                .get_names()
                .iter()
                .map(|(n, s)| (n.clone(), (*s).clone()))
                .collect()),
            Err(e) => Err(format!("the writer schema does not resolve: {e}")),
        };
        Ok(WriterSchema {
            prediction: plan(&schema, canonical.as_deref(), EventKind::Prediction),
            ground_truth: plan(&schema, canonical.as_deref(), EventKind::GroundTruth),
            record: record.map(|names| (schema, names)),
        })
    }

    /// The plan for the topic of `kind`.
    pub fn plan(&self, kind: EventKind) -> &Plan {
        match kind {
            EventKind::Prediction => &self.prediction,
            EventKind::GroundTruth => &self.ground_truth,
        }
    }
}

fn reader(kind: EventKind) -> &'static Schema {
    match kind {
        EventKind::Prediction => &SCHEMAS.prediction,
        EventKind::GroundTruth => &SCHEMAS.ground_truth,
    }
}

fn our_canonical(kind: EventKind) -> &'static str {
    use std::sync::LazyLock;
    static FORMS: LazyLock<[String; 2]> = LazyLock::new(|| {
        let form = |text: &str| {
            let json: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
            avro::canonical_form(&json).unwrap_or_default()
        };
        [
            form(super::decode::PREDICTION_SCHEMA),
            form(super::decode::GROUND_TRUTH_SCHEMA),
        ]
    });
    match kind {
        EventKind::Prediction => &FORMS[0],
        EventKind::GroundTruth => &FORMS[1],
    }
}

fn plan(writer: &Schema, canonical: Option<&str>, kind: EventKind) -> Plan {
    if canonical == Some(our_canonical(kind)) {
        return Plan::Ours;
    }
    if canonical == Some(our_canonical(kind.other())) {
        return Plan::OtherType;
    }
    plan_against(writer, reader(kind))
}

/// The plan for datums of `writer` read as `reader` (any two schemas; the
/// service uses ours as the reader).
pub fn plan_against(writer: &Schema, reader: &Schema) -> Plan {
    let mut w = writer.clone();
    if let (Schema::Record(ws), Schema::Record(rs)) = (&mut w, reader) {
        // The top-level name: see the module doc.
        ws.name = rs.name.clone();
    }
    rename_aliases(&mut w, reader);
    if let Err(e) = SchemaCompatibility::can_read(&w, reader) {
        return Plan::Incompatible(format!(
            "the writer schema cannot be read as {}: {e}",
            reader.name().map_or_else(String::new, |n| n.fullname(None))
        ));
    }
    let names = match ResolvedSchema::try_from(&w) {
        Ok(rs) => rs
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect(),
        Err(e) => return Plan::Incompatible(format!("the writer schema does not resolve: {e}")),
    };
    Plan::Resolve { writer: w, names }
}

/// Renames writer record fields that carry the name of an alias of a
/// reader field (and no field has the reader's name), in records at the
/// same place in both schemas (nested records, arrays and maps of them).
fn rename_aliases(writer: &mut Schema, reader: &Schema) {
    match (writer, reader) {
        (Schema::Record(w), Schema::Record(r)) => rename_fields(w, r),
        (Schema::Array(w), Schema::Array(r)) => rename_aliases(&mut w.items, &r.items),
        (Schema::Map(w), Schema::Map(r)) => rename_aliases(&mut w.types, &r.types),
        _ => {}
    }
}

fn rename_fields(w: &mut RecordSchema, r: &RecordSchema) {
    for rf in &r.fields {
        if !w.lookup.contains_key(&rf.name) {
            let hit = rf
                .aliases
                .iter()
                .flatten()
                .find_map(|a| w.lookup.get(a).map(|&i| (a.clone(), i)));
            if let Some((alias, i)) = hit {
                w.lookup.remove(&alias);
                w.lookup.insert(rf.name.clone(), i);
                w.fields[i].name = rf.name.clone();
            }
        }
        if let Some(&i) = w.lookup.get(&rf.name) {
            rename_aliases(&mut w.fields[i].schema, &rf.schema);
        }
    }
}

/// Reads the datum `datum` written with `writer` and resolves it against
/// `reader` with apache-avro's `Value::resolve`, into the reader schema's
/// Avro binary encoding: the general route, for any reader (the service
/// uses the faster [`read_event`] for ours).
pub fn resolve_datum(
    writer: &Schema,
    names: &HashMap<Name, Schema>,
    reader: &Schema,
    datum: &[u8],
) -> Result<Vec<u8>, ResolveError> {
    let v = avro_generic::read_value_with(writer, names, datum).map_err(ResolveError::Datum)?;
    let v = v
        .resolve(reader)
        .map_err(|e| ResolveError::Resolve(e.to_string()))?;
    apache_avro::to_avro_datum(reader, v).map_err(|e| ResolveError::Resolve(e.to_string()))
}

/// Reads the datum `datum` written with `writer` (renamed by
/// [`plan_against`] against our schema of `kind`) as our event: the bounded
/// generic reader, then a direct conversion by field name that applies the
/// resolution rules for our fixed field types (union branches by type,
/// promotions, our defaults for missing fields). Equivalent to
/// [`resolve_datum`] then our reader (checked by the tests) and about
/// three times faster (`benches/decode.rs`). Map entries come out sorted by
/// key (apache-avro's map value is a hash map).
pub fn read_event(
    writer: &Schema,
    names: &HashMap<Name, Schema>,
    kind: EventKind,
    datum: &[u8],
) -> Result<InputEvent, ResolveError> {
    let v = avro_generic::read_value_with(writer, names, datum).map_err(ResolveError::Datum)?;
    let Value::Record(fields) = v else {
        return Err(ResolveError::Resolve("the datum is not a record".into()));
    };
    match kind {
        EventKind::Prediction => to_prediction(fields).map(InputEvent::Prediction),
        EventKind::GroundTruth => to_ground_truth(fields).map(InputEvent::GroundTruth),
    }
    .map_err(ResolveError::Resolve)
}

fn to_prediction(fields: Vec<(String, Value)>) -> Result<PredictionEvent, String> {
    let mut p = PredictionEvent::default();
    let mut seen = [false; 5];
    for (name, v) in fields {
        let v = unwrap(v);
        match name.as_str() {
            "request_id" => (p.request_id, seen[0]) = (string(&name, v)?, true),
            "model_id" => (p.model_id, seen[1]) = (string(&name, v)?, true),
            "model_version" => (p.model_version, seen[2]) = (string(&name, v)?, true),
            "timestamp" => (p.timestamp, seen[3]) = (long(&name, v)?, true),
            "features" => {
                p.features = Entries(map(&name, v, |k, v| feature(k, unwrap(v)))?);
                seen[4] = true;
            }
            "predicted_label" => p.predicted_label = opt(v, |v| string(&name, v))?,
            "predicted_value" => p.predicted_value = opt(v, |v| double(&name, v))?,
            "score" => p.score = opt(v, |v| double(&name, v))?,
            "class_probabilities" => {
                p.class_probabilities = opt(v, |v| {
                    map(&name, v, |k, v| double(&format!("{name}.{k}"), unwrap(v))).map(Entries)
                })?
            }
            "segments" => {
                p.segments = Entries(map(&name, v, |k, v| {
                    string(&format!("{name}.{k}"), unwrap(v))
                })?)
            }
            "latency_ms" => p.latency_ms = opt(v, |v| double(&name, v))?,
            _ => {}
        }
    }
    // The compatibility check saw to it; a datum cannot lack a field.
    if let Some(i) = seen.iter().position(|s| !s) {
        let f = [
            "request_id",
            "model_id",
            "model_version",
            "timestamp",
            "features",
        ][i];
        return Err(format!("{f} is missing"));
    }
    Ok(p)
}

fn to_ground_truth(fields: Vec<(String, Value)>) -> Result<GroundTruthEvent, String> {
    let mut g = GroundTruthEvent::default();
    let mut seen = [false; 2];
    for (name, v) in fields {
        let v = unwrap(v);
        match name.as_str() {
            "request_id" => (g.request_id, seen[0]) = (string(&name, v)?, true),
            "timestamp" => (g.timestamp, seen[1]) = (long(&name, v)?, true),
            "actual_label" => g.actual_label = opt(v, |v| string(&name, v))?,
            "actual_value" => g.actual_value = opt(v, |v| double(&name, v))?,
            _ => {}
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(format!("{} is missing", ["request_id", "timestamp"][i]));
    }
    Ok(g)
}

/// The value of a union branch (our unions hold no unions).
fn unwrap(v: Value) -> Value {
    match v {
        Value::Union(_, b) => *b,
        v => v,
    }
}

fn type_error(field: &str, want: &str, got: &Value) -> String {
    format!(
        "{field}: expected {want}, got {:?}",
        apache_avro::schema::SchemaKind::from(got)
    )
}

/// `string` (a writer `bytes` promotes).
fn string(field: &str, v: Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s),
        Value::Bytes(b) => {
            String::from_utf8(b).map_err(|_| format!("{field}: bytes are not UTF-8"))
        }
        other => Err(type_error(field, "string", &other)),
    }
}

/// `long` / timestamp-millis (a writer `int` promotes).
fn long(field: &str, v: Value) -> Result<i64, String> {
    match v {
        Value::Long(x) | Value::TimestampMillis(x) => Ok(x),
        Value::Int(x) => Ok(i64::from(x)),
        other => Err(type_error(field, "long", &other)),
    }
}

/// `double` (writer `int`, `long`, `float` promote).
fn double(field: &str, v: Value) -> Result<f64, String> {
    match v {
        Value::Double(x) => Ok(x),
        Value::Float(x) => Ok(f64::from(x)),
        Value::Long(x) => Ok(x as f64),
        Value::Int(x) => Ok(f64::from(x)),
        other => Err(type_error(field, "double", &other)),
    }
}

/// An optional value: `null` is `None`.
fn opt<T>(v: Value, f: impl FnOnce(Value) -> Result<T, String>) -> Result<Option<T>, String> {
    match v {
        Value::Null => Ok(None),
        v => f(v).map(Some),
    }
}

/// A map's entries, sorted by key.
fn map<T>(
    field: &str,
    v: Value,
    mut f: impl FnMut(&str, Value) -> Result<T, String>,
) -> Result<Vec<(String, T)>, String> {
    let Value::Map(m) = v else {
        return Err(type_error(field, "map", &v));
    };
    let mut out = Vec::with_capacity(m.len());
    for (k, v) in m {
        let x = f(&k, v)?;
        out.push((k, x));
    }
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A feature value: the first branch of our union
/// `["null","boolean","long","double","string"]` the writer's value
/// resolves to (Avro's rule for a non-union writer: `int` -> long, `float`
/// -> double, `bytes` -> string).
fn feature(name: &str, v: Value) -> Result<FeatureValue, String> {
    Ok(match v {
        Value::Null => FeatureValue::Null,
        Value::Boolean(b) => FeatureValue::Bool(b),
        Value::Long(x) => FeatureValue::Long(x),
        Value::Int(x) => FeatureValue::Long(i64::from(x)),
        Value::Double(x) => FeatureValue::Double(x),
        Value::Float(x) => FeatureValue::Double(f64::from(x)),
        Value::String(s) => FeatureValue::String(s),
        Value::Bytes(b) => FeatureValue::String(
            String::from_utf8(b).map_err(|_| format!("features.{name}: bytes are not UTF-8"))?,
        ),
        other => {
            return Err(type_error(
                &format!("features.{name}"),
                "null|boolean|long|double|string",
                &other,
            ))
        }
    })
}

/// Why [`resolve_datum`] or [`read_event`] failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ResolveError {
    /// The datum is not valid for the writer schema.
    Datum(avro::AvroError),
    /// A value of the datum has no counterpart in the reader schema (e.g. a
    /// union branch the reader lacks).
    Resolve(String),
}

/// What the cache holds for one schema id.
pub type Entry = Arc<Result<WriterSchema, String>>;

/// The writer schemas fetched so far, by registry id, and the ids the
/// registry does not know (a permanent answer: their messages are dead
/// letters of kind `schema`). At most `max` ids (`kafka.schema_registry.
/// max_schemas`); inserting beyond that evicts the oldest inserted id
/// (fetched again if seen again), counted in [`SchemaCache::evicted`].
pub struct SchemaCache {
    inner: RwLock<Inner>,
    evicted: AtomicU64,
}

struct Inner {
    entries: HashMap<u32, Entry>,
    order: VecDeque<u32>,
    max: usize,
}

impl fmt::Debug for SchemaCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaCache")
            .field("len", &self.len())
            .field("evicted", &self.evicted())
            .finish()
    }
}

impl SchemaCache {
    /// An empty cache of at most `max` ids (at least 1).
    pub fn new(max: usize) -> Self {
        SchemaCache {
            inner: RwLock::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                max: max.max(1),
            }),
            evicted: AtomicU64::new(0),
        }
    }

    /// What is known of schema `id`, if anything.
    pub fn get(&self, id: u32) -> Option<Entry> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.entries.get(&id).cloned()
    }

    /// Whether schema `id` is known (fetched, or known to be unknown).
    pub fn contains(&self, id: u32) -> bool {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.entries.contains_key(&id)
    }

    /// Records what the registry said about `id`, evicting the oldest id
    /// beyond the cap.
    pub fn insert(&self, id: u32, entry: Result<WriterSchema, String>) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if g.entries.insert(id, Arc::new(entry)).is_none() {
            g.order.push_back(id);
        }
        while g.entries.len() > g.max {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            g.entries.remove(&old);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ids held.
    pub fn len(&self) -> usize {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.entries.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids evicted by the cap so far.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

/// The schema id of a Confluent frame (`0x00` + big-endian u32 + datum).
pub fn confluent_id(payload: &[u8]) -> Option<u32> {
    match payload {
        [super::decode::CONFLUENT_MAGIC, a, b, c, d, ..] => {
            Some(u32::from_be_bytes([*a, *b, *c, *d]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Format;
    use crate::ingest::decode::{encode_confluent, Decoder, PREDICTION_SCHEMA};

    const P: EventKind = EventKind::Prediction;
    const G: EventKind = EventKind::GroundTruth;

    /// A producer's own prediction schema: other name, other field order,
    /// fields we do not know (one a nested record), `predicted_label` and
    /// `class_probabilities` missing (our defaults fill them), the
    /// timestamp a plain long, the latency a float, the score required.
    const FOREIGN: &str = r#"{"type":"record","name":"Inference","namespace":"com.acme","fields":[
        {"name":"trace_id","type":"string"},
        {"name":"timestamp","type":"long"},
        {"name":"model_version","type":"string"},
        {"name":"model_id","type":"string"},
        {"name":"host","type":{"type":"record","name":"Host","fields":[{"name":"name","type":"string"},{"name":"cpus","type":"int"}]}},
        {"name":"request_id","type":"string"},
        {"name":"segments","type":{"type":"map","values":"string"}},
        {"name":"score","type":"double"},
        {"name":"features","type":{"type":"map","values":["string","double","null","boolean","int"]}},
        {"name":"latency_ms","type":["null","float"],"default":null},
        {"name":"predicted_value","type":["double","null"]}
    ]}"#;

    fn event() -> PredictionEvent {
        PredictionEvent {
            request_id: "r-1".into(),
            model_id: "clf".into(),
            model_version: "v1".into(),
            timestamp: 1_700_000_000_000,
            features: Entries(vec![
                ("x".into(), FeatureValue::Double(2.5)),
                ("n".into(), FeatureValue::Long(7)),
                ("c".into(), FeatureValue::String("red".into())),
                ("missing".into(), FeatureValue::Null),
            ]),
            score: Some(0.25),
            segments: Entries(vec![("country".into(), "DE".into())]),
            latency_ms: Some(12.5),
            ..Default::default()
        }
    }

    fn s(x: &str) -> Value {
        Value::String(x.into())
    }

    /// `event()` written with [`FOREIGN`].
    fn foreign_datum() -> Vec<u8> {
        let schema = Schema::parse_str(FOREIGN).unwrap();
        let e = event();
        let v = Value::Record(vec![
            ("trace_id".into(), s("t-9")),
            ("timestamp".into(), Value::Long(e.timestamp)),
            ("model_version".into(), s("v1")),
            ("model_id".into(), s("clf")),
            (
                "host".into(),
                Value::Record(vec![
                    ("name".into(), s("h1")),
                    ("cpus".into(), Value::Int(8)),
                ]),
            ),
            ("request_id".into(), s("r-1")),
            (
                "segments".into(),
                Value::Map([("country".to_string(), s("DE"))].into()),
            ),
            ("score".into(), Value::Double(0.25)),
            (
                "features".into(),
                Value::Map(
                    [
                        (
                            "x".to_string(),
                            Value::Union(1, Box::new(Value::Double(2.5))),
                        ),
                        ("n".to_string(), Value::Union(4, Box::new(Value::Int(7)))),
                        ("c".to_string(), Value::Union(0, Box::new(s("red")))),
                        (
                            "missing".to_string(),
                            Value::Union(2, Box::new(Value::Null)),
                        ),
                    ]
                    .into(),
                ),
            ),
            (
                "latency_ms".into(),
                Value::Union(1, Box::new(Value::Float(12.5))),
            ),
            (
                "predicted_value".into(),
                Value::Union(1, Box::new(Value::Null)),
            ),
        ]);
        apache_avro::to_avro_datum(&schema, v).unwrap()
    }

    fn framed(id: u32, datum: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(datum);
        out
    }

    fn sorted(p: &PredictionEvent) -> PredictionEvent {
        let mut p = p.clone();
        p.features.0.sort_by(|a, b| a.0.cmp(&b.0));
        p.segments.0.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(cp) = &mut p.class_probabilities {
            cp.0.sort_by(|a, b| a.0.cmp(&b.0));
        }
        p
    }

    fn decoder(cache: &Arc<SchemaCache>) -> Decoder {
        Decoder::new(Format::Auto).with_registry(cache.clone())
    }

    #[test]
    fn a_producer_schema_with_other_order_extra_fields_and_defaults_decodes_to_the_same_event() {
        let cache = Arc::new(SchemaCache::new(10));
        let ws = WriterSchema::parse(FOREIGN).unwrap();
        assert!(matches!(ws.prediction, Plan::Resolve { .. }), "{ws:?}");
        // Avro-wise it is a ground-truth event too (request_id and
        // timestamp, both of ours with defaults missing): one without a
        // label, which validation refuses.
        assert!(matches!(ws.ground_truth, Plan::Resolve { .. }));
        cache.insert(41, Ok(ws));
        let got = decoder(&cache)
            .decode(P, &framed(41, &foreign_datum()))
            .unwrap();
        let InputEvent::Prediction(got) = got else {
            panic!("{got:?}")
        };
        // int -> long (feature n), float -> double (latency), our defaults
        // for predicted_label and class_probabilities.
        assert_eq!(sorted(&got), sorted(&event()));
        let e = decoder(&cache)
            .decode(G, &framed(41, &foreign_datum()))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid event: ground-truth event has neither actual_label nor actual_value"
        );
    }

    #[test]
    fn the_direct_conversion_agrees_with_apache_avro_resolution() {
        let Plan::Resolve { writer, names } =
            plan_against(&Schema::parse_str(FOREIGN).unwrap(), &SCHEMAS.prediction)
        else {
            panic!()
        };
        let datum = foreign_datum();
        let ours = resolve_datum(&writer, &names, &SCHEMAS.prediction, &datum).unwrap();
        let via_apache = avro::read_prediction(&ours).unwrap();
        let InputEvent::Prediction(direct) = read_event(&writer, &names, P, &datum).unwrap() else {
            panic!()
        };
        assert_eq!(sorted(&direct), sorted(&via_apache));
        assert_eq!(direct, sorted(&direct), "map entries sorted by key");
        // A truncated datum: the same error both ways.
        let cut = &datum[..datum.len() - 3];
        assert_eq!(
            read_event(&writer, &names, P, cut).unwrap_err(),
            resolve_datum(&writer, &names, &SCHEMAS.prediction, cut).unwrap_err()
        );
    }

    /// Our prediction schema with the fields in reverse order, an unknown
    /// field first, another record name.
    fn reversed_schema() -> String {
        let mut json: serde_json::Value = serde_json::from_str(PREDICTION_SCHEMA).unwrap();
        json["name"] = "Reversed".into();
        let fields = json["fields"].as_array_mut().unwrap();
        fields.reverse();
        fields.insert(
            0,
            serde_json::json!({"name": "extra", "type": ["null", "long"]}),
        );
        json.to_string()
    }

    proptest::proptest! {
        #[test]
        fn any_prediction_in_another_field_order_decodes_to_itself(seed in proptest::prelude::any::<u64>()) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let opt = |rng: &mut rand::rngs::StdRng, v: f64| rng.gen_bool(0.5).then_some(v);
            let features = (0..rng.gen_range(0..6))
                .map(|i| {
                    let v = match rng.gen_range(0..5) {
                        0 => FeatureValue::Null,
                        1 => FeatureValue::Bool(rng.gen()),
                        2 => FeatureValue::Long(rng.gen()),
                        3 => FeatureValue::Double(rng.gen_range(-1e9..1e9)),
                        _ => FeatureValue::String(format!("c{}", rng.gen_range(0..9))),
                    };
                    (format!("f{i}"), v)
                })
                .collect();
            let p = PredictionEvent {
                request_id: format!("r{}", rng.gen::<u32>()),
                model_id: "m".into(),
                model_version: "v".into(),
                timestamp: rng.gen_range(1..4_000_000_000_000),
                features: Entries(features),
                predicted_label: rng.gen_bool(0.5).then(|| "yes".to_string()),
                predicted_value: opt(&mut rng, 2.5),
                score: opt(&mut rng, 0.125),
                class_probabilities: rng
                    .gen_bool(0.5)
                    .then(|| Entries(vec![("a".into(), 0.25), ("b".into(), 0.75)])),
                segments: Entries(vec![("country".into(), "DE".into())]),
                latency_ms: opt(&mut rng, 3.0),
            };
            let ours = Schema::parse_str(PREDICTION_SCHEMA).unwrap();
            let text = reversed_schema();
            let theirs = Schema::parse_str(&text).unwrap();
            let Value::Record(mut v) = apache_avro::from_avro_datum(
                &ours,
                &mut &crate::ingest::decode::encode_avro(&InputEvent::Prediction(p.clone()))[..],
                None,
            )
            .unwrap() else {
                unreachable!()
            };
            v.reverse();
            v.insert(0, ("extra".into(), Value::Union(1, Box::new(Value::Long(5)))));
            let datum = apache_avro::to_avro_datum(&theirs, Value::Record(v)).unwrap();
            let Plan::Resolve { writer, names } = plan_against(&theirs, &SCHEMAS.prediction) else {
                panic!()
            };
            let InputEvent::Prediction(direct) = read_event(&writer, &names, P, &datum).unwrap() else {
                unreachable!()
            };
            let via_apache = avro::read_prediction(
                &resolve_datum(&writer, &names, &SCHEMAS.prediction, &datum).unwrap(),
            )
            .unwrap();
            proptest::prop_assert_eq!(sorted(&direct), sorted(&via_apache));
            proptest::prop_assert_eq!(direct, sorted(&p));
        }
    }

    #[test]
    fn our_own_schema_takes_the_fast_path() {
        let ws = WriterSchema::parse(PREDICTION_SCHEMA).unwrap();
        assert!(matches!(ws.prediction, Plan::Ours));
        let cache = Arc::new(SchemaCache::new(10));
        cache.insert(1, Ok(ws));
        let ev = InputEvent::Prediction(event());
        assert_eq!(
            decoder(&cache)
                .decode(P, &encode_confluent(&ev, 1))
                .unwrap(),
            ev
        );
        // Ours on the other topic: named as the other event type.
        let e = decoder(&cache)
            .decode(G, &encode_confluent(&ev, 1))
            .unwrap_err();
        assert_eq!(e.kind(), "wrong_type");
    }

    #[test]
    fn a_reader_alias_matches_a_writer_field() {
        let reader = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
                {"name":"request_id","type":"string","aliases":["req","rid"]},
                {"name":"value","type":"double","default":0.5}
            ]}"#,
        )
        .unwrap();
        let writer = Schema::parse_str(
            r#"{"type":"record","name":"W","fields":[{"name":"x","type":"int"},{"name":"rid","type":"string"}]}"#,
        )
        .unwrap();
        let Plan::Resolve { writer: w, names } = plan_against(&writer, &reader) else {
            panic!()
        };
        let datum = apache_avro::to_avro_datum(
            &writer,
            Value::Record(vec![("x".into(), Value::Int(3)), ("rid".into(), s("abc"))]),
        )
        .unwrap();
        let out = resolve_datum(&w, &names, &reader, &datum).unwrap();
        let v = apache_avro::from_avro_datum(&reader, &mut &out[..], None).unwrap();
        assert_eq!(
            v,
            Value::Record(vec![
                ("request_id".into(), s("abc")),
                ("value".into(), Value::Double(0.5))
            ])
        );
        // Without the alias, the field is missing and has no default.
        let plain = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"request_id","type":"string"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            plan_against(&writer, &plain),
            Plan::Incompatible(_)
        ));
    }

    #[test]
    fn promotions_resolve() {
        let reader = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"long"},{"name":"b","type":"double"},{"name":"c","type":"double"},{"name":"d","type":"bytes"}]}"#,
        )
        .unwrap();
        let writer = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"b","type":"float"},{"name":"c","type":"long"},{"name":"d","type":"string"}]}"#,
        )
        .unwrap();
        let Plan::Resolve { writer: w, names } = plan_against(&writer, &reader) else {
            panic!()
        };
        let datum = apache_avro::to_avro_datum(
            &writer,
            Value::Record(vec![
                ("a".into(), Value::Int(-5)),
                ("b".into(), Value::Float(0.5)),
                ("c".into(), Value::Long(1 << 40)),
                ("d".into(), s("hi")),
            ]),
        )
        .unwrap();
        let out = resolve_datum(&w, &names, &reader, &datum).unwrap();
        let v = apache_avro::from_avro_datum(&reader, &mut &out[..], None).unwrap();
        assert_eq!(
            v,
            Value::Record(vec![
                ("a".into(), Value::Long(-5)),
                ("b".into(), Value::Double(0.5)),
                ("c".into(), Value::Double((1u64 << 40) as f64)),
                ("d".into(), Value::Bytes(b"hi".to_vec())),
            ])
        );
    }

    #[test]
    fn incompatible_and_unknown_schemas_are_schema_errors() {
        let cache = Arc::new(SchemaCache::new(10));
        // request_id missing, and ours has no default for it.
        let missing =
            r#"{"type":"record","name":"P","fields":[{"name":"model_id","type":"string"}]}"#;
        let ws = WriterSchema::parse(missing).unwrap();
        let Plan::Incompatible(why) = &ws.prediction else {
            panic!("{ws:?}")
        };
        assert!(why.contains("request_id"), "{why}");
        cache.insert(5, Ok(ws));
        // A type that does not promote: timestamp as a string.
        let wrong = FOREIGN.replace(
            r#"{"name":"timestamp","type":"long"}"#,
            r#"{"name":"timestamp","type":"string"}"#,
        );
        cache.insert(6, Ok(WriterSchema::parse(&wrong).unwrap()));
        cache.insert(7, Err("not found in the registry (40403)".into()));
        for id in [5, 6, 7, 8] {
            let e = decoder(&cache)
                .decode(P, &framed(id, &foreign_datum()))
                .unwrap_err();
            assert_eq!(e.kind(), "schema", "{id}: {e}");
            assert!(e.to_string().contains(&format!("schema id {id}")), "{e}");
        }
        assert!(WriterSchema::parse("{\"type\":\"recrd\"}").is_err());
        // A truncated datum of a known schema is an Avro error.
        let d = foreign_datum();
        let e = decoder(&cache)
            .decode(P, &framed(9, &d[..d.len() - 1]))
            .unwrap_err();
        assert_eq!(e.kind(), "schema"); // id 9 unknown
        cache.insert(9, WriterSchema::parse(FOREIGN));
        let e = decoder(&cache)
            .decode(P, &framed(9, &d[..d.len() - 1]))
            .unwrap_err();
        assert_eq!(e.kind(), "avro", "{e}");
        // Without a registry, the id is skipped and the datum read as ours.
        let e = Decoder::new(Format::Auto)
            .decode(P, &framed(9, &d))
            .unwrap_err();
        assert_eq!(e.kind(), "avro");
    }

    #[test]
    fn a_label_schema_of_its_own_resolves_on_the_label_topic() {
        let text = r#"{"type":"record","name":"Outcome","fields":[
            {"name":"actual_value","type":["null","double"],"default":null},
            {"name":"request_id","type":"string"},
            {"name":"note","type":"string"},
            {"name":"timestamp","type":"long"},
            {"name":"actual_label","type":["null","string"],"default":null}]}"#;
        let schema = Schema::parse_str(text).unwrap();
        let cache = Arc::new(SchemaCache::new(10));
        cache.insert(3, WriterSchema::parse(text));
        let datum = apache_avro::to_avro_datum(
            &schema,
            Value::Record(vec![
                (
                    "actual_value".into(),
                    Value::Union(0, Box::new(Value::Null)),
                ),
                ("request_id".into(), s("r-1")),
                ("note".into(), s("ok")),
                ("timestamp".into(), Value::Long(1_700_000_000_500)),
                ("actual_label".into(), Value::Union(1, Box::new(s("1")))),
            ]),
        )
        .unwrap();
        assert_eq!(
            decoder(&cache).decode(G, &framed(3, &datum)).unwrap(),
            InputEvent::GroundTruth(GroundTruthEvent {
                request_id: "r-1".into(),
                timestamp: 1_700_000_000_500,
                actual_label: Some("1".into()),
                actual_value: None,
            })
        );
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_oldest() {
        let c = SchemaCache::new(2);
        for id in 0..5 {
            c.insert(id, Err("x".into()));
        }
        assert_eq!(c.len(), 2);
        assert_eq!(c.evicted(), 3);
        assert!(!c.contains(2) && c.contains(3) && c.contains(4));
        // Re-inserting a held id does not evict.
        c.insert(4, Err("y".into()));
        assert_eq!((c.len(), c.evicted()), (2, 3));
        assert_eq!(confluent_id(&[0, 0, 0, 1, 2, 9]), Some(258));
        assert_eq!(confluent_id(&[0, 0, 0, 1]), None);
    }
}
