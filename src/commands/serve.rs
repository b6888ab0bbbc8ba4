//! `livegrid serve`: the HTTP/WebSocket server over the embedded store (or, with `--replay`,
//! over a recorded change stream, or with `--mongodb` over a MongoDB deployment; with
//! `--hostfile` and `--process` as one process of a cluster, see [`crate::server`]).
//!
//! Configuration, strongest first: flags, environment variables (`LIVEGRID_LISTEN`,
//! `LIVEGRID_DATA`, `LIVEGRID_GRID`, ...), the TOML file given with `--config`, defaults.
//! SIGTERM or Ctrl-C stops it gracefully: no new connections, every WebSocket closed with a
//! reason, the grid drained. When the server fails (see [`crate::health`]) it exits with
//! status 1 under `--exit-on-fatal` (the default), after committing and flushing the writes it
//! acknowledged. In debug builds (the tests'), `LIVEGRID_TEST_FAULT=worker-panic` makes a grid
//! worker panic half a second after start, so tests can exercise that path on the real binary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::Rules;
use crate::cli::ServeArgs;
use crate::invalidation::CacheConfig;
use crate::invalidation::ttl::MaxAge;
use crate::server::{AuthConfig, ServerConfig, SourceChoice, start};

/// The TOML configuration file; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<String>,
    data: Option<String>,
    grid: Option<String>,
    queue_capacity: Option<usize>,
    queue_bytes: Option<usize>,
    max_subscriptions: Option<usize>,
    max_message_bytes: Option<usize>,
    heartbeat_seconds: Option<u64>,
    retention: Option<usize>,
    retention_bytes: Option<usize>,
    resume_grace_seconds: Option<u64>,
    resume_buffer: Option<usize>,
    durability: Option<String>,
    resume_buffer_bytes: Option<usize>,
    max_connections: Option<usize>,
    header_timeout_seconds: Option<u64>,
    max_body_bytes: Option<usize>,
    cache_max_age: Option<AgeSetting>,
    cache_namespaces: Option<BTreeMap<String, AgeSetting>>,
    purge: Option<Vec<String>>,
    cache_entries: Option<usize>,
    purge_queue: Option<usize>,
    sketch_bits: Option<u64>,
    sketch_hashes: Option<u32>,
    auth_secret: Option<String>,
    auth_public_key: Option<PathBuf>,
    rules: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_connections_per_address: Option<usize>,
    max_messages_per_second: Option<u32>,
    max_in_values: Option<usize>,
    max_window: Option<u64>,
    max_filter_depth: Option<usize>,
    max_regex_bytes: Option<usize>,
    max_regex_memory: Option<usize>,
    subscription_memory: Option<usize>,
    max_subscription_bytes: Option<usize>,
    write_queue: Option<usize>,
    write_deadline_ms: Option<u64>,
    store_cache_mib: Option<usize>,
    exit_on_fatal: Option<bool>,
    replay: Option<PathBuf>,
    replay_rate: Option<f64>,
    mongodb: Option<String>,
    watch: Option<Vec<String>>,
    skip_undecodable: Option<bool>,
    full_document: Option<crate::source::mongodb::FullDocument>,
    hostfile: Option<PathBuf>,
    process: Option<usize>,
}

/// A max-age in the configuration file: seconds, or text (`"auto"`, `"auto:5-600"`, `"60"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum AgeSetting {
    Seconds(u32),
    Text(String),
}

impl AgeSetting {
    fn parse(&self) -> Result<MaxAge, String> {
        match self {
            AgeSetting::Seconds(n) => format!("{n}").parse(),
            AgeSetting::Text(text) => text.parse(),
        }
    }
}

/// The cache settings: flags over file over defaults.
fn cache_config(args: &ServeArgs, file: &FileConfig) -> Result<CacheConfig, String> {
    let defaults = CacheConfig::default();
    let max_age = match (&args.cache_max_age, &file.cache_max_age) {
        (Some(age), _) => *age,
        (None, Some(setting)) => setting.parse()?,
        (None, None) => defaults.max_age,
    };
    let mut namespaces = BTreeMap::new();
    for (ns, setting) in file.cache_namespaces.iter().flatten() {
        namespaces.insert(ns.clone(), setting.parse().map_err(|e| format!("cache_namespaces.{ns}: {e}"))?);
    }
    for item in &args.cache_namespaces {
        let (ns, age) =
            item.split_once('=').ok_or_else(|| format!("--cache-namespace takes NS=AGE, found {item:?}"))?;
        namespaces.insert(ns.trim().to_string(), age.parse().map_err(|e| format!("--cache-namespace {ns}: {e}"))?);
    }
    Ok(CacheConfig {
        max_age,
        namespaces,
        purge: if args.purge.is_empty() { file.purge.clone().unwrap_or_default() } else { args.purge.clone() },
        entries: args.cache_entries.or(file.cache_entries).unwrap_or(defaults.entries),
        purge_queue: args.purge_queue.or(file.purge_queue).unwrap_or(defaults.purge_queue),
        sketch_bits: args.sketch_bits.or(file.sketch_bits).unwrap_or(defaults.sketch_bits),
        sketch_hashes: args.sketch_hashes.or(file.sketch_hashes).unwrap_or(defaults.sketch_hashes),
    })
}

