//! The wizard's pages under `/wizard/`. Every route but the reachability probe needs the
//! setup token (`?token=` once, then an HttpOnly cookie); without it the answer is a bare
//! 403, and an address that keeps guessing waits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use askama::Template;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, SET_COOKIE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use parking_lot::Mutex;
use serde::Deserialize;

use crate::apply::{self, Plan, Progress, SharedProgress, Target};
use crate::form::{self, SettingsForm};
use crate::token::{Attempts, StateDir};
use km::gateway::proxy::client_ip;
use km_config::envfile;
use km_setup::checks::Status;
use km_setup::validate;
use km_tls::challenge::Challenges;

const COOKIE_NAME: &str = "km_wizard";
const CSP: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'";

pub struct Wizard {
    pub target: Arc<Target>,
    pub attempts: Attempts,
    pub progress: SharedProgress,
    running: AtomicBool,
    /// The token that started the last apply: it may still read the progress after
    /// the wizard locked itself.
    applied_with: Mutex<Option<String>>,
    /// Served at [`PROBE_PATH`]: finding it through the site URL proves the URL reaches
    /// this machine.
    probe_nonce: String,
    /// HTTP-01 answers for the ACME trial order.
    challenges: Challenges,
    /// The SMTP settings and recipient a Check already sent a test mail with: the apply
    /// of the same does not send another.
    mailed: Mutex<Option<String>>,
    /// The form of an apply that failed (secrets out): "Back to the settings" shows it.
    draft: Mutex<Option<SettingsForm>>,
}

/// Where the site URL check looks for this wizard.
pub const PROBE_PATH: &str = "/.well-known/km-setup-probe";

pub type WizardState = Arc<Wizard>;

impl Wizard {
    pub fn new(target: Target) -> WizardState {
        Arc::new(Wizard {
            target: Arc::new(target),
            attempts: Attempts::default(),
            progress: SharedProgress::default(),
            running: AtomicBool::new(false),
            applied_with: Mutex::new(None),
            probe_nonce: crate::token::random_hex(16),
            challenges: Challenges::default(),
            mailed: Mutex::new(None),
            draft: Mutex::new(None),
        })
    }

    /// The live checks' options: the probe and ACME answers this wizard serves.
    fn options(&self, plan: &Plan, only: Option<String>) -> validate::Options {
        let mailed = self.mailed.lock().clone();
        let already_mailed = only.is_none() && mailed.is_some() && mailed == mail_key(plan);
        validate::Options {
            test_mail_to: plan.test_mail_to.clone().filter(|_| !already_mailed),
            only,
            probe: Some((PROBE_PATH.to_string(), self.probe_nonce.clone())),
            challenges: Some(self.challenges.clone()),
            smtp_extra_ca: None,
        }
    }

    fn state(&self) -> &StateDir {
        &self.target.state
    }
}

pub fn router(wizard: WizardState) -> Router {
    // Open to anyone: a random nonce and ACME answers reveal nothing.
    let open = Router::new()
        .route(
            PROBE_PATH,
            get(|State(w): State<WizardState>| async move { w.probe_nonce.clone() }),
        )
        .route("/wizard/reopen", post(reopen_for_admin))
        .with_state(wizard.clone())
        .merge(wizard.challenges.routes());
    let guarded = Router::new()
        .route("/wizard", get(|| async { Redirect::to("/wizard/") }))
        .route("/wizard/", get(page))
        .route("/wizard/check/{section}", post(check))
        .route("/wizard/apply", post(start_apply))
        .route("/wizard/progress", get(progress_page))
        .route("/wizard/progress.json", get(progress_json))
        .route("/wizard/assets/wizard.js", get(script))
        .route("/wizard/assets/wizard.css", get(style))
        .layer(middleware::from_fn_with_state(wizard.clone(), guard))
        .with_state(wizard);
    open.merge(guarded).fallback(|| async { forbidden() })
}

/// The answer without the current token: what to do, nothing about the wizard itself.
pub const FORBIDDEN: &str = "This page needs the setup link with its one-time token. The link is printed on \
the appliance's serial console and by `sudo journalctl -u km-wizard`; `sudo km-wizard reopen` \
makes a new one (links expire after 24 hours).\n";

