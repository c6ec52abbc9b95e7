//! What the stores hold: plain records shared by every implementation.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A stable id of a record's content at `at` (epoch ms): a batch written again after a
/// failure overwrites what got through instead of doubling it. The time comes first, so
/// that new ids land at the end of the stores' unique indexes: ids of random order made
/// every insert of a large events database read and split a random page of that index.
fn content_id(at: i64, parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    let at = u64::try_from(at).unwrap_or(0);
    format!("{at:012x}{}", hex::encode(&hash.finalize()[..16]))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct User {
    #[serde(rename = "_id")]
    pub id: String,
    pub username: String,
    pub email: String,
    #[serde(skip_serializing)]
    pub password_hash: String,
    /// `admin` for the first user, `user` for the others.
    pub role: String,
    pub created_at: i64,
    /// Refused at sign-in and on every token (an appliance admin's decision).
    #[serde(default)]
    pub disabled: bool,
    /// A pending password reset; cleared when the password is set.
    #[serde(skip)]
    pub reset: Option<PasswordReset>,
}

/// A password reset link's secret (its SHA-256 digest) and when it expires (epoch ms).
#[derive(Debug, Clone, PartialEq)]
pub struct PasswordReset {
    pub digest: String,
    pub expires_at: i64,
}

/// An issued token pair; only SHA-256 digests of the tokens are stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub access_digest: String,
    pub refresh_digest: String,
    pub user_id: String,
    pub client_id: String,
    pub access_expires_at: i64,
    pub refresh_expires_at: i64,
    /// A personal token's name ("" for sign-ins).
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Bucket {
    #[serde(rename = "_id")]
    pub id: String,
    pub name: String,
    pub public_id: String,
    pub secret_id: String,
    pub owner: String,
    pub created_at: i64,
    /// Agents are refused (set by the bucket's admins).
    #[serde(default)]
    pub disabled: bool,
}

/// A member's role in a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    Owner,
    Admin,
    Developer,
    ReadOnly,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Owner => "owner",
            MemberRole::Admin => "admin",
            MemberRole::Developer => "developer",
            MemberRole::ReadOnly => "read_only",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "owner" => MemberRole::Owner,
            "admin" => MemberRole::Admin,
            "developer" => MemberRole::Developer,
            "read_only" => MemberRole::ReadOnly,
            _ => return None,
        })
    }

    /// Whether this role has every right of `other` (owner > admin > developer >
    /// read-only).
    pub fn includes(self, other: MemberRole) -> bool {
        let rank = |r| match r {
            MemberRole::Owner => 3,
            MemberRole::Admin => 2,
            MemberRole::Developer => 1,
            MemberRole::ReadOnly => 0,
        };
        rank(self) >= rank(other)
    }
}

/// A bucket member as the API lists them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    pub user_id: String,
    pub username: String,
    pub email: String,
    pub role: MemberRole,
    /// Whether they are mailed the bucket's notifications; `None`: as their role has it.
    pub notify: Option<bool>,
}

impl Member {
    /// Owners and admins are mailed unless they opted out; others only if they opted in.
    pub fn receives_mail(&self) -> bool {
        self.notify.unwrap_or(self.role.includes(MemberRole::Admin))
    }
}

/// The last known state of a linked server, kept so it survives restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerRecord {
    pub bucket_id: String,
    pub server_name: String,
    pub last_update: i64,
    /// The agent's latest full status (`{data:{process, server}, ...}`) as JSON text.
    pub status_json: String,
}

/// A notification: what happened in a bucket, who it goes to, and how its delivery went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    #[serde(rename = "_id")]
    pub id: String,
    pub bucket_id: String,
    /// `new_issue`, `server_offline`, `alert_fired`, … (the notifier's kinds).
    pub kind: String,
    /// How it is delivered.
    #[serde(default)]
    pub channel: Channel,
    pub created_at: i64,
    pub subject: String,
    /// The mail's text and HTML parts.
    pub text: String,
    #[serde(default)]
    pub html: String,
    /// How many events it stands for (a burst is one notification).
    pub count: u64,
    /// The mail's recipients (mail only).
    pub recipients: Vec<String>,
    /// The webhook's JSON body: the same facts for machines.
    #[serde(default)]
    pub payload: serde_json::Value,
    pub state: NotificationState,
    pub attempts: u32,
    /// When the next delivery is tried (epoch ms).
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub sent_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    #[default]
    Email,
    Slack,
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Slack => "slack",
            Channel::Webhook => "webhook",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationState {
    Pending,
    Retrying,
    Sent,
    Failed,
}

