//! Pipelines against MongoDB's documented results: the `$group`, accumulator, `$unwind` and
//! expression pages of the MongoDB 8 manual (their sample collections, with decimals written
//! as doubles), and the corner cases those pages state (null and missing keys, type
//! promotion, ignored nulls, arrays not unwound).

use bson::{Bson, DateTime, Document, doc};

use super::{Pipeline, PipelineError};

fn date(text: &str) -> Bson {
    Bson::DateTime(DateTime::parse_rfc3339_str(text).unwrap())
}

fn run(docs: &[Document], stages: Vec<Document>) -> Vec<Document> {
    let stages: Vec<Bson> = stages.into_iter().map(Bson::Document).collect();
    Pipeline::parse(&stages).unwrap_or_else(|e| panic!("{e}")).evaluate(docs)
}

/// The `sales` collection of the `$group` page.
fn sales() -> Vec<Document> {
    vec![
        doc! {"_id": 1, "item": "abc", "price": 10.0, "quantity": 2, "date": date("2014-03-01T08:00:00Z")},
        doc! {"_id": 2, "item": "jkl", "price": 20.0, "quantity": 1, "date": date("2014-03-01T09:00:00Z")},
        doc! {"_id": 3, "item": "xyz", "price": 5.0, "quantity": 10, "date": date("2014-03-15T09:00:00Z")},
        doc! {"_id": 4, "item": "xyz", "price": 5.0, "quantity": 20, "date": date("2014-04-04T11:21:39.736Z")},
        doc! {"_id": 5, "item": "abc", "price": 10.0, "quantity": 10, "date": date("2014-04-04T21:23:13.331Z")},
        doc! {"_id": 6, "item": "def", "price": 7.5, "quantity": 5, "date": date("2015-06-04T05:08:13Z")},
        doc! {"_id": 7, "item": "def", "price": 7.5, "quantity": 10, "date": date("2015-09-10T08:43:00Z")},
        doc! {"_id": 8, "item": "abc", "price": 10.0, "quantity": 5, "date": date("2016-02-06T20:20:13Z")},
    ]
}

#[test]
fn count_the_documents() {
    // "Count the Number of Documents in a Collection": {_id: null, count: 8}.
    let out = run(&sales(), vec![doc! {"$group": {"_id": null, "count": {"$count": {}}}}]);
    assert_eq!(out, vec![doc! {"_id": null, "count": 8}]);
    let out = run(&sales(), vec![doc! {"$group": {"_id": null, "count": {"$sum": 1}}}]);
    assert_eq!(out, vec![doc! {"_id": null, "count": 8}]);
}

#[test]
fn group_by_item_having() {
    // "Group by Item Having": total sale amount per item, those >= 100.
    let out = run(
        &sales(),
        vec![
            doc! {"$group": {"_id": "$item", "totalSaleAmount": {"$sum": {"$multiply": ["$price", "$quantity"]}}}},
            doc! {"$match": {"totalSaleAmount": {"$gte": 100}}},
        ],
    );
    assert_eq!(
        out,
        vec![
            doc! {"_id": "abc", "totalSaleAmount": 170.0},
            doc! {"_id": "def", "totalSaleAmount": 112.5},
            doc! {"_id": "xyz", "totalSaleAmount": 150.0},
        ]
    );
}

#[test]
fn group_by_day_of_the_year() {
    // "Calculate Count, Sum, and Average": 2014 sales grouped by day, by total descending.
    let out = run(
        &sales(),
        vec![
            doc! {"$match": {"date": {"$gte": date("2014-01-01T00:00:00Z"), "$lt": date("2015-01-01T00:00:00Z")}}},
            doc! {"$group": {
                "_id": {"year": {"$year": "$date"}, "month": {"$month": "$date"}, "day": {"$dayOfMonth": "$date"}},
                "totalSaleAmount": {"$sum": {"$multiply": ["$price", "$quantity"]}},
                "averageQuantity": {"$avg": "$quantity"},
                "count": {"$sum": 1},
            }},
            doc! {"$sort": {"totalSaleAmount": -1}},
        ],
    );
    assert_eq!(
        out,
        vec![
            doc! {"_id": {"year": 2014, "month": 4, "day": 4}, "totalSaleAmount": 200.0, "averageQuantity": 15.0, "count": 2},
            doc! {"_id": {"year": 2014, "month": 3, "day": 15}, "totalSaleAmount": 50.0, "averageQuantity": 10.0, "count": 1},
            doc! {"_id": {"year": 2014, "month": 3, "day": 1}, "totalSaleAmount": 40.0, "averageQuantity": 1.5, "count": 2},
        ]
    );
}

