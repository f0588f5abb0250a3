//! Kafka over TLS and SASL, end to end: Debian's `stunnel4` terminates TLS
//! in front of a plain `tansu` broker (tansu listens on one loopback port
//! and advertises the stunnel port, so every connection a client makes goes
//! through TLS), with a CA and a server certificate made by the `openssl`
//! CLI at run time (no key is committed). The real `modelwatch` binary
//! (`run --exit-when-idle`) consumes over `SSL` / `SASL_SSL` (SCRAM-SHA-512,
//! against tansu's `--authentication`), writes to ClickHouse and publishes
//! dead letters and alerts over the same connection; the test's own clients
//! use TLS too. A wrong CA and a wrong password stop the binary at startup
//! within seconds, with the reason and without the password.
//!
//! tansu keeps SCRAM credentials only in its SQL storage engines (the
//! `memory://` engine ignores them), so the broker runs on a SQLite file:
//! first without authentication to create the topics and the user, then
//! restarted with `--authentication`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::ClientConfig;

use modelwatch::ingest::decode::{decode_alert, encode_json};
use modelwatch::model::InputEvent;
use modelwatch::sinks::clickhouse::ClickHouseSink;

use crate::pipeline::{
    aligned_ago, assert_matches, dataset, expected, key, read_final, reference_file, send,
    test_config, Dataset, Input, CLF, PARTITIONS,
};
use crate::support::clickhouse::unique_database;
use crate::support::tansu::tansu_bin;
use crate::support::tls::{must, Certs};
use crate::support::{free_ports, kill_child, port_open, run_binary, spawn_watchdog, wait_until};

pub(crate) const USER: &str = "modelwatch-svc";
pub(crate) const PASSWORD: &str = "scram-Pw-4711";

/// A child process killed on drop (with a watchdog for a test that aborts).
pub(crate) struct Proc {
    child: Child,
    watchdog: Option<Child>,
}

impl Proc {
    /// Debian's `stunnel4` terminating TLS on 127.0.0.1:`accept` with the
    /// server certificate of `certs`, in front of the plain 127.0.0.1:`connect`.
    pub(crate) fn stunnel(
        dir: &Path,
        name: &str,
        accept: u16,
        connect: u16,
        certs: &Certs,
    ) -> Proc {
        let conf = dir.join(format!("stunnel-{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[{name}]\naccept = 127.0.0.1:{accept}\nconnect = 127.0.0.1:{connect}\ncert = {}\nkey = {}\n",
                certs.server_cert.display(),
                certs.server_key.display()
            ),
        )
        .expect("stunnel.conf");
        Proc::spawn(
            Command::new("stunnel4").arg(&conf),
            &dir.join(format!("stunnel-{name}.log")),
            "stunnel4",
            accept,
        )
    }

    pub(crate) fn spawn(cmd: &mut Command, log: &Path, what: &str, port: u16) -> Proc {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let watchdog = spawn_watchdog(child.id(), None);
        if let Err(e) = wait_until(what, Duration::from_secs(30), &mut child, || {
            port_open(port)
        }) {
            kill_child(&mut child);
            panic!(
                "{e}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        Proc { child, watchdog }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        kill_child(&mut self.child);
        if let Some(w) = self.watchdog.as_mut() {
            kill_child(w);
        }
    }
}

/// tansu on a SQLite file behind stunnel: `tls_port` is the only address
/// clients learn.
pub(crate) struct SecureBroker {
    tls_port: u16,
    _tansu: Proc,
    _stunnel: Proc,
}

impl SecureBroker {
    /// Creates modelwatch's topics (and, with `authentication`, the SCRAM
    /// user) on a plain broker, then restarts it advertising the TLS port.
    pub(crate) fn start(dir: &Path, certs: &Certs, authentication: bool) -> SecureBroker {
        let bin = tansu_bin();
        let ports = free_ports(2);
        let (plain, tls_port) = (ports[0], ports[1]);
        let plain_url = format!("tcp://127.0.0.1:{plain}");
        // tansu takes the SQLite path relative to its working directory.
        let broker = |advertised: &str, auth: bool| {
            let mut c = Command::new(&bin);
            c.current_dir(dir)
                .arg("broker")
                .args(["--listener-url", &plain_url])
                .args(["--advertised-listener-url", advertised])
                .args(["--storage-engine", "sqlite://tansu.db"]);
            if auth {
                c.arg("--authentication");
            }
            c
        };
        {
            let _setup = Proc::spawn(
                &mut broker(&plain_url, false),
                &dir.join("tansu-setup.log"),
                "tansu (setup)",
                plain,
            );
            for (topic, partitions) in [
                ("predictions", PARTITIONS),
                ("ground-truth", PARTITIONS),
                ("model-alerts", 1),
                ("modelwatch-dead-letter", 1),
            ] {
                must(
                    Command::new(&bin)
                        .args(["topic", "create", "--broker", &plain_url])
                        .args(["--partitions", &partitions.to_string(), topic]),
                    "tansu topic create",
                );
            }
            if authentication {
                must(
                    Command::new(&bin)
                        .args(["user", "create", "--broker", &plain_url])
                        .args(["--mechanism", "scram512", USER, PASSWORD]),
                    "tansu user create",
                );
            }
        }
        // The setup broker is gone once its port is free again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while port_open(plain) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let tansu = Proc::spawn(
            &mut broker(&format!("tcp://127.0.0.1:{tls_port}"), authentication),
            &dir.join("tansu.log"),
            "tansu",
            plain,
        );
        let stunnel = Proc::stunnel(dir, "kafka", tls_port, plain, certs);
        SecureBroker {
            tls_port,
            _tansu: tansu,
            _stunnel: stunnel,
        }
    }

    pub(crate) fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.tls_port)
    }
}

