//! `km`: the appliance's command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use km::role::Role;
use km_config::licence;
use km_config::{Settings, Values};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Make a licence signing key, sign a licence, or show what one grants.
    #[command(subcommand)]
    Licence(LicenceCommand),
    /// Check a configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Back the appliance up into one archive, check one, or restore one.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Gather versions, settings (secrets masked), checks, journals, store health and
    /// disk space into one archive to attach to a support ticket.
    SupportBundle {
        #[arg(long, default_value = "/etc/km/km.env")]
        env_file: PathBuf,
        /// Where the archive goes.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Write a backup of the stores, settings, TLS files and wizard state (km may run).
    Create {
        #[command(flatten)]
        paths: AppliancePaths,
        /// A directory (the file is named after the host and time) or a new file.
        #[arg(long, default_value = "/var/backups/km")]
        out: PathBuf,
    },
    /// Read a backup through and check every file against its manifest.
    Verify { file: PathBuf },
    /// Restore a backup onto this appliance (km stopped); what it replaces is kept aside.
    Restore {
        file: PathBuf,
        #[command(flatten)]
        paths: AppliancePaths,
    },
}

#[derive(Args)]
struct AppliancePaths {
    /// The settings (skipped by `create` when absent).
    #[arg(long, default_value = "/etc/km/km.env")]
    env_file: PathBuf,
    /// The data dir; by default KM_DATA_DIR of the env file, else km's default.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The setup wizard's state directory.
    #[arg(long, default_value = "/var/lib/km-wizard")]
    wizard_state: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    /// Run only this role (repeat for several); the gateway forwards to the others.
    #[arg(long, value_enum)]
    role: Vec<Role>,
    #[command(flatten)]
    settings: Values,
}