#[test]
fn group_by_null_for_totals() {
    // "Group by null": one document for the whole collection.
    let out = run(
        &sales(),
        vec![doc! {"$group": {
            "_id": null,
            "totalSaleAmount": {"$sum": {"$multiply": ["$price", "$quantity"]}},
            "averageQuantity": {"$avg": "$quantity"},
            "count": {"$sum": 1},
        }}],
    );
    assert_eq!(out, vec![doc! {"_id": null, "totalSaleAmount": 452.5, "averageQuantity": 7.875, "count": 8}]);
}

#[test]
fn distinct_values_by_grouping() {
    // "Retrieve Distinct Values".
    let out = run(&sales(), vec![doc! {"$group": {"_id": "$item"}}]);
    let ids: Vec<&Bson> = out.iter().map(|d| d.get("_id").unwrap()).collect();
    assert_eq!(ids, vec![&Bson::from("abc"), &Bson::from("def"), &Bson::from("jkl"), &Bson::from("xyz")]);
}

#[test]
fn min_max_first_last_and_add_to_set() {
    // The `$min`, `$max`, `$first`, `$last` and `$addToSet` pages' sales examples.
    let docs = vec![
        doc! {"_id": 1, "item": "abc", "price": 10, "quantity": 2, "date": date("2014-01-01T08:00:00Z")},
        doc! {"_id": 2, "item": "jkl", "price": 20, "quantity": 1, "date": date("2014-02-03T09:00:00Z")},
        doc! {"_id": 3, "item": "xyz", "price": 5, "quantity": 5, "date": date("2014-02-03T09:05:00Z")},
        doc! {"_id": 4, "item": "abc", "price": 10, "quantity": 10, "date": date("2014-02-15T08:00:00Z")},
        doc! {"_id": 5, "item": "xyz", "price": 5, "quantity": 10, "date": date("2014-02-15T09:05:00Z")},
    ];
    let out = run(
        &docs,
        vec![doc! {"$group": {
            "_id": "$item",
            "minQuantity": {"$min": "$quantity"},
            "maxTotalAmount": {"$max": {"$multiply": ["$price", "$quantity"]}},
        }}],
    );
    assert_eq!(
        out,
        vec![
            doc! {"_id": "abc", "minQuantity": 2, "maxTotalAmount": 100},
            doc! {"_id": "jkl", "minQuantity": 1, "maxTotalAmount": 20},
            doc! {"_id": "xyz", "minQuantity": 5, "maxTotalAmount": 50},
        ]
    );
    // $first/$last after a $sort: the earliest and latest sale date per item.
    let out = run(
        &docs,
        vec![
            doc! {"$sort": {"item": 1, "date": 1}},
            doc! {"$group": {"_id": "$item", "firstSale": {"$first": "$date"}, "lastSale": {"$last": "$date"}}},
        ],
    );
    assert_eq!(
        out[0],
        doc! {"_id": "abc", "firstSale": date("2014-01-01T08:00:00Z"), "lastSale": date("2014-02-15T08:00:00Z")}
    );
    assert_eq!(
        out[2],
        doc! {"_id": "xyz", "firstSale": date("2014-02-03T09:05:00Z"), "lastSale": date("2014-02-15T09:05:00Z")}
    );
    // $addToSet: the distinct items sold per day (order unspecified in MongoDB; BSON order here).
    let out = run(
        &docs,
        vec![doc! {"$group": {
            "_id": {"day": {"$dayOfYear": "$date"}, "year": {"$year": "$date"}},
            "itemsSold": {"$addToSet": "$item"},
        }}],
    );
    assert_eq!(
        out,
        vec![
            doc! {"_id": {"day": 1, "year": 2014}, "itemsSold": ["abc"]},
            doc! {"_id": {"day": 34, "year": 2014}, "itemsSold": ["jkl", "xyz"]},
            doc! {"_id": {"day": 46, "year": 2014}, "itemsSold": ["abc", "xyz"]},
        ]
    );
}

#[test]
fn null_and_missing_keys_are_one_group_and_arrays_are_keys() {
    let docs = vec![
        doc! {"_id": 1, "k": null, "n": 1},
        doc! {"_id": 2, "n": 2},
        doc! {"_id": 3, "k": [1, 2], "n": 3},
        doc! {"_id": 4, "k": [1, 2], "n": 4},
        doc! {"_id": 5, "k": 1, "n": 5},
    ];
    let out = run(&docs, vec![doc! {"$group": {"_id": "$k", "n": {"$sum": "$n"}}}]);
    assert_eq!(out, vec![doc! {"_id": null, "n": 3}, doc! {"_id": 1, "n": 5}, doc! {"_id": [1, 2], "n": 7}]);
}

