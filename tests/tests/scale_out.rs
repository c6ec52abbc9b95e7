//! km on the scale-out stores: a configuration that cannot work stops km at once with a
//! message naming the variable; an outage of the events store loses nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::ensure;
use km_e2e::{
    Api, Km, LinkOpts, Linked, OsMem, Redis, SecantusDb, e2e, free_port, km_start_failure,
    linked_with, now_ms, run_node_script,
};
use serde_json::{Value, json};

/// Prints a numbered line every 200 ms.
const APP_LOGGER: &str = r#"
let n = 0;
setInterval(() => console.log('outage-line ' + (n++)), 200);
"#;

/// A km with `env`, a linked pm2 running the logger, log streaming started; returns the
/// link, its API and the bucket id.
async fn logging_on(env: Vec<(String, String)>) -> anyhow::Result<(Linked, Api, String)> {
    let opts = LinkOpts {
        km_env: env,
        ..LinkOpts::default()
    };
    let l = linked_with("web-1", &[("logger", APP_LOGGER)], opts).await?;
    let (api, b) = (l.api().clone(), l.bucket.id.clone());
    l.wait_apps(&["logger"], Duration::from_secs(10)).await?;
    let start =
        json!({"server_name": "web-1", "method_name": "startLogging", "app_name": "logger"});
    ensure!(
        api.trigger_pm2(&b, &start).await?.ok(),
        "startLogging refused"
    );
    Ok((l, api, b))
}

