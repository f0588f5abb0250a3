//! The durable state store: checkpoints of the processing core and of the
//! input positions, in one embedded [redb](https://docs.rs/redb) file.
//!
//! A checkpoint is one ACID write transaction: the core's small state
//! (aggregator, alert lifecycle, watermark, counters) as whole records, the
//! join state as one record per request id *changed since the previous
//! checkpoint* (inserted, replaced or deleted), and the positions of every
//! input partition. Either all of it is on disk or none of it: a crash in
//! the middle of a checkpoint leaves the previous one. The service takes a
//! checkpoint only after everything the state has emitted is written
//! (ClickHouse, alerts topic, dead letters), so the state never runs ahead
//! of its output; input after the checkpoint is consumed again after a
//! restart and produces the same rows (see the README, "Durable state").
//!
//! Why redb: one file, pure Rust (no C++ toolchain, unlike RocksDB),
//! multi-table ACID transactions with a single fsync per commit (state and
//! positions atomically), copy-on-write B-trees with point lookups and
//! ordered range scans by key, a stable file format, and an exclusive lock
//! so two instances cannot share a directory. Writes are batched: one
//! transaction per checkpoint, so the B-tree's per-commit cost is paid every
//! few seconds, not per event.
//!
//! Tables: `meta` (format version, core records), `positions` ((topic,
//! partition) → next offset), `join` (request id → first expiry + the
//! request's join state, MessagePack), `join_expiry` ((first expiry, request
//! id), an index for loading records that are not in memory before they
//! expire: see [`StateStore::expiring`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

/// Format of the records: bumped when a record's encoding changes
/// incompatibly (the service then refuses to start on an older store).
pub const FORMAT_VERSION: u32 = 1;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The key of [`StateStore::instance_id`] in the meta table.
const INSTANCE_ID: &str = "instance_id";

/// The key of [`StateStore::claim`]'s identity in the meta table.
const IDENTITY: &str = "identity";

const POSITIONS: TableDefinition<(&str, i32), i64> = TableDefinition::new("positions");
const JOIN: TableDefinition<&str, &[u8]> = TableDefinition::new("join");
/// (first expiry, request id) of every join record: what the service loads
/// back before the watermark passes it, when the record is not in memory.
const JOIN_EXPIRY: TableDefinition<(i64, &str), ()> = TableDefinition::new("join_expiry");

/// A join record as stored: its first expiry (little-endian i64), then the record.
fn join_value(expiry: i64, record: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + record.len());
    v.extend_from_slice(&expiry.to_le_bytes());
    v.extend_from_slice(record);
    v
}

/// Splits a stored join value into (first expiry, record).
fn split_join_value(v: &[u8]) -> Result<(i64, &[u8])> {
    match v.split_first_chunk::<8>() {
        Some((expiry, record)) => Ok((i64::from_le_bytes(*expiry), record)),
        None => bail!("a join record of the state store is truncated"),
    }
}

/// What a state belongs to ([`StateStore::claim`]): the input topics. Its
/// positions, join state and watermark are of that input, so restoring it
/// for other topics would skip their messages below positions of another
/// topic and count them late against another watermark. Not part of it:
/// the consumer group (the state's positions, not the group's commits,
/// decide where input resumes, so renaming the group is safe), the
/// ClickHouse URL and database (moving the output to another server or
/// database carries the open windows over; the memory-budget test writes
/// one state's continuation to two databases), window sizes and horizons
/// (new windows take the new ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `kafka.predictions_topic`.
    pub predictions_topic: String,
    /// `kafka.ground_truth_topic`.
    pub ground_truth_topic: String,
}

impl Identity {
    /// The identity of a configuration.
    pub fn of(cfg: &crate::config::Config) -> Identity {
        Identity {
            predictions_topic: cfg.kafka.predictions_topic.clone(),
            ground_truth_topic: cfg.kafka.ground_truth_topic.clone(),
        }
    }

    /// `setting is "stored" there and "new" here`, for every difference.
    fn differences(&self, new: &Identity) -> Vec<String> {
        [
            (
                "kafka.predictions_topic",
                &self.predictions_topic,
                &new.predictions_topic,
            ),
            (
                "kafka.ground_truth_topic",
                &self.ground_truth_topic,
                &new.ground_truth_topic,
            ),
        ]
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(key, a, b)| format!("{key} is {a:?} there and {b:?} here"))
        .collect()
    }
}