#[test]
fn sums_promote_types_and_ignore_what_is_not_a_number() {
    let docs = vec![
        doc! {"_id": 1, "v": i32::MAX},
        doc! {"_id": 2, "v": 1},
        doc! {"_id": 3, "v": "text"},
        doc! {"_id": 4},
        doc! {"_id": 5, "v": null},
    ];
    let out = run(&docs, vec![doc! {"$group": {"_id": null, "s": {"$sum": "$v"}, "a": {"$avg": "$v"}}}]);
    // int32 overflow becomes int64; the average counts only numbers.
    assert_eq!(out, vec![doc! {"_id": null, "s": i64::from(i32::MAX) + 1, "a": (f64::from(i32::MAX) + 1.0) / 2.0}]);
    let out = run(
        &[doc! {"_id": 1, "v": 1_i64}, doc! {"_id": 2, "v": 2}],
        vec![doc! {"$group": {"_id": null, "s": {"$sum": "$v"}}}],
    );
    assert_eq!(out, vec![doc! {"_id": null, "s": 3_i64}], "a long makes the sum a long");
    let out = run(
        &[doc! {"_id": 1, "v": 1.5}, doc! {"_id": 2, "v": 2}],
        vec![doc! {"$group": {"_id": null, "s": {"$sum": "$v"}}}],
    );
    assert_eq!(out, vec![doc! {"_id": null, "s": 3.5}]);
    let out = run(
        &[doc! {"_id": 1, "v": "x"}],
        vec![doc! {"$group": {"_id": null, "s": {"$sum": "$v"}, "a": {"$avg": "$v"}}}],
    );
    assert_eq!(out, vec![doc! {"_id": null, "s": 0, "a": null}], "no numbers: 0 and null");
}

#[test]
fn min_and_max_ignore_nulls_and_compare_in_bson_order() {
    let docs = vec![doc! {"_id": 1, "v": null}, doc! {"_id": 2, "v": "b"}, doc! {"_id": 3, "v": 5}, doc! {"_id": 4}];
    let out = run(&docs, vec![doc! {"$group": {"_id": null, "lo": {"$min": "$v"}, "hi": {"$max": "$v"}}}]);
    // Numbers sort before strings.
    assert_eq!(out, vec![doc! {"_id": null, "lo": 5, "hi": "b"}]);
    let out =
        run(&[doc! {"_id": 1}], vec![doc! {"$group": {"_id": null, "lo": {"$min": "$v"}, "first": {"$first": "$v"}}}]);
    assert_eq!(out, vec![doc! {"_id": null, "lo": null, "first": null}]);
}

#[test]
fn unwind_with_its_options() {
    // The `$unwind` page's inventory example.
    let docs = vec![
        doc! {"_id": 1, "item": "ABC", "sizes": ["S", "M", "L"]},
        doc! {"_id": 2, "item": "EFG", "sizes": []},
        doc! {"_id": 3, "item": "IJK", "sizes": "M"},
        doc! {"_id": 4, "item": "LMN"},
        doc! {"_id": 5, "item": "XYZ", "sizes": null},
    ];
    let out = run(&docs, vec![doc! {"$unwind": "$sizes"}, doc! {"$group": {"_id": "$sizes", "n": {"$sum": 1}}}]);
    assert_eq!(out, vec![doc! {"_id": "L", "n": 1}, doc! {"_id": "M", "n": 2}, doc! {"_id": "S", "n": 1}]);
    let out = run(
        &docs,
        vec![
            doc! {"$unwind": {"path": "$sizes", "preserveNullAndEmptyArrays": true, "includeArrayIndex": "i"}},
            doc! {"$group": {"_id": "$sizes", "n": {"$sum": 1}, "items": {"$addToSet": "$item"}, "at": {"$max": "$i"}}},
        ],
    );
    assert_eq!(
        out,
        vec![
            doc! {"_id": null, "n": 3, "items": ["EFG", "LMN", "XYZ"], "at": null},
            doc! {"_id": "L", "n": 1, "items": ["ABC"], "at": 2_i64},
            doc! {"_id": "M", "n": 2, "items": ["ABC", "IJK"], "at": 1_i64},
            doc! {"_id": "S", "n": 1, "items": ["ABC"], "at": 0_i64},
        ]
    );
}

