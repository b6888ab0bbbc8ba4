//! The embedded document store: livegrid's default source of writes, durable on disk in a
//! redb database.
//!
//! Documents live in one table keyed by namespace and `_id`; a second table holds the
//! position of the last write. Every write (and every batch of writes) is one redb
//! transaction: it either commits whole, taking the next positions, or changes nothing.
//! Committed writes become [`ChangeEvent`]s, handed to a listener (the engine) in position
//! order while the writer lock is still held. Reads run on redb's MVCC snapshots, so a
//! snapshot read sees exactly the writes up to the position it reports.
//!
//! # Durability
//! With [`Durability::Immediate`] every commit reaches the disk before the write returns. With
//! [`Durability::Periodic`] (the default, like MongoDB's 100 ms journal commit interval) commits
//! are atomic and consistent at once and reach the disk at the next flush, at most one
//! interval later, and on close; a crash loses at most that interval of writes, never part of
//! one.
//!
//! # Ids
//! `_id` may be any BSON value except an array; a missing `_id` gets a new ObjectId. A URL
//! path segment names the first of these that exists: an ObjectId (24 hexadecimal digits), a
//! string, an integer (decimal digits); when none exists, an ObjectId for 24 hexadecimal
//! digits and a string otherwise.

pub mod update;

use std::path::Path;
use std::sync::{Arc, Mutex};

use bson::{Bson, Document, oid::ObjectId};
use livegrid_engine::{ChangeEvent, ChangeOp, Snapshot, SnapshotError, SnapshotSource};
use livegrid_matcher::{Query, SortKey};
use livegrid_protocol::Position;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

const DOCS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("docs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const POSITION: &str = "position";

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
    /// The update is malformed or cannot apply.
    #[error(transparent)]
    Update(#[from] update::UpdateError),
    /// The namespace is not `db.collection` with valid names.
    #[error("bad namespace {0:?}: {1}")]
    Namespace(String, &'static str),
    /// The database failed.
    #[error("storage: {0}")]
    Storage(String),
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Storage(e.into().to_string())
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

type Listener = Box<dyn Fn(Vec<ChangeEvent>) + Send + Sync>;

/// When commits reach the disk (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Before each write returns.
    Immediate,
    /// At most this long after each write, and on close.
    Periodic(std::time::Duration),
}

impl Default for Durability {
    fn default() -> Self {
        Durability::Periodic(std::time::Duration::from_millis(100))
    }
}

impl std::str::FromStr for Durability {
    type Err = String;

    /// `immediate`, or `periodic` / `periodic:<milliseconds>`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "immediate" => Ok(Durability::Immediate),
            None if s == "periodic" => Ok(Durability::default()),
            Some(("periodic", ms)) => ms
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(|ms| Durability::Periodic(std::time::Duration::from_millis(ms)))
                .ok_or_else(|| format!("bad flush interval {ms:?}")),
            _ => Err(format!("durability must be immediate or periodic[:ms], found {s:?}")),
        }
    }
}

/// The store.
pub struct Store {
    db: Arc<redb::Database>,
    /// Serialises writes, so that events reach the listener in position order.
    writer: Arc<Mutex<Unsynced>>,
    listener: Mutex<Option<Listener>>,
    durability: Durability,
    flusher: Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

/// Whether commits since the last flush are not on disk yet.
struct Unsynced(bool);

fn flush(db: &redb::Database, writer: &Mutex<Unsynced>) -> Result<(), StoreError> {
    let mut unsynced = writer.lock().expect("writer lock");
    if unsynced.0 {
        // An immediate commit makes every earlier commit durable.
        db.begin_write()?.commit()?;
        unsynced.0 = false;
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the store in `dir` with the default durability.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, Durability::default())
    }

