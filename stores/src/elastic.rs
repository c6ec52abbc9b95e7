//! The events store on Elasticsearch / OpenSearch (`KM_ELASTICSEARCH_URL`): one index
//! per kind per day, `<prefix>-<kind>-YYYY.MM.DD`, created from index templates with
//! explicit mappings; writes in `_bulk` batches; retention drops whole daily indices.
//! Text search (`EventQuery::text`) runs on a lowercased keyword copy of each event's
//! text (`text`); daily indices created before that field was mapped lack it, so their
//! events are found by every filter but text.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use elasticsearch::http::request::JsonBody;
use elasticsearch::http::transport::{
    MultiNodeConnectionPool, SingleNodeConnectionPool, TransportBuilder,
};
use elasticsearch::http::{Method, StatusCode, Url};
use elasticsearch::indices::{
    IndicesDeleteParts, IndicesGetIndexTemplateParts, IndicesPutIndexTemplateParts,
};
use elasticsearch::params::Conflicts;
use elasticsearch::{BulkParts, DeleteByQueryParts, Elasticsearch, SearchParts};
use serde_json::{Value, json};

use super::{
    Cutoffs, EventKind, EventQuery, EventRecord, Events, MetricPoint, MetricQuery, RouteLatency,
    SpanQuery, StoreError, StoreResult,
};

const TIMEOUT: Duration = Duration::from_secs(10);
/// The version of km's index templates (their `version`): a km refuses templates a
/// newer km installed rather than put older mappings back.
pub const TEMPLATE_VERSION: i64 = 2;
const DAY_MS: i64 = 86_400_000;
/// Most servers, apps per server and metrics per app one histogram query returns.
const MAX_TERMS: u32 = 10_000;
const METRICS: &str = "metrics";
/// Documents per `_bulk` request (a shutdown flush can hold tens of thousands).
const BULK_DOCS: usize = 1_000;
/// Characters of an event's text indexed for search: a keyword term over Lucene's
/// 32766 bytes (at most 4 a character) would get the whole document refused.
const TEXT_CHARS: usize = 8_000;
/// A delete by query visits every matching document: longer than a search.
const DELETE_TIMEOUT: Duration = Duration::from_secs(300);

pub struct ElasticEvents {
    client: Elasticsearch,
    prefix: String,
}

fn unavailable(reason: impl ToString) -> StoreError {
    StoreError::Unavailable {
        store: "events",
        reason: reason.to_string(),
    }
}

/// A client error with its causes (`error sending request: operation timed out`).
fn failed(e: elasticsearch::Error) -> StoreError {
    let mut reason = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !reason.ends_with(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        cause = c.source();
    }
    unavailable(reason)
}

/// `host:port` or `http(s)://host:port`, space-separated (as the seeds write them).
pub fn parse_urls(value: &str) -> Result<Vec<Url>, String> {
    let urls: Result<Vec<Url>, String> = value
        .split_whitespace()
        .map(|host| {
            let full = if host.contains("://") {
                host.to_string()
            } else {
                format!("http://{host}")
            };
            Url::parse(&full)
                .map_err(|e| format!("{host:?} is not a URL like http://10.0.0.5:9200: {e}"))
        })
        .collect();
    urls.and_then(|u| {
        if u.is_empty() {
            Err("no URL given".into())
        } else {
            Ok(u)
        }
    })
}

/// The day of `at` as in index names: `2026.11.22`.
fn day(at: i64) -> String {
    let date = crate::ids::utc_text(at - at.rem_euclid(DAY_MS));
    date.get(..10).unwrap_or("1970-01-01").replace('-', ".")
}

/// The start of the day named `2026.11.22`, epoch ms.
fn day_start(name: &str) -> Option<i64> {
    let date = name.replace('.', "-");
    bson::DateTime::parse_rfc3339_str(format!("{date}T00:00:00Z"))
        .ok()
        .map(|d| d.timestamp_millis())
}

