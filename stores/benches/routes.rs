//! Route percentiles on the embedded events store: 1,000,000 entry spans of one bucket
//! in 50 minutes (5 apps, 20 routes, 10 servers, a request every 3 ms, durations spread
//! over 2–600 ms), read as route minutes (`route_latencies`), against the exact
//! nearest-rank query over the spans themselves in the same file (what the store read
//! before route minutes). Also the write cost of route minutes: the same spans written
//! as entries and as calls (no route minute).
//! Run: `cargo bench -p km-stores --bench routes`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use km_stores::sqlite::open_events;
use km_stores::{EventKind, EventRecord, Events, SpanFacts, SpanQuery};

const SPANS: usize = 1_000_000;
const BATCH: usize = 1_024;
const RUNS: usize = 3;
const START: i64 = 1_796_000_000_000;

fn span(i: usize, entry: bool) -> EventRecord {
    let (app, route, server) = (i % 5, (i / 5) % 20, (i / 100) % 10);
    // A long tail: most requests fast, some slow.
    let ms = 2 + (i * 7_919 % 1_000) * (i * 104_729 % 600) / 1_000;
    EventRecord {
        id: format!("{i}"),
        kind: EventKind::Span,
        bucket_id: "bench".into(),
        server_name: format!("server-{server}"),
        app_name: Some(format!("app-{app}")),
        event_type: if entry { "SERVER" } else { "CLIENT" }.into(),
        name: Some(format!("{i:032x}")),
        at: START + (i as i64) * 3,
        doc: format!(r#"{{"trace":"{i:032x}","route":"GET /r{route}"}}"#),
        span: Some(Box::new(SpanFacts {
            route: format!("GET /r{route}"),
            status: if i.is_multiple_of(50) { 500 } else { 200 },
            duration_us: ms as i64 * 1_000,
            entry,
        })),
    }
}

async fn write(events: &dyn Events, entry: bool) -> Duration {
    let started = Instant::now();
    let all: Vec<EventRecord> = (0..SPANS).map(|i| span(i, entry)).collect();
    for batch in all.chunks(BATCH) {
        let batch: Arc<[EventRecord]> = batch.to_vec().into();
        if let Err(e) = events.append(batch).await {
            panic!("append: {e}");
        }
    }
    started.elapsed()
}

/// The exact percentiles over the spans (nearest rank, a window function per route).
fn exact(path: &std::path::Path, app: Option<&str>) -> usize {
    let conn = rusqlite::Connection::open(path).unwrap_or_else(|e| panic!("open: {e}"));
    let app_filter = app.map_or(String::new(), |a| format!(" AND app_name = '{a}'"));
    let rank = |p: u32| format!("MAX(CASE WHEN rn = (n * {p} + 99) / 100 THEN duration END)");
    let sql = format!(
        "WITH s AS (SELECT app_name, route, duration, status,
           ROW_NUMBER() OVER (PARTITION BY app_name, route ORDER BY duration) AS rn,
           COUNT(*) OVER (PARTITION BY app_name, route) AS n
           FROM events WHERE bucket_id = 'bench' AND kind = 'spans' AND entry = 1 AND at >= {START}{app_filter})
         SELECT app_name, route, n, SUM(status >= 500), {}, {}, {}, MAX(duration)
         FROM s GROUP BY app_name, route ORDER BY n DESC LIMIT 100",
        rank(50),
        rank(95),
        rank(99)
    );
    let mut stmt = conn
        .prepare(&sql)
        .unwrap_or_else(|e| panic!("prepare: {e}"));
    let rows = stmt
        .query_map([], |_| Ok(()))
        .unwrap_or_else(|e| panic!("query: {e}"));
    rows.count()
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1_000.0)
}

fn times(mut f: impl FnMut()) -> String {
    let runs: Vec<String> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            f();
            millis(started.elapsed())
        })
        .collect();
    runs.join(", ")
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let calls_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let events = open_events(dir.path()).unwrap_or_else(|e| panic!("open: {e}"));
    let calls = open_events(calls_dir.path()).unwrap_or_else(|e| panic!("open: {e}"));
    let as_calls = write(&calls, false).await;
    let as_entries = write(&events, true).await;
    let rate = |d: Duration| format!("{:.0} spans/s", SPANS as f64 / d.as_secs_f64());
    println!("write {SPANS} spans in batches of {BATCH}:");
    println!(
        "  as calls (no route minute): {} ({})",
        millis(as_calls),
        rate(as_calls)
    );
    println!(
        "  as entries (route minutes): {} ({})",
        millis(as_entries),
        rate(as_entries)
    );

    let path = dir.path().join("events.sqlite");
    let runtime = tokio::runtime::Handle::current();
    for app in [None, Some("app-0")] {
        let q = SpanQuery {
            bucket_id: "bench".into(),
            app_name: app.map(str::to_string),
            since: START,
            limit: 100,
            ..SpanQuery::default()
        };
        let mut routes = 0;
        let minutes = times(|| {
            let read = tokio::task::block_in_place(|| runtime.block_on(events.route_latencies(&q)));
            routes = read
                .unwrap_or_else(|e| panic!("route_latencies: {e}"))
                .len();
        });
        let mut exact_routes = 0;
        let over_spans = times(|| exact_routes = exact(&path, app));
        let of = app.unwrap_or("the whole bucket");
        println!("route percentiles of {of} ({routes} routes; exact: {exact_routes}):");
        println!("  route minutes: {minutes}");
        println!("  exact, over the spans: {over_spans}");
    }
}
