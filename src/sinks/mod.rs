//! Sinks: where results leave the service. Each sink owns its I/O, batching
//! and retries; none of them computes anything.
//!
//! - [`clickhouse`]: schema migrations, batched idempotent inserts of window
//!   metrics, alerts, model versions and reference profiles.
//! - [`clickhouse_tls`]: the ClickHouse client's connector (HTTP, or HTTPS
//!   with rustls, `clickhouse.ca_file` and a client certificate).
//! - [`kafka`]: the alerts topic (Avro AlertEvent) and the dead-letter topic.
//! - [`webhook`]: alert notifications over HTTP (queues, workers, retries).

pub mod clickhouse;
pub mod clickhouse_tls;
pub mod kafka;
pub mod webhook;
