//! Update operators (`$set`, `$inc`, `$push`, ...) applied to a document: validation and
//! application must succeed or fail cleanly, never panic.
#![no_main]

use bson::doc;
use libfuzzer_sys::fuzz_target;
use livegrid::source::store::update;
use livegrid_protocol::extjson;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (base, changes) = text.split_once('\n').unwrap_or(("", text));
    let Ok(changes) = extjson::parse_document(changes) else { return };
    let base = extjson::parse_document(base)
        .unwrap_or_else(|_| doc! {"_id": 1, "a": [1, 2, {"b": 3}], "n": 5, "s": "x", "o": {"p": {"q": 1}}});
    if update::validate(&changes).is_ok() {
        let _ = update::apply(&base, &changes);
    }
});
