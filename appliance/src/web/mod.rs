//! The dashboard: server-rendered pages (askama) on the same stores and API code, with
//! a little JavaScript (`assets/app.js`) for live updates, charts and the log tail.
//!
//! Pages work without JavaScript: forms post here with the session's CSRF token and
//! redirect back with a message. The scripts call the JSON API with the session cookie
//! and the CSRF token from the page, and watch buckets through `/primus`.

mod account;
mod accounts;
mod alerts;
mod assets;
mod buckets;
mod fleet;
mod issues;
mod logs;
pub mod process;
mod sparks;
mod team;
pub mod traces;

use askama::Template;
use axum::Router;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::auth::{self, UserAuth};
use crate::error::ApiError;
use km_core::app::AppState;

/// The dashboard's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(account::home))
        .route("/signup", get(account::signup_page).post(account::signup))
        .route("/login", get(account::login_page).post(account::login))
        .route("/logout", post(account::logout))
        .route("/account", get(account::account_page))
        .route("/account/password", post(account::change_password))
        .route("/account/wizard", post(account::open_wizard))
        .route("/admin/accounts", get(accounts::page))
        .route("/admin/accounts/{user}/{action}", post(accounts::action))
        .route("/reset", get(accounts::forgot_page).post(accounts::forgot))
        .route(
            "/reset/{user}/{secret}",
            get(accounts::reset_page).post(accounts::reset),
        )
        .route("/account/tokens", post(account::create_token))
        .route("/account/tokens/revoke", post(account::revoke_token))
        .route(
            "/invitations/{bucket}/{secret}",
            get(team::page).post(team::accept),
        )
        .route("/buckets", get(buckets::list).post(buckets::create))
        .route("/buckets/{id}", get(fleet::overview))
        .route("/buckets/{id}/settings", get(buckets::settings))
        .route("/buckets/{id}/logs", get(logs::page))
        .route("/buckets/{id}/issues", get(issues::inbox))
        .route(
            "/buckets/{id}/issues/{identifier}",
            get(issues::page).post(issues::set_state),
        )
        .route("/buckets/{id}/traces", get(traces::page))
        .route("/buckets/{id}/traces/{trace}", get(traces::trace_page))
        .route("/buckets/{id}/alerts", get(alerts::page))
        .route("/buckets/{id}/alerts/{action}", post(alerts::action))
        .route("/buckets/{id}/reports", get(alerts::report))
        .route(
            "/buckets/{id}/settings/{action}",
            post(buckets::settings_action),
        )
        .route("/buckets/{id}/servers/{server}", get(fleet::server_page))
        .route(
            "/buckets/{id}/servers/{server}/apps/{app}",
            get(process::page),
        )
        .route(
            "/buckets/{id}/servers/{server}/apps/{app}/actions",
            post(process::action),
        )
        .route("/assets/{*file}", get(assets::serve))
}

/// A signed-in dashboard user (session cookie); anyone else is sent to the sign-in page.
pub struct WebSession {
    pub auth: UserAuth,
    /// The session's CSRF token, put in every form and read by the scripts.
    pub csrf: String,
}

impl FromRequestParts<AppState> for WebSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Response> {
        let token = auth::session_cookie(&parts.headers).map(str::to_string);
        let to_login = || Redirect::to("/login").into_response();
        let token = token.ok_or_else(to_login)?;
        match UserAuth::from_token(app, &token, true).await {
            Ok(auth) => Ok(WebSession {
                auth,
                csrf: auth::csrf_token(&token),
            }),
            Err(e) if e.status == StatusCode::UNAUTHORIZED => Err(to_login()),
            Err(e) => Err(error_page(&e)),
        }
    }
}

impl WebSession {
    /// The refusal (403) of a form whose CSRF token is not the session's (another
    /// site's form); `None` when it is.
    pub fn refuse_forged(&self, given: &str) -> Option<Response> {
        if auth::same_secret(&self.csrf, given) {
            None
        } else {
            Some(error_page(&ApiError::forbidden(
                "this form is out of date or came from another site (CSRF token missing or wrong): reload the page",
            )))
        }
    }
}

/// The header every page shares.
pub struct Nav {
    pub username: String,
    pub csrf: String,
    pub admin: bool,
}

impl From<&WebSession> for Nav {
    fn from(session: &WebSession) -> Self {
        Nav {
            username: session.auth.user.username.clone(),
            csrf: session.csrf.clone(),
            admin: session.auth.user.role == "admin",
        }
    }
}

/// `?msg=` / `?error=`: what the last form did, shown once above the page.
#[derive(Deserialize, Default)]
pub struct Flash {
    pub msg: Option<String>,
    pub error: Option<String>,
}

pub type Flashes = Query<Flash>;

impl Flash {
    pub fn error(msg: String) -> Flash {
        Flash {
            error: Some(msg),
            msg: None,
        }
    }
}

/// Renders a page, or an error page if the template fails.
pub fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (
            [
                (
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                ),
                (CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            html,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "page cannot be rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, "page cannot be rendered").into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    nav: Option<Nav>,
    flash: Flash,
    status: u16,
    msg: &'a str,
}

pub fn error_page(e: &ApiError) -> Response {
    error_page_for(None, e)
}

/// The error page, with the navigation when someone is signed in.
fn error_page_for(session: Option<&WebSession>, e: &ApiError) -> Response {
    let mut response = render(&ErrorPage {
        nav: session.map(Nav::from),
        flash: Flash::default(),
        status: e.status.as_u16(),
        msg: &e.msg,
    });
    *response.status_mut() = e.status;
    response
}

/// A path nothing answers: the error page for a browser (with the navigation when signed
/// in), JSON for the API and scripts.
pub async fn not_found(State(app): State<AppState>, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let html = (parts.headers.get(ACCEPT).and_then(|v| v.to_str().ok()))
        .is_some_and(|accept| accept.contains("text/html"));
    if !html || parts.uri.path().starts_with("/api/") {
        return ApiError::not_found("no such route").into_response();
    }
    let session = WebSession::from_request_parts(&mut parts, &app).await.ok();
    error_page_for(session.as_ref(), &ApiError::not_found("no such page"))
}

/// Back to `path` with a message (`Ok`) or an error (`Err`) to show.
pub fn back(path: &str, outcome: Result<String, ApiError>) -> Response {
    let (key, text) = match outcome {
        Ok(msg) => ("msg", msg),
        Err(e) => ("error", e.msg),
    };
    let query = serde_urlencoded::to_string([(key, text)]).unwrap_or_default();
    let location = format!("{path}?{query}");
    (
        StatusCode::SEE_OTHER,
        [(
            LOCATION,
            HeaderValue::from_str(&location).unwrap_or(HeaderValue::from_static("/")),
        )],
    )
        .into_response()
}
