//! Model-based tests of live pipelines: random documents and writes, random pipelines
//! registered at the start and mid-stream (identical ones sharing a core, which ends with its
//! last subscriber and starts afresh with the next; some ended again); after every batch, each
//! pipeline's messages applied to its initial result (as a client applies them, by `seq`)
//! must equal the pipeline run from scratch on the database state, on grids 1x1 and 2x2.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, Document, doc};
use livegrid_engine::memory::{MemoryState, SharedMemory};
use livegrid_engine::records::WirePipeline;
use livegrid_engine::{ChangeEvent, ChangeOp, Engine, EngineConfig, EngineEvent, GridShape, QueryKey};
use livegrid_matcher::pipeline::first_match_source;
use livegrid_matcher::{Pipeline, Query, QuerySpec};
use livegrid_protocol::{LiveResult, ServerMessage, extjson};

mod common;
use common::Rng;

const NS: &str = "db.sales";

fn random_doc(rng: &mut Rng, id: i32) -> Document {
    let mut d = doc! {"_id": id};
    match rng.below(10) {
        0 => {}
        1 => {
            d.insert("shop", Bson::Null);
        }
        _ => {
            d.insert("shop", *rng.pick(&["a", "b", "c", "d"]));
        }
    }
    d.insert("kind", *rng.pick(&["sale", "sale", "refund"]));
    let amount = match rng.below(10) {
        0 => Bson::Double(rng.below(50) as f64 + 0.5),
        1 => Bson::Int64(rng.below(50) as i64),
        2 => Bson::String("n/a".into()),
        _ => Bson::Int32(rng.below(50) as i32),
    };
    d.insert("amount", amount);
    if rng.chance(70) {
        let tags: Vec<Bson> = (0..rng.below(3)).map(|_| Bson::String((*rng.pick(&["x", "y", "z"])).into())).collect();
        d.insert("tags", tags);
    }
    d
}

fn pipelines() -> Vec<Vec<Document>> {
    vec![
        vec![
            doc! {"$match": {"kind": "sale"}},
            doc! {"$group": {"_id": "$shop", "total": {"$sum": "$amount"}, "n": {"$sum": 1}, "avg": {"$avg": "$amount"}}},
            doc! {"$sort": {"total": -1, "_id": 1}},
            doc! {"$limit": 2},
        ],
        vec![doc! {"$group": {"_id": null, "n": {"$count": {}}, "hi": {"$max": "$amount"}, "lo": {"$min": "$amount"}}}],
        vec![
            doc! {"$match": {"amount": {"$gte": 10}}},
            doc! {"$unwind": {"path": "$tags", "preserveNullAndEmptyArrays": true}},
            doc! {"$group": {"_id": "$tags", "shops": {"$addToSet": "$shop"}}},
        ],
        vec![
            doc! {"$sort": {"amount": 1}},
            doc! {"$group": {"_id": "$kind", "first": {"$first": "$amount"}, "last": {"$last": "$_id"}}},
            doc! {"$match": {"last": {"$gte": 3}}},
        ],
        vec![
            doc! {"$match": {"shop": {"$in": ["a", "b"]}}},
            doc! {"$group": {"_id": {"s": "$shop", "k": "$kind"}, "total": {"$sum": "$amount"}}},
            doc! {"$project": {"total": 1}},
            doc! {"$skip": 1},
        ],
        vec![
            doc! {"$group": {"_id": {"$toUpper": "$shop"}, "big": {"$sum": {"$cond": [{"$gte": ["$amount", 25]}, 1, 0]}}}},
            doc! {"$sort": {"big": -1, "_id": -1}},
        ],
        // The first pipeline's core through other stages after $group: another view of it.
        vec![
            doc! {"$match": {"kind": "sale"}},
            doc! {"$group": {"_id": "$shop", "total": {"$sum": "$amount"}, "n": {"$sum": 1}, "avg": {"$avg": "$amount"}}},
            doc! {"$match": {"n": {"$gte": 2}}},
            doc! {"$project": {"avg": 1}},
        ],
        // Ties in the sort (broken by _id), and a skip.
        vec![
            doc! {"$group": {"_id": "$shop", "n": {"$sum": 1}}},
            doc! {"$sort": {"n": 1}},
            doc! {"$skip": 1},
            doc! {"$limit": 2},
        ],
    ]
}

struct Subscribed {
    template: usize,
    pipeline: Pipeline,
    live: LiveResult,
}

fn register(engine: &Engine, template: usize, stages: &[Document]) -> (QueryKey, Subscribed) {
    let stages: Vec<Bson> = stages.iter().cloned().map(Bson::Document).collect();
    let pipeline = Pipeline::parse(&stages).unwrap();
    let spec = QuerySpec { filter: first_match_source(&stages), ..Default::default() };
    let query = Query::compile(&spec).unwrap();
    let key = engine.reserve_key();
    let wire = WirePipeline::new(stages, Arc::new(pipeline.clone()));
    engine.register_pipeline_as(key, NS, &spec, &query, wire).unwrap();
    (key, Subscribed { template, pipeline, live: LiveResult::default() })
}

