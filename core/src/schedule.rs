//! Jobs that run once per period across every node. Time is cut into periods (slots)
//! since the epoch; at the start of each, every node's scheduler tries to claim the slot
//! in the documents store and only the first runs the job. A node that restarts within
//! a period finds its slot claimed and does not run it again: a job runs at most once
//! per period (a node that dies mid-run leaves that period undone).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use km_stores::ids::now_ms;
use km_stores::{Documents, StoreResult};

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
            Ok(true) => {
                tracing::debug!(job = name, slot, "period run here");
                job(slot).await;
            }
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

/// Changes told once across nodes and restarts: an episode (a server offline, an alert
/// firing) opens with a claim of `<prefix>open:<key>` at a slot (when it began) and
/// closes with a claim of `<prefix>close:<key>` at the same slot. Whichever node looks,
/// each opening and closing is claimed, so told, once.
pub struct Episodes<'a> {
    documents: &'a dyn Documents,
    open_prefix: String,
    close_prefix: String,
    opened: HashMap<String, i64>,
    closed: HashMap<String, i64>,
}

impl<'a> Episodes<'a> {
    /// The episodes under `prefix` (e.g. `offline:<bucket>:`), read in two queries.
    pub async fn load(documents: &'a dyn Documents, prefix: &str) -> StoreResult<Episodes<'a>> {
        let (open_prefix, close_prefix) = (format!("{prefix}open:"), format!("{prefix}close:"));
        let latest = |prefix: String| async move {
            let slots = documents.latest_slots(&prefix).await?;
            Ok::<_, km_stores::StoreError>(
                slots
                    .into_iter()
                    .map(|(job, slot)| (job[prefix.len()..].to_string(), slot))
                    .collect::<HashMap<String, i64>>(),
            )
        };
        Ok(Episodes {
            documents,
            opened: latest(open_prefix.clone()).await?,
            closed: latest(close_prefix.clone()).await?,
            open_prefix,
            close_prefix,
        })
    }

    /// When the open episode of `key` began, if one is open.
    pub fn open_since(&self, key: &str) -> Option<i64> {
        let since = *self.opened.get(key)?;
        (self.closed.get(key) != Some(&since)).then_some(since)
    }

    /// Opens an episode of `key` that began at `slot`: true for the one caller that does.
    pub async fn open(&mut self, key: &str, slot: i64) -> StoreResult<bool> {
        if self.open_since(key).is_some() {
            return Ok(false);
        }
        let job = format!("{}{key}", self.open_prefix);
        let claimed = self.documents.claim_slot(&job, slot).await?;
        if claimed {
            self.opened.insert(key.to_string(), slot);
        }
        Ok(claimed)
    }

    /// Closes the open episode of `key`: its start, for the one caller that does.
    pub async fn close(&mut self, key: &str) -> StoreResult<Option<i64>> {
        let Some(since) = self.open_since(key) else {
            return Ok(None);
        };
        let job = format!("{}{key}", self.close_prefix);
        let claimed = self.documents.claim_slot(&job, since).await?;
        self.closed.insert(key.to_string(), since);
        Ok(claimed.then_some(since))
    }

    /// The keys with an open episode.
    pub fn open_keys(&self) -> impl Iterator<Item = &str> {
        self.opened
            .keys()
            .filter(|key| self.open_since(key).is_some())
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use parking_lot::Mutex;

    use super::*;
    use km_stores::sqlite::open_documents;

    /// Two nodes see the same changes: each opening and closing is theirs once, and an
    /// episode that begins again later opens again.
    #[tokio::test]
    async fn episodes_open_and_close_once_across_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_documents(dir.path()).unwrap();
        let b = open_documents(dir.path()).unwrap();
        let mut told = Vec::new();
        for round in 0..2 {
            for (node, docs) in [("a", &a), ("b", &b)] {
                let mut episodes = Episodes::load(docs, "t:bucket:").await.unwrap();
                if episodes.open("web-1", 100 + round).await.unwrap() {
                    told.push(format!("{node} open {round}"));
                }
                assert_eq!(episodes.open_since("web-1"), Some(100 + round));
                assert_eq!(episodes.open_keys().collect::<Vec<_>>(), ["web-1"]);
            }
            for (node, docs) in [("b", &b), ("a", &a)] {
                let mut episodes = Episodes::load(docs, "t:bucket:").await.unwrap();
                if let Some(since) = episodes.close("web-1").await.unwrap() {
                    told.push(format!("{node} close {since}"));
                }
                assert_eq!(episodes.open_since("web-1"), None);
            }
        }
        assert_eq!(told, ["a open 0", "b close 100", "a open 1", "b close 101"]);
    }

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
