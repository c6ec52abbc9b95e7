//! Day-2 operations on the appliance, as root under systemd:
//!
//! - `upgrade FILE`: a backup, the package installed, the roles restarted on it and
//!   awaited healthy; when they are not, the previous package and the backup go back.
//! - `restore FILE`: the roles stopped, the backup restored, started again, awaited.
//! - `health`: waits until the appliance answers healthy, naming a unit that failed.
//!
//! The previous package comes from `/var/cache/km/packages`, where provision.sh and
//! every upgrade keep the installed one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::process::Command;

use crate::services::{self, systemctl};
use km_config::envfile;

/// Where the installed packages are kept for a rollback.
pub const PACKAGES_DIR: &str = "/var/cache/km/packages";
/// Where the backups before upgrades go.
pub const BACKUPS_DIR: &str = "/var/backups/km";
/// The appliance's roles, started and stopped together.
const TARGET: &str = "km.target";

/// The appliance as the upgrade sees it.
pub struct Appliance {
    pub env_file: PathBuf,
    pub wizard_state: PathBuf,
    /// How long the roles have to answer healthy.
    pub healthy_within: Duration,
}

/// A package file's name and version, from its control file.
async fn package_version(file: &Path) -> anyhow::Result<String> {
    let out = run(
        "dpkg-deb",
        &["-f", &file.display().to_string(), "Package", "Version"],
    )
    .await?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::trim)
            .map(str::to_string)
    };
    ensure!(
        field("Package").as_deref() == Some("km"),
        "{}: not a km package",
        file.display()
    );
    field("Version").with_context(|| format!("{}: no version", file.display()))
}

async fn installed_version() -> anyhow::Result<String> {
    run("dpkg-query", &["-W", "-f=${Version}", "km"])
        .await
        .map(|v| v.trim().to_string())
        .context("km is not installed from its package (install it once with apt install ./km_<version>_<arch>.deb)")
}

async fn newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// The kept copy of the installed package, `km_<version>_<arch>.deb`.
fn kept_package(version: &str) -> Option<PathBuf> {
    let prefix = format!("km_{version}_");
    std::fs::read_dir(PACKAGES_DIR)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

/// What an upgrade did.
pub enum Upgraded {
    /// The new version runs; how long the appliance did not answer.
    Done {
        from: String,
        to: String,
        downtime: Duration,
        backup: PathBuf,
    },
    /// Nothing ran yet (not configured): the package is installed.
    Installed { from: String, to: String },
}

/// `km-wizard upgrade FILE`.
pub async fn upgrade(appliance: &Appliance, file: &Path) -> anyhow::Result<Upgraded> {
    let to = package_version(file).await?;
    let from = installed_version().await?;
    ensure!(
        newer(&to, &from).await,
        "{} is version {to}, not newer than the installed {from}",
        file.display()
    );
    let previous = kept_package(&from).with_context(|| {
        format!(
            "no copy of the installed package km {from} in {PACKAGES_DIR}, so there would be \
             nothing to roll back to: copy km_{from}_<arch>.deb there first"
        )
    })?;
    let kept = keep_package(file)?;
    if !configured(appliance) {
        install(&kept).await?;
        return Ok(Upgraded::Installed { from, to });
    }
    println!("km-wizard: backing up before the upgrade from {from} to {to}");
    let backup = backup(appliance).await?;
    install(&kept).await?;
    let restarting = Instant::now();
    let healthy = match systemctl(&["restart", TARGET]).await {
        Ok(()) => wait_healthy(appliance).await,
        Err(e) => Err(anyhow::anyhow!(e)),
    };
    match healthy {
        Ok(()) => {
            forget_other_packages(&kept, &previous);
            Ok(Upgraded::Done {
                from,
                to,
                downtime: restarting.elapsed(),
                backup,
            })
        }
        Err(why) => {
            eprintln!("km-wizard: km {to} is not healthy: {why:#}; rolling back to {from}");
            rollback(appliance, &previous, &backup)
                .await
                .with_context(|| {
                    format!("km {to} was not healthy ({why:#}) and the rollback failed")
                })?;
            bail!(
                "km {to} was not healthy ({why:#}): km {from} and the data of {} are back",
                backup.display()
            )
        }
    }
}

/// The previous package and the backup put back; healthy again.
async fn rollback(appliance: &Appliance, previous: &Path, backup: &Path) -> anyhow::Result<()> {
    stop_roles().await?;
    let mut dpkg = Command::new("dpkg");
    dpkg.args(["-i", "--force-downgrade"]).arg(previous);
    run_command(
        dpkg.env("KM_UPGRADE_MANAGED", "1")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .await?;
    restore_stopped(appliance, backup).await?;
    systemctl(&["start", TARGET])
        .await
        .map_err(anyhow::Error::msg)?;
    wait_healthy(appliance).await
}

/// `km-wizard restore FILE`: stop, restore, start (when the backup was of a configured
/// appliance), healthy.
pub async fn restore(appliance: &Appliance, file: &Path) -> anyhow::Result<km_backup::Restored> {
    let under_systemd = Path::new("/run/systemd/system").exists();
    if under_systemd {
        stop_roles().await?;
    }
    let restored = restore_stopped(appliance, file).await?;
    // A scheduled backup (made by km, which cannot read the wizard's state) holds the
    // settings only: an appliance with settings is a configured one.
    let files = &restored.manifest.files;
    if files.iter().any(|f| f.path == "settings/km.env")
        && !files.iter().any(|f| f.path.starts_with("wizard/"))
    {
        crate::token::StateDir::open(&appliance.wizard_state)?.lock()?;
    }
    if under_systemd && configured(appliance) {
        // The backup's wizard was locked: it stops, the roles start.
        let _ = systemctl(&["stop", "km-wizard.service"]).await;
        systemctl(&["start", TARGET])
            .await
            .map_err(anyhow::Error::msg)?;
        wait_healthy(appliance).await?;
    }
    Ok(restored)
}

async fn restore_stopped(
    appliance: &Appliance,
    file: &Path,
) -> anyhow::Result<km_backup::Restored> {
    let data_dir = km_backup::settings_of(&appliance.env_file, None)?
        .0
        .data_dir;
    prepare_data_dir(&data_dir).await?;
    let targets = km_backup::Targets {
        data_dir,
        env_file: appliance.env_file.clone(),
        wizard_state: Some(appliance.wizard_state.clone()),
    };
    km_backup::restore(file, &targets).await
}

/// Stops the target and every unit it wants, waiting until each has stopped (stopping
/// the target alone returns before the units it takes down are gone).
async fn stop_roles() -> anyhow::Result<()> {
    let wants = run("systemctl", &["show", "-p", "Wants", "--value", TARGET]).await?;
    let mut args = vec!["stop", TARGET];
    args.extend(wants.split_whitespace());
    systemctl(&args).await.map_err(anyhow::Error::msg)
}

/// A missing data dir is made for the user `km` (as systemd's StateDirectory= would), so
/// what the restore puts there is km's.
async fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let id = |flag: &'static str| async move {
        run("id", &[flag, "km"])
            .await
            .ok()?
            .trim()
            .parse::<u32>()
            .ok()
    };
    if let (Some(uid), Some(gid)) = (id("-u").await, id("-g").await) {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o750))?;
    }
    Ok(())
}

