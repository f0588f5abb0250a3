//! Alerting end to end: the default rules on synthetic streams through the
//! pure `pipeline::Core` (false-alarm rate and power), the alerts topic read
//! back and decoded with `schemas/AlertEvent.avsc`, and every webhook kind
//! against a real HTTP receiver on 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use modelwatch::config::{self, Config};
use modelwatch::generate::{DriftScenario, Generator, Scenario};
use modelwatch::model::{AlertEvent, AlertStatus, InputEvent};
use modelwatch::pipeline::Core;

const MIN: i64 = 60_000;
const MODEL: &str = "fraud-detector";

/// Default configuration with one-minute windows; `env` as `MODELWATCH_*` overrides.
fn config(env: &[(&str, &str)]) -> Config {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut cfg = config::load(None, &env).expect("config");
    cfg.windows.sizes = vec![Duration::from_secs(60)];
    cfg.windows.allowed_lateness = Duration::from_secs(0);
    cfg.windows.label_horizon = Duration::from_secs(15 * 60);
    cfg
}

/// What a run produced: every alert, and per window start the value of
/// selected model-level metrics of all traffic.
struct Run {
    alerts: Vec<AlertEvent>,
    windows: BTreeMap<i64, BTreeMap<&'static str, (f64, u64)>>,
}

/// Feeds the scenario's events through the core (wall clock = event time),
/// advancing every 500 events and flushing at the end.
fn drive(cfg: &Config, scenario: Scenario) -> Run {
    let mut core = Core::new(cfg);
    let mut generator = Generator::new(scenario);
    let mut run = Run {
        alerts: Vec::new(),
        windows: BTreeMap::new(),
    };
    let collect = |out: modelwatch::pipeline::Output, run: &mut Run| {
        for r in &out.emitted.rows {
            let keep = ["prediction_count", "accuracy", "drifted_feature_count"];
            if r.segment.is_empty() && r.value.feature.is_empty() && keep.contains(&r.value.metric)
            {
                run.windows
                    .entry(r.window_start_ms)
                    .or_default()
                    .insert(r.value.metric, (r.value.value, r.value.samples));
            }
        }
        run.alerts.extend(out.alerts);
    };
    let mut n = 0u64;
    let mut now = 0;
    while let Some(ev) = generator.next_event() {
        match ev {
            InputEvent::Prediction(p) => {
                now = p.timestamp;
                core.on_prediction(&p, now);
            }
            InputEvent::GroundTruth(g) => {
                now = now.max(g.timestamp);
                core.on_label(&g, now);
            }
        }
        n += 1;
        if n.is_multiple_of(500) {
            let out = core.advance(now);
            collect(out, &mut run);
        }
    }
    let out = core.flush(now);
    collect(out, &mut run);
    run
}

/// A single-version scenario: 25 features (20 numeric, 5 categorical),
/// `per_window` requests per one-minute window, `windows` windows.
fn scenario(seed: u64, per_window: u64, windows: u64) -> Scenario {
    Scenario {
        seed,
        versions: vec!["v1".into()],
        model_id: MODEL.into(),
        numeric_features: 20,
        categorical_features: 5,
        events_per_second: per_window as f64 / 60.0,
        count: per_window * windows,
        label_delay_ms: (5_000, 120_000),
        ..Scenario::default()
    }
}

fn is_drift_rule(a: &AlertEvent) -> bool {
    a.rule == "feature_drift" || a.rule == "prediction_drift"
}

