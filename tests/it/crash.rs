//! Crash safety (issue #4): the real `modelwatch` binary against a separate
//! `tansu` broker process and a real ClickHouse server, killed with SIGKILL at
//! random points and restarted on the same state directory, must end with
//! exactly the `window_metrics FINAL` rows and the alerts of an uninterrupted
//! run over the same input.
//!
//! - [`killed_and_restarted_run_equals_an_uninterrupted_run`]: about 210 000
//!   messages (two versions of a binary classifier and a regression model
//!   scoring the same requests, 25 features, two segment keys, 5-minute
//!   windows over two hours of event time, labels 0-10 minutes after their
//!   prediction, ~10 % never labeled, early labels, duplicates, orphan labels,
//!   malformed messages, a feature drift halfway). A reference run
//!   (`run --exit-when-idle`), then a crash run (own database, state
//!   directory and consumer group): `run` killed at least five times, at
//!   random times or right when the log shows `checkpoint begin` /
//!   `clickhouse write begin`, restarted each time, finally run with
//!   `--exit-when-idle`. Both outputs are compared value for value.
//! - [`restart_keeps_pending_predictions`]: predictions consumed, SIGTERM
//!   (exit code 0), labels produced, run again: the labels join the
//!   predictions of the first run (same accuracy / label count rows as a run
//!   that saw everything at once, no orphans).
//!
//! Environment knobs (for reproducing and for checking the harness itself):
//! `MODELWATCH_CRASH_SEED` fixes the kill schedule (the seed is printed),
//! `MODELWATCH_CRASH_KILLS` sets the number of kills (default 6; `0` makes
//! the "crash" run a second uninterrupted run, which shows that the
//! comparison is deterministic).
//!
//! The comparison covers every row, label drift and the change detectors
//! included: they are computed in an order independent of how the consumer
//! interleaves partitions (issue #17, `metrics::aggregator`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use modelwatch::app::{build_reference_from_file, now_ms};
use modelwatch::config::{self, Config};
use modelwatch::generate::{DriftScenario, Generator, Scenario};
use modelwatch::ingest::decode::{encode_avro, encode_confluent, encode_json};
use modelwatch::model::{GroundTruthEvent, InputEvent, PredictionEvent};
use modelwatch::pipeline::drift_config;
use modelwatch::sinks::clickhouse::{ClickHouseSink, MetricRow};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::pipeline::read_topic;
use crate::support::clickhouse::{unique_database, ClickHouseServer};
use crate::support::tansu::TansuBroker;
use crate::support::{kill_child, spawn_watchdog};

/// Input partitions of both topics.
const PARTITIONS: i32 = 4;
/// The binary classifier (two versions on the same requests).
const MODEL: &str = "fraud-detector";
/// The regression model on the same requests (version `v1`).
const REG_MODEL: &str = "fraud-amount";
/// Versions of [`MODEL`].
const VERSIONS: [&str; 2] = ["v1", "v2"];
/// Window size.
const WINDOW_MS: i64 = 300_000;
/// Event time covered by the crash test's predictions.
const SPAN_MS: i64 = 2 * 3_600_000;
/// Requests of the crash test: 3 predictions each + a label for 90 % of
/// them = 3.9 messages per request, about 210 000 messages.
const REQUESTS: u64 = 54_000;
/// Longest a `modelwatch` child may run before it is killed.
pub(crate) const CHILD_TIMEOUT: Duration = Duration::from_secs(300);
/// Kills of the crash run unless `MODELWATCH_CRASH_KILLS` says otherwise.
const DEFAULT_KILLS: usize = 6;
/// Allowed lateness of the crash test: shorter than the event-time span,
/// so windows close (and are written, and killed while written) in the
/// middle of the replay. Against tansu the consumer does not interleave
/// partitions evenly in a replay of a backlog (one predictions partition
/// was read more than an hour of event time after the others); the
/// watermark follows each predictions partition on its own
/// ([`modelwatch::join::window`]), so no event is late in either run,
/// which the test asserts. (With one watermark over all partitions, 3 of 4
/// partitions were late for most windows at this lateness.)
const LATENESS: &str = "20m";
/// Idle timeout of every run: a finished replay exits this long after its
/// last message.
const IDLE_TIMEOUT_S: u64 = 5;

/// One test at a time: each drives several processes on a 2-core machine,
/// and their timing matters (kills, idle timeouts).
static SERIAL: Mutex<()> = Mutex::new(());

pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- dataset

/// Which input topic a raw message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Topic {
    Predictions,
    GroundTruth,
}

impl Topic {
    fn name(self) -> &'static str {
        match self {
            Topic::Predictions => "predictions",
            Topic::GroundTruth => "ground-truth",
        }
    }
}

/// One message to produce: (topic, key, payload).
pub(crate) type Message = (Topic, String, Vec<u8>);

/// (model, version, window start s) → count.
type Counts = BTreeMap<(String, String, u32), u64>;

/// The crash test's input and what the output must contain.
struct CrashData {
    /// Every message in production order (per topic: event-time order,
    /// duplicates right after their original, malformed ones in between).
    messages: Vec<Message>,
    /// Keys of the malformed messages (dead letters).
    malformed: Vec<String>,
    /// Reference events of every (model, version).
    reference: Vec<PredictionEvent>,
    /// Predictions per (model, version, window), duplicates excluded.
    predictions: Counts,
    /// Labeled predictions per (model, version, window).
    labels: Counts,
    /// Duplicate predictions.
    duplicates: u64,
    /// Labels without a prediction.
    orphans: u64,
    /// Labels whose event time is before their prediction's.
    early_labels: u64,
    /// Event time of the first request.
    t0: i64,
}

/// A window-aligned time `ago_ms` before now.
fn aligned_ago(ago_ms: i64) -> i64 {
    let t = now_ms() - ago_ms;
    t - t.rem_euclid(WINDOW_MS)
}

fn window_of(ts: i64) -> u32 {
    (ts.div_euclid(WINDOW_MS) * WINDOW_MS / 1000) as u32
}

/// Every third message JSON, every third raw Avro, every third Confluent Avro.
fn encode(n: usize, ev: &InputEvent) -> Vec<u8> {
    match n % 3 {
        0 => encode_json(ev),
        1 => encode_avro(ev),
        _ => encode_confluent(ev, 7),
    }
}

/// A label as JSON with an ignored `padding` field making it `size` bytes.
fn padded(l: &GroundTruthEvent, size: usize) -> Vec<u8> {
    let mut v = serde_json::to_value(l).expect("label to JSON");
    let len = serde_json::to_vec(&v).expect("label JSON").len();
    let pad = size.saturating_sub(len + 14);
    v["padding"] = serde_json::Value::String("x".repeat(pad));
    serde_json::to_vec(&v).expect("label JSON")
}

