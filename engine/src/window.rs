//! Sorted windows: the visible part (`skip`, `limit`) of a sorted query's result, and the
//! list operations that keep a client's copy of it exact.
//!
//! A window keeps a buffer of the top `skip + limit + slack` documents in sort order
//! (projected, with their sort keys). It is either *complete* (the buffer holds the whole
//! result) or holds a known top prefix of it. A document that now sorts below the buffer's
//! last document cannot be placed when the window is not complete (others the window does not
//! know may sort between), so it is left out; when removals drain the buffer below
//! `skip + limit`, the window needs a re-read of the top documents from the snapshot source
//! ([`Window::needs_reload`]).
//!
//! [`Window::flush`] compares what the client was last shown with what it should see now
//! and returns list operations that turn one into the other, in an order that never shows
//! more than `limit` documents: removes first, then moves of documents that stayed, then adds.
//! `index` and `oldIndex` are positions in the client's list at the moment each operation is
//! applied.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;

use bson::{Bson, Document};
use livegrid_matcher::{Projection, Query, SortKey, SortSpec};
use livegrid_protocol::{Cause, DeltaOp};

use crate::doc_id::DocId;

/// One list operation on a client's copy of a window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowOp {
    /// What happens.
    pub op: DeltaOp,
    /// The document's `_id`.
    pub id: Bson,
    /// The projected document; absent on remove.
    pub doc: Option<Arc<Document>>,
    /// Position after the operation (add, changeIndex, change).
    pub index: Option<u64>,
    /// Position before the operation (remove, changeIndex, change).
    pub old_index: Option<u64>,
    /// The write behind it, or `none` for documents pushed by others.
    pub cause: Cause,
}

struct Entry {
    key: SortKey,
    id: DocId,
    doc: Arc<Document>,
}

/// The window state of one sorted (or skipped/limited) subscription.
pub struct Window {
    sort: SortSpec,
    projection: Projection,
    skip: usize,
    limit: Option<usize>,
    capacity: usize,
    /// The top of the result in sort order, projected.
    buffer: Vec<Entry>,
    keys: HashMap<DocId, SortKey>,
    complete: bool,
    /// What the client has, in order.
    shown: Vec<(DocId, Arc<Document>)>,
    /// Documents touched since the last flush, with the cause of their last write.
    dirty: HashMap<DocId, Cause>,
}

impl Window {
    /// An empty window for `query`; `slack` extra documents are kept beyond the visible end so
    /// that removals rarely force a re-read.
    pub fn new(query: &Query, slack: usize) -> Self {
        let skip = query.skip as usize;
        let limit = query.limit.map(|l| l as usize);
        let capacity = limit.map_or(usize::MAX, |l| skip.saturating_add(l).saturating_add(slack));
        Window {
            sort: query.sort.clone(),
            projection: query.projection.clone(),
            skip,
            limit,
            capacity,
            buffer: Vec::new(),
            keys: HashMap::default(),
            complete: true,
            shown: Vec::new(),
            dirty: HashMap::default(),
        }
    }

    /// How many documents the window wants from a snapshot read: the buffer's capacity.
    pub fn wanted(&self) -> Option<usize> {
        self.limit.map(|_| self.capacity)
    }

    /// Replaces the buffer with documents read from a snapshot (any order). `complete` says
    /// whether they are the whole result.
    pub fn load(&mut self, docs: impl IntoIterator<Item = Arc<Document>>, complete: bool) {
        for entry in self.buffer.drain(..) {
            self.dirty.entry(entry.id).or_insert(Cause::None);
        }
        self.keys.clear();
        let mut entries: Vec<Entry> = docs.into_iter().map(|doc| self.entry(&doc)).collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        self.complete = complete || self.limit.is_none();
        if entries.len() > self.capacity {
            entries.truncate(self.capacity);
            self.complete = false;
        }
        for entry in &entries {
            self.keys.insert(entry.id.clone(), entry.key.clone());
            self.dirty.entry(entry.id.clone()).or_insert(Cause::None);
        }
        self.buffer = entries;
    }

    fn entry(&self, doc: &Document) -> Entry {
        let key = self.sort.key(doc);
        let id = DocId(key.id().clone());
        let doc =
            if self.projection.is_identity() { Arc::new(doc.clone()) } else { Arc::new(self.projection.apply(doc)) };
        Entry { key, id, doc }
    }

    fn position_of(&self, key: &SortKey) -> Result<usize, usize> {
        self.buffer.binary_search_by(|e| e.key.cmp(key))
    }