/// The client properties of one security setup, as `[kafka.properties]`.
fn properties(ca: &Path, sasl_password: Option<&str>) -> Vec<(&'static str, String)> {
    let mut p = vec![("ssl.ca.location", ca.display().to_string())];
    match sasl_password {
        None => p.push(("security.protocol", "SSL".into())),
        Some(pw) => p.extend([
            ("security.protocol", "SASL_SSL".into()),
            ("sasl.mechanism", "SCRAM-SHA-512".into()),
            ("sasl.username", USER.into()),
            ("sasl.password", pw.into()),
        ]),
    }
    p
}

pub(crate) fn client(brokers: &str, props: &[(&str, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in props {
        c.set(*k, v);
    }
    c
}

/// The dataset as `pipeline::produce` sends it (early labels, predictions,
/// the other labels, the malformed messages), JSON-encoded, over TLS.
async fn produce(brokers: &str, props: &[(&str, String)], d: &Dataset) {
    let p: FutureProducer = client(brokers, props)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let first = |id: &str| {
        id.strip_prefix('r')
            .and_then(|i| i.parse::<i64>().ok())
            .is_some_and(|i| i % 8 == 0)
    };
    let label =
        |l: &modelwatch::model::GroundTruthEvent| encode_json(&InputEvent::GroundTruth(l.clone()));
    for l in d.labels.iter().filter(|l| first(&l.request_id)) {
        send(&p, "ground-truth", &l.request_id, &label(l)).await;
    }
    for e in &d.predictions {
        let bytes = encode_json(&InputEvent::Prediction(e.clone()));
        send(&p, "predictions", &e.request_id, &bytes).await;
    }
    for l in d.labels.iter().filter(|l| !first(&l.request_id)) {
        send(&p, "ground-truth", &l.request_id, &label(l)).await;
    }
    for (input, k, payload) in &d.malformed {
        let topic = match input {
            Input::Predictions => "predictions",
            Input::GroundTruth => "ground-truth",
        };
        send(&p, topic, k, payload).await;
    }
    p.flush(Duration::from_secs(10)).expect("flush");
}

/// Every message of `topic` over TLS, until `n` arrived or 20 s passed.
pub(crate) fn read_topic(
    brokers: &str,
    props: &[(&str, String)],
    topic: &str,
    n: usize,
) -> Vec<rdkafka::message::OwnedMessage> {
    let c: BaseConsumer = client(brokers, props)
        .set("group.id", format!("reader-{topic}-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
    out
}

/// The exact window metrics of `d` (read from `sink`) and its malformed
/// messages, by key, on the dead-letter topic; returns the dead letters.
pub(crate) fn assert_metrics_and_dead_letters(
    runtime: &tokio::runtime::Runtime,
    sink: &ClickHouseSink,
    d: &Dataset,
    t0: i64,
    brokers: &str,
    props: &[(&str, String)],
) -> Vec<rdkafka::message::OwnedMessage> {
    let rows = runtime.block_on(read_final(sink));
    let (exact, approx) = expected(d, true);
    assert!(exact.len() > 130, "{}", exact.len());
    assert_matches(&rows, &exact, &approx);
    assert!(rows.contains_key(&key(CLF, "", t0, "prediction_count", "")));
    let dead = read_topic(brokers, props, "modelwatch-dead-letter", d.malformed.len());
    let mut keys: Vec<String> = dead
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    keys.sort();
    let mut want: Vec<String> = d.malformed.iter().map(|(_, k, _)| k.clone()).collect();
    want.sort();
    assert_eq!(keys, want, "dead letters");
    dead
}

/// A configuration file with `props` as `[kafka.properties]` and the e2e
/// test's accuracy rule (fires on the dataset's `clf`).
fn write_config(path: &Path, props: &[(&str, String)]) {
    let mut text = String::from("[kafka.properties]\n");
    for (k, v) in props {
        text.push_str(&format!("{k:?} = {v:?}\n"));
    }
    text.push_str(
        "\n[alerts]\ndefault_rules = false\n\n[[alerts.rules]]\nname = \"clf_accuracy_low\"\nmetric = \"accuracy\"\nmodel = \"clf\"\noperator = \"<\"\nthreshold = 0.99\nseverity = \"critical\"\n",
    );
    std::fs::write(path, text).expect("write config");
}

/// The binary over `props` against `broker`: exact window metrics in
/// ClickHouse, the dead letters and alerts on their topics. Then the same
/// settings with the other CA (and, for SASL, a wrong password) stop at
/// startup with the reason.
fn binary_over_secured_kafka(name: &str, sasl: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::make(dir.path(), "IP:127.0.0.1");
    let broker = SecureBroker::start(dir.path(), &certs, sasl);
    let brokers = broker.bootstrap();
    let props = properties(&certs.ca, sasl.then_some(PASSWORD));
    let database = unique_database(name);
    let cfg = test_config(&brokers, &database);

    let t0 = aligned_ago(3 * 86_400_000);
    let d = dataset(t0);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(produce(&brokers, &props, &d));

    let config_path = dir.path().join("modelwatch.toml");
    write_config(&config_path, &props);
    let config = config_path.to_str().expect("utf-8 path");
    let env: Vec<(String, String)> = [
        ("MODELWATCH_KAFKA__BROKERS", brokers.clone()),
        ("MODELWATCH_KAFKA__GROUP_ID", cfg.kafka.group_id.clone()),
        ("MODELWATCH_CLICKHOUSE__URL", cfg.clickhouse.url.clone()),
        ("MODELWATCH_CLICKHOUSE__DATABASE", database.clone()),
        ("MODELWATCH_WINDOWS__SIZES", "1m".into()),
        ("MODELWATCH_WINDOWS__ALLOWED_LATENESS", "1h".into()),
        ("MODELWATCH_WINDOWS__IDLE_TIMEOUT", "2s".into()),
        ("MODELWATCH_WINDOWS__LABEL_HORIZON", "24h".into()),
        ("MODELWATCH_SERVICE__FLUSH_INTERVAL", "200ms".into()),
        // Both tests run at once: no HTTP API (its port is fixed).
        ("MODELWATCH_API__ENABLED", "false".into()),
        (
            "MODELWATCH_STATE__DIR",
            dir.path().join("state").to_string_lossy().into_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let reference = reference_file(&d.reference);
    let reference = reference.path().to_str().expect("utf-8 path");
    let (ok, out, _) = run_binary(
        &[
            "--config",
            config,
            "reference",
            "import",
            "--model",
            CLF,
            "--version",
            "v1",
            reference,
        ],
        &env,
        &dir.path().join("reference.log"),
    );
    assert!(ok && out.contains("100 events"), "{out}");

    let (ok, log, _) = run_binary(
        &["--config", config, "run", "--exit-when-idle"],
        &env,
        &dir.path().join("run.log"),
    );
    assert!(ok, "modelwatch run over {name} failed:\n{log}");
    assert!(log.contains("input idle"), "{log}");

    // Dead letters and alerts went out over the same secured connection.
    let sink = ClickHouseSink::new(&cfg.clickhouse);
    assert_metrics_and_dead_letters(&runtime, &sink, &d, t0, &brokers, &props);
    let alerts = read_topic(&brokers, &props, "model-alerts", 1);
    assert!(!alerts.is_empty(), "no alert over {name}");
    let a = decode_alert(alerts[0].payload().unwrap_or_default()).expect("AlertEvent");
    assert_eq!(
        (a.rule.as_str(), a.model_id.as_str()),
        ("clf_accuracy_low", CLF)
    );

    // Settings that can never work stop the service at startup.
    let mut bad_cases = vec![(
        "wrong CA",
        properties(&certs.other_ca, sasl.then_some(PASSWORD)),
        "certificate verify failed",
    )];
    if sasl {
        bad_cases.push((
            "wrong password",
            properties(&certs.ca, Some("not-the-Pw-0815")),
            "SASL authentication error",
        ));
    }
    for (case, bad, want) in bad_cases {
        write_config(&config_path, &bad);
        let (ok, log, secs) = run_binary(
            &["--config", config, "run", "--exit-when-idle"],
            &env,
            &dir.path().join("bad.log"),
        );
        assert!(!ok, "{case}: the binary ran:\n{log}");
        let error = log
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{case}: no error line:\n{log}"));
        assert!(
            error.contains("cannot connect to kafka.brokers"),
            "{case}: {error}"
        );
        assert!(error.contains(want), "{case}: {error}");
        assert!(secs < 20.0, "{case}: took {secs:.1} s");
        assert!(
            !log.contains("not-the-Pw-0815") && !log.contains(PASSWORD),
            "{case}: password in the log:\n{log}"
        );
    }
}

#[test]
fn binary_over_ssl_gives_exact_metrics_dead_letters_and_alerts_and_a_wrong_ca_stops_it() {
    binary_over_secured_kafka("mw_tls", false);
}

#[test]
fn binary_over_sasl_ssl_scram_gives_exact_metrics_and_a_wrong_password_stops_it() {
    binary_over_secured_kafka("mw_scram", true);
}

/// One request an identity provider's token endpoint received.
#[derive(Debug, Clone)]
struct TokenRequest {
    request_line: String,
    authorization: Option<String>,
    body: String,
}

/// An OAuth 2 token endpoint on loopback: answers every request with
/// `status` and `body` and keeps what it received. Stops with the test.
struct TokenEndpoint {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<TokenRequest>>>,
}

impl TokenEndpoint {
    fn start(status: u16, body: String) -> TokenEndpoint {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            // Bounded: a client makes a handful of token requests at most.
            for stream in listener.incoming().take(64) {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let (mut length, mut authorization) = (0usize, None);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        match name.trim().to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            "authorization" => authorization = Some(value.trim().to_owned()),
                            _ => {}
                        }
                    }
                }
                let mut received = vec![0; length.min(1 << 16)];
                let _ = reader.read_exact(&mut received);
                seen.lock().expect("lock").push(TokenRequest {
                    request_line: request_line.trim().to_owned(),
                    authorization,
                    body: String::from_utf8_lossy(&received).into_owned(),
                });
                let reason = if status == 200 { "OK" } else { "Unauthorized" };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TokenEndpoint { port, requests }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/oauth2/token", self.port)
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().expect("lock").clone()
    }
}

/// A JWT as identity providers issue them (header, claims, signature;
/// librdkafka reads `sub` and `exp` from the claims).
fn jwt(subject: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"{subject}","exp":{exp}}}"#));
    format!("{header}.{claims}.c2lnbmF0dXJl")
}

/// OAUTHBEARER with `sasl.oauthbearer.method = "oidc"` (librdkafka built
/// with curl): the binary fetches its token from the identity provider with
/// the client-credentials grant (client id and secret in HTTP basic auth,
/// the scope in the form body) and presents it to the broker. tansu 0.6
/// verifies only PLAIN and SCRAM, so it fails the OAUTHBEARER
/// authentication, which stops the service at startup with the reason; a
/// token endpoint that refuses the client stops it too, with the provider's
/// answer. Neither log holds the client secret.
#[test]
fn binary_with_oauthbearer_oidc_fetches_its_token_from_the_identity_provider() {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    const CLIENT_SECRET: &str = "oidc-Secret-0042";
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::make(dir.path(), "IP:127.0.0.1");
    let broker = SecureBroker::start(dir.path(), &certs, true);
    let brokers = broker.bootstrap();
    let config_path = dir.path().join("modelwatch.toml");
    let config = config_path.to_str().expect("utf-8 path");
    let env: Vec<(String, String)> = [
        ("MODELWATCH_KAFKA__BROKERS", brokers.clone()),
        ("MODELWATCH_API__ENABLED", "false".to_owned()),
        (
            "MODELWATCH_STATE__DIR",
            dir.path().join("state").to_string_lossy().into_owned(),
        ),
        // The secret from the environment, as a deployment keeps it.
        (
            "MODELWATCH_KAFKA__PROPERTIES__SASL_OAUTHBEARER_CLIENT_SECRET",
            CLIENT_SECRET.to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let props = |endpoint: &TokenEndpoint| {
        vec![
            ("ssl.ca.location", certs.ca.display().to_string()),
            ("security.protocol", "SASL_SSL".to_owned()),
            ("sasl.mechanism", "OAUTHBEARER".to_owned()),
            ("sasl.oauthbearer.method", "oidc".to_owned()),
            ("sasl.oauthbearer.token.endpoint.url", endpoint.url()),
            ("sasl.oauthbearer.client.id", "modelwatch-client".to_owned()),
            ("sasl.oauthbearer.scope", "kafka.read".to_owned()),
        ]
    };
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("modelwatch-client:{CLIENT_SECRET}"))
    );

    for (case, status, body, want) in [
        (
            "token issued",
            200,
            format!(
                r#"{{"access_token":"{}","token_type":"bearer","expires_in":3600}}"#,
                jwt("modelwatch-client")
            ),
            "sasl authentication failed",
        ),
        (
            "client refused",
            401,
            r#"{"error":"invalid_client"}"#.to_owned(),
            "failed to acquire sasl oauthbearer token: {\"error\":\"invalid_client\"}",
        ),
    ] {
        let endpoint = TokenEndpoint::start(status, body);
        write_config(&config_path, &props(&endpoint));
        let (ok, log, secs) = run_binary(
            &["--config", config, "run", "--exit-when-idle"],
            &env,
            &dir.path().join(format!("{status}.log")),
        );
        let requests = endpoint.requests();
        let first = requests
            .first()
            .unwrap_or_else(|| panic!("{case}: no token request; log:\n{log}"));
        assert_eq!(first.request_line, "POST /oauth2/token HTTP/1.1", "{case}");
        assert_eq!(
            first.authorization.as_deref(),
            Some(basic.as_str()),
            "{case}"
        );
        let form: Vec<&str> = first.body.split('&').collect();
        assert!(
            form.contains(&"grant_type=client_credentials"),
            "{case}: {form:?}"
        );
        assert!(form.contains(&"scope=kafka.read"), "{case}: {form:?}");
        assert!(!ok, "{case}: the binary ran:\n{log}");
        let error = log
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{case}: no error line:\n{log}"));
        eprintln!("{case}: {error} ({secs:.1} s)");
        assert!(
            error.contains("cannot connect to kafka.brokers"),
            "{case}: {error}"
        );
        assert!(error.to_ascii_lowercase().contains(want), "{case}: {error}");
        assert!(secs < 20.0, "{case}: took {secs:.1} s");
        assert!(
            !log.contains(CLIENT_SECRET),
            "{case}: secret in the log:\n{log}"
        );
    }

    // No identity provider at all (nothing listens on the port).
    let endpoint = TokenEndpoint::start(200, String::new());
    let mut down = props(&endpoint);
    let closed = crate::support::free_port();
    down[4].1 = format!("http://127.0.0.1:{closed}/oauth2/token");
    write_config(&config_path, &down);
    let (ok, log, secs) = run_binary(
        &["--config", config, "run", "--exit-when-idle"],
        &env,
        &dir.path().join("down.log"),
    );
    assert!(!ok, "provider down: the binary ran:\n{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("provider down: no error line:\n{log}"));
    eprintln!("provider down: {error} ({secs:.1} s)");
    assert!(
        error.contains("Failed to acquire SASL OAUTHBEARER token"),
        "{error}"
    );
    assert!(secs < 20.0, "provider down: took {secs:.1} s");
    assert!(
        !log.contains(CLIENT_SECRET),
        "provider down: secret in the log"
    );
}
