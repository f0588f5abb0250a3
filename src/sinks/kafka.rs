//! Kafka producers: alert events (Avro, keyed by model id) and the
//! dead-letter topic (the original bytes, the reason in headers).
//!
//! Both producers are idempotent (`enable.idempotence=true`): a retried send
//! is not duplicated by the broker. Sends are awaited, so the caller knows
//! the output is durable before it commits input offsets.
//!
//! A message the broker can never accept (too large, unknown topic or
//! partition, no authorisation, an invalid record: [`is_permanent`]) is tried
//! [`PERMANENT_ATTEMPTS`] times and then dropped; the caller counts it. Other
//! errors are transient: the message stays pending and checkpoints wait.
//! Dead letters are made to fit before they are sent ([`fit_dead_letter`]):
//! the reason header is escaped and at most [`MAX_REASON_BYTES`], key and
//! payload are cut to the producer's `message.max.bytes`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::ingest::consumer::client_config;
use crate::ingest::decode::{encode_alert, encode_alert_confluent};
use crate::model::AlertEvent;

const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts for a message whose error is permanent before it is dropped: a
/// topic created a moment ago or an ACL being granted gets a short chance.
pub const PERMANENT_ATTEMPTS: u32 = 3;

/// Pause between two attempts of a permanently failing message.
const PERMANENT_BACKOFF: Duration = Duration::from_millis(200);

/// Longest reason header of a dead letter, in bytes (escaped, cut on a char
/// boundary): the reason may quote the rejected input.
pub const MAX_REASON_BYTES: usize = 1024;

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Room kept in a message for the record framing librdkafka and the broker
/// add around key, value and headers (record and batch headers, varints).
const RECORD_OVERHEAD: usize = 512;

/// Creates an idempotent producer with the service's Kafka settings.
pub fn producer(cfg: &KafkaConfig) -> Result<FutureProducer> {
    let mut c = client_config(cfg);
    c.set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000");
    c.create()
        .with_context(|| format!("cannot create a Kafka producer for {}", cfg.brokers))
}

/// The producer's effective `message.max.bytes`: the `[kafka.properties]`
/// value, else librdkafka's default (1 000 000).
pub fn message_max_bytes(cfg: &KafkaConfig) -> usize {
    cfg.properties
        .get("message.max.bytes")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
}

/// Whether a produce error can never succeed for this message (retrying
/// the same message against the same topic cannot help).
pub fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::UnknownPartition
                | C::UnknownTopicId
                | C::InvalidTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidRecord
                | C::InvalidTimestamp
                | C::InvalidRequiredAcks
                | C::PolicyViolation
        )
    )
}

/// What became of a batch of messages.
#[derive(Debug, Default)]
pub struct SendReport {
    /// Indices of the messages the broker acknowledged.
    pub delivered: Vec<usize>,
    /// Messages dropped after [`PERMANENT_ATTEMPTS`] permanent errors:
    /// index and error.
    pub dropped: Vec<(usize, String)>,
    /// Messages that failed with a transient error (to be sent again) and
    /// the first such error.
    pub failed: Vec<usize>,
    /// The first transient error.
    pub error: Option<String>,
}

