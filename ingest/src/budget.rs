//! What one agent may make km hold or do. Agents are untrusted (their keys sit on every
//! linked server), so every dimension of what they send has a budget here; going over one
//! is a refusal that names it, is counted in `/healthz` and never hurts another tenant.

use std::fmt;

use serde_json::Value;

/// Largest frame accepted (a heap dump arrives in one frame). Over it the socket is
/// closed with 1009.
pub const MAX_FRAME_BYTES: usize = 128 << 20;
/// Bytes of frames being read or handled at once, every agent socket together. A frame
/// that would go over it closes its socket with 1013 (the agent comes back later).
pub const MAX_IN_FLIGHT_BYTES: usize = 256 << 20;
/// How long a large frame may wait for room in [`MAX_IN_FLIGHT_BYTES`] (the agent's TCP
/// waits with it); then its socket is closed with 1013.
pub const MAX_IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// The first bytes of each frame are not counted against [`MAX_IN_FLIGHT_BYTES`], so the
/// ordinary traffic of thousands of agents never meets it.
pub const FREE_FRAME_BYTES: usize = 64 << 10;
/// Bytes of events waiting for the events store; over it new events are dropped (and
/// counted in `/healthz`) until the store catches up.
pub const MAX_QUEUED_EVENT_BYTES: usize = 256 << 20;
/// A `status` or `status:patch` frame (2,000 processes are about 3 MB); their parsed form
/// takes several times their text.
pub const MAX_STATUS_FRAME_BYTES: usize = 16 << 20;
/// Operations in one `status:patch` (real agents send a few dozen a second).
pub const MAX_PATCH_OPS: usize = 10_000;
/// Nodes of a server's status visited or copied while applying one patch.
pub const MAX_PATCH_WORK: usize = 400_000;
/// Nesting of a server's status (a real one is 6 deep: `/data/process/0/axm_monitor/x/value`).
pub const MAX_STATUS_DEPTH: usize = 32;
/// JSON values in a server's status (8 processes are about 1,000).
pub const MAX_STATUS_NODES: usize = 200_000;
/// Text of a server's status: its strings and keys, plus 8 bytes per value.
pub const MAX_STATUS_BYTES: usize = 16 << 20;
/// Processes in a server's status.
pub const MAX_PROCESSES: usize = 2_000;
/// Custom metrics (`axm_monitor`) of one process.
pub const MAX_METRICS: usize = 256;
/// One stored span (pm2's carry the process's command line and host: about 2 KB).
pub const MAX_SPAN_BYTES: usize = 64 << 10;
/// A span starting further than this from its arrival is filed at its arrival (retention
/// and time filters go by a span's start).
pub const SPAN_CLOCK_SKEW_MS: i64 = 86_400_000;
/// Body of one request to the span intakes (Zipkin, OTLP); over it, 413.
pub const MAX_SPAN_INTAKE_BYTES: usize = 16 << 20;
/// Spans in one request to the span intakes; over it, the request is refused whole.
pub const MAX_SPANS_PER_REQUEST: usize = 10_000;
/// Spans of one trace shown (a trace's page, the API).
pub const MAX_TRACE_SPANS: u32 = 2_000;

/// How much of a budget a JSON value takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size {
    pub nodes: usize,
    pub bytes: usize,
}

impl Size {
    pub fn plus(self, other: Size) -> Size {
        Size {
            nodes: self.nodes.saturating_add(other.nodes),
            bytes: self.bytes.saturating_add(other.bytes),
        }
    }

    pub fn minus(self, other: Size) -> Size {
        Size {
            nodes: self.nodes.saturating_sub(other.nodes),
            bytes: self.bytes.saturating_sub(other.bytes),
        }
    }

    /// A status of this size is within its budgets.
    pub fn check(self) -> Result<(), Over> {
        if self.nodes > MAX_STATUS_NODES {
            return Err(Over::Nodes(self.nodes));
        }
        if self.bytes > MAX_STATUS_BYTES {
            return Err(Over::Bytes(self.bytes));
        }
        Ok(())
    }
}

/// The size of a scalar or of one node of a container (its own text, not its children's).
pub fn own_size(value: &Value) -> usize {
    scalar_size(value.as_str())
}

/// What a value of text `text` (none for other values) counts.
pub fn scalar_size(text: Option<&str>) -> usize {
    8 + text.map_or(0, str::len)
}

/// A value's size and height (a scalar is 0 high).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    pub size: Size,
    pub height: usize,
}

/// Work left for one frame, in nodes visited.
#[derive(Debug)]
pub struct Work {
    left: usize,
}

impl Work {
    pub fn new(budget: usize) -> Self {
        Work { left: budget }
    }

    pub fn spend(&mut self, n: usize) -> Result<(), Over> {
        self.left = self.left.checked_sub(n).ok_or(Over::Work)?;
        Ok(())
    }
}

/// Measures `value` without recursion, spending one unit of `work` per node; stops as soon
/// as the work runs out or the value is deeper than `max_height`.
pub fn measure(value: &Value, max_height: usize, work: &mut Work) -> Result<Shape, Over> {
    let mut shape = Shape::default();
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((value, depth)) = stack.pop() {
        work.spend(1)?;
        if depth > max_height {
            return Err(Over::Depth(depth));
        }
        shape.height = shape.height.max(depth);
        shape.size.nodes += 1;
        shape.size.bytes += own_size(value);
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            Value::Object(map) => {
                for (key, v) in map {
                    shape.size.bytes += key.len();
                    stack.push((v, depth + 1));
                }
            }
            _ => {}
        }
    }
    Ok(shape)
}

