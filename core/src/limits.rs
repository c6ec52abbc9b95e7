//! The licence's process limit (the seeds' limit worker). Every process instance an
//! agent reports counts, cluster instances each (the agent itself leaves out `pm2
//! unmonitor`ed processes), except the free modules pm2-logrotate and pm2-auto-pull.
//!
//! A server that links while the appliance is at its limit is parked after its first
//! status, when its processes are known: its socket closes and verifyPM2 answers
//! `active:false` with the reason. The agent re-verifies every 60 s; it is let in again
//! as soon as its processes fit, or for a try once a minute while there is room at all.
//! Servers already connected keep working. Without a licence (development) nothing is
//! limited.

use serde::Serialize;

use crate::app::App;
use km_ingest::session::Session;
use km_stores::ids::now_ms;
use km_stores::{ParkedServer, ServerProcesses, StoreResult};

/// A parked server whose processes did not fit may try again this long after.
const RETRY_AFTER_MS: i64 = 55_000;

/// What the licence allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Limit {
    /// No licence installed (development): nothing is limited.
    Unlicensed,
    Unlimited,
    Processes {
        max: u32,
    },
    /// The licence is expired or not valid: no new server is let in.
    Invalid {
        reason: String,
    },
}

/// The licence's signature is checked at most once a minute: a reconnect storm asks for
/// the limit once per server (an Ed25519 verification each).
const RECHECK_S: i64 = 60;

/// The limit as last checked, and when (epoch seconds).
#[derive(Default)]
pub struct LimitCache(parking_lot::Mutex<Option<(i64, Limit)>>);

impl Limit {
    pub fn of(app: &App) -> Limit {
        let now_s = now_ms() / 1000;
        let mut cache = app.limit.0.lock();
        match &*cache {
            Some((at, limit)) if (0..RECHECK_S).contains(&(now_s - at)) => limit.clone(),
            _ => {
                let limit = Limit::checked(&app.settings, now_s);
                *cache = Some((now_s, limit.clone()));
                limit
            }
        }
    }

    fn checked(settings: &km_config::Settings, now_s: i64) -> Limit {
        match settings.licence(now_s) {
            None => Limit::Unlicensed,
            Some(Ok(licence)) => match licence.max_processes() {
                Some(max) => Limit::Processes { max },
                None => Limit::Unlimited,
            },
            Some(Err(e)) => Limit::Invalid {
                reason: format!("the licence is not valid: {e}"),
            },
        }
    }

    /// The most processes allowed; `None` without a limit.
    fn max(&self) -> Option<u32> {
        match self {
            Limit::Unlicensed | Limit::Unlimited => None,
            Limit::Processes { max } => Some(*max),
            Limit::Invalid { .. } => Some(0),
        }
    }
}

/// The processes in use across the appliance and what the licence allows.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub processes: u32,
    pub limit: Limit,
    pub parked: Vec<Parked>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Parked {
    pub bucket_id: String,
    pub server_name: String,
    pub reason: String,
    pub processes: u32,
    pub parked_at: i64,
}

impl From<ParkedServer> for Parked {
    fn from(p: ParkedServer) -> Self {
        Parked {
            bucket_id: p.bucket_id,
            server_name: p.server_name,
            reason: p.reason,
            processes: p.processes,
            parked_at: p.parked_at,
        }
    }
}

/// The processes of every connected server, on every node, except `except`.
async fn in_use(app: &App, except: Option<(&str, &str)>) -> StoreResult<u32> {
    let local = app.sessions.processes_in_use(except);
    let mut remote = app.bus.remote_processes().await?;
    remote.retain(|s| except != Some((s.bucket_id.as_str(), s.server_name.as_str())));
    // A server that just moved between nodes may be reported by both: once is enough.
    remote.sort_by(|a, b| {
        (&a.bucket_id, &a.server_name, b.processes).cmp(&(
            &b.bucket_id,
            &b.server_name,
            a.processes,
        ))
    });
    remote.dedup_by(|a, b| a.bucket_id == b.bucket_id && a.server_name == b.server_name);
    let remote: u64 = remote
        .iter()
        .map(|s: &ServerProcesses| {
            let here = app
                .sessions
                .get(&s.bucket_id, &s.server_name)
                .filter(|session| session.online())
                .and_then(|session| session.counted_processes())
                .unwrap_or(0);
            u64::from(s.processes.saturating_sub(here))
        })
        .sum();
    Ok(u32::try_from(local + remote).unwrap_or(u32::MAX))
}

