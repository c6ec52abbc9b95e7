//! The agents fleets still run: pm2 5.4, 6.0 and 7.0 linked with `pm2 link`, apps using
//! `@pm2/io` 5 and 6, and pm2 7's `pm2-runtime` linked from `KEYMETRICS_*` in its
//! environment (as in a container). For each: the server and its app in the status with
//! the agent's version and the app's custom metric, a custom action's reply, the app's
//! log lines after `startLogging`, and an exception thrown by the app. pm2 5's host
//! monitoring (sysmonit) becomes the host's CPU, memory and disk series, watched by a rule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use km_e2e::{Api, Km, LinkOpts, Node, e2e, find_process, linked_with, unique};
use serde_json::json;

const APP: &str = "matrix-app";
const APP_SRC: &str = r#"
const io = require('@pm2/io');
io.metric({ name: 'matrix gauge' }).set(7);
io.action('echo', (reply) => reply({ ok: true }));
io.action('boom', (reply) => {
  reply({ throwing: true });
  setTimeout(() => { throw new Error('matrix boom'); }, 200);
});
setInterval(() => console.log('matrix-line'), 500);
"#;

const WAIT: Duration = Duration::from_secs(60);

/// What every agent must do once linked as `server` (running pm2 `pm2_version`).
async fn works(api: &Api, bucket: &str, server: &str, pm2_version: &str) -> Result<()> {
    let status = api
        .wait_server(bucket, server, "the app with its metric", WAIT, |s| {
            let app = find_process(s, APP)?;
            (s["online"] == true && app["axm_monitor"]["matrix gauge"]["value"] == 7)
                .then(|| s.clone())
        })
        .await?;
    let agent = &status["data"]["server"];
    ensure!(
        agent["pm2_version"] == pm2_version,
        "the agent says it runs {}",
        agent["pm2_version"]
    );
    let pm_id = find_process(&status, APP).context("the app")?["pm_id"].clone();

    let target =
        |action: &str| json!({"server_name": server, "process_id": pm_id, "action_name": action});
    api.trigger_action(bucket, &target("echo"))
        .await?
        .into_ok("trigger echo")?;
    api.wait_data(
        bucket,
        "events",
        &json!({"type": "axm:reply"}),
        "echo's reply",
        WAIT,
        |e| (e["data"]["action_name"] == "echo" && e["data"]["return"]["ok"] == true).then_some(()),
    )
    .await?;

    let logging = json!({"server_name": server, "method_name": "startLogging", "app_name": APP});
    api.trigger_pm2(bucket, &logging)
        .await?
        .into_ok("startLogging")?;
    api.wait_data(
        bucket,
        "logs",
        &json!({"app_name": APP}),
        "the app's lines",
        WAIT,
        |l| {
            l["data"]
                .as_str()
                .is_some_and(|d| d.contains("matrix-line"))
                .then_some(())
        },
    )
    .await?;

    api.trigger_action(bucket, &target("boom"))
        .await?
        .into_ok("trigger boom")?;
    let exception = api
        .wait_data(
            bucket,
            "exceptions",
            &json!({"app_name": APP}),
            "the exception",
            WAIT,
            |e| (e["data"]["message"] == "matrix boom").then(|| e.clone()),
        )
        .await?;
    ensure!(
        exception["server_name"] == server
            && exception["data"]["stack"]
                .as_str()
                .is_some_and(|s| s.contains("Error: matrix boom")),
        "the exception: {exception}"
    );
    Ok(())
}

async fn linked_agent(packages: &'static [&'static str], pm2_version: &str) {
    e2e(async {
        let opts = LinkOpts {
            packages: Some(packages),
            ..LinkOpts::default()
        };
        let l = linked_with("matrix-1", &[(APP, APP_SRC)], opts).await?;
        works(l.api(), &l.bucket.id, "matrix-1", pm2_version).await
    })
    .await;
}

