//! Frames: result and delta messages whose documents are already encoded, so that a changed
//! document is serialized once per event and shared by every delta, subscription and
//! connection that carries it.
//!
//! An [`Encoded`] value is a document's (or an id's) relaxed Extended JSON text behind an
//! `Arc`: cloning it is a reference count. A [`Frame`] is a message without its subscription
//! id; [`Frame::write_json`] writes the exact JSON text that the matching [`ServerMessage`]
//! serializes to, with the client's id (and, on results, the resume token) spliced in: a
//! small header around shared bytes.

use std::io::Write as _;
use std::sync::Arc;

use bson::{Bson, Document};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::message::{Cause, DeltaOp, Position, ServerMessage};

/// Relaxed Extended JSON text of a value, encoded once and shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Encoded(Arc<str>);

impl Encoded {
    /// Encodes a document.
    pub fn document(doc: &Document) -> Encoded {
        let mut out = Vec::with_capacity(128);
        write_document(doc, &mut out);
        Encoded::from_json(out)
    }

    /// Encodes a value.
    pub fn value(value: &Bson) -> Encoded {
        let mut out = Vec::with_capacity(32);
        write_value(value, &mut out);
        Encoded::from_json(out)
    }

    fn from_json(bytes: Vec<u8>) -> Encoded {
        // Only JSON text is ever written, which is UTF-8.
        Encoded(Arc::from(String::from_utf8(bytes).expect("json text is utf-8")))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the text is empty (never, for a value).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Encoded {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Encoded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Encoded(Arc::from(String::deserialize(d)?)))
    }
}

/// Writes a document as relaxed Extended JSON, exactly as `bson`'s `into_relaxed_extjson`
/// followed by `serde_json` would, without building a JSON tree.
pub fn write_document(doc: &Document, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (key, value)) in doc.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(key, out);
        out.push(b':');
        write_value(value, out);
    }
    out.push(b'}');
}

/// Writes a value as relaxed Extended JSON (see [`write_document`]).
pub fn write_value(value: &Bson, out: &mut Vec<u8>) {
    match value {
        Bson::Null => out.extend_from_slice(b"null"),
        Bson::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Bson::Int32(i) => {
            let _ = write!(out, "{i}");
        }
        Bson::Int64(i) => {
            let _ = write!(out, "{i}");
        }
        Bson::Double(d) if d.is_finite() => {
            serde_json::to_writer(&mut *out, d).expect("writing to memory");
        }
        Bson::String(s) => write_str(s, out),
        Bson::Document(doc) => write_document(doc, out),
        Bson::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out);
            }
            out.push(b']');
        }
        Bson::ObjectId(oid) => {
            out.extend_from_slice(b"{\"$oid\":\"");
            out.extend_from_slice(oid.to_hex().as_bytes());
            out.extend_from_slice(b"\"}");
        }
        // The rarer types take the reference path.
        other => serde_json::to_writer(&mut *out, &other.clone().into_relaxed_extjson()).expect("writing to memory"),
    }
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, s).expect("writing to memory");
}

/// A subscription's initial result, its documents encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultFrame {
    /// Always 1.
    pub seq: u64,
    /// The visible documents, projected, in result order.
    pub docs: Vec<Encoded>,
    /// The position the result reflects.
    pub position: Position,
}

/// One change to a subscription's result, its document encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaFrame {
    /// One more than the previous message of the subscription.
    pub seq: u64,
    /// What happens to the document.
    pub op: DeltaOp,
    /// The document's `_id`.
    pub doc_id: Encoded,
    /// The document as the client sees it; absent on `remove`.
    pub doc: Option<Encoded>,
    /// Position in the window after the delta (sorted queries).
    pub index: Option<u64>,
    /// Position in the window before the delta (sorted queries).
    pub old_index: Option<u64>,
    /// The write that caused it.
    pub cause: Cause,
    /// That write's position.
    pub position: Position,
    /// More deltas of the subscription follow from writes at the same time (see
    /// [`crate::DeltaMessage::more`]).
    pub more: bool,
}

/// A result or delta without its subscription id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// A full result.
    Result(ResultFrame),
    /// A change.
    Delta(DeltaFrame),
}

fn op_name(op: DeltaOp) -> &'static str {
    match op {
        DeltaOp::Add => "add",
        DeltaOp::Remove => "remove",
        DeltaOp::Change => "change",
        DeltaOp::ChangeIndex => "changeIndex",
    }
}

fn cause_name(cause: Cause) -> &'static str {
    match cause {
        Cause::Insert => "insert",
        Cause::Update => "update",
        Cause::Replace => "replace",
        Cause::Delete => "delete",
        Cause::None => "none",
    }
}

impl Frame {
    /// The position the result reflects, or the delta's write's.
    pub fn position(&self) -> Position {
        match self {
            Frame::Result(r) => r.position,
            Frame::Delta(d) => d.position,
        }
    }

    /// The message's `seq`.
    pub fn seq(&self) -> u64 {
        match self {
            Frame::Result(r) => r.seq,
            Frame::Delta(d) => d.seq,
        }
    }

    /// Bytes of the shared documents it carries (what it holds beyond a header).
    pub fn shared_bytes(&self) -> usize {
        match self {
            Frame::Result(r) => r.docs.iter().map(Encoded::len).sum(),
            Frame::Delta(d) => d.doc.as_ref().map_or(0, Encoded::len),
        }
    }

