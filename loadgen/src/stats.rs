//! Counters shared by all tasks, and rate-limited error reporting.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Stats {
    /// Set once the ramp is over: latency probes only measure the steady state.
    pub steady: std::sync::atomic::AtomicBool,
    pub connected: AtomicI64,
    pub ever_connected: AtomicU64,
    pub failed: AtomicU64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub status_frames: AtomicU64,
    pub patch_frames: AtomicU64,
    pub patch_bytes: AtomicU64,
    pub log_frames: AtomicU64,
    pub frames_received: AtomicU64,
    pub resends: AtomicU64,
    pub disconnects: AtomicU64,
    pub reconnect_failures: AtomicU64,
    pub send_errors: AtomicU64,
    pub bad_patches: AtomicU64,
    pub latency: Mutex<Vec<f64>>,
    pub latency_timeouts: AtomicU64,
    pub latency_aborted: AtomicU64,
    pub probe_http_errors: AtomicU64,
}

impl Stats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }

    pub fn connected(&self) -> i64 {
        self.connected.load(Relaxed)
    }

    pub fn push_latency(&self, ms: f64) {
        if let Ok(mut v) = self.latency.lock() {
            v.push(ms);
        }
    }

    /// Percentiles of the latencies so far.
    pub fn percentiles(&self) -> Percentiles {
        let mut v = match self.latency.lock() {
            Ok(v) => v.clone(),
            Err(_) => Vec::new(),
        };
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            if v.is_empty() {
                return None;
            }
            let idx = ((v.len() as f64 - 1.0) * q).round() as usize;
            v.get(idx.min(v.len() - 1)).copied()
        };
        Percentiles {
            p50: pick(0.50),
            p90: pick(0.90),
            p99: pick(0.99),
            max: v.last().copied(),
            n: v.len(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub n: usize,
}

/// Prints the first few errors of each kind to stderr and counts the rest.
#[derive(Debug, Default)]
pub struct ErrorLog {
    seen: Mutex<HashMap<&'static str, (u64, Vec<String>)>>,
}

const SHOWN_PER_KIND: u64 = 5;

impl ErrorLog {
    /// Shows up to 5 different messages of one kind; an exact repeat of one already
    /// shown is only counted.
    pub fn report(&self, kind: &'static str, msg: impl FnOnce() -> String) {
        let Ok(mut m) = self.seen.lock() else { return };
        let (n, shown) = m.entry(kind).or_default();
        *n += 1;
        if shown.len() as u64 >= SHOWN_PER_KIND {
            return;
        }
        let msg = msg();
        if shown.contains(&msg) {
            return;
        }
        eprintln!("km-loadgen: {msg}");
        shown.push(msg);
        if shown.len() as u64 == SHOWN_PER_KIND {
            eprintln!("km-loadgen: (further {kind} errors are counted, not shown)");
        }
    }

    /// (kind, count) of every kind with more errors than were shown.
    pub fn suppressed(&self) -> Vec<(&'static str, u64)> {
        match self.seen.lock() {
            Ok(m) => m
                .iter()
                .filter(|(_, (n, shown))| *n > shown.len() as u64)
                .map(|(k, (n, _))| (*k, *n))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// The message of the innermost error of a chain, made short and lower-case:
/// "connection refused" rather than "error sending request for url (…)".
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    if let Some(io) = cur.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind::*;
        let s = match io.kind() {
            ConnectionRefused => Some("connection refused"),
            ConnectionReset => Some("connection reset"),
            ConnectionAborted => Some("connection aborted"),
            TimedOut => Some("timed out"),
            AddrNotAvailable => Some("address not available (out of local ports?)"),
            UnexpectedEof => Some("connection closed by the server"),
            _ => None,
        };
        if let Some(s) = s {
            return s.to_string();
        }
    }
    let s = cur.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_lowercase(),
        None => s,
    }
}
