//! `km serve`: opens the stores and starts every role in this process on one port (plus
//! the HTTPS port when TLS is on, see [`crate::gateway`]), or only the roles asked for,
//! each on its own port (`--role`, the appliance's units). Tells systemd when ready, and
//! on SIGTERM/Ctrl-C closes agent sockets and flushes everything before exiting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::gateway::{self, Front, HttpsBase};
use crate::role::Role;
use crate::routes;
use km_config::{Settings, TlsMode, table};
use km_core::app::{App, AppState};
use km_ingest::session::Sessions;
use km_ingest::{EventWriter, Ingest};
use km_stores::LiveHub;
use km_stores::LocalBus;
use km_stores::elastic::ElasticEvents;
use km_stores::mongo::MongoDocuments;
use km_stores::redis_bus::RedisBus;
use km_tls::Tls;

/// Runs until a stop signal, then flushes: every role on one port when `roles` is empty,
/// else the roles given, each on its own port.
pub async fn serve(settings: Settings, roles: &[Role]) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    if roles.is_empty() {
        let listener = bind(settings.listen, table::LISTEN.var).await?;
        serve_on(listener, settings, shutdown).await
    } else {
        serve_roles(settings, roles, shutdown).await
    }
}

async fn bind(addr: SocketAddr, variable: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{variable}: cannot listen on {addr}"))
}

/// Runs every role on an already bound listener until `shutdown` is cancelled (tests
/// bind port 0).
pub async fn serve_on(
    listener: TcpListener,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bound = listener.local_addr().context("listener has no address")?;
    let https_listener = km_tls::bind_https(&settings)?;
    let tls = Tls::new(&settings)?;
    let public_url = settings.public_url(bound);
    let (app, writer_task) = build_app(settings, public_url, tls.clone(), shutdown.clone()).await?;
    let mut background = vec![tokio::spawn(km_workers::persist(app.clone()))];
    background.extend(km_workers::spawn_role(&app));
    background.extend(tls.spawn_tasks(shutdown.clone()));
    warn_about_site_url(&app.settings, &app.public_url, bound);
    tracing::info!(listen = %bound, url = %app.public_url, data_dir = %app.settings.data_dir.display(), "km ready");
    let front = FrontDoor {
        listener,
        https: https_listener,
        tls,
        routes: routes::router(app.clone()),
    };
    notify_ready();
    front.serve(&app.settings, shutdown).await?;
    finish(app, writer_task, background).await;
    Ok(())
}

/// The roles given, each on its own port; the gateway forwards to the others.
async fn serve_roles(
    settings: Settings,
    roles: &[Role],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Every role serves a port until the stop signal.
    let mut servers: Vec<BoxFuture<'static, anyhow::Result<()>>> = Vec::new();
    let mut background = Vec::new();
    // The gateway binds first: its ports are the ones most likely taken.
    if roles.contains(&Role::Gateway) {
        let front = FrontDoor::bind(&settings).await?;
        background.extend(front.tls.spawn_tasks(shutdown.clone()));
        warn_about_site_url(
            &settings,
            &settings.public_url(settings.listen),
            settings.listen,
        );
        let (settings, shutdown) = (settings.clone(), shutdown.clone());
        servers.push(Box::pin(
            async move { front.serve(&settings, shutdown).await },
        ));
    }
    // Every port first: a taken one stops km before the stores are opened.
    let mut listeners = Vec::new();
    for &role in roles {
        if let Some((addr, variable)) = role.address(&settings) {
            listeners.push((role, bind(addr, variable).await?));
        }
    }
    let app = if roles.iter().any(|r| *r != Role::Gateway) {
        // Agents and browsers are told the gateway's URL, not a role's port.
        let public_url = settings.public_url(settings.listen);
        let built = build_app(settings.clone(), public_url, Tls::off(), shutdown.clone());
        Some(built.await?)
    } else {
        None
    };
    if let Some((app, _)) = &app {
        for (role, listener) in listeners {
            let routes = routes::role_router(app.clone(), role);
            let stopping = shutdown.clone();
            servers.push(Box::pin(async move {
                axum::serve(
                    listener,
                    routes.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move { stopping.cancelled().await })
                .await
                .with_context(|| format!("{role:?} role: HTTP server failed"))
            }));
        }
        if roles.contains(&Role::Interactor) {
            background.push(tokio::spawn(km_workers::persist(app.clone())));
        }
        if roles.contains(&Role::Workers) {
            background.extend(km_workers::spawn_role(app));
        }
    }
    tracing::info!(roles = ?roles, "km ready");
    notify_ready();
    futures_util::future::try_join_all(servers).await?;
    match app {
        Some((app, writer_task)) => finish(app, writer_task, background).await,
        None => join(background).await,
    }
    Ok(())
}

