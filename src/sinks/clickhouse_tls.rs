//! ClickHouse over HTTPS: the TLS side of the ClickHouse client.
//!
//! The `clickhouse` crate talks HTTP through a hyper client; this module
//! builds that client's connector: plain TCP for `http://` URLs and rustls
//! (crypto provider ring, the one reqwest's rustls already uses) for
//! `https://` ones, trusting the system's CA store (`rustls-native-certs`,
//! read once per process) plus the certificates of `clickhouse.ca_file`, and
//! presenting `clickhouse.client_cert_file` / `clickhouse.client_key_file`
//! when both are set (mutual TLS). TCP keep-alive (60 s) and the pool's idle
//! timeout (2 s, under ClickHouse's 3 s `keep_alive_timeout`) are those of
//! the crate's own default client.
//!
//! [`check`] reads and parses the files and builds the rustls configuration
//! once, so `Config::validate` rejects a bad file at load, naming the key.
//! A file that becomes unreadable after that does not panic the sink: its
//! connector then fails every connection with a [`TlsSetupError`], which the
//! sink classifies as permanent like any TLS handshake failure
//! ([`tls_failure`]): a certificate problem is never retried.

use std::error::Error as StdError;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::config::ClickHouseConfig;

/// TCP keep-alive of connections to ClickHouse (the `clickhouse` crate's default).
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How long an idle pooled connection is kept: under ClickHouse's default
/// `keep_alive_timeout` of 3 s (the `clickhouse` crate's default).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest the TCP connection and TLS handshake of an `https://` URL may
/// take. Without it, a server that does not speak TLS and waits for a
/// request line that never comes (ClickHouse's plain HTTP port, unless the
/// ClientHello happens to hold a newline) would hold the request until its
/// own timeout.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn StdError + Send + Sync>;

/// The TLS handshake did not complete within [`HANDSHAKE_TIMEOUT`]: a
/// network error (retried), with what to check.
#[derive(Debug, Clone, thiserror::Error)]
#[error("TLS handshake with ClickHouse failed: not completed within {}s (a slow network, or the server did not speak TLS: is clickhouse.url's port ClickHouse's https_port?)", HANDSHAKE_TIMEOUT.as_secs())]
pub struct HandshakeTimeout;

/// The TLS settings could not be turned into a client configuration (a
/// file unreadable or invalid since the configuration was loaded).
#[derive(Debug, Clone, thiserror::Error)]
#[error("ClickHouse TLS setup failed: {0}")]
pub struct TlsSetupError(pub String);

/// The certificates of a PEM file (at least one), or why not, naming `key`.
fn read_certs(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bad = |what: String| format!("{key} = {path:?}: {what}");
    std::fs::metadata(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    let certs = CertificateDer::pem_file_iter(Path::new(path))
        .map_err(|e| bad(format!("cannot read it ({e})")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate in it, expected PEM \"-----BEGIN CERTIFICATE-----\" blocks".into(),
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC), or why
/// not, naming `key` (never the key's content).
fn read_key(key: &str, path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let bad = |what: String| format!("{key} = {path:?}: {what}");
    std::fs::metadata(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    PrivateKeyDer::from_pem_file(Path::new(path)).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => bad(
            "no private key in it, expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block (unencrypted)".into(),
        ),
        rustls::pki_types::pem::Error::Io(e) => bad(format!("cannot read it ({e})")),
        e => bad(format!("not valid PEM ({e})")),
    })
}

/// The system's trusted CA certificates, read once per process. Unreadable
/// entries of the store are skipped (and logged once); an empty store is
/// fine when `clickhouse.ca_file` names the CA.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if !found.errors.is_empty() {
            tracing::warn!(
                errors = found.errors.len(),
                first = %found.errors[0],
                "some system CA certificates could not be read; ClickHouse over https trusts the others and clickhouse.ca_file"
            );
        }
        found.certs
    })
}

