//! A private `tansu` broker for end-to-end tests: Kafka protocol on a free
//! loopback port, in-memory storage, topics created up front (tansu does not
//! auto-create them).
//!
//! The binary comes from `MODELWATCH_TANSU_BIN`, else from the cache
//! directory `deploy/install-tansu.sh` installs into (running that script,
//! which builds tansu once, when the binary is missing).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{free_port, kill_child, port_open, repo_root, spawn_watchdog, wait_until};

/// How long the broker may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The default topics of modelwatch with their partition counts: both input
/// topics get `partitions` (co-partitioned), the others one.
pub fn default_topics(partitions: i32) -> Vec<(String, i32)> {
    vec![
        ("predictions".to_string(), partitions),
        ("ground-truth".to_string(), partitions),
        ("model-alerts".to_string(), 1),
        ("modelwatch-dead-letter".to_string(), 1),
    ]
}

/// A running tansu broker, killed on drop.
pub struct TansuBroker {
    port: u16,
    bin: PathBuf,
    child: Child,
    watchdog: Option<Child>,
}

impl TansuBroker {
    /// Starts a broker with modelwatch's four default topics, the input
    /// topics with `partitions` partitions. Panics with the reason if it cannot.
    pub fn start(partitions: i32) -> TansuBroker {
        let topics = default_topics(partitions);
        let refs: Vec<(&str, i32)> = topics.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        Self::start_with_topics(&refs)
    }

    /// Starts a broker and creates `topics` (name, partitions).
    pub fn start_with_topics(topics: &[(&str, i32)]) -> TansuBroker {
        let bin = tansu_bin();
        let mut last_err = String::new();
        // A port picked as free can be taken before tansu binds it: retry.
        for _ in 0..3 {
            match Self::try_start(&bin) {
                Ok(broker) => {
                    for (name, partitions) in topics {
                        broker.create_topic(name, *partitions);
                    }
                    return broker;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("cannot start tansu ({}): {last_err}", bin.display());
    }

    /// One broker with the default topics (4 input partitions) shared by every
    /// test of this process; stopped by its watchdog when the process exits.
    pub fn shared() -> &'static TansuBroker {
        static SHARED: OnceLock<TansuBroker> = OnceLock::new();
        SHARED.get_or_init(|| TansuBroker::start(4))
    }

    fn try_start(bin: &PathBuf) -> Result<TansuBroker, String> {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut child = Command::new(bin)
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let watchdog = spawn_watchdog(child.id(), None);
        match wait_until("tansu", START_TIMEOUT, &mut child, || port_open(port)) {
            Ok(()) => Ok(TansuBroker {
                port,
                bin: bin.clone(),
                child,
                watchdog,
            }),
            Err(e) => {
                kill_child(&mut child);
                if let Some(mut w) = watchdog {
                    kill_child(&mut w);
                }
                Err(e)
            }
        }
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a topic with `tansu topic create` (bounded retries while the
    /// broker finishes starting). Panics if it cannot.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new(&self.bin)
                .args(["topic", "create"])
                .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
                .args(["--partitions", &partitions.to_string()])
                .arg(name)
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => return,
                Ok(o) if Instant::now() >= deadline => panic!(
                    "tansu topic create {name}: {}",
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => panic!("tansu topic create {name}: {e}"),
                Ok(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        kill_child(&mut self.child);
        if let Some(w) = self.watchdog.as_mut() {
            kill_child(w);
        }
    }
}

/// The tansu binary: `MODELWATCH_TANSU_BIN`, else the install script's
/// cache path, else whatever `deploy/install-tansu.sh` builds and prints.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MODELWATCH_TANSU_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("MODELWATCH_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/modelwatch")))
        .unwrap_or_else(|| PathBuf::from("/tmp/modelwatch-cache"));
    let cached = cache.join("tansu-0.6.0/bin/tansu");
    if cached.is_file() {
        return cached;
    }
    let script = repo_root().join("deploy/install-tansu.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last() {
        Some(path) if out.status.success() => PathBuf::from(path.trim()),
        _ => panic!("{} failed ({})", script.display(), out.status),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::ClientConfig;

    use super::*;

    #[test]
    fn broker_serves_metadata_of_the_created_topics_and_stops_on_drop() {
        let broker = TansuBroker::start(3);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .set("group.id", "harness-check")
            .create()
            .expect("consumer");
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata");
        let mut topics: Vec<(String, usize)> = md
            .topics()
            .iter()
            .map(|t| (t.name().to_string(), t.partitions().len()))
            .collect();
        topics.sort();
        assert_eq!(
            topics,
            vec![
                ("ground-truth".to_string(), 3),
                ("model-alerts".to_string(), 1),
                ("modelwatch-dead-letter".to_string(), 1),
                ("predictions".to_string(), 3),
            ]
        );
        drop(consumer);
        let port = broker.port();
        drop(broker);
        assert!(!port_open(port), "broker still listening after drop");
    }
}
