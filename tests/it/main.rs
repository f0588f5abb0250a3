//! The integration-test binary: one module per area, all against real
//! servers started by `tests/support` on loopback.
//!
//! - [`alerting`]: default rules on synthetic streams (false alarms, power),
//!   the alerts topic, webhooks against real HTTP receivers.
//! - [`api`]: the HTTP API, auth, `/metrics` and the Grafana queries against real servers.
//! - [`http_hardening`]: slow and idle clients, connection limits, the `Host`
//!   check, escaped notification bodies and unfollowed webhook redirects.
//! - [`clickhouse`]: the ClickHouse sink against a real `clickhouse-server`.
//! - [`clickhouse_tls`]: the binary and the API over HTTPS (ClickHouse's own
//!   `https_port`, a test-made CA, mutual TLS).
//! - [`pipeline`]: the service on MockCluster + ClickHouse, exact metric values.
//! - [`mapping`]: the same events in our shape and two foreign shapes
//!   (`[kafka.mapping]`) give the same `window_metrics FINAL`.
//! - [`registry`]: Confluent-framed input written with a producer's own
//!   schema, resolved through an in-test Schema Registry; framed alerts.
//! - [`e2e`]: the `modelwatch` binary against a `tansu` broker + ClickHouse.
//! - [`kafka_tls`]: the binary over SSL and SASL_SSL (SCRAM) through stunnel in front of tansu.
//! - [`production`]: issue #12's whole production setup at once, configured
//!   only by a TOML file and env vars: the binary over SASL_SSL Kafka, HTTPS
//!   ClickHouse and an HTTPS registry with a producer's own Avro schemas.
//! - [`outputs`]: outputs that can never be written (rejected rows, oversized
//!   or refused dead letters, a missing topic) are dropped or cut and counted.
//! - [`crash`]: the binary killed and restarted, against an uninterrupted run.
//! - [`state`]: a join state beyond the memory budget, in a run and across a restart.
//! - [`budget`]: the binary's peak RSS across a restart whose state is
//!   larger than the memory budget.
//! - `example_config`: `deploy/modelwatch.example.toml` stays valid and
//!   documents the real defaults.

#[path = "../support/mod.rs"]
mod support;

mod alerting;

mod api;
mod backpressure;
mod budget;
mod clickhouse;
mod clickhouse_tls;
mod crash;
mod e2e;
mod hostile;
mod http_hardening;
mod kafka_tls;
mod live_crash;
mod mapping;
mod outputs;
mod pipeline;
mod production;
mod rebalance;
mod registry;
mod state;

mod example_config {
    use std::collections::HashMap;

    use modelwatch::config::{self, Config};

    use crate::support::repo_root;

    fn example_text() -> String {
        std::fs::read_to_string(repo_root().join("deploy/modelwatch.example.toml"))
            .expect("read deploy/modelwatch.example.toml")
    }

    fn load_text(text: &str) -> Config {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        config::load(Some(f.path()), &HashMap::new()).expect("example config loads")
    }

    #[test]
    fn example_config_sets_every_key_to_its_default() {
        let text = example_text();
        let loaded = load_text(&text);
        assert_eq!(
            toml::to_string(&loaded).unwrap(),
            toml::to_string(&Config::default()).unwrap()
        );
        // Every key of every section appears in the file.
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for (section, table) in defaults.as_table().unwrap() {
            let Some(table) = table.as_table() else {
                continue;
            };
            for key in table.keys() {
                // Plain keys, sub-tables, and arrays of tables (shown as examples).
                let written = text.lines().any(|l| {
                    l.starts_with(&format!("{key} ="))
                        || l == format!("[{section}.{key}]")
                        || l == format!("#> [[{section}.{key}]]")
                });
                assert!(written, "[{section}] {key} missing from the example");
            }
        }
    }

    #[test]
    fn example_sections_are_valid_when_uncommented() {
        let text: String = example_text()
            .lines()
            .map(|l| l.strip_prefix("#> ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = load_text(&text);
        let fraud = &cfg.models["fraud"];
        assert_eq!(fraud.threshold, Some(0.5));
        assert_eq!(fraud.baseline["accuracy"], 0.92);
        assert_eq!(cfg.alerts.rules.len(), 1);
        assert_eq!(cfg.alerts.rules[0].threshold, 0.85);
        assert_eq!(cfg.kafka.properties["security.protocol"], "plaintext");
        let mapping = &cfg.kafka.mapping;
        assert!(mapping
            .predictions
            .as_ref()
            .is_some_and(|p| p.features.is_some()));
        assert!(mapping
            .labels
            .as_ref()
            .is_some_and(|l| l.actual_label.is_some()));
    }
}
