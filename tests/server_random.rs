//! A randomized end-to-end run against the real server on loopback: random queries of every
//! kind (equality, ranges, `$in`, `$or`, arrays, regexes, `$exists`, sorted windows with skip
//! and limit, projections), writers on REST (inserts, replacements, updates, deletes, bulk
//! batches), and clients that subscribe, unsubscribe, drop their connection and resume, or
//! switch networks mid-stream (resume on a new connection while the old one is still open).
//! At checkpoints every client's copy of every result must equal a REST query of the same
//! query.
//!
//! `LIVEGRID_RANDOM_SEED=<n>` runs one seed, `LIVEGRID_RANDOM_STEPS=<n>` sets the steps per
//! seed (default: seeds 1, 2, 3 with 150 steps each), `LIVEGRID_RANDOM_TRACE=1` prints every
//! message. Found by it: a resume arriving late on a connection the client had already left
//! pulled the subscription back onto the dead connection (now refused, see the hub).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Socket, connect, http, next_within, send, server_with};
use livegrid::server::ServerConfig;
use livegrid_protocol::{LiveResult, ServerMessage, extjson};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const NS_PATH: &str = "/v1/db/fz/items";
const IDS: i64 = 40;

/// One subscription as its client holds it.
struct Sub {
    query: Value,
    live: LiveResult,
    token: Option<String>,
}

/// A client: its connection and its subscriptions.
struct Client {
    socket: Socket,
    subs: BTreeMap<String, Sub>,
}

fn random_doc(rng: &mut StdRng, id: i64) -> Value {
    let mut doc = json!({"_id": id, "a": rng.random_range(0..8), "s": rng.random_range(0..100)});
    if rng.random_bool(0.8) {
        let b = ["x", "y", "z", "xa"][rng.random_range(0..4)];
        doc["b"] = json!(b);
    }
    let tags: Vec<&str> = ["t1", "t2", "t3"].into_iter().filter(|_| rng.random_bool(0.4)).collect();
    doc["tags"] = json!(tags);
    doc
}

fn random_query(rng: &mut StdRng) -> Value {
    let k = rng.random_range(0..8);
    let filter = match rng.random_range(0..10) {
        0 => json!({}),
        1 => json!({"a": k}),
        2 => json!({"a": {"$gt": k}}),
        3 => json!({"a": {"$gte": k, "$lt": k + 3}}),
        4 => json!({"b": {"$in": ["x", "y"]}}),
        5 => json!({"tags": "t1"}),
        6 => json!({"$or": [{"a": k}, {"b": "z"}]}),
        7 => json!({"b": {"$regex": "^x"}}),
        8 => json!({"b": {"$exists": false}}),
        _ => json!({"tags": {"$size": 2}}),
    };
    let mut query = json!({"ns": "fz.items", "filter": filter});
    match rng.random_range(0..3) {
        0 => {}
        1 => query["sort"] = json!({"s": 1}),
        _ => query["sort"] = json!({"a": -1, "s": 1}),
    }
    if query.get("sort").is_some() && rng.random_bool(0.7) {
        query["limit"] = json!(rng.random_range(1..6));
        query["skip"] = json!(rng.random_range(0..3));
    }
    match rng.random_range(0..4) {
        0 => query["projection"] = json!({"a": 1, "s": 1}),
        1 => query["projection"] = json!({"tags": 0}),
        _ => {}
    }
    query
}

