//! Serialisation helpers of the metrics state (see
//! [`Aggregator::snapshot`](super::aggregator::Aggregator::snapshot)): the
//! error of a failed restore and the `#[serde(with = ...)]` codecs the
//! accumulators share.
//!
//! - `hdr`: an HdrHistogram through its own V2 encoding (bounds,
//!   significant digits and counts exact), plus its auto-resize flag.
//! - `counts` / `sums`: count and sum vectors with runs of zeros
//!   shortened (most cells of a small window are empty); values are
//!   written unchanged, so `f64` sums round-trip bit for bit.
//! - `sorted_map`: hash maps written in key order, so equal states encode
//!   to equal bytes whatever the maps' iteration order.
//!
//! Pure: no I/O, no clock.

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most entries a decoded count or sum vector may have (a corrupt run
/// length must not allocate gigabytes).
const MAX_DECODED_LEN: u64 = 1 << 26;

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The bytes are not a MessagePack snapshot of this layout.
    #[error("metrics snapshot cannot be decoded: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// The snapshot was written by another, incompatible snapshot format.
    #[error(
        "metrics snapshot format {found} is not supported (this build reads format {expected})"
    )]
    Format {
        /// Format of the snapshot.
        found: u32,
        /// The format this build writes and reads.
        expected: u32,
    },
    /// The snapshot decodes but refers to things it does not hold.
    #[error("metrics snapshot is inconsistent: {0}")]
    Invalid(String),
}

/// Writes a hash map as a map in ascending key order (deserialise it with
/// the map's own `Deserialize`).
pub(crate) fn sorted_map<'a, M, K, V, S>(map: &'a M, s: S) -> Result<S::Ok, S::Error>
where
    &'a M: IntoIterator<Item = (&'a K, &'a V)>,
    K: Ord + Serialize + 'a,
    V: Serialize + 'a,
    S: Serializer,
{
    let mut entries: Vec<(&K, &V)> = map.into_iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    s.collect_map(entries)
}

/// `#[serde(with = "hdr")]` for `hdrhistogram::Histogram<u64>`: the V2
/// encoding (lowest / highest trackable value, significant digits, counts)
/// as MessagePack bytes, with the auto-resize flag the encoding lacks.
pub(crate) mod hdr {
    use hdrhistogram::serialization::V2Serializer;
    use hdrhistogram::serialization::{Deserializer as HdrDeserializer, Serializer as _};
    use hdrhistogram::Histogram;
    use serde::{de, ser, Deserialize, Deserializer, Serialize, Serializer};

    use super::Bytes;

    /// Writes `(auto_resize, V2 bytes)`.
    pub fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Vec::new();
        V2Serializer::new()
            .serialize(h, &mut buf)
            .map_err(|e| ser::Error::custom(format!("histogram: {e:?}")))?;
        (h.is_auto_resize(), Bytes(buf)).serialize(s)
    }

    /// Reads what [`serialize`] wrote.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let (auto, Bytes(buf)) = <(bool, Bytes)>::deserialize(d)?;
        let mut h: Histogram<u64> = HdrDeserializer::new()
            .deserialize(&mut buf.as_slice())
            .map_err(|e| de::Error::custom(format!("histogram: {e:?}")))?;
        h.auto(auto);
        Ok(h)
    }
}

/// A byte string written as MessagePack `bin` (not an array of integers).
struct Bytes(Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(Bytes(out))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Adds `n` zeros to `out`, refusing a decoded length beyond [`MAX_DECODED_LEN`].
fn push_zeros<T: Clone, E: de::Error>(out: &mut Vec<T>, zero: T, n: u64) -> Result<(), E> {
    if out.len() as u64 + n > MAX_DECODED_LEN {
        return Err(E::custom(
            "zero run beyond the longest vector a snapshot holds",
        ));
    }
    out.resize(out.len() + n as usize, zero);
    Ok(())
}

/// `#[serde(with = "counts")]` for `Vec<u64>`: a flat sequence where a
/// non-zero count is itself and a run of `k` zeros is `0, k`.
pub(crate) mod counts {
    use super::*;

    /// Writes the run-length form.
    pub fn serialize<S: Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
        let mut items = Vec::with_capacity(v.len());
        let mut i = 0;
        while i < v.len() {
            if v[i] == 0 {
                let run = v[i..].iter().take_while(|&&c| c == 0).count();
                items.push(0);
                items.push(run as u64);
                i += run;
            } else {
                items.push(v[i]);
                i += 1;
            }
        }
        let mut seq = s.serialize_seq(Some(items.len()))?;
        for x in &items {
            seq.serialize_element(x)?;
        }
        seq.end()
    }

    /// Reads what [`serialize`] wrote.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u64>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("run-length encoded counts")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(x) = seq.next_element::<u64>()? {
                    if x == 0 {
                        let run = seq
                            .next_element::<u64>()?
                            .ok_or_else(|| de::Error::custom("zero run without its length"))?;
                        push_zeros(&mut out, 0, run)?;
                    } else {
                        out.push(x);
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// One item of the [`sums`] encoding: a value, or a run of `+0.0`.
enum SumItem {
    Value(f64),
    Zeros(u64),
}

impl Serialize for SumItem {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            SumItem::Value(v) => s.serialize_f64(v),
            SumItem::Zeros(n) => s.serialize_u64(n),
        }
    }
}

