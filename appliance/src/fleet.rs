//! The fleet as every role sees it (the API, the dashboard, the notifier and alerts):
//! each server's status merged from this node's sessions, the other nodes and the stored
//! records, commands to agents wherever they are connected, and where the dashboard
//! shows a process.

use std::collections::BTreeMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
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
    });
    Ok(())
}

/// The process page of `app` on `server`.
pub fn page_path(bucket_id: &str, server: &str, app: &str) -> String {
    format!(
        "/buckets/{bucket_id}/servers/{}/apps/{}",
        urlencode(server),
        urlencode(app)
    )
}

/// Bytes a path segment keeps as they are: RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// One path segment, percent-encoded.
fn urlencode(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
