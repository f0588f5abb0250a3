//! A private ClickHouse server for tests: Debian's `clickhouse-server`
//! (18.16 here) on free loopback ports with a temporary data directory,
//! configured from the same templates as `deploy/clickhouse-start.sh`.
//!
//! With `MODELWATCH_TEST_CLICKHOUSE_URL` set, the external server at that URL
//! is used instead and nothing is started.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use modelwatch::config::ClickHouseConfig;

use super::{free_ports, kill_child, repo_root, spawn_watchdog, wait_until};

/// How long a fresh server may take to answer `/ping`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTPS for a private server: ClickHouse's own `https_port` with this
/// certificate and key (PEM); with `client_ca`, clients must present a
/// certificate signed by it (`verificationMode` strict).
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A running ClickHouse server (ours or external); ours is killed on drop.
pub struct ClickHouseServer {
    url: String,
    http_port: u16,
    https_port: u16,
    child: Option<Child>,
    watchdog: Option<Child>,
    dir: Option<PathBuf>,
}

impl ClickHouseServer {
    /// Starts a private server (or returns a handle on the external one from
    /// `MODELWATCH_TEST_CLICKHOUSE_URL`). Panics with the reason if it cannot.
    pub fn start() -> ClickHouseServer {
        if let Ok(url) = std::env::var("MODELWATCH_TEST_CLICKHOUSE_URL") {
            return ClickHouseServer {
                url: url.trim_end_matches('/').to_owned(),
                http_port: 0,
                https_port: 0,
                child: None,
                watchdog: None,
                dir: None,
            };
        }
        let mut last_err = String::new();
        // A port picked as free can be taken before the server binds it: retry.
        for _ in 0..3 {
            match Self::try_start(None) {
                Ok(s) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("cannot start clickhouse-server for the tests: {last_err}");
    }

    /// Starts a private server that also listens on an `https_port` with
    /// `tls` (always a private one, even with `MODELWATCH_TEST_CLICKHOUSE_URL`).
    pub fn start_with_tls(tls: &TlsSettings) -> ClickHouseServer {
        let mut last_err = String::new();
        for _ in 0..3 {
            match Self::try_start(Some(tls)) {
                Ok(s) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("cannot start clickhouse-server with https for the tests: {last_err}");
    }

    /// One server shared by every test of this process (each test should
    /// use its own database, see [`unique_database`]). Stopped by its
    /// watchdog when the process exits.
    pub fn shared() -> &'static ClickHouseServer {
        static SHARED: OnceLock<ClickHouseServer> = OnceLock::new();
        SHARED.get_or_init(ClickHouseServer::start)
    }

    fn try_start(tls: Option<&TlsSettings>) -> Result<ClickHouseServer, String> {
        let (program, args) = server_command().ok_or_else(|| {
            "clickhouse-server not found; run deploy/clickhouse-start.sh once (it installs the Debian package)".to_string()
        })?;
        let ports = free_ports(3);
        let (http_port, tcp_port) = (ports[0], ports[1]);
        let https_port = if tls.is_some() { ports[2] } else { 0 };
        let dir = tempfile::Builder::new()
            .prefix("modelwatch-ch-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?
            .keep();
        let render = |template: &str, out: &str| -> Result<(), String> {
            let src = repo_root().join("deploy/clickhouse").join(template);
            let text = std::fs::read_to_string(&src)
                .map_err(|e| format!("read {}: {e}", src.display()))?;
            let text = text
                .replace("@DIR@", &dir.display().to_string())
                .replace("@HTTP_PORT@", &http_port.to_string())
                .replace("@TCP_PORT@", &tcp_port.to_string());
            std::fs::write(dir.join(out), text).map_err(|e| format!("write {out}: {e}"))
        };
        for sub in ["data", "tmp", "log", "user_files", "format_schemas"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
        }
        render("config.xml.in", "config.xml")?;
        if let Some(tls) = tls {
            let path = dir.join("config.xml");
            let text = std::fs::read_to_string(&path).map_err(|e| format!("read config: {e}"))?;
            std::fs::write(&path, text.replace("</yandex>", &tls_xml(tls, https_port)))
                .map_err(|e| format!("write config: {e}"))?;
        }
        render("users.xml.in", "users.xml")?;
        let stdout = std::fs::File::create(dir.join("log/stdout.log"))
            .map_err(|e| format!("log file: {e}"))?;
        let stderr = stdout.try_clone().map_err(|e| format!("log file: {e}"))?;
        let mut child = Command::new(&program)
            .args(&args)
            .arg(format!(
                "--config-file={}",
                dir.join("config.xml").display()
            ))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", program.display()))?;
        let watchdog = spawn_watchdog(child.id(), Some(&dir));
        let mut server = ClickHouseServer {
            url: format!("http://127.0.0.1:{http_port}"),
            http_port,
            https_port,
            child: None,
            watchdog,
            dir: Some(dir.clone()),
        };
        let ready = wait_until("clickhouse-server", START_TIMEOUT, &mut child, || {
            ping(http_port) && (https_port == 0 || super::port_open(https_port))
        });
        server.child = Some(child);
        match ready {
            Ok(()) => Ok(server),
            Err(e) => {
                let log = std::fs::read_to_string(dir.join("log/clickhouse-server.err.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                Err(format!("{e}; last error log lines: {tail:?}"))
                // `server` drops here: kills the child and removes the directory.
            }
        }
    }

    /// The HTTP URL, e.g. `http://127.0.0.1:34567`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The HTTP port (0 for an external server).
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The HTTPS port (0 unless started by [`ClickHouseServer::start_with_tls`]).
    pub fn https_port(&self) -> u16 {
        self.https_port
    }

    /// A sink configuration for this server and `database`.
    pub fn config(&self, database: &str) -> ClickHouseConfig {
        ClickHouseConfig {
            url: self.url.clone(),
            database: database.to_owned(),
            ..ClickHouseConfig::default()
        }
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_child(child);
        }
        if let Some(w) = self.watchdog.as_mut() {
            kill_child(w);
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The `<https_port>` and `<openSSL>` part of a server's config.xml
/// (ClickHouse 18.16 / Poco names), closing the root element.
fn tls_xml(tls: &TlsSettings, https_port: u16) -> String {
    let verification = match &tls.client_ca {
        Some(ca) => format!(
            "<verificationMode>strict</verificationMode>\n            <caConfig>{}</caConfig>",
            ca.display()
        ),
        None => "<verificationMode>none</verificationMode>".to_owned(),
    };
    format!(
        r#"    <https_port>{https_port}</https_port>
    <openSSL>
        <server>
            <certificateFile>{}</certificateFile>
            <privateKeyFile>{}</privateKeyFile>
            {verification}
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>true</cacheSessions>
            <disableProtocols>sslv2,sslv3</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>
</yandex>"#,
        tls.cert.display(),
        tls.key.display()
    )
}

/// A database name no other test of any process uses: `prefix_<pid>_<n>`.
pub fn unique_database(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The server program and its leading arguments.
fn server_command() -> Option<(PathBuf, Vec<String>)> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path)
        .map(|d| d.join("clickhouse-server"))
        .chain([PathBuf::from("/usr/sbin/clickhouse-server")]);
    for c in candidates {
        if is_executable(&c) {
            return Some((c, Vec::new()));
        }
    }
    let multi = PathBuf::from("/usr/bin/clickhouse");
    is_executable(&multi).then(|| (multi, vec!["server".to_string()]))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// True when `GET /ping` on 127.0.0.1:`port` answers `Ok.`.
pub fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.starts_with("HTTP/1.") && body.contains(" 200 ") && body.trim_end().ends_with("Ok.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_server_answers_ping_and_is_gone_after_drop() {
        if std::env::var_os("MODELWATCH_TEST_CLICKHOUSE_URL").is_some() {
            // An external server is not ours to stop; the other tests cover it.
            return;
        }
        let server = ClickHouseServer::start();
        let port = server.http_port();
        assert!(ping(port));
        assert!(server.url().ends_with(&format!(":{port}")));
        let dir = server.dir.clone().expect("private server has a directory");
        assert!(dir.join("config.xml").is_file());
        drop(server);
        assert!(!ping(port), "server still answering after drop");
        assert!(!dir.exists(), "data directory left behind");
    }
}
