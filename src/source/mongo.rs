//! MongoDB as a source: one change stream per deployment (or per watched database or
//! collection), never one per subscription, and snapshot reads with `find` at a known
//! cluster time.
//!
//! - **Events.** The stream asks for `fullDocument: "updateLookup"`; an update whose
//!   document is already gone (`fullDocument: null`) becomes a write without an after-image:
//!   the document has left every result. Positions are the cluster time plus the order inside
//!   it ([`change_stream_event`]), so the events of one transaction share a time, and a pull
//!   never ends inside a cluster time while the stream's current batch holds more of it: the
//!   engine applies a transaction in one step.
//! - **Snapshots.** Initial results and window re-reads are `find`s in a snapshot session:
//!   MongoDB picks the cluster time (`atClusterTime`), and the read's position is that time
//!   with every order inside it, so it compares exactly with the stream's events.
//! - **Resume.** The resume token of the last event handed to the engine is checkpointed in
//!   the data directory ([`Checkpoint`]) at most every [`CHECKPOINT_EVERY`]; a restart resumes
//!   after it. Errors the driver cannot resume itself are retried here with backoff from the
//!   last token. When the token has fallen off the oplog (`ChangeStreamHistoryLost`, code
//!   286) at start, no subscription exists yet and the stream starts at the present; while
//!   subscriptions are live, changes may have been missed: the source fails, which turns
//!   `/healthz` to 503, rather than serve results that silently diverge.
//!
//! The driver is asynchronous; the source owns a small runtime of its own, driven by the
//! pump thread (pulls) and the engine's re-read threads (snapshots), never by the server's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{Bson, Document, Timestamp, doc};
use futures_util::TryStreamExt;
use livegrid_engine::{ChangeEvent, Snapshot, SnapshotError, SnapshotSource};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::Position;
use mongodb::Client;
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::ResumeToken;
use mongodb::options::FullDocumentType;

use crate::source::change_stream_event::{self, ChangeEventError, Parsed};
use crate::source::{Pulled, Source, SourceError};

/// How often at most the resume token is written to disk.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// Backoff between attempts to reopen a failed stream: doubling from the first to the last.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Attempts to reopen a stream before the source gives up and fails.
const RETRY_ATTEMPTS: u32 = 8;

/// What to watch.
#[derive(Debug, Clone, PartialEq)]
pub enum Watch {
    /// Every database and collection of the deployment.
    Deployment,
    /// Some databases (`db`) and collections (`db.coll`).
    Only(Vec<String>),
}

/// Settings of the MongoDB source.
#[derive(Debug, Clone)]
pub struct MongoConfig {
    /// The connection string.
    pub uri: String,
    /// What to watch.
    pub watch: Watch,
    /// Where the resume token is checkpointed.
    pub checkpoint: PathBuf,
}

/// Why the MongoDB source failed.
#[derive(Debug, thiserror::Error)]
pub enum MongoError {
    /// The connection string is not valid.
    #[error("mongodb: invalid connection string: {0}")]
    Uri(#[source] mongodb::error::Error),
    /// The deployment could not be reached or refused the change stream.
    #[error("mongodb: {context}: {source}")]
    Driver {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
    /// The resume token fell off the oplog: changes since it may be lost.
    #[error(
        "mongodb: the change stream's history is lost (the resume token fell off the oplog): changes since the last checkpoint cannot be replayed; restart livegrid without the checkpoint ({path}) to read every result again"
    )]
    HistoryLost {
        /// The checkpoint file.
        path: String,
    },
    /// A change event could not be decoded.
    #[error("mongodb: undecodable change event (resume token {token}): {source}")]
    Event {
        /// The event's resume token.
        token: String,
        /// The cause.
        #[source]
        source: ChangeEventError,
    },
    /// The checkpoint could not be read or written.
    #[error("mongodb: checkpoint {path}: {source}")]
    Checkpoint {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The async runtime of the source could not start.
    #[error("mongodb: starting the driver's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// The resume token, durably on disk.
pub struct Checkpoint {
    path: PathBuf,
}

impl Checkpoint {
    /// The checkpoint at `path` (which need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Checkpoint { path: path.into() }
    }

    /// The token saved last, if any.
    pub fn load(&self) -> Result<Option<ResumeToken>, MongoError> {
        let failed = |source| MongoError::Checkpoint { path: self.path.display().to_string(), source };
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let token = Document::from_reader(&bytes[..])
                    .ok()
                    .and_then(|doc| bson::deserialize_from_document::<ResumeToken>(doc).ok())
                    .ok_or_else(|| {
                        failed(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a resume token"))
                    })?;
                Ok(Some(token))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed(e)),
        }
    }

