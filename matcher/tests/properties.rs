//! Property tests: laws of the query language that must hold for every document and filter.

use std::cmp::Ordering;

use bson::{Bson, Document, doc};
use livegrid_matcher::{Filter, SortSpec, compare_values, value_hash, values_equal};
use proptest::prelude::*;

/// Scalars from a small domain, so that generated filters and documents often meet.
fn scalar() -> impl Strategy<Value = Bson> {
    prop_oneof![
        (-3i32..4).prop_map(Bson::Int32),
        (-3i64..4).prop_map(Bson::Int64),
        prop_oneof![Just(-1.5f64), Just(0.0), Just(2.0), Just(2.5), Just(f64::NAN)].prop_map(Bson::Double),
        prop_oneof![Just("x"), Just("y"), Just("")].prop_map(|s| Bson::String(s.into())),
        Just(Bson::Null),
        any::<bool>().prop_map(Bson::Boolean),
    ]
}

fn value() -> impl Strategy<Value = Bson> {
    prop_oneof![
        4 => scalar(),
        1 => prop::collection::vec(scalar(), 0..4).prop_map(Bson::Array),
        1 => scalar().prop_map(|v| Bson::Document(doc! {"c": v})),
        1 => prop::collection::vec(scalar().prop_map(|v| Bson::Document(doc! {"c": v})), 0..3).prop_map(Bson::Array),
    ]
}

fn document() -> impl Strategy<Value = Document> {
    (any::<u16>(), prop::option::of(value()), prop::option::of(value())).prop_map(|(id, a, b)| {
        let mut d = doc! {"_id": i32::from(id)};
        if let Some(a) = a {
            d.insert("a", a);
        }
        if let Some(b) = b {
            d.insert("b", b);
        }
        d
    })
}

fn field() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("a"), Just("b"), Just("a.c"), Just("b.c")]
}

/// A single-field predicate as a filter document.
fn leaf() -> impl Strategy<Value = Document> {
    let op = prop_oneof![Just("$eq"), Just("$gt"), Just("$gte"), Just("$lt"), Just("$lte"), Just("$ne")];
    prop_oneof![
        (field(), scalar()).prop_map(|(f, v)| doc! {f: v}),
        (field(), op, scalar()).prop_map(|(f, op, v)| doc! {f: {op: v}}),
        (field(), prop::collection::vec(scalar(), 0..4)).prop_map(|(f, vs)| doc! {f: {"$in": vs}}),
        (field(), any::<bool>()).prop_map(|(f, e)| doc! {f: {"$exists": e}}),
        (field(), 0i32..3).prop_map(|(f, n)| doc! {f: {"$size": n}}),
        (field(), scalar()).prop_map(|(f, v)| doc! {f: {"$elemMatch": {"$gte": v}}}),
    ]
}

fn filter() -> impl Strategy<Value = Document> {
    leaf().prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..3).prop_map(|fs| doc! {"$or": fs}),
            prop::collection::vec(inner.clone(), 1..3).prop_map(|fs| doc! {"$and": fs}),
            prop::collection::vec(inner, 1..3).prop_map(|fs| doc! {"$nor": fs}),
        ]
    })
}

fn matches(filter: Document, d: &Document) -> bool {
    Filter::parse(&filter).unwrap().matches(d)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn nor_is_not_or(fs in prop::collection::vec(filter(), 1..3), d in document()) {
        prop_assert_eq!(matches(doc! {"$nor": fs.clone()}, &d), !matches(doc! {"$or": fs}, &d));
    }

    #[test]
    fn and_is_all(fs in prop::collection::vec(filter(), 1..3), d in document()) {
        let each = fs.iter().all(|f| matches(f.clone(), &d));
        prop_assert_eq!(matches(doc! {"$and": fs}, &d), each);
    }

    #[test]
    fn nin_is_not_in(f in field(), vs in prop::collection::vec(scalar(), 0..4), d in document()) {
        prop_assert_eq!(matches(doc! {f: {"$nin": vs.clone()}}, &d), !matches(doc! {f: {"$in": vs}}, &d));
    }

    #[test]
    fn ne_is_not_eq(f in field(), v in value(), d in document()) {
        prop_assert_eq!(matches(doc! {f: {"$ne": v.clone()}}, &d), !matches(doc! {f: {"$eq": v}}, &d));
    }

    #[test]
    fn not_negates(f in field(), v in scalar(), d in document()) {
        prop_assert_eq!(matches(doc! {f: {"$not": {"$gt": v.clone()}}}, &d), !matches(doc! {f: {"$gt": v}}, &d));
    }

    #[test]
    fn in_is_or_of_eq(f in field(), vs in prop::collection::vec(scalar(), 1..4), d in document()) {
        let any = vs.iter().any(|v| matches(doc! {f: {"$eq": v.clone()}}, &d));
        prop_assert_eq!(matches(doc! {f: {"$in": vs}}, &d), any);
    }

    #[test]
    fn index_plans_admit_every_match(f in filter(), d in document()) {
        let compiled = Filter::parse(&f).unwrap();
        if compiled.matches(&d) {
            prop_assert!(compiled.index_plan().admits(&d), "plan {:?} rejects a match", compiled.index_plan());
        }
    }

    #[test]
    fn value_order_is_total(a in value(), b in value(), c in value()) {
        prop_assert_eq!(compare_values(&a, &b), compare_values(&b, &a).reverse());
        if compare_values(&a, &b) != Ordering::Greater && compare_values(&b, &c) != Ordering::Greater {
            prop_assert_ne!(compare_values(&a, &c), Ordering::Greater);
        }
        if values_equal(&a, &b) {
            prop_assert_eq!(value_hash(&a), value_hash(&b));
        }
    }

    #[test]
    fn sort_is_a_total_order(x in document(), y in document(), z in document(), desc in any::<bool>(), f in field()) {
        let spec = SortSpec::parse(&doc! {f: if desc { -1 } else { 1 }}).unwrap();
        let (kx, ky, kz) = (spec.key(&x), spec.key(&y), spec.key(&z));
        prop_assert_eq!(kx.cmp(&ky), ky.cmp(&kx).reverse());
        if kx <= ky && ky <= kz {
            prop_assert!(kx <= kz);
        }
        // Ties are broken by _id: only documents with equal ids compare equal.
        if kx.cmp(&ky) == Ordering::Equal {
            prop_assert!(values_equal(x.get("_id").unwrap(), y.get("_id").unwrap()));
        }
    }
}
