//! Live-query messages: what clients send (`subscribe`, `unsubscribe`, `ping`,
//! `invalidations`) and what the server and engine send back (`result`, `delta`, `error`,
//! `pong`, `invalidate`). JSON text, one message
//! per WebSocket frame (or per line in `livegrid replay` output), documents as relaxed
//! Extended JSON.

use bson::{Bson, Document};
use serde::{Deserialize, Serialize};

/// A subscription's id, chosen by the client and unique within its connection.
pub type SubscriptionId = String;

pub use crate::position::Position;

/// Messages from a client to the server. Fields the protocol does not know are refused
/// (a typo such as `"filtr"` must not silently subscribe to a whole collection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ClientMessage {
    /// Start a live query.
    Subscribe(Box<SubscribeMessage>),
    /// End a live query.
    Unsubscribe {
        /// The subscription.
        id: SubscriptionId,
    },
    /// Ask for a `pong` (a struct variant, so that unknown fields are refused here too).
    Ping {},
    /// Authenticate the connection with a bearer token (a JWT); replaces an earlier one.
    Auth {
        /// The token.
        token: String,
    },
    /// Follow the cache invalidation feed: an `invalidate` message whenever cacheable URLs
    /// the server handed out go stale, until the connection closes.
    Invalidations {},
}

/// A live query request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscribeMessage {
    /// The subscription id, unique within the connection.
    pub id: SubscriptionId,
    /// The namespace, `db.collection`.
    pub ns: String,
    /// The filter (Extended JSON); empty matches everything.
    #[serde(default, with = "relaxed_doc")]
    pub filter: Document,
    /// The sort.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "relaxed_opt_doc")]
    pub sort: Option<Document>,
    /// Documents to skip.
    #[serde(default)]
    pub skip: u64,
    /// Documents to show at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// The projection.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "relaxed_opt_doc")]
    pub projection: Option<Document>,
    /// An aggregation pipeline (Extended JSON stages) instead of a query: the result is the
    /// pipeline's output, one document per group. Filter, sort, skip, limit and projection
    /// are then the pipeline's own stages and must not be given.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "relaxed_opt_values")]
    pub pipeline: Option<Vec<bson::Bson>>,
    /// Resume an earlier subscription after a dropped connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
    /// Subscribe on behalf of this user (only for connections authenticated with the
    /// `service` role): rules and object ACLs are those of the named user.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<OnBehalfOf>,
}

/// The user a service subscribes for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnBehalfOf {
    /// The user's id (`sub`).
    pub sub: String,
    /// The user's roles.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// Where a resumed subscription left off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    /// The token of the subscription's `result`.
    pub token: String,
    /// The last seq the client applied.
    pub seq: u64,
}

/// Messages from the server to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    /// A subscription's full result.
    Result(ResultMessage),
    /// One change to a subscription's result.
    Delta(DeltaMessage),
    /// A failed request; with `id` it concerns one subscription only.
    Error(ErrorMessage),
    /// The answer to a `ping`.
    Pong,
    /// Cacheable URLs whose copies went stale (the invalidation feed).
    Invalidate(InvalidateMessage),
}

/// URLs (request targets: path and query, as they were requested) whose cached copies are
/// stale from `position` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidateMessage {
    /// The stale URLs.
    pub urls: Vec<String>,
    /// The position of the change that made them stale.
    pub position: Position,
}

/// A subscription's result, in result order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultMessage {
    /// The subscription.
    pub id: SubscriptionId,
    /// 1 for the first message of a subscription, one more per message after.
    pub seq: u64,
    /// The visible documents, projected, in result order.
    #[serde(with = "relaxed_docs")]
    pub docs: Vec<Document>,
    /// The position the result reflects.
    pub position: Position,
    /// An opaque token for resuming the subscription after a dropped connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// What a delta does to the visible result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeltaOp {
    /// A document enters the result at `index`.
    Add,
    /// A document leaves the result (from `oldIndex` in a sorted query).
    Remove,
    /// A document in the result changed and kept its place.
    Change,
    /// A document in the result changed and moved from `oldIndex` to `index`.
    ChangeIndex,
}

/// The write that caused a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Cause {
    /// An insert.
    Insert,
    /// An update.
    Update,
    /// A replacement.
    Replace,
    /// A delete.
    Delete,
    /// No write of this document: it moved because others entered or left a sorted window.
    None,
}

