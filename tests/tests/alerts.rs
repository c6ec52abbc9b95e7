//! Alerts with a real pm2: a custom metric of a linked app above a rule's threshold for
//! the window fires the rule once (a signed webhook, Slack, and the rule's custom action
//! run on the process), and resolves it once when the metric drops; the rule's `sample`
//! reaches the same receivers. A rule an app declares in code (pmx) is listed, shown and
//! judged like one made in km. A webhook in the Keymetrics shape gets each new exception
//! as `event:new_exception`, with the fields Keymetrics documented.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use hmac::{Hmac, Mac};
use km_e2e::{e2e, linked, now_ms};
use serde_json::{Value, json};
use sha2::Sha256;

/// A metric read from a file the test writes, and an action that leaves a file.
fn app_source(level: &Path, drained: &Path) -> String {
    format!(
        r#"
const io = require('@pm2/io');
const fs = require('fs');
const depth = io.metric({{ name: 'queue depth' }});
setInterval(() => {{
  try {{ depth.set(parseFloat(fs.readFileSync({level:?}, 'utf8'))); }} catch (e) {{}}
}}, 500);
io.action('drain', (reply) => {{
  fs.writeFileSync({drained:?}, String(Date.now()));
  reply({{ drained: true }});
}});
"#
    )
}

/// What a receiver got: (path, headers, body).
type Received = Arc<Mutex<Vec<(String, HeaderMap, String)>>>;

/// A webhook and a Slack receiver on one port, answering 200.
async fn receiver() -> anyhow::Result<(String, Received)> {
    let got: Received = Arc::default();
    let record = |path: &'static str| {
        move |State(got): State<Received>, headers: HeaderMap, body: Bytes| async move {
            let body = String::from_utf8_lossy(&body).into_owned();
            got.lock().unwrap().push((path.to_string(), headers, body));
            "ok"
        }
    };
    let router = Router::new()
        .route("/hook", post(record("/hook")))
        .route("/slack", post(record("/slack")))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok((url, got))
}

/// The webhook bodies of `kind`, each checked against its signature.
fn hooks_of(got: &Received, kind: &str, secret: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (path, headers, body) in got.lock().unwrap().iter() {
        if path != "/hook" {
            continue;
        }
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        if header("x-km-event") != kind {
            continue;
        }
        let payload: Value = serde_json::from_str(body).context("webhook body")?;
        // km's bodies name their kind; Keymetrics-shaped ones name their event.
        ensure!(
            payload["type"] == kind || payload["event"].is_string(),
            "a {kind} body: {payload}"
        );
        let timestamp: i64 = header("x-km-timestamp").parse().context("x-km-timestamp")?;
        ensure!(
            (now_ms() / 1000 - timestamp).abs() < 300,
            "stale timestamp {timestamp}"
        );
        ensure!(
            header("x-km-signature") == signature(secret, timestamp, body),
            "bad signature on {body}"
        );
        ensure!(
            header("x-km-signature") != signature("not-the-secret", timestamp, body),
            "a wrong secret verifies"
        );
        out.push(payload);
    }
    Ok(out)
}

/// Turns the bucket's webhook on, posting to `url` in `format` (`km` or `keymetrics`);
/// returns the channels answered and the signing secret.
async fn webhook(
    api: &km_e2e::Api,
    b: &str,
    url: &str,
    format: &str,
) -> anyhow::Result<(Value, String)> {
    let channels = api
        .post_ok(
            &format!("/api/bucket/{b}/alerts/updateWebhooks"),
            &json!({"webhooks": {"active": true, "url": format!("{url}/hook"), "format": format}}),
        )
        .await?;
    let secret = channels["webhooks"]["secret"]
        .as_str()
        .context("secret")?
        .to_string();
    Ok((channels, secret))
}

/// A linked app whose bucket tells a receiver's webhook (bodies in `format`); the
/// owner is not mailed (no SMTP server is set either).
struct Hooked {
    l: km_e2e::Linked,
    api: km_e2e::Api,
    b: String,
    url: String,
    got: Received,
    channels: Value,
    secret: String,
}

async fn hooked(server: &str, app: (&str, &str), format: &str) -> anyhow::Result<Hooked> {
    let (url, got) = receiver().await?;
    let l = linked(server, &[app]).await?;
    let (api, b) = (l.api().clone(), l.bucket.id.clone());
    let owner = l.user.email.clone();
    api.post_ok(
        &format!("/api/bucket/{b}/manage_notif"),
        &json!({"email": owner, "state": "none"}),
    )
    .await?;
    let (channels, secret) = webhook(&api, &b, &url, format).await?;
    Ok(Hooked {
        l,
        api,
        b,
        url,
        got,
        channels,
        secret,
    })
}

fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn wait_hooks(
    got: &Received,
    kind: &str,
    secret: &str,
    within: Duration,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + within;
    loop {
        let hooks = hooks_of(got, kind, secret)?;
        if !hooks.is_empty() {
            return Ok(hooks);
        }
        ensure!(
            Instant::now() < deadline,
            "no {kind} webhook within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn a_metric_alert_fires_once_and_resolves_once() {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let (level, drained) = (dir.path().join("level"), dir.path().join("drained"));
        std::fs::write(&level, "100")?;
        let source = app_source(&level, &drained);
        let Hooked { l, api, b, url, got, secret, .. } =
            hooked("queue-1", ("queue", &source), "km").await?;
        api.post_ok(
            &format!("/api/bucket/{b}/alerts/updateSlack"),
            &json!({"slack": {"active": true, "url": format!("{url}/slack")}}),
        )
        .await?;
        let bad = api
            .post(
                &format!("/api/bucket/{b}/alerts"),
                &json!({"name": "x", "type": "metric", "initiator": "cpu",
                        "options": {"threshold": 1, "timerange": 10}}),
            )
            .await?;
        ensure!(
            bad.status == 400 && bad.text.contains("between 60"),
            "a 10 s window: {} {}",
            bad.status,
            bad.text
        );
        let rule = api
            .post_ok(
                &format!("/api/bucket/{b}/alerts"),
                &json!({
                    "name": "deep queue", "type": "metric", "initiator": "queue depth",
                    "options": {"operator": ">", "threshold": 50, "timerange": 60},
                    "scope": {"apps": ["queue"]},
                    "actions": [{"type": "notify"}, {"type": "custom_action", "params": {"name": "drain"}}],
                }),
            )
            .await?;
        let id = rule["_id"].as_str().context("_id")?.to_string();
        let linked_at = Instant::now();

        // The sample reaches both receivers.
        let sample = api
            .post_ok(&format!("/api/bucket/{b}/alerts/{id}/sample"), &json!({}))
            .await?;
        ensure!(sample["channels"] == json!(["slack", "webhook"]), "sample: {sample}");
        let samples = wait_hooks(&got, "alert_sample", &secret, Duration::from_secs(20)).await?;
        ensure!(samples[0]["items"][0]["alert"]["name"] == "deep queue", "{}", samples[0]);
        let slack_texts: Vec<Value> = got
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, ..)| path == "/slack")
            .map(|(.., body)| serde_json::from_str(body).unwrap_or(Value::Null))
            .collect();
        ensure!(
            slack_texts.iter().any(|t| t["text"].as_str().unwrap_or("").contains("Test of the alert deep queue")),
            "slack: {slack_texts:?}"
        );

        // Above the threshold for a whole minute: fired once, and the action ran.
        let fired = wait_hooks(&got, "alert_fired", &secret, Duration::from_secs(160)).await?;
        eprintln!("alerts: fired {:.1?} after the link", linked_at.elapsed());
        let item = &fired[0]["items"][0];
        ensure!(
            item["app"] == "queue" && item["server"] == "queue-1" && item["value"].as_f64() > Some(50.0),
            "fired: {}",
            fired[0]
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while !drained.exists() {
            ensure!(Instant::now() < deadline, "the custom action did not run");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let now = api.get_ok(&format!("/api/bucket/{b}/alerts/{id}")).await?;
        ensure!(now["firing"].as_array().map(Vec::len) == Some(1), "firing: {now}");
        tokio::time::sleep(Duration::from_secs(25)).await;
        ensure!(hooks_of(&got, "alert_fired", &secret)?.len() == 1, "fired again");

        // Below it for a whole minute: resolved once.
        std::fs::write(&level, "3")?;
        let dropped = Instant::now();
        let resolved = wait_hooks(&got, "alert_resolved", &secret, Duration::from_secs(180)).await?;
        eprintln!("alerts: resolved {:.1?} after the drop", dropped.elapsed());
        ensure!(resolved[0]["items"][0]["value"].as_f64() < Some(50.0), "resolved: {}", resolved[0]);
        tokio::time::sleep(Duration::from_secs(15)).await;
        ensure!(hooks_of(&got, "alert_resolved", &secret)?.len() == 1, "resolved again");
        ensure!(hooks_of(&got, "alert_fired", &secret)?.len() == 1, "fired again");
        let now = api.get_ok(&format!("/api/bucket/{b}/alerts/{id}")).await?;
        ensure!(now["firing"] == json!([]), "still firing: {now}");

        // Every delivery is listed as sent, one record per channel.
        let listed = api
            .post_ok(&format!("/api/bucket/{b}/data/notifications"), &Value::Null)
            .await?;
        let rows: Vec<(String, String, String)> = listed
            .as_array()
            .context("list")?
            .iter()
            .map(|n| {
                let f = |k: &str| n[k].as_str().unwrap_or_default().to_string();
                (f("kind"), f("channel"), f("state"))
            })
            .collect();
        for kind in ["alert_sample", "alert_fired", "alert_resolved"] {
            for channel in ["slack", "webhook"] {
                let row = (kind.to_string(), channel.to_string(), "sent".to_string());
                ensure!(rows.contains(&row), "{row:?} not in {rows:?}");
            }
        }
        ensure!(!rows.iter().any(|(_, c, _)| c == "email"), "mailed: {rows:?}");
        let _ = l.pm2.run(&["kill"]).await;
        Ok(())
    })
    .await;
}

