//! Dotted field paths and MongoDB's implicit array traversal.
//!
//! A path such as `a.b` names every value reachable by descending through documents, where an
//! array met on the way is traversed element by element (its documents are searched for the
//! rest of the path). A numeric component (`a.1`) also indexes into an array. Each value the
//! path reaches is a *candidate*; a predicate on the path matches when some candidate does.
//!
//! # Missing values
//! Where the path does not exist (or a document inside an array lacks the rest of it) the
//! traversal yields [`None`], a missing candidate: `{a: null}` matches it, `$exists: true`
//! does not. Scalars inside an array that the path must descend through yield nothing, so
//! `{"a.b": null}` matches `{a: [{c: 1}]}` and `{a: 5}` but not `{a: []}` or `{a: [5]}`.
//!
//! # Leaf arrays
//! An array at the end of the path is a candidate itself and, for most operators, so is each
//! of its elements (one level only): `{tags: "x"}` matches `{tags: ["x", "y"]}` and
//! `{tags: ["x", "y"]}` matches it too. `$size` and `$elemMatch` see the whole array only.

use bson::{Bson, Document};

use crate::error::QueryError;

/// A parsed dotted field path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FieldPath {
    dotted: Box<str>,
    parts: Box<[PathPart]>,
}

/// A component of a path: a byte range of the dotted text (paths are held by every compiled
/// query, so they stay small).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PathPart {
    start: u32,
    end: u32,
    /// The component as an array index, when it is a plain non-negative integer.
    index: Option<u32>,
}

/// Whether an array at the end of the path contributes its elements as candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafArrays {
    /// The array and each of its elements are candidates.
    Expand,
    /// Only the array itself is a candidate.
    Whole,
}

impl FieldPath {
    /// Parses a dotted path; empty components (`a..b`, `.a`, `a.`) are rejected, and so are
    /// paths of more than [`crate::MAX_PATH_COMPONENTS`] components.
    pub fn parse(dotted: &str) -> Result<Self, QueryError> {
        if dotted.is_empty() {
            return Err(QueryError::BadPath { path: dotted.to_string(), reason: "empty field path".into() });
        }
        crate::limits::check_path_components(dotted)?;
        if dotted.len() > u32::MAX as usize / 2 {
            return Err(QueryError::BadPath {
                path: dotted.chars().take(40).collect(),
                reason: "path too long".into(),
            });
        }
        let mut parts = Vec::new();
        let mut start = 0u32;
        for name in dotted.split('.') {
            if name.is_empty() {
                return Err(QueryError::BadPath { path: dotted.to_string(), reason: "empty path component".into() });
            }
            if name.starts_with('$') {
                return Err(QueryError::BadPath {
                    path: dotted.to_string(),
                    reason: format!("unknown operator or field name starting with $: {name}"),
                });
            }
            let index = if name.bytes().all(|b| b.is_ascii_digit()) && (name == "0" || !name.starts_with('0')) {
                name.parse().ok()
            } else {
                None
            };
            let end = start + name.len() as u32;
            parts.push(PathPart { start, end, index });
            start = end + 1;
        }
        Ok(FieldPath { dotted: dotted.into(), parts: parts.into() })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.dotted
    }

    /// The path `self.rest`.
    ///
    /// # Panics
    /// If the joined path has more than [`crate::MAX_PATH_COMPONENTS`] components. A path
    /// inside a parsed `$elemMatch` joined to the `$elemMatch`'s own path never has: the
    /// limit is checked on the two together.
    pub fn join(&self, rest: &FieldPath) -> FieldPath {
        FieldPath::parse(&format!("{}.{}", self.dotted, rest.dotted)).expect("two valid paths join into a valid path")
    }

    /// The components of the path.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(|p| self.name(p))
    }

    /// Roughly the heap bytes the path holds.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.dotted.len() + std::mem::size_of_val(&*self.parts)
    }

    fn name(&self, part: &PathPart) -> &str {
        &self.dotted[part.start as usize..part.end as usize]
    }

    /// Calls `visit` with every candidate of the path in `doc` until it returns `true`;
    /// returns whether it did.
    pub fn any<'a>(
        &self,
        doc: &'a Document,
        leaf: LeafArrays,
        visit: &mut dyn FnMut(Option<&'a Bson>) -> bool,
    ) -> bool {
        Walk { path: self, leaf }.document(doc, &self.parts, visit)
    }

    /// Collects every candidate of the path in `doc`.
    pub fn candidates<'a>(&self, doc: &'a Document, leaf: LeafArrays) -> Vec<Option<&'a Bson>> {
        let mut out = Vec::new();
        self.any(doc, leaf, &mut |v| {
            out.push(v);
            false
        });
        out
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.dotted)
    }
}

