//! The embedded document store: livegrid's default source of writes, durable on disk in a
//! redb database.
//!
//! Documents live in one table keyed by namespace and `_id`; a second table holds the
//! position of the last write. Every write request (one document, or a bulk batch) is atomic:
//! it either applies whole, taking the next positions, or changes nothing. Reads run on redb's
//! MVCC snapshots, so a snapshot read sees exactly the writes up to the position it reports
//! (with periodic durability that includes committed writes not yet on disk, which a crash
//! can roll back; deltas, by contrast, only ever announce durable writes).
//!
//! # Durability and group commit
//! Writes go through one queue, bounded in requests and in bytes (256 MiB of documents), to the
//! committer thread ([`commit`]), which applies
//! every request waiting in the queue in one redb transaction and one fsync, then answers
//! each. With [`Durability::Durable`] (the default) a write is answered only once it is on
//! disk: concurrent writers share the fsync, so durability costs latency, not throughput.
//! [`Durability::Periodic`] (opt-in) answers at once and makes writes durable at the next
//! flush, at most one interval later: a crash loses at most that interval of acknowledged
//! writes, never part of one. In both modes the listener (the engine) receives a write only
//! once it is durable, so no delta is ever sent for a write that a crash rolls back, and
//! positions are never reused after a restart (a reservation on disk stays ahead of every
//! position handed out).
//!
//! # Limits
//! MongoDB's: a document is at most 16 MiB of BSON and nests at most 100 levels
//! ([`limits`]); update paths have at most 100 components and cannot pad an array past
//! 1,500,000 elements ([`update`]). Requests are checked before they reach the committer where
//! possible, and stored bytes are checked before they are decoded.
//!
//! # Guards
//! A write request may carry a [`Guard`]: a filter every document it replaces, updates or
//! deletes must match, checked by the committer inside the transaction that writes it (so
//! nothing can change the document between the check and the write). The REST API uses it
//! for documents' `_acl.write`.
//!
//! # Ids
//! `_id` may be any BSON value except an array; a missing `_id` gets a new ObjectId. A URL
//! path segment names the first of these that exists: an ObjectId (24 hexadecimal digits), a
//! string, an integer (decimal digits); when none exists, an ObjectId for 24 hexadecimal
//! digits and a string otherwise.

mod commit;
pub mod limits;
pub mod source;
pub mod update;

use std::collections::{BTreeSet, BinaryHeap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::{Bson, Document, oid::ObjectId};
use livegrid_engine::{ChangeEvent, Snapshot, SnapshotError, SnapshotSource};
use livegrid_matcher::{IndexPlan, Query, QuerySpec, SortKey};
use livegrid_protocol::Position;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::health::Health;
pub use crate::source::namespace::{self, check_namespace};
pub use source::StoreSource;

const DOCS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("docs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const POSITION: &str = "position";
/// Positions up to this one may have been handed out; a restart continues above it.
const RESERVED: &str = "reserved";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No document has this id.
    #[error("no document with _id {0} in {1}")]
    NotFound(String, String),
    /// A document with this id exists already.
    #[error("a document with _id {0} exists in {1}")]
    Duplicate(String, String),
    /// The document or update is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The document is outside MongoDB's size or nesting limits.
    #[error(transparent)]
    Limit(#[from] limits::LimitError),
    /// The update is malformed or cannot apply.
    #[error(transparent)]
    Update(#[from] update::UpdateError),
    /// The namespace is not `db.collection` with valid names.
    #[error(transparent)]
    Namespace(#[from] namespace::NamespaceError),
    /// The database failed.
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    /// The store cannot take writes: it is closing, or a commit failed and it stopped.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store is too far behind (its queue stayed full): nothing was written; retry later.
    #[error("the store is busy: no room in its write queue after {waited:?}; retry later")]
    Busy {
        /// How long the write waited.
        waited: Duration,
    },
    /// Stored bytes cannot be read back (written by something else, or damaged).
    #[error("stored document cannot be read: {0}")]
    Corrupt(limits::LimitError),
    /// Another process holds the data folder's database.
    #[error("the data folder {} is in use by another livegrid instance (its database is locked): stop that one or choose another --data folder", .0.display())]
    InUse(std::path::PathBuf),
    /// The document exists but does not match the request's [`Guard`]: nothing was written.
    #[error("the document with _id {0} in {1} does not admit this write")]
    Refused(String, String),
}

/// A condition on the documents a request changes (see the module docs).
#[derive(Debug, Clone)]
pub struct Guard {
    filter: Document,
    compiled: Arc<livegrid_matcher::Filter>,
}

impl Guard {
    /// A guard admitting the documents that match `filter` (MongoDB query language).
    pub fn new(filter: Document) -> Result<Guard, StoreError> {
        let compiled =
            livegrid_matcher::Filter::parse(&filter).map_err(|e| StoreError::Invalid(format!("write guard: {e}")))?;
        Ok(Guard { filter, compiled: Arc::new(compiled) })
    }

    /// The filter, to send to a database that checks it itself.
    pub fn filter(&self) -> &Document {
        &self.filter
    }

    /// Whether `doc` may be changed.
    pub fn admits(&self, doc: &Document) -> bool {
        self.compiled.matches(doc)
    }
}

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert a new document.
    Insert(Document),
    /// Replace (or create) the document with this id.
    Replace(Bson, Document),
    /// Apply update operators to the document with this id.
    Update(Bson, Document),
    /// Delete the document with this id.
    Delete(Bson),
}

impl Write {
    /// Checks what can be checked before the write is queued: ids, sizes, nesting, update
    /// paths. The committer checks the rest (existence, the updated document's limits).
    /// Returns the request's size in bytes of BSON (what it holds while queued).
    fn precheck(&self) -> Result<usize, StoreError> {
        Ok(match self {
            Write::Insert(doc) => {
                if matches!(doc.get("_id"), Some(Bson::Array(_))) {
                    return Err(StoreError::Invalid("_id cannot be an array".into()));
                }
                limits::encode_checked(doc)?.len()
            }
            Write::Replace(id, doc) => {
                if matches!(id, Bson::Array(_)) {
                    return Err(StoreError::Invalid("_id cannot be an array".into()));
                }
                if update::is_operator_update(doc) {
                    return Err(StoreError::Invalid("a replacement document cannot contain update operators".into()));
                }
                limits::encode_checked(doc)?.len()
            }
            Write::Update(_, changes) => {
                if update::is_operator_update(changes) {
                    update::validate(changes)?;
                    changes.to_vec().map(|b| b.len()).unwrap_or(0)
                } else {
                    limits::encode_checked(changes)?.len()
                }
            }
            Write::Delete(_) => 64,
        })
    }
}

type Listener = Box<dyn Fn(Vec<ChangeEvent>) + Send + Sync>;

/// When commits reach the disk (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Before each write is answered, concurrent writes sharing one fsync (the default).
    #[default]
    Durable,
    /// At most this long after each write is answered, and on close.
    Periodic(Duration),
}

impl std::str::FromStr for Durability {
    type Err = String;

    /// `durable` (or its old name `immediate`), or `periodic` / `periodic:<milliseconds>`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "durable" || s == "immediate" => Ok(Durability::Durable),
            None if s == "periodic" => Ok(Durability::Periodic(Duration::from_millis(100))),
            Some(("periodic", ms)) => ms
                .parse::<u64>()
                .ok()
                .filter(|ms| (1..=60_000).contains(ms))
                .map(|ms| Durability::Periodic(Duration::from_millis(ms)))
                .ok_or_else(|| format!("bad flush interval {ms:?}: 1 to 60000 milliseconds")),
            _ => Err(format!("durability must be durable or periodic[:ms], found {s:?}")),
        }
    }
}