/// The authentication settings: flags over file; key and rules files are read here.
fn auth_config(args: &ServeArgs, file: &FileConfig) -> Result<AuthConfig, String> {
    let read = |path: &PathBuf| std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
    let public_key_pem = args.auth_public_key.as_ref().or(file.auth_public_key.as_ref()).map(read).transpose()?;
    let rules = match args.rules.as_ref().or(file.rules.as_ref()) {
        Some(path) => Some(Rules::parse(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))?),
        None => None,
    };
    Ok(AuthConfig { secret: args.auth_secret.clone().or(file.auth_secret.clone()), public_key_pem, rules })
}

/// What `serve` runs with: the server's configuration and what the command itself does.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The server's configuration.
    pub server: ServerConfig,
    /// Whether to exit non-zero when the server fails.
    pub exit_on_fatal: bool,
}

/// Merges flags, environment, file and defaults, and validates the result.
pub fn config(args: &ServeArgs) -> Result<ServeConfig, String> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let cache = cache_config(args, &file)?;
    let auth = auth_config(args, &file)?;
    let defaults = ServerConfig::default();
    let listen = match args.listen.clone().or(file.listen) {
        Some(l) => resolve_listen(&l)?,
        None => defaults.listen,
    };
    let grid = match args.grid.clone().or(file.grid) {
        Some(g) => g.parse()?,
        None => defaults.grid,
    };
    let secs = |flag: Option<u64>, file: Option<u64>, default: Duration| {
        flag.or(file).map(Duration::from_secs).unwrap_or(default)
    };
    let server = ServerConfig {
        listen,
        data: args.data.clone().or(file.data.map(Into::into)).unwrap_or(defaults.data),
        grid,
        queue_capacity: args.queue_capacity.or(file.queue_capacity).unwrap_or(defaults.queue_capacity),
        queue_bytes: args.queue_bytes.or(file.queue_bytes).unwrap_or(defaults.queue_bytes),
        max_subscriptions: args.max_subscriptions.or(file.max_subscriptions).unwrap_or(defaults.max_subscriptions),
        max_connections_per_address: args
            .max_connections_per_address
            .or(file.max_connections_per_address)
            .unwrap_or(defaults.max_connections_per_address),
        max_messages_per_second: args
            .max_messages_per_second
            .or(file.max_messages_per_second)
            .unwrap_or(defaults.max_messages_per_second),
        max_in_values: args.max_in_values.or(file.max_in_values).unwrap_or(defaults.max_in_values),
        max_window: args.max_window.or(file.max_window).unwrap_or(defaults.max_window),
        max_filter_depth: args.max_filter_depth.or(file.max_filter_depth).unwrap_or(defaults.max_filter_depth),
        max_regex_bytes: args.max_regex_bytes.or(file.max_regex_bytes).unwrap_or(defaults.max_regex_bytes),
        max_regex_memory: args.max_regex_memory.or(file.max_regex_memory).unwrap_or(defaults.max_regex_memory),
        max_message_bytes: args.max_message_bytes.or(file.max_message_bytes).unwrap_or(defaults.max_message_bytes),
        heartbeat: secs(args.heartbeat_seconds, file.heartbeat_seconds, defaults.heartbeat),
        retention: args.retention.or(file.retention).unwrap_or(defaults.retention),
        retention_bytes: args.retention_bytes.or(file.retention_bytes).unwrap_or(defaults.retention_bytes),
        resume_grace: secs(args.resume_grace_seconds, file.resume_grace_seconds, defaults.resume_grace),
        resume_buffer: args.resume_buffer.or(file.resume_buffer).unwrap_or(defaults.resume_buffer),
        durability: match args.durability.clone().or(file.durability) {
            Some(d) => d.parse()?,
            None => defaults.durability,
        },
        resume_buffer_bytes: args
            .resume_buffer_bytes
            .or(file.resume_buffer_bytes)
            .unwrap_or(defaults.resume_buffer_bytes),
        max_connections: args.max_connections.or(file.max_connections).unwrap_or(defaults.max_connections),
        header_timeout: secs(args.header_timeout_seconds, file.header_timeout_seconds, defaults.header_timeout),
        max_body_bytes: args.max_body_bytes.or(file.max_body_bytes).unwrap_or(defaults.max_body_bytes),
        cache,
        auth,
        tls: match (args.tls_cert.clone().or(file.tls_cert), args.tls_key.clone().or(file.tls_key)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err("TLS needs both a certificate (tls_cert) and its key (tls_key)".into()),
        },
        subscription_memory: args
            .subscription_memory
            .or(file.subscription_memory)
            .unwrap_or(defaults.subscription_memory),
        max_subscription_bytes: args
            .max_subscription_bytes
            .or(file.max_subscription_bytes)
            .unwrap_or(defaults.max_subscription_bytes),
        write_queue: args.write_queue.or(file.write_queue).unwrap_or(defaults.write_queue),
        store_cache_bytes: args
            .store_cache_mib
            .or(file.store_cache_mib)
            .map(|mib| mib.saturating_mul(1 << 20))
            .unwrap_or(defaults.store_cache_bytes),
        write_deadline: args
            .write_deadline_ms
            .or(file.write_deadline_ms)
            .map(Duration::from_millis)
            .unwrap_or(defaults.write_deadline),
        source: match (args.replay.clone().or(file.replay), args.mongodb.clone().or(file.mongodb)) {
            (Some(_), Some(_)) => return Err("choose one source: replay or mongodb".into()),
            (Some(path), None) => SourceChoice::Replay { path, rate: args.replay_rate.or(file.replay_rate) },
            (None, _) if args.replay_rate.or(file.replay_rate).is_some() => {
                return Err("replay_rate needs a replay file".into());
            }
            (None, Some(uri)) => {
                let watch = if args.watch.is_empty() { file.watch.unwrap_or_default() } else { args.watch.clone() };
                let skip_undecodable = args.skip_undecodable.or(file.skip_undecodable).unwrap_or(false);
                let full_document = args.full_document.or(file.full_document).unwrap_or_default();
                SourceChoice::Mongo { uri, watch, skip_undecodable, full_document }
            }
            (None, None) => SourceChoice::Store,
        },
        cluster: match (args.hostfile.clone().or(file.hostfile), args.process.or(file.process)) {
            (Some(hostfile), process) => Some(super::read_hostfile(&hostfile, process.unwrap_or(0))?),
            (None, Some(_)) => return Err("process needs a hostfile (cluster mode)".into()),
            (None, None) => None,
        },
        ..defaults
    };
    server.validate()?;
    Ok(ServeConfig { server, exit_on_fatal: args.exit_on_fatal.or(file.exit_on_fatal).unwrap_or(true) })
}

