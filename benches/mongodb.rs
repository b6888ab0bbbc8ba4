//! Events/s through the MongoDB source: the real driver reads a change stream from the
//! wire-level fixture (`tests/common/mongo_fixture.rs`, on loopback in this process) and the
//! source parses every event into the engine's form, as `serve --mongodb` does before the
//! grid. `LIVEGRID_MONGODB_EVENTS` events (default 200,000: inserts of small documents, one in
//! ten an update, one in twenty a transaction of three writes) are written first, then pulled
//! in batches of 1,024 as the pump pulls. The fixture answers `getMore` with up to 1,000
//! events. Run with `scripts/bench.sh mongodb`.
//!
//! The fixture and the source share this process's cores, so the figure is a floor for the
//! source itself; against a real deployment the network and the server set the pace.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/common/mongo_fixture.rs"]
mod mongo_fixture;

use std::time::{Duration, Instant};

use bson::doc;
use livegrid::source::mongodb::{MongoConfig, MongoSource, Watch};
use livegrid::source::{Pulled, Source};
use mongo_fixture::{MongoFixture, Write};

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    livegrid::allocator::configure();
    let events: usize = std::env::var("LIVEGRID_MONGODB_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let fixture = MongoFixture::start();
    let dir = tempfile::tempdir().unwrap();
    let config = MongoConfig {
        uri: fixture.uri(),
        watch: Watch::Only(vec!["bench".into()]),
        checkpoint: dir.path().join("token.bson"),
        skip_undecodable: false,
        full_document: Default::default(),
    };
    let mut source = MongoSource::open(config).unwrap();
    let mut written = 0;
    let mut i = 0i64;
    while written < events {
        if i % 20 == 19 {
            fixture.transaction(vec![
                ("bench.items", Write::Insert(doc! { "_id": i, "n": i, "room": format!("r{}", i % 200) })),
                ("bench.items", Write::Replace(doc! { "_id": i - 1, "n": -i })),
                ("bench.items", Write::Delete(bson::Bson::Int64(i - 2))),
            ]);
            written += 3;
        } else if i % 10 == 9 {
            fixture.update("bench.items", doc! { "_id": i - 1, "n": i, "room": "r0" });
            written += 1;
        } else {
            fixture.insert(
                "bench.items",
                doc! { "_id": i, "n": i, "room": format!("r{}", i % 200), "text": "a short chat message of the benchmark" },
            );
            written += 1;
        }
        i += 1;
    }
    let started = Instant::now();
    let mut pulled = 0;
    while pulled < written {
        match source.pull(1024, Duration::from_millis(50)).unwrap() {
            Pulled::Events(batch) => pulled += batch.len(),
            Pulled::Idle => assert!(started.elapsed() < Duration::from_secs(600), "stalled at {pulled} of {written}"),
            Pulled::Ended | Pulled::Lost { .. } => panic!("the stream ended or lost history"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("| events through the MongoDB source | seconds | events/s |");
    println!("|---|---|---|");
    println!("| {pulled} | {seconds:.2} | {:.0} |", pulled as f64 / seconds);
}
