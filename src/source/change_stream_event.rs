//! MongoDB change events (as `watch()` emits them, in relaxed Extended JSON) to engine events.
//!
//! An event carries `operationType` (`insert`, `update`, `replace`, `delete`), `ns`
//! (`{"db": .., "coll": ..}` or the string `"db.coll"`), `documentKey._id`, and for inserts,
//! replaces and (with `fullDocument: "updateLookup"`) updates the `fullDocument`. An update
//! without `fullDocument` is applied to the previous version of the document through its
//! `updateDescription` (`updatedFields`, `removedFields`, `truncatedArrays`); one whose
//! `fullDocument` is `null` (looked up and gone) has left every result. Other operation
//! types (`drop`, `rename`, `invalidate`, ...) carry no document change and are skipped.
//!
//! Positions ([`Position`]): `clusterTime` (a BSON timestamp `{t, i}`) is the position's time;
//! events without it take their line number. The events of one transaction share their
//! cluster time, so an event whose time is not above the previous event's takes the next
//! order inside that time: positions grow, and a snapshot read at a cluster time compares
//! exactly with every event.

use std::sync::Arc;

use bson::{Bson, Document};
use livegrid_engine::{ChangeEvent, ChangeOp};
use livegrid_protocol::Position;
use serde_json::Value;

use crate::source::document_path;

