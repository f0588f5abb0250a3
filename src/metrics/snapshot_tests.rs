//! Snapshot / restore of the [`Aggregator`]: an aggregator restored from a
//! snapshot taken anywhere in a stream emits, from then on, exactly what the
//! original emits (rows, histograms, versions, references, closed windows;
//! every `f64` bit for bit).
//!
//! The stream is recorded once through the real join ([`JoinState`]) the way
//! `pipeline::Core` drives the aggregator, as a list of aggregator calls;
//! the original replays all of it, each restored copy the part after its
//! snapshot, and their outputs are compared call by call.

use std::sync::Arc;

use proptest::prelude::*;

use super::aggregator::{Aggregator, AggregatorConfig, Emitted, PendingRecord, SNAPSHOT_FORMAT};
use super::reference::ReferenceBuilder;
use super::snapshot::RestoreError;
use super::{DriftConfig, ReferenceProfile, Task};
use crate::generate::{DriftScenario, Generator, Scenario};
use crate::join::{JoinConfig, JoinState, Joined, PredictionInsert};
use crate::model::{InputEvent, Label, PredictionEvent};

const SECOND: i64 = 1000;

/// One call into the aggregator, as `pipeline::Core` makes it.
#[derive(Clone)]
enum Op {
    /// `version_id`, then `observe_prediction_of` (new; the record the join
    /// kept) or `observe_duplicate`.
    Prediction {
        ev: PredictionEvent,
        record: Option<PendingRecord>,
    },
    Joined(Joined<PendingRecord>),
    Advance(i64),
    SetReference(String, String, ReferenceProfile),
    Flush,
}

/// The stream and the aggregator configuration of a test.
struct Stream {
    cfg: AggregatorConfig,
    ops: Vec<Op>,
}

fn config(
    window_sizes_ms: Vec<i64>,
    reference_size: usize,
    label_reference: usize,
) -> AggregatorConfig {
    let mut tasks = ahash::AHashMap::new();
    tasks.insert("reg".to_owned(), Task::Regression);
    AggregatorConfig {
        window_sizes_ms,
        label_horizon_ms: 60 * SECOND,
        revision_interval_ms: 10 * SECOND,
        drift: DriftConfig {
            label_reference_size: label_reference,
            min_samples: 10,
            ..Default::default()
        },
        reference_size,
        max_segment_values: 3,
        max_models: 4,
        max_versions_per_model: 10,
        max_segment_keys: 32,
        tasks,
    }
}

/// The events of `scenario`, with a multiclass model scoring the first
/// version's requests too, an occasional model beyond the model cap,
/// duplicates and predictions held back so they arrive late.
fn events(scenario: Scenario) -> Vec<InputEvent> {
    let mut g = Generator::new(scenario);
    let mut out = Vec::new();
    let mut held: Vec<(usize, InputEvent)> = Vec::new();
    let mut n = 0usize;
    while let Some(e) = g.next_event() {
        n += 1;
        while held.first().is_some_and(|(due, _)| *due <= n) {
            out.push(held.remove(0).1);
        }
        if let InputEvent::Prediction(p) = &e {
            if p.model_version == "v1" && p.model_id != "reg" {
                let score = p.score.unwrap_or(0.5);
                let class = if score < 0.4 {
                    "0"
                } else if score < 0.7 {
                    "1"
                } else {
                    "2"
                };
                out.push(InputEvent::Prediction(PredictionEvent {
                    model_id: "mc".into(),
                    model_version: "1".into(),
                    score: None,
                    predicted_label: Some(class.into()),
                    ..p.clone()
                }));
                if n.is_multiple_of(37) {
                    out.push(InputEvent::Prediction(PredictionEvent {
                        model_id: format!("extra-{}", n % 3),
                        ..p.clone()
                    }));
                }
            }
            if n.is_multiple_of(101) {
                out.push(e.clone());
            }
            if n.is_multiple_of(67) {
                held.push((n + 150, e));
                continue;
            }
        }
        out.push(e);
    }
    out.extend(held.into_iter().map(|(_, e)| e));
    out
}

