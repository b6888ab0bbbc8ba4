//! Records exchanged between timely workers, with serialisations that work across processes.
//!
//! Timely moves records between threads of one process as they are, and between processes
//! with bincode. BSON values cannot go through bincode directly (their serde form needs a
//! self-describing format), so documents and values travel as BSON bytes here, while in
//! memory they stay shared (`Arc`) so that fanning a write out to many workers clones no
//! document.

use std::sync::Arc;

use bson::{Bson, Document};
use livegrid_protocol::Position;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A shared document that crosses processes as BSON bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct WireDoc(pub Arc<Document>);

impl Serialize for WireDoc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = self.0.to_vec().map_err(serde::ser::Error::custom)?;
        s.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for WireDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes_vec(d)?;
        Document::from_reader(&bytes[..]).map(|doc| WireDoc(Arc::new(doc))).map_err(serde::de::Error::custom)
    }
}

/// A BSON value that crosses processes as the BSON bytes of `{"v": value}`.
#[derive(Debug, Clone, PartialEq)]
pub struct WireValue(pub Bson);

impl Serialize for WireValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut doc = Document::new();
        doc.insert("v", self.0.clone());
        let bytes = doc.to_vec().map_err(serde::ser::Error::custom)?;
        s.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for WireValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes_vec(d)?;
        let mut doc = Document::from_reader(&bytes[..]).map_err(serde::de::Error::custom)?;
        doc.remove("v").map(WireValue).ok_or_else(|| serde::de::Error::custom("missing wire value"))
    }
}

fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct BytesVisitor;
    impl<'de> serde::de::Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bson bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
    d.deserialize_bytes(BytesVisitor)
}

/// A change event as it crosses workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireEvent {
    /// The event's position.
    pub position: Position,
    /// Its namespace.
    pub ns: String,
    /// Its kind.
    pub op: crate::event::ChangeOp,
    /// The document id.
    pub id: WireValue,
    /// The after-image.
    pub doc: Option<WireDoc>,
    /// When the write entered the engine, in nanoseconds since the engine started (0 when
    /// unknown); carried along to measure write-to-delta latency.
    pub entered: u64,
}

impl WireEvent {
    /// The wire form of an event that entered the engine at `entered`.
    pub fn new(e: &crate::event::ChangeEvent, entered: u64) -> Self {
        WireEvent {
            position: e.position,
            ns: e.ns.clone(),
            op: e.op,
            id: WireValue(e.id.clone()),
            doc: e.doc.clone().map(WireDoc),
            entered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn round_trips_through_bincode() {
        let event = WireEvent {
            position: Position::with_order(7, 2),
            ns: "db.c".into(),
            op: crate::event::ChangeOp::Update,
            id: WireValue(Bson::ObjectId(bson::oid::ObjectId::new())),
            doc: Some(WireDoc(Arc::new(doc! {"a": [1, {"b": "x"}], "d": 1.5}))),
            entered: 12,
        };
        let bytes = bincode::serialize(&event).unwrap();
        let back: WireEvent = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, event);
    }
}
