//! The real server on a loopback port: REST over the embedded store, live queries over real
//! WebSocket connections, errors that leave connections open, and durability across restarts.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livegrid::server::{RunningServer, ServerConfig, start};
use livegrid_protocol::{DeltaOp, LiveResult, ServerMessage};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{connect, http, next, next_within, send, server_with};

async fn server(data: &std::path::Path, queue_capacity: usize) -> RunningServer {
    server_with(data, ServerConfig { queue_capacity, ..Default::default() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_round_trips_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), 1024).await;
    let (status, body) = http(server.addr, "POST", "/v1/db/shop/items", Some(json!({"_id": "a", "price": 5}))).await;
    assert_eq!((status, &body["_id"]), (201, &json!("a")));
    let (status, body) = http(server.addr, "POST", "/v1/db/shop/items", Some(json!({"price": 7}))).await;
    assert_eq!(status, 201);
    let generated = body["_id"]["$oid"].as_str().unwrap().to_string();
    let (status, body) = http(server.addr, "GET", &format!("/v1/db/shop/items/{generated}"), None).await;
    assert_eq!((status, &body["price"]), (200, &json!(7)));
    let (status, _) = http(
        server.addr,
        "PATCH",
        "/v1/db/shop/items/a",
        Some(json!({"$inc": {"price": 10}, "$push": {"tags": "new"}})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, body) = http(server.addr, "GET", "/v1/db/shop/items/a", None).await;
    assert_eq!(body, json!({"_id": "a", "price": 15, "tags": ["new"]}));
    let (status, _) = http(server.addr, "PUT", "/v1/db/shop/items/b", Some(json!({"price": 1}))).await;
    assert_eq!(status, 201);
    let (status, body) = http(
        server.addr,
        "GET",
        "/v1/db/shop/items?filter=%7B%22price%22%3A%7B%22%24gt%22%3A2%7D%7D&sort=%7B%22price%22%3A-1%7D",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["docs"].as_array().unwrap().iter().map(|d| d["price"].clone()).collect::<Vec<_>>(),
        vec![json!(15), json!(7)]
    );
    let (status, body) = http(
        server.addr,
        "POST",
        "/v1/db/shop/items/_bulk",
        Some(json!({"writes": [{"insert": {"_id": "c"}}, {"delete": {"_id": "b"}}]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["positions"].as_array().unwrap().len(), 2);

    // Errors: JSON bodies with the right status, nothing half-applied.
    let (status, body) = http(server.addr, "POST", "/v1/db/shop/items", Some(json!({"_id": "a"}))).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("duplicate_key")));
    let (status, body) = http(server.addr, "GET", "/v1/db/shop/items/zzz", None).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, body) = http(server.addr, "PATCH", "/v1/db/shop/items/a", Some(json!({"$inc": {"price": "x"}}))).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_update")));
    let (status, body) = http(
        server.addr,
        "POST",
        "/v1/db/shop/items/_bulk",
        Some(json!({"writes": [{"insert": {"_id": "d"}}, {"insert": {"_id": "a"}}]})),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (409, Some("duplicate_key")));
    let (status, _) = http(server.addr, "GET", "/v1/db/shop/items/d", None).await;
    assert_eq!(status, 404, "a failed bulk write applied part of itself");
    let (status, body) = http(server.addr, "GET", "/v1/db/shop/items?filter=%7Bnot", None).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_query")));
    let (status, body) = http(server.addr, "GET", "/healthz", None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_queries_over_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), 1024).await;
    http(server.addr, "POST", "/v1/db/app/todos", Some(json!({"_id": 1, "done": false, "rank": 5}))).await;
    let mut socket = connect(server.addr).await;

    send(&mut socket, json!({"type": "subscribe", "id": "open", "ns": "app.todos", "filter": {"done": false}})).await;
    send(
        &mut socket,
        json!({"type": "subscribe", "id": "top", "ns": "app.todos", "filter": {}, "sort": {"rank": -1}, "limit": 2}),
    )
    .await;
    let mut live = std::collections::HashMap::<String, LiveResult>::new();
    for _ in 0..2 {
        let message = next(&mut socket).await;
        let ServerMessage::Result(r) = &message else { panic!("expected a result, got {message:?}") };
        live.entry(r.id.clone()).or_default().apply(&message).unwrap();
    }
    assert_eq!(live["open"].docs().len(), 1);

    // Every kind of delta, on the unsorted and the sorted query.
    http(server.addr, "POST", "/v1/db/app/todos", Some(json!({"_id": 2, "done": false, "rank": 9}))).await;
    http(server.addr, "PATCH", "/v1/db/app/todos/1", Some(json!({"$set": {"rank": 10}}))).await;
    http(server.addr, "POST", "/v1/db/app/todos", Some(json!({"_id": 3, "done": true, "rank": 7}))).await;
    http(server.addr, "PATCH", "/v1/db/app/todos/2", Some(json!({"$set": {"done": true}}))).await;
    http(server.addr, "DELETE", "/v1/db/app/todos/1", None).await;
    let mut ops = std::collections::HashSet::new();
    let expected = |live: &std::collections::HashMap<String, LiveResult>| {
        live["open"].docs().is_empty()
            && live["top"].docs().iter().map(|d| d.get_i32("_id").unwrap()).collect::<Vec<_>>() == vec![2, 3]
    };
    while !expected(&live) {
        let message = next(&mut socket).await;
        if let ServerMessage::Delta(d) = &message {
            ops.insert((d.id.clone(), d.op));
            live.get_mut(&d.id).unwrap().apply(&message).unwrap();
        }
    }
    assert!(ops.contains(&("open".into(), DeltaOp::Add)) && ops.contains(&("open".into(), DeltaOp::Remove)), "{ops:?}");
    assert!(ops.contains(&("open".into(), DeltaOp::Change)), "{ops:?}");
    assert!(ops.contains(&("top".into(), DeltaOp::ChangeIndex)), "{ops:?}");

    // Bad messages get errors and the connection stays open.
    send(&mut socket, json!({"type": "subscribe", "id": "bad", "ns": "app.todos", "filter": {"a": {"$where": 1}}}))
        .await;
    let ServerMessage::Error(e) = next(&mut socket).await else { panic!("expected an error") };
    assert_eq!((e.id.as_deref(), e.code), (Some("bad"), livegrid_protocol::ErrorCode::BadQuery));
    socket.send(Message::Text("{nope".into())).await.unwrap();
    let ServerMessage::Error(e) = next(&mut socket).await else { panic!("expected an error") };
    assert_eq!(e.code, livegrid_protocol::ErrorCode::BadMessage);
    send(&mut socket, json!({"type": "subscribe", "id": "open", "ns": "app.todos"})).await;
    let ServerMessage::Error(e) = next(&mut socket).await else { panic!("expected an error") };
    assert_eq!(e.code, livegrid_protocol::ErrorCode::DuplicateSubscription);
    send(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(next(&mut socket).await, ServerMessage::Pong);

    // After unsubscribing, no more messages for it.
    send(&mut socket, json!({"type": "unsubscribe", "id": "open"})).await;
    send(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(next(&mut socket).await, ServerMessage::Pong);
    http(server.addr, "POST", "/v1/db/app/todos", Some(json!({"_id": 4, "done": false, "rank": 1}))).await;
    send(&mut socket, json!({"type": "ping"})).await;
    loop {
        match next(&mut socket).await {
            ServerMessage::Pong => break,
            ServerMessage::Delta(d) => assert_ne!(d.id, "open", "a delta after unsubscribe"),
            other => panic!("unexpected {other:?}"),
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server_one = server(dir.path(), 1024).await;
    for i in 0..20 {
        http(server_one.addr, "POST", "/v1/db/app/notes", Some(json!({"_id": i, "n": i}))).await;
    }
    server_one.shutdown().await;
    let server_two = server(dir.path(), 1024).await;
    let (_, body) = http(server_two.addr, "GET", "/v1/db/app/notes/7", None).await;
    assert_eq!(body, json!({"_id": 7, "n": 7}));
    let mut socket = connect(server_two.addr).await;
    send(&mut socket, json!({"type": "subscribe", "id": "all", "ns": "app.notes", "filter": {"n": {"$gte": 10}}}))
        .await;
    let ServerMessage::Result(r) = next(&mut socket).await else { panic!("expected a result") };
    assert_eq!(r.docs.len(), 10);
    assert_eq!(r.position.time(), 20);
    http(server_two.addr, "POST", "/v1/db/app/notes", Some(json!({"_id": 100, "n": 100}))).await;
    let ServerMessage::Delta(d) = next(&mut socket).await else { panic!("expected a delta") };
    assert_eq!((d.op, d.position), (DeltaOp::Add, livegrid_protocol::Position::new(21)));
    server_two.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_sends_exactly_the_missed_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), 1024).await;
    let mut first = connect(server.addr).await;
    send(&mut first, json!({"type": "subscribe", "id": "s", "ns": "app.items", "filter": {}, "sort": {"n": 1}})).await;
    let mut live = LiveResult::default();
    let result = next(&mut first).await;
    let ServerMessage::Result(r) = &result else { panic!("expected a result") };
    let token = r.token.clone().expect("results carry a resume token");
    live.apply(&result).unwrap();
    http(server.addr, "POST", "/v1/db/app/items", Some(json!({"_id": 1, "n": 1}))).await;
    live.apply(&next(&mut first).await).unwrap();
    assert_eq!(live.seq(), 2);
    // The connection drops; writes go on.
    drop(first);
    for i in 2..=4 {
        http(server.addr, "POST", "/v1/db/app/items", Some(json!({"_id": i, "n": -i}))).await;
    }
    let mut second = connect(server.addr).await;
    send(&mut second, json!({"type": "subscribe", "id": "s", "ns": "app.items", "filter": {}, "sort": {"n": 1}, "resume": {"token": token, "seq": 2}})).await;
    // Exactly the missed deltas, numbered on from 2, then live ones.
    for expected_seq in 3..=5 {
        let message = next(&mut second).await;
        let ServerMessage::Delta(d) = &message else { panic!("expected a delta, got {message:?}") };
        assert_eq!(d.seq, expected_seq);
        live.apply(&message).unwrap();
    }
    http(server.addr, "PATCH", "/v1/db/app/items/1", Some(json!({"$set": {"n": -10}}))).await;
    live.apply(&next(&mut second).await).unwrap();
    let ids: Vec<i32> = live.docs().iter().map(|d| d.get_i32("_id").unwrap()).collect();
    assert_eq!(ids, vec![1, 4, 3, 2]);
    // An unknown token gets a fresh result.
    send(&mut second, json!({"type": "subscribe", "id": "t", "ns": "app.items", "filter": {"n": {"$lt": 0}}, "resume": {"token": "nope", "seq": 9}})).await;
    let ServerMessage::Result(fresh) = next(&mut second).await else { panic!("expected a fresh result") };
    assert_eq!((fresh.id.as_str(), fresh.seq, fresh.docs.len()), ("t", 1, 4));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        queue_capacity: 16,
        resume_buffer: 8,
        resume_grace: Duration::from_millis(300),
        ..Default::default()
    };
    let server = server_with(dir.path(), config).await;
    let mut slow = connect(server.addr).await;
    let mut reader = connect(server.addr).await;
    send(&mut slow, json!({"type": "subscribe", "id": "all", "ns": "app.big", "filter": {}})).await;
    send(&mut reader, json!({"type": "subscribe", "id": "all", "ns": "app.big", "filter": {}})).await;
    assert!(matches!(next(&mut reader).await, ServerMessage::Result(_)));
    // Large documents, so that socket buffers fill and the server's queue overflows.
    // About 25 MB in all: more than loopback socket buffers can absorb.
    let padding = "x".repeat(64 * 1024);
    let total = 400;
    let reading = tokio::spawn(async move {
        let mut adds = 0;
        while adds < total {
            if let ServerMessage::Delta(_) = next(&mut reader).await {
                adds += 1;
            }
        }
        reader
    });
    for batch in 0..40 {
        let writes: Vec<Value> =
            (0..total / 40).map(|i| json!({"insert": {"_id": batch * 1000 + i, "pad": padding}})).collect();
        let (status, _) = http(server.addr, "POST", "/v1/db/app/big/_bulk", Some(json!({"writes": writes}))).await;
        assert_eq!(status, 200);
    }
    // The reader got every delta.
    let _reader = tokio::time::timeout(Duration::from_secs(60), reading).await.expect("the reader keeps up").unwrap();
    // The slow client was closed with a reason before it could see them all.
    let mut seen = 0;
    let mut close = None;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
        match message {
            Message::Text(_) => seen += 1,
            Message::Close(frame) => {
                close = frame;
                break;
            }
            _ => {}
        }
    }
    assert!(seen < total + 1, "the slow client received everything ({seen})");
    let close = close.expect("a close frame with a reason");
    assert_eq!(u16::from(close.code), 1008);
    assert!(close.reason.contains("too slow"), "{}", close.reason);
    // Its detached subscription ends after the grace window: only the reader's remains.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, health) = http(server.addr, "GET", "/healthz", None).await;
        if health["subscriptions"] == json!(1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the slow client's subscription was never released: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), 1024).await;
    let mut socket = connect(server.addr).await;
    send(&mut socket, json!({"type": "subscribe", "id": "m", "ns": "app.m", "filter": {}})).await;
    assert!(matches!(next(&mut socket).await, ServerMessage::Result(_)));
    http(server.addr, "POST", "/v1/db/app/m", Some(json!({"_id": 1}))).await;
    assert!(matches!(next(&mut socket).await, ServerMessage::Delta(_)));
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    for name in [
        "livegrid_connections",
        "livegrid_subscriptions",
        "livegrid_events_in",
        "livegrid_deltas_out",
        "livegrid_event_to_delta_seconds",
        "livegrid_store_write_seconds",
        "livegrid_outbox_depth",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_with_errors_and_keep_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig { max_subscriptions: 2, max_message_bytes: 512, ..Default::default() };
    let server = server_with(dir.path(), config).await;
    let mut socket = connect(server.addr).await;
    for id in ["a", "b"] {
        send(&mut socket, json!({"type": "subscribe", "id": id, "ns": "app.x"})).await;
        assert!(matches!(next(&mut socket).await, ServerMessage::Result(_)));
    }
    send(&mut socket, json!({"type": "subscribe", "id": "c", "ns": "app.x"})).await;
    let ServerMessage::Error(e) = next(&mut socket).await else { panic!("expected an error") };
    assert_eq!((e.id.as_deref(), e.code), (Some("c"), livegrid_protocol::ErrorCode::TooManySubscriptions));
    send(&mut socket, json!({"type": "subscribe", "id": "d", "ns": "app.x", "filter": {"pad": "y".repeat(1000)}}))
        .await;
    let ServerMessage::Error(e) = next(&mut socket).await else { panic!("expected an error") };
    assert_eq!(e.code, livegrid_protocol::ErrorCode::MessageTooLarge);
    send(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(next(&mut socket).await, ServerMessage::Pong);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_drop_a_silent_peer() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().to_path_buf(),
        heartbeat: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut socket = connect(server.addr).await;
    send(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(next(&mut socket).await, ServerMessage::Pong);
    // Not polling the socket means not answering the server's pings.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await.expect("close in time") {
            Some(Ok(Message::Close(frame))) => break frame.expect("a reason"),
            Some(Ok(_)) => continue,
            other => panic!("ended without a close frame: {other:?}"),
        }
    };
    assert!(close.reason.contains("no frame since the last ping"), "{}", close.reason);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_that_leave_the_projected_document_unchanged_send_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path(), 1024).await;
    http(server.addr, "POST", "/v1/db/app/posts", Some(json!({"_id": 1, "title": "Hello", "views": 0}))).await;
    let mut socket = connect(server.addr).await;
    send(&mut socket, json!({"type": "subscribe", "id": "t", "ns": "app.posts", "projection": {"title": 1}})).await;
    assert!(matches!(next(&mut socket).await, ServerMessage::Result(_)));
    for _ in 0..5 {
        http(server.addr, "PATCH", "/v1/db/app/posts/1", Some(json!({"$inc": {"views": 1}}))).await;
    }
    http(server.addr, "PATCH", "/v1/db/app/posts/1", Some(json!({"$set": {"title": "Hello again"}}))).await;
    // The five view counts change nothing the client holds: the next message is the title.
    let ServerMessage::Delta(d) = next(&mut socket).await else { panic!("expected a delta") };
    assert_eq!((d.seq, d.op), (2, DeltaOp::Change));
    assert_eq!(d.doc.unwrap().get_str("title").unwrap(), "Hello again");

    // Without a projection: an update that changes nothing is a no-op (as in MongoDB: no
    // event, no position), so no subscription hears of it.
    send(&mut socket, json!({"type": "subscribe", "id": "all", "ns": "app.posts"})).await;
    assert!(matches!(next(&mut socket).await, ServerMessage::Result(_)));
    let (status, body) =
        http(server.addr, "PATCH", "/v1/db/app/posts/1", Some(json!({"$set": {"title": "Hello again"}}))).await;
    assert_eq!(
        (status, &body["modified"], &body["position"], &body["_id"]),
        (200, &json!(false), &json!(null), &json!(1))
    );
    let (_, body) =
        http(server.addr, "PUT", "/v1/db/app/posts/1", Some(json!({"title": "Hello again", "views": 5}))).await;
    assert_eq!(body["modified"], json!(false));
    let (_, body) = http(server.addr, "PATCH", "/v1/db/app/posts/1", Some(json!({"$inc": {"views": 1}}))).await;
    assert_eq!(body["modified"], json!(true));
    // The next message is that last update, for `all` only (`t` does not show views).
    let ServerMessage::Delta(d) = next(&mut socket).await else { panic!("expected a delta") };
    assert_eq!((d.id.as_str(), d.seq, d.op), ("all", 2, DeltaOp::Change));
    assert_eq!(d.doc.unwrap().get_i32("views").unwrap(), 6);
    assert!(next_within(&mut socket, Duration::from_millis(300)).await.is_none());
    server.shutdown().await;
}
