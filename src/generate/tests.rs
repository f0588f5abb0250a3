//! Tests of the simulation (statistical properties on seeded streams) and of
//! [`produce`] against rdkafka's in-process mock cluster.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::*;

/// A quick scenario: single version unless a test says otherwise, no segments noise.
fn scenario(count: u64) -> Scenario {
    Scenario {
        count,
        events_per_second: 50.0,
        label_delay_ms: (1_000, 60_000),
        ..Scenario::default()
    }
}

fn predictions(events: &[InputEvent]) -> impl Iterator<Item = &PredictionEvent> {
    events.iter().filter_map(|e| match e {
        InputEvent::Prediction(p) => Some(p),
        InputEvent::GroundTruth(_) => None,
    })
}

fn labels(events: &[InputEvent]) -> impl Iterator<Item = &GroundTruthEvent> {
    events.iter().filter_map(|e| match e {
        InputEvent::GroundTruth(g) => Some(g),
        InputEvent::Prediction(_) => None,
    })
}

fn timestamp(e: &InputEvent) -> i64 {
    match e {
        InputEvent::Prediction(p) => p.timestamp,
        InputEvent::GroundTruth(g) => g.timestamp,
    }
}

/// Mean and standard deviation of a feature over the predictions of one version
/// whose request index is in `range` (nulls skipped).
fn feature_stats(
    events: &[InputEvent],
    version: &str,
    feature: &str,
    range: std::ops::Range<u64>,
    seed: u64,
) -> (f64, f64) {
    let values: Vec<f64> = predictions(events)
        .filter(|p| p.model_version == version)
        .filter(|p| range.contains(&request_index(&p.request_id, seed)))
        .filter_map(|p| p.features.get(feature).and_then(FeatureValue::as_f64))
        .collect();
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

fn request_index(id: &str, seed: u64) -> u64 {
    id.strip_prefix(&format!("req-{seed}-"))
        .and_then(|n| n.parse().ok())
        .expect("request ids have the form req-<seed>-<n>")
}

/// Accuracy of `version` (score >= 0.5) over labeled requests in `range`.
fn accuracy(events: &[InputEvent], version: &str, range: std::ops::Range<u64>, seed: u64) -> f64 {
    let truth: HashMap<&str, &str> = labels(events)
        .filter_map(|g| Some((g.request_id.as_str(), g.actual_label.as_deref()?)))
        .collect();
    let (mut right, mut total) = (0u64, 0u64);
    for p in predictions(events).filter(|p| p.model_version == version) {
        if !range.contains(&request_index(&p.request_id, seed)) {
            continue;
        }
        let (Some(score), Some(actual)) = (p.score, truth.get(p.request_id.as_str())) else {
            continue;
        };
        let predicted = if score >= 0.5 { "1" } else { "0" };
        assert_eq!(p.predicted_label.as_deref(), Some(predicted));
        total += 1;
        right += u64::from(predicted == *actual);
    }
    right as f64 / total as f64
}

#[test]
fn same_seed_gives_the_same_events_and_another_seed_does_not() {
    let s = scenario(2_000);
    let a: Vec<InputEvent> = Generator::new(s.clone()).collect();
    let b: Vec<InputEvent> = Generator::new(s.clone()).collect();
    assert_eq!(a, b);
    let c: Vec<InputEvent> = Generator::new(Scenario { seed: 7, ..s }).collect();
    assert_ne!(a.len(), 0);
    assert_ne!(predictions(&a).next(), predictions(&c).next());
}

#[test]
fn events_are_in_event_time_order_and_labels_follow_their_predictions() {
    let s = Scenario {
        regression_model: Some("loss-amount".to_owned()),
        ..scenario(5_000)
    };
    let start = s.start_ms;
    let events: Vec<InputEvent> = Generator::new(s).collect();
    assert!(events
        .windows(2)
        .all(|w| timestamp(&w[0]) <= timestamp(&w[1])));
    assert_eq!(timestamp(&events[0]), start);

    let mut predicted_at: HashMap<&str, i64> = HashMap::new();
    for e in &events {
        match e {
            InputEvent::Prediction(p) => {
                predicted_at.entry(&p.request_id).or_insert(p.timestamp);
            }
            InputEvent::GroundTruth(g) => {
                let at = predicted_at
                    .get(g.request_id.as_str())
                    .expect("a label comes after its prediction");
                let delay = g.timestamp - at;
                assert!((1_000..=60_000).contains(&delay), "delay {delay}");
                assert!(matches!(g.actual_label.as_deref(), Some("0" | "1")));
                assert!(g.actual_value.is_some_and(f64::is_finite));
            }
        }
    }
    assert_eq!(predicted_at.len(), 5_000);
    // 2 classifier versions + 1 regression model per request.
    assert_eq!(predictions(&events).count(), 15_000);
}

#[test]
fn label_fraction_is_respected() {
    for fraction in [0.9, 0.3] {
        let s = Scenario {
            label_fraction: fraction,
            ..scenario(10_000)
        };
        let events: Vec<InputEvent> = Generator::new(s).collect();
        let n = labels(&events).count() as f64;
        let ids: HashSet<&str> = labels(&events).map(|g| g.request_id.as_str()).collect();
        assert_eq!(ids.len() as f64, n, "one label per request");
        assert!((n / 10_000.0 - fraction).abs() < 0.02, "{n} labels");
    }
}

#[test]
fn versions_score_the_same_requests_with_the_same_features_and_time() {
    let s = Scenario {
        regression_model: Some("loss-amount".to_owned()),
        ..scenario(1_000)
    };
    let events: Vec<InputEvent> = Generator::new(s).collect();
    let mut by_request: BTreeMap<&str, Vec<&PredictionEvent>> = BTreeMap::new();
    for p in predictions(&events) {
        by_request.entry(&p.request_id).or_default().push(p);
    }
    assert_eq!(by_request.len(), 1_000);
    for ps in by_request.values() {
        let kinds: Vec<(&str, &str)> = ps
            .iter()
            .map(|p| (p.model_id.as_str(), p.model_version.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("fraud-detector", "v1"),
                ("fraud-detector", "v2"),
                ("loss-amount", "v1")
            ]
        );
        assert!(ps.iter().all(|p| p.timestamp == ps[0].timestamp));
        assert!(ps.iter().all(|p| p.features == ps[0].features));
        assert!(ps.iter().all(|p| p.segments == ps[0].segments));
        assert_eq!(ps[0].features.len(), 25);
        assert!(ps[2].predicted_value.is_some() && ps[2].score.is_none());
        assert!(ps[..2]
            .iter()
            .all(|p| p.score.is_some_and(|s| (0.0..=1.0).contains(&s))));
    }
}

#[test]
fn features_have_realistic_types_missing_values_and_latency() {
    let events: Vec<InputEvent> = Generator::new(scenario(5_000)).collect();
    let ps: Vec<&PredictionEvent> = predictions(&events)
        .filter(|p| p.model_version == "v1")
        .collect();
    let first = &ps[0];
    assert!(matches!(
        first.features.get("num_01"),
        Some(FeatureValue::Long(_) | FeatureValue::Null)
    ));
    fn values<'a>(
        ps: &'a [&'a PredictionEvent],
        name: &'a str,
    ) -> impl Iterator<Item = &'a FeatureValue> + 'a {
        ps.iter().filter_map(move |p| p.features.get(name))
    }
    let nulls = ps
        .iter()
        .flat_map(|p| p.features.iter())
        .filter(|(_, v)| v.is_null())
        .count() as f64;
    let rate = nulls / (ps.len() * 25) as f64;
    assert!((0.007..0.013).contains(&rate), "missing rate {rate}");
    assert!(values(&ps, "num_00").all(|v| v.is_null() || v.as_f64().is_some_and(|x| x > 0.0)));
    assert!(values(&ps, "flag_4").all(|v| matches!(v, FeatureValue::Bool(_) | FeatureValue::Null)));
    let levels: HashSet<String> = values(&ps, "cat_1")
        .filter_map(|v| match v {
            FeatureValue::String(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(levels.len(), 4);
    let mut latencies: Vec<f64> = ps.iter().filter_map(|p| p.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let median = latencies[latencies.len() / 2];
    assert!((8.0..12.0).contains(&median), "median latency {median}");
    let countries: HashSet<&str> = ps
        .iter()
        .filter_map(|p| p.segments.get("country").map(String::as_str))
        .collect();
    assert_eq!(countries.len(), 4);
    let positives = labels(&events)
        .filter(|g| g.actual_label.as_deref() == Some("1"))
        .count() as f64
        / labels(&events).count() as f64;
    assert!(
        (0.17..0.23).contains(&positives),
        "positive rate {positives}"
    );
}

#[test]
fn stationary_without_drift() {
    let s = Scenario {
        versions: vec!["v1".to_owned()],
        ..scenario(20_000)
    };
    let seed = s.seed;
    let events: Vec<InputEvent> = Generator::new(s).collect();
    for i in 0..20 {
        let name = numeric_name(i);
        let (m1, sd1) = feature_stats(&events, "v1", &name, 0..10_000, seed);
        let (m2, _) = feature_stats(&events, "v1", &name, 10_000..20_000, seed);
        // ~4.5 standard errors of a difference of two means of 10,000 values.
        assert!(
            (m1 - m2).abs() < 0.065 * sd1,
            "{name}: {m1} vs {m2} (sd {sd1})"
        );
    }
    let share = |range: std::ops::Range<u64>| {
        let (a, n) = predictions(&events)
            .filter(|p| range.contains(&request_index(&p.request_id, seed)))
            .filter_map(|p| p.features.get("cat_0"))
            .fold((0, 0), |(a, n), v| {
                (a + u32::from(*v == FeatureValue::String("A".into())), n + 1)
            });
        f64::from(a) / f64::from(n)
    };
    assert!((share(0..10_000) - share(10_000..20_000)).abs() < 0.03);
}

#[test]
fn sudden_drift_shifts_the_chosen_features_by_shift_sd() {
    for shift_sd in [1.0, 0.5] {
        let s = Scenario {
            versions: vec!["v1".to_owned()],
            drift: DriftScenario::Sudden,
            shift_sd,
            ..scenario(20_000)
        };
        let seed = s.seed;
        assert_eq!(
            s.drifted_feature_names(),
            ["num_00", "num_01", "num_02", "num_03", "num_04", "cat_0"]
        );
        let events: Vec<InputEvent> = Generator::new(s).collect();
        for i in 0..20 {
            let name = numeric_name(i);
            let (m1, sd1) = feature_stats(&events, "v1", &name, 0..10_000, seed);
            let (m2, _) = feature_stats(&events, "v1", &name, 10_000..20_000, seed);
            let shift = (m2 - m1) / sd1;
            let expected = if i < 5 { shift_sd } else { 0.0 };
            assert!(
                (shift - expected).abs() < 0.07,
                "{name}: shift {shift} sd, expected {expected}"
            );
        }
        let new_level = predictions(&events)
            .filter(|p| request_index(&p.request_id, seed) >= 10_000)
            .filter(|p| p.features.get("cat_0") == Some(&FeatureValue::String("NEW".into())))
            .count();
        let before = predictions(&events)
            .filter(|p| request_index(&p.request_id, seed) < 10_000)
            .filter(|p| p.features.get("cat_0") == Some(&FeatureValue::String("NEW".into())))
            .count();
        assert_eq!(before, 0);
        assert!(new_level > 500, "{new_level} new categories after drift");
    }
}

#[test]
fn gradual_drift_ramps_up() {
    let s = Scenario {
        versions: vec!["v1".to_owned()],
        drift: DriftScenario::Gradual,
        drift_at: 0.5,
        ..scenario(40_000)
    };
    let seed = s.seed;
    let events: Vec<InputEvent> = Generator::new(s).collect();
    let (m0, sd0) = feature_stats(&events, "v1", "num_02", 0..20_000, seed);
    let (m_early, _) = feature_stats(&events, "v1", "num_02", 20_000..22_000, seed);
    let (m_late, _) = feature_stats(&events, "v1", "num_02", 38_000..40_000, seed);
    assert!(((m_early - m0) / sd0).abs() < 0.15);
    assert!(((m_late - m0) / sd0 - 0.95).abs() < 0.1);
}

#[test]
fn accuracy_drops_by_at_least_ten_points_after_drift_at() {
    let s = Scenario {
        drift: DriftScenario::Sudden,
        accuracy_drop: true,
        label_fraction: 1.0,
        ..scenario(20_000)
    };
    let seed = s.seed;
    let events: Vec<InputEvent> = Generator::new(s).collect();
    let v1_before = accuracy(&events, "v1", 0..10_000, seed);
    let v1_after = accuracy(&events, "v1", 10_000..20_000, seed);
    let v2_before = accuracy(&events, "v2", 0..10_000, seed);
    let v2_after = accuracy(&events, "v2", 10_000..20_000, seed);
    assert!((0.87..0.93).contains(&v1_before), "v1 before {v1_before}");
    assert!(v2_before > v1_before, "v2 {v2_before} vs v1 {v1_before}");
    assert!(v1_before - v1_after >= 0.10, "v1 {v1_before} -> {v1_after}");
    assert!(v2_before - v2_after >= 0.10, "v2 {v2_before} -> {v2_after}");
}

#[test]
fn accuracy_drop_scales_with_its_share_and_degrades_the_regression_model() {
    let s = Scenario {
        versions: vec!["v1".to_owned()],
        accuracy_drop: true,
        accuracy_drop_share: 0.25,
        label_fraction: 1.0,
        regression_model: Some("loss-amount".to_owned()),
        ..scenario(40_000)
    };
    let seed = s.seed;
    let events: Vec<InputEvent> = Generator::new(s).collect();
    let before = accuracy(&events, "v1", 0..20_000, seed);
    let after = accuracy(&events, "v1", 20_000..40_000, seed);
    // About 0.21 * share: a 5-point drop.
    assert!(
        (before - after - 0.0525).abs() < 0.02,
        "{before} -> {after}"
    );

    let truth: HashMap<&str, f64> = labels(&events)
        .filter_map(|g| Some((g.request_id.as_str(), g.actual_value?)))
        .collect();
    let mae = |range: std::ops::Range<u64>| {
        let errors: Vec<f64> = predictions(&events)
            .filter(|p| p.model_id == "loss-amount")
            .filter(|p| range.contains(&request_index(&p.request_id, seed)))
            .filter_map(|p| Some((p.predicted_value? - truth.get(p.request_id.as_str())?).abs()))
            .collect();
        errors.iter().sum::<f64>() / errors.len() as f64
    };
    let (mae_before, mae_after) = (mae(0..20_000), mae(20_000..40_000));
    // |N(0, 5^2 + 6^2)| has mean sqrt(61 * 2 / pi) = 6.23.
    assert!((mae_before - 6.23).abs() < 0.2, "mae before {mae_before}");
    assert!(
        mae_after > mae_before * 1.3,
        "mae {mae_before} -> {mae_after}"
    );
}

#[test]
fn drift_without_accuracy_drop_keeps_accuracy() {
    let s = Scenario {
        versions: vec!["v1".to_owned()],
        drift: DriftScenario::Sudden,
        label_fraction: 1.0,
        ..scenario(20_000)
    };
    let seed = s.seed;
    let events: Vec<InputEvent> = Generator::new(s).collect();
    let before = accuracy(&events, "v1", 0..10_000, seed);
    let after = accuracy(&events, "v1", 10_000..20_000, seed);
    assert!((before - after).abs() < 0.02, "{before} vs {after}");
}

#[test]
fn drift_scenario_parses_cli_names() {
    assert_eq!("none".parse(), Ok(DriftScenario::None));
    assert_eq!("Sudden".parse(), Ok(DriftScenario::Sudden));
    assert_eq!("gradual".parse(), Ok(DriftScenario::Gradual));
    assert!("sideways".parse::<DriftScenario>().is_err());
    assert_eq!(DriftScenario::Gradual.to_string(), "gradual");
}

#[test]
fn invalid_scenarios_are_rejected_by_validate_and_clamped_by_new() {
    let bad = Scenario {
        events_per_second: 0.0,
        label_fraction: 1.5,
        label_delay_ms: (10, 5),
        versions: vec![],
        ..scenario(10)
    };
    let e = bad.validate().unwrap_err();
    assert_eq!(e.field, "events_per_second");
    assert_eq!(
        Scenario {
            events_per_second: 1.0,
            ..bad.clone()
        }
        .validate()
        .unwrap_err()
        .field,
        "label_fraction"
    );
    assert!(Scenario::default().validate().is_ok());
    let events: Vec<InputEvent> = Generator::new(bad).collect();
    assert_eq!(predictions(&events).count(), 10);
    assert_eq!(labels(&events).count(), 10);
}

mod kafka {
    use std::time::{Duration, Instant};

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

    use super::*;

    const PARTITIONS: i32 = 4;

    /// Reads every message of `topic` (all partitions from the start) until
    /// `expected` arrived or a deadline passes: (partition, key, payload).
    fn read_all(brokers: &str, topic: &str, expected: usize) -> Vec<(i32, String, Vec<u8>)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "generate-test")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < expected && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.expect("message");
                out.push((
                    m.partition(),
                    String::from_utf8(m.key().unwrap_or_default().to_vec()).expect("utf-8 key"),
                    m.payload().unwrap_or_default().to_vec(),
                ));
            }
        }
        out
    }

    /// Kafka's Java `murmur2` (seed 0x9747b28c), the hash of the Java
    /// default partitioner, which `murmur2_random` reproduces.
    fn murmur2(data: &[u8]) -> u32 {
        const M: u32 = 0x5bd1_e995;
        let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
        let mut chunks = data.chunks_exact(4);
        for c in &mut chunks {
            let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            k = k.wrapping_mul(M);
            k ^= k >> 24;
            k = k.wrapping_mul(M);
            h = h.wrapping_mul(M) ^ k;
        }
        let rest = chunks.remainder();
        if rest.len() >= 3 {
            h ^= u32::from(rest[2]) << 16;
        }
        if rest.len() >= 2 {
            h ^= u32::from(rest[1]) << 8;
        }
        if !rest.is_empty() {
            h ^= u32::from(rest[0]);
            h = h.wrapping_mul(M);
        }
        h ^= h >> 13;
        h = h.wrapping_mul(M);
        h ^= h >> 15;
        h
    }

    #[test]
    fn murmur2_matches_kafka_reference_values() {
        // Values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"") as i32, 275646681);
    }

    /// Messages stored in `topic` (sum of the partitions' high watermarks).
    fn message_count(brokers: &str, topic: &str, partitions: i32) -> i64 {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("consumer");
        (0..partitions)
            .map(|p| {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
                    .expect("watermarks");
                high - low
            })
            .sum()
    }

    #[tokio::test]
    async fn produce_writes_every_event_keyed_and_co_partitioned() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic("predictions", PARTITIONS, 1)
            .expect("topic");
        cluster
            .create_topic("ground-truth", PARTITIONS, 1)
            .expect("topic");
        let brokers = cluster.bootstrap_servers();

        let s = Scenario {
            label_fraction: 0.5,
            ..scenario(500)
        };
        let expected: Vec<InputEvent> = Generator::new(s.clone()).collect();
        let n_predictions = predictions(&expected).count();
        let n_labels = labels(&expected).count();
        assert_eq!(n_predictions, 1_000);

        let opts = ProduceOptions {
            brokers: brokers.clone(),
            ..ProduceOptions::default()
        };
        let mut reported = Vec::new();
        let summary = produce(Generator::new(s), &opts, &json_encode, &mut |n| {
            reported.push(n)
        })
        .await
        .expect("produce");
        assert_eq!(summary.predictions, n_predictions as u64);
        assert_eq!(summary.labels, n_labels as u64);
        assert_eq!(reported.last(), Some(&((n_predictions + n_labels) as u64)));

        let preds = read_all(&brokers, "predictions", n_predictions);
        let gts = read_all(&brokers, "ground-truth", n_labels);
        assert_eq!(preds.len(), n_predictions);
        assert_eq!(gts.len(), n_labels);

        let mut partition_of: HashMap<String, i32> = HashMap::new();
        let mut decoded = Vec::new();
        for (partition, key, payload) in &preds {
            let p: PredictionEvent = serde_json::from_slice(payload).expect("json prediction");
            assert_eq!(&p.request_id, key);
            // Both versions of a request share its partition.
            assert_eq!(
                *partition_of.entry(key.clone()).or_insert(*partition),
                *partition
            );
            decoded.push(p);
        }
        let used: HashSet<i32> = partition_of.values().copied().collect();
        assert_eq!(
            used.len(),
            PARTITIONS as usize,
            "keys spread over all partitions"
        );
        for (partition, key, payload) in &gts {
            let g: GroundTruthEvent = serde_json::from_slice(payload).expect("json label");
            assert_eq!(&g.request_id, key);
            assert_eq!(partition_of.get(key), Some(partition), "label of {key}");
        }
        // Payloads are the generated events, byte for byte.
        let mut want: Vec<Vec<u8>> = expected
            .iter()
            .filter(|e| matches!(e, InputEvent::Prediction(_)))
            .map(json_encode)
            .collect();
        let mut got: Vec<Vec<u8>> = preds.into_iter().map(|(_, _, payload)| payload).collect();
        want.sort();
        got.sort();
        assert!(
            want == got,
            "prediction payloads differ from the generated events"
        );
        assert!(decoded.iter().all(|p| p.model_id == "fraud-detector"));
    }

    #[tokio::test]
    async fn produce_respects_the_rate_limit() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("predictions", 1, 1).expect("topic");
        cluster.create_topic("ground-truth", 1, 1).expect("topic");
        let s = Scenario {
            versions: vec!["v1".to_owned()],
            label_fraction: 0.0,
            ..scenario(100)
        };
        let opts = ProduceOptions {
            brokers: cluster.bootstrap_servers(),
            rate_limit: Some(400.0),
            ..ProduceOptions::default()
        };
        let summary = produce(Generator::new(s), &opts, &json_encode, &mut |_| {})
            .await
            .expect("produce");
        assert_eq!(summary.predictions, 100);
        // 99 gaps of 2.5 ms.
        assert!(
            summary.elapsed >= Duration::from_millis(240),
            "{:?}",
            summary.elapsed
        );
    }

    #[tokio::test]
    async fn produce_refuses_topics_with_different_partition_counts() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("predictions", 4, 1).expect("topic");
        cluster.create_topic("ground-truth", 2, 1).expect("topic");
        let opts = ProduceOptions {
            brokers: cluster.bootstrap_servers(),
            ..ProduceOptions::default()
        };
        let err = produce(
            Generator::new(scenario(5)),
            &opts,
            &json_encode,
            &mut |_| {},
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("same partition count"), "{err:#}");
        assert_eq!(message_count(&opts.brokers, "predictions", 4), 0);
    }

    #[tokio::test]
    async fn produce_reports_an_unreachable_broker() {
        let opts = ProduceOptions {
            // A closed loopback port: nothing listens on port 1.
            brokers: "127.0.0.1:1".to_owned(),
            properties: BTreeMap::from([("message.timeout.ms".to_owned(), "500".to_owned())]),
            ..ProduceOptions::default()
        };
        let err = produce(
            Generator::new(scenario(5)),
            &opts,
            &json_encode,
            &mut |_| {},
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("cannot fetch topic metadata"),
            "{err:#}"
        );
    }
}