fn forbidden() -> Response {
    (StatusCode::FORBIDDEN, FORBIDDEN).into_response()
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.to_string())
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Lets a request through only with the current token (query or cookie); a token in the
/// query becomes the cookie and leaves the address bar.
async fn guard(
    State(wizard): State<WizardState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<TokenQuery>,
    request: Request,
    next: Next,
) -> Response {
    let ip = client_ip(peer, request.headers());
    if wizard.attempts.blocked(ip) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many attempts: wait ten minutes\n",
        )
            .into_response();
    }
    let from_cookie = cookie_token(request.headers());
    let given = query.token.clone().or_else(|| from_cookie.clone());
    // While locked, the token of the apply that locked it still reads the progress (the
    // page's last refresh comes after the lock) and its stylesheet; not after a reopen.
    let path = request.uri().path();
    let progress_after_lock = (path.starts_with("/wizard/progress")
        || path.starts_with("/wizard/assets/"))
        && given.is_some()
        && *wizard.applied_with.lock() == given
        && wizard.state().is_locked();
    if !progress_after_lock && let Err(refusal) = wizard.state().check(given.as_deref()) {
        tracing::warn!(%ip, ?refusal, path = %request.uri().path(), "wizard: refused");
        wizard.attempts.failed(ip);
        return forbidden();
    }
    if let Some(token) = query.token
        && from_cookie.as_deref() != Some(token.as_str())
    {
        // Lax: a setup link followed from another site (a mail, a chat) keeps its cookie
        // through this redirect; other sites' forms still cannot post with it.
        let cookie = format!("{COOKIE_NAME}={token}; Path=/wizard; HttpOnly; SameSite=Lax");
        let mut response = Redirect::to(request.uri().path()).into_response();
        if let Ok(cookie) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(SET_COOKIE, cookie);
        }
        return response;
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Deserialize)]
struct ReopenForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /wizard/reopen` through km's site URL, from the dashboard's account page: an
/// admin's session (its cookie comes along, same origin; the form carries the session's
/// CSRF token, so another site cannot make the admin's browser do it) opens the wizard
/// with a new token.
async fn reopen_for_admin(
    State(wizard): State<WizardState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<ReopenForm>,
) -> Response {
    let ip = client_ip(peer, &headers);
    if wizard.attempts.blocked(ip) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many attempts: wait ten minutes\n",
        )
            .into_response();
    }
    let forged = km::auth::session_cookie(&headers)
        .is_none_or(|session| !km::auth::csrf_matches(session, Some(&form.csrf)));
    let Some(cookie) = headers.get(COOKIE).cloned().filter(|_| !forged) else {
        wizard.attempts.failed(ip);
        return forbidden();
    };
    let entries: Vec<(String, String)> = current_env(&wizard).into_iter().collect();
    let url = format!("{}/api/users/isLogged", crate::services::api_base(&entries));
    let Ok(http) = crate::services::api_client() else {
        return forbidden();
    };
    let user: serde_json::Value = match http.get(&url).header(COOKIE, cookie).send().await {
        Ok(answer) if answer.status().is_success() => answer.json().await.unwrap_or_default(),
        _ => serde_json::Value::Null,
    };
    if user["role"] != "admin" {
        wizard.attempts.failed(ip);
        return forbidden();
    }
    match wizard.state().issue() {
        Ok(token) => {
            tracing::info!(admin = %user["username"], "wizard reopened by an admin session");
            Redirect::to(&format!("/wizard/?token={token}")).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot write a new setup token");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot reopen the wizard",
            )
                .into_response()
        }
    }
}

fn html(page: &impl Template) -> Response {
    match page.render() {
        Ok(body) => ([(CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "wizard page cannot be rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, "page cannot be rendered").into_response()
        }
    }
}

/// The env file as it is now (empty at first boot).
fn current_env(wizard: &Wizard) -> BTreeMap<String, String> {
    std::fs::read_to_string(&wizard.target.env_file)
        .ok()
        .and_then(|text| envfile::parse(&text).ok())
        .map(|entries| entries.into_iter().collect())
        .unwrap_or_default()
}

#[derive(Template)]
#[template(path = "wizard.html")]
struct WizardPage {
    form: SettingsForm,
    env_file: String,
    reconfigure: bool,
    /// The form shows what a failed apply was given, not the settings in use.
    draft: bool,
}

async fn page(State(wizard): State<WizardState>) -> Response {
    let current = current_env(&wizard);
    let draft = wizard.draft.lock().clone();
    html(&WizardPage {
        reconfigure: wizard.state().was_applied(),
        draft: draft.is_some(),
        form: draft.unwrap_or_else(|| SettingsForm::from_env(&current)),
        env_file: wizard.target.env_file.display().to_string(),
    })
}

/// `POST /wizard/check/<section>`: the live checks of one part of the form.
async fn check(
    State(wizard): State<WizardState>,
    Path(section): Path<String>,
    Form(submitted): Form<SettingsForm>,
) -> Response {
    let plan = match form::plan(&submitted, &current_env(&wizard), &wizard.target.pem_dir) {
        Ok(plan) => plan,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": e})),
            )
                .into_response();
        }
    };
    let options = wizard.options(&plan, Some(section));
    let found = validate::all(&plan.env, &options).await;
    let mailed = found
        .iter()
        .any(|c| c.setting.starts_with("SMTP") && c.status == Status::Ok);
    if mailed && options.test_mail_to.is_some() {
        *wizard.mailed.lock() = mail_key(&plan);
    }
    form::discard_uploads(&plan.env, &current_env(&wizard), &wizard.target.pem_dir);
    Json(found).into_response()
}

/// What identifies a test mail: the SMTP settings and the recipient.
fn mail_key(plan: &Plan) -> Option<String> {
    use sha2::Digest;
    let to = plan.test_mail_to.as_deref()?;
    let mut hasher = sha2::Sha256::new();
    for (k, v) in plan.env.iter().filter(|(k, _)| k.starts_with("SMTP_")) {
        hasher.update(format!("{k}={v}\n"));
    }
    hasher.update(to);
    Some(hex::encode(hasher.finalize()))
}

/// `POST /wizard/apply`: starts the apply and shows its progress.
async fn start_apply(
    State(wizard): State<WizardState>,
    headers: HeaderMap,
    Form(submitted): Form<SettingsForm>,
) -> Response {
    let plan: Plan = match form::plan(&submitted, &current_env(&wizard), &wizard.target.pem_dir) {
        Ok(plan) => plan,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    if wizard.running.swap(true, Ordering::SeqCst) {
        return (StatusCode::CONFLICT, "an apply is already running\n").into_response();
    }
    *wizard.applied_with.lock() = cookie_token(&headers);
    *wizard.draft.lock() = None;
    apply::reset(&wizard.progress);
    let job = wizard.clone();
    tokio::spawn(async move {
        let options = job.options(&plan, None);
        let env = plan.env.clone();
        let outcome = apply::apply(&job.target, plan, options, &job.progress).await;
        match &outcome {
            Ok(()) => tracing::info!("wizard: settings applied, wizard locked"),
            Err(why) => {
                tracing::warn!(%why, "wizard: apply failed");
                let current = current_env(&job);
                form::discard_uploads(&env, &current, &job.target.pem_dir);
                if !job.progress.lock().applied() {
                    *job.draft.lock() = Some(submitted.draft(&current));
                }
            }
        }
        job.running.store(false, Ordering::SeqCst);
    });
    Redirect::to("/wizard/progress").into_response()
}

#[derive(Template)]
#[template(path = "progress.html")]
struct ProgressPage {
    progress: Progress,
}

async fn progress_page(State(wizard): State<WizardState>) -> Response {
    let progress = wizard.progress.lock().clone();
    html(&ProgressPage { progress })
}

async fn progress_json(State(wizard): State<WizardState>) -> Json<Progress> {
    Json(wizard.progress.lock().clone())
}

async fn script() -> Response {
    (
        [(CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/wizard.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../assets/wizard.css"),
    )
        .into_response()
}
