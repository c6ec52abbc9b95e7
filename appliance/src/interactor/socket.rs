//! One agent websocket: frames in, commands out, dead peers detected by the server (the
//! agent pings but never checks answers).

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::frames::{self, Inbound, Origin};
use super::session::Session;
use crate::app::AppState;
use crate::ids::now_ms;
use crate::limits;
use crate::realtime::LiveEvent;

const PING_EVERY: Duration = Duration::from_secs(10);
/// A socket silent this long is dead (the agent pings every 5 s).
const IDLE_LIMIT: Duration = Duration::from_secs(30);
/// Commands queued for one socket.
const OUTBOX: usize = 64;

pub async fn run(socket: WebSocket, app: AppState, bucket_id: String, server_name: String) {
    let (tx, mut outbox) = mpsc::channel::<String>(OUTBOX);
    let (session, socket_id) = app
        .sessions
        .attach(&bucket_id, &server_name, tx.clone(), now_ms());
    tracing::info!(bucket = %bucket_id, server = %server_name, socket = socket_id, "agent connected");
    if let Err(e) = app.bus.claim(&bucket_id, &server_name).await {
        tracing::warn!(error = %e, "bus: cannot record this node as the agent's");
    }
    let (mut sink, mut stream) = socket.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut last_seen = Instant::now();
    // The licence's limit is checked once, on the first full status of this socket.
    let mut admitted = false;
    let reason = loop {
        tokio::select! {
            () = app.shutdown.cancelled() => {
                let close = CloseFrame { code: 1001, reason: "km is restarting".into() };
                let _ = sink.send(Message::Close(Some(close))).await;
                break "shutdown";
            }
            frame = outbox.recv() => match frame {
                Some(frame) => if sink.send(Message::Text(frame.into())).await.is_err() {
                    break "send failed";
                },
                None => break "outbox closed",
            },
            () = session.eviction.notified() => {
                let close = CloseFrame { code: 4003, reason: "the bucket is disabled".into() };
                let _ = sink.send(Message::Close(Some(close))).await;
                break "bucket disabled";
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > IDLE_LIMIT {
                    break "silent for 30 s";
                }
                if session.evicted() {
                    let close = CloseFrame { code: 4003, reason: "the bucket is disabled".into() };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    break "bucket disabled";
                }
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    break "ping failed";
                }
            }
            message = stream.next() => {
                last_seen = Instant::now();
                let status = match message {
                    Some(Ok(Message::Text(text))) => receive(&app, &session, socket_id, &tx, text.as_str()),
                    Some(Ok(Message::Binary(bytes))) => match std::str::from_utf8(&bytes) {
                        Ok(text) => receive(&app, &session, socket_id, &tx, text),
                        Err(_) => {
                            app.ingest.count_malformed();
                            false
                        }
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => false,
                    Some(Ok(Message::Close(_))) | None => break "closed by agent",
                    Some(Err(_)) => break "read failed",
                };
                if status && !admitted {
                    admitted = true;
                    if let Err(reason) = limits::admit(&app, &session).await {
                        let close = CloseFrame { code: 4003, reason: reason.chars().take(120).collect::<String>().into() };
                        let _ = sink.send(Message::Close(Some(close))).await;
                        break "parked: over the licence's process limit";
                    }
                }
            }
        }
    };
    let mut points = Vec::new();
    app.sessions
        .detach(&session, socket_id, now_ms(), &mut points);
    app.ingest.writer.metrics(points);
    // Offline now: its last state is saved at once (other processes show it from there).
    if !session.online()
        && let Some(record) = session.record()
        && let Err(e) = app.documents.upsert_servers(&[record]).await
    {
        tracing::warn!(error = %e, server = %server_name, "cannot save the server's last state");
    }
    tracing::info!(bucket = %bucket_id, server = %server_name, socket = socket_id, reason, "agent disconnected");
}

/// Handles one text frame from an agent; never fails the socket. True when it was a full
/// status, applied.
pub fn receive(
    app: &AppState,
    session: &Session,
    socket_id: u64,
    tx: &mpsc::Sender<String>,
    text: &str,
) -> bool {
    let now = now_ms();
    let inbound = match frames::decode(text) {
        Ok(inbound) => inbound,
        Err(e) => {
            tracing::debug!(server = %session.server_name, error = %e, "frame dropped");
            app.ingest.count_malformed();
            return false;
        }
    };
    session.mark_data(socket_id, now);
    let watched = app.bus.watched(&session.bucket_id);
    match inbound {
        Inbound::Status(payload) => {
            if !app.ingest.apply_status(session, payload, now) {
                app.ingest.count_malformed();
                return false;
            }
            if watched {
                publish(app, session, "status", payload);
            }
            return true;
        }
        Inbound::StatusPatch(payload) => {
            if !app.ingest.apply_patch(session, payload, now) {
                // The agent answers with a full status.
                let _ = tx.try_send(frames::STATUS_RESEND.to_string());
            } else if watched && let Some(status) = session.status_text() {
                publish(app, session, "status", &status);
            }
        }
        Inbound::Other { channel, payload } => {
            if watched {
                publish(app, session, &channel, payload);
            }
            let origin = Origin {
                bucket_id: &session.bucket_id,
                server_name: &session.server_name,
                now,
            };
            app.ingest
                .event(frames::to_event(&origin, &channel, payload));
        }
    }
    false
}

/// Hands an agent's event to the browsers watching its bucket.
fn publish(app: &AppState, session: &Session, event: &str, payload: &str) {
    app.bus.publish_live(LiveEvent::new(
        &session.bucket_id,
        &session.server_name,
        event,
        payload,
    ));
}
