//! The hostile-input suite (issue #11): a separate tansu broker, a private
//! ClickHouse database and the real `modelwatch run --exit-when-idle` with
//! the default `[limits]`. Before the live traffic, the input topics get
//! every poison pill the issue lists (events dated in the year 2999 and in
//! 1971, 20 000 segment keys, 20 000 features, a 100 KB request id, a 5 KB
//! string value, 200 KB of garbage) and floods of segment values, segment
//! keys, versions and features. Then live traffic dated now.
//!
//! Checked, on 1-partition and 4-partition topics: the process runs to its
//! end; every live prediction and label is counted in its window and none
//! is late; the offsets are committed to the end (checkpoints went on);
//! peak RSS stays under 1 GiB; ClickHouse rows stay proportional to the
//! live traffic; each pill is dead-lettered with its kind, and each flood
//! is capped and counted under its `[limits]` key.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use modelwatch::app::now_ms;
use modelwatch::model::{Entries, FeatureValue, GroundTruthEvent, PredictionEvent};
use modelwatch::sinks::clickhouse::ClickHouseSink;
use rdkafka::message::{Headers, Message};

use crate::budget::sample_peak_rss;
use crate::pipeline::{producer, read_topic, send};
use crate::support::clickhouse::{unique_database, ClickHouseServer};
use crate::support::tansu::TansuBroker;

/// Live predictions (model `live`), over the last three minutes.
const LIVE: i64 = 3_000;
/// Longest the run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// Peak RSS allowed, KiB.
const MAX_RSS_KIB: u64 = 1024 * 1024;

fn prediction(id: &str, model: &str, version: &str, ts: i64) -> PredictionEvent {
    PredictionEvent {
        request_id: id.into(),
        model_id: model.into(),
        model_version: version.into(),
        timestamp: ts,
        score: Some(0.5),
        ..Default::default()
    }
}

/// The pills: (topic, key, payload, the dead-letter kind expected or
/// `None` for a flood that is capped rather than rejected).
fn pills(now: i64) -> Vec<(&'static str, String, Vec<u8>, Option<&'static str>)> {
    let json = |p: &PredictionEvent| serde_json::to_vec(p).unwrap();
    let mut out = Vec::new();
    let mut pill = |topic, id: &str, payload: Vec<u8>, kind| {
        out.push((topic, id.to_string(), payload, kind));
    };
    pill(
        "predictions",
        "future",
        json(&prediction("future", "live", "v1", 32_472_144_000_000)),
        Some("timestamp"),
    );
    pill(
        "predictions",
        "ancient",
        json(&prediction("ancient", "live", "v1", 31_536_000_000)),
        Some("timestamp"),
    );
    let label = GroundTruthEvent {
        request_id: "future-label".into(),
        timestamp: 32_472_144_000_000,
        actual_label: Some("1".into()),
        ..Default::default()
    };
    pill(
        "ground-truth",
        "future-label",
        serde_json::to_vec(&label).unwrap(),
        Some("timestamp"),
    );
    let mut keys = prediction("keys", "live", "v1", now - 60_000);
    keys.segments = Entries((0..20_000).map(|i| (format!("k{i}"), "x".into())).collect());
    pill("predictions", "keys", json(&keys), Some("limit"));
    let mut features = prediction("features", "live", "v1", now - 60_000);
    features.features = Entries(
        (0..20_000)
            .map(|i| (format!("f{i}"), FeatureValue::Double(1.0)))
            .collect(),
    );
    pill("predictions", "features", json(&features), Some("limit"));
    let long_id = "r".repeat(100_000);
    pill(
        "predictions",
        "long-id",
        json(&prediction(&long_id, "live", "v1", now - 60_000)),
        Some("limit"),
    );
    let mut long_value = prediction("long-value", "live", "v1", now - 60_000);
    long_value.features = Entries(vec![("x".into(), FeatureValue::String("v".repeat(5_000)))]);
    pill(
        "predictions",
        "long-value",
        json(&long_value),
        Some("limit"),
    );
    pill(
        "predictions",
        "garbage",
        std::iter::repeat_n(b'{', 200_000).collect(),
        Some("json"),
    );
    // Floods, each of its own model so the counts do not depend on the
    // order the partitions interleave in.
    for i in 0..200 {
        let mut p = prediction(&format!("fv{i}"), "flood-values", "v1", now - 60_000);
        p.segments = Entries(vec![("user".into(), format!("u{i}"))]);
        pill("predictions", &p.request_id.clone(), json(&p), None);
    }
    for i in 0..100 {
        let mut p = prediction(&format!("fk{i}"), "flood-keys", "v1", now - 60_000);
        p.segments = Entries(vec![(format!("key{i}"), "x".into())]);
        pill("predictions", &p.request_id.clone(), json(&p), None);
    }
    for i in 0..30 {
        let p = prediction(
            &format!("fr{i}"),
            "flood-versions",
            &format!("v{i}"),
            now - 60_000,
        );
        pill("predictions", &p.request_id.clone(), json(&p), None);
    }
    for i in 0..20 {
        let mut p = prediction(&format!("ff{i}"), "flood-features", "v1", now - 60_000);
        p.features = Entries(
            (0..100)
                .map(|j| (format!("f{i}_{j}"), FeatureValue::Double(j as f64)))
                .collect(),
        );
        pill("predictions", &p.request_id.clone(), json(&p), None);
    }
    out
}