/// Validates the TLS settings of `[clickhouse]`: the URL is `http://` or
/// `https://` with a host, the files exist and parse (certificates, a
/// private key matching the certificate), the client certificate and key go
/// together, and no TLS file is set for an `http://` URL (it would be
/// ignored and the connection would be in clear text). Errors name the key.
pub fn check(cfg: &ClickHouseConfig) -> Result<(), String> {
    let url = cfg.url.as_str();
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    let parsed = url.parse::<Uri>().ok();
    if !scheme_ok
        || parsed
            .as_ref()
            .and_then(Uri::host)
            .is_none_or(str::is_empty)
    {
        return Err(format!(
            "clickhouse.url = {:?}, expected an http:// or https:// URL with a host, e.g. \"https://clickhouse.example.org:8443\"",
            cfg.display_url()
        ));
    }
    if !url.starts_with("https://") {
        for (key, value) in tls_files(cfg) {
            if !value.is_empty() {
                return Err(format!(
                    "{key} is set but clickhouse.url = {:?} is not https://: the connection would not use TLS; use an https:// URL or remove {key}",
                    cfg.display_url()
                ));
            }
        }
        return Ok(());
    }
    client_config(cfg, &[]).map(|_| ())
}

fn tls_files(cfg: &ClickHouseConfig) -> [(&'static str, &str); 3] {
    [
        ("clickhouse.ca_file", cfg.ca_file.as_str()),
        ("clickhouse.client_cert_file", cfg.client_cert_file.as_str()),
        ("clickhouse.client_key_file", cfg.client_key_file.as_str()),
    ]
}

/// The rustls configuration of `cfg`: `roots` plus `clickhouse.ca_file`,
/// and the client certificate when set.
fn client_config(
    cfg: &ClickHouseConfig,
    roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, String> {
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(roots.iter().cloned());
    if !cfg.ca_file.is_empty() {
        for cert in read_certs("clickhouse.ca_file", &cfg.ca_file)? {
            store.add(cert).map_err(|e| {
                format!(
                    "clickhouse.ca_file = {:?}: a certificate in it is not a usable CA certificate ({e})",
                    cfg.ca_file
                )
            })?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(store);
    match (cfg.client_cert_file.is_empty(), cfg.client_key_file.is_empty()) {
        (true, true) => Ok(builder.with_no_client_auth()),
        (false, false) => {
            let chain = read_certs("clickhouse.client_cert_file", &cfg.client_cert_file)?;
            let key = read_key("clickhouse.client_key_file", &cfg.client_key_file)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!(
                    "clickhouse.client_key_file = {:?} does not go with clickhouse.client_cert_file = {:?}: {e}",
                    cfg.client_key_file, cfg.client_cert_file
                )
            })
        }
        (false, true) => Err(
            "clickhouse.client_cert_file is set without clickhouse.client_key_file: a client certificate needs both (or neither)".into(),
        ),
        (true, false) => Err(
            "clickhouse.client_key_file is set without clickhouse.client_cert_file: a client certificate needs both (or neither)".into(),
        ),
    }
}

/// The connector of the ClickHouse client: HTTP, or HTTPS with the
/// configured trust and client certificate. Cheap to clone.
#[derive(Clone)]
pub struct Connector(Inner);

#[derive(Clone)]
enum Inner {
    Ready(HttpsConnector<HttpConnector>),
    /// The TLS settings could not be loaded: every connection fails with this.
    Failed(TlsSetupError),
}

impl Connector {
    /// The connector for `cfg` (system roots are loaded only for `https://`).
    pub fn new(cfg: &ClickHouseConfig) -> Connector {
        let mut http = HttpConnector::new();
        http.set_keepalive(Some(TCP_KEEPALIVE));
        http.enforce_http(false);
        let https = cfg.url.trim().starts_with("https://");
        let roots = if https { system_roots() } else { &[] };
        match client_config(cfg, roots) {
            Ok(tls) => Connector(Inner::Ready(
                HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http),
            )),
            Err(e) => {
                tracing::error!(error = %e, "ClickHouse TLS setup failed; every request to ClickHouse will fail");
                Connector(Inner::Failed(TlsSetupError(e)))
            }
        }
    }
}

type Stream = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.0 {
            Inner::Ready(c) => c.poll_ready(cx),
            Inner::Failed(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match &mut self.0 {
            Inner::Ready(c) => {
                let https = uri.scheme_str() == Some("https");
                let connect = c.call(uri);
                if !https {
                    return connect;
                }
                Box::pin(async move {
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
                        .await
                        .unwrap_or_else(|_| Err(Box::new(HandshakeTimeout) as BoxError))
                })
            }
            Inner::Failed(e) => {
                let e = e.clone();
                Box::pin(async move { Err(Box::new(e) as BoxError) })
            }
        }
    }
}

/// When a request failed because its TLS handshake timed out (see
/// [`HandshakeTimeout`]): the message. Callers retry it.
pub fn handshake_timeout(err: &(dyn StdError + 'static)) -> Option<String> {
    find_in_chain(err, &|e| {
        e.downcast_ref::<HandshakeTimeout>()
            .map(ToString::to_string)
    })
}

/// When a request failed because of the TLS setup (a handshake the
/// server's certificate or the client's settings make fail, a server
/// refusing the client's certificate or protocol, a server that does not
/// speak TLS, or TLS settings that could not be loaded): the cause with a
/// hint. Retrying cannot fix any of these, so callers treat them as
/// permanent. Other TLS errors (a record that fails to decrypt, an internal
/// error alert) are left to the caller's usual network handling.
pub fn tls_failure(err: &(dyn StdError + 'static)) -> Option<String> {
    find_in_chain(err, &|e| {
        if let Some(setup) = e.downcast_ref::<TlsSetupError>() {
            return Some(setup.to_string());
        }
        e.downcast_ref::<rustls::Error>()
            .and_then(|tls| is_setup_error(tls).then(|| describe(tls)))
    })
}

/// The first answer of `found` along `err`'s chain of causes.
/// `io::Error::source` skips the error an io::Error wraps (hyper-rustls
/// wraps tokio-rustls' io::Error, which wraps the rustls error, in another
/// io::Error): those are looked inside too.
fn find_in_chain(
    err: &(dyn StdError + 'static),
    found: &dyn Fn(&(dyn StdError + 'static)) -> Option<String>,
) -> Option<String> {
    if let Some(hit) = found(err) {
        return Some(hit);
    }
    if let Some(inner) = err
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
    {
        if let Some(hit) = find_in_chain(inner, found) {
            return Some(hit);
        }
    }
    err.source().and_then(|cause| find_in_chain(cause, found))
}

/// True for the rustls errors that only a change of certificates or
/// settings can fix.
fn is_setup_error(e: &rustls::Error) -> bool {
    use rustls::{AlertDescription as A, Error as E};
    matches!(
        e,
        E::InvalidCertificate(_)
            | E::NoCertificatesPresented
            | E::UnsupportedNameType
            | E::PeerIncompatible(_)
            | E::InvalidMessage(_)
            | E::InconsistentKeys(_)
            | E::InvalidCertRevocationList(_)
            | E::AlertReceived(
                A::CertificateRequired
                    | A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::AccessDenied
                    | A::HandshakeFailure
                    | A::ProtocolVersion
                    | A::InsufficientSecurity
            )
    )
}

/// A rustls error as a message that says what to check.
fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let hint = match e {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "the server's certificate is not signed by a CA in the system store or in clickhouse.ca_file"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the server's certificate does not name the host of clickhouse.url"
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the server's certificate has expired"
        }
        E::InvalidCertificate(_) => "the server's certificate is not acceptable",
        E::AlertReceived(
            A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::HandshakeFailure,
        ) => {
            "the server refused the handshake: it may require a client certificate it trusts (clickhouse.client_cert_file and clickhouse.client_key_file)"
        }
        E::InvalidMessage(_) => {
            "the server did not speak TLS: is clickhouse.url's port ClickHouse's https_port?"
        }
        _ => "check clickhouse.url and the TLS settings",
    };
    format!("TLS handshake with ClickHouse failed: {e} ({hint})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> ClickHouseConfig {
        ClickHouseConfig {
            url: url.into(),
            ..ClickHouseConfig::default()
        }
    }

    #[test]
    fn urls_need_an_http_or_https_scheme_and_a_host() {
        for ok in [
            "http://127.0.0.1:8123",
            "https://clickhouse.example.org:8443",
            "https://u:p@host:8443/",
        ] {
            assert_eq!(check(&cfg(ok)), Ok(()), "{ok}");
        }
        for bad in [
            "127.0.0.1:8123",
            "ftp://host:21",
            "https://",
            "tcp://host:9000",
            "HTTPS//host",
        ] {
            let e = check(&cfg(bad)).unwrap_err();
            assert!(e.starts_with("clickhouse.url = "), "{bad}: {e}");
            assert!(e.contains("http:// or https://"), "{bad}: {e}");
        }
        // Credentials in the URL are masked in the message.
        let e = check(&cfg("ftp://u:secret-pw@host")).unwrap_err();
        assert!(!e.contains("secret-pw"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_answers_the_handshake_times_out_as_a_transient_error() {
        use crate::sinks::clickhouse::{ClickHouseSink, SinkError};
        // The kernel accepts the connection; nothing ever reads or writes.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = silent.local_addr().expect("addr").port();
        let err = ClickHouseSink::new(&cfg(&format!("https://127.0.0.1:{port}")))
            .ping()
            .await
            .unwrap_err();
        assert!(matches!(err, SinkError::Transient(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("TLS handshake with ClickHouse failed: not completed within 10s"),
            "{text}"
        );
        assert!(!err.is_unreachable(), "{text}");
        drop(silent);
    }

    #[tokio::test]
    async fn tls_files_unreadable_at_connect_time_are_a_permanent_error() {
        use crate::sinks::clickhouse::{ClickHouseSink, SinkError};
        // As if the file vanished after the configuration was validated:
        // no panic, and the request fails at once, naming the key, without
        // touching the network (nothing listens on port 1).
        let broken = ClickHouseConfig {
            ca_file: "/nonexistent/ca.pem".into(),
            password: crate::config::Secret("pw-0815".into()),
            ..cfg("https://127.0.0.1:1")
        };
        let err = ClickHouseSink::new(&broken).ping().await.unwrap_err();
        assert!(matches!(err, SinkError::Permanent(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("clickhouse.ca_file = \"/nonexistent/ca.pem\": cannot read it"),
            "{text}"
        );
        assert!(!text.contains("pw-0815"), "{text}");
        // A plain connection failure stays transient.
        let err = ClickHouseSink::new(&cfg("http://127.0.0.1:1"))
            .ping()
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
    }

    #[test]
    fn tls_errors_are_found_inside_io_errors_and_explained() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        // As hyper-rustls reports a handshake failure: wrapped twice.
        let wrapped: BoxError = Box::new(std::io::Error::other(io));
        let text = tls_failure(wrapped.as_ref()).expect("a TLS failure");
        assert!(text.contains("UnknownIssuer"), "{text}");
        assert!(text.contains("clickhouse.ca_file"), "{text}");
        let setup = TlsSetupError("clickhouse.ca_file = \"/x\": cannot read it".into());
        assert!(tls_failure(&setup).unwrap().contains("/x"));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(tls_failure(&plain), None);
        // A record that fails to decrypt or an internal error alert is not
        // a setup problem: the caller's network handling (retries) applies.
        for e in [
            rustls::Error::DecryptError,
            rustls::Error::AlertReceived(rustls::AlertDescription::InternalError),
        ] {
            let io = std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
            assert_eq!(tls_failure(&io), None);
        }
        let refused = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        );
        assert!(tls_failure(&refused).unwrap().contains("client_cert_file"));
    }
}
