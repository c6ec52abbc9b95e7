//! Sign-up, sign-in, sign-out and password change.

use askama::Template;
use axum::Form;
use axum::extract::{Query, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::Value;

use super::{Flash, Flashes, Nav, WebSession, back, error_page, render};
use crate::api::oauth::{self, RegisterForm};
use crate::auth::{self, SESSION_COOKIE, SESSION_TTL_MS, UserAuth};
use crate::error::ApiError;
use km_core::app::AppState;
use km_stores::TokenRecord;

/// `/`: the buckets when signed in, else sign-in (or sign-up before the first account).
pub async fn home(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = auth::session_cookie(&headers)
        && UserAuth::from_token(&app, token, true).await.is_ok()
    {
        return Redirect::to("/buckets").into_response();
    }
    match app.documents.count_users().await {
        Ok(0) => Redirect::to("/signup").into_response(),
        Ok(_) => Redirect::to("/login").into_response(),
        Err(e) => error_page(&e.into()),
    }
}

/// The cookie of a visitor's form token (sign-in and sign-up before a session exists).
const FORM_COOKIE: &str = "km_form";

/// A visitor's form token: a random value in a `SameSite=Strict` cookie that the form
/// echoes, so that another site cannot post the sign-in or sign-up form (login CSRF). The
/// cookie is kept if the browser has one (several tabs), else made with its `Set-Cookie`.
fn form_token(app: &AppState, headers: &HeaderMap) -> (String, Option<String>) {
    if let Some(token) = auth::cookie(headers, FORM_COOKIE).filter(|t| t.len() == 32) {
        return (token.to_string(), None);
    }
    let token = km_stores::ids::random_hex(16);
    let cookie = cookie(app, FORM_COOKIE, &token, "Strict", 86_400);
    (token, Some(cookie))
}

/// A page whose form a visitor may post: rendered with the visitor's form token (made by
/// `page`), and the token's cookie when it was just made.
pub(super) fn visitor_page<T: Template>(
    app: &AppState,
    headers: &HeaderMap,
    page: impl FnOnce(String) -> T,
) -> Response {
    let (form_token, cookie) = form_token(app, headers);
    with_cookie(render(&page(form_token)), cookie)
}

/// A visitor's form posted with its token, or the page that refuses it.
pub(super) fn refuse_forged_visitor(headers: &HeaderMap, given: &str) -> Option<Response> {
    let matches = auth::cookie(headers, FORM_COOKIE).is_some_and(|t| auth::same_secret(t, given));
    (!matches).then(|| {
        error_page(&ApiError::forbidden(
            "this form expired or came from another site: reload the page and send it again",
        ))
    })
}

/// `response` with the form token's cookie, when it was just made.
fn with_cookie(mut response: Response, cookie: Option<String>) -> Response {
    if let Some(cookie) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().append(SET_COOKIE, cookie);
    }
    response
}

