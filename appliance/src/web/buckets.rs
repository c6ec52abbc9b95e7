//! Bucket pages: the list (with each bucket's health) and settings (keys and link
//! command, members and roles, servers, rename, delete).

use askama::Template;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::Value;

use super::fleet::{ServerCard, server_cards};
use super::{Flash, Flashes, Nav, WebSession, back, error_page, render};
use crate::api::Body;
use crate::api::buckets::{self as api, BucketAccess};
use crate::api::team::{self, Invited};
use crate::error::ApiError;
use futures_util::future::join_all;
use km_core::app::AppState;
use km_core::bucket_settings::BucketSettings;
use km_core::health::{Fleet, counted};
use km_core::invitations::{Invitation, Pending};
use km_stores::{Bucket, Member, MemberRole};

/// A bucket the signed-in user belongs to, or the error page (404 for anyone else).
pub async fn access(
    app: &AppState,
    session: &WebSession,
    id: &str,
) -> Result<BucketAccess, Response> {
    BucketAccess::load(app, session.auth.clone(), id)
        .await
        .map_err(|e| error_page(&e))
}

/// The bucket of a form: refused when the form's CSRF token is not the session's, else
/// as [`access`] has it.
pub async fn form_access(
    app: &AppState,
    session: &WebSession,
    id: &str,
    csrf: &str,
) -> Result<BucketAccess, Response> {
    match session.refuse_forged(csrf) {
        Some(refused) => Err(refused),
        None => access(app, session, id).await,
    }
}

/// The command that links a server to the bucket.
pub fn link_command(app: &AppState, bucket: &Bucket) -> String {
    format!(
        "KEYMETRICS_NODE={} pm2 link {} {}",
        app.public_url, bucket.secret_id, bucket.public_id
    )
}

/// A bucket in the list, with its fleet's health.
struct BucketRow {
    bucket: Bucket,
    /// `3 servers (2 online) · 12 processes`.
    summary: String,
    /// Its health now (class, text): `healthy` or `N problems`; none without servers.
    badge: Option<(&'static str, String)>,
}

impl BucketRow {
    async fn load(app: &AppState, bucket: Bucket) -> BucketRow {
        match Fleet::load(app, &bucket.id).await {
            Ok(fleet) => BucketRow {
                summary: format!(
                    "{} ({} online) · {}",
                    counted(fleet.hosts.len(), "server", "servers"),
                    fleet.online_hosts(),
                    counted(fleet.processes(), "process", "processes"),
                ),
                badge: match fleet.problems.len() {
                    _ if fleet.hosts.is_empty() => None,
                    0 => Some(("on", "healthy".into())),
                    n => Some(("errored", counted(n, "problem", "problems"))),
                },
                bucket,
            },
            Err(e) => BucketRow {
                summary: format!("health unavailable: {e}"),
                badge: None,
                bucket,
            },
        }
    }
}

#[derive(Template)]
#[template(path = "buckets.html")]
struct ListPage {
    nav: Option<Nav>,
    buckets: Vec<BucketRow>,
    flash: Flash,
}

pub async fn list(State(app): State<AppState>, session: WebSession, flash: Flashes) -> Response {
    let buckets = match app.documents.buckets_of_user(&session.auth.user.id).await {
        Ok(buckets) => buckets,
        Err(e) => return error_page(&e.into()),
    };
    let buckets = join_all(buckets.into_iter().map(|b| BucketRow::load(&app, b))).await;
    render(&ListPage {
        nav: Some(Nav::from(&session)),
        buckets,
        flash: flash.0,
    })
}

#[derive(Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    csrf: String,
}

pub async fn create(
    State(app): State<AppState>,
    session: WebSession,
    Form(form): Form<CreateForm>,
) -> Response {
    if let Some(refused) = session.refuse_forged(&form.csrf) {
        return refused;
    }
    let body = Body(api::CreateForm { name: form.name });
    match api::create(State(app), session.auth, body).await {
        Ok(created) => match created.0["bucket"]["_id"].as_str() {
            Some(id) => Redirect::to(&format!("/buckets/{id}")).into_response(),
            None => back("/buckets", Ok("bucket created".into())),
        },
        Err(e) => back("/buckets", Err(e)),
    }
}

#[derive(Template)]
#[template(path = "settings.html")]
struct SettingsPage {
    nav: Option<Nav>,
    bucket: Bucket,
    role: MemberRole,
    link: String,
    members: Vec<Member>,
    /// Pending invitations (admins only).
    invitations: Vec<Pending>,
    servers: Vec<ServerCard>,
    settings: BucketSettings,
    flash: Flash,
}

pub async fn settings(
    State(app): State<AppState>,
    session: WebSession,
    Path(id): Path<String>,
    flash: Flashes,
) -> Response {
    match access(&app, &session, &id).await {
        Ok(access) => settings_view(&app, &session, access, flash.0).await,
        Err(page) => page,
    }
}

