//! Wires the stages: Kafka consumer → decode → [`Core`] → ClickHouse, alerts
//! topic, dead-letter topic; then commits the input offsets whose output is
//! durable.
//!
//! Order of a flush (every `flush_interval`): advance the core to the
//! watermark, write reference profiles, model versions, window rows and
//! alerts to ClickHouse, publish alerts and dead letters to Kafka, and only
//! then commit offsets. A failed write keeps everything pending and retries
//! on the next flush (all writes are idempotent); a permanent ClickHouse
//! error stops the service with the reason.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rdkafka::message::Message;

use crate::config::Config;
use crate::ingest::consumer::{commit, input_consumer, InputConsumer};
use crate::ingest::decode::{Decoder, EventKind};
use crate::ingest::offsets::OffsetTracker;
use crate::metrics::aggregator::WindowRow;
use crate::metrics::ReferenceProfile;
use crate::model::{AlertEvent, InputEvent};
use crate::pipeline::{Core, CoreStats, Output};
use crate::sinks::clickhouse::{ClickHouseSink, MetricRow, SinkError, VersionRow};
use crate::sinks::kafka::{producer, AlertPublisher, DeadLetter, DeadLetterQueue};
use crate::telemetry::Counters;

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

/// Output waiting to be written.
#[derive(Default)]
struct Pending {
    rows: Vec<MetricRow>,
    alerts: Vec<AlertEvent>,
    versions: Vec<VersionRow>,
    references: Vec<(Arc<str>, Arc<str>, Arc<ReferenceProfile>)>,
    letters: Vec<DeadLetter>,
    watermark: Option<i64>,
}

