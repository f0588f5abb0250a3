//! The HTTP API against a real ClickHouse holding known rows: exact values,
//! range merges equal to the computation over the union of the windows,
//! auth (401), bad parameters (400 with a clear message); `/metrics` parsed
//! by a Prometheus text parser while events flow through a real service;
//! and every SQL query of the Grafana dashboard run with its macros
//! substituted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelwatch::api::ApiServer;
use modelwatch::config::{Config, Secret};
use modelwatch::metrics::{
    DataAccumulator, MetricValue, ReferenceBuilder, ReferenceProfile, Resolved,
};
use modelwatch::model::{
    AlertEvent, AlertStatus, Entries, FeatureValue, InputEvent, PredictionEvent, Severity,
};
use modelwatch::sinks::clickhouse::{ClickHouseSink, HistogramRow, MetricRow, VersionRow};
use modelwatch::telemetry::Telemetry;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::clickhouse::{unique_database, ClickHouseServer};
use crate::support::repo_root;

/// Start of the first test window (a multiple of 300 s).
const T0: u32 = 1_699_999_800;

/// A response: status, headers (lowercase names), body.
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// GET over a plain HTTP/1.0 connection (no client library needed).
async fn get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("response within 30 s")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_owned(),
    }
}

#[allow(clippy::too_many_arguments)]
fn row(
    version: &str,
    segment: &str,
    ws: u32,
    metric: &str,
    feature: &str,
    value: f64,
    samples: u64,
    revision: u64,
) -> MetricRow {
    MetricRow {
        model_id: "fraud".into(),
        model_version: version.into(),
        segment: segment.into(),
        window_start: ws,
        window_seconds: 300,
        metric: metric.into(),
        feature: feature.into(),
        value,
        samples,
        p_value: (metric == "ks_statistic").then_some(0.001),
        revision,
    }
}

/// Accuracy of v1: (correct, labels) per window; v2 likewise.
const V1_ACC: [(u64, u64); 3] = [(45, 50), (60, 100), (25, 50)];
const V2_ACC: [(u64, u64); 3] = [(35, 50), (70, 100), (40, 50)];
/// PSI of feature `amount` (v1): (value, samples) per window.
const V1_PSI: [(f64, u64); 3] = [(0.05, 100), (0.4, 200), (0.3, 100)];

fn alert(
    id: &str,
    rule: &str,
    status: AlertStatus,
    severity: Severity,
    ws_ms: i64,
    fired: i64,
) -> AlertEvent {
    AlertEvent {
        alert_id: id.into(),
        rule: rule.into(),
        status,
        severity,
        model_id: "fraud".into(),
        model_version: "v1".into(),
        segment: String::new(),
        feature: (rule == "feature_drift").then(|| "amount".to_string()),
        metric: if rule == "feature_drift" {
            "drift_detected"
        } else {
            "accuracy"
        }
        .into(),
        value: 0.5,
        threshold: 0.85,
        baseline: None,
        p_value: None,
        window_start: ws_ms,
        window_end: ws_ms + 300_000,
        fired_at: fired,
        message: format!("{rule} fired"),
    }
}

