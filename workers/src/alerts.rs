//! Alert rules of a bucket (the `/api/bucket/:id/alerts` routes of `@pm2/js-api`) and
//! their evaluation, run by the notifier each pass.
//!
//! A rule watches one metric (`initiator`: `cpu`, `memory` or a custom metric's name) of
//! the processes in its scope (apps and servers; empty is all). Over the last
//! `timerange` seconds of complete minutes (at least 60) it compares the time-weighted
//! average (`aggregation: "avg"`) or every point (`"all"`: each minute's minimum and
//! maximum), or some point (`"any"`), with `threshold` by `operator`. When the condition
//! starts for an app on a server the rule fires once: notifications and its PM2 or custom
//! action. When it ends it resolves once. A window with a minute missing decides nothing.
//!
//! Apps declare rules in code too: `pmx`'s `probe.metric({alert: {mode, value, cmp,
//! interval}})` sends the `alert` with the metric, and each one is a rule of that app
//! ([`declared`]): `threshold` judges some point of the last minute, `threshold-avg` the
//! average over its `interval` (seconds, 180 by default, at least a minute). `smart`
//! sends no threshold (the app judges it, and reports an exception when it trips).
//!
//! Webhook `items` of `alert_fired` and `alert_resolved`:
//! `{alert: {id, name}, server, app, metric, value, operator, threshold}`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::notify::watch::process_link;
use crate::notify::{Event, Line, Lines, Outbox};
use km_core::app::App;
use km_core::fleet::{self, CommandError, ServerStatus, command_agent};
use km_core::schedule::Episodes;
use km_stores::ids::{new_object_id, now_ms};
use km_stores::{
    Documents, EventKind, EventRecord, HOST_APP, HOST_RULE_SERIES, MetricPoint, MetricQuery,
    StoreResult,
};

const KIND: &str = "alert";
const MINUTE_MS: i64 = 60_000;
/// Minutes are stored once they end and the writer flushed them.
const LAG_MS: i64 = 5_000;
const MAX_TIMERANGE_S: i64 = 86_400;
const PM2_METHODS: [&str; 3] = ["restart", "reload", "reset"];
const AGGREGATIONS: [&str; 3] = ["avg", "all", "any"];
/// Rules declared in code kept per bucket (the rest are ignored, and the page says how
/// many): each agent's metrics are bounded, their sum over a fleet is not.
pub const MAX_CODE_RULES: usize = 200;
/// pmx's window for `threshold-avg` when the app gives none (seconds).
const CODE_AVG_WINDOW_S: i64 = 180;
/// How a declared rule's id begins (a stored rule's is an ObjectId: hex only).
const CODE_ID_PREFIX: &str = "code-";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    #[serde(rename = "_id")]
    pub id: String,
    pub bucket: String,
    pub name: String,
    pub enabled: bool,
    #[serde(rename = "type")]
    pub kind: String,
    /// The metric watched.
    pub initiator: String,
    pub options: Options,
    pub scope: Scope,
    pub actions: Vec<Action>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Declared by the app's code (see [`declared`]): changed there, not here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_code: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Options {
    pub operator: String,
    pub threshold: f64,
    /// Seconds.
    pub timerange: i64,
    /// `avg`, `all` (every point) or `any` (some point).
    pub aggregation: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    #[serde(default)]
    pub apps: Vec<String>,
    #[serde(default)]
    pub servers: Vec<String>,
}

/// `notify` (the bucket's channels), `pm2_action` (`params.method`: restart, reload or
/// reset) or `custom_action` (`params.name`, `params.opts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub params: Value,
}

/// A create or update request; every field optional, checked by [`AlertForm::apply`].
#[derive(Debug, Default, Deserialize)]
pub struct AlertForm {
    name: Option<String>,
    enabled: Option<bool>,
    #[serde(rename = "type")]
    kind: Option<String>,
    initiator: Option<String>,
    options: Option<OptionsForm>,
    scope: Option<Scope>,
    actions: Option<Vec<Action>>,
}

#[derive(Debug, Default, Deserialize)]
struct OptionsForm {
    operator: Option<String>,
    threshold: Option<f64>,
    timerange: Option<i64>,
    aggregation: Option<String>,
}

