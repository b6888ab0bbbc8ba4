//! Live pipelines: what a pipeline subscription keeps in the subscription stage, and the list
//! operations its deltas are made of.
//!
//! The grid matches a pipeline's first `$match` like a query's filter (its predicate index
//! finds the pipelines a write may concern), so the subscription stage learns exactly which
//! documents enter, stay in or leave that filter. Per member document a live pipeline keeps
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
use livegrid_protocol::Cause;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::BTreeMap;

use crate::doc_id::DocId;
use crate::slots::Slots;
use crate::window::{WindowOp, reconcile};

/// The state of one pipeline subscription.
pub struct LivePipeline {
    pipeline: Arc<Pipeline>,
    groups: Groups,
    /// What each member document (by slot) gave its groups.
    members: HashMap<u32, Kept>,
    /// The `$group` stage's output, by group key.
    outputs: BTreeMap<Ordered, Output>,
    /// When the stages after `$group` have the usual shape: those stages, and the outputs
    /// their `$match` admits, in their `$sort` order.
    sorted: Option<(Stages, Sorted)>,
    /// What the client holds: each document with its group's key, in order.
    shown: Vec<(DocId, Arc<Document>)>,
}

/// A member document's contributions as kept: encoded (compact), or as they are when BSON
/// cannot hold them.
#[derive(PartialEq)]
enum Kept {
    Encoded(Box<[u8]>),
    Plain(Vec<Contribution>),
}

