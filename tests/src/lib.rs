//! Harness for end-to-end tests: the real `km` binary, real pm2 7.0.4 agents, and a small
//! HTTP client for km's API. Nothing is mocked: every test starts its own `km` on a free
//! loopback port with a temporary data dir, and its own pm2 daemon with a fresh `PM2_HOME`.
//!
//! Environment knobs:
//! - `KM_BIN`: the `km` binary (default `<target>/debug/km`, where `<target>` is
//!   `CARGO_TARGET_DIR` or `<workspace>/target`).
//! - `KM_WIZARD_BIN`: the `km-wizard` binary (default `<target>/debug/km-wizard`). The setup
//!   tests need both built with the test licence key trusted (`cargo build --workspace
//!   --features km-appliance/test-licence`, as `tests/run.sh` does).
//! - `KM_E2E_NODE_DIR`: where the npm packages of [`NPM_PACKAGES`] (pm2, `@pm2/io`, `tx2`, `pmx`,
//!   `@pm2/js-api`, playwright-core, axe-core, OpenTelemetry's) are installed (default `<target>/e2e-node`); installed
//!   there on first use, under a file lock.
//! - `KM_E2E_KEEP=1`: keep the temporary dirs (km data and log, `PM2_HOME`) for inspection.
//! - `KM_E2E=1`: run the tests that need real servers, clients or tools; without it they
//!   say they were skipped and why (see [`enabled`]), so that a plain `cargo test
//!   --workspace` passes on a bare machine.
//!
//! The project runs everything with `tests/run.sh` (installs what the tests need, builds,
//! then `KM_E2E=1 cargo test --workspace -- --test-threads=2`). Tests wrap their body in
//! [`e2e`] so that a failure shows the tails of the km and pm2 logs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// npm packages the tests need, pinned. Keep in sync with `tests/run.sh`. playwright-core
/// drives Debian's `/usr/bin/chromium` (it downloads no browser of its own).
pub const NPM_PACKAGES: [&str; 14] = [
    "pm2@7.0.4",
    "@pm2/io@6.1.0",
    "tx2@1.0.5",
    // The older library whose metrics carry alert rules (`alert`).
    "pmx@1.6.8",
    "@pm2/js-api@0.8.1",
    "playwright-core@1.65.1",
    "axe-core@4.14.1",
    // What `pm2 start --trace` needs (pm2 7 installs them on first use otherwise, as
    // lib/OtelManager.js pins them).
    "@opentelemetry/sdk-node@0.221.0",
    "@opentelemetry/auto-instrumentations-node@0.79.0",
    // Services without pm2 sending spans: OpenTelemetry's own exporters.
    "@opentelemetry/sdk-trace-base@2.10.0",
    "@opentelemetry/resources@2.10.0",
    "@opentelemetry/exporter-trace-otlp-http@0.221.0",
    "@opentelemetry/exporter-trace-otlp-proto@0.221.0",
    "@opentelemetry/exporter-zipkin@2.10.0",
];

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Cargo's target dir: `CARGO_TARGET_DIR` if set (relative to the workspace), else
/// `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(p) if !p.is_empty() => workspace_dir().join(p),
        _ => workspace_dir().join("target"),
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A short random suffix for unique names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 4]>()))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Removes ANSI escape sequences (pm2 colours its output even when not on a TTY).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c2 in chars.by_ref() {
                    if ('@'..='~').contains(&c2) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The last `n` lines of a file (empty when unreadable).
pub fn tail_file(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Pretty JSON, cut to `max` characters, for failure messages.
pub fn show(v: &Value, max: usize) -> String {
    let s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} more bytes)", &s[..end], s.len() - end)
    } else {
        s
    }
}

