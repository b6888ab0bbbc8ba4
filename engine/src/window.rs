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
//! A single write ([`Window::upsert`], [`Window::remove`]) returns its list operations at
//! once, computed from ranks in the buffer (a move inside the window is one `changeIndex`),
//! in an order that never shows more than `limit` documents: removes before adds. While a
//! re-read is awaited the window is *desynced* ([`Window::desync`]): writes change the buffer
//! silently, and [`Window::flush`] later compares what the client was shown with what it
//! should see and returns the operations that reconcile them (removes, then moves of
//! documents that stayed, then adds). `index` and `oldIndex` are positions in the client's
//! list at the moment each operation is applied.

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
    /// While desynced: what the client has, in order. While synced the client has exactly the
    /// visible part of the buffer.
    shown: Option<Vec<(DocId, Arc<Document>)>>,
    /// While desynced: documents touched since, with the cause of their last write.
    dirty: HashMap<DocId, Cause>,
}

/// Whether a query's result is kept as a window (it is sorted, skipped or limited) rather
/// than as a set.
pub fn is_window(query: &Query) -> bool {
    !query.sort.is_empty() || query.is_windowed()
}

/// How many documents a window over `query` keeps, and so how many a snapshot read for it
/// must return: skip + limit + slack; `None` for queries whose whole result is kept.
pub fn capacity(query: &Query, slack: usize) -> Option<usize> {
    if !is_window(query) {
        return None;
    }
    query.limit.map(|l| (query.skip as usize).saturating_add(l as usize).saturating_add(slack))
}

impl Window {
    /// An empty window for `query`; `slack` extra documents are kept beyond the visible end so
    /// that removals rarely force a re-read.
    pub fn new(query: &Query, slack: usize) -> Self {
        let skip = query.skip as usize;
        let limit = query.limit.map(|l| l as usize);
        let capacity = capacity(query, slack).unwrap_or(usize::MAX);
        Window {
            sort: query.sort.clone(),
            projection: query.projection.clone(),
            skip,
            limit,
            capacity,
            buffer: Vec::new(),
            keys: HashMap::default(),
            complete: true,
            shown: None,
            dirty: HashMap::default(),
        }
    }

    /// Replaces the buffer with documents read from a snapshot (any order). `complete` says
    /// whether they are the whole result.
    pub fn load(&mut self, docs: impl IntoIterator<Item = Arc<Document>>, complete: bool) {
        self.buffer.clear();
        self.keys.clear();
        let mut entries: Vec<Entry> = docs.into_iter().map(|doc| self.entry(doc)).collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        self.complete = complete || self.limit.is_none();
        if entries.len() > self.capacity {
            entries.truncate(self.capacity);
            self.complete = false;
        }
        for entry in &entries {
            self.keys.insert(entry.id.clone(), entry.key.clone());
        }
        self.buffer = entries;
    }

    /// The entry of a document: without a projection it shares the document itself (so that
    /// its encoding is shared too), with one it holds the projected copy.
    fn entry(&self, doc: Arc<Document>) -> Entry {
        let key = self.sort.key(&doc);
        let id = DocId::new(key.id());
        let doc = if self.projection.is_identity() { doc } else { Arc::new(self.projection.apply(&doc)) };
        Entry { key, id, doc }
    }

    fn position_of(&self, key: &SortKey) -> Result<usize, usize> {
        self.buffer.binary_search_by(|e| e.key.cmp(key))
    }

    /// The document now matches the query, with this content. Returns the client's list
    /// operations (none while desynced).
    pub fn upsert(&mut self, doc: &Arc<Document>, cause: Cause) -> Vec<WindowOp> {
        let entry = self.entry(doc.clone());
        let mut ops = Vec::new();
        if self.shown.is_some() {
            self.dirty.insert(entry.id.clone(), cause);
            self.take(&entry.id);
            self.place(entry, cause, None);
            return ops;
        }
        let old_rank = self.keys.get(&entry.id).map(|k| self.position_of(k).expect("keys and buffer agree"));
        if let Some(from) = old_rank
            && self.move_within(from, &entry, cause, &mut ops)
        {
            return ops;
        }
        if let Some(from) = old_rank {
            self.remove_at(from, cause, &mut ops);
        }
        self.place(entry, cause, Some(&mut ops));
        ops
    }