/// One change to a subscription's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeltaMessage {
    /// The subscription.
    pub id: SubscriptionId,
    /// One more than the previous message of the subscription.
    pub seq: u64,
    /// What happens to the document.
    pub op: DeltaOp,
    /// The document's `_id`.
    #[serde(with = "relaxed_value")]
    pub doc_id: Bson,
    /// The document as the client sees it (projected); absent on `remove`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "relaxed_opt_doc")]
    pub doc: Option<Document>,
    /// The document's position in the visible window after the delta (sorted queries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// The document's position in the visible window before the delta (sorted queries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_index: Option<u64>,
    /// The write that caused it.
    pub cause: Cause,
    /// The position of that write.
    pub position: Position,
    /// More deltas of this subscription follow from writes at the same time (one
    /// transaction, or one bulk request): a client shows the result once it has applied the
    /// delta without `more`, so that it never shows half a transaction. Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// Error codes, stable for clients to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The query does not parse or uses an unsupported operator.
    BadQuery,
    /// The aggregation pipeline is malformed.
    BadPipeline,
    /// The aggregation pipeline uses a stage or operator livegrid cannot keep live.
    UnsupportedStage,
    /// The message is not a valid client message.
    BadMessage,
    /// The connection holds as many subscriptions as it may.
    TooManySubscriptions,
    /// The message exceeds the size limit.
    MessageTooLarge,
    /// The client may not do this.
    Unauthorized,
    /// The connection sent more messages per second than the server takes: this one was
    /// dropped; slow down.
    RateLimited,
    /// The subscription id is already in use on this connection.
    DuplicateSubscription,
    /// The snapshot a registration was read at is older than the engine's retention buffer;
    /// read again and retry.
    StaleSnapshot,
    /// The namespace breaks MongoDB's naming rules.
    BadNamespace,
    /// The server could not keep this subscription's result exact (a sorted window could not
    /// be refilled, or the source may have missed changes: MongoDB's history was lost, the
    /// collection was dropped or renamed): the subscription has ended; subscribe again.
    Resubscribe,
    /// The subscription would need more memory than one subscription may hold.
    QueryTooLarge,
    /// The server's memory budget for subscriptions is spent: retry later or elsewhere.
    OverCapacity,
    /// livegrid has failed and can no longer keep results exact (see `/healthz`): the
    /// subscription has ended; reconnect once the server is back.
    Unavailable,
    /// Something failed inside livegrid.
    Internal,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// The subscription concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<SubscriptionId>,
    /// What kind of failure.
    pub code: ErrorCode,
    /// A human-readable description.
    pub message: String,
}

impl ServerMessage {
    /// The message as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialise")
    }
}

