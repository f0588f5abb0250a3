//! The durable state through the whole service on MockCluster + a real
//! ClickHouse: a join state larger than `state.memory_budget`, and a restart
//! whose restored state is larger than the budget, give exactly the
//! `window_metrics FINAL` of a run with all the state in memory.
//! (Crashes against a separate broker process: [`crate::crash`].)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

use modelwatch::app::Service;
use modelwatch::config::Config;
use modelwatch::generate::{Generator, Scenario};
use modelwatch::ingest::decode::encode_json;
use modelwatch::metrics::ReferenceBuilder;
use modelwatch::model::InputEvent;
use modelwatch::pipeline::drift_config;
use modelwatch::sinks::clickhouse::{ClickHouseSink, MetricRow};

use crate::crash::{compare_metrics, read_metrics, MetricKey};
use crate::pipeline::{aligned_ago, producer, test_config, PARTITIONS};
use crate::support::clickhouse::unique_database;

/// 1 000 request ids in memory (at 320 bytes each): far below the pending
/// predictions of the stream.
const SMALL_BUDGET: u64 = 1_000 * modelwatch::config::JOIN_BYTES_PER_REQUEST;

type Rows = BTreeMap<MetricKey, MetricRow>;

pub(crate) fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let c = MockCluster::new(1).expect("mock cluster");
    for t in ["predictions", "ground-truth"] {
        c.create_topic(t, PARTITIONS, 1).expect("topic");
    }
    for t in ["model-alerts", "modelwatch-dead-letter"] {
        c.create_topic(t, 1, 1).expect("topic");
    }
    c
}

/// Two versions scoring 6 000 requests over 20 minutes of event time two
/// days ago (every window closes and every horizon passes once the input is
/// idle), 90 % labeled 30 s to 10 min later. The span is shorter than the
/// lateness plus the early-label TTL, so no interleaving of partitions and
/// topics makes an event late or a label an orphan: the result is the same
/// whatever order the consumer reads in.
pub(crate) fn stream() -> (Vec<InputEvent>, Vec<InputEvent>) {
    let events = Generator::new(Scenario {
        seed: 17,
        start_ms: aligned_ago(2 * 86_400_000),
        events_per_second: 5.0,
        count: 6_000,
        numeric_features: 8,
        categorical_features: 3,
        ..Scenario::default()
    });
    events.partition(|e| matches!(e, InputEvent::Prediction(_)))
}

