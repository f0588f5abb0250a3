//! The service's own observability: tracing setup and process-wide counters
//! of what flowed through it. (Domain statistics live in `metrics`.)

use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

/// Installs the tracing subscriber: `RUST_LOG` (default `default_filter`,
/// e.g. `info`), plain or JSON lines.
pub fn init(json: bool, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.compact().try_init()
    };
    // A second init (tests, demo inside a process that has one) is harmless.
    let _ = result;
}

/// Counters of the ingest and sink stages (the core keeps its own, see
/// [`crate::pipeline::CoreStats`]).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages consumed from the predictions topic.
    pub predictions_consumed_total: AtomicU64,
    /// Messages consumed from the ground-truth topic.
    pub labels_consumed_total: AtomicU64,
    /// Messages that failed decoding or validation.
    pub decode_failures_total: AtomicU64,
    /// Messages written to the dead-letter topic.
    pub dead_lettered_total: AtomicU64,
    /// Rows written to `window_metrics`.
    pub rows_written_total: AtomicU64,
    /// Alert transitions published.
    pub alerts_published_total: AtomicU64,
    /// Offset commits issued.
    pub commits_total: AtomicU64,
}

impl Counters {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
