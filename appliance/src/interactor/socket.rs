//! One agent websocket: frames in, commands out, dead peers detected by the server. km
//! never pings: the agent pings every 5 s and sends a status every second, and a ping
//! answered on the wrong one of its sockets makes the agent start over, losing what it
//! buffered.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use km_core::app::AppState;
use km_core::bucket_settings::{BucketSettings, logging_command};
use km_core::limits;
use km_ingest::StatusRefusal;
use km_ingest::budget::MAX_FRAME_BYTES;
use km_ingest::frames::{self, Inbound, Origin};
use km_ingest::meter::{BudgetSpent, Meter, Metered};
use km_ingest::session::{PatchFailure, Session};
use km_stores::ids::now_ms;
use km_stores::{Delivery, LiveEvent};

/// A socket silent this long is dead (the agent pings every 5 s). Its deadline is moved
/// only when it passes, so a socket's timer fires about every 30 s, not at each frame.
const IDLE_LIMIT: Duration = Duration::from_secs(30);
/// pm2's agent stops sending logs 120 s after a `startLogging`: a bucket that collects
/// logs asks again this often.
const LOGS_RENEWED_EVERY: Duration = Duration::from_secs(60);
/// The first request for logs waits this long after the socket opens: an agent that
/// reconnects opens several sockets at once, and a frame reaching it then makes it start
/// over and drop lines it was sending.
const LOGS_FIRST_ASKED_AFTER: Duration = Duration::from_secs(5);
/// At shutdown, how long the frames the agent sent before it saw km's close are still
/// read (they would be lost otherwise).
const DRAIN_LIMIT: Duration = Duration::from_secs(3);
/// Frames larger than this are handled on the blocking pool.
const INLINE_FRAME_BYTES: usize = 1 << 20;
/// Commands queued for one socket.
const OUTBOX: usize = 64;
/// Read buffer per agent socket: status patches are ~2 KB; larger frames still arrive
/// whole, in more reads. A socket's buffer grows to about twice this (the default,
/// 128 KiB, cost 256 MB for 2,000 agents; 16 KiB still 32 KB per agent).
const READ_BUFFER_BYTES: usize = 4 << 10;

type AgentSocket = WebSocketStream<Metered<TokioIo<Upgraded>>>;

/// Why a socket ends, and the close frame km sends (if any).
struct Ending {
    reason: String,
    close: Option<(u16, String)>,
}

impl Ending {
    fn quiet(reason: &str) -> Self {
        Ending {
            reason: reason.to_string(),
            close: None,
        }
    }

    fn closing(code: u16, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Ending {
            close: Some((code, reason.clone())),
            reason,
        }
    }
}

/// Takes over an upgraded agent connection: frames are read against this node's
/// in-flight budget.
pub async fn accept(upgraded: Upgraded, app: AppState, bucket_id: String, server_name: String) {
    let meter = Meter::new(app.ingest.in_flight.clone());
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let io = Metered::new(TokioIo::new(upgraded), meter.clone());
    let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    run(socket, meter, app, bucket_id, server_name).await;
}

