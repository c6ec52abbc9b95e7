//! Per-minute history of every numeric metric of a server's processes: cpu, memory and
//! each `axm_monitor` value that parses as a number.
//!
//! A metric is a value that holds until the agent reports a change: a full status sets
//! every value, a `status:patch` carries only the values that changed. Each minute's
//! point is therefore time-weighted: `avg` weighs every value by how long it held, `min`
//! and `max` are the extremes held, `last` the value at the end, `count` the seconds of
//! data. Only changed values cost anything on the hot path.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasher;

use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

use crate::ingest::tree::{Name, Names, Node, Shared};
use crate::stores::MetricPoint;

const MINUTE_MS: i64 = 60_000;
/// A gap longer than this (a suspended host, a clock jump) is not filled with points.
const MAX_CATCH_UP_MS: i64 = 10 * MINUTE_MS;

fn minute_of(t: i64) -> i64 {
    t - t.rem_euclid(MINUTE_MS)
}

/// A series of a [`MetricSampler`].
pub type SeriesId = usize;

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

/// The series of the process at one index of `data.process`.
#[derive(Debug, Default)]
struct Slot {
    cpu: Option<usize>,
    memory: Option<usize>,
    /// Series of its custom metrics (their names are the series').
    probes: Vec<usize>,
}

/// What a patch path means for the metrics.
pub enum MetricPath<'a> {
    /// The value of a metric of the process at `index`.
    Value {
        index: usize,
        metric: Cow<'a, str>,
        probe: bool,
    },
    /// Processes or probes appear, vanish or are replaced whole: reload from the status.
    Structural,
    /// Nothing metrics care about.
    Other,
}

/// One RFC 6901 reference token, unescaped (borrowed unless it holds `~`).
fn unescape(token: &str) -> Cow<'_, str> {
    if token.contains('~') {
        Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        Cow::Borrowed(token)
    }
}

/// Classifies the JSON pointer of a status patch operation (already validated).
pub fn metric_path(pointer: &str) -> MetricPath<'_> {
    let mut tokens = pointer.split('/').skip(1);
    let mut next = || tokens.next();
    let head = [next(), next(), next(), next(), next(), next()];
    if next().is_some() {
        return MetricPath::Other;
    }
    match head {
        [Some("data"), None | Some("process"), None, ..] => MetricPath::Structural,
        [Some("data"), Some("process"), Some(index), rest @ ..] => {
            let Ok(index) = index.parse::<usize>() else {
                return MetricPath::Structural;
            };
            match rest {
                [None, ..] | [Some("name" | "pm_id"), ..] => MetricPath::Structural,
                [Some(key @ ("cpu" | "memory")), None, None] => MetricPath::Value {
                    index,
                    metric: Cow::Borrowed(key),
                    probe: false,
                },
                [Some("axm_monitor"), Some(name), Some("value")] => MetricPath::Value {
                    index,
                    metric: unescape(name),
                    probe: true,
                },
                [Some("axm_monitor"), _, None] => MetricPath::Structural,
                _ => MetricPath::Other,
            }
        }
        _ => MetricPath::Other,
    }
}

/// The metric history of one server.
#[derive(Debug, Default)]
pub struct MetricSampler {
    series: Vec<Series>,
    /// Each series by the hash of (app, pm_id, metric): a status with thousands of
    /// processes is loaded in linear time. A hit is checked against the series; two keys
    /// of one hash (the seed is random per process) fall back to a scan.
    index: HashMap<u64, usize, foldhash::fast::RandomState>,
    hasher: foldhash::fast::RandomState,
    slots: Vec<Slot>,
    /// Where `load` expects the next series: a full status lists metrics in the order it
    /// did last time, so the search is one comparison, not a scan (pm2-runtime sends a
    /// full status every second).
    cursor: usize,
}

impl MetricSampler {
    /// Takes every metric value from a full status (at link, after a resend, after a
    /// patch that changed the process list).
    pub fn load(&mut self, status: &Node, now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        let processes = status.processes().unwrap_or_default();
        let mut slots = Vec::with_capacity(processes.len());
        let mut alive = vec![false; self.series.len()];
        self.cursor = 0;
        for process in processes {
            let mut slot = Slot::default();
            let app = process.get("name").and_then(Node::as_str);
            let pm_id = process.get("pm_id").and_then(Node::as_i64);
            if let (Some(app), Some(pm_id)) = (app, pm_id) {
                for key in ["cpu", "memory"] {
                    let value = process.get(key).and_then(Node::as_f64);
                    let found =
                        value.map(|v| self.upsert(app, pm_id, key, None, v, now, out, scope));
                    if key == "cpu" {
                        slot.cpu = found
                    } else {
                        slot.memory = found
                    }
                }
                let monitor = process.get("axm_monitor").and_then(Node::as_object);
                for (name, probe) in monitor.into_iter().flatten() {
                    let unit = probe.get("unit").and_then(Node::as_str);
                    if let Some(v) = probe.get("value").and_then(|v| numeric(v, unit)) {
                        let id = self.upsert(app, pm_id, name, Some(probe), v, now, out, scope);
                        slot.probes.push(id);
                    }
                }
            }
            for id in slot.cpu.iter().chain(&slot.memory).chain(&slot.probes) {
                if let Some(a) = alive.get_mut(*id) {
                    *a = true;
                }
            }
            slots.push(slot);
        }
        self.slots = slots;
        self.retire(&alive, now, out, scope);
    }

