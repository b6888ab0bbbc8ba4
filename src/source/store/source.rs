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
}