fn keep_dirs() -> bool {
    std::env::var("KM_E2E_KEEP").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("create temp dir")
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: plain kill(2) on a pid this harness started.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Waits for a std child with a deadline; kills it when the deadline passes.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// Test wrapper and diagnostics
// ---------------------------------------------------------------------------------------

thread_local! {
    /// Log tails saved by `Km` and `Pm2` when dropped, shown if the test then fails.
    static DIAGNOSTICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Prints `text` now when the thread is panicking, else keeps it for [`e2e`].
fn diagnostic(text: String) {
    if std::thread::panicking() {
        eprintln!("{text}");
    } else {
        DIAGNOSTICS.with(|d| d.borrow_mut().push(text));
    }
}

/// Runs a test body. On error it panics with the error chain followed by the tails of the
/// logs of every km and pm2 the body started (saved when they were dropped).
///
/// ```ignore
/// #[tokio::test]
/// async fn my_test() {
///     e2e(async {
///         let km = Km::start().await?;
///         Ok(())
///     })
///     .await
/// }
/// ```
pub async fn e2e(body: impl Future<Output = Result<()>>) {
    if !enabled("the km binary with real agents, servers and clients") {
        return;
    }
    DIAGNOSTICS.with(|d| d.borrow_mut().clear());
    let res = body.await;
    let diags = DIAGNOSTICS.with(|d| std::mem::take(&mut *d.borrow_mut()));
    if let Err(e) = res {
        panic!("{e:#}\n\n{}", diags.join("\n"));
    }
}

/// Whether tests that need real servers, clients or tools run: `KM_E2E=1`, which the
/// README's test command sets (then a missing one is a failure, never a skip). Otherwise
/// the calling test says on the terminal that it was skipped and what it needs.
pub fn enabled(needs: &str) -> bool {
    if std::env::var("KM_E2E").is_ok_and(|v| v == "1") {
        return true;
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    // Past the test harness's capture (it takes only `print!`/`eprint!`), so that a
    // passing run shows what it did not try.
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test}: needs {needs} (KM_E2E=1 runs it)"
    );
    false
}

// ---------------------------------------------------------------------------------------
// real servers the stores run on
// ---------------------------------------------------------------------------------------

/// A real MongoDB-wire server (SecantusDB, `pip install secantusdb`) on a free loopback
/// port with its data in a temp dir; killed on drop.
pub struct SecantusDb {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl SecantusDb {
    /// Starts it and waits until it listens (15 s at most). The port is picked free,
    /// then bound by the server a moment later: another test may take it in between
    /// (then what answers on the port is not the server, which exits), so readiness is
    /// the server's own listening socket, and a server that exits is started again on
    /// another port.
    pub fn start() -> Result<SecantusDb> {
        for _ in 0..3 {
            if let Some(server) = SecantusDb::start_once()? {
                return Ok(server);
            }
        }
        bail!("secantusd-py exited at start three times (its port taken, or see its own errors)")
    }

    fn start_once() -> Result<Option<SecantusDb>> {
        let dir = temp_dir("km-secantus-")?;
        let port = free_port()?;
        let child = Command::new("secantusd-py")
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--storage-path",
            ])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start secantusd-py (pip install secantusdb; tests/run.sh installs it)")?;
        let mut server = SecantusDb {
            child,
            port,
            _dir: dir,
        };
        let listening = wait_listening(&mut server.child, port, Duration::from_secs(15))
            .context("secantusd-py")?;
        Ok(listening.then_some(server))
    }

    /// A connection string for `database`.
    pub fn url(&self, database: &str) -> String {
        format!("mongodb://127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for SecantusDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Redis server on a free loopback port, nothing saved to disk; killed on drop.
pub struct Redis {
    child: Child,
    port: u16,
    password: Option<String>,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Result<Redis> {
        Redis::start_with(None)
    }

    /// A Redis that requires `password` (`--requirepass`).
    pub fn start_with_password(password: &str) -> Result<Redis> {
        Redis::start_with(Some(password))
    }

    /// Started again on another port if it exits before it listens (its port taken by
    /// another test between pick and bind).
    fn start_with(password: Option<&str>) -> Result<Redis> {
        for _ in 0..3 {
            if let Some(server) = Redis::start_once(password)? {
                return Ok(server);
            }
        }
        bail!("redis-server exited at start three times (its port taken, or see its own errors)")
    }

    fn start_once(password: Option<&str>) -> Result<Option<Redis>> {
        let dir = temp_dir("km-redis-")?;
        let port = free_port()?;
        let mut command = Command::new("redis-server");
        command
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(dir.path());
        if let Some(password) = password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "start redis-server (apt-get install redis-server; tests/run.sh installs it)",
            )?;
        let mut server = Redis {
            child,
            port,
            password: password.map(str::to_string),
            _dir: dir,
        };
        let listening = wait_listening(&mut server.child, port, Duration::from_secs(10))
            .context("redis-server")?;
        Ok(listening.then_some(server))
    }

    /// `redis://127.0.0.1:<port>/`, with the password when it has one.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Freezes the server (SIGSTOP): requests hang as in a network outage.
    pub fn pause(&self) {
        signal(self.child.id() as i32, libc::SIGSTOP);
    }

    pub fn resume(&self) {
        signal(self.child.id() as i32, libc::SIGCONT);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One scrape job of [`Prometheus`]: km's `path` on `target` (host:port) with a bearer
/// token.
pub struct ScrapeJob {
    pub name: String,
    pub target: String,
    pub path: String,
    pub token: String,
}

/// A real Prometheus (Debian's package) on a free loopback port scraping its jobs every
/// second, its data in a temporary directory; killed on drop.
pub struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    pub async fn start(jobs: &[ScrapeJob]) -> Result<Prometheus> {
        let dir = temp_dir("km-prometheus-")?;
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for j in jobs {
            config += &format!(
                "  - job_name: {}\n    metrics_path: {}\n    authorization:\n      credentials: {}\n    static_configs:\n      - targets: ['{}']\n",
                j.name, j.path, j.token, j.target
            );
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start prometheus (apt-get install prometheus)")?;
        let mut prometheus = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(format!("{}/-/ready", prometheus.url())).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(prometheus);
            }
            if let Some(st) = prometheus.child.try_wait()? {
                bail!("prometheus exited at start ({st}):\n{}", prometheus.log());
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready within 30 s:\n{}", prometheus.log());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        tail_file(&self.dir.path().join("prometheus.log"), 30)
    }

    /// `GET /api/v1/<what>` with `params`: its `data`.
    pub async fn api(&self, what: &str, params: &[(&str, &str)]) -> Result<Value> {
        let url = format!("{}/api/v1/{what}", self.url());
        let response = reqwest::Client::new()
            .get(&url)
            .query(params)
            .send()
            .await?;
        let body: Value = response.json().await?;
        ensure!(body["status"] == "success", "{url}: {body}");
        Ok(body["data"].clone())
    }

    /// The samples of an instant query: `(labels, value)`.
    pub async fn query(&self, promql: &str) -> Result<Vec<(Value, f64)>> {
        let data = self.api("query", &[("query", promql)]).await?;
        Ok((data["result"].as_array().into_iter().flatten())
            .map(|r| {
                let value = r["value"][1].as_str().and_then(|v| v.parse().ok());
                (r["metric"].clone(), value.unwrap_or(f64::NAN))
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The three scale-out stores, each a real server on a free port.
pub struct ScaleOut {
    pub mongo: SecantusDb,
    pub search: OsMem,
    pub redis: Redis,
}

impl ScaleOut {
    pub fn start() -> Result<ScaleOut> {
        Ok(ScaleOut {
            mongo: SecantusDb::start()?,
            search: OsMem::start()?,
            redis: Redis::start()?,
        })
    }

    /// km's environment for them.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KM_MONGO_URL".into(), self.mongo.url("km")),
            ("KM_ELASTICSEARCH_URL".into(), self.search.url().into()),
            ("KM_REDIS_URL".into(), self.redis.url()),
        ]
    }
}

/// Waits until `child` itself listens on `port` (not whatever answers there): true, or
/// false when it exited first (most likely its port was taken between pick and bind).
fn wait_listening(child: &mut Child, port: u16, within: Duration) -> Result<bool> {
    let deadline = Instant::now() + within;
    while !listens_on(child.id(), port) {
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        if Instant::now() > deadline {
            bail!("did not listen on 127.0.0.1:{port} within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(true)
}

/// Whether process `pid` holds a socket listening on TCP `port` (IPv4), read from
/// `/proc/net/tcp` and the process's descriptors.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let suffix = format!(":{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local address, state (0A: listening), inode
            (f.len() > 9 && f[1].ends_with(&suffix) && f[3] == "0A")
                .then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| inodes.iter().any(|i| target.to_string_lossy() == *i))
}

/// A real Elasticsearch-API server (osmem-server, `pip install osmem-server`, in memory)
/// on a free loopback port; killed on drop.
pub struct OsMem {
    child: Child,
    url: String,
}

impl OsMem {
    /// Starts it; it prints `{"url": ..}` once listening.
    pub fn start() -> Result<OsMem> {
        let package = Command::new("python3")
            .args([
                "-c",
                "import osmem_server, os; print(os.path.dirname(osmem_server.__file__))",
            ])
            .output()
            .context("python3 (for osmem-server's location)")?;
        if !package.status.success() {
            bail!(
                "osmem_server is not installed (pip install osmem-server; tests/run.sh installs it)"
            );
        }
        let bin =
            PathBuf::from(String::from_utf8_lossy(&package.stdout).trim()).join("bin/osmem-server");
        let mut child = Command::new(&bin)
            .args(["-addr", "127.0.0.1:0", "-no-stdin-watch"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let stdout = child.stdout.take().context("osmem-server stdout")?;
        let mut first = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first)?;
        let announced: Value =
            serde_json::from_str(&first).with_context(|| format!("osmem-server said {first:?}"))?;
        let url = announced["url"]
            .as_str()
            .context("osmem-server gave no url")?
            .to_string();
        Ok(OsMem { child, url })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Freezes the server (SIGSTOP): connections hang as in a network outage.
    pub fn pause(&self) {
        signal(self.child.id() as i32, libc::SIGSTOP);
    }

    /// Lets a paused server run again, its data intact.
    pub fn resume(&self) {
        signal(self.child.id() as i32, libc::SIGCONT);
    }
}

impl Drop for OsMem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// km
// ---------------------------------------------------------------------------------------

/// Path of the `km` binary under test.
pub fn km_bin() -> PathBuf {
    match std::env::var_os("KM_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_dir().join("debug/km"),
    }
}

/// Path of the `km-loadgen` binary (`KM_LOADGEN_BIN`, default `<target>/debug/km-loadgen`).
pub fn loadgen_bin() -> PathBuf {
    match std::env::var_os("KM_LOADGEN_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_dir().join("debug/km-loadgen"),
    }
}

/// A real `km serve` subprocess on a free loopback port with a temporary data dir.
/// Its stdout and stderr go to `km.log` in its temp dir (appended across restarts).
/// Runs `km serve` (free ports, a temp data dir) with `env`, expecting it to refuse to
/// start: its exit status and stderr, or an error if it still runs after 10 s.
pub fn km_start_failure(env: &[(&str, &str)]) -> Result<(ExitStatus, String)> {
    let data = temp_dir("km-e2e-start-")?;
    let mut child = Command::new(km_bin())
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()?))
        .arg("--data-dir")
        .arg(data.path())
        .env("KM_HTTPS_LISTEN", format!("127.0.0.1:{}", free_port()?))
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn km")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("km still runs 10 s after start with {env:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = child
        .stderr
        .take()
        .map(std::io::read_to_string)
        .transpose()?
        .unwrap_or_default();
    Ok((status, stderr))
}

/// Killed on drop; on a panicking drop the log's tail is printed.
pub struct Km {
    bin: PathBuf,
    /// Extra environment (`KM_MONGO_URL`...), kept across restarts.
    env: Vec<(String, String)>,
    /// The scale-out stores this km runs on, when the suite runs on them.
    _stores: Option<ScaleOut>,
    port: u16,
    /// The address km listens on (loopback unless a test needs another).
    listen_ip: std::net::IpAddr,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    /// One `km serve`, or one process per role with `KM_E2E_ROLES=apart`.
    children: Vec<Child>,
    /// The roles' ports and bus when they run apart.
    apart: Option<RolesApart>,
}

/// The roles of km as separate processes, as the appliance's units run them: the gateway
/// on km's port forwards to the others on their own ports; they share a Redis bus.
struct RolesApart {
    env: Vec<(String, String)>,
    _bus: Option<Redis>,
}

const ROLES: [&str; 6] = [
    "gateway",
    "api",
    "auth",
    "realtime",
    "interactor",
    "workers",
];

impl RolesApart {
    /// With `KM_E2E_ROLES=apart`; the bus is the test's Redis if it gives one.
    fn from_env(env: &[(String, String)]) -> Result<Option<RolesApart>> {
        if std::env::var("KM_E2E_ROLES").as_deref() != Ok("apart") {
            return Ok(None);
        }
        let mut apart = RolesApart {
            env: Vec::new(),
            _bus: None,
        };
        apart.pick_ports()?;
        if !env.iter().any(|(k, _)| k == "KM_REDIS_URL") {
            let redis = Redis::start()?;
            apart.env.push(("KM_REDIS_URL".into(), redis.url()));
            apart._bus = Some(redis);
        }
        Ok(Some(apart))
    }

    /// Free ports for the roles (again after another test took one first).
    fn pick_ports(&mut self) -> Result<()> {
        self.env.retain(|(k, _)| !k.ends_with("_LISTEN"));
        for var in [
            "KM_API_LISTEN",
            "KM_AUTH_LISTEN",
            "KM_REALTIME_LISTEN",
            "KM_INTERACTOR_LISTEN",
            "KM_WORKERS_LISTEN",
        ] {
            self.env
                .push((var.to_string(), format!("127.0.0.1:{}", free_port()?)));
        }
        Ok(())
    }
}

impl Km {
    /// [`Km::start_with`], listening on every address (for requests from a
    /// non-loopback address).
    pub async fn start_on_all_addresses(env: Vec<(String, String)>) -> Result<Km> {
        let mut km = Km::start_on(free_port()?, env).await?;
        km.listen_ip = std::net::Ipv4Addr::UNSPECIFIED.into();
        km.restart().await?;
        Ok(km)
    }

    /// Starts km and waits until `GET /healthz` answers 200 (20 s at most). With
    /// `KM_E2E_STORES=scale-out` it runs on its own MongoDB, Elasticsearch and Redis.
    pub async fn start() -> Result<Km> {
        Km::start_plus(Vec::new()).await
    }

    /// [`Km::start`] (on the stores `KM_E2E_STORES` says) with extra environment
    /// variables, which win over the stores' own.
    pub async fn start_plus(env: Vec<(String, String)>) -> Result<Km> {
        if std::env::var("KM_E2E_STORES").as_deref() != Ok("scale-out") {
            return Km::start_with(env).await;
        }
        let stores = ScaleOut::start()?;
        let mut all = stores.env();
        all.extend(env);
        let mut km = Km::start_with(all).await?;
        km._stores = Some(stores);
        Ok(km)
    }

    /// [`Km::start`] with extra environment variables.
    pub async fn start_with(env: Vec<(String, String)>) -> Result<Km> {
        Km::start_on(free_port()?, env).await
    }

    /// [`Km::start_with`] on a given port, for a server that must know km's port before
    /// km starts (Pebble validates ACME challenges on it).
    pub async fn start_on(port: u16, env: Vec<(String, String)>) -> Result<Km> {
        let bin = km_bin();
        if !bin.exists() {
            bail!(
                "km binary not found at {} (build it with `cargo build -p km-appliance`, or set KM_BIN)",
                bin.display()
            );
        }
        let dir = temp_dir("km-e2e-")?;
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("data"))?;
        let mut km = Km {
            bin,
            _stores: None,
            port,
            listen_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            apart: RolesApart::from_env(&env)?,
            env,
            dir: Some(dir),
            root,
            children: Vec::new(),
        };
        km.spawn().await?;
        Ok(km)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// This km's settings as the appliance keeps them (`km.env` in its temp dir: the
    /// data dir and the extra environment), for the `km` commands that read one.
    pub fn write_env_file(&self) -> Result<PathBuf> {
        let path = self.root.join("km.env");
        let mut text = format!("KM_DATA_DIR={}\n", self.data_dir().display());
        for (k, v) in &self.env {
            text.push_str(&format!("{k}={v}\n"));
        }
        std::fs::write(&path, text)?;
        Ok(path)
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join("km.log")
    }

    /// Everything km wrote so far.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// An API client for this km.
    pub fn api(&self) -> Api {
        Api::new(&self.url())
    }

    pub fn is_running(&self) -> bool {
        !self.children.is_empty()
    }

    /// Whether every process of km is still alive (none exited or was killed).
    pub fn alive(&mut self) -> bool {
        !self.children.is_empty()
            && self
                .children
                .iter_mut()
                .all(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The highest resident memory of km's processes so far (`VmHWM`, bytes).
    pub fn peak_rss(&self) -> u64 {
        self.children
            .iter()
            .filter_map(|c| std::fs::read_to_string(format!("/proc/{}/status", c.id())).ok())
            .filter_map(|status| {
                let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .max()
            .unwrap_or(0)
            * 1024
    }

    /// Sends `sig` (`libc::SIGHUP`...) to the running km (each role's process).
    pub fn signal(&self, sig: i32) -> Result<()> {
        ensure!(self.is_running(), "km is not running");
        for child in &self.children {
            signal(child.id() as i32, sig);
        }
        Ok(())
    }

    /// Starts km; with the roles apart, a role port another test took between its pick
    /// and its bind is picked again (twice at most).
    async fn spawn(&mut self) -> Result<()> {
        for _ in 0..2 {
            let logged = self.log().len();
            match self.spawn_once(logged).await {
                Err(e)
                    if self.apart.is_some()
                        && self
                            .log()
                            .get(logged..)
                            .is_some_and(|new| new.contains("Address already in use")) =>
                {
                    eprintln!("km: a role port was taken, picking others ({e:#})");
                    if let Some(apart) = self.apart.as_mut() {
                        apart.pick_ports()?;
                    }
                }
                done => return done,
            }
        }
        let logged = self.log().len();
        self.spawn_once(logged).await
    }

    /// Starts km's processes, whose log begins at byte `logged` of km.log.
    async fn spawn_once(&mut self, logged: usize) -> Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open km.log")?;
        writeln!(log, "==== e2e: km serve starting at {} ms ====", now_ms())?;
        let roles: Vec<Option<&str>> = match &self.apart {
            Some(_) => ROLES.iter().copied().map(Some).collect(),
            None => vec![None],
        };
        for role in roles {
            let mut command = Command::new(&self.bin);
            command.arg("serve");
            if let Some(role) = role {
                command.args(["--role", role]);
            }
            let child = command
                .arg("--listen")
                .arg(std::net::SocketAddr::new(self.listen_ip, self.port).to_string())
                .arg("--data-dir")
                .arg(self.data_dir())
                // Tests register many users; the closed default is tested on its own.
                .env("KM_ALLOW_SIGNUP", "true")
                .envs(
                    self.apart
                        .iter()
                        .flat_map(|a| a.env.iter().map(|(k, v)| (k, v))),
                )
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log.try_clone()?)
                .spawn()
                .with_context(|| format!("spawn {}", self.bin.display()))?;
            self.children.push(child);
        }
        self.wait_healthy(logged).await
    }

    /// Whether each of km's processes logged `km ready` after byte `logged` of its log.
    fn all_ready(&self, logged: usize) -> bool {
        let log = self.log();
        log.get(logged..)
            .is_some_and(|new| new.matches("km ready").count() >= self.children.len())
    }

    /// Waits for `/healthz` to answer 200 and every process to say it is ready in its log
    /// (from byte `logged`): a port another program took answers too.
    async fn wait_healthy(&mut self, logged: usize) -> Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let url = format!("{}/healthz", self.url());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last;
        loop {
            if let Some(st) = self.exited()? {
                self.kill();
                bail!(
                    "km exited before answering /healthz ({st})\n--- km log ({}) ---\n{}",
                    self.log_path().display(),
                    self.log()
                );
            }
            match http.get(&url).send().await {
                Ok(r) if r.status() == 200 && self.all_ready(logged) => return Ok(()),
                Ok(r) => {
                    let st = r.status();
                    last = format!("HTTP {st}: {}", r.text().await.unwrap_or_default());
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                self.kill();
                bail!(
                    "km did not answer 200 on {url} within 20 s (last: {last})\n--- km log ({}) ---\n{}",
                    self.log_path().display(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status of a process that ended, if one did.
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        for child in &mut self.children {
            if let Some(st) = child.try_wait()? {
                return Ok(Some(st));
            }
        }
        Ok(None)
    }

    /// SIGTERM, then waits for the exit (20 s, then SIGKILL and an error); the first
    /// unsuccessful status of the roles' processes, if any.
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        ensure!(self.is_running(), "km is not running");
        let mut children = std::mem::take(&mut self.children);
        for child in &children {
            signal(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut statuses = Vec::new();
        while let Some(child) = children.last_mut() {
            if let Some(st) = child.try_wait()? {
                statuses.push(st);
                children.pop();
                continue;
            }
            if Instant::now() > deadline {
                for mut child in children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                bail!("km did not exit within 20 s of SIGTERM; killed");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        statuses
            .iter()
            .find(|st| !st.success())
            .or(statuses.first())
            .copied()
            .context("no km process")
    }

    /// Stops km (if running) and starts it again on the same port and data dir.
    pub async fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            let st = self.stop().await?;
            if !st.success() {
                bail!(
                    "km exited with {st} on SIGTERM\n--- km log ---\n{}",
                    tail_file(&self.log_path(), 80)
                );
            }
        }
        self.spawn().await
    }

    /// Kills km with SIGKILL (nothing flushed); [`Km::restart`] starts it again.
    pub fn crash(&mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Km {
    fn drop(&mut self) {
        self.kill();
        diagnostic(format!(
            "--- km log, last 80 lines ({}) ---\n{}\n--- end of km log ---",
            self.log_path().display(),
            tail_file(&self.log_path(), 80)
        ));
        if keep_dirs()
            && let Some(d) = self.dir.take()
        {
            eprintln!("km dir kept: {}", d.keep().display());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Node packages
// ---------------------------------------------------------------------------------------

/// A set of npm packages installed once into a cache dir: [`NPM_PACKAGES`] (the
/// default), or another pm2 and `@pm2/io` for the agent matrix.
pub struct Node {
    dir: PathBuf,
}

type Installed = std::result::Result<&'static Node, String>;
static NODES: Mutex<BTreeMap<String, Installed>> = Mutex::new(BTreeMap::new());

impl Node {
    /// The default packages; installed on first use (file-locked across processes).
    pub fn get() -> Result<&'static Node> {
        Node::of(&NPM_PACKAGES)
    }

    /// `packages` (`name@version`), in `KM_E2E_NODE_DIR` (default `<target>/e2e-node`)
    /// for the default ones, in `<target>/e2e-node-<the packages>` for others.
    pub fn of(packages: &'static [&'static str]) -> Result<&'static Node> {
        let key = packages.join("+");
        let mut nodes = NODES.lock().unwrap_or_else(|e| e.into_inner());
        let installed = nodes.entry(key.clone()).or_insert_with(|| {
            let dir = match std::env::var_os("KM_E2E_NODE_DIR") {
                Some(p) if !p.is_empty() && packages == NPM_PACKAGES => PathBuf::from(p),
                _ if packages == NPM_PACKAGES => target_dir().join("e2e-node"),
                _ => target_dir().join(format!("e2e-node-{}", key.replace(['/', '@'], "_"))),
            };
            Node::ensure(&dir, packages)
                .map(|()| &*Box::leak(Box::new(Node { dir })))
                .map_err(|e| format!("{e:#}"))
        });
        installed
            .clone()
            .map_err(|e| anyhow!("installing the npm packages {packages:?} failed: {e}"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn node_modules(&self) -> PathBuf {
        self.dir.join("node_modules")
    }

    /// `node_modules/pm2/bin/pm2`
    pub fn pm2_cli(&self) -> PathBuf {
        self.node_modules().join("pm2/bin/pm2")
    }

    fn installed(dir: &Path, packages: &[&str]) -> bool {
        packages.iter().all(|spec| {
            let (name, version) = spec.rsplit_once('@').unwrap_or((spec, ""));
            let pj = dir.join("node_modules").join(name).join("package.json");
            std::fs::read(&pj)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|v| v["version"] == version)
        })
    }

    fn ensure(dir: &Path, packages: &[&str]) -> Result<()> {
        if Node::installed(dir, packages) {
            return Ok(());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let lock = std::fs::File::create(dir.join(".install.lock"))?;
        lock.lock().context("lock .install.lock")?;
        if Node::installed(dir, packages) {
            return Ok(());
        }
        let pj = dir.join("package.json");
        if !pj.exists() {
            std::fs::write(&pj, "{\"name\":\"km-e2e-node\",\"private\":true}\n")?;
        }
        let out = Command::new("npm")
            .current_dir(dir)
            .args(["install", "--no-audit", "--no-fund", "--save-exact"])
            .args(packages)
            .output()
            .context("run npm (is node/npm installed?)")?;
        if !out.status.success() || !Node::installed(dir, packages) {
            bail!(
                "npm install {} in {} failed ({}):\n{}\n{}",
                packages.join(" "),
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Node scripts (tests/js)
// ---------------------------------------------------------------------------------------

/// `tests/js`: the Node scripts run by [`run_node_script`].
pub fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// What a Node script printed, and how it exited.
#[derive(Debug)]
pub struct ScriptOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Time to collect what is left in a pipe once the script has exited or been killed.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads a child's pipe to the end in a task, so the output survives a timeout.
fn drain_pipe(
    pipe: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut buf).await;
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

async fn drained(task: tokio::task::JoinHandle<String>) -> String {
    match tokio::time::timeout(PIPE_DRAIN_TIMEOUT, task).await {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => format!("(output lost: {e})"),
        Err(_) => "(output not closed within 5 s of the exit)".to_string(),
    }
}

/// Runs `node tests/js/<script>` with `NODE_PATH` set to the e2e `node_modules` (so the
/// script can `require('@pm2/js-api')`, `require('playwright-core')`...) and `env` added to
/// the environment (`NODE_OPTIONS` is cleared), killing it after `timeout`. Returns its
/// output when it exits 0; otherwise (node missing, timeout, non-zero exit) an error that
/// carries both its stdout and its stderr.
pub async fn run_node_script(
    script: &str,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<ScriptOutput> {
    let node = Node::get()?;
    let path = js_dir().join(script);
    if !path.is_file() {
        bail!("node script {} not found", path.display());
    }
    let mut child = tokio::process::Command::new("node")
        .arg(&path)
        .env_remove("NODE_OPTIONS")
        .env("NODE_PATH", node.node_modules())
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .current_dir(js_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn node (is node installed?)")?;
    let stdout = drain_pipe(child.stdout.take());
    let stderr = drain_pipe(child.stderr.take());
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => Some(status.with_context(|| format!("wait for node {script}"))?),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    let out = (drained(stdout).await, drained(stderr).await);
    let failure = match status {
        Some(st) if st.success() => {
            return Ok(ScriptOutput {
                status: st,
                stdout: out.0,
                stderr: out.1,
            });
        }
        Some(st) => format!("exited with {st}"),
        None => format!(
            "did not finish within {:.0} s (killed)",
            timeout.as_secs_f64()
        ),
    };
    bail!(
        "node {} {failure}\n--- its stdout ---\n{}\n--- its stderr ---\n{}\n--- end of its output ---",
        path.display(),
        out.0.trim_end(),
        out.1.trim_end()
    )
}

// ---------------------------------------------------------------------------------------
// pm2
// ---------------------------------------------------------------------------------------

/// Makes `dns.lookup('google.com')` succeed, so the agent believes the internet is up and
/// reconnects at once after losing its socket (see shared/testing.md). Other names resolve
/// as usual.
pub const DNS_SHIM_JS: &str = r#"'use strict';
const dns = require('dns');
const origLookup = dns.lookup;
dns.lookup = function (hostname, options, callback) {
  if (hostname === 'google.com') {
    const cb = typeof options === 'function' ? options : callback;
    const all = options && typeof options === 'object' && options.all;
    process.nextTick(() => {
      if (all) cb(null, [{ address: '127.0.0.1', family: 4 }]);
      else cb(null, '127.0.0.1', 4);
    });
    return {};
  }
  return origLookup.apply(this, arguments);
};
"#;

/// Output of one pm2 CLI run: exit code and stdout followed by stderr, without colours.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub code: Option<i32>,
    pub text: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A pm2 daemon (and, once linked, its agent) with its own fresh `PM2_HOME`, pointed at a
/// km through `KEYMETRICS_NODE`. `pm2 kill` runs on drop, also when the test panics.
pub struct Pm2 {
    node: &'static Node,
    home: Option<tempfile::TempDir>,
    root: PathBuf,
    km_url: String,
    shim: Option<PathBuf>,
    /// Extra environment of every node process (`NODE_EXTRA_CA_CERTS`...).
    env: Vec<(String, String)>,
    alive: bool,
}

/// pm2 command timeout.
const PM2_CMD_TIMEOUT: Duration = Duration::from_secs(60);

impl Pm2 {
    /// A pm2 instance for the km at `km_url` (nothing started yet).
    pub fn new(km_url: &str) -> Result<Pm2> {
        Pm2::build(km_url, false)
    }

    /// Like [`Pm2::new`], with `NODE_OPTIONS=--require <shim>` so that every node process
    /// of this instance (CLI, daemon, agent, apps) resolves `google.com`: the agent then
    /// reconnects right away when its socket drops, as on a host with real DNS.
    pub fn with_dns_shim(km_url: &str) -> Result<Pm2> {
        Pm2::build(km_url, true)
    }

    /// Like [`Pm2::new`], with extra environment for every node process of this instance
    /// (`NODE_EXTRA_CA_CERTS` to trust a test CA...).
    pub fn with_env(km_url: &str, env: Vec<(String, String)>) -> Result<Pm2> {
        let mut pm2 = Pm2::build(km_url, false)?;
        pm2.env = env;
        Ok(pm2)
    }

    /// Like [`Pm2::new`], with another pm2 (and `@pm2/io`) than the default: `packages`
    /// as [`Node::of`] installs them.
    pub fn of(km_url: &str, packages: &'static [&'static str]) -> Result<Pm2> {
        let mut pm2 = Pm2::build(km_url, false)?;
        pm2.node = Node::of(packages)?;
        Ok(pm2)
    }

    fn build(km_url: &str, shim: bool) -> Result<Pm2> {
        let node = Node::get()?;
        // Short path: pm2 puts unix sockets in PM2_HOME (sun_path is 108 bytes).
        let home = temp_dir("pm2-")?;
        let root = home.path().to_path_buf();
        std::fs::create_dir_all(root.join("apps"))?;
        let shim = if shim {
            let p = root.join("apps/dns-shim.js");
            std::fs::write(&p, DNS_SHIM_JS)?;
            Some(p)
        } else {
            None
        };
        Ok(Pm2 {
            node,
            home: Some(home),
            root,
            km_url: km_url.to_string(),
            shim,
            env: Vec::new(),
            alive: true,
        })
    }

    /// `PM2_HOME`
    pub fn home(&self) -> &Path {
        &self.root
    }

    pub fn apps_dir(&self) -> PathBuf {
        self.root.join("apps")
    }

    fn std_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("node");
        cmd.arg(self.node.pm2_cli()).args(args);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("PM2_")
                || k.starts_with("KEYMETRICS_")
                || matches!(
                    k.as_str(),
                    "INSTANCE_NAME" | "NODE_OPTIONS" | "NODE_ENV" | "TRAVIS" | "DEBUG"
                )
            {
                cmd.env_remove(&k);
            }
        }
        cmd.env("PM2_HOME", &self.root)
            .env("KEYMETRICS_NODE", &self.km_url)
            .env("NODE_PATH", self.node.node_modules())
            .env("NO_COLOR", "1")
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(shim) = &self.shim {
            cmd.env("NODE_OPTIONS", format!("--require {}", shim.display()));
        }
        cmd
    }

    /// Runs `pm2 <args>` (60 s at most).
    pub async fn run(&self, args: &[&str]) -> Result<CmdOutput> {
        let mut cmd = tokio::process::Command::from(self.std_command(args));
        cmd.kill_on_drop(true)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().context("spawn node (is node installed?)")?;
        let out = tokio::time::timeout(PM2_CMD_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| anyhow!("`pm2 {}` did not finish within 60 s", args.join(" ")))??;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(CmdOutput {
            code: out.status.code(),
            text: strip_ansi(&text),
        })
    }

    /// Runs `pm2 <args>` and fails unless it exits 0.
    pub async fn run_ok(&self, args: &[&str]) -> Result<CmdOutput> {
        let out = self.run(args).await?;
        if !out.success() {
            bail!(
                "`pm2 {}` exited with {:?}:\n{}",
                args.join(" "),
                out.code,
                out.text
            );
        }
        Ok(out)
    }

    /// Writes `<apps>/<file>` and returns its path.
    pub fn write_app(&self, file: &str, source: &str) -> Result<PathBuf> {
        let p = self.apps_dir().join(file);
        std::fs::write(&p, source).with_context(|| format!("write {}", p.display()))?;
        Ok(p)
    }

    /// Writes `<name>.js` and runs `pm2 start <name>.js --name <name>`.
    pub async fn start_app(&self, name: &str, source: &str) -> Result<PathBuf> {
        let p = self.write_app(&format!("{name}.js"), source)?;
        let path = p.to_string_lossy().into_owned();
        self.run_ok(&["start", &path, "--name", name]).await?;
        Ok(p)
    }

    /// `pm2 link <secret> <public> <machine>`: (exit code, stdout+stderr).
    pub async fn link(&self, secret: &str, public: &str, machine: &str) -> Result<(i32, String)> {
        let out = self.run(&["link", secret, public, machine]).await?;
        Ok((out.code.unwrap_or(-1), out.text))
    }

    /// `pm2 jlist`, parsed.
    pub async fn jlist(&self) -> Result<Value> {
        let out = self.run_ok(&["jlist"]).await?;
        let start = out.text.find('[').unwrap_or(0);
        let end = out.text.rfind(']').map(|i| i + 1).unwrap_or(out.text.len());
        serde_json::from_str(&out.text[start..end])
            .with_context(|| format!("parse pm2 jlist output: {}", out.text))
    }

    /// The agent's log (`$PM2_HOME/agent.log`).
    pub fn agent_log(&self) -> String {
        std::fs::read(self.root.join("agent.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn read_pid(&self, file: &str) -> Option<i32> {
        std::fs::read_to_string(self.root.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// SIGKILL to the agent alone (`$PM2_HOME/agent.pid`), as when it crashes: its socket
    /// ends without a word while the daemon and the apps keep running. Returns its pid.
    pub fn kill_agent(&self) -> Result<i32> {
        let pid = self
            .read_pid("agent.pid")
            .context("no agent pid in $PM2_HOME/agent.pid")?;
        ensure!(pid_alive(pid), "the agent (pid {pid}) is not running");
        signal(pid, libc::SIGKILL);
        Ok(pid)
    }

    /// `pm2 kill` (synchronous), then SIGKILL for a daemon or agent still alive.
    pub fn kill(&mut self) {
        if !self.alive {
            return;
        }
        self.alive = false;
        let pids: Vec<i32> = ["pm2.pid", "agent.pid"]
            .iter()
            .filter_map(|f| self.read_pid(f))
            .collect();
        let mut cmd = self.std_command(&["kill"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        if let Ok(mut child) = cmd.spawn() {
            wait_child(&mut child, Duration::from_secs(30));
        }
        for pid in pids {
            if pid_alive(pid) {
                std::thread::sleep(Duration::from_millis(300));
                if pid_alive(pid) {
                    signal(pid, libc::SIGKILL);
                }
            }
        }
    }
}

impl Drop for Pm2 {
    fn drop(&mut self) {
        diagnostic(format!(
            "--- pm2 agent log, last 40 lines ({}) ---\n{}\n--- pm2 daemon log ({}), last 10 lines ---\n{}\n--- end of pm2 logs ---",
            self.root.join("agent.log").display(),
            tail_file(&self.root.join("agent.log"), 40),
            self.root.join("pm2.log").display(),
            tail_file(&self.root.join("pm2.log"), 10)
        ));
        self.kill();
        if keep_dirs()
            && let Some(d) = self.home.take()
        {
            eprintln!("PM2_HOME kept: {}", d.keep().display());
        }
    }
}

// ---------------------------------------------------------------------------------------
// API client
// ---------------------------------------------------------------------------------------

/// One HTTP answer: status, body as JSON (`Null` when not JSON) and as text.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body, or an error naming the request when the status is not 2xx.
    pub fn into_ok(self, what: &str) -> Result<Value> {
        if self.ok() {
            Ok(self.body)
        } else {
            bail!("{what}: HTTP {}: {}", self.status, self.text)
        }
    }
}

/// A km API client, optionally with a bearer token.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

/// Default poll interval.
pub const POLL_EVERY: Duration = Duration::from_millis(200);

impl Api {
    pub fn new(base: &str) -> Api {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("reqwest client");
        Api::with_http(base, http)
    }

    /// A client sending through `http` (one trusting a test CA, for km over HTTPS).
    pub fn with_http(base: &str, http: reqwest::Client) -> Api {
        Api {
            base: base.trim_end_matches('/').to_string(),
            http,
            token: None,
        }
    }

    /// The same client with a bearer token.
    pub fn with_token(&self, token: &str) -> Api {
        Api {
            token: Some(token.to_string()),
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Any request; `path` starts with `/`.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Resp> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp { status, body, text })
    }

    pub async fn get(&self, path: &str) -> Result<Resp> {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Resp> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    /// GET that must answer 2xx; returns the JSON body.
    pub async fn get_ok(&self, path: &str) -> Result<Value> {
        self.get(path).await?.into_ok(&format!("GET {path}"))
    }

    /// POST that must answer 2xx; returns the JSON body.
    pub async fn post_ok(&self, path: &str, body: &Value) -> Result<Value> {
        self.post(path, body)
            .await?
            .into_ok(&format!("POST {path} {body}"))
    }

    /// Repeats a request every [`POLL_EVERY`] until `pred` returns `Some` on a 2xx body;
    /// fails after `timeout` with the last answer seen.
    pub async fn poll<T>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> Option<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let mut last;
        loop {
            match self.request(method.clone(), path, body).await {
                Ok(r) if r.ok() => {
                    if let Some(t) = pred(&r.body) {
                        return Ok(t);
                    }
                    last = format!("HTTP {}: {}", r.status, show(&r.body, 6000));
                }
                Ok(r) => last = format!("HTTP {}: {}", r.status, r.text),
                Err(e) => last = format!("{e:#}"),
            }
            if start.elapsed() >= timeout {
                bail!(
                    "timed out after {:.1} s waiting for {what} ({method} {path}{})\nlast answer: {last}",
                    timeout.as_secs_f64(),
                    body.map(|b| format!(" {b}")).unwrap_or_default()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    pub async fn poll_get<T>(
        &self,
        path: &str,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&Value) -> Option<T>,
    ) -> Result<T> {
        self.poll(reqwest::Method::GET, path, None, what, timeout, pred)
            .await
    }

    pub async fn poll_post<T>(
        &self,
        path: &str,
        body: &Value,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&Value) -> Option<T>,
    ) -> Result<T> {
        self.poll(reqwest::Method::POST, path, Some(body), what, timeout, pred)
            .await
    }

    // -- auth ---------------------------------------------------------------------------

    /// `POST /api/oauth/register` with a random username; returns the logged-in user.
    pub async fn register_random(&self) -> Result<User> {
        let username = unique("user");
        self.register(
            &username,
            &format!("{username}@example.com"),
            "correct horse battery",
        )
        .await
    }

    /// `POST /api/oauth/register`; returns the logged-in user.
    pub async fn register(&self, username: &str, email: &str, password: &str) -> Result<User> {
        let body = json!({
            "username": username, "email": email, "password": password, "accept_terms": 1
        });
        let v = self.post_ok("/api/oauth/register", &body).await?;
        let token = v["access_token"]
            .as_str()
            .ok_or_else(|| anyhow!("register: no access_token in {v}"))?;
        let id = v["user"]["_id"]
            .as_str()
            .ok_or_else(|| anyhow!("register: no user._id in {v}"))?;
        Ok(User {
            api: self.with_token(token),
            id: id.to_string(),
            username: username.to_string(),
            email: email.to_string(),
            password: password.to_string(),
            raw: v,
        })
    }

    // -- agent ----------------------------------------------------------------------------

    /// `POST /api/node/verifyPM2` as the agent sends it.
    pub async fn verify_pm2(&self, public: &str, secret: &str, machine: &str) -> Result<Resp> {
        let body = json!({
            "public_id": public,
            "private_id": secret,
            "data": {
                "MACHINE_NAME": machine, "PUBLIC_KEY": public, "RECYCLE": false,
                "PM2_VERSION": "7.0.4", "MEMORY": 24.0, "HOSTNAME": "e2e", "CPUS": []
            }
        });
        self.post("/api/node/verifyPM2", &body).await
    }

    // -- buckets ------------------------------------------------------------------------

    /// `POST /api/bucket/create_classic {name}`.
    pub async fn create_bucket(&self, name: &str) -> Result<Bucket> {
        let v = self
            .post_ok("/api/bucket/create_classic", &json!({ "name": name }))
            .await?;
        let b = &v["bucket"];
        let field = |k: &str| -> Result<String> {
            b[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("create_classic: no bucket.{k} in {v}"))
        };
        Ok(Bucket {
            id: field("_id")?,
            public_id: field("public_id")?,
            secret_id: field("secret_id")?,
            name: field("name")?,
            raw: b.clone(),
        })
    }

    /// `GET /api/bucket/:id/data/status`.
    pub async fn status(&self, bucket: &str) -> Result<Value> {
        self.get_ok(&format!("/api/bucket/{bucket}/data/status"))
            .await
    }

    /// Polls `data/status` until the entry of `server` satisfies `pred` (given that entry).
    pub async fn wait_server<T>(
        &self,
        bucket: &str,
        server: &str,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> Option<T>,
    ) -> Result<T> {
        self.poll_get(
            &format!("/api/bucket/{bucket}/data/status"),
            &format!("{what} (server {server})"),
            timeout,
            |v| server_entry(v, server).and_then(&mut pred),
        )
        .await
    }

    /// Polls `data/status` until `server` lists process `app` and `pred` holds on it.
    pub async fn wait_process<T>(
        &self,
        bucket: &str,
        server: &str,
        app: &str,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> Option<T>,
    ) -> Result<T> {
        self.wait_server(
            bucket,
            server,
            &format!("{what} (app {app})"),
            timeout,
            |s| find_process(s, app).and_then(&mut pred),
        )
        .await
    }

    /// `POST /api/bucket/:id/actions/triggerPM2`.
    pub async fn trigger_pm2(&self, bucket: &str, body: &Value) -> Result<Resp> {
        self.post(&format!("/api/bucket/{bucket}/actions/triggerPM2"), body)
            .await
    }

    /// `POST /api/bucket/:id/actions/trigger`.
    pub async fn trigger_action(&self, bucket: &str, body: &Value) -> Result<Resp> {
        self.post(&format!("/api/bucket/{bucket}/actions/trigger"), body)
            .await
    }

    /// `POST /api/bucket/:id/data/<kind>` (`logs`, `exceptions`, `events`, `processEvents`).
    pub async fn data(&self, bucket: &str, kind: &str, filter: &Value) -> Result<Value> {
        self.post_ok(&format!("/api/bucket/{bucket}/data/{kind}"), filter)
            .await
    }

    /// Polls `POST /api/bucket/:id/data/<kind>` until an element of the array answers
    /// `Some` from `pred`.
    pub async fn wait_data<T>(
        &self,
        bucket: &str,
        kind: &str,
        filter: &Value,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> Option<T>,
    ) -> Result<T> {
        self.poll_post(
            &format!("/api/bucket/{bucket}/data/{kind}"),
            filter,
            what,
            timeout,
            |v| v.as_array().and_then(|a| a.iter().find_map(&mut pred)),
        )
        .await
    }
}

/// The `name=value` pair of the cookie `name` an answer sets.
pub fn cookie_of(answer: &reqwest::Response, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    answer
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&prefix))
        .and_then(|v| v.split(';').next())
        .map(str::to_string)
}

/// Posts a visitor's form (sign-in, sign-up) as a browser does: the page first, for its
/// form token and the cookie holding it, then the form with both.
pub async fn post_visitor_form(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    fields: &[(&str, &str)],
) -> Result<reqwest::Response> {
    let page = http.get(format!("{base}{path}")).send().await?;
    let cookie =
        cookie_of(&page, "km_form").with_context(|| format!("GET {path}: no km_form cookie"))?;
    let html = page.text().await?;
    // A page without the form (sign-up closed) gives no token: the post goes without.
    let marker = "name=\"csrf\" value=\"";
    let token = html
        .find(marker)
        .and_then(|start| html[start + marker.len()..].split('"').next())
        .unwrap_or_default()
        .to_string();
    let mut form: Vec<(&str, &str)> = fields.to_vec();
    form.push(("csrf", &token));
    Ok(http
        .post(format!("{base}{path}"))
        .header(reqwest::header::COOKIE, cookie)
        .form(&form)
        .send()
        .await?)
}

/// A registered user with a logged-in client.
pub struct User {
    pub api: Api,
    pub id: String,
    pub username: String,
    pub email: String,
    pub password: String,
    /// The register answer.
    pub raw: Value,
}

impl User {
    /// The dashboard's page at `path` as this user sees it, signed in through the login
    /// form.
    pub async fn page(&self, path: &str) -> Result<String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let base = self.api.base();
        let fields = [
            ("login", self.username.as_str()),
            ("password", &self.password),
        ];
        let login = post_visitor_form(&http, base, "/login", &fields).await?;
        let cookie = cookie_of(&login, "km_session")
            .with_context(|| format!("{} did not sign in: {}", self.username, login.status()))?;
        let page = http
            .get(format!("{base}{path}"))
            .header(reqwest::header::COOKIE, cookie)
            .send()
            .await?;
        let status = page.status();
        let html = page.text().await?;
        ensure!(status == 200, "GET {path}: {status}: {html}");
        Ok(html)
    }
}

/// A bucket as `create_classic` returned it.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub id: String,
    pub public_id: String,
    pub secret_id: String,
    pub name: String,
    pub raw: Value,
}

/// The entry of `server` in a `data/status` array.
pub fn server_entry<'a>(status: &'a Value, server: &str) -> Option<&'a Value> {
    status
        .as_array()?
        .iter()
        .find(|s| s["server_name"] == server)
}

/// The process named `name` in a server entry of `data/status`.
pub fn find_process<'a>(server: &'a Value, name: &str) -> Option<&'a Value> {
    server["data"]["process"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

/// A metric value as a number (agents send numbers or numeric strings).
pub fn metric_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Scenario setup
// ---------------------------------------------------------------------------------------

/// A km with a registered user and a bucket, and a pm2 linked to it running some apps.
/// Fields drop in order: pm2 is killed before km stops.
pub struct Linked {
    pub pm2: Pm2,
    pub user: User,
    pub bucket: Bucket,
    pub machine: String,
    pub link_output: String,
    pub km: Km,
}

impl Linked {
    pub fn api(&self) -> &Api {
        &self.user.api
    }

    /// Waits until `data/status` lists this machine online with every app in `apps`.
    pub async fn wait_apps(&self, apps: &[&str], timeout: Duration) -> Result<Value> {
        self.api()
            .wait_server(
                &self.bucket.id,
                &self.machine,
                &format!("machine online with apps {apps:?}"),
                timeout,
                |s| {
                    (s["online"] == true && apps.iter().all(|a| find_process(s, a).is_some()))
                        .then(|| s.clone())
                },
            )
            .await
    }
}

/// Options for [`linked`].
#[derive(Default)]
pub struct LinkOpts {
    pub dns_shim: bool,
    /// Environment of km (`KM_MONGO_URL`...).
    pub km_env: Vec<(String, String)>,
    /// Another pm2 and `@pm2/io` than [`NPM_PACKAGES`]' (see [`Node::of`]).
    pub packages: Option<&'static [&'static str]>,
}

/// Starts km, registers a user, creates a bucket, starts `apps` (name, JS source) in a
/// fresh pm2 and links it as `machine`; fails unless `pm2 link` exits 0.
pub async fn linked(machine: &str, apps: &[(&str, &str)]) -> Result<Linked> {
    linked_with(machine, apps, LinkOpts::default()).await
}

pub async fn linked_with(machine: &str, apps: &[(&str, &str)], opts: LinkOpts) -> Result<Linked> {
    let km = Km::start_plus(opts.km_env.clone()).await?;
    let user = km.api().register_random().await?;
    let bucket = user.api.create_bucket(&unique("bucket-")).await?;
    let pm2 = match (opts.packages, opts.dns_shim) {
        (Some(packages), _) => Pm2::of(&km.url(), packages)?,
        (None, true) => Pm2::with_dns_shim(&km.url())?,
        (None, false) => Pm2::new(&km.url())?,
    };
    for (name, src) in apps {
        pm2.start_app(name, src).await?;
    }
    let (code, out) = pm2
        .link(&bucket.secret_id, &bucket.public_id, machine)
        .await?;
    if code != 0 {
        bail!("pm2 link exited {code}:\n{out}");
    }
    Ok(Linked {
        pm2,
        user,
        bucket,
        machine: machine.to_string(),
        link_output: out,
        km,
    })
}

// ---------------------------------------------------------------------------------------
// The setup wizard, and the servers its checks are tried against
// ---------------------------------------------------------------------------------------

/// Installs ring as rustls' process-wide provider (one provider per build; see
/// shared/testing.md). Harmless when already installed.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Path of the `km-wizard` binary under test (`KM_WIZARD_BIN`, default
/// `<target>/debug/km-wizard`).
pub fn wizard_bin() -> PathBuf {
    match std::env::var_os("KM_WIZARD_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_dir().join("debug/km-wizard"),
    }
}

/// A certificate authority made for one test. Give each its own name: a client that
/// trusts another CA of the same name reports a bad signature, not an unknown issuer.
pub struct TestCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Result<TestCa> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key)?.pem();
        Ok(TestCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// The CA's certificate (PEM).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate for `names` (host names or IP addresses) signed by this CA:
    /// (certificate PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)?.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A real ACME CA (Pebble, `apt-get install pebble`) on free loopback ports, its own
/// HTTPS certificate signed by a test CA; killed on drop (its log shown on failure).
pub struct Pebble {
    child: Child,
    port: u16,
    management: u16,
    dir: tempfile::TempDir,
}

impl Pebble {
    /// Starts Pebble validating HTTP-01 on `http_port`; with `always_valid`
    /// (`PEBBLE_VA_ALWAYS_VALID=1`) every challenge passes without being fetched.
    pub fn start(http_port: u16, always_valid: bool) -> Result<Pebble> {
        let dir = temp_dir("km-pebble-")?;
        let ca = TestCa::new(&unique("Pebble HTTPS test CA "))?;
        let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"])?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        std::fs::write(dir.path().join("cert.pem"), cert)?;
        std::fs::write(dir.path().join("key.pem"), key)?;
        let (port, management) = (free_port()?, free_port()?);
        let config = json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port()?,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.path().join("pebble.json"), config.to_string())?;
        let log = std::fs::File::create(dir.path().join("pebble.log"))?;
        let mut command = Command::new("pebble");
        command
            .arg("-config")
            .arg(dir.path().join("pebble.json"))
            // Validate at once, and never reject a good nonce (5% by default).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if always_valid {
            command.env("PEBBLE_VA_ALWAYS_VALID", "1");
        }
        let child = command
            .spawn()
            .context("start pebble (apt-get install pebble; tests/run.sh installs it)")?;
        let mut pebble = Pebble {
            child,
            port,
            management,
            dir,
        };
        for p in [port, management] {
            match wait_listening(&mut pebble.child, p, Duration::from_secs(10)) {
                Ok(true) => {}
                Ok(false) => bail!(
                    "pebble exited at start\n--- pebble log ---\n{}",
                    pebble.log()
                ),
                Err(e) => bail!("pebble: {e:#}\n--- pebble log ---\n{}", pebble.log()),
            }
        }
        Ok(pebble)
    }

    /// `https://127.0.0.1:<port>/dir`
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The PEM of the CA of Pebble's own HTTPS certificate (for `KM_ACME_CA`).
    pub fn https_ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The root Pebble issues certificates under (made anew at each start), from its
    /// management port (`/roots/0`).
    pub async fn root_pem(&self) -> Result<String> {
        install_crypto();
        let ca = std::fs::read(self.https_ca_path())?;
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .timeout(Duration::from_secs(10))
            .build()?;
        let url = format!("https://127.0.0.1:{}/roots/0", self.management);
        let answer = http.get(&url).send().await.with_context(|| url.clone())?;
        let status = answer.status();
        let body = answer.text().await?;
        if !status.is_success() || !body.contains("BEGIN CERTIFICATE") {
            bail!("GET {url}: HTTP {status}: {body}");
        }
        Ok(body)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        diagnostic(format!(
            "--- pebble log, last 30 lines ---\n{}\n--- end of pebble log ---",
            tail_file(&self.dir.path().join("pebble.log"), 30)
        ));
    }
}

/// A real SMTP server (aiosmtpd through `tests/support/smtp_server.py`) on a free
/// loopback port, its certificate (for 127.0.0.1 and localhost) signed by a test CA of
/// its own, requiring AUTH as `user`/`password`; mail goes to a Maildir. Killed on drop.
pub struct Smtp {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Smtp {
    /// km's settings for this server when it runs `plain` without login.
    pub fn km_env(&self) -> Vec<(String, String)> {
        vec![
            ("SMTP_HOST".into(), format!("127.0.0.1:{}", self.port)),
            ("SMTP_TLS".into(), "none".into()),
            ("SMTP_SENDER".into(), "km@example.com".into()),
        ]
    }

    /// `mode`: `starttls` (required before anything else), `tls` (SMTPS) or `plain`.
    pub fn start(mode: &str, user: &str, password: &str) -> Result<Smtp> {
        let dir = temp_dir("km-smtp-")?;
        let ca = TestCa::new(&unique("SMTP test CA "))?;
        let (cert, key) = ca.leaf(&["127.0.0.1", "localhost"])?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        std::fs::write(dir.path().join("cert.pem"), cert)?;
        std::fs::write(dir.path().join("key.pem"), key)?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("smtp.log"))?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/smtp_server.py");
        let child = Command::new("python3")
            .arg(&script)
            .args(["--port", &port.to_string(), "--mode", mode])
            .args(["--user", user, "--password", password])
            .arg("--maildir")
            .arg(dir.path().join("Maildir"))
            .arg("--cert")
            .arg(dir.path().join("cert.pem"))
            .arg("--key")
            .arg(dir.path().join("key.pem"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start tests/support/smtp_server.py (pip install aiosmtpd)")?;
        let mut smtp = Smtp { child, port, dir };
        let log_path = smtp.dir.path().join("smtp.log");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("ready")) {
            if let Some(st) = smtp.child.try_wait()? {
                bail!(
                    "smtp_server.py exited at start ({st}):\n{}",
                    tail_file(&log_path, 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "smtp_server.py not ready within 15 s:\n{}",
                    tail_file(&log_path, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(smtp)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PEM of the CA that signed the server's certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The mails delivered so far as their recipients read them (quoted-printable parts
    /// decoded), oldest first.
    pub fn decoded_mails(&self) -> Result<Vec<String>> {
        let decoded = |mail: &String| {
            quoted_printable::decode(mail, quoted_printable::ParseMode::Robust)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_else(|_| mail.clone())
        };
        Ok(self.mails()?.iter().map(decoded).collect())
    }

    /// The mails delivered so far (the Maildir's `new/`), oldest first.
    pub fn mails(&self) -> Result<Vec<String>> {
        let new = self.dir.path().join("Maildir/new");
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        match std::fs::read_dir(&new) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry?.path();
                    files.push((std::fs::metadata(&path)?.modified()?, path));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("read {}", new.display())),
        }
        files.sort();
        files
            .iter()
            .map(|(_, p)| {
                std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))
            })
            .collect()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        diagnostic(format!(
            "--- smtp server log, last 20 lines ---\n{}\n--- end of smtp server log ---",
            tail_file(&self.dir.path().join("smtp.log"), 20)
        ));
    }
}

/// How to start a [`Wizard`].
#[derive(Default)]
pub struct WizardOpts {
    /// Added to (or replacing) the env file the wizard finds at start (mode 0600), which
    /// always sets `KM_LISTEN` and `KM_HTTPS_LISTEN` on free loopback ports, `KM_DATA_DIR`
    /// and `KM_WIZARD_URL` (this wizard), as the appliance image ships one.
    pub base_env: Vec<(String, String)>,
    /// Environment of the wizard (and of the km it runs): `SSL_CERT_FILE`...
    pub env: Vec<(String, String)>,
}

/// One answer of the wizard (redirects are not followed).
#[derive(Debug, Clone)]
pub struct WizardAnswer {
    pub status: u16,
    pub location: Option<String>,
    pub set_cookie: Option<String>,
    pub text: String,
    pub body: Value,
}

/// A real `km-wizard serve --restart process` on a free loopback port, with its state
/// dir, env file and km data dir in a temp dir; the km it runs inherits its stdout and
/// stderr (`wizard.log`). Stopped on drop (SIGTERM: it stops its km), then its whole
/// process group is killed, so no km outlives the test; the log's tail is kept for
/// [`e2e`]'s diagnostics.
pub struct Wizard {
    child: Option<Child>,
    port: u16,
    km_port: u16,
    https_port: u16,
    token: String,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
}

/// Time `km-wizard serve` has to print its URL and listen: it first starts km on the
/// env file it finds (up to a minute when km does not come up).
const WIZARD_START_TIMEOUT: Duration = Duration::from_secs(90);
/// A check may take a few steps of 5 s each, an ACME trial order longer.
const WIZARD_REQUEST_TIMEOUT: Duration = Duration::from_secs(200);
/// The cookie the wizard keeps its token in.
pub const WIZARD_COOKIE: &str = "km_wizard";

impl Wizard {
    pub async fn start(opts: WizardOpts) -> Result<Wizard> {
        let bin = wizard_bin();
        if !bin.exists() {
            bail!(
                "km-wizard not found at {} (cargo build --workspace --features km-appliance/test-licence, or set KM_WIZARD_BIN)",
                bin.display()
            );
        }
        let dir = temp_dir("km-wizard-")?;
        let root = dir.path().to_path_buf();
        let (port, km_port, https_port) = (free_port()?, free_port()?, free_port()?);
        let mut env: Vec<(String, String)> = vec![
            // km passes `/wizard/` on its ports to the wizard.
            ("KM_WIZARD_URL".into(), format!("http://127.0.0.1:{port}")),
            ("KM_LISTEN".into(), format!("127.0.0.1:{km_port}")),
            ("KM_HTTPS_LISTEN".into(), format!("127.0.0.1:{https_port}")),
            (
                "KM_DATA_DIR".into(),
                root.join("data").to_string_lossy().into_owned(),
            ),
        ];
        for (key, value) in opts.base_env {
            env.retain(|(k, _)| *k != key);
            env.push((key, value));
        }
        let text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let env_file = root.join("km.env");
        std::fs::write(&env_file, text)?;
        std::fs::set_permissions(
            &env_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        let log = std::fs::File::create(root.join("wizard.log"))?;
        let mut command = Command::new(&bin);
        command
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--env-file")
            .arg(&env_file)
            .args(["--restart", "process", "--km-bin"])
            .arg(km_bin());
        clean_setup_env(&mut command);
        command
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Its own process group: km, its child, goes with it on drop.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut wizard = Wizard {
            child: Some(child),
            port,
            km_port,
            https_port,
            token: String::new(),
            dir: Some(dir),
            root,
        };
        wizard.token = wizard.wait_started().await?;
        Ok(wizard)
    }

    /// The token of the printed setup URL, once the wizard listens.
    async fn wait_started(&mut self) -> Result<String> {
        let deadline = Instant::now() + WIZARD_START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(st) = child.try_wait()?
            {
                bail!("km-wizard exited at start ({st})\n{}", self.log_tail(60));
            }
            let log = self.log();
            let token = log
                .lines()
                .find_map(|l| l.split_once("KM setup: open ").map(|(_, url)| url))
                .and_then(|url| url.split_once("?token="))
                .map(|(_, token)| token.trim().to_string());
            if let Some(token) = token
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(token);
            }
            if Instant::now() > deadline {
                bail!(
                    "km-wizard printed no setup URL or did not listen on 127.0.0.1:{} within {WIZARD_START_TIMEOUT:?}\n{}",
                    self.port,
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The URL the wizard printed: `<url>/wizard/?token=<token>`.
    pub fn setup_url(&self) -> String {
        format!("{}/wizard/?token={}", self.url(), self.token)
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// km's plain port (`KM_LISTEN` of the env file the wizard started with).
    pub fn km_port(&self) -> u16 {
        self.km_port
    }

    /// `KM_HTTPS_LISTEN`'s port.
    pub fn https_port(&self) -> u16 {
        self.https_port
    }

    /// `http://127.0.0.1:<km_port>`
    pub fn km_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.km_port)
    }

    pub fn env_file(&self) -> PathBuf {
        self.root.join("km.env")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Everything the wizard (and the km it runs) wrote so far, without colours.
    pub fn log(&self) -> String {
        strip_ansi(
            &std::fs::read(self.root.join("wizard.log"))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default(),
        )
    }

    fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- km-wizard log (with its km), last {n} lines ({}) ---\n{}\n--- end of km-wizard log ---",
            self.root.join("wizard.log").display(),
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    /// A request to the wizard with `token` as its cookie (none: no cookie), `form` as
    /// an urlencoded body, sent from the loopback address `from` (the wizard counts
    /// wrong tokens per address; default 127.0.0.1).
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        form: Option<&[(&str, &str)]>,
        from: Option<std::net::IpAddr>,
    ) -> Result<WizardAnswer> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(WIZARD_REQUEST_TIMEOUT)
            .local_address(from)
            .build()?;
        let url = format!("{}{path}", self.url());
        let mut request = http.request(method.clone(), &url);
        if let Some(token) = token {
            request = request.header(reqwest::header::COOKIE, format!("{WIZARD_COOKIE}={token}"));
        }
        if let Some(form) = form {
            request = request.form(form);
        }
        let answer = request
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let header = |name: reqwest::header::HeaderName| {
            answer
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let location = header(reqwest::header::LOCATION);
        let set_cookie = header(reqwest::header::SET_COOKIE);
        let status = answer.status().as_u16();
        let text = answer.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(WizardAnswer {
            status,
            location,
            set_cookie,
            text,
            body,
        })
    }

    /// `POST /wizard/check/<section>` with the form's fields; the checks it answered.
    pub async fn check(&self, section: &str, form: &[(&str, &str)]) -> Result<Vec<Value>> {
        let path = format!("/wizard/check/{section}");
        let answer = self
            .request(
                reqwest::Method::POST,
                &path,
                Some(&self.token),
                Some(form),
                None,
            )
            .await?;
        match (answer.status, answer.body.as_array()) {
            (200, Some(checks)) => Ok(checks.clone()),
            _ => bail!("POST {path}: HTTP {}: {}", answer.status, answer.text),
        }
    }

    /// `POST /wizard/apply`, then polls `/wizard/progress.json` until the apply has
    /// finished (within `timeout`); returns the last progress.
    pub async fn apply(&self, form: &[(&str, &str)], timeout: Duration) -> Result<Value> {
        let answer = self
            .request(
                reqwest::Method::POST,
                "/wizard/apply",
                Some(&self.token),
                Some(form),
                None,
            )
            .await?;
        if answer.status != 303 || answer.location.as_deref() != Some("/wizard/progress") {
            bail!(
                "POST /wizard/apply: HTTP {} (location {:?}): {}",
                answer.status,
                answer.location,
                answer.text
            );
        }
        self.wait_finished(timeout).await
    }

    /// Polls `/wizard/progress.json` until `finished`.
    pub async fn wait_finished(&self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self
                .request(
                    reqwest::Method::GET,
                    "/wizard/progress.json",
                    Some(&self.token),
                    None,
                    None,
                )
                .await?;
            if answer.status == 200 && answer.body["finished"] == true {
                return Ok(answer.body);
            }
            if Instant::now() > deadline {
                bail!(
                    "the apply did not finish within {timeout:?}; progress: HTTP {}: {}",
                    answer.status,
                    answer.text
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `km-wizard reopen --state-dir … --url …` (root only): the new token, which this
    /// harness uses from now on.
    pub fn reopen(&mut self) -> Result<String> {
        let out = Command::new(wizard_bin())
            .arg("reopen")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--url", &self.url()])
            .stdin(Stdio::null())
            .output()
            .context("run km-wizard reopen")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let token = stdout
            .lines()
            .find_map(|l| l.split_once("?token="))
            .map(|(_, t)| t.trim().to_string());
        match token {
            Some(token) if out.status.success() => {
                self.token = token.clone();
                Ok(token)
            }
            _ => bail!(
                "km-wizard reopen exited {}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// `GET /healthz` on km's plain port: the body when it answers.
    pub async fn km_health(&self) -> Result<Value> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?;
        let answer = http
            .get(format!("{}/healthz", self.km_url()))
            .send()
            .await?;
        Ok(answer.json().await?)
    }

    /// SIGTERM (the wizard stops its km), SIGKILL after 25 s; then the process group.
    fn stop_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            signal(pid, libc::SIGTERM);
            wait_child(&mut child, Duration::from_secs(25));
            // Whatever is left of the group the wizard led (a km it did not stop).
            if pid > 0 {
                // SAFETY: kill(2) of the process group this harness created.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
        }
    }
}

impl Drop for Wizard {
    fn drop(&mut self) {
        self.stop_now();
        diagnostic(self.log_tail(120));
        if keep_dirs()
            && let Some(d) = self.dir.take()
        {
            eprintln!("km-wizard dir kept: {}", d.keep().display());
        }
    }
}

/// Removes the appliance's variables a test process may carry (`KM_*`, `SMTP_*`, the CA
/// overrides), so that only the env file and the test's own choices reach the wizard and
/// its km.
pub fn clean_setup_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("KM_")
            || key.starts_with("SMTP_")
            || key.starts_with("WIZARD_")
            || key == "SSL_CERT_FILE"
            || key == "SSL_CERT_DIR"
        {
            command.env_remove(&key);
        }
    }
    command.env("NO_COLOR", "1").env("KM_LOG", "info");
}
