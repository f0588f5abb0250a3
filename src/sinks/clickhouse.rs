//! ClickHouse sink: the schema (migrations), batched idempotent inserts with
//! retries, and the reference-profile store.
//!
//! Owns everything modelwatch writes to or reads from ClickHouse. It does not
//! compute anything: rows arrive fully formed from the metrics / alerting
//! stages. Idempotence comes from the table engines, not from this writer:
//! every table is a `ReplacingMergeTree` keyed so that a replayed or retried
//! insert yields the same logical rows after `FINAL` (or `argMax`), which is
//! what lets the service commit Kafka offsets only after a write succeeded and
//! replay freely after a crash.
//!
//! The core schema only uses what ClickHouse 18.16 (Debian's package) knows;
//! `LowCardinality` and `TTL` are switched on when `SELECT version()` reports
//! a server new enough for them. The password never appears in logs or in
//! the errors this module returns.
//!
//! Errors come in three kinds ([`SinkError`]): transient (retried with
//! backoff), rejected (the server refuses these rows themselves: the batch is
//! bisected, the good rows are written and the bad ones dropped and counted,
//! so a poison row never holds checkpoints back), and permanent (a setup
//! problem such as authentication or a missing table: the caller stops).
//! Every insert is split by partition month so that no INSERT touches more
//! than [`MAX_PARTITIONS_PER_INSERT`] months (current servers refuse more
//! than 100 partitions in one INSERT block, error 252).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::ClickHouseConfig;
use crate::model::{AlertEvent, AlertStatus, Severity};
use crate::sinks::webhook::DeliveryRecord;

/// Table of per-window metric values (long format, one row per value).
pub const WINDOW_METRICS: &str = "window_metrics";
/// Table of every alert event.
pub const ALERTS: &str = "alerts";
/// Table of known models (metadata store).
pub const MODELS: &str = "models";
/// Table of known model versions (metadata store).
pub const MODEL_VERSIONS: &str = "model_versions";
/// Table of reference profiles, one row version per save.
pub const REFERENCE_PROFILES: &str = "reference_profiles";
/// Table of webhook delivery outcomes (one row per alert and webhook).
pub const WEBHOOK_DELIVERIES: &str = "webhook_deliveries";
/// Table of per-window, per-feature drift counts (merged over time ranges).
pub const WINDOW_HISTOGRAMS: &str = "window_histograms";

/// Upper bound for one query; a hung server counts as a transient error and
/// the attempt is retried. Inserts use `clickhouse.insert_timeout`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Most partition months one INSERT may carry. Current servers refuse an
/// INSERT block spanning more than 100 partitions (`max_partitions_per_insert_block`,
/// error 252). Months are computed here in UTC while `toYYYYMM` uses the
/// server's time zone, so one UTC month can touch two server months: 50 UTC
/// months stay within 100 server months whatever the zone.
pub const MAX_PARTITIONS_PER_INSERT: usize = 50;

/// Longest the retries of one insert batch may take in all (or one
/// `insert_timeout`, if longer): then the write fails as transient and the
/// service goes back to polling Kafka, well within librdkafka's
/// `max.poll.interval.ms` (300 s), and tries again at the next flush.
pub const WRITE_BUDGET: Duration = Duration::from_secs(120);

/// Extra inserts one batch may spend isolating rejected rows by bisection
/// (about 2 · log2(batch) per bad row); once spent, a rejected part of the
/// batch is dropped whole. Bounds the cost of a batch full of bad rows.
const MAX_ISOLATION_INSERTS: usize = 256;

/// One metric value of one window: a row of `window_metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct MetricRow {
    /// Model id.
    pub model_id: String,
    /// Model version.
    pub model_version: String,
    /// `''` for all traffic, else `key=value`.
    pub segment: String,
    /// Window start, seconds since the epoch (ClickHouse `DateTime`).
    pub window_start: u32,
    /// Window length in seconds.
    pub window_seconds: u32,
    /// Metric name (`metrics::names`).
    pub metric: String,
    /// Feature name; `''` for model-level metrics.
    pub feature: String,
    /// The value.
    pub value: f64,
    /// Number of observations behind the value.
    pub samples: u64,
    /// p-value of the statistic, when it has one.
    pub p_value: Option<f64>,
    /// Row version: a later revision of the same key replaces an earlier one.
    pub revision: u64,
}

/// One feature's drift counts of one window: a row of `window_histograms`
/// (see `metrics::FeatureHistogram` for the layout of `counts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct HistogramRow {
    /// Model id.
    pub model_id: String,
    /// Model version.
    pub model_version: String,
    /// `''` for all traffic, else `key=value`.
    pub segment: String,
    /// Window start, seconds since the epoch (ClickHouse `DateTime`).
    pub window_start: u32,
    /// Window length in seconds.
    pub window_seconds: u32,
    /// Feature name (`__prediction__` for the prediction).
    pub feature: String,
    /// Layout of `counts`: `numeric` or `categorical`.
    pub kind: String,
    /// Counts per bin / cell (numeric: then value sums and range gaps).
    pub counts: Vec<f64>,
    /// Row version: a later revision of the same key replaces an earlier one.
    pub revision: u64,
}

/// What the service knows about one model version: a row of `model_versions`
/// (and, folded per model, of `models`).
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    /// Model id.
    pub model_id: String,
    /// Model version.
    pub model_version: String,
    /// Task type (`binary`, `multiclass`, `regression`, or `unknown`).
    pub task: String,
    /// First event seen, ms since the epoch.
    pub first_seen_ms: i64,
    /// Latest event seen, ms since the epoch.
    pub last_seen_ms: i64,
    /// Free-form metadata, a JSON object.
    pub metadata: String,
}

/// An error of the sink, classified by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying later (network, timeout, overload, 5xx); retries were exhausted.
    #[error("transient ClickHouse error: {0}")]
    Transient(String),
    /// The server refused the rows themselves (values, sizes, the partition
    /// limit): the same rows can never be written, other rows can. Inserts
    /// never return it: they isolate and drop the rows (see
    /// [`ClickHouseSink::dropped`]).
    #[error("ClickHouse rejected the data: {0}")]
    Rejected(String),
    /// Retrying cannot help and it is not the data's fault: a setup problem
    /// (authentication, permissions, unknown database / table / column,
    /// syntax, a table whose columns differ from the service's).
    #[error("permanent ClickHouse error: {0}")]
    Permanent(String),
}

impl SinkError {
    /// True for errors worth retrying.
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Transient(_))
    }

    /// True when no server answered at all (not even a TLS handshake).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, SinkError::Transient(m) if !m.starts_with("TLS handshake"))
    }
}

/// ClickHouse error codes worth retrying: overload, timeouts, network and
/// replication hiccups. Everything else with a code is permanent.
const TRANSIENT_CODES: &[u32] = &[
    3,   // UNEXPECTED_END_OF_FILE
    159, // TIMEOUT_EXCEEDED
    164, // READONLY (e.g. replica in read-only mode during restart)
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    236, // ABORTED
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    243, // NOT_ENOUGH_SPACE
    252, // TOO_MANY_PARTS (unless its message is the partition limit: see `classify_message`)
    279, // ALL_CONNECTION_TRIES_FAILED
    285, // TOO_FEW_LIVE_REPLICAS
    286, // UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
    319, // UNKNOWN_STATUS_OF_INSERT
    394, // QUERY_WAS_CANCELLED
    425, // SYSTEM_ERROR
    473, // DEADLOCK_AVOIDED
    999, // KEEPER_EXCEPTION
];

