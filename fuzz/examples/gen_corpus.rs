//! Writes the seed corpus of the fuzz targets from the project's own encoders:
//! events of the synthetic traffic generator and hand-made edge cases (every
//! feature type, NaN / infinities, Unicode and escapes in identifiers, the
//! timestamp bounds), each in every encoding under every format that reads it,
//! plus a few near misses (truncated, wrong topic, wrong format). For
//! `registry_decode`: a valid datum of each registered writer schema,
//! written with apache-avro (ours with our encoder), and a few near misses.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`
//!
//! Replaces the `seed-*` files of `fuzz/corpus/<target>/`; files the fuzzer
//! found (named by their SHA-1) are kept.

use std::path::{Path, PathBuf};

use apache_avro::types::Value;
use apache_avro::Schema;

use modelwatch::config::Format;
use modelwatch::generate::{Generator, Scenario};
use modelwatch::ingest::decode::{
    encode_alert, encode_avro, encode_confluent, encode_json, encode_single_object, EventKind,
    MAX_TIMESTAMP_MS,
};
use modelwatch::model::{
    AlertEvent, AlertStatus, Entries, FeatureValue, GroundTruthEvent, InputEvent, PredictionEvent,
    Severity,
};
use modelwatch_fuzz::{
    avro_input, decode_input, registry_input, LINKED_LIST, PRODUCER_LABEL, PRODUCER_NESTED,
    PRODUCER_PREDICTION,
};

fn events() -> Vec<InputEvent> {
    let mut out = Vec::new();
    // Synthetic traffic, small: three numeric and two categorical features,
    // a classifier and a regression model, labels with both outcomes.
    let scenario = Scenario {
        seed: 7,
        count: 8,
        versions: vec!["v1".to_owned()],
        numeric_features: 3,
        categorical_features: 2,
        missing_rate: 0.2,
        label_fraction: 1.0,
        label_delay_ms: (1_000, 5_000),
        segments: vec![("country".to_owned(), vec!["US".to_owned(), "DE".to_owned()])],
        regression_model: Some("price".to_owned()),
        ..Scenario::default()
    };
    let mut generator = Generator::new(scenario);
    let (mut predictions, mut labels) = (0, 0);
    while let Some(ev) = generator.next_event() {
        match ev {
            InputEvent::Prediction(_) if predictions < 6 => predictions += 1,
            InputEvent::GroundTruth(_) if labels < 4 => labels += 1,
            _ => continue,
        }
        out.push(ev);
    }

    // Hand-made edge cases.
    let base = PredictionEvent {
        request_id: "r-1".to_owned(),
        model_id: "m".to_owned(),
        model_version: "1".to_owned(),
        timestamp: 1_704_067_200_000,
        ..PredictionEvent::default()
    };
    out.push(InputEvent::Prediction(PredictionEvent {
        predicted_label: Some("yes".to_owned()),
        ..base.clone()
    }));
    out.push(InputEvent::Prediction(PredictionEvent {
        predicted_label: Some("b".to_owned()),
        class_probabilities: Some(Entries(vec![
            ("a".to_owned(), 0.25),
            ("b".to_owned(), 0.75),
            ("c".to_owned(), 0.0),
        ])),
        latency_ms: Some(12.5),
        ..base.clone()
    }));
    out.push(InputEvent::Prediction(PredictionEvent {
        request_id: "é😀\u{0}\"\\\n</x>".to_owned(),
        model_id: "model with spaces".to_owned(),
        model_version: "v\u{7f}".to_owned(),
        timestamp: 1,
        predicted_value: Some(-1e300),
        features: Entries(vec![
            ("null".to_owned(), FeatureValue::Null),
            ("t".to_owned(), FeatureValue::Bool(true)),
            ("f".to_owned(), FeatureValue::Bool(false)),
            ("min".to_owned(), FeatureValue::Long(i64::MIN)),
            ("max".to_owned(), FeatureValue::Long(i64::MAX)),
            ("nan".to_owned(), FeatureValue::Double(f64::NAN)),
            ("inf".to_owned(), FeatureValue::Double(f64::NEG_INFINITY)),
            ("negzero".to_owned(), FeatureValue::Double(-0.0)),
            ("tiny".to_owned(), FeatureValue::Double(5e-324)),
            ("int-like".to_owned(), FeatureValue::Double(3.0)),
            ("s".to_owned(), FeatureValue::String("ü\t".to_owned())),
            ("".to_owned(), FeatureValue::String(String::new())),
            ("t".to_owned(), FeatureValue::Long(2)),
        ]),
        segments: Entries(vec![
            ("country".to_owned(), "FR".to_owned()),
            ("".to_owned(), "".to_owned()),
        ]),
        ..base.clone()
    }));
    out.push(InputEvent::Prediction(PredictionEvent {
        timestamp: MAX_TIMESTAMP_MS - 1,
        score: Some(1.0),
        predicted_label: Some("1".to_owned()),
        latency_ms: Some(0.0),
        segments: Entries(
            (0..12)
                .map(|i| (format!("k{i}"), format!("v{i}")))
                .collect(),
        ),
        ..base.clone()
    }));
    let label = GroundTruthEvent {
        request_id: "r-1".to_owned(),
        timestamp: 1_704_067_260_000,
        ..GroundTruthEvent::default()
    };
    out.push(InputEvent::GroundTruth(GroundTruthEvent {
        actual_label: Some("yes".to_owned()),
        ..label.clone()
    }));
    out.push(InputEvent::GroundTruth(GroundTruthEvent {
        actual_value: Some(-0.5),
        ..label.clone()
    }));
    out.push(InputEvent::GroundTruth(GroundTruthEvent {
        request_id: "\u{2028}{".to_owned(),
        timestamp: MAX_TIMESTAMP_MS - 1,
        actual_label: Some(String::new()),
        actual_value: Some(1e308),
    }));
    out
}

