//! The matching stage: the state of one grid worker (q, w), which holds the subscriptions of
//! query partition q and sees the writes of write partition w.
//!
//! For every subscription the worker keeps the ids of the documents of its partition that
//! match its filter: every document the subscription's result holds is among them. A write
//! is evaluated against the candidates the query index finds for its after-image plus the
//! subscriptions holding its id; each evaluated subscription gets a [`Transition`]: the
//! document enters its matching set, stays in it (with a new after-image), or leaves it. The
//! subscription stage turns transitions into deltas; it alone knows exactly what a client
//! was shown.
//!
//! # Memory
//! A document id (16 bytes, see [`DocId`]) is kept once per worker, in the holding of the
//! documents some subscription holds, which also gives it a 32-bit slot and lists the
//! subscriptions that hold it (which is how a write learns, without touching any
//! subscription's state, which subscriptions held its document). A subscription lists the
//! slots it holds in an append-only list, compacted once half of it is stale, which is only
//! read when it ends. What one (subscription, document) pair costs is a key in the document's
//! holding list and a slot in the subscription's list: about 12 to 20 bytes.

use rustc_hash::FxHashMap as HashMap;
use std::sync::{Arc, Weak};

use livegrid_matcher::Filter;

use crate::doc_id::DocId;
use crate::query_index::{QueryIndex, QueryKey};
use crate::records::{GridInput, Registration, StageInput, Transition, WireQuery};
use crate::wire::{WireEvent, WireValue};

/// A namespace, as a small number on this worker.
type NsId = u32;

struct Entry {
    ns: NsId,
    /// Shared by identical filters on this worker.
    filter: Arc<Filter>,
    /// Slots of the documents held, appended as they are; entries may be stale (left since,
    /// or repeated) and are checked against the holdings when read.
    members: Vec<u32>,
    /// How many documents the subscription holds.
    held: u32,
}

/// The subscriptions that hold one document, and the document's slot.
struct Holding {
    slot: u32,
    keys: Vec<QueryKey>,
}

/// The namespaces of a worker's subscriptions, interned while some subscription uses them.
#[derive(Default)]
struct Namespaces {
    ids: HashMap<Arc<str>, NsId>,
    /// By id: the name and how many subscriptions use it.
    names: Vec<Option<(Arc<str>, usize)>>,
    free: Vec<NsId>,
}

impl Namespaces {
    fn find(&self, ns: &str) -> Option<NsId> {
        self.ids.get(ns).copied()
    }

    fn name(&self, id: NsId) -> &Arc<str> {
        &self.names[id as usize].as_ref().expect("a used namespace").0
    }

    /// The id of `ns`, counting one more subscription.
    fn acquire(&mut self, ns: &str) -> NsId {
        if let Some(&id) = self.ids.get(ns) {
            self.names[id as usize].as_mut().expect("a used namespace").1 += 1;
            return id;
        }
        let name: Arc<str> = Arc::from(ns);
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = Some((name.clone(), 1));
                id
            }
            None => {
                self.names.push(Some((name.clone(), 1)));
                NsId::try_from(self.names.len() - 1).expect("fewer than 2^32 namespaces")
            }
        };
        self.ids.insert(name, id);
        id
    }

    /// One subscription fewer on `id`; `true` when it was the last.
    fn release(&mut self, id: NsId) -> bool {
        let Some((name, users)) = self.names[id as usize].as_mut() else { return false };
        *users -= 1;
        if *users > 0 {
            return false;
        }
        self.ids.remove(&**name);
        self.names[id as usize] = None;
        self.free.push(id);
        true
    }
}

/// The matching state of one worker.
#[derive(Default)]
pub struct Matching {
    entries: HashMap<QueryKey, Entry>,
    index: QueryIndex,
    namespaces: Namespaces,
    /// By namespace id: document id → its slot and the subscriptions that hold it.
    holders: Vec<HashMap<DocId, Holding>>,
    /// Slot → the document it stands for (while some subscription holds it).
    slot_ids: Vec<Option<(NsId, DocId)>>,
    /// Slots free for reuse.
    free_slots: Vec<u32>,
    /// Identical filters share one compiled form, by a 128-bit hash of namespace and
    /// canonical filter text (a collision among even billions of filters is not to be
    /// expected, and keeping the texts would cost more than the filters).
    compiled: HashMap<u128, Weak<Filter>>,
    /// Cache entries whose filter is no longer used.
    dead_filters: usize,
    /// Scratch: the index's candidates for a write.
    found: Vec<QueryKey>,
    /// Scratch: the subscriptions to evaluate for a write, each with whether it held the
    /// document.
    candidates: Vec<(QueryKey, bool)>,
    /// Workers of the subscription stage: a write's transitions are grouped by the worker
    /// their subscription is routed to (`key % peers`, as timely's exchange routes).
    peers: u64,
    /// Per receiving worker, the transitions of the write being evaluated.
    groups: Vec<Vec<(QueryKey, Transition)>>,
}

