//! Stream-level tests: the statistics that need ordered input or state across
//! windows (change detectors, label drift), driven through the real
//! [`Aggregator`] path: predictions, join results, watermarks, rows.

use std::sync::Arc;

use super::aggregator::{Aggregator, AggregatorConfig, Emitted, WindowRow};
use super::{DriftConfig, Task};
use crate::join::Joined;
use crate::model::{Entries, FeatureValue, Label, PredictionEvent};

const MINUTE: i64 = 60_000;

fn aggregator(drift: DriftConfig) -> Aggregator {
    Aggregator::new(AggregatorConfig {
        window_sizes_ms: vec![10 * MINUTE],
        label_horizon_ms: 60 * MINUTE,
        revision_interval_ms: MINUTE,
        drift,
        reference_size: 100,
        max_segment_values: 10,
        max_models: 10,
        max_versions_per_model: 10,
        max_segment_keys: 32,
        tasks: Default::default(),
    })
}

/// A binary prediction at `ts` with score `score`, segment `country=xx`.
fn prediction(ts: i64, score: f64) -> PredictionEvent {
    PredictionEvent {
        request_id: format!("r{ts}"),
        model_id: "m".into(),
        model_version: "v1".into(),
        timestamp: ts,
        features: Entries(vec![("x".into(), FeatureValue::Double(score))]),
        score: Some(score),
        segments: Entries(vec![("country".into(), "xx".into())]),
        ..Default::default()
    }
}

/// Predicts, then immediately labels, every `(ts, score, actual)`.
fn feed(agg: &mut Aggregator, events: &[(i64, f64, &str)]) {
    for &(ts, score, actual) in events {
        let rec = agg.observe_prediction(&prediction(ts, score));
        agg.observe_joined(Joined::Matched {
            payload: rec,
            prediction_ts: ts,
            label: Arc::new(Label {
                actual_label: Some(actual.into()),
                actual_value: None,
                timestamp: ts + 1000,
            }),
        });
    }
}

/// The latest revision of `metric` / `feature` / segment of the window at `start`.
fn latest<'a>(
    rows: &'a [WindowRow],
    start: i64,
    segment: &str,
    metric: &str,
    feature: &str,
) -> Option<&'a WindowRow> {
    rows.iter()
        .filter(|r| {
            r.window_start_ms == start
                && &*r.segment == segment
                && r.value.metric == metric
                && r.value.feature == feature
        })
        .max_by_key(|r| r.revision)
}

#[test]
fn detectors_count_detections_in_the_prediction_window_of_the_all_traffic_cell() {
    let mut agg = aggregator(DriftConfig::default());
    // Window 0: 600 correct predictions bar every 20th; window 1: all wrong.
    let w0: Vec<(i64, f64, &str)> = (0..600)
        .map(|i| {
            let wrong = i % 20 == 0;
            (i * 1000, 0.9, if wrong { "0" } else { "1" })
        })
        .collect();
    let w1: Vec<(i64, f64, &str)> = (0..300)
        .map(|i| (10 * MINUTE + i * 1000, 0.9, "0"))
        .collect();
    feed(&mut agg, &w0);
    feed(&mut agg, &w1);
    let mut out = Emitted::default();
    agg.advance(20 * MINUTE, &mut out);
    // Both windows closed, neither final (60 min horizon): no detection yet.
    assert!(latest(&out.rows, 0, "", "accuracy", "").is_some());
    assert!(out.rows.iter().all(|r| r.value.metric != "adwin_drift"));
    agg.advance(80 * MINUTE, &mut out);
    let get = |start, segment, metric| {
        latest(&out.rows, start, segment, metric, "").map(|r| (r.value.value, r.value.samples))
    };
    assert_eq!(get(0, "", "adwin_drift"), Some((0.0, 600)));
    assert_eq!(get(0, "", "page_hinkley_drift"), Some((0.0, 600)));
    let (adwin, n) = get(10 * MINUTE, "", "adwin_drift").expect("adwin row");
    let (ph, _) = get(10 * MINUTE, "", "page_hinkley_drift").expect("page-hinkley row");
    assert_eq!(n, 300);
    assert!(adwin >= 1.0, "{adwin}");
    assert!(ph >= 1.0, "{ph}");
    // per version, not per segment: no rows for the segment cell
    assert_eq!(get(10 * MINUTE, "country=xx", "adwin_drift"), None);
    assert!(get(10 * MINUTE, "country=xx", "accuracy").is_some());
}

#[test]
fn task_is_binary_for_the_stream_tests() {
    // The helpers above rely on score-based task inference.
    assert!(matches!(
        Task::infer(&prediction(0, 0.5)),
        Some(Task::Binary { .. })
    ));
}

