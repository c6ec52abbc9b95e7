//! A simulated agent on the real protocol (`/interaction`, the agent's headers and
//! frames), for tests that need what a real pm2 would never send: hostile frames, or a
//! tenant whose every log line is numbered and counted.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Api, Bucket, now_ms};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What km sent last: a text frame, or the close (code and reason; `None` if the
/// connection ended without a close frame).
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Text(String),
    Closed(Option<(u16, String)>),
}

pub struct SimAgent {
    ws: Ws,
    pub server: String,
}

impl SimAgent {
    /// Connects to `km_url`'s `/interaction` as `server` of `bucket`.
    pub async fn connect(km_url: &str, bucket: &Bucket, server: &str) -> Result<SimAgent> {
        let url = format!("{}/interaction", km_url.replacen("http", "ws", 1));
        let mut request = url.as_str().into_client_request()?;
        let headers = request.headers_mut();
        headers.insert("x-km-public", bucket.public_id.parse()?);
        headers.insert("x-km-secret", bucket.secret_id.parse()?);
        headers.insert("x-km-server", server.parse()?);
        headers.insert("x-pm2-version", "7.0.4".parse()?);
        headers.insert("x-protocol-version", "1".parse()?);
        // Large frames go out whole (the client's own limits are not under test).
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
            .await
            .with_context(|| format!("agent {server}: cannot connect to {url}"))?;
        Ok(SimAgent {
            ws,
            server: server.to_string(),
        })
    }

    /// Sends `{"channel", "payload"}`.
    pub async fn send(&mut self, channel: &str, payload: &Value) -> Result<()> {
        self.send_text(json!({ "channel": channel, "payload": payload }).to_string())
            .await
    }

    /// Sends one text frame as given.
    pub async fn send_text(&mut self, text: String) -> Result<()> {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .with_context(|| format!("agent {}: send failed", self.server))
    }

    /// Sends one binary frame of `bytes` (km reads it as text).
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.ws
            .send(Message::Binary(Bytes::from(bytes)))
            .await
            .with_context(|| format!("agent {}: send failed", self.server))
    }

    /// Sends one raw websocket frame (a fragment of a message, say).
    pub async fn send_frame(&mut self, frame: Frame) -> Result<()> {
        self.ws
            .send(Message::Frame(frame))
            .await
            .with_context(|| format!("agent {}: send failed", self.server))
    }

    /// The next text frame or the close, within `timeout`; km's requests for logs (it
    /// asks every agent of a bucket that collects them, at admission and every minute)
    /// are skipped, as an agent that is not logging anything would let them pass.
    pub async fn next(&mut self, timeout: Duration) -> Result<Incoming> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| {
                    anyhow!("agent {}: nothing from km within {timeout:?}", self.server)
                })?;
            match message {
                Some(Ok(Message::Text(text))) if is_log_request(&text) => {}
                Some(Ok(Message::Text(text))) => return Ok(Incoming::Text(text.to_string())),
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Incoming::Closed(
                        frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                    ));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Ok(Incoming::Closed(None)),
            }
        }
    }

    /// Waits for a text frame on `channel` (other frames are skipped).
    pub async fn expect_channel(&mut self, channel: &str, timeout: Duration) -> Result<Value> {
        loop {
            match self.next(timeout).await? {
                Incoming::Text(text) => {
                    let frame: Value = serde_json::from_str(&text)?;
                    if frame["channel"] == channel {
                        return Ok(frame);
                    }
                }
                Incoming::Closed(close) => {
                    bail!("agent {}: closed ({close:?}) before {channel}", self.server)
                }
            }
        }
    }

    /// Waits for km to close the socket; its close code and reason.
    pub async fn expect_close(&mut self, timeout: Duration) -> Result<Option<(u16, String)>> {
        loop {
            if let Incoming::Closed(close) = self.next(timeout).await? {
                return Ok(close);
            }
        }
    }
}