    /// Finds or creates the series and sets its value; returns its index.
    #[allow(clippy::too_many_arguments)]
    fn upsert(
        &mut self,
        app: &str,
        pm_id: i64,
        name: &str,
        probe: Option<&Node>,
        value: f64,
        now: i64,
        out: &mut Vec<MetricPoint>,
        scope: Scope,
    ) -> usize {
        let is =
            |s: &Series| s.pm_id == pm_id && *s.label.name == *name && *s.label.app_name == *app;
        let hash = self.hasher.hash_one((app, pm_id, name));
        let found = match self.series.get(self.cursor) {
            Some(s) if is(s) => Some(self.cursor),
            _ => match self.index.get(&hash) {
                Some(&id) if self.series.get(id).is_some_and(is) => Some(id),
                Some(_) => self.series.iter().position(is),
                None => None,
            },
        };
        if let Some(id) = found {
            self.series[id].set(value, now, out, scope);
            self.cursor = id + 1;
            return id;
        }
        let text = |key: &str| probe?.get(key)?.as_str();
        self.index.entry(hash).or_insert(self.series.len());
        self.series.push(Series {
            label: Label::shared(app, name, text("unit"), text("agg_type")),
            pm_id,
            value,
            since: now,
            minute: minute_of(now),
            weighted: 0.0,
            covered_ms: 0,
            min: value,
            max: value,
        });
        self.cursor = self.series.len();
        self.series.len() - 1
    }

    /// Ends the series no process reports any more (their last minute is emitted).
    fn retire(&mut self, alive: &[bool], now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        if alive.iter().all(|a| *a) {
            return;
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
            kept += usize::from(keep);
            keep
        });
        let hasher = &self.hasher;
        self.index.clear();
        for (id, s) in self.series.iter().enumerate() {
            let hash = hasher.hash_one((&*s.label.app_name, s.pm_id, &*s.label.name));
            self.index.entry(hash).or_insert(id);
        }
        for slot in &mut self.slots {
            for id in slot
                .cpu
                .iter_mut()
                .chain(slot.memory.iter_mut())
                .chain(slot.probes.iter_mut())
            {
                *id = renumber[*id];
            }
        }
    }

    /// The series of the metric `metric` of the process at `index` (valid until the
    /// next `load` or `finish`).
    pub fn series_of(&self, index: usize, metric: &str, probe: bool) -> Option<SeriesId> {
        let slot = self.slots.get(index)?;
        match (probe, metric) {
            (false, "cpu") => slot.cpu,
            (false, _) => slot.memory,
            (true, name) => slot
                .probes
                .iter()
                .copied()
                .find(|id| self.series.get(*id).is_some_and(|s| *s.label.name == *name)),
        }
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
        let Some(series) = self.series.get_mut(id) else {
            return;
        };
        if let Some(v) = numeric(value, series.label.unit.as_deref()) {
            series.set(v, now, out, scope);
        }
    }

    /// Emits every minute that ended by `now`.
    pub fn tick(&mut self, now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        for series in &mut self.series {
            series.advance(now, out, scope);
        }
    }

    /// Emits everything up to `now`, the unfinished minute too, and forgets the series
    /// (the server went offline, or km stops).
    pub fn finish(&mut self, now: i64, out: &mut Vec<MetricPoint>, scope: Scope) {
        for series in &mut self.series {
            series.advance(now, out, scope);
            series.emit(out, scope);
        }
        self.series.clear();
        self.index.clear();
        self.slots.clear();
    }
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

    fn path(p: &str) -> MetricPath<'_> {
        metric_path(p)
    }

    #[test]
    fn averages_are_weighted_by_how_long_each_value_held() {
        let mut sampler = MetricSampler::default();
        let mut out = Vec::new();
        sampler.load(&Node::from(status(10.0)), 60_000, &mut out, scope());
        // cpu 10 for 15 s, 30 for 30 s, 20 for the last 15 s of the minute.
        let cpu = sampler.series_of(0, "cpu", false).unwrap();
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
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn probe_strings_with_units_and_finish_emits_partial_minute() {
        let mut sampler = MetricSampler::default();
        let mut out = Vec::new();
        sampler.load(&Node::from(status(5.0)), 0, &mut out, scope());
        let meter = sampler.series_of(0, "req/sec", true).unwrap();
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
        sampler.load(&Node::from(status(5.0)), 0, &mut out, scope());
        sampler.load(
            &Node::from(json!({"data": {"process": [], "server": {}}})),
            30_000,
            &mut out,
            scope(),
        );
        assert_eq!(out.iter().filter(|p| &*p.name == "cpu").count(), 1);
        out.clear();
        sampler.tick(200_000, &mut out, scope());
        assert!(out.is_empty());
    }

    #[test]
    fn patch_paths_are_classified() {
        assert!(matches!(
            path("/data/process/3/cpu"),
            MetricPath::Value {
                index: 3,
                probe: false,
                ..
            }
        ));
        match path("/data/process/1/axm_monitor/req~1sec/value") {
            MetricPath::Value {
                index: 1,
                metric,
                probe: true,
            } => assert_eq!(metric, "req/sec"),
            _ => panic!("probe value not recognised"),
        }
        for structural in [
            "/data/process/2",
            "/data/process/-",
            "/data/process",
            "/data/process/0/axm_monitor/x",
            "/data/process/0/name",
        ] {
            assert!(
                matches!(path(structural), MetricPath::Structural),
                "{structural}"
            );
        }
        for other in [
            "/data/server/uptime",
            "/data/process/0/restart_time",
            "/data/process/0/axm_monitor/x/unit",
            "/internal_ip",
        ] {
            assert!(matches!(path(other), MetricPath::Other), "{other}");
        }
    }
}