impl Pending {
    fn add(&mut self, out: Output) {
        self.rows.extend(out.emitted.rows.iter().map(metric_row));
        self.alerts.extend(out.alerts);
        self.versions
            .extend(out.emitted.versions.into_iter().map(|v| VersionRow {
                model_id: v.model_id.to_string(),
                model_version: v.model_version.to_string(),
                task: v.task.to_string(),
                first_seen_ms: v.first_seen_ms,
                last_seen_ms: v.last_seen_ms,
                metadata: serde_json::json!({ "reference_features": v.reference_features })
                    .to_string(),
            }));
        self.references.extend(out.emitted.references);
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
    /// Pending predictions.
    pub pending_predictions: usize,
}

/// The running service: one consumer, the processing state, the sinks.
pub struct Service {
    consumer: InputConsumer,
    sink: ClickHouseSink,
    alerts: AlertPublisher,
    dlq: DeadLetterQueue,
    last_error_log: Option<Instant>,
    p: Processing,
}

/// Everything a consumed message touches (split from [`Service`] so a
/// message borrowed from the consumer can be processed in place).
struct Processing {
    cfg: Config,
    decoder: Decoder,
    core: Core,
    offsets: OffsetTracker,
    pending: Pending,
    counters: Arc<Counters>,
}

impl Service {
    /// Connects to ClickHouse (migrating it), loads reference profiles,
    /// creates the Kafka clients and subscribes.
    pub async fn start(cfg: Config) -> Result<Service> {
        let sink = ClickHouseSink::new(&cfg.clickhouse);
        sink.ping().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach ClickHouse at {}: {e}. Start one with deploy/clickhouse-start.sh or set clickhouse.url",
                cfg.clickhouse.url
            )
        })?;
        sink.migrate()
            .await
            .map_err(|e| anyhow::anyhow!("ClickHouse migration failed: {e}"))?;
        let mut core = Core::new(&cfg);
        let loaded = load_references(&sink, &mut core).await?;
        tracing::info!(profiles = loaded, "reference profiles loaded");
        let producer = producer(&cfg.kafka)?;
        let consumer = input_consumer(&cfg.kafka)?;
        Ok(Service {
            alerts: AlertPublisher::new(producer.clone(), &cfg.kafka.alerts_topic),
            dlq: DeadLetterQueue::new(producer, &cfg.kafka.dead_letter_topic),
            consumer,
            sink,
            last_error_log: None,
            p: Processing {
                decoder: Decoder::new(cfg.kafka.format),
                core,
                offsets: OffsetTracker::new(),
                pending: Pending::default(),
                counters: Arc::new(Counters::default()),
                cfg,
            },
        })
    }

    /// The service's counters (shared).
    pub fn counters(&self) -> Arc<Counters> {
        self.p.counters.clone()
    }

    /// What has been done so far.
    pub fn progress(&self) -> Progress {
        let c = &self.p.counters;
        Progress {
            core: self.p.core.stats(),
            consumed: Counters::get(&c.predictions_consumed_total)
                + Counters::get(&c.labels_consumed_total),
            dead_lettered: Counters::get(&c.dead_lettered_total),
            rows_written: Counters::get(&c.rows_written_total),
            alerts_published: Counters::get(&c.alerts_published_total),
            pending_predictions: self.p.core.pending_predictions(),
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
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = tick.tick() => self.flush(now_ms(), false).await?,
                _ = report.tick() => {
                    let p = self.progress();
                    tracing::info!(
                        consumed = p.consumed,
                        predictions = p.core.predictions,
                        labels = p.core.labels,
                        matched = p.core.matched,
                        pending = p.pending_predictions,
                        dead_lettered = p.dead_lettered,
                        rows_written = p.rows_written,
                        alerts = p.alerts_published,
                        "progress"
                    );
                }
                m = self.consumer.recv() => match m {
                    Ok(msg) => {
                        self.p.handle(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.payload(), now_ms());
                    }
                    Err(e) => self.log_consumer_error(&e),
                },
            }
        }
        tracing::info!("shutting down: writing what is due and committing offsets");
        self.flush(now_ms(), false).await
    }

    /// Consumes until the input has been idle for `windows.idle_timeout`
    /// (after at least one message) or `shutdown` resolves; then closes every
    /// window, writes and commits. For replays and backfills of a finite stream.
    pub async fn run_until_idle(&mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let idle = self.p.cfg.windows.idle_timeout;
        let counters = self.p.counters.clone();
        let started = Instant::now();
        // The idle check reads the shared counters: no borrow of `self` needed.
        let idle_or_shutdown = async move {
            let mut last_seen = 0;
            let mut since = Instant::now();
            let poll = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let seen = Counters::get(&counters.predictions_consumed_total)
                        + Counters::get(&counters.labels_consumed_total);
                    if seen != last_seen {
                        last_seen = seen;
                        since = Instant::now();
                    } else if seen > 0 && since.elapsed() >= idle && started.elapsed() >= idle {
                        tracing::info!(consumed = seen, "input idle: closing every window and exiting");
                        break;
                    }
                }
            };
            tokio::select! {
                _ = poll => {},
                _ = shutdown => {},
            }
        };
        self.run_until(idle_or_shutdown).await?;
        self.flush(now_ms(), true).await
    }

    fn log_consumer_error(&mut self, e: &rdkafka::error::KafkaError) {
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
        self.p.handle(topic, partition, offset, key, payload, wall_ms)
    }

    /// Advances the core (or, with `close_all`, closes every window) and
    /// writes everything pending; commits offsets when it all succeeded.
    pub async fn flush(&mut self, wall_ms: i64, close_all: bool) -> Result<()> {
        let out = if close_all {
            self.p.core.flush(wall_ms)
        } else {
            self.p.core.advance(wall_ms)
        };
        self.p.pending.add(out);
        match self.write_pending().await {
            Ok(()) => {}
            Err(WriteError::Permanent(e)) => return Err(e),
            Err(WriteError::Transient(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "write failed, will retry at the next flush");
                return Ok(());
            }
        }
        let moved = match self.p.pending.watermark {
            Some(wm) => self.p.offsets.advance(if close_all { i64::MAX } else { wm }),
            // Only undecodable input so far: it is durable in the dead-letter topic.
            None => self.p.offsets.advance(i64::MIN),
        };
        if !moved.is_empty() {
            commit(&self.consumer, &moved)?;
            Counters::add(&self.p.counters.commits_total, 1);
        }
        Ok(())
    }
}

