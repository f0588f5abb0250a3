//! The Avro binary codec of the three event schemas (`schemas/*.avsc`): a
//! bounded reader and a writer, specialised to the fixed field order of each
//! record. Pure: no I/O, no framing (that is [`super::decode`]'s job).
//!
//! Why hand-written rather than `apache_avro::from_avro_datum` into a `Value`:
//! apache-avro reserves capacity for a whole map block before reading it, so a
//! ten-byte message announcing 400 million map entries asks the allocator for
//! tens of gigabytes and aborts the process. This reader bounds every length
//! and block count by the bytes actually left, keeps map entries in wire order
//! (an `apache_avro::types::Value::Map` is a `HashMap`), and needs no
//! intermediate tree. The tests check it both ways against apache-avro driven
//! by the parsed `.avsc` files, and byte for byte against fastavro.

use std::fmt;

use crate::model::{
    AlertEvent, AlertStatus, Entries, FeatureValue, GroundTruthEvent, PredictionEvent, Severity,
};

/// Why an Avro datum could not be read: truncated, trailing bytes, bad union
/// index, invalid UTF-8... The text names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvroError(pub(crate) String);

impl std::error::Error for AvroError {}

impl fmt::Display for AvroError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, AvroError>;

/// At most this many map entries are reserved up front; larger maps grow as
/// they are read, so the allocation always follows the bytes really present.
pub(crate) const MAX_RESERVE: usize = 256;

/// A cursor over one Avro binary datum.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads `buf` from its first byte.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes read so far.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// The bytes read since position `start`.
    pub(crate) fn since(&self, start: usize) -> &'a [u8] {
        &self.buf[start..self.pos]
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// A zig-zag varint `long`.
    pub(crate) fn long(&mut self, field: &str) -> Result<i64> {
        let mut z: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(AvroError(format!("{field}: datum ends inside a long")));
            };
            self.pos += 1;
            // The tenth byte may only carry the 64th bit.
            if i == 9 && b > 1 {
                return Err(AvroError(format!("{field}: long overflows 64 bits")));
            }
            z |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
        }
        Err(AvroError(format!("{field}: long overflows 64 bits")))
    }

    /// The next `n` bytes (an error if fewer are left).
    pub(crate) fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(AvroError(format!(
                "{field}: needs {n} bytes, only {} left",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// An 8-byte little-endian `double`.
    pub(crate) fn double(&mut self, field: &str) -> Result<f64> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(f64::from_le_bytes(a))
    }

    /// A one-byte `boolean` (0 or 1).
    pub(crate) fn boolean(&mut self, field: &str) -> Result<bool> {
        match self.take(1, field)? {
            [0] => Ok(false),
            [1] => Ok(true),
            [b] => Err(AvroError(format!("{field}: invalid boolean byte {b:#04x}"))),
            _ => Err(AvroError(format!("{field}: datum ends inside a boolean"))),
        }
    }

    /// A length-prefixed UTF-8 `string`.
    pub(crate) fn string(&mut self, field: &str) -> Result<String> {
        let b = self.bytes(field)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(AvroError(format!("{field}: string is not valid UTF-8"))),
        }
    }

    /// A length-prefixed `bytes`, borrowed from the datum (the length is
    /// checked against the bytes left before anything is allocated).
    pub(crate) fn bytes(&mut self, field: &str) -> Result<&'a [u8]> {
        let len = self.long(field)?;
        let len = usize::try_from(len)
            .map_err(|_| AvroError(format!("{field}: negative length {len}")))?;
        self.take(len, field)
    }

    /// A union branch index, checked against the number of branches.
    pub(crate) fn union(&mut self, field: &str, branches: usize) -> Result<usize> {
        let i = self.long(field)?;
        match usize::try_from(i) {
            Ok(i) if i < branches => Ok(i),
            _ => Err(AvroError(format!(
                "{field}: union index {i} out of range 0..{branches}"
            ))),
        }
    }

    fn opt_string(&mut self, field: &str) -> Result<Option<String>> {
        match self.union(field, 2)? {
            0 => Ok(None),
            _ => self.string(field).map(Some),
        }
    }

    fn opt_double(&mut self, field: &str) -> Result<Option<f64>> {
        match self.union(field, 2)? {
            0 => Ok(None),
            _ => self.double(field).map(Some),
        }
    }

    /// A map: blocks of `count` entries ending with a zero count; a negative
    /// count is followed by the block's byte size (ignored, we read every entry).
    fn map<T>(
        &mut self,
        field: &str,
        mut value: impl FnMut(&mut Self, &str) -> Result<T>,
    ) -> Result<Vec<(String, T)>> {
        let mut out = Vec::new();
        loop {
            // Each entry takes at least two bytes (key length, value), so a
            // count beyond that is a lie whatever the value type.
            let count = self.block(field, 2)?;
            if count == 0 {
                return Ok(out);
            }
            out.reserve(count.min(MAX_RESERVE));
            for _ in 0..count {
                let key = self.string(field)?;
                let v =
                    value(self, &key).map_err(|e| AvroError(format!("{e} (map key {key:?})")))?;
                out.push((key, v));
            }
        }
    }

    /// The item count of the next block of an array or map (0 ends it); a
    /// negative count is followed by the block's byte size (read, ignored:
    /// every item is read). A count of items of at least `min_item` bytes
    /// each that cannot fit in the bytes left is an error (`min_item` 0
    /// checks nothing: the caller caps zero-byte items itself).
    pub(crate) fn block(&mut self, field: &str, min_item: usize) -> Result<usize> {
        let count = self.long(field)?;
        if count < 0 {
            self.long(field)?;
        }
        let count = count.unsigned_abs();
        if min_item > 0 && count > (self.remaining() / min_item) as u64 {
            return Err(AvroError(format!(
                "{field}: block of {count} items in {} bytes",
                self.remaining()
            )));
        }
        usize::try_from(count).map_err(|_| AvroError(format!("{field}: block of {count} items")))
    }

    /// Fails unless the whole buffer was consumed.
    pub(crate) fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(AvroError(format!("{n} trailing bytes after the datum"))),
        }
    }
}

