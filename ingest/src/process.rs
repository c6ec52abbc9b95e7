//! A process of a live status, typed where agents write every second.
//!
//! An agent's patches are nearly all a new `cpu`, `memory` or metric value of one
//! process. Here a process knows where those sit: `cpu` and `memory` by their place
//! among its members, each metric of `axm_monitor` by name in one sorted slice, with the
//! series its value feeds. Everything else of a metric (`unit`, `type`, `historic`, …) is
//! its [`Shape`], held once for every metric of every server that has the same: a metric
//! costs 56 bytes, not the ~220 of an object of four members.
//!
//! Written out, a process is exactly the JSON it was built from (members in name order).

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;
use serde::ser::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::tree::{Name, Names, Node, Shared, find, member, members_value, serialize_members};

/// The member that holds a process's metrics.
const MONITOR: &str = "axm_monitor";

pub struct Process {
    /// Every member but a typed `axm_monitor`, sorted by name.
    members: Box<[(Name, Node)]>,
    /// `axm_monitor` when it is an object: its metrics, sorted by name.
    monitor: Option<Box<[(Name, Metric)]>>,
    /// Where `cpu` and `memory` sit in `members`.
    cpu_at: Option<u32>,
    memory_at: Option<u32>,
    /// The series their values feed (see [`crate::MetricSampler`]).
    pub cpu_series: Option<u32>,
    pub memory_series: Option<u32>,
}

/// One metric of `axm_monitor`.
pub struct Metric {
    /// Its `value` (the whole metric when it is not an object).
    pub value: Node,
    /// Its other members, when it is an object.
    shape: Option<Arc<Shape>>,
    /// The series its value feeds.
    pub series: Option<u32>,
}

/// Every member of a metric but its value: the same for the metric of every instance of
/// an app, on every server.
pub struct Shape {
    members: Box<[(Name, Node)]>,
    /// Whether the metric has a `value`.
    has_value: bool,
}

/// Shapes by their JSON text (and whether a value goes with them).
static SHAPES: LazyLock<Mutex<Shared<Box<str>, Shape>>> = LazyLock::new(Default::default);

impl Shape {
    fn shared(members: Map<String, Value>, has_value: bool) -> Arc<Shape> {
        let members = Value::Object(members);
        let key = format!("{}{members}", u8::from(has_value));
        SHAPES.lock().get_or_make(key.as_str(), || {
            let members = match Node::from(members) {
                Node::Object(members) => members,
                _ => Box::default(),
            };
            let shape = Shape { members, has_value };
            (key.clone().into(), Arc::new(shape))
        })
    }

    /// Shapes in the table, shown in `/healthz`.
    pub fn count() -> usize {
        SHAPES.lock().count()
    }
}

impl From<Value> for Metric {
    fn from(value: Value) -> Metric {
        let (value, shape) = match value {
            Value::Object(mut members) => {
                let value = members.remove("value");
                let shape = Shape::shared(members, value.is_some());
                (value.map_or(Node::Null, Node::from), Some(shape))
            }
            whole => (Node::from(whole), None),
        };
        Metric {
            value,
            shape,
            series: None,
        }
    }
}

impl Metric {
    /// The text of its member `name` (not its value).
    pub fn text(&self, name: &str) -> Option<&str> {
        member(&self.shape.as_ref()?.members, name)?.as_str()
    }

    /// Its value, if it has one.
    pub fn value(&self) -> Option<&Node> {
        match &self.shape {
            Some(shape) => shape.has_value.then_some(&self.value),
            None => Some(&self.value),
        }
    }

    fn to_value(&self) -> Value {
        match &self.shape {
            Some(shape) => {
                let value = shape.has_value.then(|| ("value", self.value.to_value()));
                members_value(&shape.members, Node::to_value, value)
            }
            None => self.value.to_value(),
        }
    }
}

impl Serialize for Metric {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.shape {
            Some(shape) => {
                let value = shape.has_value.then_some(("value", &self.value));
                serialize_members(s, &shape.members, value)
            }
            None => self.value.serialize(s),
        }
    }
}

