//! The whole service (`Service::start` + `run_until_idle`) against rdkafka's
//! `MockCluster` and a real ClickHouse server: a hand-built set of events goes
//! in through a plain rdkafka producer, `window_metrics FINAL` comes out and
//! is compared with values computed here, independently, from the same
//! events (plain arithmetic in this file, no modelwatch metrics code).
//!
//! Also home of the shared event set and its oracle ([`dataset`],
//! [`expected`]), which the end-to-end test reuses.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use modelwatch::app::{build_reference_from_file, now_ms, Service};
use modelwatch::config::Config;
use modelwatch::ingest::decode::encode_json;
use modelwatch::model::{Entries, FeatureValue, GroundTruthEvent, InputEvent, PredictionEvent};
use modelwatch::pipeline::drift_config;
use modelwatch::sinks::clickhouse::{ClickHouseSink, HistogramRow, MetricRow};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::support::clickhouse::{unique_database, ClickHouseServer};

/// Window size of every test here.
pub(crate) const WINDOW_MS: i64 = 60_000;
/// Input partitions of both topics.
pub(crate) const PARTITIONS: i32 = 3;
/// The binary classifier, which has a reference profile.
pub(crate) const CLF: &str = "clf";
/// The regression model (no reference profile).
pub(crate) const REG: &str = "reg";
/// Smoothing of binned drift statistics (src/metrics/mod.rs docs).
const SMOOTHING: f64 = 1e-4;
/// Coarse drift bins (the default `drift.bins`).
const BINS: usize = 10;

/// Which input topic a raw message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    Predictions,
    GroundTruth,
}

/// A hand-built event set.
#[derive(Debug, Clone, Default)]
pub(crate) struct Dataset {
    /// Predictions in production order (a duplicate included).
    pub predictions: Vec<PredictionEvent>,
    /// Labels in production order.
    pub labels: Vec<GroundTruthEvent>,
    /// Messages that must be dead-lettered: (topic, key, payload).
    pub malformed: Vec<(Input, String, Vec<u8>)>,
    /// Reference events of `clf` `v1`.
    pub reference: Vec<PredictionEvent>,
}

fn features(x: Option<f64>, color: Option<&str>) -> Entries<FeatureValue> {
    let mut f = vec![(
        "x".to_string(),
        x.map_or(FeatureValue::Null, FeatureValue::Double),
    )];
    if let Some(c) = color {
        f.push(("color".to_string(), FeatureValue::String(c.to_string())));
    }
    Entries(f)
}

fn country(i: i64) -> Entries<String> {
    let c = if i % 3 == 0 { "DE" } else { "US" };
    Entries(vec![("country".to_string(), c.to_string())])
}

/// A binary prediction of `clf`.
pub(crate) fn clf_prediction(id: &str, ts: i64, i: i64) -> PredictionEvent {
    let x = (i % 10 != 3).then(|| ((i * 37) % 130) as f64 - 10.0 + 0.25);
    let color = if i % 7 == 0 {
        None
    } else if i % 5 == 0 {
        Some("purple")
    } else {
        Some(["red", "green", "blue"][(i % 3) as usize])
    };
    PredictionEvent {
        request_id: id.to_string(),
        model_id: CLF.into(),
        model_version: "v1".into(),
        timestamp: ts,
        features: features(x, color),
        score: Some(((i * 29) % 100) as f64 / 100.0 + 0.005),
        segments: country(i),
        latency_ms: Some(10.0 + (i % 5) as f64),
        ..Default::default()
    }
}

/// The label of `clf` request `i`.
pub(crate) fn clf_label(id: &str, ts: i64, i: i64) -> GroundTruthEvent {
    GroundTruthEvent {
        request_id: id.to_string(),
        timestamp: ts,
        actual_label: Some(if (i * 13) % 7 < 3 { "1" } else { "0" }.into()),
        actual_value: None,
    }
}

