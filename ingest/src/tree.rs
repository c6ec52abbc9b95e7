//! The live status of a server as a compact tree.
//!
//! A `serde_json::Value` object is a B-tree whose every node reserves room for eleven
//! members: a process of three dozen small objects costs ~25 KB that way. Here an object
//! is one sorted slice of (name, value), names are shared between every status that
//! holds them (an agent's member names repeat across processes and servers), and text up
//! to 22 bytes sits inside its node. A node is 24 bytes.
//!
//! The tree is written and read as JSON exactly as `Value` is (members sorted by name,
//! numbers kept as integer or float), so the API's answers do not change.

use std::borrow::{Borrow, Cow};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Number, Value};

use crate::budget;
use crate::process::{Effect, Process};

/// A member name, shared between every node that holds it.
pub type Name = Arc<str>;

/// The longest text kept inside its node.
const SHORT_TEXT: usize = 22;
/// The longest text shared between statuses (metric types, paths, versions repeat across
/// processes and servers); longer text is rare and kept by its node alone.
const SHARED_TEXT: usize = 256;
/// Members whose value is shared whole between the statuses that hold the same: a
/// process's list of actions and its options are the same in every instance of an app,
/// and agents replace them whole.
const SHARED_MEMBERS: [&str; 2] = ["axm_actions", "axm_options"];

pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Short {
        len: u8,
        bytes: [u8; SHORT_TEXT],
    },
    /// Text up to [`SHARED_TEXT`] bytes.
    Shared(Name),
    Text(Box<str>),
    Array(Box<[Node]>),
    /// Members sorted by name, each name once.
    Object(Box<[(Name, Node)]>),
    /// An array or object held by every status that has the same (see [`SHARED_MEMBERS`]).
    Same(Arc<Node>),
    /// An object of `data.process` (see [`Node::status`]).
    Process(Box<Process>),
}

impl Default for Node {
    fn default() -> Self {
        Node::Object(Box::default())
    }
}

impl From<Value> for Node {
    fn from(value: Value) -> Node {
        match value {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Node::UInt(u),
                (None, Some(i)) => Node::Int(i),
                _ => Node::Float(n.as_f64().unwrap_or_default()),
            },
            Value::String(s) => Node::text(&s),
            Value::Array(items) => Node::Array(items.into_iter().map(Node::from).collect()),
            // A `Map` iterates in name order: the slice comes out sorted.
            Value::Object(map) => {
                Node::Object(map.into_iter().map(|(k, v)| Node::member(&k, v)).collect())
            }
        }
    }
}

impl Node {
    /// A server's status: the generic tree, with each object of `data.process` a typed
    /// [`Process`].
    pub fn status(mut value: Value) -> Node {
        let processes = match value.pointer_mut("/data/process") {
            Some(Value::Array(items)) => std::mem::take(items),
            _ => return Node::from(value),
        };
        let mut status = Node::from(value);
        let processes = processes.into_iter().map(|p| match p {
            Value::Object(map) => Node::Process(Box::new(Process::from(map))),
            other => Node::from(other),
        });
        if let Some(slot) = status.get_mut("data").and_then(|d| d.get_mut("process")) {
            *slot = Node::Array(processes.collect());
        }
        status
    }

    /// An object's member `(k, v)`, its name shared.
    pub fn member(k: &str, v: Value) -> (Name, Node) {
        let v = if SHARED_MEMBERS.contains(&k) {
            Node::same(v)
        } else {
            Node::from(v)
        };
        (Names::intern(k), v)
    }

    fn text(s: &str) -> Node {
        if s.len() <= SHORT_TEXT {
            let mut bytes = [0; SHORT_TEXT];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Node::Short {
                len: s.len() as u8,
                bytes,
            }
        } else if s.len() <= SHARED_TEXT {
            Node::Shared(Names::intern(s))
        } else {
            Node::Text(s.into())
        }
    }

    /// `value` as the tree every status with the same value holds.
    fn same(value: Value) -> Node {
        if !(value.is_array() || value.is_object()) {
            return Node::from(value);
        }
        let key = value.to_string();
        let shared = SAME.lock().get_or_make(key.as_str(), || {
            (key.clone().into(), Arc::new(Node::from(value)))
        });
        Node::Same(shared)
    }

    /// What this node stands for (a shared tree is looked through).
    fn seen(&self) -> &Node {
        match self {
            Node::Same(node) => node,
            node => node,
        }
    }

