//! The REST data API on MongoDB (`serve --mongodb`): writes go to MongoDB, and their changes
//! come back through the change stream like everyone else's. A request with several writes
//! (`_bulk`) is one transaction, so its events share one cluster time and reach subscriptions
//! in one step. Answers carry each changed document's position: the write's cluster time
//! (`operationTime`) and its order inside it.
//!
//! The calls block on the source's runtime; the REST handlers run them on the blocking pool.

use std::sync::Arc;

use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use futures_util::TryStreamExt;
use livegrid_engine::{ChangeEvent, ChangeOp};
use livegrid_matcher::QuerySpec;
use livegrid_protocol::Position;
use mongodb::error::ErrorKind;
use mongodb::{Client, ClientSession, Collection};

use crate::source::store::{Guard, Write, id_label, resolve_path_id};

/// MongoDB's `DuplicateKey`.
const DUPLICATE_KEY: i32 = 11000;

/// Why a write or read through MongoDB failed.
#[derive(Debug, thiserror::Error)]
pub enum MongoWriteError {
    /// No document has the id.
    #[error("no document with _id {0} in {1}")]
    NotFound(String, String),
    /// A document with the id exists already.
    #[error("a document with _id {0} exists in {1}")]
    Duplicate(String, String),
    /// The document exists but does not match the request's guard: nothing was written.
    #[error("the document with _id {0} in {1} does not admit this write")]
    Refused(String, String),
    /// MongoDB refused the request as invalid (its message says why).
    #[error("mongodb refused the request: {0}")]
    Invalid(#[source] mongodb::error::Error),
    /// MongoDB could not be reached or failed.
    #[error("mongodb: {0}")]
    Driver(#[source] mongodb::error::Error),
}

impl MongoWriteError {
    fn from_driver(e: mongodb::error::Error) -> Self {
        match &*e.kind {
            ErrorKind::Command(_) | ErrorKind::Write(_) | ErrorKind::InsertMany(_) => MongoWriteError::Invalid(e),
            _ => MongoWriteError::Driver(e),
        }
    }
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// Writes and reads for the REST data API.
pub struct MongoWrites {
    pub(super) runtime: Arc<tokio::runtime::Runtime>,
    pub(super) client: Client,
}

impl MongoWrites {
    fn collection(&self, ns: &str) -> Collection<Document> {
        let (db, coll) = ns.split_once('.').unwrap_or((ns, ""));
        self.client.database(db).collection(coll)
    }

    /// Applies `writes` to `ns` (several in one transaction) and returns the changes they
    /// made, with their positions; writes that change nothing give no change, as in MongoDB.
    /// With a guard, every document changed must match it, checked by MongoDB in the same
    /// operation (its filter is part of the write's filter).
    pub fn write(
        &self,
        ns: &str,
        writes: Vec<Write>,
        guard: Option<&Guard>,
    ) -> Result<Vec<ChangeEvent>, MongoWriteError> {
        let collection = self.collection(ns);
        self.runtime.block_on(async {
            let mut session = self.client.start_session().await.map_err(MongoWriteError::Driver)?;
            let transaction = writes.len() > 1;
            if transaction {
                session.start_transaction().await.map_err(MongoWriteError::from_driver)?;
            }
            let mut changes = Vec::with_capacity(writes.len());
            for write in writes {
                match apply(&collection, ns, write, guard, &mut session).await {
                    Ok(Some(change)) => changes.push(change),
                    Ok(None) => {}
                    Err(e) => {
                        if transaction {
                            let _ = session.abort_transaction().await;
                        }
                        return Err(e);
                    }
                }
            }
            if transaction {
                session.commit_transaction().await.map_err(MongoWriteError::from_driver)?;
            }
            // Every change of the request happened at the session's last operation time, in
            // the order made (single writes and one transaction alike).
            let time = session.operation_time().unwrap_or(bson::Timestamp { time: 0, increment: 0 });
            for (order, change) in changes.iter_mut().enumerate() {
                change.position = Position::from_cluster_time(time.time, time.increment, order as u32);
            }
            Ok(changes)
        })
    }

    /// The document with `id`, if any.
    pub fn get(&self, ns: &str, id: &Bson) -> Result<Option<Document>, MongoWriteError> {
        let collection = self.collection(ns);
        self.runtime
            .block_on(async { collection.find_one(doc! { "_id": id.clone() }).await })
            .map_err(MongoWriteError::from_driver)
    }

    /// The id a URL path segment names: the first candidate that exists, else the first
    /// candidate (the embedded store's rule).
    pub fn resolve_id(&self, ns: &str, segment: &str) -> Result<Bson, MongoWriteError> {
        resolve_path_id(segment, |id| Ok(self.get(ns, id)?.is_some()))
    }

    /// The result of a query, read in a snapshot session, and the position it reflects.
    pub fn query(&self, ns: &str, spec: &QuerySpec) -> Result<(Vec<Document>, Position), MongoWriteError> {
        let collection = self.collection(ns);
        self.runtime.block_on(async {
            let mut session = self.client.start_session().snapshot(true).await.map_err(MongoWriteError::from_driver)?;
            let mut find = collection.find(spec.filter.clone()).skip(spec.skip).session(&mut session);
            // Deterministic pages: ties broken by `_id`, as the embedded store breaks them.
            find = find.sort(super::snapshot::with_id_tiebreak(spec.sort.as_ref()));
            if let Some(limit) = spec.limit {
                find = find.limit(i64::try_from(limit).unwrap_or(i64::MAX));
            }
            if let Some(projection) = &spec.projection {
                find = find.projection(projection.clone());
            }
            let mut cursor = find.await.map_err(MongoWriteError::from_driver)?;
            let docs: Vec<Document> =
                cursor.stream(&mut session).try_collect().await.map_err(MongoWriteError::from_driver)?;
            let time = session.snapshot_time().unwrap_or(bson::Timestamp { time: 0, increment: 0 });
            Ok((docs, Position::from_cluster_time(time.time, time.increment, u32::MAX)))
        })
    }
}

/// One write; its change (position filled in by the caller), or `None` if it changed nothing.
async fn apply(
    collection: &Collection<Document>,
    ns: &str,
    write: Write,
    guard: Option<&Guard>,
    session: &mut ClientSession,
) -> Result<Option<ChangeEvent>, MongoWriteError> {
    let change = |op, id: Bson| ChangeEvent { position: Position::ZERO, ns: ns.to_string(), op, id, doc: None };
    let refused = |id: &Bson| MongoWriteError::Refused(id_label(id), ns.to_string());
    // The document by id, and, with a guard, only if it matches it.
    let selector = |id: &Bson| match guard {
        Some(guard) => doc! { "$and": [{ "_id": id.clone() }, guard.filter().clone()] },
        None => doc! { "_id": id.clone() },
    };
    // Nothing matched the selector: missing, or (with a guard) refused; read in the session so
    // a transaction sees its own writes.
    let unmatched = async |id: &Bson, session: &mut ClientSession| -> Result<MongoWriteError, MongoWriteError> {
        let exists = guard.is_some()
            && collection
                .find_one(doc! { "_id": id.clone() })
                .session(&mut *session)
                .await
                .map_err(MongoWriteError::from_driver)?
                .is_some();
        Ok(if exists { refused(id) } else { MongoWriteError::NotFound(id_label(id), ns.to_string()) })
    };
    match write {
        Write::Insert(doc) => {
            // `_id` first, generated when missing, as MongoDB and the embedded store do.
            let id = doc.get("_id").cloned().unwrap_or_else(|| Bson::ObjectId(ObjectId::new()));
            let mut with_id = doc! { "_id": id.clone() };
            with_id.extend(doc.into_iter().filter(|(k, _)| k != "_id"));
            match collection.insert_one(with_id).session(&mut *session).await {
                Ok(_) => Ok(Some(change(ChangeOp::Insert, id))),
                Err(e) if is_duplicate(&e) => Err(MongoWriteError::Duplicate(id_label(&id), ns.to_string())),
                Err(e) => Err(MongoWriteError::from_driver(e)),
            }
        }
        Write::Replace(id, doc) => {
            let mut with_id = doc! { "_id": id.clone() };
            with_id.extend(doc.into_iter().filter(|(k, _)| k != "_id"));
            // A document the guard refuses is not selected, so the upsert collides with it.
            let result = match collection.replace_one(selector(&id), with_id).upsert(true).session(&mut *session).await
            {
                Err(e) if guard.is_some() && is_duplicate(&e) => return Err(refused(&id)),
                other => other.map_err(MongoWriteError::from_driver)?,
            };
            Ok(if result.upserted_id.is_some() {
                Some(change(ChangeOp::Insert, id))
            } else if result.modified_count > 0 {
                Some(change(ChangeOp::Replace, id))
            } else {
                None
            })
        }
        Write::Update(id, update) => {
            let result = collection
                .update_one(selector(&id), update)
                .session(&mut *session)
                .await
                .map_err(MongoWriteError::from_driver)?;
            if result.matched_count == 0 {
                return Err(unmatched(&id, session).await?);
            }
            Ok((result.modified_count > 0).then(|| change(ChangeOp::Update, id)))
        }
        Write::Delete(id) => {
            let result = collection
                .delete_one(selector(&id))
                .session(&mut *session)
                .await
                .map_err(MongoWriteError::from_driver)?;
            if result.deleted_count == 0 {
                return Err(unmatched(&id, session).await?);
            }
            Ok(Some(change(ChangeOp::Delete, id)))
        }
    }
}
