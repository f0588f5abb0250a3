//! Wires the stages: Kafka consumer → decode → [`Core`] → ClickHouse, alerts
//! topic, dead-letter topic; then commits the input offsets whose output is
//! durable.
//!
//! Order of a flush (every `flush_interval`): advance the core to the
//! watermark, write reference profiles, model versions, window rows and
//! alerts to ClickHouse, publish alerts and dead letters to Kafka. A failed
//! write keeps everything pending and retries on the next flush (all writes
//! are idempotent). An output that can never be written is dropped and
//! counted (`modelwatch_output_dropped_total`) so it cannot hold checkpoints
//! back: rows ClickHouse rejects for their data (the sink isolates them),
//! messages the broker refuses for good after a few attempts. A setup error
//! of ClickHouse (authentication, grants, a missing table) stops the service
//! with the reason: the state stays at the last checkpoint, and a restart
//! after the fix (which also re-creates a missing database or table)
//! replays from there, so nothing is lost. Dead-letter log lines are
//! rate-limited ([`DEAD_LETTER_LOG_INTERVAL`]).
//!
//! Every `state.checkpoint_interval`, after a flush that wrote everything,
//! the core's state and the input positions go to the state store in one
//! transaction ([`crate::state`]), and only then are the positions committed
//! to Kafka. At startup the last checkpoint is restored; messages Kafka
//! delivers again below a checkpointed position are skipped.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures::FutureExt;
use rdkafka::message::{Headers, Message};

use crate::config::{AlertFraming, Config, Format, JOIN_BYTES_PER_REQUEST};
use crate::ingest::bounds::EventBounds;
use crate::ingest::consumer::{
    commit, group_instance_id, input_consumer, release_revoked, Assignment, InputConsumer,
};
use crate::ingest::decode::{Decoder, EventKind, ALERT_SCHEMA};
use crate::ingest::mapping::Mappings;
use crate::ingest::offsets::{Positions, Step};
use crate::ingest::registry::Registry;
use crate::join::Source;
use crate::metrics::aggregator::{WindowHistogram, WindowRow};
use crate::metrics::ReferenceProfile;
use crate::model::{AlertEvent, InputEvent};
use crate::pipeline::{Core, CoreStats, Output};
use crate::sinks::clickhouse::{ClickHouseSink, HistogramRow, MetricRow, SinkError, VersionRow};
use crate::sinks::kafka::{
    check_output_topics, message_max_bytes, producer, AlertPublisher, DeadLetter, DeadLetterQueue,
};
use crate::sinks::webhook::{DeliveryRecord, Notifier};
use crate::state::{Checkpoint, Identity, JoinReader, StateStore};
use crate::telemetry::{Counters, FlushReport, LogLimiter, Telemetry};
use rdkafka::consumer::Consumer;

/// At most one dead-letter log line per error kind per interval (with the
/// count since the previous line and one example); the counters are exact.
pub const DEAD_LETTER_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Messages handled per wake-up of the consumer loop before it looks at its
/// timers again.
const MAX_DRAIN: usize = 4096;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Converts a window row to its ClickHouse form.
pub fn metric_row(r: &WindowRow) -> MetricRow {
    MetricRow {
        model_id: r.model_id.to_string(),
        model_version: r.model_version.to_string(),
        segment: r.segment.to_string(),
        window_start: (r.window_start_ms.div_euclid(1000)).clamp(0, u32::MAX as i64) as u32,
        window_seconds: (r.window_ms / 1000).clamp(0, u32::MAX as i64) as u32,
        metric: r.value.metric.to_string(),
        feature: r.value.feature.clone(),
        value: r.value.value,
        samples: r.value.samples,
        p_value: r.value.p_value.filter(|p| p.is_finite()),
        revision: r.revision,
    }
}

/// Converts a window histogram to its ClickHouse form (revision 0, like the
/// data rows written at close).
pub fn histogram_row(h: &WindowHistogram) -> HistogramRow {
    HistogramRow {
        model_id: h.model_id.to_string(),
        model_version: h.model_version.to_string(),
        segment: h.segment.to_string(),
        window_start: (h.window_start_ms.div_euclid(1000)).clamp(0, u32::MAX as i64) as u32,
        window_seconds: (h.window_ms / 1000).clamp(0, u32::MAX as i64) as u32,
        feature: h.histogram.feature.clone(),
        kind: h.histogram.kind.as_str().to_owned(),
        counts: h.histogram.counts.clone(),
        revision: 0,
    }
}

/// Output waiting to be written.
#[derive(Default)]
struct Pending {
    rows: Vec<MetricRow>,
    histograms: Vec<HistogramRow>,
    alerts: Vec<AlertEvent>,
    versions: Vec<VersionRow>,
    references: Vec<(Arc<str>, Arc<str>, Arc<ReferenceProfile>)>,
    letters: Vec<DeadLetter>,
    deliveries: Vec<DeliveryRecord>,
    watermark: Option<i64>,
    /// Ends (ms) of the windows whose rows are pending, for the close latency.
    closed_ends: Vec<i64>,
}

impl Pending {
    /// Approximate heap bytes of the output held (for
    /// `service.max_pending_output`): each row's strings and a fixed cost
    /// per row, each histogram's counts, each dead letter's bytes.
    fn approx_bytes(&self) -> usize {
        const ROW: usize = 160;
        let rows: usize = self
            .rows
            .iter()
            .map(|r| {
                ROW + r.model_id.len()
                    + r.model_version.len()
                    + r.segment.len()
                    + r.metric.len()
                    + r.feature.len()
            })
            .sum();
        let histograms: usize = self
            .histograms
            .iter()
            .map(|h| ROW + h.feature.len() + h.segment.len() + h.counts.len() * 8)
            .sum();
        let letters: usize = self
            .letters
            .iter()
            .map(|l| ROW + l.payload.len() + l.reason.len() + l.key.as_ref().map_or(0, Vec::len))
            .sum();
        rows + histograms
            + letters
            + (self.alerts.len() + self.versions.len() + self.deliveries.len()) * 4 * ROW
    }

    fn add(&mut self, out: Output) {
        self.rows.extend(out.emitted.rows.iter().map(metric_row));
        self.histograms
            .extend(out.emitted.histograms.iter().map(histogram_row));
        self.alerts.extend(out.alerts);
        self.versions
            .extend(out.emitted.versions.into_iter().map(|v| VersionRow {
                model_id: v.model_id.to_string(),
                model_version: v.model_version.to_string(),
                task: v.task.to_string(),
                first_seen_ms: v.first_seen_ms,
                last_seen_ms: v.last_seen_ms,
                metadata:
                    serde_json::json!({ "reference_features": v.reference_features }).to_string(),
            }));
        self.references.extend(out.emitted.references);
        self.closed_ends.extend(
            out.emitted
                .closed_windows
                .iter()
                .map(|(size, start)| start + size),
        );
        if out.watermark.is_some() {
            self.watermark = out.watermark;
        }
    }
}

/// A snapshot of what the service has done, for progress lines and summaries.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Core counters.
    pub core: CoreStats,
    /// Messages consumed (both topics).
    pub consumed: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Rows written to ClickHouse.
    pub rows_written: u64,
    /// Alerts published.
    pub alerts_published: u64,
    /// Pending predictions (in memory and in the state store).
    pub pending_predictions: usize,
    /// Join requests held only by the state store (beyond the memory budget).
    pub cold_requests: usize,
}

impl Progress {
    /// Logs every counter under `what` (`progress` every 10 s, `stopped`
    /// at the end of `run`).
    fn log(&self, what: &str) {
        tracing::info!(
            consumed = self.consumed,
            predictions = self.core.predictions,
            labels = self.core.labels,
            matched = self.core.matched,
            expired = self.core.expired,
            orphans = self.core.orphans,
            late_predictions = self.core.late_predictions,
            late_labels = self.core.late_labels,
            pending = self.pending_predictions,
            dead_lettered = self.dead_lettered,
            rows_written = self.rows_written,
            alerts = self.alerts_published,
            "{what}"
        );
    }
}

