//! End-to-end tests with the real, unmodified pm2 7.0.4 agent against the real `km` binary.
//! Each test starts its own km (free port, temp data dir) and its own pm2 (fresh
//! `PM2_HOME`, `pm2 kill` on drop). Run with `--test-threads=2`: pm2 daemons are heavy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, Result, bail, ensure};
use km_e2e::{
    Km, LinkOpts, OsMem, Pm2, SecantusDb, e2e, find_process, linked, linked_with, metric_number,
    now_ms, server_entry, show,
};
use serde_json::{Value, json};
use std::time::Duration;

/// An app using `@pm2/io`: a metric `answer` = 42 and a custom action `echo`.
const APP_IO: &str = r#"
const io = require('@pm2/io');
io.metric({ name: 'answer' }).set(42);
io.action('echo', (reply) => reply({ ok: true, from: 'e2e' }));
setInterval(() => {}, 1000);
"#;

/// An app using `tx2`: a metric `tx2 answer` = 7 and two custom events every half second.
const APP_TX2: &str = r#"
const tx2 = require('tx2');
tx2.metric('tx2 answer', () => 7);
setInterval(() => {
  tx2.event('e2e-hello', { n: 1 });
  tx2.event('e2e-other', { n: 2 });
}, 500);
"#;

/// A plain app printing a line every half second.
const APP_PLAIN: &str = r#"
let n = 0;
setInterval(() => console.log('plain tick ' + (n++)), 500);
"#;

/// Prints one out and one err line four times a second.
const APP_LOGGER: &str = r#"
let n = 0;
setInterval(() => {
  n++;
  console.log('e2e-out-line ' + n);
  console.error('e2e-err-line ' + n);
}, 250);
"#;

/// Prints a few lines, then throws an uncaught exception from a timer (pm2 restarts it).
const APP_THROWER: &str = r#"
let n = 0;
setInterval(() => console.log('e2e-before-crash ' + (n++)), 100);
setTimeout(() => { throw new Error('e2e-boom'); }, 1500);
"#;

const WAIT: Duration = Duration::from_secs(20);

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The pm_id of `io-app` on web-1 once it lists the action `name`.
async fn wait_action(api: &km_e2e::Api, bucket: &str, name: &str) -> Result<i64> {
    api.wait_process(
        bucket,
        "web-1",
        "io-app",
        &format!("the `{name}` action listed"),
        WAIT,
        |p| {
            arr(&p["axm_actions"])
                .iter()
                .any(|a| a["action_name"] == name)
                .then(|| p["pm_id"].as_i64())
                .flatten()
        },
    )
    .await
}

/// `at` values must be non-increasing (newest first).
fn check_newest_first(items: &[Value], what: &str) -> Result<()> {
    let ats: Vec<i64> = items.iter().filter_map(|e| e["at"].as_i64()).collect();
    ensure!(
        ats.len() == items.len(),
        "{what}: every element must have a numeric `at`: {}",
        show(&Value::from(items.to_vec()), 3000)
    );
    ensure!(
        ats.windows(2).all(|w| w[0] >= w[1]),
        "{what}: not newest first: ats = {ats:?}"
    );
    Ok(())
}

