//! Bounded queues in front of the events store: sessions hand events and metric minutes
//! over without waiting; one task writes them in batches, and keeps retrying a batch the
//! store refuses. What does not fit meanwhile is dropped and counted.
//!
//! Metric minutes wait apart from events: at a minute boundary every series of every
//! server ends its minute at once (~1.1 M points at 10,000 servers). They go out in
//! chunks between batches of events, so that neither starves the other.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::budget::MAX_QUEUED_EVENT_BYTES;
use km_stores::{EventRecord, Events, MetricPoint, StoreError};

const QUEUE_CAPACITY: usize = 65_536;
const BATCH_MAX: usize = 1_024;
/// Metric points waiting for the store (~150 bytes each: one minute of 18,000 servers);
/// over it new points are dropped and counted.
pub const MAX_QUEUED_POINTS: usize = 2 << 20;
/// Points written per batch, between batches of events.
const POINTS_PER_BATCH: usize = 8_192;
/// A batch is cut at this many bytes of events (heap dumps are single events of many MB).
const BATCH_MAX_BYTES: usize = 16 << 20;
const BATCH_WAIT: Duration = Duration::from_millis(100);
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(15);
/// Attempts before a flush (at shutdown) gives up on a store that refuses writes.
const FLUSH_ATTEMPTS: u32 = 3;

enum Item {
    Event(EventRecord),
    /// Everything queued before this is written when the sender is answered.
    Flush(oneshot::Sender<()>),
}

/// Metric points in the order they came, as the sessions handed them over.
#[derive(Debug)]
struct Points {
    chunks: parking_lot::Mutex<VecDeque<Vec<MetricPoint>>>,
    /// One permit per point that may still be queued: a chunk takes its points' permits
    /// and the writer gives them back when it takes the chunk.
    room: Semaphore,
    /// Told when points arrive while the writer waits.
    arrived: Notify,
}

impl Default for Points {
    fn default() -> Self {
        Points {
            chunks: Default::default(),
            room: Semaphore::new(MAX_QUEUED_POINTS),
            arrived: Notify::new(),
        }
    }
}

impl Points {
    /// Queues `points`; gives them back when that would pass `MAX_QUEUED_POINTS`.
    fn offer(&self, points: Vec<MetricPoint>) -> Result<(), Vec<MetricPoint>> {
        match permits(points.len()).and_then(|n| self.room.try_acquire_many(n).ok()) {
            Some(room) => room.forget(),
            None => return Err(points),
        }
        self.push(points);
        Ok(())
    }

    /// Queues `points` once there is room for them; gives them back if there is none by
    /// `deadline`.
    async fn offer_by(
        &self,
        points: Vec<MetricPoint>,
        deadline: tokio::time::Instant,
    ) -> Result<(), Vec<MetricPoint>> {
        let Some(n) = permits(points.len()) else {
            return Err(points);
        };
        match tokio::time::timeout_at(deadline, self.room.acquire_many(n)).await {
            Ok(Ok(room)) => room.forget(),
            _ => return Err(points),
        }
        self.push(points);
        Ok(())
    }

    fn push(&self, points: Vec<MetricPoint>) {
        self.chunks.lock().push_back(points);
        self.arrived.notify_one();
    }

    /// Points queued now.
    fn queued(&self) -> usize {
        MAX_QUEUED_POINTS - self.room.available_permits()
    }

    /// Whether no chunk waits (not the count: room is taken before a chunk is pushed).
    fn is_empty(&self) -> bool {
        self.chunks.lock().is_empty()
    }

    /// Moves whole chunks into `into` until it holds at least `at_least` points (or none
    /// are left).
    fn take(&self, into: &mut Vec<MetricPoint>, at_least: usize) {
        let mut chunks = self.chunks.lock();
        while into.len() < at_least
            && let Some(chunk) = chunks.pop_front()
        {
            self.room.add_permits(chunk.len());
            into.extend(chunk);
        }
    }
}

/// Permits for `n` points (none for more than one semaphore call can take).
fn permits(n: usize) -> Option<u32> {
    u32::try_from(n).ok()
}