/// A pmx metric whose alert rule is declared in code, read from a file the test writes.
fn pmx_source(level: &Path) -> String {
    format!(
        r#"
const probe = require('pmx').probe();
const fs = require('fs');
let level = 0;
setInterval(() => {{
  try {{ level = parseFloat(fs.readFileSync({level:?}, 'utf8')); }} catch (e) {{}}
}}, 500);
probe.metric({{ name: 'backlog', value: () => level, alert: {{ mode: 'threshold', value: 50, cmp: '>' }} }});
"#
    )
}

#[tokio::test]
async fn an_alert_declared_in_code_fires_and_resolves() {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let level = dir.path().join("level");
        std::fs::write(&level, "100")?;
        let source = pmx_source(&level);
        let Hooked { l, api, b, got, secret, .. } =
            hooked("code-1", ("worker", &source), "km").await?;

        // The app's declaration is a rule of the app, listed as from code.
        let rule = api
            .poll_get(
                &format!("/api/bucket/{b}/alerts"),
                "a rule from code",
                Duration::from_secs(30),
                |rules| rules.as_array()?.iter().find(|r| r["from_code"] == true).cloned(),
            )
            .await?;
        ensure!(
            rule["initiator"] == "backlog"
                && rule["scope"] == json!({"apps": ["worker"], "servers": ["code-1"]})
                && rule["options"] == json!({"operator": ">", "threshold": 50.0, "timerange": 60, "aggregation": "any"}),
            "declared rule: {rule}"
        );
        let id = rule["_id"].as_str().context("_id")?.to_string();
        let body = json!({"enabled": false});
        let changed = api
            .request(reqwest::Method::PUT, &format!("/api/bucket/{b}/alerts/{id}"), Some(&body))
            .await?;
        ensure!(
            changed.status == 400 && changed.text.contains("declared in the code"),
            "changing a rule from code: {} {}",
            changed.status,
            changed.text
        );
        let html = l.user.page(&format!("/buckets/{b}/alerts")).await?;
        let row = html
            .split("<tr>")
            .find(|row| row.contains("worker: backlog"))
            .context("the alerts page does not list the rule from code")?;
        ensure!(
            row.contains(">from code</span>") && !row.contains("Delete"),
            "the rule from code on the alerts page: {row}"
        );

        // Above the threshold: fired once; below it for a minute: resolved once.
        let fired = wait_hooks(&got, "alert_fired", &secret, Duration::from_secs(160)).await?;
        let item = &fired[0]["items"][0];
        ensure!(
            item["app"] == "worker" && item["alert"]["id"] == id.as_str() && item["value"].as_f64() > Some(50.0),
            "fired: {}",
            fired[0]
        );
        let now = api.get_ok(&format!("/api/bucket/{b}/alerts/{id}")).await?;
        ensure!(now["firing"].as_array().map(Vec::len) == Some(1), "firing: {now}");
        std::fs::write(&level, "3")?;
        let resolved = wait_hooks(&got, "alert_resolved", &secret, Duration::from_secs(180)).await?;
        ensure!(resolved[0]["items"][0]["value"].as_f64() < Some(50.0), "resolved: {}", resolved[0]);
        ensure!(hooks_of(&got, "alert_fired", &secret)?.len() == 1, "fired again");
        let _ = l.pm2.run(&["kill"]).await;
        Ok(())
    })
    .await;
}

