//! The appliance admin's accounts: every account, disabled (signed out everywhere, sign-in
//! refused) or admitted again, and password resets by mail: the mailed link sets a new
//! password, once, within a day.

use askama::Template;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use super::account::{CsrfForm, refuse_forged_visitor, sign_in, visitor_page};
use super::{Flash, Flashes, Nav, WebSession, back, error_page, render};
use crate::api::buckets::account_of;
use crate::api::oauth;
use crate::api::team::mail_account;
use crate::auth;
use crate::error::ApiError;
use km_core::app::AppState;
use km_core::throttle;
use km_stores::ids::{is_object_id, now_ms, random_hex};
use km_stores::{PasswordReset, User};

/// How long a password reset link works (an admin's mail is often read the next day).
const RESET_TTL_MS: i64 = 24 * 3600 * 1000;

#[derive(Template)]
#[template(path = "accounts.html")]
struct AccountsPage {
    nav: Option<Nav>,
    flash: Flash,
    users: Vec<User>,
    /// The admin looking (they cannot disable themselves).
    me: String,
}

/// The refusal of anyone but an admin of the appliance.
fn refuse_non_admin(session: &WebSession) -> Option<Response> {
    (session.auth.user.role != "admin").then(|| {
        error_page(&ApiError::forbidden(
            "only an admin of the appliance manages its accounts",
        ))
    })
}

async fn accounts_view(app: &AppState, session: &WebSession, flash: Flash) -> Response {
    if let Some(refused) = refuse_non_admin(session) {
        return refused;
    }
    match app.documents.all_users().await {
        Ok(users) => render(&AccountsPage {
            nav: Some(Nav::from(session)),
            flash,
            users,
            me: session.auth.user.id.clone(),
        }),
        Err(e) => error_page(&e.into()),
    }
}

/// `GET /admin/accounts`.
pub async fn page(State(app): State<AppState>, session: WebSession, flash: Flashes) -> Response {
    accounts_view(&app, &session, flash.0).await
}

/// `POST /admin/accounts/:user/:action`: `disable`, `enable` or `reset`.
pub async fn action(
    State(app): State<AppState>,
    session: WebSession,
    Path((user_id, action)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = session.refuse_forged(&form.csrf) {
        return refused;
    }
    if let Some(refused) = refuse_non_admin(&session) {
        return refused;
    }
    let user = match account(&app, &user_id).await {
        Ok(user) => user,
        Err(e) => return back("/admin/accounts", Err(e)),
    };
    let by = &session.auth.user.username;
    let outcome = match action.as_str() {
        "disable" if user.id == session.auth.user.id => {
            Err(ApiError::bad_request("you cannot disable your own account"))
        }
        "disable" | "enable" => {
            let disabled = action == "disable";
            app.documents
                .set_user_disabled(&user.id, disabled)
                .await
                .map_err(ApiError::from)
                .map(|_| {
                    tracing::info!(user = %user.username, by = %by, disabled, "account disabled or enabled");
                    if disabled {
                        format!("{} disabled: signed out everywhere, sign-in refused", user.username)
                    } else {
                        format!("{} can sign in again", user.username)
                    }
                })
        }
        "reset" => return reset_by_mail(&app, &session, &user).await,
        _ => Err(ApiError::not_found("no such action")),
    };
    back("/admin/accounts", outcome)
}

async fn account(app: &AppState, user_id: &str) -> Result<User, ApiError> {
    let found = match is_object_id(user_id) {
        true => app.documents.user_by_id(user_id).await?,
        false => None,
    };
    found.ok_or_else(|| ApiError::not_found("no such account"))
}

/// Starts a reset of `user`'s password (a pending one ends); returns its link.
async fn start_reset(app: &AppState, user: &User) -> Result<String, ApiError> {
    let secret = random_hex(32);
    let reset = PasswordReset {
        digest: auth::digest(&secret),
        expires_at: now_ms() + RESET_TTL_MS,
    };
    app.documents
        .set_password_reset(&user.id, Some(&reset))
        .await?;
    Ok(format!("{}/reset/{}/{secret}", app.public_url, user.id))
}

/// Mails `user` the reset `link`; `asked_by` the admin who asked, if not they.
async fn mail_reset(
    app: &AppState,
    user: &User,
    link: &str,
    asked_by: Option<&str>,
) -> Result<(), String> {
    let who = asked_by.unwrap_or("Someone (you, we hope)");
    let lines = [
        format!(
            "{who} asked for a new password for your account {} on {}.",
            user.username, app.public_url
        ),
        "The link below sets it; it works once, for 24 hours. Until then your password stays as it is."
            .to_string(),
    ];
    let subject = "Set a new password for KM".to_string();
    mail_account(
        app,
        &user.email,
        subject,
        &lines,
        ("Set a new password", link),
    )
    .await
}

/// Starts a reset of `user`'s password and mails its link; when the mail cannot go,
/// the page shows the link to pass on.
async fn reset_by_mail(app: &AppState, session: &WebSession, user: &User) -> Response {
    if user.disabled {
        return back(
            "/admin/accounts",
            Err(ApiError::bad_request(format!(
                "{} is disabled: enable the account first",
                user.username
            ))),
        );
    }
    let link = match start_reset(app, user).await {
        Ok(link) => link,
        Err(e) => return back("/admin/accounts", Err(e)),
    };
    let admin = &session.auth.user.username;
    tracing::info!(user = %user.username, by = %admin, "password reset started");
    match mail_reset(app, user, &link, Some(admin)).await {
        Ok(()) => back(
            "/admin/accounts",
            Ok(format!(
                "a password reset link was mailed to {}",
                user.email
            )),
        ),
        Err(e) => {
            let flash = Flash {
                msg: Some(format!(
                    "the reset link for {} was not mailed ({e}): send them this link (it works for 24 hours): {link}",
                    user.username
                )),
                error: None,
            };
            accounts_view(app, session, flash).await
        }
    }
}

#[derive(Template)]
#[template(path = "forgot.html")]
struct ForgotPage {
    nav: Option<Nav>,
    flash: Flash,
    form_token: String,
    /// Mail can be sent (SMTP is set up).
    mail: bool,
}

fn forgot_view(app: &AppState, headers: &HeaderMap, flash: Flash) -> Response {
    visitor_page(app, headers, |form_token| ForgotPage {
        nav: None,
        flash,
        form_token,
        mail: app.settings.smtp.is_some(),
    })
}

/// `GET /reset`: "forgot your password?".
pub async fn forgot_page(State(app): State<AppState>, headers: HeaderMap) -> Response {
    forgot_view(&app, &headers, Flash::default())
}

#[derive(Deserialize)]
pub struct ForgotForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    login: String,
}

