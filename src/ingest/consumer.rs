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

/// Logs partition assignment changes.
pub struct IngestContext;

impl ClientContext for IngestContext {}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) {
        match r {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = %describe(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = %describe(tpl), "partitions revoked")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed");
        }
    }
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
        .create_with_context(IngestContext)
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
