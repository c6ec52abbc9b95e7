//! Send→visible latency: a marker uptime goes out in one server's patch and the
//! status API is polled until it shows up.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::agent::{Ctx, now_ms};
use crate::frames::{Rng, find_uptime};
use crate::stats::{Stats, root_cause};

pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_EVERY: Duration = Duration::from_millis(5);

pub struct ProbeCfg {
    pub token: String,
    pub bucket: String,
    pub every: Duration,
}

/// Every `cfg.every` once the ramp is over, probes a random connected server, until
/// the stop signal.
/// Probes still running at the stop are dropped uncounted.
pub async fn probe_loop(ctx: Arc<Ctx>, cfg: ProbeCfg, mut stop: watch::Receiver<bool>) {
    let cfg = Arc::new(cfg);
    let mut rng = Rng::new(now_ms());
    let mut every = tokio::time::interval(cfg.every);
    every.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        while running.try_join_next().is_some() {}
        if !ctx.stats.steady.load(Relaxed) {
            continue;
        }
        let n = ctx.slots.len() as u64;
        let pick = (0..64).map(|_| rng.below(n) as usize).find(|&i| {
            let s = &ctx.slots[i];
            s.connected.load(Relaxed) && !s.probe_pending.load(Relaxed)
        });
        let Some(i) = pick else { continue };
        let (tx, rx) = oneshot::channel();
        let slot = &ctx.slots[i];
        if let Ok(mut p) = slot.probe.lock() {
            *p = Some(tx);
            slot.probe_pending.store(true, Relaxed);
        }
        running.spawn(probe_one(ctx.clone(), cfg.clone(), i, rx));
    }
    running.abort_all();
}

async fn probe_one(
    ctx: Arc<Ctx>,
    cfg: Arc<ProbeCfg>,
    i: usize,
    rx: oneshot::Receiver<(u64, Instant)>,
) {
    let stats = &ctx.stats;
    let (marker, sent) = match tokio::time::timeout(Duration::from_secs(3), rx).await {
        Ok(Ok(v)) => v,
        _ => {
            // the server lost its socket (or never ticked): take the probe back
            let slot = &ctx.slots[i];
            if let Ok(mut p) = slot.probe.lock() {
                p.take();
                slot.probe_pending.store(false, Relaxed);
            }
            Stats::add(&stats.latency_aborted, 1);
            return;
        }
    };
    let name = ctx.server_name(i);
    let want = marker as f64 / 1000.0;
    let url = format!("{}/api/bucket/{}/data/status", ctx.target, cfg.bucket);
    loop {
        let left = PROBE_TIMEOUT.saturating_sub(sent.elapsed());
        if left.is_zero() {
            Stats::add(&stats.latency_timeouts, 1);
            return;
        }
        let r = ctx
            .http
            .get(&url)
            .query(&[("server_name", name.as_str())])
            .bearer_auth(&cfg.token)
            .timeout(left)
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                match resp.json::<serde_json::Value>().await {
                    Ok(v) => {
                        // uptime only grows per server, so a later value also proves the
                        // marker frame was applied (it may have been overwritten already)
                        if find_uptime(&v, &name).is_some_and(|u| u >= want - 1e-9) {
                            let ms = sent.elapsed().as_secs_f64() * 1000.0;
                            stats.push_latency(ms);
                            if ms >= 100.0 {
                                let at = ctx.epoch.elapsed().as_secs_f64();
                                ctx.errors.report("slow latency", || {
                                format!("slow: {name} took {ms:.0} ms to show its marker (sent at {:.1} s)", at - ms / 1000.0)
                            });
                            }
                            return;
                        }
                    }
                    Err(e) => {
                        Stats::add(&stats.probe_http_errors, 1);
                        ctx.errors.report("status poll", || {
                            format!("GET {url}: answer is not JSON: {}", root_cause(&e))
                        });
                    }
                }
            }
            Ok(resp) => {
                Stats::add(&stats.probe_http_errors, 1);
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                ctx.errors.report("status poll", || {
                    format!(
                        "GET {url}?server_name={name}: HTTP {status}: {}",
                        body.chars().take(200).collect::<String>()
                    )
                });
            }
            Err(e) if e.is_timeout() => {}
            Err(e) => {
                Stats::add(&stats.probe_http_errors, 1);
                ctx.errors
                    .report("status poll", || format!("GET {url}: {}", root_cause(&e)));
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
