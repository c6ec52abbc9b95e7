//! The official PM2 Plus API client, `@pm2/js-api` 0.8.1 (unmodified, from npm), against
//! the real `km` with a real linked pm2 7.0.4 agent. The client side is the node script
//! `tests/js/js_api.js`: it signs in with the user's refresh token (standalone strategy),
//! lists buckets, reads status and logs, restarts the app through `actions/triggerPM2`, and
//! subscribes to realtime (`/primus`) for the server's status events, then manages an alert
//! rule, the webhook channel and its own notification state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, ensure};
use km_e2e::{LinkOpts, Smtp, e2e, linked_with, run_node_script};
use serde_json::{Value, json};
use std::time::Duration;

/// Prints a line four times a second.
const APP_TICKER: &str = r#"
let n = 0;
setInterval(() => console.log('js-api-tick ' + (n++)), 250);
"#;

const SERVER: &str = "web-1";
const APP: &str = "ticker";
const WAIT: Duration = Duration::from_secs(20);
/// The script's own checks take ~10 s when everything answers; each is bounded (15-20 s).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(150);

#[tokio::test]
async fn js_api_signs_in_reads_restarts_and_subscribes() {
    e2e(async {
        // Mail set up, so that the alert's sample goes by mail as in PM2 Plus.
        let smtp = Smtp::start("plain", "", "")?;
        let opts = LinkOpts {
            km_env: smtp.km_env(),
            ..LinkOpts::default()
        };
        let l = linked_with(SERVER, &[(APP, APP_TICKER)], opts).await?;
        let api = l.api();
        let bucket = &l.bucket.id;
        l.wait_apps(&[APP], WAIT).await?;
        // Log lines reach km once logging is on: wait for one, so that the script can look
        // for it through the client.
        let r = api
            .trigger_pm2(
                bucket,
                &json!({"server_name": SERVER, "method_name": "startLogging", "app_name": APP}),
            )
            .await?;
        ensure!(
            r.status == 200 && r.body["success"] == true,
            "triggerPM2 startLogging: expected 200 {{success:true}}, got HTTP {}: {}",
            r.status,
            r.text
        );
        api.wait_data(
            bucket,
            "logs",
            &json!({"app_name": APP}),
            "a `js-api-tick` line in data/logs",
            Duration::from_secs(15),
            |e: &Value| {
                e["data"]
                    .as_str()
                    .is_some_and(|d| d.contains("js-api-tick"))
                    .then_some(())
            },
        )
        .await?;
        let refresh = l.user.raw["refresh_token"].as_str().with_context(|| {
            format!(
                "no refresh_token string in the register answer: {}",
                l.user.raw
            )
        })?;
        let url = l.km.url();
        let out = run_node_script(
            "js_api.js",
            &[
                ("KM_URL", url.as_str()),
                ("KM_REFRESH_TOKEN", refresh),
                ("KM_BUCKET_ID", bucket.as_str()),
                ("KM_SERVER_NAME", SERVER),
                ("KM_APP_NAME", APP),
                ("KM_LOG_NEEDLE", "js-api-tick"),
            ],
            SCRIPT_TIMEOUT,
        )
        .await?;
        println!("{}", out.stdout.trim_end());
        ensure!(
            out.stdout.contains("js_api: all checks passed"),
            "js_api.js exited 0 without its closing line:\n{}\n{}",
            out.stdout,
            out.stderr
        );
        Ok(())
    })
    .await
}