/// The event set of the main tests; event times from `t0` (window-aligned),
/// in two windows.
pub(crate) fn dataset(t0: i64) -> Dataset {
    let mut d = Dataset::default();
    // clf: 48 requests, 32 in the first window and 16 in the second.
    for i in 0..48i64 {
        let ts = t0
            + 250
            + if i < 32 {
                i * 1500
            } else {
                WINDOW_MS + (i - 32) * 2000
            };
        let id = format!("r{i}");
        let p = clf_prediction(&id, ts, i);
        d.predictions.push(p.clone());
        if i == 5 {
            // A duplicate (same request and model): the first is kept.
            let mut dup = p;
            dup.score = Some(0.999);
            dup.features = features(Some(500.0), Some("purple"));
            d.predictions.push(dup);
        }
        if i % 4 != 1 {
            // Some labels come before their prediction (event time).
            let lts = if i % 8 == 0 { ts - 2000 } else { ts + 5000 };
            d.labels.push(clf_label(&id, lts, i));
        }
    }
    // reg: 20 requests, 14 in the first window.
    for i in 0..20i64 {
        let ts = t0
            + 100
            + if i < 14 {
                i * 3000
            } else {
                WINDOW_MS + (i - 14) * 4000
            };
        let id = format!("q{i}");
        d.predictions.push(PredictionEvent {
            request_id: id.clone(),
            model_id: REG.into(),
            model_version: "v1".into(),
            timestamp: ts,
            features: features(Some(i as f64), None),
            predicted_value: Some(i as f64 * 1.5),
            segments: country(i),
            latency_ms: Some(2.0),
            ..Default::default()
        });
        if i % 3 != 2 {
            d.labels.push(GroundTruthEvent {
                request_id: id,
                timestamp: ts + 3000,
                actual_label: None,
                actual_value: Some(i as f64 * 1.5 + ((i % 5) as f64 - 2.0) * 0.7),
            });
        }
    }
    // A label without prediction.
    d.labels.push(GroundTruthEvent {
        request_id: "orphan-1".into(),
        timestamp: t0 + 10_000,
        actual_label: Some("1".into()),
        actual_value: None,
    });
    d.malformed = vec![
        (
            Input::Predictions,
            "bad-1".into(),
            b"{\"request_id\": \"bad-1\", ".to_vec(),
        ),
        (
            Input::Predictions,
            "bad-2".into(),
            br#"{"request_id":"bad-2","model_id":"clf","model_version":"v1","timestamp":-5,"score":0.5}"#.to_vec(),
        ),
        (Input::Predictions, "bad-3".into(), vec![0x00, 0x00]),
        (
            Input::GroundTruth,
            "bad-4".into(),
            br#"{"request_id":"bad-4","timestamp":1700000000000}"#.to_vec(),
        ),
        // Dated in 2999 (issue #11): beyond limits.max_future_skew, a
        // dead letter of kind `timestamp`. Accepted, the prediction moved
        // the watermark past every other event, which were all late.
        (
            Input::Predictions,
            "bad-future-p".into(),
            br#"{"request_id":"bad-future-p","model_id":"clf","model_version":"v1","timestamp":32472144000000,"score":0.5}"#.to_vec(),
        ),
        (
            Input::GroundTruth,
            "bad-future-l".into(),
            br#"{"request_id":"r1","timestamp":32472144000000,"actual_label":"1"}"#.to_vec(),
        ),
    ];
    d.reference = reference_events(t0);
    d
}

/// 100 reference events of `clf` `v1`: `x` = 0..99, colors 50 / 30 / 20.
pub(crate) fn reference_events(t0: i64) -> Vec<PredictionEvent> {
    (0..100i64)
        .map(|i| {
            let color = if i < 50 {
                "red"
            } else if i < 80 {
                "green"
            } else {
                "blue"
            };
            PredictionEvent {
                request_id: format!("ref{i}"),
                model_id: CLF.into(),
                model_version: "v1".into(),
                timestamp: t0 - 86_400_000,
                features: features(Some(i as f64), Some(color)),
                score: Some((i as f64 + 0.5) / 100.0),
                ..Default::default()
            }
        })
        .collect()
}

/// Writes the reference events as JSON Lines to a temporary file.
pub(crate) fn reference_file(events: &[PredictionEvent]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    for e in events {
        let line = serde_json::to_string(e).expect("reference event to JSON");
        std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()).expect("write");
    }
    f
}

/// (model, segment, window start in seconds, metric, feature).
pub(crate) type Key = (String, String, u32, String, String);

