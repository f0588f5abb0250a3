//! End to end: a separate `tansu` broker process, a private ClickHouse
//! database and the real `modelwatch` binary (`reference import`, then
//! `run --exit-when-idle`) configured through a TOML file and
//! `MODELWATCH_*` environment variables. A plain rdkafka producer writes
//! JSON, raw Avro and Confluent-framed Avro events keyed by request id plus
//! malformed messages; the test checks `window_metrics FINAL` against values
//! computed independently (the oracle in [`crate::pipeline`]), the
//! dead-letter topic, the committed offsets and the alerts topic.

use std::collections::BTreeMap;
use std::path::Path;

use modelwatch::ingest::decode::{decode_alert, encode_avro, encode_confluent, encode_json};
use modelwatch::model::{AlertStatus, InputEvent, Severity};
use modelwatch::sinks::clickhouse::ClickHouseSink;

use crate::pipeline::{
    aligned_ago, assert_committed_to_end, assert_dead_letters, assert_matches, dataset, expected,
    key, produce, read_final, read_topic, reference_file, test_config, Input, CLF, PARTITIONS,
    WINDOW_MS,
};
use crate::support::clickhouse::unique_database;
use crate::support::tansu::TansuBroker;

/// Every third event JSON, every third raw Avro, every third Confluent Avro.
fn mixed_encoding(n: usize, ev: &InputEvent) -> Vec<u8> {
    match n % 3 {
        0 => encode_json(ev),
        1 => encode_avro(ev),
        _ => encode_confluent(ev, 7),
    }
}

/// Runs the binary ([`crate::support::run_binary`]); panics with its log
/// when it fails. Returns its output.
fn run_binary(args: &[&str], env: &[(String, String)], log: &Path) -> String {
    let (ok, text, _) = crate::support::run_binary(args, env, log);
    assert!(ok, "modelwatch {args:?} failed:\n{text}");
    text
}

#[test]
fn binary_against_tansu_gives_exact_metrics_dead_letters_and_alerts() {
    let broker = TansuBroker::start(PARTITIONS);
    let brokers = broker.bootstrap();
    let database = unique_database("mw_e2e");
    let cfg = test_config(&brokers, &database);
    let dir = tempfile::tempdir().expect("tempdir");

    let t0 = aligned_ago(3 * 86_400_000);
    let mut d = dataset(t0);
    d.malformed.push((
        Input::Predictions,
        "bad-5".into(),
        vec![0x00, 0, 0, 0, 7, 0xFF, 0xFF, 0xFF],
    ));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(produce(&brokers, &d, &mixed_encoding));

    // The rule lives in the file; connections and timing come from the environment.
    let config_path = dir.path().join("modelwatch.toml");
    std::fs::write(
        &config_path,
        r#"
[alerts]
default_rules = false

[[alerts.rules]]
name = "clf_accuracy_low"
metric = "accuracy"
model = "clf"
operator = "<"
threshold = 0.99
severity = "critical"
"#,
    )
    .expect("write config");
    let env: Vec<(String, String)> = [
        ("MODELWATCH_KAFKA__BROKERS", brokers.clone()),
        ("MODELWATCH_KAFKA__GROUP_ID", cfg.kafka.group_id.clone()),
        ("MODELWATCH_CLICKHOUSE__URL", cfg.clickhouse.url.clone()),
        ("MODELWATCH_CLICKHOUSE__DATABASE", database.clone()),
        ("MODELWATCH_WINDOWS__SIZES", "1m".into()),
        ("MODELWATCH_WINDOWS__ALLOWED_LATENESS", "1h".into()),
        ("MODELWATCH_WINDOWS__IDLE_TIMEOUT", "2s".into()),
        ("MODELWATCH_WINDOWS__LABEL_HORIZON", "24h".into()),
        ("MODELWATCH_SERVICE__FLUSH_INTERVAL", "200ms".into()),
        (
            "MODELWATCH_STATE__DIR",
            dir.path().join("state").to_string_lossy().into_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = config_path.to_str().expect("utf-8 path");

    let reference = reference_file(&d.reference);
    let reference = reference.path().to_str().expect("utf-8 path");
    let out = run_binary(
        &[
            "--config",
            config,
            "reference",
            "import",
            "--model",
            CLF,
            "--version",
            "v1",
            reference,
        ],
        &env,
        &dir.path().join("reference.log"),
    );
    assert!(out.contains("100 events"), "{out}");

    let log = run_binary(
        &["--config", config, "run", "--exit-when-idle"],
        &env,
        &dir.path().join("run.log"),
    );
    assert!(log.contains("input idle"), "{log}");

    let sink = ClickHouseSink::new(&cfg.clickhouse);
    let rows = runtime.block_on(read_final(&sink));
    let (exact, approx) = expected(&d, true);
    assert!(exact.len() > 130, "{}", exact.len());
    assert_matches(&rows, &exact, &approx);

    assert_dead_letters(&brokers, &d);
    assert_committed_to_end(&brokers, &cfg.kafka.group_id);

    // The rule fires in the first window where clf's accuracy (all traffic) is
    // below 0.99; while later windows stay below it the series keeps firing
    // without new events (issue #5 lifecycle), and nothing resolves it.
    let below: BTreeMap<i64, f64> = exact
        .iter()
        .filter(|(k, v)| k.0 == CLF && k.1.is_empty() && k.3 == "accuracy" && **v < 0.99)
        .map(|(k, v)| (i64::from(k.2) * 1000, *v))
        .collect();
    assert!(
        below.len() >= 2,
        "the data must stay below the threshold: {below:?}"
    );
    let firing: BTreeMap<i64, f64> = below.into_iter().take(1).collect();
    let messages = read_topic(&brokers, "model-alerts", firing.len());
    let mut alerts: Vec<_> = messages
        .iter()
        .map(|m| {
            use rdkafka::message::Message;
            assert_eq!(
                m.key(),
                Some(CLF.as_bytes()),
                "alerts are keyed by model id"
            );
            decode_alert(m.payload().unwrap_or_default()).expect("AlertEvent decodes")
        })
        .collect();
    alerts.sort_by_key(|a| a.window_start);
    assert_eq!(alerts.len(), firing.len(), "{alerts:?}");
    for (a, (&start, &accuracy)) in alerts.iter().zip(&firing) {
        assert_eq!(a.rule, "clf_accuracy_low");
        assert_eq!(a.status, AlertStatus::Firing);
        assert_eq!(a.severity, Severity::Critical);
        assert_eq!((a.model_id.as_str(), a.model_version.as_str()), (CLF, "v1"));
        assert_eq!(a.segment, "");
        assert_eq!(a.metric, "accuracy");
        assert_eq!((a.window_start, a.window_end), (start, start + WINDOW_MS));
        assert!((a.value - accuracy).abs() < 1e-9, "{a:?}");
        assert_eq!(a.threshold, 0.99);
        assert!(!a.alert_id.is_empty());
        // The same alert is in the alerts table.
        let n: u64 = runtime
            .block_on(
                sink.client()
                    .query("SELECT count() FROM alerts FINAL WHERE alert_id = ?")
                    .bind(&a.alert_id)
                    .fetch_one(),
            )
            .expect("alerts table");
        assert_eq!(n, 1, "{}", a.alert_id);
    }
    // A key the oracle computes is really there (guards against an empty comparison).
    assert!(rows.contains_key(&key(CLF, "", t0, "prediction_count", "")));
}