fn alerts() -> Vec<AlertEvent> {
    let base = AlertEvent {
        alert_id: "3f2a9c0d11e4b7aa".to_owned(),
        rule: "psi".to_owned(),
        status: AlertStatus::Firing,
        severity: Severity::Warning,
        model_id: "fraud-detector".to_owned(),
        model_version: "v1".to_owned(),
        segment: String::new(),
        feature: Some("num_00".to_owned()),
        metric: "psi".to_owned(),
        value: 0.31,
        threshold: 0.2,
        baseline: None,
        p_value: Some(1e-9),
        window_start: 1_704_067_200_000,
        window_end: 1_704_067_500_000,
        fired_at: 1_704_067_530_000,
        message: "psi of num_00 is 0.31 (threshold 0.2)".to_owned(),
    };
    let mut out = Vec::new();
    for status in [AlertStatus::Firing, AlertStatus::Resolved] {
        for severity in [Severity::Warning, Severity::Critical] {
            for (feature, baseline, p_value) in [
                (Some("num_00"), None, Some(1e-9)),
                (None, Some(0.92), None),
                (Some(""), Some(f64::NAN), Some(f64::INFINITY)),
            ] {
                out.push(AlertEvent {
                    status,
                    severity,
                    feature: feature.map(str::to_owned),
                    baseline,
                    p_value,
                    ..base.clone()
                });
            }
        }
    }
    out.push(AlertEvent {
        segment: "country=DE".to_owned(),
        rule: "accuracy_drop".to_owned(),
        metric: "accuracy".to_owned(),
        value: -0.0,
        threshold: f64::MAX,
        window_start: i64::MIN,
        window_end: i64::MAX,
        fired_at: -1,
        message: "<!channel> *bold* é😀 [link|http://x]".to_owned(),
        ..base.clone()
    });
    out.push(AlertEvent {
        alert_id: String::new(),
        rule: String::new(),
        model_id: String::new(),
        model_version: String::new(),
        feature: None,
        metric: String::new(),
        message: String::new(),
        ..base
    });
    out
}

struct Corpus {
    dir: PathBuf,
    n: usize,
}

