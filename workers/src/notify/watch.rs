//! What the notifier looks for in a bucket each pass, and the words it tells it in.
//!
//! | `type` | when | `items` |
//! | --- | --- | --- |
//! | `new_issue` | exceptions of a group never seen before the window | `{app, message, count, servers, callsite, link}` |
//! | `server_offline` | no data for 90 s | `{server, since}` |
//! | `server_online` | data again after that | `{server, since}` |
//! | `process_errored` | pm2 gave up restarting a process | `{server, app, pm_id}` |
//! | `restart_loop` | 3 or more crashes of an app in a minute | `{server, app, restarts}` |
//! | `deployment` | an app's revision changed | `{server, app, from, to}` |
//! | `custom_event` | a custom event (`io.emit`) the bucket subscribed to happened | `{server, app, name, data, at}` |

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use askama::Template;
use serde_json::{Value, json};

use super::{Event, Line, Outbox, PERIOD_MS};
use crate::alerts;
use km_core::app::App;
use km_core::fleet::{self, ServerStatus, page_path};
use km_core::health::{self, counted};
use km_core::issues::{self, Issue, IssueState, Triage, issue_path};
use km_core::schedule::Episodes;
use km_stores::ids::{now_ms, utc_text};
use km_stores::{Bucket, EventKind, EventQuery, StoreResult};

/// A server silent this long is offline.
const OFFLINE_AFTER_MS: i64 = 90_000;
/// Servers silent longer than this went away before anyone watched: not told.
const RECENT_MS: i64 = 600_000;
/// Issues named in one mail; the count covers them all.
const LISTED: usize = 20;
/// Custom events read per pass (a burst beyond it is told in part).
const MAX_TOLD_EVENTS: u32 = 500;
/// Where the last revision of each app is kept (bucket documents).
const REVISIONS: &str = "revisions";

/// One pass over a bucket: the events of `window` (it closed a period ago: the writer
/// batches). Servers are judged only once agents had time to reconnect after km started
/// (`settled`).
pub async fn bucket(
    app: &App,
    bucket: &Bucket,
    window: Range<i64>,
    settled: bool,
) -> StoreResult<()> {
    let outbox = Outbox::of(app, bucket).await?;
    let (end, now) = (window.end, window.end + PERIOD_MS);
    new_issues(&outbox, window.start, end).await?;
    custom_events(&outbox, window.start, end).await?;
    restart_loops(&outbox, end).await?;
    // Until agents had time to reconnect the servers are not read (declared rules wait).
    let mut servers = Vec::new();
    if settled {
        servers = fleet::servers(app, &bucket.id, None).await;
        servers_offline(&outbox, &servers).await?;
        errored(&outbox, &servers).await?;
        deployments(&outbox, &servers).await?;
    }
    alerts::check(&outbox, now, &servers).await
}

/// How long `server` has been silent at `now`.
fn silent(server: &ServerStatus, now: i64) -> i64 {
    now - server.last_update
}

/// The issues of `[start, end)` in `bucket` that had no occurrence before `start`.
pub async fn issues_new_in(
    app: &App,
    bucket: &Bucket,
    start: i64,
    end: i64,
) -> StoreResult<Vec<Issue>> {
    Ok(issues_of(app, bucket, start, end, &HashMap::new())
        .await?
        .into_iter()
        .filter_map(|(issue, new)| new.then_some(issue))
        .collect())
}

/// The issues of `[start, end)` that are new (no occurrence before `start`) or that
/// someone resolved before this window's occurrence (they reopen), each with whether it
/// is new.
async fn issues_of(
    app: &App,
    bucket: &Bucket,
    start: i64,
    end: i64,
    decisions: &HashMap<String, Triage>,
) -> StoreResult<Vec<(Issue, bool)>> {
    let window = EventQuery {
        bucket_id: bucket.id.clone(),
        after: Some(start - 1),
        before: Some(end),
        ..EventQuery::default()
    };
    let mut found = Vec::new();
    for issue in issues::issues(app.events.as_ref(), window).await? {
        let reopened = decisions.get(&issue.identifier).is_some_and(|t| {
            t.state == IssueState::Resolved && t.state_at(issue.last_seen) == IssueState::Open
        });
        if reopened {
            found.push((issue, false));
            continue;
        }
        let earlier = EventQuery {
            bucket_id: bucket.id.clone(),
            name: Some(issue.identifier.clone()),
            before: Some(start),
            limit: 1,
            ..EventQuery::default()
        };
        let seen = app.events.query(EventKind::Exception, &earlier).await?;
        if seen.is_empty() {
            found.push((issue, true));
        }
    }
    Ok(found)
}

