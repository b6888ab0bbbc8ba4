//! `serve --mongodb`: the real `mongodb` driver against the wire-level fixture
//! (`tests/common/mongo_fixture.rs`), over real WebSockets. Subscriptions see the writes of
//! another client, initial results come from snapshot `find`s, a transaction arrives whole,
//! an update whose document is already gone removes it, a resumable error mid-stream is
//! survived, and the resume token is checkpointed in the data directory.

use std::collections::BTreeMap;
use std::time::Duration;

use bson::{Document, doc};
use livegrid::server::{ServerConfig, SourceChoice};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::{LiveResult, ServerMessage};
use serde_json::json;

mod common;
use common::mongo_fixture::{Fault, MongoFixture, Write};
use common::{Socket, apply_message, connect, next_within, send, server_with, settle, subscribe};

const NS: &str = "app.items";

/// A server in this process following the fixture, watching `watch`; the directory holds its
/// data and lives as long as the returned guard.
async fn serve_on(fixture: &MongoFixture, watch: &str) -> (tempfile::TempDir, livegrid::server::RunningServer) {
    serve_uri(&fixture.uri(), watch).await
}

/// A server in this process following the deployment at `uri`, watching `watch`.
async fn serve_uri(uri: &str, watch: &str) -> (tempfile::TempDir, livegrid::server::RunningServer) {
    serve_source(SourceChoice::Mongo {
        uri: uri.into(),
        watch: vec![watch.into()],
        skip_undecodable: false,
        full_document: Default::default(),
    })
    .await
}

