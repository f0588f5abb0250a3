//! The properties the fuzz targets check, kept out of the `fuzz_target!`
//! bodies so that the corpus generator (`examples/gen_corpus.rs`) and the
//! replay test below share the input layout with the targets.
//!
//! For every input, whatever its bytes:
//! - no panic, no abort (libFuzzer reports both as a crash);
//! - allocation follows the input: no single allocation above
//!   [`MAX_ALLOCATION`], and the peak of live heap bytes during one decode
//!   stays under [`heap_bound`] of the input's length (the counting allocator
//!   below; `-rss_limit_mb` backs it up for the whole process);
//! - a successful decode yields an event of the topic's type that
//!   [`validate`] accepts, and which every encoder writes and every format
//!   that accepts that encoding reads back to the same event (bit for bit;
//!   JSON writes non-finite feature values as `null`, as documented);
//! - the Avro reader's output re-encodes to a canonical datum no longer than
//!   its input, which reads back to the same event;
//! - a producer's datum read with its writer schema from a Schema Registry
//!   (resolved into our event, or mapped from the user's shape, or read as
//!   a generic Avro value) holds the same: bounded heap, and every event
//!   passes the checks above; a generic value re-encodes (apache-avro's
//!   writer) to a datum that reads back to the same JSON tree.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use apache_avro::schema::Name;
use apache_avro::types::Value;
use apache_avro::Schema;
use modelwatch::config::Format;
use modelwatch::ingest::avro_fuzzing as avro;
use modelwatch::ingest::avro_generic::{read_value, value_to_json, MAX_ZERO_BYTE_ITEMS};
use modelwatch::ingest::decode::{
    decode_alert, encode_alert, encode_avro, encode_confluent, encode_json, encode_single_object,
    validate, Decoder, EventKind, CONFLUENT_MAGIC, GROUND_TRUTH_SCHEMA, PREDICTION_SCHEMA,
};
use modelwatch::ingest::mapping::{
    Fields, LabelMapping, MappingConfig, Mappings, PredictionMapping, Source, SourceTable,
    TimestampUnit,
};
use modelwatch::ingest::resolve::{SchemaCache, WriterSchema};
use modelwatch::model::{FeatureValue, InputEvent};

// ------------------------------------------------------------ the allocator

/// No single allocation may be larger than this (the input is at most 64 KiB,
/// `-max_len`): a larger one is refused, which aborts the process with
/// "memory allocation of N bytes failed" — a crash for libFuzzer.
pub const MAX_ALLOCATION: usize = 16 << 20;

