//! Field mapping (`[kafka.mapping]`) through the whole service: the event set
//! of the pipeline tests produced in our own shape and in three foreign
//! shapes (a flat log line with the request id in a message header, a nested
//! JSON record with RFC 3339 times, and the same nested record as the
//! producer's own Avro schema, Confluent-framed and read with its writer
//! schema from a Schema Registry, mapped by the very same mapping), each
//! through `Service` on a MockCluster into a real ClickHouse.
//! `window_metrics FINAL` must be the same row for row, and a record missing
//! a required path must be a dead letter of kind `mapping`.

use std::collections::BTreeMap;
use std::time::Duration;

use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use chrono::{DateTime, FixedOffset, SecondsFormat};
use modelwatch::app::Service;
use modelwatch::config::Config;
use modelwatch::ingest::decode::encode_json;
use modelwatch::ingest::mapping::MappingConfig;
use modelwatch::model::{FeatureValue, GroundTruthEvent, InputEvent, PredictionEvent};
use modelwatch::sinks::clickhouse::{ClickHouseSink, MetricRow};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{json, Map, Value};

use crate::pipeline::{
    aligned_ago, assert_matches, dataset, expected, mock_cluster, producer, read_final, read_topic,
    run_idle, sent_first, store_reference, test_config, Dataset, Input, Key,
};
use crate::support::clickhouse::unique_database;

/// The record shapes under test.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// Our own JSON (`encode_json`), no mapping.
    Native,
    /// One flat JSON object per event, times in (fractional) seconds, the
    /// request id in the `x-request-id` header.
    Flat,
    /// A nested record: `meta`, `inputs`, `output`, `ctx`, `perf`; times as
    /// RFC 3339 strings with a +02:00 offset, the score as a string.
    Nested,
    /// [`Shape::Nested`]'s records in the producer's own Avro schemas
    /// ([`NESTED_PREDICTION_AVSC`], [`NESTED_LABEL_AVSC`]), Confluent-framed
    /// with their registry ids, read with [`NESTED_MAPPING`] too.
    NestedAvro,
}

/// The producer's Avro schema of [`Shape::Nested`] predictions.
const NESTED_PREDICTION_AVSC: &str = r#"{"type": "record", "name": "ScoredRequest", "namespace": "com.example.inference", "fields": [
  {"name": "meta", "type": {"type": "record", "name": "Meta", "fields": [
    {"name": "id", "type": "string"},
    {"name": "model", "type": {"type": "record", "name": "ModelRef", "fields": [
      {"name": "name", "type": "string"},
      {"name": "version", "type": ["null", "string"], "default": null}]}},
    {"name": "time", "type": "string"}]}},
  {"name": "inputs", "type": {"type": "map", "values": ["null", "boolean", "long", "double", "string"]}},
  {"name": "output", "type": {"type": "record", "name": "Output", "fields": [
    {"name": "score", "type": ["null", "string"], "default": null},
    {"name": "value", "type": ["null", "double"], "default": null}]}},
  {"name": "ctx", "type": {"type": "map", "values": "string"}},
  {"name": "perf", "type": {"type": "record", "name": "Perf", "fields": [
    {"name": "latency_ms", "type": ["null", "double"], "default": null}]}}]}"#;

/// The producer's Avro schema of [`Shape::Nested`] labels.
const NESTED_LABEL_AVSC: &str = r#"{"type": "record", "name": "Outcome", "namespace": "com.example.inference", "fields": [
  {"name": "meta", "type": {"type": "record", "name": "OutcomeMeta", "fields": [{"name": "id", "type": "string"}]}},
  {"name": "resolved_at", "type": ["null", "string"], "default": null},
  {"name": "outcome", "type": {"type": "record", "name": "OutcomeValue", "fields": [
    {"name": "label", "type": ["null", "string"], "default": null},
    {"name": "value", "type": ["null", "double"], "default": null}]}}]}"#;

/// Registry ids of the two schemas.
const NESTED_PREDICTION_ID: u32 = 31;
const NESTED_LABEL_ID: u32 = 32;