/// Reads one `PredictionEvent` datum, the whole of `buf`.
pub(crate) fn read_prediction(buf: &[u8]) -> Result<PredictionEvent> {
    let mut r = Reader::new(buf);
    let request_id = r.string("request_id")?;
    let model_id = r.string("model_id")?;
    let model_version = r.string("model_version")?;
    let timestamp = r.long("timestamp")?;
    let features = r.map("features", |r, _| {
        Ok(match r.union("features", 5)? {
            0 => FeatureValue::Null,
            1 => FeatureValue::Bool(r.boolean("features")?),
            2 => FeatureValue::Long(r.long("features")?),
            3 => FeatureValue::Double(r.double("features")?),
            _ => FeatureValue::String(r.string("features")?),
        })
    })?;
    let predicted_label = r.opt_string("predicted_label")?;
    let predicted_value = r.opt_double("predicted_value")?;
    let score = r.opt_double("score")?;
    let class_probabilities = match r.union("class_probabilities", 2)? {
        0 => None,
        _ => Some(Entries(r.map("class_probabilities", |r, _| {
            r.double("class_probabilities")
        })?)),
    };
    let segments = Entries(r.map("segments", |r, _| r.string("segments"))?);
    let latency_ms = r.opt_double("latency_ms")?;
    r.finish()?;
    Ok(PredictionEvent {
        request_id,
        model_id,
        model_version,
        timestamp,
        features: Entries(features),
        predicted_label,
        predicted_value,
        score,
        class_probabilities,
        segments,
        latency_ms,
    })
}

