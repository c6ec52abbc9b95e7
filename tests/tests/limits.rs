//! The licence's process limit with a real pm2: a server over the limit is parked with
//! the reason, the free modules do not count, and once a process is deleted the agent's
//! next check lets it in.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use km_e2e::{LinkOpts, e2e, km_bin, linked_with, workspace_dir};
use serde_json::{Value, json};

const APP: &str = "setInterval(() => {}, 1000);";

/// A licence for `limit` processes, signed with the test key.
fn licence(limit: u32) -> String {
    let out = Command::new(km_bin())
        .args([
            "licence",
            "sign",
            "--customer",
            "limits-test",
            "--days",
            "30",
        ])
        .args(["--process-limit", &limit.to_string(), "--key"])
        .arg(workspace_dir().join("tests/keys/test-licence.key"))
        .output()
        .expect("km licence sign");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("km1."))
        .expect("a licence")
        .to_string()
}

#[tokio::test]
async fn a_server_over_the_limit_is_parked_until_a_process_is_deleted() {
    e2e(async {
        let opts = LinkOpts {
            km_env: vec![("KM_DEDICATED_KEY".into(), licence(2))],
            ..LinkOpts::default()
        };
        // Three processes that count, and a free module (by its name) that does not.
        let apps = [("a", APP), ("b", APP), ("c", APP), ("pm2-logrotate", APP)];
        let l = linked_with("web-1", &apps, opts).await?;
        let (api, b) = (l.api().clone(), l.bucket.id.clone());

        // After its first status the server is parked, with the reason.
        let usage_path = format!("/api/bucket/{b}/usage");
        let deadline = Instant::now() + Duration::from_secs(20);
        let parked = loop {
            let usage = api.get_ok(&usage_path).await?;
            if let Some(p) = usage["parked"].as_array().and_then(|p| p.first()) {
                break (usage.clone(), p.clone());
            }
            ensure!(Instant::now() < deadline, "web-1 not parked: {usage}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let (usage, parked) = parked;
        ensure!(
            usage["limit"] == json!({"kind": "processes", "max": 2}),
            "{usage}"
        );
        ensure!(
            parked["server_name"] == "web-1" && parked["processes"] == 3,
            "{parked}"
        );
        let reason = parked["reason"].as_str().unwrap_or_default();
        ensure!(reason.contains("allows 2 processes"), "reason: {reason}");

        // Its agent is told so when it asks again, and its socket is refused.
        let verify = reqwest::Client::new()
            .post(format!("{}/api/node/verifyPM2", l.km.url()))
            .json(
                &json!({"public_id": l.bucket.public_id, "private_id": l.bucket.secret_id,
                          "data": {"MACHINE_NAME": "web-1"}}),
            )
            .send()
            .await?
            .json::<Value>()
            .await?;
        ensure!(
            verify["active"] == false && verify["msg"] == reason && verify.get("error").is_none(),
            "verifyPM2 of a parked server: {verify}"
        );
        // One process fewer: the agent's next check (every 60 s) lets it in.
        l.pm2.run_ok(&["delete", "c"]).await?;
        let back = Instant::now();
        let names = api
            .wait_server(
                &b,
                "web-1",
                "web-1 let in with 2 processes",
                Duration::from_secs(100),
                |s| {
                    let online = s["online"] == true;
                    let names: Vec<String> = s["data"]["process"]
                        .as_array()?
                        .iter()
                        .filter_map(|p| p["name"].as_str().map(str::to_string))
                        .collect();
                    (online && !names.contains(&"c".to_string()) && names.len() == 3)
                        .then_some(names)
                },
            )
            .await?;
        eprintln!(
            "limits: let in {:.1?} after the delete, with {names:?}",
            back.elapsed()
        );
        let usage = api.get_ok(&usage_path).await?;
        ensure!(
            usage["processes"] == 2 && usage["parked"].as_array().is_some_and(Vec::is_empty),
            "usage once let in: {usage}"
        );
        let _ = l.pm2.run(&["kill"]).await.context("pm2 kill")?;
        Ok(())
    })
    .await;
}

/// An admin disables the bucket: its connected agent is closed, verifyPM2 answers an
/// error with the reason (the CLI prints it), and enabling it admits agents again.
#[tokio::test]
async fn a_disabled_bucket_refuses_its_agents() {
    e2e(async {
        let l = linked_with("web-1", &[("a", APP)], LinkOpts::default()).await?;
        let (api, b) = (l.api().clone(), l.bucket.id.clone());
        l.wait_apps(&["a"], Duration::from_secs(15)).await?;
        let put = |disabled: bool| {
            let api = api.clone();
            let path = format!("/api/bucket/{b}");
            async move {
                api.request(
                    reqwest::Method::PUT,
                    &path,
                    Some(&json!({ "disabled": disabled })),
                )
                .await
            }
        };
        let r = put(true).await?;
        ensure!(
            r.status == 200 && r.body["disabled"] == true,
            "disable: HTTP {}: {}",
            r.status,
            r.text
        );
        api.wait_server(&b, "web-1", "web-1 closed", Duration::from_secs(20), |s| {
            (s["online"] == false).then_some(())
        })
        .await?;
        let verify = || async {
            reqwest::Client::new()
                .post(format!("{}/api/node/verifyPM2", l.km.url()))
                .json(
                    &json!({"public_id": l.bucket.public_id, "private_id": l.bucket.secret_id,
                              "data": {"MACHINE_NAME": "web-1"}}),
                )
                .send()
                .await?
                .json::<Value>()
                .await
        };
        let refused = verify().await?;
        ensure!(
            refused["active"] == false
                && refused["error"] == true
                && refused["msg"]
                    .as_str()
                    .is_some_and(|m| m.contains("disabled")),
            "verifyPM2 of a disabled bucket: {refused}"
        );
        let r = put(false).await?;
        ensure!(
            r.status == 200 && r.body["disabled"] == false,
            "enable: {}",
            r.text
        );
        let admitted = verify().await?;
        ensure!(
            admitted["active"] == true,
            "verifyPM2 once enabled: {admitted}"
        );
        let _ = l.pm2.run(&["kill"]).await;
        Ok(())
    })
    .await;
}
