//! The embedded store as a [`Source`]: its committer hands every durable write over a bounded
//! queue, in position order; snapshot reads are the store's MVCC reads.
//!
//! The queue is the store's side of backpressure: when the engine does not take events, the
//! queue fills, the committer waits on it, write requests wait in the store's own bounded
//! queue, and past `--write-deadline-ms` writers get `503 busy`. Depth:
//! `livegrid_source_queue_depth{source="store"}` (commit batches).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use livegrid_engine::{ChangeEvent, SnapshotSource};

use super::Store;
use crate::source::{Pulled, Source, SourceError};

/// The embedded store's committed writes, pulled.
pub struct StoreSource {
    store: Arc<Store>,
    committed: Receiver<Vec<ChangeEvent>>,
}

impl StoreSource {
    /// Takes over the store's listener; at most `capacity` commit batches wait to be pulled.
    /// The source ends once the store is closed and everything it committed was pulled.
    pub fn new(store: Arc<Store>, capacity: usize) -> Self {
        let (sender, committed) = crossbeam_channel::bounded::<Vec<ChangeEvent>>(capacity.max(1));
        store.set_listener(move |events| {
            metrics::counter!("livegrid_events_in", "source" => "store").increment(events.len() as u64);
            // Blocks the committer while the queue is full. Fails only once the source is
            // dropped (the server is stopping or failed): nothing consumes the events then.
            let _ = sender.send(events);
            metrics::gauge!("livegrid_source_queue_depth", "source" => "store").set(sender.len() as f64);
        });
        StoreSource { store, committed }
    }
}

impl Source for StoreSource {
    fn name(&self) -> &'static str {
        "store"
    }

    fn snapshots(&self) -> Arc<dyn SnapshotSource> {
        self.store.clone()
    }

    fn pull(&mut self, max: usize, wait: Duration) -> Result<Pulled, SourceError> {
        let mut events = match self.committed.recv_timeout(wait) {
            Ok(events) => events,
            Err(RecvTimeoutError::Timeout) => return Ok(Pulled::Idle),
            Err(RecvTimeoutError::Disconnected) => return Ok(Pulled::Ended),
        };
        while events.len() < max {
            match self.committed.try_recv() {
                Ok(more) => events.extend(more),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        metrics::gauge!("livegrid_source_queue_depth", "source" => "store").set(self.committed.len() as f64);
        Ok(Pulled::Events(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::store::Write;
    use bson::doc;

    #[test]
    fn pulls_committed_writes_in_order_and_ends_after_close() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut source = StoreSource::new(store.clone(), 4);
        assert!(matches!(source.pull(10, Duration::from_millis(10)).unwrap(), Pulled::Idle));
        store.write("db.c", vec![Write::Insert(doc! {"_id": 1}), Write::Insert(doc! {"_id": 2})]).unwrap();
        store.write("db.c", vec![Write::Insert(doc! {"_id": 3})]).unwrap();
        let mut positions = Vec::new();
        while positions.len() < 3 {
            if let Pulled::Events(events) = source.pull(10, Duration::from_secs(5)).unwrap() {
                positions.extend(events.iter().map(|e| e.position.time()));
            }
        }
        assert_eq!(positions, vec![1, 2, 3]);
        store.close();
        assert!(matches!(source.pull(10, Duration::from_secs(5)).unwrap(), Pulled::Ended));
    }

    /// A source nobody pulls (an engine that fell behind) slows the writers down, and past
    /// the deadline they are refused with `Busy`, having written nothing; once pulled again,
    /// every accepted write completes and arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unpulled_source_slows_writers_down_to_busy() {
        use crate::source::store::{StoreConfig, StoreError};
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { queue: 1, queue_deadline: Duration::from_millis(300), ..Default::default() };
        let store = Arc::new(Store::open_with(dir.path(), config).unwrap());
        let mut source = StoreSource::new(store.clone(), 1);
        let write = |id: i32| {
            let store = store.clone();
            tokio::spawn(async move { store.write_async("db.c", vec![Write::Insert(doc! {"_id": id})], false).await })
        };
        // The first commit fills the source's queue; the second holds the committer.
        write(1).await.unwrap().unwrap();
        let mut pending = vec![write(2)];
        tokio::time::sleep(Duration::from_millis(100)).await;
        pending.push(write(3));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let late: Vec<_> = (4..8).map(write).collect();
        let mut refused = 0;
        for mut handle in late {
            match tokio::time::timeout(Duration::from_secs(2), &mut handle).await {
                Ok(answer) => match answer.unwrap() {
                    Err(StoreError::Busy { .. }) => refused += 1,
                    Ok(_) => panic!("a write went through while nothing was pulled"),
                    Err(e) => panic!("unexpected {e}"),
                },
                // Queued (had writes 2 and 3 been committed together): it waits for the pull.
                Err(_) => pending.push(handle),
            }
        }
        assert!(refused >= 3, "only {refused} writes were refused");
        let accepted = 1 + pending.len() as u64;
        // Pulling again lets the writes that had entered (held by the committer or queued)
        // through, in order.
        let puller = std::thread::spawn(move || {
            let mut positions = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while (positions.len() as u64) < accepted && std::time::Instant::now() < deadline {
                if let Pulled::Events(events) = source.pull(10, Duration::from_millis(100)).unwrap() {
                    positions.extend(events.iter().map(|e| e.position.time()));
                }
            }
            positions
        });
        for handle in pending {
            handle.await.unwrap().unwrap();
        }
        assert_eq!(puller.join().unwrap(), (1..=accepted).collect::<Vec<_>>());
    }
}
