//! Live pipelines: what pipeline subscriptions keep in the subscription stage, and the list
//! operations their deltas are made of.
//!
//! A pipeline's state is split in two. The [`Core`] holds what depends on the stages up to
//! `$group`: it is registered with the grid once for all subscriptions to the same namespace,
//! first `$match` (ACL included) and stages through `$group`, which share it. Each subscription
//! is a [`View`] of a core: the stages after `$group` and what its client holds. A view attaches
//! to a core without reading the database (its initial result is the core's state, exact at the
//! position the attach is applied at) and is updated from the core's changes.
//!
//! The grid matches a core's first `$match` like a query's filter (its predicate index finds
//! the pipelines a write may concern), so the subscription stage learns exactly which
//! documents enter, stay in or leave that filter. Per member document a core keeps
//! what the document gave its groups (its contributions, see
//! [`livegrid_matcher::pipeline::Contribution`]); a write takes the old ones out of their
//! groups and puts the new ones in, so it costs work in proportion to the groups it touches,
//! never to the collection. A write whose contributions are unchanged (it changed a field the
//! pipeline does not read) costs one comparison and sends nothing.
//!
//! The group outputs are kept, shared. When the stages after `$group` have the shape nearly
//! every pipeline has (`$match`, `$sort`, `$skip`, `$limit`, `$project`, each at most once, in
//! that order), the outputs the `$match` admits are also kept in sort order, so a write costs
//! `O(log groups + skip + limit)` to find the new result; any other sequence of stages runs
//! over all outputs again (`O(groups)`). The new result is compared with what the client holds
//! ([`crate::window::reconcile`], in proportion to what is shown).

use std::collections::BTreeSet;
use std::sync::Arc;

use bson::Document;
use livegrid_matcher::pipeline::accumulator::Ordered;
use livegrid_matcher::pipeline::{After, Contribution, Groups, decode_contributions, encode_contributions};
use livegrid_matcher::{Filter, Pipeline, Projection, SortKey, SortSpec};
use livegrid_protocol::{Cause, Position};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::BTreeMap;

use crate::doc_id::DocId;
use crate::slots::Slots;
use crate::window::{WindowOp, reconcile};

/// What subscriptions to the same pipeline (through `$group`) share: the groups.
pub struct Core {
    pipeline: Arc<Pipeline>,
    groups: Groups,
    /// What each member document (by slot) gave its groups.
    members: HashMap<u32, Kept>,
    /// The `$group` stage's output, by group key.
    outputs: BTreeMap<Ordered, (DocId, Arc<Document>)>,
    /// The position the core is exact at: writes at or below it are in.
    position: Position,
}

/// A group output a write changed.
pub struct Change {
    /// The group's key.
    pub id: DocId,
    /// Its output after the write; `None` when the group is gone.
    pub after: Option<Arc<Document>>,
}

impl Core {
    /// A core over `docs` (the documents its first `$match` admits) as read at `position`.
    pub fn new(
        pipeline: Arc<Pipeline>,
        docs: impl IntoIterator<Item = Arc<Document>>,
        position: Position,
        slots: &mut Slots,
    ) -> Core {
        let mut core = Core {
            groups: pipeline.groups(),
            pipeline,
            members: HashMap::default(),
            outputs: BTreeMap::new(),
            position,
        };
        let mut touched = BTreeSet::new();
        for doc in docs {
            let id = DocId::new(doc.get("_id").unwrap_or(&bson::Bson::Null));
            core.put(slots, &id, Some(&doc), &mut touched);
        }
        core.refresh(&touched);
        core
    }

    /// The position the core is exact at.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Applies one write of document `id` at `position`: `doc` is its new version when it
    /// matches the first `$match`, `None` when it left it or was deleted. Returns the group
    /// outputs it changed, or `None` when the core has the write already.
    pub fn apply(
        &mut self,
        slots: &mut Slots,
        id: &DocId,
        doc: Option<&Document>,
        position: Position,
    ) -> Option<Vec<Change>> {
        if position <= self.position {
            return None;
        }
        self.position = position;
        let mut touched = BTreeSet::new();
        self.put(slots, id, doc, &mut touched);
        Some(self.refresh(&touched))
    }

