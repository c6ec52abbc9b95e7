//! Notifications (the seeds' notification service), run by the workers role. Every 10 s
//! one node of the cluster (see [`crate::schedule`]) looks at each bucket:
//! - new issues: the exceptions stored in the window that closed 10 s before (the writer
//!   batches, so a window is read once it is complete); an issue never seen before that
//!   window is new. A bucket's new issues of one window make one notification (a burst
//!   of 500 says 500).
//! - servers that sent nothing for 90 s (offline), and those back after that. Each change
//!   is claimed once in the documents store (`claim_slot` keyed by the server and the
//!   time it went silent), so it is told once whichever node looks.
//!
//! Notifications are mailed with text and HTML parts to the bucket's owner and admins,
//! with links to the dashboard.
//! A delivery that fails is tried again after 30 s, 1, 2 and 4 minutes, then marked
//! failed; `POST /api/bucket/:id/data/notifications` lists each with its state.

use std::collections::HashMap;
use std::time::Duration;

use askama::Template;
use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncTransport, Message};

use crate::api::data;
use crate::api::insights::{self, Issue};
use crate::app::{App, AppState};
use crate::ids::{new_object_id, now_ms};
use crate::schedule;
use crate::setup::checks::smtp_transport;
use crate::stores::{
    Bucket, EventKind, EventQuery, Member, Notification, NotificationState, StoreResult,
};

const PERIOD: Duration = Duration::from_secs(10);
/// A server silent this long is offline.
const OFFLINE_AFTER_MS: i64 = 90_000;
/// Servers silent longer than this went away before anyone watched: not told.
const RECENT_MS: i64 = 600_000;
/// Agents reconnect after km starts: servers are not judged before this.
const SETTLE_MS: i64 = 60_000;
const PERIOD_MS: i64 = 10_000;
const MAX_ATTEMPTS: u32 = 5;
const FIRST_RETRY_MS: i64 = 30_000;
/// Issues named in one mail; the count covers them all.
const LISTED: usize = 20;

pub async fn run(app: AppState) {
    let (documents, shutdown) = (app.documents.clone(), app.shutdown.clone());
    let started = now_ms();
    schedule::every(documents, shutdown, "notify", PERIOD, |slot| {
        pass(&app, slot, now_ms() - started >= SETTLE_MS)
    })
    .await;
}

