//! The ACL leak test: users with different roles subscribe (sorted windows and unsorted
//! queries) while a writer inserts, changes, re-permissions and deletes documents with random
//! `_acl`s over REST. Every document any user receives (in a result or a delta) must be one
//! that user may read, and at checkpoints each user's result must equal the oracle: the query
//! over the documents that user may read, computed from the store.
//!
//! `LIVEGRID_ACL_SEED=<n>` runs one seed and `LIVEGRID_ACL_STEPS=<n>` sets the writes per seed
//! (default: seeds 1 and 2, 120 writes each).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bson::Document;
use livegrid::auth::{Principal, Rules, acl};
use livegrid::server::{AuthConfig, ServerConfig};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::{LiveResult, ServerMessage, extjson};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use common::{SECRET, Socket, http_response, next_within, send, server_with};

const NS: &str = "app.docs";
const IDS: i64 = 30;

fn token(user: &str, roles: &[&str]) -> String {
    common::token(user, roles, 3600)
}

fn random_acl(rng: &mut StdRng) -> Value {
    if rng.random_bool(0.2) {
        return Value::Null;
    }
    let names = ["user:u0", "user:u1", "user:u2", "user:u3", "role:staff", "role:guest", "authenticated", "*"];
    let read: Vec<&str> = names.into_iter().filter(|_| rng.random_bool(0.25)).collect();
    json!({"read": read, "write": ["role:writer"]})
}

fn random_doc(rng: &mut StdRng, id: i64) -> Value {
    let mut doc = json!({"_id": id, "a": rng.random_range(0..4), "rank": rng.random_range(0..50)});
    let acl = random_acl(rng);
    if !acl.is_null() {
        doc["_acl"] = acl;
    }
    doc
}

async fn call(addr: std::net::SocketAddr, method: &str, path: &str, token: &str, body: Value) -> (u16, String) {
    let body = body.to_string();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, _, body) = http_response(addr, request.as_bytes()).await;
    (status, body)
}

struct User {
    principal: Principal,
    socket: Socket,
    subs: BTreeMap<String, (QuerySpec, LiveResult)>,
}

/// Checks every document a message shows the user, then applies it.
fn receive(user: &mut User, message: ServerMessage, seed: u64) {
    let docs: Vec<&Document> = match &message {
        ServerMessage::Result(r) => r.docs.iter().collect(),
        ServerMessage::Delta(d) => d.doc.iter().collect(),
        other => panic!("seed {seed}: unexpected {other:?}"),
    };
    for doc in docs {
        assert!(
            acl::may_read(doc, &user.principal),
            "seed {seed}: {:?} received a document it may not read: {doc}",
            user.principal.user
        );
    }
    let id = match &message {
        ServerMessage::Result(r) => r.id.clone(),
        ServerMessage::Delta(d) => d.id.clone(),
        _ => unreachable!(),
    };
    user.subs.get_mut(&id).expect("a subscription").1.apply(&message).unwrap();
}

/// Waits until every user's every result equals the oracle over the store.
async fn checkpoint(server: &livegrid::server::RunningServer, users: &mut [User], seed: u64) {
    let store = server.store().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for user in users.iter_mut() {
            while let Some(message) = next_within(&mut user.socket, Duration::from_millis(20)).await {
                receive(user, message, seed);
            }
        }
        let all = store.read(NS, &Query::compile(&QuerySpec::default()).unwrap(), None).unwrap().docs;
        let mut mismatch = None;
        for user in users.iter() {
            let readable: Vec<Document> = all.iter().filter(|d| acl::may_read(d, &user.principal)).cloned().collect();
            for (id, (spec, live)) in &user.subs {
                let expected = Query::compile(spec).unwrap().evaluate(&readable);
                // An unsorted result has no order: compared as a set (by `_id`).
                let mut shown = live.docs().to_vec();
                if spec.sort.is_none() {
                    shown
                        .sort_by(|a, b| livegrid_matcher::compare_values(a.get("_id").unwrap(), b.get("_id").unwrap()));
                }
                if !live.is_whole() || shown != expected {
                    mismatch = Some(format!(
                        "{:?} {id}: live {:?}, expected {:?}",
                        user.principal.user,
                        live.docs(),
                        expected
                    ));
                }
            }
        }
        match mismatch {
            None => return,
            Some(m) => assert!(Instant::now() < deadline, "seed {seed}: {m}"),
        }
    }
}

