//! The service's own observability: tracing setup, process-wide counters of
//! what flowed through it, and the Prometheus registry behind `/metrics`.
//! (Domain statistics live in `metrics`; this module never computes them.)
//!
//! Hot paths only bump plain atomics ([`Counters`]) or hand over a per-batch
//! snapshot ([`Telemetry::record_flush`]); the Prometheus text is built from
//! those at scrape time by a collector, so a scrape costs the service
//! nothing between scrapes. Latency histograms and labelled families
//! (ClickHouse inserts, alerts, consumer lag) are updated once per flush.
//!
//! ClickHouse retries happen inside the sink's retry loop, which reports
//! each one as a `tracing` warning; [`RetryCountingLayer`] counts those
//! events so the sink stays free of telemetry plumbing.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::model::LimitHits;
use crate::pipeline::CoreStats;
use crate::sinks::clickhouse::MetricRow;

/// The `Content-Type` of [`Telemetry::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// ClickHouse request retries seen by [`RetryCountingLayer`] (process-wide:
/// the tracing subscriber is global).
static CLICKHOUSE_RETRIES: AtomicU64 = AtomicU64::new(0);

/// ClickHouse request retries counted so far in this process.
pub fn clickhouse_retries() -> u64 {
    CLICKHOUSE_RETRIES.load(Ordering::Relaxed)
}

/// Installs the tracing subscriber: `RUST_LOG` (default `default_filter`,
/// e.g. `info`), plain or JSON lines; plus [`RetryCountingLayer`], which
/// sees events whatever the log level.
pub fn init(json: bool, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.compact().with_filter(filter).boxed()
    };
    // A second init (tests, demo inside a process that has one) is harmless.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(RetryCountingLayer)
        .try_init();
}

/// Counts the ClickHouse sink's "request failed, retrying" events.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryCountingLayer;

/// The message the sink's retry loop logs for each retry.
const RETRY_MESSAGE: &str = "clickhouse request failed, retrying";