    /// The same tree as a `Value`.
    pub fn to_value(&self) -> Value {
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::Number((*i).into()),
            Node::UInt(u) => Value::Number((*u).into()),
            Node::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Node::Short { .. } | Node::Shared(_) | Node::Text(_) => {
                Value::String(self.as_str().unwrap_or_default().into())
            }
            Node::Same(node) => node.to_value(),
            Node::Process(process) => process.to_value(),
            Node::Array(items) => Value::Array(items.iter().map(Node::to_value).collect()),
            Node::Object(members) => members_value(members, Node::to_value, None),
        }
    }

    /// The member `name` of an object or a process.
    pub fn get(&self, name: &str) -> Option<&Node> {
        if let Node::Process(process) = self {
            return process.get(name);
        }
        member(self.as_object()?, name)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Node> {
        let Node::Object(members) = self else {
            return None;
        };
        let at = find(members, name)?;
        Some(&mut members[at].1)
    }

    pub fn as_object(&self) -> Option<&[(Name, Node)]> {
        match self.seen() {
            Node::Object(members) => Some(members),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Node]> {
        match self.seen() {
            Node::Array(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            // Built from a `&str` cut at `len`: always UTF-8.
            Node::Short { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)]).ok(),
            Node::Shared(s) => Some(s),
            Node::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Node::Int(i) => Some(i),
            Node::UInt(u) => i64::try_from(u).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Node::Int(i) => Some(i as f64),
            Node::UInt(u) => Some(u as f64),
            Node::Float(f) => Some(f),
            _ => None,
        }
    }

    fn is_container(&self) -> bool {
        matches!(
            self,
            Node::Array(_) | Node::Object(_) | Node::Same(_) | Node::Process(_)
        )
    }

    /// What this scalar counts in a status's size.
    pub fn own_size(&self) -> usize {
        budget::scalar_size(self.as_str())
    }

    /// The processes of a status (`data.process`).
    pub fn processes(&self) -> Option<&[Node]> {
        self.get("data")?.get("process")?.as_array()
    }

    /// The host's 1-minute load average (`data.server.loadavg[0]`), if it is a number.
    pub fn host_load(&self) -> Option<f64> {
        self.get("data")?
            .get("server")?
            .get("loadavg")?
            .as_array()?
            .first()?
            .as_f64()
    }

    /// The processes of a status, to set their series.
    pub fn processes_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        let list = self.get_mut("data").and_then(|d| d.get_mut("process"));
        let items = match list {
            Some(Node::Array(items)) => &mut items[..],
            _ => &mut [],
        };
        items.iter_mut().filter_map(|p| match p {
            Node::Process(process) => Some(&mut **process),
            _ => None,
        })
    }

    /// The scalar at the JSON pointer `path`, and what writing it changes; `None` when
    /// `path` leads to an array or object, nowhere, inside what is shared, or is not a
    /// valid pointer.
    pub fn land(&mut self, path: &str) -> Option<(&mut Node, Effect)> {
        let host = path.starts_with("/data/server/");
        let mut tokens = tokens(path)?;
        let mut at = self;
        while let Some(token) = tokens.next() {
            at = match at {
                Node::Process(process) => {
                    let (slot, effect) = process.land(std::iter::once(token).chain(tokens))?;
                    return (!slot.is_container()).then_some((slot, effect));
                }
                Node::Array(items) => items.get_mut(index(&token)?)?,
                _ => at.get_mut(&token)?,
            };
        }
        let effect = if host { Effect::Host } else { Effect::Other };
        (!at.is_container()).then_some((at, effect))
    }

    /// The scalar at `tokens` below `at` in a generic tree.
    pub fn descend<'a, 't>(
        mut at: &'a mut Node,
        tokens: impl Iterator<Item = Cow<'t, str>>,
    ) -> Option<&'a mut Node> {
        for token in tokens {
            at = match at {
                Node::Array(items) => items.get_mut(index(&token)?)?,
                _ => at.get_mut(&token)?,
            };
        }
        Some(at)
    }
}

/// Where the member `name` sits among `members` (sorted by name).
pub fn find<T>(members: &[(Name, T)], name: &str) -> Option<usize> {
    members.binary_search_by(|(k, _)| (**k).cmp(name)).ok()
}

/// The member `name` of `members` (sorted by name).
pub fn member<'a, T>(members: &'a [(Name, T)], name: &str) -> Option<&'a T> {
    Some(&members[find(members, name)?].1)
}

