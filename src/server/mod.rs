//! The HTTP and WebSocket server: REST over the embedded store, live queries on `/v1/ws`,
//! `/healthz` and `/metrics`.
//!
//! The source (the embedded store by default, or a replay file) feeds the engine through the
//! [`crate::source::pump`]; the engine's messages reach the connections through the [`hub`].
//! The REST data API needs the embedded store or MongoDB; on a replay it answers `501`.
//!
//! # Cluster mode
//! With a [`ClusterConfig`] the server is one process of a timely cluster: the listener comes
//! up first and answers 503 (`starting`) until every process has joined the grid; process 0
//! opens the source and feeds the grid, the others only read snapshots from MongoDB and write
//! there for the REST API (see `open_reader`). The engine routes each subscription's messages
//! to its client's process. A lost connection between processes fails the grid's workers,
//! which fails the server like any grid failure.
//!
//! A server runs until its [`RunningServer::shutdown`] (or
//! SIGTERM/Ctrl-C under `livegrid serve`): it then stops accepting, closes every WebSocket
//! with a reason, and lets the engine drain.

pub mod api_error;
pub mod hub;
pub mod listener;
pub mod playground;
pub mod query_limits;
pub mod rest;
pub mod session;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use livegrid_engine::{ClusterConfig, Engine, EngineConfig, GridShape, SnapshotSource};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::auth::{Authenticator, Principal, Rules};
use crate::budget::MemoryBudget;
use crate::health::Health;
use crate::invalidation::{CacheConfig, Invalidator};
use crate::source::mongodb::{
    FullDocument, MongoConfig, MongoSource, MongoWrites, Watch, checkpoint_path, connect_reader,
};
use crate::source::pump::Pump;
use crate::source::replay::ReplaySource;
use crate::source::store::{Durability, Store, StoreConfig, StoreSource};
use crate::source::{Source, SourceStats};
use api_error::ApiError;
use hub::{Hub, HubLimits};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Folder of the embedded store.
    pub data: PathBuf,
    /// The grid's shape.
    pub grid: GridShape,
    /// Messages a connection may have queued before it is closed as too slow.
    pub queue_capacity: usize,
    /// Bytes a connection may have queued before it is closed as too slow.
    pub queue_bytes: usize,
    /// Subscriptions a connection may hold.
    pub max_subscriptions: usize,
    /// WebSocket connections one client address may hold at once.
    pub max_connections_per_address: usize,
    /// Messages a WebSocket connection may send per second (bursts of as many are allowed).
    pub max_messages_per_second: u32,
    /// Values one `$in`, `$nin` or `$all` of a subscription's filter may list.
    pub max_in_values: usize,
    /// The end of a sorted window (`skip + limit`) a subscription may ask for.
    pub max_window: u64,
    /// Levels of nesting a subscription's filter may have (at most the matcher's 100).
    pub max_filter_depth: usize,
    /// Bytes of one regular expression pattern in a filter.
    pub max_regex_bytes: usize,
    /// Bytes the compiled regular expressions of one filter may hold (at most the matcher's
    /// 4 MiB).
    pub max_regex_memory: usize,
    /// Largest client message, in bytes.
    pub max_message_bytes: usize,
    /// Interval between WebSocket pings; a peer silent for a whole interval after one is
    /// dropped.
    pub heartbeat: Duration,
    /// Recent writes kept to catch subscriptions up.
    pub retention: usize,
    /// Bytes of recent writes kept to catch subscriptions up.
    pub retention_bytes: usize,
    /// How long the subscriptions of a dropped connection wait to be resumed.
    pub resume_grace: Duration,
    /// Messages kept per subscription for resuming.
    pub resume_buffer: usize,
    /// Bytes of messages kept per subscription for resuming.
    pub resume_buffer_bytes: usize,
    /// When store commits reach the disk.
    pub durability: Durability,
    /// Connections open at once (HTTP and WebSocket).
    pub max_connections: usize,
    /// Time for a request's headers to arrive.
    pub header_timeout: Duration,
    /// Largest REST request body, in bytes.
    pub max_body_bytes: usize,
    /// How REST reads are cached and invalidated (see [`crate::invalidation`]).
    pub cache: CacheConfig,
    /// Authentication and access rules (see [`crate::auth`]).
    pub auth: AuthConfig,
    /// A PEM certificate chain and private key: serve HTTPS and WSS only.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Memory all subscriptions together may hold, in bytes.
    pub subscription_memory: usize,
    /// Memory one subscription may hold, in bytes.
    pub max_subscription_bytes: usize,
    /// Documents a sorted window keeps beyond its visible end.
    pub window_slack: usize,
    /// Write requests waiting for the store's committer at most.
    pub write_queue: usize,
    /// How long a write may wait for room in that queue before it gets 503 with Retry-After.
    pub write_deadline: Duration,
    /// Bytes of the embedded store's pages kept in memory.
    pub store_cache_bytes: usize,
    /// Where change events come from.
    pub source: SourceChoice,
    /// This process's place in a cluster (`--hostfile`, `--process`); `None`: one process.
    pub cluster: Option<ClusterConfig>,
}