impl NotificationState {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationState::Pending => "pending",
            NotificationState::Retrying => "retrying",
            NotificationState::Sent => "sent",
            NotificationState::Failed => "failed",
        }
    }
}

/// A server refused by the licence's process limit: its agent is told `active:false` and
/// retries (the licence limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedServer {
    pub bucket_id: String,
    pub server_name: String,
    /// Why, as the dashboard shows it.
    pub reason: String,
    /// Its monitored processes when it was parked.
    pub processes: u32,
    /// When (epoch ms); it may try again a minute later.
    pub parked_at: i64,
}

/// The kinds of time-stamped events; each is queried on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Log,
    Exception,
    ProcessEvent,
    /// Custom events, action replies, command results, pass-through channels, commands sent.
    Event,
    Transaction,
    Profile,
    /// Spans of traces (`trace-span`, Zipkin, OTLP): found by trace (`name`), listed
    /// slowest first ([`SpanFacts`]).
    Span,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Log,
        EventKind::Exception,
        EventKind::ProcessEvent,
        EventKind::Event,
        EventKind::Transaction,
        EventKind::Profile,
        EventKind::Span,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Log => "logs",
            EventKind::Exception => "exceptions",
            EventKind::ProcessEvent => "process_events",
            EventKind::Event => "events",
            EventKind::Transaction => "transactions",
            EventKind::Profile => "profiles",
            EventKind::Span => "spans",
        }
    }
}

/// One stored event. `doc` is the JSON object the API returns for it, stored as text so
/// that reads need no re-encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// Unique per event where it was received: identical events (the same line twice in
    /// a millisecond) stay apart, while a batch written again is not doubled.
    pub id: String,
    pub kind: EventKind,
    pub bucket_id: String,
    pub server_name: String,
    pub app_name: Option<String>,
    /// The channel or event type (`human:event`, `axm:reply`, `restart`...).
    pub event_type: String,
    /// The name of a custom event (`human:event`), to find it by.
    pub name: Option<String>,
    pub at: i64,
    pub doc: String,
    /// What a span is sorted and filtered by (spans only).
    pub span: Option<Box<SpanFacts>>,
}

/// A span's facts beside its document: its trace is the event's `name`, its kind
/// (`SERVER`, `CLIENT`, …) the event's type.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpanFacts {
    /// `GET /users/:id` for HTTP, the span's name otherwise.
    pub route: String,
    /// The HTTP status; 0 when none.
    pub status: u16,
    pub duration_us: i64,
    /// A request into the service (a `SERVER` or `CONSUMER` span, or one without a
    /// parent): what the traces list shows.
    pub entry: bool,
}

/// A filter over the entry spans of one bucket, since a time.
#[derive(Debug, Clone, Default)]
pub struct SpanQuery {
    pub bucket_id: String,
    pub app_name: Option<String>,
    pub server_name: Option<String>,
    pub route: Option<String>,
    /// HTTP statuses from the first to the second, both included.
    pub status: Option<(u16, u16)>,
    /// Only spans starting at or after this (epoch ms).
    pub since: i64,
    pub limit: u32,
}

/// The latencies of one route of an app, from its entry spans.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteLatency {
    pub app_name: String,
    pub route: String,
    pub count: u64,
    /// Answered with a status of 500 or more.
    pub errors: u64,
    /// Percentiles of the duration, µs (nearest rank within 0.55 % on SQLite; estimates on
    /// Elasticsearch).
    pub p50_us: i64,
    pub p95_us: i64,
    pub p99_us: i64,
    pub max_us: i64,
}