async fn run(
    socket: AgentSocket,
    meter: Arc<Meter>,
    app: AppState,
    bucket_id: String,
    server_name: String,
) {
    let (tx, mut outbox) = mpsc::channel::<String>(OUTBOX);
    let (session, socket_id) = app
        .sessions
        .attach(&bucket_id, &server_name, tx.clone(), now_ms());
    tracing::info!(bucket = %bucket_id, server = %server_name, socket = socket_id, "agent connected");
    if let Err(e) = app.bus.claim(&bucket_id, &server_name).await {
        tracing::warn!(error = %e, "bus: cannot record this node as the agent's");
    }
    let (mut sink, mut stream) = socket.split();
    let mut last_seen = Instant::now();
    let idle = tokio::time::sleep(IDLE_LIMIT);
    let mut renew_logs =
        tokio::time::interval_at(Instant::now() + LOGS_FIRST_ASKED_AFTER, LOGS_RENEWED_EVERY);
    // Made once, not at every wake-up: each registers with a lock shared by every socket.
    let shutdown = app.shutdown.cancelled();
    let eviction = session.eviction.notified();
    tokio::pin!(idle, shutdown, eviction);
    // The licence's limit is checked once, on the first full status of this socket.
    let mut admitted = false;
    let disabled = || Ending::closing(4003, "the bucket is disabled");
    let ending = loop {
        tokio::select! {
            () = &mut shutdown => break Ending::closing(1001, "km is restarting"),
            frame = outbox.recv() => match frame {
                Some(frame) => if sink.send(Message::Text(frame.into())).await.is_err() {
                    break Ending::quiet("send failed");
                },
                None => break Ending::quiet("outbox closed"),
            },
            () = &mut eviction => break disabled(),
            _ = renew_logs.tick(), if admitted => ask_for_logs(&app, &session).await,
            () = &mut idle => {
                if last_seen.elapsed() >= IDLE_LIMIT {
                    break Ending::quiet("silent for 30 s");
                }
                if session.evicted() {
                    break disabled();
                }
                idle.as_mut().reset(last_seen + IDLE_LIMIT);
            }
            message = stream.next() => {
                last_seen = Instant::now();
                let handled = match read(&app, message) {
                    Read::Data(text) => {
                        let handled = match text {
                            Some(text) => Some(handle(&app, &session, socket_id, &tx, text).await),
                            None => None,
                        };
                        meter.settle();
                        handled
                    }
                    Read::Control => None,
                    Read::End(ending) => break ending,
                };
                match handled {
                    Some(Received::Status) if !admitted => {
                        admitted = true;
                        if let Err(reason) = limits::admit(&app, &session).await {
                            break Ending::closing(4003, reason);
                        }
                    }
                    Some(Received::Refused(reason)) => break Ending::closing(1008, reason),
                    _ => {}
                }
            }
        }
    };
    if let Some((code, reason)) = &ending.close {
        // A close reason is at most 123 bytes.
        let reason: String = reason
            .chars()
            .scan(0, |len, c| {
                *len += c.len_utf8();
                (*len <= 120).then_some(c)
            })
            .collect();
        let close = CloseFrame {
            code: CloseCode::from(*code),
            reason: reason.into(),
        };
        let _ = sink.send(Message::Close(Some(close))).await;
    }
    if app.shutdown.is_cancelled() {
        drain(&mut stream, &meter, &app, &session, socket_id, &tx).await;
    }
    if ending
        .close
        .as_ref()
        .is_some_and(|(code, _)| matches!(code, 1008 | 1009 | 1013))
    {
        tracing::warn!(bucket = %bucket_id, server = %server_name, socket = socket_id, reason = %ending.reason, "agent refused");
    }
    let mut points = Vec::new();
    app.sessions
        .detach(&session, socket_id, now_ms(), &mut points);
    app.ingest.writer.metrics(points);
    // Offline now: its last state is saved at once (other processes show it from there).
    if !session.online()
        && let Some(record) = session.record(now_ms())
        && let Err(e) = app.documents.upsert_servers(&[record]).await
    {
        tracing::warn!(error = %e, server = %server_name, "cannot save the server's last state");
    }
    crate::realtime::presence::socket_ended(&app, &session);
    tracing::info!(bucket = %bucket_id, server = %server_name, socket = socket_id, reason = %ending.reason, "agent disconnected");
}

/// Asks an agent to send its logs when its bucket collects them: agents send logs only
/// when asked, for 120 s, and forget it when they restart ([`LOGS_FIRST_ASKED_AFTER`] an
/// admitted socket opened, then every [`LOGS_RENEWED_EVERY`]). The request goes on the
/// socket the agent sends on, as commands do.
async fn ask_for_logs(app: &AppState, session: &Session) {
    let bucket_id = &*session.bucket_id;
    match BucketSettings::load(app.documents.as_ref(), bucket_id).await {
        Ok(settings) if settings.collect_logs => {
            let (channel, payload) = logging_command(true);
            if session.send(frames::encode(channel, &payload)) != Delivery::Sent {
                tracing::debug!(bucket = %bucket_id, "logs not asked for: the agent's outbox is full");
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, bucket = %bucket_id, "logs not asked for: the bucket's settings do not read")
        }
    }
}

/// Handles one frame: a large one off the async workers (parsing 100 MB takes a worker
/// for a second in release, several in debug builds), so that other agents and the API
/// are served meanwhile.
async fn handle(
    app: &AppState,
    session: &Arc<Session>,
    socket_id: u64,
    tx: &mpsc::Sender<String>,
    text: Utf8Bytes,
) -> Received {
    if text.len() <= INLINE_FRAME_BYTES {
        return receive(app, session, socket_id, tx, text.as_str());
    }
    let (app, session, tx) = (app.clone(), session.clone(), tx.clone());
    tokio::task::spawn_blocking(move || receive(&app, &session, socket_id, &tx, text.as_str()))
        .await
        .unwrap_or(Received::Other)
}

/// After km's close at shutdown: handles what the agent sent until it answers the close,
/// the connection ends or [`DRAIN_LIMIT`] passes.
async fn drain(
    stream: &mut futures_util::stream::SplitStream<AgentSocket>,
    meter: &Meter,
    app: &AppState,
    session: &Session,
    socket_id: u64,
    tx: &mpsc::Sender<String>,
) {
    let deadline = Instant::now() + DRAIN_LIMIT;
    while let Ok(message) = tokio::time::timeout_at(deadline, stream.next()).await {
        match read(app, message) {
            Read::Data(text) => {
                if let Some(text) = text {
                    receive(app, session, socket_id, tx, text.as_str());
                }
                meter.settle();
            }
            Read::Control => {}
            Read::End(_) => break,
        }
    }
}

