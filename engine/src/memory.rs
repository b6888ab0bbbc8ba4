//! An in-memory database: applies change events and answers snapshot reads. It is the
//! reference state of `livegrid replay` and of the engine's model tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bson::Document;
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::Position;

use crate::doc_id::DocId;
use crate::event::ChangeEvent;
use crate::snapshot::{Snapshot, SnapshotError, SnapshotSource};

/// Documents by namespace and id, at a position.
#[derive(Default, Clone)]
pub struct MemoryState {
    collections: BTreeMap<String, HashMap<DocId, Arc<Document>>>,
    position: Position,
}

impl MemoryState {
    /// Applies one write.
    pub fn apply(&mut self, event: &ChangeEvent) {
        let collection = self.collections.entry(event.ns.clone()).or_default();
        match &event.doc {
            Some(doc) => {
                collection.insert(DocId::new(&event.id), doc.clone());
            }
            None => {
                collection.remove(&DocId::new(&event.id));
            }
        }
        self.position = self.position.max(event.position);
    }

    /// The position of the last write applied.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The documents of a namespace, in no particular order.
    pub fn documents(&self, ns: &str) -> impl Iterator<Item = &Document> {
        self.collections.get(ns).into_iter().flat_map(|c| c.values().map(|d| d.as_ref()))
    }

    /// The current document with this id, if any.
    pub fn get(&self, ns: &str, id: &bson::Bson) -> Option<&Arc<Document>> {
        self.collections.get(ns)?.get(&DocId::new(id))
    }

    /// A snapshot read (see [`SnapshotSource::read`]).
    pub fn read(&self, ns: &str, query: &Query, k: Option<usize>) -> Snapshot {
        let mut matching: Vec<(livegrid_matcher::SortKey, &Document)> =
            self.documents(ns).filter(|d| query.filter.matches(d)).map(|d| (query.sort.key(d), d)).collect();
        matching.sort_by(|a, b| a.0.cmp(&b.0));
        let complete = k.is_none_or(|k| matching.len() <= k);
        let take = k.unwrap_or(usize::MAX);
        Snapshot {
            docs: matching.into_iter().take(take).map(|(_, d)| d.clone()).collect(),
            position: self.position,
            complete,
        }
    }
}

/// The memory state's lock was poisoned (a thread panicked while applying a write).
#[derive(Debug, thiserror::Error)]
#[error("memory state poisoned")]
pub struct Poisoned;

/// A [`MemoryState`] shared between the thread applying writes and the engine's reads.
#[derive(Default)]
pub struct SharedMemory(pub Mutex<MemoryState>);

impl SnapshotSource for SharedMemory {
    fn read(&self, ns: &str, _spec: &QuerySpec, query: &Query, k: Option<usize>) -> Result<Snapshot, SnapshotError> {
        Ok(self.0.lock().map_err(|_| SnapshotError::new(Poisoned))?.read(ns, query, k))
    }
}