    /// Lets go of the document slots it holds.
    pub fn release(self, slots: &mut Slots) {
        for slot in self.members.into_keys() {
            slots.release(slot);
        }
    }

    /// The group outputs, in key order.
    fn outputs(&self) -> impl Iterator<Item = &(DocId, Arc<Document>)> {
        self.outputs.values()
    }

    /// Replaces what document `id` gives the groups, noting the groups it touched.
    fn put(&mut self, slots: &mut Slots, id: &DocId, doc: Option<&Document>, touched: &mut BTreeSet<Ordered>) {
        let new = doc.map(|d| self.pipeline.contributions(d)).unwrap_or_default();
        let slot = slots.find(id);
        let old = slot.and_then(|slot| self.members.remove(&slot));
        let kept = (!new.is_empty()).then(|| Kept::new(&new));
        if let (Some(slot), Some(_)) = (slot, &old)
            && old == kept
        {
            // Nothing the pipeline reads changed.
            self.members.insert(slot, old.expect("checked"));
            return;
        }
        let held = old.is_some();
        for contribution in old.map(Kept::contributions).iter().flatten() {
            self.groups.change(contribution, -1);
            touched.insert(Ordered(contribution.key.clone()));
        }
        for contribution in &new {
            self.groups.change(contribution, 1);
            touched.insert(Ordered(contribution.key.clone()));
        }
        match (slot.filter(|_| held), kept) {
            (Some(slot), None) => slots.release(slot),
            (Some(slot), Some(kept)) => {
                self.members.insert(slot, kept);
            }
            (None, Some(kept)) => {
                let slot = slots.acquire(id);
                self.members.insert(slot, kept);
            }
            (None, None) => {}
        }
    }

    /// Recomputes the outputs of the `touched` groups; returns those that changed.
    fn refresh(&mut self, touched: &BTreeSet<Ordered>) -> Vec<Change> {
        let mut changes = Vec::new();
        for key in touched {
            let now = self.groups.groups.get_key_value(key).map(|(key, group)| self.pipeline.output(&key.0, group));
            let before = self.outputs.remove(key);
            if now.as_ref() == before.as_ref().map(|(_, doc)| &**doc) {
                if let Some(output) = before {
                    self.outputs.insert(key.clone(), output);
                }
                continue;
            }
            let id = before.map_or_else(|| DocId::new(&key.0), |(id, _)| id);
            let after = now.map(Arc::new);
            if let Some(doc) = &after {
                let group_key = Ordered(doc.get("_id").cloned().unwrap_or_default());
                self.outputs.insert(group_key, (id.clone(), doc.clone()));
            }
            changes.push(Change { id, after });
        }
        changes
    }
}

/// A view of a core: the stages after `$group`, and what its clients hold (subscriptions with
/// the same stages after `$group` share one view).
pub struct View {
    after: Following,
    /// What the client holds: each document with its group's key, in order.
    shown: Vec<(DocId, Arc<Document>)>,
}

/// A view's stages after `$group`.
#[allow(clippy::large_enum_variant, reason = "one per view, and few views per core")]
enum Following {
    /// The usual shape: those stages, and the outputs their `$match` admits in their `$sort`
    /// order, with each group's place (no copy of the pipeline is kept).
    Sorted(Stages, Sorted, HashMap<DocId, SortKey>),
    /// Any other sequence: the pipeline, to run them over all outputs.
    Other(Arc<Pipeline>),
}

impl View {
    /// A view of `core` through `pipeline`'s stages after `$group` (its stages before are the
    /// core's), and its initial result.
    pub fn new(pipeline: Arc<Pipeline>, core: &Core) -> (View, Vec<Arc<Document>>) {
        let after = match Stages::of(&pipeline.after) {
            Some(stages) => Following::Sorted(stages, BTreeMap::new(), HashMap::default()),
            None => Following::Other(pipeline),
        };
        let mut view = View { after, shown: Vec::new() };
        for (id, doc) in core.outputs() {
            view.place(id, Some(doc));
        }
        view.shown = view.target(core);
        let docs = view.shown.iter().map(|(_, doc)| doc.clone()).collect();
        (view, docs)
    }

