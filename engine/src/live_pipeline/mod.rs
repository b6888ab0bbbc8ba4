//! Live pipelines: a subscription whose result is an aggregation pipeline's output, kept
//! current by three stages of the grid's dataflow.
//!
//! ```text
//! matching ──transitions──▶ members (by core) ──contributions──▶ groups (by core, group key) ──outputs──▶ views (by core)
//! ```
//!
//! - A pipeline's state up to `$group` is a **core**, shared by every subscription to the same
//!   namespace, first `$match` (ACL included) and stages through `$group`; the grid matches
//!   the core's first `$match` like a query's filter (its predicate index finds the pipelines
//!   a write may concern), so the members stage learns exactly which documents enter, stay in
//!   or leave it.
//! - [`members`]: per member document, what it gives its groups (its contributions, see
//!   [`livegrid_matcher::pipeline::Contribution`]). A write sends the group stage the
//!   contributions it takes out and puts in, one record per group it touches; a write whose
//!   contributions are unchanged (it changed a field the pipeline does not read) costs one
//!   comparison and sends nothing.
//! - [`groups`]: the retractable accumulator states of each group, spread over the workers
//!   by a hash of (core, group key), so a pipeline with many groups is worked on by every
//!   worker, and a write costs work in the groups it touches, never in the collection.
//! - [`views`]: each core's group outputs, and its **views**: the stages after `$group` with
//!   what their clients hold. Subscriptions with the same stages after `$group` share a view.
//!   A view attaches without reading the database: its initial result is the core's state,
//!   exact at the position the attach is applied at.

pub mod groups;
pub mod members;
pub mod views;

pub use groups::GroupStage;
pub use members::Members;
pub use views::{Change, Outputs, View, Views};

use std::sync::Arc;

use bson::{Bson, Document};
use livegrid_matcher::Pipeline;
use livegrid_protocol::{Cause, Position};

use crate::doc_id::DocId;
use crate::records::{GroupInput, ViewInput, WirePipeline};
use crate::slots::Slots;
use members::{At, contribute};

/// One core's members, groups and outputs driven on one thread, without the grid (as a
/// one-worker grid runs them): for tests and benchmarks of a pipeline's own state.
pub struct Local {
    members: Members,
    groups: GroupStage,
    outputs: Outputs,
}

impl Local {
    /// The core of pipeline `stages` over `docs` (those its first `$match` admits).
    ///
    /// # Panics
    /// When the stages are not a valid pipeline.
    pub fn new(stages: Vec<Bson>, docs: &[Document], slots: &mut Slots) -> Local {
        let compiled = Arc::new(Pipeline::parse(&stages).expect("a valid pipeline"));
        let docs = docs.iter().cloned().map(Arc::new);
        let (members, changes) = Members::new(compiled.clone(), docs, Position::ZERO, slots);
        let pipeline = WirePipeline::new(stages, compiled);
        let mut inputs = vec![GroupInput::Start { target: 0, core: 0, pipeline, position: Position::ZERO }];
        contribute(0, changes, At { position: Position::ZERO, cause: Cause::None, entered: 0 }, &mut inputs);
        let mut local = Local { members, groups: GroupStage::default(), outputs: Outputs::default() };
        local.run(inputs);
        local
    }

    /// The group outputs.
    pub fn outputs(&self) -> &Outputs {
        &self.outputs
    }

    /// Applies a write of document `id` (`doc`: its new version when the first `$match`
    /// admits it) at `position`; returns the group outputs it changed, or `None` when the core
    /// has the write already.
    pub fn write(
        &mut self,
        slots: &mut Slots,
        id: &DocId,
        doc: Option<&Document>,
        position: Position,
    ) -> Option<Vec<Change>> {
        let changes = self.members.apply(slots, id, doc, position)?;
        let mut inputs = Vec::new();
        contribute(0, changes, At { position, cause: Cause::Update, entered: 0 }, &mut inputs);
        Some(self.run(inputs))
    }

    /// Lets go of the document slots it holds.
    pub fn release(self, slots: &mut Slots) {
        self.members.release(slots);
    }

    fn run(&mut self, mut inputs: Vec<GroupInput>) -> Vec<Change> {
        let mut out = Vec::new();
        self.groups.apply(&mut inputs, &mut out);
        let mut changes = Vec::new();
        for input in out {
            if let ViewInput::Outputs { groups, .. } = input {
                changes.extend(self.outputs.apply(groups.into_iter().map(|(k, d)| (k.0, d.map(|d| d.0)))));
            }
        }
        changes
    }
}
