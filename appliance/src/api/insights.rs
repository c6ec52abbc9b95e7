//! What is derived from stored events for people: exceptions grouped into issues, the
//! transaction routes of an app, histograms and deployments. Issues and transactions
//! read a bounded window of the newest events.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Body;
use super::buckets::BucketAccess;
use super::data::{EventFilter, json_array, step_of};
use crate::error::{ApiError, ApiResult};
use km_core::app::AppState;
use km_core::issues::{Issue, IssueState, Triage, issues, triaged};
use km_stores::ids::now_ms;
use km_stores::{EventKind, EventQuery, MemberRole};

/// Transaction snapshots read for a summary (agents send one per app every few seconds).
pub const TRANSACTION_WINDOW: u32 = 500;

/// One route of an app as its agent measured it (milliseconds).
#[derive(Debug, Serialize)]
pub struct Route {
    pub app_name: String,
    pub server_name: String,
    pub path: String,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    /// Count-weighted mean of the agent's medians over the window.
    pub median: f64,
    /// The highest p95 the agent reported in the window.
    pub p95: f64,
    /// The app's p99 over all HTTP routes (agents send no p99 per route).
    pub app_p99: Option<f64>,
}

/// The routes of the newest transaction snapshots matching `query`, busiest first.
pub async fn routes(app: &AppState, query: EventQuery) -> ApiResult<Vec<Route>> {
    let query = EventQuery {
        limit: TRANSACTION_WINDOW,
        offset: 0,
        ..query
    };
    let docs = app.events.query(EventKind::Transaction, &query).await?;
    let mut by_route: BTreeMap<(String, String, String), Route> = BTreeMap::new();
    let mut app_p99: BTreeMap<(String, String), f64> = BTreeMap::new();
    for doc in docs
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
    {
        let app_name = doc["app_name"].as_str().unwrap_or("").to_string();
        let server_name = doc["server_name"].as_str().unwrap_or("").to_string();
        if let Some(p99) = doc["data"]["meta"]["http_percentiles"]["p99"].as_f64() {
            // Newest first: the first seen is the latest.
            app_p99
                .entry((app_name.clone(), server_name.clone()))
                .or_insert(p99);
        }
        for route in doc["data"]["routes"].as_array().into_iter().flatten() {
            let meta = &route["meta"];
            let number = |field: &str| meta[field].as_f64().unwrap_or(0.0);
            let count = meta["count"].as_u64().unwrap_or(0);
            let path = route["path"].as_str().unwrap_or("").to_string();
            let entry = by_route
                .entry((app_name.clone(), server_name.clone(), path.clone()))
                .or_insert_with(|| Route {
                    app_name: app_name.clone(),
                    server_name: server_name.clone(),
                    path,
                    count: 0,
                    min: f64::MAX,
                    max: 0.0,
                    median: 0.0,
                    p95: 0.0,
                    app_p99: None,
                });
            let total = entry.count + count;
            if total > 0 {
                entry.median = (entry.median * entry.count as f64
                    + number("median") * count as f64)
                    / total as f64;
            }
            entry.count = total;
            entry.min = entry.min.min(number("min"));
            entry.max = entry.max.max(number("max"));
            entry.p95 = entry.p95.max(number("p95"));
        }
    }
    let mut routes: Vec<Route> = by_route
        .into_values()
        .map(|mut r| {
            r.app_p99 = app_p99
                .get(&(r.app_name.clone(), r.server_name.clone()))
                .copied();
            if r.min == f64::MAX {
                r.min = 0.0;
            }
            r
        })
        .collect();
    routes.sort_by_key(|r| std::cmp::Reverse(r.count));
    Ok(routes)
}

/// Counts per step of a histogram route.
#[derive(Debug, Serialize)]
pub struct Step {
    pub at: i64,
    pub count: u64,
}

#[derive(Deserialize, Default)]
pub struct HistogramForm {
    #[serde(flatten)]
    filter: EventFilter,
    interval: Option<String>,
}

async fn histogram_of(
    app: &AppState,
    access: &BucketAccess,
    kind: EventKind,
    form: HistogramForm,
) -> ApiResult<Json<Vec<Step>>> {
    let step_ms = step_of(form.interval.as_deref())?;
    let query = form.filter.query(&access.bucket.id)?;
    let steps = app.events.count_histogram(kind, &query, step_ms).await?;
    Ok(Json(
        steps
            .into_iter()
            .map(|(at, count)| Step { at, count })
            .collect(),
    ))
}

