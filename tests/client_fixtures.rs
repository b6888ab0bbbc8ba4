//! The recorded fixtures that the Rust and the JavaScript clients' delta application are both
//! tested against (`clients/js/test/fixtures/`), so the two cannot drift:
//!
//! - `events.jsonl` and `queries.jsonl`: a small workload (sorted, skipped, limited and
//!   unsorted queries, projections, transactions whose deltas carry `more`, ObjectIds, dates
//!   and 64-bit integers), in the formats `livegrid replay` reads;
//! - `messages.jsonl`: what `livegrid replay --out` sent for it;
//! - `expected.json`: each subscription's final result;
//! - `broken.json`: message sequences that break a promise (a seq gap, a delta before the
//!   result, an index that names another document, an add of a document already there), with
//!   the kind of error and the message that must raise it.
//!
//! This test applies them with [`LiveResult`] and checks the final results against the query
//! evaluated on the final state; `clients/js/test/live-result.test.js` applies the same files.
//! `LIVEGRID_WRITE_CLIENT_FIXTURES=1` writes them anew (with the real `livegrid replay`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bson::{Bson, Document, doc, oid::ObjectId};
use livegrid::workload::change_stream_json;
use livegrid_engine::{ChangeEvent, ChangeOp};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::{ApplyError, LiveResult, ServerMessage, extjson};
use serde_json::{Value, json};

mod common;

const NS: &str = "app.items";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js/test/fixtures")
}