impl AlertForm {
    /// A new rule from the form (name, type, initiator and threshold needed).
    pub fn create(self, bucket_id: &str) -> Result<Alert, String> {
        let now = now_ms();
        let mut alert = Alert {
            id: new_object_id(),
            bucket: bucket_id.to_string(),
            name: String::new(),
            enabled: true,
            kind: String::new(),
            initiator: String::new(),
            options: Options {
                operator: ">".into(),
                threshold: f64::NAN,
                timerange: 60,
                aggregation: "avg".into(),
            },
            scope: Scope::default(),
            actions: vec![Action {
                kind: "notify".into(),
                params: json!({}),
            }],
            created_at: now,
            updated_at: now,
            from_code: false,
        };
        self.apply(&mut alert)?;
        Ok(alert)
    }

    /// Applies what the form sets, then checks the whole rule.
    pub fn apply(self, alert: &mut Alert) -> Result<(), String> {
        let text = |v: Option<String>| v.map(|s| s.trim().to_string());
        if let Some(name) = text(self.name) {
            alert.name = name;
        }
        if let Some(enabled) = self.enabled {
            alert.enabled = enabled;
        }
        if let Some(kind) = text(self.kind) {
            alert.kind = kind;
        }
        if let Some(initiator) = text(self.initiator) {
            alert.initiator = initiator;
        }
        if let Some(o) = self.options {
            let options = &mut alert.options;
            options.operator = o.operator.unwrap_or(options.operator.clone());
            options.threshold = o.threshold.unwrap_or(options.threshold);
            options.timerange = o.timerange.unwrap_or(options.timerange);
            options.aggregation = o.aggregation.unwrap_or(options.aggregation.clone());
        }
        if let Some(scope) = self.scope {
            alert.scope = scope;
        }
        if let Some(actions) = self.actions {
            alert.actions = actions;
        }
        alert.updated_at = now_ms();
        alert.check()
    }
}

impl Alert {
    fn check(&self) -> Result<(), String> {
        let o = &self.options;
        if self.name.is_empty() {
            return Err("name: required".into());
        }
        if self.kind != "metric" {
            return Err(format!(
                "type: {:?} is not supported; alerts watch a metric (\"metric\")",
                self.kind
            ));
        }
        if self.initiator.is_empty() {
            return Err("initiator: required (cpu, memory or a custom metric's name)".into());
        }
        if !["<", "<=", "=", ">=", ">"].contains(&o.operator.as_str()) {
            return Err(format!(
                "options.operator: {:?} is not one of <, <=, =, >=, >",
                o.operator
            ));
        }
        if !o.threshold.is_finite() {
            return Err("options.threshold: a number is required".into());
        }
        if !(60..=MAX_TIMERANGE_S).contains(&o.timerange) {
            return Err(format!(
                "options.timerange: {} s; between 60 and {MAX_TIMERANGE_S} s",
                o.timerange
            ));
        }
        if !AGGREGATIONS.contains(&o.aggregation.as_str()) {
            return Err(format!(
                "options.aggregation: {:?}; \"avg\" (over the window), \"all\" (every point) or \"any\" (some point)",
                o.aggregation
            ));
        }
        self.actions.iter().try_for_each(Action::check)
    }

    /// Whole minutes of the window.
    fn minutes(&self) -> i64 {
        (self.options.timerange + 59) / 60
    }

    /// Whether the rule watches this point: a host series (`load`, `host_cpu`…) on the
    /// servers in scope, any other metric of the apps and servers in scope.
    fn watches(&self, p: &MetricPoint) -> bool {
        let any_or =
            |list: &[String], name: &str| list.is_empty() || list.iter().any(|n| n == name);
        let host_rule = HOST_RULE_SERIES.contains(&self.initiator.as_str());
        *p.name == *self.initiator
            && p.of_host() == host_rule
            && any_or(&self.scope.servers, &p.server_name)
            && (host_rule || any_or(&self.scope.apps, &p.app_name))
    }

