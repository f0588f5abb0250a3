//! Benchmarks of the statistics core (issue #3 targets):
//!
//! - `metrics/observe_25_features`: one 25-feature event (20 numeric, 5
//!   categorical) resolved against its reference and applied to one window
//!   accumulator (target <= 500 ns);
//! - `metrics/observe_1_numeric_feature`: the same for a one-feature event,
//!   per-event overhead included (target <= 20 ns per numeric feature);
//! - `metrics/window_close_25_features`: every drift, integrity and decision
//!   value of a 25-feature window (target <= 1 ms);
//! - `metrics/outcome_*`: a labeled binary outcome, the change-detector pair;
//! - accumulator bytes per (model, version, segment, window), printed.
//!
//! Run: `cargo bench --bench metrics`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use modelwatch::metrics::detectors::{DetectorConfig, ErrorDetectors};
use modelwatch::metrics::labels::{LabelReferenceBuilder, LabelValue};
use modelwatch::metrics::{
    DataAccumulator, DriftConfig, OutcomeAccumulator, ReferenceBuilder, ReferenceProfile, Resolved,
    Task,
};
use modelwatch::model::{Entries, FeatureValue, Label, PredictionEvent, PredictionOutcome};

const CATEGORIES: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

fn event(rng: &mut StdRng, numeric: usize, categorical: usize) -> PredictionEvent {
    let normal = Normal::new(0.0, 1.0).expect("valid normal");
    let mut f = Vec::with_capacity(numeric + categorical);
    for i in 0..numeric {
        let v = normal.sample(rng) * (i + 1) as f64;
        f.push((format!("num_{i}"), FeatureValue::Double(v)));
    }
    for i in 0..categorical {
        let c = CATEGORIES[rng.gen_range(0..CATEGORIES.len())];
        f.push((format!("cat_{i}"), FeatureValue::String(c.to_owned())));
    }
    PredictionEvent {
        features: Entries(f),
        score: Some(rng.gen_range(0.0..1.0)),
        latency_ms: Some(rng.gen_range(1.0..20.0)),
        ..Default::default()
    }
}

fn setup(
    numeric: usize,
    categorical: usize,
) -> (ReferenceProfile, Vec<PredictionEvent>, DriftConfig) {
    let cfg = DriftConfig::default();
    let mut rng = StdRng::seed_from_u64(5);
    let mut b = ReferenceBuilder::new(&cfg);
    for _ in 0..5000 {
        b.observe(&event(&mut rng, numeric, categorical));
    }
    let events = (0..1024)
        .map(|_| event(&mut rng, numeric, categorical))
        .collect();
    (b.build(), events, cfg)
}

fn observe_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics");
    for (name, numeric, categorical) in [
        ("observe_25_features", 20, 5),
        ("observe_1_numeric_feature", 1, 0),
    ] {
        let (profile, events, _) = setup(numeric, categorical);
        let mut acc = DataAccumulator::new(Some(&profile));
        let mut r = Resolved::default();
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                let ev = &events[i & 1023];
                i = i.wrapping_add(1);
                profile.resolve(black_box(ev), &mut r);
                acc.observe(&r);
            })
        });
        black_box(acc.count());
    }
    let (profile, events, cfg) = setup(20, 5);
    let mut acc = DataAccumulator::new(Some(&profile));
    let mut r = Resolved::default();
    for ev in &events {
        profile.resolve(ev, &mut r);
        acc.observe(&r);
    }
    let mut out = Vec::with_capacity(512);
    g.bench_function("window_close_25_features", |b| {
        b.iter(|| {
            out.clear();
            acc.finish(Some(&profile), &cfg, &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

fn outcome_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics");
    let task = Task::Binary {
        positive_label: "1".into(),
        threshold: 0.5,
    };
    let mut rng = StdRng::seed_from_u64(9);
    let outcomes: Vec<(PredictionOutcome, Label)> = (0..1024)
        .map(|_| {
            let s: f64 = rng.gen_range(0.0..1.0);
            let y = rng.gen_bool(s);
            (
                PredictionOutcome {
                    score: Some(s),
                    predicted_label: None,
                    predicted_value: None,
                },
                Label {
                    actual_label: Some(if y { "1" } else { "0" }.into()),
                    actual_value: None,
                    timestamp: 0,
                },
            )
        })
        .collect();
    let cfg = DriftConfig {
        label_reference_size: 2,
        ..Default::default()
    };
    let mut lb = LabelReferenceBuilder::new(&cfg);
    lb.observe(LabelValue::Class("0"));
    let label_profile = Arc::new(
        lb.observe(LabelValue::Class("1"))
            .expect("two labels complete the reference"),
    );
    let mut acc = OutcomeAccumulator::new();
    let mut i = 0usize;
    g.bench_function("outcome_binary_labeled", |b| {
        b.iter(|| {
            let (o, l) = &outcomes[i & 1023];
            i = i.wrapping_add(1);
            acc.observe_labeled(&task, black_box(o), l, 1000);
            acc.observe_label(&label_profile, LabelValue::Class("1"));
        })
    });
    let mut det = ErrorDetectors::new(&DetectorConfig::default());
    let errors: Vec<f64> = (0..1024).map(|_| rng.gen_bool(0.2) as u8 as f64).collect();
    g.bench_function("outcome_detectors_update", |b| {
        b.iter(|| {
            let e = errors[i & 1023];
            i = i.wrapping_add(1);
            black_box(det.update(black_box(e)))
        })
    });
    g.finish();
    black_box(acc.observations());
}

fn report_bytes() {
    let (profile, events, _) = setup(20, 5);
    let mut data = DataAccumulator::new(Some(&profile));
    let mut r = Resolved::default();
    for ev in &events {
        profile.resolve(ev, &mut r);
        data.observe(&r);
    }
    let task = Task::Binary {
        positive_label: "1".into(),
        threshold: 0.5,
    };
    let mut outcome = OutcomeAccumulator::new();
    for (k, ev) in events.iter().enumerate() {
        let o = PredictionOutcome::of(ev);
        let l = Label {
            actual_label: Some(if k % 3 == 0 { "1" } else { "0" }.into()),
            actual_value: None,
            timestamp: 0,
        };
        outcome.observe_labeled(&task, &o, &l, (k * 37) as i64);
    }
    println!(
        "accumulator bytes per (model, version, segment, window), 25 features (20 numeric, 5 categorical), binary task: data {} B, outcome {} B, total {} B",
        data.approx_bytes(),
        outcome.approx_bytes(),
        data.approx_bytes() + outcome.approx_bytes()
    );
}

fn bytes(_: &mut Criterion) {
    report_bytes();
}

criterion_group!(benches, observe_benches, outcome_benches, bytes);
criterion_main!(benches);
