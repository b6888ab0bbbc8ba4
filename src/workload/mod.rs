//! Synthetic workloads for benchmarks, written as the files `livegrid replay` reads (and the
//! peers of the benchmarks replay too). Each kind is a [`Generator`]: the documents a
//! collection starts with, the queries live applications register on it, and the writes
//! that follow.
//!
//! - `items` ([`Workload`]): a collection of items, filter queries (equality, ranges, `$in`)
//!   over large key spaces so that a write matches few queries, as when queries are specific
//!   to users or items: with 100,000 queries a write enters or leaves about one query's
//!   result on average.
//! - `chat` ([`Chat`]): messages by room, each room watched by about `fanout` subscriptions.
//! - `feed` ([`feed::Feed`]): posts by authors, subscriptions to the newest posts of the
//!   authors a user follows (`$in`).
//! - `shop` ([`shop::Shop`]): products by category and price range, stock and price updates.
//! - `mixed` ([`mixed::Mixed`]): all three collections at once, plus `$or`, array and regular
//!   expression queries.

pub mod feed;
pub mod mixed;
pub mod shop;

use bson::{Bson, Document, doc};
use livegrid_engine::{ChangeEvent, ChangeOp};
use livegrid_matcher::QuerySpec;
use livegrid_protocol::Position;
use std::sync::Arc;

/// The namespace of the generated collection.
pub const NAMESPACE: &str = "bench.items";

/// Sizes of the generated key spaces.
const ITEMS: u64 = 100_000;
const CATEGORIES: u64 = 500_000;
const OWNERS: u64 = 1_000_000;
const TAGS: u64 = 2_000_000;
const PRICE_MAX: u64 = 10_000_000;
const RANGE_WIDTH: u64 = 50;

/// A deterministic generator (xorshift64*).
pub struct Workload {
    state: u64,
}

impl Workload {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Workload { state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1 }
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An item document with this id.
    pub fn item(&mut self, id: u64) -> Document {
        let tags: Vec<Bson> = (0..3).map(|_| Bson::String(format!("t{}", self.below(TAGS)))).collect();
        doc! {
            "_id": id as i64,
            "category": format!("c{}", self.below(CATEGORIES)),
            "owner": format!("u{}", self.below(OWNERS)),
            "price": self.below(PRICE_MAX) as i64,
            "tags": tags,
            "score": self.below(1000) as f64 / 10.0,
            "title": "an item of the benchmark collection",
        }
    }

    /// The next write: mostly updates of existing items, some inserts and deletes, at
    /// `position`.
    pub fn event(&mut self, position: u64) -> ChangeEvent {
        let id = self.below(ITEMS);
        let (op, doc) = match self.below(10) {
            0 => (ChangeOp::Delete, None),
            1 => (ChangeOp::Insert, Some(self.item(id))),
            2 => (ChangeOp::Replace, Some(self.item(id))),
            _ => (ChangeOp::Update, Some(self.item(id))),
        };
        ChangeEvent {
            position: Position::new(position),
            ns: NAMESPACE.into(),
            op,
            id: Bson::Int64(id as i64),
            doc: doc.map(Arc::new),
        }
    }

    /// A filter query: a third equality (`category` or `owner`), a third price ranges, a
    /// third `$in` over tags; one in five adds a second predicate.
    pub fn query(&mut self) -> QuerySpec {
        let mut filter = match self.below(3) {
            0 if self.below(2) == 0 => doc! {"category": format!("c{}", self.below(CATEGORIES))},
            0 => doc! {"owner": format!("u{}", self.below(OWNERS))},
            1 => {
                let low = self.below(PRICE_MAX) as i64;
                doc! {"price": {"$gte": low, "$lt": low + RANGE_WIDTH as i64}}
            }
            _ => {
                let tags: Vec<String> = (0..3).map(|_| format!("t{}", self.below(TAGS))).collect();
                doc! {"tags": {"$in": tags}}
            }
        };
        if self.below(5) == 0 {
            filter.insert("score", doc! {"$gte": self.below(500) as f64 / 10.0});
        }
        QuerySpec { filter, ..Default::default() }
    }
}

/// A chat-like workload with a chosen fan-out: messages posted in rooms, each room watched by
/// about `fanout` subscriptions (most `{room: R}`, one in ten the room's newest 20 messages,
/// sorted), so that every write changes about `fanout` results. Writes are mostly new
/// messages, some edits (a reaction count or the text) and some deletions of recent messages
/// (an edit or deletion may hit a message deleted before: rare, and kept so that the
/// stream stays the one the README's figures were measured on).
pub struct Chat {
    random: Workload,
    rooms: u64,
    next_id: u64,
}

/// The namespace of the chat workload.
pub const CHAT_NAMESPACE: &str = "bench.messages";

impl Chat {
    /// A chat of `queries / fanout` rooms.
    pub fn new(seed: u64, queries: u64, fanout: u64) -> Self {
        Chat { random: Workload::new(seed), rooms: (queries / fanout.max(1)).max(1), next_id: 0 }
    }

    /// The room of a message: a function of its id, so that its edits stay in its room.
    fn room_of(&self, id: u64) -> u64 {
        (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16) % self.rooms
    }