/// Reads one `GroundTruthEvent` datum, the whole of `buf`.
pub(crate) fn read_ground_truth(buf: &[u8]) -> Result<GroundTruthEvent> {
    let mut r = Reader::new(buf);
    let ev = GroundTruthEvent {
        request_id: r.string("request_id")?,
        timestamp: r.long("timestamp")?,
        actual_label: r.opt_string("actual_label")?,
        actual_value: r.opt_double("actual_value")?,
    };
    r.finish()?;
    Ok(ev)
}

/// Reads one `AlertEvent` datum, the whole of `buf`.
pub(crate) fn read_alert(buf: &[u8]) -> Result<AlertEvent> {
    let mut r = Reader::new(buf);
    let alert_id = r.string("alert_id")?;
    let rule = r.string("rule")?;
    let status = match r.long("status")? {
        0 => AlertStatus::Firing,
        1 => AlertStatus::Resolved,
        i => {
            return Err(AvroError(format!(
                "status: enum index {i} out of range 0..2"
            )))
        }
    };
    let severity = match r.string("severity")?.as_str() {
        "warning" => Severity::Warning,
        "critical" => Severity::Critical,
        other => {
            return Err(AvroError(format!(
                "severity: unknown value {other:?} (expected warning|critical)"
            )))
        }
    };
    let ev = AlertEvent {
        alert_id,
        rule,
        status,
        severity,
        model_id: r.string("model_id")?,
        model_version: r.string("model_version")?,
        segment: r.string("segment")?,
        feature: r.opt_string("feature")?,
        metric: r.string("metric")?,
        value: r.double("value")?,
        threshold: r.double("threshold")?,
        baseline: r.opt_double("baseline")?,
        p_value: r.opt_double("p_value")?,
        window_start: r.long("window_start")?,
        window_end: r.long("window_end")?,
        fired_at: r.long("fired_at")?,
        message: r.string("message")?,
    };
    r.finish()?;
    Ok(ev)
}

/// Appends Avro binary encodings to a buffer.
pub(crate) struct Writer<'a>(pub(crate) &'a mut Vec<u8>);

