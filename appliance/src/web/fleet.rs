//! The fleet pages: a bucket's overview (problems first, its apps across servers, its
//! servers' hosts, and each server's processes live) and a server's page (its host and
//! its processes).

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Response;

use super::buckets::{access, link_command};
use super::sparks::{self, BucketSteps, Spark};
use super::{Flash, Flashes, Nav, WebSession, error_page, render};
use crate::api::buckets::BucketAccess;
use crate::error::ApiError;
use km_core::app::AppState;
use km_core::fleet::{self, ProcessStatus, ServerStatus, page_path, server_path};
use km_core::health::{self, AppHealth, Fleet, HostHealth, Problem, ProblemKind};
use km_core::limits::{self, Limit};
use km_stores::ids::now_ms;
use km_stores::{Bucket, HOST_MONITOR_SERIES, HOST_MONITORS};

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
    let now = now_ms();
    (fleet::servers(app, bucket_id, None).await.iter())
        .map(|server| card(server, now))
        .collect()
}

/// An app across the bucket's servers, as text.
pub struct AppRow {
    pub name: String,
    /// Its process page on each of its servers: (server, path).
    pub servers: Vec<(String, String)>,
    pub instances: usize,
    pub online: usize,
    pub errored: usize,
    pub cpu: String,
    pub memory: String,
    pub restarts: i64,
    pub troubled: bool,
    /// The last hour of its CPU and memory, ending now.
    pub cpu_spark: Option<Spark>,
    pub memory_spark: Option<Spark>,
}

impl AppRow {
    fn of(app: &AppHealth, bucket_id: &str, stored: &BucketSteps) -> AppRow {
        let steps = stored.apps.get(&app.name).cloned().unwrap_or_default();
        let since = stored.since;
        AppRow {
            cpu_spark: sparks::line(&steps.cpu, (since, app.cpu), "CPU", |v| format!("{v:.0}%")),
            memory_spark: sparks::line(&steps.memory, (since, app.memory), "Memory", memory_text),
            name: app.name.clone(),
            servers: (app.servers.iter())
                .map(|s| (s.clone(), page_path(bucket_id, s, &app.name)))
                .collect(),
            instances: app.instances,
            online: app.online,
            errored: app.errored,
            cpu: format!("{:.0}%", app.cpu),
            memory: memory_text(app.memory),
            restarts: app.restarts,
            troubled: app.troubled,
        }
    }
}

/// A server's host, as text.
pub struct HostRow {
    pub name: String,
    pub path: String,
    pub online: bool,
    pub last_update: i64,
    pub hostname: String,
    pub platform: String,
    pub versions: String,
    pub uptime: String,
    /// `0.52 · 0.31 · 0.20`, or `-` when the agent sent none.
    pub load: String,
    /// What its processes use, and of how much.
    pub memory: String,
    pub cpu: String,
    pub processes: usize,
}

impl HostRow {
    fn of(host: &HostHealth, bucket_id: &str) -> HostRow {
        let current = |shown: String| if host.online { shown } else { "-".into() };
        HostRow {
            name: host.name.clone(),
            path: server_path(bucket_id, &host.name),
            online: host.online,
            last_update: host.last_update,
            hostname: host.hostname.clone(),
            platform: host.platform.clone(),
            versions: format!("PM2 {} · Node {}", host.pm2_version, host.node_version),
            uptime: current(duration_text((host.uptime_s * 1000.0) as i64)),
            load: current(match host.loadavg {
                Some([one, five, fifteen]) => format!("{one:.2} · {five:.2} · {fifteen:.2}"),
                None => "-".into(),
            }),
            memory: current(if host.total_mem > 0.0 {
                format!(
                    "{} of {}",
                    memory_text(host.memory),
                    memory_text(host.total_mem)
                )
            } else {
                memory_text(host.memory)
            }),
            cpu: current(format!("{:.0}%", host.cpu)),
            processes: host.processes,
        }
    }
}

/// A problem, as text with where to look.
pub struct ProblemRow {
    /// `offline`, `errored` or `loop` (a class and a test hook).
    pub kind: &'static str,
    pub label: &'static str,
    pub what: String,
    pub path: String,
    pub detail: String,
    pub since: Option<i64>,
}

