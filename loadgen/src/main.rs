//! `km-loadgen`: N simulated PM2 agents with M processes each, speaking the real agent
//! protocol (verifyPM2, websocket, `status` then `status:patch` every second, logs,
//! pings), with optional send→visible latency probes through the status API and an
//! optional browser watching the bucket over `/primus`.
//!
//! Progress goes to stderr once a second; the last line on stdout is one JSON object
//! with the results.

mod agent;
mod frames;
mod probe;
mod stats;
mod watcher;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::agent::{Ctx, Slot, run_server};
use crate::frames::Templates;
use crate::probe::{ProbeCfg, probe_loop};
use crate::stats::{ErrorLog, Stats};
use crate::watcher::{Received, watch_bucket};

/// Load generator speaking the PM2 agent protocol to a KM appliance.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Root URL of the appliance (what agents get as KEYMETRICS_NODE), http:// only.
    #[arg(long, env = "KM_TARGET")]
    target: String,
    /// Bucket public key.
    #[arg(long, env = "KM_PUBLIC")]
    public: String,
    /// Bucket secret key.
    #[arg(long, env = "KM_SECRET")]
    secret: String,
    /// Simulated servers (agents), named `<name-prefix>-<i>`.
    #[arg(long, default_value_t = 100)]
    servers: usize,
    /// Processes per server (pm_id 0..M-1, named app-<k>).
    #[arg(long, default_value_t = 8)]
    processes: usize,
    /// Seconds to run once every server has been started.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Access token for the latency probes (with --bucket) and the watcher.
    #[arg(long, env = "KM_TOKEN")]
    token: Option<String>,
    /// Bucket id for latency probes (with --token).
    #[arg(long, env = "KM_BUCKET")]
    bucket: Option<String>,
    /// Log lines per second per server (fractions allowed, 0 for none).
    #[arg(long, default_value_t = 1.0)]
    logs_per_s: f64,
    /// Milliseconds between two statuses of one server (a real agent sends one a second).
    #[arg(long, default_value_t = 1000)]
    status_every_ms: u64,
    /// New servers started per second.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Handshakes (verifyPM2 + websocket upgrade) in flight at most.
    #[arg(long, default_value_t = 64)]
    max_handshakes: usize,
    /// Machine names are `<prefix>-<i>`.
    #[arg(long, default_value = "loadgen")]
    name_prefix: String,
    /// Milliseconds between latency probes.
    #[arg(long, default_value_t = 200)]
    probe_every_ms: u64,
    /// Test the server's resend path: every N-th patch of each server is replaced by
    /// one that cannot apply (a server should answer `status:resend`). 0: never.
    #[arg(long, default_value_t = 0)]
    bad_patch_every: u64,
    /// Watch the bucket over `/primus` as a browser would (needs --token).
    #[arg(long, value_enum)]
    watch: Option<watcher::Mode>,
    /// Worker threads of the (single) tokio runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check_args(&args) {
        eprintln!("km-loadgen: {e:#}");
        return ExitCode::from(2);
    }
    raise_fd_limit(args.servers);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("km-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("km-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_args(a: &Args) -> anyhow::Result<()> {
    if a.target.starts_with("https://") {
        bail!(
            "--target {}: https is not supported (km-loadgen is built without TLS); \
             point it at the appliance's plain http:// listener",
            a.target
        );
    }
    if !a.target.starts_with("http://") {
        bail!("--target {}: expected an http:// URL", a.target);
    }
    if a.servers == 0 || a.processes == 0 {
        bail!("--servers and --processes must be at least 1");
    }
    if !(a.logs_per_s >= 0.0 && a.logs_per_s.is_finite()) {
        bail!("--logs-per-s must be 0 or more");
    }
    if !(a.connect_rate > 0.0 && a.connect_rate.is_finite()) {
        bail!("--connect-rate must be more than 0");
    }
    if a.watch.is_some() && a.token.is_none() {
        bail!("--watch needs --token (the watcher signs in with it)");
    }
    if a.bucket.is_some() && a.token.is_none() {
        bail!("--bucket needs --token (the latency probes read the status API with it)");
    }
    Ok(())
}

/// 2,000 sockets do not fit under the usual soft limit of 1024 open files.
fn raise_fd_limit(servers: usize) {
    let Ok(limit) = rlimit::increase_nofile_limit(u64::MAX) else {
        return;
    };
    let need = servers as u64 + 256;
    if limit < need {
        eprintln!(
            "km-loadgen: warning: open-file limit is {limit} but {servers} servers need about {need}; \
             raise it (ulimit -n) or expect connection errors"
        );
    }
}

/// CPU seconds (user + system) used by this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct passed to it.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
}