impl Writer<'_> {
    fn long(&mut self, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z > 0x7f {
            self.0.push((z & 0x7f) as u8 | 0x80);
            z >>= 7;
        }
        self.0.push(z as u8);
    }

    fn double(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn string(&mut self, s: &str) {
        self.long(s.len() as i64);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn opt_string(&mut self, v: Option<&str>) {
        match v {
            None => self.long(0),
            Some(s) => {
                self.long(1);
                self.string(s);
            }
        }
    }

    fn opt_double(&mut self, v: Option<f64>) {
        match v {
            None => self.long(0),
            Some(d) => {
                self.long(1);
                self.double(d);
            }
        }
    }

    /// One block with every entry, then the terminating zero (none for an empty map).
    fn map<V>(&mut self, entries: &[(String, V)], mut value: impl FnMut(&mut Self, &V)) {
        if !entries.is_empty() {
            self.long(entries.len() as i64);
            for (k, v) in entries {
                self.string(k);
                value(self, v);
            }
        }
        self.long(0);
    }
}

/// Appends the `PredictionEvent` datum of `p` to `out`.
pub(crate) fn write_prediction(p: &PredictionEvent, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    w.string(&p.request_id);
    w.string(&p.model_id);
    w.string(&p.model_version);
    w.long(p.timestamp);
    w.map(&p.features.0, |w, v| match v {
        FeatureValue::Null => w.long(0),
        FeatureValue::Bool(b) => {
            w.long(1);
            w.0.push(u8::from(*b));
        }
        FeatureValue::Long(x) => {
            w.long(2);
            w.long(*x);
        }
        FeatureValue::Double(x) => {
            w.long(3);
            w.double(*x);
        }
        FeatureValue::String(s) => {
            w.long(4);
            w.string(s);
        }
    });
    w.opt_string(p.predicted_label.as_deref());
    w.opt_double(p.predicted_value);
    w.opt_double(p.score);
    match &p.class_probabilities {
        None => w.long(0),
        Some(m) => {
            w.long(1);
            w.map(&m.0, |w, v| w.double(*v));
        }
    }
    w.map(&p.segments.0, |w, v| w.string(v));
    w.opt_double(p.latency_ms);
}

/// Appends the `GroundTruthEvent` datum of `g` to `out`.
pub(crate) fn write_ground_truth(g: &GroundTruthEvent, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    w.string(&g.request_id);
    w.long(g.timestamp);
    w.opt_string(g.actual_label.as_deref());
    w.opt_double(g.actual_value);
}

/// Appends the `AlertEvent` datum of `a` to `out`.
pub(crate) fn write_alert(a: &AlertEvent, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    w.string(&a.alert_id);
    w.string(&a.rule);
    w.long(match a.status {
        AlertStatus::Firing => 0,
        AlertStatus::Resolved => 1,
    });
    w.string(a.severity.as_str());
    w.string(&a.model_id);
    w.string(&a.model_version);
    w.string(&a.segment);
    w.opt_string(a.feature.as_deref());
    w.string(&a.metric);
    w.double(a.value);
    w.double(a.threshold);
    w.opt_double(a.baseline);
    w.opt_double(a.p_value);
    w.long(a.window_start);
    w.long(a.window_end);
    w.long(a.fired_at);
    w.string(&a.message);
}

/// The Avro Parsing Canonical Form of a schema given as JSON (Avro
/// specification, "Parsing Canonical Form for Schemas"): primitives in simple
/// form, full names, only `name`, `type`, `fields`, `symbols`, `items`,
/// `values`, `size`, in that order, no whitespace.
///
/// Written here because apache-avro 0.21 keeps a logical type's primitive as
/// `{"type":"long"}` instead of `"long"`, which changes the fingerprint from
/// the one Java and fastavro compute for the same schema.
pub(crate) fn canonical_form(schema: &serde_json::Value) -> Result<String> {
    let mut out = String::with_capacity(512);
    pcf(schema, "", &mut out)?;
    Ok(out)
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

fn full_name(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}.{name}")
    }
}

fn push_str(out: &mut String, s: &str) {
    // serde_json escapes only what JSON requires and writes the rest as UTF-8,
    // which is the [STRINGS] rule.
    out.push_str(&serde_json::Value::from(s).to_string());
}

