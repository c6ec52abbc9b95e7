//! `km-wizard`: the appliance's first-boot setup. `serve` runs the web wizard (locked by
//! a one-time token printed once at start), `apply` does the same validation and apply
//! headless (terraform's first-boot script), `reopen` issues a new token after the wizard locked
//! itself.

mod apply;
mod form;
mod server;
mod services;
mod token;
mod upgrade;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use apply::{Admin, Plan, SharedProgress, StepState, Target};
use services::Services;
use token::StateDir;

#[derive(Parser)]
#[command(name = "km-wizard", version, about = "The KM appliance's setup wizard")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the wizard; prints the setup URL with its one-time token.
    Serve {
        #[arg(long, env = "KM_WIZARD_LISTEN", default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// The URL people open (default: http://<listen>).
        #[arg(long, env = "KM_WIZARD_PUBLIC_URL")]
        url: Option<String>,
        /// Also write the setup URL to these terminals (a VM's serial console:
        /// `/dev/ttyS0`), where an operator without a shell sees it.
        #[arg(long)]
        console: Vec<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Validate and apply settings without a browser; exits non-zero with the reasons.
    Apply {
        /// Settings in env-file syntax; `WIZARD_ADMIN_USERNAME`, `WIZARD_ADMIN_EMAIL`,
        /// `WIZARD_ADMIN_PASSWORD` create the first admin, `WIZARD_TEST_MAIL_TO` receives
        /// the SMTP test mail; they are not written to the env file.
        #[arg(long)]
        settings: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Issue a new setup token (root only) and print the setup URL.
    Reopen {
        #[arg(
            long,
            env = "KM_WIZARD_STATE_DIR",
            default_value = "/var/lib/km-wizard"
        )]
        state_dir: PathBuf,
        /// The URL people open (default: the one the appliance's wizard unit found, in
        /// /run/km-wizard/url.env, else http://127.0.0.1:8090).
        #[arg(long, env = "KM_WIZARD_PUBLIC_URL")]
        url: Option<String>,
        /// Only if this request file (written by km when an admin asks from the
        /// dashboard) was written in the last two minutes.
        #[arg(long)]
        request: Option<PathBuf>,
    },
    /// Upgrade to a km package (root): a backup, the package, the roles restarted and
    /// awaited healthy; if they are not, the previous package and the backup go back.
    Upgrade {
        /// The package, km_<version>_<arch>.deb.
        file: PathBuf,
        #[command(flatten)]
        day2: Day2,
    },
    /// Restore a backup (root): the roles stopped, the backup restored, started again.
    Restore {
        /// The archive `km backup create` wrote.
        file: PathBuf,
        #[command(flatten)]
        day2: Day2,
    },
    /// Wait until the appliance answers healthy; names a role unit that failed.
    Health {
        #[command(flatten)]
        day2: Day2,
    },
}

#[derive(Args)]
struct Day2 {
    #[arg(
        long,
        env = "KM_WIZARD_STATE_DIR",
        default_value = "/var/lib/km-wizard"
    )]
    state_dir: PathBuf,
    /// The appliance's env file.
    #[arg(long, env = "KM_ENV_FILE", default_value = "/etc/km/km.env")]
    env_file: PathBuf,
    /// Seconds the appliance has to answer healthy.
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

impl Day2 {
    fn appliance(&self) -> upgrade::Appliance {
        upgrade::Appliance {
            env_file: self.env_file.clone(),
            wizard_state: self.state_dir.clone(),
            healthy_within: Duration::from_secs(self.wait),
        }
    }
}

/// Written by the wizard unit's `ExecStartPre` (packaging/files/wizard-url).
const UNIT_URL_FILE: &str = "/run/km-wizard/url.env";

#[derive(Clone, Copy, ValueEnum)]
enum RestartMode {
    /// `systemctl restart` of the appliance's units.
    Systemd,
    /// Run `km serve` as a child of the wizard (development, tests).
    Process,
}

#[derive(Args)]
struct Common {
    #[arg(
        long,
        env = "KM_WIZARD_STATE_DIR",
        default_value = "/var/lib/km-wizard"
    )]
    state_dir: PathBuf,
    /// Where uploaded TLS certificates and keys are saved (default: `<state-dir>/tls`).
    #[arg(long, env = "KM_WIZARD_PEM_DIR")]
    pem_dir: Option<PathBuf>,
    /// The appliance's env file (read by its units as `EnvironmentFile=`).
    #[arg(long, env = "KM_ENV_FILE", default_value = "/etc/km/km.env")]
    env_file: PathBuf,
    /// How the services restart (default: systemd when it runs the machine).
    #[arg(long, value_enum)]
    restart: Option<RestartMode>,
    /// Units restarted, in order (systemd mode).
    #[arg(long = "unit", default_value = "km.target")]
    units: Vec<String>,
    /// The `km` binary (process mode; default: next to km-wizard).
    #[arg(long)]
    km_bin: Option<PathBuf>,
}