    /// What the window's values are judged on, in words.
    pub fn judged_on(&self) -> &'static str {
        match self.options.aggregation.as_str() {
            "all" => "every point",
            "any" => "some point",
            _ => "average",
        }
    }

    fn describe(&self) -> String {
        let o = &self.options;
        format!(
            "{} {} {} {} over {} s",
            self.initiator,
            self.judged_on(),
            o.operator,
            o.threshold,
            o.timerange
        )
    }
}

impl Action {
    fn check(&self) -> Result<(), String> {
        let param = |name: &str| self.params[name].as_str().unwrap_or_default();
        match self.kind.as_str() {
            "notify" => Ok(()),
            "pm2_action" if PM2_METHODS.contains(&param("method")) => Ok(()),
            "pm2_action" => Err(format!(
                "actions: pm2_action needs params.method, one of {}",
                PM2_METHODS.join(", ")
            )),
            "custom_action" if !param("name").is_empty() => Ok(()),
            "custom_action" => Err("actions: custom_action needs params.name".into()),
            other => Err(format!(
                "actions: {other:?} is not one of notify, pm2_action, custom_action"
            )),
        }
    }
}

pub async fn list(documents: &dyn Documents, bucket_id: &str) -> StoreResult<Vec<Alert>> {
    Ok(documents
        .bucket_docs(bucket_id, KIND)
        .await?
        .into_iter()
        .filter_map(|(_, doc)| serde_json::from_str(&doc).ok())
        .collect())
}

/// The bucket's rules: those stored, then those its apps declare in code (at most
/// [`MAX_CODE_RULES`]), with how many more were declared and ignored.
pub async fn all(app: &App, bucket_id: &str) -> StoreResult<(Vec<Alert>, usize)> {
    let servers = fleet::servers(app, bucket_id, None).await;
    let (declared, ignored) = declared(bucket_id, &servers);
    let mut rules = list(app.documents.as_ref(), bucket_id).await?;
    rules.extend(declared);
    Ok((rules, ignored))
}

/// The rule `id` of the bucket: a stored one is read alone; only a declared one (its id
/// says so) needs the servers' statuses.
pub async fn find(app: &App, bucket_id: &str, id: &str) -> StoreResult<Option<Alert>> {
    let rules = if id.starts_with(CODE_ID_PREFIX) {
        let servers = fleet::servers(app, bucket_id, None).await;
        declared(bucket_id, &servers).0
    } else {
        list(app.documents.as_ref(), bucket_id).await?
    };
    Ok(rules.into_iter().find(|a| a.id == id))
}

/// The rules the apps on `servers` declare in code (each `alert` of an `axm_monitor`
/// metric): one per app, metric and condition, scoped to the servers declaring it; at
/// most [`MAX_CODE_RULES`], with how many more were ignored.
pub fn declared(bucket_id: &str, servers: &[ServerStatus]) -> (Vec<Alert>, usize) {
    let mut found: BTreeMap<(&str, &str, String), (Options, BTreeSet<&str>)> = BTreeMap::new();
    for server in servers.iter().filter(|s| s.online) {
        for process in &server.data.process {
            for (metric, value) in &process.axm_monitor {
                let Some(options) = code_options(&value["alert"]) else {
                    continue;
                };
                let id = code_rule_id(&process.name, metric, &options);
                found
                    .entry((process.name.as_str(), metric.as_str(), id))
                    .or_insert_with(|| (options, BTreeSet::new()))
                    .1
                    .insert(server.server_name.as_str());
            }
        }
    }
    let ignored = found.len().saturating_sub(MAX_CODE_RULES);
    let now = now_ms();
    let rules = found
        .into_iter()
        .take(MAX_CODE_RULES)
        .map(|((app, metric, id), (options, servers))| Alert {
            id,
            bucket: bucket_id.to_string(),
            name: format!("{app}: {metric} {} {}", options.operator, options.threshold),
            enabled: true,
            kind: "metric".into(),
            initiator: metric.to_string(),
            options,
            scope: Scope {
                apps: vec![app.to_string()],
                servers: servers.into_iter().map(str::to_string).collect(),
            },
            actions: vec![Action {
                kind: "notify".into(),
                params: json!({}),
            }],
            created_at: now,
            updated_at: now,
            from_code: true,
        })
        .collect();
    (rules, ignored)
}