/// How a store runs.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// When commits reach the disk.
    pub durability: Durability,
    /// Write requests that may wait for the committer; writers wait beyond it.
    pub queue: usize,
    /// Write requests committed together at most.
    pub max_group: usize,
    /// How long a write may wait for room in the queue before it is refused (503, retry).
    pub queue_deadline: Duration,
    /// Where a failed commit is reported.
    pub health: Arc<Health>,
    /// Bytes of database pages redb keeps in memory (its read cache and write buffer).
    pub cache_bytes: usize,
}

/// The default for [`StoreConfig::cache_bytes`]: 256 MiB (redb's own default is 1 GiB, which
/// a busy store fills within minutes).
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::default(),
            queue: 4096,
            max_group: 1024,
            queue_deadline: Duration::from_secs(5),
            health: Arc::new(Health::new()),
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// The store.
pub struct Store {
    db: Arc<redb::Database>,
    listener: Arc<Mutex<Option<Listener>>>,
    jobs: Mutex<Option<mpsc::Sender<commit::Job>>>,
    committer: Mutex<Option<commit::Handle>>,
    /// Snapshot reads still to fail (fault injection for tests).
    failing_reads: std::sync::atomic::AtomicU64,
    /// Room, in KiB, for the documents of queued write requests.
    queue_bytes: tokio::sync::Semaphore,
    /// How long a write may wait to enter the queue before it is refused as busy.
    queue_deadline: std::time::Duration,
}

/// KiB of documents that queued write requests may hold together.
const QUEUE_KIB: u32 = 256 * 1024;

