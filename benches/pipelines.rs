//! Live pipelines through the engine: many pipeline subscriptions over a large collection,
//! then a stream of updates; updates/s to the last delta, against re-running the pipelines
//! each write touches.
//!
//! `LIVEGRID_PIPE_DOCS` documents (default 1,000,000) in `LIVEGRID_PIPE_PIPELINES` shops
//! (default 10,000) and 20 categories; pipeline `s` is `$match {shop: s}`, `$group` by category
//! with `$sum` of price × quantity, `$count` and `$max`, then `$sort` by revenue and `$limit 5`
//! (a per-shop leaderboard). `LIVEGRID_PIPE_UPDATES` updates (default 200,000): a new price,
//! one in ten also a new category, one in fifty a move to another shop (so it leaves one
//! pipeline and enters another). `LIVEGRID_PIPE_GRID` is the grid (default `1x1`).
//! `LIVEGRID_PIPE_SUBSCRIPTIONS` subscriptions (default: one per pipeline), subscription `i` to
//! pipeline `i % pipelines`: subscriptions to the same pipeline share its state.
//!
//! The snapshot source answers a shop's documents from an index, as a database with an index
//! on `shop` would. Re-running is measured the same way: the pipeline over its shop's
//! documents (index lookup free), and once over the whole collection (no index).
//!
//! Run with `scripts/bench.sh aggregation`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bson::{Bson, Document, doc};
use livegrid_engine::records::WirePipeline;
use livegrid_engine::{
    ChangeEvent, ChangeOp, Engine, EngineConfig, EngineEvent, GridShape, Snapshot, SnapshotError, SnapshotSource,
};
use livegrid_matcher::pipeline::first_match_source;
use livegrid_matcher::{Pipeline, Query, QuerySpec};

const NS: &str = "bench.orders";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_mib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    (statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096) >> 20
}

fn stages(shop: u64) -> Vec<Bson> {
    [
        doc! {"$match": {"shop": shop as i32}},
        doc! {"$group": {
            "_id": "$category",
            "revenue": {"$sum": {"$multiply": ["$price", "$qty"]}},
            "orders": {"$count": {}},
            "top": {"$max": "$price"},
        }},
        doc! {"$sort": {"revenue": -1, "_id": 1}},
        doc! {"$limit": 5},
    ]
    .into_iter()
    .map(Bson::Document)
    .collect()
}

/// The collection at position 0, indexed by shop.
struct Shops {
    by_shop: Vec<Vec<Arc<Document>>>,
}

