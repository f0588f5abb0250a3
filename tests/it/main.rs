//! The integration-test binary: one module per area, all against real
//! servers started by `tests/support` on loopback.
//!
//! - [`clickhouse`]: the ClickHouse sink against a real `clickhouse-server`.

#[path = "../support/mod.rs"]
mod support;

mod clickhouse;