/// The running service: one consumer, the processing state, the sinks.
pub struct Service {
    consumer: InputConsumer,
    sink: ClickHouseSink,
    alerts: AlertPublisher,
    dlq: DeadLetterQueue,
    notifier: Notifier,
    /// Rate limit of the dead-letter and dropped-output log lines.
    output_log: LogLimiter,
    last_error_log: Option<Instant>,
    /// When the service last warned that it shares its group.
    last_share_warning: Option<Instant>,
    /// Consumer errors since the last flush (readiness).
    kafka_errors: u64,
    /// Messages consumed at the last flush (readiness).
    consumed_at_flush: u64,
    telemetry: Arc<Telemetry>,
    lag: LagProbe,
    store: StateStore,
    /// Wall-clock milliseconds spent in flushes (not reading input), for
    /// the idle check of [`Service::run_until_idle`].
    busy_ms: Arc<std::sync::atomic::AtomicU64>,
    last_checkpoint: Instant,
    /// Wall-clock time the last checkpoint took (encoding and writing).
    last_checkpoint_cost: Duration,
    /// The next flush that writes everything also checkpoints (shutdown).
    checkpoint_due: bool,
    /// A group rebalance took partitions away (at this time) and has not
    /// assigned any since: see [`Service::apply_assignment`].
    rebalance_started: Option<Instant>,
    /// When the last flush ended: the time since is the gap a rebalance
    /// in progress keeps from counting as idle.
    last_flush_end: Instant,
    /// Consumption is paused because the output held exceeds
    /// `service.max_pending_output` (since then).
    paused: Option<Instant>,
    /// The Schema Registry client (`kafka.schema_registry.url` set): fills
    /// the decoder's schema cache before a message with a new id is handled.
    registry: Option<Registry>,
    p: Processing,
}

/// (low, high) watermark offsets per (topic, partition), with when they
/// were fetched.
type PartitionOffsets = std::collections::HashMap<(String, i32), (i64, i64, Instant)>;

/// The lag probe fetches every [`PROBE_INTERVAL`]; offsets older than this
/// (fetches failing, a broker not answering) say nothing about a backlog.
const PROBE_FRESH: Duration = Duration::from_secs(15);

/// The longest a rebalance pauses the idle timeout (see
/// `Service::apply_assignment`).
const REBALANCE_PAUSE_MAX: Duration = Duration::from_secs(300);

/// How often the lag probe asks for the high watermarks.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// High watermarks of the assigned partitions, fetched every few seconds
/// by a thread of its own: asking the broker blocks, so the service loop
/// never does it. Consumer lag = high watermark - position.
struct LagProbe {
    partitions: Arc<std::sync::Mutex<Vec<(String, i32)>>>,
    /// (low, high) watermark offsets per partition.
    highs: Arc<std::sync::Mutex<PartitionOffsets>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// The partition list changed: fetch now, not at the next round.
    changed: Arc<std::sync::atomic::AtomicBool>,
    /// Partitions of both input topics together (0 until known).
    input_partitions: Arc<AtomicU64>,
    /// When the watched partition list last changed.
    watched_since: Instant,
}