pub(crate) async fn produce(p: &FutureProducer, events: &[InputEvent]) {
    for chunk in events.chunks(2_000) {
        let sends = chunk.iter().map(|e| {
            let (topic, key) = match e {
                InputEvent::Prediction(p) => ("predictions", p.request_id.to_string()),
                InputEvent::GroundTruth(g) => ("ground-truth", g.request_id.to_string()),
            };
            let payload = encode_json(e);
            async move {
                p.send(
                    FutureRecord::to(topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("send to {topic}: {e}"));
            }
        });
        join_all(sends).await;
    }
}

/// What depends on the order in which the consumer reads partitions is
/// fixed so two runs can be compared: the reference profiles are imported
/// (not built from the first events of each version, which depend on that
/// order), and the label reference never completes (it is built from the
/// first labels seen). The remaining order dependence is floating-point
/// addition: sums over labels can differ in the last bits, so values
/// compare to a relative 1e-9 (the crash test's comparison).
pub(crate) fn config(brokers: &str, database: &str) -> Config {
    let mut cfg = test_config(brokers, database);
    cfg.state.checkpoint_interval = Duration::from_millis(300);
    cfg.drift.label_reference_size = 1_000_000;
    cfg.kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka
        .properties
        .insert("heartbeat.interval.ms".into(), "500".into());
    cfg
}

/// Stores the reference profile of both versions, from their first 2 000
/// predictions in stream order.
pub(crate) async fn import_references(cfg: &Config, predictions: &[InputEvent]) {
    let sink = ClickHouseSink::new(&cfg.clickhouse);
    sink.migrate().await.expect("migrate");
    for version in ["v1", "v2"] {
        let mut b = ReferenceBuilder::new(&drift_config(cfg));
        for e in predictions
            .iter()
            .filter_map(|e| match e {
                InputEvent::Prediction(p) if p.model_version == version => Some(p),
                _ => None,
            })
            .take(2_000)
        {
            b.observe(e);
        }
        let profile = b.build();
        let json = serde_json::to_string(&profile).expect("profile json");
        sink.save_reference("fraud-detector", version, profile.sample_count, &json)
            .await
            .expect("save reference");
    }
}

pub(crate) async fn run_idle(service: &mut Service) {
    tokio::time::timeout(
        Duration::from_secs(120),
        service.run_until_idle(std::future::pending()),
    )
    .await
    .expect("run_until_idle did not return within 120 s")
    .expect("service failed");
}

/// Runs `service` until it has consumed `n` predictions, then stops it
/// gracefully: the last flush writes everything and checkpoints, and the
/// join requests beyond the memory budget leave memory.
async fn consume_predictions(service: &mut Service, n: u64) {
    let counters = service.counters();
    let all_consumed = async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        while modelwatch::telemetry::Counters::get(&counters.predictions_consumed_total) < n {
            assert!(
                Instant::now() < deadline,
                "predictions not consumed within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(90), service.run_until(all_consumed))
        .await
        .expect("graceful stop within 90 s")
        .expect("service stops cleanly");
    assert_eq!(service.progress().consumed, n);
}

/// Distinct request ids of `events`.
fn request_ids(events: &[InputEvent]) -> usize {
    events
        .iter()
        .map(|e| match e {
            InputEvent::Prediction(p) => &*p.request_id,
            InputEvent::GroundTruth(g) => &*g.request_id,
        })
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Everything at once with the whole join state in memory.
pub(crate) async fn reference(predictions: &[InputEvent], labels: &[InputEvent]) -> Rows {
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let cfg = config(&brokers, &unique_database("mw_state_ref"));
    import_references(&cfg, predictions).await;
    let p = producer(&brokers);
    produce(&p, predictions).await;
    produce(&p, labels).await;
    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    run_idle(&mut service).await;
    let counters = service.counters();
    assert_eq!(
        modelwatch::telemetry::Counters::get(&counters.join_evicted_total),
        0,
        "the default budget holds this stream in memory"
    );
    read_metrics(&ClickHouseSink::new(&cfg.clickhouse)).await
}

/// Asserts that two `window_metrics FINAL` are the same, value for value.
pub(crate) fn assert_same(want: &Rows, got: &Rows) {
    let diff = compare_metrics(want, got);
    assert!(diff.ok(), "{}", diff.report("window_metrics FINAL"));
}

fn metric_count(rows: &Rows, metric: &str) -> usize {
    rows.keys().filter(|k| k.5 == metric).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_state_beyond_the_memory_budget_gives_the_same_metrics() {
    let (predictions, labels) = stream();
    let want = reference(&predictions, &labels).await;
    assert!(
        metric_count(&want, "accuracy") > 40,
        "{}",
        metric_count(&want, "accuracy")
    );
    assert!(
        metric_count(&want, "psi") > 100,
        "{}",
        metric_count(&want, "psi")
    );

    // 1. Spilling while running, in one process: the predictions first,
    //    consumed to the last and checkpointed (the graceful stop of
    //    `run_until` checkpoints, and after a checkpoint the requests beyond
    //    the budget leave memory); then the labels, while the same service
    //    runs until idle. How many requests are pending at each checkpoint
    //    then no longer depends on how the consumer interleaves the topics.
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let mut cfg = config(&brokers, &unique_database("mw_state_spill"));
    cfg.state.memory_budget = bytesize::ByteSize::b(SMALL_BUDGET);
    let hot = cfg.state.max_hot_requests();
    import_references(&cfg, &predictions).await;
    let p = producer(&brokers);
    produce(&p, &predictions).await;
    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    consume_predictions(&mut service, predictions.len() as u64).await;
    let split = service.progress();
    let counters = service.counters();
    let evicted = modelwatch::telemetry::Counters::get(&counters.join_evicted_total);
    let (requests, labeled) = (request_ids(&predictions), request_ids(&labels));
    println!(
        "spilling run, predictions consumed: {} pending predictions of {requests} requests, {} only in the store, {evicted} evictions (memory for {hot} requests)",
        split.pending_predictions, split.cold_requests
    );
    assert_eq!(
        split.pending_predictions,
        predictions.len(),
        "no label yet: every prediction pending"
    );
    // After the checkpoint at most `hot` requests stay in memory.
    assert!(
        split.cold_requests + hot >= requests,
        "{} of {requests} requests left memory, want at least {}",
        split.cold_requests,
        requests - hot
    );
    assert!(evicted >= split.cold_requests as u64, "{evicted} evictions");
    // The labels arrive while the service runs (no idle gap between the
    // topics: an idle input would move the watermark to the wall clock).
    tokio::join!(run_idle(&mut service), produce(&p, &labels));
    let after = service.progress();
    let evicted = modelwatch::telemetry::Counters::get(&counters.join_evicted_total);
    let loaded = modelwatch::telemetry::Counters::get(&counters.join_loaded_total);
    println!("spilling run: {evicted} requests left memory, {loaded} read back");
    assert_eq!(after.core.orphans, 0, "every label met its prediction");
    // Every labeled request that was only in the store was read back for
    // its label: at least the cold requests less the unlabeled ones.
    let must_load = split.cold_requests.saturating_sub(requests - labeled);
    assert!(
        loaded >= must_load as u64,
        "{loaded} requests read back, want at least {must_load}"
    );
    drop(service);
    assert_same(
        &want,
        &read_metrics(&ClickHouseSink::new(&cfg.clickhouse)).await,
    );

    // 2. A restart whose state exceeds the budget: the predictions are
    //    consumed and checkpointed (graceful stop) before any label exists;
    //    the second process restores 900 requests into memory and leaves
    //    the rest in the store; the labels then arrive.
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let mut cfg = config(&brokers, &unique_database("mw_state_restart"));
    cfg.state.memory_budget = bytesize::ByteSize::b(SMALL_BUDGET);
    import_references(&cfg, &predictions).await;
    let p = producer(&brokers);
    produce(&p, &predictions).await;
    let mut first = Service::start(cfg.clone()).await.expect("service starts");
    let n = predictions.len() as u64;
    consume_predictions(&mut first, n).await;
    let stopped = first.progress();
    assert!(
        stopped.pending_predictions == predictions.len() && stopped.cold_requests + hot >= requests,
        "the stopped state holds more than the budget: {stopped:?}"
    );
    drop(first);

    produce(&p, &labels).await;
    let mut second = Service::start(cfg.clone()).await.expect("service restarts");
    let restored = second.progress();
    assert_eq!(
        restored.pending_predictions, stopped.pending_predictions,
        "every pending prediction restored, in memory or in the store"
    );
    assert!(restored.cold_requests > 1_000, "{restored:?}");
    run_idle(&mut second).await;
    let after = second.progress();
    assert_eq!(
        after.consumed,
        labels.len() as u64,
        "no prediction consumed twice"
    );
    assert_eq!(after.core.orphans, 0, "every label met its prediction");
    drop(second);
    assert_same(
        &want,
        &read_metrics(&ClickHouseSink::new(&cfg.clickhouse)).await,
    );
}
