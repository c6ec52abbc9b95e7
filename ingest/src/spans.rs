//! Spans of traces: pm2's `trace-span` frames (a Zipkin v2 span in `data`), Zipkin v2
//! JSON and OTLP spans posted by any service. Each becomes an event of kind `Span`,
//! found by its trace (the event's `name`) and listed by its [`SpanFacts`].

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use serde_json::{Map, Value, json};

use crate::budget::{MAX_SPAN_BYTES, SPAN_CLOCK_SKEW_MS};
use km_stores::{EventKind, EventRecord, SpanFacts};

/// Characters kept of a route: a path with a long tail stays one readable route.
const MAX_ROUTE_CHARS: usize = 200;
/// Characters of a trace or span id (128 bits in hex).
const MAX_ID_CHARS: usize = 32;
/// Longest duration believed (a day, µs); longer is cut to it.
const MAX_DURATION_US: i64 = 86_400_000_000;

/// Where a span was received.
pub struct SpanOrigin<'a> {
    pub bucket_id: &'a str,
    pub server_name: &'a str,
    pub app_name: &'a str,
    /// The pm2 process (`null` for spans posted over HTTP).
    pub pm_id: Value,
    pub now: i64,
}

/// Why a span was not stored.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SpanRefusal {
    #[error("a span needs traceId and id (hex, at most {MAX_ID_CHARS} characters)")]
    NoIds,
    #[error("a span is over {MAX_SPAN_BYTES} bytes ({0})")]
    TooLarge(usize),
}

/// The stored event of a Zipkin v2 span.
pub fn from_zipkin(origin: &SpanOrigin, span: Value) -> Result<EventRecord, SpanRefusal> {
    let id = |field: &str| {
        span[field]
            .as_str()
            .filter(|id| !id.is_empty() && id.len() <= MAX_ID_CHARS)
            .filter(|id| id.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_ascii_lowercase)
    };
    let (Some(trace_id), Some(_)) = (id("traceId"), id("id")) else {
        return Err(SpanRefusal::NoIds);
    };
    let start_us = span["timestamp"].as_f64().unwrap_or(0.0);
    let at = (start_us / 1000.0) as i64;
    // A start far from now (a wrong clock, a forged value) is filed at arrival: retention
    // and the time filters go by it.
    let at = if at.abs_diff(origin.now) <= SPAN_CLOCK_SKEW_MS.unsigned_abs() {
        at
    } else {
        origin.now
    };
    let kind = span["kind"].as_str().unwrap_or("").to_ascii_uppercase();
    let facts = SpanFacts {
        route: route_of(&span),
        status: tag(&span, &["http.response.status_code", "http.status_code"])
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        duration_us: (span["duration"].as_f64().unwrap_or(0.0) as i64).clamp(0, MAX_DURATION_US),
        entry: matches!(kind.as_str(), "SERVER" | "CONSUMER") || id("parentId").is_none(),
    };
    let mut doc = Map::new();
    doc.insert("at".into(), at.into());
    doc.insert("server_name".into(), origin.server_name.into());
    doc.insert("app_name".into(), origin.app_name.into());
    doc.insert("pm_id".into(), origin.pm_id.clone());
    doc.insert("route".into(), facts.route.as_str().into());
    doc.insert("status".into(), facts.status.into());
    doc.insert("duration_us".into(), facts.duration_us.into());
    doc.insert("data".into(), span);
    let doc = Value::Object(doc).to_string();
    if doc.len() > MAX_SPAN_BYTES {
        return Err(SpanRefusal::TooLarge(doc.len()));
    }
    Ok(EventRecord {
        id: km_stores::ids::new_object_id(),
        kind: EventKind::Span,
        bucket_id: origin.bucket_id.to_string(),
        server_name: origin.server_name.to_string(),
        app_name: Some(origin.app_name.to_string()),
        event_type: if kind.is_empty() { "SPAN".into() } else { kind },
        name: Some(trace_id),
        at,
        doc,
        span: Some(Box::new(facts)),
    })
}

