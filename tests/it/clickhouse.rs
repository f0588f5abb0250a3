//! The ClickHouse sink against a real server (Debian's 18.16 here): schema
//! migration, idempotent revisioned writes read back with `FINAL`, alerts,
//! model versions, reference profiles, and error classification.

use std::time::{Duration, Instant};

use ::clickhouse::Row;
use modelwatch::config::{ClickHouseConfig, Secret};
use modelwatch::model::{AlertEvent, AlertStatus, Severity};
use modelwatch::sinks::clickhouse::{
    ClickHouseSink, MetricRow, RetryPolicy, SinkError, VersionRow, EXAMPLE_QUERIES,
};
use serde::Deserialize;

use crate::support::clickhouse::{unique_database, ClickHouseServer};

/// A migrated sink on the shared server, in a fresh database.
async fn fresh_sink(batch_rows: usize) -> ClickHouseSink {
    let server = ClickHouseServer::shared();
    let cfg = ClickHouseConfig {
        batch_rows,
        ..server.config(&unique_database("mw_it"))
    };
    let sink = ClickHouseSink::new(&cfg).with_retry_policy(fast_retry(3));
    sink.migrate().await.expect("migrate");
    sink
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
    }
}

fn metric(metric: &str, feature: &str, window_start: u32, value: f64, revision: u64) -> MetricRow {
    MetricRow {
        model_id: "fraud".into(),
        model_version: "v1".into(),
        segment: String::new(),
        window_start,
        window_seconds: 300,
        metric: metric.into(),
        feature: feature.into(),
        value,
        samples: 100 + revision,
        p_value: if metric == "ks_statistic" {
            Some(0.01)
        } else {
            None
        },
        revision,
    }
}

async fn count(sink: &ClickHouseSink, sql: &str) -> u64 {
    sink.client()
        .query(sql)
        .fetch_one::<u64>()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test]
async fn migrate_is_idempotent_and_creates_every_table() {
    let sink = fresh_sink(10_000).await;
    sink.migrate().await.expect("second migrate");
    sink.migrate().await.expect("third migrate");
    let db = sink.database().to_owned();
    let tables: Vec<String> = sink
        .client()
        .query(&format!(
            "SELECT name FROM system.tables WHERE database = '{db}' ORDER BY name"
        ))
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        tables,
        [
            "alerts",
            "model_versions",
            "models",
            "reference_profiles",
            "webhook_deliveries",
            "window_histograms",
            "window_metrics"
        ]
    );
    let columns: Vec<(String, String)> = sink
        .client()
        .query(&format!(
            "SELECT name, type FROM system.columns WHERE database = '{db}' AND table = 'window_metrics' ORDER BY name"
        ))
        .fetch_all()
        .await
        .unwrap();
    let expected = [
        ("feature", "String"),
        ("metric", "String"),
        ("model_id", "String"),
        ("model_version", "String"),
        ("p_value", "Nullable(Float64)"),
        ("revision", "UInt64"),
        ("samples", "UInt64"),
        ("segment", "String"),
        ("value", "Float64"),
        ("window_seconds", "UInt32"),
        ("window_start", "DateTime"),
    ];
    let got: Vec<(&str, &str)> = columns
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn metric_revisions_and_replays_collapse_under_final() {
    // batch_rows = 2 makes the 5-row batch go out as three inserts.
    let sink = fresh_sink(2).await;
    let t0 = 1_700_000_100u32; // a window start (a multiple of 300 s)
    let first = vec![
        metric("accuracy", "", t0, 0.5, 1),
        metric("prediction_count", "", t0, 200.0, 1),
        metric("psi", "age", t0, 0.31, 1),
        metric("ks_statistic", "age", t0, 0.2, 1),
        metric("accuracy", "", t0 + 300, 0.75, 1),
    ];
    sink.write_metrics(&first).await.unwrap();
    // A replay of the same batch (e.g. after a crash before the offset commit).
    sink.write_metrics(&first).await.unwrap();
    // More labels arrived for the first window: revision 2 of its accuracy.
    let revised = vec![metric("accuracy", "", t0, 0.625, 2)];
    sink.write_metrics(&revised).await.unwrap();
    // And a late replay of revision 1 must not win over revision 2.
    sink.write_metrics(&first[..1]).await.unwrap();

    // Without FINAL there may be up to 12 physical rows, depending on how far
    // background merges got; FINAL always shows one row per key.
    let physical = count(&sink, "SELECT count() FROM window_metrics").await;
    assert!((5..=12).contains(&physical), "{physical}");
    let rows: Vec<MetricRow> = sink
        .client()
        .query("SELECT ?fields FROM window_metrics FINAL ORDER BY window_start, metric, feature")
        .fetch_all()
        .await
        .unwrap();
    let want = vec![
        metric("accuracy", "", t0, 0.625, 2),
        metric("ks_statistic", "age", t0, 0.2, 1),
        metric("prediction_count", "", t0, 200.0, 1),
        metric("psi", "age", t0, 0.31, 1),
        metric("accuracy", "", t0 + 300, 0.75, 1),
    ];
    assert_eq!(rows, want);
    assert_eq!(rows[1].p_value, Some(0.01));
    assert_eq!(rows[0].samples, 102);

    // The argMax form (no FINAL) agrees.
    let acc: Vec<(u32, f64)> = sink
        .client()
        .query("SELECT toUInt32(window_start), argMax(value, revision) FROM window_metrics WHERE metric = 'accuracy' GROUP BY window_start ORDER BY window_start")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(acc, vec![(t0, 0.625), (t0 + 300, 0.75)]);
}