impl Kept {
    fn new(contributions: Vec<Contribution>) -> Kept {
        match encode_contributions(&contributions) {
            Some(bytes) => Kept::Encoded(bytes.into_boxed_slice()),
            None => Kept::Plain(contributions),
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

/// One group's output.
struct Output {
    id: DocId,
    doc: Arc<Document>,
    /// Its key in the sorted outputs, when it is there.
    rank: Option<SortKey>,
}

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

impl LivePipeline {
    /// A live pipeline over `docs` (the documents its first `$match` admits), and its initial
    /// result.
    pub fn new(
        pipeline: Arc<Pipeline>,
        docs: impl IntoIterator<Item = Arc<Document>>,
        slots: &mut Slots,
    ) -> (Self, Vec<Arc<Document>>) {
        let mut live = LivePipeline {
            groups: pipeline.groups(),
            sorted: Stages::of(&pipeline.after).map(|stages| (stages, BTreeMap::new())),
            pipeline,
            members: HashMap::default(),
            outputs: BTreeMap::new(),
            shown: Vec::new(),
        };
        let mut touched = BTreeSet::new();
        for doc in docs {
            let id = DocId::new(doc.get("_id").unwrap_or(&bson::Bson::Null));
            live.put(slots, &id, Some(&doc), &mut touched);
        }
        live.refresh(&touched);
        live.shown = live.target();
        let docs = live.shown.iter().map(|(_, doc)| doc.clone()).collect();
        (live, docs)
    }

    /// Applies one write of document `id`: `doc` is its new version when it matches the first
    /// `$match`, `None` when it left it or was deleted. Returns the operations that bring the
    /// client's copy up to date; groups the write changed carry its `cause`, documents only
    /// pushed around by others none.
    pub fn apply(&mut self, slots: &mut Slots, id: &DocId, doc: Option<&Document>, cause: Cause) -> Vec<WindowOp> {
        let mut touched = BTreeSet::new();
        self.put(slots, id, doc, &mut touched);
        let changed = self.refresh(&touched);
        if changed.is_empty() {
            return Vec::new();
        }
        let target = self.target();
        let shown = std::mem::replace(&mut self.shown, target);
        reconcile(shown, &self.shown, |id| if changed.contains(id) { cause } else { Cause::None })
    }

    /// Lets go of the document slots it holds.
    pub fn release(self, slots: &mut Slots) {
        for slot in self.members.into_keys() {
            slots.release(slot);
        }
    }

    /// Replaces what document `id` gives the groups, noting the groups it touched.
    fn put(&mut self, slots: &mut Slots, id: &DocId, doc: Option<&Document>, touched: &mut BTreeSet<Ordered>) {
        let new = doc.map(|d| self.pipeline.contributions(d)).unwrap_or_default();
        let slot = slots.find(id);
        let old = slot.and_then(|slot| self.members.remove(&slot));
        let kept = (!new.is_empty()).then(|| Kept::new(new.clone()));
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

    /// Recomputes the outputs of the `touched` groups; returns the keys of those that changed.
    fn refresh(&mut self, touched: &BTreeSet<Ordered>) -> HashSet<DocId> {
        let mut changed = HashSet::default();
        for key in touched {
            let now = self.groups.groups.get_key_value(key).map(|(key, group)| self.pipeline.output(&key.0, group));
            let before = self.outputs.remove(key);
            if now.as_ref() == before.as_ref().map(|output| &*output.doc) {
                if let Some(output) = before {
                    self.outputs.insert(key.clone(), output);
                }
                continue;
            }
            let id = match &before {
                Some(output) => output.id.clone(),
                None => DocId::new(&key.0),
            };
            if let (Some((_, sorted)), Some(Output { rank: Some(rank), .. })) = (&mut self.sorted, &before) {
                sorted.remove(rank);
            }
            changed.insert(id.clone());
            let Some(doc) = now else { continue };
            let doc = Arc::new(doc);
            let mut rank = None;
            if let Some((stages, sorted)) = &mut self.sorted
                && stages.filter.as_ref().is_none_or(|filter| filter.matches(&doc))
            {
                let key = stages.sort.key(&doc);
                sorted.insert(key.clone(), (id.clone(), doc.clone()));
                rank = Some(key);
            }
            let group_key = Ordered(doc.get("_id").cloned().unwrap_or_default());
            self.outputs.insert(group_key, Output { id, doc, rank });
        }
        changed
    }

    /// The result: the stages after `$group` over the outputs (in key order).
    fn target(&self) -> Vec<(DocId, Arc<Document>)> {
        match &self.sorted {
            Some((stages, sorted)) => sorted
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
            None => {
                let outputs = self.outputs.values().map(|output| (output.id.clone(), output.doc.clone())).collect();
                self.pipeline.finish_keyed(outputs)
            }
        }
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
    fn groups_appear_change_move_and_leave() {
        let p = pipeline(vec![
            doc! {"$match": {"kind": "sale"}},
            doc! {"$group": {"_id": "$shop", "total": {"$sum": "$amount"}}},
            doc! {"$sort": {"total": -1}},
            doc! {"$limit": 2},
        ]);
        let mut slots = Slots::default();
        let docs = [
            doc! {"_id": 1, "kind": "sale", "shop": "a", "amount": 5},
            doc! {"_id": 2, "kind": "sale", "shop": "b", "amount": 3},
        ];
        let (mut live, initial) = LivePipeline::new(p.clone(), docs.iter().cloned().map(Arc::new), &mut slots);
        let mut client = initial;
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
        for (id, doc) in writes {
            let admitted = doc.as_ref().filter(|d| d.get_str("kind").ok() == Some("sale"));
            let ops = live.apply(&mut slots, &DocId::new(&Bson::Int32(id)), admitted, Cause::Update);
            apply_ops(&mut client, &ops);
            match doc {
                Some(d) => state.insert(id, d),
                None => state.remove(&id),
            };
            let want = p.evaluate(state.values());
            let got: Vec<Document> = client.iter().map(|d| (**d).clone()).collect();
            assert_eq!(got, want, "after writing {id}");
        }
        live.release(&mut slots);
        assert_eq!(slots.find(&DocId::new(&Bson::Int32(2))), None, "slots are given back");
    }

    #[test]
    fn a_write_the_pipeline_does_not_read_sends_nothing() {
        let p = pipeline(vec![doc! {"$group": {"_id": "$shop", "n": {"$sum": 1}}}]);
        let mut slots = Slots::default();
        let (mut live, _) = LivePipeline::new(p, [Arc::new(doc! {"_id": 1, "shop": "a", "x": 1})], &mut slots);
        let ops = live.apply(
            &mut slots,
            &DocId::new(&Bson::Int32(1)),
            Some(&doc! {"_id": 1, "shop": "a", "x": 2}),
            Cause::Update,
        );
        assert!(ops.is_empty());
    }
}