impl Processing {
    fn handle(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        wall_ms: i64,
    ) {
        let kind = if topic == self.cfg.kafka.predictions_topic {
            Counters::add(&self.counters.predictions_consumed_total, 1);
            EventKind::Prediction
        } else {
            Counters::add(&self.counters.labels_consumed_total, 1);
            EventKind::GroundTruth
        };
        let bytes = payload.unwrap_or(&[]);
        match self.decoder.decode(kind, bytes) {
            Ok(InputEvent::Prediction(p)) => {
                self.core.on_prediction(&p, wall_ms);
                let due = self.core.due_time(p.timestamp);
                self.offsets.record(topic, partition, offset, Some(due));
            }
            Ok(InputEvent::GroundTruth(g)) => {
                self.core.on_label(&g, wall_ms);
                let due = self.core.due_time(g.timestamp);
                self.offsets.record(topic, partition, offset, Some(due));
            }
            Err(e) => {
                Counters::add(&self.counters.decode_failures_total, 1);
                self.core.on_undecodable(wall_ms);
                self.offsets.record(topic, partition, offset, None);
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

impl Service {
    async fn write_pending(&mut self) -> Result<(), WriteError> {
        let p = &mut self.p.pending;
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
        if !p.versions.is_empty() {
            self.sink
                .write_versions(&p.versions)
                .await
                .map_err(WriteError::from_sink)?;
            p.versions.clear();
        }
        if !p.rows.is_empty() {
            self.sink
                .write_metrics(&p.rows)
                .await
                .map_err(WriteError::from_sink)?;
            Counters::add(&self.p.counters.rows_written_total, p.rows.len() as u64);
            p.rows.clear();
        }
        if !p.alerts.is_empty() {
            self.sink
                .write_alerts(&p.alerts)
                .await
                .map_err(WriteError::from_sink)?;
            self.alerts
                .publish(&p.alerts)
                .await
                .map_err(WriteError::Transient)?;
            for a in &p.alerts {
                tracing::warn!(alert_id = %a.alert_id, rule = %a.rule, status = a.status.as_str(), severity = a.severity.as_str(), model = %a.model_id, version = %a.model_version, "{}", a.message);
            }
            Counters::add(&self.p.counters.alerts_published_total, p.alerts.len() as u64);
            p.alerts.clear();
        }
        if !p.letters.is_empty() {
            self.dlq
                .send(&p.letters)
                .await
                .map_err(WriteError::Transient)?;
            for l in &p.letters {
                tracing::warn!(topic = %l.topic, partition = l.partition, offset = l.offset, kind = l.kind, reason = %l.reason, "message dead-lettered");
            }
            Counters::add(&self.p.counters.dead_lettered_total, p.letters.len() as u64);
            p.letters.clear();
        }
        Ok(())
    }
}

enum WriteError {
    Transient(anyhow::Error),
    Permanent(anyhow::Error),
}

impl WriteError {
    fn from_sink(e: SinkError) -> Self {
        match e {
            SinkError::Permanent(_) => {
                WriteError::Permanent(anyhow::anyhow!("ClickHouse rejected a write: {e}"))
            }
            _ => WriteError::Transient(anyhow::anyhow!("ClickHouse write failed: {e}")),
        }
    }
}

/// Loads every stored reference profile into the core; returns how many.
pub async fn load_references(sink: &ClickHouseSink, core: &mut Core) -> Result<usize> {
    let stored = sink
        .load_references()
        .await
        .map_err(|e| anyhow::anyhow!("cannot load reference profiles: {e}"))?;
    let mut n = 0;
    for (model, version, json) in stored {
        match serde_json::from_str::<ReferenceProfile>(&json) {
            Ok(p) => {
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

/// `modelwatch run`: the service until SIGINT / SIGTERM (or, with
/// `exit_when_idle`, until the input has been idle for `windows.idle_timeout`).
pub async fn run(cfg: Config, exit_when_idle: bool) -> Result<()> {
    let mut service = Service::start(cfg).await?;
    if exit_when_idle {
        service.run_until_idle(shutdown_signal()).await
    } else {
        service.run_until(shutdown_signal()).await
    }
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
    if builder.len() == 0 {
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
