//! Matcher benchmarks: evaluating a typical 3-predicate filter against a 1 KB document, and
//! compiling a filter. Figures go into README.md (`scripts/bench.sh matcher`).

use std::hint::black_box;

use bson::{Document, doc, oid::ObjectId};
use criterion::{Criterion, criterion_group, criterion_main};
use livegrid_matcher::Filter;

/// A document of about 1 KB: strings, numbers, a date, an array and a nested document, with
/// the fields the filter reads spread among the others.
fn document() -> Document {
    let mut d = doc! {
        "_id": ObjectId::parse_str("65a1f0c2e4b0a1b2c3d4e5f6").unwrap(),
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "status": "active",
        "createdAt": bson::DateTime::from_millis(1_700_000_000_000),
        "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH", "country": "UK"},
        "tags": ["math", "poetry", "engines", "science"],
        "age": 36,
        "score": 9182.5,
        "bio": "Mathematician and writer, chiefly known for her work on Charles Babbage's proposed mechanical general-purpose computer, the Analytical Engine.",
        "category": "pioneer",
    };
    for i in 0..16 {
        d.insert(format!("attr{i}"), format!("value number {i} of this document"));
    }
    d
}

fn bench(c: &mut Criterion) {
    let doc = document();
    let size = doc.to_vec().unwrap().len();
    assert!((900..=1200).contains(&size), "benchmark document is {size} bytes, not about 1 KB");
    let source = doc! {"status": "active", "age": {"$gte": 18}, "tags": {"$in": ["science", "art"]}};
    let filter = Filter::parse(&source).unwrap();
    assert!(filter.matches(&doc));

    c.bench_function("evaluate 3-predicate filter on 1KB document (match)", |b| {
        b.iter(|| black_box(&filter).matches(black_box(&doc)))
    });
    let miss =
        Filter::parse(&doc! {"status": "active", "age": {"$gte": 18}, "tags": {"$in": ["art", "music"]}}).unwrap();
    c.bench_function("evaluate 3-predicate filter on 1KB document (no match)", |b| {
        b.iter(|| black_box(&miss).matches(black_box(&doc)))
    });
    c.bench_function("compile 3-predicate filter", |b| b.iter(|| Filter::parse(black_box(&source)).unwrap()));
    let complex = doc! {"$or": [{"status": "active", "age": {"$gt": 30, "$lt": 50}}, {"tags": {"$all": ["math", "poetry"]}}],
    "name": {"$regex": "^ada", "$options": "i"}, "address.city": {"$in": ["London", "Paris", "Berlin"]}};
    c.bench_function("compile filter with $or, $all, $regex", |b| {
        b.iter(|| Filter::parse(black_box(&complex)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
