//! Sessions: one per linked server, keyed by (bucket, machine name). A session outlives
//! the agent's sockets (it may hold several at once after a reconnect storm) and holds
//! the live status that the API reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

use crate::ingest::MetricSampler;
use crate::stores::{AgentCommand, CommandSink, Delivery, MetricPoint, ServerRecord};

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
    /// The agent's latest full status payload, patches applied.
    pub status: Option<Value>,
    pub internal_ip: Option<String>,
    pub last_update: i64,
    pub sampler: MetricSampler,
    /// Changed since last persisted.
    pub dirty: bool,
}

pub struct Session {
    pub bucket_id: String,
    pub server_name: String,
    pub live: Mutex<Live>,
    sockets: Mutex<Vec<SocketLink>>,
}

impl Session {
    fn new(bucket_id: &str, server_name: &str, live: Live) -> Self {
        Session {
            bucket_id: bucket_id.to_string(),
            server_name: server_name.to_string(),
            live: Mutex::new(live),
            sockets: Mutex::new(Vec::new()),
        }
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

    /// Replaces the status with a full one and samples its metrics.
    pub fn apply_status(&self, status: Value, now: i64, points: &mut Vec<MetricPoint>) {
        let mut live = self.live.lock();
        live.status = Some(status);
        self.after_update(&mut live, now, points);
    }

    /// Applies an RFC 6902 patch to the status. On failure the operations before the
    /// failing one stay applied (they only carry newer values) and the caller asks the
    /// agent for a full status, which replaces everything.
    pub fn apply_patch(
        &self,
        patch: Vec<PatchOp>,
        now: i64,
        points: &mut Vec<MetricPoint>,
    ) -> Result<(), PatchFailure> {
        let mut live = self.live.lock();
        let status = live.status.as_mut().ok_or(PatchFailure::NoStatus)?;
        apply_patch(status, patch)?;
        self.after_update(&mut live, now, points);
        Ok(())
    }

    fn after_update(&self, live: &mut Live, now: i64, points: &mut Vec<MetricPoint>) {
        live.last_update = now;
        live.dirty = true;
        let ip = live
            .status
            .as_ref()
            .and_then(|s| s.get("internal_ip"))
            .and_then(Value::as_str);
        if live.internal_ip.as_deref() != ip {
            live.internal_ip = ip.map(str::to_string);
        }
        let Live {
            status, sampler, ..
        } = live;
        if let Some(status) = status {
            sampler.sample(status, now, points, (&self.bucket_id, &self.server_name));
        }
    }

    /// Scope of metric points and events from this server.
    pub fn scope(&self) -> (&str, &str) {
        (&self.bucket_id, &self.server_name)
    }

    /// The record persisted for this server, if it ever sent a status.
    pub fn record(&self) -> Option<ServerRecord> {
        let mut live = self.live.lock();
        live.dirty = false;
        let status = live.status.as_ref()?;
        Some(ServerRecord {
            bucket_id: self.bucket_id.clone(),
            server_name: self.server_name.clone(),
            internal_ip: live.internal_ip.clone(),
            last_update: live.last_update,
            status_json: status.to_string(),
        })
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
            data: &'a Value,
        }
        let online = self.online();
        let live = self.live.lock();
        let empty = Value::Object(Default::default());
        let data = live
            .status
            .as_ref()
            .and_then(|s| s.get("data"))
            .unwrap_or(&empty);
        serde_json::to_string(&View {
            server_name: &self.server_name,
            internal_ip: live.internal_ip.as_deref(),
            online,
            last_update: live.last_update,
            data,
        })
        .unwrap_or_default()
    }
}

/// Every session of this node, by bucket then server name.
#[derive(Default)]
pub struct Sessions {
    buckets: RwLock<HashMap<String, BTreeMap<String, Arc<Session>>>>,
    next_socket: AtomicU64,
}

impl Sessions {
    /// Loads the servers persisted by a previous run, offline until their agents return.
    pub fn restore(&self, records: Vec<ServerRecord>) {
        let mut buckets = self.buckets.write();
        for r in records {
            let live = Live {
                status: serde_json::from_str(&r.status_json).ok(),
                internal_ip: r.internal_ip,
                last_update: r.last_update,
                ..Live::default()
            };
            let session = Arc::new(Session::new(&r.bucket_id, &r.server_name, live));
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
                .or_insert_with(|| Arc::new(Session::new(bucket_id, server_name, Live::default())))
                .clone()
        });
        session.sockets.lock().push(SocketLink {
            id,
            tx,
            last_data: now,
        });
        (session, id)
    }

    pub fn detach(&self, session: &Session, socket_id: u64) {
        session.sockets.lock().retain(|l| l.id != socket_id);
        session.live.lock().dirty = true;
    }

    pub fn get(&self, bucket_id: &str, server_name: &str) -> Option<Arc<Session>> {
        self.buckets
            .read()
            .get(bucket_id)?
            .get(server_name)
            .cloned()
    }

    /// The servers of a bucket, by name.
    pub fn of_bucket(&self, bucket_id: &str) -> Vec<Arc<Session>> {
        self.buckets
            .read()
            .get(bucket_id)
            .map(|servers| servers.values().cloned().collect())
            .unwrap_or_default()
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

    /// Records of servers changed since last asked.
    pub fn dirty_records(&self) -> Vec<ServerRecord> {
        self.all()
            .iter()
            .filter(|s| s.live.lock().dirty)
            .filter_map(|s| s.record())
            .collect()
    }

    /// Metric points of minutes that ended (all of them with `force`).
    pub fn drain_metrics(&self, now: i64, force: bool) -> Vec<MetricPoint> {
        let mut out = Vec::new();
        for session in self.all() {
            session
                .live
                .lock()
                .sampler
                .drain(now, force, &mut out, session.scope());
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

/// Applies `patch` with json-patch. `replace`, nearly every operation the agent sends,
/// resolves its borrowed pointer with jsonptr and moves the new value in (json-patch
/// would allocate each path token and clone the value).
fn apply_patch(status: &mut Value, patch: Vec<PatchOp>) -> Result<(), PatchFailure> {
    for (
        index,
        PatchOp {
            op,
            path,
            from,
            value,
        },
    ) in patch.into_iter().enumerate()
    {
        match (op.as_ref(), value) {
            ("replace", Some(value)) => {
                let invalid = |reason: String| PatchFailure::Invalid { index, reason };
                let pointer = Pointer::parse(&path).map_err(|e| invalid(e.to_string()))?;
                *pointer
                    .resolve_mut(status)
                    .map_err(|e| invalid(e.to_string()))? = value;
            }
            (_, value) => {
                let operation = PatchOp {
                    op,
                    path,
                    from,
                    value,
                }
                .into_operation(index)?;
                json_patch::patch_unsafe(status, std::slice::from_ref(&operation))?;
            }
        }
    }
    Ok(())
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
}
