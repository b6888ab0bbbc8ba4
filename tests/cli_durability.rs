//! `livegrid serve` as a real process, killed with SIGKILL at a random moment under
//! concurrent writers: every acknowledged write is there after a restart, no delta was ever
//! sent for a write the crash rolled back, and positions are not reused. Also: a paused server
//! does not drop its clients for missing pongs, and unusable configuration is refused.
//!
//! `LIVEGRID_CRASH_SEED` picks the kill moments (the default runs three fixed seeds).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{connect, free_port, http, next, send, signal, spawn_server, wait_exit};
use futures_util::StreamExt;
use livegrid_protocol::ServerMessage;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn seeds() -> Vec<u64> {
    match std::env::var("LIVEGRID_CRASH_SEED") {
        Ok(seed) => vec![seed.parse().expect("LIVEGRID_CRASH_SEED is a number")],
        Err(_) => vec![1, 2, 3],
    }
}

/// What clients saw before the crash.
#[derive(Default)]
struct Seen {
    acked: BTreeSet<i64>,
    delta_ids: BTreeSet<i64>,
    max_delta_position: u64,
}

/// Writes from 16 concurrent writers and watches deltas until the server is killed after
/// `kill_after`; returns what was acknowledged and what was announced.
async fn crash_under_load(addr: SocketAddr, server: &std::process::Child, kill_after: Duration) -> Seen {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut watcher = connect(addr).await;
    send(&mut watcher, json!({"type": "subscribe", "id": "all", "ns": "crash.docs"})).await;
    assert!(matches!(next(&mut watcher).await, ServerMessage::Result(_)));
    let watching = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(Ok(Message::Text(text)))) =
                tokio::time::timeout(Duration::from_secs(10), watcher.next()).await
            {
                if let Ok(ServerMessage::Delta(d)) = serde_json::from_str::<ServerMessage>(&text) {
                    let mut seen = seen.lock().unwrap();
                    seen.delta_ids.insert(d.doc_id.as_i64().or(d.doc_id.as_i32().map(i64::from)).unwrap());
                    seen.max_delta_position = seen.max_delta_position.max(d.position.time());
                }
            }
        })
    };
    let writers: Vec<_> = (0..16i64)
        .map(|w| {
            let seen = seen.clone();
            tokio::spawn(async move {
                for i in 0..100_000i64 {
                    let id = w * 1_000_000 + i;
                    let Ok(Ok((status, _))) = tokio::time::timeout(
                        Duration::from_secs(5),
                        try_post(addr, "/v1/db/crash/docs", json!({"_id": id, "w": w, "i": i})),
                    )
                    .await
                    else {
                        break;
                    };
                    if status == 201 {
                        seen.lock().unwrap().acked.insert(id);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(kill_after).await;
    signal(server, "-KILL");
    for writer in writers {
        let _ = writer.await;
    }
    let _ = watching.await;
    Arc::try_unwrap(seen).ok().expect("tasks ended").into_inner().unwrap()
}

/// A POST that reports connection failures instead of panicking (the server dies mid-run).
async fn try_post(addr: SocketAddr, path: &str, body: serde_json::Value) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, text))
}

/// The ids stored in `crash.docs`, and the store's position.
async fn stored(addr: SocketAddr) -> (BTreeSet<i64>, u64) {
    let (status, body) = http(addr, "GET", "/v1/db/crash/docs?projection=%7B%22_id%22%3A1%7D", None).await;
    assert_eq!(status, 200, "{body}");
    let ids = body["docs"].as_array().unwrap().iter().map(|d| d["_id"].as_i64().unwrap()).collect();
    (ids, body["position"].as_u64().unwrap())
}

fn kill_moment(seed: u64) -> Duration {
    // A fixed spread of moments: early, mid-stream, late.
    Duration::from_millis(300 + (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 1_500)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_kill_9() {
    for seed in seeds() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut server = spawn_server(dir.path(), port, &[]).await;
        let seen = crash_under_load(addr, &server, kill_moment(seed)).await;
        wait_exit(&mut server);
        assert!(seen.acked.len() > 50, "seed {seed}: too few writes before the kill ({})", seen.acked.len());
        let mut server = spawn_server(dir.path(), port, &[]).await;
        let (ids, position) = stored(addr).await;
        let lost: Vec<_> = seen.acked.difference(&ids).collect();
        assert!(
            lost.is_empty(),
            "seed {seed}: {} acknowledged writes lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        let phantom: Vec<_> = seen.delta_ids.difference(&ids).collect();
        assert!(phantom.is_empty(), "seed {seed}: deltas for writes that were rolled back: {phantom:?}");
        assert!(position >= seen.max_delta_position, "seed {seed}: position {position} went back");
        signal(&server, "-TERM");
        assert!(wait_exit(&mut server).success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_durability_never_announces_a_write_it_then_loses() {
    for seed in seeds() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let flags = ["--durability", "periodic:200"];
        let mut server = spawn_server(dir.path(), port, &flags).await;
        let seen = crash_under_load(addr, &server, kill_moment(seed)).await;
        wait_exit(&mut server);
        let mut server = spawn_server(dir.path(), port, &flags).await;
        let (ids, _) = stored(addr).await;
        let phantom: Vec<_> = seen.delta_ids.difference(&ids).collect();
        assert!(phantom.is_empty(), "seed {seed}: deltas for writes that were rolled back: {phantom:?}");
        // Positions handed out before the crash are never handed out again.
        let (status, body) = http(addr, "POST", "/v1/db/crash/other", Some(json!({"x": 1}))).await;
        assert_eq!(status, 201);
        let position = body["position"].as_u64().unwrap();
        assert!(position > seen.max_delta_position, "seed {seed}: position {position} reused");
        signal(&server, "-TERM");
        assert!(wait_exit(&mut server).success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_keeps_its_clients() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut server = spawn_server(dir.path(), port, &["--heartbeat-seconds", "1"]).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(connect(addr).await);
    }
    // Every client keeps reading (and so answering pings) the whole time.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
                loop {
                    match tokio::time::timeout_at(deadline, socket.next()).await {
                        Err(_) => return Ok(socket),
                        Ok(Some(Ok(Message::Close(frame)))) => return Err(format!("closed: {frame:?}")),
                        Ok(Some(Ok(_))) => continue,
                        Ok(other) => return Err(format!("ended: {other:?}")),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Pause the server for several heartbeat intervals, as a VM stall would.
    signal(&server, "-STOP");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    signal(&server, "-CONT");
    for reader in readers {
        let mut socket = reader.await.unwrap().expect("a client was dropped after the pause");
        send(&mut socket, json!({"type": "ping"})).await;
        assert_eq!(next(&mut socket).await, ServerMessage::Pong);
    }
    signal(&server, "-TERM");
    assert!(wait_exit(&mut server).success());
}

#[test]
fn unusable_configuration_is_refused_at_start() {
    for flags in [
        &["--heartbeat-seconds", "0"][..],
        &["--queue-capacity", "18446744073709551615"],
        &["--queue-capacity", "0"],
        &["--max-connections", "0"],
        &["--durability", "periodic:0"],
        &["--grid", "0x1"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_livegrid"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path())
            .args(flags)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "), "{flags:?}");
    }
}
