//! REST reads are cacheable: `Cache-Control: public, max-age=N` (`--cache-max-age`) and an
//! `ETag` derived from the result alone, so a cache or a client revalidates with
//! `If-None-Match` and gets `304` until the result itself changes (writes elsewhere, which
//! move the position, leave it alone).

use livegrid::server::ServerConfig;
use serde_json::json;

mod common;
use common::{get_with, http, server_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_carry_cache_control_and_etags_and_revalidate_with_304() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), ServerConfig { cache_max_age: 60, ..Default::default() }).await;
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
