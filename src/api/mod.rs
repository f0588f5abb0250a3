//! The HTTP side of modelwatch: the REST API (JSON, described by
//! `openapi.json`), the embedded dashboard, `/metrics`, `/healthz` and
//! `/readyz`.
//!
//! Owns reading the history back out of ClickHouse for people and tools; it
//! never writes there and never touches the processing state (it sees the
//! live service only through [`crate::telemetry::Telemetry`]).
//!
//! - [`server`]: the axum router, bearer-token auth, start / stop.
//! - [`routes`]: the handlers and their ClickHouse queries.
//! - [`params`]: query-string parsing with clear 400 messages.
//! - [`merge`]: how per-window values combine over a time range (pure).

pub mod merge;
pub mod params;
pub mod routes;
pub mod server;

pub use server::{router, ApiServer, ApiState};

/// The OpenAPI description served at `/api/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// The model id under which the service writes its own health figures to
/// `window_metrics` (one row set per wall-clock window and instance).
pub const SERVICE_MODEL: &str = "__service__";
