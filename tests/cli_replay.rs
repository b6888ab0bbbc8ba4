//! `livegrid replay`: the real binary, on one process and on a two-process grid over
//! loopback. Every subscription's messages, applied in order to its initial result, must give
//! the query's result on the final database state, and all runs must agree.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::{Bson, Document, doc};
use livegrid::workload::change_stream_json;
use livegrid_engine::memory::MemoryState;
use livegrid_engine::{ChangeEvent, ChangeOp};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::{LiveResult, ServerMessage, extjson};

mod common;

const NS: &str = "app.items";

/// A small workload with sorted windows, updates that move documents, and deletes.
fn write_inputs(dir: &Path) -> Vec<(String, QuerySpec, u64)> {
    let mut next = common::xorshift(7);
    let mut lines = Vec::new();
    let mut present = std::collections::HashSet::new();
    for position in 1..=400u64 {
        let id = next(40) as i64;
        let kind = ["a", "b", "c"][next(3) as usize];
        let doc = doc! {"_id": id, "price": next(100) as i64, "kind": kind, "tags": [next(5) as i64]};
        let (op, doc) = if present.contains(&id) && next(5) == 0 {
            present.remove(&id);
            (ChangeOp::Delete, None)
        } else {
            let op = if present.insert(id) { ChangeOp::Insert } else { ChangeOp::Replace };
            (op, Some(std::sync::Arc::new(doc)))
        };
        lines.push(change_stream_json(&ChangeEvent {
            position: position.into(),
            ns: NS.into(),
            op,
            id: Bson::Int64(id),
            doc,
        }));
    }
    std::fs::write(dir.join("events.jsonl"), lines.join("\n") + "\n").unwrap();
    let queries = vec![
        ("cheap".to_string(), QuerySpec { filter: doc! {"price": {"$lt": 30}}, ..Default::default() }, 0),
        (
            "top".to_string(),
            QuerySpec { filter: doc! {}, sort: Some(doc! {"price": -1}), limit: Some(3), ..Default::default() },
            50,
        ),
        (
            "kind-a".to_string(),
            QuerySpec {
                filter: doc! {"kind": "a"},
                sort: Some(doc! {"price": 1}),
                skip: 1,
                limit: Some(2),
                projection: Some(doc! {"price": 1}),
            },
            120,
        ),
        (
            "tags".to_string(),
            QuerySpec { filter: doc! {"$or": [{"tags": 1}, {"kind": "c"}]}, ..Default::default() },
            390,
        ),
    ];
    let query_lines: Vec<String> = queries
        .iter()
        .map(|(id, spec, after)| {
            let mut q = serde_json::json!({"id": id, "ns": NS, "filter": extjson::document_to_relaxed_json(&spec.filter), "skip": spec.skip, "after": after});
            if let Some(sort) = &spec.sort {
                q["sort"] = extjson::document_to_relaxed_json(sort);
            }
            if let Some(limit) = spec.limit {
                q["limit"] = limit.into();
            }
            if let Some(projection) = &spec.projection {
                q["projection"] = extjson::document_to_relaxed_json(projection);
            }
            q.to_string()
        })
        .collect();
    std::fs::write(dir.join("queries.jsonl"), query_lines.join("\n") + "\n").unwrap();
    queries
}

/// The final database state, from the events file.
fn final_state(dir: &Path) -> MemoryState {
    common::state_after(&dir.join("events.jsonl"))
}

fn replay(dir: &Path, out: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .arg("replay")
        .arg("--events")
        .arg(dir.join("events.jsonl"))
        .arg("--queries")
        .arg(dir.join("queries.jsonl"))
        .arg("--out")
        .arg(dir.join(out))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "replay failed: {stderr}");
    stderr
}

/// Applies an output file's messages per subscription.
fn results(path: &Path) -> BTreeMap<String, LiveResult> {
    let mut live: BTreeMap<String, LiveResult> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let message: ServerMessage = serde_json::from_str(line).unwrap();
        let id = match &message {
            ServerMessage::Result(r) => r.id.clone(),
            ServerMessage::Delta(d) => d.id.clone(),
            other => panic!("unexpected {other:?}"),
        };
        live.entry(id).or_default().apply(&message).unwrap_or_else(|e| panic!("{line}: {e}"));
    }
    live
}

fn check(
    dir: &Path,
    out: &str,
    queries: &[(String, QuerySpec, u64)],
    state: &MemoryState,
) -> BTreeMap<String, Vec<Document>> {
    let live = results(&dir.join(out));
    let mut finals = BTreeMap::new();
    for (id, spec, _) in queries {
        let query = Query::compile(spec).unwrap();
        let mut got = live[id].docs().to_vec();
        if spec.sort.is_none() && !query.is_windowed() {
            got.sort_by(|a, b| livegrid_matcher::compare_values(a.get("_id").unwrap(), b.get("_id").unwrap()));
        }
        assert_eq!(got, query.evaluate(state.documents(NS)), "{out}: subscription {id}");
        finals.insert(id.clone(), got);
    }
    finals
}