fn run_scenario(seed: u64, engine: &Engine, memory: &Arc<SharedMemory>) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let templates = pipelines();
    let mut subscribed: HashMap<QueryKey, Subscribed> = HashMap::new();
    // Each template once, the first twice: identical pipelines share a core.
    for (template, stages) in templates.iter().enumerate().chain([(0, &templates[0])]) {
        let (key, sub) = register(engine, template, stages);
        subscribed.insert(key, sub);
    }
    assert_eq!(engine.pipeline_cores(), templates.len() - 1, "the duplicate and template 6 share a core");
    let mut position = 0u64;
    for batch_no in 0..40 {
        let mut batch = Vec::new();
        {
            let mut state = memory.0.lock().unwrap();
            for _ in 0..1 + rng.below(6) {
                position += 1;
                let id = rng.below(20) as i32;
                let existing = state.get(NS, &Bson::Int32(id)).cloned();
                let (op, doc) = match existing {
                    None => (ChangeOp::Insert, Some(random_doc(&mut rng, id))),
                    Some(old) => match rng.below(4) {
                        0 => (ChangeOp::Delete, None),
                        1 => (ChangeOp::Replace, Some(random_doc(&mut rng, id))),
                        _ => {
                            let mut d = (*old).clone();
                            d.insert("amount", rng.below(50) as i32);
                            if rng.chance(30) {
                                d.insert("note", rng.below(3) as i32);
                            }
                            (ChangeOp::Update, Some(d))
                        }
                    },
                };
                let event = ChangeEvent {
                    position: position.into(),
                    ns: NS.into(),
                    op,
                    id: Bson::Int32(id),
                    doc: doc.map(Arc::new),
                };
                state.apply(&event);
                batch.push(event);
            }
        }
        // Some registrations read a snapshot ahead of the grid: before the batch is fed.
        let early = rng.chance(50);
        if early && rng.chance(35) {
            let template = rng.below(templates.len() as u64) as usize;
            let (key, sub) = register(engine, template, &templates[template]);
            subscribed.insert(key, sub);
        }
        engine.submit(batch).unwrap();
        if !early && rng.chance(35) {
            let template = rng.below(templates.len() as u64) as usize;
            let (key, sub) = register(engine, template, &templates[template]);
            subscribed.insert(key, sub);
        }
        if rng.chance(15) && !subscribed.is_empty() {
            let key = *subscribed.keys().min().unwrap();
            subscribed.remove(&key);
            engine.unregister(key).unwrap();
        }
        assert!(engine.settle(Duration::from_secs(30)), "engine did not settle (seed {seed})");
        while let Ok(event) = engine.messages().try_recv() {
            let EngineEvent::Messages(messages) = event else { continue };
            for message in messages {
                if let Some(sub) = subscribed.get_mut(&message.key) {
                    let message = message.frame.to_message("p", None);
                    if let ServerMessage::Delta(d) = &message {
                        assert!(d.position > sub.live.snapshot_position(), "a write applied twice");
                    }
                    sub.live.apply(&message).unwrap_or_else(|e| panic!("seed {seed}: {message:?}: {e}"));
                }
            }
        }
        // Template 6 is template 0 up to $group.
        let core_of = |template: usize| if template == 6 { 0 } else { template };
        let distinct: std::collections::HashSet<usize> = subscribed.values().map(|s| core_of(s.template)).collect();
        assert_eq!(engine.pipeline_cores(), distinct.len(), "one core per distinct pipeline");
        let state = memory.0.lock().unwrap();
        let docs: Vec<&Document> = state.documents(NS).collect();
        for sub in subscribed.values() {
            // As a client receives them: relaxed Extended JSON writes small int64s as plain
            // numbers, which read back as int32.
            let expected: Vec<Document> = sub
                .pipeline
                .evaluate(docs.iter().copied())
                .iter()
                .map(|d| extjson::document_from_json(extjson::document_to_relaxed_json(d)).unwrap())
                .collect();
            assert_eq!(sub.live.docs(), expected, "seed {seed}, batch {batch_no}: {:?}", sub.pipeline.after);
            assert!(sub.live.is_whole());
        }
    }
}

fn run_grid(shape: &str, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let memory = Arc::new(SharedMemory::default());
        let config = EngineConfig { shape: shape.parse::<GridShape>().unwrap(), retention: 64, ..Default::default() };
        let engine = Engine::start(config, memory.clone()).unwrap();
        run_scenario(seed, &engine, &memory);
        engine.shutdown();
    }
}

#[test]
fn pipelines_on_grid_1x1() {
    run_grid("1x1", 0..16);
}

#[test]
fn pipelines_on_grid_2x2() {
    run_grid("2x2", 100..108);
}

/// Pipelines registered before any write start from an empty result.
#[test]
fn an_empty_collection_has_no_groups() {
    let memory = Arc::new(SharedMemory::default());
    let engine = Engine::start(EngineConfig::default(), memory.clone()).unwrap();
    let (key, mut sub) = register(&engine, 1, &pipelines()[1]);
    assert!(engine.settle(Duration::from_secs(10)));
    // A pipeline's result leaves the view stage epochs after its registration's epoch is
    // processed: `Processed` events may come first.
    let first = loop {
        match engine.messages().recv_timeout(Duration::from_secs(10)).expect("a result within 10 s") {
            EngineEvent::Messages(messages) => {
                if let Some(first) = messages.into_iter().find(|m| m.key == key) {
                    break first;
                }
            }
            EngineEvent::Processed(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    sub.live.apply(&first.frame.to_message("p", None)).unwrap();
    assert!(sub.live.docs().is_empty());
    let _: MemoryState = memory.0.lock().unwrap().clone();
    engine.shutdown();
}
