//! Events and metric minutes in SQLite: one table each, indexed by bucket and time.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::params;
use rusqlite::types::Value as SqlValue;

use super::Db;
use crate::{
    Cutoffs, EventKind, EventQuery, EventRecord, Events, MetricPoint, MetricQuery, RouteLatency,
    SpanQuery, StoreResult,
};

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
];

pub struct SqliteEvents {
    db: Db,
}

impl SqliteEvents {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(SqliteEvents {
            db: Db::open(path, "events", MIGRATIONS)?,
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

/// `WHERE` clauses for the entry spans matching `q`.
fn span_filter(q: &SpanQuery) -> (String, Vec<SqlValue>) {
    let (mut sql, mut args) = scope_filter(&q.bucket_id, &q.app_name, &q.server_name);
    sql.push_str(" AND kind = ? AND entry = 1 AND at >= ?");
    args.push(SqlValue::Text(EventKind::Span.as_str().to_string()));
    args.push(SqlValue::Integer(q.since));
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
                    for e in events.iter() {
                        let span = e.span.as_ref();
                        stmt.execute(params![
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
                    }
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
        let (filter, mut args) = span_filter(q);
        let sql =
            format!("SELECT doc FROM events WHERE {filter} ORDER BY duration DESC, id LIMIT ?");
        args.push(SqlValue::Integer(q.limit.into()));
        self.select(sql, args, |r| r.get(0)).await
    }

    async fn route_latencies(&self, q: &SpanQuery) -> StoreResult<Vec<RouteLatency>> {
        let (filter, mut args) = span_filter(q);
        // Nearest rank: the p-th percentile of n is the value ranked ceil(p * n / 100).
        let rank = |p: u32| format!("MAX(CASE WHEN rn = (n * {p} + 99) / 100 THEN duration END)");
        let sql = format!(
            "WITH s AS (
               SELECT app_name, route, duration, status,
                 ROW_NUMBER() OVER (PARTITION BY app_name, route ORDER BY duration) AS rn,
                 COUNT(*) OVER (PARTITION BY app_name, route) AS n
               FROM events WHERE {filter})
             SELECT app_name, route, n, SUM(status >= 500), {}, {}, {}, MAX(duration)
             FROM s GROUP BY app_name, route ORDER BY n DESC, app_name, route LIMIT ?",
            rank(50),
            rank(95),
            rank(99)
        );
        args.push(SqlValue::Integer(q.limit.into()));
        self.select(sql, args, |r| {
            Ok(RouteLatency {
                app_name: r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                route: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                count: r.get(2)?,
                errors: r.get(3)?,
                p50_us: r.get(4)?,
                p95_us: r.get(5)?,
                p99_us: r.get(6)?,
                max_us: r.get(7)?,
            })
        })
        .await
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
                Ok((events + metrics) as u64)
            })
            .await
    }
}
