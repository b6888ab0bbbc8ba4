//! Hostile and unlucky clients against the real server on loopback: nothing a client sends
//! can take over another client's stream, exhaust the server or poison the data, every limit
//! answers with its documented error while the connection and the server keep working, and a
//! failure the server cannot recover from is reported, never hidden.

mod common;

use std::time::Duration;

use common::{close_frame, connect, http, http_raw, next, next_within, rss_bytes, send, server_with};
use futures_util::SinkExt;
use livegrid::server::ServerConfig;
use livegrid_protocol::{DeltaOp, ErrorCode, LiveResult, ServerMessage};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

fn expect_error(message: &ServerMessage, code: ErrorCode) -> String {
    match message {
        ServerMessage::Error(e) if e.code == code => e.message.clone(),
        other => panic!("expected a {code:?} error, got {other:?}"),
    }
}

fn expect_result(message: &ServerMessage) -> (String, u64) {
    match message {
        ServerMessage::Result(r) => (r.token.clone().expect("a token"), r.seq),
        other => panic!("expected a result, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessed_or_foreign_tokens_cannot_take_over_a_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), ServerConfig::default()).await;
    http(server.addr, "POST", "/v1/db/app/msgs", Some(json!({"_id": 1, "room": "a"}))).await;
    let mut victim = connect(server.addr).await;
    let query = json!({"type": "subscribe", "id": "v", "ns": "app.msgs", "filter": {"room": "a"}});
    send(&mut victim, query.clone()).await;
    let (token, _) = expect_result(&next(&mut victim).await);
    assert_eq!(token.len(), 32, "128-bit tokens as hex: {token}");
    assert!(!token.contains('.'), "tokens carry no structure to guess from: {token}");

    let mut attacker = connect(server.addr).await;
    let guesses = [
        // A guessed token with the right query.
        json!({"type": "subscribe", "id": "x1", "ns": "app.msgs", "filter": {"room": "a"}, "resume": {"token": "0123456789abcdef0123456789abcdef", "seq": 1}}),
        // The real token (leaked) with another query or namespace: bound to the original.
        json!({"type": "subscribe", "id": "x2", "ns": "app.msgs", "filter": {"room": "b"}, "resume": {"token": token, "seq": 1}}),
        json!({"type": "subscribe", "id": "x3", "ns": "app.other", "filter": {"room": "a"}, "resume": {"token": token, "seq": 1}}),
        // The real token with an impossible seq.
        json!({"type": "subscribe", "id": "x4", "ns": "app.msgs", "filter": {"room": "a"}, "resume": {"token": token, "seq": 1000}}),
    ];
    for guess in guesses {
        send(&mut attacker, guess).await;
        let message = next(&mut attacker).await;
        let ServerMessage::Result(r) = &message else { panic!("expected a fresh result, got {message:?}") };
        assert_eq!(r.seq, 1, "a fresh result, not a resumed stream");
        assert_ne!(r.token.as_deref(), Some(token.as_str()));
    }
    // The victim's subscription is untouched: it still gets its deltas, the attacker's fresh
    // subscriptions on room "a" get their own copies, and nobody else's.
    http(server.addr, "POST", "/v1/db/app/msgs", Some(json!({"_id": 2, "room": "a"}))).await;
    let ServerMessage::Delta(d) = next(&mut victim).await else { panic!("the victim lost its stream") };
    assert_eq!((d.id.as_str(), d.seq, d.op), ("v", 2, DeltaOp::Add));
    let mut attacker_ids = Vec::new();
    while let Some(message) = next_within(&mut attacker, Duration::from_millis(500)).await {
        let ServerMessage::Delta(d) = message else { panic!("unexpected {message:?}") };
        attacker_ids.push(d.id);
    }
    attacker_ids.sort();
    assert_eq!(attacker_ids, vec!["x1", "x4"], "only the attacker's own room-a subscriptions");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_switches_networks_keeps_every_delta() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), ServerConfig::default()).await;
    let subscribe =
        json!({"type": "subscribe", "id": "feed", "ns": "app.posts", "filter": {}, "sort": {"n": -1}, "limit": 5});
    let mut old = connect(server.addr).await;
    send(&mut old, subscribe.clone()).await;
    let mut live = LiveResult::default();
    let first = next(&mut old).await;
    let (token, _) = expect_result(&first);
    live.apply(&first).unwrap();
    for i in 0..3 {
        http(server.addr, "POST", "/v1/db/app/posts", Some(json!({"_id": i, "n": i}))).await;
        live.apply(&next(&mut old).await).unwrap();
    }
    // The new network: resume on a new connection while the old one is still open.
    let mut new = connect(server.addr).await;
    let mut resume = subscribe.clone();
    resume["resume"] = json!({"token": token, "seq": live.seq()});
    send(&mut new, resume).await;
    http(server.addr, "POST", "/v1/db/app/posts", Some(json!({"_id": 10, "n": 10}))).await;
    live.apply(&next(&mut new).await).unwrap();
    // The old connection unsubscribes (a stale client) and closes: neither touches the moved
    // subscription.
    send(&mut old, json!({"type": "unsubscribe", "id": "feed"})).await;
    let _ = next_within(&mut old, Duration::from_millis(200)).await;
    old.close(None).await.unwrap();
    drop(old);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 20..30 {
        http(server.addr, "POST", "/v1/db/app/posts", Some(json!({"_id": i, "n": i}))).await;
    }
    while live.docs().first().and_then(|d| d.get_i32("n").ok()) != Some(29) {
        live.apply(&next(&mut new).await).unwrap();
    }
    let (_, body) = http(server.addr, "GET", "/v1/db/app/posts?sort=%7B%22n%22%3A-1%7D&limit=5", None).await;
    let expected: Vec<i64> = body["docs"].as_array().unwrap().iter().map(|d| d["n"].as_i64().unwrap()).collect();
    let got: Vec<i64> = live.docs().iter().map(|d| i64::from(d.get_i32("n").unwrap())).collect();
    assert_eq!(got, expected);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_mongodb_limits_get_errors_and_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), ServerConfig::default()).await;
    http(server.addr, "POST", "/v1/db/app/docs", Some(json!({"_id": "a", "arr": [1], "s": "x"}))).await;
    let before = rss_bytes();
    // Padding an array to 10^9 elements.
    let (status, body) =
        http(server.addr, "PATCH", "/v1/db/app/docs/a", Some(json!({"$set": {"arr.1000000000": 1}}))).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_update")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("can't backfill array to larger than 1500000 elements"));
    // A document over 16 MiB, on every write path.
    let big = "x".repeat(17 << 20);
    for (method, path, body) in [
        ("POST", "/v1/db/app/docs", json!({"_id": "b", "s": big})),
        ("PUT", "/v1/db/app/docs/a", json!({"s": big})),
        ("POST", "/v1/db/app/docs/_bulk", json!({"writes": [{"insert": {"_id": "c", "s": big}}]})),
    ] {
        let (status, body) = http(server.addr, method, path, Some(body)).await;
        assert_eq!((status, body["code"].as_str()), (413, Some("document_too_large")), "{method} {path}: {body}");
        assert!(body["message"].as_str().unwrap().contains("16777216"), "{body}");
    }
    // An update that grows a document past 16 MiB.
    let nine = "y".repeat(9 << 20);
    http(server.addr, "PATCH", "/v1/db/app/docs/a", Some(json!({"$set": {"s": nine}}))).await;
    let (status, body) = http(server.addr, "PATCH", "/v1/db/app/docs/a", Some(json!({"$set": {"t": nine}}))).await;
    assert_eq!((status, body["code"].as_str()), (413, Some("document_too_large")), "{body}");
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 400 << 20, "the server's memory grew by {} MiB", grown >> 20);
    // Nothing of it was stored, and the server still serves.
    let (status, body) = http(server.addr, "GET", "/v1/db/app/docs/a", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["arr"], json!([1]));
    assert!(body.get("t").is_none());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_paths_and_documents_are_refused_and_the_collection_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), ServerConfig::default()).await;
    http(server.addr, "POST", "/v1/db/app/deep", Some(json!({"_id": 1}))).await;
    for components in [3_000, 5_000, 10_000] {
        let path = vec!["a"; components].join(".");
        let (status, body) = http(server.addr, "PATCH", "/v1/db/app/deep/1", Some(json!({"$set": {path: 1}}))).await;
        assert_eq!((status, body["code"].as_str()), (400, Some("bad_update")), "{body}");
        assert!(body["message"].as_str().unwrap().contains("at most 100"), "{body}");
    }
    // A body nested 101 levels (within JSON's own parser limit) is refused as a document.
    let mut deep = json!(1);
    for _ in 0..101 {
        deep = json!({"a": deep});
    }
    let (status, body) = http(server.addr, "PUT", "/v1/db/app/deep/2", Some(deep)).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("document_too_deep")), "{body}");
    // The collection is still readable, by REST and live queries.
    let (status, body) = http(server.addr, "GET", "/v1/db/app/deep", None).await;
    assert_eq!((status, body["docs"].as_array().map(Vec::len)), (200, Some(1)));
    let mut socket = connect(server.addr).await;
    let projection: serde_json::Map<String, serde_json::Value> =
        [(vec!["p"; 10_000].join("."), json!(1))].into_iter().collect();
    send(&mut socket, json!({"type": "subscribe", "id": "p", "ns": "app.deep", "projection": projection})).await;
    let message = expect_error(&next(&mut socket).await, ErrorCode::BadQuery);
    assert!(message.contains("10000 components"), "{message}");
    let sort: serde_json::Map<String, serde_json::Value> = [(vec!["s"; 500].join("."), json!(1))].into_iter().collect();
    send(&mut socket, json!({"type": "subscribe", "id": "s", "ns": "app.deep", "sort": sort})).await;
    expect_error(&next(&mut socket).await, ErrorCode::BadQuery);
    send(&mut socket, json!({"type": "subscribe", "id": "ok", "ns": "app.deep"})).await;
    let ServerMessage::Result(r) = next(&mut socket).await else { panic!("expected a result") };
    assert_eq!(r.docs.len(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expensive_queries_are_bounded_and_others_keep_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig { subscription_memory: 8 << 20, ..Default::default() };
    let server = server_with(dir.path(), config).await;
    let mut hostile = connect(server.addr).await;
    let mut bystander = connect(server.addr).await;
    // 500 Unicode-class regexes: refused by the per-query compile budget, quickly.
    let clauses: Vec<_> = (0..500).map(|i| json!({format!("f{i}"): {"$regex": "\\w{20}"}})).collect();
    send(&mut hostile, json!({"type": "subscribe", "id": "r", "ns": "app.x", "filter": {"$and": clauses}})).await;
    send(&mut bystander, json!({"type": "ping"})).await;
    assert_eq!(next(&mut bystander).await, ServerMessage::Pong);
    let message = expect_error(&next(&mut hostile).await, ErrorCode::BadQuery);
    assert!(message.contains("budget"), "{message}");
    // Subscriptions until the server's memory budget is spent: then `over_capacity`.
    let mut refused = None;
    for i in 0..2_000 {
        send(
            &mut hostile,
            json!({"type": "subscribe", "id": format!("w{i}"), "ns": "app.x", "sort": {"a": 1}, "limit": 2000}),
        )
        .await;
        match next(&mut hostile).await {
            ServerMessage::Result(_) => continue,
            other => {
                refused = Some((i, other));
                break;
            }
        }
    }
    let (count, message) = refused.expect("the budget refused some subscription");
    expect_error(&message, ErrorCode::OverCapacity);
    assert!(count > 0);
    // One subscription asking for more than one may hold.
    send(
        &mut bystander,
        json!({"type": "subscribe", "id": "huge", "ns": "app.x", "sort": {"a": 1}, "limit": 1_000_000_000u64}),
    )
    .await;
    expect_error(&next(&mut bystander).await, ErrorCode::QueryTooLarge);
    // Ending subscriptions gives the budget back.
    for i in 0..count {
        send(&mut hostile, json!({"type": "unsubscribe", "id": format!("w{i}")})).await;
    }
    let _ = next_within(&mut hostile, Duration::from_millis(300)).await;
    send(&mut bystander, json!({"type": "subscribe", "id": "b", "ns": "app.x", "sort": {"a": 1}, "limit": 2000})).await;
    assert!(matches!(next(&mut bystander).await, ServerMessage::Result(_)));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rest_requests_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig { max_body_bytes: 64 * 1024, ..Default::default() };
    let server = server_with(dir.path(), config).await;
    for i in 0..3 {
        http(server.addr, "POST", "/v1/db/app/n", Some(json!({"_id": i}))).await;
    }
    // skip + limit must not wrap.
    let (status, body) = http(server.addr, "GET", "/v1/db/app/n?skip=1&limit=18446744073709551615", None).await;
    assert_eq!((status, body["docs"].as_array().map(Vec::len)), (200, Some(2)), "{body}");
    let raw = |method: &str, path: &str, headers: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let big = format!("{{\"s\": \"{}\"}}", "x".repeat(100 * 1024));
    let cases = [
        (raw("POST", "/v1/db/app/n", "Content-Type: application/json\r\n", "{not json"), 400, "bad_json"),
        (raw("POST", "/v1/db/app/n", "", "{}"), 415, "unsupported_media_type"),
        (raw("POST", "/v1/db/app/n", "Content-Type: application/json\r\n", &big), 413, "body_too_large"),
        (raw("GET", "/v1/db/app/n?skip=abc", "", ""), 400, "bad_query"),
        (raw("GET", "/v1/db/app/n?limit=-1", "", ""), 400, "bad_query"),
        (raw("GET", "/v1/nothing/here", "", ""), 404, "not_found"),
        (raw("DELETE", "/v1/db/app/n", "", ""), 405, "method_not_allowed"),
        (raw("POST", "/v1/db/a.b/c", "Content-Type: application/json\r\n", "{}"), 400, "bad_namespace"),
        (raw("GET", "/v1/db/app/system.users", "", ""), 400, "bad_namespace"),
    ];
    for (request, status, code) in cases {
        let (got, body) = http_raw(server.addr, request.as_bytes()).await;
        let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{request:.80}: {body}");
        assert!(body["message"].is_string());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_websocket_input_gets_errors_or_a_close_code() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig { max_message_bytes: 4096, ..Default::default() };
    let server = server_with(dir.path(), config.clone()).await;
    let mut socket = connect(server.addr).await;
    // A typo in a field name is refused by name, not answered with the whole collection.
    send(&mut socket, json!({"type": "subscribe", "id": "t", "ns": "app.x", "filtr": {"a": 1}})).await;
    let message = expect_error(&next(&mut socket).await, ErrorCode::BadMessage);
    assert!(message.contains("filtr"), "{message}");
    // Ambiguous or invalid namespaces.
    for ns in ["a b.c", "nodot", "db.system.x", "a$b.c"] {
        send(&mut socket, json!({"type": "subscribe", "id": "n", "ns": ns})).await;
        expect_error(&next(&mut socket).await, ErrorCode::BadNamespace);
    }
    // Over the message limit but under the frame limit: an error, the connection stays.
    send(&mut socket, json!({"type": "ping", "pad": "x".repeat(5000)})).await;
    expect_error(&next(&mut socket).await, ErrorCode::MessageTooLarge);
    send(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(next(&mut socket).await, ServerMessage::Pong);
    // Past the frame limit: closed with 1009 and a reason.
    let huge = "x".repeat(config.frame_limit() + 1);
    let _ = socket.send(Message::Text(huge.into())).await;
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 1009, "{reason}");
    // Text that is not UTF-8: closed with 1007.
    let mut socket = connect(server.addr).await;
    let frame = Frame::message(vec![0xff, 0xfe, 0xfd], OpCode::Data(Data::Text), true);
    socket.send(Message::Frame(frame)).await.unwrap();
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 1007, "{reason}");
    // The server still serves.
    let mut socket = connect(server.addr).await;
    send(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(next(&mut socket).await, ServerMessage::Pong);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_time_out_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig { header_timeout: Duration::from_millis(500), max_connections: 8, ..Default::default() };
    let server = server_with(dir.path(), config).await;
    // A client trickling header bytes is cut after the header timeout.
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if slow.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await
            && n == 0
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickling client was never cut");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Eight WebSockets fill the cap; a ninth connection is refused; closing one frees a place.
    let mut sockets = Vec::new();
    for _ in 0..8 {
        sockets.push(connect(server.addr).await);
    }
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", server.addr)).await;
    assert!(refused.is_err(), "a connection past the cap was accepted");
    sockets.pop().unwrap().close(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = http(server.addr, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_window_reread_ends_the_subscription_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig { window_slack: 0, ..Default::default() };
    let server = server_with(dir.path(), config).await;
    for i in 0..5 {
        http(server.addr, "POST", "/v1/db/app/top", Some(json!({"_id": i, "n": i}))).await;
    }
    let mut socket = connect(server.addr).await;
    send(&mut socket, json!({"type": "subscribe", "id": "top", "ns": "app.top", "sort": {"n": 1}, "limit": 2})).await;
    assert!(matches!(next(&mut socket).await, ServerMessage::Result(_)));
    // The window holds exactly two documents; deleting one needs a re-read, which fails.
    server.store().unwrap().inject_read_failures(1_000);
    http(server.addr, "DELETE", "/v1/db/app/top/0", None).await;
    let message = expect_error(&next(&mut socket).await, ErrorCode::Resubscribe);
    assert!(message.contains("subscribe again"), "{message}");
    server.store().unwrap().inject_read_failures(0);
    // The client re-subscribes and gets the right window; the connection kept working.
    send(&mut socket, json!({"type": "subscribe", "id": "top", "ns": "app.top", "sort": {"n": 1}, "limit": 2})).await;
    let ServerMessage::Result(r) = next(&mut socket).await else { panic!("expected a result") };
    let ids: Vec<i32> = r.docs.iter().map(|d| d.get_i32("_id").unwrap()).collect();
    assert_eq!(ids, vec![1, 2]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_failure_turns_healthz_to_503_and_tells_every_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), ServerConfig::default()).await;
    let mut socket = connect(server.addr).await;
    send(&mut socket, json!({"type": "subscribe", "id": "s", "ns": "app.x"})).await;
    assert!(matches!(next(&mut socket).await, ServerMessage::Result(_)));
    let (status, _) = http(server.addr, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    server.engine().inject_worker_panic().unwrap();
    let message = next(&mut socket).await;
    expect_error(&message, ErrorCode::Unavailable);
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 1011, "{reason}");
    let (status, body) = http(server.addr, "GET", "/healthz", None).await;
    assert_eq!((status, body["status"].as_str()), (503, Some("failed")), "{body}");
    assert!(body["reason"].as_str().unwrap().contains("panicked"), "{body}");
    // New connections are closed with the same reason; the server does not pretend.
    let mut socket = connect(server.addr).await;
    send(&mut socket, json!({"type": "subscribe", "id": "t", "ns": "app.x"})).await;
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("failed"), "{reason}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_larger_than_a_subscription_may_hold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig { max_subscription_bytes: 64 * 1024, ..Default::default() };
    let server = server_with(dir.path(), config).await;
    let pad = "x".repeat(10_000);
    for i in 0..10 {
        http(server.addr, "POST", "/v1/db/app/big", Some(json!({"_id": i, "pad": pad}))).await;
    }
    let mut socket = connect(server.addr).await;
    send(&mut socket, json!({"type": "subscribe", "id": "all", "ns": "app.big"})).await;
    let message = expect_error(&next(&mut socket).await, ErrorCode::QueryTooLarge);
    assert!(message.contains("65536"), "{message}");
    // A narrower query on the same connection is fine, and nothing is left behind.
    send(&mut socket, json!({"type": "subscribe", "id": "one", "ns": "app.big", "filter": {"_id": 1}})).await;
    assert!(matches!(next(&mut socket).await, ServerMessage::Result(_)));
    let (_, health) = http(server.addr, "GET", "/healthz", None).await;
    assert_eq!(health["subscriptions"], json!(1), "{health}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_even_with_a_large_queue() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        queue_capacity: 1 << 20,
        queue_bytes: 1 << 30,
        heartbeat: Duration::from_millis(500),
        resume_grace: Duration::from_millis(200),
        ..Default::default()
    };
    let server = livegrid::server::start(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().to_path_buf(),
        ..config
    })
    .await
    .unwrap();
    // The stalled client subscribes, then never reads again (not even pings).
    let mut stalled = connect(server.addr).await;
    send(&mut stalled, json!({"type": "subscribe", "id": "all", "ns": "app.flood"})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pad = "x".repeat(64 * 1024);
    for batch in 0..40 {
        let writes: Vec<_> = (0..10).map(|i| json!({"insert": {"_id": batch * 100 + i, "pad": pad}})).collect();
        let (status, _) = http(server.addr, "POST", "/v1/db/app/flood/_bulk", Some(json!({"writes": writes}))).await;
        assert_eq!(status, 200);
    }
    // The server's send to it times out, the connection is cut, and its subscription is
    // released after the grace window instead of being held forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, health) = http(server.addr, "GET", "/healthz", None).await;
        if health["subscriptions"] == json!(0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the stalled client was never cut: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(stalled);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_and_per_query_limits_get_specific_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        max_connections_per_address: 2,
        max_messages_per_second: 10,
        max_in_values: 3,
        max_window: 100,
        max_filter_depth: 4,
        max_regex_bytes: 10,
        max_regex_memory: 64 << 10,
        ..Default::default()
    };
    let server = server_with(dir.path(), config).await;
    let addr = server.addr;
    // Sets and windows beyond the limits: query_too_large naming the limit; the connection stays.
    let mut socket = connect(addr).await;
    send(&mut socket, json!({"type": "subscribe", "id": "a", "ns": "db.c", "filter": {"x": {"$in": [1, 2, 3, 4]}}}))
        .await;
    assert!(expect_error(&next(&mut socket).await, ErrorCode::QueryTooLarge).contains("at most 3"));
    send(&mut socket, json!({"type": "subscribe", "id": "b", "ns": "db.c", "sort": {"x": 1}, "skip": 90, "limit": 11}))
        .await;
    assert!(expect_error(&next(&mut socket).await, ErrorCode::QueryTooLarge).contains("at most at 100"));
    send(
        &mut socket,
        json!({"type": "subscribe", "id": "d", "ns": "db.c", "filter": {"a": {"b": {"c": {"d": {"e": 1}}}}}}),
    )
    .await;
    assert!(expect_error(&next(&mut socket).await, ErrorCode::QueryTooLarge).contains("at most 4 are allowed"));
    send(
        &mut socket,
        json!({"type": "subscribe", "id": "r", "ns": "db.c", "filter": {"a": {"$regex": "a".repeat(11)}}}),
    )
    .await;
    assert!(expect_error(&next(&mut socket).await, ErrorCode::QueryTooLarge).contains("at most 10 are allowed"));
    // Short patterns whose compiled form is large (Unicode classes) meet the memory limit.
    let heavy = json!({"$or": [{"a": {"$regex": "\\w{9}"}}, {"b": {"$regex": "\\w{9}"}}]});
    send(&mut socket, json!({"type": "subscribe", "id": "m", "ns": "db.c", "filter": heavy.clone()})).await;
    let message = expect_error(&next(&mut socket).await, ErrorCode::QueryTooLarge);
    assert!(message.contains("regular expressions compile to") && message.contains("at most 65536"), "{message}");
    // REST queries meet the same limits.
    let filter = |f: &serde_json::Value| form_urlencoded::byte_serialize(f.to_string().as_bytes()).collect::<String>();
    for (f, code) in [
        (heavy, "query_too_large"),
        (json!({"x": {"$in": [1, 2, 3, 4]}}), "query_too_large"),
        (json!({"x": {"$bogus": 1}}), "bad_query"),
    ] {
        let (status, body) = common::http(addr, "GET", &format!("/v1/db/db/c?filter={}", filter(&f)), None).await;
        assert_eq!((status, body["code"].as_str()), (400, Some(code)), "{f}: {body}");
    }
    send(&mut socket, json!({"type": "subscribe", "id": "c", "ns": "db.c", "sort": {"x": 1}, "limit": 100})).await;
    expect_result(&next(&mut socket).await);
    // A burst beyond 5 messages a second: the rest are dropped with rate_limited.
    for _ in 0..10 {
        send(&mut socket, json!({"type": "ping"})).await;
    }
    let (mut pongs, mut limited) = (0, 0);
    for _ in 0..10 {
        match next(&mut socket).await {
            ServerMessage::Pong => pongs += 1,
            other => {
                expect_error(&other, ErrorCode::RateLimited);
                limited += 1;
            }
        }
    }
    assert!(pongs <= 6 && limited >= 4, "{pongs} pongs, {limited} limited");
    // A second later the connection is served again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(&mut socket, json!({"type": "ping"})).await;
    assert_eq!(next(&mut socket).await, ServerMessage::Pong);
    // Two WebSockets per address: the third is refused with 429 until one closes.
    let second = connect(addr).await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("expected 429, got {other:?}"),
    }
    drop(second);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the closed connection's place never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