/// `POST /api/bucket/:id/data/logs/histogram`: log lines per step (filters of `logs`).
pub async fn logs_histogram(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<HistogramForm>,
) -> ApiResult<Json<Vec<Step>>> {
    histogram_of(&app, &access, EventKind::Log, form).await
}

/// `POST /api/bucket/:id/data/events/stats`: custom events per step.
pub async fn events_histogram(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<HistogramForm>,
) -> ApiResult<Json<Vec<Step>>> {
    histogram_of(&app, &access, EventKind::Event, form).await
}

/// `POST /api/bucket/:id/data/issues/histogram`: exceptions per step (`identifier`
/// for one issue).
pub async fn issues_histogram(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<HistogramForm>,
) -> ApiResult<Json<Vec<Step>>> {
    histogram_of(&app, &access, EventKind::Exception, form).await
}

/// Deletes the events of `kind` matching `filter` (developers).
async fn delete_of(
    app: &AppState,
    access: &BucketAccess,
    kind: EventKind,
    filter: EventFilter,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Developer, "delete stored data")?;
    let query = filter.query(&access.bucket.id)?;
    let deleted = app.events.delete_matching(kind, &query).await?;
    tracing::info!(bucket = %access.bucket.id, kind = kind.as_str(), deleted, user = %access.auth.user.username, "events deleted");
    Ok(Json(json!({ "deleted": deleted })))
}

/// `DELETE /api/bucket/:id/data/events/delete_all`.
pub async fn events_delete_all(
    State(app): State<AppState>,
    access: BucketAccess,
) -> ApiResult<Json<Value>> {
    delete_of(&app, &access, EventKind::Event, EventFilter::default()).await
}

/// `POST /api/bucket/:id/data/exceptions/delete_all` (filters: app, server, time).
pub async fn exceptions_delete_all(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(filter): Body<EventFilter>,
) -> ApiResult<Json<Value>> {
    delete_of(&app, &access, EventKind::Exception, filter).await
}

/// `DELETE /api/bucket/:id/data/issues`: every exception of the bucket.
pub async fn issues_delete_all(
    State(app): State<AppState>,
    access: BucketAccess,
) -> ApiResult<Json<Value>> {
    delete_of(&app, &access, EventKind::Exception, EventFilter::default()).await
}

/// `POST /api/bucket/:id/data/issues/list` (also `issues/search` with `q`): exceptions
/// grouped into issues.
pub async fn issues_list(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(filter): Body<EventFilter>,
) -> ApiResult<Json<Vec<Issue>>> {
    let query = filter.query(&access.bucket.id)?;
    Ok(Json(triaged_issues(&app, query).await?))
}

/// The issues of `query` with the team's decisions (`state`).
pub async fn triaged_issues(app: &AppState, query: EventQuery) -> ApiResult<Vec<Issue>> {
    let (mut found, decisions) = tokio::try_join!(
        issues(app.events.as_ref(), query.clone()),
        Triage::all(app.documents.as_ref(), &query.bucket_id),
    )?;
    triaged(&mut found, &decisions);
    Ok(found)
}

#[derive(Deserialize, Default)]
pub struct StateForm {
    #[serde(default)]
    pub state: String,
}

/// `PUT /api/bucket/:id/data/issues/:identifier`: `{state: open|resolved|ignored}`
/// (developers). A resolved issue reopens when it happens again.
pub async fn issue_set_state(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, identifier)): Path<(String, String)>,
    Body(form): Body<StateForm>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Developer, "resolve or ignore issues")?;
    let state = IssueState::parse(&form.state).ok_or_else(|| {
        ApiError::bad_request(format!(
            "state: {:?} is not open, resolved or ignored",
            form.state
        ))
    })?;
    let triage = Triage {
        state,
        at: now_ms(),
        by: access.auth.user.username.clone(),
    };
    Triage::set(
        app.documents.as_ref(),
        &access.bucket.id,
        &identifier,
        &triage,
    )
    .await?;
    Ok(Json(
        json!({ "identifier": identifier, "state": state, "at": triage.at, "by": triage.by }),
    ))
}

