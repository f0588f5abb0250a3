//! modelwatch: real-time monitoring of machine-learning models in production.
//!
//! Data flows left to right, one module per stage:
//!
//! ```text
//! predictions ─┐
//!              ├─> ingest ─> join ─> metrics ─> alerting ─> sinks (ClickHouse, alerts topic)
//! ground-truth ┘  (decode,   (by request id,  (pure accumulators
//!                  DLQ)       TTL, windows)    per window)
//! ```
//!
//! - [`config`]: TOML file + `MODELWATCH_<SECTION>__<KEY>` overrides, validated at startup.
//! - [`model`]: event types shared by every stage (prediction, ground truth, alert).
//! - [`ingest`]: Kafka consumption ([`ingest::consumer`]) and pure byte decoding ([`ingest::decode`]).
//! - [`join`]: pure keyed join state with expiry ([`join::state`]) and event-time windows ([`join::window`]).
//! - [`metrics`]: pure, mergeable statistics: drift, integrity, performance; the per-window aggregator.
//! - [`alerting`]: pure rule evaluation producing [`model::AlertEvent`]s.
//! - [`sinks`]: ClickHouse writer and migrations, Kafka alert / dead-letter producers.
//! - [`pipeline`]: the pure processing core (join + aggregator + watermark + rules), driven by `app`.
//! - [`app`]: wires the stages together; checkpoints the state after its output is durable, then commits offsets.
//! - [`state`]: the embedded on-disk store of checkpoints (join state, open windows, alert lifecycle, input positions).
//! - [`generate`]: synthetic traffic (used by `modelwatch generate` and `modelwatch demo`).
//! - [`demo`]: the one-command demo on embedded defaults.
//! - [`api`]: HTTP API, embedded dashboard, `/metrics`, `/healthz`, `/readyz` (reads ClickHouse + live telemetry).
//! - [`telemetry`]: tracing setup, the service's own counters and the Prometheus registry.
//!
//! `metrics`, `join` and `alerting` do no I/O and never read the clock: time is
//! an argument, which is what makes them testable and benchmarkable alone.

pub mod alerting;
pub mod api;
pub mod app;
pub mod config;
pub mod demo;
pub mod generate;
pub mod ingest;
pub mod join;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod sinks;
pub mod state;
pub mod telemetry;
