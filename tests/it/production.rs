//! Issue #12's "done when", end to end: the real `modelwatch` binary set up
//! only through a TOML file and environment variables, as a user with a
//! production cluster would, against
//!
//! - Kafka over `SASL_SSL` with `SCRAM-SHA-512` (Debian's `stunnel4` in
//!   front of a `tansu` broker, see `kafka_tls`), the CA in
//!   `ssl.ca.location`, the password only in
//!   `MODELWATCH_KAFKA__PROPERTIES__SASL_PASSWORD`;
//! - ClickHouse 18.16 over HTTPS (its own `https_port`, a certificate for
//!   `localhost`, `clickhouse.url = "https://localhost:PORT"` and
//!   `clickhouse.ca_file`);
//! - a Schema Registry over HTTPS with basic auth (the in-test registry of
//!   `registry` behind `stunnel4`), the password only in
//!   `MODELWATCH_KAFKA__SCHEMA_REGISTRY__PASSWORD`, and alerts framed in
//!   the Confluent format;
//! - input produced Confluent-framed with the producer's own Avro schemas
//!   (other record names, other field order, extra fields and a nested
//!   record, an optional field with a default).
//!
//! It checks the exact window metrics (read back over HTTPS), the dead
//! letters (the dataset's malformed messages and an unknown schema id, kind
//! `schema`), alerts framed `0x00` + the id the registry gave, and that no
//! secret is in any of the binary's output. Certificates are made by the
//! `openssl` CLI at run time; nothing listens beyond 127.0.0.1.

use std::path::Path;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, Producer};

use modelwatch::config::ClickHouseConfig;
use modelwatch::ingest::decode::{decode_alert, ALERT_SCHEMA};
use modelwatch::model::InputEvent;
use modelwatch::sinks::clickhouse::ClickHouseSink;

use crate::kafka_tls::{
    assert_metrics_and_dead_letters, client, read_topic, Proc, SecureBroker, PASSWORD, USER,
};
use crate::pipeline::{
    aligned_ago, dataset, reference_file, send, sent_first, Dataset, Input, CLF,
};
use crate::registry::{
    fake_registry, framed, producer_label, producer_prediction, ALERT_ID, AUTH, LABEL_ID,
    PREDICTION_ID, PRODUCER_LABEL, PRODUCER_PREDICTION, UNKNOWN_ID,
};
use crate::support::clickhouse::{unique_database, ClickHouseServer, TlsSettings};
use crate::support::free_ports;
use crate::support::run_binary;
use crate::support::tls::Certs;

/// The registry's basic-auth user and password (what `registry::AUTH` encodes).
const REGISTRY_USER: &str = "mw";
const REGISTRY_PASSWORD: &str = "s3cret";

/// Produces `d` over the secured connection `props` as the producer does:
/// every event Confluent-framed with its own schemas (the early labels
/// first, then the predictions, the other labels), then the malformed
/// messages as they are.
async fn produce_framed(brokers: &str, props: &[(&str, String)], d: &Dataset) {
    let prediction_schema = Schema::parse_str(PRODUCER_PREDICTION).expect("schema");
    let label_schema = Schema::parse_str(PRODUCER_LABEL).expect("schema");
    let p: FutureProducer = client(brokers, props)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let mut n = 0;
    let mut encode = |ev: &InputEvent| {
        n += 1;
        match ev {
            InputEvent::Prediction(e) => {
                framed(PREDICTION_ID, &prediction_schema, producer_prediction(e, n))
            }
            InputEvent::GroundTruth(l) => framed(LABEL_ID, &label_schema, producer_label(l)),
        }
    };
    for l in d.labels.iter().filter(|l| sent_first(l)) {
        let bytes = encode(&InputEvent::GroundTruth(l.clone()));
        send(&p, "ground-truth", &l.request_id, &bytes).await;
    }
    for e in &d.predictions {
        let bytes = encode(&InputEvent::Prediction(e.clone()));
        send(&p, "predictions", &e.request_id, &bytes).await;
    }
    for l in d.labels.iter().filter(|l| !sent_first(l)) {
        let bytes = encode(&InputEvent::GroundTruth(l.clone()));
        send(&p, "ground-truth", &l.request_id, &bytes).await;
    }
    for (input, k, payload) in &d.malformed {
        let topic = match input {
            Input::Predictions => "predictions",
            Input::GroundTruth => "ground-truth",
        };
        send(&p, topic, k, payload).await;
    }
    p.flush(Duration::from_secs(10)).expect("flush");
}

