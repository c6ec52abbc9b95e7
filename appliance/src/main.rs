//! `km`: the appliance's command line.

use clap::{Parser, Subcommand};
use km::config::{RawSettings, Settings};

#[derive(Parser)]
#[command(
    name = "km",
    version,
    about = "The KM appliance: a self-hosted PM2 Plus backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process on one port (embedded storage by default).
    Serve(RawSettings),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // One TLS crypto provider for the whole process, before anything uses TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Serve(raw) => Settings::from_raw(raw)
            .map_err(anyhow::Error::from)
            .and_then(run_serve),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("km: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_serve(settings: Settings) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(km::server::serve(settings))
}