/// One period: the new issues of the window that closed a period ago, then every
/// delivery due.
async fn pass(app: &App, slot: i64, settled: bool) {
    let end = slot * PERIOD_MS - PERIOD_MS;
    match app.documents.all_buckets().await {
        Ok(buckets) => {
            for bucket in buckets {
                if let Err(e) = notify_new_issues(app, &bucket, end - PERIOD_MS, end).await {
                    tracing::warn!(bucket = %bucket.id, error = %e, "new issues not checked");
                }
                if settled && let Err(e) = notify_servers(app, &bucket).await {
                    tracing::warn!(bucket = %bucket.id, error = %e, "servers not checked");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "notifications: cannot list the buckets"),
    }
    deliver_due(app).await;
}

/// The issues of `[start, end)` in `bucket` that had no occurrence before `start`.
async fn new_issues(app: &App, bucket: &Bucket, start: i64, end: i64) -> StoreResult<Vec<Issue>> {
    let window = EventQuery {
        bucket_id: bucket.id.clone(),
        after: Some(start - 1),
        before: Some(end),
        ..EventQuery::default()
    };
    let mut new = Vec::new();
    for issue in insights::issues(app.events.as_ref(), window).await? {
        let earlier = EventQuery {
            bucket_id: bucket.id.clone(),
            name: Some(issue.identifier.clone()),
            before: Some(start),
            limit: 1,
            ..EventQuery::default()
        };
        if app
            .events
            .query(EventKind::Exception, &earlier)
            .await?
            .is_empty()
        {
            new.push(issue);
        }
    }
    Ok(new)
}

async fn notify_new_issues(app: &App, bucket: &Bucket, start: i64, end: i64) -> StoreResult<()> {
    let issues = new_issues(app, bucket, start, end).await?;
    if issues.is_empty() {
        return Ok(());
    }
    let count = issues.iter().map(|i| i.count).sum();
    let mail = NewIssues::of(app, bucket, &issues);
    let subject = match issues.as_slice() {
        [one] => format!("[{}] New issue: {}", bucket.name, one.message),
        many => format!("[{}] {} new issues", bucket.name, many.len()),
    };
    tracing::info!(bucket = %bucket.id, issues = issues.len(), occurrences = count, "new issues: notification queued");
    let parts = (mail.text(), mail.html());
    queue(app, bucket, "new_issue", subject, parts, count).await
}

/// Servers gone silent for 90 s, and those back since, each told once.
async fn notify_servers(app: &App, bucket: &Bucket) -> StoreResult<()> {
    #[derive(serde::Deserialize)]
    struct Head {
        server_name: String,
        last_update: i64,
    }
    let offline_prefix = format!("offline:{}:", bucket.id);
    let online_prefix = format!("online:{}:", bucket.id);
    let latest = |prefix: String| async move {
        app.documents
            .latest_slots(&prefix)
            .await
            .map(|slots| slots.into_iter().collect::<HashMap<String, i64>>())
    };
    let told_offline = latest(offline_prefix.clone()).await?;
    let told_online = latest(online_prefix.clone()).await?;
    let now = now_ms();
    let (mut gone, mut back) = (Vec::new(), Vec::new());
    for view in data::servers_status(app, &bucket.id, None).await {
        let Ok(server) = serde_json::from_str::<Head>(&view) else {
            continue;
        };
        let silent = now - server.last_update;
        let offline_job = format!("{offline_prefix}{}", server.server_name);
        let online_job = format!("{online_prefix}{}", server.server_name);
        if silent > OFFLINE_AFTER_MS {
            if silent < RECENT_MS
                && app
                    .documents
                    .claim_slot(&offline_job, server.last_update)
                    .await?
            {
                gone.push((server.server_name, server.last_update));
            }
        } else if let Some(&since) = told_offline.get(&offline_job)
            && told_online.get(&online_job) != Some(&since)
            && app.documents.claim_slot(&online_job, since).await?
        {
            back.push((server.server_name, since));
        }
    }
    let link = format!("{}/buckets/{}", app.public_url, bucket.id);
    let lines = |servers: Vec<(String, i64)>, detail: &str| -> Vec<ServerLine> {
        servers
            .into_iter()
            .map(|(name, at)| ServerLine {
                name,
                detail: detail.replace("{at}", &clock(at)),
                link: link.clone(),
            })
            .collect()
    };
    // (kind, servers, state for the subject, the rest of the heading, each line)
    for (kind, servers, state, more, detail) in [
        (
            "server_offline",
            gone,
            "offline",
            ": no data for more than 90 s",
            "no data since {at} UTC",
        ),
        (
            "server_online",
            back,
            "back online",
            "",
            "sending data again (silent since {at} UTC)",
        ),
    ] {
        if servers.is_empty() {
            continue;
        }
        let n = servers.len();
        let plural = if n == 1 { "server" } else { "servers" };
        let subject = format!("[{}] {n} {plural} {state}", bucket.name);
        let mail = Servers {
            bucket: bucket.name.clone(),
            heading: format!("In {}, {n} {plural} {state}{more}.", bucket.name),
            servers: lines(servers, detail),
        };
        tracing::info!(bucket = %bucket.id, servers = n, kind, "servers: notification queued");
        queue(app, bucket, kind, subject, mail.parts(), n as u64).await?;
    }
    Ok(())
}

/// `HH:MM:SS` of an epoch ms.
fn clock(ms: i64) -> String {
    let s = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Stores a notification for the bucket's owner and admins, to be mailed.
async fn queue(
    app: &App,
    bucket: &Bucket,
    kind: &str,
    subject: String,
    (text, html): (String, String),
    count: u64,
) -> StoreResult<()> {
    let recipients = app
        .documents
        .bucket_members(&bucket.id)
        .await?
        .into_iter()
        .filter(Member::receives_mail)
        .map(|m| m.email)
        .collect();
    let now = now_ms();
    let notification = Notification {
        id: new_object_id(),
        bucket_id: bucket.id.clone(),
        kind: kind.into(),
        created_at: now,
        subject: subject.chars().take(200).collect(),
        text,
        html,
        count,
        recipients,
        state: NotificationState::Pending,
        attempts: 0,
        next_attempt_at: now,
        last_error: None,
        sent_at: None,
    };
    app.documents.save_notification(&notification).await
}

#[derive(Template)]
#[template(path = "mail/servers.txt")]
struct Servers {
    bucket: String,
    heading: String,
    servers: Vec<ServerLine>,
}

#[derive(Template)]
#[template(path = "mail/servers.html")]
struct ServersHtml<'a> {
    bucket: &'a str,
    heading: &'a str,
    servers: &'a [ServerLine],
}

struct ServerLine {
    name: String,
    detail: String,
    link: String,
}

impl Servers {
    fn parts(&self) -> (String, String) {
        let html = ServersHtml {
            bucket: &self.bucket,
            heading: &self.heading,
            servers: &self.servers,
        };
        (
            self.render().unwrap_or_default(),
            html.render().unwrap_or_default(),
        )
    }
}

/// The facts both parts of a mail show.
#[derive(Template)]
#[template(path = "mail/new_issues.txt")]
struct NewIssues {
    bucket: String,
    issues: Vec<IssueLine>,
}

#[derive(Template)]
#[template(path = "mail/new_issues.html")]
struct NewIssuesHtml<'a> {
    bucket: &'a str,
    issues: &'a [IssueLine],
}

struct IssueLine {
    app: String,
    message: String,
    count: u64,
    servers: String,
    callsite: String,
    link: String,
}

impl NewIssues {
    fn of(app: &App, bucket: &Bucket, issues: &[Issue]) -> NewIssues {
        let line = |i: &Issue| {
            let app_name = i.app_name.clone().unwrap_or_default();
            let server = i.servers.first().cloned().unwrap_or_default();
            IssueLine {
                link: format!(
                    "{}/buckets/{}/servers/{}/apps/{}",
                    app.public_url,
                    bucket.id,
                    urlencode(&server),
                    urlencode(&app_name)
                ),
                app: app_name,
                message: i.message.chars().take(300).collect(),
                count: i.count,
                servers: i.servers.join(", "),
                callsite: i.callsite.clone().unwrap_or_default(),
            }
        };
        NewIssues {
            bucket: bucket.name.clone(),
            issues: issues.iter().take(LISTED).map(line).collect(),
        }
    }

    fn text(&self) -> String {
        self.render().unwrap_or_default()
    }

    fn html(&self) -> String {
        NewIssuesHtml {
            bucket: &self.bucket,
            issues: &self.issues,
        }
        .render()
        .unwrap_or_default()
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Tries every due delivery once; records the outcome.
async fn deliver_due(app: &App) {
    let due = match app.documents.due_notifications(now_ms(), 100).await {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(error = %e, "notifications: cannot read the due ones");
            return;
        }
    };
    for mut n in due {
        let outcome = send(app, &n).await;
        n.attempts += 1;
        match outcome {
            Ok(()) => {
                n.state = NotificationState::Sent;
                n.sent_at = Some(now_ms());
                n.last_error = None;
            }
            Err(e) => {
                tracing::warn!(notification = %n.id, attempt = n.attempts, error = %e, "notification not delivered");
                n.last_error = Some(e);
                if n.attempts >= MAX_ATTEMPTS {
                    n.state = NotificationState::Failed;
                } else {
                    n.state = NotificationState::Retrying;
                    n.next_attempt_at = now_ms() + FIRST_RETRY_MS * (1 << (n.attempts - 1));
                }
            }
        }
        if let Err(e) = app.documents.save_notification(&n).await {
            tracing::error!(notification = %n.id, error = %e, "notification state not saved");
        }
    }
}

/// Mails the notification to each recipient (text and HTML parts).
async fn send(app: &App, n: &Notification) -> Result<(), String> {
    let smtp = app
        .settings
        .smtp
        .as_ref()
        .ok_or("SMTP_HOST is not set: no mail can be sent")?;
    if n.recipients.is_empty() {
        return Err("the bucket has no owner or admin with an email".into());
    }
    let from: Mailbox = smtp
        .sender
        .parse()
        .map_err(|e| format!("SMTP_SENDER {:?}: {e}", smtp.sender))?;
    let transport = smtp_transport(smtp, None)?;
    for to in &n.recipients {
        let to: Mailbox = to.parse().map_err(|e| format!("recipient {to:?}: {e}"))?;
        let mail = Message::builder()
            .from(from.clone())
            .to(to)
            .subject(&n.subject)
            .multipart(MultiPart::alternative_plain_html(
                n.text.clone(),
                n.html.clone(),
            ))
            .map_err(|e| format!("cannot build the mail: {e}"))?;
        transport
            .send(mail)
            .await
            .map_err(|e| format!("{}:{}: {e}", smtp.host, smtp.port))?;
    }
    Ok(())
}
