//! The in-process fan-out of live events to the browsers watching a bucket. Nothing is
//! rendered for a bucket nobody watches.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Events kept for a slow watcher before it skips ahead.
const BACKLOG: usize = 1024;

/// One event for the watchers of a bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveEvent {
    pub bucket_id: String,
    /// The agent channel (`status`, `logs`, `process:event`, …).
    pub event: String,
    /// `{"server_name":…,"<event>":payload}` as JSON text, what `@pm2/js-api` expects.
    pub packet: String,
}

impl LiveEvent {
    /// Builds the packet around `payload`, a JSON text.
    pub fn new(bucket_id: &str, server_name: &str, event: &str, payload: &str) -> Self {
        let name = serde_json::to_string(server_name).unwrap_or_else(|_| "\"\"".into());
        let key = serde_json::to_string(event).unwrap_or_else(|_| "\"\"".into());
        LiveEvent {
            bucket_id: bucket_id.to_string(),
            event: event.to_string(),
            packet: format!("{{\"server_name\":{name},{key}:{payload}}}"),
        }
    }
}

#[derive(Default)]
pub struct LiveHub {
    buckets: RwLock<HashMap<String, broadcast::Sender<Arc<LiveEvent>>>>,
}

impl LiveHub {
    pub fn subscribe(&self, bucket_id: &str) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.buckets
            .write()
            .entry(bucket_id.to_string())
            .or_insert_with(|| broadcast::channel(BACKLOG).0)
            .subscribe()
    }

    /// Forgets the bucket if its last watcher left.
    pub fn release(&self, bucket_id: &str) {
        let mut buckets = self.buckets.write();
        if buckets
            .get(bucket_id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            buckets.remove(bucket_id);
        }
    }

    /// Hands the event to this node's watchers of its bucket.
    pub fn publish(&self, event: Arc<LiveEvent>) {
        if let Some(tx) = self.buckets.read().get(&event.bucket_id) {
            let _ = tx.send(event);
        }
    }

    /// Whether a browser on this node watches the bucket.
    pub fn watched(&self, bucket_id: &str) -> bool {
        self.buckets
            .read()
            .get(bucket_id)
            .is_some_and(|tx| tx.receiver_count() > 0)
    }

    pub fn watched_buckets(&self) -> Vec<String> {
        self.buckets
            .read()
            .iter()
            .filter(|(_, tx)| tx.receiver_count() > 0)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_reach_only_the_watchers_of_their_bucket() {
        let hub = LiveHub::default();
        assert!(!hub.watched("b1"));
        let mut rx = hub.subscribe("b1");
        assert!(hub.watched("b1"));
        hub.publish(Arc::new(LiveEvent::new("b2", "web", "logs", "{}")));
        hub.publish(Arc::new(LiveEvent::new(
            "b1",
            "wéb-\"1",
            "status",
            "{\"a\":1}",
        )));
        let got = rx.try_recv().unwrap();
        let packet: serde_json::Value = serde_json::from_str(&got.packet).unwrap();
        assert_eq!(packet["server_name"], "wéb-\"1");
        assert_eq!(packet["status"]["a"], 1);
        assert!(rx.try_recv().is_err());
        drop(rx);
        hub.release("b1");
        assert!(hub.watched_buckets().is_empty());
    }
}
