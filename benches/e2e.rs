//! End to end over WebSockets against a live-query server running as its own process:
//! `livegrid serve` or Parse Server's LiveQuery (`benches/peers/parse_server.mjs`, on
//! PostgreSQL). The same clients, subscriptions and writes for both; `scripts/e2e_bench.py`
//! starts the servers and runs this once per target and write rate.
//!
//! `LIVEGRID_E2E_CONNECTIONS` WebSocket connections (default 100) hold
//! `LIVEGRID_E2E_SUBSCRIPTIONS` subscriptions (default 2,000) to `{"room": "r<k / fanout>"}`,
//! so every `LIVEGRID_E2E_FANOUT` subscriptions (default 10) share a room, spread over as
//! many connections. Writes insert one message each into a random room through the server's
//! REST API (livegrid: `POST /v1/db/bench/run<N>`; Parse: `POST /parse/classes/Run<N>`), from
//! `LIVEGRID_E2E_WRITERS` keep-alive connections (default 64), paced at `LIVEGRID_E2E_RATE`
//! writes/s for `LIVEGRID_E2E_SECONDS` (default 10). Both servers acknowledge a write once it
//! is durable (livegrid's group commit, PostgreSQL's commit).
//!
//! Each write changes exactly `fanout` subscriptions' results: the oracle. Every (write,
//! subscription) pair must be notified exactly once: a pair never notified is lost; a
//! notification for a subscription of another room, or a second one for a pair, is wrong.
//! After the writes the harness waits for the missing ones (until none arrive for
//! `LIVEGRID_E2E_DRAIN` seconds, default 5, or for one second once all are in). Latency is
//! from the time a write was due on the schedule (it is in the document, `t`; counting from
//! the schedule, not from the send, keeps the time a write waited for a free writer) to a
//! client receiving its notification; the clients share the machine with the server, for
//! both targets alike.
//!
//! Prints one JSON line: offered and achieved writes/s, notifications expected, received,
//! lost and wrong, notifications/s, latency percentiles and the CDF (for the plots).
//! Once every subscription is confirmed it prints `{"subscribed": N}` and waits
//! `LIVEGRID_E2E_HOLD` seconds (default 0) before writing, for a memory reading.
//! `LIVEGRID_E2E_HOST` is the server's `host:port` (required);
//! `LIVEGRID_E2E_RUN` numbers the collection (class) so that every run starts empty. Without
//! `LIVEGRID_E2E_HOST` (as part of a plain `cargo bench`) it says so and does nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use futures_util::{SinkExt, StreamExt};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn micros() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// The server under test and how to speak to it.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Livegrid,
    Parse,
}

#[derive(Clone)]
struct Setup {
    target: Target,
    host: String,
    run: u64,
    fanout: usize,
    rooms: usize,
    /// Writes in the run, numbered 0..writes.
    writes: u64,
}

impl Setup {
    fn ws_url(&self) -> String {
        match self.target {
            Target::Livegrid => format!("ws://{}/v1/ws", self.host),
            Target::Parse => format!("ws://{}/parse", self.host),
        }
    }

    fn write_path(&self) -> String {
        match self.target {
            Target::Livegrid => format!("/v1/db/bench/run{}", self.run),
            Target::Parse => format!("/parse/classes/Run{}", self.run),
        }
    }

    /// The messages that open a connection, before its subscriptions.
    fn hello(&self) -> Option<String> {
        (self.target == Target::Parse).then(|| json!({"op": "connect", "applicationId": "bench"}).to_string())
    }

    fn subscribe(&self, local: usize, room: usize) -> String {
        let room = format!("r{room}");
        match self.target {
            Target::Livegrid => json!({"type": "subscribe", "id": format!("s{local}"), "ns": format!("bench.run{}", self.run), "filter": {"room": room}}),
            Target::Parse => json!({"op": "subscribe", "requestId": local + 1, "query": {"className": format!("Run{}", self.run), "where": {"room": room}}}),
        }
        .to_string()
    }
}

