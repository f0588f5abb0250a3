//! The HTTP server and the webhooks under hostile peers, on loopback:
//! slow-header clients are cut off at `api.header_read_timeout`, idle
//! connections do not starve `/healthz`, the connection limit holds and is
//! counted, a DNS-rebinding `Host` is refused while auth is off; webhook
//! bodies carry producer identifiers escaped for each target, and a
//! redirecting receiver is not followed (its target never sees the secret).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use modelwatch::api::ApiServer;
use modelwatch::config::{Config, Secret, WebhookConfig, WebhookKind};
use modelwatch::model::{AlertEvent, AlertStatus, Severity};
use modelwatch::sinks::webhook::{DeliveryRecord, Notifier};
use modelwatch::telemetry::Telemetry;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config() -> Config {
    let mut cfg = Config::default();
    cfg.api.listen = "127.0.0.1:0".into();
    cfg
}

async fn start(cfg: &Config) -> (ApiServer, Arc<Telemetry>) {
    let telemetry = Arc::new(Telemetry::for_config(cfg));
    let api = ApiServer::start(cfg, telemetry.clone())
        .await
        .expect("api starts");
    (api, telemetry)
}

/// One HTTP/1.0 GET with the given `Host`; (status, body).
async fn get(addr: SocketAddr, path: &str, host: &str, extra: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("answer within 10 s")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of `modelwatch_http_limited_total{limit="..."}`, 0 when absent.
fn limited(t: &Telemetry, limit: &str) -> u64 {
    let needle = format!("modelwatch_http_limited_total{{limit=\"{limit}\"}} ");
    t.encode()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[tokio::test]
async fn a_slow_header_connection_is_closed_within_the_timeout() {
    let mut cfg = config();
    cfg.api.header_read_timeout = Duration::from_secs(1);
    let (api, telemetry) = start(&cfg).await;
    let mut s = TcpStream::connect(api.local_addr()).await.unwrap();
    // Half a request line, then nothing.
    s.write_all(b"GET /healthz HT").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the server closes the connection within 5 s");
    let elapsed = started.elapsed();
    // Closed (EOF or reset), no request answered.
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}, expected about 1 s"
    );
    // An idle keep-alive connection (no byte at all) is closed the same way.
    let mut idle = TcpStream::connect(api.local_addr()).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("an idle connection is closed within 5 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Counted (the counter moves once the connection task has ended).
    let deadline = Instant::now() + Duration::from_secs(5);
    while limited(&telemetry, "header_read_timeout") < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(limited(&telemetry, "header_read_timeout"), 2);
    api.stop().await;
}

#[tokio::test]
async fn two_hundred_idle_connections_do_not_stop_healthz() {
    // Default limits: 512 connections, 10 s header timeout.
    let cfg = config();
    let (api, telemetry) = start(&cfg).await;
    let addr = api.local_addr();
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        if i % 2 == 0 {
            // Half of them send a partial request head.
            s.write_all(b"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                .await
                .unwrap();
        }
        idle.push(s);
    }
    for _ in 0..5 {
        let started = Instant::now();
        let (status, body) = get(addr, "/healthz", "127.0.0.1", "").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "/healthz took {:?} with 200 idle connections",
            started.elapsed()
        );
    }
    assert_eq!(limited(&telemetry, "max_connections"), 0);
    drop(idle);
    api.stop().await;
}

#[tokio::test]
async fn beyond_max_connections_new_ones_wait_for_a_free_slot() {
    let mut cfg = config();
    cfg.api.max_connections = 4;
    cfg.api.header_read_timeout = Duration::from_secs(1);
    let (api, telemetry) = start(&cfg).await;
    let addr = api.local_addr();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Let the server accept all four before the fifth arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let (status, _) = get(addr, "/healthz", "127.0.0.1", "").await;
    let waited = started.elapsed();
    assert_eq!(status, 200);
    // Served once the idle ones were cut at the 1 s header timeout.
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert!(limited(&telemetry, "max_connections") >= 1);
    api.stop().await;
}

