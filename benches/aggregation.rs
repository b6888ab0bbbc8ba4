//! Group state two ways on the same workload: the differential-dataflow formulation
//! (`engine/src/aggregation`: contributions reduced by (pipeline, group key)) and the live
//! pipelines' retractable accumulator states (`engine/src/live_pipeline`, driven without the
//! grid through [`Local`]), against re-running the pipelines a write touches from scratch.
//!
//! `LIVEGRID_AGG_DOCS` documents (default 10,000) in 100 shops and 20 categories;
//! `LIVEGRID_AGG_PIPELINES` pipelines (default 100), pipeline `i` being `$match {shop: i %
//! 100}` then `$group` by category with `$sum`, `$count` and `$max`; with
//! `LIVEGRID_AGG_GROUPS=one`, one pipeline whose single group holds every document (`$group`
//! by null: a counter, a total, a maximum). `LIVEGRID_AGG_UPDATES` price updates (default
//! 5,000) in steps of 100; `LIVEGRID_AGG_WORKERS` workers (default 1) for the dataflow.
//! Prices are drawn from `LIVEGRID_AGG_PRICES` distinct values (default 1,000): equal
//! contributions consolidate in the dataflow, so its `reduce` reads one entry per distinct
//! value in a group. `LIVEGRID_AGG_DEBUG=1` prints every group output change. The dataflow joins every pipeline
//! with every write of its namespace (no predicate index); the live path applies a write only
//! to the pipelines whose `$match` admits it, as the grid's index does.
//!
//! Run with `scripts/bench.sh aggregation`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::Instant;

use bson::{Bson, Document, doc};
use differential_dataflow::input::{Input, InputSession};
use livegrid_engine::aggregation::{Registry, Time, Upsert, build};
use livegrid_engine::doc_id::DocId;
use livegrid_engine::live_pipeline::Local;
use livegrid_engine::slots::Slots;
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

/// How many distinct prices there are (what a group's values are drawn from).
fn prices() -> u64 {
    env("LIVEGRID_AGG_PRICES", 1000).max(1)
}

/// Whether the single pipeline's single group holds every document.
fn one_group() -> bool {
    std::env::var("LIVEGRID_AGG_GROUPS").is_ok_and(|v| v == "one")
}

fn stages(i: u64) -> Vec<Bson> {
    if one_group() {
        return vec![Bson::Document(
            doc! {"$group": {"_id": null, "revenue": {"$sum": "$price"}, "n": {"$count": {}}, "top": {"$max": "$price"}}},
        )];
    }
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

/// The updates: (document id, new price), the same sequence for both paths.
fn writes(docs: u64, updates: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut seed = 1u64;
    (0..updates).map(move |_| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % docs, (seed >> 32) % prices())
    })
}

/// The same load and updates through the live pipelines' group state, one core per pipeline,
/// each write applied to the pipelines whose `$match` admits it: (load s, update s, group
/// output changes).
fn live(docs: u64, pipelines: u64, updates: u64) -> (f64, f64, usize) {
    let started = Instant::now();
    let all: Vec<Document> = (0..docs).map(|id| document(id, id % prices())).collect();
    let mut slots = Slots::default();
    let admits = |i: u64, id: u64| one_group() || id % 100 == i % 100;
    let mut cores: Vec<Local> = (0..pipelines)
        .map(|i| {
            let mine: Vec<Document> =
                (0..docs).filter(|id| admits(i, *id)).map(|id| all[id as usize].clone()).collect();
            Local::new(stages(i), &mine, &mut slots)
        })
        .collect();
    let load = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut changes = 0;
    for (n, (id, price)) in writes(docs, updates).enumerate() {
        let doc = document(id, price);
        let key = DocId::new(doc.get("_id").unwrap());
        for (i, core) in cores.iter_mut().enumerate() {
            if admits(i as u64, id) {
                changes += core.write(&mut slots, &key, Some(&doc), (n as u64 + 1).into()).map_or(0, |c| c.len());
            }
        }
    }
    (load, started.elapsed().as_secs_f64(), changes)
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    livegrid::allocator::configure();
    let docs = env("LIVEGRID_AGG_DOCS", 10_000);
    let pipelines = if one_group() { 1 } else { env("LIVEGRID_AGG_PIPELINES", 100) };
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
            upserts.send((key(id), value(&document(id, id % prices())), 0));
        }
        settle(worker, &mut upserts, &mut registrations, &probe, 1);
        let load = started.elapsed().as_secs_f64();
        let loaded = changes.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("loaded: {loaded} group outputs in {load:.2} s; updating");
        let started = Instant::now();
        let mut time = 1;
        for (n, (id, price)) in writes(docs, updates).enumerate() {
            let n = n as u64;
            upserts.send((key(id), value(&document(id, price)), time));
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
    let all: Vec<Document> = (0..docs).map(|id| document(id, id % prices())).collect();
    let pipeline = Pipeline::parse(&stages(0)).unwrap();
    let started = Instant::now();
    let runs = 20;
    for _ in 0..runs {
        std::hint::black_box(pipeline.evaluate(&all));
    }
    let rerun = started.elapsed().as_secs_f64() / runs as f64;
    let touched = if one_group() { 1.0 } else { (pipelines as f64 / 100.0).max(1.0) };
    let (live_load, live_update, live_changes) = live(docs, pipelines, updates);
    println!(
        "| path | documents | pipelines | load s | updates | group output changes | updates/s | µs per update | re-run µs per update ({touched} pipelines × {:.0} µs) |",
        rerun * 1e6
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let groups = if one_group() { "one group" } else { "20 groups each" };
    println!(
        "| differential dataflow, {workers} worker(s) | {docs} | {pipelines} ({groups}) | {load:.2} | {updates} | {outputs} (retractions and additions) | {:.0} | {:.1} | {:.0} |",
        updates as f64 / update,
        update / updates as f64 * 1e6,
        rerun * touched * 1e6
    );
    println!(
        "| live pipelines' group state, 1 thread | {docs} | {pipelines} ({groups}) | {live_load:.2} | {updates} | {live_changes} | {:.0} | {:.1} | {:.0} |",
        updates as f64 / live_update,
        live_update / updates as f64 * 1e6,
        rerun * touched * 1e6
    );
}