mod relaxed_docs {
    use bson::Document;
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(docs: &[Document], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(docs.len()))?;
        for doc in docs {
            seq.serialize_element(&crate::extjson::document_to_relaxed_json(doc))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Document>, D::Error> {
        let values = Vec::<serde_json::Value>::deserialize(d)?;
        values.into_iter().map(|v| crate::extjson::document_from_json(v).map_err(serde::de::Error::custom)).collect()
    }
}

mod relaxed_doc {
    use bson::Document;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(doc: &Document, s: S) -> Result<S::Ok, S::Error> {
        crate::extjson::document_to_relaxed_json(doc).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Document, D::Error> {
        crate::extjson::document_from_json(serde_json::Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod relaxed_opt_doc {
    use bson::Document;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(doc: &Option<Document>, s: S) -> Result<S::Ok, S::Error> {
        doc.as_ref().map(crate::extjson::document_to_relaxed_json).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Document>, D::Error> {
        Option::<serde_json::Value>::deserialize(d)?
            .map(|v| crate::extjson::document_from_json(v).map_err(serde::de::Error::custom))
            .transpose()
    }
}

mod relaxed_opt_values {
    use bson::Bson;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(values: &Option<Vec<Bson>>, s: S) -> Result<S::Ok, S::Error> {
        values.as_ref().map(|v| v.iter().map(crate::extjson::to_relaxed_json).collect::<Vec<_>>()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Bson>>, D::Error> {
        Option::<Vec<serde_json::Value>>::deserialize(d)?
            .map(|values| {
                values
                    .into_iter()
                    .map(|v| crate::extjson::value_from_json(v).map_err(serde::de::Error::custom))
                    .collect()
            })
            .transpose()
    }
}

pub(crate) mod relaxed_value {
    use bson::Bson;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(value: &Bson, s: S) -> Result<S::Ok, S::Error> {
        crate::extjson::to_relaxed_json(value).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bson, D::Error> {
        crate::extjson::value_from_json(serde_json::Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    impl ClientMessage {
        fn to_json_for_test(&self) -> String {
            serde_json::to_string(self).unwrap()
        }
    }

    #[test]
    fn delta_json_shape() {
        let delta = ServerMessage::Delta(DeltaMessage {
            id: "s1".into(),
            seq: 2,
            op: DeltaOp::ChangeIndex,
            doc_id: Bson::Int32(7),
            doc: Some(doc! {"_id": 7, "s": "x"}),
            index: Some(0),
            old_index: Some(3),
            cause: Cause::Update,
            more: false,
            position: Position::new(42),
        });
        let json = delta.to_json();
        assert_eq!(
            json,
            r#"{"type":"delta","id":"s1","seq":2,"op":"changeIndex","docId":7,"doc":{"_id":7,"s":"x"},"index":0,"oldIndex":3,"cause":"update","position":42}"#
        );
        assert_eq!(serde_json::from_str::<ServerMessage>(&json).unwrap(), delta);
    }

    #[test]
    fn client_messages_parse() {
        let m: ClientMessage = serde_json::from_str(
            r#"{"type":"subscribe","id":"s1","ns":"db.c","filter":{"a":{"$gt":{"$numberLong":"5"}}},"sort":{"a":-1},"limit":10,"resume":{"token":"t","seq":4}}"#,
        )
        .unwrap();
        let ClientMessage::Subscribe(s) = m else { panic!() };
        assert_eq!(s.filter, doc! {"a": {"$gt": 5i64}});
        assert_eq!(s.limit, Some(10));
        assert_eq!(s.resume, Some(Resume { token: "t".into(), seq: 4 }));
        assert_eq!(serde_json::from_str::<ClientMessage>(r#"{"type":"ping"}"#).unwrap(), ClientMessage::Ping {});
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"subscribe","ns":"db.c"}"#).is_err());
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let typo = r#"{"type":"subscribe","id":"s","ns":"db.c","filtr":{"a":1}}"#;
        let err = serde_json::from_str::<ClientMessage>(typo).unwrap_err().to_string();
        assert!(err.contains("unknown field `filtr`"), "{err}");
        let err = serde_json::from_str::<ClientMessage>(r#"{"type":"unsubscribe","id":"s","x":1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `x`"), "{err}");
        let resume = r#"{"type":"subscribe","id":"s","ns":"db.c","resume":{"token":"t","seq":1,"sek":2}}"#;
        assert!(serde_json::from_str::<ClientMessage>(resume).is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"ping"}"#).is_ok());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"ping","x":1}"#).is_err());
        assert_eq!(ClientMessage::Ping {}.to_json_for_test(), r#"{"type":"ping"}"#);
    }

    #[test]
    fn remove_has_no_doc() {
        let json = ServerMessage::Delta(DeltaMessage {
            id: "s".into(),
            seq: 3,
            op: DeltaOp::Remove,
            doc_id: Bson::String("a".into()),
            doc: None,
            index: None,
            old_index: None,
            cause: Cause::Delete,
            more: false,
            position: Position::new(9),
        })
        .to_json();
        assert_eq!(
            json,
            r#"{"type":"delta","id":"s","seq":3,"op":"remove","docId":"a","cause":"delete","position":9}"#
        );
    }

    #[test]
    fn result_and_error_shapes() {
        let result = ServerMessage::Result(ResultMessage {
            id: "q".into(),
            seq: 1,
            docs: vec![doc! {"_id": 1}],
            position: Position::new(5),
            token: None,
        });
        assert_eq!(result.to_json(), r#"{"type":"result","id":"q","seq":1,"docs":[{"_id":1}],"position":5}"#);
        let error = ServerMessage::Error(ErrorMessage { id: None, code: ErrorCode::BadMessage, message: "x".into() });
        assert_eq!(error.to_json(), r#"{"type":"error","code":"bad_message","message":"x"}"#);
        assert_eq!(ServerMessage::Pong.to_json(), r#"{"type":"pong"}"#);
    }
}
