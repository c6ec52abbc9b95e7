//! Logs: structured entries to journald when systemd connected the output to the journal
//! (`JOURNAL_STREAM` is set), each event's fields as journal fields (`journalctl -o
//! verbose` shows them, `journalctl LISTEN=…` filters on them); else readable lines on
//! stderr. `KM_LOG` filters either way (`info` by default).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, fmt};

pub fn init() {
    let filter =
        EnvFilter::try_from_env(km_config::table::LOG).unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
        .map(|layer| layer.with_field_prefix(None));
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(journald) => registry.with(journald).init(),
        None => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}
