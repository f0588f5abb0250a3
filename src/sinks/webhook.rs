//! Webhook delivery: one bounded queue and one worker task per configured
//! webhook, so a slow or failing receiver never blocks the pipeline nor the
//! other receivers.
//!
//! [`Notifier::enqueue`] never waits: when a queue is full its oldest alert
//! is dropped, counted and logged. Each worker sends with a per-request
//! timeout and retries connection errors, timeouts, 429 and 5xx answers with
//! exponential backoff and full jitter, up to `max_attempts`; other 4xx
//! answers are permanent. Redirects are never followed (the request carries
//! the webhook's secret, signature or token, which must not reach another
//! host): a 3xx answer is a permanent failure that says so. Every final outcome becomes a [`DeliveryRecord`]
//! that the service writes to ClickHouse (`webhook_deliveries`).
//!
//! Secrets (HMAC keys, routing keys, API tokens, Slack URLs) are never
//! logged: log lines name the webhook, and transport errors are stripped of
//! their URL.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rand::Rng;
use tokio::sync::Notify;

use crate::alerting::notify;
use crate::config::{Secret, WebhookConfig, WebhookKind};
use crate::model::{AlertEvent, AlertStatus, Severity};

/// Longest backoff between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Delivery records kept for the log writer before the oldest are dropped.
const LOG_CAPACITY: usize = 10_000;
/// Alert ids remembered to tell a new alert from an update of one already sent.
const SENT_CAPACITY: usize = 50_000;

/// The final outcome of one alert on one webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    /// Webhook name.
    pub webhook: String,
    /// Webhook kind (`generic`, `slack`, `pagerduty`, `jira`).
    pub kind: &'static str,
    /// Alert id.
    pub alert_id: String,
    /// `firing` or `resolved`.
    pub alert_status: &'static str,
    /// `delivered`, `failed` (gave up) or `dropped` (queue full).
    pub outcome: &'static str,
    /// Attempts made.
    pub attempts: u32,
    /// HTTP status of the last answer, 0 without one.
    pub http_status: u16,
    /// The last error (no URL, no secret), empty when delivered.
    pub error: String,
    /// When the outcome was known, ms since the epoch.
    pub at_ms: i64,
    /// Time from the first attempt to the outcome, ms.
    pub duration_ms: u64,
}

/// Counters of the notifier.
#[derive(Debug, Default)]
pub struct NotifierStats {
    /// Alerts delivered.
    pub delivered_total: AtomicU64,
    /// Alerts given up after the last attempt or a permanent error.
    pub failed_total: AtomicU64,
    /// Alerts dropped because a queue was full.
    pub dropped_total: AtomicU64,
    /// Retries made.
    pub retries_total: AtomicU64,
}

struct Channel {
    name: String,
    queue: Mutex<VecDeque<AlertEvent>>,
    wake: Notify,
}

struct Shared {
    log: Mutex<VecDeque<DeliveryRecord>>,
    stats: NotifierStats,
    closed: AtomicBool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Last (status, severity) sent per alert id, with insertion order for the bound.
type SentIds = (HashMap<String, (AlertStatus, Severity)>, VecDeque<String>);

/// Sends alerts to the configured webhooks in the background.
pub struct Notifier {
    channels: Vec<(Arc<WebhookConfig>, Arc<Channel>)>,
    shared: Arc<Shared>,
    capacity: usize,
    sent: Mutex<SentIds>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.channels.iter().map(|(c, _)| c.name.as_str()).collect();
        f.debug_struct("Notifier")
            .field("webhooks", &names)
            .finish()
    }
}

