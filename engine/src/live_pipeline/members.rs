//! The members stage of a live pipeline core: per document its first `$match` admits, what
//! the document gives its groups; each write becomes the contributions it takes out and puts
//! in, addressed to the workers of the groups they concern.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bson::Document;
use livegrid_matcher::Pipeline;
use livegrid_matcher::pipeline::accumulator::Ordered;
use livegrid_matcher::pipeline::{Contribution, decode_contributions, encode_contributions};
use livegrid_protocol::{Cause, Position};
use rustc_hash::FxHashMap as HashMap;

use crate::doc_id::DocId;
use crate::query_index::QueryKey;
use crate::records::{Contribute, GroupInput, WireContributions};
use crate::slots::Slots;

/// Contributions with how many times each goes in (negative: out).
pub type Changes = Vec<(Contribution, i64)>;

/// The member documents of one core, by slot.
pub struct Members {
    pipeline: Arc<Pipeline>,
    /// What each member document (by slot) gave its groups.
    members: HashMap<u32, Kept>,
    /// The position the core is exact at: writes at or below it are in.
    position: Position,
}

impl Members {
    /// The members of a core over `docs` (the documents its first `$match` admits) as read at
    /// `position`, and the contributions they make.
    pub fn new(
        pipeline: Arc<Pipeline>,
        docs: impl IntoIterator<Item = Arc<Document>>,
        position: Position,
        slots: &mut Slots,
    ) -> (Members, Changes) {
        let mut members = Members { pipeline, members: HashMap::default(), position };
        let mut changes = Vec::new();
        for doc in docs {
            let id = DocId::new(doc.get("_id").unwrap_or(&bson::Bson::Null));
            members.put(slots, &id, Some(&doc), &mut changes);
        }
        (members, changes)
    }

    /// The core's pipeline.
    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// Applies one write of document `id` at `position`: `doc` is its new version when it
    /// matches the first `$match`, `None` when it left it or was deleted. Returns the
    /// contributions it took out and put in (none when nothing the pipeline reads changed),
    /// or `None` when the core has the write already.
    pub fn apply(
        &mut self,
        slots: &mut Slots,
        id: &DocId,
        doc: Option<&Document>,
        position: Position,
    ) -> Option<Changes> {
        if position <= self.position {
            return None;
        }
        self.position = position;
        let mut changes = Vec::new();
        self.put(slots, id, doc, &mut changes);
        Some(changes)
    }

    /// Lets go of the document slots it holds.
    pub fn release(self, slots: &mut Slots) {
        for slot in self.members.into_keys() {
            slots.release(slot);
        }
    }

    /// Replaces what document `id` gives the groups, noting the contributions out and in.
    fn put(&mut self, slots: &mut Slots, id: &DocId, doc: Option<&Document>, changes: &mut Changes) {
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
        changes.extend(old.map(Kept::contributions).into_iter().flatten().map(|c| (c, -1)));
        changes.extend(new.into_iter().map(|c| (c, 1)));
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
}

/// One write's place: its position, kind, and when it entered the engine.
#[derive(Clone, Copy)]
pub struct At {
    /// The write's position.
    pub position: Position,
    /// Its kind.
    pub cause: Cause,
    /// When it entered the engine (0 for a snapshot).
    pub entered: u64,
}

/// Addresses `changes` of core `core` to the group stage: one record per group, sent to the
/// worker of a hash of the core and the group key (equal keys hash alike: `1` and `1.0` are
/// one group).
pub fn contribute(core: QueryKey, changes: Changes, at: At, out: &mut Vec<GroupInput>) {
    let mut by_group: BTreeMap<Ordered, Changes> = BTreeMap::new();
    for (contribution, by) in changes {
        by_group.entry(Ordered(contribution.key.clone())).or_default().push((contribution, by));
    }
    for (key, changes) in by_group {
        let mut hasher = rustc_hash::FxHasher::default();
        core.hash(&mut hasher);
        livegrid_matcher::value_hash(&key.0).hash(&mut hasher);
        // The high bits folded in: the exchange takes the hash modulo the workers.
        let route = hasher.finish();
        out.push(GroupInput::Contribute(Box::new(Contribute {
            core,
            route: route ^ (route >> 32),
            position: at.position,
            cause: at.cause,
            entered: at.entered,
            changes: WireContributions(changes),
        })));
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
