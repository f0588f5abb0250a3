//! A client of a Confluent Schema Registry's REST API: the writer schema of
//! a schema id (`GET /schemas/ids/{id}`), put into the [`SchemaCache`] the
//! decoder reads ([`super::resolve`]), and the registration of our
//! `AlertEvent` schema (`POST /subjects/{subject}/versions`) for
//! Confluent-framed alerts. Basic auth, `https://` with the built-in roots
//! and an optional private CA (`ca_file`), a timeout per request.
//!
//! Answers, for a schema id:
//! - the schema (`schemaType` absent or `AVRO`): parsed and planned once,
//!   cached (bounded by `max_schemas`);
//! - not found (HTTP 404, error code 40403), a schema that is not Avro
//!   (`PROTOBUF`, `JSON`) or does not parse: a permanent answer, cached as
//!   such: every message with that id is a dead letter of kind `schema`;
//! - transient (connection refused or reset, timeout, 5xx, 429): retried
//!   with a doubling backoff (100 ms to 5 s) for `retry_for`; then
//!   [`Registry::prefetch`] fails and the service stops with the error:
//!   consuming on would dead-letter good data, and a restart resumes from
//!   the last checkpoint, so nothing is lost;
//! - anything else (401 or 403: wrong credentials; another 4xx; an answer
//!   beyond 8 MiB): the service stops at once with the status and the
//!   registry's message, as no retry can fix it and every message would
//!   otherwise be lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::resolve::{self, SchemaCache, WriterSchema};
use crate::config::SchemaRegistryConfig;
use crate::telemetry::Counters;

/// The content type of the registry's API.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Largest registry answer read (a schema is a few KB; Confluent's own
/// limit on a schema is far below this): a larger one is an error.
const MAX_ANSWER_BYTES: usize = 8 << 20;

/// First and longest pause between attempts of a transient failure.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// The registry client and the schema cache it fills.
pub struct Registry {
    client: reqwest::Client,
    base: String,
    display: String,
    auth: Option<(String, String)>,
    retry_for: Duration,
    cache: Arc<SchemaCache>,
    counters: Arc<Counters>,
}

/// One failed request: may a retry succeed?
enum Failure {
    Transient(String),
    Fatal(String),
}

impl Registry {
    /// A client for `cfg` (which must have a URL; checked by
    /// `Config::validate`), counting into `counters`.
    pub fn new(cfg: &SchemaRegistryConfig, counters: Arc<Counters>) -> Result<Registry> {
        let mut b = reqwest::Client::builder()
            // A redirect would hand the credentials to another URL.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("modelwatch/", env!("CARGO_PKG_VERSION")));
        if !cfg.ca_file.is_empty() {
            let pem = std::fs::read(&cfg.ca_file).with_context(|| {
                format!(
                    "kafka.schema_registry.ca_file = {:?} is not readable",
                    cfg.ca_file
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!(
                    "kafka.schema_registry.ca_file = {:?} holds no PEM certificate",
                    cfg.ca_file
                )
            })?;
            if certs.is_empty() {
                bail!(
                    "kafka.schema_registry.ca_file = {:?} holds no PEM certificate",
                    cfg.ca_file
                );
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let client = b
            .build()
            .context("kafka.schema_registry: cannot build an HTTP client")?;
        let auth = (!cfg.username.is_empty())
            .then(|| (cfg.username.clone(), cfg.password.expose().to_owned()));
        Ok(Registry {
            client,
            base: cfg.url.trim().trim_end_matches('/').to_owned(),
            display: cfg.display_url(),
            auth,
            retry_for: cfg.retry_for,
            cache: Arc::new(SchemaCache::new(cfg.max_schemas)),
            counters,
        })
    }

    /// The cache the decoder reads.
    pub fn cache(&self) -> Arc<SchemaCache> {
        self.cache.clone()
    }

    /// Makes sure the writer schema of `payload`, if it is a Confluent
    /// frame, is in the cache (fetched now if not). An error only when the
    /// registry failed for good or stayed unreachable for `retry_for`: the
    /// service must stop (module doc).
    pub async fn prefetch(&self, payload: &[u8]) -> Result<()> {
        let Some(id) = resolve::confluent_id(payload) else {
            return Ok(());
        };
        if self.cache.contains(id) {
            return Ok(());
        }
        let entry = self.fetch(id).await?;
        if entry.is_err() {
            Counters::add(&self.counters.registry_unknown_ids_total, 1);
        }
        self.cache.insert(id, entry);
        Counters::set(
            &self.counters.registry_schemas_evicted_total,
            self.cache.evicted(),
        );
        Ok(())
    }

    /// The writer schema of `id`: `Ok(Err(reason))` for a permanent answer
    /// (unknown id, not Avro, not parseable).
    async fn fetch(&self, id: u32) -> Result<Result<WriterSchema, String>> {
        let url = format!("{}/schemas/ids/{id}", self.base);
        let answer = self
            .with_retries(&format!("schema id {id}"), || {
                self.request(self.client.get(&url))
            })
            .await?;
        Counters::add(&self.counters.registry_fetches_total, 1);
        let (status, body) = answer;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Err(format!(
                "not found in the schema registry ({})",
                error_text(&body)
            )));
        }
        let parsed: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return Ok(Err(format!("the registry's answer is not JSON: {e}"))),
        };
        match parsed.get("schemaType").and_then(|t| t.as_str()) {
            None | Some("AVRO") => {}
            Some(other) => {
                return Ok(Err(format!(
                    "schema type {other} is not supported (only AVRO)"
                )))
            }
        }
        let Some(text) = parsed.get("schema").and_then(|s| s.as_str()) else {
            return Ok(Err("the registry's answer has no \"schema\" string".into()));
        };
        Ok(WriterSchema::parse(text))
    }

