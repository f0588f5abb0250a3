//! A bounded reader of an Avro binary datum written with ANY schema, into
//! apache-avro's [`Value`] tree: for writer schemas that are not ours (a
//! producer's own schema fetched from a Schema Registry, see
//! [`super::registry`]). Pure: bytes in, values out.
//!
//! Why not `apache_avro::from_avro_datum`: it reserves capacity from the
//! block count a datum announces (see the module doc of `avro`), so a few
//! bytes can ask for gigabytes. Here every length and block count is checked
//! against the bytes actually left before anything is allocated, at most
//! [`MAX_RESERVE`] items are reserved up front, items of a type that takes no
//! bytes on the wire (null, an empty record, `fixed` of size 0) are capped at
//! [`MAX_ZERO_BYTE_ITEMS`] per datum, nesting (recursive schemas) at
//! [`MAX_DEPTH`], and trailing bytes are an error. The memory a datum can
//! take is thus bounded by a constant times its size. The values are the ones
//! apache-avro's own decoder gives for a valid datum (checked by the tests),
//! logical types included.

use std::borrow::Borrow;
use std::collections::HashMap;

use apache_avro::schema::{
    DecimalSchema, EnumSchema, FixedSchema, Name, Namespace, RecordSchema, ResolvedSchema,
};
use apache_avro::types::Value;
use apache_avro::Schema;

pub use super::avro::AvroError;
use super::avro::{Reader, MAX_RESERVE};

type Result<T> = std::result::Result<T, AvroError>;

/// Deepest nesting of records, arrays, maps, unions and named references in
/// one datum (a recursive schema such as a linked list is read to this depth).
pub const MAX_DEPTH: usize = 64;

/// Most array items or map entries of a type that takes no bytes on the wire
/// (null, an empty record, ...) in one datum: their count is not bounded by
/// the datum's size, so it is bounded here.
pub const MAX_ZERO_BYTE_ITEMS: usize = 65_536;

/// Reads the datum `datum` (the whole slice) written with `schema`.
pub fn read_value(schema: &Schema, datum: &[u8]) -> std::result::Result<Value, AvroError> {
    let resolved = ResolvedSchema::try_from(schema)
        .map_err(|e| AvroError(format!("schema does not resolve: {e}")))?;
    read_value_with(schema, resolved.get_names(), datum)
}

/// [`read_value`] with the named types of `schema` already collected
/// (`ResolvedSchema::get_names`, or an owned copy of it kept with a cached
/// schema).
pub fn read_value_with<S: Borrow<Schema>>(
    schema: &Schema,
    names: &HashMap<Name, S>,
    datum: &[u8],
) -> std::result::Result<Value, AvroError> {
    let mut ctx = Ctx {
        r: Reader::new(datum),
        names,
        zero_items: 0,
    };
    let v = ctx.value(schema, &schema.namespace(), 0)?;
    ctx.r.finish()?;
    Ok(v)
}

/// The value as a JSON tree (records and maps as objects, unions as their
/// branch's value, enums as their symbol, bytes and fixed as arrays of
/// numbers, logical types as their underlying number), through
/// apache-avro's `TryFrom<Value> for serde_json::Value` for every leaf.
/// A float that JSON cannot hold (NaN, infinities) becomes `null`.
pub fn value_to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Union(_, b) => value_to_json(b),
        Value::Array(items) => J::Array(items.iter().map(value_to_json).collect()),
        Value::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
        ),
        Value::Record(fields) => J::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
        ),
        leaf => J::try_from(leaf.clone()).unwrap_or(J::Null),
    }
}

struct Ctx<'a, 'n, S> {
    r: Reader<'a>,
    names: &'n HashMap<Name, S>,
    /// Zero-byte items read so far (bounded by [`MAX_ZERO_BYTE_ITEMS`]).
    zero_items: usize,
}

