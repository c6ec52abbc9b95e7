//! `/api/bucket/:id/alerts`: alert rules (see [`km_workers::alerts`]), a test notification
//! of one, and the bucket's channels: Slack, the signed webhook, and which kinds of
//! notification are sent (`triggers`). Members read; developers manage rules (their
//! actions command agents); admins set the channels. Also the reports
//! ([`km_workers::reporter`]): read, sent now, and each member's choice.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Body;
use super::buckets::BucketAccess;
use crate::error::{ApiError, ApiResult};
use km_core::app::AppState;
use km_stores::MemberRole;
use km_stores::ids::now_ms;
use km_workers::alerts::{self, Alert, AlertForm};
use km_workers::notify::Outbox;
use km_workers::notify::channels::{
    CUSTOM_EVENT, HookForm, Hooks, MAX_CUSTOM_EVENTS, MAX_EVENT_NAME_CHARS, Settings,
};
use km_workers::notify::choices;
use km_workers::reporter::{self, Period};

async fn rule_json(app: &AppState, alert: &Alert) -> ApiResult<Value> {
    let mut v = json!(alert);
    v["firing"] = Value::Array(alerts::firing(app.documents.as_ref(), alert).await?);
    Ok(v)
}

async fn rule(app: &AppState, access: &BucketAccess, id: &str) -> ApiResult<Alert> {
    alerts::find(app, &access.bucket.id, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no alert {id:?} in this bucket")))
}

/// A stored rule, to change: one declared in code is changed in the app.
async fn stored_rule(app: &AppState, access: &BucketAccess, id: &str) -> ApiResult<Alert> {
    let alert = rule(app, access, id).await?;
    if alert.from_code {
        return Err(ApiError::bad_request(format!(
            "the alert {:?} is declared in the code of the app {} (the alert of its metric {}): change it there",
            alert.name,
            alert.scope.apps.join(", "),
            alert.initiator
        )));
    }
    Ok(alert)
}

/// `GET /api/bucket/:id/alerts`: every rule (those declared in the apps' code with
/// `from_code: true`), with where it fires now.
pub async fn list(State(app): State<AppState>, access: BucketAccess) -> ApiResult<Json<Value>> {
    let mut out = Vec::new();
    for alert in alerts::all(&app, &access.bucket.id).await?.0 {
        out.push(rule_json(&app, &alert).await?);
    }
    Ok(Json(Value::Array(out)))
}

/// `POST /api/bucket/:id/alerts`.
pub async fn create(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<AlertForm>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Developer, "create alerts")?;
    let alert = form
        .create(&access.bucket.id)
        .map_err(ApiError::bad_request)?;
    alerts::save(app.documents.as_ref(), &alert).await?;
    Ok(Json(rule_json(&app, &alert).await?))
}

/// `GET /api/bucket/:id/alerts/:alert`.
pub async fn retrieve(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let alert = rule(&app, &access, &id).await?;
    Ok(Json(rule_json(&app, &alert).await?))
}

/// `PUT /api/bucket/:id/alerts/:alert`: the fields given change.
pub async fn update(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, id)): Path<(String, String)>,
    Body(form): Body<AlertForm>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Developer, "change alerts")?;
    let mut alert = stored_rule(&app, &access, &id).await?;
    form.apply(&mut alert).map_err(ApiError::bad_request)?;
    alerts::save(app.documents.as_ref(), &alert).await?;
    Ok(Json(rule_json(&app, &alert).await?))
}

/// `DELETE /api/bucket/:id/alerts/:alert`.
pub async fn delete(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Developer, "delete alerts")?;
    stored_rule(&app, &access, &id).await?;
    if !alerts::delete(app.documents.as_ref(), &access.bucket.id, &id).await? {
        return Err(ApiError::not_found(format!(
            "no alert {id:?} in this bucket"
        )));
    }
    Ok(Json(json!({ "success": true })))
}

/// `POST /api/bucket/:id/alerts/:alert/sample`: a test notification through every
/// channel (delivered by the workers within 10 s); answers the channels.
pub async fn sample(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Developer, "test alerts")?;
    let alert = rule(&app, &access, &id).await?;
    let outbox = Outbox::of(&app, &access.bucket).await?;
    let channels = alerts::sample(&outbox, &alert).await?;
    if channels.is_empty() {
        return Err(ApiError::bad_request(
            "no channel: mail is not set up (SMTP_HOST) or no member receives it, and Slack and the webhook are off (or alert_sample is turned off in triggers)",
        ));
    }
    Ok(Json(json!({ "success": true, "channels": channels })))
}

/// The bucket's channels as admins see them (the webhook's secret included).
fn channels_json(settings: &Settings) -> Value {
    json!({
        "slack": settings.hooks.slack,
        "webhooks": settings.hooks.webhooks,
        "triggers": settings.triggers,
    })
}

async fn admin_settings(app: &AppState, access: &BucketAccess) -> ApiResult<Settings> {
    access.require(MemberRole::Admin, "change the bucket's channels")?;
    Ok(Settings::load(app.documents.as_ref(), &access.bucket.id).await?)
}

#[derive(Deserialize)]
pub struct SlackForm {
    slack: HookForm,
}

/// `POST /api/bucket/:id/alerts/updateSlack` `{slack: {active, url}}`.
pub async fn update_slack(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<SlackForm>,
) -> ApiResult<Json<Value>> {
    set_hook(&app, &access, |hooks| hooks.set_slack(&form.slack)).await
}

#[derive(Deserialize)]
pub struct WebhooksForm {
    webhooks: HookForm,
}

