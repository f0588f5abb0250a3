//! The join of predictions with their delayed labels, and event-time windows.
//! Pure: no I/O, no async, no clock (time is an argument).

pub mod state;
pub mod window;

pub use state::{JoinConfig, JoinState, Joined, LabelInsert, PredictionInsert, StoredRequest};
pub use window::{window_start, Source, Watermark, WatermarkState};
