//! The appliance image, booted for real: a Debian bookworm root filesystem
//! (debootstrap, cached) with the appliance's package of this tree installed by
//! `packer/provision.sh` exactly as the image build does, booted under systemd with
//! `systemd-nspawn` in a network namespace of its own. From this host: the setup URL,
//! the headless apply, every unit active, `/healthz` through the gateway on port 80, a
//! real `pm2 link`, a role restart, the wizard gone. Then day 2: a backup, an upgrade to
//! the next version whose migration fails (rolled back by itself: the previous package
//! and the data back), the upgrade done (data intact, the agent back, the downtime
//! measured), the next version's licence key, and the backup restored onto a fresh image
//! of the next version (the same users, buckets, servers, events; the agent back).
//!
//! The next version is built by tests/run.sh into `target/upgrade-next` (release, one
//! documents migration more with the feature `test-migration`, a licence key made by
//! `km licence keygen` given at build time); `KM_E2E_NEXT_DIR` names another place.
//! And the units' lint: `systemd-analyze verify` silent, every service scored at most
//! 2.0 by `systemd-analyze security --offline=yes`.
//!
//! Needs root, debootstrap, systemd-container and iproute2 (tests/run.sh installs them).
//! The root filesystem is cached in `KM_E2E_CACHE` (default `/var/cache/km-e2e`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use km_e2e::{
    Api, Pm2, e2e, km_bin, loadgen_bin, post_visitor_form, tail_file, target_dir, workspace_dir,
};
use serde_json::{Value, json};

/// What debootstrap adds to minbase: systemd as PID 1, and the packages provision.sh
/// would otherwise download (it installs only what is missing).
const PACKAGES: &str = "systemd,systemd-sysv,dbus,iproute2,redis-server,ca-certificates,curl";
const UNITS: [&str; 10] = [
    "km.target",
    "km-wizard-start.path",
    "km-wizard-start.service",
    "km-gateway.service",
    "km-api.service",
    "km-auth.service",
    "km-realtime.service",
    "km-interactor.service",
    "km-workers.service",
    "km-wizard.service",
];
const ROLE_UNITS: [&str; 6] = [
    "km-gateway",
    "km-api",
    "km-auth",
    "km-realtime",
    "km-interactor",
    "km-workers",
];

/// Runs a command; its output, or an error with it.
fn run(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "{command:?} failed ({}):\n{text}",
        out.status
    );
    Ok(text)
}

fn cache_dir() -> PathBuf {
    std::env::var_os("KM_E2E_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/km-e2e"), PathBuf::from)
}

/// The cached bookworm root filesystem as a tarball, made once (about 40 s).
fn rootfs_tarball() -> Result<PathBuf> {
    let digest: u32 = PACKAGES
        .bytes()
        .fold(7, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    let tarball = cache_dir().join(format!("bookworm-minbase-{digest:08x}.tar"));
    if tarball.exists() {
        return Ok(tarball);
    }
    std::fs::create_dir_all(cache_dir())?;
    let dir = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(cache_dir())?;
    let started = Instant::now();
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={PACKAGES}"),
            "bookworm",
        ])
        .arg(dir.path())
        .arg("http://deb.debian.org/debian"))
    .context("debootstrap (apt-get install debootstrap)")?;
    let partial = tarball.with_extension("tar.partial");
    run(Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-cf")
        .arg(&partial)
        .arg("."))?;
    std::fs::rename(&partial, &tarball)?;
    eprintln!("boot: root filesystem made in {:.0?}", started.elapsed());
    Ok(tarball)
}

/// The appliance's package of the binaries in `bin_dir` (packaging/build-deb.sh), as
/// `version`, in `out`.
fn package(bin_dir: &Path, version: &str, out: &Path) -> Result<PathBuf> {
    let printed = run(Command::new(workspace_dir().join("packaging/build-deb.sh"))
        .arg("--bin-dir")
        .arg(bin_dir)
        .args(["--version", version])
        .arg("--out")
        .arg(out))?;
    let deb = printed
        .lines()
        .last()
        .map(PathBuf::from)
        .context("build-deb.sh named no package")?;
    ensure!(deb.exists(), "build-deb.sh printed {}", deb.display());
    Ok(deb)
}

