//! End-to-end throughput: `modelwatch run --exit-when-idle` (the release
//! binary) against a `tansu` broker and ClickHouse, next to a bare rdkafka
//! consumer that only counts the same messages, in the same run.
//!
//! `cargo bench --bench e2e_throughput`; `E2E_BENCH_MESSAGES` sets
//! the number of messages (default 1,000,000: predictions with 25 features,
//! 20 numeric and 5 categorical, plus their labels, as JSON).
//!
//! Both consumers start with a fresh group on the same filled topics; each
//! is timed from its start (group join included) until it has consumed
//! everything: for the bare consumer when its count reaches the total, for
//! modelwatch when it logs that the input went idle, minus the idle timeout
//! (the total time to its exit, with the final window flush, is printed too).

// The harness's own `#[cfg(test)]` checks do not run in a bench.
#[allow(unused_imports)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use modelwatch::app::now_ms;
use modelwatch::generate::{json_encode, produce, Generator, ProduceOptions, Scenario};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use support::clickhouse::ClickHouseServer;
use support::tansu::TansuBroker;

/// Idle timeout of the measured service: subtracted from its time.
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest either consumer may take.
const DEADLINE: Duration = Duration::from_secs(1800);

fn main() {
    // Under `cargo test` (no `--bench`), a small smoke run with the test
    // build's binary keeps this bench from rotting without costing CI time.
    let benching = std::env::args().any(|a| a == "--bench");
    let messages: u64 = std::env::var("E2E_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(if benching { 1_000_000 } else { 2_000 });
    let binary = if benching {
        release_binary()
    } else {
        PathBuf::from(env!("CARGO_BIN_EXE_modelwatch"))
    };
    let broker = TansuBroker::start(4);
    let clickhouse = ClickHouseServer::start();
    let brokers = broker.bootstrap();

    // One prediction per request plus a label for 90 % of them.
    let requests = (messages as f64 / 1.9).ceil() as u64;
    let scenario = Scenario {
        count: requests,
        versions: vec!["v1".to_owned()],
        numeric_features: 20,
        categorical_features: 5,
        events_per_second: 200.0,
        start_ms: now_ms() - 7 * 86_400_000,
        ..Scenario::default()
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let opts = ProduceOptions {
        brokers: brokers.clone(),
        ..ProduceOptions::default()
    };
    println!("producing {requests} requests (25 features, JSON) to tansu at {brokers}");
    let summary = runtime
        .block_on(produce(
            Generator::new(scenario),
            &opts,
            &json_encode,
            &mut |_| {},
        ))
        .expect("produce");
    let total = summary.predictions + summary.labels;
    println!(
        "produced {total} messages ({} predictions, {} labels) in {:.2} s: {:.0} msg/s",
        summary.predictions,
        summary.labels,
        summary.elapsed.as_secs_f64(),
        total as f64 / summary.elapsed.as_secs_f64()
    );

    let bare = bare_consumer(&brokers, total);
    println!(
        "bare rdkafka consumer: {total} messages in {:.2} s: {:.0} msg/s",
        bare.as_secs_f64(),
        total as f64 / bare.as_secs_f64()
    );

    let (consumed, exited) = modelwatch_run(&binary, &brokers, clickhouse.url(), total);
    println!(
        "modelwatch run: {total} messages in {:.2} s: {:.0} msg/s (exit after {:.2} s, final flush included)",
        consumed.as_secs_f64(),
        total as f64 / consumed.as_secs_f64(),
        exited.as_secs_f64()
    );
    println!(
        "ratio modelwatch / bare consumer: {:.2}",
        bare.as_secs_f64() / consumed.as_secs_f64()
    );
}

/// The release binary, built first when missing.
fn release_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| support::repo_root().join("target"));
    let bin = target.join("release/modelwatch");
    // Always (re)build: a stale binary would measure old code. A no-op when fresh.
    println!("building the release binary (cargo build --release --bin modelwatch)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "modelwatch"])
        .current_dir(support::repo_root())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --release failed");
    bin
}

/// Time for a consumer with the service's group settings to count `total` messages.
fn bare_consumer(brokers: &str, total: u64) -> Duration {
    let started = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-bare-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range")
        .create()
        .expect("consumer");
    consumer
        .subscribe(&["predictions", "ground-truth"])
        .expect("subscribe");
    let mut n = 0u64;
    while n < total {
        assert!(
            started.elapsed() < DEADLINE,
            "bare consumer read {n} of {total}"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m.expect("consume");
            n += 1;
        }
    }
    started.elapsed()
}

/// Runs `modelwatch run --exit-when-idle` on fresh group and database;
/// returns (time to have consumed everything, time to exit).
fn modelwatch_run(
    binary: &PathBuf,
    brokers: &str,
    clickhouse: &str,
    total: u64,
) -> (Duration, Duration) {
    let started = Instant::now();
    let mut cmd = Command::new(binary);
    // Only the settings below apply.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MODELWATCH_")) {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .args(["run", "--exit-when-idle"])
        .env("MODELWATCH_KAFKA__BROKERS", brokers)
        .env(
            "MODELWATCH_KAFKA__GROUP_ID",
            format!("bench-mw-{}", std::process::id()),
        )
        .env("MODELWATCH_CLICKHOUSE__URL", clickhouse)
        .env(
            "MODELWATCH_CLICKHOUSE__DATABASE",
            format!("mw_bench_{}", std::process::id()),
        )
        .env(
            "MODELWATCH_WINDOWS__IDLE_TIMEOUT",
            format!("{}s", IDLE_TIMEOUT.as_secs()),
        )
        .env("MODELWATCH_SERVICE__LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn modelwatch");
    let _watchdog = support::spawn_watchdog(child.id(), None);
    // The log goes to stderr.
    let log = child.stderr.take().expect("piped stderr");
    // Read the log on a thread: the idle line marks the end of consumption.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut tail = std::collections::VecDeque::new();
        for line in BufReader::new(log).lines().map_while(Result::ok) {
            if line.contains("input idle") {
                let _ = tx.send((Instant::now(), line.clone()));
            }
            if tail.len() == 20 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail.into_iter().collect::<Vec<_>>().join("\n")
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > DEADLINE {
            support::kill_child(&mut child);
            panic!("modelwatch did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let exited = started.elapsed();
    let tail = reader.join().unwrap_or_default();
    assert!(
        status.success(),
        "modelwatch failed: {status}; log tail:\n{tail}"
    );
    let (idle_at, line) = rx.recv().expect("modelwatch logged no idle line");
    let expected = format!("\"consumed\":{total}");
    assert!(line.contains(&expected), "not everything consumed: {line}");
    let consumed = idle_at.duration_since(started).saturating_sub(IDLE_TIMEOUT);
    (consumed, exited)
}