/// Authentication settings: keys for bearer tokens and the access rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthConfig {
    /// The HS256 secret.
    pub secret: Option<String>,
    /// An RS256 or ES256 public key, PEM.
    pub public_key_pem: Option<String>,
    /// Who may read and write which namespaces (`None`: everyone everything, without
    /// authentication).
    pub rules: Option<Rules>,
}

/// The source `serve` runs on.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum SourceChoice {
    /// The embedded store in `data`, written through the REST API (the default).
    #[default]
    Store,
    /// A recorded change stream, replayed once from the start; the REST data API is off.
    Replay {
        /// The change-stream file.
        path: PathBuf,
        /// Events per second at most (`None`: as fast as the engine takes them).
        rate: Option<f64>,
    },
    /// A MongoDB deployment's change stream; the REST data API is off.
    Mongo {
        /// The connection string.
        uri: String,
        /// Databases (`db`) and collections (`db.coll`) to watch; empty: all.
        watch: Vec<String>,
        /// Skip undecodable change events instead of stopping.
        skip_undecodable: bool,
        /// Where update events' documents come from.
        full_document: FullDocument,
    },
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data: PathBuf::from("data"),
            grid: GridShape { query_partitions: 1, write_partitions: 1 },
            queue_capacity: 4096,
            queue_bytes: 64 << 20,
            max_subscriptions: 1000,
            max_connections_per_address: 1000,
            max_messages_per_second: 1000,
            max_in_values: 10_000,
            max_window: 10_000,
            max_filter_depth: livegrid_matcher::MAX_NESTING_DEPTH,
            max_regex_bytes: 8192,
            max_regex_memory: 1 << 20,
            max_message_bytes: 1 << 20,
            heartbeat: session::DEFAULT_HEARTBEAT,
            retention: 100_000,
            retention_bytes: livegrid_engine::DEFAULT_RETENTION_BYTES,
            resume_grace: Duration::from_secs(60),
            resume_buffer: 128,
            resume_buffer_bytes: 1 << 20,
            durability: Durability::default(),
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            max_body_bytes: 20 << 20,
            cache: CacheConfig::default(),
            auth: AuthConfig::default(),
            tls: None,
            subscription_memory: 1 << 30,
            max_subscription_bytes: 16 << 20,
            window_slack: 16,
            write_queue: 4096,
            write_deadline: Duration::from_secs(5),
            store_cache_bytes: crate::source::store::DEFAULT_CACHE_BYTES,
            source: SourceChoice::Store,
            cluster: None,
        }
    }
}

impl ServerConfig {
    /// The limits on the queries clients send.
    pub fn query_limits(&self) -> query_limits::QueryLimits {
        query_limits::QueryLimits {
            max_in_values: self.max_in_values,
            max_filter_depth: self.max_filter_depth,
            max_regex_bytes: self.max_regex_bytes,
            max_regex_memory: self.max_regex_memory,
            max_window: self.max_window,
            max_subscription_bytes: self.max_subscription_bytes,
            window_slack: self.window_slack,
        }
    }