pub(crate) fn key(model: &str, segment: &str, window_ms: i64, metric: &str, feature: &str) -> Key {
    (
        model.to_string(),
        segment.to_string(),
        (window_ms / 1000) as u32,
        metric.to_string(),
        feature.to_string(),
    )
}

/// numpy's default ("linear") quantile of sorted values.
fn np_quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Smoothed proportions: `(c / n + s) / (1 + k s)`.
fn smoothed(counts: &[u64]) -> Vec<f64> {
    let n: u64 = counts.iter().sum();
    let k = counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 / n as f64 + SMOOTHING) / (1.0 + k * SMOOTHING))
        .collect()
}

/// (psi, Jensen-Shannon distance base 2) of window counts against reference counts.
fn psi_js(reference: &[u64], window: &[u64]) -> (f64, f64) {
    let e = smoothed(reference);
    let a = smoothed(window);
    let psi: f64 = e.iter().zip(&a).map(|(e, a)| (a - e) * (a / e).ln()).sum();
    let js_div: f64 = e
        .iter()
        .zip(&a)
        .map(|(e, a)| {
            let m = (e + a) / 2.0;
            0.5 * (e * (e / m).ln() + a * (a / m).ln())
        })
        .sum();
    (psi, (js_div / std::f64::consts::LN_2).sqrt())
}

fn numeric(p: &PredictionEvent, name: &str) -> Option<f64> {
    match p.features.get(name) {
        Some(FeatureValue::Double(v)) => Some(*v),
        Some(FeatureValue::Long(v)) => Some(*v as f64),
        _ => None,
    }
}

fn category<'a>(p: &'a PredictionEvent, name: &str) -> Option<&'a str> {
    match p.features.get(name) {
        Some(FeatureValue::String(s)) => Some(s),
        _ => None,
    }
}

/// Drift of `x` (numeric, 10 equal-frequency bins) and `color`
/// (categorical) of `preds` against `reference`.
fn drift(
    reference: &[PredictionEvent],
    preds: &[&PredictionEvent],
) -> Vec<(&'static str, f64, f64)> {
    let mut out = Vec::new();
    let mut sorted: Vec<f64> = reference.iter().filter_map(|p| numeric(p, "x")).collect();
    sorted.sort_by(f64::total_cmp);
    let mut cuts: Vec<f64> = (1..BINS)
        .map(|i| np_quantile(&sorted, i as f64 / BINS as f64))
        .collect();
    cuts.dedup();
    let bin = |v: f64| cuts.iter().filter(|&&c| c <= v).count();
    let mut r = vec![0u64; cuts.len() + 1];
    for &v in &sorted {
        r[bin(v)] += 1;
    }
    let mut w = vec![0u64; cuts.len() + 1];
    for p in preds {
        if let Some(v) = numeric(p, "x") {
            w[bin(v)] += 1;
        }
    }
    if w.iter().sum::<u64>() > 0 {
        let (psi, js) = psi_js(&r, &w);
        out.push(("x", psi, js));
    }
    let mut cats: Vec<&str> = reference
        .iter()
        .filter_map(|p| category(p, "color"))
        .collect();
    cats.sort_unstable();
    cats.dedup();
    let cbin = |c: &str| cats.iter().position(|&k| k == c).unwrap_or(cats.len());
    let mut r = vec![0u64; cats.len() + 1];
    for p in reference {
        if let Some(c) = category(p, "color") {
            r[cbin(c)] += 1;
        }
    }
    let mut w = vec![0u64; cats.len() + 1];
    for p in preds {
        if let Some(c) = category(p, "color") {
            w[cbin(c)] += 1;
        }
    }
    if w.iter().sum::<u64>() > 0 {
        let (psi, js) = psi_js(&r, &w);
        out.push(("color", psi, js));
    }
    out
}

