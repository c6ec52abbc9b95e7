//! Sessions: one per linked server, keyed by (bucket, machine name). A session outlives
//! the agent's sockets (it may hold several at once after a reconnect storm) and holds
//! the live status that the API reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use std::borrow::Cow;

use json_patch::{
    AddOperation, CopyOperation, MoveOperation, PatchError, PatchOperation, RemoveOperation,
    ReplaceOperation, TestOperation,
};
use jsonptr::{Pointer, PointerBuf};
use serde::Deserialize;

use crate::MetricSampler;
use crate::budget::{
    self, MAX_METRICS, MAX_PATCH_OPS, MAX_PATCH_WORK, MAX_PROCESSES, MAX_STATUS_DEPTH, Over, Size,
    Work, measure, own_size,
};
use crate::metrics::Scope;
use crate::process::Effect;
use crate::tree::Node;
use km_stores::{AgentCommand, CommandSink, Delivery, MetricPoint, ServerProcesses, ServerRecord};

/// A queue of text frames to one socket.
pub type SocketTx = mpsc::Sender<String>;

struct SocketLink {
    id: u64,
    tx: SocketTx,
    /// When this socket last delivered data (epoch ms); commands go to the freshest.
    last_data: i64,
}

/// What the API shows of a server.
#[derive(Default)]
pub struct Live {
    /// The agent's latest full status payload with every patch applied.
    status: Option<Node>,
    /// The status's size, kept within its budgets (see [`crate::budget`]).
    size: Size,
    last_update: i64,
    /// Its processes that count against the licence, from its latest status.
    counted: Option<u32>,
    sampler: MetricSampler,
    /// What changed since it was last saved, and when that was (epoch ms).
    unsaved: Unsaved,
    saved_at: i64,
}

/// What changed in a server since it was last saved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unsaved {
    #[default]
    Nothing,
    /// Only metric values and the host's figures: saved every [`VALUES_SAVED_EVERY`].
    Values,
    /// Anything else (processes, their state, the connection): saved at the next round.
    More,
}

/// How stale the saved metric values of a connected server may get (what the API shows
/// of it once it is offline or after a restart comes from there).
pub const VALUES_SAVED_EVERY: i64 = 5 * 60_000;

/// Where a patch sets the host's 1-minute load average (its series: see [`crate::metrics`]).
const HOST_LOAD_PATH: &str = "/data/server/loadavg/0";

impl Live {
    fn updated(&mut self, now: i64, unsaved: Unsaved) {
        self.last_update = now;
        self.unsaved = self.unsaved.max(unsaved);
    }

    /// Whether a save round at `now` writes it (with `finish`, whatever changed).
    fn due(&self, now: i64, finish: bool) -> bool {
        match self.unsaved {
            Unsaved::Nothing => false,
            Unsaved::Values => finish || now.saturating_sub(self.saved_at) >= VALUES_SAVED_EVERY,
            Unsaved::More => true,
        }
    }

    #[cfg(test)]
    fn status_value(&self) -> Option<Value> {
        self.status.as_ref().map(Node::to_value)
    }
}

/// The processes that the connected servers of this node count against the licence, kept
/// as servers change (a reconnect storm would otherwise count every session per server).
#[derive(Debug, Default)]
pub struct Tally(AtomicU64);

impl Tally {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

pub struct Session {
    pub bucket_id: Arc<str>,
    pub server_name: Arc<str>,
    pub live: Mutex<Live>,
    sockets: Mutex<Vec<SocketLink>>,
    tally: Arc<Tally>,
    /// What this server adds to `tally` now (nothing while offline).
    in_tally: Mutex<u32>,
    /// When a refusal of its frames was last logged (epoch ms).
    refusal_logged: AtomicI64,
    /// Its bucket was disabled: its sockets close (woken by `eviction`, or at their next
    /// ping if they were busy).
    evicted: std::sync::atomic::AtomicBool,
    pub eviction: tokio::sync::Notify,
}

impl Session {
    fn new(bucket_id: &str, server_name: &str, live: Live, tally: Arc<Tally>) -> Self {
        Session {
            bucket_id: Arc::from(bucket_id),
            server_name: Arc::from(server_name),
            live: Mutex::new(live),
            sockets: Mutex::new(Vec::new()),
            tally,
            in_tally: Mutex::new(0),
            refusal_logged: AtomicI64::new(i64::MIN),
            evicted: std::sync::atomic::AtomicBool::new(false),
            eviction: tokio::sync::Notify::new(),
        }
    }

    /// A server as last persisted, not connected.
    pub fn offline(record: &ServerRecord, tally: Arc<Tally>) -> Session {
        // Saved by an older km, a status over today's budgets is not shown.
        let status = serde_json::from_str::<Value>(&record.status_json)
            .ok()
            .and_then(|status| Some((budget::check_status(&status).ok()?, status)));
        let status = status.map(|(size, status)| (size, Node::status(status)));
        let live = Live {
            size: status.as_ref().map(|(size, _)| *size).unwrap_or_default(),
            counted: status.as_ref().map(|(_, status)| counted_processes(status)),
            status: status.map(|(_, status)| status),
            last_update: record.last_update,
            ..Live::default()
        };
        Session::new(&record.bucket_id, &record.server_name, live, tally)
    }

    /// Brings this server's share of the licence tally up to date (after its status or
    /// its sockets changed).
    fn retally(&self) {
        let mut in_tally = self.in_tally.lock();
        let now = if self.online() {
            self.live.lock().counted.unwrap_or(0)
        } else {
            0
        };
        let total = &self.tally.0;
        total.fetch_add(u64::from(now), Ordering::AcqRel);
        total.fetch_sub(u64::from(*in_tally), Ordering::AcqRel);
        *in_tally = now;
    }

