//! Decode throughput of one 25-feature prediction (20 numeric, 5 categorical)
//! in each wire format, through the same `Decoder` the consumer uses; the
//! same prediction as JSON records in two foreign shapes read through a field
//! mapping (`[kafka.mapping]`), against our own JSON; and the cost of a
//! Schema Registry writer schema (`registry_decode`): the same event raw,
//! Confluent-framed with our own schema (the fast path), and Confluent-framed
//! with a producer's schema (our fields in reverse order plus one we do not
//! know), resolved per event.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use modelwatch::config::Format;
use modelwatch::ingest::decode::{
    encode_avro, encode_confluent, encode_json, encode_single_object, Decoder, EventKind,
    PREDICTION_SCHEMA,
};
use modelwatch::ingest::mapping::{MappingConfig, Mappings};
use modelwatch::ingest::resolve::{SchemaCache, WriterSchema};
use modelwatch::model::{Entries, FeatureValue, InputEvent, PredictionEvent};
use serde_json::{json, Map, Value};
use std::sync::Arc;

fn prediction() -> InputEvent {
    let mut features = Vec::with_capacity(25);
    for i in 0..20 {
        features.push((
            format!("num_{i:02}"),
            FeatureValue::Double(1000.0 / (i as f64 + 3.0)),
        ));
    }
    for (i, c) in ["DE", "web", "premium", "android", "returning"]
        .iter()
        .enumerate()
    {
        features.push((format!("cat_{i}"), FeatureValue::String((*c).to_string())));
    }
    InputEvent::Prediction(PredictionEvent {
        request_id: "7f3c2a9e-4b1d-4c8e-9a55-0d2b7e6f1a33".into(),
        model_id: "churn".into(),
        model_version: "v12".into(),
        timestamp: 1_700_000_000_123,
        features: Entries(features),
        predicted_label: Some("1".into()),
        predicted_value: None,
        score: Some(0.8125),
        class_probabilities: None,
        segments: Entries(vec![("country".into(), "DE".into())]),
        latency_ms: Some(4.5),
    })
}

fn bench_decode(c: &mut Criterion) {
    let ev = prediction();
    let cases = [
        ("json", encode_json(&ev)),
        ("avro_raw", encode_avro(&ev)),
        ("avro_confluent", encode_confluent(&ev, 1)),
        ("avro_single_object", encode_single_object(&ev)),
    ];
    let decoder = Decoder::new(Format::Auto);
    let mut group = c.benchmark_group("decode_prediction_25_features");
    for (name, bytes) in &cases {
        // Sanity: the bench measures successful decodes only.
        assert!(
            decoder.decode(EventKind::Prediction, bytes).is_ok(),
            "{name}"
        );
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| decoder.decode(EventKind::Prediction, black_box(bytes)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("encode_prediction_25_features");
    group.bench_function("json", |b| b.iter(|| encode_json(black_box(&ev))));
    group.bench_function("avro_raw", |b| b.iter(|| encode_avro(black_box(&ev))));
    group.finish();
}

/// The prediction as a flat JSON object (features at the top level, the
/// request id in a header) and as a nested record (features in an object),
/// with the mappings that read them.
fn foreign(ev: &InputEvent) -> [(&'static str, Vec<u8>, &'static str); 2] {
    let InputEvent::Prediction(p) = ev else {
        unreachable!("a prediction")
    };
    let features: Map<String, Value> = p
        .features
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::to_value(v).unwrap()))
        .collect();
    let mut flat = features.clone();
    flat.insert("svc".into(), json!(p.model_id));
    flat.insert("ver".into(), json!(p.model_version));
    flat.insert("ts".into(), json!(p.timestamp));
    flat.insert("label".into(), json!(p.predicted_label));
    flat.insert("p".into(), json!(p.score));
    flat.insert("country".into(), json!("DE"));
    flat.insert("latency".into(), json!(p.latency_ms));
    let nested = json!({
        "meta": {"id": p.request_id, "model": {"name": p.model_id, "version": p.model_version},
                 "time": p.timestamp},
        "inputs": features,
        "output": {"label": p.predicted_label, "p": p.score},
        "ctx": {"country": "DE"},
        "perf": {"latency_ms": p.latency_ms},
    });
    [
        (
            "mapped_flat_listed_features_header_id",
            serde_json::to_vec(&flat).unwrap(),
            FLAT,
        ),
        (
            "mapped_nested_feature_object",
            serde_json::to_vec(&nested).unwrap(),
            NESTED,
        ),
    ]
}

const FLAT: &str = r#"
[predictions]
request_id = { header = "x-request-id" }
model_id = "/svc"
model_version = "/ver"
timestamp = "/ts"
features = ["/num_00", "/num_01", "/num_02", "/num_03", "/num_04", "/num_05", "/num_06",
  "/num_07", "/num_08", "/num_09", "/num_10", "/num_11", "/num_12", "/num_13", "/num_14",
  "/num_15", "/num_16", "/num_17", "/num_18", "/num_19", "/cat_0", "/cat_1", "/cat_2",
  "/cat_3", "/cat_4"]
