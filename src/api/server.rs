//! The axum server: routes, bearer-token auth, the embedded dashboard, and
//! start / stop.
//!
//! Auth: when `api.tokens` is non-empty every route needs
//! `Authorization: Bearer <token>` (or the `modelwatch_token` cookie the
//! dashboard's sign-in page sets), except `/healthz` and `/readyz` with
//! `api.open_health` and `/metrics` with `api.open_metrics`. Tokens are
//! compared as SHA-256 digests in constant time, and never logged.
//!
//! Limits (all in `[api]`, each counted in `modelwatch_http_limited_total`
//! when hit): a request head must arrive within `header_read_timeout`, which
//! also closes idle keep-alive connections (hyper's own timer), so slow
//! clients cannot hold connections; at most `max_connections` connections
//! are served at once (a semaphore on accept: beyond it new connections
//! wait in the listen backlog); at most `max_concurrent_requests` `/api/`
//! requests run at once, so ClickHouse queries cannot crowd out `/healthz`;
//! every request ends within `request_timeout` (503). While auth is off, a
//! `Host` header that names neither a loopback host, an IP address nor one
//! of `allowed_hosts` is refused with 403 (DNS rebinding: a page of
//! `evil.example` whose name resolves to 127.0.0.1 sends `Host:
//! evil.example`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use super::routes;
use crate::config::Config;
use crate::sinks::clickhouse::ClickHouseSink;
use crate::telemetry::{Telemetry, CONTENT_TYPE};

/// The dashboard page.
const INDEX_HTML: &str = include_str!("assets/index.html");
/// The dashboard script (plain JS, SVG charts, no dependencies).
const APP_JS: &str = include_str!("assets/app.js");
/// The dashboard style sheet.
const STYLE_CSS: &str = include_str!("assets/style.css");
/// The sign-in page shown instead of the dashboard without a valid token.
const LOGIN_HTML: &str = include_str!("assets/login.html");

/// How long `/readyz` waits for ClickHouse.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// ClickHouse, for reads and the readiness ping.
    pub ch: ClickHouseSink,
    /// The live service's telemetry.
    pub telemetry: Arc<Telemetry>,
    /// SHA-256 digests of the accepted tokens (empty: no auth).
    tokens: Arc<Vec<[u8; 32]>>,
    open_health: bool,
    open_metrics: bool,
    /// Window size used when a request names none (the first configured size).
    pub default_window_seconds: u32,
    /// Dashboard auto-refresh period, seconds.
    pub refresh_seconds: u32,
    /// How drift is measured, for drift recomputed over a range from histograms.
    pub drift: Arc<crate::metrics::DriftConfig>,
    /// Extra `Host` names accepted while auth is off (lowercase).
    allowed_hosts: Arc<Vec<String>>,
    /// Slots of `/api/` requests (`api.max_concurrent_requests`).
    api_slots: Arc<Semaphore>,
    request_timeout: Duration,
    /// Longest range one request reads, seconds (`api.max_range`).
    pub max_range_s: u32,
    /// Most rows one query returns (`api.max_rows`).
    pub max_rows: u64,
    /// ClickHouse `max_execution_time` of API queries, seconds.
    pub query_timeout_s: u64,
}

impl ApiState {
    /// State for `cfg` serving `telemetry`.
    pub fn new(cfg: &Config, telemetry: Arc<Telemetry>) -> Self {
        ApiState {
            ch: ClickHouseSink::new(&cfg.clickhouse),
            telemetry,
            tokens: Arc::new(cfg.api.tokens.iter().map(|t| digest(t.expose())).collect()),
            open_health: cfg.api.open_health,
            open_metrics: cfg.api.open_metrics,
            default_window_seconds: cfg
                .windows
                .sizes
                .first()
                .map_or(300, |d| u32::try_from(d.as_secs()).unwrap_or(300)),
            refresh_seconds: 10,
            drift: Arc::new(crate::pipeline::drift_config(cfg)),
            allowed_hosts: Arc::new(
                cfg.api
                    .allowed_hosts
                    .iter()
                    .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
            ),
            api_slots: Arc::new(Semaphore::new(cfg.api.max_concurrent_requests.max(1))),
            request_timeout: cfg.api.request_timeout,
            max_range_s: u32::try_from(cfg.api.max_range.as_secs()).unwrap_or(u32::MAX),
            max_rows: cfg.api.max_rows.max(1),
            query_timeout_s: cfg.api.query_timeout.as_secs().max(1),
        }
    }

