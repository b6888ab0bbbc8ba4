//! Filters, sorts and projections from Extended JSON: compiling must succeed or fail cleanly,
//! and a compiled query must evaluate any document without panicking.
#![no_main]

use bson::doc;
use libfuzzer_sys::fuzz_target;
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::extjson;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Up to three documents separated by newlines: filter, sort, projection.
    let mut parts = text.splitn(3, '\n').map(extjson::parse_document);
    let Some(Ok(filter)) = parts.next() else { return };
    let sort = parts.next().and_then(Result::ok);
    let projection = parts.next().and_then(Result::ok);
    let spec = QuerySpec { filter: filter.clone(), sort, skip: 0, limit: Some(5), projection };
    if let Ok(query) = Query::compile(&spec) {
        let docs = [
            filter,
            doc! {"_id": 1, "a": [1, {"b": "x"}], "c": {"d": null}},
            doc! {"_id": "s", "a": 2.5, "tags": ["t1", "t2"]},
        ];
        let _ = query.evaluate(&docs);
    }
});