/// A declared rule's condition, if the agent sent one km can judge: pmx's `threshold`
/// and `threshold-avg`, with a finite `value` and a `cmp` of `>` (the default), `<` or `=`.
fn code_options(alert: &Value) -> Option<Options> {
    let threshold = match &alert["value"] {
        Value::Number(n) => n.as_f64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
    .filter(|v: &f64| v.is_finite())?;
    let operator = match alert.get("cmp").and_then(Value::as_str) {
        None => ">",
        Some(op @ (">" | "<" | "=")) => op,
        Some(_) => return None,
    };
    let (aggregation, timerange) = match alert["mode"].as_str()? {
        "threshold" => ("any", 60),
        "threshold-avg" => {
            let seconds = alert["interval"]
                .as_f64()
                .filter(|s| s.is_finite() && *s > 0.0)
                .map_or(CODE_AVG_WINDOW_S, |s| s.ceil() as i64);
            let minutes = (seconds.clamp(60, MAX_TIMERANGE_S) + 59) / 60;
            ("avg", minutes * 60)
        }
        _ => return None,
    };
    Some(Options {
        operator: operator.into(),
        threshold,
        timerange,
        aggregation: aggregation.into(),
    })
}

/// A declared rule's id: the same for the same app, metric and condition on every pass
/// (its episodes are kept under it).
fn code_rule_id(app: &str, metric: &str, o: &Options) -> String {
    let key = json!([
        app,
        metric,
        o.operator,
        o.threshold,
        o.timerange,
        o.aggregation
    ]);
    let digest = Sha256::digest(key.to_string().as_bytes());
    format!("{CODE_ID_PREFIX}{}", hex::encode(&digest[..8]))
}

pub async fn save(documents: &dyn Documents, alert: &Alert) -> StoreResult<()> {
    let doc = serde_json::to_string(alert).unwrap_or_default();
    documents
        .put_bucket_doc(&alert.bucket, KIND, &alert.id, &doc)
        .await
}

pub async fn delete(documents: &dyn Documents, bucket_id: &str, id: &str) -> StoreResult<bool> {
    documents.delete_bucket_doc(bucket_id, KIND, id).await
}

fn episodes_prefix(alert: &Alert) -> String {
    format!("alert:{}:{}:", alert.bucket, alert.id)
}

/// Where the rule fires now: `[{server, app, since}]`.
pub async fn firing(documents: &dyn Documents, alert: &Alert) -> StoreResult<Vec<Value>> {
    let episodes = Episodes::load(documents, &episodes_prefix(alert)).await?;
    let mut firing: Vec<Value> = episodes
        .open_keys()
        .map(|key| {
            let (server, app) = key.split_once('/').unwrap_or((key, ""));
            json!({"server": server, "app": app, "since": episodes.open_since(key)})
        })
        .collect();
    firing.sort_by_key(|v| v.to_string());
    Ok(firing)
}

/// One pass of the bucket's enabled rules at `now`, those of its apps' code on
/// `servers` with them.
pub async fn check(outbox: &Outbox<'_>, now: i64, servers: &[ServerStatus]) -> StoreResult<()> {
    let documents = outbox.app.documents.as_ref();
    let mut rules: Vec<Alert> = list(documents, &outbox.bucket.id)
        .await?
        .into_iter()
        .filter(|a| a.enabled)
        .collect();
    let (from_code, ignored) = declared(&outbox.bucket.id, servers);
    if ignored > 0 {
        tracing::warn!(bucket = %outbox.bucket.id, ignored, "alert rules declared in code over {MAX_CODE_RULES}: ignored");
    }
    rules.extend(from_code);
    let Some(longest) = rules.iter().map(Alert::minutes).max() else {
        return Ok(());
    };
    let end = (now - LAG_MS).div_euclid(MINUTE_MS) * MINUTE_MS;
    let query = MetricQuery {
        bucket_id: outbox.bucket.id.clone(),
        since: end - longest * MINUTE_MS,
        ..MetricQuery::default()
    };
    let points = outbox
        .app
        .events
        .metric_histogram(&query, MINUTE_MS)
        .await?;
    for rule in &rules {
        evaluate(outbox, rule, &points, end).await?;
    }
    Ok(())
}

/// The value the rule compares for one app on one server, if its window is complete,
/// and whether the condition holds.
fn judge(rule: &Alert, minutes: &[&MetricPoint]) -> Option<(f64, bool)> {
    if (minutes.len() as i64) < rule.minutes() {
        return None;
    }
    let o = &rule.options;
    let holds = |v: f64| match o.operator.as_str() {
        "<" => v < o.threshold,
        "<=" => v <= o.threshold,
        "=" => (v - o.threshold).abs() < f64::EPSILON,
        ">=" => v >= o.threshold,
        _ => v > o.threshold,
    };
    let count: f64 = minutes.iter().map(|p| f64::from(p.count.max(1))).sum();
    let avg = minutes
        .iter()
        .map(|p| p.avg * f64::from(p.count.max(1)))
        .sum::<f64>()
        / count;
    // The point nearest to holding (any) or farthest from it (all), by the operator.
    let lowest = || minutes.iter().map(|p| p.min).fold(f64::MAX, f64::min);
    let highest = || minutes.iter().map(|p| p.max).fold(f64::MIN, f64::max);
    match o.aggregation.as_str() {
        "all" => {
            let all = minutes.iter().all(|p| holds(p.min) && holds(p.max));
            let extreme = if o.operator.starts_with('<') {
                highest()
            } else {
                lowest()
            };
            Some((extreme, all))
        }
        "any" => {
            let extreme = match o.operator.as_str() {
                "<" | "<=" => lowest(),
                ">" | ">=" => highest(),
                // Equal: a minute whose range holds the threshold came through it.
                _ => {
                    let through = minutes
                        .iter()
                        .any(|p| p.min <= o.threshold && o.threshold <= p.max);
                    return Some((if through { o.threshold } else { avg }, through));
                }
            };
            Some((extreme, holds(extreme)))
        }
        _ => Some((avg, holds(avg))),
    }
}

/// A change of one app on one server.
struct Change {
    server: String,
    app: String,
    value: f64,
}

async fn evaluate(
    outbox: &Outbox<'_>,
    rule: &Alert,
    points: &[MetricPoint],
    end: i64,
) -> StoreResult<()> {
    let start = end - rule.minutes() * MINUTE_MS;
    let mut windows: BTreeMap<(&str, &str), Vec<&MetricPoint>> = BTreeMap::new();
    for p in points {
        if rule.watches(p) && (start..end).contains(&p.at) {
            windows
                .entry((&p.server_name, &p.app_name))
                .or_default()
                .push(p);
        }
    }
    let documents = outbox.app.documents.as_ref();
    let mut episodes = Episodes::load(documents, &episodes_prefix(rule)).await?;
    let (mut fired, mut resolved) = (Vec::new(), Vec::new());
    for ((server, app), minutes) in windows {
        let Some((value, holds)) = judge(rule, &minutes) else {
            continue;
        };
        let key = format!("{server}/{app}");
        let change = Change {
            server: server.to_string(),
            app: app.to_string(),
            value,
        };
        if holds && episodes.open(&key, end).await? {
            fired.push(change);
        } else if !holds && episodes.close(&key).await?.is_some() {
            resolved.push(change);
        }
    }
    for change in &fired {
        record(outbox, rule, change, "alert_fired", end);
        run_actions(outbox, rule, change).await;
    }
    for change in &resolved {
        record(outbox, rule, change, "alert_resolved", end);
    }
    if rule.actions.iter().any(|a| a.kind == "notify") {
        tell(outbox, rule, "alert_fired", fired).await?;
        tell(outbox, rule, "alert_resolved", resolved).await?;
    }
    Ok(())
}

async fn tell(
    outbox: &Outbox<'_>,
    rule: &Alert,
    kind: &'static str,
    changes: Vec<Change>,
) -> StoreResult<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let bucket = &outbox.bucket.name;
    let state = if kind == "alert_fired" {
        "fired"
    } else {
        "resolved"
    };
    let subject = format!(
        "[{bucket}] Alert {} {state} ({} processes)",
        rule.name,
        changes.len()
    );
    let heading = format!(
        "In {bucket}, the alert {} ({}) {state}.",
        rule.name,
        rule.describe()
    );
    let o = &rule.options;
    let items = changes
        .iter()
        .map(|c| {
            json!({
                "alert": {"id": rule.id, "name": rule.name}, "server": c.server, "app": c.app,
                "metric": rule.initiator, "value": c.value, "operator": o.operator,
                "threshold": o.threshold,
            })
        })
        .collect();
    let lines = changes
        .iter()
        .map(|c| Line {
            name: match c.app.as_str() {
                HOST_APP => format!("the host {}", c.server),
                app => format!("{app} on {}", c.server),
            },
            detail: format!("{} is {:.2}", rule.initiator, c.value),
            link: process_link(outbox, &c.server, &c.app),
        })
        .collect();
    outbox
        .send_lines(kind, (subject, heading), lines, items, "/alerts")
        .await
}