#[tokio::test]
async fn link_prints_activated_and_machine_comes_online() {
    e2e(async {
        let km = Km::start().await?;
        let user = km.api().register_random().await?;
        let bucket = user.api.create_bucket("e2e-link").await?;
        ensure!(
            bucket.id.len() == 24 && bucket.id.chars().all(|c| c.is_ascii_hexdigit()),
            "bucket _id must be 24 hex chars, got {:?}",
            bucket.id
        );
        let pm2 = Pm2::new(&km.url())?;
        let (code, out) = pm2
            .link(&bucket.secret_id, &bucket.public_id, "web-1")
            .await?;
        ensure!(code == 0, "pm2 link exited {code}, output:\n{out}");
        ensure!(
            out.contains("[+] PM2+ activated!"),
            "pm2 link did not print `[+] PM2+ activated!`:\n{out}"
        );
        ensure!(
            !out.lines().any(|l| l.contains("WARNING")),
            "pm2 link printed a WARNING (the agent did not connect within 7 s):\n{out}"
        );
        let t0 = now_ms();
        user.api
            .wait_server(
                &bucket.id,
                "web-1",
                "web-1 online with a fresh last_update",
                Duration::from_secs(10),
                |s| {
                    (s["online"] == true && s["last_update"].as_i64() >= Some(t0 - 2000))
                        .then_some(())
                },
            )
            .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn apps_and_custom_metric_appear_in_status() {
    e2e(async {
        let l = linked(
            "web-1",
            &[
                ("io-app", APP_IO),
                ("plain", APP_PLAIN),
                ("tx2-app", APP_TX2),
            ],
        )
        .await?;
        // Within 5 s of `pm2 link` returning.
        let server = l
            .api()
            .wait_server(
                &l.bucket.id,
                "web-1",
                "io-app with axm_monitor.answer = 42, tx2-app with `tx2 answer` = 7, plain online",
                Duration::from_secs(5),
                |s| {
                    let io = find_process(s, "io-app")?;
                    let tx2 = find_process(s, "tx2-app")?;
                    let plain = find_process(s, "plain")?;
                    let answer = metric_number(&io["axm_monitor"]["answer"]["value"])?;
                    let tx2_answer = metric_number(&tx2["axm_monitor"]["tx2 answer"]["value"])?;
                    (answer == 42.0
                        && tx2_answer == 7.0
                        && plain["status"] == "online"
                        && s["online"] == true)
                        .then(|| s.clone())
                },
            )
            .await?;
        let now = now_ms();
        let last = server["last_update"].as_i64().unwrap_or(0);
        ensure!(
            (now - 10_000..=now + 2_000).contains(&last),
            "last_update must be epoch ms near now ({now}), got {}",
            server["last_update"]
        );
        for name in ["io-app", "plain", "tx2-app"] {
            let p = find_process(&server, name).context("process listed")?;
            ensure!(
                p["pid"].as_i64().unwrap_or(0) > 0,
                "{name}: pid must be > 0: {}",
                show(p, 2000)
            );
            ensure!(
                p["pm_id"].is_number() && p["restart_time"].is_number(),
                "{name}: pm_id and restart_time must be numbers: {}",
                show(p, 2000)
            );
        }
        // The real pids, as pm2 itself reports them.
        let jlist = l.pm2.jlist().await?;
        for p in arr(&jlist) {
            let name = p["name"].as_str().unwrap_or_default();
            let listed = find_process(&server, name).context("jlist app in status")?;
            ensure!(
                listed["pid"] == p["pid"],
                "{name}: status pid {} != pm2 jlist pid {}",
                listed["pid"],
                p["pid"]
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn trigger_restart_changes_pid_and_bumps_restart_time() {
    e2e(async {
        let l = linked("web-1", &[("plain", APP_PLAIN)]).await?;
        let api = l.api();
        let b = &l.bucket.id;
        let (pid0, rt0) = api
            .wait_process(b, "web-1", "plain", "plain online", WAIT, |p| {
                let pid = p["pid"].as_i64().filter(|&pid| pid > 0)?;
                (p["status"] == "online").then_some((pid, p["restart_time"].as_i64()?))
            })
            .await?;
        let t_trigger = now_ms();
        let r = api
            .trigger_pm2(
                b,
                &json!({"server_name": "web-1", "method_name": "restart", "app_name": "plain"}),
            )
            .await?;
        ensure!(
            r.status == 200 && r.body["success"] == true,
            "triggerPM2 restart: expected 200 {{success:true}}, got HTTP {}: {}",
            r.status,
            r.text
        );
        let (pid1, rt1) = api
            .wait_process(
                b,
                "web-1",
                "plain",
                "a new pid and a higher restart_time",
                WAIT,
                |p| {
                    let pid = p["pid"].as_i64().filter(|&pid| pid > 0 && pid != pid0)?;
                    let rt = p["restart_time"].as_i64().filter(|&rt| rt > rt0)?;
                    (p["status"] == "online").then_some((pid, rt))
                },
            )
            .await?;
        ensure!(
            rt1 == rt0 + 1,
            "one restart command must restart once: restart_time {rt0} -> {rt1}"
        );
        ensure!(pid1 != pid0);
        // The agent's answer is stored as an event.
        api.wait_data(
            b,
            "events",
            &json!({"type": "trigger:pm2:result"}),
            "a stored trigger:pm2:result event for the restart",
            Duration::from_secs(10),
            |e| {
                (e["type"] == "trigger:pm2:result" && e.to_string().contains("restart"))
                    .then_some(())
            },
        )
        .await?;
        // And the restart shows in the process events.
        api.wait_data(
            b,
            "processEvents",
            &json!({"app_name": "plain"}),
            "a process event of `plain` after the restart",
            Duration::from_secs(10),
            |e| {
                (e["app_name"] == "plain"
                    && e["server_name"] == "web-1"
                    && e["event"].is_string()
                    && e["at"].as_i64() >= Some(t_trigger - 1000))
                .then_some(())
            },
        )
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn start_logging_streams_app_lines_to_data_logs() {
    e2e(async {
        let l = linked("web-1", &[("logger", APP_LOGGER)]).await?;
        let api = l.api();
        let b = &l.bucket.id;
        l.wait_apps(&["logger"], WAIT).await?;
        let r = api
        .trigger_pm2(
            b,
            &json!({"server_name": "web-1", "method_name": "startLogging", "app_name": "logger"}),
        )
        .await?;
        ensure!(
            r.status == 200 && r.body["success"] == true,
            "triggerPM2 startLogging: expected 200 {{success:true}}, got HTTP {}: {}",
            r.status,
            r.text
        );
        let filter = json!({"app_name": "logger"});
        let has = |v: &Value, needle: &str, log_type: &str| {
            arr(v).iter().any(|e| {
                e["data"].as_str().is_some_and(|d| d.contains(needle)) && e["log_type"] == log_type
            })
        };
        let logs = api
            .poll_post(
                &format!("/api/bucket/{b}/data/logs"),
                &filter,
                "out and err lines of `logger` in data/logs",
                Duration::from_secs(15),
                |v| {
                    (has(v, "e2e-out-line", "out") && has(v, "e2e-err-line", "err"))
                        .then(|| v.clone())
                },
            )
            .await?;
        let items = arr(&logs);
        check_newest_first(items, "data/logs")?;
        for e in items {
            ensure!(
                e["app_name"] == "logger" && e["server_name"] == "web-1" && e["pm_id"].is_number(),
                "log entry must carry app_name, server_name and pm_id: {}",
                show(e, 1000)
            );
        }
        // Search: case-insensitive, only matching lines.
        let found = api
            .post_ok(
                &format!("/api/bucket/{b}/data/logs"),
                &json!({"app_name": "logger", "q": "E2E-ERR-LINE"}),
            )
            .await?;
        ensure!(
            !arr(&found).is_empty()
                && arr(&found).iter().all(|e| e["data"]
                    .as_str()
                    .is_some_and(|d| d.contains("e2e-err-line"))),
            "logs search q=E2E-ERR-LINE: {}",
            show(&found, 2000)
        );
        // Histogram: per-minute counts adding up to at least the lines seen.
        let steps = api
            .post_ok(
                &format!("/api/bucket/{b}/data/logs/histogram"),
                &json!({"app_name": "logger", "q": "e2e-err-line", "interval": "minute"}),
            )
            .await?;
        let total: u64 = arr(&steps).iter().filter_map(|s| s["count"].as_u64()).sum();
        ensure!(
            total >= arr(&found).len() as u64
                && arr(&steps)
                    .iter()
                    .all(|s| s["at"].as_i64().is_some_and(|at| at % 60_000 == 0)),
            "logs histogram {}: counts {total} < {} found lines, or steps not on minutes",
            show(&steps, 2000),
            arr(&found).len()
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn uncaught_exception_is_stored_with_last_logs() {
    e2e(async {
        let l = linked("web-1", &[("thrower", APP_THROWER)]).await?;
        let exc = l
            .api()
            .wait_data(
                &l.bucket.id,
                "exceptions",
                &json!({"app_name": "thrower"}),
                "an exception `e2e-boom` of `thrower`",
                Duration::from_secs(25),
                |e| {
                    e["data"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("e2e-boom"))
                        .then(|| e.clone())
                },
            )
            .await?;
        ensure!(
            exc["app_name"] == "thrower" && exc["server_name"] == "web-1" && exc["at"].is_i64(),
            "exception must carry app_name, server_name and at: {}",
            show(&exc, 3000)
        );
        ensure!(
            exc["data"]["stack"]
                .as_str()
                .is_some_and(|s| s.contains("e2e-boom")),
            "exception data.stack must hold the stack: {}",
            show(&exc, 3000)
        );
        let last_logs = arr(&exc["data"]["last_logs"]);
        ensure!(
            last_logs
                .iter()
                .any(|l| l.as_str().is_some_and(|s| s.contains("e2e-before-crash"))),
            "exception data.last_logs must hold the app's last lines: {}",
            show(&exc, 3000)
        );
        // Grouped into one issue (same message and callsite however often pm2 restarts it).
        let api = l.api();
        let b = &l.bucket.id;
        let issues = api
            .post_ok(
                &format!("/api/bucket/{b}/data/issues/list"),
                &json!({"app_name": "thrower"}),
            )
            .await?;
        let boom: Vec<&Value> = arr(&issues)
            .iter()
            .filter(|i| {
                i["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("e2e-boom"))
            })
            .collect();
        ensure!(
            boom.len() == 1
                && boom[0]["count"].as_u64() >= Some(1)
                && boom[0]["servers"] == json!(["web-1"]),
            "issues/list: one e2e-boom issue expected: {}",
            show(&issues, 3000)
        );
        let id = boom[0]["identifier"].as_str().context("issue identifier")?;
        let occurrences = api
            .get_ok(&format!("/api/bucket/{b}/data/issues/occurrences/{id}"))
            .await?;
        ensure!(
            !arr(&occurrences).is_empty() && arr(&occurrences).iter().all(|e| e["issue"] == id),
            "occurrences of {id}: {}",
            show(&occurrences, 2000)
        );
        let r = api
            .request(
                reqwest::Method::DELETE,
                &format!("/api/bucket/{b}/data/issues/{id}"),
                None,
            )
            .await?;
        ensure!(
            r.status == 200 && r.body["deleted"].as_u64() >= Some(1),
            "delete issue: {} {}",
            r.status,
            r.text
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn custom_action_reply_is_stored_as_event() {
    e2e(async {
        let l = linked("web-1", &[("io-app", APP_IO)]).await?;
        let api = l.api();
        let b = &l.bucket.id;
        let pm_id = wait_action(api, b, "echo").await?;
        let t_trigger = now_ms();
        let r = api
            .trigger_action(
                b,
                &json!({"server_name": "web-1", "process_id": pm_id, "action_name": "echo"}),
            )
            .await?;
        ensure!(
            r.status == 200 && r.body["success"] == true,
            "actions/trigger echo: expected 200 {{success:true}}, got HTTP {}: {}",
            r.status,
            r.text
        );
        let reply = api
            .wait_data(
                b,
                "events",
                &json!({"type": "axm:reply"}),
                "the axm:reply of `echo`",
                Duration::from_secs(15),
                |e| {
                    (e["type"] == "axm:reply"
                        && e["data"]["action_name"] == "echo"
                        && e["data"]["return"]["ok"] == true)
                        .then(|| e.clone())
                },
            )
            .await?;
        ensure!(
            reply["app_name"] == "io-app"
                && reply["server_name"] == "web-1"
                && reply["data"]["return"]["from"] == "e2e"
                && reply["at"].as_i64() >= Some(t_trigger - 1000),
            "axm:reply event fields: {}",
            show(&reply, 3000)
        );
        // The type filter is applied: only axm:reply events come back.
        let all = api.data(b, "events", &json!({"type": "axm:reply"})).await?;
        ensure!(
            arr(&all).iter().all(|e| e["type"] == "axm:reply"),
            "data/events {{type:axm:reply}} returned other types: {}",
            show(&all, 3000)
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn cpu_profile_is_stored_and_downloadable() {
    e2e(async {
        let l = linked("web-1", &[("io-app", APP_IO)]).await?;
        let api = l.api();
        let b = &l.bucket.id;
        let pm_id = wait_action(api, b, "km:cpu:profiling:start").await?;
        for action in ["km:cpu:profiling:start", "km:cpu:profiling:stop"] {
            let r = api
                .trigger_action(
                    b,
                    &json!({"server_name": "web-1", "process_id": pm_id, "action_name": action}),
                )
                .await?;
            ensure!(r.status == 200, "{action}: HTTP {}: {}", r.status, r.text);
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let profile = api
            .wait_data(
                b,
                "profilings",
                &json!({}),
                "a stored CPU profile",
                Duration::from_secs(20),
                |p| p["uuid"].as_str().map(|_| p.clone()),
            )
            .await?;
        let uuid = profile["uuid"].as_str().context("profile uuid")?;
        let meta = api
            .get_ok(&format!("/api/bucket/{b}/data/profilings/{uuid}"))
            .await?;
        ensure!(
            meta["size"].as_u64() > Some(10) && meta["data"].get("data").is_none(),
            "profile metadata: {}",
            show(&meta, 2000)
        );
        let download = api
            .request(
                reqwest::Method::GET,
                &format!("/api/bucket/{b}/data/profilings/{uuid}/download"),
                None,
            )
            .await?;
        let parsed: Value =
            serde_json::from_str(&download.text).context("the downloaded profile is JSON")?;
        ensure!(
            download.status == 200 && parsed["nodes"].is_array(),
            "downloaded CPU profile: {}",
            &download.text[..download.text.len().min(300)]
        );
        let r = api
            .request(
                reqwest::Method::DELETE,
                &format!("/api/bucket/{b}/data/profilings/{uuid}"),
                None,
            )
            .await?;
        ensure!(r.status == 200, "delete profile: {} {}", r.status, r.text);
        let gone = api
            .request(
                reqwest::Method::GET,
                &format!("/api/bucket/{b}/data/profilings/{uuid}"),
                None,
            )
            .await?;
        ensure!(
            gone.status == 404,
            "deleted profile still there: {}",
            gone.status
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn custom_event_is_stored_and_found_by_name() {
    e2e(async {
        let l = linked("web-1", &[("tx2-app", APP_TX2)]).await?;
        let api = l.api();
        let b = &l.bucket.id;
        // `event_name` is the custom event's name (as in @pm2/js-api's data/events).
        let ev = api
            .wait_data(
                b,
                "events",
                &json!({"type": "human:event", "app_name": "tx2-app", "event_name": "e2e-hello"}),
                "a human:event `e2e-hello` of tx2-app",
                Duration::from_secs(10),
                |e| {
                    (e["type"] == "human:event" && e.to_string().contains("e2e-hello"))
                        .then(|| e.clone())
                },
            )
            .await?;
        ensure!(
            ev["app_name"] == "tx2-app" && ev["server_name"] == "web-1" && ev["at"].is_i64(),
            "human:event fields: {}",
            show(&ev, 3000)
        );
        let filter = json!({"type": "human:event", "event_name": "e2e-hello"});
        let found = api.data(b, "events", &filter).await?;
        ensure!(
            !arr(&found).is_empty()
                && arr(&found).iter().all(|e| {
                    let t = e.to_string();
                    t.contains("e2e-hello") && !t.contains("e2e-other")
                }),
            "data/events {filter} must return only `e2e-hello` events: {}",
            show(&found, 3000)
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn wrong_secret_is_refused_with_the_server_message() {
    e2e(async {
    let km = Km::start().await?;
    let user = km.api().register_random().await?;
    let bucket = user.api.create_bucket("e2e-wrong-secret").await?;
    let wrong = "0123456789abcdef";
    ensure!(wrong != bucket.secret_id);
    // What km answers the agent for these keys.
    let v = km
        .api()
        .verify_pm2(&bucket.public_id, wrong, "web-1")
        .await?;
    ensure!(
        v.body["active"] == false && v.body["error"] == true,
        "verifyPM2 with a wrong secret: expected {{active:false, error:true, msg}}, got HTTP {}: {}",
        v.status,
        v.text
    );
    let msg = v.body["msg"]
        .as_str()
        .filter(|m| !m.trim().is_empty())
        .with_context(|| format!("verifyPM2 answer has no msg: {}", v.text))?
        .to_string();
    let pm2 = Pm2::new(&km.url())?;
    let (code, out) = pm2.link(wrong, &bucket.public_id, "web-1").await?;
    ensure!(
        code == 1,
        "pm2 link with a wrong secret must exit 1, got {code}:\n{out}"
    );
    ensure!(
        out.contains(&msg),
        "pm2 link output must show the server's message {msg:?}:\n{out}"
    );
    ensure!(
        !out.contains("PM2+ activated"),
        "pm2 link with a wrong secret printed activated:\n{out}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = user.api.status(&bucket.id).await?;
    ensure!(
        server_entry(&status, "web-1").is_none(),
        "a refused agent must not appear in data/status: {}",
        show(&status, 3000)
    );
    Ok(())
    })
    .await
}

#[tokio::test]
async fn two_machines_are_both_listed() {
    e2e(async {
        let km = Km::start().await?;
        let user = km.api().register_random().await?;
        let bucket = user.api.create_bucket("e2e-two").await?;
        let pm2_a = Pm2::new(&km.url())?;
        let pm2_b = Pm2::new(&km.url())?;
        let (a, b) = tokio::join!(
            async {
                pm2_a.start_app("app-a", APP_PLAIN).await?;
                pm2_a
                    .link(&bucket.secret_id, &bucket.public_id, "web-1")
                    .await
            },
            async {
                pm2_b.start_app("app-b", APP_PLAIN).await?;
                pm2_b
                    .link(&bucket.secret_id, &bucket.public_id, "web-2")
                    .await
            }
        );
        for (machine, res) in [("web-1", a?), ("web-2", b?)] {
            ensure!(
                res.0 == 0,
                "pm2 link {machine} exited {}:\n{}",
                res.0,
                res.1
            );
        }
        let status = user
            .api
            .poll_get(
                &format!("/api/bucket/{}/data/status", bucket.id),
                "web-1 (app-a) and web-2 (app-b) both online",
                WAIT,
                |v| {
                    let one = server_entry(v, "web-1")?;
                    let two = server_entry(v, "web-2")?;
                    (one["online"] == true
                        && two["online"] == true
                        && find_process(one, "app-a").is_some()
                        && find_process(two, "app-b").is_some())
                    .then(|| v.clone())
                },
            )
            .await?;
        let one = server_entry(&status, "web-1").context("web-1")?;
        let two = server_entry(&status, "web-2").context("web-2")?;
        ensure!(
            find_process(one, "app-b").is_none() && find_process(two, "app-a").is_none(),
            "processes listed under the wrong machine: {}",
            show(&status, 6000)
        );
        ensure!(
            arr(&status)
                .iter()
                .filter(|s| s["server_name"] == "web-1" || s["server_name"] == "web-2")
                .count()
                == 2,
            "each machine must be listed once: {}",
            show(&status, 6000)
        );
        drop(pm2_a);
        drop(pm2_b);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn another_user_cannot_see_the_bucket() {
    e2e(async {
        // The owner registers first (and so is the admin); the other user is a plain user.
        let l = linked("web-1", &[("plain", APP_PLAIN)]).await?;
        let b = &l.bucket;
        l.wait_apps(&["plain"], WAIT).await?;
        // The owner sees it, with its endpoints.
        let own = l.api().get_ok(&format!("/api/bucket/{}", b.id)).await?;
        ensure!(
            own["_id"] == b.id.as_str() && own["node"]["endpoints"]["web"].is_string(),
            "owner GET /api/bucket/:id: expected the bucket with node.endpoints, got {}",
            show(&own, 3000)
        );
        let other = l.km.api().register_random().await?;
        ensure!(
            other.raw["user"]["role"] != l.user.raw["user"]["role"]
                || other.raw["user"]["role"].is_null(),
            "the second user must not get the first user's (admin) role: {} vs {}",
            other.raw["user"],
            l.user.raw["user"]
        );
        let secrets = [
            b.secret_id.as_str(),
            b.public_id.as_str(),
            b.name.as_str(),
            "web-1",
            "plain",
        ];
        let check = |what: &str, status: u16, text: &str| -> Result<()> {
            ensure!(
                status == 403 || status == 404,
                "{what} by another user: expected 403 or 404, got {status}: {text}"
            );
            for s in secrets {
                ensure!(
                    !text.contains(s),
                    "{what} by another user revealed {s:?}: {text}"
                );
            }
            Ok(())
        };
        let list = other.api.get_ok("/api/bucket/").await?;
        ensure!(
            !list.to_string().contains(&b.id) && !list.to_string().contains(&b.secret_id),
            "GET /api/bucket/ of another user lists the bucket: {list}"
        );
        let r = other.api.get(&format!("/api/bucket/{}", b.id)).await?;
        check("GET /api/bucket/:id", r.status, &r.text)?;
        let r = other
            .api
            .get(&format!("/api/bucket/{}/data/status", b.id))
            .await?;
        check("GET data/status", r.status, &r.text)?;
        for kind in ["logs", "exceptions", "events", "processEvents"] {
            let r = other
                .api
                .post(&format!("/api/bucket/{}/data/{kind}", b.id), &json!({}))
                .await?;
            check(&format!("POST data/{kind}"), r.status, &r.text)?;
        }
        let r = other
            .api
            .post(
                &format!("/api/bucket/{}/data/metrics/histogram", b.id),
                &json!({"interval": "minute", "before": 60}),
            )
            .await?;
        check("POST data/metrics/histogram", r.status, &r.text)?;
        let pid0 = find_process(&l.wait_apps(&["plain"], WAIT).await?, "plain")
            .and_then(|p| p["pid"].as_i64())
            .context("plain pid")?;
        let r = other
            .api
            .trigger_pm2(
                &b.id,
                &json!({"server_name": "web-1", "method_name": "restart", "app_name": "plain"}),
            )
            .await?;
        check("POST actions/triggerPM2", r.status, &r.text)?;
        let r = other
            .api
            .trigger_action(
                &b.id,
                &json!({"server_name": "web-1", "process_id": 0, "action_name": "km:heapdump"}),
            )
            .await?;
        check("POST actions/trigger", r.status, &r.text)?;
        // Without a token, or with a bad one: 401.
        let anon = l.km.api();
        let r = anon.get(&format!("/api/bucket/{}", b.id)).await?;
        ensure!(
            r.status == 401,
            "GET /api/bucket/:id without a token: expected 401, got {}: {}",
            r.status,
            r.text
        );
        let r = anon
            .with_token("not-a-token")
            .get(&format!("/api/bucket/{}/data/status", b.id))
            .await?;
        ensure!(
            r.status == 401,
            "data/status with a bad token: expected 401, got {}: {}",
            r.status,
            r.text
        );
        // The refused restart did not run.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let st = l.wait_apps(&["plain"], WAIT).await?;
        let pid1 = find_process(&st, "plain").and_then(|p| p["pid"].as_i64());
        ensure!(
            pid1 == Some(pid0),
            "another user's triggerPM2 restart ran: pid {pid0} -> {pid1:?}"
        );
        Ok(())
    })
    .await
}

/// Path exercised: the agent runs with the DNS shim (`NODE_OPTIONS=--require`), so when its
/// socket drops it believes the internet is up and retries the websocket every 5 s (its
/// `_reconnect`), not through the 60 s re-verify.
#[tokio::test]
async fn agent_reconnects_after_km_restart() {
    e2e(reconnects_after_km_restart(Vec::new())).await
}

/// The same on the scale-out stores: users, buckets and the server list live in MongoDB
/// (SecantusDB here), events in Elasticsearch (osmem-server), across the restart.
#[tokio::test]
async fn agent_reconnects_after_km_restart_on_scale_out_stores() {
    e2e(async {
        let mongo = SecantusDb::start()?;
        let search = OsMem::start()?;
        let env = vec![
            ("KM_MONGO_URL".to_string(), mongo.url("km_e2e")),
            ("KM_ELASTICSEARCH_URL".to_string(), search.url().to_string()),
        ];
        reconnects_after_km_restart(env).await
    })
    .await
}

/// Links a pm2 (with the DNS shim: the agent retries its websocket every 5 s), restarts
/// km, and checks the session resumes as one, with commands running once.
async fn reconnects_after_km_restart(km_env: Vec<(String, String)>) -> anyhow::Result<()> {
    {
        let opts = LinkOpts {
            dns_shim: true,
            km_env,
            ..LinkOpts::default()
        };
        let mut l = linked_with("web-1", &[("plain", APP_PLAIN)], opts).await?;
        let b = l.bucket.id.clone();
        let before = l.wait_apps(&["plain"], WAIT).await?;
        let rt0 = find_process(&before, "plain")
            .and_then(|p| p["restart_time"].as_i64())
            .context("restart_time")?;
        l.km.restart().await?;
        let t_up = now_ms();
        let api = l.api().clone();
        let server = api
            .wait_server(
                &b,
                "web-1",
                "web-1 online again with last_update after the restart (the agent retries every 5 s)",
                Duration::from_secs(30),
                |s| {
                    (s["online"] == true
                        && s["last_update"].as_i64().is_some_and(|t| t > t_up)
                        && find_process(s, "plain").is_some())
                    .then(|| s.clone())
                },
            )
            .await?;
        eprintln!(
            "agent reconnected: status resumed {} ms after km was back up",
            now_ms() - t_up
        );
        let status = api.status(&b).await?;
        let n = arr(&status)
            .iter()
            .filter(|s| s["server_name"] == "web-1")
            .count();
        ensure!(
            n == 1,
            "one logical session: web-1 must be listed once after the reconnect, got {n}: {}",
            show(&status, 6000)
        );
        // The stop flushed the unfinished minute of every metric: history is there.
        let histogram = format!("/api/bucket/{b}/data/metrics/histogram");
        let cpu_points = |v: &Value| {
            v["web-1"]["plain"]["cpu"]["timestamps_and_stats"]
                .as_array()
                .filter(|points| !points.is_empty() && points[0]["count"].as_u64() > Some(0))
                .map(Vec::len)
        };
        api.poll_post(
            &histogram,
            &json!({"interval": "minute", "before": 10}),
            "cpu history of `plain`",
            Duration::from_secs(10),
            cpu_points,
        )
        .await?;
        // last_update keeps advancing.
        let last = server["last_update"].as_i64().unwrap_or(0);
        api.wait_server(
            &b,
            "web-1",
            "last_update advancing",
            Duration::from_secs(10),
            |s| (s["online"] == true && s["last_update"].as_i64() > Some(last)).then_some(()),
        )
        .await?;
        // Commands reach the agent again, and run once.
        let r = api
            .trigger_pm2(
                &b,
                &json!({"server_name": "web-1", "method_name": "restart", "app_name": "plain"}),
            )
            .await?;
        ensure!(
            r.status == 200 && r.body["success"] == true,
            "triggerPM2 restart after reconnect: expected 200 {{success:true}}, got HTTP {}: {}",
            r.status,
            r.text
        );
        api.wait_process(&b, "web-1", "plain", "restart_time bumped", WAIT, |p| {
            (p["restart_time"].as_i64() > Some(rt0)).then_some(())
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let st = api.status(&b).await?;
        let rt1 = server_entry(&st, "web-1")
            .and_then(|s| find_process(s, "plain"))
            .and_then(|p| p["restart_time"].as_i64());
        ensure!(
            rt1 == Some(rt0 + 1),
            "one restart command after reconnect must restart once: restart_time {rt0} -> {rt1:?}"
        );
        Ok(())
    }
}

#[tokio::test]
async fn bad_trigger_requests_and_unknown_keys_are_rejected() {
    e2e(async {
    let l = linked("web-1", &[("plain", APP_PLAIN)]).await?;
    let api = l.api();
    let b = &l.bucket.id;
    let st = l.wait_apps(&["plain"], WAIT).await?;
    let p = find_process(&st, "plain").context("plain")?;
    let (pid0, rt0) = (p["pid"].clone(), p["restart_time"].clone());

    let bad = [
        (
            "unknown method",
            json!({"server_name": "web-1", "method_name": "explode", "app_name": "plain"}),
        ),
        (
            "`stop` (refused by the protocol)",
            json!({"server_name": "web-1", "method_name": "stop", "app_name": "plain"}),
        ),
        (
            "missing app_name",
            json!({"server_name": "web-1", "method_name": "restart"}),
        ),
        (
            "scale without number",
            json!({"server_name": "web-1", "method_name": "scale", "app_name": "plain"}),
        ),
        (
            "missing method_name",
            json!({"server_name": "web-1", "app_name": "plain"}),
        ),
        (
            "missing server_name",
            json!({"method_name": "restart", "app_name": "plain"}),
        ),
    ];
    let mut failures = Vec::new();
    for (what, body) in &bad {
        let r = api.trigger_pm2(b, body).await?;
        if r.status != 400 {
            failures.push(format!(
                "triggerPM2 with {what} ({body}): expected 400, got {}: {}",
                r.status, r.text
            ));
        }
    }
    let r = api
        .trigger_pm2(
            b,
            &json!({"server_name": "no-such-server", "method_name": "restart", "app_name": "plain"}),
        )
        .await?;
    if r.status != 404 {
        failures.push(format!(
            "triggerPM2 for a server that is not connected: expected 404, got {}: {}",
            r.status, r.text
        ));
    }
    // A good one still works (the 400s are not a blanket refusal).
    let r = api
        .trigger_pm2(
            b,
            &json!({"server_name": "web-1", "method_name": "ping", "app_name": "plain"}),
        )
        .await?;
    if !(r.status == 200 && r.body["success"] == true) {
        failures.push(format!(
            "triggerPM2 ping: expected 200 {{success:true}}, got {}: {}",
            r.status, r.text
        ));
    }
    // verifyPM2 with an unknown public key.
    let v =
        l.km.api()
            .verify_pm2("unknownpublickey0000", "unknownsecret0000", "web-9")
            .await?;
    let msg_ok = v.body["msg"].as_str().is_some_and(|m| !m.trim().is_empty());
    if !(v.body["active"] == false && v.body["error"] == true && msg_ok) {
        failures.push(format!(
            "verifyPM2 with an unknown public key: expected JSON {{active:false, error:true, msg}}, got HTTP {}: {}",
            v.status, v.text
        ));
    }
    // The agent survived all that: still online, nothing restarted.
    let t = now_ms();
    let st = api
        .wait_server(b, "web-1", "online with a fresh last_update", WAIT, |s| {
            (s["online"] == true && s["last_update"].as_i64() > Some(t)).then(|| s.clone())
        })
        .await?;
    let p = find_process(&st, "plain").context("plain")?;
    if p["pid"] != pid0 || p["restart_time"] != rt0 {
        failures.push(format!(
            "a refused command changed the process: pid {pid0} -> {}, restart_time {rt0} -> {}",
            p["pid"], p["restart_time"]
        ));
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
    })
    .await
}
