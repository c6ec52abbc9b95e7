//! Data routes: live status from the sessions, stored events and metric history from
//! the events store.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Body;
use super::buckets::BucketAccess;
use crate::error::{ApiError, ApiResult};
use km_core::app::AppState;
use km_core::fleet;
use km_stores::ids::now_ms;
use km_stores::{EventKind, EventQuery, MemberRole, MetricPoint, MetricQuery};

const DEFAULT_SIZE: u32 = 100;
const MAX_SIZE: u32 = 1_000;

/// A response made of JSON documents already serialised.
pub fn json_array(items: impl IntoIterator<Item = String>) -> Response {
    let mut out = String::from("[");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item);
    }
    out.push(']');
    ([(CONTENT_TYPE, "application/json")], out).into_response()
}

#[derive(Deserialize, Default)]
pub struct StatusFilter {
    server_name: Option<String>,
}

/// `GET /api/bucket/:id/data/status[?server_name=]`: every server's latest status, from
/// this node's sessions and the servers connected to other nodes.
pub async fn status(
    State(app): State<AppState>,
    access: BucketAccess,
    Query(filter): Query<StatusFilter>,
) -> Response {
    json_array(fleet::servers_status(&app, &access.bucket.id, filter.server_name.as_deref()).await)
}

/// Filters of the event routes. Times are epoch milliseconds (numbers or digit strings).
#[derive(Deserialize, Default)]
pub struct EventFilter {
    app_name: Option<String>,
    server_name: Option<String>,
    /// Channel or event type (`human:event`, `axm:reply`, `restart`, `out`...).
    r#type: Option<String>,
    /// Name of a custom event, or an issue's identifier.
    #[serde(alias = "identifier")]
    pub event_name: Option<String>,
    before: Option<Value>,
    after: Option<Value>,
    /// Text the log line or message holds (case-insensitive).
    #[serde(alias = "search")]
    q: Option<String>,
    #[serde(alias = "limit")]
    size: Option<Value>,
    #[serde(alias = "offset")]
    from: Option<Value>,
}