impl Notifier {
    /// Resolves every webhook's URL and secret from `env` (and files) and
    /// spawns one worker per webhook on the current tokio runtime.
    pub fn start(
        webhooks: &[WebhookConfig],
        capacity: usize,
        env: &HashMap<String, String>,
    ) -> Result<Notifier> {
        let shared = Arc::new(Shared {
            log: Mutex::new(VecDeque::new()),
            stats: NotifierStats::default(),
            closed: AtomicBool::new(false),
        });
        let mut channels = Vec::new();
        for w in webhooks {
            let (url, secret) = w.resolve(env)?;
            let client = reqwest::Client::builder()
                // A redirect would hand the secret headers to another URL.
                .redirect(reqwest::redirect::Policy::none())
                .timeout(w.timeout)
                .connect_timeout(w.timeout)
                .user_agent(concat!("modelwatch/", env!("CARGO_PKG_VERSION")))
                .build()
                .with_context(|| {
                    format!("alerts.webhooks.{}: cannot build an HTTP client", w.name)
                })?;
            let cfg = Arc::new(w.clone());
            let channel = Arc::new(Channel {
                name: w.name.clone(),
                queue: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
            });
            let worker = Worker {
                cfg: cfg.clone(),
                url,
                secret,
                client,
                channel: channel.clone(),
                shared: shared.clone(),
            };
            tokio::spawn(worker.run());
            channels.push((cfg, channel));
        }
        Ok(Notifier {
            channels,
            shared,
            capacity: capacity.max(1),
            sent: Mutex::new((HashMap::new(), VecDeque::new())),
        })
    }

    /// Number of webhooks.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// True without webhooks.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Queues the alerts for every webhook that wants them; never waits. An
    /// update of an alert already sent (same id, status and severity) is not
    /// sent again.
    pub fn enqueue(&self, alerts: &[AlertEvent]) {
        if self.channels.is_empty() {
            return;
        }
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        for a in alerts {
            let now = (a.status, a.severity);
            match sent.0.insert(a.alert_id.clone(), now) {
                Some(before) if before == now => continue,
                Some(_) => {}
                None => {
                    sent.1.push_back(a.alert_id.clone());
                    while sent.1.len() > SENT_CAPACITY {
                        if let Some(old) = sent.1.pop_front() {
                            sent.0.remove(&old);
                        }
                    }
                }
            }
            for (cfg, ch) in &self.channels {
                if !notify::wants(cfg, a) {
                    continue;
                }
                let dropped = {
                    let mut q = ch.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    q.push_back(a.clone());
                    if q.len() > self.capacity {
                        q.pop_front()
                    } else {
                        None
                    }
                };
                if let Some(d) = dropped {
                    self.shared
                        .stats
                        .dropped_total
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(webhook = %ch.name, alert_id = %d.alert_id, capacity = self.capacity, "webhook queue full: oldest alert dropped");
                    self.shared.record(DeliveryRecord {
                        webhook: ch.name.clone(),
                        kind: cfg.kind.as_str(),
                        alert_id: d.alert_id,
                        alert_status: d.status.as_str(),
                        outcome: "dropped",
                        attempts: 0,
                        http_status: 0,
                        error: "queue full".into(),
                        at_ms: now_ms(),
                        duration_ms: 0,
                    });
                }
                ch.wake.notify_one();
            }
        }
    }

    /// Takes the delivery records collected since the last call.
    pub fn take_log(&self) -> Vec<DeliveryRecord> {
        let mut log = self
            .shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        log.drain(..).collect()
    }

    /// The notifier's counters.
    pub fn stats(&self) -> &NotifierStats {
        &self.shared.stats
    }

