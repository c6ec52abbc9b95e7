//! Per-minute history of every numeric metric of a server's processes: cpu, memory and
//! each `axm_monitor` value that parses as a number.
//!
//! A metric is a value that holds until the agent reports a change: a full status sets
//! every value, a `status:patch` carries only the values that changed. Each minute's
//! point is therefore time-weighted: `avg` weighs every value by how long it held, `min`
//! and `max` are the extremes held, `last` the value at the end, `count` the seconds of
//! data. Only changed values cost anything on the hot path.
//!
//! Each server also has host series under the app name [`HOST`] (pm2 gives every app a
//! name): its 1-minute load average (`load`), the sums of its processes' `cpu` and
//! `memory` each minute, and when a monitoring module runs on it (pm2 5/6 sysmonit,
//! `pm2-server-monit`), its CPU, memory and disk in percent from the module's metrics.

use std::collections::HashMap;
use std::hash::BuildHasher;

use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

use crate::process::{Metric, Sampled};
use crate::tree::{Name, Names, Node, Shared};
use km_stores::MetricPoint;

const MINUTE_MS: i64 = 60_000;
pub use km_stores::HOST_APP as HOST;
/// The pm_id of a server's host series.
pub const HOST_PM_ID: i64 = -1;
/// The host's load series; its processes' sums of these each minute.
pub const HOST_LOAD: &str = "load";
const SUMMED: [&str; 2] = ["cpu", "memory"];

/// How a module's metric becomes a host series: as is, or its complement to 100.
#[derive(Clone, Copy)]
enum Taken {
    AsIs,
    From100,
}

/// (module, its metric, the host series, how).
const MONITORED: [(&str, &str, &str, Taken); 6] = [
    ("pm2-sysmonit", "CPU Usage", "host_cpu", Taken::AsIs),
    ("pm2-sysmonit", "RAM Usage", "host_memory_used", Taken::AsIs),
    (
        "pm2-sysmonit",
        "Disk Usage",
        "host_disk_free",
        Taken::From100,
    ),
    ("pm2-server-monit", "CPU usage", "host_cpu", Taken::AsIs),
    (
        "pm2-server-monit",
        "Free memory",
        "host_memory_used",
        Taken::From100,
    ),
    (
        "pm2-server-monit",
        "Avail. Disk",
        "host_disk_free",
        Taken::AsIs,
    ),
];
/// A gap longer than this (a suspended host, a clock jump) is not filled with points.
const MAX_CATCH_UP_MS: i64 = 10 * MINUTE_MS;

fn minute_of(t: i64) -> i64 {
    t - t.rem_euclid(MINUTE_MS)
}

/// A series of a [`MetricSampler`] (the status holds them: see [`crate::process`]).
pub type SeriesId = u32;

/// Where a metric point belongs: (bucket id, server name).
pub type Scope<'a> = (&'a Arc<str>, &'a Arc<str>);

/// What names a series: shared by the series of every server with the same app and
/// metric (a server holds ~15 series per process).
#[derive(Debug)]
struct Label {
    app_name: Name,
    name: Name,
    unit: Option<Name>,
    agg_type: Option<Name>,
}

/// Labels by the addresses of their shared names (a label holds its names: an address
/// is not reused while its label is in the table).
static LABELS: LazyLock<Mutex<Shared<[usize; 4], Label>>> = LazyLock::new(Default::default);

impl Label {
    fn shared(app: &str, name: &str, unit: Option<&str>, agg_type: Option<&str>) -> Arc<Label> {
        let label = Label {
            app_name: Names::intern(app),
            name: Names::intern(name),
            unit: unit.map(Names::intern),
            agg_type: agg_type.map(Names::intern),
        };
        let at = |n: Option<&Name>| n.map_or(0, |n| Arc::as_ptr(n).cast::<u8>() as usize);
        let key = [
            at(Some(&label.app_name)),
            at(Some(&label.name)),
            at(label.unit.as_ref()),
            at(label.agg_type.as_ref()),
        ];
        LABELS.lock().get_or_make(&key, || (key, Arc::new(label)))
    }
}