    fn message(&mut self, id: u64, room: u64) -> Document {
        doc! {
            "_id": id as i64,
            "room": format!("r{room}"),
            "ts": id as i64,
            "user": format!("u{}", self.random.below(100_000)),
            "text": "a short chat message of the benchmark",
            "reactions": self.random.below(10) as i32,
        }
    }

    /// The next write at `position`.
    pub fn event(&mut self, position: u64) -> ChangeEvent {
        let kind = self.random.below(10);
        if kind < 7 || self.next_id < 100 {
            let id = self.next_id;
            self.next_id += 1;
            let doc = self.message(id, self.room_of(id));
            return ChangeEvent {
                position: Position::new(position),
                ns: CHAT_NAMESPACE.into(),
                op: ChangeOp::Insert,
                id: Bson::Int64(id as i64),
                doc: Some(Arc::new(doc)),
            };
        }
        // A recent message: its room is a function of its id, so edits stay in their room.
        let id = self.next_id - 1 - self.random.below(self.next_id.min(1000));
        let (op, doc) = if kind < 9 {
            (ChangeOp::Update, Some(self.message(id, self.room_of(id))))
        } else {
            (ChangeOp::Delete, None)
        };
        ChangeEvent {
            position: Position::new(position),
            ns: CHAT_NAMESPACE.into(),
            op,
            id: Bson::Int64(id as i64),
            doc: doc.map(Arc::new),
        }
    }

    /// The `i`-th subscription: rooms are watched in turn, so each gets about `fanout`.
    pub fn query(&mut self, i: u64) -> QuerySpec {
        let room = format!("r{}", i % self.rooms);
        if self.random.below(10) == 0 {
            QuerySpec {
                filter: doc! {"room": room},
                sort: Some(doc! {"ts": -1}),
                limit: Some(20),
                ..Default::default()
            }
        } else {
            QuerySpec { filter: doc! {"room": room}, ..Default::default() }
        }
    }
}

/// A change event as MongoDB's change stream shows it (relaxed Extended JSON), for replay
/// files.
pub fn change_stream_json(event: &ChangeEvent) -> String {
    let (db, coll) = event.ns.split_once('.').unwrap_or((&event.ns, ""));
    let operation = match event.op {
        ChangeOp::Insert => "insert",
        ChangeOp::Update => "update",
        ChangeOp::Replace => "replace",
        ChangeOp::Delete => "delete",
    };
    let mut doc =
        doc! {"operationType": operation, "ns": {"db": db, "coll": coll}, "documentKey": {"_id": event.id.clone()}};
    if let Some(full) = &event.doc {
        doc.insert("fullDocument", (**full).clone());
    }
    livegrid_protocol::extjson::to_relaxed_string(&doc)
}

/// The workload kinds of `livegrid workload --kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Items with filter queries over large key spaces (few matches per write).
    Items,
    /// Chat messages by room; equality subscriptions, a tenth sorted by time with a limit.
    Chat,
    /// Posts by followed authors (`$in`), newest first.
    Feed,
    /// Products by category and price range; stock and price updates.
    Shop,
    /// All of them at once, plus `$or`, arrays and regular expressions.
    Mixed,
}

/// One write of a generated stream.
#[derive(Debug, Clone)]
pub struct Write {
    /// Its namespace.
    pub ns: &'static str,
    /// What it does.
    pub op: ChangeOp,
    /// The document's `_id`.
    pub id: Bson,
    /// The document after it (none for deletes).
    pub doc: Option<Document>,
}

impl Write {
    /// An insert of `doc` (which has its `_id`).
    pub fn insert(ns: &'static str, doc: Document) -> Write {
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        Write { ns, op: ChangeOp::Insert, id, doc: Some(doc) }
    }

    /// The change event of this write at `position`.
    pub fn at(self, position: u64) -> ChangeEvent {
        ChangeEvent {
            position: Position::new(position),
            ns: self.ns.into(),
            op: self.op,
            id: self.id,
            doc: self.doc.map(Arc::new),
        }
    }
}

/// A workload: the documents its collections start with, its queries, its writes.
pub trait Generator {
    /// The `i`-th of the documents the collections start with (`i` from 0, in order).
    fn initial(&mut self, i: u64) -> Write;
    /// The `i`-th query and its namespace (`i` from 0, in order).
    fn query(&mut self, i: u64) -> (&'static str, QuerySpec);
    /// The next write, after the initial documents and every write before.
    fn write(&mut self) -> Write;
}

/// The generator of `kind` for a run with `docs` initial documents, `queries` queries and
/// about `fanout` results changed per write (0: the kind's default).
pub fn generator(kind: Kind, seed: u64, docs: u64, queries: u64, fanout: u64) -> Box<dyn Generator> {
    match kind {
        Kind::Items => Box::new(Items(Workload::new(seed))),
        Kind::Chat => Box::new(Chat::new(seed, queries, if fanout == 0 { 20 } else { fanout })),
        Kind::Feed => Box::new(feed::Feed::new(seed, docs, queries, if fanout == 0 { 5 } else { fanout })),
        Kind::Shop => Box::new(shop::Shop::new(seed, docs, queries, if fanout == 0 { 5 } else { fanout })),
        Kind::Mixed => Box::new(mixed::Mixed::new(seed, docs, queries, if fanout == 0 { 5 } else { fanout })),
    }
}

/// The items workload as a [`Generator`].
struct Items(Workload);

impl Generator for Items {
    fn initial(&mut self, i: u64) -> Write {
        Write::insert(NAMESPACE, self.0.item(i % ITEMS))
    }

