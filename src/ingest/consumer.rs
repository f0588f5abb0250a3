//! The Kafka side of ingestion: client settings, the consumer of both input
//! topics, and offset commits. No decoding here (see [`super::decode`]).
//!
//! One consumer in group `kafka.group_id` reads both topics. Auto-commit is
//! off: [`crate::app`] commits only offsets whose output is durable. The
//! `range` assignor keeps partition p of both (co-partitioned) topics on the
//! same instance, so a prediction and its label meet in one process.

use anyhow::{Context, Result};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// Base client settings: brokers plus every pass-through property.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// A change of the partitions this consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// These (topic, partition) are now read by this consumer.
    Assigned(Vec<(String, i32)>),
    /// These are no longer read by this consumer.
    Revoked(Vec<(String, i32)>),
}

/// Logs partition assignment changes and queues them for the service loop
/// ([`IngestContext::take_changes`]): librdkafka calls the rebalance
/// callbacks from inside a poll, where the service's state is out of reach.
#[derive(Default)]
pub struct IngestContext {
    changes: std::sync::Mutex<Vec<Assignment>>,
    pending: std::sync::atomic::AtomicBool,
}

impl IngestContext {
    fn push(&self, change: Assignment) {
        if let Ok(mut c) = self.changes.lock() {
            c.push(change);
            self.pending
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// The assignment changes since the last call, oldest first (cheap when
    /// there are none: one atomic load).
    pub fn take_changes(&self) -> Vec<Assignment> {
        if !self
            .pending
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return Vec::new();
        }
        self.changes
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }
}

impl ClientContext for IngestContext {}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) {
        match r {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = %describe(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = %describe(tpl), "partitions revoked");
                self.push(Assignment::Revoked(list(tpl)));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = r {
            self.push(Assignment::Assigned(list(tpl)));
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed");
        }
    }
}

fn list(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The input consumer type.
pub type InputConsumer = StreamConsumer<IngestContext>;

/// Creates the consumer of both input topics and subscribes it.
pub fn input_consumer(cfg: &KafkaConfig) -> Result<InputConsumer> {
    let mut c = client_config(cfg);
    c.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range")
        .set("enable.partition.eof", "false");
    // Pass-through properties win over our defaults.
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    let consumer: InputConsumer = c
        .create_with_context(IngestContext::default())
        .with_context(|| format!("cannot create a Kafka consumer for {}", cfg.brokers))?;
    consumer
        .subscribe(&[&cfg.predictions_topic, &cfg.ground_truth_topic])
        .with_context(|| {
            format!(
                "cannot subscribe to {} and {}",
                cfg.predictions_topic, cfg.ground_truth_topic
            )
        })?;
    Ok(consumer)
}

/// Commits the given positions (the next offset to read) asynchronously.
pub fn commit(consumer: &InputConsumer, positions: &[(String, i32, i64)]) -> Result<()> {
    if positions.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in positions {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .context("invalid offset")?;
    }
    consumer
        .commit(&tpl, CommitMode::Async)
        .context("offset commit failed")
}
