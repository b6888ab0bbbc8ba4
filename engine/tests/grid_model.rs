//! Model-based tests of the grid: random write streams and random queries registered
//! mid-stream; at checkpoints, every subscription's messages applied to its initial result
//! must equal the query evaluated from scratch on the database state, on grids 1x1, 2x1,
//! 1x2, 2x2 and on a two-process grid.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, Document, doc};
use livegrid_engine::memory::{MemoryState, SharedMemory};
use livegrid_engine::{
    ChangeEvent, ChangeOp, ClusterConfig, Engine, EngineConfig, EngineError, EngineEvent, GridShape, QueryKey,
};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::{LiveResult, ServerMessage};

mod common;
use common::Rng;

fn random_doc(rng: &mut Rng, id: i32) -> Document {
    let mut d = doc! {"_id": id};
    if rng.chance(90) {
        d.insert("a", rng.below(5) as i32);
    }
    if rng.chance(85) {
        d.insert("b", *rng.pick(&["x", "y", "z"]));
    }
    d.insert(
        "n",
        if rng.chance(10) { Bson::Double(rng.below(20) as f64 + 0.5) } else { Bson::Int32(rng.below(20) as i32) },
    );
    if rng.chance(70) {
        let tags: Vec<Bson> = (0..rng.below(4)).map(|_| Bson::Int32(rng.below(4) as i32)).collect();
        d.insert("tags", tags);
    }
    if rng.chance(60) {
        d.insert("o", doc! {"p": rng.below(3) as i32});
    }
    d
}

fn random_leaf(rng: &mut Rng) -> Document {
    match rng.below(9) {
        0 => doc! {"a": rng.below(5) as i32},
        1 => doc! {"a": {"$gte": rng.below(5) as i32}},
        2 => doc! {"n": {"$lt": rng.below(20) as i32}},
        3 => doc! {"n": {"$gt": rng.below(10) as i32, "$lte": 10 + rng.below(10) as i32}},
        4 => doc! {"b": {"$in": ["x", *rng.pick(&["y", "z"])]}},
        5 => doc! {"tags": rng.below(4) as i32},
        6 => doc! {"o.p": rng.below(3) as i32},
        7 => doc! {"b": {"$ne": "x"}},
        _ => doc! {},
    }
}

fn random_query(rng: &mut Rng) -> QuerySpec {
    let mut filter = random_leaf(rng);
    if rng.chance(30) {
        filter = doc! {"$or": [random_leaf(rng), random_leaf(rng)]};
    } else if rng.chance(30) {
        let extra = random_leaf(rng);
        for (k, v) in extra {
            if !filter.contains_key(&k) {
                filter.insert(k, v);
            }
        }
    }
    let sorts = [None, Some(doc! {"n": 1}), Some(doc! {"n": -1, "a": 1}), Some(doc! {"b": 1}), Some(doc! {"tags": -1})];
    let sort = rng.pick(&sorts).clone();
    let windowed = sort.is_some() || rng.chance(20);
    let skip = if windowed && rng.chance(40) { rng.below(3) } else { 0 };
    let limit = if windowed && rng.chance(80) { Some(1 + rng.below(4)) } else { None };
    let projections = [None, None, Some(doc! {"n": 1, "b": 1}), Some(doc! {"tags": 0})];
    QuerySpec { filter, sort, skip, limit, projection: rng.pick(&projections).clone() }
}

/// A client's copy of one subscription, with the checks the model adds to the protocol's.
struct ClientCopy {
    query: Query,
    live: LiveResult,
}

impl ClientCopy {
    fn apply(&mut self, message: &ServerMessage) {
        if let ServerMessage::Result(r) = message {
            assert!(self.live.seq() == 0, "second result for {}", r.id);
        }
        if let ServerMessage::Delta(d) = message {
            // Writes at or below the snapshot position are never applied again.
            assert!(
                d.position > self.live.snapshot_position(),
                "{} got a delta at {} but its snapshot was at {}",
                d.id,
                d.position,
                self.live.snapshot_position()
            );
        }
        self.live.apply(message).unwrap_or_else(|e| panic!("{message:?}: {e}"));
        if let (Some(limit), ServerMessage::Delta(d)) = (self.query.limit, message) {
            assert!(self.live.docs().len() as u64 <= limit, "window of {} exceeds its limit after a delta", d.id);
        }
    }