    /// Saves `token` durably: written aside, synced, renamed over the old one, directory synced.
    pub fn save(&self, token: &ResumeToken) -> Result<(), MongoError> {
        let failed = |source| MongoError::Checkpoint { path: self.path.display().to_string(), source };
        let doc = bson::serialize_to_document(token)
            .map_err(|e| failed(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let mut bytes = Vec::new();
        doc.to_writer(&mut bytes).map_err(|e| failed(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let aside = self.path.with_extension("tmp");
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&aside).map_err(failed)?;
            file.write_all(&bytes).map_err(failed)?;
            file.sync_all().map_err(failed)?;
        }
        std::fs::rename(&aside, &self.path).map_err(failed)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(failed)?;
        }
        Ok(())
    }
}

/// The MongoDB change stream as a [`Source`].
pub struct MongoSource {
    runtime: Arc<tokio::runtime::Runtime>,
    client: Client,
    config: MongoConfig,
    stream: Option<ChangeStream<Document>>,
    checkpoint: Checkpoint,
    /// The token after the last event handed out, and whether it is on disk.
    token: Option<ResumeToken>,
    saved: bool,
    last_save: Instant,
    previous: Position,
    /// An event read ahead that belongs to the next pull.
    held: Option<ChangeEvent>,
    snapshots: Arc<MongoSnapshots>,
}

impl MongoSource {
    /// Connects, checks that the deployment has change streams, and opens the stream after
    /// the checkpoint (or at the present). Errors are clear and come quickly: an unreachable
    /// server fails within the driver's server selection timeout (5 s unless the URI says).
    pub fn open(config: MongoConfig) -> Result<MongoSource, MongoError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("livegrid-mongodb")
            .enable_all()
            .build()
            .map_err(MongoError::Runtime)?;
        let runtime = Arc::new(runtime);
        let client = runtime.block_on(async {
            let mut options = mongodb::options::ClientOptions::parse(&config.uri).await.map_err(MongoError::Uri)?;
            if options.server_selection_timeout.is_none() {
                options.server_selection_timeout = Some(Duration::from_secs(5));
            }
            options.app_name.get_or_insert_with(|| "livegrid".into());
            Client::with_options(options).map_err(MongoError::Uri)
        })?;
        let checkpoint = Checkpoint::new(&config.checkpoint);
        let token = checkpoint.load()?;
        let snapshots = Arc::new(MongoSnapshots { runtime: runtime.clone(), client: client.clone() });
        let mut source = MongoSource {
            runtime,
            client,
            config,
            stream: None,
            checkpoint,
            saved: true,
            token,
            last_save: Instant::now(),
            previous: Position::ZERO,
            held: None,
            snapshots,
        };
        match source.reopen() {
            Err(MongoError::HistoryLost { .. }) => {
                // At start no subscription exists yet: every result will be read from MongoDB
                // anew, so nothing before the present is needed. Start there.
                tracing::warn!(
                    checkpoint = %source.checkpoint.path.display(),
                    "the checkpointed resume token fell off the oplog; following the change stream from the present"
                );
                metrics::counter!("livegrid_mongodb_history_lost").increment(1);
                source.token = None;
                source.reopen()?;
            }
            other => other?,
        }
        Ok(source)
    }