async fn settings_view(
    app: &AppState,
    session: &WebSession,
    access: BucketAccess,
    flash: Flash,
) -> Response {
    let documents = app.documents.as_ref();
    let invitations = async {
        if access.role.includes(MemberRole::Admin) {
            Invitation::pending(documents, &access.bucket.id).await
        } else {
            Ok(Vec::new())
        }
    };
    let stored = tokio::try_join!(
        documents.bucket_members(&access.bucket.id),
        BucketSettings::load(documents, &access.bucket.id),
        invitations,
    );
    let (members, settings, invitations) = match stored {
        Ok(stored) => stored,
        Err(e) => return error_page(&e.into()),
    };
    render(&SettingsPage {
        nav: Some(Nav::from(session)),
        settings,
        servers: server_cards(app, &access.bucket.id).await,
        link: link_command(app, &access.bucket),
        members,
        invitations,
        role: access.role,
        bucket: access.bucket,
        flash,
    })
}

/// Invites the form's address by mail; when the mail cannot go, the settings page shows
/// the link to pass on (never in a redirect's URL).
async fn invite(
    app: &AppState,
    session: &WebSession,
    access: BucketAccess,
    form: &api::MemberForm,
) -> Response {
    let page = format!("/buckets/{}/settings", access.bucket.id);
    match team::invite_by_mail(app, &access, form).await {
        Ok(Invited {
            email,
            mail_error: None,
            ..
        }) => back(
            &page,
            Ok(format!(
                "invitation mailed to {email}: its link works for 7 days"
            )),
        ),
        Ok(Invited {
            email,
            mail_error: Some(error),
            link,
            ..
        }) => {
            let flash = Flash {
                msg: Some(format!(
                    "invitation to {email} created, but not mailed ({error}): send them this link (it works for 7 days): {link}"
                )),
                error: None,
            };
            settings_view(app, session, access, flash).await
        }
        Err(e) => back(&page, Err(e)),
    }
}

#[derive(Deserialize)]
pub struct SettingsForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    server_name: String,
    /// The invitation to revoke.
    #[serde(default)]
    invitation: String,
    /// `true` to refuse the bucket's agents, `false` to admit them again.
    #[serde(default)]
    disabled: String,
    /// `true` to have every agent send its logs, `false` only while someone watches.
    #[serde(default)]
    collect_logs: String,
}

/// The settings forms: each runs the API route of the same purpose, with its checks.
pub async fn settings_action(
    State(app): State<AppState>,
    session: WebSession,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<SettingsForm>,
) -> Response {
    let access = match form_access(&app, &session, &id, &form.csrf).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let page = format!("/buckets/{id}/settings");
    let member_form = api::MemberForm {
        email: form.email.clone(),
        role: form.role.clone(),
    };
    let member = || Body(member_form.clone());
    let state = State(app.clone());
    let outcome: Result<String, ApiError> = match action.as_str() {
        "rename" => api::update(
            state,
            access,
            Body(api::UpdateForm {
                name: Some(form.name.clone()),
                ..Default::default()
            }),
        )
        .await
        .map(|_| "bucket renamed".into()),
        "agents" => {
            let disabled = form.disabled == "true";
            api::update(
                state,
                access,
                Body(api::UpdateForm {
                    disabled: Some(Value::Bool(disabled)),
                    ..Default::default()
                }),
            )
            .await
            .map(|_| {
                if disabled {
                    "agents refused: the bucket is disabled"
                } else {
                    "agents admitted again"
                }
                .into()
            })
        }
        "logs" => {
            let on = form.collect_logs == "true";
            let body = api::UpdateForm {
                collect_logs: Some(Value::Bool(on)),
                ..Default::default()
            };
            api::update(state, access, Body(body)).await.map(|_| {
                if on {
                    "logs collected: every agent sends its logs"
                } else {
                    "logs sent only while someone watches a live tail"
                }
                .into()
            })
        }
        "add_member" => match api::add_member(state, access.clone(), member()).await {
            Err(e) if e.status == StatusCode::NOT_FOUND && form.email.contains('@') => {
                return invite(&app, &session, access, &member_form).await;
            }
            added => added.map(|_| format!("{} added", form.email)),
        },
        "revoke_invitation" => {
            let which = Path((id.clone(), form.invitation.clone()));
            team::revoke_invitation(state, access, which)
                .await
                .map(|_| "invitation revoked: its link no longer works".into())
        }
        "transfer" => team::transfer(state, access, member()).await.map(|done| {
            let owner = done.0["owner"].as_str().unwrap_or_default().to_string();
            match done.0["mail_error"].as_str() {
                None => format!("{owner} owns the bucket now (told by mail)"),
                Some(e) => format!("{owner} owns the bucket now (the mail was not sent: {e})"),
            }
        }),
        "set_role" => api::set_member_role(state, access, member())
            .await
            .map(|_| format!("{}'s role changed", form.email)),
        "remove_member" => api::remove_member(state, access, member())
            .await
            .map(|_| format!("{} removed", form.email)),
        "delete_server" => {
            let body = Body(api::ServerForm {
                server_name: form.server_name.clone(),
            });
            api::delete_server(state, access, body)
                .await
                .map(|_| format!("server {} deleted", form.server_name))
        }
        "delete" => {
            return match api::destroy(state, access).await {
                Ok(_) => back("/buckets", Ok("bucket deleted".into())),
                Err(e) => back(&page, Err(e)),
            };
        }
        _ => Err(ApiError::not_found("no such setting")),
    };
    back(&page, outcome)
}
