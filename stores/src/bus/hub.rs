//! The in-process fan-out of live events to the browsers watching a bucket. Nothing is
//! rendered for a bucket nobody watches, and a status patch is rendered into a whole
//! status only while a watcher wants whole statuses.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    /// A `status` rendered after a patch (the agent sent `status:patch`): watchers that
    /// take the patches do not get it.
    #[serde(default)]
    pub rendered: bool,
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
            rendered: false,
        }
    }
}

/// The watchers of one bucket on this node.
struct Channel {
    tx: broadcast::Sender<Arc<LiveEvent>>,
    /// Watchers that want a whole status after each patch (not the patches).
    renders: AtomicUsize,
}

#[derive(Default)]
pub struct LiveHub {
    buckets: RwLock<HashMap<String, Channel>>,
}

impl LiveHub {
    pub fn subscribe(&self, bucket_id: &str) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.buckets
            .write()
            .entry(bucket_id.to_string())
            .or_insert_with(|| Channel {
                tx: broadcast::channel(BACKLOG).0,
                renders: AtomicUsize::new(0),
            })
            .tx
            .subscribe()
    }

    /// A watcher of the bucket starts (`true`) or stops wanting whole statuses after
    /// patches.
    pub fn renders(&self, bucket_id: &str, wanted: bool) {
        if let Some(channel) = self.buckets.read().get(bucket_id) {
            if wanted {
                channel.renders.fetch_add(1, Ordering::AcqRel);
            } else {
                channel.renders.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether a watcher on this node wants whole statuses after patches.
    pub fn rendering(&self, bucket_id: &str) -> bool {
        self.buckets
            .read()
            .get(bucket_id)
            .is_some_and(|c| c.renders.load(Ordering::Acquire) > 0)
    }

    /// Forgets the bucket if its last watcher left.
    pub fn release(&self, bucket_id: &str) {
        let mut buckets = self.buckets.write();
        if buckets
            .get(bucket_id)
            .is_some_and(|c| c.tx.receiver_count() == 0)
        {
            buckets.remove(bucket_id);
        }
    }

    /// Hands the event to this node's watchers of its bucket.
    pub fn publish(&self, event: Arc<LiveEvent>) {
        if let Some(channel) = self.buckets.read().get(&event.bucket_id) {
            let _ = channel.tx.send(event);
        }
    }

    /// Whether a browser on this node watches the bucket.
    pub fn watched(&self, bucket_id: &str) -> bool {
        self.buckets
            .read()
            .get(bucket_id)
            .is_some_and(|c| c.tx.receiver_count() > 0)
    }

    pub fn watched_buckets(&self) -> Vec<String> {
        self.buckets
            .read()
            .iter()
            .filter(|(_, c)| c.tx.receiver_count() > 0)
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
        assert!(!hub.rendering("b1"));
        hub.renders("b1", true);
        assert!(hub.rendering("b1") && !hub.rendering("b2"));
        hub.renders("b1", false);
        assert!(!hub.rendering("b1"));
        drop(rx);
        hub.release("b1");
        assert!(hub.watched_buckets().is_empty());
    }
}
