//! `km`: the appliance's command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use km::config::{RawSettings, Settings};
use km::server::Role;
use km::setup::{self, licence};

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
    /// Run every role in one process on one port (embedded storage by default), or only
    /// the roles given with --role, each on its own port.
    Serve(Box<ServeArgs>),
    /// Sign a licence, or show what one grants.
    #[command(subcommand)]
    Licence(LicenceCommand),
    /// Check a configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// Run only this role (repeat for several); the gateway forwards to the others.
    #[arg(long, value_enum)]
    role: Vec<Role>,
    #[command(flatten)]
    settings: RawSettings,
}

#[derive(Subcommand)]
enum LicenceCommand {
    /// Sign a licence with a private key file and print it.
    Sign(SignArgs),
    /// Verify a licence and print what it grants, or why it is refused.
    Show {
        #[arg(long, env = "KM_DEDICATED_KEY", hide_env_values = true)]
        licence: String,
    },
}

#[derive(Args)]
struct SignArgs {
    /// The private key: 64 hex digits (`#` lines are comments). Keep it secret.
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    customer: String,
    /// Processes monitored at most; 0 for unlimited.
    #[arg(long)]
    process_limit: u32,
    /// Days of validity from now.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate an env file as `km serve` would read it, then try each configured service
    /// (connect, authenticate, write); exit code 0 when valid, 1 if not.
    Check {
        #[arg(long, default_value = "/etc/km/km.env")]
        env_file: PathBuf,
        /// Also send a test mail through SMTP to this address.
        #[arg(long)]
        test_mail_to: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    km::logging::init();
    // One TLS crypto provider for the whole process, before anything uses TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Serve(args) => Settings::from_raw(args.settings)
            .map_err(anyhow::Error::from)
            .and_then(|settings| run_serve(settings, &args.role))
            .map(|()| ExitCode::SUCCESS),
        Command::Licence(LicenceCommand::Sign(args)) => sign_licence(&args),
        Command::Licence(LicenceCommand::Show { licence }) => show_licence(&licence),
        Command::Config(ConfigCommand::Check {
            env_file,
            test_mail_to,
        }) => check_config(&env_file, test_mail_to),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("km: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every agent holds a socket (two through the gateway): the soft open-file limit, often
/// 1024, is raised to the hard one.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < 65_536 => tracing::warn!(
            open_files = limit,
            "the open-file limit holds about {} agents: raise it (LimitNOFILE= in the unit, ulimit -n)",
            limit.saturating_sub(256) / 2
        ),
        Ok(limit) => tracing::info!(open_files = limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

fn now_s() -> i64 {
    km::ids::now_ms() / 1000
}

fn sign_licence(args: &SignArgs) -> anyhow::Result<ExitCode> {
    let read = |e| anyhow::anyhow!("--key {}: {e}", args.key.display());
    let key = std::fs::read_to_string(&args.key).map_err(|e| read(e.to_string()))?;
    let key = licence::parse_signing_key(&key).map_err(|e| read(e.to_string()))?;
    if args.customer.trim().is_empty() {
        anyhow::bail!("--customer: the customer's name is required");
    }
    let now = now_s();
    let text = licence::sign(
        &licence::Licence {
            customer: args.customer.trim().to_string(),
            process_limit: args.process_limit,
            expires_at: now + i64::from(args.days) * 86_400,
            issued_at: now,
        },
        &key,
    );
    println!("{text}");
    // Signing with a key this build does not trust is allowed (another build may), but said.
    if let Err(e) = licence::verify(&text, now) {
        eprintln!("km: warning: this km refuses the licence just signed: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

fn show_licence(text: &str) -> anyhow::Result<ExitCode> {
    if licence::TEST_KEY_TRUSTED {
        eprintln!("km: built with the feature test-licence: the test key is trusted");
    }
    let l = licence::verify(text, now_s()).map_err(|e| anyhow::anyhow!("licence refused: {e}"))?;
    println!("customer:      {}", l.customer);
    match l.max_processes() {
        Some(n) => println!("process limit: {n}"),
        None => println!("process limit: unlimited"),
    }
    println!("issued:        {}", licence::date(l.issued_at));
    println!("expires:       {}", licence::date(l.expires_at));
    Ok(ExitCode::SUCCESS)
}

/// The static report, then every live check (the wizard runs the same checks).
fn check_config(env_file: &Path, test_mail_to: Option<String>) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(env_file)
        .map_err(|e| anyhow::anyhow!("--env-file {}: {e}", env_file.display()))?;
    let checked = setup::check_env_file(&text, now_s());
    println!("{}", env_file.display());
    print!("{}", checked.report);
    let Some(settings) = checked.settings.filter(|_| checked.report.is_ok()) else {
        return Ok(ExitCode::FAILURE);
    };
    let options = setup::validate::Options {
        test_mail_to,
        ..setup::validate::Options::default()
    };
    let checks = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(setup::validate::live_only(&settings, &options));
    println!("live checks:");
    for check in &checks {
        println!("  {:<8} {check}", check.status.as_str());
    }
    let failed = checks
        .iter()
        .any(|c| c.status == setup::checks::Status::Failed);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn run_serve(settings: Settings, roles: &[Role]) -> anyhow::Result<()> {
    raise_open_file_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(km::server::serve(settings, roles))
}
