//! Traces: an app's requests (entry spans) slowest first, one trace's spans as a tree,
//! the latency percentiles of each route.

use std::collections::{HashMap, HashSet};

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::buckets::BucketAccess;
use crate::error::{ApiError, ApiResult};
use km_core::app::AppState;
use km_ingest::budget::MAX_TRACE_SPANS;
use km_stores::ids::now_ms;
use km_stores::{EventKind, EventQuery, RouteLatency, SpanQuery};

/// Requests or routes listed when the request does not say.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;
/// How far back a list looks when the request does not say: an hour.
pub const DEFAULT_WINDOW_MS: i64 = 3_600_000;

/// The filters of the trace routes.
#[derive(Deserialize, Default, Clone)]
pub struct TraceFilter {
    #[serde(alias = "app_name")]
    pub app: Option<String>,
    #[serde(alias = "server_name")]
    pub server: Option<String>,
    pub route: Option<String>,
    /// `2xx`, `3xx`, `4xx`, `5xx`, or one status (`404`).
    pub status: Option<String>,
    /// Only requests started since (epoch ms); an hour ago when not given.
    pub since: Option<i64>,
    pub limit: Option<u32>,
}

impl TraceFilter {
    pub fn query(&self, bucket_id: &str) -> ApiResult<SpanQuery> {
        let given = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        Ok(SpanQuery {
            bucket_id: bucket_id.to_string(),
            app_name: given(&self.app),
            server_name: given(&self.server),
            route: given(&self.route),
            status: match self.status.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(text) => Some(status_range(text)?),
            },
            since: self.since.unwrap_or_else(|| now_ms() - DEFAULT_WINDOW_MS),
            limit: self.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
        })
    }
}

/// The statuses a `status` filter means.
fn status_range(text: &str) -> ApiResult<(u16, u16)> {
    let class = text
        .strip_suffix("xx")
        .and_then(|digit| digit.parse::<u16>().ok())
        .filter(|d| (1..=5).contains(d));
    match (class, text.parse::<u16>()) {
        (Some(d), _) => Ok((d * 100, d * 100 + 99)),
        (None, Ok(status)) => Ok((status, status)),
        _ => Err(ApiError::bad_request(format!(
            "status: {text:?} is not 2xx, 3xx, 4xx, 5xx or a status such as 404"
        ))),
    }
}

/// One request: an entry span, as the list shows it.
#[derive(Debug, Serialize)]
pub struct TraceEntry {
    pub trace_id: String,
    pub span_id: String,
    pub at: i64,
    pub app_name: String,
    pub server_name: String,
    pub route: String,
    pub status: u16,
    pub duration_us: i64,
}

impl TraceEntry {
    fn of(doc: &Value) -> TraceEntry {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        TraceEntry {
            trace_id: text(&doc["data"]["traceId"]).to_ascii_lowercase(),
            span_id: text(&doc["data"]["id"]),
            at: doc["at"].as_i64().unwrap_or_default(),
            app_name: text(&doc["app_name"]),
            server_name: text(&doc["server_name"]),
            route: text(&doc["route"]),
            status: doc["status"].as_u64().unwrap_or_default() as u16,
            duration_us: doc["duration_us"].as_i64().unwrap_or_default(),
        }
    }
}

