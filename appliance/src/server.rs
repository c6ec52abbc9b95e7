//! `km serve`: opens the stores, starts every role in this process on one port (plus the
//! HTTPS port when TLS is on, see [`crate::gateway`]), and on SIGTERM/Ctrl-C closes agent
//! sockets and flushes everything before exiting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::app::{App, AppState};
use crate::config::Settings;
use crate::gateway::{self, Gateway, HttpsBase};
use crate::ingest::{EventWriter, Ingest};
use crate::interactor::Sessions;
use crate::realtime::LiveHub;
use crate::stores::elastic::ElasticEvents;
use crate::stores::mongo::MongoDocuments;
use crate::stores::redis_bus::RedisBus;
use crate::stores::{self, LocalBus};
use crate::workers;

/// Runs until a stop signal, then flushes.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("KM_LISTEN: cannot listen on {}", settings.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    serve_on(listener, settings, shutdown).await
}

/// Runs on an already bound listener until `shutdown` is cancelled (tests bind port 0).
pub async fn serve_on(
    listener: TcpListener,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bound = listener.local_addr().context("listener has no address")?;
    let https_listener = gateway::bind_https(&settings)?;
    let https_bound = https_listener
        .as_ref()
        .map(std::net::TcpListener::local_addr)
        .transpose()
        .context("KM_HTTPS_LISTEN: listener has no address")?;
    let (app, writer_task) = build_app(settings, bound, shutdown.clone()).await?;
    let mut background = vec![
        tokio::spawn(workers::persist(app.clone())),
        tokio::spawn(workers::retention(app.clone())),
    ];
    background.extend(app.gateway.spawn_tasks(shutdown.clone()));
    if app.gateway.is_tls() && !app.public_url.starts_with("https://") {
        tracing::warn!(
            url = %app.public_url,
            "KM_TLS is on but KM_SITE_URL is not an https:// URL: agents are told to connect to {}, which redirects",
            app.public_url
        );
    }
    if app.settings.site_url.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(
            url = %app.public_url,
            "KM_SITE_URL is not set: agents are told to connect to {}; set KM_SITE_URL to the URL other hosts reach",
            app.public_url
        );
    }
    tracing::info!(listen = %bound, https = ?https_bound, url = %app.public_url, data_dir = %app.settings.data_dir.display(), "km ready");

    // Every route on both ports; with TLS the plain port redirects all but a few.
    let routes = api::router(app.clone());
    let plain_routes = match https_bound {
        Some(https) => gateway::redirecting(
            routes.clone(),
            HttpsBase::new(app.settings.site_url.as_deref(), https.port()),
        ),
        None => routes.clone(),
    };
    let stopping = shutdown.clone();
    let plain = async {
        // The peer address goes to the wizard behind `/wizard/` (its per-address limit).
        axum::serve(
            listener,
            plain_routes.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stopping.cancelled().await })
        .await
        .context("HTTP server failed")
    };
    let secure = async {
        match https_listener {
            Some(https) => {
                gateway::serve_https(app.gateway.clone(), https, routes, shutdown.clone()).await
            }
            None => Ok(()),
        }
    };
    tokio::try_join!(plain, secure)?;

    // Sockets see the cancellation and close; give them a moment to detach.
    for _ in 0..20 {
        if app.sessions.sockets_open() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in background {
        let _ = task.await;
    }
    workers::flush(&app).await;
    drop(app);
    let _ = writer_task.await;
    tracing::info!("km stopped; everything flushed");
    Ok(())
}

/// Opens the stores and assembles the shared state; the writer task ends after the last
/// `AppState` is dropped.
pub async fn build_app(
    settings: Settings,
    bound: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<(AppState, JoinHandle<()>)> {
    // First: a certificate that does not load stops km before the stores are opened.
    let gateway = Gateway::new(&settings)?;
    let documents: Arc<dyn stores::Documents> = match &settings.mongo_url {
        Some(url) => Arc::new(MongoDocuments::connect(url).await?),
        None => Arc::new(stores::sqlite::open_documents(&settings.data_dir)?),
    };
    let events: Arc<dyn stores::Events> = if settings.elasticsearch.is_empty() {
        Arc::new(stores::sqlite::open_events(&settings.data_dir)?)
    } else {
        Arc::new(
            ElasticEvents::connect(&settings.elasticsearch, &settings.elasticsearch_prefix).await?,
        )
    };
    let sessions = Arc::new(Sessions::default());
    sessions.restore(
        documents
            .all_servers()
            .await
            .context("documents store: cannot load servers")?,
    );
    let live = Arc::new(LiveHub::default());
    let bus: Arc<dyn stores::Bus> = match &settings.redis_url {
        Some(url) => {
            RedisBus::connect(url, sessions.clone(), live.clone(), shutdown.clone()).await?
        }
        None => Arc::new(LocalBus::new(sessions.clone(), live.clone())),
    };
    let (writer, writer_task) = EventWriter::start(events.clone());
    let app = Arc::new(App {
        public_url: settings.public_url(bound),
        settings,
        documents,
        events,
        bus,
        live,
        sessions,
        ingest: Ingest::new(writer),
        gateway,
        shutdown,
    });
    Ok((app, writer_task))
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("stop requested: closing agent sockets and flushing");
    shutdown.cancel();
}