/// What one server message is, read from its text without parsing the rest (the clients share
/// the server's cores, so they do as little as possible).
enum Incoming {
    /// A subscription is in place (livegrid's initial result, Parse's `subscribed`).
    Subscribed,
    /// A change: the connection-local subscription, the document's room, write number and
    /// the time the write was due.
    Notification {
        local: usize,
        room: Option<usize>,
        write: Option<u64>,
        sent: Option<u64>,
    },
    Other,
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = &text[start..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

fn classify(target: Target, text: &str) -> Incoming {
    let room = number_after(text, r#""room":"r"#).map(|r| r as usize);
    let sent = number_after(text, r#""t":"#);
    let write = number_after(text, r#""n":"#);
    match target {
        Target::Livegrid if text.starts_with(r#"{"type":"result""#) => Incoming::Subscribed,
        Target::Livegrid if text.starts_with(r#"{"type":"delta""#) => match number_after(text, r#""id":"s"#) {
            Some(local) => Incoming::Notification { local: local as usize, room, write, sent },
            None => Incoming::Other,
        },
        Target::Parse if text.starts_with(r#"{"op":"subscribed""#) => Incoming::Subscribed,
        Target::Parse if text.starts_with(r#"{"op":"create""#) => match number_after(text, r#""requestId":"#) {
            Some(request) => Incoming::Notification { local: request.saturating_sub(1) as usize, room, write, sent },
            None => Incoming::Other,
        },
        _ => Incoming::Other,
    }
}

/// What all connections count together.
#[derive(Default)]
struct Tally {
    subscribed: AtomicU64,
    received: AtomicU64,
    /// Notifications for a subscription whose room is not the document's, or without a
    /// write number.
    wrong: AtomicU64,
    /// Notifications of a (write, subscription) pair already notified.
    duplicates: AtomicU64,
    /// When the latest notification arrived (micros).
    last: AtomicU64,
    latencies: Mutex<Vec<u64>>,
    /// One bit per (write, subscription of its room): bit `n * fanout + k % fanout` for write
    /// `n` and global subscription `k`. Set once the pair's notification arrived.
    delivered: Vec<AtomicU64>,
}

impl Tally {
    /// Records that subscription `global` was notified of write `n`; false for a repeat.
    fn deliver(&self, n: u64, global: usize, fanout: usize) -> bool {
        let bit = n as usize * fanout + global % fanout;
        let Some(word) = self.delivered.get(bit / 64) else { return false };
        let mask = 1u64 << (bit % 64);
        word.fetch_or(mask, Ordering::Relaxed) & mask == 0
    }

    /// How many (write, subscription) pairs were notified.
    fn delivered(&self) -> u64 {
        self.delivered.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum()
    }
}

/// One client connection holding the subscriptions `globals` (global numbers).
async fn client(setup: Setup, globals: Vec<usize>, tally: Arc<Tally>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(setup.ws_url(), Some(config), false)
        .await
        .expect("websocket connect");
    if let Some(hello) = setup.hello() {
        socket.send(Message::Text(hello.into())).await.unwrap();
    }
    for (local, global) in globals.iter().enumerate() {
        socket.send(Message::Text(setup.subscribe(local, global / setup.fanout).into())).await.unwrap();
    }
    let mut mine = Vec::new();
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            _ = stop.changed() => break,
        };
        let Some(Ok(message)) = message else { break };
        let Message::Text(text) = message else { continue };
        let now = micros();
        match classify(setup.target, &text) {
            Incoming::Subscribed => {
                tally.subscribed.fetch_add(1, Ordering::Relaxed);
            }
            Incoming::Notification { local, room, write, sent } => {
                match (globals.get(local), write) {
                    (Some(global), Some(n)) if n < setup.writes && Some(global / setup.fanout) == room => {
                        if !tally.deliver(n, *global, setup.fanout) {
                            tally.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        tally.wrong.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Some(sent) = sent {
                    mine.push(now.saturating_sub(sent));
                }
                tally.received.fetch_add(1, Ordering::Relaxed);
                tally.last.fetch_max(now, Ordering::Relaxed);
                if mine.len() >= 256 {
                    tally.latencies.lock().unwrap().append(&mut mine);
                }
            }
            Incoming::Other => {}
        }
        if text.contains(r#""type":"error""#) || text.starts_with(r#"{"op":"error""#) {
            eprintln!("server error: {text}");
        }
        if text.starts_with(r#"{"type":"bye""#) {
            break;
        }
    }
    tally.latencies.lock().unwrap().append(&mut mine);
}

/// One keep-alive writer: takes writes off the shared schedule until it is done. Returns the
/// rooms it wrote to (for the oracle) and the time of its last acknowledgement.
async fn writer(setup: Setup, next: Arc<AtomicU64>, rate: u64, start: (Instant, u64)) -> (Vec<usize>, Instant) {
    let total = setup.writes;
    let stream = tokio::net::TcpStream::connect(&setup.host).await.expect("connect for writes");
    stream.set_nodelay(true).unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let path = setup.write_path();
    let mut rooms = Vec::new();
    let mut last = Instant::now();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            break;
        }
        // When the write is due: its latency counts from then, so that time spent waiting for
        // a free writer when the server answers slowly is not left out.
        let offset = Duration::from_secs_f64(i as f64 / rate as f64);
        let due = start.1 + offset.as_micros() as u64;
        tokio::time::sleep_until((start.0 + offset).into()).await;
        // A fixed pseudo-random room per write (the same sequence for both targets).
        let mut x = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 31;
        let room = (x % setup.rooms as u64) as usize;
        let mut doc = json!({"room": format!("r{room}"), "n": i, "text": "a short chat message", "t": due});
        let mut request =
            Request::post(path.as_str()).header("host", "localhost").header("content-type", "application/json");
        match setup.target {
            Target::Livegrid => doc["_id"] = json!(i),
            Target::Parse => {
                request =
                    request.header("x-parse-application-id", "bench").header("x-parse-master-key", "bench-master-key");
            }
        }
        let response = sender.send_request(request.body(Body::from(doc.to_string())).unwrap()).await.expect("write");
        let status = response.status();
        let body = axum::body::to_bytes(Body::new(response.into_body()), 1 << 20).await.unwrap();
        assert_eq!(status, 201, "write refused: {}", String::from_utf8_lossy(&body));
        rooms.push(room);
        last = Instant::now();
    }
    (rooms, last)
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let Ok(host) = std::env::var("LIVEGRID_E2E_HOST") else {
        // Part of `cargo bench`, which starts no server: the harness needs one.
        eprintln!(
            "e2e: needs a server under test (LIVEGRID_E2E_HOST); run scripts/e2e_bench.py or scripts/bench.sh e2e"
        );
        return;
    };
    let target = match env("LIVEGRID_E2E_TARGET", "livegrid".to_string()).as_str() {
        "livegrid" => Target::Livegrid,
        "parse" => Target::Parse,
        other => panic!("LIVEGRID_E2E_TARGET must be livegrid or parse, not {other}"),
    };
    let subscriptions: usize = env("LIVEGRID_E2E_SUBSCRIPTIONS", 2_000);
    let connections: usize = env("LIVEGRID_E2E_CONNECTIONS", 100).clamp(1, subscriptions.max(1));
    let fanout: usize = env("LIVEGRID_E2E_FANOUT", 10).clamp(1, subscriptions.max(1));
    let rate: u64 = env("LIVEGRID_E2E_RATE", 100).max(1);
    let seconds: f64 = env("LIVEGRID_E2E_SECONDS", 10.0);
    let writers: usize = env("LIVEGRID_E2E_WRITERS", 64).max(1);
    let drain: u64 = env("LIVEGRID_E2E_DRAIN", 5);
    let hold: f64 = env("LIVEGRID_E2E_HOLD", 0.0);
    let setup = Setup {
        target,
        host,
        run: env("LIVEGRID_E2E_RUN", 0),
        fanout,
        rooms: subscriptions.div_ceil(fanout),
        writes: ((rate as f64 * seconds) as u64).max(1),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        micros();
        let pairs = setup.writes as usize * fanout;
        let tally = Arc::new(Tally {
            delivered: (0..pairs.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            ..Tally::default()
        });
        // Subscription k lives on connection k % connections: a room's subscriptions are on
        // different connections.
        let mut clients = Vec::new();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        for c in 0..connections {
            let globals: Vec<usize> = (c..subscriptions).step_by(connections).collect();
            clients.push(tokio::spawn(client(setup.clone(), globals, tally.clone(), stopped.clone())));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while tally.subscribed.load(Ordering::Relaxed) < subscriptions as u64 {
            assert!(
                Instant::now() < deadline,
                "only {} of {subscriptions} subscriptions confirmed",
                tally.subscribed.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The subscriptions are in place: whoever measures the server's memory may do it now.
        println!("{}", json!({"subscribed": subscriptions}));
        tokio::time::sleep(Duration::from_secs_f64(hold)).await;

        let total = setup.writes;
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let started_micros = micros();
        let tasks: Vec<_> = (0..writers)
            .map(|_| tokio::spawn(writer(setup.clone(), next.clone(), rate, (start, started_micros))))
            .collect();
        let mut rooms = vec![0u64; setup.rooms];
        let mut last_ack = start;
        for task in tasks {
            let (written, last) = task.await.unwrap();
            for room in written {
                rooms[room] += 1;
            }
            last_ack = last_ack.max(last);
        }
        // `total` writes take `total` intervals: the last is due at (total - 1) / rate.
        let write_seconds = (last_ack - start).as_secs_f64() + 1.0 / rate as f64;
        let expected: u64 = (0..subscriptions).map(|k| rooms[k / fanout]).sum();
        // Wait until none arrive for `drain` seconds, or for one second once the expected
        // number is in (a duplicate or a stray notification still has time to show).
        let mut seen = (tally.received.load(Ordering::Relaxed), Instant::now());
        let hard = Instant::now() + Duration::from_secs(120);
        let quiet = |seen: &(u64, Instant)| {
            let limit = if seen.0 >= expected { Duration::from_secs(1) } else { Duration::from_secs(drain) };
            seen.1.elapsed() >= limit
        };
        while !quiet(&seen) && Instant::now() < hard {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = tally.received.load(Ordering::Relaxed);
            if now != seen.0 {
                seen = (now, Instant::now());
            }
        }
        let received = tally.received.load(Ordering::Relaxed);
        let last = tally.last.load(Ordering::Relaxed).max(started_micros + 1);
        let notify_seconds = (last - started_micros) as f64 / 1e6;
        stop.send_replace(true);
        for client in clients {
            client.await.unwrap();
        }
        // The oracle: every subscription of a write's room gets that write exactly once. A
        // (write, subscription) pair never notified is lost; a notification for a subscription
        // of another room, or a second one for a pair, is wrong.
        let lost = expected - tally.delivered().min(expected);
        let wrong = tally.wrong.load(Ordering::Relaxed) + tally.duplicates.load(Ordering::Relaxed);
        let mut all = std::mem::take(&mut *tally.latencies.lock().unwrap());
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len().saturating_sub(1)) as f64 * p).round() as usize)
                .map_or(f64::NAN, |v| *v as f64 / 1000.0)
        };
        let mut quantiles: Vec<f64> = (0..=100).map(|q| q as f64 / 100.0).collect();
        quantiles.extend([0.995, 0.999, 0.9999]);
        quantiles.sort_by(f64::total_cmp);
        let cdf: Vec<[f64; 2]> = quantiles.iter().map(|q| [pct(*q), *q]).collect();
        let achieved = total as f64 / write_seconds;
        let summary = json!({
            "target": match target { Target::Livegrid => "livegrid", Target::Parse => "parse" },
            "connections": connections,
            "subscriptions": subscriptions,
            "fanout": fanout,
            "writers": writers,
            "offered_writes_per_sec": rate,
            "writes": total,
            "achieved_writes_per_sec": achieved,
            "expected": expected,
            "received": received,
            "lost": lost,
            "wrong": wrong,
            "notifications_per_sec": received as f64 / notify_seconds,
            "sustained": lost == 0 && wrong == 0 && achieved >= 0.95 * rate as f64,
            "p50_ms": pct(0.5),
            "p90_ms": pct(0.9),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
            "cdf_ms": cdf,
        });
        println!("{summary}");
    });
}