/// ClickHouse error codes caused by the rows of an INSERT: the same rows can
/// never be written, the rest of the batch can.
const DATA_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    128, // TOO_LARGE_ARRAY_SIZE
    131, // TOO_LARGE_STRING_SIZE
    158, // TOO_MANY_ROWS
    190, // SIZES_OF_ARRAYS_DOESNT_MATCH
    307, // TOO_MANY_BYTES
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO (a table's own row check)
    469, // VIOLATED_CONSTRAINT (a table CONSTRAINT refuses the row)
];

/// `TOO_MANY_PARTS`, which also reports the per-INSERT partition limit.
const CODE_TOO_MANY_PARTS: u32 = 252;

/// `TABLE_ALREADY_EXISTS`: a concurrent `CREATE TABLE IF NOT EXISTS` won.
const CODE_TABLE_ALREADY_EXISTS: u32 = 57;
/// `DATABASE_ALREADY_EXISTS`: a concurrent `CREATE DATABASE IF NOT EXISTS` won.
const CODE_DATABASE_ALREADY_EXISTS: u32 = 82;

/// The ClickHouse error code in a server message (`Code: 60, e.displayText() = ...`).
fn error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What a server error means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorClass {
    /// Retry later.
    Transient,
    /// The rows themselves are refused.
    Data,
    /// Setup problem: retrying cannot help.
    Setup,
}

/// Classifies a server error message (the body of a failed request).
fn classify_message(message: &str) -> ErrorClass {
    if let Some(code) = error_code(message) {
        // 252 is both "too many parts" (merges lag behind inserts: wait) and
        // "too many partitions for single INSERT block" (this INSERT can
        // never succeed); only the text tells them apart.
        if code == CODE_TOO_MANY_PARTS
            && message
                .to_ascii_lowercase()
                .contains("partitions for single insert block")
        {
            return ErrorClass::Data;
        }
        if TRANSIENT_CODES.contains(&code) {
            return ErrorClass::Transient;
        }
        if DATA_CODES.contains(&code) {
            return ErrorClass::Data;
        }
        return ErrorClass::Setup;
    }
    // No ClickHouse code: the body was an HTTP status line from the server or
    // a proxy ("503 Service Unavailable"); 5xx and 429 are worth retrying,
    // 413 (body too large for a proxy) is the data's size.
    let status = message.split_whitespace().next().unwrap_or("");
    if status.len() == 3 && (status.starts_with('5') || status == "429") {
        ErrorClass::Transient
    } else if status == "413" {
        ErrorClass::Data
    } else {
        ErrorClass::Setup
    }
}

/// Whether a server error message is worth retrying.
#[cfg(test)]
fn is_transient_message(message: &str) -> bool {
    classify_message(message) == ErrorClass::Transient
}

/// Classifies a client error and strips the password from its text.
fn classify(err: &clickhouse::error::Error, password: &str) -> SinkError {
    use clickhouse::error::Error as E;
    let text = redact(&err.to_string(), password);
    // A failed TLS handshake (an untrusted or mismatching server
    // certificate, a refused client certificate) or TLS settings that could
    // not be loaded: retrying cannot fix it.
    if let Some(tls) = crate::sinks::clickhouse_tls::tls_failure(err) {
        return SinkError::Permanent(redact(&tls, password));
    }
    // A handshake that did not finish in time may be a slow network: retried.
    if let Some(slow) = crate::sinks::clickhouse_tls::handshake_timeout(err) {
        return SinkError::Transient(redact(&slow, password));
    }
    match err {
        E::Network(_) | E::TimedOut => SinkError::Transient(text),
        E::BadResponse(body) => match classify_message(body) {
            ErrorClass::Transient => SinkError::Transient(text),
            ErrorClass::Data => SinkError::Rejected(text),
            ErrorClass::Setup => SinkError::Permanent(text),
        },
        // Serializing a row failed: that row can never be sent.
        E::Custom(_) | E::SequenceMustHaveLength | E::InvalidUtf8Encoding(_) => {
            SinkError::Rejected(text)
        }
        _ => SinkError::Permanent(text),
    }
}