/// The signed-in user, if any, of a form that also serves visitors, or its refusal when
/// its CSRF token is neither the session's nor the visitor's.
pub(super) async fn signed_form(
    app: &AppState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<Option<WebSession>, Box<Response>> {
    let session = visitor(app, headers).await;
    let refused = match &session {
        Some(session) => session.refuse_forged(csrf),
        None => refuse_forged_visitor(headers, csrf),
    };
    match refused {
        Some(refused) => Err(Box::new(refused)),
        None => Ok(session),
    }
}

/// The signed-in user of a page that also serves visitors.
pub(super) async fn visitor(app: &AppState, headers: &HeaderMap) -> Option<WebSession> {
    let token = auth::session_cookie(headers)?;
    let auth = UserAuth::from_token(app, token, true).await.ok()?;
    Some(WebSession {
        auth,
        csrf: auth::csrf_token(token),
    })
}

#[derive(Template)]
#[template(path = "signup.html")]
struct SignupPage {
    nav: Option<Nav>,
    /// A visitor's form token (see [`form_token`]).
    form_token: String,
    first: bool,
    open: bool,
    flash: Flash,
    username: String,
    email: String,
}

async fn signup_view(
    app: &AppState,
    headers: &HeaderMap,
    flash: Flash,
    form: Option<&SignupForm>,
) -> Response {
    let session = visitor(app, headers).await;
    let first = matches!(app.documents.count_users().await, Ok(0));
    let admin = session
        .as_ref()
        .is_some_and(|s| s.auth.user.role == "admin");
    visitor_page(app, headers, |form_token| SignupPage {
        nav: session.as_ref().map(Nav::from),
        form_token,
        first,
        open: first || app.settings.allow_signup || admin,
        flash,
        username: form.map(|f| f.username.clone()).unwrap_or_default(),
        email: form.map(|f| f.email.clone()).unwrap_or_default(),
    })
}

pub async fn signup_page(
    State(app): State<AppState>,
    headers: HeaderMap,
    flash: Flashes,
) -> Response {
    signup_view(&app, &headers, flash.0, None).await
}

#[derive(Deserialize)]
pub struct SignupForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

/// Creates the account; a visitor is signed in as it, an admin stays themselves.
pub async fn signup(
    State(app): State<AppState>,
    peer: oauth::Peer,
    headers: HeaderMap,
    Form(form): Form<SignupForm>,
) -> Response {
    let session = match signed_form(&app, &headers, &form.csrf).await {
        Ok(session) => session,
        Err(refused) => return *refused,
    };
    let register = RegisterForm {
        username: form.username.trim().to_string(),
        email: form.email.clone(),
        password: form.password.clone(),
        accept_terms: Value::Bool(true),
    };
    let by = session.as_ref().map(|s| &s.auth.user);
    let requester = oauth::Requester {
        by,
        peer: peer.0,
        invited: false,
    };
    match oauth::create_account(&app, register, requester).await {
        Ok(user) if by.is_some() => back(
            "/signup",
            Ok(format!(
                "account {} created: they can sign in now",
                user.username
            )),
        ),
        Ok(user) => sign_in(&app, &user.id, "/buckets").await,
        Err(e) => {
            let mut page = signup_view(&app, &headers, Flash::error(e.msg), Some(&form)).await;
            *page.status_mut() = e.status;
            page
        }
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    nav: Option<Nav>,
    flash: Flash,
    login: String,
    form_token: String,
    /// Where to go once signed in (a path of this site), if not the buckets.
    next: String,
}

fn login_view(
    app: &AppState,
    headers: &HeaderMap,
    flash: Flash,
    login: String,
    next: String,
) -> Response {
    visitor_page(app, headers, |form_token| LoginPage {
        nav: None,
        flash,
        login,
        form_token,
        next,
    })
}

/// `?next=`: where the sign-in goes on to.
#[derive(Deserialize, Default)]
pub struct Next {
    #[serde(default)]
    next: String,
}

/// `next` if it is a path of this site (never another site: `//host`, `/\host`).
fn local_path(next: &str) -> Option<&str> {
    let local = next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(char::is_control);
    local.then_some(next)
}

pub async fn login_page(
    State(app): State<AppState>,
    headers: HeaderMap,
    flash: Flashes,
    Query(next): Query<Next>,
) -> Response {
    let next = local_path(&next.next).unwrap_or_default().to_string();
    login_view(&app, &headers, flash.0, String::new(), next)
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    login: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: String,
}

pub async fn login(
    State(app): State<AppState>,
    peer: oauth::Peer,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if let Some(refused) = refuse_forged_visitor(&headers, &form.csrf) {
        return refused;
    }
    match oauth::check_password(&app, &form.login, form.password, peer.0).await {
        Ok(user) => {
            let to = local_path(&form.next).unwrap_or("/buckets");
            sign_in(&app, &user.id, to).await
        }
        Err(e) => {
            let (status, retry_after) = (e.status, e.retry_after);
            let next = local_path(&form.next).unwrap_or_default().to_string();
            let flash = Flash::error(e.msg);
            let mut page = login_view(&app, &headers, flash, form.login, next);
            *page.status_mut() = status;
            if let Some(seconds) = retry_after {
                page.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, seconds.into());
            }
            page
        }
    }
}

/// Starts a dashboard session (a token pair whose access token lives in the cookie) and
/// goes to `to`.
pub(super) async fn sign_in(app: &AppState, user_id: &str, to: &str) -> Response {
    let tokens = match auth::issue_tokens(app, user_id, "dashboard", SESSION_TTL_MS).await {
        Ok(tokens) => tokens,
        Err(e) => return error_page(&e),
    };
    let cookie = session_cookie(app, &tokens.access_token, SESSION_TTL_MS / 1000);
    redirect_with_cookie(to, &cookie)
}

fn session_cookie(app: &AppState, value: &str, max_age_s: i64) -> String {
    cookie(app, SESSION_COOKIE, value, "Lax", max_age_s)
}

/// A `Set-Cookie` value: HttpOnly, for the whole site, Secure when the site is https.
fn cookie(app: &AppState, name: &str, value: &str, same_site: &str, max_age_s: i64) -> String {
    let secure = if app.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    format!("{name}={value}; Path=/; HttpOnly; SameSite={same_site}; Max-Age={max_age_s}{secure}")
}

fn redirect_with_cookie(to: &str, cookie: &str) -> Response {
    let mut response = Redirect::to(to).into_response();
    if let Ok(cookie) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(SET_COOKIE, cookie);
    }
    response
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// Ends the session: its token is revoked and the cookie cleared.
pub async fn logout(
    State(app): State<AppState>,
    session: WebSession,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = session.refuse_forged(&form.csrf) {
        return refused;
    }
    if let Err(e) = app
        .documents
        .delete_token(&session.auth.access_digest)
        .await
    {
        return error_page(&e.into());
    }
    redirect_with_cookie("/login", &session_cookie(&app, "", 0))
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    nav: Option<Nav>,
    email: String,
    role: String,
    /// The setup wizard is reachable under `/wizard/`.
    wizard: bool,
    /// Admins: how the last scheduled backup went.
    backup: Option<String>,
    tokens: Vec<TokenRow>,
    /// A token just created: (name, token), shown this once.
    new_token: Option<(String, String)>,
    flash: Flash,
}

/// A personal token as the account page lists it.
struct TokenRow {
    /// The start of its refresh digest: enough to name it, nothing to use it.
    id: String,
    name: String,
    created_at: i64,
    expires_at: i64,
}

/// Personal tokens an account may hold.
const MAX_PERSONAL_TOKENS: usize = 50;
/// How long a personal token may live, in days (the form's choices).
const TOKEN_LIFETIMES_DAYS: [i64; 3] = [30, 90, 365];
/// The longest name of a personal token, in characters.
const MAX_TOKEN_NAME_CHARS: usize = 100;
const TOKEN_ID_CHARS: usize = 16;

/// The user's personal tokens (not their sign-ins), oldest first.
async fn personal_tokens(app: &AppState, user_id: &str) -> Result<Vec<TokenRecord>, ApiError> {
    let tokens = app.documents.tokens_of_user(user_id).await?;
    Ok(tokens
        .into_iter()
        .filter(|t| t.client_id == auth::PERSONAL_CLIENT)
        .collect())
}

/// The last scheduled backup in a sentence, for admins.
fn backup_line(app: &AppState) -> Option<String> {
    let schedule = app.settings.backups.as_ref()?;
    let when = |at: i64| {
        bson::DateTime::from_millis(at)
            .try_to_rfc3339_string()
            .unwrap_or_default()
    };
    let every = format!(
        "every {} h into {}, the last {} kept",
        schedule.every.as_secs() / 3600,
        schedule.dir.display(),
        schedule.keep
    );
    Some(match km_backup::Outcome::read(&schedule.dir) {
        None => format!("Backups: none yet ({every})."),
        Some(o) if o.ok => format!(
            "Last backup: {} ({:.1} MB, {:.1} s; {every}).",
            when(o.at),
            o.bytes as f64 / 1e6,
            o.took_ms as f64 / 1e3
        ),
        Some(o) => format!(
            "The last backup FAILED at {}: {} ({every}).",
            when(o.at),
            o.error.unwrap_or_default()
        ),
    })
}

pub async fn account_page(
    State(app): State<AppState>,
    session: WebSession,
    flash: Flashes,
) -> Response {
    account_view(&app, &session, flash.0, None).await
}

async fn account_view(
    app: &AppState,
    session: &WebSession,
    flash: Flash,
    new_token: Option<(String, String)>,
) -> Response {
    let user = &session.auth.user;
    let tokens = match personal_tokens(app, &user.id).await {
        Ok(tokens) => tokens,
        Err(e) => return error_page(&e),
    };
    let admin = user.role == "admin";
    render(&AccountPage {
        nav: Some(Nav::from(session)),
        backup: admin.then(|| backup_line(app)).flatten(),
        wizard: app.settings.wizard_url.is_some(),
        email: user.email.clone(),
        role: user.role.clone(),
        tokens: (tokens.into_iter())
            .map(|t| TokenRow {
                id: t.refresh_digest.chars().take(TOKEN_ID_CHARS).collect(),
                name: t.name,
                created_at: t.created_at,
                expires_at: t.refresh_expires_at,
            })
            .collect(),
        new_token,
        flash,
    })
}

#[derive(Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    days: String,
    /// The token to revoke (its id).
    #[serde(default)]
    token: String,
}