/// Tells the issues new in the window and those that reopened (resolved, then seen
/// again: open from now on).
async fn new_issues(outbox: &Outbox<'_>, start: i64, end: i64) -> StoreResult<()> {
    let documents = outbox.app.documents.as_ref();
    let decisions = Triage::all(documents, &outbox.bucket.id).await?;
    let issues = issues_of(outbox.app, outbox.bucket, start, end, &decisions).await?;
    if issues.is_empty() {
        return Ok(());
    }
    for (issue, _) in issues.iter().filter(|(_, new)| !new) {
        let open = Triage {
            state: IssueState::Open,
            at: end,
            by: "km".into(),
        };
        Triage::set(documents, &outbox.bucket.id, &issue.identifier, &open).await?;
    }
    let bucket = &outbox.bucket.name;
    let reopened = issues.iter().filter(|(_, new)| !new).count();
    let headline = match (issues.len(), reopened) {
        (1, 0) => "A new issue".to_string(),
        (1, _) => "An issue reopened".to_string(),
        (n, 0) => format!("{n} new issues"),
        (n, r) if r == n => format!("{n} issues reopened"),
        (n, _) => format!("{n} new or reopened issues"),
    };
    let subject = match issues.as_slice() {
        [(one, true)] => format!("[{bucket}] New issue: {}", one.message),
        [(one, false)] => format!("[{bucket}] Issue reopened: {}", one.message),
        _ => format!("[{bucket}] {headline}"),
    };
    let lines: Vec<IssueLine> = issues
        .iter()
        .take(LISTED)
        .map(|(i, new)| IssueLine::of(outbox, i, !new))
        .collect();
    let mail = NewIssues {
        bucket: bucket.clone(),
        headline: headline.clone(),
        issues: lines,
    };
    let html = NewIssuesHtml {
        bucket,
        headline: &headline,
        issues: &mail.issues,
    }
    .render()
    .unwrap_or_default();
    let items = mail.issues.iter().map(IssueLine::item).collect();
    outbox
        .send(Event {
            kind: "new_issue",
            subject,
            text: mail.render().unwrap_or_default(),
            html,
            count: issues.iter().map(|(i, _)| i.count).sum(),
            items,
            link: outbox.link("/issues"),
        })
        .await
        .map(drop)
}

#[derive(Template)]
#[template(path = "mail/new_issues.txt")]
struct NewIssues {
    bucket: String,
    /// `A new issue`, `3 issues reopened`…
    headline: String,
    issues: Vec<IssueLine>,
}

#[derive(Template)]
#[template(path = "mail/new_issues.html")]
struct NewIssuesHtml<'a> {
    bucket: &'a str,
    headline: &'a str,
    issues: &'a [IssueLine],
}

struct IssueLine {
    /// Resolved before, seen again.
    reopened: bool,
    app: String,
    message: String,
    count: u64,
    servers: String,
    callsite: String,
    link: String,
    /// For the webhook: the issue, when it was seen, where, and its newest stack.
    identifier: String,
    first_seen: i64,
    last_seen: i64,
    server_names: Vec<String>,
    pm_id: Value,
    stack: String,
}

/// Characters of a stack sent in a webhook.
const STACK_CHARS: usize = 8_000;

impl IssueLine {
    fn of(outbox: &Outbox, i: &Issue, reopened: bool) -> IssueLine {
        IssueLine {
            reopened,
            link: format!(
                "{}{}",
                outbox.app.public_url,
                issue_path(&outbox.bucket.id, &i.identifier)
            ),
            app: i.app_name.clone().unwrap_or_default(),
            message: i.message.chars().take(300).collect(),
            count: i.count,
            servers: i.servers.join(", "),
            callsite: i.callsite.clone().unwrap_or_default(),
            identifier: i.identifier.clone(),
            first_seen: i.first_seen,
            last_seen: i.last_seen,
            server_names: i.servers.clone(),
            pm_id: i.last["pm_id"].clone(),
            stack: (i.last["data"]["stack"].as_str().unwrap_or_default())
                .chars()
                .take(STACK_CHARS)
                .collect(),
        }
    }

    fn item(&self) -> Value {
        json!({
            "app": self.app, "message": self.message, "count": self.count, "reopened": self.reopened,
            "servers": self.servers, "callsite": self.callsite, "link": self.link,
            "identifier": self.identifier, "first_seen": self.first_seen, "last_seen": self.last_seen,
            "server_names": self.server_names, "pm_id": self.pm_id, "stack": self.stack,
        })
    }
}

