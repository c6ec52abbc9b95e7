//! The state every role shares in one process: settings, stores, sessions, ingest.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_util::sync::CancellationToken;

use crate::limits::LimitCache;
use km_config::Settings;
use km_ingest::Ingest;
use km_ingest::session::Sessions;
use km_stores::LiveHub;
use km_stores::{Bus, Documents, Events, StoreError, StoreResult};
use km_tls::Tls;

pub struct App {
    pub settings: Settings,
    /// Base URL agents and browsers reach this appliance at (no trailing slash).
    pub public_url: String,
    pub documents: Arc<dyn Documents>,
    pub events: Arc<dyn Events>,
    pub bus: Arc<dyn Bus>,
    /// This node's browsers watching buckets live.
    pub live: Arc<LiveHub>,
    pub sessions: Arc<Sessions>,
    pub ingest: Ingest,
    /// TLS of this node: the certificate served and its renewal (`/healthz` reports it).
    pub tls: Arc<Tls>,
    /// The licence's limit, checked at most once a minute.
    pub limit: LimitCache,
    /// Notification deliveries this process tried, for `/metrics`.
    pub deliveries: Family<Delivery, Counter>,

    /// Cancelled when the process is asked to stop.
    pub shutdown: CancellationToken,
    /// The data dir's shared lock: no restore while km serves.
    pub data_lock: std::fs::File,
}

pub type AppState = Arc<App>;

/// How long a store may take to answer a ping before it counts as down.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// A store's answer to a ping, and how long it took.
pub struct Ping {
    pub store: &'static str,
    pub kind: &'static str,
    pub took: Duration,
    pub answer: StoreResult<()>,
}

impl App {
    /// The documents store and the bus, pinged together (each within [`PING_TIMEOUT`]):
    /// for `/healthz` and `/metrics`.
    pub async fn ping_stores(&self) -> [Ping; 2] {
        let documents = ping("documents", self.documents.kind(), self.documents.ping());
        let bus = ping("bus", self.bus.kind(), self.bus.ping());
        let (documents, bus) = tokio::join!(documents, bus);
        [documents, bus]
    }
}

async fn ping(
    store: &'static str,
    kind: &'static str,
    answer: impl Future<Output = StoreResult<()>>,
) -> Ping {
    let started = Instant::now();
    let answer = tokio::time::timeout(PING_TIMEOUT, answer)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable {
                store,
                reason: format!("no answer within {} s", PING_TIMEOUT.as_secs()),
            })
        });
    Ping {
        store,
        kind,
        took: started.elapsed(),
        answer,
    }
}

/// A delivery attempt: its channel (`email`, `slack`, `webhook`) and outcome (`sent`,
/// `retrying`, `failed`: given up).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Delivery {
    pub channel: &'static str,
    pub outcome: &'static str,
}