/// One metric of one process.
#[derive(Debug)]
struct Series {
    label: Arc<Label>,
    pm_id: i64,
    /// The value holding since `since`.
    value: f64,
    since: i64,
    minute: i64,
    weighted: f64,
    covered_ms: i64,
    min: f64,
    max: f64,
}

impl Series {
    fn new(label: Arc<Label>, pm_id: i64, value: f64, now: i64) -> Series {
        Series {
            label,
            pm_id,
            value,
            since: now,
            minute: minute_of(now),
            weighted: 0.0,
            covered_ms: 0,
            min: value,
            max: value,
        }
    }

    /// Accounts the current value up to `now`, emitting every minute that ended.
    fn advance(&mut self, now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        if now - self.since > MAX_CATCH_UP_MS {
            self.emit(out, scope);
            self.restart(now);
            return;
        }
        while now >= self.minute + MINUTE_MS {
            let end = self.minute + MINUTE_MS;
            self.cover(end);
            self.emit(out, scope);
            self.restart(end);
        }
        self.cover(now);
    }

    fn cover(&mut self, until: i64) {
        let held = (until - self.since).max(0);
        self.weighted += self.value * held as f64;
        self.covered_ms += held;
        self.since = until.max(self.since);
    }

    fn restart(&mut self, at: i64) {
        self.minute = minute_of(at);
        self.since = at;
        self.weighted = 0.0;
        self.covered_ms = 0;
        self.min = self.value;
        self.max = self.value;
    }

    fn set(&mut self, value: f64, now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        self.advance(now, out, scope);
        self.value = value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// The point of the current minute so far (none if it covers no time yet).
    fn emit(&self, out: &mut Vec<MetricPoint>, (bucket_id, server_name): Scope) {
        if self.covered_ms == 0 {
            return;
        }
        out.push(MetricPoint {
            bucket_id: bucket_id.clone(),
            server_name: server_name.clone(),
            app_name: self.label.app_name.clone(),
            pm_id: self.pm_id,
            name: self.label.name.clone(),
            unit: self.label.unit.clone(),
            agg_type: self.label.agg_type.clone(),
            at: self.minute,
            avg: self.weighted / self.covered_ms as f64,
            min: self.min,
            max: self.max,
            last: self.value,
            count: (self.covered_ms / 1000).max(1) as u32,
        });
    }
}

/// The metric history of one server.
#[derive(Debug, Default)]
pub struct MetricSampler {
    series: Vec<Series>,
    /// Each series by the hash of (app, pm_id, metric), made by `load` at the first
    /// metric that is not where the cursor expects it (a status with thousands of
    /// processes still loads in linear time) and dropped at its end: held by every
    /// server, it cost more than its series. A hit is checked against the series; two
    /// keys of one hash (the seed is random per process) fall back to a scan.
    index: Option<HashMap<u64, usize, foldhash::fast::RandomState>>,
    hasher: foldhash::fast::RandomState,
    /// Where `load` expects the next series: a full status lists metrics in the order it
    /// did last time, so the search is one comparison, not a scan (pm2-runtime sends a
    /// full status every second).
    cursor: usize,
    /// The host's load average, once the agent sent one.
    load: Option<Series>,
    /// The host's sums of the minutes its processes emitted, held until every series has
    /// passed the minute (the next `tick`): a value that changes emits its ended minute
    /// itself, before the tick.
    sums: Vec<MetricPoint>,
}

impl MetricSampler {
    /// Takes every metric value from a full status (at link, after a resend, after a
    /// patch that changed the process list), and writes into it the series each value
    /// feeds.
    pub fn load(&mut self, status: &mut Node, now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        let start = out.len();
        let mut alive = vec![false; self.series.len()];
        self.cursor = 0;
        for process in status.processes_mut() {
            let Sampled {
                app,
                pm_id,
                cpu,
                memory,
                metrics,
            } = process.sampled();
            let (Some(app), Some(pm_id)) = (app, pm_id) else {
                *cpu.1 = None;
                *memory.1 = None;
                metrics.iter_mut().for_each(|(_, m)| m.series = None);
                continue;
            };
            let mut seen = |id: SeriesId| {
                if let Some(a) = alive.get_mut(id as usize) {
                    *a = true;
                }
                id
            };
            for (key, (value, slot)) in [("cpu", cpu), ("memory", memory)] {
                *slot = value.map(|v| seen(self.upsert(app, pm_id, key, None, v, now, out, scope)));
            }
            for (name, metric) in metrics.iter_mut() {
                let unit = metric.text("unit");
                let value = metric.value().and_then(|v| numeric(v, unit));
                metric.series = value
                    .map(|v| seen(self.upsert(app, pm_id, name, Some(metric), v, now, out, scope)));
            }
        }
        self.index = None;
        match status.host_load() {
            Some(load) => self.set_load(load, now, out, scope),
            None => self.end_load(now, out, scope),
        }
        if let Some(renumber) = self.retire(&alive, now, out, scope) {
            for process in status.processes_mut() {
                for id in process.series_mut().flatten() {
                    *id = renumber.get(*id as usize).copied().unwrap_or(*id);
                }
            }
        }
        // Pushed one by one, the series would keep room for up to twice as many.
        self.series.shrink_to_fit();
        add_sums(&mut self.sums, &out[start..], scope);
        host_monitored(out, start);
    }