/// A server in this process on `source`, its data in a directory that lives as long as the
/// returned guard.
async fn serve_source(source: SourceChoice) -> (tempfile::TempDir, livegrid::server::RunningServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir.path().join("data"), ServerConfig { source, ..Default::default() }).await;
    (dir, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_queries_follow_the_change_stream() {
    let fixture = MongoFixture::start();
    for i in 0..5 {
        fixture.insert(NS, doc! { "_id": i, "n": i, "tag": "a" });
    }
    fixture.insert("other.items", doc! { "_id": 1, "n": 100 });
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let source = SourceChoice::Mongo {
        uri: fixture.uri(),
        watch: vec![NS.into()],
        skip_undecodable: false,
        full_document: Default::default(),
    };
    let server = server_with(&data, ServerConfig { source, ..Default::default() }).await;

    let mut socket = connect(server.addr).await;
    let queries = [
        ("all", json!({})),
        ("high", json!({"filter": {"n": {"$gte": 3}}})),
        ("top", json!({"sort": {"n": -1}, "limit": 2})),
    ];
    // A snapshot MongoDB cannot serve yet is read again, not reported as a failure.
    fixture.inject(Fault::SnapshotUnavailable);
    subscribe(&mut socket, NS, &queries).await;
    let mut live = BTreeMap::new();
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;

    // Another client writes: inserts, updates, replaces, deletes.
    fixture.insert(NS, doc! { "_id": 10, "n": 10, "tag": "b" });
    fixture.update(NS, doc! { "_id": 0, "n": 7, "tag": "a" });
    fixture.replace(NS, doc! { "_id": 1, "n": -1 });
    fixture.delete(NS, 4);
    fixture.insert("other.items", doc! { "_id": 2, "n": 200 });
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;

    // `_id`s of every BSON type work end to end: ObjectIds, strings, documents, doubles.
    let oid = bson::oid::ObjectId::new();
    fixture.insert(NS, doc! { "_id": oid, "n": 40 });
    fixture.insert(NS, doc! { "_id": "s", "n": 41 });
    fixture.insert(NS, doc! { "_id": { "a": 1, "b": "x" }, "n": 42 });
    fixture.insert(NS, doc! { "_id": 1.5, "n": 43 });
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    fixture.update(NS, doc! { "_id": oid, "n": 44 });
    fixture.delete(NS, "s");
    fixture.delete(NS, doc! { "a": 1, "b": "x" });
    fixture.update(NS, doc! { "_id": 1.5, "n": 2 });
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;

    // A transaction: its events share a cluster time and arrive together; a subscription's
    // deltas from it say `more` but the last, so that no client shows half of it.
    fixture.transaction(vec![
        (NS, Write::Insert(doc! { "_id": 20, "n": 20 })),
        (NS, Write::Insert(doc! { "_id": 21, "n": 21 })),
        (NS, Write::Delete(bson::Bson::Int32(10))),
    ]);
    let mut all = Vec::new();
    while all.len() < 3 {
        let message = next_within(&mut socket, Duration::from_secs(10)).await.expect("the transaction's deltas");
        apply_message(&mut live, &message);
        if let ServerMessage::Delta(d) = message
            && d.id == "all"
        {
            all.push((d.position.time(), d.more));
        }
    }
    assert!(all.iter().all(|(time, _)| *time == all[0].0), "one cluster time: {all:?}");
    assert_eq!(all.iter().map(|(_, more)| *more).collect::<Vec<_>>(), vec![true, true, false]);
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;

    // An update whose document is gone by the time it is looked up (`fullDocument: null`).
    fixture.transaction(vec![
        (NS, Write::Update(doc! { "_id": 20, "n": 30 })),
        (NS, Write::Delete(bson::Bson::Int32(20))),
    ]);
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;

    // A resumable error mid-stream, then a dropped connection: the stream resumes and
    // nothing is lost or applied twice.
    fixture.inject(Fault::ResumableGetMore);
    fixture.insert(NS, doc! { "_id": 30, "n": 30 });
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    fixture.inject(Fault::DropConnection);
    fixture.insert(NS, doc! { "_id": 31, "n": 31 });
    fixture.update(NS, doc! { "_id": 30, "n": 32 });
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    let commands = fixture.commands();
    assert!(commands.iter().filter(|c| *c == "aggregate").count() >= 2, "the stream was resumed: {commands:?}");
    // Three initial results, one of them read twice (the snapshot was not available at first).
    assert_eq!(commands.iter().filter(|c| *c == "find").count(), 4, "initial results came from find: {commands:?}");

    // The resume token is on disk.
    let mut waited = 0;
    while !data.join("mongodb-resume-token.bson").exists() {
        waited += 1;
        assert!(waited < 100, "no checkpoint after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, health) = common::http(server.addr, "GET", "/healthz", None).await;
    assert_eq!(status, 200, "{health}");
    // The source's figures: events so far and the lag behind the last event's cluster time.
    assert_eq!(health["source"]["name"], "mongodb", "{health}");
    assert_eq!(health["source"]["events"], 20, "every write after the stream opened: {health}");
    assert!(health["source"]["lag_seconds"].as_u64().unwrap() < 3600, "{health}");
}

/// The real binary on the fixture, killed with SIGKILL and restarted: the restart resumes the
/// change stream from the checkpoint (after what the first process handed to its engine, at
/// or before what the fixture had written), results are read fresh and exact; when the
/// checkpoint has fallen off the history, the restart follows the stream from the present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_resume_from_the_checkpoint() {
    let fixture = MongoFixture::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let uri = fixture.uri();
    let flags = ["--mongodb", uri.as_str(), "--watch", "app"];
    let queries = [("all", json!({})), ("top", json!({"sort": {"n": -1}, "limit": 3}))];
    let port = common::free_port();
    let mut first = common::spawn_server(&data, port, &flags).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut socket = connect(addr).await;
    subscribe(&mut socket, NS, &queries).await;
    // The resume token of "all", to resume with after the restart.
    let mut live = BTreeMap::new();
    let token = loop {
        let message = next_within(&mut socket, Duration::from_secs(10)).await.expect("a result");
        apply_message(&mut live, &message);
        if let ServerMessage::Result(r) = &message
            && r.id == "all"
        {
            break r.token.clone().expect("a resume token");
        }
    };
    for i in 0..20 {
        fixture.insert(NS, doc! { "_id": i, "n": i });
    }
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    let seq = live["all"].seq();
    // Let the checkpoint catch up, then kill.
    let checkpoint = data.join("mongodb-resume-token.bson");
    for _ in 0..100 {
        if checkpoint.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(checkpoint.exists(), "no checkpoint");
    tokio::time::sleep(Duration::from_millis(500)).await;
    common::signal(&first, "-KILL");
    common::wait_exit(&mut first);
    let written_before_kill = fixture.writes();

    // Writes while livegrid is down.
    fixture.update(NS, doc! { "_id": 3, "n": 300 });
    fixture.delete(NS, 19);
    let mut second = common::spawn_server(&data, port, &flags).await;
    let starts = fixture.stream_starts();
    let resumed_at = *starts.last().unwrap();
    assert!(
        starts.len() >= 2 && resumed_at > 0 && resumed_at <= written_before_kill,
        "the restart resumed after the checkpoint, at or before the kill: {starts:?}, {written_before_kill} written"
    );
    // A client resuming with its token and seq gets a correct fresh result (the server's
    // buffers died with it), and then the deltas.
    let mut socket = connect(addr).await;
    send(&mut socket, json!({"type": "subscribe", "id": "all", "ns": NS, "resume": {"token": token, "seq": seq}}))
        .await;
    send(&mut socket, json!({"type": "subscribe", "id": "top", "ns": NS, "sort": {"n": -1}, "limit": 3})).await;
    let mut live = BTreeMap::new();
    let first_message = next_within(&mut socket, Duration::from_secs(10)).await.expect("a message");
    assert!(matches!(&first_message, ServerMessage::Result(_)), "a fresh result first: {first_message:?}");
    apply_message(&mut live, &first_message);
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    fixture.insert(NS, doc! { "_id": 50, "n": 50 });
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    common::signal(&second, "-KILL");
    common::wait_exit(&mut second);

    // The checkpoint falls off the history while livegrid is down: the restart starts at the
    // present, and results (read fresh) are exact.
    fixture.insert(NS, doc! { "_id": 51, "n": 51 });
    fixture.lose_history();
    let mut third = common::spawn_server(&data, port, &flags).await;
    let mut socket = connect(addr).await;
    subscribe(&mut socket, NS, &queries).await;
    let mut live = BTreeMap::new();
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    fixture.update(NS, doc! { "_id": 51, "n": 510 });
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    common::signal(&third, "-KILL");
    common::wait_exit(&mut third);
}

/// A wrong URI, a standalone server (no change streams) or an unreachable deployment stops
/// `serve` at start with a clear error, within the server selection timeout, instead of
/// hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_unreachable_deployments_fail_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let start = |uri: &str| {
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data: dir.path().join("data"),
            source: SourceChoice::Mongo {
                uri: uri.into(),
                watch: Vec::new(),
                skip_undecodable: false,
                full_document: Default::default(),
            },
            ..Default::default()
        };
        livegrid::server::start(config)
    };
    let Err(error) = start("postgres://127.0.0.1/").await else { panic!("a wrong scheme must fail") };
    assert!(error.to_string().contains("mongodb: invalid connection string"), "{error}");

    // A standalone server has no change streams: MongoDB's own words reach the operator.
    let standalone = MongoFixture::start_as(common::mongo_fixture::Topology::Standalone);
    let Err(error) = start(&standalone.uri()).await else { panic!("a standalone server must fail") };
    assert!(error.to_string().contains("only supported on replica sets"), "{error}");

    let closed = common::free_port();
    let began = std::time::Instant::now();
    let uri = format!("mongodb://127.0.0.1:{closed}/?directConnection=true&serverSelectionTimeoutMS=300");
    let Err(error) = start(&uri).await else { panic!("an unreachable server must fail") };
    assert!(error.to_string().contains("mongodb: opening the change stream"), "{error}");
    assert!(began.elapsed() < Duration::from_secs(20), "took {:?}", began.elapsed());
}

