//! Load test of `livegrid serve`: 1,000 WebSocket connections on loopback holding 10,000
//! subscriptions (10 each, `{"owner": "u<k>"}`), while writes stream in through the REST bulk
//! endpoint at a fixed rate (`LIVEGRID_LOAD_RATE`, default 10,000 writes/s, in 1 ms batches,
//! for `LIVEGRID_LOAD_SECONDS`, default 5). With `LIVEGRID_LOAD_FANOUT=n` (default 1) every
//! `n` subscriptions share an owner, so each write changes `n` results (fan-out). With
//! `LIVEGRID_LOAD_SILENT=1` the first connection subscribes and then reads nothing at all:
//! the server must cut it and stay within its memory budget (the peak RSS of this process,
//! server and clients together, is reported).
//! With `LIVEGRID_LOAD_ACL=1` the server uses authentication: connection `c` is user `u<c>`
//! (1,000 users), every subscription's filter gets the object-ACL predicate folded in, and
//! every write carries `_acl: {"read": ["user:<the owner's user>"]}` (so the same deltas flow
//! as without ACLs). The CPU time of the process during the write phase is reported, to
//! compare the two. `LIVEGRID_STORE_CACHE_MIB` sets the store's page cache (default 256)
//! and `LIVEGRID_RETENTION` the writes the retention buffer keeps (default 100,000).
//! Write-to-client latency: each document carries the time it was sent; each client takes
//! the time its delta arrives. The server and the clients share this process and its 2
//! cores, so the figures are conservative.
//!
//! Run with `scripts/bench.sh load` (or `cargo bench --bench load`).

/// The allocator the `livegrid` binary uses, so that the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use livegrid::server::{ServerConfig, start};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const CONNECTIONS: usize = 1_000;
const PER_CONNECTION: usize = 10;

fn micros() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// The HS256 secret of the ACL mode.
const SECRET: &str = "the load benchmark's secret of 32+ bytes";

fn token(user: &str, roles: &[&str]) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 86_400;
    let claims = json!({"sub": user, "roles": roles, "exp": exp});
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// CPU seconds this process has used (user and system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat (11 and 12 after the command name).
    (ticks(11) + ticks(12)) / 100.0
}

async fn post(addr: std::net::SocketAddr, path: &str, body: &Value, auth: Option<&str>) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response[9..12]).parse().unwrap_or(0)
}