/// A number given as JSON number or string; `field` names it in the error.
pub fn number(v: &Option<Value>, field: &str) -> ApiResult<Option<i64>> {
    let bad = || {
        ApiError::bad_request(format!(
            "{field}: expected a number, got {}",
            v.as_ref().map(Value::to_string).unwrap_or_default()
        ))
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(|f| Some(f as i64)).ok_or_else(bad),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .map(|f| Some(f as i64))
            .map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

impl EventFilter {
    pub fn query(self, bucket_id: &str) -> ApiResult<EventQuery> {
        let size = number(&self.size, "size")?.unwrap_or(DEFAULT_SIZE.into());
        let from = number(&self.from, "from")?.unwrap_or(0);
        if size < 1 || size > MAX_SIZE.into() {
            return Err(ApiError::bad_request(format!(
                "size: between 1 and {MAX_SIZE}"
            )));
        }
        Ok(EventQuery {
            bucket_id: bucket_id.to_string(),
            app_name: self.app_name.filter(|s| !s.is_empty()),
            server_name: self.server_name.filter(|s| !s.is_empty()),
            event_type: self.r#type.filter(|s| !s.is_empty()),
            name: self.event_name.filter(|s| !s.is_empty()),
            before: number(&self.before, "before")?,
            after: number(&self.after, "after")?,
            text: self
                .q
                .map(|q| q.trim().to_string())
                .filter(|q| !q.is_empty()),
            limit: size as u32,
            offset: from.clamp(0, i64::from(u32::MAX)) as u32,
        })
    }
}

async fn events_of(
    app: &AppState,
    access: &BucketAccess,
    kind: EventKind,
    filter: EventFilter,
) -> ApiResult<Response> {
    let query = filter.query(&access.bucket.id)?;
    Ok(json_array(app.events.query(kind, &query).await?))
}

macro_rules! event_route {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        pub async fn $name(State(app): State<AppState>, access: BucketAccess, Body(filter): Body<EventFilter>) -> ApiResult<Response> {
            events_of(&app, &access, $kind, filter).await
        }
    };
}

event_route!(
    /// `POST /api/bucket/:id/data/logs`: `{at, data, log_type, app_name, server_name, pm_id}`, newest first.
    logs, EventKind::Log);
event_route!(
    /// `POST /api/bucket/:id/data/exceptions`.
    exceptions, EventKind::Exception);
event_route!(
    /// `POST /api/bucket/:id/data/events`: custom events, action replies, command results.
    events, EventKind::Event);
event_route!(
    /// `POST /api/bucket/:id/data/processEvents`.
    process_events, EventKind::ProcessEvent);
event_route!(
    /// `POST /api/bucket/:id/data/transactions`.
    transactions, EventKind::Transaction);
event_route!(
    /// `POST /api/bucket/:id/data/profilings`.
    profilings, EventKind::Profile);

/// The step of a histogram: `minute` (default), `hour` or `day`, in ms.
pub fn step_of(interval: Option<&str>) -> ApiResult<i64> {
    match interval.unwrap_or("minute") {
        "minute" => Ok(60_000),
        "hour" => Ok(3_600_000),
        "day" => Ok(86_400_000),
        other => Err(ApiError::bad_request(format!(
            "interval: {other:?} is not minute, hour or day"
        ))),
    }
}

/// The steps (minutes) a histogram with `max_points` picks from: the smallest that fits.
const STEPS_MINUTES: [i64; 11] = [1, 2, 5, 10, 15, 30, 60, 120, 360, 720, 1440];

#[derive(Deserialize, Default)]
pub struct HistogramFilter {
    app_name: Option<String>,
    server_name: Option<String>,
    /// `minute` (default), `hour` or `day`.
    interval: Option<String>,
    /// How many minutes back from `until` (default 60).
    before: Option<Value>,
    /// The end of the window, epoch ms (default now).
    until: Option<Value>,
    /// At most this many steps: the step is the smallest of [`STEPS_MINUTES`] that fits
    /// (instead of `interval`).
    max_points: Option<Value>,
    /// Each instance's series too, under `instances` by pm_id.
    #[serde(default)]
    instances: bool,
    /// Only these metrics.
    #[serde(default)]
    metrics: Vec<String>,
}

impl HistogramFilter {
    /// The store's query and the step (ms).
    fn query(&self, bucket_id: &str) -> ApiResult<(MetricQuery, i64)> {
        let minutes = number(&self.before, "before")?.unwrap_or(60);
        if minutes <= 0 {
            return Err(ApiError::bad_request("before: a number of minutes above 0"));
        }
        let until = number(&self.until, "until")?;
        let end = until.unwrap_or_else(now_ms);
        let step_ms = match number(&self.max_points, "max_points")? {
            Some(n) if n > 0 => {
                let fits = STEPS_MINUTES
                    .iter()
                    .find(|step| (minutes + **step - 1) / **step <= n);
                fits.copied()
                    .unwrap_or(STEPS_MINUTES[STEPS_MINUTES.len() - 1])
                    * 60_000
            }
            Some(_) => return Err(ApiError::bad_request("max_points: a number above 0")),
            None => step_of(self.interval.as_deref())?,
        };
        let query = MetricQuery {
            bucket_id: bucket_id.to_string(),
            app_name: self.app_name.clone().filter(|s| !s.is_empty()),
            server_name: self.server_name.clone().filter(|s| !s.is_empty()),
            since: end - minutes.saturating_mul(60_000),
            until,
            names: self.metrics.clone(),
            by_instance: self.instances,
        };
        Ok((query, step_ms))
    }
}

/// A series: (server, app, metric).
type SeriesKey = (Arc<str>, Arc<str>, Arc<str>);

/// The series of `p` in the histogram `out`, made when it is the first step.
fn series<'a>(out: &'a mut Value, p: &MetricPoint) -> &'a mut Value {
    let series = &mut out[&*p.server_name][&*p.app_name][&*p.name];
    if series.is_null() {
        *series = json!({ "agg_type": p.agg_type, "unit": p.unit, "timestamps_and_stats": [] });
    }
    series
}

