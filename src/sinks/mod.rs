//! Sinks: where results leave the service. Each sink owns its I/O, batching
//! and retries; none of them computes anything.
//!
//! - [`clickhouse`]: schema migrations, batched idempotent inserts of window
//!   metrics, alerts, model versions and reference profiles.
//! - [`kafka`]: the alerts topic (Avro AlertEvent) and the dead-letter topic.
//! - [`webhook`]: alert notifications over HTTP (queues, workers, retries).

pub mod clickhouse;
pub mod kafka;
pub mod webhook;
