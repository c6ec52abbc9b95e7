//! The auth role: register, sign in (password grant), refresh, revoke, current user.

use axum::Json;
use axum::extract::State;
use axum::extract::{ConnectInfo, FromRequestParts};

use crate::gateway::proxy::client_ip;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::{IpAddr, SocketAddr};

use super::Body;
use crate::auth::{self, IssuedTokens, UserAuth};
use crate::error::{ApiError, ApiResult};
use km_core::app::AppState;
use km_core::throttle;
use km_stores::User;
use km_stores::ids::{new_object_id, now_ms};

const MIN_PASSWORD: usize = 8;

#[derive(Deserialize)]
pub struct RegisterForm {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub password: String,
    #[serde(default)]
    pub accept_terms: Value,
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => matches!(s.as_str(), "1" | "true" | "on" | "yes"),
        _ => false,
    }
}

/// What a new account must be (the setup wizard checks its first admin with it too).
pub fn check_account(username: &str, email: &str, password: &str) -> Result<(), String> {
    let username_ok = (1..=64).contains(&username.len())
        && username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !username_ok {
        return Err("username: 1 to 64 letters, digits, '_', '.' or '-'".into());
    }
    if !km_config::looks_like_email(email) {
        return Err("email: not a valid address".into());
    }
    password_long_enough(password)
}

fn check_registration(form: &RegisterForm) -> ApiResult<()> {
    check_account(&form.username, &form.email, &form.password).map_err(ApiError::bad_request)?;
    if !truthy(&form.accept_terms) {
        return Err(ApiError::bad_request(
            "accept_terms: the terms must be accepted",
        ));
    }
    Ok(())
}

/// The client's address, when the server records it (`ConnectInfo`): behind the gateway,
/// the address the gateway saw.
pub struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| client_ip(c.0, &parts.headers)),
        ))
    }
}

pub fn check_new_password(password: &str) -> ApiResult<()> {
    password_long_enough(password).map_err(ApiError::bad_request)
}

fn password_long_enough(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(format!("password: at least {MIN_PASSWORD} characters"));
    }
    Ok(())
}

fn token_json(tokens: &IssuedTokens) -> Value {
    json!({
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "expire_at": rfc3339(tokens.access_expires_at),
        "token_type": "Bearer",
    })
}

fn rfc3339(ms: i64) -> String {
    bson::DateTime::from_millis(ms)
        .try_to_rfc3339_string()
        .unwrap_or_default()
}

/// Who asks for an account: the admin creating it, if any, and the peer's address.
#[derive(Default, Clone, Copy)]
pub struct Requester<'a> {
    pub by: Option<&'a User>,
    pub peer: Option<IpAddr>,
    /// They hold a bucket's invitation (an account while sign-up is closed).
    pub invited: bool,
}

/// Creates an account: the first one is the admin; later ones only while sign-up is
/// open (`KM_ALLOW_SIGNUP`) or when an admin creates them. On an appliance with a setup
/// wizard (`KM_WIZARD_URL`) the first account comes from the wizard, on this machine:
/// whoever reaches a fresh km first must not become its admin.
pub async fn create_account(
    app: &AppState,
    form: RegisterForm,
    requester: Requester<'_>,
) -> ApiResult<User> {
    let by = requester.by;
    check_registration(&form)?;
    let first = app.documents.count_users().await? == 0;
    let local = requester.peer.is_some_and(|ip| ip.is_loopback());
    if first && app.settings.wizard_url.is_some() && !local {
        return Err(ApiError::forbidden(
            "the administrator account is created in the setup wizard",
        ));
    }
    let by_admin = by.is_some_and(|u| u.role == "admin");
    if !first && !app.settings.allow_signup && !by_admin && !requester.invited {
        return Err(ApiError::forbidden(
            "sign-up is closed: an admin creates accounts (or sets KM_ALLOW_SIGNUP=true)",
        ));
    }
    let email = form.email.trim().to_lowercase();
    if app.documents.user_by_login(&form.username).await?.is_some()
        || app.documents.user_by_login(&email).await?.is_some()
    {
        return Err(ApiError::conflict(
            "this username or email is already registered",
        ));
    }
    let role = if first { "admin" } else { "user" };
    let user = User {
        id: new_object_id(),
        username: form.username,
        email,
        password_hash: auth::hash_password(form.password).await?,
        role: role.to_string(),
        created_at: now_ms(),
        disabled: false,
        reset: None,
    };
    app.documents.insert_user(&user).await?;
    tracing::info!(user = %user.username, role, by = by.map(|u| u.username.as_str()), "account created");
    Ok(user)
}