/// What `window_metrics FINAL` must hold, computed from the events alone.
/// `expired`: unlabeled predictions have passed their label horizon.
/// Returns exact values and values within 1 % (hdrhistogram percentiles).
pub(crate) fn expected(d: &Dataset, expired: bool) -> (BTreeMap<Key, f64>, BTreeMap<Key, f64>) {
    let mut exact = BTreeMap::new();
    let mut approx = BTreeMap::new();
    let win = |ts: i64| ts.div_euclid(WINDOW_MS) * WINDOW_MS;
    // The first prediction of a (request, model) is kept; the others are duplicates.
    let mut seen = HashSet::new();
    let mut kept: Vec<&PredictionEvent> = Vec::new();
    let mut duplicates: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for p in &d.predictions {
        if seen.insert((p.request_id.clone(), p.model_id.clone())) {
            kept.push(p);
        } else {
            *duplicates
                .entry((p.model_id.clone(), win(p.timestamp)))
                .or_default() += 1;
        }
    }
    let mut labels: HashMap<&str, &GroundTruthEvent> = HashMap::new();
    for l in &d.labels {
        labels.entry(l.request_id.as_str()).or_insert(l);
    }
    let mut groups: BTreeMap<(String, String, i64), Vec<&PredictionEvent>> = BTreeMap::new();
    for p in &kept {
        let mut segments = vec![String::new()];
        segments.extend(p.segments.iter().map(|(k, v)| format!("{k}={v}")));
        for s in segments {
            groups
                .entry((p.model_id.clone(), s, win(p.timestamp)))
                .or_default()
                .push(p);
        }
    }
    let mut windows = HashSet::new();
    for ((model, seg, w), preds) in &groups {
        windows.insert(*w);
        let mut put = |metric: &str, feature: &str, v: f64| {
            exact.insert(key(model, seg, *w, metric, feature), v);
        };
        let n = preds.len() as f64;
        let labeled: Vec<(&PredictionEvent, &GroundTruthEvent)> = preds
            .iter()
            .filter_map(|p| labels.get(p.request_id.as_str()).map(|l| (*p, *l)))
            .collect();
        put("prediction_count", "", n);
        put("label_count", "", labeled.len() as f64);
        put("label_coverage", "", labeled.len() as f64 / n);
        put(
            "unlabeled_count",
            "",
            if expired {
                n - labeled.len() as f64
            } else {
                0.0
            },
        );
        if seg.is_empty() {
            let dups = duplicates.get(&(model.clone(), *w)).copied().unwrap_or(0);
            put("duplicate_count", "", dups as f64);
        }
        if model == CLF {
            let (mut tp, mut fp, mut tn, mut fn_) = (0.0, 0.0, 0.0, 0.0);
            for (p, l) in &labeled {
                let actual = l.actual_label.as_deref() == Some("1");
                let predicted = p.score.unwrap_or(0.0) >= 0.5;
                match (predicted, actual) {
                    (true, true) => tp += 1.0,
                    (true, false) => fp += 1.0,
                    (false, false) => tn += 1.0,
                    (false, true) => fn_ += 1.0,
                }
            }
            let total: f64 = tp + fp + tn + fn_;
            if total > 0.0 {
                put("accuracy", "", (tp + tn) / total);
            }
            if tp + fp > 0.0 {
                put("precision", "", tp / (tp + fp));
            }
            if tp + fn_ > 0.0 {
                put("recall", "", tp / (tp + fn_));
            }
            if 2.0 * tp + fp + fn_ > 0.0 {
                put("f1", "", 2.0 * tp / (2.0 * tp + fp + fn_));
            }
            if fp + tn > 0.0 {
                put("fpr", "", fp / (fp + tn));
            }
            if !d.reference.is_empty() {
                for feature in ["x", "color"] {
                    let missing = preds
                        .iter()
                        .filter(|p| {
                            matches!(p.features.get(feature), None | Some(FeatureValue::Null))
                        })
                        .count();
                    put("missing_rate", feature, missing as f64 / n);
                }
                for (feature, psi, js) in drift(&d.reference, preds) {
                    put("psi", feature, psi);
                    put("js_distance", feature, js);
                }
            }
        }
        if model == REG && !labeled.is_empty() {
            let pairs: Vec<(f64, f64)> = labeled
                .iter()
                .filter_map(|(p, l)| Some((p.predicted_value?, l.actual_value?)))
                .collect();
            let m = pairs.len() as f64;
            let sse: f64 = pairs.iter().map(|(p, a)| (p - a) * (p - a)).sum();
            let mean = pairs.iter().map(|(_, a)| a).sum::<f64>() / m;
            let sst: f64 = pairs.iter().map(|(_, a)| (a - mean) * (a - mean)).sum();
            put(
                "mae",
                "",
                pairs.iter().map(|(p, a)| (p - a).abs()).sum::<f64>() / m,
            );
            put("rmse", "", (sse / m).sqrt());
            let r2 = if sst > 0.0 {
                1.0 - sse / sst
            } else if sse == 0.0 {
                1.0
            } else {
                0.0
            };
            put("r2", "", r2);
        }
        // hdrhistogram: the value at rank ceil(q n), within its precision.
        let mut lat: Vec<f64> = preds.iter().filter_map(|p| p.latency_ms).collect();
        lat.sort_by(f64::total_cmp);
        if !lat.is_empty() {
            let rank = ((0.5 * lat.len() as f64).ceil() as usize).max(1);
            approx.insert(key(model, seg, *w, "latency_p50", ""), lat[rank - 1]);
        }
    }
    // Orphan labels: in the window of their own time, one row per window.
    let predicted: HashSet<&str> = d
        .predictions
        .iter()
        .map(|p| p.request_id.as_str())
        .collect();
    let mut orphans: BTreeMap<i64, u64> = windows.iter().map(|&w| (w, 0)).collect();
    for l in labels.values() {
        if !predicted.contains(l.request_id.as_str()) {
            *orphans.entry(win(l.timestamp)).or_default() += 1;
        }
    }
    for (w, n) in orphans {
        exact.insert(key("", "", w, "orphan_label_count", ""), n as f64);
    }
    (exact, approx)
}