/// `livegrid record` captures the stream while live queries follow it; `livegrid replay` of
/// the recording with the same queries gives exactly the deltas the live run gave (same ops,
/// documents, indexes, causes and positions), transactions and vanished documents included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_replays_to_the_live_deltas() {
    let fixture = MongoFixture::start();
    let (dir, server) = serve_on(&fixture, "app").await;
    let queries = [
        ("all", json!({})),
        ("odd", json!({"filter": {"odd": true}})),
        ("top", json!({"sort": {"n": -1}, "limit": 3})),
    ];
    let mut socket = connect(server.addr).await;
    subscribe(&mut socket, NS, &queries).await;
    let mut live = BTreeMap::new();
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;

    // The recorder, in this process, until it has the 60 events below.
    let recording = dir.path().join("recorded.jsonl");
    let args = livegrid::cli::RecordArgs {
        mongodb: fixture.uri(),
        watch: vec!["app".into()],
        out: recording.clone(),
        events: Some(60),
        seconds: Some(60.0),
        full_document: Default::default(),
    };
    let streams = fixture.stream_starts().len();
    let recorder = std::thread::spawn(move || {
        livegrid::commands::record::record(&args, &std::sync::atomic::AtomicBool::new(false)).unwrap()
    });
    for _ in 0..200 {
        if fixture.stream_starts().len() > streams {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(fixture.stream_starts().len() > streams, "the recorder did not open its stream");

    let mut written = 0;
    for i in 0..20 {
        fixture.insert(NS, doc! { "_id": i, "n": i, "odd": i % 2 == 1 });
        written += 1;
    }
    // With updateLookup an update event carries the document as it is when the event is
    // read: both streams read each phase before the next one writes the same documents.
    fixture.wait_streams_caught_up();
    for i in 0..10 {
        fixture.update(NS, doc! { "_id": i, "n": 100 - i, "odd": i % 3 == 0 });
        written += 1;
    }
    fixture.wait_streams_caught_up();
    fixture.transaction(vec![
        (NS, Write::Delete(bson::Bson::Int32(0))),
        (NS, Write::Insert(doc! { "_id": 50, "n": 500, "odd": false })),
        (NS, Write::Replace(doc! { "_id": 1, "n": 1 })),
    ]);
    written += 3;
    fixture.wait_streams_caught_up();
    fixture.transaction(vec![
        (NS, Write::Update(doc! { "_id": 2, "n": 1000 })),
        (NS, Write::Delete(bson::Bson::Int32(2))),
    ]);
    written += 2;
    for i in 20..45 {
        fixture.insert(NS, doc! { "_id": i, "n": i, "odd": i % 2 == 1 });
        written += 1;
    }
    assert_eq!(written, 60);
    // Live: every delta, in order, per subscription.
    let mut deltas: BTreeMap<String, Vec<ServerMessage>> = BTreeMap::new();
    let want = fixture.expected(NS, &queries);
    let mut quiet = 0;
    while !want.iter().all(|(id, docs)| live.get(id).is_some_and(|r: &LiveResult| r.docs().len() == docs.len()))
        || quiet < 2
    {
        match next_within(&mut socket, Duration::from_millis(300)).await {
            Some(message) => {
                apply_message(&mut live, &message);
                if let ServerMessage::Delta(d) = &message {
                    deltas.entry(d.id.clone()).or_default().push(message.clone());
                }
                quiet = 0;
            }
            None => {
                quiet += 1;
                assert!(quiet < 40, "live results did not settle");
            }
        }
    }
    settle(&mut socket, &mut live, &want).await;
    let summary = recorder.join().unwrap();
    assert!(summary.contains("\"events\":60"), "{summary}");

    // Replay the recording with the same queries, registered before its first event.
    let queries_file = dir.path().join("queries.jsonl");
    let lines: Vec<String> = queries
        .iter()
        .map(|(id, q)| {
            let mut line = json!({"id": id, "ns": NS});
            line.as_object_mut().unwrap().extend(q.as_object().unwrap().clone());
            line.to_string()
        })
        .collect();
    std::fs::write(&queries_file, lines.join("\n")).unwrap();
    let out = dir.path().join("replayed.jsonl");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .args(["replay", "--events"])
        .arg(&recording)
        .arg("--queries")
        .arg(&queries_file)
        .arg("--out")
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let mut replayed: BTreeMap<String, Vec<ServerMessage>> = BTreeMap::new();
    for line in std::fs::read_to_string(&out).unwrap().lines() {
        let message: ServerMessage = serde_json::from_str(line).unwrap();
        if let ServerMessage::Delta(d) = &message {
            replayed.entry(d.id.clone()).or_default().push(message.clone());
        }
    }
    // Live subscriptions began with a result of seq 1 over the earlier (empty) state, as the
    // replayed ones did: seqs, positions and documents must agree one for one.
    assert_eq!(deltas.keys().collect::<Vec<_>>(), replayed.keys().collect::<Vec<_>>());
    for (id, live_deltas) in &deltas {
        assert_eq!(live_deltas, &replayed[id], "deltas of {id} differ between the live run and the replay");
    }
}

/// An event livegrid cannot decode stops the source with a clear error (`/healthz` 503 names
/// it and its resume token) unless `--skip-undecodable` asks to skip such events; then later
/// events still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_events_stop_the_source_unless_skipped() {
    for skip_undecodable in [false, true] {
        let fixture = MongoFixture::start();
        let (_dir, server) = serve_source(SourceChoice::Mongo {
            uri: fixture.uri(),
            watch: vec![NS.into()],
            skip_undecodable,
            full_document: Default::default(),
        })
        .await;
        let queries = [("all", json!({}))];
        let mut socket = connect(server.addr).await;
        subscribe(&mut socket, NS, &queries).await;
        let mut live = BTreeMap::new();
        settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
        fixture.inject(Fault::UndecodableEvent);
        fixture.insert(NS, doc! { "_id": 1, "n": 1 });
        if skip_undecodable {
            fixture.insert(NS, doc! { "_id": 2, "n": 2 });
            settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
            let (status, health) = common::http(server.addr, "GET", "/healthz", None).await;
            assert_eq!(status, 200, "{health}");
        } else {
            let mut waited = 0;
            loop {
                let (status, health) = common::http(server.addr, "GET", "/healthz", None).await;
                if status == 503 {
                    let reason = health["reason"].as_str().unwrap();
                    assert!(reason.contains("undecodable change event (resume token"), "{reason}");
                    assert!(reason.contains("fullDocument"), "{reason}");
                    break;
                }
                waited += 1;
                assert!(waited < 100, "the source did not stop: {health}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// With `--mongodb`, the REST data API writes to MongoDB, and the changes reach subscriptions
/// through the change stream; answers carry the writes' positions (cluster time and order),
/// a bulk request is one transaction, and errors are MongoDB's (duplicate key, not found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_writes_go_to_mongodb_and_come_back_through_the_stream() {
    let fixture = MongoFixture::start();
    let (_dir, server) = serve_on(&fixture, NS).await;
    let queries = [("all", json!({})), ("top", json!({"sort": {"n": -1}, "limit": 2}))];
    let mut socket = connect(server.addr).await;
    subscribe(&mut socket, NS, &queries).await;
    let mut live = BTreeMap::new();
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    let http = |method: &'static str, path: &'static str, body: Option<serde_json::Value>| {
        common::http(server.addr, method, path, body)
    };

    let (status, body) = http("POST", "/v1/db/app/items", Some(json!({"_id": 1, "n": 1}))).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["_id"], 1);
    let first: livegrid_protocol::Position = serde_json::from_value(body["position"].clone()).unwrap();
    assert_eq!(first.cluster_time(), (fixture.cluster_time().time, fixture.cluster_time().increment));
    let (status, body) = http("PATCH", "/v1/db/app/items/1", Some(json!({"$set": {"n": 5}}))).await;
    assert_eq!((status, body["modified"].as_bool()), (200, Some(true)), "{body}");
    let (status, body) = http("PATCH", "/v1/db/app/items/1", Some(json!({"$set": {"n": 5}}))).await;
    assert_eq!((status, body["modified"].as_bool()), (200, Some(false)), "a no-op update: {body}");
    // A new id from a URL path is a string (the embedded store's rule).
    let (status, body) = http("PUT", "/v1/db/app/items/2", Some(json!({"n": 2}))).await;
    assert_eq!((status, &body["_id"]), (201, &json!("2")), "{body}");
    let (status, body) = http("GET", "/v1/db/app/items/1", None).await;
    assert_eq!((status, &body), (200, &json!({"_id": 1, "n": 5})));
    let (status, body) = http("POST", "/v1/db/app/items", Some(json!({"_id": 1, "n": 9}))).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("duplicate_key")), "{body}");

    // A bulk request is one transaction: one cluster time, orders 0, 1, 2.
    let bulk = json!({"writes": [
        {"insert": {"_id": 3, "n": 30}},
        {"update": {"_id": 1, "update": {"$inc": {"n": 1}}}},
        {"delete": {"_id": "2"}},
    ]});
    let (status, body) = http("POST", "/v1/db/app/items/_bulk", Some(bulk)).await;
    assert_eq!(status, 200, "{body}");
    let positions: Vec<livegrid_protocol::Position> = serde_json::from_value(body["positions"].clone()).unwrap();
    assert_eq!(positions.len(), 3);
    assert!(positions.iter().all(|p| p.time() == positions[0].time()), "{positions:?}");
    assert_eq!(positions.iter().map(|p| p.order()).collect::<Vec<_>>(), vec![0, 1, 2]);
    let (status, body) = http("DELETE", "/v1/db/app/items/2", None).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");

    let (status, body) = http("GET", "/v1/db/app/items?filter=%7B%22n%22%3A%7B%22%24gte%22%3A6%7D%7D", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["docs"], json!([{"_id": 1, "n": 6}, {"_id": 3, "n": 30}]));

    assert_eq!(fixture.documents(NS), vec![doc! {"_id": 1, "n": 6}, doc! {"_id": 3, "n": 30}]);
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
}

/// With authentication, a document's `_acl.write` is checked by MongoDB in the write itself
/// (its condition is part of the write's filter): a refused update, replacement or delete
/// changes nothing, and a refused write in a bulk request aborts its transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_write_acls_are_checked_in_the_mongodb_write() {
    let fixture = MongoFixture::start();
    fixture.insert(NS, doc! {"_id": 1, "n": 1, "_acl": {"read": ["*"], "write": ["user:alice"]}});
    fixture.insert(NS, doc! {"_id": 2, "n": 2});
    let dir = tempfile::tempdir().unwrap();
    let rules = livegrid::auth::Rules::parse("[namespaces.\"app.*\"]\nread = \"public\"\nwrite = \"authenticated\"\n");
    let config = ServerConfig {
        source: SourceChoice::Mongo {
            uri: fixture.uri(),
            watch: vec![NS.into()],
            skip_undecodable: false,
            full_document: Default::default(),
        },
        auth: livegrid::server::AuthConfig {
            secret: Some(common::SECRET.into()),
            public_key_pem: None,
            rules: Some(rules.unwrap()),
        },
        ..Default::default()
    };
    let server = server_with(&dir.path().join("data"), config).await;
    let (alice, bob) = (common::token("alice", &[], 600), common::token("bob", &[], 600));
    let call = |method: &'static str, path: &'static str, who: &str, body: Option<serde_json::Value>| {
        let who = who.to_string();
        async move {
            let (status, _, body) = common::http_as(server.addr, method, path, Some(&who), body).await;
            (status, body["code"].as_str().unwrap_or_default().to_string())
        }
    };
    let forbidden = (403, "forbidden".to_string());
    assert_eq!(call("PATCH", "/v1/db/app/items/1", &bob, Some(json!({"$set": {"n": 9}}))).await, forbidden);
    assert_eq!(call("PUT", "/v1/db/app/items/1", &bob, Some(json!({"n": 9}))).await, forbidden);
    assert_eq!(call("DELETE", "/v1/db/app/items/1", &bob, None).await, forbidden);
    let bulk = json!({"writes": [
        {"update": {"_id": 2, "update": {"$set": {"n": 20}}}},
        {"delete": {"_id": 1}},
    ]});
    assert_eq!(call("POST", "/v1/db/app/items/_bulk", &bob, Some(bulk)).await, forbidden);
    assert_eq!(
        fixture.documents(NS),
        vec![doc! {"_id": 1, "n": 1, "_acl": {"read": ["*"], "write": ["user:alice"]}}, doc! {"_id": 2, "n": 2}]
    );
    // What the ACL admits, and documents without one, are written; missing ones are missing.
    assert_eq!(call("PATCH", "/v1/db/app/items/2", &bob, Some(json!({"$set": {"n": 20}}))).await.0, 200);
    assert_eq!(call("PATCH", "/v1/db/app/items/1", &alice, Some(json!({"$set": {"n": 10}}))).await.0, 200);
    assert_eq!(call("DELETE", "/v1/db/app/items/7", &bob, None).await, (404, "not_found".to_string()));
    assert_eq!(call("DELETE", "/v1/db/app/items/1", &alice, None).await.0, 200);
    assert_eq!(fixture.documents(NS), vec![doc! {"_id": 2, "n": 20}]);
}

