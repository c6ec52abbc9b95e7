//! One simulated PM2 agent: verifyPM2, the websocket, a frame every second.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::frames::{ServerSim, Templates};
use crate::stats::{ErrorLog, Stats, root_cause};

pub const AGENT_VERSION: &str = "7.0.4";
pub const USER_AGENT: &str = "PM2 Agent v7.0.4";

/// What a latency probe hands to a server: the server puts a marker into its next
/// frame and answers with (marker uptime in ms, instant the frame was sent).
pub type ProbeReply = oneshot::Sender<(u64, Instant)>;

/// Per-server state visible to the other tasks.
#[derive(Debug, Default)]
pub struct Slot {
    pub connected: AtomicBool,
    pub probe_pending: AtomicBool,
    pub probe: Mutex<Option<ProbeReply>>,
}

/// Everything the server tasks share.
pub struct Ctx {
    pub target: String,
    pub public: String,
    pub secret: String,
    pub name_prefix: String,
    pub servers: usize,
    pub logs_per_s: f64,
    /// Time between two statuses of one server (a real agent: 1 s).
    pub status_every: Duration,
    pub bad_patch_every: u64,
    pub http: reqwest::Client,
    pub tpl: Templates,
    pub stats: Stats,
    pub errors: ErrorLog,
    pub slots: Vec<Slot>,
    /// Bounds verifyPM2 + websocket handshakes in flight.
    pub handshakes: Semaphore,
    /// Ticks of server i fall at `epoch + (i/servers + k) × status_every`.
    pub epoch: Instant,
    pub ws_config: WebSocketConfig,
}

impl Ctx {
    pub fn server_name(&self, i: usize) -> String {
        format!("{}-{i}", self.name_prefix)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a verifyPM2 call went wrong.
pub enum VerifyError {
    /// Network trouble or an unusable answer: worth a retry.
    Retry(String),
    /// The server answered but does not let this agent in: the run stops.
    Refused(String),
}

/// `POST {target}/api/node/verifyPM2` as the agent does; returns `endpoints.ws`.
pub async fn verify(ctx: &Ctx, name: &str) -> Result<String, VerifyError> {
    let url = format!("{}/api/node/verifyPM2", ctx.target);
    let body = serde_json::json!({
        "public_id": ctx.public,
        "private_id": ctx.secret,
        "data": {
            "MACHINE_NAME": name,
            "PUBLIC_KEY": ctx.public,
            "RECYCLE": false,
            "PM2_VERSION": AGENT_VERSION,
            "MEMORY": 25276.514304,
            "HOSTNAME": name,
            "CPUS": [
                {"model": "AMD EPYC", "speed": 0,
                 "times": {"user": 123000, "nice": 0, "sys": 32860, "idle": 275850, "irq": 0}},
                {"model": "AMD EPYC", "speed": 0,
                 "times": {"user": 165440, "nice": 0, "sys": 43430, "idle": 217110, "irq": 0}}
            ]
        }
    });
    let resp = ctx
        .http
        .post(&url)
        .header(reqwest::header::USER_AGENT, USER_AGENT)
        .json(&body)
        .send()
        .await
        .map_err(|e| VerifyError::Retry(format!("verifyPM2 at {url}: {}", root_cause(&e))))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| VerifyError::Retry(format!("verifyPM2 at {url}: {}", root_cause(&e))))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| {
        VerifyError::Retry(format!(
            "verifyPM2 at {url}: answer is not JSON (HTTP {status}): {}",
            excerpt(&text)
        ))
    })?;
    if v.get("active") != Some(&serde_json::Value::Bool(true)) {
        let msg = v
            .get("msg")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| excerpt(&text));
        return Err(VerifyError::Refused(format!(
            "verifyPM2 at {url} for {name}: not active (HTTP {status}): {msg}"
        )));
    }
    match v.pointer("/endpoints/ws").and_then(|w| w.as_str()) {
        Some(ws) if ws.starts_with("ws://") => Ok(ws.to_string()),
        Some(ws) if ws.starts_with("wss://") => Err(VerifyError::Refused(format!(
            "verifyPM2 at {url}: endpoints.ws is {ws}, but km-loadgen has no TLS: run the \
             appliance with a plain ws:// endpoint"
        ))),
        Some(ws) => Err(VerifyError::Refused(format!(
            "verifyPM2 at {url}: endpoints.ws {ws:?} is not a ws:// URL"
        ))),
        None => Err(VerifyError::Retry(format!(
            "verifyPM2 at {url}: active but no endpoints.ws in {}",
            excerpt(&text)
        ))),
    }
}