/// The scenario of the crash test's traffic (`seed` 11) or of the
/// reference profiles (another seed, no drift).
fn scenario(t0: i64, count: u64, seed: u64, drift: DriftScenario) -> Scenario {
    Scenario {
        seed,
        start_ms: t0,
        events_per_second: count as f64 * 1000.0 / SPAN_MS as f64,
        count,
        versions: VERSIONS.iter().map(|v| v.to_string()).collect(),
        model_id: MODEL.into(),
        numeric_features: 20,
        categorical_features: 5,
        drift,
        drift_at: 0.5,
        drifted_features: 5,
        shift_sd: 1.0,
        drift_categorical: true,
        accuracy_drop: true,
        label_fraction: 0.9,
        label_delay_ms: (0, 600_000),
        regression_model: Some(REG_MODEL.into()),
        ..Scenario::default()
    }
}

pub(crate) fn generate(s: Scenario) -> (Vec<PredictionEvent>, Vec<GroundTruthEvent>) {
    let mut g = Generator::new(s);
    let (mut predictions, mut labels) = (Vec::new(), Vec::new());
    while let Some(ev) = g.next_event() {
        match ev {
            InputEvent::Prediction(p) => predictions.push(p),
            InputEvent::GroundTruth(l) => labels.push(l),
        }
    }
    (predictions, labels)
}

/// The request number of a generated request id (`req-<seed>-<n>`).
fn request_number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

fn crash_dataset(t0: i64) -> CrashData {
    let (predictions, mut labels) = generate(scenario(t0, REQUESTS, 11, DriftScenario::Sudden));
    let prediction_ts: HashMap<String, i64> = predictions
        .iter()
        .map(|p| (p.request_id.clone(), p.timestamp))
        .collect();

    // Early labels: 1 in 37 labels carries an event time 1-20 s before its
    // prediction, so it sits ahead of it in event-time order.
    let mut early_labels = 0;
    for l in &mut labels {
        let n = request_number(&l.request_id);
        if n % 37 == 5 {
            l.timestamp = prediction_ts[&l.request_id] - 1000 - (n % 20) as i64 * 1000;
            early_labels += 1;
        }
    }
    // A second label for a few requests (ignored: the first one counts),
    // right after the first in the same partition.
    let mut with_duplicates = Vec::with_capacity(labels.len() + 32);
    for l in labels {
        let n = request_number(&l.request_id);
        let dup = (n % 3000 == 11).then(|| {
            let mut d = l.clone();
            d.actual_label = d
                .actual_label
                .as_deref()
                .map(|v| if v == "1" { "0" } else { "1" }.to_string());
            d.actual_value = d.actual_value.map(|v| v + 1000.0);
            d
        });
        with_duplicates.push(l);
        with_duplicates.extend(dup);
    }
    let mut labels = with_duplicates;
    // Labels of requests nobody scored: orphans once their TTL passed.
    let orphans = 5u64;
    for k in 0..orphans as i64 {
        labels.push(GroundTruthEvent {
            request_id: format!("orphan-{k}"),
            timestamp: t0 + 600_000 + k * (SPAN_MS / 5) + 1234,
            actual_label: Some("1".into()),
            actual_value: Some(1.0),
        });
    }
    labels.sort_by_key(|l| l.timestamp); // stable: duplicates stay behind their first

    // Expected counts, from the events alone.
    let mut expected_predictions = Counts::new();
    let mut labeled: BTreeSet<&str> = BTreeSet::new();
    for l in &labels {
        labeled.insert(&l.request_id);
    }
    let mut expected_labels = Counts::new();
    for p in &predictions {
        let k = (
            p.model_id.clone(),
            p.model_version.clone(),
            window_of(p.timestamp),
        );
        *expected_predictions.entry(k.clone()).or_default() += 1;
        if labeled.contains(p.request_id.as_str()) {
            *expected_labels.entry(k).or_default() += 1;
        }
    }

    // Messages: predictions (a duplicate of 1 in 2500 `v1` predictions right
    // after it, with another score), then labels; malformed ones in between.
    let bad_predictions: [(usize, &[u8]); 3] = [
        (1_000, b"{\"request_id\": \"bad-p1\", "),
        (
            60_000,
            br#"{"request_id":"bad-p2","model_id":"fraud-detector","model_version":"v1","timestamp":-5,"score":0.5}"#,
        ),
        (120_000, &[0x00, 0, 0, 0, 7, 0xFF, 0xFF, 0xFF]),
    ];
    let bad_labels: [(usize, &[u8]); 3] = [
        (500, br#"{"request_id":"bad-l1","timestamp":1700000000000}"#),
        (20_000, b"not json at all"),
        (
            40_000,
            br#"{"request_id":"bad-l3","timestamp":"yesterday","actual_label":"1"}"#,
        ),
    ];
    let mut malformed = Vec::new();
    let mut messages = Vec::with_capacity(predictions.len() + labels.len() + 64);
    let mut n = 0usize;
    let mut duplicates = 0u64;
    for (i, p) in predictions.iter().enumerate() {
        if let Some((_, payload)) = bad_predictions.iter().find(|(at, _)| *at == i) {
            let key = format!("bad-p{}", malformed.len() + 1);
            messages.push((Topic::Predictions, key.clone(), payload.to_vec()));
            malformed.push(key);
        }
        n += 1;
        let ev = InputEvent::Prediction(p.clone());
        messages.push((Topic::Predictions, p.request_id.clone(), encode(n, &ev)));
        if p.model_version == "v1" && p.model_id == MODEL && i % 2500 == 7 {
            let mut d = p.clone();
            d.score = Some(1.0 - d.score.unwrap_or(0.5));
            n += 1;
            let ev = InputEvent::Prediction(d);
            messages.push((Topic::Predictions, p.request_id.clone(), encode(n, &ev)));
            duplicates += 1;
        }
    }
    // Labels are JSON padded with an unknown (ignored) field to the bytes
    // the predictions topic spends on the same stretch of event time. The
    // watermark is shared by both topics and the consumer reads them in
    // fetches of equal bytes per partition: unpadded, a label (~60 bytes)
    // covers ~30 times the event time of a prediction's bytes, the
    // ground-truth topic races ahead in a replay of a backlog and the
    // watermark closes windows whose predictions were not read yet (an
    // uninterrupted run then lost half of its windows' predictions).
    let prediction_bytes: usize = messages.iter().map(|m| m.2.len()).sum();
    let label_size = prediction_bytes / labels.len().max(1);
    for (i, l) in labels.iter().enumerate() {
        if let Some((_, payload)) = bad_labels.iter().find(|(at, _)| *at == i) {
            let key = format!("bad-l{}", malformed.len() + 1);
            messages.push((Topic::GroundTruth, key.clone(), payload.to_vec()));
            malformed.push(key);
        }
        messages.push((
            Topic::GroundTruth,
            l.request_id.clone(),
            padded(l, label_size),
        ));
    }

    let (mut reference, _) = generate(scenario(
        t0 - 86_400_000,
        3_000,
        1_000_003,
        DriftScenario::None,
    ));
    for p in &mut reference {
        p.request_id = format!("ref-{}", p.request_id);
    }
    CrashData {
        messages,
        malformed,
        reference,
        predictions: expected_predictions,
        labels: expected_labels,
        duplicates,
        orphans,
        early_labels,
        t0,
    }
}

// ---------------------------------------------------------------- Kafka

/// Produces `messages` in order, keyed, murmur2-partitioned, without waiting
/// for each delivery (per-partition order is kept: one connection, no retries).
pub(crate) async fn produce_messages(brokers: &str, messages: &[Message]) {
    produce_to(brokers, messages, |_| None).await
}

/// [`produce_messages`], each message to the partition `partition_of` says
/// (`None`: by its key).
pub(crate) async fn produce_to(
    brokers: &str,
    messages: &[Message],
    partition_of: impl Fn(&Message) -> Option<i32>,
) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .set("queue.buffering.max.messages", "200000")
        .set("max.in.flight.requests.per.connection", "1")
        // Small batches: a fetch returns whole batches, so they bound how far
        // one partition runs ahead of the others in a fetch.
        .set("batch.size", "262144")
        .create()
        .expect("producer");
    let mut deliveries = Vec::with_capacity(messages.len());
    for m in messages {
        let (topic, key, payload) = m;
        let mut record = FutureRecord::to(topic.name()).key(key).payload(payload);
        if let Some(p) = partition_of(m) {
            record = record.partition(p);
        }
        loop {
            match p.send_result(record) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((e, r)) => {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "produce to {}: {e}",
                        topic.name()
                    );
                    record = r;
                    p.poll(Duration::from_millis(5));
                }
            }
        }
    }
    p.flush(Duration::from_secs(60)).expect("flush");
    for d in deliveries {
        d.await
            .expect("delivery future")
            .unwrap_or_else(|(e, _)| panic!("delivery failed: {e}"));
    }
}

