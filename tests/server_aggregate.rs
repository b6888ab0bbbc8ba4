//! `POST /v1/db/{db}/{coll}/_aggregate`: a pipeline run once over the embedded store, with the
//! same semantics as the matcher's (checked against `Pipeline::evaluate` on what was written),
//! clear refusals naming unsupported stages, and object ACLs applied to what it reads.

use bson::Bson;
use livegrid::server::{AuthConfig, ServerConfig};
use livegrid_matcher::Pipeline;
use livegrid_protocol::extjson;
use serde_json::{Value, json};

mod common;
use common::{SECRET, http, http_as, server_with, token};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_count_only_what_the_caller_may_read() {
    let dir = tempfile::tempdir().unwrap();
    let rules =
        livegrid::auth::Rules::parse("[namespaces.\"app.*\"]\nread = \"authenticated\"\nwrite = \"authenticated\"\n")
            .unwrap();
    let config = ServerConfig {
        auth: AuthConfig { secret: Some(SECRET.into()), public_key_pem: None, rules: Some(rules) },
        ..Default::default()
    };
    let server = server_with(dir.path(), config).await;
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
