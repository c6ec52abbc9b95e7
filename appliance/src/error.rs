//! Every API error becomes `{"error": code, "msg": text}` with its HTTP status, here.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use km_core::fleet::CommandError;
use km_stores::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub msg: String,
    /// Seconds to wait before trying again (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, msg: String) -> Self {
        ApiError {
            status,
            code,
            msg,
            retry_after: None,
        }
    }

    /// Too many attempts: try again after `wait`.
    pub fn too_many(msg: impl Into<String>, wait: std::time::Duration) -> Self {
        let seconds = wait.as_secs().max(1);
        ApiError {
            retry_after: Some(seconds),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!("{}: try again in {seconds} s", msg.into()),
            )
        }
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg.into())
    }

    pub fn unauthorized(msg: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", msg.into())
    }

    pub fn unavailable(msg: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg.into())
    }

    pub fn forbidden(msg: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", msg.into())
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", msg.into())
    }

    pub fn conflict(msg: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, "conflict", msg.into())
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::NotConnected(_) => ApiError::not_found(e.to_string()),
            CommandError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(field) => {
                ApiError::conflict(format!("this {field} is already taken"))
            }
            StoreError::Unavailable { .. } => {
                tracing::error!(error = %e, "store error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    e.to_string(),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({ "error": self.code, "msg": self.msg })),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
