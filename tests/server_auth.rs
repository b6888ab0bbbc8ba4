//! Authentication and access control over real connections: JWT bearer tokens on REST and
//! WebSockets (at connect or with an `auth` message), namespace rules, object ACLs folded
//! into live queries (a sorted window is computed over what each user may read; granting
//! access is an `add`, revoking it a `remove`, and a user never hears of documents it may not
//! read, deletions included), resume tokens bound to their user, and expiring tokens.

use std::time::Duration;

use livegrid::auth::Rules;
use livegrid::server::{AuthConfig, ServerConfig};
use livegrid_protocol::{DeltaOp, ErrorCode, ServerMessage};
use serde_json::{Value, json};

mod common;
use common::{SECRET, Socket, next, next_within, send, server_with, token};

fn config() -> ServerConfig {
    let rules = Rules::parse(
        r#"
        [namespaces."app.posts"]
        read = "authenticated"
        write = ["role:editor", "user:alice"]
        [namespaces."app.*"]
        read = "public"
        write = ["role:admin"]
        "#,
    )
    .unwrap();
    ServerConfig {
        auth: AuthConfig { secret: Some(SECRET.into()), public_key_pem: None, rules: Some(rules) },
        ..Default::default()
    }
}

/// A request with an optional bearer token: status, Cache-Control, body.
async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String, Value) {
    let (status, headers, body) = common::http_as(addr, method, path, token, body).await;
    let cache = headers.into_iter().find(|(n, _)| n == "cache-control").map(|(_, v)| v).unwrap_or_default();
    (status, cache, body)
}

