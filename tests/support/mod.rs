//! Test harness shared by the integration tests: real servers on free
//! loopback ports, stopped when their handle drops.
//!
//! - [`clickhouse`]: a private `clickhouse-server` (or an external one from
//!   `MODELWATCH_TEST_CLICKHOUSE_URL`).
//! - [`tansu`]: a private `tansu` Kafka-compatible broker with its topics.
//!
//! Each server also gets a watchdog shell process that kills it (and removes
//! its data directory) once the test process is gone, so a crashed or
//! `static` harness never leaves servers behind.
//!
//! Included by `tests/it/main.rs` with `#[path]`; not every test binary uses
//! every helper.
#![allow(dead_code)]

pub mod clickhouse;
pub mod registry;
pub mod tansu;
pub mod tls;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root (where `Cargo.toml` is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A currently free TCP port on 127.0.0.1 (the OS picks it; a small race
/// remains until the server binds it, which callers handle by retrying).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// `n` distinct free ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    // Hold every listener until all are chosen so the ports differ.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Polls `ready` every 50 ms until it is true, `child` exits, or `timeout`
/// passes. Returns an error describing which.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    child: &mut Child,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited during startup ({status})"));
        }
        if Instant::now() >= deadline {
            return Err(format!("{what} not ready after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a watchdog that kills `pid` and removes `dir` once this test
/// process has exited (or `pid` died on its own). Checks once a second.
pub fn spawn_watchdog(pid: u32, dir: Option<&Path>) -> Option<Child> {
    let me = std::process::id();
    let cleanup = dir
        .map(|d| format!("rm -rf '{}'", d.display()))
        .unwrap_or_else(|| "true".into());
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         kill -9 {pid} 2>/dev/null; sleep 1; {cleanup}"
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// Kills and reaps a child we started; ignores one that already exited.
pub fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Longest a `modelwatch` child of [`run_binary`] may run before it is killed.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the `modelwatch` binary with `args` and `env` (nothing else of this
/// process's `MODELWATCH_*`), its output in `log`, killing it after
/// [`CHILD_TIMEOUT`]. Returns (success, log, seconds taken).
pub fn run_binary(args: &[&str], env: &[(String, String)], log: &Path) -> (bool, String, f64) {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelwatch"));
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MODELWATCH_")) {
        cmd.env_remove(k);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn modelwatch");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for modelwatch") {
            break status;
        }
        if started.elapsed() >= CHILD_TIMEOUT {
            kill_child(&mut child);
            panic!(
                "modelwatch {args:?} still running after {CHILD_TIMEOUT:?}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    (status.success(), text, started.elapsed().as_secs_f64())
}