/// The live traffic: predictions of model `live` over the last three
/// minutes (time-ordered), two thirds of them labelled 100 ms later.
fn live(now: i64) -> (Vec<PredictionEvent>, Vec<GroundTruthEvent>) {
    let start = now - 180_000;
    let mut predictions = Vec::new();
    let mut labels = Vec::new();
    for i in 0..LIVE {
        let ts = start + i * 170_000 / LIVE;
        let x = (i % 97) as f64 / 97.0;
        predictions.push(PredictionEvent {
            request_id: format!("live-{i}"),
            model_id: "live".into(),
            model_version: "v1".into(),
            timestamp: ts,
            score: Some(x),
            features: Entries(vec![
                ("x".into(), FeatureValue::Double(x)),
                ("n".into(), FeatureValue::Long(i % 13)),
                (
                    "color".into(),
                    FeatureValue::String(["red", "green", "blue"][(i % 3) as usize].into()),
                ),
            ]),
            segments: Entries(vec![(
                "country".into(),
                ["DE", "FR", "US"][(i % 3) as usize].into(),
            )]),
            ..Default::default()
        });
        if i % 3 != 0 {
            labels.push(GroundTruthEvent {
                request_id: format!("live-{i}"),
                timestamp: ts + 100,
                actual_label: Some(if x > 0.5 { "1" } else { "0" }.into()),
                ..Default::default()
            });
        }
    }
    (predictions, labels)
}

/// Waits (20 s at most) until the offsets `group` committed add up to
/// `predictions` and `labels` messages on the input topics.
fn assert_committed(
    brokers: &str,
    group: &str,
    partitions: i32,
    predictions: usize,
    labels: usize,
) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut tpl = TopicPartitionList::new();
        for topic in ["predictions", "ground-truth"] {
            for p in 0..partitions {
                tpl.add_partition(topic, p);
            }
        }
        let committed = c
            .committed_offsets(tpl, Duration::from_secs(5))
            .expect("committed offsets");
        let total = |topic: &str| -> i64 {
            (0..partitions)
                .map(
                    |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        _ => 0,
                    },
                )
                .sum()
        };
        let got = (total("predictions"), total("ground-truth"));
        if got == (predictions as i64, labels as i64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed {got:?}, produced {:?}",
            (predictions, labels)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `line` without its terminal colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Hits per `[limits]` key, from the run's "limit hit" log lines.
fn limit_hits(log: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("limit hit")) {
        let line = &strip_ansi(line);
        let field = |name: &str| {
            let rest = &line[line.find(&format!("{name}="))? + name.len() + 1..];
            Some(
                rest.trim_start_matches('"')
                    .split(|c: char| c == '"' || c.is_whitespace())
                    .next()?
                    .to_string(),
            )
        };
        if let (Some(limit), Some(hits)) = (field("limit"), field("hits")) {
            out.insert(limit, hits.parse().expect("hits is a number"));
        }
    }
    out
}

