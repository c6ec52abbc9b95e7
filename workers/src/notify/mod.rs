//! Notifications (the seeds' notification service), run by the workers role. Every 10 s
//! one node of the cluster (see [`km_core::schedule`]) looks at each bucket ([`watch`]):
//! new issues, servers offline and back, processes errored or restarting in a loop,
//! deployments, and the bucket's alert rules ([`crate::alerts`]). Each is one
//! notification per bucket and pass however many things it covers (a burst of 500
//! exceptions says 500), and each change is claimed once in the documents store
//! ([`km_core::schedule::Episodes`]), so it is told once whichever node looks.
//!
//! A notification goes to every channel of the bucket ([`channels`]): mail (text and
//! HTML, to the members who receive notifications and did not mute its kind:
//! [`choices`]), Slack, and a signed webhook. Each
//! channel's delivery is its own record: a failed one is tried again after 30 s, 1, 2
//! and 4 minutes, then marked failed; `POST /api/bucket/:id/data/notifications` lists
//! them with their state.
//!
//! The webhook's body (also `payload` in that list):
//! `{"event", "type", "bucket": {"id", "name"}, "at", "subject", "count", "link", "items"}`
//! where `event` is shared by the deliveries of one notification and `items` depends on
//! `type` (see each kind in [`watch`] and [`crate::alerts`]).
//! A webhook set to the Keymetrics format gets one body per item instead ([`keymetrics`]).

pub mod channels;
pub mod choices;
pub mod keymetrics;
pub mod watch;

use std::collections::HashMap;
use std::time::Duration;

use askama::Template;
use serde_json::{Value, json};

use channels::{HookFormat, Hooks, Poster, Settings};
use km_core::app::{App, AppState, Delivery};
use km_core::mail;
use km_core::schedule;
use km_stores::ids::{new_object_id, now_ms};
use km_stores::{Bucket, Channel, Notification, NotificationState, StoreResult};

const PERIOD: Duration = Duration::from_secs(10);
pub const PERIOD_MS: i64 = 10_000;
/// Agents reconnect after km starts: servers are not judged before this.
const SETTLE_MS: i64 = 60_000;
const MAX_ATTEMPTS: u32 = 5;
/// The end of the last window of events looked at (a claimed slot).
const WINDOW_JOB: &str = "notify-window";
/// How far back a pass reaches after passes were skipped.
const MAX_CATCH_UP_MS: i64 = 60_000;
const FIRST_RETRY_MS: i64 = 30_000;

pub async fn run(app: AppState) {
    let (documents, shutdown) = (app.documents.clone(), app.shutdown.clone());
    let started = now_ms();
    let poster = Poster::default();
    schedule::every(documents, shutdown, "notify", PERIOD, |slot| {
        pass(&app, &poster, slot, now_ms() - started >= SETTLE_MS)
    })
    .await;
}

