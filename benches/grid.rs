//! Grid benchmark: events per second and write-to-delta latency with 1k, 10k and 100k
//! registered filter queries (the mixed equality / range / `$in` workload of
//! `livegrid::workload`), and resident memory per registered query.
//!
//! Phases per query count: register the queries (resident memory before and after gives
//! bytes per query), insert every item once (warm-up), then
//! - throughput: feed pre-generated writes as fast as the grid takes them, with at most
//!   `IN_FLIGHT` writes not yet processed (closed loop);
//! - latency: offer writes at a fixed rate (open loop, `LIVEGRID_BENCH_RATE` per second,
//!   default 100,000) in 1 ms ticks and record, for every delta, the time from its write
//!   entering the engine to the delta leaving it.
//!
//! Run with `scripts/bench.sh grid` (or `cargo bench --bench grid`). Environment:
//! `LIVEGRID_BENCH_QUERIES` (comma-separated counts), `LIVEGRID_BENCH_GRID` (`QxW`),
//! `LIVEGRID_BENCH_RATE`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livegrid::workload::{NAMESPACE, Workload};
use livegrid_engine::{
    ChangeEvent, ChangeOp, Engine, EngineConfig, EngineEvent, GridShape, Snapshot, SnapshotError, SnapshotSource,
};
use livegrid_matcher::Query;
use livegrid_protocol::Position;

/// Counts live heap bytes (over mimalloc, the binary's allocator), so that memory per query is what stays allocated, not what the
/// allocator happens to keep from registration traffic.
struct Counting;

static LIVE: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> i64 {
    LIVE.load(Ordering::Relaxed) as i64
}

const ITEMS: u64 = 100_000;
const THROUGHPUT_EVENTS: u64 = 400_000;
const LATENCY_SECONDS: u64 = 3;
const BATCH: usize = 500;
const IN_FLIGHT: u64 = 20_000;

/// Queries are registered before any write: every snapshot is empty.
struct EmptyDatabase;