/// Writes the known rows into a fresh database; returns its config.
async fn seeded() -> Config {
    let server = ClickHouseServer::shared();
    let mut cfg = Config {
        clickhouse: server.config(&unique_database("mw_api")),
        ..Config::default()
    };
    cfg.api.listen = "127.0.0.1:0".into();
    let sink = ClickHouseSink::new(&cfg.clickhouse);
    sink.migrate().await.expect("migrate");
    let mut rows = Vec::new();
    for (i, ws) in [T0, T0 + 300, T0 + 600].into_iter().enumerate() {
        let (c1, n1) = V1_ACC[i];
        let (c2, n2) = V2_ACC[i];
        rows.push(row(
            "v1",
            "",
            ws,
            "accuracy",
            "",
            c1 as f64 / n1 as f64,
            n1,
            5,
        ));
        rows.push(row(
            "v2",
            "",
            ws,
            "accuracy",
            "",
            c2 as f64 / n2 as f64,
            n2,
            5,
        ));
        rows.push(row(
            "v1",
            "",
            ws,
            "prediction_count",
            "",
            100.0 * (i + 1) as f64,
            100 * (i as u64 + 1),
            0,
        ));
        rows.push(row(
            "v2",
            "",
            ws,
            "prediction_count",
            "",
            100.0 * (i + 1) as f64,
            100 * (i as u64 + 1),
            0,
        ));
        let (psi, n) = V1_PSI[i];
        rows.push(row("v1", "", ws, "psi", "amount", psi, n, 0));
        rows.push(row("v1", "", ws, "psi", "country", 0.01, n, 0));
        rows.push(row(
            "v1",
            "",
            ws,
            "drift_detected",
            "amount",
            if i == 0 { 0.0 } else { 1.0 },
            n,
            0,
        ));
        rows.push(row("v1", "", ws, "drift_detected", "country", 0.0, n, 0));
        rows.push(row("v2", "", ws, "psi", "amount", 0.02, n, 0));
        rows.push(row("v1", "", ws, "label_coverage", "", 0.5, 100, 5));
        for (q, ms) in [
            ("latency_p50", 10.0),
            ("latency_p95", 40.0),
            ("latency_p99", 90.0),
        ] {
            rows.push(row("v1", "", ws, q, "", ms, 100, 0));
        }
        // The service's own health rows.
        for (metric, feature, v) in [
            ("events_consumed_count", "predictions", 1000.0),
            ("pending_predictions", "", 12.0),
        ] {
            rows.push(MetricRow {
                model_id: "__service__".into(),
                model_version: "host:1".into(),
                ..row("", "", ws, metric, feature, v, 1, 0)
            });
        }
    }
    // An older revision of the first window: FINAL must hide it.
    rows.push(row("v1", "", T0, "accuracy", "", 0.1, 10, 1));
    rows.push(row("v1", "country=DE", T0, "accuracy", "", 0.5, 20, 5));
    rows.push(row("v1", "country=FR", T0, "accuracy", "", 1.0, 30, 5));
    sink.write_metrics(&rows).await.expect("write rows");
    let version = |v: &str| VersionRow {
        model_id: "fraud".into(),
        model_version: v.into(),
        task: "binary".into(),
        first_seen_ms: i64::from(T0) * 1000,
        last_seen_ms: i64::from(T0 + 900) * 1000,
        metadata: "{}".into(),
    };
    sink.write_versions(&[version("v1"), version("v2")])
        .await
        .expect("versions");
    let ws_ms = |w: u32| i64::from(w) * 1000;
    sink.write_alerts(&[
        alert(
            "a1",
            "feature_drift",
            AlertStatus::Firing,
            Severity::Warning,
            ws_ms(T0 + 300),
            ws_ms(T0 + 700),
        ),
        alert(
            "a2",
            "accuracy_below_baseline",
            AlertStatus::Firing,
            Severity::Critical,
            ws_ms(T0 + 600),
            ws_ms(T0 + 1000),
        ),
        alert(
            "a3",
            "feature_drift",
            AlertStatus::Firing,
            Severity::Warning,
            ws_ms(T0),
            ws_ms(T0 + 400),
        ),
        alert(
            "a3",
            "feature_drift",
            AlertStatus::Resolved,
            Severity::Warning,
            ws_ms(T0),
            ws_ms(T0 + 800),
        ),
    ])
    .await
    .expect("alerts");
    sink.save_reference(
        "fraud",
        "v1",
        1000,
        r#"{"sample_count":1000,"features":[]}"#,
    )
    .await
    .expect("reference");
    cfg
}