/// The Avro value of the JSON record `v` in `schema` (records by field
/// name, a missing member as null, a union's first branch that fits).
fn avro_of(schema: &Schema, v: &Value) -> AvroValue {
    let fits = |s: &Schema| match (s, v) {
        (Schema::Null, Value::Null)
        | (Schema::Boolean, Value::Bool(_))
        | (Schema::Double, Value::Number(_))
        | (Schema::String, Value::String(_))
        | (Schema::Record(_) | Schema::Map(_), Value::Object(_)) => true,
        (Schema::Long, Value::Number(n)) => n.is_i64(),
        _ => false,
    };
    match schema {
        Schema::Record(r) => AvroValue::Record(
            r.fields
                .iter()
                .map(|f| {
                    let member = v.get(&f.name).unwrap_or(&Value::Null);
                    (f.name.clone(), avro_of(&f.schema, member))
                })
                .collect(),
        ),
        Schema::Map(m) => AvroValue::Map(
            v.as_object()
                .into_iter()
                .flatten()
                .map(|(k, x)| (k.clone(), avro_of(&m.types, x)))
                .collect(),
        ),
        Schema::Union(u) => {
            let (i, branch) = u
                .variants()
                .iter()
                .enumerate()
                .find(|(_, b)| fits(b))
                .unwrap_or_else(|| panic!("no union branch for {v}"));
            AvroValue::Union(i as u32, Box::new(avro_of(branch, v)))
        }
        Schema::Null => AvroValue::Null,
        Schema::Boolean => AvroValue::Boolean(v.as_bool().expect("boolean")),
        Schema::Long => AvroValue::Long(v.as_i64().expect("long")),
        Schema::Double => AvroValue::Double(v.as_f64().expect("double")),
        Schema::String => AvroValue::String(v.as_str().expect("string").to_owned()),
        other => panic!("not used here: {other:?}"),
    }
}

/// The nested record `v` of `kind` in the producer's Avro schema,
/// Confluent-framed with its registry id.
fn nested_avro(kind: Input, v: &Value) -> Vec<u8> {
    let (id, text) = match kind {
        Input::Predictions => (NESTED_PREDICTION_ID, NESTED_PREDICTION_AVSC),
        Input::GroundTruth => (NESTED_LABEL_ID, NESTED_LABEL_AVSC),
    };
    let schema = Schema::parse_str(text).expect("producer schema");
    let mut out = vec![0u8];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend(apache_avro::to_avro_datum(&schema, avro_of(&schema, v)).expect("valid datum"));
    out
}

const FLAT_MAPPING: &str = r#"
[predictions]
request_id = { header = "x-request-id" }
model_id = "/svc"
model_version = "/ver"
timestamp = "/ts"
timestamp_unit = "s"
features = ["/x", "/color"]
score = "/p"
predicted_value = "/value"
segments = ["/country"]
latency_ms = "/latency"

[labels]
request_id = { header = "x-request-id" }
timestamp = "/ts"
timestamp_unit = "s"
actual_label = "/label"
actual_value = "/value"
"#;

const NESTED_MAPPING: &str = r#"
[predictions]
request_id = "/meta/id"
model_id = "/meta/model/name"
model_version = "/meta/model/version"
timestamp = "/meta/time"
timestamp_unit = "rfc3339"
features = "/inputs"
score = "/output/score"
predicted_value = "/output/value"
segments = "/ctx"
latency_ms = "/perf/latency_ms"

[labels]
request_id = "/meta/id"
timestamp = "/resolved_at"
timestamp_unit = "rfc3339"
actual_label = "/outcome/label"
actual_value = "/outcome/value"
"#;

fn rfc3339(ms: i64) -> String {
    let utc = DateTime::from_timestamp_millis(ms).expect("time in range");
    let plus2 = FixedOffset::east_opt(2 * 3600).expect("offset");
    utc.with_timezone(&plus2)
        .to_rfc3339_opts(SecondsFormat::Millis, false)
}

fn feature_json(v: &FeatureValue) -> Value {
    serde_json::to_value(v).expect("feature value to JSON")
}

/// Puts `v` at `key` when it is present.
fn put(m: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        m.insert(key.into(), v);
    }
}