fn hostile_suite(partitions: i32) {
    let broker = TansuBroker::start(partitions);
    let brokers = broker.bootstrap();
    let database = unique_database(&format!("mw_hostile{partitions}"));
    let group = format!("{database}-group");
    let dir = tempfile::tempdir().expect("tempdir");
    let now = now_ms();
    let pills = pills(now);
    let (predictions, labels) = live(now);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let p = producer(&brokers);
        for (topic, key, payload, _) in &pills {
            send(&p, topic, key, payload).await;
        }
        for chunk in predictions.chunks(500) {
            futures::future::join_all(chunk.iter().map(|e| {
                send(
                    &p,
                    "predictions",
                    &e.request_id,
                    Box::leak(serde_json::to_vec(e).unwrap().into_boxed_slice()),
                )
            }))
            .await;
        }
        for chunk in labels.chunks(500) {
            futures::future::join_all(chunk.iter().map(|e| {
                send(
                    &p,
                    "ground-truth",
                    &e.request_id,
                    Box::leak(serde_json::to_vec(e).unwrap().into_boxed_slice()),
                )
            }))
            .await;
        }
    });

    // Default settings, but for the connections, one-minute windows and a
    // short idle timeout (the run ends when the input does).
    let log_path = dir.path().join("run.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelwatch"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MODELWATCH_")) {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .args(["run", "--exit-when-idle"])
        .env("MODELWATCH_KAFKA__BROKERS", &brokers)
        .env("MODELWATCH_KAFKA__GROUP_ID", &group)
        .env(
            "MODELWATCH_CLICKHOUSE__URL",
            ClickHouseServer::shared().url(),
        )
        .env("MODELWATCH_CLICKHOUSE__DATABASE", &database)
        .env("MODELWATCH_WINDOWS__SIZES", "1m")
        .env("MODELWATCH_WINDOWS__IDLE_TIMEOUT", "3s")
        .env("MODELWATCH_STATE__DIR", dir.path().join("state"))
        .env("MODELWATCH_API__ENABLED", "false")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .spawn()
        .expect("spawn modelwatch");
    let rss = sample_peak_rss(child.id());
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "modelwatch still running after {RUN_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let peak_kib = rss.join().expect("rss sampler");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "modelwatch failed ({status}):\n{log}");
    assert!(log.contains("input idle"), "{log}");
    println!(
        "hostile suite, {partitions} partition(s): peak RSS {} MiB",
        peak_kib / 1024
    );
    assert!(
        peak_kib < MAX_RSS_KIB,
        "peak RSS {} MiB, more than 1 GiB",
        peak_kib / 1024
    );

    // Every live prediction and label in its window; none late.
    let sink = ClickHouseSink::new(&ClickHouseServer::shared().config(&database));
    let sum = |metric: &'static str| {
        runtime
            .block_on(
                sink.client()
                    .query(
                        "SELECT sum(value) FROM window_metrics FINAL \
                         WHERE model_id = 'live' AND segment = '' AND feature = '' AND metric = ?",
                    )
                    .bind(metric)
                    .fetch_one::<f64>(),
            )
            .expect("query")
    };
    assert_eq!(sum("prediction_count"), LIVE as f64);
    assert_eq!(sum("label_count"), labels.len() as f64);
    let per_country: Vec<(String, f64)> = runtime
        .block_on(
            sink.client()
                .query(
                    "SELECT segment, sum(value) FROM window_metrics FINAL \
                     WHERE model_id = 'live' AND metric = 'prediction_count' AND segment != '' \
                     GROUP BY segment ORDER BY segment",
                )
                .fetch_all(),
        )
        .expect("query");
    assert_eq!(
        per_country,
        vec![
            ("country=DE".to_string(), 1000.0),
            ("country=FR".to_string(), 1000.0),
            ("country=US".to_string(), 1000.0)
        ]
    );
    assert!(
        log.lines()
            .rev()
            .map(strip_ansi)
            .find(|l| l.contains("late_predictions="))
            .is_some_and(|l| l.contains("late_predictions=0 ")),
        "{log}"
    );
    // Checkpoints went on to the end: the offsets committed add up to
    // every message produced (tansu's high watermarks can lag behind what
    // it delivered, so the count is the reference, not the watermarks).
    let predictions_sent = pills.iter().filter(|p| p.0 == "predictions").count() + LIVE as usize;
    let labels_sent = pills.iter().filter(|p| p.0 == "ground-truth").count() + labels.len();
    assert_committed(&brokers, &group, partitions, predictions_sent, labels_sent);

    // Rows proportional to the live traffic: the floods add a bounded
    // number of rows (capped segments, no per-feature rows without a
    // reference), not rows per hostile value.
    let rows = |filter: &str| {
        runtime
            .block_on(
                sink.client()
                    .query(&format!(
                        "SELECT toUInt64(count()) FROM window_metrics FINAL WHERE {filter}"
                    ))
                    .fetch_one::<u64>(),
            )
            .expect("count")
    };
    let live_rows = rows("model_id = 'live'");
    let all_rows = rows("model_id != '__service__'");
    println!("hostile suite, {partitions} partition(s): {all_rows} rows, {live_rows} of them live");
    assert!(live_rows > 100, "{live_rows}");
    assert!(
        all_rows <= 5 * live_rows,
        "{all_rows} rows for {live_rows} rows of live traffic"
    );
    // Exactly the cells the caps allow: 50 users and `__other__` plus all
    // traffic; 10 segment keys plus all traffic; 20 versions and
    // `__other__`; one cell for the features flood (uncapped: 333 cells).
    let cells: Vec<(String, u64)> = runtime
        .block_on(
            sink.client()
                .query(
                    "SELECT model_id, toUInt64(uniqExact(model_version, segment))                      FROM window_metrics FINAL WHERE model_id LIKE 'flood-%'                      GROUP BY model_id ORDER BY model_id",
                )
                .fetch_all(),
        )
        .expect("cells");
    assert_eq!(
        cells,
        [
            ("flood-features", 1),
            ("flood-keys", 11),
            ("flood-values", 52),
            ("flood-versions", 21),
        ]
        .map(|(m, n)| (m.to_string(), n))
    );

    // Each pill dead-lettered with its kind, and nothing else.
    let expected: Vec<(String, &str)> = {
        let mut v: Vec<(String, &str)> = pills
            .iter()
            .filter_map(|(_, key, _, kind)| kind.map(|k| (key.clone(), k)))
            .collect();
        v.sort();
        v
    };
    let letters = read_topic(&brokers, "modelwatch-dead-letter", expected.len());
    let mut got: Vec<(String, String)> = letters
        .iter()
        .map(|m| {
            let kind = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "modelwatch.error.kind")
                        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                })
                .unwrap_or_default();
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            (key, kind)
        })
        .collect();
    got.sort();
    let got: Vec<(String, &str)> = got.iter().map(|(k, v)| (k.clone(), v.as_str())).collect();
    assert_eq!(got, expected);

    // Each flood capped and counted under its key (event-level bounds and
    // the core's caps together).
    let hits = limit_hits(&log);
    let want: BTreeMap<String, u64> = [
        // One event with 20 000 features, then 20 events × 100 new
        // features of which the reference builder keeps 500.
        ("max_features", 1 + (2_000 - 500)),
        // One event with 20 000 keys; 100 keys of which a model keeps 10.
        ("max_segment_keys", 1 + 90),
        ("max_segment_values", 150),
        ("max_versions_per_model", 10),
        ("max_identifier_bytes", 2),
        ("max_future_skew", 2),
        ("max_event_age", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(hits, want, "{log}");
}

#[test]
fn hostile_input_on_one_partition_leaves_live_monitoring_exact() {
    hostile_suite(1);
}

#[test]
fn hostile_input_on_four_partitions_leaves_live_monitoring_exact() {
    hostile_suite(4);
}