/// A step of a series as the API shows it.
fn stats(p: &MetricPoint) -> Value {
    json!({"at": p.at, "avg": p.avg, "min": p.min, "max": p.max, "last": p.last, "count": p.count})
}

/// Adds the minutes of `p` to `into` (same series, later or same step): the average
/// weighted by count, the extremes, the latest `last`.
fn merge(into: &mut MetricPoint, p: &MetricPoint) {
    let count = into.count + p.count;
    if count > 0 {
        into.avg =
            (into.avg * f64::from(into.count) + p.avg * f64::from(p.count)) / f64::from(count);
    }
    into.count = count;
    into.min = into.min.min(p.min);
    into.max = into.max.max(p.max);
    if p.at >= into.at {
        into.last = p.last;
        into.at = p.at;
    }
}

/// `POST /api/bucket/:id/data/metrics/histogram`: `{server: {app: {metric: {agg_type,
/// unit, timestamps_and_stats: [{at, avg, min, max, last, count}]}}}}`, an app's
/// instances merged (with `instances: true`, each one's steps too, under `instances` by
/// pm_id). A server's host series (`load`, and the sums of its processes' `cpu` and
/// `memory`) are under the app name `""`.
pub async fn metrics_histogram(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(filter): Body<HistogramFilter>,
) -> ApiResult<Json<Value>> {
    let (query, step_ms) = filter.query(&access.bucket.id)?;
    let mut out = json!({});
    let push = |list: &mut Value, p: &MetricPoint| {
        if let Some(list) = list.as_array_mut() {
            list.push(stats(p));
        }
    };
    // An app's instances merged, by series and step.
    let mut merged: BTreeMap<(SeriesKey, i64), MetricPoint> = BTreeMap::new();
    for p in app.events.metric_histogram(&query, step_ms).await? {
        if !filter.instances {
            push(&mut series(&mut out, &p)["timestamps_and_stats"], &p);
            continue;
        }
        let instance = &mut series(&mut out, &p)["instances"][p.pm_id.to_string()];
        if instance.is_null() {
            *instance = json!([]);
        }
        push(instance, &p);
        let key = (
            (p.server_name.clone(), p.app_name.clone(), p.name.clone()),
            p.at,
        );
        match merged.get_mut(&key) {
            Some(m) => merge(m, &p),
            None => {
                merged.insert(key, p);
            }
        }
    }
    for m in merged.values() {
        push(&mut series(&mut out, m)["timestamps_and_stats"], m);
    }
    Ok(Json(out))
}

/// The stored profile named `uuid` (its document).
async fn profile(app: &AppState, access: &BucketAccess, uuid: &str) -> ApiResult<Value> {
    let query = EventQuery {
        bucket_id: access.bucket.id.clone(),
        name: Some(uuid.to_string()),
        limit: 1,
        ..EventQuery::default()
    };
    app.events
        .query(EventKind::Profile, &query)
        .await?
        .first()
        .and_then(|doc| serde_json::from_str(doc).ok())
        .ok_or_else(|| ApiError::not_found(format!("no profile {uuid:?}")))
}

/// The profile itself: agents send it as a JSON string (`data.data`).
fn profile_body(doc: &Value) -> String {
    match &doc["data"]["data"] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `GET /api/bucket/:id/data/profilings/:uuid`: a profile without its content.
pub async fn profiling(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, uuid)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let mut doc = profile(&app, &access, &uuid).await?;
    let size = profile_body(&doc).len();
    if let Some(data) = doc["data"].as_object_mut() {
        data.remove("data");
    }
    doc["size"] = size.into();
    Ok(Json(doc))
}