/// The change in the bucket's events (`data/events`, the reports).
fn record(outbox: &Outbox<'_>, rule: &Alert, change: &Change, kind: &str, at: i64) {
    let doc = json!({
        "at": at, "type": kind, "server_name": change.server, "app_name": change.app,
        "alert": {"id": rule.id, "name": rule.name}, "metric": rule.initiator,
        "value": change.value, "operator": rule.options.operator,
        "threshold": rule.options.threshold,
    });
    outbox.app.ingest.event(EventRecord {
        id: km_stores::ids::new_object_id(),
        kind: EventKind::Event,
        bucket_id: outbox.bucket.id.clone(),
        server_name: change.server.clone(),
        app_name: Some(change.app.clone()),
        event_type: kind.to_string(),
        name: Some(rule.name.clone()),
        at,
        doc: doc.to_string(),
        span: None,
    });
}

/// The rule's PM2 and custom actions on the app that fired; a failure is logged (the
/// agent may be gone), the notification still goes.
async fn run_actions(outbox: &Outbox<'_>, rule: &Alert, change: &Change) {
    let by = format!("alert {}", rule.name);
    for action in &rule.actions {
        let outcome = match action.kind.as_str() {
            "pm2_action" => {
                let method = action.params["method"].as_str().unwrap_or("restart");
                let payload = json!({"method_name": method, "parameters": {"name": change.app}});
                let target = (change.server.as_str(), Some(change.app.as_str()));
                command_agent(
                    outbox.app,
                    &outbox.bucket.id,
                    target,
                    "trigger:pm2:action",
                    payload,
                    &by,
                )
                .await
            }
            "custom_action" => custom_action(outbox, action, change, &by).await,
            _ => continue,
        };
        if let Err(e) = outcome {
            tracing::warn!(alert = %rule.id, server = %change.server, app = %change.app, error = %e, "alert action not sent");
        }
    }
}

