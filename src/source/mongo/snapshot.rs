//! Snapshot reads from MongoDB: `find` in a snapshot session, at the cluster time MongoDB
//! picks (`atClusterTime`), so that the read compares exactly with the change stream.

use std::sync::Arc;

use bson::{Document, Timestamp, doc};
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
