//! The dashboard in a real browser: Debian's Chromium driven by playwright-core (the node
//! script `tests/js/dashboard.js`) against the real `km`, with a real pm2 7.0.4 linked by
//! the very command the page shows.
//!
//! The script signs up (first account: admin), creates a bucket, copies the link command
//! (and reads the clipboard back), then hands the command to this test through a file; the
//! test starts an `@pm2/io` app in a fresh pm2 and runs `pm2 link SECRET PUBLIC` with the
//! command's `KEYMETRICS_NODE`, and tells the script. The script then checks, without
//! reloading: the process row appears on the overview, the process page charts the
//! custom metric, `restart` bumps the restarts cell, the live tail shows the app's lines,
//! and an exception thrown by a custom action shows as an issue; the app runs with
//! `--trace`, and its traces page lists its routes and slowest requests, one of which
//! opens as a waterfall of the request, its call and the call's own request. Screenshots of both pages
//! at 1280x800 and 390x844 go to `<target>/e2e-screenshots/dashboard/`.
//!
//! The second test (`tests/js/dashboard_live.js`) links a pm2 running a cluster app on two
//! instances and keeps the overview and the process page open in two tabs, never
//! reloaded: "scale +1" on the process page makes exactly three instances on both,
//! "scale -1" exactly two again (the removed row gone within 2 s of the API), and when
//! the test kills the agent both show the server offline and no process online within
//! 5 s of the API saying so; the "N processes" line follows each change. Reloaded, both
//! pages still show the server offline and its processes not online. The script asks this
//! test for `pm2 jlist` counts and the kill through `request-<n>.json` / `reply-<n>.json`.
//!
//! The third (`tests/js/team.js`) runs km with a real SMTP server: invitations, an
//! ownership transfer, personal tokens and the admin's accounts page, the mailed links
//! read by this test and handed to the script the same way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, Result, bail, ensure};
use km_e2e::{Km, Pm2, ScriptOutput, Smtp, e2e, now_ms, run_node_script, target_dir};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const APP: &str = "dash-app";
const METRIC: &str = "Realtime users";
const NEEDLE: &str = "dashboard-tick";
const BOOM: &str = "boom";
const EXCEPTION: &str = "dashboard boom";

/// A metric, a line every half second, a custom action that replies, then throws from a
/// timer (an uncaught exception: `@pm2/io` reports it, pm2 restarts the app), and a
/// request a second to `/orders/42` whose handler calls `/inner/7` on the same server
/// (started with `--trace`: a trace of a SERVER span, its CLIENT call and the inner SERVER
/// span).
const APP_SRC: &str = r#"
const io = require('@pm2/io');
const http = require('http');
io.metric({ name: 'Realtime users' }).set(42);
io.action('boom', (reply) => {
  reply({ ok: true, throwing: 'dashboard boom' });
  setTimeout(() => { throw new Error('dashboard boom'); }, 200);
});
let n = 0;
setInterval(() => console.log('dashboard-tick ' + (n++)), 500);
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/inner')) { setTimeout(() => res.end('inner'), 15); return; }
  http.get(`http://127.0.0.1:${server.address().port}/inner/7`, (r) => { r.resume(); r.on('end', () => res.end('outer')); });
}).listen(0, '127.0.0.1');
setInterval(() => http.get(`http://127.0.0.1:${server.address().port}/orders/42`, (r) => r.resume()).on('error', () => {}), 1000);
"#;

/// Time the script has to show the link command (browser start, sign-up, bucket).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// The script's steps are each bounded (15-20 s, 120 s for the link); ~40 s in all when
/// everything answers.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// The parts of `KEYMETRICS_NODE=<url> pm2 link <secret> <public>`.
fn parse_link_command(command: &str) -> Result<(String, String, String)> {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        [env, "pm2", "link", secret, public] => {
            let node = env.strip_prefix("KEYMETRICS_NODE=").with_context(|| {
                format!("the command does not start with KEYMETRICS_NODE=: {command:?}")
            })?;
            Ok((node.to_string(), secret.to_string(), public.to_string()))
        }
        _ => bail!("not `KEYMETRICS_NODE=<url> pm2 link <secret> <public>`: {command:?}"),
    }
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// An app started in the fresh pm2 before it is linked: `pm2 start <name>.js --name <name>
/// <args>`.
struct App {
    name: &'static str,
    source: &'static str,
    args: &'static [&'static str],
}