/// The system allocator, counting live bytes and their peak.
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl CountingAlloc {
    fn grew(size: usize) {
        let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

// SAFETY: every call forwards to `System` with the same layout; the counters
// are side bookkeeping.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            Self::grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The most heap one decode of `len` input bytes may hold at once: a fixed
/// allowance (parsed schemas are built before, reservations of up to 256 map
/// entries) plus a multiple of the input (a two-byte Avro map entry becomes a
/// 56-byte `(String, FeatureValue)`, and a vector grows by doubling).
pub fn heap_bound(len: usize) -> usize {
    (256 << 10) + 160 * len
}

/// Runs `f` and returns its result with the peak of heap bytes it added.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    (out, peak)
}

fn bounded<T>(what: &str, len: usize, f: impl FnOnce() -> T) -> T {
    let (out, peak) = measure(f);
    assert!(
        peak <= heap_bound(len),
        "{what}: {peak} heap bytes for a {len}-byte input (bound {})",
        heap_bound(len)
    );
    out
}

// ----------------------------------------------------------- input layouts

/// The four configurable formats, in the order of the `decode` selector.
pub const FORMATS: [Format; 4] = [
    Format::Auto,
    Format::Json,
    Format::Avro,
    Format::ConfluentAvro,
];

/// The `decode` target's input: one selector byte (bit 0: the topic, 0
/// predictions, 1 ground truth; bits 1–2: the index in [`FORMATS`]), then the
/// message payload.
pub fn decode_input(kind: EventKind, format: Format, payload: &[u8]) -> Vec<u8> {
    let f = FORMATS.iter().position(|f| *f == format).unwrap_or(0) as u8;
    let k = u8::from(kind == EventKind::GroundTruth);
    let mut out = Vec::with_capacity(payload.len() + 1);
    out.push(k | f << 1);
    out.extend_from_slice(payload);
    out
}

/// The `avro_reader` target's input: one selector byte (modulo 3: a
/// prediction, a ground-truth or an alert datum), then the datum.
pub fn avro_input(which: u8, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(datum.len() + 1);
    out.push(which);
    out.extend_from_slice(datum);
    out
}

// ------------------------------------------------------------------ checks

/// The `decode` target: `Decoder::decode` for the topic and format the first
/// byte selects.
pub fn check_decode(data: &[u8]) {
    let Some((&sel, payload)) = data.split_first() else {
        return;
    };
    let kind = if sel & 1 == 0 {
        EventKind::Prediction
    } else {
        EventKind::GroundTruth
    };
    let format = FORMATS[usize::from(sel >> 1) & 3];
    let decoder = Decoder::new(format);
    let res = bounded("decode", payload.len(), || decoder.decode(kind, payload));
    let Ok(ev) = res else {
        return;
    };
    check_event(kind, &ev);
}

/// What holds for every event a decoder returns: its type is the topic's,
/// [`validate`] accepts it, and every encoding reads back to it in every
/// format that accepts the encoding.
pub fn check_event(kind: EventKind, ev: &InputEvent) {
    let got = match ev {
        InputEvent::Prediction(_) => EventKind::Prediction,
        InputEvent::GroundTruth(_) => EventKind::GroundTruth,
    };
    assert_eq!(got, kind, "a {kind} topic decoded a {got} event: {ev:?}");
    if let Err(e) = validate(ev) {
        panic!("decoded an event that validate rejects ({e}): {ev:?}");
    }
    let json_view = json_normalised(ev);
    let encodings: [(&str, Vec<u8>, &[Format], &InputEvent); 4] = [
        (
            "JSON",
            encode_json(ev),
            &[Format::Auto, Format::Json],
            &json_view,
        ),
        (
            "raw Avro",
            encode_avro(ev),
            &[Format::Auto, Format::Avro],
            ev,
        ),
        (
            "single-object Avro",
            encode_single_object(ev),
            &[Format::Auto, Format::Avro],
            ev,
        ),
        (
            "Confluent Avro",
            encode_confluent(ev, 7),
            &[Format::Auto, Format::ConfluentAvro],
            ev,
        ),
    ];
    for (name, bytes, formats, want) in &encodings {
        for format in *formats {
            match Decoder::new(*format).decode(kind, bytes) {
                Ok(back) => assert!(
                    same(&back, want),
                    "{name} round trip under {format:?} changed the event:\n  \
                     was {want:?}\n  got {back:?}"
                ),
                Err(e) => panic!(
                    "{name} encoding of a decoded event rejected under {format:?} ({e}): \
                     {want:?}\n  bytes {bytes:?}"
                ),
            }
        }
    }
}

/// Bitwise equality (NaN equals itself): the raw Avro encodings are equal.
fn same(a: &InputEvent, b: &InputEvent) -> bool {
    encode_avro(a) == encode_avro(b)
}

/// The event as JSON carries it: non-finite feature values become `null`
/// (JSON has no NaN or infinity; `encode_json` documents it).
fn json_normalised(ev: &InputEvent) -> InputEvent {
    let mut ev = ev.clone();
    if let InputEvent::Prediction(p) = &mut ev {
        for (_, v) in &mut p.features.0 {
            if matches!(v, FeatureValue::Double(x) if !x.is_finite()) {
                *v = FeatureValue::Null;
            }
        }
    }
    ev
}

/// The `avro_reader` target: the bounded Avro reader alone, without framing
/// or validation, for the datum type the first byte selects.
pub fn check_avro_reader(data: &[u8]) {
    let Some((&sel, datum)) = data.split_first() else {
        return;
    };
    let len = datum.len();
    match sel % 3 {
        0 => {
            if let Ok(p) = bounded("read_prediction", len, || avro::read_prediction(datum)) {
                let w = avro::write_prediction(&p);
                canonical("prediction", datum, &w, |b| {
                    avro::read_prediction(b).map(|p| avro::write_prediction(&p))
                });
            }
        }
        1 => {
            if let Ok(g) = bounded("read_ground_truth", len, || avro::read_ground_truth(datum)) {
                let w = avro::write_ground_truth(&g);
                canonical("ground truth", datum, &w, |b| {
                    avro::read_ground_truth(b).map(|g| avro::write_ground_truth(&g))
                });
            }
        }
        _ => {
            if let Ok(a) = bounded("read_alert", len, || avro::read_alert(datum)) {
                let w = avro::write_alert(&a);
                canonical("alert", datum, &w, |b| {
                    avro::read_alert(b).map(|a| avro::write_alert(&a))
                });
            }
        }
    }
}

/// `written` (the writer's datum of what was read from `input`) is no longer
/// than the input (minimal varints, one map block), and reads back to an
/// event that writes the same bytes.
fn canonical(
    what: &str,
    input: &[u8],
    written: &[u8],
    reread: impl Fn(&[u8]) -> Result<Vec<u8>, String>,
) {
    assert!(
        written.len() <= input.len(),
        "{what}: re-encoding of a {}-byte datum is {} bytes",
        input.len(),
        written.len()
    );
    match reread(written) {
        Ok(again) => assert_eq!(
            again, written,
            "{what}: the writer's datum reads back differently"
        ),
        Err(e) => panic!("{what}: the writer's datum does not read back: {e}\n  {written:?}"),
    }
}

/// The `decode_alert` target: the alerts topic's decoder.
pub fn check_decode_alert(data: &[u8]) {
    let Ok(a) = bounded("decode_alert", data.len(), || decode_alert(data)) else {
        return;
    };
    let w = encode_alert(&a);
    canonical("alert", data, &w, |b| {
        decode_alert(b)
            .map(|a| encode_alert(&a))
            .map_err(|e| e.to_string())
    });
}

// ------------------------------------------------- the registry's schemas

/// A producer's prediction schema (tests/fixtures/registry/, the one of
/// tests/it/registry.rs): our fields in another order, extra fields (a
/// nested record), unions in another order.
pub const PRODUCER_PREDICTION: &str =
    include_str!("../../tests/fixtures/registry/producer_prediction.avsc");

/// A producer's label schema (tests/fixtures/registry/, the one of
/// tests/it/registry.rs).
pub const PRODUCER_LABEL: &str = include_str!("../../tests/fixtures/registry/producer_label.avsc");

/// A producer's own nested shape, read through [`registry_mapping`]: nested
/// records, maps, unions, arrays, an enum (and a reference to it), fixed,
/// bytes, logical types, and arrays of items that take no bytes.
pub const PRODUCER_NESTED: &str = r#"{"type":"record","name":"Scored","namespace":"com.acme","fields":[
    {"name":"meta","type":{"type":"record","name":"Meta","fields":[
        {"name":"id","type":"string"},
        {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"day","type":{"type":"int","logicalType":"date"}},
        {"name":"model","type":{"type":"record","name":"Model","fields":[
            {"name":"name","type":"string"},
            {"name":"version","type":"int"},
            {"name":"stage","type":{"type":"enum","name":"Stage","symbols":["DEV","STAGING","PROD"]}}]}}]}},
    {"name":"inputs","type":{"type":"map","values":["null","boolean","int","long","float","double","string",{"type":"array","items":"double"}]}},
    {"name":"out","type":["null",{"type":"record","name":"Out","fields":[
        {"name":"p","type":"float"},
        {"name":"label","type":["string","long"]},
        {"name":"probs","type":{"type":"map","values":"double"}},
        {"name":"value","type":["null","double"]}]}]},
    {"name":"ctx","type":{"type":"array","items":"string"}},
    {"name":"us","type":{"type":"long","logicalType":"timestamp-micros"}},
    {"name":"digest","type":{"type":"fixed","name":"Digest","size":4}},
    {"name":"blob","type":"bytes"},
    {"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}},
    {"name":"uid","type":{"type":"string","logicalType":"uuid"}},
    {"name":"big","type":{"type":"bytes","logicalType":"big-decimal"}},
    {"name":"t","type":{"type":"int","logicalType":"time-millis"}},
    {"name":"dur","type":{"type":"fixed","name":"Dur","size":12,"logicalType":"duration"}},
    {"name":"stages","type":{"type":"array","items":{"type":"map","values":"Stage"}}},
    {"name":"empties","type":{"type":"array","items":{"type":"record","name":"Empty","fields":[]}}},
    {"name":"nulls","type":{"type":"array","items":"null"}}
]}"#;