#[test]
fn expressions_in_keys() {
    let docs = vec![
        doc! {"_id": 1, "name": "Ann", "score": 7, "bonus": null},
        doc! {"_id": 2, "name": "ann", "score": 3, "bonus": 2},
        doc! {"_id": 3, "name": "BOB", "score": 10},
    ];
    let out = run(
        &docs,
        vec![doc! {"$group": {
            "_id": {"$toLower": "$name"},
            "total": {"$sum": {"$add": ["$score", {"$ifNull": ["$bonus", 0]}]}},
            "high": {"$sum": {"$cond": [{"$gte": ["$score", 5]}, 1, 0]}},
            "half": {"$max": {"$divide": ["$score", 2]}},
        }}],
    );
    assert_eq!(
        out,
        vec![
            doc! {"_id": "ann", "total": 12, "high": 1, "half": 3.5},
            doc! {"_id": "bob", "total": 10, "high": 1, "half": 5.0},
        ]
    );
}

#[test]
fn stages_after_group_sort_skip_limit_and_project() {
    let out = run(
        &sales(),
        vec![
            doc! {"$group": {"_id": "$item", "q": {"$sum": "$quantity"}}},
            doc! {"$sort": {"q": -1}},
            doc! {"$skip": 1},
            doc! {"$limit": 2},
            doc! {"$project": {"q": 1, "_id": 0}},
        ],
    );
    assert_eq!(out, vec![doc! {"q": 17}, doc! {"q": 15}]);
}

#[test]
fn what_is_not_supported_is_refused_naming_it() {
    let refuse = |stages: Vec<Document>| {
        let stages: Vec<Bson> = stages.into_iter().map(Bson::Document).collect();
        Pipeline::parse(&stages).unwrap_err()
    };
    assert_eq!(
        refuse(vec![doc! {"$lookup": {"from": "x"}}, doc! {"$group": {"_id": null}}]),
        PipelineError::UnsupportedStage { stage: "$lookup".into() }
    );
    for stage in ["$facet", "$setWindowFields", "$bucket"] {
        let error = refuse(vec![doc! {stage: {}}]);
        assert!(error.to_string().contains(stage), "{error}");
    }
    let error = refuse(vec![doc! {"$group": {"_id": null, "all": {"$push": "$x"}}}]);
    assert!(error.to_string().contains("$push"), "{error}");
    let error = refuse(vec![doc! {"$group": {"_id": {"$regexMatch": {}}}}]);
    assert!(error.to_string().contains("$regexMatch"), "{error}");
    assert!(refuse(vec![doc! {"$match": {"a": 1}}]).to_string().contains("needs a $group"));
    assert!(refuse(vec![doc! {"$limit": 1}, doc! {"$group": {"_id": null}}]).to_string().contains("before $group"));
    assert!(refuse(vec![doc! {"$group": {"n": {"$sum": 1}}}]).to_string().contains("needs an _id"));
    assert!(refuse(vec![doc! {"$group": {"_id": "$$NOW"}}]).to_string().contains("$$NOW"));
    // A field name BSON cannot store: contributions could not be kept or sent compactly.
    let mut key = Document::new();
    key.insert("a\0b", "$x");
    let error = refuse(vec![doc! {"$group": {"_id": key}}]);
    assert!(error.to_string().contains("NUL"), "{error}");
}

#[test]
fn groups_kept_by_deltas_equal_groups_computed_from_scratch() {
    // Documents in, some out again, in another order: the same states as the survivors alone.
    let pipeline = Pipeline::parse(&[
        Bson::Document(doc! {"$unwind": {"path": "$tags", "preserveNullAndEmptyArrays": true}}),
        Bson::Document(doc! {"$group": {
            "_id": "$tags", "s": {"$sum": "$v"}, "a": {"$avg": "$v"}, "lo": {"$min": "$v"},
            "set": {"$addToSet": "$v"}, "first": {"$first": "$v"}, "last": {"$last": "$v"}, "n": {"$count": {}},
        }}),
    ])
    .unwrap();
    let docs: Vec<Document> = (0..40)
        .map(|i| doc! {"_id": i, "v": if i % 3 == 0 { Bson::Double(i as f64 / 4.0) } else { Bson::Int32(i) }, "tags": (0..(i % 4)).map(|t| t % 3).collect::<Vec<i32>>()})
        .collect();
    let mut groups = pipeline.groups();
    for doc in &docs {
        for c in pipeline.contributions(doc) {
            groups.change(&c, 1);
        }
    }
    for doc in docs.iter().rev().filter(|d| d.get_i32("_id").unwrap() % 2 == 1) {
        for c in pipeline.contributions(doc) {
            groups.change(&c, -1);
        }
    }
    let kept: Vec<Document> = docs.iter().filter(|d| d.get_i32("_id").unwrap() % 2 == 0).cloned().collect();
    let live: Vec<Document> = groups.groups.iter().map(|(k, g)| pipeline.output(&k.0, g)).collect();
    assert_eq!(live, pipeline.evaluate(&kept));
}
