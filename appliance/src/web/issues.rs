//! The issues inbox of a bucket (every app, open ones first by default, sorted by last
//! seen or count) and an issue's page (its occurrences over time, stack, context, last
//! logs, where it happened) with resolve, ignore and reopen.

use std::collections::BTreeSet;

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use super::buckets::{access, form_access};
use super::{Flash, Nav, WebSession, back, error_page, render};
use crate::api::Body;
use crate::api::insights::{self, StateForm};
use km_core::app::AppState;
use km_core::fleet::page_path;
use km_core::issues::{Issue, IssueState, Triage, grouped, issue_path, triaged};
use km_stores::ids::now_ms;
use km_stores::{Bucket, EventKind, EventQuery, MemberRole};
use km_workers::reporter::{self, Series};

/// Exceptions the inbox groups (the newest).
pub const WINDOW: u32 = km_core::issues::ISSUE_WINDOW;

/// The inbox's choices, as its form sends them.
#[derive(Deserialize, Default)]
pub struct InboxQuery {
    /// `open` (default), `resolved`, `ignored` or `all`.
    #[serde(default)]
    state: String,
    /// `last` (default: last seen first) or `count`.
    #[serde(default)]
    sort: String,
    #[serde(default)]
    app: String,
    #[serde(flatten)]
    flash: Flash,
}

#[derive(Template)]
#[template(path = "issues.html")]
struct InboxPage {
    nav: Option<Nav>,
    bucket: Bucket,
    issues: Vec<Issue>,
    /// How many of each state, for the tabs: (state, label, count).
    tabs: Vec<(&'static str, &'static str, usize)>,
    state: String,
    sort: String,
    app: String,
    apps: Vec<String>,
    flash: Flash,
}

/// `/buckets/:id/issues`.
pub async fn inbox(
    State(app): State<AppState>,
    session: WebSession,
    Path(id): Path<String>,
    Query(mut query): Query<InboxQuery>,
) -> Response {
    let access = match access(&app, &session, &id).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let scope = EventQuery {
        bucket_id: access.bucket.id.clone(),
        ..EventQuery::default()
    };
    let all = match insights::triaged_issues(&app, scope).await {
        Ok(all) => all,
        Err(e) => return error_page(&e),
    };
    let apps: BTreeSet<String> = all.iter().filter_map(|i| i.app_name.clone()).collect();
    let state = match query.state.as_str() {
        "" => "open",
        given => IssueState::parse(given).map_or("all", IssueState::as_str),
    };
    let count = |s: IssueState| all.iter().filter(|i| i.state == s).count();
    let tabs = vec![
        ("open", "Open", count(IssueState::Open)),
        ("resolved", "Resolved", count(IssueState::Resolved)),
        ("ignored", "Ignored", count(IssueState::Ignored)),
        ("all", "All", all.len()),
    ];
    let mut issues: Vec<Issue> = (all.into_iter())
        .filter(|i| state == "all" || i.state.as_str() == state)
        .filter(|i| query.app.is_empty() || i.app_name.as_deref() == Some(&query.app))
        .collect();
    let sort = if query.sort == "count" {
        "count"
    } else {
        "last"
    };
    if sort == "count" {
        issues.sort_by_key(|i| std::cmp::Reverse(i.count));
    }
    render(&InboxPage {
        nav: Some(Nav::from(&session)),
        bucket: access.bucket,
        issues,
        tabs,
        state: state.to_string(),
        sort: sort.to_string(),
        app: std::mem::take(&mut query.app),
        apps: apps.into_iter().collect(),
        flash: query.flash,
    })
}

/// Where an issue happened: a server and the instances there.
pub struct Place {
    pub server: String,
    pub path: String,
    pub pm_ids: String,
}

#[derive(Template)]
#[template(path = "issue.html")]
struct IssuePage {
    nav: Option<Nav>,
    bucket: Bucket,
    role: MemberRole,
    issue: Issue,
    /// Occurrences per step of the last days, as an SVG bar chart.
    chart: String,
    chart_title: String,
    places: Vec<Place>,
    path: String,
    flash: Flash,
}

