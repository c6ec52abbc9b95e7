//! HTTP-01 challenge answers: the ACME CA fetches
//! `http://<host>/.well-known/acme-challenge/<token>` on port 80 and expects the key
//! authorization of that token.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::RwLock;

/// The path prefix the CA requests (RFC 8555 section 8.3).
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Tokens being validated and their key authorizations; cheap to clone, shared between
/// the ACME client that adds them and the HTTP port that answers them.
#[derive(Debug, Clone, Default)]
pub struct Challenges(Arc<RwLock<HashMap<String, String>>>);

impl Challenges {
    /// Answers `token` with `key_authorization` until the returned guard is dropped.
    pub fn publish(&self, token: &str, key_authorization: &str) -> Published {
        self.0
            .write()
            .insert(token.to_string(), key_authorization.to_string());
        Published {
            challenges: self.clone(),
            token: token.to_string(),
        }
    }

    /// The key authorization of `token`, while it is published.
    pub fn answer(&self, token: &str) -> Option<String> {
        self.0.read().get(token).cloned()
    }

    /// The answer to the CA's request for `token`, if it is published.
    pub fn response(&self, token: &str) -> Option<Response> {
        let key_authorization = self.answer(token)?;
        Some(
            (
                [(header::CONTENT_TYPE, "application/octet-stream")],
                key_authorization,
            )
                .into_response(),
        )
    }

    /// `GET /.well-known/acme-challenge/{token}`, to merge into any router (the km port
    /// or the setup wizard's).
    pub fn routes(&self) -> Router {
        Router::new()
            .route("/.well-known/acme-challenge/{token}", get(respond))
            .with_state(self.clone())
    }
}

/// Removes its token from the answers when dropped (order done, failed or abandoned).
#[derive(Debug)]
pub struct Published {
    challenges: Challenges,
    token: String,
}

impl Drop for Published {
    fn drop(&mut self) {
        self.challenges.0.write().remove(&self.token);
    }
}

async fn respond(State(challenges): State<Challenges>, Path(token): Path<String>) -> Response {
    challenges
        .response(&token)
        .unwrap_or_else(|| (StatusCode::NOT_FOUND, "no such ACME challenge\n").into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_while_published() {
        let challenges = Challenges::default();
        let guard = challenges.publish("tok", "tok.thumb");
        assert_eq!(challenges.answer("tok").as_deref(), Some("tok.thumb"));
        assert_eq!(challenges.answer("other"), None);
        drop(guard);
        assert_eq!(challenges.answer("tok"), None);
    }
}