impl Common {
    fn target(&self) -> anyhow::Result<Target> {
        let state = StateDir::open(&self.state_dir)
            .with_context(|| format!("--state-dir {}", self.state_dir.display()))?;
        let systemd = Path::new("/run/systemd/system").exists();
        let services = match self.restart {
            Some(RestartMode::Systemd) => Services::Systemd {
                units: self.units.clone(),
            },
            None if systemd => Services::Systemd {
                units: self.units.clone(),
            },
            _ => Services::process(self.km_bin.clone().unwrap_or_else(default_km_bin)),
        };
        Ok(Target {
            pem_dir: self
                .pem_dir
                .clone()
                .unwrap_or_else(|| self.state_dir.join("tls")),
            env_file: self.env_file.clone(),
            state,
            services: Arc::new(services),
        })
    }
}

fn default_km_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("km")))
        .unwrap_or_else(|| PathBuf::from("km"))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    km::logging::init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli.command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("km-wizard: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} must run as root");
    }
    Ok(())
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Upgrade { file, day2 } => {
            require_root("upgrade")?;
            match upgrade::upgrade(&day2.appliance(), &file).await? {
                upgrade::Upgraded::Done {
                    from,
                    to,
                    downtime,
                    backup,
                } => println!(
                    "km-wizard: upgraded from {from} to {to}; the appliance answered healthy {:.1} s after the restart (backup: {})",
                    downtime.as_secs_f64(),
                    backup.display()
                ),
                upgrade::Upgraded::Installed { from, to } => println!(
                    "km-wizard: upgraded from {from} to {to} (not configured yet: nothing to restart)"
                ),
            }
            Ok(())
        }
        Command::Restore { file, day2 } => {
            require_root("restore")?;
            let started = std::time::Instant::now();
            let restored = upgrade::restore(&day2.appliance(), &file).await?;
            print!("{}", restored.manifest.summary());
            if let Some(aside) = &restored.set_aside {
                println!("km-wizard: the data it replaced is in {}", aside.display());
            }
            println!(
                "km-wizard: restored in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Health { day2 } => {
            upgrade::wait_healthy(&day2.appliance()).await?;
            println!("km-wizard: healthy");
            Ok(())
        }
        Command::Serve {
            listen,
            url,
            console,
            common,
        } => serve(listen, url, &console, common).await,
        Command::Apply { settings, common } => apply_headless(&settings, common).await,
        Command::Reopen {
            state_dir,
            url,
            request,
        } => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                bail!(
                    "reopen must run as root (it writes the setup token under {})",
                    state_dir.display()
                );
            }
            if let Some(request) = request
                && !fresh_request(&request)
            {
                println!(
                    "km-wizard: no fresh request in {}: nothing to do",
                    request.display()
                );
                return Ok(());
            }
            let token = StateDir::open(&state_dir)?.issue()?;
            if Path::new("/run/systemd/system").exists() {
                // The unit serves the token just issued (it keeps a valid one).
                services::systemctl(&["start", "km-wizard.service"])
                    .await
                    .map_err(anyhow::Error::msg)?;
            }
            let url = url
                .or_else(unit_url)
                .unwrap_or_else(|| "http://127.0.0.1:8090".into());
            announce(&setup_line(&url, &token), &[]);
            Ok(())
        }
    }
}

/// A request older than this is not acted on (left over from before a restart).
const REQUEST_TTL: Duration = Duration::from_secs(120);

/// Whether `path` was written in the last [`REQUEST_TTL`] (its time is all it says: the
/// unit reading it only traverses km's directory, as group km).
fn fresh_request(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|at| at.elapsed().ok())
        .is_some_and(|age| age < REQUEST_TTL)
}

/// The public URL the wizard unit announces, if it runs.
fn unit_url() -> Option<String> {
    let text = std::fs::read_to_string(UNIT_URL_FILE).ok()?;
    km_config::envfile::parse(&text)
        .ok()?
        .into_iter()
        .find_map(|(k, v)| (k == "KM_WIZARD_PUBLIC_URL").then_some(v))
}

/// The one line that opens the wizard.
fn setup_line(url: &str, token: &str) -> String {
    format!(
        "KM setup: open {}/wizard/?token={token}",
        url.trim_end_matches('/')
    )
}

/// Prints `line` on stdout (the journal) and on each console that can be written.
fn announce(line: &str, consoles: &[PathBuf]) {
    println!("{line}");
    for console in consoles {
        let written = std::fs::OpenOptions::new()
            .append(true)
            .open(console)
            .and_then(|mut tty| {
                std::io::Write::write_all(&mut tty, format!("\r\n{line}\r\n").as_bytes())
            });
        if let Err(e) = written {
            tracing::warn!(console = %console.display(), error = %e, "setup URL not written to the console");
        }
    }
}

