//! The bus: what crosses nodes. Commands go to whichever node holds an agent's socket,
//! and the live view of a bucket's servers is gathered from every node. In one process
//! both are direct calls into the interactor's sessions. Live events for browsers go
//! to the watchers of their bucket on every node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

mod counters;
mod hub;

pub use counters::Counters;
pub use hub::{LiveEvent, LiveHub};

use crate::StoreResult;

/// A frame for the agent linked as `server_name` in `bucket_id`.
#[derive(Debug, Clone)]
pub struct AgentCommand {
    pub bucket_id: String,
    pub server_name: String,
    /// The whole `{"channel":…,"payload":…}` text frame.
    pub frame: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    NotConnected,
}

/// What holds agent sockets on this node (the interactor's sessions).
pub trait CommandSink: Send + Sync {
    /// Sends the command if the agent is connected here.
    fn deliver(&self, command: &AgentCommand) -> Delivery;
    /// The API view (JSON) of the bucket's servers connected here (only `server_name`
    /// if given).
    fn online_servers(&self, bucket_id: &str, server_name: Option<&str>) -> Vec<String>;
    /// Closes the agents of a disabled bucket connected here; true if there were any.
    fn evict(&self, bucket_id: &str) -> bool;
    /// The monitored processes of each server connected here (the licence limit counts them).
    fn processes(&self) -> Vec<ServerProcesses>;
    /// Their sum, kept as servers change.
    fn tally(&self) -> u64;
}

/// How many processes of a connected server count against the licence.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerProcesses {
    pub bucket_id: String,
    pub server_name: String,
    pub processes: u32,
}

#[async_trait]
pub trait Bus: Send + Sync {
    /// Which implementation this is (`local`, `redis`), for `/healthz`.
    fn kind(&self) -> &'static str;
    async fn ping(&self) -> StoreResult<()>;
    /// Sends a command to the agent, wherever it is connected.
    async fn send_command(&self, command: AgentCommand) -> StoreResult<Delivery>;
    /// The API view (JSON) of the bucket's servers connected to other nodes (only
    /// `server_name` if given).
    async fn remote_servers(
        &self,
        bucket_id: &str,
        server_name: Option<&str>,
    ) -> StoreResult<Vec<String>>;
    /// Closes the agents of a disabled bucket on every node.
    async fn evict(&self, bucket_id: &str);
    /// The monitored processes of the servers connected to other nodes.
    async fn remote_processes(&self) -> StoreResult<Vec<ServerProcesses>>;
    /// Their sum as each other node last told it (with its heartbeat): never below the
    /// true count but for servers that linked since, above it while a server that moved
    /// is still counted where it was.
    async fn remote_tally(&self) -> StoreResult<u64>;
    /// This node now holds the freshest socket of the server (after a reconnect, a
    /// command must go to it, not to a stale socket on another node).
    async fn claim(&self, bucket_id: &str, server_name: &str) -> StoreResult<()>;
    /// Whether a browser on any node watches the bucket (live events are built only then).
    fn watched(&self, bucket_id: &str) -> bool;
    /// Whether a browser on any node wants a whole status after each patch of the
    /// bucket's agents (rendered only then).
    fn rendering(&self, bucket_id: &str) -> bool;
    /// Hands a live event to the bucket's watchers on every node; never waits.
    fn publish_live(&self, event: LiveEvent);
    /// A browser on this node started watching the bucket: the other nodes hear it now,
    /// not at the next heartbeat.
    async fn watch(&self, bucket_id: &str);
    /// Counts a failure of `key` (a sign-in, say) in its window, shared by every node,
    /// opening a window of `window` if none is open; returns the window's failures.
    async fn count_failure(&self, key: &str, window: Duration) -> StoreResult<u64>;
    /// The failures of `key`'s open window and the time left in it.
    async fn failures(&self, key: &str) -> StoreResult<Option<(u64, Duration)>>;
    async fn forget_failures(&self, key: &str) -> StoreResult<()>;
}

/// The in-process bus: every agent socket is in this process.
pub struct LocalBus {
    sink: Arc<dyn CommandSink>,
    hub: Arc<LiveHub>,
    failures: Counters,
}

impl LocalBus {
    pub fn new(sink: Arc<dyn CommandSink>, hub: Arc<LiveHub>) -> Self {
        LocalBus {
            sink,
            hub,
            failures: Counters::default(),
        }
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn send_command(&self, command: AgentCommand) -> StoreResult<Delivery> {
        Ok(self.sink.deliver(&command))
    }

    async fn remote_servers(
        &self,
        _bucket_id: &str,
        _server_name: Option<&str>,
    ) -> StoreResult<Vec<String>> {
        Ok(Vec::new())
    }

    async fn evict(&self, bucket_id: &str) {
        self.sink.evict(bucket_id);
    }

    async fn remote_processes(&self) -> StoreResult<Vec<ServerProcesses>> {
        Ok(Vec::new())
    }

    async fn remote_tally(&self) -> StoreResult<u64> {
        Ok(0)
    }

    async fn claim(&self, _bucket_id: &str, _server_name: &str) -> StoreResult<()> {
        Ok(())
    }

    fn watched(&self, bucket_id: &str) -> bool {
        self.hub.watched(bucket_id)
    }

    fn rendering(&self, bucket_id: &str) -> bool {
        self.hub.rendering(bucket_id)
    }

    fn publish_live(&self, event: LiveEvent) {
        self.hub.publish(Arc::new(event));
    }

    async fn watch(&self, _bucket_id: &str) {}

    async fn count_failure(&self, key: &str, window: Duration) -> StoreResult<u64> {
        Ok(self.failures.hit(key, window, Instant::now()))
    }

    async fn failures(&self, key: &str) -> StoreResult<Option<(u64, Duration)>> {
        Ok(self.failures.get(key, Instant::now()))
    }

    async fn forget_failures(&self, key: &str) -> StoreResult<()> {
        self.failures.forget(key);
        Ok(())
    }
}
