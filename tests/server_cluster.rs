//! `serve` on a timely cluster: two real `livegrid serve` processes on loopback, one grid
//! over both, following the MongoDB wire fixture (`tests/common/mongo_fixture.rs`) with the
//! real driver. Clients on either process see exact results for writes made anywhere (the
//! fixture's own and REST writes through the process that does not feed the grid), sorted
//! windows and a live pipeline included; `/healthz` answers 503 until the cluster is
//! complete; a client that moves to the other process gets a fresh, exact result; the loss of
//! a process turns the other unhealthy and its clients get an error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::{Bson, Document, doc};
use livegrid_protocol::{LiveResult, ServerMessage};
use serde_json::{Value, json};

mod common;
use common::mongo_fixture::MongoFixture;
use common::{Socket, apply_message, connect, next_within, send, settle, subscribe};

const NS: &str = "app.items";

/// One process of the cluster: the real binary, its log in the test's directory.
fn spawn_process(dir: &Path, hostfile: &Path, process: usize, port: u16, uri: &str, extra: &[&str]) -> Child {
    let log = std::fs::File::create(dir.join(format!("process-{process}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.join(format!("data-{process}")))
        .args(["--mongodb", uri, "--watch", "app", "--grid", "1x2", "--hostfile"])
        .arg(hostfile)
        .args(["--process", &process.to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// A hostfile for `processes` processes on free loopback ports.
fn hostfile(dir: &Path, processes: usize) -> std::path::PathBuf {
    let path = dir.join("hosts.txt");
    let lines: Vec<String> = (0..processes).map(|_| format!("127.0.0.1:{}", common::free_port())).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// `/healthz` of the process on `port`: its status and body (status 0 while nothing listens).
async fn health(port: u16) -> (u16, Value) {
    match tokio::net::TcpStream::connect(addr(port)).await {
        Ok(_) => common::http(addr(port), "GET", "/healthz", None).await,
        Err(_) => (0, Value::Null),
    }
}

/// Polls `/healthz` on `port` until it answers `status`, within `within`; its body.
async fn health_becomes(port: u16, status: u16, within: Duration, logs: &Path) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (now, body) = health(port).await;
        if now == status {
            return body;
        }
        if Instant::now() > deadline {
            panic!("/healthz on {port} answered {now} {body}, not {status}, within {within:?}\n{}", read_logs(logs));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_logs(dir: &Path) -> String {
    (0..2)
        .map(|i| {
            let log = std::fs::read_to_string(dir.join(format!("process-{i}.log"))).unwrap_or_default();
            format!("--- process {i} ---\n{log}")
        })
        .collect()
}

/// The expected results of `queries` and of the pipeline `sums` (total `n` per `cat`).
fn expected(fixture: &MongoFixture, queries: &[(&str, Value)], with_sums: bool) -> BTreeMap<String, Vec<Document>> {
    let mut expected = fixture.expected(NS, queries);
    if with_sums {
        let mut sums: BTreeMap<i64, i64> = BTreeMap::new();
        for d in fixture.documents(NS) {
            let cat = d.get("cat").and_then(Bson::as_i32).unwrap_or(0);
            *sums.entry(i64::from(cat)).or_default() += i64::from(d.get("n").and_then(Bson::as_i32).unwrap_or(0));
        }
        let docs = sums.into_iter().map(|(cat, total)| doc! {"_id": cat as i32, "total": total as i32}).collect();
        expected.insert("sums".into(), docs);
    }
    expected
}

/// Reads messages until the `result` of `id` arrives, applying all; its token.
async fn result_token(socket: &mut Socket, live: &mut BTreeMap<String, LiveResult>, id: &str) -> String {
    loop {
        let message = next_within(socket, Duration::from_secs(20)).await.expect("a result");
        apply_message(live, &message);
        if let ServerMessage::Result(r) = &message
            && r.id == id
        {
            return r.token.clone().expect("a resume token");
        }
    }
}

/// Two processes with the default settings, both answering `/healthz` 200.
async fn healthy_cluster(fixture: &MongoFixture, dir: &Path) -> (Processes, [u16; 2]) {
    let hosts = hostfile(dir, 2);
    let (uri, ports) = (fixture.uri(), [common::free_port(), common::free_port()]);
    let processes = Processes(vec![
        spawn_process(dir, &hosts, 0, ports[0], &uri, &[]),
        spawn_process(dir, &hosts, 1, ports[1], &uri, &[]),
    ]);
    for port in ports {
        health_becomes(port, 200, Duration::from_secs(60), dir).await;
    }
    (processes, ports)
}

/// Kills the children left when a test fails.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_both_processes_see_exact_results_and_move_between_them() {
    let fixture = MongoFixture::start();
    for i in 0..12 {
        fixture.insert(NS, doc! {"_id": i, "n": i, "cat": i % 3});
    }
    let dir = tempfile::tempdir().unwrap();
    let hosts = hostfile(dir.path(), 2);
    let (uri, ports) = (fixture.uri(), [common::free_port(), common::free_port()]);
    let stay = ["--exit-on-fatal", "false"];
    // Process 1 first: it listens at once, and answers 503 until process 0 has joined.
    let mut processes = Processes(vec![spawn_process(dir.path(), &hosts, 1, ports[1], &uri, &stay)]);
    let starting = health_becomes(ports[1], 503, Duration::from_secs(30), dir.path()).await;
    assert_eq!(starting["status"], "starting", "{starting}");
    processes.0.push(spawn_process(dir.path(), &hosts, 0, ports[0], &uri, &stay));
    for port in ports {
        let body = health_becomes(port, 200, Duration::from_secs(60), dir.path()).await;
        assert_eq!(body["cluster"]["processes"], 2, "{body}");
    }
    let (_, body) = health(ports[1]).await;
    assert_eq!(body["cluster"]["feeds"], false, "only process 0 reads the change stream: {body}");

    // The same queries on both processes, and a live pipeline on the one that does not feed.
    let queries = [
        ("big", json!({"filter": {"n": {"$gte": 5}}})),
        ("top", json!({"sort": {"n": -1}, "limit": 3})),
        ("low", json!({"filter": {"cat": 1}, "sort": {"n": 1}, "limit": 2})),
    ];
    let mut sockets = [connect(addr(ports[0])).await, connect(addr(ports[1])).await];
    let mut live = [BTreeMap::new(), BTreeMap::new()];
    for socket in &mut sockets {
        subscribe(socket, NS, &queries).await;
    }
    let sums = json!({"pipeline": [{"$group": {"_id": "$cat", "total": {"$sum": "$n"}}}]});
    subscribe(&mut sockets[1], NS, &[("sums", sums)]).await;
    // A client that will move from process 0 to process 1.
    let mut mover = connect(addr(ports[0])).await;
    let mut moved = BTreeMap::new();
    subscribe(&mut mover, NS, &queries[..1]).await;
    let token = result_token(&mut mover, &mut moved, "big").await;
    for (i, socket) in sockets.iter_mut().enumerate() {
        settle(socket, &mut live[i], &expected(&fixture, &queries, i == 1)).await;
    }

    // Writes made anywhere: the fixture's own, and REST writes through process 1 (which does
    // not read the change stream: they come back through process 0's stream and the grid).
    let mut random = common::xorshift(15);
    for round in 0..4 {
        for _ in 0..15 {
            let id = random(30) as i32;
            let n = random(40) as i32;
            match random(4) {
                0 => fixture.delete(NS, id),
                1 => fixture.update(NS, doc! {"_id": id, "n": n, "cat": n % 3}),
                _ => fixture.replace(NS, doc! {"_id": id, "n": n, "cat": n % 3}),
            }
        }
        let id = 100 + round;
        let (status, body) =
            common::http(addr(ports[1]), "POST", "/v1/db/app/items", Some(json!({"_id": id, "n": 7, "cat": 1}))).await;
        assert_eq!(status, 201, "{body}");
        for (i, socket) in sockets.iter_mut().enumerate() {
            settle(socket, &mut live[i], &expected(&fixture, &queries, i == 1)).await;
        }
    }

    // Process 1 knows positions from the messages it delivers, and bytes crossed both ways.
    for port in ports {
        let (_, body) = health(port).await;
        assert_ne!(body["processed"], 0, "{body}");
        assert!(body["cluster"]["bytes_sent"].as_u64().unwrap() > 0, "{body}");
    }

    // The moving client's connection drops; it reconnects to process 1 with its token. Its
    // subscription's buffers live on process 0: it gets a fresh, exact result (seq 1, a new
    // token), then deltas.
    let seq = moved["big"].seq();
    drop(mover);
    let mut mover = connect(addr(ports[1])).await;
    send(
        &mut mover,
        json!({"type": "subscribe", "id": "big", "ns": NS, "filter": {"n": {"$gte": 5}},
                            "resume": {"token": token, "seq": seq}}),
    )
    .await;
    let first = next_within(&mut mover, Duration::from_secs(20)).await.expect("an answer to the resume");
    match &first {
        ServerMessage::Result(r) => {
            assert_eq!(r.seq, 1, "a fresh result");
            assert_ne!(r.token.as_deref(), Some(token.as_str()), "a new token");
        }
        other => panic!("a fresh result, not {other:?}"),
    }
    let mut moved = BTreeMap::new();
    apply_message(&mut moved, &first);
    settle(&mut mover, &mut moved, &expected(&fixture, &queries[..1], false)).await;
    fixture.update(NS, doc! {"_id": 1, "n": 35, "cat": 2});
    fixture.insert(NS, doc! {"_id": 200, "n": 6, "cat": 0});
    settle(&mut mover, &mut moved, &expected(&fixture, &queries[..1], false)).await;
    for (i, socket) in sockets.iter_mut().enumerate() {
        settle(socket, &mut live[i], &expected(&fixture, &queries, i == 1)).await;
    }

    // Process 1 dies: process 0 turns unhealthy, and its clients are told.
    processes.0[0].kill().unwrap();
    processes.0[0].wait().unwrap();
    let failed = health_becomes(ports[0], 503, Duration::from_secs(30), dir.path()).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["reason"].as_str().unwrap().contains("another process of the cluster"), "{failed}");
    let mut told = false;
    while let Some(message) = next_within(&mut sockets[0], Duration::from_secs(10)).await {
        if let ServerMessage::Error(e) = &message
            && e.code == livegrid_protocol::ErrorCode::Unavailable
        {
            told = true;
            break;
        }
    }
    assert!(told, "the clients of process 0 get an `unavailable` error\n{}", read_logs(dir.path()));
}

/// Losing the process that feeds the grid fails the other one, which exits with status 1
/// under `--exit-on-fatal` (the default), so that a supervisor restarts the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_feeding_process_stops_the_others() {
    let fixture = MongoFixture::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut processes, ports) = healthy_cluster(&fixture, dir.path()).await;
    let mut socket = connect(addr(ports[1])).await;
    subscribe(&mut socket, NS, &[("all", json!({}))]).await;
    fixture.insert(NS, doc! {"_id": 1, "n": 1});
    let mut live = BTreeMap::new();
    settle(&mut socket, &mut live, &fixture.expected(NS, &[("all", json!({}))])).await;
    processes.0[0].kill().unwrap();
    processes.0[0].wait().unwrap();
    let status = common::wait_exit(&mut processes.0[1]);
    assert_eq!(status.code(), Some(1), "process 1 exits with status 1\n{}", read_logs(dir.path()));
    let logs = read_logs(dir.path());
    assert!(logs.contains("lost its connection to another process of the cluster"), "{logs}");
}

/// A process stopped alone with SIGTERM leaves within seconds (it does not wait for the grid
/// forever), and the process left fails and exits with status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_stopped_alone_leaves_and_the_other_fails() {
    let fixture = MongoFixture::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut processes, _) = healthy_cluster(&fixture, dir.path()).await;
    common::signal(&processes.0[1], "-TERM");
    let stopped = common::wait_exit(&mut processes.0[1]);
    assert_eq!(stopped.code(), Some(0), "the stopped process exits cleanly\n{}", read_logs(dir.path()));
    let failed = common::wait_exit(&mut processes.0[0]);
    assert_eq!(failed.code(), Some(1), "the other one fails\n{}", read_logs(dir.path()));
}

/// A process whose cluster never completes stops on SIGTERM (timely's connection loop does
/// not hold it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_waiting_for_its_cluster_stops_on_sigterm() {
    let fixture = MongoFixture::start();
    let dir = tempfile::tempdir().unwrap();
    let hosts = hostfile(dir.path(), 2);
    let port = common::free_port();
    let mut processes = Processes(vec![spawn_process(dir.path(), &hosts, 1, port, &fixture.uri(), &[])]);
    let body = health_becomes(port, 503, Duration::from_secs(30), dir.path()).await;
    assert_eq!(body["status"], "starting", "{body}");
    let (status, body) = common::http(addr(port), "GET", "/v1/db/app/items", None).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("starting")), "{body}");
    common::signal(&processes.0[0], "-TERM");
    let stopped = common::wait_exit(&mut processes.0[0]);
    assert_eq!(stopped.code(), Some(0), "{}", read_logs(dir.path()));
}
