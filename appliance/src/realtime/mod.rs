//! The realtime role: `/primus`, the websocket of `@pm2/js-api` and the dashboard.
//!
//! The client authenticates at the upgrade (`?token=<access token>`, or the dashboard's
//! session cookie from a page of this site), then sends
//! `{"action":"sub","public_id":…,"filters":[…]}` for each bucket it watches. Every event
//! of those buckets' agents comes back as `{"data":[<event>, {"server_name":…,<event>:payload}]}`.
//!
//! An agent's `status:patch` goes out as is. A client whose filters name `status:patch`
//! applies the patches itself (the dashboard): it gets `status` only when an agent sends a
//! whole one. Every other client that wants `status` (what `@pm2/js-api` users listen
//! to) gets the whole status after each patch, rendered once for all of them.
//! The token and the memberships are checked again every few seconds while the socket
//! lives.

pub mod presence;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::header::{HOST, ORIGIN};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use parking_lot::RwLock;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use km_stores::LiveEvent;

use crate::auth::{self, UserAuth};
use crate::error::ApiError;
use km_core::app::AppState;
use km_stores::User;

const PING_EVERY: Duration = Duration::from_secs(20);
/// How often a socket's token and memberships are checked again: a member removed, or a
/// token revoked or expired, stops receiving within this time.
const RECHECK_EVERY: Duration = Duration::from_secs(10);
/// Bursts of frames queued for one browser; beyond this a slow one misses events.
const OUTBOX: usize = 64;
/// How long an event waits for others to go out with it: a bucket of 2,000 servers sends
/// ~2,000 patches a second, and one wake-up and one write per burst cost far less than
/// one per event.
const LINGER: Duration = Duration::from_millis(25);
/// Frames in one burst at most.
const BURST_MAX: usize = 4096;
/// Subscriptions one socket may hold.
const MAX_BUCKETS: usize = 64;

#[derive(Deserialize)]
pub struct Connect {
    token: Option<String>,
}

/// `GET /primus`: the upgrade, refused with 401 without a valid token (the client then
/// refreshes its token and reconnects).
pub async fn primus(
    State(app): State<AppState>,
    Query(connect): Query<Connect>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    match authenticate(&app, connect.token.as_deref(), &headers).await {
        Ok((user, token)) => upgrade.on_upgrade(move |socket| run(socket, app, user, token)),
        Err(e) => e.into_response(),
    }
}

/// The user and the token they connected with (checked again while the socket lives).
async fn authenticate(
    app: &AppState,
    token: Option<&str>,
    headers: &HeaderMap,
) -> Result<(User, String), ApiError> {
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        let user = UserAuth::from_token(app, token, false).await?.user;
        return Ok((user, token.to_string()));
    }
    let cookie = auth::session_cookie(headers).ok_or_else(|| {
        ApiError::unauthorized("missing token: connect to /primus?token=<access_token>")
    })?;
    // A cookie is sent whatever page opens the socket: only this site's pages may use it.
    if !same_origin(headers) {
        return Err(ApiError::forbidden("cross-site websocket refused"));
    }
    let user = UserAuth::from_token(app, cookie, true).await?.user;
    Ok((user, cookie.to_string()))
}

fn same_origin(headers: &HeaderMap) -> bool {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    match (header(ORIGIN), header(HOST)) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority == host),
        _ => false,
    }
}

#[derive(Deserialize)]
struct Subscribe {
    action: String,
    #[serde(default)]
    public_id: String,
    #[serde(default)]
    filters: Vec<String>,
}

/// Which events a subscription wants: everything when empty or a wildcard is given,
/// else exact names and `prefix:*` patterns (what `@pm2/js-api` derives from listeners).
#[derive(Default)]
struct Filters(Vec<String>);

impl Filters {
    /// Whether the client applies `status:patch` itself.
    fn takes_patches(&self) -> bool {
        self.0.iter().any(|f| f == "status:patch")
    }

    /// Whether the client wants a whole status after each patch.
    fn renders(&self) -> bool {
        self.wants("status") && !self.takes_patches()
    }

    fn wants(&self, event: &str) -> bool {
        self.0.is_empty()
            || self.0.iter().any(|f| match f.trim_end_matches('*') {
                prefix if prefix.len() < f.len() => event.starts_with(prefix),
                exact => exact == event,
            })
    }
}

struct Watch {
    filters: Arc<RwLock<Filters>>,
    forward: JoinHandle<()>,
}

