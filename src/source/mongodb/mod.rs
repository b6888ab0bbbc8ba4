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
//!   subscriptions are live, changes may have been missed: the stream goes on from the
//!   present and every subscription ends with a `resubscribe` error, so that clients read
//!   their results again rather than keep results that silently diverge. A dropped or
//!   renamed collection or database (MongoDB sends no deletes for its documents) ends the
//!   subscriptions on it the same way.
//!
//! The driver is asynchronous; the source owns a small runtime of its own, driven by the
//! pump thread (pulls) and the engine's re-read threads (snapshots), never by the server's.

pub mod checkpoint;
pub mod snapshot;
pub mod stream;
pub mod writes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::Document;
use livegrid_engine::{ChangeEvent, SnapshotSource};
use livegrid_protocol::Position;
use mongodb::change_stream::event::ResumeToken;

pub use checkpoint::{Checkpoint, checkpoint_path};
pub use snapshot::MongoSnapshots;
pub use stream::{FullDocument, StreamReader};
pub use writes::{MongoWriteError, MongoWrites};

use crate::source::change_stream_event::{self, ChangeEventError, Parsed};
use crate::source::{Pulled, Source, SourceError};

/// How often at most the resume token is written to disk.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

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
    /// Skip change events that cannot be decoded (each is logged with its resume token and
    /// counted) instead of stopping the source.
    pub skip_undecodable: bool,
    /// Where update events' documents come from.
    pub full_document: FullDocument,
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
        "mongodb: the change stream's history is lost (the resume token fell off the oplog): changes since then cannot be replayed, so live results can no longer be kept exact; restart livegrid to read every result again"
    )]
    HistoryLost,
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

/// The MongoDB change stream as a [`Source`].
pub struct MongoSource {
    reader: StreamReader,
    checkpoint: Checkpoint,
    /// The token after the last event handed out, and whether it is on disk.
    token: Option<ResumeToken>,
    saved: bool,
    last_save: Instant,
    previous: Position,
    /// An event read ahead that belongs to the next pull, with the token after it.
    held: Option<(ChangeEvent, Option<ResumeToken>)>,
    snapshots: Arc<MongoSnapshots>,
    skip_undecodable: bool,
    /// Changes that may have been missed, to report once the events before them are out.
    lost: Option<(Option<Vec<String>>, String)>,
}

impl MongoSource {
    /// Connects and opens the stream after the checkpoint (or at the present). Errors are
    /// clear and come quickly (see [`StreamReader::connect`]).
    pub fn open(config: MongoConfig) -> Result<MongoSource, MongoError> {
        let mut reader = StreamReader::connect(&config.uri, config.watch.clone())?;
        reader.set_full_document(config.full_document);
        let checkpoint = Checkpoint::new(&config.checkpoint);
        let token = checkpoint.load()?;
        match reader.open(token.clone()) {
            Err(MongoError::HistoryLost) => {
                // At start no subscription exists yet: every result will be read from MongoDB
                // anew, so nothing before the present is needed. Start there.
                tracing::warn!(
                    checkpoint = %config.checkpoint.display(),
                    "the checkpointed resume token fell off the oplog; following the change stream from the present"
                );
                metrics::counter!("livegrid_mongodb_history_lost").increment(1);
                reader.open(None)?;
            }
            other => other?,
        }
        let (runtime, client) = reader.driver();
        Ok(MongoSource {
            reader,
            checkpoint,
            token,
            saved: true,
            last_save: Instant::now(),
            previous: Position::ZERO,
            held: None,
            snapshots: Arc::new(MongoSnapshots { runtime, client }),
            skip_undecodable: config.skip_undecodable,
            lost: None,
        })
    }

