//! Limits on what one query may hold, so that no filter, sort or projection a client sends
//! can overflow a worker's stack or hold an unbounded share of its memory.
//!
//! # Nesting
//! A filter, sort or projection document may nest at most [`MAX_NESTING_DEPTH`] levels,
//! counted as MongoDB counts the depth of stored documents: the document itself is level 1
//! and each document or array inside adds a level, so every `{$and: [...]}` costs two. The
//! depth is checked by an iterative walk before any recursive parsing, and parsing,
//! matching and dropping the compiled form then recurse at most that deep.
//!
//! # Field paths
//! A dotted path may have at most [`MAX_PATH_COMPONENTS`] components, the deepest a stored
//! document can be. Inside `$elemMatch` the limit applies to the enclosing path and the
//! inner one together, the path the inner predicate really reads.
//!
//! # Regular expressions
//! All regexes of one filter share a budget of [`QUERY_REGEX_BUDGET`] bytes of compiled
//! form (see [`crate::regex::RegexBudget`]), on top of each regex's own size limit.

use bson::{Bson, Document};

use crate::error::QueryError;

/// The most components a dotted field path may have.
pub const MAX_PATH_COMPONENTS: usize = 100;

/// The most levels a filter, sort or projection document may nest (each document or array is
/// a level; the query document itself is level 1).
pub const MAX_NESTING_DEPTH: usize = 100;

/// Bytes of compiled regular expressions one filter may hold in total.
pub const QUERY_REGEX_BUDGET: usize = 4 << 20;

/// How much of an over-long path an error message quotes.
const PATH_PREFIX_CHARS: usize = 64;

/// Rejects `dotted` if it has more than [`MAX_PATH_COMPONENTS`] components, before anything
/// is allocated for them.
pub(crate) fn check_path_components(dotted: &str) -> Result<(), QueryError> {
    let components = dotted.bytes().filter(|b| *b == b'.').count() + 1;
    if components > MAX_PATH_COMPONENTS {
        return Err(QueryError::PathTooDeep {
            path_prefix: dotted.chars().take(PATH_PREFIX_CHARS).collect(),
            components,
            max: MAX_PATH_COMPONENTS,
        });
    }
    Ok(())
}

/// Checks that `doc` nests at most [`MAX_NESTING_DEPTH`] levels and returns a rough count of
/// the heap bytes it holds (a compiled form holds about as much: its literals and a node per
/// element). `part` names the document in the error (`filter`, `sort`, `projection`).
///
/// The walk keeps its own stack, so any depth is safe to check.
pub(crate) fn measure_document(doc: &Document, part: &str) -> Result<usize, QueryError> {
    heap_bytes_within(doc, MAX_NESTING_DEPTH)
        .ok_or_else(|| QueryError::NestingTooDeep { part: part.to_string(), max: MAX_NESTING_DEPTH })
}

/// A rough count of the heap bytes `doc` holds (its keys, strings and binaries, and a node per
/// element), whatever its depth: what a buffer of documents charges for each.
pub fn document_heap_bytes(doc: &Document) -> usize {
    heap_bytes_within(doc, usize::MAX).unwrap_or(usize::MAX)
}

/// [`document_heap_bytes`], or `None` if `doc` nests deeper than `max_depth`.
fn heap_bytes_within(doc: &Document, max_depth: usize) -> Option<usize> {
    let mut pending = Vec::new();
    let mut bytes = queue_entries(doc, 2, &mut pending);
    while let Some((value, depth)) = pending.pop() {
        let container = matches!(value, Bson::Document(_) | Bson::Array(_) | Bson::JavaScriptCodeWithScope(_));
        if container && depth > max_depth {
            return None;
        }
        bytes += match value {
            Bson::Document(d) => queue_entries(d, depth + 1, &mut pending),
            Bson::Array(items) => {
                pending.extend(items.iter().map(|item| (item, depth + 1)));
                items.len() * std::mem::size_of::<Bson>()
            }
            Bson::JavaScriptCodeWithScope(code) => {
                code.code.len() + queue_entries(&code.scope, depth + 1, &mut pending)
            }
            Bson::String(s) | Bson::JavaScriptCode(s) | Bson::Symbol(s) => s.len(),
            Bson::RegularExpression(r) => r.pattern.as_str().len() + r.options.as_str().len(),
            Bson::Binary(b) => b.bytes.len(),
            _ => 0,
        };
    }
    Some(bytes)
}

/// What servers may cap in a filter before compiling it (each cap is a setting there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterShape {
    /// The most values any `$in`, `$nin` or `$all` lists (a compiled set costs memory and
    /// matching time in proportion).
    pub largest_set: usize,
    /// Levels of nested documents and arrays (the filter itself is 1).
    pub depth: usize,
    /// The longest regular expression pattern, in bytes.
    pub longest_regex: usize,
}

