//! The view stage of live pipelines: per core, its groups' outputs, and its views (the
//! stages after `$group`, and what their clients hold).
//!
//! When the stages after `$group` have the shape nearly every pipeline has (`$match`,
//! `$sort`, `$skip`, `$limit`, `$project`, each at most once, in that order), a view keeps the
//! outputs its `$match` admits in sort order, so a write costs `O(log groups + skip + limit)`
//! to find the new result; any other sequence of stages runs over all outputs again
//! (`O(groups)`). The new result is compared with what the clients hold
//! ([`crate::window::reconcile`], in proportion to what is shown). One write's outputs, from
//! every group-stage worker, are applied together.

use std::collections::BTreeMap;
use std::sync::Arc;

use bson::{Bson, Document};
use livegrid_matcher::pipeline::After;
use livegrid_matcher::pipeline::accumulator::Ordered;
use livegrid_matcher::{Filter, Pipeline, Projection, SortKey, SortSpec};
use livegrid_protocol::{Cause, Frame, Position, ResultFrame};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::doc_id::DocId;
use crate::frames::Frames;
use crate::query_index::QueryKey;
use crate::records::{Attach, StageOutput, ViewInput};
use crate::window::{WindowOp, reconcile};

/// A core's group outputs, by group key.
#[derive(Default)]
pub struct Outputs {
    outputs: BTreeMap<Ordered, (DocId, Arc<Document>)>,
}

/// A group output a write changed.
pub struct Change {
    /// The group's key.
    pub id: DocId,
    /// Its output after the write; `None` when the group is gone.
    pub after: Option<Arc<Document>>,
}

impl Outputs {
    /// Takes in the outputs of the groups a write touched (`None`: the group is gone);
    /// returns those that changed.
    pub fn apply(&mut self, groups: impl IntoIterator<Item = (Bson, Option<Arc<Document>>)>) -> Vec<Change> {
        let mut changes = Vec::new();
        for (key, now) in groups {
            let key = Ordered(key);
            let before = self.outputs.remove(&key);
            if now.as_deref() == before.as_ref().map(|(_, doc)| &**doc) {
                if let Some(output) = before {
                    self.outputs.insert(key, output);
                }
                continue;
            }
            // A group keeps its id while it exists (its key may be 1 or 1.0).
            let id = before.map_or_else(|| DocId::new(&key.0), |(id, _)| id);
            if let Some(doc) = &now {
                let group_key = Ordered(doc.get("_id").cloned().unwrap_or_default());
                self.outputs.insert(group_key, (id.clone(), doc.clone()));
            }
            changes.push(Change { id, after: now });
        }
        changes
    }

    /// The outputs, in key order.
    fn iter(&self) -> impl Iterator<Item = &(DocId, Arc<Document>)> {
        self.outputs.values()
    }
}

/// Subscriptions to one core whose stages after `$group` are the same: one view serves them
/// all, and each gets its operations (with its own `seq`).
struct Watchers {
    stages: Vec<u8>,
    view: View,
    keys: Vec<QueryKey>,
}

/// A core as the view stage holds it.
#[derive(Default)]
struct CoreViews {
    outputs: Outputs,
    watchers: Vec<Watchers>,
    /// The last position applied.
    position: Position,
}

/// The view stage's state on one worker.
#[derive(Default)]
pub struct Views {
    cores: HashMap<QueryKey, CoreViews>,
    /// Each subscription's last `seq`, and the position its result started at.
    seqs: HashMap<QueryKey, (u64, Position)>,
    frames: Frames,
}

impl Views {
    /// Applies the inputs of one complete timestamp (draining them). Outputs gather in `out`
    /// and are handed to `flush` as in [`crate::subscription::Subscriptions::apply`].
    pub fn apply(
        &mut self,
        inputs: &mut Vec<ViewInput>,
        out: &mut Vec<StageOutput>,
        flush: &mut dyn FnMut(&mut Vec<StageOutput>),
    ) {
        // One write's outputs for one core, from several group-stage workers, end up side by side.
        inputs.sort_unstable_by_key(|input| (input.order(), input.core()));
        self.frames.begin();
        let mut inputs = inputs.drain(..).peekable();
        while let Some(mut input) = inputs.next() {
            if let ViewInput::Outputs { core, position, groups, .. } = &mut input {
                while let Some(ViewInput::Outputs { core: next_core, position: next_position, .. }) = inputs.peek()
                    && (*next_core, *next_position) == (*core, *position)
                {
                    if let Some(ViewInput::Outputs { groups: more, .. }) = inputs.next() {
                        groups.extend(more);
                    }
                }
            }
            let time = input.order().0.time();
            self.frames.next(time, inputs.peek().map(|next| next.order().0.time()), out, flush);
            match input {
                ViewInput::Start { core, position } => {
                    self.cores.insert(core, CoreViews { position, ..CoreViews::default() });
                }
                ViewInput::Outputs { core, position, cause, entered, groups } => {
                    let groups = groups.into_iter().map(|(key, doc)| (key.0, doc.map(|d| d.0)));
                    self.outputs(core, (position, entered), cause, groups, out);
                }
                ViewInput::Attach(attach) => self.attach(*attach, out),
                ViewInput::Detach { core, view } => {
                    self.seqs.remove(&view);
                    if let Some(views) = self.cores.get_mut(&core) {
                        for watchers in views.watchers.iter_mut() {
                            watchers.keys.retain(|k| *k != view);
                        }
                        views.watchers.retain(|watchers| !watchers.keys.is_empty());
                    }
                }
                ViewInput::Drop { core } => {
                    for watchers in self.cores.remove(&core).map(|views| views.watchers).unwrap_or_default() {
                        for view in watchers.keys {
                            self.seqs.remove(&view);
                        }
                    }
                }
            }
        }
    }