pub fn process_link(outbox: &Outbox, server: &str, app_name: &str) -> String {
    let path = page_path(&outbox.bucket.id, server, app_name);
    format!("{}{path}", outbox.app.public_url)
}

/// Servers gone silent for 90 s, and those back since, each told once.
async fn servers_offline(outbox: &Outbox<'_>, servers: &[ServerStatus]) -> StoreResult<()> {
    let documents = outbox.app.documents.as_ref();
    let mut episodes = Episodes::load(documents, &format!("offline:{}:", outbox.bucket.id)).await?;
    let now = now_ms();
    let (mut gone, mut back) = (Vec::new(), Vec::new());
    for server in servers {
        let silent = silent(server, now);
        let name = &server.server_name;
        if silent > OFFLINE_AFTER_MS {
            if silent < RECENT_MS && episodes.open(name, server.last_update).await? {
                gone.push((name.clone(), server.last_update));
            }
        } else if let Some(since) = episodes.close(name).await? {
            back.push((name.clone(), since));
        }
    }
    let bucket = &outbox.bucket.name;
    for (kind, servers, state, more, detail) in [
        (
            "server_offline",
            gone,
            "offline",
            ": no data for more than 90 s",
            "no data since",
        ),
        (
            "server_online",
            back,
            "back online",
            "",
            "sending data again, silent since",
        ),
    ] {
        let what = counted(servers.len(), "server", "servers");
        let words = (
            format!("[{bucket}] {what} {state}"),
            format!("In {bucket}, {what} {state}{more}."),
        );
        let items = servers
            .iter()
            .map(|(server, since)| json!({"server": server, "since": since}))
            .collect();
        let lines = servers
            .into_iter()
            .map(|(name, since)| Line {
                detail: format!(
                    "{detail} {} UTC",
                    utc_text(since).get(11..).unwrap_or_default()
                ),
                name,
                link: outbox.link(""),
            })
            .collect();
        outbox.send_lines(kind, words, lines, items, "").await?;
    }
    Ok(())
}

/// Processes pm2 stopped restarting (`errored`), each told once per start.
async fn errored(outbox: &Outbox<'_>, servers: &[ServerStatus]) -> StoreResult<()> {
    let documents = outbox.app.documents.as_ref();
    let mut episodes = Episodes::load(documents, &format!("errored:{}:", outbox.bucket.id)).await?;
    let now = now_ms();
    let (mut lines, mut items) = (Vec::new(), Vec::new());
    for server in servers
        .iter()
        .filter(|s| silent(s, now) <= OFFLINE_AFTER_MS)
    {
        for p in &server.data.process {
            let key = format!("{}/{}/{}", server.server_name, p.name, p.pm_id);
            if p.status != "errored" {
                episodes.close(&key).await?;
            } else if episodes.open(&key, p.pm_uptime).await? {
                lines.push(Line {
                    name: format!("{} (pm_id {}) on {}", p.name, p.pm_id, server.server_name),
                    detail: "errored: pm2 stopped restarting it".into(),
                    link: process_link(outbox, &server.server_name, &p.name),
                });
                items.push(json!({"server": server.server_name, "app": p.name, "pm_id": p.pm_id}));
            }
        }
    }
    let bucket = &outbox.bucket.name;
    let what = counted(lines.len(), "process", "processes");
    let words = (
        format!("[{bucket}] {what} errored"),
        format!("In {bucket}, {what} errored."),
    );
    outbox
        .send_lines("process_errored", words, lines, items, "")
        .await
}

/// Apps that crashed [`health::LOOP_CRASHES`] times within a minute, told once per loop (the
/// loop ends after a minute without a crash).
async fn restart_loops(outbox: &Outbox<'_>, end: i64) -> StoreResult<()> {
    let bucket_id = &outbox.bucket.id;
    let crashes = health::crashes(outbox.app.events.as_ref(), bucket_id, end).await?;
    let documents = outbox.app.documents.as_ref();
    let mut episodes = Episodes::load(documents, &format!("loop:{bucket_id}:")).await?;
    let open: Vec<String> = episodes.open_keys().map(str::to_string).collect();
    for key in open {
        let quiet = !crashes.iter().any(|((s, a), _)| format!("{s}/{a}") == key);
        if quiet {
            episodes.close(&key).await?;
        }
    }
    let (mut lines, mut items) = (Vec::new(), Vec::new());
    for ((server, app_name), n) in health::loops(crashes) {
        if episodes.open(&format!("{server}/{app_name}"), end).await? {
            lines.push(Line {
                name: format!("{app_name} on {server}"),
                detail: format!("{n} crashes in the last minute"),
                link: process_link(outbox, &server, &app_name),
            });
            items.push(json!({"server": server, "app": app_name, "restarts": n}));
        }
    }
    let bucket = &outbox.bucket.name;
    let what = counted(lines.len(), "app", "apps");
    let words = (
        format!("[{bucket}] {what} restarting in a loop"),
        format!("In {bucket}, {what} keep crashing and restarting."),
    );
    outbox
        .send_lines("restart_loop", words, lines, items, "")
        .await
}