async fn serve(
    listen: SocketAddr,
    url: Option<String>,
    consoles: &[PathBuf],
    common: Common,
) -> anyhow::Result<()> {
    let target = common.target()?;
    let url = url.unwrap_or_else(|| format!("http://{listen}"));
    if target.state.is_locked() {
        announce(
            "KM setup: the wizard is locked (settings applied); reopen it with `km-wizard reopen`",
            consoles,
        );
    } else {
        let token = match target.state.current() {
            Some(token) => token,
            None => target
                .state
                .issue()
                .context("cannot write the setup token")?,
        };
        announce(&setup_line(&url, &token), consoles);
    }
    if matches!(*target.services, Services::Process { .. })
        && target.env_file.exists()
        && let Err(e) = target.services.restart(&target.env_file).await
    {
        tracing::warn!(error = %e, "km did not start on the current settings");
    }
    let services = target.services.clone();
    // Under systemd the services live on without the wizard: once settings are applied
    // (here or by `km-wizard apply`) it stops, and its unit's condition keeps it off.
    let exit_when_locked = matches!(*services, Services::Systemd { .. });
    let state_dir = target.state.path().to_path_buf();
    let wizard = server::Wizard::new(target);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen: cannot listen on {listen}"))?;
    tracing::info!(%listen, "wizard ready");
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell systemd that the wizard is ready");
    }
    axum::serve(
        listener,
        server::router(wizard).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        tokio::select! {
            () = stop_requested() => {}
            () = locked(&state_dir), if exit_when_locked => {}
        }
    })
    .await
    .context("wizard server failed")?;
    services.shutdown().await;
    Ok(())
}

/// How long a locked wizard keeps serving: the page that applied reads its last progress.
const LOCKED_GRACE: Duration = Duration::from_secs(10);

/// Resolves a little after the wizard locked itself.
async fn locked(state_dir: &Path) {
    loop {
        if StateDir::open(state_dir).is_ok_and(|state| state.is_locked()) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::info!("settings applied: the wizard stops (`km-wizard reopen` starts it again)");
    tokio::time::sleep(LOCKED_GRACE).await;
}

/// Ctrl-C or SIGTERM (systemd's stop): the wizard then stops the `km` it runs.
async fn stop_requested() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `km-wizard apply --settings FILE`: the settings over the current env file.
async fn apply_headless(settings: &Path, common: Common) -> anyhow::Result<()> {
    let target = common.target()?;
    let text = std::fs::read_to_string(settings)
        .with_context(|| format!("--settings {}", settings.display()))?;
    let given = km_config::envfile::parse(&text)
        .with_context(|| format!("--settings {}", settings.display()))?;
    let mut env: BTreeMap<String, String> = std::fs::read_to_string(&target.env_file)
        .ok()
        .and_then(|t| km_config::envfile::parse(&t).ok())
        .map(|e| e.into_iter().collect())
        .unwrap_or_default();
    let mut wizard_only = BTreeMap::new();
    for (key, value) in given {
        if key.starts_with("WIZARD_") {
            wizard_only.insert(key, value);
        } else {
            env.insert(key, value);
        }
    }
    let take = |k: &str| wizard_only.get(k).cloned().unwrap_or_default();
    let admin = (!take("WIZARD_ADMIN_USERNAME").is_empty()).then(|| Admin {
        username: take("WIZARD_ADMIN_USERNAME"),
        email: take("WIZARD_ADMIN_EMAIL"),
        password: take("WIZARD_ADMIN_PASSWORD"),
    });
    let plan = Plan {
        env,
        admin,
        test_mail_to: Some(take("WIZARD_TEST_MAIL_TO")).filter(|t| !t.is_empty()),
    };
    let progress = SharedProgress::default();
    // Headless: nothing answers HTTP-01 or the site probe here; those are warnings.
    let options = km_setup::validate::Options {
        test_mail_to: plan.test_mail_to.clone(),
        ..km_setup::validate::Options::default()
    };
    let outcome = apply::apply(&target, plan, options, &progress).await;
    let report = progress.lock().clone();
    for check in &report.checks {
        println!(
            "check {:<22} {:?}: {}",
            check.setting, check.status, check.detail
        );
    }
    for step in &report.steps {
        let (mark, detail) = match &step.state {
            StepState::Done(d) => ("ok  ", d.as_str()),
            StepState::Failed(d) => ("FAIL", d.as_str()),
            StepState::Running => ("... ", ""),
            StepState::Pending => ("-   ", "not run"),
        };
        println!("{mark} {}: {detail}", step.name);
    }
    if matches!(*target.services, Services::Process { .. }) {
        // A headless apply outside systemd leaves nothing running behind it.
        target.services.shutdown().await;
    }
    outcome.map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setup_line_reaches_every_console_that_can_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("ttyS0");
        std::fs::write(&console, "boot messages\n").unwrap();
        let line = setup_line("http://10.0.0.5:8090/", "abc");
        assert_eq!(
            line,
            "KM setup: open http://10.0.0.5:8090/wizard/?token=abc"
        );
        announce(&line, &[console.clone(), dir.path().join("missing/tty")]);
        let written = std::fs::read_to_string(&console).unwrap();
        assert!(
            written.starts_with("boot messages\n") && written.contains(&line),
            "{written:?}"
        );
    }
}
