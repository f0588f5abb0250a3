//! Memory of the in-memory state, measured with a counting allocator:
//! bytes per pending prediction (join state + its record) and the heap behind
//! the window accumulators, for 25-feature events (20 numeric, 5 categorical).
//!
//! Run: `cargo bench --bench memory` (N from env `MODELWATCH_BENCH_PENDING`,
//! default 1,000,000). Under `cargo test` it runs once with a small N.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use modelwatch::config;
use modelwatch::generate::{Generator, Scenario};
use modelwatch::model::InputEvent;
use modelwatch::pipeline::Core;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("MODELWATCH_BENCH_PENDING")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 1_000_000 } else { 20_000 });
    let mut cfg = config::load(None, &Default::default()).expect("defaults are valid");
    cfg.windows.label_horizon = std::time::Duration::from_secs(7 * 86400);
    let scenario = Scenario {
        seed: 5,
        start_ms: 1_767_225_600_000,
        events_per_second: 1000.0,
        count: n,
        versions: vec!["v1".into()],
        label_fraction: 0.0,
        ..Scenario::default()
    };
    let mut core = Core::new(&cfg);
    // Fill the windows and the reference first, then measure the pending state
    // of further predictions only.
    let mut gen = Generator::new(scenario);
    let warmup = (n / 10).max(2_000);
    let mut seen = 0u64;
    for ev in gen.by_ref() {
        if let InputEvent::Prediction(p) = ev {
            core.on_prediction(&p, 0);
            seen += 1;
            if seen == warmup {
                break;
            }
        }
    }
    let before = live();
    let pending_before = core.pending_predictions();
    let windows_before = core.window_heap_bytes();
    for ev in gen {
        if let InputEvent::Prediction(p) = ev {
            core.on_prediction(&p, 0);
        }
    }
    let grown = live() - before;
    let window_growth = core.window_heap_bytes() as isize - windows_before as isize;
    let added = (core.pending_predictions() - pending_before) as isize;
    println!(
        "pending predictions: {}  heap growth {:.1} MiB  window accumulators {:.1} MiB",
        core.pending_predictions(),
        grown as f64 / 1048576.0,
        core.window_heap_bytes() as f64 / 1048576.0
    );
    println!(
        "bytes per pending prediction (join state + record): {:.0}",
        (grown - window_growth) as f64 / added.max(1) as f64
    );
    println!(
        "bytes per (model, version, segment, window) data accumulator: {:.0}",
        core.window_heap_bytes() as f64 / core.window_cells().max(1) as f64
    );
}
