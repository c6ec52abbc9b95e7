//! A bucket's team beyond its members: invitations by mail for people without an account,
//! and the transfer of the bucket's ownership. Both mail the person concerned; when the
//! mail cannot be sent the admin is told why (and, for an invitation, given its link to
//! pass on: an appliance without SMTP still onboards people).

use askama::Template;
use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::Body;
use super::buckets::{BucketAccess, MemberForm, account_of, requested_role};
use crate::auth;
use crate::error::{ApiError, ApiResult};
use km_core::app::AppState;
use km_core::invitations::{Invitation, MAX_PENDING_INVITATIONS, Pending};
use km_core::mail::{self, Letter};
use km_stores::ids::random_hex;
use km_stores::{Bucket, MemberRole, User};

/// A mail about someone's account or membership: a few sentences and one link.
#[derive(Template)]
#[template(path = "mail/account.txt")]
struct AccountText<'a> {
    lines: &'a [String],
    action: &'a str,
    link: &'a str,
}

#[derive(Template)]
#[template(path = "mail/account.html")]
struct AccountHtml<'a> {
    lines: &'a [String],
    action: &'a str,
    link: &'a str,
}

/// Mails `to` the `lines` and the link (named `action`) now; the error says why not.
pub async fn mail_account(
    app: &AppState,
    to: &str,
    subject: String,
    lines: &[String],
    (action, link): (&str, &str),
) -> Result<(), String> {
    let letter = Letter {
        subject,
        text: (AccountText {
            lines,
            action,
            link,
        }
        .render())
        .map_err(|e| e.to_string())?,
        html: (AccountHtml {
            lines,
            action,
            link,
        }
        .render())
        .map_err(|e| e.to_string())?,
    };
    let sent = mail::send(app.settings.smtp.as_ref(), &[to.to_string()], &letter).await;
    if let Err(e) = &sent {
        tracing::warn!(error = %e, "account mail not sent");
    }
    sent
}

/// Where an invitation is accepted (the secret is in the path: only the mail has it).
pub fn invitation_link(app: &AppState, bucket_id: &str, secret: &str) -> String {
    format!("{}/invitations/{bucket_id}/{secret}", app.public_url)
}

/// An invitation just made: whether its mail went, and its link when it did not.
pub struct Invited {
    pub email: String,
    pub role: MemberRole,
    pub expires_at: i64,
    pub mail_error: Option<String>,
    pub link: String,
}

/// Invites `form.email` (no account yet) into the bucket with `form.role` (default
/// developer): a pending invitation to that address is replaced (its link ends).
pub async fn invite_by_mail(
    app: &AppState,
    access: &BucketAccess,
    form: &MemberForm,
) -> ApiResult<Invited> {
    access.require(MemberRole::Admin, "invite people")?;
    let role = requested_role(form, Some(MemberRole::Developer))?;
    let email = form.email.trim().to_lowercase();
    if !km_config::looks_like_email(&email) {
        return Err(ApiError::bad_request(format!(
            "email: {email:?} is not an address to invite"
        )));
    }
    if let Some(user) = account_of(app, &email).await? {
        return Err(ApiError::conflict(format!(
            "{email} already has an account ({}): add them as a member",
            user.username
        )));
    }
    let documents = app.documents.as_ref();
    let bucket = &access.bucket;
    let pending = Invitation::pending(documents, &bucket.id).await?;
    for earlier in pending.iter().filter(|p| p.invitation.email == email) {
        Invitation::remove(documents, &bucket.id, &earlier.id).await?;
    }
    let others = pending.iter().filter(|p| p.invitation.email != email);
    if others.count() >= MAX_PENDING_INVITATIONS {
        return Err(ApiError::conflict(format!(
            "{bucket} has {MAX_PENDING_INVITATIONS} pending invitations: revoke some first",
            bucket = bucket.name
        )));
    }
    let inviter = &access.auth.user.username;
    let invitation = Invitation::new(email.clone(), role, inviter.clone());
    let secret = random_hex(32);
    invitation
        .save(documents, &bucket.id, &auth::digest(&secret))
        .await?;
    let link = invitation_link(app, &bucket.id, &secret);
    tracing::info!(bucket = %bucket.id, by = %inviter, role = role.as_str(), "invitation created");
    let lines = [
        format!(
            "{inviter} invites you to the bucket {} on {} as {}.",
            bucket.name,
            app.public_url,
            role.as_str()
        ),
        "The link below creates your account and adds you to the bucket; it works for 7 days."
            .to_string(),
    ];
    let subject = format!("{inviter} invites you to {}", bucket.name);
    let sent = mail_account(
        app,
        &email,
        subject,
        &lines,
        ("Accept the invitation", &link),
    )
    .await;
    Ok(Invited {
        email,
        role,
        expires_at: invitation.expires_at,
        mail_error: sent.err(),
        link,
    })
}

