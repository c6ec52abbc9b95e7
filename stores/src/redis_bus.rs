//! The bus on Redis (`KM_REDIS_URL`), for several nodes sharing the stores. Requests go
//! to every node on one pub/sub channel; answers come back on the asker's own channel.
//! Each node keeps a heartbeat in a hash, so an asker knows how many answers to wait for,
//! and the node holding an agent's freshest socket is recorded when it connects.
//! Live events for browsers go over one channel, and only for buckets some node watches:
//! each node announces the buckets it watches with its heartbeat.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use parking_lot::Mutex;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{LiveEvent, LiveHub};
use crate::ids::{new_object_id, now_ms};
use crate::{AgentCommand, Bus, CommandSink, Delivery, ServerProcesses, StoreError, StoreResult};

const REQUESTS: &str = "km:bus";
const LIVE: &str = "km:live";
/// Live events waiting for Redis; beyond this they are dropped (watchers refetch).
const LIVE_QUEUE: usize = 4096;
const NODES: &str = "km:nodes";
/// Each node's licence tally, written with its heartbeat.
const TALLIES: &str = "km:tallies";
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node silent this long is gone.
const NODE_TTL_MS: i64 = 6_000;
const COMMAND_WAIT: Duration = Duration::from_secs(2);
const SERVERS_WAIT: Duration = Duration::from_millis(500);
/// How long one Redis command may take before it fails. The client's default (0.5 s) is
/// passed while thousands of agents link at once on a small VM; /healthz gives 2 s.
const RESPONSE_WAIT: Duration = Duration::from_secs(2);
const OWNER_TTL_S: u64 = 24 * 3600;

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable {
        store: "bus",
        reason: e.to_string(),
    }
}

fn failures_key(key: &str) -> String {
    format!("km:failures:{key}")
}

fn owner_key(bucket_id: &str, server_name: &str) -> String {
    format!("km:owner:{bucket_id}:{server_name}")
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Command {
        from: String,
        req: u64,
        bucket_id: String,
        server_name: String,
        frame: String,
    },
    Servers {
        from: String,
        req: u64,
        bucket_id: String,
        server_name: Option<String>,
    },
    /// The processes of the servers connected to a node.
    Processes { from: String, req: u64 },
    /// Close the agents of a disabled bucket.
    Evict { from: String, bucket_id: String },
    /// The buckets a node's browsers watch now.
    Watching { from: String, buckets: Vec<String> },
}

/// A live event on its way to the other nodes.
#[derive(Serialize, Deserialize)]
struct Relayed {
    from: String,
    event: LiveEvent,
}

#[derive(Serialize, Deserialize)]
struct Reply {
    req: u64,
    #[serde(default)]
    delivered: bool,
    #[serde(default)]
    servers: Vec<String>,
    #[serde(default)]
    processes: Vec<ServerProcesses>,
}

pub struct RedisBus {
    node: String,
    conn: ConnectionManager,
    sink: Arc<dyn CommandSink>,
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
    next_req: AtomicU64,
    hub: Arc<LiveHub>,
    /// Buckets other nodes watch, with when their announcement expires (epoch ms).
    watched_elsewhere: Mutex<HashMap<String, i64>>,
    live_out: mpsc::Sender<LiveEvent>,
}

/// A client for `url` (nothing sent yet) and its `host:port` for messages. The error
/// never repeats the URL (it may hold a password).
pub fn open(url: &str) -> anyhow::Result<(redis::Client, String)> {
    let client = redis::Client::open(url).map_err(|_| {
        anyhow::anyhow!("not a usable Redis URL (redis://[:password@]host:port[/db])")
    })?;
    let host = client.get_connection_info().addr().to_string();
    Ok((client, host))
}