    /// Finds or creates the series and sets its value; returns its index.
    #[allow(clippy::too_many_arguments)]
    fn upsert(
        &mut self,
        app: &str,
        pm_id: i64,
        name: &str,
        metric: Option<&Metric>,
        value: f64,
        now: i64,
        out: &mut Vec<MetricPoint>,
        scope: Scope,
    ) -> SeriesId {
        let is =
            |s: &Series| s.pm_id == pm_id && *s.label.name == *name && *s.label.app_name == *app;
        if self.series.get(self.cursor).is_some_and(is) {
            return self.set_found(self.cursor, value, now, out, scope);
        }
        let hash = self.hasher.hash_one((app, pm_id, name));
        let found = match self.index().get(&hash).copied() {
            Some(id) if self.series.get(id).is_some_and(is) => Some(id),
            Some(_) => self.series.iter().position(is),
            None => None,
        };
        if let Some(id) = found {
            return self.set_found(id, value, now, out, scope);
        }
        let text = |key: &str| metric?.text(key);
        if let Some(index) = &mut self.index {
            index.entry(hash).or_insert(self.series.len());
        }
        let label = Label::shared(app, name, text("unit"), text("agg_type"));
        self.series.push(Series::new(label, pm_id, value, now));
        self.cursor = self.series.len();
        (self.series.len() - 1) as SeriesId
    }

    /// Sets the value of the series `id` that `upsert` found; the cursor moves past it.
    fn set_found(
        &mut self,
        id: usize,
        value: f64,
        now: i64,
        out: &mut Vec<MetricPoint>,
        scope: Scope,
    ) -> SeriesId {
        self.series[id].set(value, now, out, scope);
        self.cursor = id + 1;
        id as SeriesId
    }

    /// Ends the series no process reports any more (their last minute is emitted);
    /// the new number of each series if any ended.
    fn retire(
        &mut self,
        alive: &[bool],
        now: i64,
        out: &mut Vec<MetricPoint>,
        scope: Scope,
    ) -> Option<Vec<SeriesId>> {
        if alive.iter().all(|a| *a) {
            return None;
        }
        let mut renumber = Vec::with_capacity(self.series.len());
        let mut kept = 0;
        let mut index = 0;
        self.series.retain_mut(|s| {
            let keep = alive.get(index).copied().unwrap_or(true);
            index += 1;
            if !keep {
                s.advance(now, out, scope);
                s.emit(out, scope);
            }
            renumber.push(kept);
            kept += SeriesId::from(keep);
            keep
        });
        Some(renumber)
    }

    /// The index of the series, made now if there is none.
    fn index(&mut self) -> &HashMap<u64, usize, foldhash::fast::RandomState> {
        let (series, hasher) = (&self.series, &self.hasher);
        self.index.get_or_insert_with(|| {
            let mut index = HashMap::with_capacity_and_hasher(series.len(), hasher.clone());
            for (id, s) in series.iter().enumerate() {
                let hash = hasher.hash_one((&*s.label.app_name, s.pm_id, &*s.label.name));
                index.entry(hash).or_insert(id);
            }
            index
        })
    }