/// The send time a write's document carries (`"t":<micros>`), read without parsing the rest.
fn sent_at(text: &str) -> Option<u64> {
    let start = text.find(r#""t":"#)? + 4;
    let digits: &str = &text[start..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// A counter from the server's `/metrics` (0 when absent).
async fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    livegrid::allocator::configure();
    let rate: u64 = std::env::var("LIVEGRID_LOAD_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let seconds: u64 = std::env::var("LIVEGRID_LOAD_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let fanout: usize = std::env::var("LIVEGRID_LOAD_FANOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let silent = std::env::var("LIVEGRID_LOAD_SILENT").is_ok_and(|v| v == "1");
    let acl = std::env::var("LIVEGRID_LOAD_ACL").is_ok_and(|v| v == "1");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let server = start(ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data: dir.path().to_path_buf(),
            queue_capacity: 65_536,
            durability: std::env::var("LIVEGRID_DURABILITY").ok().map(|d| d.parse().expect("durability")).unwrap_or_default(),
            retention: std::env::var("LIVEGRID_RETENTION").ok().map(|n| n.parse().expect("retention")).unwrap_or(100_000),
            store_cache_bytes: std::env::var("LIVEGRID_STORE_CACHE_MIB")
                .ok()
                .map(|mib| mib.parse::<usize>().expect("store cache MiB") << 20)
                .unwrap_or(livegrid::source::store::DEFAULT_CACHE_BYTES),
            auth: if acl {
                let rules = "[namespaces.\"load.*\"]\nread = \"authenticated\"\nwrite = [\"role:writer\"]\n";
                livegrid::server::AuthConfig {
                    secret: Some(SECRET.into()),
                    public_key_pem: None,
                    rules: Some(livegrid::auth::Rules::parse(rules).unwrap()),
                }
            } else {
                Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap();
        let addr = server.addr;
        let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
        let results = Arc::new(AtomicU64::new(0));
        let deltas = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        for c in 0..CONNECTIONS {
            // A small read buffer: tungstenite zeroes all of it before every read.
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024);
            let url = match acl {
                true => format!("ws://{addr}/v1/ws?token={}", token(&format!("u{c}"), &[])),
                false => format!("ws://{addr}/v1/ws"),
            };
            let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false).await.unwrap();
            for j in 0..PER_CONNECTION {
                let owner = (c * PER_CONNECTION + j) / fanout;
                // The silent connection subscribes to every write, ten times over.
                let filter = if silent && c == 0 { json!({}) } else { json!({"owner": format!("u{owner}")}) };
                let subscribe = json!({"type": "subscribe", "id": format!("s{j}"), "ns": "load.items", "filter": filter});
                socket.send(Message::Text(subscribe.to_string().into())).await.unwrap();
            }
            let (latencies, results, deltas) = (latencies.clone(), results.clone(), deltas.clone());
            if silent && c == 0 {
                // Reads nothing, ever: the server's bounded queues must cut it.
                results.fetch_add(PER_CONNECTION as u64, Ordering::Relaxed);
                clients.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    drop(socket);
                }));
                continue;
            }
            clients.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(Ok(message)) = socket.next().await {
                    let Message::Text(text) = message else { continue };
                    let now = micros();
                    // Only the few fields needed, so that the clients (which share the server's
                    // two cores) cost as little as possible.
                    if text.starts_with(r#"{"type":"result""#) {
                        results.fetch_add(1, Ordering::Relaxed);
                    } else if text.starts_with(r#"{"type":"delta""#) {
                        if let Some(sent) = sent_at(&text) {
                            mine.push(now.saturating_sub(sent));
                        }
                        deltas.fetch_add(1, Ordering::Relaxed);
                    }
                    if mine.len() >= 64 {
                        latencies.lock().unwrap().append(&mut mine);
                    }
                }
                latencies.lock().unwrap().append(&mut mine);
            }));
        }
        let subscriptions = (CONNECTIONS * PER_CONNECTION) as u64;
        let owners = subscriptions / fanout as u64;
        let peak_rss = Arc::new(AtomicU64::new(0));
        {
            let peak_rss = peak_rss.clone();
            tokio::spawn(async move {
                loop {
                    peak_rss.fetch_max(rss_bytes(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while results.load(Ordering::Relaxed) < subscriptions {
            assert!(Instant::now() < deadline, "subscriptions did not all get their results");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let writer = acl.then(|| token("writer", &["writer"]));
        let cpu_before = cpu_seconds();
        let per_tick = (rate / 1000).max(1);
        let ticks = seconds * 1000;
        let mut next_id = 0u64;
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let started = Instant::now();
        let mut sending = Vec::new();
        for tick in 0..ticks {
            let due = started + Duration::from_millis(tick);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            let writes: Vec<Value> = (0..per_tick)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    next_id += 1;
                    let owner = seed % owners;
                    let mut doc = json!({"_id": next_id as i64, "owner": format!("u{owner}"), "t": micros() as i64});
                    if acl {
                        // Readable by the user (connection) holding the owner's subscriptions.
                        let user = owner as usize * fanout / PER_CONNECTION;
                        doc["_acl"] = json!({"read": [format!("user:u{user}")]});
                    }
                    json!({"insert": doc})
                })
                .collect();
            let writer = writer.clone();
            sending.push(tokio::spawn(async move {
                post(addr, "/v1/db/load/items/_bulk", &json!({"writes": writes}), writer.as_deref()).await
            }));
            if sending.len() > 64 {
                for handle in sending.drain(..32) {
                    assert_eq!(handle.await.unwrap(), 200);
                }
            }
        }
        for handle in sending.drain(..) {
            assert_eq!(handle.await.unwrap(), 200);
        }
        let offered = (per_tick * ticks) as f64 / started.elapsed().as_secs_f64();
        // Every write reaches `fanout` subscriptions (the silent connection's excepted).
        let expected = per_tick * ticks * fanout as u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = (0, Instant::now());
        while deltas.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = deltas.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else if silent && last.1.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        // Delivered deltas per second: from the first write to the last delta seen.
        let elapsed = (last.1 - started).as_secs_f64().max(1e-3);
        let received = deltas.load(Ordering::Relaxed);
        let cpu = cpu_seconds() - cpu_before;
        let cut = metric(addr, "livegrid_slow_consumers_cut").await;
        server.shutdown().await;
        for client in clients {
            let _ = tokio::time::timeout(Duration::from_secs(5), client).await;
        }
        let mut all = std::mem::take(&mut *latencies.lock().unwrap());
        all.sort_unstable();
        let pct = |p: f64| all.get(((all.len().saturating_sub(1)) as f64 * p).round() as usize).map_or(f64::NAN, |v| *v as f64 / 1000.0);
        let durability = std::env::var("LIVEGRID_DURABILITY").unwrap_or_else(|_| "durable".into());
        let peak_mib = peak_rss.load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
        println!("| durability | connections | subscriptions | fan-out | silent connection | object ACLs | offered writes/s | delivered deltas | deltas/s | p50 ms | p99 ms | max ms | peak RSS MiB | slow consumers cut | CPU s (write phase) |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {durability} | {CONNECTIONS} | {subscriptions} | {fanout} | {silent} | {acl} | {offered:.0} | {received} of {expected} | {:.0} | {:.2} | {:.2} | {:.2} | {peak_mib:.0} | {cut} | {cpu:.2} |",
            received as f64 / elapsed,
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    });
}