impl Store {
    /// Opens (or creates) the store in `dir` with the default configuration.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, StoreConfig::default())
    }

    /// Opens (or creates) the store in `dir`.
    pub fn open_with(dir: &Path, config: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
        let db =
            redb::Builder::new().set_cache_size(config.cache_bytes).create(dir.join("livegrid.redb")).map_err(|e| {
                match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(dir.to_path_buf()),
                    other => StoreError::Storage(other.into()),
                }
            })?;
        let db = Arc::new(db);
        let position = recover_position(&db)?;
        let listener: Arc<Mutex<Option<Listener>>> = Arc::new(Mutex::new(None));
        let (jobs, handle) = commit::start(db.clone(), listener.clone(), position, &config)?;
        Ok(Store {
            db,
            listener,
            jobs: Mutex::new(Some(jobs)),
            committer: Mutex::new(Some(handle)),
            failing_reads: std::sync::atomic::AtomicU64::new(0),
            queue_bytes: tokio::sync::Semaphore::new(QUEUE_KIB as usize),
            queue_deadline: config.queue_deadline,
        })
    }

    /// Makes the next `n` snapshot reads fail, to exercise re-read failures in tests. Never
    /// use otherwise.
    #[doc(hidden)]
    pub fn inject_read_failures(&self, n: u64) {
        self.failing_reads.store(n, std::sync::atomic::Ordering::Release);
    }

    /// Makes every committed write durable now and hands pending ones to the listener.
    pub fn sync(&self) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        self.sender()?.blocking_send(commit::Job::Sync(reply)).map_err(|_| closed())?;
        done.blocking_recv().map_err(|_| closed())?
    }

    /// Hands every durable write to `listener`, in position order, from the committer thread.
    pub fn set_listener(&self, listener: impl Fn(Vec<ChangeEvent>) + Send + Sync + 'static) {
        *self.listener.lock().expect("listener lock") = Some(Box::new(listener));
    }

    /// The position of the last committed write.
    pub fn position(&self) -> Result<Position, StoreError> {
        let txn = self.db.begin_read().map_err(redb::Error::from)?;
        let meta = txn.open_table(META).map_err(redb::Error::from)?;
        Ok(Position::new(meta.get(POSITION).map_err(redb::Error::from)?.map(|v| v.value()).unwrap_or(0)))
    }

    /// Reads one document.
    pub fn get(&self, ns: &str, id: &Bson) -> Result<Option<Document>, StoreError> {
        check_namespace(ns)?;
        let txn = self.db.begin_read().map_err(redb::Error::from)?;
        let docs = txn.open_table(DOCS).map_err(redb::Error::from)?;
        let value = docs.get(doc_key(ns, id)?.as_slice()).map_err(redb::Error::from)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Applies writes atomically: all commit, each at the next position, or none does.
    /// Answers once the writes are durable (or committed, with periodic durability). Waits
    /// while the committer's queue is full.
    /// With `large`, the request's checks (which encode its documents) run on the blocking
    /// pool rather than on the caller's async thread.
    pub async fn write_async(&self, ns: &str, writes: Vec<Write>, large: bool) -> Result<Vec<ChangeEvent>, StoreError> {
        self.write_guarded(ns, writes, None, large).await
    }

    /// [`Store::write_async`] with a [`Guard`] on the documents the writes change: if one does
    /// not match it, the request fails with [`StoreError::Refused`] and writes nothing.
    pub async fn write_guarded(
        &self,
        ns: &str,
        writes: Vec<Write>,
        guard: Option<Guard>,
        large: bool,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        let (job, done, bytes) = if large {
            let ns = ns.to_string();
            tokio::task::spawn_blocking(move || prepare(&ns, writes, guard))
                .await
                .map_err(|e| StoreError::Unavailable(format!("checking the write failed: {e}")))??
        } else {
            prepare(ns, writes, guard)?
        };
        // Queued requests hold their documents: they wait for room in a byte budget too. Only
        // entering the queue has a deadline: once queued, a write is committed or fails, and
        // its answer is awaited whatever it takes, so a 503 never hides a committed write.
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, QUEUE_KIB);
        let jobs = self.sender()?;
        let enter = async {
            let room = self.queue_bytes.acquire_many(kib).await.map_err(|_| closed())?;
            jobs.send(job).await.map_err(|_| closed())?;
            Ok::<_, StoreError>(room)
        };
        let _room = tokio::time::timeout(self.queue_deadline, enter).await.map_err(|_| {
            metrics::counter!("livegrid_store_writes_refused_busy").increment(1);
            StoreError::Busy { waited: self.queue_deadline }
        })??;
        done.await.map_err(|_| closed())?
    }

    /// [`Store::write_async`] for threads outside the async runtime.
    pub fn write(&self, ns: &str, writes: Vec<Write>) -> Result<Vec<ChangeEvent>, StoreError> {
        let (job, done, _) = prepare(ns, writes, None)?;
        self.sender()?.blocking_send(job).map_err(|_| closed())?;
        done.blocking_recv().map_err(|_| closed())?
    }

    fn sender(&self) -> Result<mpsc::Sender<commit::Job>, StoreError> {
        self.jobs.lock().expect("jobs lock").clone().ok_or_else(closed)
    }

    /// Stops taking writes, commits and flushes what was queued, hands it to the listener and
    /// waits for the committer. Idempotent; also done on drop.
    pub fn close(&self) {
        drop(self.jobs.lock().expect("jobs lock").take());
        if let Some(handle) = self.committer.lock().expect("committer lock").take() {
            handle.join();
        }
        // Every committed write was handed over: the listener (and a source's queue) ends.
        drop(self.listener.lock().expect("listener lock").take());
    }

    /// A consistent read of a query's result (see [`SnapshotSource::read`]).
    pub fn read(&self, ns: &str, query: &Query, k: Option<usize>) -> Result<Snapshot, StoreError> {
        check_namespace(ns)?;
        let injected = self.failing_reads.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |n| n.checked_sub(1),
        );
        if injected.is_ok() {
            return Err(StoreError::Unavailable("injected read failure".into()));
        }
        let txn = self.db.begin_read().map_err(redb::Error::from)?;
        let position = txn.open_table(META).map_err(redb::Error::from)?.get(POSITION).map_err(redb::Error::from)?;
        let position = position.map(|v| v.value()).unwrap_or(0);
        let docs = txn.open_table(DOCS).map_err(redb::Error::from)?;
        let prefix = namespace_prefix(ns);
        // With `k`, only the best `k` so far are kept (a bounded max-heap by sort key), so a
        // window's re-read holds skip + limit + slack documents, not the collection.
        let mut best: BinaryHeap<Ranked> = BinaryHeap::new();
        let mut all: Vec<Ranked> = Vec::new();
        let mut matched = 0usize;
        let mut consider = |doc: Document| {
            if !query.filter.matches(&doc) {
                return;
            }
            matched += 1;
            let ranked = Ranked(query.sort.key(&doc), doc);
            match k {
                None => all.push(ranked),
                Some(0) => {}
                Some(k) if best.len() < k => best.push(ranked),
                Some(_) => {
                    if best.peek().is_some_and(|worst| ranked.0 < worst.0) {
                        best.pop();
                        best.push(ranked);
                    }
                }
            }
        };
        match id_keys(ns, query) {
            // Every match has one of a few ids: read those, not the collection.
            Some(keys) => {
                for key in keys {
                    if let Some(value) = docs.get(key.as_slice()).map_err(redb::Error::from)? {
                        consider(decode(value.value())?);
                    }
                }
            }
            None => {
                for entry in docs.range(prefix.as_slice()..).map_err(redb::Error::from)? {
                    let (key, value) = entry.map_err(redb::Error::from)?;
                    if !key.value().starts_with(&prefix) {
                        break;
                    }
                    consider(decode(value.value())?);
                }
            }
        }
        let mut ranked = if k.is_some() { best.into_vec() } else { all };
        ranked.sort_by(|a, b| a.0.cmp(&b.0));
        let complete = k.is_none_or(|k| matched <= k);
        let docs = ranked.into_iter().map(|Ranked(_, d)| d).collect();
        Ok(Snapshot { docs, position: Position::new(position), complete })
    }
}

