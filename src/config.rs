//! Service configuration: a TOML file plus `MODELWATCH_<SECTION>__<KEY>`
//! environment overrides. Every field documents its default; unknown keys and
//! bad values fail at load time naming the key and what was expected.
//!
//! The loader takes the environment as a map, so tests never touch the real
//! process environment.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::ingest::mapping::{MappingConfig, Mappings};
use crate::metrics::DriftMethod;
use crate::model::Severity;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka connection and topics.
    pub kafka: KafkaConfig,
    /// ClickHouse connection.
    pub clickhouse: ClickHouseConfig,
    /// Windowing and join timing.
    pub windows: WindowsConfig,
    /// Drift statistics and reference profiles.
    pub drift: DriftSettings,
    /// Limits that keep bad input from exhausting memory.
    pub limits: LimitsConfig,
    /// Per-model overrides, keyed by model id.
    pub models: BTreeMap<String, ModelConfig>,
    /// Alert rules.
    pub alerts: AlertsConfig,
    /// The service process itself.
    pub service: ServiceConfig,
    /// The HTTP API, dashboard, `/metrics` and health endpoints.
    pub api: ApiConfig,
    /// Durable processing state: checkpoints and recovery.
    pub state: StateConfig,
}

/// `[state]`: the embedded store that makes the processing state survive
/// restarts and crashes (join state, open windows, alert lifecycle, input
/// positions). See the README, "Durable state".
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Directory of the state store (created when missing). One instance
    /// per directory: a second process on the same directory fails at
    /// startup. Default `modelwatch-state` (relative to the working directory).
    pub dir: std::path::PathBuf,
    /// How often the state and the input positions are checkpointed (after
    /// the output they produced is written). Default `5s`.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Memory for the join state (pending predictions and labels). Beyond
    /// it, requests unchanged since the last checkpoint leave memory and are
    /// read back from the store when an event or their expiry needs them.
    /// Counted in bytes held: [`JOIN_BYTES_PER_REQUEST`] per request id
    /// plus the id's and its label's text. Default `2GiB`.
    pub memory_budget: bytesize::ByteSize,
}

/// Memory of one pending request in the join state, for
/// `state.memory_budget`: 273 bytes measured per pending prediction (join
/// entry, expiry queue entry, change-set entry and the prediction's record;
/// `cargo bench --bench memory`), rounded up.
pub const JOIN_BYTES_PER_REQUEST: u64 = 320;

impl StateConfig {
    /// The most request ids the join keeps in memory.
    pub fn max_hot_requests(&self) -> usize {
        usize::try_from(self.memory_budget.as_u64() / JOIN_BYTES_PER_REQUEST).unwrap_or(usize::MAX)
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: "modelwatch-state".into(),
            checkpoint_interval: Duration::from_secs(5),
            memory_budget: bytesize::ByteSize::gib(2),
        }
    }
}

/// `[api]`: the HTTP server of the API, the dashboard, `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve HTTP at all. Default true.
    pub enabled: bool,
    /// Listen address; loopback by default so nothing is exposed by accident. Default `127.0.0.1:8089`.
    pub listen: String,
    /// Bearer tokens accepted by the API and the dashboard (read-only); empty = no auth. Default empty.
    #[serde(deserialize_with = "tokens_one_or_many")]
    pub tokens: Vec<Secret>,
    /// Serve `/healthz` and `/readyz` without a token. Default true.
    pub open_health: bool,
    /// Serve `/metrics` without a token. Default true.
    pub open_metrics: bool,
    /// Host names (with or without `:port`) accepted in the `Host` header
    /// while `tokens` is empty, besides the loopback names (`localhost`,
    /// `127.0.0.1`, `[::1]`): without tokens any other `Host` is refused
    /// (403), so a web page cannot reach the API by DNS rebinding. A TOML
    /// array or, from the environment, a comma-separated list. Default empty.
    #[serde(deserialize_with = "strings_one_or_many")]
    pub allowed_hosts: Vec<String>,
    /// Longest wait for a request's head (request line and headers), also
    /// the longest an idle keep-alive connection stays open: slow clients
    /// (slowloris) are cut off after it. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest time one request may take, waiting for a free slot included;
    /// beyond it the answer is 503. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Open connections served at once; further connections wait in the
    /// listen backlog until one closes. Default 512.
    pub max_connections: usize,
    /// `/api/...` requests (ClickHouse queries) run at once; others wait
    /// (within `request_timeout`). Health, `/metrics` and the dashboard
    /// files are not limited. Default 16.
    pub max_concurrent_requests: usize,
    /// ClickHouse `max_execution_time` of every API query (the queries also
    /// run with `readonly = 2`). Default `15s`.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// Longest time range one API request may read (`to - from`); a longer
    /// one is refused with 400. Without `from` / `to` a request reads the
    /// last `max_range` up to the model's newest data. Default `31d`.
    #[serde(with = "humantime_serde")]
    pub max_range: Duration,
    /// Most rows one API query returns; a longer result is cut there and the
    /// response says `"truncated": true` (header `X-Modelwatch-Truncated: true`).
    /// Default 100000.
    pub max_rows: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            listen: "127.0.0.1:8089".into(),
            tokens: Vec::new(),
            open_health: true,
            open_metrics: true,
            allowed_hosts: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 512,
            max_concurrent_requests: 16,
            query_timeout: Duration::from_secs(15),
            max_range: Duration::from_secs(31 * 86400),
            max_rows: 100_000,
        }
    }
}

/// Tokens as a TOML array or, from an environment override, one
/// comma-separated string.
fn tokens_one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.split(',').map(|x| x.trim().to_string()).collect(),
        OneOrMany::Many(v) => v,
    };
    Ok(items
        .into_iter()
        .filter(|t| !t.is_empty())
        .map(Secret)
        .collect())
}

/// A list as a TOML array or, from an environment override, one
/// comma-separated string.
fn strings_one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(tokens_one_or_many(d)?.into_iter().map(|s| s.0).collect())
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[service]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// How often due windows are written and offsets committed. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Log format, `text` or `json`. Default `text`.
    pub log_format: LogFormat,
    /// Log level or filter (`error`, `warn`, `info`, `debug`, `trace`, or a
    /// tracing filter such as `info,rdkafka=warn`); `RUST_LOG`, when set,
    /// wins. Default `info`.
    pub log_level: String,
    /// Most output (window rows, histograms, alerts, dead letters) held
    /// waiting to be written, in bytes; beyond it consumption pauses until
    /// half of it is written (a sink is down or slower than the input).
    /// Default `256MiB`.
    pub max_pending_output: bytesize::ByteSize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            flush_interval: Duration::from_secs(1),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            max_pending_output: bytesize::ByteSize::mib(256),
        }
    }
}

/// Input encoding of the Kafka messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Sniff each message: `{` JSON, `0x00` Confluent Avro, `C3 01` single-object Avro, else raw Avro.
    #[default]
    Auto,
    /// JSON objects with the schema's field names.
    Json,
    /// Raw Avro binary datums written with `schemas/*.avsc`.
    Avro,
    /// Confluent wire format: `0x00`, 4-byte schema id, Avro datum.
    ConfluentAvro,
}

/// `[kafka]` (its `Debug` and `Serialize` mask secret-looking properties,
/// see [`is_secret_property`]).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma separated. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Consumer group id. Default `modelwatch`.
    pub group_id: String,
    /// Prediction events topic. Default `predictions`.
    pub predictions_topic: String,
    /// Ground-truth events topic. Default `ground-truth`.
    pub ground_truth_topic: String,
    /// Outbound alerts topic (Avro AlertEvent). Default `model-alerts`.
    pub alerts_topic: String,
    /// Where undecodable / invalid messages go. Default `modelwatch-dead-letter`.
    pub dead_letter_topic: String,
    /// Message encoding. Default `auto`.
    pub format: Format,
    /// Extra librdkafka properties passed through to every client (e.g. `security.protocol`).
    #[serde(serialize_with = "masked_properties")]
    pub properties: BTreeMap<String, String>,
    /// `[kafka.mapping.predictions]` / `[kafka.mapping.labels]`: where our
    /// fields are in records of the user's own shape (JSON Pointer paths,
    /// constants, headers; README, "Field mapping"). Default: none, each
    /// topic carries our own shape.
    #[serde(skip_serializing_if = "MappingConfig::is_empty")]
    pub mapping: MappingConfig,
    /// `[kafka.schema_registry]`: a Confluent Schema Registry for the writer
    /// schemas of Confluent-framed Avro. Default: none (`url` empty).
    pub schema_registry: SchemaRegistryConfig,
}

/// How alerts are framed on the alerts topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AlertFraming {
    /// The raw Avro `AlertEvent` datum (the contract without a registry).
    #[default]
    Raw,
    /// The Confluent wire format: `0x00`, the id the registry gave our
    /// `AlertEvent` schema under `<alerts_topic>-value`, the datum.
    Confluent,
}

/// `[kafka.schema_registry]` (its `Debug` and `Serialize` mask the password
/// and any credentials in the URL).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaRegistryConfig {
    /// Base URL of the registry's REST API (`http://` or `https://`).
    /// Empty: no registry, the schema id of a Confluent frame is skipped and
    /// the datum read with our schema. Default empty.
    #[serde(serialize_with = "masked_url")]
    pub url: String,
    /// Basic-auth user (Confluent Cloud: the API key). Default empty (no auth).
    pub username: String,
    /// Basic-auth password (or `MODELWATCH_KAFKA__SCHEMA_REGISTRY__PASSWORD`);
    /// never logged. Default empty.
    pub password: Secret,
    /// PEM file of a private CA trusted for an `https://` URL, besides the
    /// built-in roots. Default empty (built-in roots only).
    pub ca_file: String,
    /// Longest one registry request may take. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a registry that fails transiently (unreachable, timeout,
    /// 5xx, 429) is retried, with backoff, for a schema id the service has
    /// not seen yet, before the service stops with an error (nothing is lost:
    /// a restart resumes from the last checkpoint). Must be less than
    /// `max.poll.interval.ms`. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub retry_for: Duration,
    /// Most schema ids held (writer schemas, and ids the registry does not
    /// know); beyond, the oldest is evicted and fetched again when seen
    /// (`modelwatch_registry_schemas_evicted_total`). Default 1000.
    pub max_schemas: usize,
    /// Alerts topic framing: `raw` (the Avro datum) or `confluent` (our
    /// `AlertEvent` schema registered at startup under the subject
    /// `<alerts_topic>-value`, each alert framed with its id; needs `url`).
    /// Default `raw`.
    pub alerts: AlertFraming,
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        SchemaRegistryConfig {
            url: String::new(),
            username: String::new(),
            password: Secret::default(),
            ca_file: String::new(),
            timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(60),
            max_schemas: 1000,
            alerts: AlertFraming::Raw,
        }
    }
}