impl LagProbe {
    fn start(cfg: &crate::config::KafkaConfig) -> LagProbe {
        let probe = LagProbe {
            partitions: Arc::default(),
            highs: Arc::default(),
            stop: Arc::default(),
            changed: Arc::default(),
            input_partitions: Arc::default(),
            watched_since: Instant::now(),
        };
        let topics = [
            cfg.predictions_topic.clone(),
            cfg.ground_truth_topic.clone(),
        ];
        let input_partitions = probe.input_partitions.clone();
        let consumer: Option<rdkafka::consumer::BaseConsumer> =
            crate::ingest::consumer::client_config(cfg).create().ok();
        let (partitions, highs, stop, changed) = (
            probe.partitions.clone(),
            probe.highs.clone(),
            probe.stop.clone(),
            probe.changed.clone(),
        );
        if let Some(consumer) = consumer {
            let spawned = std::thread::Builder::new()
                .name("lag-probe".into())
                .spawn(move || {
                    use rdkafka::consumer::Consumer;
                    while !stop.load(Ordering::Relaxed) {
                        let mut total = 0;
                        for topic in &topics {
                            if let Ok(m) =
                                consumer.fetch_metadata(Some(topic), Duration::from_secs(1))
                            {
                                total += m
                                    .topics()
                                    .iter()
                                    .map(|t| t.partitions().len())
                                    .sum::<usize>();
                            }
                        }
                        input_partitions.store(total as u64, Ordering::Relaxed);
                        let list = partitions.lock().map(|p| p.clone()).unwrap_or_default();
                        for (topic, partition) in list {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            if let Ok(offsets) =
                                consumer.fetch_watermarks(&topic, partition, Duration::from_secs(1))
                            {
                                if let Ok(mut h) = highs.lock() {
                                    h.insert(
                                        (topic, partition),
                                        (offsets.0, offsets.1, Instant::now()),
                                    );
                                }
                            }
                        }
                        let rounds = PROBE_INTERVAL.as_millis() / 100;
                        for _ in 0..rounds {
                            if stop.load(Ordering::Relaxed)
                                || changed.swap(false, Ordering::Relaxed)
                            {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the consumer lag probe");
            }
        }
        probe
    }

    fn high(&self, topic: &str, partition: i32) -> Option<i64> {
        self.highs
            .lock()
            .ok()?
            .get(&(topic.to_owned(), partition))
            .map(|(_, high, _)| *high)
            .filter(|h| *h >= 0)
    }

    /// The (low, high) watermark offsets of a partition, if fetched within
    /// [`PROBE_FRESH`].
    fn fresh_offsets(&self, topic: &str, partition: i32) -> Option<(i64, i64)> {
        self.highs
            .lock()
            .ok()?
            .get(&(topic.to_owned(), partition))
            .filter(|(low, high, at)| *low >= 0 && *high >= 0 && at.elapsed() < PROBE_FRESH)
            .map(|(low, high, _)| (*low, *high))
    }

    /// Whether the watched partitions changed within [`PROBE_FRESH`]: the
    /// probe may not have fetched the new ones yet.
    fn recently_changed(&self) -> bool {
        self.watched_since.elapsed() < PROBE_FRESH
    }

    fn watch(&mut self, positions: &rdkafka::TopicPartitionList) {
        let list: Vec<(String, i32)> = positions
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        if let Ok(mut p) = self.partitions.lock() {
            if *p != list {
                *p = list;
                self.changed.store(true, Ordering::Relaxed);
                self.watched_since = Instant::now();
            }
        }
    }
}

impl Drop for LagProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Join requests held only by the state store: evicted from memory after a
/// checkpoint when the join exceeded `state.memory_budget`.
#[derive(Debug, Default, Clone, Copy)]
struct Cold {
    requests: usize,
    predictions: usize,
}

/// Everything a consumed message touches (split from [`Service`] so a
/// message borrowed from the consumer can be processed in place).
struct Processing {
    cfg: Config,
    decoder: Decoder,
    /// The per-event bounds of `[limits]`.
    bounds: EventBounds,
    core: Core,
    /// Join requests that are only in the store (beyond the memory budget).
    cold: Cold,
    /// The store, for reading cold join requests back.
    store: StateStore,
    /// A read snapshot of the store for those reads, taken at the first
    /// read after each checkpoint.
    reader: Option<JoinReader>,
    positions: Positions,
    /// Partitions to seek back to an offset before the next message
    /// ([`Step::Rewind`]).
    rewinds: Vec<(String, i32, i64)>,
    /// Assignment changes applied here, for the service's rebalance
    /// bookkeeping ([`Service::apply_assignment`]).
    applied_changes: Vec<Assignment>,
    pending: Pending,
    counters: Arc<Counters>,
}

impl Service {
    /// Connects to ClickHouse (migrating it), loads reference profiles,
    /// creates the Kafka clients and subscribes.
    pub async fn start(cfg: Config) -> Result<Service> {
        // Checked by `Config::validate` at load; a configuration built in
        // code is checked here.
        let mappings = Mappings::compile(
            &cfg.kafka.mapping,
            cfg.kafka.format,
            cfg.kafka.schema_registry.enabled(),
        )
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let sink = ClickHouseSink::new(&cfg.clickhouse);
        sink.ping().await.map_err(|e| {
            // Unreachable: say how to get a server; anything else (a TLS
            // handshake, authentication) speaks for itself.
            let hint = if e.is_unreachable() {
                ". Start one with deploy/clickhouse-start.sh or set clickhouse.url"
            } else {
                ""
            };
            anyhow::anyhow!(
                "cannot reach ClickHouse at {}: {e}{hint}",
                cfg.clickhouse.display_url()
            )
        })?;
        sink.migrate()
            .await
            .map_err(|e| anyhow::anyhow!("ClickHouse migration failed: {e}"))?;
        let store = StateStore::open(&cfg.state.dir)?;
        store.claim(&Identity::of(&cfg))?;
        let (core, positions, cold) = match restore_state(&store, &cfg)? {
            Some((mut core, positions, cold)) => {
                let loaded = load_references(&sink, &mut core, true).await?;
                tracing::info!(
                    profiles = loaded,
                    "reference profiles loaded (new or re-imported)"
                );
                (core, positions, cold)
            }
            None => {
                let mut core = Core::new(&cfg);
                let loaded = load_references(&sink, &mut core, false).await?;
                tracing::info!(profiles = loaded, "reference profiles loaded");
                let restored = restore_alerts(&sink, &mut core, &cfg).await?;
                tracing::info!(
                    alerts = restored,
                    firing = core.alert_engine().firing(),
                    "alert state restored from ClickHouse"
                );
                (core, Positions::new(), Cold::default())
            }
        };
        let env: std::collections::HashMap<String, String> = std::env::vars().collect();
        let notifier = Notifier::start(&cfg.alerts.webhooks, cfg.alerts.queue_capacity, &env)?;
        if !notifier.is_empty() {
            tracing::info!(webhooks = notifier.len(), "webhook notifier started");
        }
        let producer = producer(&cfg.kafka)?;
        check_output_topics(&cfg.kafka).await?;
        let instance_id = group_instance_id(&cfg.kafka, store.instance_id()?);
        match &instance_id {
            Some(id) => {
                tracing::info!(group = %cfg.kafka.group_id, instance = %id, "static consumer group member: a restart rejoins as the same member and gets its partitions back at once")
            }
            None => {
                tracing::info!(group = %cfg.kafka.group_id, "dynamic consumer group member (group.instance.id is empty): a restart waits until the broker expires the previous member (session.timeout.ms)")
            }
        }
        let consumer = input_consumer(&cfg.kafka, instance_id.as_deref())?;
        let telemetry = Arc::new(Telemetry::for_config(&cfg));
        let mut decoder = Decoder::new(cfg.kafka.format).with_mappings(mappings);
        let mut alerts = AlertPublisher::new(producer.clone(), &cfg.kafka.alerts_topic);
        let registry = if cfg.kafka.schema_registry.enabled() {
            let r = Registry::new(&cfg.kafka.schema_registry, telemetry.counters.clone())?;
            decoder = decoder.with_registry(r.cache());
            if cfg.kafka.schema_registry.alerts == AlertFraming::Confluent {
                let subject = format!("{}-value", cfg.kafka.alerts_topic);
                let id = r.register(&subject, ALERT_SCHEMA).await?;
                tracing::info!(subject = %subject, schema_id = id, "AlertEvent schema registered: alerts are Confluent-framed");
                alerts = alerts.confluent(id);
            }
            tracing::info!(registry = %cfg.kafka.schema_registry.display_url(), "Confluent-framed input is read with the writer schema from the Schema Registry");
            Some(r)
        } else {
            None
        };
        Ok(Service {
            alerts,
            registry,
            dlq: DeadLetterQueue::new(
                producer,
                &cfg.kafka.dead_letter_topic,
                message_max_bytes(&cfg.kafka),
            ),
            notifier,
            output_log: LogLimiter::new(DEAD_LETTER_LOG_INTERVAL),
            consumer,
            sink,
            last_error_log: None,
            last_share_warning: None,
            kafka_errors: 0,
            consumed_at_flush: 0,
            lag: LagProbe::start(&cfg.kafka),
            store: store.clone(),
            busy_ms: Arc::default(),
            last_checkpoint: Instant::now(),
            last_checkpoint_cost: Duration::ZERO,
            checkpoint_due: false,
            rebalance_started: None,
            last_flush_end: Instant::now(),
            paused: None,
            p: Processing {
                decoder,
                bounds: EventBounds::new(&cfg.limits),
                core,
                cold,
                store,
                reader: None,
                positions,
                rewinds: Vec::new(),
                applied_changes: Vec::new(),
                pending: Pending::default(),
                counters: telemetry.counters.clone(),
                cfg,
            },
            telemetry,
        })
    }

    /// The service's counters (shared).
    pub fn counters(&self) -> Arc<Counters> {
        self.p.counters.clone()
    }

    /// The service's operational metrics and readiness (shared with the API).
    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.telemetry.clone()
    }

    /// What has been done so far.
    pub fn progress(&self) -> Progress {
        let c = &self.p.counters;
        Progress {
            core: self.p.core.stats(),
            consumed: c.consumed(),
            dead_lettered: Counters::get(&c.dead_lettered_total),
            rows_written: Counters::get(&c.rows_written_total),
            alerts_published: Counters::get(&c.alerts_published_total),
            pending_predictions: self.p.core.pending_predictions() + self.p.cold.predictions,
            cold_requests: self.p.cold.requests,
        }
    }

    /// Consumes until `shutdown` resolves, flushing every `flush_interval`;
    /// then writes what is due and commits.
    pub async fn run_until(&mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut tick = tokio::time::interval(self.p.cfg.service.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut report = tokio::time::interval(Duration::from_secs(10));
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        self.telemetry
            .readiness
            .running
            .store(true, Ordering::Relaxed);
        self.telemetry
            .readiness
            .kafka_ok
            .store(true, Ordering::Relaxed);
        // Revoked partitions wait for a checkpoint while the loop runs.
        self.consumer.context().hold_revocations(true);
        let result = self.run_loop(&mut tick, &mut report, shutdown).await;
        // From now on revocations are carried out at once (the consumer's
        // close revokes everything).
        self.consumer.context().hold_revocations(false);
        self.telemetry
            .readiness
            .running
            .store(false, Ordering::Relaxed);
        if let Err(e) = result {
            release_revoked(&self.consumer)?;
            return Err(e);
        }
        tracing::info!("shutting down: writing what is due, checkpointing, committing offsets");
        self.checkpoint_due = true;
        let flushed = self.flush(now_ms(), false).await;
        // A revocation still held (the checkpoint failed) is given up now.
        release_revoked(&self.consumer)?;
        flushed?;
        if self.checkpoint_due {
            tracing::warn!("the last output could not be written: the state stays at the previous checkpoint and its input will be consumed again at the next start");
        }
        self.log_limit_hits();
        self.finish_notifications().await;
        Ok(())
    }

    /// One line per cap of `[limits]` that was hit (totals, as
    /// `modelwatch_limit_hits_total`), for the record of a run.
    fn log_limit_hits(&self) {
        let core = self.p.core.stats();
        for (limit, hits) in self.p.counters.limit_hits(&core.limits) {
            if hits > 0 {
                tracing::info!(
                    limit,
                    hits,
                    "limit hit: input beyond limits.{limit} was folded, left out or dead-lettered"
                );
            }
        }
    }

    async fn run_loop(
        &mut self,
        tick: &mut tokio::time::Interval,
        report: &mut tokio::time::Interval,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<()> {
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = tick.tick() => self.flush(now_ms(), false).await?,
                _ = report.tick() => {
                    self.progress().log("progress");
                }
                m = self.consumer.recv() => match m {
                    Ok(msg) => {
                        let now = now_ms();
                        prefetch_schema(self.registry.as_ref(), &self.p, &msg).await?;
                        consume(&self.consumer, &mut self.p, &msg, now);
                        drop(msg);
                        // Drain what is already buffered without going back
                        // through the select (bounded, so flushes stay timely).
                        for _ in 0..MAX_DRAIN {
                            match self.consumer.recv().now_or_never() {
                                Some(Ok(m)) => {
                                    prefetch_schema(self.registry.as_ref(), &self.p, &m).await?;
                                    consume(&self.consumer, &mut self.p, &m, now)
                                }
                                Some(Err(e)) => { self.log_consumer_error(&e); break; }
                                None => break,
                            }
                        }
                        self.apply_assignment();
                    }
                    Err(e) => self.log_consumer_error(&e),
                },
            }
        }
        Ok(())
    }

    /// Gives queued webhook notifications a bounded time to go out, then
    /// writes the last delivery records (best effort: the service is stopping).
    async fn finish_notifications(&mut self) {
        let left = self.notifier.drain(Duration::from_secs(5)).await;
        if left > 0 {
            tracing::warn!(
                queued = left,
                "webhook notifications still queued at shutdown"
            );
        }
        self.p.pending.deliveries.extend(self.notifier.take_log());
        if !self.p.pending.deliveries.is_empty() {
            match self.sink.write_deliveries(&self.p.pending.deliveries).await {
                Ok(()) => self.p.pending.deliveries.clear(),
                Err(e) => tracing::warn!(error = %e, "cannot write the webhook delivery log"),
            }
        }
    }

    /// Consumes until the input has been idle for `windows.idle_timeout`
    /// (after a message, or once partitions are assigned) or `shutdown` resolves; then closes every
    /// window, writes and commits. For replays and backfills of a finite stream.
    pub async fn run_until_idle(&mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let idle = self.p.cfg.windows.idle_timeout;
        let counters = self.p.counters.clone();
        let busy = self.busy_ms.clone();
        let readiness = self.telemetry.readiness.clone();
        let went_idle = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let idle_flag = went_idle.clone();
        // The idle check reads shared counters: no borrow of `self` needed.
        // Time the service spends writing (flushes, checkpoints) is not idle
        // time: the input is not being read then.
        let idle_or_shutdown = async move {
            let mut last_seen = 0;
            let mut last_busy = 0;
            let mut idle_for = Duration::ZERO;
            let mut last_poll = Instant::now();
            let poll = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let seen = counters.consumed()
                        + Counters::get(&counters.redelivered_total)
                        + Counters::get(&counters.input_rewinds_total);
                    let busy_now = busy.load(Ordering::Relaxed);
                    let waited = last_poll
                        .elapsed()
                        .saturating_sub(Duration::from_millis(busy_now - last_busy));
                    last_poll = Instant::now();
                    last_busy = busy_now;
                    if Counters::get(&counters.input_paused) == 1 {
                        // Paused by backpressure: not reading is the
                        // service's own doing, not the input ending.
                        idle_for = Duration::ZERO;
                    } else if seen != last_seen {
                        last_seen = seen;
                        idle_for = Duration::ZERO;
                    } else if seen > 0 || readiness.partitions_assigned.load(Ordering::Relaxed) > 0
                    {
                        // Idle once input was read, or once partitions are
                        // assigned and deliver nothing (a restart with
                        // nothing new to read).
                        idle_for += waited;
                        if idle_for >= idle {
                            tracing::info!(
                                consumed = seen,
                                "input idle: closing every window and exiting"
                            );
                            break;
                        }
                    }
                }
            };
            tokio::select! {
                _ = poll => idle_flag.store(true, Ordering::Relaxed),
                _ = shutdown => {},
            }
        };
        self.run_until(idle_or_shutdown).await?;
        if went_idle.load(Ordering::Relaxed) {
            // The input is over: the watermark follows the wall clock now,
            // so unlabeled predictions and orphan labels past their horizon
            // expire in this advance, not only if some flush happened to
            // come between the watermark's idle timer and the idle check
            // (a SIGTERM mid-replay expires nothing early).
            self.p.core.end_input();
            self.flush(now_ms(), false).await?;
        }
        self.checkpoint_due = true;
        self.flush(now_ms(), true).await?;
        self.finish_notifications().await;
        Ok(())
    }

    fn log_consumer_error(&mut self, e: &rdkafka::error::KafkaError) {
        self.kafka_errors += 1;
        // Rate-limited: a broker outage would otherwise log in a tight loop.
        let due = self
            .last_error_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        if due {
            self.last_error_log = Some(Instant::now());
            tracing::warn!(error = %e, "kafka consumer error");
        }
    }

    /// Decodes and processes one message (as if consumed from `topic`).
    pub fn handle(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        wall_ms: i64,
    ) {
        self.p
            .handle(topic, partition, offset, key, payload, &[], wall_ms)
    }

    /// [`Service::handle`] with the message's headers (`(key, value)`), which
    /// mapped fields may read (`[kafka.mapping]`).
    #[allow(clippy::too_many_arguments)]
    pub fn handle_with_headers(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&str, &[u8])],
        wall_ms: i64,
    ) {
        self.p
            .handle(topic, partition, offset, key, payload, headers, wall_ms)
    }

    /// Advances the core (or, with `close_all`, closes every window) and
    /// writes everything pending; commits offsets when it all succeeded.
    pub async fn flush(&mut self, wall_ms: i64, close_all: bool) -> Result<()> {
        let started = Instant::now();
        if self.rebalance_started.is_some() || self.paused.is_some() {
            // The group rebalanced, or the service paused its input, since
            // the last flush: no input, and not because the stream went quiet.
            self.not_idle(started.duration_since(self.last_flush_end));
        }
        let result = self.flush_inner(wall_ms, close_all).await;
        self.backpressure();
        // Input waits while the service writes: not idle time.
        self.not_idle(started.elapsed());
        self.last_flush_end = Instant::now();
        tracing::debug!(
            consumed = self.p.counters.consumed(),
            seconds = started.elapsed().as_secs_f64(),
            "flushed"
        );
        result
    }

    /// Pauses consumption while the output waiting to be written exceeds
    /// `service.max_pending_output` (a sink is down or slow), and resumes
    /// it once half of that is written: memory stays bounded instead of
    /// buffering without limit. The consumer is still polled while paused
    /// (group membership, rebalances); paused time is not idle time.
    fn backpressure(&mut self) {
        let held = self.p.pending.approx_bytes();
        let max =
            usize::try_from(self.p.cfg.service.max_pending_output.as_u64()).unwrap_or(usize::MAX);
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        match self.paused {
            None if held > max => {
                if let Err(e) = self.consumer.pause(&assignment) {
                    tracing::warn!(error = %e, "cannot pause consumption");
                    return;
                }
                self.paused = Some(Instant::now());
                Counters::add(&self.p.counters.input_pauses_total, 1);
                self.telemetry.set_input_paused(true);
                tracing::warn!(
                    held_bytes = held,
                    max_pending_output = %self.p.cfg.service.max_pending_output,
                    "output is not being written fast enough: consumption paused until half of it is written"
                );
            }
            Some(since) if held <= max / 2 => {
                if let Err(e) = self.consumer.resume(&assignment) {
                    tracing::warn!(error = %e, "cannot resume consumption");
                    return;
                }
                self.paused = None;
                self.telemetry.set_input_paused(false);
                tracing::info!(
                    paused_seconds = since.elapsed().as_secs_f64(),
                    held_bytes = held,
                    "output written: consumption resumed"
                );
            }
            Some(_) => {
                // Partitions assigned since the pause are paused too.
                let _ = self.consumer.pause(&assignment);
            }
            None => {}
        }
    }

    /// Time in which the service read no input for reasons of its own
    /// (writing, a group rebalance): it does not count towards the idle
    /// timeout, neither the watermark's nor `run_until_idle`'s.
    fn not_idle(&mut self, d: Duration) {
        let ms = d.as_millis() as u64;
        self.p.core.pause_idle(ms as i64);
        self.busy_ms.fetch_add(ms, Ordering::Relaxed);
    }

    async fn flush_inner(&mut self, wall_ms: i64, close_all: bool) -> Result<()> {
        self.apply_assignment();
        // Read once per flush: for the backlog, the lag probe and the report.
        let positions = self.consumer.position().ok();
        if let Some(positions) = &positions {
            // A new assignment starts the probe's clock before it is judged.
            self.lag.watch(positions);
            self.update_backlog(positions, wall_ms);
        }
        if !close_all {
            self.p.load_expiring(wall_ms)?;
        }
        let out = if close_all {
            self.p.core.flush(wall_ms)
        } else {
            self.p.core.advance(wall_ms)
        };
        self.p.pending.add(out);
        let written = self.write_pending().await;
        // Rows the ClickHouse sink dropped (rejected for their data).
        record_sink_drops(&self.sink, &self.telemetry);
        // Telemetry of this flush, whether or not the write went through.
        let closed = std::mem::take(&mut self.p.pending.closed_ends);
        let report = self.flush_report(
            positions.as_ref(),
            wall_ms,
            if written.is_ok() { &closed } else { &[] },
        );
        if written.is_err() {
            self.p.pending.closed_ends = closed;
        }
        self.telemetry.record_flush(&report);
        let health = self.telemetry.service_rows(wall_ms, &report);
        self.p.pending.rows.extend(health);
        match written {
            Ok(()) => {}
            Err(WriteError::Permanent(e)) => return Err(e),
            Err(WriteError::Transient(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "write failed, will retry at the next flush");
                return Ok(());
            }
        }
        // A large state takes long to checkpoint: checkpoints then come at
        // least ten times their cost apart, so they take at most ~10 % of
        // the service's time (the replay after a crash grows accordingly).
        let every = self
            .p
            .cfg
            .state
            .checkpoint_interval
            .max(self.last_checkpoint_cost * 10);
        if self.checkpoint_due || self.last_checkpoint.elapsed() >= every {
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Writes the core's state and the input positions to the state store
    /// (one transaction), then commits the positions to Kafka. Only called
    /// when everything the state emitted is written. A failed checkpoint
    /// stops the service: the change set of the join was handed over, and
    /// the previous checkpoint plus a replay is the consistent state.
    pub async fn checkpoint(&mut self) -> Result<()> {
        tracing::debug!("checkpoint begin");
        let started = Instant::now();
        let core = self.p.core.checkpoint();
        let moved = self.p.positions.take_moved();
        let checkpoint = Checkpoint {
            records: core.records,
            join: core.join,
            positions: self.p.positions.all(),
        };
        let store = self.store.clone();
        let stats = tokio::task::spawn_blocking(move || {
            store.write(&checkpoint).map(|s| (s, checkpoint.positions))
        })
        .await
        .context("the checkpoint task failed")?
        .with_context(|| {
            format!(
                "cannot write the state checkpoint to {}",
                self.store.path().display()
            )
        })?;
        let (stats, positions) = stats;
        self.last_checkpoint = Instant::now();
        self.last_checkpoint_cost = started.elapsed();
        self.checkpoint_due = false;
        self.p.reader = None;
        self.p.evict_over_budget();
        self.telemetry
            .record_checkpoint(&stats, self.store.file_bytes());
        tracing::debug!(
            seconds = self.last_checkpoint_cost.as_secs_f64(),
            write_seconds = stats.seconds,
            record_bytes = stats.record_bytes,
            join_upserts = stats.join_upserts,
            join_deletes = stats.join_deletes,
            consumed = self.p.counters.consumed(),
            "checkpoint written"
        );
        // Partitions revoked but held for this checkpoint are given up
        // now, after a synchronous commit: their next owner starts exactly
        // where this state ends.
        let releasing = self.consumer.context().holds_revocation();
        if moved || releasing {
            // Only partitions this instance reads: a position of a partition
            // that moved away would overwrite its new owner's commits.
            let assigned = self.consumer.assignment().ok();
            let positions: Vec<_> = positions
                .into_iter()
                .filter(|(t, p, _)| {
                    assigned
                        .as_ref()
                        .is_none_or(|a| a.find_partition(t, *p).is_some())
                })
                .collect();
            match commit(&self.consumer, &positions, releasing) {
                Ok(()) => Counters::add(&self.p.counters.commits_total, 1),
                // The group may refuse commits while it rebalances (MockCluster
                // does): the state is checkpointed, and this process skips
                // what it gets again; the partitions are given up anyway.
                Err(e) if releasing => tracing::warn!(
                    error = %format!("{e:#}"),
                    "cannot commit before giving up revoked partitions: their next owner starts at the previous commit"
                ),
                Err(e) => {
                    self.telemetry
                        .readiness
                        .kafka_ok
                        .store(false, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        release_revoked(&self.consumer)?;
        Ok(())
    }

    /// Hands the partition assignment changes librdkafka reported to the
    /// core's watermark. A revoked partition is checkpointed at the next
    /// flush (the positions committed then are where its next owner starts).
    ///
    /// The time between a revocation and the next assignment (a group
    /// rebalance: a member joining or leaving) does not count towards the
    /// idle timeout, like time spent writing ([`Service::flush`]): the
    /// input is silent because the group is rebalancing, not because the
    /// stream went quiet. Taken for quiet, it let the watermark jump to the
    /// wall clock in a replay and expire predictions whose labels sat in
    /// partitions on their way back (the rebalance test, CI). At most
    /// [`REBALANCE_PAUSE_MAX`].
    fn apply_assignment(&mut self) {
        let changes = self.consumer.context().take_changes();
        self.p.apply_assignment(changes);
        let changes = std::mem::take(&mut self.p.applied_changes);
        match changes.last() {
            Some(Assignment::Revoked(_)) => {
                self.rebalance_started.get_or_insert_with(Instant::now);
            }
            Some(Assignment::Assigned(_)) => self.rebalance_started = None,
            None => {}
        }
        if self
            .rebalance_started
            .is_some_and(|t| t.elapsed() >= REBALANCE_PAUSE_MAX)
        {
            // Revoked and never assigned again (a cooperative rebalance that
            // only took partitions away): the rest is idle time again.
            self.rebalance_started = None;
        }
        // A revoked partition: a checkpoint is due (the positions committed
        // with it are where the partition's next owner starts).
        self.checkpoint_due |= changes.iter().any(|c| matches!(c, Assignment::Revoked(_)));
    }

    /// Tells the core which prediction partitions have unread messages
    /// (position behind the broker's high watermark, as last fetched by the
    /// lag probe): those hold the watermark back even while the broker
    /// serves other partitions, so a backlog replay makes nothing late.
    ///
    /// Only what the probe confirmed recently counts. A partition the
    /// probe has no fresh offsets for is taken to have a backlog just after
    /// an assignment (the probe has not fetched it yet; the restart of a
    /// replay usually has one) and to have none otherwise (fetches failing:
    /// plain idleness rules, a stale answer holds nothing open).
    ///
    /// When the broker confirms that no assigned partition of either topic
    /// has unread messages and this process has read nothing yet (a restart
    /// after the input ended), the idle timer starts now: what is due closes
    /// after `idle_timeout`, as in an uninterrupted run, instead of waiting
    /// for the next message (a model scoring in daily batches would wait a
    /// day).
    fn update_backlog(&mut self, positions: &rdkafka::TopicPartitionList, wall_ms: i64) {
        let mut confirmed_empty = positions.count() > 0;
        for e in positions.elements() {
            let predictions = e.topic() == self.p.cfg.kafka.predictions_topic;
            let source = Source::predictions(e.partition());
            let Some((low, high)) = self.lag.fresh_offsets(e.topic(), e.partition()) else {
                confirmed_empty = false;
                if predictions && !self.lag.recently_changed() {
                    self.p.core.set_backlog(source, false);
                }
                continue;
            };
            // Before the first message of a partition is delivered, the
            // checkpointed position is where the consumer stands.
            let position = match e.offset() {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => self.p.positions.get(e.topic(), e.partition()),
            }
            .unwrap_or(low)
            .max(low);
            confirmed_empty &= position >= high;
            if predictions {
                self.p.core.set_backlog(source, position < high);
            }
        }
        if confirmed_empty {
            self.p.core.no_backlog_confirmed(wall_ms);
        }
    }

    /// What this flush saw, for telemetry: core counters, join state size,
    /// watermark delay, window-close latencies, consumer lag; also updates
    /// readiness (partitions assigned, Kafka answering).
    fn flush_report(
        &mut self,
        positions: Option<&rdkafka::TopicPartitionList>,
        wall_ms: i64,
        closed_ends: &[i64],
    ) -> FlushReport {
        let mut lag = Vec::new();
        let mut assigned = 0u64;
        if let Some(positions) = positions {
            for e in positions.elements() {
                assigned += 1;
                let position = match e.offset() {
                    rdkafka::Offset::Offset(o) => o,
                    _ => continue,
                };
                if let Some(high) = self.lag.high(e.topic(), e.partition()) {
                    lag.push((
                        e.topic().to_owned(),
                        e.partition(),
                        (high - position).max(0),
                    ));
                }
            }
        }
        let r = &self.telemetry.readiness;
        r.partitions_assigned.store(assigned, Ordering::Relaxed);
        let total = self.lag.input_partitions.load(Ordering::Relaxed);
        r.input_partitions.store(total, Ordering::Relaxed);
        if assigned > 0 && assigned < total {
            let due = self
                .last_share_warning
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
            if due {
                self.last_share_warning = Some(Instant::now());
                tracing::warn!(
                    assigned,
                    input_partitions = total,
                    group = %self.p.cfg.kafka.group_id,
                    "this instance reads only part of the input: another member of its consumer group reads the rest, and window metrics are exact only with one instance per group (README: Partition moves)"
                );
            }
        }
        let consumed = self.p.counters.consumed();
        // Kafka answers if nothing failed since the last flush or messages still flow.
        let ok = self.kafka_errors == 0 || consumed > self.consumed_at_flush;
        r.kafka_ok.store(ok, Ordering::Relaxed);
        self.kafka_errors = 0;
        self.consumed_at_flush = consumed;
        FlushReport {
            core: self.p.core.stats(),
            pending_predictions: (self.p.core.pending_predictions() + self.p.cold.predictions)
                as u64,
            watermark_delay_s: self
                .p
                .pending
                .watermark
                .map(|wm| (wall_ms - wm) as f64 / 1000.0),
            window_close_latencies_s: closed_ends
                .iter()
                .map(|end| ((wall_ms - end) as f64 / 1000.0).max(0.0))
                .collect(),
            lag,
        }
    }
}

impl Processing {
    #[allow(clippy::too_many_arguments)]
    fn handle(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&str, &[u8])],
        wall_ms: i64,
    ) {
        match self.positions.advance(topic, partition, offset) {
            Step::Next => {}
            Step::Redelivered => {
                // Already in the state (a restart or rebalance resumed
                // from an older committed offset): counted once already.
                Counters::add(&self.counters.redelivered_total, 1);
                let skipped = Counters::get(&self.counters.redelivered_total);
                if skipped.is_power_of_two() {
                    tracing::info!(
                        skipped,
                        topic,
                        partition,
                        offset,
                        "skipping messages the restored state already holds"
                    );
                }
                return;
            }
            Step::Rewind(to) => {
                // Not applied: the partition is read again from `to`.
                Counters::add(&self.counters.input_rewinds_total, 1);
                self.rewinds.push((topic.to_string(), partition, to));
                return;
            }
            Step::Gap(n) => {
                Counters::add(&self.counters.input_offset_gaps_total, 1);
                Counters::add(&self.counters.input_offsets_missing_total, n as u64);
                tracing::warn!(
                    topic,
                    partition,
                    offset,
                    missing = n,
                    "offsets missing from the input (compaction, transaction markers, or deleted by retention before they were read)"
                );
            }
        }
        let kind = if topic == self.cfg.kafka.predictions_topic {
            Counters::add(&self.counters.predictions_consumed_total, 1);
            EventKind::Prediction
        } else {
            Counters::add(&self.counters.labels_consumed_total, 1);
            EventKind::GroundTruth
        };
        let bytes = payload.unwrap_or(&[]);
        // Bounded before any state is read for the event: event time by
        // the wall clock, sizes by `[limits]` (crate::ingest::bounds).
        let decoded = self
            .decoder
            .decode_with_headers(kind, bytes, headers)
            .and_then(|ev| self.bounds.check(&ev, wall_ms).map(|()| ev));
        if self.cold.requests > 0 {
            let id = match &decoded {
                Ok(InputEvent::Prediction(p)) => Some(&*p.request_id),
                Ok(InputEvent::GroundTruth(g)) => Some(&*g.request_id),
                Err(_) => None,
            };
            if let Some(id) = id {
                if let Err(e) = self.load_cold(id) {
                    // The store answered a checkpoint a moment ago: a read
                    // failing now is a broken disk, not bad input.
                    tracing::error!(error = %format!("{e:#}"), request_id = id, "cannot read a join record back from the state store");
                }
            }
        }
        match decoded {
            Ok(InputEvent::Prediction(p)) => {
                self.core.on_prediction_from(partition, &p, wall_ms);
            }
            Ok(InputEvent::GroundTruth(g)) => {
                self.core.on_label_from(partition, &g, wall_ms);
            }
            Err(e) => {
                Counters::add(&self.counters.decode_failures_total, 1);
                if let Some(limit) = e.limit() {
                    self.counters.add_event_limit_hit(limit);
                }
                self.core.on_undecodable(wall_ms);
                self.pending.letters.push(DeadLetter {
                    topic: topic.to_string(),
                    partition,
                    offset,
                    key: key.map(<[u8]>::to_vec),
                    payload: bytes.to_vec(),
                    reason: e.to_string(),
                    kind: e.kind(),
                });
            }
        }
    }
}

impl Processing {
    /// Hands partition assignment changes to the core's watermark and the
    /// positions (an assigned partition starts a new fetch, checked against
    /// its position); keeps them for the service's bookkeeping.
    fn apply_assignment(&mut self, changes: Vec<Assignment>) {
        for change in &changes {
            let predictions = &self.cfg.kafka.predictions_topic;
            let sources = |list: &[(String, i32)]| -> Vec<Source> {
                list.iter()
                    .map(|(t, p)| {
                        if t == predictions {
                            Source::predictions(*p)
                        } else {
                            Source::labels(*p)
                        }
                    })
                    .collect()
            };
            match change {
                Assignment::Assigned(list) => {
                    for (t, p) in list {
                        self.positions.reassigned(t, *p);
                    }
                    self.core.assign_sources(sources(list))
                }
                Assignment::Revoked(list) => self.core.revoke_sources(&sources(list)),
            }
        }
        self.applied_changes.extend(changes);
    }

    /// The read snapshot of the store since the last checkpoint.
    fn reader(&mut self) -> Result<&JoinReader> {
        if self.reader.is_none() {
            self.reader = Some(self.store.join_reader()?);
        }
        Ok(self.reader.as_ref().expect("just set"))
    }

    /// Reads request `id` back from the store into the join when it is cold.
    fn load_cold(&mut self, id: &str) -> Result<()> {
        if self.core.join_holds(id) {
            return Ok(());
        }
        if let Some(bytes) = self.reader()?.get(id)? {
            let before = self.core.pending_predictions();
            self.core.restore_request(id, &bytes)?;
            let n = self.core.pending_predictions() - before;
            self.cold.requests = self.cold.requests.saturating_sub(1);
            self.cold.predictions = self.cold.predictions.saturating_sub(n);
            Counters::add(&self.counters.join_loaded_total, 1);
        }
        Ok(())
    }

    /// Before the watermark moves: reads back every cold request that
    /// expires by then, so the join expires it as if it had stayed in memory.
    fn load_expiring(&mut self, wall_ms: i64) -> Result<()> {
        if self.cold.requests == 0 {
            return Ok(());
        }
        let Some(wm) = self.core.watermark_at(wall_ms) else {
            return Ok(());
        };
        let mut due = Vec::new();
        self.reader()?;
        let (core, reader) = (&self.core, self.reader.as_ref().expect("opened above"));
        reader.expiring(wm, |key| {
            if !core.join_holds(key) {
                due.push(key.to_string());
            }
            Ok(())
        })?;
        for key in &due {
            self.load_cold(key)?;
        }
        if !due.is_empty() {
            tracing::debug!(
                requests = due.len(),
                "expiring join requests read back from the state store"
            );
        }
        Ok(())
    }

    /// After a checkpoint: when the join holds more than
    /// `state.memory_budget`, drops requests unchanged since the checkpoint
    /// from memory (the checkpoint holds them) down to 90 % of the budget.
    ///
    /// Counted in bytes held: [`JOIN_BYTES_PER_REQUEST`] per request plus
    /// its request id and label text ([`Core::join_text_bytes`]). Those are
    /// only measured (one pass over the join) when they could matter: when
    /// requests with ids and labels of `limits.max_identifier_bytes` each
    /// would exceed the budget.
    fn evict_over_budget(&mut self) {
        let budget = usize::try_from(self.cfg.state.memory_budget.as_u64()).unwrap_or(usize::MAX);
        let held = self.core.join_requests();
        let fixed = held.saturating_mul(JOIN_BYTES_PER_REQUEST as usize);
        let worst =
            fixed.saturating_add(held.saturating_mul(2 * self.cfg.limits.max_identifier_bytes));
        if held == 0 || worst <= budget {
            return;
        }
        let bytes = fixed.saturating_add(self.core.join_text_bytes());
        if bytes <= budget {
            return;
        }
        let per_request = (bytes / held).max(1);
        let keep = budget / 10 * 9 / per_request;
        let (requests, predictions) = self.core.evict_requests(held.saturating_sub(keep));
        self.cold.requests += requests;
        self.cold.predictions += predictions;
        Counters::add(&self.counters.join_evicted_total, requests as u64);
        tracing::debug!(
            evicted = requests,
            cold = self.cold.requests,
            in_memory = self.core.join_requests(),
            "join requests over the memory budget left memory (kept in the state store)"
        );
    }
}

impl Service {
    async fn write_pending(&mut self) -> Result<(), WriteError> {
        let p = &mut self.p.pending;
        if !(p.rows.is_empty() && p.histograms.is_empty() && p.alerts.is_empty()) {
            tracing::debug!(
                rows = p.rows.len(),
                histograms = p.histograms.len(),
                alerts = p.alerts.len(),
                "clickhouse write begin"
            );
        }
        for (model, version, profile) in &p.references {
            let json = serde_json::to_string(&**profile)
                .context("cannot serialize a reference profile")
                .map_err(WriteError::Permanent)?;
            self.sink
                .save_reference(model, version, profile.sample_count, &json)
                .await
                .map_err(WriteError::from_sink)?;
            tracing::info!(model = %model, version = %version, samples = profile.sample_count, "reference profile built from the first events");
        }
        p.references.clear();
        let t = &self.telemetry;
        if !p.versions.is_empty() {
            timed(
                t,
                "model_versions",
                p.versions.len(),
                self.sink.write_versions(&p.versions),
            )
            .await
            .map_err(WriteError::from_sink)?;
            p.versions.clear();
        }
        if !p.rows.is_empty() {
            timed(
                t,
                "window_metrics",
                p.rows.len(),
                self.sink.write_metrics(&p.rows),
            )
            .await
            .map_err(WriteError::from_sink)?;
            let dropped = record_sink_drops(&self.sink, t);
            let lost = dropped
                .get(crate::sinks::clickhouse::WINDOW_METRICS)
                .copied()
                .unwrap_or(0);
            Counters::add(
                &self.p.counters.rows_written_total,
                (p.rows.len() as u64).saturating_sub(lost),
            );
            p.rows.clear();
        }
        if !p.histograms.is_empty() {
            timed(
                t,
                "window_histograms",
                p.histograms.len(),
                self.sink.write_histograms(&p.histograms),
            )
            .await
            .map_err(WriteError::from_sink)?;
            p.histograms.clear();
        }
        if !p.alerts.is_empty() {
            timed(
                t,
                "alerts",
                p.alerts.len(),
                self.sink.write_alerts(&p.alerts),
            )
            .await
            .map_err(WriteError::from_sink)?;
            let report = self.alerts.publish(&p.alerts).await;
            let drop_example = report.dropped.first().map(|(i, e)| {
                format!(
                    "alert {} to {}: {e}",
                    p.alerts[*i].alert_id,
                    self.alerts.topic()
                )
            });
            // Delivered or dropped for good: done (webhooks, counters, log);
            // a transient failure keeps the alert pending (sent again next
            // flush, its ClickHouse row re-written idempotently).
            let mut left = Vec::with_capacity(report.failed.len());
            let mut done = Vec::with_capacity(p.alerts.len());
            for (i, a) in std::mem::take(&mut p.alerts).into_iter().enumerate() {
                if report.failed.contains(&i) {
                    left.push(a);
                } else {
                    done.push(a);
                }
            }
            p.alerts = left;
            if !report.dropped.is_empty() {
                let n = report.dropped.len() as u64;
                t.record_output_dropped("alerts", self.alerts.topic(), n);
                let example = || drop_example.unwrap_or_default();
                if let Some(line) = self.output_log.note("alerts", n, Instant::now(), example) {
                    log_dropped("alerts", &line);
                }
            }
            // Webhooks: queued for their workers, never awaited here.
            self.notifier.enqueue(&done);
            for a in &done {
                t.record_alert(&a.rule, a.status.as_str(), a.severity.as_str());
                tracing::warn!(alert_id = %a.alert_id, rule = %a.rule, status = a.status.as_str(), severity = a.severity.as_str(), model = %a.model_id, version = %a.model_version, "{}", a.message);
            }
            Counters::add(
                &self.p.counters.alerts_published_total,
                report.delivered.len() as u64,
            );
            if let Some(e) = report.error {
                return Err(WriteError::Transient(anyhow::anyhow!(
                    "cannot publish {} alerts to topic {}: {e}",
                    p.alerts.len(),
                    self.alerts.topic()
                )));
            }
        }
        let log = self.notifier.take_log();
        for d in &log {
            self.telemetry
                .record_webhook(&d.webhook, d.outcome == "delivered");
        }
        p.deliveries.extend(log);
        if !p.deliveries.is_empty() {
            self.sink
                .write_deliveries(&p.deliveries)
                .await
                .map_err(WriteError::from_sink)?;
            p.deliveries.clear();
        }
        if !p.letters.is_empty() {
            let (report, fitted) = self.dlq.send(&p.letters).await;
            let now = Instant::now();
            let c = &self.p.counters;
            let truncated = report
                .delivered
                .iter()
                .filter(|&&i| fitted[i].truncated(&p.letters[i]))
                .count();
            Counters::add(&c.dead_letters_truncated_total, truncated as u64);
            Counters::add(&c.dead_lettered_total, report.delivered.len() as u64);
            // One line per kind per interval, with the count and one example.
            let mut kinds: std::collections::BTreeMap<&str, (u64, usize)> = Default::default();
            for &i in &report.delivered {
                kinds.entry(p.letters[i].kind).or_insert((0, i)).0 += 1;
            }
            for (kind, (n, i)) in kinds {
                let example = || dead_letter_example(&p.letters[i], &fitted[i].reason);
                if let Some(line) = self.output_log.note(kind, n, now, example) {
                    log_dead_letters(&line);
                }
            }
            if !report.dropped.is_empty() {
                let n = report.dropped.len() as u64;
                self.telemetry
                    .record_output_dropped("dead_letter", self.dlq.topic(), n);
                let example = || {
                    let (i, e) = &report.dropped[0];
                    format!(
                        "{} to {}: {e}",
                        dead_letter_example(&p.letters[*i], &fitted[*i].reason),
                        self.dlq.topic()
                    )
                };
                if let Some(line) = self.output_log.note("dead_letter", n, now, example) {
                    log_dropped("dead_letter", &line);
                }
            }
            let failed: Vec<DeadLetter> = report
                .failed
                .iter()
                .map(|&i| p.letters[i].clone())
                .collect();
            p.letters = failed;
            if let Some(e) = report.error {
                return Err(WriteError::Transient(anyhow::anyhow!(
                    "cannot write {} messages to the dead-letter topic {}: {e}",
                    p.letters.len(),
                    self.dlq.topic()
                )));
            }
        }
        for line in self.output_log.due(Instant::now()) {
            match line.kind.as_str() {
                "alerts" | "dead_letter" => log_dropped(&line.kind, &line),
                _ => log_dead_letters(&line),
            }
        }
        Ok(())
    }
}

/// Counts the rows the ClickHouse sink dropped since the last call (per
/// table, in telemetry) and returns them.
fn record_sink_drops(
    sink: &ClickHouseSink,
    t: &Telemetry,
) -> std::collections::BTreeMap<String, u64> {
    let dropped = sink.take_dropped();
    for (table, n) in &dropped {
        t.record_output_dropped("clickhouse", table, *n);
    }
    dropped
}

/// Where a dead letter came from and why, for a log line (bounded).
fn dead_letter_example(d: &DeadLetter, reason: &str) -> String {
    format!(
        "{}/{}@{}: {}",
        d.topic,
        d.partition,
        d.offset,
        crate::sinks::kafka::escape_bounded(reason, 256)
    )
}

fn log_dead_letters(line: &crate::telemetry::LogLine) {
    tracing::warn!(
        kind = %line.kind,
        count = line.count,
        example = %line.example,
        "messages dead-lettered (one line per kind every {}s at most)",
        DEAD_LETTER_LOG_INTERVAL.as_secs()
    );
}

fn log_dropped(output: &str, line: &crate::telemetry::LogLine) {
    tracing::error!(
        output,
        count = line.count,
        example = %line.example,
        "messages the broker refuses for good were dropped after {} attempts",
        crate::sinks::kafka::PERMANENT_ATTEMPTS
    );
}

/// Processes one consumed message: assignment changes first (the watermark
/// must know every partition, and the positions which partitions start a
/// new fetch, before the message counts; the service's own bookkeeping of
/// them follows in [`Service::apply_assignment`]), then the message, then
/// the seek back the positions may ask for ([`crate::ingest::offsets`]: the
/// resume invariant).
fn consume(
    consumer: &InputConsumer,
    p: &mut Processing,
    msg: &rdkafka::message::BorrowedMessage<'_>,
    now: i64,
) {
    let changes = consumer.context().take_changes();
    if !changes.is_empty() {
        p.apply_assignment(changes);
    }
    // Collected only when a mapped field reads a header (`[kafka.mapping]`);
    // a header without a value is left out, as if absent.
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    if p.decoder.mappings().uses_headers() {
        if let Some(h) = msg.headers() {
            headers.extend(h.iter().filter_map(|h| h.value.map(|v| (h.key, v))));
        }
    }
    p.handle(
        msg.topic(),
        msg.partition(),
        msg.offset(),
        msg.key(),
        msg.payload(),
        &headers,
        now,
    );
    if !p.rewinds.is_empty() {
        rewind(consumer, p);
    }
}

/// Fetches the writer schema of a Confluent-framed message from the Schema
/// Registry if its id is not cached yet, so that the (pure) decoder finds
/// it. An error (the registry refused, or stayed unreachable for
/// `kafka.schema_registry.retry_for`) stops the service before the message
/// is handled: nothing is dead-lettered or committed for it.
async fn prefetch_schema(
    registry: Option<&Registry>,
    p: &Processing,
    msg: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<()> {
    let Some(r) = registry else {
        return Ok(());
    };
    if !matches!(p.cfg.kafka.format, Format::Auto | Format::ConfluentAvro) {
        return Ok(());
    }
    match msg.payload() {
        Some(payload) => r.prefetch(payload).await,
        None => Ok(()),
    }
}

/// Seeks partitions back that resumed past their position: the messages
/// fetched before the seek are discarded by librdkafka, the ones after it
/// are checked again by the positions.
fn rewind(consumer: &InputConsumer, p: &mut Processing) {
    for (topic, partition, to) in std::mem::take(&mut p.rewinds) {
        let position = p.positions.get(&topic, partition);
        tracing::warn!(
            topic = %topic,
            partition,
            position,
            seek_to = to,
            "the broker resumed a partition past the state's position (a fetch inside a record batch answered with the next batch): reading it again from further back"
        );
        if let Err(e) = consumer.seek(
            &topic,
            partition,
            rdkafka::Offset::Offset(to),
            Duration::from_secs(5),
        ) {
            // The next message of the partition is checked again and asks
            // for a rewind from further back (bounded).
            tracing::warn!(topic = %topic, partition, error = %e, "cannot seek a partition back");
        }
    }
}

/// Runs one ClickHouse write, recording its duration, rows or error kind.
async fn timed(
    t: &Telemetry,
    table: &str,
    rows: usize,
    write: impl Future<Output = Result<(), SinkError>>,
) -> Result<(), SinkError> {
    let started = Instant::now();
    let r = write.await;
    match &r {
        Ok(()) => t.record_insert(table, rows, started.elapsed().as_secs_f64()),
        Err(e) => t.record_insert_error(
            table,
            if e.is_transient() {
                "transient"
            } else {
                "permanent"
            },
        ),
    }
    r
}

enum WriteError {
    Transient(anyhow::Error),
    Permanent(anyhow::Error),
}

impl WriteError {
    fn from_sink(e: SinkError) -> Self {
        match e {
            SinkError::Transient(_) => {
                WriteError::Transient(anyhow::anyhow!("ClickHouse write failed: {e}"))
            }
            // Inserts drop rejected rows themselves: a `Rejected` here came
            // from elsewhere and is treated like a setup error.
            SinkError::Permanent(_) | SinkError::Rejected(_) => {
                WriteError::Permanent(anyhow::anyhow!(
                    "ClickHouse refused a write for a reason that is not the data's ({e}): check \
                 clickhouse.url, user, password, the user's grants and the tables. The service \
                 stops; its state stays at the last checkpoint, and a restart after the fix \
                 (which also re-creates a missing database or table) replays the input from there"
                ))
            }
        }
    }
}

/// Loads the stored reference profiles into the core; returns how many.
/// With `restored` (the core comes from a checkpoint, which holds the
/// profiles it had), only profiles the checkpoint does not hold are
/// installed: versions it does not know, and re-imports of versions whose
/// profile differs. A version whose profile was still being built from its
/// first events keeps building: the replay after the checkpoint rebuilds the
/// same profile the stopped run had built.
pub async fn load_references(
    sink: &ClickHouseSink,
    core: &mut Core,
    restored: bool,
) -> Result<usize> {
    let stored = sink
        .load_references()
        .await
        .map_err(|e| anyhow::anyhow!("cannot load reference profiles: {e}"))?;
    let mut n = 0;
    for (model, version, json) in stored {
        match serde_json::from_str::<ReferenceProfile>(&json) {
            Ok(p) => {
                if restored && !core.aggregator_mut().needs_reference(&model, &version, &p) {
                    continue;
                }
                core.set_reference(&model, &version, p);
                n += 1;
            }
            Err(e) => {
                tracing::warn!(model = %model, version = %version, error = %e, "stored reference profile is unreadable, ignored")
            }
        }
    }
    Ok(n)
}

/// Opens the last checkpoint of the store, if any: the core with its join
/// state (as much as `state.memory_budget` allows in memory; the rest stays
/// cold in the store), the input positions and the cold counts.
fn restore_state(store: &StateStore, cfg: &Config) -> Result<Option<(Core, Positions, Cold)>> {
    let started = Instant::now();
    let Some(r) = store.load()? else {
        tracing::info!(store = %store.path().display(), "no checkpoint: starting with empty state");
        return Ok(None);
    };
    let mut core = Core::restore(cfg, |name| r.record(name))?;
    let max = cfg.state.max_hot_requests() / 10 * 9;
    let mut cold = Cold::default();
    store.for_each_join(|key, bytes| {
        if core.join_requests() < max {
            core.restore_request(key, bytes)?;
        } else {
            cold.requests += 1;
            cold.predictions += Core::stored_predictions(bytes)?;
        }
        Ok(())
    })?;
    let stats = core.stats();
    tracing::info!(
        store = %store.path().display(),
        predictions = stats.predictions,
        labels = stats.labels,
        pending_predictions = core.pending_predictions() + cold.predictions,
        join_records = r.join_records,
        cold_requests = cold.requests,
        partitions = r.positions.len(),
        seconds = started.elapsed().as_secs_f64(),
        "state restored from the last checkpoint"
    );
    Ok(Some((core, Positions::restored(r.positions), cold)))
}

/// Rebuilds the alert engine's state from the `alerts` table: alerts still
/// firing, and those of windows within two label horizons (so a replay does
/// not raise them again). Returns how many were restored.
pub async fn restore_alerts(sink: &ClickHouseSink, core: &mut Core, cfg: &Config) -> Result<usize> {
    let horizon = i64::try_from(cfg.windows.label_horizon.as_millis()).unwrap_or(i64::MAX / 4);
    let since = now_ms().saturating_sub(horizon.saturating_mul(2));
    let alerts = sink
        .load_alerts(since)
        .await
        .map_err(|e| anyhow::anyhow!("cannot load the alert state: {e}"))?;
    Ok(core.alert_engine_mut().restore(&alerts))
}

/// `modelwatch run`: the service until SIGINT / SIGTERM (or, with
/// `exit_when_idle`, until the input has been idle for `windows.idle_timeout`).
pub async fn run(cfg: Config, exit_when_idle: bool, reset_state: bool) -> Result<()> {
    if reset_state && crate::state::reset(&cfg.state.dir)? {
        tracing::warn!(dir = %cfg.state.dir.display(), "state discarded (--reset-state): starting with empty state from the group's committed offsets");
    }
    // TLS or SASL settings that can never work stop the service here rather
    // than in librdkafka's endless reconnects (see README, "Secured clusters").
    let kafka = cfg.kafka.clone();
    tokio::task::spawn_blocking(move || {
        crate::ingest::consumer::check_connection(&kafka, Duration::from_secs(15))
    })
    .await??;
    let mut service = Service::start(cfg.clone()).await?;
    let api = if cfg.api.enabled {
        Some(crate::api::ApiServer::start(&cfg, service.telemetry()).await?)
    } else {
        None
    };
    let result = if exit_when_idle {
        service.run_until_idle(shutdown_signal()).await
    } else {
        service.run_until(shutdown_signal()).await
    };
    service.progress().log("stopped");
    // The API stops last: /metrics and /readyz stay up while the service drains.
    if let Some(api) = api {
        api.stop().await;
    }
    result
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("second interrupt: exiting now");
        std::process::exit(130);
    });
}

/// Reads a JSON Lines file of PredictionEvents of one model version and
/// builds its reference profile.
pub fn build_reference_from_file(
    path: &std::path::Path,
    model_id: &str,
    version: &str,
    drift: &crate::metrics::DriftConfig,
) -> Result<ReferenceProfile> {
    use std::io::BufRead;
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open reference file {}", path.display()))?;
    let mut builder = crate::metrics::ReferenceBuilder::new(drift);
    let mut skipped = 0u64;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let ev: crate::model::PredictionEvent = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a PredictionEvent", path.display(), i + 1))?;
        if ev.model_id != model_id || ev.model_version != version {
            skipped += 1;
            continue;
        }
        builder.observe(&ev);
    }
    if builder.is_empty() {
        bail!(
            "{} holds no events of model {model_id} version {version} ({skipped} of other versions)",
            path.display()
        );
    }
    if skipped > 0 {
        tracing::warn!(skipped, "events of other model versions were skipped");
    }
    Ok(builder.build())
}
