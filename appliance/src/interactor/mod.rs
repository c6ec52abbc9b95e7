//! The interactor role: agents' `verifyPM2` and their `/interaction` websocket. Frames go
//! from the socket into the session (live status, metric samples) and the event writer;
//! commands come back through the bus.

pub mod intake;
mod socket;

use axum::Json;
use axum::extract::Request;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth;
use km_core::app::AppState;
use km_core::limits;
use km_stores::Bucket;

pub use socket::{Received, receive};

/// Longest machine name accepted.
const MAX_SERVER_NAME: usize = 255;

/// Why an agent is refused; `msg` is shown by `pm2 link`.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    msg: String,
}

impl Refusal {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Refusal {
            status,
            msg: msg.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({ "active": false, "error": true, "msg": self.msg });
        (self.status, Json(body)).into_response()
    }
}

/// The bucket whose keys these are; constant-time on the secret.
async fn authenticate(app: &AppState, public_id: &str, secret_id: &str) -> Result<Bucket, Refusal> {
    let bucket = app
        .documents
        .bucket_by_public_id(public_id)
        .await
        .map_err(|e| {
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("km cannot check keys now: {e}"),
            )
        })?
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::FORBIDDEN,
                format!("unknown public key {public_id:?}: copy the keys from the bucket settings"),
            )
        })?;
    if !auth::same_secret(&bucket.secret_id, secret_id) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "wrong secret key for public key {public_id:?}: copy the keys from the bucket settings"
            ),
        ));
    }
    if bucket.disabled {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "bucket {:?} is disabled by its administrators: its agents are refused until it is enabled again",
                bucket.name
            ),
        ));
    }
    Ok(bucket)
}

#[derive(Deserialize)]
struct VerifyRequest {
    public_id: String,
    private_id: String,
    #[serde(default)]
    data: VerifyData,
}

#[derive(Deserialize, Default)]
struct VerifyData {
    #[serde(rename = "MACHINE_NAME", default)]
    machine_name: Option<String>,
}

/// The agent's `endpoints`; field order is fixed (the agent compares them as a string).
#[derive(Serialize)]
struct Endpoints {
    ws: String,
    web: String,
}

pub fn ws_url(public_url: &str) -> String {
    let ws = public_url
        .strip_prefix("https://")
        .map(|rest| format!("wss://{rest}"))
        .or_else(|| {
            public_url
                .strip_prefix("http://")
                .map(|rest| format!("ws://{rest}"))
        })
        .unwrap_or_else(|| public_url.to_string());
    format!("{ws}/interaction")
}

/// `POST /api/node/verifyPM2`: the agent's check of its keys, answered with where to connect.
pub async fn verify(State(app): State<AppState>, body: Bytes) -> Response {
    let request: VerifyRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return Refusal::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "verifyPM2: the request is not the JSON km expects ({e}); a machine name with \
                     non-ASCII characters is cut by the agent: link with an ASCII name"
                ),
            )
            .into_response();
        }
    };
    let bucket = match authenticate(&app, &request.public_id, &request.private_id).await {
        Ok(bucket) => bucket,
        Err(refusal) => return refusal.into_response(),
    };
    if let Some(server) = &request.data.machine_name
        && let Err(reason) = limits::may_connect(&app, &bucket.id, server).await
    {
        // Not an error: the agent parks and asks again in 60 s.
        return Json(
            json!({ "active": false, "pending": false, "disabled": false, "msg": reason }),
        )
        .into_response();
    }
    let endpoints = Endpoints {
        ws: ws_url(&app.public_url),
        web: app.public_url.clone(),
    };
    Json(json!({ "active": true, "pending": false, "disabled": false, "endpoints": endpoints }))
        .into_response()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, Refusal> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Refusal::new(StatusCode::UNAUTHORIZED, format!("missing {name} header")))
}

/// The `101 Switching Protocols` answer to a websocket upgrade request (tungstenite checks
/// the request as RFC 6455 asks).
fn websocket_accept(request: &Request) -> Result<Response, Refusal> {
    tokio_tungstenite::tungstenite::handshake::server::create_response_with_body(
        request,
        axum::body::Body::empty,
    )
    .map(IntoResponse::into_response)
    .map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("/interaction is the agents' websocket ({e}): connect with `pm2 link`"),
        )
    })
}

/// `GET /interaction`: the agent's websocket, authenticated before the upgrade.
pub async fn interaction(State(app): State<AppState>, mut request: Request) -> Response {
    let accept = match websocket_accept(&request) {
        Ok(accept) => accept,
        Err(refusal) => return refusal.into_response(),
    };
    let headers = request.headers();
    let checked = async {
        let public_id = header(headers, "x-km-public")?;
        let secret_id = header(headers, "x-km-secret")?;
        let server_name = header(headers, "x-km-server")?;
        if server_name.len() > MAX_SERVER_NAME || server_name.chars().any(char::is_control) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "X-KM-SERVER is not a usable machine name",
            ));
        }
        let bucket = authenticate(&app, public_id, secret_id).await?;
        limits::may_connect(&app, &bucket.id, server_name)
            .await
            .map_err(|reason| Refusal::new(StatusCode::FORBIDDEN, reason))?;
        Ok((bucket.id, server_name.to_string()))
    }
    .await;
    let (bucket_id, server_name) = match checked {
        Ok(checked) => checked,
        Err(refusal) => return refusal.into_response(),
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => socket::accept(upgraded, app, bucket_id, server_name).await,
            Err(e) => tracing::debug!(error = %e, server = %server_name, "agent upgrade failed"),
        }
    });
    accept
}