/// A recursive schema: a linked list whose nodes also hold a list of nodes.
pub const LINKED_LIST: &str = r#"{"type":"record","name":"Node","namespace":"com.acme","fields":[
    {"name":"value","type":"long"},
    {"name":"label","type":["null","string"]},
    {"name":"kids","type":{"type":"array","items":"Node"}},
    {"name":"next","type":["null","Node"]}
]}"#;

/// The registry ids the selector byte picks (`sel & 7`), with the schema
/// text registered under each: `None` for an id the registry does not know
/// (an error entry) and for one never fetched (not in the cache).
pub const REGISTRY_IDS: [(u32, Option<&str>); 8] = [
    (101, Some(PRODUCER_PREDICTION)),
    (102, Some(PRODUCER_LABEL)),
    (103, Some(PRODUCER_NESTED)),
    (104, Some(LINKED_LIST)),
    (105, Some(PREDICTION_SCHEMA)),
    (106, Some(GROUND_TRUTH_SCHEMA)),
    (107, None),
    (108, None),
];

/// The id registered as unknown to the registry; 108 is not in the cache.
const UNKNOWN_ID: u32 = 107;

/// The headers every mapped message carries (the `region` segment).
pub const HEADERS: &[(&str, &[u8])] = &[("region", b"eu-west"), ("other", b"\xff")];

