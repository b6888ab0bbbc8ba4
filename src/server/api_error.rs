//! REST errors: a JSON body `{"code", "message"}` with the matching HTTP status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use axum::extract::rejection::{PathRejection, QueryRejection};

use crate::source::mongodb::MongoWriteError;
use crate::source::namespace::NamespaceError;
use crate::source::store::StoreError;
use crate::source::store::limits::LimitError;

/// An error answered to a REST request.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable code for programs.
    pub code: &'static str,
    /// A description for people.
    pub message: String,
}

impl ApiError {
    /// An error with this status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    /// A 400 with this code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, code, message: message.into() }
    }

    /// A 500.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, code: "internal", message: message.into() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let (status, code) = match &e {
            StoreError::NotFound(..) => (StatusCode::NOT_FOUND, "not_found"),
            StoreError::Duplicate(..) => (StatusCode::CONFLICT, "duplicate_key"),
            StoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_document"),
            StoreError::Limit(LimitError::TooLarge { .. } | LimitError::UpdatedTooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "document_too_large")
            }
            StoreError::Limit(LimitError::TooDeep) => (StatusCode::BAD_REQUEST, "document_too_deep"),
            StoreError::Limit(LimitError::Malformed(_)) => (StatusCode::BAD_REQUEST, "bad_document"),
            StoreError::Update(_) => (StatusCode::BAD_REQUEST, "bad_update"),
            StoreError::Namespace(_) => (StatusCode::BAD_REQUEST, "bad_namespace"),
            StoreError::Storage(_) | StoreError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            StoreError::Unavailable(_) | StoreError::InUse(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            StoreError::Busy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            StoreError::Refused(..) => (StatusCode::FORBIDDEN, "forbidden"),
        };
        ApiError { status, code, message: e.to_string() }
    }
}

impl From<MongoWriteError> for ApiError {
    fn from(e: MongoWriteError) -> Self {
        let (status, code) = match &e {
            MongoWriteError::NotFound(..) => (StatusCode::NOT_FOUND, "not_found"),
            MongoWriteError::Duplicate(..) => (StatusCode::CONFLICT, "duplicate_key"),
            MongoWriteError::Refused(..) => (StatusCode::FORBIDDEN, "forbidden"),
            MongoWriteError::Invalid(_) => (StatusCode::BAD_REQUEST, "refused_by_mongodb"),
            MongoWriteError::Driver(_) => (StatusCode::BAD_GATEWAY, "mongodb_unavailable"),
        };
        ApiError { status, code, message: e.to_string() }
    }
}

impl From<NamespaceError> for ApiError {
    fn from(e: NamespaceError) -> Self {
        ApiError::bad_request("bad_namespace", e.to_string())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request("bad_query", rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad_request("bad_path", rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // 501 is a request this server's setup does not serve, not a failure of the server.
        if self.status.is_server_error() && self.status != StatusCode::NOT_IMPLEMENTED {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        let body = Json(serde_json::json!({"code": self.code, "message": self.message}));
        // Errors are never cached: a 404 must not outlive the document's creation in a cache
        // (caches keep some errors by default; Varnish for two minutes).
        let no_store = (axum::http::header::CACHE_CONTROL, "no-store");
        if self.code == "busy" {
            // The write was not taken: the client may retry it after a moment.
            return (self.status, [no_store, (axum::http::header::RETRY_AFTER, "1")], body).into_response();
        }
        (self.status, [no_store], body).into_response()
    }
}