/// Reads messages until every id in `ids` got a `resubscribe` error; returns their messages.
async fn resubscribe_errors(socket: &mut Socket, ids: &[&str]) -> BTreeMap<String, String> {
    let mut errors = BTreeMap::new();
    for _ in 0..200 {
        if ids.iter().all(|id| errors.contains_key(*id)) {
            return errors;
        }
        if let Some(ServerMessage::Error(e)) = next_within(socket, Duration::from_millis(100)).await {
            assert_eq!(e.code, livegrid_protocol::ErrorCode::Resubscribe, "{e:?}");
            errors.insert(e.id.clone().unwrap(), e.message.clone());
        }
    }
    panic!("no resubscribe error for all of {ids:?}: {errors:?}");
}

/// When MongoDB's history is lost while subscriptions are live, or a collection is dropped
/// (MongoDB sends no deletes for its documents), livegrid does not keep results that may
/// have diverged: the subscriptions concerned end with a `resubscribe` error that says why,
/// the server stays healthy, and subscribing again gives fresh, exact results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_history_and_dropped_collections_end_subscriptions_for_a_fresh_read() {
    let fixture = MongoFixture::start();
    fixture.insert(NS, doc! { "_id": 1, "n": 1 });
    fixture.insert("app.other", doc! { "_id": 1, "m": 1 });
    let (_dir, server) = serve_on(&fixture, "app").await;
    let mut socket = connect(server.addr).await;
    let queries = [("items", json!({}))];
    subscribe(&mut socket, NS, &queries).await;
    send(&mut socket, json!({"type": "subscribe", "id": "other", "ns": "app.other"})).await;
    let mut live = BTreeMap::new();
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    assert!(live.contains_key("items"));

    // The stream fails and cannot resume where it was: every subscription ends.
    fixture.inject(Fault::LoseHistory);
    fixture.insert(NS, doc! { "_id": 2, "n": 2 });
    let errors = resubscribe_errors(&mut socket, &["items", "other"]).await;
    assert!(errors["items"].contains("history was lost"), "{errors:?}");
    let (status, health) = common::http(server.addr, "GET", "/healthz", None).await;
    assert_eq!(status, 200, "{health}");

    // Subscribing again reads fresh results, and the stream goes on from the present.
    subscribe(&mut socket, NS, &queries).await;
    send(&mut socket, json!({"type": "subscribe", "id": "other", "ns": "app.other"})).await;
    let mut live = BTreeMap::new();
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    fixture.insert(NS, doc! { "_id": 3, "n": 3 });
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;

    // A dropped collection ends the subscriptions on it, and only those.
    fixture.drop_collection(NS);
    let errors = resubscribe_errors(&mut socket, &["items"]).await;
    assert!(errors["items"].contains("collection app.items was dropped"), "{errors:?}");
    fixture.insert("app.other", doc! { "_id": 2, "m": 2 });
    let mut other_seen = false;
    for _ in 0..50 {
        match next_within(&mut socket, Duration::from_millis(100)).await {
            Some(ServerMessage::Delta(d)) if d.id == "other" => {
                other_seen = true;
                break;
            }
            Some(ServerMessage::Error(e)) => panic!("unexpected {e:?}"),
            _ => {}
        }
    }
    assert!(other_seen, "the subscription on the other collection goes on");
}