    /// Checks that every setting is usable, naming the first that is not.
    pub fn validate(&self) -> Result<(), String> {
        let range = |name: &str, value: u128, min: u128, max: u128| {
            if value < min || value > max {
                Err(format!("{name} must be between {min} and {max}, found {value}"))
            } else {
                Ok(())
            }
        };
        range("queue_capacity", self.queue_capacity as u128, 1, 1 << 20)?;
        range("max_subscriptions", self.max_subscriptions as u128, 1, 1 << 20)?;
        range("max_connections_per_address", self.max_connections_per_address as u128, 1, 1 << 20)?;
        range("max_messages_per_second", u128::from(self.max_messages_per_second), 1, 1 << 24)?;
        range("max_in_values", self.max_in_values as u128, 1, 1 << 24)?;
        range("max_window", u128::from(self.max_window), 1, 1 << 24)?;
        range("max_filter_depth", self.max_filter_depth as u128, 1, livegrid_matcher::MAX_NESTING_DEPTH as u128)?;
        range("max_regex_bytes", self.max_regex_bytes as u128, 1, 1 << 20)?;
        range(
            "max_regex_memory",
            self.max_regex_memory as u128,
            1 << 10,
            livegrid_matcher::QUERY_REGEX_BUDGET as u128,
        )?;
        range("max_message_bytes", self.max_message_bytes as u128, 64, 64 << 20)?;
        range("heartbeat (ms)", self.heartbeat.as_millis(), 10, 3_600_000)?;
        range("retention", self.retention as u128, 1, 100_000_000)?;
        range("retention_bytes", self.retention_bytes as u128, 1 << 20, 1 << 40)?;
        range("resume_grace_seconds", self.resume_grace.as_secs() as u128, 0, 86_400)?;
        range("resume_buffer", self.resume_buffer as u128, 0, 1 << 20)?;
        range("resume_buffer_bytes", self.resume_buffer_bytes as u128, 0, 1 << 30)?;
        range("max_connections", self.max_connections as u128, 1, 1 << 20)?;
        range("header_timeout (ms)", self.header_timeout.as_millis(), 10, 3_600_000)?;
        range("max_body_bytes", self.max_body_bytes as u128, 1024, 1 << 30)?;
        self.cache.validate()?;
        if (self.auth.secret.is_some() || self.auth.public_key_pem.is_some()) && self.auth.rules.is_none() {
            return Err("authentication needs a rules file (--rules): with it, what no rule allows is denied".into());
        }
        if self.auth.secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err("the auth secret must be at least 32 bytes (HS256 keys shorter than the hash are weak)".into());
        }
        range("subscription_memory", self.subscription_memory as u128, 1 << 20, 1 << 44)?;
        range("max_subscription_bytes", self.max_subscription_bytes as u128, 4096, 1 << 40)?;
        range("window_slack", self.window_slack as u128, 0, 1 << 20)?;
        range("queue_bytes", self.queue_bytes as u128, self.max_subscription_bytes as u128, 1 << 40)?;
        if self.resume_buffer >= self.queue_capacity {
            return Err(format!(
                "resume_buffer ({}) must be smaller than queue_capacity ({}): a resume must fit the queue",
                self.resume_buffer, self.queue_capacity
            ));
        }
        range("write_queue", self.write_queue as u128, 1, 1 << 20)?;
        range("write_deadline (ms)", self.write_deadline.as_millis(), 1, 3_600_000)?;
        range("store_cache_bytes", self.store_cache_bytes as u128, 1 << 20, 1 << 40)?;
        range("grid workers", self.grid.workers() as u128, 1, 1024)?;
        if let Some(cluster) = &self.cluster {
            if !matches!(self.source, SourceChoice::Mongo { .. }) {
                return Err("cluster mode (hostfile) needs the MongoDB source (mongodb): the embedded store is \
                            single-process, and a recorded stream runs on a cluster with `livegrid replay --hostfile`"
                    .into());
            }
            let processes = cluster.addresses.len();
            if !self.grid.workers().is_multiple_of(processes) {
                return Err(format!(
                    "the grid {} has {} workers, which cannot be split evenly over the hostfile's {processes} processes",
                    self.grid,
                    self.grid.workers()
                ));
            }
        }
        if let SourceChoice::Mongo { watch, .. } = &self.source
            && let Some(bad) = watch.iter().find(|w| w.is_empty() || w.starts_with('.') || w.ends_with('.'))
        {
            return Err(format!("watch entries are `db` or `db.coll`, found {bad:?}"));
        }
        if let SourceChoice::Replay { rate: Some(rate), .. } = &self.source
            && !ReplaySource::valid_rate(*rate)
        {
            return Err(format!("replay_rate must be a positive number of events per second, found {rate}"));
        }
        Ok(())
    }

    /// The largest frame read before the connection is closed with 1009: frames between
    /// `max_message_bytes` and this get a `message_too_large` error and the connection stays.
    pub fn frame_limit(&self) -> usize {
        self.max_message_bytes.saturating_mul(4).saturating_add(64 * 1024)
    }
}

