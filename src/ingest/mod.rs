//! Ingestion: Kafka consumption ([`consumer`]), pure payload decoding and
//! validation ([`decode`], with the Avro codec in `avro`), records in the
//! user's own shape ([`mapping`]), and the commit
//! bookkeeping ([`offsets`]).

mod avro;
pub mod bounds;
pub mod consumer;
pub mod decode;
pub mod mapping;
pub mod offsets;

/// The Avro reader and writer for the fuzz targets in `fuzz/` (feature `fuzzing`).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use avro::fuzzing as avro_fuzzing;
