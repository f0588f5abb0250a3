//! Decode throughput of one 25-feature prediction (20 numeric, 5 categorical)
//! in each wire format, through the same `Decoder` the consumer uses.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use modelwatch::config::Format;
use modelwatch::ingest::decode::{
    encode_avro, encode_confluent, encode_json, encode_single_object, Decoder, EventKind,
};
use modelwatch::model::{Entries, FeatureValue, InputEvent, PredictionEvent};

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

criterion_group!(benches, bench_decode);
criterion_main!(benches);