/// Runs `events` through a join and an aggregator as `pipeline::Core` does
/// (the watermark is the newest event time minus `lateness`, advanced every
/// `every` events), recording every aggregator call. `reference_at`: at that
/// event, a reference profile built from the events so far is imported for
/// version `v2` of the scenario's model.
fn record(
    cfg: AggregatorConfig,
    events: &[InputEvent],
    every: usize,
    reference_at: Option<usize>,
) -> Stream {
    let mut agg = Aggregator::new(cfg.clone());
    let mut join: JoinState<PendingRecord> = JoinState::new(JoinConfig {
        label_horizon_ms: cfg.label_horizon_ms,
        early_label_ttl_ms: 30 * SECOND,
        max_pending: 100_000,
        max_pending_per_model: usize::MAX,
        max_early_labels: usize::MAX,
    });
    let mut ops = Vec::new();
    let mut joined = Vec::new();
    let mut imported = ReferenceBuilder::new(&cfg.drift);
    let mut newest = i64::MIN;
    let lateness = 5 * SECOND;
    let drain =
        |joined: &mut Vec<Joined<PendingRecord>>, agg: &mut Aggregator, ops: &mut Vec<Op>| {
            for j in joined.drain(..) {
                ops.push(Op::Joined(j.clone()));
                agg.observe_joined(j);
            }
        };
    for (i, e) in events.iter().enumerate() {
        match e {
            InputEvent::Prediction(ev) => {
                newest = newest.max(ev.timestamp);
                if ev.model_version == "v2" {
                    imported.observe(ev);
                }
                let v = agg.version_id(ev);
                let mut record = None;
                let inserted = join.insert_prediction_with(
                    &ev.request_id,
                    v,
                    ev.timestamp,
                    || {
                        let r = agg.observe_prediction_of(v, ev);
                        record = Some(r.clone());
                        r
                    },
                    &mut joined,
                );
                if inserted == PredictionInsert::Duplicate {
                    agg.observe_duplicate(ev);
                }
                ops.push(Op::Prediction {
                    ev: ev.clone(),
                    record,
                });
            }
            InputEvent::GroundTruth(g) => {
                newest = newest.max(g.timestamp);
                join.insert_label(&g.request_id, Label::of(g), &mut joined);
            }
        }
        drain(&mut joined, &mut agg, &mut ops);
        if reference_at == Some(i) && !imported.is_empty() {
            let p = imported.build();
            ops.push(Op::SetReference(
                "fraud-detector".into(),
                "v2".into(),
                p.clone(),
            ));
            agg.set_reference("fraud-detector", "v2", p);
        }
        if i % every == every - 1 {
            let wm = newest - lateness;
            join.expire(wm, &mut joined);
            drain(&mut joined, &mut agg, &mut ops);
            ops.push(Op::Advance(wm));
            agg.advance(wm, &mut Emitted::default());
        }
    }
    // The stream ends: the watermark passes every horizon, then a flush.
    let wm = newest + 10 * cfg.label_horizon_ms;
    join.expire(wm, &mut joined);
    drain(&mut joined, &mut agg, &mut ops);
    ops.push(Op::Flush);
    ops.push(Op::Advance(wm));
    Stream { cfg, ops }
}

/// What one call emitted, as sorted text (every `f64` as its bits).
fn canonical(out: &Emitted) -> Vec<String> {
    let bits = |v: f64| format!("{:016x}", v.to_bits());
    let mut rows: Vec<String> = out
        .rows
        .iter()
        .map(|r| {
            format!(
                "row {}|{}|{}|{}|{}|{}|{}|{}|{}|{:?}|{}",
                r.model_id,
                r.model_version,
                r.segment,
                r.window_start_ms,
                r.window_ms,
                r.value.metric,
                r.value.feature,
                bits(r.value.value),
                r.value.samples,
                r.value.p_value.map(bits),
                r.revision
            )
        })
        .collect();
    rows.extend(out.histograms.iter().map(|h| {
        format!(
            "hist {}|{}|{}|{}|{}|{}|{:?}|{:?}",
            h.model_id,
            h.model_version,
            h.segment,
            h.window_start_ms,
            h.window_ms,
            h.histogram.feature,
            h.histogram.kind,
            h.histogram
                .counts
                .iter()
                .map(|&c| bits(c))
                .collect::<Vec<_>>()
        )
    }));
    rows.extend(
        out.references
            .iter()
            .map(|(m, v, p)| format!("ref {m}|{v}|{:?}", rmp_serde::to_vec(&**p).unwrap())),
    );
    rows.extend(out.versions.iter().map(|v| format!("version {v:?}")));
    rows.extend(out.closed_windows.iter().map(|w| format!("closed {w:?}")));
    rows.sort();
    rows
}