impl SchemaRegistryConfig {
    /// Whether a registry is configured.
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }

    /// The URL for messages: credentials in it replaced by `***`.
    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for SchemaRegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_via_serialize("SchemaRegistryConfig", self, f)
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "modelwatch".into(),
            predictions_topic: "predictions".into(),
            ground_truth_topic: "ground-truth".into(),
            alerts_topic: "model-alerts".into(),
            dead_letter_topic: "modelwatch-dead-letter".into(),
            format: Format::Auto,
            properties: BTreeMap::new(),
            mapping: MappingConfig::default(),
            schema_registry: SchemaRegistryConfig::default(),
        }
    }
}

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The secret value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"***\"")
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// `[clickhouse]` (its `Debug` and `Serialize` mask the password and any
/// credentials in the URL).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP interface URL. Default `http://127.0.0.1:8123`.
    #[serde(serialize_with = "masked_url")]
    pub url: String,
    /// Database, created by `migrate`. Default `modelwatch`.
    pub database: String,
    /// User. Default `default`.
    pub user: String,
    /// Password (or `MODELWATCH_CLICKHOUSE__PASSWORD`); never logged. Default empty.
    pub password: Secret,
    /// Rows per insert batch. Default 10000.
    pub batch_rows: usize,
    /// Attempts for a transient insert error before giving up. Default 8.
    pub max_retries: u32,
    /// Longest one insert request may take before it is abandoned and
    /// counted as a transient error (retried). Default `30s`: well under
    /// librdkafka's `max.poll.interval.ms` (300 s), so a hung server cannot
    /// hold the consumer loop past it.
    #[serde(with = "humantime_serde")]
    pub insert_timeout: Duration,
    /// PEM file of CA certificates trusted for an `https://` URL, in
    /// addition to the system's CA store (for a private CA or a self-signed
    /// server certificate). Default empty: the system store only.
    pub ca_file: String,
    /// PEM file of the client certificate (chain) presented to a server
    /// that asks for one (mutual TLS); needs `client_key_file`. Default empty.
    pub client_cert_file: String,
    /// PEM file of the private key of `client_cert_file` (PKCS#8, RSA or EC,
    /// unencrypted); needs `client_cert_file`. Default empty.
    pub client_key_file: String,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: "http://127.0.0.1:8123".into(),
            database: "modelwatch".into(),
            user: "default".into(),
            password: Secret::default(),
            batch_rows: 10_000,
            max_retries: 8,
            insert_timeout: Duration::from_secs(30),
            ca_file: String::new(),
            client_cert_file: String::new(),
            client_key_file: String::new(),
        }
    }
}

impl ClickHouseConfig {
    /// The URL for messages: credentials in it replaced by `***`.
    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// The `security.protocol` values this build supports (lower case; librdkafka
/// compares them ignoring case).
pub const KAFKA_SECURITY_PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];

/// The SASL mechanisms this build supports (GSSAPI / Kerberos is not built).
pub const KAFKA_SASL_MECHANISMS: [&str; 4] =
    ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];

/// True when a `[kafka.properties]` key names a secret (passwords, SASL /
/// OAuth secrets and tokens, JAAS configurations, private keys): its value
/// is masked wherever the configuration is printed.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    // The identity provider's address, shown so a wrong one can be spotted.
    if k == "sasl.oauthbearer.token.endpoint.url" {
        return false;
    }
    [
        "password",
        "secret",
        "token",
        "jaas",
        "key.pem",
        "private",
        "credential",
        "oauthbearer.config",
        "api.key",
    ]
    .iter()
    .any(|p| k.contains(p))
}

/// The OAUTHBEARER settings of `[kafka.properties]`: `oidc` (librdkafka
/// fetches and refreshes the token from the identity provider's token
/// endpoint itself, client-credentials grant by default) needs the endpoint
/// as an http(s) URL and, for that grant, the client id and secret;
/// `default` works only with librdkafka's unsecured JWTs, since the service
/// has no token callback of its own.
fn validate_oauthbearer<'a>(get: &impl Fn(&str) -> Option<&'a str>) -> Result<()> {
    let method = get("sasl.oauthbearer.method").unwrap_or("default");
    if method.eq_ignore_ascii_case("default") {
        if get("enable.sasl.oauthbearer.unsecure.jwt").is_none_or(|v| v != "true") {
            bail!(
                "invalid configuration: kafka.properties.\"sasl.mechanism\" = \"OAUTHBEARER\" with kafka.properties.\"sasl.oauthbearer.method\" = \"default\" has no token source, expected \"sasl.oauthbearer.method\" = \"oidc\" with \"sasl.oauthbearer.token.endpoint.url\", \"sasl.oauthbearer.client.id\" and \"sasl.oauthbearer.client.secret\" (or \"enable.sasl.oauthbearer.unsecure.jwt\" = \"true\" for a development broker)"
            );
        }
        return Ok(());
    }
    if !method.eq_ignore_ascii_case("oidc") {
        bail!(
            "invalid configuration: kafka.properties.\"sasl.oauthbearer.method\" = {method:?}, expected \"oidc\" or \"default\""
        );
    }
    // Azure IMDS and the JWT-bearer grant bring their own credentials:
    // librdkafka checks their properties when the client is created.
    if get("sasl.oauthbearer.metadata.authentication.type").is_some_and(|v| v != "none") {
        return Ok(());
    }
    match get("sasl.oauthbearer.token.endpoint.url") {
        None => bail!(
            "invalid configuration: kafka.properties.\"sasl.oauthbearer.method\" = \"oidc\" needs kafka.properties.\"sasl.oauthbearer.token.endpoint.url\", expected the identity provider's token endpoint (https://...)"
        ),
        Some(url) if !(url.starts_with("https://") || url.starts_with("http://")) => bail!(
            "invalid configuration: kafka.properties.\"sasl.oauthbearer.token.endpoint.url\" = {url:?}, expected an https:// (or http://) URL"
        ),
        Some(_) => {}
    }
    let grant = get("sasl.oauthbearer.grant.type").unwrap_or("client_credentials");
    let mut needed = vec!["sasl.oauthbearer.client.id"];
    if grant == "client_credentials" {
        needed.push("sasl.oauthbearer.client.secret");
    }
    for key in needed {
        // librdkafka also takes `sasl.oauthbearer.client.credentials.client.*`.
        let alias = key.replace(".client.", ".client.credentials.client.");
        if get(key).is_none() && get(&alias).is_none() {
            bail!(
                "invalid configuration: kafka.properties.\"sasl.oauthbearer.method\" = \"oidc\" needs kafka.properties.\"{key}\", expected a non-empty string"
            );
        }
    }
    Ok(())
}

/// `url` with the credentials of its authority (`user:password@`) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_owned(),
    }
}

fn masked_properties<S: serde::Serializer>(
    props: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(props.len()))?;
    for (k, v) in props {
        let masked = is_secret_property(k) && !v.is_empty();
        m.serialize_entry(k, if masked { "***" } else { v.as_str() })?;
    }
    m.end()
}

fn masked_url<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// `Debug` of a config section through its (masking) `Serialize`, so a
/// field added later is printed, and masked when it is a secret, without
/// a second list to maintain.
fn debug_via_serialize<T: Serialize>(name: &str, v: &T, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match toml::Value::try_from(v) {
        Ok(toml::Value::Table(t)) => {
            let mut d = f.debug_struct(name);
            for (k, v) in &t {
                d.field(k, &format_args!("{v}"));
            }
            d.finish()
        }
        _ => f.write_str(name),
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_via_serialize("KafkaConfig", self, f)
    }
}

impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_via_serialize("ClickHouseConfig", self, f)
    }
}

impl Config {
    /// Every secret value of this configuration (ClickHouse and Schema
    /// Registry passwords and URL credentials, API tokens, secret Kafka properties, webhook URLs given
    /// inline), for [`redact`] to take out of error messages.
    pub fn secret_values(&self) -> Vec<String> {
        let mut out = vec![
            self.clickhouse.password.expose().to_owned(),
            self.kafka.schema_registry.password.expose().to_owned(),
        ];
        for url in [&self.clickhouse.url, &self.kafka.schema_registry.url] {
            if let (Some(start), redacted) = (url.find("://"), redact_url(url)) {
                if redacted != *url {
                    let authority = &url[start + 3..];
                    if let Some(at) = authority.rfind('@') {
                        let userinfo = &authority[..at];
                        out.push(userinfo.to_owned());
                        if let Some((_, pw)) = userinfo.split_once(':') {
                            out.push(pw.to_owned());
                        }
                    }
                }
            }
        }
        out.extend(self.api.tokens.iter().map(|t| t.expose().to_owned()));
        out.extend(
            self.kafka
                .properties
                .iter()
                .filter(|(k, _)| is_secret_property(k))
                .map(|(_, v)| v.clone()),
        );
        out.extend(
            self.alerts
                .webhooks
                .iter()
                .map(|w| w.url.expose().to_owned()),
        );
        // Longest first, so a value containing another is replaced whole;
        // values too short to be told from ordinary text are left alone.
        out.retain(|v| v.len() >= 4);
        out.sort_by_key(|v| std::cmp::Reverse(v.len()));
        out.dedup();
        out
    }
}

/// `text` with every one of `secrets` replaced by `***`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), "***"))
}

/// `[windows]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowsConfig {
    /// Tumbling window sizes. Default `["5m"]`.
    #[serde(with = "humantime_serde_vec")]
    pub sizes: Vec<Duration>,
    /// How far behind the newest event time the watermark trails. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// After this long without input the watermark follows the wall clock. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a prediction waits for its label. Default `24h`.
    #[serde(with = "humantime_serde")]
    pub label_horizon: Duration,
    /// How long a label waits for its prediction. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub early_label_ttl: Duration,
    /// Least event time between two revisions of a window's performance rows
    /// while labels arrive. Default `1m`.
    #[serde(with = "humantime_serde")]
    pub revision_interval: Duration,
}

impl Default for WindowsConfig {
    fn default() -> Self {
        WindowsConfig {
            sizes: vec![Duration::from_secs(300)],
            allowed_lateness: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            label_horizon: Duration::from_secs(24 * 3600),
            early_label_ttl: Duration::from_secs(600),
            revision_interval: Duration::from_secs(60),
        }
    }
}

mod humantime_serde_vec {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let items = match OneOrMany::deserialize(d)? {
            // An environment override gives one string: "5m,1h".
            OneOrMany::One(s) => s.split(',').map(|x| x.trim().to_string()).collect(),
            OneOrMany::Many(v) => v,
        };
        items
            .iter()
            .map(|s| {
                humantime::parse_duration(s).map_err(|e| {
                    serde::de::Error::custom(format!(
                        "invalid duration {s:?} ({e}): expected e.g. \"5m\" or \"1h\""
                    ))
                })
            })
            .collect()
    }
}