/// A fresh root filesystem, provisioned like the image: `provision.sh` with the package
/// in its staging directory, in a chroot with KM_IMAGE_BUILD=1.
fn provisioned_root(root: &Path, deb: &Path) -> Result<()> {
    run(Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-xf")
        .arg(rootfs_tarball()?))?;
    let stage = root.join("tmp/km-image");
    std::fs::create_dir_all(&stage)?;
    std::fs::copy(deb, stage.join(deb.file_name().context("package name")?))?;
    std::fs::copy(
        workspace_dir().join("packer/provision.sh"),
        stage.join("provision.sh"),
    )?;
    // As on a build machine, /proc is there (systemd-tmpfiles needs it).
    let proc = root.join("proc");
    run(Command::new("mount")
        .args(["-t", "proc", "proc"])
        .arg(&proc))?;
    let out = run(Command::new("chroot").arg(root).args([
        "env",
        "KM_IMAGE_BUILD=1",
        "bash",
        "/tmp/km-image/provision.sh",
        "/tmp/km-image",
    ]));
    run(Command::new("umount").arg(&proc))?;
    let out = out?;
    ensure!(
        out.contains("provision: done"),
        "provision.sh did not finish:\n{out}"
    );
    std::fs::remove_dir_all(&stage)?;
    Ok(())
}

/// A network namespace with a veth pair: this host is `.1`, the appliance `.2`.
struct Netns {
    name: String,
    host_if: String,
    appliance_ip: String,
}