async fn run(socket: WebSocket, app: AppState, user: User, token: String) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut outbox) = mpsc::channel::<Vec<String>>(OUTBOX);
    let mut watches: HashMap<String, (String, Watch)> = HashMap::new();
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut recheck =
        tokio::time::interval_at(tokio::time::Instant::now() + RECHECK_EVERY, RECHECK_EVERY);
    loop {
        tokio::select! {
            () = app.shutdown.cancelled() => break,
            _ = recheck.tick() => {
                if !still_signed_in(&app, &token).await {
                    let close = CloseFrame { code: 4001, reason: "token expired or revoked: sign in again".into() };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    break;
                }
                drop_lost_buckets(&app, &user, &mut watches).await;
            },
            burst = outbox.recv() => match burst {
                Some(burst) => if send_burst(&mut sink, burst).await.is_err() { break },
                None => break,
            },
            _ = ping.tick() => if sink.send(Message::Ping(Default::default())).await.is_err() { break },
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Ok(sub) = serde_json::from_str::<Subscribe>(&text) {
                        subscribe(&app, &user, sub, &tx, &mut watches).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    for (_, (bucket_id, watch)) in watches {
        stop(&app, &bucket_id, watch).await;
    }
}

/// Writes a burst of frames at once.
async fn send_burst(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    burst: Vec<String>,
) -> Result<(), axum::Error> {
    for frame in burst {
        sink.feed(Message::Text(frame.into())).await?;
    }
    sink.flush().await
}

async fn stop(app: &AppState, bucket_id: &str, watch: Watch) {
    // Counted out while its receiver still holds the bucket's channel in the hub.
    if watch.filters.read().renders() {
        app.live.renders(bucket_id, false);
    }
    watch.forward.abort();
    let _ = watch.forward.await;
    app.live.release(bucket_id);
}

/// Whether the socket's token still signs its user in (a store outage is not a no).
async fn still_signed_in(app: &AppState, token: &str) -> bool {
    match UserAuth::from_token(app, token, false).await {
        Err(e) => e.status != axum::http::StatusCode::UNAUTHORIZED,
        Ok(_) => true,
    }
}

/// Ends the subscriptions to buckets the user is no longer a member of.
async fn drop_lost_buckets(
    app: &AppState,
    user: &User,
    watches: &mut HashMap<String, (String, Watch)>,
) {
    let mut lost = Vec::new();
    for (public_id, (bucket_id, _)) in watches.iter() {
        if matches!(
            app.documents.member_role(bucket_id, &user.id).await,
            Ok(None)
        ) {
            lost.push(public_id.clone());
        }
    }
    for public_id in lost {
        if let Some((bucket_id, watch)) = watches.remove(&public_id) {
            tracing::debug!(user = %user.username, bucket = %bucket_id, "realtime: no longer a member; subscription ended");
            stop(app, &bucket_id, watch).await;
        }
    }
}

/// Starts (or updates the filters of) a subscription, if the user may see the bucket.
async fn subscribe(
    app: &AppState,
    user: &User,
    sub: Subscribe,
    tx: &mpsc::Sender<Vec<String>>,
    watches: &mut HashMap<String, (String, Watch)>,
) {
    if sub.action != "sub" {
        return;
    }
    let filters = Filters(
        sub.filters
            .into_iter()
            .filter(|f| !f.is_empty() && f != "**")
            .collect(),
    );
    if let Some((bucket_id, watch)) = watches.get(&sub.public_id) {
        let mut held = watch.filters.write();
        if held.renders() != filters.renders() {
            app.live.renders(bucket_id, filters.renders());
        }
        *held = filters;
        return;
    }
    if watches.len() >= MAX_BUCKETS {
        return;
    }
    let Ok(Some(bucket)) = app.documents.bucket_by_public_id(&sub.public_id).await else {
        return;
    };
    if !matches!(
        app.documents.member_role(&bucket.id, &user.id).await,
        Ok(Some(_))
    ) {
        tracing::debug!(user = %user.username, bucket = %bucket.id, "realtime: not a member; nothing sent");
        return;
    }
    let renders = filters.renders();
    let filters = Arc::new(RwLock::new(filters));
    let events = app.live.subscribe(&bucket.id);
    if renders {
        app.live.renders(&bucket.id, true);
    }
    app.bus.watch(&bucket.id).await;
    let forward = tokio::spawn(forward(events, filters.clone(), tx.clone()));
    watches.insert(sub.public_id, (bucket.id, Watch { filters, forward }));
}

/// Copies a bucket's events to the socket's outbox as `@pm2/js-api` frames, in bursts:
/// the first event waits `LINGER` for the others.
async fn forward(
    mut events: broadcast::Receiver<Arc<LiveEvent>>,
    filters: Arc<RwLock<Filters>>,
    tx: mpsc::Sender<Vec<String>>,
) {
    loop {
        let first = match events.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        tokio::time::sleep(LINGER).await;
        let mut burst = Vec::new();
        let mut next = Ok(first);
        loop {
            match next {
                Ok(event) => burst.extend(frame_for(&filters.read(), &event)),
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
            if burst.len() >= BURST_MAX {
                break;
            }
            next = events.try_recv();
        }
        if !burst.is_empty() && tx.try_send(burst).is_err() && tx.is_closed() {
            return;
        }
    }
}

/// The event as the client's frame, if its filters want it.
fn frame_for(filters: &Filters, event: &LiveEvent) -> Option<String> {
    let wanted = filters.wants(&event.event) && !(event.rendered && filters.takes_patches());
    wanted.then(|| {
        let name = serde_json::to_string(&event.event).unwrap_or_default();
        format!("{{\"data\":[{name},{}]}}", event.packet)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_names_and_wildcards() {
        let all = Filters::default();
        assert!(all.wants("status"));
        let some = Filters(vec!["status".into(), "process:*".into()]);
        assert!(some.wants("status"));
        assert!(some.wants("process:exception"));
        assert!(!some.wants("logs"));
        assert!(Filters(vec!["*".into()]).wants("logs"));
        assert!(all.renders() && !all.takes_patches());
        let dashboard = Filters(vec!["*".into(), "status:patch".into()]);
        assert!(dashboard.takes_patches() && !dashboard.renders());
        assert!(!Filters(vec!["logs".into()]).renders());
    }
}