/// Checks the processes of a status (or of the `data.process` array): their number and
/// the custom metrics of each.
pub fn check_processes(processes: &[Value]) -> Result<(), Over> {
    if processes.len() > MAX_PROCESSES {
        return Err(Over::Processes(processes.len()));
    }
    processes.iter().try_for_each(check_process)
}

/// Checks the custom metrics of one process.
pub fn check_process(process: &Value) -> Result<(), Over> {
    match process.get("axm_monitor").and_then(Value::as_object) {
        Some(metrics) if metrics.len() > MAX_METRICS => Err(Over::Metrics(metrics.len())),
        _ => Ok(()),
    }
}

/// A whole status: its size and shape within every budget. Returns its size.
pub fn check_status(status: &Value) -> Result<Size, Over> {
    if let Some(processes) = status.pointer("/data/process").and_then(Value::as_array) {
        check_processes(processes)?;
    }
    let mut work = Work::new(MAX_STATUS_NODES.saturating_add(1));
    let shape = measure(status, MAX_STATUS_DEPTH, &mut work).map_err(|over| match over {
        Over::Work => Over::Nodes(MAX_STATUS_NODES.saturating_add(1)),
        other => other,
    })?;
    shape.size.check()?;
    Ok(shape.size)
}

/// Which budget a frame went over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Over {
    Depth(usize),
    Nodes(usize),
    Bytes(usize),
    Processes(usize),
    Metrics(usize),
    Ops(usize),
    Work,
    /// A status or patch frame of this many bytes.
    Frame(usize),
    /// A `copy` or `move` into its own source (the status would double with each).
    IntoItself,
}

impl fmt::Display for Over {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Over::Depth(d) => write!(
                f,
                "the status would nest {d} levels deep (at most {MAX_STATUS_DEPTH})"
            ),
            Over::Nodes(n) if *n > MAX_STATUS_NODES + 1 => write!(
                f,
                "the status would hold {n} values (at most {MAX_STATUS_NODES})"
            ),
            Over::Nodes(_) => write!(
                f,
                "the status would hold more than {MAX_STATUS_NODES} values"
            ),
            Over::Bytes(n) => write!(
                f,
                "the status would hold {n} bytes of text (at most {MAX_STATUS_BYTES})"
            ),
            Over::Processes(n) => write!(
                f,
                "the status lists {n} processes (at most {MAX_PROCESSES} per server)"
            ),
            Over::Metrics(n) => write!(
                f,
                "a process has {n} custom metrics (at most {MAX_METRICS})"
            ),
            Over::Ops(n) => write!(f, "the patch has {n} operations (at most {MAX_PATCH_OPS})"),
            Over::Frame(n) => write!(
                f,
                "the frame has {n} bytes (a status or patch at most {MAX_STATUS_FRAME_BYTES})"
            ),
            Over::Work => write!(
                f,
                "the patch touches more than {MAX_PATCH_WORK} values of the status"
            ),
            Over::IntoItself => write!(f, "a copy or move into its own source"),
        }
    }
}

impl std::error::Error for Over {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn measure_counts_nodes_text_and_height() {
        let v = json!({"ab": [1, "xyz"], "c": null});
        let shape = measure(&v, 10, &mut Work::new(100)).unwrap();
        assert_eq!(shape.size.nodes, 5);
        assert_eq!(shape.size.bytes, 5 * 8 + 2 + 1 + 3);
        assert_eq!(shape.height, 2);
        assert_eq!(measure(&v, 1, &mut Work::new(100)), Err(Over::Depth(2)));
        assert_eq!(measure(&v, 10, &mut Work::new(4)), Err(Over::Work));
    }

    #[test]
    fn statuses_over_a_budget_say_which() {
        let processes: Vec<Value> = (0..=MAX_PROCESSES).map(|i| json!({"pm_id": i})).collect();
        let status = json!({"data": {"process": processes}});
        assert_eq!(
            check_status(&status),
            Err(Over::Processes(MAX_PROCESSES + 1))
        );
        let metrics: serde_json::Map<String, Value> = (0..=MAX_METRICS)
            .map(|i| (format!("m{i}"), json!({"value": 1})))
            .collect();
        let status = json!({"data": {"process": [{"axm_monitor": metrics}]}});
        assert_eq!(check_status(&status), Err(Over::Metrics(MAX_METRICS + 1)));
        let mut deep = json!(1);
        for _ in 0..MAX_STATUS_DEPTH + 1 {
            deep = json!([deep]);
        }
        assert!(matches!(check_status(&deep), Err(Over::Depth(_))));
        let long = json!({"s": "x".repeat(MAX_STATUS_BYTES)});
        assert!(matches!(check_status(&long), Err(Over::Bytes(_))));
        assert!(
            check_status(&Value::Array(vec![json!(0); MAX_STATUS_NODES]))
                .unwrap_err()
                .to_string()
                .contains("more than 200000 values")
        );
    }
}