    /// Registers `schema` (Avro schema text) under `subject` and returns its
    /// id (the existing id if the registry has it already).
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32> {
        let url = format!("{}/subjects/{subject}/versions", self.base);
        let body = serde_json::json!({ "schema": schema }).to_string();
        let what = format!("registering the schema under subject {subject}");
        let (status, answer) = self
            .with_retries(&what, || {
                self.request(
                    self.client
                        .post(&url)
                        .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                        .body(body.clone()),
                )
            })
            .await?;
        if !status.is_success() {
            bail!(
                "schema registry {}: {what}: HTTP {status}: {}",
                self.display,
                error_text(&answer)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&answer).with_context(|| {
            format!(
                "schema registry {}: {what}: answer is not JSON",
                self.display
            )
        })?;
        v.get("id")
            .and_then(serde_json::Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| {
                format!(
                    "schema registry {}: {what}: answer has no schema id: {}",
                    self.display,
                    error_text(&answer)
                )
            })
    }

    /// Runs `attempt` until it gives an answer that is not transient, for
    /// `retry_for` at most.
    async fn with_retries<F, Fut>(
        &self,
        what: &str,
        attempt: F,
    ) -> Result<(reqwest::StatusCode, Vec<u8>)>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(reqwest::StatusCode, Vec<u8>), Failure>>,
    {
        let started = Instant::now();
        let mut pause = BACKOFF.0;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match attempt().await {
                Ok(answer) => return Ok(answer),
                Err(Failure::Fatal(e)) => {
                    Counters::add(&self.counters.registry_fetch_failures_total, 1);
                    bail!("schema registry {}: {what}: {e}", self.display)
                }
                Err(Failure::Transient(e)) => {
                    Counters::add(&self.counters.registry_fetch_failures_total, 1);
                    let elapsed = started.elapsed();
                    if elapsed + pause > self.retry_for {
                        bail!(
                            "schema registry {}: {what}: still failing after {attempts} attempts in {:.1}s (kafka.schema_registry.retry_for): {e}. Stopping rather than dead-lettering good messages; a restart resumes from the last checkpoint",
                            self.display,
                            elapsed.as_secs_f64()
                        );
                    }
                    if attempts == 1 || attempts.is_power_of_two() {
                        tracing::warn!(registry = %self.display, attempts, error = %e, "{what}: schema registry failing, retrying");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(BACKOFF.1);
                }
            }
        }
    }

    /// One request: the status and body of an answer that is final
    /// (success or 404), or why not.
    async fn request(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, Vec<u8>), Failure> {
        let req = match &self.auth {
            Some((user, password)) => req.basic_auth(user, Some(password)),
            None => req,
        };
        let resp = req
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .send()
            .await
            .map_err(|e| Failure::Transient(error_chain(&e)))?;
        let status = resp.status();
        let mut resp = resp;
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Failure::Transient(error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(Failure::Fatal(format!(
                    "HTTP {status}: answer larger than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            Ok((status, body))
        } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(Failure::Transient(format!(
                "HTTP {status}: {}",
                error_text(&body)
            )))
        } else {
            Err(Failure::Fatal(format!(
                "HTTP {status}: {}",
                error_text(&body)
            )))
        }
    }
}

/// The registry's error text (`{"error_code":40403,"message":"..."}`), or the
/// start of the body.
fn error_text(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let text = match parsed {
        Some(v) if v.get("message").is_some() => format!(
            "{} (error code {})",
            v["message"].as_str().unwrap_or_default(),
            v.get("error_code")
                .map_or_else(|| "none".into(), ToString::to_string)
        ),
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    crate::sinks::kafka::escape_bounded(&text, 300)
}

/// An error with its sources (reqwest hides the cause, e.g. "connection
/// refused", in the chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::ingest::decode::PREDICTION_SCHEMA;

    /// A registry on 127.0.0.1: id 1 answers 429 once, then our schema;
    /// id 2 a body that is not JSON; id 3 HTTP 400; id 4 a JSON Schema;
    /// id 5 an answer of 9 MiB; anything else 404.
    async fn server() -> (String, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let first = hits.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let first = first.clone();
            async move {
                let (status, body) = match uri.path() {
                    "/schemas/ids/1" if first.fetch_add(1, Ordering::SeqCst) == 0 => {
                        (429, "{\"message\":\"slow down\"}".to_string())
                    }
                    "/schemas/ids/1" => (
                        200,
                        serde_json::json!({ "schema": PREDICTION_SCHEMA }).to_string(),
                    ),
                    "/schemas/ids/2" => (200, "<html>".to_string()),
                    "/schemas/ids/3" => (400, "{\"error_code\":400,\"message\":\"bad\"}".into()),
                    "/schemas/ids/4" => (
                        200,
                        serde_json::json!({"schema": "{}", "schemaType": "JSON"}).to_string(),
                    ),
                    "/schemas/ids/5" => (200, " ".repeat(9 << 20)),
                    _ => (
                        404,
                        "{\"error_code\":40403,\"message\":\"Schema not found\"}".into(),
                    ),
                };
                let mut resp = axum::http::Response::new(axum::body::Body::from(body));
                *resp.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
                resp
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (url, hits)
    }

    fn frame(id: u32) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&id.to_be_bytes());
        f.push(2);
        f
    }

    #[tokio::test]
    async fn answers_are_cached_retried_or_fatal_by_kind() {
        let (url, hits) = server().await;
        let cfg = SchemaRegistryConfig {
            url,
            retry_for: Duration::from_secs(5),
            ..Default::default()
        };
        let counters = Arc::new(Counters::default());
        let r = Registry::new(&cfg, counters.clone()).unwrap();
        let cache = r.cache();
        // 429, retried: our schema.
        r.prefetch(&frame(1)).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        assert!(cache.get(1).unwrap().is_ok());
        // Cached: not asked again.
        r.prefetch(&frame(1)).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        // Permanent answers, cached as such.
        for (id, why) in [
            (2, "not JSON"),
            (4, "schema type JSON is not supported"),
            (
                404,
                "not found in the schema registry (Schema not found (error code 40403))",
            ),
        ] {
            r.prefetch(&frame(id)).await.unwrap();
            let entry = cache.get(id).unwrap();
            let err = entry.as_ref().as_ref().unwrap_err();
            assert!(err.contains(why), "{id}: {err}");
        }
        assert_eq!(Counters::get(&counters.registry_unknown_ids_total), 3);
        assert_eq!(Counters::get(&counters.registry_fetches_total), 4);
        assert_eq!(Counters::get(&counters.registry_fetch_failures_total), 1);
        // No retry can fix a 400 or an oversized answer: errors at once.
        for (id, why) in [
            (3, "HTTP 400 Bad Request: bad (error code 400)"),
            (5, "larger than"),
        ] {
            let started = Instant::now();
            let err = format!("{:#}", r.prefetch(&frame(id)).await.unwrap_err());
            assert!(
                err.contains(why) && err.contains(&format!("schema id {id}")),
                "{err}"
            );
            assert!(started.elapsed() < Duration::from_secs(2));
            assert!(!cache.contains(id));
        }
        // Not a Confluent frame: nothing to fetch.
        r.prefetch(b"{\"a\":1}").await.unwrap();
        r.prefetch(&[0, 0, 0]).await.unwrap();
        assert_eq!(cache.len(), 4);
    }
}