impl Corpus {
    fn new(root: &Path, target: &str) -> Corpus {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for entry in std::fs::read_dir(&dir).expect("list the corpus directory") {
            let path = entry.expect("list the corpus directory").path();
            let seed = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"));
            if seed {
                std::fs::remove_file(&path).expect("remove an old seed");
            }
        }
        Corpus { dir, n: 0 }
    }

    fn add(&mut self, what: &str, bytes: &[u8]) {
        let path = self.dir.join(format!("seed-{:03}-{what}", self.n));
        std::fs::write(&path, bytes).expect("write a seed");
        self.n += 1;
    }
}

fn kind_of(ev: &InputEvent) -> EventKind {
    match ev {
        InputEvent::Prediction(_) => EventKind::Prediction,
        InputEvent::GroundTruth(_) => EventKind::GroundTruth,
    }
}

fn main() {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let events = events();
    let alerts = alerts();

    // decode: every event in every encoding, under every format that reads it.
    let mut c = Corpus::new(&root, "decode");
    for ev in &events {
        let kind = kind_of(ev);
        let json = encode_json(ev);
        let raw = encode_avro(ev);
        let single = encode_single_object(ev);
        let confluent = encode_confluent(ev, 1);
        for (name, bytes, format) in [
            ("json-auto", &json, Format::Auto),
            ("json", &json, Format::Json),
            ("avro-auto", &raw, Format::Auto),
            ("single-object", &single, Format::Avro),
            ("confluent", &confluent, Format::ConfluentAvro),
        ] {
            c.add(name, &decode_input(kind, format, bytes));
        }
    }
    // Near misses: the other topic, the wrong format, truncation, empty input.
    let p = &events[0];
    let g = events
        .iter()
        .find(|e| kind_of(e) == EventKind::GroundTruth)
        .expect("the generator makes labels");
    let raw = encode_avro(p);
    for (name, kind, format, bytes) in [
        (
            "wrong-topic-avro",
            EventKind::GroundTruth,
            Format::Avro,
            raw.clone(),
        ),
        (
            "wrong-topic-json",
            EventKind::Prediction,
            Format::Json,
            encode_json(g),
        ),
        (
            "wrong-topic-single",
            EventKind::GroundTruth,
            Format::Auto,
            encode_single_object(p),
        ),
        (
            "wrong-format",
            EventKind::Prediction,
            Format::Json,
            encode_confluent(p, 1),
        ),
        (
            "truncated-avro",
            EventKind::Prediction,
            Format::Avro,
            raw[..raw.len() / 2].to_vec(),
        ),
        (
            "short-confluent",
            EventKind::Prediction,
            Format::ConfluentAvro,
            vec![0, 0, 1],
        ),
        (
            "whitespace",
            EventKind::Prediction,
            Format::Auto,
            b" \n\t".to_vec(),
        ),
        (
            "json-array",
            EventKind::Prediction,
            Format::Auto,
            b"[1,{\"a\":[]}]".to_vec(),
        ),
        (
            "json-nested",
            EventKind::Prediction,
            Format::Json,
            b"{\"request_id\":\"r\",\"features\":{\"a\":{\"b\":1}},\"timestamp\":1.7e12}".to_vec(),
        ),
    ] {
        c.add(name, &decode_input(kind, format, &bytes));
    }

    // avro_reader: the raw datums of every event and alert, and truncations.
    let mut c = Corpus::new(&root, "avro_reader");
    for ev in &events {
        let which = match ev {
            InputEvent::Prediction(_) => 0,
            InputEvent::GroundTruth(_) => 1,
        };
        c.add("event", &avro_input(which, &encode_avro(ev)));
    }
    for a in alerts.iter().step_by(2) {
        c.add("alert", &avro_input(2, &encode_alert(a)));
    }
    c.add("truncated", &avro_input(0, &raw[..raw.len() - 3]));
    // A map block with a negative count (followed by its byte size).
    c.add(
        "negative-block",
        &avro_input(0, &negative_block_prediction()),
    );

    // registry_decode: a datum of each writer schema under its id, in both
    // formats; ours; then ids the registry does not know and near misses.
    let mut c = Corpus::new(&root, "registry_decode");
    let datums = registry_datums();
    for (i, name, d) in &datums {
        for confluent_avro in [false, true] {
            c.add(name, &registry_input(*i, confluent_avro, d));
        }
    }
    let ours = [
        &events[0],
        events
            .iter()
            .find(|e| kind_of(e) == EventKind::GroundTruth)
            .expect("the generator makes labels"),
    ];
    c.add(
        "ours-prediction",
        &registry_input(4, false, &encode_avro(ours[0])),
    );
    c.add(
        "ours-label",
        &registry_input(5, true, &encode_avro(ours[1])),
    );
    let (_, _, nested) = &datums[4];
    c.add("unknown-id", &registry_input(6, false, nested));
    c.add("not-fetched-id", &registry_input(7, true, nested));
    c.add(
        "nested-truncated",
        &registry_input(2, false, &nested[..nested.len() / 2]),
    );
    c.add("nested-as-list", &registry_input(3, false, nested));
    c.add(
        "ours-as-producer",
        &registry_input(0, false, &encode_avro(ours[0])),
    );

    // decode_alert: every alert, and a few truncations.
    let mut c = Corpus::new(&root, "decode_alert");
    for a in &alerts {
        c.add("alert", &encode_alert(a));
    }
    let datum = encode_alert(&alerts[0]);
    for cut in [1, datum.len() / 3, datum.len() - 1] {
        c.add("truncated", &datum[..cut]);
    }
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn s(x: &str) -> Value {
    Value::String(x.to_owned())
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

/// `v` (plain values: unions, enums and logical types are found by
/// apache-avro's resolution) as a datum of `schema`.
fn datum(schema: &str, v: Value) -> Vec<u8> {
    let schema = Schema::parse_str(schema).expect("a registry seed schema parses");
    let v = v.resolve(&schema).expect("a seed value resolves");
    apache_avro::to_avro_datum(&schema, v).expect("a seed value writes")
}

/// Valid datums of the producer schemas in `REGISTRY_IDS` order (0–3), by name.
fn registry_datums() -> Vec<(usize, &'static str, Vec<u8>)> {
    let prediction = |score: Value, features: Vec<(&str, Value)>| {
        record(vec![
            ("trace_id", s("t-1")),
            ("timestamp", Value::Long(1_733_140_000_123)),
            ("segments", map(vec![("country", s("DE"))])),
            ("model_version", s("v2")),
            ("model_id", s("fraud")),
            ("features", map(features)),
            ("score", score),
            (
                "host",
                record(vec![("name", s("scorer-1")), ("region", s("eu"))]),
            ),
            ("request_id", s("r-1")),
            ("predicted_value", Value::Null),
            ("latency_ms", Value::Double(3.5)),
        ])
    };
    let label = |label: Value, value: Value| {
        record(vec![
            ("actual_value", value),
            ("source", s("chargebacks")),
            ("request_id", s("r-1")),
            ("actual_label", label),
            ("timestamp", Value::Long(1_733_140_060_000)),
        ])
    };
    let nested = |out: Value, label_tail: usize| {
        record(vec![
            (
                "meta",
                record(vec![
                    ("id", s("r-1")),
                    ("at", Value::Long(1_733_140_000_123)),
                    ("day", Value::Int(20_059)),
                    (
                        "model",
                        record(vec![
                            ("name", s("fraud")),
                            ("version", Value::Int(3)),
                            ("stage", Value::Enum(2, "PROD".to_owned())),
                        ]),
                    ),
                ]),
            ),
            (
                "inputs",
                map(vec![
                    ("amount", Value::Double(12.5)),
                    ("channel", s("web")),
                    ("age", Value::Null),
                    ("vip", Value::Boolean(true)),
                    ("n", Value::Int(-7)),
                    ("big", Value::Long(1 << 40)),
                    ("f", Value::Float(0.5)),
                    (
                        "vec",
                        Value::Array(vec![Value::Double(1.0), Value::Double(-2.0)]),
                    ),
                ]),
            ),
            ("out", out),
            (
                "ctx",
                Value::Array(
                    (0..label_tail)
                        .map(|i| s(["DE", "mobile"][i % 2]))
                        .collect(),
                ),
            ),
            ("us", Value::Long(1_733_140_060_000_000)),
            ("digest", Value::Fixed(4, vec![0xde, 0xad, 0xbe, 0xef])),
            ("blob", Value::Bytes(vec![0, 1, 255])),
            // 12.34 (apache-avro's resolution wants at least as many bytes
            // as the precision could need).
            ("amount", Value::Bytes(vec![0, 0, 0, 0, 0x04, 0xd2])),
            ("uid", s("67e55044-10b1-426f-9247-bb680e5fe0c8")),
            // 1.23: length 1, unscaled 123, scale 2.
            ("big", Value::Bytes(vec![2, 123, 4])),
            ("t", Value::Int(45_000)),
            (
                "dur",
                Value::Fixed(12, vec![1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]),
            ),
            (
                "stages",
                Value::Array(vec![map(vec![("a", Value::Enum(0, "DEV".to_owned()))])]),
            ),
            ("empties", Value::Array(vec![record(vec![]); 3])),
            ("nulls", Value::Array(vec![Value::Null; 2])),
        ])
    };
    let out = |label: Value| {
        record(vec![
            ("p", Value::Float(0.75)),
            ("label", label),
            (
                "probs",
                map(vec![("0", Value::Double(0.25)), ("1", Value::Double(0.75))]),
            ),
            ("value", Value::Null),
        ])
    };
    let node = |value: i64, kids: Vec<Value>, next: Value| {
        record(vec![
            ("value", Value::Long(value)),
            (
                "label",
                if value % 2 == 0 {
                    s("even")
                } else {
                    Value::Null
                },
            ),
            ("kids", Value::Array(kids)),
            ("next", next),
        ])
    };
    let list = node(
        1,
        vec![node(10, vec![], Value::Null), node(11, vec![], Value::Null)],
        node(
            2,
            vec![],
            node(3, vec![node(30, vec![], Value::Null)], Value::Null),
        ),
    );
    vec![
        (
            0,
            "producer-prediction",
            datum(
                PRODUCER_PREDICTION,
                prediction(
                    Value::Double(0.9),
                    vec![("amount", Value::Double(12.5)), ("channel", s("web"))],
                ),
            ),
        ),
        (
            0,
            "producer-prediction-nulls",
            datum(
                PRODUCER_PREDICTION,
                prediction(Value::Null, vec![("age", Value::Null)]),
            ),
        ),
        (
            1,
            "producer-label",
            datum(PRODUCER_LABEL, label(s("1"), Value::Null)),
        ),
        (
            1,
            "producer-label-value",
            datum(PRODUCER_LABEL, label(Value::Null, Value::Double(-2.5))),
        ),
        (2, "nested", datum(PRODUCER_NESTED, nested(out(s("1")), 2))),
        (
            2,
            "nested-long-label",
            datum(PRODUCER_NESTED, nested(out(Value::Long(7)), 1)),
        ),
        (
            2,
            "nested-no-out",
            datum(PRODUCER_NESTED, nested(Value::Null, 0)),
        ),
        (3, "linked-list", datum(LINKED_LIST, list)),
    ]
}

/// A prediction whose `features` map is written as one block with a
/// negative count and its byte size, as some Avro writers do.
fn negative_block_prediction() -> Vec<u8> {
    // request_id "r", model_id "m", model_version "1", timestamp 5,
    // features: count -1 (zig-zag 1), size 4, key "x", union 2 (long), 3;
    // end of map; predicted_label union 1 "a"; predicted_value null;
    // score null; class_probabilities null; segments empty; latency null.
    vec![
        2, b'r', 2, b'm', 2, b'1', 10, // ids, timestamp
        1, 8, 2, b'x', 4, 6, 0, // features
        2, 2, b'a', 0, 0, 0, 0, 0,
    ]
}