/// `POST /api/bucket/:id/invitations` `{email, role}` (admins): `{email, role,
/// expires_at, mailed}`, and `mail_error` with the `link` when it was not mailed.
pub async fn invite(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<MemberForm>,
) -> ApiResult<Json<Value>> {
    let invited = invite_by_mail(&app, &access, &form).await?;
    let mut body = json!({
        "email": invited.email, "role": invited.role, "expires_at": invited.expires_at,
        "mailed": invited.mail_error.is_none(),
    });
    if let Some(error) = invited.mail_error {
        body["mail_error"] = json!(error);
        body["link"] = json!(invited.link);
    }
    Ok(Json(body))
}

/// `GET /api/bucket/:id/invitations` (admins): the pending ones, oldest first.
pub async fn invitations(
    State(app): State<AppState>,
    access: BucketAccess,
) -> ApiResult<Json<Vec<Pending>>> {
    access.require(MemberRole::Admin, "see invitations")?;
    Ok(Json(
        Invitation::pending(app.documents.as_ref(), &access.bucket.id).await?,
    ))
}

/// `DELETE /api/bucket/:id/invitations/:invitation` (admins): its link stops working.
pub async fn revoke_invitation(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Admin, "revoke invitations")?;
    if !Invitation::remove(app.documents.as_ref(), &access.bucket.id, &id).await? {
        return Err(ApiError::not_found("no such invitation"));
    }
    Ok(Json(json!({ "success": true })))
}

/// Adds `user` to the bucket as the invitation says and ends the invitation.
pub async fn accept(
    app: &AppState,
    bucket: &Bucket,
    id: &str,
    invitation: &Invitation,
    user: &User,
) -> ApiResult<()> {
    let documents = app.documents.as_ref();
    if documents.member_role(&bucket.id, &user.id).await?.is_none() {
        documents
            .set_member(&bucket.id, &user.id, invitation.role)
            .await?;
    }
    Invitation::remove(documents, &bucket.id, id).await?;
    tracing::info!(bucket = %bucket.id, user = %user.username, "invitation accepted");
    Ok(())
}

/// `POST /api/bucket/:id/transfer_ownership` `{email}` (the owner): the member named
/// becomes the owner, the owner an admin; the new owner is told by mail. Answers
/// `{owner, mailed}` (with `mail_error` when not mailed).
pub async fn transfer(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<MemberForm>,
) -> ApiResult<Json<Value>> {
    if access.role != MemberRole::Owner {
        return Err(ApiError::forbidden(
            "only the owner transfers the bucket's ownership",
        ));
    }
    let login = form.email.trim();
    let not_member = || ApiError::not_found(format!("{login:?} is not a member of this bucket"));
    let user = account_of(&app, login).await?.ok_or_else(not_member)?;
    if user.id == access.auth.user.id {
        return Err(ApiError::bad_request("you own this bucket already"));
    }
    let bucket = &access.bucket;
    if !app.documents.transfer_bucket(&bucket.id, &user.id).await? {
        return Err(not_member());
    }
    let by = &access.auth.user.username;
    tracing::info!(bucket = %bucket.id, from = %by, to = %user.username, "ownership transferred");
    let lines = [format!(
        "{by} transferred the bucket {} to you: you are its owner now, and {by} an admin.",
        bucket.name
    )];
    let link = format!("{}/buckets/{}/settings", app.public_url, bucket.id);
    let subject = format!("You own {} now", bucket.name);
    let sent = mail_account(
        &app,
        &user.email,
        subject,
        &lines,
        ("Open its settings", &link),
    )
    .await;
    let mut body = json!({ "owner": user.username, "mailed": sent.is_ok() });
    if let Err(error) = sent {
        body["mail_error"] = json!(error);
    }
    Ok(Json(body))
}
