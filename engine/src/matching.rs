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

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::{Arc, Weak};

use livegrid_matcher::{Filter, QuerySpec};

use crate::doc_id::DocId;
use crate::query_index::{QueryIndex, QueryKey};
use crate::records::{GridInput, Registration, StageInput};
use crate::wire::{WireEvent, WireValue};

struct Entry {
    ns: Arc<str>,
    /// Shared by identical filters on this worker.
    filter: Arc<Filter>,
    members: HashSet<DocId>,
}

/// The matching state of one worker.
#[derive(Default)]
pub struct Matching {
    entries: HashMap<QueryKey, Entry>,
    index: QueryIndex,
    /// Per namespace: document id → subscriptions whose member set holds it.
    holders: HashMap<Arc<str>, HashMap<DocId, Vec<QueryKey>>>,
    /// Identical filters share one compiled form, by a 128-bit hash of namespace and
    /// canonical filter text (a collision among even billions of filters is not to be
    /// expected, and keeping the texts would cost more than the filters).
    compiled: HashMap<u128, Weak<Filter>>,
    /// One shared name per namespace.
    namespaces: HashMap<String, Arc<str>>,
    /// Cache entries whose filter is no longer used.
    dead_filters: usize,
    candidates: Vec<QueryKey>,
}

impl Matching {
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
        let id = DocId(event.id.0.clone());
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        if let Some(doc) = &event.doc {
            self.index.candidates(&event.ns, &doc.0, &mut candidates);
        }
        if let Some(holding) = self.holders.get(event.ns.as_str()).and_then(|h| h.get(&id)) {
            candidates.extend_from_slice(holding);
        }
        candidates.sort_unstable();
        candidates.dedup();
        for &key in &candidates {
            self.evaluate(key, &id, event, out);
        }
        self.candidates = candidates;
    }

    /// Evaluates one subscription's filter on a write and records the transition.
    fn evaluate(&mut self, key: QueryKey, id: &DocId, event: &WireEvent, out: &mut Vec<StageInput>) {
        let Some(entry) = self.entries.get_mut(&key) else { return };
        if *entry.ns != *event.ns {
            return;
        }
        let matches = event.doc.as_ref().is_some_and(|d| entry.filter.matches(&d.0));
        let was_member = entry.members.contains(id);
        if matches {
            if !was_member {
                entry.members.insert(id.clone());
                let ns = entry.ns.clone();
                self.holders.entry(ns).or_default().entry(id.clone()).or_default().push(key);
            }
        } else if was_member {
            entry.members.remove(id);
            let ns = entry.ns.clone();
            self.release(&ns, id, key);
        } else {
            return;
        }
        out.push(StageInput::Transition {
            key,
            position: event.position,
            cause: event.op.cause(),
            id: WireValue(id.0.clone()),
            doc: if matches { event.doc.clone() } else { None },
            entered: event.entered,
        });
    }

    fn release(&mut self, ns: &Arc<str>, id: &DocId, key: QueryKey) {
        if let Some(by_id) = self.holders.get_mut(ns) {
            if let Some(keys) = by_id.get_mut(id) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    by_id.remove(id);
                }
            }
            if by_id.is_empty() {
                self.holders.remove(ns);
            }
        }
    }

    fn register(&mut self, registration: Registration, out: &mut Vec<StageInput>) {
        let Registration { key, ns, query, member_ids, replay, init, reload, .. } = registration;
        if !self.entries.contains_key(&key) {
            if reload {
                // Unsubscribed while the re-read was under way.
                return;
            }
            let ns = self.namespaces.entry(ns.clone()).or_insert_with(|| Arc::from(ns.as_str())).clone();
            let Some(filter) = self.compile(&ns, &query.to_spec()) else { return };
            self.index.insert(&ns, key, &filter.index_plan());
            self.entries.insert(key, Entry { ns, filter, members: HashSet::default() });
        }
        let entry = self.entries.get_mut(&key).expect("just ensured");
        let ns = entry.ns.clone();
        for id in member_ids {
            let id = DocId(id.0);
            if entry.members.insert(id.clone()) {
                self.holders.entry(ns.clone()).or_default().entry(id).or_default().push(key);
            }
        }
        if let Some(init) = init {
            out.push(StageInput::Init { key, query, init, reload });
        }
        // Writes after the snapshot that the grid passed before this registration reached it.
        for event in &replay {
            self.evaluate(key, &DocId(event.id.0.clone()), event, out);
        }
    }

    fn compile(&mut self, ns: &Arc<str>, spec: &QuerySpec) -> Option<Arc<Filter>> {
        let cache_key = filter_hash(ns, &Filter::canonical_key(&spec.filter));
        if let Some(shared) = self.compiled.get(&cache_key).and_then(Weak::upgrade) {
            return Some(shared);
        }
        let filter = Arc::new(Filter::parse(&spec.filter).ok()?);
        self.compiled.insert(cache_key, Arc::downgrade(&filter));
        Some(filter)
    }

    fn unregister(&mut self, key: QueryKey, head: bool, out: &mut Vec<StageInput>) {
        let Some(entry) = self.entries.remove(&key) else { return };
        // Plans are derived again rather than kept: they are deterministic, and memory per
        // subscription matters more than the cost of an unregistration.
        self.index.remove(&entry.ns, key, &entry.filter.index_plan());
        for id in &entry.members {
            self.release(&entry.ns, id, key);
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
