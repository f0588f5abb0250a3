//! Decode throughput of one 25-feature prediction (20 numeric, 5 categorical)
//! in each wire format, through the same `Decoder` the consumer uses; and
//! the cost of a Schema Registry writer schema (`registry_decode`): the same
//! event raw, Confluent-framed with our own schema (the fast path), and
//! Confluent-framed with a producer's schema (our fields in reverse order
//! plus one we do not know), resolved per event.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use modelwatch::config::Format;
use modelwatch::ingest::decode::{
    encode_avro, encode_confluent, encode_json, encode_single_object, Decoder, EventKind,
    PREDICTION_SCHEMA,
};
use modelwatch::ingest::resolve::{SchemaCache, WriterSchema};
use modelwatch::model::{Entries, FeatureValue, InputEvent, PredictionEvent};
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

criterion_group!(benches, bench_decode, bench_registry);
criterion_main!(benches);
