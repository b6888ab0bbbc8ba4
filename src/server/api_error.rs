//! REST errors: a JSON body `{"code", "message"}` with the matching HTTP status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

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
            StoreError::Update(_) => (StatusCode::BAD_REQUEST, "bad_update"),
            StoreError::Namespace(..) => (StatusCode::BAD_REQUEST, "bad_namespace"),
            StoreError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError { status, code, message: e.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        (self.status, Json(serde_json::json!({"code": self.code, "message": self.message}))).into_response()
    }
}
