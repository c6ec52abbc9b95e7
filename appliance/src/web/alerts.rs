//! The bucket's alerts page (rules, channels, the member's own choices, the
//! notifications with their delivery) and its report page. Forms run the API routes of
//! the same purpose, with their checks.

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::buckets::{access, form_access};
use super::process::parse;
use super::{Flash, Flashes, Nav, WebSession, back, error_page, render};
use crate::api::Body;
use crate::api::alerts as api;
use crate::api::buckets::{self as buckets_api, BucketAccess};
use crate::error::ApiError;
use km_core::app::AppState;
use km_stores::ids::now_ms;
use km_stores::{Bucket, MemberRole, Notification, StoreError};
use km_workers::alerts::{self, Alert};
use km_workers::notify::channels::{CUSTOM_EVENT, HookFormat, Settings};
use km_workers::notify::choices::{self, Choices, KINDS};
use km_workers::reporter::{self, Period};

#[derive(Template)]
#[template(path = "alerts.html")]
struct AlertsPage {
    nav: Option<Nav>,
    bucket: Bucket,
    role: MemberRole,
    /// Each rule (stored, then declared in the apps' code) and where it fires.
    rules: Vec<(Alert, usize)>,
    /// Rules declared in code over [`alerts::MAX_CODE_RULES`], not judged.
    code_rules_ignored: usize,
    settings: Settings,
    /// `SMTP_HOST` is set: mail is a channel.
    mail_ready: bool,
    mailed: bool,
    /// The member's own choices, and every kind they can mute.
    mine: Choices,
    kinds: [(&'static str, &'static str); KINDS.len()],
    /// Each with its time, UTC.
    notifications: Vec<(String, Notification)>,
    flash: Flash,
}

async fn page_of(
    app: &AppState,
    session: &WebSession,
    access: BucketAccess,
    flash: Flash,
) -> Result<AlertsPage, StoreError> {
    let documents = app.documents.as_ref();
    let bucket_id = &access.bucket.id;
    let mut rules = Vec::new();
    let (all, code_rules_ignored) = alerts::all(app, bucket_id).await?;
    for rule in all {
        let firing = alerts::firing(documents, &rule).await?.len();
        rules.push((rule, firing));
    }
    let user = &session.auth.user.id;
    let mailed = documents
        .bucket_members(bucket_id)
        .await?
        .iter()
        .any(|m| &m.user_id == user && m.receives_mail());
    Ok(AlertsPage {
        nav: Some(Nav::from(session)),
        rules,
        code_rules_ignored,
        settings: Settings::load(documents, bucket_id).await?,
        mail_ready: app.settings.smtp.is_some(),
        mailed,
        mine: choices::of(documents, bucket_id, user).await?,
        kinds: KINDS,
        notifications: documents
            .notifications(bucket_id, 50)
            .await?
            .into_iter()
            .map(|n| (reporter::date_time(n.created_at), n))
            .collect(),
        role: access.role,
        bucket: access.bucket,
        flash,
    })
}

pub async fn page(
    State(app): State<AppState>,
    session: WebSession,
    Path(id): Path<String>,
    flash: Flashes,
) -> Response {
    let access = match access(&app, &session, &id).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    match page_of(&app, &session, access, flash.0).await {
        Ok(page) => render(&page),
        Err(e) => error_page(&e.into()),
    }
}

/// The forms' fields (each form sends some).
#[derive(Deserialize, Default)]
pub struct AlertsForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    metric: String,
    #[serde(default)]
    operator: String,
    #[serde(default)]
    threshold: String,
    #[serde(default)]
    timerange: String,
    #[serde(default)]
    aggregation: String,
    #[serde(default)]
    app: String,
    #[serde(default)]
    pm2_action: String,
    #[serde(default)]
    alert: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    active: String,
    /// The webhook's bodies: `km` or `keymetrics`.
    #[serde(default)]
    format: String,
    /// The custom events to be told of, comma-separated.
    #[serde(default)]
    events: String,
    #[serde(default)]
    daily: String,
    #[serde(default)]
    weekly: String,
    /// The kinds the member receives (each checked `kind_<kind>` box).
    #[serde(skip)]
    kinds: Vec<String>,
}

impl AlertsForm {
    /// The form from its fields in order (a field given twice: the last).
    fn of(fields: Vec<(String, String)>) -> AlertsForm {
        let kinds = fields
            .iter()
            .filter_map(|(name, _)| name.strip_prefix("kind_").map(str::to_string))
            .collect();
        let object: serde_json::Map<String, Value> = fields
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        let form: AlertsForm = serde_json::from_value(Value::Object(object)).unwrap_or_default();
        AlertsForm { kinds, ..form }
    }
}

impl AlertsForm {
    fn rule(&self) -> Result<alerts::AlertForm, ApiError> {
        let threshold: f64 = self.threshold.trim().parse().map_err(|_| {
            ApiError::bad_request(format!("threshold: {:?} is not a number", self.threshold))
        })?;
        let timerange: i64 = self.timerange.trim().parse().map_err(|_| {
            ApiError::bad_request(format!(
                "window: {:?} is not a number of seconds",
                self.timerange
            ))
        })?;
        let mut actions = vec![json!({"type": "notify"})];
        if !self.pm2_action.is_empty() {
            actions.push(json!({"type": "pm2_action", "params": {"method": self.pm2_action}}));
        }
        let apps: Vec<&str> = self
            .app
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        serde_json::from_value(json!({
            "name": self.name, "type": "metric", "initiator": self.metric,
            "options": {"operator": self.operator, "threshold": threshold, "timerange": timerange,
                        "aggregation": self.aggregation},
            "scope": {"apps": apps}, "actions": actions,
        }))
        .map_err(|e| ApiError::bad_request(e.to_string()))
    }