#[test]
fn default_rules_stay_quiet_on_a_stationary_stream() {
    let cfg = config(&[]);
    let windows = 210;
    let s = scenario(11, 1200, windows);
    let start = s.start_ms;
    let run = drive(&cfg, s);
    // Full windows only (the last one may be cut short by the flush).
    let full: Vec<i64> = run
        .windows
        .iter()
        .filter(|(_, m)| m.get("prediction_count").is_some_and(|(v, _)| *v >= 1000.0))
        .map(|(w, _)| *w)
        .collect();
    assert!(full.len() >= 200, "only {} full windows", full.len());
    let firing: Vec<&AlertEvent> = run
        .alerts
        .iter()
        .filter(|a| a.status == AlertStatus::Firing)
        .collect();
    let drift_windows: BTreeSet<i64> = firing
        .iter()
        .filter(|a| is_drift_rule(a) && full.contains(&a.window_start))
        .map(|a| a.window_start)
        .collect();
    let rate = drift_windows.len() as f64 / full.len() as f64;
    eprintln!(
        "false alarms: drift alerts in {} of {} windows ({:.2} %); all firing alerts by rule: {:?}",
        drift_windows.len(),
        full.len(),
        100.0 * rate,
        firing
            .iter()
            .fold(BTreeMap::<&str, usize>::new(), |mut m, a| {
                *m.entry(a.rule.as_str()).or_default() += 1;
                m
            })
    );
    assert!(
        rate <= 0.01,
        "drift alerts in {:.2} % of windows: {:?}",
        100.0 * rate,
        firing
            .iter()
            .filter(|a| is_drift_rule(a))
            .map(|a| (&a.feature, (a.window_start - start) / MIN, &a.message))
            .collect::<Vec<_>>()
    );
    // No other built-in rule fires on stationary full windows either.
    let others: Vec<_> = firing
        .iter()
        .filter(|a| !is_drift_rule(a) && full.contains(&a.window_start))
        .map(|a| (&a.rule, &a.message))
        .collect();
    assert!(others.is_empty(), "{others:?}");
}

#[test]
fn a_half_sd_shift_on_5_of_25_features_fires_within_one_window() {
    let cfg = config(&[]);
    let windows = 20;
    let mut s = scenario(12, 1200, windows);
    s.drift = DriftScenario::Sudden;
    s.drift_at = 0.5; // starts exactly at window 10
    s.drifted_features = 5;
    s.shift_sd = 0.5;
    s.drift_categorical = false;
    let drifted: BTreeSet<String> = s.drifted_feature_names().into_iter().collect();
    let first_drifted = s.start_ms + 10 * MIN;
    let run = drive(&cfg, s);
    let drift_alerts: Vec<&AlertEvent> = run
        .alerts
        .iter()
        .filter(|a| a.rule == "feature_drift" && a.status == AlertStatus::Firing)
        .collect();
    let in_first: BTreeSet<&str> = drift_alerts
        .iter()
        .filter(|a| a.window_start == first_drifted)
        .filter_map(|a| a.feature.as_deref())
        .collect();
    eprintln!(
        "power (drift): first drifted window fires on {in_first:?}; drifted features {drifted:?}; alerts before the shift: {}",
        drift_alerts.iter().filter(|a| a.window_start < first_drifted).count()
    );
    assert!(
        !in_first.is_empty(),
        "no drift alert in the first drifted window"
    );
    assert!(
        in_first.iter().all(|f| drifted.contains(*f)),
        "{in_first:?}"
    );
    assert!(drift_alerts.iter().all(|a| a.window_start >= first_drifted));
    // The message names the drifted features, most drifted first.
    let a = drift_alerts
        .iter()
        .find(|a| a.window_start == first_drifted)
        .unwrap();
    assert!(a.message.contains("most drifted: num_0"), "{}", a.message);
    assert!(a.p_value.is_some_and(|p| p < 0.05));
}

