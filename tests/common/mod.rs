//! Helpers shared by the server tests: a real server on a loopback port (in process or as the
//! real binary), a minimal HTTP/1.1 client, and WebSocket clients.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use livegrid::server::{RunningServer, ServerConfig, start};
use livegrid_protocol::ServerMessage;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

pub mod mongo_fixture;

pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A server in this process on a free loopback port, with a long heartbeat.
pub async fn server_with(data: &std::path::Path, config: ServerConfig) -> RunningServer {
    start(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: data.to_path_buf(),
        heartbeat: Duration::from_secs(60),
        ..config
    })
    .await
    .unwrap()
}

/// One request on its own connection; the status and the body parsed as JSON (`Null` when
/// it is not JSON).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, _, body) = http_as(addr, method, path, None, body).await;
    (status, body)
}

/// The secret tests sign their tokens with.
pub const SECRET: &str = "a test secret of at least thirty-two bytes";

/// An HS256 token signed with [`SECRET`] for `user` with `roles`, valid for `seconds`.
pub fn token(user: &str, roles: &[&str], seconds: u64) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + seconds;
    let claims = serde_json::json!({"sub": user, "roles": roles, "exp": exp});
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A JSON request with an optional bearer token: the status, the headers (names lowercase)
/// and the body as JSON (`null` if it is not JSON).
pub async fn http_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Vec<(String, String)>, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, headers, text) = http_response(addr, request.as_bytes()).await;
    (status, headers, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Sends raw request bytes; the status and the body as text.
pub async fn http_raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let (status, _, body) = http_response(addr, request).await;
    (status, body)
}

/// Sends raw request bytes; the status, the headers (names lowercase) and the body as text.
pub async fn http_response(addr: SocketAddr, request: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status: u16 = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// A GET with extra headers; the status, one response header's value, and the body.
pub async fn get_with(addr: SocketAddr, path: &str, extra: &str, header: &str) -> (u16, Option<String>, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n");
    let (status, headers, body) = http_response(addr, request.as_bytes()).await;
    let value = headers.into_iter().find(|(name, _)| name == header).map(|(_, v)| v);
    (status, value, body)
}

pub async fn connect(addr: SocketAddr) -> Socket {
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await.unwrap();
    socket
}

pub async fn send(socket: &mut Socket, message: Value) {
    socket.send(Message::Text(message.to_string().into())).await.unwrap();
}

/// The next server message, within 10 s.
pub async fn next(socket: &mut Socket) -> ServerMessage {
    next_within(socket, Duration::from_secs(10)).await.expect("a message in time")
}

/// The next server message, or `None` when none arrives within `wait`.
pub async fn next_within(socket: &mut Socket, wait: Duration) -> Option<ServerMessage> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next()).await.ok()?;
        match message.expect("connection open").expect("a frame") {
            Message::Text(text) => return Some(serde_json::from_str(&text).unwrap()),
            Message::Close(frame) => panic!("connection closed: {frame:?}"),
            _ => {}
        }
    }
}

/// The close frame the server sends next (other messages are skipped), within 20 s.
pub async fn close_frame(socket: &mut Socket) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), socket.next()).await.expect("close in time") {
            Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), frame.reason.to_string()),
            Some(Ok(Message::Close(None))) => panic!("close frame without a reason"),
            Some(Ok(_)) => continue,
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    }
}

/// Applies a `result` or `delta` to the live result of its subscription id.
pub fn apply_message(
    live: &mut std::collections::BTreeMap<String, livegrid_protocol::LiveResult>,
    message: &ServerMessage,
) {
    let id = match message {
        ServerMessage::Result(r) => r.id.clone(),
        ServerMessage::Delta(d) => d.id.clone(),
        other => panic!("unexpected {other:?}"),
    };
    live.entry(id).or_default().apply(message).unwrap();
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The real binary serving `data` on `port`, with extra flags; waits until it answers.
#[allow(clippy::zombie_processes, reason = "the caller owns the child and waits for it")]
pub async fn spawn_server(data: &std::path::Path, port: u16, extra: &[&str]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(data)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return child;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `signal` (`-KILL`, `-STOP`, ...) to a process.
pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits for a process to exit, within 30 s.
pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// This process's resident memory in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// A small deterministic random number generator (xorshift): `next(n)` is below `n`.
pub fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

/// The database state after a file of change events (the format `livegrid replay` reads).
pub fn state_after(events: &std::path::Path) -> livegrid_engine::memory::MemoryState {
    use livegrid::source::change_stream_event::{self, Parsed};
    let mut state = livegrid_engine::memory::MemoryState::default();
    let text = std::fs::read_to_string(events).unwrap();
    for (i, line) in text.lines().enumerate() {
        let parsed =
            change_stream_event::parse(line, i as u64 + 1, state.position(), |ns, id| state.get(ns, id).cloned());
        if let Parsed::Write(e) = parsed.unwrap() {
            state.apply(&e);
        }
    }
    state
}

/// Applies messages until every subscription shows what `expected` says (by id, in any
/// order), or fails after 20 quiet seconds.
pub async fn settle(
    socket: &mut Socket,
    live: &mut std::collections::BTreeMap<String, livegrid_protocol::LiveResult>,
    expected: &std::collections::BTreeMap<String, Vec<bson::Document>>,
) {
    let text = |d: &bson::Document| bson::Bson::Document(d.clone()).into_relaxed_extjson().to_string();
    let mut quiet = 0;
    loop {
        let done = expected.iter().all(|(id, docs)| {
            live.get(id).is_some_and(|r| {
                let mut shown: Vec<String> = r.docs().iter().map(text).collect();
                let mut want: Vec<String> = docs.iter().map(text).collect();
                shown.sort();
                want.sort();
                r.is_whole() && shown == want
            })
        });
        if done {
            return;
        }
        match next_within(socket, Duration::from_millis(500)).await {
            Some(message) => apply_message(live, &message),
            None => {
                quiet += 1;
                let shown: std::collections::BTreeMap<_, _> =
                    live.iter().map(|(id, r)| (id.clone(), r.docs().len())).collect();
                assert!(
                    quiet < 40,
                    "results did not reach the expected state within 20 s: shown {shown:?}, expected {expected:?}"
                );
            }
        }
    }
}

/// Subscribes to `queries` (id, then the subscribe message's query fields) on `ns`.
pub async fn subscribe(socket: &mut Socket, ns: &str, queries: &[(&str, Value)]) {
    for (id, query) in queries {
        let mut message = serde_json::json!({"type": "subscribe", "id": id, "ns": ns});
        message.as_object_mut().unwrap().extend(query.as_object().unwrap().clone());
        send(socket, message).await;
    }
}
