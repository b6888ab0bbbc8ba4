//! Document ids as hash-map keys: equal exactly when MongoDB considers the `_id`s equal
//! (`1` and `1.0` are the same document).

use std::hash::{Hash, Hasher};

use bson::Bson;

/// A document's `_id`, hashable with MongoDB's equality.
#[derive(Debug, Clone)]
pub struct DocId(pub Bson);

impl PartialEq for DocId {
    fn eq(&self, other: &Self) -> bool {
        livegrid_matcher::values_equal(&self.0, &other.0)
    }
}

impl Eq for DocId {}

impl Hash for DocId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        livegrid_matcher::bson_order::hash_value(&self.0, state)
    }
}

impl DocId {
    /// The write partition of this document in a grid with `partitions` write partitions.
    pub fn partition(&self, partitions: usize) -> usize {
        (livegrid_matcher::value_hash(&self.0) % partitions as u64) as usize
    }
}
