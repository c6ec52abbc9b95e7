//! Where a bucket's notifications go besides mail: a Slack incoming webhook and a generic
//! webhook. Their settings are a bucket document (kind `channels`); the webhook's body is
//! signed with a secret of the bucket:
//!
//! `X-KM-Signature: sha256=<hex of HMAC-SHA256(secret, "<X-KM-Timestamp>.<body>")>`
//!
//! so a receiver checks both the sender and the freshness of each delivery.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

use km_stores::ids::{now_ms, random_hex};
use km_stores::{Documents, StoreResult};

const KIND: &str = "channels";
const HOOKS: &str = "hooks";
const TRIGGERS: &str = "triggers";
const TIMEOUT: Duration = Duration::from_secs(10);
/// The prefix of a trigger subscribing to a custom event: `custom_event:<name>`.
pub const CUSTOM_EVENT: &str = "custom_event:";
/// Custom events a bucket may subscribe to.
pub const MAX_CUSTOM_EVENTS: usize = 50;
/// Characters of a custom event's name in a trigger.
pub const MAX_EVENT_NAME_CHARS: usize = 100;

/// One outgoing hook of a bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hook {
    #[serde(default)]
    pub active: bool,
    #[serde(default)]
    pub url: Option<String>,
    /// The webhook's signing secret (never sent to Slack; shown to admins only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The webhook's bodies: km's, or one per event in the Keymetrics shape.
    #[serde(default)]
    pub format: HookFormat,
}

/// The shape of the webhook's bodies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookFormat {
    /// One body per notification: `{event, type, bucket, at, subject, count, link, items}`.
    #[default]
    Km,
    /// One body per item, `{event: "event:<kind>", data}`, as Keymetrics posted them
    /// (see [`super::keymetrics`]).
    Keymetrics,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hooks {
    #[serde(default)]
    pub slack: Hook,
    #[serde(default)]
    pub webhooks: Hook,
}

/// A bucket's channel settings: its hooks and which kinds it sends.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub hooks: Hooks,
    /// `{kind: false}` turns a kind off (`POST /alerts/update {triggers}`); a kind not
    /// named is on.
    pub triggers: Value,
}

impl Settings {
    /// Both documents in one query.
    pub async fn load(documents: &dyn Documents, bucket_id: &str) -> StoreResult<Settings> {
        let mut settings = Settings {
            triggers: json!({}),
            ..Settings::default()
        };
        for (id, doc) in documents.bucket_docs(bucket_id, KIND).await? {
            match id.as_str() {
                HOOKS => settings.hooks = serde_json::from_str(&doc).unwrap_or_default(),
                TRIGGERS => settings.triggers = serde_json::from_str(&doc).unwrap_or(json!({})),
                _ => {}
            }
        }
        Ok(settings)
    }

    /// The custom events (`io.emit` names) the bucket is told of: the triggers
    /// `custom_event:<name>` set to true.
    pub fn custom_events(&self) -> Vec<&str> {
        (self.triggers.as_object().into_iter().flatten())
            .filter(|(_, on)| **on == Value::Bool(true))
            .filter_map(|(key, _)| key.strip_prefix(CUSTOM_EVENT))
            .collect()
    }

    pub fn kind_on(&self, kind: &str) -> bool {
        self.triggers
            .get(kind)
            .and_then(Value::as_bool)
            .unwrap_or(true)
    }

    pub async fn save_hooks(&self, documents: &dyn Documents, bucket_id: &str) -> StoreResult<()> {
        write(documents, bucket_id, HOOKS, &self.hooks).await
    }

    pub async fn save_triggers(
        &self,
        documents: &dyn Documents,
        bucket_id: &str,
    ) -> StoreResult<()> {
        write(documents, bucket_id, TRIGGERS, &self.triggers).await
    }
}

impl Hooks {
    /// Sets the Slack hook from an `updateSlack` form.
    pub fn set_slack(&mut self, form: &HookForm) -> Result<(), String> {
        self.slack = form.applied_to(&self.slack, "slack")?;
        Ok(())
    }

    /// Sets the webhook from an `updateWebhooks` form; the first activation (or
    /// `rotate_secret`) makes a new secret.
    pub fn set_webhook(&mut self, form: &HookForm) -> Result<(), String> {
        let mut hook = form.applied_to(&self.webhooks, "webhooks")?;
        match form.format.as_deref() {
            None | Some("") => {}
            Some("km") => hook.format = HookFormat::Km,
            Some("keymetrics") => hook.format = HookFormat::Keymetrics,
            Some(other) => {
                return Err(format!(
                    "webhooks.format: {other:?} is not km or keymetrics"
                ));
            }
        }
        if hook.secret.is_none() || form.rotate_secret == Some(true) {
            hook.secret = Some(random_hex(32));
        }
        self.webhooks = hook;
        Ok(())
    }
}

/// `{active, url, rotate_secret}` as `@pm2/js-api` sends it under `slack` or `webhooks`
/// (and the webhook's `format`: `km` or `keymetrics`).
#[derive(Debug, Default, Deserialize)]
pub struct HookForm {
    pub active: Option<bool>,
    pub url: Option<String>,
    pub rotate_secret: Option<bool>,
    pub format: Option<String>,
}

impl HookForm {
    fn applied_to(&self, current: &Hook, field: &str) -> Result<Hook, String> {
        let mut hook = current.clone();
        if let Some(url) = &self.url {
            let url = url.trim();
            hook.url = if url.is_empty() {
                None
            } else {
                Some(checked_url(url).map_err(|e| format!("{field}.url: {e}"))?)
            };
        }
        if let Some(active) = self.active {
            hook.active = active;
        }
        if hook.active && hook.url.is_none() {
            return Err(format!("{field}.url: needed when {field}.active is true"));
        }
        Ok(hook)
    }
}

