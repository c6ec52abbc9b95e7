//! Events and metric minutes in SQLite: one table each, indexed by bucket and time; and
//! route minutes, each minute's requests of a route (entry spans) as a latency histogram,
//! kept with the spans as they are written, so that route percentiles read minutes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::params;
use rusqlite::types::Value as SqlValue;

use super::Db;
use crate::latency::Latencies;
use crate::{
    Cutoffs, EventKind, EventQuery, EventRecord, Events, MetricPoint, MetricQuery, RouteLatency,
    SpanQuery, StoreResult,
};

const MINUTE_MS: i64 = 60_000;
/// Route minutes held in memory while the spans already stored are read into them (at
/// the migration that made the table): written out, merged, when reached.
const FILL_KEYS: usize = 100_000;

/// Schema migrations, oldest first (see `Db::open`).
pub(super) const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE events (
  id INTEGER PRIMARY KEY, kind TEXT NOT NULL, bucket_id TEXT NOT NULL, server_name TEXT NOT NULL,
  app_name TEXT, type TEXT NOT NULL, name TEXT, at INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX events_by_bucket ON events(bucket_id, kind, at);
CREATE INDEX events_by_time ON events(at);
CREATE TABLE metrics (
  bucket_id TEXT NOT NULL, server_name TEXT NOT NULL, app_name TEXT NOT NULL,
  pm_id INTEGER NOT NULL, name TEXT NOT NULL, unit TEXT, agg_type TEXT, at INTEGER NOT NULL,
  avg REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL, last REAL NOT NULL,
  count INTEGER NOT NULL);
CREATE INDEX metrics_by_bucket ON metrics(bucket_id, at);
CREATE INDEX metrics_by_time ON metrics(at);
",
    // v2: content ids, so a batch written again after a failure does not double.
    "
ALTER TABLE events ADD COLUMN cid TEXT;
CREATE UNIQUE INDEX events_by_cid ON events(cid);
ALTER TABLE metrics ADD COLUMN cid TEXT;
CREATE UNIQUE INDEX metrics_by_cid ON metrics(cid);
",
    // v3: spans (their facts as columns); events found by name (a trace, an issue).
    "
ALTER TABLE events ADD COLUMN route TEXT;
ALTER TABLE events ADD COLUMN status INTEGER;
ALTER TABLE events ADD COLUMN duration INTEGER;
ALTER TABLE events ADD COLUMN entry INTEGER;
CREATE INDEX events_by_name ON events(bucket_id, kind, name);
",
    // v4: route minutes (filled from the spans stored: `fill_route_minutes`).
    "
CREATE TABLE route_minutes (
  bucket_id TEXT NOT NULL, at INTEGER NOT NULL, app_name TEXT NOT NULL, server_name TEXT NOT NULL,
  route TEXT NOT NULL, status INTEGER NOT NULL, count INTEGER NOT NULL, min INTEGER NOT NULL,
  max INTEGER NOT NULL, buckets BLOB NOT NULL,
  PRIMARY KEY (bucket_id, at, app_name, server_name, route, status)) WITHOUT ROWID;
CREATE INDEX route_minutes_by_time ON route_minutes(at);
",
];

/// A route minute's key: bucket, minute, app, server, route, status.
type RouteMinute = (String, i64, String, String, String, u16);

/// Adds `events`' entry spans to `minutes`, by route minute.
fn add_span(minutes: &mut HashMap<RouteMinute, Latencies>, e: &EventRecord) {
    let Some(span) = e.span.as_ref().filter(|s| s.entry) else {
        return;
    };
    let key = (
        e.bucket_id.clone(),
        e.at.div_euclid(MINUTE_MS) * MINUTE_MS,
        e.app_name.clone().unwrap_or_default(),
        e.server_name.clone(),
        span.route.clone(),
        span.status,
    );
    minutes.entry(key).or_default().add(span.duration_us);
}