/// The first of `names` the span's tags hold, as text.
fn tag<'a>(span: &'a Value, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|name| span["tags"][*name].as_str())
        .filter(|v| !v.is_empty())
}

/// What a span is grouped by: `GET /users/:id` for HTTP (the framework's route when the
/// instrumentation knows it, else the path with its ids replaced), the span's name
/// otherwise.
pub fn route_of(span: &Value) -> String {
    let method = tag(span, &["http.request.method", "http.method"]);
    let path = tag(span, &["http.route"]).map(str::to_string).or_else(|| {
        tag(span, &["url.path", "http.target", "http.path"])
            .map(normalize_path)
            .or_else(|| tag(span, &["url.full", "http.url"]).map(url_route))
    });
    let route = match (method, path) {
        (Some(method), Some(path)) => format!("{method} {path}"),
        _ => match span["name"].as_str().filter(|n| !n.is_empty()) {
            Some(name) => name.to_string(),
            None => "unnamed".to_string(),
        },
    };
    match route.char_indices().nth(MAX_ROUTE_CHARS) {
        Some((cut, _)) => route[..cut].to_string(),
        None => route,
    }
}

/// An outgoing call's route: its host and path (`api.example.com/users/:id`).
fn url_route(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    match rest.find('/') {
        Some(slash) => format!("{}{}", &rest[..slash], normalize_path(&rest[slash..])),
        None => rest.split(['?', '#']).next().unwrap_or(rest).to_string(),
    }
}

