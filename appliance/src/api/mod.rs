//! The HTTP API (routes of `@pm2/js-api`) and the auth role's OAuth-style routes; the
//! router that puts them on ports is `routes`.

pub mod actions;
pub mod alerts;
pub mod buckets;
pub mod data;
pub mod insights;
pub mod oauth;
pub mod team;
pub mod traces;

use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A request body given as JSON or as a form (clients send both); an empty body is `{}`.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_form = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        let parsed = if is_form {
            serde_urlencoded::from_bytes(&bytes).map_err(|e| e.to_string())
        } else if bytes.iter().all(u8::is_ascii_whitespace) {
            serde_json::from_str("{}").map_err(|e| e.to_string())
        } else {
            serde_json::from_slice(&bytes).map_err(|e| e.to_string())
        };
        parsed
            .map(Body)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}