    /// The triggers that make the subscribed custom events those of the form: the new
    /// ones on, those left out off.
    async fn event_triggers(&self, app: &AppState, bucket_id: &str) -> Result<Value, ApiError> {
        let settings = Settings::load(app.documents.as_ref(), bucket_id).await?;
        let wanted: Vec<&str> = (self.events.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        let mut triggers = serde_json::Map::new();
        for old in settings.custom_events() {
            triggers.insert(format!("{CUSTOM_EVENT}{old}"), false.into());
        }
        for name in wanted {
            triggers.insert(format!("{CUSTOM_EVENT}{name}"), true.into());
        }
        Ok(Value::Object(triggers))
    }

    fn hook(&self) -> Value {
        json!({"active": self.active == "true", "url": self.url, "format": self.format})
    }
}

/// One form of the alerts page.
pub async fn action(
    State(app): State<AppState>,
    session: WebSession,
    Path((id, action)): Path<(String, String)>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let form = AlertsForm::of(fields);
    let access = match form_access(&app, &session, &id, &form.csrf).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let page = format!("/buckets/{id}/alerts");
    let state = State(app.clone());
    let alert_path = || Path((id.clone(), form.alert.clone()));
    let outcome: Result<String, ApiError> = match action.as_str() {
        "create" => match form.rule() {
            Ok(rule) => api::create(state, access, Body(rule))
                .await
                .map(|_| format!("alert {} created", form.name)),
            Err(e) => Err(e),
        },
        "delete" => api::delete(state, access, alert_path())
            .await
            .map(|_| "alert deleted".into()),
        "sample" => api::sample(state, access, alert_path())
            .await
            .map(|_| "test notification queued: it is delivered within 10 s".into()),
        "slack" => match parse(json!({"slack": form.hook()})) {
            Ok(body) => api::update_slack(state, access, Body(body))
                .await
                .map(|_| "Slack saved".into()),
            Err(e) => Err(e),
        },
        "webhook" => match parse(json!({"webhooks": form.hook()})) {
            Ok(body) => api::update_webhooks(state, access, Body(body))
                .await
                .map(|_| "webhook saved".into()),
            Err(e) => Err(e),
        },
        "events" => {
            let triggers = form.event_triggers(&app, &id).await;
            match triggers.and_then(|t| parse(json!({"triggers": t}))) {
                Ok(body) => api::update_triggers(state, access, Body(body))
                    .await
                    .map(|_| "custom events saved".into()),
                Err(e) => Err(e),
            }
        }
        "mine" => choose(&app, access, &session, &form)
            .await
            .map(|()| "your choices are saved".into()),
        _ => Err(ApiError::not_found("no such form")),
    };
    back(&page, outcome)
}

/// The member's own choices: notifications by mail, and reports.
async fn choose(
    app: &AppState,
    access: BucketAccess,
    session: &WebSession,
    form: &AlertsForm,
) -> Result<(), ApiError> {
    let choice = api::ChoiceForm {
        daily: Some(form.daily == "on"),
        weekly: Some(form.weekly == "on"),
    };
    let kinds: serde_json::Map<String, Value> = KINDS
        .iter()
        .map(|(kind, _)| {
            (
                kind.to_string(),
                form.kinds.iter().any(|k| k == kind).into(),
            )
        })
        .collect();
    let notify = buckets_api::NotifyForm {
        email: session.auth.user.email.clone(),
        state: if form.active == "on" { "email" } else { "none" }.into(),
        kinds: Some(kinds),
    };
    let _ = buckets_api::manage_notif(State(app.clone()), access.clone(), Body(notify)).await?;
    let _ = api::report_choice(State(app.clone()), access, Body(choice)).await?;
    Ok(())
}

#[derive(Template)]
#[template(path = "report.html")]
struct ReportPage {
    nav: Option<Nav>,
    bucket: Bucket,
    period: Period,
    report: String,
    flash: Flash,
}

#[derive(Deserialize)]
pub struct ReportQuery {
    period: Option<String>,
}

/// The bucket's daily or weekly report up to now.
pub async fn report(
    State(app): State<AppState>,
    session: WebSession,
    Path(id): Path<String>,
    Query(q): Query<ReportQuery>,
    flash: Flashes,
) -> Response {
    let access = match access(&app, &session, &id).await {
        Ok(access) => access,
        Err(page) => return page,
    };
    let period = q
        .period
        .as_deref()
        .and_then(Period::parse)
        .unwrap_or(Period::Daily);
    match reporter::build(&app, &access.bucket, period, now_ms()).await {
        Ok(report) => render(&ReportPage {
            nav: Some(Nav::from(&session)),
            report: report.html(false),
            bucket: access.bucket,
            period,
            flash: flash.0,
        }),
        Err(e) => error_page(&e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_keeps_its_checked_kinds() {
        let fields = [("csrf", "t"), ("daily", "on"), ("kind_new_issue", "on")];
        let form = AlertsForm::of(
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        assert_eq!((form.csrf.as_str(), form.daily.as_str()), ("t", "on"));
        assert_eq!(form.kinds, ["new_issue"]);
    }
}