/// `[kafka.mapping]` for records of [`PRODUCER_NESTED`] (every path exists
/// in it) on both topics.
pub fn registry_mapping() -> MappingConfig {
    let p = Source::path;
    MappingConfig {
        predictions: Some(PredictionMapping {
            request_id: Some(p("/meta/id")),
            model_id: Some(p("/meta/model/name")),
            model_version: Some(p("/meta/model/version")),
            timestamp: Some(p("/meta/at")),
            timestamp_unit: TimestampUnit::Millis,
            features: Some(Fields::Object("/inputs".to_owned())),
            score: Some(p("/out/p")),
            predicted_label: Some(p("/out/label")),
            predicted_value: Some(p("/out/value")),
            class_probabilities: Some(p("/out/probs")),
            segments: Some(Fields::List(vec![
                Source(SourceTable {
                    path: Some("/ctx/0".to_owned()),
                    name: Some("country".to_owned()),
                    ..SourceTable::default()
                }),
                p("/meta/model/stage"),
                Source(SourceTable {
                    header: Some("region".to_owned()),
                    ..SourceTable::default()
                }),
            ])),
            latency_ms: Some(p("/t")),
        }),
        labels: Some(LabelMapping {
            request_id: Some(p("/meta/id")),
            timestamp: Some(p("/us")),
            timestamp_unit: TimestampUnit::Micros,
            actual_label: Some(p("/out/label")),
            actual_value: Some(p("/out/value")),
        }),
    }
}

struct Registry {
    /// Decoders with the registry, by format (auto, confluent-avro).
    plain: [Decoder; 2],
    /// The same with [`registry_mapping`] on both topics.
    mapped: [Decoder; 2],
    /// The parsed writer schemas by index in [`REGISTRY_IDS`].
    schemas: Vec<Option<(Schema, HashMap<Name, Schema>)>>,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let cache = Arc::new(SchemaCache::new(REGISTRY_IDS.len()));
    let mut schemas = Vec::new();
    for (id, text) in REGISTRY_IDS {
        let Some(text) = text else {
            schemas.push(None);
            continue;
        };
        let ws = WriterSchema::parse(text).unwrap_or_else(|e| panic!("schema {id}: {e}"));
        schemas.push(Some(ws.record.clone().expect("the schema resolves")));
        cache.insert(id, Ok(ws));
    }
    cache.insert(
        UNKNOWN_ID,
        Err(format!("the registry does not know schema id {UNKNOWN_ID}")),
    );
    let cfg = registry_mapping();
    let decoders = |mapped: bool| {
        [Format::Auto, Format::ConfluentAvro].map(|f| {
            let d = Decoder::new(f).with_registry(cache.clone());
            if mapped {
                d.with_mappings(Mappings::compile(&cfg, f, true).expect("the mapping compiles"))
            } else {
                d
            }
        })
    };
    Registry {
        plain: decoders(false),
        mapped: decoders(true),
        schemas,
    }
});

