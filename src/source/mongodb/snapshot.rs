//! Snapshot reads from MongoDB: `find` in a snapshot session, at the cluster time MongoDB
//! picks (`atClusterTime`), so that the read compares exactly with the change stream.

use std::sync::Arc;

use bson::{Document, Timestamp};
use futures_util::TryStreamExt;
use livegrid_engine::{Snapshot, SnapshotError, SnapshotSource};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::Position;
use mongodb::Client;

/// Snapshot reads with `find` in a snapshot session.
pub struct MongoSnapshots {
    pub(super) runtime: Arc<tokio::runtime::Runtime>,
    pub(super) client: Client,
}

impl SnapshotSource for MongoSnapshots {
    fn read(&self, ns: &str, spec: &QuerySpec, _query: &Query, k: Option<usize>) -> Result<Snapshot, SnapshotError> {
        let (db, coll) = ns.split_once('.').ok_or_else(|| SnapshotError::new(BadNamespace(ns.to_string())))?;
        let collection = self.client.database(db).collection::<Document>(coll);
        let sort = with_id_tiebreak(spec.sort.as_ref());
        let mut attempt = 0;
        loop {
            match self.read_once(&collection, spec.filter.clone(), sort.clone(), k) {
                // MongoDB could not serve the snapshot (no longer, or not yet, available at the
                // time it chose): read again, at a newer time, rather than guess.
                Err(ReadError::Driver(e)) if attempt < SNAPSHOT_RETRIES && snapshot_unavailable(&e) => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20 << attempt));
                }
                Err(ReadError::Driver(e)) => return Err(SnapshotError::new(e)),
                Err(ReadError::NoClusterTime) => return Err(SnapshotError::new(NoClusterTime(ns.to_string()))),
                Ok(snapshot) => return Ok(snapshot),
            }
        }
    }
}

/// Reads again at most this many times when MongoDB cannot serve a snapshot.
const SNAPSHOT_RETRIES: u32 = 5;

/// MongoDB's `SnapshotTooOld` (239) and `SnapshotUnavailable` (246).
fn snapshot_unavailable(error: &mongodb::error::Error) -> bool {
    matches!(&*error.kind, mongodb::error::ErrorKind::Command(c) if c.code == 239 || c.code == 246)
}

enum ReadError {
    Driver(mongodb::error::Error),
    NoClusterTime,
}

impl MongoSnapshots {
    fn read_once(
        &self,
        collection: &mongodb::Collection<Document>,
        filter: Document,
        sort: Document,
        k: Option<usize>,
    ) -> Result<Snapshot, ReadError> {
        self.runtime.block_on(async {
            let mut session = self.client.start_session().snapshot(true).await.map_err(ReadError::Driver)?;
            let mut find = collection.find(filter).sort(sort).session(&mut session);
            if let Some(k) = k {
                find = find.limit(i64::try_from(k).unwrap_or(i64::MAX));
            }
            let mut cursor = find.await.map_err(ReadError::Driver)?;
            let docs: Vec<Document> = cursor.stream(&mut session).try_collect().await.map_err(ReadError::Driver)?;
            let Timestamp { time, increment } = session.snapshot_time().ok_or(ReadError::NoClusterTime)?;
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

/// The engine's order as a MongoDB sort: the query's sort, ties broken by `_id` ascending (as
/// the engine breaks them), so that the first `k` MongoDB returns are the first `k` the engine
/// expects; without a sort, `_id` order.
pub fn with_id_tiebreak(sort: Option<&Document>) -> Document {
    let mut sort = sort.cloned().unwrap_or_default();
    if !sort.contains_key("_id") {
        sort.insert("_id", 1);
    }
    sort
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn sorts_break_ties_by_id_as_the_engine_does() {
        assert_eq!(with_id_tiebreak(None), doc! { "_id": 1 });
        assert_eq!(with_id_tiebreak(Some(&doc! { "n": -1, "m": 1 })), doc! { "n": -1, "m": 1, "_id": 1 });
        assert_eq!(with_id_tiebreak(Some(&doc! { "_id": -1, "n": 1 })), doc! { "_id": -1, "n": 1 });
    }
}