/// Writes `members` (sorted by name) as one JSON object, with `extra` in its place by
/// name (a typed member kept apart from the others).
pub fn serialize_members<S: Serializer, T: Serialize, E: Serialize>(
    s: S,
    members: &[(Name, T)],
    extra: Option<(&str, &E)>,
) -> Result<S::Ok, S::Error> {
    let at = extra.map_or(members.len(), |(name, _)| {
        members.partition_point(|(k, _)| &**k < name)
    });
    let (before, after) = members.split_at(at);
    let mut map = s.serialize_map(Some(members.len() + usize::from(extra.is_some())))?;
    for (k, v) in before {
        map.serialize_entry(&**k, v)?;
    }
    if let Some((name, value)) = extra {
        map.serialize_entry(name, value)?;
    }
    for (k, v) in after {
        map.serialize_entry(&**k, v)?;
    }
    map.end()
}

/// `members` (and `extra`) as a `Value` object.
pub fn members_value<T>(
    members: &[(Name, T)],
    value: impl Fn(&T) -> Value,
    extra: Option<(&str, Value)>,
) -> Value {
    let mut map: Map<String, Value> = members
        .iter()
        .map(|(k, v)| (k.to_string(), value(v)))
        .collect();
    if let Some((name, v)) = extra {
        map.insert(name.into(), v);
    }
    Value::Object(map)
}

/// The reference tokens of the JSON pointer `path`, unescaped; `None` if it is not one.
fn tokens(path: &str) -> Option<impl Iterator<Item = Cow<'_, str>>> {
    let rest = path.strip_prefix('/')?;
    let bytes = rest.as_bytes();
    let mut escaped = false;
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'~' {
            escaped = true;
            if !matches!(bytes.get(i + 1), Some(b'0' | b'1')) {
                return None;
            }
        }
    }
    Some(rest.split('/').map(move |token| {
        if escaped && token.contains('~') {
            Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
        } else {
            Cow::Borrowed(token)
        }
    }))
}

/// An array index as RFC 6901 writes it (digits, no leading zero).
fn index(token: &str) -> Option<usize> {
    let digits = token.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = token.len() > 1 && token.starts_with('0');
    (digits && !leading_zero)
        .then(|| token.parse().ok())
        .flatten()
}

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Null => s.serialize_unit(),
            Node::Bool(b) => s.serialize_bool(*b),
            Node::Int(i) => s.serialize_i64(*i),
            Node::UInt(u) => s.serialize_u64(*u),
            Node::Float(f) => s.serialize_f64(*f),
            Node::Short { .. } | Node::Shared(_) | Node::Text(_) => {
                s.serialize_str(self.as_str().unwrap_or_default())
            }
            Node::Same(node) => node.serialize(s),
            Node::Process(process) => process.serialize(s),
            Node::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items.iter() {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Node::Object(members) => serialize_members(s, members, None::<(&str, &Node)>),
        }
    }
}

/// Values shared between statuses (names, metric labels), each once. When the table has
/// doubled since it was last swept (and holds at least [`SWEEP_FROM`]), those no status
/// holds any more are dropped: a status of 200,000 new names a second cannot pile them
/// up, and the cost stays linear in what was added.
pub struct Shared<K, V: ?Sized> {
    table: HashMap<K, Arc<V>, foldhash::fast::RandomState>,
    swept: usize,
    /// References to a value the table holds itself.
    own: usize,
}

const SWEEP_FROM: usize = 16_384;

impl<K: Hash + Eq, V: ?Sized> Default for Shared<K, V> {
    fn default() -> Self {
        Shared::holding(1)
    }
}

impl<K: Hash + Eq, V: ?Sized> Shared<K, V> {
    /// A table holding `own` references to each value (2 when the key is the value).
    pub fn holding(own: usize) -> Self {
        Shared {
            table: HashMap::default(),
            swept: 0,
            own,
        }
    }

    /// The value under `key`, made (with its owned key) if there is none.
    pub fn get_or_make<Q>(&mut self, key: &Q, make: impl FnOnce() -> (K, Arc<V>)) -> Arc<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(found) = self.table.get(key) {
            return found.clone();
        }
        if self.table.len() >= SWEEP_FROM.max(self.swept * 2) {
            let own = self.own;
            self.table.retain(|_, v| Arc::strong_count(v) > own);
            self.swept = self.table.len();
        }
        let (key, value) = make();
        self.table.insert(key, value.clone());
        value
    }

    /// Values in the table (those no longer held included until the next sweep).
    pub fn count(&self) -> usize {
        self.table.len()
    }
}

