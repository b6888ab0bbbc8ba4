//! Live `$group` state formulated on differential dataflow: the baseline the live pipelines
//! (`crate::live_pipeline`, what `serve` runs) are measured against in
//! `benches/aggregation.rs`, and checked like them against the evaluator.
//!
//! Its `reduce` hands each changed group's whole input (one entry per distinct contribution)
//! to the accumulators again, so a write costs work in the size of the groups it touches;
//! the live pipelines' accumulator states take single contributions in and out instead. On
//! one group of 100,000 documents with distinct values, that is 4.2 ms per update here
//! against 16 µs (see README, "Live aggregation pipelines").
//!
//! ```text
//! document upserts ──▶ arrange_from_upsert (by document key) ──▶ (ns, shard) ─┐
//!                                                                            join ──▶ contributions ──▶ reduce by (pipeline, group key) ──▶ group outputs
//! pipelines (id, ns, stages) ──▶ one copy per shard ──▶ (ns, shard) ─────────┘
//! ```
//!
//! - Documents enter as upserts (a key and its new BSON, or `None` for a delete), so the
//!   branch works out what each write retracts itself, from its own arrangement.
//! - Documents are spread over `shards` by key and every pipeline is copied to each shard, so
//!   matching a write to the pipelines of its namespace is parallel across workers.
//! - Contributions (what a document gives its group, [`livegrid_matcher::pipeline`]) are
//!   exchanged by `(pipeline, group key)`: each group's state is an arrangement on one worker,
//!   and a write costs work in the groups it touches, not in the collection.
//! - The output is a collection of `((pipeline, group key), output document)`: a group that
//!   changes retracts its old output and adds its new one at the write's time.
//!
//! Pipelines are compiled once per process and shared by id ([`Registry`]); ids are never
//! reused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bson::{Bson, Document};
use differential_dataflow::VecCollection;
use differential_dataflow::operators::arrange::upsert::arrange_from_upsert;
use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use livegrid_matcher::Pipeline;
use livegrid_matcher::pipeline::Contribution;
use timely::dataflow::Stream;

/// A document's key: its namespace and `_id`, encoded.
pub type DocKey = Vec<u8>;
/// A document as stored: its namespace and BSON bytes.
pub type DocValue = (String, Vec<u8>);
/// Logical time: positions.
pub type Time = u64;
/// One upsert: a document's key, its new value (`None`: deleted) and its time.
pub type Upsert = (DocKey, Option<DocValue>, Time);
/// A group's output: `((pipeline id, group key as BSON bytes), output document as BSON)`.
pub type GroupOutput = ((u64, Vec<u8>), Vec<u8>);

/// The pipelines this process knows, compiled, by id.
#[derive(Default)]
pub struct Registry {
    pipelines: Mutex<HashMap<u64, Arc<Pipeline>>>,
}

impl Registry {
    /// The process's registry.
    pub fn global() -> &'static Registry {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(Registry::default)
    }

    /// Records pipeline `id`.
    pub fn insert(&self, id: u64, pipeline: Arc<Pipeline>) {
        self.pipelines.lock().expect("registry lock").insert(id, pipeline);
    }

    /// Pipeline `id`, if registered.
    pub fn get(&self, id: u64) -> Option<Arc<Pipeline>> {
        self.pipelines.lock().expect("registry lock").get(&id).cloned()
    }

    /// Forgets pipeline `id` (once it left the dataflow).
    pub fn remove(&self, id: u64) {
        self.pipelines.lock().expect("registry lock").remove(&id);
    }
}

/// A worker's copy of the registry's entries it used (no lock per record).
#[derive(Default)]
struct Cache(HashMap<u64, Arc<Pipeline>>);

impl Cache {
    fn get(&mut self, id: u64) -> Option<Arc<Pipeline>> {
        if let Some(pipeline) = self.0.get(&id) {
            return Some(pipeline.clone());
        }
        let pipeline = Registry::global().get(id)?;
        self.0.insert(id, pipeline.clone());
        Some(pipeline)
    }
}

fn encode(doc: &Document) -> Vec<u8> {
    doc.to_vec().unwrap_or_default()
}

fn decode(bytes: &[u8]) -> Option<Document> {
    Document::from_reader(bytes).ok()
}

fn shard_of(key: &DocKey, shards: u64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = rustc_hash::FxHasher::default();
    key.hash(&mut hasher);
    hasher.finish() % shards.max(1)
}

/// Builds the branch: from document upserts and the collection of pipelines
/// `(id, namespace)` (compiled in the [`Registry`]) to each group's output document, keyed by
/// `(pipeline id, group key as BSON bytes)`.
pub fn build<'scope>(
    upserts: Stream<'scope, Time, Vec<Upsert>>,
    pipelines: VecCollection<'scope, Time, (u64, String), isize>,
    shards: u64,
) -> VecCollection<'scope, Time, GroupOutput, isize> {
    let documents = arrange_from_upsert::<
        ValBuilder<DocKey, DocValue, Time, isize>,
        ValSpine<DocKey, DocValue, Time, isize>,
        DocKey,
        DocValue,
    >(upserts, "Documents");
    let documents =
        documents.as_collection(move |key, (ns, bytes)| ((ns.clone(), shard_of(key, shards)), bytes.clone()));
    let pipelines = pipelines.flat_map(move |(id, ns)| (0..shards.max(1)).map(move |shard| ((ns.clone(), shard), id)));
    // Per worker: compiled pipelines (ids are never reused), and the last document decoded
    // (a write meets every pipeline of its namespace one after the other).
    let mut compiled = Cache::default();
    let mut last: Option<(Vec<u8>, Option<Document>)> = None;
    let contributions = documents.join(pipelines).flat_map(move |(_, (bytes, id))| {
        let pipeline = compiled.get(id);
        if last.as_ref().is_none_or(|(seen, _)| *seen != bytes) {
            let doc = decode(&bytes);
            last = Some((bytes, doc));
        }
        let doc = last.as_ref().and_then(|(_, doc)| doc.as_ref());
        let contributions = match (pipeline, doc) {
            (Some(pipeline), Some(doc)) => pipeline.contributions(doc),
            _ => Vec::new(),
        };
        contributions.into_iter().map(move |c| {
            let key = encode(&bson::doc! {"k": c.key.clone()});
            ((id, key), encode(&c.to_document()))
        })
    });
    let mut compiled = Cache::default();
    contributions.reduce(move |(id, key), input, output| {
        let Some(pipeline) = compiled.get(*id) else { return };
        let Some(key) = decode(key).and_then(|k| k.get("k").cloned()) else { return };
        let mut groups = pipeline.groups();
        for (bytes, count) in input {
            let Some(contribution) = decode(bytes).and_then(|d| Contribution::from_document(key.clone(), &d)) else {
                continue;
            };
            groups.change(&contribution, *count as i64);
        }
        if let Some((group_key, group)) = groups.groups.iter().next() {
            output.push((encode(&pipeline.output(&group_key.0, group)), 1));
        }
    })
}

/// The group key a `(pipeline, key bytes)` pair names.
pub fn group_key(bytes: &[u8]) -> Bson {
    decode(bytes).and_then(|d| d.get("k").cloned()).unwrap_or(Bson::Null)
}

#[cfg(test)]
mod tests;