/// Bytes a WebSocket reads at once. tungstenite zeroes this much before every read (128 KiB by
/// default, which cost a fifth of the server's CPU with a thousand connections); client
/// messages are small, and larger ones are read in several pieces.
const WS_READ_BUFFER: usize = 8 * 1024;

/// How long a process of a cluster that is shutting down waits for the others to stop too.
const CLUSTER_STOP_WAIT: Duration = Duration::from_secs(5);

/// Commit batches of the store waiting for the pump at most.
const STORE_SOURCE_QUEUE: usize = 64;

/// What every request and session shares.
#[derive(Clone)]
pub struct AppState {
    /// The embedded store, when it is the source.
    store: Option<Arc<Store>>,
    /// MongoDB, when it is the source (the REST data API writes there).
    mongo: Option<Arc<MongoWrites>>,
    engine: Arc<Engine>,
    hub: Arc<Hub>,
    /// Watches cacheable reads and invalidates their copies.
    cache: Arc<Invalidator>,
    /// Checks bearer tokens (`None`: no authentication, everyone is anonymous).
    auth: Option<Arc<Authenticator>>,
    /// Who may read and write what.
    rules: Arc<Rules>,
    health: Arc<Health>,
    config: Arc<ServerConfig>,
    next_connection: Arc<AtomicU64>,
    /// Open WebSocket connections per client address.
    per_address: Arc<dashmap::DashMap<std::net::IpAddr, usize>>,
    shutdown: watch::Receiver<bool>,
    /// The source's name and what its pump reports.
    source: (&'static str, Arc<SourceStats>),
}

impl AppState {
    /// `filter` as `principal` may see it: with authentication, restricted by object ACLs
    /// (see [`crate::auth::acl`]).
    pub(crate) fn visible(&self, filter: &bson::Document, principal: &Principal) -> bson::Document {
        match self.auth {
            Some(_) => crate::auth::acl::restrict(filter, principal),
            None => filter.clone(),
        }
    }
}

/// A server that is listening.
pub struct RunningServer {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    serving: tokio::task::JoinHandle<()>,
    store: Option<Arc<Store>>,
    engine: Arc<Engine>,
    health: Arc<Health>,
    hub_thread: Option<std::thread::JoinHandle<()>>,
    pump: Option<Pump>,
    /// Part of a cluster: the grid stops only once every process has stopped.
    clustered: bool,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is not usable.
    #[error("bad configuration: {0}")]
    Config(String),
    /// The store could not open.
    #[error(transparent)]
    Store(#[from] crate::source::store::StoreError),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] livegrid_engine::EngineError),
    /// The source could not open.
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    /// The address could not be bound.
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
}

fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (tests); then this one only renders.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Opens the store, starts the engine and begins listening.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    config.validate().map_err(ServerError::Config)?;
    let metrics = prometheus();
    let health = Arc::new(Health::new());
    // A cluster's grid starts once every process has joined: until then `/healthz` (and every
    // other request) answers 503, so that a load balancer sends no client here yet. One
    // process listens once it is ready.
    let mut bound = None;
    let mut starting = None;
    if let Some(cluster) = &config.cluster {
        let (listener, addr, limits) = bind(&config).await?;
        let (stop, until) = watch::channel(false);
        let app = starting_app(cluster.process, cluster.addresses.len());
        tokio::spawn(listener::serve(listener.clone(), app, limits.clone(), until));
        tracing::info!(%addr, process = cluster.process, processes = cluster.addresses.len(), "waiting for every process of the cluster to join");
        bound = Some((listener, addr, limits));
        starting = Some(stop);
    }
    // One process feeds the grid: the source is read once per deployment. The others read
    // initial results from MongoDB themselves and write there for the REST data API.
    let feeds = config.cluster.as_ref().is_none_or(|cluster| cluster.process == 0);
    let (source, snapshots, store, mongo) = if feeds {
        let (source, store, mongo) = open_source(&config, &health).await?;
        let snapshots = source.snapshots();
        (Some(source), snapshots, store, mongo)
    } else {
        let (snapshots, writes) = open_reader(&config).await?;
        (None, snapshots, None, Some(writes))
    };
    let engine_config = EngineConfig {
        shape: config.grid,
        cluster: config.cluster.clone(),
        retention: config.retention,
        retention_bytes: config.retention_bytes,
        slack: config.window_slack,
        ..Default::default()
    };
    // In a cluster this waits until every process has joined.
    let engine = tokio::task::spawn_blocking(move || Engine::start(engine_config, snapshots))
        .await
        .map_err(|e| ServerError::Config(format!("starting the engine: {e}")))??;
    let engine = Arc::new(engine);
    let (source_name, pump) = match source {
        Some(source) => {
            let name = source.name();
            let pump = Pump::start(source, engine.clone(), health.clone())
                .map_err(|e| ServerError::Config(format!("starting the source: {e}")))?;
            (name, Some(pump))
        }
        None => ("mongodb", None),
    };
    let source_stats = pump.as_ref().map_or_else(|| Arc::new(SourceStats::default()), Pump::stats);
    // Client subscriptions and the cache's watches share one memory budget.
    let budget = Arc::new(MemoryBudget::new(config.subscription_memory));
    let cache = Invalidator::start(config.cache.clone(), engine.clone(), budget.clone(), config.window_slack);
    let hub = Arc::new(
        Hub::new(
            HubLimits {
                messages: config.resume_buffer,
                bytes: config.resume_buffer_bytes,
                result_bytes: config.max_subscription_bytes,
            },
            budget,
        )
        .with_invalidator(cache.clone()),
    );
    // Hub shards: one per core, at least two.
    let shards = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
    let hub_thread = {
        let (hub, events, health, engine) = (hub.clone(), engine.messages().clone(), health.clone(), engine.clone());
        let recycler = engine.recycler().clone();
        std::thread::Builder::new()
            .name("livegrid-hub".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    hub.run(
                        events,
                        &recycler,
                        shards,
                        |reason| health.fail(format!("engine: {reason}")),
                        |key| {
                            let _ = engine.unregister(key);
                        },
                    )
                }));
                if ran.is_err() {
                    health.fail("the hub thread panicked: deltas no longer reach clients");
                }
            })
            .map_err(|e| ServerError::Config(format!("starting the hub: {e}")))?
    };
    let (stop, shutdown) = watch::channel(false);
    spawn_expiry(hub.clone(), cache.clone(), engine.clone(), config.resume_grace, shutdown.clone());
    {
        // On failure: every subscription ends (sessions tell their clients why), and every
        // cached copy is invalidated.
        let (hub, cache, engine, health, mut until) =
            (hub.clone(), cache.clone(), engine.clone(), health.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = health.failed() => {}
                _ = until.changed() => return,
            };
            let _ = tokio::task::spawn_blocking(move || {
                for key in hub.fail_all().into_iter().chain(cache.fail_all()) {
                    let _ = engine.unregister(key);
                }
            })
            .await;
        });
    }
    let auth = Authenticator::new(config.auth.secret.as_deref(), config.auth.public_key_pem.as_deref())
        .map_err(|e| ServerError::Config(e.to_string()))?
        .map(Arc::new);
    if auth.is_none() && !config.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.listen, "listening beyond loopback without authentication: anyone who can connect may read and write everything");
    }
    let state = AppState {
        auth,
        rules: Arc::new(config.auth.rules.clone().unwrap_or_else(Rules::allow_all)),
        store: store.clone(),
        mongo,
        engine: engine.clone(),
        hub,
        cache,
        health: health.clone(),
        config: Arc::new(config.clone()),
        next_connection: Arc::new(AtomicU64::new(1)),
        per_address: Arc::new(dashmap::DashMap::new()),
        shutdown: shutdown.clone(),
        source: (source_name, source_stats),
    };
    let app = Router::new()
        .route("/", get(playground::page))
        .route("/playground/{file}", get(playground::playground_file))
        .route("/client/{file}", get(playground::client_file))
        .route("/healthz", get(healthz))
        .route("/metrics", get(move || async move { metrics.render() }))
        .route("/v1/ws", get(websocket))
        .route("/v1/cache-sketch", get(cache_sketch))
        .route("/v1/db/{db}/{coll}", post(rest::insert).get(rest::query))
        .route("/v1/db/{db}/{coll}/_bulk", post(rest::bulk))
        .route("/v1/db/{db}/{coll}/_aggregate", post(rest::aggregate))
        .route("/v1/db/{db}/{coll}/{id}", get(rest::get).put(rest::replace).patch(rest::update).delete(rest::delete))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state);
    let (listener, addr, limits) = match bound {
        Some(bound) => bound,
        None => bind(&config).await?,
    };
    let scheme = if limits.tls.is_some() { "https" } else { "http" };
    if let Some(starting) = starting {
        let _ = starting.send(true);
    }
    let serving = tokio::spawn(listener::serve(listener, app, limits, shutdown));
    let process = config.cluster.as_ref().map(|c| format!("{} of {}", c.process, c.addresses.len()));
    tracing::info!(%addr, scheme, grid = %config.grid, source = source_name, feeds, process, data = %config.data.display(), durability = ?config.durability, "livegrid listening");
    let clustered = config.cluster.is_some();
    Ok(RunningServer { addr, stop, serving, store, engine, health, hub_thread: Some(hub_thread), pump, clustered })
}