/// Every row of `window_metrics FINAL`, by key.
pub(crate) async fn read_final(sink: &ClickHouseSink) -> BTreeMap<Key, MetricRow> {
    let rows: Vec<MetricRow> = sink
        .client()
        .query("SELECT ?fields FROM window_metrics FINAL")
        .fetch_all()
        .await
        .expect("read window_metrics FINAL");
    let mut out = BTreeMap::new();
    for r in rows {
        assert_eq!(r.window_seconds, (WINDOW_MS / 1000) as u32, "{r:?}");
        let k = (
            r.model_id.clone(),
            r.segment.clone(),
            r.window_start,
            r.metric.clone(),
            r.feature.clone(),
        );
        assert!(out.insert(k, r).is_none(), "FINAL returned a key twice");
    }
    out
}

/// Asserts every expected value (exact to 1e-9, percentiles within 1 %).
pub(crate) fn assert_matches(
    rows: &BTreeMap<Key, MetricRow>,
    exact: &BTreeMap<Key, f64>,
    approx: &BTreeMap<Key, f64>,
) {
    let mut failures = Vec::new();
    for (k, want) in exact {
        match rows.get(k) {
            None => failures.push(format!("missing {k:?} (want {want})")),
            Some(r) if (r.value - want).abs() > 1e-9 * want.abs().max(1.0) => {
                failures.push(format!("{k:?}: got {} want {want}", r.value))
            }
            Some(_) => {}
        }
    }
    for (k, want) in approx {
        match rows.get(k) {
            None => failures.push(format!("missing {k:?} (want ~{want})")),
            Some(r) if (r.value - want).abs() > 0.01 * want => {
                failures.push(format!("{k:?}: got {} want ~{want}", r.value))
            }
            Some(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} values differ:\n{}",
        failures.len(),
        exact.len() + approx.len(),
        failures.join("\n")
    );
}

/// A producer keyed by request id with the murmur2 partitioner.
pub(crate) fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

/// Sends and waits for the delivery of one message.
pub(crate) async fn send(p: &FutureProducer, topic: &str, key: &str, payload: &[u8]) {
    p.send(
        FutureRecord::to(topic).key(key).payload(payload),
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|(e, _)| panic!("send to {topic}: {e}"));
}

/// True for the labels the dataset sends before every prediction.
fn sent_first(l: &GroundTruthEvent) -> bool {
    l.request_id
        .strip_prefix('r')
        .and_then(|i| i.parse::<i64>().ok())
        .is_some_and(|i| i % 8 == 0)
}

/// Produces the dataset, each event encoded by `encode(n, event)` (`n`
/// counts the events sent): the early labels first, then the predictions,
/// the other labels, and the malformed messages.
pub(crate) async fn produce(
    brokers: &str,
    d: &Dataset,
    encode: &dyn Fn(usize, &InputEvent) -> Vec<u8>,
) {
    let p = producer(brokers);
    let mut n = 0;
    let mut next = |ev: InputEvent| {
        n += 1;
        encode(n, &ev)
    };
    for l in d.labels.iter().filter(|l| sent_first(l)) {
        let bytes = next(InputEvent::GroundTruth(l.clone()));
        send(&p, "ground-truth", &l.request_id, &bytes).await;
    }
    for e in &d.predictions {
        let bytes = next(InputEvent::Prediction(e.clone()));
        send(&p, "predictions", &e.request_id, &bytes).await;
    }
    for l in d.labels.iter().filter(|l| !sent_first(l)) {
        let bytes = next(InputEvent::GroundTruth(l.clone()));
        send(&p, "ground-truth", &l.request_id, &bytes).await;
    }
    for (input, k, payload) in &d.malformed {
        let topic = match input {
            Input::Predictions => "predictions",
            Input::GroundTruth => "ground-truth",
        };
        send(&p, topic, k, payload).await;
    }
    p.flush(Duration::from_secs(10)).expect("flush");
}

/// A MockCluster with the service's four topics.
pub(crate) fn mock_cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for t in ["predictions", "ground-truth"] {
        cluster
            .create_topic(t, PARTITIONS, 1)
            .expect("create topic");
    }
    for t in ["model-alerts", "modelwatch-dead-letter"] {
        cluster.create_topic(t, 1, 1).expect("create topic");
    }
    cluster
}