/// Writes events: 20 ids, inserts, replacements and deletes, one in five steps a transaction
/// of 2–3 writes sharing a cluster time.
fn write_events(dir: &Path) {
    let mut next = common::xorshift(11);
    let mut lines = Vec::new();
    let mut present = std::collections::HashSet::new();
    for time in 1..=260u32 {
        let writes = if next(5) == 0 { 2 + next(2) } else { 1 };
        for increment in 0..writes as u32 {
            let id = next(20) as i64;
            let kind = ["a", "b", "c"][next(3) as usize];
            let oid = ObjectId::from_bytes([id as u8; 12]);
            let when = bson::DateTime::from_millis(1_700_000_000_000 + next(1000) as i64 * 60_000);
            let doc = doc! {
                "_id": id, "price": next(50) as i64, "kind": kind, "ref": oid, "at": when,
                "big": (1i64 << 60) + next(7) as i64, "tags": [next(4) as i32],
            };
            let (op, doc) = if present.contains(&id) && next(4) == 0 {
                present.remove(&id);
                (ChangeOp::Delete, None)
            } else {
                let op = if present.insert(id) { ChangeOp::Insert } else { ChangeOp::Replace };
                (op, Some(std::sync::Arc::new(doc)))
            };
            let event = ChangeEvent { position: u64::from(time).into(), ns: NS.into(), op, id: Bson::Int64(id), doc };
            let mut line: Value = serde_json::from_str(&change_stream_json(&event)).unwrap();
            line["clusterTime"] = json!({"$timestamp": {"t": time, "i": increment + 1}});
            lines.push(line.to_string());
        }
    }
    std::fs::write(dir.join("events.jsonl"), lines.join("\n") + "\n").unwrap();
    let queries = [
        json!({"id": "cheap", "ns": NS, "filter": {"price": {"$lt": 15}}}),
        json!({"id": "top", "ns": NS, "sort": {"price": -1, "_id": 1}, "limit": 3, "after": 40}),
        json!({"id": "kind-a", "ns": NS, "filter": {"kind": "a"}, "sort": {"price": 1}, "skip": 1, "limit": 3,
               "projection": {"price": 1, "at": 1}, "after": 100}),
        json!({"id": "recent", "ns": NS, "sort": {"at": -1, "_id": 1}, "limit": 5}),
        json!({"id": "tags", "ns": NS, "filter": {"$or": [{"tags": 1}, {"kind": "c"}]}, "after": 200}),
    ];
    let lines: Vec<String> = queries.iter().map(Value::to_string).collect();
    std::fs::write(dir.join("queries.jsonl"), lines.join("\n") + "\n").unwrap();
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Applies messages per subscription; the final documents as relaxed Extended JSON.
fn apply_all(messages: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut live: BTreeMap<String, LiveResult> = BTreeMap::new();
    for message in messages {
        let parsed: ServerMessage = serde_json::from_value(message.clone()).unwrap();
        let id = message["id"].as_str().unwrap().to_string();
        live.entry(id).or_default().apply(&parsed).unwrap_or_else(|e| panic!("{message}: {e}"));
    }
    live.into_iter()
        .map(|(id, result)| (id, result.docs().iter().map(extjson::document_to_relaxed_json).collect()))
        .collect()
}

/// The first message of `messages` that `LiveResult` refuses, and the kind of error.
fn first_error(messages: &[Value]) -> Option<(usize, &'static str)> {
    let mut live = LiveResult::default();
    for (at, message) in messages.iter().enumerate() {
        let parsed: ServerMessage = serde_json::from_value(message.clone()).unwrap();
        if let Err(e) = live.apply(&parsed) {
            let kind = match e {
                ApplyError::NoResult => "no_result",
                ApplyError::Seq { .. } => "seq",
                ApplyError::Mismatch { .. } => "mismatch",
                ApplyError::NotLive => "not_live",
            };
            return Some((at, kind));
        }
    }
    None
}

/// Message sequences that break the protocol's promises, cut from one subscription's messages.
fn broken_cases(messages: &[Value]) -> Value {
    let of = |id: &str| messages.iter().filter(|m| m["id"] == id).cloned().collect::<Vec<_>>();
    let top = of("top");
    assert!(top.len() > 6, "the top window has deltas");
    let mut gap = top[..5].to_vec();
    gap.remove(2);
    let mut no_result = top[1..4].to_vec();
    no_result.truncate(3);
    // An index that names another document: the first delta with an oldIndex, pointed elsewhere.
    let (at, _) = top.iter().enumerate().skip(1).find(|(_, m)| m["oldIndex"].is_number()).expect("an oldIndex");
    let mut wrong_index = top[..=at].to_vec();
    let old = wrong_index[at]["oldIndex"].as_u64().unwrap();
    wrong_index[at]["oldIndex"] = json!(if old == 0 { 1 } else { old - 1 });
    // An add of a document the result already holds.
    let cheap = of("cheap");
    let (add, _) = cheap.iter().enumerate().find(|(_, m)| m["op"] == "add").expect("an add");
    let mut twice = cheap[..=add].to_vec();
    let mut again = cheap[add].clone();
    again["seq"] = json!(cheap[add]["seq"].as_u64().unwrap() + 1);
    twice.push(again);
    let cases = [("gap", gap), ("no-result", no_result), ("wrong-index", wrong_index), ("add-twice", twice)];
    let cases: Vec<Value> = cases
        .into_iter()
        .map(|(name, messages)| {
            let (at, kind) = first_error(&messages).unwrap_or_else(|| panic!("{name} breaks no promise"));
            json!({"name": name, "messages": messages, "error": kind, "at": at})
        })
        .collect();
    Value::Array(cases)
}

fn write_fixtures(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    write_events(dir);
    let out = Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .arg("replay")
        .arg("--events")
        .arg(dir.join("events.jsonl"))
        .arg("--queries")
        .arg(dir.join("queries.jsonl"))
        .arg("--out")
        .arg(dir.join("messages.jsonl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let messages = read_lines(&dir.join("messages.jsonl"));
    let expected = serde_json::to_string_pretty(&apply_all(&messages)).unwrap();
    std::fs::write(dir.join("expected.json"), expected + "\n").unwrap();
    let broken = serde_json::to_string_pretty(&broken_cases(&messages)).unwrap();
    std::fs::write(dir.join("broken.json"), broken + "\n").unwrap();
}

/// Each query evaluated on the final state of the events, as relaxed Extended JSON.
fn oracle(dir: &Path) -> BTreeMap<String, Vec<Value>> {
    let state = common::state_after(&dir.join("events.jsonl"));
    let mut results = BTreeMap::new();
    for query in read_lines(&dir.join("queries.jsonl")) {
        let part = |key: &str| query.get(key).map(|v| extjson::parse_document(&v.to_string()).unwrap());
        let spec = QuerySpec {
            filter: part("filter").unwrap_or_default(),
            sort: part("sort"),
            skip: query["skip"].as_u64().unwrap_or(0),
            limit: query["limit"].as_u64(),
            projection: part("projection"),
        };
        let compiled = Query::compile(&spec).unwrap();
        let docs: Vec<Document> = compiled.evaluate(state.documents(NS));
        results.insert(
            query["id"].as_str().unwrap().to_string(),
            docs.iter().map(extjson::document_to_relaxed_json).collect(),
        );
    }
    results
}

#[test]
fn the_recorded_fixtures_apply_to_the_query_results() {
    let dir = fixtures();
    if std::env::var("LIVEGRID_WRITE_CLIENT_FIXTURES").is_ok_and(|v| v == "1") {
        write_fixtures(&dir);
    }
    let messages = read_lines(&dir.join("messages.jsonl"));
    assert!(messages.iter().any(|m| m["more"] == true), "a transaction's deltas carry more");
    for op in ["add", "remove", "change", "changeIndex"] {
        assert!(messages.iter().any(|m| m["op"] == op), "the fixtures have a {op}");
    }
    let live = apply_all(&messages);
    let expected: BTreeMap<String, Vec<Value>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert_eq!(live, expected, "expected.json is what LiveResult makes of messages.jsonl");
    let mut truth = oracle(&dir);
    // Unsorted results keep arrival order; compare them as sets.
    for id in ["cheap", "tags"] {
        let by_id = |docs: &mut Vec<Value>| docs.sort_by_key(|d| d["_id"].to_string());
        by_id(truth.get_mut(id).unwrap());
        let mut got = live[id].clone();
        by_id(&mut got);
        assert_eq!(got, truth[id], "{id}");
        truth.remove(id);
    }
    for (id, docs) in truth {
        assert_eq!(live[&id], docs, "{id}");
    }
    let broken: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(dir.join("broken.json")).unwrap()).unwrap();
    for case in broken {
        let messages = case["messages"].as_array().unwrap();
        let (at, kind) = first_error(messages).expect("an error");
        assert_eq!(
            (at as u64, kind),
            (case["at"].as_u64().unwrap(), case["error"].as_str().unwrap()),
            "{}",
            case["name"]
        );
    }
}
