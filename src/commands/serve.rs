//! `livegrid serve`: the HTTP/WebSocket server over the embedded store.
//!
//! Configuration, strongest first: flags, environment variables (`LIVEGRID_LISTEN`,
//! `LIVEGRID_DATA`, `LIVEGRID_GRID`, ...), the TOML file given with `--config`, defaults.
//! SIGTERM or Ctrl-C stops it gracefully: no new connections, every WebSocket closed with a
//! reason, the grid drained.

use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;

use crate::cli::ServeArgs;
use crate::server::{ServerConfig, start};

/// The TOML configuration file; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<String>,
    data: Option<String>,
    grid: Option<String>,
    queue_capacity: Option<usize>,
    max_subscriptions: Option<usize>,
    max_message_bytes: Option<usize>,
    heartbeat_seconds: Option<u64>,
    retention: Option<usize>,
    resume_grace_seconds: Option<u64>,
    resume_buffer: Option<usize>,
    durability: Option<String>,
}

/// Merges flags, environment, file and defaults.
pub fn config(args: &ServeArgs) -> Result<ServerConfig, String> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let defaults = ServerConfig::default();
    let listen = match args.listen.clone().or(file.listen) {
        Some(l) => l.parse().map_err(|e| format!("listen address {l:?}: {e}"))?,
        None => defaults.listen,
    };
    let grid = match args.grid.clone().or(file.grid) {
        Some(g) => g.parse()?,
        None => defaults.grid,
    };
    Ok(ServerConfig {
        listen,
        data: args.data.clone().or(file.data.map(Into::into)).unwrap_or(defaults.data),
        grid,
        queue_capacity: args.queue_capacity.or(file.queue_capacity).unwrap_or(defaults.queue_capacity).max(1),
        max_subscriptions: args.max_subscriptions.or(file.max_subscriptions).unwrap_or(defaults.max_subscriptions),
        max_message_bytes: args.max_message_bytes.or(file.max_message_bytes).unwrap_or(defaults.max_message_bytes),
        heartbeat: args
            .heartbeat_seconds
            .or(file.heartbeat_seconds)
            .map(Duration::from_secs)
            .unwrap_or(defaults.heartbeat),
        retention: args.retention.or(file.retention).unwrap_or(defaults.retention),
        resume_grace: args
            .resume_grace_seconds
            .or(file.resume_grace_seconds)
            .map(Duration::from_secs)
            .unwrap_or(defaults.resume_grace),
        resume_buffer: args.resume_buffer.or(file.resume_buffer).unwrap_or(defaults.resume_buffer),
        durability: match args.durability.clone().or(file.durability) {
            Some(d) => d.parse()?,
            None => defaults.durability,
        },
    })
}

/// Runs the command.
pub fn run(args: &ServeArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let config = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let server = match start(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        wait_for_signal().await;
        tracing::info!("shutting down");
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