/// End offsets of `topic`'s partitions.
pub(crate) fn end_offsets(brokers: &str, topic: &str) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    (0..PARTITIONS)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(5))
                .expect("watermarks")
                .1
        })
        .collect()
}

/// The offsets `group` committed on `topic` (0 where none).
pub(crate) fn committed(brokers: &str, group: &str, topic: &str) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let Ok(got) = c.committed_offsets(tpl, Duration::from_secs(5)) else {
        return vec![0; PARTITIONS as usize];
    };
    (0..PARTITIONS)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        })
        .collect()
}

// ---------------------------------------------------------------- the binary

/// Settings of one service instance (its own database, group, state dir).
pub(crate) struct Instance {
    name: &'static str,
    pub(crate) config_file: PathBuf,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) database: String,
    pub(crate) group: String,
    /// Each run joins a consumer group of its own (`<group>-<attempt>`).
    /// Seen against tansu 0.6: a process that restarts after a SIGKILL in
    /// the killed member's group is assigned no partition for minutes (the
    /// dead member is not expired), so the crash runs use a new group each
    /// time; it starts at the beginning of the topics, and the service skips
    /// everything below its checkpointed positions.
    group_per_run: bool,
    logs: PathBuf,
}

/// The configuration file of every run: what the environment cannot say.
const CONFIG_TOML: &str = r#"
# Default Kafka settings: a restart rejoins its group at once as the same
# static member (group.instance.id kept in state.dir). Tests append their
# own properties to this table.
[kafka.properties]
"#;

impl Instance {
    pub(crate) fn new(name: &'static str, brokers: &str, dir: &Path, lateness: &str) -> Instance {
        Self::with_config(name, brokers, dir, lateness, CONFIG_TOML)
    }

    /// An instance whose configuration file holds `toml` (the environment
    /// sets the rest, as in [`Instance::new`]).
    pub(crate) fn with_config(
        name: &'static str,
        brokers: &str,
        dir: &Path,
        lateness: &str,
        toml: &str,
    ) -> Instance {
        let database = unique_database(&format!("mw_crash_{name}"));
        let group = format!("{database}-group");
        let root = dir.join(name);
        std::fs::create_dir_all(&root).expect("instance dir");
        let config_file = root.join("modelwatch.toml");
        std::fs::write(&config_file, toml).expect("write config");
        let state = root.join("state");
        let env: Vec<(String, String)> = [
            ("MODELWATCH_KAFKA__BROKERS", brokers.to_string()),
            ("MODELWATCH_KAFKA__GROUP_ID", group.clone()),
            (
                "MODELWATCH_CLICKHOUSE__URL",
                ClickHouseServer::shared().url().to_string(),
            ),
            ("MODELWATCH_CLICKHOUSE__DATABASE", database.clone()),
            ("MODELWATCH_WINDOWS__SIZES", "5m".into()),
            ("MODELWATCH_WINDOWS__ALLOWED_LATENESS", lateness.into()),
            (
                "MODELWATCH_WINDOWS__IDLE_TIMEOUT",
                format!("{IDLE_TIMEOUT_S}s"),
            ),
            ("MODELWATCH_WINDOWS__LABEL_HORIZON", "24h".into()),
            ("MODELWATCH_WINDOWS__EARLY_LABEL_TTL", "1h".into()),
            ("MODELWATCH_SERVICE__FLUSH_INTERVAL", "200ms".into()),
            ("MODELWATCH_STATE__DIR", state.display().to_string()),
            ("MODELWATCH_STATE__CHECKPOINT_INTERVAL", "1s".into()),
            ("MODELWATCH_API__ENABLED", "false".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Instance {
            name,
            config_file,
            env,
            database,
            group,
            group_per_run: false,
            logs: root,
        }
    }

    /// Sets (or replaces) one environment variable of every run.
    pub(crate) fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// The configuration the binary loads (same file, same environment).
    pub(crate) fn config(&self) -> Config {
        let env: HashMap<String, String> = self.env.iter().cloned().collect();
        config::load(Some(&self.config_file), &env).expect("the test configuration is valid")
    }

    pub(crate) fn sink(&self) -> ClickHouseSink {
        ClickHouseSink::new(&self.config().clickhouse)
    }

    /// Stores the reference profile of every (model, version) of `events`
    /// in this instance's database, as `modelwatch reference import` does.
    pub(crate) async fn import_references(&self, events: &[PredictionEvent]) {
        let cfg = self.config();
        let sink = self.sink();
        sink.migrate().await.expect("migrate");
        let file = crate::pipeline::reference_file(events);
        let versions: BTreeSet<(String, String)> = events
            .iter()
            .map(|e| (e.model_id.clone(), e.model_version.clone()))
            .collect();
        for (model, version) in versions {
            let profile =
                build_reference_from_file(file.path(), &model, &version, &drift_config(&cfg))
                    .expect("reference profile");
            let json = serde_json::to_string(&profile).expect("profile json");
            sink.save_reference(&model, &version, profile.sample_count, &json)
                .await
                .expect("save reference");
        }
    }

    /// Starts `modelwatch run` (with `--exit-when-idle` when `idle_exit`).
    pub(crate) fn spawn(&self, idle_exit: bool, attempt: usize) -> Running {
        let mut args = vec![
            "--config".to_string(),
            self.config_file.display().to_string(),
            "run".to_string(),
        ];
        if idle_exit {
            args.push("--exit-when-idle".into());
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelwatch"));
        // Only this test's settings apply.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MODELWATCH_")) {
            cmd.env_remove(k);
        }
        cmd.args(&args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info,modelwatch=debug")
            .env(
                "MODELWATCH_KAFKA__GROUP_ID",
                if self.group_per_run {
                    format!("{}-{attempt}", self.group)
                } else {
                    self.group.clone()
                },
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn modelwatch");
        let watchdog = spawn_watchdog(child.id(), None);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let mut readers = Vec::new();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("stdout"));
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr"));
        for stream in [out, err] {
            let (lines, tx) = (lines.clone(), tx.clone());
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let line = strip_ansi(&line);
                    lines.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            }));
        }
        Running {
            child,
            watchdog,
            lines,
            rx,
            readers,
            started: Instant::now(),
            log_file: self.logs.join(format!("run-{attempt}.log")),
            label: format!("{} run {attempt} (database {})", self.name, self.database),
        }
    }
}

