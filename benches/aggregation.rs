//! The live aggregation branch alone (`engine/src/aggregation`): documents loaded, then
//! updates through differential dataflow with many live pipelines, against re-running the
//! pipelines a write touches from scratch.
//!
//! `LIVEGRID_AGG_DOCS` documents (default 10,000) in 100 shops and 20 categories;
//! `LIVEGRID_AGG_PIPELINES` pipelines (default 100), pipeline `i` being `$match {shop: i %
//! 100}` then `$group` by category with `$sum`, `$count` and `$max`; `LIVEGRID_AGG_UPDATES`
//! price updates (default 5,000) in steps of 100; `LIVEGRID_AGG_WORKERS` workers (default 1).
//! `LIVEGRID_AGG_DEBUG=1` prints every group output change.
//! Every pipeline sees every write today (no predicate-index pruning yet), so this measures
//! the branch's worst case.
//!
//! Run with `scripts/bench.sh aggregation`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::Instant;

use bson::{Bson, Document, doc};
use differential_dataflow::input::{Input, InputSession};
use livegrid_engine::aggregation::{Registry, Time, Upsert, build};
use livegrid_matcher::Pipeline;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::Input as _;
use timely::dataflow::{InputHandle, ProbeHandle};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn document(id: u64, price: u64) -> Document {
    doc! {"_id": id as i64, "shop": (id % 100) as i32, "category": format!("c{}", id % 20), "price": price as i64}
}

fn stages(i: u64) -> Vec<Bson> {
    vec![
        Bson::Document(doc! {"$match": {"shop": (i % 100) as i32}}),
        Bson::Document(
            doc! {"$group": {"_id": "$category", "revenue": {"$sum": "$price"}, "n": {"$count": {}}, "top": {"$max": "$price"}}},
        ),
    ]
}

/// Advances both inputs to `time` and steps until the branch has caught up with them.
fn settle(
    worker: &mut timely::worker::Worker,
    upserts: &mut InputHandle<Time, CapacityContainerBuilder<Vec<Upsert>>>,
    registrations: &mut InputSession<Time, (u64, String), isize>,
    probe: &ProbeHandle<Time>,
    time: Time,
) {
    upserts.advance_to(time);
    registrations.advance_to(time);
    registrations.flush();
    while probe.less_than(upserts.time()) {
        worker.step();
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    livegrid::allocator::configure();
    let docs = env("LIVEGRID_AGG_DOCS", 10_000);
    let pipelines = env("LIVEGRID_AGG_PIPELINES", 100);
    let updates = env("LIVEGRID_AGG_UPDATES", 5_000);
    let workers = env("LIVEGRID_AGG_WORKERS", 1) as usize;
    const STEP: u64 = 100;
    for i in 0..pipelines {
        Registry::global().insert(i, Arc::new(Pipeline::parse(&stages(i)).unwrap()));
    }
    // Group output changes (a changed group retracts its old output and adds its new one).
    let changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = changes.clone();
    let (load, update, outputs) = timely::execute(timely::Config::process(workers), move |worker| {
        let changes = counter.clone();
        let mut upserts: InputHandle<Time, CapacityContainerBuilder<Vec<Upsert>>> = InputHandle::new();
        let (mut registrations, probe) = worker.dataflow::<Time, _, _>(|scope| {
            let stream = scope.input_from(&mut upserts);
            let (registrations, pipes) = scope.new_collection::<(u64, String), isize>();
            let counted = changes.clone();
            let (probe, _) = build(stream, pipes, workers as u64)
                .inspect(move |update| {
                    if std::env::var("LIVEGRID_AGG_DEBUG").is_ok() {
                        eprintln!("{:?}", (update.1, update.2));
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })
                .probe();
            (registrations, probe)
        });
        if worker.index() != 0 {
            return (0.0, 0.0, 0);
        }
        let key = |id: u64| format!("bench.orders/{id}").into_bytes();
        let value = |doc: &Document| Some(("bench.orders".to_string(), doc.to_vec().unwrap()));
        let started = Instant::now();
        for i in 0..pipelines {
            registrations.insert((i, "bench.orders".to_string()));
        }
        for id in 0..docs {
            upserts.send((key(id), value(&document(id, id % 1000)), 0));
        }
        settle(worker, &mut upserts, &mut registrations, &probe, 1);
        let load = started.elapsed().as_secs_f64();
        let loaded = changes.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("loaded: {loaded} group outputs in {load:.2} s; updating");
        let mut seed = 1u64;
        let started = Instant::now();
        let mut time = 1;
        for n in 0..updates {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let id = seed % docs;
            upserts.send((key(id), value(&document(id, (seed >> 32) % 1000)), time));
            if n % STEP == STEP - 1 || n + 1 == updates {
                time += 1;
                settle(worker, &mut upserts, &mut registrations, &probe, time);
            }
        }
        (load, started.elapsed().as_secs_f64(), changes.load(std::sync::atomic::Ordering::Relaxed) - loaded)
    })
    .unwrap()
    .join()
    .into_iter()
    .next()
    .unwrap()
    .unwrap();
    // Re-running from scratch: what one write costs when every pipeline it touches (those of
    // its shop) runs again over the collection.
    let all: Vec<Document> = (0..docs).map(|id| document(id, id % 1000)).collect();
    let pipeline = Pipeline::parse(&stages(0)).unwrap();
    let started = Instant::now();
    let runs = 20;
    for _ in 0..runs {
        std::hint::black_box(pipeline.evaluate(&all));
    }
    let rerun = started.elapsed().as_secs_f64() / runs as f64;
    let touched = (pipelines as f64 / 100.0).max(1.0);
    println!(
        "| workers | documents | pipelines | load s | updates | group output changes | updates/s | µs per update | re-run µs per update ({touched} pipelines × {:.0} µs) |",
        rerun * 1e6
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {workers} | {docs} | {pipelines} | {load:.2} | {updates} | {outputs} | {:.0} | {:.1} | {:.0} |",
        updates as f64 / update,
        update / updates as f64 * 1e6,
        rerun * touched * 1e6
    );
}