    /// What this server adds to the tally now.
    fn tallied(&self) -> u32 {
        *self.in_tally.lock()
    }

    /// Whether a refusal of its frames may be logged now (one every 10 s per server).
    pub fn may_log_refusal(&self, now: i64) -> bool {
        let last = self.refusal_logged.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 10_000
            && self
                .refusal_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Whether its bucket was disabled since its socket connected.
    pub fn evicted(&self) -> bool {
        self.evicted.load(Ordering::Relaxed)
    }

    pub fn online(&self) -> bool {
        !self.sockets.lock().is_empty()
    }

    pub fn mark_data(&self, socket_id: u64, now: i64) {
        if let Some(link) = self.sockets.lock().iter_mut().find(|l| l.id == socket_id) {
            link.last_data = now;
        }
    }

    /// Sends `frame` on the socket that delivered data last.
    pub fn send(&self, frame: String) -> Delivery {
        let sockets = self.sockets.lock();
        let freshest = sockets
            .iter()
            .rev()
            .max_by_key(|l| l.last_data)
            .map(|l| l.tx.clone());
        drop(sockets);
        match freshest.map(|tx| tx.try_send(frame)) {
            Some(Ok(())) => Delivery::Sent,
            _ => Delivery::NotConnected,
        }
    }

    /// Replaces the status with a full one and takes all its metric values; refused
    /// (nothing changes) when it is over a budget.
    pub fn apply_status(
        &self,
        status: Value,
        now: i64,
        points: &mut Vec<MetricPoint>,
    ) -> Result<(), Over> {
        let size = budget::check_status(&status)?;
        let mut status = Node::status(status);
        let mut live = self.live.lock();
        live.sampler.load(&mut status, now, points, self.scope());
        live.counted = Some(counted_processes(&status));
        live.status = Some(status);
        live.size = size;
        live.updated(now, Unsaved::More);
        drop(live);
        self.retally();
        Ok(())
    }

    /// Applies an RFC 6902 patch to the status; the metric values it changes go to the
    /// sampler. On failure the operations before the failing one stay applied (they only
    /// carry newer values) and the caller asks the agent for a full status.
    pub fn apply_patch(
        &self,
        patch: Vec<PatchOp>,
        now: i64,
        points: &mut Vec<MetricPoint>,
    ) -> Result<(), PatchFailure> {
        if patch.len() > MAX_PATCH_OPS {
            return Err(Over::Ops(patch.len()).into());
        }
        let mut live = self.live.lock();
        let Live {
            status,
            size,
            sampler,
            counted,
            ..
        } = &mut *live;
        let status = status.as_mut().ok_or(PatchFailure::NoStatus)?;
        let mut target = PatchTarget {
            status,
            tree: None,
            size,
            sampler,
            now,
            points,
            scope: self.scope(),
            work: Work::new(MAX_PATCH_WORK),
            reload: false,
            more: false,
        };
        let applied = patch
            .into_iter()
            .enumerate()
            .try_for_each(|(index, op)| target.apply(index, op));
        let more = target.more;
        let reload = target.finish();
        if reload {
            *counted = Some(counted_processes(status));
        }
        if applied.is_ok() {
            let unsaved = if more { Unsaved::More } else { Unsaved::Values };
            live.updated(now, unsaved);
        }
        drop(live);
        if reload {
            self.retally();
        }
        applied
    }

    /// The size of its status as its budgets count it.
    pub fn status_size(&self) -> Size {
        self.live.lock().size
    }

    /// Its record was not written after all: the next round tries again.
    pub fn unsave(&self) {
        self.live.lock().unsaved = Unsaved::More;
    }

    /// Scope of metric points and events from this server.
    pub fn scope(&self) -> Scope<'_> {
        (&self.bucket_id, &self.server_name)
    }

    /// The latest status with every patch applied, as JSON text.
    pub fn status_text(&self) -> Option<String> {
        serde_json::to_string(self.live.lock().status.as_ref()?).ok()
    }

    /// The record persisted for this server, if it ever sent a status; it counts as saved
    /// at `now` from here (see [`Session::unsave`] if the write fails).
    pub fn record(&self, now: i64) -> Option<ServerRecord> {
        let mut live = self.live.lock();
        live.unsaved = Unsaved::Nothing;
        live.saved_at = now;
        let status_json = serde_json::to_string(live.status.as_ref()?).ok()?;
        Some(ServerRecord {
            bucket_id: self.bucket_id.to_string(),
            server_name: self.server_name.to_string(),
            last_update: live.last_update,
            status_json,
        })
    }

    /// The server without its processes' details: `{server_name, online, last_update,
    /// internal_ip, processes, server: {hostname, pm2_version, node_version, …}}`.
    pub fn meta(&self) -> Value {
        let online = self.online();
        let live = self.live.lock();
        let status = live.status.as_ref();
        let data = status.and_then(|s| s.get("data"));
        serde_json::json!({
            "server_name": self.server_name,
            "online": online,
            "last_update": live.last_update,
            "internal_ip": status.and_then(internal_ip),
            "processes": status.and_then(Node::processes).map_or(0, <[Node]>::len),
            "server": data.and_then(|d| d.get("server")).map_or(Value::Null, Node::to_value),
        })
    }

    /// Its processes that count against the licence; `None` before its first status.
    pub fn counted_processes(&self) -> Option<u32> {
        self.live.lock().counted
    }

