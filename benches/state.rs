//! The durable state: what checkpoints cost, how big the store is, how long
//! recovery takes. Real store (redb, fsync per checkpoint) in a temporary
//! directory on this machine's disk.
//!
//! 1. `throughput`: the in-memory path (raw Avro decode → join → metrics →
//!    windows, advancing every 10k messages like a flush) over the same
//!    pre-encoded events twice: without checkpoints, and with checkpoints
//!    as the service takes them: every `MODELWATCH_BENCH_CHECKPOINT_MS`
//!    (default 1000 ms, five times more often than the default
//!    `state.checkpoint_interval`) of wall time, and at least ten times the
//!    last checkpoint's cost apart.
//!    Prints events/s of both and the ratio.
//! 2. `pending`: N pending predictions (`MODELWATCH_BENCH_PENDING`, default
//!    1,000,000; labels withheld), one checkpoint holding all of them:
//!    checkpoint time, store bytes per pending prediction, then recovery
//!    (open + restore every record) time per million pending predictions.
//!
//! 0. `budget` (run first, so the peak RSS is its own): M pending predictions (`MODELWATCH_BENCH_BUDGET_PENDING`,
//!    default 10,000,000) with `state.memory_budget` = 1 GiB, checkpointed
//!    and evicted the way the service does (a checkpoint every 500,000
//!    predictions, then unchanged requests beyond the budget leave memory):
//!    peak RSS of the process (VmHWM) and the store's size.
//!
//! Run: `cargo bench --bench state`. Under `cargo test` it runs once with
//! small sizes.

use std::time::{Duration, Instant};

use modelwatch::config::{self, Config, Format};
use modelwatch::generate::{Generator, Scenario};
use modelwatch::ingest::decode::{encode_avro, Decoder, EventKind};
use modelwatch::model::InputEvent;
use modelwatch::pipeline::Core;
use modelwatch::state::{Checkpoint, StateStore};

// The binary's allocator (src/main.rs), so the numbers are the service's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const START_MS: i64 = 1_767_225_600_000; // 2026-01-01

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench_config() -> Config {
    let mut cfg = config::load(None, &Default::default()).expect("defaults are valid");
    cfg.windows.label_horizon = Duration::from_secs(3600);
    cfg
}

fn scenario(count: u64, label_fraction: f64) -> Scenario {
    Scenario {
        seed: 11,
        start_ms: START_MS,
        events_per_second: 1000.0,
        count,
        versions: vec!["v1".into()],
        numeric_features: 20,
        categorical_features: 5,
        label_fraction,
        ..Scenario::default()
    }
}

/// Writes the core's checkpoint; returns (join records, seconds).
fn checkpoint(core: &mut Core, store: &StateStore) -> (usize, f64) {
    let c = core.checkpoint();
    let records = c.join.len();
    let s = store
        .write(&Checkpoint {
            records: c.records,
            join: c.join,
            positions: vec![("predictions".into(), 0, 1)],
        })
        .expect("checkpoint");
    (records, s.seconds)
}

fn throughput(events: u64, every: Duration) {
    let cfg = bench_config();
    let encoded: Vec<(EventKind, Vec<u8>)> = Generator::new(scenario(events, 0.9))
        .map(|e| {
            let kind = match e {
                InputEvent::Prediction(_) => EventKind::Prediction,
                InputEvent::GroundTruth(_) => EventKind::GroundTruth,
            };
            (kind, encode_avro(&e))
        })
        .collect();
    let decoder = Decoder::new(Format::Avro);
    let run = |store: Option<&StateStore>| -> (f64, usize, f64) {
        let mut core = Core::new(&cfg);
        let started = Instant::now();
        let mut last = Instant::now();
        let (mut checkpoints, mut ck_seconds) = (0usize, 0.0);
        let mut last_cost = Duration::ZERO;
        for (i, (kind, bytes)) in encoded.iter().enumerate() {
            match decoder.decode(*kind, bytes) {
                Ok(InputEvent::Prediction(p)) => core.on_prediction(&p, 0),
                Ok(InputEvent::GroundTruth(g)) => core.on_label(&g, 0),
                Err(e) => panic!("bench input must decode: {e}"),
            }
            if i % 10_000 == 9_999 {
                std::hint::black_box(core.advance(0));
                if let Some(store) = store {
                    // The service's rule: at least `every`, and at least ten
                    // times the last checkpoint's cost apart.
                    if last.elapsed() >= every.max(last_cost * 10) {
                        let t = Instant::now();
                        ck_seconds += checkpoint(&mut core, store).1;
                        last_cost = t.elapsed();
                        checkpoints += 1;
                        last = Instant::now();
                    }
                }
            }
        }
        std::hint::black_box(core.advance(0));
        if let Some(store) = store {
            ck_seconds += checkpoint(&mut core, store).1;
            checkpoints += 1;
        }
        (started.elapsed().as_secs_f64(), checkpoints, ck_seconds)
    };
    let n = encoded.len() as f64;
    let (plain, _, _) = run(None);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = StateStore::open(dir.path()).expect("store");
    let (with, checkpoints, ck_seconds) = run(Some(&store));
    println!(
        "throughput: {} messages, in memory {:.0} msg/s; with checkpoints (every {:?} or 10x their cost): {:.0} msg/s ({} checkpoints, {:.1} ms each on average); ratio {:.2}",
        encoded.len(),
        n / plain,
        every,
        n / with,
        checkpoints,
        ck_seconds * 1000.0 / checkpoints.max(1) as f64,
        plain / with
    );
}