impl SendReport {
    /// Whether every message was delivered or dropped.
    pub fn is_done(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Sends `n` records built by `record(i)`, concurrently; a permanent error
/// is retried [`PERMANENT_ATTEMPTS`] times in all, then the message is
/// dropped. Never fails as a whole: see [`SendReport`].
async fn send_each<'a, F>(producer: &FutureProducer, n: usize, record: F) -> SendReport
where
    F: Fn(usize) -> FutureRecord<'a, [u8], [u8]>,
{
    let record = &record;
    let sends = (0..n).map(|i| async move {
        let mut attempt = 1;
        loop {
            match producer.send(record(i), SEND_TIMEOUT).await {
                Ok(_) => return (i, Ok(())),
                Err((e, _)) if is_permanent(&e) && attempt < PERMANENT_ATTEMPTS => {
                    tokio::time::sleep(PERMANENT_BACKOFF * attempt).await;
                    attempt += 1;
                }
                Err((e, _)) => return (i, Err(e)),
            }
        }
    });
    let mut report = SendReport::default();
    for (i, r) in join_all(sends).await {
        match r {
            Ok(()) => report.delivered.push(i),
            Err(e) if is_permanent(&e) => report.dropped.push((i, e.to_string())),
            Err(e) => {
                report.failed.push(i);
                report.error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    report
}

/// Checks that the output topics exist (one metadata request each, without
/// creating them): a missing one fails startup with the fix. Broker errors
/// (unreachable, timeout) only warn: the sends retry those.
pub async fn check_output_topics(cfg: &KafkaConfig) -> Result<()> {
    let mut c = client_config(cfg);
    // Asking about a topic must not create it where the broker auto-creates.
    c.set("allow.auto.create.topics", "false");
    let consumer: BaseConsumer = c
        .create()
        .with_context(|| format!("cannot create a Kafka client for {}", cfg.brokers))?;
    let topics = [
        ("kafka.alerts_topic", cfg.alerts_topic.clone()),
        ("kafka.dead_letter_topic", cfg.dead_letter_topic.clone()),
    ];
    let brokers = cfg.brokers.clone();
    tokio::task::spawn_blocking(move || {
        for (key, topic) in topics {
            let metadata = match consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(topic = %topic, error = %e, "cannot check that the output topic exists");
                    continue;
                }
            };
            let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
                continue;
            };
            let missing = (t.error().is_none() && t.partitions().is_empty())
                || matches!(
                    t.error().map(RDKafkaErrorCode::from),
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
                );
            if missing {
                bail!(
                    "the output topic {topic:?} ({key}) does not exist on {brokers}: create it \
                     (e.g. `kafka-topics --bootstrap-server {brokers} --create --topic {topic} --partitions 1`) \
                     or set {key} to an existing topic"
                );
            }
            match t.error().map(RDKafkaErrorCode::from) {
                None => {}
                Some(
                    code @ (RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::InvalidTopic),
                ) => {
                    bail!("the output topic {topic:?} ({key}) cannot be used on {brokers}: {code}")
                }
                // Leader elections and the like: the sends retry those.
                Some(code) => {
                    tracing::warn!(topic = %topic, error = %code, "the output topic is not ready yet")
                }
            }
        }
        Ok(())
    })
    .await
    .context("the output topic check failed")?
}

/// Publishes alert transitions to the alerts topic.
#[derive(Clone)]
pub struct AlertPublisher {
    producer: FutureProducer,
    topic: String,
    /// The registry's id of our `AlertEvent` schema: alerts are
    /// Confluent-framed with it (else raw datums).
    schema_id: Option<u32>,
}

impl AlertPublisher {
    /// A publisher on `topic` using `producer`.
    pub fn new(producer: FutureProducer, topic: &str) -> Self {
        AlertPublisher {
            producer,
            topic: topic.to_string(),
            schema_id: None,
        }
    }

    /// Alerts framed in the Confluent wire format with `schema_id`.
    pub fn confluent(mut self, schema_id: u32) -> Self {
        self.schema_id = Some(schema_id);
        self
    }

    /// Sends the alerts (Avro `AlertEvent`, raw or Confluent-framed, key =
    /// model id) and waits for every delivery; see [`SendReport`] for what
    /// became of each.
    pub async fn publish(&self, alerts: &[AlertEvent]) -> SendReport {
        let payloads: Vec<Vec<u8>> = match self.schema_id {
            Some(id) => alerts
                .iter()
                .map(|a| encode_alert_confluent(a, id))
                .collect(),
            None => alerts.iter().map(encode_alert).collect(),
        };
        send_each(&self.producer, alerts.len(), |i| {
            let a = &alerts[i];
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "alert_id",
                    value: Some(a.alert_id.as_bytes()),
                })
                .insert(Header {
                    key: "status",
                    value: Some(a.status.as_str().as_bytes()),
                });
            FutureRecord::to(&self.topic)
                .key(a.model_id.as_bytes())
                .payload(payloads[i].as_slice())
                .headers(headers)
        })
        .await
    }