/// Removes ANSI escape sequences (colored log output).
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A running `modelwatch` child with its log collected line by line.
pub(crate) struct Running {
    pub(crate) child: Child,
    watchdog: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    rx: Receiver<String>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    log_file: PathBuf,
    label: String,
}

impl Running {
    pub(crate) fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The last `n` log lines (for failure messages; the whole log is in
    /// the instance's directory).
    pub(crate) fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().unwrap();
        let from = lines.len().saturating_sub(n);
        format!(
            "[{} of {} lines; full log {}]\n{}",
            lines.len() - from,
            lines.len(),
            self.log_file.display(),
            lines[from..].join("\n")
        )
    }

    /// Reaps the child, collects the rest of its log, writes it to its file.
    pub(crate) fn finish(&mut self) -> (ExitStatus, String) {
        let status = self.child.wait().expect("wait for modelwatch");
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if let Some(w) = self.watchdog.as_mut() {
            kill_child(w);
        }
        let log = self.log();
        let _ = std::fs::write(&self.log_file, &log);
        (status, log)
    }

    /// SIGKILL (`Child::kill`), then reap.
    pub(crate) fn kill(&mut self) -> String {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        self.finish().1
    }

    /// Waits for the child to exit on its own; kills it and panics with its
    /// log after `timeout`, or when it fails.
    pub(crate) fn wait_success(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.try_wait().expect("try_wait").is_some() {
                break;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "{}: still running after {timeout:?}; log:\n{}",
                    self.label,
                    self.tail(300)
                );
            }
            // Drain the line channel so it does not grow.
            while self.rx.try_recv().is_ok() {}
            std::thread::sleep(Duration::from_millis(50));
        }
        let (status, log) = self.finish();
        assert!(
            status.success(),
            "{} failed ({status}):\n{}",
            self.label,
            self.tail(300)
        );
        log
    }

    /// Sends SIGTERM with `kill -TERM <pid>` (a child we started).
    fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {}", self.child.id());
    }

    /// SIGTERM, then waits up to `timeout` for the graceful exit (it
    /// checkpoints) and asserts exit code 0; kills and panics otherwise.
    pub(crate) fn stop(&mut self, timeout: Duration) -> String {
        self.terminate();
        let deadline = Instant::now() + timeout;
        while self.child.try_wait().expect("try_wait").is_none() {
            if Instant::now() >= deadline {
                self.kill();
                panic!("no exit within {timeout:?} of SIGTERM:\n{}", self.tail(300));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (status, log) = self.finish();
        assert_eq!(
            status.code(),
            Some(0),
            "exit after SIGTERM ({status}):\n{}",
            self.tail(300)
        );
        log
    }

    /// Waits for the next log line until `deadline`; `None` at the deadline
    /// (or when the child closed its output).
    pub(crate) fn next_line(&self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(left);
                None
            }
        }
    }

    /// Panics with the log when the child exited (it should be running).
    pub(crate) fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}):\n{}",
                self.label,
                self.tail(300)
            );
        }
    }
}

impl Drop for Running {
    /// A child still running when a test fails is killed, not left behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(w) = self.watchdog.as_mut() {
            kill_child(w);
        }
    }
}

/// How one crash-run process ends.
#[derive(Debug, Clone)]
enum Kill {
    /// Once this process has written a checkpoint and the crash run as a
    /// whole has read `at` messages of the input (what the restored
    /// checkpoint holds plus what this process consumed since), SIGKILL
    /// `then` later: during ingest.
    AfterConsumed { at: u64, then: Duration },
    /// Once this process has written a checkpoint and the crash run has
    /// read `at` messages, SIGKILL on the next `checkpoint begin` line: in
    /// the middle of a checkpoint.
    InCheckpoint { at: u64 },
    /// SIGKILL in the middle of a ClickHouse write of at least `rows`
    /// window rows: windows closed by the watermark in the middle of the
    /// replay, or all the rest once the input is idle and the watermark
    /// follows the wall clock.
    InWindowWrite { rows: u64 },
}

/// Longest a crash-run process may take to reach its kill point.
const KILL_POINT_TIMEOUT: Duration = Duration::from_secs(90);

/// Reads log lines until this process has written a checkpoint and the
/// crash run has read `at` input messages: the predictions and labels of
/// the checkpoint it restored (its `state restored` line) plus what it
/// consumed since (every flush logs that). Kill points set this way lie
/// inside the input however much each process reads past its own: a plan
/// of per-process counts ran out of input on a slow machine, and a restart
/// holding all of it never reached its kill point.
fn wait_input_read(r: &mut Running, at: u64) {
    let deadline = r.started + KILL_POINT_TIMEOUT;
    let mut restored = 0;
    let mut checkpointed = false;
    let mut read = 0;
    while let Some(line) = r.next_line(deadline) {
        if line.contains("state restored from the last checkpoint") {
            restored = field_value(&line, "predictions").unwrap_or(0)
                + field_value(&line, "labels").unwrap_or(0);
        }
        checkpointed |= line.contains("checkpoint written");
        if let Some(consumed) = field_value(&line, "consumed") {
            read = restored + consumed;
        }
        if checkpointed && read >= at {
            return;
        }
    }
    panic!(
        "no checkpoint with {at} input messages read within {KILL_POINT_TIMEOUT:?} (read {read}, checkpointed: {checkpointed}):\n{}",
        r.tail(100)
    );
}