/// The UTC month (`YYYYMM`) of a `DateTime` (seconds since the epoch).
pub fn utc_month(seconds: u32) -> u32 {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::from(seconds / 86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    u32::try_from(year * 100 + month).unwrap_or(0)
}

/// A row of a table: its partition month, for tables partitioned by
/// `toYYYYMM(<column>)`.
pub trait Partitioned {
    /// The `DateTime` (seconds) of the partition column; `None` for
    /// unpartitioned tables.
    fn partition_time(&self) -> Option<u32>;
}

/// Splits rows (given by their partition month, `None` for unpartitioned
/// tables) into insert batches of at most `batch_rows` rows and
/// `max_partitions` distinct months, as lists of row indices. Rows of one
/// month stay together as far as the row limit allows.
pub fn plan_batches(
    months: &[Option<u32>],
    batch_rows: usize,
    max_partitions: usize,
) -> Vec<Vec<usize>> {
    let batch_rows = batch_rows.max(1);
    let max_partitions = max_partitions.max(1);
    let mut by_month: BTreeMap<Option<u32>, Vec<usize>> = BTreeMap::new();
    for (i, m) in months.iter().enumerate() {
        by_month.entry(*m).or_default().push(i);
    }
    let mut batches = Vec::new();
    let mut batch: Vec<usize> = Vec::new();
    let mut parts = 0;
    for rows in by_month.into_values() {
        if parts == max_partitions {
            batches.push(std::mem::take(&mut batch));
            parts = 0;
        }
        parts += 1;
        for i in rows {
            if batch.len() == batch_rows {
                batches.push(std::mem::take(&mut batch));
                parts = 1;
            }
            batch.push(i);
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// The URL without any `user:password@` part, for logs and errors.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}***@{}", &url[..scheme_end + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn redact(text: &str, password: &str) -> String {
    if password.is_empty() {
        text.to_owned()
    } else {
        text.replace(password, "***")
    }
}

/// Exponential backoff with full jitter and a bound on attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included (at least 1).
    pub max_attempts: u32,
    /// Upper bound of the first backoff.
    pub initial_backoff: Duration,
    /// Upper bound of any backoff.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// `max_attempts` attempts, backoff from 100 ms doubling up to 10 s.
    pub fn new(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }

    /// The upper bound of the backoff after failed attempt `attempt` (1-based).
    pub fn backoff_cap(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// A random backoff in `[cap / 2, cap]` after failed attempt `attempt`:
    /// jitter keeps several instances from retrying in lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let cap = self.backoff_cap(attempt);
        let half = cap / 2;
        let extra_ms = u64::try_from((cap - half).as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::thread_rng().gen_range(0..=extra_ms))
    }

    /// Runs `op` until it succeeds, fails permanently, or attempts run out.
    /// Each retry logs a warning naming `what`.
    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, SinkError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SinkError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) if attempt >= self.max_attempts => {
                    tracing::error!(operation = what, attempts = attempt, error = %e, "clickhouse retries exhausted");
                    return Err(e);
                }
                Err(e) => {
                    let pause = self.backoff(attempt);
                    tracing::warn!(
                        operation = what,
                        attempt,
                        backoff_ms = pause.as_millis() as u64,
                        error = %e,
                        "clickhouse request failed, retrying"
                    );
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// What the connected server supports beyond the 18.16 core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerFeatures {
    /// `LowCardinality(String)` columns (used from 20.1 on).
    pub low_cardinality: bool,
    /// Table `TTL` clauses (used from 20.1 on).
    pub ttl: bool,
}

impl ServerFeatures {
    /// Features of a server reporting `version` (e.g. `18.16.1`, `24.3.2.23`).
    pub fn from_version(version: &str) -> Self {
        let mut parts = version.trim().split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next().flatten().unwrap_or(0);
        let minor = parts.next().flatten().unwrap_or(0);
        // LowCardinality appeared (experimental) in 18.12 and TTL in 19.6;
        // both were settled by 20.1, the threshold used for both.
        let modern = (major, minor) >= (20, 1);
        ServerFeatures {
            low_cardinality: modern,
            ttl: modern,
        }
    }
}

/// Options of the generated schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchemaOptions {
    /// Server capabilities to use.
    pub features: ServerFeatures,
    /// Drop `window_metrics`, `window_histograms` and `alerts` partitions older than this many days
    /// (only when the server supports `TTL`).
    pub retention_days: Option<u32>,
}

/// The DDL statements of the core schema (ClickHouse 18.16 compatible), in
/// order: `CREATE DATABASE` then every table, all `IF NOT EXISTS`.
pub fn ddl(database: &str) -> Vec<String> {
    ddl_with(database, SchemaOptions::default())
}

/// The DDL statements for a server with the given options.
pub fn ddl_with(database: &str, opts: SchemaOptions) -> Vec<String> {
    // Repeated, low-cardinality strings: dictionary-encoded where supported.
    let lc = if opts.features.low_cardinality {
        "LowCardinality(String)"
    } else {
        "String"
    };
    let ttl = |column: &str| match (opts.features.ttl, opts.retention_days) {
        (true, Some(days)) => format!("\nTTL {column} + INTERVAL {days} DAY"),
        _ => String::new(),
    };
    vec![
        format!("CREATE DATABASE IF NOT EXISTS {database}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {database}.{WINDOW_METRICS} (
    model_id {lc},
    model_version {lc},
    segment {lc},
    window_start DateTime,
    window_seconds UInt32,
    metric {lc},
    feature {lc},
    value Float64,
    samples UInt64,
    p_value Nullable(Float64),
    revision UInt64
) ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(window_start)
ORDER BY (model_id, model_version, segment, window_seconds, metric, feature, window_start){}",
            ttl("window_start")
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {database}.{ALERTS} (
    alert_id String,
    rule {lc},
    status {lc},
    severity {lc},
    model_id {lc},
    model_version {lc},
    segment {lc},
    feature Nullable(String),
    metric {lc},
    value Float64,
    threshold Float64,
    baseline Nullable(Float64),
    p_value Nullable(Float64),
    window_start DateTime,
    window_end DateTime,
    fired_at DateTime,
    window_start_ms Int64,
    window_end_ms Int64,
    fired_at_ms UInt64,
    message String
) ENGINE = ReplacingMergeTree(fired_at_ms)
PARTITION BY toYYYYMM(window_start)
ORDER BY (model_id, alert_id, status, window_start){}",
            ttl("window_start")
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {database}.{MODELS} (
    model_id String,
    task {lc},
    latest_version String,
    first_seen DateTime,
    last_seen DateTime,
    metadata String
) ENGINE = ReplacingMergeTree(last_seen)
ORDER BY model_id"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {database}.{MODEL_VERSIONS} (
    model_id String,
    model_version String,
    task {lc},
    first_seen DateTime,
    last_seen DateTime,
    metadata String
) ENGINE = ReplacingMergeTree(last_seen)
ORDER BY (model_id, model_version)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {database}.{REFERENCE_PROFILES} (
    model_id String,
    model_version String,
    created_at DateTime,
    revision UInt64,
    sample_count UInt64,
    profile String
) ENGINE = ReplacingMergeTree(revision)
ORDER BY (model_id, model_version)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {database}.{WEBHOOK_DELIVERIES} (
    delivered_at DateTime,
    delivered_at_ms UInt64,
    webhook String,
    kind {lc},
    alert_id String,
    alert_status {lc},
    outcome {lc},
    attempts UInt32,
    http_status UInt16,
    error String,
    duration_ms UInt64
) ENGINE = ReplacingMergeTree(delivered_at_ms)
PARTITION BY toYYYYMM(delivered_at)
ORDER BY (webhook, alert_id, alert_status, delivered_at_ms){}",
            ttl("delivered_at")
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {database}.{WINDOW_HISTOGRAMS} (
    model_id {lc},
    model_version {lc},
    segment {lc},
    window_start DateTime,
    window_seconds UInt32,
    feature {lc},
    kind {lc},
    counts Array(Float64),
    revision UInt64
) ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(window_start)
ORDER BY (model_id, model_version, segment, window_seconds, feature, window_start){}",
            ttl("window_start")
        ),
    ]
}

/// Example queries shipped with the project (README, dashboard), as
/// `(title, SQL)` against the `modelwatch` database. They run on 18.16 and on
/// current ClickHouse (`tests/chdb/check_sql.py`).
pub const EXAMPLE_QUERIES: &[(&str, &str)] = &[
    (
        "latest value of every metric per window (FINAL keeps the newest revision)",
        "SELECT model_id, model_version, segment, window_start, window_seconds, metric, feature, value, samples, p_value
FROM modelwatch.window_metrics FINAL
ORDER BY model_id, model_version, window_start, metric, feature
LIMIT 100",
    ),
    (
        "accuracy per window and version without FINAL (argMax over revisions)",
        "SELECT model_id, model_version, window_start, argMax(value, revision) AS accuracy, argMax(samples, revision) AS labeled
FROM modelwatch.window_metrics
WHERE metric = 'accuracy' AND segment = '' AND feature = ''
GROUP BY model_id, model_version, window_start
ORDER BY model_id, model_version, window_start",
    ),
    (
        "features that drifted (PSI at or above 0.2) in the last day",
        "SELECT model_id, model_version, feature, window_start, value AS psi
FROM modelwatch.window_metrics FINAL
WHERE metric = 'psi' AND value >= 0.2 AND window_start >= now() - INTERVAL 1 DAY
ORDER BY psi DESC
LIMIT 50",
    ),
    (
        "accuracy by segment, last 24 hours, weighted by labeled samples",
        "SELECT model_id, segment, sum(value * samples) / sum(samples) AS accuracy, sum(samples) AS labeled
FROM modelwatch.window_metrics FINAL
WHERE metric = 'accuracy' AND window_start >= now() - INTERVAL 1 DAY AND samples > 0
GROUP BY model_id, segment
ORDER BY model_id, segment",
    ),
    (
        "alerts currently firing (latest status per alert id)",
        "SELECT alert_id, argMax(status, fired_at_ms) AS last_status, any(rule) AS rule, any(model_id) AS model, any(metric) AS metric, max(value) AS worst_value, max(fired_at) AS last_fired
FROM modelwatch.alerts FINAL
GROUP BY alert_id
HAVING last_status = 'firing'
ORDER BY last_fired DESC",
    ),
    (
        "webhook deliveries that failed or were dropped in the last day",
        "SELECT delivered_at, webhook, kind, alert_id, alert_status, outcome, attempts, http_status, error
FROM modelwatch.webhook_deliveries FINAL
WHERE outcome != 'delivered' AND delivered_at >= now() - INTERVAL 1 DAY
ORDER BY delivered_at DESC
LIMIT 100",
    ),
    (
        "model versions and when they were seen",
        "SELECT model_id, model_version, task, first_seen, last_seen
FROM modelwatch.model_versions FINAL
ORDER BY model_id, first_seen",
    ),
    (
        "per-feature drift counts of all traffic over the last day, summed element-wise across windows",
        "SELECT model_id, model_version, feature, kind, length(counts) AS cells, count() AS windows, sumForEach(counts) AS summed
FROM modelwatch.window_histograms FINAL
WHERE segment = '' AND window_start >= now() - INTERVAL 1 DAY
GROUP BY model_id, model_version, feature, kind, cells
ORDER BY model_id, model_version, feature",
    ),
    (
        "latest reference profile per model version",
        "SELECT model_id, model_version, argMax(sample_count, revision) AS samples, max(created_at) AS created
FROM modelwatch.reference_profiles
GROUP BY model_id, model_version
ORDER BY model_id, model_version",
    ),
];

