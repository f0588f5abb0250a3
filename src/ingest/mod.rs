//! Kafka ingestion: pure payload decoding ([`decode`], with the Avro codec in
//! `avro`) and, beside it, the consumer that feeds it.

mod avro;
pub mod decode;