/// `POST /account/tokens`: a personal token, shown on the page this once (never in a
/// redirect's URL).
pub async fn create_token(
    State(app): State<AppState>,
    session: WebSession,
    Form(form): Form<TokenForm>,
) -> Response {
    if let Some(refused) = session.refuse_forged(&form.csrf) {
        return refused;
    }
    let user = &session.auth.user;
    let created = async {
        let name = form.name.trim();
        if name.is_empty() || name.chars().count() > MAX_TOKEN_NAME_CHARS {
            return Err(ApiError::bad_request(format!(
                "name: 1 to {MAX_TOKEN_NAME_CHARS} characters, to recognise the token by"
            )));
        }
        let days = (form.days.parse().ok())
            .filter(|d| TOKEN_LIFETIMES_DAYS.contains(d))
            .ok_or_else(|| ApiError::bad_request("expires: 30, 90 or 365 days"))?;
        if personal_tokens(&app, &user.id).await?.len() >= MAX_PERSONAL_TOKENS {
            return Err(ApiError::conflict(format!(
                "an account holds at most {MAX_PERSONAL_TOKENS} tokens: revoke one first"
            )));
        }
        let ttl = days * 24 * 3600 * 1000;
        let token = auth::issue_personal(&app, &user.id, name, ttl).await?;
        tracing::info!(user = %user.username, days, "personal token created");
        Ok((name.to_string(), token))
    }
    .await;
    match created {
        Ok(new_token) => account_view(&app, &session, Flash::default(), Some(new_token)).await,
        Err(e) => back("/account", Err(e)),
    }
}

