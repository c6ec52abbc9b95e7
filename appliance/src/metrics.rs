//! Prometheus scrape endpoints, in the OpenMetrics text format (prometheus-client):
//! `/metrics`, this process's own counters (agents, frames, budgets hit, the writer),
//! for an appliance admin's token; `/api/bucket/:id/metrics`, a bucket's servers and
//! processes as they are now (hosts, processes, every numeric custom metric), for a
//! member's token. Personal tokens fit scrape configs (`authorization: {credentials}`).
//! With the roles apart the gateway's `/metrics` joins every role's ([`by_role`]).

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::HeaderValue;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::api::buckets::BucketAccess;
use crate::auth::UserAuth;
use crate::error::{ApiError, ApiResult};
use km_core::app::{AppState, Ping};
use km_core::fleet::{self, ProcessStatus};

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn exposition(registry: &Registry) -> ApiResult<Response> {
    let mut text = String::new();
    encode(&mut text, registry)
        .map_err(|e| ApiError::unavailable(format!("metrics not encoded: {e}")))?;
    let content_type = HeaderValue::from_static(OPENMETRICS);
    Ok(([(CONTENT_TYPE, content_type)], text).into_response())
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: &AtomicU64) {
    registry.register(name, help, ConstCounter::new(value.load(Ordering::Relaxed)));
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    registry.register(
        name,
        help,
        ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)),
    );
}

/// `GET /metrics` (an admin of the appliance): what this process has done since it
/// started and holds now.
pub async fn appliance(State(app): State<AppState>, auth: UserAuth) -> ApiResult<Response> {
    if auth.user.role != "admin" {
        return Err(ApiError::forbidden(
            "only an admin of the appliance reads its metrics",
        ));
    }
    let mut r = Registry::with_prefix("km");
    let agents = app.sessions.all().len() as u64;
    gauge(
        &mut r,
        "agent_servers",
        "Servers whose agent is connected to this node",
        agents,
    );
    let sockets = app.sessions.sockets_open() as u64;
    gauge(
        &mut r,
        "agent_sockets",
        "Agent websockets open on this node",
        sockets,
    );
    let c = &app.ingest.counters;
    counter(&mut r, "statuses", "Full statuses applied", &c.statuses);
    counter(&mut r, "patches", "Status patches applied", &c.patches);
    counter(
        &mut r,
        "patches_failed",
        "Patches that did not apply (the agent resends)",
        &c.patches_failed,
    );
    counter(&mut r, "events", "Events received from agents", &c.events);
    counter(
        &mut r,
        "malformed_frames",
        "Frames that were not the agent protocol",
        &c.malformed_frames,
    );
    counter(
        &mut r,
        "statuses_refused",
        "Statuses over a budget (socket closed)",
        &c.statuses_refused,
    );
    counter(
        &mut r,
        "patches_refused",
        "Patches over a budget (full status asked)",
        &c.patches_refused,
    );
    counter(
        &mut r,
        "frames_too_large",
        "Frames over the frame budget",
        &c.frames_too_large,
    );
    counter(
        &mut r,
        "frames_refused_busy",
        "Frames refused for want of in-flight room",
        &c.frames_refused_busy,
    );
    counter(
        &mut r,
        "spans",
        "Spans stored (agents and intakes)",
        &c.spans,
    );
    counter(
        &mut r,
        "spans_refused",
        "Spans refused (no ids, or over a span budget)",
        &c.spans_refused,
    );
    let in_flight = app.ingest.in_flight.used() as u64;
    gauge(
        &mut r,
        "in_flight_bytes",
        "Bytes of large frames being read now",
        in_flight,
    );
    let w = &app.ingest.writer.stats;
    counter(
        &mut r,
        "events_written",
        "Events the store took",
        &w.events_written,
    );
    counter(
        &mut r,
        "metric_points_written",
        "Metric minutes the store took",
        &w.metric_points_written,
    );
    counter(
        &mut r,
        "batches_written",
        "Batches the store took",
        &w.batches_written,
    );
    counter(
        &mut r,
        "events_dropped",
        "Events dropped while the store could not keep up",
        &w.dropped,
    );
    counter(
        &mut r,
        "write_retries",
        "Batches the store refused and that were tried again",
        &w.write_retries,
    );
    counter(
        &mut r,
        "write_errors",
        "Items lost because the store refused them at shutdown",
        &w.write_errors,
    );
    let queued = w.queued_points() as u64;
    gauge(
        &mut r,
        "queued_points",
        "Metric minutes waiting for the store",
        queued,
    );
    let queued_bytes = w.queued_bytes() as u64;
    gauge(
        &mut r,
        "queued_event_bytes",
        "Bytes of events waiting for the store",
        queued_bytes,
    );
    r.register(
        "store_write_seconds",
        "Time the events store took per batch, by what it held",
        w.write_seconds.0.clone(),
    );
    r.register(
        "notification_deliveries",
        "Notification deliveries tried by this process (the workers role), by channel and outcome",
        app.deliveries.clone(),
    );
    let refusing = u64::from(w.refusal().is_some());
    gauge(
        &mut r,
        "events_store_refusing",
        "1 while the events store refuses writes",
        refusing,
    );
    register_pings(&mut r, app.ping_stores().await);
    exposition(&r)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: &'static str,
    kind: &'static str,
}