    /// The document no longer matches the query (or was deleted). Returns the client's list
    /// operations (none while desynced).
    pub fn remove(&mut self, id: &DocId, cause: Cause) -> Vec<WindowOp> {
        let mut ops = Vec::new();
        if self.shown.is_some() {
            self.dirty.insert(id.clone(), cause);
            self.take(id);
        } else if let Some(key) = self.keys.get(id) {
            let at = self.position_of(key).expect("keys and buffer agree");
            self.remove_at(at, cause, &mut ops);
        }
        ops
    }

    /// Stops emitting operations per write: the client keeps what it has until
    /// [`Window::flush`] reconciles it (used while a re-read is awaited).
    pub fn desync(&mut self) {
        if self.shown.is_none() {
            self.shown = Some(self.visible_entries().iter().map(|e| (e.id.clone(), e.doc.clone())).collect());
        }
    }

    /// Whether one more removal could drain the buffer below what the window must show.
    pub fn might_drain(&self) -> bool {
        !self.complete && self.buffer.len() <= self.needed()
    }

    fn needed(&self) -> usize {
        self.skip.saturating_add(self.limit.unwrap_or(usize::MAX))
    }

    /// The visible ranks of the buffer: `[start, end)`.
    fn bounds(&self) -> (usize, usize) {
        let len = self.buffer.len();
        (self.skip, self.skip.saturating_add(self.limit.unwrap_or(usize::MAX)).min(len))
    }

    fn take(&mut self, id: &DocId) {
        if let Some(key) = self.keys.remove(id) {
            let at = self.position_of(&key).expect("keys and buffer agree");
            self.buffer.remove(at);
        }
    }

    /// A document visible before and after its write: one `changeIndex` (or `change`).
    fn move_within(&mut self, from: usize, entry: &Entry, cause: Cause, ops: &mut Vec<WindowOp>) -> bool {
        let (start, end) = self.bounds();
        if !(start..end).contains(&from) {
            return false;
        }
        // Its rank among the other documents.
        let to = match self.position_of(&entry.key) {
            Ok(i) => i,
            Err(i) if i > from => i - 1,
            Err(i) => i,
        };
        let placeable = self.complete || to + 1 < self.buffer.len();
        if !placeable || !(start..end).contains(&to) {
            return false;
        }
        let old = self.buffer.remove(from);
        self.keys.insert(entry.id.clone(), entry.key.clone());
        self.buffer.insert(to, Entry { key: entry.key.clone(), id: entry.id.clone(), doc: entry.doc.clone() });
        let (i, j) = ((from - start) as u64, (to - start) as u64);
        if i != j {
            ops.push(op(DeltaOp::ChangeIndex, &entry.id, Some(&entry.doc), Some(j), Some(i), cause));
        } else if *old.doc != *entry.doc {
            ops.push(op(DeltaOp::Change, &entry.id, Some(&entry.doc), Some(j), Some(i), cause));
        }
        true
    }

    /// Removes the entry at `rank`, with the operations this shows the client: the document
    /// leaves (or, before the window, the first visible one slides out), and the next one
    /// after the window slides in.
    fn remove_at(&mut self, rank: usize, cause: Cause, ops: &mut Vec<WindowOp>) {
        let len = self.buffer.len();
        let (start, end) = self.bounds();
        let removed = self.buffer.remove(rank);
        self.keys.remove(&removed.id);
        if start >= end || rank >= end {
            return;
        }
        if rank < start {
            let first = &self.buffer[start - 1];
            ops.push(op(DeltaOp::Remove, &first.id, None, None, Some(0), Cause::None));
        } else {
            ops.push(op(DeltaOp::Remove, &removed.id, None, None, Some((rank - start) as u64), cause));
        }
        if end < len {
            let next = &self.buffer[end - 1];
            ops.push(op(DeltaOp::Add, &next.id, Some(&next.doc), Some((end - start - 1) as u64), None, Cause::None));
        }
    }

