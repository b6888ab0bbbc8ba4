//! `serve` on any source: the same server over a recorded change stream (`--replay`) instead
//! of the embedded store. Live results over real WebSockets must end exactly where the
//! replayed stream leaves the data, and the store-only REST API says why it is off.

use std::collections::BTreeMap;
use std::time::Duration;

use bson::{Bson, doc};
use livegrid::server::{ServerConfig, SourceChoice};
use livegrid::workload::change_stream_json;
use livegrid_engine::{ChangeEvent, ChangeOp};
use livegrid_protocol::{LiveResult, Position};
use serde_json::json;

mod common;
use common::{apply_message, connect, http, next_within, send, server_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_replays_a_change_stream_to_live_queries() {
    let dir = tempfile::tempdir().unwrap();
    // 400 writes over 40 ids: inserts, replaces and deletes, with the final state known.
    let mut lines = Vec::new();
    let mut state: BTreeMap<i64, i64> = BTreeMap::new();
    for i in 0..400i64 {
        let id = (i * 7) % 40;
        let (op, doc) = if state.contains_key(&id) && i % 5 == 0 {
            state.remove(&id);
            (ChangeOp::Delete, None)
        } else {
            let op = if state.insert(id, i).is_some() { ChangeOp::Replace } else { ChangeOp::Insert };
            (op, Some(std::sync::Arc::new(doc! {"_id": id, "n": i})))
        };
        let event =
            ChangeEvent { position: Position::new(i as u64 + 1), ns: "app.items".into(), op, id: Bson::Int64(id), doc };
        lines.push(change_stream_json(&event));
    }
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    // Paced, so that the subscriptions below start while the stream is being replayed.
    let source = SourceChoice::Replay { path: file, rate: Some(400.0) };
    let server = server_with(&dir.path().join("data"), ServerConfig { source, ..Default::default() }).await;

    let (status, body) = http(server.addr, "GET", "/v1/db/app/items", None).await;
    assert_eq!((status, body["code"].as_str()), (501, Some("no_store")));

    let mut socket = connect(server.addr).await;
    let queries = [
        ("all", json!({})),
        ("high", json!({"filter": {"n": {"$gte": 200}}})),
        ("top", json!({"sort": {"n": -1}, "limit": 5})),
    ];
    for (id, query) in &queries {
        let mut message = json!({"type": "subscribe", "id": id, "ns": "app.items"});
        message.as_object_mut().unwrap().extend(query.as_object().unwrap().clone());
        send(&mut socket, message).await;
    }
    let mut live: BTreeMap<String, LiveResult> = BTreeMap::new();
    // Until the engine processed the whole stream and every message of it arrived.
    let mut quiet = 0;
    for _ in 0..100_000 {
        match next_within(&mut socket, Duration::from_millis(500)).await {
            Some(message) => apply_message(&mut live, &message),
            None => {
                quiet += 1;
                assert!(quiet < 60, "the replayed stream was not processed within 30 s");
                let (_, health) = http(server.addr, "GET", "/healthz", None).await;
                if health["processed"] == json!(400) {
                    break;
                }
            }
        }
    }
    assert_eq!(live.len(), queries.len());
    let ids = |l: &LiveResult| {
        l.docs()
            .iter()
            .map(|d| d.get("_id").and_then(|v| v.as_i64().or(v.as_i32().map(i64::from))).unwrap())
            .collect::<Vec<_>>()
    };
    let all: Vec<i64> = state.keys().copied().collect();
    let mut got = ids(&live["all"]);
    got.sort_unstable();
    assert_eq!(got, all);
    let mut high = ids(&live["high"]);
    high.sort_unstable();
    assert_eq!(high, state.iter().filter(|(_, n)| **n >= 200).map(|(id, _)| *id).collect::<Vec<_>>());
    let mut by_n: Vec<(i64, i64)> = state.iter().map(|(id, n)| (*n, *id)).collect();
    by_n.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids(&live["top"]), by_n.iter().take(5).map(|(_, id)| *id).collect::<Vec<_>>());
    server.shutdown().await;
}
