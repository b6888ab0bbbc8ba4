//! Document ids as hash-map keys: equal exactly when MongoDB considers the `_id`s equal
//! (`1` and `1.0` are the same document), and small. A `Bson` is 112 bytes; the ids the
//! engine keeps per document (once per worker in the matching stage, in the subscription
//! stage's slots) are 16: 32- and 64-bit integers and ObjectIds, by far the most common
//! `_id`s, inline; any other value boxed.

use std::hash::{Hash, Hasher};

use bson::Bson;
use bson::oid::ObjectId;

/// A document's `_id`, hashable with MongoDB's equality; 16 bytes.
#[derive(Debug, Clone)]
pub enum DocId {
    /// An `int32` id.
    Int32(i32),
    /// An `int64` id.
    Int64(i64),
    /// An ObjectId.
    ObjectId([u8; 12]),
    /// Any other id.
    Other(Box<Bson>),
}

impl DocId {
    /// The id of a document whose `_id` is `value`.
    pub fn new(value: &Bson) -> Self {
        match value {
            Bson::Int32(i) => DocId::Int32(*i),
            Bson::Int64(i) => DocId::Int64(*i),
            Bson::ObjectId(o) => DocId::ObjectId(o.bytes()),
            other => DocId::Other(Box::new(other.clone())),
        }
    }

    /// The `_id` value, exactly as it was given (same BSON type).
    pub fn to_bson(&self) -> Bson {
        match self {
            DocId::Int32(i) => Bson::Int32(*i),
            DocId::Int64(i) => Bson::Int64(*i),
            DocId::ObjectId(o) => Bson::ObjectId(ObjectId::from_bytes(*o)),
            DocId::Other(v) => (**v).clone(),
        }
    }

    /// Runs `f` on the `_id` value: borrowed when boxed, rebuilt (without allocating) when
    /// inline.
    fn with_bson<R>(&self, f: impl FnOnce(&Bson) -> R) -> R {
        match self {
            DocId::Other(v) => f(v),
            inline => f(&inline.to_bson()),
        }
    }

    /// The write partition of this document in a grid with `partitions` write partitions.
    pub fn partition(&self, partitions: usize) -> usize {
        self.with_bson(|v| (livegrid_matcher::value_hash(v) % partitions as u64) as usize)
    }
}

impl From<Bson> for DocId {
    fn from(value: Bson) -> Self {
        match value {
            Bson::Int32(i) => DocId::Int32(i),
            Bson::Int64(i) => DocId::Int64(i),
            Bson::ObjectId(o) => DocId::ObjectId(o.bytes()),
            other => DocId::Other(Box::new(other)),
        }
    }
}

impl PartialEq for DocId {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (DocId::Int64(a), DocId::Int64(b)) => a == b,
            (DocId::Int32(a), DocId::Int32(b)) => a == b,
            (DocId::ObjectId(a), DocId::ObjectId(b)) => a == b,
            (DocId::ObjectId(_), DocId::Int32(_) | DocId::Int64(_))
            | (DocId::Int32(_) | DocId::Int64(_), DocId::ObjectId(_)) => false,
            // Mixed numeric types and everything else: MongoDB's equality.
            (a, b) => a.with_bson(|a| b.with_bson(|b| livegrid_matcher::values_equal(a, b))),
        }
    }
}

impl Eq for DocId {}

impl Hash for DocId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.with_bson(|v| livegrid_matcher::bson_order::hash_value(v, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn small_and_equal_as_mongodb_compares() {
        assert_eq!(std::mem::size_of::<DocId>(), 16);
        let ids = [
            Bson::Int32(1),
            Bson::Int64(1),
            Bson::Double(1.0),
            Bson::Int64(2),
            Bson::String("1".into()),
            Bson::ObjectId(ObjectId::from_bytes([1; 12])),
        ];
        let set: HashSet<DocId> = ids.iter().map(DocId::new).collect();
        // 1, 1 and 1.0 are one document; "1", 2 and the ObjectId are three more.
        assert_eq!(set.len(), 4);
        for id in &ids {
            assert_eq!(DocId::new(id).to_bson(), *id);
            assert_eq!(DocId::from(id.clone()), DocId::new(id));
        }
        assert_eq!(DocId::new(&Bson::Double(1.0)), DocId::new(&Bson::Int64(1)));
        assert_ne!(DocId::new(&Bson::Double(1.5)), DocId::new(&Bson::Int64(1)));
    }
}