/// `GET /api/bucket/:id/data/exceptions/summary`: every issue of the bucket.
pub async fn issues_summary(
    State(app): State<AppState>,
    access: BucketAccess,
) -> ApiResult<Json<Vec<Issue>>> {
    issues_list(State(app), access, Body(EventFilter::default())).await
}

fn by_name(access: &BucketAccess, name: &str, limit: u32) -> EventQuery {
    EventQuery {
        bucket_id: access.bucket.id.clone(),
        name: Some(name.to_string()),
        limit,
        ..EventQuery::default()
    }
}

/// `GET /api/bucket/:id/data/issues/occurrences/:identifier`: the issue's newest
/// exceptions.
pub async fn issue_occurrences(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, identifier)): Path<(String, String)>,
) -> ApiResult<Response> {
    let query = by_name(&access, &identifier, 100);
    Ok(json_array(
        app.events.query(EventKind::Exception, &query).await?,
    ))
}

/// `DELETE /api/bucket/:id/data/issues/:identifier`: forgets an issue (developers).
pub async fn issue_delete(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, identifier)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Developer, "delete issues")?;
    let query = by_name(&access, &identifier, 0);
    let deleted = app
        .events
        .delete_matching(EventKind::Exception, &query)
        .await?;
    Ok(Json(json!({ "deleted": deleted })))
}

/// The process events that mark a new version running.
const DEPLOYMENT_EVENTS: [&str; 3] = ["start", "restart", "reload"];

/// `POST /api/bucket/:id/data/processEvents/deployments`: starts, restarts and reloads,
/// newest first.
pub async fn deployments(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(filter): Body<EventFilter>,
) -> ApiResult<Response> {
    let query = filter.query(&access.bucket.id)?;
    let mut found = Vec::new();
    for event in DEPLOYMENT_EVENTS {
        let query = EventQuery {
            event_type: Some(event.to_string()),
            ..query.clone()
        };
        for doc in app.events.query(EventKind::ProcessEvent, &query).await? {
            let at = serde_json::from_str::<Value>(&doc)
                .ok()
                .and_then(|d| d["at"].as_i64())
                .unwrap_or(0);
            found.push((at, doc));
        }
    }
    found.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    found.truncate(query.limit as usize);
    Ok(json_array(found.into_iter().map(|(_, doc)| doc)))
}

/// `POST /api/bucket/:id/data/transactions/v2/summary`: routes with their latencies.
pub async fn transactions_summary(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(filter): Body<EventFilter>,
) -> ApiResult<Json<Vec<Route>>> {
    let query = filter.query(&access.bucket.id)?;
    Ok(Json(routes(&app, query).await?))
}

/// One step of an app's traffic.
#[derive(Debug, Serialize)]
pub struct TrafficStep {
    pub at: i64,
    pub app_name: String,
    pub count: u64,
    /// Count-weighted mean of the routes' medians (ms).
    pub median: f64,
}

/// `POST /api/bucket/:id/data/transactions/v2/histogram`: requests and median latency
/// per app and step, from the newest snapshots.
pub async fn transactions_histogram(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<HistogramForm>,
) -> ApiResult<Json<Vec<TrafficStep>>> {
    let step_ms = step_of(form.interval.as_deref())?;
    let query = EventQuery {
        limit: TRANSACTION_WINDOW,
        offset: 0,
        ..form.filter.query(&access.bucket.id)?
    };
    let docs = app.events.query(EventKind::Transaction, &query).await?;
    let mut steps: BTreeMap<(i64, String), (u64, f64)> = BTreeMap::new();
    for doc in docs
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
    {
        let at = doc["at"].as_i64().unwrap_or(0);
        let key = (
            at - at.rem_euclid(step_ms),
            doc["app_name"].as_str().unwrap_or("").to_string(),
        );
        let step = steps.entry(key).or_insert((0, 0.0));
        for route in doc["data"]["routes"].as_array().into_iter().flatten() {
            let count = route["meta"]["count"].as_u64().unwrap_or(0);
            let median = route["meta"]["median"].as_f64().unwrap_or(0.0);
            step.1 += median * count as f64;
            step.0 += count;
        }
    }
    Ok(Json(
        steps
            .into_iter()
            .map(|((at, app_name), (count, weighted))| TrafficStep {
                at,
                app_name,
                count,
                median: if count > 0 {
                    weighted / count as f64
                } else {
                    0.0
                },
            })
            .collect(),
    ))
}
