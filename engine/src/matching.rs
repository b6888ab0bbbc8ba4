//! The matching stage: the state of one grid worker (q, w), which holds the subscriptions of
//! query partition q and sees the writes of write partition w.
//!
//! For every subscription the worker keeps the ids of the documents of its partition that
//! may be in the subscription's result (a superset: every document the subscription's
//! result holds is in it). A write is evaluated against the candidates the query index finds
//! for its after-image plus the subscriptions holding its id; each evaluated subscription
//! gets a transition: the document matches now (with its after-image), or it stopped
//! matching. The subscription stage turns transitions into deltas; it alone knows exactly
//! what a client was shown.
//!
//! # Memory
//! A document id (16 bytes, see [`DocId`]) is kept once per worker, in the holding of the
//! documents some subscription holds, which also gives it a 32-bit slot; a subscription's
//! member set holds slots. What one (subscription, document) pair costs is a slot in the set
//! and a key in the document's holding list: about 16 bytes.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::{Arc, Weak};

use livegrid_matcher::Filter;

use crate::doc_id::DocId;
use crate::query_index::{QueryIndex, QueryKey};
use crate::records::{GridInput, Registration, StageInput, WireQuery};
use crate::wire::{WireEvent, WireValue};

struct Entry {
    ns: Arc<str>,
    /// Shared by identical filters on this worker.
    filter: Arc<Filter>,
    /// Slots of the documents that may be in the result.
    members: HashSet<u32>,
}

/// The subscriptions that hold one document, and the document's slot.
struct Holding {
    slot: u32,
    keys: Vec<QueryKey>,
}

