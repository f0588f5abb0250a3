//! Writes a [`Generator`]'s events to Kafka: predictions and labels to their
//! two topics, keyed by request id with the murmur2 partitioner so a
//! prediction and its label land in the same partition number (DESIGN.md:
//! co-partitioned inputs). The payload encoding is the caller's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, ToBytes};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::Generator;
use crate::model::InputEvent;

/// Where and how fast [`produce`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct ProduceOptions {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Topic of the prediction events.
    pub predictions_topic: String,
    /// Topic of the ground-truth events.
    pub ground_truth_topic: String,
    /// Messages per wall-clock second; `None` = as fast as possible.
    pub rate_limit: Option<f64>,
    /// Extra librdkafka properties; they override the defaults set here.
    pub properties: BTreeMap<String, String>,
    /// Keeps the producer at most this far ahead of a consumer; `None` = no limit.
    pub pace: Option<Pace>,
}

/// Flow control for a producer that feeds a consumer in the same process
/// (the demo): sending waits while `sent - consumed()` exceeds `max_lead`.
/// An in-process MockCluster keeps only about 5 MB per partition, so a
/// producer far ahead of its consumer would lose messages there.
#[derive(Clone)]
pub struct Pace {
    /// Messages consumed so far.
    pub consumed: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Largest allowed lead of the producer, in messages.
    pub max_lead: u64,
}

impl std::fmt::Debug for Pace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pace").field("max_lead", &self.max_lead).finish()
    }
}

impl PartialEq for Pace {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.consumed, &other.consumed) && self.max_lead == other.max_lead
    }
}

impl Default for ProduceOptions {
    fn default() -> Self {
        ProduceOptions {
            brokers: "127.0.0.1:9092".to_owned(),
            predictions_topic: "predictions".to_owned(),
            ground_truth_topic: "ground-truth".to_owned(),
            rate_limit: None,
            properties: BTreeMap::new(),
            pace: None,
        }
    }
}

/// What [`produce`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceSummary {
    /// Prediction events acknowledged by the broker.
    pub predictions: u64,
    /// Ground-truth events acknowledged by the broker.
    pub labels: u64,
    /// Wall-clock time from the first send to the end of the final flush.
    pub elapsed: Duration,
}

/// The default encoding: the contract JSON of the event.
pub fn json_encode(event: &InputEvent) -> Vec<u8> {
    let encoded = match event {
        InputEvent::Prediction(p) => serde_json::to_vec(p),
        InputEvent::GroundTruth(g) => serde_json::to_vec(g),
    };
    // The event types serialize infallibly (string keys, non-finite numbers as null).
    encoded.unwrap_or_default()
}

/// Counts delivery reports on librdkafka's polling thread.
#[derive(Default)]
struct DeliveryCounter {
    delivered: [AtomicU64; 2],
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// Producer context sharing a [`DeliveryCounter`].
struct CountingContext(Arc<DeliveryCounter>);

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    /// 0 = prediction, 1 = label.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, kind: usize) {
        match result {
            Ok(_) => {
                if let Some(c) = self.0.delivered.get(kind) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err((e, msg)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.0.first_error.lock() {
                    first.get_or_insert_with(|| format!("{e} (topic {})", msg.topic()));
                }
            }
        }
    }
}