/// The address to listen on: `host:port` with an IP address or a name (`localhost:8080`),
/// resolved once at startup: the first IPv4 address the name resolves to, else the first.
fn resolve_listen(listen: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = listen.parse() {
        return Ok(addr);
    }
    let addrs: Vec<std::net::SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|e| format!("listen address {listen:?}: {e} (give host:port, e.g. 127.0.0.1:8080 or localhost:8080)"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("listen address {listen:?} resolves to no address"))
}

/// Runs the command.
pub fn run(args: &ServeArgs) -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never in log files or pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(blocking_threads()).build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
    let code = runtime.block_on(async move {
        // A cluster process waits in `start` until every process has joined; a signal
        // meanwhile stops it.
        let started = tokio::select! {
            started = start(config.server) => started,
            _ = wait_for_signal() => {
                tracing::info!("stopped before the cluster was complete");
                return ExitCode::SUCCESS;
            }
        };
        let server = match started {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        #[cfg(debug_assertions)]
        if std::env::var("LIVEGRID_TEST_FAULT").as_deref() == Ok("worker-panic") {
            // Fault injection for the tests of the failure path (tests/cli_serve.rs).
            let engine = server.engine().clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                tracing::warn!("LIVEGRID_TEST_FAULT: making a grid worker panic");
                let _ = engine.inject_worker_panic();
            });
        }
        let health = server.health().clone();
        let failed = async {
            if config.exit_on_fatal { health.failed().await.to_string() } else { std::future::pending().await }
        };
        tokio::select! {
            _ = wait_for_signal() => {
                tracing::info!("shutting down");
                server.shutdown().await;
                ExitCode::SUCCESS
            }
            reason = failed => {
                // Give sessions a moment to send their `unavailable` errors and close frames,
                // and flush what the store acknowledged.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some(store) = server.store().cloned() {
                    let closing = tokio::task::spawn_blocking(move || store.close());
                    let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
                }
                tracing::error!(reason = %reason, "exiting: livegrid failed (--exit-on-fatal)");
                ExitCode::from(1)
            }
        }
    });
    // Blocking tasks may still wait on a cluster that is not there (timely's connection
    // loop, or a grid waiting for processes that did not stop): leave without them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Threads in the runtime's blocking pool, at most: four per core, at least 16.