    /// Writes and reads for the REST data API, on this source's connection.
    pub fn writes(&self) -> Arc<MongoWrites> {
        let (runtime, client) = self.reader.driver();
        Arc::new(MongoWrites { runtime, client })
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
        let mut events = Vec::new();
        // The token after the last event handed out by this pull.
        let mut handed = None;
        if let Some((event, token)) = self.held.take() {
            events.push(event);
            handed = token;
        }
        let deadline = Instant::now() + wait;
        loop {
            let next = match self.reader.next_event() {
                Err(MongoError::HistoryLost) => {
                    // Changes since the last token cannot be replayed: follow the stream from
                    // the present, and have every subscription read its result again.
                    tracing::error!("mongodb change stream history lost; following it from the present");
                    metrics::counter!("livegrid_mongodb_history_lost").increment(1);
                    self.reader.open(None)?;
                    self.lost = Some((None, "livegrid lost track of MongoDB's change stream (its history was lost): changes may have been missed".into()));
                    break;
                }
                other => other?,
            };
            match next {
                Some(raw) => {
                    let token = self.reader.token().cloned();
                    let parsed = match change_stream_event::parse_document(&raw, 0, self.previous, |_, _| None) {
                        Ok(parsed) => parsed,
                        Err(source) => {
                            let error = MongoError::Event { token: describe(&raw), source };
                            if !self.skip_undecodable {
                                return Err(error);
                            }
                            // Skipped on request: results may miss this write.
                            tracing::error!(error = %error, "skipping an undecodable mongodb change event");
                            metrics::counter!("livegrid_mongodb_undecodable_skipped").increment(1);
                            handed = token;
                            continue;
                        }
                    };
                    match parsed {
                        Parsed::Write(event) => {
                            self.previous = event.position;
                            let same_time =
                                events.last().is_some_and(|last| last.position.time() == event.position.time());
                            if events.len() >= max && !same_time {
                                // The batch is full and this event starts another cluster time.
                                self.held = Some((event, token));
                                break;
                            }
                            events.push(event);
                        }
                        Parsed::Skipped(kind) => self.skipped(&kind, &raw),
                    }
                    handed = token;
                    if self.lost.is_some() {
                        // What came before goes out first; the loss is reported next.
                        break;
                    }
                }
                None => {
                    // Nothing more for now: the stream's position covers what was read.
                    if let Some(token) = self.reader.token() {
                        handed = Some(token.clone());
                    }
                    if !events.is_empty() || Instant::now() >= deadline {
                        break;
                    }
                }
            }
        }
        if handed.is_some() {
            self.token = handed;
            self.saved = false;
        }
        Ok(events)
    }

    /// An event without a document change: collection or database gone, renamed, stream
    /// invalidated. Subscriptions on those namespaces see the writes (deletes) MongoDB sends
    /// before them; the event itself is logged.
    fn skipped(&mut self, kind: &str, raw: &Document) {
        tracing::warn!(operation = kind, ns = ?raw.get("ns"), "mongodb change event without document changes");
        metrics::counter!("livegrid_mongodb_skipped_events", "operation" => kind.to_string()).increment(1);
        let ns = |field: &str| -> Option<(String, Option<String>)> {
            let ns = raw.get_document(field).ok()?;
            Some((ns.get_str("db").ok()?.to_string(), ns.get_str("coll").ok().map(str::to_string)))
        };
        let name = |(db, coll): (String, Option<String>)| coll.map_or(db.clone(), |c| format!("{db}.{c}"));
        match kind {
            "invalidate" => self.reader.invalidate(),
            // No delete events precede these: results on those namespaces must be read again.
            "drop" | "dropDatabase" => {
                if let Some(dropped) = ns("ns").map(name) {
                    let what = if kind == "drop" { "collection" } else { "database" };
                    self.lost = Some((Some(vec![dropped.clone()]), format!("{what} {dropped} was dropped")));
                }
            }
            "rename" => {
                if let (Some(from), Some(to)) = (ns("ns").map(name), ns("to").map(name)) {
                    self.lost =
                        Some((Some(vec![from.clone(), to.clone()]), format!("collection {from} was renamed to {to}")));
                }
            }
            _ => {}
        }
    }
}

/// MongoDB without its change stream, for a cluster process that does not feed the grid
/// (process 0 tails the stream for the whole deployment): snapshot reads, at cluster times
/// that compare with the stream's positions on every process, and the REST data API's writes.
/// Fails with a clear error when the deployment cannot be reached within 5 s.
pub fn connect_reader(uri: &str) -> Result<(Arc<MongoSnapshots>, Arc<MongoWrites>), MongoError> {
    let (runtime, client) = stream::connect_driver(uri)?;
    runtime
        .block_on(async { client.database("admin").run_command(bson::doc! {"ping": 1}).await })
        .map_err(|source| MongoError::Driver { context: "connecting".into(), source })?;
    let writes = Arc::new(MongoWrites { runtime: runtime.clone(), client: client.clone() });
    Ok((Arc::new(MongoSnapshots { runtime, client }), writes))
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
        if self.held.is_none()
            && let Some((namespaces, reason)) = self.lost.take()
        {
            return Ok(Pulled::Lost { namespaces, reason });
        }
        let events = self.read(max.max(1), wait).map_err(SourceError::from)?;
        if events.is_empty()
            && let Some((namespaces, reason)) = self.lost.take()
        {
            return Ok(Pulled::Lost { namespaces, reason });
        }
        Ok(if events.is_empty() { Pulled::Idle } else { Pulled::Events(events) })
    }

    fn event_seconds(&self, position: Position) -> Option<u64> {
        Some(u64::from(position.cluster_time().0))
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

fn describe(raw: &Document) -> String {
    raw.get("_id").map_or_else(|| "none".into(), |id| id.to_string())
}
