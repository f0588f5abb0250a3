//! The statistics core: pure, mergeable accumulators (no I/O, no async, no
//! logging, no clock).

pub mod names;