/// Counters visible in `/healthz`.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub events_written: AtomicU64,
    pub metric_points_written: AtomicU64,
    /// Batches the store took (items written / batches = batch size).
    pub batches_written: AtomicU64,
    pub dropped: AtomicU64,
    /// Bytes of events in the queue now.
    queued_bytes: AtomicUsize,
    points: Points,
    /// Batches the store refused (kept and retried).
    pub write_retries: AtomicU64,
    /// Items lost because the store still refused them at shutdown.
    pub write_errors: AtomicU64,
    /// Why the store refuses writes now (none while it takes them).
    refusing: parking_lot::Mutex<Option<String>>,
    /// How long the store took to take (or refuse) each batch.
    pub write_seconds: WriteSeconds,
}

/// The store's time per batch write, by what the batch held (`events`, `metric_points`).
#[derive(Clone, Debug)]
pub struct WriteSeconds(pub Family<Held, Histogram, fn() -> Histogram>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Held {
    pub held: &'static str,
}

impl Default for WriteSeconds {
    fn default() -> Self {
        // 0.5 ms to ~16 s, doubling.
        WriteSeconds(Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
        }))
    }
}

impl WriteSeconds {
    fn observe(&self, held: &'static str, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        self.0.get_or_create(&Held { held }).observe(seconds);
    }
}

impl WriterStats {
    /// Why the events store refuses writes, if it does now.
    pub fn refusal(&self) -> Option<String> {
        self.refusing.lock().clone()
    }

    /// Metric points waiting for the store now.
    pub fn queued_points(&self) -> usize {
        self.points.queued()
    }