/// The keys of the only documents `query` can match in `ns`, when its filter requires `_id` to
/// equal one of a few ObjectIds, strings or integers (whose keys are exact); `None` otherwise.
fn id_keys(ns: &str, query: &Query) -> Option<BTreeSet<Vec<u8>>> {
    let IndexPlan::Equality { path, values } = query.filter.index_plan() else { return None };
    let exact = |id: &Bson| match id {
        Bson::ObjectId(_) | Bson::String(_) | Bson::Int32(_) | Bson::Int64(_) => true,
        Bson::Double(f) => f.fract() == 0.0 && f.abs() < 9.0e15,
        _ => false,
    };
    if path.as_str() != "_id" || values.len() > 1000 || !values.iter().all(exact) {
        return None;
    }
    values.iter().map(|id| doc_key(ns, id).ok()).collect()
}

/// A matching document with its sort key, ordered by the key (for the top-k heap).
struct Ranked(SortKey, Document);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

/// Where a write request's answer arrives.
type Answer = oneshot::Receiver<Result<Vec<ChangeEvent>, StoreError>>;

/// Checks a request and wraps it for the committer.
fn prepare(ns: &str, writes: Vec<Write>, guard: Option<Guard>) -> Result<(commit::Job, Answer, usize), StoreError> {
    check_namespace(ns)?;
    let mut bytes = 0usize;
    for write in &writes {
        bytes = bytes.saturating_add(write.precheck()?);
    }
    let (reply, done) = oneshot::channel();
    Ok((commit::Job::Write(commit::Request { ns: ns.to_string(), writes, guard, reply }), done, bytes))
}

/// The position to continue from: above every position a crashed run may have handed out.
fn recover_position(db: &redb::Database) -> Result<u64, StoreError> {
    let txn = db.begin_write().map_err(redb::Error::from)?;
    let position = {
        txn.open_table(DOCS).map_err(redb::Error::from)?;
        let mut meta = txn.open_table(META).map_err(redb::Error::from)?;
        let stored = meta.get(POSITION).map_err(redb::Error::from)?.map(|v| v.value()).unwrap_or(0);
        let reserved = meta.get(RESERVED).map_err(redb::Error::from)?.map(|v| v.value()).unwrap_or(0);
        let position = stored.max(reserved);
        if position != stored {
            tracing::warn!(stored, continuing_at = position, "store was not closed cleanly; positions skip ahead");
        }
        meta.insert(POSITION, position).map_err(redb::Error::from)?;
        meta.insert(RESERVED, position).map_err(redb::Error::from)?;
        position
    };
    txn.commit().map_err(redb::Error::from)?;
    Ok(position)
}

impl SnapshotSource for Store {
    fn read(&self, ns: &str, _spec: &QuerySpec, query: &Query, k: Option<usize>) -> Result<Snapshot, SnapshotError> {
        Store::read(self, ns, query, k).map_err(SnapshotError::new)
    }
}

fn namespace_prefix(ns: &str) -> Vec<u8> {
    let mut key = ns.as_bytes().to_vec();
    key.push(0);
    key
}

