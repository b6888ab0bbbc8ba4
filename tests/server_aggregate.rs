//! Aggregation pipelines over real connections. `POST /v1/db/{db}/{coll}/_aggregate`: a
//! pipeline run once over the embedded store, with the same semantics as the matcher's
//! (checked against `Pipeline::evaluate` on what was written), clear refusals naming
//! unsupported stages, and object ACLs applied to what it reads. Live pipelines over
//! WebSockets: the result built from the deltas follows random writes (compared with
//! `_aggregate` after each), resumes with exactly the missed deltas, counts only what the
//! subscriber may read, and bad pipelines get specific errors.

use std::time::Duration;

use bson::Bson;
use livegrid::server::{AuthConfig, ServerConfig};
use livegrid_matcher::Pipeline;
use livegrid_protocol::{ErrorCode, LiveResult, ServerMessage, extjson};
use serde_json::{Value, json};

mod common;
use common::{SECRET, Socket, connect, http, http_as, next, next_within, send, server_with, token, xorshift};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_run_once_over_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), ServerConfig::default()).await;
    let addr = server.addr;
    let mut written = Vec::new();
    for i in 0..30 {
        let doc = json!({"_id": i, "room": format!("r{}", i % 4), "len": i * 3 % 7, "at": {"$date": format!("2026-0{}-01T00:00:00Z", 1 + i % 3)}});
        assert_eq!(http(addr, "POST", "/v1/db/chat/messages", Some(doc.clone())).await.0, 201);
        written.push(extjson::parse_document(&doc.to_string()).unwrap());
    }
    let pipeline = json!([
        {"$match": {"len": {"$gte": 1}}},
        {"$group": {"_id": {"room": "$room", "month": {"$month": "$at"}}, "n": {"$count": {}}, "avg": {"$avg": "$len"}, "longest": {"$max": "$len"}}},
        {"$sort": {"n": -1, "_id.room": 1}},
        {"$limit": 5},
    ]);
    let (status, body) =
        http(addr, "POST", "/v1/db/chat/messages/_aggregate", Some(json!({"pipeline": pipeline}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["position"], 30);
    let stages: Vec<Bson> = match extjson::value_from_json(pipeline).unwrap() {
        Bson::Array(stages) => stages,
        _ => unreachable!(),
    };
    let expected: Vec<Value> =
        Pipeline::parse(&stages).unwrap().evaluate(&written).iter().map(extjson::document_to_relaxed_json).collect();
    assert_eq!(body["docs"], Value::Array(expected));
    assert_eq!(body["docs"].as_array().unwrap().len(), 5);

    // Refusals name what is wrong; the server goes on.
    let refused = |pipeline: Value| async move {
        let (status, body) =
            http(addr, "POST", "/v1/db/chat/messages/_aggregate", Some(json!({"pipeline": pipeline}))).await;
        (
            status,
            body["code"].as_str().unwrap_or_default().to_string(),
            body["message"].as_str().unwrap_or_default().to_string(),
        )
    };
    let (status, code, message) = refused(json!([{"$lookup": {"from": "users"}}, {"$group": {"_id": null}}])).await;
    assert_eq!((status, code.as_str()), (400, "unsupported_stage"));
    assert!(message.contains("$lookup"), "{message}");
    let (status, code, _) = refused(json!([{"$group": {"_id": null, "x": {"$sum": 1, "$avg": 2}}}])).await;
    assert_eq!((status, code.as_str()), (400, "bad_pipeline"));
    let (status, body) = http(addr, "POST", "/v1/db/chat/messages/_aggregate", Some(json!({"stages": []}))).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_pipeline")));
    assert_eq!(http(addr, "GET", "/healthz", None).await.0, 200);
}

/// A server where any authenticated user may read and write `app.*`, object ACLs deciding
/// which documents.
async fn server_with_acls(dir: &std::path::Path) -> livegrid::server::RunningServer {
    let rules =
        livegrid::auth::Rules::parse("[namespaces.\"app.*\"]\nread = \"authenticated\"\nwrite = \"authenticated\"\n")
            .unwrap();
    let config = ServerConfig {
        auth: AuthConfig { secret: Some(SECRET.into()), public_key_pem: None, rules: Some(rules) },
        ..Default::default()
    };
    server_with(dir, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_count_only_what_the_caller_may_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_acls(dir.path()).await;
    let (alice, bob) = (token("alice", &[], 600), token("bob", &[], 600));
    for (i, reader) in [(1, "user:alice"), (2, "user:alice"), (3, "user:bob"), (4, "*")] {
        let doc = json!({"_id": i, "v": i, "_acl": {"read": [reader], "write": ["*"]}});
        assert_eq!(http_as(server.addr, "POST", "/v1/db/app/items", Some(&alice), Some(doc)).await.0, 201);
    }
    let pipeline = json!({"pipeline": [{"$group": {"_id": null, "n": {"$count": {}}, "sum": {"$sum": "$v"}}}]});
    let sum = |who: String| {
        let pipeline = pipeline.clone();
        async move {
            let (_, _, body) =
                http_as(server.addr, "POST", "/v1/db/app/items/_aggregate", Some(&who), Some(pipeline)).await;
            body["docs"].clone()
        }
    };
    assert_eq!(sum(alice.clone()).await, json!([{"_id": null, "n": 3, "sum": 7}]));
    assert_eq!(sum(bob.clone()).await, json!([{"_id": null, "n": 2, "sum": 7}]));
    let (status, _, _) =
        http_as(server.addr, "POST", "/v1/db/app/items/_aggregate", None, Some(pipeline.clone())).await;
    assert_eq!(status, 401);
}

/// The live result's documents as relaxed Extended JSON, as `_aggregate` answers them.
fn shown(live: &LiveResult) -> Value {
    Value::Array(live.docs().iter().map(extjson::document_to_relaxed_json).collect())
}

/// Applies messages until the live result equals `_aggregate`'s answer (within 10 s).
async fn catch_up(socket: &mut Socket, live: &mut LiveResult, addr: std::net::SocketAddr, pipeline: &Value) {
    let (status, body) = http(addr, "POST", "/v1/db/shop/sales/_aggregate", Some(json!({"pipeline": pipeline}))).await;
    assert_eq!(status, 200, "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while shown(live) != body["docs"] {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(message) = next_within(socket, wait).await else {
            panic!("live result {} never reached {}", shown(live), body["docs"]);
        };
        live.apply(&message).unwrap_or_else(|e| panic!("{message:?}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_pipelines_follow_writes_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), ServerConfig::default()).await;
    let addr = server.addr;
    let leaderboard = json!([
        {"$match": {"kind": "sale"}},
        {"$group": {"_id": "$shop", "total": {"$sum": "$amount"}, "n": {"$count": {}}}},
        {"$sort": {"total": -1, "_id": 1}},
        {"$limit": 3},
    ]);
    let mut socket = connect(addr).await;
    send(&mut socket, json!({"type": "subscribe", "id": "top", "ns": "shop.sales", "pipeline": leaderboard})).await;
    let mut live = LiveResult::default();
    let first = next(&mut socket).await;
    let ServerMessage::Result(result) = &first else { panic!("expected a result, got {first:?}") };
    let token = result.token.clone().expect("a resume token");
    live.apply(&first).unwrap();
    assert!(live.docs().is_empty());

    let mut random = xorshift(7);
    let write = |random: &mut dyn FnMut(u64) -> u64| {
        let id = random(12);
        let doc = json!({"kind": if random(4) == 0 { "refund" } else { "sale" }, "shop": format!("s{}", random(5)), "amount": random(100)});
        match random(3) {
            0 => ("DELETE", format!("/v1/db/shop/sales/{id}"), None),
            _ => ("PUT", format!("/v1/db/shop/sales/{id}"), Some(doc)),
        }
    };
    for _ in 0..40 {
        let (method, path, body) = write(&mut random);
        let status = http(addr, method, &path, body).await.0;
        assert!([200, 201, 204, 404].contains(&status), "{method} {path}: {status}");
        catch_up(&mut socket, &mut live, addr, &leaderboard).await;
    }
    assert!(!live.docs().is_empty());

    // The connection drops; writes go on; the resumed subscription gets exactly the missed
    // deltas, numbered on.
    let seq = live.seq();
    drop(socket);
    for _ in 0..10 {
        let (method, path, body) = write(&mut random);
        http(addr, method, &path, body).await;
    }
    let mut socket = connect(addr).await;
    send(
        &mut socket,
        json!({"type": "subscribe", "id": "top", "ns": "shop.sales", "pipeline": leaderboard, "resume": {"token": token, "seq": seq}}),
    )
    .await;
    catch_up(&mut socket, &mut live, addr, &leaderboard).await;
    assert!(live.seq() > seq, "the missed writes changed the leaderboard");

    // Bad pipelines get specific errors; the connection and the server go on.
    let refused = [
        (json!({"pipeline": [{"$lookup": {"from": "users"}}, {"$group": {"_id": null}}]}), ErrorCode::UnsupportedStage),
        (json!({"pipeline": [{"$group": {"_id": null, "x": {"$median": "$a"}}}]}), ErrorCode::UnsupportedStage),
        (json!({"pipeline": [{"$group": {"_id": "$a"}}, {"$project": {"_id": 0}}]}), ErrorCode::BadPipeline),
        (json!({"pipeline": [{"$match": {"a": {"$frob": 1}}}, {"$group": {"_id": null}}]}), ErrorCode::BadPipeline),
        (json!({"pipeline": [{"$group": {"_id": null}}], "filter": {"a": 1}}), ErrorCode::BadPipeline),
        (json!({"pipeline": [{"$match": {}}]}), ErrorCode::BadPipeline),
    ];
    for (i, (body, code)) in refused.into_iter().enumerate() {
        let mut message = json!({"type": "subscribe", "id": format!("bad{i}"), "ns": "shop.sales"});
        message.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        send(&mut socket, message).await;
        match next(&mut socket).await {
            ServerMessage::Error(e) => assert_eq!((e.id, e.code), (Some(format!("bad{i}")), code), "{}", e.message),
            other => panic!("expected an error, got {other:?}"),
        }
    }
    http(addr, "PUT", "/v1/db/shop/sales/99", Some(json!({"kind": "sale", "shop": "zz", "amount": 1000}))).await;
    catch_up(&mut socket, &mut live, addr, &leaderboard).await;
    assert_eq!(live.docs()[0].get_str("_id").unwrap(), "zz");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_pipelines_count_only_what_the_subscriber_may_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_acls(dir.path()).await;
    let alice = token("alice", &[], 600);
    let mut socket = connect(server.addr).await;
    send(&mut socket, json!({"type": "auth", "token": token("bob", &[], 600)})).await;
    let pipeline = json!([{"$group": {"_id": null, "n": {"$count": {}}, "sum": {"$sum": "$v"}}}]);
    send(&mut socket, json!({"type": "subscribe", "id": "n", "ns": "app.items", "pipeline": pipeline})).await;
    let mut live = LiveResult::default();
    live.apply(&next(&mut socket).await).unwrap();
    for (i, reader) in [(1, "user:alice"), (2, "user:bob"), (3, "user:alice"), (4, "*")] {
        let doc = json!({"_id": i, "v": i, "_acl": {"read": [reader], "write": ["*"]}});
        assert_eq!(http_as(server.addr, "POST", "/v1/db/app/items", Some(&alice), Some(doc)).await.0, 201);
    }
    // Bob may read 2 and 4 only: his count goes through these states and no other.
    let states = [json!([]), json!([{"_id": null, "n": 1, "sum": 2}]), json!([{"_id": null, "n": 2, "sum": 6}])];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while shown(&live) != states[2] {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        let message = next_within(&mut socket, wait).await.unwrap_or_else(|| panic!("stuck at {}", shown(&live)));
        live.apply(&message).unwrap();
        assert!(states.contains(&shown(&live)), "bob saw {}", shown(&live));
    }
    assert!(next_within(&mut socket, Duration::from_millis(300)).await.is_none(), "alice's writes reached bob");
}