/// The core schema and the example queries as one SQL script
/// (`deploy/clickhouse/schema.sql`, kept in sync by a unit test).
pub fn schema_sql() -> String {
    schema_sql_with(
        "ClickHouse 18.16 and later: the core schema",
        SchemaOptions::default(),
    )
}

/// The schema for `opts` and the example queries as one SQL script, headed
/// by `title`.
pub fn schema_sql_with(title: &str, opts: SchemaOptions) -> String {
    let mut out = format!(
        "-- modelwatch ClickHouse schema ({title}).\n\
         -- Generated from src/sinks/clickhouse.rs by its unit tests; do not edit.\n\
         -- The service creates it itself (`modelwatch migrate`, and at startup).\n\n"
    );
    for stmt in ddl_with("modelwatch", opts) {
        out.push_str(&stmt);
        out.push_str(";\n\n");
    }
    out.push_str("-- Example queries\n\n");
    for (title, sql) in EXAMPLE_QUERIES {
        out.push_str(&format!("-- {title}\n{sql};\n\n"));
    }
    out
}

/// A row of `alerts`.
#[derive(Debug, Clone, Serialize, Deserialize, clickhouse::Row)]
struct AlertRow {
    alert_id: String,
    rule: String,
    status: String,
    severity: String,
    model_id: String,
    model_version: String,
    segment: String,
    feature: Option<String>,
    metric: String,
    value: f64,
    threshold: f64,
    baseline: Option<f64>,
    p_value: Option<f64>,
    window_start: u32,
    window_end: u32,
    fired_at: u32,
    window_start_ms: i64,
    window_end_ms: i64,
    fired_at_ms: u64,
    message: String,
}

/// Milliseconds since the epoch to a ClickHouse `DateTime` (seconds, clamped
/// to its range).
fn ms_to_datetime(ms: i64) -> u32 {
    u32::try_from(ms.div_euclid(1000).max(0)).unwrap_or(u32::MAX)
}

impl From<&AlertEvent> for AlertRow {
    fn from(a: &AlertEvent) -> Self {
        AlertRow {
            alert_id: a.alert_id.clone(),
            rule: a.rule.clone(),
            status: a.status.as_str().to_owned(),
            severity: a.severity.as_str().to_owned(),
            model_id: a.model_id.clone(),
            model_version: a.model_version.clone(),
            segment: a.segment.clone(),
            feature: a.feature.clone(),
            metric: a.metric.clone(),
            value: a.value,
            threshold: a.threshold,
            baseline: a.baseline,
            p_value: a.p_value,
            window_start: ms_to_datetime(a.window_start),
            window_end: ms_to_datetime(a.window_end),
            fired_at: ms_to_datetime(a.fired_at),
            window_start_ms: a.window_start,
            window_end_ms: a.window_end,
            fired_at_ms: u64::try_from(a.fired_at).unwrap_or(0),
            message: a.message.clone(),
        }
    }
}

impl AlertRow {
    fn into_event(self) -> Option<AlertEvent> {
        let status = match self.status.as_str() {
            "firing" => AlertStatus::Firing,
            "resolved" => AlertStatus::Resolved,
            _ => return None,
        };
        let severity = match self.severity.as_str() {
            "warning" => Severity::Warning,
            "critical" => Severity::Critical,
            _ => return None,
        };
        Some(AlertEvent {
            alert_id: self.alert_id,
            rule: self.rule,
            status,
            severity,
            model_id: self.model_id,
            model_version: self.model_version,
            segment: self.segment,
            feature: self.feature,
            metric: self.metric,
            value: self.value,
            threshold: self.threshold,
            baseline: self.baseline,
            p_value: self.p_value,
            window_start: self.window_start_ms,
            window_end: self.window_end_ms,
            fired_at: i64::try_from(self.fired_at_ms).unwrap_or(i64::MAX),
            message: self.message,
        })
    }
}

/// A row of `webhook_deliveries`.
#[derive(Debug, Clone, Serialize, Deserialize, clickhouse::Row)]
struct DeliveryRow {
    delivered_at: u32,
    delivered_at_ms: u64,
    webhook: String,
    kind: String,
    alert_id: String,
    alert_status: String,
    outcome: String,
    attempts: u32,
    http_status: u16,
    error: String,
    duration_ms: u64,
}

impl From<&DeliveryRecord> for DeliveryRow {
    fn from(d: &DeliveryRecord) -> Self {
        DeliveryRow {
            delivered_at: ms_to_datetime(d.at_ms),
            delivered_at_ms: u64::try_from(d.at_ms).unwrap_or(0),
            webhook: d.webhook.clone(),
            kind: d.kind.to_owned(),
            alert_id: d.alert_id.clone(),
            alert_status: d.alert_status.to_owned(),
            outcome: d.outcome.to_owned(),
            attempts: d.attempts,
            http_status: d.http_status,
            error: d.error.clone(),
            duration_ms: d.duration_ms,
        }
    }
}

/// A row of `model_versions`.
#[derive(Debug, Clone, Serialize, clickhouse::Row)]
struct ModelVersionRow {
    model_id: String,
    model_version: String,
    task: String,
    first_seen: u32,
    last_seen: u32,
    metadata: String,
}

/// A row of `models`.
#[derive(Debug, Clone, Serialize, clickhouse::Row)]
struct ModelRow {
    model_id: String,
    task: String,
    latest_version: String,
    first_seen: u32,
    last_seen: u32,
    metadata: String,
}

/// A row of `reference_profiles`.
#[derive(Debug, Clone, Serialize, clickhouse::Row)]
struct ReferenceRow {
    model_id: String,
    model_version: String,
    created_at: u32,
    revision: u64,
    sample_count: u64,
    profile: String,
}

impl Partitioned for MetricRow {
    fn partition_time(&self) -> Option<u32> {
        Some(self.window_start)
    }
}

impl Partitioned for HistogramRow {
    fn partition_time(&self) -> Option<u32> {
        Some(self.window_start)
    }
}

impl Partitioned for AlertRow {
    fn partition_time(&self) -> Option<u32> {
        Some(self.window_start)
    }
}

impl Partitioned for DeliveryRow {
    fn partition_time(&self) -> Option<u32> {
        Some(self.delivered_at)
    }
}

impl Partitioned for ModelVersionRow {
    fn partition_time(&self) -> Option<u32> {
        None
    }
}

impl Partitioned for ModelRow {
    fn partition_time(&self) -> Option<u32> {
        None
    }
}

impl Partitioned for ReferenceRow {
    fn partition_time(&self) -> Option<u32> {
        None
    }
}

