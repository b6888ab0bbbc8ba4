//! Projections: which fields of a matching document a client receives.
//!
//! A projection either includes fields (`{a: 1, "b.c": 1}`: only those, plus `_id` unless
//! `_id: 0`) or excludes them (`{a: 0}`: everything else); mixing the two is an error, `_id`
//! excepted. Through arrays, an inclusion keeps the projected fields of each document element
//! and drops scalar elements; an exclusion removes the fields from document elements and
//! keeps everything else. Projection operators (`$slice`, `$elemMatch`, `$meta`, positional
//! `$`) and computed fields are not supported and are rejected.

use std::collections::BTreeMap;

use bson::{Bson, Document};

use crate::error::QueryError;

/// A parsed projection.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Projection {
    mode: Mode,
    tree: Node,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    /// No projection: documents pass unchanged.
    #[default]
    Identity,
    Include,
    Exclude,
}

/// A tree of projected paths; a leaf (no children) takes the whole value.
#[derive(Debug, Clone, PartialEq, Default)]
struct Node {
    children: BTreeMap<String, Node>,
}

impl Projection {
    /// Parses a projection document.
    pub fn parse(spec: &Document) -> Result<Self, QueryError> {
        crate::limits::measure_document(spec, "projection")?;
        let mut include_id = true;
        let mut mode = Mode::Identity;
        let mut tree = Node::default();
        for (key, value) in spec {
            // Before anything quotes the key or builds a node per component.
            crate::limits::check_path_components(key)?;
            let include = match value {
                Bson::Boolean(b) => *b,
                Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => {
                    crate::bson_order::Number::of(value).expect("numeric").as_f64() != 0.0
                }
                Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => {
                    return Err(QueryError::unsupported(d.keys().next().expect("checked"), key));
                }
                _ => {
                    return Err(QueryError::Projection {
                        path: key.clone(),
                        reason: "computed fields are not supported; use 1/true or 0/false".into(),
                    });
                }
            };
            if key.split('.').any(|part| part == "$") || key.ends_with(".$") {
                return Err(QueryError::unsupported("$ (positional projection)", key));
            }
            if key.split('.').any(|part| part.is_empty() || part.starts_with('$')) {
                return Err(QueryError::Projection { path: key.clone(), reason: "invalid field path".into() });
            }
            if key == "_id" {
                include_id = include;
                continue;
            }
            let wanted = if include { Mode::Include } else { Mode::Exclude };
            if mode != Mode::Identity && mode != wanted {
                return Err(QueryError::Projection {
                    path: key.clone(),
                    reason: "cannot mix inclusion and exclusion (except for _id)".into(),
                });
            }
            mode = wanted;
            tree.insert(key)?;
        }
        if mode == Mode::Identity && spec.contains_key("_id") {
            mode = if include_id { Mode::Include } else { Mode::Exclude };
        }
        // `_id` follows the mode: kept by an inclusion unless `_id: 0`, dropped by an
        // exclusion only when `_id: 0`.
        if (mode == Mode::Include && include_id) || (mode == Mode::Exclude && !include_id) {
            tree.children.insert("_id".to_string(), Node::default());
        }
        Ok(Projection { mode, tree })
    }

    /// Whether the projection passes documents unchanged.
    pub fn is_identity(&self) -> bool {
        self.mode == Mode::Identity
    }

    /// Roughly the heap bytes the projection holds.
    pub fn memory_estimate(&self) -> usize {
        self.tree.heap_bytes()
    }

    /// The projected copy of `doc`.
    pub fn apply(&self, doc: &Document) -> Document {
        match self.mode {
            Mode::Identity => doc.clone(),
            Mode::Include => include(doc, &self.tree),
            Mode::Exclude => exclude(doc, &self.tree),
        }
    }
}

impl Node {
    /// Recursive, as deep as the longest projected path: at most `MAX_PATH_COMPONENTS`.
    fn heap_bytes(&self) -> usize {
        self.children
            .iter()
            .map(|(key, child)| key.len() + std::mem::size_of::<(String, Node)>() + child.heap_bytes())
            .sum()
    }

    fn insert(&mut self, dotted: &str) -> Result<(), QueryError> {
        let collision = || QueryError::Projection {
            path: dotted.to_string(),
            reason: "path collision with another projected path".into(),
        };
        let mut node = self;
        let parts: Vec<&str> = dotted.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let exists = node.children.contains_key(*part);
            let child = node.children.entry(part.to_string()).or_default();
            // A leaf already projected here, or a deeper path already under this one.
            if exists && (child.children.is_empty() || last) {
                return Err(collision());
            }
            node = child;
        }
        Ok(())
    }
}

fn include(doc: &Document, node: &Node) -> Document {
    let mut out = Document::new();
    for (key, value) in doc {
        let Some(child) = node.children.get(key) else {
            continue;
        };
        if child.children.is_empty() {
            out.insert(key.clone(), value.clone());
        } else if let Some(projected) = include_value(value, child) {
            out.insert(key.clone(), projected);
        }
    }
    out
}