/// One traversal of a path through a document.
struct Walk<'p> {
    path: &'p FieldPath,
    leaf: LeafArrays,
}

impl Walk<'_> {
    fn document<'a>(
        &self,
        doc: &'a Document,
        parts: &[PathPart],
        visit: &mut dyn FnMut(Option<&'a Bson>) -> bool,
    ) -> bool {
        let (first, rest) = parts.split_first().expect("paths are never empty");
        match doc.get(self.path.name(first)) {
            None => visit(None),
            Some(value) => self.value(value, rest, visit),
        }
    }

    fn value<'a>(&self, value: &'a Bson, rest: &[PathPart], visit: &mut dyn FnMut(Option<&'a Bson>) -> bool) -> bool {
        let Some(next) = rest.first() else {
            if visit(Some(value)) {
                return true;
            }
            if let (LeafArrays::Expand, Bson::Array(items)) = (self.leaf, value) {
                return items.iter().any(|item| visit(Some(item)));
            }
            return false;
        };
        match value {
            Bson::Document(d) => self.document(d, rest, visit),
            Bson::Array(items) => {
                // The element at a numeric component's offset continues with the rest of the path
                // after that component; every other document element is searched for the whole
                // rest. Scalars inside the array are skipped, so `{a: []}` yields no candidate.
                for (i, item) in items.iter().enumerate() {
                    let found = if next.index == Some(i as u32) {
                        self.value(item, &rest[1..], visit)
                    } else if let Bson::Document(d) = item {
                        self.document(d, rest, visit)
                    } else {
                        false
                    };
                    if found {
                        return true;
                    }
                }
                false
            }
            _ => visit(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{bson, doc};

    fn values(path: &str, doc: &Document, leaf: LeafArrays) -> Vec<Option<Bson>> {
        FieldPath::parse(path).unwrap().candidates(doc, leaf).into_iter().map(|v| v.cloned()).collect()
    }

    #[test]
    fn traverses_arrays_of_documents() {
        let d = doc! {"a": [{"b": 1}, {"c": 2}, {"b": [3, 4]}, 5]};
        assert_eq!(
            values("a.b", &d, LeafArrays::Expand),
            vec![Some(bson!(1)), None, Some(bson!([3, 4])), Some(bson!(3)), Some(bson!(4))]
        );
        assert_eq!(values("a.b", &d, LeafArrays::Whole), vec![Some(bson!(1)), None, Some(bson!([3, 4]))]);
    }

    #[test]
    fn numeric_components_index_arrays() {
        let d = doc! {"a": [10, {"0": 7}], "b": {"1": "x"}};
        assert_eq!(values("a.0", &d, LeafArrays::Expand), vec![Some(bson!(10)), Some(bson!(7))]);
        assert_eq!(values("b.1", &d, LeafArrays::Expand), vec![Some(bson!("x"))]);
        // The document element lacks field "5": a missing candidate.
        assert_eq!(values("a.5", &d, LeafArrays::Expand), vec![None]);
    }

    #[test]
    fn nested_leaf_arrays_expand_one_level() {
        let d = doc! {"a": [[1, 2], 3]};
        assert_eq!(
            values("a", &d, LeafArrays::Expand),
            vec![Some(bson!([[1, 2], 3])), Some(bson!([1, 2])), Some(bson!(3))]
        );
    }

    #[test]
    fn missing_and_scalars() {
        let d = doc! {"a": 1, "e": []};
        assert_eq!(values("a.b", &d, LeafArrays::Expand), vec![None]);
        assert_eq!(values("z", &d, LeafArrays::Expand), vec![None]);
        assert_eq!(values("e.b", &d, LeafArrays::Expand), vec![]);
    }

    #[test]
    fn bad_paths() {
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("").is_err());
        assert!(FieldPath::parse("a.$b").is_err());
    }

    #[test]
    fn at_most_100_components() {
        assert_eq!(FieldPath::parse(&vec!["a"; 100].join(".")).unwrap().components().count(), 100);
        let err = FieldPath::parse(&vec!["a"; 101].join(".")).unwrap_err();
        assert!(matches!(err, QueryError::PathTooDeep { components: 101, .. }), "{err}");
        let err = FieldPath::parse(&vec!["b"; 10_000].join(".")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("field path starting {:?} has 10000 components; at most 100 are allowed", "b.".repeat(32))
        );
    }
}