/// Merges `minutes` into the stored route minutes.
fn merge_route_minutes(
    tx: &rusqlite::Transaction,
    minutes: HashMap<RouteMinute, Latencies>,
) -> rusqlite::Result<()> {
    const KEY: &str = "bucket_id = ?1 AND at = ?2 AND app_name = ?3 AND server_name = ?4 AND route = ?5 AND status = ?6";
    let mut read = tx.prepare_cached(&format!(
        "SELECT count, min, max, buckets FROM route_minutes WHERE {KEY}"
    ))?;
    let mut write = tx.prepare_cached(
        "INSERT OR REPLACE INTO route_minutes
           (bucket_id, at, app_name, server_name, route, status, count, min, max, buckets)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for ((bucket, at, app, server, route, status), mut latencies) in minutes {
        let key = params![bucket, at, app, server, route, status];
        let stored = read
            .query_row(key, |r| {
                let bytes: Vec<u8> = r.get(3)?;
                Ok(Latencies::decode(r.get(0)?, r.get(1)?, r.get(2)?, &bytes))
            })
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        if let Some(stored) = stored {
            latencies.merge(&stored);
        }
        write.execute(params![
            bucket,
            at,
            app,
            server,
            route,
            status,
            latencies.count,
            latencies.min_us,
            latencies.max_us,
            latencies.encode()
        ])?;
    }
    Ok(())
}

/// The route minutes of the spans stored before the table was made.
fn fill_route_minutes(tx: &rusqlite::Transaction) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare(
        "SELECT bucket_id, at, app_name, server_name, route, status, duration FROM events
         WHERE kind = ?1 AND entry = 1",
    )?;
    let mut rows = stmt.query([EventKind::Span.as_str()])?;
    let mut minutes: HashMap<RouteMinute, Latencies> = HashMap::new();
    while let Some(r) = rows.next()? {
        let at: i64 = r.get(1)?;
        let key = (
            r.get(0)?,
            at.div_euclid(MINUTE_MS) * MINUTE_MS,
            r.get::<_, Option<String>>(2)?.unwrap_or_default(),
            r.get(3)?,
            r.get::<_, Option<String>>(4)?.unwrap_or_default(),
            r.get::<_, Option<u16>>(5)?.unwrap_or_default(),
        );
        minutes
            .entry(key)
            .or_default()
            .add(r.get::<_, Option<i64>>(6)?.unwrap_or_default());
        if minutes.len() >= FILL_KEYS {
            merge_route_minutes(tx, std::mem::take(&mut minutes))?;
        }
    }
    merge_route_minutes(tx, minutes)
}

pub struct SqliteEvents {
    db: Db,
}

impl SqliteEvents {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(SqliteEvents {
            db: Db::open(path, "events", MIGRATIONS, &[(4, fill_route_minutes)])?,
        })
    }
}

/// `WHERE` clauses shared by event and metric queries: bucket plus optional app/server.
fn scope_filter(
    bucket_id: &str,
    app_name: &Option<String>,
    server_name: &Option<String>,
) -> (String, Vec<SqlValue>) {
    let mut sql = String::from("bucket_id = ?");
    let mut args = vec![SqlValue::Text(bucket_id.to_string())];
    for (column, value) in [("app_name", app_name), ("server_name", server_name)] {
        if let Some(v) = value {
            sql.push_str(&format!(" AND {column} = ?"));
            args.push(SqlValue::Text(v.clone()));
        }
    }
    (sql, args)
}

/// The text `EventQuery::text` searches, as SQL over `doc`: a log's line, an exception's
/// message and stack, the whole document otherwise (as `search_text` in the Elasticsearch
/// store).
fn text_of(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Log => "json_extract(doc, '$.data')",
        EventKind::Exception => {
            "CASE json_type(doc, '$.data') WHEN 'text' THEN json_extract(doc, '$.data')
             ELSE concat_ws(char(10), json_extract(doc, '$.data.message'), json_extract(doc, '$.data.stack')) END"
        }
        _ => "doc",
    }
}