fn checked_url(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err("an http:// or https:// address is needed".into());
    }
    Ok(parsed.to_string())
}

async fn write<T: Serialize>(
    documents: &dyn Documents,
    bucket_id: &str,
    id: &str,
    value: &T,
) -> StoreResult<()> {
    let doc = serde_json::to_string(value).unwrap_or_default();
    documents.put_bucket_doc(bucket_id, KIND, id, &doc).await
}

/// `sha256=<hex>` of `"<timestamp>.<body>"` under `secret`.
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(format!("{timestamp}.{body}").as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts to a hook; errors name the host only (a Slack URL holds its token).
pub struct Poster {
    http: reqwest::Client,
}

impl Default for Poster {
    fn default() -> Poster {
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("km/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Poster { http }
    }
}

impl Poster {
    /// Slack's incoming webhook: `{text}`.
    pub async fn slack(&self, hook: &Hook, text: &str) -> Result<(), String> {
        let url = active_url(hook, "Slack")?;
        let body = json!({ "text": text }).to_string();
        self.post(url, body, &[]).await
    }

    /// The generic webhook: each body in turn, signed (a failure stops the delivery,
    /// which is tried again whole).
    pub async fn webhook(
        &self,
        hook: &Hook,
        kind: &str,
        id: &str,
        bodies: Vec<String>,
    ) -> Result<(), String> {
        let url = active_url(hook, "the webhook")?;
        let secret = hook.secret.as_deref().unwrap_or_default();
        for body in bodies {
            let timestamp = now_ms() / 1000;
            let signature = signature(secret, timestamp, &body);
            let headers = [
                ("x-km-event", kind.to_string()),
                ("x-km-delivery", id.to_string()),
                ("x-km-timestamp", timestamp.to_string()),
                ("x-km-signature", signature),
            ];
            self.post(url, body, &headers).await?;
        }
        Ok(())
    }

    async fn post(
        &self,
        url: &str,
        body: String,
        headers: &[(&str, String)],
    ) -> Result<(), String> {
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.map_err(|e| {
            let why = if e.is_timeout() {
                "no answer within 10 s".to_string()
            } else if e.is_connect() {
                "cannot connect".to_string()
            } else {
                "request failed".to_string()
            };
            format!("{host}: {why}")
        })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{host}: answered HTTP {}", status.as_u16()))
        }
    }
}

fn active_url<'a>(hook: &'a Hook, name: &str) -> Result<&'a str, String> {
    match (&hook.url, hook.active) {
        (Some(url), true) => Ok(url),
        _ => Err(format!("{name} was turned off in the bucket's settings")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_and_body() {
        // Computed apart (Python's hmac): key "Jefe" (RFC 4231 case 2), message
        // "1700000000.what do ya want for nothing?".
        assert_eq!(
            signature("Jefe", 1_700_000_000, "what do ya want for nothing?"),
            "sha256=1cdd0650c8be1cb0974b1788d458b1e781206cfef59b85faafc582d2e182c57e"
        );
        assert_ne!(signature("k", 1, "b"), signature("k", 2, "b"));
        assert_ne!(signature("k", 1, "b"), signature("j", 1, "b"));
    }

    #[test]
    fn custom_events_are_the_triggers_set_on() {
        let settings = Settings {
            triggers: json!({"deployment": false, "custom_event:order failed": true, "custom_event:old": false}),
            ..Settings::default()
        };
        assert_eq!(settings.custom_events(), ["order failed"]);
        assert!(!settings.kind_on("deployment") && settings.kind_on("custom_event"));
    }

    #[test]
    fn forms_are_checked_and_the_webhook_gets_a_secret() {
        let mut hooks = Hooks::default();
        let form = |active, url: &str| HookForm {
            active: Some(active),
            url: Some(url.into()),
            ..HookForm::default()
        };
        assert!(
            hooks
                .set_slack(&form(true, ""))
                .unwrap_err()
                .contains("slack.url")
        );
        assert!(hooks.set_slack(&form(true, "ftp://x")).is_err());
        assert!(hooks.set_slack(&form(true, "not a url")).is_err());
        hooks
            .set_slack(&form(true, "https://hooks.slack.com/services/T/B/x"))
            .unwrap();
        assert!(hooks.slack.active && hooks.slack.secret.is_none());

        hooks
            .set_webhook(&form(true, "http://127.0.0.1:9/hook"))
            .unwrap();
        let secret = hooks.webhooks.secret.clone().unwrap();
        assert_eq!(secret.len(), 64);
        hooks
            .set_webhook(&HookForm {
                active: Some(false),
                ..HookForm::default()
            })
            .unwrap();
        assert_eq!(hooks.webhooks.secret.as_deref(), Some(secret.as_str()));
        assert!(!hooks.webhooks.active);
        let rotate = HookForm {
            rotate_secret: Some(true),
            ..HookForm::default()
        };
        hooks.set_webhook(&rotate).unwrap();
        assert_ne!(hooks.webhooks.secret, Some(secret));
        assert_eq!(
            hooks.webhooks.format,
            HookFormat::Km,
            "km's bodies unless asked"
        );
        let shaped = |format: &str| HookForm {
            format: Some(format.into()),
            ..HookForm::default()
        };
        hooks.set_webhook(&shaped("keymetrics")).unwrap();
        assert_eq!(hooks.webhooks.format, HookFormat::Keymetrics);
        hooks.set_webhook(&HookForm::default()).unwrap();
        assert_eq!(
            hooks.webhooks.format,
            HookFormat::Keymetrics,
            "kept when not given"
        );
        let refused = hooks.set_webhook(&shaped("xml")).unwrap_err();
        assert!(refused.contains("not km or keymetrics"), "{refused}");
    }
}