    /// Opens the stream after the last token (or at the present).
    fn reopen(&mut self) -> Result<(), MongoError> {
        self.stream = None;
        let (client, watch, token) = (self.client.clone(), self.config.watch.clone(), self.token.clone());
        let stream = self.runtime.block_on(async move {
            let pipeline = match &watch {
                Watch::Deployment => Vec::new(),
                Watch::Only(names) => {
                    vec![doc! { "$match": { "$or": names.iter().map(|name| match name.split_once('.') {
                        Some((db, coll)) => Bson::Document(doc! { "ns.db": db, "ns.coll": coll }),
                        None => Bson::Document(doc! { "ns.db": name }),
                    }).collect::<Vec<_>>() } }]
                }
            };
            client
                .watch()
                .pipeline(pipeline)
                .full_document(FullDocumentType::UpdateLookup)
                .max_await_time(Duration::from_millis(50))
                .resume_after(token)
                .await
        });
        match stream {
            Ok(stream) => {
                self.stream = Some(stream.with_type::<Document>());
                Ok(())
            }
            Err(e) if history_lost(&e) => {
                Err(MongoError::HistoryLost { path: self.checkpoint.path.display().to_string() })
            }
            Err(source) => Err(MongoError::Driver { context: "opening the change stream".into(), source }),
        }
    }

    /// Reopens after a failure, with backoff.
    fn recover(&mut self, failure: mongodb::error::Error) -> Result<(), MongoError> {
        if history_lost(&failure) {
            return Err(MongoError::HistoryLost { path: self.checkpoint.path.display().to_string() });
        }
        tracing::warn!(error = %failure, "mongodb change stream failed; resuming from the last token");
        metrics::counter!("livegrid_mongodb_stream_retries").increment(1);
        let mut backoff = RETRY_BACKOFF.0;
        let mut last = MongoError::Driver { context: "reading the change stream".into(), source: failure };
        for _ in 0..RETRY_ATTEMPTS {
            match self.reopen() {
                Ok(()) => return Ok(()),
                Err(e @ MongoError::HistoryLost { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "reopening the mongodb change stream failed; retrying");
                    last = e;
                }
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(RETRY_BACKOFF.1);
        }
        Err(last)
    }

    /// Writes the token of what was handed out, at most every [`CHECKPOINT_EVERY`].
    fn checkpoint_if_due(&mut self, force: bool) -> Result<(), MongoError> {
        if self.saved || !(force || self.last_save.elapsed() >= CHECKPOINT_EVERY) {
            return Ok(());
        }
        if let Some(token) = &self.token {
            self.checkpoint.save(token)?;
        }
        self.saved = true;
        self.last_save = Instant::now();
        Ok(())
    }

    /// Reads up to `max` events (more to finish a cluster time), waiting up to `wait` for the
    /// first.
    fn read(&mut self, max: usize, wait: Duration) -> Result<Vec<ChangeEvent>, MongoError> {
        let mut events: Vec<ChangeEvent> = self.held.take().into_iter().collect();
        let deadline = Instant::now() + wait;
        loop {
            let Some(stream) = self.stream.as_mut() else {
                self.reopen()?;
                continue;
            };
            let next = self.runtime.block_on(stream.next_if_any());
            match next {
                Ok(Some(raw)) => {
                    let token = stream.resume_token();
                    let line = 0;
                    let parsed = change_stream_event::parse_document(&raw, line, self.previous, |_, _| None)
                        .map_err(|source| MongoError::Event { token: describe(&raw), source })?;
                    match parsed {
                        Parsed::Write(event) => {
                            let same_time =
                                events.last().is_some_and(|last| last.position.time() == event.position.time());
                            if events.len() >= max && !same_time {
                                // The batch is full and this event starts another cluster time.
                                self.previous = event.position;
                                self.held = Some(event);
                                self.token = token;
                                self.saved = false;
                                return Ok(events);
                            }
                            self.previous = event.position;
                            events.push(event);
                        }
                        Parsed::Skipped(kind) => self.skipped(&kind, &raw),
                    }
                    self.token = token;
                    self.saved = false;
                }
                Ok(None) => {
                    if let Some(token) = stream.resume_token()
                        && events.is_empty()
                    {
                        // Nothing new: the stream's position still moves on.
                        self.token = Some(token);
                        self.saved = false;
                    }
                    if !events.is_empty() || Instant::now() >= deadline {
                        return Ok(events);
                    }
                }
                Err(failure) => {
                    self.recover(failure)?;
                    if !events.is_empty() {
                        return Ok(events);
                    }
                }
            }
        }
    }

    /// An event without a document change: collection or database gone, renamed, stream
    /// invalidated. Subscriptions on those namespaces see the writes (deletes) MongoDB sends
    /// before them; the event itself is logged.
    fn skipped(&mut self, kind: &str, raw: &Document) {
        tracing::warn!(operation = kind, ns = ?raw.get("ns"), "mongodb change event without document changes");
        metrics::counter!("livegrid_mongodb_skipped_events", "operation" => kind.to_string()).increment(1);
        if kind == "invalidate" {
            self.stream = None;
        }
    }
}

impl Source for MongoSource {
    fn name(&self) -> &'static str {
        "mongodb"
    }

