//! A browser watching the bucket: one `/primus` socket subscribed the way the dashboard
//! (patches) or a `@pm2/js-api` status listener (whole statuses) subscribes, counting
//! what it receives.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// How the watcher subscribes.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Mode {
    /// Like the dashboard: every event, status patches instead of rendered statuses.
    Patches,
    /// Like a `@pm2/js-api` listener of `status`: a whole status after every patch.
    Statuses,
}

impl Mode {
    fn filters(self) -> &'static [&'static str] {
        match self {
            Mode::Patches => &["*", "status:patch"],
            Mode::Statuses => &["status"],
        }
    }
}

#[derive(Default)]
pub struct Received {
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
}

/// Watches the bucket `public` until the stop signal; an error says why it could not.
pub async fn watch_bucket(
    target: &str,
    token: &str,
    public: &str,
    mode: Mode,
    got: &Received,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let url = format!("{}/primus?token={token}", target.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| format!("watcher: /primus refused: {e}"))?;
    let sub = serde_json::json!({"action": "sub", "public_id": public, "filters": mode.filters()});
    ws.send(Message::Text(sub.to_string().into()))
        .await
        .map_err(|e| format!("watcher: cannot subscribe: {e}"))?;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    got.messages.fetch_add(1, Relaxed);
                    got.bytes.fetch_add(text.len() as u64, Relaxed);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("watcher: socket failed: {e}")),
                None => return Err("watcher: socket closed by km".into()),
            },
        }
    }
}
