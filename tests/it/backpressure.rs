//! Backpressure (issue #11): while ClickHouse is unreachable, the output
//! held back grows only to `service.max_pending_output`; then consumption
//! pauses (the consumer is still polled) and resumes once ClickHouse is
//! back. Nothing is lost or counted late, and memory stays bounded.
//!
//! ClickHouse is taken away by a TCP proxy in front of the shared server
//! that refuses connections while "down".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelwatch::app::Service;
use modelwatch::sinks::clickhouse::ClickHouseSink;
use modelwatch::telemetry::Counters;
use tokio::net::{TcpListener, TcpStream};

use crate::pipeline::{aligned_ago, clf_prediction, mock_cluster, producer, send, test_config};
use crate::support::clickhouse::{unique_database, ClickHouseServer};

/// A loopback TCP proxy to `target` that, while `up` is false, closes every
/// new connection at once (the client sees a network error).
async fn toggle_proxy(target: u16) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().expect("addr").port();
    let up = Arc::new(AtomicBool::new(true));
    let flag = up.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if !flag.load(Ordering::SeqCst) {
                drop(inbound);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_outage_pauses_consumption_and_loses_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("modelwatch=info")
        .with_test_writer()
        .try_init();
    let database = unique_database("mw_backpressure");
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let (port, up) = toggle_proxy(ClickHouseServer::shared().http_port()).await;
    let mut cfg = test_config(&brokers, &database);
    cfg.clickhouse.url = format!("http://127.0.0.1:{port}");
    cfg.clickhouse.max_retries = 1;
    cfg.windows.allowed_lateness = Duration::from_secs(0);
    cfg.service.max_pending_output = bytesize::ByteSize::kib(64);

    // 60 one-minute windows of predictions, two hours ago: each window
    // closes as the next one's events arrive and holds some 10 KB of rows;
    // enough events that reading them takes several flushes.
    const N: i64 = 30_000;
    let t0 = aligned_ago(2 * 3_600_000);
    let p = producer(&brokers);
    let events: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| {
            let e = clf_prediction(&format!("r{i}"), t0 + i * 120, i);
            (e.request_id.clone(), serde_json::to_vec(&e).unwrap())
        })
        .collect();
    // In flight a thousand at a time (each send awaits its delivery).
    for chunk in events.chunks(1_000) {
        futures::future::join_all(
            chunk
                .iter()
                .map(|(key, payload)| send(&p, "predictions", key, payload)),
        )
        .await;
    }

    let mut service = Service::start(cfg.clone()).await.expect("service starts");
    let counters: Arc<Counters> = service.counters();
    // ClickHouse goes away after the schema check at start.
    up.store(false, Ordering::SeqCst);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watch = async {
        let consumed = || Counters::get(&counters.predictions_consumed_total);
        // Paused before everything was read, and it stays so.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Counters::get(&counters.input_paused) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            Counters::get(&counters.input_paused),
            1,
            "consumption never paused"
        );
        let at_pause = consumed();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let later = consumed();
        assert!(
            later < N as u64,
            "everything was consumed while ClickHouse was down"
        );
        // At most what was already fetched slips through the pause.
        assert!(
            later - at_pause < 5_000,
            "consumption went on: {at_pause} → {later}"
        );
        // ClickHouse is back: consumption resumes and finishes.
        up.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while (consumed() < N as u64 || Counters::get(&counters.input_paused) == 1)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(consumed(), N as u64);
        assert_eq!(Counters::get(&counters.input_paused), 0);
        assert!(Counters::get(&counters.input_pauses_total) >= 1);
        let _ = stop_tx.send(());
    };
    let run = service.run_until_idle(async {
        let _ = stop_rx.await;
    });
    {
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => panic!("the service stopped before the test ended: {r:?}"),
            () = watch => run.await.expect("service ran"),
        }
    }

    // Every prediction counted in its window, none late.
    let sink = ClickHouseSink::new(&ClickHouseServer::shared().config(&database));
    let counted: Vec<(u32, f64)> = sink
        .client()
        .query(
            "SELECT window_start, value FROM window_metrics FINAL \
             WHERE model_id = 'clf' AND segment = '' AND metric = 'prediction_count' \
             ORDER BY window_start",
        )
        .fetch_all()
        .await
        .expect("query");
    assert_eq!(counted.len(), 60, "{counted:?}");
    assert_eq!(counted.iter().map(|(_, v)| v).sum::<f64>(), N as f64);
    assert_eq!(service.progress().core.late_predictions, 0);
}