impl From<Map<String, Value>> for Process {
    fn from(map: Map<String, Value>) -> Process {
        let mut monitor = None;
        // A `Map` iterates in name order: the slice comes out sorted.
        let members: Box<[(Name, Node)]> = map
            .into_iter()
            .filter_map(|(k, v)| match v {
                Value::Object(metrics) if k == MONITOR => {
                    let metrics = metrics.into_iter();
                    monitor = Some(
                        metrics
                            .map(|(k, v)| (Names::intern(&k), Metric::from(v)))
                            .collect(),
                    );
                    None
                }
                v => Some(Node::member(&k, v)),
            })
            .collect();
        let at = |name: &str| u32::try_from(find(&members, name)?).ok();
        Process {
            cpu_at: at("cpu"),
            memory_at: at("memory"),
            members,
            monitor,
            cpu_series: None,
            memory_series: None,
        }
    }
}

/// A process's identity, its values that feed series and where it keeps their ids.
pub struct Sampled<'a> {
    pub app: Option<&'a str>,
    pub pm_id: Option<i64>,
    pub cpu: (Option<f64>, &'a mut Option<u32>),
    pub memory: (Option<f64>, &'a mut Option<u32>),
    pub metrics: &'a mut [(Name, Metric)],
}

/// What a value written into a status changes besides itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// A metric's value: its series (if it has one) takes it.
    Metric(Option<u32>),
    /// What names processes or metrics: every series is loaded again.
    Structural,
    /// The host's figures (`/data/server/…`).
    Host,
    /// Anything else.
    Other,
}

impl Process {
    /// Its member `name` (a typed `axm_monitor` is read through [`Process::sampled`]).
    pub fn get(&self, name: &str) -> Option<&Node> {
        member(&self.members, name)
    }

    /// What its series are made of, with the slots that keep them.
    pub fn sampled(&mut self) -> Sampled<'_> {
        let Process {
            members,
            monitor,
            cpu_at,
            memory_at,
            cpu_series,
            memory_series,
            ..
        } = self;
        let at = |at: &Option<u32>| Some(&members.get(usize::try_from((*at)?).ok()?)?.1);
        Sampled {
            app: member(members, "name").and_then(Node::as_str),
            pm_id: member(members, "pm_id").and_then(Node::as_i64),
            cpu: (at(cpu_at).and_then(Node::as_f64), cpu_series),
            memory: (at(memory_at).and_then(Node::as_f64), memory_series),
            metrics: monitor.as_deref_mut().unwrap_or_default(),
        }
    }

    /// Every series slot it holds.
    pub fn series_mut(&mut self) -> impl Iterator<Item = &mut Option<u32>> {
        let metrics = self.monitor.iter_mut().flat_map(|m| m.iter_mut());
        [&mut self.cpu_series, &mut self.memory_series]
            .into_iter()
            .chain(metrics.map(|(_, m)| &mut m.series))
    }

    /// The scalar at `tokens` below this process, and what writing it changes.
    pub fn land<'a, 't>(
        &'a mut self,
        mut tokens: impl Iterator<Item = Cow<'t, str>>,
    ) -> Option<(&'a mut Node, Effect)> {
        let field = tokens.next()?;
        if field == MONITOR
            && let Some(monitor) = self.monitor.as_deref_mut()
        {
            let name = tokens.next()?;
            let at = find(monitor, &name)?;
            let metric = &mut monitor[at].1;
            let effect = match (tokens.next(), &metric.shape) {
                (None, None) => Effect::Structural,
                (Some(v), Some(shape)) if v == "value" && shape.has_value => {
                    Effect::Metric(metric.series)
                }
                _ => return None,
            };
            return tokens
                .next()
                .is_none()
                .then_some((&mut metric.value, effect));
        }
        let at = find(&self.members, &field)?;
        let mut tokens = tokens.peekable();
        let is = |place: Option<u32>| place.is_some_and(|p| usize::try_from(p) == Ok(at));
        let effect = if field == "name" || field == "pm_id" || field == MONITOR {
            Effect::Structural
        } else if tokens.peek().is_some() {
            Effect::Other
        } else if is(self.cpu_at) {
            Effect::Metric(self.cpu_series)
        } else if is(self.memory_at) {
            Effect::Metric(self.memory_series)
        } else {
            Effect::Other
        };
        let slot = Node::descend(&mut self.members[at].1, tokens)?;
        Some((slot, effect))
    }

    pub fn to_value(&self) -> Value {
        let monitor = self
            .monitor
            .as_deref()
            .map(|metrics| (MONITOR, members_value(metrics, Metric::to_value, None)));
        members_value(&self.members, Node::to_value, monitor)
    }
}