impl<S: tracing::Subscriber> Layer<S> for RetryCountingLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        if *meta.level() != tracing::Level::WARN
            || !meta.target().starts_with("modelwatch::sinks::clickhouse")
        {
            return;
        }
        struct Find(bool);
        impl tracing::field::Visit for Find {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "message" && value == RETRY_MESSAGE {
                    self.0 = true;
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" && format!("{value:?}") == RETRY_MESSAGE {
                    self.0 = true;
                }
            }
        }
        let mut f = Find(false);
        event.record(&mut f);
        if f.0 {
            CLICKHOUSE_RETRIES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counters of the ingest and sink stages (the core keeps its own, see
/// [`crate::pipeline::CoreStats`]).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages consumed from the predictions topic.
    pub predictions_consumed_total: AtomicU64,
    /// Messages consumed from the ground-truth topic.
    pub labels_consumed_total: AtomicU64,
    /// Messages that failed decoding or validation.
    pub decode_failures_total: AtomicU64,
    /// Messages written to the dead-letter topic.
    pub dead_lettered_total: AtomicU64,
    /// Rows written to `window_metrics`.
    pub rows_written_total: AtomicU64,
    /// Alert transitions published.
    pub alerts_published_total: AtomicU64,
    /// Offset commits issued.
    pub commits_total: AtomicU64,
    /// Join requests that left memory for the state store (memory budget).
    pub join_evicted_total: AtomicU64,
    /// Join requests read back from the state store.
    pub join_loaded_total: AtomicU64,
    /// Messages skipped because the state already held them (redeliveries).
    pub redelivered_total: AtomicU64,
    /// Partitions sought back because the broker resumed them past the
    /// state's position ([`crate::ingest::offsets::Step::Rewind`]).
    pub input_rewinds_total: AtomicU64,
    /// Gaps in an input partition's offsets that reading again did not fill.
    pub input_offset_gaps_total: AtomicU64,
    /// Offsets missing in those gaps.
    pub input_offsets_missing_total: AtomicU64,
    /// Times consumption was paused because output was held back
    /// (`service.max_pending_output`).
    pub input_pauses_total: AtomicU64,
    /// 1 while consumption is paused by backpressure (a gauge).
    pub input_paused: AtomicU64,
    /// Events dead-lettered for a bound of `[limits]`, in the order of
    /// [`EVENT_LIMITS`].
    pub event_limit_hits_total: [AtomicU64; EVENT_LIMITS.len()],
    /// Outputs dropped because they can never be written (rows ClickHouse
    /// rejects, messages the broker refuses for good), all outputs together;
    /// per output in `modelwatch_output_dropped_total`.
    pub output_dropped_total: AtomicU64,
    /// Dead letters whose key or payload was cut to fit `message.max.bytes`.
    pub dead_letters_truncated_total: AtomicU64,
    /// Schema ids fetched from the Schema Registry (an answer, found or not).
    pub registry_fetches_total: AtomicU64,
    /// Schema Registry requests that failed (each attempt: unreachable,
    /// timeout, 5xx, 429, or a refusal such as 401).
    pub registry_fetch_failures_total: AtomicU64,
    /// Schema ids the registry answered for good without a usable Avro
    /// schema (not found, another schema type, unparseable): their
    /// messages are dead letters of kind `schema`.
    pub registry_unknown_ids_total: AtomicU64,
    /// Schema ids evicted from the cache (`kafka.schema_registry.max_schemas`).
    pub registry_schemas_evicted_total: AtomicU64,
}

/// The `[limits]` bounds a single event is checked against
/// ([`crate::ingest::bounds`]): an event beyond one is a dead letter.
pub const EVENT_LIMITS: [&str; 5] = [
    "max_features",
    "max_segment_keys",
    "max_identifier_bytes",
    "max_future_skew",
    "max_event_age",
];

impl Counters {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets a counter kept elsewhere (e.g. by a cache) to its total.
    pub fn set(c: &AtomicU64, total: u64) {
        c.store(total, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Counts an event dead-lettered for the `[limits]` key `limit`.
    pub fn add_event_limit_hit(&self, limit: &str) {
        if let Some(i) = EVENT_LIMITS.iter().position(|l| *l == limit) {
            Self::add(&self.event_limit_hits_total[i], 1);
        }
    }

    /// Every cap's hits: the per-event bounds counted here and the core's
    /// caps in `core`, by `[limits]` key.
    pub fn limit_hits(&self, core: &LimitHits) -> Vec<(&'static str, u64)> {
        let mut v: Vec<(&'static str, u64)> = EVENT_LIMITS
            .iter()
            .zip(&self.event_limit_hits_total)
            .map(|(l, c)| (*l, Self::get(c)))
            .collect();
        for (l, n) in core.entries() {
            match v.iter_mut().find(|(k, _)| *k == l) {
                Some((_, m)) => *m += n,
                None => v.push((l, n)),
            }
        }
        v
    }

    /// Messages consumed from both input topics (not counting those skipped
    /// as already in the state).
    pub fn consumed(&self) -> u64 {
        Self::get(&self.predictions_consumed_total) + Self::get(&self.labels_consumed_total)
    }
}

/// Label set of the labelled families: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

/// What the readiness probe needs to know about the Kafka side, updated by
/// the service at every flush.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Input partitions currently assigned to this instance.
    pub partitions_assigned: AtomicU64,
    /// Partitions of both input topics together (0 until known): more
    /// than assigned means another instance shares the consumer group.
    pub input_partitions: AtomicU64,
    /// Whether the last Kafka interaction (consume or commit) succeeded.
    pub kafka_ok: AtomicBool,
    /// Whether the service loop is running (false before start and after stop).
    pub running: AtomicBool,
}

/// What one flush observed, handed to [`Telemetry::record_flush`].
#[derive(Debug, Clone, Default)]
pub struct FlushReport {
    /// Core counters after the flush.
    pub core: CoreStats,
    /// Predictions waiting for labels.
    pub pending_predictions: u64,
    /// Wall clock minus the watermark, seconds (when there is a watermark).
    pub watermark_delay_s: Option<f64>,
    /// For each window written in this flush: wall clock minus its end, seconds.
    pub window_close_latencies_s: Vec<f64>,
    /// Consumer lag per `(topic, partition)`, messages.
    pub lag: Vec<(String, i32, i64)>,
}

/// The service's operational metrics: everything `/metrics` shows.
#[derive(Debug)]
pub struct Telemetry {
    /// Hot-path counters (shared with the service loop).
    pub counters: Arc<Counters>,
    /// Readiness inputs.
    pub readiness: Arc<Readiness>,
    registry: Registry,
    snapshot: Arc<Snapshot>,
    window_close_latency: Histogram,
    insert_latency: Family<Labels, Histogram>,
    insert_rows: Family<Labels, Counter>,
    insert_errors: Family<Labels, Counter>,
    alerts_fired: Family<Labels, Counter>,
    webhook_deliveries: Family<Labels, Counter>,
    webhook_failures: Family<Labels, Counter>,
    output_dropped: Family<Labels, Counter>,
    consumer_lag: Family<Labels, Gauge>,
    watermark_delay: Gauge<f64, AtomicU64>,
    checkpoint_duration: Histogram,
    checkpoint_join_records: Counter,
    state_store_bytes: Gauge,
    service: Mutex<ServiceWindows>,
    http_limited: Family<Labels, Counter>,
}

/// Values read by the scrape-time collector.
#[derive(Debug)]
struct Snapshot {
    counters: Arc<Counters>,
    predictions_topic: String,
    ground_truth_topic: String,
    core: Mutex<CoreStats>,
    pending: AtomicI64,
    started: Instant,
}

impl Telemetry {
    /// A registry for a service reading `predictions_topic` and `ground_truth_topic`.
    pub fn new(predictions_topic: &str, ground_truth_topic: &str) -> Self {
        let counters = Arc::new(Counters::default());
        let mut registry = Registry::with_prefix("modelwatch");
        let snapshot = Arc::new(Snapshot {
            counters: counters.clone(),
            predictions_topic: predictions_topic.to_owned(),
            ground_truth_topic: ground_truth_topic.to_owned(),
            core: Mutex::new(CoreStats::default()),
            pending: AtomicI64::new(0),
            started: Instant::now(),
        });
        registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
        let window_close_latency = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        registry.register(
            "window_close_latency_seconds",
            "Wall-clock time from a window's end to its rows being durable in ClickHouse",
            window_close_latency.clone(),
        );
        // 1 ms .. ~65 s: ClickHouse inserts.
        let insert_latency: Family<Labels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 17)));
        registry.register(
            "clickhouse_insert_duration_seconds",
            "Duration of one ClickHouse write (all batches and retries of it), per table",
            insert_latency.clone(),
        );
        let insert_rows = Family::<Labels, Counter>::default();
        registry.register(
            "clickhouse_rows",
            "Rows written to ClickHouse, per table",
            insert_rows.clone(),
        );
        let insert_errors = Family::<Labels, Counter>::default();
        registry.register(
            "clickhouse_insert_errors",
            "ClickHouse writes that failed after their retries, per table and kind",
            insert_errors.clone(),
        );
        let alerts_fired = Family::<Labels, Counter>::default();
        registry.register(
            "alerts",
            "Alert transitions published, per rule, status and severity",
            alerts_fired.clone(),
        );
        let webhook_deliveries = Family::<Labels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook notifications delivered, per target",
            webhook_deliveries.clone(),
        );
        let webhook_failures = Family::<Labels, Counter>::default();
        registry.register(
            "webhook_failures",
            "Webhook notifications that failed after their retries, per target",
            webhook_failures.clone(),
        );
        let output_dropped = Family::<Labels, Counter>::default();
        registry.register(
            "output_dropped",
            "Outputs that can never be written, dropped after bounded retries, per output (clickhouse, alerts, dead_letter) and target (table or topic)",
            output_dropped.clone(),
        );
        let consumer_lag = Family::<Labels, Gauge>::default();
        registry.register(
            "consumer_lag_messages",
            "Messages between the consumer position and the partition's high watermark",
            consumer_lag.clone(),
        );
        let watermark_delay = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "watermark_delay_seconds",
            "Wall clock minus the event-time watermark",
            watermark_delay.clone(),
        );
        // 1 ms .. ~16 s: one state checkpoint, fsync included.
        let checkpoint_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "checkpoint_duration_seconds",
            "Duration of one state checkpoint (one store transaction, fsync included)",
            checkpoint_duration.clone(),
        );
        let checkpoint_join_records = Counter::default();
        registry.register(
            "checkpoint_join_records",
            "Join records (request ids) written or deleted by checkpoints",
            checkpoint_join_records.clone(),
        );
        let state_store_bytes = Gauge::default();
        registry.register(
            "state_store_bytes",
            "Size of the state store file on disk",
            state_store_bytes.clone(),
        );
        let http_limited = Family::<Labels, Counter>::default();
        registry.register(
            "http_limited",
            "HTTP requests or connections cut by a limit of [api], per limit (header_read_timeout, request_timeout, max_connections, max_concurrent_requests, host, max_range, max_rows)",
            http_limited.clone(),
        );
        Telemetry {
            counters,
            readiness: Arc::new(Readiness::default()),
            registry,
            snapshot,
            window_close_latency,
            insert_latency,
            insert_rows,
            insert_errors,
            alerts_fired,
            webhook_deliveries,
            webhook_failures,
            output_dropped,
            consumer_lag,
            watermark_delay,
            checkpoint_duration,
            checkpoint_join_records,
            state_store_bytes,
            service: Mutex::new(ServiceWindows {
                window_ms: 300_000,
                instance: instance_name(),
                current: None,
            }),
            http_limited,
        }
    }

    /// A registry for the service `cfg` describes; its health rows are
    /// written per window of the first configured window size.
    pub fn for_config(cfg: &crate::config::Config) -> Self {
        let t = Telemetry::new(&cfg.kafka.predictions_topic, &cfg.kafka.ground_truth_topic);
        if let (Ok(mut s), Some(w)) = (t.service.lock(), cfg.windows.sizes.first()) {
            s.window_ms = i64::try_from(w.as_millis()).unwrap_or(300_000).max(1000);
        }
        t
    }

    /// The instance name of this process's `__service__` rows (`host:pid`).
    pub fn instance(&self) -> String {
        self.service
            .lock()
            .map(|s| s.instance.clone())
            .unwrap_or_default()
    }

    /// The `__service__` rows of every wall-clock window that ended by
    /// `now_ms` (called at each flush, after [`Telemetry::record_flush`]):
    /// counter deltas over the window (`*_count`, `cpu_seconds`) and gauges
    /// at its end.
    pub fn service_rows(&self, now_ms: i64, report: &FlushReport) -> Vec<MetricRow> {
        let totals = self.totals(report);
        let Ok(mut s) = self.service.lock() else {
            return Vec::new();
        };
        let start = now_ms.div_euclid(s.window_ms) * s.window_ms;
        let Some((cur, base)) = s.current.clone() else {
            s.current = Some((start, totals));
            return Vec::new();
        };
        if start <= cur {
            return Vec::new();
        }
        s.current = Some((start, totals.clone()));
        let row = |metric: &str, feature: &str, value: f64| MetricRow {
            model_id: crate::api::SERVICE_MODEL.to_owned(),
            model_version: s.instance.clone(),
            segment: String::new(),
            window_start: u32::try_from(cur.div_euclid(1000)).unwrap_or(0),
            window_seconds: u32::try_from(s.window_ms / 1000).unwrap_or(300),
            metric: metric.to_owned(),
            feature: feature.to_owned(),
            value,
            samples: 1,
            p_value: None,
            revision: 0,
        };
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
        let mut rows = vec![
            row(
                "events_consumed_count",
                &self.snapshot.predictions_topic,
                d(totals.predictions_consumed, base.predictions_consumed),
            ),
            row(
                "events_consumed_count",
                &self.snapshot.ground_truth_topic,
                d(totals.labels_consumed, base.labels_consumed),
            ),
            row(
                "decode_failure_count",
                "",
                d(totals.decode_failures, base.decode_failures),
            ),
            row(
                "dead_letter_count",
                "",
                d(totals.dead_letters, base.dead_letters),
            ),
            row(
                "join_match_count",
                "",
                d(totals.core.matched, base.core.matched),
            ),
            row(
                "join_expiration_count",
                "",
                d(totals.core.expired, base.core.expired),
            ),
            row(
                "join_orphan_count",
                "",
                d(totals.core.orphans, base.core.orphans),
            ),
            row(
                "late_prediction_count",
                "",
                d(totals.core.late_predictions, base.core.late_predictions),
            ),
            row(
                "join_duplicate_count",
                "",
                d(
                    totals.core.duplicate_predictions + totals.core.duplicate_labels,
                    base.core.duplicate_predictions + base.core.duplicate_labels,
                ),
            ),
            row(
                "window_closed_count",
                "",
                d(totals.core.windows_closed, base.core.windows_closed),
            ),
            row(
                "row_written_count",
                "",
                d(totals.rows_written, base.rows_written),
            ),
            row("alert_count", "", d(totals.alerts, base.alerts)),
            row(
                "output_dropped_count",
                "",
                d(totals.output_dropped, base.output_dropped),
            ),
            row(
                "dead_letter_truncated_count",
                "",
                d(totals.dead_letters_truncated, base.dead_letters_truncated),
            ),
            row(
                "clickhouse_retry_count",
                "",
                d(totals.retries, base.retries),
            ),
            row("pending_predictions", "", report.pending_predictions as f64),
            row(
                "consumer_lag_messages",
                "",
                report.lag.iter().map(|l| l.2.max(0) as f64).sum(),
            ),
        ];
        for (limit, n) in &totals.limit_hits {
            let before = base
                .limit_hits
                .iter()
                .find(|(l, _)| l == limit)
                .map_or(0, |(_, b)| *b);
            rows.push(row("limit_hit_count", limit, d(*n, before)));
        }
        if let Some(w) = report.watermark_delay_s {
            rows.push(row("watermark_delay_seconds", "", w));
        }
        if let Some(p) = process_stats() {
            rows.push(row(
                "cpu_seconds",
                "",
                (p.cpu_seconds - base.cpu_seconds).max(0.0),
            ));
            rows.push(row("resident_memory_bytes", "", p.resident_bytes as f64));
        }
        rows
    }

    fn totals(&self, report: &FlushReport) -> Totals {
        let c = &self.counters;
        Totals {
            predictions_consumed: Counters::get(&c.predictions_consumed_total),
            labels_consumed: Counters::get(&c.labels_consumed_total),
            decode_failures: Counters::get(&c.decode_failures_total),
            dead_letters: Counters::get(&c.dead_lettered_total),
            rows_written: Counters::get(&c.rows_written_total),
            alerts: Counters::get(&c.alerts_published_total),
            output_dropped: Counters::get(&c.output_dropped_total),
            dead_letters_truncated: Counters::get(&c.dead_letters_truncated_total),
            retries: clickhouse_retries(),
            core: report.core,
            limit_hits: c.limit_hits(&report.core.limits),
            cpu_seconds: process_stats().map_or(0.0, |p| p.cpu_seconds),
        }
    }

    /// Records whether consumption is paused by backpressure.
    pub fn set_input_paused(&self, paused: bool) {
        self.counters
            .input_paused
            .store(u64::from(paused), Ordering::Relaxed);
    }

    /// Records what a flush observed (once per flush, not per event).
    pub fn record_flush(&self, r: &FlushReport) {
        if let Ok(mut core) = self.snapshot.core.lock() {
            *core = r.core;
        }
        self.snapshot.pending.store(
            i64::try_from(r.pending_predictions).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        if let Some(d) = r.watermark_delay_s {
            self.watermark_delay.set(d);
        }
        for l in &r.window_close_latencies_s {
            self.window_close_latency.observe(*l);
        }
        for (topic, partition, lag) in &r.lag {
            self.consumer_lag
                .get_or_create(&vec![
                    ("topic".to_owned(), topic.clone()),
                    ("partition".to_owned(), partition.to_string()),
                ])
                .set(*lag);
        }
    }

    /// Records one state checkpoint and the store's size after it.
    pub fn record_checkpoint(&self, c: &crate::state::CheckpointStats, store_bytes: u64) {
        self.checkpoint_duration.observe(c.seconds);
        self.checkpoint_join_records
            .inc_by((c.join_upserts + c.join_deletes) as u64);
        self.state_store_bytes
            .set(i64::try_from(store_bytes).unwrap_or(i64::MAX));
    }

    /// Records one successful ClickHouse write of `rows` rows to `table`.
    pub fn record_insert(&self, table: &str, rows: usize, seconds: f64) {
        let l = vec![("table".to_owned(), table.to_owned())];
        self.insert_latency.get_or_create(&l).observe(seconds);
        self.insert_rows.get_or_create(&l).inc_by(rows as u64);
    }

    /// Records one failed ClickHouse write to `table` (`kind`: `transient` or `permanent`).
    pub fn record_insert_error(&self, table: &str, kind: &str) {
        self.insert_errors
            .get_or_create(&vec![
                ("table".to_owned(), table.to_owned()),
                ("kind".to_owned(), kind.to_owned()),
            ])
            .inc();
    }

    /// Records one published alert transition.
    pub fn record_alert(&self, rule: &str, status: &str, severity: &str) {
        self.alerts_fired
            .get_or_create(&vec![
                ("rule".to_owned(), rule.to_owned()),
                ("status".to_owned(), status.to_owned()),
                ("severity".to_owned(), severity.to_owned()),
            ])
            .inc();
    }

    /// Records one webhook notification to `target`, delivered or failed.
    pub fn record_webhook(&self, target: &str, delivered: bool) {
        let l = vec![("target".to_owned(), target.to_owned())];
        if delivered {
            self.webhook_deliveries.get_or_create(&l).inc();
        } else {
            self.webhook_failures.get_or_create(&l).inc();
        }
    }

    /// Records `n` outputs dropped because they can never be written:
    /// `output` is `clickhouse`, `alerts` or `dead_letter`, `target` the
    /// table or topic.
    pub fn record_output_dropped(&self, output: &str, target: &str, n: u64) {
        if n == 0 {
            return;
        }
        Counters::add(&self.counters.output_dropped_total, n);
        self.output_dropped
            .get_or_create(&vec![
                ("output".to_owned(), output.to_owned()),
                ("target".to_owned(), target.to_owned()),
            ])
            .inc_by(n);
    }

    /// Records one HTTP request or connection cut (or made to wait) by the
    /// `[api]` limit `limit`.
    pub fn record_http_limit(&self, limit: &str) {
        self.http_limited
            .get_or_create(&vec![("limit".to_owned(), limit.to_owned())])
            .inc();
    }

    /// The Prometheus / OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a collector error would only
        // truncate the text.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Counter totals at a window boundary.
#[derive(Debug, Clone, Default)]
struct Totals {
    predictions_consumed: u64,
    labels_consumed: u64,
    decode_failures: u64,
    dead_letters: u64,
    rows_written: u64,
    alerts: u64,
    output_dropped: u64,
    dead_letters_truncated: u64,
    retries: u64,
    core: CoreStats,
    limit_hits: Vec<(&'static str, u64)>,
    cpu_seconds: f64,
}

/// The wall-clock window the `__service__` rows are being gathered for.
#[derive(Debug)]
struct ServiceWindows {
    window_ms: i64,
    instance: String,
    /// Start of the current window and the totals at its start.
    current: Option<(i64, Totals)>,
}

/// `host:pid`: a restart is a new instance, two instances on one host differ.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// Encodes the hot-path counters and the core snapshot at scrape time.
#[derive(Debug)]
struct SnapshotCollector(Arc<Snapshot>);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn gauge<N>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(value);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let c = &s.counters;
        {
            let consumed = ConstCounter::new(0u64);
            let mut m = enc.encode_descriptor(
                "events_consumed",
                "Messages consumed, per input topic",
                None,
                consumed.metric_type(),
            )?;
            for (topic, n) in [
                (
                    &s.predictions_topic,
                    Counters::get(&c.predictions_consumed_total),
                ),
                (
                    &s.ground_truth_topic,
                    Counters::get(&c.labels_consumed_total),
                ),
            ] {
                let labels = [("topic", topic.as_str())];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut enc,
            "decode_failures",
            "Messages that failed decoding or validation",
            Counters::get(&c.decode_failures_total),
        )?;
        counter(
            &mut enc,
            "dead_letters",
            "Messages written to the dead-letter topic",
            Counters::get(&c.dead_lettered_total),
        )?;
        for (name, help, c) in [
            (
                "registry_fetches",
                "Schema ids fetched from the Schema Registry (found or not)",
                &c.registry_fetches_total,
            ),
            (
                "registry_fetch_failures",
                "Schema Registry requests that failed (unreachable, timeout, 5xx, 429, refused)",
                &c.registry_fetch_failures_total,
            ),
            (
                "registry_unknown_ids",
                "Schema ids without a usable Avro schema in the registry (their messages are dead letters of kind schema)",
                &c.registry_unknown_ids_total,
            ),
            (
                "registry_schemas_evicted",
                "Schema ids evicted from the cache (kafka.schema_registry.max_schemas)",
                &c.registry_schemas_evicted_total,
            ),
        ] {
            counter(&mut enc, name, help, Counters::get(c))?;
        }
        counter(
            &mut enc,
            "dead_letters_truncated",
            "Dead letters whose key or payload was cut to fit the producer's message.max.bytes",
            Counters::get(&c.dead_letters_truncated_total),
        )?;
        counter(
            &mut enc,
            "window_rows_written",
            "Rows written to window_metrics",
            Counters::get(&c.rows_written_total),
        )?;
        counter(
            &mut enc,
            "offset_commits",
            "Input offset commits issued",
            Counters::get(&c.commits_total),
        )?;
        counter(
            &mut enc,
            "join_evicted_requests",
            "Join requests that left memory for the state store (state.memory_budget)",
            Counters::get(&c.join_evicted_total),
        )?;
        counter(
            &mut enc,
            "join_loaded_requests",
            "Join requests read back from the state store for an event or their expiry",
            Counters::get(&c.join_loaded_total),
        )?;
        counter(
            &mut enc,
            "redelivered_messages",
            "Messages skipped because the restored state already held them",
            Counters::get(&c.redelivered_total),
        )?;
        counter(
            &mut enc,
            "input_rewinds",
            "Input partitions read again from further back because the broker resumed them past the state's position",
            Counters::get(&c.input_rewinds_total),
        )?;
        counter(
            &mut enc,
            "input_offset_gaps",
            "Gaps in an input partition's offsets that reading again did not fill (compaction, transaction markers, retention)",
            Counters::get(&c.input_offset_gaps_total),
        )?;
        counter(
            &mut enc,
            "input_offsets_missing",
            "Offsets missing in input_offset_gaps",
            Counters::get(&c.input_offsets_missing_total),
        )?;
        counter(
            &mut enc,
            "clickhouse_retries",
            "ClickHouse requests retried after a transient error",
            clickhouse_retries(),
        )?;
        let core = s.core.lock().map(|g| *g).unwrap_or_default();
        for (name, help, v) in [
            (
                "predictions",
                "Predictions processed by the core",
                core.predictions,
            ),
            ("labels", "Labels processed by the core", core.labels),
            (
                "join_matches",
                "Prediction-label pairs joined",
                core.matched,
            ),
            (
                "join_expirations",
                "Predictions that expired without a label",
                core.expired,
            ),
            (
                "join_orphans",
                "Labels that never found a prediction",
                core.orphans,
            ),
            ("windows_closed", "Windows closed", core.windows_closed),
            (
                "late_predictions",
                "Predictions that arrived after their window closed (left out of its metrics)",
                core.late_predictions,
            ),
            (
                "late_labels",
                "Labels whose prediction arrived after its window closed",
                core.late_labels,
            ),
        ] {
            counter(&mut enc, name, help, v)?;
        }
        {
            let d = ConstCounter::new(0u64);
            let mut m = enc.encode_descriptor(
                "limit_hits",
                "Values folded, left out or refused because of a cap of [limits], per cap (its key)",
                None,
                d.metric_type(),
            )?;
            for (limit, n) in c.limit_hits(&core.limits) {
                ConstCounter::new(n).encode(m.encode_family(&[("limit", limit)])?)?;
            }
        }
        {
            let d = ConstCounter::new(0u64);
            let mut m = enc.encode_descriptor(
                "join_duplicates",
                "Duplicate events left out of the metrics, per kind",
                None,
                d.metric_type(),
            )?;
            for (kind, n) in [
                ("prediction", core.duplicate_predictions),
                ("label", core.duplicate_labels),
            ] {
                ConstCounter::new(n).encode(m.encode_family(&[("kind", kind)])?)?;
            }
        }
        gauge(
            &mut enc,
            "input_paused",
            "1 while consumption is paused because output waits to be written (service.max_pending_output)",
            Counters::get(&c.input_paused),
        )?;
        counter(
            &mut enc,
            "input_pauses",
            "Times consumption was paused because output waited to be written",
            Counters::get(&c.input_pauses_total),
        )?;
        gauge(
            &mut enc,
            "pending_predictions",
            "Predictions waiting for their label (join state size)",
            s.pending.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut enc,
            "uptime_seconds",
            "Seconds since the service started",
            s.started.elapsed().as_secs_f64(),
        )?;
        if let Some(p) = process_stats() {
            // Unprefixed: the conventional names dashboards expect.
            let cpu = ConstCounter::new(p.cpu_seconds);
            let m = enc.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time of the process",
                None,
                cpu.metric_type(),
            )?;
            cpu.encode(m)?;
            gauge(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory of the process",
                p.resident_bytes as i64,
            )?;
        }
        Ok(())
    }
}