    /// Writes the server as the API shows it: `{server_name, internal_ip, online,
    /// last_update, data}`.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct View<'a> {
            server_name: &'a str,
            internal_ip: Option<&'a str>,
            online: bool,
            last_update: i64,
            data: &'a Node,
        }
        let online = self.online();
        let live = self.live.lock();
        let empty = Node::default();
        let data = live
            .status
            .as_ref()
            .and_then(|s| s.get("data"))
            .unwrap_or(&empty);
        serde_json::to_string(&View {
            server_name: &self.server_name,
            internal_ip: live.status.as_ref().and_then(internal_ip),
            online,
            last_update: live.last_update,
            data,
        })
        .unwrap_or_default()
    }
}

fn internal_ip(status: &Node) -> Option<&str> {
    status.get("internal_ip").and_then(Node::as_str)
}

/// Modules that are free: not counted.
pub const FREE_MODULES: [&str; 2] = ["pm2-logrotate", "pm2-auto-pull"];
/// The processes of an agent's status that count.
pub fn counted_processes(status: &Node) -> u32 {
    let processes = status.processes().unwrap_or_default();
    let counted = processes
        .iter()
        .filter(|p| {
            !p.get("name")
                .and_then(Node::as_str)
                .is_some_and(|name| FREE_MODULES.contains(&name))
        })
        .count();
    u32::try_from(counted).unwrap_or(u32::MAX)
}

/// Every session of this node, by bucket then server name.
#[derive(Default)]
pub struct Sessions {
    buckets: RwLock<HashMap<String, BTreeMap<String, Arc<Session>>>>,
    next_socket: AtomicU64,
    tally: Arc<Tally>,
}

impl Sessions {
    /// Loads the servers persisted by a previous run, offline until their agents return.
    pub fn restore(&self, records: Vec<ServerRecord>) {
        let mut buckets = self.buckets.write();
        for r in records {
            let session = Arc::new(Session::offline(&r, self.tally.clone()));
            buckets
                .entry(r.bucket_id)
                .or_default()
                .insert(r.server_name, session);
        }
    }

    /// The session of (bucket, server), created if new, with a new socket attached.
    pub fn attach(
        &self,
        bucket_id: &str,
        server_name: &str,
        tx: SocketTx,
        now: i64,
    ) -> (Arc<Session>, u64) {
        let id = self.next_socket.fetch_add(1, Ordering::Relaxed);
        let session = self.get(bucket_id, server_name).unwrap_or_else(|| {
            let mut buckets = self.buckets.write();
            buckets
                .entry(bucket_id.to_string())
                .or_default()
                .entry(server_name.to_string())
                .or_insert_with(|| {
                    Arc::new(Session::new(
                        bucket_id,
                        server_name,
                        Live::default(),
                        self.tally.clone(),
                    ))
                })
                .clone()
        });
        session.evicted.store(false, Ordering::Relaxed);
        session.sockets.lock().push(SocketLink {
            id,
            tx,
            last_data: now,
        });
        session.retally();
        (session, id)
    }

    /// Removes a closed socket; with the last one gone the server is offline and its
    /// metric history up to now is emitted into `points`.
    pub fn detach(
        &self,
        session: &Session,
        socket_id: u64,
        now: i64,
        points: &mut Vec<MetricPoint>,
    ) {
        let mut sockets = session.sockets.lock();
        sockets.retain(|l| l.id != socket_id);
        let offline = sockets.is_empty();
        drop(sockets);
        let mut live = session.live.lock();
        live.unsaved = Unsaved::More;
        if offline {
            live.sampler.finish(now, points, session.scope());
        }
        drop(live);
        session.retally();
    }

    /// The processes the connected servers of this node count against the licence,
    /// except `except`'s.
    pub fn processes_in_use(&self, except: Option<(&str, &str)>) -> u64 {
        let mine = except
            .and_then(|(bucket, server)| self.get(bucket, server))
            .map_or(0, |s| s.tallied());
        self.tally.get().saturating_sub(u64::from(mine))
    }

    /// Forgets an offline server; false if it is unknown or connected.
    pub fn remove(&self, bucket_id: &str, server_name: &str) -> bool {
        let mut buckets = self.buckets.write();
        let Some(servers) = buckets.get_mut(bucket_id) else {
            return false;
        };
        if servers.get(server_name).is_none_or(|s| s.online()) {
            return false;
        }
        servers.remove(server_name);
        true
    }

    /// Forgets every server of a deleted bucket.
    /// Closes the connected agents of a disabled bucket (at their next ping); true if it
    /// had any here.
    pub fn evict_bucket(&self, bucket_id: &str) -> bool {
        let online: Vec<_> = self
            .of_bucket(bucket_id, None)
            .into_iter()
            .filter(|s| s.online())
            .collect();
        for session in &online {
            session.evicted.store(true, Ordering::Relaxed);
            session.eviction.notify_waiters();
        }
        !online.is_empty()
    }

    /// The buckets with an agent connected here.
    pub fn online_buckets(&self) -> Vec<String> {
        self.buckets
            .read()
            .iter()
            .filter(|(_, servers)| servers.values().any(|s| s.online()))
            .map(|(bucket, _)| bucket.clone())
            .collect()
    }

    pub fn remove_bucket(&self, bucket_id: &str) {
        self.buckets.write().remove(bucket_id);
    }

    pub fn get(&self, bucket_id: &str, server_name: &str) -> Option<Arc<Session>> {
        self.buckets
            .read()
            .get(bucket_id)?
            .get(server_name)
            .cloned()
    }

    /// The servers of a bucket, by name (only `server_name` if given).
    pub fn of_bucket(&self, bucket_id: &str, server_name: Option<&str>) -> Vec<Arc<Session>> {
        let buckets = self.buckets.read();
        let Some(servers) = buckets.get(bucket_id) else {
            return Vec::new();
        };
        match server_name {
            Some(name) => servers.get(name).cloned().into_iter().collect(),
            None => servers.values().cloned().collect(),
        }
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.buckets
            .read()
            .values()
            .flat_map(|servers| servers.values().cloned())
            .collect()
    }

