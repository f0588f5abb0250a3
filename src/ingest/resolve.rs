//! Writer schemas from a Schema Registry, by id, and how a datum written
//! with one is read as our event: Avro schema resolution (specification,
//! "Schema Resolution") of the producer's schema against ours. Pure: the
//! schemas are put in the [`SchemaCache`] by the fetching side
//! ([`super::registry`]); the decoder ([`super::decode::Decoder`]) only
//! reads it.
//!
//! Per writer schema and input topic, decided once when the schema enters
//! the cache ([`Plan`]):
//! - the same canonical form as ours: the datum is read by our own fast
//!   reader, as without a registry;
//! - compatible (apache-avro's `SchemaCompatibility::can_read` after the
//!   renames below): each datum is read by the bounded generic reader
//!   ([`super::avro_generic`]) into a value, resolved against our schema
//!   (`Value::resolve`: fields matched by name whatever their order, writer
//!   fields we do not know skipped, our fields missing in the writer filled
//!   by their defaults, int -> long -> float -> double and string <-> bytes
//!   promotions, union branches matched by type), and converted;
//! - incompatible (e.g. a field of ours without a default that the writer
//!   lacks, a type that does not promote): every message written with it is
//!   a dead letter of kind `schema` with the reason.
//!
//! Two renames apply before the check, because apache-avro's resolution
//! does not do them: a writer field whose name is an alias of one of our
//! fields (`"aliases"` on the reader field, Avro specification) takes our
//! name; and the writer's top-level record name is not compared with ours
//! (the topic, not the record's name, says which event it is; Avro would
//! ask for equal names or an alias, and our `.avsc` are public contracts
//! without aliases).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use apache_avro::schema::{Name, RecordSchema, ResolvedSchema};
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

use super::avro;
use super::avro_generic;
use super::decode::{EventKind, SCHEMAS};

/// How datums written with one writer schema are read on one input topic.
#[derive(Debug)]
pub enum Plan {
    /// The writer schema is ours (same canonical form): our reader.
    Ours,
    /// Compatible: the generic reader, then resolution against ours.
    Resolve {
        /// The writer schema, with the renames of the module doc applied.
        writer: Schema,
        /// Its named types, for references.
        names: HashMap<Name, Schema>,
    },
    /// Cannot be read as our event: why.
    Incompatible(String),
}

/// A writer schema fetched from the registry, with its plan per topic.
#[derive(Debug)]
pub struct WriterSchema {
    /// For the predictions topic.
    pub prediction: Plan,
    /// For the ground-truth topic.
    pub ground_truth: Plan,
}

impl WriterSchema {
    /// Parses the schema text the registry returned and decides, for both
    /// topics, how its datums are read. An error for a text that is not an
    /// Avro schema.
    pub fn parse(text: &str) -> Result<WriterSchema, String> {
        let schema =
            Schema::parse_str(text).map_err(|e| format!("not a valid Avro schema: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let canonical = avro::canonical_form(&json).ok();
        Ok(WriterSchema {
            prediction: plan(&schema, canonical.as_deref(), EventKind::Prediction),
            ground_truth: plan(&schema, canonical.as_deref(), EventKind::GroundTruth),
        })
    }

    /// The plan for the topic of `kind`.
    pub fn plan(&self, kind: EventKind) -> &Plan {
        match kind {
            EventKind::Prediction => &self.prediction,
            EventKind::GroundTruth => &self.ground_truth,
        }
    }
}

fn reader(kind: EventKind) -> &'static Schema {
    match kind {
        EventKind::Prediction => &SCHEMAS.prediction,
        EventKind::GroundTruth => &SCHEMAS.ground_truth,
    }
}

fn our_canonical(kind: EventKind) -> &'static str {
    use std::sync::LazyLock;
    static FORMS: LazyLock<[String; 2]> = LazyLock::new(|| {
        let form = |text: &str| {
            let json: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
            avro::canonical_form(&json).unwrap_or_default()
        };
        [
            form(super::decode::PREDICTION_SCHEMA),
            form(super::decode::GROUND_TRUTH_SCHEMA),
        ]
    });
    match kind {
        EventKind::Prediction => &FORMS[0],
        EventKind::GroundTruth => &FORMS[1],
    }
}

fn plan(writer: &Schema, canonical: Option<&str>, kind: EventKind) -> Plan {
    if canonical == Some(our_canonical(kind)) {
        return Plan::Ours;
    }
    plan_against(writer, reader(kind))
}