/// Crashes a second after each start (pm2 restarts it): one issue, repeating.
const CRASHER: &str = "setTimeout(() => { throw new Error('keymetrics-boom') }, 1000);";

#[tokio::test]
async fn a_keymetrics_shaped_webhook_gets_each_new_exception() {
    e2e(async {
        let Hooked {
            l,
            api,
            b,
            got,
            channels,
            secret,
            ..
        } = hooked("km-shape-1", ("crasher", CRASHER), "keymetrics").await?;
        ensure!(channels["webhooks"]["format"] == "keymetrics", "{channels}");
        let bad = api
            .post(
                &format!("/api/bucket/{b}/alerts/updateWebhooks"),
                &json!({"webhooks": {"format": "xml"}}),
            )
            .await?;
        ensure!(
            bad.status == 400 && bad.text.contains("not km or keymetrics"),
            "{} {}",
            bad.status,
            bad.text
        );

        let bodies = wait_hooks(&got, "new_issue", &secret, Duration::from_secs(60)).await?;
        let body = &bodies[0];
        let data = &body["data"];
        let issues = api
            .post_ok(&format!("/api/bucket/{b}/data/issues/list"), &json!({}))
            .await?;
        ensure!(
            body["event"] == "event:new_exception"
                && data["process"]["name"] == "crasher"
                && data["process"]["server"] == "km-shape-1"
                && data["process"]["pm_id"] == 0
                && data["data"]["message"] == "keymetrics-boom"
                && data["data"]["stack"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("Error: keymetrics-boom"))
                && data["identifier"] == issues[0]["identifier"]
                && data["infected_servers"] == json!(["km-shape-1"])
                && data["count"].as_u64().is_some_and(|n| n >= 1)
                && data["created_at"].as_i64().is_some_and(|t| t > 0)
                && data["at"] == data["updated_at"]
                && data["timestamps"] == json!([data["at"]])
                && data["bucket_url"]
                    .as_str()
                    .is_some_and(|u| u.contains(&format!("/buckets/{b}/issues/"))),
            "the Keymetrics-shaped body: {body}"
        );
        // Counted in /metrics (with the roles apart, the workers' own, gathered by the
        // gateway).
        let text = api.get("/metrics").await?.text;
        let apart = std::env::var("KM_E2E_ROLES").as_deref() == Ok("apart");
        let sent = r#"channel="webhook",outcome="sent""#;
        ensure!(
            text.lines()
                .any(|l| l.starts_with("km_notification_deliveries_total{")
                    && l.contains(sent)
                    && (!apart || l.contains(r#"role="workers""#))),
            "no webhook delivery sent in /metrics:\n{text}"
        );
        let _ = l.pm2.run(&["kill"]).await;
        Ok(())
    })
    .await;
}

/// Emits a custom event a second, and another nobody subscribed to.
const EMITTER: &str = r#"
const io = require('@pm2/io');
setInterval(() => { io.emit('order failed', { order: 7 }); io.emit('heartbeat', {}); }, 1000);
"#;

#[tokio::test]
async fn a_subscribed_custom_event_is_notified() {
    e2e(async {
        let Hooked {
            l,
            api,
            b,
            got,
            secret,
            ..
        } = hooked("events-1", ("shop", EMITTER), "km").await?;
        let long = format!("custom_event:{}", "x".repeat(101));
        let bad = api
            .post(
                &format!("/api/bucket/{b}/alerts/update"),
                &json!({"triggers": {long: true}}),
            )
            .await?;
        ensure!(
            bad.status == 400 && bad.text.contains("at most 100"),
            "{} {}",
            bad.status,
            bad.text
        );
        api.post_ok(
            &format!("/api/bucket/{b}/alerts/update"),
            &json!({"triggers": {"custom_event:order failed": true}}),
        )
        .await?;

        let told = wait_hooks(&got, "custom_event", &secret, Duration::from_secs(60)).await?;
        let items = told[0]["items"].as_array().context("items")?;
        ensure!(
            items.iter().all(|i| i["name"] == "order failed")
                && items[0]["app"] == "shop"
                && items[0]["server"] == "events-1"
                && items[0]["data"]["order"] == 7,
            "the custom event's notification: {}",
            told[0]
        );
        let _ = l.pm2.run(&["kill"]).await;
        Ok(())
    })
    .await;
}