fn flat_prediction(p: &PredictionEvent) -> Value {
    let mut m = Map::new();
    m.insert("svc".into(), json!(p.model_id));
    m.insert("ver".into(), json!(p.model_version));
    m.insert("ts".into(), json!(p.timestamp as f64 / 1000.0));
    for (k, v) in p.features.iter() {
        m.insert(k.into(), feature_json(v));
    }
    put(&mut m, "p", p.score.map(|s| json!(s)));
    put(&mut m, "value", p.predicted_value.map(|v| json!(v)));
    for (k, v) in p.segments.iter() {
        m.insert(k.into(), json!(v));
    }
    put(&mut m, "latency", p.latency_ms.map(|v| json!(v)));
    // Fields the mapping does not name are ignored.
    m.insert("host".into(), json!("web-7"));
    m.insert("trace".into(), json!({"span": [1, 2, 3]}));
    Value::Object(m)
}

fn flat_label(g: &GroundTruthEvent) -> Value {
    let mut m = Map::new();
    m.insert("ts".into(), json!(g.timestamp as f64 / 1000.0));
    put(&mut m, "label", g.actual_label.as_ref().map(|l| json!(l)));
    put(&mut m, "value", g.actual_value.map(|v| json!(v)));
    Value::Object(m)
}

fn nested_prediction(p: &PredictionEvent) -> Value {
    let inputs: Map<String, Value> = p
        .features
        .iter()
        .map(|(k, v)| (k.to_string(), feature_json(v)))
        .collect();
    let ctx: Map<String, Value> = p
        .segments
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut output = Map::new();
    // A numeric string: accepted for numeric fields.
    put(&mut output, "score", p.score.map(|s| json!(s.to_string())));
    put(&mut output, "value", p.predicted_value.map(|v| json!(v)));
    json!({
        "meta": {
            "id": p.request_id,
            "model": {"name": p.model_id, "version": p.model_version},
            "time": rfc3339(p.timestamp),
        },
        "inputs": inputs,
        "output": output,
        "ctx": ctx,
        "perf": {"latency_ms": p.latency_ms},
    })
}

fn nested_label(g: &GroundTruthEvent) -> Value {
    json!({
        "meta": {"id": g.request_id},
        "resolved_at": rfc3339(g.timestamp),
        "outcome": {"label": g.actual_label, "value": g.actual_value},
    })
}

/// The payload of an event in `shape`, and the request-id header if any.
fn encode(shape: Shape, ev: &InputEvent) -> (Vec<u8>, Option<String>) {
    let (value, id) = match (shape, ev) {
        (Shape::Native, _) => return (encode_json(ev), None),
        (Shape::Flat, InputEvent::Prediction(p)) => (flat_prediction(p), Some(&p.request_id)),
        (Shape::Flat, InputEvent::GroundTruth(g)) => (flat_label(g), Some(&g.request_id)),
        (Shape::Nested, InputEvent::Prediction(p)) => (nested_prediction(p), None),
        (Shape::Nested, InputEvent::GroundTruth(g)) => (nested_label(g), None),
        (Shape::NestedAvro, InputEvent::Prediction(p)) => {
            return (nested_avro(Input::Predictions, &nested_prediction(p)), None)
        }
        (Shape::NestedAvro, InputEvent::GroundTruth(g)) => {
            return (nested_avro(Input::GroundTruth, &nested_label(g)), None)
        }
    };
    (serde_json::to_vec(&value).expect("JSON"), id.cloned())
}

async fn send(p: &FutureProducer, topic: &str, key: &str, payload: &[u8], id: Option<&str>) {
    let mut record = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(id) = id {
        record = record.headers(
            OwnedHeaders::new()
                .insert(Header {
                    key: "trace-id",
                    value: Some("t-1"),
                })
                .insert(Header {
                    key: "x-request-id",
                    value: Some(id),
                }),
        );
    }
    p.send(record, Duration::from_secs(30))
        .await
        .unwrap_or_else(|(e, _)| panic!("send to {topic}: {e}"));
}