/// `POST|GET /api/oauth/register`: creates an account and signs it in (an admin's
/// bearer token may create accounts while sign-up is closed).
pub async fn register(
    State(app): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    Body(form): Body<RegisterForm>,
) -> ApiResult<Json<Value>> {
    let by = match auth::bearer(&headers) {
        Some(token) => Some(UserAuth::from_token(&app, token, false).await?.user),
        None => None,
    };
    let requester = Requester {
        by: by.as_ref(),
        peer: peer.0,
        invited: false,
    };
    let user = create_account(&app, form, requester).await?;
    let tokens = auth::issue_tokens(&app, &user.id, "km", auth::ACCESS_TTL_MS).await?;
    let mut body = token_json(&tokens);
    body["user"] = json!(user);
    Ok(Json(body))
}

#[derive(Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    grant_type: String,
    username: Option<String>,
    email: Option<String>,
    password: Option<String>,
    refresh_token: Option<String>,
    client_id: Option<String>,
}

/// The account of `login` (username or email) if `password` is its password. Every
/// sign-in path goes through here: failures are throttled per account and per client
/// address (`ip`), and while held even the right password waits (429).
pub async fn check_password(
    app: &AppState,
    login: &str,
    password: String,
    ip: Option<IpAddr>,
) -> ApiResult<User> {
    let user = app.documents.user_by_login(login.trim()).await?;
    // Held by account whichever of its names is given.
    let account = user
        .as_ref()
        .map_or_else(|| login.trim().to_lowercase(), |u| u.id.clone());
    if let Some(wait) = throttle::sign_in_wait(&*app.bus, &account, ip).await {
        tracing::warn!(login = %login.trim(), ip = ?ip, "sign-in held: too many failed attempts");
        return Err(ApiError::too_many("too many failed sign-ins", wait));
    }
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_default();
    let user = match user {
        Some(user) if auth::verify_password(password, hash).await => Some(user),
        _ => None,
    };
    throttle::record_sign_in(&*app.bus, &account, ip, user.is_some()).await;
    match user {
        Some(user) if user.disabled => Err(ApiError::forbidden(
            "this account is disabled: ask an admin of the appliance",
        )),
        Some(user) => Ok(user),
        None => Err(ApiError::unauthorized("wrong username or password")),
    }
}

/// `POST /api/oauth/token`: password and refresh_token grants.
pub async fn token(
    State(app): State<AppState>,
    peer: Peer,
    Body(form): Body<TokenForm>,
) -> ApiResult<Json<Value>> {
    let client_id = form.client_id.unwrap_or_else(|| "km".to_string());
    match form.grant_type.as_str() {
        "password" => {
            let login = form.username.or(form.email).ok_or_else(|| {
                ApiError::bad_request("username: required with grant_type=password")
            })?;
            let password = form.password.ok_or_else(|| {
                ApiError::bad_request("password: required with grant_type=password")
            })?;
            let user = check_password(&app, &login, password, peer.0).await?;
            let tokens =
                auth::issue_tokens(&app, &user.id, &client_id, auth::ACCESS_TTL_MS).await?;
            Ok(Json(token_json(&tokens)))
        }
        "refresh_token" => {
            let refresh = form.refresh_token.ok_or_else(|| {
                ApiError::bad_request("refresh_token: required with grant_type=refresh_token")
            })?;
            let refresh_digest = auth::digest(&refresh);
            let record = app
                .documents
                .token_by_refresh(&refresh_digest)
                .await?
                .filter(|t| t.refresh_expires_at > now_ms())
                .ok_or_else(|| {
                    ApiError::unauthorized("invalid or expired refresh token: sign in again")
                })?;
            let tokens = IssuedTokens {
                access_token: km_stores::ids::random_hex(32),
                refresh_token: refresh,
                access_expires_at: now_ms() + auth::ACCESS_TTL_MS,
            };
            let rotated = app
                .documents
                .rotate_access(
                    &record.refresh_digest,
                    &auth::digest(&tokens.access_token),
                    tokens.access_expires_at,
                )
                .await?;
            if !rotated {
                return Err(ApiError::unauthorized(
                    "refresh token was revoked: sign in again",
                ));
            }
            Ok(Json(token_json(&tokens)))
        }
        other => Err(ApiError::bad_request(format!(
            "grant_type: {other:?} is not supported (use password or refresh_token)"
        ))),
    }
}

/// `POST /api/oauth/revoke`: ends the session of the bearer token (a personal token given
/// as the bearer is revoked for good).
pub async fn revoke(State(app): State<AppState>, auth: UserAuth) -> ApiResult<Json<Value>> {
    app.documents.delete_token(&auth.access_digest).await?;
    app.documents
        .delete_token_pair(&auth.user.id, &auth.access_digest)
        .await?;
    Ok(Json(json!({ "success": true })))
}

/// `GET /api/users/isLogged`: the signed-in user.
pub async fn is_logged(auth: UserAuth) -> Json<User> {
    Json(auth.user)
}