/// The `registry_decode` target's input: one selector byte (bits 0–2: the
/// index in [`REGISTRY_IDS`]; bit 3: format `confluent-avro` rather than
/// `auto`), then the datum, framed with that schema id.
pub fn registry_input(index: usize, confluent_avro: bool, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(datum.len() + 1);
    out.push((index & 7) as u8 | u8::from(confluent_avro) << 3);
    out.extend_from_slice(datum);
    out
}

/// The heap the generic reader may take beyond [`heap_bound`]: up to
/// [`MAX_ZERO_BYTE_ITEMS`] items that take no input byte (documented in
/// `avro_generic`), each an Avro value in a vector that grows by doubling
/// (up to twice the slots) and its JSON tree.
pub fn zero_byte_allowance() -> usize {
    let json = std::mem::size_of_val(&value_to_json(&Value::Null));
    MAX_ZERO_BYTE_ITEMS * (2 * std::mem::size_of::<Value>() + json)
}

fn bounded_generic<T>(what: &str, len: usize, f: impl FnOnce() -> T) -> T {
    let (out, peak) = measure(f);
    let bound = heap_bound(len) + zero_byte_allowance();
    assert!(
        peak <= bound,
        "{what}: {peak} heap bytes for a {len}-byte input (bound {bound})"
    );
    out
}

/// The index in [`REGISTRY_IDS`], the index of the format (auto,
/// confluent-avro) and the Confluent frame of a `registry_decode` input.
fn registry_frame(sel: u8, datum: &[u8]) -> (usize, usize, Vec<u8>) {
    let index = usize::from(sel & 7);
    let mut frame = Vec::with_capacity(datum.len() + 5);
    frame.push(CONFLUENT_MAGIC);
    frame.extend_from_slice(&REGISTRY_IDS[index].0.to_be_bytes());
    frame.extend_from_slice(datum);
    (index, usize::from(sel >> 3 & 1), frame)
}

/// The `registry_decode` target: the Confluent frame of the selected schema
/// id through decoders with the registry, without and with a mapping, on
/// both topics, and the datum through the generic reader alone.
pub fn check_registry_decode(data: &[u8]) {
    let Some((&sel, datum)) = data.split_first() else {
        return;
    };
    let r = &*REGISTRY;
    let (index, format, frame) = registry_frame(sel, datum);
    let len = frame.len();
    for kind in [EventKind::Prediction, EventKind::GroundTruth] {
        let d = &r.plain[format];
        if let Ok(ev) = bounded_generic("registry decode", len, || d.decode(kind, &frame)) {
            check_event(kind, &ev);
        }
        let d = &r.mapped[format];
        let res = bounded_generic("mapped decode", len, || {
            d.decode_with_headers(kind, &frame, HEADERS)
        });
        if let Ok(ev) = res {
            check_event(kind, &ev);
        }
    }
    let Some((schema, _)) = &r.schemas[index] else {
        return;
    };
    let Ok(v) = bounded_generic("read_value", datum.len(), || read_value(schema, datum)) else {
        return;
    };
    let json = bounded_generic("value_to_json", datum.len(), || value_to_json(&v));
    let written = match apache_avro::to_avro_datum(schema, v) {
        Ok(w) => w,
        // apache-avro's writer refuses a decimal of zero bytes, which its
        // own reader (and ours, the same) returns: not re-encoded.
        Err(e) if e.to_string().contains("decimal sign extension 0") => return,
        Err(e) => panic!("apache-avro does not write a value read_value returned: {e}"),
    };
    // No length property: a logical type may re-encode longer (a uuid read
    // from its 32-digit form is written with hyphens).
    match read_value(schema, &written) {
        Ok(back) => assert_eq!(
            value_to_json(&back),
            json,
            "the re-encoded datum reads back differently"
        ),
        Err(e) => panic!("the re-encoded datum does not read back: {e}\n  {written:?}"),
    }
}