    fn check(&self, name: &str, state: &MemoryState, ns: &str, context: &str) {
        let expected = self.query.evaluate(state.documents(ns));
        let mut got = self.live.docs().to_vec();
        if self.query.sort.is_empty() && !self.query.is_windowed() {
            got.sort_by(|a, b| livegrid_matcher::compare_values(a.get("_id").unwrap(), b.get("_id").unwrap()));
        }
        assert_eq!(got, expected, "subscription {name} diverged at {context}");
    }
}

/// Runs one random scenario on `engines` (the first feeds the grid; subscriptions are made
/// on any of them), checking at checkpoints.
fn run_scenario(seed: u64, engines: &[&Engine], memory: &Arc<SharedMemory>) {
    let engine = engines[0];
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let events_total = 240;
    let queries: Vec<(u64, String, QuerySpec)> = (0..24)
        .map(|i| {
            let ns = if rng.chance(85) { "db.c" } else { "db.other" };
            (rng.below(events_total), format!("{ns}/{i}"), random_query(&mut rng))
        })
        .collect();
    let mut registered: HashMap<QueryKey, (String, String)> = HashMap::new();
    let mut copies: HashMap<String, ClientCopy> = HashMap::new();
    let mut next_query = 0;
    let mut order: Vec<usize> = (0..queries.len()).collect();
    order.sort_by_key(|&i| queries[i].0);
    let mut position = 0u64;
    let mut fed = 0u64;
    let mut previous = MemoryState::default();
    let mut batch_no = 0;

    let register = |rng: &mut Rng,
                    i: usize,
                    stale: Option<&MemoryState>,
                    registered: &mut HashMap<QueryKey, (String, String)>,
                    copies: &mut HashMap<String, ClientCopy>| {
        let (_, name, spec) = &queries[i];
        let ns = name.split('/').next().unwrap();
        let query = Query::compile(spec).unwrap();
        let key = match stale {
            // Only the feeding process takes snapshots read elsewhere.
            Some(old) => {
                let snapshot = old.read(ns, &query, engine.window_capacity(&query));
                match engine.register_with_snapshot(ns, spec, snapshot) {
                    Ok(key) => key,
                    // Older than the retention buffer: read again, as callers do.
                    Err(EngineError::StaleSnapshot { .. }) => engine.register(ns, spec).unwrap(),
                    Err(e) => panic!("stale registration failed: {e}"),
                }
            }
            None => {
                let on = if engines.len() > 1 { *rng.pick(engines) } else { engine };
                on.register(ns, spec).unwrap()
            }
        };
        registered.insert(key, (name.clone(), ns.to_string()));
        copies.insert(name.clone(), ClientCopy { query, live: LiveResult::default() });
    };

    while fed < events_total {
        batch_no += 1;
        let size = 1 + rng.below(12).min(events_total - fed - 1);
        let mut batch = Vec::new();
        {
            let mut state = memory.0.lock().unwrap();
            previous = if rng.chance(50) { state.clone() } else { previous };
            for _ in 0..size {
                position += 1 + rng.below(3);
                let ns = if rng.chance(85) { "db.c" } else { "db.other" };
                let id = rng.below(16) as i32;
                let exists = state.get(ns, &Bson::Int32(id)).is_some();
                let (op, doc) = if !exists {
                    (ChangeOp::Insert, Some(random_doc(&mut rng, id)))
                } else {
                    match rng.below(4) {
                        0 => (ChangeOp::Delete, None),
                        1 => (ChangeOp::Replace, Some(random_doc(&mut rng, id))),
                        _ => {
                            let mut d = (**state.get(ns, &Bson::Int32(id)).unwrap()).clone();
                            d.insert("n", rng.below(20) as i32);
                            if rng.chance(50) {
                                d.insert("a", rng.below(5) as i32);
                            }
                            (ChangeOp::Update, Some(d))
                        }
                    }
                };
                let event = ChangeEvent {
                    position: position.into(),
                    ns: ns.into(),
                    op,
                    id: Bson::Int32(id),
                    doc: doc.map(Arc::new),
                };
                state.apply(&event);
                batch.push(event);
            }
        }
        fed += size;
        // Some registrations see a snapshot ahead of the grid: before the batch is fed.
        while next_query < order.len() && queries[order[next_query]].0 < fed && rng.chance(50) {
            register(&mut rng, order[next_query], None, &mut registered, &mut copies);
            next_query += 1;
        }
        engine.submit(batch).unwrap();
        while next_query < order.len() && queries[order[next_query]].0 < fed {
            let stale = rng.chance(40).then_some(&previous);
            register(&mut rng, order[next_query], stale, &mut registered, &mut copies);
            next_query += 1;
        }
        if rng.chance(5) && !registered.is_empty() {
            let key = *registered.keys().min().unwrap();
            let (name, _) = registered.remove(&key).unwrap();
            engines[livegrid_engine::home_process(key)].unregister(key).unwrap();
            copies.remove(&name);
        }
        if batch_no % 4 == 0 || fed >= events_total {
            // Subscriptions made on another process reach the grid through the feeding one,
            // and their windows are re-read there: catch up until a round in which nothing
            // moved (no message, no re-read) and each has its result.
            let mut rounds = 0;
            loop {
                let rereads: u64 = engines.iter().map(|e| e.rereads()).sum();
                let mut delivered = 0;
                assert!(engine.settle(Duration::from_secs(30)), "engine did not settle (seed {seed})");
                for other in &engines[1..] {
                    assert!(other.barrier(Duration::from_secs(30)), "process did not catch up (seed {seed})");
                }
                for (process, engine) in engines.iter().enumerate() {
                    while let Ok(event) = engine.messages().try_recv() {
                        let EngineEvent::Messages(batch) = event else { continue };
                        for message in batch {
                            delivered += 1;
                            assert_eq!(
                                livegrid_engine::home_process(message.key),
                                process,
                                "a message reached another process"
                            );
                            if let Some((name, _)) = registered.get(&message.key) {
                                copies.get_mut(name).unwrap().apply(&message.frame.to_message(name, None));
                            }
                        }
                    }
                }
                let waiting = registered.values().any(|(name, _)| copies[name].live.seq() == 0);
                let moved = delivered > 0 || engines.iter().map(|e| e.rereads()).sum::<u64>() != rereads;
                rounds += 1;
                if rounds > 1 && !waiting && !moved {
                    break;
                }
                assert!(rounds < 500, "subscriptions made on other processes got no result (seed {seed})");
                std::thread::sleep(Duration::from_millis(2));
            }
            let state = memory.0.lock().unwrap();
            for (name, ns) in registered.values() {
                copies[name].check(name, &state, ns, &format!("seed {seed}, position {position}"));
            }
        }
    }
}