/// What one read of an agent socket gave.
enum Read {
    /// A data message: its text, or `None` for binary that is not UTF-8 (counted). What
    /// it reserved of the in-flight budget goes back once it was handled; control frames
    /// may come between the fragments of one and give nothing back.
    Data(Option<Utf8Bytes>),
    Control,
    End(Ending),
}

fn read(app: &AppState, message: Option<Result<Message, WsError>>) -> Read {
    match message {
        Some(Ok(Message::Text(text))) => Read::Data(Some(text)),
        Some(Ok(Message::Binary(bytes))) => {
            let text = Utf8Bytes::try_from(bytes).ok();
            if text.is_none() {
                app.ingest.count_malformed();
            }
            Read::Data(text)
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Read::Control,
        Some(Ok(Message::Close(_))) | None => Read::End(Ending::quiet("closed by agent")),
        Some(Err(e)) => Read::End(read_failed(app, &e)),
    }
}

/// A read error: over a budget (counted, closed with its code), or the connection failed.
fn read_failed(app: &AppState, error: &WsError) -> Ending {
    use std::sync::atomic::Ordering::Relaxed;
    let counters = &app.ingest.counters;
    match error {
        WsError::Capacity(e) => {
            counters.frames_too_large.fetch_add(1, Relaxed);
            Ending::closing(
                1009,
                format!("frame refused: {e} (at most {MAX_FRAME_BYTES} bytes)"),
            )
        }
        WsError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<BudgetSpent>()) => {
            counters.frames_refused_busy.fetch_add(1, Relaxed);
            Ending::closing(1013, format!("frame refused: {e}; try again later"))
        }
        _ => Ending::quiet("read failed"),
    }
}

/// What became of a frame.
pub enum Received {
    /// A full status, applied.
    Status,
    /// Anything else handled (or dropped and counted).
    Other,
    /// Over a budget: the socket is closed with this reason.
    Refused(String),
}

/// Handles one text frame from an agent; never fails the socket but for a status over
/// its budgets.
pub fn receive(
    app: &AppState,
    session: &Session,
    socket_id: u64,
    tx: &mpsc::Sender<String>,
    text: &str,
) -> Received {
    let now = now_ms();
    let inbound = match frames::decode(text) {
        Ok(inbound) => inbound,
        Err(e) => {
            tracing::debug!(server = %session.server_name, error = %e, "frame dropped");
            app.ingest.count_malformed();
            return Received::Other;
        }
    };
    session.mark_data(socket_id, now);
    let watched = app.bus.watched(&session.bucket_id);
    match inbound {
        Inbound::Status(payload) => match app.ingest.apply_status(session, payload, now) {
            Ok(()) => {
                if watched {
                    publish(app, session, "status", payload);
                }
                return Received::Status;
            }
            Err(StatusRefusal::Over(over)) => {
                return Received::Refused(format!("status refused: {over}"));
            }
            Err(StatusRefusal::Malformed) => {}
        },
        Inbound::StatusPatch(payload) => match app.ingest.apply_patch(session, payload, now) {
            Ok(()) => {
                if watched {
                    publish_patch(app, session, payload);
                }
            }
            Err(failure) => {
                if let PatchFailure::Over(over) = &failure
                    && session.may_log_refusal(now)
                {
                    tracing::warn!(bucket = %session.bucket_id, server = %session.server_name, reason = %over, "status patch refused");
                }
                // The agent answers with a full status.
                let _ = tx.try_send(frames::STATUS_RESEND.to_string());
            }
        },
        Inbound::Other { channel, payload } => {
            if watched {
                publish(app, session, &channel, payload);
            }
            let origin = Origin {
                bucket_id: &session.bucket_id,
                server_name: &session.server_name,
                now,
            };
            if channel == "trace-span" {
                let stored = app.ingest.span(frames::to_span(&origin, payload));
                if let Err(refused) = stored
                    && session.may_log_refusal(now)
                {
                    tracing::warn!(bucket = %session.bucket_id, server = %session.server_name, reason = %refused, "span refused");
                }
            } else {
                app.ingest
                    .event(frames::to_event(&origin, &channel, payload));
            }
        }
    }
    Received::Other
}

/// Hands an agent's event to the browsers watching its bucket.
fn publish(app: &AppState, session: &Session, event: &str, payload: &str) {
    app.bus.publish_live(live_event(session, event, payload));
}

fn live_event(session: &Session, event: &str, payload: &str) -> LiveEvent {
    LiveEvent::new(&session.bucket_id, &session.server_name, event, payload)
}

/// Hands an applied patch to the browsers watching its bucket: as is, and rendered into
/// the whole status for the watchers that want that.
fn publish_patch(app: &AppState, session: &Session, patch: &str) {
    publish(app, session, "status:patch", patch);
    if app.bus.rendering(&session.bucket_id)
        && let Some(status) = session.status_text()
    {
        let mut event = live_event(session, "status", &status);
        event.rendered = true;
        app.bus.publish_live(event);
    }
}
