//! The REST handlers (`/api/...`) and the ClickHouse queries behind them.
//!
//! Every read of `window_metrics` uses `FINAL`, so a revised window is seen
//! at its newest revision. Ranges are `[from, to)` on `window_start`. Values
//! over several windows combine as [`super::merge`] documents. Errors map to
//! HTTP statuses in one place ([`ApiError`]).
//!
//! Bounds: every query runs read-only with `max_execution_time`
//! ([`ApiState::reader`]); every `FINAL` read is limited to a time range of
//! at most `api.max_range` (a longer requested range is a 400; without
//! `from` / `to` the range ends at the model's newest data, see
//! [`request_range`]); a window-row query returns at most `api.max_rows`
//! rows, and a response cut there says `"truncated": true` and carries
//! `X-Modelwatch-Truncated: true`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::merge::{merge, Merged};
use super::params::{bounded_range, BadRequest, Params};
use super::server::ApiState;
use super::{OPENAPI_JSON, SERVICE_MODEL};
use crate::metrics::names::{is_drift, DRIFT_STATISTICS};
use crate::metrics::{
    names, DataAccumulator, FeatureHistogram, HistogramKind, MetricValue, ReferenceProfile,
};
use crate::sinks::clickhouse::SinkError;

/// An error of a handler, mapped to its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: a bad parameter, with the reason.
    #[error("{0}")]
    BadRequest(String),
    /// 404: nothing there.
    #[error("{0}")]
    NotFound(String),
    /// 503: ClickHouse did not answer.
    #[error("ClickHouse query failed: {0}")]
    Upstream(String),
}

impl From<BadRequest> for ApiError {
    fn from(e: BadRequest) -> Self {
        ApiError::BadRequest(e.0)
    }
}

impl From<clickhouse::error::Error> for ApiError {
    fn from(e: clickhouse::error::Error) -> Self {
        // A TLS failure's cause is deep in the error's chain: say it.
        ApiError::Upstream(
            crate::sinks::clickhouse_tls::tls_failure(&e).unwrap_or_else(|| e.to_string()),
        )
    }
}

