//! The fleet as every role sees it (the API, the dashboard, the notifier and alerts):
//! each server's status merged from this node's sessions, the other nodes and the stored
//! records, commands to agents wherever they are connected, and where the dashboard
//! shows a process.

use std::collections::BTreeMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer};
use serde_json::{Value, json};

use crate::app::App;
use km_ingest::frames;
use km_ingest::session::Session;
use km_stores::ids::now_ms;
use km_stores::{AgentCommand, Delivery, EventKind, EventRecord, StoreError};

/// Why a command did not reach its agent.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("server {0:?} is not connected to this bucket")]
    NotConnected(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The API view (JSON text) of each server of the bucket (only `only` if given), by name.
pub async fn servers_status(app: &App, bucket_id: &str, only: Option<&str>) -> Vec<String> {
    let local = app
        .sessions
        .of_bucket(bucket_id, only)
        .iter()
        .map(|s| s.to_json())
        .collect::<Vec<_>>();
    // Without the bus this node still answers with what it holds.
    let remote = app
        .bus
        .remote_servers(bucket_id, only)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "status: other nodes not asked");
            Vec::new()
        });
    let mut servers = ranked(local.into_iter().chain(remote));
    // Servers that went offline elsewhere (the interactor of another node or process)
    // since this one started, as last persisted; rendered only where they rank higher.
    let persisted = app
        .documents
        .bucket_servers(bucket_id, only)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "status: persisted servers not read");
            Vec::new()
        });
    for record in persisted {
        let rank = (false, record.last_update);
        let held = servers
            .get(&record.server_name)
            .is_some_and(|(held, _)| *held >= rank);
        if !held {
            let view = Session::offline(&record, Default::default()).to_json();
            servers.insert(record.server_name, (rank, view));
        }
    }
    servers.into_values().map(|(_, json)| json).collect()
}

/// A server's status as `data/status` shows it, typed for the roles that read more than
/// its text (the dashboard, the notifier, alerts, reports). An agent wrote it: a member
/// of the wrong type reads as empty, never as a missing server.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ServerStatus {
    pub server_name: String,
    /// An agent holds a socket for it (on some node).
    #[serde(deserialize_with = "lenient")]
    pub online: bool,
    #[serde(deserialize_with = "lenient")]
    pub last_update: i64,
    #[serde(deserialize_with = "lenient")]
    pub data: StatusData,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StatusData {
    #[serde(deserialize_with = "lenient")]
    pub server: HostStatus,
    #[serde(deserialize_with = "lenient_items")]
    pub process: Vec<ProcessStatus>,
}

/// What the agent says of its host.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct HostStatus {
    #[serde(deserialize_with = "lenient")]
    pub hostname: String,
    #[serde(deserialize_with = "lenient")]
    pub pm2_version: String,
    #[serde(deserialize_with = "lenient")]
    pub node_version: String,
    #[serde(deserialize_with = "lenient")]
    pub platform: String,
    /// Seconds since the host booted.
    #[serde(deserialize_with = "lenient")]
    pub uptime: f64,
    /// 1, 5 and 15 minutes.
    #[serde(deserialize_with = "lenient")]
    pub loadavg: Vec<f64>,
    /// Bytes.
    #[serde(deserialize_with = "lenient")]
    pub total_mem: f64,
}

/// One process as pm2 reports it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ProcessStatus {
    #[serde(deserialize_with = "lenient")]
    pub name: String,
    /// As sent (a number from pm2), for commands and texts.
    pub pm_id: Value,
    #[serde(deserialize_with = "lenient")]
    pub status: String,
    /// When it (re)started, epoch ms.
    #[serde(deserialize_with = "lenient")]
    pub pm_uptime: i64,
    #[serde(deserialize_with = "lenient")]
    pub cpu: f64,
    /// Bytes.
    #[serde(deserialize_with = "lenient")]
    pub memory: f64,
    #[serde(deserialize_with = "lenient")]
    pub restart_time: i64,
    #[serde(deserialize_with = "lenient")]
    pub version: Option<String>,
    /// pm2's view of the app's repository (`revision`, `branch`...).
    pub versioning: Option<Value>,
    /// Custom metrics by name.
    #[serde(deserialize_with = "lenient")]
    pub axm_monitor: BTreeMap<String, Value>,
    #[serde(deserialize_with = "lenient_items")]
    pub axm_actions: Vec<ActionStatus>,
}

/// An action the process offers (`@pm2/io` `action`/`scopedAction`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ActionStatus {
    #[serde(deserialize_with = "lenient")]
    pub action_name: String,
    #[serde(deserialize_with = "lenient")]
    pub action_type: String,
}

impl ProcessStatus {
    /// The revision pm2 found in the app's repository, if any.
    pub fn revision(&self) -> Option<&str> {
        self.versioning.as_ref()?.get("revision")?.as_str()
    }
}

/// A member read as `T`, or `T`'s default if the agent sent another type.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(d: D) -> Result<T, D::Error> {
    Ok(serde_json::from_value(Value::deserialize(d)?).unwrap_or_default())
}