    /// Writes the message as the client with subscription id `id` receives it: the same
    /// JSON text as the corresponding [`ServerMessage`]. `token` goes on results only.
    pub fn write_json(&self, id: &str, token: Option<&str>, out: &mut Vec<u8>) {
        match self {
            Frame::Result(r) => {
                out.extend_from_slice(b"{\"type\":\"result\",\"id\":");
                write_str(id, out);
                out.extend_from_slice(b",\"seq\":");
                write_u64(r.seq, out);
                out.extend_from_slice(b",\"docs\":[");
                for (i, doc) in r.docs.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(doc.as_str().as_bytes());
                }
                out.extend_from_slice(b"],\"position\":");
                write_position(r.position, out);
                if let Some(token) = token {
                    out.extend_from_slice(b",\"token\":");
                    write_str(token, out);
                }
                out.push(b'}');
            }
            Frame::Delta(d) => {
                out.extend_from_slice(b"{\"type\":\"delta\",\"id\":");
                write_str(id, out);
                out.extend_from_slice(b",\"seq\":");
                write_u64(d.seq, out);
                out.extend_from_slice(b",\"op\":\"");
                out.extend_from_slice(op_name(d.op).as_bytes());
                out.extend_from_slice(b"\",\"docId\":");
                out.extend_from_slice(d.doc_id.as_str().as_bytes());
                if let Some(doc) = &d.doc {
                    out.extend_from_slice(b",\"doc\":");
                    out.extend_from_slice(doc.as_str().as_bytes());
                }
                if let Some(index) = d.index {
                    out.extend_from_slice(b",\"index\":");
                    write_u64(index, out);
                }
                if let Some(old_index) = d.old_index {
                    out.extend_from_slice(b",\"oldIndex\":");
                    write_u64(old_index, out);
                }
                out.extend_from_slice(b",\"cause\":\"");
                out.extend_from_slice(cause_name(d.cause).as_bytes());
                out.extend_from_slice(b"\",\"position\":");
                write_position(d.position, out);
                if d.more {
                    out.extend_from_slice(b",\"more\":true");
                }
                out.push(b'}');
            }
        }
    }

    /// The JSON text for subscription `id` (see [`Frame::write_json`]).
    pub fn to_json(&self, id: &str, token: Option<&str>) -> String {
        let mut out = Vec::with_capacity(64 + self.shared_bytes());
        self.write_json(id, token, &mut out);
        String::from_utf8(out).expect("json text is utf-8")
    }

    /// The message as a client parses it (for clients and tests; servers send the text).
    pub fn to_message(&self, id: &str, token: Option<&str>) -> ServerMessage {
        serde_json::from_str(&self.to_json(id, token)).expect("frames are valid messages")
    }
}

fn write_u64(n: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn write_position(position: Position, out: &mut Vec<u8>) {
    if position.order() == 0 && position.time() < (1 << 53) {
        write_u64(position.time(), out);
    } else {
        let _ = write!(out, "{}", position.json());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extjson;
    use crate::message::{DeltaMessage, ResultMessage};
    use bson::{doc, oid::ObjectId};

    fn samples() -> Vec<Document> {
        vec![
            doc! {},
            doc! {"_id": 1, "s": "a \"quoted\" \\ line\nbreak \u{1F600}", "n": -5i64, "d": 1.0, "e": 2.5e-300, "neg": -0.0},
            doc! {"_id": ObjectId::parse_str("507f1f77bcf86cd799439011").unwrap(), "arr": [1, "x", null, true, [2.0f64], {"k": false}]},
            doc! {"big": i64::MAX, "small": i32::MIN, "nan": f64::NAN, "inf": f64::NEG_INFINITY, "huge": 1e300},
            doc! {"date": bson::DateTime::from_millis(1_700_000_000_000), "old": bson::DateTime::from_millis(-5),
            "re": extjson::parse_value(r#"{"$regularExpression": {"pattern": "^a", "options": "mi"}}"#).unwrap(),
            "ts": bson::Timestamp { time: 5, increment: 6 }, "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3] },
            "dec": bson::Decimal128::from_bytes([1; 16]), "key with \"quote\"": 1},
        ]
    }

    #[test]
    fn documents_encode_as_the_reference_does() {
        for doc in samples() {
            let reference = extjson::document_to_relaxed_json(&doc).to_string();
            assert_eq!(Encoded::document(&doc).as_str(), reference, "{doc:?}");
        }
    }

    #[test]
    fn frames_write_what_messages_serialize_to() {
        for doc in samples() {
            for (op, index, old_index, with_doc, more) in [
                (DeltaOp::Add, Some(0), None, true, false),
                (DeltaOp::Remove, None, Some(3), false, true),
                (DeltaOp::Change, None, None, true, true),
                (DeltaOp::ChangeIndex, Some(1), Some(2), true, false),
            ] {
                let id = Bson::String("i\"d".into());
                let frame = Frame::Delta(DeltaFrame {
                    seq: 7,
                    op,
                    doc_id: Encoded::value(&id),
                    doc: with_doc.then(|| Encoded::document(&doc)),
                    index,
                    old_index,
                    cause: Cause::Update,
                    position: Position::new(42),
                    more,
                });
                let message = ServerMessage::Delta(DeltaMessage {
                    id: "sub \"1\"".into(),
                    seq: 7,
                    op,
                    doc_id: id,
                    doc: with_doc.then(|| doc.clone()),
                    index,
                    old_index,
                    cause: Cause::Update,
                    position: Position::new(42),
                    more,
                });
                assert_eq!(frame.to_json("sub \"1\"", None), message.to_json());
            }
            let frame = Frame::Result(ResultFrame {
                seq: 1,
                docs: vec![Encoded::document(&doc); 2],
                position: Position::new(9),
            });
            let message = ServerMessage::Result(ResultMessage {
                id: "r".into(),
                seq: 1,
                docs: vec![doc.clone(), doc.clone()],
                position: Position::new(9),
                token: Some("t0k".into()),
            });
            assert_eq!(frame.to_json("r", Some("t0k")), message.to_json());
        }
    }
}