impl EventRecord {
    pub fn content_id(&self) -> String {
        content_id(
            self.at,
            &[
                self.id.as_bytes(),
                self.kind.as_str().as_bytes(),
                self.bucket_id.as_bytes(),
            ],
        )
    }
}

/// A filter over events of one kind in one bucket; results are newest first.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub bucket_id: String,
    pub app_name: Option<String>,
    pub server_name: Option<String>,
    pub event_type: Option<String>,
    pub name: Option<String>,
    /// Only events strictly older than this (epoch ms).
    pub before: Option<i64>,
    /// Only events strictly newer than this (epoch ms).
    pub after: Option<i64>,
    /// Only events whose text (log line, message) holds this, ignoring case.
    pub text: Option<String>,
    pub limit: u32,
    pub offset: u32,
}

/// One minute of one metric of one process. Its names are shared with the live series
/// (a minute boundary emits one point per series of every server at once: no copies).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricPoint {
    #[serde(skip)]
    pub bucket_id: Arc<str>,
    #[serde(skip)]
    pub server_name: Arc<str>,
    #[serde(skip)]
    pub app_name: Arc<str>,
    #[serde(skip)]
    pub pm_id: i64,
    #[serde(skip)]
    pub name: Arc<str>,
    #[serde(skip)]
    pub unit: Option<Arc<str>>,
    #[serde(skip)]
    pub agg_type: Option<Arc<str>>,
    /// Start of the minute, epoch ms.
    pub at: i64,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
    pub last: f64,
    pub count: u32,
}

/// The app name of a server's host series (its load average, its processes' sums):
/// pm2 gives every app a name.
pub const HOST_APP: &str = "";

/// The pm2 modules that report their host's figures as their own metrics: pm2 5 and 6's
/// `pm2 set pm2:sysmonit true`, and the `pm2-server-monit` module.
pub const HOST_MONITORS: [&str; 2] = ["pm2-sysmonit", "pm2-server-monit"];

/// The host series made from those modules' metrics (percent): CPU busy, memory used,
/// disk free (the first disk the module watches).
pub const HOST_MONITOR_SERIES: [&str; 3] = ["host_cpu", "host_memory_used", "host_disk_free"];

/// The host series an alert rule may watch (the host's own, not its processes' sums).
pub const HOST_RULE_SERIES: [&str; 4] = ["load", "host_cpu", "host_memory_used", "host_disk_free"];

impl MetricPoint {
    /// One of a server's host series, not of an app.
    pub fn of_host(&self) -> bool {
        *self.app_name == *HOST_APP
    }

    pub fn content_id(&self) -> String {
        let numbers: Vec<u8> = [self.pm_id, self.at, i64::from(self.count)]
            .iter()
            .flat_map(|n| n.to_le_bytes())
            .chain(
                [self.avg, self.min, self.max, self.last]
                    .iter()
                    .flat_map(|f| f.to_le_bytes()),
            )
            .collect();
        content_id(
            self.at,
            &[
                self.bucket_id.as_bytes(),
                self.server_name.as_bytes(),
                self.app_name.as_bytes(),
                self.name.as_bytes(),
                &numbers,
            ],
        )
    }
}

/// Retention: events older than these (epoch ms) are deleted; logs may be kept for a
/// different time than the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cutoffs {
    pub logs: i64,
    pub others: i64,
}

impl Cutoffs {
    /// The cutoff of the kind named `kind` (`logs`, `metrics`, `exceptions`...).
    pub fn of(&self, kind: &str) -> i64 {
        if kind == EventKind::Log.as_str() {
            self.logs
        } else {
            self.others
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct MetricQuery {
    pub bucket_id: String,
    pub app_name: Option<String>,
    pub server_name: Option<String>,
    /// Points with `at >= since` (epoch ms).
    pub since: i64,
    /// Only points with `at < until` (epoch ms).
    pub until: Option<i64>,
    /// Only these metrics (all when empty).
    pub names: Vec<String>,
    /// One series per instance (its `pm_id`) instead of an app's instances merged.
    pub by_instance: bool,
}