/// Deletes the state store in `dir` (`modelwatch run --reset-state`);
/// says whether there was one.
pub fn reset(dir: &Path) -> Result<bool> {
    let path = dir.join(FILE_NAME);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => {
            Err(e).with_context(|| format!("cannot remove the state store {}", path.display()))
        }
    }
}

/// redb's page cache. Its default (1 GiB) would sit on top of
/// `state.memory_budget`; reads of cold join records are point lookups and
/// one range scan per flush, which a small cache serves (the OS page cache
/// holds the file).
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The file inside `state.dir`.
pub const FILE_NAME: &str = "modelwatch.redb";

pub use crate::pipeline::JoinChange;

/// What one checkpoint writes.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// Whole records of the core (name → bytes), replaced at each checkpoint.
    pub records: Vec<(&'static str, Vec<u8>)>,
    /// Join state changed since the previous checkpoint: the request's
    /// first expiry and new record, or `None` when it left the join.
    pub join: Vec<JoinChange>,
    /// Next offset to process of every input partition.
    pub positions: Vec<(String, i32, i64)>,
}

/// What a checkpoint cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckpointStats {
    /// Bytes of core records written.
    pub record_bytes: usize,
    /// Join records written.
    pub join_upserts: usize,
    /// Join records deleted.
    pub join_deletes: usize,
    /// Bytes of join records written.
    pub join_bytes: usize,
    /// Time of the transaction including its fsync.
    pub seconds: f64,
}

/// A checkpoint read back at startup (the join records are streamed with
/// [`StateStore::for_each_join`]).
#[derive(Debug, Default)]
pub struct Restored {
    /// Whole records of the core.
    pub records: Vec<(String, Vec<u8>)>,
    /// Next offset to process of every input partition.
    pub positions: Vec<(String, i32, i64)>,
    /// Join records stored.
    pub join_records: u64,
}

impl Restored {
    /// The record `name`, if stored.
    pub fn record(&self, name: &str) -> Option<&[u8]> {
        self.records
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
    }
}

/// A read snapshot of the stored join records ([`StateStore::join_reader`]).
pub struct JoinReader {
    join: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    expiry: redb::ReadOnlyTable<(i64, &'static str), ()>,
}

impl JoinReader {
    /// The stored join record of one request id (a point lookup).
    pub fn get(&self, request_id: &str) -> Result<Option<Vec<u8>>> {
        let Some(v) = self.join.get(request_id)? else {
            return Ok(None);
        };
        Ok(Some(split_join_value(v.value())?.1.to_vec()))
    }

    /// Hands `f` the request id of every stored join record that first
    /// expires at or before `up_to`, earliest first (a range scan of the
    /// expiry index).
    pub fn expiring(&self, up_to: i64, mut f: impl FnMut(&str) -> Result<()>) -> Result<u64> {
        let mut n = 0;
        for entry in self.expiry.range((i64::MIN, "")..)? {
            let (k, _) = entry?;
            let (at, key) = k.value();
            if at > up_to {
                break;
            }
            f(key)?;
            n += 1;
        }
        Ok(n)
    }
}

/// The store. Cheap to clone (the database is shared), so a checkpoint can
/// run on a blocking thread.
#[derive(Clone)]
pub struct StateStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.path)
            .finish()
    }
}

