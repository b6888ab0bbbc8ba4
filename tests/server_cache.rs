//! REST reads are cacheable: `Cache-Control: public, max-age=N` (`--cache-max-age`) and an
//! `ETag` derived from the result alone, so a cache or a client revalidates with
//! `If-None-Match` and gets `304` until the result itself changes (writes elsewhere, which
//! move the position, leave it alone). Served URLs are watched: a change that makes them stale
//! puts them in the cache sketch (checked here with the hash scheme as README documents it)
//! and on the invalidation feed; a change that leaves them alone does neither.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use livegrid::invalidation::CacheConfig;
use livegrid::invalidation::ttl::MaxAge;
use livegrid::server::ServerConfig;
use livegrid_protocol::ServerMessage;
use serde_json::{Value, json};

mod common;
use common::{connect, get_with, http, http_response, next, next_within, send, server_with};

fn cached(max_age: MaxAge) -> ServerConfig {
    ServerConfig { cache: CacheConfig { max_age, ..Default::default() }, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_carry_cache_control_and_etags_and_revalidate_with_304() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), cached(MaxAge::Fixed(60))).await;
    for (id, n) in [(1, 1), (2, 5), (3, 9)] {
        let (status, body) = http(server.addr, "POST", "/v1/db/app/items", Some(json!({"_id": id, "n": n}))).await;
        assert_eq!(status, 201, "{body}");
    }
    let query = "/v1/db/app/items?filter=%7B%22n%22%3A%7B%22%24gte%22%3A5%7D%7D";
    let (status, cache_control, _) = get_with(server.addr, query, "", "cache-control").await;
    assert_eq!((status, cache_control.as_deref()), (200, Some("public, max-age=60")));
    let (_, tag, body) = get_with(server.addr, query, "", "etag").await;
    let tag = tag.expect("an etag");
    assert!(tag.starts_with('"') && tag.len() == 34, "a strong tag: {tag}");
    assert!(body.contains("\"docs\""), "{body}");

    // Revalidation: 304 without a body while the result is the same.
    let if_none_match = format!("If-None-Match: {tag}\r\n");
    let (status, same, body) = get_with(server.addr, query, &if_none_match, "etag").await;
    assert_eq!((status, same.as_deref(), body.as_str()), (304, Some(tag.as_str()), ""));
    // A write outside the result moves the position but not the tag.
    http(server.addr, "PATCH", "/v1/db/app/items/1", Some(json!({"$set": {"n": 2}}))).await;
    let (status, _, _) = get_with(server.addr, query, &if_none_match, "etag").await;
    assert_eq!(status, 304, "a write outside the result changes nothing");
    // A write that changes the result changes the tag.
    http(server.addr, "PATCH", "/v1/db/app/items/2", Some(json!({"$set": {"n": 6}}))).await;
    let (status, changed, body) = get_with(server.addr, query, &if_none_match, "etag").await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(changed.as_deref(), Some(tag.as_str()));
    assert!(body.contains("\"n\":6"), "{body}");

    // One document likewise; `*` matches any current version.
    let (status, doc_tag, _) = get_with(server.addr, "/v1/db/app/items/3", "", "etag").await;
    assert_eq!(status, 200);
    let doc_tag = doc_tag.unwrap();
    let (status, _, _) =
        get_with(server.addr, "/v1/db/app/items/3", &format!("If-None-Match: W/{doc_tag}, \"x\"\r\n"), "etag").await;
    assert_eq!(status, 304, "weak comparison of a listed tag");
    let (status, _, _) = get_with(server.addr, "/v1/db/app/items/3", "If-None-Match: *\r\n", "etag").await;
    assert_eq!(status, 304);
    http(server.addr, "PATCH", "/v1/db/app/items/3", Some(json!({"$inc": {"n": 1}}))).await;
    let (status, _, body) =
        get_with(server.addr, "/v1/db/app/items/3", &format!("If-None-Match: {doc_tag}\r\n"), "etag").await;
    assert_eq!(status, 200, "{body}");

    // The default: caches keep nothing without asking (max-age=0), revalidation stays cheap.
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), ServerConfig::default()).await;
    let (_, cache_control, _) = get_with(server.addr, "/v1/db/app/items", "", "cache-control").await;
    assert_eq!(cache_control.as_deref(), Some("public, max-age=0"));
}