fn run_grid(shape: &str, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let memory = Arc::new(SharedMemory::default());
        let config =
            EngineConfig { shape: shape.parse::<GridShape>().unwrap(), retention: 64, slack: 2, ..Default::default() };
        let engine = Engine::start(config, memory.clone()).unwrap();
        run_scenario(seed, &[&engine], &memory);
        engine.shutdown();
    }
}

#[test]
fn grid_1x1() {
    run_grid("1x1", 0..12);
}

#[test]
fn grid_2x1() {
    run_grid("2x1", 100..108);
}

#[test]
fn grid_1x2() {
    run_grid("1x2", 200..208);
}

#[test]
fn grid_2x2() {
    run_grid("2x2", 300..306);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Two timely processes on loopback, each with two workers of a 2x2 grid; subscriptions are
/// made on both, each process receives exactly its own subscriptions' messages and re-reads
/// its own drained windows (`LIVEGRID_TWO_PROCESS_SEEDS` seeds, 3 by default).
#[test]
fn grid_2x2_two_processes() {
    let seeds: u64 = std::env::var("LIVEGRID_TWO_PROCESS_SEEDS").map_or(3, |n| n.parse().unwrap());
    // Windows drained on process 1 are re-read there: at least one in these seeds.
    let mut remote_rereads = 0;
    for seed in 400..400 + seeds {
        let addresses = vec![format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())];
        let memory = Arc::new(SharedMemory::default());
        let shape: GridShape = "2x2".parse().unwrap();
        let config = |process| EngineConfig {
            shape,
            cluster: Some(ClusterConfig { process, addresses: addresses.clone() }),
            retention: 64,
            slack: 2,
            ..Default::default()
        };
        let other = {
            let memory = memory.clone();
            let config = config(1);
            std::thread::spawn(move || {
                let engine = Engine::start(config, memory).unwrap();
                assert!(!engine.feeds());
                engine
            })
        };
        let engine = Engine::start(config(0), memory.clone()).unwrap();
        let other = other.join().unwrap();
        run_scenario(seed, &[&engine, &other], &memory);
        remote_rereads += other.rereads();
        // A cluster stops together: the grid drains only once every process's input closes.
        let closing = std::thread::spawn(move || other.shutdown());
        engine.shutdown();
        closing.join().unwrap();
    }
    assert!(remote_rereads > 0, "no window was re-read on process 1");
}

