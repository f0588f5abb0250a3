//! `modelwatch demo`: the whole service on embedded defaults. An in-process
//! Kafka cluster (rdkafka's MockCluster), synthetic traffic from two model
//! versions whose features drift and whose accuracy drops part-way, the
//! local ClickHouse; progress while it runs, then a summary read back from
//! ClickHouse with the SQL to explore further.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;

use crate::app::{now_ms, Service};
use crate::config::Config;
use crate::generate::{produce, DriftScenario, Generator, Pace, ProduceOptions, Scenario};
use crate::ingest::decode::encode_json;
use crate::sinks::clickhouse::ClickHouseSink;
use crate::telemetry::Counters;

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Predictions per model version.
    pub events: u64,
    /// Event-time rate (predictions per second).
    pub rate: f64,
    /// Random seed.
    pub seed: u64,
    /// Keep serving the dashboard after the summary until Ctrl-C (`false`
    /// with `--exit`, for tests and CI).
    pub serve: bool,
}

/// The model id the demo generates.
pub const DEMO_MODEL: &str = "fraud-detector";

/// The accuracy the demo's model has before it degrades: the business
/// baseline the demo configures (`[models.fraud-detector] baseline.accuracy`).
pub const DEMO_BASELINE_ACCURACY: f64 = 0.9;

/// The database the demo writes to (reset at every run) unless one is configured.
pub const DEMO_DATABASE: &str = "modelwatch_demo";

/// Malformed messages the demo injects to show the dead-letter topic.
const BAD_MESSAGES: &[&[u8]] = &[
    b"{\"request_id\": \"\", \"model_id\": \"m\"}",
    b"not json, not avro",
    b"{\"request_id\":\"x\",\"model_id\":\"fraud-detector\",\"model_version\":\"v1\",\"timestamp\":\"yesterday\",\"score\":0.5}",
];