fn include_value(value: &Bson, node: &Node) -> Option<Bson> {
    match value {
        Bson::Document(d) => Some(Bson::Document(include(d, node))),
        Bson::Array(items) => Some(Bson::Array(items.iter().filter_map(|item| include_value(item, node)).collect())),
        _ => None,
    }
}

fn exclude(doc: &Document, node: &Node) -> Document {
    let mut out = Document::new();
    for (key, value) in doc {
        match node.children.get(key) {
            None => {
                out.insert(key.clone(), value.clone());
            }
            Some(child) if child.children.is_empty() => {}
            Some(child) => {
                out.insert(key.clone(), exclude_value(value, child));
            }
        }
    }
    out
}

fn exclude_value(value: &Bson, node: &Node) -> Bson {
    match value {
        Bson::Document(d) => Bson::Document(exclude(d, node)),
        Bson::Array(items) => Bson::Array(items.iter().map(|item| exclude_value(item, node)).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn project(spec: Document, d: Document) -> Document {
        Projection::parse(&spec).unwrap().apply(&d)
    }

    #[test]
    fn inclusion() {
        let d = doc! {"_id": 1, "a": 1, "b": {"c": 2, "d": 3}, "e": [{"c": 1, "x": 2}, 5]};
        assert_eq!(project(doc! {"a": 1}, d.clone()), doc! {"_id": 1, "a": 1});
        assert_eq!(project(doc! {"b.c": 1, "_id": 0}, d.clone()), doc! {"b": {"c": 2}});
        assert_eq!(project(doc! {"e.c": 1}, d.clone()), doc! {"_id": 1, "e": [{"c": 1}]});
        assert_eq!(project(doc! {"_id": 1}, d), doc! {"_id": 1});
    }

    #[test]
    fn exclusion() {
        let d = doc! {"_id": 1, "a": 1, "b": {"c": 2, "d": 3}, "e": [{"c": 1, "x": 2}, 5]};
        assert_eq!(
            project(doc! {"a": 0}, d.clone()),
            doc! {"_id": 1, "b": {"c": 2, "d": 3}, "e": [{"c": 1, "x": 2}, 5]}
        );
        assert_eq!(
            project(doc! {"b.c": 0, "e.c": 0, "_id": 0}, d.clone()),
            doc! {"a": 1, "b": {"d": 3}, "e": [{"x": 2}, 5]}
        );
        assert_eq!(project(doc! {"_id": 0}, d), doc! {"a": 1, "b": {"c": 2, "d": 3}, "e": [{"c": 1, "x": 2}, 5]});
    }

    #[test]
    fn errors() {
        assert!(Projection::parse(&doc! {"a": 1, "b": 0}).is_err());
        assert!(Projection::parse(&doc! {"a": 1, "a.b": 1}).is_err());
        assert!(Projection::parse(&doc! {"a.b": 1, "a": 1}).is_err());
        assert!(matches!(Projection::parse(&doc! {"a": {"$slice": 1}}), Err(QueryError::Unsupported { .. })));
        assert!(Projection::parse(&doc! {"a.$": 1}).is_err());
        assert!(Projection::parse(&doc! {"a": "x"}).is_err());
        assert!(Projection::parse(&doc! {"a": 1, "b.c": 1, "b.d": 1}).is_ok());
    }

    #[test]
    fn deep_paths_and_documents_are_errors() {
        let key = vec!["a"; 10_000].join(".");
        for value in [bson::Bson::Int32(1), bson::Bson::Int32(0), bson::Bson::String("x".into())] {
            let err = Projection::parse(&doc! {key.clone(): value}).unwrap_err();
            assert!(matches!(err, QueryError::PathTooDeep { components: 10_000, .. }), "{err}");
        }
        let at_limit = Projection::parse(&doc! {vec!["a"; 100].join("."): 1}).unwrap();
        assert_eq!(at_limit.apply(&doc! {"_id": 1, "b": 2}), doc! {"_id": 1});

        let mut value = bson::Bson::Int32(1);
        for _ in 0..1_000 {
            value = bson::Bson::Array(vec![value]);
        }
        let err = Projection::parse(&doc! {"a": value}).unwrap_err();
        assert_eq!(err, QueryError::NestingTooDeep { part: "projection".into(), max: crate::MAX_NESTING_DEPTH });
    }

    #[test]
    fn memory_estimate_grows_with_paths() {
        assert_eq!(Projection::default().memory_estimate(), 0);
        let one = Projection::parse(&doc! {"a": 1}).unwrap().memory_estimate();
        let more = Projection::parse(&doc! {"a": 1, "b.c.d": 1}).unwrap().memory_estimate();
        assert!(one > 0 && more > one, "{one} {more}");
    }
}