/// The front door's ports: plain HTTP on `KM_LISTEN`, and HTTPS when TLS is on (the
/// plain port then redirects all but ACME challenges and `/healthz`).
struct FrontDoor {
    listener: TcpListener,
    https: Option<std::net::TcpListener>,
    tls: Arc<Tls>,
    routes: axum::Router,
}

impl FrontDoor {
    /// The gateway role's ports, forwarding to the other roles.
    async fn bind(settings: &Settings) -> anyhow::Result<FrontDoor> {
        let listener = bind(settings.listen, table::LISTEN.var).await?;
        let https = km_tls::bind_https(settings)?;
        let tls = Tls::new(settings)?;
        let routes = Front::forwarding(tls.clone(), settings).gateway_router();
        Ok(FrontDoor {
            listener,
            https,
            tls,
            routes,
        })
    }

    async fn serve(self, settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
        let https_port = self
            .https
            .as_ref()
            .map(std::net::TcpListener::local_addr)
            .transpose()
            .context("KM_HTTPS_LISTEN: listener has no address")?
            .map(|a| a.port());
        let plain_routes = match https_port {
            Some(port) => gateway::redirecting(
                self.routes.clone(),
                HttpsBase::new(settings.site_url.as_deref(), port),
            ),
            None => self.routes.clone(),
        };
        let stopping = shutdown.clone();
        let plain = async {
            // The peer address goes to the wizard and the roles (`X-Forwarded-For`).
            axum::serve(
                self.listener,
                plain_routes.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { stopping.cancelled().await })
            .await
            .context("HTTP server failed")
        };
        let secure = async {
            match self.https {
                Some(https) => km_tls::serve_https(self.tls, https, self.routes, shutdown).await,
                None => Ok(()),
            }
        };
        tokio::try_join!(plain, secure).map(|_| ())
    }
}

fn warn_about_site_url(settings: &Settings, public_url: &str, bound: SocketAddr) {
    if settings.tls != TlsMode::Off && !public_url.starts_with("https://") {
        tracing::warn!(
            url = %public_url,
            "KM_TLS is on but KM_SITE_URL is not an https:// URL: agents are told to connect to {public_url}, which redirects"
        );
    }
    if settings.site_url.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(
            url = %public_url,
            "KM_SITE_URL is not set: agents are told to connect to {public_url}; set KM_SITE_URL to the URL other hosts reach"
        );
    }
}

/// Tells systemd the unit is ready (`Type=notify`); nothing when not run by systemd.
fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell systemd that km is ready");
    }
}

/// After the servers stopped: lets agent sockets detach, stops the background tasks,
/// then writes everything still in memory.
async fn finish(app: AppState, writer_task: JoinHandle<()>, background: Vec<JoinHandle<()>>) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Sockets see the cancellation, close, and read what their agents had sent (at most
    // 3 s); then they detach.
    for _ in 0..80 {
        if app.sessions.sockets_open() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    join(background).await;
    km_workers::flush(&app).await;
    drop(app);
    let _ = writer_task.await;
    tracing::info!("km stopped; everything flushed");
}

async fn join(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// Opens the stores and assembles the shared state; the writer task ends after the last
/// `AppState` is dropped.
pub async fn build_app(
    settings: Settings,
    public_url: String,
    tls: Arc<Tls>,
    shutdown: CancellationToken,
) -> anyhow::Result<(AppState, JoinHandle<()>)> {
    let data_lock = km_stores::sqlite::lock_data_dir_shared(&settings.data_dir)?;
    let documents: Arc<dyn km_stores::Documents> = match &settings.mongo_url {
        Some(url) => Arc::new(
            MongoDocuments::connect(url)
                .await
                .context(table::MONGO_URL.var)?,
        ),
        None => Arc::new(km_stores::sqlite::open_documents(&settings.data_dir)?),
    };
    let events: Arc<dyn km_stores::Events> = if settings.elasticsearch.is_empty() {
        Arc::new(km_stores::sqlite::open_events(&settings.data_dir)?)
    } else {
        Arc::new(
            ElasticEvents::connect(&settings.elasticsearch, &settings.elasticsearch_prefix)
                .await
                .context(table::ELASTICSEARCH_URL.var)?,
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
    let bus: Arc<dyn km_stores::Bus> = match &settings.redis_url {
        Some(url) => RedisBus::connect(url, sessions.clone(), live.clone(), shutdown.clone())
            .await
            .context(table::REDIS_URL.var)?,
        None => Arc::new(LocalBus::new(sessions.clone(), live.clone())),
    };
    let (writer, writer_task) = EventWriter::start(events.clone());
    let app = Arc::new(App {
        public_url,
        settings,
        documents,
        events,
        bus,
        live,
        sessions,
        ingest: Ingest::new(writer),
        tls,
        limit: Default::default(),
        deliveries: Default::default(),
        shutdown,
        data_lock,
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