/// One period: every bucket looked at, then every delivery due. The events read are
/// those of the window since the last pass (by any node) up to a period ago (the writer
/// batches), at most a minute: a pass that a loaded or restarted node skipped loses
/// nothing.
async fn pass(app: &App, poster: &Poster, slot: i64, settled: bool) {
    let end = slot * PERIOD_MS - PERIOD_MS;
    let start = match app.documents.latest_slots(WINDOW_JOB).await {
        Ok(done) => done
            .into_iter()
            .find(|(job, _)| job == WINDOW_JOB)
            .map_or(end - PERIOD_MS, |(_, last_end)| last_end),
        Err(e) => {
            tracing::warn!(error = %e, "notifications: cannot read the last window");
            end - PERIOD_MS
        }
    }
    .clamp(end - MAX_CATCH_UP_MS, end);
    match app.documents.all_buckets().await {
        Ok(buckets) => {
            for bucket in buckets {
                if let Err(e) = watch::bucket(app, &bucket, start..end, settled).await {
                    tracing::warn!(bucket = %bucket.id, error = %e, "bucket not checked for notifications");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "notifications: cannot list the buckets"),
    }
    if let Err(e) = app.documents.claim_slot(WINDOW_JOB, end).await {
        tracing::warn!(error = %e, "notifications: cannot record the window");
    }
    deliver_due(app, poster).await;
}

/// What happened, in the words of every channel.
pub struct Event {
    /// `new_issue`, `server_offline`, `alert_fired`, …
    pub kind: &'static str,
    pub subject: String,
    /// The mail's parts.
    pub text: String,
    pub html: String,
    pub count: u64,
    /// The webhook's `items`.
    pub items: Vec<Value>,
    /// Where to look in the dashboard.
    pub link: String,
}

/// A bucket's outgoing notifications during one pass: its channel settings, read once.
pub struct Outbox<'a> {
    pub app: &'a App,
    pub bucket: &'a Bucket,
    pub settings: Settings,
}

impl<'a> Outbox<'a> {
    pub async fn of(app: &'a App, bucket: &'a Bucket) -> StoreResult<Outbox<'a>> {
        let settings = Settings::load(app.documents.as_ref(), &bucket.id).await?;
        Ok(Outbox {
            app,
            bucket,
            settings,
        })
    }

    /// The bucket's page in the dashboard, or a page under it.
    pub fn link(&self, path: &str) -> String {
        format!("{}/buckets/{}{path}", self.app.public_url, self.bucket.id)
    }

    /// Queues `event` once per channel of the bucket, unless its kind is turned off;
    /// returns the channels it went to.
    pub async fn send(&self, event: Event) -> StoreResult<Vec<Channel>> {
        if !self.settings.kind_on(event.kind) {
            return Ok(Vec::new());
        }
        let documents = self.app.documents.as_ref();
        let chosen = choices::all(documents, &self.bucket.id).await?;
        let recipients: Vec<String> = documents
            .bucket_members(&self.bucket.id)
            .await?
            .into_iter()
            .filter(|m| {
                m.receives_mail()
                    && chosen
                        .get(&m.user_id)
                        .is_none_or(|c| c.receives(event.kind))
            })
            .map(|m| m.email)
            .collect();
        let hooks = &self.settings.hooks;
        let channels: Vec<Channel> = [
            // Without SMTP_HOST mail is not attempted, rather than failing every delivery.
            (
                Channel::Email,
                self.app.settings.smtp.is_some() && !recipients.is_empty(),
            ),
            (Channel::Slack, hooks.slack.active),
            (Channel::Webhook, hooks.webhooks.active),
        ]
        .into_iter()
        .filter_map(|(channel, on)| on.then_some(channel))
        .collect();
        self.queue(&event, &channels, recipients).await?;
        Ok(channels)
    }

    /// Sends a lines-mail of `kind` (with the same facts for the hooks) when there are
    /// lines; `path` is the dashboard page under the bucket it links to.
    pub async fn send_lines(
        &self,
        kind: &'static str,
        (subject, heading): (String, String),
        lines: Vec<Line>,
        items: Vec<Value>,
        path: &str,
    ) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mail = Lines {
            bucket: self.bucket.name.clone(),
            heading,
            lines,
        };
        let event = mail.event(kind, subject, items, self.link(path));
        self.send(event).await.map(drop)
    }

    /// Queues `event` as a mail to `recipients` only (reports).
    pub async fn mail(&self, event: Event, recipients: Vec<String>) -> StoreResult<()> {
        self.queue(&event, &[Channel::Email], recipients).await
    }

    /// One delivery record per channel, all carrying the same event id.
    async fn queue(
        &self,
        event: &Event,
        channels: &[Channel],
        recipients: Vec<String>,
    ) -> StoreResult<()> {
        let now = now_ms();
        let payload = json!({
            "event": new_object_id(), "type": event.kind,
            "bucket": {"id": self.bucket.id, "name": self.bucket.name},
            "at": now, "subject": event.subject, "count": event.count, "link": event.link,
            "items": event.items,
        });
        tracing::info!(bucket = %self.bucket.id, kind = event.kind, count = event.count, channels = channels.len(), "notification queued");
        for &channel in channels {
            let notification = Notification {
                id: new_object_id(),
                bucket_id: self.bucket.id.clone(),
                kind: event.kind.into(),
                channel,
                created_at: now,
                subject: event.subject.chars().take(200).collect(),
                text: event.text.clone(),
                html: event.html.clone(),
                count: event.count,
                recipients: if channel == Channel::Email {
                    recipients.clone()
                } else {
                    Vec::new()
                },
                payload: payload.clone(),
                state: NotificationState::Pending,
                attempts: 0,
                next_attempt_at: now,
                last_error: None,
                sent_at: None,
            };
            self.app.documents.save_notification(&notification).await?;
        }
        Ok(())
    }
}