/// Reads log lines until one containing `pattern` says this process has
/// consumed `consumed` messages (the service logs it at every flush, and in
/// every `checkpoint written` line); panics with the log when none comes
/// `within` the process's start.
pub(crate) fn wait_consumed(r: &mut Running, pattern: &str, consumed: u64, within: Duration) {
    let deadline = r.started + within;
    while let Some(line) = r.next_line(deadline) {
        if line.contains(pattern) && field_value(&line, "consumed").is_some_and(|n| n >= consumed) {
            return;
        }
    }
    panic!(
        "no {pattern:?} line with {consumed} messages consumed within {within:?}:\n{}",
        r.tail(100)
    );
}

/// Reads log lines until one contains `pattern` and satisfies `ok`, then
/// SIGKILLs the process at once; returns the line.
fn kill_on_line(r: &mut Running, pattern: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + CHILD_TIMEOUT;
    while let Some(line) = r.next_line(deadline) {
        if line.contains(pattern) && ok(&line) {
            // Kill first, report after: the point is to die mid-operation.
            let _ = r.child.kill();
            return line;
        }
    }
    let _ = r.child.kill();
    panic!(
        "no {pattern:?} line within {CHILD_TIMEOUT:?}:\n{}",
        r.tail(100)
    );
}

/// Asserts that the `stopped` line of a process's log reports no late
/// prediction or label: each was counted in its window.
pub(crate) fn assert_nothing_late(log: &str, what: &str) {
    let stopped = log
        .lines()
        .find(|l| l.contains(" stopped "))
        .unwrap_or_else(|| panic!("{what}: no `stopped` line in the log"));
    for field in ["late_predictions", "late_labels"] {
        assert_eq!(
            field_value(stopped, field),
            Some(0),
            "{what}: {field} in {stopped}"
        );
    }
}

/// Runs one crash-run process until its kill; returns what happened.
fn run_until_killed(instance: &Instance, attempt: usize, kill: &Kill) -> String {
    let mut r = instance.spawn(false, attempt);
    let what = match kill {
        Kill::AfterConsumed { at, then } => {
            // A checkpoint first: every restart must have state to restore
            // (a process killed a second after its start may have none).
            wait_input_read(&mut r, *at);
            let deadline = Instant::now() + *then;
            while Instant::now() < deadline {
                r.next_line(deadline);
            }
            r.assert_running();
            let _ = r.child.kill();
            format!("killed at {:.2} s", r.started.elapsed().as_secs_f64())
        }
        Kill::InCheckpoint { at } => {
            wait_input_read(&mut r, *at);
            let line = kill_on_line(&mut r, "checkpoint begin", |_| true);
            format!(
                "killed at {:.2} s on: {line}",
                r.started.elapsed().as_secs_f64()
            )
        }
        Kill::InWindowWrite { rows } => {
            let line = kill_on_line(&mut r, "clickhouse write begin", |l| {
                field_value(l, "rows").is_some_and(|n| n >= *rows)
            });
            format!(
                "killed at {:.2} s on: {line}",
                r.started.elapsed().as_secs_f64()
            )
        }
    };
    let log = r.kill();
    // A panic or an error before the kill is a failure of its own.
    if let Some(bad) = log
        .lines()
        .find(|l| l.contains("panicked") || l.contains(" ERROR "))
    {
        panic!(
            "{} run {attempt} logged a failure: {bad}\n{}",
            instance.name,
            r.tail(300)
        );
    }
    what
}

// ---------------------------------------------------------------- ClickHouse

/// (model, version, segment, window start s, window s, metric, feature).
pub(crate) type MetricKey = (String, String, String, u32, u32, String, String);

/// `window_metrics FINAL` without the service's own rows.
pub(crate) async fn read_metrics(sink: &ClickHouseSink) -> BTreeMap<MetricKey, MetricRow> {
    let rows: Vec<MetricRow> = sink
        .client()
        .query("SELECT ?fields FROM window_metrics FINAL WHERE model_id != '__service__'")
        .fetch_all()
        .await
        .expect("read window_metrics FINAL");
    let mut out = BTreeMap::new();
    for r in rows {
        let k = (
            r.model_id.clone(),
            r.model_version.clone(),
            r.segment.clone(),
            r.window_start,
            r.window_seconds,
            r.metric.clone(),
            r.feature.clone(),
        );
        let dup = out.insert(k.clone(), r);
        assert!(dup.is_none(), "FINAL returned {k:?} twice");
    }
    out
}

/// The compared columns of `alerts` (not `fired_at`: wall clock; not
/// `message`: prose around the same values).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, clickhouse::Row)]
pub(crate) struct AlertRow {
    alert_id: String,
    rule: String,
    status: String,
    severity: String,
    model_id: String,
    model_version: String,
    segment: String,
    feature: Option<String>,
    window_start_ms: i64,
    window_end_ms: i64,
    metric: String,
    value: f64,
    threshold: f64,
    baseline: Option<f64>,
    p_value: Option<f64>,
}

/// (alert id, status, model, window start ms).
pub(crate) type AlertKey = (String, String, String, i64);

pub(crate) async fn read_alerts(sink: &ClickHouseSink) -> BTreeMap<AlertKey, AlertRow> {
    let rows: Vec<AlertRow> = sink
        .client()
        .query("SELECT ?fields FROM alerts FINAL")
        .fetch_all()
        .await
        .expect("read alerts FINAL");
    let mut out = BTreeMap::new();
    for r in rows {
        let k = (
            r.alert_id.clone(),
            r.status.clone(),
            r.model_id.clone(),
            r.window_start_ms,
        );
        let dup = out.insert(k.clone(), r);
        assert!(dup.is_none(), "alerts FINAL returned {k:?} twice");
    }
    out
}

// ---------------------------------------------------------------- comparison

/// How two floats compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Same {
    Bits,
    Close,
    No,
}

fn same_f64(a: f64, b: f64) -> Same {
    if a.to_bits() == b.to_bits() {
        Same::Bits
    } else if (a - b).abs() <= 1e-9 * a.abs().max(1.0) {
        Same::Close
    } else {
        Same::No
    }
}

fn same_opt(a: Option<f64>, b: Option<f64>) -> Same {
    match (a, b) {
        (None, None) => Same::Bits,
        (Some(a), Some(b)) => same_f64(a, b),
        _ => Same::No,
    }
}

fn worst(a: Same, b: Same) -> Same {
    match (a, b) {
        (Same::No, _) | (_, Same::No) => Same::No,
        (Same::Close, _) | (_, Same::Close) => Same::Close,
        _ => Same::Bits,
    }
}

/// The outcome of comparing two outputs.
#[derive(Default)]
pub(crate) struct Diff {
    compared: usize,
    missing: Vec<String>,
    extra: Vec<String>,
    differing: Vec<String>,
    /// Rows equal within 1e-9 but not bit for bit, by metric.
    close: BTreeMap<String, usize>,
    /// Rows that differ, by metric.
    differing_by_metric: BTreeMap<String, usize>,
}

impl Diff {
    pub(crate) fn ok(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.differing.is_empty()
    }