#[test]
fn a_five_point_accuracy_drop_fires_within_two_windows() {
    // Measure the stationary accuracy first: the business baseline.
    let base_cfg = config(&[("MODELWATCH_ALERTS__DEFAULT_RULES", "false")]);
    let stationary = drive(&base_cfg, scenario(13, 2400, 10));
    let accs: Vec<f64> = stationary
        .windows
        .values()
        .filter_map(|m| {
            m.get("accuracy")
                .filter(|(_, n)| *n >= 1000)
                .map(|(v, _)| *v)
        })
        .collect();
    let baseline = accs.iter().sum::<f64>() / accs.len() as f64;
    let baseline = (baseline * 100.0).round() / 100.0;
    let cfg = config(&[(
        "MODELWATCH_MODELS__FRAUD-DETECTOR__BASELINE__ACCURACY",
        &baseline.to_string(),
    )]);
    let windows = 20;
    let mut s = scenario(14, 2400, windows);
    s.drift = DriftScenario::Sudden;
    s.drift_at = 0.5;
    s.drifted_features = 0;
    s.drift_categorical = false;
    s.accuracy_drop = true;
    // accuracy falls by about 0.21 * share: 5 points.
    s.accuracy_drop_share = 0.05 / 0.21;
    let first_dropped = s.start_ms + 10 * MIN;
    let run = drive(&cfg, s);
    let final_acc = |w: i64| run.windows.get(&w).and_then(|m| m.get("accuracy")).copied();
    let before: Vec<f64> = (0..10)
        .filter_map(|i| final_acc(first_dropped - (i + 1) * MIN))
        .map(|x| x.0)
        .collect();
    let after: Vec<f64> = (0..10)
        .filter_map(|i| final_acc(first_dropped + i * MIN))
        .map(|x| x.0)
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let drop = mean(&before) - mean(&after);
    let fired: Vec<&AlertEvent> = run
        .alerts
        .iter()
        .filter(|a| a.rule == "performance_drop_accuracy" && a.status == AlertStatus::Firing)
        .collect();
    eprintln!(
        "power (accuracy): baseline {baseline}, accuracy before {:.4} after {:.4} (drop {:.4}); alerts at windows {:?}",
        mean(&before),
        mean(&after),
        drop,
        fired
            .iter()
            .map(|a| ((a.window_start - first_dropped) / MIN, a.severity.as_str(), a.value))
            .collect::<Vec<_>>()
    );
    assert!(
        (0.035..0.065).contains(&drop),
        "the scenario should drop accuracy by about 5 points, got {drop}"
    );
    let first = fired.first().expect("the accuracy drop fires");
    assert!(
        (first_dropped..first_dropped + 2 * MIN).contains(&first.window_start),
        "first alert for window {} (drop starts at {first_dropped})",
        first.window_start
    );
    assert!(fired.iter().all(|a| a.window_start >= first_dropped));
    assert_eq!(first.baseline, Some(baseline));
    assert!(first.message.contains("baseline"), "{}", first.message);
}