    /// The topic alerts go to.
    pub fn topic(&self) -> &str {
        &self.topic
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

/// A dead letter cut to fit: what [`DeadLetterQueue::send`] puts in the
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fitted {
    /// The reason, control characters escaped, at most [`MAX_REASON_BYTES`].
    pub reason: String,
    /// Bytes of the original key sent.
    pub key_len: usize,
    /// Bytes of the original payload sent.
    pub payload_len: usize,
}

impl Fitted {
    /// Whether key or payload was cut.
    pub fn truncated(&self, d: &DeadLetter) -> bool {
        self.payload_len < d.payload.len() || self.key_len < d.key.as_ref().map_or(0, Vec::len)
    }
}

/// `text` with control characters escaped (`\n`, `\u{1b}`), cut on a char
/// boundary to at most `max` bytes (ending in `…` when cut).
pub fn escape_bounded(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max + 16));
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > max {
            // Enough seen: the rest is cut anyway.
            break;
        }
    }
    if out.len() <= max {
        return out;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    out.truncate(end);
    out.push('…');
    out
}

/// Cuts a dead letter to fit a message of at most `max_message_bytes`:
/// the reason to [`MAX_REASON_BYTES`] (escaped), then key and payload to the
/// room left by the headers (the key to at most a quarter of it when both
/// do not fit).
pub fn fit_dead_letter(d: &DeadLetter, max_message_bytes: usize) -> Fitted {
    let reason = escape_bounded(&d.reason, MAX_REASON_BYTES);
    let headers = dead_letter_headers_len(d, &reason);
    let room = max_message_bytes.saturating_sub(headers + RECORD_OVERHEAD);
    let key = d.key.as_ref().map_or(0, Vec::len);
    let payload = d.payload.len();
    let (key_len, payload_len) = if key + payload <= room {
        (key, payload)
    } else {
        let key_len = key.min(room / 4);
        (key_len, payload.min(room - key_len))
    };
    Fitted {
        reason,
        key_len,
        payload_len,
    }
}

/// Bytes of the headers of a dead letter (names and values, the
/// truncation headers included).
fn dead_letter_headers_len(d: &DeadLetter, reason: &str) -> usize {
    let names = [
        "modelwatch.error",
        "modelwatch.error.kind",
        "modelwatch.source.topic",
        "modelwatch.source.partition",
        "modelwatch.source.offset",
        "modelwatch.truncated",
        "modelwatch.original.size",
        "modelwatch.original.key.size",
    ];
    names.iter().map(|n| n.len() + 8).sum::<usize>()
        + reason.len()
        + d.kind.len()
        + d.topic.len()
        + 3 * 20
}

/// Sends rejected messages to the dead-letter topic.
#[derive(Clone)]
pub struct DeadLetterQueue {
    producer: FutureProducer,
    topic: String,
    max_message_bytes: usize,
}

impl DeadLetterQueue {
    /// A queue on `topic` using `producer`, whose messages may hold at most
    /// `max_message_bytes` (see [`message_max_bytes`]).
    pub fn new(producer: FutureProducer, topic: &str, max_message_bytes: usize) -> Self {
        DeadLetterQueue {
            producer,
            topic: topic.to_string(),
            max_message_bytes,
        }
    }

