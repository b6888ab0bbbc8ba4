//! The engine handle: starts the grid, feeds it writes and subscriptions, and turns what it
//! emits into protocol messages.
//!
//! # Threads
//! Timely workers run on their own threads. The handle's methods may be called from any
//! thread; they hand records to worker 0 through a channel and wake it. A router thread
//! receives what the workers deliver and passes every message on to [`Engine::messages`], keyed
//! by subscription (callers route by key, see [`Engine::reserve_key`]). Window re-reads run on two re-read threads of
//! their own (through the [`SnapshotSource`]), fed by a queue the router never blocks on (a
//! window asks for one re-read at a time, so it holds at most one entry per window): a slow
//! read never holds up other subscriptions' messages. A panic on any of these threads is
//! reported as [`EngineEvent::Failed`].
//!
//! # Failure
//! A worker that panics, or a grid that stops while nobody asked it to, is reported as
//! [`EngineEvent::Failed`]: results can no longer be trusted. A window re-read that keeps
//! failing ends its subscription with an `error` message (code `resubscribe`) instead of
//! leaving it silently stale.
//!
//! # Consistency
//! [`Engine::register_with_snapshot`] takes the subscription's initial result as read at
//! position P. Writes at or below P are not applied to it again; writes after P that the grid
//! already passed are replayed to it alone from the retention buffer; if some of them were
//! already evicted, registration fails with [`EngineError::StaleSnapshot`] and the caller
//! reads again ([`Engine::register`] does this itself).

use rustc_hash::FxHashMap as HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use livegrid_matcher::{PipelineError, Query, QueryError, QuerySpec};
use livegrid_protocol::{ErrorCode, Frame, Position};

use crate::doc_id::DocId;
use crate::event::ChangeEvent;
use crate::grid::{
    Command, DELIVERY_BATCH, Delivery, GridShape, MAX_RECYCLED_BUFFERS, WorkerSetup, run_worker_reporting,
};
use crate::query_index::QueryKey;
use crate::records::{
    Attach, Forward, GridInput, PROCESS_SHIFT, Registration, StageInit, StageOutput, WirePipeline, WireQuery,
    home_process,
};
use crate::retention::Retention;
use crate::snapshot::{Snapshot, SnapshotError, SnapshotSource};
use crate::wire::{WireDoc, WireEvent, WireValue};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The grid's shape.
    pub shape: GridShape,
    /// This process's place in a multi-process grid; `None` for one process.
    pub cluster: Option<ClusterConfig>,
    /// How many recent writes the retention buffer keeps.
    pub retention: usize,
    /// How many bytes of recent writes the retention buffer keeps (see [`crate::retention`]).
    pub retention_bytes: usize,
    /// Documents a window keeps beyond its visible end (fewer re-reads, more memory).
    pub slack: usize,
    /// Messages the engine holds for its consumer at most ([`Engine::messages`]); beyond it the
    /// grid waits for the consumer.
    pub output_capacity: usize,
    /// Fed batches the grid may be behind at most; [`Engine::submit`] waits beyond it, so a
    /// producer faster than the grid is slowed down, not buffered without limit.
    pub max_inflight: u64,
    /// Requests forwarded by other processes of a cluster that the feeding process holds at
    /// most; beyond it, worker 0 waits for its engine to take them.
    pub forward_capacity: usize,
}

/// The default for [`EngineConfig::retention_bytes`]: 256 MiB.
pub const DEFAULT_RETENTION_BYTES: usize = 256 << 20;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shape: GridShape { query_partitions: 1, write_partitions: 1 },
            cluster: None,
            retention: 100_000,
            retention_bytes: DEFAULT_RETENTION_BYTES,
            slack: 16,
            output_capacity: 65_536,
            max_inflight: 64,
            forward_capacity: DEFAULT_FORWARD_CAPACITY,
        }
    }
}

/// Timely's communication hooks with a logger on every network send thread that adds the
/// bytes it sends to `total` and to the counter `livegrid_cluster_bytes_sent`.
fn count_sent_bytes(total: Arc<AtomicU64>) -> timely::communication::Hooks {
    use timely::communication::logging::{CommunicationEvent, CommunicationEventBuilder, CommunicationSetup};
    let log_fn = move |setup: CommunicationSetup| {
        if !setup.sender {
            return None;
        }
        let total = total.clone();
        let counter = metrics::counter!("livegrid_cluster_bytes_sent");
        let action = move |_: &Duration, events: &mut Option<Vec<(Duration, CommunicationEvent)>>| {
            let sent: usize = events
                .iter()
                .flatten()
                .map(|(_, event)| match event {
                    CommunicationEvent::Message(message) if message.is_send => message.header.required_bytes(),
                    _ => 0,
                })
                .sum();
            total.fetch_add(sent as u64, Ordering::Relaxed);
            counter.increment(sent as u64);
        };
        Some(timely::logging_core::Logger::<CommunicationEventBuilder>::new(Instant::now(), Duration::ZERO, action))
    };
    timely::communication::Hooks { log_fn: Arc::new(log_fn), ..Default::default() }
}

/// One process of a multi-process grid (timely's cluster mode).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This process's index, from 0.
    pub process: usize,
    /// `host:port` of every process, in index order.
    pub addresses: Vec<String>,
}