/// Membership in the cache sketch, written from README's description of the hash scheme.
fn in_sketch(sketch: &Value, url: &str) -> bool {
    let m = sketch["m"].as_u64().unwrap();
    let k = sketch["k"].as_u64().unwrap();
    let bytes = base64_decode(sketch["b"].as_str().unwrap());
    assert_eq!(bytes.len() as u64, m.div_ceil(8));
    let mut h: u64 = 0xcbf29ce484222325;
    for byte in url.as_bytes() {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x100000001b3);
    }
    let (h1, h2) = (h & 0xffff_ffff, h >> 32);
    (0..k).all(|i| {
        let bit = (h1 + i * h2) % m;
        bytes[(bit / 8) as usize] & (1 << (bit % 8)) != 0
    })
}

/// Standard base64 with padding (RFC 4648), decoded.
fn base64_decode(text: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let value = alphabet.iter().position(|a| *a == c).expect("base64") as u32;
        acc = (acc << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

async fn sketch(addr: std::net::SocketAddr) -> Value {
    let (status, body) = http(addr, "GET", "/v1/cache-sketch", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The next `invalidate` message's URLs and position.
async fn invalidated(socket: &mut common::Socket) -> (BTreeSet<String>, Value) {
    match next(socket).await {
        ServerMessage::Invalidate(m) => (m.urls.into_iter().collect(), json!(m.position)),
        other => panic!("expected invalidate, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_urls_enter_the_sketch_and_the_feed_until_their_copies_expire() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), cached(MaxAge::Fixed(2))).await;
    let addr = server.addr;
    let mut feed = connect(addr).await;
    send(&mut feed, json!({"type": "invalidations"})).await;
    send(&mut feed, json!({"type": "ping"})).await;
    assert_eq!(next(&mut feed).await, ServerMessage::Pong);
    for (id, n) in [(1, 1), (2, 5), (3, 9)] {
        http(addr, "POST", "/v1/db/app/items", Some(json!({"_id": id, "n": n}))).await;
    }
    // Two spellings of one query: parameters reordered, whitespace and key order changed.
    let one = "/v1/db/app/items?filter=%7B%22n%22%3A%7B%22%24lt%22%3A100%2C%22%24gte%22%3A5%7D%7D&limit=10";
    let two = "/v1/db/app/items?limit=10&filter=%7B%20%22n%22%3A%20%7B%22%24gte%22%3A5%2C%20%22%24lt%22%3A100%7D%7D";
    let quiet = "/v1/db/app/items?filter=%7B%22n%22%3A100%7D";
    let doc = "/v1/db/app/items/3";
    let mut locations = Vec::new();
    for url in [one, two, quiet, doc] {
        let request = format!("GET {url} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let (status, headers, body) = http_response(addr, request.as_bytes()).await;
        assert_eq!(status, 200, "{url}: {body}");
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        assert_eq!(header("cache-control").as_deref(), Some("public, max-age=2"), "{url}");
        locations.push(header("content-location").unwrap());
    }
    assert_eq!(locations[0], locations[1], "one canonical URL for both spellings");
    assert_eq!(
        locations[0],
        "/v1/db/app/items?filter=%7B%22n%22%3A%7B%22%24gte%22%3A5%2C%22%24lt%22%3A100%7D%7D&limit=10"
    );
    assert_eq!(locations[3], doc);
    let (_, health) = http(addr, "GET", "/healthz", None).await;
    assert_eq!(health["cache"]["watched"], 3, "{health}");

    // A write that changes none of the results: nothing is invalidated.
    let (_, written) = http(addr, "PATCH", "/v1/db/app/items/1", Some(json!({"$set": {"n": 2}}))).await;
    assert!(written["modified"].as_bool().unwrap());
    // A write that changes the query's result: both spellings, at the write's position.
    let (_, written) = http(addr, "PATCH", "/v1/db/app/items/2", Some(json!({"$set": {"n": 6}}))).await;
    let (urls, position) = invalidated(&mut feed).await;
    assert_eq!(urls, BTreeSet::from([one.to_string(), two.to_string()]), "only the changed result");
    assert_eq!(position, written["position"]);
    // A document URL: a write to that document (which is in the query's result too: one
    // message per watched result).
    http(addr, "PATCH", "/v1/db/app/items/3", Some(json!({"$inc": {"n": 1}}))).await;
    let (mut urls, _) = invalidated(&mut feed).await;
    urls.extend(invalidated(&mut feed).await.0);
    assert_eq!(urls, BTreeSet::from([doc.to_string(), one.to_string(), two.to_string()]));

    let stale = sketch(addr).await;
    assert_eq!(stale["entries"], 3, "{stale}");
    for url in [one, two, doc] {
        assert!(in_sketch(&stale, url), "{url} changed while copies live");
    }
    assert!(!in_sketch(&stale, quiet), "a URL that never changed");
    // Nor, up to the false-positive rate (about (21 / 262,144)^7 here), any of a thousand
    // others.
    let others = (0..1000).filter(|i| in_sketch(&stale, &format!("/v1/db/app/items/{i}?x"))).count();
    assert_eq!(others, 0);
    assert!(next_within(&mut feed, Duration::from_millis(300)).await.is_none(), "nothing else changed");

    // Gone once the copies (max-age 2 s) have expired.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = sketch(addr).await;
        if now["entries"] == 0 {
            assert!([one, two, doc].iter().all(|url| !in_sketch(&now, url)), "{now}");
            assert!(now["b"].as_str().unwrap().trim_end_matches('=').bytes().all(|b| b == b'A'), "all bits clear");
            break;
        }
        assert!(Instant::now() < deadline, "the sketch still holds expired URLs: {now}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A URL read again is watched again.
    let (_, cache_control, _) = get_with(addr, one, "", "cache-control").await;
    assert_eq!(cache_control.as_deref(), Some("public, max-age=2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_bounded_and_overrides_apply_per_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = cached(MaxAge::Fixed(30));
    config.cache.entries = 1;
    config.cache.namespaces.insert("app.live".into(), MaxAge::Fixed(0));
    config.cache.namespaces.insert("other".into(), MaxAge::Fixed(5));
    let server = server_with(dir.path(), config).await;
    let addr = server.addr;
    let age = |path: &'static str| async move { get_with(addr, path, "", "cache-control").await.1.unwrap() };
    assert_eq!(age("/v1/db/app/live").await, "public, max-age=0", "caching off for app.live");
    assert_eq!(age("/v1/db/app/items").await, "public, max-age=30");
    assert_eq!(age("/v1/db/app/items").await, "public, max-age=30", "the same watch");
    assert_eq!(age("/v1/db/other/things").await, "public, max-age=0", "all watches taken: not cacheable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_max_age_starts_at_its_minimum_and_grows_while_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), cached(MaxAge::Auto { min: 1, max: 600 })).await;
    let addr = server.addr;
    http(addr, "POST", "/v1/db/app/items", Some(json!({"_id": 1, "n": 1}))).await;
    let age = || async move {
        let value = get_with(addr, "/v1/db/app/items/1", "", "cache-control").await.1.unwrap();
        value.trim_start_matches("public, max-age=").parse::<u32>().unwrap()
    };
    assert_eq!(age().await, 1, "never watched: the minimum");
    // Watched 10 s without a change (the prior counts as 10 minimums): a tenth of 20 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(age().await, 2);
    // A change: the estimate halves, back to the minimum.
    http(addr, "PATCH", "/v1/db/app/items/1", Some(json!({"$set": {"n": 2}}))).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while age().await != 1 {
        assert!(Instant::now() < deadline, "the change did not count");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_whose_result_exceeds_the_limits_ends_and_invalidates_what_it_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = cached(MaxAge::Fixed(60));
    config.max_subscription_bytes = 4096;
    config.queue_bytes = 1 << 20;
    let server = server_with(dir.path(), config).await;
    let addr = server.addr;
    let mut feed = connect(addr).await;
    send(&mut feed, json!({"type": "invalidations"})).await;
    send(&mut feed, json!({"type": "ping"})).await;
    assert_eq!(next(&mut feed).await, ServerMessage::Pong);
    for id in 0..8 {
        http(addr, "POST", "/v1/db/app/big", Some(json!({"_id": id, "text": "x".repeat(1000)}))).await;
    }
    // The watch's result (8 KB) exceeds what one subscription may hold: whatever the read was
    // served with, it is invalidated and nothing stays watched.
    let (status, cache_control, _) = get_with(addr, "/v1/db/app/big", "", "cache-control").await;
    assert_eq!(status, 200);
    if cache_control.as_deref() != Some("public, max-age=0") {
        let (urls, _) = invalidated(&mut feed).await;
        assert_eq!(urls, BTreeSet::from(["/v1/db/app/big".to_string()]));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, health) = http(addr, "GET", "/healthz", None).await;
        if health["cache"]["watched"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the oversized watch stayed: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
