//! The feed workload: posts by authors; every subscription is a user's feed, the newest 20
//! posts of the 10 authors they follow (`{author: {$in: [...]}}`, sorted by time). Authors are
//! as many as make each post reach about `fanout` feeds. Writes: new posts (70 %), likes on
//! recent posts (25 %), deletions of recent posts (5 %).

use bson::{Document, doc};
use livegrid_engine::ChangeOp;
use livegrid_matcher::QuerySpec;

use super::{Generator, Workload, Write};

/// The namespace of the feed workload.
pub const NAMESPACE: &str = "bench.posts";

/// Authors one feed follows.
const FOLLOWS: u64 = 10;
/// Posts a feed shows.
const FEED_LENGTH: u64 = 20;
/// How far back likes and deletions reach, in posts.
const RECENT: u64 = 1000;

/// The feed generator.
pub struct Feed {
    random: Workload,
    authors: u64,
    next_id: u64,
    /// Posts deleted: never updated or deleted again, as in a real stream.
    deleted: std::collections::HashSet<u64>,
}

impl Feed {
    /// A feed workload whose posts reach about `fanout` of `queries` feeds each.
    pub fn new(seed: u64, _docs: u64, queries: u64, fanout: u64) -> Feed {
        let authors = (queries * FOLLOWS / fanout.max(1)).max(FOLLOWS);
        Feed { random: Workload::new(seed), authors, next_id: 0, deleted: Default::default() }
    }

    /// A post's author: a function of its id, so that its likes stay with it.
    fn author_of(&self, id: u64) -> u64 {
        (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16) % self.authors
    }

    fn post(&mut self, id: u64) -> Document {
        doc! {
            "_id": id as i64,
            "author": format!("a{}", self.author_of(id)),
            "ts": id as i64,
            "text": "a post of the benchmark feed",
            "likes": self.random.below(100) as i32,
        }
    }

    fn new_post(&mut self) -> Write {
        let id = self.next_id;
        self.next_id += 1;
        Write::insert(NAMESPACE, self.post(id))
    }
}

impl Generator for Feed {
    fn initial(&mut self, _: u64) -> Write {
        self.new_post()
    }

    fn query(&mut self, _: u64) -> (&'static str, QuerySpec) {
        let follows: Vec<String> = (0..FOLLOWS).map(|_| format!("a{}", self.random.below(self.authors))).collect();
        let spec = QuerySpec {
            filter: doc! {"author": {"$in": follows}},
            sort: Some(doc! {"ts": -1}),
            limit: Some(FEED_LENGTH),
            ..Default::default()
        };
        (NAMESPACE, spec)
    }

    fn write(&mut self) -> Write {
        let kind = self.random.below(100);
        if kind < 70 || self.next_id < RECENT {
            return self.new_post();
        }
        let id = self.next_id - 1 - self.random.below(RECENT);
        if self.deleted.contains(&id) {
            return self.new_post();
        }
        if kind < 95 {
            let doc = self.post(id);
            Write { ns: NAMESPACE, op: ChangeOp::Update, id: doc.get("_id").cloned().unwrap(), doc: Some(doc) }
        } else {
            self.deleted.insert(id);
            Write { ns: NAMESPACE, op: ChangeOp::Delete, id: bson::Bson::Int64(id as i64), doc: None }
        }
    }
}