/// `WHERE` clauses for events of `kind` matching `q` (all of it but paging).
fn event_filter(kind: EventKind, q: &EventQuery) -> (String, Vec<SqlValue>) {
    let (mut sql, mut args) = scope_filter(&q.bucket_id, &q.app_name, &q.server_name);
    sql.insert_str(0, "kind = ? AND ");
    args.insert(0, SqlValue::Text(kind.as_str().to_string()));
    for (column, value) in [("type", &q.event_type), ("name", &q.name)] {
        if let Some(v) = value {
            sql.push_str(&format!(" AND {column} = ?"));
            args.push(SqlValue::Text(v.clone()));
        }
    }
    if let Some(before) = q.before {
        sql.push_str(" AND at < ?");
        args.push(SqlValue::Integer(before));
    }
    if let Some(after) = q.after {
        sql.push_str(" AND at > ?");
        args.push(SqlValue::Integer(after));
    }
    // SQLite's `lower` folds ASCII letters only.
    if let Some(text) = q.text.as_deref().filter(|t| !t.is_empty()) {
        sql.push_str(&format!(
            " AND instr(lower({}), lower(?)) > 0",
            text_of(kind)
        ));
        args.push(SqlValue::Text(text.to_string()));
    }
    (sql, args)
}

impl SqliteEvents {
    /// The rows `sql` selects with `args`, each read by `row`.
    async fn select<T: Send + 'static>(
        &self,
        sql: String,
        args: Vec<SqlValue>,
        row: fn(&rusqlite::Row) -> rusqlite::Result<T>,
    ) -> StoreResult<Vec<T>> {
        self.db
            .call(move |c| {
                let mut stmt = c.prepare_cached(&sql)?;
                stmt.query_map(rusqlite::params_from_iter(args), row)?
                    .collect()
            })
            .await
    }
}

/// `WHERE` clauses for what matches `q` from `since` on: the entry spans in `events`
/// and the rows of `route_minutes` have the same columns for it.
fn span_filter(q: &SpanQuery, since: i64) -> (String, Vec<SqlValue>) {
    let (mut sql, mut args) = scope_filter(&q.bucket_id, &q.app_name, &q.server_name);
    sql.push_str(" AND at >= ?");
    args.push(SqlValue::Integer(since));
    if let Some(route) = &q.route {
        sql.push_str(" AND route = ?");
        args.push(SqlValue::Text(route.clone()));
    }
    if let Some((from, to)) = q.status {
        sql.push_str(" AND status BETWEEN ? AND ?");
        args.push(SqlValue::Integer(from.into()));
        args.push(SqlValue::Integer(to.into()));
    }
    (sql, args)
}

/// Route minutes `(app, route, status, latencies)` merged per app and route, busiest
/// first, at most `limit`.
fn routes_of(minutes: Vec<(String, String, u16, Latencies)>, limit: u32) -> Vec<RouteLatency> {
    let mut routes: BTreeMap<(String, String), (Latencies, u64)> = BTreeMap::new();
    for (app, route, status, latencies) in minutes {
        let (all, errors) = routes.entry((app, route)).or_default();
        if status >= 500 {
            *errors += latencies.count;
        }
        all.merge(&latencies);
    }
    let mut routes: Vec<RouteLatency> = routes
        .into_iter()
        .map(|((app_name, route), (l, errors))| RouteLatency {
            app_name,
            route,
            count: l.count,
            errors,
            p50_us: l.percentile(50),
            p95_us: l.percentile(95),
            p99_us: l.percentile(99),
            max_us: l.max_us,
        })
        .collect();
    // Busiest first; the map gave app and route order to equals (a stable sort keeps it).
    routes.sort_by_key(|r| std::cmp::Reverse(r.count));
    routes.truncate(limit as usize);
    routes
}