/// A path without its query, each segment that looks like an id (digits, a UUID, a long
/// hex string) replaced by `:id`, so that `/users/1` and `/users/2` are one route.
pub fn normalize_path(target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or("");
    path.split('/')
        .map(|segment| {
            if looks_like_id(segment) {
                ":id"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn looks_like_id(segment: &str) -> bool {
    let digits = segment.bytes().filter(u8::is_ascii_digit).count();
    let hex_or_dash = segment.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    !segment.is_empty()
        && (digits == segment.len() || (hex_or_dash && segment.len() >= 16 && digits > 0))
}

/// An OTLP/HTTP traces request's body (protobuf, or OTLP's JSON when `json`).
pub fn decode_otlp(body: &[u8], json: bool) -> Result<ExportTraceServiceRequest, String> {
    if json {
        serde_json::from_slice(body).map_err(|e| format!("not OTLP JSON: {e}"))
    } else {
        ExportTraceServiceRequest::decode(body).map_err(|e| format!("not OTLP protobuf: {e}"))
    }
}

/// The OTLP answer to a traces request (protobuf, or JSON when `json`), telling of the
/// spans refused if any.
pub fn otlp_response(rejected: usize, reason: &str, json: bool) -> Vec<u8> {
    let response = ExportTraceServiceResponse {
        partial_success: (rejected > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: rejected as i64,
            error_message: reason.to_string(),
        }),
    };
    if json {
        serde_json::to_vec(&response).unwrap_or_default()
    } else {
        response.encode_to_vec()
    }
}

/// Each span of an OTLP request as a Zipkin span, with its service (`service.name`) and
/// host (`host.name`), so that every span is stored in one shape.
pub fn zipkin_of_otlp(request: ExportTraceServiceRequest) -> Vec<(String, Option<String>, Value)> {
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = tags(
            resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default(),
        );
        let text = |key: &str| {
            resource
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let service = text("service.name").unwrap_or_else(|| "unknown_service".into());
        let host = text("host.name");
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            spans.push((
                service.clone(),
                host.clone(),
                zipkin_span(span, &service, &resource),
            ));
        }
    }
    spans
}

fn zipkin_span(span: Span, service: &str, resource: &Map<String, Value>) -> Value {
    let mut tags_of_span = resource.clone();
    tags_of_span.extend(tags(span.attributes));
    if let Some(status) = span.status.filter(|s| s.code == StatusCode::Error as i32) {
        let message = if status.message.is_empty() {
            "error".into()
        } else {
            status.message
        };
        tags_of_span.insert("error".into(), message.into());
    }
    let start = span.start_time_unix_nano;
    let mut zipkin = json!({
        "traceId": hex::encode(&span.trace_id), "id": hex::encode(&span.span_id),
        "name": span.name, "timestamp": start / 1000,
        "duration": span.end_time_unix_nano.saturating_sub(start) / 1000,
        "localEndpoint": {"serviceName": service}, "tags": tags_of_span,
    });
    let kind = match SpanKind::try_from(span.kind) {
        Ok(SpanKind::Server) => Some("SERVER"),
        Ok(SpanKind::Client) => Some("CLIENT"),
        Ok(SpanKind::Producer) => Some("PRODUCER"),
        Ok(SpanKind::Consumer) => Some("CONSUMER"),
        _ => None,
    };
    if let Some(kind) = kind {
        zipkin["kind"] = kind.into();
    }
    if !span.parent_span_id.is_empty() {
        zipkin["parentId"] = hex::encode(&span.parent_span_id).into();
    }
    zipkin
}

/// OTLP attributes as Zipkin tags: every value as text.
fn tags(attributes: Vec<KeyValue>) -> Map<String, Value> {
    attributes
        .into_iter()
        .map(|kv| {
            let value = match kv.value.and_then(|v| v.value) {
                Some(AnyValue::StringValue(s)) => s,
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                Some(AnyValue::BytesValue(b)) => hex::encode(b),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key, Value::String(value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(now: i64) -> SpanOrigin<'static> {
        SpanOrigin {
            bucket_id: "b",
            server_name: "web-1",
            app_name: "api",
            pm_id: 0.into(),
            now,
        }
    }

    /// A span as pm2 7 `--trace` sends it (its tags shortened).
    fn pm2_span(kind: &str, parent: Option<&str>) -> Value {
        let mut span = json!({
            "traceId": "F74B71D512FB2D5CA268A68F7C6D7599", "id": "8bd9beab60ad112e",
            "name": "GET", "kind": kind, "timestamp": 1_796_658_078_525_000_i64, "duration": 20606,
            "localEndpoint": {"serviceName": "traced"},
            "tags": {"http.method": "GET", "http.status_code": "503", "http.target": "/users/42?x=1"},
        });
        if let Some(parent) = parent {
            span["parentId"] = parent.into();
        }
        span
    }

    #[test]
    fn a_server_span_is_an_entry_of_its_trace() {
        let now = 1_796_658_079_052;
        let e = from_zipkin(&origin(now), pm2_span("SERVER", Some("567785f04b889459"))).unwrap();
        assert_eq!(e.kind, EventKind::Span);
        assert_eq!(e.name.as_deref(), Some("f74b71d512fb2d5ca268a68f7c6d7599"));
        assert_eq!(e.event_type, "SERVER");
        assert_eq!(e.at, 1_796_658_078_525);
        let facts = *e.span.unwrap();
        assert_eq!(
            facts,
            SpanFacts {
                route: "GET /users/:id".into(),
                status: 503,
                duration_us: 20606,
                entry: true
            }
        );
        let client =
            from_zipkin(&origin(now), pm2_span("CLIENT", Some("8bd9beab60ad112e"))).unwrap();
        assert!(!client.span.unwrap().entry);
        let root = from_zipkin(&origin(now), pm2_span("CLIENT", None)).unwrap();
        assert!(
            root.span.unwrap().entry,
            "no parent: the trace starts there"
        );
    }

    #[test]
    fn hostile_spans_are_refused_or_filed_now() {
        let now = 1_796_658_079_052;
        for bad in [
            json!({}),
            json!({"traceId": "zz", "id": "1"}),
            json!({"traceId": "a".repeat(33), "id": "1"}),
            json!("x"),
        ] {
            assert_eq!(from_zipkin(&origin(now), bad), Err(SpanRefusal::NoIds));
        }
        let mut far = pm2_span("SERVER", None);
        far["timestamp"] = (-1e30).into();
        far["duration"] = (-5).into();
        let e = from_zipkin(&origin(now), far).unwrap();
        assert_eq!((e.at, e.span.unwrap().duration_us), (now, 0));
        let mut huge = pm2_span("SERVER", None);
        huge["tags"]["big"] = "x".repeat(MAX_SPAN_BYTES).into();
        assert!(matches!(
            from_zipkin(&origin(now), huge),
            Err(SpanRefusal::TooLarge(_))
        ));
    }

    #[test]
    fn routes_group_requests() {
        let route = |tags: Value| route_of(&json!({"name": "op", "tags": tags}));
        assert_eq!(
            route(json!({"http.method": "GET", "http.route": "/users/:user"})),
            "GET /users/:user"
        );
        assert_eq!(
            route(
                json!({"http.request.method": "POST", "url.path": "/orders/9f1c2a7e-5b3d-4c2a-9e1f-0a1b2c3d4e5f/items"})
            ),
            "POST /orders/:id/items"
        );
        assert_eq!(
            route(json!({"http.method": "GET", "http.url": "http://127.0.0.1:3000/inner/7?x=1"})),
            "GET 127.0.0.1:3000/inner/:id"
        );
        assert_eq!(
            route(json!({"http.method": "GET", "http.target": "/v2/abcdef"})),
            "GET /v2/abcdef"
        );
        assert_eq!(
            route(json!({"http.method": "GET", "http.path": "/zip/7"})),
            "GET /zip/:id",
            "Zipkin's own tag"
        );
        assert_eq!(route(json!({"db.system": "redis"})), "op");
        assert_eq!(route_of(&json!({})), "unnamed");
        let long =
            route(json!({"http.method": "GET", "url.path": format!("/{}", "é".repeat(300))}));
        assert_eq!(long.chars().count(), MAX_ROUTE_CHARS);
    }

    #[test]
    fn otlp_spans_become_zipkin_spans() {
        // OTLP's JSON: ids in hex, times as strings, kinds as numbers.
        let body = json!({"resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": "checkout"}},
                {"key": "host.name", "value": {"stringValue": "h1"}}]},
            "scopeSpans": [{"spans": [{
                "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
                "parentSpanId": "", "name": "GET /things", "kind": 2,
                "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": "1544712661000000000",
                "attributes": [{"key": "http.request.method", "value": {"stringValue": "GET"}},
                               {"key": "http.response.status_code", "value": {"intValue": "200"}}],
                "status": {"code": 2, "message": "boom"}}]}]}]});
        let request = decode_otlp(body.to_string().as_bytes(), true).unwrap();
        // The same request in protobuf.
        assert_eq!(
            decode_otlp(&request.encode_to_vec(), false).unwrap(),
            request
        );
        let spans = zipkin_of_otlp(request);
        let (service, host, zipkin) = &spans[0];
        assert_eq!(
            (service.as_str(), host.as_deref()),
            ("checkout", Some("h1"))
        );
        assert_eq!(zipkin["traceId"], "5b8efff798038103d269b633813fc60c");
        assert_eq!(zipkin["kind"], "SERVER");
        assert_eq!(zipkin["timestamp"], 1_544_712_660_000_000_u64);
        assert_eq!(zipkin["duration"], 1_000_000);
        assert_eq!(zipkin["tags"]["http.response.status_code"], "200");
        assert_eq!(zipkin["tags"]["error"], "boom");
        assert!(zipkin.get("parentId").is_none());
        assert!(decode_otlp(b"{", true).is_err());
        assert!(decode_otlp(b"\xff\xff", false).is_err());
    }
}