/// Why a change event line was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ChangeEventError {
    /// The line is not JSON.
    #[error("invalid change event: {0}")]
    Json(#[from] serde_json::Error),
    /// The line is JSON but not an Extended JSON document.
    #[error("invalid change event: {0}")]
    ExtJson(#[from] livegrid_protocol::extjson::ExtJsonError),
    /// A required field is missing or has the wrong type.
    #[error("change event field {field}: {reason}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// An event's `fullDocument`.
enum Full {
    Document(Document),
    /// `null`: looked up, and gone.
    Gone,
    /// Not in the event.
    Absent,
}

/// A parsed change event, or an event without a document change.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// A write.
    Write(ChangeEvent),
    /// An event that changes no document (`drop`, `invalidate`, ...), by operation type.
    Skipped(String),
}

/// Parses one change event. `line` is its 1-based line (the position without
/// `clusterTime`), `previous` the position of the event before it, and `current` looks up a
/// document's current version (for updates without `fullDocument`).
pub fn parse(
    text: &str,
    line: u64,
    previous: Position,
    current: impl Fn(&str, &Bson) -> Option<Arc<Document>>,
) -> Result<Parsed, ChangeEventError> {
    let json: Value = serde_json::from_str(text)?;
    let event = livegrid_protocol::extjson::document_from_json(json)?;
    parse_document(&event, line, previous, current)
}

/// Parses one change event given as a BSON document (as the MongoDB driver yields it); see
/// [`parse`].
pub fn parse_document(
    event: &Document,
    line: u64,
    previous: Position,
    current: impl Fn(&str, &Bson) -> Option<Arc<Document>>,
) -> Result<Parsed, ChangeEventError> {
    let field = |field: &'static str, reason: &str| ChangeEventError::Field { field, reason: reason.to_string() };
    let operation = event.get_str("operationType").map_err(|_| field("operationType", "missing or not a string"))?;
    let op = match operation {
        "insert" => ChangeOp::Insert,
        "update" => ChangeOp::Update,
        "replace" => ChangeOp::Replace,
        "delete" => ChangeOp::Delete,
        other => return Ok(Parsed::Skipped(other.to_string())),
    };
    let ns = match event.get("ns") {
        Some(Bson::String(ns)) => ns.clone(),
        Some(Bson::Document(ns)) => {
            let db = ns.get_str("db").map_err(|_| field("ns.db", "missing or not a string"))?;
            let coll = ns.get_str("coll").map_err(|_| field("ns.coll", "missing or not a string"))?;
            format!("{db}.{coll}")
        }
        _ => return Err(field("ns", "missing; expected {\"db\", \"coll\"} or \"db.coll\"")),
    };
    let id = event
        .get_document("documentKey")
        .ok()
        .and_then(|k| k.get("_id"))
        .cloned()
        .ok_or_else(|| field("documentKey._id", "missing"))?;
    // With `fullDocument: "updateLookup"` MongoDB sends `null` for an update whose document
    // is gone by the time it is looked up: the document has left every result. Without the
    // option the field is absent, and the update is applied to the previous version.
    let full = match event.get("fullDocument") {
        Some(Bson::Document(d)) => Full::Document(d.clone()),
        Some(Bson::Null) => Full::Gone,
        None => Full::Absent,
        Some(_) => return Err(field("fullDocument", "not a document")),
    };
    let doc = match (op, full) {
        (ChangeOp::Delete, _) => None,
        (ChangeOp::Insert | ChangeOp::Replace, Full::Document(d)) => Some(d),
        (ChangeOp::Insert | ChangeOp::Replace, _) => {
            return Err(field("fullDocument", "required for inserts and replaces"));
        }
        (ChangeOp::Update, Full::Document(d)) => Some(d),
        (ChangeOp::Update, Full::Gone) => None,
        (ChangeOp::Update, Full::Absent) => {
            let description = event
                .get_document("updateDescription")
                .map_err(|_| field("updateDescription", "required for updates without fullDocument"))?;
            // An update of a document the stream never showed cannot be rebuilt.
            current(&ns, &id).map(|before| apply_update_description(&before, description)).transpose()?
        }
    };
    let time = match event.get("clusterTime") {
        Some(Bson::Timestamp(ts)) => Position::from_cluster_time(ts.time, ts.increment, 0),
        Some(_) => return Err(field("clusterTime", "not a timestamp")),
        None => Position::new(line),
    };
    // Events of one transaction share a cluster time: they take the next order inside it.
    let position = if time.time() <= previous.time() && !previous.is_zero() { previous.next_order() } else { time };
    Ok(Parsed::Write(ChangeEvent { position, ns, op, id, doc: doc.map(Arc::new) }))
}

/// Applies an `updateDescription` to the previous version of a document.
pub fn apply_update_description(before: &Document, description: &Document) -> Result<Document, ChangeEventError> {
    let invalid = |reason: String| ChangeEventError::Field { field: "updateDescription", reason };
    let mut doc = before.clone();
    if let Ok(updated) = description.get_document("updatedFields") {
        for (path, value) in updated {
            document_path::set(&mut doc, path, value.clone()).map_err(|e| invalid(e.to_string()))?;
        }
    }
    if let Ok(removed) = description.get_array("removedFields") {
        for path in removed {
            let Bson::String(path) = path else { return Err(invalid("removedFields holds a non-string".into())) };
            document_path::unset(&mut doc, path);
        }
    }
    if let Ok(truncated) = description.get_array("truncatedArrays") {
        for entry in truncated {
            let Bson::Document(entry) = entry else { continue };
            let size = match entry.get("newSize") {
                Some(Bson::Int32(n)) => i64::from(*n),
                Some(Bson::Int64(n)) => *n,
                _ => continue,
            };
            if let (Ok(field), true) = (entry.get_str("field"), size >= 0)
                && let Some(Bson::Array(items)) = document_path::get_mut(&mut doc, field)
            {
                items.truncate(size as usize);
            }
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn none(_: &str, _: &Bson) -> Option<Arc<Document>> {
        None
    }

    #[test]
    fn inserts_with_cluster_time_and_object_ns() {
        let line = r#"{"operationType":"insert","ns":{"db":"shop","coll":"items"},"documentKey":{"_id":1},"fullDocument":{"_id":1,"n":2},"clusterTime":{"$timestamp":{"t":10,"i":3}}}"#;
        let Parsed::Write(e) = parse(line, 1, Position::ZERO, none).unwrap() else { panic!() };
        assert_eq!(e.ns, "shop.items");
        assert_eq!(e.position, Position::from_cluster_time(10, 3, 0));
        assert_eq!(e.op, ChangeOp::Insert);
        assert_eq!(*e.doc.unwrap(), doc! {"_id": 1, "n": 2});
    }

    #[test]
    fn positions_grow_within_a_transaction() {
        let line = r#"{"operationType":"delete","ns":"a.b","documentKey":{"_id":1},"clusterTime":{"$timestamp":{"t":1,"i":1}}}"#;
        let first = Position::from_cluster_time(1, 1, 0);
        let Parsed::Write(e) = parse(line, 7, first, none).unwrap() else { panic!() };
        assert_eq!(e.position, Position::from_cluster_time(1, 1, 1));
        assert_eq!(e.position.cluster_time(), (1, 1));
        assert!(e.doc.is_none());
        let no_time = r#"{"operationType":"delete","ns":"a.b","documentKey":{"_id":1}}"#;
        let Parsed::Write(e) = parse(no_time, 7, Position::ZERO, none).unwrap() else { panic!() };
        assert_eq!(e.position, Position::new(7));
    }

    #[test]
    fn updates_apply_their_description() {
        let before = Arc::new(doc! {"_id": 1, "a": {"b": 1, "c": 2}, "arr": [1, 2, 3], "gone": true});
        let line = r#"{"operationType":"update","ns":"a.b","documentKey":{"_id":1},"updateDescription":{"updatedFields":{"a.b":5,"arr.1":9,"new":{"x":1}},"removedFields":["gone","a.c"],"truncatedArrays":[{"field":"arr","newSize":2}]}}"#;
        let Parsed::Write(e) = parse(line, 1, Position::ZERO, |_, _| Some(before.clone())).unwrap() else { panic!() };
        assert_eq!(*e.doc.unwrap(), doc! {"_id": 1, "a": {"b": 5}, "arr": [1, 9], "new": {"x": 1}});
        // Without a previous version the update cannot be rebuilt: the document is unknown.
        let Parsed::Write(e) = parse(line, 1, Position::ZERO, none).unwrap() else { panic!() };
        assert!(e.doc.is_none());
    }

    #[test]
    fn errors_and_skips() {
        assert!(
            matches!(parse(r#"{"operationType":"drop","ns":"a.b"}"#, 1, Position::ZERO, none), Ok(Parsed::Skipped(op)) if op == "drop")
        );
        assert!(matches!(parse("nope", 1, Position::ZERO, none), Err(ChangeEventError::Json(_))));
        assert!(matches!(
            parse(r#"{"operationType":"insert","ns":"a.b","documentKey":{"_id":1}}"#, 1, Position::ZERO, none),
            Err(ChangeEventError::Field { field: "fullDocument", .. })
        ));
        assert!(matches!(
            parse(r#"{"operationType":"insert","documentKey":{"_id":1},"fullDocument":{}}"#, 1, Position::ZERO, none),
            Err(ChangeEventError::Field { field: "ns", .. })
        ));
    }
}