    /// The dead-letter topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends the messages, each cut to fit ([`fit_dead_letter`]), with
    /// headers `modelwatch.error` (the reason, escaped, ≤ 1 KB),
    /// `modelwatch.error.kind`, `modelwatch.source.topic`,
    /// `modelwatch.source.partition`, `modelwatch.source.offset`, and when
    /// key or payload was cut `modelwatch.truncated` = `true`,
    /// `modelwatch.original.size` and `modelwatch.original.key.size` (bytes);
    /// waits for every delivery. Returns what became of each message and
    /// how they were fitted.
    pub async fn send(&self, letters: &[DeadLetter]) -> (SendReport, Vec<Fitted>) {
        let fitted: Vec<Fitted> = letters
            .iter()
            .map(|d| fit_dead_letter(d, self.max_message_bytes))
            .collect();
        let numbers: Vec<[String; 4]> = letters
            .iter()
            .map(|d| {
                [
                    d.partition.to_string(),
                    d.offset.to_string(),
                    d.payload.len().to_string(),
                    d.key.as_ref().map_or(0, Vec::len).to_string(),
                ]
            })
            .collect();
        let report = send_each(&self.producer, letters.len(), |i| {
            let (d, f, n) = (&letters[i], &fitted[i], &numbers[i]);
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: "modelwatch.error",
                    value: Some(f.reason.as_bytes()),
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
                    value: Some(n[0].as_bytes()),
                })
                .insert(Header {
                    key: "modelwatch.source.offset",
                    value: Some(n[1].as_bytes()),
                });
            if f.truncated(d) {
                headers = headers
                    .insert(Header {
                        key: "modelwatch.truncated",
                        value: Some("true".as_bytes()),
                    })
                    .insert(Header {
                        key: "modelwatch.original.size",
                        value: Some(n[2].as_bytes()),
                    })
                    .insert(Header {
                        key: "modelwatch.original.key.size",
                        value: Some(n[3].as_bytes()),
                    });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
                .payload(&d.payload[..f.payload_len])
                .headers(headers);
            if let Some(k) = &d.key {
                record = record.key(&k[..f.key_len]);
            }
            record
        })
        .await;
        (report, fitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(reason: &str, key: usize, payload: usize) -> DeadLetter {
        DeadLetter {
            topic: "predictions".into(),
            partition: 3,
            offset: 42,
            key: (key > 0).then(|| vec![b'k'; key]),
            payload: vec![b'p'; payload],
            reason: reason.into(),
            kind: "decode",
        }
    }

    #[test]
    fn reasons_are_escaped_and_bounded() {
        assert_eq!(escape_bounded("plain", 1024), "plain");
        assert_eq!(escape_bounded("a\nb\u{1b}[31m", 1024), "a\\nb\\u{1b}[31m");
        let long = "é".repeat(2000);
        let cut = escape_bounded(&long, MAX_REASON_BYTES);
        assert!(cut.len() <= MAX_REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…') && cut.starts_with("ééé"));
        let controls = "\u{7}".repeat(5000);
        let cut = escape_bounded(&controls, MAX_REASON_BYTES);
        assert!(cut.len() <= MAX_REASON_BYTES);
        assert!(!cut.chars().any(|c| c.is_control()));
    }

    #[test]
    fn dead_letters_are_cut_to_fit_the_message_size() {
        // Small enough: unchanged.
        let d = letter("bad", 10, 100);
        let f = fit_dead_letter(&d, 1_000_000);
        assert_eq!((f.key_len, f.payload_len), (10, 100));
        assert!(!f.truncated(&d));
        // A 3 MB payload, a 2 KB reason with the payload quoted in it.
        let d = letter(&"x".repeat(2048), 100, 3_000_000);
        let f = fit_dead_letter(&d, 1_000_000);
        assert!(f.truncated(&d));
        assert_eq!(f.key_len, 100);
        assert!(f.reason.len() <= MAX_REASON_BYTES);
        let total = f.key_len + f.payload_len + dead_letter_headers_len(&d, &f.reason);
        assert!(total + RECORD_OVERHEAD <= 1_000_000, "{total}");
        assert!(f.payload_len > 990_000, "{}", f.payload_len);
        // A huge key too: it gets at most a quarter of the room.
        let d = letter("r", 50_000, 50_000);
        let f = fit_dead_letter(&d, 10_000);
        let room = 10_000 - dead_letter_headers_len(&d, &f.reason) - RECORD_OVERHEAD;
        assert_eq!(f.key_len, room / 4);
        assert_eq!(f.key_len + f.payload_len, room);
    }

    #[test]
    fn produce_errors_are_classified() {
        use RDKafkaErrorCode as C;
        let permanent = [
            C::MessageSizeTooLarge,
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
            C::UnknownPartition,
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::InvalidRecord,
            C::MessageBatchTooLarge,
            C::PolicyViolation,
        ];
        for c in permanent {
            assert!(is_permanent(&KafkaError::MessageProduction(c)), "{c:?}");
        }
        let transient = [
            C::MessageTimedOut,
            C::QueueFull,
            C::AllBrokersDown,
            C::NotLeaderForPartition,
            C::RequestTimedOut,
            C::NotEnoughReplicas,
            C::BrokerTransportFailure,
            C::InvalidMessage,
        ];
        for c in transient {
            assert!(!is_permanent(&KafkaError::MessageProduction(c)), "{c:?}");
        }
        assert!(!is_permanent(&KafkaError::Canceled));
    }

    #[test]
    fn message_max_bytes_follows_the_properties() {
        let mut cfg = KafkaConfig::default();
        assert_eq!(message_max_bytes(&cfg), 1_000_000);
        cfg.properties
            .insert("message.max.bytes".into(), "20000".into());
        assert_eq!(message_max_bytes(&cfg), 20_000);
    }
}