/// A mail of lines under a heading: servers, processes, deployments, alerts.
#[derive(Template)]
#[template(path = "mail/lines.txt")]
pub struct Lines {
    pub bucket: String,
    pub heading: String,
    pub lines: Vec<Line>,
}

#[derive(Template)]
#[template(path = "mail/lines.html")]
struct LinesHtml<'a> {
    bucket: &'a str,
    heading: &'a str,
    lines: &'a [Line],
}

pub struct Line {
    pub name: String,
    pub detail: String,
    pub link: String,
}

impl Lines {
    /// The event of these lines: `subject`, both mail parts, the webhook's `items`.
    pub fn event(
        self,
        kind: &'static str,
        subject: String,
        items: Vec<Value>,
        link: String,
    ) -> Event {
        let html = LinesHtml {
            bucket: &self.bucket,
            heading: &self.heading,
            lines: &self.lines,
        }
        .render()
        .unwrap_or_default();
        Event {
            kind,
            subject,
            text: self.render().unwrap_or_default(),
            html,
            count: items.len() as u64,
            items,
            link,
        }
    }
}

/// Tries every due delivery once; records the outcome.
async fn deliver_due(app: &App, poster: &Poster) {
    let due = match app.documents.due_notifications(now_ms(), 100).await {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(error = %e, "notifications: cannot read the due ones");
            return;
        }
    };
    // Each bucket's hooks as they are now (they may have changed or been turned off
    // since the notification was queued), read once per pass.
    let mut hooks: HashMap<String, Result<Hooks, String>> = HashMap::new();
    for mut n in due {
        let outcome = match n.channel {
            Channel::Email => mail(app, &n).await,
            Channel::Slack | Channel::Webhook => {
                if !hooks.contains_key(&n.bucket_id) {
                    let loaded = Settings::load(app.documents.as_ref(), &n.bucket_id)
                        .await
                        .map(|s| s.hooks)
                        .map_err(|e| format!("cannot read the bucket's channels: {e}"));
                    hooks.insert(n.bucket_id.clone(), loaded);
                }
                match &hooks[&n.bucket_id] {
                    Ok(bucket_hooks) => post(poster, bucket_hooks, &n).await,
                    Err(e) => Err(e.clone()),
                }
            }
        };
        n.attempts += 1;
        match outcome {
            Ok(()) => {
                n.state = NotificationState::Sent;
                n.sent_at = Some(now_ms());
                n.last_error = None;
            }
            Err(e) => {
                tracing::warn!(notification = %n.id, channel = ?n.channel, attempt = n.attempts, error = %e, "notification not delivered");
                n.last_error = Some(e);
                if n.attempts >= MAX_ATTEMPTS {
                    n.state = NotificationState::Failed;
                } else {
                    n.state = NotificationState::Retrying;
                    n.next_attempt_at = now_ms() + FIRST_RETRY_MS * (1 << (n.attempts - 1));
                }
            }
        }
        let attempt = Delivery {
            channel: n.channel.as_str(),
            outcome: n.state.as_str(),
        };
        app.deliveries.get_or_create(&attempt).inc();
        if let Err(e) = app.documents.save_notification(&n).await {
            tracing::error!(notification = %n.id, error = %e, "notification state not saved");
        }
    }
}

/// Slack or the webhook, with the bucket's `hooks`.
async fn post(poster: &Poster, hooks: &Hooks, n: &Notification) -> Result<(), String> {
    match n.channel {
        Channel::Slack => {
            let link = n.payload["link"].as_str().unwrap_or_default();
            let text = format!("*{}*\n<{link}|Open in the dashboard>", n.subject);
            poster.slack(&hooks.slack, &text).await
        }
        _ => {
            let bodies = match hooks.webhooks.format {
                HookFormat::Km => vec![n.payload.to_string()],
                HookFormat::Keymetrics => keymetrics::bodies(&n.payload),
            };
            poster
                .webhook(&hooks.webhooks, &n.kind, &n.id, bodies)
                .await
        }
    }
}

/// Mails the notification to each recipient (text and HTML parts).
async fn mail(app: &App, n: &Notification) -> Result<(), String> {
    let letter = mail::Letter {
        subject: n.subject.clone(),
        text: n.text.clone(),
        html: n.html.clone(),
    };
    mail::send(app.settings.smtp.as_ref(), &n.recipients, &letter).await
}