#[derive(Clone, Copy, Default)]
struct Snap {
    at: Option<Instant>,
    frames: u64,
    bytes: u64,
    cpu: f64,
}

fn snap(s: &Stats) -> Snap {
    Snap {
        at: Some(Instant::now()),
        frames: Stats::get(&s.frames_sent),
        bytes: Stats::get(&s.bytes_sent),
        cpu: cpu_seconds(),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .pool_max_idle_per_host(args.max_handshakes.max(16))
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;
    let ctx = Arc::new(Ctx {
        target: args.target.trim_end_matches('/').to_string(),
        public: args.public.clone(),
        secret: args.secret.clone(),
        name_prefix: args.name_prefix.clone(),
        servers: args.servers,
        logs_per_s: args.logs_per_s,
        status_every: Duration::from_millis(args.status_every_ms.max(10)),
        bad_patch_every: args.bad_patch_every,
        http,
        tpl: Templates::new(args.processes),
        stats: Stats::default(),
        errors: ErrorLog::default(),
        slots: (0..args.servers).map(|_| Slot::default()).collect(),
        handshakes: Semaphore::new(args.max_handshakes.max(1)),
        epoch: Instant::now(),
        // server frames are small: keep per-socket buffers small too
        ws_config: WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .max_message_size(Some(64 << 20)),
    });
    let stats = &ctx.stats;
    let (stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now();
    let start_cpu = cpu_seconds();
    eprintln!(
        "km-loadgen: {} servers × {} processes against {}, {} s after a ramp of {:.1} s \
         ({} connects/s), {} log lines/s per server, latency probes {}",
        args.servers,
        args.processes,
        ctx.target,
        args.seconds,
        args.servers as f64 / args.connect_rate,
        args.connect_rate,
        args.logs_per_s,
        if args.bucket.is_some() { "on" } else { "off" }
    );

    // ramp: start servers at --connect-rate per second
    let spawner = {
        let ctx = ctx.clone();
        let stop = stop_rx.clone();
        let rate = args.connect_rate;
        tokio::spawn(async move {
            let mut tasks = Vec::with_capacity(ctx.servers);
            for i in 0..ctx.servers {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                if *stop.borrow() {
                    break;
                }
                tasks.push(tokio::spawn(run_server(ctx.clone(), i, stop.clone())));
            }
            tasks
        })
    };
    let prober = match (&args.token, &args.bucket) {
        (Some(token), Some(bucket)) => Some(tokio::spawn(probe_loop(
            ctx.clone(),
            ProbeCfg {
                token: token.clone(),
                bucket: bucket.clone(),
                every: Duration::from_millis(args.probe_every_ms.max(1)),
            },
            stop_rx.clone(),
        ))),
        _ => None,
    };

    let watched = Arc::new(Received::default());
    let watcher = match (args.watch, &args.token) {
        (Some(mode), Some(token)) => {
            let (target, token, public) = (ctx.target.clone(), token.clone(), args.public.clone());
            let (got, stop) = (watched.clone(), stop_rx.clone());
            Some(tokio::spawn(async move {
                watch_bucket(&target, &token, &public, mode, &got, stop).await
            }))
        }
        _ => None,
    };

    // progress once a second; the measured window starts when the ramp is done
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut last = snap(stats);
    let mut window_start: Option<Snap> = None;
    let mut interrupted = false;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut ctrl_c => {
                eprintln!("km-loadgen: interrupted, stopping");
                interrupted = true;
                break;
            }
        }
        let now = snap(stats);
        let dt = now
            .at
            .zip(last.at)
            .map(|(a, b)| a.duration_since(b).as_secs_f64())
            .unwrap_or(1.0)
            .max(1e-3);
        let pc = stats.percentiles();
        let n = pc.n;
        let lat = match (pc.p50, pc.p99) {
            (Some(a), Some(b)) => format!(
                " | latency p50 {a:.1} ms p99 {b:.1} ms (n={n}, timeouts {})",
                Stats::get(&stats.latency_timeouts)
            ),
            _ if args.bucket.is_some() => format!(
                " | latency: no sample yet (timeouts {})",
                Stats::get(&stats.latency_timeouts)
            ),
            _ => String::new(),
        };
        eprintln!(
            "[{:>5.1}s] connected {}/{} failed {} | frames/s {:.0} | {:.2} MB/s | patch avg {} B | \
             resends {} disconnects {} | cpu {:.0}%{lat}",
            start.elapsed().as_secs_f64(),
            stats.connected(),
            args.servers,
            Stats::get(&stats.failed),
            (now.frames - last.frames) as f64 / dt,
            (now.bytes - last.bytes) as f64 / dt / 1e6,
            Stats::get(&stats.patch_bytes) / Stats::get(&stats.patch_frames).max(1),
            Stats::get(&stats.resends),
            Stats::get(&stats.disconnects),
            (now.cpu - last.cpu) / dt * 100.0,
        );
        last = now;
        if window_start.is_none() && spawner.is_finished() {
            window_start = Some(now);
            stats
                .steady
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(ws) = window_start
            && let (Some(a), Some(b)) = (now.at, ws.at)
            && a.duration_since(b) >= Duration::from_secs(args.seconds)
        {
            break;
        }
        if Stats::get(&stats.failed) as usize >= args.servers {
            eprintln!("km-loadgen: every server failed to connect, stopping");
            break;
        }
    }
    let end = snap(stats);
    let whole_run = Snap {
        at: Some(start),
        cpu: start_cpu,
        ..Snap::default()
    };
    // a run stopped before (or right at) the end of its ramp is measured as a whole
    let window = match window_start {
        Some(w)
            if end
                .at
                .zip(w.at)
                .is_some_and(|(e, w)| e.duration_since(w).as_secs_f64() >= 0.5) =>
        {
            w
        }
        _ => whole_run,
    };
    let connected_at_end = stats.connected().max(0);

    // stop: close every socket, wait a little for the tasks
    let _ = stop_tx.send(true);
    if let Some(p) = prober {
        let _ = p.await;
    }
    if let Some(w) = watcher
        && let Ok(Err(e)) = w.await
    {
        eprintln!("km-loadgen: {e}");
    }
    if let Ok(tasks) = spawner.await {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
    }

    let secs = end
        .at
        .zip(window.at)
        .map(|(a, b)| a.duration_since(b).as_secs_f64())
        .unwrap_or(0.0);
    let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let pc = stats.percentiles();
    let patch_frames = Stats::get(&stats.patch_frames);
    for (kind, n) in ctx.errors.suppressed() {
        eprintln!("km-loadgen: {n} {kind} errors in all");
    }
    let failed = Stats::get(&stats.failed);
    let out = serde_json::json!({
        "target": ctx.target,
        "servers": args.servers,
        "processes": args.processes,
        "servers_connected": connected_at_end,
        "servers_ever_connected": Stats::get(&stats.ever_connected),
        "servers_failed": failed,
        "frames_sent": Stats::get(&stats.frames_sent),
        "frames_per_s": round2(per_s(end.frames - window.frames)),
        "status_frames": Stats::get(&stats.status_frames),
        "patch_frames": patch_frames,
        "log_frames": Stats::get(&stats.log_frames),
        "bytes_sent": Stats::get(&stats.bytes_sent),
        "bytes_per_s": round2(per_s(end.bytes - window.bytes)),
        "patch_frame_bytes_avg": Stats::get(&stats.patch_bytes).checked_div(patch_frames),
        "p50_ms": pc.p50.map(round2),
        "p90_ms": pc.p90.map(round2),
        "p99_ms": pc.p99.map(round2),
        "max_ms": pc.max.map(round2),
        "latency_samples": args.bucket.as_ref().map(|_| pc.n),
        "latency_timeouts": args.bucket.as_ref().map(|_| Stats::get(&stats.latency_timeouts)),
        "latency_aborted": args.bucket.as_ref().map(|_| Stats::get(&stats.latency_aborted)),
        "probe_http_errors": args.bucket.as_ref().map(|_| Stats::get(&stats.probe_http_errors)),
        "resends_received": Stats::get(&stats.resends),
        "bad_patches_sent": Stats::get(&stats.bad_patches),
        "frames_received": Stats::get(&stats.frames_received),
        "disconnects": Stats::get(&stats.disconnects),
        "reconnect_failures": Stats::get(&stats.reconnect_failures),
        "seconds": round2(secs),
        "ramp_seconds": round2(
            window.at.map(|w| w.duration_since(start).as_secs_f64()).unwrap_or(0.0)
        ),
        "loadgen_cpu_s": round2(end.cpu - start_cpu),
        "loadgen_cpu_pct_window": round2(if secs > 0.0 { (end.cpu - window.cpu) / secs * 100.0 } else { 0.0 }),
        "interrupted": interrupted,
        "watch_messages": args.watch.map(|_| Stats::get(&watched.messages)),
        "watch_bytes": args.watch.map(|_| Stats::get(&watched.bytes)),
    });
    println!("{out}");
    Ok(
        if connected_at_end == 0 && Stats::get(&stats.ever_connected) == 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        },
    )
}