/// The plan for datums of `writer` read as `reader` (any two schemas; the
/// service uses ours as the reader).
pub fn plan_against(writer: &Schema, reader: &Schema) -> Plan {
    let mut w = writer.clone();
    if let (Schema::Record(ws), Schema::Record(rs)) = (&mut w, reader) {
        // The top-level name: see the module doc.
        ws.name = rs.name.clone();
    }
    rename_aliases(&mut w, reader);
    if let Err(e) = SchemaCompatibility::can_read(&w, reader) {
        return Plan::Incompatible(format!(
            "the writer schema cannot be read as {}: {e}",
            reader.name().map_or_else(String::new, |n| n.fullname(None))
        ));
    }
    let names = match ResolvedSchema::try_from(&w) {
        Ok(rs) => rs
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect(),
        Err(e) => return Plan::Incompatible(format!("the writer schema does not resolve: {e}")),
    };
    Plan::Resolve { writer: w, names }
}

/// Renames writer record fields that carry the name of an alias of a
/// reader field (and no field has the reader's name), in records at the
/// same place in both schemas (nested records, arrays and maps of them).
fn rename_aliases(writer: &mut Schema, reader: &Schema) {
    match (writer, reader) {
        (Schema::Record(w), Schema::Record(r)) => rename_fields(w, r),
        (Schema::Array(w), Schema::Array(r)) => rename_aliases(&mut w.items, &r.items),
        (Schema::Map(w), Schema::Map(r)) => rename_aliases(&mut w.types, &r.types),
        _ => {}
    }
}

fn rename_fields(w: &mut RecordSchema, r: &RecordSchema) {
    for rf in &r.fields {
        if !w.lookup.contains_key(&rf.name) {
            let hit = rf
                .aliases
                .iter()
                .flatten()
                .find_map(|a| w.lookup.get(a).map(|&i| (a.clone(), i)));
            if let Some((alias, i)) = hit {
                w.lookup.remove(&alias);
                w.lookup.insert(rf.name.clone(), i);
                w.fields[i].name = rf.name.clone();
            }
        }
        if let Some(&i) = w.lookup.get(&rf.name) {
            rename_aliases(&mut w.fields[i].schema, &rf.schema);
        }
    }
}

/// Reads the datum `datum` written with `writer` and resolves it against
/// `reader`, into the reader schema's Avro binary encoding (which our own
/// reader then reads). `Err` texts: an invalid datum starts with
/// "invalid datum", a value that does not resolve with "does not resolve".
pub fn resolve_datum(
    writer: &Schema,
    names: &HashMap<Name, Schema>,
    reader: &Schema,
    datum: &[u8],
) -> Result<Vec<u8>, ResolveError> {
    let v = avro_generic::read_value_with(writer, names, datum).map_err(ResolveError::Datum)?;
    let v = v
        .resolve(reader)
        .map_err(|e| ResolveError::Resolve(e.to_string()))?;
    apache_avro::to_avro_datum(reader, v).map_err(|e| ResolveError::Resolve(e.to_string()))
}

/// Why [`resolve_datum`] failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ResolveError {
    /// The datum is not valid for the writer schema.
    Datum(avro::AvroError),
    /// A value of the datum has no counterpart in the reader schema (e.g. a
    /// union branch the reader lacks).
    Resolve(String),
}

/// What the cache holds for one schema id.
pub type Entry = Arc<Result<WriterSchema, String>>;

/// The writer schemas fetched so far, by registry id, and the ids the
/// registry does not know (a permanent answer: their messages are dead
/// letters of kind `schema`). At most `max` ids (`kafka.schema_registry.
/// max_schemas`); inserting beyond that evicts the oldest inserted id
/// (fetched again if seen again), counted in [`SchemaCache::evicted`].
pub struct SchemaCache {
    inner: RwLock<Inner>,
    evicted: AtomicU64,
}

struct Inner {
    entries: HashMap<u32, Entry>,
    order: VecDeque<u32>,
    max: usize,
}

impl fmt::Debug for SchemaCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaCache")
            .field("len", &self.len())
            .field("evicted", &self.evicted())
            .finish()
    }
}

impl SchemaCache {
    /// An empty cache of at most `max` ids (at least 1).
    pub fn new(max: usize) -> Self {
        SchemaCache {
            inner: RwLock::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                max: max.max(1),
            }),
            evicted: AtomicU64::new(0),
        }
    }

    /// What is known of schema `id`, if anything.
    pub fn get(&self, id: u32) -> Option<Entry> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.entries.get(&id).cloned()
    }

    /// Whether schema `id` is known (fetched, or known to be unknown).
    pub fn contains(&self, id: u32) -> bool {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.entries.contains_key(&id)
    }

    /// Records what the registry said about `id`, evicting the oldest id
    /// beyond the cap.
    pub fn insert(&self, id: u32, entry: Result<WriterSchema, String>) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if g.entries.insert(id, Arc::new(entry)).is_none() {
            g.order.push_back(id);
        }
        while g.entries.len() > g.max {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            g.entries.remove(&old);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ids held.
    pub fn len(&self) -> usize {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.entries.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids evicted by the cap so far.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

/// The schema id of a Confluent frame (`0x00` + big-endian u32 + datum).
pub fn confluent_id(payload: &[u8]) -> Option<u32> {
    match payload {
        [super::decode::CONFLUENT_MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}
