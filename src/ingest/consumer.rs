//! The Kafka side of ingestion: client settings, the consumer of both input
//! topics, and offset commits. No decoding here (see [`super::decode`]).
//!
//! One consumer in group `kafka.group_id` reads both topics. Auto-commit is
//! off: [`crate::app`] commits only offsets whose output is durable. The
//! `range` assignor keeps partition p of both (co-partitioned) topics on the
//! same instance, so a prediction and its label meet in one process.

use anyhow::{Context, Result};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol,
    StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// The consumer's static group membership property: set by
/// [`input_consumer`] alone (an empty value in `[kafka.properties]` turns
/// static membership off).
pub const GROUP_INSTANCE_ID: &str = "group.instance.id";

/// Base client settings: brokers plus every pass-through property (but
/// [`GROUP_INSTANCE_ID`], which only the input consumer takes).
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in cfg
        .properties
        .iter()
        .filter(|(k, _)| *k != GROUP_INSTANCE_ID)
    {
        c.set(k, v);
    }
    c
}

/// Lets librdkafka check every `[kafka.properties]` key and value (an
/// unknown property, an invalid value, a feature this build lacks) without
/// connecting anywhere: `check-config` runs it. The error may quote a value:
/// the caller redacts secrets (see [`crate::config::redact`]).
pub fn check_client_config(cfg: &KafkaConfig) -> Result<()> {
    client_config(cfg)
        .create_native_config()
        .map(drop)
        .context("invalid configuration: librdkafka rejects [kafka.properties]")
}

/// Records what librdkafka reports while [`check_connection`] waits.
#[derive(Default)]
struct ProbeContext {
    fatal: std::sync::Mutex<Option<String>>,
}

impl ProbeContext {
    fn record(&self, why: Option<String>) {
        if let (Some(why), Ok(mut f)) = (why, self.fatal.lock()) {
            f.get_or_insert(why);
        }
    }
}

impl ClientContext for ProbeContext {
    // librdkafka reports a failed handshake or authentication in a log line
    // (facility FAIL) and, for some errors, an error event.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        if fac == "FAIL" {
            let generic = rdkafka::error::KafkaError::ClientCreation(String::new());
            self.record(
                permanent_connection_error(&generic, log_message).map(|_| log_message.to_owned()),
            );
        }
        rdkafka::client::DefaultClientContext.log(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.record(permanent_connection_error(&error, reason));
        rdkafka::client::DefaultClientContext.error(error, reason);
    }
}

impl ConsumerContext for ProbeContext {}

/// The description of an error that retrying can never fix: a failed TLS
/// handshake (untrusted or mismatching certificate, protocol) or a refused
/// SASL authentication. None for anything else (a broker down, a timeout).
fn permanent_connection_error(error: &rdkafka::error::KafkaError, reason: &str) -> Option<String> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let code = error.rdkafka_error_code();
    let lower = reason.to_ascii_lowercase();
    let fatal = matches!(
        code,
        Some(Code::SSL | Code::Authentication | Code::SaslAuthenticationFailed)
    ) || lower.contains("ssl handshake failed")
        || lower.contains("certificate verify failed")
        || lower.contains("sasl authentication")
        || lower.contains("authentication failed");
    fatal.then(|| format!("{error}: {reason}"))
}

/// At startup: connects with the configured settings and asks for the
/// predictions topic's metadata, up to `timeout`. A failed TLS handshake or
/// a refused SASL authentication (which no retry can fix) is an error
/// naming the brokers; a broker that does not answer in time is only
/// logged (the service keeps retrying as before). The error may quote a
/// librdkafka message: the caller redacts secrets.
pub fn check_connection(cfg: &KafkaConfig, timeout: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let consumer: BaseConsumer<ProbeContext> = client_config(cfg)
        .set("group.id", &cfg.group_id)
        .create_with_context(ProbeContext::default())
        .context("cannot create the Kafka client")?;
    let fatal =
        |c: &BaseConsumer<ProbeContext>| c.context().fatal.lock().ok().and_then(|f| f.clone());
    loop {
        let step = std::time::Duration::from_millis(500);
        let result = consumer.fetch_metadata(Some(&cfg.predictions_topic), step);
        // Serves the error events (no subscription: no message comes).
        let _ = consumer.poll(std::time::Duration::ZERO);
        if let Some(why) = fatal(&consumer) {
            let oauth = cfg.properties.iter().any(|(k, v)| {
                k.starts_with("sasl.mechanism") && v.eq_ignore_ascii_case("OAUTHBEARER")
            });
            let settings = if oauth {
                "sasl.oauthbearer.token.endpoint.url, sasl.oauthbearer.client.id, sasl.oauthbearer.client.secret, sasl.oauthbearer.scope and the broker's OAUTHBEARER setup"
            } else {
                "sasl.mechanism, sasl.username, sasl.password"
            };
            anyhow::bail!(
                "cannot connect to kafka.brokers = {:?}: {why} (check the TLS and SASL settings in [kafka.properties]: ssl.ca.location, {settings})",
                cfg.brokers
            );
        }
        match result {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                tracing::warn!(brokers = %cfg.brokers, error = %e, "Kafka not reachable at startup; retrying in the background");
                return Ok(());
            }
            Err(_) => {}
        }
    }
}