impl ProblemRow {
    fn of(problem: &Problem, bucket_id: &str) -> ProblemRow {
        let (kind, label) = match problem.kind {
            ProblemKind::Offline => ("offline", "offline"),
            ProblemKind::Errored => ("errored", "errored"),
            ProblemKind::RestartLoop => ("loop", "restart loop"),
        };
        let (what, path) = match &problem.app {
            Some(app) => (
                format!("{app} on {}", problem.server),
                page_path(bucket_id, &problem.server, app),
            ),
            None => (
                problem.server.clone(),
                server_path(bucket_id, &problem.server),
            ),
        };
        ProblemRow {
            kind,
            label,
            what,
            path,
            detail: problem.detail.clone(),
            since: problem.since,
        }
    }
}

/// The fleet as the overview shows it.
pub struct FleetView {
    pub problems: Vec<ProblemRow>,
    pub apps: Vec<AppRow>,
    pub hosts: Vec<HostRow>,
}

impl FleetView {
    pub fn of(fleet: &Fleet, bucket_id: &str, sparks: &BucketSteps) -> FleetView {
        FleetView {
            problems: (fleet.problems.iter())
                .map(|p| ProblemRow::of(p, bucket_id))
                .collect(),
            apps: fleet
                .apps
                .iter()
                .map(|a| AppRow::of(a, bucket_id, sparks))
                .collect(),
            hosts: fleet
                .hosts
                .iter()
                .map(|h| HostRow::of(h, bucket_id))
                .collect(),
        }
    }
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    nav: Option<Nav>,
    bucket: Bucket,
    fleet: FleetView,
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
    let bucket_id = &access.bucket.id;
    let now = now_ms();
    let servers = fleet::servers(&app, bucket_id, None).await;
    let stored = tokio::try_join!(
        health::crashes(app.events.as_ref(), bucket_id, now),
        sparks::of_bucket(&app, bucket_id),
    );
    let (crashes, sparks) = match stored {
        Ok(stored) => stored,
        Err(e) => return error_page(&e.into()),
    };
    let flash = flash.0;
    render(&OverviewPage {
        nav: Some(Nav::from(&session)),
        fleet: FleetView::of(&Fleet::of(&servers, crashes), bucket_id, &sparks),
        servers: servers.iter().map(|s| card(s, now)).collect(),
        link: link_command(&app, &access.bucket),
        licence: LicenceBanner::of(&app, bucket_id).await,
        bucket: access.bucket,
        flash,
    })
}

/// A bucket the signed-in user belongs to and its server `name`, or the error page
/// (404 for a bucket of others or a server it does not have).
pub async fn one_server(
    app: &AppState,
    session: &WebSession,
    id: &str,
    name: &str,
) -> Result<(BucketAccess, ServerStatus), Response> {
    let access = access(app, session, id).await?;
    let servers = fleet::servers(app, &access.bucket.id, Some(name)).await;
    match servers.into_iter().next() {
        Some(status) => Ok((access, status)),
        None => Err(error_page(&ApiError::not_found(format!(
            "no server {name:?} in this bucket"
        )))),
    }
}

#[derive(Template)]
#[template(path = "server.html")]
struct ServerPage {
    nav: Option<Nav>,
    bucket: Bucket,
    host: HostRow,
    card: ServerCard,
    /// The host series charted: `load|cpu|memory`, and the monitoring module's when one
    /// runs there.
    charts: String,
    flash: Flash,
}

/// `/buckets/:id/servers/:server`: the host (its figures now and charted) and its
/// processes, live.
pub async fn server_page(
    State(app): State<AppState>,
    session: WebSession,
    Path((id, server)): Path<(String, String)>,
    flash: Flashes,
) -> Response {
    let (access, status) = match one_server(&app, &session, &id, &server).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    // One host per server: the default is never shown.
    let fleet = Fleet::of(std::slice::from_ref(&status), Default::default());
    let host = fleet.hosts.into_iter().next().unwrap_or_default();
    let mut charts = vec!["load", "cpu", "memory"];
    if (status.data.process.iter()).any(|p| HOST_MONITORS.contains(&p.name.as_str())) {
        charts.extend(HOST_MONITOR_SERIES);
    }
    render(&ServerPage {
        nav: Some(Nav::from(&session)),
        host: HostRow::of(&host, &access.bucket.id),
        card: card(&status, now_ms()),
        charts: charts.join("|"),
        bucket: access.bucket,
        flash: flash.0,
    })
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