/// With `--full-document post-image`, an update event carries the document as the write left
/// it (MongoDB's post-image), not as it is when the event is read: an update followed by a
/// delete in one transaction shows the update, then the removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_images_give_each_update_its_own_document() {
    let fixture = MongoFixture::start();
    fixture.insert(NS, doc! { "_id": 1, "n": 1 });
    let (_dir, server) = serve_source(SourceChoice::Mongo {
        uri: fixture.uri(),
        watch: vec![NS.into()],
        skip_undecodable: false,
        full_document: livegrid::source::mongodb::FullDocument::PostImage,
    })
    .await;
    let queries = [("all", json!({}))];
    let mut socket = connect(server.addr).await;
    subscribe(&mut socket, NS, &queries).await;
    let mut live = BTreeMap::new();
    settle(&mut socket, &mut live, &fixture.expected(NS, &queries)).await;
    fixture
        .transaction(vec![(NS, Write::Update(doc! { "_id": 1, "n": 2 })), (NS, Write::Delete(bson::Bson::Int32(1)))]);
    let mut deltas = Vec::new();
    while deltas.len() < 2 {
        let message = next_within(&mut socket, Duration::from_secs(10)).await.expect("the transaction's deltas");
        apply_message(&mut live, &message);
        if let ServerMessage::Delta(d) = message {
            deltas.push((d.op, d.doc.and_then(|doc| doc.get("n").cloned()), d.more));
        }
    }
    use livegrid_protocol::DeltaOp;
    assert_eq!(deltas, vec![(DeltaOp::Change, Some(bson::Bson::Int32(2)), true), (DeltaOp::Remove, None, false)]);
}

