//! Purges against a real Varnish (`varnishd`, Debian package `varnish`; `.ci/run` installs
//! it): Varnish caches livegrid's REST reads, and livegrid purges exactly the URLs whose
//! result changed. A dead purge endpoint slows nothing down.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livegrid::invalidation::CacheConfig;
use livegrid::invalidation::ttl::MaxAge;
use livegrid::server::ServerConfig;
use serde_json::{Value, json};

mod common;
use common::{free_port, http, http_response, next, send, server_with};

/// A Varnish in front of `backend`, accepting PURGE from loopback; stopped on drop.
struct Varnish {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Varnish {
    fn start(port: u16, backend: SocketAddr) -> Varnish {
        let dir = tempfile::tempdir().unwrap();
        let vcl = format!(
            r#"vcl 4.1;
backend livegrid {{ .host = "127.0.0.1"; .port = "{}"; }}
acl purgers {{ "127.0.0.1"; }}
sub vcl_recv {{
    if (req.method == "PURGE") {{
        if (client.ip !~ purgers) {{ return (synth(405, "purging is for loopback only")); }}
        return (purge);
    }}
}}
sub vcl_deliver {{
    if (obj.hits > 0) {{ set resp.http.X-Cache = "HIT"; }} else {{ set resp.http.X-Cache = "MISS"; }}
}}
"#,
            backend.port()
        );
        let vcl_path = dir.path().join("livegrid.vcl");
        std::fs::write(&vcl_path, vcl).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new("varnishd")
            .args(["-F", "-j", "none", "-T", "none", "-s", "malloc,64m"])
            .arg("-n")
            .arg(dir.path().join("work"))
            .arg("-a")
            .arg(addr.to_string())
            .arg("-f")
            .arg(&vcl_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("varnishd must be installed (apt-get install varnish; .ci/run does it)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "varnishd did not start listening on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Varnish { child, addr, _dir: dir }
    }
}

impl Drop for Varnish {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET through `addr`: status, `X-Cache`, body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, Value) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let (status, headers, body) = http_response(addr, request.as_bytes()).await;
    let cache = headers.into_iter().find(|(n, _)| n == "x-cache").map(|(_, v)| v).unwrap_or_default();
    (status, cache, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// How long until a read through Varnish shows `expected` (polled, for at most 5 s).
async fn until_fresh(addr: SocketAddr, path: &str, expected: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let (status, _, body) = get(addr, path).await;
        assert_eq!(status, 200, "{body}");
        if expected(&body) {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{path} still stale through Varnish: {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ns(body: &Value) -> Vec<i64> {
    body["docs"].as_array().unwrap().iter().map(|d| d["n"].as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varnish_serves_hits_until_livegrid_purges_a_changed_result() {
    let dir = tempfile::tempdir().unwrap();
    let varnish_port = free_port();
    let cache = CacheConfig {
        max_age: MaxAge::Fixed(60),
        purge: vec![format!("http://127.0.0.1:{varnish_port}")],
        ..Default::default()
    };
    let server = server_with(dir.path(), ServerConfig { cache, ..Default::default() }).await;
    let varnish = Varnish::start(varnish_port, server.addr);
    let (lg, v) = (server.addr, varnish.addr);
    for (id, n) in [(1, 1), (2, 5), (3, 9), (4, 50)] {
        http(lg, "POST", "/v1/db/app/items", Some(json!({"_id": id, "n": n}))).await;
    }
    let big = "/v1/db/app/items?filter=%7B%22n%22%3A%7B%22%24gte%22%3A5%7D%7D&sort=%7B%22n%22%3A1%7D&limit=2";
    let small = "/v1/db/app/items?filter=%7B%22n%22%3A%7B%22%24lt%22%3A5%7D%7D";
    let doc = "/v1/db/app/items/4";
    let other_doc = "/v1/db/app/items/2";

    // Read twice through Varnish: a miss, then a hit with the same answer.
    for path in [big, small, doc, other_doc] {
        let (status, first, body) = get(v, path).await;
        assert_eq!((status, first.as_str()), (200, "MISS"), "{path}: {body}");
        let (_, second, again) = get(v, path).await;
        assert_eq!(second, "HIT", "{path}");
        assert_eq!(body, again);
    }
    assert_eq!(ns(&get(v, big).await.2), vec![5, 9]);

    // A write that changes no cached result: a document that matches `big` but falls beyond
    // its window.
    http(lg, "POST", "/v1/db/app/items", Some(json!({"_id": 5, "n": 70}))).await;
    // A write that changes `small` (and, as a barrier, is processed after the one above).
    http(lg, "PATCH", "/v1/db/app/items/1", Some(json!({"$set": {"n": 2}}))).await;
    let took = until_fresh(v, small, |body| ns(body) == vec![2]).await;
    assert!(took < Duration::from_secs(1), "the new result within one second (took {took:?})");
    println!("small: fresh through Varnish after {took:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, hit, body) = get(v, big).await;
    assert_eq!((hit.as_str(), ns(&body)), ("HIT", vec![5, 9]), "no needless purge of an unchanged result");
    assert_eq!(get(v, doc).await.1, "HIT");

    // A write that changes `big`: its next read through Varnish is fresh within a second.
    let start = Instant::now();
    http(lg, "PATCH", "/v1/db/app/items/3", Some(json!({"$set": {"n": 4}}))).await;
    until_fresh(v, big, |body| ns(body) == vec![5, 50]).await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "the new result within one second (took {took:?})");
    println!("big: fresh through Varnish after {took:?}");

    // A document URL likewise; the other document stays cached.
    let (_, hit, body) = get(v, other_doc).await;
    assert_eq!((hit.as_str(), &body["n"]), ("HIT", &json!(5)), "an unchanged document stays cached");
    let start = Instant::now();
    http(lg, "PATCH", "/v1/db/app/items/4", Some(json!({"$set": {"n": 51}}))).await;
    until_fresh(v, doc, |body| body["n"] == 51).await;
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
    let (_, hit, _) = get(v, doc).await;
    assert_eq!(hit, "HIT", "cached again");

    // A document read before it exists: the 404 is not cached (errors carry no-store), so
    // the document shows once created.
    let missing = "/v1/db/app/items/99";
    assert_eq!(get(v, missing).await.0, 404);
    assert_eq!(get(v, missing).await.1, "MISS", "a 404 is never a hit");
    http(lg, "POST", "/v1/db/app/items", Some(json!({"_id": 99, "n": 99}))).await;
    assert_eq!(get(v, missing).await.2["n"], 99);

    // The purges are counted.
    let metrics = common::get_with(lg, "/metrics", "", "content-type").await.2;
    let sent = metrics.lines().find(|l| l.starts_with("livegrid_purges_sent")).unwrap_or_default().to_string();
    assert!(sent.split_whitespace().last().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) >= 1.0, "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_purge_endpoint_slows_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dead = free_port();
    let cache = CacheConfig {
        max_age: MaxAge::Fixed(60),
        purge: vec![format!("http://127.0.0.1:{dead}")],
        purge_queue: 4,
        ..Default::default()
    };
    let server = server_with(dir.path(), ServerConfig { cache, ..Default::default() }).await;
    let lg = server.addr;
    let mut socket = common::connect(lg).await;
    send(&mut socket, json!({"type": "subscribe", "id": "s", "ns": "app.items"})).await;
    next(&mut socket).await;
    // Many cached URLs, each changed: purges fail (connection refused) and retry, the queue of
    // 4 fills, the rest is dropped; client deltas keep flowing.
    for id in 0..20 {
        http(lg, "POST", "/v1/db/app/items", Some(json!({"_id": id, "n": 0}))).await;
        common::get_with(lg, &format!("/v1/db/app/items/{id}"), "", "etag").await;
    }
    for _ in 0..20 {
        next(&mut socket).await;
    }
    for id in 0..20 {
        http(lg, "PATCH", &format!("/v1/db/app/items/{id}"), Some(json!({"$set": {"n": 1}}))).await;
    }
    for _ in 0..20 {
        assert!(matches!(next(&mut socket).await, livegrid_protocol::ServerMessage::Delta(_)));
    }
    let metrics = common::get_with(lg, "/metrics", "", "content-type").await.2;
    let counter = |name: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(counter("livegrid_purges_dropped") >= 1.0, "a full queue drops purges:\n{metrics}");
    let (status, health) = http(lg, "GET", "/healthz", None).await;
    assert_eq!(status, 200, "{health}");
}