/// Folds version rows into one `models` row per model: earliest first seen,
/// latest last seen, task and metadata of the most recently seen version.
fn fold_models(rows: &[VersionRow]) -> Vec<ModelRow> {
    let mut by_model: BTreeMap<&str, ModelRow> = BTreeMap::new();
    let mut latest_ms: BTreeMap<&str, i64> = BTreeMap::new();
    for r in rows {
        let entry = by_model
            .entry(r.model_id.as_str())
            .or_insert_with(|| ModelRow {
                model_id: r.model_id.clone(),
                task: r.task.clone(),
                latest_version: r.model_version.clone(),
                first_seen: ms_to_datetime(r.first_seen_ms),
                last_seen: ms_to_datetime(r.last_seen_ms),
                metadata: r.metadata.clone(),
            });
        entry.first_seen = entry.first_seen.min(ms_to_datetime(r.first_seen_ms));
        let latest = latest_ms.entry(r.model_id.as_str()).or_insert(i64::MIN);
        if r.last_seen_ms >= *latest {
            *latest = r.last_seen_ms;
            entry.last_seen = ms_to_datetime(r.last_seen_ms);
            entry.task = r.task.clone();
            entry.latest_version = r.model_version.clone();
            entry.metadata = r.metadata.clone();
        }
    }
    by_model.into_values().collect()
}

/// At most `max` bytes of `text`, cut on a char boundary, with `…` when cut.
pub fn truncate_chars(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Writes modelwatch's rows to ClickHouse over HTTP. Cheap to clone: clones
/// share the connection pool.
#[derive(Clone)]
pub struct ClickHouseSink {
    /// Client whose default database is the configured one.
    client: clickhouse::Client,
    /// Client without a default database, for `CREATE DATABASE`.
    admin: clickhouse::Client,
    database: String,
    url: String,
    batch_rows: usize,
    retry: RetryPolicy,
    retention_days: Option<u32>,
    password: Arc<str>,
    /// Last reference revision handed out: revisions stay strictly increasing
    /// even for two saves within one millisecond.
    last_revision: Arc<AtomicU64>,
    /// Longest one insert request may take (`clickhouse.insert_timeout`).
    insert_timeout: Duration,
    /// Longest the retries of one batch may take ([`WRITE_BUDGET`]).
    write_budget: Duration,
    /// Rows dropped because the server rejected them, per table, since the
    /// last [`ClickHouseSink::take_dropped`].
    dropped: Arc<Mutex<BTreeMap<String, u64>>>,
    /// INSERT requests sent (attempts included), for tests and diagnostics.
    inserts: Arc<AtomicU64>,
}

impl fmt::Debug for ClickHouseSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Deliberately no password, not even masked.
        f.debug_struct("ClickHouseSink")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("batch_rows", &self.batch_rows)
            .field("retry", &self.retry)
            .field("insert_timeout", &self.insert_timeout)
            .finish()
    }
}