/// pm2 5 with its host monitoring on (`pm2 set pm2:sysmonit true`, a `pm2-sysmonit`
/// process): the host's CPU, memory and disk become host series, and a rule on the
/// host's CPU fires.
#[tokio::test]
async fn pm2_5_with_pm2_io_5_and_sysmonit() {
    e2e(async {
        let opts = LinkOpts {
            packages: Some(&["pm2@5.4.3", "@pm2/io@5.0.2"]),
            ..LinkOpts::default()
        };
        let l = linked_with("matrix-1", &[(APP, APP_SRC)], opts).await?;
        l.pm2.run_ok(&["set", "pm2:sysmonit", "true"]).await?;
        l.pm2.run_ok(&["update"]).await?;
        let (api, b) = (l.api(), &l.bucket.id);
        works(api, b, "matrix-1", "5.4.3").await?;
        api.post_ok(
            &format!("/api/bucket/{b}/alerts"),
            &json!({"name": "host busy", "type": "metric", "initiator": "host_cpu",
                    "options": {"operator": ">", "threshold": -1, "timerange": 60},
                    "scope": {"apps": [APP]}, "actions": [{"type": "notify"}]}),
        )
        .await?;
        let query = json!({"interval": "minute", "before": 10, "app_name": "",
                           "metrics": ["host_cpu", "host_memory_used", "host_disk_free"]});
        let series = api
            .poll_post(
                &format!("/api/bucket/{b}/data/metrics/histogram"),
                &query,
                "the host series from sysmonit",
                Duration::from_secs(150),
                |v| {
                    let host = &v["matrix-1"][""];
                    let has = |name: &str| {
                        host[name]["timestamps_and_stats"]
                            .as_array()
                            .is_some_and(|p| !p.is_empty())
                    };
                    (has("host_cpu") && has("host_memory_used") && has("host_disk_free"))
                        .then(|| host.clone())
                },
            )
            .await?;
        let last = |name: &str| {
            series[name]["timestamps_and_stats"][0]["avg"]
                .as_f64()
                .unwrap_or(-1.0)
        };
        for name in ["host_cpu", "host_memory_used", "host_disk_free"] {
            ensure!(
                (0.0..=100.0).contains(&last(name)),
                "{name}: {}",
                series[name]
            );
        }
        api.wait_data(
            b,
            "events",
            &json!({"type": "alert_fired"}),
            "the host rule fired",
            Duration::from_secs(120),
            |e| (e["alert"]["name"] == "host busy" && e["server_name"] == "matrix-1").then_some(()),
        )
        .await
    })
    .await;
}

#[tokio::test]
async fn pm2_5_with_pm2_io_5() {
    linked_agent(&["pm2@5.4.3", "@pm2/io@5.0.2"], "5.4.3").await;
}

#[tokio::test]
async fn pm2_6_with_pm2_io_6() {
    linked_agent(&["pm2@6.0.14", "@pm2/io@6.1.0"], "6.0.14").await;
}

#[tokio::test]
async fn pm2_7_with_pm2_io_5() {
    linked_agent(&["pm2@7.0.4", "@pm2/io@5.0.2"], "7.0.4").await;
}

/// `pm2-runtime app.js` in the foreground, linked by `KEYMETRICS_PUBLIC`,
/// `KEYMETRICS_SECRET`, `KEYMETRICS_NODE` and `INSTANCE_NAME` (no `pm2 link`).
#[tokio::test]
async fn pm2_runtime_links_from_its_environment() {
    e2e(async {
        let km = Km::start_plus(vec![]).await?;
        let user = km.api().register_random().await?;
        let bucket = user.api.create_bucket(&unique("runtime-")).await?;
        let node = Node::get()?;
        let home = tempfile::tempdir()?;
        let app = home.path().join("app.js");
        std::fs::write(&app, APP_SRC)?;
        let runtime = node.node_modules().join("pm2/bin/pm2-runtime");
        let mut child = tokio::process::Command::new("node")
            .arg(&runtime)
            .args(["start", &app.to_string_lossy(), "--name", APP])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", home.path())
            .env("PM2_HOME", home.path().join(".pm2"))
            .env("NODE_PATH", node.node_modules())
            .env("KEYMETRICS_PUBLIC", &bucket.public_id)
            .env("KEYMETRICS_SECRET", &bucket.secret_id)
            .env("KEYMETRICS_NODE", km.url())
            .env("INSTANCE_NAME", "runtime-1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start pm2-runtime")?;
        let outcome = works(&user.api, &bucket.id, "runtime-1", "7.0.4").await;
        // As a container stops it: SIGINT, pm2-runtime stops its apps and exits.
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        outcome
    })
    .await;
}
