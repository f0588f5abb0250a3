//! Ingestion: Kafka consumption ([`consumer`]), pure payload decoding and
//! validation ([`decode`]), and the commit bookkeeping ([`offsets`]).

pub mod consumer;
pub mod decode;
pub mod offsets;