impl<S: Borrow<Schema>> Ctx<'_, '_, S> {
    /// Fewest bytes a value of `schema` takes (0 for null, an empty record...).
    fn min_bytes(&self, schema: &Schema, ns: &Namespace, depth: usize) -> usize {
        if depth > 8 {
            return 0;
        }
        match schema {
            Schema::Null => 0,
            Schema::Float => 4,
            Schema::Double => 8,
            Schema::Duration => 12,
            Schema::Fixed(FixedSchema { size, .. }) => *size,
            Schema::Decimal(DecimalSchema { inner, .. }) => self.min_bytes(inner, ns, depth + 1),
            Schema::Record(RecordSchema { name, fields, .. }) => {
                let ns = name.fully_qualified_name(ns).namespace;
                fields
                    .iter()
                    .map(|f| self.min_bytes(&f.schema, &ns, depth + 1))
                    .fold(0usize, usize::saturating_add)
            }
            Schema::Ref { name } => match lookup(self.names, name, ns) {
                Ok((s, full)) => self.min_bytes(s, &full.namespace, depth + 1),
                Err(_) => 0,
            },
            // A varint, a length, a union index or a block count: one byte at least.
            _ => 1,
        }
    }

    /// The item count of the next block, bounded by the bytes left and, for
    /// zero-byte items, by [`MAX_ZERO_BYTE_ITEMS`].
    fn block(&mut self, field: &str, min_item: usize) -> Result<usize> {
        let n = self.r.block(field, min_item)?;
        if min_item == 0 {
            self.zero_items = self.zero_items.saturating_add(n);
            if self.zero_items > MAX_ZERO_BYTE_ITEMS {
                return Err(AvroError(format!(
                    "{field}: more than {MAX_ZERO_BYTE_ITEMS} items that take no bytes"
                )));
            }
        }
        Ok(n)
    }

