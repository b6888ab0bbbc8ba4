//! The HTTP and WebSocket server: REST over the embedded store, live queries on `/v1/ws`,
//! `/healthz` and `/metrics`.
//!
//! The store feeds every committed write to the engine; the engine's messages reach the
//! connections through the [`hub`]. A server runs until its [`RunningServer::shutdown`] (or
//! SIGTERM/Ctrl-C under `livegrid serve`): it then stops accepting, closes every WebSocket
//! with a reason, and lets the engine drain.

pub mod api_error;
pub mod hub;
pub mod rest;
pub mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use livegrid_engine::{Engine, EngineConfig, GridShape};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::store::Store;
use hub::Hub;

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
    /// Subscriptions a connection may hold.
    pub max_subscriptions: usize,
    /// Largest client message, in bytes.
    pub max_message_bytes: usize,
    /// Interval between WebSocket pings; a peer that misses one pong is dropped.
    pub heartbeat: Duration,
    /// Recent writes kept to catch subscriptions up.
    pub retention: usize,
    /// How long the subscriptions of a dropped connection wait to be resumed.
    pub resume_grace: Duration,
    /// Messages kept per subscription for resuming.
    pub resume_buffer: usize,
    /// When store commits reach the disk.
    pub durability: crate::store::Durability,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data: PathBuf::from("data"),
            grid: GridShape { query_partitions: 1, write_partitions: 1 },
            queue_capacity: 4096,
            max_subscriptions: 1000,
            max_message_bytes: 1 << 20,
            heartbeat: session::DEFAULT_HEARTBEAT,
            retention: 100_000,
            resume_grace: Duration::from_secs(60),
            resume_buffer: 128,
            durability: crate::store::Durability::default(),
        }
    }
}

/// What every request and session shares.
#[derive(Clone)]
pub struct AppState {
    store: Arc<Store>,
    engine: Arc<Engine>,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    next_connection: Arc<AtomicU64>,
    shutdown: watch::Receiver<bool>,
}

/// A server that is listening.
pub struct RunningServer {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
    engine: Arc<Engine>,
    hub_thread: Option<std::thread::JoinHandle<()>>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not open.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] livegrid_engine::EngineError),
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
    let metrics = prometheus();
    let store = Arc::new(Store::open_with(&config.data, config.durability)?);
    let engine = Arc::new(Engine::start(
        EngineConfig { shape: config.grid, retention: config.retention, ..Default::default() },
        store.clone(),
    )?);
    let weak = Arc::downgrade(&engine);
    store.set_listener(move |events| {
        metrics::counter!("livegrid_events_in").increment(events.len() as u64);
        if let Some(engine) = weak.upgrade()
            && let Err(e) = engine.submit(events)
        {
            tracing::error!(error = %e, "engine refused writes");
        }
    });
    let hub = Arc::new(Hub::new(config.resume_buffer));
    let hub_thread = {
        let hub = hub.clone();
        let events = engine.messages().clone();
        std::thread::Builder::new().name("livegrid-hub".into()).spawn(move || hub.run(events)).expect("hub thread")
    };
    let (stop, shutdown) = watch::channel(false);
    {
        // Ends detached subscriptions nobody resumed within the grace window.
        let (hub, engine, grace, mut until) = (hub.clone(), engine.clone(), config.resume_grace, shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500).min(grace.max(Duration::from_millis(10))));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        for key in hub.expire(grace) {
                            let _ = engine.unregister(key);
                            metrics::gauge!("livegrid_subscriptions").decrement(1.0);
                        }
                    }
                    _ = until.changed() => break,
                }
            }
        });
    }
    let state = AppState {
        store,
        engine: engine.clone(),
        hub,
        config: Arc::new(config.clone()),
        next_connection: Arc::new(AtomicU64::new(1)),
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(move || async move { metrics.render() }))
        .route("/v1/ws", get(websocket))
        .route("/v1/db/{db}/{coll}", post(rest::insert).get(rest::query))
        .route("/v1/db/{db}/{coll}/_bulk", post(rest::bulk))
        .route("/v1/db/{db}/{coll}/{id}", get(rest::get).put(rest::replace).patch(rest::update).delete(rest::delete))
        .with_state(state);
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(|e| ServerError::Listen(config.listen, e))?;
    let addr = listener.local_addr().map_err(|e| ServerError::Listen(config.listen, e))?;
    let mut until = shutdown;
    let serving = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = until.wait_for(|stop| *stop).await;
            })
            .await
    });
    tracing::info!(%addr, grid = %config.grid, data = %config.data.display(), "livegrid listening");
    Ok(RunningServer { addr, stop, serving, engine, hub_thread: Some(hub_thread) })
}

impl RunningServer {
    /// Stops accepting, closes every connection with a reason, and waits for the engine.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Err(e) = (&mut self.serving).await {
            tracing::warn!(error = %e, "server task ended abnormally");
        }
        let engine = self.engine;
        let hub_thread = self.hub_thread.take();
        tokio::task::spawn_blocking(move || {
            // Sessions and the store's listener hold the engine until they end.
            let mut engine = engine;
            for _ in 0..200 {
                match Arc::try_unwrap(engine) {
                    Ok(engine) => {
                        engine.shutdown();
                        break;
                    }
                    Err(shared) => {
                        engine = shared;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            if let Some(thread) = hub_thread {
                let _ = thread.join();
            }
        })
        .await
        .ok();
    }
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let position = state.engine.processed();
    axum::Json(serde_json::json!({"status": "ok", "processed": position, "subscriptions": state.hub.len()}))
}

async fn websocket(ws: WebSocketUpgrade, State(state): State<AppState>) -> impl IntoResponse {
    // Messages over `max_message_bytes` get a `message_too_large` error; frames far beyond it
    // end the connection before they are buffered.
    let limit = state.config.max_message_bytes.saturating_mul(4).saturating_add(64 * 1024);
    ws.max_message_size(limit).on_upgrade(move |socket| session::run(socket, state))
}