async fn start(cfg: &Config) -> ApiServer {
    let telemetry = Arc::new(Telemetry::for_config(cfg));
    ApiServer::start(cfg, telemetry).await.expect("api starts")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[tokio::test]
async fn api_returns_the_stored_values_and_merges_ranges() {
    let cfg = seeded().await;
    let api = start(&cfg).await;
    let addr = api.local_addr();

    // Time series: the newest revision of each window, exactly.
    let r = get(
        addr,
        "/api/models/fraud/timeseries?metric=accuracy&version=v1",
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let pts = j["series"][0]["points"].as_array().unwrap();
    let got: Vec<(u64, f64, u64)> = pts
        .iter()
        .map(|p| {
            (
                p["window_start"].as_u64().unwrap(),
                p["value"].as_f64().unwrap(),
                p["samples"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (u64::from(T0), 0.9, 50),
            (u64::from(T0) + 300, 0.6, 100),
            (u64::from(T0) + 600, 0.5, 50)
        ]
    );

    // Drift of one window: the stored values.
    let r = get(
        addr,
        &format!(
            "/api/models/fraud/drift?version=v1&window_start={}",
            T0 + 300
        ),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["windows"], 1);
    let amount = &j["features"][0];
    assert_eq!(amount["feature"], "amount");
    assert_eq!(amount["metrics"]["psi"]["value"], 0.4);
    assert_eq!(amount["drifted_windows"], 1);
    // No stored histograms here: the per-window values, and said so.
    assert_eq!(j["method"], "weighted_mean");
    assert_eq!(amount["method"], "weighted_mean");

    // Drift over a range: the samples-weighted combination over the union.
    let r = get(
        addr,
        &format!(
            "/api/models/fraud/drift?version=v1&from={T0}&to={}",
            T0 + 900
        ),
        &[],
    )
    .await;
    let j = r.json();
    assert_eq!(j["windows"], 3);
    let amount = &j["features"][0];
    let want_psi = V1_PSI.iter().map(|(v, n)| v * *n as f64).sum::<f64>()
        / V1_PSI.iter().map(|(_, n)| *n as f64).sum::<f64>();
    assert!(
        close(
            amount["metrics"]["psi"]["value"].as_f64().unwrap(),
            want_psi
        ),
        "{amount}"
    );
    assert_eq!(amount["metrics"]["psi"]["samples"], 400);
    assert_eq!(amount["metrics"]["psi"]["max"], 0.4);
    assert_eq!(
        (
            amount["windows"].as_u64(),
            amount["drifted_windows"].as_u64()
        ),
        (Some(3), Some(2))
    );
    assert_eq!(j["features"][1]["feature"], "country");

    // Version comparison over the range: accuracy over the union of windows
    // is total correct / total labels, exactly.
    let r = get(
        addr,
        &format!(
            "/api/models/fraud/compare?a=v1&b=v2&from={T0}&to={}",
            T0 + 900
        ),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let acc = j["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == "accuracy")
        .unwrap()
        .clone();
    let union = |w: &[(u64, u64)]| {
        w.iter().map(|x| x.0).sum::<u64>() as f64 / w.iter().map(|x| x.1).sum::<u64>() as f64
    };
    assert!(
        close(acc["a"]["value"].as_f64().unwrap(), union(&V1_ACC)),
        "{acc}"
    );
    assert!(
        close(acc["b"]["value"].as_f64().unwrap(), union(&V2_ACC)),
        "{acc}"
    );
    assert!(close(
        acc["difference"].as_f64().unwrap(),
        union(&V2_ACC) - union(&V1_ACC)
    ));
    let count = j["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == "prediction_count")
        .unwrap()
        .clone();
    assert_eq!(count["a"]["value"], 600.0);
    let amount = j["drift"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["feature"] == "amount")
        .unwrap()
        .clone();
    assert!(close(amount["a_psi"].as_f64().unwrap(), want_psi));
    assert!(close(amount["b_psi"].as_f64().unwrap(), 0.02));

    // Heatmap: feature x window, most drifted feature first.
    let r = get(addr, "/api/models/fraud/heatmap?version=v1", &[]).await;
    let j = r.json();
    assert_eq!(j["features"], serde_json::json!(["amount", "country"]));
    assert_eq!(j["values"][0], serde_json::json!([0.05, 0.4, 0.3]));
    assert_eq!(j["drift_detected"][0], serde_json::json!([0, 1, 1]));

    // Segments.
    let r = get(
        addr,
        &format!(
            "/api/models/fraud/segments?version=v1&metric=accuracy&from={T0}&to={}",
            T0 + 300
        ),
        &[],
    )
    .await;
    let j = r.json();
    let segs: Vec<(String, f64)> = j["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["segment"].as_str().unwrap().to_owned(),
                s["metrics"]["accuracy"]["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        segs,
        vec![
            ("".into(), 0.9),
            ("country=DE".into(), 0.5),
            ("country=FR".into(), 1.0)
        ]
    );

    // Models with health.
    let r = get(addr, "/api/models", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let m = &j["models"][0];
    assert_eq!(m["model_id"], "fraud");
    assert_eq!(m["status"], "critical");
    assert_eq!(m["open_alerts"], 2);
    assert_eq!(m["drifted_features"], serde_json::json!(["amount"]));
    let v1 = &m["versions"][0];
    assert_eq!(v1["model_version"], "v1");
    assert_eq!(v1["task"], "binary");
    assert_eq!(v1["latest_window"], T0 + 600);
    assert_eq!(v1["latest"]["accuracy"]["value"], 0.5);

    // Alerts with filters.
    let r = get(addr, "/api/alerts?model=fraud", &[]).await;
    let j = r.json();
    assert_eq!(j["count"], 4);
    assert_eq!(j["alerts"][0]["alert_id"], "a2");
    let r = get(addr, "/api/alerts?severity=critical", &[]).await;
    assert_eq!(r.json()["count"], 1);
    let r = get(addr, "/api/alerts?status=resolved", &[]).await;
    assert_eq!(r.json()["alerts"][0]["alert_id"], "a3");
    let r = get(addr, "/api/alerts?open=true", &[]).await;
    let ids: Vec<String> = r.json()["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["alert_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec!["a2", "a1"]);

    // Reference profiles.
    let r = get(addr, "/api/models/fraud/references", &[]).await;
    assert_eq!(r.json()["references"][0]["samples"], 1000);
    let r = get(addr, "/api/models/fraud/versions/v1/reference", &[]).await;
    assert_eq!(r.json()["profile"]["sample_count"], 1000);
    let r = get(addr, "/api/models/fraud/versions/v9/reference", &[]).await;
    assert_eq!(r.status, 404);

    // OpenAPI document.
    let r = get(addr, "/api/openapi.json", &[]).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/models",
        "/api/models/{model}/drift",
        "/api/alerts",
        "/api/models/{model}/compare",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} not documented");
    }
    api.stop().await;
}

#[tokio::test]
async fn bad_parameters_get_400_with_the_reason() {
    let cfg = seeded().await;
    let api = start(&cfg).await;
    let addr = api.local_addr();
    for (path, want) in [
        (
            "/api/models/fraud/timeseries",
            "missing query parameter metric",
        ),
        (
            "/api/models/fraud/timeseries?metric=acuracy",
            "unknown metric \"acuracy\"",
        ),
        (
            "/api/models/fraud/timeseries?metric=accuracy&from=yesterday",
            "invalid from \"yesterday\": expected unix seconds or an RFC 3339 time",
        ),
        (
            "/api/models/fraud/timeseries?metric=accuracy&from=20&to=10",
            "from (20) must be before to (10)",
        ),
        (
            "/api/models/fraud/timeseries?metric=accuracy&window=-5",
            "invalid window \"-5\"",
        ),
        (
            "/api/models/fraud/drift?segment=",
            "missing query parameter version",
        ),
        (
            "/api/models/fraud/drift?version=v1&window_start=1&from=0",
            "either window_start or from / to",
        ),
        (
            "/api/alerts?severity=fatal",
            "invalid severity \"fatal\": expected one of warning, critical",
        ),
        (
            "/api/alerts?limit=0",
            "invalid limit \"0\": expected an integer from 1 to 10000",
        ),
        ("/api/alerts?modle=fraud", "unknown query parameter modle"),
        (
            "/api/models/fraud/compare?a=v1&b=v1",
            "a and b are the same version",
        ),
    ] {
        let r = get(addr, path, &[]).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        let msg = r.json()["error"].as_str().unwrap().to_owned();
        assert!(msg.contains(want), "{path}: {msg:?} lacks {want:?}");
    }
    let r = get(addr, "/api/nope", &[]).await;
    assert_eq!(r.status, 404);
    api.stop().await;
}

#[tokio::test]
async fn tokens_guard_the_api_and_the_dashboard() {
    let server = ClickHouseServer::shared();
    let mut cfg = Config {
        clickhouse: server.config(&unique_database("mw_auth")),
        ..Config::default()
    };
    ClickHouseSink::new(&cfg.clickhouse)
        .migrate()
        .await
        .expect("migrate");
    cfg.api.listen = "127.0.0.1:0".into();
    cfg.api.tokens = vec![Secret("s3cret".into()), Secret("other".into())];
    cfg.api.open_metrics = false;
    let api = start(&cfg).await;
    let addr = api.local_addr();
    let bearer = [("Authorization", "Bearer s3cret")];
    let r = get(addr, "/api/models", &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.headers["www-authenticate"].starts_with("Bearer"));
    assert!(r.json()["error"].as_str().unwrap().contains("bearer token"));
    assert_eq!(
        get(addr, "/api/models", &[("Authorization", "Bearer wrong")])
            .await
            .status,
        401
    );
    assert_eq!(get(addr, "/api/models", &bearer).await.status, 200);
    assert_eq!(
        get(addr, "/api/models", &[("Authorization", "Bearer other")])
            .await
            .status,
        200
    );
    // The dashboard: a sign-in page with 401, the page itself with the cookie.
    let r = get(addr, "/", &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("modelwatch_token"));
    let r = get(addr, "/", &[("Cookie", "modelwatch_token=s3cret")]).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("app.js"));
    assert_eq!(get(addr, "/assets/app.js", &[]).await.status, 401);
    // Health stays open (open_health), metrics closed (open_metrics = false).
    assert_eq!(get(addr, "/healthz", &[]).await.status, 200);
    assert_eq!(get(addr, "/metrics", &[]).await.status, 401);
    assert_eq!(get(addr, "/metrics", &bearer).await.status, 200);
    api.stop().await;
}

/// Sample value of `name` with `labels` in a parsed scrape.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

async fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let r = get(addr, "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].contains("openmetrics-text"));
    let lines = r.body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_counters_move_as_events_flow() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let cluster = MockCluster::new(1).expect("mock cluster");
    let mut cfg = Config::default();
    for t in [&cfg.kafka.predictions_topic, &cfg.kafka.ground_truth_topic] {
        cluster.create_topic(t, 2, 1).expect("topic");
    }
    for t in [&cfg.kafka.alerts_topic, &cfg.kafka.dead_letter_topic] {
        cluster.create_topic(t, 1, 1).expect("topic");
    }
    cfg.kafka.brokers = cluster.bootstrap_servers();
    cfg.kafka.group_id = format!("api-metrics-{}", std::process::id());
    cfg.clickhouse = ClickHouseServer::shared().config(&unique_database("mw_metrics"));
    cfg.api.listen = "127.0.0.1:0".into();
    cfg.service.flush_interval = Duration::from_millis(200);
    let state = tempfile::tempdir().expect("state dir");
    cfg.state.dir = state.path().to_path_buf();
    let mut service = modelwatch::app::Service::start(cfg.clone())
        .await
        .expect("service");
    let api = ApiServer::start(&cfg, service.telemetry())
        .await
        .expect("api");
    let addr = api.local_addr();

    let before = scrape(addr).await;
    let consumed = |s: &prometheus_parse::Scrape| {
        sample(
            s,
            "modelwatch_events_consumed_total",
            &[("topic", "predictions")],
        )
        .unwrap_or(-1.0)
    };
    assert_eq!(consumed(&before), 0.0);
    assert!(sample(&before, "modelwatch_process_resident_memory_bytes", &[]).unwrap_or(0.0) > 0.0);

    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .create()
        .expect("producer");
    let now = modelwatch::app::now_ms();
    const N: usize = 40;
    for i in 0..N {
        let ev = InputEvent::Prediction(PredictionEvent {
            request_id: format!("r{i}"),
            model_id: "m".into(),
            model_version: "v1".into(),
            timestamp: now - 1000,
            score: Some(0.9),
            ..Default::default()
        });
        let payload = modelwatch::ingest::decode::encode_json(&ev);
        let key = format!("r{i}");
        producer
            .send(
                FutureRecord::to("predictions").key(&key).payload(&payload),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("send");
    }
    producer
        .send(
            FutureRecord::to("predictions")
                .key("bad")
                .payload("not json"),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("send");

    let counters = service.counters();
    let deadline = Instant::now() + Duration::from_secs(60);
    service
        .run_until(async move {
            while modelwatch::telemetry::Counters::get(&counters.predictions_consumed_total)
                < N as u64 + 1
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // One more flush period so the core snapshot and lag are recorded.
            tokio::time::sleep(Duration::from_millis(600)).await;
        })
        .await
        .expect("service runs");

    let after = scrape(addr).await;
    assert_eq!(consumed(&after), N as f64 + 1.0);
    assert_eq!(
        sample(&after, "modelwatch_decode_failures_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&after, "modelwatch_dead_letters_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&after, "modelwatch_predictions_total", &[]),
        Some(N as f64)
    );
    assert_eq!(
        sample(&after, "modelwatch_pending_predictions", &[]),
        Some(N as f64)
    );
    assert!(sample(&after, "modelwatch_watermark_delay_seconds", &[]).is_some());
    assert!(sample(&after, "modelwatch_process_cpu_seconds_total", &[]).unwrap_or(0.0) > 0.0);
    drop(service);
    api.stop().await;
}

/// Every SQL query of the Grafana dashboard, with Grafana's macros
/// substituted, runs on the real ClickHouse and returns the known rows.
#[tokio::test]
async fn grafana_queries_run_on_clickhouse() {
    let cfg = seeded().await;
    let sink = ClickHouseSink::new(&cfg.clickhouse);
    let text = std::fs::read_to_string(repo_root().join("deploy/grafana/modelwatch.json"))
        .expect("dashboard json");
    let dash: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut sqls = Vec::new();
    collect_sql(&dash, &mut sqls);
    assert!(sqls.len() >= 8, "only {} queries found", sqls.len());
    let db = sink.database().to_owned();
    let mut non_empty = 0;
    for sql in &sqls {
        let q = substitute(sql, &db);
        let out = sink
            .client()
            .query(&format!("SELECT count() FROM ({q})"))
            .fetch_one::<u64>()
            .await
            .unwrap_or_else(|e| panic!("{e}\n{q}"));
        if out > 0 {
            non_empty += 1;
        }
    }
    // Every query finds the seeded rows.
    assert_eq!(non_empty, sqls.len(), "queries returning no rows");
}

fn collect_sql(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if (k == "rawSql" || k == "query")
                    && x.is_string()
                    && x.as_str().unwrap_or("").contains("SELECT")
                {
                    out.push(x.as_str().unwrap_or_default().to_owned());
                } else {
                    collect_sql(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_sql(x, out)),
        _ => {}
    }
}

/// Grafana's ClickHouse macros and the dashboard variables, as Grafana
/// would expand them for the seeded data.
fn substitute(sql: &str, db: &str) -> String {
    let (from, to) = (T0, T0 + 900);
    let mut s = sql.to_owned();
    for (k, v) in [
        ("${database}", db.to_owned()),
        ("$database", db.to_owned()),
        ("${model}", "fraud".into()),
        ("$model", "fraud".into()),
        ("${version}", "v1".into()),
        ("$version", "v1".into()),
        ("${metric}", "accuracy".into()),
        ("$metric", "accuracy".into()),
        ("${window}", "300".into()),
        ("$window", "300".into()),
    ] {
        s = s.replace(k, &v);
    }
    // $__timeFilter(col) -> col >= toDateTime(from) AND col <= toDateTime(to)
    while let Some(i) = s.find("$__timeFilter(") {
        let rest = &s[i + "$__timeFilter(".len()..];
        let close = rest.find(')').expect("macro closes");
        let col = rest[..close].trim().to_owned();
        let expanded = format!("{col} >= toDateTime({from}) AND {col} <= toDateTime({to})");
        s = format!("{}{}{}", &s[..i], expanded, &rest[close + 1..]);
    }
    s.replace("$__fromTime", &format!("toDateTime({from})"))
        .replace("$__toTime", &format!("toDateTime({to})"))
}

/// Events of feature `amount` (numeric) and `country` (categorical).
fn drift_event(amount: f64, country: &str) -> PredictionEvent {
    PredictionEvent {
        model_id: "hist".into(),
        model_version: "v1".into(),
        features: Entries(vec![
            ("amount".into(), FeatureValue::Double(amount)),
            ("country".into(), FeatureValue::String(country.into())),
        ]),
        score: Some(0.5),
        ..Default::default()
    }
}

/// What the service writes for one closed window: its drift rows and histograms.
fn window_output(
    acc: &DataAccumulator,
    profile: &ReferenceProfile,
    drift: &modelwatch::metrics::DriftConfig,
    ws: u32,
) -> (Vec<MetricRow>, Vec<HistogramRow>) {
    let mut values = Vec::new();
    acc.finish(Some(profile), drift, &mut values);
    let rows = values
        .iter()
        .map(|v| MetricRow {
            model_id: "hist".into(),
            model_version: "v1".into(),
            segment: String::new(),
            window_start: ws,
            window_seconds: 300,
            metric: v.metric.into(),
            feature: v.feature.clone(),
            value: v.value,
            samples: v.samples,
            p_value: v.p_value,
            revision: 0,
        })
        .collect();
    let hists = acc
        .histograms(Some(profile))
        .into_iter()
        .map(|h| HistogramRow {
            model_id: "hist".into(),
            model_version: "v1".into(),
            segment: String::new(),
            window_start: ws,
            window_seconds: 300,
            feature: h.feature,
            kind: h.kind.as_str().into(),
            counts: h.counts,
            revision: 0,
        })
        .collect();
    (rows, hists)
}

fn find_value(out: &[MetricValue], metric: &str, feature: &str) -> f64 {
    out.iter()
        .find(|v| v.metric == metric && v.feature == feature)
        .unwrap_or_else(|| panic!("{metric} {feature}"))
        .value
}

#[tokio::test]
async fn drift_over_a_range_is_recomputed_from_the_merged_histograms() {
    let server = ClickHouseServer::shared();
    let mut cfg = Config {
        clickhouse: server.config(&unique_database("mw_hist")),
        ..Config::default()
    };
    cfg.api.listen = "127.0.0.1:0".into();
    let sink = ClickHouseSink::new(&cfg.clickhouse);
    sink.migrate().await.expect("migrate");
    let drift = modelwatch::pipeline::drift_config(&cfg);
    let countries = ["DE", "FR", "US", "IT"];
    let mut builder = ReferenceBuilder::new(&drift);
    for i in 0..2000 {
        builder.observe(&drift_event((i % 500) as f64, countries[i % 4]));
    }
    let profile = builder.build();
    let json = serde_json::to_string(&profile).expect("profile json");
    sink.save_reference("hist", "v1", profile.sample_count, &json)
        .await
        .expect("reference");
    // Window A near the reference, window B shifted up with a new country,
    // window C (older data: rows but no histograms).
    let mut r = Resolved::default();
    let mut windows: Vec<DataAccumulator> = (0..3)
        .map(|_| DataAccumulator::new(Some(&profile)))
        .collect();
    let mut union = DataAccumulator::new(Some(&profile));
    for i in 0..300 {
        profile.resolve(
            &drift_event((i * 7 % 480) as f64 + 0.5, countries[i % 3]),
            &mut r,
        );
        windows[0].observe(&r);
        union.observe(&r);
        let c = if i % 5 == 0 { "BR" } else { countries[i % 4] };
        profile.resolve(&drift_event(300.0 + (i % 400) as f64, c), &mut r);
        windows[1].observe(&r);
        union.observe(&r);
        profile.resolve(&drift_event((i % 100) as f64, "DE"), &mut r);
        windows[2].observe(&r);
    }
    let (mut rows, mut hists) = (Vec::new(), Vec::new());
    for (i, acc) in windows.iter().enumerate() {
        let (r, h) = window_output(acc, &profile, &drift, T0 + 300 * i as u32);
        rows.extend(r);
        if i < 2 {
            hists.extend(h);
        }
    }
    // Written twice (a replay): FINAL keeps one of each.
    sink.write_metrics(&rows).await.expect("rows");
    sink.write_histograms(&hists).await.expect("histograms");
    sink.write_histograms(&hists)
        .await
        .expect("histograms again");
    let mut want = Vec::new();
    union.finish(Some(&profile), &drift, &mut want);
    let api = start(&cfg).await;
    let addr = api.local_addr();

    // A and B: recomputed over the union of their events.
    let r = get(
        addr,
        &format!(
            "/api/models/hist/drift?version=v1&from={T0}&to={}",
            T0 + 600
        ),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["method"], "merged_histograms", "{j}");
    assert_eq!(j["windows"], 2);
    let features = j["features"].as_array().unwrap();
    // amount, country and the prediction (its score)
    assert_eq!(features.len(), 3, "{j}");
    for f in features {
        let name = f["feature"].as_str().unwrap();
        assert_eq!(f["method"], "merged_histograms");
        assert_eq!(f["windows"], 2);
        for metric in ["psi", "js_distance", "kl_divergence", "hellinger"] {
            let m = &f["metrics"][metric];
            let got = m["value"].as_f64().unwrap();
            let expected = find_value(&want, metric, name);
            assert!(
                (got - expected).abs() <= 1e-12 * expected.abs().max(1.0),
                "{name} {metric}: {got} vs {expected}"
            );
            assert_eq!(m["merge"], "merged_histograms");
            assert_eq!(m["samples"], 600);
            assert_eq!(m["windows"], 2);
        }
        assert_eq!(
            f["metrics"]["drift_detected"]["value"].as_f64().unwrap(),
            find_value(&want, "drift_detected", name)
        );
    }
    let amount = features.iter().find(|f| f["feature"] == "amount").unwrap();
    for metric in ["ks_statistic", "wasserstein"] {
        let got = amount["metrics"][metric]["value"].as_f64().unwrap();
        let expected = find_value(&want, metric, "amount");
        assert!(
            (got - expected).abs() <= 1e-9,
            "{metric}: {got} vs {expected}"
        );
    }
    let country = features.iter().find(|f| f["feature"] == "country").unwrap();
    let chi2 = country["metrics"]["chi2_statistic"]["value"]
        .as_f64()
        .unwrap();
    assert!((chi2 - find_value(&want, "chi2_statistic", "country")).abs() <= 1e-9);
    // Not the weighted mean of the two windows' values.
    let psi_of = |acc: &DataAccumulator| {
        let mut o = Vec::new();
        acc.finish(Some(&profile), &drift, &mut o);
        find_value(&o, "psi", "amount")
    };
    let mean = (psi_of(&windows[0]) + psi_of(&windows[1])) / 2.0;
    let got = amount["metrics"]["psi"]["value"].as_f64().unwrap();
    assert!((got - mean).abs() > 0.01, "{got} vs weighted mean {mean}");
    // Integrity rates stay the (exact) per-window merge.
    assert_eq!(
        amount["metrics"]["missing_rate"]["merge"],
        "weighted_mean_exact"
    );

    // With window C, which has no histograms: the weighted mean, said so.
    let r = get(
        addr,
        &format!(
            "/api/models/hist/drift?version=v1&from={T0}&to={}",
            T0 + 900
        ),
        &[],
    )
    .await;
    let j = r.json();
    assert_eq!(j["method"], "weighted_mean", "{j}");
    assert_eq!(j["windows"], 3);
    for f in j["features"].as_array().unwrap() {
        assert_eq!(f["method"], "weighted_mean");
        assert_eq!(f["metrics"]["psi"]["merge"], "weighted_mean_approx");
    }
}

#[tokio::test]
async fn ranges_rows_and_query_settings_are_bounded() {
    let mut cfg = seeded().await;
    cfg.api.max_range = Duration::from_secs(600);
    cfg.api.max_rows = 2;
    let telemetry = Arc::new(Telemetry::for_config(&cfg));
    let api = ApiServer::start(&cfg, telemetry.clone())
        .await
        .expect("api starts");
    let addr = api.local_addr();

    // A range longer than api.max_range: 400 naming the limit.
    let r = get(
        addr,
        &format!(
            "/api/models/fraud/timeseries?metric=accuracy&version=v1&from={T0}&to={}",
            T0 + 601
        ),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let msg = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("api.max_range (10m)") && msg.contains("10m 1s"),
        "{msg}"
    );
    // Exactly the limit is fine: [T0, T0 + 600) holds 2 windows, an exact
    // fit of the 2-row limit, not truncated.
    let r = get(
        addr,
        &format!(
            "/api/models/fraud/timeseries?metric=accuracy&version=v1&from={T0}&to={}",
            T0 + 600
        ),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["truncated"], false);
    assert!(!r.headers.contains_key("x-modelwatch-truncated"));
    assert_eq!(j["series"][0]["points"].as_array().unwrap().len(), 2);

    // Without from / to: the last 600 s up to the newest data of the model
    // (last_seen T0 + 900), window starts in [T0 + 301, T0 + 901): T0 + 600.
    let r = get(
        addr,
        "/api/models/fraud/timeseries?metric=accuracy,prediction_count,label_coverage&version=v1",
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(
        (j["from"].as_u64(), j["to"].as_u64()),
        (Some(u64::from(T0 + 301)), Some(u64::from(T0 + 901)))
    );
    // 3 rows (3 metrics x 1 window) cut at 2: said in the body and a header.
    assert_eq!(j["truncated"], true, "{j}");
    assert_eq!(r.headers["x-modelwatch-truncated"], "true");
    let n: usize = j["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["points"].as_array().unwrap().len())
        .sum();
    assert_eq!(n, 2);
    let text = telemetry.encode();
    for line in [
        "modelwatch_http_limited_total{limit=\"max_range\"} 1",
        "modelwatch_http_limited_total{limit=\"max_rows\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing");
    }
    // Only `from`: the range is max_range long.
    let r = get(
        addr,
        &format!("/api/models/fraud/segments?version=v1&metric=accuracy&from={T0}"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["to"].as_u64(), Some(u64::from(T0 + 600)));
    api.stop().await;

    // The API's ClickHouse client is read-only and time-bounded, on the
    // real server.
    cfg.api.query_timeout = Duration::from_secs(1);
    let state = modelwatch::api::ApiState::new(&cfg, Arc::new(Telemetry::for_config(&cfg)));
    let err = state
        .reader()
        .query("CREATE TABLE mw_api_write_probe (a UInt8) ENGINE = Memory")
        .execute()
        .await
        .expect_err("a write through the API client is refused")
        .to_string();
    assert!(err.contains("readonly"), "{err}");
    let started = Instant::now();
    let err = state
        .reader()
        .query("SELECT count() FROM numbers(100000000000)")
        .fetch_all::<u64>()
        .await
        .expect_err("a long query is stopped at max_execution_time")
        .to_string();
    assert!(
        err.contains("Timeout exceeded") || err.contains("TIMEOUT_EXCEEDED"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
