//! The shop workload: products by category; subscriptions to a category's products in a price
//! range (a third of them the 20 cheapest, sorted by price). Categories are as many as make a
//! product's write reach about `fanout` subscriptions. Writes: stock changes (80 %), price
//! changes (15 %), new products (3 %), products withdrawn (2 %).

use bson::{Bson, Document, doc};
use livegrid_engine::ChangeOp;
use livegrid_matcher::QuerySpec;

use super::{Generator, Workload, Write};

/// The namespace of the shop workload.
pub const NAMESPACE: &str = "bench.products";

/// Prices are whole cents below this.
const PRICE_MAX: i64 = 100_000;

/// The shop generator: it keeps every product, to update them in place.
pub struct Shop {
    random: Workload,
    categories: u64,
    /// The products by id (`None`: withdrawn).
    products: Vec<Option<Document>>,
}

impl Shop {
    /// A shop whose products' writes reach about `fanout` of `queries` subscriptions each (a
    /// subscription's range covers about half its category's prices).
    pub fn new(seed: u64, docs: u64, queries: u64, fanout: u64) -> Shop {
        let categories = (queries / (2 * fanout.max(1))).max(1);
        Shop { random: Workload::new(seed), categories, products: Vec::with_capacity(docs as usize) }
    }

    fn product(&mut self, id: u64) -> Document {
        let category = self.random.below(self.categories);
        doc! {
            "_id": id as i64,
            "category": format!("c{category}"),
            "name": format!("p{id}-{}", ["lamp", "chair", "table", "shelf", "rug"][(id % 5) as usize]),
            "price": self.random.below(PRICE_MAX as u64) as i64,
            "stock": self.random.below(50) as i32,
            "tags": [format!("t{}", self.random.below(self.categories * 4)), format!("t{}", self.random.below(self.categories * 4))],
        }
    }

    fn new_product(&mut self) -> Write {
        let id = self.products.len() as u64;
        let doc = self.product(id);
        self.products.push(Some(doc.clone()));
        Write::insert(NAMESPACE, doc)
    }

    /// A product that exists, if any (a few tries).
    fn existing(&mut self) -> Option<u64> {
        (0..4)
            .map(|_| self.random.below(self.products.len().max(1) as u64))
            .find(|&id| self.products.get(id as usize).is_some_and(Option::is_some))
    }

    /// The number of categories (for the mixed workload's queries).
    pub(crate) fn categories(&self) -> u64 {
        self.categories
    }
}

impl Generator for Shop {
    fn initial(&mut self, _: u64) -> Write {
        self.new_product()
    }

    fn query(&mut self, _: u64) -> (&'static str, QuerySpec) {
        let low = self.random.below(PRICE_MAX as u64 / 2) as i64;
        let filter = doc! {
            "category": format!("c{}", self.random.below(self.categories)),
            "price": {"$gte": low, "$lt": low + PRICE_MAX / 2},
        };
        let spec = if self.random.below(3) == 0 {
            QuerySpec { filter, sort: Some(doc! {"price": 1}), limit: Some(20), ..Default::default() }
        } else {
            QuerySpec { filter, ..Default::default() }
        };
        (NAMESPACE, spec)
    }

    fn write(&mut self) -> Write {
        let kind = self.random.below(100);
        let Some(id) = self.existing().filter(|_| kind < 97) else { return self.new_product() };
        if kind >= 95 {
            self.products[id as usize] = None;
            return Write { ns: NAMESPACE, op: ChangeOp::Delete, id: Bson::Int64(id as i64), doc: None };
        }
        let mut doc = self.products[id as usize].clone().expect("an existing product");
        if kind < 80 {
            doc.insert("stock", self.random.below(50) as i32);
        } else {
            doc.insert("price", self.random.below(PRICE_MAX as u64) as i64);
        }
        self.products[id as usize] = Some(doc.clone());
        Write { ns: NAMESPACE, op: ChangeOp::Update, id: Bson::Int64(id as i64), doc: Some(doc) }
    }
}
