//! The group stage of live pipelines: the accumulator states of the groups of every core,
//! spread over the workers by a hash of (core, group key). Each worker holds, per core, the
//! groups whose keys hash to it; a write's contributions reach only the workers of the groups
//! it touches, and each of those sends the view stage the touched groups' outputs.

use std::collections::BTreeSet;
use std::sync::Arc;

use livegrid_matcher::Pipeline;
use livegrid_matcher::pipeline::Groups;
use livegrid_matcher::pipeline::accumulator::Ordered;
use livegrid_protocol::{Cause, Position};
use rustc_hash::FxHashMap as HashMap;

use crate::query_index::QueryKey;
use crate::records::{GroupInput, ViewInput, WirePipeline};
use crate::wire::{WireDoc, WireValue};

/// The group stage's state on one worker.
#[derive(Default)]
pub struct GroupStage {
    cores: HashMap<QueryKey, (Arc<Pipeline>, Groups)>,
}

/// The groups one write touched on this worker, for one core.
struct Touched {
    core: QueryKey,
    position: Position,
    cause: Cause,
    entered: u64,
    keys: BTreeSet<Ordered>,
}

impl GroupStage {
    /// Applies the inputs of one complete timestamp (draining them); what the view stage
    /// needs goes to `out`.
    pub fn apply(&mut self, inputs: &mut Vec<GroupInput>, out: &mut Vec<ViewInput>) {
        // A core's contributions at one position go to different groups, so their order among
        // themselves does not matter.
        inputs.sort_unstable_by_key(|input| (input.order(), input.core()));
        let mut touched: Option<Touched> = None;
        for input in inputs.drain(..) {
            match input {
                GroupInput::Start { core, pipeline, .. } => {
                    // It compiled at registration.
                    if let Ok(pipeline) = WirePipeline::compile(&pipeline) {
                        let groups = pipeline.groups();
                        self.cores.insert(core, (pipeline, groups));
                    }
                }
                GroupInput::Contribute(contribute) => {
                    let same = touched
                        .as_ref()
                        .is_some_and(|t| (t.core, t.position) == (contribute.core, contribute.position));
                    if !same {
                        self.flush(touched.take(), out);
                    }
                    let Some((_, groups)) = self.cores.get_mut(&contribute.core) else { continue };
                    let run = touched.get_or_insert_with(|| Touched {
                        core: contribute.core,
                        position: contribute.position,
                        cause: contribute.cause,
                        entered: contribute.entered,
                        keys: BTreeSet::new(),
                    });
                    // A record holds one group's contributions: its key is noted once.
                    if let Some((first, _)) = contribute.changes.0.first() {
                        run.keys.insert(Ordered(first.key.clone()));
                    }
                    for (contribution, by) in &contribute.changes.0 {
                        groups.change(contribution, *by);
                    }
                }
                GroupInput::End { core, .. } => {
                    self.flush(touched.take(), out);
                    self.cores.remove(&core);
                }
                GroupInput::View(view) => {
                    self.flush(touched.take(), out);
                    out.push(view);
                }
            }
        }
        self.flush(touched, out);
    }

    /// Sends the view stage the outputs of the groups one write touched.
    fn flush(&self, touched: Option<Touched>, out: &mut Vec<ViewInput>) {
        let Some(Touched { core, position, cause, entered, keys }) = touched else { return };
        let Some((pipeline, groups)) = self.cores.get(&core) else { return };
        let groups = keys
            .into_iter()
            .map(|key| match groups.groups.get_key_value(&key) {
                Some((stored, group)) => {
                    let output = pipeline.output(&stored.0, group);
                    (WireValue(stored.0.clone()), Some(WireDoc(Arc::new(output))))
                }
                None => (WireValue(key.0), None),
            })
            .collect();
        out.push(ViewInput::Outputs { core, position, cause, entered, groups });
    }
}