/// The `group.instance.id` of the input consumer: the configured one, none
/// when it is configured empty (dynamic membership), else `default` (the
/// state's own, see [`crate::state::StateStore::instance_id`]).
pub fn group_instance_id(cfg: &KafkaConfig, default: String) -> Option<String> {
    match cfg.properties.get(GROUP_INSTANCE_ID) {
        Some(id) if id.is_empty() => None,
        Some(id) => Some(id.clone()),
        None => Some(default),
    }
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
///
/// While the service runs ([`IngestContext::hold_revocations`]), revoked
/// partitions are not given up in the callback: the service writes what is
/// due, checkpoints, commits the checkpointed positions and only then
/// releases them ([`release_revoked`]), so the next owner starts exactly
/// where this instance's state ends. librdkafka lets the application
/// finish a revocation later; the group waits for it (at most
/// `max.poll.interval.ms`). A lost assignment (session timeout) is given
/// up at once: it already belongs to someone else.
#[derive(Default)]
pub struct IngestContext {
    changes: std::sync::Mutex<Vec<Assignment>>,
    pending: std::sync::atomic::AtomicBool,
    hold: std::sync::atomic::AtomicBool,
    /// A revocation held until the next checkpoint.
    held: std::sync::Mutex<Option<TopicPartitionList>>,
}

impl IngestContext {
    fn push(&self, change: Assignment) {
        if let Ok(mut c) = self.changes.lock() {
            c.push(change);
            self.pending
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether revocations wait for [`release_revoked`] (while the service
    /// loop runs) or are carried out in the callback.
    pub fn hold_revocations(&self, hold: bool) {
        self.hold.store(hold, std::sync::atomic::Ordering::Release);
    }

    /// Whether a revocation waits for [`release_revoked`].
    pub fn holds_revocation(&self) -> bool {
        self.held.lock().map(|h| h.is_some()).unwrap_or(false)
    }

    /// The assignment changes since the last call, oldest first (cheap when
    /// there are none: one atomic load).
    pub fn take_changes(&self) -> Vec<Assignment> {
        // Called for every message: a plain load while nothing changed.
        if !self.pending.load(std::sync::atomic::Ordering::Acquire)
            || !self
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
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let revoke = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS;
        if revoke && self.hold.load(std::sync::atomic::Ordering::Acquire) && !base.assignment_lost()
        {
            tracing::info!(partitions = %describe(tpl), "partitions revoked: given up after the next checkpoint");
            if let Ok(mut h) = self.held.lock() {
                *h = Some(tpl.clone());
            }
            self.push(Assignment::Revoked(list(tpl)));
            return;
        }
        // What rdkafka's default does, through the safe API.
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            e => Rebalance::Error(rdkafka::error::KafkaError::Rebalance(e.into())),
        };
        self.pre_rebalance(base, &rebalance);
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let done = match (err, cooperative) {
            (RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, true) => {
                base.incremental_assign(tpl)
            }
            (RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, false) => base.assign(tpl),
            (_, true) => base.incremental_unassign(tpl),
            (_, false) => base.unassign(),
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "rebalance: cannot apply the assignment change");
        }
        self.post_rebalance(base, &rebalance);
    }

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

/// Creates the consumer of both input topics and subscribes it, as the
/// static group member `instance_id` (`group.instance.id`, unless the
/// configuration's Kafka properties set one): a member that restarts under
/// the same id gets its partitions back at once, where a dynamic member
/// waits until the broker expires the dead one (`session.timeout.ms`, 45 s
/// by default).
pub fn input_consumer(cfg: &KafkaConfig, instance_id: Option<&str>) -> Result<InputConsumer> {
    let mut c = client_config(cfg);
    c.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range")
        .set("enable.partition.eof", "false");
    // Pass-through properties win over our defaults.
    for (k, v) in cfg
        .properties
        .iter()
        .filter(|(k, _)| *k != GROUP_INSTANCE_ID)
    {
        c.set(k, v);
    }
    if let Some(id) = instance_id {
        c.set(GROUP_INSTANCE_ID, id);
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

/// Gives up the partitions of a held revocation (see [`IngestContext`]),
/// once their state is checkpointed and their positions committed; says
/// whether there was one.
pub fn release_revoked(consumer: &InputConsumer) -> Result<bool> {
    let held = consumer
        .context()
        .held
        .lock()
        .ok()
        .and_then(|mut h| h.take());
    let Some(tpl) = held else {
        return Ok(false);
    };
    let done = if matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    ) {
        consumer.incremental_unassign(&tpl)
    } else {
        consumer.unassign()
    };
    done.context("cannot give up revoked partitions")?;
    tracing::info!(partitions = %describe(&tpl), "revoked partitions given up after their checkpoint");
    Ok(true)
}

/// Commits the given positions (the next offset to read); synchronously
/// with `sync` (before revoked partitions are given up), else in the
/// background.
pub fn commit(
    consumer: &InputConsumer,
    positions: &[(String, i32, i64)],
    sync: bool,
) -> Result<()> {
    if positions.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in positions {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .context("invalid offset")?;
    }
    let mode = if sync {
        CommitMode::Sync
    } else {
        CommitMode::Async
    };
    consumer.commit(&tpl, mode).context("offset commit failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(props: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..KafkaConfig::default()
        }
    }

    #[test]
    fn librdkafka_checks_every_property_and_this_build_has_tls_sasl_and_zstd() {
        for ok in [
            kafka(&[]),
            kafka(&[
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.username", "u"),
                ("sasl.password", "p"),
            ]),
            kafka(&[("security.protocol", "SSL"), ("compression.type", "zstd")]),
            kafka(&[("compression.type", "lz4")]),
            kafka(&[("compression.type", "snappy")]),
            kafka(&[
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "OAUTHBEARER"),
                ("sasl.oauthbearer.method", "oidc"),
                (
                    "sasl.oauthbearer.token.endpoint.url",
                    "https://idp.example.org/token",
                ),
                ("sasl.oauthbearer.client.id", "c"),
                ("sasl.oauthbearer.client.secret", "s"),
                ("sasl.oauthbearer.scope", "kafka"),
            ]),
        ] {
            check_client_config(&ok).unwrap_or_else(|e| panic!("{:?}: {e:#}", ok.properties));
        }
        let err = check_client_config(&kafka(&[("no.such.prop", "1")])).unwrap_err();
        assert!(format!("{err:#}").contains("no.such.prop"), "{err:#}");
        let err = check_client_config(&kafka(&[("compression.type", "brotli")])).unwrap_err();
        assert!(format!("{err:#}").contains("compression.type"), "{err:#}");
    }

    #[test]
    fn only_handshake_and_authentication_failures_are_permanent() {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaErrorCode as Code;
        assert!(permanent_connection_error(&KafkaError::Global(Code::SSL), "x").is_some());
        assert!(
            permanent_connection_error(&KafkaError::Global(Code::Authentication), "x").is_some()
        );
        let generic = KafkaError::ClientCreation(String::new());
        assert!(permanent_connection_error(
            &generic,
            "SSL handshake failed: ... certificate verify failed"
        )
        .is_some());
        assert!(permanent_connection_error(
            &generic,
            "SASL authentication error: SASL SCRAM authentication failed"
        )
        .is_some());
        assert!(permanent_connection_error(
            &KafkaError::Global(Code::AllBrokersDown),
            "1/1 brokers are down"
        )
        .is_none());
        assert!(permanent_connection_error(
            &generic,
            "Connect to ipv4#127.0.0.1:1 failed: Connection refused"
        )
        .is_none());
    }
}