    /// The document now matches the query, with this content.
    pub fn upsert(&mut self, doc: &Document, cause: Cause) {
        let entry = self.entry(doc);
        self.take(&entry.id);
        self.dirty.insert(entry.id.clone(), cause);
        // Outside a complete buffer, only a document sorting before the last known one has a
        // known place.
        let placeable = self.complete || self.buffer.last().is_some_and(|last| entry.key < last.key);
        if !placeable {
            return;
        }
        let at = self.position_of(&entry.key).unwrap_or_else(|i| i);
        self.keys.insert(entry.id.clone(), entry.key.clone());
        self.buffer.insert(at, entry);
        if self.buffer.len() > self.capacity {
            let dropped = self.buffer.pop().expect("over capacity");
            self.keys.remove(&dropped.id);
            self.complete = false;
        }
    }

    /// The document no longer matches the query (or was deleted).
    pub fn remove(&mut self, id: &DocId, cause: Cause) {
        self.take(id);
        self.dirty.insert(id.clone(), cause);
    }

    fn take(&mut self, id: &DocId) {
        if let Some(key) = self.keys.remove(id) {
            let at = self.position_of(&key).expect("keys and buffer agree");
            self.buffer.remove(at);
        }
    }

    /// Whether the buffer no longer knows enough documents to fill the visible window.
    pub fn needs_reload(&self) -> bool {
        !self.complete && self.buffer.len() < self.skip.saturating_add(self.limit.unwrap_or(usize::MAX))
    }

    /// The visible documents, in order.
    pub fn visible(&self) -> impl Iterator<Item = &Arc<Document>> {
        self.visible_entries().iter().map(|e| &e.doc)
    }

    fn visible_entries(&self) -> &[Entry] {
        let start = self.skip.min(self.buffer.len());
        let end = self.limit.map_or(self.buffer.len(), |l| start.saturating_add(l).min(self.buffer.len()));
        &self.buffer[start..end]
    }

    /// Marks the current visible documents as shown, without operations (for the initial
    /// result).
    pub fn mark_shown(&mut self) {
        self.shown = self.visible_entries().iter().map(|e| (e.id.clone(), e.doc.clone())).collect();
        self.dirty.clear();
    }

    /// The list operations that take the client from what it was shown to what it should see.
    pub fn flush(&mut self) -> Vec<WindowOp> {
        let target: Vec<(DocId, Arc<Document>)> =
            self.visible_entries().iter().map(|e| (e.id.clone(), e.doc.clone())).collect();
        let dirty = std::mem::take(&mut self.dirty);
        let cause = |id: &DocId| dirty.get(id).copied().unwrap_or(Cause::None);
        let mut ops = Vec::new();
        let target_ids: HashSet<&DocId> = target.iter().map(|(id, _)| id).collect();

        // 1. Removes.
        let mut working: Vec<(DocId, Arc<Document>)> = Vec::with_capacity(self.shown.len());
        let mut removed = 0;
        for (i, (id, doc)) in std::mem::take(&mut self.shown).into_iter().enumerate() {
            if target_ids.contains(&id) {
                working.push((id, doc));
            } else {
                ops.push(WindowOp {
                    op: DeltaOp::Remove,
                    id: id.0.clone(),
                    doc: None,
                    index: None,
                    old_index: Some((i - removed) as u64),
                    cause: cause(&id),
                });
                removed += 1;
            }
        }

        // 2. Moves and changes among documents that stay, preferring to move touched ones.
        let staying: HashSet<&DocId> = working.iter().map(|(id, _)| id).collect();
        let order: Vec<&(DocId, Arc<Document>)> = target.iter().filter(|(id, _)| staying.contains(id)).collect();
        let rank: HashMap<&DocId, usize> = order.iter().enumerate().map(|(i, (id, _))| (id, i)).collect();
        let new_doc: HashMap<&DocId, &Arc<Document>> = order.iter().map(|(id, doc)| (id, doc)).collect();
        let mut i = 0;
        while i < working.len() {
            let want = &order[i].0;
            if &working[i].0 == want {
                i += 1;
                continue;
            }
            // Move the touched document at i down to its place, or the wanted one up to i.
            let from = if dirty.contains_key(&working[i].0) {
                i
            } else {
                working.iter().position(|(id, _)| id == want).expect("same documents")
            };
            let (id, _) = working.remove(from);
            let to = if from == i { rank[&id] } else { i };
            let doc = (*new_doc[&id]).clone();
            ops.push(WindowOp {
                op: DeltaOp::ChangeIndex,
                id: id.0.clone(),
                doc: Some(doc.clone()),
                index: Some(to as u64),
                old_index: Some(from as u64),
                cause: cause(&id),
            });
            working.insert(to, (id, doc));
        }
        for (i, (id, doc)) in working.iter_mut().enumerate() {
            let now = new_doc[&*id];
            if !Arc::ptr_eq(doc, now) && **doc != **now {
                ops.push(WindowOp {
                    op: DeltaOp::Change,
                    id: id.0.clone(),
                    doc: Some(now.clone()),
                    index: Some(i as u64),
                    old_index: Some(i as u64),
                    cause: cause(id),
                });
            }
            *doc = now.clone();
        }

        // 3. Adds, in ascending position so that every earlier position is already final.
        let present: HashSet<DocId> = working.iter().map(|(id, _)| id.clone()).collect();
        for (index, (id, doc)) in target.iter().enumerate() {
            if !present.contains(id) {
                ops.push(WindowOp {
                    op: DeltaOp::Add,
                    id: id.0.clone(),
                    doc: Some(doc.clone()),
                    index: Some(index as u64),
                    old_index: None,
                    cause: cause(id),
                });
            }
        }
        self.shown = target;
        ops
    }
}