/// `host:port` of each node, for messages (never the credentials).
pub fn hosts(urls: &[Url]) -> String {
    urls.iter()
        .map(|u| {
            u.host_str().unwrap_or("?").to_string()
                + ":"
                + &u.port_or_known_default().unwrap_or(0).to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A client for `urls` (nothing sent yet) with a request timeout, and the hosts for
/// messages (the caller names the setting in errors).
pub fn open(urls: &[Url], timeout: Duration) -> anyhow::Result<(Elasticsearch, String)> {
    let hosts = hosts(urls);
    let builder = match urls {
        [one] => TransportBuilder::new(SingleNodeConnectionPool::new(one.clone())),
        many => TransportBuilder::new(MultiNodeConnectionPool::round_robin(many.to_vec(), None)),
    };
    let transport = builder
        .timeout(timeout)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot use {hosts}: {e}"))?;
    Ok((Elasticsearch::new(transport), hosts))
}

/// Whether the server answering `GET /` with `info` is one the store works with:
/// Elasticsearch 7.10 or newer (composable index templates), or any OpenSearch. The
/// error completes "<hosts> ...".
pub fn supported_version(info: &Value) -> Result<(), String> {
    let version = info["version"]["number"].as_str().unwrap_or("0");
    if info["version"]["distribution"] == "opensearch" {
        return Ok(());
    }
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    if (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) < (7, 10) {
        return Err(format!(
            "runs Elasticsearch {version}; 7.10 or newer (or OpenSearch) is needed"
        ));
    }
    Ok(())
}

impl ElasticEvents {
    /// Connects, checks the server and installs the index templates. Errors name the
    /// host.
    pub async fn connect(urls: &[Url], prefix: &str) -> anyhow::Result<Self> {
        let (client, hosts) = open(urls, TIMEOUT)?;
        let store = ElasticEvents {
            client,
            prefix: prefix.to_string(),
        };
        let info = store
            .client
            .info()
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {hosts}: {e}"))?;
        let status = info.status_code();
        let info: Value = info.json().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!(
                "{hosts} answered {status}: {}",
                info["error"]["reason"].as_str().unwrap_or("unknown error")
            );
        }
        supported_version(&info).map_err(|e| anyhow::anyhow!("{hosts} {e}"))?;
        store
            .install_templates()
            .await
            .map_err(|e| anyhow::anyhow!("cannot install index templates on {hosts}: {e}"))?;
        Ok(store)
    }

    fn index(&self, kind: &str, day: &str) -> String {
        format!("{}-{kind}-{day}", self.prefix)
    }

    /// Whether the daily index `name` (`<prefix>-<kind>-YYYY.MM.DD`) ended before its
    /// kind's cutoff.
    fn expired(&self, name: &str, cutoffs: Cutoffs) -> bool {
        let Some((kind, day)) = name
            .strip_prefix(&format!("{}-", self.prefix))
            .and_then(|rest| rest.rsplit_once('-'))
        else {
            return false;
        };
        day_start(day).is_some_and(|start| start + DAY_MS <= cutoffs.of(kind))
    }

    async fn install_templates(&self) -> Result<(), String> {
        let keyword = json!({"type": "keyword"});
        let date = json!({"type": "date", "format": "epoch_millis"});
        let events_patterns: Vec<String> = EventKind::ALL
            .iter()
            .map(|k| self.index(k.as_str(), "*"))
            .collect();
        let events = json!({
            "version": TEMPLATE_VERSION,
            "index_patterns": events_patterns,
            "template": {
                "settings": {"number_of_replicas": 0, "analysis": {"normalizer": {
                    "km_lowercase": {"type": "custom", "filter": ["lowercase"]},
                }}},
                "mappings": {"dynamic": false, "properties": {
                    "bucket_id": keyword, "server_name": keyword, "app_name": keyword,
                    "type": keyword, "name": keyword, "at": date,
                    "text": {"type": "keyword", "normalizer": "km_lowercase"},
                    "doc": {"type": "keyword", "index": false, "doc_values": false},
                    // Spans only (version 2).
                    "route": keyword, "status": {"type": "integer"}, "duration": {"type": "long"},
                    "entry": {"type": "boolean"},
                }},
            },
        });
        let double = json!({"type": "double"});
        let metrics = json!({
            "version": TEMPLATE_VERSION,
            "index_patterns": [self.index(METRICS, "*")],
            "template": {
                "settings": {"number_of_replicas": 0},
                "mappings": {"dynamic": false, "properties": {
                    "bucket_id": keyword, "server_name": keyword, "app_name": keyword, "name": keyword,
                    "unit": keyword, "agg_type": keyword, "pm_id": {"type": "long"}, "at": date,
                    "avg": double, "min": double, "max": double, "last": double, "count": {"type": "integer"},
                }},
            },
        });
        for (name, body) in [
            (format!("{}-events", self.prefix), events),
            (format!("{}-metrics", self.prefix), metrics),
        ] {
            let installed = self.template_version(&name).await?;
            if installed > TEMPLATE_VERSION {
                return Err(format!(
                    "template {name} was installed by a newer km (version {installed}, this km \
                     knows {TEMPLATE_VERSION}): run a newer km"
                ));
            }
            let response = self
                .client
                .indices()
                .put_index_template(IndicesPutIndexTemplateParts::Name(&name))
                .body(body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !response.status_code().is_success() {
                return Err(format!(
                    "template {name}: {}",
                    response.text().await.unwrap_or_default()
                ));
            }
        }
        Ok(())
    }

    /// The `version` of the index template `name`; 0 when there is none or it has none.
    async fn template_version(&self, name: &str) -> Result<i64, String> {
        let response = self
            .client
            .indices()
            .get_index_template(IndicesGetIndexTemplateParts::Name(name))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status_code() == StatusCode::NOT_FOUND {
            return Ok(0);
        }
        let body: Value = response.json().await.unwrap_or_default();
        Ok(body["index_templates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["index_template"]["version"].as_i64())
            .max()
            .unwrap_or(0))
    }

    /// Sends `lines` (action, document, ...) to `_bulk`, in requests of `BULK_DOCS`.
    /// Items refused for a reason that may pass (429, 5xx) fail the batch, which the
    /// writer sends again (ids are stable); items refused for good (a mapping conflict)
    /// are logged and skipped.
    async fn bulk(&self, mut lines: Vec<String>) -> StoreResult<()> {
        while !lines.is_empty() {
            let rest = lines.split_off(lines.len().min(2 * BULK_DOCS));
            self.bulk_request(lines).await?;
            lines = rest;
        }
        Ok(())
    }

    async fn bulk_request(&self, lines: Vec<String>) -> StoreResult<()> {
        let response = self
            .client
            .bulk(BulkParts::None)
            .body(lines)
            .send()
            .await
            .map_err(failed)?;
        let status = response.status_code();
        let body: Value = response.json().await.map_err(failed)?;
        if !status.is_success() {
            return Err(unavailable(format!(
                "bulk answered {status}: {}",
                body["error"]["reason"].as_str().unwrap_or("?")
            )));
        }
        if body["errors"] != true {
            return Ok(());
        }
        let items = body["items"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let failed: Vec<&Value> = items
            .iter()
            .filter_map(|i| i.get("index"))
            .filter(|i| i["status"].as_u64().is_none_or(|s| s >= 300))
            .collect();
        let retry = failed
            .iter()
            .filter(|i| i["status"].as_u64().is_none_or(|s| s == 429 || s >= 500))
            .count();
        let reason = failed
            .first()
            .map(|i| i["error"]["reason"].as_str().unwrap_or("?").to_string())
            .unwrap_or_default();
        if retry > 0 {
            return Err(unavailable(format!(
                "{retry} of {} items refused for now: {reason}",
                items.len()
            )));
        }
        tracing::warn!(
            rejected = failed.len(),
            reason,
            "events store rejected items for good"
        );
        Ok(())
    }

    /// The search answer; a missing index is an empty answer.
    async fn search_raw(&self, index: &str, body: Value) -> StoreResult<Value> {
        let response = self
            .client
            .search(SearchParts::Index(&[index]))
            .ignore_unavailable(true)
            .allow_no_indices(true)
            .body(body)
            .send()
            .await
            .map_err(failed)?;
        let status = response.status_code();
        let body: Value = response.json().await.map_err(failed)?;
        if status == StatusCode::NOT_FOUND {
            return Ok(Value::Null);
        }
        if !status.is_success() {
            return Err(unavailable(format!(
                "search answered {status}: {}",
                body["error"]["reason"].as_str().unwrap_or("?")
            )));
        }
        Ok(body)
    }

    async fn search(&self, index: &str, body: Value) -> StoreResult<Vec<Value>> {
        let mut body = self.search_raw(index, body).await?;
        match body["hits"]["hits"].take() {
            Value::Array(hits) => Ok(hits.into_iter().map(|mut h| h["_source"].take()).collect()),
            _ => Ok(Vec::new()),
        }
    }
}

/// The text `EventQuery::text` searches: a log's line, an exception's message and stack,
/// nothing of a span, the whole document otherwise (as `text_of` in the SQLite store), cut to `TEXT_CHARS`.
fn search_text(e: &EventRecord) -> String {
    // Spans are found by trace, route and status, never by text: nothing to index.
    if e.kind == EventKind::Span {
        return String::new();
    }
    if !matches!(e.kind, EventKind::Log | EventKind::Exception) {
        return e.doc.chars().take(TEXT_CHARS).collect();
    }
    let doc: Value = serde_json::from_str(&e.doc).unwrap_or_default();
    let text = match (&doc["data"], e.kind) {
        (Value::String(s), _) => s.clone(),
        (Value::Null, _) => String::new(),
        (data, EventKind::Exception) => [&data["message"], &data["stack"]]
            .iter()
            .filter_map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        (data, _) => data.to_string(),
    };
    text.chars().take(TEXT_CHARS).collect()
}

/// A `wildcard` pattern matching `text` anywhere, lowercased as the field is (the
/// pattern is not left to the server's normalizer nor to `case_insensitive`, which
/// Elasticsearch before 7.10 refuses).
fn contains_pattern(text: &str) -> String {
    let mut pattern = String::from("*");
    for c in text.to_lowercase().chars() {
        if matches!(c, '*' | '?' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    pattern
}

/// `filter` clauses for an event query (all of it but paging).
fn event_filter(q: &EventQuery) -> Vec<Value> {
    let mut filter = scope(&q.bucket_id, &q.app_name, &q.server_name);
    for (field, value) in [("type", &q.event_type), ("name", &q.name)] {
        if let Some(v) = value {
            filter.push(json!({"term": {field: v}}));
        }
    }
    let mut range = serde_json::Map::new();
    if let Some(before) = q.before {
        range.insert("lt".into(), before.into());
    }
    if let Some(after) = q.after {
        range.insert("gt".into(), after.into());
    }
    if !range.is_empty() {
        filter.push(json!({"range": {"at": range}}));
    }
    // Every text holds the empty string: no filter (which would also skip old indices).
    if let Some(text) = q.text.as_deref().filter(|t| !t.is_empty()) {
        filter.push(json!({"wildcard": {"text": {"value": contains_pattern(text)}}}));
    }
    filter
}

/// `filter` clauses for the entry spans matching `q`.
fn span_filter(q: &SpanQuery) -> Vec<Value> {
    let mut filter = scope(&q.bucket_id, &q.app_name, &q.server_name);
    filter.push(json!({"term": {"entry": true}}));
    filter.push(json!({"range": {"at": {"gte": q.since}}}));
    if let Some(route) = &q.route {
        filter.push(json!({"term": {"route": route}}));
    }
    if let Some((from, to)) = q.status {
        filter.push(json!({"range": {"status": {"gte": from, "lte": to}}}));
    }
    filter
}

/// The documents of search hits that asked for `_source: ["doc"]`.
fn docs_of(hits: Vec<Value>) -> Vec<String> {
    hits.into_iter()
        .filter_map(|mut h| match h["doc"].take() {
            Value::String(doc) => Some(doc),
            _ => None,
        })
        .collect()
}

/// `filter` clauses for a bucket and optional app / server.
fn scope(bucket_id: &str, app_name: &Option<String>, server_name: &Option<String>) -> Vec<Value> {
    let mut filter = vec![json!({"term": {"bucket_id": bucket_id}})];
    for (field, value) in [("app_name", app_name), ("server_name", server_name)] {
        if let Some(v) = value {
            filter.push(json!({"term": {field: v}}));
        }
    }
    filter
}

#[async_trait]
impl Events for ElasticEvents {
    fn kind(&self) -> &'static str {
        "elasticsearch"
    }

    async fn append(&self, events: Arc<[EventRecord]>) -> StoreResult<()> {
        let mut days: HashMap<i64, String> = HashMap::new();
        let mut lines = Vec::with_capacity(events.len() * 2);
        for e in events.iter() {
            let day = days
                .entry(e.at.div_euclid(DAY_MS))
                .or_insert_with(|| day(e.at));
            let id = e.content_id();
            lines.push(
                json!({"index": {"_index": self.index(e.kind.as_str(), day), "_id": id}})
                    .to_string(),
            );
            let mut doc = json!({
                "bucket_id": e.bucket_id, "server_name": e.server_name, "app_name": e.app_name,
                "type": e.event_type, "name": e.name, "at": e.at, "doc": e.doc,
                "text": search_text(e),
            });
            if let Some(span) = &e.span {
                doc["route"] = span.route.as_str().into();
                doc["status"] = span.status.into();
                doc["duration"] = span.duration_us.into();
                doc["entry"] = span.entry.into();
            }
            lines.push(doc.to_string());
        }
        self.bulk(lines).await
    }

    async fn query(&self, kind: EventKind, q: &EventQuery) -> StoreResult<Vec<String>> {
        let body = json!({
            "query": {"bool": {"filter": event_filter(q)}},
            "sort": [{"at": "desc"}],
            "from": q.offset, "size": q.limit, "_source": ["doc"],
        });
        let hits = self.search(&self.index(kind.as_str(), "*"), body).await?;
        Ok(docs_of(hits))
    }

    async fn slowest_spans(&self, q: &SpanQuery) -> StoreResult<Vec<String>> {
        let body = json!({
            "query": {"bool": {"filter": span_filter(q)}},
            "sort": [{"duration": "desc"}, {"at": "desc"}],
            "size": q.limit, "_source": ["doc"],
        });
        let hits = self
            .search(&self.index(EventKind::Span.as_str(), "*"), body)
            .await?;
        Ok(docs_of(hits))
    }

    async fn route_latencies(&self, q: &SpanQuery) -> StoreResult<Vec<RouteLatency>> {
        let stats = json!({
            "p": {"percentiles": {"field": "duration", "percents": [50, 95, 99]}},
            "max": {"max": {"field": "duration"}},
            "errors": {"filter": {"range": {"status": {"gte": 500}}}},
        });
        let routes = json!({"terms": {"field": "route", "size": q.limit}, "aggs": stats});
        let body = json!({
            "size": 0,
            "query": {"bool": {"filter": span_filter(q)}},
            "aggs": {"apps": {"terms": {"field": "app_name", "size": MAX_TERMS}, "aggs": {"routes": routes}}},
        });
        let answer = self
            .search_raw(&self.index(EventKind::Span.as_str(), "*"), body)
            .await?;
        let mut found = Vec::new();
        for app in buckets(&answer["aggregations"]["apps"]) {
            for route in buckets(&app["routes"]) {
                let percentile =
                    |p: &str| route["p"]["values"][p].as_f64().unwrap_or_default().round() as i64;
                found.push(RouteLatency {
                    app_name: app["key"].as_str().unwrap_or_default().to_string(),
                    route: route["key"].as_str().unwrap_or_default().to_string(),
                    count: route["doc_count"].as_u64().unwrap_or_default(),
                    errors: route["errors"]["doc_count"].as_u64().unwrap_or_default(),
                    p50_us: percentile("50.0"),
                    p95_us: percentile("95.0"),
                    p99_us: percentile("99.0"),
                    max_us: route["max"]["value"].as_f64().unwrap_or_default() as i64,
                });
            }
        }
        found.sort_by(|a, b| {
            (b.count, &a.app_name, &a.route).cmp(&(a.count, &b.app_name, &b.route))
        });
        found.truncate(q.limit as usize);
        Ok(found)
    }

    async fn count_histogram(
        &self,
        kind: EventKind,
        q: &EventQuery,
        step_ms: i64,
    ) -> StoreResult<Vec<(i64, u64)>> {
        // Fixed intervals start at multiples of the interval since the epoch.
        let steps = json!({"date_histogram": {
            "field": "at", "fixed_interval": format!("{}ms", step_ms.max(1)), "min_doc_count": 1,
        }});
        let body = json!({
            "size": 0,
            "query": {"bool": {"filter": event_filter(q)}},
            "aggs": {"steps": steps},
        });
        let answer = self
            .search_raw(&self.index(kind.as_str(), "*"), body)
            .await?;
        Ok(buckets(&answer["aggregations"]["steps"])
            .iter()
            .filter_map(|step| Some((step["key"].as_i64()?, step["doc_count"].as_u64()?)))
            .collect())
    }

    async fn delete_matching(&self, kind: EventKind, q: &EventQuery) -> StoreResult<u64> {
        let index = self.index(kind.as_str(), "*");
        let response = self
            .client
            .delete_by_query(DeleteByQueryParts::Index(&[&index]))
            .ignore_unavailable(true)
            .allow_no_indices(true)
            // A document written again meanwhile (a retried batch) is left, not a failure.
            .conflicts(Conflicts::Proceed)
            // Queries right after see the deletion.
            .refresh(true)
            .request_timeout(DELETE_TIMEOUT)
            .body(json!({"query": {"bool": {"filter": event_filter(q)}}}))
            .send()
            .await
            .map_err(failed)?;
        let status = response.status_code();
        let body: Value = response.json().await.map_err(failed)?;
        let failure = &body["failures"][0];
        if !status.is_success() || !failure.is_null() {
            let reason = body["error"]["reason"]
                .as_str()
                .or_else(|| failure["cause"]["reason"].as_str())
                .unwrap_or("?");
            return Err(unavailable(format!(
                "delete by query answered {status}: {reason}"
            )));
        }
        Ok(body["deleted"].as_u64().unwrap_or_default())
    }

    async fn append_metrics(&self, points: Arc<[MetricPoint]>) -> StoreResult<()> {
        let mut days: HashMap<i64, String> = HashMap::new();
        let mut lines = Vec::with_capacity(points.len() * 2);
        for p in points.iter() {
            let day = days
                .entry(p.at.div_euclid(DAY_MS))
                .or_insert_with(|| day(p.at));
            let doc = json!({
                "bucket_id": p.bucket_id, "server_name": p.server_name, "app_name": p.app_name,
                "pm_id": p.pm_id, "name": p.name, "unit": p.unit, "agg_type": p.agg_type, "at": p.at,
                "avg": p.avg, "min": p.min, "max": p.max, "last": p.last, "count": p.count,
            })
            .to_string();
            let id = p.content_id();
            lines.push(
                json!({"index": {"_index": self.index(METRICS, day), "_id": id}}).to_string(),
            );
            lines.push(doc);
        }
        self.bulk(lines).await
    }

    async fn metric_histogram(
        &self,
        q: &MetricQuery,
        step_ms: i64,
    ) -> StoreResult<Vec<MetricPoint>> {
        let mut filter = scope(&q.bucket_id, &q.app_name, &q.server_name);
        filter.push(match q.until {
            Some(until) => json!({"range": {"at": {"gte": q.since, "lt": until}}}),
            None => json!({"range": {"at": {"gte": q.since}}}),
        });
        if !q.names.is_empty() {
            filter.push(json!({"terms": {"name": q.names}}));
        }
        let stats = json!({
            "avg": {"weighted_avg": {"value": {"field": "avg"}, "weight": {"field": "count"}}},
            "min": {"min": {"field": "min"}},
            "max": {"max": {"field": "max"}},
            "count": {"sum": {"field": "count"}},
            "latest": {"top_hits": {"size": 1, "sort": [{"at": "desc"}], "_source": ["last", "unit", "agg_type"]}},
        });
        let steps = json!({"date_histogram": {"field": "at", "fixed_interval": format!("{}ms", step_ms.max(1)), "min_doc_count": 1}, "aggs": stats});
        let by = |field: &str, size: u32, inner: Value| json!({"terms": {"field": field, "size": size}, "aggs": {"by": inner}});
        // One series per instance: a level of pm_ids between the app and its metrics.
        let metrics = by("name", MAX_TERMS, steps);
        let below_app = if q.by_instance {
            by("pm_id", MAX_TERMS, metrics)
        } else {
            json!({"filter": {"match_all": {}}, "aggs": {"by": metrics}})
        };
        let body = json!({
            "size": 0,
            "query": {"bool": {"filter": filter}},
            "aggs": {"by": by("server_name", MAX_TERMS, by("app_name", MAX_TERMS, below_app))},
        });
        let answer = self.search_raw(&self.index(METRICS, "*"), body).await?;
        let mut points = Vec::new();
        for server in buckets(&answer["aggregations"]["by"]) {
            for app in buckets(&server["by"]) {
                // Without instances, the level is one bucket (`filter`) holding them all.
                let instances = match app["by"]["buckets"].as_array() {
                    Some(list) => list.clone(),
                    None => vec![app["by"].clone()],
                };
                for instance in &instances {
                    let pm_id = instance["key"].as_i64().unwrap_or(0);
                    for metric in buckets(&instance["by"]) {
                        for step in buckets(&metric["by"]) {
                            let latest = &step["latest"]["hits"]["hits"][0]["_source"];
                            let text = |v: &Value| v.as_str().map(Arc::from);
                            points.push(MetricPoint {
                                bucket_id: Arc::from(q.bucket_id.as_str()),
                                server_name: text(&server["key"]).unwrap_or_default(),
                                app_name: text(&app["key"]).unwrap_or_default(),
                                pm_id,
                                name: text(&metric["key"]).unwrap_or_default(),
                                unit: text(&latest["unit"]),
                                agg_type: text(&latest["agg_type"]),
                                at: step["key"].as_i64().unwrap_or_default(),
                                avg: step["avg"]["value"].as_f64().unwrap_or_default(),
                                min: step["min"]["value"].as_f64().unwrap_or_default(),
                                max: step["max"]["value"].as_f64().unwrap_or_default(),
                                last: latest["last"].as_f64().unwrap_or_default(),
                                count: step["count"]["value"].as_f64().unwrap_or_default() as u32,
                            });
                        }
                    }
                }
            }
        }
        points.sort_by(|a, b| {
            (a.at, &a.server_name, &a.app_name, a.pm_id, &a.name).cmp(&(
                b.at,
                &b.server_name,
                &b.app_name,
                b.pm_id,
                &b.name,
            ))
        });
        Ok(points)
    }

    async fn delete_before(&self, cutoffs: Cutoffs) -> StoreResult<u64> {
        let pattern = format!("{}-*", self.prefix);
        let response = self
            .client
            .send(
                Method::Get,
                &format!("/_cat/indices/{pattern}"),
                Default::default(),
                Some(&[("format", "json"), ("h", "index")]),
                None::<JsonBody<Value>>,
                None,
            )
            .await
            .map_err(failed)?;
        let listed: Value = response.json().await.map_err(failed)?;
        let old: Vec<String> = listed
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i["index"].as_str())
            .filter(|name| self.expired(name, cutoffs))
            .map(str::to_string)
            .collect();
        if old.is_empty() {
            return Ok(0);
        }
        let names: Vec<&str> = old.iter().map(String::as_str).collect();
        let response = self
            .client
            .indices()
            .delete(IndicesDeleteParts::Index(&names))
            .send()
            .await
            .map_err(failed)?;
        if !response.status_code().is_success() {
            return Err(unavailable(format!(
                "deleting {} old indices: {}",
                names.len(),
                response.text().await.unwrap_or_default()
            )));
        }
        Ok(old.len() as u64)
    }
}

/// The buckets of an aggregation.
fn buckets(aggregation: &Value) -> &[Value] {
    aggregation["buckets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_urls() {
        assert_eq!(day(1_795_314_237_401), "2026.11.22");
        assert_eq!(day_start("2026.11.22"), Some(1_795_305_600_000));
        assert_eq!(day_start("2026.13.40"), None);
        let urls = parse_urls("es1:9200  https://es2:9243").unwrap();
        assert_eq!(
            urls.iter().map(Url::as_str).collect::<Vec<_>>(),
            ["http://es1:9200/", "https://es2:9243/"]
        );
        assert!(parse_urls("  ").is_err());
        assert!(parse_urls("http://[bad").is_err());
    }

    #[test]
    fn search_text_and_patterns() {
        let event = |kind, doc: Value| EventRecord {
            id: "e".into(),
            kind,
            bucket_id: "b".into(),
            server_name: "s".into(),
            app_name: None,
            event_type: "t".into(),
            name: None,
            at: 0,
            doc: doc.to_string(),
            span: None,
        };
        let exception =
            json!({"data": {"message": "Boom", "stack": "Error: Boom\n  at x", "name": "E"}});
        assert_eq!(
            search_text(&event(EventKind::Exception, exception)),
            "Boom\nError: Boom\n  at x"
        );
        let long = "é".repeat(TEXT_CHARS + 10);
        let text = search_text(&event(EventKind::Log, json!({"data": long})));
        assert_eq!(text.chars().count(), TEXT_CHARS, "cut on a character");
        let other = event(EventKind::Event, json!({"data": {"x": 1}}));
        assert_eq!(search_text(&other), other.doc);
        assert_eq!(contains_pattern(r"A*b?C\"), r"*a\*b\?c\\*");
    }
}