/// Runs the demo.
pub async fn run(mut cfg: Config, opts: DemoOptions) -> Result<()> {
    // The demo starts from a clean database of its own, so a second run does
    // not mix its windows with the first one's.
    if cfg.clickhouse.database == crate::config::ClickHouseConfig::default().database {
        cfg.clickhouse.database = DEMO_DATABASE.to_string();
    }
    let sink = ClickHouseSink::new(&cfg.clickhouse);
    if let Err(e) = sink.ping().await {
        if !e.is_transient() {
            // Reached, but refused (TLS, authentication): the reason says why.
            anyhow::bail!(
                "ClickHouse at {} refused the demo: {e}",
                cfg.clickhouse.display_url()
            );
        }
        anyhow::bail!(
            "ClickHouse is not reachable at {} ({e}).\n  Start a local one with: deploy/clickhouse-start.sh\n  or point the demo at yours: MODELWATCH_CLICKHOUSE__URL=http://host:8123",
            cfg.clickhouse.display_url()
        );
    }
    // Reset: make sure the database exists (18.16 rejects even DROP ... IF
    // EXISTS when the request names a missing database), drop it;
    // Service::start creates it anew.
    sink.migrate()
        .await
        .map_err(|e| anyhow::anyhow!("ClickHouse migration failed: {e}"))?;
    sink.client()
        .query(&format!("DROP DATABASE {}", cfg.clickhouse.database))
        .execute()
        .await
        .with_context(|| format!("cannot reset database {}", cfg.clickhouse.database))?;
    let cluster = MockCluster::new(1).context("cannot start the in-process Kafka cluster")?;
    let partitions = 4;
    for topic in [&cfg.kafka.predictions_topic, &cfg.kafka.ground_truth_topic] {
        cluster
            .create_topic(topic, partitions, 1)
            .with_context(|| format!("cannot create topic {topic}"))?;
    }
    for topic in [&cfg.kafka.alerts_topic, &cfg.kafka.dead_letter_topic] {
        cluster
            .create_topic(topic, 1, 1)
            .with_context(|| format!("cannot create topic {topic}"))?;
    }
    cfg.kafka.brokers = cluster.bootstrap_servers();
    cfg.kafka.group_id = format!("modelwatch-demo-{}", std::process::id());
    // The demo's in-process Kafka starts empty at every run: so does its state.
    let state_dir = tempfile::Builder::new()
        .prefix("modelwatch-demo-state-")
        .tempdir()
        .context("cannot create the demo's state directory")?;
    cfg.state.dir = state_dir.path().to_path_buf();
    cfg.models
        .entry(DEMO_MODEL.to_string())
        .or_default()
        .baseline
        .entry("accuracy".to_string())
        .or_insert(DEMO_BASELINE_ACCURACY);
    let window = cfg.windows.sizes[0];

    // The stream covers whole windows and ends on a window boundary: a
    // partial first or last window would look like a volume change.
    let size_ms = window.as_millis() as i64;
    let wanted_ms = (opts.events as f64 / opts.rate * 1000.0) as i64;
    let duration_ms = ((wanted_ms + size_ms - 1) / size_ms).max(1) * size_ms;
    let rate = opts.events as f64 / (duration_ms as f64 / 1000.0);
    let scenario = Scenario {
        seed: opts.seed,
        start_ms: now_ms().div_euclid(size_ms) * size_ms - duration_ms,
        events_per_second: rate,
        count: opts.events,
        versions: vec!["v1".into(), "v2".into()],
        model_id: DEMO_MODEL.into(),
        drift: DriftScenario::Sudden,
        drift_at: 0.5,
        accuracy_drop: true,
        ..Scenario::default()
    };
    println!("modelwatch demo");
    println!(
        "  kafka: in-process cluster at {} ({partitions} partitions per input topic)",
        cfg.kafka.brokers
    );
    println!(
        "  clickhouse: {} database {}",
        cfg.clickhouse.display_url(),
        cfg.clickhouse.database
    );
    println!(
        "  traffic: {} predictions per version (v1 champion, v2 challenger) over {} of event time, windows of {}",
        opts.events,
        humantime::format_duration(Duration::from_secs((duration_ms / 1000) as u64)),
        humantime::format_duration(window)
    );
    println!("  drift: 5 features shift and accuracy drops halfway through\n");

    let mut service = Service::start(cfg.clone()).await?;
    let counters = service.counters();
    let api = if cfg.api.enabled {
        let api = crate::api::ApiServer::start(&cfg, service.telemetry()).await?;
        println!("  dashboard: {} (live while the demo runs)\n", api.url());
        Some(api)
    } else {
        None
    };
    let produce_opts = ProduceOptions {
        brokers: cfg.kafka.brokers.clone(),
        predictions_topic: cfg.kafka.predictions_topic.clone(),
        ground_truth_topic: cfg.kafka.ground_truth_topic.clone(),
        rate_limit: None,
        properties: Default::default(),
        pace: Some(Pace {
            consumed: {
                let c = counters.clone();
                Arc::new(move || c.consumed())
            },
            max_lead: 20_000,
        }),
    };
    let bad_topic = cfg.kafka.predictions_topic.clone();
    let brokers = cfg.kafka.brokers.clone();
    let producer_done = Arc::new(AtomicBool::new(false));
    let expected = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let producer_task = {
        let done = producer_done.clone();
        let expected = expected.clone();
        tokio::spawn(async move {
            let mut sent_progress = |_n: u64| {};
            let summary = produce(
                Generator::new(scenario),
                &produce_opts,
                &|ev| encode_json(ev),
                &mut sent_progress,
            )
            .await?;
            let bad = send_bad_messages(&brokers, &bad_topic).await?;
            expected.store(summary.predictions + summary.labels + bad, Ordering::SeqCst);
            done.store(true, Ordering::SeqCst);
            anyhow::Ok(summary)
        })
    };

    let started = Instant::now();
    let watch = {
        let counters = counters.clone();
        let expected = expected.clone();
        async move {
            let mut last_print = Instant::now() - Duration::from_secs(10);
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let consumed = counters.consumed();
                let target = expected.load(Ordering::SeqCst);
                if last_print.elapsed() >= Duration::from_secs(1) {
                    last_print = Instant::now();
                    let total = if target == u64::MAX {
                        "…".to_string()
                    } else {
                        target.to_string()
                    };
                    println!(
                        "  [{:>5.1}s] consumed {consumed}/{total}  rows written {}  alerts {}  dead-lettered {}",
                        started.elapsed().as_secs_f64(),
                        Counters::get(&counters.rows_written_total),
                        Counters::get(&counters.alerts_published_total),
                        Counters::get(&counters.dead_lettered_total),
                    );
                }
                if consumed >= target {
                    break;
                }
            }
        }
    };
    service.run_until(watch).await?;
    let summary = producer_task
        .await
        .context("the traffic generator panicked")??;
    // The stream is finite: close every window now.
    service.flush(now_ms(), true).await?;
    let p = service.progress();
    println!(
        "\ndone in {:.1}s: {} predictions and {} labels consumed ({} matched), {} messages dead-lettered",
        started.elapsed().as_secs_f64(),
        p.core.predictions,
        p.core.labels,
        p.core.matched,
        p.dead_lettered
    );
    let _ = summary;
    // Stop the consumer before the in-process cluster goes away.
    drop(service);
    print_summary(&sink, &cfg).await?;
    drop(cluster);
    if let Some(api) = api {
        if opts.serve {
            println!(
                "\nDashboard: {}  (drift heatmap, accuracy drop, alerts; API under /api, OpenAPI at /api/openapi.json)\nPress Ctrl-C to exit.",
                api.url()
            );
            api.serve_until(crate::app::shutdown_signal()).await;
        } else {
            api.stop().await;
        }
    }
    Ok(())
}

