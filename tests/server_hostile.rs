//! A corpus of hostile input over real connections: nesting 100,000 levels deep, numbers out
//! of range, unknown message types, wrong JSON types in every field, malformed Extended JSON,
//! on the WebSocket and on REST. Each gets a specific error, the connection keeps working, and
//! the server still serves everyone afterwards. (Oversized frames, invalid UTF-8 and broken
//! WebSocket framing close with their codes: `tests/server_safety.rs`.)

mod common;

use common::{connect, http, http_raw, next, send, server_with};
use futures_util::SinkExt;
use livegrid::server::ServerConfig;
use livegrid_protocol::{ErrorCode, ServerMessage};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// `{"a": {"a": ... 1 ...}}`, `depth` levels, as text (serde_json could not build it).
fn nested(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_get_specific_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), ServerConfig::default()).await;
    let addr = server.addr;
    let mut socket = connect(addr).await;
    let sub = |rest: &str| format!(r#"{{"type":"subscribe","id":"h","ns":"db.c"{rest}}}"#);
    let corpus: Vec<(String, &[ErrorCode])> = vec![
        (sub(&format!(r#","filter":{}"#, nested(100_000))), &[ErrorCode::BadMessage]),
        (sub(&format!(r#","filter":{}"#, nested(150))), &[ErrorCode::BadMessage, ErrorCode::BadQuery]),
        (sub(r#","filter":{"a":1e400}"#), &[ErrorCode::BadMessage]),
        (sub(r#","filter":{"a":-1e400}"#), &[ErrorCode::BadMessage]),
        (sub(r#","skip":-1"#), &[ErrorCode::BadMessage]),
        (sub(r#","limit":18446744073709551616"#), &[ErrorCode::BadMessage]),
        (sub(r#","limit":"ten""#), &[ErrorCode::BadMessage]),
        (sub(r#","filter":"everything""#), &[ErrorCode::BadMessage]),
        (sub(r#","filter":[1,2]"#), &[ErrorCode::BadMessage]),
        (sub(r#","sort":1"#), &[ErrorCode::BadMessage]),
        (sub(r#","sort":{"a":"up"}"#), &[ErrorCode::BadQuery]),
        (sub(r#","projection":[1]"#), &[ErrorCode::BadMessage]),
        (sub(r#","projection":{"a":1,"b":0}"#), &[ErrorCode::BadQuery]),
        (sub(r#","filter":{"_id":{"$oid":"zz"}}"#), &[ErrorCode::BadMessage]),
        (sub(r#","filter":{"t":{"$date":"yesterday"}}"#), &[ErrorCode::BadMessage]),
        (sub(r#","filter":{"n":{"$numberDecimal":"many"}}"#), &[ErrorCode::BadMessage]),
        (sub(r#","filter":{"b":{"$binary":{"base64":"!!","subType":"00"}}}"#), &[ErrorCode::BadMessage]),
        (sub(r#","filter":{"a":{"$frobnicate":1}}"#), &[ErrorCode::BadQuery]),
        (sub(r#","filter":{"$where":"sleep(100000)"}"#), &[ErrorCode::BadQuery]),
        (sub(r#","filter":{"a":{"$regex":"(a+)+$","$options":"q"}}"#), &[ErrorCode::BadQuery]),
        (sub(r#","filter":{"a":{"$in":5}}"#), &[ErrorCode::BadQuery]),
        (sub(r#","filter":{"a":{"$size":-1}}"#), &[ErrorCode::BadQuery]),
        (sub(r#","filter":{"a":{"$mod":[0,1]}}"#), &[ErrorCode::BadQuery]),
        (sub(r#","filter":{"a":{"$type":"nonsense"}}"#), &[ErrorCode::BadQuery]),
        (r#"{"type":"subscribe","id":5,"ns":"db.c"}"#.into(), &[ErrorCode::BadMessage]),
        (r#"{"type":"subscribe","id":"h","ns":["db","c"]}"#.into(), &[ErrorCode::BadMessage]),
        (r#"{"type":"subscribe","id":"h","ns":"no-dot"}"#.into(), &[ErrorCode::BadNamespace]),
        (r#"{"type":"subscribe","id":"h","ns":"db.$c"}"#.into(), &[ErrorCode::BadNamespace]),
        (r#"{"type":"frobnicate"}"#.into(), &[ErrorCode::BadMessage]),
        (r#"{"type":null}"#.into(), &[ErrorCode::BadMessage]),
        (r#"{"type":"unsubscribe","id":{"$gt":""}}"#.into(), &[ErrorCode::BadMessage]),
        (r#"{"type":"auth","token":"x"}"#.into(), &[ErrorCode::Unauthorized]),
        (r#"[]"#.into(), &[ErrorCode::BadMessage]),
        (r#"nul"#.into(), &[ErrorCode::BadMessage]),
        ("\u{0}\u{1}\u{2}".into(), &[ErrorCode::BadMessage]),
        ("{\"type\":\"ping\"".into(), &[ErrorCode::BadMessage]),
    ];
    for (text, expected) in &corpus {
        socket.send(Message::Text(text.clone().into())).await.unwrap();
        match next(&mut socket).await {
            ServerMessage::Error(e) => assert!(
                expected.contains(&e.code),
                "{}: got {:?} ({})",
                text.chars().take(80).collect::<String>(),
                e.code,
                e.message
            ),
            other => panic!("{}: expected an error, got {other:?}", text.chars().take(80).collect::<String>()),
        }
        // The connection keeps working after each.
        send(&mut socket, json!({"type": "ping"})).await;
        assert_eq!(next(&mut socket).await, ServerMessage::Pong, "{}", text.chars().take(80).collect::<String>());
    }

    // REST: the same kinds of input get JSON errors with their status.
    let deep = nested(100_000);
    let bodies = [
        ("POST", "/v1/db/app/items", deep.as_str(), 400),
        ("POST", "/v1/db/app/items", r#"{"a":1e400}"#, 400),
        ("POST", "/v1/db/app/items", r#"{"_id":{"$oid":"zz"}}"#, 400),
        ("POST", "/v1/db/app/items", r#"[1,2,3]"#, 400),
        ("POST", "/v1/db/app/items", r#"{"_id":[1,2]}"#, 400),
        ("PATCH", "/v1/db/app/items/1", r#"{"$frobnicate":{"a":1}}"#, 400),
        ("POST", "/v1/db/app/items/_bulk", r#"{"writes":"all"}"#, 400),
        ("POST", "/v1/db/app/items/_bulk", r#"{"writes":[{"explode":{}}]}"#, 400),
    ];
    for (method, path, body, status) in bodies {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (got, text) = http_raw(addr, request.as_bytes()).await;
        assert_eq!(got, status, "{method} {path} {}: {text}", body.chars().take(60).collect::<String>());
        let error: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(error["code"].is_string() && error["message"].is_string(), "{text}");
    }
    let queries = [
        "/v1/db/app/items?filter=%7B%22a%22%3A1e400%7D",
        "/v1/db/app/items?filter=%5B1%5D",
        "/v1/db/app/items?skip=-1",
        "/v1/db/app/items?limit=x",
        "/v1/db/app/items?sort=%7B%22a%22%3A%22up%22%7D",
    ];
    for query in queries {
        let (status, body) = http(addr, "GET", query, None).await;
        assert_eq!(status, 400, "{query}: {body}");
    }

    // And everyone is still served.
    let (status, health) = http(addr, "GET", "/healthz", None).await;
    assert_eq!(status, 200, "{health}");
    let mut fresh = connect(addr).await;
    send(&mut fresh, json!({"type": "subscribe", "id": "ok", "ns": "db.c"})).await;
    assert!(matches!(next(&mut fresh).await, ServerMessage::Result(_)));
}
