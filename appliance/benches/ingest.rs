//! CPU cost of the ingest hot path, per frame, in this process: decode the envelope,
//! parse and apply a real `status:patch` to the live status, sample metrics; then the
//! same while a browser watches the bucket (each patched status is rendered for it).
//! Run: `cargo bench -p km-appliance --bench ingest`.

use std::time::Duration;

use km::interactor::receive;
use km_config::{Settings, Values};
use km_stores::ids::now_ms;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const ROUNDS: usize = 3_000;

/// CPU time of this thread: unlike wall time, not inflated by other processes.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The captured full status and the patches that follow it, as frames.
fn frames() -> (String, Vec<String>) {
    let mut lines = include_str!("../../tests/fixtures/agent-status-sequence.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|l| l["frame"].clone());
    let status = lines.next().unwrap_or_default().to_string();
    let patches = lines
        .take_while(|f| f["channel"] == "status:patch")
        .map(|f| f.to_string())
        .collect();
    (status, patches)
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let settings = Settings::from_values(&Values::with_data_dir(dir.path()))?;
    let (app, _writer) = runtime.block_on(km::server::build_app(
        settings,
        "http://127.0.0.1:8080".into(),
        km_tls::Tls::off(),
        CancellationToken::new(),
    ))?;
    let _guard = runtime.enter();
    let (tx, _rx) = tokio::sync::mpsc::channel(1024);
    let (session, socket) = app.sessions.attach("b", "bench-1", tx.clone(), now_ms());
    let (status, patches) = frames();
    let bytes: usize = patches.iter().map(String::len).sum();

    let run = |name: &str| {
        let mut spent = Duration::ZERO;
        for _ in 0..ROUNDS {
            receive(&app, &session, socket, &tx, &status);
            let start = thread_cpu();
            for patch in &patches {
                receive(&app, &session, socket, &tx, patch);
            }
            spent += thread_cpu() - start;
        }
        let frames = (ROUNDS * patches.len()) as f64;
        println!(
            "{{\"bench\":\"{name}\",\"frames\":{frames},\"avg_frame_bytes\":{},\"cpu_us_per_frame\":{:.2},\"frames_per_s_one_core\":{:.0}}}",
            bytes / patches.len(),
            spent.as_secs_f64() * 1e6 / frames,
            frames / spent.as_secs_f64()
        );
    };
    run("status_patch");
    // A watcher: every status is rendered and handed to the hub (the queue keeps the
    // newest 1,024, as for a slow browser).
    let _watcher = app.live.subscribe("b");
    run("status_patch_watched");
    let failed = app
        .ingest
        .counters
        .patches_failed
        .load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} patches failed to apply");
    Ok(())
}