#[cfg(test)]
mod tests {
    //! Replays the committed corpus through the checks (no fuzzer needed):
    //! `cargo test --manifest-path fuzz/Cargo.toml`.

    use std::path::Path;
    use std::sync::Mutex;

    use super::*;

    /// The heap counters are process-wide: one test at a time measures.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn replay(target: &str, check: fn(&[u8])) -> usize {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
            let path = entry.unwrap().path();
            check(&std::fs::read(&path).unwrap());
            n += 1;
        }
        n
    }

    #[test]
    fn corpus_decode() {
        assert!(replay("decode", check_decode) >= 16);
    }

    #[test]
    fn corpus_avro_reader() {
        assert!(replay("avro_reader", check_avro_reader) >= 16);
    }

    #[test]
    fn corpus_decode_alert() {
        assert!(replay("decode_alert", check_decode_alert) >= 16);
    }

    #[test]
    fn corpus_registry_decode() {
        assert!(replay("registry_decode", check_registry_decode) >= 16);
    }

    /// The seeds reach the end of every path: events resolved from the
    /// producer schemas and ours, events mapped from the nested schema,
    /// values of every schema from the generic reader.
    #[test]
    fn registry_seeds_reach_events() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/registry_decode");
        let r = &*REGISTRY;
        let (mut resolved, mut mapped, mut generic) = (Vec::new(), Vec::new(), Vec::new());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if !name.starts_with("seed-") {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let (&sel, datum) = data.split_first().unwrap();
            let (index, format, frame) = registry_frame(sel, datum);
            for kind in [EventKind::Prediction, EventKind::GroundTruth] {
                if r.plain[format].decode(kind, &frame).is_ok() {
                    resolved.push(name.clone());
                }
                if r.mapped[format]
                    .decode_with_headers(kind, &frame, HEADERS)
                    .is_ok()
                {
                    mapped.push(name.clone());
                }
            }
            if let Some((schema, _)) = &r.schemas[index] {
                if read_value(schema, datum).is_ok() {
                    generic.push(name.clone());
                }
            }
        }
        // A producer prediction and two producer labels, in two formats,
        // and one of each of ours (the producer prediction without a score
        // is refused by validation: no model output).
        assert_eq!(resolved.len(), 8, "{resolved:?}");
        // The nested seeds with an `out` record, in two formats.
        assert_eq!(mapped.len(), 4, "{mapped:?}");
        assert!(mapped.iter().all(|n| n.contains("nested")), "{mapped:?}");
        // Every valid datum: eight producer seeds in two formats, ours twice.
        assert_eq!(generic.len(), 18, "{generic:?}");
    }

    #[test]
    fn heap_bound_catches_a_blowup() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (_, peak) = measure(|| vec![0u8; 1 << 20]);
        assert!(peak >= 1 << 20);
        assert!(peak > heap_bound(1000));
    }

    #[test]
    #[should_panic(expected = "validate rejects")]
    fn check_event_refuses_an_invalid_event() {
        let ev = InputEvent::GroundTruth(modelwatch::model::GroundTruthEvent {
            request_id: "r".to_owned(),
            timestamp: 1,
            ..Default::default()
        });
        check_event(EventKind::GroundTruth, &ev);
    }

    #[test]
    #[should_panic(expected = "a prediction topic decoded a ground-truth event")]
    fn check_event_refuses_the_wrong_type() {
        let ev = InputEvent::GroundTruth(modelwatch::model::GroundTruthEvent {
            request_id: "r".to_owned(),
            timestamp: 1,
            actual_label: Some("1".to_owned()),
            ..Default::default()
        });
        check_event(EventKind::Prediction, &ev);
    }

    #[test]
    fn selector_layout() {
        let d = decode_input(EventKind::GroundTruth, Format::ConfluentAvro, b"x");
        assert_eq!(d, vec![0b111, b'x']);
        let d = decode_input(EventKind::Prediction, Format::Json, b"");
        assert_eq!(d, vec![0b010]);
    }
}
