//! Alerting: rules evaluated on window rows (pure), the firing → resolved
//! lifecycle, self-explaining messages, and the notification payloads that
//! [`crate::sinks::webhook`] delivers.
//!
//! - [`rules`]: rule selection, conditions, the statistical gate, built-in defaults.
//! - [`lifecycle`]: [`AlertEngine`], per-series state, deterministic ids, restore.
//! - [`explain`]: alert messages with values, references and top contributors.
//! - [`notify`]: webhook payloads (generic + HMAC, Slack, PagerDuty, Jira). Pure.

pub mod explain;
pub mod lifecycle;
pub mod notify;
pub mod rules;

pub use lifecycle::{alert_id, AlertEngine};
pub use rules::{compile, Rule, BUILTIN_RULES};