/// `[drift]`: how drift is measured against the reference profile.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftSettings {
    /// Equal-frequency bins from the reference quantiles for numeric features. Default 10.
    pub bins: usize,
    /// Without an imported reference, the first N events of a version become its reference. Default 1000.
    pub reference_size: usize,
    /// PSI at or above which a feature counts as drifted. Default 0.2.
    pub psi_threshold: f64,
    /// Jensen-Shannon distance at or above which a feature counts as drifted. Default 0.1.
    pub js_threshold: f64,
    /// Fewer window samples than this and no drift decision is made. Default 30.
    pub min_samples: u64,
    /// Drift method of features without an entry in `methods`: `auto`, `ks`,
    /// `chi_square`, `wasserstein`, `jensen_shannon` or `psi`. `auto` picks
    /// KS / chi-square for references of at most `large_reference_rows`
    /// rows and normed Wasserstein / Jensen-Shannon above (Evidently's
    /// rules). Default `auto`.
    pub method: DriftMethod,
    /// Per-feature methods, e.g. `[drift.methods]` `amount = "psi"`
    /// (`__prediction__` included). Default none.
    pub methods: BTreeMap<String, DriftMethod>,
    /// Normed Wasserstein distance at or above which a numeric feature counts
    /// as drifted (method `wasserstein`). Default 0.1.
    pub wasserstein_threshold: f64,
    /// Reference rows of a feature above which `auto` decides on a distance
    /// instead of a test. Default 1000.
    pub large_reference_rows: u64,
    /// Benjamini-Hochberg-adjusted p-value below which a large shift is not
    /// chance (every method also needs it). Default 0.05.
    pub p_value_threshold: f64,
    /// The first N labels of a version, taken from its first final windows
    /// by prediction time (order-independent), form its reference label
    /// distribution (label drift, `__label__`). Default 1000.
    pub label_reference_size: usize,
}

impl Default for DriftSettings {
    fn default() -> Self {
        DriftSettings {
            bins: 10,
            reference_size: 1000,
            psi_threshold: 0.2,
            js_threshold: 0.1,
            min_samples: 30,
            method: DriftMethod::Auto,
            methods: BTreeMap::new(),
            wasserstein_threshold: 0.1,
            large_reference_rows: 1000,
            p_value_threshold: 0.05,
            label_reference_size: 1000,
        }
    }
}

/// `[limits]`: cardinality caps; the excess folds into `__other__`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Distinct values per segment key. Default 50.
    pub max_segment_values: usize,
    /// Distinct models. Default 1000.
    pub max_models: usize,
    /// Distinct versions per model. Default 20.
    pub max_versions_per_model: usize,
    /// Distinct categories per categorical feature in a reference profile. Default 200.
    pub max_categories: usize,
    /// Most pending predictions kept waiting for labels; beyond it the oldest expire early. Default 10000000.
    pub max_pending: usize,
    /// How far ahead of the wall clock an event's timestamp may be; a later
    /// one is dead-lettered (kind `timestamp`), so one event dated in the
    /// future cannot move the watermark past all live traffic. Default `1h`.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// How far behind the wall clock an event's timestamp may be; an older
    /// one is dead-lettered (kind `timestamp`). Raise it to replay history.
    /// Default `365days`.
    #[serde(with = "humantime_serde")]
    pub max_event_age: Duration,
    /// Most features per event (and entries of `class_probabilities`); a
    /// larger event is dead-lettered (kind `limit`). Also the most distinct
    /// features a version's reference profile learns: later ones are
    /// ignored (counted). Default 500.
    pub max_features: usize,
    /// Most segment keys per event (a larger event is dead-lettered, kind
    /// `limit`) and distinct segment keys per model (a new key beyond them
    /// is ignored, counted). Default 10.
    pub max_segment_keys: usize,
    /// Longest string of an event in bytes (request id, model, version,
    /// feature names and string values, segment keys and values, labels);
    /// a longer one makes the event a dead letter (kind `limit`). Default 1024.
    pub max_identifier_bytes: usize,
    /// Distinct values a categorical feature counts while its reference is
    /// built (the profile keeps the `max_categories` most frequent); later
    /// new values are left out of the reference (counted). Default 10000.
    pub max_reference_categories: usize,
    /// Most labels waiting for their prediction; beyond it the one expiring
    /// soonest becomes an orphan early (counted). Default 1000000.
    pub max_early_labels: usize,
    /// Most pending predictions of one (model, version); beyond it the
    /// version's new predictions are not kept waiting for a label (counted
    /// as expired at once), so one model's flood cannot push the others'
    /// predictions out of `max_pending`. Default 5000000.
    pub max_pending_per_model: usize,
    /// Most alert series (rule, model, version, segment, feature) tracked;
    /// beyond it resolved series that were quiet longest are forgotten
    /// first, and a new series finds no room only when every tracked one
    /// is firing (counted). Default 100000.
    pub max_alert_series: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_segment_values: 50,
            max_models: 1000,
            max_versions_per_model: 20,
            max_categories: 200,
            max_pending: 10_000_000,
            max_future_skew: Duration::from_secs(3600),
            max_event_age: Duration::from_secs(365 * 86_400),
            max_features: 500,
            max_segment_keys: 10,
            max_identifier_bytes: 1024,
            max_reference_categories: 10_000,
            max_early_labels: 1_000_000,
            max_pending_per_model: 5_000_000,
            max_alert_series: 100_000,
        }
    }
}

/// Task type of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Binary classification (`score`, labels 0/1 or false/true).
    Binary,
    /// Multiclass classification (`predicted_label`, `class_probabilities`).
    Multiclass,
    /// Regression (`predicted_value`, `actual_value`).
    Regression,
}

/// `[models.<model_id>]`: overrides of what is inferred from events.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Task type; inferred from the events when absent.
    pub task: Option<TaskKind>,
    /// Positive class label for binary classifiers. Default `1` (also matches `true`).
    pub positive_label: Option<String>,
    /// Score threshold for the predicted class when no `predicted_label` is sent. Default 0.5.
    pub threshold: Option<f64>,
    /// Business baselines per metric, e.g. `accuracy = 0.92`.
    pub baseline: BTreeMap<String, f64>,
}

/// Comparison operator of a threshold rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Operator {
    /// value > threshold
    #[serde(rename = ">")]
    Gt,
    /// value >= threshold
    #[serde(rename = ">=")]
    Ge,
    /// value < threshold
    #[serde(rename = "<")]
    Lt,
    /// value <= threshold
    #[serde(rename = "<=")]
    Le,
}

impl Operator {
    /// True when `value <op> threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Operator::Gt => value > threshold,
            Operator::Ge => value >= threshold,
            Operator::Lt => value < threshold,
            Operator::Le => value <= threshold,
        }
    }
    /// The symbol.
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Gt => ">",
            Operator::Ge => ">=",
            Operator::Lt => "<",
            Operator::Le => "<=",
        }
    }
}

/// `[alerts]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Built-in rules (README, "Alerts"): feature and prediction drift,
    /// performance drop against `[models.<id>.baseline]`, label coverage drop,
    /// missing-value spike, volume drop and spike, latency p99. Default true.
    pub default_rules: bool,
    /// Names of built-in rules to switch off, e.g. `["volume_spike"]`. Default empty.
    pub disabled_rules: Vec<String>,
    /// Rate metrics fire only when their Wilson confidence interval clears the
    /// threshold; drift metrics only when `drift_detected` says so. Default true.
    pub statistical_gate: bool,
    /// Confidence level of the gate's intervals. Default 0.95.
    pub confidence: f64,
    /// Consecutive clear windows before a firing alert resolves (rules may override). Default 2.
    pub resolve_after: u32,
    /// Allowed drop of a rate below its business baseline before the built-in
    /// baseline rule warns (twice this: critical); error metrics use it as a
    /// relative rise (x 10). Default 0.02.
    pub baseline_tolerance: f64,
    /// Alerts waiting per webhook; when full the oldest is dropped (counted, logged). Default 1000.
    pub queue_capacity: usize,
    /// User rules, `[[alerts.rules]]`.
    pub rules: Vec<RuleConfig>,
    /// Notification endpoints, `[[alerts.webhooks]]`.
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            default_rules: true,
            disabled_rules: Vec::new(),
            statistical_gate: true,
            confidence: 0.95,
            resolve_after: 2,
            baseline_tolerance: 0.02,
            queue_capacity: 1000,
            rules: Vec::new(),
            webhooks: Vec::new(),
        }
    }
}

/// What a rule compares the window's value with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConditionKind {
    /// `value <op> threshold`.
    #[default]
    Threshold,
    /// `change(value, baseline) <op> threshold`, baseline from the rule or `[models.<id>.baseline]`.
    Baseline,
    /// `change(value, previous window's value) <op> threshold`.
    PreviousWindow,
    /// `change(value, same window of version compare_version) <op> threshold`.
    Version,
}

impl ConditionKind {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionKind::Threshold => "threshold",
            ConditionKind::Baseline => "baseline",
            ConditionKind::PreviousWindow => "previous_window",
            ConditionKind::Version => "version",
        }
    }
}

/// How a change against a reference value is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// `value - reference`.
    #[default]
    Absolute,
    /// `(value - reference) / |reference|`.
    Relative,
}

/// One rule, `[[alerts.rules]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique rule name; the name of a built-in rule replaces it.
    pub name: String,
    /// Metric name (README, "Metrics").
    pub metric: String,
    /// Model id or `*` (default).
    #[serde(default = "star")]
    pub model: String,
    /// Model version or `*` (default).
    #[serde(default = "star")]
    pub version: String,
    /// Feature or `*` (every real feature, not `__prediction__` / `__label__`);
    /// absent means model-level rows (feature `''`).
    #[serde(default)]
    pub feature: Option<String>,
    /// Segment (`''` all traffic, `key=value`, or `*`). Default `''`.
    #[serde(default)]
    pub segment: String,
    /// `threshold` (default), `baseline`, `previous_window` or `version`.
    #[serde(default)]
    pub condition: ConditionKind,
    /// For change conditions: `absolute` (default) or `relative`.
    #[serde(default)]
    pub change: ChangeKind,
    /// For `condition = "baseline"`: the baseline; default `[models.<id>.baseline].<metric>`.
    #[serde(default)]
    pub baseline: Option<f64>,
    /// For `condition = "version"`: the version compared with (e.g. the champion).
    #[serde(default)]
    pub compare_version: Option<String>,
    /// Comparison operator.
    pub operator: Operator,
    /// Threshold at which the rule fires with `severity`.
    pub threshold: f64,
    /// Severity at `threshold`. Default `warning`.
    #[serde(default)]
    pub severity: Severity,
    /// A stricter threshold at which the alert is `critical` (optional).
    #[serde(default)]
    pub critical_threshold: Option<f64>,
    /// Consecutive breaching windows before firing. Default 1.
    #[serde(default = "one_u32")]
    pub for_windows: u32,
    /// Consecutive clear windows before resolving. Default `alerts.resolve_after`.
    #[serde(default)]
    pub resolve_after: Option<u32>,
    /// Rows with fewer samples neither fire nor clear. Default 1.
    #[serde(default = "one")]
    pub min_samples: u64,
    /// After resolving, the series stays quiet for windows starting within this
    /// much event time. Default `0s`.
    #[serde(default, with = "humantime_serde")]
    pub cooldown: Duration,
    /// Evaluate a window only once the watermark is this far past its end
    /// (for metrics that grow as labels arrive). Default `0s`.
    #[serde(default, with = "humantime_serde")]
    pub settle: Duration,
    /// Apply the statistical gate (default `alerts.statistical_gate`).
    #[serde(default)]
    pub gate: Option<bool>,
}