    /// Number of sockets open now.
    pub fn sockets_open(&self) -> usize {
        self.all().iter().map(|s| s.sockets.lock().len()).sum()
    }

    /// The servers a save round at `now` writes (with `finish`, at shutdown, every one
    /// that changed).
    pub fn unsaved(&self, now: i64, finish: bool) -> Vec<Arc<Session>> {
        self.all()
            .into_iter()
            .filter(|s| s.live.lock().due(now, finish))
            .collect()
    }

    /// Metric points of minutes that ended by `now`; with `finish`, of everything up to
    /// `now` (at shutdown).
    pub fn drain_metrics(&self, now: i64, finish: bool) -> Vec<MetricPoint> {
        let mut out = Vec::new();
        for session in self.all() {
            let sampler = &mut session.live.lock().sampler;
            if finish {
                sampler.finish(now, &mut out, session.scope());
            } else {
                sampler.tick(now, &mut out, session.scope());
            }
        }
        out
    }
}

impl CommandSink for Sessions {
    fn deliver(&self, command: &AgentCommand) -> Delivery {
        match self.get(&command.bucket_id, &command.server_name) {
            Some(session) => session.send(command.frame.clone()),
            None => Delivery::NotConnected,
        }
    }

    fn online_servers(&self, bucket_id: &str, server_name: Option<&str>) -> Vec<String> {
        self.of_bucket(bucket_id, server_name)
            .iter()
            .filter(|s| s.online())
            .map(|s| s.to_json())
            .collect()
    }

    fn evict(&self, bucket_id: &str) -> bool {
        self.evict_bucket(bucket_id)
    }

    fn tally(&self) -> u64 {
        self.processes_in_use(None)
    }

    fn processes(&self) -> Vec<ServerProcesses> {
        self.all()
            .iter()
            .filter(|s| s.online())
            .filter_map(|s| {
                Some(ServerProcesses {
                    bucket_id: s.bucket_id.to_string(),
                    server_name: s.server_name.to_string(),
                    processes: s.counted_processes()?,
                })
            })
            .collect()
    }
}

/// One RFC 6902 operation as the agent sends it, borrowed from the frame.
#[derive(Deserialize)]
pub struct PatchOp<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    path: Cow<'a, str>,
    #[serde(borrow, default)]
    from: Option<Cow<'a, str>>,
    #[serde(default)]
    value: Option<Value>,
}

impl PatchOp<'_> {
    /// The operation as json-patch models it.
    fn into_operation(self, index: usize) -> Result<PatchOperation, PatchFailure> {
        let pointer = |p: &str| {
            PointerBuf::parse(p).map_err(|e| PatchFailure::Invalid {
                index,
                reason: e.to_string(),
            })
        };
        let path = pointer(&self.path)?;
        let value = || {
            self.value.clone().ok_or(PatchFailure::Invalid {
                index,
                reason: "no value".into(),
            })
        };
        let from = || pointer(self.from.as_deref().unwrap_or_default());
        Ok(match self.op.as_ref() {
            "add" => PatchOperation::Add(AddOperation {
                path,
                value: value()?,
            }),
            "remove" => PatchOperation::Remove(RemoveOperation { path }),
            "replace" => PatchOperation::Replace(ReplaceOperation {
                path,
                value: value()?,
            }),
            "move" => PatchOperation::Move(MoveOperation {
                from: from()?,
                path,
            }),
            "copy" => PatchOperation::Copy(CopyOperation {
                from: from()?,
                path,
            }),
            "test" => PatchOperation::Test(TestOperation {
                path,
                value: value()?,
            }),
            other => {
                return Err(PatchFailure::Invalid {
                    index,
                    reason: format!("unknown op {other:?}"),
                });
            }
        })
    }
}

/// Everything one patch changes: the status, its size, the metric history.
struct PatchTarget<'a> {
    status: &'a mut Node,
    /// The status written out for json-patch, from the first operation that is not a
    /// scalar replacing a scalar until the end of the patch.
    tree: Option<Value>,
    size: &'a mut Size,
    sampler: &'a mut MetricSampler,
    now: i64,
    points: &'a mut Vec<MetricPoint>,
    scope: Scope<'a>,
    work: Work,
    /// Reload every metric from the patched status at the end.
    reload: bool,
    /// Something other than metric values and the host's figures changed.
    more: bool,
}

impl PatchTarget<'_> {
    /// Applies one operation within the status's budgets. A scalar replacing a scalar
    /// (nearly all an agent sends) is written into the tree where it lands; anything
    /// else goes through json-patch on the written-out status, measured first.
    fn apply(&mut self, index: usize, op: PatchOp) -> Result<(), PatchFailure> {
        self.work.spend(1)?;
        let scalar = op
            .value
            .as_ref()
            .is_some_and(|v| !v.is_object() && !v.is_array());
        if self.tree.is_none()
            && op.op == "replace"
            && scalar
            && let Some((at, effect)) = self.status.land(&op.path)
        {
            let value = op.value.unwrap_or_default();
            *self.size = resized(*self.size, at.own_size(), own_size(&value))?;
            let value = Node::from(value);
            match effect {
                Effect::Metric(Some(id)) => {
                    self.sampler
                        .set(id, &value, self.now, self.points, self.scope);
                }
                Effect::Host if op.path == HOST_LOAD_PATH => {
                    if let Some(load) = value.as_f64() {
                        self.sampler
                            .set_load(load, self.now, self.points, self.scope);
                    }
                }
                Effect::Metric(None) | Effect::Host => {}
                Effect::Structural => (self.reload, self.more) = (true, true),
                Effect::Other => self.more = true,
            }
            *at = value;
            return Ok(());
        }
        let operation = op.into_operation(index)?;
        let tree = self.tree.get_or_insert_with(|| self.status.to_value());
        let size =
            budget(tree, *self.size, &mut self.work, &operation).map_err(PatchFailure::Over)?;
        // Values may have moved anywhere: metrics are reloaded from the result.
        (self.reload, self.more) = (true, true);
        if let Err(e) = json_patch::patch_unsafe(tree, std::slice::from_ref(&operation)) {
            // A move may have taken its value away before it failed: measure afresh (the
            // patch ends here, so once per patch at most).
            *self.size = budget::check_status(tree).unwrap_or(size);
            return Err(e.into());
        }
        *self.size = size;
        Ok(())
    }

    /// Writes the patched status back; whether metrics were reloaded (processes may have
    /// changed).
    fn finish(self) -> bool {
        if let Some(tree) = self.tree {
            *self.status = Node::status(tree);
        }
        if self.reload {
            self.sampler
                .load(self.status, self.now, self.points, self.scope);
        }
        self.reload
    }
}