    /// Opens (or creates) the store in `dir`.
    pub fn open_with(dir: &Path, durability: Durability) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Storage(format!("{}: {e}", dir.display())))?;
        let db = Arc::new(redb::Database::create(dir.join("livegrid.redb"))?);
        let txn = db.begin_write()?;
        txn.open_table(DOCS)?;
        txn.open_table(META)?;
        txn.commit()?;
        let writer = Arc::new(Mutex::new(Unsynced(false)));
        let flusher = match durability {
            Durability::Immediate => None,
            Durability::Periodic(every) => {
                let (stop, stopped) = std::sync::mpsc::channel::<()>();
                let (db, writer) = (db.clone(), writer.clone());
                let thread = std::thread::Builder::new()
                    .name("livegrid-store-flush".into())
                    .spawn(move || {
                        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                            if let Err(e) = flush(&db, &writer) {
                                tracing::error!(error = %e, "store flush failed");
                            }
                        }
                    })
                    .map_err(|e| StoreError::Storage(e.to_string()))?;
                Some((stop, thread))
            }
        };
        Ok(Store { db, writer, listener: Mutex::new(None), durability, flusher: Mutex::new(flusher) })
    }

    /// Makes every committed write durable now.
    pub fn sync(&self) -> Result<(), StoreError> {
        flush(&self.db, &self.writer)
    }

    /// Hands every committed write to `listener`, in position order.
    pub fn set_listener(&self, listener: impl Fn(Vec<ChangeEvent>) + Send + Sync + 'static) {
        *self.listener.lock().expect("listener lock") = Some(Box::new(listener));
    }

    /// The position of the last committed write.
    pub fn position(&self) -> Result<Position, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(POSITION)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Reads one document.
    pub fn get(&self, ns: &str, id: &Bson) -> Result<Option<Document>, StoreError> {
        check_namespace(ns)?;
        let txn = self.db.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let value = docs.get(doc_key(ns, id)?.as_slice())?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Applies writes atomically: all commit, each at the next position, or none does.
    pub fn write(&self, ns: &str, writes: Vec<Write>) -> Result<Vec<ChangeEvent>, StoreError> {
        check_namespace(ns)?;
        let started = std::time::Instant::now();
        let mut unsynced = self.writer.lock().expect("writer lock");
        let mut txn = self.db.begin_write()?;
        if self.durability != Durability::Immediate {
            txn.set_durability(redb::Durability::None).map_err(|e| StoreError::Storage(e.to_string()))?;
        }
        let mut events = Vec::with_capacity(writes.len());
        {
            let mut docs = txn.open_table(DOCS)?;
            let mut meta = txn.open_table(META)?;
            let mut position = meta.get(POSITION)?.map(|v| v.value()).unwrap_or(0);
            for write in writes {
                position += 1;
                let (op, id, after) = match write {
                    Write::Insert(doc) => {
                        let doc = with_id(doc)?;
                        let id = doc.get("_id").cloned().expect("with_id sets _id");
                        let key = doc_key(ns, &id)?;
                        if docs.get(key.as_slice())?.is_some() {
                            return Err(StoreError::Duplicate(id_label(&id), ns.into()));
                        }
                        docs.insert(key.as_slice(), encode(&doc)?.as_slice())?;
                        (ChangeOp::Insert, id, Some(doc))
                    }
                    Write::Replace(id, doc) => {
                        let doc = replacement(&id, doc)?;
                        let key = doc_key(ns, &id)?;
                        let existed = docs.get(key.as_slice())?.is_some();
                        docs.insert(key.as_slice(), encode(&doc)?.as_slice())?;
                        (if existed { ChangeOp::Replace } else { ChangeOp::Insert }, id, Some(doc))
                    }
                    Write::Update(id, changes) => {
                        let key = doc_key(ns, &id)?;
                        let before = match docs.get(key.as_slice())? {
                            Some(v) => decode(v.value())?,
                            None => return Err(StoreError::NotFound(id_label(&id), ns.into())),
                        };
                        let after = if update::is_operator_update(&changes) {
                            update::apply(&before, &changes)?
                        } else {
                            replacement(&id, changes)?
                        };
                        docs.insert(key.as_slice(), encode(&after)?.as_slice())?;
                        (ChangeOp::Update, id, Some(after))
                    }
                    Write::Delete(id) => {
                        let key = doc_key(ns, &id)?;
                        if docs.remove(key.as_slice())?.is_none() {
                            return Err(StoreError::NotFound(id_label(&id), ns.into()));
                        }
                        (ChangeOp::Delete, id, None)
                    }
                };
                events.push(ChangeEvent { position, ns: ns.to_string(), op, id, doc: after.map(Arc::new) });
            }
            meta.insert(POSITION, position)?;
        }
        txn.commit()?;
        unsynced.0 = self.durability != Durability::Immediate;
        metrics::histogram!("livegrid_store_write_seconds").record(started.elapsed().as_secs_f64());
        if let Some(listener) = self.listener.lock().expect("listener lock").as_ref() {
            listener(events.clone());
        }
        Ok(events)
    }

    /// A consistent read of a query's result (see [`SnapshotSource::read`]).
    pub fn read(&self, ns: &str, query: &Query, k: Option<usize>) -> Result<Snapshot, StoreError> {
        check_namespace(ns)?;
        let txn = self.db.begin_read()?;
        let position = txn.open_table(META)?.get(POSITION)?.map(|v| v.value()).unwrap_or(0);
        let docs = txn.open_table(DOCS)?;
        let prefix = namespace_prefix(ns);
        let mut matching: Vec<(SortKey, Document)> = Vec::new();
        for entry in docs.range(prefix.as_slice()..)? {
            let (key, value) = entry?;
            if !key.value().starts_with(&prefix) {
                break;
            }
            let doc = decode(value.value())?;
            if query.filter.matches(&doc) {
                matching.push((query.sort.key(&doc), doc));
            }
        }
        matching.sort_by(|a, b| a.0.cmp(&b.0));
        let complete = k.is_none_or(|k| matching.len() <= k);
        let docs = matching.into_iter().take(k.unwrap_or(usize::MAX)).map(|(_, d)| d).collect();
        Ok(Snapshot { docs, position, complete })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.flusher.get_mut().expect("flusher lock").take() {
            drop(stop);
            let _ = thread.join();
        }
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "final store flush failed");
        }
    }
}