/// Notification format of a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookKind {
    /// The AlertEvent as JSON, signed with HMAC-SHA256 when a secret is set.
    Generic,
    /// Slack incoming webhook (`{"text": ...}`); the URL is the secret.
    Slack,
    /// PagerDuty Events API v2; the secret is the routing key; dedup key = alert id.
    Pagerduty,
    /// Jira: creates an issue per firing alert; the secret is the API token.
    Jira,
}

impl WebhookKind {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookKind::Generic => "generic",
            WebhookKind::Slack => "slack",
            WebhookKind::Pagerduty => "pagerduty",
            WebhookKind::Jira => "jira",
        }
    }
}

/// One notification endpoint, `[[alerts.webhooks]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique name (used in logs and the delivery log; the URL never is).
    pub name: String,
    /// `generic`, `slack`, `pagerduty` or `jira`.
    pub kind: WebhookKind,
    /// Endpoint URL (Jira: the base URL of the site). Or use `url_env`.
    #[serde(default)]
    pub url: Secret,
    /// Environment variable holding the URL (Slack URLs are secrets).
    #[serde(default)]
    pub url_env: Option<String>,
    /// Environment variable holding the secret (HMAC key, routing key, API token).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// File holding the secret (trailing whitespace trimmed).
    #[serde(default)]
    pub secret_file: Option<String>,
    /// Least severity sent. Default `warning`.
    #[serde(default)]
    pub min_severity: Severity,
    /// Only these rules (empty: every rule). Default empty.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Send resolutions too (Jira never does). Default true.
    #[serde(default = "yes")]
    pub send_resolved: bool,
    /// Per-request timeout. Default `10s`.
    #[serde(default = "ten_seconds", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per alert, the first included; 5xx, 429, timeouts and
    /// connection errors are retried. Default 5.
    #[serde(default = "five")]
    pub max_attempts: u32,
    /// First retry backoff (doubles, with jitter, up to 60 s). Default `1s`.
    #[serde(default = "one_second", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Jira project key.
    #[serde(default)]
    pub jira_project: Option<String>,
    /// Jira issue type. Default `Bug`.
    #[serde(default)]
    pub jira_issue_type: Option<String>,
    /// Jira user for basic auth (Jira Cloud: the account e-mail); absent: bearer token.
    #[serde(default)]
    pub jira_user: Option<String>,
}

impl WebhookConfig {
    /// The endpoint URL and secret, from the config, `env` and files. Errors
    /// name the webhook and the missing source, never the value.
    pub fn resolve(&self, env: &HashMap<String, String>) -> Result<(String, Option<Secret>)> {
        let url = match &self.url_env {
            Some(var) => env.get(var).cloned().with_context(|| {
                format!(
                    "alerts.webhooks.{}: environment variable {var} (url_env) is not set",
                    self.name
                )
            })?,
            None => self.url.expose().to_owned(),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!(
                "alerts.webhooks.{}: the URL must start with http:// or https://",
                self.name
            );
        }
        let secret = match (&self.secret_env, &self.secret_file) {
            (Some(var), _) => Some(env.get(var).cloned().with_context(|| {
                format!(
                    "alerts.webhooks.{}: environment variable {var} (secret_env) is not set",
                    self.name
                )
            })?),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| {
                        format!(
                            "alerts.webhooks.{}: cannot read secret_file {path}",
                            self.name
                        )
                    })?
                    .trim_end()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let needs_secret = matches!(self.kind, WebhookKind::Pagerduty | WebhookKind::Jira);
        if needs_secret && secret.as_deref().is_none_or(str::is_empty) {
            bail!(
                "alerts.webhooks.{}: a {} webhook needs secret_env or secret_file",
                self.name,
                self.kind.as_str()
            );
        }
        Ok((url, secret.map(Secret)))
    }
}

fn star() -> String {
    "*".into()
}
fn one() -> u64 {
    1
}
fn one_u32() -> u32 {
    1
}
fn five() -> u32 {
    5
}
fn yes() -> bool {
    true
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn one_second() -> Duration {
    Duration::from_secs(1)
}

/// Builds the configuration from an optional TOML file and an environment map
/// (only `MODELWATCH_*` entries are read).
pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Config> {
    let mut root: toml::Table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            text.parse()
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?
        }
        None => toml::Table::new(),
    };
    // Only MODELWATCH_<SECTION>__<KEY> variables are configuration; others
    // with the prefix (MODELWATCH_CONFIG, the deploy scripts' settings) are not.
    let mut keys: Vec<_> = env
        .keys()
        .filter(|k| k.starts_with("MODELWATCH_") && k.contains("__"))
        .collect();
    keys.sort();
    for key in keys {
        apply_env_override(&mut root, key, &env[key])?;
    }
    let cfg: Config = Config::deserialize(toml::Value::Table(root))
        .map_err(|e| anyhow::anyhow!("invalid configuration: {}", e.to_string().trim()))?;
    cfg.validate()?;
    Ok(cfg)
}

/// `MODELWATCH_KAFKA__BROKERS=x` sets `kafka.brokers = "x"`. The value is
/// parsed as a TOML value when it is one (numbers, booleans, arrays), else
/// taken as a string.
fn apply_env_override(root: &mut toml::Table, key: &str, raw: &str) -> Result<()> {
    let path: Vec<String> = key["MODELWATCH_".len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(String::is_empty) {
        bail!("environment variable {key}: expected MODELWATCH_<SECTION>__<KEY>");
    }
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    };
    // Keys that are strings in the schema stay strings even if they look numeric.
    let value = match (&value, path.last().map(String::as_str)) {
        (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_), Some(k))
            if STRING_KEYS.contains(&k) =>
        {
            toml::Value::String(raw.into())
        }
        _ => value,
    };
    // librdkafka property names are dotted and never hold `_`, which the
    // environment cannot carry: `MODELWATCH_KAFKA__PROPERTIES__SASL_PASSWORD`
    // sets `kafka.properties."sasl.password"`.
    // Every property value is a string, whatever it looks like.
    let mut path = path;
    let mut value = value;
    if path.len() == 3 && path[0] == "kafka" && path[1] == "properties" {
        path[2] = path[2].replace('_', ".");
        value = toml::Value::String(raw.into());
    }
    let mut table = root;
    for part in &path[..path.len() - 1] {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("environment variable {key}: {part} is not a section"),
        };
    }
    table.insert(path[path.len() - 1].clone(), value);
    Ok(())
}

const STRING_KEYS: &[&str] = &[
    "brokers",
    "group_id",
    "password",
    "user",
    "database",
    "url",
    "predictions_topic",
    "ground_truth_topic",
    "alerts_topic",
    "dead_letter_topic",
    "username",
    "ca_file",
    "listen",
    "tokens",
    "allowed_hosts",
];

