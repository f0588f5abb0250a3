//! The Schema Registry path of the whole service (MockCluster + a real
//! ClickHouse + an in-test HTTP server speaking the registry's REST API):
//! the pipeline test's event set produced once as raw Avro in our schema
//! and once Confluent-framed with a producer's own schemas (other record
//! names, other field order, extra fields, a nested record we do not know,
//! our optional fields missing so their defaults apply, other union
//! orders) gives the same `window_metrics FINAL`; unknown and non-Avro
//! schema ids are dead letters of kind `schema`; alerts are framed with the
//! id the registry gave our `AlertEvent` schema; a registry that stays
//! unreachable stops the service instead of dead-lettering good data.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apache_avro::types::Value;
use apache_avro::Schema;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use modelwatch::app::Service;
use modelwatch::config::AlertFraming;
use modelwatch::ingest::decode::{decode_alert, encode_avro, ALERT_SCHEMA};
use modelwatch::model::{FeatureValue, GroundTruthEvent, InputEvent, PredictionEvent};
use modelwatch::sinks::clickhouse::ClickHouseSink;
use modelwatch::telemetry::Counters;
use rdkafka::message::{Headers, Message};
use tokio::net::TcpListener;

use crate::kafka_tls::Proc;
use crate::pipeline::{
    aligned_ago, assert_dead_letters, assert_matches, dataset, expected, mock_cluster, produce,
    read_final, read_topic, run_idle, store_reference, test_config, Input, Key,
};
use crate::support::clickhouse::unique_database;
use crate::support::free_ports;
use crate::support::tls::Certs;

/// The producer's prediction schema (registry id 101).
pub(crate) const PRODUCER_PREDICTION: &str =
    include_str!("../fixtures/registry/producer_prediction.avsc");

/// The producer's label schema (registry id 102).
pub(crate) const PRODUCER_LABEL: &str = include_str!("../fixtures/registry/producer_label.avsc");

pub(crate) const PREDICTION_ID: u32 = 101;
pub(crate) const LABEL_ID: u32 = 102;
const PROTOBUF_ID: u32 = 103;
pub(crate) const UNKNOWN_ID: u32 = 999;
pub(crate) const ALERT_ID: u32 = 77;
/// Basic auth `mw:s3cret`.
pub(crate) const AUTH: &str = "Basic bXc6czNjcmV0";

fn s(x: &str) -> Value {
    Value::String(x.to_owned())
}

fn opt_double(v: Option<f64>, null_index: u32, double_index: u32) -> Value {
    match v {
        Some(x) => Value::Union(double_index, Box::new(Value::Double(x))),
        None => Value::Union(null_index, Box::new(Value::Null)),
    }
}

/// `p` as the producer writes it.
pub(crate) fn producer_prediction(p: &PredictionEvent, n: usize) -> Value {
    let features = p
        .features
        .iter()
        .map(|(k, v)| {
            let v = match v {
                FeatureValue::Null => Value::Union(0, Box::new(Value::Null)),
                FeatureValue::Double(x) => Value::Union(1, Box::new(Value::Double(*x))),
                FeatureValue::String(x) => Value::Union(2, Box::new(s(x))),
                other => panic!("the producer schema has no {other:?} feature"),
            };
            (k.to_owned(), v)
        })
        .collect();
    assert!(p.predicted_label.is_none() && p.class_probabilities.is_none());
    Value::Record(vec![
        ("trace_id".into(), s(&format!("trace-{n}"))),
        ("timestamp".into(), Value::Long(p.timestamp)),
        (
            "segments".into(),
            Value::Map(
                p.segments
                    .iter()
                    .map(|(k, v)| (k.to_owned(), s(v)))
                    .collect(),
            ),
        ),
        ("model_version".into(), s(&p.model_version)),
        ("model_id".into(), s(&p.model_id)),
        ("features".into(), Value::Map(features)),
        ("score".into(), opt_double(p.score, 1, 0)),
        (
            "host".into(),
            Value::Record(vec![
                ("name".into(), s("gpu-7")),
                ("region".into(), s("eu")),
            ]),
        ),
        ("request_id".into(), s(&p.request_id)),
        (
            "predicted_value".into(),
            opt_double(p.predicted_value, 0, 1),
        ),
        (
            "latency_ms".into(),
            Value::Double(p.latency_ms.expect("the dataset has latencies")),
        ),
    ])
}