    /// A pipeline subscription attaches to its core: its initial result is the core's state
    /// through its stages after `$group` (a view other subscriptions may share already).
    fn attach(&mut self, attach: Attach, out: &mut Vec<StageOutput>) {
        let Some(views) = self.cores.get_mut(&attach.core) else {
            // The core is registered before its views.
            debug_assert!(false, "a view attached to a missing core");
            return;
        };
        let stages = attach.pipeline.after_group();
        let docs = match views.watchers.iter_mut().find(|watchers| watchers.stages == stages) {
            Some(watchers) => {
                watchers.keys.push(attach.view);
                watchers.view.shown()
            }
            None => {
                // It compiled at registration.
                let Ok(pipeline) = attach.pipeline.compile() else { return };
                let (view, docs) = View::new(pipeline, &views.outputs);
                views.watchers.push(Watchers { stages, view, keys: vec![attach.view] });
                docs
            }
        };
        let position = attach.position.max(views.position);
        let docs = docs.iter().map(|d| self.frames.encode(d, None)).collect();
        let frame = Frame::Result(ResultFrame { seq: 1, docs, position });
        out.push(StageOutput::Frame { key: attach.view, frame, entered: 0 });
        self.seqs.insert(attach.view, (1, position));
    }

    /// Applies one write's group outputs to a core, and what they changed to its views.
    fn outputs(
        &mut self,
        core: QueryKey,
        at: (Position, u64),
        cause: Cause,
        groups: impl IntoIterator<Item = (Bson, Option<Arc<Document>>)>,
        out: &mut Vec<StageOutput>,
    ) {
        let Views { cores, seqs, frames } = self;
        let Some(views) = cores.get_mut(&core) else { return };
        views.position = views.position.max(at.0);
        let changes = views.outputs.apply(groups);
        if changes.is_empty() {
            return;
        }
        for watchers in &mut views.watchers {
            let ops = watchers.view.apply(&views.outputs, &changes, cause);
            if ops.is_empty() {
                continue;
            }
            for key in &watchers.keys {
                if let Some((seq, since)) = seqs.get_mut(key) {
                    // Every write a core applies after a view attached is past its start.
                    debug_assert!(at.0 > *since, "a write at or below a view's start");
                    frames.emit(out, *key, seq, ops.clone(), at);
                }
            }
        }
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
    /// A view of a core's `outputs` through `pipeline`'s stages after `$group` (its stages
    /// before are the core's), and its initial result.
    pub fn new(pipeline: Arc<Pipeline>, outputs: &Outputs) -> (View, Vec<Arc<Document>>) {
        let after = match Stages::of(&pipeline.after) {
            Some(stages) => Following::Sorted(stages, BTreeMap::new(), HashMap::default()),
            None => Following::Other(pipeline),
        };
        let mut view = View { after, shown: Vec::new() };
        for (id, doc) in outputs.iter() {
            view.place(id, Some(doc));
        }
        view.shown = view.target(outputs);
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
    pub fn apply(&mut self, outputs: &Outputs, changes: &[Change], cause: Cause) -> Vec<WindowOp> {
        if changes.is_empty() {
            return Vec::new();
        }
        for change in changes {
            self.place(&change.id, change.after.as_ref());
        }
        let target = self.target(outputs);
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
    fn target(&self, outputs: &Outputs) -> Vec<(DocId, Arc<Document>)> {
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
            Following::Other(pipeline) => pipeline.finish_keyed(outputs.iter().cloned().collect()),
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
    use bson::doc;

    use crate::live_pipeline::Local;
    use crate::live_pipeline::members::{At, Members, contribute};
    use crate::slots::Slots;
    use crate::window::apply_ops;

    fn pipeline(stages: &[Document]) -> (Vec<Bson>, Arc<Pipeline>) {
        let stages: Vec<Bson> = stages.iter().cloned().map(Bson::Document).collect();
        let compiled = Arc::new(Pipeline::parse(&stages).expect("pipeline"));
        (stages, compiled)
    }

    #[test]
    fn groups_appear_change_move_and_leave_in_every_view() {
        let top = [
            doc! {"$match": {"kind": "sale"}},
            doc! {"$group": {"_id": "$shop", "total": {"$sum": "$amount"}}},
            doc! {"$sort": {"total": -1}},
            doc! {"$limit": 2},
        ];
        let all = [
            doc! {"$match": {"kind": "sale"}},
            doc! {"$group": {"_id": "$shop", "total": {"$sum": "$amount"}}},
            doc! {"$project": {"total": 1}},
            doc! {"$skip": 1},
        ];
        let mut slots = Slots::default();
        let docs = [
            doc! {"_id": 1, "kind": "sale", "shop": "a", "amount": 5},
            doc! {"_id": 2, "kind": "sale", "shop": "b", "amount": 3},
        ];
        let mut chain = Local::new(pipeline(&top).0, &docs, &mut slots);
        let mut views: Vec<(Arc<Pipeline>, View, Vec<Arc<Document>>)> = [&top[..], &all[..]]
            .into_iter()
            .map(|stages| {
                let p = pipeline(stages).1;
                let (view, initial) = View::new(p.clone(), chain.outputs());
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
            let changes = chain.write(&mut slots, &id_key, admitted, position).expect("a new write");
            assert!(chain.write(&mut slots, &id_key, admitted, position).is_none(), "a write is applied once");
            match doc {
                Some(d) => state.insert(id, d),
                None => state.remove(&id),
            };
            for (p, view, client) in &mut views {
                let ops = view.apply(chain.outputs(), &changes, Cause::Update);
                apply_ops(client, &ops);
                let got: Vec<Document> = client.iter().map(|d| (**d).clone()).collect();
                assert_eq!(got, p.evaluate(state.values()), "after writing {id}");
            }
        }
        chain.release(&mut slots);
        assert_eq!(slots.find(&DocId::new(&Bson::Int32(2))), None, "slots are given back");
    }

    #[test]
    fn a_write_the_pipeline_does_not_read_changes_nothing() {
        let stages = [doc! {"$group": {"_id": "$shop", "n": {"$sum": 1}}}];
        let mut slots = Slots::default();
        let mut chain = Local::new(pipeline(&stages).0, &[doc! {"_id": 1, "shop": "a", "x": 1}], &mut slots);
        let id = DocId::new(&Bson::Int32(1));
        let changes = chain.write(&mut slots, &id, Some(&doc! {"_id": 1, "shop": "a", "x": 2}), 1.into());
        assert!(changes.expect("a new write").is_empty());
    }

    #[test]
    fn equal_group_keys_of_different_types_meet_on_one_worker() {
        let stages = [doc! {"$group": {"_id": "$k", "n": {"$sum": 1}}}];
        let (_, compiled) = pipeline(&stages);
        let mut slots = Slots::default();
        let docs = [doc! {"_id": 1, "k": 1}, doc! {"_id": 2, "k": 1.0}, doc! {"_id": 3, "k": 1_i64}];
        let (_, changes) = Members::new(compiled, docs.iter().cloned().map(Arc::new), 0.into(), &mut slots);
        let mut out = Vec::new();
        contribute(7, changes, At { position: 0.into(), cause: Cause::None, entered: 0 }, &mut out);
        assert_eq!(out.len(), 1, "1, 1.0 and 1 (int64) are one group, sent to one worker");
    }

    #[test]
    fn a_cores_groups_spread_over_the_workers() {
        let stages = [doc! {"$group": {"_id": "$k", "n": {"$sum": 1}}}];
        let (_, compiled) = pipeline(&stages);
        let mut slots = Slots::default();
        let docs: Vec<Arc<Document>> = (0..64).map(|i| Arc::new(doc! {"_id": i, "k": i})).collect();
        let (_, changes) = Members::new(compiled, docs, 0.into(), &mut slots);
        let mut out = Vec::new();
        contribute(7, changes, At { position: 0.into(), cause: Cause::None, entered: 0 }, &mut out);
        let workers: std::collections::BTreeSet<u64> = out.iter().map(|input| input.route() % 4).collect();
        assert_eq!(workers.len(), 4, "64 groups reach each of 4 workers");
    }
}