/// The key of a document: namespace, NUL, then the id in a form where MongoDB-equal ids
/// (`1`, `1.0`, `NumberLong(1)`) coincide.
fn doc_key(ns: &str, id: &Bson) -> Result<Vec<u8>, StoreError> {
    let mut key = namespace_prefix(ns);
    match id {
        Bson::ObjectId(oid) => {
            key.push(7);
            key.extend_from_slice(&oid.bytes());
        }
        Bson::String(s) => {
            key.push(2);
            key.extend_from_slice(s.as_bytes());
        }
        Bson::Array(_) => return Err(StoreError::Invalid("_id cannot be an array".into())),
        other => match livegrid_matcher::bson_order::number_as_f64(other) {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                key.push(1);
                key.extend_from_slice(format!("{}", f as i64).as_bytes());
            }
            _ => {
                key.push(255);
                key.extend_from_slice(livegrid_protocol::extjson::to_relaxed_json(other).to_string().as_bytes());
            }
        },
    }
    Ok(key)
}

fn decode(bytes: &[u8]) -> Result<Document, StoreError> {
    limits::decode_checked(bytes).map_err(StoreError::Corrupt)
}

/// The document with `_id` first, generating an ObjectId when it has none.
fn with_id(mut doc: Document) -> Result<Document, StoreError> {
    let id = doc.remove("_id").unwrap_or_else(|| Bson::ObjectId(ObjectId::new()));
    if matches!(id, Bson::Array(_)) {
        return Err(StoreError::Invalid("_id cannot be an array".into()));
    }
    let mut out = Document::new();
    out.insert("_id", id);
    out.extend(doc);
    Ok(out)
}

/// A replacement document for `id`: its own `_id`, if any, must be the same.
fn replacement(id: &Bson, mut doc: Document) -> Result<Document, StoreError> {
    if update::is_operator_update(&doc) {
        return Err(StoreError::Invalid("a replacement document cannot contain update operators".into()));
    }
    if let Some(own) = doc.remove("_id")
        && !livegrid_matcher::values_equal(&own, id)
    {
        return Err(StoreError::Invalid(format!(
            "_id {} does not match the document's _id {}",
            id_label(id),
            id_label(&own)
        )));
    }
    let mut out = Document::new();
    out.insert("_id", id.clone());
    out.extend(doc);
    Ok(out)
}

/// An id as it appears in messages (relaxed Extended JSON).
pub fn id_label(id: &Bson) -> String {
    livegrid_protocol::extjson::to_relaxed_json(id).to_string()
}

/// The ids a URL path segment may name, in order of preference (see the module docs).
pub fn ids_from_path(segment: &str) -> Vec<Bson> {
    let mut ids = Vec::with_capacity(3);
    if let (24, Ok(oid)) = (segment.len(), ObjectId::parse_str(segment)) {
        ids.push(Bson::ObjectId(oid));
    }
    ids.push(Bson::String(segment.to_string()));
    let canonical_integer = !segment.is_empty()
        && segment.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit())
        && (segment == "0" || !segment.trim_start_matches('-').starts_with('0'));
    if let (true, Ok(n)) = (canonical_integer, segment.parse::<i64>()) {
        ids.push(match i32::try_from(n) {
            Ok(small) => Bson::Int32(small),
            Err(_) => Bson::Int64(n),
        });
    }
    ids
}

/// The id a URL path segment names: of [`ids_from_path`], the first that `exists`, else the
/// first (the rule of every REST data API, whatever stores the documents).
pub fn resolve_path_id<E>(segment: &str, mut exists: impl FnMut(&Bson) -> Result<bool, E>) -> Result<Bson, E> {
    let candidates = ids_from_path(segment);
    for id in &candidates {
        if exists(id)? {
            return Ok(id.clone());
        }
    }
    Ok(candidates.into_iter().next().expect("a string candidate always exists"))
}