/// Far more registrations forwarded at once than the feeding process's forward queue holds
/// (16 here; 1,024 by default): worker 0 waits for the queue rather than dropping or buffering
/// without bound, and every subscription gets its result and stays exact.
#[test]
fn forwarded_registrations_beyond_the_forward_queue() {
    let addresses = vec![format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())];
    let memory = Arc::new(SharedMemory::default());
    let mut rng = Rng(7);
    let mut position = 0u64;
    let mut write = |rng: &mut Rng, id: i32| {
        position += 1;
        let doc = random_doc(rng, id);
        let event = ChangeEvent {
            position: position.into(),
            ns: "db.c".into(),
            op: ChangeOp::Replace,
            id: Bson::Int32(id),
            doc: Some(Arc::new(doc)),
        };
        memory.0.lock().unwrap().apply(&event);
        event
    };
    let seed: Vec<ChangeEvent> = (0..100).map(|id| write(&mut rng, id)).collect();
    let shape: GridShape = "1x2".parse().unwrap();
    let config = |process| EngineConfig {
        shape,
        cluster: Some(ClusterConfig { process, addresses: addresses.clone() }),
        forward_capacity: 16,
        ..Default::default()
    };
    let other = {
        let (memory, config) = (memory.clone(), config(1));
        std::thread::spawn(move || Engine::start(config, memory).unwrap())
    };
    let engine = Engine::start(config(0), memory.clone()).unwrap();
    let other = Arc::new(other.join().unwrap());
    engine.submit(seed).unwrap();
    assert!(engine.settle(Duration::from_secs(30)));
    // Process 1's messages, drained as they come.
    let results: Arc<std::sync::Mutex<HashMap<QueryKey, LiveResult>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let (other, results, stop) = (other.clone(), results.clone(), stop.clone());
        std::thread::spawn(move || {
            // Until stopped, then what is left.
            loop {
                let stopping = stop.load(std::sync::atomic::Ordering::Acquire);
                let event = match other.messages().recv_timeout(Duration::from_millis(10)) {
                    Ok(event) => event,
                    Err(_) if stopping => break,
                    Err(_) => continue,
                };
                let EngineEvent::Messages(batch) = event else { continue };
                let mut results = results.lock().unwrap();
                for message in batch {
                    let live = results.entry(message.key).or_default();
                    live.apply(&message.frame.to_message("q", None)).unwrap();
                }
            }
        })
    };
    let subscriptions: Vec<(QueryKey, Query)> = (0..1_500)
        .map(|i| {
            let spec = if i % 5 == 0 {
                QuerySpec { sort: Some(doc! {"n": -1}), limit: Some(1 + i % 4), ..Default::default() }
            } else {
                QuerySpec { filter: doc! {"n": {"$gte": (i % 20) as i32}}, ..Default::default() }
            };
            (other.register("db.c", &spec).unwrap(), Query::compile(&spec).unwrap())
        })
        .collect();
    for _ in 0..5 {
        let batch: Vec<ChangeEvent> = (0..20)
            .map(|_| {
                let id = rng.below(100) as i32;
                write(&mut rng, id)
            })
            .collect();
        engine.submit(batch).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(engine.settle(Duration::from_secs(60)));
        assert!(other.barrier(Duration::from_secs(60)));
        let whole = {
            let results = results.lock().unwrap();
            subscriptions.iter().all(|(key, _)| results.get(key).is_some_and(|r| r.seq() > 0))
        };
        if whole {
            // Once more, for the deltas behind the last results: then every message is in the
            // output, and the drain ends once it has taken them all.
            assert!(other.barrier(Duration::from_secs(60)));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "forwarded registrations got no result");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    drain.join().unwrap();
    let state = memory.0.lock().unwrap();
    let results = results.lock().unwrap();
    for (key, query) in &subscriptions {
        let mut got = results[key].docs().to_vec();
        if query.sort.is_empty() {
            got.sort_by(|a, b| livegrid_matcher::compare_values(a.get("_id").unwrap(), b.get("_id").unwrap()));
        }
        assert_eq!(got, query.evaluate(state.documents("db.c")), "subscription {key} diverged");
    }
    drop(state);
    let other = Arc::into_inner(other).unwrap();
    let closing = std::thread::spawn(move || other.shutdown());
    engine.shutdown();
    closing.join().unwrap();
}