impl Config {
    /// Checks values serde cannot: ranges, non-empty names, URLs.
    pub fn validate(&self) -> Result<()> {
        let k = &self.kafka;
        for (name, v) in [
            ("kafka.brokers", &k.brokers),
            ("kafka.group_id", &k.group_id),
            ("kafka.predictions_topic", &k.predictions_topic),
            ("kafka.ground_truth_topic", &k.ground_truth_topic),
            ("kafka.alerts_topic", &k.alerts_topic),
            ("kafka.dead_letter_topic", &k.dead_letter_topic),
            ("clickhouse.database", &self.clickhouse.database),
        ] {
            if v.trim().is_empty() {
                bail!("invalid configuration: {name} is empty, expected a non-empty string");
            }
        }
        if k.predictions_topic == k.ground_truth_topic {
            bail!("invalid configuration: kafka.ground_truth_topic must differ from kafka.predictions_topic");
        }
        crate::sinks::clickhouse_tls::check(&self.clickhouse)
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        if !self
            .clickhouse
            .database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            bail!(
                "invalid configuration: clickhouse.database = {:?}, expected letters, digits and _",
                self.clickhouse.database
            );
        }
        if self.api.enabled && self.api.listen.parse::<std::net::SocketAddr>().is_err() {
            bail!(
                "invalid configuration: api.listen = {:?}, expected an address such as \"127.0.0.1:8089\"",
                self.api.listen
            );
        }
        self.validate_api()?;
        if self.clickhouse.batch_rows == 0 {
            bail!("invalid configuration: clickhouse.batch_rows must be at least 1");
        }
        self.validate_insert_timeout()?;
        self.validate_kafka_security()?;
        if let Err(e) = Mappings::compile(&k.mapping, k.format, k.schema_registry.enabled()) {
            bail!("invalid configuration: {e}");
        }
        self.validate_schema_registry()?;
        let w = &self.windows;
        if w.sizes.is_empty() {
            bail!("invalid configuration: windows.sizes is empty, expected at least one size such as \"5m\"");
        }
        for s in &w.sizes {
            if s.as_secs() == 0 || s.subsec_nanos() != 0 || s.as_secs() > 7 * 86400 {
                bail!(
                    "invalid configuration: windows.sizes contains {}, expected whole seconds between 1s and 7d",
                    humantime::format_duration(*s)
                );
            }
        }
        if w.label_horizon.is_zero() {
            bail!("invalid configuration: windows.label_horizon must be positive");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.service.log_level).is_err() {
            bail!(
                "invalid configuration: service.log_level = {:?}, expected error, warn, info, debug, trace or a tracing filter",
                self.service.log_level
            );
        }
        if self.service.flush_interval.is_zero() {
            bail!("invalid configuration: service.flush_interval must be positive");
        }
        if w.idle_timeout.is_zero() {
            bail!("invalid configuration: windows.idle_timeout must be positive");
        }
        if self.state.dir.as_os_str().is_empty() {
            bail!("invalid configuration: state.dir is empty, expected a directory path such as \"/var/lib/modelwatch\"");
        }
        if self.state.max_hot_requests() < 1000 {
            bail!(
                "invalid configuration: state.memory_budget = {}, expected at least {} (1000 requests)",
                self.state.memory_budget,
                bytesize::ByteSize::b(1000 * JOIN_BYTES_PER_REQUEST)
            );
        }
        if self.state.checkpoint_interval.is_zero() {
            bail!(
                "invalid configuration: state.checkpoint_interval must be positive, such as \"5s\""
            );
        }
        let d = &self.drift;
        if !(2..=1000).contains(&d.bins) {
            bail!(
                "invalid configuration: drift.bins = {}, expected 2..=1000",
                d.bins
            );
        }
        if d.reference_size < 10 {
            bail!(
                "invalid configuration: drift.reference_size = {}, expected at least 10",
                d.reference_size
            );
        }
        if d.label_reference_size < 10 {
            bail!(
                "invalid configuration: drift.label_reference_size = {}, expected at least 10",
                d.label_reference_size
            );
        }
        if !(d.p_value_threshold > 0.0 && d.p_value_threshold < 1.0) {
            bail!(
                "invalid configuration: drift.p_value_threshold = {}, expected a number between 0 and 1",
                d.p_value_threshold
            );
        }
        for (name, v) in [
            ("drift.psi_threshold", d.psi_threshold),
            ("drift.js_threshold", d.js_threshold),
            ("drift.wasserstein_threshold", d.wasserstein_threshold),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("invalid configuration: {name} = {v}, expected a positive number");
            }
        }
        let l = &self.limits;
        for (name, v) in [
            ("limits.max_segment_values", l.max_segment_values),
            ("limits.max_models", l.max_models),
            ("limits.max_versions_per_model", l.max_versions_per_model),
            ("limits.max_categories", l.max_categories),
            ("limits.max_pending", l.max_pending),
            ("limits.max_features", l.max_features),
            ("limits.max_segment_keys", l.max_segment_keys),
            ("limits.max_identifier_bytes", l.max_identifier_bytes),
            (
                "limits.max_reference_categories",
                l.max_reference_categories,
            ),
            ("limits.max_early_labels", l.max_early_labels),
            ("limits.max_pending_per_model", l.max_pending_per_model),
            ("limits.max_alert_series", l.max_alert_series),
        ] {
            if v == 0 {
                bail!("invalid configuration: {name} must be at least 1");
            }
        }
        for (name, d) in [
            ("limits.max_future_skew", l.max_future_skew),
            ("limits.max_event_age", l.max_event_age),
        ] {
            if d.is_zero() {
                bail!("invalid configuration: {name} must be positive (e.g. \"1h\")");
            }
        }
        for (model, m) in &self.models {
            if let Some(t) = m.threshold {
                if !(0.0..=1.0).contains(&t) {
                    bail!("invalid configuration: models.{model}.threshold = {t}, expected 0..=1");
                }
            }
        }
        self.validate_alerts()?;
        Ok(())
    }

    /// Checks `[api]`: timeouts, limits and allowed hosts.
    fn validate_api(&self) -> Result<()> {
        let a = &self.api;
        for (name, d) in [
            ("api.header_read_timeout", a.header_read_timeout),
            ("api.request_timeout", a.request_timeout),
            ("api.query_timeout", a.query_timeout),
        ] {
            if d.is_zero() {
                bail!("invalid configuration: {name} must be positive, such as \"10s\"");
            }
        }
        if a.query_timeout.as_secs() == 0 {
            bail!("invalid configuration: api.query_timeout must be at least 1s (ClickHouse max_execution_time is in seconds)");
        }
        if a.max_range.as_secs() == 0 || a.max_range.as_secs() > u64::from(u32::MAX) {
            bail!("invalid configuration: api.max_range = {}, expected a duration from 1s to 100 years, such as \"31d\"", humantime::format_duration(a.max_range));
        }
        for (name, v) in [
            ("api.max_connections", a.max_connections as u64),
            (
                "api.max_concurrent_requests",
                a.max_concurrent_requests as u64,
            ),
            ("api.max_rows", a.max_rows),
        ] {
            if v == 0 {
                bail!("invalid configuration: {name} must be at least 1");
            }
        }
        for h in &a.allowed_hosts {
            if h.is_empty() || h.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
                bail!("invalid configuration: api.allowed_hosts contains {h:?}, expected host names such as \"modelwatch.example.org\" or \"10.0.0.5:8089\"");
            }
        }
        Ok(())
    }

    /// Checks `[alerts]`: rule names, metrics, thresholds and what each
    /// condition needs; webhook names, URLs and Jira settings.
    /// `clickhouse.insert_timeout` must be positive and shorter than the
    /// consumer's `max.poll.interval.ms` (librdkafka default 300 s, or the
    /// `[kafka.properties]` override): a flush waiting on one insert longer
    /// than that would make the broker evict the consumer from its group.
    fn validate_insert_timeout(&self) -> Result<()> {
        let t = self.clickhouse.insert_timeout;
        let poll_ms = self.max_poll_interval_ms()?;
        if t.is_zero() || t.as_millis() >= u128::from(poll_ms) {
            bail!(
                "invalid configuration: clickhouse.insert_timeout = {:?}, expected more than 0 and less than max.poll.interval.ms ({poll_ms} ms), e.g. \"30s\"",
                humantime::format_duration(t).to_string()
            );
        }
        Ok(())
    }

    /// The consumer's `max.poll.interval.ms` (librdkafka default 300 s, or
    /// the `[kafka.properties]` override).
    fn max_poll_interval_ms(&self) -> Result<u64> {
        match self.kafka.properties.get("max.poll.interval.ms") {
            Some(v) => v.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "invalid configuration: kafka.properties.\"max.poll.interval.ms\" = {v:?}, expected milliseconds"
                )
            }),
            None => Ok(300_000),
        }
    }

    /// Checks `[kafka.schema_registry]`: URL scheme, credentials in pairs,
    /// a readable `ca_file`, positive timeouts, `retry_for` under
    /// `max.poll.interval.ms`, `max_schemas` at least 1, and a URL when
    /// alerts are Confluent-framed.
    fn validate_schema_registry(&self) -> Result<()> {
        let r = &self.kafka.schema_registry;
        let bad =
            |what: &str| anyhow::anyhow!("invalid configuration: kafka.schema_registry.{what}");
        if !r.enabled() {
            if r.alerts == AlertFraming::Confluent {
                return Err(bad(
                    "alerts = \"confluent\" needs kafka.schema_registry.url (the registry that gives the AlertEvent schema its id)",
                ));
            }
            return Ok(());
        }
        let url = r.url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || url.contains(char::is_whitespace)
        {
            return Err(bad(&format!(
                "url = {:?}, expected an http:// or https:// URL",
                r.display_url()
            )));
        }
        if r.username.is_empty() != r.password.expose().is_empty() {
            return Err(bad(
                "username and password: set both (basic auth) or neither",
            ));
        }
        if !r.ca_file.is_empty() {
            if !url.starts_with("https://") {
                return Err(bad(&format!(
                    "ca_file = {:?} is set but url is not https://",
                    r.ca_file
                )));
            }
            std::fs::read(&r.ca_file)
                .map_err(|e| bad(&format!("ca_file = {:?} is not readable: {e}", r.ca_file)))?;
        }
        if r.timeout.is_zero() {
            return Err(bad("timeout = \"0s\", expected more than 0, e.g. \"10s\""));
        }
        let poll_ms = self.max_poll_interval_ms()?;
        if r.retry_for.is_zero() || r.retry_for.as_millis() >= u128::from(poll_ms) {
            return Err(bad(&format!(
                "retry_for = {:?}, expected more than 0 and less than max.poll.interval.ms ({poll_ms} ms), e.g. \"60s\"",
                humantime::format_duration(r.retry_for).to_string()
            )));
        }
        if r.max_schemas == 0 {
            return Err(bad("max_schemas = 0, expected at least 1, e.g. 1000"));
        }
        Ok(())
    }

    /// Checks the security settings of `[kafka.properties]` before
    /// librdkafka sees them: `security.protocol` and `sasl.mechanism` among
    /// the values this build supports, their companions present (a username
    /// and password for PLAIN / SCRAM, a client key with a client
    /// certificate), and certificate files readable. Never prints a value of
    /// a secret property.
    fn validate_kafka_security(&self) -> Result<()> {
        let props = &self.kafka.properties;
        let get = |k: &str| props.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let protocol = match get("security.protocol") {
            None => "plaintext".to_owned(),
            Some(v) => {
                let p = v.to_ascii_lowercase();
                if !KAFKA_SECURITY_PROTOCOLS.contains(&p.as_str()) {
                    bail!(
                        "invalid configuration: kafka.properties.\"security.protocol\" = {v:?}, expected one of {}",
                        KAFKA_SECURITY_PROTOCOLS.map(str::to_ascii_uppercase).join(", ")
                    );
                }
                p
            }
        };
        let sasl = protocol.starts_with("sasl_");
        // librdkafka takes both spellings; two different values are ambiguous.
        let mechanism = match (get("sasl.mechanism"), get("sasl.mechanisms")) {
            (Some(a), Some(b)) if a != b => bail!(
                "invalid configuration: kafka.properties sets both \"sasl.mechanism\" = {a:?} and \"sasl.mechanisms\" = {b:?}, expected one of them"
            ),
            (a, b) => a.or(b),
        };
        match (sasl, mechanism) {
            (true, None) => bail!(
                "invalid configuration: kafka.properties.\"security.protocol\" = {:?} needs kafka.properties.\"sasl.mechanism\", expected one of {}",
                protocol.to_ascii_uppercase(),
                KAFKA_SASL_MECHANISMS.join(", ")
            ),
            (false, Some(m)) => bail!(
                "invalid configuration: kafka.properties.\"sasl.mechanism\" = {m:?} is set but kafka.properties.\"security.protocol\" = {:?}, expected SASL_SSL or SASL_PLAINTEXT",
                protocol.to_ascii_uppercase()
            ),
            (true, Some(m)) => {
                let upper = m.to_ascii_uppercase();
                if upper == "GSSAPI" {
                    bail!(
                        "invalid configuration: kafka.properties.\"sasl.mechanism\" = \"GSSAPI\" (Kerberos) is not built into this binary, expected one of {}",
                        KAFKA_SASL_MECHANISMS.join(", ")
                    );
                }
                if !KAFKA_SASL_MECHANISMS.contains(&upper.as_str()) {
                    bail!(
                        "invalid configuration: kafka.properties.\"sasl.mechanism\" = {m:?}, expected one of {}",
                        KAFKA_SASL_MECHANISMS.join(", ")
                    );
                }
                if upper == "OAUTHBEARER" {
                    validate_oauthbearer(&get)?;
                } else {
                    for key in ["sasl.username", "sasl.password"] {
                        if get(key).is_none() {
                            bail!(
                                "invalid configuration: kafka.properties.\"sasl.mechanism\" = {m:?} needs kafka.properties.\"{key}\", expected a non-empty string"
                            );
                        }
                    }
                }
            }
            (false, None) => {}
        }
        match (get("ssl.certificate.location"), get("ssl.key.location")) {
            (Some(_), None) => bail!(
                "invalid configuration: kafka.properties.\"ssl.certificate.location\" needs kafka.properties.\"ssl.key.location\", expected the client certificate's private key file"
            ),
            (None, Some(_)) => bail!(
                "invalid configuration: kafka.properties.\"ssl.key.location\" needs kafka.properties.\"ssl.certificate.location\", expected the client certificate file"
            ),
            _ => {}
        }
        for key in [
            "ssl.ca.location",
            "ssl.certificate.location",
            "ssl.key.location",
            "ssl.crl.location",
            "ssl.keystore.location",
            "https.ca.location",
        ] {
            // `probe`: librdkafka looks for the system's CA store itself.
            if let Some(path) = get(key).filter(|p| *p != "probe") {
                if let Err(e) = std::fs::metadata(path) {
                    bail!(
                        "invalid configuration: kafka.properties.\"{key}\" = {path:?} cannot be read ({e}), expected a readable file or directory"
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_alerts(&self) -> Result<()> {
        let a = &self.alerts;
        if !(a.confidence > 0.5 && a.confidence < 1.0) {
            bail!(
                "invalid configuration: alerts.confidence = {}, expected a level between 0.5 and 1 (e.g. 0.95)",
                a.confidence
            );
        }
        if a.resolve_after == 0 {
            bail!("invalid configuration: alerts.resolve_after must be at least 1");
        }
        if !(a.baseline_tolerance.is_finite() && a.baseline_tolerance >= 0.0) {
            bail!(
                "invalid configuration: alerts.baseline_tolerance = {}, expected a non-negative number",
                a.baseline_tolerance
            );
        }
        if a.queue_capacity == 0 {
            bail!("invalid configuration: alerts.queue_capacity must be at least 1");
        }
        for name in &a.disabled_rules {
            if !crate::alerting::BUILTIN_RULES.contains(&name.as_str()) {
                bail!(
                    "invalid configuration: alerts.disabled_rules: {name:?} is not a built-in rule, expected one of: {}",
                    crate::alerting::BUILTIN_RULES.join(", ")
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        for r in &a.rules {
            let at = |what: &str| format!("invalid configuration: alerts.rules.{}: {what}", r.name);
            if r.name.is_empty() {
                bail!("invalid configuration: alerts.rules: a rule has an empty name");
            }
            if !names.insert(&r.name) {
                bail!(
                    "invalid configuration: alerts.rules: duplicate rule name {:?}",
                    r.name
                );
            }
            if !crate::metrics::names::is_known(&r.metric) {
                bail!(
                    "{} = {:?}, expected one of: {}",
                    at("metric"),
                    r.metric,
                    crate::metrics::names::ALL.join(", ")
                );
            }
            if !r.threshold.is_finite() {
                bail!("{}", at("threshold must be a finite number"));
            }
            if let Some(c) = r.critical_threshold {
                if !c.is_finite() {
                    bail!("{}", at("critical_threshold must be a finite number"));
                }
                // The critical threshold must be at least as strict as the warning one.
                let stricter = match r.operator {
                    Operator::Gt | Operator::Ge => c >= r.threshold,
                    Operator::Lt | Operator::Le => c <= r.threshold,
                };
                if !stricter {
                    bail!(
                        "{}",
                        at(&format!(
                            "critical_threshold {c} must be at least as strict as threshold {} for operator {}",
                            r.threshold,
                            r.operator.as_str()
                        ))
                    );
                }
            }
            if r.for_windows == 0 {
                bail!("{}", at("for_windows must be at least 1"));
            }
            if r.resolve_after == Some(0) {
                bail!("{}", at("resolve_after must be at least 1"));
            }
            match r.condition {
                ConditionKind::Baseline => {
                    let from_model = self
                        .models
                        .get(&r.model)
                        .and_then(|m| m.baseline.get(&r.metric));
                    if r.baseline.is_none() && from_model.is_none() {
                        bail!(
                            "{}",
                            at(&format!(
                                "condition \"baseline\" needs baseline = ... or models.{}.baseline.{}",
                                r.model, r.metric
                            ))
                        );
                    }
                }
                ConditionKind::Version => {
                    if r.compare_version.as_deref().is_none_or(str::is_empty) {
                        bail!("{}", at("condition \"version\" needs compare_version"));
                    }
                }
                ConditionKind::Threshold | ConditionKind::PreviousWindow => {}
            }
            if let Some(b) = r.baseline {
                if !b.is_finite() {
                    bail!("{}", at("baseline must be a finite number"));
                }
            }
        }
        let mut hooks = std::collections::HashSet::new();
        for w in &a.webhooks {
            if w.name.is_empty() || !hooks.insert(&w.name) {
                bail!(
                    "invalid configuration: alerts.webhooks: names must be unique and non-empty ({:?})",
                    w.name
                );
            }
            let at =
                |what: &str| format!("invalid configuration: alerts.webhooks.{}: {what}", w.name);
            if w.url_env.is_none() {
                let u = w.url.expose();
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    bail!(
                        "{}",
                        at("url must be an http:// or https:// URL (or set url_env)")
                    );
                }
            }
            if w.max_attempts == 0 {
                bail!("{}", at("max_attempts must be at least 1"));
            }
            if w.timeout.is_zero() {
                bail!("{}", at("timeout must be positive"));
            }
            if w.kind == WebhookKind::Jira && w.jira_project.as_deref().is_none_or(str::is_empty) {
                bail!("{}", at("a jira webhook needs jira_project"));
            }
        }
        Ok(())
    }

    /// Window sizes in milliseconds.
    pub fn window_sizes_ms(&self) -> Vec<i64> {
        self.windows
            .sizes
            .iter()
            .map(|d| d.as_millis() as i64)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_match_the_design() {
        let c = load(None, &env(&[])).unwrap();
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.predictions_topic, "predictions");
        assert_eq!(c.kafka.ground_truth_topic, "ground-truth");
        assert_eq!(c.kafka.alerts_topic, "model-alerts");
        assert_eq!(c.kafka.dead_letter_topic, "modelwatch-dead-letter");
        assert_eq!(c.clickhouse.url, "http://127.0.0.1:8123");
        assert_eq!(c.windows.sizes, vec![Duration::from_secs(300)]);
        assert_eq!(c.windows.label_horizon, Duration::from_secs(86400));
        assert_eq!(c.windows.early_label_ttl, Duration::from_secs(600));
    }

    #[test]
    fn file_then_env_override() {
        let f = write(
            "[kafka]\nbrokers = \"a:1\"\nformat = \"json\"\n[kafka.properties]\n\"security.protocol\" = \"plaintext\"\n[windows]\nsizes = [\"1m\", \"1h\"]\n",
        );
        let c = load(
            Some(f.path()),
            &env(&[
                ("MODELWATCH_KAFKA__BROKERS", "b:2"),
                ("MODELWATCH_CLICKHOUSE__PASSWORD", "12345"),
                ("MODELWATCH_DRIFT__BINS", "20"),
                ("HOME", "/root"),
                ("MODELWATCH_CONFIG", "/etc/modelwatch.toml"),
                ("MODELWATCH_TANSU_BIN", "/opt/tansu"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "b:2");
        assert_eq!(c.kafka.format, Format::Json);
        assert_eq!(c.kafka.properties["security.protocol"], "plaintext");
        assert_eq!(
            c.windows.sizes,
            vec![Duration::from_secs(60), Duration::from_secs(3600)]
        );
        assert_eq!(c.clickhouse.password.expose(), "12345");
        assert_eq!(c.drift.bins, 20);
    }

    #[test]
    fn field_mappings_load_and_are_checked_naming_the_field() {
        let mapping = "[kafka.mapping.predictions]\nrequest_id = { header = \"x-request-id\" }\nmodel_id = { value = \"fraud\" }\nmodel_version = \"/ver\"\ntimestamp = \"/ts\"\ntimestamp_unit = \"s\"\nfeatures = [\"/amount\"]\nscore = \"/p\"\n[kafka.mapping.labels]\nrequest_id = \"/id\"\ntimestamp = \"/at\"\ntimestamp_unit = \"rfc3339\"\nactual_label = \"/outcome\"\n";
        let f = write(mapping);
        let c = load(
            Some(f.path()),
            &env(&[("MODELWATCH_KAFKA__MAPPING__LABELS__ACTUAL_VALUE", "/amount")]),
        )
        .unwrap();
        let p = c.kafka.mapping.predictions.as_ref().unwrap();
        assert_eq!(
            p.model_version,
            Some(crate::ingest::mapping::Source::path("/ver"))
        );
        let l = c.kafka.mapping.labels.as_ref().unwrap();
        assert_eq!(
            l.actual_value,
            Some(crate::ingest::mapping::Source::path("/amount"))
        );
        // The configuration prints with its mapping.
        assert!(format!("{:?}", c.kafka).contains("x-request-id"));
        assert!(load(None, &env(&[])).unwrap().kafka.mapping.is_empty());
        for (text, want) in [
            (
                "[kafka.mapping.labels]\nrequest_id = \"id\"\ntimestamp = \"/at\"\nactual_label = \"/l\"\n",
                "invalid configuration: kafka.mapping.labels.request_id: \"id\" is not a JSON Pointer",
            ),
            (
                "[kafka.mapping.labels]\nrequest_id = \"/id\"\nactual_label = \"/l\"\n",
                "invalid configuration: kafka.mapping.labels.timestamp is missing",
            ),
            (
                "[kafka.mapping.labels]\nrequest_id = \"/id\"\ntimestamp = \"/at\"\nlabel = \"/l\"\n",
                "unknown field `label`",
            ),
            (
                &format!("[kafka]\nformat = \"avro\"\n{mapping}"),
                "invalid configuration: kafka.mapping is set with kafka.format = \"avro\"",
            ),
        ] {
            let f = write(text);
            let err = format!("{:#}", load(Some(f.path()), &env(&[])).unwrap_err());
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn kafka_security_settings_are_checked_naming_the_key_and_the_accepted_values() {
        let props = |body: &str| format!("[kafka.properties]\n{body}");
        for (body, want) in [
            (
                "\"security.protocol\" = \"TLS\"\n",
                "kafka.properties.\"security.protocol\" = \"TLS\", expected one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
            ),
            (
                "\"security.protocol\" = \"SASL_SSL\"\n",
                "\"security.protocol\" = \"SASL_SSL\" needs kafka.properties.\"sasl.mechanism\", expected one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER",
            ),
            (
                "\"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanism\" = \"SCRAM-SHA-1\"\n",
                "\"sasl.mechanism\" = \"SCRAM-SHA-1\", expected one of PLAIN, SCRAM-SHA-256",
            ),
            (
                "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"GSSAPI\"\n",
                "\"GSSAPI\" (Kerberos) is not built into this binary",
            ),
            (
                "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"svc\"\n",
                "needs kafka.properties.\"sasl.password\", expected a non-empty string",
            ),
            (
                "\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanisms\" = \"PLAIN\"\n\"sasl.password\" = \"hunter2-secret\"\n",
                "needs kafka.properties.\"sasl.username\"",
            ),
            (
                "\"security.protocol\" = \"SSL\"\n\"sasl.mechanism\" = \"PLAIN\"\n",
                "\"sasl.mechanism\" = \"PLAIN\" is set but kafka.properties.\"security.protocol\" = \"SSL\", expected SASL_SSL or SASL_PLAINTEXT",
            ),
            (
                "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"PLAIN\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-256\"\n",
                "sets both \"sasl.mechanism\"",
            ),
            (
                "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"sasl.oauthbearer.method\" = \"oidc\"\n",
                "needs kafka.properties.\"sasl.oauthbearer.token.endpoint.url\"",
            ),
            (
                "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"sasl.oauthbearer.method\" = \"oidc\"\n\"sasl.oauthbearer.token.endpoint.url\" = \"idp.example.org/token\"\n",
                "expected an https:// (or http://) URL",
            ),
            (
                "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"sasl.oauthbearer.method\" = \"OIDC\"\n\"sasl.oauthbearer.token.endpoint.url\" = \"https://idp.example.org/token\"\n\"sasl.oauthbearer.client.id\" = \"svc\"\n",
                "needs kafka.properties.\"sasl.oauthbearer.client.secret\"",
            ),
            (
                "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"sasl.oauthbearer.client.secret\" = \"hunter2-secret\"\n",
                "has no token source, expected \"sasl.oauthbearer.method\" = \"oidc\"",
            ),
            (
                "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"sasl.oauthbearer.method\" = \"kerberos\"\n",
                "\"sasl.oauthbearer.method\" = \"kerberos\", expected \"oidc\" or \"default\"",
            ),
            (
                "\"security.protocol\" = \"SSL\"\n\"ssl.certificate.location\" = \"/etc/hostname\"\n",
                "needs kafka.properties.\"ssl.key.location\"",
            ),
            (
                "\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"/nonexistent/ca.pem\"\n",
                "kafka.properties.\"ssl.ca.location\" = \"/nonexistent/ca.pem\" cannot be read",
            ),
        ] {
            let f = write(&props(body));
            let err = format!("{:#}", load(Some(f.path()), &env(&[])).unwrap_err());
            assert!(err.contains(want), "{body}: {err}");
            assert!(!err.contains("hunter2-secret"), "secret printed: {err}");
        }
        for body in [
            "\"security.protocol\" = \"plaintext\"\n",
            "\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"probe\"\n",
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"scram-sha-256\"\n\"sasl.username\" = \"svc\"\n\"sasl.password\" = \"hunter2-secret\"\n",
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"enable.sasl.oauthbearer.unsecure.jwt\" = \"true\"\n",
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"sasl.oauthbearer.method\" = \"oidc\"\n\"sasl.oauthbearer.token.endpoint.url\" = \"https://idp.example.org/oauth2/token\"\n\"sasl.oauthbearer.client.id\" = \"svc\"\n\"sasl.oauthbearer.client.secret\" = \"hunter2-secret\"\n\"sasl.oauthbearer.scope\" = \"kafka\"\n",
            // librdkafka's alias names of the client id and secret.
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"sasl.oauthbearer.method\" = \"oidc\"\n\"sasl.oauthbearer.token.endpoint.url\" = \"https://idp.example.org/oauth2/token\"\n\"sasl.oauthbearer.client.credentials.client.id\" = \"svc\"\n\"sasl.oauthbearer.client.credentials.client.secret\" = \"hunter2-secret\"\n",
            // The JWT-bearer grant signs an assertion instead of a secret.
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"sasl.oauthbearer.method\" = \"oidc\"\n\"sasl.oauthbearer.token.endpoint.url\" = \"https://idp.example.org/oauth2/token\"\n\"sasl.oauthbearer.client.id\" = \"svc\"\n\"sasl.oauthbearer.grant.type\" = \"urn:ietf:params:oauth:grant-type:jwt-bearer\"\n",
        ] {
            let f = write(&props(body));
            let c = load(Some(f.path()), &env(&[])).unwrap_or_else(|e| panic!("{body}: {e:#}"));
            assert!(!format!("{:?}", c.kafka).contains("hunter2-secret"));
        }
    }

    #[test]
    fn insert_timeout_must_stay_below_the_poll_interval() {
        let c = load(None, &env(&[])).unwrap();
        assert_eq!(c.clickhouse.insert_timeout, Duration::from_secs(30));
        for (text, want) in [
            ("[clickhouse]\ninsert_timeout = \"0s\"\n", "clickhouse.insert_timeout"),
            ("[clickhouse]\ninsert_timeout = \"5m\"\n", "300000 ms"),
            (
                "[clickhouse]\ninsert_timeout = \"90s\"\n[kafka.properties]\n\"max.poll.interval.ms\" = \"60000\"\n",
                "60000 ms",
            ),
            (
                "[kafka.properties]\n\"max.poll.interval.ms\" = \"soon\"\n",
                "max.poll.interval.ms",
            ),
        ] {
            let f = write(text);
            let err = format!("{:#}", load(Some(f.path()), &env(&[])).unwrap_err());
            assert!(err.contains(want), "{text}: {err}");
        }
        let f = write("[clickhouse]\ninsert_timeout = \"2m\"\n");
        let c = load(Some(f.path()), &env(&[])).unwrap();
        assert_eq!(c.clickhouse.insert_timeout, Duration::from_secs(120));
    }

    #[test]
    fn unknown_key_names_the_key() {
        let f = write("[kafka]\nbrokerz = \"a:1\"\n");
        let err = load(Some(f.path()), &env(&[])).unwrap_err().to_string();
        assert!(err.contains("brokerz"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key_and_expectation() {
        let f = write("[windows]\nlabel_horizon = \"soon\"\n");
        let err = format!("{:#}", load(Some(f.path()), &env(&[])).unwrap_err());
        assert!(
            err.contains("label_horizon") || err.contains("soon"),
            "{err}"
        );
        let err = load(None, &env(&[("MODELWATCH_DRIFT__BINS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("drift.bins") && err.contains("2..=1000"),
            "{err}"
        );
        let err = load(None, &env(&[("MODELWATCH_KAFKA__FORMAT", "xml")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("xml") && err.contains("confluent-avro"),
            "{err}"
        );
    }

    #[test]
    fn drift_methods_parse_and_bad_ones_are_named() {
        let f = write(
            "[drift]\nmethod = \"ks\"\nwasserstein_threshold = 0.2\n[drift.methods]\namount = \"psi\"\n__prediction__ = \"jensen_shannon\"\n",
        );
        let c = load(Some(f.path()), &env(&[])).unwrap();
        assert_eq!(c.drift.method, DriftMethod::Ks);
        assert_eq!(c.drift.methods["amount"], DriftMethod::Psi);
        assert_eq!(
            c.drift.methods["__prediction__"],
            DriftMethod::JensenShannon
        );
        assert_eq!(c.drift.wasserstein_threshold, 0.2);
        assert_eq!(c.drift.large_reference_rows, 1000);
        let d = load(None, &env(&[])).unwrap().drift;
        assert_eq!((d.method, d.p_value_threshold), (DriftMethod::Auto, 0.05));
        let f = write("[drift.methods]\namount = \"t_test\"\n");
        let err = format!("{:#}", load(Some(f.path()), &env(&[])).unwrap_err());
        assert!(
            err.contains("t_test") && err.contains("wasserstein"),
            "{err}"
        );
        let err = load(
            None,
            &env(&[("MODELWATCH_DRIFT__P_VALUE_THRESHOLD", "1.5")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("drift.p_value_threshold"), "{err}");
    }

    #[test]
    fn log_level_is_validated() {
        let c = load(
            None,
            &env(&[("MODELWATCH_SERVICE__LOG_LEVEL", "info,rdkafka=warn")]),
        )
        .unwrap();
        assert_eq!(c.service.log_level, "info,rdkafka=warn");
        let err = load(None, &env(&[("MODELWATCH_SERVICE__LOG_LEVEL", "loud[")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("service.log_level"), "{err}");
    }

    #[test]
    fn kafka_properties_come_from_the_environment_with_dots_for_underscores() {
        let c = load(
            None,
            &env(&[
                (
                    "MODELWATCH_KAFKA__PROPERTIES__SECURITY_PROTOCOL",
                    "SASL_SSL",
                ),
                (
                    "MODELWATCH_KAFKA__PROPERTIES__SASL_MECHANISM",
                    "SCRAM-SHA-256",
                ),
                ("MODELWATCH_KAFKA__PROPERTIES__SASL_USERNAME", "svc"),
                ("MODELWATCH_KAFKA__PROPERTIES__SASL_PASSWORD", "env-pw-12"),
                ("MODELWATCH_KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS", "250"),
            ]),
        )
        .unwrap();
        let p = &c.kafka.properties;
        assert_eq!(p["security.protocol"], "SASL_SSL");
        assert_eq!(p["sasl.mechanism"], "SCRAM-SHA-256");
        assert_eq!(p["sasl.password"], "env-pw-12");
        // A value that looks like a number stays the string librdkafka takes.
        assert_eq!(p["fetch.wait.max.ms"], "250");
        assert!(!format!("{c:?}").contains("env-pw-12"));
        assert!(c.secret_values().contains(&"env-pw-12".to_owned()));
    }

    #[test]
    fn password_is_never_printed() {
        let c = load(
            None,
            &env(&[("MODELWATCH_CLICKHOUSE__PASSWORD", "hunter2")]),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!toml::to_string(&c).unwrap().contains("hunter2"));
    }

    #[test]
    fn secrets_are_masked_wherever_the_config_is_printed() {
        let f = write(
            "[kafka]\nbrokers = \"b:9092\"\n[kafka.properties]\n\"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"svc\"\n\"sasl.password\" = \"kafka-pw-1\"\n\"sasl.jaas.config\" = \"org.x required password=jaas-pw-2;\"\n\"ssl.key.pem\" = \"-----BEGIN PRIVATE KEY----- pem-3\"\n\"ssl.key.password\" = \"keypw-4\"\n\"sasl.oauthbearer.client.secret\" = \"oauth-5\"\n[clickhouse]\nurl = \"https://chuser:ch-url-pw-6@ch.example:8443/\"\n[api]\ntokens = [\"api-token-7\"]\n[[alerts.webhooks]]\nname = \"slack\"\nkind = \"slack\"\nurl = \"https://hooks.example/T000/B000/slack-8\"\n",
        );
        let c = load(
            Some(f.path()),
            &env(&[("MODELWATCH_CLICKHOUSE__PASSWORD", "ch-pw-9")]),
        )
        .unwrap();
        let secrets = [
            "kafka-pw-1",
            "jaas-pw-2",
            "pem-3",
            "keypw-4",
            "oauth-5",
            "ch-url-pw-6",
            "api-token-7",
            "slack-8",
            "ch-pw-9",
        ];
        let debug = format!("{c:?}");
        let pretty = format!("{c:#?}");
        let toml_text = toml::to_string(&c).unwrap();
        for printed in [&debug, &pretty, &toml_text] {
            for s in secrets {
                assert!(!printed.contains(s), "{s} printed in:\n{printed}");
            }
        }
        // What is not secret stays readable.
        assert!(
            debug.contains("sasl_ssl") && debug.contains("svc"),
            "{debug}"
        );
        assert!(debug.contains("https://***@ch.example:8443/"), "{debug}");
        assert!(
            toml_text.contains("\"sasl.password\" = \"***\""),
            "{toml_text}"
        );
        // Error messages: every secret value is taken out.
        let msg = "cannot connect: sasl.password=kafka-pw-1 url https://chuser:ch-url-pw-6@ch.example token api-token-7 pw ch-pw-9";
        let clean = redact(msg, &c.secret_values());
        for s in secrets {
            assert!(!clean.contains(s), "{s} in {clean}");
        }
        assert!(
            clean.starts_with("cannot connect: sasl.password=*** url https://***@ch.example"),
            "{clean}"
        );
        // A bad URL is named without its credentials.
        let err = load(
            None,
            &env(&[("MODELWATCH_CLICKHOUSE__URL", "ftp://u:url-pw-10@h")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("clickhouse.url") && !err.contains("url-pw-10"),
            "{err}"
        );
    }

    #[test]
    fn secret_property_names() {
        for k in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.jaas.config",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "SASL.PASSWORD",
        ] {
            assert!(is_secret_property(k), "{k}");
        }
        for k in [
            "security.protocol",
            "sasl.username",
            "sasl.mechanism",
            "ssl.ca.location",
            "sasl.oauthbearer.token.endpoint.url",
        ] {
            assert!(!is_secret_property(k), "{k}");
        }
        assert_eq!(
            redact_url("http://a:b@h:1/p?q=x@y"),
            "http://***@h:1/p?q=x@y"
        );
        assert_eq!(redact_url("http://h:8123"), "http://h:8123");
    }

    #[test]
    fn api_limits_load_and_bad_ones_are_named() {
        let a = load(None, &env(&[])).unwrap().api;
        assert_eq!(a.header_read_timeout, Duration::from_secs(10));
        assert_eq!(a.request_timeout, Duration::from_secs(30));
        assert_eq!((a.max_connections, a.max_concurrent_requests), (512, 16));
        assert_eq!(a.query_timeout, Duration::from_secs(15));
        assert_eq!(a.max_range, Duration::from_secs(31 * 86400));
        assert_eq!(a.max_rows, 100_000);
        assert!(a.allowed_hosts.is_empty());
        let c = load(
            None,
            &env(&[(
                "MODELWATCH_API__ALLOWED_HOSTS",
                "mw.example.org, 10.0.0.5:8089",
            )]),
        )
        .unwrap();
        assert_eq!(c.api.allowed_hosts, vec!["mw.example.org", "10.0.0.5:8089"]);
        for (key, value, expected) in [
            (
                "MODELWATCH_API__MAX_ROWS",
                "0",
                "api.max_rows must be at least 1",
            ),
            (
                "MODELWATCH_API__MAX_CONNECTIONS",
                "0",
                "api.max_connections must be at least 1",
            ),
            (
                "MODELWATCH_API__QUERY_TIMEOUT",
                "500ms",
                "api.query_timeout must be at least 1s",
            ),
            (
                "MODELWATCH_API__HEADER_READ_TIMEOUT",
                "0s",
                "api.header_read_timeout must be positive",
            ),
            (
                "MODELWATCH_API__ALLOWED_HOSTS",
                "http://x/",
                "api.allowed_hosts contains \"http://x/\"",
            ),
        ] {
            let err = load(None, &env(&[(key, value)])).unwrap_err().to_string();
            assert!(err.contains(expected), "{key}={value}: {err}");
        }
    }

    /// Runs the `openssl` CLI in `dir` (the integration tests need it too).
    fn openssl(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl CLI");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn clickhouse_tls_settings_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=ca",
        ]);
        openssl(d, &args);
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "other.key",
            "-out",
            "other.pem",
            "-days",
            "1",
            "-subj",
            "/CN=o",
        ]);
        openssl(d, &args);
        let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
        std::fs::write(d.join("notes.txt"), "not a certificate\n").unwrap();
        let (ca, ca_key, other_key) = (p("ca.pem"), p("ca.key"), p("other.key"));
        let (notes, missing) = (p("notes.txt"), p("missing.pem"));
        let https = "https://clickhouse.example.org:8443";
        let load_with = |pairs: &[(&str, &str)]| {
            let mut all = vec![("MODELWATCH_CLICKHOUSE__URL", https)];
            all.extend_from_slice(pairs);
            load(None, &env(&all))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        const CA: &str = "MODELWATCH_CLICKHOUSE__CA_FILE";
        const CERT: &str = "MODELWATCH_CLICKHOUSE__CLIENT_CERT_FILE";
        const KEY: &str = "MODELWATCH_CLICKHOUSE__CLIENT_KEY_FILE";
        // Valid: the system store only, a CA file, a client certificate
        // (the CA's own certificate and key serve as one here).
        assert_eq!(load_with(&[]), Ok(()));
        assert_eq!(load_with(&[(CA, &ca)]), Ok(()));
        assert_eq!(load_with(&[(CA, &ca), (CERT, &ca), (KEY, &ca_key)]), Ok(()));
        let c = load(
            None,
            &env(&[(CA, &ca), ("MODELWATCH_CLICKHOUSE__URL", https)]),
        )
        .unwrap();
        assert_eq!(c.clickhouse.ca_file, ca);
        assert_eq!(Config::default().clickhouse.ca_file, "");

        let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
            (vec![(CA, &missing)], format!("clickhouse.ca_file = {missing:?}: cannot read it")),
            (vec![(CA, &notes)], format!("clickhouse.ca_file = {notes:?}: no certificate in it")),
            (
                vec![(CERT, &ca)],
                "clickhouse.client_cert_file is set without clickhouse.client_key_file".into(),
            ),
            (
                vec![(KEY, &ca_key)],
                "clickhouse.client_key_file is set without clickhouse.client_cert_file".into(),
            ),
            (
                vec![(CERT, &notes), (KEY, &ca_key)],
                format!("clickhouse.client_cert_file = {notes:?}: no certificate in it"),
            ),
            (
                vec![(CERT, &ca), (KEY, &ca)],
                format!("clickhouse.client_key_file = {ca:?}: no private key in it"),
            ),
            (
                vec![(CERT, &ca), (KEY, &other_key)],
                format!("clickhouse.client_key_file = {other_key:?} does not go with clickhouse.client_cert_file"),
            ),
            (
                vec![("MODELWATCH_CLICKHOUSE__URL", "http://127.0.0.1:8123"), (CA, &ca)],
                "clickhouse.ca_file is set but clickhouse.url = \"http://127.0.0.1:8123\" is not https://".into(),
            ),
            (
                vec![("MODELWATCH_CLICKHOUSE__URL", "clickhouse.example.org:8443")],
                "clickhouse.url = \"clickhouse.example.org:8443\", expected an http:// or https:// URL".into(),
            ),
            (
                vec![("MODELWATCH_CLICKHOUSE__URL", "https://")],
                "clickhouse.url = \"https://\", expected an http:// or https:// URL with a host".into(),
            ),
        ];
        let key_lines: Vec<String> = [&ca_key, &other_key]
            .iter()
            .flat_map(|k| {
                std::fs::read_to_string(k)
                    .unwrap()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(!key_lines.is_empty());
        for (pairs, want) in cases {
            let err = load_with(&pairs).expect_err(&want);
            assert!(err.starts_with("invalid configuration: "), "{err}");
            assert!(err.contains(&want), "want {want:?} in {err}");
            // Never the key material.
            for line in key_lines.iter() {
                assert!(!err.contains(line.as_str()), "{err}");
            }
        }
    }

    #[test]
    fn schema_registry_settings_are_checked_at_load() {
        let c = load(None, &env(&[])).unwrap();
        let r = &c.kafka.schema_registry;
        assert!(!r.enabled());
        assert_eq!(r.alerts, AlertFraming::Raw);
        assert_eq!(
            (r.max_schemas, r.timeout, r.retry_for),
            (1000, Duration::from_secs(10), Duration::from_secs(60))
        );
        let reg = |body: &str| format!("[kafka.schema_registry]\n{body}");
        for (body, expected) in [
            ("url = \"ftp://r\"", "kafka.schema_registry.url = \"ftp://r\", expected an http:// or https:// URL"),
            ("alerts = \"confluent\"", "kafka.schema_registry.alerts = \"confluent\" needs kafka.schema_registry.url"),
            ("url = \"http://r\"\nusername = \"u\"", "kafka.schema_registry.username and password: set both"),
            ("url = \"https://r\"\nca_file = \"/nonexistent/ca.pem\"", "kafka.schema_registry.ca_file = \"/nonexistent/ca.pem\" is not readable"),
            ("url = \"http://r\"\nca_file = \"/etc/hostname\"", "ca_file = \"/etc/hostname\" is set but url is not https://"),
            ("url = \"http://r\"\ntimeout = \"0s\"", "kafka.schema_registry.timeout"),
            ("url = \"http://r\"\nretry_for = \"10m\"", "kafka.schema_registry.retry_for = \"10m\", expected more than 0 and less than max.poll.interval.ms (300000 ms)"),
            ("url = \"http://r\"\nmax_schemas = 0", "kafka.schema_registry.max_schemas = 0, expected at least 1"),
            ("url = \"http://r\"\nalerts = \"avro\"", "unknown variant `avro`"),
        ] {
            let f = write(&reg(body));
            let err = format!("{:#}", load(Some(f.path()), &env(&[])).unwrap_err());
            assert!(err.contains(expected), "{body}: {err}");
        }
        // The password from the environment; never printed.
        let f = write(&reg(
            "url = \"https://reg.example:8081/\"\nusername = \"key\"\nalerts = \"confluent\"",
        ));
        let c = load(
            Some(f.path()),
            &env(&[("MODELWATCH_KAFKA__SCHEMA_REGISTRY__PASSWORD", "reg-pw-77")]),
        )
        .unwrap();
        let r = &c.kafka.schema_registry;
        assert!(r.enabled());
        assert_eq!(r.password.expose(), "reg-pw-77");
        assert_eq!(r.alerts, AlertFraming::Confluent);
        assert!(!format!("{:?}", c.kafka).contains("reg-pw-77"));
        assert!(!toml::to_string(&c).unwrap().contains("reg-pw-77"));
        let clean = redact("401 for key:reg-pw-77", &c.secret_values());
        assert_eq!(clean, "401 for key:***");
        // Credentials in the URL too.
        let f = write(&reg("url = \"https://u:url-pw-88@reg.example/\""));
        let c = load(Some(f.path()), &env(&[])).unwrap();
        assert!(!format!("{c:?}").contains("url-pw-88"));
        assert_eq!(
            redact("GET https://u:url-pw-88@reg.example/", &c.secret_values()),
            "GET https://***@reg.example/"
        );
    }
}
