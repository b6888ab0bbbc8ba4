//! Sort specifications and sort keys in MongoDB's order.
//!
//! A field's sort key is taken from the values its path reaches: ascending sorts use the
//! smallest, descending the largest (an array sorts by its smallest element ascending and its
//! largest descending). A missing value sorts as null; an empty array sorts below null in
//! both directions. Ties are always broken by `_id` ascending, so every result order is
//! deterministic.

use std::cmp::Ordering;

use bson::{Bson, Document};

use crate::bson_order::compare_values;
use crate::error::QueryError;
use crate::path::{FieldPath, LeafArrays};

/// The direction of one sort field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// `1`
    Ascending,
    /// `-1`
    Descending,
}

/// A parsed sort specification such as `{age: -1, name: 1}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SortSpec {
    fields: Vec<(FieldPath, Direction)>,
}

/// The key a document sorts by under a [`SortSpec`]; ordering keys orders documents.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SortKey {
    parts: Vec<(Bson, Direction)>,
    id: Bson,
}

impl SortSpec {
    /// Parses a sort document; values must be `1` or `-1`.
    pub fn parse(spec: &Document) -> Result<Self, QueryError> {
        crate::limits::measure_document(spec, "sort")?;
        let mut fields = Vec::with_capacity(spec.len());
        for (key, value) in spec {
            // Before anything quotes the key: it may be huge.
            crate::limits::check_path_components(key)?;
            let direction = match value {
                Bson::Int32(1) | Bson::Int64(1) => Direction::Ascending,
                Bson::Int32(-1) | Bson::Int64(-1) => Direction::Descending,
                Bson::Double(d) if *d == 1.0 => Direction::Ascending,
                Bson::Double(d) if *d == -1.0 => Direction::Descending,
                Bson::Document(d) if d.contains_key("$meta") => {
                    return Err(QueryError::unsupported("$meta", key));
                }
                other => {
                    return Err(QueryError::Sort {
                        path: key.clone(),
                        reason: format!("direction must be 1 or -1, found {other}"),
                    });
                }
            };
            let path =
                FieldPath::parse(key).map_err(|e| QueryError::SortPath { path: key.clone(), source: Box::new(e) })?;
            if fields.iter().any(|(p, _): &(FieldPath, Direction)| p == &path) {
                return Err(QueryError::Sort { path: key.clone(), reason: "field appears twice".into() });
            }
            fields.push((path, direction));
        }
        Ok(SortSpec { fields })
    }

    /// Whether the specification has no fields (result order is then `_id` ascending).
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Roughly the heap bytes the specification holds.
    pub fn memory_estimate(&self) -> usize {
        self.fields.iter().map(|(path, _)| std::mem::size_of::<(FieldPath, Direction)>() + path.heap_bytes()).sum()
    }

    /// The sort fields in order.
    pub fn fields(&self) -> &[(FieldPath, Direction)] {
        &self.fields
    }

    /// The key `doc` sorts by.
    pub fn key(&self, doc: &Document) -> SortKey {
        let parts =
            self.fields.iter().map(|(path, direction)| (field_key(path, *direction, doc), *direction)).collect();
        SortKey { parts, id: doc.get("_id").cloned().unwrap_or(Bson::Null) }
    }

    /// Compares two documents in result order.
    pub fn compare(&self, a: &Document, b: &Document) -> Ordering {
        self.key(a).cmp(&self.key(b))
    }
}

/// The smallest (ascending) or largest (descending) value the path reaches; arrays at the end
/// of the path contribute their elements, an empty one sorts as `undefined` (below null).
fn field_key(path: &FieldPath, direction: Direction, doc: &Document) -> Bson {
    let mut best: Option<Bson> = None;
    let mut consider = |value: &Bson| {
        let better = match &best {
            None => true,
            Some(current) => {
                let ord = compare_values(value, current);
                match direction {
                    Direction::Ascending => ord == Ordering::Less,
                    Direction::Descending => ord == Ordering::Greater,
                }
            }
        };
        if better {
            best = Some(value.clone());
        }
    };
    path.any(doc, LeafArrays::Whole, &mut |candidate| {
        match candidate {
            None => consider(&Bson::Null),
            Some(Bson::Array(items)) if items.is_empty() => consider(&Bson::Undefined),
            Some(Bson::Array(items)) => items.iter().for_each(&mut consider),
            Some(value) => consider(value),
        }
        false
    });
    best.unwrap_or(Bson::Null)
}

impl SortKey {
    /// The `_id` of the document the key was taken from.
    pub fn id(&self) -> &Bson {
        &self.id
    }

    /// The key as one BSON array (`[[value, 1 or -1], ..., _id]`), to travel between workers.
    pub fn to_bson(&self) -> Bson {
        let mut items: Vec<Bson> = self
            .parts
            .iter()
            .map(|(value, direction)| {
                let sign = if *direction == Direction::Ascending { 1 } else { -1 };
                Bson::Array(vec![value.clone(), Bson::Int32(sign)])
            })
            .collect();
        items.push(self.id.clone());
        Bson::Array(items)
    }