    /// Alerts waiting in all queues.
    pub fn queued(&self) -> usize {
        self.channels
            .iter()
            .map(|(_, c)| c.queue.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Waits up to `timeout` for the queues to drain (at shutdown); returns
    /// how many alerts are still waiting.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.queued();
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        for (_, c) in &self.channels {
            c.wake.notify_one();
        }
    }
}

impl Shared {
    fn record(&self, r: DeliveryRecord) {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.push_back(r);
        while log.len() > LOG_CAPACITY {
            log.pop_front();
        }
    }
}

struct Worker {
    cfg: Arc<WebhookConfig>,
    url: String,
    secret: Option<Secret>,
    client: reqwest::Client,
    channel: Arc<Channel>,
    shared: Arc<Shared>,
}

enum Attempt {
    Delivered(u16),
    Retry(u16, String),
    Permanent(u16, String),
}

impl Worker {
    async fn run(self) {
        loop {
            let next = self
                .channel
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            match next {
                Some(alert) => self.deliver(&alert).await,
                None if self.shared.closed.load(Ordering::Relaxed) => return,
                None => self.channel.wake.notified().await,
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        let cap = self
            .cfg
            .initial_backoff
            .saturating_mul(factor)
            .min(MAX_BACKOFF);
        let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        // Jitter in [cap / 2, cap]: receivers recovering from an outage are
        // not hit by every instance at once.
        Duration::from_millis(cap_ms / 2 + rand::thread_rng().gen_range(0..=cap_ms - cap_ms / 2))
    }

    async fn attempt(&self, alert: &AlertEvent) -> Attempt {
        let now_s = now_ms() / 1000;
        let secret = self.secret.as_ref().map(Secret::expose);
        let req = notify::request(&self.cfg, alert, secret, now_s);
        let url = format!("{}{}", self.url.trim_end_matches('/'), req.path);
        let url = if req.path.is_empty() {
            self.url.clone()
        } else {
            url
        };
        let mut builder = self.client.post(url).body(req.body);
        for (k, v) in &req.headers {
            builder = builder.header(*k, v);
        }
        if self.cfg.kind == WebhookKind::Jira {
            let token = secret.unwrap_or_default();
            builder = match &self.cfg.jira_user {
                Some(user) => builder.basic_auth(user, Some(token)),
                None => builder.bearer_auth(token),
            };
        }
        match builder.send().await {
            Ok(resp) => {
                let status = resp.status();
                let code = status.as_u16();
                if status.is_success() {
                    Attempt::Delivered(code)
                } else if status.is_redirection() {
                    Attempt::Permanent(
                        code,
                        format!("HTTP {code}: redirect not followed (webhooks never follow redirects; configure the final URL)"),
                    )
                } else if status.is_server_error() || code == 429 || code == 408 {
                    Attempt::Retry(code, format!("HTTP {code}"))
                } else {
                    Attempt::Permanent(code, format!("HTTP {code}"))
                }
            }
            // Without the URL: a Slack URL is a secret.
            Err(e) => Attempt::Retry(0, e.without_url().to_string()),
        }
    }

    async fn deliver(&self, alert: &AlertEvent) {
        let started = Instant::now();
        let mut attempts = 0;
        let (outcome, http_status, error) = loop {
            attempts += 1;
            match self.attempt(alert).await {
                Attempt::Delivered(code) => break ("delivered", code, String::new()),
                Attempt::Permanent(code, e) => break ("failed", code, e),
                Attempt::Retry(code, e) if attempts >= self.cfg.max_attempts => {
                    break ("failed", code, e)
                }
                Attempt::Retry(_, e) => {
                    let pause = self.backoff(attempts);
                    self.shared
                        .stats
                        .retries_total
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(webhook = %self.cfg.name, alert_id = %alert.alert_id, attempt = attempts, backoff_ms = pause.as_millis() as u64, error = %e, "webhook delivery failed, retrying");
                    tokio::time::sleep(pause).await;
                }
            }
        };
        if outcome == "delivered" {
            self.shared
                .stats
                .delivered_total
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared
                .stats
                .failed_total
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(webhook = %self.cfg.name, alert_id = %alert.alert_id, attempts, http_status, error = %error, "webhook delivery failed, giving up");
        }
        self.shared.record(DeliveryRecord {
            webhook: self.cfg.name.clone(),
            kind: self.cfg.kind.as_str(),
            alert_id: alert.alert_id.clone(),
            alert_status: alert.status.as_str(),
            outcome,
            attempts,
            http_status,
            error,
            at_ms: now_ms(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
}