/// Produces the dataset in `shape`, in the pipeline tests' order (early
/// labels, predictions, other labels, malformed messages).
async fn produce(brokers: &str, d: &Dataset, shape: Shape) {
    let p = producer(brokers);
    for l in d.labels.iter().filter(|l| sent_first(l)) {
        let (bytes, id) = encode(shape, &InputEvent::GroundTruth(l.clone()));
        send(&p, "ground-truth", &l.request_id, &bytes, id.as_deref()).await;
    }
    for e in &d.predictions {
        let (bytes, id) = encode(shape, &InputEvent::Prediction(e.clone()));
        send(&p, "predictions", &e.request_id, &bytes, id.as_deref()).await;
    }
    for l in d.labels.iter().filter(|l| !sent_first(l)) {
        let (bytes, id) = encode(shape, &InputEvent::GroundTruth(l.clone()));
        send(&p, "ground-truth", &l.request_id, &bytes, id.as_deref()).await;
    }
    for (input, k, payload) in &d.malformed {
        let topic = match input {
            Input::Predictions => "predictions",
            Input::GroundTruth => "ground-truth",
        };
        let id = (shape == Shape::Flat).then_some(k.as_str());
        send(&p, topic, k, payload, id).await;
    }
    p.flush(Duration::from_secs(10)).expect("flush");
}

/// A prediction and a label of `shape` that each miss a required field
/// (the model version, the label's time), with the dead-letter reason
/// expected for them.
fn malformed(shape: Shape, t0: i64) -> Vec<(Input, String, Vec<u8>, &'static str)> {
    let mut p = PredictionEvent {
        request_id: "bad-p".into(),
        model_id: "clf".into(),
        model_version: "v1".into(),
        timestamp: t0 + 1000,
        score: Some(0.5),
        ..Default::default()
    };
    let g = GroundTruthEvent {
        request_id: "bad-l".into(),
        timestamp: t0 + 1000,
        actual_label: Some("1".into()),
        actual_value: None,
    };
    let (mut pv, mut gv) = match shape {
        Shape::Native => {
            p.model_version.clear();
            (
                serde_json::to_value(&p).unwrap(),
                serde_json::to_value(&g).unwrap(),
            )
        }
        Shape::Flat => (flat_prediction(&p), flat_label(&g)),
        Shape::Nested | Shape::NestedAvro => (nested_prediction(&p), nested_label(&g)),
    };
    let reasons = match shape {
        Shape::Native => {
            gv.as_object_mut().unwrap().remove("timestamp");
            (
                "invalid event: model_version is empty",
                "invalid event: timestamp is missing",
            )
        }
        Shape::Flat => {
            pv.as_object_mut().unwrap().remove("ver");
            gv.as_object_mut().unwrap().remove("ts");
            (
                "field mapping: model_version (path \"/ver\") is missing or null",
                "field mapping: timestamp (path \"/ts\") is missing or null",
            )
        }
        Shape::Nested | Shape::NestedAvro => {
            pv["meta"]["model"]
                .as_object_mut()
                .unwrap()
                .remove("version");
            gv.as_object_mut().unwrap().remove("resolved_at");
            (
                "field mapping: model_version (path \"/meta/model/version\") is missing or null",
                "field mapping: timestamp (path \"/resolved_at\") is missing or null",
            )
        }
    };
    let bytes = |kind: Input, v: &Value| match shape {
        Shape::NestedAvro => nested_avro(kind, v),
        _ => serde_json::to_vec(v).unwrap(),
    };
    vec![
        (
            Input::Predictions,
            "bad-p".into(),
            bytes(Input::Predictions, &pv),
            reasons.0,
        ),
        (
            Input::GroundTruth,
            "bad-l".into(),
            bytes(Input::GroundTruth, &gv),
            reasons.1,
        ),
    ]
}