/// `g` as the producer writes it.
pub(crate) fn producer_label(g: &GroundTruthEvent) -> Value {
    Value::Record(vec![
        ("actual_value".into(), opt_double(g.actual_value, 0, 1)),
        ("source".into(), s("crm")),
        ("request_id".into(), s(&g.request_id)),
        (
            "actual_label".into(),
            match &g.actual_label {
                Some(l) => Value::Union(1, Box::new(s(l))),
                None => Value::Union(0, Box::new(Value::Null)),
            },
        ),
        ("timestamp".into(), Value::Long(g.timestamp)),
    ])
}

pub(crate) fn framed(id: u32, schema: &Schema, v: Value) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&apache_avro::to_avro_datum(schema, v).expect("valid producer datum"));
    out
}

/// What the fake registry saw.
#[derive(Default)]
pub(crate) struct Seen {
    /// (method, path) of every request.
    pub(crate) requests: Mutex<Vec<(String, String)>>,
    /// Bodies of the schema registrations.
    pub(crate) registered: Mutex<Vec<serde_json::Value>>,
    /// Requests for id 101 so far (the first one gets a 503).
    prediction_gets: AtomicUsize,
}

fn json(status: StatusCode, body: serde_json::Value) -> axum::http::Response<axum::body::Body> {
    let mut resp = axum::http::Response::new(axum::body::Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp
}

/// A Schema Registry on 127.0.0.1: `GET /schemas/ids/{id}` for ids 101
/// (the producer's predictions), 102 (its labels), 103 (a Protobuf
/// schema), 404 / 40403 for any other; `POST /subjects/{s}/versions` gives
/// id 77. Basic auth required; the first request for id 101 fails with 503.
pub(crate) async fn fake_registry() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: axum::body::Bytes| {
            let seen = state.clone();
            async move {
                let path = uri.path().to_owned();
                seen.requests
                    .lock()
                    .unwrap()
                    .push((method.to_string(), path.clone()));
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(AUTH) {
                    return json(
                        StatusCode::UNAUTHORIZED,
                        serde_json::json!({"error_code": 401, "message": "Unauthorized"}),
                    );
                }
                if method == Method::POST && path.starts_with("/subjects/") {
                    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    seen.registered.lock().unwrap().push(body);
                    return json(StatusCode::OK, serde_json::json!({"id": ALERT_ID}));
                }
                let id = path
                    .strip_prefix("/schemas/ids/")
                    .and_then(|i| i.parse::<u32>().ok());
                match id {
                    Some(PREDICTION_ID)
                        if seen.prediction_gets.fetch_add(1, Ordering::SeqCst) == 0 =>
                    {
                        json(
                            StatusCode::SERVICE_UNAVAILABLE,
                            serde_json::json!({"error_code": 50003, "message": "busy"}),
                        )
                    }
                    Some(PREDICTION_ID) => json(
                        StatusCode::OK,
                        serde_json::json!({"schema": PRODUCER_PREDICTION}),
                    ),
                    Some(LABEL_ID) => {
                        json(StatusCode::OK, serde_json::json!({"schema": PRODUCER_LABEL, "schemaType": "AVRO"}))
                    }
                    Some(PROTOBUF_ID) => json(
                        StatusCode::OK,
                        serde_json::json!({"schema": "syntax = \"proto3\"; message M {}", "schemaType": "PROTOBUF"}),
                    ),
                    _ => json(
                        StatusCode::NOT_FOUND,
                        serde_json::json!({"error_code": 40403, "message": "Schema not found"}),
                    ),
                }
            }
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

/// The rows' content, without their revision numbers.
type Content = BTreeMap<Key, (String, f64, u64, Option<f64>)>;

async fn metrics(cfg: &modelwatch::config::Config) -> Content {
    read_final(&ClickHouseSink::new(&cfg.clickhouse))
        .await
        .into_iter()
        // The service's own operational rows (CPU, memory...) differ by run.
        .filter(|(k, _)| k.0 != "__service__")
        .map(|(k, r)| (k, (r.model_version, r.value, r.samples, r.p_value)))
        .collect()
}

fn same(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

/// The differences between two runs' rows (none expected). Values are
/// compared to 1e-12 relative: a sum over events taken in another
/// interleaving of the input partitions (each run's consumer interleaves
/// them its own way) may differ in the last bit; keys, versions and
/// sample counts exactly.
fn differences(a: &Content, b: &Content) -> Vec<String> {
    let mut out = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            None => out.push(format!("only in ours: {k:?}")),
            Some(vb)
                if va.0 != vb.0
                    || !same(va.1, vb.1)
                    || va.2 != vb.2
                    || va.3.is_some() != vb.3.is_some()
                    || !same(va.3.unwrap_or(0.0), vb.3.unwrap_or(0.0)) =>
            {
                out.push(format!("{k:?}: ours {va:?}, theirs {vb:?}"))
            }
            Some(_) => {}
        }
    }
    out.extend(
        b.keys()
            .filter(|k| !a.contains_key(*k))
            .map(|k| format!("only in theirs: {k:?}")),
    );
    out
}

/// A rule that fires on any traffic (for the alerts topic).
fn traffic_rule() -> modelwatch::config::RuleConfig {
    toml::from_str(
        "name = \"traffic\"\nmetric = \"prediction_count\"\noperator = \">\"\nthreshold = 0\ngate = false\n",
    )
    .expect("rule")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_own_schema_gives_the_metrics_of_our_schema() {
    let t0 = aligned_ago(3 * 86_400_000);
    let d = dataset(t0);

    // Our schema, raw Avro, no registry.
    let ours = {
        let database = unique_database("mw_registry_ours");
        let cluster = mock_cluster();
        let brokers = cluster.bootstrap_servers();
        let cfg = test_config(&brokers, &database);
        store_reference(&cfg, &d).await;
        produce(&brokers, &d, &|_, ev| encode_avro(ev)).await;
        let mut service = Service::start(cfg.clone()).await.expect("service starts");
        run_idle(&mut service).await;
        metrics(&cfg).await
    };

    // The producer's schemas, Confluent-framed, through the registry.
    let (url, seen) = fake_registry().await;
    let database = unique_database("mw_registry_theirs");
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let mut cfg = test_config(&brokers, &database);
    cfg.kafka.schema_registry.url = format!("{url}/");
    cfg.kafka.schema_registry.username = "mw".into();
    cfg.kafka.schema_registry.password = modelwatch::config::Secret("s3cret".into());
    cfg.kafka.schema_registry.alerts = AlertFraming::Confluent;
    cfg.alerts.rules.push(traffic_rule());
    cfg.validate().expect("valid config");
    store_reference(&cfg, &d).await;
    let prediction_schema = Schema::parse_str(PRODUCER_PREDICTION).unwrap();
    let label_schema = Schema::parse_str(PRODUCER_LABEL).unwrap();
    let mut theirs = d.clone();
    let any_prediction = producer_prediction(&d.predictions[0], 0);
    theirs.malformed.push((
        Input::Predictions,
        "bad-unknown-id".into(),
        framed(UNKNOWN_ID, &prediction_schema, any_prediction.clone()),
    ));
    theirs.malformed.push((
        Input::Predictions,
        "bad-protobuf".into(),
        framed(PROTOBUF_ID, &prediction_schema, any_prediction),
    ));
    produce(&brokers, &theirs, &|n, ev| match ev {
        InputEvent::Prediction(p) => {
            framed(PREDICTION_ID, &prediction_schema, producer_prediction(p, n))
        }
        InputEvent::GroundTruth(g) => framed(LABEL_ID, &label_schema, producer_label(g)),
    })
    .await;
    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    let counters = service.counters();
    run_idle(&mut service).await;
    let p = service.progress();
    assert_eq!(p.dead_lettered, theirs.malformed.len() as u64);

    let got = metrics(&cfg).await;
    assert!(got.len() > 130, "{}", got.len());
    let diff = differences(&ours, &got);
    assert!(
        diff.is_empty(),
        "the producer's schema changed {} of {} rows:\n{}",
        diff.len(),
        ours.len(),
        diff.join("\n")
    );
    // And both are the oracle's.
    let (exact, approx) = expected(&d, true);
    assert_matches(
        &read_final(&ClickHouseSink::new(&cfg.clickhouse)).await,
        &exact,
        &approx,
    );

    // Unknown and Protobuf ids: dead letters of kind `schema`.
    assert_dead_letters(&brokers, &theirs);
    let letters = read_topic(&brokers, "modelwatch-dead-letter", theirs.malformed.len());
    for (key, reason) in [
        (
            "bad-unknown-id",
            "schema id 999: not found in the schema registry",
        ),
        (
            "bad-protobuf",
            "schema id 103: schema type PROTOBUF is not supported",
        ),
    ] {
        let m = letters
            .iter()
            .find(|m| m.key() == Some(key.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter {key}"));
        let header = |name: &str| {
            m.headers()
                .unwrap()
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("modelwatch.error.kind").as_deref(), Some("schema"));
        let got = header("modelwatch.error").unwrap();
        assert!(got.contains(reason), "{key}: {got}");
    }

    // Each id fetched once (101 twice: a 503, then the answer), with auth.
    let requests = seen.requests.lock().unwrap().clone();
    let gets = |id: u32| {
        requests
            .iter()
            .filter(|(m, p)| m == "GET" && *p == format!("/schemas/ids/{id}"))
            .count()
    };
    assert_eq!(
        [PREDICTION_ID, LABEL_ID, PROTOBUF_ID, UNKNOWN_ID].map(gets),
        [2, 1, 1, 1],
        "{requests:?}"
    );
    assert_eq!(Counters::get(&counters.registry_fetches_total), 4);
    assert_eq!(Counters::get(&counters.registry_fetch_failures_total), 1);
    assert_eq!(Counters::get(&counters.registry_unknown_ids_total), 2);
    assert_eq!(Counters::get(&counters.registry_schemas_evicted_total), 0);

    // Our AlertEvent schema registered under <alerts_topic>-value; every
    // alert framed with the id the registry gave.
    assert!(requests.contains(&(
        "POST".into(),
        "/subjects/model-alerts-value/versions".into()
    )));
    let registered = seen.registered.lock().unwrap().clone();
    assert_eq!(registered.len(), 1);
    assert_eq!(registered[0]["schema"].as_str(), Some(ALERT_SCHEMA));
    let published = p.alerts_published;
    assert!(published > 0, "the traffic rule fired no alert");
    let alerts = read_topic(&brokers, "model-alerts", published as usize);
    assert_eq!(alerts.len() as u64, published);
    let mut rules = Vec::new();
    for m in &alerts {
        let payload = m.payload().unwrap();
        assert_eq!(payload[..5], [0, 0, 0, 0, ALERT_ID as u8]);
        let a = decode_alert(&payload[5..]).expect("an AlertEvent datum after the header");
        rules.push(a.rule);
    }
    assert!(rules.iter().any(|r| r == "traffic"), "{rules:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_stops_the_service_instead_of_dead_lettering() {
    let database = unique_database("mw_registry_down");
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let mut cfg = test_config(&brokers, &database);
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    cfg.kafka.schema_registry.url = format!("http://127.0.0.1:{port}");
    cfg.kafka.schema_registry.retry_for = Duration::from_secs(2);
    // Not idle while the registry is retried.
    cfg.windows.idle_timeout = Duration::from_secs(15);
    cfg.validate().expect("valid config");
    let d = dataset(aligned_ago(3 * 86_400_000));
    let schema = Schema::parse_str(PRODUCER_PREDICTION).unwrap();
    let mut one = crate::pipeline::Dataset::default();
    one.predictions.push(d.predictions[0].clone());
    produce(&brokers, &one, &|n, ev| match ev {
        InputEvent::Prediction(p) => framed(PREDICTION_ID, &schema, producer_prediction(p, n)),
        InputEvent::GroundTruth(_) => unreachable!(),
    })
    .await;
    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    let counters = service.counters();
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        service.run_until_idle(std::future::pending()),
    )
    .await
    .expect("the service neither stopped nor finished within 60 s")
    .expect_err("the service went on without the registry");
    let text = format!("{err:#}");
    assert!(
        text.contains("schema id 101") && text.contains("retry_for"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // Nothing was dead-lettered or counted as consumed.
    assert_eq!(Counters::get(&counters.dead_lettered_total), 0);
    assert_eq!(Counters::get(&counters.decode_failures_total), 0);
    assert!(Counters::get(&counters.registry_fetch_failures_total) >= 2);
}

/// The registry behind TLS (Debian's `stunnel4` in front of the in-test
/// server, a CA made by `openssl` at run time): `https://` with `ca_file`
/// and basic auth registers the alert schema at startup; another CA, or a
/// wrong password, stops the start with the reason and no password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_and_basic_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::make(dir.path(), "IP:127.0.0.1");
    let (url, seen) = fake_registry().await;
    let plain: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let tls_port = free_ports(1)[0];
    let _stunnel = tokio::task::block_in_place(|| {
        Proc::stunnel(dir.path(), "registry", tls_port, plain, &certs)
    });
    let database = unique_database("mw_registry_tls");
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let base = {
        let mut cfg = test_config(&brokers, &database);
        let r = &mut cfg.kafka.schema_registry;
        r.url = format!("https://127.0.0.1:{tls_port}");
        r.username = "mw".into();
        r.password = modelwatch::config::Secret("s3cret".into());
        r.alerts = AlertFraming::Confluent;
        r.retry_for = Duration::from_secs(3);
        cfg
    };

    let mut cfg = base.clone();
    cfg.kafka.schema_registry.ca_file = certs.ca.display().to_string();
    cfg.validate().expect("valid config");
    let service = Service::start(cfg).await.expect("starts over https");
    drop(service);
    assert_eq!(seen.registered.lock().unwrap().len(), 1);

    let mut cfg = base.clone();
    cfg.kafka.schema_registry.ca_file = certs.other_ca.display().to_string();
    let err = format!(
        "{:#}",
        Service::start(cfg)
            .await
            .err()
            .expect("another CA is refused")
    );
    assert!(
        err.contains("registering the schema") && err.to_lowercase().contains("certificate"),
        "{err}"
    );

    let mut cfg = base;
    cfg.kafka.schema_registry.ca_file = certs.ca.display().to_string();
    cfg.kafka.schema_registry.password = modelwatch::config::Secret("wrong-pw-31".into());
    let started = std::time::Instant::now();
    let err = format!(
        "{:#}",
        Service::start(cfg)
            .await
            .err()
            .expect("a wrong password is refused")
    );
    assert!(
        err.contains("HTTP 401") && err.contains("Unauthorized"),
        "{err}"
    );
    assert!(!err.contains("wrong-pw-31"), "{err}");
    // Refused for good: not retried for retry_for.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(seen.registered.lock().unwrap().len(), 1);
}
