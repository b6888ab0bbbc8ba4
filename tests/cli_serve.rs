//! `livegrid serve` as a real process: configuration from a TOML file (a listen address by
//! name), plain logs when not at a terminal, a clear refusal for a second instance on the same
//! data folder, and a graceful shutdown on SIGTERM that closes WebSockets with a reason.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_connections_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("livegrid.toml");
    std::fs::write(
        &config,
        format!("listen = \"localhost:{port}\"\ndurability = \"immediate\"\nheartbeat_seconds = 30\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}/v1/ws");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut socket = loop {
        match tokio_tungstenite::connect_async(&url).await {
            Ok((socket, _)) => break socket,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("server did not start: {e}"),
        }
    };
    socket.send(Message::Text(r#"{"type":"subscribe","id":"a","ns":"db.c"}"#.into())).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.unwrap().unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("\"result\""));
    // A second instance on the same data folder names it and says why it cannot start.
    let second = Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{said}");
    assert!(said.contains("data") && said.contains("in use by another livegrid instance"), "{said}");

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await.expect("close in time") {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close frame with a reason"),
            Some(Ok(_)) => continue,
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1001);
    assert!(close.reason.contains("shutting down"), "{}", close.reason);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    // Logs to a pipe carry no colour codes.
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("livegrid listening"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "escape codes in {logs}");
}

#[test]
fn bad_configuration_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "listen = \"nowhere\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_livegrid")).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen address"));
    std::fs::write(&config, "unknown_key = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_livegrid")).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Starts the binary with a grid worker made to panic, and a subscriber.
async fn failing_server(exit_on_fatal: bool) -> (std::process::Child, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_livegrid"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--exit-on-fatal", &exit_on_fatal.to_string()])
        .arg("--data")
        .arg(dir.path())
        .env("LIVEGRID_TEST_FAULT", "worker-panic")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, port, dir)
}

async fn subscribe_and_see_the_failure(port: u16) {
    let url = format!("ws://127.0.0.1:{port}/v1/ws");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut socket = loop {
        match tokio_tungstenite::connect_async(&url).await {
            Ok((socket, _)) => break socket,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("server did not start: {e}"),
        }
    };
    socket.send(Message::Text(r#"{"type":"subscribe","id":"a","ns":"db.c"}"#.into())).await.unwrap();
    let mut saw_error = false;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(20), socket.next()).await.expect("the failure is reported") {
            Some(Ok(Message::Text(text))) => saw_error |= text.contains("\"unavailable\""),
            Some(Ok(Message::Close(frame))) => break frame.expect("a reason"),
            Some(Ok(_)) => continue,
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    };
    assert!(saw_error, "the subscription got no unavailable error");
    assert_eq!(u16::from(close.code), 1011, "{}", close.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_failure_is_reported_and_exits_non_zero() {
    let (mut child, port, _dir) = failing_server(true).await;
    subscribe_and_see_the_failure(port).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the failed server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_exit_on_fatal_the_failure_stays_visible_on_healthz() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut child, port, _dir) = failing_server(false).await;
    subscribe_and_see_the_failure(port).await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("panicked"), "{response}");
    child.kill().unwrap();
    child.wait().unwrap();
}
