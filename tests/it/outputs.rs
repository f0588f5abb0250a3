//! Outputs that can never be written, through the real service on
//! MockCluster (librdkafka's in-process broker) and a real ClickHouse:
//! rows ClickHouse rejects, dead letters larger than the producer's
//! `message.max.bytes`, messages the broker refuses for good, a missing
//! output topic, and inserts spread over more months than one INSERT may
//! carry. Each time the output is dropped or cut with its counter, and the
//! checkpoints go on: every input offset is committed and the events after
//! the poison are counted.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use modelwatch::app::Service;
use modelwatch::config::Config;
use modelwatch::sinks::clickhouse::{ClickHouseSink, MetricRow, MAX_PARTITIONS_PER_INSERT};
use modelwatch::telemetry::Counters;

use crate::pipeline::{aligned_ago, producer, send, test_config, PARTITIONS};
use crate::support::clickhouse::unique_database;

const PREDICTIONS: &str = "predictions";
const DEAD_LETTER: &str = "modelwatch-dead-letter";

/// A MockCluster with the given topics (inputs with [`PARTITIONS`]
/// partitions, outputs with one).
fn cluster(outputs: &[&str]) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let c = MockCluster::new(1).expect("mock cluster");
    for t in [PREDICTIONS, "ground-truth"] {
        c.create_topic(t, PARTITIONS, 1).expect("topic");
    }
    for t in outputs {
        c.create_topic(t, 1, 1).expect("topic");
    }
    c
}

/// A binary classifier's prediction as JSON.
fn prediction(id: &str, model: &str, ts: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "request_id": id,
        "model_id": model,
        "model_version": "v1",
        "timestamp": ts,
        "features": {"x": 1.5},
        "score": 0.75,
    }))
    .unwrap()
}

/// Produces `n` predictions of `model` at `ts` (ids `{model}-{tag}-{i}`).
async fn predictions(p: &FutureProducer, model: &str, tag: &str, n: usize, ts: i64) {
    for i in 0..n {
        let id = format!("{model}-{tag}-{i}");
        send(p, PREDICTIONS, &id, &prediction(&id, model, ts + i as i64)).await;
    }
}

async fn run_idle(service: &mut Service) {
    tokio::time::timeout(
        Duration::from_secs(120),
        service.run_until_idle(std::future::pending()),
    )
    .await
    .expect("run_until_idle did not return within 120 s")
    .expect("service failed");
}

/// Sum of `prediction_count` (all traffic) per model in `window_metrics FINAL`.
async fn prediction_counts(sink: &ClickHouseSink) -> BTreeMap<String, f64> {
    let rows: Vec<(String, f64)> = sink
        .client()
        .query(
            "SELECT model_id, sum(value) FROM window_metrics FINAL \
             WHERE metric = 'prediction_count' AND segment = '' AND model_id != '__service__' \
             GROUP BY model_id",
        )
        .fetch_all()
        .await
        .expect("read prediction counts");
    rows.into_iter().collect()
}

/// The group's committed offsets of the predictions topic, summed over its
/// partitions (= messages whose processing is checkpointed).
fn committed_predictions(cfg: &Config) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", &cfg.kafka.group_id)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(PREDICTIONS, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

/// Every message of the dead-letter topic (one partition), with headers.
fn dead_letters(brokers: &str) -> Vec<(Vec<u8>, BTreeMap<String, String>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "dead-letter-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(DEAD_LETTER, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.expect("dead letter");
        let mut headers = BTreeMap::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                headers.insert(
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        out.push((m.payload().unwrap_or_default().to_vec(), headers));
    }
    out
}