/// `POST /api/bucket/:id/alerts/updateWebhooks` `{webhooks: {active, url,
/// rotate_secret}}`: answers the channels with the webhook's signing secret.
pub async fn update_webhooks(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<WebhooksForm>,
) -> ApiResult<Json<Value>> {
    set_hook(&app, &access, |hooks| hooks.set_webhook(&form.webhooks)).await
}

/// Changes the bucket's hooks (admins), saves them, answers the channels.
async fn set_hook(
    app: &AppState,
    access: &BucketAccess,
    change: impl FnOnce(&mut Hooks) -> Result<(), String>,
) -> ApiResult<Json<Value>> {
    let mut settings = admin_settings(app, access).await?;
    change(&mut settings.hooks).map_err(ApiError::bad_request)?;
    settings
        .save_hooks(app.documents.as_ref(), &access.bucket.id)
        .await?;
    Ok(Json(channels_json(&settings)))
}

#[derive(Deserialize)]
pub struct TriggersForm {
    triggers: Value,
}

/// `POST /api/bucket/:id/alerts/update` `{triggers: {kind: bool}}`: turns kinds of
/// notification off (or on again); kinds not named keep their state. A key
/// `custom_event:<name>` subscribes to (true) or leaves (false) a custom event.
pub async fn update_triggers(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<TriggersForm>,
) -> ApiResult<Json<Value>> {
    let mut settings = admin_settings(&app, &access).await?;
    let Value::Object(changes) = form.triggers else {
        return Err(ApiError::bad_request(
            "triggers: an object of kind: true|false",
        ));
    };
    for (kind, on) in changes {
        let Some(on) = on.as_bool() else {
            return Err(ApiError::bad_request(format!(
                "triggers.{kind}: true or false"
            )));
        };
        let name = kind.strip_prefix(CUSTOM_EVENT).unwrap_or_default();
        if name.chars().count() > MAX_EVENT_NAME_CHARS {
            return Err(ApiError::bad_request(format!(
                "triggers: a custom event's name is at most {MAX_EVENT_NAME_CHARS} characters"
            )));
        }
        settings.triggers[kind] = on.into();
    }
    if settings.custom_events().len() > MAX_CUSTOM_EVENTS {
        return Err(ApiError::bad_request(format!(
            "triggers: at most {MAX_CUSTOM_EVENTS} custom events are subscribed to (set some to false)"
        )));
    }
    settings
        .save_triggers(app.documents.as_ref(), &access.bucket.id)
        .await?;
    Ok(Json(channels_json(&settings)))
}

/// `GET /api/bucket/:id/alerts/channels`: the channels (admins: with the secret).
pub async fn channels(State(app): State<AppState>, access: BucketAccess) -> ApiResult<Json<Value>> {
    let settings = Settings::load(app.documents.as_ref(), &access.bucket.id).await?;
    let mut v = channels_json(&settings);
    if !access.role.includes(MemberRole::Admin) {
        v["webhooks"]["secret"] = Value::Null;
        v["slack"]["url"] = Value::Null;
    }
    Ok(Json(v))
}

#[derive(Deserialize)]
pub struct ReportQuery {
    /// The period's end (epoch ms); now by default.
    at: Option<i64>,
}

fn period_of(s: &str) -> ApiResult<Period> {
    Period::parse(s)
        .ok_or_else(|| ApiError::not_found(format!("no {s:?} report (daily or weekly)")))
}

/// `GET /api/bucket/:id/reports/:period?at=<ms>`: the report of the period that ends at
/// `at`, as the digest mail shows it.
pub async fn report(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, period)): Path<(String, String)>,
    Query(q): Query<ReportQuery>,
) -> ApiResult<Json<Value>> {
    let period = period_of(&period)?;
    let end = q.at.unwrap_or_else(now_ms);
    Ok(Json(json!(
        reporter::build(&app, &access.bucket, period, end).await?
    )))
}

/// `POST /api/bucket/:id/reports/:period/send {at}`: mails the report now to the members
/// who chose it (admins); answers how many.
pub async fn send_report(
    State(app): State<AppState>,
    access: BucketAccess,
    Path((_, period)): Path<(String, String)>,
    Body(q): Body<ReportQuery>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Admin, "send reports")?;
    if app.settings.smtp.is_none() {
        return Err(ApiError::bad_request(
            "mail is not set up: SMTP_HOST is not set in the appliance's settings",
        ));
    }
    let period = period_of(&period)?;
    let end = q.at.unwrap_or_else(now_ms);
    let recipients = reporter::send(&app, &access.bucket, period, end).await?;
    Ok(Json(json!({ "recipients": recipients })))
}

/// `POST /api/bucket/:id/reports/choice {daily, weekly}`: which reports the calling
/// member receives (fields not given keep their value); answers the choice.
pub async fn report_choice(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<ChoiceForm>,
) -> ApiResult<Json<Value>> {
    let documents = app.documents.as_ref();
    let (bucket, user) = (&access.bucket.id, &access.auth.user.id);
    let mut choice = choices::of(documents, bucket, user).await?;
    choice.daily = form.daily.unwrap_or(choice.daily);
    choice.weekly = form.weekly.unwrap_or(choice.weekly);
    choices::save(documents, bucket, user, &choice).await?;
    Ok(Json(
        json!({"daily": choice.daily, "weekly": choice.weekly}),
    ))
}

#[derive(Deserialize, Default)]
pub struct ChoiceForm {
    pub daily: Option<bool>,
    pub weekly: Option<bool>,
}