/// Runs the service over `d` produced in `shape` (with its mapping) and
/// returns `window_metrics FINAL`; checks the dead letters.
async fn run(shape: Shape, t0: i64) -> BTreeMap<Key, MetricRow> {
    let database = unique_database(&format!("mw_mapping_{shape:?}").to_lowercase());
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let mut cfg: Config = test_config(&brokers, &database);
    cfg.kafka.mapping = match shape {
        Shape::Native => MappingConfig::default(),
        Shape::Flat => toml::from_str(FLAT_MAPPING).expect("flat mapping"),
        Shape::Nested | Shape::NestedAvro => {
            toml::from_str(NESTED_MAPPING).expect("nested mapping")
        }
    };
    if shape == Shape::NestedAvro {
        cfg.kafka.schema_registry.url = crate::support::registry::serve(vec![
            (NESTED_PREDICTION_ID, NESTED_PREDICTION_AVSC.to_owned()),
            (NESTED_LABEL_ID, NESTED_LABEL_AVSC.to_owned()),
        ])
        .await;
    }
    cfg.validate().expect("valid configuration");
    let mut d = dataset(t0);
    let bad = malformed(shape, t0);
    d.malformed = bad
        .iter()
        .map(|(i, k, p, _)| (*i, k.clone(), p.clone()))
        .collect();
    store_reference(&cfg, &d).await;
    produce(&brokers, &d, shape).await;

    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    run_idle(&mut service).await;
    let p = service.progress();
    let messages = d.predictions.len() + d.labels.len() + d.malformed.len();
    assert_eq!(p.consumed, messages as u64, "{shape:?}");
    assert_eq!(p.dead_lettered, d.malformed.len() as u64, "{shape:?}");
    assert_eq!(p.core.duplicate_predictions, 1, "{shape:?}");
    assert_eq!(p.core.orphans, 1, "{shape:?}");

    // The dead letters: the original payload, the reason naming our field
    // and the path, kind `mapping` for mapped topics.
    let letters = read_topic(&brokers, "modelwatch-dead-letter", bad.len());
    assert_eq!(letters.len(), bad.len(), "{shape:?}: {letters:?}");
    for m in &letters {
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
        let (_, _, payload, reason) = bad
            .iter()
            .find(|b| b.1 == key)
            .unwrap_or_else(|| panic!("{shape:?}: unexpected dead letter {key}"));
        assert_eq!(m.payload().unwrap_or_default(), payload.as_slice());
        let headers = m.headers().expect("dead letter headers");
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).to_string())
        };
        assert_eq!(header("modelwatch.error").as_deref(), Some(*reason));
        let kind = if shape == Shape::Native {
            "validation"
        } else {
            "mapping"
        };
        assert_eq!(header("modelwatch.error.kind").as_deref(), Some(kind));
    }

    let sink = ClickHouseSink::new(&cfg.clickhouse);
    let mut rows = read_final(&sink).await;
    let (exact, approx) = expected(&d, true);
    assert_matches(&rows, &exact, &approx);
    // The service's own telemetry rows (CPU time, memory, at wall-clock
    // windows) are not the data's.
    rows.retain(|k, _| k.0 != "__service__");
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_shapes_give_the_window_metrics_of_the_native_shape() {
    let t0 = aligned_ago(3 * 86_400_000);
    let native = run(Shape::Native, t0).await;
    assert!(native.len() > 130, "{}", native.len());
    for shape in [Shape::Flat, Shape::Nested, Shape::NestedAvro] {
        let rows = run(shape, t0).await;
        let only = |a: &BTreeMap<Key, MetricRow>, b: &BTreeMap<Key, MetricRow>| {
            a.keys()
                .filter(|k| !b.contains_key(*k))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            (only(&rows, &native), only(&native, &rows)),
            (vec![], vec![]),
            "{shape:?}: rows only in the {shape:?} run, rows only in the native run"
        );
        let mut differ = Vec::new();
        for (k, n) in &native {
            let r = &rows[k];
            let same_value =
                r.value == n.value || (r.value - n.value).abs() <= 1e-12 * n.value.abs().max(1.0);
            let same_p = match (r.p_value, n.p_value) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-12,
                (a, b) => a == b,
            };
            if !same_value
                || !same_p
                || r.samples != n.samples
                || r.model_version != n.model_version
            {
                differ.push(format!("{k:?}: {r:?} vs native {n:?}"));
            }
        }
        assert!(
            differ.is_empty(),
            "{shape:?}: {} of {} rows differ:\n{}",
            differ.len(),
            native.len(),
            differ.join("\n")
        );
    }
}