/// The test configuration: 60 s windows, a lateness far above the data's
/// time span (so only the idle wall clock closes windows: no event is late
/// whatever the partition interleaving), 2 s idle timeout.
pub(crate) fn test_config(brokers: &str, database: &str) -> Config {
    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers.to_string();
    cfg.kafka.group_id = format!("{database}-group");
    cfg.clickhouse = ClickHouseServer::shared().config(database);
    cfg.windows.sizes = vec![Duration::from_secs(60)];
    cfg.windows.allowed_lateness = Duration::from_secs(3600);
    cfg.windows.idle_timeout = Duration::from_secs(2);
    cfg.windows.label_horizon = Duration::from_secs(24 * 3600);
    cfg.windows.early_label_ttl = Duration::from_secs(600);
    cfg.service.flush_interval = Duration::from_millis(200);
    // Each test database gets its own state store, fresh at every run.
    let state = std::env::temp_dir().join(format!("modelwatch-it-state-{database}"));
    let _ = std::fs::remove_dir_all(&state);
    cfg.state.dir = state;
    cfg
}

/// A window-aligned time `ago_ms` before now.
pub(crate) fn aligned_ago(ago_ms: i64) -> i64 {
    let t = now_ms() - ago_ms;
    t - t.rem_euclid(WINDOW_MS)
}

pub(crate) async fn run_idle(service: &mut Service) {
    tokio::time::timeout(
        Duration::from_secs(90),
        service.run_until_idle(std::future::pending()),
    )
    .await
    .expect("run_until_idle did not return within 90 s")
    .expect("service failed");
}

/// Reads every message of `topic` (from the start) until `n` arrived or 20 s passed.
pub(crate) fn read_topic(
    brokers: &str,
    topic: &str,
    n: usize,
) -> Vec<rdkafka::message::OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}-{}", now_ms()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
    // Anything beyond n would be a bug too: give it a short moment to show up.
    let extra_deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < extra_deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