#[async_trait]
impl Events for SqliteEvents {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn append(&self, events: Arc<[EventRecord]>) -> StoreResult<()> {
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                {
                    let mut stmt = tx.prepare_cached(
                        "INSERT OR IGNORE INTO events (kind, bucket_id, server_name, app_name, type, name, at, doc, cid,
                           route, status, duration, entry)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                    )?;
                    let mut minutes = HashMap::new();
                    for e in events.iter() {
                        let span = e.span.as_ref();
                        let added = stmt.execute(params![
                            e.kind.as_str(),
                            e.bucket_id,
                            e.server_name,
                            e.app_name,
                            e.event_type,
                            e.name,
                            e.at,
                            e.doc,
                            e.content_id(),
                            span.map(|s| &s.route),
                            span.map(|s| s.status),
                            span.map(|s| s.duration_us),
                            span.map(|s| s.entry),
                        ])?;
                        // A span written before (the same content id) is counted once.
                        if added == 1 {
                            add_span(&mut minutes, e);
                        }
                    }
                    merge_route_minutes(&tx, minutes)?;
                }
                tx.commit()
            })
            .await
    }

    async fn query(&self, kind: EventKind, q: &EventQuery) -> StoreResult<Vec<String>> {
        let (mut sql, mut args) = event_filter(kind, q);
        sql.insert_str(0, "SELECT doc FROM events WHERE ");
        sql.push_str(" ORDER BY at DESC, id DESC LIMIT ? OFFSET ?");
        args.push(SqlValue::Integer(q.limit.into()));
        args.push(SqlValue::Integer(q.offset.into()));
        self.select(sql, args, |r| r.get(0)).await
    }

    async fn count_histogram(
        &self,
        kind: EventKind,
        q: &EventQuery,
        step_ms: i64,
    ) -> StoreResult<Vec<(i64, u64)>> {
        let (filter, args) = event_filter(kind, q);
        let step = step_ms.max(1);
        // Floored (SQLite's `/` truncates toward zero, wrong for times before 1970).
        let sql = format!(
            "SELECT at - ((at % {step}) + {step}) % {step} AS t, COUNT(*) FROM events
             WHERE {filter} GROUP BY t ORDER BY t"
        );
        self.select(sql, args, |r| Ok((r.get(0)?, r.get(1)?))).await
    }

    async fn delete_matching(&self, kind: EventKind, q: &EventQuery) -> StoreResult<u64> {
        let (filter, args) = event_filter(kind, q);
        let sql = format!("DELETE FROM events WHERE {filter}");
        self.db
            .call(move |c| Ok(c.execute(&sql, rusqlite::params_from_iter(args))? as u64))
            .await
    }

    async fn slowest_spans(&self, q: &SpanQuery) -> StoreResult<Vec<String>> {
        let (filter, mut args) = span_filter(q, q.since);
        args.insert(0, SqlValue::Text(EventKind::Span.as_str().to_string()));
        let sql = format!(
            "SELECT doc FROM events WHERE kind = ? AND entry = 1 AND {filter}
             ORDER BY duration DESC, id LIMIT ?"
        );
        args.push(SqlValue::Integer(q.limit.into()));
        self.select(sql, args, |r| r.get(0)).await
    }

    async fn route_latencies(&self, q: &SpanQuery) -> StoreResult<Vec<RouteLatency>> {
        // The minute holding `since` counts whole.
        let (filter, args) = span_filter(q, q.since.div_euclid(MINUTE_MS) * MINUTE_MS);
        let sql = format!(
            "SELECT app_name, route, status, count, min, max, buckets FROM route_minutes WHERE {filter}"
        );
        let minutes = self
            .select(sql, args, |r| {
                let bytes: Vec<u8> = r.get(6)?;
                let latencies = Latencies::decode(r.get(3)?, r.get(4)?, r.get(5)?, &bytes);
                Ok((r.get(0)?, r.get(1)?, r.get::<_, u16>(2)?, latencies))
            })
            .await?;
        Ok(routes_of(minutes, q.limit))
    }

    async fn append_metrics(&self, points: Arc<[MetricPoint]>) -> StoreResult<()> {
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                {
                    let mut stmt = tx.prepare_cached(
                        "INSERT OR IGNORE INTO metrics (bucket_id, server_name, app_name, pm_id, name, unit,
                           agg_type, at, avg, min, max, last, count, cid)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                    )?;
                    for p in points.iter() {
                        stmt.execute(params![
                            p.bucket_id,
                            p.server_name,
                            p.app_name,
                            p.pm_id,
                            p.name,
                            p.unit,
                            p.agg_type,
                            p.at,
                            p.avg,
                            p.min,
                            p.max,
                            p.last,
                            p.count,
                            p.content_id()
                        ])?;
                    }
                }
                tx.commit()
            })
            .await
    }

    async fn metric_histogram(
        &self,
        q: &MetricQuery,
        step_ms: i64,
    ) -> StoreResult<Vec<MetricPoint>> {
        let (mut filter, mut args) = scope_filter(&q.bucket_id, &q.app_name, &q.server_name);
        filter.push_str(" AND at >= ?");
        args.push(SqlValue::Integer(q.since));
        if let Some(until) = q.until {
            filter.push_str(" AND at < ?");
            args.push(SqlValue::Integer(until));
        }
        if !q.names.is_empty() {
            let marks = vec!["?"; q.names.len()].join(", ");
            filter.push_str(&format!(" AND name IN ({marks})"));
            args.extend(q.names.iter().map(|n| SqlValue::Text(n.clone())));
        }
        let step = step_ms.max(1);
        // An app's instances merged, or one series each.
        let (instance, by) = if q.by_instance {
            ("pm_id", "server_name, app_name, pm_id, name")
        } else {
            ("0", "server_name, app_name, name")
        };
        // The latest minute of each step gives `last` (row_number over the step).
        let sql = format!(
            "WITH m AS (
               SELECT *, (at / {step}) * {step} AS t,
                 ROW_NUMBER() OVER (PARTITION BY {by}, (at / {step}) ORDER BY at DESC) AS rn
               FROM metrics WHERE {filter})
             SELECT bucket_id, server_name, app_name, name, MAX(unit), MAX(agg_type), t,
               SUM(avg * count) / SUM(count), MIN(min), MAX(max), MAX(CASE WHEN rn = 1 THEN last END), SUM(count), {instance}
             FROM m GROUP BY {by}, t ORDER BY t, {by}"
        );
        self.select(sql, args, |r| {
            Ok(MetricPoint {
                bucket_id: r.get(0)?,
                server_name: r.get(1)?,
                app_name: r.get(2)?,
                pm_id: r.get(12)?,
                name: r.get(3)?,
                unit: r.get(4)?,
                agg_type: r.get(5)?,
                at: r.get(6)?,
                avg: r.get(7)?,
                min: r.get(8)?,
                max: r.get(9)?,
                last: r.get(10)?,
                count: r.get(11)?,
            })
        })
        .await
    }

    async fn delete_before(&self, cutoffs: Cutoffs) -> StoreResult<u64> {
        let logs = EventKind::Log.as_str();
        self.db
            .call(move |c| {
                let events = c.execute(
                    "DELETE FROM events WHERE kind = ?1 AND at < ?2",
                    params![logs, cutoffs.logs],
                )? + c.execute(
                    "DELETE FROM events WHERE kind != ?1 AND at < ?2",
                    params![logs, cutoffs.others],
                )?;
                let metrics = c.execute("DELETE FROM metrics WHERE at < ?1", [cutoffs.others])?;
                // A minute goes with its last span.
                let last_minute = cutoffs.others - MINUTE_MS;
                let routes = c.execute("DELETE FROM route_minutes WHERE at < ?1", [last_minute])?;
                Ok((events + metrics + routes) as u64)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn route_minutes_are_filled_from_the_spans_an_older_schema_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sqlite");
        let old = Db::open(&path, "events", &MIGRATIONS[..3], &[]).unwrap();
        old.call(|c| {
            let mut insert = c.prepare(
                "INSERT INTO events (kind, bucket_id, server_name, app_name, type, name, at, doc,
                   route, status, duration, entry) VALUES ('spans', 'b', 's', 'api', 'SERVER', 't',
                   ?1, '{}', ?2, ?3, ?4, ?5)",
            )?;
            for ms in 1..=10 {
                insert.execute(params![ms * 7_000, "GET /x", 200, ms * 1000, true])?;
            }
            insert.execute(params![1, "GET /x", 500, 50_000, true])?;
            insert.execute(params![1, "GET db", 0, 90_000, false])?;
            Ok(())
        })
        .await
        .unwrap();
        drop(old);
        let events = SqliteEvents::open(&path).unwrap();
        let q = SpanQuery {
            bucket_id: "b".into(),
            limit: 10,
            ..SpanQuery::default()
        };
        let routes = events.route_latencies(&q).await.unwrap();
        assert_eq!(routes.len(), 1, "entry spans only: {routes:?}");
        let x = &routes[0];
        assert_eq!(
            (x.route.as_str(), x.count, x.errors, x.max_us),
            ("GET /x", 11, 1, 50_000)
        );
        // Both minutes (0 and 1) were read: the p50 is the 6th of 11.
        assert!((x.p50_us - 6_000).abs() <= 40, "{x:?}");
    }
}