impl StateStore {
    /// Opens (or creates) the store in directory `dir`. Fails when another
    /// process has it open, or when it was written by an incompatible version.
    pub fn open(dir: &Path) -> Result<StateStore> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => anyhow::anyhow!(
                "the state store {} is in use by another process: each modelwatch instance needs its own state.dir",
                path.display()
            ),
            e => anyhow::anyhow!("cannot open the state store {}: {e}", path.display()),
        })?;
        let store = StateStore {
            db: Arc::new(db),
            path,
        };
        store.init()?;
        Ok(store)
    }

    /// Creates the tables and checks the format version.
    fn init(&self) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let stored = meta
                .get("format")?
                .map(|v| v.value().try_into().map(u32::from_le_bytes));
            match stored {
                None => {
                    meta.insert("format", FORMAT_VERSION.to_le_bytes().as_slice())?;
                }
                Some(Ok(FORMAT_VERSION)) => {}
                Some(Ok(v)) => bail!(
                    "the state store {} has format {v}, this modelwatch reads format {FORMAT_VERSION}: move the directory away to start with empty state",
                    self.path.display()
                ),
                Some(Err(_)) => bail!(
                    "the state store {} has an unreadable format record",
                    self.path.display()
                ),
            }
            tx.open_table(POSITIONS)?;
            tx.open_table(JOIN)?;
            tx.open_table(JOIN_EXPIRY)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The consumer group instance id of the service that owns this state
    /// (Kafka static membership, `group.instance.id`): made once, at the
    /// first start on the directory, and kept with the state, so a
    /// restarted instance rejoins its group as the same member and gets
    /// its partitions back at once, while two instances (two state
    /// directories) never share an id.
    pub fn instance_id(&self) -> Result<String> {
        let tx = self.db.begin_write()?;
        let id = {
            let mut meta = tx.open_table(META)?;
            let stored = meta
                .get(INSTANCE_ID)?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match stored {
                Some(id) => id,
                None => {
                    let id = format!("modelwatch-{:016x}", rand::random::<u64>());
                    meta.insert(INSTANCE_ID, id.as_bytes())?;
                    id
                }
            }
        };
        tx.commit()?;
        Ok(id)
    }

    /// Binds the store to the pipeline `identity` at its first start and
    /// refuses any other afterwards (see [`Identity`]). The error names
    /// every differing setting with both values and the ways out.
    pub fn claim(&self, identity: &Identity) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let stored = meta
                .get(IDENTITY)?
                .map(|v| serde_json::from_slice::<Identity>(v.value()));
            match stored {
                Some(Ok(stored)) => {
                    let differences = stored.differences(identity);
                    if !differences.is_empty() {
                        bail!(
                            "the state in {} belongs to another pipeline: {}. Give this configuration a state.dir of its own, or start it with `modelwatch run --reset-state` to discard that state (its pending predictions and open windows are lost)",
                            self.path.display(),
                            differences.join("; ")
                        );
                    }
                }
                Some(Err(e)) => bail!(
                    "the state store {} has an unreadable identity record: {e}",
                    self.path.display()
                ),
                None => {
                    let json = serde_json::to_vec(identity).context("identity")?;
                    meta.insert(IDENTITY, json.as_slice())?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the store's file on disk.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// The last checkpoint, or `None` when the store holds none yet.
    pub fn load(&self) -> Result<Option<Restored>> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        if meta.get("core")?.is_none() {
            return Ok(None);
        }
        let mut records = Vec::new();
        for entry in meta.iter()? {
            let (k, v) = entry?;
            if !["format", INSTANCE_ID, IDENTITY].contains(&k.value()) {
                records.push((k.value().to_string(), v.value().to_vec()));
            }
        }
        let mut positions = Vec::new();
        for entry in tx.open_table(POSITIONS)?.iter()? {
            let (k, v) = entry?;
            let (topic, partition) = k.value();
            positions.push((topic.to_string(), partition, v.value()));
        }
        let join_records = tx.open_table(JOIN)?.len()?;
        Ok(Some(Restored {
            records,
            positions,
            join_records,
        }))
    }

    /// Hands every stored join record to `f`, in request-id order.
    pub fn for_each_join(&self, mut f: impl FnMut(&str, &[u8]) -> Result<()>) -> Result<u64> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(JOIN)?;
        let mut n = 0;
        for entry in table.iter()? {
            let (k, v) = entry?;
            f(k.value(), split_join_value(v.value())?.1)?;
            n += 1;
        }
        Ok(n)
    }

    /// A read snapshot of the join records: the lookups of requests that
    /// are not in memory go through one snapshot per checkpoint, not one
    /// read transaction per event. Records that are not in memory do not
    /// change until they are read back, so a snapshot taken after the last
    /// checkpoint holds their current state.
    pub fn join_reader(&self) -> Result<JoinReader> {
        let tx = self.db.begin_read()?;
        Ok(JoinReader {
            join: tx.open_table(JOIN)?,
            expiry: tx.open_table(JOIN_EXPIRY)?,
        })
    }

    /// Writes a checkpoint in one transaction (blocking: it ends with an fsync).
    pub fn write(&self, c: &Checkpoint) -> Result<CheckpointStats> {
        let started = Instant::now();
        let mut stats = CheckpointStats::default();
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            for (name, bytes) in &c.records {
                meta.insert(*name, bytes.as_slice())?;
                stats.record_bytes += bytes.len();
            }
            let mut positions = tx.open_table(POSITIONS)?;
            for (topic, partition, offset) in &c.positions {
                positions.insert((topic.as_str(), *partition), *offset)?;
            }
            // B-tree inserts in key order touch each page once: the
            // changes are sorted by request id, the expiry index updates by
            // (expiry, request id).
            let mut order: Vec<&JoinChange> = c.join.iter().collect();
            order.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let mut unindex: Vec<(i64, &str)> = Vec::new();
            let mut index: Vec<(i64, &str)> = Vec::new();
            let mut join = tx.open_table(JOIN)?;
            for (key, record) in order {
                let old = match record {
                    Some((at, bytes)) => {
                        let value = join_value(*at, bytes);
                        stats.join_upserts += 1;
                        stats.join_bytes += value.len();
                        index.push((*at, key));
                        let old = join.insert(&**key, value.as_slice())?;
                        let old = old.map(|v| split_join_value(v.value()).map(|(t, _)| t));
                        old.transpose()?.filter(|t| t != at)
                    }
                    None => {
                        stats.join_deletes += 1;
                        let old = join.remove(&**key)?;
                        let old = old.map(|v| split_join_value(v.value()).map(|(t, _)| t));
                        old.transpose()?
                    }
                };
                if let Some(t) = old {
                    unindex.push((t, key));
                }
            }
            unindex.sort_unstable();
            index.sort_unstable();
            let mut expiry = tx.open_table(JOIN_EXPIRY)?;
            for k in unindex {
                expiry.remove(k)?;
            }
            for k in index {
                expiry.insert(k, ())?;
            }
        }
        tx.commit().context("state checkpoint commit failed")?;
        stats.seconds = started.elapsed().as_secs_f64();
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(predictions: &str, labels: &str) -> Identity {
        Identity {
            predictions_topic: predictions.into(),
            ground_truth_topic: labels.into(),
        }
    }

    /// Issue #11: a second pipeline started on the same state.dir is
    /// refused with both values of every differing setting; the same one
    /// is not; after a reset the directory takes the new one.
    #[test]
    fn a_state_refuses_another_pipeline_and_reset_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = identity("predictions", "ground-truth");
        {
            let store = StateStore::open(dir.path()).unwrap();
            store.claim(&a).unwrap();
            store.claim(&a).unwrap();
            let e = store
                .claim(&identity("other-predictions", "other-labels"))
                .unwrap_err()
                .to_string();
            for want in [
                r#"kafka.predictions_topic is "predictions" there and "other-predictions" here"#,
                r#"kafka.ground_truth_topic is "ground-truth" there and "other-labels" here"#,
                "--reset-state",
            ] {
                assert!(e.contains(want), "{e}");
            }
            let e = store
                .claim(&identity("predictions", "other-labels"))
                .unwrap_err()
                .to_string();
            assert!(!e.contains("predictions_topic"), "only what differs: {e}");
        }
        assert!(reset(dir.path()).unwrap());
        assert!(!reset(dir.path()).unwrap(), "nothing left to reset");
        let store = StateStore::open(dir.path()).unwrap();
        store
            .claim(&identity("other-predictions", "other-labels"))
            .unwrap();
        assert!(
            store.load().unwrap().is_none(),
            "the identity is not a checkpoint"
        );
    }

    fn checkpoint(
        core: &[u8],
        join: &[(&str, Option<&[u8]>)],
        pos: &[(&str, i32, i64)],
    ) -> Checkpoint {
        Checkpoint {
            records: vec![("core", core.to_vec())],
            join: join
                .iter()
                .map(|(k, v)| (Arc::from(*k), v.map(|v| (v.len() as i64 * 100, v.to_vec()))))
                .collect(),
            positions: pos
                .iter()
                .map(|(t, p, o)| (t.to_string(), *p, *o))
                .collect(),
        }
    }

    fn join_of(store: &StateStore) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        store
            .for_each_join(|k, v| {
                out.push((k.to_string(), v.to_vec()));
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn checkpoints_apply_incremental_join_changes_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = StateStore::open(dir.path()).unwrap();
            assert!(
                store.load().unwrap().is_none(),
                "a new store holds no checkpoint"
            );
            store
                .write(&checkpoint(
                    b"one",
                    &[("a", Some(b"A1")), ("b", Some(b"B1"))],
                    &[("predictions", 0, 10), ("ground-truth", 0, 4)],
                ))
                .unwrap();
            let s = store
                .write(&checkpoint(
                    b"two",
                    &[("a", None), ("b", Some(b"B2")), ("c", Some(b"C"))],
                    &[("predictions", 0, 12)],
                ))
                .unwrap();
            // Two records of 8 bytes of expiry plus "B2" and "C".
            assert_eq!((s.join_upserts, s.join_deletes, s.join_bytes), (2, 1, 19));
        }
        let store = StateStore::open(dir.path()).unwrap();
        let r = store.load().unwrap().expect("a checkpoint");
        assert_eq!(r.record("core"), Some(b"two".as_slice()));
        assert_eq!(r.join_records, 2);
        let mut pos = r.positions.clone();
        pos.sort();
        assert_eq!(
            pos,
            vec![("ground-truth".into(), 0, 4), ("predictions".into(), 0, 12)]
        );
        assert_eq!(
            join_of(&store),
            vec![("b".into(), b"B2".to_vec()), ("c".into(), b"C".to_vec())]
        );
        assert!(store.file_bytes() > 0);
        assert_eq!(
            store.join_reader().unwrap().get("b").unwrap(),
            Some(b"B2".to_vec())
        );
        assert_eq!(
            store.join_reader().unwrap().get("a").unwrap(),
            None,
            "deleted"
        );
        // The expiry index follows the records: b moved from 200 to 200
        // (same length), c is at 100, a's entry is gone.
        let mut due = Vec::new();
        let reader = store.join_reader().unwrap();
        reader
            .expiring(150, |k| {
                due.push(k.to_string());
                Ok(())
            })
            .unwrap();
        assert_eq!(due, vec!["c".to_string()]);
        let mut all = Vec::new();
        reader
            .expiring(i64::MAX, |k| {
                all.push(k.to_string());
                Ok(())
            })
            .unwrap();
        assert_eq!(all, vec!["c".to_string(), "b".to_string()]);
    }

    #[test]
    fn the_expiry_index_moves_with_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let with = |at: i64| Checkpoint {
            records: vec![("core", vec![1])],
            join: vec![(Arc::from("r"), Some((at, vec![7])))],
            positions: vec![],
        };
        store.write(&with(500)).unwrap();
        store.write(&with(100)).unwrap();
        let due = |up_to| {
            let mut v = Vec::new();
            store
                .join_reader()
                .unwrap()
                .expiring(up_to, |k| {
                    v.push(k.to_string());
                    Ok(())
                })
                .unwrap();
            v
        };
        assert_eq!(due(100), vec!["r".to_string()]);
        assert_eq!(due(i64::MAX).len(), 1, "the old entry at 500 is gone");
        store
            .write(&Checkpoint {
                records: vec![],
                join: vec![(Arc::from("r"), None)],
                positions: vec![],
            })
            .unwrap();
        assert!(due(i64::MAX).is_empty());
    }

    #[test]
    fn a_second_process_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = StateStore::open(dir.path()).unwrap();
        let err = StateStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another process"), "{err}");
    }

    #[test]
    fn an_incompatible_format_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = StateStore::open(dir.path()).unwrap();
            let tx = store.db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("format", 99u32.to_le_bytes().as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let err = StateStore::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("format 99") && err.contains("move the directory away"),
            "{err}"
        );
    }
}