impl Store {
    /// The id a URL path segment names in `ns` (see [`resolve_path_id`]).
    pub fn resolve_id(&self, ns: &str, segment: &str) -> Result<Bson, StoreError> {
        resolve_path_id(segment, |id| Ok(self.get(ns, id)?.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;
    use livegrid_engine::ChangeOp;

    #[test]
    fn writes_are_atomic_positioned_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        store.set_listener(move |events| sink.lock().unwrap().extend(events.into_iter().map(|e| e.position.time())));
        let events =
            store.write("db.c", vec![Write::Insert(doc! {"_id": 1, "n": 1}), Write::Insert(doc! {"n": 2})]).unwrap();
        assert_eq!(events.iter().map(|e| e.position.time()).collect::<Vec<_>>(), vec![1, 2]);
        assert!(matches!(events[1].id, Bson::ObjectId(_)));
        // A failing batch changes nothing and takes no position.
        let err =
            store.write("db.c", vec![Write::Insert(doc! {"_id": 3}), Write::Insert(doc! {"_id": 1})]).unwrap_err();
        assert!(matches!(err, StoreError::Duplicate(..)), "{err}");
        assert!(store.get("db.c", &Bson::Int32(3)).unwrap().is_none());
        assert_eq!(store.position().unwrap().time(), 2);
        store.write("db.c", vec![Write::Update(Bson::Int64(1), doc! {"$inc": {"n": 5}})]).unwrap();
        assert_eq!(store.get("db.c", &Bson::Double(1.0)).unwrap(), Some(doc! {"_id": 1, "n": 6}));
        assert!(matches!(store.write("db.c", vec![Write::Delete(Bson::Int32(9))]), Err(StoreError::NotFound(..))));
        // Writes that change nothing are no-ops, as in MongoDB: no event, no position; the
        // rest of their request still applies.
        let events = store
            .write(
                "db.c",
                vec![
                    Write::Update(Bson::Int32(1), doc! {"$set": {"n": 6}}),
                    Write::Replace(Bson::Int32(1), doc! {"n": 6}),
                    Write::Update(Bson::Int32(1), doc! {"$max": {"n": 1}}),
                ],
            )
            .unwrap();
        assert!(events.is_empty());
        assert_eq!(store.position().unwrap().time(), 3);
        assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.position().unwrap().time(), 3);
        assert_eq!(store.get("db.c", &Bson::Int32(1)).unwrap(), Some(doc! {"_id": 1, "n": 6}));
    }

    fn config(durability: Durability) -> StoreConfig {
        StoreConfig { durability, ..Default::default() }
    }

    #[test]
    fn both_durabilities_persist_across_reopen() {
        for durability in [Durability::Durable, "periodic:5".parse().unwrap()] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open_with(dir.path(), config(durability)).unwrap();
            store.write("db.c", vec![Write::Insert(doc! {"_id": 1})]).unwrap();
            drop(store);
            let store = Store::open_with(dir.path(), config(durability)).unwrap();
            assert!(store.get("db.c", &Bson::Int32(1)).unwrap().is_some(), "{durability:?}");
            // A clean close continues the positions without a gap.
            assert_eq!(store.write("db.c", vec![Write::Insert(doc! {"_id": 2})]).unwrap()[0].position.time(), 2);
        }
        assert_eq!("immediate".parse::<Durability>(), Ok(Durability::Durable));
        assert!("sometimes".parse::<Durability>().is_err());
        assert!("periodic:0".parse::<Durability>().is_err());
    }