/// CPU time and memory of this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
}

/// Reads this process's CPU time and resident memory from `/proc` (Linux);
/// `None` elsewhere or when `/proc` is unreadable.
pub fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    parse_process_stats(&stat, &statm, clock_ticks(), page_size())
}

/// Parses `/proc/self/stat` and `/proc/self/statm`.
fn parse_process_stats(stat: &str, statm: &str, ticks: f64, page: u64) -> Option<ProcessStats> {
    // The command name (field 2) may hold spaces: fields count from after ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(ProcessStats {
        cpu_seconds: (utime + stime) / ticks,
        resident_bytes: pages.saturating_mul(page),
    })
}

/// Clock ticks per second of `/proc` CPU times (`_SC_CLK_TCK`): 100 on every
/// Linux architecture this runs on.
fn clock_ticks() -> f64 {
    100.0
}

/// Memory page size; 4 KiB unless `/proc/self/smaps` says otherwise.
fn page_size() -> u64 {
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("KernelPageSize:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(4096, |kb| kb * 1024)
}

/// Rate-limited log lines: at most one per kind per interval, carrying how
/// many occurrences it stands for and one example. Pure (the caller passes
/// the time), so the service decides when lines are written; the counters
/// stay exact whatever is logged.
#[derive(Debug)]
pub struct LogLimiter {
    interval: std::time::Duration,
    kinds: std::collections::BTreeMap<String, KindLog>,
}

#[derive(Debug, Default)]
struct KindLog {
    /// When the last line of this kind was written.
    last: Option<Instant>,
    /// Occurrences since that line.
    pending: u64,
    /// The first of those occurrences.
    example: Option<String>,
}

/// One line a [`LogLimiter`] lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The kind of occurrence.
    pub kind: String,
    /// Occurrences since the previous line of this kind.
    pub count: u64,
    /// One of them.
    pub example: String,
}

