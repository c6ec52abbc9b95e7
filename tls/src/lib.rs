//! The appliance's TLS: with `KM_TLS=files` or `acme` every route is served over HTTPS
//! on `KM_HTTPS_LISTEN` (rustls), and `KM_LISTEN` redirects to it (except ACME
//! challenges and `/healthz`). The certificate comes from PEM files,
//! re-read when they change, or from an ACME CA, renewed before expiry; either way a new
//! certificate is swapped in for new handshakes while open connections carry on.

// Open to the setup checks, which validate with the same code km serves with.
pub mod acme;
pub mod certs;
pub mod challenge;
mod files;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::Uri;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use km_config::{Settings, TlsMode, table};

pub use acme::{AcmeSettings, acme_dry_run};
pub use challenge::{CHALLENGE_PREFIX, Challenges, Published};

/// Marks requests that arrived over TLS (set by [`serve_https`]).
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// Time open HTTPS connections get to finish once km is asked to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Where the certificate being served comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Files,
    Acme,
    /// Temporary, until the ACME CA issues the real one.
    SelfSigned,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Files => "files",
            Source::Acme => "acme",
            Source::SelfSigned => "self-signed",
        }
    }
}

enum Plan {
    Off,
    Files {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
    },
    Acme(AcmeSettings),
}

/// What `/healthz` reports.
#[derive(Default)]
struct State {
    source: Option<Source>,
    not_after: Option<certs::NotAfter>,
    last_error: Option<String>,
}

/// TLS of this node: the certificate served, how it is kept fresh, and its state.
pub struct Tls {
    plan: Plan,
    /// The certificate handshakes use; `None` with `KM_TLS=off`.
    slot: Option<Arc<certs::Slot>>,
    state: Mutex<State>,
    challenges: Challenges,
}

impl Tls {
    /// TLS as the settings ask. `files`: the pair must load (else an error naming
    /// KM_TLS_CERT / KM_TLS_KEY). `acme`: the certificate saved in `<data>/tls/`, or a
    /// temporary self-signed one until the CA issues one.
    pub fn new(settings: &Settings) -> anyhow::Result<Arc<Tls>> {
        let (plan, first) = match &settings.tls {
            TlsMode::Off => (Plan::Off, None),
            TlsMode::Files { cert, key } => {
                let loaded = files::load(cert, key).map_err(anyhow::Error::msg)?;
                let plan = Plan::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                };
                (plan, Some((loaded, Source::Files)))
            }
            TlsMode::Acme {
                directory,
                email,
                ca,
            } => {
                let host = site_host(settings.site_url.as_deref()).context(
                    "KM_TLS=acme: KM_SITE_URL must be the https:// URL whose host gets the certificate",
                )?;
                if let Some(ca) = ca {
                    acme::check_ca(ca).map_err(anyhow::Error::msg)?;
                }
                let acme = AcmeSettings {
                    directory: directory.clone(),
                    email: email.clone(),
                    ca: ca.clone(),
                    host,
                    dir: settings.data_dir.join("tls"),
                };
                let first = first_acme_certificate(&acme).map_err(anyhow::Error::msg)?;
                (Plan::Acme(acme), Some(first))
            }
        };
        let tls = Tls {
            plan,
            slot: first
                .as_ref()
                .map(|(loaded, _)| Arc::new(certs::Slot::new(loaded.key.clone()))),
            state: Mutex::new(State::default()),
            challenges: Challenges::default(),
        };
        if let Some((loaded, source)) = first {
            tls.install(loaded, source);
        }
        tls.warn_if_expired();
        Ok(Arc::new(tls))
    }

    /// No TLS: the state of a role behind a gateway.
    pub fn off() -> Arc<Tls> {
        Arc::new(Tls {
            plan: Plan::Off,
            slot: None,
            state: Mutex::new(State::default()),
            challenges: Challenges::default(),
        })
    }

    /// Whether HTTPS is served (and the plain port redirects).
    pub fn is_tls(&self) -> bool {
        self.slot.is_some()
    }

    /// The HTTP-01 answers being served on the plain port.
    pub fn challenges(&self) -> &Challenges {
        &self.challenges
    }

    /// Starts what keeps the certificate fresh: the file watcher or the ACME renewal.
    pub fn spawn_tasks(self: &Arc<Self>, shutdown: CancellationToken) -> Vec<JoinHandle<()>> {
        match &self.plan {
            Plan::Off => Vec::new(),
            Plan::Files { cert, key } => vec![tokio::spawn(files::watch(
                self.clone(),
                cert.clone(),
                key.clone(),
                shutdown,
            ))],
            Plan::Acme(acme) => vec![tokio::spawn(acme::keep_certificate(
                self.clone(),
                acme.clone(),
                shutdown,
            ))],
        }
    }

    /// The `tls` section of `/healthz`: mode, certificate source and expiry, last error.
    pub fn health(&self) -> Value {
        let mode = match self.plan {
            Plan::Off => return json!({ "mode": "off" }),
            Plan::Files { .. } => "files",
            Plan::Acme(_) => "acme",
        };
        let state = self.state.lock();
        let days_left = state
            .not_after
            .as_ref()
            .map(|t| (t.unix - acme::unix_now()).div_euclid(86_400));
        json!({
            "mode": mode,
            "certificate": state.source.map(Source::name),
            "not_after": state.not_after.as_ref().map(|t| t.rfc3339.as_str()),
            "days_left": days_left,
            "last_error": state.last_error,
        })
    }

    /// Serves `loaded` to every new connection from now on.
    fn install(&self, loaded: certs::Loaded, source: Source) {
        if let Some(slot) = &self.slot {
            slot.replace(loaded.key);
        }
        let mut state = self.state.lock();
        state.source = Some(source);
        state.not_after = loaded.not_after;
        state.last_error = None;
    }

    fn record_error(&self, reason: String) {
        self.state.lock().last_error = Some(reason);
    }

    /// Expiry of the certificate from the CA; `None` while a self-signed one stands in.
    fn acme_not_after(&self) -> Option<i64> {
        let state = self.state.lock();
        match state.source {
            Some(Source::Acme) => state.not_after.as_ref().map(|t| t.unix),
            _ => None,
        }
    }

    fn warn_if_expired(&self) {
        let state = self.state.lock();
        if let (Some(Source::Files), Some(not_after)) = (state.source, &state.not_after)
            && not_after.unix < acme::unix_now()
        {
            tracing::warn!(not_after = %not_after.rfc3339, "TLS: the certificate of KM_TLS_CERT has expired: clients will refuse it");
        }
    }
}

