//! The mixed workload: the chat, feed and shop collections at once, writes spread evenly over
//! them, and queries a quarter each of chat, feed and shop subscriptions and a quarter of
//! harder ones on the products: `$or` of a category and a tag, `$all` over tags, and
//! anchored regular expressions on names.

use bson::doc;
use livegrid_matcher::QuerySpec;

use super::feed::Feed;
use super::shop::{self, Shop};
use super::{Chat, Generator, Workload, Write};

/// The mixed generator.
pub struct Mixed {
    random: Workload,
    chat: Chat,
    feed: Feed,
    shop: Shop,
}

impl Mixed {
    /// A mixed workload: a third of `docs` in each collection, a quarter of `queries` of each
    /// kind, each collection's writes reaching about `fanout` subscriptions.
    pub fn new(seed: u64, docs: u64, queries: u64, fanout: u64) -> Mixed {
        let share = (queries / 4).max(1);
        Mixed {
            random: Workload::new(seed ^ 0x5EED),
            chat: Chat::new(seed, share, fanout),
            feed: Feed::new(seed.wrapping_add(1), docs / 3, share, fanout),
            shop: Shop::new(seed.wrapping_add(2), docs / 3, share * 2, fanout),
        }
    }

    /// One of the harder product queries.
    fn product_query(&mut self) -> QuerySpec {
        let tags = self.shop.categories() * 4;
        let tag = |random: &mut Workload| format!("t{}", random.below(tags));
        let filter = match self.random.below(3) {
            0 => {
                let category = format!("c{}", self.random.below(self.shop.categories()));
                doc! {"$or": [{"category": category}, {"tags": tag(&mut self.random)}]}
            }
            1 => doc! {"tags": {"$all": [tag(&mut self.random), tag(&mut self.random)]}},
            _ => doc! {"name": {"$regex": format!("^p{}-", self.random.below(10_000))}},
        };
        QuerySpec { filter, ..Default::default() }
    }
}

impl Generator for Mixed {
    fn initial(&mut self, i: u64) -> Write {
        match i % 3 {
            0 => self.chat.initial(i / 3),
            1 => self.feed.initial(i / 3),
            _ => self.shop.initial(i / 3),
        }
    }

    fn query(&mut self, i: u64) -> (&'static str, QuerySpec) {
        match i % 4 {
            0 => Generator::query(&mut self.chat, i / 4),
            1 => self.feed.query(i / 4),
            2 => self.shop.query(i / 4),
            _ => (shop::NAMESPACE, self.product_query()),
        }
    }

    fn write(&mut self) -> Write {
        match self.random.below(3) {
            0 => self.chat.write(),
            1 => self.feed.write(),
            _ => self.shop.write(),
        }
    }
}