impl SnapshotSource for Shops {
    fn read(&self, _ns: &str, spec: &QuerySpec, _query: &Query, _k: Option<usize>) -> Result<Snapshot, SnapshotError> {
        let shop = spec.filter.get_i32("shop").unwrap_or(0) as usize;
        let docs = self.by_shop.get(shop).map_or(Vec::new(), |docs| docs.iter().map(|d| (**d).clone()).collect());
        Ok(Snapshot { docs, position: 0.into(), complete: true })
    }
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn order(id: u64, shop: u64, rng: &mut Rng) -> Document {
    doc! {
        "_id": id as i64,
        "shop": shop as i32,
        "category": format!("c{}", rng.below(20)),
        "price": 1 + rng.below(500) as i64,
        "qty": 1 + rng.below(5) as i32,
        "note": "a line of text that no pipeline reads",
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let docs = env("LIVEGRID_PIPE_DOCS", 1_000_000);
    let shops = env("LIVEGRID_PIPE_PIPELINES", 10_000).max(1);
    let updates = env("LIVEGRID_PIPE_UPDATES", 200_000);
    // Subscription i is to pipeline i % pipelines: beyond the pipelines, identical ones share.
    let subscriptions = env("LIVEGRID_PIPE_SUBSCRIPTIONS", shops).max(1);
    // The same subscriptions as plain queries on the shop (the grid's cost without the
    // aggregation, for comparison).
    let plain = std::env::var("LIVEGRID_PIPE_PLAIN").is_ok_and(|v| v == "1");
    let shape: GridShape = std::env::var("LIVEGRID_PIPE_GRID").unwrap_or_else(|_| "1x1".into()).parse().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    let started = Instant::now();
    let mut current: Vec<Arc<Document>> = (0..docs).map(|id| Arc::new(order(id, id % shops, &mut rng))).collect();
    let mut by_shop: Vec<Vec<Arc<Document>>> = vec![Vec::new(); shops as usize];
    for doc in &current {
        by_shop[doc.get_i32("shop").unwrap() as usize].push(doc.clone());
    }
    let rss_loaded = rss_mib();
    println!("collection: {docs} documents in {shops} shops, built in {:.1?}, RSS {rss_loaded} MiB", started.elapsed());

    let config = EngineConfig { shape, ..Default::default() };
    let engine = Arc::new(Engine::start(config, Arc::new(Shops { by_shop: by_shop.clone() })).unwrap());
    let frames = Arc::new(AtomicU64::new(0));
    let reader = {
        let (messages, frames) = (engine.messages().clone(), frames.clone());
        std::thread::spawn(move || {
            for event in messages {
                if let EngineEvent::Messages(batch) = event {
                    frames.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
            }
        })
    };

    let started = Instant::now();
    let pipelines: Vec<Pipeline> = (0..shops).map(|s| Pipeline::parse(&stages(s)).unwrap()).collect();
    for i in 0..subscriptions {
        let s = (i % shops) as usize;
        let pipeline = &pipelines[s];
        let stages = stages(s as u64);
        let spec = QuerySpec { filter: first_match_source(&stages), ..Default::default() };
        let query = Query::compile(&spec).unwrap();
        if plain {
            engine.register_as(engine.reserve_key(), NS, &spec, &query).unwrap();
        } else {
            let wire = WirePipeline::new(stages, Arc::new(pipeline.clone()));
            engine.register_pipeline_as(engine.reserve_key(), NS, &spec, &query, wire).unwrap();
        }
    }
    assert!(engine.settle(Duration::from_secs(600)));
    let registered = started.elapsed();
    let rss_registered = rss_mib();
    println!(
        "registered {subscriptions} subscriptions to {shops} pipelines in {registered:.1?} ({:.0} µs each, initial results included); \
         {} pipeline cores; RSS {rss_registered} MiB (+{} MiB)",
        registered.as_secs_f64() * 1e6 / subscriptions as f64,
        engine.pipeline_cores(),
        rss_registered.saturating_sub(rss_loaded)
    );

    // The update stream, made before timing.
    let mut events = Vec::with_capacity(updates as usize);
    let mut touched = Vec::with_capacity(updates as usize);
    for i in 0..updates {
        let id = rng.below(docs);
        let mut doc = (*current[id as usize]).clone();
        let old_shop = doc.get_i32("shop").unwrap() as u64;
        doc.insert("price", 1 + rng.below(500) as i64);
        if rng.below(10) == 0 {
            doc.insert("category", format!("c{}", rng.below(20)));
        }
        let new_shop = if rng.below(50) == 0 { rng.below(shops) } else { old_shop };
        doc.insert("shop", new_shop as i32);
        let doc = Arc::new(doc);
        current[id as usize] = doc.clone();
        touched.push((old_shop, new_shop));
        events.push(ChangeEvent {
            position: (i + 1).into(),
            ns: NS.into(),
            op: ChangeOp::Update,
            id: Bson::Int64(id as i64),
            doc: Some(doc),
        });
    }

    let before = frames.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut events = events.into_iter();
    loop {
        let batch: Vec<ChangeEvent> = events.by_ref().take(1000).collect();
        if batch.is_empty() {
            break;
        }
        engine.submit(batch).unwrap();
    }
    assert!(engine.settle(Duration::from_secs(1200)));
    let elapsed = started.elapsed();
    let deltas = frames.load(Ordering::Relaxed) - before;
    let live_us = elapsed.as_secs_f64() * 1e6 / updates as f64;
    println!(
        "grid {shape}: {updates} updates in {elapsed:.2?}: {:.0} updates/s, {live_us:.1} µs per update to the last delta; {deltas} deltas; RSS {} MiB",
        updates as f64 / elapsed.as_secs_f64(),
        rss_mib()
    );

    // The live pipeline's own state alone (no grid): what one write costs its core and view.
    {
        use livegrid_engine::live_pipeline::{Local, View};
        let shop: Vec<Document> =
            current.iter().filter(|d| d.get_i32("shop").ok() == Some(0)).map(|d| (**d).clone()).collect();
        let mut slots = livegrid_engine::slots::Slots::default();
        let pipeline = Arc::new(pipelines[0].clone());
        let mut core = Local::new(stages(0), &shop, &mut slots);
        let (mut view, _) = View::new(pipeline, core.outputs());
        let rounds = 100_000;
        let started = Instant::now();
        let mut ops = 0;
        for i in 0..rounds {
            let mut doc = shop[i % shop.len()].clone();
            doc.insert("price", 1 + rng.below(500) as i64);
            let id = livegrid_engine::doc_id::DocId::new(doc.get("_id").unwrap());
            let changes = core.write(&mut slots, &id, Some(&doc), (i as u64 + 1).into()).unwrap_or_default();
            ops += view.apply(core.outputs(), &changes, livegrid_protocol::Cause::Update).len();
        }
        println!(
            "the live pipeline's state alone ({} documents, {} groups): {:.1} µs per update, {ops} list operations",
            shop.len(),
            pipelines[0].evaluate(&shop).len(),
            started.elapsed().as_secs_f64() * 1e6 / rounds as f64
        );
    }

    // Re-running the touched pipelines instead, over the final collection (the cost does not
    // depend on which version of the documents it sees).
    let mut by_shop: Vec<Vec<&Document>> = vec![Vec::new(); shops as usize];
    for doc in &current {
        by_shop[doc.get_i32("shop").unwrap() as usize].push(doc);
    }
    let sample = touched.len().min(20_000);
    let started = Instant::now();
    let mut groups = 0;
    for &(old, new) in &touched[..sample] {
        groups += pipelines[old as usize].evaluate(by_shop[old as usize].iter().copied()).len();
        if new != old {
            groups += pipelines[new as usize].evaluate(by_shop[new as usize].iter().copied()).len();
        }
    }
    let rerun_us = started.elapsed().as_secs_f64() * 1e6 / sample as f64;
    let started = Instant::now();
    let scanned = pipelines[0].evaluate(current.iter().map(|d| &**d)).len();
    let scan = started.elapsed();
    println!(
        "re-running the touched pipelines with an index on shop: {rerun_us:.1} µs per update ({:.1}x the live cost; {groups} groups); \
         without an index one run scans the collection: {scan:.1?} ({:.0}x; {scanned} groups)",
        rerun_us / live_us,
        scan.as_secs_f64() * 1e6 / live_us
    );
    drop(events);
    match Arc::try_unwrap(engine) {
        Ok(engine) => engine.shutdown(),
        Err(_) => unreachable!("the engine has one owner"),
    }
    reader.join().unwrap();
}
