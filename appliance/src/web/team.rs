//! An invitation's page: whoever holds the mailed link joins the bucket, with the account
//! they are signed in with or one they create there (sign-up closed or not; the email
//! is the invited one).

use askama::Template;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::Value;

use super::account::{sign_in, signed_form, visitor, visitor_page};
use super::{Flash, Nav, WebSession, error_page};
use crate::api::oauth::{self, RegisterForm};
use crate::api::team;
use crate::auth;
use crate::error::ApiError;
use km_core::app::AppState;
use km_core::invitations::Invitation;
use km_stores::Bucket;
use km_stores::ids::is_object_id;

/// The bucket and invitation of a link, or why the link does not work.
async fn invitation_of(
    app: &AppState,
    bucket_id: &str,
    secret: &str,
) -> Result<(Bucket, String, Invitation), ApiError> {
    let unknown = || {
        ApiError::not_found(
            "this invitation does not work: it was used or revoked, or the link is incomplete",
        )
    };
    if !is_object_id(bucket_id) {
        return Err(unknown());
    }
    let bucket = (app.documents.bucket_by_id(bucket_id).await?).ok_or_else(unknown)?;
    let id = auth::digest(secret);
    let invitation =
        (Invitation::find(app.documents.as_ref(), bucket_id, &id).await?).ok_or_else(unknown)?;
    if invitation.expired() {
        return Err(ApiError::not_found(format!(
            "this invitation expired: ask {} for a new one",
            invitation.invited_by
        )));
    }
    Ok((bucket, id, invitation))
}

#[derive(Template)]
#[template(path = "invitation.html")]
struct InvitationPage {
    nav: Option<Nav>,
    flash: Flash,
    bucket: Bucket,
    invitation: Invitation,
    /// This page's path (the form posts to it; sign-in comes back to it).
    path: String,
    form_token: String,
    username: String,
}

async fn page_view(
    app: &AppState,
    headers: &HeaderMap,
    (bucket_id, secret): (&str, &str),
    flash: Flash,
    username: String,
) -> Response {
    let (bucket, _, invitation) = match invitation_of(app, bucket_id, secret).await {
        Ok(found) => found,
        Err(e) => return error_page(&e),
    };
    let session = visitor(app, headers).await;
    visitor_page(app, headers, |form_token| InvitationPage {
        nav: session.as_ref().map(Nav::from),
        flash,
        bucket,
        invitation,
        path: format!("/invitations/{bucket_id}/{secret}"),
        form_token,
        username,
    })
}

/// `GET /invitations/:bucket/:secret`.
pub async fn page(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((bucket_id, secret)): Path<(String, String)>,
) -> Response {
    let link = (bucket_id.as_str(), secret.as_str());
    page_view(&app, &headers, link, Flash::default(), String::new()).await
}

#[derive(Deserialize)]
pub struct AcceptForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// `POST /invitations/:bucket/:secret`: joins as the signed-in user, or creates the
/// account and signs it in; then the bucket.
pub async fn accept(
    State(app): State<AppState>,
    peer: oauth::Peer,
    headers: HeaderMap,
    Path((bucket_id, secret)): Path<(String, String)>,
    Form(form): Form<AcceptForm>,
) -> Response {
    let session = match signed_form(&app, &headers, &form.csrf).await {
        Ok(session) => session,
        Err(refused) => return *refused,
    };
    let (bucket, id, invitation) = match invitation_of(&app, &bucket_id, &secret).await {
        Ok(found) => found,
        Err(e) => return error_page(&e),
    };
    let bucket_page = format!("/buckets/{bucket_id}");
    let joined = match &session {
        Some(WebSession { auth, .. }) => team::accept(&app, &bucket, &id, &invitation, &auth.user)
            .await
            .map(|()| None),
        None => join_with_new_account(&app, &bucket, (&id, &invitation), &form, peer).await,
    };
    match joined {
        Ok(None) => Redirect::to(&bucket_page).into_response(),
        Ok(Some(user_id)) => sign_in(&app, &user_id, &bucket_page).await,
        Err(e) => {
            let link = (bucket_id.as_str(), secret.as_str());
            let flash = Flash::error(e.msg);
            let mut page = page_view(&app, &headers, link, flash, form.username).await;
            *page.status_mut() = e.status;
            page
        }
    }
}

/// Creates the invited account (the invitation's email) and adds it to the bucket;
/// returns the new user's id.
async fn join_with_new_account(
    app: &AppState,
    bucket: &Bucket,
    (id, invitation): (&str, &Invitation),
    form: &AcceptForm,
    peer: oauth::Peer,
) -> Result<Option<String>, ApiError> {
    let register = RegisterForm {
        username: form.username.trim().to_string(),
        email: invitation.email.clone(),
        password: form.password.clone(),
        accept_terms: Value::Bool(true),
    };
    let requester = oauth::Requester {
        by: None,
        peer: peer.0,
        invited: true,
    };
    let user = oauth::create_account(app, register, requester).await?;
    team::accept(app, bucket, id, invitation, &user).await?;
    Ok(Some(user.id))
}