/// A process's metrics written out as an object.
struct Monitor<'a>(&'a [(Name, Metric)]);

impl Serialize for Monitor<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_members(s, self.0, None::<(&str, &Node)>)
    }
}

impl Serialize for Process {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let monitor = self.monitor.as_deref().map(Monitor);
        serialize_members(s, &self.members, monitor.as_ref().map(|m| (MONITOR, m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn process() -> Value {
        json!({
            "name": "api", "pm_id": 3, "cpu": 1, "memory": 2048, "pid": 7, "zz": {"a": [1]},
            "axm_monitor": {
                "Heap Usage": {"historic": true, "unit": "%", "type": "internal/v8/heap/usage", "value": 92.63},
                "req/sec": {"value": "0.5req/s", "unit": "req/s", "alert": {"mode": "threshold"}},
                "no value": {"unit": "ms"},
                "plain": 5,
                "a list": [1, 2],
                "zvalue": {"v": 1, "value": null, "w": 2}
            }
        })
    }

    fn status(processes: Value) -> Value {
        json!({"data": {"process": processes, "server": {"uptime": 1.5}}, "internal_ip": "10.0.0.1"})
    }

    #[test]
    fn a_process_writes_out_as_it_came() {
        let cases = [
            status(
                json!([process(), 5, {"axm_monitor": 1}, {"a": 1}, {"axm_monitor": {}}, {"b": 1, "axm_monitor": {"x": {}}},
                {"a": 1, "axm_monitor": {"m": {"value": 1, "x": 2}}}]),
            ),
            status(json!([])),
            status(json!({"not": "a list"})),
            json!({"data": 1}),
            json!([1]),
        ];
        for value in cases {
            let node = Node::status(value.clone());
            assert_eq!(serde_json::to_string(&node).unwrap(), value.to_string());
            assert_eq!(node.to_value(), value);
        }
    }

    #[test]
    fn metrics_of_the_same_shape_share_it() {
        let (a, b) = (
            Node::status(status(json!([process()]))),
            Node::status(status(json!([process()]))),
        );
        let shape = |n: &Node| match &n.processes().unwrap()[0] {
            Node::Process(p) => p.monitor.as_ref().unwrap()[0].1.shape.clone().unwrap(),
            _ => panic!("typed"),
        };
        assert!(Arc::ptr_eq(&shape(&a), &shape(&b)));
        assert!(std::mem::size_of::<(Name, Metric)>() <= 56);
    }

    #[test]
    fn writes_land_on_their_field_and_say_what_they_change() {
        let mut node = Node::status(status(json!([process()])));
        let mut effect = |path: &str| node.land(path).map(|(_, e)| e);
        for (path, expected) in [
            ("/data/process/0/cpu", Some(Effect::Metric(None))),
            (
                "/data/process/0/axm_monitor/req~1sec/value",
                Some(Effect::Metric(None)),
            ),
            (
                "/data/process/0/axm_monitor/plain",
                Some(Effect::Structural),
            ),
            ("/data/process/0/name", Some(Effect::Structural)),
            ("/data/process/0/pid", Some(Effect::Other)),
            ("/data/process/0/zz/a/0", Some(Effect::Other)),
            ("/data/server/uptime", Some(Effect::Host)),
            ("/internal_ip", Some(Effect::Other)),
            // Shared, containers, nowhere, not a pointer.
            ("/data/process/0/axm_monitor/Heap Usage/unit", None),
            ("/data/process/0/axm_monitor/no value/value", None),
            ("/data/process/0/axm_monitor/Heap Usage", None),
            ("/data/process/0/axm_monitor/a list/0", None),
            ("/data/process/0/axm_monitor", None),
            ("/data/process/0", None),
            ("/data/process/00/cpu", None),
            ("/data/process/-/cpu", None),
            ("/data/process/1/cpu", None),
            ("/data/process/0/cpu/x", None),
            ("/data/process/0/a~2b", None),
            ("data/process/0/cpu", None),
            ("", None),
        ] {
            assert_eq!(effect(path), expected, "{path}");
        }
        let (slot, _) = node
            .land("/data/process/0/axm_monitor/Heap Usage/value")
            .unwrap();
        *slot = Node::from(json!(50));
        let mut expected = status(json!([process()]));
        expected["data"]["process"][0]["axm_monitor"]["Heap Usage"]["value"] = json!(50);
        assert_eq!(node.to_value(), expected);
    }
}
