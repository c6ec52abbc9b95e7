//! Spans from services without pm2: OpenTelemetry's own Node exporters (OTLP/HTTP JSON,
//! OTLP/HTTP protobuf gzipped, Zipkin v2 JSON; `tests/js/otel_export.js`) send a trace each
//! to km with the bucket's keys, and the traces API shows each whole: the request with
//! its call below it, its route, status, service and host. Then what km refuses: wrong or
//! missing keys, spans without ids, too many spans or bytes in one request, a body that
//! is not what it says, and another account's bucket. (pm2's own `--trace` spans are
//! followed in a browser by the dashboard test.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Result, ensure};
use km_e2e::{Km, e2e, run_node_script, unique};
use serde_json::{Value, json};

const SPANS_WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn otlp_and_zipkin_exporters_send_traces_and_hostile_requests_are_refused() {
    e2e(async {
        let km = Km::start_plus(vec![]).await?;
        let user = km.api().register_random().await?;
        let bucket = user.api.create_bucket(&unique("traces-")).await?;
        let env = [
            ("KM_URL", km.url()),
            ("KM_PUBLIC", bucket.public_id.clone()),
            ("KM_SECRET", bucket.secret_id.clone()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = run_node_script("otel_export.js", &env, Duration::from_secs(60)).await?;
        let ids: Value = serde_json::from_str(out.stdout.trim())?;

        for exporter in ["otlp-json", "otlp-proto", "zipkin"] {
            let trace_id = ids[exporter].as_str().unwrap_or_default();
            let path = format!("/api/bucket/{}/traces/{trace_id}", bucket.id);
            let trace = user
                .api
                .poll(
                    reqwest::Method::GET,
                    &path,
                    None,
                    &format!("the {exporter} trace"),
                    SPANS_WAIT,
                    |t| (t["spans"].as_array().map_or(0, Vec::len) == 2).then(|| t.clone()),
                )
                .await?;
            let (request, call) = (&trace["spans"][0], &trace["spans"][1]);
            let service = format!("svc-{exporter}");
            ensure!(
                request["depth"] == 0
                    && request["kind"] == "SERVER"
                    && request["route"] == "GET /checkout/:id"
                    && request["status"] == 503
                    && request["app_name"] == service.as_str()
                    && request["server_name"] == "otel-host"
                    && request["tags"]["error"] == "payments down"
                    && request["duration_us"].as_i64().unwrap_or(0) >= 30_000,
                "{exporter}: the request span {request}"
            );
            ensure!(
                call["depth"] == 1
                    && call["kind"] == "CLIENT"
                    && call["parent_id"] == request["span_id"]
                    && call["route"] == "POST payments.example.com/charges",
                "{exporter}: the call span {call}"
            );
            // Listed among the failed requests of its service, with its route's latencies.
            let failed = user
                .api
                .get_ok(&format!(
                    "/api/bucket/{}/traces?app={service}&status=5xx",
                    bucket.id
                ))
                .await?;
            ensure!(
                failed[0]["trace_id"] == trace_id,
                "{exporter}: 5xx requests {failed}"
            );
            let ok = user
                .api
                .get_ok(&format!(
                    "/api/bucket/{}/traces?app={service}&status=2xx",
                    bucket.id
                ))
                .await?;
            ensure!(ok == json!([]), "{exporter}: 2xx requests {ok}");
            let routes = user
                .api
                .get_ok(&format!(
                    "/api/bucket/{}/traces/routes?app={service}",
                    bucket.id
                ))
                .await?;
            ensure!(
                routes[0]["route"] == "GET /checkout/:id"
                    && routes[0]["count"] == 1
                    && routes[0]["errors"] == 1
                    && routes[0]["p99_us"] == request["duration_us"],
                "{exporter}: routes {routes}"
            );
        }

        refusals(&km, &bucket, &ids).await
    })
    .await;
}

/// What the intakes refuse, each with a status and a reason a sender can act on.
async fn refusals(km: &Km, bucket: &km_e2e::Bucket, ids: &Value) -> Result<()> {
    let http = reqwest::Client::new();
    let zipkin = format!("{}/api/v2/spans", km.url());
    let span = |trace: &str, id: &str| json!({"traceId": trace, "id": id, "name": "x", "timestamp": 1, "duration": 1});
    let post = |body: String, secret: Option<&str>| {
        let mut request = http
            .post(&zipkin)
            .header("content-type", "application/json")
            .body(body);
        if let Some(secret) = secret {
            request = request.basic_auth(&bucket.public_id, Some(secret));
        }
        request.send()
    };
    let one = json!([span("ab12", "cd34")]).to_string();

    let r = post(one.clone(), Some("wrong")).await?;
    let (status, text) = (r.status().as_u16(), r.text().await?);
    ensure!(
        status == 403 && text.contains("wrong secret key"),
        "wrong secret: {status} {text}"
    );
    let r = post(one.clone(), None).await?;
    let (status, text) = (r.status().as_u16(), r.text().await?);
    ensure!(
        status == 401 && text.contains("X-KM-PUBLIC"),
        "no keys: {status} {text}"
    );
    // The agent's headers work as well as Basic.
    let r = http
        .post(&zipkin)
        .header("x-km-public", &bucket.public_id)
        .header("x-km-secret", &bucket.secret_id)
        .body(one)
        .send()
        .await?;
    ensure!(
        r.status().as_u16() == 202,
        "keys as headers: {}",
        r.status()
    );

    let secret = Some(bucket.secret_id.as_str());
    let no_ids = json!([{"name": "x"}, {"traceId": "not hex", "id": "1"}]).to_string();
    let r = post(no_ids, secret).await?;
    let (status, text) = (r.status().as_u16(), r.text().await?);
    ensure!(
        status == 400 && text.contains("needs traceId and id"),
        "spans without ids: {status} {text}"
    );
    let many: Vec<Value> = (0..10_001)
        .map(|i| span("ab12", &format!("{i:x}")))
        .collect();
    let r = post(json!(many).to_string(), secret).await?;
    let (status, text) = (r.status().as_u16(), r.text().await?);
    ensure!(
        status == 413 && text.contains("at most 10000"),
        "10,001 spans: {status} {text}"
    );
    let huge = format!("[\"{}\"]", "x".repeat(17 << 20));
    let r = post(huge, secret).await?;
    ensure!(r.status().as_u16() == 413, "17 MiB: {}", r.status());
    // The body is left unread: the connection closes, and the answer says so (the next
    // request goes on another one).
    let close = r.headers().get("connection").and_then(|v| v.to_str().ok());
    ensure!(close == Some("close"), "17 MiB: connection {close:?}");
    let r = http
        .post(format!("{}/v1/traces", km.url()))
        .basic_auth(&bucket.public_id, secret)
        .header("content-type", "application/x-protobuf")
        .body(vec![0xff_u8; 64])
        .send()
        .await?;
    let (status, text) = (r.status().as_u16(), r.text().await?);
    ensure!(
        status == 400 && text.contains("not OTLP protobuf"),
        "garbage protobuf: {status} {text}"
    );
    // Counted where they were received (the api role's, with the roles apart).
    let health = km.api().get_ok("/healthz").await?;
    let ingest = match &health["roles"]["api"] {
        Value::Null => &health["ingest"],
        api => &api["ingest"],
    };
    ensure!(
        ingest["spans_refused"].as_u64().unwrap_or(0) >= 2
            && ingest["spans"].as_u64().unwrap_or(0) >= 7,
        "/healthz ingest: {ingest}"
    );

    // Another account's bucket does not see the trace.
    let stranger = km.api().register_random().await?;
    let theirs = stranger.api.create_bucket(&unique("other-")).await?;
    let trace = ids["zipkin"].as_str().unwrap_or_default();
    let r = stranger
        .api
        .get(&format!("/api/bucket/{}/traces/{trace}", theirs.id))
        .await?;
    ensure!(
        r.status == 404,
        "a trace from another bucket: {} {}",
        r.status,
        r.text
    );
    let r = stranger
        .api
        .get(&format!("/api/bucket/{}/traces/{trace}", bucket.id))
        .await?;
    ensure!(
        r.status == 403 || r.status == 404,
        "another account's bucket: {} {}",
        r.status,
        r.text
    );
    Ok(())
}