impl SnapshotSource for Store {
    fn read(&self, ns: &str, query: &Query, k: Option<usize>) -> Result<Snapshot, SnapshotError> {
        Store::read(self, ns, query, k).map_err(|e| SnapshotError(e.to_string()))
    }
}

/// `db.collection`, each part non-empty, no NUL, `$` or slashes in the database name.
pub fn check_namespace(ns: &str) -> Result<(), StoreError> {
    let bad = |why| Err(StoreError::Namespace(ns.to_string(), why));
    let Some((db, coll)) = ns.split_once('.') else { return bad("expected db.collection") };
    if db.is_empty() || coll.is_empty() {
        return bad("database and collection names must not be empty");
    }
    if ns.contains('\0') || ns.contains('$') || db.contains(['/', '\\', ' ']) {
        return bad("names may not contain NUL, $, slashes or spaces");
    }
    Ok(())
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

fn encode(doc: &Document) -> Result<Vec<u8>, StoreError> {
    doc.to_vec().map_err(|e| StoreError::Invalid(format!("document cannot be stored: {e}")))
}

fn decode(bytes: &[u8]) -> Result<Document, StoreError> {
    Document::from_reader(bytes).map_err(|e| StoreError::Storage(format!("corrupt document: {e}")))
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

impl Store {
    /// The id a URL path segment names in `ns`: the first candidate that exists, else the
    /// first candidate.
    pub fn resolve_id(&self, ns: &str, segment: &str) -> Result<Bson, StoreError> {
        let candidates = ids_from_path(segment);
        for id in &candidates {
            if self.get(ns, id)?.is_some() {
                return Ok(id.clone());
            }
        }
        Ok(candidates.into_iter().next().expect("a string candidate always exists"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;
    use livegrid_matcher::QuerySpec;

    #[test]
    fn writes_are_atomic_positioned_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        store.set_listener(move |events| sink.lock().unwrap().extend(events.into_iter().map(|e| e.position)));
        let events =
            store.write("db.c", vec![Write::Insert(doc! {"_id": 1, "n": 1}), Write::Insert(doc! {"n": 2})]).unwrap();
        assert_eq!(events.iter().map(|e| e.position).collect::<Vec<_>>(), vec![1, 2]);
        assert!(matches!(events[1].id, Bson::ObjectId(_)));
        // A failing batch changes nothing and takes no position.
        let err =
            store.write("db.c", vec![Write::Insert(doc! {"_id": 3}), Write::Insert(doc! {"_id": 1})]).unwrap_err();
        assert!(matches!(err, StoreError::Duplicate(..)), "{err}");
        assert!(store.get("db.c", &Bson::Int32(3)).unwrap().is_none());
        assert_eq!(store.position().unwrap(), 2);
        store.write("db.c", vec![Write::Update(Bson::Int64(1), doc! {"$inc": {"n": 5}})]).unwrap();
        assert_eq!(store.get("db.c", &Bson::Double(1.0)).unwrap(), Some(doc! {"_id": 1, "n": 6}));
        assert!(matches!(store.write("db.c", vec![Write::Delete(Bson::Int32(9))]), Err(StoreError::NotFound(..))));
        assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.position().unwrap(), 3);
        assert_eq!(store.get("db.c", &Bson::Int32(1)).unwrap(), Some(doc! {"_id": 1, "n": 6}));
    }

    #[test]
    fn both_durabilities_persist_across_reopen() {
        for durability in [Durability::Immediate, "periodic:5".parse().unwrap()] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open_with(dir.path(), durability).unwrap();
            store.write("db.c", vec![Write::Insert(doc! {"_id": 1})]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(store);
            let store = Store::open_with(dir.path(), durability).unwrap();
            assert!(store.get("db.c", &Bson::Int32(1)).unwrap().is_some(), "{durability:?}");
        }
        assert!("sometimes".parse::<Durability>().is_err());
        assert!("periodic:0".parse::<Durability>().is_err());
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
        assert_eq!(snapshot.position, 11);
        assert!(!snapshot.complete);
        assert_eq!(snapshot.docs.iter().map(|d| d.get_i32("n").unwrap()).collect::<Vec<_>>(), vec![9, 8, 7]);
        assert!(store.read("db.c", &query, None).unwrap().complete);
        assert!(matches!(store.write("nodot", vec![]), Err(StoreError::Namespace(..))));
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