    fn query(&mut self, _: u64) -> (&'static str, QuerySpec) {
        (NAMESPACE, self.0.query())
    }

    fn write(&mut self) -> Write {
        let event = self.0.event(0);
        Write { ns: NAMESPACE, op: event.op, id: event.id, doc: event.doc.map(|d| (*d).clone()) }
    }
}

impl Generator for Chat {
    fn initial(&mut self, _: u64) -> Write {
        let id = self.next_id;
        self.next_id += 1;
        Write::insert(CHAT_NAMESPACE, self.message(id, self.room_of(id)))
    }

    fn query(&mut self, i: u64) -> (&'static str, QuerySpec) {
        (CHAT_NAMESPACE, Chat::query(self, i))
    }

    fn write(&mut self) -> Write {
        let event = self.event(0);
        Write { ns: CHAT_NAMESPACE, op: event.op, id: event.id, doc: event.doc.map(|d| (*d).clone()) }
    }
}

/// A query as a line of the queries file `livegrid replay` reads, registered after `after`
/// events.
pub fn query_json(id: &str, ns: &str, spec: &QuerySpec, after: u64) -> serde_json::Value {
    use livegrid_protocol::extjson::document_to_relaxed_json;
    let mut line = serde_json::json!({"id": id, "ns": ns, "filter": document_to_relaxed_json(&spec.filter)});
    if let Some(sort) = &spec.sort {
        line["sort"] = document_to_relaxed_json(sort);
    }
    if spec.skip > 0 {
        line["skip"] = spec.skip.into();
    }
    if let Some(limit) = spec.limit {
        line["limit"] = limit.into();
    }
    if let Some(projection) = &spec.projection {
        line["projection"] = document_to_relaxed_json(projection);
    }
    if after > 0 {
        line["after"] = after.into();
    }
    line
}

#[cfg(test)]
mod tests {
    use livegrid_engine::memory::MemoryState;
    use livegrid_matcher::Query;

    use super::*;

    /// Each kind: updates and deletes touch documents that exist (but chat's), and a write changes about
    /// `fanout` results (within a factor of two), measured by evaluating every query on the
    /// documents before and after each write.
    #[test]
    fn kinds_write_real_documents_and_reach_about_fanout_results() {
        let (docs, queries, writes, fanout) = (600, 400, 300, 5);
        for kind in [Kind::Chat, Kind::Feed, Kind::Shop, Kind::Mixed] {
            let mut generator = generator(kind, 3, docs, queries, fanout);
            let mut state = MemoryState::default();
            for i in 0..docs {
                state.apply(&generator.initial(i).at(i + 1));
            }
            let compiled: Vec<(&str, Query)> = (0..queries)
                .map(|i| generator.query(i))
                .map(|(ns, spec)| (ns, Query::compile(&spec).unwrap()))
                .collect();
            let mut changed = 0;
            for position in docs + 1..=docs + writes {
                let event = generator.write().at(position);
                let before = state.get(&event.ns, &event.id).cloned();
                // The chat workload may edit or delete a message it deleted before (kept so,
                // for the figures measured on it); the other kinds never do.
                if event.op != ChangeOp::Insert && event.ns != CHAT_NAMESPACE {
                    assert!(before.is_some(), "{kind:?}: {:?} of a document that does not exist", event.op);
                }
                let after = event.doc.clone();
                changed += compiled
                    .iter()
                    .filter(|(ns, query)| {
                        let matches = |d: &Option<Arc<Document>>| d.as_ref().is_some_and(|d| query.filter.matches(d));
                        *ns == event.ns.as_str() && (matches(&before) || matches(&after))
                    })
                    .count();
                state.apply(&event);
            }
            let per_write = changed as f64 / writes as f64;
            let want = fanout as f64;
            assert!(
                per_write > want / 2.0 && per_write < want * 2.0,
                "{kind:?}: {per_write:.1} results touched per write, expected about {want}"
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        for kind in [Kind::Items, Kind::Chat, Kind::Feed, Kind::Shop, Kind::Mixed] {
            let lines = || {
                let mut g = generator(kind, 9, 50, 20, 0);
                let mut out: Vec<String> = (0..50).map(|i| change_stream_json(&g.initial(i).at(i + 1))).collect();
                out.extend((0..20).map(|i| {
                    let (ns, spec) = g.query(i);
                    query_json("q", ns, &spec, 50).to_string()
                }));
                out.extend((51..150).map(|p| change_stream_json(&g.write().at(p))));
                out
            };
            assert_eq!(lines(), lines(), "{kind:?}");
        }
    }
}
