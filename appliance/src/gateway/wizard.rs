//! `/wizard/` on km's ports, passed to the setup wizard's local address
//! (`KM_WIZARD_URL`): admins reach it through the site URL, and their dashboard session
//! (same origin) lets the wizard reopen for them. The wizard's site URL probe and the
//! ACME challenges of its trial order, which arrive on km's ports, are passed on too.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::app::AppState;

/// Largest request body passed on (the wizard's forms, PEM files included).
const MAX_BODY: usize = 1 << 20;

/// Headers that describe one connection, not the message.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::CONTENT_LENGTH,
];

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    })
}

/// `GET /.well-known/acme-challenge/{token}` on km's port 80: km's own answers, else the
/// wizard's (its trial order of an ACME setup is validated through this port too).
pub async fn acme_challenge(
    State(app): State<AppState>,
    Path(token): Path<String>,
    request: Request,
) -> Response {
    match app.gateway.challenges().response(&token) {
        Some(answer) => answer,
        None if app.settings.wizard_url.is_some() => pass(State(app), request).await,
        None => (StatusCode::NOT_FOUND, "no such ACME challenge\n").into_response(),
    }
}

pub async fn pass(State(app): State<AppState>, request: Request) -> Response {
    let Some(base) = app.settings.wizard_url.as_deref() else {
        return (StatusCode::NOT_FOUND, "no setup wizard on this appliance").into_response();
    };
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (parts, body) = request.into_parts();
    let target = format!(
        "{base}{}",
        parts
            .uri
            .path_and_query()
            .map_or("/wizard/", |p| p.as_str())
    );
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request too large for the wizard",
        )
            .into_response();
    };
    let mut outgoing = client().request(parts.method, &target).body(body);
    for (name, value) in parts
        .headers
        .iter()
        .filter(|(n, _)| !HOP_BY_HOP.contains(n))
    {
        outgoing = outgoing.header(name, value);
    }
    if let Some(ip) = peer {
        // The wizard limits wrong tokens per address: give it the real one.
        outgoing = outgoing.header("x-forwarded-for", ip.to_string());
    }
    match outgoing.send().await {
        Ok(answer) => {
            let status = answer.status();
            let headers = answer.headers().clone();
            let bytes = answer.bytes().await.unwrap_or_default();
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            for (name, value) in headers.iter().filter(|(n, _)| !HOP_BY_HOP.contains(n)) {
                response.headers_mut().append(name, value.clone());
            }
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "setup wizard unreachable at KM_WIZARD_URL");
            (StatusCode::BAD_GATEWAY, "the setup wizard is not running").into_response()
        }
    }
}
