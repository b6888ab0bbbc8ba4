//! Registrations racing with writes: one thread feeds writes without pause while another
//! registers subscriptions whose snapshots are read at whatever the database holds then
//! (often ahead of the grid, and with writes fed while the registration is being built).
//! Every subscription must end exactly at the database's state.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bson::{Bson, doc};
use livegrid_engine::memory::SharedMemory;
use livegrid_engine::{ChangeEvent, ChangeOp, Engine, EngineConfig};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::{LiveResult, extjson};

mod common;

#[test]
fn registrations_racing_with_writes_end_exact() {
    let memory = Arc::new(SharedMemory::default());
    let engine = Arc::new(Engine::start(EngineConfig { slack: 2, ..Default::default() }, memory.clone()).unwrap());
    let reader = common::collect_frames(&engine);
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (engine, memory, writing) = (engine.clone(), memory.clone(), writing.clone());
        std::thread::spawn(move || {
            let mut seed = 7u64;
            let mut position = 0;
            while writing.load(Ordering::Relaxed) || position < 8_000 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                position += 1;
                let id = ((seed >> 33) % 2_000) as i32;
                let doc = (!(seed >> 20).is_multiple_of(5))
                    .then(|| Arc::new(doc! {"_id": id, "n": ((seed >> 40) % 50) as i32}));
                let op = if doc.is_some() { ChangeOp::Replace } else { ChangeOp::Delete };
                let event = ChangeEvent { position: position.into(), ns: "db.c".into(), op, id: Bson::Int32(id), doc };
                // The database holds a write before the grid is fed it, as a store's would.
                memory.0.lock().unwrap().apply(&event);
                engine.submit([event]).unwrap();
            }
        })
    };
    let mut registered = HashMap::new();
    for i in 0..60 {
        let spec = match i % 3 {
            0 => QuerySpec { filter: doc! {"n": {"$lt": i % 50}}, ..Default::default() },
            1 => QuerySpec { filter: doc! {}, sort: Some(doc! {"n": -1}), limit: Some(5), ..Default::default() },
            _ => QuerySpec {
                filter: doc! {"n": {"$gte": 10}},
                sort: Some(doc! {"n": 1}),
                skip: 2,
                limit: Some(7),
                ..Default::default()
            },
        };
        let key = engine.register("db.c", &spec).unwrap();
        registered.insert(key, spec);
        std::thread::sleep(Duration::from_millis(2));
    }
    writing.store(false, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(engine.settle(Duration::from_secs(60)));
    let engine = Arc::try_unwrap(engine).ok().expect("the writer is done");
    engine.shutdown();
    let mut copies: HashMap<u64, LiveResult> = HashMap::new();
    for (key, frame) in reader.join().unwrap() {
        copies.entry(key).or_default().apply(&frame.to_message("q", None)).unwrap();
    }
    let state = memory.0.lock().unwrap();
    let json = |docs: &[bson::Document]| docs.iter().map(extjson::to_relaxed_string).collect::<Vec<String>>();
    for (key, spec) in &registered {
        let query = Query::compile(spec).unwrap();
        let expected = query.evaluate(state.documents("db.c"));
        let mut got = json(copies[key].docs());
        let mut want = json(&expected);
        if spec.sort.is_none() {
            got.sort();
            want.sort();
        }
        assert_eq!(got, want, "subscription {key} ({spec:?}) diverged");
    }
}
