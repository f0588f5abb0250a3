//! The axum server: routes, bearer-token auth, the embedded dashboard, and
//! start / stop.
//!
//! Auth: when `api.tokens` is non-empty every route needs
//! `Authorization: Bearer <token>` (or the `modelwatch_token` cookie the
//! dashboard's sign-in page sets), except `/healthz` and `/readyz` with
//! `api.open_health` and `/metrics` with `api.open_metrics`. Tokens are
//! compared as SHA-256 digests in constant time, and never logged.

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
use tokio::sync::oneshot;
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
        }
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
        let app = router(ApiState::new(cfg, telemetry));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "http server failed");
            }
        });
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
}