/// Applies one call; returns what it emitted. `durable`: pending records
/// go through MessagePack first, as a durable join stores them.
fn apply(agg: &mut Aggregator, op: &Op, durable: bool) -> Vec<String> {
    let through = |r: &PendingRecord| -> PendingRecord {
        if durable {
            rmp_serde::from_slice(&rmp_serde::to_vec(r).unwrap()).unwrap()
        } else {
            r.clone()
        }
    };
    let mut out = Emitted::default();
    match op {
        Op::Prediction { ev, record } => {
            let v = agg.version_id(ev);
            match record {
                Some(r) => assert_eq!(&agg.observe_prediction_of(v, ev), r),
                None => agg.observe_duplicate(ev),
            }
        }
        Op::Joined(j) => agg.observe_joined(match j {
            Joined::Matched {
                payload,
                prediction_ts,
                label,
            } => Joined::Matched {
                payload: through(payload),
                prediction_ts: *prediction_ts,
                label: Arc::clone(label),
            },
            Joined::Expired {
                payload,
                prediction_ts,
            } => Joined::Expired {
                payload: through(payload),
                prediction_ts: *prediction_ts,
            },
            Joined::Orphan { label } => Joined::Orphan {
                label: Arc::clone(label),
            },
        }),
        Op::Advance(wm) => agg.advance(*wm, &mut out),
        Op::SetReference(m, v, p) => agg.set_reference(m, v, p.clone()),
        Op::Flush => agg.flush_all(&mut out),
    }
    canonical(&out)
}

/// Replays the whole stream, snapshots at every op index of `at`, and checks
/// that each restored aggregator emits what the original does from there on,
/// ends in the same state, and re-snapshots to the same bytes. Returns the
/// original's output (one entry per op) for further checks.
fn check_restores(s: &Stream, at: &[usize]) -> Vec<Vec<String>> {
    let mut original = Aggregator::new(s.cfg.clone());
    let mut expected = Vec::with_capacity(s.ops.len());
    let mut snapshots = Vec::new();
    for (i, op) in s.ops.iter().enumerate() {
        if at.contains(&i) {
            snapshots.push((i, original.snapshot(), original.stats()));
        }
        expected.push(apply(&mut original, op, false));
    }
    let last = original.snapshot();
    for (i, bytes, stats) in snapshots {
        let mut restored = Aggregator::restore(s.cfg.clone(), &bytes).expect("restore");
        assert_eq!(
            restored.snapshot(),
            bytes,
            "snapshot at op {i}: re-snapshot differs"
        );
        assert_eq!(restored.stats(), stats);
        for (j, op) in s.ops.iter().enumerate().skip(i) {
            let got = apply(&mut restored, op, true);
            assert_eq!(
                got, expected[j],
                "restored at op {i}: output of op {j} differs"
            );
        }
        assert_eq!(
            restored.snapshot(),
            last,
            "restored at op {i}: final state differs"
        );
        assert_eq!(restored.stats(), original.stats());
    }
    expected
}

fn scenario() -> Scenario {
    Scenario {
        seed: 7,
        count: 1000,
        events_per_second: 10.0,
        numeric_features: 20,
        categorical_features: 5,
        drift: DriftScenario::Sudden,
        drift_at: 0.5,
        accuracy_drop: true,
        label_delay_ms: (2 * SECOND, 80 * SECOND),
        regression_model: Some("reg".into()),
        ..Default::default()
    }
}

#[test]
fn a_restored_aggregator_goes_on_exactly_like_the_original() {
    let evs = events(scenario());
    let stream = record(
        config(vec![20 * SECOND, 60 * SECOND], 200, 100),
        &evs,
        20,
        Some(evs.len() * 3 / 5),
    );
    let n = stream.ops.len();
    let reference_import = stream
        .ops
        .iter()
        .position(|op| matches!(op, Op::SetReference(..)))
        .expect("a reference is imported");
    let first_labeled_close = stream
        .ops
        .iter()
        .position(|op| matches!(op, Op::Advance(wm) if *wm > evs_start() + 90 * SECOND))
        .expect("windows close");
    let at = [
        0,
        // The references are still being built (200 events per version).
        40,
        150,
        // Windows closed, revised as labels arrive; others open.
        first_labeled_close,
        n / 2,
        // Right after a reference import (cells on the old and the new profile).
        reference_import + 1,
        reference_import + 200,
        // Before the final flush / after it.
        n - 2,
        n - 1,
        n,
    ];
    let out = check_restores(&stream, &at);
    // The stream exercised what the snapshot must carry.
    let all: Vec<&String> = out.iter().flatten().collect();
    let has = |needle: &str| all.iter().any(|r| r.contains(needle));
    for needle in [
        "|psi|",
        "|drift_detected|__label__|",
        "|adwin_drift|",
        "|accuracy|",
        "|f1_macro|",
        "|rmse|",
        "|orphan_label_count|",
        "|duplicate_count|",
        "country=__other__",
        "row __other__|",
        "ref fraud-detector|v1",
        "hist ",
        "closed ",
    ] {
        assert!(has(needle), "the stream produced no {needle}");
    }
    let revised = all
        .iter()
        .filter(|r| r.starts_with("row fraud-detector|v1||") && r.contains("|label_count|"))
        .count();
    assert!(revised > 10, "performance rows are revised: {revised}");
}