fn pcf(v: &serde_json::Value, ns: &str, out: &mut String) -> Result<()> {
    use serde_json::Value as J;
    match v {
        J::String(s) if PRIMITIVES.contains(&s.as_str()) => push_str(out, s),
        J::String(s) => push_str(out, &full_name(s, ns)),
        J::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                pcf(b, ns, out)?;
            }
            out.push(']');
        }
        J::Object(m) => {
            let ty = match m.get("type") {
                Some(J::String(t)) => t.as_str(),
                Some(nested) => return pcf(nested, ns, out),
                None => return Err(AvroError("schema object without a type".into())),
            };
            let named = || -> Result<(String, String)> {
                let name = m
                    .get("name")
                    .and_then(J::as_str)
                    .ok_or_else(|| AvroError(format!("{ty} without a name")))?;
                let own_ns = m.get("namespace").and_then(J::as_str).unwrap_or(ns);
                let full = full_name(name, own_ns);
                let inner_ns = full.rsplit_once('.').map_or("", |(n, _)| n).to_owned();
                Ok((full, inner_ns))
            };
            match ty {
                t if PRIMITIVES.contains(&t) => push_str(out, t),
                "record" | "error" => {
                    let (full, inner_ns) = named()?;
                    out.push_str("{\"name\":");
                    push_str(out, &full);
                    out.push_str(",\"type\":\"record\",\"fields\":[");
                    let fields = m
                        .get("fields")
                        .and_then(J::as_array)
                        .ok_or_else(|| AvroError(format!("record {full} without fields")))?;
                    for (i, f) in fields.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let (Some(name), Some(t)) =
                            (f.get("name").and_then(J::as_str), f.get("type"))
                        else {
                            return Err(AvroError(format!(
                                "record {full}: field without name or type"
                            )));
                        };
                        out.push_str("{\"name\":");
                        push_str(out, name);
                        out.push_str(",\"type\":");
                        pcf(t, &inner_ns, out)?;
                        out.push('}');
                    }
                    out.push_str("]}");
                }
                "enum" => {
                    let (full, _) = named()?;
                    out.push_str("{\"name\":");
                    push_str(out, &full);
                    out.push_str(",\"type\":\"enum\",\"symbols\":[");
                    let symbols = m
                        .get("symbols")
                        .and_then(J::as_array)
                        .ok_or_else(|| AvroError(format!("enum {full} without symbols")))?;
                    for (i, s) in symbols.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        push_str(out, s.as_str().unwrap_or_default());
                    }
                    out.push_str("]}");
                }
                "fixed" => {
                    let (full, _) = named()?;
                    let size = m
                        .get("size")
                        .and_then(J::as_u64)
                        .ok_or_else(|| AvroError(format!("fixed {full} without a size")))?;
                    out.push_str("{\"name\":");
                    push_str(out, &full);
                    out.push_str(&format!(",\"type\":\"fixed\",\"size\":{size}}}"));
                }
                "array" | "map" => {
                    let key = if ty == "array" { "items" } else { "values" };
                    let inner = m
                        .get(key)
                        .ok_or_else(|| AvroError(format!("{ty} without {key}")))?;
                    out.push_str(&format!("{{\"type\":\"{ty}\",\"{key}\":"));
                    pcf(inner, ns, out)?;
                    out.push('}');
                }
                // A reference to a named type written as {"type": "Name"}.
                other => push_str(out, &full_name(other, ns)),
            }
        }
        other => return Err(AvroError(format!("not a schema: {other}"))),
    }
    Ok(())
}

/// CRC-64-AVRO (the Rabin fingerprint of the Avro specification), as the 8
/// little-endian bytes the single-object header carries.
pub(crate) fn rabin_fingerprint(data: &[u8]) -> [u8; 8] {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: std::sync::LazyLock<[u64; 256]> = std::sync::LazyLock::new(|| {
        let mut t = [0u64; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
            }
            *slot = fp;
        }
        t
    });
    let mut fp = EMPTY;
    for &b in data {
        fp = (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp.to_le_bytes()
}

/// The reader and writer without framing or validation, for the fuzz targets
/// in `fuzz/` (feature `fuzzing`); not part of the API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use crate::model::{AlertEvent, GroundTruthEvent, PredictionEvent};

    /// [`super::read_prediction`]; the error is its text.
    pub fn read_prediction(buf: &[u8]) -> Result<PredictionEvent, String> {
        super::read_prediction(buf).map_err(|e| e.0)
    }

    /// [`super::read_ground_truth`]; the error is its text.
    pub fn read_ground_truth(buf: &[u8]) -> Result<GroundTruthEvent, String> {
        super::read_ground_truth(buf).map_err(|e| e.0)
    }

    /// [`super::read_alert`]; the error is its text.
    pub fn read_alert(buf: &[u8]) -> Result<AlertEvent, String> {
        super::read_alert(buf).map_err(|e| e.0)
    }

    /// [`super::write_prediction`] into a new buffer.
    pub fn write_prediction(p: &PredictionEvent) -> Vec<u8> {
        let mut out = Vec::new();
        super::write_prediction(p, &mut out);
        out
    }

    /// [`super::write_ground_truth`] into a new buffer.
    pub fn write_ground_truth(g: &GroundTruthEvent) -> Vec<u8> {
        let mut out = Vec::new();
        super::write_ground_truth(g, &mut out);
        out
    }

    /// [`super::write_alert`] into a new buffer.
    pub fn write_alert(a: &AlertEvent) -> Vec<u8> {
        let mut out = Vec::new();
        super::write_alert(a, &mut out);
        out
    }
}
