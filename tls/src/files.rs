//! `KM_TLS=files`: the certificate and key are re-read when either file changes (checked
//! every minute) or on SIGHUP, so a renewal by another tool (certbot, a secret manager)
//! applies without a restart or a dropped connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::certs;
use super::{Source, Tls};
use km_config::table;

const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Errors name the settings the operator fixes.
pub fn load(cert: &Path, key: &Path) -> Result<certs::Loaded, String> {
    certs::load_files(cert, key, table::TLS_CERT.var, table::TLS_KEY.var)
}

/// Reloads `cert` and `key` when their modification times change or on SIGHUP; a pair
/// that does not load is reported and the previous certificate kept.
pub async fn watch(tls: Arc<Tls>, cert: PathBuf, key: PathBuf, shutdown: CancellationToken) {
    let mut hangup = Hangup::new();
    let mut seen = modified(&cert, &key);
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => false,
            _ = hangup.recv() => true,
        };
        let now = modified(&cert, &key);
        if now == seen && !forced {
            continue;
        }
        // Remembered even on failure: the next change (the other file arriving) retries.
        seen = now;
        match load(&cert, &key) {
            Ok(loaded) => {
                let not_after = loaded.not_after.as_ref().map(|t| t.rfc3339.clone());
                tls.install(loaded, Source::Files);
                tracing::info!(not_after = ?not_after, "TLS: certificate reloaded from KM_TLS_CERT and KM_TLS_KEY");
            }
            Err(reason) => {
                tracing::warn!("TLS: keeping the current certificate: {reason}");
                tls.record_error(reason);
            }
        }
    }
}

fn modified(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let mtime = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    (mtime(cert), mtime(key))
}

/// SIGHUP, where there is such a thing; never fires otherwise.
struct Hangup(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

#[cfg(unix)]
impl Hangup {
    fn new() -> Self {
        let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        if let Err(e) = &signal {
            tracing::warn!("TLS: SIGHUP will not reload the certificate: {e}");
        }
        Hangup(signal.ok())
    }

    async fn recv(&mut self) {
        if let Some(signal) = &mut self.0
            && signal.recv().await.is_some()
        {
            return;
        }
        // No signal driver (or it is gone): only the timer reloads.
        self.0 = None;
        std::future::pending::<()>().await
    }
}

#[cfg(not(unix))]
impl Hangup {
    fn new() -> Self {
        Hangup()
    }

    async fn recv(&mut self) {
        std::future::pending::<()>().await
    }
}