/// `POST /account/tokens/revoke`: the token stops working at once.
pub async fn revoke_token(
    State(app): State<AppState>,
    session: WebSession,
    Form(form): Form<TokenForm>,
) -> Response {
    if let Some(refused) = session.refuse_forged(&form.csrf) {
        return refused;
    }
    let user = &session.auth.user;
    let revoked = async {
        let tokens = personal_tokens(&app, &user.id).await?;
        let token = (tokens.iter())
            .find(|t| {
                form.token.len() == TOKEN_ID_CHARS && t.refresh_digest.starts_with(&form.token)
            })
            .ok_or_else(|| ApiError::not_found("no such token: it was revoked already"))?;
        app.documents
            .delete_token_pair(&user.id, &token.refresh_digest)
            .await?;
        Ok(format!("token {:?} revoked", token.name))
    }
    .await;
    back("/account", revoked)
}

/// How long the dashboard waits for the wizard it asked for.
const WIZARD_START_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// `POST /account/wizard` (admins): the setup wizard, started if it is not running, then
/// the same form posted on to it (307 keeps the method and the CSRF token), where the
/// wizard checks the admin's session and opens with a new token.
pub async fn open_wizard(
    State(app): State<AppState>,
    session: WebSession,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = session.refuse_forged(&form.csrf) {
        return refused;
    }
    if session.auth.user.role != "admin" {
        return error_page(&ApiError::forbidden(
            "only an admin changes the appliance's settings",
        ));
    }
    let Some(wizard) = app.settings.wizard_url.clone() else {
        return error_page(&ApiError::not_found("no setup wizard on this appliance"));
    };
    let Ok(http) = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(2))
        .build()
    else {
        return error_page(&ApiError::unavailable("no HTTP client"));
    };
    if !wizard_answers(&http, &wizard).await {
        tracing::info!(admin = %session.auth.user.username, "setup wizard asked for from the dashboard");
        if let Err(e) = ask_for_wizard(&app.settings.data_dir) {
            return error_page(&ApiError::unavailable(format!(
                "cannot ask for the setup wizard ({e}): run `sudo km-wizard reopen` on the appliance"
            )));
        }
        let deadline = tokio::time::Instant::now() + WIZARD_START_WAIT;
        while !wizard_answers(&http, &wizard).await {
            if tokio::time::Instant::now() > deadline {
                return error_page(&ApiError::unavailable(
                    "the setup wizard did not start: run `sudo km-wizard reopen` on the appliance",
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }
    Redirect::temporary("/wizard/reopen").into_response()
}

/// Whether the wizard answers at all (without its token it answers 403).
async fn wizard_answers(http: &reqwest::Client, base: &str) -> bool {
    http.get(format!("{}/wizard/", base.trim_end_matches('/')))
        .send()
        .await
        .is_ok()
}

/// Writes the request file (its time inside: root acts only on a fresh one).
fn ask_for_wizard(data_dir: &std::path::Path) -> std::io::Result<()> {
    use km_stores::sqlite::WIZARD_START_REQUEST;
    let path = data_dir.join(WIZARD_START_REQUEST);
    let tmp = data_dir.join(format!(".{WIZARD_START_REQUEST}.tmp"));
    std::fs::write(&tmp, km_stores::ids::now_ms().to_string())?;
    std::fs::rename(&tmp, &path)
}

#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    current: String,
    #[serde(default)]
    new: String,
    #[serde(default)]
    confirm: String,
    #[serde(default)]
    csrf: String,
}

/// Changes the password; every session and token of the user ends, this one is renewed.
pub async fn change_password(
    State(app): State<AppState>,
    session: WebSession,
    peer: oauth::Peer,
    Form(form): Form<PasswordForm>,
) -> Response {
    if let Some(refused) = session.refuse_forged(&form.csrf) {
        return refused;
    }
    let user = &session.auth.user;
    let changed = async {
        oauth::check_password(&app, &user.username, form.current, peer.0)
            .await
            .map_err(|e| match e.retry_after {
                Some(_) => e,
                None => ApiError::bad_request("current password: wrong password"),
            })?;
        if form.new != form.confirm {
            return Err(ApiError::bad_request(
                "new password: the two entries differ",
            ));
        }
        oauth::check_new_password(&form.new)?;
        let hash = auth::hash_password(form.new).await?;
        app.documents.set_password(&user.id, &hash).await?;
        Ok(())
    }
    .await;
    match changed {
        Ok(()) => {
            tracing::info!(user = %user.username, "password changed");
            sign_in(&app, &user.id, "/account?msg=password+changed").await
        }
        Err(e) => back("/account", Err(e)),
    }
}