fn path(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

/// The service's configuration file, as a user writes it: every setting
/// except the two secrets, which come from the environment. The registry's
/// certificate is signed by the Kafka CA here.
fn config_text(
    brokers: &str,
    kafka_ca: &str,
    registry_url: &str,
    clickhouse_url: &str,
    clickhouse_ca: &str,
    database: &str,
    state_dir: &str,
) -> String {
    format!(
        r#"[kafka]
brokers = "{brokers}"
group_id = "{database}-group"

[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "{USER}"
"ssl.ca.location" = "{kafka_ca}"

[kafka.schema_registry]
url = "{registry_url}"
username = "{REGISTRY_USER}"
ca_file = "{kafka_ca}"
alerts = "confluent"

[clickhouse]
url = "{clickhouse_url}"
database = "{database}"
ca_file = "{clickhouse_ca}"

[windows]
sizes = ["1m"]
allowed_lateness = "1h"
idle_timeout = "2s"
label_horizon = "24h"

[service]
flush_interval = "200ms"

[api]
# Other tests run at once and the API's port is fixed.
enabled = false

[state]
dir = "{state_dir}"

[alerts]
default_rules = false

[[alerts.rules]]
name = "clf_accuracy_low"
metric = "accuracy"
model = "clf"
operator = "<"
threshold = 0.99
severity = "critical"
"#
    )
}

/// Asserts that none of the secrets (nor the registry's basic-auth header)
/// is in `text`, the output of `what`.
fn assert_no_secret(what: &str, text: &str) {
    for secret in [PASSWORD, REGISTRY_PASSWORD, &AUTH["Basic ".len()..]] {
        assert!(!text.contains(secret), "{what}: a secret is in it:\n{text}");
    }
}

#[test]
fn sasl_ssl_kafka_https_clickhouse_and_a_registry_configured_only_by_file_and_env() {
    let started = Instant::now();
    assert_eq!(
        AUTH,
        format!(
            "Basic {}",
            STANDARD.encode(format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}"))
        )
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kafka_dir = dir.path().join("kafka");
    let clickhouse_dir = dir.path().join("clickhouse");
    for d in [&kafka_dir, &clickhouse_dir] {
        std::fs::create_dir_all(d).expect("mkdir");
    }

    // Kafka: SASL_SSL (SCRAM-SHA-512) with a private CA, through stunnel.
    let certs = Certs::make(&kafka_dir, "IP:127.0.0.1");
    let broker = SecureBroker::start(&kafka_dir, &certs, true);
    let brokers = broker.bootstrap();
    // The test's own clients, secured the same way.
    let props = vec![
        ("security.protocol", "SASL_SSL".to_owned()),
        ("sasl.mechanism", "SCRAM-SHA-512".to_owned()),
        ("sasl.username", USER.to_owned()),
        ("sasl.password", PASSWORD.to_owned()),
        ("ssl.ca.location", path(&certs.ca)),
    ];

    // ClickHouse over HTTPS, its certificate for `localhost` from another CA.
    let ch_certs = Certs::make(&clickhouse_dir, "DNS:localhost");
    let server = ClickHouseServer::start_with_tls(&TlsSettings {
        cert: ch_certs.server_cert.clone(),
        key: ch_certs.server_key.clone(),
        client_ca: None,
    });
    let clickhouse_url = format!("https://localhost:{}", server.https_port());
    let database = unique_database("mw_production");

    // The registry (basic auth) behind stunnel with the Kafka CA's
    // certificate for 127.0.0.1; its server runs on this runtime, which
    // lives until the end of the test.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (plain_url, seen) = runtime.block_on(fake_registry());
    let plain: u16 = plain_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("registry port");
    let registry_port = free_ports(1)[0];
    let _registry_tls = Proc::stunnel(dir.path(), "registry", registry_port, plain, &certs);
    let registry_url = format!("https://127.0.0.1:{registry_port}");

    // The producer's events, in its own schemas, plus a message whose
    // schema id the registry does not know.
    let t0 = aligned_ago(3 * 86_400_000);
    let mut d = dataset(t0);
    let any_prediction = producer_prediction(&d.predictions[0], 0);
    d.malformed.push((
        Input::Predictions,
        "bad-unknown-id".into(),
        framed(
            UNKNOWN_ID,
            &Schema::parse_str(PRODUCER_PREDICTION).expect("schema"),
            any_prediction,
        ),
    ));
    runtime.block_on(produce_framed(&brokers, &props, &d));
    let setup = started.elapsed().as_secs_f64();

    // Configuration: one file without secrets, the secrets in the env.
    let config_path = dir.path().join("modelwatch.toml");
    let text = config_text(
        &brokers,
        &path(&certs.ca),
        &registry_url,
        &clickhouse_url,
        &path(&ch_certs.ca),
        &database,
        &path(&dir.path().join("state")),
    );
    assert_no_secret("the configuration file", &text);
    std::fs::write(&config_path, &text).expect("write config");
    let config = path(&config_path);
    let env: Vec<(String, String)> = vec![
        (
            "MODELWATCH_KAFKA__PROPERTIES__SASL_PASSWORD".into(),
            PASSWORD.into(),
        ),
        (
            "MODELWATCH_KAFKA__SCHEMA_REGISTRY__PASSWORD".into(),
            REGISTRY_PASSWORD.into(),
        ),
    ];

    // check-config accepts it and shows the settings, not the secrets.
    let (ok, out, _) = run_binary(
        &["--config", &config, "check-config"],
        &env,
        &dir.path().join("check.log"),
    );
    assert!(ok, "check-config failed:\n{out}");
    for want in [
        "protocol=SASL_SSL sasl.mechanism=SCRAM-SHA-512 sasl.username=modelwatch-svc",
        &format!("schema registry: url={registry_url} username=mw"),
        "alerts=Confluent",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    assert_no_secret("check-config", &out);

    let reference = reference_file(&d.reference);
    let (ok, out, _) = run_binary(
        &[
            "--config",
            &config,
            "reference",
            "import",
            "--model",
            CLF,
            "--version",
            "v1",
            &path(reference.path()),
        ],
        &env,
        &dir.path().join("reference.log"),
    );
    assert!(ok && out.contains("100 events"), "{out}");
    assert_no_secret("reference import", &out);

    let (ok, log, run_secs) = run_binary(
        &["--config", &config, "run", "--exit-when-idle"],
        &env,
        &dir.path().join("run.log"),
    );
    assert!(ok, "modelwatch run failed:\n{log}");
    assert!(log.contains("input idle"), "{log}");
    assert_no_secret("run", &log);

    // The exact window metrics, read back over HTTPS.
    let sink = ClickHouseSink::new(&ClickHouseConfig {
        url: clickhouse_url.clone(),
        database: database.clone(),
        ca_file: path(&ch_certs.ca),
        ..ClickHouseConfig::default()
    });
    // The exact metrics, read over HTTPS; dead letters: exactly the
    // malformed messages, the unknown id's of kind `schema`.
    let dead = assert_metrics_and_dead_letters(&runtime, &sink, &d, t0, &brokers, &props);
    let unknown = dead
        .iter()
        .find(|m| m.key() == Some(b"bad-unknown-id".as_slice()))
        .expect("the unknown id's dead letter");
    let header = |name: &str| {
        unknown
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == name))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("modelwatch.error.kind").as_deref(), Some("schema"));
    let reason = header("modelwatch.error").unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "schema id {UNKNOWN_ID}: not found in the schema registry"
        )),
        "{reason}"
    );

    // Alerts: framed 0x00 + the id the registry gave our AlertEvent schema.
    let alerts = read_topic(&brokers, &props, "model-alerts", 1);
    assert!(!alerts.is_empty(), "no alert");
    let mut rules = Vec::new();
    for m in &alerts {
        let payload = m.payload().unwrap_or_default();
        assert!(payload.len() > 5, "{payload:?}");
        assert_eq!(payload[0], 0, "magic byte");
        assert_eq!(payload[1..5], ALERT_ID.to_be_bytes(), "schema id");
        let a = decode_alert(&payload[5..]).expect("an AlertEvent datum after the header");
        rules.push((a.rule, a.model_id));
    }
    assert!(
        rules.contains(&("clf_accuracy_low".to_owned(), CLF.to_owned())),
        "{rules:?}"
    );

    // The registry: our schema registered once under <alerts_topic>-value,
    // each producer id fetched (101 twice: its first answer is a 503).
    let registered = seen.registered.lock().expect("lock").clone();
    assert_eq!(registered.len(), 1, "{registered:?}");
    assert_eq!(registered[0]["schema"].as_str(), Some(ALERT_SCHEMA));
    let requests = seen.requests.lock().expect("lock").clone();
    assert!(requests.contains(&(
        "POST".to_owned(),
        "/subjects/model-alerts-value/versions".to_owned()
    )));
    let gets = |id: u32| {
        requests
            .iter()
            .filter(|(m, p)| m == "GET" && *p == format!("/schemas/ids/{id}"))
            .count()
    };
    assert_eq!(
        [PREDICTION_ID, LABEL_ID, UNKNOWN_ID].map(gets),
        [2, 1, 1],
        "{requests:?}"
    );

    let total = started.elapsed().as_secs_f64();
    eprintln!("production: setup {setup:.1} s, run {run_secs:.1} s, total {total:.1} s");
    drop(server);
    drop(broker);
}