fn evs_start() -> i64 {
    Scenario::default().start_ms
}

#[test]
fn config_comes_from_the_caller_at_restore() {
    let evs = events(Scenario {
        count: 200,
        ..scenario()
    });
    let stream = record(config(vec![20 * SECOND], 1000, 1000), &evs, 20, None);
    let mut a = Aggregator::new(stream.cfg.clone());
    let half = stream.ops.len() / 2;
    for op in &stream.ops[..half] {
        apply(&mut a, op, false);
    }
    // A restored aggregator whose reference size is smaller builds its
    // references at its next prediction.
    let mut smaller = stream.cfg.clone();
    smaller.reference_size = 10;
    let mut b = Aggregator::restore(smaller, &a.snapshot()).unwrap();
    let mut refs = 0;
    for op in &stream.ops[half..] {
        refs += apply(&mut b, op, true)
            .iter()
            .filter(|r| r.starts_with("ref "))
            .count();
    }
    assert!(refs > 0);
}

#[test]
fn pending_records_are_small_and_round_trip() {
    let mut a = Aggregator::new(config(vec![20 * SECOND], 10, 10));
    let evs = events(Scenario {
        count: 20,
        ..scenario()
    });
    for e in &evs {
        if let InputEvent::Prediction(p) = e {
            let r = a.observe_prediction(p);
            let bytes = rmp_serde::to_vec(&r).unwrap();
            assert!(bytes.len() <= 24, "{} bytes: {r:?}", bytes.len());
            let back: PendingRecord = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(back, r);
        }
    }
}

#[test]
fn reference_profiles_round_trip_through_message_pack_bit_for_bit() {
    let evs = events(Scenario {
        count: 300,
        ..scenario()
    });
    let mut b = ReferenceBuilder::new(&DriftConfig::default());
    for e in &evs {
        if let InputEvent::Prediction(p) = e {
            if p.model_id == "fraud-detector" {
                b.observe(p);
            }
        }
    }
    let p = b.build();
    let bytes = rmp_serde::to_vec(&p).unwrap();
    let back: ReferenceProfile = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back, p);
    assert_eq!(rmp_serde::to_vec(&back).unwrap(), bytes);
    // The derived lookups are rebuilt: resolving gives the same cells.
    let (mut r1, mut r2) = Default::default();
    for e in &evs {
        if let InputEvent::Prediction(ev) = e {
            p.resolve(ev, &mut r1);
            back.resolve(ev, &mut r2);
            assert_eq!(format!("{r1:?}"), format!("{r2:?}"));
        }
    }
    // The builder too, mid-way.
    let bytes = rmp_serde::to_vec(&b).unwrap();
    let mut restored: ReferenceBuilder = rmp_serde::from_slice(&bytes).unwrap();
    restored.set_config(&DriftConfig::default());
    assert_eq!(rmp_serde::to_vec(&restored).unwrap(), bytes);
    assert_eq!(restored.build(), p);
}

#[test]
fn restore_rejects_what_is_not_a_snapshot() {
    let cfg = || config(vec![20 * SECOND], 10, 10);
    let err = |bytes: &[u8]| Aggregator::restore(cfg(), bytes).err().expect("an error");
    assert!(matches!(err(b""), RestoreError::Decode(_)));
    assert!(matches!(err(b"\x92\x01\xc1"), RestoreError::Decode(_)));
    let other = rmp_serde::to_vec(&(SNAPSHOT_FORMAT + 1, 0)).unwrap();
    let e = err(&other);
    assert!(matches!(e, RestoreError::Format { found, .. } if found == SNAPSHOT_FORMAT + 1));
    assert!(e.to_string().contains("format"), "{e}");
    // A truncated snapshot.
    let mut a = Aggregator::new(cfg());
    for e in events(Scenario {
        count: 30,
        ..scenario()
    }) {
        if let InputEvent::Prediction(p) = e {
            a.observe_prediction(&p);
        }
    }
    let bytes = a.snapshot();
    assert!(Aggregator::restore(cfg(), &bytes).is_ok());
    assert!(matches!(
        err(&bytes[..bytes.len() / 2]),
        RestoreError::Decode(_)
    ));
}