    /// A ClickHouse client for API reads: `readonly = 2` (reads only; unlike
    /// `readonly = 1` it lets the query set its own limits, which ClickHouse
    /// 18.16 needs to accept `max_execution_time` in the same request) and
    /// `max_execution_time = api.query_timeout`.
    pub fn reader(&self) -> clickhouse::Client {
        self.ch
            .client()
            .clone()
            .with_option("readonly", "2")
            .with_option("max_execution_time", self.query_timeout_s.to_string())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        if self.tokens.is_empty() {
            return true;
        }
        let Some(given) = presented_token(headers) else {
            return false;
        };
        let d = digest(given);
        // Check every token so timing does not reveal which one matched.
        self.tokens
            .iter()
            .fold(false, |ok, t| ok | constant_time_eq(t, &d))
    }
}

/// True when `host` (a `Host` header value) may reach the API while auth
/// is off: a loopback name (`localhost`), an IP address (a DNS rebinding
/// attack always sends its own host *name*), or one of `allowed`
/// (lowercase, with or without the port). No header at all (HTTP/1.0
/// clients) is accepted: browsers always send one.
pub fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(raw) = host else {
        return true;
    };
    let full = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    // The name without its port: `[v6]:p`, `name:p`, `v4:p`.
    let name = if let Some(rest) = full.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port))
                if port.is_empty()
                    || port
                        .strip_prefix(':')
                        .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())) =>
            {
                v6.to_owned()
            }
            _ => return false,
        }
    } else {
        match full.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n.to_owned(),
            Some(_) => return false,
            None => full.clone(),
        }
    };
    let name = name.trim_end_matches('.');
    name == "localhost"
        || name.parse::<std::net::IpAddr>().is_ok()
        || allowed.iter().any(|a| *a == full || a == name)
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of the `Authorization` header, else of the
/// `modelwatch_token` cookie.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, token) = v.trim().split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("modelwatch_token="))
}

/// Refuses a non-loopback `Host` while auth is off (see [`host_allowed`]).
async fn host_check(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    if !s.tokens.is_empty() {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if host_allowed(host, &s.allowed_hosts) {
        return next.run(req).await;
    }
    s.telemetry.record_http_limit("host");
    (
        StatusCode::FORBIDDEN,
        Json(serde_json::json!({
            "error": "Host not allowed: without api.tokens the API answers only requests addressed to localhost, an IP address or a name of api.allowed_hosts (protection against DNS rebinding)"
        })),
    )
        .into_response()
}

/// Bounds every request by `api.request_timeout`, and runs at most
/// `api.max_concurrent_requests` `/api/` requests at once (the others
/// wait, within the timeout).
async fn limits(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let limit = s.request_timeout;
    let run = async {
        let _slot = if req.uri().path().starts_with("/api/") {
            let slot = match s.api_slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    s.telemetry.record_http_limit("max_concurrent_requests");
                    match s.api_slots.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
                    }
                }
            };
            Some(slot)
        } else {
            None
        };
        next.run(req).await
    };
    match tokio::time::timeout(limit, run).await {
        Ok(resp) => resp,
        Err(_) => {
            s.telemetry.record_http_limit("request_timeout");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({
                    "error": format!(
                        "the request took longer than api.request_timeout ({}): narrow the range or try again",
                        humantime::format_duration(limit)
                    )
                })),
            )
                .into_response()
        }
    }
}

async fn auth(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = (s.open_health && (path == "/healthz" || path == "/readyz"))
        || (s.open_metrics && path == "/metrics")
        || path == "/login";
    if open || s.authorized(req.headers()) {
        return next.run(req).await;
    }
    let mut resp = if path.starts_with("/api/")
        || path == "/metrics"
        || path == "/healthz"
        || path == "/readyz"
    {
        (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({
                "error": "missing or invalid bearer token: send Authorization: Bearer <token> (api.tokens)"
            })),
        )
            .into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            LOGIN_HTML,
        )
            .into_response()
    };
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"modelwatch\""),
    );
    resp
}

/// The full router: API, dashboard, `/metrics`, health; auth applied.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", get(login))
        .route("/assets/app.js", get(app_js))
        .route("/assets/style.css", get(style_css))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(routes::api_routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), host_check))
        .layer(middleware::from_fn_with_state(state.clone(), limits))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn login() -> Response {
    asset("text/html; charset=utf-8", LOGIN_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

async fn not_found(req: Request<Body>) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": format!("no route for {}", req.uri().path()) })),
    )
        .into_response()
}