impl LogLimiter {
    /// At most one line per kind per `interval`.
    pub fn new(interval: std::time::Duration) -> Self {
        LogLimiter {
            interval,
            kinds: std::collections::BTreeMap::new(),
        }
    }

    /// Notes `n` occurrences of `kind` at `now` (`example` describes one);
    /// returns the line to write if one is due.
    pub fn note(
        &mut self,
        kind: &str,
        n: u64,
        now: Instant,
        example: impl FnOnce() -> String,
    ) -> Option<LogLine> {
        if n == 0 {
            return None;
        }
        let k = self.kinds.entry(kind.to_owned()).or_default();
        k.pending += n;
        if k.example.is_none() {
            k.example = Some(example());
        }
        let due = k
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        due.then(|| Self::take(kind, k, now))
    }

    /// Lines due at `now` for kinds with occurrences not yet logged.
    pub fn due(&mut self, now: Instant) -> Vec<LogLine> {
        let interval = self.interval;
        self.kinds
            .iter_mut()
            .filter(|(_, k)| {
                k.pending > 0
                    && k.last
                        .is_none_or(|t| now.saturating_duration_since(t) >= interval)
            })
            .map(|(kind, k)| Self::take(kind, k, now))
            .collect()
    }

    fn take(kind: &str, k: &mut KindLog, now: Instant) -> LogLine {
        k.last = Some(now);
        LogLine {
            kind: kind.to_owned(),
            count: std::mem::take(&mut k.pending),
            example: k.example.take().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_parsed_even_with_spaces_in_the_name() {
        let stat = "4242 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 1000 300";
        let p = parse_process_stats(stat, "1000 300 10 1 0 5 0", 100.0, 4096).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.resident_bytes, 300 * 4096);
        assert!(parse_process_stats("garbage", "", 100.0, 4096).is_none());
        let live = process_stats().expect("linux /proc");
        assert!(live.resident_bytes > 0);
    }

    #[test]
    fn encoded_text_holds_counters_histograms_and_labels() {
        let t = Telemetry::new("predictions", "ground-truth");
        Counters::add(&t.counters.predictions_consumed_total, 7);
        Counters::add(&t.counters.labels_consumed_total, 3);
        t.record_flush(&FlushReport {
            core: CoreStats {
                matched: 2,
                duplicate_labels: 1,
                ..CoreStats::default()
            },
            pending_predictions: 5,
            watermark_delay_s: Some(1.5),
            window_close_latencies_s: vec![2.0],
            lag: vec![("predictions".into(), 0, 12)],
        });
        t.record_insert("window_metrics", 10, 0.02);
        t.record_alert("feature_drift", "firing", "warning");
        let text = t.encode();
        for want in [
            "modelwatch_events_consumed_total{topic=\"predictions\"} 7",
            "modelwatch_events_consumed_total{topic=\"ground-truth\"} 3",
            "modelwatch_join_matches_total 2",
            "modelwatch_join_duplicates_total{kind=\"label\"} 1",
            "modelwatch_pending_predictions 5",
            "modelwatch_watermark_delay_seconds 1.5",
            "modelwatch_window_close_latency_seconds_count 1",
            "modelwatch_consumer_lag_messages{topic=\"predictions\",partition=\"0\"} 12",
            "modelwatch_clickhouse_rows_total{table=\"window_metrics\"} 10",
            "modelwatch_clickhouse_insert_duration_seconds_count{table=\"window_metrics\"} 1",
            "modelwatch_alerts_total{rule=\"feature_drift\",status=\"firing\",severity=\"warning\"} 1",
            "modelwatch_process_cpu_seconds_total",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[tokio::test]
    async fn sink_retries_are_counted_from_their_log_events() {
        use crate::sinks::clickhouse::{RetryPolicy, SinkError};
        let subscriber = tracing_subscriber::registry().with(RetryCountingLayer);
        let _guard = tracing::subscriber::set_default(subscriber);
        let before = clickhouse_retries();
        let p = RetryPolicy {
            max_attempts: 3,
            initial_backoff: std::time::Duration::from_millis(1),
            max_backoff: std::time::Duration::from_millis(2),
        };
        let r: Result<(), _> = p
            .run("t", || async { Err(SinkError::Transient("down".into())) })
            .await;
        assert!(r.is_err());
        // Three attempts: two retries (other tests may add their own).
        assert!(clickhouse_retries() >= before + 2);
    }

    #[test]
    fn log_limiter_writes_one_line_per_kind_and_interval_with_counts() {
        let t0 = Instant::now();
        let s = std::time::Duration::from_secs;
        let mut l = LogLimiter::new(s(10));
        // The first occurrence of a kind is logged at once.
        let line = l.note("decode", 1, t0, || "p0@1".into()).unwrap();
        assert_eq!((line.count, line.example.as_str()), (1, "p0@1"));
        // Within the interval: counted, not logged, whatever the kind's volume.
        for i in 0..1000u64 {
            assert!(l
                .note("decode", 1, t0 + s(1), || format!("p0@{i}"))
                .is_none());
        }
        // Another kind has its own interval.
        assert!(l
            .note("timestamp", 3, t0 + s(2), || "p1@7".into())
            .is_some());
        assert!(l.due(t0 + s(9)).is_empty());
        // Once the interval has passed, the flush-time check writes the rest.
        let due = l.due(t0 + s(10));
        assert_eq!(
            due,
            vec![LogLine {
                kind: "decode".into(),
                count: 1000,
                example: "p0@0".into()
            }]
        );
        assert!(l.due(t0 + s(30)).is_empty());
        // The next occurrence after a quiet interval is logged at once.
        let line = l
            .note("decode", 2, t0 + s(21), || "p0@5000".into())
            .unwrap();
        assert_eq!(line.count, 2);
        assert!(l.note("decode", 0, t0 + s(60), || unreachable!()).is_none());
    }
}
