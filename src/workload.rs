//! Synthetic workloads for benchmarks: a collection of items, a write stream over it, and
//! filter queries of the kinds live applications register (equality, ranges, `$in`).
//!
//! Key spaces are large so that a write matches few queries, as when queries are specific to
//! users or items: with 100,000 queries a write enters or leaves about one query's result on
//! average (the benchmark reports deltas per write so that figures can be read against it).

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

    fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
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
/// messages, some edits (a reaction count or the text) and some deletions of recent messages.
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
