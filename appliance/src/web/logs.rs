//! The log explorer: a bucket's stored log lines across apps and servers, filtered by
//! app, server, instance, stream, text and time, newest first; the script follows new
//! lines live with the same filters.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use super::buckets::access;
use super::process::text_of;
use super::{Flash, Nav, WebSession, error_page, render};
use km_core::app::AppState;
use km_core::fleet::{self, page_path};
use km_stores::ids::now_ms;
use km_stores::{Bucket, EventKind, EventQuery};

/// The time windows of the explorer: (minutes, label); 0 is everything kept.
pub const LOG_WINDOWS: [(i64, &str); 5] = [
    (15, "last 15 minutes"),
    (60, "last hour"),
    (1440, "last 24 hours"),
    (10080, "last 7 days"),
    (0, "everything kept"),
];

/// Lines the explorer shows at once.
pub const EXPLORER_LINES: u32 = 300;

/// The filters, as the form sends them (empty: any).
#[derive(Deserialize, Default)]
pub struct LogFilter {
    #[serde(default)]
    app: String,
    #[serde(default)]
    server: String,
    /// An instance (pm_id).
    #[serde(default)]
    pm_id: String,
    /// `out` or `err`.
    #[serde(default)]
    stream: String,
    #[serde(default)]
    q: String,
    /// Minutes back (0 or absent: everything kept).
    #[serde(default)]
    since: Option<i64>,
    #[serde(flatten)]
    flash: Flash,
}

impl LogFilter {
    fn query(&self, bucket_id: &str, now: i64) -> EventQuery {
        let some = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        EventQuery {
            bucket_id: bucket_id.to_string(),
            app_name: some(&self.app),
            server_name: some(&self.server),
            event_type: some(&self.stream),
            name: some(&self.pm_id),
            text: some(&self.q),
            after: (self.since)
                .filter(|m| *m > 0)
                .map(|m| now - m.saturating_mul(60_000)),
            limit: EXPLORER_LINES,
            ..EventQuery::default()
        }
    }
}

/// A stored line with where it came from.
pub struct ExplorerLine {
    pub at: i64,
    pub server: String,
    pub app: String,
    pub pm_id: String,
    /// `out` or `err`.
    pub stream: String,
    pub text: String,
    /// The process page of its app on its server.
    pub path: String,
}

impl ExplorerLine {
    fn of(doc: &Value, bucket_id: &str) -> ExplorerLine {
        let text = |field: &str| text_of(&doc[field]);
        let (server, app) = (text("server_name"), text("app_name"));
        ExplorerLine {
            at: doc["at"].as_i64().unwrap_or(0),
            path: page_path(bucket_id, &server, &app),
            pm_id: text("pm_id"),
            stream: if text("log_type") == "err" {
                "err"
            } else {
                "out"
            }
            .into(),
            text: text("data").trim_end_matches(['\n', '\r']).to_string(),
            server,
            app,
        }
    }
}

#[derive(Template)]
#[template(path = "logs.html")]
struct LogsPage {
    nav: Option<Nav>,
    bucket: Bucket,
    filter: LogFilter,
    /// The apps and servers to pick from: those linked now, and the filter's own.
    apps: Vec<String>,
    servers: Vec<String>,
    windows: [(i64, &'static str); 5],
    /// The window chosen, in minutes (0: everything kept).
    since: i64,
    lines: Vec<ExplorerLine>,
    limit: u32,
    flash: Flash,
}

/// `/buckets/:id/logs`.
pub async fn page(
    State(app): State<AppState>,
    session: WebSession,
    Path(id): Path<String>,
    Query(mut filter): Query<LogFilter>,
) -> Response {
    let access = match access(&app, &session, &id).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let bucket_id = &access.bucket.id;
    let query = filter.query(bucket_id, now_ms());
    let docs = match app.events.query(EventKind::Log, &query).await {
        Ok(docs) => docs,
        Err(e) => return error_page(&e.into()),
    };
    let lines = (docs.iter())
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .map(|d| ExplorerLine::of(&d, bucket_id))
        .collect();
    let statuses = fleet::servers(&app, bucket_id, None).await;
    let mut servers: Vec<String> = statuses.iter().map(|s| s.server_name.clone()).collect();
    let mut apps: Vec<String> = (statuses.iter())
        .flat_map(|s| s.data.process.iter().map(|p| p.name.clone()))
        .collect();
    for (list, chosen) in [(&mut apps, &filter.app), (&mut servers, &filter.server)] {
        if !chosen.is_empty() {
            list.push(chosen.clone());
        }
        list.sort();
        list.dedup();
    }
    render(&LogsPage {
        nav: Some(Nav::from(&session)),
        flash: std::mem::take(&mut filter.flash),
        apps,
        servers,
        windows: LOG_WINDOWS,
        since: filter.since.unwrap_or(0),
        lines,
        limit: EXPLORER_LINES,
        filter,
        bucket: access.bucket,
    })
}