    pub(crate) fn report(&self, what: &str) -> String {
        let mut s = format!(
            "{what}: {} compared, {} missing, {} extra, {} differ; equal within 1e-9 but not bit for bit: {:?}; differing by metric: {:?}",
            self.compared,
            self.missing.len(),
            self.extra.len(),
            self.differing.len(),
            self.close,
            self.differing_by_metric,
        );
        let all = self
            .differing
            .iter()
            .map(|d| format!("differs {d}"))
            .chain(self.missing.iter().map(|k| format!("missing {k}")))
            .chain(self.extra.iter().map(|k| format!("extra {k}")));
        for line in all.take(30) {
            s.push_str("\n  ");
            s.push_str(&line);
        }
        s
    }
}

pub(crate) fn compare_metrics(
    want: &BTreeMap<MetricKey, MetricRow>,
    got: &BTreeMap<MetricKey, MetricRow>,
) -> Diff {
    let mut d = Diff::default();
    for (k, w) in want {
        let Some(g) = got.get(k) else {
            d.missing
                .push(format!("{k:?} (value {} rev {})", w.value, w.revision));
            continue;
        };
        d.compared += 1;
        let floats = worst(same_f64(w.value, g.value), same_opt(w.p_value, g.p_value));
        let ints = w.samples == g.samples && w.revision == g.revision;
        let verdict = if ints { floats } else { Same::No };
        match verdict {
            Same::Bits => {}
            Same::Close => *d.close.entry(k.5.clone()).or_default() += 1,
            Same::No => {
                *d.differing_by_metric.entry(k.5.clone()).or_default() += 1;
                d.differing.push(format!(
                    "{k:?}: value {} vs {}, samples {} vs {}, p {:?} vs {:?}, revision {} vs {}",
                    w.value,
                    g.value,
                    w.samples,
                    g.samples,
                    w.p_value,
                    g.p_value,
                    w.revision,
                    g.revision
                ));
            }
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            d.extra
                .push(format!("{k:?} (value {} rev {})", g.value, g.revision));
        }
    }
    d
}

pub(crate) fn compare_alerts(
    want: &BTreeMap<AlertKey, AlertRow>,
    got: &BTreeMap<AlertKey, AlertRow>,
) -> Diff {
    let mut d = Diff::default();
    for (k, w) in want {
        let Some(g) = got.get(k) else {
            d.missing.push(format!("{w:?}"));
            continue;
        };
        d.compared += 1;
        let exact_fields = (
            &w.rule,
            &w.severity,
            &w.model_version,
            &w.segment,
            &w.feature,
            w.window_end_ms,
            &w.metric,
        ) == (
            &g.rule,
            &g.severity,
            &g.model_version,
            &g.segment,
            &g.feature,
            g.window_end_ms,
            &g.metric,
        );
        let floats = worst(
            worst(
                same_f64(w.value, g.value),
                same_f64(w.threshold, g.threshold),
            ),
            worst(
                same_opt(w.baseline, g.baseline),
                same_opt(w.p_value, g.p_value),
            ),
        );
        match if exact_fields { floats } else { Same::No } {
            Same::Bits => {}
            Same::Close => *d.close.entry(w.rule.clone()).or_default() += 1,
            Same::No => {
                *d.differing_by_metric.entry(w.rule.clone()).or_default() += 1;
                d.differing.push(format!("{w:?}\n    vs {g:?}"));
            }
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            d.extra.push(format!("{g:?}"));
        }
    }
    d
}

// ---------------------------------------------------------------- sanity

pub(crate) fn metric_sum(rows: &BTreeMap<MetricKey, MetricRow>, metric: &str) -> f64 {
    rows.iter()
        .filter(|(k, _)| k.5 == metric && k.2.is_empty())
        .map(|(_, r)| r.value)
        .sum()
}

/// The reference run saw every event it should: guards against a vacuous
/// comparison and against events lost to a late watermark.
fn assert_reference_is_complete(
    d: &CrashData,
    metrics: &BTreeMap<MetricKey, MetricRow>,
    alerts: &BTreeMap<AlertKey, AlertRow>,
) {
    assert!(metrics.len() > 1000, "only {} rows", metrics.len());
    let count = |metric: &str| -> Counts {
        metrics
            .iter()
            .filter(|(k, _)| k.5 == metric && k.2.is_empty() && k.6.is_empty() && !k.0.is_empty())
            .map(|(k, r)| ((k.0.clone(), k.1.clone(), k.3), r.value as u64))
            .collect()
    };
    let predictions = count("prediction_count");
    let absent: Vec<String> = d
        .predictions
        .keys()
        .filter(|k| !predictions.contains_key(*k))
        .map(|k| {
            format!(
                "{} {} +{} min",
                k.0,
                k.1,
                (i64::from(k.2) * 1000 - d.t0) / 60_000
            )
        })
        .collect();
    assert!(
        absent.is_empty(),
        "{} of {} (model, version, window) have no prediction_count row (their predictions were late): {absent:?}",
        absent.len(),
        d.predictions.len()
    );
    let wrong: Vec<_> = d
        .predictions
        .iter()
        .filter(|(k, v)| predictions.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k:?}: want {v}, got {:?}", predictions.get(k)))
        .take(20)
        .collect();
    assert!(
        wrong.is_empty(),
        "prediction counts differ from the dataset (late events?):\n{}",
        wrong.join("\n")
    );
    let labels = count("label_count");
    let wrong: Vec<_> = d
        .labels
        .iter()
        .filter(|(k, v)| labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k:?}: want {v}, got {:?}", labels.get(k)))
        .take(20)
        .collect();
    assert!(
        wrong.is_empty(),
        "label counts differ from the dataset:\n{}",
        wrong.join("\n")
    );
    // Accuracy of both classifier versions in every window, over every label.
    for ((model, version, window), n) in d.labels.iter().filter(|(k, _)| k.0 == MODEL) {
        let k = (
            model.clone(),
            version.clone(),
            String::new(),
            *window,
            (WINDOW_MS / 1000) as u32,
            "accuracy".to_string(),
            String::new(),
        );
        let row = metrics
            .get(&k)
            .unwrap_or_else(|| panic!("no accuracy row {k:?}"));
        assert_eq!(row.samples, *n, "{k:?}");
    }
    assert_eq!(
        metric_sum(metrics, "duplicate_count") as u64,
        d.duplicates,
        "duplicate_count"
    );
    assert_eq!(
        metric_sum(metrics, "orphan_label_count") as u64,
        d.orphans,
        "orphan_label_count"
    );
    for metric in ["psi", "mse", "roc_auc", "estimated_accuracy", "latency_p99"] {
        assert!(metrics.keys().any(|k| k.5 == metric), "no {metric} rows");
    }
    assert!(
        alerts
            .values()
            .any(|a| a.rule == "feature_drift" && a.status == "firing"),
        "no feature_drift alert: {alerts:?}"
    );
}

// ---------------------------------------------------------------- the tests

