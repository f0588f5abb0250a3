//! Kafka ingestion.
