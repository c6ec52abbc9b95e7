//! Building the agent's frames without `serde_json::Value` trees.
//!
//! Each simulated server keeps its numbers in integer units (hundredths, milliseconds,
//! bytes). A full `status` frame is written from that state; every second
//! [`ServerSim::step`] moves the numbers and writes a `status:patch` frame made of
//! `replace` operations for exactly the values that changed, so the patches apply
//! cleanly to the previous status. The operation prefixes
//! (`{"op":"replace","path":"/data/process/3/axm_monitor/Heap Usage/value","value":`)
//! are serialised once per process slot and shared by all servers.
//!
//! Shapes and orderings follow the frames captured from pm2 7.0.4 in
//! `tests/fixtures/agent-status-sequence.jsonl` (server before processes, processes from
//! last to first, keys of one process in reverse order, as fast-json-patch emits them).

use std::fmt::Write as _;

/// Small, fast xorshift64* generator: one per simulated server.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed so that neighbouring seeds diverge at once
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((self.next_u64() >> 32) * n) >> 32
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    /// With a chance of `per_mille`, one random walk step of `value`; true if it changed.
    pub fn maybe_walk(
        &mut self,
        value: &mut u64,
        per_mille: u64,
        step: u64,
        lo: u64,
        hi: u64,
    ) -> bool {
        if !self.chance(per_mille) {
            return false;
        }
        let nv = self.walk(*value, step, lo, hi);
        std::mem::replace(value, nv) != nv
    }

    /// Random walk step: `v` moved by up to `step` either way, kept in `lo..=hi`.
    pub fn walk(&mut self, v: u64, step: u64, lo: u64, hi: u64) -> u64 {
        let d = self.below(2 * step + 1);
        let nv = (v + d).saturating_sub(step);
        nv.clamp(lo, hi)
    }
}

// ---------------------------------------------------------------------------------
// number writers

pub fn push_u64(out: &mut String, v: u64) {
    let mut b = itoa::Buffer::new();
    out.push_str(b.format(v));
}

fn push_digit(out: &mut String, d: u64) {
    out.push(char::from(b'0' + (d % 10) as u8));
}

/// `toFixed(2)` of a value in hundredths: `"6.40"`.
pub fn push_fixed2(out: &mut String, centi: u64) {
    push_u64(out, centi / 100);
    out.push('.');
    push_digit(out, centi / 10 % 10);
    push_digit(out, centi % 10);
}

/// A JS number given in hundredths: `83.8`, `92.63`, `3`.
pub fn push_num_centi(out: &mut String, centi: u64) {
    push_u64(out, centi / 100);
    let f = centi % 100;
    if f != 0 {
        out.push('.');
        push_digit(out, f / 10);
        if !f.is_multiple_of(10) {
            push_digit(out, f);
        }
    }
}

/// A JS number given in thousandths: `436.91`, `437.915`, `12`.
pub fn push_num_milli(out: &mut String, milli: u64) {
    push_u64(out, milli / 1000);
    let mut f = milli % 1000;
    if f != 0 {
        out.push('.');
        let mut digits = 3;
        while f.is_multiple_of(10) {
            f /= 10;
            digits -= 1;
        }
        let mut div = 10u64.pow(digits - 1);
        for _ in 0..digits {
            push_digit(out, f / div);
            div /= 10;
        }
    }
}

