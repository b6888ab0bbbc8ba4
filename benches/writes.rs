//! Write throughput of `livegrid serve` under many concurrent writers: 64 keep-alive HTTP/1.1
//! clients (`LIVEGRID_WRITERS`) each inserting single documents through `POST
//! /v1/db/{db}/{coll}` as fast as answers come back, for `LIVEGRID_WRITES_SECONDS` (default 5),
//! with the durability `LIVEGRID_DURABILITY` (`durable`, the default, or `periodic`). Reports
//! acknowledged writes/s and the answer latency p50/p99. One live subscription watches the
//! collection, so every write also travels through the grid.
//!
//! The server and the clients share this process and its cores, so the figures are
//! conservative. Run with `scripts/bench.sh writes`.

/// The allocator the `livegrid` binary uses, so that the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use futures_util::{SinkExt, StreamExt};
use hyper::Request;
use hyper_util::rt::TokioIo;
use livegrid::server::{ServerConfig, start};
use tokio_tungstenite::tungstenite::Message;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One keep-alive writer: inserts until `stop`, returning each answer's latency.
async fn writer(addr: std::net::SocketAddr, w: usize, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let mut latencies = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let body = format!(r#"{{"_id": "{w}-{i}", "writer": {w}, "n": {i}, "text": "a short message body"}}"#);
        let request = Request::post("/v1/db/bench/writes")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let started = Instant::now();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let _ = axum::body::to_bytes(Body::new(response.into_body()), 1 << 20).await.unwrap();
        assert_eq!(status, 201);
        latencies.push(started.elapsed());
        i += 1;
    }
    latencies
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    livegrid::allocator::configure();
    let writers: usize = env("LIVEGRID_WRITERS", 64);
    let seconds: u64 = env("LIVEGRID_WRITES_SECONDS", 5);
    let durability: String = env("LIVEGRID_DURABILITY", "durable".to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let server = start(ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data: dir.path().to_path_buf(),
            durability: durability.parse().expect("durability"),
            queue_capacity: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
        let addr = server.addr;
        // A live query over the collection: every write also goes through the grid.
        let (mut watcher, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await.unwrap();
        watcher
            .send(Message::Text(r#"{"type":"subscribe","id":"w","ns":"bench.writes","filter":{"n":{"$lt":0}}}"#.into()))
            .await
            .unwrap();
        let _ = watcher.next().await;
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks: Vec<_> = (0..writers).map(|w| tokio::spawn(writer(addr, w, stop.clone()))).collect();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.unwrap());
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort();
        let percentile = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        println!(
            "writes durability={durability} writers={writers}: {} acknowledged in {elapsed:.1} s = {:.0} writes/s; latency p50 {:.2} ms, p99 {:.2} ms",
            latencies.len(),
            latencies.len() as f64 / elapsed,
            percentile(0.50).as_secs_f64() * 1e3,
            percentile(0.99).as_secs_f64() * 1e3,
        );
        drop(watcher);
        server.shutdown().await;
    });
}
