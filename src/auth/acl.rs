//! Object-level ACLs: a document may carry `_acl: {"read": [...], "write": [...]}`, lists of
//! `"*"` (anyone), `"authenticated"`, `"user:ID"` and `"role:NAME"`. A document without `_acl`
//! is readable by whoever may read its namespace; one with `_acl` only by those its `read`
//! admits (an `_acl` without `read`: nobody).
//!
//! The check is folded into the query's filter before registration, as one more conjunct:
//! `{"$and": [filter, {"$or": [{"_acl": {"$exists": false}}, {"_acl.read": {"$in": [what the
//! principal is]}}]}]}`. So the grid evaluates it with the rest of the filter (its index still
//! prunes candidates by the original predicates), a sorted, limited window is computed over
//! the documents that principal may read, an update that revokes access is a `remove` and one
//! that grants it an `add`, and a delete is only ever reported to those who could read the
//! document.

use bson::{Bson, Document, doc};
use livegrid_matcher::Filter;

use super::Principal;

/// What `principal` is, as `_acl` lists name it.
pub fn identities(principal: &Principal) -> Vec<Bson> {
    let mut names = vec![Bson::String("*".into())];
    if let Some(user) = &principal.user {
        names.push(Bson::String("authenticated".into()));
        names.push(Bson::String(format!("user:{user}")));
        names.extend(principal.roles.iter().map(|role| Bson::String(format!("role:{role}"))));
    }
    names
}

/// The predicate a document must satisfy for `principal` to read it.
pub fn readable_by(principal: &Principal) -> Document {
    admitted_by("read", principal)
}

/// The predicate a document must satisfy for `principal` to change or delete it.
pub fn writable_by(principal: &Principal) -> Document {
    admitted_by("write", principal)
}

/// The predicate `_acl.<list>` admits `principal`, or there is no `_acl`.
fn admitted_by(list: &str, principal: &Principal) -> Document {
    doc! {"$or": [{"_acl": {"$exists": false}}, {format!("_acl.{list}"): {"$in": identities(principal)}}]}
}

/// `filter` restricted to what `principal` may read.
pub fn restrict(filter: &Document, principal: &Principal) -> Document {
    if filter.is_empty() {
        return readable_by(principal);
    }
    doc! {"$and": [filter.clone(), readable_by(principal)]}
}

/// Whether `principal` may read `doc` (the same predicate the grid evaluates, so the two can
/// never disagree, whatever shape `_acl` has).
pub fn may_read(doc: &Document, principal: &Principal) -> bool {
    admits(doc, "read", principal)
}

fn admits(doc: &Document, list: &str, principal: &Principal) -> bool {
    if !doc.contains_key("_acl") {
        return true;
    }
    Filter::parse(&admitted_by(list, principal)).is_ok_and(|filter| filter.matches(doc))
}

#[cfg(test)]
mod tests {
    use livegrid_matcher::{Query, QuerySpec};

    use super::*;

    #[test]
    fn the_folded_filter_agrees_with_the_direct_check() {
        let alice = Principal { user: Some("alice".into()), roles: vec!["editor".into()], expires: None, via: None };
        let bob = Principal { user: Some("bob".into()), roles: vec![], expires: None, via: None };
        let anon = Principal::anonymous();
        let docs = [
            doc! {"_id": 1, "n": 1},
            doc! {"_id": 2, "n": 1, "_acl": {"read": ["user:alice"]}},
            doc! {"_id": 3, "n": 1, "_acl": {"read": ["role:editor"], "write": ["user:bob"]}},
            doc! {"_id": 4, "n": 1, "_acl": {"read": ["authenticated"]}},
            doc! {"_id": 5, "n": 1, "_acl": {"read": ["*"]}},
            doc! {"_id": 6, "n": 1, "_acl": {"write": ["*"]}},
            doc! {"_id": 7, "n": 2, "_acl": {"read": ["user:bob"]}},
            doc! {"_id": 8, "n": 1, "_acl": "garbage"},
            doc! {"_id": 9, "n": 1, "_acl": [{"read": ["user:bob"]}]},
        ];
        let expected = [(&alice, vec![1, 2, 3, 4, 5]), (&bob, vec![1, 4, 5, 9]), (&anon, vec![1, 5])];
        for (principal, ids) in expected {
            let query =
                Query::compile(&QuerySpec { filter: restrict(&doc! {"n": 1}, principal), ..Default::default() })
                    .unwrap();
            let folded: Vec<i32> =
                docs.iter().filter(|d| query.filter.matches(d)).map(|d| d.get_i32("_id").unwrap()).collect();
            let direct: Vec<i32> = docs
                .iter()
                .filter(|d| d.get_i32("n").unwrap() == 1 && may_read(d, principal))
                .map(|d| d.get_i32("_id").unwrap())
                .collect();
            assert_eq!(folded, ids);
            assert_eq!(direct, ids);
        }
        let may_write =
            |doc: &Document, principal: &Principal| Filter::parse(&writable_by(principal)).unwrap().matches(doc);
        assert!(may_write(&docs[2], &bob) && !may_write(&docs[2], &alice) && may_write(&docs[0], &anon));
    }
}