/// The end-to-end scenarios above on a real replica set, when `LIVEGRID_TEST_MONGODB_URI`
/// names one (for example `mongodb://127.0.0.1:27017/?replicaSet=rs0`; see README, "Running
/// against MongoDB"): writes by another client through the driver (inserts, updates,
/// replaces, deletes, a transaction), REST writes through livegrid, and live results checked
/// against MongoDB's own `find`. It works in a database of its own, dropped at the end. The
/// fixture's faults (errors, lost history) have no real counterpart here. Without the
/// variable the test says so and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_replica_set_end_to_end() {
    let Ok(uri) = std::env::var("LIVEGRID_TEST_MONGODB_URI") else {
        eprintln!("LIVEGRID_TEST_MONGODB_URI is not set: the real replica set test does not run");
        return;
    };
    driver_end_to_end(&uri).await;
}

/// The same scenario against the fixture: writes through the driver rather than the fixture's
/// log, so that the real replica set test's own steps are checked on every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_writes_end_to_end_on_the_fixture() {
    let fixture = MongoFixture::start();
    driver_end_to_end(&fixture.uri()).await;
}

/// Writes by another client through the driver, REST writes through livegrid, and live
/// results checked against the deployment's own `find`.
async fn driver_end_to_end(uri: &str) {
    let uri = uri.to_string();
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let db = format!("livegrid_test_{}", bson::oid::ObjectId::new());
    let ns = format!("{db}.items");
    let items = client.database(&db).collection::<Document>("items");
    items.insert_one(doc! { "_id": 0, "n": 0 }).await.unwrap();

    let (_dir, server) = serve_uri(&uri, &db).await;
    let mut socket = connect(server.addr).await;
    let queries = [("all", json!({})), ("top", json!({"sort": {"n": -1}, "limit": 2}))];
    for (id, query) in &queries {
        let mut message = json!({"type": "subscribe", "id": id, "ns": ns});
        message.as_object_mut().unwrap().extend(query.as_object().unwrap().clone());
        send(&mut socket, message).await;
    }
    let mut live = BTreeMap::new();
    settle(&mut socket, &mut live, &truth(&items, &queries).await).await;

    for i in 1..20 {
        items.insert_one(doc! { "_id": i, "n": i }).await.unwrap();
    }
    items.update_one(doc! { "_id": 3 }, doc! { "$set": { "n": 300 } }).await.unwrap();
    items.replace_one(doc! { "_id": 4 }, doc! { "n": -4 }).await.unwrap();
    items.delete_one(doc! { "_id": 19 }).await.unwrap();
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    items.insert_one(doc! { "_id": 50, "n": 50 }).session(&mut session).await.unwrap();
    items.delete_one(doc! { "_id": 18 }).session(&mut session).await.unwrap();
    session.commit_transaction().await.unwrap();
    settle(&mut socket, &mut live, &truth(&items, &queries).await).await;

    // REST writes go to MongoDB and come back through the stream.
    let path = format!("/v1/db/{db}/items");
    let (status, body) = common::http(server.addr, "POST", &path, Some(json!({"_id": 60, "n": 60}))).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) =
        common::http(server.addr, "PATCH", &format!("{path}/60"), Some(json!({"$inc": {"n": 1}}))).await;
    assert_eq!(status, 200, "{body}");
    settle(&mut socket, &mut live, &truth(&items, &queries).await).await;

    client.database(&db).drop().await.unwrap();
}

/// What MongoDB holds in `items` now, evaluated per query.
async fn truth(
    items: &mongodb::Collection<Document>,
    queries: &[(&str, serde_json::Value)],
) -> BTreeMap<String, Vec<Document>> {
    use futures_util::TryStreamExt;
    let docs: Vec<Document> = items.find(doc! {}).await.unwrap().try_collect().await.unwrap();
    queries
        .iter()
        .map(|(id, q)| {
            let spec = QuerySpec {
                sort: q.get("sort").map(|s| bson::serialize_to_document(s).unwrap()),
                limit: q.get("limit").and_then(|l| l.as_u64()),
                ..Default::default()
            };
            (id.to_string(), Query::compile(&spec).unwrap().evaluate(&docs))
        })
        .collect()
}
