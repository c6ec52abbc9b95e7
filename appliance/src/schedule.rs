//! Jobs that run once per period across every node. Time is cut into periods (slots)
//! since the epoch; at the start of each, every node's scheduler tries to claim the slot
//! in the documents store and only the first runs the job. A node that restarts within
//! a period finds its slot claimed and does not run it again: a job runs at most once
//! per period (a node that dies mid-run leaves that period undone).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ids::now_ms;
use crate::stores::Documents;

/// Runs `job` once per `period` across the cluster until `shutdown`; `name` identifies
/// the job in the store and the logs.
pub async fn every<F, Fut>(
    documents: Arc<dyn Documents>,
    shutdown: CancellationToken,
    name: &'static str,
    period: Duration,
    mut job: F,
) where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = ()>,
{
    let period_ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX).max(1);
    loop {
        let now = now_ms();
        let slot = now / period_ms;
        match documents.claim_slot(name, slot).await {
            Ok(true) => job(slot).await,
            Ok(false) => tracing::debug!(job = name, slot, "period already run by another node"),
            Err(e) => tracing::warn!(job = name, error = %e, "cannot claim the period; skipped"),
        }
        let next = (slot + 1) * period_ms;
        let wait = Duration::from_millis(u64::try_from(next - now_ms()).unwrap_or(0));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use parking_lot::Mutex;

    use super::*;
    use crate::stores::sqlite::open_documents;

    /// Two nodes (two handles on one store) for a dozen short periods, one of them
    /// restarting halfway: every period runs exactly once.
    #[tokio::test]
    async fn each_period_runs_once_across_nodes_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let runs: Arc<Mutex<BTreeMap<i64, u32>>> = Arc::default();
        let period = Duration::from_millis(100);
        let node = |stop: CancellationToken| {
            let docs: Arc<dyn Documents> = Arc::new(open_documents(dir.path()).unwrap());
            let runs = runs.clone();
            tokio::spawn(every(docs, stop, "test-job", period, move |slot| {
                let runs = runs.clone();
                async move {
                    *runs.lock().entry(slot).or_default() += 1;
                }
            }))
        };
        let (a, b1, b2) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let tasks = [node(a.clone()), node(b1.clone())];
        tokio::time::sleep(Duration::from_millis(650)).await;
        b1.cancel();
        let restarted = node(b2.clone());
        tokio::time::sleep(Duration::from_millis(650)).await;
        a.cancel();
        b2.cancel();
        for task in tasks.into_iter().chain([restarted]) {
            task.await.unwrap();
        }
        let runs = runs.lock();
        // A loaded machine may wake a scheduler late and skip a period; none runs twice.
        assert!(runs.len() >= 6, "periods run: {runs:?}");
        assert!(
            runs.values().all(|n| *n == 1),
            "a period ran twice: {runs:?}"
        );
    }
}