#[test]
fn label_drift_compares_later_labels_with_the_first_ones() {
    let mut agg = aggregator(DriftConfig {
        label_reference_size: 200,
        ..Default::default()
    });
    // Window 0: 300 labels, 20 % positive (the first 200 are the reference);
    // window 1: 300 labels, 70 % positive.
    let w0: Vec<(i64, f64, &str)> = (0..300)
        .map(|i| (i * 1000, 0.3, if i % 5 == 0 { "1" } else { "0" }))
        .collect();
    let w1: Vec<(i64, f64, &str)> = (0..300)
        .map(|i| {
            (
                10 * MINUTE + i * 1000,
                0.3,
                if i % 10 < 7 { "1" } else { "0" },
            )
        })
        .collect();
    feed(&mut agg, &w0);
    feed(&mut agg, &w1);
    let mut out = Emitted::default();
    agg.advance(20 * MINUTE, &mut out);
    // The reference comes from final windows: none yet (60 min horizon).
    assert!(out.rows.iter().all(|r| r.value.feature != "__label__"));
    agg.advance(80 * MINUTE, &mut out);
    let get = |start, segment, metric| {
        latest(&out.rows, start, segment, metric, "__label__")
            .map(|r| (r.value.value, r.value.samples))
    };
    // Window 0's first 200 labels (by prediction time) are the reference;
    // its drift rows compare all 300 with it: stable.
    assert_eq!(get(0, "", "drift_detected"), Some((0.0, 300)));
    assert_eq!(get(0, "", "psi").map(|v| v.0 < 1e-6), Some(true));
    assert_eq!(get(10 * MINUTE, "", "drift_detected"), Some((1.0, 300)));
    assert!(get(10 * MINUTE, "", "psi").expect("psi").0 > 0.5);
    // per segment too
    assert_eq!(
        get(10 * MINUTE, "country=xx", "drift_detected"),
        Some((1.0, 300))
    );
}

/// Label drift and the change detectors do not depend on the order in which
/// labels arrive (issue #17: a replay after a crash, or partitions
/// interleaved differently, must write the same rows): the same labeled
/// predictions fed in three orders give the same rows, bit for bit.
#[test]
fn detectors_and_label_drift_do_not_depend_on_label_arrival_order() {
    let drift = DriftConfig {
        label_reference_size: 250,
        ..Default::default()
    };
    // Three windows of 300; within each, the first half is mostly right
    // and mostly negative, the second mostly wrong and positive: the
    // detections and the first 250 labels depend on the order of feeding.
    let events: Vec<(i64, f64, &str)> = (0..900)
        .map(|i| {
            let ts = i * 2000;
            let late_half = i % 300 >= 150;
            let actual = if late_half { i % 4 != 0 } else { i % 10 == 0 };
            let right = if late_half { i % 3 == 0 } else { i % 25 != 0 };
            let score = if actual == right { 0.9 } else { 0.1 };
            (ts, score, if actual { "1" } else { "0" })
        })
        .collect();
    let run = |order: &[usize]| -> Vec<String> {
        let mut agg = aggregator(drift.clone());
        // Every prediction first (as the watermark needs), labels in `order`.
        let records: Vec<_> = events
            .iter()
            .map(|&(ts, score, _)| agg.observe_prediction(&prediction(ts, score)))
            .collect();
        let mut records: Vec<Option<_>> = records.into_iter().map(Some).collect();
        let mut out = Emitted::default();
        for (n, &i) in order.iter().enumerate() {
            let (ts, _, actual) = events[i];
            agg.observe_joined(Joined::Matched {
                payload: records[i].take().expect("each label once"),
                prediction_ts: ts,
                label: Arc::new(Label {
                    actual_label: Some(actual.into()),
                    actual_value: None,
                    timestamp: ts + 1000,
                }),
            });
            if n % 97 == 0 {
                // Revisions at different points of each order.
                agg.advance(ts, &mut out);
            }
        }
        agg.advance(200 * MINUTE, &mut out);
        let mut rows: Vec<String> = out
            .rows
            .iter()
            .filter(|r| {
                ["adwin_drift", "page_hinkley_drift"].contains(&r.value.metric)
                    || r.value.feature == "__label__"
            })
            .map(|r| {
                format!(
                    "{} {} {} {} {:?} {} {:?} {}",
                    r.window_start_ms,
                    r.segment,
                    r.value.metric,
                    r.value.feature,
                    r.value.value.to_bits(),
                    r.value.samples,
                    r.value.p_value.map(f64::to_bits),
                    r.revision
                )
            })
            .collect();
        rows.sort();
        rows.dedup();
        // The last write of each row (highest revision) is what FINAL reads.
        let mut last: std::collections::BTreeMap<String, String> = Default::default();
        for r in rows {
            let key: String = r.split(' ').take(4).collect::<Vec<_>>().join(" ");
            last.insert(key, r);
        }
        last.into_values().collect()
    };
    let arrival: Vec<usize> = (0..events.len()).collect();
    let reversed: Vec<usize> = arrival.iter().rev().copied().collect();
    // Two partitions read one after the other.
    let interleaved: Vec<usize> = arrival
        .iter()
        .filter(|i| *i % 2 == 1)
        .chain(arrival.iter().filter(|i| *i % 2 == 0))
        .copied()
        .collect();
    let want = run(&arrival);
    assert!(
        want.iter().any(|r| r.contains("adwin_drift")),
        "detector rows: {want:?}"
    );
    assert!(
        want.iter().any(|r| r.contains("__label__")),
        "label drift rows: {want:?}"
    );
    assert_eq!(run(&reversed), want);
    assert_eq!(run(&interleaved), want);
}