/// A value of the service's Prometheus text, by its exact series name.
fn prometheus(service: &Service, series: &str) -> Option<f64> {
    service
        .telemetry()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// 150 months of rows are written as INSERTs of at most 50 months each
/// (current servers refuse more than 100 partitions per INSERT; 18.16 here
/// does not, so the request count is checked), and every row arrives.
#[tokio::test]
async fn inserts_never_carry_more_than_fifty_months_and_every_row_arrives() {
    let db = unique_database("mw_out_months");
    let cfg = crate::support::clickhouse::ClickHouseServer::shared().config(&db);
    let sink = ClickHouseSink::new(&cfg);
    sink.migrate().await.expect("migrate");
    let mut rows = Vec::new();
    // The first of every month from January 2000 (UTC), two metrics each.
    let mut ts: u32 = 946_684_800;
    for month in 0..150u32 {
        for metric in ["prediction_count", "orphan_label_count"] {
            rows.push(MetricRow {
                model_id: "m".into(),
                model_version: "v1".into(),
                segment: String::new(),
                window_start: ts,
                window_seconds: 300,
                metric: metric.into(),
                feature: String::new(),
                value: f64::from(month),
                samples: 1,
                p_value: None,
                revision: 1,
            });
        }
        let days = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][(month % 12) as usize];
        let leap = month % 12 == 1 && (2000 + month / 12) % 4 == 0;
        ts += (days + u32::from(leap)) * 86_400;
    }
    let before = sink.insert_requests();
    sink.write_metrics(&rows).await.expect("write 150 months");
    let requests = sink.insert_requests() - before;
    assert_eq!(
        requests as usize,
        150usize.div_ceil(MAX_PARTITIONS_PER_INSERT),
        "one INSERT per 50 months"
    );
    let (count, months): (u64, u64) = sink
        .client()
        .query("SELECT count(), uniqExact(toYYYYMM(window_start)) FROM window_metrics")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!((count, months), (300, 150));
    let parts: u64 = sink
        .client()
        .query(&format!(
            "SELECT uniqExact(partition) FROM system.parts \
             WHERE database = '{db}' AND table = 'window_metrics' AND active"
        ))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(parts, 150);
}

/// A table check (a MATERIALIZED column with `throwIf`) refuses the rows of
/// one model: ClickHouse answers the whole INSERT with error 395. The sink
/// isolates those rows, writes the rest and counts the drop; the service
/// goes on, commits every offset and counts the later events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_clickhouse_rejects_are_dropped_and_counted_and_checkpoints_go_on() {
    let c = cluster(&["model-alerts", DEAD_LETTER]);
    let brokers = c.bootstrap_servers();
    let cfg = test_config(&brokers, &unique_database("mw_out_rejected"));
    let sink = ClickHouseSink::new(&cfg.clickhouse);
    sink.migrate().await.expect("migrate");
    sink.client()
        .query(
            "ALTER TABLE window_metrics ADD COLUMN guard UInt8 \
             MATERIALIZED throwIf(model_id = 'poison')",
        )
        .execute()
        .await
        .expect("add the row check");

    let p = producer(&brokers);
    let t0 = aligned_ago(2 * 86_400_000);
    predictions(&p, "good", "a", 60, t0).await;
    predictions(&p, "poison", "a", 20, t0).await;
    // Later events: two hours on (the first windows close while they are read).
    predictions(&p, "good", "b", 40, t0 + 7_200_000).await;

    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    run_idle(&mut service).await;

    let counts = prediction_counts(&sink).await;
    assert_eq!(counts.get("good"), Some(&100.0), "{counts:?}");
    assert_eq!(counts.get("poison"), None, "{counts:?}");
    let counters = service.counters();
    let dropped = Counters::get(&counters.output_dropped_total);
    // At least the poison model's prediction_count, score and feature rows.
    assert!(dropped >= 3, "{dropped} rows dropped");
    assert_eq!(
        prometheus(
            &service,
            "modelwatch_output_dropped_total{output=\"clickhouse\",target=\"window_metrics\"}"
        ),
        Some(dropped as f64)
    );
    let poison_rows: u64 = sink
        .client()
        .query("SELECT count() FROM window_metrics WHERE model_id = 'poison'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(poison_rows, 0);
    assert!(Counters::get(&counters.commits_total) >= 1);
    assert_eq!(committed_predictions(&cfg), 120, "every offset committed");
}

