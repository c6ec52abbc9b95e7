//! Bucket pages: the list, the live overview of servers and processes, and settings
//! (keys and link command, members and roles, servers, rename, delete).

use askama::Template;
use axum::Form;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::Value;

use super::{Flash, Flashes, Nav, WebSession, back, error_page, render};
use crate::api::Body;
use crate::api::buckets::{self as api, BucketAccess};
use crate::error::ApiError;
use km_core::app::AppState;
use km_core::fleet::{self, ProcessStatus, ServerStatus};
use km_core::limits::{self, Limit};
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

/// The command that links a server to the bucket.
pub fn link_command(app: &AppState, bucket: &Bucket) -> String {
    format!(
        "KEYMETRICS_NODE={} pm2 link {} {}",
        app.public_url, bucket.secret_id, bucket.public_id
    )
}

#[derive(Template)]
#[template(path = "buckets.html")]
struct ListPage {
    nav: Option<Nav>,
    buckets: Vec<Bucket>,
    flash: Flash,
}

pub async fn list(State(app): State<AppState>, session: WebSession, flash: Flashes) -> Response {
    let buckets = match app.documents.buckets_of_user(&session.auth.user.id).await {
        Ok(buckets) => buckets,
        Err(e) => return error_page(&e.into()),
    };
    let flash = flash.0;
    render(&ListPage {
        nav: Some(Nav::from(&session)),
        buckets,
        flash,
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

/// A process row as the overview and process pages show it.
pub struct ProcessRow {
    pub server: String,
    pub name: String,
    pub pm_id: i64,
    pub status: String,
    pub cpu: String,
    pub memory: String,
    pub restarts: i64,
    pub uptime: String,
    pub version: String,
}

/// A server as the overview and servers pages show it: its processes as rows of text.
pub struct ServerCard {
    pub name: String,
    pub online: bool,
    pub last_update: i64,
    pub pm2_version: String,
    pub node_version: String,
    pub hostname: String,
    pub processes: Vec<ProcessRow>,
}

pub fn memory_text(bytes: f64) -> String {
    const MB: f64 = 1024.0 * 1024.0;
    if bytes >= 1024.0 * MB {
        format!("{:.1} GB", bytes / (1024.0 * MB))
    } else {
        format!("{:.1} MB", bytes / MB)
    }
}

pub fn duration_text(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// A process as its server last reported it. The processes of an offline server are shown
/// `offline`, without CPU, memory or uptime: the last status says nothing of them now.
fn process_row(server: &str, server_online: bool, p: &ProcessStatus, now: i64) -> ProcessRow {
    let online = server_online && p.status == "online";
    let current = |shown: String| if server_online { shown } else { "-".into() };
    ProcessRow {
        server: server.to_string(),
        name: p.name.clone(),
        pm_id: p.pm_id.as_i64().unwrap_or(-1),
        status: if server_online {
            p.status.clone()
        } else {
            "offline".into()
        },
        cpu: current(format!("{}%", p.cpu)),
        memory: current(memory_text(p.memory)),
        restarts: p.restart_time,
        uptime: if online && p.pm_uptime > 0 {
            duration_text(now - p.pm_uptime)
        } else {
            "-".into()
        },
        version: (p.version.as_deref())
            .or(p.revision())
            .map(|v| v.chars().take(12).collect())
            .unwrap_or_default(),
    }
}

/// A server's card from its status.
pub fn card(server: &ServerStatus, now: i64) -> ServerCard {
    let host = &server.data.server;
    ServerCard {
        name: server.server_name.clone(),
        online: server.online,
        last_update: server.last_update,
        pm2_version: host.pm2_version.clone(),
        node_version: host.node_version.clone(),
        hostname: host.hostname.clone(),
        processes: (server.data.process.iter())
            .map(|p| process_row(&server.server_name, server.online, p, now))
            .collect(),
    }
}

/// Every server of the bucket with its processes, by name.
pub async fn server_cards(app: &AppState, bucket_id: &str) -> Vec<ServerCard> {
    let now = km_stores::ids::now_ms();
    (fleet::servers(app, bucket_id, None).await.iter())
        .map(|server| card(server, now))
        .collect()
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    nav: Option<Nav>,
    bucket: Bucket,
    servers: Vec<ServerCard>,
    link: String,
    flash: Flash,
    licence: LicenceBanner,
}

/// The licence's usage above the servers: `N of M processes`, or why servers are parked.
struct LicenceBanner {
    /// `N of M processes`, `N processes (unlicensed)`…
    usage: String,
    /// At or over the limit, or the licence not valid.
    alert: Option<String>,
    /// This bucket's parked servers: name and reason.
    parked: Vec<(String, String)>,
}

impl LicenceBanner {
    async fn of(app: &AppState, bucket_id: &str) -> LicenceBanner {
        let usage = match limits::usage(app, Some(bucket_id)).await {
            Ok(usage) => usage,
            Err(e) => {
                return LicenceBanner {
                    usage: format!("process usage unavailable: {e}"),
                    alert: None,
                    parked: Vec::new(),
                };
            }
        };
        let n = usage.processes;
        let (text, alert) = match &usage.limit {
            Limit::Unlicensed => (format!("{n} processes · unlicensed: no limit applies"), None),
            Limit::Unlimited => (format!("{n} processes · licence without limit"), None),
            Limit::Processes { max } => (
                format!("{n} of {max} processes"),
                (n >= *max).then(|| {
                    format!("The licence's limit of {max} processes is reached: servers that link now are parked until processes are removed or a larger licence is installed.")
                }),
            ),
            Limit::Invalid { reason } => (
                format!("{n} processes"),
                Some(format!("No new server can link: {reason}.")),
            ),
        };
        LicenceBanner {
            usage: text,
            alert,
            parked: usage
                .parked
                .into_iter()
                .map(|p| (p.server_name, p.reason))
                .collect(),
        }
    }
}

pub async fn overview(
    State(app): State<AppState>,
    session: WebSession,
    Path(id): Path<String>,
    flash: Flashes,
) -> Response {
    let access = match access(&app, &session, &id).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let flash = flash.0;
    render(&OverviewPage {
        nav: Some(Nav::from(&session)),
        servers: server_cards(&app, &access.bucket.id).await,
        link: link_command(&app, &access.bucket),
        licence: LicenceBanner::of(&app, &access.bucket.id).await,
        bucket: access.bucket,
        flash,
    })
}

#[derive(Template)]
#[template(path = "settings.html")]
struct SettingsPage {
    nav: Option<Nav>,
    bucket: Bucket,
    role: MemberRole,
    link: String,
    members: Vec<Member>,
    servers: Vec<ServerCard>,
    flash: Flash,
}

pub async fn settings(
    State(app): State<AppState>,
    session: WebSession,
    Path(id): Path<String>,
    flash: Flashes,
) -> Response {
    let access = match access(&app, &session, &id).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let members = match app.documents.bucket_members(&access.bucket.id).await {
        Ok(members) => members,
        Err(e) => return error_page(&e.into()),
    };
    let flash = flash.0;
    render(&SettingsPage {
        nav: Some(Nav::from(&session)),
        servers: server_cards(&app, &access.bucket.id).await,
        link: link_command(&app, &access.bucket),
        members,
        role: access.role,
        bucket: access.bucket,
        flash,
    })
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
    /// `true` to refuse the bucket's agents, `false` to admit them again.
    #[serde(default)]
    disabled: String,
}

/// The settings forms: each runs the API route of the same purpose, with its checks.
pub async fn settings_action(
    State(app): State<AppState>,
    session: WebSession,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<SettingsForm>,
) -> Response {
    if let Some(refused) = session.refuse_forged(&form.csrf) {
        return refused;
    }
    let access = match access(&app, &session, &id).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let page = format!("/buckets/{id}/settings");
    let member = || {
        Body(
            serde_json::from_value::<api::MemberForm>(serde_json::json!({
                "email": form.email, "role": form.role,
            }))
            .unwrap_or_default(),
        )
    };
    let state = State(app.clone());
    let outcome: Result<String, ApiError> = match action.as_str() {
        "rename" => api::update(
            state,
            access,
            Body(api::UpdateForm {
                name: Some(form.name.clone()),
                disabled: None,
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
                    name: None,
                    disabled: Some(Value::Bool(disabled)),
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
        "add_member" => api::add_member(state, access, member())
            .await
            .map(|_| format!("{} added", form.email)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_offline_servers_processes_are_not_shown_online() {
        let p: ProcessStatus = serde_json::from_value(json!({"name": "api", "pm_id": 1,
            "status": "online", "cpu": 3, "memory": 1048576, "restart_time": 2, "pm_uptime": 1_000}))
        .unwrap();
        let live = process_row("web-1", true, &p, 61_000);
        assert_eq!(
            (
                live.status.as_str(),
                live.cpu.as_str(),
                live.uptime.as_str()
            ),
            ("online", "3%", "1m")
        );
        let gone = process_row("web-1", false, &p, 61_000);
        assert_eq!(
            (
                gone.status.as_str(),
                gone.cpu.as_str(),
                gone.memory.as_str(),
                gone.uptime.as_str()
            ),
            ("offline", "-", "-", "-")
        );
        assert_eq!(gone.restarts, 2);
    }
}