#[test]
fn replay_one_process_and_two_processes_agree_with_the_model() {
    let scratch = tempfile_dir("replay");
    let dir = scratch.path();
    let queries = write_inputs(dir);
    let state = final_state(dir);

    let summary = finish(replay(dir, "one.jsonl", &["--grid", "1x1"]));
    let summary: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
    assert_eq!(summary["events"], 400);
    assert_eq!(summary["queries"], 4);
    assert_eq!(summary["results"], 4);
    let one = check(dir, "one.jsonl", &queries, &state);

    finish(replay(dir, "grid.jsonl", &["--grid", "2x2", "--batch", "7"]));
    assert_eq!(one, check(dir, "grid.jsonl", &queries, &state));

    let ports: Vec<u16> =
        (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    let hostfile = dir.join("hosts");
    std::fs::write(&hostfile, format!("127.0.0.1:{}\n127.0.0.1:{}\n", ports[0], ports[1])).unwrap();
    let hosts = hostfile.to_str().unwrap();
    let worker = Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .args(["replay", "--grid", "2x2", "--hostfile", hosts, "--process", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let leader = replay(dir, "cluster.jsonl", &["--grid", "2x2", "--hostfile", hosts, "--process", "0"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let (leader, worker) = (finish_by(leader, deadline), finish_by(worker, deadline));
    assert!(leader.contains("\"events\":400"), "{leader}");
    assert!(worker.contains("\"role\":\"worker\""), "{worker}");
    let cluster = check(dir, "cluster.jsonl", &queries, &state);
    assert_eq!(one, cluster);
}

fn finish_by(mut child: Child, deadline: Instant) -> String {
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return finish(child);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("replay process did not finish in time");
}

/// A scratch directory, removed when the returned guard drops.
fn tempfile_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("livegrid-test-{name}-")).tempdir().unwrap()
}

#[test]
fn bad_inputs_name_the_file_and_line() {
    let scratch = tempfile_dir("replay-bad");
    let dir = scratch.path();
    std::fs::write(dir.join("events.jsonl"), "{\"operationType\":\"insert\",\"ns\":\"a.b\",\"documentKey\":{\"_id\":1},\"fullDocument\":{\"_id\":1}}\nnot json\n").unwrap();
    std::fs::write(dir.join("queries.jsonl"), "{\"id\":\"q\",\"ns\":\"a.b\",\"filter\":{}}\n").unwrap();
    let out = replay(dir, "out.jsonl", &[]).wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("events.jsonl:2: invalid change event"), "{stderr}");

    std::fs::write(dir.join("events.jsonl"), "").unwrap();
    std::fs::write(dir.join("queries.jsonl"), "{\"id\":\"q\",\"ns\":\"a.b\",\"filter\":{\"a\":{\"$where\":1}}}\n")
        .unwrap();
    let out = replay(dir, "out.jsonl", &[]).wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("query \"q\": bad query: unsupported operator $where at a"), "{stderr}");
}

#[test]
fn workload_says_what_it_wrote_and_how_to_replay_it() {
    let dir = tempfile_dir("workload");
    let out = Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .args(["workload", "--events", "20", "--queries", "3", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("wrote 20 change events (0 initial documents") && said.contains("and 3 queries to"),
        "{said}"
    );
    assert!(said.contains("livegrid replay --events"), "{said}");
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    assert_eq!(events.lines().count(), 20);
}

/// Every workload kind replays to exact results: each subscription's messages, applied in
/// order, give its query's result on the final state (queries registered after the initial
/// documents).
#[test]
fn every_workload_kind_replays_exactly() {
    for kind in ["chat", "feed", "shop", "mixed"] {
        let dir = tempfile_dir(kind);
        let dir = dir.path();
        let made = Command::new(env!("CARGO_BIN_EXE_livegrid"))
            .args(["workload", "--kind", kind, "--docs", "300", "--events", "600", "--queries", "120", "--out"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let said = finish(replay(dir, "out.jsonl", &[]));
        let summary: serde_json::Value = serde_json::from_str(said.trim().lines().last().unwrap()).unwrap();
        assert_eq!(summary["writes_only_events"], 600, "timed from the queries' registration on: {summary}");
        let state = final_state(dir);
        let live = results(&dir.join("out.jsonl"));
        let lines = std::fs::read_to_string(dir.join("queries.jsonl")).unwrap();
        for line in lines.lines() {
            let q: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(q["after"], 300, "{line}");
            let doc = |v: &serde_json::Value| extjson::document_from_json(v.clone()).unwrap();
            let spec = QuerySpec {
                filter: doc(&q["filter"]),
                sort: q.get("sort").map(doc),
                limit: q.get("limit").and_then(|l| l.as_u64()),
                ..Default::default()
            };
            let query = Query::compile(&spec).unwrap();
            let id = q["id"].as_str().unwrap();
            let mut got = live[id].docs().to_vec();
            if !query.is_windowed() {
                got.sort_by(|a, b| livegrid_matcher::compare_values(a.get("_id").unwrap(), b.get("_id").unwrap()));
            }
            let ns = q["ns"].as_str().unwrap();
            assert_eq!(got, query.evaluate(state.documents(ns)), "{kind}: subscription {id}");
        }
    }
}