/// Binds the listening address, with TLS when configured.
async fn bind(
    config: &ServerConfig,
) -> Result<(Arc<tokio::net::TcpListener>, SocketAddr, listener::ListenLimits), ServerError> {
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(|e| ServerError::Listen(config.listen, e))?;
    let addr = listener.local_addr().map_err(|e| ServerError::Listen(config.listen, e))?;
    let tls = match &config.tls {
        Some((cert, key)) => Some(listener::tls_acceptor(cert, key).map_err(|e| ServerError::Config(e.to_string()))?),
        None => None,
    };
    let limits =
        listener::ListenLimits { max_connections: config.max_connections, header_timeout: config.header_timeout, tls };
    Ok((Arc::new(listener), addr, limits))
}

/// The app of a cluster process waiting for the others: 503 for everything, saying why.
fn starting_app(process: usize, processes: usize) -> Router {
    let reason = format!(
        "waiting for the cluster: this is process {process} of {processes}; the grid starts once every process has joined"
    );
    let healthz = {
        let reason = reason.clone();
        move || async move {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"status": "starting", "reason": reason})))
        }
    };
    // A plain answer: an ApiError would log every request as a failure meanwhile.
    let refused = move || async move {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"code": "starting", "message": reason})))
    };
    Router::new().route("/healthz", get(healthz)).fallback(refused)
}