predicted_label = "/label"
score = "/p"
segments = ["/country"]
latency_ms = "/latency"
"#;

const NESTED: &str = r#"
[predictions]
request_id = "/meta/id"
model_id = "/meta/model/name"
model_version = "/meta/model/version"
timestamp = "/meta/time"
features = "/inputs"
predicted_label = "/output/label"
score = "/output/p"
segments = "/ctx"
latency_ms = "/perf/latency_ms"
"#;

fn bench_mapped(c: &mut Criterion) {
    let ev = prediction();
    let native = encode_json(&ev);
    let id = b"7f3c2a9e-4b1d-4c8e-9a55-0d2b7e6f1a33".as_slice();
    let headers = [
        (
            "traceparent",
            b"00-0af7651916cd43dd-b7ad6b7169203331-01".as_slice(),
        ),
        ("x-request-id", id),
    ];
    let mut group = c.benchmark_group("decode_json_prediction_25_features");
    let plain = Decoder::new(Format::Auto);
    group.bench_function("native_json", |b| {
        b.iter(|| plain.decode_with_headers(EventKind::Prediction, black_box(&native), &headers))
    });
    for (name, bytes, mapping) in foreign(&ev) {
        let cfg: MappingConfig = toml::from_str(mapping).unwrap();
        let decoder = Decoder::new(Format::Auto)
            .with_mappings(Mappings::compile(&cfg, Format::Auto, false).unwrap());
        // Sanity: the mapped event is the native one (features in name
        // order for the object form).
        let mut got = decoder
            .decode_with_headers(EventKind::Prediction, &bytes, &headers)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut want = ev.clone();
        for e in [&mut got, &mut want] {
            if let InputEvent::Prediction(p) = e {
                p.features.0.sort_by(|a, b| a.0.cmp(&b.0));
            }
        }
        assert_eq!(got, want, "{name}");
        group.bench_function(name, |b| {
            b.iter(|| {
                decoder.decode_with_headers(EventKind::Prediction, black_box(&bytes), &headers)
            })
        });
    }
    group.finish();
}

/// A producer's schema for predictions: ours with the fields reversed, a
/// field we do not know first, another record name; and `ev` written with it.
fn producer_schema_and_datum(ev: &InputEvent) -> (String, Vec<u8>) {
    use apache_avro::types::Value;
    let mut json: serde_json::Value = serde_json::from_str(PREDICTION_SCHEMA).unwrap();
    json["name"] = "Inference".into();
    json["namespace"] = "com.acme".into();
    let fields = json["fields"].as_array_mut().unwrap();
    fields.reverse();
    fields.insert(0, serde_json::json!({"name": "trace_id", "type": "string"}));
    let text = json.to_string();
    let ours = apache_avro::Schema::parse_str(PREDICTION_SCHEMA).unwrap();
    let theirs = apache_avro::Schema::parse_str(&text).unwrap();
    let Value::Record(mut v) =
        apache_avro::from_avro_datum(&ours, &mut &encode_avro(ev)[..], None).unwrap()
    else {
        unreachable!()
    };
    v.reverse();
    v.insert(0, ("trace_id".into(), Value::String("t-1".into())));
    let mut framed = vec![0, 0, 0, 0, 2];
    framed.extend(apache_avro::to_avro_datum(&theirs, Value::Record(v)).unwrap());
    (text, framed)
}

fn bench_registry(c: &mut Criterion) {
    let ev = prediction();
    let cache = Arc::new(SchemaCache::new(10));
    cache.insert(1, WriterSchema::parse(PREDICTION_SCHEMA));
    let (text, theirs) = producer_schema_and_datum(&ev);
    cache.insert(2, WriterSchema::parse(&text));
    let plain = Decoder::new(Format::Auto);
    let registry = Decoder::new(Format::Auto).with_registry(cache);
    let cases = [
        ("avro_raw", &plain, encode_avro(&ev)),
        ("registry_own_schema", &registry, encode_confluent(&ev, 1)),
        ("registry_resolved", &registry, theirs),
    ];
    let mut group = c.benchmark_group("registry_decode");
    for (name, decoder, bytes) in &cases {
        let got = decoder.decode(EventKind::Prediction, bytes);
        // The same event whatever the path (feature order aside: a resolved
        // map comes through apache-avro's HashMap).
        let InputEvent::Prediction(mut got) = got.unwrap_or_else(|e| panic!("{name}: {e}")) else {
            unreachable!()
        };
        let InputEvent::Prediction(mut want) = ev.clone() else {
            unreachable!()
        };
        got.features.0.sort_by(|a, b| a.0.cmp(&b.0));
        want.features.0.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want, "{name}");
        group.throughput(Throughput::Elements(1));
        group.bench_function(*name, |b| {
            b.iter(|| decoder.decode(EventKind::Prediction, black_box(bytes)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decode, bench_mapped, bench_registry);
criterion_main!(benches);