impl Netns {
    fn create() -> Result<Netns> {
        let n = std::process::id() % 250 + 1;
        let (name, host_if, peer) = (
            format!("km-boot-{n}"),
            format!("kmb{n}h"),
            format!("kmb{n}c"),
        );
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let ns = Netns {
            name,
            host_if,
            appliance_ip: format!("10.213.{n}.2"),
        };
        let host_ip = format!("10.213.{n}.1");
        for args in [
            vec!["netns", "add", &ns.name],
            vec![
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ],
            vec!["link", "set", &peer, "netns", &ns.name],
            vec!["addr", "add", &format!("{host_ip}/30"), "dev", &ns.host_if],
            vec!["link", "set", &ns.host_if, "up"],
            vec![
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{}/30", ns.appliance_ip),
                "dev",
                &peer,
            ],
            vec!["-n", &ns.name, "link", "set", &peer, "up"],
            vec!["-n", &ns.name, "link", "set", "lo", "up"],
            vec!["-n", &ns.name, "route", "add", "default", "via", &host_ip],
        ] {
            run(Command::new("ip").args(&args))?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The booted appliance: `systemd-nspawn -b` on a private D-Bus (this host's PID 1 is
/// not systemd), its console in `console.log`.
struct Booted {
    nspawn: Child,
    bus: Child,
    /// The container's PID 1 (systemd), for `nsenter`.
    leader: u32,
    console: PathBuf,
}

impl Booted {
    fn start(root: &Path, netns: &Netns, dir: &Path) -> Result<Booted> {
        let socket = dir.join("bus.socket");
        let bus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address=unix:path={}", socket.display()))
            .stdout(Stdio::null())
            .spawn()
            .context("dbus-daemon")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            ensure!(Instant::now() < deadline, "dbus-daemon made no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        let console = dir.join("console.log");
        let log = std::fs::File::create(&console)?;
        let nspawn = Command::new("systemd-nspawn")
            .args(["-q", "--register=no", "--keep-unit", "-b", "-D"])
            .arg(root)
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                netns.name
            ))
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                format!("unix:path={}", socket.display()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("systemd-nspawn (apt-get install systemd-container)")?;
        let mut booted = Booted {
            nspawn,
            bus,
            leader: 0,
            console,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(pid) = container_init(booted.nspawn.id()) {
                booted.leader = pid;
                return Ok(booted);
            }
            if let Some(status) = booted.nspawn.try_wait()? {
                bail!(
                    "systemd-nspawn exited ({status}):\n{}",
                    tail_file(&booted.console, 40)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "no systemd in the container after 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a command inside the appliance (all its namespaces).
    fn exec(&self, args: &[&str]) -> Result<String> {
        run(Command::new("nsenter")
            .arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .arg("--")
            .args(args))
    }

    fn is_active(&self, unit: &str) -> String {
        self.exec(&["systemctl", "is-active", unit])
            .unwrap_or_else(|e| e.to_string().lines().last().unwrap_or_default().to_string())
            .trim()
            .to_string()
    }

    fn journal(&self, unit: &str) -> String {
        self.exec(&["journalctl", "-u", unit, "-o", "cat", "--no-pager"])
            .unwrap_or_default()
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- appliance console ---\n{}",
                tail_file(&self.console, 60)
            );
            for unit in ROLE_UNITS.iter().chain(&["km-wizard"]) {
                eprintln!("--- journal of {unit} ---\n{}", self.journal(unit));
            }
        }
        let _ = self.exec(&["systemctl", "poweroff"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && matches!(self.nspawn.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = self.bus.kill();
        let _ = self.bus.wait();
    }
}

/// The container's systemd: the process named `systemd` below systemd-nspawn.
fn container_init(nspawn: u32) -> Option<u32> {
    let children = |pid: u32| -> Vec<u32> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|c| {
                c.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    };
    let mut queue = children(nspawn);
    while let Some(pid) = queue.pop() {
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "systemd")
        {
            return Some(pid);
        }
        queue.extend(children(pid));
    }
    None
}

async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_image_boots_configures_headless_and_serves_a_linked_pm2() {
    e2e(async {
        let dir = tempfile::Builder::new().prefix("km-boot-").tempdir_in(target_dir())?;
        let root = dir.path().join("root");
        std::fs::create_dir(&root)?;
        let t = Instant::now();
        let bin_dir = km_bin().parent().context("km's directory")?.to_path_buf();
        let this = package(&bin_dir, env!("CARGO_PKG_VERSION"), &dir.path().join("this"))?;
        provisioned_root(&root, &this)?;
        eprintln!("boot: root filesystem provisioned in {:.1?}", t.elapsed());
        for unit in UNITS {
            let out = run(Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", root.display())).arg(unit))?;
            ensure!(out.trim().is_empty(), "systemd-analyze verify {unit}:\n{out}");
        }

        let netns = Netns::create()?;
        let site = format!("http://{}", netns.appliance_ip);
        let booting = Instant::now();
        let booted = Booted::start(&root, &netns, dir.path())?;

        // The wizard prints its URL with the appliance's address and a one-time token.
        let prefix = format!("KM setup: open {site}/wizard/?token=");
        let setup_url = wait_for("the setup URL in the wizard's journal", Duration::from_secs(60), async || {
            booted
                .journal("km-wizard.service")
                .lines()
                .find_map(|l| l.find(&prefix).map(|i| l[i + "KM setup: open ".len()..].trim().to_string()))
        })
        .await?;
        let boot_to_url = booting.elapsed();
        ensure!(booted.is_active("km-wizard.service") == "active", "the wizard unit is not active");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        // The token becomes a cookie (and leaves the address bar); the page then opens.
        let no_redirect = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?;
        let first = no_redirect.get(&setup_url).send().await?;
        let cookie = first
            .headers()
            .get("set-cookie")
            .and_then(|c| c.to_str().ok())
            .and_then(|c| c.split(';').next())
            .with_context(|| format!("the setup URL answers {} without a cookie", first.status()))?
            .to_string();
        let page = no_redirect
            .get(format!("{site}/wizard/"))
            .header("cookie", &cookie)
            .send()
            .await?;
        ensure!(
            page.status() == 200,
            "the wizard page answers {} through the gateway",
            page.status()
        );
        let refused = http.get(format!("{site}/wizard/")).send().await?;
        ensure!(refused.status() == 403, "the wizard without its token answers {}", refused.status());
        let motd = booted.exec(&["/etc/update-motd.d/60-km"])?;
        ensure!(motd.contains(&setup_url), "the login message lacks the setup URL:\n{motd}");

        // Headless apply, as terraform's first-boot script runs it.
        let licence = run(Command::new(km_bin()).args(["licence", "sign", "--customer", "boot-test", "--process-limit", "0", "--days", "30", "--key"]).arg(workspace_dir().join("tests/keys/test-licence.key")))?;
        let licence = licence.lines().find(|l| l.starts_with("km1.")).context("no licence printed")?;
        std::fs::write(
            root.join("root/settings.env"),
            format!("KM_DEDICATED_KEY={licence}\nKM_SITE_URL={site}\nWIZARD_ADMIN_USERNAME=admin\nWIZARD_ADMIN_EMAIL=admin@example.com\nWIZARD_ADMIN_PASSWORD=a-long-password-1\n"),
        )?;
        let applying = Instant::now();
        let applied = booted.exec(&["km-wizard", "apply", "--settings", "/root/settings.env"])?;
        let health = wait_for("/healthz ok through the gateway", Duration::from_secs(30), async || {
            let r = http.get(format!("{site}/healthz")).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            (v["status"] == "ok").then_some(v)
        })
        .await?;
        let apply_to_healthy = applying.elapsed();
        ensure!(applied.contains("Lock the wizard"), "apply did not lock the wizard:\n{applied}");
        for role in ["api", "auth", "realtime", "interactor", "workers"] {
            ensure!(health["roles"][role]["status"] == "ok", "{role} in /healthz: {health}");
        }
        for unit in ROLE_UNITS {
            ensure!(booted.is_active(unit) == "active", "{unit} is {}", booted.is_active(unit));
        }
        let env_file = booted.exec(&["cat", "/etc/km/km.env"])?;
        ensure!(env_file.contains(&format!("KM_SITE_URL={site}")), "km.env:\n{env_file}");

        // A real pm2 on this host links through the gateway on port 80.
        let api = admin_api(&site, "the admin cannot sign in").await?;
        let bucket = api.create_bucket("production").await?;
        let pm2 = Pm2::new(&site)?;
        pm2.start_app("ticker", "setInterval(() => console.log('tick'), 500);").await?;
        let (code, out) = pm2.link(&bucket.secret_id, &bucket.public_id, "web-1").await?;
        ensure!(code == 0, "pm2 link failed ({code}):\n{out}");
        let linking = Instant::now();
        let pid = |p: &Value| p["pid"].as_i64();
        api.wait_process(&bucket.id, "web-1", "ticker", "web-1 online", Duration::from_secs(30), pid).await?;
        let link_to_status = linking.elapsed();
        let fleet_linked = match fleet_links(&api, &site, &http).await {
            Ok(took) => took,
            Err(e) => {
                let tail = |unit: &str| booted.journal(unit).lines().rev().take(15).collect::<Vec<_>>().join("\n");
                bail!("{e:#}\n--- km-gateway ---\n{}\n--- km-interactor ---\n{}", tail("km-gateway"), tail("km-interactor"));
            }
        };

        // A role restarts and the appliance answers again, the agent still online.
        let restarting = Instant::now();
        booted.exec(&["systemctl", "restart", "km-api"])?;
        api.wait_process(&bucket.id, "web-1", "ticker", "web-1 after km-api restarted", Duration::from_secs(30), pid).await?;
        let api_restart = restarting.elapsed();
        ensure!(booted.is_active("km-api") == "active", "km-api after its restart");

        // The wizard stopped after the apply, and stays off at the next start.
        wait_for("the wizard unit inactive", Duration::from_secs(40), async || {
            (booted.is_active("km-wizard.service") == "inactive").then_some(())
        })
        .await?;
        let stopped = http.get(format!("{site}/wizard/")).send().await?;
        let (status, text) = (stopped.status(), stopped.text().await?);
        ensure!(
            status == 503 && text.contains("sudo km-wizard reopen"),
            "/wizard/ once applied: HTTP {status}: {text}"
        );

        // Day 2 on the configured appliance: a backup, a failed upgrade, an upgrade.
        let day2 = upgrades(&booted, &root, dir.path(), &api, &bucket.id).await?;

        // The dashboard's button: km asks for the wizard (a file root's path unit
        // watches), root starts it, the admin's session opens it with a new token.
        let asked = Instant::now();
        match dashboard_opens_the_wizard(&site).await {
            Ok(()) => {}
            Err(e) => {
                let status = booted.exec(&["systemctl", "status", "--no-pager", "km-wizard-start.path", "km-wizard-start.service", "km-wizard.service"]);
                let status = status.unwrap_or_else(|e| format!("{e:#}"));
                bail!("{e:#}\n--- the wizard's units ---\n{status}\n{}", booted.journal("km-wizard-start.service"));
            }
        }
        let dashboard_took = asked.elapsed();
        ensure!(booted.is_active("km-wizard.service") == "active", "the wizard unit after the dashboard asked");

        // `km-wizard reopen` starts it again with a new URL.
        let reopened = booted.exec(&["km-wizard", "reopen"])?;
        let new_url = reopened
            .lines()
            .find_map(|l| l.strip_prefix("KM setup: open "))
            .with_context(|| format!("reopen printed no URL:\n{reopened}"))?
            .trim()
            .to_string();
        ensure!(
            new_url.starts_with(&format!("{site}/wizard/?token=")) && new_url != setup_url,
            "reopen printed {new_url}"
        );
        ensure!(
            booted.is_active("km-wizard.service") == "active",
            "the wizard unit after reopen"
        );
        let first = no_redirect.get(&new_url).send().await?;
        ensure!(
            first.status() == 303,
            "the reopened setup URL answers {}",
            first.status()
        );
        drop(booted);
        let restore_took = restored_on_a_fresh_image(dir.path(), &netns, &day2, &bucket.id).await?;
        eprintln!(
            "boot: boot to setup URL {boot_to_url:.1?}; apply to healthy {apply_to_healthy:.1?}; \
             the dashboard opened the wizard in {dashboard_took:.1?}; \
             pm2 link to status {link_to_status:.1?}; {FLEET} simulated agents linked through the gateway in {fleet_linked:.1?}; \
             km-api restart to answering {api_restart:.1?}; failed upgrade rolled back in {:.1?}; \
             upgrade downtime {:.1} s (until healthy; the agent back in {:.1?}); backup restored onto a fresh image in {restore_took:.1?}",
            day2.rolled_back_in, day2.downtime_s, day2.agent_back_in
        );
        let _ = pm2.run(&["kill"]).await;
        drop(netns);
        Ok(())
    })
    .await;
}

/// The API as the admin the headless apply made (`what` says where it failed).
async fn admin_api(site: &str, what: &str) -> Result<Api> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let token = http
        .post(format!("{site}/api/oauth/token"))
        .json(&json!({"grant_type": "password", "username": "admin", "password": "a-long-password-1", "client_id": "boot"}))
        .send()
        .await?
        .json::<Value>()
        .await?["access_token"]
        .as_str()
        .context(what.to_string())?
        .to_string();
    Ok(Api::new(site).with_token(&token))
}

/// What day 2 left for the fresh image, and its numbers.
struct DayTwo {
    /// The backup, on this host.
    backup: PathBuf,
    /// The next version's package.
    next: PathBuf,
    rolled_back_in: Duration,
    /// As `km-wizard upgrade` measured it: from the restart until healthy.
    downtime_s: f64,
    /// From the upgrade's end until the agent's server was online again.
    agent_back_in: Duration,
}

/// The directory of the next version's binaries and licence key (tests/run.sh).
fn next_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("KM_E2E_NEXT_DIR")
        .map_or_else(|| target_dir().join("upgrade-next"), PathBuf::from);
    ensure!(
        dir.join("km").exists()
            && dir.join("km-wizard").exists()
            && dir.join("vendor.key").exists(),
        "the next version is not built in {}: tests/run.sh builds it (KM_E2E_NEXT_DIR names another place)",
        dir.display()
    );
    Ok(dir)
}

/// Runs one SQL statement on a database of the appliance from this host.
fn sqlite(db: &Path, sql: &str) -> Result<()> {
    run(Command::new("python3")
        .arg("-c")
        .arg("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()")
        .arg(db)
        .arg(sql))
    .map(|_| ())
}

/// The server `web-1` online again (its agent relinked), and how long that took.
async fn agent_back(api: &Api, bucket: &str, after: &str) -> Result<Duration> {
    let t = Instant::now();
    api.wait_server(
        bucket,
        "web-1",
        &format!("web-1 online after {after}"),
        Duration::from_secs(90),
        |s| (s["online"] == true).then_some(()),
    )
    .await?;
    Ok(t.elapsed())
}

/// A restart's process event (so the backup holds an event), a backup while km serves,
/// an upgrade whose migration fails, the upgrade, the next version's licence key.
async fn upgrades(
    booted: &Booted,
    root: &Path,
    work: &Path,
    api: &Api,
    bucket: &str,
) -> Result<DayTwo> {
    // The workers' scheduled backup (KM_BACKUP_DIR in the package's first km.env).
    api.poll_get(
        "/healthz",
        "the scheduled backup in /healthz",
        Duration::from_secs(60),
        |h| (h["roles"]["api"]["backup"]["ok"] == true).then_some(()),
    )
    .await?;
    let next_dir = next_dir()?;
    let next = package(
        &next_dir,
        &format!("{}+next1", env!("CARGO_PKG_VERSION")),
        &work.join("next"),
    )?;
    std::fs::copy(&next, root.join("root/km_next.deb"))?;
    let restart = json!({"server_name": "web-1", "method_name": "restart", "app_name": "ticker"});
    let r = api.trigger_pm2(bucket, &restart).await?;
    ensure!(r.status == 200, "triggerPM2 restart: {}", r.body);
    api.wait_data(
        bucket,
        "processEvents",
        &json!({"app_name": "ticker"}),
        "the restart's process event",
        Duration::from_secs(30),
        |e| (e["server_name"] == "web-1").then_some(()),
    )
    .await?;

    let created = booted.exec(&["km", "backup", "create"])?;
    let archive = created
        .lines()
        .find_map(|l| l.strip_prefix("written: "))
        .and_then(|l| l.split(" (").next())
        .with_context(|| format!("km backup create named no archive:\n{created}"))?
        .to_string();
    let verified = booted.exec(&["km", "backup", "verify", &archive])?;
    ensure!(verified.contains("every file matches"), "{verified}");
    let backup = root.join(archive.trim_start_matches('/'));

    // The next version's migration fails: its table is there already.
    let db = root.join("var/lib/km/documents.sqlite");
    sqlite(&db, "CREATE TABLE upgrade_probe (id INTEGER PRIMARY KEY)")?;
    let upgrading = Instant::now();
    let failed = booted.exec(&["km-wizard", "upgrade", "/root/km_next.deb"]);
    let rolled_back_in = upgrading.elapsed();
    let why = format!(
        "{:#}",
        failed
            .err()
            .context("the upgrade whose migration fails succeeded")?
    );
    ensure!(
        why.contains("failed") && why.contains("are back"),
        "the failed upgrade says:\n{why}"
    );
    let version = booted.exec(&["dpkg-query", "-W", "-f=${Version}", "km"])?;
    ensure!(
        version.trim() == env!("CARGO_PKG_VERSION"),
        "after the rollback km {version} is installed"
    );
    agent_back(api, bucket, "the rollback").await?;
    ensure!(
        api.status(bucket).await?.to_string().contains("ticker"),
        "the data after the rollback"
    );

    sqlite(&db, "DROP TABLE upgrade_probe")?;
    let upgraded = booted.exec(&["km-wizard", "upgrade", "/root/km_next.deb"])?;
    let downtime_s = upgraded
        .split("answered healthy ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse::<f64>().ok())
        .with_context(|| format!("km-wizard upgrade printed:\n{upgraded}"))?;
    ensure!(
        downtime_s < 30.0,
        "the upgrade's downtime was {downtime_s} s"
    );
    let version = booted.exec(&["dpkg-query", "-W", "-f=${Version}", "km"])?;
    ensure!(
        version.trim().ends_with("+next1"),
        "after the upgrade km {version} is installed"
    );
    let agent_back_in = agent_back(api, bucket, "the upgrade").await?;
    let status = api.status(bucket).await?;
    ensure!(
        status.to_string().contains("ticker"),
        "the data after the upgrade: {status}"
    );

    // The next version trusts the licence key given to its build; this build does not.
    let signed = run(Command::new(km_bin())
        .args([
            "licence",
            "sign",
            "--customer",
            "vendor-test",
            "--process-limit",
            "0",
            "--days",
            "30",
            "--key",
        ])
        .arg(next_dir.join("vendor.key")))?;
    let licence = signed
        .lines()
        .find(|l| l.starts_with("km1."))
        .context("no licence printed")?;
    let shown = booted.exec(&["km", "licence", "show", "--licence", licence])?;
    ensure!(
        shown.contains("verified by:   production key 1"),
        "the next version's km licence show:\n{shown}"
    );
    ensure!(
        run(Command::new(km_bin()).args(["licence", "show", "--licence", licence])).is_err(),
        "a build without that key accepts the licence"
    );
    Ok(DayTwo {
        backup,
        next,
        rolled_back_in,
        downtime_s,
        agent_back_in,
    })
}

/// A fresh image of the next version, the backup restored onto it by `km-wizard restore`:
/// the admin signs in, the bucket, its server and events are there, the agent relinks.
async fn restored_on_a_fresh_image(
    work: &Path,
    netns: &Netns,
    day2: &DayTwo,
    bucket: &str,
) -> Result<Duration> {
    let root = work.join("fresh");
    let run_dir = work.join("fresh-run");
    std::fs::create_dir(&root)?;
    std::fs::create_dir(&run_dir)?;
    provisioned_root(&root, &day2.next)?;
    std::fs::copy(&day2.backup, root.join("root/backup.tar.gz"))?;
    let booted = Booted::start(&root, netns, &run_dir)?;
    wait_for(
        "the fresh image's wizard",
        Duration::from_secs(60),
        async || (booted.is_active("km-wizard.service") == "active").then_some(()),
    )
    .await?;
    let restoring = Instant::now();
    let out = booted.exec(&["km-wizard", "restore", "/root/backup.tar.gz"])?;
    let took = restoring.elapsed();
    ensure!(out.contains("restored in"), "km-wizard restore:\n{out}");
    ensure!(
        booted.is_active("km-wizard.service") == "inactive",
        "the wizard after restoring a configured appliance"
    );
    for unit in ROLE_UNITS {
        ensure!(
            booted.is_active(unit) == "active",
            "{unit} is {} after the restore",
            booted.is_active(unit)
        );
    }
    let site = format!("http://{}", netns.appliance_ip);
    let api = admin_api(&site, "the admin cannot sign in on the restored image").await?;
    let buckets = api.get_ok("/api/bucket/").await?.to_string();
    ensure!(
        buckets.contains("production") && buckets.contains("fleet"),
        "buckets restored: {buckets}"
    );
    let servers = api
        .get_ok(&format!("/api/bucket/{bucket}/meta_servers"))
        .await?;
    ensure!(
        servers.to_string().contains("web-1"),
        "servers restored: {servers}"
    );
    let events = api
        .data(bucket, "processEvents", &json!({"app_name": "ticker"}))
        .await?;
    ensure!(
        events.as_array().is_some_and(|e| !e.is_empty()),
        "process events restored: {events}"
    );
    agent_back(&api, bucket, "the restore onto a fresh image").await?;
    drop(booted);
    Ok(took)
}

/// The admin signs in to the dashboard and presses "Change the appliance's settings" on
/// the account page, the wizard being stopped: it ends on the wizard's page.
async fn dashboard_opens_the_wizard(site: &str) -> Result<()> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(40))
        .build()?;
    let signed_in = post_visitor_form(
        &http,
        site,
        "/login",
        &[("login", "admin"), ("password", "a-long-password-1")],
    )
    .await?;
    ensure!(
        signed_in.status() == 303,
        "the admin's sign-in answered {}",
        signed_in.status()
    );
    let session = signed_in
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("km_session="))
        .and_then(|c| c.split(';').next())
        .context("no session cookie")?
        .to_string();
    let account = http
        .get(format!("{site}/account"))
        .header("cookie", &session)
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        account.contains("Change the appliance's settings"),
        "the account page has no button:\n{account}"
    );
    let marker = "name=\"csrf\" value=\"";
    let csrf = account
        .split(marker)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("no csrf on the account page")?
        .to_string();
    let asked = http
        .post(format!("{site}/account/wizard"))
        .header("cookie", &session)
        .form(&[("csrf", &csrf)])
        .send()
        .await?;
    let (status, location) = (
        asked.status(),
        asked
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .map(str::to_string),
    );
    ensure!(
        status == 307 && location.as_deref() == Some("/wizard/reopen"),
        "POST /account/wizard answered {status} to {location:?}: {}",
        asked.text().await.unwrap_or_default()
    );
    let reopened = http
        .post(format!("{site}/wizard/reopen"))
        .header("cookie", &session)
        .form(&[("csrf", &csrf)])
        .send()
        .await?;
    let url = reopened
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .filter(|l| l.starts_with("/wizard/?token="))
        .with_context(|| format!("POST /wizard/reopen answered {}", reopened.status()))?
        .to_string();
    let entry = http.get(format!("{site}{url}")).send().await?;
    let cookie = entry
        .headers()
        .get("set-cookie")
        .and_then(|c| c.to_str().ok())
        .and_then(|c| c.split(';').next())
        .context("the new setup URL sets no cookie")?
        .to_string();
    let page = http
        .get(format!("{site}/wizard/"))
        .header("cookie", cookie)
        .send()
        .await?;
    ensure!(
        page.status() == 200,
        "the wizard opened from the dashboard answers {}",
        page.status()
    );
    Ok(())
}

/// Simulated agents linked at once through the gateway (two descriptors each there, one in
/// the interactor: over systemd's default soft limit of 1024 open files).
const FLEET: usize = 5_000;

/// [`FLEET`] simulated agents (km-loadgen, the agent's real handshake; a status every 10 s
/// each, as debug builds serve here) link through port 80 while `/healthz` stays healthy;
/// the time until all were connected.
async fn fleet_links(api: &Api, site: &str, http: &reqwest::Client) -> Result<Duration> {
    let bucket = api.create_bucket("fleet").await?;
    let started = Instant::now();
    let loadgen = tokio::process::Command::new(loadgen_bin())
        .args([
            "--target",
            site,
            "--servers",
            &FLEET.to_string(),
            "--processes",
            "2",
        ])
        .args([
            "--seconds",
            "15",
            "--logs-per-s",
            "0",
            "--status-every-ms",
            "10000",
            "--connect-rate",
            "1000",
        ])
        .env("KM_PUBLIC", &bucket.public_id)
        .env("KM_SECRET", &bucket.secret_id)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("km-loadgen")?;
    let run = loadgen.wait_with_output();
    tokio::pin!(run);
    let mut all_linked = None;
    let output = loop {
        tokio::select! {
            output = &mut run => break output?,
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                let health = http.get(format!("{site}/healthz")).timeout(Duration::from_secs(3)).send().await;
                let health: Value = health.context("/healthz while the fleet links")?.json().await?;
                ensure!(health["status"] == "ok", "/healthz while the fleet links: {health}");
                let sockets = health["roles"]["interactor"]["agents"]["sockets"].as_u64().unwrap_or(0);
                if all_linked.is_none() && sockets > FLEET as u64 {
                    all_linked = Some(started.elapsed());
                }
            }
        }
    };
    let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "km-loadgen printed no report:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    ensure!(
        report["servers_connected"] == FLEET && report["servers_failed"].as_u64().unwrap_or(0) == 0,
        "km-loadgen: {report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    all_linked.with_context(|| format!("the interactor never held {FLEET} sockets: {report}"))
}

/// Every service of `systemd/` scores at most 2.0 ("OK") offline, with nothing on stderr.
#[test]
fn units_are_hardened() {
    if !km_e2e::enabled("systemd-analyze") {
        return;
    }
    let dir = workspace_dir().join("systemd");
    let mut scores = Vec::new();
    for unit in UNITS.iter().filter(|u| u.ends_with(".service")) {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(dir.join(unit))
            .output()
            .expect("systemd-analyze (apt-get install systemd)");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{unit}: {stderr}"
        );
        let score: f64 = stdout
            .lines()
            .find_map(|l| l.split_once(&format!("Overall exposure level for {unit}: ")))
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no overall score in\n{stdout}"));
        assert!(
            score <= 2.0,
            "{unit} scores {score} (more than 2.0):\n{stdout}"
        );
        scores.push(format!("{unit} {score}"));
    }
    let listed: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for file in &listed {
        assert!(
            UNITS.contains(&file.as_str()),
            "{file} in systemd/ is not checked here"
        );
    }
    eprintln!("units: {}", scores.join(", "));
}