#[derive(Debug, Deserialize, Row)]
struct AlertBack {
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
    window_start_ms: i64,
    window_end_ms: i64,
    fired_at_ms: u64,
    message: String,
    window_start: u32,
}

fn alert(status: AlertStatus, fired_at: i64) -> AlertEvent {
    AlertEvent {
        alert_id: "a1b2c3".into(),
        rule: "feature_drift".into(),
        status,
        severity: Severity::Critical,
        model_id: "fraud".into(),
        model_version: "v2".into(),
        segment: "country=DE".into(),
        feature: Some("age".into()),
        metric: "psi".into(),
        value: 0.42,
        threshold: 0.2,
        baseline: None,
        p_value: Some(0.003),
        window_start: 1_700_000_100_000,
        window_end: 1_700_000_400_000,
        fired_at,
        message: "psi of age is 0.42 (>= 0.2)".into(),
    }
}

#[tokio::test]
async fn alerts_round_trip_and_replays_are_not_duplicated() {
    let sink = fresh_sink(10_000).await;
    let firing = alert(AlertStatus::Firing, 1_700_000_401_234);
    let mut resolved = alert(AlertStatus::Resolved, 1_700_000_701_000);
    resolved.feature = None;
    resolved.baseline = Some(0.1);
    resolved.p_value = None;
    resolved.severity = Severity::Warning;
    sink.write_alerts(&[firing.clone(), resolved.clone()])
        .await
        .unwrap();
    sink.write_alerts(std::slice::from_ref(&firing))
        .await
        .unwrap();

    let rows: Vec<AlertBack> = sink
        .client()
        .query("SELECT ?fields FROM alerts FINAL ORDER BY status")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, a) in rows.iter().zip([&firing, &resolved]) {
        assert_eq!(row.alert_id, a.alert_id);
        assert_eq!(row.rule, a.rule);
        assert_eq!(row.status, a.status.as_str());
        assert_eq!(row.severity, a.severity.as_str());
        assert_eq!(row.model_id, a.model_id);
        assert_eq!(row.model_version, a.model_version);
        assert_eq!(row.segment, a.segment);
        assert_eq!(row.feature, a.feature);
        assert_eq!(row.metric, a.metric);
        assert_eq!(row.value, a.value);
        assert_eq!(row.threshold, a.threshold);
        assert_eq!(row.baseline, a.baseline);
        assert_eq!(row.p_value, a.p_value);
        assert_eq!(row.window_start_ms, a.window_start);
        assert_eq!(row.window_end_ms, a.window_end);
        assert_eq!(row.fired_at_ms as i64, a.fired_at);
        assert_eq!(row.message, a.message);
        assert_eq!(row.window_start, 1_700_000_100);
    }
}

#[tokio::test]
async fn model_versions_and_models_keep_the_latest_row() {
    let sink = fresh_sink(10_000).await;
    let v = |version: &str, first: i64, last: i64| VersionRow {
        model_id: "fraud".into(),
        model_version: version.into(),
        task: "binary".into(),
        first_seen_ms: first,
        last_seen_ms: last,
        metadata: format!("{{\"version\":\"{version}\"}}"),
    };
    sink.write_versions(&[v("v1", 1_700_000_000_000, 1_700_000_500_000)])
        .await
        .unwrap();
    sink.write_versions(&[
        v("v1", 1_700_000_000_000, 1_700_000_900_000),
        v("v2", 1_700_000_600_000, 1_700_001_000_000),
    ])
    .await
    .unwrap();
    let versions: Vec<(String, u32, u32, String)> = sink
        .client()
        .query("SELECT model_version, toUInt32(first_seen), toUInt32(last_seen), metadata FROM model_versions FINAL ORDER BY model_version")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        versions,
        vec![
            (
                "v1".into(),
                1_700_000_000,
                1_700_000_900,
                "{\"version\":\"v1\"}".into()
            ),
            (
                "v2".into(),
                1_700_000_600,
                1_700_001_000,
                "{\"version\":\"v2\"}".into()
            ),
        ]
    );
    let models: Vec<(String, String, String, u32, u32)> = sink
        .client()
        .query("SELECT model_id, task, latest_version, toUInt32(first_seen), toUInt32(last_seen) FROM models FINAL")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        models,
        vec![(
            "fraud".into(),
            "binary".into(),
            "v2".into(),
            1_700_000_000,
            1_700_001_000
        )]
    );
}

