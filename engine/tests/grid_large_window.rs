//! A sorted window of 10,000 documents stays exact through inserts, moves and deletes,
//! including deletes that drain it and force re-reads of the top from the snapshot source.

use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, doc};
use livegrid_engine::memory::SharedMemory;
use livegrid_engine::{ChangeEvent, ChangeOp, Engine, EngineConfig};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::LiveResult;

mod common;

#[test]
fn ten_thousand_document_window() {
    let memory = Arc::new(SharedMemory::default());
    let engine = Engine::start(EngineConfig { slack: 100, ..Default::default() }, memory.clone()).unwrap();
    // The engine's output is bounded: read it concurrently, as every consumer must.
    let reader = common::collect_frames(&engine);
    let mut position = 0;
    let mut write = |engine: &Engine, id: i64, n: Option<i64>| {
        position += 1;
        let doc = n.map(|n| Arc::new(doc! {"_id": id, "n": n, "even": n % 2 == 0}));
        let op = if doc.is_some() { ChangeOp::Replace } else { ChangeOp::Delete };
        let event = ChangeEvent { position: position.into(), ns: "db.big".into(), op, id: Bson::Int64(id), doc };
        memory.0.lock().unwrap().apply(&event);
        engine.submit([event]).unwrap();
    };
    for id in 0..12_000 {
        write(&engine, id, Some((id * 7919) % 100_000));
    }
    let spec = QuerySpec { filter: doc! {}, sort: Some(doc! {"n": 1}), skip: 5, limit: Some(10_000), projection: None };
    let query = Query::compile(&spec).unwrap();
    let key = engine.register("db.big", &spec).unwrap();
    // Deletes drain the window (forcing re-reads), moves shuffle it, inserts push into it.
    let mut seed = 11u64;
    for step in 0..3_000 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let id = ((seed >> 33) % 14_000) as i64;
        match step % 3 {
            0 => write(&engine, id, None),
            _ => write(&engine, id, Some(((seed >> 13) % 100_000) as i64)),
        }
    }
    assert!(engine.settle(Duration::from_secs(120)));
    engine.shutdown();
    let mut live = LiveResult::default();
    for (k, frame) in reader.join().unwrap() {
        if k == key {
            live.apply(&frame.to_message("big", None)).unwrap();
        }
    }
    let state = memory.0.lock().unwrap();
    let expected = query.evaluate(state.documents("db.big"));
    assert_eq!(expected.len(), 10_000);
    // Compared as clients see them: relaxed Extended JSON, where a small int64 reads back as int32.
    let json =
        |docs: &[bson::Document]| docs.iter().map(livegrid_protocol::extjson::to_relaxed_string).collect::<Vec<_>>();
    assert!(json(live.docs()) == json(&expected), "the window differs from the database");
}
