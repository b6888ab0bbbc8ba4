//! Cache invalidation figures (`scripts/bench.sh cache`), each part on its own
//! (`LIVEGRID_CACHE_BENCH=purge|ttl|sketch`, default all):
//!
//! - **purge**: `livegrid serve` with 5,000 cached document URLs and one purge endpoint (a
//!   counting HTTP server in this process); 32 keep-alive writers change those documents (and
//!   1,000 uncached ones) as fast as answers come back (or `LIVEGRID_CACHE_RATE` writes/s in
//!   total) for `LIVEGRID_CACHE_SECONDS` (default 10). Reports changes/s, purges/s, purges per change of a cached URL, needless purges, and
//!   the latency from a write request to its PURGE reaching the endpoint.
//! - **ttl**: the item and chat workloads of `livegrid workload` together: 400 item documents
//!   of 100,000 (each changes about once in 1,000 s) and 100 chat rooms (queries; each
//!   changes about once a second), read 300 times a second (URLs uniformly) while 100 chat and
//!   100 item writes a second go in. Every
//!   read is answered by livegrid (the truth, with its `ETag` and `max-age`) and offered to
//!   simulated expiration-based caches: fixed TTLs of 1, 10 and 60 s, livegrid's `auto`
//!   max-age, and `auto` plus the cache sketch (fetched once a second; URLs in it are
//!   revalidated). A hit is a read a cache answers itself; a stale read is a hit whose copy
//!   differs from the truth. 120 s of warm-up (`LIVEGRID_TTL_WARMUP`), so that `auto` has
//!   watched the URLs for a while, then 60 s measured (`LIVEGRID_TTL_SECONDS`).
//! - **sketch**: the cache sketch at its default size holding 20,000 URLs: bytes on the wire
//!   and the false-positive rate measured with a million other URLs, against the formula.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use livegrid::invalidation::ttl::MaxAge;
use livegrid::invalidation::{CacheConfig, canonical, sketch};
use livegrid::server::{ServerConfig, start};
use livegrid::workload::{Chat, Workload};
use livegrid_engine::ChangeOp;
use livegrid_protocol::extjson;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

type Http = Client<HttpConnector, Full<Bytes>>;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn client() -> Http {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build_http()
}

/// One request: status, headers we need (etag, cache-control max-age), body.
async fn request(http: &Http, method: &str, url: String, body: Option<Value>) -> (u16, String, u32, Bytes) {
    let mut builder = Request::builder().method(method).uri(url).header("host", "localhost");
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let response = http.request(builder.body(Full::new(body)).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let etag = response.headers().get("etag").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let max_age = response
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("max-age=").nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, etag, max_age, bytes)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// A server on a fresh store with `cache`: it, its base URL and its folder.
async fn serve(cache: CacheConfig) -> (livegrid::server::RunningServer, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().to_path_buf(),
        cache,
        ..Default::default()
    };
    let server = start(config).await.unwrap();
    let base = format!("http://{}", server.addr);
    (server, base, dir)
}

/// A purge endpoint that records what it receives.
async fn purge_receiver() -> (SocketAddr, Arc<Mutex<Vec<(String, Instant)>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let log = log.clone();
        async move {
            if request.method().as_str() == "PURGE" {
                log.lock().unwrap().push((request.uri().path().to_string(), Instant::now()));
            }
            "purged"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, received)
}

