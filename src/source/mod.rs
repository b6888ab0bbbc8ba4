//! Sources of change events: where writes come from and how they become the engine's
//! [`ChangeEvent`]s. Every source sits behind one trait, [`Source`]: it yields events in
//! [`Position`](livegrid_protocol::Position) order and answers snapshot reads at a known
//! position. The embedded store ([`store::StoreSource`]) and recorded change streams
//! ([`replay::ReplaySource`]) are its implementations; MongoDB's change stream (`mongodb/`).
//!
//! A [`pump`] thread pulls batches from the source and submits them to the engine. Pulling is
//! the backpressure: while the engine is full, `submit` waits and the source is not read, so
//! the store's committer (and with it every writer) waits, and a replay file is not parsed
//! further.

pub mod change_stream_event;
pub mod document_path;
pub mod mongodb;
pub mod namespace;
pub mod pump;
pub mod replay;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use livegrid_engine::{ChangeEvent, SnapshotSource};
use livegrid_protocol::Position;

/// What one pull from a source gave.
#[derive(Debug)]
pub enum Pulled {
    /// Events, in position order, after every event pulled before.
    Events(Vec<ChangeEvent>),
    /// Nothing arrived within the wait; the source goes on.
    Idle,
    /// The source has ended (the end of a replay file, a closed store).
    Ended,
    /// Changes to some namespaces may have been missed (MongoDB's history was lost, a
    /// collection was dropped or renamed): their subscriptions must end, and their clients
    /// subscribe again for fresh results. The source goes on.
    Lost {
        /// The namespaces concerned: `db` or `db.coll` each; `None` for all.
        namespaces: Option<Vec<String>>,
        /// Why, for the clients.
        reason: String,
    },
}

/// Whether `ns` (`db.coll`) falls under one of `scopes` (`db` or `db.coll` each).
pub fn in_scope(ns: &str, scopes: &[String]) -> bool {
    scopes.iter().any(|scope| ns == scope || ns.split_once('.').is_some_and(|(db, _)| db == scope))
}

/// Where change events come from.
pub trait Source: Send {
    /// A short name for logs and metrics: `store`, `replay`, `mongodb`.
    fn name(&self) -> &'static str;

    /// Snapshot reads at a known position, for initial results and window re-reads. They run
    /// on the engine's threads, concurrently with pulls.
    fn snapshots(&self) -> Arc<dyn SnapshotSource>;

    /// The next events: about `max` of them (a store commit is never split), waiting up to
    /// `wait` for the first.
    fn pull(&mut self, max: usize, wait: Duration) -> Result<Pulled, SourceError>;

    /// When the write at `position` happened, in seconds since the Unix epoch, if positions
    /// carry it (MongoDB cluster times do): the source's lag is now minus this.
    fn event_seconds(&self, _position: Position) -> Option<u64> {
        None
    }
}

/// What the pump reports about its source (on `/healthz` and as metrics).
#[derive(Debug, Default)]
pub struct SourceStats {
    events: AtomicU64,
    /// Events in the last whole second, and when that second began (ms since the pump started).
    rate: AtomicU64,
    /// The last event's time in seconds since the epoch (0: unknown).
    last_event_seconds: AtomicU64,
}

impl SourceStats {
    /// Events pulled so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Events per second over the last whole second.
    pub fn events_per_sec(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Seconds between the last event's write and now, if the source knows when it happened.
    pub fn lag_seconds(&self) -> Option<u64> {
        let last = self.last_event_seconds.load(Ordering::Relaxed);
        (last > 0).then(|| unix_seconds().saturating_sub(last))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A source failed; the events it gave before stay valid.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A recorded change event is malformed.
    #[error("{path}:{line}: {source}")]
    Event {
        /// The file.
        path: String,
        /// Its line.
        line: u64,
        /// The cause.
        #[source]
        source: change_stream_event::ChangeEventError,
    },
    /// The MongoDB source failed (see the cause).
    #[error(transparent)]
    Mongo(Box<self::mongodb::MongoError>),
}