async fn connect_as(addr: std::net::SocketAddr, token: Option<&str>) -> Socket {
    let url = match token {
        Some(t) => format!("ws://{addr}/v1/ws?token={t}"),
        None => format!("ws://{addr}/v1/ws"),
    };
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

fn ids(docs: &[bson::Document]) -> Vec<i32> {
    docs.iter().map(|d| d.get_i32("_id").unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_acls_decide_what_each_user_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), config()).await;
    let addr = server.addr;
    let (alice, bob, editor) = (token("alice", &[], 600), token("bob", &[], 600), token("eve", &["editor"], 600));
    // Namespace rules.
    assert_eq!(call(addr, "GET", "/v1/db/app/posts", None, None).await.0, 401, "anonymous may not read");
    assert_eq!(call(addr, "GET", "/v1/db/app/posts", Some("not-a-token"), None).await.0, 401);
    assert_eq!(call(addr, "GET", "/v1/db/app/posts", Some(&bob), None).await.0, 200);
    let post = |id: i32, rank: i32, acl: Value| json!({"_id": id, "rank": rank, "_acl": acl});
    let (status, _, body) = call(addr, "POST", "/v1/db/app/posts", Some(&bob), Some(post(1, 1, json!(null)))).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "bob may not write");
    for doc in [
        json!({"_id": 1, "rank": 1}),
        post(2, 2, json!({"read": ["user:alice"], "write": ["user:alice"]})),
        post(3, 3, json!({"read": ["role:editor", "user:bob"]})),
        post(4, 4, json!({"read": ["authenticated"]})),
        post(5, 5, json!({"read": ["user:alice"], "write": ["user:alice"]})),
    ] {
        assert_eq!(call(addr, "POST", "/v1/db/app/posts", Some(&alice), Some(doc)).await.0, 201);
    }
    assert_eq!(call(addr, "GET", "/v1/db/app/public", None, None).await.0, 200, "app.* is public");

    // Object ACLs on REST reads: bob sees 1, 3, 4; alice 1, 2, 4, 5; private answers.
    let read = |token: String| async move {
        let (status, cache, body) =
            call(addr, "GET", "/v1/db/app/posts?sort=%7B%22rank%22%3A1%7D", Some(&token), None).await;
        assert_eq!(status, 200);
        assert!(cache.starts_with("private"), "{cache}");
        body["docs"].as_array().unwrap().iter().map(|d| d["_id"].as_i64().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(read(bob.clone()).await, vec![1, 3, 4]);
    assert_eq!(read(alice.clone()).await, vec![1, 2, 4, 5]);
    assert_eq!(call(addr, "GET", "/v1/db/app/posts/2", Some(&bob), None).await.0, 404, "not readable: not there");
    assert_eq!(call(addr, "GET", "/v1/db/app/posts/3", Some(&bob), None).await.0, 200);
    // Document write ACLs: the editor may write the namespace but not document 2.
    let patch = Some(json!({"$set": {"rank": 9}}));
    assert_eq!(call(addr, "PATCH", "/v1/db/app/posts/2", Some(&editor), patch.clone()).await.0, 403);
    assert_eq!(call(addr, "PATCH", "/v1/db/app/posts/1", Some(&editor), patch).await.0, 200);

    // A live sorted window over what bob may read: the first two by rank.
    let mut socket = connect_as(addr, Some(&bob)).await;
    send(&mut socket, json!({"type": "subscribe", "id": "top", "ns": "app.posts", "sort": {"rank": 1}, "limit": 2}))
        .await;
    let mut live = std::collections::BTreeMap::new();
    let first = next(&mut socket).await;
    common::apply_message(&mut live, &first);
    assert_eq!(ids(live["top"].docs()), vec![3, 4]);
    // Granting bob document 2 (rank 2) adds it; revoking it removes it again.
    let grant = json!({"$set": {"_acl.read": ["user:alice", "user:bob"]}});
    assert_eq!(call(addr, "PATCH", "/v1/db/app/posts/2", Some(&alice), Some(grant)).await.0, 200);
    let mut added = false;
    loop {
        let m = next(&mut socket).await;
        added |= matches!(&m, ServerMessage::Delta(d) if d.op == DeltaOp::Add && d.doc_id == bson::Bson::Int32(2));
        common::apply_message(&mut live, &m);
        if live["top"].is_whole() {
            break;
        }
    }
    assert!(added, "document 2 was added");
    assert_eq!(ids(live["top"].docs()), vec![2, 3]);
    let revoke = json!({"$set": {"_acl.read": ["user:alice"]}});
    assert_eq!(call(addr, "PATCH", "/v1/db/app/posts/2", Some(&alice), Some(revoke)).await.0, 200);
    loop {
        let m = next(&mut socket).await;
        common::apply_message(&mut live, &m);
        if live["top"].is_whole() && ids(live["top"].docs()) == vec![3, 4] {
            break;
        }
    }
    // Changes and the deletion of a document bob never could read reach him not at all.
    assert_eq!(
        call(addr, "PATCH", "/v1/db/app/posts/5", Some(&alice), Some(json!({"$set": {"rank": 0}}))).await.0,
        200
    );
    assert_eq!(call(addr, "DELETE", "/v1/db/app/posts/5", Some(&alice), None).await.0, 200);
    assert!(next_within(&mut socket, Duration::from_millis(500)).await.is_none(), "nothing about document 5");
}

/// Two posts by an editor: 1 readable by everyone signed in, 2 by alice only.
async fn http_post_as(addr: std::net::SocketAddr, editor: &str) {
    let posts = [json!({"_id": 1, "rank": 1}), json!({"_id": 2, "rank": 2, "_acl": {"read": ["user:alice"]}})];
    for post in posts {
        assert_eq!(call(addr, "POST", "/v1/db/app/posts", Some(editor), Some(post)).await.0, 201);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_authenticate_resume_only_as_themselves_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), config()).await;
    let addr = server.addr;
    let (alice, bob) = (token("alice", &[], 600), token("bob", &[], 600));
    // A bad token at connect is refused before the upgrade.
    assert!(tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token=nonsense")).await.is_err());
    // Anonymous: may not read app.posts; an `auth` message fixes that.
    let mut socket = connect_as(addr, None).await;
    send(&mut socket, json!({"type": "subscribe", "id": "a", "ns": "app.posts"})).await;
    assert!(matches!(next(&mut socket).await, ServerMessage::Error(e) if e.code == ErrorCode::Unauthorized));
    send(&mut socket, json!({"type": "auth", "token": "bad"})).await;
    assert!(matches!(next(&mut socket).await, ServerMessage::Error(e) if e.code == ErrorCode::Unauthorized));
    send(&mut socket, json!({"type": "auth", "token": bob})).await;
    send(&mut socket, json!({"type": "subscribe", "id": "a", "ns": "app.posts"})).await;
    let ServerMessage::Result(result) = next(&mut socket).await else { panic!("a result") };
    let stolen = result.token.clone().unwrap();
    // Alice cannot take over bob's subscription with its token.
    let mut other = connect_as(addr, Some(&alice)).await;
    send(&mut other, json!({"type": "subscribe", "id": "a", "ns": "app.posts", "resume": {"token": stolen, "seq": 1}}))
        .await;
    assert!(matches!(next(&mut other).await, ServerMessage::Error(e) if e.code == ErrorCode::Unauthorized));

    // A service subscribes on behalf of a user and sees what that user may see; a user may
    // not do that.
    http_post_as(addr, &token("root", &["editor"], 600)).await;
    let service = token("backend", &["service"], 600);
    let mut svc = connect_as(addr, Some(&service)).await;
    send(&mut svc, json!({"type": "subscribe", "id": "s", "ns": "app.posts", "as": {"sub": "bob"}})).await;
    let ServerMessage::Result(result) = next(&mut svc).await else { panic!("a result") };
    assert_eq!(ids(&result.docs), vec![1], "bob's view: the public post, not alice's");
    send(&mut other, json!({"type": "subscribe", "id": "x", "ns": "app.posts", "as": {"sub": "bob"}})).await;
    assert!(matches!(next(&mut other).await, ServerMessage::Error(e) if e.code == ErrorCode::Unauthorized));

    // A token that expires ends its subscriptions with `unauthorized`.
    let short = token("carol", &[], 2);
    let mut brief = connect_as(addr, Some(&short)).await;
    send(&mut brief, json!({"type": "subscribe", "id": "b", "ns": "app.posts"})).await;
    assert!(matches!(next(&mut brief).await, ServerMessage::Result(_)));
    match next(&mut brief).await {
        ServerMessage::Error(e) => assert_eq!((e.id.as_deref(), e.code), (Some("b"), ErrorCode::Unauthorized)),
        other => panic!("expected the expiry, got {other:?}"),
    }
}
