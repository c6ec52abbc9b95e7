//! The appliance image, booted for real: a Debian bookworm root filesystem
//! (debootstrap, cached), provisioned by `packer/provision.sh` exactly as the image
//! build does, booted under systemd with `systemd-nspawn` in a network namespace of its
//! own. From this host: the setup URL, the headless apply, every unit active, `/healthz`
//! through the gateway on port 80, a real `pm2 link`, a role restart, the wizard gone.
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
    Api, Pm2, e2e, km_bin, loadgen_bin, tail_file, target_dir, wizard_bin, workspace_dir,
};
use serde_json::{Value, json};

/// What debootstrap adds to minbase: systemd as PID 1, and the packages provision.sh
/// would otherwise download (it installs only what is missing).
const PACKAGES: &str = "systemd,systemd-sysv,dbus,iproute2,redis-server,ca-certificates,curl";
const UNITS: [&str; 8] = [
    "km.target",
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

/// A fresh root filesystem, provisioned like the image: the staging directory packer
/// uploads (binaries without debug info, units, helper files, README), then
/// `provision.sh` in a chroot with KM_IMAGE_BUILD=1.
fn provisioned_root(root: &Path) -> Result<()> {
    run(Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("-xf")
        .arg(rootfs_tarball()?))?;
    let stage = root.join("tmp/km-image");
    std::fs::create_dir_all(stage.join("bin"))?;
    for (bin, name) in [(km_bin(), "km"), (wizard_bin(), "km-wizard")] {
        run(Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&bin)
            .arg(stage.join("bin").join(name)))?;
    }
    let repo = workspace_dir();
    run(Command::new("cp")
        .arg("-r")
        .arg(repo.join("systemd"))
        .arg(repo.join("packer/files"))
        .arg(repo.join("packer/provision.sh"))
        .arg(repo.join("README.md"))
        .arg(&stage))?;
    let out = run(Command::new("chroot").arg(root).args([
        "env",
        "KM_IMAGE_BUILD=1",
        "bash",
        "/tmp/km-image/provision.sh",
        "/tmp/km-image",
    ]))?;
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
        provisioned_root(&root)?;
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
        for role in ["api", "auth", "realtime", "interactor"] {
            ensure!(health["roles"][role]["status"] == "ok", "{role} in /healthz: {health}");
        }
        for unit in ROLE_UNITS {
            ensure!(booted.is_active(unit) == "active", "{unit} is {}", booted.is_active(unit));
        }
        let env_file = booted.exec(&["cat", "/etc/km/km.env"])?;
        ensure!(env_file.contains(&format!("KM_SITE_URL={site}")), "km.env:\n{env_file}");

        // A real pm2 on this host links through the gateway on port 80.
        let token = http
            .post(format!("{site}/api/oauth/token"))
            .json(&json!({"grant_type": "password", "username": "admin", "password": "a-long-password-1", "client_id": "boot"}))
            .send()
            .await?
            .json::<Value>()
            .await?["access_token"]
            .as_str()
            .context("the admin cannot sign in")?
            .to_string();
        let api = Api::new(&site).with_token(&token);
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
        eprintln!(
            "boot: boot to setup URL {boot_to_url:.1?}; apply to healthy {apply_to_healthy:.1?}; \
             pm2 link to status {link_to_status:.1?}; {FLEET} simulated agents linked through the gateway in {fleet_linked:.1?}; \
             km-api restart to answering {api_restart:.1?}"
        );
        let _ = pm2.run(&["kill"]).await;
        drop(booted);
        drop(netns);
        Ok(())
    })
    .await;
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