impl From<SinkError> for ApiError {
    fn from(e: SinkError) -> Self {
        ApiError::Upstream(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Upstream(m) => {
                tracing::warn!(error = %m, "api query failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;
type Q = Query<HashMap<String, String>>;

/// The `/api/...` routes.
pub fn api_routes() -> Router<ApiState> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/config", get(ui_config))
        .route("/api/models", get(models))
        .route("/api/models/{model}", get(model))
        .route("/api/models/{model}/timeseries", get(timeseries))
        .route("/api/models/{model}/drift", get(drift))
        .route("/api/models/{model}/heatmap", get(heatmap))
        .route("/api/models/{model}/segments", get(segments))
        .route("/api/models/{model}/compare", get(compare))
        .route("/api/models/{model}/references", get(references))
        .route(
            "/api/models/{model}/versions/{version}/reference",
            get(reference),
        )
        .route("/api/alerts", get(alerts))
        .route("/api/service", get(service))
}

fn json_ok(v: impl Serialize) -> ApiResult {
    Ok(Json(v).into_response())
}

/// Header set on a response whose rows were cut at `api.max_rows`.
pub const TRUNCATED_HEADER: &str = "x-modelwatch-truncated";

/// `v` (an object) with `"truncated": truncated` added; a truncated answer
/// also carries [`TRUNCATED_HEADER`] and is counted.
fn json_rows(s: &ApiState, mut v: Value, truncated: bool) -> ApiResult {
    if let Value::Object(o) = &mut v {
        o.insert("truncated".into(), json!(truncated));
    }
    let mut resp = Json(v).into_response();
    if truncated {
        s.telemetry.record_http_limit("max_rows");
        resp.headers_mut().insert(
            TRUNCATED_HEADER,
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(resp)
}

/// Now, unix seconds.
fn now_s() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// Where a request without `from` / `to` ends: just after the newest
/// prediction seen of `model` (of any model when `None`; from the small
/// `model_versions` table), or now when there is none (and for
/// `__service__`, whose rows are wall-clock windows).
async fn anchor(s: &ApiState, model: Option<&str>) -> Result<u32, ApiError> {
    if model == Some(SERVICE_MODEL) {
        return Ok(now_s().saturating_add(1));
    }
    let sql = format!(
        "SELECT toUInt32(max(last_seen)) FROM model_versions{}",
        if model.is_some() {
            " WHERE model_id = ?"
        } else {
            ""
        }
    );
    let mut q = s.reader().query(&sql);
    if let Some(m) = model {
        q = q.bind(m);
    }
    let newest: Vec<u32> = q.fetch_all().await?;
    Ok(match newest.first() {
        Some(&t) if t > 0 => t.saturating_add(1),
        _ => now_s().saturating_add(1),
    })
}

/// The `[from, to)` of a request, at most `api.max_range` long: both given
/// and farther apart is a 400; one given, the other is `max_range` away;
/// none, the range ends at [`anchor`].
async fn request_range(
    s: &ApiState,
    p: &Params,
    model: Option<&str>,
) -> Result<(u32, u32), ApiError> {
    let from = p.time("from")?;
    let to = p.time("to")?;
    let end = match (from, to) {
        (None, None) => anchor(s, model).await?,
        _ => 0,
    };
    let r = bounded_range(from, to, end, s.max_range_s);
    if matches!(&r, Err(e) if e.0.contains("api.max_range")) {
        s.telemetry.record_http_limit("max_range");
    }
    Ok(r?)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn ui_config(State(s): State<ApiState>) -> ApiResult {
    json_ok(json!({
        "database": s.ch.database(),
        "default_window_seconds": s.default_window_seconds,
        "refresh_seconds": s.refresh_seconds,
    }))
}

/// Service metric names (rows of model `__service__`).
pub const SERVICE_METRICS: &[&str] = &[
    "events_consumed_count",
    "decode_failure_count",
    "dead_letter_count",
    "join_match_count",
    "join_expiration_count",
    "join_orphan_count",
    "late_prediction_count",
    "join_duplicate_count",
    "window_closed_count",
    "row_written_count",
    "alert_count",
    "clickhouse_retry_count",
    "limit_hit_count",
    "output_dropped_count",
    "dead_letter_truncated_count",
    "cpu_seconds",
    "resident_memory_bytes",
    "pending_predictions",
    "watermark_delay_seconds",
    "consumer_lag_messages",
];

fn check_metric(model: &str, metric: &str) -> Result<(), ApiError> {
    let known = if model == SERVICE_MODEL {
        SERVICE_METRICS.contains(&metric)
    } else {
        names::is_known(metric)
    };
    if known {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "unknown metric {metric:?}: see the metric list in the README (window_metrics.metric)"
        )))
    }
}

// ---------------------------------------------------------------- models

#[derive(Debug, Deserialize, clickhouse::Row)]
struct VersionMeta {
    model_id: String,
    model_version: String,
    task: String,
    first_seen: u32,
    last_seen: u32,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct Latest {
    model_id: String,
    model_version: String,
    metric: String,
    value: f64,
    samples: u64,
    latest_ws: u32,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct OpenAlert {
    model_id: String,
    model_version: String,
    severity: String,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct Drifted {
    model_id: String,
    model_version: String,
    window_start: u32,
    feature: String,
}

/// Health and metadata of every model (or of `only`).
async fn model_overview(
    s: &ApiState,
    only: Option<&str>,
    window: u32,
) -> Result<Vec<Value>, ApiError> {
    let c = &s.reader();
    let filter = if only.is_some() {
        " AND model_id = ?"
    } else {
        ""
    };
    let bind_model = |q: clickhouse::query::Query| match only {
        Some(m) => q.bind(m),
        None => q,
    };
    let metas: Vec<VersionMeta> = bind_model(c.query(&format!(
        "SELECT model_id, model_version, task, first_seen, last_seen FROM model_versions FINAL \
         WHERE 1 = 1{filter} ORDER BY model_id, model_version"
    )))
    .fetch_all()
    .await?;
    // "Latest" looks back at most api.max_range from the newest data seen,
    // so no FINAL read spans all of history.
    let newest_seen = metas
        .iter()
        .map(|m| m.last_seen)
        .max()
        .filter(|&t| t > 0)
        .unwrap_or_else(now_s);
    let bound = newest_seen.saturating_add(1).saturating_sub(s.max_range_s);
    let latest: Vec<Latest> = bind_model(c.query(&format!(
        "SELECT model_id, model_version, metric, argMax(value, window_start) AS value, \
         argMax(samples, window_start) AS samples, toUInt32(max(window_start)) AS latest_ws \
         FROM window_metrics FINAL \
         WHERE segment = '' AND feature = '' AND window_seconds = ? AND window_start >= toDateTime(?) \
         AND model_id != '' AND model_id != ? \
         AND has(['prediction_count', 'accuracy', 'estimated_accuracy', 'label_coverage', 'drifted_feature_count', 'latency_p95'], metric){filter} \
         GROUP BY model_id, model_version, metric ORDER BY model_id, model_version, metric"
    ))
    .bind(window)
    .bind(bound)
    .bind(SERVICE_MODEL))
    .fetch_all()
    .await?;
    let open: Vec<OpenAlert> = bind_model(
        c.query(&format!(
            "SELECT model_id, any(model_version) AS model_version, argMax(severity, fired_at_ms) AS severity \
         FROM alerts FINAL WHERE window_start >= toDateTime(?){filter} GROUP BY model_id, alert_id \
         HAVING argMax(status, fired_at_ms) = 'firing'"
        ))
        .bind(bound),
    )
    .fetch_all()
    .await?;
    // The newest window of each version (by its prediction count).
    let mut newest: BTreeMap<(String, String), u32> = BTreeMap::new();
    for l in latest.iter().filter(|l| l.metric == "prediction_count") {
        newest.insert((l.model_id.clone(), l.model_version.clone()), l.latest_ws);
    }
    let since = newest
        .values()
        .copied()
        .min()
        .unwrap_or(u32::MAX)
        .max(bound);
    let drifted: Vec<Drifted> = bind_model(
        c.query(&format!(
            "SELECT model_id, model_version, toUInt32(window_start) AS window_start, feature \
         FROM window_metrics FINAL WHERE metric = 'drift_detected' AND value = 1 AND segment = '' \
         AND window_seconds = ? AND window_start >= toDateTime(?){filter} ORDER BY feature"
        ))
        .bind(window)
        .bind(since),
    )
    .fetch_all()
    .await?;

    // Models: from the metadata store and from the metric rows.
    let mut versions: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for m in &metas {
        versions.entry(m.model_id.clone()).or_default().insert(
            m.model_version.clone(),
            json!({ "model_version": m.model_version, "task": m.task,
                    "first_seen": m.first_seen, "last_seen": m.last_seen }),
        );
    }
    for l in &latest {
        versions
            .entry(l.model_id.clone())
            .or_default()
            .entry(l.model_version.clone())
            .or_insert_with(|| {
                json!({ "model_version": l.model_version, "task": null,
                                       "first_seen": null, "last_seen": null })
            });
    }
    let mut out = Vec::new();
    for (model_id, vs) in versions {
        if model_id.is_empty() || model_id == SERVICE_MODEL {
            continue;
        }
        let mut vlist = Vec::new();
        let mut drifted_all: BTreeSet<String> = BTreeSet::new();
        for (version, mut meta) in vs {
            let key = (model_id.clone(), version.clone());
            let newest_ws = newest.get(&key).copied();
            let mut latest_values = serde_json::Map::new();
            for l in latest
                .iter()
                .filter(|l| l.model_id == model_id && l.model_version == version)
            {
                latest_values.insert(
                    l.metric.clone(),
                    json!({ "value": l.value, "samples": l.samples, "window_start": l.latest_ws }),
                );
            }
            let feats: Vec<&str> = drifted
                .iter()
                .filter(|d| {
                    d.model_id == model_id
                        && d.model_version == version
                        && Some(d.window_start) == newest_ws
                })
                .map(|d| d.feature.as_str())
                .collect();
            drifted_all.extend(feats.iter().map(|f| f.to_string()));
            let open_v = open
                .iter()
                .filter(|a| a.model_id == model_id && a.model_version == version)
                .count();
            if let Value::Object(o) = &mut meta {
                o.insert("latest_window".into(), json!(newest_ws));
                o.insert("latest".into(), Value::Object(latest_values));
                o.insert("drifted_features".into(), json!(feats));
                o.insert("open_alerts".into(), json!(open_v));
            }
            vlist.push(meta);
        }
        let model_open: Vec<&OpenAlert> = open.iter().filter(|a| a.model_id == model_id).collect();
        let critical = model_open.iter().any(|a| a.severity == "critical");
        let status = if critical {
            "critical"
        } else if !model_open.is_empty() || !drifted_all.is_empty() {
            "warning"
        } else {
            "ok"
        };
        out.push(json!({
            "model_id": model_id,
            "status": status,
            "open_alerts": model_open.len(),
            "drifted_features": drifted_all,
            "versions": vlist,
        }));
    }
    Ok(out)
}

async fn models(State(s): State<ApiState>, Query(q): Q) -> ApiResult {
    let p = Params::new(q, &["window"])?;
    let window = p.window("window")?.unwrap_or(s.default_window_seconds);
    json_ok(json!({ "window_seconds": window, "models": model_overview(&s, None, window).await? }))
}

async fn model(State(s): State<ApiState>, Path(model): Path<String>, Query(q): Q) -> ApiResult {
    let p = Params::new(q, &["window"])?;
    let window = p.window("window")?.unwrap_or(s.default_window_seconds);
    let mut all = model_overview(&s, Some(&model), window).await?;
    match all.pop() {
        Some(m) => json_ok(m),
        None => Err(ApiError::NotFound(format!("no model {model:?}"))),
    }
}

// ---------------------------------------------------------------- window rows

/// One stored per-window value.
#[derive(Debug, Clone, Deserialize, Serialize, clickhouse::Row)]
pub struct Point {
    /// Model version.
    pub model_version: String,
    /// Metric name.
    pub metric: String,
    /// Segment.
    pub segment: String,
    /// Feature.
    pub feature: String,
    /// Window start, unix seconds.
    pub window_start: u32,
    /// Value.
    pub value: f64,
    /// Samples behind the value.
    pub samples: u64,
    /// p-value, when the statistic has one.
    pub p_value: Option<f64>,
}

/// Which rows of `window_metrics` to read.
#[derive(Debug, Clone, Default)]
struct Selection<'a> {
    model: &'a str,
    versions: Option<Vec<String>>,
    metrics: Vec<String>,
    /// `None`: every segment.
    segment: Option<String>,
    /// `None`: every feature; `Some("")`: model level.
    feature: Option<String>,
    /// Only per-feature rows (feature != '').
    features_only: bool,
    window: u32,
    from: u32,
    to: u32,
}

/// The selected rows, at most `api.max_rows` of them, and whether there
/// were more.
async fn points(s: &ApiState, sel: &Selection<'_>) -> Result<(Vec<Point>, bool), ApiError> {
    let mut sql = String::from(
        "SELECT model_version, metric, segment, feature, toUInt32(window_start) AS window_start, \
         value, samples, p_value FROM window_metrics FINAL \
         WHERE model_id = ? AND window_seconds = ? AND window_start >= toDateTime(?) \
         AND window_start < toDateTime(?) AND has(?, metric)",
    );
    if sel.versions.is_some() {
        sql.push_str(" AND has(?, model_version)");
    }
    if sel.segment.is_some() {
        sql.push_str(" AND segment = ?");
    }
    if sel.feature.is_some() {
        sql.push_str(" AND feature = ?");
    }
    if sel.features_only {
        sql.push_str(" AND feature != ''");
    }
    // One row more than the limit tells a cut result from an exact fit.
    sql.push_str(" ORDER BY model_version, metric, segment, feature, window_start LIMIT ?");
    let mut q = s
        .reader()
        .query(&sql)
        .bind(sel.model)
        .bind(sel.window)
        .bind(sel.from)
        .bind(sel.to)
        .bind(&sel.metrics);
    if let Some(v) = &sel.versions {
        q = q.bind(v);
    }
    if let Some(seg) = &sel.segment {
        q = q.bind(seg.as_str());
    }
    if let Some(f) = &sel.feature {
        q = q.bind(f.as_str());
    }
    let mut rows: Vec<Point> = q.bind(s.max_rows.saturating_add(1)).fetch_all().await?;
    let truncated = rows.len() as u64 > s.max_rows;
    rows.truncate(usize::try_from(s.max_rows).unwrap_or(usize::MAX));
    Ok((rows, truncated))
}

async fn timeseries(
    State(s): State<ApiState>,
    Path(model): Path<String>,
    Query(q): Q,
) -> ApiResult {
    let p = Params::new(
        q,
        &[
            "metric", "version", "segment", "feature", "from", "to", "window",
        ],
    )?;
    let metrics = p
        .list("metric")
        .ok_or_else(|| BadRequest("missing query parameter metric".into()))?;
    for m in &metrics {
        check_metric(&model, m)?;
    }
    let (from, to) = request_range(&s, &p, Some(&model)).await?;
    let window = p.window("window")?.unwrap_or(s.default_window_seconds);
    let segment = p.str("segment").unwrap_or("").to_owned();
    let feature = p.str("feature").unwrap_or("").to_owned();
    let sel = Selection {
        model: &model,
        versions: p.list("version"),
        metrics: metrics.clone(),
        segment: Some(segment.clone()),
        feature: Some(feature.clone()),
        window,
        from,
        to,
        ..Selection::default()
    };
    let (rows, truncated) = points(&s, &sel).await?;
    let mut series: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for r in rows {
        series
            .entry((r.model_version.clone(), r.metric.clone()))
            .or_default()
            .push(json!({ "window_start": r.window_start, "value": r.value,
                          "samples": r.samples, "p_value": r.p_value }));
    }
    let series: Vec<Value> = series
        .into_iter()
        .map(|((v, m), pts)| json!({ "model_version": v, "metric": m, "points": pts }))
        .collect();
    json_rows(
        &s,
        json!({
            "model_id": model, "segment": segment, "feature": feature,
            "window_seconds": window, "from": from, "to": to, "series": series,
        }),
        truncated,
    )
}

fn merged_json(m: &Merged, single_p: Option<f64>) -> Value {
    json!({
        "value": m.value, "samples": m.samples, "windows": m.windows,
        "min": m.min, "max": m.max, "merge": m.kind, "p_value": single_p,
    })
}

/// The metrics reported per feature: the drift statistics and decision, and
/// the integrity rates that go with them.
fn feature_metrics() -> Vec<String> {
    DRIFT_STATISTICS
        .iter()
        .chain(&[
            "drift_detected",
            "missing_rate",
            "out_of_range_rate",
            "new_category_rate",
        ])
        .map(|m| m.to_string())
        .collect()
}

/// Merges rows grouped by `key` and metric.
fn merge_by<K: Ord + Clone>(
    rows: &[Point],
    key: impl Fn(&Point) -> K,
) -> BTreeMap<K, BTreeMap<String, (Merged, Option<f64>)>> {
    let mut groups: BTreeMap<(K, String), Vec<&Point>> = BTreeMap::new();
    for r in rows {
        groups
            .entry((key(r), r.metric.clone()))
            .or_default()
            .push(r);
    }
    let mut out: BTreeMap<K, BTreeMap<String, (Merged, Option<f64>)>> = BTreeMap::new();
    for ((k, metric), pts) in groups {
        if let Some(m) = merge(&metric, pts.iter().map(|p| (p.value, p.samples))) {
            let single_p = if pts.len() == 1 { pts[0].p_value } else { None };
            out.entry(k).or_default().insert(metric, (m, single_p));
        }
    }
    out
}

fn version_param(p: &Params, name: &str) -> Result<String, ApiError> {
    Ok(p.required(name)?.to_owned())
}

/// One feature's histograms summed over the windows of a range
/// (`sumForEach` in ClickHouse), per layout.
#[derive(Debug, Deserialize, clickhouse::Row)]
struct HistogramSum {
    feature: String,
    kind: String,
    cells: u64,
    starts: Vec<u32>,
    summed: Vec<f64>,
}

/// The newest reference profile of a version, `None` when there is none or
/// it does not parse.
async fn load_profile(
    s: &ApiState,
    model: &str,
    version: &str,
) -> Result<Option<ReferenceProfile>, ApiError> {
    let stored: Vec<String> = s
        .reader()
        .query(
            "SELECT argMax(profile, revision) FROM reference_profiles \
             WHERE model_id = ? AND model_version = ? GROUP BY model_id, model_version",
        )
        .bind(model)
        .bind(version)
        .fetch_all()
        .await?;
    Ok(stored
        .first()
        .and_then(|json| serde_json::from_str::<ReferenceProfile>(json).ok()))
}

/// Drift per feature recomputed from the range's merged histograms: feature
/// → (windows with a histogram, rows of `finish_drift`). Only features whose
/// histograms have one layout (one profile) are included.
async fn merged_drift(
    s: &ApiState,
    sel: &Selection<'_>,
    version: &str,
    segment: &str,
) -> Result<BTreeMap<String, (BTreeSet<u32>, Vec<MetricValue>)>, ApiError> {
    let sums: Vec<HistogramSum> = s
        .reader()
        .query(
            "SELECT feature, kind, length(counts) AS cells, \
             groupUniqArray(toUInt32(window_start)) AS starts, sumForEach(counts) AS summed \
             FROM window_histograms FINAL \
             WHERE model_id = ? AND model_version = ? AND segment = ? AND window_seconds = ? \
             AND window_start >= toDateTime(?) AND window_start < toDateTime(?) \
             GROUP BY feature, kind, cells ORDER BY feature",
        )
        .bind(sel.model)
        .bind(version)
        .bind(segment)
        .bind(sel.window)
        .bind(sel.from)
        .bind(sel.to)
        .fetch_all()
        .await?;
    if sums.is_empty() {
        return Ok(BTreeMap::new());
    }
    let Some(profile) = load_profile(s, sel.model, version).await? else {
        return Ok(BTreeMap::new());
    };
    let mut layouts: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &sums {
        *layouts.entry(h.feature.as_str()).or_default() += 1;
    }
    let mut windows: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut histograms = Vec::new();
    for h in &sums {
        let Some(kind) = HistogramKind::parse(&h.kind) else {
            continue;
        };
        if layouts.get(h.feature.as_str()) != Some(&1) || h.summed.len() as u64 != h.cells {
            continue;
        }
        windows.insert(h.feature.clone(), h.starts.iter().copied().collect());
        histograms.push(FeatureHistogram {
            feature: h.feature.clone(),
            kind,
            counts: h.summed.clone(),
        });
    }
    let (acc, _) = DataAccumulator::from_histograms(&profile, &histograms);
    let mut rows = Vec::new();
    acc.finish_drift(&profile, &s.drift, &mut rows);
    let mut out: BTreeMap<String, (BTreeSet<u32>, Vec<MetricValue>)> = BTreeMap::new();
    for r in rows.into_iter().filter(|r| !r.feature.is_empty()) {
        if let Some(w) = windows.get(&r.feature) {
            out.entry(r.feature.clone())
                .or_insert_with(|| (w.clone(), Vec::new()))
                .1
                .push(r);
        }
    }
    Ok(out)
}

async fn drift(State(s): State<ApiState>, Path(model): Path<String>, Query(q): Q) -> ApiResult {
    let p = Params::new(
        q,
        &["version", "segment", "window_start", "from", "to", "window"],
    )?;
    let version = version_param(&p, "version")?;
    let window = p.window("window")?.unwrap_or(s.default_window_seconds);
    let (from, to) = match p.time("window_start")? {
        Some(ws) => {
            if p.non_empty("from").is_some() || p.non_empty("to").is_some() {
                return Err(ApiError::BadRequest(
                    "give either window_start or from / to, not both".into(),
                ));
            }
            (ws, ws.saturating_add(1))
        }
        None => request_range(&s, &p, Some(&model)).await?,
    };
    let segment = p.str("segment").unwrap_or("").to_owned();
    let sel = Selection {
        model: &model,
        versions: Some(vec![version.clone()]),
        metrics: feature_metrics(),
        segment: Some(segment.clone()),
        features_only: true,
        window,
        from,
        to,
        ..Selection::default()
    };
    let (rows, truncated) = points(&s, &sel).await?;
    let mut recomputed = merged_drift(&s, &sel, &version, &segment).await?;
    let mut windows: BTreeSet<u32> = rows.iter().map(|r| r.window_start).collect();
    // Windows of each feature that have per-window drift rows.
    let mut row_windows: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for r in rows.iter().filter(|r| is_drift(&r.metric)) {
        row_windows
            .entry(r.feature.as_str())
            .or_default()
            .insert(r.window_start);
    }
    // A feature is recomputed only when every window with drift rows also
    // has its histogram; otherwise (older data) it keeps the per-window merge.
    recomputed.retain(|feature, (hist_windows, _)| {
        row_windows
            .get(feature.as_str())
            .is_none_or(|w| w.is_subset(hist_windows))
    });
    for (w, _) in recomputed.values() {
        windows.extend(w.iter().copied());
    }
    let mut merged = merge_by(&rows, |r| r.feature.clone());
    for feature in recomputed.keys() {
        merged.entry(feature.clone()).or_default();
    }
    let (mut exact, mut approx) = (0usize, 0usize);
    let mut features: Vec<Value> = merged
        .into_iter()
        .map(|(feature, metrics)| {
            let drift = metrics.get("drift_detected").map(|(m, _)| *m);
            let mut samples = metrics.values().map(|(m, _)| m.samples).max().unwrap_or(0);
            let mut ms: serde_json::Map<String, Value> = metrics
                .iter()
                .map(|(k, (m, pv))| (k.clone(), merged_json(m, *pv)))
                .collect();
            let method = match recomputed.get(&feature) {
                Some((hist_windows, values)) => {
                    exact += 1;
                    // The recomputed statistics replace the per-window merge.
                    ms.retain(|k, _| !is_drift(k));
                    for v in values {
                        let per_window = metrics.get(v.metric);
                        samples = samples.max(v.samples);
                        ms.insert(
                            v.metric.to_owned(),
                            json!({
                                "value": v.value, "samples": v.samples,
                                "windows": hist_windows.len(),
                                "min": per_window.map(|(m, _)| m.min),
                                "max": per_window.map(|(m, _)| m.max),
                                "merge": "merged_histograms", "p_value": v.p_value,
                            }),
                        );
                    }
                    "merged_histograms"
                }
                None => {
                    approx += 1;
                    "weighted_mean"
                }
            };
            json!({
                "feature": feature,
                "method": method,
                "samples": samples,
                "windows": drift.map_or(0, |d| d.windows),
                "drifted_windows": drift.map_or(0, |d| d.windows_at_one),
                "metrics": ms,
            })
        })
        .collect();
    // Most drifted first.
    let psi = |v: &Value| v["metrics"]["psi"]["value"].as_f64().unwrap_or(-1.0);
    features.sort_by(|a, b| psi(b).total_cmp(&psi(a)));
    let method = match (exact, approx) {
        (0, _) => "weighted_mean",
        (_, 0) => "merged_histograms",
        _ => "mixed",
    };
    json_rows(
        &s,
        json!({
            "model_id": model, "model_version": version, "segment": segment,
            "window_seconds": window, "from": from, "to": to,
            "windows": windows.len(),
            "method": method,
            "method_note": "merged_histograms: the stored per-window histograms of the range are summed and PSI / JS / KL / Hellinger / KS / Wasserstein / chi-square and drift_detected are recomputed against the version's reference profile, exactly as over the union of the windows' events; weighted_mean (windows without histograms, e.g. older data): per-window values combined, counts summed, other values samples-weighted means (exact for rates, an approximation for drift statistics); each feature says which; drifted_windows counts windows with drift_detected = 1",
            "features": features,
        }),
        truncated,
    )
}

async fn heatmap(State(s): State<ApiState>, Path(model): Path<String>, Query(q): Q) -> ApiResult {
    let p = Params::new(q, &["version", "segment", "metric", "from", "to", "window"])?;
    let version = version_param(&p, "version")?;
    let metric = p.non_empty("metric").unwrap_or("psi").to_owned();
    check_metric(&model, &metric)?;
    let (from, to) = request_range(&s, &p, Some(&model)).await?;
    let window = p.window("window")?.unwrap_or(s.default_window_seconds);
    let segment = p.str("segment").unwrap_or("").to_owned();
    let sel = Selection {
        model: &model,
        versions: Some(vec![version.clone()]),
        metrics: vec![metric.clone(), "drift_detected".into()],
        segment: Some(segment.clone()),
        features_only: true,
        window,
        from,
        to,
        ..Selection::default()
    };
    let (rows, truncated) = points(&s, &sel).await?;
    let windows: Vec<u32> = rows
        .iter()
        .map(|r| r.window_start)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let col: HashMap<u32, usize> = windows.iter().enumerate().map(|(i, w)| (*w, i)).collect();
    let mut values: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
    let mut drifted: BTreeMap<String, Vec<Option<u8>>> = BTreeMap::new();
    for r in &rows {
        let Some(&i) = col.get(&r.window_start) else {
            continue;
        };
        if r.metric == metric {
            values
                .entry(r.feature.clone())
                .or_insert_with(|| vec![None; windows.len()])[i] = Some(r.value);
        }
        if r.metric == "drift_detected" {
            drifted
                .entry(r.feature.clone())
                .or_insert_with(|| vec![None; windows.len()])[i] = Some(u8::from(r.value == 1.0));
        }
    }
    let mut features: Vec<(String, f64)> = values
        .iter()
        .map(|(f, v)| {
            (
                f.clone(),
                v.iter()
                    .flatten()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max),
            )
        })
        .collect();
    features.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let names: Vec<&String> = features.iter().map(|(f, _)| f).collect();
    let vals: Vec<&Vec<Option<f64>>> = names.iter().map(|f| &values[*f]).collect();
    let drift: Vec<Vec<Option<u8>>> = names
        .iter()
        .map(|f| {
            drifted
                .get(*f)
                .cloned()
                .unwrap_or_else(|| vec![None; windows.len()])
        })
        .collect();
    json_rows(
        &s,
        json!({
            "model_id": model, "model_version": version, "segment": segment, "metric": metric,
            "window_seconds": window, "windows": windows, "features": names,
            "values": vals, "drift_detected": drift,
        }),
        truncated,
    )
}

async fn segments(State(s): State<ApiState>, Path(model): Path<String>, Query(q): Q) -> ApiResult {
    let p = Params::new(q, &["version", "metric", "feature", "from", "to", "window"])?;
    let version = version_param(&p, "version")?;
    let metrics = p
        .list("metric")
        .unwrap_or_else(|| vec!["prediction_count".into(), "accuracy".into()]);
    for m in &metrics {
        check_metric(&model, m)?;
    }
    let (from, to) = request_range(&s, &p, Some(&model)).await?;
    let window = p.window("window")?.unwrap_or(s.default_window_seconds);
    let feature = p.str("feature").unwrap_or("").to_owned();
    let sel = Selection {
        model: &model,
        versions: Some(vec![version.clone()]),
        metrics: metrics.clone(),
        feature: Some(feature),
        window,
        from,
        to,
        ..Selection::default()
    };
    let (rows, truncated) = points(&s, &sel).await?;
    let merged = merge_by(&rows, |r| r.segment.clone());
    let segs: Vec<Value> = merged
        .into_iter()
        .map(|(seg, ms)| {
            let m: serde_json::Map<String, Value> = ms
                .iter()
                .map(|(k, (m, pv))| (k.clone(), merged_json(m, *pv)))
                .collect();
            json!({ "segment": seg, "metrics": m })
        })
        .collect();
    json_rows(
        &s,
        json!({
            "model_id": model, "model_version": version, "window_seconds": window,
            "from": from, "to": to, "segments": segs,
        }),
        truncated,
    )
}

/// Model-level metrics compared between versions.
const COMPARE_METRICS: &[&str] = &[
    "prediction_count",
    "label_count",
    "label_coverage",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "log_loss",
    "brier",
    "estimated_accuracy",
    "mse",
    "rmse",
    "mae",
    "r2",
    "latency_p50",
    "latency_p95",
    "latency_p99",
    "drifted_feature_count",
];

async fn compare(State(s): State<ApiState>, Path(model): Path<String>, Query(q): Q) -> ApiResult {
    let p = Params::new(q, &["a", "b", "segment", "from", "to", "window"])?;
    let a = version_param(&p, "a")?;
    let b = version_param(&p, "b")?;
    if a == b {
        return Err(ApiError::BadRequest(format!(
            "a and b are the same version ({a:?}): name two versions to compare"
        )));
    }
    let (from, to) = request_range(&s, &p, Some(&model)).await?;
    let window = p.window("window")?.unwrap_or(s.default_window_seconds);
    let segment = p.str("segment").unwrap_or("").to_owned();
    let base = Selection {
        model: &model,
        versions: Some(vec![a.clone(), b.clone()]),
        segment: Some(segment.clone()),
        window,
        from,
        to,
        ..Selection::default()
    };
    let (model_rows, cut_a) = points(
        &s,
        &Selection {
            metrics: COMPARE_METRICS.iter().map(|m| m.to_string()).collect(),
            feature: Some(String::new()),
            ..base.clone()
        },
    )
    .await?;
    let (drift_rows, cut_b) = points(
        &s,
        &Selection {
            metrics: vec!["psi".into(), "drift_detected".into()],
            features_only: true,
            ..base
        },
    )
    .await?;
    let truncated = cut_a || cut_b;
    let by_version = merge_by(&model_rows, |r| r.model_version.clone());
    let side = |v: &str, metric: &str| {
        by_version
            .get(v)
            .and_then(|m| m.get(metric))
            .map(|(m, pv)| merged_json(m, *pv))
    };
    let metrics: Vec<Value> = COMPARE_METRICS
        .iter()
        .filter_map(|metric| {
            let (ma, mb) = (side(&a, metric), side(&b, metric));
            if ma.is_none() && mb.is_none() {
                return None;
            }
            let diff = match (&ma, &mb) {
                (Some(x), Some(y)) => y["value"]
                    .as_f64()
                    .zip(x["value"].as_f64())
                    .map(|(y, x)| y - x),
                _ => None,
            };
            Some(json!({ "metric": metric, "a": ma, "b": mb, "difference": diff }))
        })
        .collect();
    let drift_merged = merge_by(&drift_rows, |r| {
        (r.feature.clone(), r.model_version.clone())
    });
    let mut feats: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for ((feature, version), ms) in &drift_merged {
        let which = if *version == a { "a" } else { "b" };
        let entry = feats.entry(feature.clone()).or_default();
        if let Some((m, _)) = ms.get("psi") {
            entry.insert(format!("{which}_psi"), json!(m.value));
        }
        if let Some((m, _)) = ms.get("drift_detected") {
            entry.insert(format!("{which}_drifted_windows"), json!(m.windows_at_one));
        }
    }
    let drift: Vec<Value> = feats
        .into_iter()
        .map(|(f, mut m)| {
            m.insert("feature".into(), json!(f));
            Value::Object(m)
        })
        .collect();
    json_rows(
        &s,
        json!({
            "model_id": model, "a": a, "b": b, "segment": segment, "window_seconds": window,
            "from": from, "to": to, "metrics": metrics, "drift": drift,
        }),
        truncated,
    )
}

// ---------------------------------------------------------------- references

#[derive(Debug, Deserialize, clickhouse::Row)]
struct RefSummary {
    model_version: String,
    samples: u64,
    created_at: u32,
}

async fn references(State(s): State<ApiState>, Path(model): Path<String>) -> ApiResult {
    let rows: Vec<RefSummary> = s
        .reader()
        .query(
            "SELECT model_version, argMax(sample_count, revision) AS samples, \
             toUInt32(max(created_at)) AS created_at FROM reference_profiles \
             WHERE model_id = ? GROUP BY model_version ORDER BY model_version",
        )
        .bind(model.as_str())
        .fetch_all()
        .await?;
    let list: Vec<Value> = rows
        .iter()
        .map(|r| json!({ "model_version": r.model_version, "samples": r.samples, "created_at": r.created_at }))
        .collect();
    json_ok(json!({ "model_id": model, "references": list }))
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct RefFull {
    samples: u64,
    created_at: u32,
    profile: String,
}

async fn reference(
    State(s): State<ApiState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult {
    let rows: Vec<RefFull> = s
        .ch
        .client()
        .query(
            "SELECT argMax(sample_count, revision) AS samples, toUInt32(max(created_at)) AS created_at, \
             argMax(profile, revision) AS profile FROM reference_profiles \
             WHERE model_id = ? AND model_version = ? GROUP BY model_id, model_version",
        )
        .bind(model.as_str())
        .bind(version.as_str())
        .fetch_all()
        .await?;
    let Some(r) = rows.into_iter().next() else {
        return Err(ApiError::NotFound(format!(
            "no reference profile for model {model:?} version {version:?}"
        )));
    };
    let profile: Value = serde_json::from_str(&r.profile)
        .map_err(|e| ApiError::Upstream(format!("stored profile is not JSON: {e}")))?;
    json_ok(json!({
        "model_id": model, "model_version": version, "samples": r.samples,
        "created_at": r.created_at, "profile": profile,
    }))
}

// ---------------------------------------------------------------- alerts

/// One row of the alert history.
#[derive(Debug, Clone, Deserialize, Serialize, clickhouse::Row)]
pub struct AlertItem {
    /// Deterministic alert id.
    pub alert_id: String,
    /// Rule name.
    pub rule: String,
    /// `firing` or `resolved`.
    pub status: String,
    /// `warning` or `critical`.
    pub severity: String,
    /// Model id.
    pub model_id: String,
    /// Model version.
    pub model_version: String,
    /// Segment.
    pub segment: String,
    /// Feature, for feature rules.
    pub feature: Option<String>,
    /// Metric watched.
    pub metric: String,
    /// Value that fired.
    pub value: f64,
    /// Threshold.
    pub threshold: f64,
    /// Baseline, when the rule has one.
    pub baseline: Option<f64>,
    /// p-value, when the metric has one.
    pub p_value: Option<f64>,
    /// Window start, ms.
    pub window_start_ms: i64,
    /// Window end, ms.
    pub window_end_ms: i64,
    /// When the transition happened, ms.
    pub fired_at_ms: u64,
    /// Human-readable message.
    pub message: String,
}

async fn alerts(State(s): State<ApiState>, Query(q): Q) -> ApiResult {
    let p = Params::new(
        q,
        &[
            "model", "version", "status", "severity", "rule", "feature", "from", "to", "limit",
            "open",
        ],
    )?;
    let status = p.one_of("status", &["firing", "resolved"])?;
    let severity = p.one_of("severity", &["warning", "critical"])?;
    let open = p.one_of("open", &["true", "false"])?.as_deref() == Some("true");
    let (from, to) = request_range(&s, &p, p.non_empty("model")).await?;
    let limit = p.uint("limit", 1, 10_000)?.unwrap_or(200);
    let mut sql = String::from(
        "SELECT alert_id, rule, status, severity, model_id, model_version, segment, feature, metric, \
         value, threshold, baseline, p_value, window_start_ms, window_end_ms, fired_at_ms, message \
         FROM alerts FINAL WHERE window_start >= toDateTime(?) AND window_start < toDateTime(?)",
    );
    let mut binds: Vec<String> = Vec::new();
    for (param, column) in [
        ("model", "model_id"),
        ("version", "model_version"),
        ("rule", "rule"),
        ("feature", "feature"),
    ] {
        if let Some(v) = p.non_empty(param) {
            sql.push_str(&format!(" AND {column} = ?"));
            binds.push(v.to_owned());
        }
    }
    for (v, column) in [(&status, "status"), (&severity, "severity")] {
        if let Some(v) = v {
            sql.push_str(&format!(" AND {column} = ?"));
            binds.push(v.clone());
        }
    }
    if open {
        // Alerts whose latest transition is `firing`.
        sql.push_str(
            // Every transition of one alert has the same window (the id
            // is derived from it), so the range bounds the inner read too.
            " AND status = 'firing' AND alert_id IN (SELECT alert_id FROM alerts FINAL \
             WHERE window_start >= toDateTime(?) AND window_start < toDateTime(?) \
             GROUP BY alert_id HAVING argMax(status, fired_at_ms) = 'firing')",
        );
    }
    sql.push_str(" ORDER BY fired_at_ms DESC, alert_id LIMIT ?");
    let mut query = s.reader().query(&sql).bind(from).bind(to);
    for b in &binds {
        query = query.bind(b.as_str());
    }
    if open {
        query = query.bind(from).bind(to);
    }
    let rows: Vec<AlertItem> = query.bind(limit).fetch_all().await?;
    json_ok(json!({ "count": rows.len(), "alerts": rows }))
}

// ---------------------------------------------------------------- service

async fn service(State(s): State<ApiState>, Query(q): Q) -> ApiResult {
    let p = Params::new(q, &["metric", "from", "to", "window"])?;
    let metrics = p
        .list("metric")
        .unwrap_or_else(|| SERVICE_METRICS.iter().map(|m| m.to_string()).collect());
    for m in &metrics {
        check_metric(SERVICE_MODEL, m)?;
    }
    let (from, to) = request_range(&s, &p, Some(SERVICE_MODEL)).await?;
    let window = p.window("window")?.unwrap_or(s.default_window_seconds);
    let sel = Selection {
        model: SERVICE_MODEL,
        metrics,
        window,
        from,
        to,
        ..Selection::default()
    };
    let (rows, truncated) = points(&s, &sel).await?;
    let mut series: BTreeMap<(String, String, String), Vec<Value>> = BTreeMap::new();
    for r in rows {
        series
            .entry((r.model_version.clone(), r.metric.clone(), r.feature.clone()))
            .or_default()
            .push(json!({ "window_start": r.window_start, "value": r.value }));
    }
    let series: Vec<Value> = series
        .into_iter()
        .map(|((instance, metric, feature), pts)| {
            json!({ "instance": instance, "metric": metric, "label": feature, "points": pts })
        })
        .collect();
    json_rows(
        &s,
        json!({ "window_seconds": window, "from": from, "to": to, "series": series }),
        truncated,
    )
}