#[tokio::test]
async fn a_rebinding_host_is_refused_without_tokens_and_accepted_with_them() {
    let (api, telemetry) = start(&config()).await;
    let addr = api.local_addr();
    let port = addr.port();
    for host in [
        format!("localhost:{port}"),
        "localhost".to_string(),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (status, body) = get(addr, "/api/openapi.json", &host, "").await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    let (status, body) = get(
        addr,
        "/api/openapi.json",
        &format!("evil.example:{port}"),
        "",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let j: Value = serde_json::from_str(&body).unwrap();
    assert!(
        j["error"].as_str().unwrap().contains("api.allowed_hosts"),
        "{body}"
    );
    let (status, _) = get(addr, "/", "evil.example", "").await;
    assert_eq!(status, 403);
    assert_eq!(limited(&telemetry, "host"), 2);
    api.stop().await;

    // An allow-listed name passes.
    let mut cfg = config();
    cfg.api.allowed_hosts = vec!["modelwatch.internal".into()];
    let (api, _) = start(&cfg).await;
    let (status, _) = get(
        api.local_addr(),
        "/api/openapi.json",
        "modelwatch.internal:8089",
        "",
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = get(api.local_addr(), "/api/openapi.json", "evil.example", "").await;
    assert_eq!(status, 403);
    api.stop().await;

    // With tokens the token decides, whatever the Host.
    let mut cfg = config();
    cfg.api.tokens = vec![Secret("s3cret".into())];
    let (api, _) = start(&cfg).await;
    let (status, _) = get(
        api.local_addr(),
        "/api/openapi.json",
        "evil.example",
        "Authorization: Bearer s3cret\r\n",
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = get(api.local_addr(), "/api/openapi.json", "evil.example", "").await;
    assert_eq!(status, 401);
    api.stop().await;
}

/// A "ClickHouse" on 127.0.0.1 that accepts connections and never answers.
async fn hanging_clickhouse() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    url
}

#[tokio::test]
async fn slow_queries_end_at_the_request_timeout_and_never_block_healthz() {
    let mut cfg = config();
    cfg.clickhouse.url = hanging_clickhouse().await;
    cfg.api.request_timeout = Duration::from_secs(1);
    cfg.api.max_concurrent_requests = 1;
    let (api, telemetry) = start(&cfg).await;
    let addr = api.local_addr();
    let started = Instant::now();
    let slow = tokio::spawn(async move { get(addr, "/api/models", "127.0.0.1", "").await });
    let queued = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        get(addr, "/api/alerts", "127.0.0.1", "").await
    });
    // While both wait on ClickHouse (one holding the only slot), health answers.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let t = Instant::now();
    assert_eq!(get(addr, "/healthz", "127.0.0.1", "").await.0, 200);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    for h in [slow, queued] {
        let (status, body) = h.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("api.request_timeout (1s)"), "{body}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(limited(&telemetry, "request_timeout"), 2);
    assert_eq!(limited(&telemetry, "max_concurrent_requests"), 1);
    api.stop().await;
}

// ------------------------------------------------------------ webhooks

/// A request a receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// An axum server on 127.0.0.1 that records every request and answers
/// with `reply` (status, optional Location).
async fn receiver(reply: (u16, Option<String>)) -> (String, Arc<Mutex<Vec<Got>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: HeaderMap, body: axum::body::Bytes| {
            let seen = seen.clone();
            let reply = reply.clone();
            async move {
                seen.lock().unwrap().push(Got {
                    path: uri.path().to_owned(),
                    headers,
                    body: body.to_vec(),
                });
                let mut resp = axum::http::Response::new(axum::body::Body::from("{}"));
                *resp.status_mut() = axum::http::StatusCode::from_u16(reply.0).unwrap();
                if let Some(loc) = reply.1 {
                    resp.headers_mut().insert("location", loc.parse().unwrap());
                }
                resp
            }
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, got)
}

fn hook(name: &str, kind: WebhookKind, url: &str) -> WebhookConfig {
    WebhookConfig {
        name: name.into(),
        kind,
        url: Secret(url.into()),
        url_env: None,
        secret_env: None,
        secret_file: None,
        min_severity: Severity::Warning,
        rules: Vec::new(),
        send_resolved: true,
        timeout: Duration::from_secs(5),
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        jira_project: Some("OPS".into()),
        jira_issue_type: None,
        jira_user: None,
    }
}

const EVIL: &str = "<!channel> <http://evil|click>";

fn hostile_alert() -> AlertEvent {
    AlertEvent {
        alert_id: "0123456789abcdef0123456789abcdef".into(),
        rule: "feature_drift".into(),
        status: AlertStatus::Firing,
        severity: Severity::Critical,
        model_id: EVIL.into(),
        model_version: "v1 [x|http://evil]".into(),
        segment: "country=<@U0123>".into(),
        feature: Some("{html}<script>".into()),
        metric: "psi".into(),
        value: 0.5,
        threshold: 0.2,
        baseline: None,
        p_value: None,
        window_start: 1_704_067_200_000,
        window_end: 1_704_067_500_000,
        fired_at: 1_704_067_600_000,
        message: format!("psi of {EVIL} is 0.5 {}", "y".repeat(3000)),
    }
}

async fn outcomes(n: &Notifier, want: usize) -> Vec<DeliveryRecord> {
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while log.len() < want && Instant::now() < deadline {
        log.extend(n.take_log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log
}

fn json(g: &Got) -> Value {
    serde_json::from_slice(&g.body).expect("json body")
}

#[tokio::test]
async fn hostile_identifiers_are_escaped_in_every_body() {
    let (slack_url, slack) = receiver((200, None)).await;
    let (jira_url, jira) = receiver((201, None)).await;
    let (pd_url, pd) = receiver((202, None)).await;
    let (generic_url, generic) = receiver((200, None)).await;
    let mut pd_cfg = hook("pd", WebhookKind::Pagerduty, &pd_url);
    pd_cfg.secret_env = Some("PD_KEY".into());
    let mut jira_cfg = hook("jira", WebhookKind::Jira, &jira_url);
    jira_cfg.secret_env = Some("JIRA_TOKEN".into());
    let env = HashMap::from([
        ("PD_KEY".to_string(), "routing-123".to_string()),
        ("JIRA_TOKEN".to_string(), "tok".to_string()),
    ]);
    let n = Notifier::start(
        &[
            hook("slack", WebhookKind::Slack, &slack_url),
            jira_cfg,
            pd_cfg,
            hook("generic", WebhookKind::Generic, &generic_url),
        ],
        10,
        &env,
    )
    .expect("notifier");
    n.enqueue(&[hostile_alert()]);
    let log = outcomes(&n, 4).await;
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(log.iter().all(|r| r.outcome == "delivered"), "{log:?}");

    let s = slack.lock().unwrap().clone();
    let text = json(&s[0])["text"].as_str().unwrap().to_owned();
    assert!(!text.contains('<') && !text.contains('>'), "{text}");
    assert!(
        text.contains("&lt;!channel&gt; &lt;http://evil|click&gt;"),
        "{text}"
    );
    assert!(text.contains("country=&lt;@U0123&gt;"), "{text}");
    assert!(text.chars().count() <= 3000);

    let j = jira.lock().unwrap().clone();
    assert_eq!(j[0].path, "/rest/api/2/issue");
    let f = &json(&j[0])["fields"];
    let d = f["description"].as_str().unwrap();
    assert!(d.contains("v1 \\[x\\|http://evil\\]"), "{d}");
    assert!(d.contains("\\{html\\}<script>"), "{d}");
    assert!(!d.contains("[x|") && !d.contains(" {html}"), "{d}");
    assert!(f["summary"].as_str().unwrap().chars().count() <= 250);

    let p = pd.lock().unwrap().clone();
    let body = json(&p[0]);
    let summary = body["payload"]["summary"].as_str().unwrap();
    assert_eq!(
        summary.chars().count(),
        1024,
        "bounded to the PagerDuty limit"
    );
    assert!(
        summary.contains(EVIL),
        "PagerDuty renders no markup: plain text"
    );

    // Generic: JSON, the identifier as it came, serde-escaped.
    let g = generic.lock().unwrap().clone();
    assert_eq!(json(&g[0])["model_id"], EVIL);
}

#[tokio::test]
async fn a_redirecting_receiver_is_not_followed() {
    let (target_url, target) = receiver((200, None)).await;
    let (hook_url, hooked) = receiver((307, Some(format!("{target_url}/steal")))).await;
    for kind in [WebhookKind::Generic, WebhookKind::Jira] {
        let mut cfg = hook("redirected", kind, &hook_url);
        cfg.secret_env = Some("HOOK_SECRET".into());
        let env = HashMap::from([("HOOK_SECRET".to_string(), "s3cret-value".to_string())]);
        let n = Notifier::start(&[cfg], 10, &env).expect("notifier");
        n.enqueue(&[hostile_alert()]);
        let log = outcomes(&n, 1).await;
        assert_eq!(log.len(), 1, "{log:?}");
        let r = &log[0];
        assert_eq!(
            (r.outcome, r.http_status, r.attempts),
            ("failed", 307, 1),
            "{r:?}"
        );
        assert!(r.error.contains("redirect not followed"), "{}", r.error);
    }
    // The first receiver saw the signed / authenticated requests...
    let h = hooked.lock().unwrap().clone();
    assert_eq!(h.len(), 2);
    assert!(h[0].headers.contains_key("x-modelwatch-signature"));
    assert!(h[1].headers.contains_key("authorization"));
    // ... and the redirect target nothing at all.
    assert!(target.lock().unwrap().is_empty());
}

// ------------------------------------------------------------ secrets

#[test]
fn check_config_prints_no_secret() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut f,
        b"[kafka.properties]\n\"sasl.password\" = \"kafka-pw-1\"\n\"ssl.key.password\" = \"key-pw-2\"\n\
          [clickhouse]\nurl = \"http://chuser:ch-url-pw-3@127.0.0.1:8123\"\n\
          [api]\ntokens = [\"api-token-4\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelwatch"))
        .args(["--config", f.path().to_str().unwrap(), "check-config"])
        .env("MODELWATCH_CLICKHOUSE__PASSWORD", "ch-pw-5")
        .output()
        .expect("run modelwatch check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("url=http://***@127.0.0.1:8123"), "{stdout}");
    for s in [
        "kafka-pw-1",
        "key-pw-2",
        "ch-url-pw-3",
        "api-token-4",
        "ch-pw-5",
    ] {
        assert!(
            !stdout.contains(s) && !stderr.contains(s),
            "{s} printed:\n{stdout}\n{stderr}"
        );
    }
}