/// Applies list operations to a client's copy, as a client would (used by tests).
pub fn apply_ops(list: &mut Vec<Arc<Document>>, ops: &[WindowOp]) {
    for op in ops {
        match op.op {
            DeltaOp::Remove => {
                list.remove(op.old_index.expect("remove has oldIndex") as usize);
            }
            DeltaOp::Add => {
                list.insert(op.index.expect("add has index") as usize, op.doc.clone().expect("add has doc"))
            }
            DeltaOp::ChangeIndex => {
                list.remove(op.old_index.expect("changeIndex has oldIndex") as usize);
                list.insert(op.index.expect("changeIndex has index") as usize, op.doc.clone().expect("doc"));
            }
            DeltaOp::Change => list[op.index.expect("change has index") as usize] = op.doc.clone().expect("doc"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;
    use livegrid_matcher::QuerySpec;

    fn query(sort: Document, skip: u64, limit: Option<u64>) -> Query {
        Query::compile(&QuerySpec { filter: doc! {}, sort: Some(sort), skip, limit, projection: None }).unwrap()
    }

    fn ids(list: &[Arc<Document>]) -> Vec<i32> {
        list.iter().map(|d| d.get_i32("_id").unwrap()).collect()
    }

    /// Applies each step's flush to the client copy and checks it equals the visible window,
    /// never exceeding the limit midway.
    fn check(window: &mut Window, client: &mut Vec<Arc<Document>>, limit: usize) -> Vec<WindowOp> {
        let ops = window.flush();
        for op in &ops {
            apply_ops(client, std::slice::from_ref(op));
            assert!(client.len() <= limit, "window exceeded its limit midway: {ops:?}");
        }
        assert_eq!(ids(client), ids(&window.visible().cloned().collect::<Vec<_>>()));
        ops
    }

    #[test]
    fn insert_pushes_out_the_last() {
        let q = query(doc! {"n": 1}, 0, Some(2));
        let mut w = Window::new(&q, 2);
        w.load((1..=4).map(|i| Arc::new(doc! {"_id": i, "n": i * 10})), true);
        w.mark_shown();
        let mut client: Vec<_> = w.visible().cloned().collect();
        w.upsert(&doc! {"_id": 9, "n": 5}, Cause::Insert);
        let ops = check(&mut w, &mut client, 2);
        assert_eq!(ops[0].op, DeltaOp::Remove);
        assert_eq!(ops[0].cause, Cause::None);
        assert_eq!(ops[1].op, DeltaOp::Add);
        assert_eq!(ops[1].index, Some(0));
        assert_eq!(ops[1].cause, Cause::Insert);
        assert_eq!(ids(&client), vec![9, 1]);
    }

    #[test]
    fn moves_prefer_the_changed_document() {
        let q = query(doc! {"n": 1}, 0, Some(4));
        let mut w = Window::new(&q, 0);
        w.load((1..=4).map(|i| Arc::new(doc! {"_id": i, "n": i})), true);
        w.mark_shown();
        let mut client: Vec<_> = w.visible().cloned().collect();
        w.upsert(&doc! {"_id": 1, "n": 10}, Cause::Update);
        let ops = check(&mut w, &mut client, 4);
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert_eq!((ops[0].op, ops[0].old_index, ops[0].index), (DeltaOp::ChangeIndex, Some(0), Some(3)));
        w.upsert(&doc! {"_id": 4, "n": 0}, Cause::Update);
        let ops = check(&mut w, &mut client, 4);
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert_eq!((ops[0].op, ops[0].old_index, ops[0].index), (DeltaOp::ChangeIndex, Some(2), Some(0)));
        w.upsert(&doc! {"_id": 2, "n": 2, "x": 1}, Cause::Update);
        let ops = check(&mut w, &mut client, 4);
        assert_eq!((ops[0].op, ops[0].index), (DeltaOp::Change, Some(1)));
    }

    #[test]
    fn skip_shifts_the_window() {
        let q = query(doc! {"n": 1}, 1, Some(2));
        let mut w = Window::new(&q, 4);
        w.load((1..=5).map(|i| Arc::new(doc! {"_id": i, "n": i})), true);
        w.mark_shown();
        let mut client: Vec<_> = w.visible().cloned().collect();
        assert_eq!(ids(&client), vec![2, 3]);
        w.remove(&DocId(Bson::Int32(1)), Cause::Delete);
        check(&mut w, &mut client, 2);
        assert_eq!(ids(&client), vec![3, 4]);
        w.upsert(&doc! {"_id": 0, "n": 0}, Cause::Insert);
        check(&mut w, &mut client, 2);
        assert_eq!(ids(&client), vec![2, 3]);
    }

    #[test]
    fn draining_an_incomplete_buffer_needs_a_reload() {
        let q = query(doc! {"n": 1}, 0, Some(2));
        let mut w = Window::new(&q, 1);
        w.load((1..=3).map(|i| Arc::new(doc! {"_id": i, "n": i})), false);
        assert!(!w.needs_reload());
        // A document sorting after the known top cannot be placed.
        w.upsert(&doc! {"_id": 7, "n": 70}, Cause::Insert);
        assert_eq!(w.buffer.len(), 3);
        w.remove(&DocId(Bson::Int32(1)), Cause::Delete);
        assert!(!w.needs_reload());
        w.remove(&DocId(Bson::Int32(2)), Cause::Delete);
        assert!(w.needs_reload());
        w.load((3..=4).map(|i| Arc::new(doc! {"_id": i, "n": i})).chain([Arc::new(doc! {"_id": 7, "n": 70})]), true);
        assert!(!w.needs_reload());
        assert_eq!(ids(&w.visible().cloned().collect::<Vec<_>>()), vec![3, 4]);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Upsert(i32, i32),
        Remove(i32),
        Reload,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0i32..12, 0i32..6).prop_map(|(id, n)| Step::Upsert(id, n)),
            2 => (0i32..12).prop_map(Step::Remove),
            1 => Just(Step::Reload),
        ]
    }

    proptest::proptest! {
        #[test]
        fn client_copy_follows_the_window(
            steps in proptest::collection::vec(step(), 1..40),
            skip in 0u64..3,
            limit in 1u64..5,
            slack in 0usize..3,
            desc in proptest::bool::ANY,
        ) {
            let q = query(doc! {"n": if desc { -1 } else { 1 }}, skip, Some(limit));
            let mut w = Window::new(&q, slack);
            // The true result, to reload from.
            let mut truth: HashMap<i32, i32> = HashMap::default();
            let mut client: Vec<Arc<Document>> = Vec::new();
            w.load(Vec::new(), true);
            w.mark_shown();
            for s in steps {
                match s {
                    Step::Upsert(id, n) => {
                        truth.insert(id, n);
                        w.upsert(&doc! {"_id": id, "n": n}, Cause::Update);
                    }
                    Step::Remove(id) => {
                        truth.remove(&id);
                        w.remove(&DocId(Bson::Int32(id)), Cause::Delete);
                    }
                    Step::Reload => {}
                }
                if w.needs_reload() || matches!(s, Step::Reload) {
                    w.load(truth.iter().map(|(id, n)| Arc::new(doc! {"_id": *id, "n": *n})), true);
                }
                check(&mut w, &mut client, limit as usize);
                let all: Vec<Document> = truth.iter().map(|(id, n)| doc! {"_id": *id, "n": *n}).collect();
                let expected: Vec<i32> = q.evaluate(&all).iter().map(|d| d.get_i32("_id").unwrap()).collect();
                proptest::prop_assert_eq!(ids(&client), expected);
            }
        }
    }
}