/// Custom events of `[start, end)` the bucket subscribed to, at most [`MAX_TOLD_EVENTS`]
/// a pass, in one notification.
async fn custom_events(outbox: &Outbox<'_>, start: i64, end: i64) -> StoreResult<()> {
    let names = outbox.settings.custom_events();
    if names.is_empty() {
        return Ok(());
    }
    let window = EventQuery {
        bucket_id: outbox.bucket.id.clone(),
        event_type: Some("human:event".into()),
        after: Some(start - 1),
        before: Some(end),
        limit: MAX_TOLD_EVENTS,
        ..EventQuery::default()
    };
    let (mut lines, mut items) = (Vec::new(), Vec::new());
    for doc in outbox.app.events.query(EventKind::Event, &window).await? {
        let Ok(event) = serde_json::from_str::<Value>(&doc) else {
            continue;
        };
        let name = event["name"].as_str().unwrap_or_default();
        if !names.contains(&name) {
            continue;
        }
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let (server, app_name) = (text(&event["server_name"]), text(&event["app_name"]));
        let data: String = event["data"].to_string().chars().take(200).collect();
        lines.push(Line {
            name: format!("{name} from {app_name} on {server}"),
            detail: data,
            link: process_link(outbox, &server, &app_name),
        });
        items.push(json!({"server": server, "app": app_name, "name": name, "data": event["data"], "at": event["at"]}));
    }
    let bucket = &outbox.bucket.name;
    let words = match items.as_slice() {
        [one] => (
            format!("[{bucket}] Custom event {}", text_of(&one["name"])),
            format!(
                "In {bucket}, {} sent the custom event {}.",
                text_of(&one["app"]),
                text_of(&one["name"])
            ),
        ),
        _ => (
            format!("[{bucket}] {} custom events", items.len()),
            format!("In {bucket}, apps sent custom events you subscribed to."),
        ),
    };
    outbox
        .send_lines("custom_event", words, lines, items, "")
        .await
}

fn text_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Apps whose revision (pm2's versioning) changed since the last pass; an app seen the
/// first time is only remembered.
async fn deployments(outbox: &Outbox<'_>, servers: &[ServerStatus]) -> StoreResult<()> {
    let mut current: BTreeMap<String, (String, String, String)> = BTreeMap::new();
    for server in servers {
        for p in &server.data.process {
            let revision = p.revision();
            if let Some(revision) = revision {
                let key = format!("{}/{}", server.server_name, p.name);
                let value = (
                    server.server_name.clone(),
                    p.name.clone(),
                    revision.to_string(),
                );
                current.insert(key, value);
            }
        }
    }
    if current.is_empty() {
        return Ok(());
    }
    let documents = outbox.app.documents.as_ref();
    let bucket_id = &outbox.bucket.id;
    let known: BTreeMap<String, String> = documents
        .bucket_docs(bucket_id, REVISIONS)
        .await?
        .into_iter()
        .filter_map(|(key, doc)| Some((key, serde_json::from_str(&doc).ok()?)))
        .collect();
    let (mut lines, mut items) = (Vec::new(), Vec::new());
    for (key, (server, app_name, revision)) in current {
        let before = known.get(&key);
        if before == Some(&revision) {
            continue;
        }
        documents
            .put_bucket_doc(bucket_id, REVISIONS, &key, &revision)
            .await?;
        let Some(before) = before else { continue };
        lines.push(Line {
            name: format!("{app_name} on {server}"),
            detail: format!("revision {} → {}", short(before), short(&revision)),
            link: process_link(outbox, &server, &app_name),
        });
        items.push(json!({"server": server, "app": app_name, "from": before, "to": revision}));
    }
    let bucket = &outbox.bucket.name;
    let what = counted(lines.len(), "app", "apps");
    let words = (
        format!("[{bucket}] {what} deployed"),
        format!("In {bucket}, {what} now run a new revision."),
    );
    outbox
        .send_lines("deployment", words, lines, items, "")
        .await
}

fn short(revision: &str) -> &str {
    revision.get(..8).unwrap_or(revision)
}