/// The producer may send 2 000 bytes (`[kafka.properties]`); a 50 kB
/// undecodable message, control characters in it, goes to the dead-letter
/// topic cut to fit, with its original size, and the reason escaped and
/// bounded. Events before and after it are counted, every offset committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_dead_letter_is_cut_to_fit_and_checkpoints_go_on() {
    let c = cluster(&["model-alerts", DEAD_LETTER]);
    let brokers = c.bootstrap_servers();
    let mut cfg = test_config(&brokers, &unique_database("mw_out_dlq_size"));
    cfg.kafka
        .properties
        .insert("message.max.bytes".into(), "2000".into());

    let p = producer(&brokers);
    let t0 = aligned_ago(2 * 86_400_000);
    predictions(&p, "good", "a", 30, t0).await;
    let mut poison = b"{\"request_id\": \"\x1b[31m\n".to_vec();
    poison.extend(std::iter::repeat_n(b'A', 50_000));
    send(&p, PREDICTIONS, "poison", &poison).await;
    predictions(&p, "good", "b", 30, t0 + 7_200_000).await;

    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    run_idle(&mut service).await;

    let counters = service.counters();
    assert_eq!(Counters::get(&counters.dead_lettered_total), 1);
    assert_eq!(Counters::get(&counters.dead_letters_truncated_total), 1);
    assert_eq!(Counters::get(&counters.output_dropped_total), 0);
    let letters = dead_letters(&brokers);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (payload, headers) = &letters[0];
    assert!(payload.len() < 2_000, "{} bytes", payload.len());
    assert!(poison.starts_with(payload), "a prefix of the original");
    assert_eq!(headers["modelwatch.truncated"], "true");
    assert_eq!(
        headers["modelwatch.original.size"],
        poison.len().to_string()
    );
    let reason = &headers["modelwatch.error"];
    assert!(!reason.is_empty() && reason.len() <= 1024, "{reason}");
    assert!(!reason.chars().any(char::is_control), "{reason:?}");
    let counts = prediction_counts(&ClickHouseSink::new(&cfg.clickhouse)).await;
    assert_eq!(counts.get("good"), Some(&60.0), "{counts:?}");
    assert_eq!(committed_predictions(&cfg), 61, "every offset committed");
}

/// The broker refuses the dead letter for good (MockCluster answers its
/// Produce requests with MESSAGE_TOO_LARGE): it is dropped after its
/// attempts and counted, not retried forever; checkpoints go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_broker_refuses_is_dropped_and_counted() {
    let c = cluster(&["model-alerts", DEAD_LETTER]);
    let brokers = c.bootstrap_servers();
    let cfg = test_config(&brokers, &unique_database("mw_out_dlq_refused"));

    let p = producer(&brokers);
    let t0 = aligned_ago(2 * 86_400_000);
    predictions(&p, "good", "a", 30, t0).await;
    send(&p, PREDICTIONS, "poison", b"not json").await;
    predictions(&p, "good", "b", 30, t0 + 7_200_000).await;
    // From now on every Produce request fails (the inputs are in).
    c.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 64],
    );

    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    run_idle(&mut service).await;

    let counters = service.counters();
    assert_eq!(Counters::get(&counters.dead_lettered_total), 0);
    assert_eq!(Counters::get(&counters.output_dropped_total), 1);
    assert_eq!(
        prometheus(
            &service,
            &format!("modelwatch_output_dropped_total{{output=\"dead_letter\",target=\"{DEAD_LETTER}\"}}")
        ),
        Some(1.0)
    );
    let counts = prediction_counts(&ClickHouseSink::new(&cfg.clickhouse)).await;
    assert_eq!(counts.get("good"), Some(&60.0), "{counts:?}");
    assert_eq!(committed_predictions(&cfg), 61, "every offset committed");
}

/// Without the dead-letter topic the service does not start, and says
/// which topic, which key and how to create it; the check creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_output_topic_fails_startup_with_the_fix() {
    let c = cluster(&["model-alerts"]);
    let brokers = c.bootstrap_servers();
    let cfg = test_config(&brokers, &unique_database("mw_out_missing"));
    let err = match Service::start(cfg.clone()).await {
        Ok(_) => panic!("the service started without its dead-letter topic"),
        Err(e) => format!("{e:#}"),
    };
    for want in [
        DEAD_LETTER,
        "kafka.dead_letter_topic",
        "kafka-topics",
        "--create",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    // Still missing: asking did not auto-create it.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("client");
    let md = consumer
        .fetch_metadata(Some(DEAD_LETTER), Duration::from_secs(5))
        .expect("metadata");
    let t = &md.topics()[0];
    assert!(
        t.error().is_some() || t.partitions().is_empty(),
        "the check created {DEAD_LETTER}"
    );
}

