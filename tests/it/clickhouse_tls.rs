//! ClickHouse over HTTPS, end to end: ClickHouse 18.16's own `https_port`
//! (no proxy: it works, see `support::clickhouse::TlsSettings`) with a CA,
//! a server certificate for `localhost` and a client certificate made by
//! the `openssl` CLI at run time (no key is committed).
//!
//! - The real `modelwatch` binary (`reference import`, `run
//!   --exit-when-idle`) reads a tansu broker and writes the exact window
//!   metrics over https trusting `clickhouse.ca_file`; the HTTP API reads
//!   them back over https (`/api/models/{model}/timeseries`, what the
//!   dashboard draws).
//! - Without `clickhouse.ca_file`, with another CA, with a URL host the
//!   certificate does not name, and with an https URL to the plain HTTP
//!   port, the binary stops at startup within seconds with the TLS reason; a
//!   missing `ca_file` is refused at load.
//! - A server that requires client certificates (`verificationMode` strict)
//!   accepts the configured one and refuses a client without one, which is
//!   a permanent error, never retried.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelwatch::api::ApiServer;
use modelwatch::config::ClickHouseConfig;
use modelwatch::ingest::decode::encode_json;
use modelwatch::sinks::clickhouse::{ClickHouseSink, MetricRow, SinkError};
use modelwatch::sinks::clickhouse_tls::HANDSHAKE_TIMEOUT;
use modelwatch::telemetry::Telemetry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pipeline::{
    aligned_ago, assert_matches, dataset, expected, key, produce, read_final, reference_file,
    test_config, CLF, PARTITIONS,
};
use crate::support::clickhouse::{unique_database, ClickHouseServer, TlsSettings};
use crate::support::run_binary;
use crate::support::tansu::TansuBroker;
use crate::support::tls::Certs;

fn path(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}

/// The `error: ` line of a failed run.
fn error_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line:\n{log}"))
}

/// `MODELWATCH_*` variables of a child.
type Env = Vec<(String, String)>;

/// Replaces (or, with `None`, removes) `name` in `env`.
fn with(env: &[(String, String)], name: &str, value: Option<&str>) -> Env {
    let mut out: Env = env.iter().filter(|(k, _)| k != name).cloned().collect();
    if let Some(v) = value {
        out.push((name.to_owned(), v.to_owned()));
    }
    out
}

/// GET over plain HTTP/1.0 from the API: (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("response within 30 s")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    (status, body.to_owned())
}