/// Where the instances keep their logs and state: `MODELWATCH_CRASH_LOGS`
/// (kept after the test) or the test's temporary directory.
pub(crate) fn logs_dir(tmp: &Path) -> PathBuf {
    match std::env::var_os("MODELWATCH_CRASH_LOGS") {
        Some(d) => {
            let d = PathBuf::from(d).join(format!("{}", now_ms()));
            std::fs::create_dir_all(&d).expect("MODELWATCH_CRASH_LOGS directory");
            println!("logs and state in {}", d.display());
            d
        }
        None => tmp.to_path_buf(),
    }
}

/// Reads the number of kills and the schedule seed from the environment.
fn crash_settings() -> (usize, u64) {
    let kills = std::env::var("MODELWATCH_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_KILLS);
    (kills, seed_from_env("MODELWATCH_CRASH_SEED"))
}

/// A schedule seed: environment variable `var`, else the clock.
pub(crate) fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// The kill schedule, in random order: two thirds during ingest (right
/// after, or up to 2 s after, the process consumed 1 000 to 8 000 messages
/// of its own), one third in the middle of a checkpoint (the first one
/// after that); then one more in the middle of writing the windows the
/// idle watermark closes. Every kill comes after progress, so every
/// restart restores a real state.
fn kill_plan(rng: &mut StdRng, kills: usize, input: u64) -> Vec<Kill> {
    let mut plan: Vec<Kill> = (0..kills)
        .map(|i| match i % 4 {
            3 => Kill::InWindowWrite { rows: 1_000 },
            0 => Kill::AfterConsumed {
                at: 0,
                then: Duration::ZERO,
            },
            1 => Kill::AfterConsumed {
                at: 0,
                then: Duration::from_secs_f64(rng.gen_range(0.0..2.0)),
            },
            _ => Kill::InCheckpoint { at: 0 },
        })
        .collect();
    // Fisher-Yates with the seeded generator.
    for i in (1..plan.len()).rev() {
        let j = rng.gen_range(0..=i);
        plan.swap(i, j);
    }
    // Ingest and checkpoint kills at increasing points of the input, up to
    // 80 % of it: whatever a process reads past its kill point, the input
    // is not over before the last kill (which needs the close at idle).
    let mut points: Vec<u64> = (0..plan.len())
        .map(|_| rng.gen_range(input / 20..input * 4 / 5))
        .collect();
    points.sort_unstable();
    for (kill, point) in plan.iter_mut().zip(points) {
        match kill {
            Kill::AfterConsumed { at, .. } | Kill::InCheckpoint { at } => *at = point,
            Kill::InWindowWrite { .. } => {}
        }
    }
    if kills > 0 {
        // The biggest writes: the close at idle (or a burst of windows).
        plan.push(Kill::InWindowWrite { rows: 20_000 });
    }
    plan
}

#[test]
fn killed_and_restarted_run_equals_an_uninterrupted_run() {
    let _serial = serial();
    let test_started = Instant::now();
    let (kills, seed) = crash_settings();
    println!("crash test: {kills} kills, schedule seed {seed} (MODELWATCH_CRASH_SEED={seed} reproduces it)");
    let mut rng = StdRng::seed_from_u64(seed);

    let broker = TansuBroker::start(PARTITIONS);
    let brokers = broker.bootstrap();
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_path = logs_dir(dir.path());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    // Event times from 30 h to 28 h ago: once the input is idle the
    // watermark (wall clock - 20 min lateness) passes every early label's TTL
    // (1 h) and every unlabeled prediction's horizon (24 h), so orphan
    // labels and unlabeled predictions are final in both runs.
    let t0 = aligned_ago(30 * 3_600_000);
    let d = crash_dataset(t0);
    let started = Instant::now();
    runtime.block_on(produce_messages(&brokers, &d.messages));
    println!(
        "produced {} messages ({} malformed, {} duplicate predictions, {} early labels, {} orphan labels) in {:.1} s",
        d.messages.len(),
        d.malformed.len(),
        d.duplicates,
        d.early_labels,
        d.orphans,
        started.elapsed().as_secs_f64()
    );
    assert!(d.messages.len() >= 200_000, "{}", d.messages.len());

    // The reference: one uninterrupted run.
    let reference = Instance::new("reference", &brokers, &dir_path, LATENESS);
    runtime.block_on(reference.import_references(&d.reference));
    let started = Instant::now();
    let log = reference.spawn(true, 0).wait_success(CHILD_TIMEOUT);
    let reference_time = started.elapsed();
    assert!(log.contains("input idle"), "{log}");
    assert_nothing_late(&log, "reference run");
    let before_idle = log.split("input idle").next().unwrap_or_default();
    assert!(
        before_idle.matches("clickhouse write begin").count() > 1,
        "windows close during the replay, not only at idle"
    );
    // Consumption ends an idle timeout before the exit.
    let expected = reference_time.saturating_sub(Duration::from_secs(IDLE_TIMEOUT_S));
    println!(
        "reference run: {:.1} s ({:.1} s of consumption)",
        reference_time.as_secs_f64(),
        expected.as_secs_f64()
    );
    let want_metrics = runtime.block_on(read_metrics(&reference.sink()));
    let want_alerts = runtime.block_on(read_alerts(&reference.sink()));
    assert_reference_is_complete(&d, &want_metrics, &want_alerts);
    let letters = read_topic(&brokers, "modelwatch-dead-letter", d.malformed.len());
    let keys: BTreeSet<String> = letters
        .iter()
        .map(|m| {
            use rdkafka::message::Message as _;
            String::from_utf8_lossy(m.key().unwrap_or_default()).to_string()
        })
        .collect();
    assert_eq!(letters.len(), d.malformed.len(), "dead letters: {keys:?}");
    assert_eq!(
        keys,
        d.malformed.iter().cloned().collect::<BTreeSet<_>>(),
        "dead-letter keys"
    );
    println!(
        "reference: {} window_metrics rows, {} alerts ({} firing)",
        want_metrics.len(),
        want_alerts.len(),
        want_alerts
            .values()
            .filter(|a| a.status == "firing")
            .count()
    );

    // The crash run: killed `kills` times, restarted on the same state.
    let mut crash = Instance::new("crash", &brokers, &dir_path, LATENESS);
    crash.group_per_run = true;
    runtime.block_on(crash.import_references(&d.reference));
    let plan = kill_plan(&mut rng, kills, d.messages.len() as u64);
    let started = Instant::now();
    for (i, kill) in plan.iter().enumerate() {
        let what = run_until_killed(&crash, i, kill);
        println!("crash run {i} ({kill:?}): {what}");
    }
    let log = crash.spawn(true, plan.len()).wait_success(CHILD_TIMEOUT);
    assert!(log.contains("input idle"), "{log}");
    // The late counts are part of the checkpointed state: this covers
    // every process of the crash run.
    assert_nothing_late(&log, "crash run");
    // Not vacuous: the restarts restored checkpoints holding join state and
    // skipped input the checkpoints already held.
    let mut restored = Vec::new();
    let mut skipping = 0;
    for i in 1..=plan.len() {
        let text = std::fs::read_to_string(dir_path.join("crash").join(format!("run-{i}.log")))
            .unwrap_or_default();
        skipping +=
            usize::from(text.contains("skipping messages the restored state already holds"));
        let records = text
            .lines()
            .find(|l| l.contains("state restored from the last checkpoint"))
            .and_then(|l| field_value(l, "join_records"));
        restored.push(records.unwrap_or(0));
    }
    println!("join records restored by the restarts: {restored:?}");
    assert!(
        restored.iter().all(|n| *n > 0),
        "every restart restores a join state: {restored:?}"
    );
    // A restart killed before it fetched the partitions its checkpoint
    // covers has nothing to skip yet: at least one restart must have.
    println!(
        "restarts that skipped input their checkpoint held: {skipping} of {}",
        plan.len()
    );
    assert!(
        plan.is_empty() || skipping > 0,
        "no restart skipped input its checkpoint held"
    );
    println!(
        "crash run: {} kills, then to completion: {:.1} s",
        plan.len(),
        started.elapsed().as_secs_f64()
    );
    let got_metrics = runtime.block_on(read_metrics(&crash.sink()));
    let got_alerts = runtime.block_on(read_alerts(&crash.sink()));

    let metrics = compare_metrics(&want_metrics, &got_metrics);
    let alerts = compare_alerts(&want_alerts, &got_alerts);
    println!("{}", metrics.report("window_metrics FINAL"));
    println!("{}", alerts.report("alerts FINAL"));
    // Every malformed message reached the dead-letter topic (again).
    let letters = read_topic(&brokers, "modelwatch-dead-letter", 2 * d.malformed.len());
    assert!(
        letters.len() >= 2 * d.malformed.len(),
        "the crash run dead-lettered {} messages, want at least {}",
        letters.len() - d.malformed.len(),
        d.malformed.len()
    );
    println!(
        "crash test total: {:.1} s (seed {seed})",
        test_started.elapsed().as_secs_f64()
    );
    assert!(
        metrics.ok() && alerts.ok(),
        "the crash run differs from the uninterrupted run (seed {seed}, logs in {}; set MODELWATCH_CRASH_LOGS=DIR to keep them):\n{}\n{}",
        dir_path.display(),
        metrics.report("window_metrics FINAL"),
        alerts.report("alerts FINAL")
    );
}

/// Waits until the log reports `n` predictions processed or `group`
/// committed the end of the predictions topic.
fn wait_predictions_consumed(r: &mut Running, brokers: &str, group: &str, n: u64) {
    let ends = end_offsets(brokers, "predictions");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_check = Instant::now();
    loop {
        r.assert_running();
        if let Some(line) = r.next_line(Instant::now() + Duration::from_millis(200)) {
            let processed = line
                .contains("progress")
                .then(|| field_value(&line, "predictions"))
                .flatten();
            if processed.is_some_and(|p| p >= n) {
                println!("predictions consumed: {line}");
                return;
            }
        }
        if last_check.elapsed() >= Duration::from_millis(500) {
            last_check = Instant::now();
            if committed(brokers, group, "predictions") == ends {
                println!("predictions consumed: offsets committed to the end");
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "predictions not consumed after 60 s:\n{}",
            r.tail(300)
        );
    }
}

/// The number after `name=` in a text log line.
pub(crate) fn field_value(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!(" {name}="))?;
    line[at + name.len() + 2..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn restart_keeps_pending_predictions() {
    let _serial = serial();
    let broker = TansuBroker::start(PARTITIONS);
    let brokers = broker.bootstrap();
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    // 20 minutes of traffic, 3 h ago; labels 0-10 minutes later.
    let t0 = aligned_ago(3 * 3_600_000);
    let s = Scenario {
        seed: 5,
        start_ms: t0,
        events_per_second: 2.0,
        count: 2_400,
        versions: VERSIONS.iter().map(|v| v.to_string()).collect(),
        model_id: MODEL.into(),
        label_fraction: 0.9,
        label_delay_ms: (0, 600_000),
        ..Scenario::default()
    };
    let (predictions, labels) = generate(s);
    let as_messages = |events: Vec<InputEvent>| -> Vec<Message> {
        events
            .into_iter()
            .map(|ev| match &ev {
                InputEvent::Prediction(p) => {
                    (Topic::Predictions, p.request_id.clone(), encode_json(&ev))
                }
                InputEvent::GroundTruth(l) => {
                    (Topic::GroundTruth, l.request_id.clone(), encode_json(&ev))
                }
            })
            .collect()
    };
    let prediction_messages = as_messages(
        predictions
            .iter()
            .cloned()
            .map(InputEvent::Prediction)
            .collect(),
    );
    let label_messages = as_messages(
        labels
            .iter()
            .cloned()
            .map(InputEvent::GroundTruth)
            .collect(),
    );

    // Predictions only; the run stops gracefully once it has them all.
    runtime.block_on(produce_messages(&brokers, &prediction_messages));
    let dir_path = logs_dir(dir.path());
    let split = Instance::new("split", &brokers, &dir_path, "20m");
    let mut r = split.spawn(false, 0);
    wait_predictions_consumed(
        &mut r,
        &brokers,
        &split.group,
        prediction_messages.len() as u64,
    );
    r.stop(Duration::from_secs(30));

    // Then the labels, and the same instance again until idle.
    runtime.block_on(produce_messages(&brokers, &label_messages));
    split.spawn(true, 1).wait_success(CHILD_TIMEOUT);

    // A run that saw everything at once.
    let whole = Instance::new("whole", &brokers, &dir_path, "20m");
    whole.spawn(true, 0).wait_success(CHILD_TIMEOUT);

    let pick = |rows: BTreeMap<MetricKey, MetricRow>| -> BTreeMap<MetricKey, MetricRow> {
        rows.into_iter()
            .filter(|(k, _)| {
                ["accuracy", "label_count", "orphan_label_count"].contains(&k.5.as_str())
            })
            .collect()
    };
    let want = pick(runtime.block_on(read_metrics(&whole.sink())));
    let got = pick(runtime.block_on(read_metrics(&split.sink())));
    let labels_total = metric_sum(&want, "label_count") as usize;
    assert_eq!(
        labels_total,
        labels.len() * VERSIONS.len(),
        "the whole run joins every label to both versions"
    );
    assert_eq!(metric_sum(&want, "orphan_label_count"), 0.0);
    let diff = compare_metrics(&want, &got);
    println!("{}", diff.report("accuracy / label_count rows"));
    assert_eq!(
        metric_sum(&got, "orphan_label_count"),
        0.0,
        "labels of predictions consumed before the restart became orphans"
    );
    assert!(
        diff.ok(),
        "{}",
        diff.report("accuracy / label_count rows after a restart")
    );
}