/// Snapshot sizes of a realistic state, printed (`cargo test --lib
/// snapshot_size -- --nocapture`): one 25-feature binary model, segment keys
/// `country` (4 values) and `channel` (2), 12 open one-minute windows.
#[test]
fn snapshot_size() {
    let s = Scenario {
        count: 12 * 60 * 10,
        events_per_second: 10.0,
        versions: vec!["v1".into()],
        numeric_features: 20,
        categorical_features: 5,
        ..Default::default()
    };
    let mut cfg = config(vec![60 * SECOND], 1000, 1000);
    cfg.max_segment_values = 10;
    let mut a = Aggregator::new(cfg);
    let mut g = Generator::new(s);
    let mut labels = Vec::new();
    while let Some(e) = g.next_event() {
        match e {
            InputEvent::Prediction(p) => {
                let r = a.observe_prediction(&p);
                labels.push((p.timestamp, r));
            }
            InputEvent::GroundTruth(_) => {}
        }
    }
    let open = a.snapshot();
    println!(
        "12 open windows, {} cells, {} events: snapshot {} bytes ({} bytes of accumulators in memory)",
        a.cell_count(),
        labels.len(),
        open.len(),
        a.approx_bytes()
    );
    assert_eq!(a.window_count(), 12);
    // Close them all and label every prediction: 12 windows being revised.
    let mut out = Emitted::default();
    a.advance(labels.last().unwrap().0 + 1, &mut out);
    for (ts, r) in labels {
        a.observe_joined(Joined::Matched {
            payload: r,
            prediction_ts: ts,
            label: Arc::new(Label {
                actual_label: Some(if ts % 5 == 0 { "1" } else { "0" }.into()),
                actual_value: None,
                timestamp: ts + 1000,
            }),
        });
    }
    let closed = a.snapshot();
    println!(
        "the same 12 windows closed and labeled: snapshot {} bytes",
        closed.len()
    );
    assert!(open.len() < 8 << 20);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Any stream, any snapshot point: the restored aggregator emits the same.
    #[test]
    fn restore_anywhere_in_a_random_stream(
        seed in any::<u64>(),
        count in 5u64..120,
        split in 0.0f64..1.0,
        numeric in 0usize..4,
        categorical in 0usize..3,
    ) {
        let evs = events(Scenario {
            seed,
            count,
            events_per_second: 1.0,
            numeric_features: numeric,
            categorical_features: categorical,
            drift: DriftScenario::Gradual,
            label_delay_ms: (0, 90 * SECOND),
            regression_model: (seed % 2 == 0).then(|| "reg".to_owned()),
            ..Default::default()
        });
        let stream = record(
            config(vec![10 * SECOND, 30 * SECOND], 1 + (seed % 30) as usize, 1 + (seed % 20) as usize),
            &evs,
            1 + (seed % 7) as usize,
            Some(evs.len() / 3),
        );
        let at = (split * stream.ops.len() as f64) as usize;
        check_restores(&stream, &[at]);
    }
}

#[test]
fn stored_references_are_installed_only_where_the_snapshot_lacks_them() {
    let cfg = || config(vec![20 * SECOND], 50, 10);
    let mut a = Aggregator::new(cfg());
    let mut other = ReferenceBuilder::new(&DriftConfig::default());
    for e in events(Scenario {
        count: 60,
        ..scenario()
    }) {
        if let InputEvent::Prediction(p) = e {
            if p.model_version == "v2" {
                other.observe(&p);
            }
            a.observe_prediction(&p);
        }
    }
    let mut out = Emitted::default();
    a.advance(i64::MIN, &mut out);
    let built = out
        .references
        .iter()
        .find(|(m, v, _)| (&**m, &**v) == ("fraud-detector", "v1"))
        .map(|(_, _, p)| (**p).clone())
        .expect("v1 built its reference");
    // The first model beyond the three of the scenario saw two events: it is
    // still building its reference.
    let mut partial = ReferenceBuilder::new(&DriftConfig::default());
    partial.observe(&PredictionEvent::default());
    let partial = partial.build();
    let b = Aggregator::restore(cfg(), &a.snapshot()).unwrap();
    assert!(!b.needs_reference("fraud-detector", "v1", &built));
    assert!(b.needs_reference("fraud-detector", "v1", &other.build()));
    assert!(b.needs_reference("fraud-detector", "v9", &built));
    assert!(b.has_reference("mc", "1") && !b.has_reference("extra-1", "v1"));
    assert!(!b.needs_reference("extra-1", "v1", &partial));
}
