//! The HTTP API (routes of `@pm2/js-api`), the auth role's OAuth-style routes, and the
//! router that puts every role on one port like the original nginx did.

pub mod actions;
pub mod buckets;
pub mod data;
pub mod error;
pub mod oauth;

use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::time::Duration;

use crate::stores::StoreError;

use crate::app::AppState;
use crate::interactor;
use error::ApiError;

/// Every route of `km serve`.
pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/api/node/verifyPM2", post(interactor::verify))
        .route("/interaction", get(interactor::interaction))
        .route(
            "/api/oauth/register",
            get(oauth::register).post(oauth::register),
        )
        .route("/api/oauth/token", post(oauth::token))
        .route("/api/oauth/revoke", post(oauth::revoke))
        .route("/api/users/isLogged", get(oauth::is_logged))
        .route("/api/bucket", get(buckets::list))
        .route("/api/bucket/", get(buckets::list))
        .route("/api/bucket/create_classic", post(buckets::create))
        .route("/api/bucket/{id}", get(buckets::retrieve))
        .route("/api/bucket/{id}/data/status", get(data::status))
        .route("/api/bucket/{id}/data/logs", post(data::logs))
        .route("/api/bucket/{id}/data/exceptions", post(data::exceptions))
        .route("/api/bucket/{id}/data/events", post(data::events))
        .route(
            "/api/bucket/{id}/data/processEvents",
            post(data::process_events),
        )
        .route(
            "/api/bucket/{id}/data/transactions",
            post(data::transactions),
        )
        .route("/api/bucket/{id}/data/profilings", post(data::profilings))
        .route(
            "/api/bucket/{id}/data/metrics/histogram",
            post(data::metrics_histogram),
        )
        .route(
            "/api/bucket/{id}/actions/triggerPM2",
            post(actions::trigger_pm2),
        )
        .route("/api/bucket/{id}/actions/trigger", post(actions::trigger))
        .route(
            "/api/bucket/{id}/actions/triggerScopedAction",
            post(actions::trigger_scoped),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(app)
}

/// `GET /healthz`: ready (200 while the process serves), with each store's state
/// (`status: degraded` when one is down) and the numbers an operator watches.
async fn health(
    axum::extract::State(app): axum::extract::State<AppState>,
) -> Json<serde_json::Value> {
    let writer = &app.ingest.writer.stats;
    let documents = tokio::time::timeout(Duration::from_secs(2), app.documents.ping())
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable {
                store: "documents",
                reason: "no answer within 2 s".into(),
            })
        });
    let events = writer.refusal();
    let bus = tokio::time::timeout(Duration::from_secs(2), app.bus.ping())
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable {
                store: "bus",
                reason: "no answer within 2 s".into(),
            })
        });
    let store = |kind: &str, error: Option<String>| json!({ "kind": kind, "up": error.is_none(), "error": error });
    let degraded = documents.is_err() || events.is_some() || bus.is_err();
    Json(json!({
        "status": if degraded { "degraded" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "stores": {
            "documents": store(app.documents.kind(), documents.err().map(|e| e.to_string())),
            "events": store(app.events.kind(), events),
            "bus": store(app.bus.kind(), bus.err().map(|e| e.to_string())),
        },
        "agents": { "servers": app.sessions.all().len(), "sockets": app.sessions.sockets_open() },
        "ingest": app.ingest.counters,
        "writer": {
            "events_written": writer.events_written,
            "metric_points_written": writer.metric_points_written,
            "batches_written": writer.batches_written,
            "dropped": writer.dropped,
            "write_retries": writer.write_retries,
            "write_errors": writer.write_errors,
        },
    }))
}

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