async fn send_bad_messages(brokers: &str, topic: &str) -> Result<u64> {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("cannot create a producer")?;
    for (i, payload) in BAD_MESSAGES.iter().enumerate() {
        let key = format!("bad-{i}");
        producer
            .send(
                FutureRecord::to(topic)
                    .key(key.as_bytes())
                    .payload(*payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .context("cannot send a malformed message")?;
    }
    Ok(BAD_MESSAGES.len() as u64)
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct Count {
    n: u64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct DriftedFeature {
    feature: String,
    windows: u64,
    max_psi: f64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct AccuracyRow {
    window_start: u32,
    model_version: String,
    value: f64,
    samples: u64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct AlertRow {
    rule: String,
    severity: String,
    n: u64,
}

async fn print_summary(sink: &ClickHouseSink, cfg: &Config) -> Result<()> {
    let db = &cfg.clickhouse.database;
    let c = sink.client();
    let windows = c
        .query(&format!(
            "SELECT toUInt64(uniqExact(window_start)) AS n FROM {db}.window_metrics FINAL WHERE model_id = ?"
        ))
        .bind(DEMO_MODEL)
        .fetch_one::<Count>()
        .await
        .context("summary query failed")?;
    let rows = c
        .query(&format!(
            "SELECT count() AS n FROM {db}.window_metrics FINAL WHERE model_id = ?"
        ))
        .bind(DEMO_MODEL)
        .fetch_one::<Count>()
        .await
        .context("summary query failed")?;
    println!(
        "\nClickHouse now holds {} rows over {} windows for {DEMO_MODEL}.",
        rows.n, windows.n
    );

    let drifted = c
        .query(&format!(
            "SELECT feature, toUInt64(countIf(metric = 'drift_detected' AND value = 1)) AS windows, \
             maxIf(value, metric = 'psi') AS max_psi \
             FROM {db}.window_metrics FINAL \
             WHERE model_id = ? AND segment = '' AND model_version = 'v1' AND feature != '' \
             GROUP BY feature HAVING windows > 0 ORDER BY max_psi DESC LIMIT 10"
        ))
        .bind(DEMO_MODEL)
        .fetch_all::<DriftedFeature>()
        .await
        .context("summary query failed")?;
    println!("\nDrifted features (v1, all traffic):");
    if drifted.is_empty() {
        println!("  none");
    }
    for d in &drifted {
        println!(
            "  {:<16} drifted in {:>2} windows, max PSI {:.3}",
            d.feature, d.windows, d.max_psi
        );
    }

    let acc = c
        .query(&format!(
            "SELECT window_start, model_version, value, samples FROM {db}.window_metrics FINAL \
             WHERE model_id = ? AND segment = '' AND metric = 'accuracy' AND feature = '' \
             ORDER BY window_start, model_version"
        ))
        .bind(DEMO_MODEL)
        .fetch_all::<AccuracyRow>()
        .await
        .context("summary query failed")?;
    println!("\nAccuracy per window (labels joined so far):");
    for a in &acc {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(a.window_start as u64);
        println!(
            "  {} {}  {:.3}  ({} labels)",
            humantime::format_rfc3339_seconds(t),
            a.model_version,
            a.value,
            a.samples
        );
    }

    let alerts = c
        .query(&format!(
            "SELECT rule, severity, count() AS n FROM {db}.alerts FINAL \
             WHERE model_id = ? AND status = 'firing' GROUP BY rule, severity ORDER BY rule"
        ))
        .bind(DEMO_MODEL)
        .fetch_all::<AlertRow>()
        .await
        .context("summary query failed")?;
    println!(
        "\nAlerts fired (also published to topic {}):",
        cfg.kafka.alerts_topic
    );
    if alerts.is_empty() {
        println!("  none");
    }
    for a in &alerts {
        println!("  {:<26} {:<8} {}", a.rule, a.severity, a.n);
    }
    println!(
        "\nExplore with clickhouse-client (or any SQL client on {}):",
        cfg.clickhouse.display_url()
    );
    println!(
        "  SELECT window_start, model_version, value FROM {db}.window_metrics FINAL\n    WHERE model_id = '{DEMO_MODEL}' AND metric = 'accuracy' AND segment = '' ORDER BY window_start;"
    );
    println!(
        "  SELECT window_start, feature, value FROM {db}.window_metrics FINAL\n    WHERE model_id = '{DEMO_MODEL}' AND metric = 'psi' AND segment = '' AND model_version = 'v1' ORDER BY window_start, value DESC;"
    );
    println!(
        "  SELECT fired_at, rule, status, severity, feature, message FROM {db}.alerts FINAL ORDER BY fired_at;"
    );
    Ok(())
}
