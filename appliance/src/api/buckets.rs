//! Buckets: create, list, retrieve; and `BucketAccess`, the check every bucket route
//! makes (bearer token, then membership: another user's bucket is "not found").

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Body;
use super::error::{ApiError, ApiResult};
use crate::app::AppState;
use crate::auth::UserAuth;
use crate::ids::{is_object_id, new_object_id, now_ms, random_hex};
use crate::interactor::ws_url;
use crate::stores::{Bucket, MemberRole, StoreError};

/// A bucket the signed-in user is a member of, with their role.
pub struct BucketAccess {
    pub bucket: Bucket,
    pub role: MemberRole,
    pub auth: UserAuth,
}

impl FromRequestParts<AppState> for BucketAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let auth = UserAuth::from_request_parts(parts, app).await?;
        let not_found = || ApiError::not_found("no such bucket");
        let Path(params) = Path::<Vec<(String, String)>>::from_request_parts(parts, app)
            .await
            .map_err(|_| not_found())?;
        let id = params
            .iter()
            .find(|(k, _)| k == "id")
            .map(|(_, v)| v.as_str())
            .filter(|id| is_object_id(id))
            .ok_or_else(not_found)?;
        let role = app
            .documents
            .member_role(id, &auth.user.id)
            .await?
            .ok_or_else(not_found)?;
        let bucket = app
            .documents
            .bucket_by_id(id)
            .await?
            .ok_or_else(not_found)?;
        Ok(BucketAccess { bucket, role, auth })
    }
}

/// The bucket as clients see it, with where agents and browsers connect.
fn bucket_json(app: &AppState, bucket: &Bucket) -> Value {
    let mut v = json!(bucket);
    v["node"] = json!({
        "endpoints": {
            "web": app.public_url,
            "realtime": app.public_url,
            "ws": ws_url(&app.public_url),
        }
    });
    v
}

#[derive(Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    name: String,
}

/// `POST /api/bucket/create_classic`.
pub async fn create(
    State(app): State<AppState>,
    auth: UserAuth,
    Body(form): Body<CreateForm>,
) -> ApiResult<Json<Value>> {
    let name = form.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::bad_request("name: 1 to 100 characters"));
    }
    // Public ids are unique; a collision of 64 random bits is retried, not reported.
    for _ in 0..3 {
        let bucket = Bucket {
            id: new_object_id(),
            name: name.to_string(),
            public_id: random_hex(8),
            secret_id: random_hex(16),
            owner: auth.user.id.clone(),
            created_at: now_ms(),
        };
        match app.documents.insert_bucket(&bucket).await {
            Ok(()) => {
                tracing::info!(bucket = %bucket.id, user = %auth.user.username, "bucket created");
                return Ok(Json(json!({ "bucket": bucket_json(&app, &bucket) })));
            }
            Err(StoreError::Conflict("public_id")) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(
        "could not pick a unique public key; try again",
    ))
}

/// `GET /api/bucket/`: the buckets the user belongs to.
pub async fn list(State(app): State<AppState>, auth: UserAuth) -> ApiResult<Json<Vec<Value>>> {
    let buckets = app.documents.buckets_of_user(&auth.user.id).await?;
    Ok(Json(buckets.iter().map(|b| bucket_json(&app, b)).collect()))
}

/// `GET /api/bucket/:id`.
pub async fn retrieve(State(app): State<AppState>, access: BucketAccess) -> Json<Value> {
    Json(bucket_json(&app, &access.bucket))
}