    /// The key [`SortKey::to_bson`] wrote, or `None` for anything else.
    pub fn from_bson(value: &Bson) -> Option<SortKey> {
        let Bson::Array(items) = value else { return None };
        let (id, parts) = items.split_last()?;
        let parts = parts
            .iter()
            .map(|part| match part {
                Bson::Array(pair) if pair.len() == 2 => {
                    let direction =
                        if pair[1] == Bson::Int32(-1) { Direction::Descending } else { Direction::Ascending };
                    Some((pair[0].clone(), direction))
                }
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some(SortKey { parts, id: id.clone() })
    }
}

impl Eq for SortKey {}

impl PartialOrd for SortKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SortKey {
    fn cmp(&self, other: &Self) -> Ordering {
        for ((a, direction), (b, _)) in self.parts.iter().zip(&other.parts) {
            let ord = compare_values(a, b);
            let ord = if *direction == Direction::Descending { ord.reverse() } else { ord };
            if ord != Ordering::Equal {
                return ord;
            }
        }
        compare_values(&self.id, &other.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn order(spec: Document, docs: Vec<Document>) -> Vec<i32> {
        let spec = SortSpec::parse(&spec).unwrap();
        let mut docs = docs;
        docs.sort_by(|a, b| spec.compare(a, b));
        docs.iter().map(|d| d.get_i32("_id").unwrap()).collect()
    }

    #[test]
    fn arrays_sort_by_min_ascending_and_max_descending() {
        let docs =
            vec![doc! {"_id": 1, "a": [1, 10]}, doc! {"_id": 2, "a": 5}, doc! {"_id": 3, "a": []}, doc! {"_id": 4}];
        assert_eq!(order(doc! {"a": 1}, docs.clone()), vec![3, 4, 1, 2]);
        assert_eq!(order(doc! {"a": -1}, docs), vec![1, 2, 4, 3]);
    }

    #[test]
    fn ties_break_by_id() {
        let docs = vec![doc! {"_id": 3, "a": 1}, doc! {"_id": 1, "a": 1}, doc! {"_id": 2, "a": 0}];
        assert_eq!(order(doc! {"a": -1}, docs.clone()), vec![1, 3, 2]);
        assert_eq!(order(doc! {}, docs), vec![1, 2, 3]);
    }

    #[test]
    fn bad_specs() {
        assert!(SortSpec::parse(&doc! {"a": 2}).is_err());
        assert!(SortSpec::parse(&doc! {"a": "asc"}).is_err());
        assert!(matches!(SortSpec::parse(&doc! {"a": {"$meta": "textScore"}}), Err(QueryError::Unsupported { .. })));
    }

    #[test]
    fn bad_paths_keep_their_cause() {
        use std::error::Error;

        let err = SortSpec::parse(&doc! {"a..b": 1}).unwrap_err();
        assert_eq!(err.to_string(), r#"bad sort at a..b: bad field path "a..b": empty path component"#);
        assert_eq!(
            err.source().map(|s| s.to_string()).as_deref(),
            Some(r#"bad field path "a..b": empty path component"#)
        );
        let QueryError::SortPath { source, .. } = &err else { panic!("{err:?}") };
        assert!(matches!(**source, QueryError::BadPath { .. }), "{source}");
    }

    #[test]
    fn deep_paths_and_documents_are_errors() {
        let key = vec!["a"; 10_000].join(".");
        let err = SortSpec::parse(&doc! {key.clone(): 1}).unwrap_err();
        assert!(matches!(err, QueryError::PathTooDeep { components: 10_000, .. }), "{err}");
        // A bad direction is reported without quoting the huge key.
        let err = SortSpec::parse(&doc! {key: 2}).unwrap_err();
        assert!(matches!(err, QueryError::PathTooDeep { .. }), "{err}");
        assert!(SortSpec::parse(&doc! {vec!["a"; 100].join("."): -1}).is_ok());

        let mut value = bson::Bson::Int32(1);
        for _ in 0..150 {
            value = bson::Bson::Document(doc! {"x": value});
        }
        let err = SortSpec::parse(&doc! {"a": value}).unwrap_err();
        assert_eq!(err, QueryError::NestingTooDeep { part: "sort".into(), max: crate::MAX_NESTING_DEPTH });
    }

    #[test]
    fn memory_estimate_grows_with_fields() {
        let one = SortSpec::parse(&doc! {"a": 1}).unwrap().memory_estimate();
        let two = SortSpec::parse(&doc! {"a": 1, "b.c.d": -1}).unwrap().memory_estimate();
        assert!(one > 0 && two > one, "{one} {two}");
    }
}