#[derive(Subcommand)]
enum LicenceCommand {
    /// Make a signing key: the private key goes to a new file (mode 0600), its public
    /// half is printed (give it to the build as KM_LICENCE_PUBLIC_KEYS).
    Keygen {
        /// The private key file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a licence with a private key file and print it.
    Sign(SignArgs),
    /// The keys this km trusts; with a licence, what it grants and which key verifies it,
    /// or why it is refused.
    Show {
        #[arg(long, env = "KM_DEDICATED_KEY", hide_env_values = true)]
        licence: Option<String>,
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
    /// Print every setting (variable, flag, value, default, meaning) as a Markdown table.
    Settings,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    km::logging::init();
    // One TLS crypto provider for the whole process, before anything uses TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Serve(args) => Settings::from_values(&args.settings)
            .map_err(anyhow::Error::from)
            .and_then(|settings| run_serve(settings, &args.role))
            .map(|()| ExitCode::SUCCESS),
        Command::Licence(LicenceCommand::Keygen { out }) => keygen(&out),
        Command::Licence(LicenceCommand::Sign(args)) => sign_licence(&args),
        Command::Licence(LicenceCommand::Show { licence }) => show_licence(licence.as_deref()),
        Command::Config(ConfigCommand::Check {
            env_file,
            test_mail_to,
        }) => check_config(&env_file, test_mail_to),
        Command::Config(ConfigCommand::Settings) => {
            print!("{}", km_config::table::markdown());
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup(command) => runtime().and_then(|rt| rt.block_on(backup(command))),
        Command::SupportBundle { env_file, out } => runtime().and_then(|rt| {
            let path = rt.block_on(km::support::bundle(&env_file, &out))?;
            println!(
                "written: {} (secrets masked: look it over before sending)",
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }),
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
    km_stores::ids::now_ms() / 1000
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

fn keygen(out: &Path) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (file, public) = licence::keygen(now_s());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", out.display()))?;
    f.write_all(file.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", out.display()))?;
    eprintln!(
        "km: private key written to {} (mode 0600): keep it offline; \
         build km with KM_LICENCE_PUBLIC_KEYS set to the public half:",
        out.display()
    );
    println!("{public}");
    Ok(ExitCode::SUCCESS)
}

fn show_licence(text: Option<&str>) -> anyhow::Result<ExitCode> {
    let keys = licence::trusted_keys();
    if keys.is_empty() {
        println!("trusted keys:  none (built without KM_LICENCE_PUBLIC_KEYS)");
    }
    for key in &keys {
        println!("trusted key:   {key}");
    }
    for bad in licence::invalid_production_keys() {
        println!("ignored key:   {bad} (not an Ed25519 public key)");
    }
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        println!("licence:       {}", licence::UNLICENSED);
        return Ok(ExitCode::SUCCESS);
    };
    let (l, key) = licence::verify_naming_key(text, now_s())
        .map_err(|e| anyhow::anyhow!("licence refused: {e}"))?;
    println!("customer:      {}", l.customer);
    match l.max_processes() {
        Some(n) => println!("process limit: {n}"),
        None => println!("process limit: unlimited"),
    }
    println!("issued:        {}", licence::date(l.issued_at));
    println!("expires:       {}", licence::date(l.expires_at));
    println!("verified by:   {key}");
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn backup(command: BackupCommand) -> anyhow::Result<ExitCode> {
    match command {
        BackupCommand::Create { paths, out } => {
            let (settings, settings_text) =
                km_backup::settings_of(&paths.env_file, paths.data_dir.as_deref())?;
            let sources = km_backup::Sources {
                settings,
                settings_text,
                wizard_state: Some(paths.wizard_state.clone()),
            };
            let started = std::time::Instant::now();
            let created = km_backup::create(&sources, &out).await?;
            let size = std::fs::metadata(&created.path).map_or(0, |m| m.len());
            print!("{}", created.manifest.summary());
            println!(
                "written: {} ({size} bytes, {} bytes before compression) in {:.1?}",
                created.path.display(),
                created.manifest.total_bytes(),
                started.elapsed()
            );
        }
        BackupCommand::Verify { file } => {
            let manifest = tokio::task::spawn_blocking(move || km_backup::verify(&file)).await??;
            print!("{}", manifest.summary());
            println!("every file matches its checksum");
        }
        BackupCommand::Restore { file, paths } => {
            let targets = km_backup::Targets {
                data_dir: km_backup::settings_of(&paths.env_file, paths.data_dir.as_deref())?
                    .0
                    .data_dir,
                env_file: paths.env_file.clone(),
                wizard_state: Some(paths.wizard_state.clone()),
            };
            let restored = km_backup::restore(&file, &targets).await?;
            print!("{}", restored.manifest.summary());
            for (collection, count) in &restored.collections {
                println!("  MongoDB {collection}: {count} documents");
            }
            if let Some(aside) = &restored.set_aside {
                println!("the files it replaced are in {}", aside.display());
            }
            println!(
                "restored into {}; start km (on the appliance: systemctl start km.target)",
                targets.data_dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The static report, then every live check (the wizard runs the same checks).
fn check_config(env_file: &Path, test_mail_to: Option<String>) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(env_file)
        .map_err(|e| anyhow::anyhow!("--env-file {}: {e}", env_file.display()))?;
    let checked = km_setup::check_env_file(&text, now_s());
    println!("{}", env_file.display());
    print!("{}", checked.report);
    let Some(settings) = checked.settings.filter(|_| checked.report.is_ok()) else {
        return Ok(ExitCode::FAILURE);
    };
    let options = km_setup::validate::Options {
        test_mail_to,
        ..km_setup::validate::Options::default()
    };
    let checks = runtime()?.block_on(km_setup::validate::live_only(&settings, &options));
    println!("live checks:");
    for check in &checks {
        println!("  {:<8} {check}", check.status.as_str());
    }
    let failed = checks
        .iter()
        .any(|c| c.status == km_setup::checks::Status::Failed);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn run_serve(settings: Settings, roles: &[Role]) -> anyhow::Result<()> {
    raise_open_file_limit();
    runtime()?.block_on(km::server::serve(settings, roles))
}