/// Produces the generator's events keyed by request_id with partitioner
/// murmur2_random (DESIGN.md: both topics co-partitioned), idempotent
/// producer, bounded in-flight; calls `progress(sent_so_far)` about once per
/// second; flushes before returning.
///
/// Fails when the producer cannot be created, when a message is rejected
/// locally, or when any message is not acknowledged by the broker.
pub async fn produce(
    gen: Generator,
    opts: &ProduceOptions,
    encode: &(dyn Fn(&InputEvent) -> Vec<u8> + Sync),
    progress: &mut (dyn FnMut(u64) + Send),
) -> anyhow::Result<ProduceSummary> {
    let counter = Arc::new(DeliveryCounter::default());
    let producer = Arc::new(create_producer(opts, Arc::clone(&counter))?);
    check_co_partitioned(Arc::clone(&producer), opts).await?;
    let started = Instant::now();
    let mut last_progress = started;
    let mut sent: u64 = 0;

    for event in gen {
        if let Some(rate) = opts.rate_limit {
            throttle(rate, started, sent).await;
        }
        let (topic, key, kind) = match &event {
            InputEvent::Prediction(p) => (&opts.predictions_topic, p.request_id.as_str(), 0),
            InputEvent::GroundTruth(g) => (&opts.ground_truth_topic, g.request_id.as_str(), 1),
        };
        let payload = encode(&event);
        send(&producer, topic, key, &payload, kind).await?;
        sent += 1;
        // Checking the clock every message would cost more than the send.
        if sent.is_multiple_of(1024) {
            if last_progress.elapsed() >= Duration::from_secs(1) {
                last_progress = Instant::now();
                progress(sent);
            }
            // The loop never waits while the queue has room: let other tasks
            // on this runtime (the demo's pipeline) run.
            tokio::task::yield_now().await;
            if let Some(pace) = &opts.pace {
                while sent.saturating_sub((pace.consumed)()) > pace.max_lead {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    let flusher = Arc::clone(&producer);
    tokio::task::spawn_blocking(move || flusher.flush(Duration::from_secs(60)))
        .await
        .context("flush task failed")?
        .context("flushing the generated events timed out")?;
    let elapsed = started.elapsed();
    progress(sent);

    let failed = counter.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = counter
            .first_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_default();
        bail!("{failed} of {sent} messages were not delivered, first error: {first}");
    }
    let summary = ProduceSummary {
        predictions: counter.delivered[0].load(Ordering::Relaxed),
        labels: counter.delivered[1].load(Ordering::Relaxed),
        elapsed,
    };
    if summary.predictions + summary.labels != sent {
        bail!(
            "{sent} messages sent but {} acknowledged",
            summary.predictions + summary.labels
        );
    }
    Ok(summary)
}

/// An idempotent producer with the co-partitioning partitioner; user
/// properties are applied last so they can tune anything.
fn create_producer(
    opts: &ProduceOptions,
    counter: Arc<DeliveryCounter>,
) -> anyhow::Result<ThreadedProducer<CountingContext>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &opts.brokers)
        // Java-compatible hashing of the key, so other clients agree (DESIGN.md).
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        // Idempotence keeps order with up to 5 in-flight requests per connection.
        .set("max.in.flight.requests.per.connection", "5")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        // Bounds memory: when the local queue is full, send() waits for deliveries.
        .set("queue.buffering.max.messages", "200000")
        .set("queue.buffering.max.kbytes", "262144")
        .set("message.timeout.ms", "60000");
    for (k, v) in &opts.properties {
        config.set(k, v);
    }
    config
        .create_with_context(CountingContext(counter))
        .with_context(|| format!("failed to create a Kafka producer for {}", opts.brokers))
}

/// Fails when both topics exist with different partition counts: a label
/// would then land in another partition than its prediction (DESIGN.md).
/// Topics that do not exist yet are left to the broker's auto-creation.
async fn check_co_partitioned(
    producer: Arc<ThreadedProducer<CountingContext>>,
    opts: &ProduceOptions,
) -> anyhow::Result<()> {
    // Bounded by the delivery timeout the caller chose, at most 10 s.
    let timeout = opts
        .properties
        .get("message.timeout.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
        .min(Duration::from_secs(10));
    let metadata =
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout))
            .await
            .context("metadata task failed")?
            .with_context(|| format!("cannot fetch topic metadata from {}", opts.brokers))?;
    let partitions = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| t.partitions().len())
            .filter(|&n| n > 0)
    };
    let topics = (&opts.predictions_topic, &opts.ground_truth_topic);
    if let (Some(p), Some(g)) = (partitions(topics.0), partitions(topics.1)) {
        if p != g {
            bail!(
                "topics {} ({p} partitions) and {} ({g} partitions) must have the same \
                 partition count so a label lands in its prediction's partition",
                topics.0,
                topics.1
            );
        }
    }
    Ok(())
}

/// Enqueues one message, waiting while librdkafka's local queue is full.
async fn send(
    producer: &ThreadedProducer<CountingContext>,
    topic: &str,
    key: &str,
    payload: &[u8],
    kind: usize,
) -> anyhow::Result<()> {
    let mut record = BaseRecord::with_opaque_to(topic, kind)
        .key(key.to_bytes())
        .payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                // The polling thread drains delivery reports meanwhile.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => {
                return Err(anyhow!(e).context(format!("failed to produce to topic {topic}")))
            }
        }
    }
}

/// Sleeps until sending message number `sent` keeps the rate at most `rate` per second.
async fn throttle(rate: f64, started: Instant, sent: u64) {
    if !(rate.is_finite() && rate > 0.0) {
        return;
    }
    let Ok(due) = Duration::try_from_secs_f64(sent as f64 / rate) else {
        return;
    };
    let elapsed = started.elapsed();
    if due > elapsed {
        tokio::time::sleep(due - elapsed).await;
    }
}
