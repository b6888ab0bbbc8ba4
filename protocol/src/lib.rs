//! Wire types of livegrid: the messages clients and the engine exchange, their error codes,
//! and the Extended JSON helpers that turn JSON text into BSON documents and back.
//!
//! This crate does no I/O and knows nothing of tokio; every other livegrid crate may use it.
//!
//! ```
//! use livegrid_protocol::extjson;
//!
//! let doc = extjson::parse_document(r#"{"_id": {"$oid": "507f1f77bcf86cd799439011"}, "n": {"$numberLong": "7"}}"#).unwrap();
//! assert_eq!(doc.get_i64("n").unwrap(), 7);
//! assert_eq!(extjson::to_relaxed_string(&doc), r#"{"_id":{"$oid":"507f1f77bcf86cd799439011"},"n":7}"#);
//! ```
#![forbid(missing_docs)]

pub mod extjson;
pub mod frame;
pub mod live_result;
pub mod message;
pub mod position;

pub use frame::{DeltaFrame, Encoded, Frame, ResultFrame};
pub use live_result::{ApplyError, LiveResult};
pub use position::PositionError;

pub use message::{
    Cause, ClientMessage, DeltaMessage, DeltaOp, ErrorCode, ErrorMessage, InvalidateMessage, OnBehalfOf, Position,
    ResultMessage, Resume, ServerMessage, SubscribeMessage, SubscriptionId,
};