/// Waits for the script's link command, links a fresh pm2 running `app` with exactly
/// that command, and tells the script (`linked.json`). Returns the pm2 (killed on drop).
async fn link_from_page(dir: &Path, app: &App) -> Result<Pm2> {
    let file = dir.join("link-command.txt");
    let start = Instant::now();
    let command = loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            break text.trim().to_string();
        }
        if start.elapsed() > COMMAND_TIMEOUT {
            bail!("the script wrote no link command within {COMMAND_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (node, secret, public) = parse_link_command(&command)?;
    println!("dashboard test: linking with KEYMETRICS_NODE={node} pm2 link <secret> <public>");
    let pm2 = Pm2::new(&node)?;
    let file = pm2.write_app(&format!("{}.js", app.name), app.source)?;
    let file = file.to_string_lossy();
    let mut start = vec!["start", &*file, "--name", app.name];
    start.extend(app.args);
    pm2.run_ok(&start).await?;
    let t0 = Instant::now();
    let out = pm2.run(&["link", &secret, &public]).await?;
    ensure!(
        out.success(),
        "`pm2 link` (from the page's command) exited {:?}:\n{}",
        out.code,
        out.text
    );
    println!(
        "dashboard test: pm2 link exited 0 in {} ms",
        t0.elapsed().as_millis()
    );
    write_atomic(
        &dir.join("linked.json"),
        &json!({"code": out.code, "output": out.text}).to_string(),
    )?;
    Ok(pm2)
}

/// `<target>/e2e-screenshots/<name>`, emptied of earlier PNGs.
fn screenshot_dir(name: &str) -> Result<PathBuf> {
    let dir = target_dir().join("e2e-screenshots").join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "png") {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(dir)
}

/// A browser script's end: what the Rust side failed at (with what the script said), the
/// script's own failure, or its closing line `<name>: all steps passed` missing.
fn script_passed(
    out: Result<ScriptOutput>,
    side_failure: Option<anyhow::Error>,
    side: &str,
    name: &str,
    t0: Instant,
) -> Result<()> {
    if let Some(e) = side_failure {
        let said = match &out {
            Ok(o) => o.stdout.clone(),
            Err(e) => format!("{e:#}"),
        };
        return Err(e.context(format!("{side} failed; the script said:\n{said}")));
    }
    let out = out?;
    println!("{}", out.stdout.trim_end());
    println!(
        "{name}: browser script done in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    ensure!(
        out.stdout.contains(&format!("{name}: all steps passed")),
        "the {name} script exited 0 without its closing line:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

#[tokio::test]
async fn dashboard_links_pm2_and_follows_it_live_in_a_browser() {
    e2e(async {
        let km = Km::start().await?;
        let handshake = tempfile::Builder::new().prefix("km-dashboard-").tempdir()?;
        let shots = screenshot_dir("dashboard")?;
        println!("dashboard test: screenshots go to {}", shots.display());
        let url = km.url();
        let hand_dir = handshake.path().to_string_lossy().into_owned();
        let shots_dir = shots.to_string_lossy().into_owned();
        let env = [
            ("KM_URL", url.as_str()),
            ("KM_HANDSHAKE_DIR", hand_dir.as_str()),
            ("KM_SCREENSHOT_DIR", shots_dir.as_str()),
            ("KM_APP_NAME", APP),
            ("KM_METRIC", METRIC),
            ("KM_LOG_NEEDLE", NEEDLE),
            ("KM_BOOM_ACTION", BOOM),
            ("KM_EXCEPTION_MESSAGE", EXCEPTION),
        ];
        let t0 = Instant::now();
        let script = run_node_script("dashboard.js", &env, SCRIPT_TIMEOUT);
        tokio::pin!(script);
        let app = App {
            name: APP,
            source: APP_SRC,
            args: &["--trace"],
        };
        let linker = link_from_page(handshake.path(), &app);
        tokio::pin!(linker);
        // Dropped after the script (and before km): pm2 stays linked while the script runs.
        let mut pm2: Option<Pm2> = None;
        let mut link_error = None;
        let out = loop {
            tokio::select! {
                out = &mut script => break out,
                linked = &mut linker, if pm2.is_none() && link_error.is_none() => match linked {
                    Ok(p) => pm2 = Some(p),
                    Err(e) => {
                        // The script is waiting for this file: let it stop now.
                        let msg = format!("{e:#}");
                        write_atomic(
                            &handshake.path().join("linked.json"),
                            &json!({"error": msg}).to_string(),
                        )?;
                        link_error = Some(e);
                    }
                },
            }
        };
        script_passed(
            out,
            link_error,
            "linking pm2 with the page's command",
            "dashboard",
            t0,
        )?;
        ensure!(pm2.is_some(), "the script passed but pm2 was never linked");
        let mut pngs: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(&shots)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "png") {
                let bytes = std::fs::read(&path)?;
                ensure!(
                    bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
                    "{} is not a PNG",
                    path.display()
                );
                pngs.push(path.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
        pngs.sort();
        for wanted in [
            "overview-1280x800.png",
            "overview-390x844.png",
            "process-1280x800.png",
            "process-390x844.png",
        ] {
            ensure!(
                pngs.iter().any(|p| p == wanted),
                "screenshot {wanted} missing from {} (has {pngs:?})",
                shots.display()
            );
        }
        println!(
            "dashboard test: screenshots in {}: {}",
            shots.display(),
            pngs.join(", ")
        );
        drop(pm2);
        Ok(())
    })
    .await
}

const LIVE_APP: &str = "cluster-app";
/// An app that only stays up, run in cluster mode.
const LIVE_APP_SRC: &str = "setInterval(() => console.log('cluster-app alive'), 2000);\n";
/// The live script's steps are each bounded (30-60 s, 120 s for the link); ~40 s in all
/// when everything answers.
const LIVE_SCRIPT_TIMEOUT: Duration = Duration::from_secs(420);

/// The text of `path` once it exists (the script writes its files atomically).
async fn file_text(path: &Path) -> String {
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One request of the live script: `{"do": "instances"}` (the app's instances by `pm2
/// jlist`) or `{"do": "kill-agent"}` (SIGKILL to the agent alone).
async fn answer(pm2: &Pm2, more: &mut Vec<Pm2>, dir: &Path, request: &str) -> Result<Value> {
    let request: Value = serde_json::from_str(request).context("request is not JSON")?;
    match request["do"].as_str() {
        Some("second-server") => {
            let app = App {
                name: LIVE_APP,
                source: LIVE_APP_SRC,
                args: &["-i", "1"],
            };
            more.push(link_from_page(dir, &app).await?);
            Ok(json!({"linked": more.len() + 1}))
        }
        Some("instances") => {
            let list = pm2.jlist().await?;
            let ids: Vec<Value> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["name"] == LIVE_APP)
                .map(|p| p["pm_id"].clone())
                .collect();
            Ok(json!({"instances": ids.len(), "pm_ids": ids}))
        }
        Some("kill-agent") => Ok(json!({"pid": pm2.kill_agent()?, "at": now_ms()})),
        _ => bail!("unknown request {request}"),
    }
}

/// Links a fresh pm2 running LIVE_APP on two cluster instances with the page's command,
/// then answers the script's requests in order until dropped (counting instances,
/// killing the agent, linking a second server running LIVE_APP once). Returns only when linking
/// failed (after telling the script) or a reply could not be written.
async fn drive_live(dir: &Path) -> Result<Infallible> {
    let app = App {
        name: LIVE_APP,
        source: LIVE_APP_SRC,
        args: &["-i", "2"],
    };
    let pm2 = match link_from_page(dir, &app).await {
        Ok(pm2) => pm2,
        Err(e) => {
            let told = json!({"error": format!("{e:#}")}).to_string();
            write_atomic(&dir.join("linked.json"), &told)?;
            return Err(e);
        }
    };
    // Servers linked later, at the script's request (killed on drop with the first).
    let mut more = Vec::new();
    let mut n = 0u64;
    loop {
        n += 1;
        let request = file_text(&dir.join(format!("request-{n}.json"))).await;
        let reply = match answer(&pm2, &mut more, dir, &request).await {
            Ok(reply) => reply,
            Err(e) => json!({"error": format!("{e:#}")}),
        };
        println!(
            "dashboard live test: request {n} {} -> {reply}",
            request.trim()
        );
        write_atomic(&dir.join(format!("reply-{n}.json")), &reply.to_string())?;
    }
}

#[tokio::test]
async fn dashboard_follows_scaling_and_a_dead_agent_live() {
    e2e(async {
        let km = Km::start().await?;
        let handshake = tempfile::Builder::new()
            .prefix("km-dashboard-live-")
            .tempdir()?;
        let shots = screenshot_dir("dashboard-live")?;
        let url = km.url();
        let hand_dir = handshake.path().to_string_lossy().into_owned();
        let shots_dir = shots.to_string_lossy().into_owned();
        let env = [
            ("KM_URL", url.as_str()),
            ("KM_HANDSHAKE_DIR", hand_dir.as_str()),
            ("KM_SCREENSHOT_DIR", shots_dir.as_str()),
            ("KM_APP_NAME", LIVE_APP),
        ];
        let t0 = Instant::now();
        let script = run_node_script("dashboard_live.js", &env, LIVE_SCRIPT_TIMEOUT);
        tokio::pin!(script);
        // Holds the pm2 (killed on drop): dropped after the script, before km.
        let driver = drive_live(handshake.path());
        tokio::pin!(driver);
        let mut driver_error = None;
        let out = loop {
            tokio::select! {
                out = &mut script => break out,
                failed = &mut driver, if driver_error.is_none() => {
                    let Err(e) = failed;
                    driver_error = Some(e);
                }
            }
        };
        script_passed(
            out,
            driver_error,
            "linking pm2 or answering the script",
            "dashboard-live",
            t0,
        )?;
        Ok(())
    })
    .await
}

/// The team script's time: each step is bounded (15-30 s); ~30 s in all when everything
/// answers.
const TEAM_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// The first link to a page in the latest mail to `to` whose subject has `subject` and
/// whose link was not handed out before (`given`), waiting for it up to 20 s:
/// `{"link", "subject"}`.
async fn mailed_link(smtp: &Smtp, to: &str, subject: &str, given: &[String]) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let header = |mail: &str, name: &str| {
        (mail.lines())
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    // The first link to a page (the site's own address is named too).
    let link = |mail: &str| {
        (mail.split_whitespace())
            .find(|w| w.starts_with("http") && w.matches('/').count() > 3)
            .map(str::to_string)
    };
    loop {
        let mails = smtp.decoded_mails()?;
        let found = mails.iter().rev().find_map(|m| {
            let wanted = header(m, "To:").contains(to) && header(m, "Subject:").contains(subject);
            let link = link(m).filter(|l| wanted && !given.contains(l))?;
            Some(json!({"link": link, "subject": header(m, "Subject:")}))
        });
        if let Some(found) = found {
            return Ok(found);
        }
        ensure!(
            Instant::now() < deadline,
            "no new mail to {to} about {subject:?} within 20 s ({} mails)",
            mails.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Answers the team script's requests (`{"do": "mail", "to", "subject"}`) in order, each
/// with a mail not handed out before.
async fn drive_team(smtp: &Smtp, dir: &Path) -> Result<Infallible> {
    let mut given = Vec::new();
    for n in 1.. {
        let request = file_text(&dir.join(format!("request-{n}.json"))).await;
        let asked: Value = serde_json::from_str(&request).context("request is not JSON")?;
        let (to, subject) = (asked["to"].as_str(), asked["subject"].as_str());
        let reply = match (asked["do"].as_str(), to, subject) {
            (Some("mail"), Some(to), Some(subject)) => mailed_link(smtp, to, subject, &given).await,
            _ => Err(anyhow::anyhow!("unknown request {request}")),
        };
        let reply = reply.unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        given.extend(reply["link"].as_str().map(str::to_string));
        println!("team test: request {n} {} -> {reply}", request.trim());
        write_atomic(&dir.join(format!("reply-{n}.json")), &reply.to_string())?;
    }
    bail!("the team script asked more than this test counts")
}

/// Teams in a real browser with a real SMTP server (`tests/js/team.js`): an invitation
/// accepted from its mail by someone without an account, the ownership transferred (the
/// new owner mailed), a personal token used as a bearer and a refresh token then revoked,
/// and the admin's accounts page: a password reset through its mailed link, an account
/// disabled (signed out, sign-in refused) and enabled again, and a reset asked for by its
/// user ("Forgot your password?").
#[tokio::test]
async fn teams_invite_transfer_tokens_and_accounts_in_a_browser() {
    e2e(async {
        let smtp = Smtp::start("plain", "", "")?;
        let km = Km::start_with(smtp.km_env()).await?;
        let handshake = tempfile::Builder::new().prefix("km-team-").tempdir()?;
        let shots = screenshot_dir("team")?;
        let url = km.url();
        let hand_dir = handshake.path().to_string_lossy().into_owned();
        let shots_dir = shots.to_string_lossy().into_owned();
        let env = [
            ("KM_URL", url.as_str()),
            ("KM_HANDSHAKE_DIR", hand_dir.as_str()),
            ("KM_SCREENSHOT_DIR", shots_dir.as_str()),
        ];
        let t0 = Instant::now();
        let script = run_node_script("team.js", &env, TEAM_SCRIPT_TIMEOUT);
        tokio::pin!(script);
        let driver = drive_team(&smtp, handshake.path());
        tokio::pin!(driver);
        let mut driver_error = None;
        let out = loop {
            tokio::select! {
                out = &mut script => break out,
                failed = &mut driver, if driver_error.is_none() => {
                    let Err(e) = failed;
                    driver_error = Some(e);
                }
            }
        };
        script_passed(out, driver_error, "reading the mails", "team", t0)?;
        for page in [
            "settings-invited",
            "invitation",
            "account-token",
            "accounts",
            "reset",
        ] {
            for size in ["1280x800", "390x844", "1280x800-dark"] {
                let file = shots.join(format!("{page}-{size}.png"));
                ensure!(file.is_file(), "screenshot {} missing", file.display());
            }
        }
        Ok(())
    })
    .await
}
