//! Certificates the TLS tests make at run time with the `openssl` CLI
//! (never committed keys): a CA, an unrelated second CA, and a server and a
//! client certificate signed by the CA, EC P-256, valid for two days.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Runs `cmd` and panics with its output unless it succeeds.
pub fn must(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The files of [`Certs::make`] (PEM).
pub struct Certs {
    /// The CA's certificate.
    pub ca: PathBuf,
    /// Another CA's certificate, which signed nothing here.
    pub other_ca: PathBuf,
    /// The server certificate, for the names of `make`'s `server_san`.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate (`extendedKeyUsage=clientAuth`, CN `modelwatch`).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl Certs {
    /// Makes them in `dir`; `server_san` is the server certificate's
    /// subjectAltName (`IP:127.0.0.1`, `DNS:localhost`, ...).
    pub fn make(dir: &Path, server_san: &str) -> Certs {
        let p = |n: &str| dir.join(n);
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (name, cn) in [("ca", "modelwatch-test-ca"), ("other-ca", "someone-else")] {
            must(
                Command::new("openssl")
                    .args(["req", "-x509"])
                    .args(ec)
                    .arg("-keyout")
                    .arg(p(&format!("{name}.key")))
                    .arg("-out")
                    .arg(p(&format!("{name}.pem")))
                    .args(["-days", "2", "-subj", &format!("/CN={cn}")]),
                "openssl req -x509",
            );
        }
        std::fs::write(p("server.ext"), format!("subjectAltName={server_san}\n"))
            .expect("server.ext");
        std::fs::write(p("client.ext"), "extendedKeyUsage=clientAuth\n").expect("client.ext");
        for (name, cn) in [
            ("server", "modelwatch-test-server"),
            ("client", "modelwatch"),
        ] {
            must(
                Command::new("openssl")
                    .arg("req")
                    .args(ec)
                    .arg("-keyout")
                    .arg(p(&format!("{name}.key")))
                    .arg("-out")
                    .arg(p(&format!("{name}.csr")))
                    .args(["-subj", &format!("/CN={cn}")]),
                "openssl req",
            );
            must(
                Command::new("openssl")
                    .args(["x509", "-req", "-in"])
                    .arg(p(&format!("{name}.csr")))
                    .arg("-CA")
                    .arg(p("ca.pem"))
                    .arg("-CAkey")
                    .arg(p("ca.key"))
                    .args(["-CAcreateserial", "-days", "2", "-out"])
                    .arg(p(&format!("{name}.pem")))
                    .arg("-extfile")
                    .arg(p(&format!("{name}.ext"))),
                "openssl x509 -req",
            );
        }
        Certs {
            ca: p("ca.pem"),
            other_ca: p("other-ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
        }
    }
}
