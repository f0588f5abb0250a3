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
        if n % 500 == 0 {
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