async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

async fn readyz(State(s): State<ApiState>) -> Response {
    let r = &s.telemetry.readiness;
    let running = r.running.load(std::sync::atomic::Ordering::Relaxed);
    let kafka = r.kafka_ok.load(std::sync::atomic::Ordering::Relaxed);
    let partitions = r
        .partitions_assigned
        .load(std::sync::atomic::Ordering::Relaxed);
    let clickhouse = match tokio::time::timeout(READY_TIMEOUT, s.ch.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", READY_TIMEOUT.as_secs())),
    };
    let ready = running && kafka && partitions > 0 && clickhouse.is_ok();
    let body = serde_json::json!({
        "ready": ready,
        "checks": {
            "service_running": running,
            "kafka_reachable": kafka,
            "partitions_assigned": partitions,
            "input_partitions": r.input_partitions.load(std::sync::atomic::Ordering::Relaxed),
            "clickhouse_reachable": clickhouse.is_ok(),
            "clickhouse_error": clickhouse.err(),
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], s.telemetry.encode()).into_response()
}

/// Per-connection limits of [`serve`].
struct ConnLimits {
    max_connections: usize,
    header_read_timeout: Duration,
}

/// Accepts connections (at most `max_connections` at once) and serves each
/// over HTTP/1.1 with hyper's header-read timeout, until `shutdown`; then
/// lets open connections finish their request (bounded by the caller).
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    telemetry: Arc<Telemetry>,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                telemetry.record_http_limit("max_connections");
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    telemetry.record_http_limit("header_read_timeout");
                }
                tracing::debug!(error = %e, "http connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A running HTTP server; stops on [`ApiServer::stop`] or drop.
pub struct ApiServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `cfg.api.listen` and serves in a background task.
    pub async fn start(cfg: &Config, telemetry: Arc<Telemetry>) -> Result<ApiServer> {
        let listener = tokio::net::TcpListener::bind(&cfg.api.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (api.listen; MODELWATCH_API__LISTEN)",
                    cfg.api.listen
                )
            })?;
        let addr = listener.local_addr().context("no local address")?;
        if cfg.api.tokens.is_empty() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "http api listens beyond loopback without api.tokens: anyone who can reach this address reads the monitoring data; set api.tokens (MODELWATCH_API__TOKENS) or listen on 127.0.0.1");
        }
        let state = ApiState::new(cfg, telemetry);
        let telemetry = state.telemetry.clone();
        let app = router(state);
        let (tx, rx) = oneshot::channel::<()>();
        let limits = ConnLimits {
            max_connections: cfg.api.max_connections.max(1),
            header_read_timeout: cfg.api.header_read_timeout,
        };
        let task = tokio::spawn(serve(listener, app, telemetry, limits, async {
            let _ = rx.await;
        }));
        tracing::info!(%addr, auth = !cfg.api.tokens.is_empty(), "http api and dashboard listening");
        Ok(ApiServer {
            addr,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<address>/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Stops accepting, lets in-flight requests finish (bounded by 5 s).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Serves until `shutdown` resolves, then stops.
    pub async fn serve_until(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        self.stop().await;
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_token(&h), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; modelwatch_token=xyz"),
        );
        assert_eq!(presented_token(&h), Some("xyz"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(presented_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(presented_token(&h), None);
        assert!(constant_time_eq(&digest("a"), &digest("a")));
        assert!(!constant_time_eq(&digest("a"), &digest("b")));
    }

    #[test]
    fn hosts_allowed_without_auth() {
        let allowed = vec!["mw.example.org".to_string(), "edge:8443".to_string()];
        for ok in [
            None,
            Some("localhost"),
            Some("LOCALHOST:8089"),
            Some("localhost."),
            Some("127.0.0.1"),
            Some("127.0.0.1:8089"),
            Some("[::1]"),
            Some("[::1]:8089"),
            Some("10.0.0.5:8089"),
            Some("mw.example.org"),
            Some("mw.example.org:8089"),
            Some("edge:8443"),
        ] {
            assert!(host_allowed(ok, &allowed), "{ok:?}");
        }
        for refused in [
            Some("evil.example"),
            Some("evil.example:8089"),
            Some("localhost.evil.example"),
            Some("127.0.0.1.nip.io"),
            Some("edge:9999"),
            Some("[::1"),
            Some("[::1]evil.example"),
            Some("localhost:80:80"),
            Some(""),
        ] {
            assert!(!host_allowed(refused, &allowed), "{refused:?}");
        }
    }
}