    /// A new value of a series; ignored unless it is numeric.
    pub fn set(
        &mut self,
        id: SeriesId,
        value: &Node,
        now: i64,
        out: &mut Vec<MetricPoint>,
        scope: Scope,
    ) {
        let Some(series) = self.series.get_mut(id as usize) else {
            return;
        };
        if let Some(v) = numeric(value, series.label.unit.as_deref()) {
            let start = out.len();
            series.set(v, now, out, scope);
            add_sums(&mut self.sums, &out[start..], scope);
            host_monitored(out, start);
        }
    }

    /// A new 1-minute load average of the host (a patch of `data.server.loadavg`).
    pub fn set_load(&mut self, load: f64, now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        match &mut self.load {
            Some(series) => series.set(load, now, out, scope),
            None => {
                let label = Label::shared(HOST, HOST_LOAD, None, None);
                self.load = Some(Series::new(label, HOST_PM_ID, load, now));
            }
        }
    }

    /// The host's load average is no longer sent: its last minute is emitted.
    fn end_load(&mut self, now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        if let Some(mut series) = self.load.take() {
            series.advance(now, out, scope);
            series.emit(out, scope);
        }
    }

    /// Emits every minute that ended by `now`.
    pub fn tick(&mut self, now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        let start = out.len();
        for series in self.series.iter_mut().chain(&mut self.load) {
            series.advance(now, out, scope);
        }
        add_sums(&mut self.sums, &out[start..], scope);
        // Every series is past the minutes that ended by now: their sums are whole.
        let (ended, open): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sums)
            .into_iter()
            .partition(|sum| sum.at + MINUTE_MS <= now);
        self.sums = open;
        out.extend(ended);
        host_monitored(out, start);
    }

    /// Emits everything up to `now`, the unfinished minute too, and forgets the series
    /// (the server went offline, or km stops).
    pub fn finish(&mut self, now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        let start = out.len();
        for series in &mut self.series {
            series.advance(now, out, scope);
            series.emit(out, scope);
        }
        self.end_load(now, out, scope);
        add_sums(&mut self.sums, &out[start..], scope);
        out.append(&mut self.sums);
        host_monitored(out, start);
        // The ids the status holds point nowhere until the next `load`.
        self.series.clear();
        self.index = None;
    }
}

/// Adds `points`' `cpu` and `memory` of processes to the host's sums, one per minute:
/// `avg` and `last` are exact sums, `min` and `max` the sums of the processes' extremes
/// (bounds: they need not have held at once).
fn add_sums(sums: &mut Vec<MetricPoint>, points: &[MetricPoint], (bucket_id, server_name): Scope) {
    for p in points {
        let Some(name) = SUMMED.iter().find(|n| **n == &*p.name) else {
            continue;
        };
        if p.pm_id == HOST_PM_ID {
            continue;
        }
        match sums.iter_mut().find(|s| s.at == p.at && *s.name == **name) {
            Some(sum) => {
                sum.avg += p.avg;
                sum.min += p.min;
                sum.max += p.max;
                sum.last += p.last;
                sum.count = sum.count.max(p.count);
            }
            None => sums.push(MetricPoint {
                bucket_id: bucket_id.clone(),
                server_name: server_name.clone(),
                app_name: Names::intern(HOST),
                pm_id: HOST_PM_ID,
                name: Names::intern(name),
                unit: None,
                agg_type: Some(Names::intern("sum")),
                ..p.clone()
            }),
        }
    }
}

/// Adds to `out` the host series made from the monitoring modules' points emitted from
/// `start` on ([`MONITORED`]).
fn host_monitored(out: &mut Vec<MetricPoint>, start: usize) {
    let mut copies = Vec::new();
    for p in out.get(start..).unwrap_or_default() {
        let Some(&(_, _, series, taken)) = MONITORED
            .iter()
            .find(|(module, metric, ..)| *module == &*p.app_name && *metric == &*p.name)
        else {
            continue;
        };
        let mut host = MetricPoint {
            app_name: Names::intern(HOST),
            pm_id: HOST_PM_ID,
            name: Names::intern(series),
            unit: Some(Names::intern("%")),
            agg_type: None,
            ..p.clone()
        };
        if let Taken::From100 = taken {
            (host.avg, host.last) = (100.0 - p.avg, 100.0 - p.last);
            (host.min, host.max) = (100.0 - p.max, 100.0 - p.min);
        }
        copies.push(host);
    }
    out.extend(copies);
}