/// MongoDB's snapshot reads and writes, without its change stream: for the processes of a
/// cluster that do not feed the grid.
async fn open_reader(config: &ServerConfig) -> Result<(Arc<dyn SnapshotSource>, Arc<MongoWrites>), ServerError> {
    let SourceChoice::Mongo { uri, .. } = &config.source else {
        return Err(ServerError::Config("cluster mode needs the MongoDB source".into()));
    };
    let uri = uri.clone();
    let (snapshots, writes) = tokio::task::spawn_blocking(move || connect_reader(&uri))
        .await
        .map_err(|e| ServerError::Config(format!("connecting to mongodb: {e}")))?
        .map_err(|e| ServerError::Config(e.to_string()))?;
    Ok((snapshots, writes))
}

/// Opens the configured source (and the embedded store, when it is the source).
async fn open_source(
    config: &ServerConfig,
    health: &Arc<Health>,
) -> Result<(Box<dyn Source>, Option<Arc<Store>>, Option<Arc<MongoWrites>>), ServerError> {
    match &config.source {
        SourceChoice::Store => {
            let store_config = StoreConfig {
                durability: config.durability,
                queue: config.write_queue,
                max_group: 1024,
                queue_deadline: config.write_deadline,
                health: health.clone(),
                cache_bytes: config.store_cache_bytes,
            };
            let data = config.data.clone();
            let store = tokio::task::spawn_blocking(move || Store::open_with(&data, store_config))
                .await
                .map_err(|e| ServerError::Config(format!("opening the store: {e}")))??;
            let store = Arc::new(store);
            Ok((Box::new(StoreSource::new(store.clone(), STORE_SOURCE_QUEUE)), Some(store), None))
        }
        SourceChoice::Replay { path, rate } => {
            let (path, rate) = (path.clone(), *rate);
            let source = tokio::task::spawn_blocking(move || ReplaySource::open(&path))
                .await
                .map_err(|e| ServerError::Config(format!("opening the replay file: {e}")))??;
            let source = match rate {
                Some(rate) => source.with_rate(rate),
                None => source,
            };
            Ok((Box::new(source), None, None))
        }
        SourceChoice::Mongo { uri, watch, skip_undecodable, full_document } => {
            let config = MongoConfig {
                uri: uri.clone(),
                watch: if watch.is_empty() { Watch::Deployment } else { Watch::Only(watch.clone()) },
                checkpoint: checkpoint_path(&config.data),
                skip_undecodable: *skip_undecodable,
                full_document: *full_document,
            };
            let data = config.checkpoint.parent().map(Path::to_path_buf);
            // Connecting and opening the stream wait on the network: not on the runtime.
            let source = tokio::task::spawn_blocking(move || {
                if let Some(data) = data {
                    std::fs::create_dir_all(&data)
                        .map_err(|e| ServerError::Config(format!("creating {}: {e}", data.display())))?;
                }
                MongoSource::open(config).map_err(|e| ServerError::Config(e.to_string()))
            })
            .await
            .map_err(|e| ServerError::Config(format!("opening the mongodb source: {e}")))??;
            let writes = source.writes();
            Ok((Box::new(source), None, Some(writes)))
        }
    }
}