/// Asserts the dead-letter topic holds exactly the malformed messages, each
/// with a non-empty `modelwatch.error` header and its source topic.
pub(crate) fn assert_dead_letters(brokers: &str, d: &Dataset) {
    let got = read_topic(brokers, "modelwatch-dead-letter", d.malformed.len());
    assert_eq!(got.len(), d.malformed.len(), "dead letters: {got:?}");
    let mut seen = HashSet::new();
    for m in &got {
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
        let (input, _, payload) = d
            .malformed
            .iter()
            .find(|(_, k, _)| *k == key)
            .unwrap_or_else(|| panic!("unexpected dead letter with key {key:?}"));
        assert_eq!(m.payload().unwrap_or_default(), payload.as_slice(), "{key}");
        let headers = m.headers().expect("dead letter has headers");
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).to_string())
        };
        let reason = header("modelwatch.error").expect("modelwatch.error header");
        assert!(!reason.is_empty(), "{key}: empty reason");
        if key.starts_with("bad-future") {
            assert_eq!(
                header("modelwatch.error.kind").as_deref(),
                Some("timestamp"),
                "{key}: {reason}"
            );
            assert!(reason.contains("limits.max_future_skew"), "{reason}");
        }
        let topic = match input {
            Input::Predictions => "predictions",
            Input::GroundTruth => "ground-truth",
        };
        assert_eq!(header("modelwatch.source.topic").as_deref(), Some(topic));
        assert!(seen.insert(key));
    }
}

