//! Per-minute aggregation of every numeric metric of a server's processes: cpu, memory
//! and each `axm_monitor` value that parses as a number. Samples arrive with every status
//! (about once a second); one point per minute (avg/min/max/last) leaves.

use serde_json::Value;

use crate::stores::MetricPoint;

const MINUTE_MS: i64 = 60_000;

/// One metric of one process during the current minute.
#[derive(Debug)]
struct Series {
    app_name: String,
    pm_id: i64,
    name: String,
    unit: Option<String>,
    agg_type: Option<String>,
    minute: i64,
    sum: f64,
    count: u32,
    min: f64,
    max: f64,
    last: f64,
}

impl Series {
    fn add(&mut self, value: f64) {
        if self.count == 0 {
            self.min = value;
            self.max = value;
        } else {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
        }
        self.sum += value;
        self.count += 1;
        self.last = value;
    }

    fn take_point(&mut self, bucket_id: &str, server_name: &str) -> Option<MetricPoint> {
        if self.count == 0 {
            return None;
        }
        let point = MetricPoint {
            bucket_id: bucket_id.to_string(),
            server_name: server_name.to_string(),
            app_name: self.app_name.clone(),
            pm_id: self.pm_id,
            name: self.name.clone(),
            unit: self.unit.clone(),
            agg_type: self.agg_type.clone(),
            at: self.minute,
            avg: self.sum / f64::from(self.count),
            min: self.min,
            max: self.max,
            last: self.last,
            count: self.count,
        };
        self.sum = 0.0;
        self.count = 0;
        Some(point)
    }
}

/// The aggregator of one server. Samples come in the same order every second, so the
/// series are kept in that order and found by a moving cursor, not by hashing.
#[derive(Debug, Default)]
pub struct MetricSampler {
    series: Vec<Series>,
    cursor: usize,
}

impl MetricSampler {
    /// Adds one sample of every metric in `status` (the agent's status payload) taken at
    /// `now`; points of minutes that ended are appended to `out`.
    pub fn sample(
        &mut self,
        status: &Value,
        now: i64,
        out: &mut Vec<MetricPoint>,
        scope: (&str, &str),
    ) {
        let minute = now - now.rem_euclid(MINUTE_MS);
        let Some(processes) = status.pointer("/data/process").and_then(Value::as_array) else {
            return;
        };
        self.cursor = 0;
        for process in processes {
            let (Some(app), Some(pm_id)) = (
                process.get("name").and_then(Value::as_str),
                process.get("pm_id").and_then(Value::as_i64),
            ) else {
                continue;
            };
            for (name, key) in [("cpu", "cpu"), ("memory", "memory")] {
                if let Some(v) = process.get(key).and_then(Value::as_f64) {
                    self.add(app, pm_id, name, None, v, minute, out, scope);
                }
            }
            let Some(monitor) = process.get("axm_monitor").and_then(Value::as_object) else {
                continue;
            };
            for (name, probe) in monitor {
                if let Some(value) = probe_value(probe) {
                    self.add(app, pm_id, name, Some(probe), value, minute, out, scope);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        app: &str,
        pm_id: i64,
        name: &str,
        probe: Option<&Value>,
        value: f64,
        minute: i64,
        out: &mut Vec<MetricPoint>,
        (bucket_id, server_name): (&str, &str),
    ) {
        let index = self.find(app, pm_id, name).unwrap_or_else(|| {
            let text = |key: &str| probe?.get(key)?.as_str().map(str::to_string);
            self.series.push(Series {
                app_name: app.to_string(),
                pm_id,
                name: name.to_string(),
                unit: text("unit"),
                agg_type: text("agg_type"),
                minute,
                sum: 0.0,
                count: 0,
                min: 0.0,
                max: 0.0,
                last: 0.0,
            });
            self.series.len() - 1
        });
        self.cursor = index + 1;
        let series = &mut self.series[index];
        if series.minute != minute {
            out.extend(series.take_point(bucket_id, server_name));
            series.minute = minute;
        }
        series.add(value);
    }

    fn find(&self, app: &str, pm_id: i64, name: &str) -> Option<usize> {
        let is = |s: &Series| s.pm_id == pm_id && s.name == name && s.app_name == app;
        match self.series.get(self.cursor) {
            Some(s) if is(s) => Some(self.cursor),
            _ => self.series.iter().position(is),
        }
    }

    /// Points of every minute that ended before `now` (or of all, with `force`), for
    /// servers that went quiet and at shutdown.
    pub fn drain(
        &mut self,
        now: i64,
        force: bool,
        out: &mut Vec<MetricPoint>,
        (bucket_id, server_name): (&str, &str),
    ) {
        let minute = now - now.rem_euclid(MINUTE_MS);
        for series in &mut self.series {
            if force || series.minute < minute {
                out.extend(series.take_point(bucket_id, server_name));
            }
        }
        // Processes that stopped reporting are forgotten once their last point is out.
        self.series.retain(|s| s.count > 0 || s.minute >= minute);
    }
}

/// The numeric value of an `axm_monitor` entry: a number, or a string holding one (tx2
/// meters put their unit after the number, as in `"0.5unit"`).
fn probe_value(probe: &Value) -> Option<f64> {
    match probe.get("value")? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let s = s.trim();
            let unit = probe.get("unit").and_then(Value::as_str);
            let number = unit.and_then(|u| s.strip_suffix(u)).unwrap_or(s);
            number.trim().parse::<f64>().ok().filter(|v| v.is_finite())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(cpu: f64, latency: &str) -> Value {
        json!({"data": {"process": [{
            "name": "api", "pm_id": 0, "cpu": cpu, "memory": 1000,
            "axm_monitor": {
                "Event Loop Latency": {"value": latency, "unit": "ms", "agg_type": "avg"},
                "req/sec": {"value": "0.5req/s", "unit": "req/s"},
                "status": {"value": "ok"}
            }
        }], "server": {}}})
    }

    #[test]
    fn one_point_per_minute_with_avg_min_max_last() {
        let mut sampler = MetricSampler::default();
        let mut out = Vec::new();
        let scope = ("b", "web-1");
        sampler.sample(&status(10.0, "1.5"), 60_000, &mut out, scope);
        sampler.sample(&status(30.0, "2.5"), 61_000, &mut out, scope);
        sampler.sample(&status(20.0, "0.5"), 62_000, &mut out, scope);
        assert!(out.is_empty(), "no minute has ended yet");
        sampler.sample(&status(5.0, "1"), 120_000, &mut out, scope);
        let cpu = out.iter().find(|p| p.name == "cpu").unwrap();
        assert_eq!(
            (cpu.at, cpu.avg, cpu.min, cpu.max, cpu.last, cpu.count),
            (60_000, 20.0, 10.0, 30.0, 20.0, 3)
        );
        let latency = out.iter().find(|p| p.name == "Event Loop Latency").unwrap();
        assert_eq!((latency.avg, latency.unit.as_deref()), (1.5, Some("ms")));
        let meter = out.iter().find(|p| p.name == "req/sec").unwrap();
        assert_eq!(meter.last, 0.5);
        assert!(
            out.iter().all(|p| p.name != "status"),
            "non-numeric probes are skipped"
        );
        assert_eq!(out.len(), 4);
        out.clear();
        sampler.drain(120_500, true, &mut out, scope);
        assert_eq!(
            out.iter().find(|p| p.name == "cpu").map(|p| p.avg),
            Some(5.0)
        );
    }
}