/// Ends detached subscriptions nobody resumed within the grace window, and cache watches whose
/// copies have all expired.
fn spawn_expiry(
    hub: Arc<Hub>,
    cache: Arc<Invalidator>,
    engine: Arc<Engine>,
    grace: Duration,
    mut until: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500).min(grace.max(Duration::from_millis(10))));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // A scan of every route and engine calls: not on the runtime's threads.
                    let (hub, cache, engine) = (hub.clone(), cache.clone(), engine.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        for key in hub.expire(grace) {
                            let _ = engine.unregister(key);
                            metrics::gauge!("livegrid_subscriptions").decrement(1.0);
                        }
                        for key in cache.tick() {
                            let _ = engine.unregister(key);
                        }
                    })
                    .await;
                }
                _ = until.changed() => break,
            }
        }
    });
}

impl RunningServer {
    /// The server's health (tests and the command watch it).
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The engine (tests inject failures through it).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The store.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Stops accepting, closes every connection with a reason, drains the store into the
    /// engine, and joins the store's, the engine's and the hub's threads (after a failure,
    /// the grid's threads may be stuck waiting for a dead worker: they are left behind).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Err(e) = (&mut self.serving).await {
            tracing::warn!(error = %e, "server task ended abnormally");
        }
        let (store, engine, hub_thread, pump) =
            (self.store.clone(), self.engine.clone(), self.hub_thread.take(), self.pump.take());
        let joined = tokio::task::spawn_blocking(move || {
            match (store, pump) {
                // Queued writes commit and reach the engine before it stops: the store's
                // source ends once the store is closed and drained.
                (Some(store), Some(pump)) => {
                    store.close();
                    pump.join();
                }
                (None, Some(pump)) => pump.stop(),
                (Some(store), None) => store.close(),
                (None, None) => {}
            }
            engine.close();
            if let Some(thread) = hub_thread
                && !engine.failed()
            {
                let _ = thread.join();
            }
        });
        // A cluster's grid drains only once every process has closed its input: a process
        // stopped alone waits for the others a while, then leaves without them.
        let wait = if self.clustered { CLUSTER_STOP_WAIT } else { Duration::MAX };
        match tokio::time::timeout(wait, joined).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "shutdown did not complete"),
            Err(_) => tracing::warn!(
                waited = ?wait,
                "the grid still waits for other processes of the cluster; stopping without them (stop every process of a cluster together)"
            ),
        }
    }
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let position = state.engine.processed();
    let (name, stats) = &state.source;
    let source = serde_json::json!({
        "name": name,
        "events": stats.events(),
        "events_per_sec": stats.events_per_sec(),
        "lag_seconds": stats.lag_seconds(),
    });
    let cache = serde_json::json!({"watched": state.cache.watched()});
    let cluster = state.config.cluster.as_ref().map(|cluster| {
        serde_json::json!({
            "process": cluster.process, "processes": cluster.addresses.len(), "feeds": state.engine.feeds(),
            "bytes_sent": state.engine.cluster_bytes_sent(),
        })
    });
    match state.health.failure() {
        None => (
            StatusCode::OK,
            axum::Json(serde_json::json!({
                "status": "ok", "processed": position, "subscriptions": state.hub.len(), "source": source,
                "cache": cache, "cluster": cluster,
            })),
        ),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(
                serde_json::json!({"status": "failed", "reason": reason, "processed": position, "source": source}),
            ),
        ),
    }
}