/// The status's size once `operation` applies to `status` of `size`, if that is within
/// every budget.
fn budget(
    status: &Value,
    size: Size,
    work: &mut Work,
    operation: &PatchOperation,
) -> Result<Size, Over> {
    // What lands at `path`, measured against the depth left below it.
    let mut placed = |path: &Pointer, value: &Value| -> Result<Size, Over> {
        let depth = path.count();
        let room = MAX_STATUS_DEPTH
            .checked_sub(depth)
            .ok_or(Over::Depth(depth))?;
        let shape = measure(value, room, work).map_err(|over| match over {
            Over::Depth(d) => Over::Depth(depth + d),
            other => other,
        })?;
        check_shape(status, path, value, operation)?;
        Ok(shape.size)
    };
    // What lands, what it replaces, and the member names it adds and takes away.
    let (added, replaced, new_key, gone_key) = match operation {
        PatchOperation::Add(AddOperation { path, value }) => {
            let at = Spot::of(status, path);
            (placed(path, value)?, at.added_over(), at.new_key(), 0)
        }
        PatchOperation::Replace(ReplaceOperation { path, value }) => {
            (placed(path, value)?, Spot::of(status, path).target, 0, 0)
        }
        PatchOperation::Remove(RemoveOperation { path }) => {
            let at = Spot::of(status, path);
            (Size::default(), at.target, 0, at.member_key())
        }
        PatchOperation::Copy(CopyOperation { from, path }) => {
            refuse_into_itself(from, path)?;
            let Some(source) = Spot::of(status, from).target else {
                // json-patch refuses it.
                return Ok(size);
            };
            let at = Spot::of(status, path);
            (placed(path, source)?, at.added_over(), at.new_key(), 0)
        }
        PatchOperation::Move(MoveOperation { from, path }) => {
            refuse_into_itself(from, path)?;
            let source_spot = Spot::of(status, from);
            let Some(source) = source_spot.target else {
                return Ok(size);
            };
            let moved = placed(path, source)?;
            let at = Spot::of(status, path);
            if from.starts_with(path) && at.added_over().is_some() {
                // Moved over one of its ancestors: it stays while the rest goes. (Onto an
                // array's element it is inserted before it instead, as any move.)
                (moved, at.target, 0, 0)
            } else {
                let gone = source_spot.member_key();
                (Size::default(), at.added_over(), at.new_key(), gone)
            }
        }
        PatchOperation::Test(_) => return Ok(size),
    };
    let replaced = match replaced {
        Some(value) => measure(value, usize::MAX, work)?.size,
        None => Size::default(),
    };
    let keys = |bytes| Size { nodes: 0, bytes };
    let size = size
        .minus(replaced)
        .minus(keys(gone_key))
        .plus(added)
        .plus(keys(new_key));
    size.check()?;
    Ok(size)
}

/// Where a pointer lands in the status, resolved once (jsonptr: no allocation per
/// token): the parent, the value there now, and the member name's length.
struct Spot<'v> {
    root: Option<&'v Value>,
    parent: Option<&'v Value>,
    target: Option<&'v Value>,
    key: usize,
}

impl<'v> Spot<'v> {
    fn of(status: &'v Value, path: &Pointer) -> Spot<'v> {
        let Some((parent, last)) = path.split_back() else {
            return Spot {
                root: Some(status),
                parent: None,
                target: Some(status),
                key: 0,
            };
        };
        let parent = parent.resolve(status).ok();
        let (target, key) = match parent {
            Some(Value::Object(map)) => {
                let key = last.decoded();
                (map.get(key.as_ref()), key.len())
            }
            Some(Value::Array(items)) => match last.to_index() {
                Ok(jsonptr::index::Index::Num(i)) => (items.get(i), 0),
                _ => (None, 0),
            },
            _ => (None, 0),
        };
        Spot {
            root: None,
            parent,
            target,
            key,
        }
    }

    /// The value an `add` here replaces: an object's member or the whole status, not an
    /// array's element (an add inserts there).
    fn added_over(&self) -> Option<&'v Value> {
        match self.parent {
            Some(Value::Array(_)) => None,
            _ => self.root.or(self.target),
        }
    }

    /// The length of the member name here if it is an object's member.
    fn member_key(&self) -> usize {
        match self.parent {
            Some(Value::Object(_)) => self.key,
            _ => 0,
        }
    }

    /// The length of the member name an `add` here creates (0 if it exists already).
    fn new_key(&self) -> usize {
        match self.target {
            Some(_) => 0,
            None => self.member_key(),
        }
    }
}

