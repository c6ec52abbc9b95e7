//! Background work, below HTTP and on `km-core`: notifications (`notify`) with alerts
//! (`alerts`), daily and weekly reports (`reporter`); here the workers role's jobs
//! (retention, scheduled backups), persisting server state and ended metric minutes,
//! closing agents of disabled buckets, and the final flush at shutdown.

pub mod alerts;
pub mod notify;
pub mod reporter;

use std::time::Duration;

use km_core::app::AppState;
use km_core::schedule;
use km_stores::Cutoffs;
use km_stores::ids::now_ms;

/// The workers role's jobs, each run once per period across the cluster: retention,
/// notifications (with alerts), reports.
pub fn spawn_role(app: &AppState) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(retention(app.clone())),
        tokio::spawn(crate::notify::run(app.clone())),
        tokio::spawn(crate::reporter::run(app.clone())),
        tokio::spawn(backups(app.clone())),
    ]
}

/// Scheduled backups (`KM_BACKUP_DIR`): once per period across the nodes, the oldest
/// beyond `KM_BACKUP_KEEP` deleted, the outcome kept next to them for `/healthz` and the
/// admins' account page; a failure is logged as an error.
async fn backups(app: AppState) {
    let Some(schedule) = app.settings.backups.clone() else {
        return;
    };
    let (documents, shutdown) = (app.documents.clone(), app.shutdown.clone());
    km_core::schedule::every(documents, shutdown, "backup", schedule.every, |_| {
        let (app, schedule) = (app.clone(), schedule.clone());
        async move { backup_once(&app, &schedule).await }
    })
    .await;
}

async fn backup_once(app: &AppState, schedule: &km_config::BackupSchedule) {
    let started = std::time::Instant::now();
    let sources = km_backup::Sources {
        settings: app.settings.clone(),
        settings_text: Some(km_backup::settings_of_process()),
        wizard_state: None,
    };
    let made = km_backup::create(&sources, &schedule.dir).await;
    let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let outcome = match &made {
        Ok(created) => {
            let bytes = std::fs::metadata(&created.path).map_or(0, |m| m.len());
            tracing::info!(file = %created.path.display(), bytes, took_ms, "scheduled backup written");
            if let Err(e) = km_backup::prune(&schedule.dir, schedule.keep) {
                tracing::warn!(error = %e, dir = %schedule.dir.display(), "cannot delete old backups");
            }
            km_backup::Outcome {
                at: now_ms(),
                ok: true,
                file: Some(created.path.display().to_string()),
                bytes,
                took_ms,
                error: None,
            }
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), dir = %schedule.dir.display(), "scheduled backup failed");
            km_backup::Outcome {
                at: now_ms(),
                ok: false,
                file: None,
                bytes: 0,
                took_ms,
                error: Some(format!("{e:#}")),
            }
        }
    };
    if let Err(e) = outcome.write(&schedule.dir) {
        tracing::warn!(error = %e, dir = %schedule.dir.display(), "cannot record the backup's outcome");
    }
}

const PERSIST_EVERY: Duration = Duration::from_secs(30);
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
const DAY_MS: i64 = 24 * 3600 * 1000;

/// Every few seconds: servers' latest status to the documents store, metric minutes of
/// servers that went quiet to the writer.
pub async fn persist(app: AppState) {
    let mut tick = tokio::time::interval(PERSIST_EVERY);
    loop {
        tokio::select! {
            () = app.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Walking every session and serialising statuses takes milliseconds with
        // thousands of servers: off the async workers, so no socket waits for it.
        let sessions = app.sessions.clone();
        let points = tokio::task::spawn_blocking(move || sessions.drain_metrics(now_ms(), false));
        app.ingest.writer.metrics(points.await.unwrap_or_default());
        save_servers(&app, false).await;
        evict_disabled(&app).await;
    }
}

/// Closes the agents of disabled buckets: the API tells every node at once over the bus;
/// this catches a node that missed it.
async fn evict_disabled(app: &AppState) {
    for bucket_id in app.sessions.online_buckets() {
        match app.documents.bucket_by_id(&bucket_id).await {
            Ok(Some(bucket)) if bucket.disabled => {
                if app.sessions.evict_bucket(&bucket_id) {
                    tracing::info!(bucket = %bucket_id, "agents of a disabled bucket closed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check whether a bucket is disabled"),
        }
    }
}

/// Servers written per store call: a batch's statuses are rendered at once (those of
/// 18,000 servers would hold ~200 MB), and one call stays short for the store.
const SAVE_BATCH: usize = 256;

/// Writes the servers that changed (their metric values at most every
/// `VALUES_SAVED_EVERY`; with `finish` every change), in batches; a failed batch is tried again next round.
async fn save_servers(app: &AppState, finish: bool) {
    let due = app.sessions.unsaved(now_ms(), finish);
    for batch in due.chunks(SAVE_BATCH) {
        let batch = batch.to_vec();
        let rendered = tokio::task::spawn_blocking(move || {
            let now = now_ms();
            let records: Vec<_> = batch.iter().filter_map(|s| s.record(now)).collect();
            (batch, records)
        })
        .await;
        let Ok((batch, records)) = rendered else {
            return;
        };
        if records.is_empty() {
            continue;
        }
        if let Err(e) = app.documents.upsert_servers(&records).await {
            // The batches after this one were not rendered: still unsaved.
            tracing::error!(error = %e, servers = records.len(), "saving server state failed");
            batch.iter().for_each(|s| s.unsave());
            return;
        }
    }
}

/// Deletes events older than `KM_RETENTION_DAYS` (logs: `KM_LOGS_RETENTION_DAYS`), hourly,
/// on one node of the cluster.
pub async fn retention(app: AppState) {
    let (documents, shutdown) = (app.documents.clone(), app.shutdown.clone());
    schedule::every(documents, shutdown, "retention", RETENTION_EVERY, |_| {
        delete_old_events(&app)
    })
    .await;
}

async fn delete_old_events(app: &AppState) {
    let keep = i64::from(app.settings.retention_days) * DAY_MS;
    let keep_logs = i64::from(app.settings.logs_retention_days) * DAY_MS;
    let now = now_ms();
    match app
        .events
        .delete_before(Cutoffs {
            logs: now - keep_logs,
            others: now - keep,
        })
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            rows = n,
            days = app.settings.retention_days,
            "retention: old events deleted"
        ),
        Err(e) => tracing::warn!(error = %e, "retention failed; retrying in an hour"),
    }
}

/// How long the final flush waits for room for metric minutes in the writer's queue.
const FLUSH_POINTS_WAIT: Duration = Duration::from_secs(60);

/// After sockets closed: every metric minute (even unfinished), every event, every
/// server's state written before the process exits.
pub async fn flush(app: &AppState) {
    let started = std::time::Instant::now();
    let points = app.sessions.drain_metrics(now_ms(), true);
    let minutes = points.len();
    let writer = &app.ingest.writer;
    writer.metrics_waiting(points, FLUSH_POINTS_WAIT).await;
    writer.flush().await;
    let written = started.elapsed();
    save_servers(app, true).await;
    tracing::info!(
        metric_points = minutes,
        events_and_minutes_ms = written.as_millis() as u64,
        servers_ms = (started.elapsed() - written).as_millis() as u64,
        "flushed"
    );
}
