//! Traces in the dashboard: a bucket's routes with their latency percentiles and its
//! slowest requests, filtered by app, server, route, status and time; a trace's page
//! draws its spans as a waterfall.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;

use super::buckets::access;
use super::{Flash, Nav, WebSession, error_page, render};
use crate::api::traces::{self, SpanView, Trace, TraceEntry, TraceFilter};
use km_core::app::AppState;
use km_stores::ids::now_ms;
use km_stores::{Bucket, RouteLatency, SpanQuery};

/// The time windows of the page: (minutes, label).
pub const TRACE_WINDOWS: [(i64, &str); 4] = [
    (15, "last 15 minutes"),
    (60, "last hour"),
    (1440, "last 24 hours"),
    (10080, "last 7 days"),
];
/// The status filters offered.
pub const STATUSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];
/// Routes and requests the page lists.
const LIST: u32 = 50;

/// The filters, as the form sends them (empty: any).
#[derive(Deserialize, Default)]
pub struct PageFilter {
    #[serde(default)]
    app: String,
    #[serde(default)]
    server: String,
    #[serde(default)]
    route: String,
    #[serde(default)]
    status: String,
    /// Minutes back (an hour when absent).
    since: Option<i64>,
}

impl PageFilter {
    fn minutes(&self) -> i64 {
        self.since.filter(|m| *m > 0).unwrap_or(60)
    }

    fn api(&self, route: bool) -> TraceFilter {
        TraceFilter {
            app: Some(self.app.clone()),
            server: Some(self.server.clone()),
            route: route.then(|| self.route.clone()),
            status: route.then(|| self.status.clone()),
            since: Some(now_ms() - self.minutes().saturating_mul(60_000)),
            limit: Some(LIST),
        }
    }
}

/// A duration for people: `850 µs`, `12.3 ms`, `2.41 s`.
pub fn duration(us: impl std::borrow::Borrow<i64>) -> String {
    let us = *us.borrow();
    match us {
        ..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

#[derive(Template)]
#[template(path = "traces.html")]
struct TracesPage {
    nav: Option<Nav>,
    bucket: Bucket,
    filter: PageFilter,
    minutes: i64,
    windows: [(i64, &'static str); 4],
    statuses: [&'static str; 4],
    /// Every route of the window (for the app and server chosen), busiest first.
    routes: Vec<RouteLatency>,
    /// The apps that sent spans in the window.
    apps: Vec<String>,
    requests: Vec<TraceEntry>,
    flash: Flash,
}

/// `/buckets/:id/traces`.
pub async fn page(
    State(app): State<AppState>,
    session: WebSession,
    Path(id): Path<String>,
    Query(filter): Query<PageFilter>,
) -> Response {
    let access = match access(&app, &session, &id).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let bucket_id = &access.bucket.id;
    let read = async {
        let routes_query = filter.api(false).query(bucket_id)?;
        let requests_query = filter.api(true).query(bucket_id)?;
        // The apps to pick from are those of every route: read apart only when the
        // routes are of one app (on Elasticsearch the read aggregates the window's spans).
        let every_app = async {
            match routes_query.app_name {
                None => Ok(None),
                Some(_) => {
                    let all = SpanQuery {
                        app_name: None,
                        ..routes_query.clone()
                    };
                    Ok(Some(app.events.route_latencies(&all).await?))
                }
            }
        };
        tokio::try_join!(
            async { Ok(app.events.route_latencies(&routes_query).await?) },
            every_app,
            traces::slowest(&app, &requests_query),
        )
    };
    let (routes, every_app, requests) = match read.await {
        Ok(read) => read,
        Err(e) => return error_page(&e),
    };
    let every_app = every_app.as_ref().unwrap_or(&routes);
    let mut apps: Vec<String> = every_app.iter().map(|r| r.app_name.clone()).collect();
    apps.push(filter.app.clone());
    apps.retain(|a| !a.is_empty());
    apps.sort();
    apps.dedup();
    render(&TracesPage {
        nav: Some(Nav::from(&session)),
        minutes: filter.minutes(),
        windows: TRACE_WINDOWS,
        statuses: STATUSES,
        routes,
        apps,
        requests,
        flash: Flash::default(),
        filter,
        bucket: access.bucket,
    })
}

/// A span's row of the waterfall: its bar from `left` to `left + width` of 1000.
pub struct Bar {
    pub span: SpanView,
    pub left: f64,
    pub width: f64,
    /// Levels of indentation shown (deeper spans stay at the last level).
    pub indent: usize,
}

/// The deepest indentation drawn.
const MAX_INDENT: usize = 8;

fn bars(trace: &mut Trace) -> Vec<Bar> {
    let total = trace.duration_us.max(1) as f64;
    std::mem::take(&mut trace.spans)
        .into_iter()
        .map(|span| {
            let left = (span.offset_us.max(0) as f64 / total * 1000.0).min(1000.0);
            // A bar is at least 2 of 1000 wide, so that the shortest span still shows.
            let width =
                (span.duration_us as f64 / total * 1000.0).clamp(2.0, 1000.0 - left.min(998.0));
            Bar {
                indent: span.depth.min(MAX_INDENT),
                span,
                left,
                width,
            }
        })
        .collect()
}

#[derive(Template)]
#[template(path = "trace.html")]
struct TracePage {
    nav: Option<Nav>,
    bucket: Bucket,
    trace: Trace,
    bars: Vec<Bar>,
    /// The services the trace went through.
    services: Vec<String>,
    flash: Flash,
}

/// `/buckets/:id/traces/:trace`.
pub async fn trace_page(
    State(app): State<AppState>,
    session: WebSession,
    Path((id, trace_id)): Path<(String, String)>,
) -> Response {
    let access = match access(&app, &session, &id).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let mut trace = match traces::find(&app, &access.bucket.id, &trace_id).await {
        Ok(trace) => trace,
        Err(e) => return error_page(&e),
    };
    let mut services: Vec<String> = trace.spans.iter().map(|s| s.app_name.clone()).collect();
    services.sort();
    services.dedup();
    let bars = bars(&mut trace);
    render(&TracePage {
        nav: Some(Nav::from(&session)),
        bucket: access.bucket,
        trace,
        bars,
        services,
        flash: Flash::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(850), "850 µs");
        assert_eq!(duration(12_345), "12.3 ms");
        assert_eq!(duration(2_410_000), "2.41 s");
    }
}