/// The matching state of one worker.
#[derive(Default)]
pub struct Matching {
    entries: HashMap<QueryKey, Entry>,
    index: QueryIndex,
    /// Per namespace: document id → its slot and the subscriptions whose member set holds it.
    holders: HashMap<Arc<str>, HashMap<DocId, Holding>>,
    /// Slot → the document it stands for (while some subscription holds it).
    slot_ids: Vec<Option<(Arc<str>, DocId)>>,
    /// Slots free for reuse.
    free_slots: Vec<u32>,
    /// Identical filters share one compiled form, by a 128-bit hash of namespace and
    /// canonical filter text (a collision among even billions of filters is not to be
    /// expected, and keeping the texts would cost more than the filters).
    compiled: HashMap<u128, Weak<Filter>>,
    /// One shared name per namespace.
    namespaces: HashMap<String, Arc<str>>,
    /// Cache entries whose filter is no longer used.
    dead_filters: usize,
    candidates: Vec<QueryKey>,
    /// Workers of the subscription stage: a write's transitions are grouped by the worker
    /// their subscription is routed to (`key % peers`, as timely's exchange routes).
    peers: u64,
    /// Per receiving worker, the transitions of the write being evaluated.
    groups: Vec<Vec<(QueryKey, bool)>>,
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
        let id = DocId::new(&event.id.0);
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        if let Some(doc) = &event.doc {
            self.index.candidates(&event.ns, &doc.0, &mut candidates);
        }
        let mut slot = None;
        if let Some(holding) = self.holding(&event.ns, &id) {
            candidates.extend_from_slice(&holding.keys);
            slot = Some(holding.slot);
        }
        candidates.sort_unstable();
        candidates.dedup();
        for &key in &candidates {
            self.evaluate(key, &id, &mut slot, event);
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
            let matches = keys.iter().any(|(_, m)| *m);
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
    /// groups. `slot` is the document's slot if it has one (and gets one when the document
    /// joins a result).
    fn evaluate(&mut self, key: QueryKey, id: &DocId, slot: &mut Option<u32>, event: &WireEvent) {
        let Some(entry) = self.entries.get(&key) else { return };
        if *entry.ns != *event.ns {
            return;
        }
        let matches = event.doc.as_ref().is_some_and(|d| entry.filter.matches(&d.0));
        let was_member = slot.is_some_and(|s| entry.members.contains(&s));
        let ns = entry.ns.clone();
        if matches {
            if !was_member {
                let held = self.hold(&ns, id, key);
                *slot = Some(held);
                self.entries.get_mut(&key).expect("present").members.insert(held);
            }
        } else if was_member {
            let held = slot.expect("a member has a slot");
            self.entries.get_mut(&key).expect("present").members.remove(&held);
            if self.release(&ns, id, key) {
                *slot = None;
            }
        } else {
            return;
        }
        self.groups[(key % self.peers) as usize].push((key, matches));
    }

    /// Who holds document `id` of namespace `ns`, and its slot.
    fn holding(&self, ns: &str, id: &DocId) -> Option<&Holding> {
        self.holders.get(ns)?.get(id)
    }

    /// Records that `key` holds document `id`, returning the document's slot.
    fn hold(&mut self, ns: &Arc<str>, id: &DocId, key: QueryKey) -> u32 {
        let by_id = self.holders.entry(ns.clone()).or_default();
        if let Some(holding) = by_id.get_mut(id) {
            holding.keys.push(key);
            return holding.slot;
        }
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slot_ids[slot as usize] = Some((ns.clone(), id.clone()));
                slot
            }
            None => {
                self.slot_ids.push(Some((ns.clone(), id.clone())));
                u32::try_from(self.slot_ids.len() - 1).expect("fewer than 2^32 documents per worker")
            }
        };
        by_id.insert(id.clone(), Holding { slot, keys: vec![key] });
        slot
    }

    /// Records that `key` no longer holds `id`; `true` when nobody does any more (its slot is
    /// freed).
    fn release(&mut self, ns: &Arc<str>, id: &DocId, key: QueryKey) -> bool {
        let Some(by_id) = self.holders.get_mut(ns) else { return true };
        let Some(holding) = by_id.get_mut(id) else { return true };
        holding.keys.retain(|k| *k != key);
        if !holding.keys.is_empty() {
            return false;
        }
        let slot = holding.slot;
        by_id.remove(id);
        if by_id.is_empty() {
            self.holders.remove(ns);
        } else {
            crate::shrink::shrink_if_sparse(by_id);
        }
        self.slot_ids[slot as usize] = None;
        self.free_slots.push(slot);
        if self.holders.is_empty() {
            // No document is held any more: give the slot tables back.
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
            let ns = self.namespaces.entry(ns.clone()).or_insert_with(|| Arc::from(ns.as_str())).clone();
            let Some(filter) = self.compile(&ns, &query) else { return };
            self.index.insert(&ns, key, &filter.index_plan());
            self.entries.insert(key, Entry { ns, filter, members: HashSet::default() });
        }
        let ns = self.entries[&key].ns.clone();
        for id in member_ids {
            let id = DocId::from(id.0);
            let known = self.holding(&ns, &id).map(|h| h.slot);
            let already = known.is_some_and(|slot| self.entries[&key].members.contains(&slot));
            if !already {
                let slot = self.hold(&ns, &id, key);
                self.entries.get_mut(&key).expect("present").members.insert(slot);
            }
        }
        if let Some(init) = init {
            out.push(StageInput::Init { key, query, init, reload });
        }
        // Writes after the snapshot that the grid passed before this registration reached it.
        for event in &replay {
            let id = DocId::new(&event.id.0);
            let mut slot = self.holding(&event.ns, &id).map(|h| h.slot);
            self.evaluate(key, &id, &mut slot, event);
            self.send_transitions(&id, event, out);
        }
    }

    /// The worker's shared compiled filter for `query`: from its cache, else the registration's
    /// compiled form, else compiled here (a registration from another process).
    fn compile(&mut self, ns: &Arc<str>, query: &WireQuery) -> Option<Arc<Filter>> {
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
        self.index.remove(&entry.ns, key, &entry.filter.index_plan());
        for slot in &entry.members {
            if let Some((ns, id)) = self.slot_ids[*slot as usize].clone() {
                self.release(&ns, &id, key);
            }
        }
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
