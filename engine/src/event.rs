//! Change events: what the engine consumes, from any source.

use std::sync::Arc;

use bson::{Bson, Document};
use livegrid_protocol::{Cause, Position};

/// The kind of write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ChangeOp {
    /// A new document.
    Insert,
    /// Some fields of a document changed.
    Update,
    /// A document was replaced whole.
    Replace,
    /// A document was deleted.
    Delete,
}

impl ChangeOp {
    /// The cause this write gives its deltas.
    pub fn cause(self) -> Cause {
        match self {
            ChangeOp::Insert => Cause::Insert,
            ChangeOp::Update => Cause::Update,
            ChangeOp::Replace => Cause::Replace,
            ChangeOp::Delete => Cause::Delete,
        }
    }
}

/// One write, with the document's state after it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// Where the write stands in the stream; positions only grow.
    pub position: Position,
    /// The namespace, `db.collection`.
    pub ns: String,
    /// The kind of write.
    pub op: ChangeOp,
    /// The document's `_id`.
    pub id: Bson,
    /// The document after the write; `None` for a delete (or an update of a document that no
    /// longer exists).
    pub doc: Option<Arc<Document>>,
}