/// The saved certificate, or a self-signed stand-in (logged with the reason).
fn first_acme_certificate(acme: &AcmeSettings) -> Result<(certs::Loaded, Source), String> {
    match acme::load_saved(acme) {
        Ok(loaded) => {
            tracing::info!(host = %acme.host, dir = %acme.dir.display(), "TLS: serving the saved ACME certificate");
            Ok((loaded, Source::Acme))
        }
        Err(why) => {
            tracing::info!(
                host = %acme.host,
                directory = %acme.directory,
                "TLS: serving a temporary self-signed certificate until the ACME CA issues one ({why})"
            );
            Ok((certs::self_signed(&acme.host)?, Source::SelfSigned))
        }
    }
}

/// An error's message followed by its causes (instant-acme wraps hyper wraps io: the io
/// error is the part an operator can act on), each said once.
pub fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The host of a site URL, without port or IPv6 brackets.
pub fn site_host(site_url: Option<&str>) -> Option<String> {
    let uri = site_url?.parse::<Uri>().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

/// The HTTPS port's listener, bound at start so a taken port stops km with a clear
/// error; `None` with `KM_TLS=off`.
pub fn bind_https(settings: &Settings) -> anyhow::Result<Option<std::net::TcpListener>> {
    if settings.tls == TlsMode::Off {
        return Ok(None);
    }
    let addr = settings.https_listen;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("{}: cannot listen on {addr}", table::HTTPS_LISTEN.var))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("{}: {addr}", table::HTTPS_LISTEN.var))?;
    Ok(Some(listener))
}

/// Serves `router` over TLS on `listener` until `shutdown`, then gives open connections
/// a few seconds to finish.
pub async fn serve_https(
    tls: Arc<Tls>,
    listener: std::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let slot = tls
        .slot
        .clone()
        .context("HTTPS requested with KM_TLS=off")?;
    let config = certs::server_config(slot).map_err(anyhow::Error::msg)?;
    let handle = axum_server::Handle::<SocketAddr>::new();
    let stopping = handle.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stopping.graceful_shutdown(Some(SHUTDOWN_GRACE));
    });
    axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(config),
    )
    .with_context(|| format!("{}: cannot use the listener", table::HTTPS_LISTEN.var))?
    .handle(handle)
    .serve(
        router
            .layer(axum::Extension(OverTls))
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
    .context("HTTPS server failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_host_strips_scheme_port_path_and_brackets() {
        let host = |url: &str| site_host(Some(url));
        assert_eq!(
            host("https://km.example.com").as_deref(),
            Some("km.example.com")
        );
        assert_eq!(
            host("https://km.example.com:8443/x").as_deref(),
            Some("km.example.com")
        );
        assert_eq!(
            host("https://[2001:db8::1]:443").as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(host("https://10.0.0.5").as_deref(), Some("10.0.0.5"));
        assert_eq!(site_host(None), None);
    }
}
