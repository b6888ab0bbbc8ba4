//! The conformance suite: MongoDB query semantics as data.
//!
//! Each file in `tests/conformance/` holds documents and cases. A case is a query (filter,
//! optional sort, skip, limit, projection) with what MongoDB answers: the `_id`s of the
//! result (`expect`, compared in order when `ordered` is true), the projected documents
//! (`expectDocs`), or an error whose message contains `error`. Every failing case is
//! reported, not only the first.

use std::path::Path;

use bson::{Bson, Document};
use livegrid_matcher::{Query, QuerySpec, query::parse_count, values_equal};
use livegrid_protocol::extjson;
use serde_json::Value;

fn doc(value: &Value) -> Document {
    extjson::document_from_json(value.clone()).expect("valid extended json document")
}

fn run_case(docs: &[Document], case: &Value) -> Result<(), String> {
    let optional_doc = |key: &str| case.get(key).map(doc);
    let count = |key: &str| -> Result<u64, String> {
        case.get(key).map_or(Ok(0), |v| {
            parse_count(&extjson::value_from_json(v.clone()).unwrap(), key).map_err(|e| e.to_string())
        })
    };
    let spec = QuerySpec {
        filter: doc(&case["filter"]),
        sort: optional_doc("sort"),
        skip: count("skip")?,
        limit: case.get("limit").map(|_| count("limit")).transpose()?,
        projection: optional_doc("projection"),
    };
    let compiled = Query::compile(&spec);
    if let Some(expected) = case.get("error").and_then(Value::as_str) {
        return match compiled {
            Err(e) if e.to_string().contains(expected) => Ok(()),
            Err(e) => Err(format!("expected error containing {expected:?}, got {:?}", e.to_string())),
            Ok(_) => Err(format!("expected error containing {expected:?}, the query compiled")),
        };
    }
    let query = compiled.map_err(|e| format!("unexpected error: {e}"))?;
    let result = query.evaluate(docs);
    if let Some(expected) = case.get("expectDocs") {
        let expected: Vec<Document> = expected.as_array().expect("expectDocs is an array").iter().map(doc).collect();
        return if result == expected { Ok(()) } else { Err(format!("expected {expected:?}, got {result:?}")) };
    }
    let expected: Vec<Bson> = case["expect"]
        .as_array()
        .expect("expect is an array")
        .iter()
        .map(|v| extjson::value_from_json(v.clone()).unwrap())
        .collect();
    let mut got: Vec<Bson> = result.iter().map(|d| d.get("_id").cloned().unwrap_or(Bson::Null)).collect();
    let mut want = expected.clone();
    if !case.get("ordered").and_then(Value::as_bool).unwrap_or(false) {
        got.sort_by(livegrid_matcher::compare_values);
        want.sort_by(livegrid_matcher::compare_values);
    }
    let same = got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| values_equal(a, b));
    if same { Ok(()) } else { Err(format!("expected ids {want:?}, got {got:?}")) }
}

#[test]
fn conformance_suite() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let (mut cases, mut failures) = (0, Vec::new());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let suite: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let docs: Vec<Document> = suite["docs"].as_array().unwrap().iter().map(doc).collect();
        for case in suite["cases"].as_array().unwrap() {
            cases += 1;
            if let Err(message) = run_case(&docs, case) {
                let name = file.file_name().unwrap().to_string_lossy();
                failures.push(format!("{name}: {}: {message}", case["name"].as_str().unwrap_or("?")));
            }
        }
    }
    assert!(files.len() >= 9, "conformance files are missing from {}", dir.display());
    assert!(failures.is_empty(), "{} of {cases} conformance cases failed:\n{}", failures.len(), failures.join("\n"));
    println!("{cases} conformance cases passed");
}