async fn run_seed(seed: u64, steps: usize) {
    let rules = Rules::parse("[namespaces.\"app.*\"]\nread = \"authenticated\"\nwrite = [\"role:writer\"]\n").unwrap();
    let config = ServerConfig {
        auth: AuthConfig { secret: Some(SECRET.into()), public_key_pem: None, rules: Some(rules) },
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), config).await;
    let addr = server.addr;
    let mut rng = StdRng::seed_from_u64(seed);
    let writer = token("w", &["writer"]);
    let mut exists = std::collections::BTreeSet::new();
    for id in 0..IDS / 2 {
        assert_eq!(call(addr, "POST", "/v1/db/app/docs", &writer, random_doc(&mut rng, id)).await.0, 201);
        exists.insert(id);
    }
    let people: [(&str, &[&str]); 5] =
        [("u0", &["staff"]), ("u1", &["staff"]), ("u2", &[]), ("u3", &["guest"]), ("u4", &["guest", "staff"])];
    let queries = [
        json!({"filter": {"a": 1}}),
        json!({"sort": {"rank": 1}, "limit": 4}),
        json!({"filter": {"a": {"$gte": 1}}, "sort": {"rank": -1}, "skip": 1, "limit": 3}),
    ];
    let mut users = Vec::new();
    for (name, roles) in people {
        let url = format!("ws://{addr}/v1/ws?token={}", token(name, roles));
        let socket = tokio_tungstenite::connect_async(url).await.unwrap().0;
        let principal = Principal {
            user: Some(name.into()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            expires: None,
            via: None,
        };
        let mut user = User { principal, socket, subs: BTreeMap::new() };
        for (i, query) in queries.iter().enumerate() {
            let id = format!("q{i}");
            let mut message = query.clone();
            message["type"] = json!("subscribe");
            message["id"] = json!(id);
            message["ns"] = json!(NS);
            send(&mut user.socket, message).await;
            let part = |k: &str| query.get(k).map(|v| extjson::document_from_json(v.clone()).unwrap());
            let spec = QuerySpec {
                filter: part("filter").unwrap_or_default(),
                sort: part("sort"),
                skip: query["skip"].as_u64().unwrap_or(0),
                limit: query["limit"].as_u64(),
                projection: None,
            };
            user.subs.insert(id, (spec, LiveResult::default()));
        }
        users.push(user);
    }
    checkpoint(&server, &mut users, seed).await;
    for step in 0..steps {
        let id = rng.random_range(0..IDS);
        let path = format!("/v1/db/app/docs/{id}");
        let op = rng.random_range(0..6);
        let (status, body) = match op {
            // A new document is posted (a PUT to `/7` would create the string id "7").
            0 if !exists.contains(&id) => {
                call(addr, "POST", "/v1/db/app/docs", &writer, random_doc(&mut rng, id)).await
            }
            0 => call(addr, "PUT", &path, &writer, random_doc(&mut rng, id)).await,
            1 => call(addr, "DELETE", &path, &writer, Value::Null).await,
            2 => call(addr, "PATCH", &path, &writer, json!({"$set": {"_acl": random_acl(&mut rng)}})).await,
            3 => call(addr, "PATCH", &path, &writer, json!({"$unset": {"_acl": ""}})).await,
            _ => {
                let set = json!({"$set": {"a": rng.random_range(0..4), "rank": rng.random_range(0..50)}});
                call(addr, "PATCH", &path, &writer, set).await
            }
        };
        match (op, status) {
            (0, 201) => {
                exists.insert(id);
            }
            (1, 200) => {
                exists.remove(&id);
            }
            _ => {}
        }
        // A missing document (404) or one whose `_acl` does not admit the writer (403): fine.
        assert!([200, 201, 403, 404].contains(&status), "seed {seed} step {step}: status {status}: {body}");
        if step % 40 == 39 {
            checkpoint(&server, &mut users, seed).await;
        }
    }
    checkpoint(&server, &mut users, seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_user_ever_receives_a_document_it_may_not_read() {
    let seeds: Vec<u64> = match std::env::var("LIVEGRID_ACL_SEED") {
        Ok(seed) => vec![seed.parse().unwrap()],
        Err(_) => vec![1, 2],
    };
    let steps = std::env::var("LIVEGRID_ACL_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    for seed in seeds {
        run_seed(seed, steps).await;
    }
}