/// The appliance's usage (the parked servers of `bucket_id` only, if given).
pub async fn usage(app: &App, bucket_id: Option<&str>) -> StoreResult<Usage> {
    Ok(Usage {
        processes: in_use(app, None).await?,
        limit: Limit::of(app),
        parked: app
            .documents
            .parked_servers(bucket_id)
            .await?
            .into_iter()
            .map(Parked::from)
            .collect(),
    })
}

/// On a server's first status after it connected: `Err(reason)` when it does not fit
/// (it is then parked), else it is let in (and no longer parked).
pub async fn admit(app: &App, session: &Session) -> Result<(), String> {
    let (bucket, server) = (&*session.bucket_id, &*session.server_name);
    let limit = Limit::of(app);
    let Some(max) = limit.max() else {
        unpark(app, bucket, server).await;
        return Ok(());
    };
    let mine = session.counted_processes().unwrap_or(0);
    // The tallies first: one read whatever the fleet (a reconnect storm admits every
    // server). They count a server that moved twice, never one twice too few: fitting
    // there is fitting. (They lag by a heartbeat, 2 s, as the exact count lags statuses.)
    if let Ok(remote) = app.bus.remote_tally().await {
        let local = app.sessions.processes_in_use(Some((bucket, server)));
        if local + remote + u64::from(mine) <= u64::from(max) {
            unpark(app, bucket, server).await;
            return Ok(());
        }
    }
    let others = match in_use(app, Some((bucket, server))).await {
        Ok(n) => n,
        Err(e) => {
            // Counting needs the other nodes; a bus outage does not lock agents out.
            tracing::warn!(error = %e, "process limit: cannot count the processes in use; server let in");
            return Ok(());
        }
    };
    if others.saturating_add(mine) <= max {
        unpark(app, bucket, server).await;
        return Ok(());
    }
    let reason = match limit {
        Limit::Invalid { reason } => reason,
        _ => format!(
            "the licence allows {max} processes; {others} are in use and this server has {mine}: \
             remove or `pm2 unmonitor` processes, or install a larger licence"
        ),
    };
    let parked = ParkedServer {
        bucket_id: bucket.to_string(),
        server_name: server.to_string(),
        reason: reason.clone(),
        processes: mine,
        parked_at: now_ms(),
    };
    if let Err(e) = app.documents.park_server(&parked).await {
        tracing::error!(error = %e, "process limit: cannot record the parked server");
    }
    tracing::warn!(
        bucket,
        server,
        processes = mine,
        in_use = others,
        max,
        "server parked: over the licence's process limit"
    );
    Err(reason)
}

/// Before a parked server connects (verifyPM2, the websocket handshake): `Err(reason)`
/// while it may not.
pub async fn may_connect(app: &App, bucket_id: &str, server_name: &str) -> Result<(), String> {
    let parked = match app.documents.parked_servers(Some(bucket_id)).await {
        Ok(parked) => parked.into_iter().find(|p| p.server_name == server_name),
        Err(e) => {
            tracing::warn!(error = %e, "process limit: cannot read the parked servers");
            None
        }
    };
    let Some(parked) = parked else {
        return Ok(());
    };
    let Some(max) = Limit::of(app).max() else {
        return Ok(());
    };
    let others = in_use(app, Some((bucket_id, server_name)))
        .await
        .unwrap_or(0);
    let fits = others.saturating_add(parked.processes) <= max;
    // Its processes may have changed since: with room at all, a try once a minute.
    let may_try = others < max && now_ms() - parked.parked_at >= RETRY_AFTER_MS;
    if fits || may_try {
        Ok(())
    } else {
        Err(parked.reason)
    }
}

async fn unpark(app: &App, bucket_id: &str, server_name: &str) {
    match app.documents.unpark_server(bucket_id, server_name).await {
        Ok(true) => tracing::info!(
            bucket = bucket_id,
            server = server_name,
            "server let in: within the licence's process limit"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "process limit: cannot clear a parked server"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_licence_lets_nothing_new_in() {
        let invalid = Limit::Invalid {
            reason: "expired".into(),
        };
        assert_eq!(invalid.max(), Some(0));
        assert_eq!(Limit::Unlicensed.max(), None);
        assert_eq!(Limit::Processes { max: 2 }.max(), Some(2));
    }
}