/// A status as pm2 7 sends it, with `processes` processes of 3 custom metrics each.
pub fn status(server: &str, processes: usize) -> Value {
    let process = |i: usize| {
        json!({
            "pid": 1000 + i, "name": format!("app-{}", i % 8), "pm_id": i, "status": "online",
            "restart_time": 0, "created_at": now_ms(), "pm_uptime": now_ms(), "cpu": 1, "memory": 30_000_000,
            "exec_mode": "fork_mode", "versioning": null, "node_env": "production",
            "axm_actions": [], "axm_options": {}, "axm_dynamic": {},
            "axm_monitor": {
                "Heap Size": {"value": "12.5", "unit": "MiB"},
                "Event Loop Latency": {"value": "0.5", "unit": "ms"},
                "Active handles": {"value": 4}
            }
        })
    };
    json!({
        "data": {
            "process": (0..processes).map(process).collect::<Vec<_>>(),
            "server": {"hostname": server, "uptime": 100, "platform": "linux", "pm2_version": "7.0.4",
                       "node_version": "20.0.0", "loadavg": [0.1, 0.1, 0.1], "total_mem": 1, "free_mem": 1}
        },
        "server_name": server,
        "internal_ip": "10.0.0.1"
    })
}

/// A log frame's payload: line `n` of `app`.
pub fn log_line(app: &str, server: &str, n: u64, at: i64) -> Value {
    json!({
        "at": at, "data": format!("line {n}\n"), "log_type": "out",
        "process": {"pm_id": 0, "name": app, "rev": null, "server": server}
    })
}

/// A tenant that keeps logging numbered lines (and a status every second) until stopped;
/// the test then checks that every line was stored.
pub struct LoggingTenant {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<u64>>,
    pub bucket: Bucket,
    pub server: String,
}

impl LoggingTenant {
    /// Starts logging `per_second` lines a second as `server` of `bucket`.
    pub async fn start(
        km_url: &str,
        bucket: Bucket,
        server: &str,
        per_second: u32,
    ) -> Result<Self> {
        let mut agent = SimAgent::connect(km_url, &bucket, server).await?;
        agent.send("status", &status(server, 2)).await?;
        let (stop, mut stopped) = watch::channel(false);
        let name = server.to_string();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
            let mut sent = 0u64;
            let mut last_status = now_ms();
            while !*stopped.borrow() {
                tokio::select! {
                    _ = tick.tick() => {
                        agent.send("logs", &log_line("steady", &name, sent, now_ms())).await?;
                        sent += 1;
                        if now_ms() - last_status >= 1000 {
                            agent.send("status", &status(&name, 2)).await?;
                            last_status = now_ms();
                        }
                    }
                    _ = stopped.changed() => {}
                }
            }
            Ok(sent)
        });
        Ok(LoggingTenant {
            stop,
            task,
            bucket,
            server: server.to_string(),
        })
    }

    /// Stops logging and checks, through `api`, that every line sent was stored, each
    /// once.
    pub async fn stop_and_check(self, api: &Api) -> Result<u64> {
        let _ = self.stop.send(true);
        let sent = self
            .task
            .await
            .map_err(|e| anyhow!("logging tenant: {e}"))?
            .context("logging tenant: its socket failed")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let stored = stored_lines(api, &self.bucket.id, &self.server).await?;
            let all = (0..sent).all(|n| stored.binary_search(&n).is_ok());
            if all && stored.len() as u64 == sent {
                return Ok(sent);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "logging tenant {}: {} of {sent} lines stored ({} distinct)",
                    self.server,
                    stored.len(),
                    {
                        let mut d = stored.clone();
                        d.dedup();
                        d.len()
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The numbers of the lines of `server` stored in `bucket`, sorted.
async fn stored_lines(api: &Api, bucket: &str, server: &str) -> Result<Vec<u64>> {
    numbered_lines(api, bucket, &json!({"server_name": server}), "line ").await
}

/// The numbers after `prefix` of the log lines stored in `bucket` that match `filter`
/// (every page), sorted; duplicates kept.
pub async fn numbered_lines(
    api: &Api,
    bucket: &str,
    filter: &Value,
    prefix: &str,
) -> Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for page in 0.. {
        let mut filter = filter.clone();
        filter["size"] = 1000.into();
        filter["from"] = (page * 1000).into();
        let lines = api.data(bucket, "logs", &filter).await?;
        let lines = lines.as_array().cloned().unwrap_or_default();
        numbers.extend(lines.iter().filter_map(|l| {
            l["data"]
                .as_str()?
                .trim()
                .strip_prefix(prefix)?
                .parse::<u64>()
                .ok()
        }));
        if lines.len() < 1000 {
            break;
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// A `trigger:pm2:action` asking for logs (`startLogging` or `stopLogging`).
fn is_log_request(text: &str) -> bool {
    serde_json::from_str::<Value>(text).is_ok_and(|frame| {
        frame["channel"] == "trigger:pm2:action"
            && matches!(
                frame["payload"]["method_name"].as_str(),
                Some("startLogging" | "stopLogging")
            )
    })
}
