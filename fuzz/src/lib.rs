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
//!   its input, which reads back to the same event.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use modelwatch::config::Format;
use modelwatch::ingest::avro_fuzzing as avro;
use modelwatch::ingest::decode::{
    decode_alert, encode_alert, encode_avro, encode_confluent, encode_json, encode_single_object,
    validate, Decoder, EventKind,
};
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