/// A number, or a string holding one (tx2 meters put their unit after it: `"0.5req/s"`).
fn numeric(value: &Node, unit: Option<&str>) -> Option<f64> {
    if let Some(n) = value.as_f64() {
        return Some(n);
    }
    let s = value.as_str()?.trim();
    let number = unit.and_then(|u| s.strip_suffix(u)).unwrap_or(s);
    number.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    static BUCKET: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("b"));
    static SERVER: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("web-1"));
    fn scope() -> Scope<'static> {
        (&BUCKET, &SERVER)
    }

    fn status(cpu: f64) -> serde_json::Value {
        json!({"data": {"process": [{
            "name": "api", "pm_id": 0, "cpu": cpu, "memory": 1000,
            "axm_monitor": {
                "Event Loop Latency": {"value": "1.5", "unit": "ms", "agg_type": "avg"},
                "req/sec": {"value": "0.5req/s", "unit": "req/s"},
                "status": {"value": "ok"}
            }
        }], "server": {}}})
    }

    /// The series of the metric `name` of the first process.
    fn series(status: &mut Node, name: &str) -> SeriesId {
        let process = status.processes_mut().next().unwrap();
        let sampled = process.sampled();
        match name {
            "cpu" => sampled.cpu.1.unwrap(),
            _ => sampled
                .metrics
                .iter()
                .find(|(k, _)| &**k == name)
                .unwrap()
                .1
                .series
                .unwrap(),
        }
    }

    #[test]
    fn averages_are_weighted_by_how_long_each_value_held() {
        let mut sampler = MetricSampler::default();
        let mut out = Vec::new();
        let mut live = Node::status(status(10.0));
        sampler.load(&mut live, 60_000, &mut out, scope());
        // cpu 10 for 15 s, 30 for 30 s, 20 for the last 15 s of the minute.
        let cpu = series(&mut live, "cpu");
        sampler.set(cpu, &Node::from(json!(30.0)), 75_000, &mut out, scope());
        sampler.set(cpu, &Node::from(json!(20.0)), 105_000, &mut out, scope());
        assert!(out.is_empty(), "no minute has ended yet");
        sampler.tick(120_000, &mut out, scope());
        let cpu = out.iter().find(|p| &*p.name == "cpu").unwrap();
        assert_eq!(
            (cpu.at, cpu.min, cpu.max, cpu.last, cpu.count),
            (60_000, 10.0, 30.0, 20.0, 60)
        );
        assert!((cpu.avg - 22.5).abs() < 1e-9, "avg {}", cpu.avg);
        let memory = out.iter().find(|p| &*p.name == "memory").unwrap();
        assert_eq!(
            (memory.avg, memory.min, memory.max),
            (1000.0, 1000.0, 1000.0),
            "unchanged values still count"
        );
        let latency = out
            .iter()
            .find(|p| &*p.name == "Event Loop Latency")
            .unwrap();
        assert_eq!(
            (
                latency.avg,
                latency.unit.as_deref(),
                latency.agg_type.as_deref()
            ),
            (1.5, Some("ms"), Some("avg"))
        );
        assert_eq!(
            out.iter().find(|p| &*p.name == "req/sec").map(|p| p.last),
            Some(0.5)
        );
        assert!(
            out.iter().all(|p| &*p.name != "status"),
            "non-numeric probes are skipped"
        );
        assert_eq!(out.iter().filter(|p| p.pm_id != HOST_PM_ID).count(), 4);
    }

    #[test]
    fn monitoring_modules_give_the_host_its_cpu_memory_and_disk() {
        let mut sampler = MetricSampler::default();
        let mut out = Vec::new();
        // As pm2 5's sysmonit and pm2-server-monit send them (numbers as text).
        let status = json!({"data": {"server": {}, "process": [
            {"name": "pm2-sysmonit", "pm_id": 0, "cpu": 1, "memory": 10, "axm_monitor": {
                "CPU Usage": {"unit": "%", "value": "12.5"}, "RAM Usage": {"unit": "%", "value": "40"},
                "Disk Usage": {"unit": "%", "value": 41.5}, "RAM Total": {"unit": "gb", "value": "23.54"}}},
            {"name": "pm2-server-monit", "pm_id": 1, "cpu": 1, "memory": 10, "axm_monitor": {
                "Free memory": {"unit": "%", "value": "75.00"}, "Avail. Disk": {"unit": "%", "value": "58"}}},
            {"name": "api", "pm_id": 2, "cpu": 1, "memory": 10, "axm_monitor": {
                "CPU Usage": {"value": 99}}}]}});
        let mut status = Node::status(status);
        sampler.load(&mut status, 60_000, &mut out, scope());
        sampler.tick(120_000, &mut out, scope());
        // A patch after the next minute ended emits that minute itself (no tick first).
        let id = series(&mut status, "CPU Usage");
        sampler.set(id, &Node::from(json!("20")), 185_000, &mut out, scope());
        let patched = out
            .iter()
            .filter(|p| &*p.name == "host_cpu")
            .map(|p| (p.at, p.avg))
            .collect::<Vec<_>>();
        assert_eq!(patched, [(60_000, 12.5), (120_000, 12.5)]);
        let host = |name: &str| -> Vec<f64> {
            out.iter()
                .filter(|p| p.pm_id == HOST_PM_ID && &*p.name == name)
                .map(|p| p.avg)
                .collect()
        };
        assert_eq!(
            host("host_cpu"),
            [12.5, 12.5],
            "an app's own metric of that name is not the host's"
        );
        let mut memory = host("host_memory_used");
        memory.sort_by(f64::total_cmp);
        assert_eq!(memory, [25.0, 40.0], "one minute of each module");
        let mut disk = host("host_disk_free");
        disk.sort_by(f64::total_cmp);
        assert_eq!(disk, [58.0, 58.5]);
        let cpu = out.iter().find(|p| &*p.name == "host_cpu").unwrap();
        assert_eq!((&*cpu.app_name, cpu.unit.as_deref()), (HOST, Some("%")));
    }

    #[test]
    fn the_host_has_its_load_and_the_sums_of_its_processes() {
        let mut sampler = MetricSampler::default();
        let mut out = Vec::new();
        let two = json!({"data": {"server": {"loadavg": [1.0, 0.5, 0.25]}, "process": [
            {"name": "api", "pm_id": 0, "cpu": 10, "memory": 100},
            {"name": "api", "pm_id": 1, "cpu": 20, "memory": 300},
            {"name": "cron", "pm_id": 2, "cpu": 5, "memory": 50}]}});
        sampler.load(&mut Node::status(two), 60_000, &mut out, scope());
        // The load goes from 1 to 3 half-way through the minute (a patch).
        sampler.set_load(3.0, 90_000, &mut out, scope());
        sampler.tick(120_000, &mut out, scope());
        let host = |name: &str| {
            out.iter()
                .find(|p| p.pm_id == HOST_PM_ID && &*p.name == name && &*p.app_name == HOST)
                .unwrap_or_else(|| panic!("no host {name} in {out:?}"))
        };
        let load = host(HOST_LOAD);
        assert_eq!(
            (load.at, load.avg, load.min, load.max, load.last),
            (60_000, 2.0, 1.0, 3.0, 3.0)
        );
        assert_eq!((host("cpu").avg, host("memory").avg), (35.0, 450.0));
        assert_eq!(host("memory").agg_type.as_deref(), Some("sum"));

        // A status without load ends the load series (its last minute is emitted).
        out.clear();
        let none = json!({"data": {"server": {}, "process": []}});
        sampler.load(&mut Node::status(none), 150_000, &mut out, scope());
        assert!(out.iter().any(|p| &*p.name == HOST_LOAD && p.at == 120_000));
        out.clear();
        // The processes' last (partial) minute, emitted as they went, is summed once the
        // minute is behind every series.
        sampler.tick(240_000, &mut out, scope());
        let sums: Vec<(&str, i64, f64)> = out.iter().map(|p| (&*p.name, p.at, p.avg)).collect();
        assert_eq!(sums, [("cpu", 120_000, 35.0), ("memory", 120_000, 450.0)]);
        out.clear();
        sampler.tick(300_000, &mut out, scope());
        assert!(out.is_empty(), "nothing is left to emit: {out:?}");
    }

    #[test]
    fn probe_strings_with_units_and_finish_emits_partial_minute() {
        let mut sampler = MetricSampler::default();
        let mut out = Vec::new();
        let mut live = Node::status(status(5.0));
        sampler.load(&mut live, 0, &mut out, scope());
        let meter = series(&mut live, "req/sec");
        sampler.set(
            meter,
            &Node::from(json!("2.5req/s")),
            10_000,
            &mut out,
            scope(),
        );
        sampler.finish(20_000, &mut out, scope());
        let meter = out.iter().find(|p| &*p.name == "req/sec").unwrap();
        assert_eq!(
            (meter.at, meter.min, meter.max, meter.last, meter.count),
            (0, 0.5, 2.5, 2.5, 20)
        );
        assert!((meter.avg - 1.5).abs() < 1e-9);
    }

    #[test]
    fn processes_that_vanish_are_retired() {
        let mut sampler = MetricSampler::default();
        let mut out = Vec::new();
        sampler.load(&mut Node::status(status(5.0)), 0, &mut out, scope());
        sampler.load(
            &mut Node::status(json!({"data": {"process": [], "server": {}}})),
            30_000,
            &mut out,
            scope(),
        );
        assert_eq!(out.iter().filter(|p| &*p.name == "cpu").count(), 1);
        out.clear();
        sampler.tick(200_000, &mut out, scope());
        assert!(
            out.iter().all(|p| p.pm_id == HOST_PM_ID && p.at == 0),
            "only the host's sums of the last minute: {out:?}"
        );
        out.clear();
        sampler.tick(300_000, &mut out, scope());
        assert!(out.is_empty());
    }

    #[test]
    fn a_value_changed_after_its_minute_is_in_the_host_sum() {
        let mut sampler = MetricSampler::default();
        let mut out = Vec::new();
        let mut live = Node::status(status(10.0));
        sampler.load(&mut live, 0, &mut out, scope());
        // The minute 0 ends; a patch at 61 s emits it before any tick.
        let cpu = series(&mut live, "cpu");
        sampler.set(cpu, &Node::from(json!(30)), 61_000, &mut out, scope());
        assert!(
            out.iter().all(|p| p.pm_id != HOST_PM_ID),
            "the sum waits for the tick"
        );
        sampler.tick(62_000, &mut out, scope());
        let sum = out
            .iter()
            .find(|p| p.pm_id == HOST_PM_ID && &*p.name == "cpu")
            .unwrap();
        assert_eq!((sum.at, sum.avg), (0, 10.0));
    }

    #[test]
    fn a_status_in_another_order_keeps_its_series() {
        let process = |pm_id: i64, cpu: f64| json!({"name": "api", "pm_id": pm_id, "cpu": cpu});
        let status =
            |list: Vec<serde_json::Value>| Node::status(json!({"data": {"process": list}}));
        let mut sampler = MetricSampler::default();
        let mut out = Vec::new();
        let mut live = status(vec![process(0, 1.0), process(1, 2.0)]);
        sampler.load(&mut live, 0, &mut out, scope());
        let mut live = status(vec![process(1, 2.0), process(0, 1.0)]);
        sampler.load(&mut live, 1_000, &mut out, scope());
        assert_eq!(sampler.series.len(), 2, "no series made or ended");
        assert!(
            sampler.index.is_none(),
            "the index lives only while loading"
        );
        // The first process is pm_id 1 now: its id leads to its own series.
        let id = series(&mut live, "cpu");
        sampler.set(id, &Node::from(json!(9.0)), 30_000, &mut out, scope());
        sampler.finish(60_000, &mut out, scope());
        let max = |pm_id| out.iter().find(|p| p.pm_id == pm_id).map(|p| p.max);
        assert_eq!((max(0), max(1)), (Some(1.0), Some(9.0)));
    }
}
