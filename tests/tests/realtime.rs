//! `/primus` after an agent's `status:patch`: a client whose filters name `status:patch`
//! (the dashboard) gets the patch as the agent sent it and no whole status; a
//! `@pm2/js-api` listener of `status` gets the whole status with the patch applied.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use km_e2e::agent::{SimAgent, status};
use km_e2e::{Km, e2e, show};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(5);

async fn watcher(km: &Km, token: &str, public_id: &str, filters: &[&str]) -> Result<Socket> {
    let url = format!(
        "{}/primus?token={token}",
        km.url().replacen("http", "ws", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .context("/primus")?;
    let sub = json!({"action": "sub", "public_id": public_id, "filters": filters});
    ws.send(Message::Text(sub.to_string().into())).await?;
    Ok(ws)
}

/// The next event of `server` on the socket: (event name, payload).
async fn next_event(ws: &mut Socket, server: &str) -> Result<(String, Value)> {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .context("no event")?;
        let Some(Ok(Message::Text(text))) = message else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text)?;
        let packet = &frame["data"][1];
        if packet["server_name"] != server {
            continue;
        }
        let name = frame["data"][0].as_str().unwrap_or_default().to_string();
        return Ok((name.clone(), packet[&name].clone()));
    }
}

#[tokio::test]
async fn patches_reach_the_dashboard_as_sent_and_listeners_as_whole_statuses() {
    e2e(async {
        let km = Km::start().await?;
        let user = km.api().register_random().await?;
        let bucket = user.api.create_bucket("realtime").await?;
        let token = user.api.token().context("token")?.to_string();
        let mut agent = SimAgent::connect(&km.url(), &bucket, "web-1").await?;
        agent.send("status", &status("web-1", 2)).await?;
        user.api
            .poll_get(
                &format!("/api/bucket/{}/data/status", bucket.id),
                "the server listed",
                WAIT,
                |v: &Value| v.as_array().filter(|a| !a.is_empty()).map(|_| ()),
            )
            .await?;
        let mut dashboard = watcher(&km, &token, &bucket.public_id, &["*", "status:patch"]).await?;
        let mut listener = watcher(&km, &token, &bucket.public_id, &["status"]).await?;
        // Both subscribed before the patch: a whole status first goes to both.
        tokio::time::sleep(Duration::from_millis(300)).await;
        agent.send("status", &status("web-1", 2)).await?;
        ensure!(next_event(&mut dashboard, "web-1").await?.0 == "status");
        ensure!(next_event(&mut listener, "web-1").await?.0 == "status");

        let patch = json!([{"op": "replace", "path": "/data/process/1/cpu", "value": 42}]);
        agent.send("status:patch", &patch).await?;
        let (event, payload) = next_event(&mut dashboard, "web-1").await?;
        ensure!(
            event == "status:patch" && payload == patch,
            "the dashboard got {event}: {}",
            show(&payload, 500)
        );
        let (event, payload) = next_event(&mut listener, "web-1").await?;
        ensure!(
            event == "status" && payload["data"]["process"][1]["cpu"] == 42,
            "the listener got {event}: {}",
            show(&payload, 500)
        );
        // No rendered status follows the patch on the dashboard's socket.
        agent.send("status:patch", &patch).await?;
        let (event, _) = next_event(&mut dashboard, "web-1").await?;
        if event != "status:patch" {
            bail!("the dashboard got a {event} after a patch");
        }
        Ok(())
    })
    .await;
}