    /// Puts an entry into the buffer if its place is known, with the operations this shows
    /// the client when `ops` is given: a full window first drops its last document, then the
    /// document (or, before the window, the one pushed into it) is added.
    fn place(&mut self, entry: Entry, cause: Cause, ops: Option<&mut Vec<WindowOp>>) {
        // Outside a complete buffer, only a document sorting before the last known one has a
        // known place.
        let placeable = self.complete || self.buffer.last().is_some_and(|last| entry.key < last.key);
        if !placeable {
            return;
        }
        let rank = self.position_of(&entry.key).unwrap_or_else(|i| i);
        let len = self.buffer.len();
        let start = self.skip;
        let full_end = start.saturating_add(self.limit.unwrap_or(usize::MAX));
        self.keys.insert(entry.id.clone(), entry.key.clone());
        self.buffer.insert(rank, entry);
        if let Some(ops) = ops
            && rank < full_end
            && len >= start
        {
            if len >= full_end {
                let last = &self.buffer[full_end];
                ops.push(op(DeltaOp::Remove, &last.id, None, None, Some((full_end - start - 1) as u64), Cause::None));
            }
            if rank < start {
                let pushed = &self.buffer[start];
                ops.push(op(DeltaOp::Add, &pushed.id, Some(&pushed.doc), Some(0), None, Cause::None));
            } else {
                let added = &self.buffer[rank];
                ops.push(op(DeltaOp::Add, &added.id, Some(&added.doc), Some((rank - start) as u64), None, cause));
            }
        }
        if self.buffer.len() > self.capacity {
            let dropped = self.buffer.pop().expect("over capacity");
            self.keys.remove(&dropped.id);
            self.complete = false;
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
        self.shown = None;
        self.dirty.clear();
    }

    /// Ends a desync: the list operations that take the client from what it was shown to what
    /// it should see (none when the window is in sync).
    pub fn flush(&mut self) -> Vec<WindowOp> {
        let Some(shown) = self.shown.take() else { return Vec::new() };
        let target: Vec<(DocId, Arc<Document>)> =
            self.visible_entries().iter().map(|e| (e.id.clone(), e.doc.clone())).collect();
        let dirty = std::mem::take(&mut self.dirty);
        reconcile(shown, &target, |id| dirty.get(id).copied().unwrap_or(Cause::None))
    }
}

/// The list operations that take a client from `shown` to `target` (each an id with its
/// document, in list order): removes, then moves of documents that stay, then adds, with
/// `index` and `oldIndex` positions in the client's list as each operation is applied. A
/// staying document whose content changed gets a `change`; `cause` gives each operation's
/// cause.
pub fn reconcile(
    shown: Vec<(DocId, Arc<Document>)>,
    target: &[(DocId, Arc<Document>)],
    cause: impl Fn(&DocId) -> Cause,
) -> Vec<WindowOp> {
    let mut ops = Vec::new();
    let target_ids: HashSet<&DocId> = target.iter().map(|(id, _)| id).collect();

    // 1. Removes.
    let mut working: Vec<(DocId, Arc<Document>)> = Vec::with_capacity(shown.len());
    let mut removed = 0;
    for (i, (id, doc)) in shown.into_iter().enumerate() {
        if target_ids.contains(&id) {
            working.push((id, doc));
        } else {
            ops.push(op(DeltaOp::Remove, &id, None, None, Some((i - removed) as u64), cause(&id)));
            removed += 1;
        }
    }

    // 2. Moves among documents that stay: fix positions left to right, moving the wanted
    // document into place (at most one move per position).
    let staying: HashSet<&DocId> = working.iter().map(|(id, _)| id).collect();
    let order: Vec<&(DocId, Arc<Document>)> = target.iter().filter(|(id, _)| staying.contains(id)).collect();
    debug_assert_eq!(order.len(), working.len(), "a window lists a document twice");
    let new_doc: HashMap<&DocId, &Arc<Document>> = order.iter().map(|(id, doc)| (id, doc)).collect();
    for (i, (want, doc)) in order.iter().enumerate() {
        if &working[i].0 == want {
            continue;
        }
        let Some(from) = working[i..].iter().position(|(id, _)| id == want).map(|j| i + j) else {
            debug_assert!(false, "a staying document is missing from the client's list");
            break;
        };
        let (id, _) = working.remove(from);
        ops.push(op(DeltaOp::ChangeIndex, &id, Some(doc), Some(i as u64), Some(from as u64), cause(&id)));
        working.insert(i, (id, doc.clone()));
    }
    for (i, (id, doc)) in working.iter_mut().enumerate() {
        let now = new_doc[&*id];
        if !Arc::ptr_eq(doc, now) && **doc != **now {
            ops.push(op(DeltaOp::Change, id, Some(now), Some(i as u64), Some(i as u64), cause(id)));
        }
        *doc = now.clone();
    }

    // 3. Adds, in ascending position so that every earlier position is already final.
    let present: HashSet<DocId> = working.iter().map(|(id, _)| id.clone()).collect();
    for (index, (id, doc)) in target.iter().enumerate() {
        if !present.contains(id) {
            ops.push(op(DeltaOp::Add, id, Some(doc), Some(index as u64), None, cause(id)));
        }
    }
    ops
}

fn op(
    kind: DeltaOp,
    id: &DocId,
    doc: Option<&Arc<Document>>,
    index: Option<u64>,
    old_index: Option<u64>,
    cause: Cause,
) -> WindowOp {
    WindowOp { op: kind, id: id.to_bson(), doc: doc.cloned(), index, old_index, cause }
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

    /// Applies operations one by one to the client copy, checking the limit midway and the
    /// result against the window.
    fn check(window: &Window, client: &mut Vec<Arc<Document>>, limit: usize, ops: &[WindowOp]) {
        for op in ops {
            apply_ops(client, std::slice::from_ref(op));
            assert!(client.len() <= limit, "window exceeded its limit midway: {ops:?}");
        }
        assert_eq!(ids(client), ids(&window.visible().cloned().collect::<Vec<_>>()), "after {ops:?}");
    }

    fn loaded(
        q: &Query,
        slack: usize,
        docs: impl IntoIterator<Item = Document>,
        complete: bool,
    ) -> (Window, Vec<Arc<Document>>) {
        let mut w = Window::new(q, slack);
        w.load(docs.into_iter().map(Arc::new), complete);
        w.mark_shown();
        let client = w.visible().cloned().collect();
        (w, client)
    }

    #[test]
    fn insert_pushes_out_the_last() {
        let q = query(doc! {"n": 1}, 0, Some(2));
        let (mut w, mut client) = loaded(&q, 2, (1..=4).map(|i| doc! {"_id": i, "n": i * 10}), true);
        let ops = w.upsert(&Arc::new(doc! {"_id": 9, "n": 5}), Cause::Insert);
        check(&w, &mut client, 2, &ops);
        assert_eq!(ops[0].op, DeltaOp::Remove);
        assert_eq!(ops[0].cause, Cause::None);
        assert_eq!(ops[1].op, DeltaOp::Add);
        assert_eq!(ops[1].index, Some(0));
        assert_eq!(ops[1].cause, Cause::Insert);
        assert_eq!(ids(&client), vec![9, 1]);
    }

    #[test]
    fn moves_inside_the_window_are_one_operation() {
        let q = query(doc! {"n": 1}, 0, Some(4));
        let (mut w, mut client) = loaded(&q, 2, (1..=6).map(|i| doc! {"_id": i, "n": i}), true);
        let ops = w.upsert(&Arc::new(doc! {"_id": 1, "n": 3}), Cause::Update);
        check(&w, &mut client, 4, &ops);
        assert_eq!(ops.len(), 1, "{ops:?}");
        // n ties with document 3: ties break by _id.
        assert_eq!((ops[0].op, ops[0].old_index, ops[0].index), (DeltaOp::ChangeIndex, Some(0), Some(1)));
        let ops = w.upsert(&Arc::new(doc! {"_id": 4, "n": 0}), Cause::Update);
        check(&w, &mut client, 4, &ops);
        assert_eq!((ops[0].op, ops[0].old_index, ops[0].index), (DeltaOp::ChangeIndex, Some(3), Some(0)));
        let ops = w.upsert(&Arc::new(doc! {"_id": 2, "n": 2, "x": 1}), Cause::Update);
        check(&w, &mut client, 4, &ops);
        assert_eq!((ops.len(), ops[0].op), (1, DeltaOp::Change));
        // Out of the window: the next document slides in.
        let ops = w.upsert(&Arc::new(doc! {"_id": 4, "n": 100}), Cause::Update);
        check(&w, &mut client, 4, &ops);
        assert_eq!(ids(&client), vec![2, 1, 3, 5]);
    }

    #[test]
    fn skip_shifts_the_window() {
        let q = query(doc! {"n": 1}, 1, Some(2));
        let (mut w, mut client) = loaded(&q, 4, (1..=5).map(|i| doc! {"_id": i, "n": i}), true);
        assert_eq!(ids(&client), vec![2, 3]);
        let ops = w.remove(&DocId::Int32(1), Cause::Delete);
        check(&w, &mut client, 2, &ops);
        assert_eq!(ids(&client), vec![3, 4]);
        let ops = w.upsert(&Arc::new(doc! {"_id": 0, "n": 0}), Cause::Insert);
        check(&w, &mut client, 2, &ops);
        assert_eq!(ids(&client), vec![2, 3]);
    }

    #[test]
    fn draining_an_incomplete_buffer_needs_a_reload() {
        let q = query(doc! {"n": 1}, 0, Some(2));
        let (mut w, mut client) = loaded(&q, 1, (1..=3).map(|i| doc! {"_id": i, "n": i}), false);
        assert!(!w.needs_reload());
        // A document sorting after the known top cannot be placed.
        let ops = w.upsert(&Arc::new(doc! {"_id": 7, "n": 70}), Cause::Insert);
        assert!(ops.is_empty());
        assert_eq!(w.buffer.len(), 3);
        let ops = w.remove(&DocId::Int32(1), Cause::Delete);
        check(&w, &mut client, 2, &ops);
        assert!(w.might_drain());
        w.desync();
        assert!(w.remove(&DocId::Int32(2), Cause::Delete).is_empty());
        assert!(w.needs_reload());
        w.load([doc! {"_id": 3, "n": 3}, doc! {"_id": 4, "n": 4}, doc! {"_id": 7, "n": 70}].map(Arc::new), true);
        let ops = w.flush();
        check(&w, &mut client, 2, &ops);
        assert_eq!(ids(&client), vec![3, 4]);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Upsert(i32, i32),
        Remove(i32),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0i32..14, 0i32..6).prop_map(|(id, n)| Step::Upsert(id, n)),
            2 => (0i32..14).prop_map(Step::Remove),
        ]
    }

    proptest::proptest! {
        /// Drives a window the way the subscription stage does and checks the client's copy
        /// against the query's result after every write.
        #[test]
        fn client_copy_follows_the_window(
            steps in proptest::collection::vec(step(), 1..60),
            skip in 0u64..3,
            limit in 1u64..5,
            slack in 0usize..3,
            desc in proptest::bool::ANY,
            start_incomplete in proptest::bool::ANY,
        ) {
            let q = query(doc! {"n": if desc { -1 } else { 1 }}, skip, Some(limit));
            let mut truth: HashMap<i32, i32> = HashMap::default();
            let docs = |truth: &HashMap<i32, i32>| truth.iter().map(|(id, n)| doc! {"_id": *id, "n": *n}).collect::<Vec<_>>();
            let (mut w, mut client) = loaded(&q, slack, Vec::new(), !start_incomplete);
            for s in steps {
                if w.might_drain() {
                    w.desync();
                }
                let mut ops = match s {
                    Step::Upsert(id, n) => {
                        truth.insert(id, n);
                        w.upsert(&Arc::new(doc! {"_id": id, "n": n}), Cause::Update)
                    }
                    Step::Remove(id) => {
                        truth.remove(&id);
                        w.remove(&DocId::Int32(id), Cause::Delete)
                    }
                };
                if w.needs_reload() {
                    w.load(docs(&truth).into_iter().map(Arc::new), true);
                }
                ops.extend(w.flush());
                check(&w, &mut client, limit as usize, &ops);
                let expected: Vec<i32> = q.evaluate(&docs(&truth)).iter().map(|d| d.get_i32("_id").unwrap()).collect();
                proptest::prop_assert_eq!(ids(&client), expected);
            }
        }
    }
}
