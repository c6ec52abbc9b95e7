//! A bounded queue in front of the events store: sessions hand events over without
//! waiting; one task writes them in batches. What does not fit is dropped and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::stores::{EventRecord, Events, MetricPoint, StoreResult};

const QUEUE_CAPACITY: usize = 65_536;
const BATCH_MAX: usize = 1_024;
const BATCH_WAIT: Duration = Duration::from_millis(100);

enum Item {
    Event(EventRecord),
    Metrics(Vec<MetricPoint>),
    /// Everything queued before this is written when the sender is answered.
    Flush(oneshot::Sender<()>),
}

/// Counters visible in `/healthz`.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub events_written: AtomicU64,
    pub metric_points_written: AtomicU64,
    pub dropped: AtomicU64,
    pub write_errors: AtomicU64,
}

#[derive(Clone)]
pub struct EventWriter {
    tx: mpsc::Sender<Item>,
    pub stats: Arc<WriterStats>,
}

impl EventWriter {
    /// Starts the writer task over `store`.
    pub fn start(store: Arc<dyn Events>) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let stats = Arc::new(WriterStats::default());
        let task = tokio::spawn(run(rx, store, stats.clone()));
        (EventWriter { tx, stats }, task)
    }

    pub fn event(&self, event: EventRecord) {
        self.offer(Item::Event(event), 1);
    }

    pub fn metrics(&self, points: Vec<MetricPoint>) {
        if !points.is_empty() {
            let n = points.len() as u64;
            self.offer(Item::Metrics(points), n);
        }
    }

    fn offer(&self, item: Item, weight: u64) {
        if self.tx.try_send(item).is_err() {
            self.stats.dropped.fetch_add(weight, Ordering::Relaxed);
        }
    }

    /// Waits until everything queued so far is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Item::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn run(mut rx: mpsc::Receiver<Item>, store: Arc<dyn Events>, stats: Arc<WriterStats>) {
    let mut events = Vec::with_capacity(BATCH_MAX);
    let mut points = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut flushes = Vec::new();
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Item::Event(e) => events.push(e),
                Item::Metrics(p) => points.extend(p),
                Item::Flush(done) => flushes.push(done),
            }
            if !flushes.is_empty() || events.len() + points.len() >= BATCH_MAX {
                next = rx.try_recv().ok().filter(|_| flushes.is_empty());
            } else {
                next = tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten();
            }
        }
        write_batch(&*store, &stats, &mut events, &mut points).await;
        for done in flushes {
            let _ = done.send(());
        }
    }
    write_batch(&*store, &stats, &mut events, &mut points).await;
}

async fn write_batch(
    store: &dyn Events,
    stats: &WriterStats,
    events: &mut Vec<EventRecord>,
    points: &mut Vec<MetricPoint>,
) {
    if !events.is_empty() {
        let batch = std::mem::take(events);
        let n = batch.len() as u64;
        tally(
            store.append(batch).await,
            n,
            "events",
            &stats.events_written,
            stats,
        );
    }
    if !points.is_empty() {
        let batch = std::mem::take(points);
        let n = batch.len() as u64;
        tally(
            store.append_metrics(batch).await,
            n,
            "metric points",
            &stats.metric_points_written,
            stats,
        );
    }
}

/// Counts a batch as written, or logs and counts its failure.
fn tally(result: StoreResult<()>, n: u64, what: &str, written: &AtomicU64, stats: &WriterStats) {
    match result {
        Ok(()) => written.fetch_add(n, Ordering::Relaxed),
        Err(e) => {
            tracing::error!(error = %e, count = n, "writing {what} failed");
            stats.write_errors.fetch_add(n, Ordering::Relaxed)
        }
    };
}
