//! Alerting: rules evaluated on window rows (pure), producing AlertEvents
//! that the sinks publish to Kafka and ClickHouse.

pub mod rules;

pub use rules::{alert_id, compile, AlertEngine, Rule};