impl ClickHouseSink {
    /// A sink for the configured server; connects lazily.
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        // No client-side LZ4: ClickHouse 18.16 answers `compress=1` queries
        // with an empty body, which the client reads as "no rows".
        // The crate's default client knows no custom CA or client
        // certificate: ours does, with the same keep-alive settings.
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(crate::sinks::clickhouse_tls::POOL_IDLE_TIMEOUT)
                .build(crate::sinks::clickhouse_tls::Connector::new(cfg));
        let mut admin = clickhouse::Client::with_http_client(http)
            .with_compression(clickhouse::Compression::None)
            .with_url(cfg.url.trim_end_matches('/'))
            .with_user(cfg.user.clone());
        if !cfg.password.expose().is_empty() {
            admin = admin.with_password(cfg.password.expose());
        }
        let client = admin.clone().with_database(cfg.database.clone());
        ClickHouseSink {
            client,
            admin,
            database: cfg.database.clone(),
            url: redact_url(&cfg.url),
            batch_rows: cfg.batch_rows.max(1),
            retry: RetryPolicy::new(cfg.max_retries),
            retention_days: None,
            password: Arc::from(cfg.password.expose()),
            last_revision: Arc::new(AtomicU64::new(0)),
            insert_timeout: if cfg.insert_timeout.is_zero() {
                REQUEST_TIMEOUT
            } else {
                cfg.insert_timeout
            },
            write_budget: WRITE_BUDGET.max(cfg.insert_timeout),
            dropped: Arc::default(),
            inserts: Arc::default(),
        }
    }

    /// Replaces the time budget of one batch's retries (tests).
    pub fn with_write_budget(mut self, budget: Duration) -> Self {
        self.write_budget = budget;
        self
    }

    /// Rows dropped because ClickHouse rejected them, per table, since the
    /// previous call (the caller counts them).
    pub fn take_dropped(&self) -> BTreeMap<String, u64> {
        self.dropped
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }

    /// INSERT requests sent so far by this sink and its clones (retries and
    /// the inserts that isolate rejected rows included).
    pub fn insert_requests(&self) -> u64 {
        self.inserts.load(Ordering::Relaxed)
    }

    /// Replaces the retry policy (tests use short backoffs).
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Keeps `window_metrics`, `window_histograms` and `alerts` rows for `days` days, on servers
    /// that support `TTL` (ignored on 18.16). Applies to tables `migrate` creates.
    pub fn with_retention_days(mut self, days: u32) -> Self {
        self.retention_days = Some(days);
        self
    }

    /// The client, with the configured database as default (queries in tests / CLI).
    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// The configured database.
    pub fn database(&self) -> &str {
        &self.database
    }

    fn classify(&self, err: &clickhouse::error::Error) -> SinkError {
        classify(err, &self.password)
    }

    /// Runs one request with the request timeout, classifying its error.
    async fn attempt<T>(
        &self,
        fut: impl Future<Output = clickhouse::error::Result<T>>,
    ) -> Result<T, SinkError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(SinkError::Transient(format!(
                "no answer from {} within {}s",
                self.url,
                REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Checks that the server answers a trivial query (one attempt, no retry).
    pub async fn ping(&self) -> Result<(), SinkError> {
        let one: u8 = self
            .attempt(self.admin.query("SELECT toUInt8(1)").fetch_one::<u8>())
            .await?;
        if one == 1 {
            Ok(())
        } else {
            Err(SinkError::Permanent(format!(
                "unexpected answer {one} to SELECT 1 from {}",
                self.url
            )))
        }
    }

    /// The server version string (`SELECT version()`).
    pub async fn server_version(&self) -> Result<String, SinkError> {
        self.retry
            .run("version", || {
                self.attempt(self.admin.query("SELECT version()").fetch_one::<String>())
            })
            .await
    }

    /// Creates the database and every table if missing; safe to run any
    /// number of times, also concurrently from several instances.
    pub async fn migrate(&self) -> Result<(), SinkError> {
        let version = self.server_version().await?;
        let features = ServerFeatures::from_version(&version);
        let opts = SchemaOptions {
            features,
            retention_days: self.retention_days,
        };
        for stmt in ddl_with(&self.database, opts) {
            let done = self
                .retry
                .run("migrate", || {
                    self.attempt(self.admin.query(&stmt).execute())
                })
                .await;
            match done {
                Ok(()) => {}
                // Another instance migrating at the same moment can win the
                // race between the existence check and the create.
                Err(SinkError::Permanent(m))
                    if matches!(
                        error_code(&m),
                        Some(CODE_TABLE_ALREADY_EXISTS | CODE_DATABASE_ALREADY_EXISTS)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        tracing::info!(database = %self.database, server_version = %version, low_cardinality = features.low_cardinality, ttl = features.ttl && self.retention_days.is_some(), "clickhouse schema ready");
        Ok(())
    }

    /// Inserts `rows` into `table` in batches of at most `batch_rows` rows
    /// and [`MAX_PARTITIONS_PER_INSERT`] partition months, retrying each
    /// batch on transient errors. A retried batch may land twice; the
    /// ReplacingMergeTree keys make that harmless.
    ///
    /// A batch the server rejects for its data is bisected: the halves are
    /// sent again (the good rows land, idempotently), down to the single
    /// rows that are refused; those are dropped, counted in
    /// [`take_dropped`](Self::take_dropped) and logged once per batch.
    /// Transient and setup errors are returned.
    async fn insert_all<T>(&self, table: &str, rows: &[T]) -> Result<(), SinkError>
    where
        T: clickhouse::Row + Serialize + Partitioned,
    {
        let months: Vec<Option<u32>> = rows
            .iter()
            .map(|r| r.partition_time().map(utc_month))
            .collect();
        for batch in plan_batches(&months, self.batch_rows, MAX_PARTITIONS_PER_INSERT) {
            let batch: Vec<&T> = batch.into_iter().map(|i| &rows[i]).collect();
            self.insert_isolating(table, &batch).await?;
        }
        Ok(())
    }

    /// Inserts one batch; rows the server rejects are isolated by bisection
    /// and dropped (see [`insert_all`](Self::insert_all)).
    async fn insert_isolating<T>(&self, table: &str, batch: &[&T]) -> Result<(), SinkError>
    where
        T: clickhouse::Row + Serialize,
    {
        let mut todo: Vec<&[&T]> = vec![batch];
        let mut extra_inserts = 0usize;
        let mut dropped = 0u64;
        let mut example: Option<String> = None;
        while let Some(part) = todo.pop() {
            let retried = self.retry.run(table, || self.attempt_insert(table, part));
            let sent = match tokio::time::timeout(self.write_budget, retried).await {
                Ok(r) => r,
                Err(_) => Err(SinkError::Transient(format!(
                    "insert into {table} still failing after {}s of retries: tried again at the next flush",
                    self.write_budget.as_secs_f64()
                ))),
            };
            match sent {
                Ok(()) => {}
                Err(SinkError::Rejected(e)) => {
                    if part.len() > 1 && extra_inserts + 2 <= MAX_ISOLATION_INSERTS {
                        extra_inserts += 2;
                        let (a, b) = part.split_at(part.len() / 2);
                        todo.push(b);
                        todo.push(a);
                    } else {
                        dropped += part.len() as u64;
                        example.get_or_insert(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if dropped > 0 {
            if let Ok(mut d) = self.dropped.lock() {
                *d.entry(table.to_owned()).or_default() += dropped;
            }
            tracing::error!(
                table,
                dropped,
                batch_rows = batch.len(),
                isolation_inserts = extra_inserts,
                error = %truncate_chars(example.as_deref().unwrap_or(""), 1024),
                "clickhouse rejected rows: dropped, the rest of the batch is written"
            );
        }
        Ok(())
    }

    /// Sends one INSERT with the insert timeout, classifying its error.
    async fn attempt_insert<T>(&self, table: &str, rows: &[&T]) -> Result<(), SinkError>
    where
        T: clickhouse::Row + Serialize,
    {
        self.inserts.fetch_add(1, Ordering::Relaxed);
        let timeout = self.insert_timeout;
        let insert = async {
            let mut insert = self
                .client
                .insert::<T>(table)?
                .with_timeouts(Some(timeout), Some(timeout));
            for row in rows {
                insert.write(*row).await?;
            }
            insert.end().await
        };
        match tokio::time::timeout(timeout, insert).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.classify(&e)),
            Err(_) => Err(SinkError::Transient(format!(
                "insert into {table} got no answer from {} within {}s (clickhouse.insert_timeout)",
                self.url,
                timeout.as_secs_f64()
            ))),
        }
    }

    /// Writes metric rows (idempotent: the same key and revision twice is one row after `FINAL`).
    pub async fn write_metrics(&self, rows: &[MetricRow]) -> Result<(), SinkError> {
        self.insert_all(WINDOW_METRICS, rows).await
    }

    /// Writes per-window feature histograms (idempotent like [`write_metrics`](Self::write_metrics)).
    pub async fn write_histograms(&self, rows: &[HistogramRow]) -> Result<(), SinkError> {
        self.insert_all(WINDOW_HISTOGRAMS, rows).await
    }

    /// Writes alert events to the `alerts` history (a replayed alert is one row after `FINAL`).
    pub async fn write_alerts(&self, alerts: &[AlertEvent]) -> Result<(), SinkError> {
        let rows: Vec<AlertRow> = alerts.iter().map(AlertRow::from).collect();
        self.insert_all(ALERTS, &rows).await
    }

    /// Writes webhook delivery outcomes to `webhook_deliveries`.
    pub async fn write_deliveries(&self, records: &[DeliveryRecord]) -> Result<(), SinkError> {
        let rows: Vec<DeliveryRow> = records.iter().map(DeliveryRow::from).collect();
        self.insert_all(WEBHOOK_DELIVERIES, &rows).await
    }

    /// The latest event of every alert whose window started at or after
    /// `since_ms` (plus every alert still firing, however old), for
    /// [`crate::alerting::AlertEngine::restore`] at startup.
    pub async fn load_alerts(&self, since_ms: i64) -> Result<Vec<AlertEvent>, SinkError> {
        // argMax over fired_at_ms rather than FINAL: the latest transition of
        // each id (firing, its updates, resolved), whether or not parts merged.
        let cols = [
            "rule",
            "status",
            "severity",
            "model_id",
            "model_version",
            "segment",
            "feature",
            "metric",
            "value",
            "threshold",
            "baseline",
            "p_value",
            "window_start",
            "window_end",
            "fired_at",
            "window_start_ms",
            "window_end_ms",
        ];
        let mut select = String::from("SELECT alert_id");
        for c in cols {
            select.push_str(&format!(", argMax({c}, fired_at_ms) AS {c}_"));
        }
        select.push_str(
            ", max(fired_at_ms) AS fired_at_ms_, argMax(message, fired_at_ms) AS message_",
        );
        let sql = format!(
            "{select} FROM {}.{ALERTS} GROUP BY alert_id \
             HAVING window_start_ms_ >= {since_ms} OR status_ = 'firing' \
             ORDER BY window_start_ms_, alert_id",
            self.database
        );
        let rows: Vec<AlertRow> = self
            .retry
            .run("load_alerts", || {
                self.attempt(self.client.query(&sql).fetch_all::<AlertRow>())
            })
            .await?;
        Ok(rows.into_iter().filter_map(AlertRow::into_event).collect())
    }

    /// Writes model versions to `model_versions`, and one folded row per model to `models`.
    pub async fn write_versions(&self, rows: &[VersionRow]) -> Result<(), SinkError> {
        let versions: Vec<ModelVersionRow> = rows
            .iter()
            .map(|r| ModelVersionRow {
                model_id: r.model_id.clone(),
                model_version: r.model_version.clone(),
                task: r.task.clone(),
                first_seen: ms_to_datetime(r.first_seen_ms),
                last_seen: ms_to_datetime(r.last_seen_ms),
                metadata: r.metadata.clone(),
            })
            .collect();
        self.insert_all(MODEL_VERSIONS, &versions).await?;
        self.insert_all(MODELS, &fold_models(rows)).await
    }

    /// Stores a reference profile (JSON) for a model version; the newest save wins.
    pub async fn save_reference(
        &self,
        model_id: &str,
        version: &str,
        sample_count: u64,
        profile_json: &str,
    ) -> Result<(), SinkError> {
        let now = now_ms();
        let mut prev = self.last_revision.load(Ordering::Relaxed);
        let revision = loop {
            let next = now.max(prev + 1);
            match self.last_revision.compare_exchange(
                prev,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break next,
                Err(seen) => prev = seen,
            }
        };
        let row = ReferenceRow {
            model_id: model_id.to_owned(),
            model_version: version.to_owned(),
            created_at: u32::try_from(revision / 1000).unwrap_or(u32::MAX),
            revision,
            sample_count,
            profile: profile_json.to_owned(),
        };
        self.insert_all(REFERENCE_PROFILES, std::slice::from_ref(&row))
            .await
    }

    /// The newest reference profile of every (model, version):
    /// `(model_id, model_version, profile_json)`, sorted by model and version.
    pub async fn load_references(&self) -> Result<Vec<(String, String, String)>, SinkError> {
        // argMax rather than FINAL: correct whether or not parts were merged,
        // and it reads only the newest profile text per key.
        let sql = format!(
            "SELECT model_id, model_version, argMax(profile, revision) \
             FROM {}.{REFERENCE_PROFILES} GROUP BY model_id, model_version \
             ORDER BY model_id, model_version",
            self.database
        );
        self.retry
            .run("load_references", || {
                self.attempt(
                    self.client
                        .query(&sql)
                        .fetch_all::<(String, String, String)>(),
                )
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn error_codes_are_classified() {
        let transient = [
            "Code: 252, e.displayText() = DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts., e.what() = DB::Exception",
            "Code: 159, e.displayText() = DB::Exception: Timeout exceeded",
            "503 Service Unavailable",
            "502 Bad Gateway",
            "429 Too Many Requests",
        ];
        for m in transient {
            assert!(is_transient_message(m), "{m}");
        }
        let permanent = [
            "Code: 60, e.displayText() = DB::Exception: Table modelwatch.nope doesn't exist., e.what() = DB::Exception",
            "Code: 62, e.displayText() = DB::Exception: Syntax error: failed at position 1",
            "Code: 516, e.displayText() = DB::Exception: default: Authentication failed",
            "Code: 193, e.displayText() = DB::Exception: Wrong password for user default",
            "Code: 53, e.displayText() = DB::Exception: Type mismatch",
            "400 Bad Request",
            "garbage",
        ];
        for m in permanent {
            assert!(!is_transient_message(m), "{m}");
        }
        assert_eq!(error_code("Code: 60, e.displayText()"), Some(60));
        assert_eq!(error_code("no code"), None);
    }

    /// Real server texts (18.16 and current versions; the partition-limit
    /// text is what a current engine answers, taken from chdb) and what each
    /// means for the writer.
    #[test]
    fn server_errors_are_classified_transient_data_or_setup() {
        use ErrorClass::*;
        let table = [
            ("Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100). The limit is controlled by 'max_partitions_per_insert_block' setting. Large number of partitions is a common misconception. (TOO_MANY_PARTS)", Data),
            ("Code: 252, e.displayText() = DB::Exception: Too many partitions for single INSERT block (more than 100). The limit is controlled by 'max_partitions_per_insert_block' setting., e.what() = DB::Exception", Data),
            ("Code: 252. DB::Exception: Too many parts (300 with average size of 1.00 MiB) in table 'modelwatch.window_metrics'. Merges are processing significantly slower than inserts. (TOO_MANY_PARTS)", Transient),
            ("Code: 252, e.displayText() = DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts., e.what() = DB::Exception", Transient),
            ("Code: 241. DB::Exception: Memory limit (total) exceeded: would use 3.60 GiB. (MEMORY_LIMIT_EXCEEDED)", Transient),
            ("Code: 159. DB::Exception: Timeout exceeded: elapsed 5.0 seconds. (TIMEOUT_EXCEEDED)", Transient),
            ("Code: 131. DB::Exception: Too large string size: 1099511627776. (TOO_LARGE_STRING_SIZE)", Data),
            ("Code: 128. DB::Exception: Too large array size: 4294967296. (TOO_LARGE_ARRAY_SIZE)", Data),
            ("Code: 321. DB::Exception: Value is out of range of data type. (VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE)", Data),
            ("Code: 27, e.displayText() = DB::Exception: Cannot parse input: expected , before: x", Data),
            ("413 Request Entity Too Large", Data),
            ("Code: 469. DB::Exception: Constraint `c` for table modelwatch.window_metrics is violated at row 1. (VIOLATED_CONSTRAINT)", Data),
            ("Code: 516. DB::Exception: default: Authentication failed: password is incorrect. (AUTHENTICATION_FAILED)", Setup),
            ("Code: 497. DB::Exception: default: Not enough privileges. To execute this query, it's necessary to have the grant INSERT ON modelwatch.alerts. (ACCESS_DENIED)", Setup),
            ("Code: 60, e.displayText() = DB::Exception: Table modelwatch.window_metrics doesn't exist., e.what() = DB::Exception", Setup),
            ("Code: 81. DB::Exception: Database modelwatch does not exist. (UNKNOWN_DATABASE)", Setup),
            ("Code: 16. DB::Exception: No such column revision in table modelwatch.window_metrics. (NO_SUCH_COLUMN_IN_TABLE)", Setup),
            ("Code: 33. DB::Exception: Cannot read all data. Bytes read: 3. Bytes expected: 8.: (at row 1) (CANNOT_READ_ALL_DATA)", Setup),
            ("503 Service Unavailable", Transient),
            ("400 Bad Request", Setup),
        ];
        for (message, class) in table {
            assert_eq!(classify_message(message), class, "{message}");
        }
        use clickhouse::error::Error as E;
        let e = classify(&E::BadResponse(table[0].0.into()), "");
        assert!(
            matches!(e, SinkError::Rejected(_)) && !e.is_transient(),
            "{e}"
        );
        let e = classify(&E::BadResponse(table[2].0.into()), "");
        assert!(e.is_transient(), "{e}");
        let auth = table
            .iter()
            .find(|(m, _)| m.contains("AUTHENTICATION_FAILED"))
            .unwrap();
        let e = classify(&E::BadResponse(auth.0.into()), "");
        assert!(matches!(e, SinkError::Permanent(_)), "{e}");
    }

    #[test]
    fn utc_months_match_the_calendar() {
        assert_eq!(utc_month(0), 197001);
        assert_eq!(utc_month(951_782_399), 200002); // 2000-02-28T23:59:59
        assert_eq!(utc_month(951_868_799), 200002); // 2000-02-29T23:59:59
        assert_eq!(utc_month(951_868_800), 200003); // 2000-03-01T00:00:00
        assert_eq!(utc_month(1_704_067_199), 202312); // 2023-12-31T23:59:59
        assert_eq!(utc_month(1_704_067_200), 202401); // 2024-01-01T00:00:00
        assert_eq!(utc_month(u32::MAX), 210602); // 2106-02-07
    }

    /// 150 months of rows, shuffled: every batch holds at most 50 months and
    /// `batch_rows` rows, every row is in exactly one batch.
    #[test]
    fn batches_never_span_more_than_the_partition_limit() {
        let mut months: Vec<Option<u32>> = (0..150u32)
            .flat_map(|m| {
                let month = Some(200_000 + (m / 12) * 100 + m % 12 + 1);
                std::iter::repeat_n(month, 1 + (m as usize % 3))
            })
            .collect();
        // A deterministic shuffle.
        for i in (1..months.len()).rev() {
            months.swap(i, (i * 7919 + 13) % (i + 1));
        }
        for (batch_rows, want_batches) in [(10_000, 3), (7, 43)] {
            let batches = plan_batches(&months, batch_rows, MAX_PARTITIONS_PER_INSERT);
            assert_eq!(batches.len(), want_batches, "batch_rows {batch_rows}");
            let mut seen = vec![false; months.len()];
            for b in &batches {
                assert!(!b.is_empty() && b.len() <= batch_rows);
                let distinct: std::collections::BTreeSet<_> =
                    b.iter().map(|&i| months[i]).collect();
                assert!(
                    distinct.len() <= MAX_PARTITIONS_PER_INSERT,
                    "{}",
                    distinct.len()
                );
                for &i in b {
                    assert!(!seen[i], "row {i} twice");
                    seen[i] = true;
                }
            }
            assert!(seen.iter().all(|s| *s));
        }
        // Unpartitioned rows: only the row limit applies.
        let none = vec![None; 25];
        let batches = plan_batches(&none, 10, MAX_PARTITIONS_PER_INSERT);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        assert!(plan_batches(&[], 10, 50).is_empty());
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncate_chars("abc", 3), "abc");
        assert_eq!(truncate_chars("abcd", 3), "abc…");
        assert_eq!(truncate_chars("aé", 2), "a…");
    }

    #[test]
    fn client_errors_are_classified_and_redacted() {
        use clickhouse::error::Error as E;
        let e = classify(&E::BadResponse("Code: 252, Too many parts".into()), "");
        assert!(e.is_transient());
        let e = classify(&E::TimedOut, "");
        assert!(e.is_transient());
        let e = classify(
            &E::BadResponse("Code: 193, wrong password s3cret for user".into()),
            "s3cret",
        );
        assert!(!e.is_transient());
        let text = e.to_string();
        assert!(!text.contains("s3cret") && text.contains("***"), "{text}");
        let e = classify(&E::Custom("bad row".into()), "");
        assert!(matches!(e, SinkError::Rejected(_)), "{e}");
    }

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
        };
        assert_eq!(p.backoff_cap(1), Duration::from_millis(100));
        assert_eq!(p.backoff_cap(2), Duration::from_millis(200));
        assert_eq!(p.backoff_cap(4), Duration::from_millis(800));
        assert_eq!(p.backoff_cap(5), Duration::from_millis(1000));
        assert_eq!(p.backoff_cap(60), Duration::from_millis(1000));
        for attempt in 1..8 {
            for _ in 0..50 {
                let b = p.backoff(attempt);
                let cap = p.backoff_cap(attempt);
                assert!(
                    b >= cap / 2 && b <= cap,
                    "{b:?} outside [{:?}, {cap:?}]",
                    cap / 2
                );
            }
        }
        assert_eq!(RetryPolicy::new(0).max_attempts, 1);
    }

    #[tokio::test]
    async fn retry_stops_at_max_attempts_and_on_permanent_errors() {
        let p = RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
        };
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = p
            .run("t", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(SinkError::Transient("down".into()))
            })
            .await;
        assert!(matches!(r, Err(SinkError::Transient(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 4);

        calls.store(0, Ordering::SeqCst);
        let r: Result<(), _> = p
            .run("t", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(SinkError::Permanent("syntax".into()))
            })
            .await;
        assert!(matches!(r, Err(SinkError::Permanent(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        calls.store(0, Ordering::SeqCst);
        let r = p
            .run("t", || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(SinkError::Transient("blip".into()))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn server_features_follow_the_version() {
        assert_eq!(
            ServerFeatures::from_version("18.16.1"),
            ServerFeatures::default()
        );
        assert_eq!(
            ServerFeatures::from_version("19.17.4"),
            ServerFeatures::default()
        );
        let f = ServerFeatures::from_version("20.1.2");
        assert!(f.low_cardinality && f.ttl);
        let f = ServerFeatures::from_version("24.8.1.2684");
        assert!(f.low_cardinality && f.ttl);
        assert_eq!(
            ServerFeatures::from_version("garbage"),
            ServerFeatures::default()
        );
    }

    #[test]
    fn core_ddl_uses_only_18_16_features() {
        let all = ddl("modelwatch").join("\n");
        for banned in ["LowCardinality", "DateTime64", "Map(", "TTL", "JSON", "?"] {
            assert!(!all.contains(banned), "core schema uses {banned}");
        }
        assert_eq!(ddl("modelwatch").len(), 8);
        assert!(all.contains("CREATE TABLE IF NOT EXISTS modelwatch.window_histograms"));
        assert!(all.contains("CREATE TABLE IF NOT EXISTS modelwatch.webhook_deliveries"));
        let modern = ddl_with(
            "db",
            SchemaOptions {
                features: ServerFeatures::from_version("24.3"),
                retention_days: Some(90),
            },
        )
        .join("\n");
        assert!(modern.contains("LowCardinality(String)"));
        assert!(modern.contains("TTL window_start + INTERVAL 90 DAY"));
        assert!(modern.contains("CREATE TABLE IF NOT EXISTS db.window_metrics"));
    }

    #[test]
    fn example_queries_have_no_bind_placeholders() {
        // The client treats `?` as a bind parameter.
        for (title, sql) in EXAMPLE_QUERIES {
            assert!(!sql.contains('?'), "{title}");
        }
    }

    /// Compares a generated file with its committed copy; `MODELWATCH_BLESS=1`
    /// rewrites the copy after a schema change.
    fn assert_file_in_sync(relative: &str, want: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
        if std::env::var_os("MODELWATCH_BLESS").is_some() {
            std::fs::write(&path, want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is out of date: run `MODELWATCH_BLESS=1 cargo test --lib sinks::clickhouse`",
            path.display()
        );
    }

    /// `deploy/clickhouse/schema.sql` (what 18.16 gets) and
    /// `tests/chdb/schema-modern.sql` (what a current server with a retention
    /// gets), both checked on a current engine by `tests/chdb/check_sql.py`.
    #[test]
    fn schema_sql_files_are_in_sync() {
        assert_file_in_sync("deploy/clickhouse/schema.sql", &schema_sql());
        let modern = schema_sql_with(
            "current ClickHouse with LowCardinality and a 90-day TTL",
            SchemaOptions {
                features: ServerFeatures::from_version("24.1"),
                retention_days: Some(90),
            },
        );
        assert_file_in_sync("tests/chdb/schema-modern.sql", &modern);
    }

    #[test]
    fn models_fold_keeps_earliest_first_seen_and_latest_version() {
        let row = |v: &str, first: i64, last: i64| VersionRow {
            model_id: "m".into(),
            model_version: v.into(),
            task: "binary".into(),
            first_seen_ms: first,
            last_seen_ms: last,
            metadata: format!("{{\"v\":\"{v}\"}}"),
        };
        let folded = fold_models(&[row("v2", 5_000, 9_000), row("v1", 1_000, 4_000)]);
        assert_eq!(folded.len(), 1);
        assert_eq!(folded[0].first_seen, 1);
        assert_eq!(folded[0].last_seen, 9);
        assert_eq!(folded[0].latest_version, "v2");
        assert_eq!(folded[0].metadata, "{\"v\":\"v2\"}");
    }

    #[test]
    fn alert_rows_keep_milliseconds_and_clamp_datetimes() {
        assert_eq!(ms_to_datetime(-5), 0);
        assert_eq!(ms_to_datetime(1_700_000_000_999), 1_700_000_000);
        assert_eq!(ms_to_datetime(i64::MAX), u32::MAX);
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("http://u:pw@127.0.0.1:8123"),
            "http://***@127.0.0.1:8123"
        );
        assert_eq!(redact_url("http://127.0.0.1:8123"), "http://127.0.0.1:8123");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let cfg = ClickHouseConfig {
            password: crate::config::Secret("hunter2".into()),
            ..ClickHouseConfig::default()
        };
        let sink = ClickHouseSink::new(&cfg);
        assert!(!format!("{sink:?}").contains("hunter2"));
    }
}