mod delivery {
    //! The alerts topic and every webhook kind against real receivers.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use modelwatch::alerting::notify::{
        verify, ALERT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
    };
    use modelwatch::config::{KafkaConfig, Secret, WebhookConfig, WebhookKind};
    use modelwatch::ingest::decode::decode_alert;
    use modelwatch::model::{AlertEvent, AlertStatus, Severity};
    use modelwatch::sinks::kafka::{producer, AlertPublisher};
    use modelwatch::sinks::webhook::{DeliveryRecord, Notifier};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::mocking::MockCluster;
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// One request as the receiver saw it.
    #[derive(Debug, Clone)]
    struct Received {
        path: String,
        headers: HashMap<String, String>,
        body: Vec<u8>,
    }

    /// A minimal HTTP/1.1 receiver on 127.0.0.1: answers each request with
    /// the next scripted status (the last one repeats), one request per
    /// connection, and records what it got.
    struct Receiver {
        url: String,
        got: Arc<Mutex<Vec<Received>>>,
    }

    impl Receiver {
        async fn start(statuses: Vec<u16>) -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            let got = Arc::new(Mutex::new(Vec::new()));
            let seen = got.clone();
            tokio::spawn(async move {
                let mut n = 0usize;
                loop {
                    let Ok((mut sock, _)) = listener.accept().await else {
                        return;
                    };
                    let status = statuses[n.min(statuses.len() - 1)];
                    n += 1;
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Headers, then Content-Length bytes of body.
                    let (head_end, len) = loop {
                        let Ok(k) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if k == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..k]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_string();
                            let len = head
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            break (i + 4, len);
                        }
                    };
                    while buf.len() < head_end + len {
                        let Ok(k) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if k == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..k]);
                    }
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let mut lines = head.lines();
                    let path = lines
                        .next()
                        .and_then(|l| l.split(' ').nth(1))
                        .unwrap_or_default()
                        .to_string();
                    let headers = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    seen.lock().unwrap().push(Received {
                        path,
                        headers,
                        body: buf[head_end..].to_vec(),
                    });
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                    let _ = sock.shutdown().await;
                }
            });
            Receiver { url, got }
        }

        fn requests(&self) -> Vec<Received> {
            self.got.lock().unwrap().clone()
        }
    }

    fn alert(status: AlertStatus) -> AlertEvent {
        AlertEvent {
            alert_id: "0123456789abcdef0123456789abcdef".into(),
            rule: "performance_drop_accuracy".into(),
            status,
            severity: Severity::Critical,
            model_id: "fraud".into(),
            model_version: "v1".into(),
            segment: String::new(),
            feature: None,
            metric: "accuracy".into(),
            value: 0.84,
            threshold: 0.88,
            baseline: Some(0.9),
            p_value: None,
            window_start: 1_704_067_200_000,
            window_end: 1_704_067_500_000,
            fired_at: 1_704_067_600_000,
            message: "accuracy is 0.8400 (baseline 0.9000)".into(),
        }
    }

    fn hook(name: &str, kind: WebhookKind, url: &str) -> WebhookConfig {
        WebhookConfig {
            name: name.into(),
            kind,
            url: Secret(url.into()),
            url_env: None,
            secret_env: None,
            secret_file: None,
            min_severity: Severity::Warning,
            rules: Vec::new(),
            send_resolved: true,
            timeout: Duration::from_secs(5),
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            jira_project: None,
            jira_issue_type: None,
            jira_user: None,
        }
    }

    /// Waits (bounded) until the notifier has logged `n` outcomes.
    async fn outcomes(n: &Notifier, want: usize) -> Vec<DeliveryRecord> {
        let mut log = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while log.len() < want && Instant::now() < deadline {
            log.extend(n.take_log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        log
    }

    fn json(r: &Received) -> Value {
        serde_json::from_slice(&r.body).expect("json body")
    }

    #[tokio::test]
    async fn generic_webhook_is_signed_and_retried_after_a_500() {
        let rx = Receiver::start(vec![500, 200]).await;
        let mut cfg = hook("generic", WebhookKind::Generic, &rx.url);
        cfg.secret_env = Some("HOOK_SECRET".into());
        let env = HashMap::from([("HOOK_SECRET".to_string(), "s3cret".to_string())]);
        let n = Notifier::start(&[cfg], 10, &env).expect("notifier");
        n.enqueue(&[alert(AlertStatus::Firing)]);
        let log = outcomes(&n, 1).await;
        assert_eq!(log.len(), 1);
        assert_eq!(
            (log[0].outcome, log[0].attempts, log[0].http_status),
            ("delivered", 2, 200)
        );
        let reqs = rx.requests();
        assert_eq!(reqs.len(), 2, "one failed attempt, one retry");
        let r = &reqs[1];
        assert_eq!(r.body, reqs[0].body);
        let ts: i64 = r.headers[TIMESTAMP_HEADER].parse().expect("timestamp");
        assert!(verify(b"s3cret", ts, &r.body, &r.headers[SIGNATURE_HEADER]));
        assert!(!verify(b"wrong", ts, &r.body, &r.headers[SIGNATURE_HEADER]));
        assert_eq!(
            r.headers[ALERT_ID_HEADER],
            alert(AlertStatus::Firing).alert_id
        );
        let back: AlertEvent = serde_json::from_slice(&r.body).expect("AlertEvent JSON");
        assert_eq!(back, alert(AlertStatus::Firing));
        // The same alert again (no change) is not re-sent; its resolution is.
        n.enqueue(&[alert(AlertStatus::Firing), alert(AlertStatus::Resolved)]);
        let log = outcomes(&n, 1).await;
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].alert_status, "resolved");
        assert_eq!(json(&rx.requests()[2])["status"], "resolved");
        assert_eq!(
            n.stats()
                .retries_total
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[tokio::test]
    async fn gives_up_after_repeated_failures_and_on_client_errors() {
        let failing = Receiver::start(vec![503]).await;
        let rejecting = Receiver::start(vec![400]).await;
        let n = Notifier::start(
            &[
                hook("failing", WebhookKind::Generic, &failing.url),
                hook("rejecting", WebhookKind::Generic, &rejecting.url),
            ],
            10,
            &HashMap::new(),
        )
        .expect("notifier");
        n.enqueue(&[alert(AlertStatus::Firing)]);
        let mut log = outcomes(&n, 2).await;
        log.sort_by(|a, b| a.webhook.cmp(&b.webhook));
        let got: Vec<_> = log
            .iter()
            .map(|r| (r.webhook.as_str(), r.outcome, r.attempts, r.http_status))
            .collect();
        assert_eq!(
            got,
            vec![
                ("failing", "failed", 3, 503),
                ("rejecting", "failed", 1, 400)
            ]
        );
        assert_eq!(failing.requests().len(), 3);
        assert_eq!(rejecting.requests().len(), 1);
        // An unreachable receiver: connection errors are retried, then given up.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let n = Notifier::start(
            &[hook("down", WebhookKind::Slack, &closed)],
            10,
            &HashMap::new(),
        )
        .unwrap();
        n.enqueue(&[alert(AlertStatus::Firing)]);
        let log = outcomes(&n, 1).await;
        assert_eq!(
            (log[0].outcome, log[0].attempts, log[0].http_status),
            ("failed", 3, 0)
        );
        assert!(
            !log[0].error.contains(&closed),
            "the URL stays out of errors: {}",
            log[0].error
        );
    }

    #[tokio::test]
    async fn slack_pagerduty_and_jira_payloads() {
        let slack = Receiver::start(vec![200]).await;
        let pd = Receiver::start(vec![202]).await;
        let jira = Receiver::start(vec![201]).await;
        let mut pd_cfg = hook("pd", WebhookKind::Pagerduty, &pd.url);
        pd_cfg.secret_env = Some("PD_KEY".into());
        let mut jira_cfg = hook("jira", WebhookKind::Jira, &jira.url);
        jira_cfg.secret_env = Some("JIRA_TOKEN".into());
        jira_cfg.jira_project = Some("OPS".into());
        jira_cfg.jira_user = Some("bot@example.org".into());
        let env = HashMap::from([
            ("PD_KEY".to_string(), "routing-123".to_string()),
            ("JIRA_TOKEN".to_string(), "tok".to_string()),
        ]);
        let n = Notifier::start(
            &[
                hook("slack", WebhookKind::Slack, &slack.url),
                pd_cfg,
                jira_cfg,
            ],
            10,
            &env,
        )
        .expect("notifier");
        n.enqueue(&[alert(AlertStatus::Firing), alert(AlertStatus::Resolved)]);
        // Slack and PagerDuty get both, Jira only the firing one.
        let log = outcomes(&n, 5).await;
        assert_eq!(log.len(), 5, "{log:?}");
        assert!(log.iter().all(|r| r.outcome == "delivered"), "{log:?}");

        let s = slack.requests();
        assert_eq!(s.len(), 2);
        let text = json(&s[0])["text"].as_str().unwrap().to_string();
        assert!(
            text.contains("[CRITICAL] firing performance_drop_accuracy"),
            "{text}"
        );
        assert!(text.contains("accuracy is 0.8400"), "{text}");
        assert!(json(&s[1])["text"].as_str().unwrap().contains("resolved"));

        let p = pd.requests();
        assert_eq!(p.len(), 2);
        let (t, r) = (json(&p[0]), json(&p[1]));
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(t["routing_key"], "routing-123");
        assert_eq!(t["dedup_key"], alert(AlertStatus::Firing).alert_id);
        assert_eq!(t["payload"]["severity"], "critical");
        assert_eq!(t["payload"]["source"], "modelwatch/fraud");
        assert_eq!(t["payload"]["custom_details"]["metric"], "accuracy");
        assert!(t["payload"]["summary"].as_str().unwrap().len() <= 1024);
        assert_eq!(r["event_action"], "resolve");
        assert_eq!(r["dedup_key"], t["dedup_key"]);

        let j = jira.requests();
        assert_eq!(j.len(), 1);
        assert_eq!(j[0].path, "/rest/api/2/issue");
        // base64("bot@example.org:tok")
        assert_eq!(
            j[0].headers["authorization"],
            "Basic Ym90QGV4YW1wbGUub3JnOnRvaw=="
        );
        let f = &json(&j[0])["fields"];
        assert_eq!(f["project"]["key"], "OPS");
        assert_eq!(f["issuetype"]["name"], "Bug");
        assert!(f["description"]
            .as_str()
            .unwrap()
            .contains(&alert(AlertStatus::Firing).alert_id));
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_without_blocking() {
        // The receiver never answers in time: the worker is stuck on the first alert.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut cfg = hook("slow", WebhookKind::Generic, &url);
        cfg.timeout = Duration::from_secs(2);
        cfg.max_attempts = 1;
        let n = Notifier::start(&[cfg], 2, &HashMap::new()).unwrap();
        let started = Instant::now();
        for i in 0..6 {
            let mut a = alert(AlertStatus::Firing);
            a.alert_id = format!("id-{i}");
            n.enqueue(&[a]);
            if i == 0 {
                // Let the worker take id-0 (bounded wait).
                let deadline = Instant::now() + Duration::from_secs(1);
                while n.queued() > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "enqueue must not wait"
        );
        let dropped = n
            .stats()
            .dropped_total
            .load(std::sync::atomic::Ordering::Relaxed);
        // id-0 is in flight; of id-1..id-5 the queue keeps the newest two.
        assert_eq!(dropped, 3);
        let log = n.take_log();
        let ids: Vec<&str> = log
            .iter()
            .filter(|r| r.outcome == "dropped")
            .map(|r| r.alert_id.as_str())
            .collect();
        assert_eq!(ids, vec!["id-1", "id-2", "id-3"]);
    }

    #[tokio::test]
    async fn the_alerts_topic_decodes_with_the_avro_schema() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("model-alerts", 1, 1).expect("topic");
        let kafka = KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            ..KafkaConfig::default()
        };
        let publisher = AlertPublisher::new(producer(&kafka).expect("producer"), "model-alerts");
        let sent = vec![alert(AlertStatus::Firing), alert(AlertStatus::Resolved)];
        let report = publisher.publish(&sent).await;
        assert_eq!(report.delivered, vec![0, 1], "{report:?}");

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "alerts-reader")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("model-alerts", 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < sent.len() && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.expect("message");
                assert_eq!(m.key(), Some(&b"fraud"[..]));
                let status = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "status"))
                    .and_then(|h| h.value.map(<[u8]>::to_vec));
                let a = decode_alert(m.payload().unwrap_or_default()).expect("Avro AlertEvent");
                assert_eq!(status.as_deref(), Some(a.status.as_str().as_bytes()));
                got.push(a);
            }
        }
        assert_eq!(got, sent);
    }
}

