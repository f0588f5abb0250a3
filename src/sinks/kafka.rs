//! Kafka producers: alert events (Avro, keyed by model id) and the
//! dead-letter topic (the original bytes, the reason in headers).
//!
//! Both producers are idempotent (`enable.idempotence=true`): a retried send
//! is not duplicated by the broker. Sends are awaited, so the caller knows
//! the output is durable before it commits input offsets.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::future::try_join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::ingest::consumer::client_config;
use crate::ingest::decode::encode_alert;
use crate::model::AlertEvent;

const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates an idempotent producer with the service's Kafka settings.
pub fn producer(cfg: &KafkaConfig) -> Result<FutureProducer> {
    let mut c = client_config(cfg);
    c.set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000");
    c.create()
        .with_context(|| format!("cannot create a Kafka producer for {}", cfg.brokers))
}

/// Publishes alert transitions to the alerts topic.
#[derive(Clone)]
pub struct AlertPublisher {
    producer: FutureProducer,
    topic: String,
}

impl AlertPublisher {
    /// A publisher on `topic` using `producer`.
    pub fn new(producer: FutureProducer, topic: &str) -> Self {
        AlertPublisher {
            producer,
            topic: topic.to_string(),
        }
    }

    /// Sends the alerts (Avro `AlertEvent`, key = model id) and waits for
    /// every delivery.
    pub async fn publish(&self, alerts: &[AlertEvent]) -> Result<()> {
        let payloads: Vec<Vec<u8>> = alerts.iter().map(encode_alert).collect();
        let sends = alerts.iter().zip(&payloads).map(|(a, p)| {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "alert_id",
                    value: Some(a.alert_id.as_bytes()),
                })
                .insert(Header {
                    key: "status",
                    value: Some(a.status.as_str().as_bytes()),
                });
            let record = FutureRecord::to(&self.topic)
                .key(a.model_id.as_bytes())
                .payload(p.as_slice())
                .headers(headers);
            async move {
                self.producer
                    .send(record, SEND_TIMEOUT)
                    .await
                    .map_err(|(e, _)| e)
            }
        });
        try_join_all(sends)
            .await
            .with_context(|| format!("cannot publish alerts to topic {}", self.topic))?;
        Ok(())
    }
}

/// Where an undecodable message came from.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Original key.
    pub key: Option<Vec<u8>>,
    /// Original payload, unchanged.
    pub payload: Vec<u8>,
    /// Why it was rejected (human readable).
    pub reason: String,
    /// Short stable error kind (for counting).
    pub kind: &'static str,
}

/// Sends rejected messages to the dead-letter topic.
#[derive(Clone)]
pub struct DeadLetterQueue {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterQueue {
    /// A queue on `topic` using `producer`.
    pub fn new(producer: FutureProducer, topic: &str) -> Self {
        DeadLetterQueue {
            producer,
            topic: topic.to_string(),
        }
    }

    /// Sends the messages with headers `modelwatch.error`,
    /// `modelwatch.error.kind`, `modelwatch.source.topic`,
    /// `modelwatch.source.partition`, `modelwatch.source.offset`, and waits
    /// for every delivery.
    pub async fn send(&self, letters: &[DeadLetter]) -> Result<()> {
        let sends = letters.iter().map(|d| {
            let partition = d.partition.to_string();
            let offset = d.offset.to_string();
            async move {
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "modelwatch.error",
                        value: Some(d.reason.as_bytes()),
                    })
                    .insert(Header {
                        key: "modelwatch.error.kind",
                        value: Some(d.kind.as_bytes()),
                    })
                    .insert(Header {
                        key: "modelwatch.source.topic",
                        value: Some(d.topic.as_bytes()),
                    })
                    .insert(Header {
                        key: "modelwatch.source.partition",
                        value: Some(partition.as_bytes()),
                    })
                    .insert(Header {
                        key: "modelwatch.source.offset",
                        value: Some(offset.as_bytes()),
                    });
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
                    .payload(d.payload.as_slice())
                    .headers(headers);
                if let Some(k) = &d.key {
                    record = record.key(k.as_slice());
                }
                self.producer
                    .send(record, SEND_TIMEOUT)
                    .await
                    .map_err(|(e, _)| e)
            }
        });
        try_join_all(sends)
            .await
            .with_context(|| format!("cannot write to dead-letter topic {}", self.topic))?;
        Ok(())
    }
}