/// `POST /reset`: a reset link mailed to the account of a username or address. The answer
/// is the same whether there is one or not, and comes before the mail goes (its time says
/// nothing either); each account is mailed at most [`throttle::RESET_MAILS`] an hour.
pub async fn forgot(
    State(app): State<AppState>,
    peer: oauth::Peer,
    headers: HeaderMap,
    Form(form): Form<ForgotForm>,
) -> Response {
    if let Some(refused) = refuse_forged_visitor(&headers, &form.csrf) {
        return refused;
    }
    let login = form.login.trim().to_string();
    if login.is_empty() {
        let flash = Flash::error("your username or email address".into());
        return forgot_view(&app, &headers, flash);
    }
    let asking = app.clone();
    tokio::spawn(async move { mail_asked_reset(&asking, &login, peer.0).await });
    let flash = Flash {
        msg: Some(
            "If an account has this name or address, a link to set a new password is on its way to it (it works for 24 hours)."
                .into(),
        ),
        error: None,
    };
    forgot_view(&app, &headers, flash)
}

async fn mail_asked_reset(app: &AppState, login: &str, ip: Option<std::net::IpAddr>) {
    let user = match account_of(app, login).await {
        Ok(Some(user)) if !user.disabled => user,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(error = %e.msg, "password reset: account not read");
            return;
        }
    };
    if !throttle::reset_allowed(&*app.bus, &user.id, ip).await {
        tracing::warn!(user = %user.username, ip = ?ip, "password reset held: asked too often");
        return;
    }
    match start_reset(app, &user).await {
        Ok(link) => {
            tracing::info!(user = %user.username, "password reset asked");
            let _ = mail_reset(app, &user, &link, None).await;
        }
        Err(e) => tracing::warn!(error = %e.msg, "password reset not started"),
    }
}

/// The account of a reset link, if the link still works.
async fn reset_of(app: &AppState, user_id: &str, secret: &str) -> Result<User, ApiError> {
    let invalid = || {
        ApiError::not_found(
            "this reset link does not work: it was used, replaced by a newer one or expired; ask an admin for another",
        )
    };
    let user = account(app, user_id).await.map_err(|_| invalid())?;
    let works = user.reset.as_ref().is_some_and(|r| {
        auth::same_secret(&r.digest, &auth::digest(secret)) && r.expires_at > now_ms()
    });
    if !works || user.disabled {
        return Err(invalid());
    }
    Ok(user)
}

#[derive(Template)]
#[template(path = "reset.html")]
struct ResetPage {
    nav: Option<Nav>,
    flash: Flash,
    username: String,
    path: String,
    form_token: String,
}

async fn reset_view(
    app: &AppState,
    headers: &HeaderMap,
    (user_id, secret): (&str, &str),
    flash: Flash,
) -> Response {
    let user = match reset_of(app, user_id, secret).await {
        Ok(user) => user,
        Err(e) => return error_page(&e),
    };
    visitor_page(app, headers, |form_token| ResetPage {
        nav: None,
        flash,
        username: user.username,
        path: format!("/reset/{user_id}/{secret}"),
        form_token,
    })
}

/// `GET /reset/:user/:secret`.
pub async fn reset_page(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((user_id, secret)): Path<(String, String)>,
) -> Response {
    reset_view(&app, &headers, (&user_id, &secret), Flash::default()).await
}

#[derive(Deserialize)]
pub struct ResetForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    new: String,
    #[serde(default)]
    confirm: String,
}

/// `POST /reset/:user/:secret`: the new password (every session and token of the account
/// ends, the link too), then signed in.
pub async fn reset(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((user_id, secret)): Path<(String, String)>,
    Form(form): Form<ResetForm>,
) -> Response {
    if let Some(refused) = refuse_forged_visitor(&headers, &form.csrf) {
        return refused;
    }
    let set = async {
        let user = reset_of(&app, &user_id, &secret).await?;
        if form.new != form.confirm {
            return Err(ApiError::bad_request(
                "new password: the two entries differ",
            ));
        }
        oauth::check_new_password(&form.new)?;
        let hash = auth::hash_password(form.new).await?;
        app.documents.set_password(&user.id, &hash).await?;
        tracing::info!(user = %user.username, "password reset");
        Ok(user)
    }
    .await;
    match set {
        Ok(user) => sign_in(&app, &user.id, "/buckets").await,
        Err(e) => {
            let link = (user_id.as_str(), secret.as_str());
            let mut page = reset_view(&app, &headers, link, Flash::error(e.msg)).await;
            if page.status().is_success() {
                *page.status_mut() = e.status;
            }
            page
        }
    }
}