/// Why the engine refused a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The query does not compile.
    #[error("bad query: {0}")]
    BadQuery(#[from] QueryError),
    /// The snapshot is older than the retention buffer: read again.
    #[error("snapshot at position {position} is older than the retention buffer")]
    StaleSnapshot {
        /// The snapshot's position.
        position: Position,
    },
    /// The pipeline does not compile.
    #[error("bad pipeline: {0}")]
    BadPipeline(#[from] PipelineError),
    /// The snapshot source failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The grid could not start.
    #[error("grid failed to start: {0}")]
    Start(String),
    /// The engine has shut down, or this process does not feed the grid.
    #[error("engine is not accepting input")]
    Closed,
}

/// At shutdown, how long a full output may stay unread before its oldest messages are let go.
const UNREAD_AT_SHUTDOWN: Duration = Duration::from_secs(1);

/// Messages travel to the consumer in batches of at most this many.
pub const OUTPUT_BATCH: usize = 256;

/// Emptied batches kept for reuse, at most (about 36 KiB each).
const RECYCLED_BATCHES: usize = 32;

/// Hands emptied message batches back to the engine, which fills them again: a consumer on
/// another thread that frees them instead makes the engine take fresh memory for every batch,
/// and fresh memory costs page faults. Optional; a batch that is dropped is simply freed.
#[derive(Clone)]
pub struct Recycler {
    batches: Sender<Vec<Message>>,
    taken: Receiver<Vec<Message>>,
}

impl Recycler {
    fn new() -> Self {
        let (batches, taken) = crossbeam_channel::bounded(RECYCLED_BATCHES);
        Recycler { batches, taken }
    }

    /// Gives back a batch (its messages are dropped here); kept if the engine has room.
    pub fn give(&self, mut batch: Vec<Message>) {
        if batch.capacity() == OUTPUT_BATCH {
            batch.clear();
            let _ = self.batches.try_send(batch);
        }
    }

    /// An empty batch with room for [`OUTPUT_BATCH`] messages.
    pub fn take(&self) -> Vec<Message> {
        self.taken.try_recv().unwrap_or_else(|_| Vec::with_capacity(OUTPUT_BATCH))
    }
}

/// A message for a subscription's client, its documents already encoded.
#[derive(Debug, Clone)]
pub struct Message {
    /// The subscription.
    pub key: QueryKey,
    /// The message (`result` or `delta`), without the client's id.
    pub frame: Frame,
    /// For deltas: the time from the write entering the engine to here.
    pub latency: Option<Duration>,
}

/// What the engine tells its user.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// Messages, in order (at most [`OUTPUT_BATCH`]; one channel operation for all of them).
    Messages(Vec<Message>),
    /// The engine ended a subscription it could no longer keep exact (its window could not
    /// be refilled); its client must subscribe again.
    Ended {
        /// The subscription.
        key: QueryKey,
        /// The error code for the client.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// Every write at or below this position has been processed; all their messages came
    /// before this event.
    Processed(Position),
    /// The grid failed (a worker panicked or stopped): nothing it emits can be trusted any
    /// more. Comes at most once.
    Failed(String),
}

/// The default for [`EngineConfig::forward_capacity`]: requests forwarded by other processes
/// waiting for the feeding process's engine, at most (worker 0 waits beyond).
pub const DEFAULT_FORWARD_CAPACITY: usize = 1024;

/// Threads serving window re-reads.
const REREAD_THREADS: usize = 2;
/// Waits between attempts of a failing re-read; after the last, the subscription ends.
const REREAD_BACKOFF: [Duration; 5] = [
    Duration::from_millis(0),
    Duration::from_millis(20),
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

/// What the engine keeps per subscription: little, since there may be millions.
struct Subscribed {
    ns: Arc<str>,
    /// The query partition.
    column: u32,
    /// The query, kept only for windows (which may need re-reads).
    window_spec: Option<Box<QuerySpec>>,
}

/// A live pipeline core's registration: the share it serves and how many views it has.
struct CoreEntry {
    share: Vec<u8>,
    views: usize,
    column: u32,
    /// Where its snapshot was read: attaches are placed no earlier, so that they follow the
    /// core's start (a snapshot may be ahead of what the grid was fed).
    read_at: Position,
}

/// State behind the ingest lock: what was fed, in order.
struct Ingest {
    retention: Retention,
    subscriptions: HashMap<QueryKey, Subscribed>,
    /// Live pipeline cores (their grid registrations are in `subscriptions`).
    cores: HashMap<QueryKey, CoreEntry>,
    /// The core new pipeline subscriptions of each share attach to.
    shares: HashMap<Vec<u8>, QueryKey>,
    /// Pipeline subscriptions, with their core and namespace.
    views: HashMap<QueryKey, (QueryKey, Arc<str>)>,
    namespaces: HashMap<String, Arc<str>>,
    commands: Option<Sender<Command>>,
}

struct Shared {
    shape: GridShape,
    slack: usize,
    max_inflight: u64,
    ingest: Mutex<Ingest>,
    snapshot: Arc<dyn SnapshotSource>,
    worker0: Mutex<Option<std::thread::Thread>>,
    processed: Mutex<Position>,
    /// Feed commands sent to worker 0 (under the ingest lock).
    sent: AtomicU64,
    /// Feed commands fully processed, with a signal for waiters.
    progress: (Mutex<u64>, Condvar),
    /// The next subscription key.
    next_key: AtomicU64,
    /// This process's index in the cluster (0 alone).
    process: usize,
    /// Window re-reads fed (or given up) so far.
    rereads: AtomicU64,
    /// Window re-reads asked for and not yet fed or given up.
    pending_rereads: AtomicU64,
    /// Set when the engine is asked to stop: the grid ending is then expected.
    stopping: AtomicBool,
    /// Set when the grid failed.
    failed: AtomicBool,
    /// The origin of the engine's entry timestamps.
    started: Instant,
    /// Bytes sent to the other processes (see [`Engine::cluster_bytes_sent`]).
    cluster_bytes: Arc<AtomicU64>,
    /// Requests forwarded by other processes that worker 0 handed over and the forward
    /// thread has not carried out yet ([`Engine::settle`] waits for them).
    forward_pending: Arc<AtomicU64>,
}

impl Ingest {
    /// One shared name per namespace.
    fn namespace(&mut self, ns: &str) -> Arc<str> {
        if let Some(shared) = self.namespaces.get(ns) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(ns);
        self.namespaces.insert(ns.to_string(), shared.clone());
        shared
    }
}

impl Shared {
    /// Sends a command to worker 0; callers hold the ingest lock, so commands keep the order
    /// in which writes and registrations were decided.
    fn send(&self, ingest: &Ingest, command: Command) -> Result<(), EngineError> {
        let commands = ingest.commands.as_ref().ok_or(EngineError::Closed)?;
        commands.send(command).map_err(|_| EngineError::Closed)?;
        self.sent.fetch_add(1, Ordering::AcqRel);
        self.wake();
        Ok(())
    }

    /// Sends a request to the feeding process, through this process's input to the grid
    /// (callers hold the ingest lock).
    fn forward(&self, ingest: &Ingest, request: Forward) -> Result<(), EngineError> {
        self.send(ingest, Command::Feed(vec![GridInput::Forward(Box::new(request))], Position::ZERO))
    }

    /// The namespace and query of a window this process re-reads, if `key` is one.
    fn window_spec(&self, key: QueryKey) -> Option<(Arc<str>, QuerySpec)> {
        let ingest = self.ingest.lock().expect("ingest lock");
        let Some(Subscribed { ns, window_spec: Some(spec), .. }) = ingest.subscriptions.get(&key) else { return None };
        Some((ns.clone(), (**spec).clone()))
    }

    /// Ends a subscription in the grid; `false` when it was not registered.
    fn unregister(&self, ingest: &mut Ingest, key: QueryKey) -> Result<bool, EngineError> {
        if let Some((core, _)) = ingest.views.remove(&key) {
            return self.detach(ingest, core, key).map(|()| true);
        }
        let Some(sub) = ingest.subscriptions.remove(&key) else { return Ok(false) };
        let shape = self.shape;
        let q = sub.column as usize;
        let records = (0..shape.write_partitions)
            .map(|w| GridInput::Unregister { target: shape.worker(q, w), key, head: w == 0 })
            .collect();
        let position = ingest.retention.last_position();
        self.send(ingest, Command::Feed(records, position))?;
        Ok(true)
    }

    /// Attaches pipeline subscription `view` to `core`, at the last position fed (or the
    /// core's snapshot position, if later).
    fn attach(
        &self,
        ingest: &mut Ingest,
        core: QueryKey,
        view: QueryKey,
        ns: &str,
        pipeline: WirePipeline,
    ) -> Result<(), EngineError> {
        let Some(entry) = ingest.cores.get_mut(&core) else { return Err(EngineError::Closed) };
        entry.views += 1;
        let target = self.shape.worker(entry.column as usize, 0);
        let read_at = entry.read_at;
        let ns = ingest.namespace(ns);
        ingest.views.insert(view, (core, ns));
        let position = ingest.retention.last_position();
        let at = position.max(read_at);
        let record = GridInput::Attach(Box::new(Attach { target, core, view, pipeline, position: at }));
        self.send(ingest, Command::Feed(vec![record], position))
    }

    /// Detaches pipeline subscription `view` from `core`; the last view ends the core.
    fn detach(&self, ingest: &mut Ingest, core: QueryKey, view: QueryKey) -> Result<(), EngineError> {
        let Some(entry) = ingest.cores.get_mut(&core) else { return Ok(()) };
        entry.views -= 1;
        let target = self.shape.worker(entry.column as usize, 0);
        let position = ingest.retention.last_position();
        self.send(ingest, Command::Feed(vec![GridInput::Detach { target, core, view }], position))?;
        if ingest.cores[&core].views == 0 {
            let entry = ingest.cores.remove(&core).expect("present");
            metrics::gauge!("livegrid_pipeline_cores").set(ingest.cores.len() as f64);
            if ingest.shares.get(&entry.share) == Some(&core) {
                ingest.shares.remove(&entry.share);
            }
            self.unregister(ingest, core)?;
        }
        Ok(())
    }

    /// A fresh subscription key of this process.
    fn reserve_key(&self) -> QueryKey {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a live pipeline subscription (see [`Engine::register_pipeline_as`]).
    fn register_pipeline(
        &self,
        key: QueryKey,
        ns: &str,
        spec: &QuerySpec,
        query: &Query,
        pipeline: WirePipeline,
    ) -> Result<(), EngineError> {
        // Identical pipelines (namespace, first $match with its ACL, stages through $group)
        // share one core: a new one attaches to it without reading the database.
        let share = share_of(ns, spec, &pipeline);
        {
            let mut ingest = self.ingest.lock().expect("ingest lock");
            if let Some(&core) = ingest.shares.get(&share) {
                return self.attach(&mut ingest, core, key, ns, pipeline);
            }
        }
        let core = self.reserve_key();
        let read_at = self.register_reading(core, ns, spec, query, Some(&pipeline))?;
        let mut ingest = self.ingest.lock().expect("ingest lock");
        let Some(column) = ingest.subscriptions.get(&core).map(|sub| sub.column) else {
            return Err(EngineError::Closed);
        };
        ingest.cores.insert(core, CoreEntry { share: share.clone(), views: 0, column, read_at });
        metrics::gauge!("livegrid_pipeline_cores").set(ingest.cores.len() as f64);
        // Registered concurrently with an identical pipeline: the first core stays the one
        // others attach to; this one serves this subscription.
        ingest.shares.entry(share).or_insert(core);
        self.attach(&mut ingest, core, key, ns, pipeline)
    }

    fn register_reading(
        &self,
        key: QueryKey,
        ns: &str,
        spec: &QuerySpec,
        query: &Query,
        pipeline: Option<&WirePipeline>,
    ) -> Result<Position, EngineError> {
        let k = crate::window::capacity(query, self.slack);
        let mut attempts = 0;
        loop {
            let snapshot = self.snapshot.read(ns, spec, query, k)?;
            let position = snapshot.position;
            match self.register_compiled(key, ns, spec, query, pipeline, snapshot) {
                Err(EngineError::StaleSnapshot { .. }) if attempts < 3 => attempts += 1,
                other => return other.map(|()| position),
            }
        }
    }

    fn register_compiled(
        &self,
        key: QueryKey,
        ns: &str,
        spec: &QuerySpec,
        query: &Query,
        pipeline: Option<&WirePipeline>,
        snapshot: Snapshot,
    ) -> Result<(), EngineError> {
        let stale = EngineError::StaleSnapshot { position: snapshot.position };
        // The writes the grid passed after the snapshot, taken under the ingest lock; the
        // registration is built (its snapshot filtered) without it, so that ingest goes on...
        let (replay, seen) = {
            let ingest = self.ingest.lock().expect("ingest lock");
            (ingest.retention.since(snapshot.position).ok_or(stale)?, ingest.retention.last_position())
        };
        let mut records = build_registration(self.shape, key, ns, spec, query, snapshot, &replay, false);
        if let Some(pipeline) = pipeline {
            for record in &mut records {
                if let GridInput::Register(registration) = record {
                    registration.query.pipeline = Some(pipeline.clone());
                }
            }
        }
        // ...and what was fed meanwhile is added before the registration is sent, in order.
        let mut ingest = self.ingest.lock().expect("ingest lock");
        let meanwhile = ingest.retention.since(seen).ok_or(EngineError::StaleSnapshot { position: seen })?;
        append_replay(self.shape, ns, &meanwhile, &mut records);
        // Only a limited window can drain and need a re-read of its query.
        let windowed = crate::window::capacity(query, self.slack).is_some();
        let ns = ingest.namespace(ns);
        let column = query_partition(&ns, spec, self.shape) as u32;
        ingest
            .subscriptions
            .insert(key, Subscribed { ns, column, window_spec: windowed.then(|| Box::new(spec.clone())) });
        let position = ingest.retention.last_position();
        self.send(&ingest, Command::Feed(records, position))
    }

    /// Carries out a request forwarded by another process (on the feeding process).
    fn forwarded(&self, request: Forward, events: &Sender<EngineEvent>, rereads: &Sender<QueryKey>) {
        let key = request.key();
        // The asking process compiled the query already; this cannot fail but is checked.
        let compiled = |spec: &WireQuery| {
            let spec = spec.to_spec();
            Query::compile(&spec).map(|query| (spec, query)).map_err(EngineError::from)
        };
        let done = match request {
            Forward::Register { key, ns, spec, snapshot } => compiled(&spec)
                .and_then(|(spec, query)| self.register_compiled(key, &ns, &spec, &query, None, snapshot.into())),
            Forward::Pipeline { key, ns, spec, pipeline } => {
                compiled(&spec).and_then(|(spec, query)| self.register_pipeline(key, &ns, &spec, &query, pipeline))
            }
            Forward::Unregister { key } => {
                let mut ingest = self.ingest.lock().expect("ingest lock");
                self.unregister(&mut ingest, key).map(|_| ())
            }
            Forward::Reread { key, snapshot } => {
                // Compiled outside the ingest lock; a window that ended meanwhile is let go.
                let Some((_, spec)) = self.window_spec(key) else { return };
                let placed = Query::compile(&spec).map(|query| place_reread(self, key, &query, snapshot.into()));
                // Too old for the retention buffer (the read took long): read here instead,
                // on the re-read threads (this thread must not wait on MongoDB).
                if let Ok(Err(Placed::Stale(_))) = placed {
                    self.pending_rereads.fetch_add(1, Ordering::AcqRel);
                    if rereads.send(key).is_err() {
                        self.pending_rereads.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                Ok(())
            }
        };
        if let Err(e) = done {
            let message = format!("the subscription could not be registered ({e}); subscribe again");
            self.end(key, ErrorCode::Resubscribe, message, events);
        }
    }

    /// Tells the client of subscription `key` that it ended: here, or through the grid to
    /// the process the subscription lives on.
    fn end(&self, key: QueryKey, code: ErrorCode, message: String, events: &Sender<EngineEvent>) {
        if home_process(key) == self.process {
            let _ = events.send(EngineEvent::Ended { key, code, message });
            return;
        }
        let ingest = self.ingest.lock().expect("ingest lock");
        let position = ingest.retention.last_position();
        let notice = GridInput::Notice { target: 0, key, code, message };
        let _ = self.send(&ingest, Command::Feed(vec![notice], position));
    }

    fn wake(&self) {
        if let Some(thread) = self.worker0.lock().expect("worker0 lock").as_ref() {
            thread.unpark();
        }
    }
}

/// A running engine.
pub struct Engine {
    shared: Arc<Shared>,
    events: Receiver<EngineEvent>,
    /// Behind a lock only to make the handle `Sync` (timely's guards are not).
    guards: Mutex<Option<timely::communication::WorkerGuards<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    feeds: bool,
    recycler: Recycler,
    /// For [`Engine::end_subscriptions`]; let go at shutdown, so that the output closes.
    ender: Mutex<Option<Sender<EngineEvent>>>,
}

impl Engine {
    /// Starts the grid's workers (this process's share of them) and the router.
    pub fn start(config: EngineConfig, snapshot: Arc<dyn SnapshotSource>) -> Result<Engine, EngineError> {
        let workers = config.shape.workers();
        let (communication, feeds) = match &config.cluster {
            None => (timely::CommunicationConfig::Process(workers), true),
            Some(cluster) => {
                let processes = cluster.addresses.len();
                if processes == 0 || !workers.is_multiple_of(processes) || cluster.process >= processes {
                    return Err(EngineError::Start(format!(
                        "{workers} workers cannot be split evenly over {processes} processes"
                    )));
                }
                (
                    timely::CommunicationConfig::Cluster {
                        threads: workers / processes,
                        process: cluster.process,
                        addresses: cluster.addresses.clone(),
                        report: false,
                        zerocopy: false,
                    },
                    cluster.process == 0,
                )
            }
        };
        let process = config.cluster.as_ref().map_or(0, |cluster| cluster.process);
        let processes = config.cluster.as_ref().map_or(1, |cluster| cluster.addresses.len());
        let (command_tx, command_rx) = crossbeam_channel::unbounded();
        // Bounded: worker 0 waits when its engine falls behind with forwarded requests.
        let (forward_tx, forward_rx) = crossbeam_channel::bounded::<Forward>(config.forward_capacity.max(1));
        let forward_pending = Arc::new(AtomicU64::new(0));
        // Bounded: workers wait for the router, which waits for the consumer.
        let (delivery_tx, delivery_rx) = crossbeam_channel::bounded(1024);
        let (recycle_tx, recycle_rx) = crossbeam_channel::bounded(MAX_RECYCLED_BUFFERS);
        let (worker0_tx, worker0_rx) = crossbeam_channel::bounded(1);
        let setup = Arc::new(WorkerSetup {
            slack: config.slack,
            processes,
            forwarded: forward_tx,
            forward_pending: forward_pending.clone(),
            commands: command_rx,
            deliveries: delivery_tx,
            recycled: recycle_rx,
            worker0: worker0_tx,
        });
        let cluster_bytes = Arc::new(AtomicU64::new(0));
        let (builders, others) =
            communication.try_build_with(count_sent_bytes(cluster_bytes.clone())).map_err(EngineError::Start)?;
        let guards = timely::execute::execute_from(builders, others, timely::WorkerConfig::default(), move |worker| {
            run_worker_reporting(worker, &setup)
        })
        .map_err(EngineError::Start)?;

        let shared = Arc::new(Shared {
            shape: config.shape,
            slack: config.slack,
            max_inflight: config.max_inflight.max(1),
            ingest: Mutex::new(Ingest {
                retention: Retention::new(config.retention, config.retention_bytes),
                subscriptions: HashMap::default(),
                cores: HashMap::default(),
                shares: HashMap::default(),
                views: HashMap::default(),
                namespaces: HashMap::default(),
                commands: Some(command_tx),
            }),
            snapshot,
            worker0: Mutex::new(None),
            processed: Mutex::new(Position::ZERO),
            sent: AtomicU64::new(0),
            progress: (Mutex::new(0), Condvar::new()),
            next_key: AtomicU64::new(((process as u64) << PROCESS_SHIFT) + 1),
            process,
            rereads: AtomicU64::new(0),
            pending_rereads: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            started: Instant::now(),
            cluster_bytes,
            forward_pending,
        });
        // This process's first worker: it reads the commands.
        let thread = worker0_rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| EngineError::Start("the first worker did not start".into()))?;
        *shared.worker0.lock().expect("worker0 lock") = Some(thread);
        let (event_tx, event_rx) = crossbeam_channel::bounded((config.output_capacity / OUTPUT_BATCH).max(1));
        // Unbounded, yet bounded by the number of windows: a window asks for one re-read at a
        // time (it waits for it before asking again), and the router never blocks on it.
        let (reread_tx, reread_rx) = crossbeam_channel::unbounded();
        let recycler = Recycler::new();
        let ender = Mutex::new(Some(event_tx.clone()));
        let mut threads = Vec::with_capacity(1 + REREAD_THREADS);
        let spawn = |name: &str, shared: Arc<Shared>, events: Sender<EngineEvent>, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let thread = std::thread::current().name().unwrap_or("engine").to_string();
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err()
                        && !shared.failed.swap(true, Ordering::AcqRel)
                    {
                        let _ = events.send(EngineEvent::Failed(format!("the {thread} thread panicked")));
                    }
                })
                .map_err(|e| EngineError::Start(e.to_string()))
        };
        let stale_rereads = reread_tx.clone();
        {
            let (owned, events, batches) = (shared.clone(), event_tx.clone(), recycler.clone());
            let body = Box::new(move || route(&owned, &delivery_rx, &recycle_tx, &batches, &events, &reread_tx));
            threads.push(spawn("livegrid-router", shared.clone(), event_tx.clone(), body)?);
        }
        if feeds && processes > 1 {
            let (owned, events) = (shared.clone(), event_tx.clone());
            let body = Box::new(move || {
                while let Ok(request) = forward_rx.recv() {
                    metrics::gauge!("livegrid_engine_forwarded_depth").set(forward_rx.len() as f64);
                    owned.forwarded(request, &events, &stale_rereads);
                    owned.forward_pending.fetch_sub(1, Ordering::AcqRel);
                }
            });
            threads.push(spawn("livegrid-forward", shared.clone(), event_tx.clone(), body)?);
        }
        for _ in 0..REREAD_THREADS {
            let (owned, events, queue) = (shared.clone(), event_tx.clone(), reread_rx.clone());
            let body = Box::new(move || {
                for key in queue {
                    reread(&owned, key, &events);
                    owned.pending_rereads.fetch_sub(1, Ordering::AcqRel);
                }
            });
            threads.push(spawn("livegrid-reread", shared.clone(), event_tx.clone(), body)?);
        }
        drop(event_tx);
        Ok(Engine {
            shared,
            events: event_rx,
            guards: Mutex::new(Some(guards)),
            threads: Mutex::new(threads),
            feeds,
            recycler,
            ender,
        })
    }

    /// What the engine emits, in order. The channel is bounded (`output_capacity` messages, in
    /// batches of at most [`OUTPUT_BATCH`]): the grid
    /// waits for its consumer, so read it concurrently with feeding (a consumer that only
    /// reads after [`Engine::settle`] can stall the engine once more than that many messages
    /// are waiting).
    pub fn messages(&self) -> &Receiver<EngineEvent> {
        &self.events
    }

    /// Where consumers of [`Engine::messages`] may hand emptied batches back.
    pub fn recycler(&self) -> &Recycler {
        &self.recycler
    }

    /// Whether this process feeds the grid (process 0, or the only process).
    pub fn feeds(&self) -> bool {
        self.feeds
    }

    /// Feeds writes, in position order. Writes at or below the last position fed are
    /// ignored (a source may repeat itself after a restart); their count is returned.
    ///
    /// # Backpressure
    /// When the grid is more than `max_inflight` batches behind, this waits (without holding
    /// any lock the grid's consumers need) until it catches up.
    pub fn submit(&self, events: impl IntoIterator<Item = ChangeEvent>) -> Result<usize, EngineError> {
        if !self.feeds {
            return Err(EngineError::Closed);
        }
        self.wait_for_room();
        let now = (self.shared.started.elapsed().as_nanos() as u64).max(1);
        let shape = self.shared.shape;
        let mut ingest = self.shared.ingest.lock().expect("ingest lock");
        let mut records = Vec::new();
        let mut ignored = 0;
        for event in events {
            if event.position <= ingest.retention.last_position() && !ingest.retention.last_position().is_zero() {
                ignored += 1;
                continue;
            }
            let event = Arc::new(event);
            let w = DocId::new(&event.id).partition(shape.write_partitions);
            let wire = WireEvent::new(event.as_ref(), now);
            for q in 0..shape.query_partitions {
                records.push(GridInput::Event { target: shape.worker(q, w), event: wire.clone() });
            }
            ingest.retention.push(event, now);
        }
        let position = ingest.retention.last_position();
        self.send(&ingest, Command::Feed(records, position))?;
        Ok(ignored)
    }

    /// A fresh subscription key: callers that route messages by key learn it before the
    /// first message can arrive, then register with [`Engine::register_as`]. Keys name the
    /// process that reserved them (see [`home_process`]), so that a cluster routes each
    /// subscription's messages to the process its client is on.
    pub fn reserve_key(&self) -> QueryKey {
        self.shared.reserve_key()
    }

    /// Registers a subscription, reading its initial result from the snapshot source (and
    /// reading again if the grid has moved on past the retention buffer meanwhile).
    pub fn register(&self, ns: &str, spec: &QuerySpec) -> Result<QueryKey, EngineError> {
        let query = Query::compile(spec)?;
        let key = self.reserve_key();
        self.register_as(key, ns, spec, &query)?;
        Ok(key)
    }

    /// [`Engine::register`] under a key from [`Engine::reserve_key`], for a query the caller
    /// compiled from `spec` already.
    ///
    /// On a process that does not feed the grid, the initial result is read here and the
    /// registration is forwarded to the feeding process through the grid; should the grid
    /// there have moved past the retention buffer meanwhile, the subscription ends with
    /// [`EngineEvent::Ended`] (`resubscribe`).
    pub fn register_as(&self, key: QueryKey, ns: &str, spec: &QuerySpec, query: &Query) -> Result<(), EngineError> {
        if !self.feeds {
            let capacity = self.window_capacity(query);
            let snapshot = self.shared.snapshot.read(ns, spec, query, capacity)?;
            if capacity.is_some() {
                // This process re-reads the window when it drains: it keeps the query.
                let mut ingest = self.shared.ingest.lock().expect("ingest lock");
                let ns = ingest.namespace(ns);
                let window_spec = Some(Box::new(spec.clone()));
                ingest.subscriptions.insert(key, Subscribed { ns, column: 0, window_spec });
            }
            let request = Forward::Register {
                key,
                ns: ns.to_string(),
                spec: WireQuery::from_spec(spec),
                snapshot: snapshot.into(),
            };
            return self.forward(request);
        }
        self.shared.register_reading(key, ns, spec, query, None).map(|_| ())
    }

    /// Registers a live pipeline under a key from [`Engine::reserve_key`]: `spec` holds its
    /// first `$match` as the filter (and nothing else; object ACLs go into it too), `query` is
    /// that spec compiled. Its messages are the pipeline's output and its changes (see
    /// [`crate::live_pipeline`]). On a process that does not feed the grid, it is forwarded
    /// to the feeding process, which shares cores for the whole cluster.
    pub fn register_pipeline_as(
        &self,
        key: QueryKey,
        ns: &str,
        spec: &QuerySpec,
        query: &Query,
        pipeline: WirePipeline,
    ) -> Result<(), EngineError> {
        if crate::window::is_window(query) {
            return Err(EngineError::BadPipeline(PipelineError::Bad {
                stage: "pipeline".into(),
                reason: "a live pipeline's sort, skip and limit are its own stages".into(),
            }));
        }
        pipeline.compile()?.check_live()?;
        if !self.feeds {
            return self.forward(Forward::Pipeline {
                key,
                ns: ns.to_string(),
                spec: WireQuery::from_spec(spec),
                pipeline,
            });
        }
        self.shared.register_pipeline(key, ns, spec, query, pipeline)
    }

    /// How many documents a subscription's snapshot must hold: its window's capacity, or all.
    pub fn window_capacity(&self, query: &Query) -> Option<usize> {
        crate::window::capacity(query, self.shared.slack)
    }

    /// Registers a subscription whose initial result the caller read (see the module docs).
    /// For a windowed query, `snapshot` holds the first [`Engine::window_capacity`] documents
    /// in sort order.
    pub fn register_with_snapshot(
        &self,
        ns: &str,
        spec: &QuerySpec,
        snapshot: Snapshot,
    ) -> Result<QueryKey, EngineError> {
        let query = Query::compile(spec)?;
        let key = self.reserve_key();
        self.shared.register_compiled(key, ns, spec, &query, None, snapshot)?;
        Ok(key)
    }

    /// Live pipeline cores: the distinct pipelines (up to `$group`) subscriptions share.
    pub fn pipeline_cores(&self) -> usize {
        self.shared.ingest.lock().expect("ingest lock").cores.len()
    }

    /// Ends a subscription; messages already under way may still arrive.
    pub fn unregister(&self, key: QueryKey) -> Result<(), EngineError> {
        if !self.feeds {
            self.shared.ingest.lock().expect("ingest lock").subscriptions.remove(&key);
            return self.forward(Forward::Unregister { key });
        }
        let mut ingest = self.shared.ingest.lock().expect("ingest lock");
        self.shared.unregister(&mut ingest, key).map(|_| ())
    }

    /// Sends a request to the feeding process, through this process's input to the grid.
    fn forward(&self, request: Forward) -> Result<(), EngineError> {
        let ingest = self.shared.ingest.lock().expect("ingest lock");
        self.shared.forward(&ingest, request)
    }

    /// Waits while the grid is more than `max_inflight` feed commands behind.
    fn wait_for_room(&self) {
        let (lock, signal) = &self.shared.progress;
        let mut done = lock.lock().expect("progress lock");
        let mut waited = false;
        while self.shared.sent.load(Ordering::Acquire).saturating_sub(*done) > self.shared.max_inflight
            && !self.shared.failed.load(Ordering::Acquire)
            && !self.shared.stopping.load(Ordering::Acquire)
        {
            waited = true;
            done = signal.wait_timeout(done, Duration::from_millis(100)).expect("progress lock").0;
        }
        if waited {
            metrics::counter!("livegrid_engine_backpressure_waits").increment(1);
        }
    }

    /// Bytes this process has sent to the other processes of its cluster (0 alone): the
    /// records crossing process boundaries with their headers, as timely's network threads
    /// write them (also the counter `livegrid_cluster_bytes_sent`). Counted when timely's
    /// loggers flush their buffers, so while running it lags by a few hundred messages;
    /// exact once the engine has stopped.
    pub fn cluster_bytes_sent(&self) -> u64 {
        self.shared.cluster_bytes.load(Ordering::Relaxed)
    }

    /// The last position all of whose messages have been emitted. On a process that does
    /// not feed the grid: the latest position among the messages it has emitted (a lower
    /// bound of the feeding process's, and at least the position of every message emitted).
    pub fn processed(&self) -> Position {
        *self.shared.processed.lock().expect("processed lock")
    }

    /// Waits until everything fed so far (writes, registrations, re-reads) has been
    /// processed and its messages emitted, or `timeout` passes; returns whether it was.
    pub fn wait_processed(&self, timeout: Duration) -> bool {
        let target = self.shared.sent.load(Ordering::Acquire);
        let (lock, signal) = &self.shared.progress;
        let deadline = Instant::now() + timeout;
        let mut done = lock.lock().expect("progress lock");
        while *done < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = signal.wait_timeout(done, left).expect("progress lock").0;
        }
        true
    }

    /// Waits until every epoch the grid began before the call has been processed everywhere
    /// and its messages for this process have reached [`Engine::messages`], or `timeout`
    /// passes; returns whether they had. On a process that does not feed the grid, this is
    /// how to know that this process has every message of the writes fed so far. Window
    /// re-reads this process was asked for are forwarded first (the feeding process's
    /// [`Engine::settle`] then waits for them to be placed).
    pub fn barrier(&self, timeout: Duration) -> bool {
        // This process's window re-reads first: they are forwarded before the barrier.
        let deadline = Instant::now() + timeout;
        while self.shared.pending_rereads.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        {
            let ingest = self.shared.ingest.lock().expect("ingest lock");
            if self.send(&ingest, Command::Feed(Vec::new(), Position::ZERO)).is_err() {
                return false;
            }
        }
        self.wait_processed(deadline.saturating_duration_since(Instant::now()))
    }

    /// Like [`Engine::wait_processed`], and also waits for the window re-reads that
    /// processing asked for (and, on the feeding process of a cluster, for the requests other
    /// processes forwarded): afterwards every subscription's messages are exact up to the
    /// last position fed. It returns once a whole wait passed with nothing new fed, so a
    /// producer feeding all along keeps it waiting until `timeout`.
    pub fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let rereads = self.shared.rereads.load(Ordering::Acquire);
            let sent = self.shared.sent.load(Ordering::Acquire);
            if !self.wait_processed(deadline.saturating_duration_since(Instant::now())) {
                return false;
            }
            // Window re-reads asked for, and (on the feeding process) requests other processes
            // forwarded (re-reads among them), not yet carried out.
            let pending = self.shared.pending_rereads.load(Ordering::Acquire)
                + self.shared.forward_pending.load(Ordering::Acquire);
            // Nothing fed meanwhile (a forwarded request carried out after the wait began).
            let quiet = self.shared.rereads.load(Ordering::Acquire) == rereads
                && self.shared.sent.load(Ordering::Acquire) == sent;
            if pending == 0 && quiet {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if pending > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Window re-reads this process has carried out so far: read and fed, or read and
    /// forwarded to the feeding process, or (there) placed for another process.
    pub fn rereads(&self) -> u64 {
        self.shared.rereads.load(Ordering::Acquire)
    }

    /// Whether the grid has failed (see [`EngineEvent::Failed`]).
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// Makes worker 0 panic, to exercise the failure path in tests. Never use otherwise.
    #[doc(hidden)]
    pub fn inject_worker_panic(&self) -> Result<(), EngineError> {
        let ingest = self.shared.ingest.lock().expect("ingest lock");
        self.send(&ingest, Command::Panic)
    }

    /// Stops feeding, lets the grid drain, and waits for the workers, the router and the
    /// re-read thread. Idempotent; also done on drop.
    pub fn shutdown(self) {
        self.close();
    }

    /// Ends every subscription whose namespace `concerned` accepts: each leaves the grid and
    /// its client gets a `resubscribe` error with `reason` (for when the source may have
    /// missed changes to those namespaces). Returns how many ended.
    pub fn end_subscriptions(&self, concerned: impl Fn(&str) -> bool, reason: &str) -> Result<usize, EngineError> {
        let ended = {
            let mut ingest = self.shared.ingest.lock().expect("ingest lock");
            // Subscriptions (pipeline cores end with their last view).
            let keys: Vec<QueryKey> = ingest
                .subscriptions
                .iter()
                .filter(|(key, sub)| concerned(&sub.ns) && !ingest.cores.contains_key(key))
                .map(|(key, _)| *key)
                .chain(ingest.views.iter().filter(|(_, (_, ns))| concerned(ns)).map(|(key, _)| *key))
                .collect();
            for key in &keys {
                self.shared.unregister(&mut ingest, *key)?;
            }
            keys
        };
        let Some(events) = self.ender.lock().expect("ender lock").clone() else { return Err(EngineError::Closed) };
        for key in &ended {
            let message = format!("{reason}; subscribe again for a fresh result");
            self.shared.end(*key, ErrorCode::Resubscribe, message, &events);
        }
        Ok(ended.len())
    }

    /// [`Engine::shutdown`] through a shared reference.
    pub fn close(&self) {
        self.ender.lock().expect("ender lock").take();
        self.shared.stopping.store(true, Ordering::Release);
        {
            let mut ingest = self.shared.ingest.lock().expect("ingest lock");
            if let Some(commands) = ingest.commands.take() {
                let _ = commands.send(Command::Shutdown);
            }
        }
        self.wake();
        let joined = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                self.join_threads();
                joined.store(true, Ordering::Release);
            });
            // The grid drains into the bounded output. A consumer still reading gets it all;
            // if nobody has read for a while, the router must not wait forever: the oldest
            // messages are let go.
            let mut full_since: Option<Instant> = None;
            while !joined.load(Ordering::Acquire) {
                if self.events.is_full() {
                    if full_since.get_or_insert_with(Instant::now).elapsed() > UNREAD_AT_SHUTDOWN {
                        let _ = self.events.try_recv();
                    }
                } else {
                    full_since = None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    }

    /// Joins the workers, then the router and re-read threads (not after a failure).
    fn join_threads(&self) {
        if let Some(guards) = self.guards.lock().expect("guards lock").take() {
            if self.failed() {
                // The surviving workers may wait forever for the one that died: do not join.
                std::mem::forget(guards);
            } else {
                drop(guards.join());
            }
        }
        if self.failed() {
            return;
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        for thread in threads {
            let _ = thread.join();
        }
    }

    fn send(&self, ingest: &Ingest, command: Command) -> Result<(), EngineError> {
        self.shared.send(ingest, command)
    }

    fn wake(&self) {
        self.shared.wake();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
    }
}

/// The query partition of a subscription: identical filters share one, so that they share
/// compiled state.
fn query_partition(ns: &str, spec: &QuerySpec, shape: GridShape) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    ns.hash(&mut hasher);
    livegrid_protocol::extjson::to_canonical_string(&spec.filter).hash(&mut hasher);
    (hasher.finish() % shape.query_partitions as u64) as usize
}

#[allow(clippy::too_many_arguments)]
fn build_registration(
    shape: GridShape,
    key: QueryKey,
    ns: &str,
    spec: &QuerySpec,
    query: &Query,
    snapshot: Snapshot,
    replay: &[(Arc<ChangeEvent>, u64)],
    reload: bool,
) -> Vec<GridInput> {
    let q = query_partition(ns, spec, shape);
    let wire_query = WireQuery::with_compiled(spec, query);
    let w_of = |id: &bson::Bson| DocId::new(id).partition(shape.write_partitions);
    let mut member_ids: Vec<Vec<WireValue>> = vec![Vec::new(); shape.write_partitions];
    let docs: Vec<WireDoc> = snapshot
        .docs
        .into_iter()
        .filter(|d| query.filter.matches(d))
        .map(|d| {
            let id = d.get("_id").cloned().unwrap_or(bson::Bson::Null);
            member_ids[w_of(&id)].push(WireValue(id));
            WireDoc(Arc::new(d))
        })
        .collect();
    let mut replays: Vec<Vec<WireEvent>> = vec![Vec::new(); shape.write_partitions];
    for (event, entered) in replay.iter().filter(|(e, _)| e.ns == ns) {
        replays[w_of(&event.id)].push(WireEvent::new(event, *entered));
    }
    let mut init = Some(StageInit { position: snapshot.position, docs, complete: snapshot.complete });
    member_ids
        .into_iter()
        .zip(replays)
        .enumerate()
        .map(|(w, (member_ids, replay))| {
            GridInput::Register(Box::new(Registration {
                target: shape.worker(q, w),
                key,
                ns: ns.to_string(),
                query: wire_query.clone(),
                member_ids,
                replay,
                init: if w == 0 { init.take() } else { None },
                reload,
            }))
        })
        .collect()
}

/// What identical live pipelines share a core by: the namespace, the filter registered with
/// the grid (the first `$match` with the subscriber's ACL) and the stages through `$group`.
fn share_of(ns: &str, spec: &QuerySpec, pipeline: &WirePipeline) -> Vec<u8> {
    let key = bson::doc! {"ns": ns, "filter": spec.filter.clone(), "stages": pipeline.split_at_group().0};
    key.to_vec().unwrap_or_else(|_| format!("{key:?}").into_bytes())
}

/// Adds `events` (of any namespace; those of `ns` count) to the replays of a registration's
/// records, each to the worker of its write partition.
fn append_replay(shape: GridShape, ns: &str, events: &[(Arc<ChangeEvent>, u64)], records: &mut [GridInput]) {
    for (event, entered) in events.iter().filter(|(e, _)| e.ns == ns) {
        let w = DocId::new(&event.id).partition(shape.write_partitions);
        for record in records.iter_mut() {
            if let GridInput::Register(registration) = record
                && registration.target as usize % shape.write_partitions == w
            {
                registration.replay.push(WireEvent::new(event, *entered));
            }
        }
    }
}

/// The router thread: names messages, queues window re-reads, reports progress and failure.
fn route(
    shared: &Shared,
    deliveries: &Receiver<Delivery>,
    recycle: &Sender<Vec<StageOutput>>,
    batches: &Recycler,
    events: &Sender<EngineEvent>,
    rereads: &Sender<QueryKey>,
) {
    for delivery in deliveries {
        match delivery {
            Delivery::Failed(reason) => {
                if !shared.failed.swap(true, Ordering::AcqRel) {
                    let _ = events.send(EngineEvent::Failed(reason));
                }
            }
            Delivery::Processed { position, commands } => {
                {
                    let mut processed = shared.processed.lock().expect("processed lock");
                    *processed = (*processed).max(position);
                }
                let (lock, signal) = &shared.progress;
                *lock.lock().expect("progress lock") = commands;
                signal.notify_all();
                // Positions are the feeding process's; the others only count their commands.
                if shared.process == 0 {
                    let _ = events.send(EngineEvent::Processed(position));
                }
            }
            Delivery::Outputs(mut outputs) => {
                metrics::gauge!("livegrid_engine_output_depth").set((events.len() * OUTPUT_BATCH) as f64);
                let mut batch = batches.take();
                let send = |batch: &mut Vec<Message>| {
                    if !batch.is_empty() {
                        let sent = std::mem::replace(batch, batches.take());
                        let _ = events.send(EngineEvent::Messages(sent));
                    }
                };
                // One clock reading for the whole delivery.
                let now = shared.started.elapsed();
                // The latest position among the messages: a process that does not feed the grid
                // knows positions only from them.
                let mut latest = Position::ZERO;
                for output in outputs.drain(..) {
                    match output {
                        StageOutput::NeedsReload { key } => {
                            // What came before goes out first.
                            send(&mut batch);
                            shared.pending_rereads.fetch_add(1, Ordering::AcqRel);
                            if rereads.send(key).is_err() {
                                shared.pending_rereads.fetch_sub(1, Ordering::AcqRel);
                            }
                        }
                        StageOutput::Ended { key, code, message } => {
                            send(&mut batch);
                            if shared.process != 0 {
                                // What this process kept to re-read its window.
                                shared.ingest.lock().expect("ingest lock").subscriptions.remove(&key);
                            }
                            let _ = events.send(EngineEvent::Ended { key, code, message });
                        }
                        StageOutput::Frame { key, frame, entered } => {
                            if shared.process != 0 {
                                latest = latest.max(frame.position());
                            }
                            let latency = (entered > 0).then(|| now.saturating_sub(Duration::from_nanos(entered)));
                            batch.push(Message { key, frame, latency });
                            if batch.len() == OUTPUT_BATCH {
                                send(&mut batch);
                            }
                        }
                    }
                }
                if !latest.is_zero() {
                    let mut processed = shared.processed.lock().expect("processed lock");
                    *processed = (*processed).max(latest);
                }
                if batch.is_empty() {
                    batches.give(batch);
                } else {
                    let _ = events.send(EngineEvent::Messages(batch));
                }
                // Back to the deliver stage, unless it holds enough spare buffers already.
                if outputs.capacity() == DELIVERY_BATCH {
                    let _ = recycle.try_send(outputs);
                }
            }
        }
    }
    // Every worker is gone. Expected at shutdown; otherwise the grid died under us.
    if !shared.stopping.load(Ordering::Acquire) && !shared.failed.swap(true, Ordering::AcqRel) {
        let _ = events.send(EngineEvent::Failed("the grid stopped unexpectedly".into()));
    }
}

/// Re-reads the top of a drained window and feeds it to the grid (on a process that does not
/// feed it, forwards it to the feeding process), retrying with backoff; a subscription whose
/// re-read keeps failing ends with an error its client can act on.
fn reread(shared: &Shared, key: QueryKey, events: &Sender<EngineEvent>) {
    let Some((ns, spec)) = shared.window_spec(key) else { return };
    let mut last_error = String::new();
    let compiled = Query::compile(&spec);
    for wait in REREAD_BACKOFF {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep(wait);
        let query = match &compiled {
            Ok(query) => query,
            Err(e) => {
                last_error = e.to_string();
                break;
            }
        };
        let k = crate::window::capacity(query, shared.slack);
        let snapshot = match shared.snapshot.read(&ns, &spec, query, k) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                last_error = e.to_string();
                continue;
            }
        };
        if shared.process != 0 {
            // The feeding process places it against its retention buffer.
            let ingest = shared.ingest.lock().expect("ingest lock");
            if !ingest.subscriptions.contains_key(&key) {
                return;
            }
            if shared.forward(&ingest, Forward::Reread { key, snapshot: snapshot.into() }).is_ok() {
                shared.rereads.fetch_add(1, Ordering::AcqRel);
            }
            return;
        }
        match place_reread(shared, key, query, snapshot) {
            Ok(()) | Err(Placed::Gone) => return,
            Err(Placed::Stale(error)) => last_error = error,
        }
    }
    // Give up: end the subscription in the grid and tell its client why.
    {
        let mut ingest = shared.ingest.lock().expect("ingest lock");
        if shared.process != 0 {
            // The grid's side of it is the feeding process's to end.
            if ingest.subscriptions.remove(&key).is_none() {
                return;
            }
            let _ = shared.forward(&ingest, Forward::Unregister { key });
        } else if !matches!(shared.unregister(&mut ingest, key), Ok(true)) {
            return;
        }
    }
    shared.rereads.fetch_add(1, Ordering::AcqRel);
    let message = format!("the sorted window could not be refilled ({last_error}); subscribe again");
    shared.end(key, ErrorCode::Resubscribe, message, events);
}

/// Why a re-read was not placed.
enum Placed {
    /// The subscription has ended meanwhile.
    Gone,
    /// The re-read is older than the retention buffer: read again.
    Stale(String),
}

/// Places a window's re-read against the retention buffer and feeds it (on the feeding
/// process); `query` is the window's query, compiled.
fn place_reread(shared: &Shared, key: QueryKey, query: &Query, snapshot: Snapshot) -> Result<(), Placed> {
    let ingest = shared.ingest.lock().expect("ingest lock");
    let Some(Subscribed { ns, window_spec: Some(spec), .. }) = ingest.subscriptions.get(&key) else {
        return Err(Placed::Gone);
    };
    let Some(replay) = ingest.retention.since(snapshot.position) else {
        return Err(Placed::Stale(format!(
            "snapshot at position {} is older than the retention buffer",
            snapshot.position
        )));
    };
    let records = build_registration(shared.shape, key, ns, spec, query, snapshot, &replay, true);
    let position = ingest.retention.last_position();
    if shared.send(&ingest, Command::Feed(records, position)).is_ok() {
        shared.rereads.fetch_add(1, Ordering::AcqRel);
    }
    Ok(())
}