async fn random_write(rng: &mut StdRng, addr: SocketAddr) {
    let id = rng.random_range(0..IDS);
    let path = format!("{NS_PATH}/{id}");
    let (status, body) = match rng.random_range(0..7) {
        0 | 1 => http(addr, "POST", NS_PATH, Some(random_doc(rng, id))).await,
        2 => {
            let mut doc = random_doc(rng, id);
            doc.as_object_mut().unwrap().remove("_id");
            http(addr, "PUT", &path, Some(doc)).await
        }
        3 => {
            let update = match rng.random_range(0..4) {
                0 => json!({"$set": {"a": rng.random_range(0..8)}}),
                1 => json!({"$inc": {"s": rng.random_range(-20..20)}}),
                2 => {
                    let tag = ["t1", "t2", "t3"][rng.random_range(0..3)];
                    json!({"$push": {"tags": tag}})
                }
                _ => json!({"$unset": {"b": ""}}),
            };
            http(addr, "PATCH", &path, Some(update)).await
        }
        4 => http(addr, "DELETE", &path, None).await,
        _ => {
            let writes: Vec<Value> = (0..3)
                .map(|_| {
                    let id = rng.random_range(IDS..IDS * 2);
                    if rng.random_bool(0.5) {
                        json!({"replace": {"_id": id, "doc": random_doc(rng, id)}})
                    } else {
                        json!({"update": {"_id": id, "update": {"$set": {"s": rng.random_range(0..100)}}}})
                    }
                })
                .collect();
            http(addr, "POST", &format!("{NS_PATH}/_bulk"), Some(json!({"writes": writes}))).await
        }
    };
    // Duplicates and missing documents are expected answers; anything else is not.
    assert!(matches!(status, 200 | 201 | 404 | 409), "write failed: {status} {body}");
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// The query's result by REST, as relaxed JSON documents.
async fn expected(addr: SocketAddr, query: &Value) -> Vec<Value> {
    let mut url = format!("{NS_PATH}?filter={}", encode(&query["filter"].to_string()));
    for part in ["sort", "projection"] {
        if let Some(value) = query.get(part) {
            url += &format!("&{part}={}", encode(&value.to_string()));
        }
    }
    for part in ["skip", "limit"] {
        if let Some(value) = query.get(part) {
            url += &format!("&{part}={value}");
        }
    }
    let (status, body) = http(addr, "GET", &url, None).await;
    assert_eq!(status, 200, "{body}");
    body["docs"].as_array().unwrap().clone()
}

/// Applies one message to the client's copies; messages of unknown subscriptions (ended)
/// are ignored.
fn apply(client: &mut Client, message: ServerMessage, context: &str) {
    let id = match &message {
        ServerMessage::Result(r) => r.id.clone(),
        ServerMessage::Delta(d) => d.id.clone(),
        ServerMessage::Error(e) => panic!("{context}: unexpected error {e:?}"),
        ServerMessage::Invalidate(i) => panic!("{context}: unexpected invalidation {i:?}"),
        ServerMessage::Pong => return,
    };
    if trace() {
        eprintln!("trace {context} {}", serde_json::to_string(&message).unwrap().chars().take(300).collect::<String>());
    }
    let Some(sub) = client.subs.get_mut(&id) else { return };
    if let ServerMessage::Result(r) = &message {
        sub.token = r.token.clone();
    }
    if let Err(e) = sub.live.apply(&message) {
        panic!("{context}: subscription {id}: {e} (query {})", sub.query);
    }
}

/// Reads and applies whatever arrives within `quiet`.
async fn drain(client: &mut Client, quiet: Duration, context: &str) {
    while let Some(message) = next_within(&mut client.socket, quiet).await {
        apply(client, message, context);
    }
}

fn as_json(docs: &[bson::Document]) -> Vec<Value> {
    docs.iter().map(extjson::document_to_relaxed_json).collect()
}

fn same(query: &Value, mut got: Vec<Value>, mut want: Vec<Value>) -> bool {
    if query.get("sort").is_none() {
        got.sort_by_key(|d| d.to_string());
        want.sort_by_key(|d| d.to_string());
    }
    got == want
}

/// Every copy of every client equals the REST result, within 15 s.
async fn checkpoint(addr: SocketAddr, clients: &mut [Client], seed: u64, step: usize) {
    for (c, client) in clients.iter_mut().enumerate() {
        let ids: Vec<String> = client.subs.keys().cloned().collect();
        for id in ids {
            let query = client.subs[&id].query.clone();
            let want = expected(addr, &query).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let got = as_json(client.subs[&id].live.docs());
                if same(&query, got.clone(), want.clone()) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "seed {seed} step {step}: client {c} subscription {id} diverged\nquery {query}\n got {got:?}\nwant {want:?}"
                );
                if let Some(message) = next_within(&mut client.socket, Duration::from_millis(50)).await {
                    apply(client, message, "checkpoint");
                }
            }
        }
    }
}