    /// What its clients hold.
    pub fn shown(&self) -> Vec<Arc<Document>> {
        self.shown.iter().map(|(_, doc)| doc.clone()).collect()
    }

    /// Applies the changes a write made to the core; returns the operations that bring the
    /// client's copy up to date (groups the write changed carry its `cause`, documents only
    /// pushed around by others none).
    pub fn apply(&mut self, core: &Core, changes: &[Change], cause: Cause) -> Vec<WindowOp> {
        if changes.is_empty() {
            return Vec::new();
        }
        for change in changes {
            self.place(&change.id, change.after.as_ref());
        }
        let target = self.target(core);
        let shown = std::mem::replace(&mut self.shown, target);
        let changed: HashSet<&DocId> = changes.iter().map(|change| &change.id).collect();
        reconcile(shown, &self.shown, |id| if changed.contains(id) { cause } else { Cause::None })
    }

    /// Puts group `id`'s new output (or its absence) in its place in the sorted outputs.
    fn place(&mut self, id: &DocId, doc: Option<&Arc<Document>>) {
        let Following::Sorted(stages, sorted, ranks) = &mut self.after else { return };
        if let Some(rank) = ranks.remove(id) {
            sorted.remove(&rank);
        }
        if let Some(doc) = doc
            && stages.filter.as_ref().is_none_or(|filter| filter.matches(doc))
        {
            let rank = stages.sort.key(doc);
            sorted.insert(rank.clone(), (id.clone(), doc.clone()));
            ranks.insert(id.clone(), rank);
        }
    }

    /// The result: the stages after `$group` over the core's outputs.
    fn target(&self, core: &Core) -> Vec<(DocId, Arc<Document>)> {
        match &self.after {
            Following::Sorted(stages, sorted, _) => sorted
                .values()
                .skip(stages.skip)
                .take(stages.limit.unwrap_or(usize::MAX))
                .map(|(id, doc)| {
                    let doc = match &stages.projection {
                        Some(projection) => Arc::new(projection.apply(doc)),
                        None => doc.clone(),
                    };
                    (id.clone(), doc)
                })
                .collect(),
            Following::Other(pipeline) => pipeline.finish_keyed(core.outputs().cloned().collect()),
        }
    }
}

/// A member document's contributions as kept: encoded (compact), or as they are when BSON
/// cannot hold them.
#[derive(PartialEq)]
enum Kept {
    Encoded(Box<[u8]>),
    Plain(Vec<Contribution>),
}

impl Kept {
    fn new(contributions: &[Contribution]) -> Kept {
        match encode_contributions(contributions) {
            Some(bytes) => Kept::Encoded(bytes.into_boxed_slice()),
            None => Kept::Plain(contributions.to_vec()),
        }
    }

    fn contributions(self) -> Vec<Contribution> {
        match self {
            Kept::Encoded(bytes) => decode_contributions(&bytes).expect("contributions decode as encoded"),
            Kept::Plain(contributions) => contributions,
        }
    }
}

/// Group outputs in result order, each with its group's key.
type Sorted = BTreeMap<SortKey, (DocId, Arc<Document>)>;

/// The stages after `$group` when they are `$match`, `$sort`, `$skip`, `$limit`, `$project`,
/// each at most once, in that order.
struct Stages {
    filter: Option<Filter>,
    sort: SortSpec,
    skip: usize,
    limit: Option<usize>,
    projection: Option<Projection>,
}