    fn snapshots(&self) -> Arc<dyn SnapshotSource> {
        self.snapshots.clone()
    }

    fn pull(&mut self, max: usize, wait: Duration) -> Result<Pulled, SourceError> {
        // What the previous pull returned has been handed to the engine by now.
        self.checkpoint_if_due(false).map_err(SourceError::from)?;
        let events = self.read(max.max(1), wait).map_err(SourceError::from)?;
        if let Some(last) = events.last() {
            metrics::counter!("livegrid_mongodb_events").increment(events.len() as u64);
            let (t, _) = last.position.cluster_time();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            metrics::gauge!("livegrid_mongodb_lag_seconds").set(now.saturating_sub(u64::from(t)) as f64);
        }
        Ok(if events.is_empty() { Pulled::Idle } else { Pulled::Events(events) })
    }
}

impl Drop for MongoSource {
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint_if_due(true) {
            tracing::error!(error = %e, "saving the mongodb resume token at shutdown");
        }
    }
}

impl From<MongoError> for SourceError {
    fn from(error: MongoError) -> Self {
        SourceError::Mongo(Box::new(error))
    }
}

/// MongoDB's `ChangeStreamHistoryLost`.
const HISTORY_LOST: i32 = 286;

fn history_lost(error: &mongodb::error::Error) -> bool {
    matches!(&*error.kind, mongodb::error::ErrorKind::Command(command) if command.code == HISTORY_LOST)
}

fn describe(raw: &Document) -> String {
    raw.get("_id").map_or_else(|| "none".into(), |id| id.to_string())
}

/// Snapshot reads with `find` in a snapshot session.
pub struct MongoSnapshots {
    runtime: Arc<tokio::runtime::Runtime>,
    client: Client,
}

impl SnapshotSource for MongoSnapshots {
    fn read(&self, ns: &str, spec: &QuerySpec, _query: &Query, k: Option<usize>) -> Result<Snapshot, SnapshotError> {
        let (db, coll) = ns.split_once('.').ok_or_else(|| SnapshotError::new(BadNamespace(ns.to_string())))?;
        let collection = self.client.database(db).collection::<Document>(coll);
        let filter = spec.filter.clone();
        // Without a sort, windows are in `_id` order (the engine's rule).
        let sort = spec.sort.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| doc! { "_id": 1 });
        self.runtime.block_on(async {
            let mut session = self.client.start_session().snapshot(true).await.map_err(SnapshotError::new)?;
            let mut find = collection.find(filter).sort(sort).session(&mut session);
            if let Some(k) = k {
                find = find.limit(i64::try_from(k).unwrap_or(i64::MAX));
            }
            let mut cursor = find.await.map_err(SnapshotError::new)?;
            let docs: Vec<Document> = cursor.stream(&mut session).try_collect().await.map_err(SnapshotError::new)?;
            let Timestamp { time, increment } =
                session.snapshot_time().ok_or_else(|| SnapshotError::new(NoClusterTime(ns.to_string())))?;
            let complete = k.is_none_or(|k| docs.len() < k);
            // Every event of the read's cluster time is in it: the position is that time with
            // its largest order.
            Ok(Snapshot { docs, position: Position::from_cluster_time(time, increment, u32::MAX), complete })
        })
    }
}

/// A namespace without a database part.
#[derive(Debug, thiserror::Error)]
#[error("namespace {0:?} is not db.collection")]
struct BadNamespace(String);

/// MongoDB answered a snapshot read without its cluster time.
#[derive(Debug, thiserror::Error)]
#[error("the snapshot read of {0} came back without atClusterTime")]
struct NoClusterTime(String);

/// Where the resume token of a data directory lives.
pub fn checkpoint_path(data: &Path) -> PathBuf {
    data.join("mongodb-resume-token.bson")
}