#[test]
fn binary_writes_and_the_api_reads_over_https_and_an_untrusted_server_stops_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::make(dir.path(), "DNS:localhost");
    let server = ClickHouseServer::start_with_tls(&TlsSettings {
        cert: certs.server_cert.clone(),
        key: certs.server_key.clone(),
        client_ca: None,
    });
    let https_url = format!("https://localhost:{}", server.https_port());
    let broker = TansuBroker::start(PARTITIONS);
    let brokers = broker.bootstrap();
    let database = unique_database("mw_chtls");
    let mut cfg = test_config(&brokers, &database);
    cfg.clickhouse = ClickHouseConfig {
        url: https_url.clone(),
        database: database.clone(),
        ca_file: path(&certs.ca),
        ..ClickHouseConfig::default()
    };

    let t0 = aligned_ago(3 * 86_400_000);
    let d = dataset(t0);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(produce(&brokers, &d, &|_, ev| encode_json(ev)));

    let env: Vec<(String, String)> = [
        ("MODELWATCH_KAFKA__BROKERS", brokers.clone()),
        ("MODELWATCH_KAFKA__GROUP_ID", cfg.kafka.group_id.clone()),
        ("MODELWATCH_CLICKHOUSE__URL", https_url.clone()),
        ("MODELWATCH_CLICKHOUSE__CA_FILE", path(&certs.ca)),
        ("MODELWATCH_CLICKHOUSE__DATABASE", database.clone()),
        ("MODELWATCH_WINDOWS__SIZES", "1m".into()),
        ("MODELWATCH_WINDOWS__ALLOWED_LATENESS", "1h".into()),
        ("MODELWATCH_WINDOWS__IDLE_TIMEOUT", "2s".into()),
        ("MODELWATCH_WINDOWS__LABEL_HORIZON", "24h".into()),
        ("MODELWATCH_SERVICE__FLUSH_INTERVAL", "200ms".into()),
        // Other tests run at once: the binary's API (fixed port) stays off;
        // the API is tested in-process below.
        ("MODELWATCH_API__ENABLED", "false".into()),
        ("MODELWATCH_STATE__DIR", path(&dir.path().join("state"))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let reference = reference_file(&d.reference);
    let (ok, out, _) = run_binary(
        &[
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
    let (ok, log, _) = run_binary(
        &["run", "--exit-when-idle"],
        &env,
        &dir.path().join("run.log"),
    );
    assert!(ok, "modelwatch run over https failed:\n{log}");
    assert!(log.contains("input idle"), "{log}");

    // The exact metrics, read back over https.
    let sink = ClickHouseSink::new(&cfg.clickhouse);
    let rows = runtime.block_on(read_final(&sink));
    let (exact, approx) = expected(&d, true);
    assert!(exact.len() > 130, "{}", exact.len());
    assert_matches(&rows, &exact, &approx);
    assert!(rows.contains_key(&key(CLF, "", t0, "prediction_count", "")));

    // The API over https: the dashboard's time series of clf, exactly.
    let want: BTreeMap<u64, f64> = exact
        .iter()
        .filter(|(k, _)| k.0 == CLF && k.1.is_empty() && k.3 == "prediction_count")
        .map(|(k, v)| (u64::from(k.2), *v))
        .collect();
    assert!(want.len() >= 2, "{want:?}");
    let from = want.keys().next().copied().unwrap_or(0);
    let to = want.keys().last().copied().unwrap_or(0) + 60;
    let mut api_cfg = cfg.clone();
    api_cfg.api.listen = "127.0.0.1:0".into();
    runtime.block_on(async {
        let api = ApiServer::start(&api_cfg, Arc::new(Telemetry::for_config(&api_cfg)))
            .await
            .expect("api starts");
        let (status, body) = get(
            api.local_addr(),
            &format!("/api/models/{CLF}/timeseries?metric=prediction_count&version=v1&window=60&from={from}&to={to}"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let j: serde_json::Value = serde_json::from_str(&body).expect("json");
        let points = j["series"][0]["points"].as_array().expect("points");
        let got: BTreeMap<u64, f64> = points
            .iter()
            .map(|p| {
                (
                    p["window_start"].as_u64().expect("window_start"),
                    p["value"].as_f64().expect("value"),
                )
            })
            .collect();
        assert_eq!(got, want, "{body}");
    });

    // Settings that can never reach this server stop the binary at startup.
    let localhost_ip = format!("https://127.0.0.1:{}", server.https_port());
    let ca_file = "MODELWATCH_CLICKHOUSE__CA_FILE";
    let other_ca = path(&certs.other_ca);
    let https_to_http_port = format!("https://localhost:{}", server.http_port());
    let cases: [(&str, Env, &str); 4] = [
        ("no ca_file", with(&env, ca_file, None), "UnknownIssuer"),
        (
            "another CA",
            with(&env, ca_file, Some(&other_ca)),
            "UnknownIssuer",
        ),
        (
            "a host the certificate does not name",
            with(&env, "MODELWATCH_CLICKHOUSE__URL", Some(&localhost_ip)),
            "does not name the host of clickhouse.url",
        ),
        (
            "https to the plain HTTP port",
            with(
                &env,
                "MODELWATCH_CLICKHOUSE__URL",
                Some(&https_to_http_port),
            ),
            "the server did not speak TLS",
        ),
    ];
    for (case, bad_env, want) in cases {
        let (ok, log, secs) = run_binary(
            &["run", "--exit-when-idle"],
            &bad_env,
            &dir.path().join("bad.log"),
        );
        assert!(!ok, "{case}: the binary ran:\n{log}");
        let error = error_line(&log);
        eprintln!("{case}: {error} ({secs:.1} s)");
        assert!(
            error.contains("cannot reach ClickHouse at https://")
                && error.contains("TLS handshake with ClickHouse failed"),
            "{case}: {error}"
        );
        assert!(error.contains(want), "{case}: {error}");
        assert!(
            !error.contains("clickhouse-start.sh"),
            "{case}: not an unreachable server: {error}"
        );
        // ClickHouse's HTTP port answers a ClientHello with an error only
        // when the hello holds a newline byte; otherwise it waits, and the
        // handshake timeout (10 s) ends the attempt, with the same hint.
        let bound = if case.starts_with("https to the plain") {
            HANDSHAKE_TIMEOUT.as_secs_f64() + 5.0
        } else {
            10.0
        };
        assert!(secs < bound, "{case}: took {secs:.1} s");
    }

    // A CA file that does not exist is refused when the configuration loads.
    let (ok, log, _) = run_binary(
        &["check-config"],
        &with(&env, ca_file, Some("/nonexistent/ca.pem")),
        &dir.path().join("check.log"),
    );
    assert!(!ok, "{log}");
    let error = error_line(&log);
    assert!(
        error.contains("clickhouse.ca_file = \"/nonexistent/ca.pem\": cannot read it"),
        "{error}"
    );
}

/// `n` metric rows of one model, one window each.
fn metric_rows(n: u32, model: &str) -> Vec<MetricRow> {
    (0..n)
        .map(|i| MetricRow {
            model_id: model.into(),
            model_version: "v1".into(),
            segment: String::new(),
            window_start: 1_700_000_000 + 60 * i,
            window_seconds: 60,
            metric: "prediction_count".into(),
            feature: String::new(),
            value: f64::from(i),
            samples: u64::from(i),
            p_value: None,
            revision: 1,
        })
        .collect()
}

#[test]
fn a_server_requiring_client_certificates_accepts_ours_and_refuses_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::make(dir.path(), "DNS:localhost");
    let server = ClickHouseServer::start_with_tls(&TlsSettings {
        cert: certs.server_cert.clone(),
        key: certs.server_key.clone(),
        client_ca: Some(certs.ca.clone()),
    });
    let database = unique_database("mw_chmtls");
    let mutual = ClickHouseConfig {
        url: format!("https://localhost:{}", server.https_port()),
        database: database.clone(),
        ca_file: path(&certs.ca),
        client_cert_file: path(&certs.client_cert),
        client_key_file: path(&certs.client_key),
        ..ClickHouseConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // With the client certificate: migrate, write, read back.
        let sink = ClickHouseSink::new(&mutual);
        sink.ping().await.expect("ping with a client certificate");
        sink.migrate().await.expect("migrate over mutual TLS");
        let rows = metric_rows(500, "mtls");
        sink.write_metrics(&rows)
            .await
            .expect("write over mutual TLS");
        let (n, sum): (u64, f64) = sink
            .client()
            .query("SELECT count(), sum(value) FROM window_metrics FINAL WHERE model_id = 'mtls'")
            .fetch_one()
            .await
            .expect("read back");
        assert_eq!((n, sum), (500, f64::from(499 * 500 / 2)));

        // Without one: refused by the server, a permanent error that says so.
        let anonymous = ClickHouseConfig {
            client_cert_file: String::new(),
            client_key_file: String::new(),
            ..mutual.clone()
        };
        let started = Instant::now();
        let err = ClickHouseSink::new(&anonymous)
            .ping()
            .await
            .expect_err("a client without a certificate is refused");
        assert!(matches!(err, SinkError::Permanent(_)), "{err}");
        let text = err.to_string();
        eprintln!("no client certificate: {text}");
        assert!(
            text.contains("TLS handshake with ClickHouse failed")
                && text.contains("clickhouse.client_cert_file"),
            "{text}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{text}");
        // The API reading through such a client answers 503 with the reason.
        let mut api_cfg = modelwatch::config::Config {
            clickhouse: anonymous.clone(),
            ..modelwatch::config::Config::default()
        };
        api_cfg.api.listen = "127.0.0.1:0".into();
        let api = ApiServer::start(&api_cfg, Arc::new(Telemetry::for_config(&api_cfg)))
            .await
            .expect("api starts");
        let (status, body) = get(api.local_addr(), "/api/models").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("CertificateRequired"), "{body}");
        // A write without one is not retried either: it fails at once.
        let started = Instant::now();
        let err = ClickHouseSink::new(&anonymous)
            .write_metrics(&metric_rows(3, "anon"))
            .await
            .expect_err("write without a client certificate");
        assert!(matches!(err, SinkError::Permanent(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");

        // Insert throughput over https (mutual TLS) vs http, same server: a
        // note in the test log, not a benchmark.
        let plain = ClickHouseSink::new(&server.config(&database));
        let big = metric_rows(20_000, "speed");
        let mut secs = [0.0f64; 2];
        for round in 0..3 {
            for (i, s) in [&plain, &sink].into_iter().enumerate() {
                let t = Instant::now();
                s.write_metrics(&big).await.expect("timed write");
                if round > 0 {
                    secs[i] += t.elapsed().as_secs_f64();
                }
            }
        }
        eprintln!(
            "insert of 20000 rows (mean of 2): http {:.3} s, https {:.3} s, ratio https/http {:.2}",
            secs[0] / 2.0,
            secs[1] / 2.0,
            secs[1] / secs[0]
        );
    });

    // The binary's `migrate` with the client certificate from the environment.
    let env: Vec<(String, String)> = [
        ("MODELWATCH_CLICKHOUSE__URL", mutual.url.clone()),
        ("MODELWATCH_CLICKHOUSE__DATABASE", database.clone()),
        ("MODELWATCH_CLICKHOUSE__CA_FILE", mutual.ca_file.clone()),
        (
            "MODELWATCH_CLICKHOUSE__CLIENT_CERT_FILE",
            mutual.client_cert_file.clone(),
        ),
        (
            "MODELWATCH_CLICKHOUSE__CLIENT_KEY_FILE",
            mutual.client_key_file.clone(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let (ok, out, _) = run_binary(&["migrate"], &env, &dir.path().join("migrate.log"));
    assert!(ok && out.contains("is up to date"), "{out}");
    let (ok, log, secs) = run_binary(
        &["migrate"],
        &with(&env, "MODELWATCH_CLICKHOUSE__CLIENT_KEY_FILE", None),
        &dir.path().join("migrate-bad.log"),
    );
    assert!(!ok, "{log}");
    assert!(
        error_line(&log)
            .contains("clickhouse.client_cert_file is set without clickhouse.client_key_file"),
        "{log}"
    );
    assert!(secs < 10.0, "{secs}");
}
