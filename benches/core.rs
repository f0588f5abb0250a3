//! Benchmarks of the pure core and the in-memory end-to-end path.
//!
//! - `join/*`: insert, match and expire in the join state.
//! - `metrics/observe_25_features`: one 25-feature event (20 numeric, 5
//!   categorical) resolved against its reference and applied to one window
//!   accumulator.
//! - `pipeline/*`: N pre-encoded events (JSON and raw Avro) through decode →
//!   join → metrics → windows, the whole in-memory path; reported as
//!   events/s (criterion's "thrpt").
//!
//! Run: `cargo bench --bench core`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use modelwatch::config::{self, Config};
use modelwatch::generate::{Generator, Scenario};
use modelwatch::ingest::bounds::EventBounds;
use modelwatch::ingest::decode::{encode_avro, encode_json, Decoder, EventKind};
use modelwatch::join::{JoinConfig, JoinState};
use modelwatch::metrics::{DataAccumulator, ReferenceBuilder, Resolved};
use modelwatch::model::{InputEvent, Label};
use modelwatch::pipeline::{drift_config, Core};

// The binary's allocator (src/main.rs), so the numbers are the service's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const START_MS: i64 = 1_767_225_600_000; // 2026-01-01

fn scenario(count: u64) -> Scenario {
    Scenario {
        seed: 3,
        start_ms: START_MS,
        events_per_second: 1000.0,
        count,
        versions: vec!["v1".into()],
        numeric_features: 20,
        categorical_features: 5,
        ..Scenario::default()
    }
}

fn events(count: u64) -> Vec<InputEvent> {
    Generator::new(scenario(count)).collect()
}

fn bench_config() -> Config {
    let mut cfg = config::load(None, &Default::default()).expect("defaults are valid");
    // Labels arrive within 10 min in the scenario; keep the horizon realistic.
    cfg.windows.label_horizon = std::time::Duration::from_secs(3600);
    cfg
}

fn join_benches(c: &mut Criterion) {
    let cfg = JoinConfig {
        label_horizon_ms: 3_600_000,
        early_label_ttl_ms: 600_000,
        max_pending: 10_000_000,
        max_pending_per_model: usize::MAX,
        max_early_labels: usize::MAX,
    };
    let ids: Vec<String> = (0..100_000).map(|i| format!("req-3-{i}")).collect();
    let label = Label {
        actual_label: Some("1".into()),
        actual_value: None,
        timestamp: 0,
    };
    let mut g = c.benchmark_group("join");
    g.throughput(Throughput::Elements(ids.len() as u64));
    g.bench_function("insert_100k", |b| {
        b.iter_batched(
            || JoinState::<u64>::new(cfg),
            |mut j| {
                let mut out = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    j.insert_prediction(id, 0, i as i64, i as u64, &mut out);
                }
                j
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("insert_then_match_100k", |b| {
        b.iter_batched(
            || JoinState::<u64>::new(cfg),
            |mut j| {
                let mut out = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    j.insert_prediction(id, 0, i as i64, i as u64, &mut out);
                }
                for id in &ids {
                    j.insert_label(id, label.clone(), &mut out);
                    out.clear();
                }
                j
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("insert_then_expire_100k", |b| {
        b.iter_batched(
            || JoinState::<u64>::new(cfg),
            |mut j| {
                let mut out = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    j.insert_prediction(id, 0, i as i64, i as u64, &mut out);
                }
                j.expire(i64::MAX / 2, &mut out);
                black_box(out.len())
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn metrics_benches(c: &mut Criterion) {
    let cfg = bench_config();
    let drift = drift_config(&cfg);
    let evs: Vec<_> = events(20_000)
        .into_iter()
        .filter_map(|e| match e {
            InputEvent::Prediction(p) => Some(p),
            InputEvent::GroundTruth(_) => None,
        })
        .collect();
    let mut builder = ReferenceBuilder::new(&drift);
    for e in &evs[..5_000] {
        builder.observe(e);
    }
    let profile = builder.build();
    let mut acc = DataAccumulator::new(Some(&profile));
    let mut resolved = Resolved::default();
    let mut i = 0usize;
    c.bench_function("metrics/observe_25_features", |b| {
        b.iter(|| {
            let e = &evs[i % evs.len()];
            i += 1;
            profile.resolve(e, &mut resolved);
            acc.observe(&resolved);
        })
    });
}

fn pipeline_benches(c: &mut Criterion) {
    let cfg = bench_config();
    let evs = events(100_000);
    let n = evs.len() as u64;
    let json: Vec<(EventKind, Vec<u8>)> = evs.iter().map(|e| (kind(e), encode_json(e))).collect();
    let avro: Vec<(EventKind, Vec<u8>)> = evs.iter().map(|e| (kind(e), encode_avro(e))).collect();
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n));
    for (name, encoded, format) in [
        ("json_100k_requests", &json, config::Format::Json),
        ("avro_100k_requests", &avro, config::Format::Avro),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || Core::new(&cfg),
                |mut core| {
                    let decoder = Decoder::new(format);
                    run_path(&mut core, &decoder, encoded);
                    core
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn kind(e: &InputEvent) -> EventKind {
    match e {
        InputEvent::Prediction(_) => EventKind::Prediction,
        InputEvent::GroundTruth(_) => EventKind::GroundTruth,
    }
}

/// decode → the `[limits]` bounds → join → metrics → window close,
/// advancing once per 10k messages as the service does once per flush.
fn run_path(core: &mut Core, decoder: &Decoder, encoded: &[(EventKind, Vec<u8>)]) {
    let bounds = EventBounds::new(&config::LimitsConfig::default());
    for (i, (kind, bytes)) in encoded.iter().enumerate() {
        let ev = decoder.decode(*kind, bytes).and_then(|ev| {
            // The wall clock at the event's own time: the scenario is dated 2024.
            let wall = match &ev {
                InputEvent::Prediction(p) => p.timestamp,
                InputEvent::GroundTruth(g) => g.timestamp,
            };
            bounds.check(&ev, wall).map(|()| ev)
        });
        match ev {
            Ok(InputEvent::Prediction(p)) => core.on_prediction(&p, 0),
            Ok(InputEvent::GroundTruth(g)) => core.on_label(&g, 0),
            Err(e) => panic!("bench input must decode: {e}"),
        }
        if i % 10_000 == 9_999 {
            black_box(core.advance(0));
        }
    }
    black_box(core.advance(0));
}

criterion_group!(benches, join_benches, metrics_benches, pipeline_benches);
criterion_main!(benches);