fn pending(n: u64) {
    let mut cfg = bench_config();
    cfg.windows.label_horizon = Duration::from_secs(7 * 86400);
    let mut core = Core::new(&cfg);
    for ev in Generator::new(scenario(n, 0.0)) {
        if let InputEvent::Prediction(p) = ev {
            core.on_prediction(&p, 0);
        }
    }
    core.advance(0);
    let pending = core.pending_predictions();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = StateStore::open(dir.path()).expect("store");
    let (records, seconds) = checkpoint(&mut core, &store);
    let bytes = store.file_bytes();
    println!(
        "pending: {pending} pending predictions ({records} join records); one checkpoint of all of them: {seconds:.2} s; store file {:.1} MiB = {:.0} bytes per pending prediction",
        bytes as f64 / 1048576.0,
        bytes as f64 / pending.max(1) as f64
    );
    drop(core);
    drop(store);
    let started = Instant::now();
    let store = StateStore::open(dir.path()).expect("store");
    let r = store.load().expect("load").expect("a checkpoint");
    let mut core = Core::restore(&cfg, |name| r.record(name)).expect("restore");
    store
        .for_each_join(|k, v| Ok(core.restore_request(k, v)?))
        .expect("join records");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(
        core.pending_predictions(),
        pending,
        "every pending prediction restored"
    );
    println!(
        "recovery: {pending} pending predictions in {seconds:.2} s = {:.2} s per million",
        seconds * 1e6 / pending.max(1) as f64
    );
}

/// A line of /proc/self/status, in MiB.
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn budget(n: u64) {
    let mut cfg = bench_config();
    cfg.windows.label_horizon = Duration::from_secs(7 * 86400);
    cfg.state.memory_budget = bytesize::ByteSize::gib(1);
    let max = cfg.state.max_hot_requests();
    let mut core = Core::new(&cfg);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = StateStore::open(dir.path()).expect("store");
    let started = Instant::now();
    let mut seen = 0u64;
    let mut cold = 0usize;
    let mut spill = |core: &mut Core| {
        checkpoint(core, &store);
        let held = core.join_requests();
        if held > max {
            cold += core.evict_requests(held - max / 10 * 9).0;
        }
    };
    for ev in Generator::new(scenario(n, 0.0)) {
        if let InputEvent::Prediction(p) = ev {
            core.on_prediction(&p, 0);
            seen += 1;
            if seen.is_multiple_of(500_000) {
                core.advance(0);
                spill(&mut core);
            }
        }
    }
    core.advance(0);
    spill(&mut core);
    println!(
        "budget: {} pending predictions with a 1 GiB budget ({max} requests): {} in memory, {cold} only in the store; peak RSS {:.0} MiB, RSS now {:.0} MiB, store {:.0} MiB, {:.0} s",
        core.pending_predictions() + cold,
        core.join_requests(),
        status_mib("VmHWM:"),
        status_mib("VmRSS:"),
        store.file_bytes() as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    // First, so its peak RSS is its own.
    budget(env_or(
        "MODELWATCH_BENCH_BUDGET_PENDING",
        if benching { 10_000_000 } else { 10_000 },
    ));
    let every = Duration::from_millis(env_or("MODELWATCH_BENCH_CHECKPOINT_MS", 1000));
    throughput(
        env_or(
            "MODELWATCH_BENCH_EVENTS",
            if benching { 2_000_000 } else { 20_000 },
        ),
        every,
    );
    pending(env_or(
        "MODELWATCH_BENCH_PENDING",
        if benching { 1_000_000 } else { 10_000 },
    ));
}