/// Two km nodes on the same MongoDB, Elasticsearch and Redis answer as one: an agent
/// linked to node A is seen, restarted and tailed through node B.
#[tokio::test]
async fn two_nodes_answer_as_one_system() {
    e2e(async {
        let (mongo, search, redis) = (SecantusDb::start()?, OsMem::start()?, Redis::start()?);
        let env = vec![
            ("KM_MONGO_URL".to_string(), mongo.url("km_nodes")),
            ("KM_ELASTICSEARCH_URL".to_string(), search.url().to_string()),
            ("KM_REDIS_URL".to_string(), redis.url()),
        ];
        let opts = LinkOpts {
            km_env: env.clone(),
            ..LinkOpts::default()
        };
        let l = linked_with("web-1", &[("logger", APP_LOGGER)], opts).await?;
        l.wait_apps(&["logger"], Duration::from_secs(10)).await?;
        let node_b = Km::start_with(env).await?;
        let token = l.user.api.token().unwrap_or_default().to_string();
        let via_b = node_b.api().with_token(&token);
        let b = l.bucket.id.clone();

        let pid = |p: &Value| p["pid"].as_i64();
        let first = via_b
            .wait_process(
                &b,
                "web-1",
                "logger",
                "web-1 seen through node B",
                Duration::from_secs(15),
                |p| pid(p),
            )
            .await?;
        let restart =
            json!({"server_name": "web-1", "method_name": "restart", "app_name": "logger"});
        let r = via_b.trigger_pm2(&b, &restart).await?;
        ensure!(
            r.ok() && r.body["success"] == true,
            "restart through node B: HTTP {}: {}",
            r.status,
            r.text
        );
        via_b
            .wait_process(
                &b,
                "web-1",
                "logger",
                "a new pid after the restart through B",
                Duration::from_secs(15),
                |p| pid(p).filter(|p| *p != first && *p > 0),
            )
            .await?;
        let status = l.api().status(&b).await?;
        let restarts = status[0]["data"]["process"]
            .as_array()
            .and_then(|procs| procs.iter().find(|p| p["name"] == "logger"))
            .and_then(|p| p["restart_time"].as_i64());
        ensure!(
            restarts == Some(1),
            "restarted once, seen through node A: {restarts:?}"
        );

        let start = json!({"server_name": "web-1", "method_name": "startLogging"});
        ensure!(
            via_b.trigger_pm2(&b, &start).await?.ok(),
            "startLogging through B refused"
        );
        let logs = format!("/api/bucket/{b}/data/logs");
        let lines = |v: &Value| v.as_array().filter(|a| !a.is_empty()).map(Vec::len);
        via_b
            .poll_post(
                &logs,
                &json!({"app_name": "logger"}),
                "log lines through node B",
                Duration::from_secs(15),
                lines,
            )
            .await?;
        // A browser on node B watches the bucket whose agent is on node A: statuses are
        // relayed over Redis to members only.
        let stranger = node_b.api().register_random().await?;
        let stranger_token = stranger.api.token().unwrap_or_default().to_string();
        let url_b = node_b.url();
        let out = run_node_script(
            "realtime_isolation.js",
            &[
                ("KM_URL", url_b.as_str()),
                ("KM_PUBLIC_ID", l.bucket.public_id.as_str()),
                ("KM_MEMBER_TOKEN", token.as_str()),
                ("KM_OUTSIDER_TOKEN", stranger_token.as_str()),
            ],
            Duration::from_secs(60),
        )
        .await?;
        ensure!(
            out.stdout.contains("realtime isolation: ok"),
            "realtime through node B: {}",
            out.stdout
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn elasticsearch_outage_is_reported_and_buffered_logs_are_written_after() {
    e2e(async {
        let search = OsMem::start()?;
        let (_link, api, b) =
            logging_on(vec![("KM_ELASTICSEARCH_URL".into(), search.url().into())]).await?;
        let logs = format!("/api/bucket/{b}/data/logs");
        let any = |v: &Value| v.as_array().is_some_and(|a| !a.is_empty()).then_some(());
        api.poll_post(
            &logs,
            &json!({}),
            "first log lines",
            Duration::from_secs(15),
            any,
        )
        .await?;

        search.pause();
        let paused_at = now_ms();
        // Longer than the store's request timeout (10 s): the writer sees the failure.
        let health = api
            .poll_get(
                "/healthz",
                "events store reported down",
                Duration::from_secs(25),
                |h| {
                    (h["stores"]["events"]["up"] == false && h["status"] == "degraded")
                        .then(|| h.clone())
                },
            )
            .await?;
        eprintln!("healthz during the outage: {}", health["stores"]["events"]);
        let status = api.status(&b).await?;
        ensure!(
            status[0]["online"] == true,
            "the agent stays connected during the outage: {status}"
        );
        search.resume();
        let resumed_at = now_ms();

        let during = json!({"after": paused_at, "before": resumed_at, "size": 1000});
        let lines = api
            .poll_post(
                &logs,
                &during,
                "lines logged during the outage",
                Duration::from_secs(40),
                |v| v.as_array().filter(|a| a.len() >= 20).map(Vec::len),
            )
            .await?;
        eprintln!("{lines} lines logged during the outage were written after it");
        api.poll_get(
            "/healthz",
            "events store up again",
            Duration::from_secs(30),
            |h| (h["stores"]["events"]["up"] == true && h["writer"]["dropped"] == 0).then_some(()),
        )
        .await?;
        Ok(())
    })
    .await
}

#[test]
fn unreachable_mongodb_stops_km_naming_the_variable() {
    if !km_e2e::enabled("the km binary") {
        return;
    }
    let closed = free_port().unwrap();
    let url = format!("mongodb://km:s3cret-pw@127.0.0.1:{closed}/km");
    let (status, stderr) = km_start_failure(&[("KM_MONGO_URL", &url)]).unwrap();
    assert!(!status.success(), "km exited successfully: {stderr}");
    assert!(
        stderr.contains("KM_MONGO_URL: cannot connect to 127.0.0.1:"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("s3cret-pw"),
        "the password was printed: {stderr}"
    );
}

/// Redis frozen for 10 s while an agent streams logs: km keeps running and the agent
/// connected, `/healthz` names the bus, commands to agents on this node still run, and
/// no log line is lost (logs never wait on the bus).
#[tokio::test]
async fn redis_outage_loses_nothing() {
    e2e(async {
        let redis = Redis::start()?;
        let (_link, api, b) = logging_on(vec![("KM_REDIS_URL".into(), redis.url())]).await?;

        redis.pause();
        let paused_at = now_ms();
        api.poll_get(
            "/healthz",
            "bus reported down",
            Duration::from_secs(10),
            |h| (h["stores"]["bus"]["up"] == false && h["status"] == "degraded").then_some(()),
        )
        .await?;
        let restart =
            json!({"server_name": "web-1", "method_name": "restart", "app_name": "logger"});
        let r = api.trigger_pm2(&b, &restart).await?;
        ensure!(
            r.ok(),
            "a command to an agent on this node during the outage: HTTP {}: {}",
            r.status,
            r.text
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        let status = api.status(&b).await?;
        ensure!(
            status[0]["online"] == true,
            "the agent stays connected: {status}"
        );
        redis.resume();
        let resumed_at = now_ms();

        // The logger prints 5 lines a second; all of the outage's are stored.
        let during =
            json!({"app_name": "logger", "after": paused_at, "before": resumed_at, "size": 1000});
        let logs = format!("/api/bucket/{b}/data/logs");
        let expected = ((resumed_at - paused_at) / 200 * 8 / 10) as usize;
        let stored = api
            .poll_post(
                &logs,
                &during,
                "the outage's log lines",
                Duration::from_secs(15),
                |v| v.as_array().filter(|a| a.len() >= expected).map(Vec::len),
            )
            .await?;
        eprintln!(
            "{stored} lines stored from a {} ms Redis outage",
            resumed_at - paused_at
        );
        api.poll_get("/healthz", "bus up again", Duration::from_secs(15), |h| {
            (h["stores"]["bus"]["up"] == true).then_some(())
        })
        .await?;
        Ok(())
    })
    .await
}