/// The documents store and the bus as this scrape found them: up, and how long a ping
/// took (the time of a round trip to MongoDB or Redis, or of SQLite's lock).
fn register_pings(r: &mut Registry, pings: [Ping; 2]) {
    let up = Family::<StoreLabels, Gauge>::default();
    let seconds = Family::<StoreLabels, Gauge<f64, AtomicU64>>::default();
    for ping in pings {
        let labels = StoreLabels {
            store: ping.store,
            kind: ping.kind,
        };
        up.get_or_create(&labels)
            .set(i64::from(ping.answer.is_ok()));
        seconds.get_or_create(&labels).set(ping.took.as_secs_f64());
    }
    r.register(
        "store_up",
        "1 when the store answered this scrape's ping",
        up,
    );
    r.register(
        "store_ping_seconds",
        "How long the store took to answer this scrape's ping",
        seconds,
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    bucket: String,
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    bucket: String,
    server: String,
    app: String,
    pm_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MetricLabels {
    bucket: String,
    server: String,
    app: String,
    pm_id: String,
    metric: String,
}

type Gauges<L> = Family<L, Gauge<f64, AtomicU64>>;

/// A custom metric's value when it is a number (or a string holding one, its unit after).
fn numeric(metric: &Value) -> Option<f64> {
    let value = metric.get("value").unwrap_or(metric);
    if let Some(n) = value.as_f64() {
        return Some(n);
    }
    let text = value.as_str()?.trim();
    let unit = metric.get("unit").and_then(Value::as_str);
    let number = unit.and_then(|u| text.strip_suffix(u)).unwrap_or(text);
    number.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// `GET /api/bucket/:id/metrics` (members): the bucket's servers and processes now.
pub async fn bucket(State(app): State<AppState>, access: BucketAccess) -> ApiResult<Response> {
    let name = access.bucket.name.clone();
    let servers = fleet::servers(&app, &access.bucket.id, None).await;
    let server_gauges: [(&str, &str, Gauges<ServerLabels>); 6] = [
        (
            "server_up",
            "1 while the server's agent is connected",
            Family::default(),
        ),
        (
            "host_load1",
            "The host's load average over 1 minute",
            Family::default(),
        ),
        (
            "host_load5",
            "The host's load average over 5 minutes",
            Family::default(),
        ),
        (
            "host_load15",
            "The host's load average over 15 minutes",
            Family::default(),
        ),
        (
            "host_memory_total_bytes",
            "The host's memory",
            Family::default(),
        ),
        (
            "host_uptime_seconds",
            "Since the host booted",
            Family::default(),
        ),
    ];
    let process_gauges: [(&str, &str, Gauges<ProcessLabels>); 5] = [
        (
            "process_up",
            "1 while pm2 says the process is online",
            Family::default(),
        ),
        (
            "process_cpu_percent",
            "The process's CPU use",
            Family::default(),
        ),
        (
            "process_memory_bytes",
            "The process's memory",
            Family::default(),
        ),
        (
            "process_restarts",
            "Restarts pm2 counted",
            Family::default(),
        ),
        (
            "process_uptime_seconds",
            "Since the process (re)started",
            Family::default(),
        ),
    ];
    let custom: Gauges<MetricLabels> = Family::default();
    let now = km_stores::ids::now_ms();
    for s in &servers {
        let labels = ServerLabels {
            bucket: name.clone(),
            server: s.server_name.clone(),
        };
        let host = &s.data.server;
        let mut values = vec![(0, Some(if s.online { 1.0 } else { 0.0 }))];
        if s.online {
            values.extend((0..3).map(|i| (i + 1, host.loadavg.get(i).copied())));
            values.push((4, Some(host.total_mem)));
            values.push((5, Some(host.uptime)));
        }
        for (i, value) in values {
            if let Some(value) = value {
                server_gauges[i].2.get_or_create(&labels).set(value);
            }
        }
        for p in s.data.process.iter().filter(|_| s.online) {
            let labels = ProcessLabels {
                bucket: name.clone(),
                server: s.server_name.clone(),
                app: p.name.clone(),
                pm_id: pm_id_text(p),
            };
            let uptime = (p.status == "online").then(|| (now - p.pm_uptime).max(0) as f64 / 1e3);
            let values = [
                Some(if p.status == "online" { 1.0 } else { 0.0 }),
                Some(p.cpu),
                Some(p.memory),
                Some(p.restart_time as f64),
                uptime,
            ];
            for (i, value) in values.into_iter().enumerate() {
                if let Some(value) = value {
                    process_gauges[i].2.get_or_create(&labels).set(value);
                }
            }
            for (metric, value) in &p.axm_monitor {
                if let Some(value) = numeric(value) {
                    let labels = MetricLabels {
                        bucket: labels.bucket.clone(),
                        server: labels.server.clone(),
                        app: labels.app.clone(),
                        pm_id: labels.pm_id.clone(),
                        metric: metric.clone(),
                    };
                    custom.get_or_create(&labels).set(value);
                }
            }
        }
    }
    let mut r = Registry::with_prefix("km");
    for (metric, help, family) in server_gauges {
        r.register(metric, help, family);
    }
    for (metric, help, family) in process_gauges {
        r.register(metric, help, family);
    }
    r.register(
        "process_metric",
        "A custom metric of the process (@pm2/io, tx2), by name",
        custom,
    );
    exposition(&r)
}

/// One exposition of several processes' `/metrics` (each `(role, text)`): each family once
/// with its samples of every role, labelled `role`.
pub fn by_role(parts: &[(&str, &str)]) -> String {
    // Families in the order first met: their `#` lines (from the first role that has
    // them) and every role's samples.
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for (role, text) in parts {
        let mut current: Option<usize> = None;
        let mut fresh = false;
        for line in text.lines().filter(|l| !l.is_empty() && *l != "# EOF") {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default();
                let found = families.iter().position(|(n, _, _)| n == name);
                fresh = found.is_none();
                if fresh {
                    families.push((name.to_string(), Vec::new(), Vec::new()));
                }
                current = Some(found.unwrap_or(families.len() - 1));
            }
            let Some(family) = current.and_then(|i| families.get_mut(i)) else {
                continue;
            };
            if line.starts_with('#') {
                if fresh {
                    family.1.push(line.to_string());
                }
            } else {
                family.2.push(with_role(line, role));
            }
        }
    }
    let mut out = String::new();
    for (_, meta, samples) in families {
        for line in meta.iter().chain(&samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

/// A sample line with the label `role` first.
fn with_role(sample: &str, role: &str) -> String {
    match sample.find(['{', ' ']) {
        Some(i) if sample[i..].starts_with("{}") => {
            format!("{}{{role=\"{role}\"}}{}", &sample[..i], &sample[i + 2..])
        }
        Some(i) if sample[i..].starts_with('{') => {
            format!("{}{{role=\"{role}\",{}", &sample[..i], &sample[i + 1..])
        }
        Some(i) => format!("{}{{role=\"{role}\"}}{}", &sample[..i], &sample[i..]),
        None => sample.to_string(),
    }
}

/// The pm_id as text (pm2 sends a number).
fn pm_id_text(p: &ProcessStatus) -> String {
    match &p.pm_id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_joined_family_by_family() {
        let api = "# HELP km_statuses Full statuses applied.\n# TYPE km_statuses counter\nkm_statuses_total 0\n# HELP km_agent_servers Servers.\n# TYPE km_agent_servers gauge\nkm_agent_servers 0\n# EOF\n";
        let interactor = "# HELP km_statuses Full statuses applied.\n# TYPE km_statuses counter\nkm_statuses_total 7\n# HELP km_agent_servers Servers.\n# TYPE km_agent_servers gauge\nkm_agent_servers{zone=\"a b\"} 2\n# EOF\n";
        let joined = by_role(&[("api", api), ("interactor", interactor)]);
        assert_eq!(
            joined,
            "# HELP km_statuses Full statuses applied.\n# TYPE km_statuses counter\n\
             km_statuses_total{role=\"api\"} 0\nkm_statuses_total{role=\"interactor\"} 7\n\
             # HELP km_agent_servers Servers.\n# TYPE km_agent_servers gauge\n\
             km_agent_servers{role=\"api\"} 0\nkm_agent_servers{role=\"interactor\",zone=\"a b\"} 2\n\
             # EOF\n"
        );
    }

    #[test]
    fn custom_metrics_are_numbers_or_numbers_with_their_unit() {
        let value = |v: Value| numeric(&v);
        assert_eq!(value(serde_json::json!({"value": 42})), Some(42.0));
        assert_eq!(
            value(serde_json::json!({"value": "0.5req/s", "unit": "req/s"})),
            Some(0.5)
        );
        assert_eq!(value(serde_json::json!({"value": "n/a"})), None);
        assert_eq!(value(serde_json::json!(3)), Some(3.0));
    }
}
