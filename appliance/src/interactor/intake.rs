//! Span intakes for services without pm2: Zipkin v2 JSON (`POST /api/v2/spans`) and
//! OTLP/HTTP traces (`POST /v1/traces`, protobuf or JSON), authenticated by a bucket's
//! keys: HTTP Basic with the public key as user and the secret key as password, or the
//! agent's `X-KM-PUBLIC` / `X-KM-SECRET` headers. Bodies may be gzip-compressed.

use std::io::Read;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::{MAX_SERVER_NAME, Refusal, authenticate, header};
use km_core::app::AppState;
use km_ingest::budget::{MAX_SPAN_INTAKE_BYTES, MAX_SPANS_PER_REQUEST};
use km_ingest::spans::{self, SpanOrigin};
use km_stores::Bucket;
use km_stores::ids::now_ms;

/// The bucket whose keys the request carries.
async fn bucket_of(app: &AppState, headers: &HeaderMap) -> Result<Bucket, Refusal> {
    let basic = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok());
    match basic.as_deref().and_then(|pair| pair.split_once(':')) {
        Some((public_id, secret_id)) => authenticate(app, public_id, secret_id).await,
        None => {
            let public_id = header(headers, "x-km-public").map_err(|_| no_keys())?;
            let secret_id = header(headers, "x-km-secret").map_err(|_| no_keys())?;
            authenticate(app, public_id, secret_id).await
        }
    }
}

fn no_keys() -> Refusal {
    Refusal::new(
        StatusCode::UNAUTHORIZED,
        "no bucket keys: send Authorization: Basic base64(PUBLIC:SECRET), or the X-KM-PUBLIC \
         and X-KM-SECRET headers, with the keys from the bucket's settings",
    )
}

/// The request's body, gunzipped, within [`MAX_SPAN_INTAKE_BYTES`].
async fn body_of(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, Refusal> {
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a request is at most {MAX_SPAN_INTAKE_BYTES} bytes (uncompressed): send smaller batches"
            ),
        )
    };
    let raw = axum::body::to_bytes(body, MAX_SPAN_INTAKE_BYTES)
        .await
        .map_err(|_| too_large())?;
    let gzip = headers
        .get(CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    if !gzip {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .take(MAX_SPAN_INTAKE_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("the gzip body does not inflate: {e}"),
            )
        })?;
    if out.len() > MAX_SPAN_INTAKE_BYTES {
        return Err(too_large());
    }
    Ok(out)
}

fn too_many(count: usize) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "{count} spans in one request; at most {MAX_SPANS_PER_REQUEST}: send smaller batches"
        ),
    )
}

/// What was stored of a request's spans: how many were refused, and the first reason.
#[derive(Default)]
struct Stored {
    accepted: usize,
    refused: usize,
    reason: String,
}

/// Stores each `(service, host, zipkin span)` in the bucket, counting refusals.
fn store(app: &AppState, bucket_id: &str, spans: Vec<(String, Option<String>, Value)>) -> Stored {
    let now = now_ms();
    let mut stored = Stored::default();
    for (service, host, span) in spans {
        let server: String = host
            .unwrap_or_else(|| "unknown host".into())
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_SERVER_NAME)
            .collect();
        let service: String = service.chars().take(MAX_SERVER_NAME).collect();
        let origin = SpanOrigin {
            bucket_id,
            server_name: &server,
            app_name: &service,
            pm_id: Value::Null,
            now,
        };
        match app.ingest.span(spans::from_zipkin(&origin, span)) {
            Ok(()) => stored.accepted += 1,
            Err(refused) => {
                if stored.refused == 0 {
                    stored.reason = refused.to_string();
                }
                stored.refused += 1;
            }
        }
    }
    stored
}

/// `POST /api/v2/spans`: a Zipkin v2 JSON list of spans. 202 as Zipkin answers; the body
/// says how many were stored and why any was refused.
pub async fn zipkin(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let outcome = async {
        let bucket = bucket_of(&app, &headers).await?;
        let body = body_of(&headers, body).await?;
        let list: Vec<Value> = serde_json::from_slice(&body).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("not a Zipkin v2 JSON list of spans: {e}"),
            )
        })?;
        if list.len() > MAX_SPANS_PER_REQUEST {
            return Err(too_many(list.len()));
        }
        let spans = list
            .into_iter()
            .map(|span| {
                let service = span["localEndpoint"]["serviceName"]
                    .as_str()
                    .unwrap_or("unknown_service")
                    .to_string();
                let host = (span["tags"]["host.name"].as_str())
                    .or_else(|| span["localEndpoint"]["ipv4"].as_str())
                    .or_else(|| span["localEndpoint"]["ipv6"].as_str())
                    .map(str::to_string);
                (service, host, span)
            })
            .collect();
        Ok(store(&app, &bucket.id, spans))
    }
    .await;
    match outcome {
        Ok(stored) if stored.accepted == 0 && stored.refused > 0 => {
            Refusal::new(StatusCode::BAD_REQUEST, format!("every span was refused: {}", stored.reason)).into_response()
        }
        Ok(stored) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"accepted": stored.accepted, "refused": stored.refused, "reason": stored.reason})),
        )
            .into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

/// `POST /v1/traces`: an OTLP/HTTP export, answered in its own encoding (a partial
/// success names the spans refused).
pub async fn otlp(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let json = headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let outcome = async {
        let bucket = bucket_of(&app, &headers).await?;
        let body = body_of(&headers, body).await?;
        let request = spans::decode_otlp(&body, json)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e))?;
        let count: usize = (request.resource_spans.iter())
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        if count > MAX_SPANS_PER_REQUEST {
            return Err(too_many(count));
        }
        Ok(store(&app, &bucket.id, spans::zipkin_of_otlp(request)))
    }
    .await;
    match outcome {
        Ok(stored) => {
            let content_type = if json {
                "application/json"
            } else {
                "application/x-protobuf"
            };
            let body = spans::otlp_response(stored.refused, &stored.reason, json);
            ([(CONTENT_TYPE, content_type)], body).into_response()
        }
        Err(refusal) => refusal.into_response(),
    }
}