    fn value(&mut self, schema: &Schema, ns: &Namespace, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(AvroError(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let r = &mut self.r;
        Ok(match schema {
            Schema::Null => Value::Null,
            Schema::Boolean => Value::Boolean(r.boolean("boolean")?),
            Schema::Int => Value::Int(int(r, "int")?),
            Schema::Long => Value::Long(r.long("long")?),
            Schema::Float => Value::Float(f32::from_le_bytes(array(r.take(4, "float")?))),
            Schema::Double => Value::Double(r.double("double")?),
            Schema::Bytes => Value::Bytes(r.bytes("bytes")?.to_vec()),
            Schema::String => Value::String(r.string("string")?),
            Schema::Fixed(FixedSchema { size, .. }) => {
                Value::Fixed(*size, r.take(*size, "fixed")?.to_vec())
            }
            Schema::Date => Value::Date(int(r, "date")?),
            Schema::TimeMillis => Value::TimeMillis(int(r, "time-millis")?),
            Schema::TimeMicros => Value::TimeMicros(r.long("time-micros")?),
            Schema::TimestampMillis => Value::TimestampMillis(r.long("timestamp-millis")?),
            Schema::TimestampMicros => Value::TimestampMicros(r.long("timestamp-micros")?),
            Schema::TimestampNanos => Value::TimestampNanos(r.long("timestamp-nanos")?),
            Schema::LocalTimestampMillis => {
                Value::LocalTimestampMillis(r.long("local-timestamp-millis")?)
            }
            Schema::LocalTimestampMicros => {
                Value::LocalTimestampMicros(r.long("local-timestamp-micros")?)
            }
            Schema::LocalTimestampNanos => {
                Value::LocalTimestampNanos(r.long("local-timestamp-nanos")?)
            }
            Schema::Duration => {
                Value::Duration(apache_avro::Duration::from(array(r.take(12, "duration")?)))
            }
            Schema::Decimal(DecimalSchema { inner, .. }) => {
                let bytes = match &**inner {
                    Schema::Fixed(FixedSchema { size, .. }) => r.take(*size, "decimal")?,
                    _ => r.bytes("decimal")?,
                };
                Value::Decimal(apache_avro::Decimal::from(bytes))
            }
            // Leaf logical types whose conversion is apache-avro's own: the
            // bytes are bounded here, then its decoder reads just them.
            Schema::Uuid | Schema::BigDecimal => {
                let start = r.pos();
                let inner = r.bytes("uuid/big-decimal")?;
                if matches!(schema, Schema::BigDecimal) {
                    // Its digits' length, checked here: apache-avro allocates
                    // it (up to 512 MiB) before reading (found by fuzzing).
                    Reader::new(inner).bytes("big-decimal digits")?;
                }
                let mut slice = r.since(start);
                apache_avro::from_avro_datum(schema, &mut slice, None)
                    .map_err(|e| AvroError(format!("{}: {e}", kind_name(schema))))?
            }
            Schema::Enum(EnumSchema { symbols, .. }) => {
                let i = r.long("enum")?;
                match usize::try_from(i).ok().and_then(|i| symbols.get(i)) {
                    Some(s) => Value::Enum(i as u32, s.clone()),
                    None => {
                        return Err(AvroError(format!(
                            "enum: index {i} out of range 0..{}",
                            symbols.len()
                        )))
                    }
                }
            }
            Schema::Union(u) => {
                let branches = u.variants();
                let i = r.union("union", branches.len())?;
                let v = self.value(&branches[i], ns, depth + 1)?;
                Value::Union(i as u32, Box::new(v))
            }
            Schema::Array(a) => {
                let min = self.min_bytes(&a.items, ns, 0);
                let mut items = Vec::new();
                loop {
                    let n = self.block("array", min)?;
                    if n == 0 {
                        break Value::Array(items);
                    }
                    items.reserve(n.min(MAX_RESERVE));
                    for _ in 0..n {
                        items.push(self.value(&a.items, ns, depth + 1)?);
                    }
                }
            }
            Schema::Map(m) => {
                // A key is a string: one byte at least.
                let min = 1 + self.min_bytes(&m.types, ns, 0);
                let mut items = HashMap::new();
                loop {
                    let n = self.block("map", min)?;
                    if n == 0 {
                        break Value::Map(items);
                    }
                    items.reserve(n.min(MAX_RESERVE));
                    for _ in 0..n {
                        let k = self.r.string("map key")?;
                        let v = self.value(&m.types, ns, depth + 1)?;
                        items.insert(k, v);
                    }
                }
            }
            Schema::Record(RecordSchema { name, fields, .. }) => {
                let inner_ns = name.fully_qualified_name(ns).namespace;
                let mut items = Vec::with_capacity(fields.len());
                for f in fields {
                    let v = self
                        .value(&f.schema, &inner_ns, depth + 1)
                        .map_err(|e| AvroError(format!("{}: {e}", f.name)))?;
                    items.push((f.name.clone(), v));
                }
                Value::Record(items)
            }
            Schema::Ref { name } => {
                let (s, full) = lookup(self.names, name, ns)?;
                return self.value(s, &full.namespace, depth + 1);
            }
        })
    }
}

/// The schema a named reference stands for, and its full name.
fn lookup<'n, S: Borrow<Schema>>(
    names: &'n HashMap<Name, S>,
    name: &Name,
    ns: &Namespace,
) -> Result<(&'n Schema, Name)> {
    let full = name.fully_qualified_name(ns);
    match names.get(&full) {
        Some(s) => Ok((s.borrow(), full)),
        None => Err(AvroError(format!(
            "unknown named type {}",
            full.fullname(None)
        ))),
    }
}

fn kind_name(schema: &Schema) -> &'static str {
    match schema {
        Schema::Uuid => "uuid",
        _ => "big-decimal",
    }
}