/// The size after one text of `old` bytes is replaced by one of `new`.
fn resized(size: Size, old: usize, new: usize) -> Result<Size, PatchFailure> {
    let size = size
        .minus(Size {
            nodes: 0,
            bytes: old,
        })
        .plus(Size {
            nodes: 0,
            bytes: new,
        });
    size.check().map_err(PatchFailure::Over)?;
    Ok(size)
}

/// A copy or move into its own source (`copy` of the root into a member doubles the
/// status with each operation).
fn refuse_into_itself(from: &Pointer, path: &Pointer) -> Result<(), Over> {
    if path.starts_with(from) {
        return Err(Over::IntoItself);
    }
    Ok(())
}

/// The processes and metrics budgets after `value` lands at `path` (`operation` says
/// whether it adds or replaces).
fn check_shape(
    status: &Value,
    path: &Pointer,
    value: &Value,
    operation: &PatchOperation,
) -> Result<(), Over> {
    let processes = Pointer::from_static("/data/process");
    if let Some(rest) = processes.strip_prefix(path) {
        // The value holds the whole process list.
        return match value.pointer(rest.as_str()).and_then(Value::as_array) {
            Some(list) => budget::check_processes(list),
            None => Ok(()),
        };
    }
    let Some(inside) = path.strip_prefix(processes) else {
        return Ok(());
    };
    let inserts = !matches!(operation, PatchOperation::Replace(_));
    let tokens: Vec<String> = inside.tokens().map(|t| t.decoded().into_owned()).collect();
    let current = |p: &str| status.pointer(p);
    match tokens.as_slice() {
        [_] => {
            let count = current("/data/process")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            if inserts && count >= MAX_PROCESSES {
                return Err(Over::Processes(count + 1));
            }
            budget::check_process(value)
        }
        [_, monitor] if monitor == "axm_monitor" => match value.as_object() {
            Some(metrics) if metrics.len() > MAX_METRICS => Err(Over::Metrics(metrics.len())),
            _ => Ok(()),
        },
        [index, monitor, name] if monitor == "axm_monitor" => {
            let metrics =
                current(&format!("/data/process/{index}/axm_monitor")).and_then(Value::as_object);
            match metrics {
                Some(m) if inserts && !m.contains_key(name.as_str()) && m.len() >= MAX_METRICS => {
                    Err(Over::Metrics(m.len() + 1))
                }
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// Why a status patch did not apply (the agent is then asked for a full status).
#[derive(Debug, thiserror::Error)]
pub enum PatchFailure {
    #[error("no full status received yet")]
    NoStatus,
    #[error("operation {index}: {reason}")]
    Invalid { index: usize, reason: String },
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error("refused: {0}")]
    Over(#[from] Over),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{MAX_STATUS_BYTES, MAX_STATUS_NODES};
    use std::collections::BTreeMap;

    /// The captured full status and the patches that follow it (up to the next status).
    fn sequence() -> (Value, Vec<String>) {
        let mut frames = include_str!("../../tests/fixtures/agent-status-sequence.jsonl")
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["frame"].take());
        let status = frames.next().unwrap()["payload"].take();
        let patches = frames
            .take_while(|f| f["channel"] == "status:patch")
            .map(|mut f| f["payload"].take().to_string())
            .collect();
        (status, patches)
    }

    fn patch(text: &str) -> Vec<PatchOp<'_>> {
        serde_json::from_str(text).unwrap()
    }

    fn last_values(points: &[MetricPoint]) -> BTreeMap<(i64, Arc<str>), f64> {
        points
            .iter()
            .map(|p| ((p.pm_id, p.name.clone()), p.last))
            .collect()
    }

    #[test]
    fn free_modules_are_not_counted() {
        let status = serde_json::json!({"data": {"process": [
            {"name": "api"}, {"name": "api"}, {"name": "pm2-logrotate"},
            {"name": "pm2-auto-pull"}, {"name": "worker"}
        ]}});
        assert_eq!(counted_processes(&Node::from(status)), 3);
        assert_eq!(counted_processes(&Node::from(serde_json::json!({}))), 0);
    }

    #[test]
    fn captured_patches_apply_in_order_and_metrics_follow_them() {
        let (status, patches) = sequence();
        let session = Session::new("b", "box", Live::default(), Arc::default());
        let mut points = Vec::new();
        session
            .apply_status(status.clone(), 1_000, &mut points)
            .unwrap();
        for (i, p) in patches.iter().enumerate() {
            session
                .apply_patch(patch(p), 1_000 + i as i64, &mut points)
                .unwrap_or_else(|e| panic!("patch {i}: {e}"));
        }
        // The same patches applied by json-patch alone give the same document.
        let mut expected = status;
        for p in &patches {
            let ops: json_patch::Patch = serde_json::from_str(p).unwrap();
            json_patch::patch(&mut expected, &ops).unwrap();
        }
        assert_eq!(session.live.lock().status_value().as_ref(), Some(&expected));
        // Metric values followed the patches: same as loading the final document afresh.
        let mut followed = Vec::new();
        session
            .live
            .lock()
            .sampler
            .finish(60_000, &mut followed, session.scope());
        let mut fresh = MetricSampler::default();
        let mut loaded = Vec::new();
        fresh.load(
            &mut Node::status(expected.clone()),
            1_000,
            &mut loaded,
            session.scope(),
        );
        fresh.finish(60_000, &mut loaded, session.scope());
        assert!(last_values(&followed).len() > 20);
        assert_eq!(last_values(&followed), last_values(&loaded));
        let load = (
            crate::metrics::HOST_PM_ID,
            Arc::from(crate::metrics::HOST_LOAD),
        );
        let expected_load = expected["data"]["server"]["loadavg"][0].as_f64();
        assert_eq!(
            last_values(&followed).get(&load).copied(),
            expected_load,
            "the host's load followed its patches"
        );
    }

    #[test]
    fn a_patch_that_does_not_apply_is_refused() {
        let (status, _) = sequence();
        let session = Session::new("b", "box", Live::default(), Arc::default());
        let mut points = Vec::new();
        let bad = r#"[{"op":"replace","path":"/data/process/99/cpu","value":1}]"#;
        assert!(matches!(
            session.apply_patch(patch(bad), 0, &mut points),
            Err(PatchFailure::NoStatus)
        ));
        session
            .apply_status(status.clone(), 0, &mut points)
            .unwrap();
        assert!(session.apply_patch(patch(bad), 1, &mut points).is_err());
        let unknown = r#"[{"op":"frobnicate","path":"/data","value":1}]"#;
        assert!(session.apply_patch(patch(unknown), 1, &mut points).is_err());
        assert_eq!(session.live.lock().status_value().as_ref(), Some(&status));
    }

    #[test]
    fn structural_patches_reload_metrics() {
        let (status, _) = sequence();
        let session = Session::new("b", "box", Live::default(), Arc::default());
        let mut points = Vec::new();
        session.apply_status(status, 0, &mut points).unwrap();
        let remove = r#"[{"op":"remove","path":"/data/process/0"}]"#;
        session
            .apply_patch(patch(remove), 30_000, &mut points)
            .unwrap();
        assert!(
            !points.is_empty(),
            "the removed process's metrics are emitted"
        );
        let then = session
            .live
            .lock()
            .status_value()
            .unwrap()
            .pointer("/data/process/0/pm_id")
            .cloned();
        let cpu = r#"[{"op":"replace","path":"/data/process/0/cpu","value":77}]"#;
        session
            .apply_patch(patch(cpu), 40_000, &mut points)
            .unwrap();
        let mut out = Vec::new();
        session
            .live
            .lock()
            .sampler
            .finish(50_000, &mut out, session.scope());
        let moved = out
            .iter()
            .find(|p| &*p.name == "cpu" && Some(Value::from(p.pm_id)) == then)
            .unwrap();
        assert_eq!(moved.last, 77.0, "index 0 now means the next process");
    }

    fn linked() -> (Session, Value) {
        let (status, _) = sequence();
        let session = Session::new("b", "box", Live::default(), Arc::default());
        session
            .apply_status(status.clone(), 0, &mut Vec::new())
            .unwrap();
        (session, status)
    }

    fn over(result: Result<(), PatchFailure>) -> Over {
        match result {
            Err(PatchFailure::Over(over)) => over,
            other => panic!("not refused over a budget: {other:?}"),
        }
    }

    /// The size kept along the way is the size of the status as it stands.
    fn size_is_true(session: &Session) {
        let status: Value = serde_json::from_str(&session.status_text().unwrap()).unwrap();
        assert_eq!(
            session.status_size(),
            budget::check_status(&status).unwrap()
        );
    }

    #[test]
    fn a_copy_into_its_own_source_is_refused() {
        let (session, status) = linked();
        let doubling: Vec<Value> = (0..20)
            .map(|i| serde_json::json!({"op": "copy", "from": "", "path": format!("/x{i}")}))
            .collect();
        let text = Value::Array(doubling).to_string();
        assert_eq!(
            over(session.apply_patch(patch(&text), 1, &mut Vec::new())),
            Over::IntoItself
        );
        assert_eq!(session.live.lock().status_value().as_ref(), Some(&status));
        let onto_itself = r#"[{"op":"move","from":"/data","path":"/data"}]"#;
        assert_eq!(
            over(session.apply_patch(patch(onto_itself), 1, &mut Vec::new())),
            Over::IntoItself
        );
    }

    #[test]
    fn moves_onto_an_ancestor_are_counted() {
        for (from, path) in [
            ("/data/process/0/axm_monitor", "/data/process/0"),
            ("/data/process/0/axm_monitor", "/data"),
            ("/data/process", ""),
        ] {
            let (session, _) = linked();
            let op = serde_json::json!([{"op": "move", "from": from, "path": path}]);
            session
                .apply_patch(patch(&op.to_string()), 1, &mut Vec::new())
                .unwrap_or_else(|e| panic!("{from} → {path:?}: {e}"));
            size_is_true(&session);
        }
    }

    #[test]
    fn copies_that_grow_the_status_stop_at_its_budget() {
        let (session, _) = linked();
        let mut ops = vec![
            serde_json::json!({"op": "copy", "from": "/data", "path": "/a"}),
            serde_json::json!({"op": "copy", "from": "/data", "path": "/b"}),
        ];
        for i in 0..40 {
            let (from, to) = if i % 2 == 0 {
                ("/a", "/b")
            } else {
                ("/b", "/a")
            };
            ops.push(serde_json::json!({"op": "copy", "from": from, "path": format!("{to}/n{i}")}));
        }
        let text = Value::Array(ops).to_string();
        let refused = over(session.apply_patch(patch(&text), 1, &mut Vec::new()));
        assert!(
            matches!(
                refused,
                Over::Nodes(_) | Over::Bytes(_) | Over::Work | Over::Depth(_)
            ),
            "{refused}"
        );
        size_is_true(&session);
        assert!(session.status_size().nodes <= MAX_STATUS_NODES);
    }

    #[test]
    fn nesting_stops_at_the_depth_budget() {
        let (session, _) = linked();
        let mut nested = serde_json::json!(1);
        for _ in 0..10 {
            nested = serde_json::json!({ "n": nested });
        }
        let mut path = String::new();
        let mut refused = None;
        for i in 0..10 {
            path.push_str(if i == 0 {
                "/deep"
            } else {
                "/n/n/n/n/n/n/n/n/n/n"
            });
            let op = serde_json::json!([{"op": "add", "path": path, "value": nested}]);
            if let Err(e) = session.apply_patch(patch(&op.to_string()), 1, &mut Vec::new()) {
                refused = Some(e);
                break;
            }
        }
        assert!(
            matches!(refused, Some(PatchFailure::Over(Over::Depth(d))) if d > MAX_STATUS_DEPTH)
        );
        size_is_true(&session);
    }

    #[test]
    fn processes_and_metrics_stay_within_their_budgets() {
        let (session, _) = linked();
        let many: Vec<Value> = (0..=MAX_PROCESSES)
            .map(|i| serde_json::json!({"pm_id": i}))
            .collect();
        let op = serde_json::json!([{"op": "replace", "path": "/data/process", "value": many}]);
        assert_eq!(
            over(session.apply_patch(patch(&op.to_string()), 1, &mut Vec::new())),
            Over::Processes(MAX_PROCESSES + 1)
        );
        let metrics: serde_json::Map<String, Value> = (0..MAX_METRICS)
            .map(|i| (format!("m{i}"), serde_json::json!({"value": i})))
            .collect();
        let op = serde_json::json!([{"op": "replace", "path": "/data/process/0/axm_monitor", "value": metrics}]);
        session
            .apply_patch(patch(&op.to_string()), 2, &mut Vec::new())
            .unwrap();
        let one_more =
            r#"[{"op":"add","path":"/data/process/0/axm_monitor/extra","value":{"value":1}}]"#;
        assert_eq!(
            over(session.apply_patch(patch(one_more), 3, &mut Vec::new())),
            Over::Metrics(MAX_METRICS + 1)
        );
        size_is_true(&session);
    }

    #[test]
    fn long_values_count_against_the_text_budget() {
        let (session, _) = linked();
        let long = "x".repeat(MAX_STATUS_BYTES / 4);
        let mut refused = None;
        for i in 0..8 {
            // The same leaf, replaced again and again, counts once.
            let op = serde_json::json!([{"op": "replace", "path": "/data/process/0/cpu", "value": long}]);
            session
                .apply_patch(patch(&op.to_string()), i, &mut Vec::new())
                .unwrap();
            let op = serde_json::json!([{"op": "add", "path": format!("/data/server/s{i}"), "value": long}]);
            if let Err(e) = session.apply_patch(patch(&op.to_string()), i, &mut Vec::new()) {
                refused = Some(e);
                break;
            }
        }
        assert!(matches!(refused, Some(PatchFailure::Over(Over::Bytes(_)))));
        size_is_true(&session);
    }

    #[test]
    fn metric_values_are_saved_less_often_than_the_rest() {
        let (session, _) = linked();
        let due = |now, finish| session.live.lock().due(now, finish);
        assert!(due(0, false), "a new status is saved at the next round");
        assert!(session.record(1_000).is_some());
        assert!(!due(1_000, false));
        let mut points = Vec::new();
        for (path, value) in [
            ("/data/process/0/axm_monitor/Heap Usage/value", "91.5"),
            ("/data/process/0/cpu", "3"),
            ("/data/server/uptime", "500"),
        ] {
            let op = format!(r#"[{{"op":"replace","path":"{path}","value":{value}}}]"#);
            session.apply_patch(patch(&op), 2_000, &mut points).unwrap();
        }
        assert!(!due(2_000, false), "values wait");
        assert!(due(2_000, true), "until shutdown");
        assert!(due(1_000 + VALUES_SAVED_EVERY, false), "or their period");
        let op = r#"[{"op":"replace","path":"/data/process/0/status","value":"errored"}]"#;
        session.apply_patch(patch(op), 3_000, &mut points).unwrap();
        assert!(
            due(3_000, false),
            "a process's state is saved at the next round"
        );
        session.unsave();
        assert!(session.record(4_000).is_some());
        assert!(!due(4_000, false));
    }

    #[test]
    fn the_licence_tally_follows_statuses_and_sockets() {
        let sessions = Sessions::default();
        let status = |n: usize| {
            let processes: Vec<Value> = (0..n)
                .map(|i| serde_json::json!({"name": format!("a{i}")}))
                .collect();
            serde_json::json!({"data": {"process": processes}})
        };
        let mut points = Vec::new();
        let mut linked = Vec::new();
        for (i, n) in [2, 3, 4].into_iter().enumerate() {
            let (tx, _) = mpsc::channel(1);
            let (session, socket) = sessions.attach("b", &format!("s{i}"), tx, 0);
            assert_eq!(
                sessions.processes_in_use(None),
                [0, 2, 5][i],
                "no status yet"
            );
            session.apply_status(status(n), 0, &mut points).unwrap();
            linked.push((session, socket));
        }
        assert_eq!(sessions.processes_in_use(None), 9);
        assert_eq!(sessions.processes_in_use(Some(("b", "s1"))), 6);
        // A second socket of the same server counts it once.
        let (tx, _) = mpsc::channel(1);
        let (again, second) = sessions.attach("b", "s0", tx, 0);
        assert_eq!(sessions.processes_in_use(None), 9);
        sessions.detach(&again, second, 0, &mut points);
        assert_eq!(sessions.processes_in_use(None), 9);
        let (session, socket) = &linked[2];
        sessions.detach(session, *socket, 0, &mut points);
        assert_eq!(
            sessions.processes_in_use(None),
            5,
            "offline servers do not count"
        );
        let remove = r#"[{"op":"remove","path":"/data/process/0"}]"#;
        linked[1]
            .0
            .apply_patch(patch(remove), 1, &mut points)
            .unwrap();
        assert_eq!(sessions.processes_in_use(None), 4);
    }
}
