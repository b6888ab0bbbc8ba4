//! A client's copy of a live result: applies `result` and `delta` messages in order, the way
//! a client does, and checks the protocol's promises while doing so (each `seq` one more
//! than the last, every index in range, every document where a delta says it is).
//!
//! ```
//! use livegrid_protocol::{LiveResult, ServerMessage};
//!
//! let mut live = LiveResult::default();
//! for line in [
//!     r#"{"type":"result","id":"s","seq":1,"docs":[{"_id":1,"n":5}],"position":7}"#,
//!     r#"{"type":"delta","id":"s","seq":2,"op":"add","docId":2,"doc":{"_id":2,"n":9},"index":0,"cause":"insert","position":8}"#,
//! ] {
//!     live.apply(&serde_json::from_str::<ServerMessage>(line).unwrap()).unwrap();
//! }
//! assert_eq!(live.docs().len(), 2);
//! assert_eq!(live.docs()[0].get_i32("_id").unwrap(), 2);
//! ```

use bson::{Bson, Document};

use crate::message::{DeltaMessage, DeltaOp, Position, ServerMessage};

/// A protocol promise a message broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A delta came before the result.
    #[error("delta before the initial result")]
    NoResult,
    /// A message's seq is not one more than the last.
    #[error("seq {got} after {last}")]
    Seq {
        /// The last seq applied.
        last: u64,
        /// The seq received.
        got: u64,
    },
    /// A delta names a position or document that is not there.
    #[error("{op:?} of {doc_id} does not fit the result: {reason}")]
    Mismatch {
        /// The operation.
        op: DeltaOp,
        /// The document id, as relaxed Extended JSON.
        doc_id: String,
        /// What does not fit.
        reason: String,
    },
    /// The message is not a result or delta.
    #[error("not a result or delta message")]
    NotLive,
}

/// The documents of one subscription, as a client holds them.
#[derive(Debug, Clone, Default)]
pub struct LiveResult {
    seq: u64,
    started: bool,
    position: Position,
    docs: Vec<Document>,
    /// The last delta said more of the same write time follow.
    partial: bool,
}

impl LiveResult {
    /// The documents, in result order (for sorted queries) or in the order they arrived.
    pub fn docs(&self) -> &[Document] {
        &self.docs
    }

    /// Whether the documents are a state the data was in: false between the deltas of one
    /// transaction (the last delta applied had `more`). A client shows results when this holds.
    pub fn is_whole(&self) -> bool {
        !self.partial
    }

    /// The seq of the last message applied.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The position of the initial result.
    pub fn snapshot_position(&self) -> Position {
        self.position
    }

    /// Applies one message.
    pub fn apply(&mut self, message: &ServerMessage) -> Result<(), ApplyError> {
        match message {
            ServerMessage::Result(result) => {
                // A fresh result replaces everything (a re-sync).
                self.started = true;
                self.seq = result.seq;
                self.position = result.position;
                self.docs = result.docs.clone();
                self.partial = false;
                Ok(())
            }
            ServerMessage::Delta(delta) => {
                if !self.started {
                    return Err(ApplyError::NoResult);
                }
                if delta.seq != self.seq + 1 {
                    return Err(ApplyError::Seq { last: self.seq, got: delta.seq });
                }
                self.apply_delta(delta)?;
                self.seq = delta.seq;
                self.partial = delta.more;
                Ok(())
            }
            _ => Err(ApplyError::NotLive),
        }
    }

    fn apply_delta(&mut self, delta: &DeltaMessage) -> Result<(), ApplyError> {
        let mismatch = |reason: String| ApplyError::Mismatch {
            op: delta.op,
            doc_id: crate::extjson::to_relaxed_json(&delta.doc_id).to_string(),
            reason,
        };
        let doc = || delta.doc.clone().ok_or_else(|| mismatch("no document".into()));
        let located = |at: usize, docs: &[Document]| -> Result<usize, ApplyError> {
            match docs.get(at) {
                Some(d) if same_id(d, &delta.doc_id) => Ok(at),
                Some(_) => Err(mismatch(format!("another document is at {at}"))),
                None => Err(mismatch(format!("index {at} is past the end ({})", docs.len()))),
            }
        };
        let find = |docs: &[Document]| docs.iter().position(|d| same_id(d, &delta.doc_id));
        match delta.op {
            DeltaOp::Add => {
                let doc = doc()?;
                if find(&self.docs).is_some() {
                    return Err(mismatch("already present".into()));
                }
                match delta.index {
                    Some(at) if at as usize <= self.docs.len() => self.docs.insert(at as usize, doc),
                    Some(at) => return Err(mismatch(format!("index {at} is past the end ({})", self.docs.len()))),
                    None => self.docs.push(doc),
                }
            }
            DeltaOp::Remove => {
                let at = match delta.old_index {
                    Some(at) => located(at as usize, &self.docs)?,
                    None => find(&self.docs).ok_or_else(|| mismatch("not present".into()))?,
                };
                self.docs.remove(at);
            }
            DeltaOp::Change => {
                let at = match delta.index.or(delta.old_index) {
                    Some(at) => located(at as usize, &self.docs)?,
                    None => find(&self.docs).ok_or_else(|| mismatch("not present".into()))?,
                };
                self.docs[at] = doc()?;
            }
            DeltaOp::ChangeIndex => {
                let from =
                    located(delta.old_index.ok_or_else(|| mismatch("no oldIndex".into()))? as usize, &self.docs)?;
                let to = delta.index.ok_or_else(|| mismatch("no index".into()))? as usize;
                let doc = doc()?;
                self.docs.remove(from);
                if to > self.docs.len() {
                    return Err(mismatch(format!("index {to} is past the end ({})", self.docs.len())));
                }
                self.docs.insert(to, doc);
            }
        }
        Ok(())
    }
}

fn same_id(doc: &Document, id: &Bson) -> bool {
    doc.get("_id") == Some(id)
}