/// A server that accepts connections and never answers: each insert is
/// abandoned after `clickhouse.insert_timeout` and retried, and the write
/// gives up as transient once its retry budget is spent, instead of holding
/// the service loop (librdkafka evicts a consumer that does not poll for
/// `max.poll.interval.ms`).
#[tokio::test]
async fn a_hung_insert_times_out_as_a_transient_error_within_its_budget() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept and hold every connection, answer nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().take(1000).flatten() {
            held.push(s);
        }
    });
    let cfg = modelwatch::config::ClickHouseConfig {
        url: format!("http://127.0.0.1:{port}"),
        insert_timeout: Duration::from_millis(300),
        max_retries: 1_000,
        ..Default::default()
    };
    let sink = ClickHouseSink::new(&cfg).with_write_budget(Duration::from_secs(2));
    let row = MetricRow {
        model_id: "m".into(),
        model_version: "v1".into(),
        segment: String::new(),
        window_start: 1_700_000_000,
        window_seconds: 60,
        metric: "prediction_count".into(),
        feature: String::new(),
        value: 1.0,
        samples: 1,
        p_value: None,
        revision: 1,
    };
    let started = std::time::Instant::now();
    let err = sink.write_metrics(&[row]).await.unwrap_err();
    let took = started.elapsed();
    assert!(err.is_transient(), "{err}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(sink.insert_requests() >= 2, "{}", sink.insert_requests());
}

/// The same check against a separate broker process (tansu, which does not
/// auto-create topics): the missing alerts topic is named with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_output_topic_fails_startup_against_tansu() {
    let broker = crate::support::tansu::TansuBroker::start_with_topics(&[
        (PREDICTIONS, 1),
        ("ground-truth", 1),
        (DEAD_LETTER, 1),
    ]);
    let cfg = test_config(
        &broker.bootstrap(),
        &unique_database("mw_out_missing_tansu"),
    );
    let err = match Service::start(cfg).await {
        Ok(_) => panic!("the service started without its alerts topic"),
        Err(e) => format!("{e:#}"),
    };
    for want in ["model-alerts", "kafka.alerts_topic", "kafka-topics"] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
}

/// Isolating one refused row in a batch of 10 000 costs about 2·log2(n)
/// inserts, not n: the good 9 999 rows land, the one refused is dropped.
#[tokio::test]
async fn one_refused_row_in_ten_thousand_costs_a_logarithmic_number_of_inserts() {
    let db = unique_database("mw_out_bisect");
    let cfg = crate::support::clickhouse::ClickHouseServer::shared().config(&db);
    let sink = ClickHouseSink::new(&cfg);
    sink.migrate().await.expect("migrate");
    sink.client()
        .query(
            "ALTER TABLE window_metrics ADD COLUMN guard UInt8 \
             MATERIALIZED throwIf(feature = 'poison')",
        )
        .execute()
        .await
        .expect("add the row check");
    let n = 10_000usize;
    let rows: Vec<MetricRow> = (0..n)
        .map(|i| MetricRow {
            model_id: "m".into(),
            model_version: "v1".into(),
            segment: String::new(),
            window_start: 1_700_000_000,
            window_seconds: 60,
            metric: "psi".into(),
            feature: if i == 6_789 {
                "poison".into()
            } else {
                format!("f{i}")
            },
            value: 0.1,
            samples: 1,
            p_value: None,
            revision: 1,
        })
        .collect();
    let started = std::time::Instant::now();
    sink.write_metrics(&rows)
        .await
        .expect("written, the bad row dropped");
    let requests = sink.insert_requests();
    println!(
        "{n} rows, 1 refused: {requests} INSERT requests, {:?}",
        started.elapsed()
    );
    let bound = 1 + 2 * (n as f64).log2().ceil() as u64;
    assert!(
        requests <= bound,
        "{requests} requests, want at most {bound}"
    );
    assert_eq!(sink.take_dropped().get("window_metrics"), Some(&1));
    let count: u64 = sink
        .client()
        .query("SELECT count() FROM window_metrics")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(count, n as u64 - 1);
}