/// Every member name and shared text some status holds (the key is the value).
static NAMES: LazyLock<Mutex<Shared<Name, str>>> = LazyLock::new(|| Mutex::new(Shared::holding(2)));

/// The shared trees of [`SHARED_MEMBERS`], by their JSON text.
static SAME: LazyLock<Mutex<Shared<Box<str>, Node>>> = LazyLock::new(Default::default);

/// Member names, shared.
pub struct Names;

impl Names {
    /// The shared name `name`.
    pub fn intern(name: &str) -> Name {
        NAMES.lock().get_or_make(name, || {
            let name = Name::from(name);
            (name.clone(), name)
        })
    }

    /// Names and texts in the table, shown in `/healthz` (those no status holds any more
    /// included until the next sweep).
    pub fn count() -> usize {
        NAMES.lock().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_node_is_24_bytes() {
        assert_eq!(std::mem::size_of::<Node>(), 24);
    }

    #[test]
    fn round_trips_exactly_as_value_writes() {
        let value = json!({
            "z": [1, -2, 3.5, 18446744073709551615u64, null, true, "short", "a text longer than twenty-two bytes"],
            "a": {"b": {}, "": [], "é~/": "ü"},
            "m": 1e300, "n": -0.0, "o": 0.1,
            "axm_actions": [{"action_name": "a", "arity": 1}], "axm_options": {"x": [1]},
            "t": "a text of more than two hundred and fifty-six bytes ".repeat(6),
        });
        let node = Node::from(value.clone());
        assert_eq!(serde_json::to_string(&node).unwrap(), value.to_string());
        assert_eq!(node.to_value(), value);
    }

    #[test]
    fn finds_scalars_only() {
        let mut node = Node::from(json!({"data": {"process": [{"a/b": "v", "x": {"y": [2]}}]}}));
        let mut at = |path: &str| node.land(path).map(|(n, _)| n.to_value());
        assert_eq!(at("/data/process/0/a~1b"), Some(json!("v")));
        assert_eq!(at("/data/process/0/x/y/0"), Some(json!(2)));
        for path in [
            "/data/process/0/x",
            "/data/process/1/x",
            "/data/process/-",
            "data",
            "",
        ] {
            assert_eq!(at(path), None, "{path}");
        }
        let (at, _) = node.land("/data/process/0/a~1b").unwrap();
        assert_eq!(at.own_size(), 9);
        *at = Node::from(json!(3));
        assert_eq!(
            node.to_value(),
            json!({"data": {"process": [{"a/b": 3, "x": {"y": [2]}}]}})
        );
    }

    #[test]
    fn actions_and_long_text_are_shared_and_looked_through() {
        let status = |pid: u32| {
            json!({"axm_actions": [{"action_name": "km:heapdump"}], "pid": pid,
                   "type": "internal/libuv/latency/p95"})
        };
        let (a, b) = (Node::from(status(1)), Node::from(status(2)));
        let actions = |n: &Node| match n.get("axm_actions") {
            Some(Node::Same(tree)) => tree.clone(),
            _ => panic!("not shared"),
        };
        assert!(Arc::ptr_eq(&actions(&a), &actions(&b)));
        fn first(n: &Node) -> Option<&str> {
            n.get("axm_actions")?.as_array()?[0]
                .get("action_name")?
                .as_str()
        }
        assert_eq!(first(&a), Some("km:heapdump"));
        let mut a = a;
        assert!(
            a.land("/axm_actions/0/action_name").is_none(),
            "replaced whole only"
        );
        assert!(matches!(a.get("type"), Some(Node::Shared(_))));
        assert_eq!(a.to_value(), status(1));
    }

    #[test]
    fn names_are_shared_and_swept() {
        let a = Node::from(json!({"names-are-shared": 1}));
        let b = Node::from(json!({"names-are-shared": 2}));
        let (Some(ka), Some(kb)) = (a.as_object(), b.as_object()) else {
            panic!("objects");
        };
        assert!(Arc::ptr_eq(&ka[0].0, &kb[0].0));
        for i in 0..3 * SWEEP_FROM {
            drop(Names::intern(&format!("garbage-{i}")));
        }
        assert!(Names::count() < 2 * SWEEP_FROM + 100);
        assert!(Arc::ptr_eq(&Names::intern("names-are-shared"), &ka[0].0));
    }
}