    #[test]
    fn concurrent_writers_share_commits_and_failures_stay_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        store.set_listener(move |events| sink.lock().unwrap().extend(events.into_iter().map(|e| e.position.time())));
        store.write("db.c", vec![Write::Insert(doc! {"_id": "taken"})]).unwrap();
        let writers: Vec<_> = (0..16)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut ok = 0;
                    for i in 0..50 {
                        // Every fifth request of each writer fails and must leave no trace.
                        let write = if i % 5 == 0 {
                            vec![Write::Insert(doc! {"_id": format!("{t}-{i}")}), Write::Insert(doc! {"_id": "taken"})]
                        } else {
                            vec![Write::Insert(doc! {"_id": format!("{t}-{i}")})]
                        };
                        if store.write("db.c", write).is_ok() {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let ok: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
        assert_eq!(ok, 16 * 40);
        assert!(store.get("db.c", &Bson::String("3-0".into())).unwrap().is_none());
        assert!(store.get("db.c", &Bson::String("3-1".into())).unwrap().is_some());
        // Positions are contiguous, each handed to the listener once, in order.
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, (1..=641).collect::<Vec<u64>>());
        assert_eq!(store.position().unwrap().time(), 641);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guarded_writes_only_change_documents_the_guard_admits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let history = Arc::new(Mutex::new(Vec::new()));
        let sink = history.clone();
        store.set_listener(move |events| sink.lock().unwrap().extend(events));
        let first = vec![Write::Insert(doc! {"_id": 1, "owner": "a"}), Write::Insert(doc! {"_id": 2, "owner": "b"})];
        store.write_async("db.c", first, false).await.unwrap();
        let guard = || Some(Guard::new(doc! {"owner": "a"}).unwrap());
        let write = |writes: Vec<Write>| store.write_guarded("db.c", writes, guard(), false);
        let set = |x: i32| doc! {"$set": {"x": x}};
        assert!(write(vec![Write::Update(Bson::Int32(1), set(1))]).await.is_ok());
        for refused in [
            vec![Write::Update(Bson::Int32(2), set(1))],
            vec![Write::Replace(Bson::Int32(2), doc! {"owner": "a"})],
            vec![Write::Delete(Bson::Int32(2))],
            // All or nothing: the first write is not kept.
            vec![Write::Update(Bson::Int32(1), set(2)), Write::Delete(Bson::Int32(2))],
            // A later write sees what an earlier one of the request did.
            vec![Write::Update(Bson::Int32(1), doc! {"$set": {"owner": "b"}}), Write::Update(Bson::Int32(1), set(3))],
        ] {
            assert!(matches!(write(refused).await, Err(StoreError::Refused(..))));
        }
        assert_eq!(store.get("db.c", &Bson::Int32(1)).unwrap(), Some(doc! {"_id": 1, "owner": "a", "x": 1}));
        assert_eq!(store.get("db.c", &Bson::Int32(2)).unwrap(), Some(doc! {"_id": 2, "owner": "b"}));
        // Documents that do not exist yet are not guarded; missing ones are still missing.
        assert!(write(vec![Write::Insert(doc! {"_id": 3, "owner": "b"})]).await.is_ok());
        assert!(write(vec![Write::Replace(Bson::Int32(4), doc! {"owner": "b"})]).await.is_ok());
        assert!(matches!(write(vec![Write::Delete(Bson::Int32(5))]).await, Err(StoreError::NotFound(..))));

        // The check and the write are one: while another writer flips the owner back and
        // forth, every guarded write that lands finds the owner it requires.
        let flipper = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    let owner = if i % 2 == 0 { "b" } else { "a" };
                    let update = doc! {"$set": {"owner": owner, "by": "flipper"}};
                    store.write_async("db.c", vec![Write::Update(Bson::Int32(1), update)], false).await.unwrap();
                }
            })
        };
        let mut landed = 0;
        for i in 0..200 {
            let update = doc! {"$set": {"x": i, "by": "guarded"}};
            match store.write_guarded("db.c", vec![Write::Update(Bson::Int32(1), update)], guard(), false).await {
                Ok(_) => landed += 1,
                Err(StoreError::Refused(..)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        flipper.await.unwrap();
        let history = history.lock().unwrap();
        let ones: Vec<&Document> =
            history.iter().filter(|e| e.id == Bson::Int32(1)).map(|e| &**e.doc.as_ref().unwrap()).collect();
        let guarded: Vec<usize> = (1..ones.len()).filter(|&i| ones[i].get_str("by").ok() == Some("guarded")).collect();
        assert_eq!(guarded.len(), landed);
        assert!(
            guarded.iter().all(|&i| ones[i - 1].get_str("owner").ok() == Some("a")),
            "a guarded write found owner b"
        );
    }

    #[test]
    fn periodic_durability_delivers_only_flushed_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(dir.path(), config("periodic:60000".parse().unwrap())).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        store.set_listener(move |events| sink.lock().unwrap().extend(events.into_iter().map(|e| e.position.time())));
        // The first write also reserves positions on disk, durably; later ones wait for a flush.
        store.write("db.c", vec![Write::Insert(doc! {"_id": 1})]).unwrap();
        store.write("db.c", vec![Write::Insert(doc! {"_id": 2})]).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![1], "an unflushed write reached the listener");
        store.sync().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
    }

    #[test]
    fn limits_are_enforced_before_anything_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let big = doc! {"_id": 1, "s": "x".repeat(limits::MAX_BSON_SIZE)};
        assert!(matches!(store.write("db.c", vec![Write::Insert(big)]), Err(StoreError::Limit(_))));
        store.write("db.c", vec![Write::Insert(doc! {"_id": 1, "s": "x".repeat(10 << 20), "a": []})]).unwrap();
        // An update that would grow the document past 16 MiB.
        let grow = doc! {"$set": {"t": "y".repeat(7 << 20)}};
        let err = store.write("db.c", vec![Write::Update(Bson::Int32(1), grow)]).unwrap_err();
        assert!(matches!(err, StoreError::Limit(limits::LimitError::UpdatedTooLarge { .. })), "{err}");
        // Padding past 1,500,000 elements.
        let pad = doc! {"$set": {"a.1000000000": 1}};
        let err = store.write("db.c", vec![Write::Update(Bson::Int32(1), pad)]).unwrap_err();
        assert!(matches!(err, StoreError::Update(_)), "{err}");
        // A path of 3,000 components is refused before it is queued, so nothing deep is stored.
        let deep = vec!["a"; 3_000].join(".");
        let err = store.write("db.c", vec![Write::Update(Bson::Int32(1), doc! {"$set": {deep.as_str(): 1}})]);
        assert!(matches!(err, Err(StoreError::Update(_))));
        assert_eq!(store.position().unwrap().time(), 1);
        assert_eq!(store.get("db.c", &Bson::Int32(1)).unwrap().unwrap().get_array("a").unwrap().len(), 0);
    }

    #[test]
    fn snapshot_reads_sort_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let writes = (0..10).map(|i| Write::Insert(doc! {"_id": i, "n": (i * 7) % 10})).collect();
        store.write("db.c", writes).unwrap();
        store.write("db.other", vec![Write::Insert(doc! {"_id": 1, "n": -1})]).unwrap();
        let query = Query::compile(&QuerySpec { sort: Some(doc! {"n": -1}), ..Default::default() }).unwrap();
        let snapshot = store.read("db.c", &query, Some(3)).unwrap();
        assert_eq!(snapshot.position.time(), 11);
        assert!(!snapshot.complete);
        assert_eq!(snapshot.docs.iter().map(|d| d.get_i32("n").unwrap()).collect::<Vec<_>>(), vec![9, 8, 7]);
        assert!(store.read("db.c", &query, None).unwrap().complete);
        assert!(matches!(store.write("nodot", vec![]), Err(StoreError::Namespace(_))));
    }

    #[test]
    fn reads_by_id_fetch_only_those_documents_and_agree_with_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let oid = ObjectId::new();
        let writes = vec![
            Write::Insert(doc! {"_id": 1, "n": 1}),
            Write::Insert(doc! {"_id": 2_i64, "n": 2}),
            Write::Insert(doc! {"_id": "a", "n": 3}),
            Write::Insert(doc! {"_id": oid, "n": 4}),
            Write::Insert(doc! {"_id": 1.5, "n": 5}),
        ];
        store.write("db.c", writes).unwrap();
        store.write("db.d", vec![Write::Insert(doc! {"_id": 1, "n": 9})]).unwrap();
        let read = |filter: Document| {
            let query = Query::compile(&QuerySpec { filter, ..Default::default() }).unwrap();
            let ns: Vec<i32> =
                store.read("db.c", &query, None).unwrap().docs.iter().map(|d| d.get_i32("n").unwrap()).collect();
            (id_keys("db.c", &query).is_some(), ns)
        };
        assert_eq!(read(doc! {"_id": {"$in": [1.0, 2, "a", oid, "missing"]}}), (true, vec![1, 2, 3, 4]));
        assert_eq!(read(doc! {"_id": 2, "n": {"$gt": 5}}), (true, vec![]));
        // Ids whose keys are not exact take the scan, with the same answer.
        assert_eq!(read(doc! {"_id": 1.5}), (false, vec![5]));
        assert_eq!(read(doc! {"n": {"$lt": 3}}), (false, vec![1, 2]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_that_falls_behind_refuses_writes_it_has_no_room_for() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { queue: 1, queue_deadline: Duration::from_millis(200), ..Default::default() };
        let store = Arc::new(Store::open_with(dir.path(), config).unwrap());
        // A consumer that stalls: the committer waits in it, so the queue fills up.
        let (stalled, entered) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(false)));
        let (flag, inside) = (stalled.clone(), entered.clone());
        store.set_listener(move |_| {
            inside.store(true, Ordering::Release);
            while flag.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let write = |i: i32| {
            let store = store.clone();
            tokio::spawn(async move { store.write_async("db.c", vec![Write::Insert(doc! {"_id": i})], false).await })
        };
        let first = write(0);
        while !entered.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The committer is stuck: one request fits the queue, the others find no room.
        let later: Vec<_> = (1..4).map(write).collect();
        tokio::time::sleep(Duration::from_millis(600)).await;
        stalled.store(false, Ordering::Release);
        assert!(first.await.unwrap().is_ok());
        let mut busy = 0;
        let mut written = vec![Bson::Int32(0)];
        for (i, writer) in (1..4).zip(later) {
            match writer.await.unwrap() {
                Ok(_) => written.push(Bson::Int32(i)),
                Err(StoreError::Busy { .. }) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(busy, 2, "one request waits in the queue, the other two are refused");
        // Refused writes wrote nothing; the others are all there.
        for i in 0..4 {
            let stored = store.get("db.c", &Bson::Int32(i)).unwrap().is_some();
            assert_eq!(stored, written.contains(&Bson::Int32(i)), "write {i}: stored {stored}");
        }
    }

    #[test]
    fn top_k_reads_agree_with_a_full_sort() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let writes = (0..200).map(|i| Write::Insert(doc! {"_id": i, "n": (i * 37) % 50, "odd": i % 2 == 1})).collect();
        store.write("db.c", writes).unwrap();
        let spec = QuerySpec { filter: doc! {"odd": true}, sort: Some(doc! {"n": -1}), ..Default::default() };
        let query = Query::compile(&spec).unwrap();
        let all = store.read("db.c", &query, None).unwrap();
        assert!(all.complete);
        for k in [0, 1, 7, 99, 100, 101, 500] {
            let top = store.read("db.c", &query, Some(k)).unwrap();
            let mut sorted = all.docs.clone();
            sorted.sort_by_key(|d| query.sort.key(d));
            sorted.truncate(k);
            assert_eq!(top.docs, sorted, "k = {k}");
            assert_eq!(top.complete, k >= 100, "k = {k}");
        }
    }

    #[test]
    fn replacements_keep_their_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let events = store.write("db.c", vec![Write::Replace(Bson::String("a".into()), doc! {"x": 1})]).unwrap();
        assert_eq!(events[0].op, ChangeOp::Insert);
        let events =
            store.write("db.c", vec![Write::Replace(Bson::String("a".into()), doc! {"_id": "a", "x": 2})]).unwrap();
        assert_eq!(events[0].op, ChangeOp::Replace);
        assert!(store.write("db.c", vec![Write::Replace(Bson::String("a".into()), doc! {"_id": "b"})]).is_err());
        assert!(store.write("db.c", vec![Write::Replace(Bson::String("a".into()), doc! {"$set": {"x": 1}})]).is_err());
        let oid = ObjectId::parse_str("507f1f77bcf86cd799439011").unwrap();
        assert_eq!(ids_from_path("507f1f77bcf86cd799439011")[0], Bson::ObjectId(oid));
        assert_eq!(ids_from_path("abc"), vec![Bson::String("abc".into())]);
        assert_eq!(ids_from_path("42"), vec![Bson::String("42".into()), Bson::Int32(42)]);
        assert_eq!(ids_from_path("042").len(), 1);
        store.write("db.c", vec![Write::Insert(doc! {"_id": 42})]).unwrap();
        assert_eq!(store.resolve_id("db.c", "42").unwrap(), Bson::Int32(42));
        assert_eq!(store.resolve_id("db.c", "43").unwrap(), Bson::String("43".into()));
    }
}
