//! The auth role's building blocks: argon2 password hashes, bearer tokens stored as
//! SHA-256 digests, and the `UserAuth` extractor every protected route takes.
//!
//! The dashboard signs in with the same tokens, held in an HttpOnly cookie. A request
//! authenticated by that cookie must also carry the session's CSRF token (header
//! `x-csrf-token` or form field `csrf`) unless it only reads.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use km_core::app::AppState;
use km_stores::ids::{now_ms, random_hex};
use km_stores::{TokenRecord, User};

pub const ACCESS_TTL_MS: i64 = 3600 * 1000;
pub const REFRESH_TTL_MS: i64 = 30 * 24 * 3600 * 1000;
/// How long a dashboard sign-in lasts.
pub const SESSION_TTL_MS: i64 = 7 * 24 * 3600 * 1000;
pub const SESSION_COOKIE: &str = "km_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The client of personal tokens: one secret that is both a bearer token and a refresh
/// token (what `@pm2/js-api`'s standalone strategy is given).
pub const PERSONAL_CLIENT: &str = "personal";

/// Hashes a password (on a blocking thread: argon2 is slow on purpose).
pub async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::encode_b64(random_hex(16).as_bytes()).map_err(|e| e.to_string())?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .map_err(|e| ApiError::bad_request(format!("password cannot be hashed: {e}")))
}

/// Checks a password against its stored hash.
pub async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// The digest under which a token is stored.
pub fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A token pair as given to the client (the only time the tokens are seen in clear).
pub struct IssuedTokens {
    pub access_token: String,
    pub refresh_token: String,
    pub access_expires_at: i64,
}

/// The CSRF token of a dashboard session (derived, so nothing more is stored; a page
/// of another site cannot read the cookie it derives from).
pub fn csrf_token(session_token: &str) -> String {
    hex::encode(&Sha256::digest(format!("km-csrf:{session_token}").as_bytes())[..16])
}

/// Issues and stores a new token pair for `user_id`, the access token valid `ttl_ms`.
pub async fn issue_tokens(
    app: &AppState,
    user_id: &str,
    client_id: &str,
    ttl_ms: i64,
) -> Result<IssuedTokens, ApiError> {
    let now = now_ms();
    let issued = IssuedTokens {
        access_token: random_hex(32),
        refresh_token: random_hex(32),
        access_expires_at: now + ttl_ms,
    };
    app.documents
        .insert_token(&TokenRecord {
            access_digest: digest(&issued.access_token),
            refresh_digest: digest(&issued.refresh_token),
            user_id: user_id.to_string(),
            client_id: client_id.to_string(),
            access_expires_at: issued.access_expires_at,
            refresh_expires_at: now + REFRESH_TTL_MS,
            name: String::new(),
            created_at: now,
        })
        .await?;
    Ok(issued)
}

/// Issues and stores a personal token named `name`, valid `ttl_ms`; the token is
/// returned this once.
pub async fn issue_personal(
    app: &AppState,
    user_id: &str,
    name: &str,
    ttl_ms: i64,
) -> Result<String, ApiError> {
    let now = now_ms();
    let token = random_hex(32);
    app.documents
        .insert_token(&TokenRecord {
            // No access token until the token is used as a refresh token.
            access_digest: digest(&random_hex(32)),
            refresh_digest: digest(&token),
            user_id: user_id.to_string(),
            client_id: PERSONAL_CLIENT.to_string(),
            access_expires_at: 0,
            refresh_expires_at: now + ttl_ms,
            name: name.to_string(),
            created_at: now,
        })
        .await?;
    Ok(token)
}

/// The signed-in user of a request: `Authorization: Bearer <access_token>`, or the
/// dashboard's session cookie (with its CSRF token on anything but GET/HEAD).
#[derive(Clone)]
pub struct UserAuth {
    pub user: User,
    pub access_digest: String,
    /// Signed in through the dashboard cookie, not a bearer token.
    pub by_cookie: bool,
}

impl UserAuth {
    /// The user holding `token`, if it is a live access token (or, as a bearer, a live
    /// personal token) and the account is not disabled.
    pub async fn from_token(
        app: &AppState,
        token: &str,
        by_cookie: bool,
    ) -> Result<Self, ApiError> {
        let access_digest = digest(token);
        let now = now_ms();
        let mut record = app
            .documents
            .token_by_access(&access_digest)
            .await?
            .filter(|t| t.access_expires_at > now);
        if record.is_none() && !by_cookie {
            record = app
                .documents
                .token_by_refresh(&access_digest)
                .await?
                .filter(|t| t.client_id == PERSONAL_CLIENT && t.refresh_expires_at > now);
        }
        let record = record.ok_or_else(|| {
            ApiError::unauthorized("invalid or expired access token: refresh it or sign in")
        })?;
        let user = app
            .documents
            .user_by_id(&record.user_id)
            .await?
            .ok_or_else(|| ApiError::unauthorized("the token's user no longer exists"))?;
        if user.disabled {
            return Err(ApiError::unauthorized(
                "this account is disabled: ask an admin of the appliance",
            ));
        }
        Ok(UserAuth {
            user,
            access_digest,
            by_cookie,
        })
    }
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The dashboard session token from the cookie header.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    cookie(headers, SESSION_COOKIE)
}

/// The value of the cookie `name`, if the request has a non-empty one.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// Whether two secrets are equal, in time independent of where they differ.
pub fn same_secret(expected: &str, given: &str) -> bool {
    bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

/// Whether `given` is the session's CSRF token.
pub fn csrf_matches(session_token: &str, given: Option<&str>) -> bool {
    given.is_some_and(|given| same_secret(&csrf_token(session_token), given))
}

impl FromRequestParts<AppState> for UserAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        if let Some(token) = bearer(&parts.headers) {
            return UserAuth::from_token(app, token, false).await;
        }
        let token = session_cookie(&parts.headers)
            .ok_or_else(|| ApiError::unauthorized("missing bearer token: sign in first"))?;
        let reads_only = parts.method == Method::GET || parts.method == Method::HEAD;
        let given = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !reads_only && !csrf_matches(token, given) {
            return Err(ApiError::forbidden(
                "missing or wrong CSRF token: reload the page and try again",
            ));
        }
        UserAuth::from_token(app, token, true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2"));
        assert!(verify_password("correct horse".into(), hash.clone()).await);
        assert!(!verify_password("wrong".into(), hash).await);
        assert!(!verify_password("x".into(), "not a hash".into()).await);
    }
}
