//! Extended JSON in both directions: parsing must succeed or fail cleanly; a parsed document
//! must convert to relaxed and canonical Extended JSON and read back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livegrid_protocol::extjson;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(doc) = extjson::parse_document(text) {
        let relaxed = extjson::document_to_relaxed_json(&doc);
        let _ = extjson::document_from_json(relaxed);
        let _ = extjson::to_canonical_string(&doc);
    }
});