async fn bench_purge() {
    let seconds: u64 = env("LIVEGRID_CACHE_SECONDS", 10);
    // Writes per second in total (0: as fast as answers come back).
    let rate: u64 = env("LIVEGRID_CACHE_RATE", 0);
    let (cached, uncached, writers) = (5_000u64, 1_000u64, 32u64);
    let (endpoint, received) = purge_receiver().await;
    let cache =
        CacheConfig { max_age: MaxAge::Fixed(3600), purge: vec![format!("http://{endpoint}")], ..Default::default() };
    let (server, base, _dir) = serve(cache).await;
    let http = client();
    let docs: Vec<Value> = (0..cached + uncached).map(|i| json!({"insert": {"_id": i, "n": 0}})).collect();
    for chunk in docs.chunks(1000) {
        request(&http, "POST", format!("{base}/v1/db/bench/docs/_bulk"), Some(json!({"writes": chunk}))).await;
    }
    // Every cached URL read once (through 16 readers): 5,000 watches.
    let readers: Vec<_> = (0..16)
        .map(|r| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move {
                for i in (r..cached).step_by(16) {
                    let (status, ..) = request(&http, "GET", format!("{base}/v1/db/bench/docs/{i}"), None).await;
                    assert_eq!(status, 200);
                }
            })
        })
        .collect();
    for reader in readers {
        reader.await.unwrap();
    }
    // Changes within a second of a read are purged twice (see `livegrid::invalidation`, races):
    // start after that, so that every purge is the first for its change.
    tokio::time::sleep(livegrid::invalidation::REPURGE_AFTER + Duration::from_millis(500)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    // Writer w changes documents w, w + 32, ... in turn (cached and uncached ones), so a
    // document is written again only after a whole round.
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut writes: Vec<(u64, Instant, Instant)> = Vec::new();
                let ids: Vec<u64> = (w..cached + uncached).step_by(writers as usize).collect();
                let mut pace = (rate > 0).then(|| {
                    let mut pace = tokio::time::interval(Duration::from_secs_f64(writers as f64 / rate as f64));
                    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    pace
                });
                for id in ids.iter().cycle() {
                    if let Some(pace) = &mut pace {
                        pace.tick().await;
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let sent = Instant::now();
                    let url = format!("{base}/v1/db/bench/docs/{id}");
                    let (status, ..) = request(&http, "PATCH", url, Some(json!({"$inc": {"n": 1}}))).await;
                    assert_eq!(status, 200);
                    writes.push((*id, sent, Instant::now()));
                }
                writes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writes: HashMap<u64, Vec<(Instant, Instant)>> = HashMap::new();
    let mut total = 0;
    for task in tasks {
        for (id, sent, acked) in task.await.unwrap() {
            writes.entry(id).or_default().push((sent, acked));
            total += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = received.lock().unwrap().clone();
    let cached_writes: usize = writes.iter().filter(|(id, _)| **id < cached).map(|(_, w)| w.len()).sum();
    let (mut latencies, mut from_ack) = (Vec::new(), Vec::new());
    let mut needless = 0;
    for (path, at) in &received {
        let id: u64 = path.rsplit('/').next().unwrap().parse().unwrap();
        if id >= cached {
            needless += 1;
            continue;
        }
        // From the latest write of that document sent before the purge arrived.
        if let Some((sent, acked)) = writes.get(&id).and_then(|w| w.iter().rev().find(|(s, _)| s <= at)) {
            latencies.push(at.duration_since(*sent));
            from_ack.push(at.saturating_duration_since(*acked));
        }
    }
    latencies.sort();
    from_ack.sort();
    println!(
        "purge: {total} changes in {elapsed:.1} s = {:.0} changes/s ({cached_writes} of cached URLs); {} purges = {:.0} purges/s, {:.3} per change of a cached URL; needless purges: {needless}",
        total as f64 / elapsed,
        received.len(),
        received.len() as f64 / elapsed,
        received.len() as f64 / cached_writes.max(1) as f64,
    );
    println!(
        "purge latency (write request sent -> PURGE at the endpoint): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    println!(
        "purge latency (write acknowledged -> PURGE at the endpoint; 0 when the purge came first): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&from_ack, 0.5),
        percentile(&from_ack, 0.99),
    );
    server.shutdown().await;
}

/// A simulated expiration-based cache.
struct SimCache {
    name: &'static str,
    /// `None`: the served max-age; `Some(s)`: a fixed TTL.
    ttl: Option<u64>,
    /// Revalidates URLs in the cache sketch.
    sketch: bool,
    copies: HashMap<String, (String, Instant)>,
    reads: u64,
    hits: u64,
    stale: u64,
}

impl SimCache {
    fn new(name: &'static str, ttl: Option<u64>, sketch: bool) -> Self {
        SimCache { name, ttl, sketch, copies: HashMap::new(), reads: 0, hits: 0, stale: 0 }
    }

    /// One read of `url` whose current version is `etag`, served with `max_age`.
    fn read(&mut self, url: &str, etag: &str, max_age: u32, in_sketch: bool, now: Instant, counted: bool) {
        let alive = self.copies.get(url).filter(|(_, until)| *until > now).map(|(tag, _)| tag.clone());
        let hit = alive.filter(|_| !(self.sketch && in_sketch));
        if counted {
            self.reads += 1;
        }
        match hit {
            Some(tag) => {
                if counted {
                    self.hits += 1;
                    if tag != etag {
                        self.stale += 1;
                    }
                }
            }
            None => {
                let ttl = self.ttl.unwrap_or(u64::from(max_age));
                self.copies.insert(url.to_string(), (etag.to_string(), now + Duration::from_secs(ttl)));
            }
        }
    }
}

/// Applies workload events through the REST API (one `_bulk` per namespace and tick); deletes
/// of documents that are gone already are left out (`existing` tracks them), as a bulk with
/// one would be refused whole.
async fn write_events(
    http: &Http,
    base: &str,
    coll: &str,
    events: Vec<livegrid_engine::ChangeEvent>,
    existing: &mut std::collections::HashSet<i64>,
) {
    let events: Vec<_> = events
        .into_iter()
        .filter(|e| {
            let id = e.id.as_i64().unwrap();
            match e.op {
                ChangeOp::Delete => existing.remove(&id),
                _ => {
                    existing.insert(id);
                    true
                }
            }
        })
        .collect();
    if events.is_empty() {
        return;
    }
    let writes: Vec<Value> = events
        .iter()
        .map(|e| match (e.op, &e.doc) {
            (ChangeOp::Delete, _) | (_, None) => json!({"delete": {"_id": extjson::to_relaxed_json(&e.id)}}),
            (_, Some(doc)) => {
                json!({"replace": {"_id": extjson::to_relaxed_json(&e.id), "doc": extjson::document_to_relaxed_json(doc)}})
            }
        })
        .collect();
    let (status, _, _, body) =
        request(http, "POST", format!("{base}/v1/db/bench/{coll}/_bulk"), Some(json!({"writes": writes}))).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

async fn bench_ttl() {
    let measured: u64 = env("LIVEGRID_TTL_SECONDS", 60);
    let warmup: u64 = env("LIVEGRID_TTL_WARMUP", 120);
    let (read_rate, chat_rate, item_rate) = (300u64, 100u64, 100u64);
    let cache = CacheConfig { max_age: MaxAge::Auto { min: 1, max: 600 }, ..Default::default() };
    let (server, base, _dir) = serve(cache).await;
    let http = client();
    let mut items = Workload::new(7);
    let docs: Vec<Value> =
        (0..100_000u64).map(|id| json!({"insert": extjson::document_to_relaxed_json(&items.item(id))})).collect();
    for chunk in docs.chunks(2000) {
        request(&http, "POST", format!("{base}/v1/db/bench/items/_bulk"), Some(json!({"writes": chunk}))).await;
    }
    let mut chat = Chat::new(11, 100 * 50, 50);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut urls: Vec<(String, bool)> =
        (0..400).map(|_| (format!("/v1/db/bench/items/{}", rng.random_range(0..100_000)), false)).collect();
    urls.extend((0..100).map(|i| (canonical::query_url("bench", "messages", &chat.query(i)), true)));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut position = 1u64;
            let mut chat_ids = std::collections::HashSet::new();
            let mut item_ids: std::collections::HashSet<i64> = (0..100_000).collect();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let chats: Vec<_> = (0..chat_rate / 10)
                    .map(|_| {
                        position += 1;
                        chat.event(position)
                    })
                    .collect();
                let item_events: Vec<_> = (0..item_rate / 10)
                    .map(|_| {
                        position += 1;
                        items.event(position)
                    })
                    .collect();
                write_events(&http, &base, "messages", chats, &mut chat_ids).await;
                write_events(&http, &base, "items", item_events, &mut item_ids).await;
            }
        })
    };
    let mut caches = vec![
        SimCache::new("fixed 1 s", Some(1), false),
        SimCache::new("fixed 10 s", Some(10), false),
        SimCache::new("fixed 60 s", Some(60), false),
        SimCache::new("auto (1-600 s)", None, false),
        SimCache::new("auto + cache sketch (1 s)", None, true),
    ];
    let mut served_ages: HashMap<bool, Vec<u32>> = HashMap::new();
    let mut sketch_body = Value::Null;
    let mut sketch_at = Instant::now() - Duration::from_secs(10);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < Duration::from_secs(warmup + measured) {
        tick.tick().await;
        if sketch_at.elapsed() >= Duration::from_secs(1) {
            let (_, _, _, body) = request(&http, "GET", format!("{base}/v1/cache-sketch"), None).await;
            sketch_body = serde_json::from_slice(&body).unwrap();
            sketch_at = Instant::now();
        }
        let counted = started.elapsed() >= Duration::from_secs(warmup);
        for _ in 0..read_rate / 100 {
            let (url, hot) = &urls[rng.random_range(0..urls.len())];
            let (status, etag, max_age, _) = request(&http, "GET", format!("{base}{url}"), None).await;
            if status == 404 {
                // A document the workload deleted: nothing to cache, not counted.
                continue;
            }
            assert_eq!(status, 200);
            let in_sketch = sketch_contains(&sketch_body, url);
            let now = Instant::now();
            for cache in &mut caches {
                cache.read(url, &etag, max_age, in_sketch, now, counted);
            }
            if counted {
                served_ages.entry(*hot).or_default().push(max_age);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    println!(
        "ttl: {} reads over {} s measured after {warmup} s of warm-up; writes {chat_rate} chat + {item_rate} item events/s",
        caches[0].reads, measured
    );
    println!("| cache | hit rate | stale reads (of all reads) | stale hits (of hits) |");
    println!("|---|---|---|---|");
    for cache in &caches {
        println!(
            "| {} | {:.1}% | {:.2}% | {:.1}% |",
            cache.name,
            100.0 * cache.hits as f64 / cache.reads.max(1) as f64,
            100.0 * cache.stale as f64 / cache.reads.max(1) as f64,
            100.0 * cache.stale as f64 / cache.hits.max(1) as f64,
        );
    }
    for (hot, mut ages) in served_ages {
        ages.sort();
        let median = ages[ages.len() / 2];
        let p90 = ages[ages.len() * 9 / 10];
        let kind = if hot { "chat rooms (hot)" } else { "item documents (cold)" };
        println!("auto max-age served for {kind}: median {median} s, p90 {p90} s");
    }
    server.shutdown().await;
}

/// Membership in a fetched sketch.
fn sketch_contains(body: &Value, url: &str) -> bool {
    let (Some(m), Some(k), Some(b)) = (body["m"].as_u64(), body["k"].as_u64(), body["b"].as_str()) else {
        return false;
    };
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
    sketch::bits(url, m, k as u32).all(|bit| bytes[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
}

fn bench_sketch() {
    let config = CacheConfig::default();
    let (m, k, n) = (config.sketch_bits, config.sketch_hashes, 20_000usize);
    let mut filter = sketch::Sketch::new(m, k);
    let until = Instant::now() + Duration::from_secs(3600);
    let mut workload = Workload::new(5);
    for i in 0..n {
        let url = if i % 2 == 0 {
            canonical::query_url("app", "items", &workload.query())
        } else {
            format!("/v1/db/app/items/{i}")
        };
        filter.add(&url, until);
    }
    let probes = 1_000_000;
    let hits = (0..probes).filter(|i| filter.may_contain(&format!("/v1/db/app/other/{i}"))).count();
    let encoded = filter.encode();
    let body = json!({"m": encoded.m, "k": encoded.k, "b": encoded.b, "entries": encoded.entries}).to_string();
    println!(
        "sketch: m = {m} bits, k = {k}, {n} URLs: {} bytes of bits, {} bytes as JSON (base64); false positives measured {:.4}% ({hits} of {probes}), formula {:.4}%",
        m / 8,
        body.len(),
        100.0 * hits as f64 / probes as f64,
        100.0 * sketch::false_positive_rate(m, k, n)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    livegrid::allocator::configure();
    let part: String = env("LIVEGRID_CACHE_BENCH", "all".to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if part == "all" || part == "sketch" {
        bench_sketch();
    }
    if part == "all" || part == "purge" {
        runtime.block_on(bench_purge());
    }
    if part == "all" || part == "ttl" {
        runtime.block_on(bench_ttl());
    }
}