/// Writes `s` as the inside of a JSON string (no quotes).
pub fn push_json_str_inner(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

// ---------------------------------------------------------------------------------
// templates

/// Patchable fields of one process, in the order the patch ops are written
/// (reverse key order, as fast-json-patch walks objects backwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
enum Field {
    Ell95,
    Ell,
    ActiveHandles,
    ActiveRequests,
    Jobs,
    ReqSec,
    UsedHeap,
    HeapUsage,
    HeapSize,
    Memory,
    Cpu,
}

const NFIELDS: usize = 11;

/// (path below `/data/process/<k>/`, value written as a JSON string?)
const FIELD_PATHS: [(&str, bool); NFIELDS] = [
    ("axm_monitor/Event Loop Latency p95/value", true),
    ("axm_monitor/Event Loop Latency/value", true),
    ("axm_monitor/Active handles/value", false),
    ("axm_monitor/Active requests/value", false),
    ("axm_monitor/Processed jobs/value", false),
    ("axm_monitor/req~1sec/value", false),
    ("axm_monitor/Used Heap Size/value", true),
    ("axm_monitor/Heap Usage/value", false),
    ("axm_monitor/Heap Size/value", true),
    ("memory", false),
    ("cpu", false),
];

const ACTIONS: &str = concat!(
    r#"[{"action_name":"km:heapdump","action_type":"internal","arity":2},"#,
    r#"{"action_name":"km:cpu:profiling:start","action_type":"internal","arity":2},"#,
    r#"{"action_name":"km:cpu:profiling:stop","action_type":"internal","arity":1},"#,
    r#"{"action_name":"km:heap:sampling:start","action_type":"internal","arity":2},"#,
    r#"{"action_name":"km:heap:sampling:stop","action_type":"internal","arity":1},"#,
    r#"{"action_name":"cache:flush","action_type":"custom","arity":1}]"#
);

const PATCH_HEAD: &str = r#"{"channel":"status:patch","payload":["#;
const OP_UPTIME: &str = r#"{"op":"replace","path":"/data/server/uptime","value":"#;
const OP_LOADAVG: [&str; 3] = [
    r#"{"op":"replace","path":"/data/server/loadavg/0","value":"#,
    r#"{"op":"replace","path":"/data/server/loadavg/1","value":"#,
    r#"{"op":"replace","path":"/data/server/loadavg/2","value":"#,
];

/// Pre-serialised pieces shared by every simulated server.
#[derive(Debug)]
pub struct Templates {
    processes: usize,
    /// `ops[k][field]`: `{"op":"replace","path":"/data/process/k/…","value":` (plus `"`
    /// for string-valued fields).
    ops: Vec<[String; NFIELDS]>,
    /// `{"pm_id":k,"name":"app-k","rev":null,"server":"` for log frames.
    log_process: Vec<String>,
}

impl Templates {
    pub fn processes(&self) -> usize {
        self.processes
    }

    pub fn new(processes: usize) -> Self {
        let ops = (0..processes)
            .map(|k| {
                FIELD_PATHS.map(|(path, is_str)| {
                    let mut s =
                        format!(r#"{{"op":"replace","path":"/data/process/{k}/{path}","value":"#);
                    if is_str {
                        s.push('"');
                    }
                    s
                })
            })
            .collect();
        let log_process = (0..processes)
            .map(|k| format!(r#"{{"pm_id":{k},"name":"app-{k}","rev":null,"server":""#))
            .collect();
        Templates {
            processes,
            ops,
            log_process,
        }
    }
}

// ---------------------------------------------------------------------------------
// simulated state

#[derive(Debug, Clone)]
struct Proc {
    pid: u64,
    created_at: u64,
    restart_time: u64,
    cluster: bool,
    unique_id: String,
    cpu: u64,
    memory: u64,
    heap_size: u64,  // centi-MiB
    used_heap: u64,  // centi-MiB
    heap_usage: u64, // centi-%
    active_requests: u64,
    active_handles: u64,
    ell: u64,   // centi-ms
    ell95: u64, // centi-ms
    /// "req/sec" and "Processed jobs" (custom metrics) exist on even pm_ids only.
    custom: bool,
    req_sec: u64, // centi
    jobs: u64,
}

fn uuid(rng: &mut Rng) -> String {
    let a = rng.next_u64();
    let b = rng.next_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// One simulated PM2 agent: its status and how it evolves.
#[derive(Debug, Clone)]
pub struct ServerSim {
    /// Machine name, already escaped for use inside a JSON string.
    name_json: String,
    rng: Rng,
    uptime_base_ms: u64,
    uptime_ms: u64,
    loadavg: [u64; 3], // centi
    total_mem: u64,
    unique_id: String,
    internal_ip: String,
    procs: Vec<Proc>,
    log_seq: u64,
}

impl ServerSim {
    pub fn new(index: usize, name: &str, tpl: &Templates, now_ms: u64) -> Self {
        let mut rng = Rng::new(index as u64 ^ 0x6b6d_6c6f_6164);
        let mut name_json = String::with_capacity(name.len());
        push_json_str_inner(&mut name_json, name);
        let uptime_base_ms = (3_600 + rng.below(86_400 * 30)) * 1000 + rng.below(100) * 10;
        let started = now_ms.saturating_sub(uptime_base_ms / 2);
        let procs = (0..tpl.processes)
            .map(|k| {
                let heap_size = 600 + rng.below(1200);
                let used_heap = heap_size * (60 + rng.below(35)) / 100;
                let created_at = started + rng.below(60_000);
                let cluster = k % 4 >= 2;
                Proc {
                    pid: 1000 + rng.below(60_000),
                    created_at,
                    restart_time: if rng.chance(200) { rng.below(20) } else { 0 },
                    cluster,
                    unique_id: uuid(&mut rng),
                    cpu: rng.below(4),
                    memory: (40 + rng.below(200)) * 1024 * 1024 + rng.below(256) * 4096,
                    heap_size,
                    used_heap,
                    heap_usage: used_heap * 10_000 / heap_size,
                    active_requests: rng.below(3),
                    active_handles: 1 + rng.below(8),
                    ell: 20 + rng.below(40),
                    ell95: 100 + rng.below(300),
                    custom: k % 2 == 0,
                    req_sec: rng.below(5000),
                    jobs: rng.below(10_000),
                }
            })
            .collect();
        let loadavg = [rng.below(300), rng.below(250), rng.below(200)];
        let unique_id = uuid(&mut rng);
        let internal_ip = format!(
            "10.{}.{}.{}",
            (index >> 16) & 0xff,
            (index >> 8) & 0xff,
            index & 0xff
        );
        ServerSim {
            name_json,
            rng,
            uptime_base_ms,
            uptime_ms: uptime_base_ms,
            loadavg,
            total_mem: 16 * 1024 * 1024 * 1024 + 512 * 1024 * 1024,
            unique_id,
            internal_ip,
            procs,
            log_seq: 0,
        }
    }

    /// Writes the full `status` frame of the current state into `out`.
    pub fn write_full(&self, out: &mut String) {
        out.reserve(1024 + self.procs.len() * 1900);
        out.push_str(r#"{"channel":"status","payload":{"data":{"process":["#);
        for (k, p) in self.procs.iter().enumerate() {
            if k > 0 {
                out.push(',');
            }
            out.push_str(r#"{"pid":"#);
            push_u64(out, p.pid);
            let _ = write!(
                out,
                r#","name":"app-{k}","interpreter":"node","args":[],"path":"/srv/loadgen/app-{k}.js","restart_time":"#
            );
            push_u64(out, p.restart_time);
            out.push_str(r#","created_at":"#);
            push_u64(out, p.created_at);
            out.push_str(if p.cluster {
                r#","exec_mode":"cluster_mode","pm_uptime":"#
            } else {
                r#","exec_mode":"fork_mode","pm_uptime":"#
            });
            push_u64(out, p.created_at);
            out.push_str(r#","status":"online","pm_id":"#);
            push_u64(out, k as u64);
            out.push_str(r#","unique_id":""#);
            out.push_str(&p.unique_id);
            out.push_str(r#"","cpu":"#);
            push_u64(out, p.cpu);
            out.push_str(r#","memory":"#);
            push_u64(out, p.memory);
            out.push_str(r#","versioning":null,"node_env":"production","axm_actions":"#);
            out.push_str(ACTIONS);
            out.push_str(r#","axm_monitor":{"Heap Size":{"historic":true,"unit":"MiB","type":"internal/v8/heap/total","value":""#);
            push_fixed2(out, p.heap_size);
            out.push_str(r#""},"Heap Usage":{"historic":true,"unit":"%","type":"internal/v8/heap/usage","value":"#);
            push_num_centi(out, p.heap_usage);
            out.push_str(r#"},"Used Heap Size":{"historic":true,"unit":"MiB","type":"internal/v8/heap/used","value":""#);
            push_fixed2(out, p.used_heap);
            out.push_str(r#""},"#);
            if p.custom {
                out.push_str(r#""req/sec":{"historic":true,"unit":"req/s","value":"#);
                push_num_centi(out, p.req_sec);
                out.push_str(r#"},"Processed jobs":{"historic":true,"type":"app/jobs","value":"#);
                push_u64(out, p.jobs);
                out.push_str("},");
            }
            out.push_str(
                r#""Active requests":{"historic":true,"type":"internal/libuv/requests","value":"#,
            );
            push_u64(out, p.active_requests);
            out.push_str(
                r#"},"Active handles":{"historic":true,"type":"internal/libuv/handles","value":"#,
            );
            push_u64(out, p.active_handles);
            out.push_str(r#"},"Event Loop Latency":{"historic":true,"unit":"ms","type":"internal/libuv/latency/p50","value":""#);
            push_fixed2(out, p.ell);
            out.push_str(r#""},"Event Loop Latency p95":{"historic":true,"unit":"ms","type":"internal/libuv/latency/p95","value":""#);
            push_fixed2(out, p.ell95);
            out.push_str(r#""}},"axm_options":{},"axm_dynamic":{}}"#);
        }
        out.push_str(r#"],"server":{"hostname":""#);
        out.push_str(&self.name_json);
        out.push_str(r#"","uptime":"#);
        push_num_milli(out, self.uptime_ms);
        out.push_str(r#","platform":"linux","pm2_version":"7.0.4","pm2_agent_version":"7.0.4","node_version":"v20.20.2","unique_id":""#);
        out.push_str(&self.unique_id);
        out.push_str(r#"","loadavg":["#);
        for (j, l) in self.loadavg.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            push_num_centi(out, *l);
        }
        out.push_str(r#"],"total_mem":"#);
        push_u64(out, self.total_mem);
        out.push_str(r#","type":"Linux"}},"server_name":""#);
        out.push_str(&self.name_json);
        out.push_str(r#"","internal_ip":""#);
        out.push_str(&self.internal_ip);
        out.push_str(r#""}}"#);
    }

    /// Advances one second and writes the `status:patch` frame that turns the previous
    /// status into the new one. With `marker`, `data.server.uptime` gets a value no
    /// regular tick produces (it ends in 5 ms; regular ones in 10 ms steps), larger than
    /// the previous one and smaller than the next: that value is returned.
    pub fn step(&mut self, tpl: &Templates, marker: bool, out: &mut String) -> Option<u64> {
        out.reserve(256 + self.procs.len() * 300);
        out.push_str(PATCH_HEAD);
        let mut first = true;
        let mut op = |out: &mut String, prefix: &str| {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(prefix);
        };

        // server: loadavg (changes every few seconds), then uptime (every second)
        let rng = &mut self.rng;
        for j in (0..3).rev() {
            if rng.chance(120) {
                let nv = rng.walk(self.loadavg[j], 40, 0, 800);
                if nv != self.loadavg[j] {
                    self.loadavg[j] = nv;
                    op(out, OP_LOADAVG[j]);
                    push_num_centi(out, nv);
                    out.push('}');
                }
            }
        }
        self.uptime_base_ms += 1000;
        let marker_value = if marker {
            Some(self.uptime_base_ms + 5)
        } else {
            None
        };
        self.uptime_ms = marker_value.unwrap_or(self.uptime_base_ms);
        op(out, OP_UPTIME);
        push_num_milli(out, self.uptime_ms);
        out.push('}');

        for (k, p) in self.procs.iter_mut().enumerate().rev() {
            let ops = &tpl.ops[k];
            let mut put = |out: &mut String, f: Field, v: u64| {
                op(out, &ops[f as usize]);
                match f {
                    Field::Ell95 | Field::Ell | Field::UsedHeap | Field::HeapSize => {
                        push_fixed2(out, v);
                        out.push_str("\"}");
                    }
                    Field::HeapUsage | Field::ReqSec => {
                        push_num_centi(out, v);
                        out.push('}');
                    }
                    _ => {
                        push_u64(out, v);
                        out.push('}');
                    }
                }
            };
            if rng.maybe_walk(&mut p.ell95, 250, 40, 80, 900) {
                put(out, Field::Ell95, p.ell95);
            }
            if rng.maybe_walk(&mut p.ell, 300, 4, 10, 120) {
                put(out, Field::Ell, p.ell);
            }
            if rng.maybe_walk(&mut p.active_handles, 15, 1, 1, 20) {
                put(out, Field::ActiveHandles, p.active_handles);
            }
            if rng.maybe_walk(&mut p.active_requests, 15, 1, 0, 6) {
                put(out, Field::ActiveRequests, p.active_requests);
            }
            if p.custom {
                if rng.chance(250) {
                    p.jobs += 1 + rng.below(9);
                    put(out, Field::Jobs, p.jobs);
                }
                if rng.maybe_walk(&mut p.req_sec, 200, 60, 0, 20_000) {
                    put(out, Field::ReqSec, p.req_sec);
                }
            }
            // the heap moves every second; a GC now and then changes its size
            let mut heap_size = p.heap_size;
            if rng.chance(25) {
                heap_size = rng.walk(heap_size, 60, 400, 4000);
            }
            let used = rng.walk(p.used_heap, 8, heap_size / 3, heap_size - 1);
            let usage = used * 10_000 / heap_size;
            if used != p.used_heap {
                p.used_heap = used;
                put(out, Field::UsedHeap, used);
            }
            if usage != p.heap_usage {
                p.heap_usage = usage;
                put(out, Field::HeapUsage, usage);
            }
            if heap_size != p.heap_size {
                p.heap_size = heap_size;
                put(out, Field::HeapSize, heap_size);
            }
            if rng.chance(200) {
                let nv = rng.walk(p.memory / 4096, 160, 8192, 1 << 20) * 4096;
                if nv != p.memory {
                    p.memory = nv;
                    put(out, Field::Memory, nv);
                }
            }
            if rng.maybe_walk(&mut p.cpu, 150, 2, 0, 100) {
                put(out, Field::Cpu, p.cpu);
            }
        }
        out.push_str("]}");
        marker_value
    }

    /// Writes one `logs` frame (`log_type: "out"`) for a process picked at random.
    pub fn write_log(&mut self, tpl: &Templates, at_ms: u64, out: &mut String) {
        let k = self.rng.below(tpl.processes as u64) as usize;
        self.log_seq += 1;
        out.reserve(256);
        out.push_str(r#"{"channel":"logs","payload":{"at":"#);
        push_u64(out, at_ms);
        out.push_str(r#","data":"#);
        const ROUTES: [&str; 6] = [
            "GET /api/users/",
            "GET /api/items/",
            "POST /api/orders/",
            "GET /health/",
            "PUT /api/carts/",
            "GET /static/app.js?v=",
        ];
        let route = ROUTES[self.rng.below(ROUTES.len() as u64) as usize];
        let status = if self.rng.chance(30) { 500 } else { 200 };
        let _ = write!(
            out,
            "\"[app-{k}] #{} {route}{} {status} {} ms\\n\"",
            self.log_seq,
            self.rng.below(100_000),
            1 + self.rng.below(250)
        );
        out.push_str(r#","process":"#);
        out.push_str(&tpl.log_process[k]);
        out.push_str(&self.name_json);
        out.push_str(r#""},"log_type":"out"}}"#);
    }
}

/// Finds `data.server.uptime` of server `name` in an answer of
/// `GET /api/bucket/:id/data/status`: an array of statuses, one status object, or an
/// object keyed by server name.
pub fn find_uptime(v: &serde_json::Value, name: &str) -> Option<f64> {
    use serde_json::Value;
    match v {
        Value::Array(items) => items.iter().find_map(|it| {
            let named = it.get("server_name").and_then(Value::as_str);
            if named.is_none() || named == Some(name) {
                find_uptime(it, name)
            } else {
                None
            }
        }),
        Value::Object(map) => {
            if let Some(named) = map.get("server_name").and_then(Value::as_str)
                && named != name
            {
                return None;
            }
            if let Some(u) = v
                .pointer("/data/server/uptime")
                .and_then(Value::as_f64)
                .or_else(|| v.pointer("/server/uptime").and_then(Value::as_f64))
            {
                return Some(u);
            }
            if let Some(inner) = map.get(name) {
                return find_uptime(inner, name);
            }
            // wrapped answers: {"data": [...]} or {"status": {...}}
            ["data", "status", "servers"]
                .iter()
                .filter_map(|k| map.get(*k))
                .find_map(|inner| find_uptime(inner, name))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::Value;

    fn frame(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn numbers() {
        type Writer = fn(&mut String, u64);
        let cases: &[(Writer, u64, &str)] = &[
            (push_fixed2, 640, "6.40"),
            (push_fixed2, 5, "0.05"),
            (push_num_centi, 8380, "83.8"),
            (push_num_centi, 9263, "92.63"),
            (push_num_centi, 300, "3"),
            (push_num_centi, 7, "0.07"),
            (push_num_milli, 436_910, "436.91"),
            (push_num_milli, 437_915, "437.915"),
            (push_num_milli, 12_000, "12"),
            (push_num_milli, 12_500, "12.5"),
            (push_num_milli, 12_005, "12.005"),
        ];
        for (f, v, want) in cases {
            let mut s = String::new();
            f(&mut s, *v);
            assert_eq!(&s, want);
        }
        let mut s = String::new();
        push_json_str_inner(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, "a\\\"b\\\\c\\nd\\u0001é");
    }

    #[test]
    fn full_status_shape() {
        let tpl = Templates::new(8);
        let sim = ServerSim::new(7, "loadgen-7", &tpl, 1_795_314_237_422);
        let mut s = String::new();
        sim.write_full(&mut s);
        let v = frame(&s);
        assert_eq!(v["channel"], "status");
        let p = &v["payload"];
        assert_eq!(p["server_name"], "loadgen-7");
        let procs = p["data"]["process"].as_array().unwrap();
        assert_eq!(procs.len(), 8);
        let mut names = std::collections::HashSet::new();
        for (k, pr) in procs.iter().enumerate() {
            assert_eq!(pr["pm_id"], k as u64);
            assert_eq!(pr["name"], format!("app-{k}"));
            assert!(names.insert(pr["name"].as_str().unwrap().to_string()));
            assert_eq!(pr["status"], "online");
            assert!(pr["memory"].as_u64().unwrap() > 1_000_000);
            assert!(pr["axm_monitor"]["Heap Usage"]["value"].is_number());
            assert!(pr["axm_monitor"]["Used Heap Size"]["value"].is_string());
        }
        assert!(p["data"]["server"]["uptime"].as_f64().unwrap() > 3600.0);
        assert_eq!(p["data"]["server"]["loadavg"].as_array().unwrap().len(), 3);
        // a full status of 8 processes is in the size range of the real ones
        assert!(s.len() > 8_000 && s.len() < 25_000, "{}", s.len());
    }

    #[test]
    fn patches_apply_cleanly_and_match_full_status() {
        for (procs, index) in [(8usize, 0usize), (1, 3), (20, 1999)] {
            let tpl = Templates::new(procs);
            let name = format!("loadgen-{index}");
            let mut sim = ServerSim::new(index, &name, &tpl, 1_795_314_237_422);
            let mut s = String::new();
            sim.write_full(&mut s);
            let mut doc = frame(&s)["payload"].clone();
            for tick in 0..300 {
                s.clear();
                let marker = sim.step(&tpl, tick % 7 == 3, &mut s);
                let f = frame(&s);
                assert_eq!(f["channel"], "status:patch");
                let patch: json_patch::Patch =
                    serde_json::from_value(f["payload"].clone()).unwrap();
                json_patch::patch(&mut doc, &patch).unwrap();
                if let Some(m) = marker {
                    assert_eq!(m % 10, 5);
                    assert_eq!(
                        doc["data"]["server"]["uptime"].as_f64().unwrap(),
                        m as f64 / 1000.0
                    );
                    assert_eq!(find_uptime(&doc, &name), Some(m as f64 / 1000.0));
                }
                if tick % 50 == 49 {
                    s.clear();
                    sim.write_full(&mut s);
                    assert_eq!(doc, frame(&s)["payload"], "tick {tick}");
                }
            }
        }
    }

    #[test]
    fn patch_frames_are_about_2kb_for_8_processes() {
        let tpl = Templates::new(8);
        let mut total = 0;
        let mut n = 0;
        for index in 0..50 {
            let mut sim = ServerSim::new(index, &format!("loadgen-{index}"), &tpl, 0);
            let mut s = String::new();
            for _ in 0..40 {
                s.clear();
                sim.step(&tpl, false, &mut s);
                total += s.len();
                n += 1;
            }
        }
        let avg = total / n;
        assert!((1700..=2400).contains(&avg), "average patch frame {avg} B");
        eprintln!("average patch frame for 8 processes: {avg} B");
    }

    #[test]
    fn log_frames() {
        let tpl = Templates::new(4);
        let mut sim = ServerSim::new(1, "loadgen-1", &tpl, 0);
        let mut s = String::new();
        sim.write_log(&tpl, 1_795_314_739_236, &mut s);
        let v = frame(&s);
        assert_eq!(v["channel"], "logs");
        let p = &v["payload"];
        assert_eq!(p["at"], 1_795_314_739_236u64);
        assert!(p["data"].as_str().unwrap().ends_with('\n'));
        assert_eq!(p["log_type"], "out");
        assert_eq!(p["process"]["server"], "loadgen-1");
        assert!(p["process"]["rev"].is_null());
        let k = p["process"]["pm_id"].as_u64().unwrap();
        assert_eq!(p["process"]["name"], format!("app-{k}"));
    }

    #[test]
    fn uptime_in_answers() {
        let one = serde_json::json!({"server_name":"a","data":{"server":{"uptime":1.5}}});
        assert_eq!(find_uptime(&one, "a"), Some(1.5));
        assert_eq!(find_uptime(&one, "b"), None);
        let arr = serde_json::json!([
            {"server_name":"b","data":{"server":{"uptime":2.0}}},
            {"server_name":"a","data":{"server":{"uptime":3.0}}}
        ]);
        assert_eq!(find_uptime(&arr, "a"), Some(3.0));
        let keyed = serde_json::json!({"a":{"data":{"server":{"uptime":4.0}}}});
        assert_eq!(find_uptime(&keyed, "a"), Some(4.0));
        let wrapped =
            serde_json::json!({"data":[{"server_name":"a","data":{"server":{"uptime":5.0}}}]});
        assert_eq!(find_uptime(&wrapped, "a"), Some(5.0));
    }
}
