//! Canonical query URLs: one form per query, so that equal queries share one cache key.
//!
//! The canonical URL of a query on `db.coll` is
//! `/v1/db/{db}/{coll}?filter=F&sort=S&skip=N&limit=N&projection=P`, where:
//! - `db` and `coll` are percent-encoded except for ASCII letters, digits and `-._~`;
//! - parameters come in that order and are left out at their defaults (an empty filter, no or
//!   an empty sort, skip 0, no limit, no or an empty projection);
//! - `F`, `S` and `P` are compact relaxed Extended JSON (no whitespace), encoded as
//!   `application/x-www-form-urlencoded` (what JavaScript's `URLSearchParams` writes: letters,
//!   digits and `*-._` stay, a space becomes `+`, every other byte `%XX` in upper case);
//! - in the filter, keys are sorted (by their UTF-8 bytes) where their order does not change
//!   the meaning: the keys of the filter and of every filter inside `$and`, `$or`, `$nor` and
//!   `$elemMatch`, and the keys of operator documents (`{"$gte": 1, "$lt": 5}`). Documents
//!   compared for equality (`{"a": {"x": 1, "y": 2}}`), arrays, the sort and the projection
//!   keep their order, which matters.
//!
//! Any spelling of a query is served; answers carry the canonical URL in `Content-Location`,
//! and livegrid tracks (and purges) every spelling it served under the canonical one.

use bson::{Bson, Document};
use livegrid_matcher::QuerySpec;
use livegrid_protocol::extjson;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Bytes percent-encoded in a path segment: all but the unreserved ones.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The filter with its keys in canonical order (see the module docs).
pub fn canonical_filter(filter: &Document) -> Document {
    let mut keys: Vec<&String> = filter.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|key| {
            let value = &filter[key.as_str()];
            let value = match (key.as_str(), value) {
                ("$and" | "$or" | "$nor", Bson::Array(items)) => Bson::Array(
                    items
                        .iter()
                        .map(|item| match item {
                            Bson::Document(d) => Bson::Document(canonical_filter(d)),
                            other => other.clone(),
                        })
                        .collect(),
                ),
                (field, Bson::Document(d)) if !field.starts_with('$') && is_operator_document(d) => {
                    Bson::Document(canonical_operators(d))
                }
                _ => value.clone(),
            };
            (key.clone(), value)
        })
        .collect()
}

/// Whether `doc` is an operator document: the matcher's rule, its first key is an operator
/// (a document mixing operators and fields is refused when the query compiles).
fn is_operator_document(doc: &Document) -> bool {
    doc.keys().next().is_some_and(|k| k.starts_with('$'))
}

/// An operator document with its keys sorted; `$elemMatch` and `$not` hold filters or
/// operator documents themselves.
fn canonical_operators(ops: &Document) -> Document {
    let mut keys: Vec<&String> = ops.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|key| {
            let value = match (key.as_str(), &ops[key.as_str()]) {
                ("$elemMatch" | "$not", Bson::Document(d)) if is_operator_document(d) => {
                    Bson::Document(canonical_operators(d))
                }
                ("$elemMatch", Bson::Document(d)) => Bson::Document(canonical_filter(d)),
                (_, other) => other.clone(),
            };
            (key.clone(), value)
        })
        .collect()
}

/// The canonical URL of `spec` on `db.coll`.
pub fn query_url(db: &str, coll: &str, spec: &QuerySpec) -> String {
    let mut url = collection_path(db, coll);
    let mut params = form_urlencoded::Serializer::new(String::new());
    let json = |doc: &Document| extjson::document_to_relaxed_json(doc).to_string();
    if !spec.filter.is_empty() {
        params.append_pair("filter", &json(&canonical_filter(&spec.filter)));
    }
    if let Some(sort) = spec.sort.as_ref().filter(|s| !s.is_empty()) {
        params.append_pair("sort", &json(sort));
    }
    if spec.skip > 0 {
        params.append_pair("skip", &spec.skip.to_string());
    }
    if let Some(limit) = spec.limit {
        params.append_pair("limit", &limit.to_string());
    }
    if let Some(projection) = spec.projection.as_ref().filter(|p| !p.is_empty()) {
        params.append_pair("projection", &json(projection));
    }
    let query = params.finish();
    if !query.is_empty() {
        url.push('?');
        url.push_str(&query);
    }
    url
}

/// `/v1/db/{db}/{coll}`, percent-encoded.
pub fn collection_path(db: &str, coll: &str) -> String {
    format!("/v1/db/{}/{}", utf8_percent_encode(db, SEGMENT), utf8_percent_encode(coll, SEGMENT))
}

/// The canonical URL of the document that path segment `segment` names in `db.coll`.
pub fn document_url(db: &str, coll: &str, segment: &str) -> String {
    format!("{}/{}", collection_path(db, coll), utf8_percent_encode(segment, SEGMENT))
}

/// The canonical key of `spec` itself (the query as it is tracked, whatever its spelling).
pub fn query_key(spec: &QuerySpec) -> QuerySpec {
    QuerySpec {
        filter: canonical_filter(&spec.filter),
        sort: spec.sort.clone().filter(|s| !s.is_empty()),
        skip: spec.skip,
        limit: spec.limit,
        projection: spec.projection.clone().filter(|p| !p.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use bson::doc;

    use super::*;

    fn spec(filter: Document) -> QuerySpec {
        QuerySpec { filter, sort: None, skip: 0, limit: None, projection: None }
    }

    #[test]
    fn key_order_is_canonical_where_it_does_not_change_meaning() {
        let a = doc! {"b": {"$lt": 5, "$gte": 1}, "a": {"x": 1, "y": 2}, "$or": [{"z": 1, "c": 2}]};
        let b = doc! {"$or": [{"c": 2, "z": 1}], "a": {"x": 1, "y": 2}, "b": {"$gte": 1, "$lt": 5}};
        assert_eq!(query_url("app", "t", &spec(a.clone())), query_url("app", "t", &spec(b)));
        // An embedded document compared for equality keeps its order.
        let c = doc! {"$or": [{"c": 2, "z": 1}], "a": {"y": 2, "x": 1}, "b": {"$gte": 1, "$lt": 5}};
        assert_ne!(query_url("app", "t", &spec(a)), query_url("app", "t", &spec(c)));
    }

    #[test]
    fn the_url_is_what_url_search_params_writes() {
        let mut s = spec(doc! {"done": false, "title": "a b"});
        s.sort = Some(doc! {"rank": -1});
        s.limit = Some(10);
        assert_eq!(
            query_url("app", "to do", &s),
            "/v1/db/app/to%20do?filter=%7B%22done%22%3Afalse%2C%22title%22%3A%22a+b%22%7D\
             &sort=%7B%22rank%22%3A-1%7D&limit=10"
        );
        assert_eq!(query_url("app", "todos", &spec(doc! {})), "/v1/db/app/todos");
    }
}