/// `GET /api/bucket/:id/data/profilings/:uuid/download`: the profile as a file
/// (`.cpuprofile`, `.heapprofile`, `.heapsnapshot`), to open in Chrome DevTools.
pub async fn profiling_download(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, uuid)): Path<(String, String)>,
) -> ApiResult<Response> {
    let doc = profile(&app, &access, &uuid).await?;
    let extension = match doc["type"].as_str().unwrap_or("") {
        "heapdump" | "heapsnapshot" => "heapsnapshot",
        "" => "json",
        other => other,
    };
    let safe: String = uuid.chars().filter(char::is_ascii_alphanumeric).collect();
    let disposition = format!("attachment; filename=\"{safe}.{extension}\"");
    Ok((
        [
            (CONTENT_TYPE, "application/octet-stream".to_string()),
            (CONTENT_DISPOSITION, disposition),
        ],
        profile_body(&doc),
    )
        .into_response())
}

/// `DELETE /api/bucket/:id/data/profilings/:uuid` (developers).
pub async fn profiling_delete(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, uuid)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Developer, "delete profiles")?;
    let query = EventQuery {
        bucket_id: access.bucket.id.clone(),
        name: Some(uuid.clone()),
        ..EventQuery::default()
    };
    let deleted = app
        .events
        .delete_matching(EventKind::Profile, &query)
        .await?;
    if deleted == 0 {
        return Err(ApiError::not_found(format!("no profile {uuid:?}")));
    }
    Ok(Json(json!({ "deleted": deleted })))
}

/// `POST /api/bucket/:id/data/metrics/aggregations`: each metric over the whole window,
/// `{server: {app: {metric: {avg, min, max, last, count}}}}` (`metrics` picks some).
pub async fn metrics_aggregations(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(filter): Body<HistogramFilter>,
) -> ApiResult<Json<Value>> {
    let (query, _) = filter.query(&access.bucket.id)?;
    let mut merged: BTreeMap<SeriesKey, MetricPoint> = BTreeMap::new();
    // Hour steps, merged here: the window rarely starts on a step boundary.
    for p in app.events.metric_histogram(&query, 3_600_000).await? {
        let key = (p.server_name.clone(), p.app_name.clone(), p.name.clone());
        match merged.get_mut(&key) {
            Some(m) => merge(m, &p),
            None => {
                merged.insert(key, p);
            }
        }
    }
    let mut out = json!({});
    for ((server, app_name, metric), p) in merged {
        out[&*server][&*app_name][&*metric] =
            json!({"avg": p.avg, "min": p.min, "max": p.max, "last": p.last, "count": p.count});
    }
    Ok(Json(out))
}

/// `POST /api/bucket/:id/data/notifications`: the bucket's notifications, newest first
/// (100), each with its delivery: `state` (pending, retrying, sent, failed), attempts,
/// the last error and the next try.
pub async fn notifications(
    State(app): State<AppState>,
    access: BucketAccess,
) -> ApiResult<Json<Value>> {
    let list = app.documents.notifications(&access.bucket.id, 100).await?;
    let list: Vec<Value> = list
        .into_iter()
        .map(|n| {
            let mut v = json!(n);
            // The HTML part repeats the text.
            if let Some(o) = v.as_object_mut() {
                o.remove("html");
            }
            v
        })
        .collect();
    Ok(Json(Value::Array(list)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step_of_window(minutes: i64) -> i64 {
        let filter = HistogramFilter {
            before: Some(json!(minutes)),
            max_points: Some(json!(360)),
            ..HistogramFilter::default()
        };
        filter
            .query("b")
            .map(|(_, step)| step / 60_000)
            .unwrap_or(-1)
    }

    #[test]
    fn a_range_gets_the_smallest_step_that_fits_its_points() {
        let steps: Vec<i64> = [60, 360, 1440, 10080, 43200, 10_000_000]
            .into_iter()
            .map(step_of_window)
            .collect();
        assert_eq!(steps, [1, 1, 5, 30, 120, 1440]);
        let zero = HistogramFilter {
            max_points: Some(json!(0)),
            ..HistogramFilter::default()
        };
        assert!(zero.query("b").is_err());
    }
}
