//! Notifications with a real pm2 and a real SMTP server (aiosmtpd): a new issue mails the
//! bucket's owner once, with the error and a dashboard link, however often it repeats;
//! a burst of distinct new issues is one mail that counts them; a server that goes
//! offline and comes back is told once each way; each is listed with its delivery state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::ensure;
use km_e2e::{LinkOpts, Smtp, e2e, linked_with};
use serde_json::{Value, json};

/// Crashes one second after each start: pm2 restarts it, so the same issue repeats.
const CRASHER: &str = "setTimeout(() => { throw new Error('notify-me-boom') }, 1000);";

/// Reports 100 distinct errors at once through @pm2/io when started.
const BURST: &str = r#"
const io = require('@pm2/io');
setTimeout(() => {
  for (let i = 0; i < 100; i++) io.notifyError(new Error('burst-error-' + i));
}, 1500);
setInterval(() => {}, 1000);
"#;

async fn wait_mails(smtp: &Smtp, n: usize, within: Duration) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + within;
    loop {
        let mails = smtp.decoded_mails()?;
        if mails.len() >= n {
            return Ok(mails);
        }
        ensure!(
            Instant::now() < deadline,
            "{} mails after {within:?}, {n} expected",
            mails.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn new_issues_are_mailed_once_and_bursts_grouped() {
    e2e(async {
        let smtp = Smtp::start("plain", "", "")?;
        let opts = LinkOpts {
            km_env: smtp.km_env(),
            ..LinkOpts::default()
        };
        let l = linked_with("web-1", &[("crasher", CRASHER)], opts).await?;
        let (api, b) = (l.api().clone(), l.bucket.id.clone());
        // A developer is not mailed by default; this one opts in.
        let dev = l.km.api().register_random().await?;
        api.post_ok(
            &format!("/api/bucket/{b}/add_user"),
            &json!({"email": dev.email, "role": "developer"}),
        )
        .await?;
        let states = dev
            .api
            .post_ok(
                &format!("/api/bucket/{b}/manage_notif"),
                &json!({"email": dev.email, "state": "email"}),
            )
            .await?;
        ensure!(
            states
                .as_array()
                .is_some_and(|s| s.len() == 2 && s.iter().all(|m| m["state"] == "email")),
            "after opting in: {states}"
        );

        // The crash loop is told too (see the cluster test); here only issues are.
        let channels = api
            .post_ok(
                &format!("/api/bucket/{b}/alerts/update"),
                &json!({"triggers": {"restart_loop": false}}),
            )
            .await?;
        ensure!(
            channels["triggers"] == json!({"restart_loop": false}),
            "{channels}"
        );

        // One mail for the new issue to each of them, with the message and a link.
        let started = Instant::now();
        let mails = wait_mails(&smtp, 2, Duration::from_secs(45)).await?;
        let first = &mails[0];
        eprintln!(
            "notifications: first mails {:.1?} after the link",
            started.elapsed()
        );
        for who in [&l.user.email, &dev.email] {
            ensure!(
                mails.iter().any(|m| m.contains(&format!("To: {who}"))),
                "no mail to {who}"
            );
        }
        ensure!(
            first.contains("notify-me-boom"),
            "no error message:\n{first}"
        );
        ensure!(
            first.contains(&format!("/buckets/{b}/issues/")),
            "no link to the issue's page:\n{first}"
        );
        ensure!(first.contains("text/html"), "no HTML part:\n{first}");

        // The issue goes on repeating: no second mail for it.
        tokio::time::sleep(Duration::from_secs(25)).await;
        ensure!(smtp.mails()?.len() == 2, "the same issue was mailed again");

        // Resolved, it happens again: it reopens, and both are told once.
        let issues = api
            .post_ok(&format!("/api/bucket/{b}/data/issues/list"), &json!({}))
            .await?;
        let id = issues[0]["identifier"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let path = format!("/api/bucket/{b}/data/issues/{id}");
        let body = json!({"state": "resolved"});
        let resolved = api
            .request(reqwest::Method::PUT, &path, Some(&body))
            .await?
            .into_ok(&format!("PUT {path}"))?;
        ensure!(resolved["state"] == "resolved", "{resolved}");
        let mails = wait_mails(&smtp, 4, Duration::from_secs(45)).await?;
        ensure!(
            mails[2..]
                .iter()
                .all(|m| m.contains("Issue reopened") && m.contains("notify-me-boom")),
            "the reopened issue's mails:\n{}",
            mails[2]
        );
        let issues = api
            .post_ok(&format!("/api/bucket/{b}/data/issues/list"), &json!({}))
            .await?;
        ensure!(
            issues[0]["state"] == "open",
            "after it happened again: {}",
            issues[0]
        );
        tokio::time::sleep(Duration::from_secs(12)).await;
        ensure!(
            smtp.mails()?.len() == 4,
            "the reopened issue was mailed again"
        );

        // The developer mutes new issues: the next goes to the owner only.
        let states = dev
            .api
            .post_ok(
                &format!("/api/bucket/{b}/manage_notif"),
                &json!({"email": dev.email, "kinds": {"new_issue": false}}),
            )
            .await?;
        ensure!(
            states
                .as_array()
                .is_some_and(|s| s.iter().any(|m| m["muted"] == json!(["new_issue"]))),
            "after muting: {states}"
        );

        // 100 distinct errors at once: one more mail, saying 100.
        l.pm2.run_ok(&["delete", "crasher"]).await?;
        l.pm2.start_app("burst", BURST).await?;
        let mails = wait_mails(&smtp, 5, Duration::from_secs(45)).await?;
        ensure!(
            mails[4].contains("100 new issues")
                && mails[4].contains(&format!("To: {}", l.user.email)),
            "the burst's mail:\n{}",
            mails[4]
        );
        tokio::time::sleep(Duration::from_secs(12)).await;
        ensure!(
            smtp.mails()?.len() == 5,
            "the burst was mailed more than once, or to the muted member"
        );

        let listed = api
            .post_ok(&format!("/api/bucket/{b}/data/notifications"), &Value::Null)
            .await?;
        let listed = listed.as_array().cloned().unwrap_or_default();
        ensure!(listed.len() == 3, "listed: {listed:?}");
        ensure!(
            listed
                .iter()
                .all(|n| n["state"] == "sent" && n["attempts"] == 1),
            "delivery states: {listed:?}"
        );
        ensure!(
            listed[0]["count"] == 100,
            "the burst counts 100: {}",
            listed[0]
        );
        let _ = l.pm2.run(&["kill"]).await;
        Ok(())
    })
    .await;
}

/// `pm2 kill`: after 90 s without data one mail says the server is offline; when pm2
/// runs again (its link kept), one mail says it is back. Nothing more.
#[tokio::test]
async fn a_server_offline_and_back_is_mailed_once_each() {
    e2e(async {
        let smtp = Smtp::start("plain", "", "")?;
        let opts = LinkOpts {
            km_env: smtp.km_env(),
            ..LinkOpts::default()
        };
        let app = "setInterval(() => {}, 1000);";
        let l = linked_with("web-1", &[("steady", app)], opts).await?;
        let (api, b) = (l.api().clone(), l.bucket.id.clone());
        l.wait_apps(&["steady"], Duration::from_secs(15)).await?;

        l.pm2.run_ok(&["kill"]).await?;
        let killed = Instant::now();
        let mails = wait_mails(&smtp, 1, Duration::from_secs(150)).await?;
        eprintln!(
            "notifications: offline mail {:.1?} after pm2 kill",
            killed.elapsed()
        );
        ensure!(
            mails[0].contains("1 server offline") && mails[0].contains("web-1"),
            "the offline mail:\n{}",
            mails[0]
        );

        l.pm2.start_app("steady", app).await?;
        let restarted = Instant::now();
        let mails = wait_mails(&smtp, 2, Duration::from_secs(60)).await?;
        eprintln!(
            "notifications: back-online mail {:.1?} after pm2 started again",
            restarted.elapsed()
        );
        ensure!(
            mails[1].contains("1 server back online") && mails[1].contains("web-1"),
            "the back-online mail:\n{}",
            mails[1]
        );
        tokio::time::sleep(Duration::from_secs(15)).await;
        ensure!(smtp.mails()?.len() == 2, "more mails than the two changes");
        let listed = api
            .post_ok(&format!("/api/bucket/{b}/data/notifications"), &Value::Null)
            .await?;
        let kinds: Vec<&str> = listed
            .as_array()
            .map(|l| l.iter().filter_map(|n| n["kind"].as_str()).collect())
            .unwrap_or_default();
        ensure!(
            kinds == ["server_online", "server_offline"],
            "listed: {listed}"
        );
        let _ = l.pm2.run(&["kill"]).await;
        Ok(())
    })
    .await;
}

/// Crashes on its first three starts (counted in a file), then stays up.
fn crash_thrice(counter: &std::path::Path) -> String {
    format!(
        r#"
const fs = require('fs');
let n = 0;
try {{ n = parseInt(fs.readFileSync({counter:?}, 'utf8')) || 0; }} catch (e) {{}}
fs.writeFileSync({counter:?}, String(n + 1));
if (n < 3) setTimeout(() => {{ throw new Error('report-boom') }}, 300);
else setInterval(() => {{}}, 1000);
"#
    )
}

#[tokio::test]
async fn the_daily_report_is_mailed_with_the_buckets_numbers() {
    e2e(async {
        let smtp = Smtp::start("plain", "", "")?;
        let opts = LinkOpts {
            km_env: smtp.km_env(),
            ..LinkOpts::default()
        };
        let steady = "setInterval(() => {}, 1000);";
        let l = linked_with("report-1", &[("steady", steady)], opts).await?;
        let (api, b) = (l.api().clone(), l.bucket.id.clone());
        l.wait_apps(&["steady"], Duration::from_secs(15)).await?;
        // The owner is mailed notifications by default; only the report is looked at.
        api.post_ok(
            &format!("/api/bucket/{b}/manage_notif"),
            &json!({"email": l.user.email, "state": "none"}),
        )
        .await?;
        let dir = tempfile::tempdir()?;
        l.pm2
            .start_app("crasher", &crash_thrice(&dir.path().join("n")))
            .await?;
        // Three crashes, then up: wait for the third exit to be stored.
        let deadline = Instant::now() + Duration::from_secs(40);
        let at = loop {
            let at = km_e2e::now_ms() + 1000;
            let report = api
                .get_ok(&format!("/api/bucket/{b}/reports/daily?at={at}"))
                .await?;
            if report["restarts"] == 3 && report["exceptions"] == 3 {
                break at;
            }
            ensure!(Instant::now() < deadline, "report: {report}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let report = api
            .get_ok(&format!("/api/bucket/{b}/reports/daily?at={at}"))
            .await?;
        ensure!(
            report["servers"] == 1
                && report["processes"] == 2
                && report["new_issues"] == 1
                && report["issues"][0]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("report-boom")),
            "report: {report}"
        );
        // The same bucket a day earlier: nothing had happened yet.
        let before = api
            .get_ok(&format!(
                "/api/bucket/{b}/reports/daily?at={}",
                at - 86_400_000
            ))
            .await?;
        ensure!(
            before["restarts"] == 0 && before["new_issues"] == 0,
            "the day before: {before}"
        );

        // Nobody chose it: nothing is sent.
        let sent = api
            .post_ok(
                &format!("/api/bucket/{b}/reports/daily/send"),
                &json!({"at": at}),
            )
            .await?;
        ensure!(sent["recipients"] == 0, "{sent}");
        let choice = api
            .post_ok(
                &format!("/api/bucket/{b}/reports/choice"),
                &json!({"daily": true}),
            )
            .await?;
        ensure!(
            choice == json!({"daily": true, "weekly": false}),
            "{choice}"
        );
        let sent = api
            .post_ok(
                &format!("/api/bucket/{b}/reports/daily/send"),
                &json!({"at": at}),
            )
            .await?;
        ensure!(sent["recipients"] == 1, "{sent}");
        let mails = wait_mails(&smtp, 1, Duration::from_secs(20)).await?;
        let mail = &mails[0];
        for expected in [
            "Daily report: 1 servers, 3 restarts, 1 new issues",
            "Processes: 2",
            "Restarts: 3",
            "Exceptions: 3",
            "report-boom",
            "<svg",
            &l.user.email,
        ] {
            ensure!(
                mail.contains(expected),
                "{expected:?} not in the mail:\n{mail}"
            );
        }
        let _ = l.pm2.run(&["kill"]).await;
        Ok(())
    })
    .await;
}
