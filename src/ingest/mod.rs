//! Ingestion: Kafka consumption ([`consumer`]), pure payload decoding and
//! validation ([`decode`], with the Avro codec in `avro`), records in the
//! user's own shape ([`mapping`]), and the commit bookkeeping ([`offsets`]).
//! Producers' own Avro schemas: fetched from a Schema Registry
//! ([`registry`]), read by a bounded generic reader ([`avro_generic`]) and
//! resolved against ours ([`resolve`]).

mod avro;
pub mod avro_generic;
pub mod bounds;
pub mod consumer;
pub mod decode;
pub mod mapping;
pub mod offsets;
pub mod registry;
pub mod resolve;

/// The Avro reader and writer for the fuzz targets in `fuzz/` (feature `fuzzing`).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use avro::fuzzing as avro_fuzzing;
