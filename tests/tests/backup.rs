//! `km backup`: a backup taken while km serves a real linked pm2 brings back the users,
//! buckets, servers and events (a restart's process event) after they changed, and onto a fresh data dir; a damaged
//! archive, a restore while km runs, and a store newer than km are refused. On the
//! scale-out stores (`KM_E2E_STORES=scale-out`) the documents go through MongoDB.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use km_e2e::{Api, Km, Pm2, e2e, km_bin};
use serde_json::{Value, json};

/// `km <args>`: its exit success and output.
fn run_km(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(km_bin())
        .args(args)
        .output()
        .context("run km")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn km_ok(args: &[&str]) -> Result<String> {
    let (ok, out) = run_km(args)?;
    ensure!(ok, "km {}:\n{out}", args.join(" "));
    Ok(out)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// `km backup create`; the archive's path.
fn create(env_file: &Path, wizard: &Path, out: &Path) -> Result<PathBuf> {
    let printed = km_ok(&[
        "backup",
        "create",
        "--env-file",
        path(env_file),
        "--wizard-state",
        path(wizard),
        "--out",
        path(out),
    ])?;
    let written = printed
        .lines()
        .find_map(|l| l.strip_prefix("written: "))
        .and_then(|l| l.split(" (").next())
        .with_context(|| format!("no archive named:\n{printed}"))?;
    Ok(PathBuf::from(written))
}

async fn bucket_names(api: &Api) -> Result<Vec<String>> {
    let buckets = api.get_ok("/api/bucket/").await?;
    Ok(buckets
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str().map(str::to_string))
        .collect())
}

/// The user signs in again, sees the bucket, its server and a stored log line.
async fn holds_the_backed_up_data(km: &Km, user: &km_e2e::User, bucket: &str) -> Result<()> {
    let token = km
        .api()
        .post_ok(
            "/api/oauth/token",
            &json!({"grant_type": "password", "username": user.username, "password": user.password}),
        )
        .await?;
    let api = km
        .api()
        .with_token(token["access_token"].as_str().context("no token")?);
    let names = bucket_names(&api).await?;
    ensure!(
        names == ["backed-up"],
        "buckets after the restore: {names:?}"
    );
    let servers = api
        .get_ok(&format!("/api/bucket/{bucket}/meta_servers"))
        .await?;
    ensure!(
        servers.to_string().contains("web-1"),
        "servers after the restore: {servers}"
    );
    api.wait_data(
        bucket,
        "processEvents",
        &json!({"app_name": "ticker"}),
        "the restart stored before the backup",
        Duration::from_secs(10),
        |e: &Value| (e["server_name"] == "web-1").then_some(()),
    )
    .await
}

#[tokio::test]
async fn a_backup_brings_back_users_buckets_servers_and_events() {
    e2e(async {
        let mut km = Km::start().await?;
        let user = km.api().register_random().await?;
        let bucket = user.api.create_bucket("backed-up").await?;
        let pm2 = Pm2::new(&km.url())?;
        pm2.start_app("ticker", "setInterval(() => console.log('tick'), 200);")
            .await?;
        let (code, out) = pm2
            .link(&bucket.secret_id, &bucket.public_id, "web-1")
            .await?;
        ensure!(code == 0, "pm2 link failed ({code}):\n{out}");
        // A restart: a process event in the events store.
        user.api
            .wait_process(
                &bucket.id,
                "web-1",
                "ticker",
                "ticker online",
                Duration::from_secs(30),
                |p| (p["status"] == "online").then_some(()),
            )
            .await?;
        let restart =
            json!({"server_name": "web-1", "method_name": "restart", "app_name": "ticker"});
        let r = user.api.trigger_pm2(&bucket.id, &restart).await?;
        ensure!(r.status == 200, "triggerPM2 restart: {}", r.body);
        user.api
            .wait_data(
                &bucket.id,
                "processEvents",
                &json!({"app_name": "ticker"}),
                "the restart's process event",
                Duration::from_secs(30),
                |e: &Value| (e["server_name"] == "web-1").then_some(()),
            )
            .await?;
        // The agent goes: its server's state is saved as it disconnects (a connected
        // one within 30 s of a change), so the backup holds it.
        let _ = pm2.run(&["kill"]).await;
        user.api
            .wait_server(
                &bucket.id,
                "web-1",
                "web-1 offline",
                Duration::from_secs(30),
                |s| (s["online"] == false).then_some(()),
            )
            .await?;

        let work = tempfile::tempdir()?;
        let env_file = km.write_env_file()?;
        let wizard = work.path().join("wizard");
        std::fs::create_dir(&wizard)?;
        std::fs::write(wizard.join("locked"), "")?;
        std::fs::write(wizard.join("setup-token"), "secret-token")?;
        let started = Instant::now();
        let archive = create(&env_file, &wizard, &work.path().join("backups"))?;
        let took = started.elapsed();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&archive)?.permissions());
        ensure!(mode & 0o777 == 0o600, "the archive's mode is {mode:o}");
        let verified = km_ok(&["backup", "verify", path(&archive)])?;
        ensure!(verified.contains("every file matches"), "{verified}");
        let listing = Command::new("tar").arg("tzf").arg(&archive).output()?;
        let listing = String::from_utf8_lossy(&listing.stdout);
        ensure!(
            listing.contains("wizard/locked") && !listing.contains("setup-token"),
            "the wizard's lock and not its token:\n{listing}"
        );

        // While km serves, a restore is refused.
        let (ok, out) = run_km(&[
            "backup",
            "restore",
            path(&archive),
            "--env-file",
            path(&env_file),
        ])?;
        ensure!(
            !ok && out.contains("km is running"),
            "restore while km runs:\n{out}"
        );

        // After the backup: the bucket deleted, another made; the restore undoes both.
        user.api
            .request(
                reqwest::Method::DELETE,
                &format!("/api/bucket/{}", bucket.id),
                None,
            )
            .await?;
        user.api.create_bucket("after-the-backup").await?;
        km.stop().await?;
        let restored = km_ok(&[
            "backup",
            "restore",
            path(&archive),
            "--env-file",
            path(&env_file),
            "--wizard-state",
            path(&work.path().join("wizard-restored")),
        ])?;
        ensure!(
            work.path().join("wizard-restored/locked").exists(),
            "the wizard's lock is not restored:\n{restored}"
        );
        km.restart().await?;
        holds_the_backed_up_data(&km, &user, &bucket.id).await?;

        // Onto a fresh appliance (embedded stores: a new data dir).
        if listing.contains("data/documents.sqlite") {
            let mut fresh = Km::start().await?;
            fresh.stop().await?;
            let fresh_env = work.path().join("fresh.env");
            km_ok(&[
                "backup",
                "restore",
                path(&archive),
                "--env-file",
                path(&fresh_env),
                "--data-dir",
                path(&fresh.data_dir()),
            ])?;
            fresh.restart().await?;
            holds_the_backed_up_data(&fresh, &user, &bucket.id).await?;
        }
        eprintln!(
            "backup: {} bytes written in {took:.1?}",
            std::fs::metadata(&archive)?.len()
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn damaged_archives_and_newer_stores_are_refused() {
    e2e(async {
        let mut km = Km::start_with(Vec::new()).await?;
        km.api().register_random().await?;
        let work = tempfile::tempdir()?;
        let env_file = km.write_env_file()?;
        let archive = create(&env_file, &work.path().join("none"), work.path())?;

        // One byte changed inside a stored file: named, nothing restored.
        let unpacked = work.path().join("unpacked");
        std::fs::create_dir(&unpacked)?;
        Command::new("tar").arg("xzf").arg(&archive).arg("-C").arg(&unpacked).status()?;
        let db = unpacked.join("data/documents.sqlite");
        let mut bytes = std::fs::read(&db)?;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&db, bytes)?;
        let damaged = work.path().join("damaged.tar.gz");
        let repack = |to: &Path| {
            Command::new("tar")
                .arg("czf")
                .arg(to)
                .arg("-C")
                .arg(&unpacked)
                .args(["manifest.json", "data", "settings"])
                .status()
        };
        repack(&damaged)?;
        let (ok, out) = run_km(&["backup", "verify", path(&damaged)])?;
        ensure!(!ok && out.contains("data/documents.sqlite: damaged"), "{out}");
        km.stop().await?;
        let before = std::fs::read(km.data_dir().join("documents.sqlite"))?;
        let (ok, out) = run_km(&["backup", "restore", path(&damaged), "--env-file", path(&env_file)])?;
        ensure!(!ok && out.contains("damaged"), "{out}");
        ensure!(
            std::fs::read(km.data_dir().join("documents.sqlite"))? == before,
            "a refused restore changed the data"
        );

        // A store from a newer km: refused before anything changes.
        let mut bytes = std::fs::read(&db)?;
        bytes[last] ^= 0xff;
        std::fs::write(&db, bytes)?;
        let conn = Command::new("python3")
            .arg("-c")
            .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA user_version=999'); c.commit()")
            .arg(&db)
            .status()?;
        ensure!(conn.success(), "python3 sqlite3");
        let manifest_path = unpacked.join("manifest.json");
        let mut manifest: Value = serde_json::from_slice(&std::fs::read(&manifest_path)?)?;
        manifest["schema"]["documents"] = json!(999);
        let (size, sha) = {
            let bytes = std::fs::read(&db)?;
            use sha2::Digest;
            (bytes.len(), hex::encode(sha2::Sha256::digest(&bytes)))
        };
        for f in manifest["files"].as_array_mut().unwrap() {
            if f["path"] == "data/documents.sqlite" {
                f["size"] = json!(size);
                f["sha256"] = json!(sha);
            }
        }
        std::fs::write(&manifest_path, serde_json::to_vec(&manifest)?)?;
        let newer = work.path().join("newer.tar.gz");
        repack(&newer)?;
        let (ok, out) = run_km(&["backup", "restore", path(&newer), "--env-file", path(&env_file)])?;
        ensure!(
            !ok && out.contains("schema version 999, newer than this km knows"),
            "{out}"
        );
        ensure!(
            std::fs::read(km.data_dir().join("documents.sqlite"))? == before,
            "a refused restore changed the data"
        );
        Ok(())
    })
    .await;
}

/// `KM_BACKUP_DIR`: the workers write a backup as the period starts (at once on a fresh
/// appliance), `/healthz` tells how it went, the archive verifies and holds the settings
/// km was given.
#[tokio::test]
async fn the_workers_back_up_on_schedule() {
    e2e(async {
        let work = tempfile::tempdir()?;
        let dir = work.path().join("scheduled");
        let km = Km::start_with(vec![
            ("KM_BACKUP_DIR".into(), dir.display().to_string()),
            ("KM_BACKUP_KEEP".into(), "2".into()),
        ])
        .await?;
        km.api().register_random().await?;
        let outcome = km
            .api()
            .poll_get(
                "/healthz",
                "a scheduled backup in /healthz",
                Duration::from_secs(30),
                |h| (h["backup"]["ok"] == true).then(|| h["backup"].clone()),
            )
            .await?;
        let file = outcome["file"].as_str().context("no file in the outcome")?;
        ensure!(outcome["bytes"].as_u64() > Some(0), "{outcome}");
        let verified = km_ok(&["backup", "verify", file])?;
        ensure!(verified.contains("every file matches"), "{verified}");
        let listing = Command::new("tar")
            .arg("xzOf")
            .arg(file)
            .arg("settings/km.env")
            .output()?;
        let settings = String::from_utf8_lossy(&listing.stdout);
        ensure!(
            settings.contains(&format!("KM_BACKUP_DIR={}", dir.display())),
            "the settings in the scheduled backup:\n{settings}"
        );
        Ok(())
    })
    .await;
}