///
/// The pool runs query compilation, registration (snapshot reads) and the store's write
/// preparation. tokio's default (512) let a burst of subscriptions from a few hundred
/// connections start a thread for nearly every one: on 2 cores, 20,000 subscriptions from 200
/// connections started about 95 threads that went on to run nothing, and left the server
/// 177 MiB larger instead of 108 MiB (the long-lived state scattered over as many allocator
/// heaps). Queued work waits for a thread instead; none of it waits on another task of the
/// pool.
fn blocking_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).max(16)
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn serve_config(args: &[&str]) -> Result<ServeConfig, String> {
        let cli = Cli::try_parse_from(["livegrid", "serve"].iter().chain(args)).map_err(|e| e.to_string())?;
        let Command::Serve(args) = cli.command else { unreachable!() };
        config(&args)
    }

    #[test]
    fn cache_settings_come_from_flags_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("livegrid.toml");
        let file = "cache_max_age = \"auto:5-600\"\npurge = [\"http://127.0.0.1:6081\"]\ncache_entries = 50\n\
                    [cache_namespaces]\n\"app.hot\" = 1\napp = \"auto\"\n";
        std::fs::write(&path, file).unwrap();
        let path = path.to_str().unwrap();
        let cache = serve_config(&["--config", path, "--cache-namespace", "app.cold=600"]).unwrap().server.cache;
        assert_eq!(cache.max_age, MaxAge::Auto { min: 5, max: 600 });
        assert_eq!(cache.purge, vec!["http://127.0.0.1:6081".to_string()]);
        assert_eq!(cache.entries, 50);
        assert_eq!(cache.max_age_for("app.hot"), MaxAge::Fixed(1));
        assert_eq!(cache.max_age_for("app.cold"), MaxAge::Fixed(600));
        assert_eq!(cache.max_age_for("app.other"), MaxAge::Auto { min: 1, max: 3600 });
        assert_eq!(cache.max_age_for("shop.items"), MaxAge::Auto { min: 5, max: 600 });
        let flags = serve_config(&["--config", path, "--cache-max-age", "30", "--purge", "http://a:1,http://b:2"]);
        let cache = flags.unwrap().server.cache;
        assert_eq!((cache.max_age, cache.purge.len()), (MaxAge::Fixed(30), 2));
        for bad in [
            vec!["--cache-max-age", "soon"],
            vec!["--purge", "https://cdn.example"],
            vec!["--cache-namespace", "app.hot"],
            vec!["--sketch-bits", "8"],
        ] {
            assert!(serve_config(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cluster_mode_needs_mongodb_a_good_hostfile_and_an_even_grid() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1:2101\n127.0.0.1:2102\n").unwrap();
        let hosts = hosts.to_str().unwrap();
        let mongo = ["--mongodb", "mongodb://127.0.0.1:27017"];
        let ok = serve_config(&[&mongo[..], &["--hostfile", hosts, "--process", "1", "--grid", "1x2"]].concat());
        let cluster = ok.unwrap().server.cluster.unwrap();
        assert_eq!((cluster.process, cluster.addresses.len()), (1, 2));
        let error = |args: &[&str]| serve_config(args).unwrap_err();
        assert!(error(&["--hostfile", hosts]).contains("needs the MongoDB source"));
        assert!(error(&["--hostfile", hosts, "--replay", "events.jsonl"]).contains("needs the MongoDB source"));
        assert!(error(&[&mongo[..], &["--process", "1"]].concat()).contains("needs a hostfile"));
        assert!(error(&[&mongo[..], &["--hostfile", hosts, "--process", "2"]].concat()).contains("names 2 processes"));
        assert!(error(&[&mongo[..], &["--hostfile", hosts, "--grid", "1x3"]].concat()).contains("split evenly"));
        std::fs::write(dir.path().join("bad"), "127.0.0.1\n").unwrap();
        let bad = dir.path().join("bad");
        assert!(error(&[&mongo[..], &["--hostfile", bad.to_str().unwrap()]].concat()).contains("is not host:port"));
    }
}