#[tokio::test]
async fn reference_profiles_load_the_latest_save_per_version() {
    let sink = fresh_sink(10_000).await;
    assert!(sink.load_references().await.unwrap().is_empty());
    sink.save_reference("fraud", "v1", 1000, r#"{"n":1}"#)
        .await
        .unwrap();
    sink.save_reference("churn", "v7", 50, r#"{"n":"c"}"#)
        .await
        .unwrap();
    sink.save_reference("fraud", "v1", 2000, r#"{"n":2}"#)
        .await
        .unwrap();
    sink.save_reference("fraud", "v2", 10, r#"{"n":"v2"}"#)
        .await
        .unwrap();
    let refs = sink.load_references().await.unwrap();
    let want: Vec<(String, String, String)> = [
        ("churn", "v7", r#"{"n":"c"}"#),
        ("fraud", "v1", r#"{"n":2}"#),
        ("fraud", "v2", r#"{"n":"v2"}"#),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(refs, want);
    // A second sink (a restarted service) sees the same.
    let again = ClickHouseSink::new(&ClickHouseServer::shared().config(sink.database()));
    assert_eq!(again.load_references().await.unwrap(), want);
    let samples = count(
        &sink,
        "SELECT sample_count FROM reference_profiles FINAL WHERE model_id = 'fraud' AND model_version = 'v1'",
    )
    .await;
    assert_eq!(samples, 2000);
}

#[tokio::test]
async fn a_dropped_table_is_a_permanent_error_and_not_retried() {
    let sink = fresh_sink(10_000).await;
    // Backoffs of at least 30 s: a single retry would blow the time bound below.
    let sink = sink.with_retry_policy(RetryPolicy {
        max_attempts: 8,
        initial_backoff: Duration::from_secs(60),
        max_backoff: Duration::from_secs(60),
    });
    sink.client()
        .query("DROP TABLE window_metrics")
        .execute()
        .await
        .unwrap();
    let started = Instant::now();
    let err = sink
        .write_metrics(&[metric("accuracy", "", 1_700_000_100, 0.5, 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Permanent(_)), "{err}");
    assert!(err.to_string().contains("window_metrics"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // migrate heals it.
    sink.migrate().await.unwrap();
    sink.write_metrics(&[metric("accuracy", "", 1_700_000_100, 0.5, 1)])
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_transient_after_bounded_retries() {
    let port = crate::support::free_port(); // nothing listens there
    let cfg = ClickHouseConfig {
        url: format!("http://127.0.0.1:{port}"),
        ..ClickHouseConfig::default()
    };
    let sink = ClickHouseSink::new(&cfg).with_retry_policy(fast_retry(3));
    let err = sink
        .write_metrics(&[metric("accuracy", "", 1_700_000_100, 0.5, 1)])
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(sink.ping().await.unwrap_err().is_transient());
}

#[tokio::test]
async fn a_wrong_password_is_permanent_and_never_shown() {
    let server = ClickHouseServer::shared();
    let cfg = ClickHouseConfig {
        password: Secret("hunter2-secret".into()),
        ..server.config("default")
    };
    let sink = ClickHouseSink::new(&cfg).with_retry_policy(fast_retry(5));
    let err = sink.migrate().await.unwrap_err();
    assert!(matches!(err, SinkError::Permanent(_)), "{err}");
    // 18.16 says "Code: 193 ... Wrong password", newer servers "Code: 516 ... Authentication failed".
    let text = err.to_string();
    assert!(
        text.contains("Code: 193") || text.contains("Code: 516"),
        "{text}"
    );
    let shown = format!("{err} {err:?} {sink:?}");
    assert!(!shown.contains("hunter2-secret"), "{shown}");
}

#[tokio::test]
async fn example_queries_run_on_this_server() {
    let sink = fresh_sink(10_000).await;
    sink.write_metrics(&[metric("accuracy", "", 1_700_000_100, 0.5, 1)])
        .await
        .unwrap();
    sink.write_alerts(&[alert(AlertStatus::Firing, 1_700_000_401_234)])
        .await
        .unwrap();
    let db = format!("{}.", sink.database());
    for (title, sql) in EXAMPLE_QUERIES {
        let sql = sql.replace("modelwatch.", &db);
        sink.client()
            .query(&sql)
            .execute()
            .await
            .unwrap_or_else(|e| panic!("{title}: {e}"));
    }
    sink.ping().await.unwrap();
}

#[tokio::test]
async fn concurrent_migrations_from_several_instances_all_succeed() {
    let cfg = ClickHouseServer::shared().config(&unique_database("mw_race"));
    let sinks: Vec<ClickHouseSink> = (0..4)
        .map(|_| ClickHouseSink::new(&cfg).with_retry_policy(fast_retry(3)))
        .collect();
    let results = futures::future::join_all(sinks.iter().map(|s| s.migrate())).await;
    for r in results {
        r.expect("concurrent migrate");
    }
    let tables = count(
        &sinks[0],
        &format!(
            "SELECT count() FROM system.tables WHERE database = '{}'",
            sinks[0].database()
        ),
    )
    .await;
    assert_eq!(tables, 7);
}