impl Stages {
    fn of(after: &[After]) -> Option<Stages> {
        let mut stages = Stages { filter: None, sort: SortSpec::default(), skip: 0, limit: None, projection: None };
        let mut step = 0;
        for stage in after {
            let at = match stage {
                After::Match(filter) => {
                    stages.filter = Some(filter.clone());
                    1
                }
                After::Sort(sort) => {
                    stages.sort = sort.clone();
                    2
                }
                After::Skip(n) => {
                    stages.skip = usize::try_from(*n).unwrap_or(usize::MAX);
                    3
                }
                After::Limit(n) => {
                    stages.limit = Some(usize::try_from(*n).unwrap_or(usize::MAX));
                    4
                }
                After::Project(projection) => {
                    stages.projection = Some(projection.clone());
                    5
                }
            };
            if at <= step {
                return None;
            }
            step = at;
        }
        Some(stages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{Bson, doc};

    use crate::window::apply_ops;

    fn pipeline(stages: Vec<Document>) -> Arc<Pipeline> {
        let stages: Vec<Bson> = stages.into_iter().map(Bson::Document).collect();
        Arc::new(Pipeline::parse(&stages).expect("pipeline"))
    }

    #[test]
    fn groups_appear_change_move_and_leave_in_every_view() {
        let top = pipeline(vec![
            doc! {"$match": {"kind": "sale"}},
            doc! {"$group": {"_id": "$shop", "total": {"$sum": "$amount"}}},
            doc! {"$sort": {"total": -1}},
            doc! {"$limit": 2},
        ]);
        let all = pipeline(vec![
            doc! {"$match": {"kind": "sale"}},
            doc! {"$group": {"_id": "$shop", "total": {"$sum": "$amount"}}},
            doc! {"$project": {"total": 1}},
            doc! {"$skip": 1},
        ]);
        let mut slots = Slots::default();
        let docs = [
            doc! {"_id": 1, "kind": "sale", "shop": "a", "amount": 5},
            doc! {"_id": 2, "kind": "sale", "shop": "b", "amount": 3},
        ];
        let mut core = Core::new(top.clone(), docs.iter().cloned().map(Arc::new), 0.into(), &mut slots);
        let mut views: Vec<(Arc<Pipeline>, View, Vec<Arc<Document>>)> = [top, all]
            .into_iter()
            .map(|p| {
                let (view, initial) = View::new(p.clone(), &core);
                (p, view, initial)
            })
            .collect();
        let mut state: std::collections::BTreeMap<i32, Document> =
            docs.iter().map(|d| (d.get_i32("_id").unwrap(), d.clone())).collect();
        let writes = [
            (3, Some(doc! {"_id": 3, "kind": "sale", "shop": "c", "amount": 10})),
            (2, Some(doc! {"_id": 2, "kind": "sale", "shop": "b", "amount": 30})),
            (2, Some(doc! {"_id": 2, "kind": "sale", "shop": "b", "amount": 30, "note": "x"})),
            (1, None),
            (3, Some(doc! {"_id": 3, "kind": "refund", "shop": "c", "amount": 10})),
            (4, Some(doc! {"_id": 4, "kind": "sale", "shop": "a", "amount": 1})),
        ];
        for (position, (id, doc)) in writes.into_iter().enumerate() {
            let admitted = doc.as_ref().filter(|d| d.get_str("kind").ok() == Some("sale"));
            let id_key = DocId::new(&Bson::Int32(id));
            let position = Position::from(position as u64 + 1);
            let changes = core.apply(&mut slots, &id_key, admitted, position).expect("a new write");
            assert!(core.apply(&mut slots, &id_key, admitted, position).is_none(), "a write is applied once");
            match doc {
                Some(d) => state.insert(id, d),
                None => state.remove(&id),
            };
            for (p, view, client) in &mut views {
                let ops = view.apply(&core, &changes, Cause::Update);
                apply_ops(client, &ops);
                let got: Vec<Document> = client.iter().map(|d| (**d).clone()).collect();
                assert_eq!(got, p.evaluate(state.values()), "after writing {id}");
            }
        }
        core.release(&mut slots);
        assert_eq!(slots.find(&DocId::new(&Bson::Int32(2))), None, "slots are given back");
    }

    #[test]
    fn a_write_the_pipeline_does_not_read_changes_nothing() {
        let p = pipeline(vec![doc! {"$group": {"_id": "$shop", "n": {"$sum": 1}}}]);
        let mut slots = Slots::default();
        let mut core = Core::new(p, [Arc::new(doc! {"_id": 1, "shop": "a", "x": 1})], 0.into(), &mut slots);
        let id = DocId::new(&Bson::Int32(1));
        let changes = core.apply(&mut slots, &id, Some(&doc! {"_id": 1, "shop": "a", "x": 2}), 1.into());
        assert!(changes.expect("a new write").is_empty());
    }
}