mod state {
    //! Alert state and the delivery log through a real ClickHouse server.

    use std::time::Duration;

    use modelwatch::alerting::AlertEngine;
    use modelwatch::model::{AlertEvent, AlertStatus, Severity};
    use modelwatch::sinks::clickhouse::{ClickHouseSink, RetryPolicy};
    use modelwatch::sinks::webhook::DeliveryRecord;

    use crate::support::clickhouse::{unique_database, ClickHouseServer};

    fn alert(id: &str, status: AlertStatus, window_start: i64, fired_at: i64) -> AlertEvent {
        AlertEvent {
            alert_id: id.into(),
            rule: "feature_drift".into(),
            status,
            severity: Severity::Warning,
            model_id: "fraud".into(),
            model_version: "v1".into(),
            segment: String::new(),
            feature: Some("age".into()),
            metric: "drift_detected".into(),
            value: 1.0,
            threshold: 1.0,
            baseline: None,
            p_value: Some(0.001),
            window_start,
            window_end: window_start + 300_000,
            fired_at,
            message: "m".into(),
        }
    }

    #[tokio::test]
    async fn the_engine_restores_from_the_alerts_table() {
        let server = ClickHouseServer::shared();
        let sink = ClickHouseSink::new(&server.config(&unique_database("mw_alerts")))
            .with_retry_policy(RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(20),
            });
        sink.migrate().await.expect("migrate");
        let t0 = 1_704_067_200_000;
        sink.write_alerts(&[
            // a: fired, then resolved; b: still firing (an old window); c: too old and resolved.
            alert("a", AlertStatus::Firing, t0, t0 + 1),
            alert("a", AlertStatus::Resolved, t0, t0 + 900_000),
            alert("b", AlertStatus::Firing, t0 - 86_400_000 * 10, t0 + 2),
            alert("c", AlertStatus::Firing, t0 - 86_400_000 * 10, t0 + 3),
            alert("c", AlertStatus::Resolved, t0 - 86_400_000 * 10, t0 + 4),
        ])
        .await
        .expect("write");
        let loaded = sink.load_alerts(t0 - 86_400_000).await.expect("load");
        let got: Vec<(&str, AlertStatus)> = loaded
            .iter()
            .map(|a| (a.alert_id.as_str(), a.status))
            .collect();
        assert_eq!(
            got,
            vec![("b", AlertStatus::Firing), ("a", AlertStatus::Resolved)]
        );
        let a = loaded.iter().find(|a| a.alert_id == "a").unwrap();
        assert_eq!(
            (a.fired_at, a.window_end, a.feature.as_deref(), a.p_value),
            (t0 + 900_000, t0 + 300_000, Some("age"), Some(0.001))
        );
        let cfg = modelwatch::config::load(None, &Default::default()).unwrap();
        let mut engine = AlertEngine::from_config(&cfg);
        assert_eq!(engine.restore(&loaded), 2);
        assert_eq!(engine.firing(), 1);
        assert_eq!(engine.active_alerts()[0].alert_id, "b");

        sink.write_deliveries(&[DeliveryRecord {
            webhook: "ops".into(),
            kind: "generic",
            alert_id: "a".into(),
            alert_status: "firing",
            outcome: "failed",
            attempts: 5,
            http_status: 503,
            error: "HTTP 503".into(),
            at_ms: t0 + 5,
            duration_ms: 1234,
        }])
        .await
        .expect("deliveries");
        let rows: Vec<(String, String, u32, u16)> = sink
            .client()
            .query("SELECT webhook, outcome, attempts, http_status FROM webhook_deliveries FINAL")
            .fetch_all()
            .await
            .expect("read deliveries");
        assert_eq!(
            rows,
            vec![("ops".to_string(), "failed".to_string(), 5, 503)]
        );
    }
}