/// Days and step of an issue's occurrence chart.
const CHART_DAYS: i64 = 7;
const CHART_STEP_MS: i64 = 3 * 3_600_000;

/// `/buckets/:id/issues/:identifier`.
pub async fn page(
    State(app): State<AppState>,
    session: WebSession,
    Path((id, identifier)): Path<(String, String)>,
    Query(flash): Query<Flash>,
) -> Response {
    let access = match access(&app, &session, &id).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let bucket_id = access.bucket.id.clone();
    let scope = EventQuery {
        bucket_id: bucket_id.clone(),
        name: Some(identifier.clone()),
        ..EventQuery::default()
    };
    let end = now_ms();
    let start = end - CHART_DAYS * 86_400_000;
    let since = EventQuery {
        after: Some(start),
        ..scope.clone()
    };
    // One read of its newest occurrences: the issue and where it happened.
    let occurrences = EventQuery {
        limit: WINDOW,
        ..scope.clone()
    };
    let read = tokio::try_join!(
        async { Ok(app.events.query(EventKind::Exception, &occurrences).await?) },
        async {
            Ok(app
                .events
                .count_histogram(EventKind::Exception, &since, CHART_STEP_MS)
                .await?)
        },
        async { Ok(Triage::all(app.documents.as_ref(), &bucket_id).await?) },
    );
    let (docs, steps, decisions): (_, _, _) = match read {
        Ok(read) => read,
        Err(e) => return error_page(&e),
    };
    let mut issues = grouped(&docs);
    triaged(&mut issues, &decisions);
    let Some(issue) = issues.into_iter().next() else {
        return error_page(&crate::error::ApiError::not_found(format!(
            "no issue {identifier:?} in this bucket (its exceptions may have aged out)"
        )));
    };
    let series = Series {
        title: "Occurrences".into(),
        unit: String::new(),
        points: steps.into_iter().map(|(at, n)| (at, n as f64)).collect(),
    };
    render(&IssuePage {
        nav: Some(Nav::from(&session)),
        chart: reporter::svg(&series, start, end, CHART_STEP_MS),
        chart_title: format!(
            "Occurrences of the last {CHART_DAYS} days, per {} hours",
            CHART_STEP_MS / 3_600_000
        ),
        places: places(
            &docs,
            &bucket_id,
            issue.app_name.as_deref().unwrap_or_default(),
        ),
        path: issue_path(&bucket_id, &identifier),
        role: access.role,
        bucket: access.bucket,
        issue,
        flash,
    })
}

/// The servers and instances of these occurrences.
fn places(docs: &[String], bucket_id: &str, app: &str) -> Vec<Place> {
    let mut by_server: std::collections::BTreeMap<String, BTreeSet<i64>> = Default::default();
    for doc in docs
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
    {
        let server = doc["server_name"].as_str().unwrap_or_default().to_string();
        let pm_ids = by_server.entry(server).or_default();
        if let Some(pm_id) = doc["pm_id"].as_i64() {
            pm_ids.insert(pm_id);
        }
    }
    by_server
        .into_iter()
        .map(|(server, pm_ids)| Place {
            path: page_path(bucket_id, &server, app),
            pm_ids: pm_ids
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            server,
        })
        .collect()
}

#[derive(Deserialize)]
pub struct TriageForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    state: String,
}

/// Resolve, ignore or reopen from the issue's page (the API route of the same purpose).
pub async fn set_state(
    State(app): State<AppState>,
    session: WebSession,
    Path((id, identifier)): Path<(String, String)>,
    Form(form): Form<TriageForm>,
) -> Response {
    let access = match form_access(&app, &session, &id, &form.csrf).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let path = issue_path(&access.bucket.id, &identifier);
    let body = Body(StateForm {
        state: form.state.clone(),
    });
    let done = insights::issue_set_state(State(app), access, Path((id, identifier)), body).await;
    back(
        &path,
        done.map(|_| match form.state.as_str() {
            "resolved" => "resolved: it reopens if it happens again".into(),
            "ignored" => "ignored: it is no longer listed among the open issues".into(),
            _ => "reopened".into(),
        }),
    )
}