/// A custom action goes to each instance (pm_id) of the app on the server.
async fn custom_action(
    outbox: &Outbox<'_>,
    action: &Action,
    change: &Change,
    by: &str,
) -> Result<(), CommandError> {
    let name = action.params["name"].as_str().unwrap_or_default();
    let opts = match &action.params["opts"] {
        opts @ Value::Object(_) => opts.clone(),
        _ => json!({}),
    };
    for server in fleet::servers(outbox.app, &outbox.bucket.id, None).await {
        if server.server_name != change.server {
            continue;
        }
        for p in server.data.process.iter().filter(|p| p.name == change.app) {
            let payload = json!({"action_name": name, "process_id": p.pm_id, "opts": opts});
            let target = (change.server.as_str(), Some(change.app.as_str()));
            command_agent(
                outbox.app,
                &outbox.bucket.id,
                target,
                "trigger:action",
                payload,
                by,
            )
            .await?;
        }
    }
    Ok(())
}

/// `POST /alerts/:alert/sample`: a test notification of the rule through every channel.
pub async fn sample(outbox: &Outbox<'_>, rule: &Alert) -> StoreResult<Vec<km_stores::Channel>> {
    let bucket = &outbox.bucket.name;
    let mail = Lines {
        bucket: bucket.clone(),
        heading: format!(
            "A test of the alert {} ({}) in {bucket}: this is how it looks when it fires.",
            rule.name,
            rule.describe()
        ),
        lines: vec![Line {
            name: "example-app on example-server".into(),
            detail: format!("{} is {}", rule.initiator, rule.options.threshold),
            link: outbox.link("/alerts"),
        }],
    };
    let item = json!({
        "alert": {"id": rule.id, "name": rule.name}, "server": "example-server",
        "app": "example-app", "metric": rule.initiator, "value": rule.options.threshold,
        "operator": rule.options.operator, "threshold": rule.options.threshold,
    });
    let subject = format!("[{bucket}] Test of the alert {}", rule.name);
    let event: Event = mail.event("alert_sample", subject, vec![item], outbox.link("/alerts"));
    outbox.send(event).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(operator: &str, aggregation: &str) -> Alert {
        let form: AlertForm = serde_json::from_value(json!({
            "name": "hot", "type": "metric", "initiator": "cpu",
            "options": {"operator": operator, "threshold": 50, "timerange": 120, "aggregation": aggregation},
        }))
        .unwrap();
        form.create("b").unwrap()
    }

    fn minute(at: i64, avg: f64, min: f64, max: f64) -> MetricPoint {
        MetricPoint {
            bucket_id: "b".into(),
            server_name: "s".into(),
            app_name: "a".into(),
            pm_id: 0,
            name: "cpu".into(),
            unit: None,
            agg_type: None,
            at,
            avg,
            min,
            max,
            last: avg,
            count: 60,
        }
    }

    #[test]
    fn host_rules_watch_the_host_and_app_rules_the_apps() {
        let mut cpu = rule(">", "avg");
        cpu.scope.apps = vec!["a".into()];
        let mut host_cpu = cpu.clone();
        host_cpu.initiator = "host_cpu".into();
        let of_app = minute(0, 1.0, 1.0, 1.0);
        let host_sum = MetricPoint {
            app_name: HOST_APP.into(),
            ..of_app.clone()
        };
        let host = MetricPoint {
            name: "host_cpu".into(),
            ..host_sum.clone()
        };
        assert!(
            cpu.watches(&of_app) && !cpu.watches(&host_sum),
            "the processes' cpu, not their sum"
        );
        assert!(
            host_cpu.watches(&host),
            "the host whatever the apps in scope"
        );
        host_cpu.scope.servers = vec!["other".into()];
        assert!(!host_cpu.watches(&host), "servers still scope a host rule");
    }

    #[test]
    fn conditions_over_a_window() {
        let (a, b) = (
            minute(0, 70.0, 40.0, 90.0),
            minute(60_000, 60.0, 55.0, 65.0),
        );
        let flat = minute(0, 50.0, 50.0, 50.0);
        assert_eq!(judge(&rule(">", "avg"), &[&a, &b]), Some((65.0, true)));
        assert_eq!(judge(&rule(">", "all"), &[&a, &b]), Some((40.0, false)));
        assert_eq!(judge(&rule(">", "all"), &[&b, &b]), Some((55.0, true)));
        assert_eq!(judge(&rule("<", "avg"), &[&a, &b]), Some((65.0, false)));
        assert_eq!(
            judge(&rule("<=", "all"), &[&flat, &flat]),
            Some((50.0, true))
        );
        // A window with a minute missing decides nothing.
        assert_eq!(judge(&rule(">", "avg"), &[&a]), None);
    }

    #[test]
    fn some_point_of_the_window() {
        let (a, b) = (
            minute(0, 40.0, 30.0, 55.0),
            minute(60_000, 45.0, 42.0, 48.0),
        );
        assert_eq!(judge(&rule(">", "any"), &[&a, &b]), Some((55.0, true)));
        assert_eq!(judge(&rule("<", "any"), &[&a, &b]), Some((30.0, true)));
        assert_eq!(judge(&rule(">=", "any"), &[&b, &b]), Some((48.0, false)));
        assert_eq!(judge(&rule("=", "any"), &[&a, &b]), Some((50.0, true)));
        assert_eq!(
            judge(&rule("=", "any"), &[&b, &b]).map(|j| j.1),
            Some(false)
        );
    }

    fn server(name: &str, online: bool, monitor: Value) -> ServerStatus {
        serde_json::from_value(json!({
            "server_name": name, "online": online,
            "data": {"process": [{"name": "api", "pm_id": 0, "axm_monitor": monitor}]},
        }))
        .unwrap()
    }

    #[test]
    fn rules_declared_in_code() {
        let monitor = json!({
            "queue": {"value": 3, "alert": {"mode": "threshold", "value": 50, "cmp": ">"}},
            "latency": {"value": 3, "alert": {"mode": "threshold-avg", "value": "200", "interval": 100, "cmp": "<"}},
            "smart": {"value": 3, "alert": {"mode": "smart"}},
            "none": {"value": 3, "alert": {}},
            "bad cmp": {"value": 3, "alert": {"mode": "threshold", "value": 1, "cmp": "!="}},
            "nan": {"value": 3, "alert": {"mode": "threshold", "value": "x"}},
            "plain": 3,
        });
        let servers = [
            server("s1", true, monitor.clone()),
            server("s2", true, monitor.clone()),
            server("gone", false, monitor),
        ];
        let (rules, ignored) = declared("b", &servers);
        assert_eq!(ignored, 0);
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["api: latency < 200", "api: queue > 50"]);
        let (latency, queue) = (&rules[0], &rules[1]);
        assert!(queue.from_code && queue.enabled && queue.id.starts_with("code-"));
        assert_eq!(
            (queue.options.aggregation.as_str(), queue.options.timerange),
            ("any", 60)
        );
        assert_eq!(
            (
                latency.options.aggregation.as_str(),
                latency.options.timerange
            ),
            ("avg", 120)
        );
        assert_eq!(queue.scope.apps, ["api"]);
        assert_eq!(queue.scope.servers, ["s1", "s2"], "online servers only");
        assert_eq!(queue.actions.len(), 1);
        // The same declaration keeps its id from pass to pass; another value is another rule.
        assert_eq!(declared("b", &servers).0[1].id, queue.id);
        let other = server(
            "s1",
            true,
            json!({"queue": {"alert": {"mode": "threshold", "value": 60}}}),
        );
        assert_ne!(declared("b", &[other]).0[0].id, queue.id);
        let json = serde_json::to_value(queue).unwrap();
        assert_eq!(json["from_code"], true);
        let stored = serde_json::to_value(rule(">", "avg")).unwrap();
        assert!(stored.get("from_code").is_none(), "{stored}");
    }

    #[test]
    fn declared_rules_are_bounded() {
        let many: serde_json::Map<String, Value> = (0..MAX_CODE_RULES + 7)
            .map(|i| {
                (
                    format!("m{i}"),
                    json!({"alert": {"mode": "threshold", "value": i}}),
                )
            })
            .collect();
        let (rules, ignored) = declared("b", &[server("s", true, Value::Object(many))]);
        assert_eq!((rules.len(), ignored), (MAX_CODE_RULES, 7));
    }

    #[test]
    fn forms_are_checked_with_reasons() {
        let bad = |v: Value| {
            serde_json::from_value::<AlertForm>(v)
                .unwrap()
                .create("b")
                .unwrap_err()
        };
        let base =
            json!({"name": "x", "type": "metric", "initiator": "cpu", "options": {"threshold": 1}});
        let with = |path: &str, value: Value| {
            let mut v = base.clone();
            *v.pointer_mut(path).unwrap() = value;
            v
        };
        assert!(bad(with("/type", json!("event"))).contains("not supported"));
        assert!(bad(with("/name", json!(" "))).contains("name"));
        let mut short = base.clone();
        short["options"]["timerange"] = json!(30);
        assert!(bad(short).contains("between 60"));
        let mut op = base.clone();
        op["options"]["operator"] = json!("!=");
        assert!(bad(op).contains("operator"));
        let mut act = base.clone();
        act["actions"] = json!([{"type": "pm2_action", "params": {"method": "delete"}}]);
        assert!(bad(act).contains("restart, reload, reset"));
        let mut no_threshold = base.clone();
        no_threshold["options"] = json!({});
        assert!(bad(no_threshold).contains("threshold"));
        let ok: AlertForm = serde_json::from_value(base).unwrap();
        let alert = ok.create("b").unwrap();
        assert_eq!((alert.options.timerange, alert.actions.len()), (60, 1));
    }
}