/// Settings applied (the wizard locked): the roles run.
fn configured(appliance: &Appliance) -> bool {
    crate::token::StateDir::open(&appliance.wizard_state).is_ok_and(|s| s.is_locked())
}

/// A backup into [`BACKUPS_DIR`] by this (the installed) version.
async fn backup(appliance: &Appliance) -> anyhow::Result<PathBuf> {
    let (settings, settings_text) = km_backup::settings_of(&appliance.env_file, None)?;
    let sources = km_backup::Sources {
        settings,
        settings_text,
        wizard_state: Some(appliance.wizard_state.clone()),
    };
    let created = km_backup::create(&sources, Path::new(BACKUPS_DIR)).await?;
    println!("km-wizard: backup {}", created.path.display());
    Ok(created.path)
}

/// A copy of the package in [`PACKAGES_DIR`] (the next upgrade's rollback).
fn keep_package(file: &Path) -> anyhow::Result<PathBuf> {
    let name = file.file_name().context("the package has no file name")?;
    std::fs::create_dir_all(PACKAGES_DIR)?;
    let kept = Path::new(PACKAGES_DIR).join(name);
    if file != kept {
        std::fs::copy(file, &kept).with_context(|| format!("cannot copy to {}", kept.display()))?;
    }
    Ok(kept)
}

/// Only the running package and the one before stay.
fn forget_other_packages(current: &Path, previous: &Path) {
    let Ok(dir) = std::fs::read_dir(PACKAGES_DIR) else {
        return;
    };
    for path in dir.flatten().map(|e| e.path()) {
        if path != current && path != previous {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn install(package: &Path) -> anyhow::Result<()> {
    let mut dpkg = Command::new("dpkg");
    dpkg.arg("-i").arg(package);
    run_command(
        dpkg.env("KM_UPGRADE_MANAGED", "1")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .await
    .map(|_| ())
}

/// Waits until `/healthz` answers `ok`; a role unit that fails meanwhile ends the wait
/// with its name and the last lines of its journal.
pub async fn wait_healthy(appliance: &Appliance) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&appliance.env_file).unwrap_or_default();
    let url = services::health_url(&envfile::parse(&text).unwrap_or_default());
    let units = [TARGET.to_string()];
    services::wait_healthy(
        &url,
        appliance.healthy_within,
        services::Watch::Units(&units),
    )
    .await
    .map_err(anyhow::Error::msg)
}

async fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    run_command(Command::new(program).args(args)).await
}

async fn run_command(command: &mut Command) -> anyhow::Result<String> {
    services::run(command).await.map_err(anyhow::Error::msg)
}