impl SnapshotSource for EmptyDatabase {
    fn read(
        &self,
        _ns: &str,
        _spec: &livegrid_matcher::QuerySpec,
        _query: &Query,
        _k: Option<usize>,
    ) -> Result<Snapshot, SnapshotError> {
        Ok(Snapshot { docs: Vec::new(), position: Position::ZERO, complete: true })
    }
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

#[derive(Default)]
struct Observed {
    deltas: u64,
    latencies: Vec<Duration>,
}

fn feed(engine: &Engine, events: Vec<ChangeEvent>) {
    let mut batch = Vec::with_capacity(BATCH);
    for event in events {
        let position = event.position;
        batch.push(event);
        if batch.len() == BATCH {
            engine.submit(std::mem::take(&mut batch)).unwrap();
            while position.time().saturating_sub(engine.processed().time()) > IN_FLIGHT {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
    engine.submit(batch).unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

fn run(queries: usize, shape: GridShape, rate: u64) {
    let mut workload = Workload::new(queries as u64);
    let engine =
        Engine::start(EngineConfig { shape, retention: 10_000, ..Default::default() }, Arc::new(EmptyDatabase))
            .unwrap();
    let observed = Arc::new(Mutex::new(Observed::default()));
    let recording = Arc::new(AtomicBool::new(false));
    let consumer = {
        let messages = engine.messages().clone();
        let observed = observed.clone();
        let recording = recording.clone();
        std::thread::spawn(move || {
            for event in messages {
                let EngineEvent::Messages(batch) = event else { continue };
                let mut o = observed.lock().unwrap();
                for latency in batch.iter().filter_map(|m| m.latency) {
                    o.deltas += 1;
                    if recording.load(Ordering::Relaxed) {
                        o.latencies.push(latency);
                    }
                }
            }
        })
    };

    let specs: Vec<_> = (0..queries).map(|_| workload.query()).collect();
    let (rss_before, live_before) = (resident_bytes(), live_bytes());
    for spec in &specs {
        engine.register(NAMESPACE, spec).unwrap();
    }
    assert!(engine.settle(Duration::from_secs(600)));
    let per_query = (live_bytes() - live_before) as f64 / queries as f64;
    let rss_per_query = resident_bytes().saturating_sub(rss_before) as f64 / queries as f64;
    drop(specs);

    let mut position = 0;
    let mut next = |workload: &mut Workload, insert: Option<u64>| {
        position += 1;
        match insert {
            Some(id) => ChangeEvent {
                position: Position::new(position),
                ns: NAMESPACE.into(),
                op: ChangeOp::Insert,
                id: bson::Bson::Int64(id as i64),
                doc: Some(Arc::new(workload.item(id))),
            },
            None => workload.event(position),
        }
    };
    let warmup: Vec<_> = (0..ITEMS).map(|id| next(&mut workload, Some(id))).collect();
    feed(&engine, warmup);
    assert!(engine.settle(Duration::from_secs(600)));

    let writes: Vec<_> = (0..THROUGHPUT_EVENTS).map(|_| next(&mut workload, None)).collect();
    let deltas_before = observed.lock().unwrap().deltas;
    let started = Instant::now();
    feed(&engine, writes);
    assert!(engine.settle(Duration::from_secs(600)));
    let throughput = THROUGHPUT_EVENTS as f64 / started.elapsed().as_secs_f64();
    let deltas_per_event = (observed.lock().unwrap().deltas - deltas_before) as f64 / THROUGHPUT_EVENTS as f64;

    let per_tick = (rate / 1000).max(1);
    let ticks = LATENCY_SECONDS * 1000;
    let open_loop: Vec<_> = (0..per_tick * ticks).map(|_| next(&mut workload, None)).collect();
    let mut open_loop = open_loop.into_iter();
    recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    for tick in 0..ticks {
        let due = started + Duration::from_millis(tick);
        while Instant::now() < due {
            std::thread::sleep(Duration::from_micros(100));
        }
        engine.submit(open_loop.by_ref().take(per_tick as usize).collect::<Vec<_>>()).unwrap();
    }
    let offered_for = started.elapsed().as_secs_f64();
    assert!(engine.settle(Duration::from_secs(600)));
    recording.store(false, Ordering::Relaxed);
    let mut latencies = std::mem::take(&mut observed.lock().unwrap().latencies);
    latencies.sort_unstable();

    println!(
        "| {queries} | {shape} | {throughput:.0} | {deltas_per_event:.2} | {offered:.0} | {p50:.2} | {p99:.2} | {max:.2} | {per_query:.0} | {rss_per_query:.0} |",
        offered = (per_tick * ticks) as f64 / offered_for,
        p50 = percentile(&latencies, 0.5),
        p99 = percentile(&latencies, 0.99),
        max = percentile(&latencies, 1.0),
    );
    engine.shutdown();
    consumer.join().unwrap();
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing we need.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let counts: Vec<usize> = std::env::var("LIVEGRID_BENCH_QUERIES")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .map(|c| c.trim().parse().expect("query counts are integers"))
        .collect();
    let shape: GridShape =
        std::env::var("LIVEGRID_BENCH_GRID").unwrap_or_else(|_| "1x1".into()).parse().expect("grid is QxW");
    let rate: u64 = std::env::var("LIVEGRID_BENCH_RATE").ok().and_then(|r| r.parse().ok()).unwrap_or(100_000);
    println!(
        "| queries | grid | events/s (closed loop) | deltas/event | offered events/s (open loop) | p50 ms | p99 ms | max ms | heap bytes/query | resident bytes/query |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for queries in counts {
        run(queries, shape, rate);
    }
    result_state_memory();
}

/// Live heap the engine holds per (subscription, document in its result) for unsorted
/// results: 2,000 equality subscriptions (`{owner: u<k>}`, ten per owner), then 100,000
/// inserts each entering ten results (1,000,000 pairs). Retention is kept small so that it
/// does not count; messages are drained as they come.
fn result_state_memory() {
    let subscriptions: u64 =
        std::env::var("LIVEGRID_BENCH_RESULT_SUBS").ok().and_then(|n| n.parse().ok()).unwrap_or(2_000);
    const OWNERS: u64 = 200;
    const DOCS: u64 = 100_000;
    let config = EngineConfig { retention: 1_000, ..Default::default() };
    let engine = Engine::start(config, Arc::new(EmptyDatabase)).unwrap();
    let drain = {
        let messages = engine.messages().clone();
        std::thread::spawn(move || for _ in messages {})
    };
    let mut keys = Vec::new();
    for i in 0..subscriptions {
        let spec = livegrid_matcher::QuerySpec {
            filter: bson::doc! {"owner": format!("u{}", i % OWNERS)},
            ..Default::default()
        };
        keys.push(engine.register(NAMESPACE, &spec).unwrap());
    }
    assert!(engine.settle(Duration::from_secs(600)));
    let before = live_bytes();
    let events: Vec<ChangeEvent> = (1..=DOCS)
        .map(|id| {
            let doc = bson::doc! {"_id": id as i64, "owner": format!("u{}", id % OWNERS), "text": "a message"};
            ChangeEvent {
                position: Position::new(id),
                ns: NAMESPACE.into(),
                op: ChangeOp::Insert,
                id: bson::Bson::Int64(id as i64),
                doc: Some(Arc::new(doc)),
            }
        })
        .collect();
    feed(&engine, events);
    assert!(engine.settle(Duration::from_secs(600)));
    // Messages still queued for the drain are output, not result state.
    let queued = engine.messages().clone();
    for _ in 0..1000 {
        if queued.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let pairs = DOCS * subscriptions / OWNERS;
    let per_pair = (live_bytes() - before) as f64 / pairs as f64;
    println!();
    println!("| subscriptions | documents | (subscription, document) pairs | engine heap bytes per pair |");
    println!("|---|---|---|---|");
    println!("| {subscriptions} | {DOCS} | {pairs} | {per_pair:.1} |");
    eprintln!("engine heap growth: {} bytes", live_bytes() - before);
    // Once every subscription has ended, the state goes (what stays: slot tables sized for
    // the peak, a few bytes per document).
    for key in keys {
        engine.unregister(key).unwrap();
    }
    assert!(engine.settle(Duration::from_secs(600)));
    std::thread::sleep(Duration::from_millis(200));
    println!();
    println!("| after every subscription ended: engine heap above the start | per former pair |");
    println!("|---|---|");
    let left = live_bytes() - before;
    println!("| {:.1} MB | {:.1} bytes |", left as f64 / 1e6, left as f64 / pairs as f64);
    engine.shutdown();
    let _ = drain.join();
}