fn excerpt(s: &str) -> String {
    let s = s.trim();
    if s.len() <= 300 {
        return s.to_string();
    }
    let mut end = 300;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens the agent's websocket with its upgrade headers.
async fn open(ctx: &Ctx, ws_url: &str, name: &str) -> Result<Ws, String> {
    let mut req = ws_url
        .into_client_request()
        .map_err(|e| format!("websocket {ws_url}: bad URL: {e}"))?;
    let h = req.headers_mut();
    let val = |s: &str| {
        HeaderValue::from_str(s).map_err(|_| format!("websocket {ws_url}: bad header value {s:?}"))
    };
    h.insert("X-KM-PUBLIC", val(&ctx.public)?);
    h.insert("X-KM-SECRET", val(&ctx.secret)?);
    h.insert("X-KM-SERVER", val(name)?);
    h.insert("X-PM2-VERSION", HeaderValue::from_static(AGENT_VERSION));
    h.insert("X-PROTOCOL-VERSION", HeaderValue::from_static("1"));
    h.insert("User-Agent", HeaderValue::from_static(USER_AGENT));
    match tokio_tungstenite::connect_async_with_config(req, Some(ctx.ws_config), true).await {
        Ok((ws, _resp)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| excerpt(&String::from_utf8_lossy(b)))
                .unwrap_or_default();
            Err(format!(
                "websocket upgrade at {ws_url} for {name} refused: HTTP {} {body}",
                resp.status()
            ))
        }
        Err(e) => Err(format!("websocket {ws_url} for {name}: {}", root_cause(&e))),
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs server `i` until the stop signal: verify, connect, send, reconnect.
pub async fn run_server(ctx: Arc<Ctx>, i: usize, mut stop: watch::Receiver<bool>) {
    let name = ctx.server_name(i);

    // verifyPM2 and the first handshake, a few tries each
    let permit = tokio::select! {
        p = ctx.handshakes.acquire() => p.ok(),
        _ = stopped(&mut stop) => return,
    };
    let mut ws_url = None;
    for attempt in 1..=3u64 {
        let r = tokio::select! {
            r = verify(&ctx, &name) => r,
            _ = stopped(&mut stop) => return,
        };
        match r {
            Ok(url) => {
                ws_url = Some(url);
                break;
            }
            Err(VerifyError::Refused(msg)) => {
                eprintln!("km-loadgen: {msg}");
                std::process::exit(1);
            }
            Err(VerifyError::Retry(msg)) => {
                if attempt == 3 {
                    ctx.errors.report("verifyPM2", || msg);
                } else {
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
    }
    let Some(ws_url) = ws_url else {
        Stats::add(&ctx.stats.failed, 1);
        return;
    };

    let mut sim = ServerSim::new(i, &name, &ctx.tpl, now_ms());
    let mut first_ws = Some(permit);
    let mut tries = 0u64;
    let mut ever = false;
    loop {
        let r = tokio::select! {
            r = open(&ctx, &ws_url, &name) => r,
            _ = stopped(&mut stop) => return,
        };
        // the handshake permit is held until the first websocket is up (or failed)
        first_ws.take();
        match r {
            Ok(ws) => {
                tries = 0;
                if !ever {
                    ever = true;
                    Stats::add(&ctx.stats.ever_connected, 1);
                }
                ctx.stats.connected.fetch_add(1, Relaxed);
                ctx.slots[i].connected.store(true, Relaxed);
                let end = session(&ctx, i, &mut sim, ws, &mut stop).await;
                ctx.slots[i].connected.store(false, Relaxed);
                ctx.stats.connected.fetch_sub(1, Relaxed);
                match end {
                    SessionEnd::Stopped => return,
                    SessionEnd::Lost(why) => {
                        Stats::add(&ctx.stats.disconnects, 1);
                        ctx.errors.report("disconnect", || {
                            format!("{name}: {why}; reconnecting in 1 s")
                        });
                    }
                }
            }
            Err(msg) => {
                tries += 1;
                if !ever && tries >= 3 {
                    ctx.errors.report("websocket", || msg);
                    Stats::add(&ctx.stats.failed, 1);
                    return;
                }
                if ever {
                    Stats::add(&ctx.stats.reconnect_failures, 1);
                    ctx.errors.report("reconnect", || msg);
                }
            }
        }
        let delay = Duration::from_millis(1000 * tries.clamp(1, 5));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

enum SessionEnd {
    Stopped,
    Lost(String),
}

/// The connected phase: one frame (plus logs) per second at this server's phase,
/// a ping every 5 s, `status:resend` honoured.
async fn session(
    ctx: &Ctx,
    i: usize,
    sim: &mut ServerSim,
    mut ws: Ws,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let stats = &ctx.stats;
    let every = ctx.status_every;
    let phase = every.mul_f64(i as f64 / ctx.servers.max(1) as f64);
    let now = Instant::now();
    let since = now.saturating_duration_since(ctx.epoch + phase);
    let periods = (since.as_secs_f64() / every.as_secs_f64()).floor() + 1.0;
    let first_tick = ctx.epoch + phase + every.mul_f64(periods);
    let mut tick = tokio::time::interval_at(first_tick.into(), every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut ping = tokio::time::interval_at(
        (now + Duration::from_secs(5)).into(),
        Duration::from_secs(5),
    );
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);

    // the first status on every new socket is a full one
    let mut need_full = true;
    let mut log_credit = 0.0f64;
    let mut frame_cap = 4096;
    let mut patches = 0u64;
    let slot = &ctx.slots[i];

    loop {
        tokio::select! {
            _ = tick.tick() => {
                let is_full = need_full;
                let bad = !is_full
                    && ctx.bad_patch_every > 0
                    && (patches + 1).is_multiple_of(ctx.bad_patch_every);
                // a probe waiting for this server gets its marker into this frame
                let probe = if !bad && slot.probe_pending.load(Relaxed) {
                    slot.probe.lock().ok().and_then(|mut p| {
                        slot.probe_pending.store(false, Relaxed);
                        p.take()
                    })
                } else {
                    None
                };
                let mut out = String::with_capacity(frame_cap);
                let marker = sim.step(&ctx.tpl, probe.is_some(), &mut out);
                if is_full {
                    out.clear();
                    sim.write_full(&mut out);
                    need_full = false;
                } else {
                    frame_cap = frame_cap.max(out.len() + 256);
                    patches += 1;
                    if bad {
                        // a process that does not exist: the patch cannot apply
                        out.clear();
                        out.push_str(r#"{"channel":"status:patch","payload":[{"op":"replace","path":"/data/process/"#);
                        crate::frames::push_u64(&mut out, 1000 + ctx.tpl.processes() as u64);
                        out.push_str(r#"/cpu","value":1}]}"#);
                    }
                }
                let len = out.len() as u64;
                let sent_at = Instant::now();
                if let Err(e) = ws.send(Message::Text(out.into())).await {
                    Stats::add(&stats.send_errors, 1);
                    // a probe is dropped with its sender: it counts as aborted
                    return SessionEnd::Lost(format!("send failed: {}", root_cause(&e)));
                }
                if let (Some(p), Some(m)) = (probe, marker) {
                    let _ = p.send((m, sent_at));
                }
                Stats::add(&stats.frames_sent, 1);
                Stats::add(&stats.bytes_sent, len);
                if is_full {
                    Stats::add(&stats.status_frames, 1);
                } else if bad {
                    Stats::add(&stats.bad_patches, 1);
                } else {
                    Stats::add(&stats.patch_frames, 1);
                    Stats::add(&stats.patch_bytes, len);
                }

                log_credit += ctx.logs_per_s * every.as_secs_f64();
                while log_credit >= 1.0 {
                    log_credit -= 1.0;
                    let mut out = String::with_capacity(256);
                    sim.write_log(&ctx.tpl, now_ms(), &mut out);
                    let len = out.len() as u64;
                    if let Err(e) = ws.send(Message::Text(out.into())).await {
                        Stats::add(&stats.send_errors, 1);
                        return SessionEnd::Lost(format!("send failed: {}", root_cause(&e)));
                    }
                    Stats::add(&stats.frames_sent, 1);
                    Stats::add(&stats.bytes_sent, len);
                    Stats::add(&stats.log_frames, 1);
                }
            }
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::Ping(Default::default())).await {
                    return SessionEnd::Lost(format!("ping failed: {}", root_cause(&e)));
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    Stats::add(&stats.frames_received, 1);
                    if is_resend(t.as_str()) {
                        Stats::add(&stats.resends, 1);
                        need_full = true;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let why = frame
                        .map(|f| format!("closed by the server ({} {})", f.code, f.reason))
                        .unwrap_or_else(|| "closed by the server".to_string());
                    return SessionEnd::Lost(why);
                }
                Some(Ok(_)) => {} // pongs, pings (answered by tungstenite), binary
                Some(Err(e)) => return SessionEnd::Lost(root_cause(&e)),
                None => return SessionEnd::Lost("connection closed by the server".to_string()),
            },
            _ = stopped(stop) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return SessionEnd::Stopped;
            }
        }
    }
}

/// Is this server frame a `status:resend`?
pub fn is_resend(text: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        channel: Option<std::borrow::Cow<'a, str>>,
    }
    matches!(
        serde_json::from_str::<Head>(text),
        Ok(Head { channel: Some(c) }) if c == "status:resend"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resend_detection() {
        assert!(is_resend(r#"{"channel":"status:resend"}"#));
        assert!(is_resend(r#"{"channel":"status:resend","payload":{}}"#));
        assert!(is_resend(
            r#"{"payload":null,"channel":"status\u003aresend"}"#
        ));
        assert!(!is_resend(
            r#"{"channel":"trigger:pm2:action","payload":{"x":"status:resend"}}"#
        ));
        assert!(!is_resend("status:resend"));
    }
}