impl Matching {
    /// The matching state of a worker whose transitions go to `peers` subscription-stage
    /// workers.
    pub fn new(peers: usize) -> Self {
        let peers = peers.max(1);
        Matching { peers: peers as u64, groups: vec![Vec::new(); peers], ..Default::default() }
    }

    /// Handles one input record, appending what the subscription stage must hear to `out`.
    pub fn handle(&mut self, input: GridInput, out: &mut Vec<StageInput>) {
        match input {
            GridInput::Event { event, .. } => self.event(&event, out),
            GridInput::Register(registration) => self.register(*registration, out),
            GridInput::Unregister { key, head, .. } => self.unregister(key, head, out),
            // For the subscription stage, which holds the core.
            GridInput::Attach(attach) => out.push(StageInput::Attach(attach)),
            GridInput::Detach { core, view, .. } => out.push(StageInput::Detach { core, view }),
            GridInput::Notice { key, code, message, .. } => out.push(StageInput::Notice { key, code, message }),
            // Worker 0 hands these to its engine before matching sees them.
            GridInput::Forward(_) => debug_assert!(false, "a forwarded request reached matching"),
        }
    }

    /// How many subscriptions this worker holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the worker holds no subscription.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn event(&mut self, event: &WireEvent, out: &mut Vec<StageInput>) {
        // No subscription of this worker reads the namespace: nothing to evaluate.
        let Some(ns) = self.namespaces.find(&event.ns) else { return };
        let id = DocId::new(&event.id.0);
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        if let Some(doc) = &event.doc {
            let mut found = std::mem::take(&mut self.found);
            found.clear();
            self.index.candidates(&event.ns, &doc.0, &mut found);
            candidates.extend(found.iter().map(|&key| (key, false)));
            self.found = found;
        }
        let mut slot = None;
        if let Some(holding) = self.holding(ns, &id) {
            candidates.extend(holding.keys.iter().map(|&key| (key, true)));
            slot = Some(holding.slot);
        }
        // Sorted, (key, false) comes before (key, true): keep one per key, held if either is.
        candidates.sort_unstable();
        candidates.dedup_by(|next, kept| {
            let same = next.0 == kept.0;
            kept.1 |= same && next.1;
            same
        });
        for &(key, held) in &candidates {
            self.evaluate(key, ns, &id, held, &mut slot, event);
        }
        self.candidates = candidates;
        self.send_transitions(&id, event, out);
    }

    /// Sends the transitions gathered for `event`: one record per receiving worker.
    fn send_transitions(&mut self, id: &DocId, event: &WireEvent, out: &mut Vec<StageInput>) {
        for group in &mut self.groups {
            if group.is_empty() {
                continue;
            }
            let keys = std::mem::take(group);
            let matches = keys.iter().any(|(_, t)| t.matches());
            out.push(StageInput::Transitions {
                position: event.position,
                cause: event.op.cause(),
                id: WireValue(id.to_bson()),
                doc: if matches { event.doc.clone() } else { None },
                keys,
                entered: event.entered,
            });
        }
    }

    /// Evaluates one subscription's filter on a write and records the transition in the
    /// groups. `held` tells whether the subscription holds the document; `slot` is the
    /// document's slot if it has one (and gets one when the document joins a result).
    fn evaluate(&mut self, key: QueryKey, ns: NsId, id: &DocId, held: bool, slot: &mut Option<u32>, event: &WireEvent) {
        let Some(entry) = self.entries.get_mut(&key) else { return };
        if entry.ns != ns {
            return;
        }
        let matches = event.doc.as_ref().is_some_and(|d| entry.filter.matches(&d.0));
        let transition = match (held, matches) {
            (false, true) => {
                entry.held += 1;
                let taken = self.hold(ns, id, key);
                self.entries.get_mut(&key).expect("present").members.push(taken);
                *slot = Some(taken);
                Transition::Enter
            }
            (true, true) => Transition::Stay,
            (true, false) => {
                entry.held -= 1;
                let compact = entry.members.len() > 2 * entry.held as usize + 16;
                if self.release(ns, id, key) {
                    *slot = None;
                }
                if compact {
                    self.compact(key);
                }
                Transition::Leave
            }
            (false, false) => return,
        };
        self.groups[(key % self.peers) as usize].push((key, transition));
    }

    /// Drops the stale entries of a subscription's member list.
    fn compact(&mut self, key: QueryKey) {
        let Some(entry) = self.entries.get_mut(&key) else { return };
        let mut members = std::mem::take(&mut entry.members);
        members.sort_unstable();
        members.dedup();
        members.retain(|&slot| self.holds(slot, key));
        members.shrink_to(members.len() * 2);
        self.entries.get_mut(&key).expect("present").members = members;
    }

    /// Whether the document of `slot` is held by `key`.
    fn holds(&self, slot: u32, key: QueryKey) -> bool {
        let Some(Some((ns, id))) = self.slot_ids.get(slot as usize) else { return false };
        self.holding(*ns, id).is_some_and(|h| h.keys.contains(&key))
    }

    /// Who holds document `id` of namespace `ns`, and its slot.
    fn holding(&self, ns: NsId, id: &DocId) -> Option<&Holding> {
        self.holders.get(ns as usize)?.get(id)
    }

    /// Records that `key` holds document `id`, returning the document's slot.
    fn hold(&mut self, ns: NsId, id: &DocId, key: QueryKey) -> u32 {
        if self.holders.len() <= ns as usize {
            self.holders.resize_with(ns as usize + 1, HashMap::default);
        }
        let by_id = &mut self.holders[ns as usize];
        if let Some(holding) = by_id.get_mut(id) {
            holding.keys.push(key);
            return holding.slot;
        }
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slot_ids[slot as usize] = Some((ns, id.clone()));
                slot
            }
            None => {
                self.slot_ids.push(Some((ns, id.clone())));
                u32::try_from(self.slot_ids.len() - 1).expect("fewer than 2^32 documents per worker")
            }
        };
        by_id.insert(id.clone(), Holding { slot, keys: vec![key] });
        slot
    }

    /// Records that `key` no longer holds `id` (if it did); `true` when nobody does any more
    /// (its slot is freed).
    fn release(&mut self, ns: NsId, id: &DocId, key: QueryKey) -> bool {
        let Some(by_id) = self.holders.get_mut(ns as usize) else { return true };
        let Some(holding) = by_id.get_mut(id) else { return true };
        holding.keys.retain(|k| *k != key);
        if !holding.keys.is_empty() {
            return false;
        }
        let slot = holding.slot;
        by_id.remove(id);
        if by_id.is_empty() {
            *by_id = HashMap::default();
        } else {
            crate::shrink::shrink_if_sparse(by_id);
        }
        self.slot_ids[slot as usize] = None;
        self.free_slots.push(slot);
        if self.holders.iter().all(HashMap::is_empty) {
            // No document is held any more: give the slot tables back.
            self.holders = Vec::new();
            self.slot_ids = Vec::new();
            self.free_slots = Vec::new();
        }
        true
    }

    fn register(&mut self, registration: Registration, out: &mut Vec<StageInput>) {
        let Registration { key, ns, query, member_ids, replay, init, reload, .. } = registration;
        if !self.entries.contains_key(&key) {
            if reload {
                // Unsubscribed while the re-read was under way.
                return;
            }
            let Some(filter) = self.compile(&ns, &query) else { return };
            let ns_id = self.namespaces.acquire(&ns);
            self.index.insert(&ns, key, &filter.index_plan());
            self.entries.insert(key, Entry { ns: ns_id, filter, members: Vec::new(), held: 0 });
        }
        let ns = self.entries[&key].ns;
        for id in member_ids {
            let id = DocId::from(id.0);
            let already = self.holding(ns, &id).is_some_and(|h| h.keys.contains(&key));
            if !already {
                let slot = self.hold(ns, &id, key);
                let entry = self.entries.get_mut(&key).expect("present");
                entry.members.push(slot);
                entry.held += 1;
            }
        }
        if let Some(init) = init {
            out.push(StageInput::Init { key, query, init, reload });
        }
        // Writes after the snapshot that the grid passed before this registration reached it.
        for event in &replay {
            if self.namespaces.find(&event.ns) != Some(ns) {
                continue;
            }
            let id = DocId::new(&event.id.0);
            let holding = self.holding(ns, &id);
            let mut slot = holding.map(|h| h.slot);
            let held = holding.is_some_and(|h| h.keys.contains(&key));
            self.evaluate(key, ns, &id, held, &mut slot, event);
            self.send_transitions(&id, event, out);
        }
    }

    /// The worker's shared compiled filter for `query`: from its cache, else the registration's
    /// compiled form, else compiled here (a registration from another process).
    fn compile(&mut self, ns: &str, query: &WireQuery) -> Option<Arc<Filter>> {
        let cache_key = filter_hash(ns, &Filter::canonical_key(&query.filter.0));
        if let Some(shared) = self.compiled.get(&cache_key).and_then(Weak::upgrade) {
            return Some(shared);
        }
        let filter = match &query.compiled {
            Some(compiled) => Arc::new(compiled.filter.clone()),
            None => Arc::new(Filter::parse(&query.filter.0).ok()?),
        };
        self.compiled.insert(cache_key, Arc::downgrade(&filter));
        Some(filter)
    }

    fn unregister(&mut self, key: QueryKey, head: bool, out: &mut Vec<StageInput>) {
        let Some(entry) = self.entries.remove(&key) else { return };
        // Plans are derived again rather than kept: they are deterministic, and memory per
        // subscription matters more than the cost of an unregistration.
        let name = self.namespaces.name(entry.ns).clone();
        self.index.remove(&name, key, &entry.filter.index_plan());
        for &slot in &entry.members {
            // Stale entries name documents the subscription no longer holds (or holds twice):
            // releasing those changes nothing.
            if let Some(Some((ns, id))) = self.slot_ids.get(slot as usize).cloned() {
                self.release(ns, &id, key);
            }
        }
        self.namespaces.release(entry.ns);
        if Arc::strong_count(&entry.filter) == 1 {
            // The cache entry is dead now; sweep dead entries once they are many, so that the
            // cost stays constant per unregistration.
            self.dead_filters += 1;
            if self.dead_filters > 64 + self.compiled.len() / 2 {
                drop(entry);
                self.compiled.retain(|_, weak| weak.strong_count() > 0);
                self.dead_filters = 0;
            }
        }
        // One worker of the column tells the subscription stage.
        if head {
            out.push(StageInput::Drop { key });
        }
    }
}
/// Two independent 64-bit hashes of a namespace and canonical filter text.
fn filter_hash(ns: &str, canonical: &str) -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let half = |seed: u64| {
        let mut hasher =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().build_hasher();
        hasher.write_u64(seed);
        hasher.write(ns.as_bytes());
        hasher.write_u8(0);
        hasher.write(canonical.as_bytes());
        hasher.finish()
    };
    (u128::from(half(0x51_7c_c1_b7_27_22_0a_95)) << 64) | u128::from(half(0x9e_37_79_b9_7f_4a_7c_15))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ChangeOp;
    use crate::wire::WireDoc;
    use bson::doc;
    use livegrid_protocol::Position;

    fn register(matching: &mut Matching, key: QueryKey, filter: bson::Document) {
        let query = WireQuery {
            filter: WireDoc(Arc::new(filter)),
            sort: None,
            skip: 0,
            limit: None,
            projection: None,
            compiled: None,
            pipeline: None,
        };
        let registration = Registration {
            target: 0,
            key,
            ns: "db.c".into(),
            query,
            member_ids: Vec::new(),
            replay: Vec::new(),
            init: None,
            reload: false,
        };
        matching.handle(GridInput::Register(Box::new(registration)), &mut Vec::new());
    }

    fn write(matching: &mut Matching, time: u64, id: i32, a: i32) -> Vec<(QueryKey, Transition)> {
        let event = WireEvent {
            position: Position::new(time),
            ns: "db.c".into(),
            op: ChangeOp::Update,
            id: WireValue(bson::Bson::Int32(id)),
            doc: Some(WireDoc(Arc::new(doc! { "_id": id, "a": a }))),
            entered: 0,
        };
        let mut out = Vec::new();
        matching.event(&event, &mut out);
        out.into_iter()
            .flat_map(|input| match input {
                StageInput::Transitions { keys, .. } => keys,
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn transitions_follow_membership_and_churn_leaves_nothing_behind() {
        let mut matching = Matching::new(1);
        register(&mut matching, 1, doc! { "a": 1 });
        register(&mut matching, 2, doc! { "a": { "$gte": 1 } });
        let mut time = 0;
        for round in 0..50 {
            for id in 0..20 {
                time += 1;
                let entered = write(&mut matching, time, id, 1);
                let expected = if round == 0 { Transition::Enter } else { Transition::Stay };
                assert_eq!(entered, vec![(1, Transition::Enter), (2, expected)]);
                time += 1;
                assert_eq!(write(&mut matching, time, id, 2), vec![(1, Transition::Leave), (2, Transition::Stay)]);
            }
            // Churn does not grow the member list of the subscription that keeps losing
            // documents beyond twice what it holds plus a constant.
            assert!(matching.entries[&1].members.len() <= 17, "{}", matching.entries[&1].members.len());
        }
        assert_eq!(matching.entries[&2].held, 20);
        matching.unregister(2, true, &mut Vec::new());
        matching.unregister(1, true, &mut Vec::new());
        assert!(matching.holders.is_empty() && matching.slot_ids.is_empty(), "tables given back");
        assert!(matching.namespaces.ids.is_empty());
        // A write on a namespace nobody reads any more evaluates nothing.
        assert!(write(&mut matching, time + 1, 0, 1).is_empty());
    }
}