fn parsed(docs: Vec<String>) -> Vec<Value> {
    docs.iter()
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// The requests matching `filter`, slowest first.
pub async fn slowest(app: &AppState, query: &SpanQuery) -> ApiResult<Vec<TraceEntry>> {
    let docs = app.events.slowest_spans(query).await?;
    Ok(parsed(docs).iter().map(TraceEntry::of).collect())
}

/// `GET /api/bucket/:id/traces?app=&server=&route=&status=&since=&limit=`: requests,
/// slowest first.
pub async fn list(
    State(app): State<AppState>,
    access: BucketAccess,
    Query(filter): Query<TraceFilter>,
) -> ApiResult<Json<Vec<TraceEntry>>> {
    Ok(Json(
        slowest(&app, &filter.query(&access.bucket.id)?).await?,
    ))
}

/// `GET /api/bucket/:id/traces/routes?app=&server=&since=&limit=`: each route's requests,
/// errors and latency percentiles (µs), busiest first.
pub async fn routes(
    State(app): State<AppState>,
    access: BucketAccess,
    Query(filter): Query<TraceFilter>,
) -> ApiResult<Json<Vec<RouteLatency>>> {
    let query = filter.query(&access.bucket.id)?;
    Ok(Json(app.events.route_latencies(&query).await?))
}

/// A span of a trace, placed in its tree.
#[derive(Debug, Serialize)]
pub struct SpanView {
    pub span_id: String,
    pub parent_id: Option<String>,
    /// Below how many of the trace's spans (a span whose parent was not received is a root).
    pub depth: usize,
    pub name: String,
    pub route: String,
    pub kind: String,
    pub app_name: String,
    pub server_name: String,
    pub status: u16,
    /// From the trace's start.
    pub offset_us: i64,
    pub duration_us: i64,
    pub tags: serde_json::Map<String, Value>,
}

impl SpanView {
    fn of(doc: &Value, depth: usize, trace_start_us: i64) -> SpanView {
        let span = &doc["data"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        SpanView {
            span_id: text(&span["id"]),
            parent_id: span["parentId"].as_str().map(str::to_string),
            depth,
            name: text(&span["name"]),
            route: text(&doc["route"]),
            kind: text(&span["kind"]),
            app_name: text(&doc["app_name"]),
            server_name: text(&doc["server_name"]),
            status: doc["status"].as_u64().unwrap_or_default() as u16,
            offset_us: (span["timestamp"].as_f64().unwrap_or_default() as i64)
                .saturating_sub(trace_start_us),
            duration_us: doc["duration_us"].as_i64().unwrap_or_default(),
            tags: span["tags"].as_object().cloned().unwrap_or_default(),
        }
    }
}

/// A trace: its spans in tree order (each after its parent, siblings by start).
#[derive(Debug, Serialize)]
pub struct Trace {
    pub trace_id: String,
    pub start_us: i64,
    pub duration_us: i64,
    pub spans: Vec<SpanView>,
    /// More spans were stored than are shown (`MAX_TRACE_SPANS`: the newest are).
    pub truncated: bool,
}

impl Trace {
    fn of(trace_id: &str, docs: &[Value], truncated: bool) -> Trace {
        let int = |v: &Value| v.as_f64().unwrap_or_default() as i64;
        let start_us = docs
            .iter()
            .map(|d| int(&d["data"]["timestamp"]))
            .min()
            .unwrap_or_default();
        let end_us = docs
            .iter()
            .map(|d| {
                let duration = d["duration_us"].as_i64().unwrap_or_default();
                int(&d["data"]["timestamp"]).saturating_add(duration)
            })
            .max()
            .unwrap_or_default();
        let ids: HashSet<&str> = docs
            .iter()
            .filter_map(|d| d["data"]["id"].as_str())
            .collect();
        let mut children: HashMap<Option<&str>, Vec<&Value>> = HashMap::new();
        for doc in docs {
            let parent = doc["data"]["parentId"].as_str().filter(|p| ids.contains(p));
            children.entry(parent).or_default().push(doc);
        }
        for list in children.values_mut() {
            list.sort_by_key(|d| int(&d["data"]["timestamp"]));
        }
        // Depth first from the roots; a span is placed once, and spans no root reaches (a
        // cycle of parents from a hostile sender) are placed as roots after them.
        let mut by_start: Vec<&Value> = docs.iter().collect();
        by_start.sort_by_key(|d| int(&d["data"]["timestamp"]));
        let mut spans = Vec::with_capacity(docs.len());
        let mut placed: HashSet<&str> = HashSet::new();
        let mut stack: Vec<(&Value, usize)> = children
            .get(&None)
            .map(|roots| roots.iter().rev().map(|d| (*d, 0)).collect())
            .unwrap_or_default();
        let mut next_root = by_start.iter();
        while let Some((doc, depth)) = stack.pop().or_else(|| {
            next_root
                .find(|d| !placed.contains(d["data"]["id"].as_str().unwrap_or_default()))
                .map(|d| (*d, 0))
        }) {
            let span = &doc["data"];
            let id = span["id"].as_str().unwrap_or_default();
            if !placed.insert(id) {
                continue;
            }
            if let Some(below) = children.get(&Some(id)) {
                stack.extend(below.iter().rev().map(|d| (*d, depth + 1)));
            }
            spans.push(SpanView::of(doc, depth, start_us));
        }
        Trace {
            trace_id: trace_id.to_string(),
            start_us,
            duration_us: end_us.saturating_sub(start_us),
            spans,
            truncated,
        }
    }
}

/// The trace `trace_id` of the bucket, or 404.
pub async fn find(app: &AppState, bucket_id: &str, trace_id: &str) -> ApiResult<Trace> {
    let trace_id = trace_id.to_ascii_lowercase();
    let query = EventQuery {
        bucket_id: bucket_id.to_string(),
        name: Some(trace_id.clone()),
        limit: MAX_TRACE_SPANS + 1,
        ..EventQuery::default()
    };
    let mut docs = parsed(app.events.query(EventKind::Span, &query).await?);
    if docs.is_empty() {
        return Err(ApiError::not_found(format!(
            "no trace {trace_id} in this bucket (spans are kept as long as events)"
        )));
    }
    let truncated = docs.len() > MAX_TRACE_SPANS as usize;
    docs.truncate(MAX_TRACE_SPANS as usize);
    Ok(Trace::of(&trace_id, &docs, truncated))
}

/// `GET /api/bucket/:id/traces/:trace`: the trace's spans in tree order.
pub async fn trace(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, trace_id)): Path<(String, String)>,
) -> ApiResult<Json<Trace>> {
    Ok(Json(find(&app, &access.bucket.id, &trace_id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(id: &str, parent: Option<&str>, start: i64, duration: i64) -> Value {
        json!({"app_name": "api", "server_name": "web-1", "route": format!("GET /{id}"), "status": 200,
               "duration_us": duration, "data": {"id": id, "parentId": parent, "timestamp": start, "name": "GET"}})
    }

    #[test]
    fn spans_are_placed_under_their_parents() {
        // Newest first, as the store answers; `a`'s parent was never received.
        let docs = [
            doc("d", Some("b"), 1_030, 5),
            doc("c", Some("a"), 1_050, 10),
            doc("b", Some("a"), 1_010, 30),
            doc("a", Some("gone"), 1_000, 100),
            doc("x", Some("x"), 1_200, 1),
        ];
        let trace = Trace::of("t", &docs, false);
        let order: Vec<(&str, usize, i64)> = trace
            .spans
            .iter()
            .map(|s| (s.span_id.as_str(), s.depth, s.offset_us))
            .collect();
        assert_eq!(
            order,
            [
                ("a", 0, 0),
                ("b", 1, 10),
                ("d", 2, 30),
                ("c", 1, 50),
                ("x", 0, 200)
            ]
        );
        assert_eq!((trace.start_us, trace.duration_us), (1_000, 201));
        // Times at the ends of the range saturate.
        let far = [
            doc("a", None, i64::MIN, 5),
            doc("b", Some("a"), i64::MAX, i64::MAX),
        ];
        let trace = Trace::of("t", &far, false);
        assert_eq!(trace.duration_us, i64::MAX);
        assert_eq!(trace.spans[1].offset_us, i64::MAX);
    }

    #[test]
    fn status_filters() {
        assert_eq!(status_range("5xx").unwrap(), (500, 599));
        assert_eq!(status_range("404").unwrap(), (404, 404));
        assert!(status_range("9xx").is_err());
        assert!(status_range("bad").is_err());
    }
}