impl<'de> Deserialize<'de> for SumItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SumItem;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a float or a run length")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<SumItem, E> {
                Ok(SumItem::Value(v))
            }
            fn visit_f32<E: de::Error>(self, v: f32) -> Result<SumItem, E> {
                Ok(SumItem::Value(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SumItem, E> {
                Ok(SumItem::Zeros(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SumItem, E> {
                u64::try_from(v)
                    .map(SumItem::Zeros)
                    .map_err(|_| E::custom("negative zero run"))
            }
        }
        d.deserialize_any(V)
    }
}

/// `#[serde(with = "sums")]` for `Vec<f64>`: a flat sequence of floats where
/// a run of `+0.0` is written as its length (an integer). Needs a
/// self-describing format (MessagePack, JSON); `-0.0` and NaN are written
/// as values, bit for bit.
pub(crate) mod sums {
    use super::*;

    /// Writes the run-length form.
    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let zero = |x: &f64| x.to_bits() == 0;
        let mut items = Vec::with_capacity(v.len());
        let mut i = 0;
        while i < v.len() {
            if zero(&v[i]) {
                let run = v[i..].iter().take_while(|x| zero(x)).count();
                items.push(SumItem::Zeros(run as u64));
                i += run;
            } else {
                items.push(SumItem::Value(v[i]));
                i += 1;
            }
        }
        let mut seq = s.serialize_seq(Some(items.len()))?;
        for x in &items {
            seq.serialize_element(x)?;
        }
        seq.end()
    }

    /// Reads what [`serialize`] wrote.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<f64>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("run-length encoded sums")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<f64>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(x) = seq.next_element::<SumItem>()? {
                    match x {
                        SumItem::Value(v) => out.push(v),
                        SumItem::Zeros(n) => push_zeros(&mut out, 0.0, n)?,
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Wrapped {
        #[serde(with = "counts")]
        c: Vec<u64>,
        #[serde(with = "sums")]
        s: Vec<f64>,
    }

    #[test]
    fn zero_runs_round_trip_bit_for_bit() {
        let w = Wrapped {
            c: vec![0, 0, 0, 5, 0, 1, 1, 0, 0, u64::MAX, 0],
            s: vec![
                0.0,
                0.0,
                -0.0,
                1.5,
                f64::NAN,
                0.0,
                f64::INFINITY,
                1e-300,
                0.0,
            ],
        };
        for bytes in [
            rmp_serde::to_vec(&w).unwrap(),
            rmp_serde::to_vec_named(&w).unwrap(),
        ] {
            let back: Wrapped = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(back.c, w.c);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back.s), bits(&w.s));
        }
        let empty = Wrapped {
            c: vec![],
            s: vec![],
        };
        let back: Wrapped = rmp_serde::from_slice(&rmp_serde::to_vec(&empty).unwrap()).unwrap();
        assert_eq!(back, empty);
        // Mostly zeros: a few bytes, not one per entry.
        let sparse = Wrapped {
            c: vec![0; 4000],
            s: vec![0.0; 200],
        };
        assert!(rmp_serde::to_vec(&sparse).unwrap().len() < 16);
    }

    #[test]
    fn a_corrupt_zero_run_is_an_error_not_an_allocation() {
        let bytes = rmp_serde::to_vec(&(vec![0u64, u64::MAX], Vec::<f64>::new())).unwrap();
        assert!(rmp_serde::from_slice::<Wrapped>(&bytes).is_err());
    }

    #[test]
    fn histograms_keep_bounds_precision_counts_and_auto_resize() {
        #[derive(Serialize, Deserialize)]
        struct H(#[serde(with = "hdr")] hdrhistogram::Histogram<u64>);
        let mut h = crate::metrics::accumulator::new_histogram();
        for v in [1u64, 7, 7, 1000, 123_456, 1 << 40] {
            h.record(v).unwrap();
        }
        let back: H = rmp_serde::from_slice(&rmp_serde::to_vec(&H(h.clone())).unwrap()).unwrap();
        let b = back.0;
        assert_eq!(b, h);
        assert_eq!(
            (b.low(), b.high(), b.sigfig(), b.is_auto_resize(), b.len()),
            (h.low(), h.high(), h.sigfig(), h.is_auto_resize(), h.len())
        );
        for q in [0.0, 0.5, 0.95, 0.99, 1.0] {
            assert_eq!(b.value_at_quantile(q), h.value_at_quantile(q));
        }
        let empty = crate::metrics::accumulator::new_histogram();
        let back: H =
            rmp_serde::from_slice(&rmp_serde::to_vec(&H(empty.clone())).unwrap()).unwrap();
        assert_eq!(back.0, empty);
        assert!(back.0.is_auto_resize());
    }
}
