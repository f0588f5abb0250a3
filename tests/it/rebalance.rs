//! Partitions that move away from the service and back (issue #4, "Revoke /
//! assign"): on MockCluster, a second member joins the service's consumer
//! group while the service is replaying, takes part of the partitions,
//! reads from them without committing (an instance that dies before its
//! first checkpoint) and leaves. The service must see that it shares its
//! group, get every partition back, resume them at its checkpointed
//! positions, and end with exactly the `window_metrics FINAL` of a run that
//! had the group to itself: nothing lost, nothing counted twice.
//!
//! Several *modelwatch* instances in one group are not exact yet (README,
//! "Partition moves"); this is the move that one instance must survive.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use modelwatch::app::Service;
use modelwatch::telemetry::{Counters, Readiness};

use crate::pipeline::producer;
use crate::state::{
    assert_same, cluster, config, import_references, produce, reference, run_idle, stream,
};
use crate::support::clickhouse::unique_database;

/// What the second member saw while it was in the group.
#[derive(Debug)]
struct Visit {
    /// Partitions it was assigned.
    took: usize,
    /// What the service reported meanwhile: (assigned, input partitions).
    service_saw: (u64, u64),
    /// Messages it read (and never committed).
    read: usize,
}

/// Joins `group` once the service has consumed `after` messages, holds
/// partitions for two seconds, then leaves. Bounded: panics after 60 s.
fn second_member(
    brokers: String,
    group: String,
    counters: Arc<Counters>,
    readiness: Arc<Readiness>,
    after: u64,
) -> Visit {
    let deadline = Instant::now() + Duration::from_secs(60);
    while counters.consumed() < after {
        assert!(
            Instant::now() < deadline,
            "the service did not start consuming"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let other: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range")
        .create()
        .expect("second consumer");
    other
        .subscribe(&["predictions", "ground-truth"])
        .expect("subscribe");
    let mut read = 0;
    let mut took = 0;
    let mut service_saw = (0, 0);
    // Until the rebalance gave it partitions and the service noticed.
    loop {
        assert!(
            Instant::now() < deadline,
            "no shared assignment within 60 s (second member has {took}, service saw {service_saw:?})"
        );
        if let Some(Ok(_)) = other.poll(Duration::from_millis(100)) {
            read += 1;
        }
        took = other.assignment().map(|a| a.count()).unwrap_or(0);
        service_saw = (
            readiness.partitions_assigned.load(Ordering::Relaxed),
            readiness.input_partitions.load(Ordering::Relaxed),
        );
        if took > 0 && service_saw.0 > 0 && service_saw.0 < service_saw.1 {
            break;
        }
    }
    let hold = Instant::now() + Duration::from_secs(2);
    while Instant::now() < hold {
        if let Some(Ok(_)) = other.poll(Duration::from_millis(100)) {
            read += 1;
        }
    }
    // Dropping the consumer closes it: it leaves the group, which
    // rebalances everything back to the service.
    drop(other);
    Visit {
        took,
        service_saw,
        read,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_that_move_away_and_back_are_counted_once() {
    let (predictions, labels) = stream();
    let want = reference(&predictions, &labels).await;

    let c = cluster();
    let brokers = c.bootstrap_servers();
    let mut cfg = config(&brokers, &unique_database("mw_rebalance"));
    // Longer than a rebalance and the second member's visit: the service
    // must not take the pause for the end of its input.
    cfg.windows.idle_timeout = Duration::from_secs(8);
    import_references(&cfg, &predictions).await;
    let p = producer(&brokers);
    produce(&p, &predictions).await;
    produce(&p, &labels).await;
    let total = (predictions.len() + labels.len()) as u64;

    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    let (counters, readiness) = (service.counters(), service.telemetry().readiness.clone());
    let visit = {
        let (brokers, group) = (brokers.clone(), cfg.kafka.group_id.clone());
        let (counters, readiness) = (counters.clone(), readiness.clone());
        std::thread::spawn(move || second_member(brokers, group, counters, readiness, total / 4))
    };
    run_idle(&mut service).await;
    let visit = visit.join().expect("second member");
    println!("second member: {visit:?}");
    assert!(visit.took > 0, "{visit:?}");
    assert!(
        visit.read > 0,
        "the second member read messages it never committed: {visit:?}"
    );
    assert!(
        visit.service_saw.0 < visit.service_saw.1,
        "the service saw that it shared its group: {visit:?}"
    );

    let progress = service.progress();
    let redelivered = Counters::get(&counters.redelivered_total);
    println!(
        "service: consumed {} of {total}, skipped {redelivered} redelivered, {} partitions at the end",
        progress.consumed,
        readiness.partitions_assigned.load(Ordering::Relaxed)
    );
    assert_eq!(
        readiness.partitions_assigned.load(Ordering::Relaxed),
        readiness.input_partitions.load(Ordering::Relaxed),
        "every partition came back"
    );
    assert_eq!(progress.consumed, total, "every message counted once");
    assert_eq!(progress.core.orphans, 0, "every label met its prediction");
    assert_eq!(progress.core.late_predictions, 0);
    drop(service);
    assert_same(
        &want,
        &crate::crash::read_metrics(&modelwatch::sinks::clickhouse::ClickHouseSink::new(
            &cfg.clickhouse,
        ))
        .await,
    );
}
