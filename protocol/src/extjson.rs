//! Extended JSON (canonical and relaxed) to BSON and back.
//!
//! MongoDB's Extended JSON carries the BSON types plain JSON lacks (`{"$oid": ...}`,
//! `{"$numberLong": "7"}`, `{"$date": ...}`, `{"$regularExpression": ...}`, ...). Every JSON
//! document livegrid reads (queries, documents, change events) goes through here, and every
//! document it writes out leaves as relaxed Extended JSON.

use bson::{Bson, Document};
use serde_json::Value;

/// A JSON text or value that is not a valid Extended JSON document.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExtJsonError {
    /// The text is not JSON at all.
    #[error("invalid json: {0}")]
    Json(String),
    /// The JSON is valid but a `$`-type wrapper inside it is malformed.
    #[error("invalid extended json: {0}")]
    ExtJson(String),
    /// A document was expected but another JSON type was found.
    #[error("expected a json object, found {0}")]
    NotADocument(&'static str),
}

/// Parses JSON text (canonical or relaxed Extended JSON) into a BSON value.
pub fn parse_value(text: &str) -> Result<Bson, ExtJsonError> {
    let json: Value = serde_json::from_str(text).map_err(|e| ExtJsonError::Json(e.to_string()))?;
    value_from_json(json)
}

/// Parses JSON text (canonical or relaxed Extended JSON) that must hold an object.
pub fn parse_document(text: &str) -> Result<Document, ExtJsonError> {
    let json: Value = serde_json::from_str(text).map_err(|e| ExtJsonError::Json(e.to_string()))?;
    document_from_json(json)
}

/// Converts a JSON value (canonical or relaxed Extended JSON) into a BSON value.
pub fn value_from_json(json: Value) -> Result<Bson, ExtJsonError> {
    Bson::try_from(json).map_err(|e| ExtJsonError::ExtJson(e.to_string()))
}

/// Converts a JSON value that must be an object into a BSON document.
///
/// An object that is itself a `$`-type wrapper (`{"$oid": ...}`) is not a document and is
/// rejected.
pub fn document_from_json(json: Value) -> Result<Document, ExtJsonError> {
    if !json.is_object() {
        return Err(ExtJsonError::NotADocument(json_type_name(&json)));
    }
    match value_from_json(json)? {
        Bson::Document(doc) => Ok(doc),
        other => Err(ExtJsonError::NotADocument(bson_type_label(&other))),
    }
}

/// Converts a BSON value into relaxed Extended JSON.
pub fn to_relaxed_json(value: &Bson) -> Value {
    value.clone().into_relaxed_extjson()
}

/// Converts a document into relaxed Extended JSON.
pub fn document_to_relaxed_json(doc: &Document) -> Value {
    Bson::Document(doc.clone()).into_relaxed_extjson()
}

/// Serialises a document as one line of relaxed Extended JSON.
pub fn to_relaxed_string(doc: &Document) -> String {
    document_to_relaxed_json(doc).to_string()
}

/// Serialises a document as canonical Extended JSON: every type explicit, so two documents
/// give the same text exactly when their types and values are identical.
pub fn to_canonical_string(doc: &Document) -> String {
    Bson::Document(doc.clone()).into_canonical_extjson().to_string()
}

fn json_type_name(json: &Value) -> &'static str {
    match json {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn bson_type_label(value: &Bson) -> &'static str {
    match value {
        Bson::ObjectId(_) => "an objectId",
        Bson::DateTime(_) => "a date",
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => "a number",
        Bson::RegularExpression(_) => "a regex",
        Bson::Binary(_) => "binary data",
        Bson::Timestamp(_) => "a timestamp",
        _ => "a non-document extended json value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_and_relaxed_forms_parse_to_the_same_types() {
        let doc = parse_document(
            r#"{"a": {"$numberInt": "1"}, "b": 1, "c": {"$numberDouble": "1.5"}, "d": 1.5,
                "e": {"$numberLong": "9007199254740993"}, "f": {"$numberDecimal": "1.10"},
                "g": {"$date": "2024-01-01T00:00:00Z"}, "h": {"$date": {"$numberLong": "0"}},
                "i": {"$regularExpression": {"pattern": "^a", "options": "i"}}}"#,
        )
        .unwrap();
        assert_eq!(doc.get("a"), Some(&Bson::Int32(1)));
        assert_eq!(doc.get("b"), Some(&Bson::Int32(1)));
        assert_eq!(doc.get("c"), Some(&Bson::Double(1.5)));
        assert_eq!(doc.get("e"), Some(&Bson::Int64(9007199254740993)));
        assert!(matches!(doc.get("f"), Some(Bson::Decimal128(_))));
        assert!(matches!(doc.get("g"), Some(Bson::DateTime(_))));
        assert!(matches!(doc.get("h"), Some(Bson::DateTime(d)) if d.timestamp_millis() == 0));
        assert!(matches!(doc.get("i"), Some(Bson::RegularExpression(r)) if r.pattern.as_str() == "^a"));
    }

    #[test]
    fn operators_stay_documents() {
        let doc = parse_document(r#"{"a": {"$regex": "x", "$options": "i"}, "b": {"$type": "string"}}"#).unwrap();
        assert!(matches!(doc.get("a"), Some(Bson::Document(_))));
        assert!(matches!(doc.get("b"), Some(Bson::Document(_))));
    }

    #[test]
    fn errors_are_clear() {
        assert!(matches!(parse_document("[1]"), Err(ExtJsonError::NotADocument("an array"))));
        assert!(matches!(parse_document("{"), Err(ExtJsonError::Json(_))));
        assert!(matches!(parse_document(r#"{"$oid": "zz"}"#), Err(ExtJsonError::ExtJson(_))));
        assert!(matches!(
            parse_document(r#"{"$oid": "507f1f77bcf86cd799439011"}"#),
            Err(ExtJsonError::NotADocument("an objectId"))
        ));
    }

    #[test]
    fn relaxed_output_round_trips() {
        let text = r#"{"_id":{"$oid":"507f1f77bcf86cd799439011"},"n":7,"x":1.5,"s":"t"}"#;
        let doc = parse_document(text).unwrap();
        assert_eq!(to_relaxed_string(&doc), text);
    }
}