impl RedisBus {
    /// Connects (errors name the host, never a password) and starts
    /// the listener and heartbeat tasks, which stop with `shutdown`.
    pub async fn connect(
        url: &str,
        sink: Arc<dyn CommandSink>,
        hub: Arc<LiveHub>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let (client, host) = open(url)?;
        let config = ConnectionManagerConfig::new().set_response_timeout(Some(RESPONSE_WAIT));
        let connect = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_connection_manager_with_config(config),
        );
        let mut conn = connect
            .await
            .map_err(|_| anyhow::anyhow!("cannot connect to {host}: no answer within 5 s"))?
            .map_err(|e| anyhow::anyhow!("cannot connect to {host}: {e}"))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| anyhow::anyhow!("{host} does not answer PING: {e}"))?;
        let (live_out, live_queue) = mpsc::channel(LIVE_QUEUE);
        let bus = Arc::new(RedisBus {
            node: new_object_id(),
            conn,
            sink,
            waiting: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            hub,
            watched_elsewhere: Mutex::new(HashMap::new()),
            live_out,
        });
        tokio::spawn(bus.clone().listen(client, shutdown.clone()));
        tokio::spawn(bus.clone().relay_live(live_queue));
        tokio::spawn(bus.clone().heartbeat(shutdown));
        Ok(bus)
    }

    fn inbox(&self) -> String {
        format!("km:node:{}", self.node)
    }

    /// Subscribes to requests and to this node's inbox; reconnects after outages.
    async fn listen(self: Arc<Self>, client: redis::Client, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match client.get_async_pubsub().await {
                Ok(mut pubsub) => {
                    if pubsub
                        .subscribe(&[REQUESTS, LIVE, &self.inbox()])
                        .await
                        .is_ok()
                    {
                        delay = Duration::from_millis(200);
                        let mut messages = pubsub.on_message();
                        loop {
                            tokio::select! {
                                () = shutdown.cancelled() => return,
                                message = messages.next() => match message {
                                    Some(m) => self.clone().handle(m.get_channel_name().to_string(), m.get_payload_bytes().to_vec()).await,
                                    None => break,
                                },
                            }
                        }
                    }
                    tracing::warn!("bus: Redis subscription lost; resubscribing");
                }
                Err(e) => tracing::warn!(error = %e, "bus: cannot subscribe to Redis; retrying"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn handle(self: Arc<Self>, channel: String, payload: Vec<u8>) {
        if channel == LIVE {
            if let Ok(relayed) = serde_json::from_slice::<Relayed>(&payload)
                && relayed.from != self.node
            {
                self.hub.publish(Arc::new(relayed.event));
            }
            return;
        }
        if channel != REQUESTS {
            if let Ok(reply) = serde_json::from_slice::<Reply>(&payload)
                && let Some(tx) = self.waiting.lock().get(&reply.req)
            {
                let _ = tx.send(reply);
            }
            return;
        }
        let reply = match serde_json::from_slice::<Request>(&payload) {
            Ok(Request::Command {
                from,
                req,
                bucket_id,
                server_name,
                frame,
            }) if from != self.node => {
                let command = AgentCommand {
                    bucket_id,
                    server_name,
                    frame,
                };
                let delivered = self.deliver_if_owner(&command).await == Delivery::Sent;
                (
                    from,
                    Reply {
                        req,
                        delivered,
                        servers: Vec::new(),
                        processes: Vec::new(),
                    },
                )
            }
            Ok(Request::Servers {
                from,
                req,
                bucket_id,
                server_name,
            }) if from != self.node => (
                from,
                Reply {
                    req,
                    delivered: false,
                    servers: self.sink.online_servers(&bucket_id, server_name.as_deref()),
                    processes: Vec::new(),
                },
            ),
            Ok(Request::Processes { from, req }) if from != self.node => (
                from,
                Reply {
                    req,
                    delivered: false,
                    servers: Vec::new(),
                    processes: self.sink.processes(),
                },
            ),
            Ok(Request::Evict { from, bucket_id }) if from != self.node => {
                self.sink.evict(&bucket_id);
                return;
            }
            Ok(Request::Watching { from, buckets }) if from != self.node => {
                let until = now_ms() + NODE_TTL_MS;
                let mut watched = self.watched_elsewhere.lock();
                watched.retain(|_, expires| *expires > now_ms());
                for bucket in buckets {
                    watched.insert(bucket, until);
                }
                return;
            }
            _ => return,
        };
        let (to, reply) = reply;
        let mut conn = self.conn.clone();
        let body = serde_json::to_string(&reply).unwrap_or_default();
        if let Err(e) = conn
            .publish::<_, _, ()>(format!("km:node:{to}"), body)
            .await
        {
            tracing::warn!(error = %e, "bus: cannot answer a request");
        }
    }

    /// Delivers here if the agent's freshest socket is on this node.
    async fn deliver_if_owner(&self, command: &AgentCommand) -> Delivery {
        let mut conn = self.conn.clone();
        let owner: Option<String> = conn
            .get(owner_key(&command.bucket_id, &command.server_name))
            .await
            .unwrap_or(None);
        if owner.as_deref().is_some_and(|o| o != self.node) {
            return Delivery::NotConnected;
        }
        self.sink.deliver(command)
    }

    async fn heartbeat(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let mut conn = self.conn.clone();
            let beat = redis::pipe()
                .hset(NODES, &self.node, now_ms())
                .ignore()
                .hset(TALLIES, &self.node, self.sink.tally())
                .ignore()
                .query_async::<()>(&mut conn)
                .await;
            if let Err(e) = beat {
                tracing::warn!(error = %e, "bus: heartbeat failed");
            }
            self.announce(self.hub.watched_buckets()).await;
        }
        let mut conn = self.conn.clone();
        let _: Result<(), _> = conn.hdel(NODES, &self.node).await;
        let _: Result<(), _> = conn.hdel(TALLIES, &self.node).await;
    }

    /// Tells the other nodes which buckets this node's browsers watch.
    async fn announce(&self, buckets: Vec<String>) {
        if buckets.is_empty() {
            return;
        }
        let request = Request::Watching {
            from: self.node.clone(),
            buckets,
        };
        let body = serde_json::to_string(&request).unwrap_or_default();
        let mut conn = self.conn.clone();
        if let Err(e) = conn.publish::<_, _, ()>(REQUESTS, body).await {
            tracing::warn!(error = %e, "bus: cannot announce watched buckets");
        }
    }

    fn watched_elsewhere(&self, bucket_id: &str) -> bool {
        self.watched_elsewhere
            .lock()
            .get(bucket_id)
            .is_some_and(|expires| *expires > now_ms())
    }

    /// Publishes queued live events for the other nodes' watchers.
    async fn relay_live(self: Arc<Self>, mut queue: mpsc::Receiver<LiveEvent>) {
        while let Some(event) = queue.recv().await {
            let relayed = Relayed {
                from: self.node.clone(),
                event,
            };
            let body = serde_json::to_string(&relayed).unwrap_or_default();
            let mut conn = self.conn.clone();
            if let Err(e) = conn.publish::<_, _, ()>(LIVE, body).await {
                tracing::debug!(error = %e, "bus: live event not relayed");
            }
        }
    }

    /// The other nodes alive now.
    async fn others_alive(&self) -> StoreResult<Vec<String>> {
        let mut conn = self.conn.clone();
        let nodes: HashMap<String, i64> = conn.hgetall(NODES).await.map_err(unavailable)?;
        let now = now_ms();
        Ok(nodes
            .into_iter()
            .filter(|(id, seen)| *id != self.node && now - *seen < NODE_TTL_MS)
            .map(|(id, _)| id)
            .collect())
    }

    /// How many other nodes are alive now.
    async fn other_nodes(&self) -> StoreResult<usize> {
        Ok(self.others_alive().await?.len())
    }

    /// Publishes `request` and collects answers until `done` says so, every other node
    /// answered, or `wait` passed.
    async fn ask(
        &self,
        request: impl FnOnce(u64) -> Request,
        wait: Duration,
        mut done: impl FnMut(&Reply) -> bool,
    ) -> StoreResult<Vec<Reply>> {
        let others = self.other_nodes().await?;
        if others == 0 {
            return Ok(Vec::new());
        }
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waiting.lock().insert(req, tx);
        let body = serde_json::to_string(&request(req)).unwrap_or_default();
        let mut conn = self.conn.clone();
        let published = conn.publish::<_, _, ()>(REQUESTS, body).await;
        let mut replies = Vec::new();
        if published.is_ok() {
            let deadline = tokio::time::Instant::now() + wait;
            while replies.len() < others {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(reply)) => {
                        let finished = done(&reply);
                        replies.push(reply);
                        if finished {
                            break;
                        }
                    }
                    _ => break,
                }
            }
        }
        self.waiting.lock().remove(&req);
        published.map_err(unavailable)?;
        Ok(replies)
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn send_command(&self, command: AgentCommand) -> StoreResult<Delivery> {
        if self.deliver_if_owner(&command).await == Delivery::Sent {
            return Ok(Delivery::Sent);
        }
        let node = self.node.clone();
        let replies = self
            .ask(
                |req| Request::Command {
                    from: node,
                    req,
                    bucket_id: command.bucket_id.clone(),
                    server_name: command.server_name.clone(),
                    frame: command.frame.clone(),
                },
                COMMAND_WAIT,
                |reply| reply.delivered,
            )
            .await?;
        Ok(if replies.iter().any(|r| r.delivered) {
            Delivery::Sent
        } else {
            Delivery::NotConnected
        })
    }

    async fn remote_servers(
        &self,
        bucket_id: &str,
        server_name: Option<&str>,
    ) -> StoreResult<Vec<String>> {
        let node = self.node.clone();
        let (bucket_id, server_name) = (bucket_id.to_string(), server_name.map(str::to_string));
        let replies = self
            .ask(
                |req| Request::Servers {
                    from: node,
                    req,
                    bucket_id,
                    server_name,
                },
                SERVERS_WAIT,
                |_| false,
            )
            .await?;
        Ok(replies.into_iter().flat_map(|r| r.servers).collect())
    }

    async fn evict(&self, bucket_id: &str) {
        self.sink.evict(bucket_id);
        let request = Request::Evict {
            from: self.node.clone(),
            bucket_id: bucket_id.to_string(),
        };
        let mut conn = self.conn.clone();
        let body = serde_json::to_string(&request).unwrap_or_default();
        if let Err(e) = conn.publish::<_, _, ()>(REQUESTS, body).await {
            // The interactors' periodic check closes them within 30 s.
            tracing::warn!(error = %e, "bus: cannot tell the other nodes to close a disabled bucket's agents");
        }
    }

    async fn remote_processes(&self) -> StoreResult<Vec<ServerProcesses>> {
        let node = self.node.clone();
        let replies = self
            .ask(
                |req| Request::Processes { from: node, req },
                SERVERS_WAIT,
                |_| false,
            )
            .await?;
        Ok(replies.into_iter().flat_map(|r| r.processes).collect())
    }

    async fn remote_tally(&self) -> StoreResult<u64> {
        let others = self.others_alive().await?;
        let mut conn = self.conn.clone();
        let tallies: HashMap<String, u64> = conn.hgetall(TALLIES).await.map_err(unavailable)?;
        Ok(others.iter().filter_map(|node| tallies.get(node)).sum())
    }

    async fn claim(&self, bucket_id: &str, server_name: &str) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        conn.set_ex(owner_key(bucket_id, server_name), &self.node, OWNER_TTL_S)
            .await
            .map_err(unavailable)
    }

    fn watched(&self, bucket_id: &str) -> bool {
        self.hub.watched(bucket_id) || self.watched_elsewhere(bucket_id)
    }

    /// Other nodes announce only that they watch a bucket, not what their watchers
    /// want: a watcher elsewhere counts as one that wants whole statuses.
    fn rendering(&self, bucket_id: &str) -> bool {
        self.hub.rendering(bucket_id) || self.watched_elsewhere(bucket_id)
    }

    fn publish_live(&self, event: LiveEvent) {
        if self.watched_elsewhere(&event.bucket_id) {
            let _ = self.live_out.try_send(event.clone());
        }
        self.hub.publish(Arc::new(event));
    }

    async fn watch(&self, bucket_id: &str) {
        self.announce(vec![bucket_id.to_string()]).await;
    }

    async fn count_failure(&self, key: &str, window: Duration) -> StoreResult<u64> {
        let key = failures_key(key);
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let mut conn = self.conn.clone();
        // The window opens with the first failure (NX: later ones do not extend it).
        let (count,): (u64,) = redis::pipe()
            .incr(&key, 1)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(window_ms)
            .arg("NX")
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(count)
    }

    async fn failures(&self, key: &str) -> StoreResult<Option<(u64, Duration)>> {
        let key = failures_key(key);
        let mut conn = self.conn.clone();
        let (count, left_ms): (Option<u64>, i64) = redis::pipe()
            .get(&key)
            .pttl(&key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(count
            .filter(|_| left_ms > 0)
            .map(|count| (count, Duration::from_millis(left_ms.unsigned_abs()))))
    }

    async fn forget_failures(&self, key: &str) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(failures_key(key))
            .await
            .map_err(unavailable)
    }
}