/// Resubscribes every subscription in `subs` on `socket`, resuming where it left off.
async fn resume_all(subs: &BTreeMap<String, Sub>, socket: &mut Socket) {
    for (id, sub) in subs {
        let mut message = sub.query.clone();
        message["type"] = json!("subscribe");
        message["id"] = json!(id);
        if let Some(token) = &sub.token {
            message["resume"] = json!({"token": token, "seq": sub.live.seq()});
        }
        if trace() {
            eprintln!("trace resume {message}");
        }
        send(socket, message).await;
    }
}

async fn run(seed: u64, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let config =
        ServerConfig { window_slack: 1, resume_buffer: 16, resume_grace: Duration::from_secs(5), ..Default::default() };
    let server = server_with(dir.path(), config).await;
    let addr = server.addr;
    let mut rng = StdRng::seed_from_u64(seed);
    for id in 0..IDS / 2 {
        http(addr, "POST", NS_PATH, Some(random_doc(&mut rng, id))).await;
    }
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client { socket: connect(addr).await, subs: BTreeMap::new() });
    }
    let mut next_sub = 0;
    for step in 0..steps {
        let c = rng.random_range(0..clients.len());
        match rng.random_range(0..100) {
            0..55 => random_write(&mut rng, addr).await,
            55..70 => {
                let query = random_query(&mut rng);
                let id = format!("q{next_sub}");
                next_sub += 1;
                let mut message = query.clone();
                message["type"] = json!("subscribe");
                message["id"] = json!(id);
                clients[c].subs.insert(id, Sub { query, live: LiveResult::default(), token: None });
                send(&mut clients[c].socket, message).await;
            }
            70..76 => {
                if let Some(id) = clients[c].subs.keys().next().cloned() {
                    clients[c].subs.remove(&id);
                    send(&mut clients[c].socket, json!({"type": "unsubscribe", "id": id})).await;
                }
            }
            76..82 => {
                // The connection drops without a goodbye; the client reconnects and resumes.
                let client = &mut clients[c];
                client.socket = connect(addr).await;
                resume_all(&client.subs, &mut client.socket).await;
            }
            82..88 => {
                // A network switch: read what the old connection has, resume on a new one
                // while the old one is still open; the old one then says goodbye.
                drain(&mut clients[c], Duration::from_millis(30), "before switch").await;
                let mut socket = connect(addr).await;
                resume_all(&clients[c].subs, &mut socket).await;
                let mut old = std::mem::replace(&mut clients[c].socket, socket);
                if let Some(id) = clients[c].subs.keys().next().cloned() {
                    // A stale unsubscribe from the old connection must not end the moved one.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    send(&mut old, json!({"type": "unsubscribe", "id": id})).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(old);
            }
            88..96 => drain(&mut clients[c], Duration::from_millis(5), "drain").await,
            _ => checkpoint(addr, &mut clients, seed, step).await,
        }
    }
    checkpoint(addr, &mut clients, seed, steps).await;
    server.shutdown().await;
}

/// Whether to print every message and resume (`LIVEGRID_RANDOM_TRACE=1`), for debugging a seed.
fn trace() -> bool {
    std::env::var("LIVEGRID_RANDOM_TRACE").is_ok()
}

fn seeds() -> Vec<u64> {
    match std::env::var("LIVEGRID_RANDOM_SEED") {
        Ok(seed) => vec![seed.parse().expect("LIVEGRID_RANDOM_SEED is a number")],
        Err(_) => vec![1, 2, 3],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_clients_always_converge_to_the_database() {
    let steps = std::env::var("LIVEGRID_RANDOM_STEPS").map(|s| s.parse().expect("a number")).unwrap_or(150);
    for seed in seeds() {
        run(seed, steps).await;
    }
}