/// Waits (bounded) until the group's committed offsets equal the end
/// offsets of both input topics.
pub(crate) fn assert_committed_to_end(brokers: &str, group: &str) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut want = Vec::new();
        let mut tpl = TopicPartitionList::new();
        for topic in ["predictions", "ground-truth"] {
            for p in 0..PARTITIONS {
                let (_, high) = c
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
                    .expect("watermarks");
                want.push((topic, p, high));
                tpl.add_partition(topic, p);
            }
        }
        let committed = c
            .committed_offsets(tpl, Duration::from_secs(5))
            .expect("committed offsets");
        let got: Vec<(&str, i32, i64)> = want
            .iter()
            .map(|&(t, p, _)| {
                let o = committed
                    .find_partition(t, p)
                    .map(|e| e.offset())
                    .unwrap_or(Offset::Invalid);
                (t, p, if let Offset::Offset(o) = o { o } else { 0 })
            })
            .collect();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed {got:?}, end offsets {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Builds the `clf` reference from the dataset's reference events (through
/// `reference import`'s function) and stores it for the service to load.
pub(crate) async fn store_reference(cfg: &Config, d: &Dataset) {
    let file = reference_file(&d.reference);
    let profile = build_reference_from_file(file.path(), CLF, "v1", &drift_config(cfg))
        .expect("reference profile");
    let sink = ClickHouseSink::new(&cfg.clickhouse);
    sink.migrate().await.expect("migrate");
    let json = serde_json::to_string(&profile).expect("profile json");
    sink.save_reference(CLF, "v1", profile.sample_count, &json)
        .await
        .expect("save reference");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_events_give_exact_window_metrics() {
    let database = unique_database("mw_pipeline");
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let cfg = test_config(&brokers, &database);
    // Three days ago: once idle, every window is past its label horizon, so
    // unlabeled predictions have expired and orphan labels are final.
    let t0 = aligned_ago(3 * 86_400_000);
    let d = dataset(t0);
    store_reference(&cfg, &d).await;
    produce(&brokers, &d, &|_, ev| encode_json(ev)).await;

    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    run_idle(&mut service).await;

    let p = service.progress();
    let messages = d.predictions.len() + d.labels.len() + d.malformed.len();
    assert_eq!(p.consumed, messages as u64);
    assert_eq!(p.dead_lettered, d.malformed.len() as u64);
    assert_eq!(p.core.duplicate_predictions, 1);
    assert_eq!(p.core.orphans, 1);
    assert_eq!(p.pending_predictions, 0);

    let sink = ClickHouseSink::new(&cfg.clickhouse);
    let rows = read_final(&sink).await;
    let (exact, approx) = expected(&d, true);
    // The oracle covers both models, every segment and both windows.
    assert!(exact.len() > 130, "{}", exact.len());
    assert_matches(&rows, &exact, &approx);
    // Only the two segment values and all traffic exist.
    let segments: HashSet<&str> = rows.keys().map(|k| k.1.as_str()).collect();
    assert_eq!(segments, HashSet::from(["", "country=US", "country=DE"]));
    // Drift rows exist only for the model with a reference.
    assert!(!rows.keys().any(|k| k.0 == REG && k.3 == "psi"));
    // Every (model, segment, window, feature) with drift rows has its
    // histogram in window_histograms, once after FINAL, and nothing else does.
    let hists: Vec<HistogramRow> = sink
        .client()
        .query("SELECT ?fields FROM window_histograms FINAL")
        .fetch_all()
        .await
        .expect("read window_histograms FINAL");
    let hist_keys: BTreeSet<(String, String, u32, String)> = hists
        .iter()
        .map(|h| {
            assert!(!h.counts.is_empty() && h.counts.iter().all(|c| c.is_finite()));
            assert!(h.kind == "numeric" || h.kind == "categorical", "{h:?}");
            (
                h.model_id.clone(),
                h.segment.clone(),
                h.window_start,
                h.feature.clone(),
            )
        })
        .collect();
    assert_eq!(hist_keys.len(), hists.len(), "a histogram key twice");
    let psi_keys: BTreeSet<(String, String, u32, String)> = rows
        .keys()
        .filter(|k| k.3 == "psi")
        .map(|k| (k.0.clone(), k.1.clone(), k.2, k.4.clone()))
        .collect();
    assert!(!psi_keys.is_empty());
    assert_eq!(hist_keys, psi_keys);

    assert_dead_letters(&brokers, &d);
    assert_committed_to_end(&brokers, &cfg.kafka.group_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_labels_revise_a_closed_window() {
    let database = unique_database("mw_revision");
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let cfg = test_config(&brokers, &database);
    // Two hours ago: idle closes the windows (lateness 1 h) but their label
    // horizon (24 h) keeps them open for labels.
    let t0 = aligned_ago(2 * 3_600_000);
    let mut d = Dataset::default();
    for i in 0..12i64 {
        d.predictions
            .push(clf_prediction(&format!("r{i}"), t0 + 1000 + i * 2000, i));
    }
    let label = |i: i64| clf_label(&format!("r{i}"), t0 + 40_000 + i * 100, i);
    let p = producer(&brokers);
    for e in &d.predictions {
        send(
            &p,
            "predictions",
            &e.request_id,
            &serde_json::to_vec(e).unwrap(),
        )
        .await;
    }
    for i in 0..4 {
        d.labels.push(label(i));
        send(
            &p,
            "ground-truth",
            &format!("r{i}"),
            &serde_json::to_vec(&label(i)).unwrap(),
        )
        .await;
    }

    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    run_idle(&mut service).await;
    let sink = ClickHouseSink::new(&cfg.clickhouse);
    let first = read_final(&sink).await;
    let (exact, approx) = expected(&d, false);
    assert_matches(&first, &exact, &approx);
    let k = key(CLF, "", t0, "label_count", "");
    assert_eq!(first[&k].value, 4.0);
    let first_revision = first[&k].revision;
    let data_key = key(CLF, "", t0, "prediction_count", "");
    assert_eq!(first[&data_key].revision, 0);

    // Labels for the closed window arrive later (within the same run of the
    // service, as after a pause in the stream).
    for i in 4..9 {
        d.labels.push(label(i));
        send(
            &p,
            "ground-truth",
            &format!("r{i}"),
            &serde_json::to_vec(&label(i)).unwrap(),
        )
        .await;
    }
    run_idle(&mut service).await;
    let second = read_final(&sink).await;
    let (exact, approx) = expected(&d, false);
    assert_matches(&second, &exact, &approx);
    assert_eq!(second[&k].value, 9.0);
    assert!(
        second[&k].revision > first_revision,
        "revision {} after {first_revision}",
        second[&k].revision
    );
    // Data rows are final at close: not rewritten.
    assert_eq!(second[&data_key].revision, 0);
    assert_eq!(second[&data_key].value, 12.0);
    // Both revisions were written; FINAL shows the newest.
    let revisions: Vec<u64> = sink
        .client()
        .query("SELECT DISTINCT revision FROM window_metrics WHERE model_id = 'clf' AND segment = '' AND metric = 'label_count' ORDER BY revision")
        .fetch_all()
        .await
        .expect("revisions");
    assert_eq!(revisions.last(), Some(&second[&k].revision));
    assert_committed_to_end(&brokers, &cfg.kafka.group_id);
}
