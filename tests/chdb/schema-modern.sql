-- modelwatch ClickHouse schema (current ClickHouse with LowCardinality and a 90-day TTL).
-- Generated from src/sinks/clickhouse.rs by its unit tests; do not edit.
-- The service creates it itself (`modelwatch migrate`, and at startup).

CREATE DATABASE IF NOT EXISTS modelwatch;

CREATE TABLE IF NOT EXISTS modelwatch.window_metrics (
    model_id LowCardinality(String),
    model_version LowCardinality(String),
    segment LowCardinality(String),
    window_start DateTime,
    window_seconds UInt32,
    metric LowCardinality(String),
    feature LowCardinality(String),
    value Float64,
    samples UInt64,
    p_value Nullable(Float64),
    revision UInt64
) ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(window_start)
ORDER BY (model_id, model_version, segment, window_seconds, metric, feature, window_start)
TTL window_start + INTERVAL 90 DAY;

CREATE TABLE IF NOT EXISTS modelwatch.alerts (
    alert_id String,
    rule LowCardinality(String),
    status LowCardinality(String),
    severity LowCardinality(String),
    model_id LowCardinality(String),
    model_version LowCardinality(String),
    segment LowCardinality(String),
    feature Nullable(String),
    metric LowCardinality(String),
    value Float64,
    threshold Float64,
    baseline Nullable(Float64),
    p_value Nullable(Float64),
    window_start DateTime,
    window_end DateTime,
    fired_at DateTime,
    window_start_ms Int64,
    window_end_ms Int64,
    fired_at_ms UInt64,
    message String
) ENGINE = ReplacingMergeTree(fired_at_ms)
PARTITION BY toYYYYMM(window_start)
ORDER BY (model_id, alert_id, status, window_start)
TTL window_start + INTERVAL 90 DAY;

CREATE TABLE IF NOT EXISTS modelwatch.models (
    model_id String,
    task LowCardinality(String),
    latest_version String,
    first_seen DateTime,
    last_seen DateTime,
    metadata String
) ENGINE = ReplacingMergeTree(last_seen)
ORDER BY model_id;

CREATE TABLE IF NOT EXISTS modelwatch.model_versions (
    model_id String,
    model_version String,
    task LowCardinality(String),
    first_seen DateTime,
    last_seen DateTime,
    metadata String
) ENGINE = ReplacingMergeTree(last_seen)
ORDER BY (model_id, model_version);

CREATE TABLE IF NOT EXISTS modelwatch.reference_profiles (
    model_id String,
    model_version String,
    created_at DateTime,
    revision UInt64,
    sample_count UInt64,
    profile String
) ENGINE = ReplacingMergeTree(revision)
ORDER BY (model_id, model_version);

CREATE TABLE IF NOT EXISTS modelwatch.webhook_deliveries (
    delivered_at DateTime,
    delivered_at_ms UInt64,
    webhook String,
    kind LowCardinality(String),
    alert_id String,
    alert_status LowCardinality(String),
    outcome LowCardinality(String),
    attempts UInt32,
    http_status UInt16,
    error String,
    duration_ms UInt64
) ENGINE = ReplacingMergeTree(delivered_at_ms)
PARTITION BY toYYYYMM(delivered_at)
ORDER BY (webhook, alert_id, alert_status, delivered_at_ms)
TTL delivered_at + INTERVAL 90 DAY;

CREATE TABLE IF NOT EXISTS modelwatch.window_histograms (
    model_id LowCardinality(String),
    model_version LowCardinality(String),
    segment LowCardinality(String),
    window_start DateTime,
    window_seconds UInt32,
    feature LowCardinality(String),
    kind LowCardinality(String),
    counts Array(Float64),
    revision UInt64
) ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(window_start)
ORDER BY (model_id, model_version, segment, window_seconds, feature, window_start)
TTL window_start + INTERVAL 90 DAY;

-- Example queries

-- latest value of every metric per window (FINAL keeps the newest revision)
SELECT model_id, model_version, segment, window_start, window_seconds, metric, feature, value, samples, p_value
FROM modelwatch.window_metrics FINAL
ORDER BY model_id, model_version, window_start, metric, feature
LIMIT 100;

-- accuracy per window and version without FINAL (argMax over revisions)
SELECT model_id, model_version, window_start, argMax(value, revision) AS accuracy, argMax(samples, revision) AS labeled
FROM modelwatch.window_metrics
WHERE metric = 'accuracy' AND segment = '' AND feature = ''
GROUP BY model_id, model_version, window_start
ORDER BY model_id, model_version, window_start;

-- features that drifted (PSI at or above 0.2) in the last day
SELECT model_id, model_version, feature, window_start, value AS psi
FROM modelwatch.window_metrics FINAL
WHERE metric = 'psi' AND value >= 0.2 AND window_start >= now() - INTERVAL 1 DAY
ORDER BY psi DESC
LIMIT 50;

-- accuracy by segment, last 24 hours, weighted by labeled samples
SELECT model_id, segment, sum(value * samples) / sum(samples) AS accuracy, sum(samples) AS labeled
FROM modelwatch.window_metrics FINAL
WHERE metric = 'accuracy' AND window_start >= now() - INTERVAL 1 DAY AND samples > 0
GROUP BY model_id, segment
ORDER BY model_id, segment;

-- alerts currently firing (latest status per alert id)
SELECT alert_id, argMax(status, fired_at_ms) AS last_status, any(rule) AS rule, any(model_id) AS model, any(metric) AS metric, max(value) AS worst_value, max(fired_at) AS last_fired
FROM modelwatch.alerts FINAL
GROUP BY alert_id
HAVING last_status = 'firing'
ORDER BY last_fired DESC;

-- webhook deliveries that failed or were dropped in the last day
SELECT delivered_at, webhook, kind, alert_id, alert_status, outcome, attempts, http_status, error
FROM modelwatch.webhook_deliveries FINAL
WHERE outcome != 'delivered' AND delivered_at >= now() - INTERVAL 1 DAY
ORDER BY delivered_at DESC
LIMIT 100;

-- model versions and when they were seen
SELECT model_id, model_version, task, first_seen, last_seen
FROM modelwatch.model_versions FINAL
ORDER BY model_id, first_seen;

-- per-feature drift counts of all traffic over the last day, summed element-wise across windows
SELECT model_id, model_version, feature, kind, length(counts) AS cells, count() AS windows, sumForEach(counts) AS summed
FROM modelwatch.window_histograms FINAL
WHERE segment = '' AND window_start >= now() - INTERVAL 1 DAY
GROUP BY model_id, model_version, feature, kind, cells
ORDER BY model_id, model_version, feature;

-- latest reference profile per model version
SELECT model_id, model_version, argMax(sample_count, revision) AS samples, max(created_at) AS created
FROM modelwatch.reference_profiles
GROUP BY model_id, model_version
ORDER BY model_id, model_version;