/// A list of which each item of the wrong type is left out.
fn lenient_items<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Vec<T>, D::Error> {
    let items = match Value::deserialize(d)? {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    Ok(items
        .into_iter()
        .filter_map(|item| serde_json::from_value(item).ok())
        .collect())
}

/// Each server of the bucket (only `only` if given), typed, by name.
pub async fn servers(app: &App, bucket_id: &str, only: Option<&str>) -> Vec<ServerStatus> {
    servers_status(app, bucket_id, only)
        .await
        .iter()
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect()
}

/// A view's rank: online over offline, then the latest.
type Rank = (bool, i64);

/// One view per server name, with its rank: an online one over an offline one, then the
/// latest.
fn ranked(views: impl IntoIterator<Item = String>) -> BTreeMap<String, (Rank, String)> {
    #[derive(Deserialize)]
    struct Head {
        server_name: String,
        online: bool,
        last_update: i64,
    }
    let mut best: BTreeMap<String, (Rank, String)> = BTreeMap::new();
    for json in views {
        let Ok(head) = serde_json::from_str::<Head>(&json) else {
            continue;
        };
        let rank = (head.online, head.last_update);
        match best.get(&head.server_name) {
            Some((held, _)) if *held >= rank => {}
            _ => {
                best.insert(head.server_name, (rank, json));
            }
        }
    }
    best
}

/// Sends `channel`/`payload` to the agent of `(server, app)` in the bucket, wherever it
/// is connected, and records the command as an event made `by` a user or an alert.
pub async fn command_agent(
    app: &App,
    bucket_id: &str,
    (server_name, app_name): (&str, Option<&str>),
    channel: &str,
    payload: Value,
    by: &str,
) -> Result<(), CommandError> {
    let frame = frames::encode(channel, &payload);
    let command = AgentCommand {
        bucket_id: bucket_id.to_string(),
        server_name: server_name.to_string(),
        frame,
    };
    match app.bus.send_command(command).await? {
        Delivery::Sent => {}
        Delivery::NotConnected => return Err(CommandError::NotConnected(server_name.into())),
    }
    let at = now_ms();
    let doc = json!({
        "at": at, "type": "command", "server_name": server_name, "app_name": app_name,
        "pm_id": payload.get("process_id"), "user": by,
        "data": { "channel": channel, "payload": payload },
    });
    app.ingest.event(EventRecord {
        id: km_stores::ids::new_object_id(),
        kind: EventKind::Event,
        bucket_id: bucket_id.to_string(),
        server_name: server_name.to_string(),
        app_name: app_name.map(str::to_string),
        event_type: "command".into(),
        name: None,
        at,
        doc: doc.to_string(),
        span: None,
    });
    Ok(())
}

/// The page of `server`.
pub fn server_path(bucket_id: &str, server: &str) -> String {
    format!("/buckets/{bucket_id}/servers/{}", urlencode(server))
}

/// The process page of `app` on `server`.
pub fn page_path(bucket_id: &str, server: &str, app: &str) -> String {
    format!("{}/apps/{}", server_path(bucket_id, server), urlencode(app))
}

/// Bytes a path segment keeps as they are: RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// One path segment, percent-encoded.
pub fn urlencode(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_of_wrong_types_reads_as_empty_members() {
        let text = r#"{"server_name":"web-1","online":"yes","last_update":5,"data":{
            "server":{"hostname":7,"pm2_version":"6.0.5"},
            "process":[{"name":"api","pm_id":3,"cpu":"lots","memory":1024,
                "versioning":{"revision":"abc"},"axm_monitor":[],
                "axm_actions":[{"action_name":"gc"},5]},"not a process"]}}"#;
        let status: ServerStatus = serde_json::from_str(text).unwrap();
        assert_eq!(
            (
                status.server_name.as_str(),
                status.online,
                status.last_update
            ),
            ("web-1", false, 5)
        );
        assert_eq!(status.data.server.hostname, "");
        assert_eq!(status.data.server.pm2_version, "6.0.5");
        let [p] = &status.data.process[..] else {
            panic!("{:?}", status.data.process)
        };
        assert_eq!((p.name.as_str(), p.cpu, p.memory), ("api", 0.0, 1024.0));
        assert_eq!((p.pm_id.as_i64(), p.revision()), (Some(3), Some("abc")));
        assert!(p.axm_monitor.is_empty());
        assert_eq!(p.axm_actions.len(), 1);
    }

    #[test]
    fn one_view_per_server_online_then_latest() {
        let view = |name: &str, online: bool, at: i64| {
            format!(
                r#"{{"server_name":"{name}","online":{online},"last_update":{at},"data":{{}}}}"#
            )
        };
        let merged = ranked([
            view("a", false, 9),
            view("a", true, 5),
            view("b", false, 1),
            view("b", false, 3),
            "not json".into(),
        ]);
        assert_eq!(merged.get("a").map(|v| &v.1), Some(&view("a", true, 5)));
        assert_eq!(merged.get("b").map(|v| &v.1), Some(&view("b", false, 3)));
        assert_eq!(merged.len(), 2);
    }
}