/// The shape of `filter`. The walk keeps its own stack, so any depth is safe to measure.
pub fn filter_shape(filter: &Document) -> FilterShape {
    let mut shape = FilterShape::default();
    let mut pending: Vec<(&Bson, usize)> = filter.iter().map(|(_, v)| (v, 1)).collect();
    shape.depth = 1;
    let note_key = |key: &str, value: &Bson, shape: &mut FilterShape| match (key, value) {
        ("$in" | "$nin" | "$all", Bson::Array(items)) => shape.largest_set = shape.largest_set.max(items.len()),
        ("$regex", Bson::String(pattern)) => shape.longest_regex = shape.longest_regex.max(pattern.len()),
        _ => {}
    };
    for (key, value) in filter {
        note_key(key, value, &mut shape);
    }
    while let Some((value, depth)) = pending.pop() {
        match value {
            Bson::Document(doc) => {
                shape.depth = shape.depth.max(depth + 1);
                for (key, inner) in doc {
                    note_key(key, inner, &mut shape);
                    pending.push((inner, depth + 1));
                }
            }
            Bson::Array(items) => {
                shape.depth = shape.depth.max(depth + 1);
                pending.extend(items.iter().map(|item| (item, depth + 1)));
            }
            Bson::RegularExpression(regex) => {
                shape.longest_regex = shape.longest_regex.max(regex.pattern.as_str().len());
            }
            _ => {}
        }
    }
    shape
}

/// Queues the values of `doc`, which sit at level `depth`, and returns the bytes of its
/// entries (key, value and index slot each).
fn queue_entries<'a>(doc: &'a Document, depth: usize, pending: &mut Vec<(&'a Bson, usize)>) -> usize {
    let mut bytes = 0;
    for (key, value) in doc {
        bytes += key.len() + std::mem::size_of::<Bson>() + 2 * std::mem::size_of::<usize>();
        pending.push((value, depth));
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    /// `{a: {a: ... {a: 1}}}` with `depth` documents in all.
    fn nested_documents(depth: usize) -> Document {
        let mut d = doc! {"a": 1};
        for _ in 1..depth {
            d = doc! {"a": d};
        }
        d
    }

    #[test]
    fn the_shape_of_a_filter_is_measured_at_any_depth() {
        let filter = doc! {
            "a": {"$in": [1, 2]},
            "$or": [{"b": {"$all": [1, 2, 3]}}, {"c": {"$elemMatch": {"d": {"$nin": [1, 2, 3, 4]}}}}],
            "e": {"$regex": "abcdef"},
            "f": Bson::RegularExpression(bson::Regex { pattern: "xyz".try_into().unwrap(), options: "".try_into().unwrap() }),
        };
        let shape = filter_shape(&filter);
        assert_eq!((shape.largest_set, shape.longest_regex), (4, 6));
        // The filter, the $or array, {c: ...}, {$elemMatch: ...}, {d: ...}, {$nin: ...}, the
        // $nin array: 7 levels.
        assert_eq!(shape.depth, 7);
        assert_eq!(filter_shape(&doc! {"a": 1}), FilterShape { largest_set: 0, depth: 1, longest_regex: 0 });
        assert_eq!(filter_shape(&nested_documents(500)).depth, 500);
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        assert!(measure_document(&nested_documents(MAX_NESTING_DEPTH), "filter").is_ok());
        let err = measure_document(&nested_documents(MAX_NESTING_DEPTH + 1), "filter").unwrap_err();
        assert_eq!(err, QueryError::NestingTooDeep { part: "filter".into(), max: MAX_NESTING_DEPTH });
        assert_eq!(err.to_string(), "filter nests deeper than 100 levels (each document or array is a level)");
    }

    #[test]
    fn arrays_count_as_levels() {
        let mut d = doc! {"a": 1};
        for _ in 0..50 {
            d = doc! {"$and": [d]};
        }
        // 1 + 2 × 50 levels.
        assert!(matches!(measure_document(&d, "filter"), Err(QueryError::NestingTooDeep { .. })));
    }

    #[test]
    fn path_components() {
        let ok = vec!["a"; MAX_PATH_COMPONENTS].join(".");
        assert!(check_path_components(&ok).is_ok());
        let deep = vec!["abc"; 10_000].join(".");
        let err = check_path_components(&deep).unwrap_err();
        assert_eq!(
            err,
            QueryError::PathTooDeep {
                path_prefix: deep[..64].to_string(),
                components: 10_000,
                max: MAX_PATH_COMPONENTS
            }
        );
        let message = err.to_string();
        assert!(message.ends_with("has 10000 components; at most 100 are allowed"), "{message}");
        assert!(message.len() < 200, "{message}");
    }

    #[test]
    fn size_grows_with_content() {
        let small = measure_document(&doc! {"a": 1}, "filter").unwrap();
        let large = measure_document(&doc! {"a": 1, "b": "x".repeat(1000)}, "filter").unwrap();
        assert!(large > small + 1000);
    }
}