/// `GET /v1/cache-sketch`: the URLs that may be stale in some cache, as a Bloom filter (see
/// [`crate::invalidation::sketch`]). Never cached itself.
async fn cache_sketch(State(state): State<AppState>) -> impl IntoResponse {
    let sketch = state.cache.sketch();
    let position = state.engine.processed();
    let body = serde_json::json!({
        "m": sketch.m, "k": sketch.k, "b": sketch.b, "entries": sketch.entries,
        "hash": "fnv1a64-double", "position": position,
    });
    ([(axum::http::header::CACHE_CONTROL, "no-store")], axum::Json(body))
}

async fn websocket(
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    State(state): State<AppState>,
    permit: Option<axum::Extension<listener::ConnectionPermit>>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<SocketAddr>>>,
) -> axum::response::Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return ApiError::new(rejection.status(), "bad_upgrade", rejection.body_text()).into_response();
        }
    };
    // A token at connect: the Authorization header, or `?token=` (browsers cannot set headers
    // on a WebSocket).
    let from_query = uri
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned()));
    let principal = match authenticate(&state, &headers, from_query.as_deref()) {
        Ok(principal) => principal,
        Err(e) => return e.into_response(),
    };
    // Messages over `max_message_bytes` get a `message_too_large` error; frames far beyond it
    // end the connection with 1009 before they are buffered.
    let limit = state.config.frame_limit();
    let permit = permit.map(|p| p.0);
    // At most so many WebSockets per client address.
    let address = peer.map(|p| p.0.0.ip());
    let held = match address {
        Some(ip) => match AddressSlot::take(&state.per_address, ip, state.config.max_connections_per_address) {
            Some(slot) => Some(slot),
            None => {
                metrics::counter!("livegrid_connections_refused", "reason" => "per_address").increment(1);
                let message = format!(
                    "at most {} WebSocket connections per client address",
                    state.config.max_connections_per_address
                );
                return ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_connections", message).into_response();
            }
        },
        None => None,
    };
    ws.max_message_size(limit).max_frame_size(limit).read_buffer_size(WS_READ_BUFFER).on_upgrade(
        move |socket| async move {
            let _held = held;
            session::run(socket, state, permit, principal).await
        },
    )
}

/// The principal of a request: from its `Authorization: Bearer` header, or `token` (a query
/// parameter), or anonymous. A token that proves nothing is refused (401), never taken as
/// anonymous.
pub(crate) fn authenticate(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    token: Option<&str>,
) -> Result<Principal, ApiError> {
    let header = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = match (header, token) {
        (Some(header), _) => Some(crate::auth::bearer(header).ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "expected Authorization: Bearer <token>")
        })?),
        (None, token) => token,
    };
    match (token, &state.auth) {
        (None, _) => Ok(Principal::anonymous()),
        (Some(_), None) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server does not use authentication; send no token",
        )),
        (Some(token), Some(auth)) => {
            auth.verify(token).map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))
        }
    }
}

/// One WebSocket's place under its address's cap; given back when dropped.
struct AddressSlot {
    map: Arc<dashmap::DashMap<std::net::IpAddr, usize>>,
    ip: std::net::IpAddr,
}

impl AddressSlot {
    /// A place for `ip` if it holds fewer than `max`.
    fn take(map: &Arc<dashmap::DashMap<std::net::IpAddr, usize>>, ip: std::net::IpAddr, max: usize) -> Option<Self> {
        let mut count = map.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot { map: map.clone(), ip })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        // The entry goes when its last connection does, so the map only holds live addresses.
        self.map.remove_if_mut(&self.ip, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}