    /// Bytes of events waiting for the store now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }
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
        let bytes = event.doc.len();
        let queued = &self.stats.queued_bytes;
        if queued.fetch_add(bytes, Ordering::AcqRel) + bytes > MAX_QUEUED_EVENT_BYTES {
            queued.fetch_sub(bytes, Ordering::AcqRel);
            self.dropped(1);
            return;
        }
        if !self.offer(Item::Event(event), 1) {
            queued.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    pub fn metrics(&self, points: Vec<MetricPoint>) {
        if !points.is_empty()
            && let Err(refused) = self.stats.points.offer(points)
        {
            self.dropped(refused.len());
        }
    }

    /// Hands over every point in chunks, waiting for room while the queue is full (at
    /// shutdown every series ends its unfinished minute: 2 M points at 18,000 servers).
    /// What finds no room within `wait` (a store that refuses writes) is dropped.
    pub async fn metrics_waiting(&self, mut points: Vec<MetricPoint>, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while !points.is_empty() {
            let chunk = points.split_off(points.len().saturating_sub(POINTS_PER_BATCH));
            if let Err(refused) = self.stats.points.offer_by(chunk, deadline).await {
                self.dropped(refused.len() + points.len());
                return;
            }
        }
    }

    fn dropped(&self, n: usize) {
        self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Queues `item`; false (counted as `weight` dropped) when the queue is full.
    fn offer(&self, item: Item, weight: u64) -> bool {
        let queued = self.tx.try_send(item).is_ok();
        if !queued {
            self.dropped(weight as usize);
        }
        queued
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
    let mut batch = Batch::default();
    loop {
        let first = if stats.points.is_empty() {
            tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => Some(item),
                    None => break,
                },
                () = stats.points.arrived.notified() => None,
            }
        } else {
            rx.try_recv().ok()
        };
        let flushes = match first {
            Some(first) => gather(first, &mut rx, &mut batch, &stats).await,
            None => Vec::new(),
        };
        // A flush (shutdown) waits for every point handed over before it.
        let points = if flushes.is_empty() {
            POINTS_PER_BATCH
        } else {
            usize::MAX
        };
        stats.points.take(&mut batch.points, points);
        // While the store refuses, the batch is kept and retried; new items wait in the
        // queue (dropped and counted once it is full). A flush (shutdown) gives up after
        // a few attempts rather than hang.
        let mut attempt = 0;
        while !batch.write(&*store, &stats).await {
            attempt += 1;
            if !flushes.is_empty() && attempt >= FLUSH_ATTEMPTS {
                batch.abandon(&stats);
                break;
            }
            tokio::time::sleep(RETRY_MIN.saturating_mul(1 << attempt.min(5)).min(RETRY_MAX)).await;
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
    stats.points.take(&mut batch.points, usize::MAX);
    if !batch.write(&*store, &stats).await {
        batch.abandon(&stats);
    }
}

/// Adds `first` and whatever follows within the batch window to `batch`; returns the
/// flush requests met (the batch is cut at the first one).
async fn gather(
    first: Item,
    rx: &mut mpsc::Receiver<Item>,
    batch: &mut Batch,
    stats: &WriterStats,
) -> Vec<oneshot::Sender<()>> {
    let deadline = tokio::time::Instant::now() + BATCH_WAIT;
    let mut flushes = Vec::new();
    let mut next = Some(first);
    let mut bytes = 0;
    while let Some(item) = next.take() {
        match item {
            Item::Event(e) => {
                bytes += e.doc.len();
                stats.queued_bytes.fetch_sub(e.doc.len(), Ordering::AcqRel);
                batch.events.push(e);
            }
            Item::Flush(done) => flushes.push(done),
        }
        next = if !flushes.is_empty() || bytes >= BATCH_MAX_BYTES {
            None
        } else if batch.events.len() >= BATCH_MAX || !stats.points.is_empty() {
            rx.try_recv().ok()
        } else {
            tokio::time::timeout_at(deadline, rx.recv())
                .await
                .ok()
                .flatten()
        };
    }
    flushes
}

/// What the writer holds until the store takes it.
#[derive(Default)]
struct Batch {
    events: Vec<EventRecord>,
    points: Vec<MetricPoint>,
    /// Kept between attempts while the store refuses them.
    failed_events: Option<Arc<[EventRecord]>>,
    failed_points: Option<Arc<[MetricPoint]>>,
}

impl Batch {
    /// Writes everything held; true when nothing is left.
    async fn write(&mut self, store: &dyn Events, stats: &WriterStats) -> bool {
        if !self.events.is_empty() || self.failed_events.is_some() {
            let events = take_into(&mut self.failed_events, &mut self.events);
            let started = Instant::now();
            let outcome = store.append(events.clone()).await;
            stats.write_seconds.observe("events", started);
            match outcome {
                Ok(()) => written(&stats.events_written, events.len(), stats),
                Err(e) => self.failed_events = Some(refused(e, "events", events, stats)),
            }
        }
        if !self.points.is_empty() || self.failed_points.is_some() {
            let points = take_into(&mut self.failed_points, &mut self.points);
            let started = Instant::now();
            let outcome = store.append_metrics(points.clone()).await;
            stats.write_seconds.observe("metric_points", started);
            match outcome {
                Ok(()) => written(&stats.metric_points_written, points.len(), stats),
                Err(e) => self.failed_points = Some(refused(e, "metric points", points, stats)),
            }
        }
        let done = self.failed_events.is_none() && self.failed_points.is_none();
        if done {
            *stats.refusing.lock() = None;
        }
        done
    }

    /// Gives up on what the store keeps refusing (counted as write errors).
    fn abandon(&mut self, stats: &WriterStats) {
        let lost = self.failed_events.take().map_or(0, |e| e.len())
            + self.failed_points.take().map_or(0, |p| p.len());
        stats.write_errors.fetch_add(lost as u64, Ordering::Relaxed);
        tracing::error!(
            lost,
            "events store still refuses writes at shutdown: batch lost"
        );
    }
}

/// The failed batch followed by the new items, as one batch.
fn take_into<T: Clone>(failed: &mut Option<Arc<[T]>>, fresh: &mut Vec<T>) -> Arc<[T]> {
    match failed.take() {
        None => Arc::from(std::mem::take(fresh)),
        Some(old) if fresh.is_empty() => old,
        Some(old) => old.iter().cloned().chain(fresh.drain(..)).collect(),
    }
}

fn written(counter: &AtomicU64, n: usize, stats: &WriterStats) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
    stats.batches_written.fetch_add(1, Ordering::Relaxed);
}

fn refused<T>(e: StoreError, what: &str, batch: Arc<[T]>, stats: &WriterStats) -> Arc<[T]> {
    stats.write_retries.fetch_add(1, Ordering::Relaxed);
    *stats.refusing.lock() = Some(e.to_string());
    tracing::warn!(error = %e, count = batch.len(), "writing {what} failed; kept for retry");
    batch
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use async_trait::async_trait;

    use super::*;
    use km_stores::sqlite::SqliteEvents;
    use km_stores::{
        Cutoffs, EventKind, EventQuery, MetricQuery, RouteLatency, SpanQuery, StoreResult,
    };

    /// The real embedded store behind a switch that refuses the first `refusals` writes.
    struct Refusing {
        inner: SqliteEvents,
        refusals: AtomicU32,
    }

    impl Refusing {
        fn refuse(&self) -> StoreResult<()> {
            let left = self.refusals.load(Ordering::SeqCst);
            if left == 0 {
                return Ok(());
            }
            self.refusals.store(left - 1, Ordering::SeqCst);
            Err(StoreError::Unavailable {
                store: "events",
                reason: "disk full".into(),
            })
        }
    }

    #[async_trait]
    impl Events for Refusing {
        fn kind(&self) -> &'static str {
            "refusing sqlite"
        }
        async fn append(&self, events: Arc<[EventRecord]>) -> StoreResult<()> {
            self.refuse()?;
            self.inner.append(events).await
        }
        async fn query(&self, kind: EventKind, query: &EventQuery) -> StoreResult<Vec<String>> {
            self.inner.query(kind, query).await
        }
        async fn count_histogram(
            &self,
            kind: EventKind,
            query: &EventQuery,
            step_ms: i64,
        ) -> StoreResult<Vec<(i64, u64)>> {
            self.inner.count_histogram(kind, query, step_ms).await
        }
        async fn delete_matching(&self, kind: EventKind, query: &EventQuery) -> StoreResult<u64> {
            self.inner.delete_matching(kind, query).await
        }
        async fn slowest_spans(&self, query: &SpanQuery) -> StoreResult<Vec<String>> {
            self.inner.slowest_spans(query).await
        }
        async fn route_latencies(&self, query: &SpanQuery) -> StoreResult<Vec<RouteLatency>> {
            self.inner.route_latencies(query).await
        }
        async fn append_metrics(&self, points: Arc<[MetricPoint]>) -> StoreResult<()> {
            self.inner.append_metrics(points).await
        }
        async fn metric_histogram(
            &self,
            query: &MetricQuery,
            step_ms: i64,
        ) -> StoreResult<Vec<MetricPoint>> {
            self.inner.metric_histogram(query, step_ms).await
        }
        async fn delete_before(&self, cutoffs: Cutoffs) -> StoreResult<u64> {
            self.inner.delete_before(cutoffs).await
        }
    }

    fn log(at: i64) -> EventRecord {
        EventRecord {
            id: km_stores::ids::new_object_id(),
            kind: EventKind::Log,
            bucket_id: "b".into(),
            server_name: "s".into(),
            app_name: None,
            event_type: "out".into(),
            name: None,
            at,
            doc: format!("{{\"at\":{at}}}"),
            span: None,
        }
    }

    async fn stored(store: &dyn Events) -> usize {
        let query = EventQuery {
            bucket_id: "b".into(),
            limit: 1000,
            ..EventQuery::default()
        };
        store.query(EventKind::Log, &query).await.unwrap().len()
    }

    #[tokio::test]
    async fn refused_batches_are_kept_and_written_when_the_store_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Refusing {
            inner: SqliteEvents::open(&dir.path().join("e.sqlite")).unwrap(),
            refusals: AtomicU32::new(2),
        });
        let (writer, _task) = EventWriter::start(store.clone());
        writer.event(log(1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer.event(log(2));
        writer.flush().await;
        assert_eq!(stored(&*store).await, 2, "nothing lost");
        assert!(writer.stats.write_retries.load(Ordering::Relaxed) >= 2);
        assert_eq!(writer.stats.refusal(), None, "up again");
        assert_eq!(writer.stats.write_errors.load(Ordering::Relaxed), 0);
    }

    fn points(n: usize, at: i64) -> Vec<MetricPoint> {
        let name: Arc<str> = Arc::from("cpu");
        (0..n)
            .map(|i| MetricPoint {
                bucket_id: Arc::from("b"),
                server_name: Arc::from(format!("s{i}").as_str()),
                app_name: name.clone(),
                pm_id: 0,
                name: name.clone(),
                unit: None,
                agg_type: None,
                at,
                avg: 1.0,
                min: 1.0,
                max: 1.0,
                last: 1.0,
                count: 60,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_minute_boundary_of_many_servers_drops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteEvents::open(&dir.path().join("e.sqlite")).unwrap());
        let (writer, _task) = EventWriter::start(store.clone());
        // Far more than one batch of points, and events handed over meanwhile.
        for server in 0..40 {
            writer.metrics(points(1_000, 60_000));
            writer.event(log(server));
        }
        let stats = &writer.stats;
        // Written without a flush, in chunks.
        for _ in 0..1_000 {
            if stats.metric_points_written.load(Ordering::Relaxed) == 40_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        writer.flush().await;
        assert_eq!(stats.metric_points_written.load(Ordering::Relaxed), 40_000);
        assert_eq!(stats.events_written.load(Ordering::Relaxed), 40);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(stats.queued_points(), 0);
        assert!(
            stats.batches_written.load(Ordering::Relaxed) >= 40_000 / POINTS_PER_BATCH as u64,
            "points went out in chunks"
        );
    }

    #[tokio::test]
    async fn the_final_flush_waits_for_room_then_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteEvents::open(&dir.path().join("e.sqlite")).unwrap());
        let (writer, _task) = EventWriter::start(store);
        let room = &writer.stats.points.room;
        let all = permits(MAX_QUEUED_POINTS).unwrap();
        // A full queue that empties: everything waits, then goes in.
        room.try_acquire_many(all).unwrap().forget();
        let emptied = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            room.add_permits(MAX_QUEUED_POINTS);
        };
        let wait = Duration::from_secs(10);
        tokio::join!(writer.metrics_waiting(points(20_000, 0), wait), emptied);
        writer.flush().await;
        let stats = &writer.stats;
        assert_eq!(stats.metric_points_written.load(Ordering::Relaxed), 20_000);
        // A queue that stays full: dropped and counted after the wait.
        let left = permits(room.available_permits()).unwrap();
        room.try_acquire_many(left).unwrap().forget();
        let wait = Duration::from_millis(100);
        writer.metrics_waiting(points(20_000, 0), wait).await;
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 20_000);
    }

    #[test]
    fn points_over_the_budget_are_refused_and_counted() {
        let queue = Points::default();
        assert!(queue.offer(points(10, 0)).is_ok());
        let fill = permits(MAX_QUEUED_POINTS - 15).unwrap();
        queue.room.try_acquire_many(fill).unwrap().forget();
        assert!(queue.offer(points(10, 0)).is_err(), "over the budget");
        assert_eq!(queue.queued(), MAX_QUEUED_POINTS - 5);
    }

    #[tokio::test]
    async fn a_flush_gives_up_on_a_store_that_stays_down() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Refusing {
            inner: SqliteEvents::open(&dir.path().join("e.sqlite")).unwrap(),
            refusals: AtomicU32::new(u32::MAX),
        });
        let (writer, _task) = EventWriter::start(store.clone());
        writer.event(log(1));
        writer.flush().await;
        assert_eq!(
            writer.stats.write_errors.load(Ordering::Relaxed),
            1,
            "counted as lost"
        );
    }
}