/// An `int`: a `long` in the 32-bit range.
fn int(r: &mut Reader<'_>, field: &str) -> Result<i32> {
    let v = r.long(field)?;
    i32::try_from(v).map_err(|_| AvroError(format!("{field}: {v} overflows an int")))
}

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(b);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Schemas covering every kind the reader handles, a recursive one
    /// included.
    const SCHEMAS: &[&str] = &[
        r#"{"type":"record","name":"All","namespace":"t","fields":[
            {"name":"n","type":"null"},
            {"name":"b","type":"boolean"},
            {"name":"i","type":"int"},
            {"name":"l","type":"long"},
            {"name":"f","type":"float"},
            {"name":"d","type":"double"},
            {"name":"by","type":"bytes"},
            {"name":"s","type":"string"},
            {"name":"fx","type":{"type":"fixed","name":"F4","size":4}},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["A","B","C"]}},
            {"name":"a","type":{"type":"array","items":["null","long","string"]}},
            {"name":"m","type":{"type":"map","values":{"type":"record","name":"Inner","fields":[{"name":"x","type":"double"},{"name":"e2","type":"E"}]}}},
            {"name":"u","type":["null","F4","Inner",{"type":"array","items":"int"}]},
            {"name":"nulls","type":{"type":"array","items":"null"}},
            {"name":"date","type":{"type":"int","logicalType":"date"}},
            {"name":"tm","type":{"type":"int","logicalType":"time-millis"}},
            {"name":"tu","type":{"type":"long","logicalType":"time-micros"}},
            {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"tsu","type":{"type":"long","logicalType":"timestamp-micros"}},
            {"name":"lts","type":{"type":"long","logicalType":"local-timestamp-millis"}},
            {"name":"dec","type":{"type":"bytes","logicalType":"decimal","precision":10,"scale":2}},
            {"name":"decf","type":{"type":"fixed","name":"D8","size":8,"logicalType":"decimal","precision":18,"scale":3}},
            {"name":"uuid","type":{"type":"string","logicalType":"uuid"}},
            {"name":"dur","type":{"type":"fixed","name":"Dur","size":12,"logicalType":"duration"}}
        ]}"#,
        r#"{"type":"record","name":"Node","fields":[
            {"name":"v","type":"long"},
            {"name":"next","type":["null","Node"]}
        ]}"#,
        r#"{"type":"map","values":["null","boolean","long","double","string"]}"#,
        r#"{"type":"array","items":{"type":"record","name":"Empty","fields":[]}}"#,
    ];

    fn names(schema: &Schema) -> HashMap<Name, Schema> {
        ResolvedSchema::try_from(schema)
            .unwrap()
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect()
    }

    fn string(rng: &mut StdRng) -> String {
        let n = rng.gen_range(0..6);
        (0..n)
            .map(|_| ['a', 'é', 'z', '€', '0'][rng.gen_range(0..5)])
            .collect()
    }

    /// A random valid value of `schema`.
    fn gen(
        schema: &Schema,
        names: &HashMap<Name, Schema>,
        ns: &Namespace,
        rng: &mut StdRng,
        depth: usize,
    ) -> Value {
        let n = |rng: &mut StdRng| rng.gen_range(0..if depth > 3 { 1 } else { 4 });
        match schema {
            Schema::Null => Value::Null,
            Schema::Boolean => Value::Boolean(rng.gen()),
            Schema::Int => Value::Int(rng.gen()),
            Schema::Long => Value::Long(rng.gen::<i64>() >> rng.gen_range(0..64)),
            Schema::Float => Value::Float(rng.gen_range(-1e6f32..1e6)),
            Schema::Double => Value::Double(rng.gen_range(-1e12..1e12)),
            Schema::Bytes => Value::Bytes(string(rng).into_bytes()),
            Schema::String => Value::String(string(rng)),
            Schema::Fixed(f) => Value::Fixed(f.size, (0..f.size).map(|_| rng.gen()).collect()),
            Schema::Enum(e) => {
                let i = rng.gen_range(0..e.symbols.len());
                Value::Enum(i as u32, e.symbols[i].clone())
            }
            Schema::Array(a) => Value::Array(
                (0..n(rng))
                    .map(|_| gen(&a.items, names, ns, rng, depth + 1))
                    .collect(),
            ),
            Schema::Map(m) => Value::Map(
                (0..n(rng))
                    .map(|_| (string(rng), gen(&m.types, names, ns, rng, depth + 1)))
                    .collect(),
            ),
            Schema::Union(u) => {
                // Deep down, the first branch (null) ends recursion.
                let i = if depth > 3 {
                    0
                } else {
                    rng.gen_range(0..u.variants().len())
                };
                let v = gen(&u.variants()[i], names, ns, rng, depth + 1);
                Value::Union(i as u32, Box::new(v))
            }
            Schema::Record(r) => {
                let ns = r.name.fully_qualified_name(ns).namespace;
                Value::Record(
                    r.fields
                        .iter()
                        .map(|f| (f.name.clone(), gen(&f.schema, names, &ns, rng, depth + 1)))
                        .collect(),
                )
            }
            Schema::Ref { name } => {
                let full = name.fully_qualified_name(ns);
                gen(&names[&full], names, &full.namespace, rng, depth + 1)
            }
            Schema::Date => Value::Date(rng.gen()),
            Schema::TimeMillis => Value::TimeMillis(rng.gen()),
            Schema::TimeMicros => Value::TimeMicros(rng.gen()),
            Schema::TimestampMillis => Value::TimestampMillis(rng.gen()),
            Schema::TimestampMicros => Value::TimestampMicros(rng.gen()),
            Schema::LocalTimestampMillis => Value::LocalTimestampMillis(rng.gen()),
            Schema::Decimal(d) => {
                let len = match &*d.inner {
                    Schema::Fixed(f) => f.size,
                    _ => rng.gen_range(1..6),
                };
                Value::Decimal(apache_avro::Decimal::from(
                    (0..len).map(|_| rng.gen()).collect::<Vec<u8>>(),
                ))
            }
            Schema::Uuid => Value::Uuid(apache_avro::Uuid::from_bytes(rng.gen())),
            Schema::Duration => {
                let b: [u8; 12] = rng.gen();
                Value::Duration(apache_avro::Duration::from(b))
            }
            other => panic!("no generator for {other:?}"),
        }
    }

    fn parsed() -> Vec<(Schema, HashMap<Name, Schema>)> {
        SCHEMAS
            .iter()
            .map(|t| {
                let s = Schema::parse_str(t).unwrap();
                let n = names(&s);
                (s, n)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn agrees_with_apache_avro_on_valid_datums(seed in any::<u64>(), which in 0..SCHEMAS.len()) {
            let (schema, names) = &parsed()[which];
            let mut rng = StdRng::seed_from_u64(seed);
            let v = gen(schema, names, &schema.namespace(), &mut rng, 0);
            let datum = apache_avro::to_avro_datum(schema, v.clone()).unwrap();
            let theirs = apache_avro::from_avro_datum(schema, &mut &datum[..], None).unwrap();
            let ours = read_value(schema, &datum).unwrap();
            prop_assert_eq!(&ours, &theirs);
            prop_assert_eq!(read_value_with(schema, names, &datum).unwrap(), theirs);
            // Every strict prefix is an error, never a panic.
            for cut in 0..datum.len() {
                prop_assert!(read_value(schema, &datum[..cut]).is_err());
            }
            let mut longer = datum.clone();
            longer.push(0);
            prop_assert!(read_value(schema, &longer).is_err());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), which in 0..SCHEMAS.len()) {
            let (schema, names) = &parsed()[which];
            let _ = read_value_with(schema, names, &bytes);
        }

        #[test]
        fn mutated_valid_datums_never_panic(seed in any::<u64>(), which in 0..SCHEMAS.len(), at in any::<usize>(), byte in any::<u8>()) {
            let (schema, names) = &parsed()[which];
            let mut rng = StdRng::seed_from_u64(seed);
            let v = gen(schema, names, &schema.namespace(), &mut rng, 0);
            let mut datum = apache_avro::to_avro_datum(schema, v).unwrap();
            if !datum.is_empty() {
                let i = at % datum.len();
                datum[i] = byte;
            }
            let _ = read_value_with(schema, names, &datum);
        }
    }

    #[test]
    fn huge_counts_fail_fast_without_allocating() {
        // 2^40 longs announced in 6 bytes.
        let s = Schema::parse_str(r#"{"type":"array","items":"long"}"#).unwrap();
        let e = read_value(&s, &[0x80, 0x80, 0x80, 0x80, 0x80, 0x40]).unwrap_err();
        assert!(e.0.contains("block of"), "{e}");
        // Nulls take no bytes: capped per datum, not by the datum's size.
        let s = Schema::parse_str(r#"{"type":"array","items":"null"}"#).unwrap();
        let e = read_value(&s, &[0x80, 0x80, 0x80, 0x80, 0x80, 0x40, 0x00]).unwrap_err();
        assert!(e.0.contains("take no bytes"), "{e}");
        let ok = read_value(&s, &[0x06, 0x00]).unwrap();
        assert_eq!(ok, Value::Array(vec![Value::Null; 3]));
        // Empty records too.
        let s = Schema::parse_str(SCHEMAS[3]).unwrap();
        let mut b = Vec::new();
        for _ in 0..3 {
            b.extend_from_slice(&[0xfe, 0xff, 0x07]); // 65535 items
        }
        b.push(0);
        assert!(read_value(&s, &b).unwrap_err().0.contains("take no bytes"));
        // A string announcing 2^62 bytes.
        let e = read_value(
            &Schema::String,
            &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
        )
        .unwrap_err();
        assert!(e.0.contains("needs"), "{e}");
    }

    #[test]
    fn big_decimal_digits_are_bounded_by_the_value() {
        let s = Schema::BigDecimal;
        // 2^28 digit bytes announced inside a 6-byte value: refused before
        // apache-avro would allocate them.
        let e = read_value(&s, &[12, 0x80, 0x80, 0x80, 0x80, 0x02, 0x00]).unwrap_err();
        assert!(
            e.0.contains("big-decimal digits: needs 268435456 bytes, only 1 left"),
            "{e}"
        );
        // 1.23: length 1, unscaled 123, scale 2; as apache-avro reads it.
        let datum = [6, 2, 123, 4];
        let theirs = apache_avro::from_avro_datum(&s, &mut &datum[..], None).unwrap();
        assert_eq!(read_value(&s, &datum).unwrap(), theirs);
    }

    #[test]
    fn recursion_is_bounded() {
        let s = Schema::parse_str(SCHEMAS[1]).unwrap();
        // v=0, next = branch 1 (Node), 100 levels deep, then null.
        let mut b = Vec::new();
        for _ in 0..100 {
            b.extend_from_slice(&[0x00, 0x02]);
        }
        b.extend_from_slice(&[0x00, 0x00]);
        let e = read_value(&s, &b).unwrap_err();
        assert!(e.0.contains("nested deeper than 64"), "{e}");
        // 20 levels are fine.
        let mut b = Vec::new();
        for _ in 0..20 {
            b.extend_from_slice(&[0x02, 0x02]);
        }
        b.extend_from_slice(&[0x02, 0x00]);
        assert!(read_value(&s, &b).is_ok());
    }

    #[test]
    fn value_to_json_maps_records_unions_and_logical_types() {
        let v = Value::Record(vec![
            ("a".into(), Value::Union(1, Box::new(Value::Long(7)))),
            ("b".into(), Value::Enum(1, "B".into())),
            ("c".into(), Value::TimestampMillis(1_700_000_000_000)),
            ("d".into(), Value::Double(f64::NAN)),
            (
                "m".into(),
                Value::Map([("k".to_string(), Value::String("v".into()))].into()),
            ),
            (
                "arr".into(),
                Value::Array(vec![Value::Null, Value::Boolean(true)]),
            ),
        ]);
        assert_eq!(
            value_to_json(&v),
            serde_json::json!({"a": 7, "b": "B", "c": 1_700_000_000_000i64, "d": null,
                "m": {"k": "v"}, "arr": [null, true]})
        );
    }
}
